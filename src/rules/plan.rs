//! `CaptureConfig` → `Ruleset`: the capture rules Istio's `istio-iptables` would install.
//!
//! Pure: no I/O, no text. The order of steps follows Istio's `IptablesConfigurator.Run` so the
//! two can be compared section by section; the resulting chains are what matters, and
//! `tests/` checks them against Istio's own golden files.

use std::sync::Arc;

use ipnet::IpNet;

use super::builder::{jump, Families, RulesetBuilder};
use super::decisions::{
    self, fixed_port, lo, DnsServers, CT_ZONE_CLIENT, CT_ZONE_UPSTREAM, DNS_PORT, DNS_PROXY_PORT,
    OUTBOUND_MARK,
};
use super::ipset::{IpSet, SetList};
use super::model::{
    BuiltinChain, Chain, CtState, Family, IstioChain, Match, Owner, OwnerKind, PortRange, Protocol,
    Rule, Ruleset, Table, Target,
};
use crate::config::OwnerGroups;
use crate::config::{CaptureConfig, InboundCapture, OutboundInclude};
use crate::rules::PlanOptions;

const PREROUTING: Chain = Chain::Builtin(BuiltinChain::Prerouting);
const OUTPUT: Chain = Chain::Builtin(BuiltinChain::Output);
const INBOUND: Chain = Chain::Istio(IstioChain::Inbound);
const REDIRECT: Chain = Chain::Istio(IstioChain::Redirect);
const IN_REDIRECT: Chain = Chain::Istio(IstioChain::InRedirect);
const ISTIO_OUTPUT: Chain = Chain::Istio(IstioChain::Output);
const OUTPUT_DNS: Chain = Chain::Istio(IstioChain::OutputDns);
const DIVERT: Chain = Chain::Istio(IstioChain::Divert);
const TPROXY: Chain = Chain::Istio(IstioChain::Tproxy);
const DROP: Chain = Chain::Istio(IstioChain::Drop);

/// Plans the complete ruleset for `cfg`: Istio's, one rule per list entry.
pub fn plan(cfg: &CaptureConfig) -> Ruleset {
    plan_with(cfg, PlanOptions::default())
}

/// Plans the complete ruleset for `cfg`, shaped by `options` (`--match-sets` puts each
/// list of two or more entries into a named ipset, one per family).
pub fn plan_with(cfg: &CaptureConfig, options: PlanOptions) -> Ruleset {
    let mut planner = Planner {
        cfg,
        options,
        b: RulesetBuilder::new(cfg.ipv6),
    };
    planner.run();
    let (v4, v6) = planner.b.finish();
    let tproxy_routing = decisions::tproxy_routing(cfg);
    Ruleset {
        v4,
        v6,
        tproxy_routing,
        ipv6_passthrough_address: cfg.ipv6,
    }
}

struct Planner<'a> {
    cfg: &'a CaptureConfig,
    options: PlanOptions,
    b: RulesetBuilder,
}

/// How rules match one entry of a port list: the port itself (Istio's), or, with
/// `--match-sets`, the whole list's set for the rule's family.
#[derive(Debug, Clone)]
enum PortMatch {
    One(PortRange),
    Sets { v4: Arc<IpSet>, v6: Arc<IpSet> },
}

impl PortMatch {
    fn dport(&self, family: Family) -> Match {
        match self {
            PortMatch::One(port) => dport(*port),
            PortMatch::Sets { v4, v6 } => Match::InSet(Arc::clone(match family {
                Family::V4 => v4,
                Family::V6 => v6,
            })),
        }
    }
}

fn proto(p: Protocol) -> Match {
    Match::Protocol(p)
}

fn dport(port: impl Into<PortRange>) -> Match {
    Match::DestinationPort {
        port: port.into(),
        negated: false,
    }
}

fn not_dport(port: impl Into<PortRange>) -> Match {
    Match::DestinationPort {
        port: port.into(),
        negated: true,
    }
}

fn dst(net: IpNet) -> Match {
    Match::Destination {
        net,
        negated: false,
    }
}

fn not_dst(net: IpNet) -> Match {
    Match::Destination { net, negated: true }
}

fn owner(kind: OwnerKind, who: &Owner, negated: bool) -> Match {
    Match::Owner {
        kind,
        owner: who.clone(),
        negated,
    }
}

fn rule(matches: Vec<Match>, target: Target) -> Rule {
    Rule::new(matches, target)
}

