//! Drift: a namespace's capture state, compared whole with what installing the plan would
//! leave now (CNI CHECK asks it).
//!
//! Rule text is compared only after the kernel (through the same tools ADD uses) has
//! written both sides: the plan is applied, with the pod's backend, in a scratch network
//! namespace that only this check sees, and read back the way the pod is read. Two outputs
//! of one `iptables-save` (or `nft list`) agree exactly when the rules do, whatever
//! canonical form the tool prints (`-m tcp`, `/32`, `dport 15001`), so no rule text is
//! rewritten here. Routing and the named ipsets of `--match-sets` are typed data, compared
//! as such: a set's name says what it should hold, but the kernel lets its members be
//! changed under that name, so they are read and compared too.
//!
//! Every read of the pod goes through the apply traits (`Netfilter::save`,
//! `Nftables::listing`, `Routing::read`, `IpSets::contents`), so the comparison is tested
//! with the recording fakes.
//!
//! Only what belongs to meshinit counts: Istio's chains, the rules in built-in chains that
//! jump to them or carry meshinit's comment, Istio's nftables tables, meshinit's sets, and
//! routing tagged with meshinit's protocol. Other tools' rules are not drift.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::apply::iptables::{Backend, IptablesTools};
use crate::apply::nft::NftTool;
use crate::apply::{
    ApplyError, IpSets, Netfilter, NetlinkIpSets, NetlinkRouting, Nftables, Routing,
    RoutingChanges, RoutingEntry, RoutingPlan, RoutingState, SetContents, SetMember,
};
use crate::config::{Config, ForcedBackend};
use crate::rules::iptables::ipset::IpSet;
use crate::rules::iptables::model::{
    Family, FamilyRuleset, IstioChain, Ruleset, Table, IPV6_PASSTHROUGH,
};
use crate::rules::iptables::render::is_ours;
use crate::rules::nft::NftRuleset;

/// Why the drift could not be measured: what was being done, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error("no iptables to read the pod's rules with: {0}")]
    NoIptables(ApplyError),

    #[error("CHECK of a --native-nftables pod needs nft: {0}")]
    NoNft(ApplyError),

    #[error("cannot create a scratch network namespace to plan the check in: {0}")]
    Scratch(nix::errno::Errno),

    #[error("the check's scratch namespace thread panicked")]
    ScratchPanicked,

    #[error("applying the plan in a scratch namespace failed: {0}")]
    PlanApply(ApplyError),

    #[error("reading the planned {what} back failed: {error}")]
    PlanRead {
        what: &'static str,
        error: ApplyError,
    },

    #[error("reading the pod's {what} failed: {error}")]
    PodRead {
        what: &'static str,
        error: ApplyError,
    },
}

impl DriftError {
    /// What was being done, without the cause (`cause` is that).
    pub fn what(&self) -> String {
        match self {
            DriftError::NoIptables(_) => "no iptables to read the pod's rules with".into(),
            DriftError::NoNft(_) => "CHECK of a --native-nftables pod needs nft".into(),
            DriftError::Scratch(_) => {
                "cannot create a scratch network namespace to plan the check in".into()
            }
            DriftError::ScratchPanicked => "the check's scratch namespace thread panicked".into(),
            DriftError::PlanApply(_) => "applying the plan in a scratch namespace failed".into(),
            DriftError::PlanRead { what, .. } => format!("reading the planned {what} back failed"),
            DriftError::PodRead { what, .. } => format!("reading the pod's {what} failed"),
        }
    }

    /// The cause, as the layer below said it.
    pub fn cause(&self) -> String {
        match self {
            DriftError::NoIptables(error)
            | DriftError::NoNft(error)
            | DriftError::PlanApply(error)
            | DriftError::PlanRead { error, .. }
            | DriftError::PodRead { error, .. } => error.to_string(),
            DriftError::Scratch(errno) => errno.to_string(),
            DriftError::ScratchPanicked => String::new(),
        }
    }
}

fn pod_read(what: &'static str) -> impl Fn(ApplyError) -> DriftError {
    move |error| DriftError::PodRead { what, error }
}

fn plan_read(what: &'static str) -> impl Fn(ApplyError) -> DriftError {
    move |error| DriftError::PlanRead { what, error }
}

/// Where a rule of meshinit's sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A chain of one family's iptables table.
    Iptables {
        family: Family,
        table: String,
        chain: String,
    },
    /// A block (`chain NAME`, `set NAME`) of one of meshinit's nftables `inet` tables.
    Nftables { table: String, block: String },
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Iptables {
                family,
                table,
                chain,
            } => write!(f, "{family} {table} {chain}"),
            Place::Nftables { table, block } => write!(f, "nftables inet {table} {block}"),
        }
    }
}

