//! `meshinit explain`: will this connection be captured, and by which rule?
//!
//! Walks the planned ruleset (the same typed model the kernel gets) the way netfilter
//! traverses it for one packet: the hooks of its path in table order, chains followed
//! through jumps and returns, the first terminal target deciding. Pure: no I/O, no kernel.
//! A test checks it against what real connections do in the e2e suite.

pub mod command;

use std::fmt;
use std::net::IpAddr;

use crate::rules::iptables::model::{
    BuiltinChain, Chain, CtState, FamilyRuleset, Match, Owner, OwnerKind, Protocol, Rule, Table,
    Target,
};
use crate::rules::iptables::render::rule_spec;

/// Which way the connection goes, which decides the hook it meets first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Opened by a process in the pod (the OUTPUT hook).
    Outbound,
    /// Arriving on one of the pod's interfaces (the PREROUTING hook).
    Inbound,
}

/// The first packet of a connection, as far as the capture rules look at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub direction: Direction,
    pub protocol: Protocol,
    pub source: Option<IpAddr>,
    pub source_port: Option<u16>,
    pub destination: IpAddr,
    pub destination_port: u16,
    /// The interface it arrives on (inbound) or leaves by (outbound).
    pub interface: String,
    /// The sending process's uid and gid (outbound only).
    pub uid: Option<Owner>,
    pub gid: Option<Owner>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Redirected (NAT) to a local port: the sidecar's listener.
    Redirected {
        port: u16,
    },
    /// Handed to a local port by TPROXY, addresses unchanged.
    Tproxied {
        port: u16,
    },
    /// Not captured: goes where it was addressed.
    Direct,
    Dropped,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Redirected { port } => write!(f, "captured: redirected to port {port}"),
            Verdict::Tproxied { port } => write!(f, "captured: TPROXY to port {port}"),
            Verdict::Direct => f.write_str("not captured: goes direct"),
            Verdict::Dropped => f.write_str("dropped"),
        }
    }
}

/// One rule that matched on the way to the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub table: Table,
    pub chain: Chain,
    pub rule: String,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -A {} {}",
            self.table.name(),
            self.chain.name(),
            self.rule
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub verdict: Verdict,
    /// The matching rules, in the order the packet met them.
    pub steps: Vec<Step>,
}

/// How traversal of one chain ended.
enum Flow {
    /// Fell off the end or hit RETURN: back to the caller (for a built-in chain, its
    /// ACCEPT policy).
    Continue,
    /// ACCEPT: this table is done with the packet.
    Accepted,
    Decided(Verdict),
}

struct Walk<'a> {
    rules: &'a FamilyRuleset,
    packet: &'a Packet,
    mark: u32,
    steps: Vec<Step>,
}

/// Explains what `rules` do to the first packet of `packet`'s connection.
pub fn explain(rules: &FamilyRuleset, packet: &Packet) -> Explanation {
    let (hook, tables): (BuiltinChain, &[Table]) = match packet.direction {
        Direction::Outbound => (
            BuiltinChain::Output,
            &[Table::Raw, Table::Mangle, Table::Nat, Table::Filter],
        ),
        Direction::Inbound => (
            BuiltinChain::Prerouting,
            &[Table::Raw, Table::Mangle, Table::Nat],
        ),
    };
    let mut walk = Walk {
        rules,
        packet,
        mark: 0,
        steps: Vec::new(),
    };
    for &table in tables {
        match walk.chain(table, Chain::Builtin(hook), 0) {
            Flow::Continue | Flow::Accepted => {}
            Flow::Decided(verdict) => {
                return Explanation {
                    verdict,
                    steps: walk.steps,
                }
            }
        }
    }
    Explanation {
        verdict: Verdict::Direct,
        steps: walk.steps,
    }
}

/// Deeper than any ruleset meshinit plans; a guard against a loop, not a limit in practice.
const MAX_DEPTH: usize = 16;

