//! Renders the typed ruleset as `iptables-restore` input, the only place rule text is made.
//!
//! Own chains are declared with `:CHAIN - [0:0]`: under `--noflush` that creates a missing
//! chain and flushes an existing one, which is what makes a re-run converge inside one
//! transaction. Built-in chains are shared with other tools and are never declared or
//! flushed; meshinit's rules there are inserted (head) or appended (tail).

use std::fmt::Write as _;

use ipnet::IpNet;

use super::model::{
    BuiltinChain, Chain, CtState, Family, FamilyRuleset, IstioChain, Match, Owner, OwnerKind, Rule,
    Table, Target, OWNER_COMMENT,
};

/// The argument text of one rule (everything after `-A CHAIN`), as iptables reads it.
pub fn rule_spec(rule: &Rule) -> String {
    let mut out = String::with_capacity(64);
    write_rule(&mut out, rule);
    out
}

/// Appends a rule's argument text to `out`. Rendering runs once per rule, 10,000 times for
/// a large exclude list, so it writes pieces directly rather than through `format!`.
fn write_rule(out: &mut String, rule: &Rule) {
    let start = out.len();
    for m in &rule.matches {
        push_match(out, m);
    }
    push_target(out, &rule.target);
    // Every piece starts with a blank; the rule itself does not.
    if out[start..].starts_with(' ') {
        out.remove(start);
    }
}

fn push_num(out: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or("?"));
}

fn push_net(out: &mut String, net: &IpNet) {
    match net {
        IpNet::V4(v4) => {
            for (i, octet) in v4.addr().octets().iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_num(out, u32::from(*octet));
            }
            out.push('/');
            push_num(out, u32::from(v4.prefix_len()));
        }
        IpNet::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn push_flag(out: &mut String, negated: bool, flag: &str) {
    if negated {
        out.push_str(" !");
    }
    out.push(' ');
    out.push_str(flag);
    out.push(' ');
}

fn push_match(out: &mut String, m: &Match) {
    match m {
        Match::InInterface(i) => {
            push_flag(out, false, "-i");
            out.push_str(i.as_str());
        }
        Match::OutInterface(i) => {
            push_flag(out, false, "-o");
            out.push_str(i.as_str());
        }
        Match::Source(net) => {
            push_flag(out, false, "-s");
            push_net(out, net);
        }
        Match::Destination { net, negated } => {
            push_flag(out, *negated, "-d");
            push_net(out, net);
        }
        Match::Protocol(p) => {
            push_flag(out, false, "-p");
            out.push_str(p.name());
        }
        Match::DestinationPort { port, negated } => {
            push_flag(out, *negated, "--dport");
            push_num(out, u32::from(port.first().get()));
            if port.single().is_none() {
                out.push(':');
                push_num(out, u32::from(port.last().get()));
            }
        }
        Match::SourcePort(port) => {
            push_flag(out, false, "--sport");
            push_num(out, u32::from(port.get()));
        }
        Match::DestinationPorts { ports, negated } => {
            out.push_str(" -m multiport");
            push_flag(out, *negated, "--dports");
            for (i, port) in ports.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_num(out, u32::from(port.get()));
            }
        }
        Match::Owner {
            kind,
            owner,
            negated,
        } => {
            out.push_str(" -m owner");
            let flag = match kind {
                OwnerKind::Uid => "--uid-owner",
                OwnerKind::Gid => "--gid-owner",
            };
            push_flag(out, *negated, flag);
            match owner {
                Owner::Id(id) => push_num(out, *id),
                Owner::Name(name) => out.push_str(name),
            }
        }
        Match::ConntrackState(state) => {
            out.push_str(" -m conntrack --ctstate ");
            out.push_str(match state {
                CtState::Invalid => "INVALID",
                CtState::RelatedEstablished => "RELATED,ESTABLISHED",
            });
        }
        Match::Mark { mark, negated } => {
            out.push_str(" -m mark");
            push_flag(out, *negated, "--mark");
            push_num(out, *mark);
        }
        Match::ConnMark(mark) => {
            out.push_str(" -m connmark --mark ");
            push_num(out, *mark);
        }
        Match::InSet(set) => {
            out.push_str(" -m set --match-set ");
            out.push_str(set.name());
            out.push_str(" dst");
        }
        Match::OwnerComment => {
            out.push_str(" -m comment --comment ");
            out.push_str(OWNER_COMMENT);
        }
    }
}