/// A set whose members differ from the plan's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetName {
    /// A named ipset of `--match-sets` on iptables.
    Ipset(String),
    /// An anonymous nftables set: the `n`th (from 1) set of a rule, which is shown with its
    /// sets' contents left out.
    Anonymous {
        place: Place,
        rule: String,
        n: usize,
    },
}

impl std::fmt::Display for SetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetName::Ipset(name) => write!(f, "ipset {name}"),
            SetName::Anonymous { place, rule, n } => {
                write!(f, "{place}: set {n} of `{rule}`")
            }
        }
    }
}

/// One difference between a pod's capture state and its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// A planned rule is not there (once for each time it is missing).
    MissingRule { place: Place, rule: String },
    /// A rule is there that the plan does not have (once for each extra copy).
    UnexpectedRule { place: Place, rule: String },
    /// The same rules, in another order.
    OutOfOrder { place: Place },
    /// One of Istio's chains the plan has is not in the family's table.
    MissingChain {
        family: Family,
        table: String,
        chain: String,
    },
    /// One of Istio's chains is in the family's table, but not in the plan.
    UnexpectedChain {
        family: Family,
        table: String,
        chain: String,
    },
    /// One of Istio's nftables tables the plan has is not there.
    MissingTable { table: String },
    /// One of Istio's nftables tables is there, but not in the plan.
    UnexpectedTable { table: String },
    /// A chain or set of an nftables table the plan has is not there.
    MissingBlock { table: String, block: String },
    /// A chain or set is in one of Istio's nftables tables, but not in the plan.
    UnexpectedBlock { table: String, block: String },
    /// A policy routing rule or route TPROXY needs is not there.
    MissingRouting(RoutingEntry),
    /// A rule or route tagged as meshinit's is there that the plan does not have.
    UnexpectedRouting(RoutingEntry),
    /// IPv6 is on but `lo` lacks `::6`, the inbound passthrough source.
    MissingPassthroughAddress,
    /// A set the rules look up is not there.
    MissingSet { set: String },
    /// A set holds other members than planned, under the same name.
    SetMembers {
        set: SetName,
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::MissingRule { place, rule } => write!(f, "{place}: missing `{rule}`"),
            Drift::UnexpectedRule { place, rule } => {
                write!(f, "{place}: unexpected rule `{rule}`")
            }
            Drift::OutOfOrder { place } => write!(f, "{place}: rules are out of order"),
            Drift::MissingChain {
                family,
                table,
                chain,
            } => write!(f, "{family} {table}: chain {chain} is missing"),
            Drift::UnexpectedChain {
                family,
                table,
                chain,
            } => write!(f, "{family} {table}: unexpected chain {chain}"),
            Drift::MissingTable { table } => write!(f, "nftables inet {table}: table is missing"),
            Drift::UnexpectedTable { table } => {
                write!(f, "nftables inet {table}: unexpected table")
            }
            Drift::MissingBlock { table, block } => {
                write!(f, "nftables inet {table}: {block} is missing")
            }
            Drift::UnexpectedBlock { table, block } => {
                write!(f, "nftables inet {table}: unexpected {block}")
            }
            Drift::MissingRouting(entry) => {
                write!(f, "{} routing: missing `{entry}`", entry.family())
            }
            Drift::UnexpectedRouting(entry) => {
                write!(f, "{} routing: unexpected `{entry}`", entry.family())
            }
            Drift::MissingPassthroughAddress => write!(
                f,
                "ipv6 routing: missing address {IPV6_PASSTHROUGH}/128 on lo"
            ),
            Drift::MissingSet { set } => write!(f, "ipset {set} is missing"),
            Drift::SetMembers {
                set,
                missing,
                unexpected,
            } => {
                write!(f, "{set}:")?;
                if !missing.is_empty() {
                    write!(
                        f,
                        " missing member{} {}",
                        plural(missing),
                        missing.join(", ")
                    )?;
                }
                if !missing.is_empty() && !unexpected.is_empty() {
                    write!(f, ";")?;
                }
                if !unexpected.is_empty() {
                    let s = plural(unexpected);
                    write!(f, " unexpected member{s} {}", unexpected.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

fn plural(list: &[String]) -> &'static str {
    if list.len() == 1 {
        ""
    } else {
        "s"
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
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(DriftError::Scratch)?;
                work()
            })
            .join()
            .unwrap_or(Err(DriftError::ScratchPanicked))
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
    fn read(&mut self, _: bool) -> Result<RoutingState, ApplyError> {
        Ok(RoutingState::default())
    }
}

// ---- iptables ---------------------------------------------------------------------------

/// [`super::Engine::drift`] for iptables: both families' saves, and routing.
pub(super) fn iptables_drift(config: &Config) -> Result<Vec<Drift>, DriftError> {
    let mut sets = NetlinkIpSets::default();
    let ruleset = crate::engine::kernel_plan(config, &mut sets);
    let families: Vec<Family> = ruleset.families().map(|f| f.family).collect();
    let wait = config.run.xtables_wait;
    let mut tools = IptablesTools::detect(config.run.force_backend, &families, wait)
        .map_err(DriftError::NoIptables)?;
    // The same backend as the pod's, so both sides are printed by the same tool. Plain
    // `iptables` has no forced form; detection there finds it again.
    let forced = match tools.backend() {
        Backend::Legacy => Some(ForcedBackend::Legacy),
        Backend::Nft => Some(ForcedBackend::Nft),
        Backend::Plain => None,
    };
    let planned = in_scratch_namespace(|| {
        let mut scratch =
            IptablesTools::detect(forced, &families, wait).map_err(DriftError::NoIptables)?;
        crate::apply::iptables::apply(
            &mut scratch,
            &mut NoRouting,
            &mut NetlinkIpSets::default(),
            &ruleset,
        )
        .map_err(DriftError::PlanApply)?;
        families
            .iter()
            .map(|&family| scratch.save(family).map_err(plan_read("rules")))
            .collect::<Result<Vec<String>, DriftError>>()
    })?;
    iptables_pod_drift(
        &ruleset,
        &planned,
        &mut tools,
        &mut sets,
        &mut NetlinkRouting::default(),
    )
}

/// The pod's side of an iptables CHECK, read through the apply traits, against the plan:
/// `planned` is each family's save of the plan applied in a scratch namespace.
fn iptables_pod_drift(
    ruleset: &Ruleset,
    planned: &[String],
    pod: &mut dyn Netfilter,
    sets: &mut dyn IpSets,
    routing: &mut dyn Routing,
) -> Result<Vec<Drift>, DriftError> {
    let mut drift = Vec::new();
    for (family, planned) in ruleset.families().map(|f| f.family).zip(planned) {
        let present = pod.save(family).map_err(pod_read("rules"))?;
        drift.extend(compare_iptables(family, planned, &present));
    }
    let planned_sets: Vec<Arc<IpSet>> = ruleset.families().flat_map(FamilyRuleset::sets).collect();
    if !planned_sets.is_empty() {
        let present = sets.contents().map_err(|e| pod_read("ipsets")(e.into()))?;
        drift.extend(compare_sets(&planned_sets, &present));
    }
    let plan = RoutingPlan {
        ipv6_passthrough_address: ruleset.ipv6_passthrough_address,
        tproxy: ruleset.tproxy_routing.map(|r| (r.mark, r.table)),
        ipv6: ruleset.v6.is_some(),
    };
    drift.extend(routing_drift(&plan, routing)?);
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
fn compare_iptables(family: Family, planned: &str, present: &str) -> Vec<Drift> {
    let planned = iptables_parts(planned);
    let present = iptables_parts(present);
    let empty = TableParts::default();
    let mut drift = Vec::new();
    let names: BTreeSet<&String> = planned.keys().chain(present.keys()).collect();
    // In Table order (raw, mangle, nat...), not alphabetically, where the name is known.
    let mut names: Vec<&String> = names.into_iter().collect();
    names.sort_by_key(|n| Table::from_name(n).map_or(usize::MAX, |t| t as usize));
    for table in names {
        let want = planned.get(table).unwrap_or(&empty);
        let have = present.get(table).unwrap_or(&empty);
        let place = |chain: &str| Place::Iptables {
            family,
            table: table.clone(),
            chain: chain.to_owned(),
        };
        for (chain, rules) in &want.own {
            match have.own.get(chain) {
                None => drift.push(Drift::MissingChain {
                    family,
                    table: table.clone(),
                    chain: chain.clone(),
                }),
                Some(found) => diff_rules(&place(chain), rules, found, &mut drift),
            }
        }
        for chain in have.own.keys().filter(|c| !want.own.contains_key(*c)) {
            drift.push(Drift::UnexpectedChain {
                family,
                table: table.clone(),
                chain: chain.clone(),
            });
        }
        let chains: BTreeSet<&String> = want.builtin.keys().chain(have.builtin.keys()).collect();
        for chain in chains {
            let none = Vec::new();
            diff_rules(
                &place(chain),
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
fn diff_rules(place: &Place, planned: &[String], present: &[String], drift: &mut Vec<Drift>) {
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
            drift.push(Drift::MissingRule {
                place: place.clone(),
                rule: rule.clone(),
            });
        }
    }
    for rule in present {
        let left = unmatched.get(rule.as_str()).copied().unwrap_or(0);
        let said = reported.entry(rule).or_default();
        if left < *said {
            *said -= 1;
            drift.push(Drift::UnexpectedRule {
                place: place.clone(),
                rule: rule.clone(),
            });
        }
    }
    if unmatched.values().all(|n| *n == 0) && planned != present {
        drift.push(Drift::OutOfOrder {
            place: place.clone(),
        });
    }
}

/// The planned sets against the pod's: a set the rules name must hold exactly its
/// planned members (its name is a hash of them, but the kernel lets them change under it).
/// Sets no plan names are not compared: no rule of the plan looks them up, and a rule of
/// the pod's that did would be drift already.
fn compare_sets(planned: &[Arc<IpSet>], present: &[SetContents]) -> Vec<Drift> {
    let mut drift = Vec::new();
    for set in planned {
        let Some(found) = present.iter().find(|p| p.name == set.name()) else {
            drift.push(Drift::MissingSet {
                set: set.name().to_owned(),
            });
            continue;
        };
        let want = SetMember::of(set);
        let missing: Vec<SetMember> = want.difference(&found.members).copied().collect();
        let unexpected: Vec<SetMember> = found.members.difference(&want).copied().collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            drift.push(Drift::SetMembers {
                set: SetName::Ipset(set.name().to_owned()),
                missing: spelled(&missing),
                unexpected: spelled(&unexpected),
            });
        }
    }
    drift
}

/// Members as `ipset` takes them, consecutive ports as one range (`8000-8100`): a set of
/// all ports flushed is one line, not 65,535.
fn spelled(members: &[SetMember]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u16, u16)> = None;
    let close = |run: Option<(u16, u16)>, out: &mut Vec<String>| match run {
        Some((first, last)) if first == last => out.push(first.to_string()),
        Some((first, last)) => out.push(format!("{first}-{last}")),
        None => {}
    };
    for member in members {
        match (*member, run) {
            (SetMember::Port(port), Some((first, last))) if last.checked_add(1) == Some(port) => {
                run = Some((first, port));
            }
            (SetMember::Port(port), _) => {
                close(run.take(), &mut out);
                run = Some((port, port));
            }
            (SetMember::Net(net), _) => {
                close(run.take(), &mut out);
                out.push(net.to_string());
            }
        }
    }
    close(run, &mut out);
    out
}

// ---- routing ----------------------------------------------------------------------------

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

fn compare_routing(plan: &RoutingPlan, present: &RoutingState) -> Vec<Drift> {
    let planned = planned_routing(plan);
    let mut drift: Vec<Drift> = planned
        .iter()
        .filter(|p| !present.entries.contains(p))
        .map(|p| Drift::MissingRouting(*p))
        .collect();
    drift.extend(
        present
            .entries
            .iter()
            .filter(|p| !planned.contains(p))
            .map(|p| Drift::UnexpectedRouting(*p)),
    );
    if plan.ipv6_passthrough_address && !present.passthrough_address {
        drift.push(Drift::MissingPassthroughAddress);
    }
    drift
}

/// Tagged routing and the `::6` address in the pod against `plan`.
fn routing_drift(plan: &RoutingPlan, routing: &mut dyn Routing) -> Result<Vec<Drift>, DriftError> {
    let present = routing
        .read(plan.ipv6_passthrough_address)
        .map_err(pod_read("routing"))?;
    Ok(compare_routing(plan, &present))
}

// ---- nftables ---------------------------------------------------------------------------

/// [`super::Engine::drift`] for `--native-nftables`: Istio's tables, and routing.
pub(super) fn nftables_drift(config: &Config) -> Result<Vec<Drift>, DriftError> {
    let ruleset = crate::engine::nft_plan(config);
    let mut nft = NftTool::new();
    nft.require().map_err(DriftError::NoNft)?;
    let mode = config.run.nftables_apply;
    let planned = in_scratch_namespace(|| {
        let mut scratch = NftTool::new();
        crate::apply::nft::apply_nftables(&mut scratch, &mut NoRouting, &ruleset, mode)
            .map_err(DriftError::PlanApply)?;
        scratch.listing().map_err(plan_read("nftables tables"))
    })?;
    nftables_pod_drift(&ruleset, &planned, &mut nft, &mut NetlinkRouting::default())
}

/// The pod's side of a `--native-nftables` CHECK, read through the apply traits, against
/// `planned`: the listing of the plan applied in a scratch namespace.
fn nftables_pod_drift(
    ruleset: &NftRuleset,
    planned: &BTreeMap<String, String>,
    pod: &mut dyn Nftables,
    routing: &mut dyn Routing,
) -> Result<Vec<Drift>, DriftError> {
    let present = pod.listing().map_err(pod_read("nftables tables"))?;
    let mut drift = Vec::new();
    let tables: BTreeSet<&String> = planned.keys().chain(present.keys()).collect();
    for table in tables {
        match (planned.get(table), present.get(table)) {
            (Some(want), Some(have)) => drift.extend(compare_nft(table, want, have)),
            (Some(_), None) => drift.push(Drift::MissingTable {
                table: table.clone(),
            }),
            (None, Some(_)) => drift.push(Drift::UnexpectedTable {
                table: table.clone(),
            }),
            (None, None) => {}
        }
    }
    let plan = RoutingPlan {
        ipv6_passthrough_address: ruleset.ipv6_passthrough_address,
        tproxy: ruleset.tproxy_routing.map(|r| (r.mark, r.table)),
        ipv6: ruleset.ipv6,
    };
    drift.extend(routing_drift(&plan, routing)?);
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

fn compare_nft(table: &str, planned: &str, present: &str) -> Vec<Drift> {
    let planned = nft_blocks(planned);
    let present = nft_blocks(present);
    let mut drift = Vec::new();
    for (block, lines) in &planned {
        match present.get(block) {
            None => drift.push(Drift::MissingBlock {
                table: table.to_owned(),
                block: block.clone(),
            }),
            Some(found) => {
                let place = Place::Nftables {
                    table: table.to_owned(),
                    block: block.clone(),
                };
                let mut rules = Vec::new();
                diff_rules(&place, lines, found, &mut rules);
                drift.extend(set_edits(rules));
            }
        }
    }
    for block in present.keys().filter(|b| !planned.contains_key(*b)) {
        drift.push(Drift::UnexpectedBlock {
            table: table.to_owned(),
            block: block.clone(),
        });
    }
    drift
}

/// A rule's anonymous sets (`{ a, b }`), each as its elements, and the rule with their
/// contents left out (`{ … }`).
fn anonymous_sets(rule: &str) -> (String, Vec<Vec<&str>>) {
    let mut shape = String::with_capacity(rule.len());
    let mut sets = Vec::new();
    let mut rest = rule;
    while let Some((before, after)) = rest.split_once('{') {
        let Some((inside, tail)) = after.split_once('}') else {
            break;
        };
        shape.push_str(before);
        shape.push_str("{ … }");
        sets.push(inside.split(',').map(str::trim).collect());
        rest = tail;
    }
    shape.push_str(rest);
    (shape, sets)
}

/// A planned rule missing from one place and a rule there that differs from it only in
/// the elements of its anonymous sets are one edit: those sets' members, named.
fn set_edits(drift: Vec<Drift>) -> Vec<Drift> {
    let mut paired = vec![false; drift.len()];
    let mut out = Vec::with_capacity(drift.len());
    for (i, d) in drift.iter().enumerate() {
        if paired[i] {
            continue;
        }
        if let Drift::MissingRule { place, rule } = d {
            let (shape, planned) = anonymous_sets(rule);
            let edited = drift.iter().enumerate().find_map(|(j, e)| match e {
                Drift::UnexpectedRule { place: at, rule }
                    if !paired[j] && at == place && anonymous_sets(rule).0 == shape =>
                {
                    Some((j, anonymous_sets(rule).1))
                }
                _ => None,
            });
            if let Some((j, present)) = edited.filter(|_| !planned.is_empty()) {
                let edits = member_edits(place, &shape, &planned, &present);
                // Same elements: the rules differ in order only, which nft keeps sorted,
                // so this is not a set's edit; reported as the rules are.
                if !edits.is_empty() {
                    paired[j] = true;
                    out.extend(edits);
                    continue;
                }
            }
        }
        out.push(d.clone());
    }
    out
}

/// The members of each set of a rule (`shape`) that differ between `planned` and
/// `present`.
fn member_edits(
    place: &Place,
    shape: &str,
    planned: &[Vec<&str>],
    present: &[Vec<&str>],
) -> Vec<Drift> {
    let others = |a: &[&str], b: &[&str]| -> Vec<String> {
        a.iter()
            .filter(|e| !b.contains(e))
            .map(|e| (*e).to_owned())
            .collect()
    };
    planned
        .iter()
        .zip(present)
        .enumerate()
        .filter_map(|(n, (want, have))| {
            let missing = others(want, have);
            let unexpected = others(have, want);
            (!missing.is_empty() || !unexpected.is_empty()).then(|| Drift::SetMembers {
                set: SetName::Anonymous {
                    place: place.clone(),
                    rule: shape.to_owned(),
                    n: n + 1,
                },
                missing,
                unexpected,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(drift: &[Drift]) -> Vec<String> {
        drift.iter().map(ToString::to_string).collect()
    }

    fn iptables(family: Family, planned: &str, present: &str) -> Vec<String> {
        texts(&compare_iptables(family, planned, present))
    }

    fn nft(table: &str, planned: &str, present: &str) -> Vec<String> {
        texts(&compare_nft(table, planned, present))
    }

    fn routing(plan: &RoutingPlan, entries: &[RoutingEntry], address: bool) -> Vec<String> {
        let state = RoutingState {
            entries: entries.to_vec(),
            passthrough_address: address,
        };
        texts(&compare_routing(plan, &state))
    }

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
        assert_eq!(iptables(Family::V4, PLANNED, PLANNED), Vec::<String>::new());
    }

    #[test]
    fn a_missing_builtin_jump_is_named() {
        let present = edited("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n", "");
        assert_eq!(
            iptables(Family::V4, PLANNED, &present),
            ["ipv4 nat OUTPUT: missing `-p tcp -j ISTIO_OUTPUT`"]
        );
    }

    #[test]
    fn a_changed_rule_is_missing_and_unexpected() {
        let present = edited("-d 127.0.0.1/32", "-d 203.0.113.0/24");
        assert_eq!(
            iptables(Family::V4, PLANNED, &present),
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
            iptables(Family::V4, PLANNED, &doubled),
            ["ipv4 nat ISTIO_OUTPUT: unexpected rule `-j ISTIO_REDIRECT`"]
        );
        let swapped = edited(
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n",
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n",
        );
        assert_eq!(
            iptables(Family::V4, PLANNED, &swapped),
            ["ipv4 nat ISTIO_OUTPUT: rules are out of order"]
        );
        let extra = edited(
            ":ISTIO_REDIRECT - [0:0]\n",
            ":ISTIO_REDIRECT - [0:0]\n:ISTIO_INBOUND - [0:0]\n",
        );
        assert_eq!(
            iptables(Family::V4, PLANNED, &extra),
            ["ipv4 nat: unexpected chain ISTIO_INBOUND"]
        );
        let gone = PLANNED
            .lines()
            .filter(|l| !l.contains("ISTIO_REDIRECT -") && !l.starts_with(":ISTIO_REDIRECT"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            iptables(Family::V6, PLANNED, &gone),
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
            iptables(Family::V4, PLANNED, &present),
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
        assert!(routing(&plan, &present, true).is_empty());
        present.remove(0);
        present.push(RoutingEntry::Rule {
            family: Family::V4,
            mark: Some(1337),
            table: 134,
        });
        assert_eq!(
            routing(&plan, &present, false),
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
        assert!(routing(&off, &[], false).is_empty());
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
        assert!(nft("istio-proxy-nat", NFT, NFT).is_empty());
        let present = NFT.replace("\t\tcounter jump istio-output\n", "");
        assert_eq!(
            nft("istio-proxy-nat", NFT, &present),
            ["nftables inet istio-proxy-nat chain output: missing `counter jump istio-output`"]
        );
        let hooked = NFT.replace("priority -100", "priority 100");
        assert_eq!(nft("istio-proxy-nat", NFT, &hooked).len(), 2);
        let blocks = nft_blocks(NFT);
        assert_eq!(
            blocks.keys().collect::<Vec<_>>(),
            ["chain istio-output", "chain istio-redirect", "chain output"]
        );
    }

    // ---- the pod read through the apply traits, with the recording fakes ----

    use crate::apply::nft::tests::FakeNft;
    use crate::apply::tests::{Call, FakeIpSets, FakeNetfilter, FakeRouting};
    use crate::rules::iptables::plan::tests::{base, tproxy_config};

    fn pod_with(save: &str) -> FakeNetfilter {
        let mut pod = FakeNetfilter::default();
        pod.saves.insert(Family::V4, save.to_owned());
        pod
    }

    fn iptables_check(pod: &mut FakeNetfilter, routing: &mut FakeRouting) -> Vec<Drift> {
        let ruleset = crate::rules::iptables::plan(&base());
        let mut sets = FakeIpSets::sharing(pod);
        iptables_pod_drift(&ruleset, &[PLANNED.to_owned()], pod, &mut sets, routing)
            .expect("the fakes answer")
    }

    #[test]
    fn a_matching_save_from_the_pod_is_no_drift() {
        let mut pod = pod_with(PLANNED);
        assert_eq!(iptables_check(&mut pod, &mut FakeRouting::default()), []);
        assert_eq!(pod.calls(), [Call::Save(Family::V4)], "the pod is read");
    }

    #[test]
    fn a_drifted_save_from_the_pod_is_named() {
        let mut pod = pod_with(&edited("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n", ""));
        assert_eq!(
            iptables_check(&mut pod, &mut FakeRouting::default()),
            [Drift::MissingRule {
                place: Place::Iptables {
                    family: Family::V4,
                    table: "nat".into(),
                    chain: "OUTPUT".into(),
                },
                rule: "-p tcp -j ISTIO_OUTPUT".into(),
            }]
        );
        let mut pod = pod_with(&edited(
            ":ISTIO_REDIRECT - [0:0]\n",
            ":ISTIO_REDIRECT - [0:0]\n:ISTIO_DROP - [0:0]\n",
        ));
        assert_eq!(
            iptables_check(&mut pod, &mut FakeRouting::default()),
            [Drift::UnexpectedChain {
                family: Family::V4,
                table: "nat".into(),
                chain: "ISTIO_DROP".into(),
            }]
        );
    }

    #[test]
    fn routing_read_from_the_pod_is_compared() {
        let ruleset = crate::rules::iptables::plan(&tproxy_config());
        let plan = RoutingPlan {
            ipv6_passthrough_address: false,
            tproxy: Some((1337, 133)),
            ipv6: false,
        };
        let mut routing = FakeRouting::default();
        routing.state.entries = planned_routing(&plan);
        let check = |routing: &mut FakeRouting| {
            let mut pod = FakeNetfilter::default();
            let mut sets = FakeIpSets::sharing(&pod);
            iptables_pod_drift(&ruleset, &[String::new()], &mut pod, &mut sets, routing)
                .expect("the fakes answer")
        };
        assert_eq!(check(&mut routing), []);
        let route = routing.state.entries.remove(1);
        let stray = RoutingEntry::Rule {
            family: Family::V4,
            mark: Some(1337),
            table: 134,
        };
        routing.state.entries.push(stray);
        assert_eq!(
            check(&mut routing),
            [
                Drift::MissingRouting(route),
                Drift::UnexpectedRouting(stray)
            ]
        );
    }

    fn nft_check(pod: &mut FakeNft) -> Vec<Drift> {
        let ruleset = crate::rules::nft::plan(&base());
        let planned = BTreeMap::from([("istio-proxy-nat".to_owned(), NFT.to_owned())]);
        nftables_pod_drift(&ruleset, &planned, pod, &mut FakeRouting::default())
            .expect("the fakes answer")
    }

    #[test]
    fn the_pods_nftables_listing_is_compared() {
        let mut pod = FakeNft::default();
        pod.listing.insert("istio-proxy-nat".into(), NFT.to_owned());
        assert_eq!(nft_check(&mut pod), []);
        pod.listing.insert(
            "istio-proxy-nat".into(),
            NFT.replace("\t\tip daddr 127.0.0.1 counter return\n", ""),
        );
        assert_eq!(
            nft_check(&mut pod),
            [Drift::MissingRule {
                place: Place::Nftables {
                    table: "istio-proxy-nat".into(),
                    block: "chain istio-output".into(),
                },
                rule: "ip daddr 127.0.0.1 counter return".into(),
            }]
        );
        pod.listing.clear();
        pod.listing
            .insert("istio-proxy-mangle".into(), NFT.to_owned());
        assert_eq!(
            nft_check(&mut pod),
            [
                Drift::UnexpectedTable {
                    table: "istio-proxy-mangle".into()
                },
                Drift::MissingTable {
                    table: "istio-proxy-nat".into()
                },
            ]
        );
    }

    // ---- set contents ----

    fn sets_check(contents: Vec<SetContents>) -> (Arc<IpSet>, Vec<Drift>) {
        let options = crate::rules::PlanOptions { match_sets: true };
        let cfg = crate::rules::iptables::plan::tests::kube_virt_config();
        let ruleset = crate::rules::iptables::plan_with(&cfg, options);
        let set = ruleset.v4.sets().remove(0);
        let mut pod = pod_with("");
        let mut sets = FakeIpSets::sharing(&pod);
        sets.contents = contents;
        let drift = iptables_pod_drift(
            &ruleset,
            &[String::new()],
            &mut pod,
            &mut sets,
            &mut FakeRouting::default(),
        )
        .expect("the fakes answer");
        assert!(
            pod.calls().contains(&Call::ListSets),
            "the pod's sets are read"
        );
        (set, drift)
    }

    #[test]
    fn ipset_members_read_from_the_pod_are_compared() {
        let (set, _) = sets_check(vec![]);
        let name = set.name().to_owned();
        let whole = SetContents {
            name: name.clone(),
            members: SetMember::of(&set),
        };
        assert_eq!(sets_check(vec![whole.clone()]).1, []);

        let mut edited = whole.clone();
        let net = |n: &str| SetMember::Net(n.parse().unwrap());
        assert!(edited.members.remove(&net("192.0.2.0/24")));
        edited.members.insert(net("198.51.100.0/24"));
        let drift = sets_check(vec![edited]).1;
        assert_eq!(
            drift,
            [Drift::SetMembers {
                set: SetName::Ipset(name.clone()),
                missing: vec!["192.0.2.0/24".into()],
                unexpected: vec!["198.51.100.0/24".into()],
            }]
        );
        assert_eq!(
            texts(&drift),
            [format!(
                "ipset {name}: missing member 192.0.2.0/24; unexpected member 198.51.100.0/24"
            )]
        );

        let flushed = SetContents {
            name: name.clone(),
            members: BTreeSet::new(),
        };
        assert_eq!(
            texts(&sets_check(vec![flushed]).1),
            [format!(
                "ipset {name}: missing members 10.0.0.0/8, 192.0.2.0/24"
            )]
        );
        assert_eq!(sets_check(vec![]).1, [Drift::MissingSet { set: name }]);
    }

    #[test]
    fn ports_are_spelled_as_ranges() {
        let ports: Vec<SetMember> = [80, 8200, 8201, 8202, 9000, 65535]
            .into_iter()
            .map(SetMember::Port)
            .collect();
        assert_eq!(spelled(&ports), ["80", "8200-8202", "9000", "65535"]);
    }

    const NFT_SET: &str = "table inet istio-proxy-nat {
\tchain istio-output {
\t\tip daddr { 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 } counter return
\t\ttcp dport { 8200, 8300 } counter return
\t\tcounter jump istio-redirect
\t}
}
";

    #[test]
    fn an_edited_nftables_set_is_named_with_its_members() {
        let planned = BTreeMap::from([("istio-proxy-nat".to_owned(), NFT_SET.to_owned())]);
        let check = |listing: String| {
            let mut pod = FakeNft::default();
            pod.listing.insert("istio-proxy-nat".into(), listing);
            let ruleset = crate::rules::nft::plan(&base());
            texts(
                &nftables_pod_drift(&ruleset, &planned, &mut pod, &mut FakeRouting::default())
                    .expect("the fakes answer"),
            )
        };
        assert_eq!(check(NFT_SET.to_owned()), Vec::<String>::new());
        let place = "nftables inet istio-proxy-nat chain istio-output";
        assert_eq!(
            check(NFT_SET.replace(", 203.0.113.0/24 }", " }")),
            [format!(
                "{place}: set 1 of `ip daddr {{ … }} counter return`: missing member 203.0.113.0/24"
            )]
        );
        assert_eq!(
            check(NFT_SET.replace("{ 8200, 8300 }", "{ 8300, 9000 }")),
            [format!(
                "{place}: set 1 of `tcp dport {{ … }} counter return`: missing member 8200; unexpected member 9000"
            )]
        );
        // Another rule around the same set is not the set's edit.
        assert_eq!(
            check(NFT_SET.replace("8300 } counter return", "8300 } counter accept")),
            [
                format!("{place}: missing `tcp dport {{ 8200, 8300 }} counter return`"),
                format!("{place}: unexpected rule `tcp dport {{ 8200, 8300 }} counter accept`"),
            ]
        );
    }
}