impl Walk<'_> {
    fn chain(&mut self, table: Table, chain: Chain, depth: usize) -> Flow {
        let Some(rules) = self.rules.table(table).and_then(|t| t.chain(chain)) else {
            return Flow::Continue;
        };
        if depth > MAX_DEPTH {
            return Flow::Continue;
        }
        for rule in rules.all_rules() {
            if !rule.matches.iter().all(|m| self.matches(m)) {
                continue;
            }
            self.steps.push(Step {
                table,
                chain,
                rule: rule_spec(rule),
            });
            match self.target(table, rule, depth) {
                Flow::Continue if matches!(rule.target, Target::Return) => return Flow::Continue,
                Flow::Continue => {}
                other => return other,
            }
        }
        Flow::Continue
    }

    fn target(&mut self, table: Table, rule: &Rule, depth: usize) -> Flow {
        match &rule.target {
            Target::Jump(own) => self.chain(table, Chain::Istio(*own), depth + 1),
            Target::Return => Flow::Continue,
            Target::Accept => Flow::Accepted,
            Target::Drop => Flow::Decided(Verdict::Dropped),
            Target::Redirect { to_port } => Flow::Decided(Verdict::Redirected {
                port: to_port.get(),
            }),
            Target::Tproxy { on_port, .. } => Flow::Decided(Verdict::Tproxied {
                port: on_port.get(),
            }),
            Target::SetMark(mark) => {
                self.mark = *mark;
                Flow::Continue
            }
            // Connection marks and conntrack zones do not decide where a new connection goes.
            Target::ConnMarkSave | Target::ConnMarkRestore | Target::CtZone(_) => Flow::Continue,
        }
    }

    fn matches(&self, m: &Match) -> bool {
        let p = self.packet;
        match m {
            Match::InInterface(i) => {
                p.direction == Direction::Inbound && iface_matches(i.as_str(), &p.interface)
            }
            Match::OutInterface(i) => {
                p.direction == Direction::Outbound && iface_matches(i.as_str(), &p.interface)
            }
            Match::Source(net) => p.source.is_some_and(|s| net.contains(&s)),
            Match::Destination { net, negated } => net.contains(&p.destination) != *negated,
            Match::Protocol(proto) => *proto == p.protocol,
            Match::DestinationPort { port, negated } => {
                port.contains(p.destination_port) != *negated
            }
            Match::SourcePort(port) => p.source_port == Some(port.get()),
            Match::DestinationPorts { ports, negated } => {
                ports.iter().any(|q| q.get() == p.destination_port) != *negated
            }
            Match::Owner {
                kind,
                owner,
                negated,
            } => {
                // The owner match only sees locally generated packets.
                let who = match kind {
                    OwnerKind::Uid => p.uid.as_ref(),
                    OwnerKind::Gid => p.gid.as_ref(),
                };
                match who {
                    Some(who) if p.direction == Direction::Outbound => (who == owner) != *negated,
                    _ => false,
                }
            }
            // Explain looks at the first packet of a new connection.
            Match::ConntrackState(state) => match state {
                CtState::Invalid | CtState::RelatedEstablished => false,
            },
            Match::Mark { mark, negated } => (self.mark == *mark) != *negated,
            Match::ConnMark(mark) => *mark == 0,
            Match::InSet(set) => set.contains(p.destination, p.destination_port),
            Match::OwnerComment => true,
        }
    }
}

