//! `CaptureConfig` → `NftRuleset`: the ruleset Istio's native nftables backend
//! (`tools/istio-nftables/pkg/capture/run.go`) would install.
//!
//! Pure: no I/O, no text. The steps follow `NftablesConfigurator.Run` in order, with the
//! same appends and indexed inserts per table, so the two can be read side by side; the
//! transaction shape (which tables and chains are declared, inserts into an empty chain
//! becoming appends) follows its `addIstioTableRules`. `tests/integration/nft_golden.rs`
//! loads the result and Istio's goldens into the kernel and compares what it holds.

use std::collections::HashMap;

use ipnet::IpNet;

use super::model::{
    Chain, Direction, Match, NftRuleset, Position, Rule, RuleOp, Statement, Table, TableRules,
};
use crate::config::{CaptureConfig, InboundCapture, OutboundInclude, OwnerGroups};
use crate::rules::decisions::{
    self, fixed_port, lo, DnsServers, CT_ZONE_CLIENT, CT_ZONE_UPSTREAM, DNS_PORT, DNS_PROXY_PORT,
    OUTBOUND_MARK,
};
use crate::rules::model::{CtState, Family, Owner, OwnerKind, Port, PortRange, Protocol};
pub use crate::rules::PlanOptions;
use crate::values::merge_port_ranges;

/// Plans the nftables ruleset for `cfg`: Istio's, one rule per list entry.
pub fn plan(cfg: &CaptureConfig) -> NftRuleset {
    plan_with(cfg, PlanOptions::default())
}

/// Plans the nftables ruleset for `cfg`, shaped by `options`.
pub fn plan_with(cfg: &CaptureConfig, options: PlanOptions) -> NftRuleset {
    let mut planner = Planner {
        cfg,
        options,
        b: Builder::default(),
    };
    planner.run();
    let tproxy_routing = decisions::tproxy_routing(cfg);
    NftRuleset {
        tables: planner.b.finish(),
        ipv6: cfg.ipv6,
        tproxy_routing,
        ipv6_passthrough_address: cfg.ipv6,
    }
}

/// Istio's `NftablesRuleBuilder`: rule operations per table, in call order.
#[derive(Debug, Default)]
struct Builder {
    ops: HashMap<Table, Vec<RuleOp>>,
}

impl Builder {
    fn push(&mut self, table: Table, chain: Chain, position: Position, rule: Rule) {
        self.ops.entry(table).or_default().push(RuleOp {
            chain,
            position,
            rule,
        });
    }

    fn append(&mut self, table: Table, chain: Chain, rule: Rule) {
        self.push(table, chain, Position::Append, rule);
    }

    /// `InsertRule(chain, table, index, ...)`; see `finish` for how an insert becomes an
    /// append.
    fn insert(&mut self, table: Table, chain: Chain, index: usize, rule: Rule) {
        self.push(table, chain, Position::Insert { index }, rule);
    }

    /// Istio's `addIstioTableRules`, per table: tables without rules are left out; the
    /// chains declared are those of the table's fixed list that hold rules; an insert into a
    /// chain with fewer rules than its index (nftables refuses those) becomes an append.
    ///
    /// One addition: a chain that a rule jumps to is declared even if it holds no rules.
    /// Istio would emit a jump to an undeclared chain there (only possible with IPv6 DNS
    /// servers and IPv6 off), which nft refuses; an empty chain does what was meant.
    fn finish(mut self) -> Vec<TableRules> {
        let mut tables = Vec::new();
        for table in Table::ALL {
            let Some(mut ops) = self.ops.remove(&table) else {
                continue;
            };
            let mut count: HashMap<Chain, usize> = HashMap::new();
            for op in &mut ops {
                let n = count.entry(op.chain).or_default();
                if let Position::Insert { index } = op.position {
                    if *n == 0 || index >= *n {
                        op.position = Position::Append;
                    }
                }
                *n += 1;
            }
            let chains = table
                .chain_order()
                .iter()
                .copied()
                .filter(|chain| {
                    count.contains_key(chain)
                        || ops.iter().any(|op| op.rule.jump_target() == Some(*chain))
                })
                .collect();
            tables.push(TableRules { table, chains, ops });
        }
        tables
    }
}

struct Planner<'a> {
    cfg: &'a CaptureConfig,
    options: PlanOptions,
    b: Builder,
}

fn rule(matches: Vec<Match>, statements: Vec<Statement>) -> Rule {
    Rule::new(matches, statements)
}

/// `counter` then `statement`: how almost every Istio rule ends.
fn counted(statement: Statement) -> Vec<Statement> {
    vec![Statement::Counter, statement]
}

fn jump(chain: Chain) -> Vec<Statement> {
    counted(Statement::Jump(chain))
}

fn ret() -> Vec<Statement> {
    counted(Statement::Return)
}

fn tcp() -> Match {
    Match::L4Proto(Protocol::Tcp)
}

