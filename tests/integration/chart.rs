//! The node agent's Helm chart (`charts/meshinit-cni/`): `helm template` with the default
//! values and each hosted platform's, every object validated against the API schemas
//! (strict), and what the objects must say: the platform's host paths, no capability, RBAC
//! limited to what repair needs.
//!
//! Needs helm (`HELM`, else `helm` on PATH; scripts/test.sh builds it with
//! tests/k8s/build-addons.sh) and kubernetes-validate: skips with a reason otherwise, fails
//! under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::k8s::{require_kubernetes_validate, validate, VERSIONS};
use crate::support::{run_bounded, skip};

const TIMEOUT: Duration = Duration::from_secs(120);

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/meshinit-cni")
}

/// The helm binary, or `None` after saying why there is none.
fn require_helm(test_name: &str) -> Option<PathBuf> {
    let helm = match std::env::var_os("HELM") {
        Some(path) => PathBuf::from(path),
        None => match which::which("helm") {
            Ok(path) => path,
            Err(_) => {
                skip(
                    test_name,
                    "needs helm (set HELM, or put it on PATH; scripts/test.sh builds it with tests/k8s/build-addons.sh)",
                );
                return None;
            }
        },
    };
    if !helm.is_file() {
        skip(test_name, &format!("HELM={} is not a file", helm.display()));
        return None;
    }
    Some(helm)
}

/// `helm template` with `args` (`--set` ...): the rendered YAML, or helm's error.
fn template(helm: &Path, args: &[&str]) -> Result<String, String> {
    let output = run_bounded(
        Command::new(helm)
            .args(["template", "mesh", "--namespace", "kube-system"])
            .arg(chart_dir())
            .args(args),
        TIMEOUT,
    );
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// The objects of a multi-document YAML stream, through Python's yaml (which
/// kubernetes-validate brings).
fn objects(yaml: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write yaml");
    let output = child.wait_with_output().expect("python3 runs");
    assert!(
        output.status.success(),
        "yaml: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json from python")
}

fn kind<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the chart's output"))
}

fn env_of(daemonset: &Value, name: &str) -> Option<String> {
    daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

fn host_path(daemonset: &Value, volume: &str) -> String {
    daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == volume)
        .and_then(|v| v["hostPath"]["path"].as_str())
        .unwrap_or_else(|| panic!("no hostPath volume {volume}"))
        .to_owned()
}

/// The value sets the chart is tested with: the default and each hosted platform's.
const VALUE_SETS: [(&str, &[&str]); 5] = [
    ("default", &[]),
    ("gke", &["--set", "platform=gke"]),
    ("openshift", &["--set", "platform=openshift"]),
    ("no repair", &["--set", "repair.enabled=false"]),
    (
        "settings",
        &[
            "--set",
            "cniConfFileName=10-calico.conflist",
            "--set",
            "excludeNamespaces={kube-system,istio-system}",
            "--set",
            "proxyEnv.ISTIO_META_DNS_CAPTURE=true",
            "--set",
            "repair.deletePods=false",
            "--set",
            "repair.labelPods=true",
            "--set",
            "capture.policy=report",
            "--set",
            "capture.intervalSeconds=10",
            "--set",
            "capture.upgrade=true",
            "--set",
            "capture.excludeNamespaces={legacy,batch}",
        ],
    ),
];

