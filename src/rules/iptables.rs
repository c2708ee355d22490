//! Renders the typed ruleset as `iptables-restore` input, the only place rule text is made.
//!
//! Own chains are declared with `:CHAIN - [0:0]`: under `--noflush` that creates a missing
//! chain and flushes an existing one, which is what makes a re-run converge inside one
//! transaction. Built-in chains are shared with other tools and are never declared or
//! flushed; meshinit's rules there are inserted (head) or appended (tail).

use std::fmt::Write as _;

use super::model::{
    Chain, CtState, FamilyRuleset, Match, OwnerKind, Rule, Table, Target, OWNER_COMMENT,
};

/// The argument text of one rule (everything after `-A CHAIN`), as iptables reads it.
pub fn rule_spec(rule: &Rule) -> String {
    let mut out = String::new();
    for m in &rule.matches {
        push_match(&mut out, m);
    }
    push_target(&mut out, &rule.target);
    out.trim_start().to_owned()
}

fn neg(negated: bool) -> &'static str {
    if negated {
        " !"
    } else {
        ""
    }
}

fn push_match(out: &mut String, m: &Match) {
    // `write!` to a String cannot fail.
    let _ = match m {
        Match::InInterface(i) => write!(out, " -i {i}"),
        Match::OutInterface(i) => write!(out, " -o {i}"),
        Match::Source(net) => write!(out, " -s {net}"),
        Match::Destination { net, negated } => write!(out, "{} -d {net}", neg(*negated)),
        Match::Protocol(p) => write!(out, " -p {}", p.name()),
        Match::DestinationPort { port, negated } => write!(out, "{} --dport {port}", neg(*negated)),
        Match::SourcePort(port) => write!(out, " --sport {port}"),
        Match::DestinationPorts { ports, negated } => {
            let list: Vec<String> = ports.iter().map(ToString::to_string).collect();
            write!(out, " -m multiport{} --dports {}", neg(*negated), list.join(","))
        }
        Match::Owner {
            kind,
            owner,
            negated,
        } => {
            let flag = match kind {
                OwnerKind::Uid => "--uid-owner",
                OwnerKind::Gid => "--gid-owner",
            };
            write!(out, " -m owner{} {flag} {owner}", neg(*negated))
        }
        Match::ConntrackState(state) => {
            let state = match state {
                CtState::Invalid => "INVALID",
                CtState::RelatedEstablished => "RELATED,ESTABLISHED",
            };
            write!(out, " -m conntrack --ctstate {state}")
        }
        Match::Mark { mark, negated } => write!(out, " -m mark{} --mark {mark}", neg(*negated)),
        Match::ConnMark(mark) => write!(out, " -m connmark --mark {mark}"),
        Match::OwnerComment => write!(out, " -m comment --comment {OWNER_COMMENT}"),
    };
}

fn push_target(out: &mut String, target: &Target) {
    let _ = match target {
        Target::Jump(chain) => write!(out, " -j {}", chain.name()),
        Target::Return => write!(out, " -j RETURN"),
        Target::Accept => write!(out, " -j ACCEPT"),
        Target::Drop => write!(out, " -j DROP"),
        Target::Redirect { to_port } => write!(out, " -j REDIRECT --to-ports {to_port}"),
        Target::Tproxy { mark, on_port } => write!(
            out,
            " -j TPROXY --tproxy-mark {mark}/0xffffffff --on-port {on_port}"
        ),
        Target::SetMark(mark) => write!(out, " -j MARK --set-mark {mark}"),
        Target::ConnMarkSave => write!(out, " -j CONNMARK --save-mark"),
        Target::ConnMarkRestore => write!(out, " -j CONNMARK --restore-mark"),
        Target::CtZone(zone) => write!(out, " -j CT --zone {zone}"),
    };
}

/// What is already in a table that the restore must take into account: meshinit's chains
/// and meshinit's rules in built-in chains, as `iptables-save` printed them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExistingTable {
    /// Names of meshinit-owned chains present (they get flushed, or deleted if unplanned).
    pub own_chains: Vec<String>,
    /// (built-in chain, rule spec as `iptables-save` prints it) for each rule of ours there.
    pub builtin_rules: Vec<(String, String)>,
}

/// The part of a family's current state that belongs to meshinit, per table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExistingState {
    pub tables: Vec<(Table, ExistingTable)>,
}

impl ExistingState {
    pub fn table(&self, table: Table) -> Option<&ExistingTable> {
        self.tables.iter().find(|(t, _)| *t == table).map(|(_, e)| e)
    }

    pub fn is_empty(&self) -> bool {
        self.tables
            .iter()
            .all(|(_, e)| e.own_chains.is_empty() && e.builtin_rules.is_empty())
    }
}

/// `iptables-restore --noflush` input that takes a family from `existing` to `desired` in
/// one transaction: stale rules of ours in built-in chains are deleted, our chains are
/// flushed and refilled, chains no longer planned are removed. With an empty `existing`
/// this is exactly what `print` shows; with an empty `desired` it is the cleanup.
pub fn render_restore(desired: &FamilyRuleset, existing: &ExistingState) -> String {
    let mut out = String::new();
    for table in Table::ALL {
        let planned = desired.table(table);
        let present = existing.table(table);
        if planned.is_none() && present.is_none_or(|p| p == &ExistingTable::default()) {
            continue;
        }
        let _ = writeln!(out, "*{}", table.name());
        let planned_own: Vec<&str> = planned
            .map(|t| t.own_chains().map(|c| c.name()).collect())
            .unwrap_or_default();
        for chain in &planned_own {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        let stale_own: Vec<&String> = present
            .map(|p| {
                p.own_chains
                    .iter()
                    .filter(|c| !planned_own.contains(&c.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        // Flush chains that are going away so nothing references what is deleted below.
        for chain in &stale_own {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        if let Some(present) = present {
            for (chain, spec) in &present.builtin_rules {
                let _ = writeln!(out, "-D {chain} {spec}");
            }
        }
        for chain in &stale_own {
            let _ = writeln!(out, "-X {chain}");
        }
        if let Some(planned) = planned {
            for chain in &planned.chains {
                render_chain_rules(&mut out, chain.chain, &chain.head, &chain.rules);
            }
        }
        let _ = writeln!(out, "COMMIT");
    }
    out
}

fn render_chain_rules(out: &mut String, chain: Chain, head: &[Rule], rules: &[Rule]) {
    for (index, rule) in head.iter().enumerate() {
        let _ = writeln!(out, "-I {} {} {}", chain.name(), index + 1, rule_spec(rule));
    }
    for rule in rules {
        let _ = writeln!(out, "-A {} {}", chain.name(), rule_spec(rule));
    }
}

/// The restore input for a fresh namespace: what `print` shows and a bare
/// `iptables-restore` can load.
pub fn render_fresh(desired: &FamilyRuleset) -> String {
    render_restore(desired, &ExistingState::default())
}
