//! The agent's flags, named after Istio's install-cni values (`cniBinDir` is
//! `--cni-bin-dir` and `CNI_BIN_DIR`, `repair.deletePods` is `--repair-delete-pods` and
//! `REPAIR_DELETE_PODS`), so a platform team recognises them. Parsing and validation only:
//! no I/O here.

use crate::capture::{plugin::PluginConf, CaptureSettings, Policy};
use crate::conflist::EntrySettings;
use crate::error::SettingsError;
use crate::install::InstallSettings;
use crate::repair::RepairSettings;
use clap::Parser;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// meshinit-cni's node agent: installs the plugin and its CNI configuration entry, keeps
/// it in place, removes it on termination, and repairs pods that started before it.
#[derive(Debug, Parser)]
#[command(name = "meshinit-cni-agent", version)]
pub struct Args {
    /// The node's CNI plugin directory (Istio's cniBinDir). GKE: /home/kubernetes/bin;
    /// OpenShift: /var/lib/cni/bin.
    #[arg(
        long,
        env = "CNI_BIN_DIR",
        default_value = "/opt/cni/bin",
        value_name = "DIR"
    )]
    pub cni_bin_dir: PathBuf,

    /// The node's CNI configuration directory (Istio's cniConfDir).
    #[arg(
        long,
        env = "CNI_CONF_DIR",
        default_value = "/etc/cni/net.d",
        value_name = "DIR"
    )]
    pub cni_conf_dir: PathBuf,

    /// The configuration file to add the entry to (Istio's cniConfFileName). Unset: the
    /// lexically first .conflist/.conf/.json, the one the runtime uses. With
    /// --chained=false, the name of the agent's own file.
    #[arg(long, env = "CNI_CONF_FILE_NAME", value_name = "NAME")]
    pub cni_conf_file_name: Option<String>,

    /// Add meshinit-cni to the end of the primary network's plugin list (Istio's chained).
    /// false: write a standalone list of its own (for Multus and OpenShift).
    #[arg(long, env = "CHAINED", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub chained: bool,

    /// Namespaces whose pods meshinit-cni never captures (Istio's excludeNamespaces),
    /// comma-separated.
    #[arg(
        long,
        env = "EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system",
        value_name = "NAMESPACES"
    )]
    pub exclude_namespaces: Vec<String>,

    /// Environment of the proxy that meshinit-cni reads, e.g. ISTIO_META_DNS_CAPTURE=true
    /// (the plugin's proxy_env). Repeatable or comma-separated.
    #[arg(
        long,
        env = "PROXY_ENV",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub proxy_env: Vec<String>,

    /// The agent's log level (Istio's logLevel): error, warn, info, debug or trace.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", value_name = "LEVEL")]
    pub log_level: String,

    /// Log format: plain or json.
    #[arg(
        long,
        env = "LOG_FORMAT",
        default_value = "plain",
        value_name = "FORMAT"
    )]
    pub log_format: String,

    /// The meshinit binary to install as the plugin (the agent's image carries it).
    #[arg(
        long,
        env = "PLUGIN_SOURCE",
        default_value = "/usr/local/bin/meshinit",
        value_name = "PATH"
    )]
    pub plugin_source: PathBuf,

    /// Where /readyz, /healthz and /metrics are served.
    #[arg(
        long,
        env = "METRICS_ADDR",
        default_value = "0.0.0.0:15014",
        value_name = "ADDR"
    )]
    pub metrics_addr: String,

    /// Watch this node's pods and repair those that started before the plugin was in
    /// place (Istio's repair.enabled).
    #[arg(long, env = "REPAIR_ENABLED", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub repair_enabled: bool,

    /// Delete such pods so their controller recreates them (Istio's repair.deletePods).
    #[arg(long, env = "REPAIR_DELETE_PODS", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub repair_delete_pods: bool,

    /// Label such pods instead, when not deleting (Istio's repair.labelPods).
    #[arg(long, env = "REPAIR_LABEL_PODS", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub repair_label_pods: bool,

    /// The init container whose exit code 126 marks a pod without rules (Istio's
    /// repair.initContainerName).
    #[arg(
        long,
        env = "REPAIR_INIT_CONTAINER_NAME",
        default_value = "istio-validation",
        value_name = "NAME"
    )]
    pub repair_init_container_name: String,

    /// The label put on such pods with --repair-label-pods (Istio's
    /// repair.brokenPodLabelKey).
    #[arg(
        long,
        env = "REPAIR_BROKEN_POD_LABEL_KEY",
        default_value = "cni.istio.io/uninitialized",
        value_name = "KEY"
    )]
    pub repair_broken_pod_label_key: String,

    /// The label's value (Istio's repair.brokenPodLabelValue).
    #[arg(
        long,
        env = "REPAIR_BROKEN_POD_LABEL_VALUE",
        default_value = "true",
        value_name = "VALUE"
    )]
    pub repair_broken_pod_label_value: String,

    /// This node's name (the Downward API's spec.nodeName): repair watches only its pods.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// Running meshed CNI-mode pods of this node: off (not looked at), report (checked
    /// against their plan, recorded), or repair (also re-applied when they differ).
    #[arg(
        long,
        env = "CAPTURE_POLICY",
        default_value = "repair",
        value_name = "POLICY"
    )]
    pub capture_policy: String,

    /// Seconds between two checks of every pod when nothing changed (the bound on how long
    /// a flushed or edited pod stays so).
    #[arg(
        long,
        env = "CAPTURE_INTERVAL",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    pub capture_interval: u64,

    /// Re-apply pods whose rules differ only because this meshinit plans differently for
    /// the same annotations (after an upgrade).
    #[arg(long, env = "CAPTURE_UPGRADE", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub capture_upgrade: bool,

    /// At most this many such upgrades a minute on this node.
    #[arg(
        long,
        env = "CAPTURE_UPGRADES_PER_MINUTE",
        default_value_t = 6,
        value_name = "N"
    )]
    pub capture_upgrades_per_minute: u32,

    /// Namespaces whose pods the agent never checks or changes, comma-separated (besides
    /// --exclude-namespaces, which the plugin never captures).
    #[arg(
        long,
        env = "CAPTURE_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        value_name = "NAMESPACES"
    )]
    pub capture_exclude_namespaces: Vec<String>,

    /// Check init-container-mode pods too, against istio-init's own arguments
    /// (`meshinit check`); they are reported, and changed only with
    /// --capture-repair-init-container-pods.
    #[arg(long, env = "CAPTURE_INIT_CONTAINER_PODS", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub capture_init_container_pods: bool,

    /// Under --capture-policy repair, re-apply init-container-mode pods too (`meshinit
    /// apply` with istio-init's arguments in the pod's namespace).
    #[arg(long, env = "CAPTURE_REPAIR_INIT_CONTAINER_PODS", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub capture_repair_init_container_pods: bool,

    /// Where the node's processes are (the agent runs with hostPID): pods' network
    /// namespaces are found there.
    #[arg(long, env = "PROC_ROOT", default_value = "/proc", value_name = "DIR")]
    pub proc_root: PathBuf,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub install: InstallSettings,
    pub repair: Option<RepairSettings>,
    pub capture: Option<CaptureSettings>,
    pub proc_root: PathBuf,
    pub metrics_addr: String,
    pub log_level: tracing::Level,
    pub log_json: bool,
}

