//! The pod's namespace is checked and changed by the plugin itself: the agent runs the
//! meshinit binary its image carries (the one it installs on the node) as `meshinit-cni`,
//! with `CNI_COMMAND=CHECK` or `ADD`, the pod's current annotations and the node's plugin
//! settings, exactly as the runtime runs it. So the plan is the plugin's, the comparison is
//! CNI CHECK's, and a change is meshinit's install with its guarantees (one transaction per
//! family, capture holding for connections both configurations capture, a run killed at
//! any moment leaving one of the two states). The child enters the namespace and, for a
//! pod with `hostUsers: false`, its user namespace; the agent itself never changes
//! namespace or uid.

use super::{Checked, PodView};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The plugin's settings as the agent writes them into the node's entry.
#[derive(Debug, Clone, Default)]
pub struct PluginConf {
    pub exclude_namespaces: Vec<String>,
    pub proxy_env: BTreeMap<String, String>,
}

/// The network configuration the runtime would give the plugin for this pod (without a
/// previous result, which CHECK does not read and ADD only passes through).
pub fn netconf(pod: &PodView, conf: &PluginConf) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "meshinit-cni-agent",
        "type": "meshinit-cni",
        "exclude_namespaces": conf.exclude_namespaces,
        "proxy_env": conf.proxy_env,
        "pod_annotations": pod.annotations,
    })
}

/// `CNI_ARGS` naming the pod, as the kubelet's runtime sets it.
pub fn cni_args(pod: &PodView) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
        pod.namespace, pod.name
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Check,
    Add,
}

impl CniCommand {
    fn as_str(self) -> &'static str {
        match self {
            CniCommand::Check => "CHECK",
            CniCommand::Add => "ADD",
        }
    }
}

/// What the plugin answered: exit 0, or its CNI error.
pub fn outcome(command: CniCommand, status: Option<i32>, stdout: &[u8], stderr: &[u8]) -> Checked {
    if status == Some(0) {
        return Checked::Clean;
    }
    let error: Value = serde_json::from_slice(stdout).unwrap_or(Value::Null);
    let text = |key: &str| {
        error
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    match error.get("code").and_then(Value::as_u64) {
        Some(101) if command == CniCommand::Check => Checked::Drifted(text("details")),
        Some(7) if text("msg") == "invalid pod settings" => Checked::Invalid(text("details")),
        Some(code) => Checked::Failed(format!(
            "meshinit-cni {} failed (CNI error {code}): {}: {}",
            command.as_str(),
            text("msg"),
            text("details")
        )),
        None => Checked::Failed(format!(
            "meshinit-cni {} ended with {}: {}",
            command.as_str(),
            status.map_or_else(|| "a signal".to_owned(), |c| format!("exit {c}")),
            String::from_utf8_lossy(stderr).trim()
        )),
    }
}

/// Runs the plugin binary on a pod's namespace.
#[derive(Debug, Clone)]
pub struct PluginRunner {
    /// The meshinit binary (the image's, the same the agent installs on the node).
    pub binary: PathBuf,
    pub conf: PluginConf,
    /// A run that takes longer is killed (and reported): the worker must not hang on one pod.
    pub timeout: Duration,
}

impl PluginRunner {
    pub fn run(&self, command: CniCommand, pod: &PodView, netns: &File) -> Checked {
        // The child opens the namespace through the agent's descriptor: the namespace the
        // agent verified is the pod's, whatever happens to that process meanwhile.
        let netns_path = format!("/proc/{}/fd/{}", std::process::id(), netns.as_raw_fd());
        let mut child = match Command::new(&self.binary)
            .arg0_cni()
            // Only what the runtime gives a plugin: the agent's own settings (its
            // environment) must not reach the pod's.
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| k == "PATH" || k == "XTABLES_LOCKFILE"))
            .env("CNI_COMMAND", command.as_str())
            .env("CNI_NETNS", &netns_path)
            .env("CNI_ARGS", cni_args(pod))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_CONTAINERID", format!("meshinit-cni-agent-{}", pod.uid))
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(err) => {
                return Checked::Failed(format!("starting {}: {err}", self.binary.display()))
            }
        };
        let input = netconf(pod, &self.conf).to_string();
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that exits early closes its end; its answer says why.
            let _ = stdin.write_all(input.as_bytes());
        }
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let started = Instant::now();
        // Output is small (a CNI error, a few lines of log): reading after the exit cannot
        // fill the pipes and block the child.
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if started.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Checked::Failed(format!(
                        "meshinit-cni {} took more than {:?}; killed",
                        command.as_str(),
                        self.timeout
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(err) => return Checked::Failed(format!("waiting for meshinit-cni: {err}")),
            }
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut out);
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut err);
        }
        outcome(command, status.and_then(|s| s.code()), &out, &err)
    }
}

trait Arg0 {
    fn arg0_cni(&mut self) -> &mut Self;
}

impl Arg0 for Command {
    /// The binary chooses CNI mode by the name it is run as.
    fn arg0_cni(&mut self) -> &mut Command {
        std::os::unix::process::CommandExt::arg0(self, "meshinit-cni")
    }
}
