//! The capture engine: the backend (iptables, or Istio's native nftables) chosen once from
//! the validated `Config`, and what is done with it: the plan, the dry-run text, installing
//! it in the current network namespace, and removing everything meshinit added. The init
//! container's commands and the CNI plugin both come through here.

mod drift;
pub mod notes;

use std::time::Instant;

pub use drift::{Drift, DriftError, Place, SetName};

/// What can go wrong in the engine: the layers below it, and asking one family's text of a
/// plan that has none. The top-level error takes each variant as its own (`error::Error`'s
/// `From`), so exit codes are those of the layer at fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error(transparent)]
    Caps(#[from] CapsError),

    #[error(transparent)]
    Apply(#[from] ApplyError),

    #[error("IPv6 is off for this pod, so there is no IPv6 ruleset; pass --ipv6 to plan one")]
    Ipv6Disabled,
}

use crate::apply::iptables::IptablesTools;
use crate::apply::nft::NftTool;
use crate::apply::ApplyError;
use crate::apply::{IpSets, Netfilter as _, NetlinkIpSets, NetlinkRouting, Nftables as _, RunLock};
use crate::caps::CapsError;
use crate::config::{Config, ConfigError, RunOptions};
use crate::rules::iptables::model::Family;
use crate::rules::iptables::render::render_fresh;
use crate::rules::iptables::routes::render_routing;
use crate::rules::iptables::{plan_with, Ruleset};
use crate::rules::PlanOptions;

/// Which rules a pod gets, decided once from its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Istio's iptables rules, through `iptables-restore` (legacy, nft or plain).
    Iptables,
    /// Istio's native nftables tables (`--native-nftables`).
    Nftables,
}

/// What the engine does with a backend. Each backend is one implementation, over its own
/// folder of `rules/` and its own file of `apply/`; `Engine::backend` is the one place one
/// is picked.
trait Backend {
    /// The whole dry-run text: what `print` shows and `apply -n` prints.
    fn dry_run(&self, config: &Config) -> String;
    /// One family's part of the dry-run alone (`print --family`).
    fn dry_run_family(&self, config: &Config, family: Family) -> Result<String, EngineError>;
    /// Plans `config` and applies it in the current network namespace.
    fn install(&self, config: &Config) -> Result<(), EngineError>;
    /// Each difference between the current namespace and what `install` would leave.
    fn drift(&self, config: &Config) -> Result<Vec<Drift>, DriftError>;
    /// Removes everything meshinit (or istio-init) added here.
    fn remove_everything(&self, run: &RunOptions) -> Result<(), EngineError>;
}

impl Engine {
    pub fn of(run: &RunOptions) -> Engine {
        if run.native_nftables {
            Engine::Nftables
        } else {
            Engine::Iptables
        }
    }

    /// The backend's implementation: the only place the engine tells backends apart.
    fn backend(self) -> &'static dyn Backend {
        match self {
            Engine::Iptables => &IptablesBackend,
            Engine::Nftables => &NftablesBackend,
        }
    }

    /// The whole dry-run text: what `print` shows and `apply -n` prints.
    pub fn dry_run(self, config: &Config) -> String {
        self.backend().dry_run(config)
    }

    /// One family's `iptables-restore` input alone (`print --family`), ready to pipe into
    /// the family's restore.
    pub fn dry_run_family(self, config: &Config, family: Family) -> Result<String, EngineError> {
        self.backend().dry_run_family(config, family)
    }

    /// Plans `config` and applies it in the current network namespace.
    pub fn install(self, config: &Config) -> Result<(), EngineError> {
        self.backend().install(config)
    }

    /// Each difference between what is here and what installing `config` would leave
    /// (meshinit's rules, tables, sets and routing only); empty when there is none.
    pub fn drift(self, config: &Config) -> Result<Vec<Drift>, DriftError> {
        self.backend().drift(config)
    }

    /// Removes everything meshinit (or istio-init) added here.
    pub fn remove_everything(self, run: &RunOptions) -> Result<(), EngineError> {
        self.backend().remove_everything(run)
    }
}

/// Istio's iptables rules: `rules::iptables`, applied by `apply::iptables`.
struct IptablesBackend;

impl Backend for IptablesBackend {
    fn dry_run(&self, config: &Config) -> String {
        render_plan(&iptables_plan(config))
    }

    fn dry_run_family(&self, config: &Config, family: Family) -> Result<String, EngineError> {
        let ruleset = iptables_plan(config);
        Ok(render_fresh(
            ruleset.family(family).ok_or(EngineError::Ipv6Disabled)?,
        ))
    }

    fn install(&self, config: &Config) -> Result<(), EngineError> {
        install_iptables(config)
    }

