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
    invoke_with(
        &[],
        &format!("/var/run/netns/{}", pod.name()),
        command,
        config.as_bytes(),
    )
}

/// Runs the plugin under `wrapper` (say `ip netns exec NAME`, so that the plugin's own
/// namespace is a test's), with `CNI_NETNS` set to `netns` and `stdin` as given, bytes
/// that need not be a configuration at all.
pub fn invoke_with(wrapper: &[&str], netns: &str, command: &str, stdin: &[u8]) -> CniResult {
    let plugin = plugin_path();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(&plugin);
            cmd
        }
        None => Command::new(&plugin),
    };
    let mut child = cmd
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "0123456789ab")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1",
        )
        .env("CNI_PATH", plugin.parent().expect("dir"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshinit-cni");
    let mut input = child.stdin.take().expect("stdin");
    // Written from a thread of its own: a plugin that stops reading an oversized input
    // and answers must not deadlock the test, and its closing the pipe is not an error.
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let output = child.wait_with_output().expect("wait for meshinit-cni");
    writer.join().expect("stdin writer");
    CniResult {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `config`, a configuration from `config_for`, with `args` (istio-iptables settings by
/// flag name) added.
pub fn with_args(config: &str, args: &[(&str, &str)]) -> String {
    let mut value: serde_json::Value = serde_json::from_str(config).expect("a configuration");
    let args: serde_json::Map<String, serde_json::Value> = args
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    value["args"] = args.into();
    value.to_string()
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
