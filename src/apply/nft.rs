//! The native nftables backend (`--native-nftables`): Istio's `inet` tables, written by one
//! `nft -f -` process per apply, as one transaction that nft commits all or nothing.
//!
//! What is there now is read over netlink (one dump of nf_tables chains), never by launching
//! anything: it decides whether the transaction must delete an earlier configuration's
//! tables or chains, and whether cleanup needs to launch `nft` at all. TPROXY routing and
//! the `::6` address go through the same `Routing` as for iptables. The engine only talks to
//! the small `Nftables` trait, so tests drive it with a recording fake.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{ApplyError, Routing, RoutingPlan};
use crate::netlink::Socket;
use crate::rules::nft::model::{ExistingTables, NftRuleset, Table};
use crate::rules::nft::render::{render_cleanup, render_transaction};

/// The nf_tables family number of `inet` tables (NFPROTO_INET).
const NFPROTO_INET: u8 = 1;

/// nftables as meshinit uses it: read which of its tables exist, run one transaction.
pub trait Nftables {
    /// meshinit's tables and their chains as they are now; `None` when that cannot be
    /// known without launching anything.
    fn existing(&mut self) -> Option<ExistingTables>;
    /// Whether `run` can work at all (the `nft` binary is there).
    fn available(&self) -> bool;
    /// Runs `script` as one transaction.
    fn run(&mut self, script: &str) -> Result<(), ApplyError>;
    /// Processes launched so far.
    fn processes_launched(&self) -> usize;
}

/// The production `Nftables`: the `nft` binary, and netlink for reading.
#[derive(Debug, Default)]
pub struct NftTool {
    path: Option<PathBuf>,
    launched: usize,
}

fn find_nft() -> Option<PathBuf> {
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
    /// until something has to run (cleanup with nothing to remove needs no binary).
    pub fn new() -> NftTool {
        NftTool {
            path: find_nft(),
            launched: 0,
        }
    }

    /// Fails, naming the package, unless `nft` was found: apply checks this before it
    /// changes anything.
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

impl Nftables for NftTool {
    fn existing(&mut self) -> Option<ExistingTables> {
        match Socket::netfilter().and_then(|mut s| s.nftables_chains()) {
            Ok(chains) => Some(our_tables(&chains)),
            Err(err) => {
                tracing::debug!(%err, "cannot list nf_tables chains; assuming any state");
                None
            }
        }
    }

    fn available(&self) -> bool {
        self.path.is_some()
    }

    fn run(&mut self, script: &str) -> Result<(), ApplyError> {
        let path = self.path.as_ref().ok_or_else(missing_nft)?;
        let spawn_error = |source| ApplyError::Spawn {
            program: "nft".to_owned(),
            source,
        };
        let mut child = Command::new(path)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        self.launched += 1;
        if let Some(mut stdin) = child.stdin.take() {
            // An nft that dies early closes stdin; its stderr says why.
            let _ = stdin.write_all(script.as_bytes());
        }
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

    fn processes_launched(&self) -> usize {
        self.launched
    }
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
}

/// Applies `ruleset` in one transaction, converging from whatever an earlier run left:
/// routing first, then the tables; if nft refuses the transaction, the routing this apply
/// added is taken back, so the namespace is as it was.
pub fn apply_nftables(
    nft: &mut dyn Nftables,
    routing: &mut dyn Routing,
    ruleset: &NftRuleset,
) -> Result<NftSummary, ApplyError> {
    let existing = nft.existing();
    let script = render_transaction(ruleset, existing.as_ref());
    tracing::debug!(input = %script, "nft input");

    let plan = RoutingPlan {
        ipv6_passthrough_address: ruleset.ipv6_passthrough_address,
        tproxy: ruleset.tproxy_routing.map(|r| (r.mark, r.table)),
        ipv6: ruleset.ipv6,
    };
    let changes = routing.ensure(&plan)?;
    if let Err(failure) = nft.run(&script) {
        if let Err(err) = routing.undo(&changes) {
            tracing::error!(%err, "undoing routing changes failed");
        }
        return Err(failure);
    }
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
    })
}

/// Deletes meshinit's tables, in one transaction, if there are any: with none (as netlink
/// reports), nothing is launched. Returns how many tables were deleted.
pub fn cleanup_nftables(nft: &mut dyn Nftables) -> Result<usize, ApplyError> {
    let tables: Vec<Table> = match nft.existing() {
        Some(existing) => existing.tables.iter().map(|(t, _)| *t).collect(),
        // Not known, and nothing could be done about it anyway.
        None if !nft.available() => return Ok(0),
        None => Table::ALL.to_vec(),
    };
    if tables.is_empty() {
        return Ok(0);
    }
    nft.run(&render_cleanup(&tables))?;
    Ok(tables.len())
}

