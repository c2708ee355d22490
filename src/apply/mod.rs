//! Ruleset → kernel, all or nothing.
//!
//! The engine only talks to two small traits: `Netfilter` (save and restore one family's
//! tables, through `iptables-restore` in production) and `Routing` (TPROXY policy routing
//! and the `::6` address, over netlink). Tests drive it with recording fakes.

mod backend;
mod ipsets;
mod legacy;
mod locks;
mod nft;
mod routing;

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Duration;

pub use backend::{Backend, IptablesTools};
pub use ipsets::{IpSetError, IpSets, NetlinkIpSets};
pub use locks::RunLock;
pub use nft::{
    apply_nftables, cleanup_native, cleanup_nftables, find_nft, NftSummary, NftTool, Nftables,
    Programmed,
};
pub use routing::NetlinkRouting;

use crate::rules::iptables::{
    parse_existing, render_restore, render_restore_chunks, render_rollback,
    tables_holding_only_ours, tables_in_save, ExistingState,
};
use crate::rules::model::{Family, FamilyRuleset, Ruleset, Table};

/// Restore input, produced in pieces so a restore process can start on it while the rest
/// is still being rendered.
pub trait RestoreInput {
    fn write_to(&self, emit: &mut dyn FnMut(&str) -> std::io::Result<()>) -> std::io::Result<()>;

    /// The whole input as text, for error messages and tests.
    fn text(&self) -> String {
        let mut text = String::new();
        let _ = self.write_to(&mut |chunk| {
            text.push_str(chunk);
            Ok(())
        });
        text
    }
}

impl RestoreInput for String {
    fn write_to(&self, emit: &mut dyn FnMut(&str) -> std::io::Result<()>) -> std::io::Result<()> {
        emit(self)
    }
}

/// A planned ruleset against what is there now, rendered as it is written.
struct Planned<'a> {
    desired: &'a FamilyRuleset,
    existing: &'a ExistingState,
}

impl RestoreInput for Planned<'_> {
    fn write_to(&self, emit: &mut dyn FnMut(&str) -> std::io::Result<()>) -> std::io::Result<()> {
        render_restore_chunks(self.desired, self.existing, emit)
    }
}

/// One family's netfilter tables, as `iptables-save`/`iptables-restore` see them. Every
/// restore is `--noflush`: meshinit changes only what its input names.
pub trait Netfilter {
    /// Which implementation this is, for logs.
    fn describe(&self) -> String;
    /// A cheap probe, without launching anything where possible: could this family's
    /// tables hold rules of ours? `false` lets apply skip the save (and always when the
    /// family's tools are missing).
    fn may_hold_rules(&mut self, family: Family) -> bool;
    /// The tables that exist now, where that is known without launching anything.
    fn existing_tables(&mut self, family: Family) -> Option<Vec<Table>>;
    fn save(&mut self, family: Family) -> Result<String, ApplyError>;
    fn restore(&mut self, family: Family, input: &dyn RestoreInput) -> Result<(), ApplyError>;
    /// Removes tables left empty, where the backend can (nft can; legacy tables stay
    /// registered once used, as with any iptables command).
    fn remove_tables(&mut self, family: Family, tables: &[Table]) -> Result<(), ApplyError>;
    /// Processes launched so far (the benchmark reports it).
    fn processes_launched(&self) -> usize;
}

/// What TPROXY needs outside netfilter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingPlan {
    pub ipv6_passthrough_address: bool,
    pub tproxy: Option<(u32, u32)>,
    pub ipv6: bool,
}

/// What `Routing::ensure` added (and so what undoing it removes); pre-existing state is
/// left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingChanges {
    pub added: Vec<RoutingItem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingItem {
    Ipv6PassthroughAddress,
    Rule {
        family: Family,
        mark: u32,
        table: u32,
    },
    LocalRoute {
        family: Family,
        table: u32,
    },
}

