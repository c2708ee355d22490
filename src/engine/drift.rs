//! Drift: a namespace's capture state, compared whole with what installing the plan would
//! leave now (CNI CHECK asks it).
//!
//! Rule text is compared only after the kernel (through the same tools ADD uses) has
//! written both sides: the plan is applied, with the pod's backend, in a scratch network
//! namespace that only this check sees, and read back the way the pod is read. Two outputs
//! of one `iptables-save` (or `nft list`) agree exactly when the rules do, whatever
//! canonical form the tool prints (`-m tcp`, `/32`, `dport 15001`), so no rule text is
//! rewritten here. Routing is typed data and is compared as such, over netlink.
//!
//! Only what belongs to meshinit counts: Istio's chains, the rules in built-in chains that
//! jump to them or carry meshinit's comment, Istio's nftables tables, and routing tagged
//! with meshinit's protocol. Other tools' rules are not drift.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::apply::iptables::{Backend, IptablesTools};
use crate::apply::nft::{find_nft, NftTool};
use crate::apply::{
    ApplyError, Netfilter as _, NetlinkIpSets, Routing, RoutingChanges, RoutingPlan,
};
use crate::config::{Config, ForcedBackend};
use crate::netlink::{NlFamily, Socket};
use crate::rules::iptables::model::{Family, IstioChain, Table, IPV6_PASSTHROUGH};
use crate::rules::iptables::render::is_ours;

/// Why the drift could not be measured: what was being done, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct DriftError {
    pub what: String,
    pub detail: String,
}

fn failed(what: &str, err: impl std::fmt::Display) -> DriftError {
    DriftError {
        what: what.to_owned(),
        detail: err.to_string(),
    }
}

/// Runs `work` on a thread of its own in a new, empty network namespace, which disappears
/// with the thread. Processes the thread starts (`iptables-restore`, `nft`) and sockets it
/// opens live there too; the rest of the plugin stays in the pod's namespace.
fn in_scratch_namespace<T: Send>(
    work: impl FnOnce() -> Result<T, DriftError> + Send,
) -> Result<T, DriftError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|errno| {
                    failed(
                        "cannot create a scratch network namespace to plan the check in",
                        errno,
                    )
                })?;
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(failed("the check's scratch namespace thread panicked", "")))
    })
}

/// Routing is compared separately, so the scratch apply leaves it alone.
struct NoRouting;

impl Routing for NoRouting {
    fn ensure(&mut self, _: &RoutingPlan) -> Result<RoutingChanges, ApplyError> {
        Ok(RoutingChanges::default())
    }
    fn undo(&mut self, _: &RoutingChanges) -> Result<(), ApplyError> {
        Ok(())
    }
    fn remove_stale(&mut self, _: &RoutingPlan) -> Result<usize, ApplyError> {
        Ok(0)
    }
    fn remove_all(&mut self) -> Result<usize, ApplyError> {
        Ok(0)
    }
}

// ---- iptables ---------------------------------------------------------------------------

/// [`super::Engine::drift`] for iptables: both families' saves, and routing.
pub(super) fn iptables_drift(config: &Config) -> Result<Vec<String>, DriftError> {
    let mut sets = NetlinkIpSets::default();
    let ruleset = crate::engine::kernel_plan(config, &mut sets);
    let families: Vec<Family> = ruleset.families().map(|f| f.family).collect();
    let wait = config.run.xtables_wait;
    let mut tools = IptablesTools::detect(config.run.force_backend, &families, wait)
        .map_err(|e| failed("no iptables to read the pod's rules with", e))?;
    let mut present = Vec::new();
    for &family in &families {
        let save = tools
            .save(family)
            .map_err(|e| failed("reading the pod's rules failed", e))?;
        present.push(save);
    }
    // The same backend as the pod's, so both sides are printed by the same tool. Plain
    // `iptables` has no forced form; detection there finds it again.
    let forced = match tools.backend() {
        Backend::Legacy => Some(ForcedBackend::Legacy),
        Backend::Nft => Some(ForcedBackend::Nft),
        Backend::Plain => None,
    };
    let planned = in_scratch_namespace(|| {
        let mut scratch = IptablesTools::detect(forced, &families, wait)
            .map_err(|e| failed("no iptables to plan the check with", e))?;
        crate::apply::iptables::apply(
            &mut scratch,
            &mut NoRouting,
            &mut NetlinkIpSets::default(),
            &ruleset,
        )
        .map_err(|e| failed("applying the plan in a scratch namespace failed", e))?;
        families
            .iter()
            .map(|&family| {
                scratch
                    .save(family)
                    .map_err(|e| failed("reading the planned rules back failed", e))
            })
            .collect::<Result<Vec<String>, DriftError>>()
    })?;
    let mut drift = Vec::new();
    for ((family, planned), present) in families.iter().zip(&planned).zip(&present) {
        drift.extend(compare_iptables(*family, planned, present));
    }
    let plan = RoutingPlan {
        ipv6_passthrough_address: ruleset.ipv6_passthrough_address,
        tproxy: ruleset.tproxy_routing.map(|r| (r.mark, r.table)),
        ipv6: ruleset.v6.is_some(),
    };
    drift.extend(routing_drift(&plan)?);
    Ok(drift)
}

