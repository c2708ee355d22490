//! Kubernetes objects in tests: the init container's resources (shared by the manifests and
//! the image tests, which measure against them), schema validation with
//! `kubernetes-validate` (offline; its schemas ship with it), YAML read through Python's
//! `yaml` (which kubernetes-validate brings), and the kubelet's Downward API file format.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use super::run_bounded;

/// The init container's memory request and limit, as the manifests write them.
pub const INIT_MEMORY: &str = "16Mi";
/// [`INIT_MEMORY`] in bytes; the image tests run the init container under this limit.
pub const INIT_MEMORY_BYTES: u64 = 16 << 20;
/// The init container's CPU request, as the manifests write it.
pub const INIT_CPU_REQUEST: &str = "10m";
/// The init container's CPU limit, as the manifests write it; the image tests use it too.
pub const INIT_CPU_LIMIT: &str = "1";

/// The Kubernetes versions manifests are validated against: the first with native sidecars
/// on by default, and the newest kubernetes-validate knows.
pub const VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

const TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `kubernetes-validate` (the Python package) is importable. When it is not, prints
/// why and returns false, so the test passes as skipped; under `CI=true` it panics instead
/// (scripts/test.sh installs it).
pub fn require_kubernetes_validate(test_name: &str) -> bool {
    let output = run_bounded(
        Command::new("python3").args(["-c", "import kubernetes_validate, yaml"]),
        TIMEOUT,
    );
    if output.status.success() {
        return true;
    }
    let reason = format!(
        "needs the Python package kubernetes-validate (scripts/test.sh installs it): {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    super::skip(test_name, &reason);
    false
}

/// `kubernetes-validate --strict -k VERSION FILE`: every object in the file against the
/// API schemas, unknown fields refused.
pub fn validate(file: &Path, version: &str) -> Output {
    run_bounded(
        Command::new("python3")
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--no-warn",
                "-k",
                version,
            ])
            .arg(file),
        TIMEOUT,
    )
}

/// Flattens every container of every object in `file` (a Deployment's pod template, a Pod,
/// or a bare `spec:` as injection templates are) into `object/field/container` → `path` →
/// value, where path is dotted (`securityContext.capabilities.add.0`) and scalars are
/// printed as YAML reads them (booleans `true`/`false`). Also `index`, the container's
/// position in its list.
const FLATTEN: &str = r#"
import sys, yaml

def scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")

def walk(prefix, v, out):
    if isinstance(v, dict):
        for k, x in v.items():
            walk(prefix + [str(k)], x, out)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            walk(prefix + [str(i)], x, out)
    else:
        out.append((".".join(prefix), scalar(v)))

for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc:
        continue
    kind = doc.get("kind", "")
    name = (doc.get("metadata") or {}).get("name", "-")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        spec = doc["spec"]["template"]["spec"]
    else:
        spec = doc.get("spec") or {}
    for field in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(field) or []):
            fields = [("index", str(i))]
            walk([], c, fields)
            for path, value in fields:
                print("%s/%s/%s\t%s\t%s" % (name, field, c["name"], path, value))
"#;

/// One flattened container: its fields by dotted path.
pub type Fields = BTreeMap<String, String>;

/// Every container in `file`, by `object/field/container` (see [`FLATTEN`]).
pub fn containers(file: &Path) -> BTreeMap<String, Fields> {
    let output = run_bounded(
        Command::new("python3").args(["-c", FLATTEN]).arg(file),
        TIMEOUT,
    );
    let stdout = super::expect_success(&format!("reading {}", file.display()), output);
    let mut all: BTreeMap<String, Fields> = BTreeMap::new();
    for line in stdout.lines() {
        let mut parts = line.splitn(3, '\t');
        let (Some(container), Some(path), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            panic!("unexpected line from the YAML reader: {line:?}");
        };
        all.entry(container.to_owned())
            .or_default()
            .insert(path.to_owned(), value.to_owned());
    }
    all
}

/// A list field (`args`, `securityContext.capabilities.add`) of a flattened container, in
/// order.
pub fn list(fields: &Fields, path: &str) -> Vec<String> {
    (0..)
        .map_while(|i| fields.get(&format!("{path}.{i}")).cloned())
        .collect()
}

/// The Downward API `annotations` file the kubelet writes: `key="value"` lines sorted by
/// key, values quoted as Go's `%q` does, no newline after the last.
pub fn downward_api_annotations(annotations: &[(&str, &str)]) -> String {
    let sorted: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    sorted
        .iter()
        .map(|(key, value)| format!("{key}={}", go_quote(value)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Go's `strconv.Quote`, for the characters tests use: `"` and `\` escaped, the C escapes
/// for control characters, `\xNN` for other control bytes, everything printable as is.
pub fn go_quote(value: &str) -> String {
    let mut out = String::from('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[test]
fn go_quote_matches_go() {
    // Expected values as Go's fmt.Sprintf("%q", …) prints them.
    assert_eq!(go_quote("8200"), r#""8200""#);
    assert_eq!(
        go_quote(r#"{"initContainers":["istio-init"]}"#),
        r#""{\"initContainers\":[\"istio-init\"]}""#
    );
    assert_eq!(go_quote("a\nb\tc\\d"), r#""a\nb\tc\\d""#);
    assert_eq!(go_quote("\u{1}"), r#""\x01""#);
    assert_eq!(
        downward_api_annotations(&[("b", "2"), ("a", "1")]),
        "a=\"1\"\nb=\"2\""
    );
}