fn port_match(
    protocol: Protocol,
    direction: Direction,
    ports: Vec<PortRange>,
    negated: bool,
) -> Match {
    Match::Port {
        protocol,
        direction,
        ports,
        negated,
    }
}

/// `tcp dport PORT`, or `tcp dport { PORTS }` for several.
fn tcp_dports(ports: Vec<PortRange>) -> Match {
    port_match(Protocol::Tcp, Direction::Destination, ports, false)
}

fn dport(protocol: Protocol, port: Port) -> Match {
    port_match(protocol, Direction::Destination, vec![port.into()], false)
}

fn sport(protocol: Protocol, port: Port) -> Match {
    port_match(protocol, Direction::Source, vec![port.into()], false)
}

fn not_dport(ports: Vec<Port>) -> Match {
    let ports = ports.into_iter().map(PortRange::from).collect();
    port_match(Protocol::Tcp, Direction::Destination, ports, true)
}

fn daddr(net: IpNet) -> Match {
    Match::Address {
        direction: Direction::Destination,
        net,
        negated: false,
    }
}

fn not_daddr(net: IpNet) -> Match {
    Match::Address {
        direction: Direction::Destination,
        net,
        negated: true,
    }
}

fn saddr(net: IpNet) -> Match {
    Match::Address {
        direction: Direction::Source,
        net,
        negated: false,
    }
}

fn owner(kind: OwnerKind, who: &Owner, negated: bool) -> Match {
    Match::Owner {
        kind,
        owner: who.clone(),
        negated,
    }
}

fn mark(mark: u32, negated: bool) -> Match {
    Match::Mark { mark, negated }
}

fn oif_lo() -> Match {
    Match::OutInterface(lo())
}

fn iif_lo() -> Match {
    Match::InInterface(lo())
}

fn is_v4(net: &IpNet) -> bool {
    matches!(net, IpNet::V4(_))
}

