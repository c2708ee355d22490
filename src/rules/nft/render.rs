//! Renders the typed nftables ruleset as `nft -f` input: the only place nft text is made.
//!
//! The whole input is one transaction, which nft commits all or nothing: the operations of
//! `txn::transaction` (see there for how a re-run converges), one line each.

use std::fmt::Write as _;

use ipnet::IpNet;

use super::model::{
    BaseChain, ChainType, Direction, ExistingTables, Hook, Match, NftRuleset, Position, Rule,
    Statement, Table,
};
use super::txn::{self, Op};
use crate::rules::decisions::CtState;
use crate::values::{Family, Interface, Owner, OwnerKind, Protocol};

const FAMILY: &str = "inet";

/// The transaction that takes meshinit's tables from `existing` to `ruleset`. With
/// `Some(&ExistingTables::default())` (a fresh namespace) this is exactly what `print` shows;
/// with `None` (the current state is unknown) every planned table is rebuilt and every other
/// table of meshinit's is deleted.
pub fn render_transaction(ruleset: &NftRuleset, existing: Option<&ExistingTables>) -> String {
    render_ops(&txn::transaction(ruleset, existing), ruleset.rule_count())
}

/// The transaction that deletes `tables` (all of meshinit's, normally), whether or not they
/// exist.
pub fn render_cleanup(tables: &[Table]) -> String {
    render_ops(&txn::cleanup(tables), 0)
}

/// `ops` as `nft -f` input, one line each; `rules` sizes the buffer.
pub fn render_ops(ops: &[Op<'_>], rules: usize) -> String {
    let mut out = String::with_capacity(256 + rules * 96);
    for op in ops {
        push_op(&mut out, op);
        out.push('\n');
    }
    out
}

/// One operation as one line of `nft -f` input (without the newline).
pub fn op_text(op: &Op<'_>) -> String {
    let mut out = String::new();
    push_op(&mut out, op);
    out
}

fn push_op(out: &mut String, op: &Op<'_>) {
    match op {
        Op::AddTable(table) => {
            let _ = write!(out, "add table {FAMILY} {}", table.name());
        }
        Op::FlushTable(table) => {
            let _ = write!(out, "flush table {FAMILY} {}", table.name());
        }
        Op::DeleteTable(table) => {
            let _ = write!(out, "delete table {FAMILY} {}", table.name());
        }
        Op::AddChain { table, chain, base } => {
            let _ = write!(out, "add chain {FAMILY} {} {}", table.name(), chain.name());
            if let Some(base) = base {
                push_base_chain(out, *base);
            }
        }
        Op::Rule { table, op } => {
            match op.position {
                Position::Append => {
                    let _ = write!(
                        out,
                        "add rule {FAMILY} {} {} ",
                        table.name(),
                        op.chain.name()
                    );
                }
                Position::Insert { index } => {
                    let _ = write!(
                        out,
                        "insert rule {FAMILY} {} {} index {index} ",
                        table.name(),
                        op.chain.name()
                    );
                }
            }
            push_rule(out, &op.rule);
        }
    }
}

/// The dry-run: the transaction for a fresh namespace (Istio's text), then the routing
/// changes as comments (apply makes them over netlink), so the whole output can be piped
/// into `nft -f -`.
pub fn render_plan(ruleset: &NftRuleset) -> String {
    let mut out = render_transaction(ruleset, Some(&ExistingTables::default()));
    let mut routing = Vec::new();
    if ruleset.ipv6_passthrough_address {
        routing.push("ip -6 addr add ::6/128 dev lo".to_owned());
    }
    if let Some(r) = ruleset.tproxy_routing {
        let flags: &[&str] = if ruleset.ipv6 { &["-4", "-6"] } else { &["-4"] };
        for flag in flags {
            routing.push(format!(
                "ip {flag} rule add fwmark {} lookup {}",
                r.mark, r.table
            ));
            routing.push(format!(
                "ip {flag} route add local default dev lo table {}",
                r.table
            ));
        }
    }
    if !routing.is_empty() {
        out.push_str("# routing (applied over netlink): equivalent ip commands\n");
        for line in routing {
            let _ = writeln!(out, "#   {line}");
        }
    }
    out
}

fn push_base_chain(out: &mut String, base: BaseChain) {
    let kind = match base.kind {
        ChainType::Nat => "nat",
        ChainType::Filter => "filter",
        ChainType::Route => "route",
    };
    let hook = match base.hook {
        Hook::Prerouting => "prerouting",
        Hook::Output => "output",
    };
    let _ = write!(
        out,
        " {{ type {kind} hook {hook} priority {} ; }}",
        base.priority
    );
}

/// One rule's text (everything after `add rule inet TABLE CHAIN`).
pub fn rule_text(rule: &Rule) -> String {
    let mut out = String::with_capacity(64);
    push_rule(&mut out, rule);
    out
}

fn push_rule(out: &mut String, rule: &Rule) {
    let start = out.len();
    for m in &rule.matches {
        push_match(out, m);
    }
    for s in &rule.statements {
        push_statement(out, s);
    }
    // Every piece starts with a blank; the rule itself does not.
    if out[start..].starts_with(' ') {
        out.remove(start);
    }
}

/// A word nft reads as a plain string unquoted; anything else is quoted.
fn push_word(out: &mut String, word: &str) {
    let plain = word.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if plain {
        out.push_str(word);
    } else {
        let _ = write!(out, "\"{word}\"");
    }
}

fn push_interface(out: &mut String, iface: &Interface) {
    // iptables' `eth+` (any name starting with eth) is `"eth*"` in nftables.
    match iface.as_str().strip_suffix('+') {
        Some(prefix) => {
            let _ = write!(out, "\"{prefix}*\"");
        }
        None => push_word(out, iface.as_str()),
    }
}

fn push_net(out: &mut String, net: &IpNet) {
    let _ = write!(out, "{net}");
}

fn push_negation(out: &mut String, negated: bool) {
    if negated {
        out.push_str(" !=");
    }
}

fn protocol(p: Protocol) -> &'static str {
    p.name()
}

