//! `meshinit-cni` as a chained CNI plugin: ADD installs the same rules as the init
//! container (same traffic outcomes, checked with real connections and against
//! `meshinit explain`), DEL removes them, CHECK reports drift, and the validation probe
//! that runs as the pod's first init container in CNI mode passes.

use crate::support::cni::{config_for, invoke, invoke_with, with_args, CniResult};
use crate::support::lab::{tcp, udp, Client::*, Expect, Lab, Setup, Sidecar};
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

/// A pod that asks for DNS capture itself (`proxy.istio.io/config`, which istiod turns into
/// istio-proxy's environment and Istio's plugin reads from there): its app's DNS goes to the
/// sidecar's 15053, the sidecar's own goes out; a pod that does not ask keeps its DNS.
#[test]
fn cni_add_takes_the_pods_own_dns_capture() {
    if !require_root("cni_add_takes_the_pods_own_dns_capture") {
        return;
    }
    let mut dns_args: Vec<String> = CNI_EQUIVALENT.iter().map(|s| s.to_string()).collect();
    dns_args.extend(["--redirect-dns".into(), "--capture-all-dns".into()]);
    for config in [
        "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
        r#"{"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}}"#,
    ] {
        let annotated = config_for(&[
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "8200"),
            ("proxy.istio.io/config", config),
        ]);
        let lab = Lab::start(&Setup::new(dns_args.clone()).via_cni(annotated));
        lab.check(&[
            udp(App, "203.0.113.53:53", Expect::DnsProxy),
            udp(
                Proxy,
                "203.0.113.53:53",
                Expect::Direct {
                    name: "peer",
                    local: "203.0.113.53:53",
                },
            ),
        ]);
    }
    let lab = Lab::start(
        &Setup::new(CNI_EQUIVALENT.iter().map(|s| s.to_string()).collect())
            .via_cni(vault_excluded()),
    );
    lab.check(&[udp(
        App,
        "203.0.113.53:53",
        Expect::Direct {
            name: "peer",
            local: "203.0.113.53:53",
        },
    )]);
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

/// A TPROXY pod (so it has routing too) with Vault's port excluded, on `backend`'s rules.
fn tproxy_pod_config(args: &[(&str, &str)]) -> String {
    with_args(
        &config_for(&[
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "8200"),
        ]),
        args,
    )
}

/// The CNI error JSON of a failed invocation, after checking it failed as one.
fn cni_error(result: &CniResult, code: u64) -> serde_json::Value {
    assert_eq!(result.code, Some(1), "{result:?}");
    let error: serde_json::Value = serde_json::from_str(&result.stdout)
        .unwrap_or_else(|e| panic!("no CNI error JSON ({e}): {result:?}"));
    assert_eq!(error["code"], code, "{result:?}");
    error
}

/// ADDs `config` to a fresh pod, requires CHECK to pass, changes the pod with `mutate`
/// (each argv run in the pod), and requires CHECK to fail naming each of `expected`, or,
/// with no `expected`, to pass still.
fn check_after(config: &str, mutate: &[&[&str]], expected: &[&str]) {
    let ns = pod();
    let add = invoke(&ns, "ADD", config);
    assert_eq!(add.code, Some(0), "{add:?}");
    let clean = invoke(&ns, "CHECK", config);
    assert_eq!(clean.code, Some(0), "CHECK of an untouched pod: {clean:?}");
    for argv in mutate {
        ns.run(argv);
    }
    let checked = invoke(&ns, "CHECK", config);
    if expected.is_empty() {
        assert_eq!(checked.code, Some(0), "after {mutate:?}: {checked:?}");
        return;
    }
    let error = cni_error(&checked, 101);
    let details = error["details"].as_str().unwrap_or("");
    for drift in expected {
        assert!(
            details.contains(drift),
            "after {mutate:?}, CHECK should name {drift:?}: {error}"
        );
    }
}

