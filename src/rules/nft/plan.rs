//! `CaptureConfig` → `NftRuleset`: the ruleset Istio's native nftables backend
//! (`tools/istio-nftables/pkg/capture/run.go`) would install.
//!
//! Pure: no I/O, no text. A thin pass over Istio's steps (`capture.rs`), which
//! `NftablesConfigurator.Run` lays out as its iptables backend does, with the same appends
//! and indexed inserts per table: each step becomes one rule, written with the matches and
//! in the match order Istio's nftables backend writes it. The transaction shape (which
//! tables and chains are declared, inserts into an empty chain becoming appends) follows its
//! `addIstioTableRules`. `tests/integration/nft_golden.rs`
//! loads the result and Istio's goldens into the kernel and compares what it holds.

use std::collections::HashMap;

use ipnet::IpNet;

use super::model::{
    Chain, Direction, Match, NftRuleset, Position, Rule, RuleOp, Statement, Table, TableRules,
};
use crate::config::CaptureConfig;
use crate::rules::capture::{self, At, Families, Nets, Ports, SetStyle, Then};
use crate::rules::decisions::CtState;
use crate::rules::decisions::{
    self, fixed_port, lo, CT_ZONE_CLIENT, CT_ZONE_UPSTREAM, DNS_PORT, DNS_PROXY_PORT, OUTBOUND_MARK,
};
pub use crate::rules::PlanOptions;
use crate::values::merge_port_ranges;
use crate::values::{Family, Owner, OwnerKind, Port, PortRange, Protocol};

/// Plans the nftables ruleset for `cfg`: Istio's, one rule per list entry.
pub fn plan(cfg: &CaptureConfig) -> NftRuleset {
    plan_with(cfg, PlanOptions::default())
}

