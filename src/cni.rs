//! `meshinit cni`: the same capture rules, installed by the container runtime as a chained
//! CNI plugin (spec 1.0), as Istio's CNI plugin does, so pods need no capabilities.
//!
//! The runtime runs the plugin with `CNI_*` variables and the network configuration on
//! stdin; the result (the previous plugin's, passed through) or a CNI error goes to
//! stdout as JSON. Pod selection and settings follow Istio's plugin; the pod's
//! annotations come from the runtime (`io.kubernetes.cri.pod-annotations`) or from the
//! plugin configuration, since meshinit does not query the Kubernetes API.

use std::collections::BTreeMap;
use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::config::Env;
use crate::config::{validate, Annotations, ConfigOutcome, RawSettings, SystemHost};
use crate::engine::Engine;

mod check;

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

/// A field that must be an object of strings, when it is there at all.
fn string_map(
    value: Option<&Value>,
    field: &str,
) -> Result<Option<BTreeMap<String, String>>, CniError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let map = value
        .as_object()
        .ok_or_else(|| wrong_type(field, "an object of strings", value))?;
    map.iter()
        .map(|(k, v)| match v.as_str() {
            Some(v) => Ok((k.clone(), v.to_owned())),
            None => Err(wrong_type(&format!("{field}.{k}"), "a string", v)),
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

fn wrong_type(field: &str, expected: &str, found: &Value) -> CniError {
    let kind = match found {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    CniError::new(
        code::INVALID_CONFIG,
        format!("network configuration field {field} must be {expected}"),
        format!("found {kind}"),
    )
}

/// The most network configuration read from stdin. Real ones (with a previous result)
/// are a few KiB; the bound keeps a runaway writer from exhausting the node's memory.
pub const MAX_STDIN: usize = 4 * 1024 * 1024;

/// The network configuration as the runtime wrote it: any bytes, checked here.
pub fn parse_netconf_bytes(stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.len() > MAX_STDIN {
        return Err(CniError::new(
            code::DECODING_FAILURE,
            "network configuration is too large",
            format!("more than {MAX_STDIN} bytes on stdin"),
        ));
    }
    let text = std::str::from_utf8(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            "network configuration is not UTF-8",
            e.to_string(),
        )
    })?;
    if text.trim().is_empty() {
        return Err(CniError::new(
            code::DECODING_FAILURE,
            "no network configuration on stdin",
            "",
        ));
    }
    parse_netconf(text)
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
    let cni_version = match conf.get("cniVersion") {
        None => "1.0.0".to_owned(),
        Some(Value::String(v)) => v.clone(),
        Some(other) => return Err(wrong_type("cniVersion", "a string", other)),
    };
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {cni_version} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let runtime = match conf.get("runtimeConfig") {
        None | Some(Value::Null) => None,
        Some(Value::Object(r)) => Some(r),
        Some(other) => return Err(wrong_type("runtimeConfig", "an object", other)),
    };
    let annotations = match string_map(
        runtime.and_then(|r| r.get(ANNOTATIONS_CAPABILITY)),
        &format!("runtimeConfig.{ANNOTATIONS_CAPABILITY}"),
    )? {
        Some(annotations) => Some(annotations),
        None => string_map(conf.get("pod_annotations"), "pod_annotations")?,
    };
    let prev_result = match conf.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(prev @ Value::Object(_)) => Some(prev.clone()),
        Some(other) => return Err(wrong_type("prevResult", "an object", other)),
    };
    let exclude_namespaces = match conf.get("exclude_namespaces") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| wrong_type("exclude_namespaces[]", "a string", v))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(wrong_type(
                "exclude_namespaces",
                "an array of strings",
                other,
            ))
        }
    };
    Ok(NetConf {
        cni_version,
        prev_result,
        exclude_namespaces,
        annotations,
        proxy_env: string_map(conf.get("proxy_env"), "proxy_env")?.unwrap_or_default(),
        args: string_map(conf.get("args"), "args")?.unwrap_or_default(),
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

/// The pod's settings from its annotations, `proxy_env` and `args`, validated as ADD and
/// CHECK validate them, before anything is read from or done in its network namespace. A
/// bad value is error 7, its details naming the annotation (or setting) and the value.
/// The node agent asks this of a running pod's current annotations before it touches the
/// pod, so that a bad value leaves the running rules alone.
pub fn validate_pod_settings(conf: &NetConf, env: Env<'_>) -> Result<(), CniError> {
    pod_settings(conf, env).map(|_| ())
}

fn pod_settings(conf: &NetConf, env: Env<'_>) -> Result<crate::config::Validated, CniError> {
    let mut raw = RawSettings::default();
    let annotations = Annotations::from_map(
        ANNOTATIONS_CAPABILITY,
        conf.annotations.clone().unwrap_or_default(),
    );
    annotations
        .derive_cni(&mut raw, &conf.proxy_env)
        .map_err(|e| invalid("invalid pod settings", e))?;
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
    validate(&raw, env).map_err(|e| invalid("invalid pod settings", e))
}

/// The settings for this pod, in its namespace (where addresses decide IPv6).
fn pod_config(conf: &NetConf, env: Env<'_>) -> Result<Option<crate::config::Config>, CniError> {
    match pod_settings(conf, env)?
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

/// `CNI_NETNS`, which must be set and must not be the node's namespace.
fn pod_namespace(env: Env<'_>) -> Result<String, CniError> {
    let netns = env("CNI_NETNS")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, "CNI_NETNS is not set", ""))?;
    refuse_node_namespace(Path::new(&netns))?;
    Ok(netns)
}

/// The namespaces a pod's can never be: the plugin's own (the runtime runs plugins on the
/// node, so this is the node's unless the plugin itself was started inside a pod) and
/// init's. Compared by the namespace's identity, not by path: `/proc/self/ns/net`, a path
/// through `..`, or a bind mount of the node's namespace all name the same inode.
const NODE_NAMESPACES: [&str; 2] = ["/proc/thread-self/ns/net", "/proc/1/ns/net"];

/// Refuses `netns` when it is the plugin's own network namespace or init's: installing a
/// pod's capture rules there would capture the node's traffic.
pub fn refuse_node_namespace(netns: &Path) -> Result<(), CniError> {
    let target = crate::netns::namespace_id(netns).map_err(|e| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("cannot open CNI_NETNS {}", netns.display()),
            e.to_string(),
        )
    })?;
    for node in NODE_NAMESPACES {
        // init's may be out of sight (a PID namespace without it); the plugin's own is not.
        match crate::netns::namespace_id(Path::new(node)) {
            Ok(id) if id == target => {
                return Err(CniError::new(
                    code::INVALID_ENVIRONMENT,
                    format!(
                        "CNI_NETNS {} is the node's network namespace, not a pod's",
                        netns.display()
                    ),
                    format!(
                    "it is the same namespace as {node}; refusing to install capture rules there"
                ),
                ))
            }
            Ok(_) => {}
            Err(e) if node == NODE_NAMESPACES[0] => {
                return Err(CniError::new(
                    code::INVALID_ENVIRONMENT,
                    format!("cannot read the plugin's own network namespace ({node})"),
                    e.to_string(),
                ))
            }
            Err(_) => {}
        }
    }
    Ok(())
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
    let netns = pod_namespace(env)?;
    enter(&netns)?;
    let Some(config) = pod_config(conf, env)? else {
        return Ok(());
    };
    Engine::of(&config.run).install(&config).map_err(|e| {
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
    refuse_node_namespace(Path::new(&netns))?;
    enter(&netns)?;
    let run = validate(&RawSettings::default(), env)
        .map_err(|e| invalid("invalid settings", e))?
        .run_options()
        .clone();
    Engine::of(&run).remove_everything(&run).map_err(|e| {
        CniError::new(
            code::APPLY_FAILED,
            "removing the capture rules failed",
            e.to_string(),
        )
    })
}

/// Reports drift (CNI error 101): see `check` for how the pod's state is compared.
fn check(conf: &NetConf, env: Env<'_>) -> Result<(), CniError> {
    let pod = env("CNI_ARGS").as_deref().and_then(pod_identity);
    if skip_reason(conf, pod.as_ref()).is_some() {
        return Ok(());
    }
    let netns = pod_namespace(env)?;
    enter(&netns)?;
    let Some(config) = pod_config(conf, env)? else {
        return Ok(());
    };
    check::check(&config)
}

/// Reads the network configuration from `stdin` (at most `MAX_STDIN` bytes, and one more
/// to tell that there were more) and runs the command: every input, readable or not, gets
/// a result or CNI error JSON on `out`.
pub fn run_stdin(env: Env<'_>, stdin: &mut dyn std::io::Read, out: &mut dyn Write) -> u8 {
    let mut input = Vec::new();
    let limit = u64::try_from(MAX_STDIN)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    if let Err(err) = std::io::Read::take(stdin, limit).read_to_end(&mut input) {
        let err = CniError::new(
            code::DECODING_FAILURE,
            "reading the network configuration from stdin failed",
            err.to_string(),
        );
        return fail(out, "1.0.0", &err);
    }
    run(env, &input, out)
}

/// Runs one CNI command; returns the process exit code. Everything the runtime reads goes
/// to `out`; logs go to stderr.
pub fn run(env: Env<'_>, stdin: &[u8], out: &mut dyn Write) -> u8 {
    let command = env("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        let version = json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS});
        let _ = writeln!(out, "{version}");
        return 0;
    }
    let conf = match parse_netconf_bytes(stdin) {
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
        assert_eq!(run(&env, b"", &mut out), 0);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("\"supportedVersions\""));
        let env = |name: &str| (name == "CNI_COMMAND").then(|| "FROB".to_owned());
        let mut out = Vec::new();
        assert_eq!(run(&env, br#"{"cniVersion":"1.0.0"}"#, &mut out), 1);
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
        assert_eq!(run(&env, stdin.as_bytes(), &mut out), 0);
        let result: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(result["ips"], json!([]));
    }

    fn error_code(stdin: &[u8]) -> (u8, Value) {
        let env = |name: &str| (name == "CNI_COMMAND").then(|| "ADD".to_owned());
        let mut out = Vec::new();
        let exit = run_stdin(&env, &mut &stdin[..], &mut out);
        let error = serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out)));
        (exit, error)
    }

    #[test]
    fn every_malformed_input_gets_cni_error_json() {
        let huge = vec![b' '; MAX_STDIN + 10];
        let cases: [(&[u8], u64, &str); 11] = [
            (
                b"{\"cniVersion\":\"1.0.0\",\"name\":\"\xff\xfe\"}",
                6,
                "UTF-8",
            ),
            (b"", 6, "no network configuration"),
            (b"  \n", 6, "no network configuration"),
            (&huge, 6, "too large"),
            (b"{\"cniVersion\":", 6, "not JSON"),
            (b"[1,2]", 7, "not a JSON object"),
            (br#"{"cniVersion":1}"#, 7, "cniVersion"),
            (
                br#"{"cniVersion":"1.0.0","exclude_namespaces":"kube-system"}"#,
                7,
                "exclude_namespaces",
            ),
            (
                br#"{"cniVersion":"1.0.0","proxy_env":{"ISTIO_META_DNS_CAPTURE":true}}"#,
                7,
                "proxy_env.ISTIO_META_DNS_CAPTURE",
            ),
            (
                br#"{"cniVersion":"1.0.0","runtimeConfig":[]}"#,
                7,
                "runtimeConfig",
            ),
            (
                br#"{"cniVersion":"1.0.0","prevResult":"x"}"#,
                7,
                "prevResult",
            ),
        ];
        for (stdin, code, words) in cases {
            let (exit, error) = error_code(stdin);
            assert_eq!(exit, 1, "{error}");
            assert_eq!(error["code"], code, "{error}");
            assert!(error["msg"].as_str().unwrap().contains(words), "{error}");
            assert_eq!(error["cniVersion"], "1.0.0");
        }
    }

    #[test]
    fn an_unreadable_stdin_gets_cni_error_json() {
        struct Broken;
        impl std::io::Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("pipe gone"))
            }
        }
        let env = |name: &str| (name == "CNI_COMMAND").then(|| "ADD".to_owned());
        let mut out = Vec::new();
        assert_eq!(run_stdin(&env, &mut Broken, &mut out), 1);
        let error: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(error["code"], 6);
        assert!(error["details"].as_str().unwrap().contains("pipe gone"));
    }

    #[test]
    fn the_plugins_own_namespace_is_refused_by_identity() {
        for path in [
            "/proc/self/ns/net",
            "/proc/thread-self/ns/net",
            "/proc/self/../self/ns/net",
            "/proc/self/task/../ns/net",
        ] {
            let err = refuse_node_namespace(Path::new(path)).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENVIRONMENT, "{path}");
            assert!(err.msg.contains("node's network namespace"), "{err:?}");
        }
        let err = refuse_node_namespace(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(err.msg.contains("cannot open CNI_NETNS"), "{err:?}");
        // Another namespace's file is accepted: a pod's is never the plugin's own.
        // (Whether init's is refused depends on where the tests run; the kernel tests
        // cover it from inside a namespace of their own.)
    }
}
