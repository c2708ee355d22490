//! `meshinit-cni` under a real container runtime: podman's CNI network backend with
//! meshinit chained after Debian's bridge plugin (`support::podman_cni`), and the pod Istio's
//! injector renders in CNI mode: `istio-validation` (meshinit's image, `--run-validation
//! --skip-rule-apply`, uid 1337, no capabilities) as its init container, then the sidecar and
//! the app, none of them with a capability. The same pod in init-container mode (meshinit's
//! image as istio-init, NET_ADMIN and NET_RAW) runs on the same kind of node without the
//! plugin, so the two modes are compared on one runtime: traffic, rules (`iptables-save`,
//! normalised, must be identical), re-runs, restarts, and a node without the plugin.
//!
//! `bench_pod_start_by_mode` (ignored; `bash benches/modes.sh`) measures both modes for
//! docs/comparison.md.
//!
//! Needs root, podman and the CNI plugins: skips with a reason otherwise, fails under
//! `CI=true`.

use std::process::Output;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::support::podman::{assert_blocked_by_init, images, require_podman, PodContainers};
use crate::support::podman_cni::{
    meshinit_plugin, require_cni, Node, Pod, NODE_IP, POD_IP, POD_NAMESPACE, VAULT,
};
use crate::support::procs::{connect, Outcome, Proto};
use crate::support::run_bounded;

/// The app's port, reached from the node.
const POD_8080: &str = "192.0.2.2:8080";

/// The init container's args as Istio's injector renders them for a pod without
/// annotations (pkg/kube/inject/testdata/inject/hello.yaml.injected).
fn injected() -> &'static [&'static str] {
    static ARGS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    ARGS.get_or_init(|| {
        let mut args = vec!["istio-iptables"];
        args.extend(crate::support::injector_args(&[
            "--log_output_level=default:info",
        ]));
        args
    })
}

/// What Istio's CNI plugin derives for the same pod, as istio-iptables flags: its
/// defaults exclude the status port outbound too, list the inbound exclusions in its own
/// order, and set the proxy's gid (istio-iptables defaults it to the uid).
const CNI_EQUIVALENT: &[&str] = &[
    "istio-iptables",
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-g",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15020,15021,15090",
    "-o",
    "15020",
    "--log_output_level=default:info",
];

/// podman's spelling of the init containers' securityContexts, as Istio's injector
/// renders them: istio-validation runs as the proxy's uid and gid with every capability
/// dropped; istio-init as root with NET_ADMIN and NET_RAW only. Both: no privilege
/// escalation, read-only root filesystem.
const VALIDATION_OPTIONS: &[&str] = &[
    "--init-ctr=always",
    "--user=1337:1337",
    "--security-opt=no-new-privileges",
    "--read-only",
    "--read-only-tmpfs=false",
    "--cap-drop=all",
];
const INIT_OPTIONS: &[&str] = &[
    "--init-ctr=always",
    "--user=0:0",
    "--security-opt=no-new-privileges",
    "--read-only",
    "--read-only-tmpfs=false",
    "--cap-drop=all",
    "--cap-add=NET_ADMIN,NET_RAW",
];
const SIDECAR_OPTIONS: &[&str] = &["--user=1337:1337", "--cap-drop=all"];
const SIDECAR_SPEC: &str = "serve sidecar tcp:0.0.0.0:15001 tcp:0.0.0.0:15006";
const APP_OPTIONS: &[&str] = &["--user=1000:1000", "--cap-drop=all"];
const APP_SPEC: &str = "serve app tcp:0.0.0.0:8080";

/// One podman-CNI test at a time: they share podman's storage and the pause image it makes
/// on first use, and the bench's timings should not compete with each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serialised() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn require(test: &str) -> bool {
    require_podman(test) && require_cni(test)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// meshinit's image as istio-init, with NET_ADMIN and NET_RAW, on a node without the
    /// plugin; `args` are its arguments.
    InitContainer { args: &'static [&'static str] },
    /// meshinit-cni chained on the node (or not), istio-validation as the init container.
    Cni,
}

impl Mode {
    fn init_role(self) -> &'static str {
        match self {
            Mode::InitContainer { .. } => "istio-init",
            Mode::Cni => "istio-validation",
        }
    }

    /// A node for this mode: meshinit chained for CNI mode, the bridge alone otherwise.
    fn node(self) -> Node {
        match self {
            Mode::InitContainer { .. } => Node::new(&[]),
            Mode::Cni => Node::new(&[meshinit_plugin(&[])]),
        }
    }
}