    fn drift(&self, config: &Config) -> Result<Vec<Drift>, DriftError> {
        drift::iptables_drift(config)
    }

    fn remove_everything(&self, run: &RunOptions) -> Result<(), EngineError> {
        remove_iptables(run)
    }
}

/// Istio's native nftables tables: `rules::nft`, applied by `apply::nft`.
struct NftablesBackend;

impl Backend for NftablesBackend {
    fn dry_run(&self, config: &Config) -> String {
        crate::rules::nft::render::render_plan(&nft_plan(config))
    }

    fn dry_run_family(&self, _: &Config, family: Family) -> Result<String, EngineError> {
        Err(ConfigError::invalid_flag(
            "family",
            family.name(),
            "--native-nftables plans one inet ruleset for both families; leave --family out",
        )
        .into())
    }

    fn install(&self, config: &Config) -> Result<(), EngineError> {
        install_nftables(config)
    }

    fn drift(&self, config: &Config) -> Result<Vec<Drift>, DriftError> {
        drift::nftables_drift(config)
    }

    fn remove_everything(&self, run: &RunOptions) -> Result<(), EngineError> {
        remove_nftables(run)
    }
}

/// The whole dry-run: each family's restore input, then the routing changes.
pub fn render_plan(ruleset: &Ruleset) -> String {
    let mut text = String::new();
    for family in Family::ALL {
        let tool = match family {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        };
        match ruleset.family(family) {
            Some(rules) => {
                let sets = crate::rules::iptables::ipset::render_sets(&rules.sets());
                if !sets.is_empty() {
                    text.push_str(&format!(
                        "# {family}: ipsets first (created over netlink; `ipset restore` input)\n"
                    ));
                    text.push_str(&sets);
                }
                text.push_str(&format!("# {family}: {tool} --noflush input\n"));
                text.push_str(&render_fresh(rules));
            }
            None => text.push_str(&format!(
                "# {family}: off (no IPv6 rules; --ipv6 plans them)\n"
            )),
        }
    }
    let routing = render_routing(ruleset);
    if !routing.is_empty() {
        text.push_str("# routing: equivalent ip commands\n");
        text.push_str(&routing);
    }
    text
}