fn push_target(out: &mut String, target: &Target) {
    out.push_str(" -j ");
    match target {
        Target::Jump(chain) => out.push_str(chain.name()),
        Target::Return => out.push_str("RETURN"),
        Target::Accept => out.push_str("ACCEPT"),
        Target::Drop => out.push_str("DROP"),
        Target::Redirect { to_port } => {
            out.push_str("REDIRECT --to-ports ");
            push_num(out, u32::from(to_port.get()));
        }
        Target::Tproxy { mark, on_port } => {
            out.push_str("TPROXY --tproxy-mark ");
            push_num(out, *mark);
            out.push_str("/0xffffffff --on-port ");
            push_num(out, u32::from(on_port.get()));
        }
        Target::SetMark(mark) => {
            out.push_str("MARK --set-mark ");
            push_num(out, *mark);
        }
        Target::ConnMarkSave => out.push_str("CONNMARK --save-mark"),
        Target::ConnMarkRestore => out.push_str("CONNMARK --restore-mark"),
        Target::CtZone(zone) => {
            out.push_str("CT --zone ");
            push_num(out, u32::from(*zone));
        }
    }
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
        self.tables
            .iter()
            .find(|(t, _)| *t == table)
            .map(|(_, e)| e)
    }

    pub fn is_empty(&self) -> bool {
        self.tables
            .iter()
            .all(|(_, e)| e.own_chains.is_empty() && e.builtin_rules.is_empty())
    }
}

/// How much rendered text is handed on at a time: enough to keep a pipe busy, small
/// enough that `iptables-restore` starts parsing while the rest is still being rendered.
const CHUNK: usize = 16 * 1024;

/// `iptables-restore --noflush` input that takes a family from `existing` to `desired` in
/// one transaction: stale rules of ours in built-in chains are deleted, our chains are
/// flushed and refilled, chains no longer planned are removed. With an empty `existing`
/// this is exactly what `print` shows; with an empty `desired` it is the cleanup.
pub fn render_restore(desired: &FamilyRuleset, existing: &ExistingState) -> String {
    let mut text = String::new();
    let _ = render_restore_chunks(desired, existing, &mut |chunk| {
        text.push_str(chunk);
        Ok(())
    });
    text
}

/// `render_restore`, handed to `emit` in pieces of about `CHUNK` bytes as it is made, so
/// a restore process can consume it while the rest is rendered.
pub fn render_restore_chunks(
    desired: &FamilyRuleset,
    existing: &ExistingState,
    emit: &mut dyn FnMut(&str) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut out = String::with_capacity(CHUNK + 4096);
    let mut flush = |out: &mut String, force: bool| -> std::io::Result<()> {
        if force || out.len() >= CHUNK {
            emit(out)?;
            out.clear();
        }
        Ok(())
    };
    for table in commit_order(desired, existing) {
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
                render_chain_rules(&mut out, chain.chain, &chain.head, &chain.rules, &mut flush)?;
            }
        }
        let _ = writeln!(out, "COMMIT");
    }
    flush(&mut out, true)
}

/// The table whose rules capture inbound connections: mangle under TPROXY (its
/// ISTIO_TPROXY chain), nat under REDIRECT (PREROUTING jumping to ISTIO_INBOUND there).
fn inbound_capture_table(state: &ExistingState) -> Option<Table> {
    let tproxy = IstioChain::Tproxy.name();
    let inbound = format!("-j {}", IstioChain::Inbound.name());
    if state
        .table(Table::Mangle)
        .is_some_and(|t| t.own_chains.iter().any(|c| c == tproxy))
    {
        return Some(Table::Mangle);
    }
    state
        .table(Table::Nat)
        .is_some_and(|t| {
            t.builtin_rules
                .iter()
                .any(|(chain, spec)| chain == "PREROUTING" && spec.ends_with(&inbound))
        })
        .then_some(Table::Nat)
}

/// The order in which a restore taking `from` to `to` writes (and so commits) tables.
///
/// `iptables-restore` commits each table on its own, in input order, so while it runs, and
/// forever if it is killed, the namespace holds the new configuration in the first tables
/// and the old one in the rest. Inbound capture is the one thing that can move between
/// tables (nat under REDIRECT, mangle under TPROXY): the table that captures under `to`
/// goes first, so a connection both configurations capture is captured at every step
/// (by both, briefly, which still reaches the sidecar's inbound port), never by neither.
/// Otherwise Istio's order (by name), which is what `print` shows.
fn table_order(to: Option<Table>, from: Option<Table>) -> Vec<Table> {
    let mut order = Table::ALL.to_vec();
    if let (Some(gaining), Some(losing)) = (to, from) {
        if gaining != losing {
            order.retain(|t| *t != gaining);
            order.insert(0, gaining);
        }
    }
    order
}

