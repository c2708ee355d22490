//! The JSON side of installing meshinit-cni: its plugin entry, putting it at the end of a
//! primary network's `plugins` (a single-plugin `.conf` becomes a list, as Istio's
//! install-cni converts it), and taking it out again. Pure: bytes in, bytes out, no I/O.
//!
//! serde_json is built with `preserve_order`, so the primary's keys keep the order it
//! wrote them in; only whitespace may change when an entry is added.

use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The `type` that names meshinit-cni's entry in a plugin list.
pub const PLUGIN_TYPE: &str = "meshinit-cni";
/// The capability through which containerd and CRI-O hand the plugin a pod's annotations,
/// from which meshinit-cni selects and configures the pod (docs/cni.md).
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
/// The network name Istio gives a `.conf` it converts to a list when the `.conf` has none.
const CONVERTED_DEFAULT_NAME: &str = "k8s-pod-network";
/// The version libcni assumes for a configuration that names none.
const DEFAULT_CNI_VERSION: &str = "0.3.1";
/// meshinit-cni's own standalone list (`chained: false`).
const STANDALONE_CNI_VERSION: &str = "1.0.0";

/// The settings meshinit-cni reads from its entry (src/cni.rs `parse_conf`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntrySettings {
    pub exclude_namespaces: Vec<String>,
    pub proxy_env: BTreeMap<String, String>,
}

