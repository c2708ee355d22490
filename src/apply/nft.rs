//! The native nftables backend (`--native-nftables`): Istio's `inet` tables, written as one
//! transaction that the kernel commits all or nothing: over netlink (one nfnetlink batch,
//! no process launched), or through one `nft -f -` process.
//!
//! By default (`--nftables-apply=auto`) the batch goes over netlink, and if that fails for
//! any reason (a name only the C library can resolve, a kernel that refuses what nft would
//! phrase differently, no netlink at all), the same transaction goes to `nft -f`, with the
//! reason logged; a refused batch changed nothing, so the retry starts from the same state.
//!
//! What is there now is read over netlink (one dump of nf_tables chains), never by launching
//! anything: it decides whether the transaction must delete an earlier configuration's
//! tables or chains, and whether cleanup has anything to do. TPROXY routing and the `::6`
//! address go through the same `Routing` as for iptables. The engine only talks to the
//! small `Nftables` trait, so tests drive it with a recording, fault-injecting fake.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{ApplyError, Nftables, Routing, RoutingChanges, RoutingPlan};
use crate::config::NftablesApply;
use crate::netlink::{BatchError, Socket};
use crate::rules::nft::encode::{encode, Batch};
use crate::rules::nft::model::{ExistingTables, NftRuleset, Table};
use crate::rules::nft::render::{op_text, render_ops};
use crate::rules::nft::txn::{self, Op};
use crate::values::OwnerKind;
use nix::errno::Errno;

/// The nf_tables family number of `inet` tables (NFPROTO_INET).
const NFPROTO_INET: u8 = 1;

/// The production `Nftables`: netlink, and the `nft` binary when asked for or as fallback.
#[derive(Debug, Default)]
pub struct NftTool {
    path: Option<PathBuf>,
    launched: usize,
}

/// The `nft` binary, also where PATH lacks the sbin directories (minimal images).
pub fn find_nft() -> Option<PathBuf> {
    which::which("nft").ok().or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|dir| Path::new(dir).join("nft"))
            .find(|p| p.is_file())
    })
}

fn missing_nft() -> ApplyError {
    ApplyError::MissingBinary {
        program: "nft".to_owned(),
        package: "nftables",
    }
}

impl NftTool {
    /// Looks for `nft` in PATH and the sbin directories; finding nothing is not an error
    /// until something has to run it (netlink needs no binary).
    pub fn new() -> NftTool {
        NftTool {
            path: find_nft(),
            launched: 0,
        }
    }

    /// Fails, naming the package, unless `nft` was found: apply checks this before it
    /// changes anything when it is to use nft only.
    pub fn require(&self) -> Result<(), ApplyError> {
        match self.path {
            Some(_) => Ok(()),
            None => Err(missing_nft()),
        }
    }
}

/// meshinit's tables among `chains` (as `Socket::nftables_chains` lists them), with their
/// chains in kernel order.
fn our_tables(chains: &[(u8, String, String)]) -> ExistingTables {
    let mut existing = ExistingTables::default();
    for (family, table, chain) in chains {
        let Some(table) = Table::from_name(table).filter(|_| *family == NFPROTO_INET) else {
            continue;
        };
        match existing.tables.iter_mut().find(|(t, _)| *t == table) {
            Some((_, names)) => names.push(chain.clone()),
            None => existing.tables.push((table, vec![chain.clone()])),
        }
    }
    existing.tables.sort_by_key(|(t, _)| *t);
    existing
}

/// The id of `name` in a passwd or group file's text (`name:x:ID:...`), as the C library's
/// "files" source finds it.
pub fn id_in(file: &str, name: &str) -> Option<u32> {
    file.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next() == Some(name))
            .then(|| fields.nth(1)?.trim().parse().ok())
            .flatten()
    })
}

impl Nftables for NftTool {
    fn existing(&mut self) -> Option<ExistingTables> {
        // The generation before and after the listing: equal, the listing is of that
        // generation (else the batch goes without the check).
        let read = || -> Result<ExistingTables, crate::netlink::NetlinkError> {
            let mut socket = Socket::netfilter()?;
            let before = socket.nftables_generation().ok();
            let chains = socket.nftables_chains()?;
            let after = socket.nftables_generation().ok();
            let mut existing = our_tables(&chains);
            existing.generation = before.filter(|_| before == after);
            Ok(existing)
        };
        match read() {
            Ok(existing) => Some(existing),
            Err(err) => {
                tracing::debug!(%err, "cannot list nf_tables chains; assuming any state");
                None
            }
        }
    }

