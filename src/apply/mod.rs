//! Ruleset → kernel, all or nothing.
//!
//! The engine only talks to two small traits: `Netfilter` (save and restore one family's
//! tables, through `iptables-restore` in production) and `Routing` (TPROXY policy routing
//! and the `::6` address, over netlink). Tests drive it with recording fakes.

mod backend;
mod routing;

use std::time::Duration;

pub use backend::{Backend, IptablesTools};
pub use routing::NetlinkRouting;

use crate::rules::iptables::{
    parse_existing, render_restore, saved_tables, tables_holding_only_ours, ExistingState,
};
use crate::rules::model::{Family, FamilyRuleset, Ruleset, Table};

/// How a restore treats the tables it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// `--noflush`: change only what the input says (normal apply and cleanup).
    NoFlush,
    /// Replace the named tables wholesale (rollback to a saved state).
    ReplaceTables,
}

/// One family's netfilter tables, as `iptables-save`/`iptables-restore` see them.
pub trait Netfilter {
    /// Which implementation this is, for logs.
    fn describe(&self) -> String;
    /// A cheap probe, without launching anything where possible: could this family's
    /// tables hold rules of ours? `false` lets apply skip the save.
    fn may_hold_rules(&mut self, family: Family) -> bool;
    fn save(&mut self, family: Family) -> Result<String, ApplyError>;
    fn restore(&mut self, family: Family, input: &str, mode: RestoreMode)
        -> Result<(), ApplyError>;
    /// Removes tables that cleanup left empty, where the backend can (nft can; legacy
    /// tables stay registered once used, as with any iptables command).
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

    #[error("starting {program} failed: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
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

    #[error(
        "gave up after {}s waiting for the xtables lock (/run/xtables.lock) held by another \
         process; retry, or raise --xtables-wait", wait.as_secs()
    )]
    LockTimeout { program: String, wait: Duration },

    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),

    #[error("{failure}; rolling back {family} also failed: {rollback}")]
    RollbackFailed {
        failure: Box<ApplyError>,
        family: Family,
        rollback: Box<ApplyError>,
    },
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
}

struct Staged<'a> {
    rules: &'a FamilyRuleset,
    input: String,
    previous: Option<String>,
    existing: ExistingState,
}

/// Applies `ruleset`: one restore per family, each a single transaction. If a later family
/// fails, earlier families and routing are put back as they were, so the namespace never
/// keeps half a ruleset.
pub fn apply(
    nf: &mut dyn Netfilter,
    routing: &mut dyn Routing,
    ruleset: &Ruleset,
) -> Result<ApplySummary, ApplyError> {
    let mut staged = Vec::new();
    for rules in ruleset.families() {
        let previous = if nf.may_hold_rules(rules.family) {
            Some(nf.save(rules.family)?)
        } else {
            None
        };
        let existing = previous.as_deref().map(parse_existing).unwrap_or_default();
        let input = render_restore(rules, &existing);
        tracing::debug!(family = %rules.family, input = %input, "restore input");
        staged.push(Staged {
            rules,
            input,
            previous,
            existing,
        });
    }

    let plan = RoutingPlan {
        ipv6_passthrough_address: ruleset.ipv6_passthrough_address,
        tproxy: ruleset.tproxy_routing.map(|r| (r.mark, r.table)),
        ipv6: ruleset.v6.is_some(),
    };
    let changes = routing.ensure(&plan)?;

    for (index, stage) in staged.iter().enumerate() {
        if let Err(failure) = nf.restore(stage.rules.family, &stage.input, RestoreMode::NoFlush) {
            let mut failure = failure;
            for done in staged[..index].iter().rev() {
                if let Err(rollback) = roll_back(nf, done) {
                    failure = ApplyError::RollbackFailed {
                        failure: Box::new(failure),
                        family: done.rules.family,
                        rollback: Box::new(rollback),
                    };
                }
            }
            if let Err(err) = routing.undo(&changes) {
                tracing::error!(%err, "undoing routing changes failed");
            }
            return Err(failure);
        }
    }

    Ok(ApplySummary {
        rules: staged
            .iter()
            .flat_map(|s| {
                s.rules
                    .tables
                    .iter()
                    .map(|t| (s.rules.family, t.table, t.rule_count()))
            })
            .collect(),
        converged: staged
            .iter()
            .filter(|s| !s.existing.is_empty())
            .map(|s| s.rules.family)
            .collect(),
        routing_added: changes.added.len(),
    })
}

/// Puts one already-applied family back the way it was.
fn roll_back(nf: &mut dyn Netfilter, done: &Staged<'_>) -> Result<(), ApplyError> {
    let family = done.rules.family;
    tracing::warn!(%family, "rolling back");
    match &done.previous {
        Some(previous) => {
            let tables: Vec<Table> = done
                .rules
                .tables
                .iter()
                .map(|t| t.table)
                .chain(done.existing.tables.iter().map(|(t, _)| *t))
                .collect();
            nf.restore(
                family,
                &saved_tables(previous, &tables),
                RestoreMode::ReplaceTables,
            )
        }
        None => {
            let empty = FamilyRuleset {
                family,
                tables: Vec::new(),
            };
            let input = render_restore(&empty, &ExistingState::from_planned(done.rules));
            nf.restore(family, &input, RestoreMode::NoFlush)
        }
    }
}

/// Removes everything of meshinit's (or istio-init's) from the given families and routing.
/// Keeps going after a failure, so one broken family does not leave the others behind;
/// returns the first error.
pub fn cleanup(
    nf: &mut dyn Netfilter,
    routing: &mut dyn Routing,
    families: &[Family],
) -> Result<usize, ApplyError> {
    let mut first_error = None;
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
            nf.restore(
                family,
                &render_restore(&empty, &existing),
                RestoreMode::NoFlush,
            )?;
            nf.remove_tables(family, &tables_holding_only_ours(&save))?;
            Ok(count)
        });
        match result {
            Ok(count) => removed += count,
            Err(err) => {
                tracing::error!(%family, %err, "cleanup failed");
                first_error.get_or_insert(err);
            }
        }
    }
    match routing.remove_all() {
        Ok(count) => removed += count,
        Err(err) => {
            tracing::error!(%err, "routing cleanup failed");
            first_error.get_or_insert(err);
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(removed),
    }
}

#[cfg(test)]
mod tests;