fn push_match(out: &mut String, m: &Match) {
    match m {
        Match::InInterface(iface) => {
            out.push_str(" iifname ");
            push_interface(out, iface);
        }
        Match::OutInterface(iface) => {
            out.push_str(" oifname ");
            push_interface(out, iface);
        }
        Match::L4Proto(p) => {
            out.push_str(" meta l4proto ");
            out.push_str(protocol(*p));
        }
        Match::Address {
            direction,
            net,
            negated,
        } => {
            out.push_str(match net {
                IpNet::V4(_) => " ip",
                IpNet::V6(_) => " ip6",
            });
            out.push_str(match direction {
                Direction::Source => " saddr",
                Direction::Destination => " daddr",
            });
            push_negation(out, *negated);
            out.push(' ');
            push_net(out, net);
        }
        Match::AddressSet { direction, nets } => {
            out.push_str(match nets.first() {
                Some(IpNet::V6(_)) => " ip6",
                _ => " ip",
            });
            out.push_str(match direction {
                Direction::Source => " saddr {",
                Direction::Destination => " daddr {",
            });
            for (i, net) in nets.iter().enumerate() {
                out.push_str(if i > 0 { ", " } else { " " });
                push_net(out, net);
            }
            out.push_str(" }");
        }
        Match::Port {
            protocol: p,
            direction,
            ports,
            negated,
        } => {
            out.push(' ');
            out.push_str(protocol(*p));
            out.push_str(match direction {
                Direction::Source => " sport",
                Direction::Destination => " dport",
            });
            push_negation(out, *negated);
            match ports.as_slice() {
                [single] => {
                    let _ = write!(out, " {single}");
                }
                many => {
                    out.push_str(" { ");
                    for (i, port) in many.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        let _ = write!(out, "{port}");
                    }
                    out.push_str(" }");
                }
            }
        }
        Match::Owner {
            kind,
            owner,
            negated,
        } => {
            out.push_str(match kind {
                OwnerKind::Uid => " skuid",
                OwnerKind::Gid => " skgid",
            });
            push_negation(out, *negated);
            out.push(' ');
            match owner {
                Owner::Id(id) => {
                    let _ = write!(out, "{id}");
                }
                Owner::Name(name) => push_word(out, name),
            }
        }
        Match::ConntrackState(state) => {
            out.push_str(match state {
                CtState::Invalid => " ct state invalid",
                CtState::RelatedEstablished => " ct state related,established",
            });
        }
        Match::Mark { mark, negated } => {
            out.push_str(" mark");
            push_negation(out, *negated);
            let _ = write!(out, " {mark}");
        }
        Match::ConnMark(mark) => {
            let _ = write!(out, " ct mark {mark}");
        }
    }
}