/// Plans the nftables ruleset for `cfg`, shaped by `options`.
pub fn plan_with(cfg: &CaptureConfig, options: PlanOptions) -> NftRuleset {
    let mut b = Builder::default();
    for step in capture::steps(cfg, options, SetStyle::Interval) {
        // Istio's `AppendV6RuleIfSupported`: IPv6's own rules only with IPv6 on. Its DNS
        // jumps differ: one rule in the `inet` table, written whenever any family has
        // servers to capture, IPv6's alone with IPv6 off included.
        let dns_jump = matches!(step.rule, capture::Rule::DnsJump(_));
        if step.families == Families::V6 && !cfg.ipv6 && !dns_jump {
            continue;
        }
        let rule = layout(&step.rule);
        match step.at {
            At::Append => b.append(step.table, step.chain, rule),
            At::Insert(index) => b.insert(step.table, step.chain, index, rule),
        }
    }
    NftRuleset {
        tables: b.finish(),
        ipv6: cfg.ipv6,
        tproxy_routing: decisions::tproxy_routing(cfg),
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

/// `counter` then `statement`: how almost every Istio rule ends.
fn counted(statement: Statement) -> Vec<Statement> {
    vec![Statement::Counter, statement]
}

fn jump(to: Chain) -> Vec<Statement> {
    counted(Statement::Jump(to))
}

fn ret() -> Vec<Statement> {
    counted(Statement::Return)
}

fn then(then: Then) -> Vec<Statement> {
    match then {
        Then::Return => ret(),
        Then::Jump(to) => jump(to),
    }
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

/// `PROTOCOL dport PORT`, or with `--match-sets` the list as an anonymous set: an interval
/// set once it holds a range, whose elements may not overlap, so its ranges are merged
/// (sorted, overlapping and adjacent ones joined); else the ports as given, duplicates
/// dropped. A set of one element is written as a plain match.
fn dports(protocol: Protocol, ports: &Ports) -> Match {
    let ports = match ports {
        Ports::One(port) => vec![*port],
        Ports::Set { ports, .. } if ports.iter().any(|p| p.single().is_none()) => {
            merge_port_ranges(ports)
        }
        Ports::Set { ports, .. } => {
            let mut seen = std::collections::HashSet::new();
            ports.iter().copied().filter(|p| seen.insert(*p)).collect()
        }
    };
    port_match(protocol, Direction::Destination, ports, false)
}

fn dport(protocol: Protocol, port: Port) -> Match {
    port_match(protocol, Direction::Destination, vec![port.into()], false)
}

fn sport(protocol: Protocol, port: Port) -> Match {
    port_match(protocol, Direction::Source, vec![port.into()], false)
}

fn not_dport(ports: &[Port]) -> Match {
    let ports = ports.iter().map(|p| PortRange::from(*p)).collect();
    port_match(Protocol::Tcp, Direction::Destination, ports, true)
}

fn address(direction: Direction, net: IpNet, negated: bool) -> Match {
    Match::Address {
        direction,
        net,
        negated,
    }
}

fn daddr(net: IpNet) -> Match {
    address(Direction::Destination, net, false)
}

fn not_daddr(net: IpNet) -> Match {
    address(Direction::Destination, net, true)
}

fn saddr(net: IpNet) -> Match {
    address(Direction::Source, net, false)
}

/// One network, or with `--match-sets` an anonymous interval set of them.
fn to(nets: &Nets) -> Match {
    match nets {
        Nets::One(net) => daddr(*net),
        Nets::Set { nets, .. } => Match::AddressSet {
            direction: Direction::Destination,
            nets: nets.clone(),
        },
    }
}

fn owner((kind, who): &(OwnerKind, Owner), negated: bool) -> Match {
    Match::Owner {
        kind: *kind,
        owner: who.clone(),
        negated,
    }
}

/// `rule` as Istio's nftables backend writes it.
fn layout(rule: &capture::Rule) -> Rule {
    use capture::Rule as R;
    let oif_lo = || Match::OutInterface(lo());
    let iif_lo = || Match::InInterface(lo());
    let established = || Match::ConntrackState(CtState::RelatedEstablished);
    let marked = |mark| Match::Mark {
        mark,
        negated: false,
    };
    let dns = fixed_port(DNS_PORT);
    let to_agent = || {
        counted(Statement::Redirect {
            port: fixed_port(DNS_PROXY_PORT),
        })
    };
    let (matches, statements) = match rule {
        R::FromInterface {
            interface,
            to: nets,
            then: next,
        } => {
            let mut matches = vec![Match::InInterface(interface.clone())];
            matches.extend(nets.as_ref().map(to));
            (matches, then(*next))
        }
        R::ToInterfaceReturn(interface) => (vec![Match::OutInterface(interface.clone())], ret()),
        R::InvalidToDrop => (
            vec![tcp(), Match::ConntrackState(CtState::Invalid)],
            jump(Chain::Drop),
        ),
        R::Drop => (vec![], counted(Statement::Drop)),
        R::Jump(chain) | R::DnsJump(chain) => (vec![], jump(*chain)),
        R::TcpJump(chain) => (vec![tcp()], jump(*chain)),
        R::TcpRedirect(port) => (vec![tcp()], counted(Statement::Redirect { port: *port })),
        R::InboundPorts { ports, then: next } => {
            (vec![tcp(), dports(Protocol::Tcp, ports)], then(*next))
        }
        R::EstablishedToDivert(ports) => {
            let mut matches = vec![tcp(), established()];
            matches.extend(ports.as_ref().map(|p| dports(Protocol::Tcp, p)));
            (matches, jump(Chain::Divert))
        }
        R::SetMark(value) => (vec![], counted(Statement::SetMark(*value))),
        R::Accept => (vec![], counted(Statement::Accept)),
        R::Tproxy { not_to, mark, port } => {
            let statements = vec![
                Statement::Tproxy {
                    family: Family::of(not_to),
                    port: *port,
                },
                Statement::SetMark(*mark),
                Statement::Counter,
                Statement::Accept,
            ];
            (vec![tcp(), not_daddr(*not_to)], statements)
        }
        R::OutboundPorts {
            protocol,
            ports,
            then: next,
        } => (vec![dports(*protocol, ports)], then(*next)),
        R::PassthroughOutReturn(source) => (vec![oif_lo(), saddr(*source)], ret()),
        R::ProxyToInbound {
            owner: who,
            not_to,
            except,
        } => (
            vec![
                oif_lo(),
                tcp(),
                not_daddr(*not_to),
                not_dport(except),
                owner(who, false),
            ],
            jump(Chain::InRedirect),
        ),
        R::OthersLoopbackReturn {
            owner: who,
            except_dns,
        } => {
            let matches = if *except_dns {
                vec![oif_lo(), tcp(), not_dport(&[dns]), owner(who, true)]
            } else {
                vec![oif_lo(), owner(who, true)]
            };
            (matches, ret())
        }
        R::OwnerReturn(who) => (vec![owner(who, false)], ret()),
        R::NoneOfGroupsReturn(groups) => (
            groups
                .iter()
                .map(|g| owner(&(OwnerKind::Gid, g.clone()), true))
                .collect(),
            ret(),
        ),
        R::DnsRedirect { protocol, server } => {
            let matches = match (server, protocol) {
                (Some(server), _) => vec![daddr(*server), dport(*protocol, dns)],
                (None, Protocol::Tcp) => vec![tcp(), dport(*protocol, dns)],
                (None, Protocol::Udp) => vec![dport(*protocol, dns)],
            };
            (matches, to_agent())
        }
        R::ProxyQueryZone(who) => (
            vec![dport(Protocol::Udp, dns), owner(who, false)],
            counted(Statement::CtZone(CT_ZONE_UPSTREAM)),
        ),
        R::ProxyAnswerZone(who) => (
            vec![
                sport(Protocol::Udp, fixed_port(DNS_PROXY_PORT)),
                owner(who, false),
            ],
            counted(Statement::CtZone(CT_ZONE_CLIENT)),
        ),
        R::QueryZone(server) => {
            let mut matches = vec![dport(Protocol::Udp, dns)];
            matches.extend(server.map(daddr));
            (matches, counted(Statement::CtZone(CT_ZONE_CLIENT)))
        }
        R::AnswerZone(server) => {
            let mut matches = vec![sport(Protocol::Udp, dns)];
            matches.extend(server.map(saddr));
            (matches, counted(Statement::CtZone(CT_ZONE_UPSTREAM)))
        }
        R::Destination { nets, then: next } => (vec![to(nets)], then(*next)),
        R::SaveMark(value) => (
            vec![tcp(), marked(*value)],
            counted(Statement::ConnMarkFromMark),
        ),
        R::MarkedOutReturn(value) => (vec![oif_lo(), tcp(), marked(*value)], ret()),
        R::ProxyOutboundMark { owner: who, not_to } => (
            vec![oif_lo(), tcp(), not_daddr(*not_to), owner(who, false)],
            counted(Statement::SetMark(OUTBOUND_MARK)),
        ),
        R::RestoreMark(value) => (
            vec![tcp(), Match::ConnMark(*value)],
            counted(Statement::MarkFromConnMark),
        ),
        R::MarkedReturn(value) => (vec![tcp(), marked(*value)], ret()),
        R::PassthroughInReturn(source) => (vec![iif_lo(), tcp(), saddr(*source)], ret()),
        R::UnmarkedLoopbackReturn => (
            vec![
                iif_lo(),
                tcp(),
                Match::Mark {
                    mark: OUTBOUND_MARK,
                    negated: true,
                },
            ],
            ret(),
        ),
    };
    Rule::new(matches, statements)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{DnsCapture, InboundCapture, InterceptionMode, OutboundInclude};
    use crate::rules::decisions::TproxyRouting;
    use crate::rules::nft::render::rule_text;
    use crate::values::Interface;

    use crate::rules::iptables::plan::tests::{
        ipv6_dns_servers_only, kube_virt_config, port, range, tproxy_config,
    };

    /// Istio's base case: proxy uid and gid 1337, nothing captured (the same for both
    /// planners).
    pub(crate) use crate::rules::iptables::plan::tests::base;

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
        let mut cfg = tproxy_config();
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
        let mut cfg = tproxy_config();
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
        let cfg = ipv6_dns_servers_only();
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
        let cfg = crate::rules::iptables::plan::tests::lists_config();
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
        // The same rules in the same places otherwise: `capture::tests`.
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
        let cfg = kube_virt_config();
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
