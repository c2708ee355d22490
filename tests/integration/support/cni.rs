//! Running `meshinit-cni` the way a container runtime does: by its plugin name, with the
//! `CNI_*` variables and the network configuration on stdin.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::netns::NetNs;

/// What one plugin invocation returned.
#[derive(Debug)]
pub struct CniResult {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// `meshinit` under the name a runtime executes it by, in a directory of its own (as
/// CNI_PATH would hold it): in cargo's scratch directory for tests, so nothing is left in
/// /tmp; made once per test process and reused across runs.
pub fn plugin_path() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("meshinit-cni-bin");
        std::fs::create_dir_all(&dir).expect("plugin dir");
        let link = dir.join("meshinit-cni");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_meshinit"), &link).expect("symlink");
        link
    })
    .clone()
}

/// Runs the plugin's `command` for a pod whose network namespace is `pod`, from the
/// runner's namespace as a runtime would (the plugin enters CNI_NETNS itself).
pub fn invoke(pod: &NetNs, command: &str, config: &str) -> CniResult {
    let mut child = Command::new(plugin_path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "0123456789ab")
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod.name()))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1",
        )
        .env("CNI_PATH", plugin_path().parent().expect("dir"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshinit-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(config.as_bytes())
        .expect("write config");
    let output = child.wait_with_output().expect("wait for meshinit-cni");
    CniResult {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A chained network configuration for an injected pod with these extra annotations.
pub fn config_for(annotations: &[(&str, &str)]) -> String {
    let mut pod = serde_json::Map::new();
    pod.insert(
        "sidecar.istio.io/status".into(),
        r#"{"initContainers":null,"containers":["istio-proxy"]}"#.into(),
    );
    for (k, v) in annotations {
        pod.insert((*k).into(), (*v).into());
    }
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "pods",
        "type": "meshinit-cni",
        "exclude_namespaces": ["kube-system"],
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": pod},
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/pod"}],
            "ips": [{"address": "192.0.2.2/24", "interface": 0}]
        }
    })
    .to_string()
}
