//! The iptables backend: `apply` (one `iptables-restore` transaction per family, converging
//! from what is there, rolled back on failure) and `cleanup`, over the `Netfilter` trait; and
//! the production `Netfilter`: iptables' save and restore tools, legacy or nft.
//!
//! Istio picks its binary by running each candidate's save, `--version`, `-A` and `-D`
//! (about ten launches before anything is applied). meshinit decides without launching
//! anything: which binaries exist (`which`), whether legacy tables in this namespace hold
//! rules (`/proc/net/ip*_tables_names`, then `IPT_SO_GET_INFO`), and, for nft, whether any ISTIO_* chain
//! exists (one netlink dump), so a fresh pod costs one `*-restore` per family.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::locks::{ChildLock, XtablesLock};
use super::{ApplyError, IpSets, Netfilter, RestoreInput, Routing, RoutingChanges, RoutingPlan};
use crate::config::ForcedBackend;
use crate::netlink::{NlFamily, Socket};
use crate::rules::iptables::model::{Family, FamilyRuleset, IstioChain, Ruleset, Table};
use crate::rules::iptables::render::{
    parse_existing, render_restore, render_restore_chunks, render_rollback,
    tables_holding_only_ours, tables_in_save, ExistingState,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
    /// Whatever plain `iptables-restore` is on this system (no -legacy/-nft variants).
    Plain,
}

impl Backend {
    fn suffix(self) -> &'static str {
        match self {
            Backend::Legacy => "-legacy",
            Backend::Nft => "-nft",
            Backend::Plain => "",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy",
            Backend::Nft => "iptables-nft",
            Backend::Plain => "iptables",
        }
    }
}

/// Sbin directories are searched even when PATH lacks them, as in minimal images.
/// Lookups are remembered for the run: detection asks about the same few programs often.
fn find(program: &str) -> Option<PathBuf> {
    thread_local! {
        static FOUND: std::cell::RefCell<Vec<(String, Option<PathBuf>)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    if let Some(hit) = FOUND.with(|found| {
        found
            .borrow()
            .iter()
            .find(|(name, _)| name == program)
            .map(|(_, path)| path.clone())
    }) {
        return hit;
    }
    let path = search(program);
    FOUND.with(|found| found.borrow_mut().push((program.to_owned(), path.clone())));
    path
}

fn search(program: &str) -> Option<PathBuf> {
    which::which(program).ok().or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(program))
            .find(|p| p.is_file())
    })
}

fn tool_name(family: Family, backend: Backend, kind: &str) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    format!("{base}{}-{kind}", backend.suffix())
}

/// Tables alone (empty ones stay once anything looked) do not count: see `kernel`.
fn legacy_tables_in_use(family: Family) -> bool {
    super::kernel::legacy_rules_present(family)
}

/// What a tool's complaint says the kernel lacks, and what to do about it.
fn kernel_lacks(backend: Backend, family: Family, stderr: &str) -> Option<(String, &'static str)> {
    const USE_NFT: &str = "pass --force-iptables-binary=nft (FORCE_IPTABLES_BINARY=nft) or \
                           --native-nftables to use nf_tables instead";
    const USE_LEGACY: &str = "pass --force-iptables-binary=legacy \
                              (FORCE_IPTABLES_BINARY=legacy) to use iptables-legacy instead";
    const USE_NATIVE: &str = "pass --native-nftables to use nf_tables' own matches instead \
                              of xtables extensions";
    let quoted = |after: &str, until: char| {
        let rest = stderr.split(after).nth(1)?;
        rest.split(until).next().filter(|word| !word.is_empty())
    };
    // "Warning: Extension owner revision 0 not supported, missing kernel module?"
    if let Some(extension) = quoted("Extension ", ' ')
        .filter(|_| stderr.contains("not supported, missing kernel module"))
    {
        let module = format!("xt_{extension}");
        return Some((
            format!("xtables extension '{extension}' (module {module})"),
            USE_NATIVE,
        ));
    }
    if backend != Backend::Nft {
        if let Some(table) = quoted("unable to initialize table '", '\'') {
            let module = match family {
                Family::V4 => format!("iptable_{table}"),
                Family::V6 => format!("ip6table_{table}"),
            };
            return Some((
                format!(
                    "iptables-legacy '{table}' table (module {module}; Amazon Linux 2023's \
                     kernels, for one, ship none)"
                ),
                USE_NFT,
            ));
        }
    }
    (backend != Backend::Legacy && stderr.contains("Could not fetch rule set generation id"))
        .then(|| ("nf_tables (module nf_tables)".to_owned(), USE_LEGACY))
}