#[test]
fn cni_check_names_what_drifted_in_iptables() {
    if !require_root("cni_check_names_what_drifted_in_iptables") {
        return;
    }
    let config = tproxy_pod_config(&[]);
    let ipt = |args: &'static [&'static str]| -> Vec<&'static str> {
        let mut argv = vec!["iptables-nft"];
        argv.extend_from_slice(args);
        argv
    };
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        // All outbound capture gone, every ISTIO_* chain intact.
        (
            ipt(&["-t", "nat", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT"]),
            vec!["ipv4 nat OUTPUT: missing `-j ISTIO_OUTPUT`"],
        ),
        (
            ipt(&[
                "-t",
                "nat",
                "-D",
                "ISTIO_OUTPUT",
                "-d",
                "127.0.0.1/32",
                "-j",
                "RETURN",
            ]),
            vec!["ipv4 nat ISTIO_OUTPUT: missing `-d 127.0.0.1/32 -j RETURN`"],
        ),
        // Same rule count: only the content says it changed.
        (
            ipt(&[
                "-t",
                "nat",
                "-R",
                "ISTIO_OUTPUT",
                "1",
                "-p",
                "tcp",
                "--dport",
                "8201",
                "-j",
                "RETURN",
            ]),
            vec![
                "ipv4 nat ISTIO_OUTPUT: missing `-p tcp -m tcp --dport 8200 -j RETURN`",
                "ipv4 nat ISTIO_OUTPUT: unexpected rule `-p tcp -m tcp --dport 8201 -j RETURN`",
            ],
        ),
        (
            ipt(&["-t", "nat", "-I", "ISTIO_OUTPUT", "1", "-j", "RETURN"]),
            vec!["ipv4 nat ISTIO_OUTPUT: unexpected rule `-j RETURN`"],
        ),
        (
            ipt(&[
                "-t",
                "mangle",
                "-D",
                "PREROUTING",
                "-p",
                "tcp",
                "-j",
                "ISTIO_INBOUND",
            ]),
            vec!["ipv4 mangle PREROUTING: missing `-p tcp -j ISTIO_INBOUND`"],
        ),
        (
            vec!["ip", "rule", "del", "fwmark", "0x539", "lookup", "133"],
            vec!["ipv4 routing: missing `ip rule fwmark 1337 lookup 133`"],
        ),
        (
            vec![
                "ip", "route", "del", "local", "default", "dev", "lo", "table", "133",
            ],
            vec!["ipv4 routing: missing `ip route local 0.0.0.0/0 dev lo table 133`"],
        ),
    ];
    for (argv, expected) in &cases {
        check_after(&config, &[argv], expected);
    }
}

#[test]
fn cni_check_uses_the_pods_backend() {
    if !require_root("cni_check_uses_the_pods_backend") {
        return;
    }
    let config = tproxy_pod_config(&[("force-iptables-binary", "legacy")]);
    check_after(
        &config,
        &[&[
            "iptables-legacy",
            "-t",
            "nat",
            "-D",
            "OUTPUT",
            "-j",
            "ISTIO_OUTPUT",
        ]],
        &["ipv4 nat OUTPUT: missing `-j ISTIO_OUTPUT`"],
    );
    check_after(
        &config,
        &[&[
            "iptables-legacy",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "198.51.100.9",
            "-j",
            "ACCEPT",
        ]],
        &[],
    );
}

