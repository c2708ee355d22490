//! Istio's capture rules as one list of typed steps, whatever the backend: which rules
//! exist, in which table and chain, at which place, for which families, and what each one
//! matches and does. The iptables planner (`iptables/plan.rs`) and the nftables
//! planner (`nft/plan.rs`) are thin passes that write each step in their backend's model; what Istio
//! decides is changed here, once.
//!
//! The steps follow `IptablesConfigurator.Run`, which `NftablesConfigurator.Run` repeats step
//! for step. A step names Istio's rule by what it is for (`Rule`), not by its matches: the two
//! backends write most rules with their own matches in their own order (Istio writes each
//! rule out literally in each), so that part belongs to the passes.
//!
//! Pure: no I/O, no text.

use std::collections::{BTreeSet, HashSet};

use ipnet::IpNet;

use super::decisions::{self, fixed_port, DnsServers, DNS_PORT};
// How many entries a named ipset of a list holds decides whether it is worth one.
use super::iptables::ipset::IpSet;
use super::PlanOptions;
use crate::config::{CaptureConfig, InboundCapture, OutboundInclude, OwnerGroups};
use crate::values::{Family, Interface, Owner, OwnerKind, Port, PortRange, Protocol};

/// Istio's tables, each backend naming them its own way (the nftables model's tables are
/// these, named there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Nat,
    Mangle,
    Raw,
}

/// The chains Istio uses: the two built-in hooks and its own (the nftables model's chains
/// are these, named there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chain {
    Prerouting,
    Output,
    Inbound,
    Redirect,
    InRedirect,
    IstioOutput,
    OutputDns,
    Divert,
    Tproxy,
    Drop,
}

/// Where a rule goes in its chain: Istio's `AppendRule`, or `InsertRule` at a 0-based index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Append,
    Insert(usize),
}

/// Which families a step applies to. `Both` is one rule for both: one per family on
/// iptables, one in nftables' `inet` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Families {
    Both,
    V4,
    V6,
}

impl Families {
    pub fn only(family: Family) -> Families {
        match family {
            Family::V4 => Families::V4,
            Family::V6 => Families::V6,
        }
    }

    pub fn includes(self, family: Family) -> bool {
        matches!(
            (self, family),
            (Families::Both, _) | (Families::V4, Family::V4) | (Families::V6, Family::V6)
        )
    }

    /// The families that have something in `v4` and `v6`, if any.
    fn with(v4: bool, v6: bool) -> Option<Families> {
        match (v4, v6) {
            (true, true) => Some(Families::Both),
            (true, false) => Some(Families::V4),
            (false, true) => Some(Families::V6),
            (false, false) => None,
        }
    }
}

/// Which of Istio's lists a set holds; part of its name, so `iptables-save` stays readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetList {
    /// `-x`: outbound destinations that bypass the sidecar.
    ExcludedNets,
    /// `-i`: the only outbound destinations captured.
    IncludedNets,
    /// `-o`: outbound ports that bypass the sidecar.
    ExcludedOutboundPorts,
    /// `-q`: outbound ports always captured.
    IncludedOutboundPorts,
    /// `-d`: inbound ports not captured.
    ExcludedInboundPorts,
    /// `-b`: the only inbound ports captured.
    IncludedInboundPorts,
}

impl SetList {
    /// The list's part of a set's name.
    pub fn token(self) -> &'static str {
        match self {
            SetList::ExcludedNets => "excl-nets",
            SetList::IncludedNets => "incl-nets",
            SetList::ExcludedOutboundPorts => "excl-oports",
            SetList::IncludedOutboundPorts => "incl-oports",
            SetList::ExcludedInboundPorts => "excl-iports",
            SetList::IncludedInboundPorts => "incl-iports",
        }
    }
}

/// What a matching packet does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    Return,
    Jump(Chain),
}

pub use super::decisions::ProxyOwner;

/// The ports one rule matches: one entry of a list (Istio's), or with `--match-sets` the
/// whole list, as given (each backend makes its own kind of set of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    One(PortRange),
    Set {
        list: SetList,
        ports: Vec<PortRange>,
    },
}

