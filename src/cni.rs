//! `meshinit cni`: the same capture rules, installed by the container runtime as a chained
//! CNI plugin (spec 1.0), as Istio's CNI plugin does, so pods need no capabilities.
//!
//! The runtime runs the plugin with `CNI_*` variables and the network configuration on
//! stdin; the result (the previous plugin's, passed through) or a CNI error goes to
//! stdout as JSON. Pod selection and settings follow Istio's plugin; the pod's
//! annotations come from the runtime (`io.kubernetes.cri.pod-annotations`) or from the
//! plugin configuration, since meshinit does not query the Kubernetes API.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::app::{install, remove_everything, Env};
use crate::config::{validate, Annotations, ConfigOutcome, RawSettings, SystemHost};
use crate::rules::iptables::parse_existing;
use crate::rules::model::Family;

/// CNI spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.2.0"];

const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
const INJECT_ANNOTATION: &str = "sidecar.istio.io/inject";

/// CNI error codes (spec "Error" section); 100 and up are the plugin's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const APPLY_FAILED: u32 = 100;
    pub const DRIFT: u32 = 101;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> String {
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

/// The network configuration the runtime hands over, parts meshinit reads.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub prev_result: Option<Value>,
    pub exclude_namespaces: Vec<String>,
    /// From the runtime's capability, else the plugin configuration's `pod_annotations`.
    pub annotations: Option<BTreeMap<String, String>>,
    /// The proxy container's environment (`proxy_env`), where DNS capture is switched on.
    pub proxy_env: BTreeMap<String, String>,
    /// Extra `istio-iptables` settings, as flag name → value (`args`).
    pub args: BTreeMap<String, String>,
}

fn string_map(value: Option<&Value>) -> Option<BTreeMap<String, String>> {
    value.and_then(Value::as_object).map(|map| {
        map.iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
            .collect()
    })
}