/// iptables interface matching: exact, or a prefix when the name ends in '+'.
fn iface_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CaptureConfig, InboundCapture, InterceptionMode, OutboundInclude};
    use crate::rules::iptables::model::Port;
    use crate::rules::iptables::plan::plan;

    /// The injector's default: everything captured but Istio's own inbound ports.
    fn injector_default() -> CaptureConfig {
        let port = |p| crate::values::PortRange::from(Port::new(p).unwrap());
        let mut cfg = crate::rules::iptables::plan::tests::base();
        cfg.inbound = InboundCapture::AllExcept(vec![port(15090), port(15021), port(15020)]);
        cfg.outbound_include = OutboundInclude::All;
        cfg
    }

    fn outbound(dst: &str, port: u16, uid: u32) -> Packet {
        let destination: IpAddr = dst.parse().unwrap();
        Packet {
            direction: Direction::Outbound,
            protocol: Protocol::Tcp,
            source: None,
            source_port: None,
            destination,
            destination_port: port,
            interface: if destination.is_loopback() {
                "lo"
            } else {
                "eth0"
            }
            .into(),
            uid: Some(Owner::Id(uid)),
            gid: Some(Owner::Id(uid)),
        }
    }

    fn inbound(port: u16) -> Packet {
        Packet {
            direction: Direction::Inbound,
            protocol: Protocol::Tcp,
            source: Some("192.0.2.1".parse().unwrap()),
            source_port: Some(40000),
            destination: "192.0.2.2".parse().unwrap(),
            destination_port: port,
            interface: "eth0".into(),
            uid: None,
            gid: None,
        }
    }

    #[test]
    fn app_outbound_is_redirected_to_15001_by_named_rules() {
        let rules = plan(&injector_default());
        let e = explain(&rules.v4, &outbound("198.51.100.30", 8200, 1000));
        assert_eq!(e.verdict, Verdict::Redirected { port: 15001 });
        let rules: Vec<String> = e.steps.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            [
                "nat -A OUTPUT -j ISTIO_OUTPUT",
                "nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT",
                "nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
    }

    #[test]
    fn proxy_uid_and_loopback_go_direct() {
        let rules = plan(&injector_default());
        let proxy = explain(&rules.v4, &outbound("198.51.100.30", 8200, 1337));
        assert_eq!(proxy.verdict, Verdict::Direct);
        assert!(proxy
            .steps
            .last()
            .unwrap()
            .rule
            .contains("--uid-owner 1337 -j RETURN"));
        let local = explain(&rules.v4, &outbound("127.0.0.1", 9090, 1000));
        assert_eq!(local.verdict, Verdict::Direct);
    }

    #[test]
    fn excluded_outbound_port_goes_direct() {
        let mut cfg = injector_default();
        cfg.outbound_ports_exclude = vec![Port::new(8200).unwrap().into()];
        let e = explain(&plan(&cfg).v4, &outbound("198.51.100.30", 8200, 1000));
        assert_eq!(e.verdict, Verdict::Direct);
        assert_eq!(
            e.steps.last().unwrap().rule,
            "-p tcp --dport 8200 -j RETURN"
        );
    }

    #[test]
    fn excluded_outbound_port_range_goes_direct_at_its_edges_only() {
        let range = crate::rules::iptables::plan::tests::range;
        for sets in [false, true] {
            let mut cfg = injector_default();
            cfg.outbound_ports_exclude = vec![range(8200, 8300), range(9000, 9000)];
            let rules = crate::rules::iptables::plan::plan_with(
                &cfg,
                crate::rules::PlanOptions { match_sets: sets },
            );
            for (port, direct) in [(8199, false), (8200, true), (8300, true), (8301, false)] {
                let e = explain(&rules.v4, &outbound("198.51.100.30", port, 1000));
                assert_eq!(
                    e.verdict == Verdict::Direct,
                    direct,
                    "port {port}, sets {sets}"
                );
            }
        }
        let mut cfg = injector_default();
        cfg.outbound_ports_exclude = vec![range(8200, 8300)];
        let e = explain(&plan(&cfg).v4, &outbound("198.51.100.30", 8250, 1000));
        assert_eq!(
            e.steps.last().unwrap().rule,
            "-p tcp --dport 8200:8300 -j RETURN"
        );
    }

    #[test]
    fn inbound_redirect_and_exclusions() {
        let rules = plan(&injector_default());
        assert_eq!(
            explain(&rules.v4, &inbound(8080)).verdict,
            Verdict::Redirected { port: 15006 }
        );
        assert_eq!(explain(&rules.v4, &inbound(15021)).verdict, Verdict::Direct);
        assert_eq!(explain(&rules.v4, &inbound(15008)).verdict, Verdict::Direct);
    }

    #[test]
    fn inbound_tproxy() {
        let mut cfg = injector_default();
        cfg.interception = InterceptionMode::Tproxy;
        let e = explain(&plan(&cfg).v4, &inbound(8080));
        assert_eq!(e.verdict, Verdict::Tproxied { port: 15006 });
        assert!(e.steps.iter().all(|s| s.table == Table::Mangle));
    }

    #[test]
    fn wildcard_interfaces() {
        assert!(iface_matches("veth+", "veth12"));
        assert!(!iface_matches("veth", "veth12"));
    }
}