/// The pod: the mode's init container, the sidecar, the app; created, not started.
fn meshed_pod<'a>(node: &'a Node, mode: Mode) -> Pod<'a> {
    let images = images();
    let pod = Pod::new(node, "pod");
    match mode {
        Mode::InitContainer { args } => {
            pod.create(mode.init_role(), INIT_OPTIONS, &images.meshinit, args)
        }
        Mode::Cni => {
            let mut args = injected().to_vec();
            args.extend(["--run-validation", "--skip-rule-apply"]);
            pod.create(
                mode.init_role(),
                VALIDATION_OPTIONS,
                &images.meshinit,
                &args,
            );
        }
    }
    pod.create_helper("istio-proxy", SIDECAR_OPTIONS, &images.base, SIDECAR_SPEC);
    pod.create_helper("app", APP_OPTIONS, &images.base, APP_SPEC);
    pod
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Starts the pod, which must come up: its init container exits 0.
fn start(test: &str, pod: &Pod<'_>, mode: Mode) {
    let started = pod.start();
    let logs = pod.logs(mode.init_role());
    assert!(
        started.status.success(),
        "{test}: pod start failed ({}): {}\n{}:\n{logs}",
        started.status,
        stderr(&started),
        mode.init_role()
    );
    let init = pod.state(mode.init_role());
    assert_eq!(init.exit_code, 0, "{test}: {init:?}\n{logs}");
    if mode == Mode::Cni {
        assert!(
            logs.contains("validation passed"),
            "{test}: istio-validation did not say it passed:\n{logs}"
        );
    }
}

fn answered(outcome: &Outcome) -> Option<&crate::support::procs::Reply> {
    match outcome {
        Outcome::Answered(reply) => Some(reply),
        Outcome::Failed(_) => None,
    }
}

/// The traffic outcomes of a meshed pod: the app's connection to Vault reaches the
/// sidecar's 15001 with Vault as original destination; the node's connection to the app's
/// 8080 reaches 15006 with 8080 as original destination; the sidecar's own connection to
/// Vault is not captured.
fn check_traffic(test: &str, node: &Node, pod: &Pod<'_>) {
    pod.wait_ready("istio-proxy");
    pod.wait_ready("app");
    let outbound = pod.connect("app", "1000:1000", Proto::Tcp, VAULT);
    let inbound = connect(node.netns(), None, Proto::Tcp, POD_8080);
    let proxy_own = pod.connect("istio-proxy", "1337:1337", Proto::Tcp, VAULT);
    let mut wrong = Vec::new();
    let captured = |outcome: &Outcome, port: u16, orig: &str| {
        answered(outcome).is_some_and(|r| {
            r.by == "sidecar" && r.port == port && r.orig.is_some_and(|o| o.to_string() == orig)
        })
    };
    if !captured(&outbound, 15001, VAULT) {
        wrong.push(format!(
            "app → {VAULT}: expected the sidecar's 15001, got {outbound:?}"
        ));
    }
    if !captured(&inbound, 15006, POD_8080) {
        wrong.push(format!(
            "node → {POD_8080}: expected the sidecar's 15006, got {inbound:?}"
        ));
    }
    let direct = answered(&proxy_own).is_some_and(|r| {
        r.by == "peer" && r.local.to_string() == VAULT && r.client.ip().to_string() == POD_IP
    });
    if !direct {
        wrong.push(format!(
            "istio-proxy (1337) → {VAULT}: expected Vault itself, got {proxy_own:?}"
        ));
    }
    assert!(
        wrong.is_empty(),
        "{test}:\n{}\nrules in the pod:\n{}",
        wrong.join("\n"),
        pod.iptables_save()
    );
}

/// No container of the pod (init, sidecar, app) has any capability.
fn assert_no_capabilities(test: &str, pod: &Pod<'_>, roles: &[&str]) {
    for role in roles {
        let caps = pod.effective_caps(role);
        assert!(caps.is_empty(), "{test}: {role} runs with {caps:?}");
    }
}

/// The real runtime: podman's CNI backend runs meshinit-cni (chained after the bridge) when
/// the pod's sandbox starts; istio-validation, uid 1337 without capabilities, passes; the
/// app's and the node's connections are captured as in init-container mode.
#[test]
fn cni_pod_under_podman_captures_like_init_container_mode() {
    let test = "cni_pod_under_podman_captures_like_init_container_mode";
    if !require(test) {
        return;
    }
    let _one = serialised();
    let node = Mode::Cni.node();
    let pod = meshed_pod(&node, Mode::Cni);
    start(test, &pod, Mode::Cni);
    assert_no_capabilities(test, &pod, &["istio-validation", "istio-proxy", "app"]);
    check_traffic(test, &node, &pod);
}