#[test]
fn cni_check_follows_the_pods_settings() {
    if !require_root("cni_check_follows_the_pods_settings") {
        return;
    }
    // --match-sets: the scratch namespace gets its own sets, under the same names.
    let sets = match_sets_config("198.51.100.0/24,203.0.113.0/24", &[]);
    check_after(&sets, &[], &[]);
    check_after(
        &sets,
        &[&[
            "iptables-nft",
            "-t",
            "nat",
            "-D",
            "OUTPUT",
            "-j",
            "ISTIO_OUTPUT",
        ]],
        &["ipv4 nat OUTPUT: missing `-j ISTIO_OUTPUT`"],
    );
    // Written by `nft -f` rather than over netlink: both sides are written the same way.
    let via_nft = tproxy_pod_config(&[("native-nftables", "true"), ("nftables-apply", "nft")]);
    check_after(&via_nft, &[], &[]);
    check_after(
        &via_nft,
        &[&["nft", "flush", "chain", "inet", "istio-proxy-nat", "istio-redirect"]],
        &["nftables inet istio-proxy-nat chain istio-redirect: missing `meta l4proto tcp counter redirect to :15001`"],
    );
}

/// A pod that excludes `ranges` from capture, with `--match-sets` and `args`.
fn match_sets_config(ranges: &str, args: &[(&str, &str)]) -> String {
    let mut all = vec![("match-sets", "true")];
    all.extend_from_slice(args);
    with_args(
        &config_for(&[("traffic.sidecar.istio.io/excludeOutboundIPRanges", ranges)]),
        &all,
    )
}

/// ADDs `config` to a fresh pod, requires CHECK to pass, changes the pod with `mutate`
/// (given the pod), and requires CHECK to fail naming each of what `expected` says (given
/// the pod, so it may name what ADD made there).
fn check_after_in(config: &str, mutate: impl Fn(&NetNs), expected: impl Fn(&NetNs) -> Vec<String>) {
    let ns = pod();
    let add = invoke(&ns, "ADD", config);
    assert_eq!(add.code, Some(0), "{add:?}");
    let clean = invoke(&ns, "CHECK", config);
    assert_eq!(clean.code, Some(0), "CHECK of an untouched pod: {clean:?}");
    let expected = expected(&ns);
    assert!(!expected.is_empty(), "a change CHECK should see");
    mutate(&ns);
    let error = cni_error(&invoke(&ns, "CHECK", config), 101);
    let details = error["details"].as_str().unwrap_or("");
    for drift in &expected {
        assert!(
            details.contains(drift.as_str()),
            "CHECK should name {drift:?}: {error}"
        );
    }
}

/// The pod's one ipset of meshinit's whose name holds `token` (`excl-nets4`...).
fn ipset_named(ns: &NetNs, token: &str) -> String {
    let names = ns.run(&["ipset", "list", "-n"]);
    let found: Vec<&str> = names
        .lines()
        .filter(|n| n.starts_with("meshinit-") && n.contains(token))
        .collect();
    match found.as_slice() {
        [name] => (*name).to_owned(),
        _ => panic!("not one {token} set in the pod: {names}"),
    }
}

#[test]
fn cni_check_compares_ipset_members() {
    if !require_root("cni_check_compares_ipset_members") {
        return;
    }
    let pod_config = config_for(&[
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "198.51.100.0/24,203.0.113.0/24",
        ),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "8200,8300"),
    ]);
    let config = with_args(&pod_config, &[("match-sets", "true")]);
    // Untouched, and after a foreign set comes and a rule of another tool names it.
    check_after(&config, &[], &[]);
    check_after(
        &config,
        &[
            &["ipset", "create", "foreign", "hash:net"],
            &["ipset", "add", "foreign", "192.0.2.0/24"],
        ],
        &[],
    );
    // The sets are the same whichever iptables the rules went in with.
    let legacy = with_args(
        &pod_config,
        &[("match-sets", "true"), ("force-iptables-binary", "legacy")],
    );
    check_after(&legacy, &[], &[]);
    // (configuration, the set's name token, `ipset` command and member, what CHECK says)
    let cases = [
        (
            &config,
            "excl-nets4",
            ["del", "203.0.113.0/24"],
            "missing member 203.0.113.0/24",
        ),
        (
            &config,
            "excl-nets4",
            ["flush", ""],
            "missing members 198.51.100.0/24, 203.0.113.0/24",
        ),
        (
            &config,
            "excl-nets4",
            ["add", "192.0.2.0/24"],
            "unexpected member 192.0.2.0/24",
        ),
        (
            &config,
            "excl-oports4",
            ["del", "8300"],
            "missing member 8300",
        ),
        (
            &legacy,
            "excl-oports4",
            ["flush", ""],
            "missing members 8200, 8300",
        ),
    ];
    for (config, token, [command, member], expected) in cases {
        check_after_in(
            config,
            |ns| {
                let set = ipset_named(ns, token);
                let mut argv = vec!["ipset", command, &set];
                argv.extend([member].iter().filter(|m| !m.is_empty()));
                ns.run(&argv);
            },
            |ns| vec![format!("ipset {}: {expected}", ipset_named(ns, token))],
        );
    }
}