/// meshinit-cni's plugin entry as it goes into a list.
pub fn plugin_entry(settings: &EntrySettings) -> Value {
    let mut entry = Map::new();
    entry.insert("type".into(), PLUGIN_TYPE.into());
    let mut capabilities = Map::new();
    capabilities.insert(ANNOTATIONS_CAPABILITY.into(), Value::Bool(true));
    entry.insert("capabilities".into(), Value::Object(capabilities));
    entry.insert(
        "exclude_namespaces".into(),
        Value::Array(
            settings
                .exclude_namespaces
                .iter()
                .map(|ns| Value::String(ns.clone()))
                .collect(),
        ),
    );
    if !settings.proxy_env.is_empty() {
        entry.insert(
            "proxy_env".into(),
            Value::Object(
                settings
                    .proxy_env
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
        );
    }
    Value::Object(entry)
}

/// meshinit-cni's own configuration, for `chained: false`: a list, or, for a file a runtime
/// reads as a single plugin (libcni reads every name but `.conflist` so, e.g. the
/// `istio-cni.conf` of Istio's OpenShift settings), the entry alone with a version and name.
pub fn standalone(settings: &EntrySettings, single: bool) -> Vec<u8> {
    let mut config = Map::new();
    config.insert("cniVersion".into(), STANDALONE_CNI_VERSION.into());
    config.insert("name".into(), PLUGIN_TYPE.into());
    if single {
        if let Value::Object(entry) = plugin_entry(settings) {
            config.extend(entry);
        }
    } else {
        config.insert("plugins".into(), Value::Array(vec![plugin_entry(settings)]));
    }
    render(&Value::Object(config))
}

/// Why bytes are not a configuration we can add to. The caller adds the file's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A network configuration as the runtime reads it: a list, or one plugin (`.conf`).
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkConfig {
    List(Map<String, Value>),
    Single(Map<String, Value>),
}

impl NetworkConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, ShapeError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|err| ShapeError(format!("not JSON: {err}")))?;
        let Value::Object(map) = value else {
            return Err(ShapeError("not a JSON object".into()));
        };
        match map.get("plugins") {
            Some(Value::Array(plugins)) => {
                if plugins.is_empty() {
                    return Err(ShapeError("its \"plugins\" list is empty".into()));
                }
                if let Some(i) = plugins
                    .iter()
                    .position(|p| !p.get("type").is_some_and(Value::is_string))
                {
                    return Err(ShapeError(format!("plugins[{i}] has no \"type\" string")));
                }
                Ok(NetworkConfig::List(map))
            }
            Some(_) => Err(ShapeError("\"plugins\" is not a list".into())),
            None if map.get("type").is_some_and(Value::is_string) => Ok(NetworkConfig::Single(map)),
            None => Err(ShapeError(
                "neither a list (\"plugins\") nor a single plugin (\"type\")".into(),
            )),
        }
    }

    /// The list form: a single plugin becomes the one entry of a list with its name and
    /// version (Istio's install-cni `insertCNIConfig`: the version moves to the list).
    pub fn into_list(self) -> Map<String, Value> {
        match self {
            NetworkConfig::List(list) => list,
            NetworkConfig::Single(mut plugin) => {
                let version = plugin
                    .shift_remove("cniVersion")
                    .unwrap_or_else(|| DEFAULT_CNI_VERSION.into());
                let name = plugin
                    .get("name")
                    .cloned()
                    .unwrap_or_else(|| CONVERTED_DEFAULT_NAME.into());
                let mut list = Map::new();
                list.insert("cniVersion".into(), version);
                list.insert("name".into(), name);
                list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
                list
            }
        }
    }

    pub fn is_single(&self) -> bool {
        matches!(self, NetworkConfig::Single(_))
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn plugins(list: &Map<String, Value>) -> &[Value] {
    list.get("plugins")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Whether the configuration holds meshinit-cni's entry exactly as `entry`, last in its
/// list, and only once: what the agent's readiness means.
pub fn has_entry(config: &NetworkConfig, entry: &Value) -> bool {
    match config {
        NetworkConfig::Single(_) => false,
        NetworkConfig::List(list) => {
            let plugins = plugins(list);
            plugins.last() == Some(entry) && plugins.iter().filter(|p| is_ours(p)).count() == 1
        }
    }
}

/// Whether any meshinit-cni entry is in the configuration, with whatever settings.
pub fn has_any_entry(config: &NetworkConfig) -> bool {
    match config {
        NetworkConfig::Single(plugin) => {
            plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
        }
        NetworkConfig::List(list) => plugins(list).iter().any(is_ours),
    }
}

/// The configuration with `entry` last in its list and no other meshinit-cni entry (an
/// old one, with other settings, is replaced). `None` when it already is exactly that, so
/// a second insert writes nothing.
pub fn insert(config: NetworkConfig, entry: &Value) -> Option<Vec<u8>> {
    if has_entry(&config, entry) {
        return None;
    }
    let mut list = config.into_list();
    let mut kept: Vec<Value> = plugins(&list)
        .iter()
        .filter(|p| !is_ours(p))
        .cloned()
        .collect();
    kept.push(entry.clone());
    list.insert("plugins".into(), Value::Array(kept));
    Some(render(&Value::Object(list)))
}

/// The list without any meshinit-cni entry, or `None` when it has none.
pub fn remove(config: NetworkConfig) -> Option<Map<String, Value>> {
    if !has_any_entry(&config) {
        return None;
    }
    let mut list = config.into_list();
    let kept: Vec<Value> = plugins(&list)
        .iter()
        .filter(|p| !is_ours(p))
        .cloned()
        .collect();
    list.insert("plugins".into(), Value::Array(kept));
    Some(list)
}

/// How the agent writes JSON: indented, with a final newline, as most CNIs write theirs.
pub fn render(value: &Value) -> Vec<u8> {
    // A serde_json Value always serialises.
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EntrySettings {
        EntrySettings {
            exclude_namespaces: vec!["kube-system".into(), "istio-system".into()],
            proxy_env: BTreeMap::new(),
        }
    }

    const BRIDGE_LIST: &str = r#"{"cniVersion":"1.0.0","name":"node","zzz":1,"aaa":2,
        "plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn parse(text: &str) -> NetworkConfig {
        NetworkConfig::parse(text.as_bytes()).expect("parses")
    }

    fn plugin_types(bytes: &[u8]) -> Vec<String> {
        let value: Value = serde_json::from_slice(bytes).expect("valid JSON");
        value["plugins"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|p| p["type"].as_str().expect("type").to_owned())
            .collect()
    }

    #[test]
    fn entry_declares_the_annotations_capability_and_settings() {
        let mut s = settings();
        s.proxy_env
            .insert("ISTIO_META_DNS_CAPTURE".into(), "true".into());
        let entry = plugin_entry(&s);
        assert_eq!(
            entry.to_string(),
            r#"{"type":"meshinit-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true},"exclude_namespaces":["kube-system","istio-system"],"proxy_env":{"ISTIO_META_DNS_CAPTURE":"true"}}"#
        );
    }

    #[test]
    fn insert_appends_last_and_keeps_everything_else_in_order() {
        let out = insert(parse(BRIDGE_LIST), &plugin_entry(&settings())).expect("changed");
        assert_eq!(plugin_types(&out), ["bridge", "portmap", "meshinit-cni"]);
        let text = String::from_utf8(out).expect("utf8");
        // Key order of the primary's own object is kept (preserve_order).
        let order: Vec<usize> = ["cniVersion", "\"name\"", "zzz", "aaa", "plugins"]
            .iter()
            .map(|k| text.find(k).expect("key present"))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        // The primary's plugins are unchanged, value for value.
        let before: Value = serde_json::from_str(BRIDGE_LIST).expect("json");
        let after: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(before["plugins"][0], after["plugins"][0]);
        assert_eq!(before["plugins"][1], after["plugins"][1]);
    }

    #[test]
    fn second_insert_is_a_no_op() {
        let entry = plugin_entry(&settings());
        let once = insert(parse(BRIDGE_LIST), &entry).expect("changed");
        let config = NetworkConfig::parse(&once).expect("parses");
        assert!(has_entry(&config, &entry));
        assert_eq!(insert(config, &entry), None);
    }

    #[test]
    fn an_old_entry_with_other_settings_is_replaced_not_duplicated() {
        let old = r#"{"cniVersion":"1.0.0","name":"node","plugins":[{"type":"bridge"},
            {"type":"meshinit-cni","exclude_namespaces":["old"]},{"type":"portmap"}]}"#;
        let entry = plugin_entry(&settings());
        assert!(!has_entry(&parse(old), &entry));
        let out = insert(parse(old), &entry).expect("changed");
        assert_eq!(plugin_types(&out), ["bridge", "portmap", "meshinit-cni"]);
        let value: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(value["plugins"][2], entry);
    }

    #[test]
    fn a_single_conf_becomes_a_list_with_its_version_and_name() {
        let conf = r#"{"cniVersion":"0.4.0","name":"calico","type":"calico","mtu":1440}"#;
        let parsed = parse(conf);
        assert!(parsed.is_single());
        let out = insert(parsed, &plugin_entry(&settings())).expect("changed");
        let value: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(value["cniVersion"], "0.4.0");
        assert_eq!(value["name"], "calico");
        assert_eq!(
            value["plugins"][0],
            serde_json::json!({"name":"calico","type":"calico","mtu":1440})
        );
        assert_eq!(plugin_types(&out), ["calico", "meshinit-cni"]);
    }

    #[test]
    fn a_single_conf_without_version_or_name_gets_istios_defaults() {
        let out = insert(parse(r#"{"type":"ptp"}"#), &plugin_entry(&settings())).expect("changed");
        let value: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(value["cniVersion"], DEFAULT_CNI_VERSION);
        assert_eq!(value["name"], CONVERTED_DEFAULT_NAME);
    }

    #[test]
    fn remove_takes_out_exactly_meshinit_entries() {
        let entry = plugin_entry(&settings());
        let with = insert(parse(BRIDGE_LIST), &entry).expect("changed");
        let removed = remove(NetworkConfig::parse(&with).expect("parses")).expect("had one");
        let original: Value = serde_json::from_str(BRIDGE_LIST).expect("json");
        assert_eq!(Value::Object(removed), original);
        assert_eq!(remove(parse(BRIDGE_LIST)), None);
    }

    #[test]
    fn hostile_inputs_are_refused_with_a_reason() {
        for (text, reason) in [
            ("{\"plugins\": [", "not JSON"),
            ("[1,2]", "not a JSON object"),
            (r#"{"name":"x","cniVersion":"1.0.0"}"#, "neither a list"),
            (r#"{"name":"x","plugins":[]}"#, "empty"),
            (r#"{"name":"x","plugins":{}}"#, "not a list"),
            (
                r#"{"name":"x","plugins":[{"bridge":"cni0"}]}"#,
                "plugins[0] has no \"type\"",
            ),
        ] {
            let err = NetworkConfig::parse(text.as_bytes()).expect_err(text);
            assert!(err.0.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn standalone_single_conf_is_the_entry_with_version_and_name() {
        let out = standalone(&settings(), true);
        let config = NetworkConfig::parse(&out).expect("parses");
        assert!(config.is_single());
        let value: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(value["type"], PLUGIN_TYPE);
        assert_eq!(value["cniVersion"], STANDALONE_CNI_VERSION);
        assert_eq!(value["capabilities"][ANNOTATIONS_CAPABILITY], true);
    }

    #[test]
    fn standalone_list_is_valid_and_holds_only_the_entry() {
        let out = standalone(&settings(), false);
        let config = NetworkConfig::parse(&out).expect("parses");
        assert!(has_entry(&config, &plugin_entry(&settings())));
        assert_eq!(plugin_types(&out), ["meshinit-cni"]);
    }
}
