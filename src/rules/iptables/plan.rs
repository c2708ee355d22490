//! `CaptureConfig` → `Ruleset`: the capture rules Istio's `istio-iptables` would install.
//!
//! Pure: no I/O, no text. A thin pass over Istio's steps (`capture.rs`): each step becomes
//! one rule per family it applies to, written with the matches and in the match order
//! Istio's iptables backend writes it; `tests/` checks the chains against Istio's own golden
//! files.

use ipnet::IpNet;

use super::builder::{Families, RulesetBuilder};
use super::ipset::IpSet;
use super::model::{
    BuiltinChain, Chain, CtState, Family, IstioChain, Match, Owner, OwnerKind, PortRange, Protocol,
    Rule, Ruleset, Table, Target,
};
use crate::config::CaptureConfig;
use crate::rules::capture::{self, At, Nets, Ports, SetStyle, Then};
use crate::rules::decisions::{
    self, fixed_port, lo, CT_ZONE_CLIENT, CT_ZONE_UPSTREAM, DNS_PORT, DNS_PROXY_PORT, OUTBOUND_MARK,
};
pub use crate::rules::PlanOptions;

/// Plans the complete ruleset for `cfg`: Istio's, one rule per list entry.
pub fn plan(cfg: &CaptureConfig) -> Ruleset {
    plan_with(cfg, PlanOptions::default())
}

/// Plans the complete ruleset for `cfg`, shaped by `options` (`--match-sets` puts each
/// list of two or more entries into a named ipset, one per family).
pub fn plan_with(cfg: &CaptureConfig, options: PlanOptions) -> Ruleset {
    let mut b = RulesetBuilder::new(cfg.ipv6);
    for step in capture::steps(cfg, options, SetStyle::Ipset) {
        let (table, chain) = (table(step.table), chain(step.chain));
        // Each family has its own tables, so a step for both is a rule in each.
        for family in Family::ALL {
            if !step.families.includes(family) || (family == Family::V6 && !cfg.ipv6) {
                continue;
            }
            let rule = layout(&step.rule, family);
            let families = Families::only(family);
            match step.at {
                At::Append => b.append(families, table, chain, rule),
                // `-I CHAIN N` counts from 1.
                At::Insert(index) => b.insert(families, table, chain, index + 1, rule),
            }
        }
    }
    let (v4, v6) = b.finish();
    Ruleset {
        v4,
        v6,
        tproxy_routing: decisions::tproxy_routing(cfg),
        ipv6_passthrough_address: cfg.ipv6,
    }
}

fn table(table: capture::Table) -> Table {
    match table {
        capture::Table::Nat => Table::Nat,
        capture::Table::Mangle => Table::Mangle,
        capture::Table::Raw => Table::Raw,
    }
}

fn chain(chain: capture::Chain) -> Chain {
    use capture::Chain as C;
    match chain {
        C::Prerouting => Chain::Builtin(BuiltinChain::Prerouting),
        C::Output => Chain::Builtin(BuiltinChain::Output),
        C::Inbound => Chain::Istio(IstioChain::Inbound),
        C::Redirect => Chain::Istio(IstioChain::Redirect),
        C::InRedirect => Chain::Istio(IstioChain::InRedirect),
        C::IstioOutput => Chain::Istio(IstioChain::Output),
        C::OutputDns => Chain::Istio(IstioChain::OutputDns),
        C::Divert => Chain::Istio(IstioChain::Divert),
        C::Tproxy => Chain::Istio(IstioChain::Tproxy),
        C::Drop => Chain::Istio(IstioChain::Drop),
    }
}

fn jump(to: capture::Chain) -> Target {
    match chain(to) {
        Chain::Istio(own) => Target::Jump(own),
        Chain::Builtin(_) => unreachable!("Istio jumps only to its own chains"),
    }
}

fn then(then: Then) -> Target {
    match then {
        Then::Return => Target::Return,
        Then::Jump(to) => jump(to),
    }
}

fn tcp() -> Match {
    Match::Protocol(Protocol::Tcp)
}