#[test]
fn cni_check_compares_nftables_set_elements() {
    if !require_root("cni_check_compares_nftables_set_elements") {
        return;
    }
    let config = match_sets_config(
        "192.0.2.0/24,198.51.100.0/24,203.0.113.0/24",
        &[("native-nftables", "true")],
    );
    check_after(&config, &[], &[]);
    // The rule's set is anonymous and constant: the kernel refuses to change its
    // elements, so an edited set is the rule replaced, in its place, by one with other
    // elements (inserted in front of it, then it deleted: `nft replace` of a rule with an
    // interval set aborts in some nft versions).
    let edit = |elements: &'static str| {
        move |ns: &NetNs| {
            let handle = nft_handle(ns, "istio-proxy-nat", "istio-output", "ip daddr {");
            let rule = format!("ip daddr {{ {elements} }} counter return");
            let at = ["inet", "istio-proxy-nat", "istio-output", "handle", &handle];
            let mut insert = vec!["nft", "insert", "rule"];
            insert.extend(at);
            insert.push(&rule);
            ns.run(&insert);
            let mut delete = vec!["nft", "delete", "rule"];
            delete.extend(at);
            ns.run(&delete);
        }
    };
    let set = "nftables inet istio-proxy-nat chain istio-output: set 1 of `ip daddr { … } counter return`";
    check_after_in(&config, edit("192.0.2.0/24, 198.51.100.0/24"), |_| {
        vec![format!("{set}: missing member 203.0.113.0/24")]
    });
    check_after_in(
        &config,
        edit("192.0.2.128/25, 198.51.100.0/24, 203.0.113.0/24"),
        |_| {
            vec![format!(
                "{set}: missing member 192.0.2.0/24; unexpected member 192.0.2.128/25"
            )]
        },
    );
}

/// The handle of the rule in `chain` of `table` whose listing contains `rule`.
fn nft_handle(ns: &NetNs, table: &str, chain: &str, rule: &str) -> String {
    let listing = ns.run(&["nft", "-a", "list", "chain", "inet", table, chain]);
    listing
        .lines()
        .find(|l| l.contains(rule))
        .and_then(|l| l.rsplit_once("# handle "))
        .map(|(_, handle)| handle.trim().to_owned())
        .unwrap_or_else(|| panic!("no rule {rule:?} in {table} {chain}:\n{listing}"))
}