/// Cleanup for `--native-nftables`: meshinit's tables, then every rule and route meshinit
/// tagged and the `::6` address. Keeps going after a failure; returns the first error.
pub fn cleanup_native(
    nft: &mut dyn Nftables,
    routing: &mut dyn Routing,
) -> Result<usize, ApplyError> {
    let tables = cleanup_nftables(nft).inspect_err(|err| {
        tracing::error!(%err, "deleting meshinit's nftables tables failed");
    });
    let routes = routing.remove_all().inspect_err(|err| {
        tracing::error!(%err, "routing cleanup failed");
    });
    Ok(tables? + routes?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{RoutingChanges, RoutingItem};
    use crate::config::{InboundCapture, InterceptionMode};
    use crate::rules::model::Family;
    use crate::rules::nft::plan::plan;
    use crate::rules::nft::plan::tests::base;

    /// Records every transaction; fails the run when asked.
    #[derive(Default)]
    struct FakeNft {
        existing: Option<ExistingTables>,
        missing: bool,
        fail: bool,
        scripts: Vec<String>,
    }

    impl Nftables for FakeNft {
        fn existing(&mut self) -> Option<ExistingTables> {
            self.existing.clone()
        }
        fn available(&self) -> bool {
            !self.missing
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
        fn processes_launched(&self) -> usize {
            self.scripts.len()
        }
    }

    #[derive(Default)]
    struct FakeRouting {
        calls: Vec<String>,
    }

    impl Routing for FakeRouting {
        fn ensure(&mut self, plan: &RoutingPlan) -> Result<RoutingChanges, ApplyError> {
            self.calls.push(format!("ensure {plan:?}"));
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
    }

    fn tproxy_plan() -> NftRuleset {
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::AllExcept(vec![]);
        plan(&cfg)
    }

    #[test]
    fn fresh_pod_is_one_transaction_and_no_stale_sweep() {
        let mut nft = FakeNft {
            existing: Some(ExistingTables::default()),
            ..FakeNft::default()
        };
        let mut routing = FakeRouting::default();
        let summary = apply_nftables(&mut nft, &mut routing, &tproxy_plan()).unwrap();
        assert_eq!(nft.scripts.len(), 1);
        assert!(!nft.scripts[0].contains("delete"));
        assert!(!summary.converged);
        assert_eq!(summary.routing_added, 1);
        assert_eq!(routing.calls.len(), 1, "{:?}", routing.calls);
        assert_eq!(
            summary.rules.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [Table::Nat, Table::Mangle]
        );
    }

    #[test]
    fn rerun_converges_and_sweeps_routing() {
        let mut nft = FakeNft {
            existing: Some(ExistingTables {
                tables: vec![(Table::Raw, vec!["output".into()])],
            }),
            ..FakeNft::default()
        };
        let mut routing = FakeRouting::default();
        let summary = apply_nftables(&mut nft, &mut routing, &tproxy_plan()).unwrap();
        assert!(summary.converged);
        assert!(nft.scripts[0].ends_with("delete table inet istio-proxy-raw\n"));
        assert_eq!(
            routing.calls.last().map(String::as_str),
            Some("remove_stale")
        );
    }

    #[test]
    fn a_refused_transaction_takes_routing_back() {
        let mut nft = FakeNft {
            existing: Some(ExistingTables::default()),
            fail: true,
            ..FakeNft::default()
        };
        let mut routing = FakeRouting::default();
        assert!(apply_nftables(&mut nft, &mut routing, &tproxy_plan()).is_err());
        assert_eq!(routing.calls.last().map(String::as_str), Some("undo 1"));
    }

    #[test]
    fn cleanup_launches_nothing_without_tables() {
        let mut nft = FakeNft {
            existing: Some(ExistingTables::default()),
            ..FakeNft::default()
        };
        assert_eq!(cleanup_nftables(&mut nft).unwrap(), 0);
        assert!(nft.scripts.is_empty());
    }

    #[test]
    fn cleanup_deletes_exactly_the_tables_there() {
        let mut nft = FakeNft {
            existing: Some(ExistingTables {
                tables: vec![(Table::Nat, vec!["output".into()])],
            }),
            ..FakeNft::default()
        };
        let mut routing = FakeRouting::default();
        assert_eq!(cleanup_native(&mut nft, &mut routing).unwrap(), 1);
        assert_eq!(
            nft.scripts,
            ["add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\n"]
        );
        assert_eq!(routing.calls, ["remove_all"]);
    }

    #[test]
    fn cleanup_without_nft_or_netlink_does_nothing() {
        let mut nft = FakeNft {
            existing: None,
            missing: true,
            ..FakeNft::default()
        };
        assert_eq!(cleanup_nftables(&mut nft).unwrap(), 0);
        assert!(nft.scripts.is_empty());
    }

    #[test]
    fn missing_nft_names_the_package() {
        let message = missing_nft().to_string();
        assert!(message.contains("nft") && message.contains("nftables package"));
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
