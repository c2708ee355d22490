//! The production `Routing`: rtnetlink, tagged with meshinit's route protocol.

use super::{
    ApplyError, Routing, RoutingChanges, RoutingEntry, RoutingItem, RoutingPlan, RoutingState,
};
use crate::netlink::{
    interface_index, route_matches, route_table, rule_mark_table, rule_matches, NlFamily, Socket,
};
use crate::rules::decisions::IPV6_PASSTHROUGH;
use crate::values::Family;

#[derive(Default)]
pub struct NetlinkRouting {
    socket: Option<Socket>,
}

fn nl(family: Family) -> NlFamily {
    match family {
        Family::V4 => NlFamily::Inet,
        Family::V6 => NlFamily::Inet6,
    }
}

fn passthrough() -> std::net::Ipv6Addr {
    match IPV6_PASSTHROUGH {
        std::net::IpAddr::V6(a) => a,
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

impl NetlinkRouting {
    fn socket(&mut self) -> Result<&mut Socket, ApplyError> {
        if self.socket.is_none() {
            self.socket = Some(Socket::route()?);
        }
        self.socket
            .as_mut()
            .ok_or_else(|| unreachable!("socket was just opened"))
    }
}

impl Routing for NetlinkRouting {
    fn ensure(&mut self, plan: &RoutingPlan) -> Result<RoutingChanges, ApplyError> {
        let mut changes = RoutingChanges::default();
        if !plan.ipv6_passthrough_address && plan.tproxy.is_none() {
            return Ok(changes);
        }
        let lo = interface_index("lo")?;
        let result = (|| {
            let socket = self.socket()?;
            if plan.ipv6_passthrough_address && socket.ensure_ipv6_address(passthrough(), lo)? {
                changes.added.push(RoutingItem::Ipv6PassthroughAddress);
            }
            if let Some((mark, table)) = plan.tproxy {
                let families: &[Family] = if plan.ipv6 {
                    &Family::ALL
                } else {
                    &[Family::V4]
                };
                for &family in families {
                    if socket.ensure_rule(nl(family), mark, table)? {
                        changes.added.push(RoutingItem::Rule {
                            family,
                            mark,
                            table,
                        });
                    }
                    if socket.ensure_local_route(nl(family), lo, table)? {
                        changes
                            .added
                            .push(RoutingItem::LocalRoute { family, table });
                    }
                }
            }
            Ok(())
        })();
        if let Err(err) = result {
            let _ = self.undo(&changes);
            return Err(err);
        }
        Ok(changes)
    }

    fn undo(&mut self, changes: &RoutingChanges) -> Result<(), ApplyError> {
        if changes.added.is_empty() {
            return Ok(());
        }
        let lo = interface_index("lo")?;
        let socket = self.socket()?;
        for item in changes.added.iter().rev() {
            match *item {
                RoutingItem::Ipv6PassthroughAddress => {
                    socket.remove_ipv6_address(passthrough(), lo)?
                }
                RoutingItem::Rule {
                    family,
                    mark,
                    table,
                } => socket.remove_rule(nl(family), mark, table)?,
                RoutingItem::LocalRoute { family, table } => {
                    socket.remove_local_route(nl(family), lo, table)?
                }
            }
        }
        Ok(())
    }

    fn remove_stale(&mut self, plan: &RoutingPlan) -> Result<usize, ApplyError> {
        let plan = *plan;
        let keep = move |family: NlFamily, is_rule: bool, payload: &[u8]| {
            let planned = family == NlFamily::Inet || plan.ipv6;
            match plan.tproxy {
                Some((mark, table)) if planned => {
                    if is_rule {
                        rule_matches(payload, mark, table)
                    } else {
                        route_matches(payload, table)
                    }
                }
                _ => false,
            }
        };
        let removed = self.socket()?.remove_tagged(&keep)?;
        if !plan.ipv6_passthrough_address {
            // IPv6 is off now: an earlier configuration's ::6 goes too, as on cleanup.
            let lo = interface_index("lo")?;
            self.socket()?.remove_ipv6_address(passthrough(), lo)?;
        }
        Ok(removed)
    }

    fn remove_all(&mut self) -> Result<usize, ApplyError> {
        let lo = interface_index("lo")?;
        let socket = self.socket()?;
        let removed = socket.remove_tagged(&|_, _, _| false)?;
        socket.remove_ipv6_address(passthrough(), lo)?;
        Ok(removed)
    }

    fn read(&mut self, passthrough_address: bool) -> Result<RoutingState, ApplyError> {
        let socket = self.socket()?;
        let entries = socket
            .tagged_routing()?
            .iter()
            .map(|(family, is_rule, payload)| {
                let family = match family {
                    NlFamily::Inet => Family::V4,
                    NlFamily::Inet6 => Family::V6,
                };
                if *is_rule {
                    let (mark, table) = rule_mark_table(payload);
                    RoutingEntry::Rule {
                        family,
                        mark,
                        table,
                    }
                } else {
                    let (table, local) = route_table(payload);
                    RoutingEntry::Route {
                        family,
                        table,
                        local,
                    }
                }
            })
            .collect();
        let passthrough_address = if passthrough_address {
            let lo = interface_index("lo")?;
            self.socket()?.has_ipv6_address(passthrough(), lo)?
        } else {
            false
        };
        Ok(RoutingState {
            entries,
            passthrough_address,
        })
    }
}