impl Planner<'_> {
    /// The rules' port matches for `ports`: one per port or range (Istio's, for lists
    /// without ranges), or with `--match-sets` one set match for the whole list once it
    /// holds two different entries.
    fn port_matches(&self, list: SetList, ports: &[PortRange]) -> Vec<PortMatch> {
        let distinct = ports
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if !self.options.match_sets || distinct < 2 {
            return ports.iter().map(|p| PortMatch::One(*p)).collect();
        }
        vec![PortMatch::Sets {
            v4: IpSet::ports(list, Family::V4, ports),
            v6: IpSet::ports(list, Family::V6, ports),
        }]
    }

    /// The destination matches for `nets` (all of `family`): one per network, or with
    /// `--match-sets` one set match once they are two different networks.
    fn destination_matches(&self, list: SetList, family: Family, nets: &[IpNet]) -> Vec<Match> {
        if self.options.match_sets {
            let set = IpSet::nets(list, family, nets);
            if set.len() > 1 {
                return vec![Match::InSet(set)];
            }
        }
        nets.iter().map(|n| dst(*n)).collect()
    }

    /// Appends one rule per port match, in both families.
    fn append_per_port(
        &mut self,
        table: Table,
        chain: Chain,
        ports: &[PortMatch],
        mut make: impl FnMut(Match) -> Rule,
    ) {
        for port in ports {
            self.b
                .append_versioned(table, chain, |family| make(port.dport(family)));
        }
    }

    fn run(&mut self) {
        self.exclude_interfaces();
        self.kube_virt_interfaces_bypass();
        if self.cfg.drop_invalid {
            self.b.append(
                Families::Both,
                Table::Mangle,
                PREROUTING,
                rule(
                    vec![Match::ConntrackState(CtState::Invalid)],
                    jump(IstioChain::Drop),
                ),
            );
            self.b.append(
                Families::Both,
                Table::Mangle,
                DROP,
                rule(vec![], Target::Drop),
            );
        }
        let cfg = self.cfg;
        self.b.append(
            Families::Both,
            Table::Nat,
            INBOUND,
            rule(
                vec![proto(Protocol::Tcp), dport(cfg.inbound_tunnel_port)],
                Target::Return,
            ),
        );
        self.b.append(
            Families::Both,
            Table::Nat,
            REDIRECT,
            rule(
                vec![proto(Protocol::Tcp)],
                Target::Redirect {
                    to_port: cfg.proxy_port,
                },
            ),
        );
        self.b.append(
            Families::Both,
            Table::Nat,
            IN_REDIRECT,
            rule(
                vec![proto(Protocol::Tcp)],
                Target::Redirect {
                    to_port: cfg.inbound_capture_port,
                },
            ),
        );
        self.inbound();
        self.b.append(
            Families::Both,
            Table::Nat,
            OUTPUT,
            rule(vec![], jump(IstioChain::Output)),
        );
        self.outbound_port_exclusions();
        self.b.append_versioned(Table::Nat, ISTIO_OUTPUT, |family| {
            rule(
                vec![
                    Match::OutInterface(lo()),
                    Match::Source(decisions::passthrough_source(family)),
                ],
                Target::Return,
            )
        });
        self.proxy_owner_rules();
        self.owner_groups();
        if decisions::dns_on(self.cfg) {
            self.dns_redirect();
            self.dns_conntrack_zones();
        }
        let loopback_v4 = decisions::loopback(self.cfg, Family::V4);
        self.b.append_versioned(Table::Nat, ISTIO_OUTPUT, |family| {
            let net = match family {
                Family::V4 => loopback_v4,
                Family::V6 => decisions::loopback(self.cfg, Family::V6),
            };
            rule(vec![dst(net)], Target::Return)
        });
        // Per family, as the rules of one family never see the other's networks.
        for family in Family::ALL {
            let nets: Vec<IpNet> = cfg
                .outbound_exclude
                .iter()
                .filter(|n| family_of(n) == family)
                .copied()
                .collect();
            for to in self.destination_matches(SetList::ExcludedNets, family, &nets) {
                self.b.append(
                    Families::only(family),
                    Table::Nat,
                    ISTIO_OUTPUT,
                    rule(vec![to], Target::Return),
                );
            }
        }
        let included =
            self.port_matches(SetList::IncludedOutboundPorts, &cfg.outbound_ports_include);
        self.append_per_port(Table::Nat, ISTIO_OUTPUT, &included, |port| {
            rule(vec![proto(Protocol::Tcp), port], jump(IstioChain::Redirect))
        });
        self.outbound_include(Family::V4);
        self.outbound_include(Family::V6);
        if decisions::tproxy(self.cfg) {
            self.tproxy_marks();
        }
    }

    fn exclude_interfaces(&mut self) {
        let cfg = self.cfg;
        let mut tables = vec![Table::Nat];
        if decisions::tproxy(self.cfg) {
            tables.push(Table::Mangle);
        }
        for table in tables {
            for iface in &cfg.exclude_interfaces {
                self.b.append(
                    Families::Both,
                    table,
                    PREROUTING,
                    rule(vec![Match::InInterface(iface.clone())], Target::Return),
                );
                self.b.append(
                    Families::Both,
                    table,
                    OUTPUT,
                    rule(vec![Match::OutInterface(iface.clone())], Target::Return),
                );
            }
        }
    }

    fn kube_virt_interfaces_bypass(&mut self) {
        for iface in &self.cfg.kube_virt_interfaces {
            self.b.insert(
                Families::Both,
                Table::Nat,
                PREROUTING,
                1,
                rule(vec![Match::InInterface(iface.clone())], Target::Return),
            );
        }
    }

    fn inbound(&mut self) {
        let cfg = self.cfg;
        if cfg.inbound == InboundCapture::Off {
            return;
        }
        let table = if decisions::tproxy(self.cfg) {
            self.b.append(
                Families::Both,
                Table::Mangle,
                DIVERT,
                rule(vec![], Target::SetMark(cfg.tproxy_mark)),
            );
            self.b.append(
                Families::Both,
                Table::Mangle,
                DIVERT,
                rule(vec![], Target::Accept),
            );
            let loopback_v4 = decisions::loopback(self.cfg, Family::V4);
            self.b.append_versioned(Table::Mangle, TPROXY, |family| {
                let net = match family {
                    Family::V4 => loopback_v4,
                    Family::V6 => decisions::loopback(self.cfg, Family::V6),
                };
                rule(
                    vec![not_dst(net), proto(Protocol::Tcp)],
                    Target::Tproxy {
                        mark: cfg.tproxy_mark,
                        on_port: cfg.inbound_capture_port,
                    },
                )
            });
            Table::Mangle
        } else {
            Table::Nat
        };
        self.b.append(
            Families::Both,
            table,
            PREROUTING,
            rule(vec![proto(Protocol::Tcp)], jump(IstioChain::Inbound)),
        );
        let established = || Match::ConntrackState(CtState::RelatedEstablished);
        match &cfg.inbound {
            InboundCapture::Off => {}
            InboundCapture::AllExcept(excluded) => {
                let excluded = self.port_matches(SetList::ExcludedInboundPorts, excluded);
                self.append_per_port(table, INBOUND, &excluded, |port| {
                    rule(vec![proto(Protocol::Tcp), port], Target::Return)
                });
                if decisions::tproxy(self.cfg) {
                    self.b.append(
                        Families::Both,
                        Table::Mangle,
                        INBOUND,
                        rule(
                            vec![proto(Protocol::Tcp), established()],
                            jump(IstioChain::Divert),
                        ),
                    );
                    self.b.append(
                        Families::Both,
                        Table::Mangle,
                        INBOUND,
                        rule(vec![proto(Protocol::Tcp)], jump(IstioChain::Tproxy)),
                    );
                } else {
                    self.b.append(
                        Families::Both,
                        Table::Nat,
                        INBOUND,
                        rule(vec![proto(Protocol::Tcp)], jump(IstioChain::InRedirect)),
                    );
                }
            }
            InboundCapture::Only(ports) => {
                // With TPROXY each port's established packets go to the divert chain before
                // its new connections go to TPROXY; over a set the pair stays in that order.
                for port in self.port_matches(SetList::IncludedInboundPorts, ports) {
                    let port = std::slice::from_ref(&port);
                    if decisions::tproxy(self.cfg) {
                        self.append_per_port(Table::Mangle, INBOUND, port, |port| {
                            rule(
                                vec![proto(Protocol::Tcp), port, established()],
                                jump(IstioChain::Divert),
                            )
                        });
                        self.append_per_port(Table::Mangle, INBOUND, port, |port| {
                            rule(vec![proto(Protocol::Tcp), port], jump(IstioChain::Tproxy))
                        });
                    } else {
                        self.append_per_port(Table::Nat, INBOUND, port, |port| {
                            rule(
                                vec![proto(Protocol::Tcp), port],
                                jump(IstioChain::InRedirect),
                            )
                        });
                    }
                }
            }
        }
    }

    /// Port exclusions come before the loopback handling, so an excluded port is never
    /// redirected, not even back to the pod itself.
    fn outbound_port_exclusions(&mut self) {
        let excluded = self.port_matches(
            SetList::ExcludedOutboundPorts,
            &self.cfg.outbound_ports_exclude,
        );
        for port in &excluded {
            for p in [Protocol::Tcp, Protocol::Udp] {
                self.append_per_port(
                    Table::Nat,
                    ISTIO_OUTPUT,
                    std::slice::from_ref(port),
                    |port| rule(vec![proto(p), port], Target::Return),
                );
            }
        }
    }

    /// For each proxy uid and gid: the proxy's own connections to the pod's address go back
    /// through inbound capture (app → VIP → Envoy → Envoy inbound → app), the app's own
    /// loopback traffic is left alone, and everything else the proxy sends goes direct.
    fn proxy_owner_rules(&mut self) {
        let cfg = self.cfg;
        let dns_on = decisions::dns_on(self.cfg);
        let loopback_included = match &cfg.outbound_include {
            OutboundInclude::Only(nets) => nets.iter().any(|n| n.addr().is_loopback()),
            OutboundInclude::Off | OutboundInclude::All => false,
        };
        let owners: Vec<(OwnerKind, Owner)> = decisions::proxy_owners(self.cfg)
            .map(|(k, o)| (k, o.clone()))
            .collect();
        let loopback_v4 = decisions::loopback(self.cfg, Family::V4);
        let tunnel = cfg.inbound_tunnel_port;
        for (kind, who) in &owners {
            // Istio skips DNS in this rule for uids only; gids keep the plain form.
            let skip_dns_here = dns_on && *kind == OwnerKind::Uid;
            self.b.append_versioned(Table::Nat, ISTIO_OUTPUT, |family| {
                let net = match family {
                    Family::V4 => loopback_v4,
                    Family::V6 => decisions::loopback(self.cfg, Family::V6),
                };
                let port_match = if skip_dns_here {
                    Match::DestinationPorts {
                        ports: vec![fixed_port(DNS_PORT), tunnel],
                        negated: true,
                    }
                } else {
                    not_dport(tunnel)
                };
                rule(
                    vec![
                        Match::OutInterface(lo()),
                        not_dst(net),
                        proto(Protocol::Tcp),
                        port_match,
                        owner(*kind, who, false),
                    ],
                    jump(IstioChain::InRedirect),
                )
            });
            if !loopback_included {
                // With DNS capture, TCP DNS to a resolver on localhost must still be caught
                // further down, so port 53 is not waved through here.
                let matches = if dns_on {
                    vec![
                        Match::OutInterface(lo()),
                        proto(Protocol::Tcp),
                        not_dport(fixed_port(DNS_PORT)),
                        owner(*kind, who, true),
                    ]
                } else {
                    vec![Match::OutInterface(lo()), owner(*kind, who, true)]
                };
                self.b.append(
                    Families::Both,
                    Table::Nat,
                    ISTIO_OUTPUT,
                    rule(matches, Target::Return),
                );
            }
            self.b.append(
                Families::Both,
                Table::Nat,
                ISTIO_OUTPUT,
                rule(vec![owner(*kind, who, false)], Target::Return),
            );
        }
    }

    fn owner_groups(&mut self) {
        match &self.cfg.owner_groups {
            OwnerGroups::AllExcept(groups) => {
                for group in groups {
                    self.b.append(
                        Families::Both,
                        Table::Nat,
                        ISTIO_OUTPUT,
                        rule(vec![owner(OwnerKind::Gid, group, false)], Target::Return),
                    );
                }
            }
            OwnerGroups::Only(groups) => {
                let none_of = groups
                    .iter()
                    .map(|g| owner(OwnerKind::Gid, g, true))
                    .collect();
                self.b.append(
                    Families::Both,
                    Table::Nat,
                    ISTIO_OUTPUT,
                    rule(none_of, Target::Return),
                );
            }
        }
    }

    fn dns_redirect(&mut self) {
        let DnsServers { all, v4, v6 } = decisions::dns_servers(self.cfg);
        let dns = fixed_port(DNS_PORT);
        let proxy = Target::Redirect {
            to_port: fixed_port(DNS_PROXY_PORT),
        };
        self.b.append(
            Families::Both,
            Table::Raw,
            OUTPUT,
            rule(vec![], jump(IstioChain::OutputDns)),
        );
        // Only a family with servers to capture (or capture-all) jumps to the DNS chain.
        for (servers, families) in [(&v4, Families::V4), (&v6, Families::V6)] {
            if all || !servers.is_empty() {
                self.b.append(
                    families,
                    Table::Nat,
                    ISTIO_OUTPUT,
                    rule(vec![], jump(IstioChain::OutputDns)),
                );
            }
        }
        for p in [Protocol::Tcp, Protocol::Udp] {
            if all {
                self.b.append(
                    Families::Both,
                    Table::Nat,
                    OUTPUT_DNS,
                    rule(vec![proto(p), dport(dns)], proxy.clone()),
                );
                continue;
            }
            for server in v4.iter().chain(v6.iter()) {
                self.b.append(
                    families_of(server),
                    Table::Nat,
                    OUTPUT_DNS,
                    rule(vec![proto(p), dport(dns), dst(*server)], proxy.clone()),
                );
            }
        }
    }

    fn dns_conntrack_zones(&mut self) {
        let DnsServers { all, v4, v6 } = decisions::dns_servers(self.cfg);
        let dns = fixed_port(DNS_PORT);
        let owners: Vec<(OwnerKind, Owner)> = decisions::proxy_owners(self.cfg)
            .map(|(k, o)| (k, o.clone()))
            .collect();
        for (kind, who) in &owners {
            self.b.append(
                Families::Both,
                Table::Raw,
                OUTPUT_DNS,
                rule(
                    vec![proto(Protocol::Udp), dport(dns), owner(*kind, who, false)],
                    Target::CtZone(CT_ZONE_UPSTREAM),
                ),
            );
            self.b.append(
                Families::Both,
                Table::Raw,
                OUTPUT_DNS,
                rule(
                    vec![
                        proto(Protocol::Udp),
                        Match::SourcePort(fixed_port(DNS_PROXY_PORT)),
                        owner(*kind, who, false),
                    ],
                    Target::CtZone(CT_ZONE_CLIENT),
                ),
            );
        }
        if all {
            self.b.append(
                Families::Both,
                Table::Raw,
                PREROUTING,
                rule(vec![], jump(IstioChain::Inbound)),
            );
            self.b.append(
                Families::Both,
                Table::Raw,
                OUTPUT_DNS,
                rule(
                    vec![proto(Protocol::Udp), dport(dns)],
                    Target::CtZone(CT_ZONE_CLIENT),
                ),
            );
            self.b.append(
                Families::Both,
                Table::Raw,
                INBOUND,
                rule(
                    vec![proto(Protocol::Udp), Match::SourcePort(dns)],
                    Target::CtZone(CT_ZONE_UPSTREAM),
                ),
            );
            return;
        }
        for (servers, families) in [(&v4, Families::V4), (&v6, Families::V6)] {
            if !servers.is_empty() {
                self.b.append(
                    families,
                    Table::Raw,
                    PREROUTING,
                    rule(vec![], jump(IstioChain::Inbound)),
                );
            }
            for server in servers.iter() {
                self.b.append(
                    families,
                    Table::Raw,
                    OUTPUT_DNS,
                    rule(
                        vec![proto(Protocol::Udp), dport(dns), dst(*server)],
                        Target::CtZone(CT_ZONE_CLIENT),
                    ),
                );
                self.b.append(
                    families,
                    Table::Raw,
                    INBOUND,
                    rule(
                        vec![
                            proto(Protocol::Udp),
                            Match::SourcePort(dns),
                            Match::Source(*server),
                        ],
                        Target::CtZone(CT_ZONE_UPSTREAM),
                    ),
                );
            }
        }
    }

    fn outbound_include(&mut self, family: Family) {
        let cfg = self.cfg;
        let families = Families::only(family);
        match &cfg.outbound_include {
            OutboundInclude::Off => {}
            OutboundInclude::All => {
                self.b.append(
                    families,
                    Table::Nat,
                    ISTIO_OUTPUT,
                    rule(vec![], jump(IstioChain::Redirect)),
                );
                for iface in &cfg.kube_virt_interfaces {
                    self.b.insert(
                        families,
                        Table::Nat,
                        PREROUTING,
                        1,
                        rule(
                            vec![Match::InInterface(iface.clone())],
                            jump(IstioChain::Redirect),
                        ),
                    );
                }
            }
            OutboundInclude::Only(nets) => {
                let nets: Vec<IpNet> = nets
                    .iter()
                    .filter(|n| family_of(n) == family)
                    .copied()
                    .collect();
                for to in self.destination_matches(SetList::IncludedNets, family, &nets) {
                    for iface in &cfg.kube_virt_interfaces {
                        self.b.insert(
                            families,
                            Table::Nat,
                            PREROUTING,
                            1,
                            rule(
                                vec![Match::InInterface(iface.clone()), to.clone()],
                                jump(IstioChain::Redirect),
                            ),
                        );
                    }
                    self.b.append(
                        families,
                        Table::Nat,
                        ISTIO_OUTPUT,
                        rule(vec![to], jump(IstioChain::Redirect)),
                    );
                }
            }
        }
    }

    /// TPROXY bookkeeping: remember marks across a connection, let the sidecar's own
    /// connections back to the app through, and stop re-capturing marked packets.
    fn tproxy_marks(&mut self) {
        let cfg = self.cfg;
        let mark = cfg.tproxy_mark;
        self.b.append(
            Families::Both,
            Table::Mangle,
            PREROUTING,
            rule(
                vec![
                    proto(Protocol::Tcp),
                    Match::Mark {
                        mark,
                        negated: false,
                    },
                ],
                Target::ConnMarkSave,
            ),
        );
        self.b.append(
            Families::Both,
            Table::Mangle,
            OUTPUT,
            rule(
                vec![
                    proto(Protocol::Tcp),
                    Match::OutInterface(lo()),
                    Match::Mark {
                        mark,
                        negated: false,
                    },
                ],
                Target::Return,
            ),
        );
        let owners: Vec<(OwnerKind, Owner)> = decisions::proxy_owners(self.cfg)
            .map(|(k, o)| (k, o.clone()))
            .collect();
        let loopback_v4 = decisions::loopback(self.cfg, Family::V4);
        for (kind, who) in &owners {
            self.b.append_versioned(Table::Mangle, OUTPUT, |family| {
                let net = match family {
                    Family::V4 => loopback_v4,
                    Family::V6 => decisions::loopback(self.cfg, Family::V6),
                };
                rule(
                    vec![
                        not_dst(net),
                        proto(Protocol::Tcp),
                        Match::OutInterface(lo()),
                        owner(*kind, who, false),
                    ],
                    Target::SetMark(OUTBOUND_MARK),
                )
            });
        }
        self.b.append(
            Families::Both,
            Table::Mangle,
            OUTPUT,
            rule(
                vec![proto(Protocol::Tcp), Match::ConnMark(mark)],
                Target::ConnMarkRestore,
            ),
        );
        self.b.insert(
            Families::Both,
            Table::Mangle,
            INBOUND,
            1,
            rule(
                vec![
                    proto(Protocol::Tcp),
                    Match::Mark {
                        mark,
                        negated: false,
                    },
                ],
                Target::Return,
            ),
        );
        for family in Family::ALL {
            let families = Families::only(family);
            self.b.insert(
                families,
                Table::Mangle,
                INBOUND,
                2,
                rule(
                    vec![
                        proto(Protocol::Tcp),
                        Match::Source(decisions::passthrough_source(family)),
                        Match::InInterface(lo()),
                    ],
                    Target::Return,
                ),
            );
        }
        self.b.insert(
            Families::Both,
            Table::Mangle,
            INBOUND,
            3,
            rule(
                vec![
                    proto(Protocol::Tcp),
                    Match::InInterface(lo()),
                    Match::Mark {
                        mark: OUTBOUND_MARK,
                        negated: true,
                    },
                ],
                Target::Return,
            ),
        );
    }
}