/// The destinations one rule matches: one network, or with `--match-sets` a list of one
/// family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nets {
    One(IpNet),
    Set {
        list: SetList,
        family: Family,
        nets: Vec<IpNet>,
    },
}

/// One of Istio's rules, by what it is for, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Packets in through `interface` (to `to`, when given).
    FromInterface {
        interface: Interface,
        to: Option<Nets>,
        then: Then,
    },
    /// Packets out through an excluded interface return.
    ToInterfaceReturn(Interface),
    /// Packets conntrack calls invalid go to the drop chain.
    InvalidToDrop,
    /// The drop chain's one rule.
    Drop,
    /// Every packet jumps.
    Jump(Chain),
    /// The jump to a DNS chain, taken by the families that have DNS servers to capture.
    DnsJump(Chain),
    /// Every TCP packet jumps.
    TcpJump(Chain),
    /// TCP is redirected to `port`.
    TcpRedirect(Port),
    /// Inbound TCP to `ports`.
    InboundPorts {
        ports: Ports,
        then: Then,
    },
    /// Inbound TCP of established connections (to `ports`, when given) goes to the divert
    /// chain.
    EstablishedToDivert(Option<Ports>),
    /// The divert chain: mark, then accept.
    SetMark(u32),
    Accept,
    /// Inbound TCP not to `not_to` goes to the proxy's inbound port (`port`) marked `mark`.
    Tproxy {
        not_to: IpNet,
        mark: u32,
        port: Port,
    },
    /// Outbound `protocol` to `ports`.
    OutboundPorts {
        protocol: Protocol,
        ports: Ports,
        then: Then,
    },
    /// Outbound packets from Envoy's inbound passthrough source (`net`) over loopback return.
    PassthroughOutReturn(IpNet),
    /// The proxy's TCP over loopback, not to `not_to` nor to `except` ports, goes back
    /// through inbound capture.
    ProxyToInbound {
        owner: ProxyOwner,
        not_to: IpNet,
        except: Vec<Port>,
    },
    /// Loopback traffic of anyone but the proxy returns; with DNS capture only TCP not to
    /// port 53 (`except_dns`).
    OthersLoopbackReturn {
        owner: ProxyOwner,
        except_dns: bool,
    },
    /// Everything else of this owner returns.
    OwnerReturn(ProxyOwner),
    /// Everything not of these groups returns (`--capture-groups`'s include list).
    NoneOfGroupsReturn(Vec<Owner>),
    /// DNS over `protocol` (to `server`, when given) goes to the agent's DNS proxy.
    DnsRedirect {
        protocol: Protocol,
        server: Option<IpNet>,
    },
    /// The proxy's own DNS queries (UDP), in the upstream conntrack zone.
    ProxyQueryZone(ProxyOwner),
    /// The DNS proxy's answers to the app (UDP), in the client zone.
    ProxyAnswerZone(ProxyOwner),
    /// The app's DNS queries (UDP, to `server` when given), in the client zone.
    QueryZone(Option<IpNet>),
    /// DNS answers (UDP, from `server` when given), in the upstream zone.
    AnswerZone(Option<IpNet>),
    /// Packets to `nets`.
    Destination {
        nets: Nets,
        then: Then,
    },
    /// TCP marked `mark` saves it on the connection.
    SaveMark(u32),
    /// TCP over loopback marked `mark` returns.
    MarkedOutReturn(u32),
    /// The proxy's TCP over loopback, not to `not_to`, is marked as the proxy's outbound.
    ProxyOutboundMark {
        owner: ProxyOwner,
        not_to: IpNet,
    },
    /// TCP of a connection marked `mark` gets its mark back.
    RestoreMark(u32),
    /// TCP marked `mark` returns.
    MarkedReturn(u32),
    /// Inbound TCP over loopback from Envoy's passthrough source (`net`) returns.
    PassthroughInReturn(IpNet),
    /// Inbound TCP over loopback not marked as the proxy's outbound returns.
    UnmarkedLoopbackReturn,
}

/// One rule, placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub table: Table,
    pub chain: Chain,
    pub at: At,
    pub families: Families,
    pub rule: Rule,
}