/// meshinit's part of one table of a save: Istio's chains with all their rules, and, per
/// built-in chain, the rules of meshinit's there, each in save order.
#[derive(Debug, Default, PartialEq, Eq)]
struct TableParts {
    own: BTreeMap<String, Vec<String>>,
    builtin: BTreeMap<String, Vec<String>>,
}

fn iptables_parts(save: &str) -> BTreeMap<String, TableParts> {
    let mut tables: BTreeMap<String, TableParts> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            let name = name.trim().to_owned();
            tables.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let Some(parts) = current.as_ref().and_then(|t| tables.get_mut(t)) else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if IstioChain::from_name(name).is_some() {
                parts.own.entry(name.to_owned()).or_default();
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            if IstioChain::from_name(chain).is_some() {
                parts
                    .own
                    .entry(chain.to_owned())
                    .or_default()
                    .push(spec.to_owned());
            } else if is_ours(spec) {
                parts
                    .builtin
                    .entry(chain.to_owned())
                    .or_default()
                    .push(spec.to_owned());
            }
        }
    }
    tables.retain(|_, parts| parts != &TableParts::default());
    tables
}

/// Differences between the planned and the present save of one family, meshinit's parts
/// only.
fn compare_iptables(family: Family, planned: &str, present: &str) -> Vec<String> {
    let planned = iptables_parts(planned);
    let present = iptables_parts(present);
    let empty = TableParts::default();
    let mut drift = Vec::new();
    let names: std::collections::BTreeSet<&String> = planned.keys().chain(present.keys()).collect();
    // In Table order (raw, mangle, nat...), not alphabetically, where the name is known.
    let mut names: Vec<&String> = names.into_iter().collect();
    names.sort_by_key(|n| Table::from_name(n).map_or(usize::MAX, |t| t as usize));
    for table in names {
        let want = planned.get(table).unwrap_or(&empty);
        let have = present.get(table).unwrap_or(&empty);
        for (chain, rules) in &want.own {
            match have.own.get(chain) {
                None => drift.push(format!("{family} {table}: chain {chain} is missing")),
                Some(found) => diff_rules(
                    &format!("{family} {table} {chain}"),
                    rules,
                    found,
                    &mut drift,
                ),
            }
        }
        for chain in have.own.keys().filter(|c| !want.own.contains_key(*c)) {
            drift.push(format!("{family} {table}: unexpected chain {chain}"));
        }
        let chains: std::collections::BTreeSet<&String> =
            want.builtin.keys().chain(have.builtin.keys()).collect();
        for chain in chains {
            let none = Vec::new();
            diff_rules(
                &format!("{family} {table} {chain}"),
                want.builtin.get(chain).unwrap_or(&none),
                have.builtin.get(chain).unwrap_or(&none),
                &mut drift,
            );
        }
    }
    drift
}

/// Rules planned but absent, present but not planned (as many times as each is missing or
/// extra), and, when the two hold the same rules, whether their order differs.
fn diff_rules(place: &str, planned: &[String], present: &[String], drift: &mut Vec<String>) {
    let mut unmatched: BTreeMap<&str, isize> = BTreeMap::new();
    for rule in planned {
        *unmatched.entry(rule).or_default() += 1;
    }
    for rule in present {
        *unmatched.entry(rule).or_default() -= 1;
    }
    let mut reported: BTreeMap<&str, isize> = BTreeMap::new();
    for rule in planned {
        let left = unmatched.get(rule.as_str()).copied().unwrap_or(0);
        let said = reported.entry(rule).or_default();
        if left > *said {
            *said += 1;
            drift.push(format!("{place}: missing `{rule}`"));
        }
    }
    for rule in present {
        let left = unmatched.get(rule.as_str()).copied().unwrap_or(0);
        let said = reported.entry(rule).or_default();
        if left < *said {
            *said -= 1;
            drift.push(format!("{place}: unexpected rule `{rule}`"));
        }
    }
    if unmatched.values().all(|n| *n == 0) && planned != present {
        drift.push(format!("{place}: rules are out of order"));
    }
}

