//! `meshinit validate`, Istio's istio-validation: it passes in a pod namespace with the
//! capture rules in place, fails with exit 126 (Istio's code) within its timeout without
//! them, and says what to check.

use crate::support::meshinit::{apply, command, run};
use crate::support::netns::NetNs;
use crate::support::{injector_args, require_root};

/// Runs as the proxy would in Istio's validation container: uid and gid 1337, no
/// capabilities at all.
pub(crate) const AS_PROXY: &[&str] = &[
    "setpriv",
    "--reuid=1337",
    "--regid=1337",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

fn pod(role: &str) -> NetNs {
    let ns = NetNs::new(role);
    ns.run(&["ip", "link", "set", "lo", "up"]);
    ns
}

#[test]
fn validation_passes_with_capture_rules() {
    if !require_root("validation_passes_with_capture_rules") {
        return;
    }
    for (mode, family) in [
        ("REDIRECT", "--no-ipv6"),
        ("TPROXY", "--no-ipv6"),
        ("REDIRECT", "--ipv6"),
    ] {
        let ns = pod("valid");
        let rules = ["-m", mode, "-i", "*", "-b", "*", "-u", "1337", family];
        apply(&ns, &rules, &[]);
        let mut args = vec!["validate", "--probe-timeout", "5s"];
        args.extend_from_slice(&rules);
        run(command(&ns, AS_PROXY, &args))
            .assert_exit(0)
            .assert_stderr_mentions(&["validation passed"]);
    }
}

#[test]
fn validation_fails_with_istio_exit_code_without_rules() {
    if !require_root("validation_fails_with_istio_exit_code_without_rules") {
        return;
    }
    let ns = pod("novalid");
    let args = ["validate", "--probe-timeout", "1s", "--no-ipv6"];
    run(command(&ns, AS_PROXY, &args))
        .assert_exit(126)
        .assert_stderr_mentions(&["127.0.0.6:15002", "within 1s", "ISTIO_OUTPUT"]);
}

#[test]
fn validation_names_the_uid_when_run_as_another_user() {
    if !require_root("validation_names_the_uid_when_run_as_another_user") {
        return;
    }
    let ns = pod("wronguid");
    apply(&ns, &["-i", "*", "-b", "*", "--no-ipv6"], &[]);
    let as_app = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"];
    let args = ["validate", "--probe-timeout", "1s", "--no-ipv6"];
    run(command(&ns, &as_app, &args))
        .assert_exit(126)
        .assert_stderr_mentions(&["proxy's uid (1337, now 1000)"]);
}

#[test]
fn run_validation_with_skip_rule_apply_only_validates() {
    if !require_root("run_validation_with_skip_rule_apply_only_validates") {
        return;
    }
    // Istio's CNI-mode validation container: the same args, plus these two flags.
    let ns = pod("cnival");
    let injector = injector_args(&["--no-ipv6"]);
    let mut args = vec!["istio-iptables"];
    args.extend_from_slice(&injector);
    args.extend_from_slice(&[
        "--run-validation",
        "--skip-rule-apply",
        "--probe-timeout=1s",
    ]);
    run(command(&ns, AS_PROXY, &args)).assert_exit(126);
    apply(&ns, &injector, &[]);
    run(command(&ns, AS_PROXY, &args)).assert_exit(0);
}