pub trait Routing {
    fn ensure(&mut self, plan: &RoutingPlan) -> Result<RoutingChanges, ApplyError>;
    fn undo(&mut self, changes: &RoutingChanges) -> Result<(), ApplyError>;
    /// Removes meshinit's rules and routes that `plan` does not have (an earlier
    /// configuration's). Returns how many.
    fn remove_stale(&mut self, plan: &RoutingPlan) -> Result<usize, ApplyError>;
    /// Removes every rule and route meshinit tagged, and the `::6` address.
    fn remove_all(&mut self) -> Result<usize, ApplyError>;
}
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{program} not found in PATH or /usr/sbin, /sbin: install the {package} package")]
    MissingBinary {
        program: String,
        package: &'static str,
    },

    // The cause is in the message (the CNI plugin shows only the message), so not a
    // `source` too: `error::report` would print it twice.
    #[error("starting {program} failed: {error}")]
    Spawn {
        program: String,
        error: std::io::Error,
    },

    #[error("{program} rejected the {family} rules{}: {stderr}", line_info(.line, .line_text))]
    Restore {
        program: String,
        family: Family,
        line: Option<usize>,
        line_text: Option<String>,
        stderr: String,
    },

    #[error("{program} failed: {stderr}")]
    Save { program: String, stderr: String },

    /// The kernel lacks what this backend needs (a module the distribution does not ship):
    /// says what, and the flag that picks a backend that can work.
    #[error("{program}: the kernel has no {lacks}, so {backend} cannot work on this node ({stderr}); {remedy}")]
    KernelLacks {
        program: String,
        backend: &'static str,
        lacks: String,
        remedy: &'static str,
        stderr: String,
    },

    /// A transaction covering both families (nftables' inet tables) was refused whole.
    #[error("{program} rejected the ruleset, changing nothing: {stderr}")]
    Rejected { program: String, stderr: String },

    #[error(
        "cannot open the xtables lock file {}: {error}; iptables-legacy needs a writable \
         /run (or XTABLES_LOCKFILE pointing somewhere writable, such as /dev/shm/xtables.lock)",
        path.display()
    )]
    LockFile {
        path: PathBuf,
        // In the message, not a `source`: `error::report` would print it twice.
        error: std::io::Error,
    },

    #[error(
        "gave up after {}s waiting for the xtables lock ({}) held by another process, \
         changing nothing; retry, or raise --xtables-wait", wait.as_secs(), path.display()
    )]
    LockTimeout { path: PathBuf, wait: Duration },

    #[error(
        "another meshinit run was still at work in this network namespace after {}s, so \
         this one changed nothing; retry, or raise --xtables-wait", wait.as_secs()
    )]
    RunInProgress { wait: Duration },

    #[error("cannot take meshinit's run lock (an abstract unix socket in this network namespace): {errno}")]
    RunLock { errno: nix::errno::Errno },

    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),

    #[error(transparent)]
    IpSet(#[from] IpSetError),

    /// Programming nftables over netlink failed and `nft -f` was not tried (not allowed, or
    /// not installed). The batch is all or nothing: nothing changed.
    #[error("programming nftables over netlink failed, changing nothing: {reason}{}", fallback_note(.fallback))]
    NftablesNetlink {
        reason: String,
        /// Why `nft -f` was not tried instead.
        fallback: &'static str,
    },

    /// A cleanup that kept going after failures: each of them.
    #[error("{} steps failed: {}", .0.len(), numbered(.0))]
    Several(Vec<ApplyError>),

    #[error("{failure}; rolling back {family} also failed: {rollback}")]
    RollbackFailed {
        failure: Box<ApplyError>,
        family: Family,
        rollback: Box<ApplyError>,
    },
}

fn numbered(failures: &[ApplyError]) -> String {
    failures
        .iter()
        .enumerate()
        .map(|(i, failure)| format!("({}) {failure}", i + 1))
        .collect::<Vec<_>>()
        .join("; ")
}

fn fallback_note(fallback: &str) -> String {
    if fallback.is_empty() {
        String::new()
    } else {
        format!(" ({fallback})")
    }
}

fn line_info(line: &Option<usize>, text: &Option<String>) -> String {
    match (line, text) {
        (Some(n), Some(t)) => format!(" at input line {n} ({t:?})"),
        (Some(n), None) => format!(" at input line {n}"),
        _ => String::new(),
    }
}

/// What an apply did, for the summary log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplySummary {
    /// (family, table, rules) for every table written.
    pub rules: Vec<(Family, Table, usize)>,
    /// Families whose earlier rules of ours were replaced (a re-run or a new config).
    pub converged: Vec<Family>,
    pub routing_added: usize,
    pub routing_removed: usize,
    pub sets_created: usize,
    /// Sets of an earlier configuration (or an interrupted run) destroyed.
    pub sets_removed: usize,
}

struct Staged<'a> {
    desired: Cow<'a, FamilyRuleset>,
    /// The family's save before this apply, when it could hold rules of ours.
    previous: Option<String>,
    existing: ExistingState,
    /// Tables present before this apply, where known.
    tables_before: Option<Vec<Table>>,
}

impl Staged<'_> {
    fn family(&self) -> Family {
        self.desired.family
    }

    /// Tables this apply brought into existence: empty again after a rollback.
    fn new_tables(&self) -> Vec<Table> {
        let Some(before) = &self.tables_before else {
            return Vec::new();
        };
        self.desired
            .tables
            .iter()
            .map(|t| t.table)
            .filter(|t| !before.contains(t))
            .collect()
    }
}