#[test]
fn cni_check_names_what_drifted_in_native_nftables() {
    if !require_root("cni_check_names_what_drifted_in_native_nftables") {
        return;
    }
    let config = tproxy_pod_config(&[("native-nftables", "true")]);
    for (chain, rule, expected) in [
        (
            "istio-output",
            "ip daddr 127.0.0.1 counter",
            "nftables inet istio-proxy-nat chain istio-output: missing `ip daddr 127.0.0.1 counter return`",
        ),
        (
            "output",
            "jump istio-output",
            "nftables inet istio-proxy-nat chain output: missing `counter jump istio-output`",
        ),
    ] {
        let ns = pod();
        assert_eq!(invoke(&ns, "ADD", &config).code, Some(0));
        let clean = invoke(&ns, "CHECK", &config);
        assert_eq!(clean.code, Some(0), "{clean:?}");
        let handle = nft_handle(&ns, "istio-proxy-nat", chain, rule);
        ns.run(&["nft", "delete", "rule", "inet", "istio-proxy-nat", chain, "handle", &handle]);
        let error = cni_error(&invoke(&ns, "CHECK", &config), 101);
        assert!(
            error["details"].as_str().unwrap_or("").contains(expected),
            "{error}"
        );
    }
    check_after(
        &config,
        &[&["ip", "rule", "del", "fwmark", "0x539", "lookup", "133"]],
        &["ipv4 routing: missing `ip rule fwmark 1337 lookup 133`"],
    );
    // Another tool's table, iptables rules and routing are not the pod's drift.
    check_after(
        &config,
        &[
            &["nft", "add", "table", "inet", "foreign"],
            &[
                "nft",
                "add",
                "chain",
                "inet",
                "foreign",
                "out",
                "{ type filter hook output priority 0; }",
            ],
            &[
                "nft",
                "add",
                "rule",
                "inet",
                "foreign",
                "out",
                "ip daddr 198.51.100.9 counter accept",
            ],
            &[
                "iptables-nft",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                "198.51.100.9",
                "-j",
                "ACCEPT",
            ],
            &["ip", "rule", "add", "fwmark", "7", "lookup", "77"],
        ],
        &[],
    );
}

#[test]
fn cni_check_ignores_other_tools_rules() {
    if !require_root("cni_check_ignores_other_tools_rules") {
        return;
    }
    check_after(
        &tproxy_pod_config(&[]),
        &[
            &[
                "iptables-nft",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                "198.51.100.9",
                "-j",
                "ACCEPT",
            ],
            &[
                "iptables-nft",
                "-t",
                "nat",
                "-I",
                "PREROUTING",
                "1",
                "-s",
                "203.0.113.0/24",
                "-j",
                "RETURN",
            ],
            &["iptables-nft", "-t", "nat", "-N", "FOREIGN"],
            &["iptables-nft", "-t", "nat", "-A", "FOREIGN", "-j", "RETURN"],
            &[
                "iptables-nft",
                "-t",
                "nat",
                "-I",
                "OUTPUT",
                "1",
                "-j",
                "FOREIGN",
            ],
            &[
                "iptables-nft",
                "-t",
                "mangle",
                "-A",
                "OUTPUT",
                "-p",
                "udp",
                "-j",
                "MARK",
                "--set-mark",
                "7",
            ],
            &[
                "iptables-nft",
                "-A",
                "INPUT",
                "-s",
                "203.0.113.5",
                "-j",
                "DROP",
            ],
            &["ip", "rule", "add", "fwmark", "7", "lookup", "77"],
            &[
                "ip", "route", "add", "local", "default", "dev", "lo", "table", "77",
            ],
        ],
        &[],
    );
}

/// Whether any rule or chain of meshinit's is in `ns`, on either iptables backend.
fn holds_capture_rules(ns: &NetNs) -> bool {
    ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .any(|save| ns.run(&[save]).contains("ISTIO_"))
        || ns.run(&["nft", "list", "tables"]).contains("istio-proxy")
}