/// [`table_order`] for a restore from `existing` to `desired`.
pub fn commit_order(desired: &FamilyRuleset, existing: &ExistingState) -> Vec<Table> {
    if existing.is_empty() {
        return Table::ALL.to_vec();
    }
    table_order(
        inbound_capture_table(&ExistingState::from_planned(desired)),
        inbound_capture_table(existing),
    )
}

fn render_chain_rules(
    out: &mut String,
    chain: Chain,
    head: &[Rule],
    rules: &[Rule],
    flush: &mut dyn FnMut(&mut String, bool) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for (index, rule) in head.iter().enumerate() {
        out.push_str("-I ");
        out.push_str(chain.name());
        out.push(' ');
        push_num(out, u32::try_from(index + 1).unwrap_or(u32::MAX));
        out.push(' ');
        write_rule(out, rule);
        out.push('\n');
        flush(out, false)?;
    }
    for rule in rules {
        out.push_str("-A ");
        out.push_str(chain.name());
        out.push(' ');
        write_rule(out, rule);
        out.push('\n');
        flush(out, false)?;
    }
    Ok(())
}

/// The restore input for a fresh namespace: what `print` shows and a bare
/// `iptables-restore` can load.
pub fn render_fresh(desired: &FamilyRuleset) -> String {
    render_restore(desired, &ExistingState::default())
}

impl ExistingState {
    /// What `desired` leaves in the kernel once applied: used to undo an apply that must be
    /// rolled back when nothing of ours was there before.
    pub fn from_planned(desired: &FamilyRuleset) -> ExistingState {
        let tables = desired
            .tables
            .iter()
            .map(|t| {
                let own_chains = t.own_chains().map(|c| c.name().to_owned()).collect();
                let builtin_rules = t
                    .chains
                    .iter()
                    .filter(|c| matches!(c.chain, Chain::Builtin(_)))
                    .flat_map(|c| {
                        c.all_rules()
                            .map(move |r| (c.chain.name().to_owned(), rule_spec(r)))
                    })
                    .collect();
                (
                    t.table,
                    ExistingTable {
                        own_chains,
                        builtin_rules,
                    },
                )
            })
            .collect();
        ExistingState { tables }
    }
}

/// Reads `iptables-save` output and keeps what belongs to meshinit: its chains (by Istio's
/// names) and, in built-in chains, rules that jump to them or carry the owner comment.
pub fn parse_existing(save: &str) -> ExistingState {
    let mut state = ExistingState::default();
    let mut current: Option<usize> = None;
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            current = Table::from_name(name.trim()).map(|table| {
                state.tables.push((table, ExistingTable::default()));
                state.tables.len() - 1
            });
            continue;
        }
        let Some(index) = current else { continue };
        let entry = &mut state.tables[index].1;
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if IstioChain::from_name(name).is_some() {
                entry.own_chains.push(name.to_owned());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            let builtin = BuiltinChain::ALL.iter().any(|b| b.name() == chain);
            if builtin && is_ours(spec) {
                entry
                    .builtin_rules
                    .push((chain.to_owned(), spec.to_owned()));
            }
        }
    }
    state.tables.retain(|(_, t)| t != &ExistingTable::default());
    state
}

/// Whether a rule of a built-in chain (its spec as a save prints it) is meshinit's: it
/// jumps to one of Istio's chains or carries meshinit's comment.
pub fn is_ours(spec: &str) -> bool {
    let words: Vec<&str> = spec.split_whitespace().collect();
    let jumps_to_own = words
        .windows(2)
        .any(|w| matches!(w[0], "-j" | "-g") && IstioChain::from_name(w[1]).is_some());
    let tagged = words
        .windows(2)
        .any(|w| w[0] == "--comment" && w[1].trim_matches('"') == OWNER_COMMENT);
    jumps_to_own || tagged
}