/// The same pod in both modes on the same runtime: identical `iptables-save` (both
/// backends, both families, normalised) when istio-init is given the settings the CNI
/// plugin derives; the same traffic outcomes.
#[test]
fn cni_and_init_container_modes_install_identical_rules() {
    let test = "cni_and_init_container_modes_install_identical_rules";
    if !require(test) {
        return;
    }
    let _one = serialised();
    let mut saves = Vec::new();
    for mode in [
        Mode::Cni,
        Mode::InitContainer {
            args: CNI_EQUIVALENT,
        },
    ] {
        let node = mode.node();
        let pod = meshed_pod(&node, mode);
        start(test, &pod, mode);
        check_traffic(test, &node, &pod);
        saves.push(pod.iptables_save());
    }
    assert!(
        saves[0].contains("-A OUTPUT -j ISTIO_OUTPUT"),
        "{test}: no capture rules in CNI mode:\n{}",
        saves[0]
    );
    assert_eq!(
        saves[0],
        saves[1],
        "{test}: CNI mode (-) and init-container mode (+) differ:\n{}",
        diff(&saves[0], &saves[1])
    );
}

/// CNI mode on a node whose network does not chain meshinit-cni: istio-validation exits
/// 126 (Istio's code) with a message saying what to check, and neither the sidecar nor the
/// app ever starts.
#[test]
fn cni_mode_without_the_plugin_never_starts_the_app() {
    let test = "cni_mode_without_the_plugin_never_starts_the_app";
    if !require(test) {
        return;
    }
    let _one = serialised();
    let node = Node::new(&[]);
    let pod = meshed_pod(&node, Mode::Cni);
    let started = pod.start();
    assert_blocked_by_init(
        &format!("{test} (no plugin)"),
        &pod,
        &started,
        "istio-validation",
        126,
        &["127.0.0.6:15002", "ISTIO_OUTPUT", "CNI"],
        &["istio-proxy", "app"],
    );
}

/// podman's own `CNI_ARGS` name the pod (`K8S_POD_NAME`) but give no namespace: to
/// meshinit-cni, as to Istio's plugin, that is no Kubernetes pod, and it is left alone. So
/// istio-validation fails as on a node without the plugin, and the app never starts.
#[test]
fn cni_mode_skips_a_pod_without_a_kubernetes_namespace() {
    let test = "cni_mode_skips_a_pod_without_a_kubernetes_namespace";
    if !require(test) {
        return;
    }
    let _one = serialised();
    let node = Node::without_pod_namespace(&[meshinit_plugin(&[])]);
    let pod = meshed_pod(&node, Mode::Cni);
    let started = pod.start();
    let logs = pod.logs("istio-validation");
    assert!(
        !started.status.success(),
        "{test}: the pod started, so meshinit-cni captured a pod without a namespace:\n{logs}"
    );
    let validation = pod.state("istio-validation");
    assert_eq!(validation.exit_code, 126, "{test}: {validation:?}\n{logs}");
    assert!(
        !pod.state("app").ever_started,
        "{test}: app started after istio-validation failed"
    );
}

/// The network configuration libcni hands the plugin at `index`, as it builds it: the
/// list's name and version, the plugin's own keys and the previous plugin's result.
fn plugin_stdin(node: &Node, index: usize, prev_result: &Value) -> String {
    let list = node.conflist();
    let mut conf = list["plugins"][index].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["prevResult"] = prev_result.clone();
    conf.to_string()
}

/// Runs the node's `meshinit-cni` by hand as podman would for `pod` (from the node's
/// namespace, with podman's CNI_ARGS): `command` with `stdin`. Returns (exit code, stdout).
fn invoke_plugin(node: &Node, pod: &Pod<'_>, command: &str, stdin: &str) -> (i32, String) {
    let dir = crate::support::scratch::ScratchDir::new("cni-stdin");
    let input = dir.write("stdin.json", stdin);
    let netns = pod.netns_path();
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", node.netns().name()))
        .arg("sh")
        .arg("-c")
        .arg("exec \"$0\" < \"$1\"")
        .arg(node.plugin_dir().join("meshinit-cni"))
        .arg(&input)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod.name())
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAME={};K8S_POD_NAMESPACE={POD_NAMESPACE}",
                pod.name()
            ),
        )
        .env("CNI_PATH", node.plugin_dir());
    let output = run_bounded(&mut cmd, Duration::from_secs(30));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// CNI mode, things happening twice: a second ADD for the same sandbox (a runtime's
