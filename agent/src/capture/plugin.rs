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
        let mut cmd = Command::new(&self.binary);
        cmd.arg0_cni()
            .env("CNI_COMMAND", command.as_str())
            .env("CNI_NETNS", netns_path(netns))
            .env("CNI_ARGS", cni_args(pod))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_CONTAINERID", format!("meshinit-cni-agent-{}", pod.uid))
            .env("CNI_PATH", "/opt/cni/bin");
        let input = netconf(pod, &self.conf).to_string();
        match self.spawn(&mut cmd, &input, command.as_str()) {
            Ok((status, out, err)) => outcome(command, status, &out, &err),
            Err(failed) => failed,
        }
    }

    /// An init-container-mode pod: `meshinit check` with istio-init's own arguments, in
    /// the pod's namespace (its environment's literal values too, as istio-init has them).
    pub fn check_init(&self, pod: &PodView, netns: &File) -> Checked {
        match self.run_init("check", pod, netns) {
            Ok((status, out, err)) => init_outcome(status, &out, &err),
            Err(failed) => failed,
        }
    }

    /// An init-container-mode pod, re-applied: `meshinit apply` with istio-init's own
    /// arguments and literal environment in the pod's namespace, as istio-init ran it
    /// (meshinit moves the pod to that state atomically, whatever it finds there).
    pub fn apply_init(&self, pod: &PodView, netns: &File) -> Checked {
        match self.run_init("apply", pod, netns) {
            Ok((Some(0), _, _)) => Checked::Clean,
            Ok((status, out, err)) => match init_outcome(status, &out, &err) {
                // apply has no "drifted" exit: any other failure is the apply's own.
                Checked::Drifted(_) | Checked::Clean => Checked::Failed(format!(
                    "meshinit apply exited {status:?}: {}",
                    String::from_utf8_lossy(&err).trim()
                )),
                other => other,
            },
            Err(failed) => failed,
        }
    }

    /// `meshinit SUBCOMMAND --network-namespace NS ARGS` with istio-init's arguments.
    fn run_init(&self, subcommand: &str, pod: &PodView, netns: &File) -> Result<Ran, Checked> {
        let Some(args) = pod.init_args.as_deref().and_then(init_check_args) else {
            return Err(Checked::Failed(
                "istio-init's arguments are not meshinit's (istio-iptables or apply ...)".into(),
            ));
        };
        let mut cmd = Command::new(&self.binary);
        cmd.arg(subcommand)
            .arg("--network-namespace")
            .arg(netns_path(netns))
            .args(args)
            .envs(&pod.init_env);
        self.spawn(&mut cmd, "", subcommand)
    }

    /// Starts `cmd` with only what a plugin or init container is given, writes `input`,
    /// waits at most `timeout`; its exit code and output.
    fn spawn(&self, cmd: &mut Command, input: &str, what: &str) -> Result<Ran, Checked> {
        let mut child = cmd
            // The agent's own settings (its environment) must not reach the pod's.
            .env_remove_all_but(&["PATH", "XTABLES_LOCKFILE"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| Checked::Failed(format!("starting {}: {err}", self.binary.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A run that exits early closes its end; its answer says why.
            let _ = stdin.write_all(input.as_bytes());
        }
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let started = Instant::now();
        // Output is small (a CNI error, a few lines of log or differences): reading after
        // the exit cannot fill the pipes and block the child.
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Checked::Failed(format!(
                        "meshinit {what} took more than {:?}; killed",
                        self.timeout
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(err) => {
                    return Err(Checked::Failed(format!(
                        "waiting for meshinit {what}: {err}"
                    )))
                }
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
        Ok((status.code(), out, err))
    }
}

/// A finished run: its exit code (none after a signal), stdout, stderr.
type Ran = (Option<i32>, Vec<u8>, Vec<u8>);

/// The child opens the namespace through the agent's descriptor: the namespace the agent
/// verified is the pod's, whatever happens to that process meanwhile.
fn netns_path(netns: &File) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), netns.as_raw_fd())
}

/// `meshinit check`'s arguments from istio-init's (`istio-iptables ARGS` or `apply ARGS`).
pub fn init_check_args(args: &[String]) -> Option<&[String]> {
    match args.split_first()? {
        (first, rest) if first == "istio-iptables" || first == "apply" => Some(rest),
        _ => None,
    }
}

/// What `meshinit check` answered: 0 nothing differs, 5 the differences on stdout, 1 a bad
/// argument (its message names it).
pub fn init_outcome(status: Option<i32>, stdout: &[u8], stderr: &[u8]) -> Checked {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    // The last line of stderr is meshinit's error; the lines before are its log.
    let error = || {
        let stderr = text(stderr);
        let last = stderr.lines().last().unwrap_or_default();
        last.strip_prefix("meshinit: ").unwrap_or(last).to_owned()
    };
    match status {
        Some(0) => Checked::Clean,
        Some(5) => Checked::Drifted(text(stdout).lines().collect::<Vec<_>>().join("; ")),
        Some(1) => Checked::Invalid(format!("istio-init's arguments: {}", error())),
        Some(code) => Checked::Failed(format!("meshinit check exited {code}: {}", error())),
        None => Checked::Failed("meshinit check ended with a signal".into()),
    }
}

trait EnvOnly {
    fn env_remove_all_but(&mut self, keep: &[&str]) -> &mut Self;
}

impl EnvOnly for Command {
    /// Clears the inherited environment but `keep`, leaving what was set on `self`.
    fn env_remove_all_but(&mut self, keep: &[&str]) -> &mut Command {
        let set: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> = self
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
            .collect();
        self.env_clear();
        for (key, value) in std::env::vars_os() {
            if keep.iter().any(|k| key == *k) {
                self.env(key, value);
            }
        }
        for (key, value) in set {
            if let Some(value) = value {
                self.env(key, value);
            }
        }
        self
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