/// Tables of a save that hold nothing but meshinit's rules and chains: empty once cleanup
/// has run, so they can go too, leaving the namespace as it was before meshinit.
pub fn tables_holding_only_ours(save: &str) -> Vec<Table> {
    let mut result = Vec::new();
    let mut current: Option<(Table, bool)> = None;
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            current = Table::from_name(name.trim()).map(|t| (t, true));
        } else if line == "COMMIT" {
            if let Some((table, true)) = current.take() {
                result.push(table);
            }
        } else if let Some((_, only_ours)) = current.as_mut() {
            let foreign = if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or("");
                let policy = decl.split_whitespace().nth(1).unwrap_or("");
                let builtin = BuiltinChain::ALL.iter().any(|b| b.name() == name);
                (builtin && policy != "ACCEPT")
                    || (!builtin && IstioChain::from_name(name).is_none())
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                IstioChain::from_name(chain).is_none() && !is_ours(spec)
            } else {
                false
            };
            if foreign {
                *only_ours = false;
            }
        }
    }
    result
}

/// The tables a save lists.
pub fn tables_in_save(save: &str) -> Vec<Table> {
    save.lines()
        .filter_map(|line| line.strip_prefix('*'))
        .filter_map(|name| Table::from_name(name.trim()))
        .collect()
}

