//! The dry-run's comment lines beside the rules (`print`, `apply --dry-run`): the run's
//! settings as they resolved, and what a run that installs no rules does instead. The
//! engine's dry-run renders the rules; these say the rest, so that `print` shows exactly
//! what `apply` does with the same flags.

use crate::config::RunOptions;

/// `--skip-rule-apply`: nothing is planned, installed or removed.
pub const SKIP_RULE_APPLY: &str = "# --skip-rule-apply: apply installs and removes nothing here\n";

/// `--cleanup-only` installs nothing; what it removes is what it finds, so it is described.
pub const CLEANUP_ONLY: &str =
    "# --cleanup-only: apply installs nothing; it removes what meshinit or \
istio-init added here, as it finds it: the ISTIO_* chains and the rules jumping to them \
(both families), the nftables tables istio-proxy-nat, istio-proxy-mangle and \
istio-proxy-raw, meshinit's sets, and the TPROXY routing\n";

/// One comment line with how each option that shapes the run (not the rules) resolved, from
/// flags, annotations, environment or defaults: `--skip-rule-apply=false ...`.
pub fn run_settings(run: &RunOptions) -> String {
    let timeout = run.probe_timeout;
    // Seconds, as a Go duration `--probe-timeout` takes back ("5s", "0.25s").
    let mut seconds = format!("{}.{:09}", timeout.as_secs(), timeout.subsec_nanos());
    seconds = seconds
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_owned();
    let namespace = run
        .network_namespace
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let binary = match run.force_backend {
        None => "",
        Some(crate::config::ForcedBackend::Legacy) => "legacy",
        Some(crate::config::ForcedBackend::Nft) => "nft",
    };
    format!(
        "# run: --dry-run={} --skip-rule-apply={} --cleanup-only={} --run-validation={} \
         --iptables-probe-port={} --probe-timeout={seconds}s --network-namespace={namespace:?} \
         --cni-mode={} --reconcile={} --force-apply={} --native-nftables={} \
         --force-iptables-binary={binary:?} --dual-stack={}\n",
        run.dry_run,
        run.skip_rule_apply,
        run.cleanup_only,
        run.run_validation,
        run.probe_port,
        run.cni_mode,
        run.reconcile,
        run.force_apply,
        run.native_nftables,
        run.dual_stack,
    )
}
