//! Pod annotations → the settings Istio's sidecar injector would have rendered as
//! `istio-init` args, so the injection template can pass `--annotations` and keep no logic.
//!
//! The file is the Kubernetes Downward API format: `key="value"` lines, values quoted like
//! Go's `strconv.Quote`. The derivation follows Istio's `injection-template.yaml`. Which
//! annotation sets which setting, and the defaults, are in the settings table
//! (`build::SETTINGS`); what is here is what no table row can say (whether to capture at all,
//! the excluded inbound ports each component works out its own way, the fixed uids).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::build::{
    Annotation, RawSettings, Setting, EXCLUDE_INBOUND_PORTS, INJECT, INTERCEPTION_MODE, SETTINGS,
    STATUS_PORT,
};
use super::error::{ConfigError, Origin};
use super::proxy_metadata::{proxy_metadata, PROXY_CONFIG};

/// The injector's chart default for `global.proxy.statusPort`.
const DEFAULT_STATUS_PORT: &str = "15020";
/// Envoy's Prometheus port and the agent's health port, always excluded from inbound capture.
const ALWAYS_EXCLUDED_INBOUND: &str = "15090,15021";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotations {
    path: PathBuf,
    values: BTreeMap<String, String>,
}

/// What the annotations say about this pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnnotationsVerdict {
    /// The injector would not have added an init container: change nothing.
    Skip(String),
    Capture,
}