    fn available(&self) -> bool {
        self.path.is_some()
    }

    fn owner_id(&self, kind: OwnerKind, name: &str) -> Option<u32> {
        let file = match kind {
            OwnerKind::Uid => "/etc/passwd",
            OwnerKind::Gid => "/etc/group",
        };
        id_in(&std::fs::read_to_string(file).ok()?, name)
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), BatchError> {
        Socket::netfilter()?.nftables_batch(batch.bytes(), batch.begin_seq(), batch.last_seq())
    }

    fn run(&mut self, script: &str) -> Result<(), ApplyError> {
        let path = self.path.as_ref().ok_or_else(missing_nft)?;
        let spawn_error = |error| ApplyError::Spawn {
            program: "nft".to_owned(),
            error,
        };
        // nft has no end-of-input marker: whatever it has read when its input ends, it
        // commits. Streamed through a pipe, a meshinit killed mid-write would commit a
        // truncated transaction, so nft starts only once the whole script is in a file.
        let input = complete_input(script).map_err(spawn_error)?;
        let child = Command::new(path)
            .args(["-f", "-"])
            .stdin(Stdio::from(input))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        self.launched += 1;
        let output = child.wait_with_output().map_err(spawn_error)?;
        if output.status.success() {
            return Ok(());
        }
        // nft's message names the input line (`/dev/stdin:LINE:COLUMNS`) and quotes it.
        Err(ApplyError::Rejected {
            program: "nft -f -".to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }

    fn listing(&mut self) -> Result<BTreeMap<String, String>, ApplyError> {
        let path = self.path.clone().ok_or_else(missing_nft)?;
        let chains = Socket::netfilter()?.nftables_chains()?;
        let mut listed = BTreeMap::new();
        for (table, _) in our_tables(&chains).tables {
            let name = table.name();
            let output = Command::new(&path)
                .args(["-s", "list", "table", "inet", name])
                .output()
                .map_err(|error| ApplyError::Spawn {
                    program: "nft".to_owned(),
                    error,
                })?;
            self.launched += 1;
            if !output.status.success() {
                return Err(ApplyError::Save {
                    program: format!("nft list table inet {name}"),
                    stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                });
            }
            listed.insert(
                name.to_owned(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
            );
        }
        Ok(listed)
    }

    fn processes_launched(&self) -> usize {
        self.launched
    }
}

/// `text` in an anonymous in-memory file, read from its start: a child given it as input
/// sees all of it or, if meshinit dies before starting the child, nothing.
fn complete_input(text: &str) -> std::io::Result<std::fs::File> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::io::{Seek, SeekFrom};
    let fd = memfd_create(c"meshinit-nft-input", MemFdCreateFlag::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(text.as_bytes())?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// How a transaction got into the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Programmed {
    /// One nfnetlink batch; no process launched.
    Netlink,
    /// `nft -f -`: asked for, or, with the reason, after netlink failed.
    Nft { fallback_from: Option<String> },
}

impl Programmed {
    /// For the summary log line.
    pub fn via(&self) -> &'static str {
        match self {
            Programmed::Netlink => "netlink",
            Programmed::Nft {
                fallback_from: None,
            } => "nft",
            Programmed::Nft { .. } => "nft (netlink failed)",
        }
    }
}

/// Why a netlink batch failed, in words: the operation the kernel refused, quoted as nft
/// text, when it says which.
fn netlink_failure(err: &BatchError, batch: &Batch, ops: &[Op<'_>]) -> String {
    match err {
        BatchError::Refused(refusals) => refusals
            .iter()
            .map(
                |(seq, errno)| match batch.op_index(*seq).and_then(|i| ops.get(i)) {
                    Some(op) => format!("the kernel refused `{}`: {errno}", op_text(op)),
                    None => format!("the kernel refused the batch: {errno}"),
                },
            )
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// How often a transaction is planned again when nf_tables changed between reading its
/// state and committing; the last attempt commits without the check, as nft would.
const ATTEMPTS: usize = 3;

/// Why a netlink commit did not happen.
enum NotCommitted {
    /// nf_tables changed since `generation`: the transaction must be planned again.
    Changed,
    /// Anything else, in words.
    Failed(String),
}

/// Encodes `ops` (against `generation`, when known) and sends them as one batch.
fn commit_batch(
    nft: &mut dyn Nftables,
    ops: &[Op<'_>],
    generation: Option<u32>,
) -> Result<(), NotCommitted> {
    let encoded = {
        let lookup = |kind: OwnerKind, name: &str| nft.owner_id(kind, name);
        encode(ops, &lookup, generation)
    };
    let batch = encoded.map_err(|err| NotCommitted::Failed(err.to_string()))?;
    match nft.commit(&batch) {
        Ok(()) => Ok(()),
        Err(BatchError::Refused(refusals))
            if refusals
                .iter()
                .any(|(seq, errno)| *seq == batch.begin_seq() && *errno == Errno::ERESTART) =>
        {
            Err(NotCommitted::Changed)
        }
        Err(err) => Err(NotCommitted::Failed(netlink_failure(&err, &batch, ops))),
    }
}

/// Reads what is there (`Nftables::existing`, unless the caller `already_read` it), makes the transaction from it with `build`,
/// and gets it into the kernel as `mode` says: over netlink, through `nft -f`, or over
/// netlink falling back to `nft -f`. A batch planned on a state that changed before it
/// arrived is refused by the kernel, and planned again. Returns how it went in and the
/// state it was planned on (`None`: nothing was to be done).
pub fn program<'a>(
    nft: &mut dyn Nftables,
    mode: NftablesApply,
    already_read: Option<Option<ExistingTables>>,
    build: &dyn Fn(Option<&ExistingTables>) -> Option<Vec<Op<'a>>>,
) -> Result<Option<(Programmed, Option<ExistingTables>)>, ApplyError> {
    let mut attempt = 1;
    let mut already_read = already_read;
    let (existing, ops, reason) = loop {
        let existing = already_read.take().unwrap_or_else(|| nft.existing());
        let Some(ops) = build(existing.as_ref()).filter(|ops| !ops.is_empty()) else {
            return Ok(None);
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(input = %render_ops(&ops, 0), "nftables transaction");
        }
        if mode == NftablesApply::Nft {
            nft.run(&render_ops(&ops, 0))?;
            let programmed = Programmed::Nft {
                fallback_from: None,
            };
            return Ok(Some((programmed, existing)));
        }
        let generation = existing
            .as_ref()
            .and_then(|e| e.generation)
            .filter(|_| attempt < ATTEMPTS);
        match commit_batch(nft, &ops, generation) {
            Ok(()) => return Ok(Some((Programmed::Netlink, existing))),
            Err(NotCommitted::Changed) => {
                tracing::debug!(
                    attempt,
                    "nf_tables changed since it was read; planning again"
                );
                attempt += 1;
            }
            Err(NotCommitted::Failed(reason)) => break (existing, ops, reason),
        }
    };
    // A kernel without nf_tables refuses every batch, and nft can do no better.
    if super::kernel::nf_tables_missing(&mut None) {
        return Err(ApplyError::KernelLacks {
            program: "meshinit".to_owned(),
            backend: "--native-nftables",
            lacks: "nf_tables (module nf_tables)".to_owned(),
            remedy: "leave out --native-nftables (NATIVE_NFTABLES) to use iptables-legacy",
            stderr: reason,
        });
    }
    if mode == NftablesApply::Netlink {
        return Err(ApplyError::NftablesNetlink {
            reason,
            fallback: "--nftables-apply=netlink: nft -f not tried",
        });
    }
    if !nft.available() {
        return Err(ApplyError::NftablesNetlink {
            reason,
            fallback: "nft, the fallback, is not installed",
        });
    }
    tracing::warn!(%reason, "programming nftables over netlink failed; running nft -f instead");
    nft.run(&render_ops(&ops, 0))?;
    let programmed = Programmed::Nft {
        fallback_from: Some(reason),
    };
    Ok(Some((programmed, existing)))
}

/// What an nftables apply did, for the summary log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftSummary {
    /// (table, rules) for every table written.
    pub rules: Vec<(Table, usize)>,
    /// Whether tables of meshinit's were there before (a re-run or a new configuration).
    pub converged: bool,
    pub routing_added: usize,
    pub routing_removed: usize,
    pub programmed: Programmed,
}

/// Applies `ruleset` in one transaction, converging from whatever an earlier run left:
/// routing first, then the tables; if the transaction is refused, the routing this apply
/// added is taken back, so the namespace is as it was.
pub fn apply_nftables(
    nft: &mut dyn Nftables,
    routing: &mut dyn Routing,
    ruleset: &NftRuleset,
    mode: NftablesApply,
) -> Result<NftSummary, ApplyError> {
    let plan = RoutingPlan {
        ipv6_passthrough_address: ruleset.ipv6_passthrough_address,
        tproxy: ruleset.tproxy_routing.map(|r| (r.mark, r.table)),
        ipv6: ruleset.ipv6,
    };
    // As for iptables (`apply::apply`): a pod without tables of ours gets its routing
    // after its tables, so that a run killed in between leaves tables the next run sees.
    let existing = nft.existing();
    let fresh = existing.as_ref().is_some_and(ExistingTables::is_empty);
    let mut changes = if fresh {
        RoutingChanges::default()
    } else {
        routing.ensure(&plan)?
    };
    let build = |existing: Option<&ExistingTables>| Some(txn::transaction(ruleset, existing));
    let programmed = program(nft, mode, Some(existing), &build).and_then(|done| {
        if fresh {
            match routing.ensure(&plan) {
                Ok(added) => changes = added,
                Err(failure) => {
                    // Fresh: every table of the plan is this run's own.
                    let ours: Vec<Table> = ruleset.tables.iter().map(|t| t.table).collect();
                    let undo = |_: Option<&ExistingTables>| Some(txn::cleanup(&ours));
                    if let Err(err) = program(nft, mode, None, &undo) {
                        tracing::error!(%err, "taking back the tables of a failed apply");
                    }
                    return Err(failure);
                }
            }
        }
        Ok(done)
    });
    let (programmed, existing) = match programmed {
        Ok(Some(done)) => done,
        // The plan always has a table, so there is always something to send.
        Ok(None) => (Programmed::Netlink, None),
        Err(failure) => {
            if let Err(err) = routing.undo(&changes) {
                tracing::error!(%err, "undoing routing changes failed");
            }
            return Err(failure);
        }
    };
    // An earlier configuration's routing can only be there if its tables were: a fresh pod
    // skips the netlink dumps.
    let converged = existing.as_ref().is_none_or(|e| !e.is_empty());
    let routing_removed = if converged {
        routing.remove_stale(&plan).unwrap_or_else(|err| {
            tracing::warn!(%err, "removing an earlier configuration's routing");
            0
        })
    } else {
        0
    };
    Ok(NftSummary {
        rules: ruleset
            .tables
            .iter()
            .map(|t| (t.table, t.rule_count()))
            .collect(),
        converged,
        routing_added: changes.added.len(),
        routing_removed,
        programmed,
    })
}

/// Deletes meshinit's tables, in one transaction, if there are any: with none (as netlink
/// reports), nothing is sent or launched. Returns how many tables were deleted.
pub fn cleanup_nftables(nft: &mut dyn Nftables, mode: NftablesApply) -> Result<usize, ApplyError> {
    let available = nft.available();
    let tables = |existing: Option<&ExistingTables>| -> Option<Vec<Table>> {
        match existing {
            Some(existing) => Some(existing.tables.iter().map(|(t, _)| *t).collect()),
            // Not known: netlink is not answering, so only nft could do anything.
            None if !available => None,
            None => Some(Table::ALL.to_vec()),
        }
    };
    let build = |existing: Option<&ExistingTables>| tables(existing).map(|t| txn::cleanup(&t));
    Ok(match program(nft, mode, None, &build)? {
        Some((_, existing)) => tables(existing.as_ref()).map_or(0, |t| t.len()),
        None => 0,
    })
}

/// Cleanup for `--native-nftables`: meshinit's tables, then every rule and route meshinit
/// tagged and the `::6` address. Keeps going after a failure; reports every one.
pub fn cleanup_native(
    nft: &mut dyn Nftables,
    routing: &mut dyn Routing,
    mode: NftablesApply,
) -> Result<usize, ApplyError> {
    let mut failures = Vec::new();
    let removed = super::keep_going(cleanup_nftables(nft, mode), &mut failures)
        + super::keep_going(routing.remove_all(), &mut failures);
    super::all_of(failures).map(|()| removed)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::apply::{RoutingChanges, RoutingItem, RoutingState};
    use crate::config::{InboundCapture, InterceptionMode, OwnerGroups};
    use crate::rules::iptables::model::{Family, Owner};
    use crate::rules::nft::plan::plan;
    use crate::rules::nft::plan::tests::base;
    use nix::errno::Errno;

    /// How the fake's netlink commit fails, when it does.
    #[derive(Debug, Clone, Copy)]
    enum Fault {
        /// The kernel refuses the message numbered `nth` of the batch (1 = the first after
        /// BATCH_BEGIN).
        Refuse {
            nth: u32,
            errno: Errno,
        },
        /// No netlink socket at all.
        NoSocket,
        NoAck,
        /// nf_tables changes between each read and commit, this many times (only
        /// batches checked against a generation are refused for it).
        Changed(usize),
    }

    /// Records every batch and transaction; fails on request.
    #[derive(Default)]
    pub(crate) struct FakeNft {
        /// What `listing` shows.
        pub(crate) listing: BTreeMap<String, String>,
        existing: Option<ExistingTables>,
        /// `nft` is not installed.
        missing: bool,
        /// `nft -f` refuses what it gets.
        fail: bool,
        fault: Option<Fault>,
        groups: Vec<(String, u32)>,
        reads: u32,
        batches: Vec<usize>,
        scripts: Vec<String>,
    }

    impl Nftables for FakeNft {
        fn existing(&mut self) -> Option<ExistingTables> {
            self.reads += 1;
            self.existing.clone().map(|mut e| {
                e.generation = Some(self.reads);
                e
            })
        }
        fn available(&self) -> bool {
            !self.missing
        }
        fn owner_id(&self, kind: OwnerKind, name: &str) -> Option<u32> {
            (kind == OwnerKind::Gid)
                .then(|| {
                    self.groups
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, id)| *id)
                })
                .flatten()
        }
        fn commit(&mut self, batch: &Batch) -> Result<(), BatchError> {
            self.batches.push(batch.messages());
            match self.fault {
                None => Ok(()),
                Some(Fault::Refuse { nth, errno }) => {
                    Err(BatchError::Refused(vec![(batch.begin_seq() + nth, errno)]))
                }
                Some(Fault::NoSocket) => Err(BatchError::Io(crate::netlink::NetlinkError {
                    what: "socket",
                    errno: Errno::EPROTONOSUPPORT,
                })),
                Some(Fault::NoAck) => Err(BatchError::NoAck),
                Some(Fault::Changed(times)) => {
                    if times == 0 || batch.generation().is_none() {
                        return Ok(());
                    }
                    self.fault = Some(Fault::Changed(times - 1));
                    Err(BatchError::Refused(vec![(
                        batch.begin_seq(),
                        Errno::ERESTART,
                    )]))
                }
            }
        }
        fn run(&mut self, script: &str) -> Result<(), ApplyError> {
            self.scripts.push(script.to_owned());
            if self.missing {
                return Err(missing_nft());
            }
            if self.fail {
                return Err(ApplyError::Rejected {
                    program: "nft".into(),
                    stderr: "refused".into(),
                });
            }
            Ok(())
        }
        fn listing(&mut self) -> Result<BTreeMap<String, String>, ApplyError> {
            Ok(self.listing.clone())
        }
        fn processes_launched(&self) -> usize {
            self.scripts.len()
        }
    }

    fn fresh() -> FakeNft {
        FakeNft {
            existing: Some(ExistingTables::default()),
            ..FakeNft::default()
        }
    }

    #[derive(Default)]
    struct FakeRouting {
        calls: Vec<String>,
        fail_ensure: bool,
    }

    impl Routing for FakeRouting {
        fn ensure(&mut self, plan: &RoutingPlan) -> Result<RoutingChanges, ApplyError> {
            self.calls.push(format!("ensure {plan:?}"));
            if self.fail_ensure {
                return Err(ApplyError::Netlink(crate::netlink::NetlinkError {
                    what: "adding a rule",
                    errno: Errno::EPERM,
                }));
            }
            let mut changes = RoutingChanges::default();
            if let Some((mark, table)) = plan.tproxy {
                changes.added.push(RoutingItem::Rule {
                    family: Family::V4,
                    mark,
                    table,
                });
            }
            Ok(changes)
        }
        fn undo(&mut self, changes: &RoutingChanges) -> Result<(), ApplyError> {
            self.calls.push(format!("undo {}", changes.added.len()));
            Ok(())
        }
        fn remove_stale(&mut self, _: &RoutingPlan) -> Result<usize, ApplyError> {
            self.calls.push("remove_stale".into());
            Ok(0)
        }
        fn remove_all(&mut self) -> Result<usize, ApplyError> {
            self.calls.push("remove_all".into());
            Ok(0)
        }
        fn read(&mut self, _: bool) -> Result<RoutingState, ApplyError> {
            self.calls.push("read".into());
            Ok(RoutingState::default())
        }
    }

    fn tproxy_plan() -> NftRuleset {
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::AllExcept(vec![]);
        plan(&cfg)
    }

    #[test]
    fn fresh_pod_is_one_batch_and_nothing_launched() {
        let mut nft = fresh();
        let mut routing = FakeRouting::default();
        let summary =
            apply_nftables(&mut nft, &mut routing, &tproxy_plan(), NftablesApply::Auto).unwrap();
        assert_eq!(nft.batches.len(), 1);
        assert!(nft.scripts.is_empty());
        assert_eq!(summary.programmed, Programmed::Netlink);
        assert!(!summary.converged);
        assert_eq!(summary.routing_added, 1);
        assert_eq!(routing.calls.len(), 1, "{:?}", routing.calls);
        assert_eq!(
            summary.rules.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [Table::Nat, Table::Mangle]
        );
    }

    #[test]
    fn nft_mode_is_one_transaction_through_nft() {
        let mut nft = fresh();
        let mut routing = FakeRouting::default();
        let summary =
            apply_nftables(&mut nft, &mut routing, &tproxy_plan(), NftablesApply::Nft).unwrap();
        assert!(nft.batches.is_empty());
        assert_eq!(nft.scripts.len(), 1);
        assert!(!nft.scripts[0].contains("delete"));
        assert_eq!(
            summary.programmed,
            Programmed::Nft {
                fallback_from: None
            }
        );
    }

    #[test]
    fn a_refused_batch_falls_back_to_nft_naming_the_refused_rule() {
        // The third message of a fresh REDIRECT plan: flush, then the chains.
        let mut nft = FakeNft {
            fault: Some(Fault::Refuse {
                nth: 3,
                errno: Errno::EOPNOTSUPP,
            }),
            ..fresh()
        };
        let mut routing = FakeRouting::default();
        let summary =
            apply_nftables(&mut nft, &mut routing, &plan(&base()), NftablesApply::Auto).unwrap();
        assert_eq!(nft.batches.len(), 1);
        assert_eq!(nft.scripts.len(), 1, "the same transaction through nft -f");
        let Programmed::Nft {
            fallback_from: Some(reason),
        } = summary.programmed
        else {
            panic!("expected a fallback, got {:?}", summary.programmed);
        };
        assert!(
            reason.contains("add chain inet istio-proxy-nat output { type nat hook output")
                && reason.contains("EOPNOTSUPP"),
            "{reason}"
        );
    }

    #[test]
    fn every_netlink_failure_falls_back() {
        for fault in [Fault::NoSocket, Fault::NoAck] {
            let mut nft = FakeNft {
                fault: Some(fault),
                ..fresh()
            };
            let mut routing = FakeRouting::default();
            let summary =
                apply_nftables(&mut nft, &mut routing, &plan(&base()), NftablesApply::Auto)
                    .unwrap();
            assert_eq!(nft.scripts.len(), 1, "{fault:?}");
            assert!(matches!(
                summary.programmed,
                Programmed::Nft {
                    fallback_from: Some(_)
                }
            ));
        }
    }

    #[test]
    fn an_unknown_group_sends_nothing_and_leaves_it_to_nft() {
        let mut cfg = base();
        cfg.owner_groups = OwnerGroups::Only(vec![Owner::Name("java".into())]);
        let mut nft = fresh();
        let mut routing = FakeRouting::default();
        let summary =
            apply_nftables(&mut nft, &mut routing, &plan(&cfg), NftablesApply::Auto).unwrap();
        assert!(nft.batches.is_empty(), "nothing half-encoded is sent");
        assert_eq!(nft.scripts.len(), 1);
        assert!(
            matches!(&summary.programmed, Programmed::Nft { fallback_from: Some(r) } if r.contains("no group named \"java\" in /etc/group")),
            "{:?}",
            summary.programmed
        );
        // Known, it goes over netlink.
        let mut nft = FakeNft {
            groups: vec![("java".into(), 20001)],
            ..fresh()
        };
        let summary =
            apply_nftables(&mut nft, &mut routing, &plan(&cfg), NftablesApply::Auto).unwrap();
        assert_eq!(summary.programmed, Programmed::Netlink);
    }

    #[test]
    fn a_changed_ruleset_is_read_and_planned_again() {
        let mut nft = FakeNft {
            fault: Some(Fault::Changed(1)),
            ..fresh()
        };
        let mut routing = FakeRouting::default();
        let summary = apply_nftables(
            &mut nft,
            &mut routing,
            &tproxy_plan(),
            NftablesApply::Netlink,
        )
        .unwrap();
        assert_eq!(summary.programmed, Programmed::Netlink);
        assert_eq!((nft.reads, nft.batches.len()), (2, 2));
        // Changing every time: the last attempt goes without the check, as nft's would.
        let mut nft = FakeNft {
            fault: Some(Fault::Changed(99)),
            ..fresh()
        };
        let summary = apply_nftables(
            &mut nft,
            &mut routing,
            &tproxy_plan(),
            NftablesApply::Netlink,
        )
        .unwrap();
        assert_eq!(summary.programmed, Programmed::Netlink);
        assert_eq!(nft.batches.len(), ATTEMPTS);
        assert!(nft.scripts.is_empty());
    }

    #[test]
    fn netlink_only_fails_without_launching_anything_or_touching_routing() {
        let mut nft = FakeNft {
            fault: Some(Fault::Refuse {
                nth: 1,
                errno: Errno::EPERM,
            }),
            ..fresh()
        };
        let mut routing = FakeRouting::default();
        let err = apply_nftables(
            &mut nft,
            &mut routing,
            &tproxy_plan(),
            NftablesApply::Netlink,
        )
        .unwrap_err();
        assert!(nft.scripts.is_empty());
        let message = err.to_string();
        assert!(
            message.contains("add table inet istio-proxy-nat") && message.contains("not tried"),
            "{message}"
        );
        // A fresh pod's routing comes after its tables, so there was none to take back.
        assert!(
            !routing.calls.iter().any(|c| c.starts_with("ensure")),
            "{:?}",
            routing.calls
        );
    }

    #[test]
    fn without_nft_a_netlink_failure_says_so() {
        let mut nft = FakeNft {
            fault: Some(Fault::NoAck),
            missing: true,
            ..fresh()
        };
        let mut routing = FakeRouting::default();
        let err = apply_nftables(&mut nft, &mut routing, &tproxy_plan(), NftablesApply::Auto)
            .unwrap_err();
        assert!(nft.scripts.is_empty());
        assert!(
            err.to_string()
                .contains("nft, the fallback, is not installed"),
            "{err}"
        );
    }

    #[test]
    fn rerun_converges_and_sweeps_routing() {
        let mut nft = FakeNft {
            existing: Some(ExistingTables {
                tables: vec![(Table::Raw, vec!["output".into()])],
                ..ExistingTables::default()
            }),
            ..FakeNft::default()
        };
        let mut routing = FakeRouting::default();
        let summary =
            apply_nftables(&mut nft, &mut routing, &tproxy_plan(), NftablesApply::Nft).unwrap();
        assert!(summary.converged);
        assert!(nft.scripts[0].ends_with("delete table inet istio-proxy-raw\n"));
        assert_eq!(
            routing.calls.last().map(String::as_str),
            Some("remove_stale")
        );
    }

    /// A pod that already has tables of ours: its routing goes in first (traffic may be
    /// flowing), so a refused transaction must take it back.
    fn converging() -> FakeNft {
        FakeNft {
            existing: Some(ExistingTables {
                tables: vec![(Table::Nat, vec!["output".into()])],
                ..ExistingTables::default()
            }),
            ..FakeNft::default()
        }
    }

    #[test]
    fn a_refused_transaction_takes_routing_back() {
        let mut nft = FakeNft {
            fail: true,
            ..converging()
        };
        let mut routing = FakeRouting::default();
        assert!(
            apply_nftables(&mut nft, &mut routing, &tproxy_plan(), NftablesApply::Nft).is_err()
        );
        assert_eq!(routing.calls.last().map(String::as_str), Some("undo 1"));
    }

    #[test]
    fn a_refused_fallback_takes_routing_back() {
        let mut nft = FakeNft {
            fault: Some(Fault::NoAck),
            fail: true,
            ..converging()
        };
        let mut routing = FakeRouting::default();
        let err = apply_nftables(&mut nft, &mut routing, &tproxy_plan(), NftablesApply::Auto)
            .unwrap_err();
        assert!(matches!(err, ApplyError::Rejected { .. }), "{err}");
        assert_eq!(routing.calls.last().map(String::as_str), Some("undo 1"));
    }

    #[test]
    fn a_fresh_pod_gets_its_routing_after_its_tables() {
        let mut nft = fresh();
        let mut routing = FakeRouting::default();
        apply_nftables(
            &mut nft,
            &mut routing,
            &tproxy_plan(),
            NftablesApply::Netlink,
        )
        .unwrap();
        assert_eq!(nft.batches.len(), 1);
        assert_eq!(routing.calls.len(), 1, "{:?}", routing.calls);
        assert!(routing.calls[0].starts_with("ensure"));
        // One read of what is there, shared by the routing decision and the batch.
        assert_eq!(nft.reads, 1);

        // Routing refused after the tables went in: the tables go again.
        let mut nft = fresh();
        let mut routing = FakeRouting {
            fail_ensure: true,
            ..FakeRouting::default()
        };
        assert!(apply_nftables(
            &mut nft,
            &mut routing,
            &tproxy_plan(),
            NftablesApply::Netlink
        )
        .is_err());
        assert_eq!(nft.batches.len(), 2, "the tables, then their removal");
    }

    #[test]
    fn cleanup_sends_nothing_without_tables() {
        let mut nft = fresh();
        assert_eq!(cleanup_nftables(&mut nft, NftablesApply::Auto).unwrap(), 0);
        assert!(nft.scripts.is_empty() && nft.batches.is_empty());
    }

    #[test]
    fn cleanup_deletes_exactly_the_tables_there() {
        let mut nft = FakeNft {
            existing: Some(ExistingTables {
                tables: vec![(Table::Nat, vec!["output".into()])],
                ..ExistingTables::default()
            }),
            ..FakeNft::default()
        };
        let mut routing = FakeRouting::default();
        assert_eq!(
            cleanup_native(&mut nft, &mut routing, NftablesApply::Auto).unwrap(),
            1
        );
        assert_eq!(nft.batches, [2], "add table, delete table");
        assert!(nft.scripts.is_empty());
        assert_eq!(routing.calls, ["remove_all"]);
        // The same through nft.
        let mut nft = FakeNft {
            existing: Some(ExistingTables {
                tables: vec![(Table::Nat, vec!["output".into()])],
                ..ExistingTables::default()
            }),
            ..FakeNft::default()
        };
        cleanup_nftables(&mut nft, NftablesApply::Nft).unwrap();
        assert_eq!(
            nft.scripts,
            ["add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\n"]
        );
    }

    #[test]
    fn cleanup_without_nft_or_netlink_does_nothing() {
        let mut nft = FakeNft {
            existing: None,
            missing: true,
            ..FakeNft::default()
        };
        assert_eq!(cleanup_nftables(&mut nft, NftablesApply::Auto).unwrap(), 0);
        assert!(nft.scripts.is_empty() && nft.batches.is_empty());
    }

    #[test]
    fn missing_nft_names_the_package() {
        let message = missing_nft().to_string();
        assert!(message.contains("nft") && message.contains("nftables package"));
    }

    #[test]
    fn ids_from_passwd_and_group_files() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nistio-proxy:x:1337:1337::/:/sbin/nologin\n";
        assert_eq!(id_in(passwd, "istio-proxy"), Some(1337));
        assert_eq!(id_in(passwd, "root"), Some(0));
        assert_eq!(id_in(passwd, "istio"), None);
        let group = "ftp:x:20002:\njava:x:20001:alice,bob\nbroken:x:\n";
        assert_eq!(id_in(group, "java"), Some(20001));
        assert_eq!(id_in(group, "broken"), None);
    }

    #[test]
    fn our_tables_only_from_the_inet_family() {
        let chains = [
            (1, "istio-proxy-mangle".to_owned(), "output".to_owned()),
            (1, "istio-proxy-nat".to_owned(), "output".to_owned()),
            (1, "istio-proxy-nat".to_owned(), "istio-output".to_owned()),
            (2, "istio-proxy-raw".to_owned(), "output".to_owned()),
            (1, "filter".to_owned(), "input".to_owned()),
        ];
        assert_eq!(
            our_tables(&chains).tables,
            [
                (
                    Table::Nat,
                    vec!["output".to_owned(), "istio-output".to_owned()]
                ),
                (Table::Mangle, vec!["output".to_owned()]),
            ]
        );
    }
}