fn stage<'a>(
    nf: &mut dyn Netfilter,
    family: Family,
    planned: Option<&'a FamilyRuleset>,
) -> Result<Option<Staged<'a>>, ApplyError> {
    let may_hold = nf.may_hold_rules(family);
    let desired = match planned {
        Some(rules) => Cow::Borrowed(rules),
        // Not planned (IPv6 off), but an earlier configuration may have left rules.
        None if may_hold => Cow::Owned(FamilyRuleset {
            family,
            tables: Vec::new(),
        }),
        None => return Ok(None),
    };
    let previous = if may_hold {
        Some(nf.save(family)?)
    } else {
        None
    };
    let existing = previous.as_deref().map(parse_existing).unwrap_or_default();
    if desired.tables.is_empty() && existing.is_empty() {
        return Ok(None);
    }
    let tables_before = match &previous {
        Some(save) => Some(tables_in_save(save)),
        None => nf.existing_tables(family),
    };
    if tracing::enabled!(tracing::Level::DEBUG) {
        let input = render_restore(&desired, &existing);
        tracing::debug!(%family, input = %input, "restore input");
    }
    Ok(Some(Staged {
        desired,
        previous,
        existing,
        tables_before,
    }))
}

/// Destroys the sets no rule uses any more, reporting rather than failing: what is left
/// is only unused kernel memory.
fn tidy_sets(sets: &mut dyn IpSets) -> usize {
    sets.remove_unused().unwrap_or_else(|err| {
        tracing::warn!(%err, "removing unused ipsets");
        0
    })
}

/// Applies `ruleset`: one restore per family, each a single transaction, converging from
/// whatever an earlier run left. If a later family fails, earlier families and routing are
/// put back as they were, so the namespace never keeps half a ruleset.
///
/// Sets (`--match-sets`) are not part of any transaction, so they are made first, under
/// names no rule uses yet (see `rules::ipset`), and the old ones removed only once nothing
/// uses them: the switch itself happens inside each family's restore.
pub fn apply(
    nf: &mut dyn Netfilter,
    routing: &mut dyn Routing,
    sets: &mut dyn IpSets,
    ruleset: &Ruleset,
) -> Result<ApplySummary, ApplyError> {
    let mut staged = Vec::new();
    for family in Family::ALL {
        if let Some(stage) = stage(nf, family, ruleset.family(family))? {
            staged.push(stage);
        }
    }

    let planned_sets: Vec<_> = ruleset.families().flat_map(FamilyRuleset::sets).collect();
    let sets_created = if planned_sets.is_empty() {
        0
    } else {
        match sets.ensure(&planned_sets) {
            Ok(created) => created,
            Err(err) => {
                tidy_sets(sets);
                return Err(err.into());
            }
        }
    };

    let plan = RoutingPlan {
        ipv6_passthrough_address: ruleset.ipv6_passthrough_address,
        tproxy: ruleset.tproxy_routing.map(|r| (r.mark, r.table)),
        ipv6: ruleset.v6.is_some(),
    };
    // A pod that holds no rules of ours yet gets its routing after its rules: nothing can
    // be tproxied before the rules exist, no container of the pod runs yet (an init
    // container or a CNI ADD comes first), and a run killed in between leaves rules, which
    // the next run finds and converges from, routing included. Routing added first and
    // then orphaned by a kill would look like a fresh pod to the next run, and stay. Over
    // existing rules, traffic may be flowing: the routing goes in first.
    let fresh = staged.iter().all(|s| s.existing.is_empty());
    let mut changes = RoutingChanges::default();
    if !fresh {
        changes = match routing.ensure(&plan) {
            Ok(changes) => changes,
            Err(err) => {
                if !planned_sets.is_empty() {
                    tidy_sets(sets);
                }
                return Err(err);
            }
        };
    }

    let mut failed = None;
    for (index, stage) in staged.iter().enumerate() {
        let input = Planned {
            desired: &stage.desired,
            existing: &stage.existing,
        };
        if let Err(failure) = nf.restore(stage.family(), &input) {
            // iptables-legacy commits table by table, so even the failed family may hold
            // part of the new rules: it is read back and rolled back like the others.
            let ours_now = nf.save(stage.family()).map(|save| parse_existing(&save));
            failed = Some((index, ours_now, failure));
            break;
        }
    }
    if failed.is_none() && fresh {
        match routing.ensure(&plan) {
            Ok(added) => changes = added,
            Err(failure) => failed = Some((staged.len(), Ok(ExistingState::default()), failure)),
        }
    }
    if let Some((index, ours_now, mut failure)) = failed {
        let rollbacks = staged[..index]
            .iter()
            .map(|done| (done, Ok(ExistingState::from_planned(&done.desired))))
            .chain(staged.get(index).map(|stage| (stage, ours_now)));
        for (done, ours_now) in rollbacks.rev() {
            if let Err(rollback) = ours_now.and_then(|ours| roll_back(nf, done, &ours)) {
                failure = ApplyError::RollbackFailed {
                    failure: Box::new(failure),
                    family: done.family(),
                    rollback: Box::new(rollback),
                };
            }
        }
        if let Err(err) = routing.undo(&changes) {
            tracing::error!(%err, "undoing routing changes failed");
        }
        if !planned_sets.is_empty() {
            tidy_sets(sets);
        }
        return Err(failure);
    }

    // Everything is in. What an earlier configuration used and this one does not is
    // tidied up now; failing at that leaves only empty tables or unused routes behind.
    for stage in &staged {
        if let Some(previous) = &stage.previous {
            let unused: Vec<Table> = tables_holding_only_ours(previous)
                .into_iter()
                .filter(|t| stage.desired.table(*t).is_none())
                .collect();
            if let Err(err) = nf.remove_tables(stage.family(), &unused) {
                tracing::warn!(%err, "removing tables no longer used");
            }
        }
    }
    // Routing of an earlier configuration can only be there if its rules were: a fresh pod
    // skips the netlink dumps.
    let converged = staged.iter().any(|s| !s.existing.is_empty());
    let routing_removed = if converged {
        routing.remove_stale(&plan).unwrap_or_else(|err| {
            tracing::warn!(%err, "removing an earlier configuration's routing");
            0
        })
    } else {
        0
    };

    // A re-run also sweeps sets that no rule names any more: an earlier run killed after
    // its rules switched away from them, but before it removed them, leaves such sets.
    let sets_removed = if !planned_sets.is_empty() || (converged && sets.available()) {
        tidy_sets(sets)
    } else {
        0
    };

    Ok(ApplySummary {
        rules: staged
            .iter()
            .flat_map(|s| {
                s.desired
                    .tables
                    .iter()
                    .map(|t| (s.family(), t.table, t.rule_count()))
            })
            .collect(),
        converged: staged
            .iter()
            .filter(|s| !s.existing.is_empty())
            .map(Staged::family)
            .collect(),
        routing_added: changes.added.len(),
        routing_removed,
        sets_created,
        sets_removed,
    })
}

