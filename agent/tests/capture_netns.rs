//! The capture check on real network namespaces, as root: the production `ProcCapture`
//! (the pod's namespace found through a proc tree by its cgroup, the real meshinit binary
//! run as `meshinit-cni` CHECK and ADD) on a namespace this test makes. Rules flushed →
//! found drifted, repaired, and CHECK clean again; reported only under `report`; a changed
//! annotation → the new rules; a bad annotation → the rules byte for byte as they were;
//! a pod with no process → unreachable. Without root (or ip, iptables-nft) it skips with
//! the reason; under CI=true it fails instead.

use meshinit_cni_agent::capture::{
    self, netns::PodProcesses, plugin, reconcile_pod, CaptureSettings, Checked, PodCapture,
    PodView, Policy, ProcCapture, State, UpgradeBudget, STATE_ANNOTATION,
};
use meshinit_cni_agent::metrics::CaptureCause;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const UID: &str = "6f1c0a52-9d1e-4b7a-8c3e-2a4b5c6d7e8f";
const PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";

fn skip(test: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{test}: cannot run under CI=true: {reason}");
    }
    eprintln!("SKIP {test}: {reason}");
}

/// The meshinit binary the workspace built beside this test (target/<profile>/meshinit).
fn meshinit_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let bin = profile_dir.join("meshinit");
    bin.is_file().then_some(bin)
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of this test's own, with an address (the plugin detects IPv6 from
/// the pod's addresses), removed when dropped, also when the test fails.
struct Netns(String);

