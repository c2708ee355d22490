//! Real traffic through meshinit's rules, in throwaway namespaces: each scenario applies a
//! configuration to a pod, opens real connections from the app, the proxy, a peer or a VM,
//! and checks which listener answered and what it saw as the original destination, the
//! way Istio's own rules behave.
//!
//! Every scenario runs on every backend (`Backend`): iptables, iptables with `--match-sets`
//! (lists as ipsets), and Istio's native nftables tables (`--native-nftables`) programmed
//! over netlink, through `nft -f`, and over netlink with `--match-sets` (lists as nftables
//! sets). The scenarios' lists have several entries so that sets are made, and a test with
//! `--match-sets` checks that the rules it left do use sets. `meshinit explain` must agree
//! with the kernel on all of them.
//!
//! Needs root: skips with a reason otherwise, fails under `CI=true`.

use crate::support::lab::Client::{App, AppGid, Peer, Proxy, Vm};
use crate::support::lab::{tcp, udp, Check, Expect, Lab, Setup, Sidecar};
use crate::support::meshinit::dump_rules;
use crate::support::require_root;
use crate::support::topology::VM_IFACE;

/// "Vault": a service outside the mesh, on the peer.
const VAULT: &str = "198.51.100.30:8200";
const VAULT_8300: &str = "198.51.100.30:8300";
/// Another remote service, outside 198.51.100.0/24.
const OTHER: &str = "203.0.113.10:8200";
const POD_8080: &str = "192.0.2.2:8080";
const DNS_SERVER: &str = "192.0.2.1:53";
const OTHER_DNS_SERVER: &str = "203.0.113.53:53";

/// Istio's injector arguments, as (flag, value).
const INJECTOR_ARGS: [(&str, &str); 8] = [
    ("-p", "15001"),
    ("-z", "15006"),
    ("-u", "1337"),
    ("-m", "REDIRECT"),
    ("-i", "*"),
    ("-x", ""),
    ("-b", "*"),
    ("-d", "15090,15021,15020"),
];

/// The injector's arguments, IPv4 only and no DNS servers from the host's resolv.conf,
/// then `overrides` (a repeated flag takes the last value, as with Istio's pflag).
fn istio_args(overrides: &[&str]) -> Vec<String> {
    let host_independent = ["--no-ipv6", "--dns-servers", ""];
    let injector = INJECTOR_ARGS
        .iter()
        .flat_map(|(flag, value)| [*flag, *value]);
    host_independent
        .into_iter()
        .chain(injector)
        .chain(overrides.iter().copied())
        .map(String::from)
        .collect()
}

/// Where a scenario's rules go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// iptables, on the backend detected (or forced) as Istio does.
    Iptables,
    /// The same with `--match-sets`: lists as ipsets.
    IptablesSets,
    /// Istio's native nftables tables, `--native-nftables`, in one netlink batch (netlink
    /// only: a fallback to nft would fail the test).
    Nftables,
    /// The same through `nft -f`.
    NftablesViaNft,
    /// Over netlink, with `--match-sets`.
    NftablesSets,
}