#[test]
fn cni_refuses_the_node_namespace() {
    if !require_root("cni_refuses_the_node_namespace") {
        return;
    }
    // The plugin runs inside `node`, a namespace of the test's: refusing must keep the
    // rules out of it, and a failure to refuse lands there, never on the real node.
    let node = NetNs::new("cninode");
    node.run(&["ip", "link", "set", "lo", "up"]);
    // An address, so that a plugin that failed to refuse would get as far as installing.
    node.run(&["ip", "addr", "add", "192.0.2.3/24", "dev", "lo"]);
    let in_node = ["ip", "netns", "exec", node.name()];
    let bind_mount = format!("/var/run/netns/{}", node.name());
    let config = tproxy_pod_config(&[]);
    for netns in [
        "/proc/self/ns/net",
        "/proc/thread-self/ns/net",
        "/proc/self/../self/ns/net",
        bind_mount.as_str(),
    ] {
        for command in ["ADD", "CHECK", "DEL"] {
            let result = invoke_with(&in_node, netns, command, config.as_bytes());
            let error = cni_error(&result, 4);
            assert!(
                error["msg"]
                    .as_str()
                    .unwrap_or("")
                    .contains("node's network namespace"),
                "{command} with CNI_NETNS={netns}: {error}"
            );
        }
    }
    assert!(
        !holds_capture_rules(&node),
        "rules were added to the plugin's own namespace"
    );

    // init's namespace, reached through `..`: in a PID namespace whose init (a shell) stays
    // in `init`, another namespace of the test's, while the plugin runs in `node`.
    let init = NetNs::new("cniinit");
    init.run(&["ip", "link", "set", "lo", "up"]);
    init.run(&["ip", "addr", "add", "192.0.2.4/24", "dev", "lo"]);
    let as_init = [
        "ip",
        "netns",
        "exec",
        init.name(),
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        "sh",
        "-c",
        // Not exec'd, so the shell stays PID 1; the plugin is its child.
        "ip netns exec \"$0\" \"$1\"; exit $?",
        node.name(),
    ];
    let seen = init.run(&[
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        "sh",
        "-c",
        "stat -L -c %d:%i /proc/1/ns/net; exit $?",
    ]);
    let expected = std::process::Command::new("stat")
        .args([
            "-L",
            "-c",
            "%d:%i",
            &format!("/var/run/netns/{}", init.name()),
        ])
        .output()
        .expect("stat");
    assert_eq!(
        seen.trim(),
        String::from_utf8_lossy(&expected.stdout).trim(),
        "PID 1's namespace is init's"
    );
    let result = invoke_with(&as_init, "/proc/self/../1/ns/net", "ADD", config.as_bytes());
    let error = cni_error(&result, 4);
    assert!(
        error["details"]
            .as_str()
            .unwrap_or("")
            .contains("/proc/1/ns/net"),
        "{error}"
    );
    assert!(
        !holds_capture_rules(&init),
        "rules were added to init's namespace"
    );
    assert!(
        !holds_capture_rules(&node),
        "rules were added to the plugin's own namespace"
    );
}

#[test]
fn cni_answers_any_stdin_with_error_json() {
    if !require_root("cni_answers_any_stdin_with_error_json") {
        return;
    }
    let ns = pod();
    let netns = format!("/var/run/netns/{}", ns.name());
    let valid = tproxy_pod_config(&[]);
    // A valid configuration but for one byte inside a string: only the encoding is wrong.
    let mut not_utf8 = valid.clone().into_bytes();
    let at = valid
        .find("8200")
        .expect("the exclude in the configuration");
    not_utf8[at] = 0xff;
    let huge = [
        b"{\"cniVersion\":\"1.0.0\",\"x\":\"".as_slice(),
        &vec![b'a'; 8 << 20],
        b"\"}",
    ]
    .concat();
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        ("not UTF-8", not_utf8, 6),
        ("empty", Vec::new(), 6),
        ("huge", huge, 6),
        ("not JSON", b"{\"cniVersion\": \"1.0.0\",".to_vec(), 6),
        (
            "wrong type",
            br#"{"cniVersion":"1.0.0","exclude_namespaces":{"a":1}}"#.to_vec(),
            7,
        ),
    ];
    for (what, stdin, code) in cases {
        for command in ["ADD", "CHECK", "DEL"] {
            let result = invoke_with(&[], &netns, command, &stdin);
            let error = cni_error(&result, code);
            assert_eq!(error["cniVersion"], "1.0.0", "{what}, {command}: {error}");
        }
    }
    assert!(!holds_capture_rules(&ns), "malformed input installed rules");
}
