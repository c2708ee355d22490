//! `meshinit-cni` as a chained CNI plugin: ADD installs the same rules as the init
//! container (same traffic outcomes, checked with real connections and against
//! `meshinit explain`), DEL removes them, CHECK reports drift, and the validation probe
//! that runs as the pod's first init container in CNI mode passes.

use crate::support::cni::{config_for, invoke};
use crate::support::lab::{tcp, Client::*, Expect, Lab, Setup, Sidecar};
use crate::support::meshinit::{command, run};
use crate::support::netns::NetNs;
use crate::support::{injector_args, require_root};

/// What Istio's CNI plugin derives for a pod annotated only to exclude Vault's port:
/// 15020 joins 15021 and 15090 inbound, and the annotation replaces the default 15020
/// outbound.
const CNI_EQUIVALENT: &[&str] = &[
    "-m",
    "REDIRECT",
    "-u",
    "1337",
    "-g",
    "1337",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15020,15021,15090",
    "-o",
    "8200",
    "--no-ipv6",
];

fn vault_excluded() -> String {
    config_for(&[("traffic.sidecar.istio.io/excludeOutboundPorts", "8200")])
}

#[test]
fn cni_add_captures_like_the_init_container() {
    if !require_root("cni_add_captures_like_the_init_container") {
        return;
    }
    let setup = Setup::new(CNI_EQUIVALENT.iter().map(|s| s.to_string()).collect())
        .sidecar(Sidecar::Redirect)
        .via_cni(vault_excluded());
    let lab = Lab::start(&setup);
    lab.check(&[
        tcp(
            App,
            "198.51.100.30:8200",
            Expect::Direct {
                name: "peer",
                local: "198.51.100.30:8200",
            },
        ),
        tcp(
            App,
            "198.51.100.30:8300",
            Expect::Captured {
                port: 15001,
                orig: "198.51.100.30:8300",
            },
        ),
        tcp(
            Proxy,
            "198.51.100.30:8300",
            Expect::Direct {
                name: "peer",
                local: "198.51.100.30:8300",
            },
        ),
        tcp(
            Peer,
            "192.0.2.2:8080",
            Expect::Captured {
                port: 15006,
                orig: "192.0.2.2:8080",
            },
        ),
        tcp(
            Peer,
            "192.0.2.2:15021",
            Expect::Direct {
                name: "app",
                local: "192.0.2.2:15021",
            },
        ),
    ]);
}

fn pod() -> NetNs {
    let ns = NetNs::new("cnipod");
    ns.run(&["ip", "link", "set", "lo", "up"]);
    ns.run(&["ip", "addr", "add", "192.0.2.2/24", "dev", "lo"]);
    ns
}

fn save(ns: &NetNs) -> String {
    ns.run(&["iptables-nft-save"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn cni_add_returns_the_previous_result_and_del_removes_everything() {
    if !require_root("cni_add_returns_the_previous_result_and_del_removes_everything") {
        return;
    }
    let ns = pod();
    let before = save(&ns);
    let add = invoke(&ns, "ADD", &vault_excluded());
    assert_eq!(add.code, Some(0), "{add:?}");
    let result: serde_json::Value = serde_json::from_str(&add.stdout).expect("JSON result");
    assert_eq!(
        result["ips"][0]["address"], "192.0.2.2/24",
        "prevResult passes through"
    );
    assert!(save(&ns).contains("ISTIO_OUTPUT"), "rules installed");
    let again = invoke(&ns, "ADD", &vault_excluded());
    assert_eq!(again.code, Some(0), "{again:?}");
    let del = invoke(&ns, "DEL", &vault_excluded());
    assert_eq!(del.code, Some(0), "{del:?}");
    assert_eq!(save(&ns), before, "DEL leaves the namespace as it was");
}

#[test]
fn cni_check_reports_drift() {
    if !require_root("cni_check_reports_drift") {
        return;
    }
    let ns = pod();
    assert_eq!(invoke(&ns, "ADD", &vault_excluded()).code, Some(0));
    let clean = invoke(&ns, "CHECK", &vault_excluded());
    assert_eq!(clean.code, Some(0), "{clean:?}");
    ns.run(&["iptables-nft", "-t", "nat", "-F", "ISTIO_REDIRECT"]);
    let drifted = invoke(&ns, "CHECK", &vault_excluded());
    assert_eq!(drifted.code, Some(1), "{drifted:?}");
    let error: serde_json::Value = serde_json::from_str(&drifted.stdout).expect("CNI error JSON");
    assert_eq!(error["code"], 101);
    assert!(
        error["details"].as_str().unwrap_or("").contains("nat"),
        "{error}"
    );
}

#[test]
fn cni_skips_pods_istio_would_skip() {
    if !require_root("cni_skips_pods_istio_would_skip") {
        return;
    }
    let ns = pod();
    let before = save(&ns);
    let not_injected = r#"{"cniVersion":"1.0.0","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{}},"prevResult":{"ips":[]}}"#;
    let opted_out = config_for(&[("sidecar.istio.io/inject", "false")]);
    for config in [not_injected.to_owned(), opted_out] {
        let result = invoke(&ns, "ADD", &config);
        assert_eq!(result.code, Some(0), "{result:?}");
        assert_eq!(save(&ns), before, "nothing installed for {config}");
    }
}

#[test]
fn validation_container_passes_after_cni_add() {
    if !require_root("validation_container_passes_after_cni_add") {
        return;
    }
    let ns = pod();
    let as_proxy = [
        "setpriv",
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];
    let mut validation = vec!["istio-iptables"];
    validation.extend(injector_args(&[
        "--no-ipv6",
        "--run-validation",
        "--skip-rule-apply",
        "--probe-timeout=1s",
    ]));
    run(command(&ns, &as_proxy, &validation)).assert_exit(126);
    assert_eq!(invoke(&ns, "ADD", &vault_excluded()).code, Some(0));
    run(command(&ns, &as_proxy, &validation)).assert_exit(0);
}