#[test]
fn chart_renders_and_validates_against_the_api_schemas() {
    let test = "chart_renders_and_validates_against_the_api_schemas";
    let Some(helm) = require_helm(test) else {
        return;
    };
    if !require_kubernetes_validate(test) {
        return;
    }
    let dir = tempfile_dir();
    let mut failures = Vec::new();
    for (name, args) in VALUE_SETS {
        let yaml =
            template(&helm, args).unwrap_or_else(|err| panic!("{name}: helm template: {err}"));
        let file = dir.join(format!("{}.yaml", name.replace(' ', "-")));
        std::fs::write(&file, &yaml).expect("write rendered chart");
        for version in VERSIONS {
            let output = validate(&file, version);
            if !output.status.success() {
                failures.push(format!(
                    "{name} against {version}:\n{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{test}:\n{}", failures.join("\n"));
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshinit-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn chart_uses_each_platforms_cni_paths() {
    let test = "chart_uses_each_platforms_cni_paths";
    let Some(helm) = require_helm(test) else {
        return;
    };
    if !require_kubernetes_validate(test) {
        return;
    }
    for (platform, bin, conf, chained) in [
        ("", "/opt/cni/bin", "/etc/cni/net.d", "true"),
        ("gke", "/home/kubernetes/bin", "/etc/cni/net.d", "true"),
        (
            "openshift",
            "/var/lib/cni/bin",
            "/etc/cni/multus/net.d",
            "false",
        ),
    ] {
        let set = format!("platform={platform}");
        let rendered = objects(&template(&helm, &["--set", &set]).expect("renders"));
        let ds = kind(&rendered, "DaemonSet");
        assert_eq!(host_path(ds, "cni-bin-dir"), bin, "{platform:?}");
        assert_eq!(host_path(ds, "cni-conf-dir"), conf, "{platform:?}");
        assert_eq!(
            env_of(ds, "CHAINED").as_deref(),
            Some(chained),
            "{platform:?}"
        );
    }
    // Explicit directories win over the platform's.
    let rendered = objects(
        &template(
            &helm,
            &["--set", "platform=gke", "--set", "cniBinDir=/custom/bin"],
        )
        .expect("renders"),
    );
    assert_eq!(
        host_path(kind(&rendered, "DaemonSet"), "cni-bin-dir"),
        "/custom/bin"
    );
    let err = template(&helm, &["--set", "platform=nowhere"]).expect_err("unknown platform");
    assert!(err.contains("platform \"nowhere\" is not one of"), "{err}");
}

#[test]
fn chart_grants_only_what_repair_and_capture_need() {
    let test = "chart_grants_only_what_repair_and_capture_need";
    let Some(helm) = require_helm(test) else {
        return;
    };
    if !require_kubernetes_validate(test) {
        return;
    }
    let rendered = objects(&template(&helm, &[]).expect("renders"));
    let ds = kind(&rendered, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let security = &pod["containers"][0]["securityContext"];
    // Checking running pods: the plugin's capabilities, and the node's processes.
    assert_eq!(
        security["capabilities"],
        serde_json::json!({"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"]})
    );
    assert_eq!(pod["hostPID"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert!(security.get("privileged").is_none_or(|p| p == false));
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert_eq!(
        pod["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/readyz"
    );
    assert_eq!(
        env_of(ds, "REPAIR_INIT_CONTAINER_NAME").as_deref(),
        Some("istio-validation")
    );
    assert_eq!(env_of(ds, "CAPTURE_POLICY").as_deref(), Some("repair"));
    let rules = |rendered: &[serde_json::Value]| kind(rendered, "ClusterRole")["rules"].clone();
    let pods_and_events = |verbs: &[&str]| {
        serde_json::json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": verbs},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        ])
    };
    assert_eq!(
        rules(&rendered),
        pods_and_events(&["get", "list", "watch", "delete", "patch"])
    );
    let binding = kind(&rendered, "ClusterRoleBinding");
    assert_eq!(
        binding["subjects"][0]["name"],
        ds["spec"]["template"]["spec"]["serviceAccountName"]
    );
    // Capture only: its annotation (patch), no delete.
    let rendered = objects(&template(&helm, &["--set", "repair.enabled=false"]).expect("renders"));
    assert_eq!(
        rules(&rendered),
        pods_and_events(&["get", "list", "watch", "patch"])
    );
    // Repair only, deleting: no patch, no capability, not the node's processes.
    let rendered = objects(&template(&helm, &["--set", "capture.policy=off"]).expect("renders"));
    assert_eq!(
        rules(&rendered),
        pods_and_events(&["get", "list", "watch", "delete"])
    );
    let pod = &kind(&rendered, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["securityContext"]["capabilities"],
        serde_json::json!({"drop": ["ALL"]})
    );
    assert!(pod.get("hostPID").is_none_or(|p| p == false));
    // Neither: no API access at all.
    let rendered = objects(
        &template(
            &helm,
            &[
                "--set",
                "repair.enabled=false",
                "--set",
                "capture.policy=off",
            ],
        )
        .expect("renders"),
    );
    assert!(rendered
        .iter()
        .all(|o| o["kind"] != "ClusterRole" && o["kind"] != "ClusterRoleBinding"));
    assert_eq!(
        kind(&rendered, "DaemonSet")["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
}

#[test]
fn chart_passes_settings_as_the_agent_reads_them() {
    let test = "chart_passes_settings_as_the_agent_reads_them";
    let Some(helm) = require_helm(test) else {
        return;
    };
    if !require_kubernetes_validate(test) {
        return;
    }
    let (_, args) = VALUE_SETS[4];
    let rendered = objects(&template(&helm, args).expect("renders"));
    let ds = kind(&rendered, "DaemonSet");
    for (name, value) in [
        ("CNI_CONF_FILE_NAME", "10-calico.conflist"),
        ("EXCLUDE_NAMESPACES", "kube-system,istio-system"),
        ("PROXY_ENV", "ISTIO_META_DNS_CAPTURE=true"),
        ("REPAIR_DELETE_PODS", "false"),
        ("REPAIR_LABEL_PODS", "true"),
        ("CNI_BIN_DIR", "/host/cni/bin"),
        ("CNI_CONF_DIR", "/host/cni/net.d"),
        ("CAPTURE_POLICY", "report"),
        ("CAPTURE_INTERVAL", "10"),
        ("CAPTURE_UPGRADE", "true"),
        ("CAPTURE_EXCLUDE_NAMESPACES", "legacy,batch"),
    ] {
        assert_eq!(env_of(ds, name).as_deref(), Some(value), "{name}");
    }
}