/// [`Engine::install`] for iptables: one restore per family.
fn install_iptables(config: &Config) -> Result<(), EngineError> {
    let run = &config.run;
    let families: Vec<Family> = if config.capture.ipv6 {
        Family::ALL.to_vec()
    } else {
        vec![Family::V4]
    };
    let started = Instant::now();
    let _run_lock = RunLock::acquire(run.xtables_wait)?;
    let mut tools = IptablesTools::detect(run.force_backend, &families, run.xtables_wait)?;
    let mut sets = NetlinkIpSets::default();
    // nft takes no lock: its restores start before the plan is made, so that their start
    // overlaps the planning. With iptables-legacy's lock, the plan comes first: whether
    // the restores take the lock themselves, around one commit, or this run holds it for
    // them, depends on it.
    let shares_lock = tools.backend() != crate::apply::iptables::Backend::Nft;
    if !shares_lock {
        tools.prepare(&families)?;
    }
    let ruleset = kernel_plan(config, &mut sets);
    if shares_lock {
        let one_commit = crate::apply::iptables::one_commit(&mut tools, &ruleset);
        if one_commit {
            tools.lock_per_commit(&run.xtables_lockfile);
        }
        tools.prepare(&families)?;
        if !one_commit {
            tools.hold_xtables_lock(&run.xtables_lockfile)?;
        }
    }
    let mut routing = NetlinkRouting::default();
    let summary = crate::apply::iptables::apply(&mut tools, &mut routing, &mut sets, &ruleset);
    tools.release_xtables_lock();
    let summary = summary?;
    let rules: Vec<String> = summary
        .rules
        .iter()
        .map(|(family, table, count)| format!("{family}/{}={count}", table.name()))
        .collect();
    tracing::info!(
        backend = tools.backend().name(),
        rules = %rules.join(","),
        converged = ?summary.converged,
        routing_added = summary.routing_added,
        routing_removed = summary.routing_removed,
        sets_created = summary.sets_created,
        sets_removed = summary.sets_removed,
        processes = tools.processes_launched(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        peak_rss_kib = peak_rss_kib(),
        "applied"
    );
    Ok(())
}

/// The iptables plan for `config` as asked (`--match-sets` shapes it): what a dry-run
/// prints and `explain` walks.
pub fn iptables_plan(config: &Config) -> Ruleset {
    let options = PlanOptions {
        match_sets: config.run.match_sets,
    };
    plan_with(&config.capture, options)
}

/// The iptables plan to apply here: with `--match-sets` on a kernel without ipset, the
/// plain chains, which decide the same.
pub fn kernel_plan(config: &Config, sets: &mut dyn IpSets) -> Ruleset {
    if config.run.match_sets && !sets.available() {
        tracing::warn!(
            "--match-sets: this kernel has no ipset support (CONFIG_IP_SET); \
             matching one rule per list entry instead"
        );
        return plan_with(&config.capture, PlanOptions::default());
    }
    iptables_plan(config)
}

/// The nftables plan for `config` (`--match-sets` shapes it).
pub fn nft_plan(config: &Config) -> crate::rules::nft::NftRuleset {
    let options = crate::rules::nft::PlanOptions {
        match_sets: config.run.match_sets,
    };
    crate::rules::nft::plan_with(&config.capture, options)
}

/// `install` for `--native-nftables`: one transaction for both families, over netlink or
/// through `nft -f -` (`--nftables-apply`).
fn install_nftables(config: &Config) -> Result<(), EngineError> {
    let started = Instant::now();
    let _run_lock = RunLock::acquire(config.run.xtables_wait)?;
    let mut nft = NftTool::new();
    let mode = config.run.nftables_apply;
    if mode == crate::config::NftablesApply::Nft {
        nft.require()?;
    }
    let ruleset = nft_plan(config);
    let summary = crate::apply::nft::apply_nftables(
        &mut nft,
        &mut NetlinkRouting::default(),
        &ruleset,
        mode,
    )?;
    let rules: Vec<String> = summary
        .rules
        .iter()
        .map(|(table, count)| format!("inet/{}={count}", table.name()))
        .collect();
    tracing::info!(
        backend = "nftables",
        via = summary.programmed.via(),
        match_sets = config.run.match_sets,
        rules = %rules.join(","),
        converged = summary.converged,
        routing_added = summary.routing_added,
        routing_removed = summary.routing_removed,
        processes = nft.processes_launched(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        peak_rss_kib = peak_rss_kib(),
        "applied"
    );
    Ok(())
}

/// This process's own peak resident memory in KiB (children excluded), for the summary
/// line: the init container's memory limit is sized from it. `VmHWM`, because the
/// `getrusage` peak survives exec and would report the container runtime's own.
fn peak_rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(-1)
}

/// [`Engine::remove_everything`] for `--native-nftables`: only meshinit's tables, and
/// routing.
fn remove_nftables(run: &RunOptions) -> Result<(), EngineError> {
    let started = Instant::now();
    let _run_lock = RunLock::acquire(run.xtables_wait)?;
    let mut nft = NftTool::new();
    let removed = crate::apply::nft::cleanup_native(
        &mut nft,
        &mut NetlinkRouting::default(),
        run.nftables_apply,
    )?;
    crate::caps::drop_all()?;
    tracing::info!(
        backend = "nftables",
        removed,
        processes = nft.processes_launched(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "cleaned up"
    );
    Ok(())
}

/// [`Engine::remove_everything`] for iptables: both families (IPv6 when ip6tables exists),
/// routing, sets, and any tables an earlier `--native-nftables` run left.
fn remove_iptables(run: &RunOptions) -> Result<(), EngineError> {
    let started = Instant::now();
    let _run_lock = RunLock::acquire(run.xtables_wait)?;
    let mut nft = NftTool::new();
    let (mut tools, families) =
        match IptablesTools::detect(run.force_backend, &Family::ALL, run.xtables_wait) {
            Ok(tools) => (tools, Family::ALL.to_vec()),
            Err(err) => {
                tracing::debug!(%err, "no usable ip6tables; cleaning IPv4 only");
                let tools =
                    IptablesTools::detect(run.force_backend, &[Family::V4], run.xtables_wait)?;
                (tools, vec![Family::V4])
            }
        };
    tools.hold_xtables_lock(&run.xtables_lockfile)?;
    let removed = crate::apply::iptables::cleanup(
        &mut tools,
        &mut NetlinkRouting::default(),
        &mut NetlinkIpSets::default(),
        &families,
    );
    // Tables an earlier --native-nftables run left: one netlink dump, nft only if there are.
    let mut failures = Vec::new();
    let removed = crate::apply::keep_going(removed, &mut failures)
        + crate::apply::keep_going(
            crate::apply::nft::cleanup_nftables(&mut nft, run.nftables_apply),
            &mut failures,
        );
    crate::apply::all_of(failures)?;
    crate::caps::drop_all()?;
    tracing::info!(
        backend = tools.backend().name(),
        removed,
        processes = tools.processes_launched() + nft.processes_launched(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "cleaned up"
    );
    Ok(())
}
