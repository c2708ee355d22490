//! Snapshots of what a namespace holds (both iptables backends, both families, and the
//! TPROXY routing and `::6` address meshinit may add), normalised so that two snapshots
//! compare equal exactly when the rules and routing are the same.

use std::process::Command;
use std::time::Duration;

use super::netns::NetNs;
use super::run_bounded;

const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The table meshinit's TPROXY routing uses (Istio's default `-t 133`).
pub const TPROXY_TABLE: &str = "133";

/// How meshinit tags its routing rules and routes.
pub const ROUTING_TAG: &str = "proto 224";

/// An iptables backend, as `--force-iptables-binary` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::Nft];

    /// The `--force-iptables-binary` value.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    /// `iptables-legacy`, `ip6tables-nft`, …: the command for one family.
    pub fn tool(self, ipv6: bool) -> String {
        let base = if ipv6 { "ip6tables" } else { "iptables" };
        format!("{base}-{}", self.name())
    }

    /// The `*-save` program for one family; also the name of its section in a [`State`].
    pub fn save(self, ipv6: bool) -> String {
        format!("{}-save", self.tool(ipv6))
    }
}

/// Routing sections of a [`State`]: (name, `ip` arguments).
const ROUTING: [(&str, &[&str]); 5] = [
    ("ip -4 rule", &["-4", "rule", "show"]),
    ("ip -6 rule", &["-6", "rule", "show"]),
    (
        "ip -4 route show table 133",
        &["-4", "route", "show", "table", TPROXY_TABLE],
    ),
    (
        "ip -6 route show table 133",
        &["-6", "route", "show", "table", TPROXY_TABLE],
    ),
    (
        "ip -6 addr show dev lo",
        &["-6", "addr", "show", "dev", "lo"],
    ),
];

/// The section of a [`State`] holding the namespace's native nftables tables.
pub const NFT: &str = "nft -s list ruleset (inet tables)";

/// The `inet` tables of a ruleset listing (Istio's native nftables tables; iptables-nft's
/// `ip`/`ip6` tables are compared through their saves), in name order.
fn inet_tables(ruleset: &str) -> String {
    let mut tables: Vec<String> = Vec::new();
    for line in ruleset.lines() {
        if line.starts_with("table ") {
            tables.push(String::new());
        }
        if let Some(table) = tables.last_mut() {
            table.push_str(line);
            table.push('\n');
        }
    }
    tables.retain(|t| t.starts_with("table inet "));
    tables.sort();
    tables.concat()
}

/// The section of a [`State`] holding the namespace's ipsets.
pub const IPSETS: &str = "ipset save";

/// `ipset save`, its lines sorted (a hash set lists its members in no fixed order). The
/// `ipset` tool is only the tests' independent reader: meshinit programs sets over netlink.
fn ipsets(ns: &NetNs) -> String {
    if which::which("ipset").is_err() {
        super::skip(
            "comparing ipsets",
            "needs the ipset tool (scripts/test.sh installs it)",
        );
        return "(ipset not installed: sets not compared)\n".to_owned();
    }
    let saved = ns.run(&["ipset", "save"]);
    let mut lines: Vec<&str> = saved.lines().collect();
    lines.sort_unstable();
    lines.iter().map(|line| format!("{line}\n")).collect()
}

/// One snapshot: named sections of text, each normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    sections: Vec<(String, String)>,
}

impl State {
    /// Every `*-save` of both backends and families (normalised with [`normalise_save`]),
    /// then the routing sections, the ipsets and the nftables ruleset.
    pub fn capture(ns: &NetNs) -> State {
        let mut sections = Vec::new();
        for backend in Backend::ALL {
            for ipv6 in [false, true] {
                let program = backend.save(ipv6);
                let saved = ns.run(&[&program]);
                sections.push((program, normalise_save(&saved)));
            }
        }
        for (name, args) in ROUTING {
            sections.push((name.to_owned(), ip_show(ns, args)));
        }
        sections.push((IPSETS.to_owned(), ipsets(ns)));
        sections.push((
            NFT.to_owned(),
            inet_tables(&ns.run(&["nft", "-s", "list", "ruleset"])),
        ));
        State { sections }
    }

    /// The text of section `name` (a save program's name or a routing command).
    pub fn section(&self, name: &str) -> &str {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, text)| text.as_str())
            .unwrap_or_else(|| panic!("no section {name:?} in a state snapshot"))
    }

    /// The same state with `backend`'s tables that hold nothing (built-in chains with
    /// ACCEPT policies, no rules, no other chain) left out, for both families.
    pub fn without_empty_tables(&self, backend: Backend) -> State {
        let saves = [backend.save(false), backend.save(true)];
        State {
            sections: self
                .sections
                .iter()
                .map(|(name, text)| {
                    let text = if saves.contains(name) {
                        drop_empty_tables(text)
                    } else {
                        text.clone()
                    };
                    (name.clone(), text)
                })
                .collect(),
        }
    }

    /// Lines of any section containing `needle`, as `section: line`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.sections
            .iter()
            .flat_map(|(name, text)| {
                text.lines()
                    .filter(|line| line.contains(needle))
                    .map(move |line| format!("{name}: {line}"))
            })
            .collect()
    }
}

/// Panics, showing each section that differs (expected, then got), unless equal.
pub fn assert_same_state(what: &str, expected: &State, got: &State) {
    if expected == got {
        return;
    }
    let mut report = String::new();
    for (name, want) in &expected.sections {
        let have = got
            .sections
            .iter()
            .find(|(n, _)| n == name)
            .map_or("(section missing)", |(_, text)| text.as_str());
        if want != have {
            report.push_str(&format!(
                "── {name}: expected\n{}── {name}: got\n{}\n",
                shown(want),
                shown(have)
            ));
        }
    }
    for (name, _) in &got.sections {
        if !expected.sections.iter().any(|(n, _)| n == name) {
            report.push_str(&format!("── {name}: not expected at all\n"));
        }
    }
    panic!("{what}: state differs\n{report}");
}