fn push_statement(out: &mut String, s: &Statement) {
    match s {
        Statement::Counter => out.push_str(" counter"),
        Statement::SetMark(mark) => {
            let _ = write!(out, " meta mark set {mark}");
        }
        Statement::MarkFromConnMark => out.push_str(" meta mark set ct mark"),
        Statement::ConnMarkFromMark => out.push_str(" ct mark set mark"),
        Statement::CtZone(zone) => {
            let _ = write!(out, " ct zone set {zone}");
        }
        Statement::Tproxy { family, port } => {
            let family = match family {
                Family::V4 => "ip",
                Family::V6 => "ip6",
            };
            let _ = write!(out, " tproxy {family} to :{port}");
        }
        Statement::Redirect { port } => {
            let _ = write!(out, " redirect to :{port}");
        }
        Statement::Return => out.push_str(" return"),
        Statement::Accept => out.push_str(" accept"),
        Statement::Drop => out.push_str(" drop"),
        Statement::Jump(chain) => {
            out.push_str(" jump ");
            out.push_str(chain.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DnsCapture, InboundCapture, InterceptionMode};
    use crate::rules::nft::model::Chain;
    use crate::rules::nft::plan::plan;
    use crate::rules::nft::plan::tests::base;

    /// Istio's `empty.golden` (tools/istio-nftables/pkg/capture/testdata), verbatim.
    const ISTIO_EMPTY: &str = "\
add table inet istio-proxy-nat
flush table inet istio-proxy-nat
add chain inet istio-proxy-nat output { type nat hook output priority -100 ; }
add chain inet istio-proxy-nat istio-inbound
add chain inet istio-proxy-nat istio-redirect
add chain inet istio-proxy-nat istio-in-redirect
add chain inet istio-proxy-nat istio-output
add rule inet istio-proxy-nat istio-inbound meta l4proto tcp tcp dport 15008 counter return
add rule inet istio-proxy-nat istio-redirect meta l4proto tcp counter redirect to :15001
add rule inet istio-proxy-nat istio-in-redirect meta l4proto tcp counter redirect to :15006
add rule inet istio-proxy-nat output counter jump istio-output
add rule inet istio-proxy-nat istio-output oifname lo ip saddr 127.0.0.6/32 counter return
add rule inet istio-proxy-nat istio-output oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 skuid 1337 counter jump istio-in-redirect
add rule inet istio-proxy-nat istio-output oifname lo skuid != 1337 counter return
add rule inet istio-proxy-nat istio-output skuid 1337 counter return
add rule inet istio-proxy-nat istio-output oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 skgid 1337 counter jump istio-in-redirect
add rule inet istio-proxy-nat istio-output oifname lo skgid != 1337 counter return
add rule inet istio-proxy-nat istio-output skgid 1337 counter return
add rule inet istio-proxy-nat istio-output ip daddr 127.0.0.1/32 counter return
";

    #[test]
    fn fresh_transaction_is_istios_text() {
        let text = render_transaction(&plan(&base()), Some(&ExistingTables::default()));
        assert_eq!(text, ISTIO_EMPTY);
    }

    #[test]
    fn same_chains_again_is_a_plain_flush() {
        let existing = ExistingTables {
            tables: vec![(
                Table::Nat,
                [
                    "output",
                    "istio-inbound",
                    "istio-redirect",
                    "istio-in-redirect",
                    "istio-output",
                ]
                .map(String::from)
                .to_vec(),
            )],
            ..ExistingTables::default()
        };
        let text = render_transaction(&plan(&base()), Some(&existing));
        assert_eq!(text, ISTIO_EMPTY);
    }

    #[test]
    fn a_table_missing_planned_chains_is_rebuilt() {
        let existing = ExistingTables {
            tables: vec![(Table::Nat, vec!["output".to_owned()])],
            ..ExistingTables::default()
        };
        let text = render_transaction(&plan(&base()), Some(&existing));
        assert_eq!(
            text,
            format!(
                "add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\n{ISTIO_EMPTY}"
            )
        );
    }

    #[test]
    fn an_earlier_configurations_chains_and_tables_go() {
        let existing = ExistingTables {
            tables: vec![
                (
                    Table::Nat,
                    vec!["prerouting".to_owned(), "istio-output".to_owned()],
                ),
                (Table::Mangle, vec!["istio-divert".to_owned()]),
            ],
            ..ExistingTables::default()
        };
        let text = render_transaction(&plan(&base()), Some(&existing));
        let expected = format!(
            "add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\n{ISTIO_EMPTY}\
             add table inet istio-proxy-mangle\ndelete table inet istio-proxy-mangle\n"
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn unknown_state_rebuilds_everything() {
        let text = render_transaction(&plan(&base()), None);
        assert!(text.starts_with(
            "add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\nadd table inet istio-proxy-nat\nflush table"
        ));
        assert!(
            text.ends_with("add table inet istio-proxy-raw\ndelete table inet istio-proxy-raw\n")
        );
        assert!(text.contains("delete table inet istio-proxy-mangle\n"));
    }

    #[test]
    fn cleanup_tolerates_missing_tables() {
        assert_eq!(
            render_cleanup(&Table::ALL),
            "add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\n\
             add table inet istio-proxy-mangle\ndelete table inet istio-proxy-mangle\n\
             add table inet istio-proxy-raw\ndelete table inet istio-proxy-raw\n"
        );
    }

    #[test]
    fn base_chains_carry_type_hook_and_priority() {
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::AllExcept(vec![]);
        cfg.dns = DnsCapture::All;
        let text = render_transaction(&plan(&cfg), Some(&ExistingTables::default()));
        for line in [
            "add chain inet istio-proxy-mangle prerouting { type filter hook prerouting priority -150 ; }",
            "add chain inet istio-proxy-mangle output { type route hook output priority -150 ; }",
            "add chain inet istio-proxy-raw prerouting { type filter hook prerouting priority -300 ; }",
            "add chain inet istio-proxy-raw output { type filter hook output priority -300 ; }",
            "add rule inet istio-proxy-mangle istio-tproxy meta l4proto tcp ip daddr != 127.0.0.1/32 tproxy ip to :15006 meta mark set 1337 counter accept",
            "insert rule inet istio-proxy-mangle istio-inbound index 0 meta l4proto tcp mark 1337 counter return",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn names_nft_would_misread_are_quoted() {
        let rule = Rule::new(
            vec![
                Match::InInterface(Interface::new_unchecked("eth+".into())),
                Match::OutInterface(Interface::new_unchecked("veth.1".into())),
                Match::Owner {
                    kind: OwnerKind::Gid,
                    owner: Owner::Name("java".into()),
                    negated: true,
                },
            ],
            vec![Statement::Counter, Statement::Jump(Chain::Redirect)],
        );
        assert_eq!(
            rule_text(&rule),
            "iifname \"eth*\" oifname \"veth.1\" skgid != java counter jump istio-redirect"
        );
    }

    #[test]
    fn plan_output_pipes_into_nft() {
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::AllExcept(vec![]);
        cfg.ipv6 = true;
        let text = render_plan(&plan(&cfg));
        assert!(
            !text.lines().any(|l| l.starts_with("ip ")),
            "routing must be comments:\n{text}"
        );
        assert!(text.contains("#   ip -6 route add local default dev lo table 133\n"));
        assert!(text.contains("#   ip -6 addr add ::6/128 dev lo\n"));
    }
}