impl Annotations {
    pub fn load(path: &Path) -> Result<Annotations, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| ConfigError::AnnotationsUnreadable {
                path: path.to_owned(),
                error,
            })?;
        Annotations::parse(path, &text)
    }

    /// Parses the Downward API format. Like Istio's `ParseDownwardAPI`, lines without `=`
    /// are skipped and a later duplicate key wins; unlike it, the error names the line.
    pub fn parse(path: &Path, text: &str) -> Result<Annotations, ConfigError> {
        let mut values = BTreeMap::new();
        for (index, line) in text.split('\n').enumerate() {
            let Some((key, quoted)) = line.split_once('=') else {
                continue;
            };
            let value = go_unquote(quoted).map_err(|reason| ConfigError::AnnotationsMalformed {
                path: path.to_owned(),
                line: index + 1,
                reason: format!("value {quoted:?} of {key:?} is not a quoted string ({reason})"),
            })?;
            values.insert(key.to_owned(), value);
        }
        Ok(Annotations {
            path: path.to_owned(),
            values,
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds to `raw` what the injector would render from these annotations. Explicit flags
    /// already in `raw` still win: `RawSettings` ranks flags above annotations.
    pub fn derive(&self, raw: &mut RawSettings) -> Result<AnnotationsVerdict, ConfigError> {
        if self.get(INJECT) == Some("false") {
            return Ok(AnnotationsVerdict::Skip(format!(
                "annotation {INJECT} is \"false\": this pod is not meshed"
            )));
        }
        let mode = self.get(INTERCEPTION_MODE).unwrap_or("REDIRECT");
        if mode == "NONE" {
            return Ok(AnnotationsVerdict::Skip(format!(
                "annotation {INTERCEPTION_MODE} is \"NONE\": traffic is not captured"
            )));
        }
        for spec in SETTINGS {
            if let Some(Annotation::Keys { keys, injector, .. }) = spec.annotation {
                self.set_first(raw, spec.setting, keys, injector);
            }
        }
        // The injector always renders -u; under TPROXY it is the literal 1337.
        raw.set_annotation(Setting::ProxyUid, "(sidecar injector's -u)", "1337");
        let (excluded, origin_key) = self.excluded_inbound_ports()?;
        raw.set_annotation(Setting::InboundPortsExclude, origin_key, excluded);
        Ok(AnnotationsVerdict::Capture)
    }

    /// Sets `setting` from the first of `keys` present, else to `default` (if any) under the
    /// first key's name.
    fn set_first(
        &self,
        raw: &mut RawSettings,
        setting: Setting,
        keys: &[&str],
        default: Option<&str>,
    ) {
        let present = keys.iter().find_map(|key| Some((*key, self.get(key)?)));
        let first = keys.first().copied().unwrap_or("annotation");
        if let Some((key, value)) = present.or(default.map(|value| (first, value))) {
            raw.set_annotation(setting, key, value);
        }
    }

    /// `-d`: 15090 and 15021, the user's exclusions, then the status port unless it is 0 or
    /// already listed (the injector's `excludeInboundPort`).
    fn excluded_inbound_ports(&self) -> Result<(String, &'static str), ConfigError> {
        let status = self.get(STATUS_PORT).unwrap_or(DEFAULT_STATUS_PORT).trim();
        if status.parse::<u16>().is_err() {
            return Err(ConfigError::InvalidValue {
                origin: Origin::Annotation(STATUS_PORT.into()),
                value: status.to_owned(),
                reason: "expected a port number (0 to disable)".into(),
            });
        }
        let user: Vec<&str> = self
            .get(EXCLUDE_INBOUND_PORTS)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        let mut ports = vec![ALWAYS_EXCLUDED_INBOUND.to_owned()];
        ports.extend(user.iter().map(|p| (*p).to_owned()));
        if status != "0" && !user.contains(&status) {
            ports.push(status.to_owned());
        }
        let origin = if self.get(EXCLUDE_INBOUND_PORTS).is_some() {
            EXCLUDE_INBOUND_PORTS
        } else {
            STATUS_PORT
        };
        Ok((ports.join(","), origin))
    }
}

/// Istio's CNI plugin always keeps these out of inbound capture (envoy's status, health and
/// Prometheus ports), whatever the pod says.
const CNI_ALWAYS_EXCLUDED_INBOUND: [&str; 3] = ["15020", "15021", "15090"];
/// The CNI plugin's default outbound exclusion: the agent's status port.
const CNI_DEFAULT_EXCLUDED_OUTBOUND: &str = "15020";

impl Annotations {
    /// Wraps annotations that came from somewhere other than a file (the CNI runtime).
    pub fn from_map(source: &str, values: BTreeMap<String, String>) -> Annotations {
        Annotations {
            path: PathBuf::from(source),
            values,
        }
    }

    /// Adds to `raw` what Istio's CNI plugin derives for a pod (`NewRedirect`): its own
    /// defaults, which differ from the injector's (15020 excluded outbound, 15020, 15021
    /// and 15090 always excluded inbound), and DNS, dual-stack and invalid-drop from the
    /// proxy's environment.
    ///
    /// The proxy's environment is the node's `proxy_env` (the mesh's defaults) with the
    /// pod's own `proxyMetadata` (`proxy.istio.io/config`) over it, as istiod merges them.
    pub fn derive_cni(
        &self,
        raw: &mut RawSettings,
        proxy_env: &BTreeMap<String, String>,
    ) -> Result<(), ConfigError> {
        let pod_metadata = match self.get(PROXY_CONFIG) {
            Some(config) => proxy_metadata(config).map_err(|reason| ConfigError::InvalidValue {
                origin: Origin::Annotation(PROXY_CONFIG.into()),
                value: config.to_owned(),
                reason,
            })?,
            None => BTreeMap::new(),
        };
        for spec in SETTINGS {
            if let Some(Annotation::Keys { keys, cni, .. }) = spec.annotation {
                self.set_first(raw, spec.setting, keys, cni);
            }
        }
        let excluded = self
            .get(EXCLUDE_INBOUND_PORTS)
            .unwrap_or(CNI_DEFAULT_EXCLUDED_OUTBOUND);
        let mut ports: Vec<&str> = Vec::new();
        for port in excluded
            .split(',')
            .map(str::trim)
            .chain(CNI_ALWAYS_EXCLUDED_INBOUND)
            .filter(|p| !p.is_empty())
        {
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        raw.set_annotation(
            Setting::InboundPortsExclude,
            EXCLUDE_INBOUND_PORTS,
            ports.join(","),
        );
        raw.set_annotation(Setting::ProxyUid, "(CNI default)", "1337");
        raw.set_annotation(Setting::ProxyGid, "(CNI default)", "1337");
        for (variable, settings) in [
            (
                "ISTIO_META_DNS_CAPTURE",
                &[Setting::RedirectDns, Setting::CaptureAllDns][..],
            ),
            ("ISTIO_DUAL_STACK", &[Setting::DualStack][..]),
            ("INVALID_DROP", &[Setting::DropInvalid][..]),
        ] {
            let (source, value) = match pod_metadata.get(variable) {
                Some(value) => (
                    format!("{PROXY_CONFIG} proxyMetadata.{variable}"),
                    Some(value),
                ),
                None => (variable.to_owned(), proxy_env.get(variable)),
            };
            if let Some(value) = value {
                for setting in settings {
                    raw.set_annotation(*setting, &source, value.as_str());
                }
            }
        }
        raw.set_flag(Setting::CniMode, "true");
        Ok(())
    }
}

/// Go's `strconv.Unquote` for double-quoted and back-quoted strings.
pub fn go_unquote(quoted: &str) -> Result<String, String> {
    if let Some(raw) = quoted.strip_prefix('`').and_then(|s| s.strip_suffix('`')) {
        return if raw.contains('`') {
            Err("unexpected backquote inside".into())
        } else {
            Ok(raw.to_owned())
        };
    }
    let inner = quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .filter(|_| quoted.len() >= 2)
        .ok_or_else(|| "expected a value in double quotes".to_owned())?;
    let mut bytes = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Err("unescaped quote inside".into()),
            '\n' => return Err("line break inside".into()),
            '\\' => {
                let escape = chars.next().ok_or("dangling backslash")?;
                match escape {
                    'a' => bytes.push(0x07),
                    'b' => bytes.push(0x08),
                    'f' => bytes.push(0x0c),
                    'n' => bytes.push(b'\n'),
                    'r' => bytes.push(b'\r'),
                    't' => bytes.push(b'\t'),
                    'v' => bytes.push(0x0b),
                    '\\' => bytes.push(b'\\'),
                    '"' => bytes.push(b'"'),
                    '\'' => return Err("\\' is not valid in a double-quoted string".into()),
                    'x' => bytes.push(hex_escape(&mut chars, 2)? as u8),
                    'u' => push_char(&mut bytes, hex_escape(&mut chars, 4)?)?,
                    'U' => push_char(&mut bytes, hex_escape(&mut chars, 8)?)?,
                    '0'..='7' => {
                        let mut value = escape.to_digit(8).unwrap_or(0);
                        for _ in 0..2 {
                            let digit = chars
                                .next()
                                .and_then(|d| d.to_digit(8))
                                .ok_or("bad octal escape")?;
                            value = value * 8 + digit;
                        }
                        let byte = u8::try_from(value).map_err(|_| "octal escape above \\377")?;
                        bytes.push(byte);
                    }
                    other => return Err(format!("unknown escape \\{other}")),
                }
            }
            c => {
                let mut buf = [0u8; 4];
                bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    // Go strings may hold any bytes; annotation values are text, so insist on UTF-8.
    String::from_utf8(bytes).map_err(|_| "escapes do not form UTF-8 text".to_owned())
}

fn hex_escape(chars: &mut std::str::Chars<'_>, digits: usize) -> Result<u32, String> {
    let mut value = 0u32;
    for _ in 0..digits {
        let digit = chars
            .next()
            .and_then(|c| c.to_digit(16))
            .ok_or("bad hex escape")?;
        value = value * 16 + digit;
    }
    Ok(value)
}

fn push_char(bytes: &mut Vec<u8>, code: u32) -> Result<(), String> {
    let c = char::from_u32(code).ok_or("escape is not a Unicode character")?;
    let mut buf = [0u8; 4];
    bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::build::*;

    fn parse(text: &str) -> Annotations {
        Annotations::parse(Path::new("annotations"), text).unwrap()
    }

    #[test]
    fn unquotes_go_strings() {
        assert_eq!(
            go_unquote(r#""a\"b\\c\n\x41\u00e9""#).unwrap(),
            "a\"b\\c\nAé"
        );
        assert_eq!(go_unquote("`raw \\n`").unwrap(), "raw \\n");
        assert_eq!(go_unquote(r#""\101""#).unwrap(), "A");
        assert!(go_unquote("unquoted").is_err());
        assert!(go_unquote("\"").is_err());
        assert!(go_unquote(r#""bad\q""#).is_err());
        assert!(go_unquote(r#""tail\""#).is_err());
    }

    #[test]
    fn parses_kubelet_format() {
        let a = parse("a=\"1\"\nkubectl.kubernetes.io/x=\"{\\\"k\\\":\\\"v=w\\\"}\"");
        assert_eq!(a.get("a"), Some("1"));
        assert_eq!(a.get("kubectl.kubernetes.io/x"), Some("{\"k\":\"v=w\"}"));
    }

    #[test]
    fn malformed_line_is_named() {
        let err = Annotations::parse(Path::new("f"), "a=\"1\"\nb=oops").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("line 2") && msg.contains("\"b\"") && msg.contains("oops"),
            "{msg}"
        );
    }

    #[test]
    fn inject_false_and_mode_none_skip() {
        let mut raw = RawSettings::default();
        let verdict = parse("sidecar.istio.io/inject=\"false\"")
            .derive(&mut raw)
            .unwrap();
        assert!(matches!(verdict, AnnotationsVerdict::Skip(_)));
        let verdict = parse("sidecar.istio.io/interceptionMode=\"NONE\"")
            .derive(&mut raw)
            .unwrap();
        assert!(matches!(verdict, AnnotationsVerdict::Skip(_)));
    }

    fn derived_exclude(text: &str) -> String {
        let a = parse(text);
        a.excluded_inbound_ports().unwrap().0
    }

    #[test]
    fn inbound_exclusions_follow_the_injector() {
        assert_eq!(derived_exclude(""), "15090,15021,15020");
        assert_eq!(
            derived_exclude("traffic.sidecar.istio.io/excludeInboundPorts=\"4,5,6\""),
            "15090,15021,4,5,6,15020"
        );
        assert_eq!(
            derived_exclude("status.sidecar.istio.io/port=\"0\""),
            "15090,15021"
        );
        assert_eq!(
            derived_exclude("status.sidecar.istio.io/port=\"123\"\ntraffic.sidecar.istio.io/excludeInboundPorts=\"123\""),
            "15090,15021,123"
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parsing_and_deriving_never_panic(text in any::<String>()) {
                let _ = go_unquote(&text);
                if let Ok(annotations) = Annotations::parse(Path::new("f"), &text) {
                    let _ = annotations.derive(&mut RawSettings::default());
                }
            }

            #[test]
            fn quoted_values_round_trip(value in "[ -~\u{e9}\u{1F600}\n\t]{0,30}") {
                let quoted = format!("{value:?}");
                prop_assume!(!quoted.contains("\\u{"));
                prop_assert_eq!(go_unquote(&quoted).unwrap(), value);
            }
        }
    }

    #[test]
    fn cni_defaults_follow_istios_plugin() {
        use crate::config::build::validate;
        let mut raw = RawSettings::default();
        let a = parse("traffic.sidecar.istio.io/excludeInboundPorts=\"8081,15021\"");
        a.derive_cni(
            &mut raw,
            &BTreeMap::from([("ISTIO_META_DNS_CAPTURE".into(), "true".into())]),
        )
        .unwrap();
        let v = validate(&raw, &|_| None).unwrap();
        let text = format!("{v:?}");
        assert!(
            text.contains("AllExcept([Port(8081), Port(15021), Port(15020), Port(15090)])"),
            "{text}"
        );
        assert!(
            text.contains("outbound_ports_exclude: [Port(15020)]"),
            "{text}"
        );
        assert!(v.run_options().cni_mode);
    }

    /// The pod's own proxyMetadata beats the node's proxy_env, key by key, as istiod
    /// merges a pod's ProxyConfig over the mesh's defaults.
    #[test]
    fn cni_takes_the_pods_own_proxy_metadata_over_the_nodes() {
        use crate::config::build::validate;
        let derived = |annotations: &str, node: &[(&str, &str)]| {
            let mut raw = RawSettings::default();
            let node = node
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect();
            parse(annotations).derive_cni(&mut raw, &node)?;
            let v = validate(&raw, &|_| None)?;
            Ok::<_, ConfigError>(format!("{v:?}"))
        };
        let on =
            "proxy.istio.io/config=\"proxyMetadata:\\n  ISTIO_META_DNS_CAPTURE: \\\"true\\\"\\n\"";
        let off = "proxy.istio.io/config=\"{\\\"proxyMetadata\\\": {\\\"ISTIO_META_DNS_CAPTURE\\\": \\\"false\\\"}}\"";
        let unrelated = "proxy.istio.io/config=\"concurrency: 2\"";
        let dns = |text: &str| text.contains("redirect_dns: true");
        assert!(dns(&derived(on, &[]).unwrap()));
        assert!(!dns(
            &derived(off, &[("ISTIO_META_DNS_CAPTURE", "true")]).unwrap()
        ));
        assert!(dns(&derived(
            unrelated,
            &[("ISTIO_META_DNS_CAPTURE", "true")]
        )
        .unwrap()));
        assert!(!dns(&derived(unrelated, &[]).unwrap()));
        let dual = "proxy.istio.io/config=\"proxyMetadata: {ISTIO_DUAL_STACK: \\\"true\\\"}\"";
        assert!(derived(dual, &[]).unwrap().contains("dual_stack: true"));
    }

    #[test]
    fn a_pods_unreadable_proxy_metadata_is_named() {
        let mut raw = RawSettings::default();
        let bad = parse(
            "proxy.istio.io/config=\"proxyMetadata:\\n  ISTIO_META_DNS_CAPTURE: |\\n    true\\n\"",
        );
        let err = bad
            .derive_cni(&mut raw, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.istio.io/config"), "{err}");
        let mut raw = RawSettings::default();
        let wrong =
            parse("proxy.istio.io/config=\"proxyMetadata: {ISTIO_META_DNS_CAPTURE: maybe}\"");
        wrong.derive_cni(&mut raw, &BTreeMap::new()).unwrap();
        let err = crate::config::build::validate(&raw, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxyMetadata.ISTIO_META_DNS_CAPTURE") && err.contains("maybe"),
            "{err}"
        );
    }

    #[test]
    fn port_annotations_take_ranges() {
        use crate::config::build::validate;
        let mut raw = RawSettings::default();
        parse(
            "traffic.sidecar.istio.io/excludeInboundPorts=\"9000-9010\"\n\
             traffic.sidecar.istio.io/excludeOutboundPorts=\"8200-8300\"\n\
             traffic.sidecar.istio.io/includeOutboundPorts=\"3000-3001\"",
        )
        .derive(&mut raw)
        .unwrap();
        let text = format!("{:?}", validate(&raw, &|_| None).unwrap());
        assert!(text.contains("Ports(9000-9010)"), "{text}");
        assert!(
            text.contains("outbound_ports_exclude: [Ports(8200-8300)]"),
            "{text}"
        );
        assert!(
            text.contains("outbound_ports_include: [Ports(3000-3001)]"),
            "{text}"
        );
        let mut raw = RawSettings::default();
        parse("traffic.sidecar.istio.io/excludeOutboundPorts=\"8300-8200\"")
            .derive(&mut raw)
            .unwrap();
        let err = validate(&raw, &|_| None).unwrap_err().to_string();
        assert!(
            err.contains(EXCLUDE_OUTBOUND_PORTS) && err.contains("8300-8200"),
            "{err}"
        );
    }

    #[test]
    fn bad_status_port_names_the_annotation() {
        let err = parse("status.sidecar.istio.io/port=\"http\"")
            .derive(&mut RawSettings::default())
            .unwrap_err();
        assert!(err.to_string().contains(STATUS_PORT), "{err}");
    }
}