/// Restore input that undoes an apply: tables that existed before (`previous`, a save taken
/// before the apply) get exactly their saved content back (`-F`/`-X`, then the saved chains
/// and rules); in any other table, the rules and chains of meshinit's that are there now
/// (`ours_now`) are removed. Tables are committed in [`table_order`], going back.
pub fn render_rollback(family: Family, ours_now: &ExistingState, previous: Option<&str>) -> String {
    let mut sections: Vec<(Table, String)> = Vec::new();
    if let Some(previous) = previous {
        for line in previous.lines() {
            if line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                if let Some(table) = Table::from_name(name.trim()) {
                    sections.push((table, format!("{line}\n-F\n-X\n")));
                }
                continue;
            }
            if let Some((_, section)) = sections
                .last_mut()
                .filter(|(_, s)| !s.ends_with("COMMIT\n"))
            {
                section.push_str(line);
                section.push('\n');
            }
        }
    }
    let order = table_order(
        previous.and_then(|save| inbound_capture_table(&parse_existing(save))),
        inbound_capture_table(ours_now),
    );
    sections.sort_by_key(|(table, _)| order.iter().position(|t| t == table));
    let mut out: String = sections
        .iter()
        .map(|(_, section)| section.as_str())
        .collect();
    let mut ours = ours_now.clone();
    ours.tables
        .retain(|(table, _)| !sections.iter().any(|(saved, _)| saved == table));
    let empty = FamilyRuleset {
        family,
        tables: Vec::new(),
    };
    out.push_str(&render_restore(&empty, &ours));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:OTHER - [0:0]\n-A PREROUTING -i eth9 -m comment --comment meshinit -j RETURN\n-A PREROUTING -i eth9 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j OTHER\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n";

    #[test]
    fn numbers_and_addresses_render_like_display() {
        for n in [0u32, 7, 10, 15001, 4294967295] {
            let mut out = String::new();
            push_num(&mut out, n);
            assert_eq!(out, n.to_string());
        }
        for net in [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "255.255.255.255/32",
            "2001:db8::/32",
            "::7f00:35/128",
        ] {
            let net: IpNet = net.parse().unwrap();
            let mut out = String::new();
            push_net(&mut out, &net);
            assert_eq!(out, net.to_string());
        }
    }

    #[test]
    fn existing_state_keeps_only_ours() {
        let state = parse_existing(SAVE);
        assert_eq!(state.tables.len(), 1, "filter holds nothing of ours");
        let nat = state.table(Table::Nat).unwrap();
        assert_eq!(nat.own_chains, ["ISTIO_OUTPUT"]);
        assert_eq!(
            nat.builtin_rules,
            [
                (
                    "PREROUTING".to_owned(),
                    "-i eth9 -m comment --comment meshinit -j RETURN".to_owned()
                ),
                ("OUTPUT".to_owned(), "-j ISTIO_OUTPUT".to_owned()),
            ]
        );
    }

    #[test]
    fn cleanup_restore_deletes_rules_then_chains() {
        let empty = FamilyRuleset {
            family: Family::V4,
            tables: vec![],
        };
        let text = render_restore(&empty, &parse_existing(SAVE));
        assert_eq!(
            text,
            "*nat\n:ISTIO_OUTPUT - [0:0]\n-D PREROUTING -i eth9 -m comment --comment meshinit -j RETURN\n-D OUTPUT -j ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"
        );
    }

    #[test]
    fn only_our_tables_are_found() {
        assert!(
            tables_holding_only_ours(SAVE).is_empty(),
            "nat has OTHER, filter a rule"
        );
        let ours = "*mangle\n:PREROUTING ACCEPT [0:0]\n:ISTIO_DIVERT - [0:0]\n-A PREROUTING -p tcp -j ISTIO_DIVERT\nCOMMIT\n*raw\n:OUTPUT DROP [0:0]\nCOMMIT\n";
        assert_eq!(tables_holding_only_ours(ours), [Table::Mangle]);
    }

    #[test]
    fn rollback_restores_saved_tables_and_cleans_new_ones() {
        let applied = crate::rules::iptables::plan::plan(
            &crate::rules::iptables::plan::tests::tproxy_config(),
        );
        let ours = ExistingState::from_planned(&applied.v4);
        let text = render_rollback(Family::V4, &ours, Some(SAVE));
        assert!(
            text.contains("*nat\n-F\n-X\n:PREROUTING ACCEPT [0:0]\n"),
            "{text}"
        );
        // Saved tables in table order, then the tables that did not exist before.
        assert_eq!(tables_written(&text), ["filter", "nat", "mangle"], "{text}");
        assert!(text.contains("*filter\n-F\n-X\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n"));
        let mangle = &text[text.find("*mangle").expect("mangle cleaned")..];
        assert!(
            mangle.contains("-X ISTIO_TPROXY") && !mangle.contains("-F\n"),
            "{mangle}"
        );
        assert_eq!(tables_in_save(SAVE), [Table::Nat, Table::Filter]);
    }

    /// The order of `*table` sections in restore input.
    fn tables_written(input: &str) -> Vec<&str> {
        input.lines().filter_map(|l| l.strip_prefix('*')).collect()
    }

    fn redirect_all() -> crate::config::CaptureConfig {
        let mut cfg = crate::rules::iptables::plan::tests::tproxy_config();
        cfg.interception = crate::config::InterceptionMode::Redirect;
        cfg
    }

    fn v4(cfg: &crate::config::CaptureConfig) -> FamilyRuleset {
        crate::rules::iptables::plan::plan(cfg).v4
    }

    #[test]
    fn inbound_capture_moves_to_its_new_table_before_leaving_the_old() {
        let tproxy = v4(&crate::rules::iptables::plan::tests::tproxy_config());
        let redirect = v4(&redirect_all());
        let was_tproxy = ExistingState::from_planned(&tproxy);
        let was_redirect = ExistingState::from_planned(&redirect);
        // Fresh, and re-runs of the same mode: Istio's order.
        assert_eq!(tables_written(&render_fresh(&tproxy)), ["mangle", "nat"]);
        assert_eq!(
            tables_written(&render_restore(&redirect, &was_redirect)),
            ["nat"]
        );
        // TPROXY → REDIRECT: nat's REDIRECT is in before mangle's TPROXY goes.
        assert_eq!(
            tables_written(&render_restore(&redirect, &was_tproxy)),
            ["nat", "mangle"]
        );
        // REDIRECT → TPROXY: mangle's TPROXY is in before nat's REDIRECT goes.
        assert_eq!(
            tables_written(&render_restore(&tproxy, &was_redirect)),
            ["mangle", "nat"]
        );
    }

    #[test]
    fn a_rollback_puts_the_old_capture_back_first() {
        let tproxy = v4(&crate::rules::iptables::plan::tests::tproxy_config());
        let redirect = v4(&redirect_all());
        // What iptables-save would list for each (tables by name, as legacy lists them).
        let save_of = |rules: &FamilyRuleset| render_fresh(rules);
        let back_to_tproxy = render_rollback(
            Family::V4,
            &ExistingState::from_planned(&redirect),
            Some(&save_of(&tproxy)),
        );
        assert_eq!(tables_written(&back_to_tproxy), ["mangle", "nat"]);
        let back_to_redirect = render_rollback(
            Family::V4,
            &ExistingState::from_planned(&tproxy),
            Some(&save_of(&redirect)),
        );
        // nat (the saved REDIRECT) first, then mangle, which did not exist before: emptied.
        assert_eq!(tables_written(&back_to_redirect), ["nat", "mangle"]);
        assert!(back_to_redirect.contains("-X ISTIO_TPROXY"));
    }
}
