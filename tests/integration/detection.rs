//! Which iptables backend meshinit chooses in a namespace that another tool (a CNI plugin,
//! an older version, a failed attempt) already touched: iptables-legacy only when a legacy
//! table holds rules, not because empty legacy tables exist (docs/design.md, "Choosing the
//! backend"). Real namespaces, real tables; as root.

use crate::support::meshinit::{apply, dump_rules};
use crate::support::netns::NetNs;
use crate::support::{injector_args, require_root};

/// Which backend holds meshinit's rules in `ns` (both families), and that the other holds
/// none.
fn backend_holding_rules(test: &str, ns: &NetNs) -> &'static str {
    let holds = |backend: &str| {
        ["iptables", "ip6tables"].iter().all(|family| {
            ns.run(&[&format!("{family}-{backend}-save")])
                .contains("-j ISTIO_OUTPUT")
        })
    };
    match (holds("legacy"), holds("nft")) {
        (true, false) => "legacy",
        (false, true) => "nft",
        _ => panic!(
            "{test}: expected the rules in one backend:\n{}",
            dump_rules(ns)
        ),
    }
}

/// A fresh namespace of `role`, prepared by `setup` (iptables-legacy commands), then
/// meshinit's default choice for both families: the backend that took its rules.
fn chosen_after(test: &str, role: &str, setup: &[&[&str]]) -> Option<&'static str> {
    if !require_root(test) {
        return None;
    }
    let ns = NetNs::new(role);
    for command in setup {
        ns.run(command);
    }
    apply(&ns, &injector_args(&["--ipv6=true"]), &[]);
    Some(backend_holding_rules(test, &ns))
}

/// An `iptables-legacy -L` (or a rolled-back attempt) leaves empty legacy tables, in
/// both families: on a kernel without `iptable_nat` choosing legacy for them would fail
/// every time, so they are no reason to.
#[test]
fn empty_legacy_tables_do_not_choose_legacy() {
    let mut setup: Vec<[&str; 5]> = Vec::new();
    for tool in ["iptables-legacy", "ip6tables-legacy"] {
        for table in ["filter", "mangle", "nat", "raw"] {
            setup.push([tool, "-t", table, "-L", "-n"]);
        }
    }
    let setup: Vec<&[&str]> = setup.iter().map(|c| &c[..]).collect();
    let test = "empty_legacy_tables_do_not_choose_legacy";
    if let Some(chosen) = chosen_after(test, "detect-empty", &setup) {
        assert_eq!(chosen, "nft", "{test}");
    }
}

/// A legacy table holding someone's rule (here, one IPv6 rule in filter, beside an empty
/// IPv4 mangle table): meshinit follows it, as Istio does, for both families.
#[test]
fn legacy_rules_choose_legacy() {
    let test = "legacy_rules_choose_legacy";
    let setup: [&[&str]; 2] = [
        &["iptables-legacy", "-t", "mangle", "-L", "-n"],
        &[
            "ip6tables-legacy",
            "-A",
            "INPUT",
            "-p",
            "ipv6-icmp",
            "-j",
            "ACCEPT",
        ],
    ];
    if let Some(chosen) = chosen_after(test, "detect-rules", &setup) {
        assert_eq!(chosen, "legacy", "{test}");
    }
}

/// A chain of someone's, with no rule in it, counts too.
#[test]
fn legacy_user_chain_chooses_legacy() {
    let test = "legacy_user_chain_chooses_legacy";
    let setup: [&[&str]; 1] = [&["iptables-legacy", "-t", "nat", "-N", "CNI-HOSTPORT-DNAT"]];
    if let Some(chosen) = chosen_after(test, "detect-chain", &setup) {
        assert_eq!(chosen, "legacy", "{test}");
    }
}