// ---- routing ----------------------------------------------------------------------------

/// One tagged rule or route, as far as meshinit's plan describes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RoutingEntry {
    Rule {
        family: Family,
        mark: Option<u32>,
        table: u32,
    },
    Route {
        family: Family,
        table: u32,
        local: bool,
    },
}

impl RoutingEntry {
    fn family(&self) -> Family {
        match self {
            RoutingEntry::Rule { family, .. } | RoutingEntry::Route { family, .. } => *family,
        }
    }
}

/// As `ip` would add it.
impl std::fmt::Display for RoutingEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoutingEntry::Rule {
                mark: Some(mark),
                table,
                ..
            } => write!(f, "ip rule fwmark {mark} lookup {table}"),
            RoutingEntry::Rule {
                mark: None, table, ..
            } => write!(f, "ip rule lookup {table}"),
            RoutingEntry::Route {
                family,
                table,
                local,
            } => {
                let kind = if *local { "local " } else { "" };
                let default = match family {
                    Family::V4 => "0.0.0.0/0",
                    Family::V6 => "::/0",
                };
                write!(f, "ip route {kind}{default} dev lo table {table}")
            }
        }
    }
}

fn planned_routing(plan: &RoutingPlan) -> Vec<RoutingEntry> {
    let Some((mark, table)) = plan.tproxy else {
        return Vec::new();
    };
    let families: &[Family] = if plan.ipv6 {
        &Family::ALL
    } else {
        &[Family::V4]
    };
    families
        .iter()
        .flat_map(|&family| {
            [
                RoutingEntry::Rule {
                    family,
                    mark: Some(mark),
                    table,
                },
                RoutingEntry::Route {
                    family,
                    table,
                    local: true,
                },
            ]
        })
        .collect()
}

fn compare_routing(
    plan: &RoutingPlan,
    present: &[RoutingEntry],
    has_passthrough_address: bool,
) -> Vec<String> {
    let planned = planned_routing(plan);
    let mut drift: Vec<String> = planned
        .iter()
        .filter(|p| !present.contains(p))
        .map(|p| format!("{} routing: missing `{p}`", p.family()))
        .collect();
    drift.extend(
        present
            .iter()
            .filter(|p| !planned.contains(p))
            .map(|p| format!("{} routing: unexpected `{p}`", p.family())),
    );
    if plan.ipv6_passthrough_address && !has_passthrough_address {
        drift.push(format!(
            "ipv6 routing: missing address {IPV6_PASSTHROUGH}/128 on lo"
        ));
    }
    drift
}

/// Tagged routing and the `::6` address in the current namespace against `plan`.
fn routing_drift(plan: &RoutingPlan) -> Result<Vec<String>, DriftError> {
    let read = |what| move |e: crate::netlink::NetlinkError| failed(what, e);
    let mut socket = Socket::route().map_err(read("reading the pod's routing failed"))?;
    let present: Vec<RoutingEntry> = socket
        .tagged_routing()
        .map_err(read("reading the pod's routing failed"))?
        .iter()
        .map(|(family, is_rule, payload)| {
            let family = match family {
                NlFamily::Inet => Family::V4,
                NlFamily::Inet6 => Family::V6,
            };
            if *is_rule {
                let (mark, table) = crate::netlink::rule_mark_table(payload);
                RoutingEntry::Rule {
                    family,
                    mark,
                    table,
                }
            } else {
                let (table, local) = crate::netlink::route_table(payload);
                RoutingEntry::Route {
                    family,
                    table,
                    local,
                }
            }
        })
        .collect();
    let has_passthrough_address = if plan.ipv6_passthrough_address {
        let lo = crate::netlink::interface_index("lo").map_err(read("no lo in the pod"))?;
        let address = match IPV6_PASSTHROUGH {
            std::net::IpAddr::V6(a) => a,
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
        };
        socket
            .has_ipv6_address(address, lo)
            .map_err(read("reading the pod's addresses failed"))?
    } else {
        false
    };
    Ok(compare_routing(plan, &present, has_passthrough_address))
}

// ---- nftables ---------------------------------------------------------------------------