/// Puts one family back the way it was before this apply, in one transaction, given the
/// rules of meshinit's that are in it now.
fn roll_back(
    nf: &mut dyn Netfilter,
    done: &Staged<'_>,
    ours_now: &ExistingState,
) -> Result<(), ApplyError> {
    let family = done.family();
    let input = render_rollback(family, ours_now, done.previous.as_deref());
    if !input.is_empty() {
        tracing::warn!(%family, "rolling back");
        nf.restore(family, &input)?;
    }
    nf.remove_tables(family, &done.new_tables())
}

/// Removes everything of meshinit's (or istio-init's) from the given families and routing.
/// Keeps going after a failure, so one broken family does not leave the others behind;
/// every failure is reported, in one error.
pub fn cleanup(
    nf: &mut dyn Netfilter,
    routing: &mut dyn Routing,
    sets: &mut dyn IpSets,
    families: &[Family],
) -> Result<usize, ApplyError> {
    let mut failures = Vec::new();
    let mut removed = 0;
    for &family in families {
        if !nf.may_hold_rules(family) {
            continue;
        }
        let result = nf.save(family).and_then(|save| {
            let existing = parse_existing(&save);
            if existing.is_empty() {
                return Ok(0);
            }
            let empty = FamilyRuleset {
                family,
                tables: Vec::new(),
            };
            let count = existing
                .tables
                .iter()
                .map(|(_, t)| t.builtin_rules.len() + t.own_chains.len())
                .sum::<usize>();
            nf.restore(family, &render_restore(&empty, &existing))?;
            nf.remove_tables(family, &tables_holding_only_ours(&save))?;
            Ok(count)
        });
        removed += keep_going(result, &mut failures);
    }
    removed += keep_going(routing.remove_all(), &mut failures);
    // With the rules gone, every set of meshinit's is unused. A kernel without ipset has
    // none to remove.
    if sets.available() {
        removed += keep_going(sets.remove_unused().map_err(Into::into), &mut failures);
    }
    all_of(failures).map(|()| removed)
}

/// The count of a step that worked; a failed one is kept for [`all_of`] and counts 0.
pub fn keep_going(result: Result<usize, ApplyError>, failures: &mut Vec<ApplyError>) -> usize {
    result.unwrap_or_else(|err| {
        match err {
            ApplyError::Several(several) => failures.extend(several),
            err => failures.push(err),
        }
        0
    })
}

/// Every failure of a run that kept going, as one error (the failure itself when alone).
pub fn all_of(mut failures: Vec<ApplyError>) -> Result<(), ApplyError> {
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.remove(0)),
        _ => Err(ApplyError::Several(failures)),
    }
}

#[cfg(test)]
mod tests;