/// retry) changes nothing and returns the previous result; CHECK finds no drift;
/// istio-validation restarted in the same sandbox passes again; the pod restarted (DEL, then ADD into its new
/// namespace) comes back with the same rules and the same traffic outcomes.
#[test]
fn cni_mode_add_twice_and_restarts_converge() {
    let test = "cni_mode_add_twice_and_restarts_converge";
    if !require(test) {
        return;
    }
    let _one = serialised();
    let node = Mode::Cni.node();
    let pod = meshed_pod(&node, Mode::Cni);
    start(test, &pod, Mode::Cni);
    let first = pod.iptables_save();

    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
        "ips": [{"address": format!("{POD_IP}/24"), "gateway": NODE_IP, "interface": 0}],
    });
    let stdin = plugin_stdin(&node, 1, &prev);
    let (code, stdout) = invoke_plugin(&node, &pod, "ADD", &stdin);
    assert_eq!(code, 0, "{test}: second ADD: {stdout}");
    let result: Value = serde_json::from_str(&stdout).expect("ADD's result");
    assert_eq!(
        result["ips"], prev["ips"],
        "{test}: the result passes through"
    );
    assert_eq!(
        pod.iptables_save(),
        first,
        "{test}: ADD twice changed the rules"
    );
    let (code, stdout) = invoke_plugin(&node, &pod, "CHECK", &stdin);
    assert_eq!(code, 0, "{test}: CHECK after two ADDs: {stdout}");

    // A kubelet re-runs init containers before the others start (or after they stopped,
    // with a new sandbox): validation binds the proxy's ports, so stop the proxy first.
    for role in ["app", "istio-proxy"] {
        node.expect(&["stop", "--time", "0", &pod.container_name(role)]);
    }
    let rerun = node.run(&["start", "--attach", &pod.container_name("istio-validation")]);
    assert!(
        rerun.status.success() && stderr(&rerun).contains("validation passed"),
        "{test}: istio-validation restarted: {}",
        stderr(&rerun)
    );

    let stopped = pod.stop();
    assert!(stopped.status.success(), "{test}: {}", stderr(&stopped));
    start(test, &pod, Mode::Cni);
    assert_eq!(pod.iptables_save(), first, "{test}: after a pod restart");
    check_traffic(test, &node, &pod);
}

/// Init-container mode on the same runtime, re-run: istio-init started again in the
/// running pod's namespace converges to the same rules (traffic unchanged); the pod
/// restarted comes back with the same rules.
#[test]
fn init_container_mode_rerun_and_restart_converge() {
    let test = "init_container_mode_rerun_and_restart_converge";
    if !require(test) {
        return;
    }
    let _one = serialised();
    let mode = Mode::InitContainer { args: injected() };
    let node = mode.node();
    let pod = meshed_pod(&node, mode);
    start(test, &pod, mode);
    let first = pod.iptables_save();
    let rerun = node.run(&["start", "--attach", &pod.container_name("istio-init")]);
    assert!(
        rerun.status.success(),
        "{test}: istio-init re-run: {}",
        stderr(&rerun)
    );
    assert_eq!(pod.iptables_save(), first, "{test}: after a re-run");
    check_traffic(test, &node, &pod);
    let stopped = pod.stop();
    assert!(stopped.status.success(), "{test}: {}", stderr(&stopped));
    start(test, &pod, mode);
    assert_eq!(pod.iptables_save(), first, "{test}: after a pod restart");
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i128
}

/// One timed start of a fresh pod in `mode` on `node`, in ms: from `podman pod start` to
/// the app's start; from `pod start` to the sandbox's start (podman starts the infra
/// container once CNI ADD is done); from the sandbox's start to the app's (the init
/// container, run to completion, and the sidecar).
fn timed_start(node: &Node, mode: Mode) -> [f64; 3] {
    let pod = meshed_pod(node, mode);
    let t0 = now_ns();
    start("bench", &pod, mode);
    let app = pod.started_at("app");
    let sandbox = pod.infra_started_at();
    let ms = |ns: i128| ns as f64 / 1e6;
    [ms(app - t0), ms(sandbox - t0), ms(app - sandbox)]
}