pub fn parse_netconf(stdin: &str) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_str(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            "network configuration is not JSON",
            e.to_string(),
        )
    })?;
    let conf = value.as_object().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "network configuration is not a JSON object",
            "",
        )
    })?;
    let cni_version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.0.0")
        .to_owned();
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {cni_version} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let runtime = conf.get("runtimeConfig").and_then(Value::as_object);
    let annotations = string_map(runtime.and_then(|r| r.get(ANNOTATIONS_CAPABILITY)))
        .or_else(|| string_map(conf.get("pod_annotations")));
    Ok(NetConf {
        cni_version,
        prev_result: conf.get("prevResult").cloned(),
        exclude_namespaces: conf
            .get("exclude_namespaces")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        annotations,
        proxy_env: string_map(conf.get("proxy_env")).unwrap_or_default(),
        args: string_map(conf.get("args")).unwrap_or_default(),
    })
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`).
pub fn pod_identity(cni_args: &str) -> Option<(String, String)> {
    let mut namespace = None;
    let mut name = None;
    for pair in cni_args.split(';') {
        match pair.split_once('=') {
            Some(("K8S_POD_NAMESPACE", v)) if !v.is_empty() => namespace = Some(v.to_owned()),
            Some(("K8S_POD_NAME", v)) if !v.is_empty() => name = Some(v.to_owned()),
            _ => {}
        }
    }
    Some((namespace?, name?))
}

/// Istio's plugin's pod selection, on what meshinit can see: `None` to capture, or why not.
pub fn skip_reason(conf: &NetConf, pod: Option<&(String, String)>) -> Option<String> {
    let Some((namespace, name)) = pod else {
        return Some("not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS)".into());
    };
    if conf.exclude_namespaces.contains(namespace) {
        return Some(format!("namespace {namespace} is excluded"));
    }
    let Some(annotations) = &conf.annotations else {
        return Some(format!(
            "no annotations for {namespace}/{name}: the runtime passed no {ANNOTATIONS_CAPABILITY} and the configuration has no pod_annotations"
        ));
    };
    let Some(status) = annotations.get(STATUS_ANNOTATION) else {
        return Some(format!(
            "{namespace}/{name} has no {STATUS_ANNOTATION}: not injected"
        ));
    };
    let status: Value = serde_json::from_str(status).unwrap_or(Value::Null);
    let listed = |field: &str, container: &str| {
        status
            .get(field)
            .and_then(Value::as_array)
            .is_some_and(|list| list.iter().any(|c| c.as_str() == Some(container)))
    };
    if listed("initContainers", "istio-init") {
        return Some(format!("{namespace}/{name} already has istio-init"));
    }
    if !listed("containers", "istio-proxy") && !listed("initContainers", "istio-proxy") {
        return Some(format!("{namespace}/{name} has no istio-proxy container"));
    }
    if let Some(inject) = annotations.get(INJECT_ANNOTATION) {
        if crate::config::parse::parse_bool(inject) == Ok(false) {
            return Some(format!(
                "{namespace}/{name} has {INJECT_ANNOTATION}: {inject}"
            ));
        }
    }
    None
}

fn invalid(msg: impl Into<String>, details: impl std::fmt::Display) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg, details.to_string())
}

/// The settings for this pod, in its namespace (where addresses decide IPv6).
fn pod_config(conf: &NetConf, env: Env<'_>) -> Result<Option<crate::config::Config>, CniError> {
    let mut raw = RawSettings::default();
    let annotations = Annotations::from_map(
        ANNOTATIONS_CAPABILITY,
        conf.annotations.clone().unwrap_or_default(),
    );
    annotations.derive_cni(&mut raw, &conf.proxy_env);
    for (flag, value) in &conf.args {
        let spec = crate::config::build::SETTINGS
            .iter()
            .find(|s| s.long == Some(flag.as_str()))
            .ok_or_else(|| {
                invalid(
                    format!("unknown setting {flag:?} in the plugin's args"),
                    "use istio-iptables flag names",
                )
            })?;
        raw.set_flag(spec.setting, value.clone());
    }
    let validated = validate(&raw, env).map_err(|e| invalid("invalid pod settings", e))?;
    match validated
        .resolve(&SystemHost::default())
        .map_err(|e| invalid("pod settings", e))?
    {
        ConfigOutcome::Capture(config) => Ok(Some(*config)),
        ConfigOutcome::Skip { reason } => {
            tracing::info!("{reason}");
            Ok(None)
        }
    }
}

fn enter(netns: &str) -> Result<(), CniError> {
    crate::netns::enter(Path::new(netns)).map_err(|e| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            "cannot enter CNI_NETNS",
            e.to_string(),
        )
    })
}

fn add(conf: &NetConf, env: Env<'_>) -> Result<(), CniError> {
    let pod = env("CNI_ARGS").as_deref().and_then(pod_identity);
    if let Some(reason) = skip_reason(conf, pod.as_ref()) {
        tracing::info!("{reason}: not capturing");
        return Ok(());
    }
    let netns = env("CNI_NETNS")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, "CNI_NETNS is not set", ""))?;
    enter(&netns)?;
    let Some(config) = pod_config(conf, env)? else {
        return Ok(());
    };
    install(&config).map_err(|e| {
        CniError::new(
            code::APPLY_FAILED,
            "applying the capture rules failed",
            e.to_string(),
        )
    })
}

fn del(env: Env<'_>) -> Result<(), CniError> {
    // DEL must succeed when the namespace is already gone.
    let Some(netns) = env("CNI_NETNS").filter(|n| !n.is_empty() && PathBuf::from(n).exists())
    else {
        return Ok(());
    };
    enter(&netns)?;
    let run = validate(&RawSettings::default(), env)
        .map_err(|e| invalid("invalid settings", e))?
        .run_options()
        .clone();
    remove_everything(&run).map_err(|e| {
        CniError::new(
            code::APPLY_FAILED,
            "removing the capture rules failed",
            e.to_string(),
        )
    })
}

/// Reports drift: meshinit's chains for this pod must all be there, each with the planned
/// number of rules.
fn check(conf: &NetConf, env: Env<'_>) -> Result<(), CniError> {
    let pod = env("CNI_ARGS").as_deref().and_then(pod_identity);
    if skip_reason(conf, pod.as_ref()).is_some() {
        return Ok(());
    }
    let netns = env("CNI_NETNS").unwrap_or_default();
    enter(&netns)?;
    let Some(config) = pod_config(conf, env)? else {
        return Ok(());
    };
    let ruleset = crate::app::kernel_plan(&config, &mut crate::apply::NetlinkIpSets::default());
    let families: Vec<Family> = ruleset.families().map(|f| f.family).collect();
    let mut tools = crate::apply::IptablesTools::detect(
        config.run.force_backend,
        &families,
        config.run.xtables_wait,
    )
    .map_err(|e| CniError::new(code::APPLY_FAILED, "no iptables", e.to_string()))?;
    let mut drift = Vec::new();
    for planned in ruleset.families() {
        use crate::apply::Netfilter;
        let save = tools.save(planned.family).map_err(|e| {
            CniError::new(
                code::APPLY_FAILED,
                "reading the rules failed",
                e.to_string(),
            )
        })?;
        let present = parse_existing(&save);
        for table in &planned.tables {
            let there = present.table(table.table);
            for chain in table.own_chains() {
                let found = there.is_some_and(|t| t.own_chains.iter().any(|c| c == chain.name()));
                if !found {
                    drift.push(format!(
                        "{} {} {} is missing",
                        planned.family,
                        table.table.name(),
                        chain.name()
                    ));
                }
            }
            let expected_rules = table
                .chains
                .iter()
                .filter(|c| matches!(c.chain, crate::rules::model::Chain::Istio(_)))
                .map(|c| c.len())
                .sum::<usize>();
            let actual_rules = count_own_rules(&save, table.table.name());
            if actual_rules != expected_rules {
                drift.push(format!(
                    "{} {}: {actual_rules} rules in meshinit's chains, {expected_rules} planned",
                    planned.family,
                    table.table.name()
                ));
            }
        }
    }
    if drift.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::DRIFT,
            "capture rules drifted",
            drift.join("; "),
        ))
    }
}

/// Rules in ISTIO_* chains of `table`, as a save lists them.
fn count_own_rules(save: &str, table: &str) -> usize {
    let mut in_table = false;
    let mut count = 0;
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            in_table = name.trim() == table;
        } else if in_table {
            if let Some(rest) = line.strip_prefix("-A ") {
                let chain = rest.split_whitespace().next().unwrap_or("");
                if crate::rules::model::IstioChain::from_name(chain).is_some() {
                    count += 1;
                }
            }
        }
    }
    count
}

/// Runs one CNI command; returns the process exit code. Everything the runtime reads goes
/// to `out`; logs go to stderr.
pub fn run(env: Env<'_>, stdin: &str, out: &mut dyn Write) -> u8 {
    let command = env("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        let version = json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS});
        let _ = writeln!(out, "{version}");
        return 0;
    }
    let conf = match parse_netconf(stdin) {
        Ok(conf) => conf,
        Err(err) => return fail(out, "1.0.0", &err),
    };
    let result = match command.as_str() {
        "ADD" => add(&conf, env).map(|()| Some(passthrough_result(&conf))),
        "DEL" => del(env).map(|()| None),
        "CHECK" => check(&conf, env).map(|()| None),
        "GC" | "STATUS" => Ok(None),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK or VERSION",
        )),
    };
    match result {
        Ok(Some(output)) => {
            let _ = writeln!(out, "{output}");
            0
        }
        Ok(None) => 0,
        Err(err) => fail(out, &conf.cni_version, &err),
    }
}

fn fail(out: &mut dyn Write, version: &str, err: &CniError) -> u8 {
    tracing::error!(code = err.code, msg = %err.msg, details = %err.details, "CNI command failed");
    let _ = writeln!(out, "{}", err.to_json(version));
    1
}

/// A chained plugin's result: the previous plugin's, unchanged, under our cniVersion.
pub fn passthrough_result(conf: &NetConf) -> Value {
    match &conf.prev_result {
        Some(Value::Object(prev)) => {
            let mut result = prev.clone();
            result.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
            Value::Object(result)
        }
        _ => {
            let mut result = Map::new();
            result.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
            Value::Object(result)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> NetConf {
        parse_netconf(&format!(
            r#"{{"cniVersion":"1.0.0","name":"pods","type":"meshinit",
                "prevResult":{{"cniVersion":"1.0.0","ips":[{{"address":"192.0.2.2/24"}}]}}{extra}}}"#
        ))
        .unwrap()
    }

    fn injected() -> String {
        r#","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"sidecar.istio.io/status":"{\"containers\":[\"istio-proxy\"]}"}}"#.into()
    }

    #[test]
    fn prev_result_passes_through_unchanged() {
        let c = conf("");
        let result = passthrough_result(&c);
        assert_eq!(result["ips"][0]["address"], "192.0.2.2/24");
        assert_eq!(result["cniVersion"], "1.0.0");
    }

    #[test]
    fn unsupported_version_is_code_1() {
        let err = parse_netconf(r#"{"cniVersion":"9.9.9"}"#).unwrap_err();
        assert_eq!(err.code, code::INCOMPATIBLE_VERSION);
        assert_eq!(
            parse_netconf("nope").unwrap_err().code,
            code::DECODING_FAILURE
        );
    }

    #[test]
    fn pod_identity_from_cni_args() {
        assert_eq!(
            pod_identity("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1"),
            Some(("shop".into(), "cart-1".into()))
        );
        assert_eq!(pod_identity("K8S_POD_NAME=x"), None);
    }

    #[test]
    fn selection_follows_istio() {
        let pod = ("shop".to_owned(), "cart-1".to_owned());
        assert!(skip_reason(&conf(""), None)
            .unwrap()
            .contains("not a Kubernetes pod"));
        assert!(skip_reason(&conf(""), Some(&pod))
            .unwrap()
            .contains("no annotations"));
        assert_eq!(skip_reason(&conf(&injected()), Some(&pod)), None);
        let excluded = conf(&format!(r#"{},"exclude_namespaces":["shop"]"#, injected()));
        assert!(skip_reason(&excluded, Some(&pod))
            .unwrap()
            .contains("excluded"));
        let not_injected = conf(r#","pod_annotations":{"a":"b"}"#);
        assert!(skip_reason(&not_injected, Some(&pod))
            .unwrap()
            .contains("not injected"));
        let init = conf(
            r#","pod_annotations":{"sidecar.istio.io/status":"{\"initContainers\":[\"istio-init\"],\"containers\":[\"istio-proxy\"]}"}"#,
        );
        assert!(skip_reason(&init, Some(&pod))
            .unwrap()
            .contains("istio-init"));
        let off = conf(
            r#","pod_annotations":{"sidecar.istio.io/inject":"false","sidecar.istio.io/status":"{\"containers\":[\"istio-proxy\"]}"}"#,
        );
        assert!(skip_reason(&off, Some(&pod)).unwrap().contains("inject"));
    }

    #[test]
    fn version_and_unknown_commands() {
        let env = |name: &str| (name == "CNI_COMMAND").then(|| "VERSION".to_owned());
        let mut out = Vec::new();
        assert_eq!(run(&env, "", &mut out), 0);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("\"supportedVersions\""));
        let env = |name: &str| (name == "CNI_COMMAND").then(|| "FROB".to_owned());
        let mut out = Vec::new();
        assert_eq!(run(&env, r#"{"cniVersion":"1.0.0"}"#, &mut out), 1);
        assert!(String::from_utf8(out).unwrap().contains("\"code\":4"));
    }

    #[test]
    fn add_for_an_unselected_pod_returns_the_previous_result() {
        let env = |name: &str| match name {
            "CNI_COMMAND" => Some("ADD".to_owned()),
            "CNI_ARGS" => Some("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns".to_owned()),
            _ => None,
        };
        let mut out = Vec::new();
        let stdin = r#"{"cniVersion":"1.0.0","exclude_namespaces":["kube-system"],"prevResult":{"ips":[]}}"#;
        assert_eq!(run(&env, stdin, &mut out), 0);
        let result: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(result["ips"], json!([]));
    }
}