impl Netns {
    fn new(which: &str) -> Netns {
        let name = format!("mi-reconcile-{which}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        ns.exec(&["ip", "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        ns
    }
    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", &self.0];
        all.extend_from_slice(args);
        sh(&all)
    }
    /// meshinit's parts of the nat table (its chains and the jumps to them).
    fn rules(&self) -> String {
        self.exec(&["iptables-nft-save", "-t", "nat"])
            .lines()
            .filter(|l| l.contains("ISTIO"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A proc tree holding one process of the pod: its cgroup names the pod, its ns/net is
/// the test's namespace.
fn proc_tree(dir: &Path, netns: &Netns) {
    let pid = dir.join("4242");
    std::fs::create_dir_all(pid.join("ns")).unwrap();
    std::fs::write(
        pid.join("cgroup"),
        format!("0::/kubepods/besteffort/pod{UID}/pause\n"),
    )
    .unwrap();
    std::os::unix::fs::symlink(format!("/run/netns/{}", netns.0), pid.join("ns/net")).unwrap();
    std::fs::create_dir_all(dir.join("thread-self/ns")).unwrap();
    std::os::unix::fs::symlink("/proc/thread-self/ns/net", dir.join("thread-self/ns/net")).unwrap();
}

/// The production capture, finding the pod in the proc tree at `dir`.
fn proc_capture(dir: &Path, binary: &Path) -> ProcCapture {
    ProcCapture {
        processes: PodProcesses::new(dir.to_owned()),
        plugin: plugin::PluginRunner {
            binary: binary.to_owned(),
            conf: plugin::PluginConf::default(),
            timeout: Duration::from_secs(60),
        },
    }
}

fn pod() -> PodView {
    PodView {
        uid: UID.into(),
        namespace: "shop".into(),
        name: "cart-1".into(),
        annotations: BTreeMap::from([(
            "sidecar.istio.io/status".to_owned(),
            r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"]}"#.to_owned(),
        )]),
        host_network: false,
        running: true,
        node_name: Some("node-a".into()),
        init_args: None,
        init_env: BTreeMap::new(),
    }
}

fn settings(policy: Policy, binary: &Path) -> CaptureSettings {
    CaptureSettings {
        node_name: "node-a".into(),
        policy,
        interval: Duration::from_secs(30),
        upgrade: false,
        upgrades_per_minute: 6,
        exclude_namespaces: Vec::new(),
        plugin: plugin::PluginConf::default(),
        plugin_id: capture::plugin_id(binary),
        init_container_pods: true,
        repair_init_container_pods: false,
    }
}

fn recorded(mut pod: PodView, outcome: &capture::Outcome) -> PodView {
    pod.annotations
        .insert(STATE_ANNOTATION.into(), outcome.record.render());
    pod
}

/// The meshinit binary, when this test can run here (root, the tools); else skips.
fn can_run(test: &str) -> Option<PathBuf> {
    if !nix::unistd::Uid::effective().is_root() {
        skip(test, "needs root (network namespaces, iptables)");
        return None;
    }
    for tool in ["ip", "iptables-nft-save"] {
        if which(tool).is_none() {
            skip(test, &format!("needs {tool}"));
            return None;
        }
    }
    let binary = meshinit_binary();
    if binary.is_none() {
        skip(
            test,
            "needs the meshinit binary beside the tests (cargo build --bin meshinit)",
        );
    }
    binary
}

#[test]
fn a_real_namespace_drifted_is_repaired_and_a_bad_annotation_changes_nothing() {
    let test = "a_real_namespace_drifted_is_repaired_and_a_bad_annotation_changes_nothing";
    let Some(binary) = can_run(test) else { return };
    let netns = Netns::new("cni");
    let dir = tempfile::tempdir().unwrap();
    proc_tree(dir.path(), &netns);
    let capture = proc_capture(dir.path(), &binary);
    let repair = settings(Policy::Repair, &binary);
    let mut budget = UpgradeBudget::default();
    let mut run = |pod: &PodView, settings: &CaptureSettings| {
        reconcile_pod(pod, &capture, settings, &mut budget, 0, Instant::now())
    };

    // A pod the plugin never set up: no rules at all, drifted, repaired.
    let pod = pod();
    assert!(matches!(capture.check(&pod), Checked::Drifted(_)));
    let first = run(&pod, &repair);
    assert_eq!(first.repaired, Some(CaptureCause::Drift), "{first:?}");
    assert_eq!(capture.check(&pod), Checked::Clean);
    let installed = netns.rules();
    assert!(
        installed.contains("-A OUTPUT -j ISTIO_OUTPUT"),
        "{installed}"
    );
    let pod = recorded(pod, &first);

    // Flushed, as a user or another tool might: found, named, reported only under report.
    netns.exec(&["iptables-nft", "-t", "nat", "-F", "OUTPUT"]);
    match capture.check(&pod) {
        Checked::Drifted(details) => {
            assert!(details.contains("ISTIO_OUTPUT"), "{details}")
        }
        other => panic!("flushed OUTPUT not found: {other:?}"),
    }
    let report = run(&pod, &settings(Policy::Report, &binary));
    assert_eq!(report.state, State::Drifted);
    assert!(
        !netns.rules().contains("-A OUTPUT"),
        "report changed the pod"
    );
    let repaired = run(&pod, &repair);
    assert_eq!(repaired.repaired, Some(CaptureCause::Drift), "{repaired:?}");
    assert_eq!(netns.rules(), installed, "repaired exactly to the plan");

    // A live annotation change: the new plan, and the record follows it.
    let changed = {
        let mut p = pod.clone();
        p.annotations.insert(PORTS.into(), "8200".into());
        p
    };
    let updated = run(&changed, &repair);
    assert_eq!(
        updated.repaired,
        Some(CaptureCause::Annotations),
        "{updated:?}"
    );
    let rules = netns.rules();
    assert!(rules.contains("--dport 8200 -j RETURN"), "{rules}");
    let changed = recorded(changed, &updated);

    // A bad value: refused before the pod is touched, the Event names it, rules unchanged.
    let before = netns.exec(&["iptables-nft-save"]);
    let bad = {
        let mut p = changed.clone();
        p.annotations.insert(PORTS.into(), "8200,80x".into());
        p
    };
    let refused = run(&bad, &repair);
    assert_eq!(refused.state, State::Invalid);
    let event = refused.event.expect("an Event");
    assert!(
        event.message.contains(PORTS) && event.message.contains("80x"),
        "{}",
        event.message
    );
    let strip = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&netns.exec(&["iptables-nft-save"])), strip(&before));

    // No process of the pod: unreachable, with a backoff.
    let gone = ProcCapture {
        processes: PodProcesses::new(dir.path().join("nowhere")),
        plugin: capture.plugin.clone(),
    };
    let outcome = reconcile_pod(
        &changed,
        &gone,
        &repair,
        &mut UpgradeBudget::default(),
        0,
        Instant::now(),
    );
    assert_eq!(outcome.state, State::Unreachable);
    assert!(outcome.retry_after.is_some());
}

/// An init-container-mode pod: checked against istio-init's own arguments (`meshinit
/// check`), its drift reported and not repaired unless opted in, then repaired; a bad
/// argument named.
#[test]
fn an_init_container_mode_pod_is_reported_and_repaired_only_when_opted_in() {
    let test = "an_init_container_mode_pod_is_reported_and_repaired_only_when_opted_in";
    let Some(binary) = can_run(test) else { return };
    let netns = Netns::new("init");
    let dir = tempfile::tempdir().unwrap();
    proc_tree(dir.path(), &netns);
    let capture = proc_capture(dir.path(), &binary);
    // istio-init's arguments as Istio's injector renders them (empty -x aside).
    let args: Vec<String> =
        "istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i * -b * -d 15090,15021,15020"
            .split(' ')
            .map(String::from)
            .collect();
    let mut pod = pod();
    pod.annotations.insert(
        "sidecar.istio.io/status".into(),
        r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#.into(),
    );
    pod.init_args = Some(args.clone());
    // istio-init ran: the rules are there.
    let out = Command::new(&binary)
        .arg("apply")
        .arg("--network-namespace")
        .arg(format!("/run/netns/{}", netns.0))
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(capture.check(&pod), Checked::Clean);
    netns.exec(&["iptables-nft", "-t", "nat", "-F", "OUTPUT"]);
    let outcome = reconcile_pod(
        &pod,
        &capture,
        &settings(Policy::Repair, &binary),
        &mut UpgradeBudget::default(),
        0,
        Instant::now(),
    );
    assert_eq!(outcome.state, State::Drifted, "{outcome:?}");
    let event = outcome.event.expect("an Event");
    assert!(
        event.message.contains("missing `-j ISTIO_OUTPUT`")
            && event.message.contains("init-container mode: reported only"),
        "{}",
        event.message
    );
    assert!(
        !netns.rules().contains("-A OUTPUT"),
        "reported only: not repaired"
    );
    // Opted in (capture.repairInitContainerPods): re-applied with istio-init's arguments.
    let mut opted_in = settings(Policy::Repair, &binary);
    opted_in.repair_init_container_pods = true;
    let repaired = reconcile_pod(
        &pod,
        &capture,
        &opted_in,
        &mut UpgradeBudget::default(),
        0,
        Instant::now(),
    );
    assert_eq!(repaired.repaired, Some(CaptureCause::Drift), "{repaired:?}");
    assert_eq!(capture.check(&pod), Checked::Clean);
    assert!(
        netns.rules().contains("-A OUTPUT -j ISTIO_OUTPUT"),
        "{}",
        netns.rules()
    );
    let mut bad = pod.clone();
    bad.init_args = Some(
        ["istio-iptables", "-p", "15001", "-b", "80x"]
            .map(String::from)
            .to_vec(),
    );
    match capture.check(&bad) {
        Checked::Invalid(why) => assert!(why.contains("80x"), "{why}"),
        other => panic!("a bad argument: {other:?}"),
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}