impl Backend {
    /// `istio_args(overrides)`, on this backend.
    fn args(self, overrides: &[&str]) -> Vec<String> {
        let mut args = istio_args(overrides);
        let extra: &[&str] = match self {
            Backend::Iptables => &[],
            Backend::IptablesSets => &["--match-sets"],
            Backend::Nftables => &["--native-nftables", "--nftables-apply=netlink"],
            Backend::NftablesViaNft => &["--native-nftables", "--nftables-apply=nft"],
            Backend::NftablesSets => &[
                "--native-nftables",
                "--nftables-apply=netlink",
                "--match-sets",
            ],
        };
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    fn is_nftables(self) -> bool {
        !matches!(self, Backend::Iptables | Backend::IptablesSets)
    }
}

/// For each scenario, a module of a test per backend (`iptables`, `iptables_match_sets`,
/// `native_nftables`, `native_nftables_via_nft`, `native_nftables_match_sets`), each
/// running `scenario(test name, backend)` (e.g. `e2e::dns_capture::native_nftables`).
macro_rules! on_every_backend {
    ($($scenario:ident,)*) => {
        $(
            mod $scenario {
                use super::Backend;

                #[test]
                fn iptables() {
                    super::$scenario(
                        concat!(stringify!($scenario), "::iptables"),
                        Backend::Iptables,
                    );
                }

                #[test]
                fn iptables_match_sets() {
                    super::$scenario(
                        concat!(stringify!($scenario), "::iptables_match_sets"),
                        Backend::IptablesSets,
                    );
                }

                #[test]
                fn native_nftables() {
                    super::$scenario(
                        concat!(stringify!($scenario), "::native_nftables"),
                        Backend::Nftables,
                    );
                }

                #[test]
                fn native_nftables_via_nft() {
                    super::$scenario(
                        concat!(stringify!($scenario), "::native_nftables_via_nft"),
                        Backend::NftablesViaNft,
                    );
                }

                #[test]
                fn native_nftables_match_sets() {
                    super::$scenario(
                        concat!(stringify!($scenario), "::native_nftables_match_sets"),
                        Backend::NftablesSets,
                    );
                }
            }
        )*
    };
}

/// Captured by the sidecar's outbound listener, original destination kept.
fn outbound(orig: &'static str) -> Expect {
    Expect::Captured { port: 15001, orig }
}

/// Captured by the sidecar's inbound listener (REDIRECT).
fn inbound(orig: &'static str) -> Expect {
    Expect::Captured { port: 15006, orig }
}

/// Answered by the peer itself on `local`: not captured.
fn peer(local: &'static str) -> Expect {
    Expect::Direct {
        name: "peer",
        local,
    }
}

/// Answered by the pod's app itself on `local`: not captured.
fn app(local: &'static str) -> Expect {
    Expect::Direct { name: "app", local }
}

/// Runs each case in a lab of its own (fresh namespaces), all at once.
fn run(test: &str, cases: &[(Setup<'_>, &[Check])]) {
    if !require_root(test) {
        return;
    }
    // A case that fails panics in its thread (printing its report); the scope then panics.
    std::thread::scope(|scope| {
        for (setup, checks) in cases {
            scope.spawn(move || {
                let lab = Lab::start(setup);
                expect_sets_if_asked(test, &lab, &setup.args);
                lab.check(checks);
            });
        }
    });
}

/// With `--match-sets`, the pod's rules must look lists up in sets: otherwise the traffic
/// checks would pass on plain chains (a kernel without ipset falls back to them).
fn expect_sets_if_asked(test: &str, lab: &Lab, args: &[String]) {
    if !args.iter().any(|a| a == "--match-sets") {
        return;
    }
    let rules = dump_rules(lab.pod());
    let used = if args.iter().any(|a| a == "--native-nftables") {
        rules.contains(" { ")
    } else {
        rules.contains("-m set --match-set meshinit-")
    };
    assert!(
        used,
        "{test}: --match-sets but no set in the rules:\n{rules}"
    );
}

/// A test of a single configuration.
fn run_one(test: &str, setup: Setup<'_>, checks: &[Check]) {
    run(test, &[(setup, checks)]);
}

/// The injector's defaults, on `backend` (for iptables, the binary `forced`; None:
/// detected). The backend used must hold the rules, and the others none.
fn default_redirect(test: &str, backend: Backend, forced: Option<&str>) {
    if !require_root(test) {
        return;
    }
    let forced_args: Vec<&str> = forced
        .map(|binary| vec!["--force-iptables-binary", binary])
        .unwrap_or_default();
    let lab_args = backend.args(&forced_args);
    let lab = Lab::start(&Setup::new(lab_args.clone()));
    lab.check(&[
        tcp(App, VAULT, outbound(VAULT)),
        tcp(Proxy, VAULT, peer(VAULT)),
        tcp(Peer, POD_8080, inbound(POD_8080)),
        tcp(Peer, "192.0.2.2:15021", app("192.0.2.2:15021")),
        tcp(App, "127.0.0.1:9090", app("127.0.0.1:9090")),
    ]);
    expect_sets_if_asked(test, &lab, &lab_args);
    if !backend.is_nftables() && forced.is_none() {
        return;
    }
    for candidate in ["legacy", "nft"] {
        let saved = lab.pod().run(&[&format!("iptables-{candidate}-save")]);
        assert_eq!(
            saved.contains("-j ISTIO_OUTPUT"),
            forced == Some(candidate),
            "{test}: rules in iptables-{candidate}:\n{saved}"
        );
    }
    let tables = lab.pod().run(&["nft", "list", "tables"]);
    assert_eq!(
        tables.contains("table inet istio-proxy-nat"),
        backend.is_nftables(),
        "{test}: nftables tables:\n{tables}"
    );
}

#[test]
fn default_redirect_detected_backend() {
    default_redirect("default_redirect_detected_backend", Backend::Iptables, None);
}

#[test]
fn default_redirect_legacy() {
    default_redirect("default_redirect_legacy", Backend::Iptables, Some("legacy"));
}

#[test]
fn default_redirect_nft() {
    default_redirect("default_redirect_nft", Backend::Iptables, Some("nft"));
}

#[test]
fn default_redirect_match_sets() {
    default_redirect("default_redirect_match_sets", Backend::IptablesSets, None);
}

#[test]
fn default_redirect_native_nftables() {
    default_redirect("default_redirect_native_nftables", Backend::Nftables, None);
}

#[test]
fn default_redirect_native_nftables_via_nft() {
    default_redirect(
        "default_redirect_native_nftables_via_nft",
        Backend::NftablesViaNft,
        None,
    );
}

#[test]
fn default_redirect_native_nftables_match_sets() {
    default_redirect(
        "default_redirect_native_nftables_match_sets",
        Backend::NftablesSets,
        None,
    );
}

/// The `include` flags capture `chosen` and leave `other` alone; `exclude` does the reverse.
fn include_then_exclude(
    test: &str,
    backend: Backend,
    include: &[&str],
    exclude: &[&str],
    chosen: &'static str,
    other: &'static str,
) {
    run(
        test,
        &[
            (
                Setup::new(backend.args(include)),
                &[
                    tcp(App, chosen, outbound(chosen)),
                    tcp(App, other, peer(other)),
                ],
            ),
            (
                Setup::new(backend.args(exclude)),
                &[
                    tcp(App, chosen, peer(chosen)),
                    tcp(App, other, outbound(other)),
                ],
            ),
        ],
    );
}

/// Lists of several entries, so that `--match-sets` makes sets of them (the others are
/// documentation ranges no connection goes to).
fn outbound_cidrs_include_and_exclude(test: &str, backend: Backend) {
    include_then_exclude(
        test,
        backend,
        &["-i", "192.0.2.128/25,198.51.100.0/24,203.0.113.128/26"],
        &["-x", "192.0.2.128/25,198.51.100.30/32,203.0.113.128/26"],
        VAULT,
        OTHER,
    );
}

fn outbound_ports_include_and_exclude(test: &str, backend: Backend) {
    include_then_exclude(
        test,
        backend,
        &["-i", "", "-q", "8100,8200,8250"],
        &["-o", "8100,8200,8250"],
        VAULT,
        VAULT_8300,
    );
}

fn inbound_ports_include(test: &str, backend: Backend) {
    run_one(
        test,
        Setup::new(backend.args(&["-b", "8080,8443,9443"])),
        &[
            tcp(Peer, POD_8080, inbound(POD_8080)),
            tcp(Peer, "192.0.2.2:8081", app("192.0.2.2:8081")),
        ],
    );
}

fn tproxy_inbound_keeps_client_address(test: &str, backend: Backend) {
    run_one(
        test,
        Setup::new(backend.args(&["-m", "TPROXY"])).sidecar(Sidecar::Tproxy),
        &tproxy_checks(),
    );
}

/// Under TPROXY: inbound reaches the sidecar with the client's address; the status port
/// and the proxy's own traffic are not captured; the app's outbound is.
fn tproxy_checks() -> [Check; 4] {
    [
        tcp(
            Peer,
            POD_8080,
            Expect::Transparent {
                port: 15006,
                local: POD_8080,
                client_ip: "192.0.2.1",
            },
        ),
        tcp(Peer, "192.0.2.2:15021", app("192.0.2.2:15021")),
        tcp(App, VAULT, outbound(VAULT)),
        tcp(Proxy, VAULT, peer(VAULT)),
    ]
}

/// TPROXY with a mark and routing table of the pod's own (`-t 4242 -r 1000`, issue 20): real
/// connections are captured as with Istio's defaults, and the routing that delivers them is
/// that mark's rule and that table's route, with nothing left on Istio's default 1337/133.
fn tproxy_with_its_own_mark_and_table(test: &str, backend: Backend) {
    if !require_root(test) {
        return;
    }
    let setup = Setup::new(backend.args(&["-m", "TPROXY", "-t", "4242", "-r", "1000"]))
        .sidecar(Sidecar::Tproxy);
    let lab = Lab::start(&setup);
    lab.check(&tproxy_checks());
    let rules = lab.pod().run(&["ip", "-4", "rule", "show"]);
    // 4242 is 0x1092.
    assert!(
        rules.contains("fwmark 0x1092 lookup 1000"),
        "{test}: no rule for mark 4242 to table 1000:\n{rules}"
    );
    assert!(
        !rules.contains("0x539") && !rules.contains("lookup 133"),
        "{test}: Istio's default mark or table in use:\n{rules}"
    );
    let table = lab
        .pod()
        .run(&["ip", "-4", "route", "show", "table", "1000"]);
    assert!(
        table.contains("local default dev lo"),
        "{test}: table 1000 does not deliver locally:\n{table}"
    );
    let all = lab
        .pod()
        .run(&["ip", "-4", "route", "show", "table", "all"]);
    assert!(
        !all.contains("table 133"),
        "{test}: routes in Istio's default table 133:\n{all}"
    );
}

fn ipv6_dual_stack(test: &str, backend: Backend) {
    const PEER6: &str = "[2001:db8::1]:8200";
    const POD6_8080: &str = "[2001:db8::2]:8080";
    run_one(
        test,
        Setup::new(backend.args(&["--dual-stack", "--ipv6"])),
        &[
            tcp(App, PEER6, outbound(PEER6)),
            tcp(Proxy, PEER6, peer(PEER6)),
            tcp(Peer, POD6_8080, inbound(POD6_8080)),
            tcp(App, VAULT, outbound(VAULT)),
        ],
    );
}

fn dns_capture(test: &str, backend: Backend) {
    run(
        test,
        &[
            (
                Setup::new(backend.args(&["--redirect-dns", "--dns-servers", "192.0.2.1"])),
                &[
                    udp(App, DNS_SERVER, Expect::DnsProxy),
                    tcp(
                        App,
                        DNS_SERVER,
                        Expect::Captured {
                            port: 15053,
                            orig: DNS_SERVER,
                        },
                    ),
                    udp(Proxy, DNS_SERVER, peer(DNS_SERVER)),
                    // Not a configured server: left alone.
                    udp(App, OTHER_DNS_SERVER, peer(OTHER_DNS_SERVER)),
                ],
            ),
            (
                Setup::new(backend.args(&[
                    "--redirect-dns",
                    "--capture-all-dns",
                    "--dns-servers",
                    "192.0.2.1",
                ])),
                &[
                    udp(App, OTHER_DNS_SERVER, Expect::DnsProxy),
                    udp(Proxy, OTHER_DNS_SERVER, peer(OTHER_DNS_SERVER)),
                ],
            ),
        ],
    );
}

fn exclude_interface(test: &str, backend: Backend) {
    run_one(
        test,
        Setup::new(backend.args(&["-c", crate::support::topology::POD_IFACE])),
        &[
            tcp(App, VAULT, peer(VAULT)),
            tcp(Peer, POD_8080, app(POD_8080)),
        ],
    );
}

fn kube_virt_interface_traffic_is_outbound(test: &str, backend: Backend) {
    run(
        test,
        &[
            (
                Setup::new(backend.args(&["-k", VM_IFACE])).with_vm(),
                &[tcp(Vm, VAULT, outbound(VAULT))],
            ),
            // Without -k, the VM's traffic is just inbound TCP to the pod.
            (
                Setup::new(backend.args(&[])).with_vm(),
                &[tcp(Vm, VAULT, inbound(VAULT))],
            ),
        ],
    );
}

fn outbound_owner_groups(test: &str, backend: Backend) {
    run(
        test,
        &[
            (
                Setup::new(backend.args(&[])).env(&[("ISTIO_OUTBOUND_OWNER_GROUPS", "2000")]),
                &[
                    tcp(AppGid(2000), VAULT, outbound(VAULT)),
                    tcp(AppGid(3000), VAULT, peer(VAULT)),
                ],
            ),
            (
                Setup::new(backend.args(&[]))
                    .env(&[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "3000")]),
                &[
                    tcp(AppGid(3000), VAULT, peer(VAULT)),
                    tcp(AppGid(2000), VAULT, outbound(VAULT)),
                ],
            ),
        ],
    );
}

/// The longest owner-group include list each backend can load (49 groups for iptables,
/// 63 for nftables; see `MAX_OWNER_GROUPS_INCLUDE_*`), applied and judged by real traffic:
/// the first and the last group listed are captured, a group not listed goes direct.
fn owner_groups_at_the_backends_limit(test: &str, backend: Backend) {
    let limit: u32 = if backend.is_nftables() { 63 } else { 49 };
    let groups: Vec<String> = (2000..2000 + limit).map(|gid| gid.to_string()).collect();
    let groups = groups.join(",");
    let env = [("ISTIO_OUTBOUND_OWNER_GROUPS", groups.as_str())];
    run(
        test,
        &[(
            Setup::new(backend.args(&[])).env(&env),
            &[
                tcp(AppGid(2000), VAULT, outbound(VAULT)),
                tcp(AppGid(2000 + limit - 1), VAULT, outbound(VAULT)),
                tcp(AppGid(3000), VAULT, peer(VAULT)),
            ],
        )],
    );
}

/// An app init container runs before the sidecar: with the rules in place its connection to
/// Vault goes nowhere, unless Vault is excluded by port or address, or it runs as the proxy.
fn app_init_container_without_sidecar(test: &str, backend: Backend) {
    let no_sidecar =
        |overrides: &[&str]| Setup::new(backend.args(overrides)).sidecar(Sidecar::Absent);
    run(
        test,
        &[
            (
                no_sidecar(&[]),
                &[
                    tcp(App, VAULT, Expect::Fails),
                    tcp(Proxy, VAULT, peer(VAULT)),
                ],
            ),
            (
                no_sidecar(&["-o", "8100,8200"]),
                &[tcp(App, VAULT, peer(VAULT))],
            ),
            (
                no_sidecar(&["-x", "198.51.100.30/32,203.0.113.128/26"]),
                &[tcp(App, VAULT, peer(VAULT))],
            ),
        ],
    );
}

/// Port ranges (meshinit's superset of Istio's lists): each list captures or leaves alone
/// exactly the range, judged at its edges (a-1, a, b, b+1). Each list has a second entry,
/// so that `--match-sets` makes a set holding the range.
fn port_ranges(test: &str, backend: Backend) {
    const VAULT_8199: &str = "198.51.100.30:8199";
    const VAULT_8301: &str = "198.51.100.30:8301";
    run(
        test,
        &[
            (
                Setup::new(backend.args(&["-o", "8100,8200-8300"])),
                &[
                    tcp(App, VAULT_8199, outbound(VAULT_8199)),
                    tcp(App, VAULT, peer(VAULT)),
                    tcp(App, VAULT_8300, peer(VAULT_8300)),
                    tcp(App, VAULT_8301, outbound(VAULT_8301)),
                ],
            ),
            (
                Setup::new(backend.args(&["-i", "", "-q", "8200-8300,8100"])),
                &[
                    tcp(App, VAULT_8199, peer(VAULT_8199)),
                    tcp(App, VAULT, outbound(VAULT)),
                    tcp(App, VAULT_8300, outbound(VAULT_8300)),
                    tcp(App, VAULT_8301, peer(VAULT_8301)),
                ],
            ),
            (
                Setup::new(backend.args(&["-b", "8080-8081,9443"])),
                &[
                    tcp(Peer, "192.0.2.2:8079", app("192.0.2.2:8079")),
                    tcp(Peer, POD_8080, inbound(POD_8080)),
                    tcp(Peer, "192.0.2.2:8081", inbound("192.0.2.2:8081")),
                    tcp(Peer, "192.0.2.2:8082", app("192.0.2.2:8082")),
                ],
            ),
            (
                Setup::new(backend.args(&["-d", "15090,8080-8081"])),
                &[
                    tcp(Peer, "192.0.2.2:8079", inbound("192.0.2.2:8079")),
                    tcp(Peer, POD_8080, app(POD_8080)),
                    tcp(Peer, "192.0.2.2:8081", app("192.0.2.2:8081")),
                    tcp(Peer, "192.0.2.2:8082", inbound("192.0.2.2:8082")),
                ],
            ),
            (
                Setup::new(backend.args(&["-m", "TPROXY", "-b", "8080-8081,9443"]))
                    .sidecar(Sidecar::Tproxy),
                &[
                    tcp(Peer, "192.0.2.2:8079", app("192.0.2.2:8079")),
                    tcp(
                        Peer,
                        "192.0.2.2:8081",
                        Expect::Transparent {
                            port: 15006,
                            local: "192.0.2.2:8081",
                            client_ip: "192.0.2.1",
                        },
                    ),
                    tcp(Peer, "192.0.2.2:8082", app("192.0.2.2:8082")),
                ],
            ),
        ],
    );
}

on_every_backend! {
    port_ranges,
    outbound_cidrs_include_and_exclude,
    outbound_ports_include_and_exclude,
    inbound_ports_include,
    tproxy_inbound_keeps_client_address,
    tproxy_with_its_own_mark_and_table,
    ipv6_dual_stack,
    dns_capture,
    exclude_interface,
    kube_virt_interface_traffic_is_outbound,
    outbound_owner_groups,
    owner_groups_at_the_backends_limit,
    app_init_container_without_sidecar,
}
