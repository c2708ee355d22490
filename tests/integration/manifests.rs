//! The Kubernetes manifests in `manifests/`: every object validates against the API schemas
//! (strict: no unknown field), and meshinit's containers are what the README and the image
//! tests say: Istio's args, which meshinit accepts; the securityContext of istio-init (or,
//! under Istio CNI, istio-validation); the resources the image tests measured against; and
//! the native sidecar's place before the app's own init container.
//!
//! Needs the Python package kubernetes-validate: skips with a reason otherwise, fails under
//! `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::k8s::{
    containers, list, require_kubernetes_validate, validate, Fields, INIT_CPU_LIMIT,
    INIT_CPU_REQUEST, INIT_MEMORY, VERSIONS,
};
use crate::support::{expect_success, run_bounded};

const MESHINIT: &str = env!("CARGO_BIN_EXE_meshinit");

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests_dir())
        .expect("manifests/")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests/*.yaml");
    files
}

#[test]
fn manifests_validate_against_the_api_schemas() {
    let test = "manifests_validate_against_the_api_schemas";
    if !require_kubernetes_validate(test) {
        return;
    }
    let mut failures = Vec::new();
    for file in manifest_files() {
        for version in VERSIONS {
            let output = validate(&file, version);
            if !output.status.success() {
                failures.push(format!(
                    "{} against {version}:\n{}{}",
                    file.display(),
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{test}:\n{}", failures.join("\n"));
}

/// meshinit's containers in every manifest: `(file, object/field/name, fields)`.
fn meshinit_containers() -> Vec<(String, String, Fields)> {
    manifest_files()
        .iter()
        .flat_map(|file| {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            containers(file)
                .into_iter()
                .filter(|(_, fields)| {
                    fields
                        .get("image")
                        .is_some_and(|i| i.contains("/meshinit:"))
                })
                .map(move |(id, fields)| (name.clone(), id, fields))
        })
        .collect()
}

#[test]
fn meshinit_containers_are_istios_with_measured_resources() {
    let test = "meshinit_containers_are_istios_with_measured_resources";
    if !require_kubernetes_validate(test) {
        return;
    }
    let found = meshinit_containers();
    assert!(found.len() >= 4, "{test}: meshinit's containers: {found:?}");
    for (file, id, fields) in &found {
        let what = format!("{test}: {file}: {id}");
        let get = |path: &str| fields.get(path).map(String::as_str);
        assert_eq!(
            get("resources.requests.cpu"),
            Some(INIT_CPU_REQUEST),
            "{what}"
        );
        assert_eq!(
            get("resources.requests.memory"),
            Some(INIT_MEMORY),
            "{what}"
        );
        assert_eq!(get("resources.limits.cpu"), Some(INIT_CPU_LIMIT), "{what}");
        assert_eq!(get("resources.limits.memory"), Some(INIT_MEMORY), "{what}");
        assert_eq!(
            get("securityContext.allowPrivilegeEscalation"),
            Some("false"),
            "{what}"
        );
        assert_eq!(get("securityContext.privileged"), Some("false"), "{what}");
        assert_eq!(
            get("securityContext.readOnlyRootFilesystem"),
            Some("true"),
            "{what}"
        );
        assert_eq!(
            list(fields, "securityContext.capabilities.drop"),
            ["ALL"],
            "{what}"
        );
        let args = list(fields, "args");
        assert_eq!(
            args.first().map(String::as_str),
            Some("istio-iptables"),
            "{what}"
        );
        if id.ends_with("/istio-init") {
            // Installs the rules: root with exactly the two capabilities.
            assert_eq!(
                list(fields, "securityContext.capabilities.add"),
                ["NET_ADMIN", "NET_RAW"],
                "{what}"
            );
            assert_eq!(get("securityContext.runAsUser"), Some("0"), "{what}");
            assert_eq!(get("securityContext.runAsGroup"), Some("0"), "{what}");
            assert_eq!(get("securityContext.runAsNonRoot"), Some("false"), "{what}");
            assert!(
                !args.iter().any(|a| a == "--skip-rule-apply"),
                "{what}: {args:?}"
            );
        } else {
            // Under Istio CNI: only checks the rules, as the proxy's uid, no capability.
            assert!(id.ends_with("/istio-validation"), "{what}");
            assert_eq!(
                list(fields, "securityContext.capabilities.add"),
                Vec::<String>::new()
            );
            assert_eq!(get("securityContext.runAsUser"), Some("1337"), "{what}");
            assert_eq!(get("securityContext.runAsNonRoot"), Some("true"), "{what}");
            assert!(
                args.iter().any(|a| a == "--run-validation")
                    && args.iter().any(|a| a == "--skip-rule-apply"),
                "{what}: {args:?}"
            );
        }
    }
}

/// `meshinit print ARGS` (ARGS without the leading `istio-iptables`), IPv4 only and with no
/// DNS servers, so that nothing depends on this machine; panics unless meshinit accepts
/// them. Returns the ruleset. An istio-validation container's `--skip-rule-apply` is left
/// out: with it, print (like apply) installs nothing, and the rules its settings describe
/// are the ones Istio CNI installs.
pub fn print_ruleset(what: &str, args: &[String]) -> String {
    let args: Vec<&String> = args.iter().filter(|a| *a != "--skip-rule-apply").collect();
    let output = run_bounded(
        Command::new(MESHINIT)
            .arg("print")
            .args(&args)
            .args(["--no-ipv6", "--dns-servers", ""])
            .env_clear(),
        Duration::from_secs(20),
    );
    expect_success(&format!("{what}: meshinit print {args:?}"), output)
}

#[test]
fn meshinit_accepts_every_manifests_args() {
    let test = "meshinit_accepts_every_manifests_args";
    if !require_kubernetes_validate(test) {
        return;
    }
    for (file, id, fields) in meshinit_containers() {
        let args = list(&fields, "args");
        let ruleset = print_ruleset(&format!("{test}: {file}: {id}"), &args[1..]);
        assert!(
            ruleset.contains("-j ISTIO_REDIRECT"),
            "{test}: {file}: {id}: no capture in\n{ruleset}"
        );
        if id.starts_with("vault-app-excluded/") {
            for rule in [
                "-A ISTIO_OUTPUT -p tcp --dport 8200 -j RETURN",
                "-A ISTIO_OUTPUT -d 198.51.100.30/32 -j RETURN",
            ] {
                assert!(
                    ruleset.contains(rule),
                    "{test}: {file}: {id}: expected {rule:?} in\n{ruleset}"
                );
            }
        }
    }
}

/// Vault's init container runs after istio-proxy, a native sidecar, which runs after
/// istio-init; in the alternatives, it runs as the proxy's uid, or the pod excludes Vault.
#[test]
fn vault_app_init_container_order_and_alternatives() {
    let test = "vault_app_init_container_order_and_alternatives";
    if !require_kubernetes_validate(test) {
        return;
    }
    let native = containers(&manifests_dir().join("vault-app-native-sidecar.yaml"));
    let index = |name: &str| {
        native
            .get(&format!("vault-app/initContainers/{name}"))
            .and_then(|fields| fields.get("index"))
            .unwrap_or_else(|| panic!("{test}: no init container {name}"))
            .clone()
    };
    assert_eq!(
        [
            index("istio-init"),
            index("istio-proxy"),
            index("vault-agent-init")
        ],
        ["0", "1", "2"],
        "{test}: init container order"
    );
    let proxy = &native["vault-app/initContainers/istio-proxy"];
    assert_eq!(
        proxy.get("restartPolicy").map(String::as_str),
        Some("Always")
    );
    assert!(proxy.contains_key("startupProbe.httpGet.port"), "{test}");

    let alternatives = containers(&manifests_dir().join("vault-app-alternatives.yaml"));
    let vault_uid = |object: &str| {
        alternatives[&format!("{object}/initContainers/vault-agent-init")]
            .get("securityContext.runAsUser")
            .cloned()
    };
    assert_eq!(vault_uid("vault-app-proxy-uid").as_deref(), Some("1337"));
    assert_eq!(vault_uid("vault-app-excluded").as_deref(), Some("1000"));
}

#[test]
fn namespace_admits_the_init_containers_capabilities() {
    let test = "namespace_admits_the_init_containers_capabilities";
    let text = std::fs::read_to_string(manifests_dir().join("namespace.yaml")).expect("read");
    assert!(
        text.contains("pod-security.kubernetes.io/enforce: privileged"),
        "{test}: NET_ADMIN is refused below the privileged level"
    );
}