/// How the backend's sets hold a list, which decides when `--match-sets` is worth a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetStyle {
    /// Named ipsets (iptables): a list with fewer than two distinct members keeps Istio's
    /// rules, one per entry as given.
    Ipset,
    /// nftables' anonymous interval sets: a port list is always one rule (a set of one
    /// element is written as a plain match); networks are one rule once two distinct ones
    /// remain, else one rule per distinct network.
    Interval,
}

/// Istio's steps for `cfg`, in its order.
pub fn steps(cfg: &CaptureConfig, options: PlanOptions, sets: SetStyle) -> Vec<Step> {
    let mut steps = Steps {
        cfg,
        options,
        sets,
        out: Vec::new(),
    };
    steps.run();
    steps.out
}

struct Steps<'a> {
    cfg: &'a CaptureConfig,
    options: PlanOptions,
    sets: SetStyle,
    out: Vec<Step>,
}

impl Steps<'_> {
    fn add(&mut self, families: Families, table: Table, chain: Chain, at: At, rule: Rule) {
        self.out.push(Step {
            table,
            chain,
            at,
            families,
            rule,
        });
    }

    fn append(&mut self, table: Table, chain: Chain, rule: Rule) {
        self.add(Families::Both, table, chain, At::Append, rule);
    }

    /// Istio's `AppendVersionedRule`: one rule per family, differing by one address.
    fn append_versioned(&mut self, table: Table, chain: Chain, make: impl Fn(Family) -> Rule) {
        for family in Family::ALL {
            self.add(
                Families::only(family),
                table,
                chain,
                At::Append,
                make(family),
            );
        }
    }

    /// The port matches of a list, one rule each: one per port or range (Istio's), or with
    /// `--match-sets` the whole list where the backend's set of it is worth it.
    fn port_groups(&self, list: SetList, ports: &[PortRange]) -> Vec<Ports> {
        let each = || ports.iter().map(|p| Ports::One(*p)).collect();
        if !self.options.match_sets || ports.is_empty() {
            return each();
        }
        let whole = vec![Ports::Set {
            list,
            ports: ports.to_vec(),
        }];
        match self.sets {
            SetStyle::Ipset if ports.iter().collect::<BTreeSet<_>>().len() < 2 => each(),
            SetStyle::Ipset | SetStyle::Interval => whole,
        }
    }

    /// The destination matches for the networks of `family` in `nets`, one rule each.
    fn destinations(&self, list: SetList, family: Family, nets: &[IpNet]) -> Vec<Nets> {
        let nets: Vec<IpNet> = nets
            .iter()
            .filter(|n| Family::of(n) == family)
            .copied()
            .collect();
        let each = |nets: Vec<IpNet>| nets.into_iter().map(Nets::One).collect();
        if !self.options.match_sets {
            return each(nets);
        }
        let nets = match self.sets {
            SetStyle::Ipset if IpSet::nets(list, family, &nets).len() < 2 => return each(nets),
            SetStyle::Ipset => nets,
            SetStyle::Interval => {
                let mut seen = HashSet::new();
                let distinct: Vec<IpNet> = nets.into_iter().filter(|n| seen.insert(*n)).collect();
                if distinct.len() < 2 {
                    return each(distinct);
                }
                distinct
            }
        };
        vec![Nets::Set { list, family, nets }]
    }

    fn run(&mut self) {
        let cfg = self.cfg;
        self.exclude_interfaces();
        // KubeVirt's VMs' traffic is not the pod's inbound: it skips inbound capture.
        self.kube_virt_first(Families::Both, None, Then::Return);
        if cfg.drop_invalid {
            self.append(Table::Mangle, Chain::Prerouting, Rule::InvalidToDrop);
            self.append(Table::Mangle, Chain::Drop, Rule::Drop);
        }
        let tunnel = Ports::One(cfg.inbound_tunnel_port.into());
        self.append(
            Table::Nat,
            Chain::Inbound,
            Rule::InboundPorts {
                ports: tunnel,
                then: Then::Return,
            },
        );
        self.append(
            Table::Nat,
            Chain::Redirect,
            Rule::TcpRedirect(cfg.proxy_port),
        );
        self.append(
            Table::Nat,
            Chain::InRedirect,
            Rule::TcpRedirect(cfg.inbound_capture_port),
        );
        self.inbound();
        self.append(Table::Nat, Chain::Output, Rule::Jump(Chain::IstioOutput));
        // Port exclusions come before the loopback handling, so an excluded port is never
        // redirected, not even back to the pod itself.
        for ports in self.port_groups(SetList::ExcludedOutboundPorts, &cfg.outbound_ports_exclude) {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let ports = ports.clone();
                let then = Then::Return;
                let rule = Rule::OutboundPorts {
                    protocol,
                    ports,
                    then,
                };
                self.append(Table::Nat, Chain::IstioOutput, rule);
            }
        }
        self.append_versioned(Table::Nat, Chain::IstioOutput, |family| {
            Rule::PassthroughOutReturn(decisions::passthrough_source(family))
        });
        self.proxy_owner_rules();
        self.owner_groups();
        if decisions::dns_on(cfg) {
            self.dns_redirect();
            self.dns_conntrack_zones();
        }
        // Envoy-aware apps and container-to-container traffic use localhost: left alone.
        let loopback = |family| Nets::One(decisions::loopback(cfg, family));
        self.append_versioned(Table::Nat, Chain::IstioOutput, |family| Rule::Destination {
            nets: loopback(family),
            then: Then::Return,
        });
        // Exclusions before inclusions; all IPv4 networks first, then IPv6 (Istio's
        // `SeparateV4V6`).
        for family in Family::ALL {
            for nets in self.destinations(SetList::ExcludedNets, family, &cfg.outbound_exclude) {
                let rule = Rule::Destination {
                    nets,
                    then: Then::Return,
                };
                self.add(
                    Families::only(family),
                    Table::Nat,
                    Chain::IstioOutput,
                    At::Append,
                    rule,
                );
            }
        }
        for ports in self.port_groups(SetList::IncludedOutboundPorts, &cfg.outbound_ports_include) {
            let rule = Rule::OutboundPorts {
                protocol: Protocol::Tcp,
                ports,
                then: Then::Jump(Chain::Redirect),
            };
            self.append(Table::Nat, Chain::IstioOutput, rule);
        }
        self.outbound_include();
        if decisions::tproxy(cfg) {
            self.tproxy_marks();
        }
    }

    /// For each KubeVirt interface, in front of everything in PREROUTING: its packets (to
    /// `to`, when given) do `then`.
    fn kube_virt_first(&mut self, families: Families, to: Option<&Nets>, then: Then) {
        for interface in &self.cfg.kube_virt_interfaces {
            let rule = Rule::FromInterface {
                interface: interface.clone(),
                to: to.cloned(),
                then,
            };
            let at = At::Insert(0);
            self.add(families, Table::Nat, Chain::Prerouting, at, rule);
        }
    }

    fn exclude_interfaces(&mut self) {
        let cfg = self.cfg;
        let mut tables = vec![Table::Nat];
        if decisions::tproxy(cfg) {
            tables.push(Table::Mangle);
        }
        for table in tables {
            for interface in &cfg.exclude_interfaces {
                let rule = Rule::FromInterface {
                    interface: interface.clone(),
                    to: None,
                    then: Then::Return,
                };
                self.append(table, Chain::Prerouting, rule);
                let rule = Rule::ToInterfaceReturn(interface.clone());
                self.append(table, Chain::Output, rule);
            }
        }
    }

    /// Istio's `handleInboundPortsInclude` and, under TPROXY, `handleInboundTProxyMode`.
    fn inbound(&mut self) {
        let cfg = self.cfg;
        if cfg.inbound == InboundCapture::Off {
            return;
        }
        let tproxy = decisions::tproxy(cfg);
        let table = if tproxy {
            self.append(Table::Mangle, Chain::Divert, Rule::SetMark(cfg.tproxy_mark));
            self.append(Table::Mangle, Chain::Divert, Rule::Accept);
            self.append_versioned(Table::Mangle, Chain::Tproxy, |family| Rule::Tproxy {
                not_to: decisions::loopback(cfg, family),
                mark: cfg.tproxy_mark,
                port: cfg.inbound_capture_port,
            });
            Table::Mangle
        } else {
            Table::Nat
        };
        self.append(table, Chain::Prerouting, Rule::TcpJump(Chain::Inbound));
        match &cfg.inbound {
            InboundCapture::Off => {}
            InboundCapture::AllExcept(excluded) => {
                for ports in self.port_groups(SetList::ExcludedInboundPorts, excluded) {
                    let then = Then::Return;
                    self.append(table, Chain::Inbound, Rule::InboundPorts { ports, then });
                }
                if tproxy {
                    self.append(table, Chain::Inbound, Rule::EstablishedToDivert(None));
                    self.append(table, Chain::Inbound, Rule::TcpJump(Chain::Tproxy));
                } else {
                    self.append(table, Chain::Inbound, Rule::TcpJump(Chain::InRedirect));
                }
            }
            InboundCapture::Only(ports) => {
                // With TPROXY each port's established packets go to the divert chain before
                // its new connections go to TPROXY; over a set the pair stays in that order.
                for ports in self.port_groups(SetList::IncludedInboundPorts, ports) {
                    if tproxy {
                        let established = Rule::EstablishedToDivert(Some(ports.clone()));
                        self.append(table, Chain::Inbound, established);
                    }
                    let then = Then::Jump(if tproxy {
                        Chain::Tproxy
                    } else {
                        Chain::InRedirect
                    });
                    self.append(table, Chain::Inbound, Rule::InboundPorts { ports, then });
                }
            }
        }
    }

    /// For each proxy uid, then each gid: the proxy's own connections to the pod's address
    /// go back through inbound capture (app → VIP → Envoy → Envoy inbound → app), the app's
    /// own loopback traffic is left alone, and everything else the proxy sends goes direct.
    fn proxy_owner_rules(&mut self) {
        let cfg = self.cfg;
        let dns_on = decisions::dns_on(cfg);
        let loopback_included = match &cfg.outbound_include {
            OutboundInclude::Only(nets) => nets.iter().any(|n| n.addr().is_loopback()),
            OutboundInclude::Off | OutboundInclude::All => false,
        };
        for owner in decisions::proxy_owners(cfg) {
            // Istio skips DNS in this rule for uids only; gids keep the plain form.
            let except = if dns_on && owner.0 == OwnerKind::Uid {
                vec![fixed_port(DNS_PORT), cfg.inbound_tunnel_port]
            } else {
                vec![cfg.inbound_tunnel_port]
            };
            self.append_versioned(Table::Nat, Chain::IstioOutput, |family| {
                Rule::ProxyToInbound {
                    owner: owner.clone(),
                    not_to: decisions::loopback(cfg, family),
                    except: except.clone(),
                }
            });
            if !loopback_included {
                // With DNS capture, TCP DNS to a resolver on localhost must still be caught
                // further down, so port 53 is not waved through here.
                let rule = Rule::OthersLoopbackReturn {
                    owner: owner.clone(),
                    except_dns: dns_on,
                };
                self.append(Table::Nat, Chain::IstioOutput, rule);
            }
            self.append(Table::Nat, Chain::IstioOutput, Rule::OwnerReturn(owner));
        }
    }

    /// Istio's `handleCaptureByOwnerGroup`.
    fn owner_groups(&mut self) {
        match &self.cfg.owner_groups {
            OwnerGroups::AllExcept(groups) => {
                for group in groups {
                    let rule = Rule::OwnerReturn((OwnerKind::Gid, group.clone()));
                    self.append(Table::Nat, Chain::IstioOutput, rule);
                }
            }
            OwnerGroups::Only(groups) => {
                let rule = Rule::NoneOfGroupsReturn(groups.clone());
                self.append(Table::Nat, Chain::IstioOutput, rule);
            }
        }
    }

    /// Istio's `SetupDNSRedir`: queries from the app to the configured servers (or to
    /// anyone, with capture-all) go to the agent's DNS proxy.
    fn dns_redirect(&mut self) {
        let DnsServers { all, v4, v6 } = decisions::dns_servers(self.cfg);
        self.append(Table::Raw, Chain::Output, Rule::Jump(Chain::OutputDns));
        // Only a family with servers to capture (or capture-all) jumps to the DNS chain.
        if let Some(families) = Families::with(all || !v4.is_empty(), all || !v6.is_empty()) {
            let rule = Rule::DnsJump(Chain::OutputDns);
            self.add(families, Table::Nat, Chain::IstioOutput, At::Append, rule);
        }
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            if all {
                let rule = Rule::DnsRedirect {
                    protocol,
                    server: None,
                };
                self.append(Table::Nat, Chain::OutputDns, rule);
                continue;
            }
            for server in v4.iter().chain(&v6) {
                let families = Families::only(Family::of(server));
                let server = Some(*server);
                let rule = Rule::DnsRedirect { protocol, server };
                self.add(families, Table::Nat, Chain::OutputDns, At::Append, rule);
            }
        }
    }

    /// Istio's `addDNSConntrackZones`: the agent's upstream queries and the app's queries to
    /// the agent in separate conntrack zones (Istio's fix for UDP conntrack races).
    fn dns_conntrack_zones(&mut self) {
        let DnsServers { all, v4, v6 } = decisions::dns_servers(self.cfg);
        for owner in decisions::proxy_owners(self.cfg) {
            let rule = Rule::ProxyQueryZone(owner.clone());
            self.append(Table::Raw, Chain::OutputDns, rule);
            self.append(Table::Raw, Chain::OutputDns, Rule::ProxyAnswerZone(owner));
        }
        if let Some(families) = Families::with(all || !v4.is_empty(), all || !v6.is_empty()) {
            let rule = Rule::DnsJump(Chain::Inbound);
            self.add(families, Table::Raw, Chain::Prerouting, At::Append, rule);
        }
        if all {
            self.append(Table::Raw, Chain::OutputDns, Rule::QueryZone(None));
            self.append(Table::Raw, Chain::Inbound, Rule::AnswerZone(None));
            return;
        }
        for server in v4.iter().chain(&v6) {
            let families = Families::only(Family::of(server));
            let rule = Rule::QueryZone(Some(*server));
            self.add(families, Table::Raw, Chain::OutputDns, At::Append, rule);
            let rule = Rule::AnswerZone(Some(*server));
            self.add(families, Table::Raw, Chain::Inbound, At::Append, rule);
        }
    }

    /// Istio's `handleOutboundIncludeRules`: what is captured, from the pod and from
    /// KubeVirt's interfaces (in front of everything in PREROUTING).
    fn outbound_include(&mut self) {
        let cfg = self.cfg;
        let redirect = Then::Jump(Chain::Redirect);
        match &cfg.outbound_include {
            OutboundInclude::Off => {}
            OutboundInclude::All => {
                self.append(Table::Nat, Chain::IstioOutput, Rule::Jump(Chain::Redirect));
                self.kube_virt_first(Families::Both, None, redirect);
            }
            OutboundInclude::Only(included) => {
                for family in Family::ALL {
                    let families = Families::only(family);
                    for nets in self.destinations(SetList::IncludedNets, family, included) {
                        self.kube_virt_first(families, Some(&nets), redirect);
                        let rule = Rule::Destination {
                            nets,
                            then: redirect,
                        };
                        self.add(families, Table::Nat, Chain::IstioOutput, At::Append, rule);
                    }
                }
            }
        }
    }

    /// TPROXY bookkeeping: remember marks across a connection, let the sidecar's own
    /// connections back to the app through, and stop re-capturing marked packets.
    fn tproxy_marks(&mut self) {
        let cfg = self.cfg;
        let mark = cfg.tproxy_mark;
        self.append(Table::Mangle, Chain::Prerouting, Rule::SaveMark(mark));
        self.append(Table::Mangle, Chain::Output, Rule::MarkedOutReturn(mark));
        for owner in decisions::proxy_owners(cfg) {
            self.append_versioned(Table::Mangle, Chain::Output, |family| {
                Rule::ProxyOutboundMark {
                    owner: owner.clone(),
                    not_to: decisions::loopback(cfg, family),
                }
            });
        }
        self.append(Table::Mangle, Chain::Output, Rule::RestoreMark(mark));
        let inbound = |at, families, rule| Step {
            table: Table::Mangle,
            chain: Chain::Inbound,
            at: At::Insert(at),
            families,
            rule,
        };
        self.out
            .push(inbound(0, Families::Both, Rule::MarkedReturn(mark)));
        for family in Family::ALL {
            let rule = Rule::PassthroughInReturn(decisions::passthrough_source(family));
            self.out.push(inbound(1, Families::only(family), rule));
        }
        self.out
            .push(inbound(2, Families::Both, Rule::UnmarkedLoopbackReturn));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InboundCapture;
    use crate::rules::iptables::plan;
    use crate::rules::iptables::plan::tests::{
        base, ipv6_dns_servers_only, lists_config, tproxy_config,
    };
    use crate::rules::{nft, PlanOptions};
    use crate::values::tests::port;

    const SETS: PlanOptions = PlanOptions { match_sets: true };

    #[test]
    fn only_families_with_dns_servers_jump_to_dns_capture() {
        let cfg = ipv6_dns_servers_only();
        let jumps: Vec<(Table, Families)> = steps(&cfg, PlanOptions::default(), SetStyle::Ipset)
            .into_iter()
            .filter(|step| matches!(step.rule, Rule::DnsJump(_)))
            .map(|step| (step.table, step.families))
            .collect();
        // nftables writes them as one inet rule all the same, IPv6 off (see nft/plan.rs).
        assert_eq!(
            jumps,
            [(Table::Nat, Families::V6), (Table::Raw, Families::V6)]
        );
    }

    #[test]
    fn without_match_sets_the_set_styles_make_the_same_steps() {
        let cfg = lists_config();
        let options = PlanOptions::default();
        assert_eq!(
            steps(&cfg, options, SetStyle::Ipset),
            steps(&cfg, options, SetStyle::Interval)
        );
    }

    #[test]
    fn a_port_given_twice_is_a_set_only_to_nftables() {
        let mut cfg = base();
        cfg.outbound_ports_exclude = vec![port(8200), port(8200)];
        let excluded = |sets| {
            steps(&cfg, SETS, sets)
                .into_iter()
                .filter(|step| {
                    matches!(
                        step.rule,
                        Rule::OutboundPorts {
                            then: Then::Return,
                            ..
                        }
                    )
                })
                .count()
        };
        assert_eq!(excluded(SetStyle::Ipset), 4, "each entry, TCP and UDP");
        assert_eq!(excluded(SetStyle::Interval), 2, "one set, TCP and UDP");
    }

    #[test]
    fn match_sets_save_the_lists_rules_and_no_other_on_both_backends() {
        let cfg = lists_config();
        // Ports x2 protocols, IPv4 networks, inbound ports.
        let saved = (2 * 3 - 2) + (3 - 1) + (3 - 1);
        let (chains, sets) = (plan::plan(&cfg), plan::plan_with(&cfg, SETS));
        assert_eq!(chains.v4.rule_count() - sets.v4.rule_count(), saved);
        let (chains, sets) = (nft::plan(&cfg), nft::plan_with(&cfg, SETS));
        assert_eq!(chains.rule_count() - sets.rule_count(), saved);
    }

    #[test]
    fn match_sets_change_nothing_without_lists() {
        let mut one_port = tproxy_config();
        one_port.inbound = InboundCapture::Only(vec![port(8080)]);
        one_port.outbound_exclude = vec!["10.0.0.0/8".parse().unwrap()];
        for cfg in [base(), one_port.clone()] {
            assert_eq!(plan::plan_with(&cfg, SETS), plan::plan(&cfg));
            assert_eq!(nft::plan_with(&cfg, SETS), nft::plan(&cfg));
        }
        // A port given twice is no list either to an ipset: Istio's rule for each entry.
        let mut twice = one_port;
        twice.inbound = InboundCapture::Only(vec![port(8080), port(8080)]);
        assert_eq!(plan::plan_with(&twice, SETS), plan::plan(&twice));
    }
}