/// The save/restore programs for one backend.
#[derive(Debug)]
pub struct IptablesTools {
    backend: Backend,
    wait: Duration,
    launched: usize,
    /// nf_tables chains seen by one dump, fetched on first use.
    nft_chains: Option<Vec<(u8, String, String)>>,
    /// Restores started ahead of need (`prepare`), waiting for their input.
    ready: Vec<(Family, Child)>,
    /// iptables-legacy's lock, once taken for the rest of the run (`hold_xtables_lock`).
    xtables_lock: Option<XtablesLock>,
    /// The lock file the restores are pointed at: a private one while meshinit holds the
    /// node's lock for them, the node's own when they take it themselves.
    child_lock: Option<ChildLock>,
    /// The node's lock file, when each restore takes the lock itself (`lock_per_commit`).
    restores_lock: Option<PathBuf>,
}

impl Drop for IptablesTools {
    /// A prepared restore that never got input sees end of file at once and changes
    /// nothing; it is reaped here so no zombie outlives the run.
    fn drop(&mut self) {
        for (_, mut child) in self.ready.drain(..) {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

impl IptablesTools {
    /// Picks the backend as Istio does (legacy if it already holds tables here, else nft,
    /// else plain), unless forced, and checks the tools exist for every needed family.
    pub fn detect(
        forced: Option<ForcedBackend>,
        families: &[Family],
        wait: Duration,
    ) -> Result<IptablesTools, ApplyError> {
        let has_all = |backend: Backend| {
            families.iter().all(|&f| {
                find(&tool_name(f, backend, "restore")).is_some()
                    && find(&tool_name(f, backend, "save")).is_some()
            })
        };
        let mut nft_chains = None;
        let backend = match forced {
            Some(ForcedBackend::Legacy) => Backend::Legacy,
            Some(ForcedBackend::Nft) => Backend::Nft,
            None if has_all(Backend::Legacy)
                && families.iter().any(|&f| legacy_tables_in_use(f)) =>
            {
                Backend::Legacy
            }
            None if has_all(Backend::Nft)
                && !(has_all(Backend::Legacy)
                    && super::kernel::nf_tables_missing(&mut nft_chains)) =>
            {
                Backend::Nft
            }
            None if has_all(Backend::Legacy) && !has_all(Backend::Plain) => Backend::Legacy,
            None => Backend::Plain,
        };
        for &family in families {
            for kind in ["restore", "save"] {
                let program = tool_name(family, backend, kind);
                if find(&program).is_none() {
                    return Err(ApplyError::MissingBinary {
                        program,
                        package: "iptables",
                    });
                }
            }
        }
        Ok(IptablesTools {
            backend,
            wait,
            launched: 0,
            nft_chains,
            ready: Vec::new(),
            xtables_lock: None,
            child_lock: None,
            restores_lock: None,
        })
    }

    fn restore_args(&self) -> [String; 2] {
        [
            format!("--wait={}", self.wait.as_secs().max(1)),
            "--noflush".to_owned(),
        ]
    }

    /// Takes iptables-legacy's node-wide lock (at `path`) for the rest of the run, waiting
    /// at most the run's `--xtables-wait`: from here on, no other iptables-legacy user can
    /// come between this run's restores, its rollback included. Taken as late as possible
    /// (restores may already be started, waiting for input, which is all they can do
    /// without it), so that pods starting together queue for as short a time as can be.
    /// nft needs no lock.
    pub fn hold_xtables_lock(&mut self, path: &Path) -> Result<(), ApplyError> {
        if self.backend != Backend::Nft && self.xtables_lock.is_none() {
            self.xtables_lock = Some(XtablesLock::acquire(path, self.wait)?);
        }
        Ok(())
    }

    /// Has each restore take iptables-legacy's lock (at `path`) itself, around its own
    /// commit, waiting at most the run's `--xtables-wait` (`--wait=N`: iptables 1.8.8 and
    /// later block in the kernel, earlier ones poll once a second), instead of this run
    /// holding it from its first commit to its last. Only for a run that is one commit
    /// ([`one_commit`]); to be called before any restore starts.
    pub fn lock_per_commit(&mut self, path: &Path) {
        self.restores_lock = Some(path.to_owned());
    }

    /// Lets go of iptables-legacy's lock, once nothing more will be restored.
    pub fn release_xtables_lock(&mut self) {
        self.xtables_lock = None;
    }

    /// Starts each family's `iptables-restore` now, before the existing rules are read and
    /// the input rendered, so its start-up (exec, libraries, extensions: most of its run
    /// time for a small ruleset) overlaps meshinit's own work. Until it gets input, it has
    /// changed nothing.
    pub fn prepare(&mut self, families: &[Family]) -> Result<(), ApplyError> {
        for &family in families {
            let program = tool_name(family, self.backend, "restore");
            let child = self.spawn(&program, &self.restore_args(), true)?;
            self.ready.push((family, child));
        }
        Ok(())
    }

    fn spawn(
        &mut self,
        program: &str,
        args: &[String],
        piped_input: bool,
    ) -> Result<Child, ApplyError> {
        let path = find(program).ok_or_else(|| ApplyError::MissingBinary {
            program: program.to_owned(),
            package: "iptables",
        })?;
        let mut command = Command::new(&path);
        if self.backend != Backend::Nft {
            if self.child_lock.is_none() {
                self.child_lock = Some(match &self.restores_lock {
                    Some(path) => ChildLock::node(path)?,
                    None => ChildLock::private()?,
                });
            }
            if let Some(lock) = &self.child_lock {
                command.env("XTABLES_LOCKFILE", lock.path_for_children());
            }
        }
        let child = command
            .args(args)
            .stdin(if piped_input {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| ApplyError::Spawn {
                program: program.to_owned(),
                error,
            })?;
        self.launched += 1;
        Ok(child)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn kernel_lacks(&self, program: &str, family: Family, stderr: &str) -> Option<ApplyError> {
        let (lacks, remedy) = kernel_lacks(self.backend, family, stderr)?;
        Some(ApplyError::KernelLacks {
            program: program.to_owned(),
            backend: self.backend.name(),
            lacks,
            remedy,
            stderr: stderr.lines().next().unwrap_or_default().to_owned(),
        })
    }

    /// This family's nf_tables chains as (table, chain), from one dump per run; `None`
    /// when netlink cannot say (then the save is read instead).
    fn nft_chains(&mut self, family: Family) -> Option<Vec<(&str, &str)>> {
        if self.nft_chains.is_none() {
            match Socket::netfilter().and_then(|mut s| s.nftables_chains()) {
                Ok(chains) => self.nft_chains = Some(chains),
                Err(err) => {
                    tracing::debug!(%err, "cannot list nf_tables chains; reading the tables instead");
                    return None;
                }
            }
        }
        let nf_family = match family {
            Family::V4 => NlFamily::Inet as u8,
            Family::V6 => NlFamily::Inet6 as u8,
        };
        self.nft_chains.as_ref().map(|chains| {
            chains
                .iter()
                .filter(|(f, _, _)| *f == nf_family)
                .map(|(_, table, chain)| (table.as_str(), chain.as_str()))
                .collect()
        })
    }

    fn nft_may_hold(&mut self, family: Family) -> bool {
        self.nft_chains(family).is_none_or(|chains| {
            chains
                .iter()
                .any(|(_, chain)| IstioChain::from_name(chain).is_some())
        })
    }

    fn has_tools(&self, family: Family) -> bool {
        ["restore", "save"]
            .iter()
            .all(|kind| find(&tool_name(family, self.backend, kind)).is_some())
    }

    /// Runs `program` (or takes the restore `prepare` started for `family`), streaming
    /// `input` into it as it is rendered, so the process parses while meshinit renders.
    fn run(
        &mut self,
        program: &str,
        args: &[String],
        input: Option<(Family, &dyn RestoreInput)>,
    ) -> Result<(String, String, bool), ApplyError> {
        let prepared = input
            .and_then(|(family, _)| self.ready.iter().position(|(f, _)| *f == family))
            .map(|index| self.ready.remove(index).1);
        let mut child = match prepared {
            Some(child) => child,
            None => self.spawn(program, args, input.is_some())?,
        };
        if let (Some((_, input)), Some(mut stdin)) = (input, child.stdin.take()) {
            // A restore that dies early closes stdin; its stderr says why, so the write
            // error itself is not the interesting one.
            let _ = input.write_to(&mut |chunk| stdin.write_all(chunk.as_bytes()));
        }
        let output = child
            .wait_with_output()
            .map_err(|error| ApplyError::Spawn {
                program: program.to_owned(),
                error,
            })?;
        Ok((
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            output.status.success(),
        ))
    }
}

/// The input line an `iptables-restore` error names ("line 7 failed", "Error occurred at
/// line: 7").
fn failed_line(stderr: &str) -> Option<usize> {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    words.windows(2).find_map(|w| {
        (w[0] == "line" || w[0] == "line:")
            .then(|| w[1].trim_end_matches(':').parse().ok())
            .flatten()
    })
}

impl Netfilter for IptablesTools {
    fn describe(&self) -> String {
        self.backend.name().to_owned()
    }

    fn may_hold_rules(&mut self, family: Family) -> bool {
        if !self.has_tools(family) {
            return false;
        }
        match self.backend {
            Backend::Legacy => legacy_tables_in_use(family),
            Backend::Nft => self.nft_may_hold(family),
            // Plain `iptables` may be either; it can hold rules if either can.
            Backend::Plain => legacy_tables_in_use(family) || self.nft_may_hold(family),
        }
    }

    fn existing_tables(&mut self, family: Family) -> Option<Vec<Table>> {
        if self.backend != Backend::Nft {
            return None;
        }
        let chains = self.nft_chains(family)?;
        let mut tables: Vec<Table> = chains
            .iter()
            .filter_map(|(table, _)| Table::from_name(table))
            .collect();
        tables.sort();
        tables.dedup();
        Some(tables)
    }

    fn save(&mut self, family: Family) -> Result<String, ApplyError> {
        let program = tool_name(family, self.backend, "save");
        let (stdout, stderr, ok) = self.run(&program, &[], None)?;
        if ok {
            Ok(stdout)
        } else {
            Err(self
                .kernel_lacks(&program, family, &stderr)
                .unwrap_or(ApplyError::Save { program, stderr }))
        }
    }

    fn restore(&mut self, family: Family, input: &dyn RestoreInput) -> Result<(), ApplyError> {
        let program = tool_name(family, self.backend, "restore");
        let args = self.restore_args();
        let (_, stderr, ok) = self.run(&program, &args, Some((family, input)))?;
        if ok {
            return Ok(());
        }
        if let Some(lacks) = self.kernel_lacks(&program, family, &stderr) {
            return Err(lacks);
        }
        // iptables' own words when its --wait ran out ("Another app is currently holding
        // the xtables lock. Stopped waiting after 30s."): nothing was committed.
        if let Some(path) = &self.restores_lock {
            if stderr.contains("holding the xtables lock") {
                return Err(ApplyError::LockTimeout {
                    path: path.clone(),
                    wait: self.wait,
                });
            }
        }
        let line = failed_line(&stderr);
        let line_text = line.and_then(|n| {
            input
                .text()
                .lines()
                .nth(n.checked_sub(1)?)
                .map(str::to_owned)
        });
        Err(ApplyError::Restore {
            program,
            family,
            line,
            line_text,
            stderr,
        })
    }

    fn remove_tables(&mut self, family: Family, tables: &[Table]) -> Result<(), ApplyError> {
        if self.backend != Backend::Nft || tables.is_empty() {
            return Ok(());
        }
        let nf_family = match family {
            Family::V4 => NlFamily::Inet,
            Family::V6 => NlFamily::Inet6,
        };
        let mut socket = Socket::netfilter()?;
        for table in tables {
            socket.delete_nftables_table(nf_family, table.name())?;
        }
        Ok(())
    }

    fn processes_launched(&self) -> usize {
        self.launched
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
/// names no rule uses yet (see `rules::iptables::ipset`), and the old ones removed only once nothing
/// uses them: the switch itself happens inside each family's restore.
/// Whether applying `ruleset` is one commit: one family's restore of one table, into a
/// namespace holding no rules of ours (so nothing is read first), and nothing after it that
/// could call for a rollback (no sets, no routing). Then iptables-legacy's lock has no
/// "between two commits" to guard, and the restore can take it around its commit alone
/// ([`IptablesTools::lock_per_commit`]). The injector's default IPv4 pod is such a run.
pub fn one_commit(nf: &mut dyn Netfilter, ruleset: &Ruleset) -> bool {
    if ruleset.tproxy_routing.is_some()
        || ruleset.ipv6_passthrough_address
        || ruleset.families().any(|f| !f.sets().is_empty())
    {
        return false;
    }
    let mut commits = 0;
    for family in Family::ALL {
        if nf.may_hold_rules(family) {
            return false;
        }
        commits += ruleset.family(family).map_or(0, |f| f.tables.len());
    }
    commits == 1
}

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
        removed += super::keep_going(result, &mut failures);
    }
    removed += super::keep_going(routing.remove_all(), &mut failures);
    // With the rules gone, every set of meshinit's is unused. A kernel without ipset has
    // none to remove.
    if sets.available() {
        removed += super::keep_going(sets.remove_unused().map_err(Into::into), &mut failures);
    }
    super::all_of(failures).map(|()| removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_line_from_both_backends() {
        assert_eq!(failed_line("iptables-restore: line 7 failed"), Some(7));
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): unknown option \"--bogus\"\nError occurred at line: 3\nTry `iptables-restore -h'"),
            Some(3)
        );
        assert_eq!(failed_line("something else"), None);
    }

    #[test]
    fn what_the_kernel_lacks() {
        let legacy = "iptables-restore v1.8.9 (legacy): iptables-restore: unable to initialize table 'nat'\n\nError occurred at line: 1";
        let (lacks, remedy) = kernel_lacks(Backend::Legacy, Family::V6, legacy).expect("legacy");
        assert!(
            lacks.contains("'nat' table (module ip6table_nat"),
            "{lacks}"
        );
        assert!(remedy.contains("--force-iptables-binary=nft"), "{remedy}");
        let nft = "iptables-nft-save v1.8.9 (nf_tables): Could not fetch rule set generation id: Invalid argument";
        let (lacks, remedy) = kernel_lacks(Backend::Nft, Family::V4, nft).expect("nft");
        assert!(lacks.contains("nf_tables"), "{lacks}");
        assert!(
            remedy.contains("--force-iptables-binary=legacy"),
            "{remedy}"
        );
        let owner = "Warning: Extension owner revision 0 not supported, missing kernel module?\niptables-restore: line 24 failed";
        let (lacks, remedy) = kernel_lacks(Backend::Legacy, Family::V4, owner).expect("owner");
        assert!(lacks.contains("'owner' (module xt_owner)"), "{lacks}");
        assert!(remedy.contains("--native-nftables"), "{remedy}");
        assert_eq!(kernel_lacks(Backend::Nft, Family::V4, legacy), None);
        assert_eq!(
            kernel_lacks(Backend::Legacy, Family::V4, "line 3 failed"),
            None
        );
    }

    #[test]
    fn tool_names() {
        assert_eq!(
            tool_name(Family::V6, Backend::Nft, "restore"),
            "ip6tables-nft-restore"
        );
        assert_eq!(
            tool_name(Family::V4, Backend::Plain, "save"),
            "iptables-save"
        );
    }
}