/// The `inet` tables of meshinit's in the calling thread's namespace, with `nft -s`'s
/// listing of each (`-s`: without counter values, which are the only thing that differs
/// between a pod that has seen traffic and a fresh copy).
fn nft_tables(nft: &Path) -> Result<BTreeMap<String, String>, DriftError> {
    let chains = Socket::netfilter()
        .and_then(|mut s| s.nftables_chains())
        .map_err(|e| failed("listing nftables chains failed", e))?;
    let mut names: Vec<&str> = chains
        .iter()
        .filter(|(family, table, _)| {
            *family == 1 && crate::rules::nft::model::Table::from_name(table).is_some()
        })
        .map(|(_, table, _)| table.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut listed = BTreeMap::new();
    for name in names {
        let output = Command::new(nft)
            .args(["-s", "list", "table", "inet", name])
            .output()
            .map_err(|e| failed("running nft failed", e))?;
        if !output.status.success() {
            return Err(failed(
                &format!("nft list table inet {name} failed"),
                String::from_utf8_lossy(&output.stderr).trim(),
            ));
        }
        listed.insert(
            name.to_owned(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        );
    }
    Ok(listed)
}

/// [`super::Engine::drift`] for `--native-nftables`: Istio's tables, and routing.
pub(super) fn nftables_drift(config: &Config) -> Result<Vec<String>, DriftError> {
    let ruleset = crate::engine::nft_plan(config);
    let nft = find_nft().ok_or_else(|| {
        failed(
            "CHECK of a --native-nftables pod needs nft",
            "nft not found in PATH or /usr/sbin, /sbin: install the nftables package",
        )
    })?;
    let present = nft_tables(&nft)?;
    let mode = config.run.nftables_apply;
    let planned = in_scratch_namespace(|| {
        crate::apply::nft::apply_nftables(&mut NftTool::new(), &mut NoRouting, &ruleset, mode)
            .map_err(|e| failed("applying the plan in a scratch namespace failed", e))?;
        nft_tables(&nft)
    })?;
    let mut drift = Vec::new();
    let tables: std::collections::BTreeSet<&String> =
        planned.keys().chain(present.keys()).collect();
    for table in tables {
        match (planned.get(table), present.get(table)) {
            (Some(want), Some(have)) => drift.extend(compare_nft(table, want, have)),
            (Some(_), None) => drift.push(format!("nftables inet {table}: table is missing")),
            (None, Some(_)) => drift.push(format!("nftables inet {table}: unexpected table")),
            (None, None) => {}
        }
    }
    let plan = RoutingPlan {
        ipv6_passthrough_address: ruleset.ipv6_passthrough_address,
        tproxy: ruleset.tproxy_routing.map(|r| (r.mark, r.table)),
        ipv6: ruleset.ipv6,
    };
    drift.extend(routing_drift(&plan)?);
    Ok(drift)
}

/// The blocks (`chain NAME`, `set NAME`...) of one `nft list table` output, each with its
/// lines (declaration and rules) in order.
fn nft_blocks(listing: &str) -> BTreeMap<String, Vec<String>> {
    let mut blocks = BTreeMap::new();
    let mut current: Option<(String, Vec<String>)> = None;
    let mut depth = 0usize;
    for line in listing.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if depth == 1 && line.ends_with('{') {
            current = Some((line.trim_end_matches('{').trim().to_owned(), Vec::new()));
        } else if depth == 2 && line == "}" {
            if let Some((name, lines)) = current.take() {
                blocks.insert(name, lines);
            }
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line.to_owned());
        }
        depth += line.matches('{').count();
        depth = depth.saturating_sub(line.matches('}').count());
    }
    blocks
}