fn udp() -> Match {
    Match::Protocol(Protocol::Udp)
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

/// One port or range, or with `--match-sets` the list's ipset for `family`.
fn ports(ports: &Ports, family: Family) -> Match {
    match ports {
        Ports::One(port) => dport(*port),
        Ports::Set { list, ports } => Match::InSet(IpSet::ports(*list, family, ports)),
    }
}

/// One network, or with `--match-sets` the list's ipset.
fn to(nets: &Nets) -> Match {
    match nets {
        Nets::One(net) => dst(*net),
        Nets::Set { list, family, nets } => Match::InSet(IpSet::nets(*list, *family, nets)),
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

fn owner((kind, who): &(OwnerKind, Owner), negated: bool) -> Match {
    Match::Owner {
        kind: *kind,
        owner: who.clone(),
        negated,
    }
}

fn mark(mark: u32, negated: bool) -> Match {
    Match::Mark { mark, negated }
}

/// `rule` as Istio's iptables backend writes it, for `family`'s table.
fn layout(rule: &capture::Rule, family: Family) -> Rule {
    use capture::Rule as R;
    let oif_lo = || Match::OutInterface(lo());
    let iif_lo = || Match::InInterface(lo());
    let established = || Match::ConntrackState(CtState::RelatedEstablished);
    let dns = || dport(fixed_port(DNS_PORT));
    let (matches, target) = match rule {
        R::FromInterface {
            interface,
            to: nets,
            then: next,
        } => {
            let from = Match::InInterface(interface.clone());
            (
                std::iter::once(from).chain(nets.as_ref().map(to)).collect(),
                then(*next),
            )
        }
        R::ToInterfaceReturn(interface) => {
            (vec![Match::OutInterface(interface.clone())], Target::Return)
        }
        R::InvalidToDrop => (
            vec![Match::ConntrackState(CtState::Invalid)],
            jump(capture::Chain::Drop),
        ),
        R::Drop => (vec![], Target::Drop),
        R::Jump(chain) | R::DnsJump(chain) => (vec![], jump(*chain)),
        R::TcpJump(chain) => (vec![tcp()], jump(*chain)),
        R::TcpRedirect(port) => (vec![tcp()], Target::Redirect { to_port: *port }),
        R::InboundPorts {
            ports: p,
            then: next,
        } => (vec![tcp(), ports(p, family)], then(*next)),
        R::EstablishedToDivert(p) => {
            let mut matches = vec![tcp()];
            matches.extend(p.as_ref().map(|p| ports(p, family)));
            matches.push(established());
            (matches, jump(capture::Chain::Divert))
        }
        R::SetMark(value) => (vec![], Target::SetMark(*value)),
        R::Accept => (vec![], Target::Accept),
        R::Tproxy { not_to, mark, port } => (
            vec![not_dst(*not_to), tcp()],
            Target::Tproxy {
                mark: *mark,
                on_port: *port,
            },
        ),
        R::OutboundPorts {
            protocol,
            ports: p,
            then: next,
        } => (
            vec![Match::Protocol(*protocol), ports(p, family)],
            then(*next),
        ),
        R::PassthroughOutReturn(source) => (vec![oif_lo(), Match::Source(*source)], Target::Return),
        R::ProxyToInbound {
            owner: who,
            not_to,
            except,
        } => {
            let except = match except.as_slice() {
                [port] => not_dport(*port),
                ports => Match::DestinationPorts {
                    ports: ports.to_vec(),
                    negated: true,
                },
            };
            (
                vec![oif_lo(), not_dst(*not_to), tcp(), except, owner(who, false)],
                jump(capture::Chain::InRedirect),
            )
        }
        R::OthersLoopbackReturn {
            owner: who,
            except_dns,
        } => {
            let matches = if *except_dns {
                vec![
                    oif_lo(),
                    tcp(),
                    not_dport(fixed_port(DNS_PORT)),
                    owner(who, true),
                ]
            } else {
                vec![oif_lo(), owner(who, true)]
            };
            (matches, Target::Return)
        }
        R::OwnerReturn(who) => (vec![owner(who, false)], Target::Return),
        R::NoneOfGroupsReturn(groups) => (
            groups
                .iter()
                .map(|g| owner(&(OwnerKind::Gid, g.clone()), true))
                .collect(),
            Target::Return,
        ),
        R::DnsRedirect { protocol, server } => {
            let mut matches = vec![Match::Protocol(*protocol), dns()];
            matches.extend(server.map(dst));
            let to_port = fixed_port(DNS_PROXY_PORT);
            (matches, Target::Redirect { to_port })
        }
        R::ProxyQueryZone(who) => (
            vec![udp(), dns(), owner(who, false)],
            Target::CtZone(CT_ZONE_UPSTREAM),
        ),
        R::ProxyAnswerZone(who) => {
            let from_proxy = Match::SourcePort(fixed_port(DNS_PROXY_PORT));
            (
                vec![udp(), from_proxy, owner(who, false)],
                Target::CtZone(CT_ZONE_CLIENT),
            )
        }
        R::QueryZone(server) => {
            let mut matches = vec![udp(), dns()];
            matches.extend(server.map(dst));
            (matches, Target::CtZone(CT_ZONE_CLIENT))
        }
        R::AnswerZone(server) => {
            let mut matches = vec![udp(), Match::SourcePort(fixed_port(DNS_PORT))];
            matches.extend(server.map(Match::Source));
            (matches, Target::CtZone(CT_ZONE_UPSTREAM))
        }
        R::Destination { nets, then: next } => (vec![to(nets)], then(*next)),
        R::SaveMark(value) => (vec![tcp(), mark(*value, false)], Target::ConnMarkSave),
        R::MarkedOutReturn(value) => (vec![tcp(), oif_lo(), mark(*value, false)], Target::Return),
        R::ProxyOutboundMark { owner: who, not_to } => (
            vec![not_dst(*not_to), tcp(), oif_lo(), owner(who, false)],
            Target::SetMark(OUTBOUND_MARK),
        ),
        R::RestoreMark(value) => (
            vec![tcp(), Match::ConnMark(*value)],
            Target::ConnMarkRestore,
        ),
        R::MarkedReturn(value) => (vec![tcp(), mark(*value, false)], Target::Return),
        R::PassthroughInReturn(source) => (
            vec![tcp(), Match::Source(*source), iif_lo()],
            Target::Return,
        ),
        R::UnmarkedLoopbackReturn => (
            vec![tcp(), iif_lo(), mark(OUTBOUND_MARK, true)],
            Target::Return,
        ),
    };
    Rule::new(matches, target)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{
        DnsCapture, InboundCapture, InterceptionMode, OutboundInclude, OwnerGroups,
    };
    use crate::rules::iptables::model::{ChainRules, FamilyRuleset, Interface, TproxyRouting};
    use crate::rules::iptables::render::rule_spec;

    const PREROUTING: Chain = Chain::Builtin(BuiltinChain::Prerouting);
    const INBOUND: Chain = Chain::Istio(IstioChain::Inbound);
    const ISTIO_OUTPUT: Chain = Chain::Istio(IstioChain::Output);

    pub(crate) use crate::values::tests::{port, range};

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
            &crate::rules::iptables::ipset::SetMembers::Ports(vec![port(80), range(8200, 8301)])
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
        let plan = plan(&tproxy_config());
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

    /// A KubeVirt interface, and two IPv4 networks captured (a list for `--match-sets`).
    /// Shared by both planners.
    pub(crate) fn kube_virt_config() -> CaptureConfig {
        let mut cfg = base();
        cfg.kube_virt_interfaces = vec![Interface::new_unchecked("eth1".into())];
        cfg.outbound_include = OutboundInclude::Only(vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
        ]);
        cfg
    }

    /// DNS capture of one IPv6 server, IPv6 off. Shared by both planners.
    pub(crate) fn ipv6_dns_servers_only() -> CaptureConfig {
        let mut cfg = base();
        cfg.dns = DnsCapture::Servers {
            v4: vec![],
            v6: vec!["2001:db8::53".parse().unwrap()],
        };
        cfg
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
        // The same rules in the same places otherwise: `capture::tests`.
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
        let cfg = kube_virt_config();
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
