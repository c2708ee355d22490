//! Ruleset → kernel, all or nothing.
//!
//! This module holds only what every backend shares: the small traits the kernel is
//! reached through, and the errors. `Netfilter` (save and restore one family's tables,
//! through `iptables-restore` in production), `IpSets` (the named sets of `--match-sets` on
//! iptables), `Nftables` (Istio's native nftables tables, over netlink or `nft -f`) and
//! `Routing` (TPROXY policy routing and the `::6` address, over netlink). Each backend is
//! one file that applies, cleans up and reads back through them: `iptables.rs` and
//! `nft.rs`. Tests drive both with recording fakes.

mod ipsets;
pub mod iptables;
mod kernel;
mod locks;
pub mod nft;
mod routing;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use ipsets::NetlinkIpSets;
pub use locks::RunLock;
pub use routing::NetlinkRouting;

use crate::netlink::BatchError;
use ipnet::IpNet;

use crate::rules::iptables::ipset::{IpSet, SetMembers};
use crate::rules::iptables::model::Table;
use crate::rules::nft::encode::Batch;
use crate::rules::nft::model::ExistingTables;
use crate::values::{Family, OwnerKind};

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

/// nftables as meshinit uses it: read which of its tables exist, commit one transaction
/// over netlink or through `nft -f`.
pub trait Nftables {
    /// meshinit's tables and their chains as they are now; `None` when that cannot be
    /// known without launching anything.
    fn existing(&mut self) -> Option<ExistingTables>;
    /// Whether `run` can work at all (the `nft` binary is there).
    fn available(&self) -> bool;
    /// A user's (or group's) id, as nft would resolve the name; `None` if unknown.
    fn owner_id(&self, kind: OwnerKind, name: &str) -> Option<u32>;
    /// Sends `batch` over netlink; the kernel commits all of it or nothing.
    fn commit(&mut self, batch: &Batch) -> Result<(), BatchError>;
    /// Runs `script` through `nft -f -` as one transaction.
    fn run(&mut self, script: &str) -> Result<(), ApplyError>;
    /// meshinit's `inet` tables by name, each as `nft -s list table` prints it (`-s`:
    /// without counter values, which differ between a pod that saw traffic and a copy).
    fn listing(&mut self) -> Result<BTreeMap<String, String>, ApplyError>;
    /// Processes launched so far.
    fn processes_launched(&self) -> usize;
}

/// The sets the engine needs, behind a trait so the engine is tested with a fake.
pub trait IpSets {
    /// Whether this kernel can hold sets; asked before planning with them.
    fn available(&mut self) -> bool;
    /// Makes every set in `sets` exist with its members. Returns how many it created.
    fn ensure(&mut self, sets: &[Arc<IpSet>]) -> Result<usize, IpSetError>;
    /// Destroys every set of meshinit's that no rule uses. Returns how many.
    fn remove_unused(&mut self) -> Result<usize, IpSetError>;
    /// Every set of meshinit's here, with its members as the kernel lists them.
    fn contents(&mut self) -> Result<Vec<SetContents>, IpSetError>;
}

/// One set of meshinit's as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetContents {
    pub name: String,
    pub members: BTreeSet<SetMember>,
}

/// One member of a set, as the kernel lists it: a network of a `hash:net` set, or one
/// port of a `bitmap:port` set (the kernel holds a range as its ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetMember {
    Net(IpNet),
    Port(u16),
}

impl SetMember {
    /// The members `set` holds once created, as the kernel lists them.
    pub fn of(set: &IpSet) -> BTreeSet<SetMember> {
        match set.members() {
            SetMembers::Nets(nets) => nets.iter().map(|n| SetMember::Net(*n)).collect(),
            SetMembers::Ports(ranges) => ranges
                .iter()
                .flat_map(|r| r.first().get()..=r.last().get())
                .map(SetMember::Port)
                .collect(),
        }
    }
}

/// As `ipset` writes it.
impl std::fmt::Display for SetMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetMember::Net(net) => write!(f, "{net}"),
            SetMember::Port(port) => write!(f, "{port}"),
        }
    }
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
    /// Every rule and route meshinit tagged here, and (when `passthrough_address`) whether
    /// `lo` holds the `::6` address.
    fn read(&mut self, passthrough_address: bool) -> Result<RoutingState, ApplyError>;
}

/// What `Routing::read` finds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingState {
    pub entries: Vec<RoutingEntry>,
    /// Whether `lo` holds `::6` (false when not asked).
    pub passthrough_address: bool,
}

/// One tagged rule or route, as far as meshinit's plans describe them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingEntry {
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
    pub fn family(&self) -> Family {
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

/// An ipset request the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("{action} ipset {set}: {}", describe(*.code))]
pub struct IpSetError {
    pub action: &'static str,
    pub set: String,
    /// The kernel's code: an errno, or one of ipset's own above 4096.
    pub code: i32,
}

const IPSET_ERR_PRIVATE: i32 = 4096;
/// `IPSET_ERR_BUSY`: the set is in use by a rule.
pub(crate) const IPSET_ERR_BUSY: i32 = 4100;

fn describe(code: i32) -> String {
    let ipset = match code - IPSET_ERR_PRIVATE {
        1 => Some("protocol error (this kernel's ipset is too old)"),
        2 => Some("set type not supported by this kernel"),
        3 => Some("too many sets in this namespace (CONFIG_IP_SET_MAX)"),
        4 => Some("set in use by a rule"),
        7 => Some("set exists"),
        8 => Some("invalid CIDR prefix"),
        10 => Some("wrong family for this set"),
        _ => None,
    };
    match ipset {
        Some(text) => text.to_string(),
        None if code > IPSET_ERR_PRIVATE => format!("ipset error {code}"),
        None => nix::errno::Errno::from_raw(code).to_string(),
    }
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
pub(crate) mod tests;