fn compare_nft(table: &str, planned: &str, present: &str) -> Vec<String> {
    let planned = nft_blocks(planned);
    let present = nft_blocks(present);
    let mut drift = Vec::new();
    for (block, lines) in &planned {
        match present.get(block) {
            None => drift.push(format!("nftables inet {table}: {block} is missing")),
            Some(found) => diff_rules(
                &format!("nftables inet {table} {block}"),
                lines,
                found,
                &mut drift,
            ),
        }
    }
    for block in present.keys().filter(|b| !planned.contains_key(*b)) {
        drift.push(format!("nftables inet {table}: unexpected {block}"));
    }
    drift
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLANNED: &str = "# Generated by iptables-nft-save v1.8.9
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

    fn edited(from: &str, to: &str) -> String {
        assert!(PLANNED.contains(from), "{from}");
        PLANNED.replacen(from, to, 1)
    }

    #[test]
    fn identical_saves_do_not_drift() {
        assert_eq!(
            compare_iptables(Family::V4, PLANNED, PLANNED),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_missing_builtin_jump_is_named() {
        let present = edited("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n", "");
        assert_eq!(
            compare_iptables(Family::V4, PLANNED, &present),
            ["ipv4 nat OUTPUT: missing `-p tcp -j ISTIO_OUTPUT`"]
        );
    }

    #[test]
    fn a_changed_rule_is_missing_and_unexpected() {
        let present = edited("-d 127.0.0.1/32", "-d 203.0.113.0/24");
        assert_eq!(
            compare_iptables(Family::V4, PLANNED, &present),
            [
                "ipv4 nat ISTIO_OUTPUT: missing `-d 127.0.0.1/32 -j RETURN`",
                "ipv4 nat ISTIO_OUTPUT: unexpected rule `-d 203.0.113.0/24 -j RETURN`",
            ]
        );
    }

    #[test]
    fn duplicates_order_and_chains_count() {
        let doubled = edited(
            "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n",
            "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n",
        );
        assert_eq!(
            compare_iptables(Family::V4, PLANNED, &doubled),
            ["ipv4 nat ISTIO_OUTPUT: unexpected rule `-j ISTIO_REDIRECT`"]
        );
        let swapped = edited(
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n",
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n",
        );
        assert_eq!(
            compare_iptables(Family::V4, PLANNED, &swapped),
            ["ipv4 nat ISTIO_OUTPUT: rules are out of order"]
        );
        let extra = edited(
            ":ISTIO_REDIRECT - [0:0]\n",
            ":ISTIO_REDIRECT - [0:0]\n:ISTIO_INBOUND - [0:0]\n",
        );
        assert_eq!(
            compare_iptables(Family::V4, PLANNED, &extra),
            ["ipv4 nat: unexpected chain ISTIO_INBOUND"]
        );
        let gone = PLANNED
            .lines()
            .filter(|l| !l.contains("ISTIO_REDIRECT -") && !l.starts_with(":ISTIO_REDIRECT"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            compare_iptables(Family::V6, PLANNED, &gone),
            ["ipv6 nat: chain ISTIO_REDIRECT is missing"]
        );
    }

    #[test]
    fn foreign_rules_and_chains_are_not_drift() {
        let present = edited(
            "COMMIT\n",
            "-A OUTPUT -d 198.51.100.7/32 -j ACCEPT\n-A PREROUTING -j KUBE-THING\nCOMMIT\n*filter\n:INPUT DROP [9:99]\n:KUBE-THING - [0:0]\n-A INPUT -j KUBE-THING\nCOMMIT\n",
        )
        .replace(":ISTIO_OUTPUT - [0:0]\n", ":ISTIO_OUTPUT - [0:0]\n:KUBE-THING - [0:0]\n");
        assert_eq!(
            compare_iptables(Family::V4, PLANNED, &present),
            Vec::<String>::new()
        );
    }

    #[test]
    fn routing_compares_tagged_entries_and_the_passthrough_address() {
        let plan = RoutingPlan {
            ipv6_passthrough_address: true,
            tproxy: Some((1337, 133)),
            ipv6: true,
        };
        let mut present = planned_routing(&plan);
        assert_eq!(present.len(), 4);
        assert!(compare_routing(&plan, &present, true).is_empty());
        present.remove(0);
        present.push(RoutingEntry::Rule {
            family: Family::V4,
            mark: Some(1337),
            table: 134,
        });
        assert_eq!(
            compare_routing(&plan, &present, false),
            [
                "ipv4 routing: missing `ip rule fwmark 1337 lookup 133`",
                "ipv4 routing: unexpected `ip rule fwmark 1337 lookup 134`",
                "ipv6 routing: missing address ::6/128 on lo",
            ]
        );
        let off = RoutingPlan {
            ipv6_passthrough_address: false,
            tproxy: None,
            ipv6: false,
        };
        assert!(compare_routing(&off, &[], false).is_empty());
    }

    const NFT: &str = "table inet istio-proxy-nat {
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tcounter jump istio-output
\t}

\tchain istio-output {
\t\tip daddr 127.0.0.1 counter return
\t\tcounter jump istio-redirect
\t}

\tchain istio-redirect {
\t\tmeta l4proto tcp counter redirect to :15001
\t}
}
";

    #[test]
    fn nft_listings_compare_by_chain() {
        assert!(compare_nft("istio-proxy-nat", NFT, NFT).is_empty());
        let present = NFT.replace("\t\tcounter jump istio-output\n", "");
        assert_eq!(
            compare_nft("istio-proxy-nat", NFT, &present),
            ["nftables inet istio-proxy-nat chain output: missing `counter jump istio-output`"]
        );
        let hooked = NFT.replace("priority -100", "priority 100");
        assert_eq!(compare_nft("istio-proxy-nat", NFT, &hooked).len(), 2);
        let blocks = nft_blocks(NFT);
        assert_eq!(
            blocks.keys().collect::<Vec<_>>(),
            ["chain istio-output", "chain istio-redirect", "chain output"]
        );
    }
}