fn family_of(net: &IpNet) -> Family {
    match net {
        IpNet::V4(_) => Family::V4,
        IpNet::V6(_) => Family::V6,
    }
}

fn families_of(net: &IpNet) -> Families {
    Families::only(family_of(net))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{DnsCapture, InterceptionMode, OutboundInclude, OwnerGroups};
    use crate::rules::iptables::rule_spec;
    use crate::rules::model::{ChainRules, FamilyRuleset, Interface, TproxyRouting};

    pub(crate) fn port(p: u16) -> PortRange {
        crate::values::Port::new(p).unwrap().into()
    }

    pub(crate) fn range(a: u16, b: u16) -> PortRange {
        use crate::values::Port;
        PortRange::new(Port::new(a).unwrap(), Port::new(b).unwrap()).unwrap()
    }

    /// Istio's base test configuration: proxy 1337, nothing captured.
    pub(crate) fn base() -> CaptureConfig {
        CaptureConfig {
            proxy_port: crate::values::Port::new(15001).unwrap(),
            inbound_capture_port: crate::values::Port::new(15006).unwrap(),
            inbound_tunnel_port: crate::values::Port::new(15008).unwrap(),
            proxy_uids: vec![Owner::Id(1337)],
            proxy_gids: vec![Owner::Id(1337)],
            interception: InterceptionMode::Redirect,
            tproxy_mark: 1337,
            tproxy_route_table: 133,
            inbound: InboundCapture::Off,
            outbound_include: OutboundInclude::Off,
            outbound_exclude: vec![],
            outbound_ports_include: vec![],
            outbound_ports_exclude: vec![],
            kube_virt_interfaces: vec![],
            exclude_interfaces: vec![],
            dns: DnsCapture::Off,
            drop_invalid: false,
            ipv6: false,
            owner_groups: OwnerGroups::AllExcept(vec![]),
            host_ipv4_loopback: "127.0.0.1/32".parse().unwrap(),
        }
    }

    /// TPROXY with every inbound port captured: touches mangle as well as nat.
    pub(crate) fn tproxy_config() -> CaptureConfig {
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::AllExcept(vec![]);
        cfg
    }

    fn chain(rules: &FamilyRuleset, table: Table, chain: Chain) -> &ChainRules {
        rules
            .table(table)
            .and_then(|t| t.chain(chain))
            .expect("chain planned")
    }

    fn specs(chain: &ChainRules) -> Vec<String> {
        chain.all_rules().map(rule_spec).collect()
    }

    #[test]
    fn ipv6_off_plans_no_ipv6_at_all() {
        let plan = plan(&base());
        assert!(plan.v6.is_none());
        assert!(!plan.ipv6_passthrough_address);
        assert!(plan.tproxy_routing.is_none());
    }

    #[test]
    fn tproxy_routing_only_with_inbound_capture() {
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        assert!(
            plan(&cfg).tproxy_routing.is_none(),
            "no inbound ports, no routing"
        );
        cfg.inbound = InboundCapture::AllExcept(vec![]);
        assert_eq!(
            plan(&cfg).tproxy_routing,
            Some(TproxyRouting {
                mark: 1337,
                table: 133
            })
        );
    }

    #[test]
    fn excluded_outbound_ports_come_first_for_tcp_and_udp() {
        let mut cfg = base();
        cfg.outbound_ports_exclude = vec![port(8200)];
        cfg.outbound_include = OutboundInclude::All;
        let plan = plan(&cfg);
        let output = specs(chain(&plan.v4, Table::Nat, ISTIO_OUTPUT));
        assert_eq!(
            output[..2],
            [
                "-p tcp --dport 8200 -j RETURN",
                "-p udp --dport 8200 -j RETURN"
            ]
        );
        assert_eq!(output.last().map(String::as_str), Some("-j ISTIO_REDIRECT"));
    }

    #[test]
    fn a_port_range_is_one_rule_in_every_list() {
        let mut cfg = base();
        cfg.outbound_ports_exclude = vec![range(8200, 8300), port(9000)];
        cfg.outbound_ports_include = vec![range(3000, 3001)];
        cfg.inbound = InboundCapture::AllExcept(vec![range(15020, 15021)]);
        cfg.outbound_include = OutboundInclude::All;
        let planned = plan(&cfg);
        let output = specs(chain(&planned.v4, Table::Nat, ISTIO_OUTPUT));
        assert_eq!(
            output[..4],
            [
                "-p tcp --dport 8200:8300 -j RETURN",
                "-p udp --dport 8200:8300 -j RETURN",
                "-p tcp --dport 9000 -j RETURN",
                "-p udp --dport 9000 -j RETURN",
            ]
        );
        assert!(output.contains(&"-p tcp --dport 3000:3001 -j ISTIO_REDIRECT".to_owned()));
        let inbound = specs(chain(&planned.v4, Table::Nat, INBOUND));
        assert!(inbound.contains(&"-p tcp --dport 15020:15021 -j RETURN".to_owned()));

        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::Only(vec![range(8080, 8081)]);
        let planned = plan(&cfg);
        let inbound = specs(chain(&planned.v4, Table::Mangle, INBOUND));
        assert!(inbound.contains(
            &"-p tcp --dport 8080:8081 -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT"
                .to_owned()
        ), "{inbound:?}");
        assert!(inbound.contains(&"-p tcp --dport 8080:8081 -j ISTIO_TPROXY".to_owned()));
    }

    #[test]
    fn match_sets_hold_ranges_merged() {
        let mut cfg = base();
        cfg.outbound_ports_exclude =
            vec![range(8200, 8300), port(8301), range(8250, 8260), port(80)];
        let planned = plan_with(&cfg, sets());
        let set = set_named(&planned.v4, "excl-oports4");
        assert_eq!(
            set.members(),
            &crate::rules::ipset::SetMembers::Ports(vec![port(80), range(8200, 8301)])
        );
        assert_eq!(set.port_range(), Some((80, 8301)));
        assert!(set.contains("192.0.2.1".parse().unwrap(), 8301));
        assert!(!set.contains("192.0.2.1".parse().unwrap(), 8302));
        // One range alone is a plain match, as one port is.
        cfg.outbound_ports_exclude = vec![range(8200, 8300)];
        assert_eq!(plan_with(&cfg, sets()), plan(&cfg));
    }

    #[test]
    fn cidrs_go_to_their_own_family() {
        let mut cfg = base();
        cfg.ipv6 = true;
        cfg.outbound_include = OutboundInclude::Only(vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ]);
        let plan = plan(&cfg);
        let v4 = specs(chain(&plan.v4, Table::Nat, ISTIO_OUTPUT));
        let v6 = specs(chain(plan.v6.as_ref().unwrap(), Table::Nat, ISTIO_OUTPUT));
        assert!(v4.contains(&"-d 10.0.0.0/8 -j ISTIO_REDIRECT".to_owned()));
        assert!(!v4.iter().any(|r| r.contains("2001:db8")));
        assert!(v6.contains(&"-d 2001:db8::/32 -j ISTIO_REDIRECT".to_owned()));
    }

    #[test]
    fn kube_virt_rules_go_in_front_of_other_tools_rules() {
        let mut cfg = base();
        cfg.kube_virt_interfaces = vec![Interface::new_unchecked("eth1".into())];
        cfg.outbound_include = OutboundInclude::All;
        let plan = plan(&cfg);
        let prerouting = chain(&plan.v4, Table::Nat, PREROUTING);
        assert_eq!(prerouting.head.len(), 2);
        assert!(prerouting.rules.is_empty());
        assert_eq!(rule_spec(&prerouting.head[0]), "-i eth1 -j ISTIO_REDIRECT");
        assert_eq!(
            rule_spec(&prerouting.head[1]),
            "-i eth1 -m comment --comment meshinit -j RETURN"
        );
    }

    #[test]
    fn only_unowned_targets_in_builtin_chains_are_tagged() {
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::AllExcept(vec![]);
        let plan = plan(&cfg);
        for table in &plan.v4.tables {
            for c in &table.chains {
                for rule in c.all_rules() {
                    let tagged = rule.matches.contains(&Match::OwnerComment);
                    let builtin = matches!(c.chain, Chain::Builtin(_));
                    assert_eq!(
                        tagged,
                        builtin && !rule.jumps_to_own_chain(),
                        "{}",
                        rule_spec(rule)
                    );
                }
            }
        }
    }

    #[test]
    fn owner_group_include_list_is_one_rule() {
        let mut cfg = base();
        cfg.owner_groups = OwnerGroups::Only(vec![Owner::Name("java".into()), Owner::Id(202)]);
        let plan = plan(&cfg);
        let output = specs(chain(&plan.v4, Table::Nat, ISTIO_OUTPUT));
        assert!(output.contains(
            &"-m owner ! --gid-owner java -m owner ! --gid-owner 202 -j RETURN".to_owned()
        ));
    }

    fn sets() -> PlanOptions {
        PlanOptions { match_sets: true }
    }

    /// The set a rule spec names, by its name's list token.
    fn set_named(rules: &FamilyRuleset, token: &str) -> Arc<IpSet> {
        rules
            .sets()
            .into_iter()
            .find(|s| s.name().contains(token))
            .unwrap_or_else(|| panic!("no {token} set"))
    }

    /// Dual-stack, with lists for `--match-sets`: three excluded inbound ports, two IPv4
    /// networks (one given twice) and one IPv6 network excluded, two outbound ports (one
    /// given twice) excluded, and one outbound port included. Shared by both planners.
    pub(crate) fn lists_config() -> CaptureConfig {
        let mut cfg = base();
        cfg.ipv6 = true;
        cfg.inbound = InboundCapture::AllExcept(vec![port(15090), port(15021), port(15020)]);
        cfg.outbound_include = OutboundInclude::All;
        cfg.outbound_exclude = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.0/24", "10.0.0.0/8"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        cfg.outbound_ports_exclude = vec![port(8200), port(8300), port(8200)];
        cfg.outbound_ports_include = vec![port(443)];
        cfg
    }

    #[test]
    fn match_sets_make_one_rule_per_list_and_family() {
        let cfg = lists_config();
        let planned = plan_with(&cfg, sets());
        let v4 = &planned.v4;
        let nets = set_named(v4, "excl-nets4");
        let oports = set_named(v4, "excl-oports4");
        let iports = set_named(v4, "excl-iports4");
        assert_eq!(nets.len(), 2);
        assert_eq!(oports.len(), 2);
        assert_eq!(iports.len(), 3);
        let output = specs(chain(v4, Table::Nat, ISTIO_OUTPUT));
        for line in [
            format!("-p tcp -m set --match-set {} dst -j RETURN", oports.name()),
            format!("-p udp -m set --match-set {} dst -j RETURN", oports.name()),
            format!("-m set --match-set {} dst -j RETURN", nets.name()),
            // One port: a plain match, as without sets.
            "-p tcp --dport 443 -j ISTIO_REDIRECT".to_string(),
        ] {
            assert!(output.contains(&line), "missing {line:?} in {output:#?}");
        }
        assert_eq!(
            specs(chain(v4, Table::Nat, INBOUND)),
            [
                "-p tcp --dport 15008 -j RETURN".to_string(),
                format!("-p tcp -m set --match-set {} dst -j RETURN", iports.name()),
                "-p tcp -j ISTIO_IN_REDIRECT".to_string(),
            ]
        );
        // IPv6 has its own port sets, and its one network stays a plain match.
        let v6 = planned.v6.as_ref().unwrap();
        assert_ne!(set_named(v6, "excl-oports6").name(), oports.name());
        assert!(specs(chain(v6, Table::Nat, ISTIO_OUTPUT))
            .contains(&"-d 2001:db8::/32 -j RETURN".to_string()));
        // The same rules in the same places otherwise.
        let chains = plan(&cfg);
        assert_eq!(
            chains.v4.rule_count() - v4.rule_count(),
            (2 * 3 - 2) + (3 - 1) + (3 - 1),
            "ports x2 protocols, v4 networks, inbound ports"
        );
    }

    #[test]
    fn match_sets_change_nothing_without_lists() {
        for cfg in [base(), {
            let mut cfg = tproxy_config();
            cfg.inbound = InboundCapture::Only(vec![port(8080), port(8080)]);
            cfg.outbound_exclude = vec!["10.0.0.0/8".parse().unwrap()];
            cfg
        }] {
            assert_eq!(plan_with(&cfg, sets()), plan(&cfg));
        }
    }

    #[test]
    fn match_sets_keep_tproxy_established_before_new() {
        let mut cfg = tproxy_config();
        cfg.inbound = InboundCapture::Only(vec![port(8080), port(8443)]);
        let planned = plan_with(&cfg, sets());
        let set = set_named(&planned.v4, "incl-iports4");
        let inbound = specs(chain(&planned.v4, Table::Mangle, INBOUND));
        assert_eq!(
            inbound[inbound.len() - 2..],
            [
                format!(
                    "-p tcp -m set --match-set {} dst -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
                    set.name()
                ),
                format!("-p tcp -m set --match-set {} dst -j ISTIO_TPROXY", set.name()),
            ]
        );
    }

    #[test]
    fn match_sets_with_kube_virt_interfaces() {
        let mut cfg = base();
        cfg.kube_virt_interfaces = vec![Interface::new_unchecked("eth1".into())];
        cfg.outbound_include = OutboundInclude::Only(vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
        ]);
        let planned = plan_with(&cfg, sets());
        let set = set_named(&planned.v4, "incl-nets4");
        assert_eq!(
            specs(chain(&planned.v4, Table::Nat, PREROUTING)),
            [
                format!(
                    "-i eth1 -m set --match-set {} dst -j ISTIO_REDIRECT",
                    set.name()
                ),
                "-i eth1 -m comment --comment meshinit -j RETURN".to_string(),
            ]
        );
        assert_eq!(
            specs(chain(&planned.v4, Table::Nat, ISTIO_OUTPUT)).last(),
            Some(&format!(
                "-m set --match-set {} dst -j ISTIO_REDIRECT",
                set.name()
            ))
        );
    }
}