fn shown(text: &str) -> &str {
    if text.is_empty() {
        "(empty)\n"
    } else {
        text
    }
}

/// `ip -n NS ARGS`; a table that does not exist yet reads as empty.
fn ip_show(ns: &NetNs, args: &[&str]) -> String {
    let output = run_bounded(
        Command::new("ip").args(["-n", ns.name()]).args(args),
        COMMAND_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        // An address is "tentative" for a moment after it is added, while the kernel runs
        // duplicate address detection: a timing, not a difference in what meshinit set up.
        stdout.replace(" tentative", "")
    } else if stderr.contains("table does not exist") {
        String::new()
    } else {
        panic!(
            "ip -n {} {args:?} failed ({}): {stderr}",
            ns.name(),
            output.status
        );
    }
}

const BUILTIN_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// One table of a save: its name, chain declarations, rules.
struct SavedTable {
    name: String,
    chains: Vec<String>,
    rules: Vec<String>,
}

fn parse_save(save: &str) -> Vec<SavedTable> {
    let mut tables: Vec<SavedTable> = Vec::new();
    for line in save.lines().map(str::trim_end) {
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            tables.push(SavedTable {
                name: name.to_owned(),
                chains: Vec::new(),
                rules: Vec::new(),
            });
            continue;
        }
        let table = tables
            .last_mut()
            .unwrap_or_else(|| panic!("save line outside a table: {line:?}\n{save}"));
        let line = zero_counters(line);
        if line.starts_with(':') {
            table.chains.push(line);
        } else {
            table.rules.push(line);
        }
    }
    tables
}

fn render_save(tables: &[SavedTable]) -> String {
    let mut out = String::new();
    for table in tables {
        out.push_str(&format!("*{}\n", table.name));
        for line in table.chains.iter().chain(&table.rules) {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// An `iptables-save` output in a canonical form that keeps its meaning: no comment lines
/// (they carry dates), packet:byte counters zeroed, tables sorted by name, chain
/// declarations sorted, and rules grouped by chain in chain-name order (a chain's own rules
/// keep their order, which is what matters). The backends list tables and chains in
/// creation order, which differs between namespaces with different histories.
pub fn normalise_save(save: &str) -> String {
    let mut tables = parse_save(save);
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    for table in &mut tables {
        table.chains.sort();
        // Stable: rules of one chain stay in order.
        table.rules.sort_by_key(|rule| rule_chain(rule).to_owned());
    }
    render_save(&tables)
}

/// The chain of an `-A CHAIN …` line.
fn rule_chain(rule: &str) -> &str {
    let mut words = rule.split_whitespace();
    words.find(|w| *w == "-A");
    words.next().unwrap_or("")
}

/// Leaves out tables that hold nothing: no rules, and only built-in chains, each ACCEPT.
pub fn drop_empty_tables(save: &str) -> String {
    let mut tables = parse_save(save);
    tables.retain(|table| {
        let empty = table.rules.is_empty()
            && table.chains.iter().all(|decl| {
                let mut words = decl.trim_start_matches(':').split_whitespace();
                let name = words.next().unwrap_or("");
                BUILTIN_CHAINS.contains(&name) && words.next() == Some("ACCEPT")
            });
        !empty
    });
    render_save(&tables)
}

/// Replaces every `[packets:bytes]` with `[0:0]`.
fn zero_counters(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find('[') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let counter = after.find(']').and_then(|end| {
            let (packets, bytes) = after[..end].split_once(':')?;
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            (digits(packets) && digits(bytes)).then_some(end)
        });
        match counter {
            Some(end) => {
                out.push_str("[0:0]");
                rest = &after[end + 1..];
            }
            None => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "# Generated by iptables-save v1.8.9 on a date\n\
        *nat\n:PREROUTING ACCEPT [3:180]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n\
        :ISTIO_INBOUND - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -d 192.0.2.1/32 -j RETURN\n\
        -A ISTIO_INBOUND -j RETURN\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n# Completed\n\
        *raw\n:PREROUTING ACCEPT [12:34]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n\
        *mangle\n:PREROUTING DROP [0:0]\nCOMMIT\n";

    #[test]
    fn normalises_order_counters_and_comments() {
        assert_eq!(
            normalise_save(SAVE),
            "*mangle\n:PREROUTING DROP [0:0]\nCOMMIT\n\
             *nat\n:ISTIO_INBOUND - [0:0]\n:ISTIO_OUTPUT - [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             :PREROUTING ACCEPT [0:0]\n-A ISTIO_INBOUND -j RETURN\n\
             -A ISTIO_OUTPUT -d 192.0.2.1/32 -j RETURN\n-A ISTIO_OUTPUT -j RETURN\n\
             -A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n\
             *raw\n:OUTPUT ACCEPT [0:0]\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
        );
    }

    #[test]
    fn drops_only_tables_that_hold_nothing() {
        let kept = drop_empty_tables(&normalise_save(SAVE));
        assert!(kept.contains("*nat") && kept.contains("*mangle"), "{kept}");
        assert!(!kept.contains("*raw"), "{kept}");
    }

    #[test]
    fn zeroes_only_counters() {
        assert_eq!(
            zero_counters(":X ACCEPT [12:3400] -m [a:b] [1:]"),
            ":X ACCEPT [0:0] -m [a:b] [1:]"
        );
    }
}