fn invalid(flag: &'static str, value: &str, reason: &str) -> SettingsError {
    SettingsError {
        flag,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

impl Args {
    pub fn validate(self) -> Result<Settings, SettingsError> {
        let log_level = self.log_level.parse::<tracing::Level>().map_err(|_| {
            invalid(
                "log-level",
                &self.log_level,
                "one of error, warn, info, debug, trace",
            )
        })?;
        let log_json = match self.log_format.as_str() {
            "plain" => false,
            "json" => true,
            other => return Err(invalid("log-format", other, "plain or json")),
        };
        let mut proxy_env = BTreeMap::new();
        for pair in self.proxy_env.iter().filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| invalid("proxy-env", pair, "expected KEY=VALUE"))?;
            proxy_env.insert(key.to_owned(), value.to_owned());
        }
        if let Some(name) = &self.cni_conf_file_name {
            if name.contains('/') || name.is_empty() || name.starts_with('.') {
                return Err(invalid(
                    "cni-conf-file-name",
                    name,
                    "a file name in --cni-conf-dir, not a path",
                ));
            }
        }
        let policy = match self.capture_policy.as_str() {
            "off" => None,
            "report" => Some(Policy::Report),
            "repair" => Some(Policy::Repair),
            other => return Err(invalid("capture-policy", other, "off, report or repair")),
        };
        if self.capture_interval == 0 {
            return Err(invalid("capture-interval", "0", "at least 1 second"));
        }
        let node_name = self.node_name.filter(|n| !n.is_empty());
        let needs_node = |what: &str| {
            node_name.clone().ok_or_else(|| {
                invalid(
                    "node-name",
                    "",
                    &format!("needed for {what}: set NODE_NAME from spec.nodeName, or turn it off"),
                )
            })
        };
        let exclude_namespaces: Vec<String> = self
            .exclude_namespaces
            .into_iter()
            .filter(|ns| !ns.is_empty())
            .collect();
        let capture = match policy {
            Some(policy) => Some(CaptureSettings {
                node_name: needs_node("--capture-policy (report or repair)")?,
                policy,
                interval: std::time::Duration::from_secs(self.capture_interval),
                upgrade: self.capture_upgrade,
                upgrades_per_minute: self.capture_upgrades_per_minute,
                exclude_namespaces: self
                    .capture_exclude_namespaces
                    .into_iter()
                    .filter(|ns| !ns.is_empty())
                    .collect(),
                plugin: PluginConf {
                    exclude_namespaces: exclude_namespaces.clone(),
                    proxy_env: proxy_env.clone(),
                },
                // Set from the binary when the agent starts (settings do no I/O).
                plugin_id: String::new(),
                init_container_pods: self.capture_init_container_pods,
                repair_init_container_pods: self.capture_repair_init_container_pods,
            }),
            None => None,
        };
        let repair = if self.repair_enabled {
            Some(RepairSettings {
                node_name: needs_node("repair (--repair-enabled=false)")?,
                init_container_name: self.repair_init_container_name,
                delete_pods: self.repair_delete_pods,
                label_pods: self.repair_label_pods,
                label_key: self.repair_broken_pod_label_key,
                label_value: self.repair_broken_pod_label_value,
            })
        } else {
            None
        };
        Ok(Settings {
            install: InstallSettings {
                cni_bin_dir: self.cni_bin_dir,
                cni_conf_dir: self.cni_conf_dir,
                cni_conf_file_name: self.cni_conf_file_name,
                chained: self.chained,
                plugin_source: self.plugin_source,
                entry: EntrySettings {
                    exclude_namespaces,
                    proxy_env,
                },
            },
            repair,
            capture,
            proc_root: self.proc_root,
            metrics_addr: self.metrics_addr,
            log_level,
            log_json,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Settings, SettingsError> {
        let mut argv = vec!["meshinit-cni-agent", "--node-name", "node-a"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv).expect("clap accepts").validate()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Args::command().debug_assert();
    }

    /// Every environment variable the Helm chart sets is one the agent reads: a renamed
    /// flag cannot silently drop a setting.
    #[test]
    fn the_charts_environment_is_read_by_the_agent() {
        let template = include_str!("../../charts/meshinit-cni/templates/daemonset.yaml");
        let read: Vec<String> = Args::command()
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        let set: Vec<&str> = template
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- name: "))
            .filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .collect();
        assert!(set.len() >= 10, "env of the chart: {set:?}");
        for name in set {
            assert!(
                read.iter().any(|r| r == name),
                "the chart sets {name}, which the agent does not read"
            );
        }
    }

    #[test]
    fn defaults_are_istios() {
        let s = parse(&[]).expect("valid");
        assert_eq!(s.install.cni_bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(s.install.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert!(s.install.chained);
        assert_eq!(s.install.cni_conf_file_name, None);
        let repair = s.repair.expect("repair on by default");
        assert!(repair.delete_pods && !repair.label_pods);
        assert_eq!(repair.init_container_name, "istio-validation");
        assert_eq!(repair.label_key, "cni.istio.io/uninitialized");
    }

    #[test]
    fn lists_and_booleans_parse() {
        let s = parse(&[
            "--exclude-namespaces",
            "kube-system,istio-system",
            "--chained",
            "false",
            "--proxy-env",
            "ISTIO_META_DNS_CAPTURE=true",
            "--repair-delete-pods",
            "false",
            "--repair-label-pods",
            "true",
        ])
        .expect("valid");
        assert_eq!(
            s.install.entry.exclude_namespaces,
            ["kube-system", "istio-system"]
        );
        assert!(!s.install.chained);
        assert_eq!(
            s.install
                .entry
                .proxy_env
                .get("ISTIO_META_DNS_CAPTURE")
                .map(String::as_str),
            Some("true")
        );
        let repair = s.repair.expect("repair");
        assert!(!repair.delete_pods && repair.label_pods);
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (vec!["--log-level", "loud"], "--log-level"),
            (vec!["--log-format", "xml"], "--log-format"),
            (vec!["--proxy-env", "NOEQUALS"], "--proxy-env"),
            (
                vec!["--cni-conf-file-name", "../etc/passwd"],
                "--cni-conf-file-name",
            ),
        ] {
            let err = parse(&args).expect_err(flag);
            assert!(err.to_string().starts_with(flag), "{err}");
        }
    }

    #[test]
    fn repair_needs_the_node_name() {
        let err = Args::try_parse_from(["meshinit-cni-agent"])
            .expect("clap")
            .validate();
        // NODE_NAME may be set in the environment running the tests; only check when not.
        if std::env::var_os("NODE_NAME").is_none() {
            assert!(err.expect_err("no node").to_string().contains("NODE_NAME"));
        }
        let off = Args::try_parse_from([
            "meshinit-cni-agent",
            "--repair-enabled",
            "false",
            "--capture-policy",
            "off",
        ])
        .expect("clap")
        .validate()
        .expect("valid without repair");
        assert!(off.repair.is_none() && off.capture.is_none());
    }

    #[test]
    fn capture_settings() {
        let s = parse(&[]).expect("valid");
        let capture = s.capture.expect("on by default");
        assert_eq!(capture.policy, Policy::Repair);
        assert_eq!(capture.interval, std::time::Duration::from_secs(30));
        assert!(!capture.upgrade);
        assert_eq!(capture.plugin.exclude_namespaces, ["kube-system"]);
        let s = parse(&[
            "--capture-policy",
            "report",
            "--capture-upgrade",
            "true",
            "--capture-exclude-namespaces",
            "legacy,batch",
        ])
        .expect("valid");
        let capture = s.capture.expect("report");
        assert_eq!(capture.policy, Policy::Report);
        assert!(capture.upgrade);
        assert_eq!(capture.exclude_namespaces, ["legacy", "batch"]);
        for (args, flag) in [
            (vec!["--capture-policy", "fix"], "--capture-policy"),
            (vec!["--capture-interval", "0"], "--capture-interval"),
        ] {
            let err = parse(&args).expect_err(flag);
            assert!(err.to_string().starts_with(flag), "{err}");
        }
    }
}