impl Planner<'_> {
    /// The port lists to write one rule for each: one list per port or range (Istio's, for
    /// lists without ranges), or with `--match-sets` a single list of them all, duplicates
    /// dropped (a set once it has two). A list with a range becomes an interval set, whose
    /// elements may not overlap: its ranges are merged (sorted, overlapping and adjacent
    /// ones joined).
    fn port_groups(&self, ports: &[PortRange]) -> Vec<Vec<PortRange>> {
        if !self.options.match_sets || ports.is_empty() {
            return ports.iter().map(|p| vec![*p]).collect();
        }
        if ports.iter().any(|p| p.single().is_none()) {
            return vec![merge_port_ranges(ports)];
        }
        let mut seen = std::collections::HashSet::new();
        vec![ports.iter().copied().filter(|p| seen.insert(*p)).collect()]
    }

    /// Destination matches for `nets` (one family), one rule each: one per network
    /// (Istio's), or with `--match-sets` one interval set of them all once there are two.
    fn destination_matches<'n>(&self, nets: impl Iterator<Item = &'n IpNet>) -> Vec<Match> {
        let nets: Vec<IpNet> = nets.copied().collect();
        if self.options.match_sets && nets.len() > 1 {
            let mut seen = std::collections::HashSet::new();
            let nets = nets
                .into_iter()
                .filter(|n| seen.insert(*n))
                .collect::<Vec<_>>();
            if nets.len() > 1 {
                return vec![Match::AddressSet {
                    direction: Direction::Destination,
                    nets,
                }];
            }
            return nets.into_iter().map(daddr).collect();
        }
        nets.into_iter().map(daddr).collect()
    }

    /// Istio's `AppendV6RuleIfSupported`.
    fn append_v6(&mut self, table: Table, chain: Chain, rule: Rule) {
        if self.cfg.ipv6 {
            self.b.append(table, chain, rule);
        }
    }

    fn insert_v6(&mut self, table: Table, chain: Chain, index: usize, rule: Rule) {
        if self.cfg.ipv6 {
            self.b.insert(table, chain, index, rule);
        }
    }

    /// `NftablesConfigurator.Run`, step by step.
    fn run(&mut self) {
        let cfg = self.cfg;
        self.short_circuit_exclude_interfaces();
        self.short_circuit_kube_internal_interfaces();
        if cfg.drop_invalid {
            self.b.append(
                Table::Mangle,
                Chain::Prerouting,
                rule(
                    vec![tcp(), Match::ConntrackState(CtState::Invalid)],
                    jump(Chain::Drop),
                ),
            );
            self.b.append(
                Table::Mangle,
                Chain::Drop,
                rule(vec![], counted(Statement::Drop)),
            );
        }
        self.b.append(
            Table::Nat,
            Chain::Inbound,
            rule(
                vec![tcp(), dport(Protocol::Tcp, cfg.inbound_tunnel_port)],
                ret(),
            ),
        );
        self.b.append(
            Table::Nat,
            Chain::Redirect,
            rule(
                vec![tcp()],
                counted(Statement::Redirect {
                    port: cfg.proxy_port,
                }),
            ),
        );
        self.b.append(
            Table::Nat,
            Chain::InRedirect,
            rule(
                vec![tcp()],
                counted(Statement::Redirect {
                    port: cfg.inbound_capture_port,
                }),
            ),
        );
        self.inbound_ports_include();
        self.b.append(
            Table::Nat,
            Chain::Output,
            rule(vec![], jump(Chain::IstioOutput)),
        );
        for ports in self.port_groups(&cfg.outbound_ports_exclude) {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                self.b.append(
                    Table::Nat,
                    Chain::IstioOutput,
                    rule(
                        vec![port_match(
                            protocol,
                            Direction::Destination,
                            ports.clone(),
                            false,
                        )],
                        ret(),
                    ),
                );
            }
        }
        // 127.0.0.6 and ::6: the inbound passthrough cluster's source addresses.
        self.b.append(
            Table::Nat,
            Chain::IstioOutput,
            rule(
                vec![oif_lo(), saddr(decisions::passthrough_source(Family::V4))],
                ret(),
            ),
        );
        self.append_v6(
            Table::Nat,
            Chain::IstioOutput,
            rule(
                vec![oif_lo(), saddr(decisions::passthrough_source(Family::V6))],
                ret(),
            ),
        );
        self.proxy_owner_rules(OwnerKind::Uid);
        self.proxy_owner_rules(OwnerKind::Gid);
        self.capture_by_owner_group();
        if decisions::dns_on(self.cfg) {
            self.dns_redirect();
            self.dns_conntrack_zones();
        }
        // Envoy-aware apps and container-to-container traffic use localhost: left alone.
        let loopback_v4 = decisions::loopback(self.cfg, Family::V4);
        self.b.append(
            Table::Nat,
            Chain::IstioOutput,
            rule(vec![daddr(loopback_v4)], ret()),
        );
        self.append_v6(
            Table::Nat,
            Chain::IstioOutput,
            rule(
                vec![daddr(decisions::loopback(self.cfg, Family::V6))],
                ret(),
            ),
        );
        // Exclusions before inclusions; all IPv4 ranges first, then IPv6 (Istio's
        // `SeparateV4V6`).
        for m in self.destination_matches(cfg.outbound_exclude.iter().filter(|n| is_v4(n))) {
            self.b
                .append(Table::Nat, Chain::IstioOutput, rule(vec![m], ret()));
        }
        for m in self.destination_matches(cfg.outbound_exclude.iter().filter(|n| !is_v4(n))) {
            self.append_v6(Table::Nat, Chain::IstioOutput, rule(vec![m], ret()));
        }
        for ports in self.port_groups(&cfg.outbound_ports_include) {
            self.b.append(
                Table::Nat,
                Chain::IstioOutput,
                rule(
                    vec![port_match(
                        Protocol::Tcp,
                        Direction::Destination,
                        ports,
                        false,
                    )],
                    jump(Chain::Redirect),
                ),
            );
        }
        self.outbound_include();
        if decisions::tproxy(self.cfg) {
            self.tproxy_marks();
        }
    }

    fn short_circuit_exclude_interfaces(&mut self) {
        let cfg = self.cfg;
        let mut tables = vec![Table::Nat];
        if decisions::tproxy(self.cfg) {
            tables.push(Table::Mangle);
        }
        for table in tables {
            for iface in &cfg.exclude_interfaces {
                self.b.append(
                    table,
                    Chain::Prerouting,
                    rule(vec![Match::InInterface(iface.clone())], ret()),
                );
                self.b.append(
                    table,
                    Chain::Output,
                    rule(vec![Match::OutInterface(iface.clone())], ret()),
                );
            }
        }
    }

    fn short_circuit_kube_internal_interfaces(&mut self) {
        for iface in &self.cfg.kube_virt_interfaces {
            self.b.insert(
                Table::Nat,
                Chain::Prerouting,
                0,
                rule(vec![Match::InInterface(iface.clone())], ret()),
            );
        }
    }

    fn inbound_ports_include(&mut self) {
        if self.cfg.inbound == InboundCapture::Off {
            return;
        }
        if decisions::tproxy(self.cfg) {
            self.inbound_tproxy();
            return;
        }
        self.b.append(
            Table::Nat,
            Chain::Prerouting,
            rule(vec![tcp()], jump(Chain::Inbound)),
        );
        match &self.cfg.inbound {
            InboundCapture::Off => {}
            InboundCapture::AllExcept(excluded) => {
                for ports in self.port_groups(excluded) {
                    self.b.append(
                        Table::Nat,
                        Chain::Inbound,
                        rule(vec![tcp(), tcp_dports(ports)], ret()),
                    );
                }
                self.b.append(
                    Table::Nat,
                    Chain::Inbound,
                    rule(vec![tcp()], jump(Chain::InRedirect)),
                );
            }
            InboundCapture::Only(ports) => {
                for ports in self.port_groups(ports) {
                    self.b.append(
                        Table::Nat,
                        Chain::Inbound,
                        rule(vec![tcp(), tcp_dports(ports)], jump(Chain::InRedirect)),
                    );
                }
            }
        }
    }

    /// `handleInboundTProxyMode`.
    fn inbound_tproxy(&mut self) {
        let cfg = self.cfg;
        let tproxy_mark = cfg.tproxy_mark;
        self.b.append(
            Table::Mangle,
            Chain::Divert,
            rule(vec![], counted(Statement::SetMark(tproxy_mark))),
        );
        self.b.append(
            Table::Mangle,
            Chain::Divert,
            rule(vec![], counted(Statement::Accept)),
        );
        let to_proxy = |family: Family| {
            vec![
                Statement::Tproxy {
                    family,
                    port: cfg.inbound_capture_port,
                },
                Statement::SetMark(tproxy_mark),
                Statement::Counter,
                Statement::Accept,
            ]
        };
        let loopback_v4 = decisions::loopback(self.cfg, Family::V4);
        self.b.append(
            Table::Mangle,
            Chain::Tproxy,
            rule(vec![tcp(), not_daddr(loopback_v4)], to_proxy(Family::V4)),
        );
        self.append_v6(
            Table::Mangle,
            Chain::Tproxy,
            rule(
                vec![tcp(), not_daddr(decisions::loopback(self.cfg, Family::V6))],
                to_proxy(Family::V6),
            ),
        );
        self.b.append(
            Table::Mangle,
            Chain::Prerouting,
            rule(vec![tcp()], jump(Chain::Inbound)),
        );
        let established = || Match::ConntrackState(CtState::RelatedEstablished);
        match &cfg.inbound {
            InboundCapture::Off => {}
            InboundCapture::AllExcept(excluded) => {
                for ports in self.port_groups(excluded) {
                    self.b.append(
                        Table::Mangle,
                        Chain::Inbound,
                        rule(vec![tcp(), tcp_dports(ports)], ret()),
                    );
                }
                self.b.append(
                    Table::Mangle,
                    Chain::Inbound,
                    rule(vec![tcp(), established()], jump(Chain::Divert)),
                );
                self.b.append(
                    Table::Mangle,
                    Chain::Inbound,
                    rule(vec![tcp()], jump(Chain::Tproxy)),
                );
            }
            InboundCapture::Only(ports) => {
                for ports in self.port_groups(ports) {
                    self.b.append(
                        Table::Mangle,
                        Chain::Inbound,
                        rule(
                            vec![tcp(), established(), tcp_dports(ports.clone())],
                            jump(Chain::Divert),
                        ),
                    );
                    self.b.append(
                        Table::Mangle,
                        Chain::Inbound,
                        rule(vec![tcp(), tcp_dports(ports)], jump(Chain::Tproxy)),
                    );
                }
            }
        }
    }

    /// For each proxy uid (or gid): its connections to the pod's own address go back
    /// through inbound capture, the app's own loopback traffic is left alone, and everything
    /// else the proxy sends goes direct.
    fn proxy_owner_rules(&mut self, kind: OwnerKind) {
        let cfg = self.cfg;
        let owners = match kind {
            OwnerKind::Uid => &cfg.proxy_uids,
            OwnerKind::Gid => &cfg.proxy_gids,
        };
        let dns_on = decisions::dns_on(self.cfg);
        let loopback_included = match &cfg.outbound_include {
            OutboundInclude::Only(nets) => nets.iter().any(|n| n.addr().is_loopback()),
            OutboundInclude::Off | OutboundInclude::All => false,
        };
        let tunnel = cfg.inbound_tunnel_port;
        // With DNS capture, Istio skips port 53 here for uids only; gids keep the plain form.
        let skipped_ports = if dns_on && kind == OwnerKind::Uid {
            vec![fixed_port(DNS_PORT), tunnel]
        } else {
            vec![tunnel]
        };
        let loopback_v4 = decisions::loopback(self.cfg, Family::V4);
        for who in owners {
            let to_in_redirect = |net: IpNet| {
                rule(
                    vec![
                        oif_lo(),
                        tcp(),
                        not_daddr(net),
                        not_dport(skipped_ports.clone()),
                        owner(kind, who, false),
                    ],
                    jump(Chain::InRedirect),
                )
            };
            self.b
                .append(Table::Nat, Chain::IstioOutput, to_in_redirect(loopback_v4));
            self.append_v6(
                Table::Nat,
                Chain::IstioOutput,
                to_in_redirect(decisions::loopback(self.cfg, Family::V6)),
            );
            if !loopback_included {
                // With DNS capture, TCP DNS to a resolver on localhost must still be caught
                // further down, so port 53 is not waved through here.
                let matches = if dns_on {
                    vec![
                        oif_lo(),
                        tcp(),
                        not_dport(vec![fixed_port(DNS_PORT)]),
                        owner(kind, who, true),
                    ]
                } else {
                    vec![oif_lo(), owner(kind, who, true)]
                };
                self.b
                    .append(Table::Nat, Chain::IstioOutput, rule(matches, ret()));
            }
            self.b.append(
                Table::Nat,
                Chain::IstioOutput,
                rule(vec![owner(kind, who, false)], ret()),
            );
        }
    }

    /// `handleCaptureByOwnerGroup`.
    fn capture_by_owner_group(&mut self) {
        match &self.cfg.owner_groups {
            OwnerGroups::AllExcept(groups) => {
                for group in groups {
                    self.b.append(
                        Table::Nat,
                        Chain::IstioOutput,
                        rule(vec![owner(OwnerKind::Gid, group, false)], ret()),
                    );
                }
            }
            OwnerGroups::Only(groups) => {
                let none_of = groups
                    .iter()
                    .map(|g| owner(OwnerKind::Gid, g, true))
                    .collect();
                self.b
                    .append(Table::Nat, Chain::IstioOutput, rule(none_of, ret()));
            }
        }
    }

    /// `SetupDNSRedir`: queries from the app to the configured servers (or to anyone, with
    /// capture-all) go to the agent's DNS proxy.
    fn dns_redirect(&mut self) {
        let DnsServers { all, v4, v6 } = decisions::dns_servers(self.cfg);
        let dns = fixed_port(DNS_PORT);
        let to_agent = || {
            counted(Statement::Redirect {
                port: fixed_port(DNS_PROXY_PORT),
            })
        };
        self.b.append(
            Table::Raw,
            Chain::Output,
            rule(vec![], jump(Chain::OutputDns)),
        );
        if all || !v4.is_empty() || !v6.is_empty() {
            self.b.append(
                Table::Nat,
                Chain::IstioOutput,
                rule(vec![], jump(Chain::OutputDns)),
            );
        }
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            if all {
                let matches = match protocol {
                    Protocol::Tcp => vec![tcp(), dport(protocol, dns)],
                    Protocol::Udp => vec![dport(protocol, dns)],
                };
                self.b
                    .append(Table::Nat, Chain::OutputDns, rule(matches, to_agent()));
                continue;
            }
            for server in &v4 {
                self.b.append(
                    Table::Nat,
                    Chain::OutputDns,
                    rule(vec![daddr(*server), dport(protocol, dns)], to_agent()),
                );
            }
            for server in &v6 {
                self.append_v6(
                    Table::Nat,
                    Chain::OutputDns,
                    rule(vec![daddr(*server), dport(protocol, dns)], to_agent()),
                );
            }
        }
    }

    /// `addDNSConntrackZones`: the agent's upstream queries and the app's queries to the
    /// agent in separate conntrack zones (Istio's fix for UDP conntrack races).
    fn dns_conntrack_zones(&mut self) {
        let cfg = self.cfg;
        let DnsServers { all, v4, v6 } = decisions::dns_servers(self.cfg);
        let dns = fixed_port(DNS_PORT);
        let uids = cfg.proxy_uids.iter().map(|o| (OwnerKind::Uid, o));
        let gids = cfg.proxy_gids.iter().map(|o| (OwnerKind::Gid, o));
        for (kind, who) in uids.chain(gids) {
            self.b.append(
                Table::Raw,
                Chain::OutputDns,
                rule(
                    vec![dport(Protocol::Udp, dns), owner(kind, who, false)],
                    counted(Statement::CtZone(CT_ZONE_UPSTREAM)),
                ),
            );
            self.b.append(
                Table::Raw,
                Chain::OutputDns,
                rule(
                    vec![
                        sport(Protocol::Udp, fixed_port(DNS_PROXY_PORT)),
                        owner(kind, who, false),
                    ],
                    counted(Statement::CtZone(CT_ZONE_CLIENT)),
                ),
            );
        }
        if all || !v4.is_empty() || !v6.is_empty() {
            self.b.append(
                Table::Raw,
                Chain::Prerouting,
                rule(vec![], jump(Chain::Inbound)),
            );
        }
        if all {
            self.b.append(
                Table::Raw,
                Chain::OutputDns,
                rule(
                    vec![dport(Protocol::Udp, dns)],
                    counted(Statement::CtZone(CT_ZONE_CLIENT)),
                ),
            );
            self.b.append(
                Table::Raw,
                Chain::Inbound,
                rule(
                    vec![sport(Protocol::Udp, dns)],
                    counted(Statement::CtZone(CT_ZONE_UPSTREAM)),
                ),
            );
            return;
        }
        for (servers, v6) in [(&v4, false), (&v6, true)] {
            for server in servers {
                let to_server = rule(
                    vec![dport(Protocol::Udp, dns), daddr(*server)],
                    counted(Statement::CtZone(CT_ZONE_CLIENT)),
                );
                let from_server = rule(
                    vec![sport(Protocol::Udp, dns), saddr(*server)],
                    counted(Statement::CtZone(CT_ZONE_UPSTREAM)),
                );
                if v6 {
                    self.append_v6(Table::Raw, Chain::OutputDns, to_server);
                    self.append_v6(Table::Raw, Chain::Inbound, from_server);
                } else {
                    self.b.append(Table::Raw, Chain::OutputDns, to_server);
                    self.b.append(Table::Raw, Chain::Inbound, from_server);
                }
            }
        }
    }

    /// `handleOutboundIncludeRules`.
    fn outbound_include(&mut self) {
        let cfg = self.cfg;
        match &cfg.outbound_include {
            OutboundInclude::Off => {}
            OutboundInclude::All => {
                self.b.append(
                    Table::Nat,
                    Chain::IstioOutput,
                    rule(vec![], jump(Chain::Redirect)),
                );
                for iface in &cfg.kube_virt_interfaces {
                    self.b.insert(
                        Table::Nat,
                        Chain::Prerouting,
                        0,
                        rule(
                            vec![Match::InInterface(iface.clone())],
                            jump(Chain::Redirect),
                        ),
                    );
                }
            }
            OutboundInclude::Only(nets) => {
                for v6 in [false, true] {
                    for to in self.destination_matches(nets.iter().filter(|n| is_v4(n) != v6)) {
                        for iface in &cfg.kube_virt_interfaces {
                            let from_vm = rule(
                                vec![Match::InInterface(iface.clone()), to.clone()],
                                jump(Chain::Redirect),
                            );
                            if v6 {
                                self.insert_v6(Table::Nat, Chain::Prerouting, 0, from_vm);
                            } else {
                                self.b.insert(Table::Nat, Chain::Prerouting, 0, from_vm);
                            }
                        }
                        let to_proxy = rule(vec![to], jump(Chain::Redirect));
                        if v6 {
                            self.append_v6(Table::Nat, Chain::IstioOutput, to_proxy);
                        } else {
                            self.b.append(Table::Nat, Chain::IstioOutput, to_proxy);
                        }
                    }
                }
            }
        }
    }

    /// TPROXY bookkeeping: remember marks across a connection, let the sidecar's own
    /// connections back to the app through, and stop re-capturing marked packets.
    fn tproxy_marks(&mut self) {
        let cfg = self.cfg;
        let tproxy_mark = cfg.tproxy_mark;
        self.b.append(
            Table::Mangle,
            Chain::Prerouting,
            rule(
                vec![tcp(), mark(tproxy_mark, false)],
                counted(Statement::ConnMarkFromMark),
            ),
        );
        self.b.append(
            Table::Mangle,
            Chain::Output,
            rule(vec![oif_lo(), tcp(), mark(tproxy_mark, false)], ret()),
        );
        let loopback_v4 = decisions::loopback(self.cfg, Family::V4);
        let uids = cfg.proxy_uids.iter().map(|o| (OwnerKind::Uid, o));
        let gids = cfg.proxy_gids.iter().map(|o| (OwnerKind::Gid, o));
        for (kind, who) in uids.chain(gids) {
            let outbound_mark = |net: IpNet| {
                rule(
                    vec![oif_lo(), tcp(), not_daddr(net), owner(kind, who, false)],
                    counted(Statement::SetMark(OUTBOUND_MARK)),
                )
            };
            self.b
                .append(Table::Mangle, Chain::Output, outbound_mark(loopback_v4));
            self.append_v6(
                Table::Mangle,
                Chain::Output,
                outbound_mark(decisions::loopback(self.cfg, Family::V6)),
            );
        }
        self.b.append(
            Table::Mangle,
            Chain::Output,
            rule(
                vec![tcp(), Match::ConnMark(tproxy_mark)],
                counted(Statement::MarkFromConnMark),
            ),
        );
        self.b.insert(
            Table::Mangle,
            Chain::Inbound,
            0,
            rule(vec![tcp(), mark(tproxy_mark, false)], ret()),
        );
        self.b.insert(
            Table::Mangle,
            Chain::Inbound,
            1,
            rule(
                vec![
                    iif_lo(),
                    tcp(),
                    saddr(decisions::passthrough_source(Family::V4)),
                ],
                ret(),
            ),
        );
        self.insert_v6(
            Table::Mangle,
            Chain::Inbound,
            1,
            rule(
                vec![
                    iif_lo(),
                    tcp(),
                    saddr(decisions::passthrough_source(Family::V6)),
                ],
                ret(),
            ),
        );
        self.b.insert(
            Table::Mangle,
            Chain::Inbound,
            2,
            rule(vec![iif_lo(), tcp(), mark(OUTBOUND_MARK, true)], ret()),
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{DnsCapture, InterceptionMode};
    use crate::rules::model::{Interface, TproxyRouting};
    use crate::rules::nft::render::rule_text;

    use crate::rules::plan::tests::{port, range};

    /// Istio's base case: proxy uid and gid 1337, nothing captured (the same for both
    /// planners).
    pub(crate) use crate::rules::plan::tests::base;

    fn texts(table: &TableRules, chain: Chain) -> Vec<String> {
        table
            .chain_rules(chain)
            .into_iter()
            .map(rule_text)
            .collect()
    }

    #[test]
    fn base_case_is_one_nat_table_with_istios_chains() {
        let plan = plan(&base());
        assert_eq!(plan.tables.len(), 1);
        let nat = &plan.tables[0];
        assert_eq!(nat.table, Table::Nat);
        assert_eq!(
            nat.chains,
            [
                Chain::Output,
                Chain::Inbound,
                Chain::Redirect,
                Chain::InRedirect,
                Chain::IstioOutput
            ]
        );
        assert!(plan.tproxy_routing.is_none());
        assert!(!plan.ipv6_passthrough_address);
    }

    #[test]
    fn ipv6_off_plans_no_ipv6_match() {
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::AllExcept(vec![]);
        cfg.outbound_include = OutboundInclude::Only(vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ]);
        let v4_only = plan(&cfg);
        let any_v6 = |plan: &NftRuleset| {
            plan.tables.iter().flat_map(|t| &t.ops).any(|op| {
                op.rule.matches.iter().any(|m| {
                    matches!(
                        m,
                        Match::Address {
                            net: IpNet::V6(_),
                            ..
                        }
                    )
                })
            })
        };
        assert!(!any_v6(&v4_only));
        cfg.ipv6 = true;
        let dual = plan(&cfg);
        assert!(any_v6(&dual));
        assert!(dual.ipv6_passthrough_address);
        assert!(dual.rule_count() > v4_only.rule_count());
    }

    #[test]
    fn inserts_into_an_empty_chain_become_appends() {
        // TPROXY without inbound ports: istio-inbound only gets Istio's three inserts.
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        let plan = plan(&cfg);
        let mangle = plan.table(Table::Mangle).expect("mangle planned");
        let inbound: Vec<&RuleOp> = mangle
            .ops
            .iter()
            .filter(|op| op.chain == Chain::Inbound)
            .collect();
        assert_eq!(inbound.len(), 3);
        assert!(inbound.iter().all(|op| op.position == Position::Append));
        assert_eq!(
            mangle.chains,
            [Chain::Prerouting, Chain::Output, Chain::Inbound]
        );
        assert!(
            plan.tproxy_routing.is_none(),
            "no inbound ports, no routing"
        );
    }

    #[test]
    fn tproxy_inserts_land_where_nft_puts_them() {
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::AllExcept(vec![]);
        cfg.ipv6 = true;
        let plan = plan(&cfg);
        let mangle = plan.table(Table::Mangle).unwrap();
        // nft's `insert ... index 1` twice puts the second (IPv6) rule in front of the
        // first, and `index 2` then lands in front of the IPv4 one: Istio's kernel order.
        assert_eq!(
            texts(mangle, Chain::Inbound),
            [
                "meta l4proto tcp mark 1337 counter return",
                "iifname lo meta l4proto tcp ip6 saddr ::6/128 counter return",
                "iifname lo meta l4proto tcp mark != 1338 counter return",
                "iifname lo meta l4proto tcp ip saddr 127.0.0.6/32 counter return",
                "meta l4proto tcp ct state related,established counter jump istio-divert",
                "meta l4proto tcp counter jump istio-tproxy",
            ]
        );
        assert_eq!(
            plan.tproxy_routing,
            Some(TproxyRouting {
                mark: 1337,
                table: 133
            })
        );
    }

    #[test]
    fn kube_virt_interfaces_go_in_front() {
        let mut cfg = base();
        cfg.kube_virt_interfaces = vec![
            Interface::new_unchecked("eth1".into()),
            Interface::new_unchecked("eth2".into()),
        ];
        cfg.outbound_include = OutboundInclude::All;
        let plan = plan(&cfg);
        let nat = plan.table(Table::Nat).unwrap();
        assert_eq!(
            texts(nat, Chain::Prerouting),
            [
                "iifname eth2 counter jump istio-redirect",
                "iifname eth1 counter jump istio-redirect",
                "iifname eth2 counter return",
                "iifname eth1 counter return",
            ]
        );
        let first = nat.ops.iter().find(|op| op.chain == Chain::Prerouting);
        assert_eq!(first.map(|op| op.position), Some(Position::Append));
    }

    #[test]
    fn every_jump_target_is_declared() {
        // IPv6 DNS servers only, IPv6 off: the jumps are planned, the rules are not.
        let mut cfg = base();
        cfg.dns = DnsCapture::Servers {
            v4: vec![],
            v6: vec!["2001:db8::53".parse().unwrap()],
        };
        let plan = plan(&cfg);
        for table in &plan.tables {
            for op in &table.ops {
                assert!(table.chains.contains(&op.chain));
                if let Some(target) = op.rule.jump_target() {
                    assert!(
                        table.chains.contains(&target),
                        "{} jumps to undeclared {}",
                        table.table.name(),
                        target.name()
                    );
                }
            }
        }
    }

    #[test]
    fn dns_capture_all_has_no_server_matches() {
        let mut cfg = base();
        cfg.dns = DnsCapture::All;
        let plan = plan(&cfg);
        let nat = plan.table(Table::Nat).unwrap();
        assert_eq!(
            texts(nat, Chain::OutputDns),
            [
                "meta l4proto tcp tcp dport 53 counter redirect to :15053",
                "udp dport 53 counter redirect to :15053",
            ]
        );
        let raw = plan.table(Table::Raw).unwrap();
        assert_eq!(
            texts(raw, Chain::Inbound),
            ["udp sport 53 counter ct zone set 1"]
        );
    }

    fn sets() -> PlanOptions {
        PlanOptions { match_sets: true }
    }

    #[test]
    fn match_sets_make_one_rule_per_list() {
        let cfg = crate::rules::plan::tests::lists_config();
        let plan = plan_with(&cfg, sets());
        let nat = plan.table(Table::Nat).unwrap();
        let output = texts(nat, Chain::IstioOutput);
        for line in [
            "tcp dport { 8200, 8300 } counter return",
            "udp dport { 8200, 8300 } counter return",
            "ip daddr { 10.0.0.0/8, 192.0.2.0/24 } counter return",
            // One IPv6 network: a plain match, as without sets.
            "ip6 daddr 2001:db8::/32 counter return",
            "tcp dport 443 counter jump istio-redirect",
        ] {
            assert!(
                output.iter().any(|l| l == line),
                "missing {line:?} in {output:#?}"
            );
        }
        assert_eq!(
            texts(nat, Chain::Inbound),
            [
                "meta l4proto tcp tcp dport 15008 counter return",
                "meta l4proto tcp tcp dport { 15090, 15021, 15020 } counter return",
                "meta l4proto tcp counter jump istio-in-redirect",
            ]
        );
        // The same rules in the same places otherwise.
        let chains = super::plan(&cfg);
        assert_eq!(
            chains.rule_count() - plan.rule_count(),
            (2 * 3 - 2) + (3 - 1) + (3 - 1),
            "ports x2 protocols, v4 networks, inbound ports"
        );
    }

    #[test]
    fn match_sets_change_nothing_without_lists() {
        for cfg in [base(), {
            let mut cfg = base();
            cfg.interception = InterceptionMode::Tproxy;
            cfg.inbound = InboundCapture::Only(vec![port(8080)]);
            cfg.outbound_exclude = vec!["10.0.0.0/8".parse().unwrap()];
            cfg
        }] {
            assert_eq!(plan_with(&cfg, sets()), super::plan(&cfg));
        }
    }

    #[test]
    fn port_ranges_are_one_match_and_sets_merge_them() {
        let mut cfg = base();
        cfg.outbound_ports_exclude = vec![range(8200, 8300), port(9000)];
        cfg.inbound = InboundCapture::AllExcept(vec![range(15020, 15021)]);
        let planned = plan(&cfg);
        let nat = planned.table(Table::Nat).unwrap();
        let output = texts(nat, Chain::IstioOutput);
        for line in [
            "tcp dport 8200-8300 counter return",
            "udp dport 8200-8300 counter return",
            "tcp dport 9000 counter return",
        ] {
            assert!(output.iter().any(|l| l == line), "{line} in {output:?}");
        }
        let inbound = texts(nat, Chain::Inbound);
        assert!(
            inbound
                .iter()
                .any(|l| l.ends_with("tcp dport 15020-15021 counter return")),
            "{inbound:?}"
        );
        cfg.outbound_ports_exclude =
            vec![range(8200, 8300), port(8301), port(80), range(8250, 8260)];
        let planned = plan_with(&cfg, sets());
        let output = texts(planned.table(Table::Nat).unwrap(), Chain::IstioOutput);
        assert!(
            output
                .iter()
                .any(|l| l == "tcp dport { 80, 8200-8301 } counter return"),
            "{output:?}"
        );
    }

    #[test]
    fn match_sets_keep_tproxy_established_before_new() {
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::Only(vec![port(8080), port(8443)]);
        let plan = plan_with(&cfg, sets());
        let mangle = plan.table(Table::Mangle).unwrap();
        let inbound = texts(mangle, Chain::Inbound);
        let established = inbound
            .iter()
            .position(|l| {
                l == "meta l4proto tcp ct state related,established tcp dport { 8080, 8443 } counter jump istio-divert"
            })
            .expect("established to divert");
        let new = inbound
            .iter()
            .position(|l| {
                l == "meta l4proto tcp tcp dport { 8080, 8443 } counter jump istio-tproxy"
            })
            .expect("new to tproxy");
        assert!(established < new);
    }

    #[test]
    fn match_sets_with_kube_virt_interfaces() {
        let mut cfg = base();
        cfg.kube_virt_interfaces = vec![Interface::new_unchecked("eth1".into())];
        cfg.outbound_include = OutboundInclude::Only(vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
        ]);
        let plan = plan_with(&cfg, sets());
        let nat = plan.table(Table::Nat).unwrap();
        assert_eq!(
            texts(nat, Chain::Prerouting),
            [
                "iifname eth1 ip daddr { 10.0.0.0/8, 192.0.2.0/24 } counter jump istio-redirect",
                "iifname eth1 counter return",
            ]
        );
    }
}