/// `diff -U0` of two texts (empty when equal).
fn diff(left: &str, right: &str) -> String {
    let dir = crate::support::scratch::ScratchDir::new("diff");
    let (l, r) = (dir.write("left", left), dir.write("right", right));
    let mut cmd = std::process::Command::new("diff");
    cmd.arg("-U0").arg(&l).arg(&r);
    let out = run_bounded(&mut cmd, Duration::from_secs(10));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| !line.starts_with("---") && !line.starts_with("+++"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `bash benches/modes.sh` (`MESHINIT_BENCH_RUNS`, default 11): the figures in
/// docs/comparison.md. Runs alternate between the modes, each a fresh pod on a node of its
/// own kind.
#[test]
#[ignore = "a benchmark: bash benches/modes.sh"]
fn bench_pod_start_by_mode() {
    let test = "bench_pod_start_by_mode";
    if !require(test) {
        return;
    }
    let _one = serialised();
    let runs: usize = std::env::var("MESHINIT_BENCH_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(11);
    let init_mode = Mode::InitContainer { args: injected() };
    let cni_node = Mode::Cni.node();
    let init_node = init_mode.node();
    // A first pod of each, untimed: podman makes its pause image, caches warm up.
    timed_start(&cni_node, Mode::Cni);
    timed_start(&init_node, init_mode);
    let (mut ic, mut cni): (Vec<[f64; 3]>, Vec<[f64; 3]>) = (vec![], vec![]);
    for run in 0..runs {
        // ABBA: neither mode always goes first.
        if run % 2 == 0 {
            ic.push(timed_start(&init_node, init_mode));
            cni.push(timed_start(&cni_node, Mode::Cni));
        } else {
            cni.push(timed_start(&cni_node, Mode::Cni));
            ic.push(timed_start(&init_node, init_mode));
        }
    }
    // (p25, median, p75) of column `i`.
    let quartiles = |runs: &[[f64; 3]], i: usize| {
        let mut values: Vec<f64> = runs.iter().map(|r| r[i]).collect();
        values.sort_by(f64::total_cmp);
        let at = |q: usize| values[(values.len() - 1) * q / 4];
        (at(1), at(2), at(3))
    };
    println!("\nms, median (p25–p75) of {runs} runs each, alternating:");
    println!("| mode | pod start → app start | pod start → sandbox up | sandbox up → app start |");
    println!("| --- | --- | --- | --- |");
    for (name, runs) in [
        ("init container (istio-init)", &ic),
        ("CNI (meshinit-cni, istio-validation)", &cni),
    ] {
        let cells: Vec<String> = (0..3)
            .map(|i| {
                let (p25, p50, p75) = quartiles(runs, i);
                format!("{p50:.0} ({p25:.0}–{p75:.0})")
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    let ratios: Vec<String> = (0..3)
        .map(|i| format!("{:.2}x", quartiles(&cni, i).1 / quartiles(&ic, i).1))
        .collect();
    println!(
        "| ratio of medians, CNI / init container | {} |",
        ratios.join(" | ")
    );

    // Capabilities, as podman reports them for each container.
    for (mode, node) in [(init_mode, &init_node), (Mode::Cni, &cni_node)] {
        let pod = meshed_pod(node, mode);
        start(test, &pod, mode);
        for role in [mode.init_role(), "istio-proxy", "app"] {
            println!(
                "capabilities {:?} {role}: {:?}",
                mode.init_role(),
                pod.effective_caps(role)
            );
        }
        if mode == Mode::Cni {
            // The rules Istio's default injector args give, against the CNI plugin's.
            drop(pod);
            let cni = {
                let pod = meshed_pod(node, Mode::Cni);
                start(test, &pod, Mode::Cni);
                pod.iptables_save()
            };
            let init = {
                let pod = meshed_pod(&init_node, init_mode);
                start(test, &pod, init_mode);
                pod.iptables_save()
            };
            println!(
                "rules, CNI defaults (-) against the injector's default istio-init args (+):\n{}",
                diff(&cni, &init)
            );
        }
    }

    // A node without the plugin: how long until the pod start fails.
    let bare = Node::new(&[]);
    let pod = meshed_pod(&bare, Mode::Cni);
    let t0 = now_ns();
    let started = pod.start();
    println!(
        "no plugin on the node: pod start failed after {:.1} s (exit code of istio-validation: {}), app started: {}",
        (now_ns() - t0) as f64 / 1e9,
        pod.state("istio-validation").exit_code,
        pod.state("app").ever_started
    );
    assert!(!started.status.success());
}
