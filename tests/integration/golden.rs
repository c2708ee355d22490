//! Parity with Istio: every case of Istio's own `istio-iptables` golden tests, run through
//! meshinit's CLI and compared as rulesets (chains as they stand once the input is applied).
//!
//! Three checks per case:
//! - meshinit's output equals the project's expected file (`tests/golden/iptables/`), a
//!   regression test; `MESHINIT_UPDATE_GOLDEN=1` rewrites the files.
//! - that output, replayed, equals Istio's golden replayed (`tests/golden/istio/iptables/`,
//!   copied from Istio with its provenance in `tests/golden/istio/README.md`).
//! - as root: both loaded into fresh network namespaces, on both backends, give the same
//!   `iptables-save` (`kernel_parity` below).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use crate::support::groups::GroupOverlay;

/// (case, extra environment, meshinit args). The base of every Istio case is proxy uid and
/// gid 1337, IPv6 off, no inbound or outbound capture; IPv6 and DNS servers are explicit so
/// nothing depends on the machine running the test.
pub type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
);

#[rustfmt::skip]
pub const CASES: &[Case] = &[
    ("ipv6-empty-inbound-ports", &[], &["-b", "", "--ipv6"]),
    ("ip-range", &[], &["-x", "1.1.0.0/16", "-i", "9.9.0.0/16", "--redirect-dns", "--no-ipv6", "-g", "1,2", "-u", "3,4", "--dns-servers", "127.0.0.53"]),
    ("tproxy", &[], &["-m", "TPROXY", "-b", "*", "-x", "1.1.0.0/16", "-i", "9.9.0.0/16", "--redirect-dns", "--dns-servers", "127.0.0.53", "-g", "1337", "-u", "1337", "-c", "not-istio-nic", "--ipv6"]),
    ("ipv6-inbound-ports", &[], &["-b", "4000,5000", "--ipv6"]),
    ("ipv6-virt-interfaces", &[], &["-b", "4000,5000", "-k", "eth0,eth1", "--ipv6"]),
    ("ipv6-ipnets", &[], &["-b", "4000,5000", "-d", "6000,7000,", "-k", "eth0,eth1", "-x", "2001:db8::/32", "-i", "2001:db8::/32", "--ipv6"]),
    ("ipv6-uid-gid", &[], &["-b", "4000,5000", "-d", "6000,7000", "-k", "eth0,eth1", "-g", "1,2", "-u", "3,4", "--ipv6", "-x", "2001:db8::/32", "-i", "2001:db8::/32"]),
    ("ipv6-outbound-ports", &[], &["-b", "", "-q", "32000,31000", "--ipv6"]),
    ("empty", &[], &[]),
    ("kube-virt-interfaces", &[], &["-k", "eth1,eth2", "-i", "*"]),
    ("ipnets", &[], &["-i", "10.0.0.0/8"]),
    ("ipnets-with-kube-virt-interfaces", &[], &["-k", "eth1,eth2", "-i", "10.0.0.0/8"]),
    ("inbound-ports-include", &[], &["-b", "32000,31000"]),
    ("inbound-ports-wildcard", &[], &["-b", "*"]),
    ("inbound-ports-tproxy", &[], &["-b", "32000,31000", "-m", "TPROXY"]),
    ("inbound-ports-wildcard-tproxy", &[], &["-b", "*", "-m", "TPROXY"]),
    ("dns-uid-gid", &[], &["--redirect-dns", "--dns-servers", "127.0.0.53,::127.0.0.53", "-g", "1,2", "-u", "3,4", "--ipv6"]),
    ("ipv6-dns-uid-gid", &[], &["--ipv6", "--redirect-dns", "--dns-servers", "", "-g", "1,2", "-u", "3,4"]),
    ("outbound-owner-groups", &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")], &[]),
    ("outbound-owner-groups-exclude", &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")], &[]),
    ("ipv6-dns-outbound-owner-groups", &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")], &["--ipv6", "--redirect-dns", "--dns-servers", ""]),
    ("ipv6-dns-outbound-owner-groups-exclude", &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")], &["--ipv6", "--redirect-dns", "--dns-servers", ""]),
    ("outbound-ports-include", &[], &["-q", "32000,31000"]),
    ("loopback-outbound-iprange", &[], &["-i", "127.1.2.3/32", "--redirect-dns", "--dns-servers", "127.0.0.53", "--no-ipv6", "-g", "1,2", "-u", "3,4"]),
    ("basic-exclude-nic", &[], &["-c", "not-istio-nic"]),
    ("drop-invalid", &[], &["--drop-invalid"]),
    ("host-ipv4-loopback-cidr", &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")], &[]),
];

/// Base flags shared by every case, before the case's own (later flags win).
const BASE: &[&str] = &["-u", "1337", "-g", "1337", "--no-ipv6"];

/// meshinit's one deliberate difference: rules it puts into built-in chains whose target
/// does not name an ISTIO_* chain carry `-m comment --comment meshinit`, so cleanup removes
/// exactly its own rules and never another tool's look-alike. Traffic handling is identical.
pub const OWNER_COMMENT: &str = "-m comment --comment meshinit";

pub fn meshinit() -> &'static str {
    env!("CARGO_BIN_EXE_meshinit")
}

fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Istio's goldens, kept in the repository (`tests/golden/istio/`, see its README for
/// provenance and licence) so that a clone anywhere checks parity. `backend` is `iptables`
/// or `nftables`.
pub fn istio_golden(backend: &str, case: &str) -> String {
    let path = istio_golden_dir(backend).join(format!("{case}.golden"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("Istio's golden {}: {e}", path.display()))
}

/// The directory of Istio's goldens for `backend` (`iptables` or `nftables`).
pub fn istio_golden_dir(backend: &str) -> PathBuf {
    project_dir().join("tests/golden/istio").join(backend)
}

/// Runs `meshinit print` for a case (optionally one family only).
pub fn print_case(env: &[(&str, &str)], args: &[&str], family: Option<&str>) -> String {
    let mut cmd = Command::new(meshinit());
    cmd.env_clear().arg("print");
    if let Some(family) = family {
        cmd.args(["--family", family]);
    }
    cmd.args(BASE).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run meshinit");
    assert!(
        out.status.success(),
        "meshinit print {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// (family, table, chain) → rules, as the kernel would hold them after the input.
pub type ChainState = BTreeMap<(u8, String, String), Vec<String>>;

const BUILTIN: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Normalises a rule spec: `--to-port` and `--to-ports` are the same option, whitespace
/// is irrelevant, an address has one spelling (`::127.0.0.53` is `::7f00:35`), and
/// meshinit's owner comment is set aside (see `OWNER_COMMENT`).
pub fn normalise_spec(spec: &str) -> String {
    let spec = spec.replace(OWNER_COMMENT, "");
    spec.split_whitespace()
        .map(|w| match w {
            "--to-port" => "--to-ports".to_owned(),
            w => w
                .parse::<ipnet::IpNet>()
                .map(|net| net.to_string())
                .unwrap_or_else(|_| w.to_owned()),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Replays restore input (`*table`, `:CHAIN`, `-N`, `-A`, `-I N`, `COMMIT`), in Istio's
/// golden layout or meshinit's. A family switch is a `# ipv6` marker, or (Istio's files,
/// where tables come sorted per family) a table name that does not sort after the last.
pub fn replay(text: &str) -> ChainState {
    let mut state = ChainState::new();
    let mut family = 4u8;
    let mut table = String::new();
    let mut last_table = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("# ipv6") {
            family = 6;
            last_table.clear();
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            let name = name.trim().to_owned();
            if !last_table.is_empty() && name <= last_table {
                family = 6;
            }
            last_table.clone_from(&name);
            table = name;
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let key = |chain: &str| (family, table.clone(), chain.to_owned());
        match words.as_slice() {
            [decl, ..] if decl.starts_with(':') => {
                let chain = &decl[1..];
                if !BUILTIN.contains(&chain) {
                    state.insert(key(chain), Vec::new());
                }
            }
            ["-N", chain] => {
                state.insert(key(chain), Vec::new());
            }
            ["-A", chain, rest @ ..] => {
                state
                    .entry(key(chain))
                    .or_default()
                    .push(normalise_spec(&rest.join(" ")));
            }
            ["-I", chain, position, rest @ ..] => {
                let position: usize = position.parse().expect("insert position");
                let rules = state.entry(key(chain)).or_default();
                rules.insert(
                    (position - 1).min(rules.len()),
                    normalise_spec(&rest.join(" ")),
                );
            }
            _ => {}
        }
    }
    state
}

fn expected_path(case: &str) -> PathBuf {
    project_dir()
        .join("tests/golden/iptables")
        .join(format!("{case}.rules"))
}

/// Prints expected vs got per chain, so a failure shows what differs rather than two walls.
pub fn diff_states(expected: &ChainState, got: &ChainState) -> String {
    let mut report = String::new();
    let keys: std::collections::BTreeSet<_> = expected.keys().chain(got.keys()).collect();
    for key in keys {
        let (e, g) = (expected.get(key), got.get(key));
        if e != g {
            report.push_str(&format!(
                "ipv{} {} {}:\n  expected: {:#?}\n  got:      {:#?}\n",
                key.0, key.1, key.2, e, g
            ));
        }
    }
    report
}

fn check_case(case: &str) {
    let (_, env, args) = CASES
        .iter()
        .find(|(name, _, _)| *name == case)
        .expect("case listed");
    let ours = print_case(env, args, None);

    // 1. Regression: the project's own expected file.
    let path = expected_path(case);
    if std::env::var_os("MESHINIT_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &ours).expect("write golden");
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (MESHINIT_UPDATE_GOLDEN=1 creates it)",
            path.display()
        )
    });
    assert_eq!(
        replay(&expected),
        replay(&ours),
        "{case}: output differs from {}:\n{}",
        path.display(),
        diff_states(&replay(&expected), &replay(&ours))
    );
    assert_eq!(expected, ours, "{case}: same rules, but the text changed");

    // 2. Parity with Istio's own golden file.
    let istio = istio_golden("iptables", case);
    let (want, got) = (replay(&istio), replay(&ours));
    assert!(
        want == got,
        "{case}: meshinit differs from Istio's golden:\n{}",
        diff_states(&want, &got)
    );
}

macro_rules! golden_tests {
    ($($test:ident => $case:literal,)*) => {
        $(#[test] fn $test() { check_case($case); })*

        #[test]
        fn every_case_has_a_test() {
            let tested = [$($case),*];
            for (case, _, _) in CASES {
                assert!(tested.contains(case), "{case} has no test");
            }
            for entry in std::fs::read_dir(istio_golden_dir("iptables")).expect("read dir") {
                let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
                let case = name.trim_end_matches(".golden");
                assert!(tested.contains(&case), "Istio case {case} is not covered");
            }
        }
    };
}

golden_tests! {
    ipv6_empty_inbound_ports => "ipv6-empty-inbound-ports",
    ip_range => "ip-range",
    tproxy => "tproxy",
    ipv6_inbound_ports => "ipv6-inbound-ports",
    ipv6_virt_interfaces => "ipv6-virt-interfaces",
    ipv6_ipnets => "ipv6-ipnets",
    ipv6_uid_gid => "ipv6-uid-gid",
    ipv6_outbound_ports => "ipv6-outbound-ports",
    empty => "empty",
    kube_virt_interfaces => "kube-virt-interfaces",
    ipnets => "ipnets",
    ipnets_with_kube_virt_interfaces => "ipnets-with-kube-virt-interfaces",
    inbound_ports_include => "inbound-ports-include",
    inbound_ports_wildcard => "inbound-ports-wildcard",
    inbound_ports_tproxy => "inbound-ports-tproxy",
    inbound_ports_wildcard_tproxy => "inbound-ports-wildcard-tproxy",
    dns_uid_gid => "dns-uid-gid",
    ipv6_dns_uid_gid => "ipv6-dns-uid-gid",
    outbound_owner_groups => "outbound-owner-groups",
    outbound_owner_groups_exclude => "outbound-owner-groups-exclude",
    ipv6_dns_outbound_owner_groups => "ipv6-dns-outbound-owner-groups",
    ipv6_dns_outbound_owner_groups_exclude => "ipv6-dns-outbound-owner-groups-exclude",
    outbound_ports_include => "outbound-ports-include",
    loopback_outbound_iprange => "loopback-outbound-iprange",
    basic_exclude_nic => "basic-exclude-nic",
    drop_invalid => "drop-invalid",
    host_ipv4_loopback_cidr => "host-ipv4-loopback-cidr",
}

/// Istio's restore input from one of its golden files, per family. Its tables come sorted
/// per family, so a table name that does not sort after the previous one starts IPv6.
fn istio_restore_inputs(golden: &str) -> (String, String) {
    let (mut v4, mut v6) = (String::new(), String::new());
    let mut in_v6 = false;
    let mut last_table = String::new();
    let mut in_block = false;
    for line in golden.lines() {
        if let Some(table) = line.strip_prefix('*') {
            let table = table.trim().to_owned();
            if !last_table.is_empty() && table <= last_table {
                in_v6 = true;
            }
            last_table.clone_from(&table);
            in_block = true;
        }
        if in_block {
            let out = if in_v6 { &mut v6 } else { &mut v4 };
            out.push_str(line.trim_start());
            out.push('\n');
        }
        if line == "COMMIT" {
            in_block = false;
        }
    }
    (v4, v6)
}

/// `iptables-save` output without comments, counters and meshinit's owner comment.
fn normalise_save(save: &str) -> String {
    save.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let line = line.replace(&format!(" {OWNER_COMMENT}"), "");
            match line.rsplit_once(" [") {
                Some((head, counters)) if line.starts_with(':') && counters.ends_with(']') => {
                    head.to_owned()
                }
                _ => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Loads `input` into a fresh namespace with `backend`'s tools and returns what the
/// kernel reports back, per family.
pub fn load_and_save(role: &str, backend: &str, inputs: [&str; 2]) -> [String; 2] {
    let ns = crate::support::netns::NetNs::new(role);
    let _groups = GroupOverlay::new(ns.name());
    let mut saves = [String::new(), String::new()];
    for (index, (tool, input)) in [("iptables", inputs[0]), ("ip6tables", inputs[1])]
        .into_iter()
        .enumerate()
    {
        if input.trim().is_empty() {
            continue;
        }
        let mut cmd = ns.command(&[&format!("{tool}-{backend}-restore"), "--noflush"]);
        let output = pipe_into(&mut cmd, input);
        assert!(
            output.status.success(),
            "{tool}-{backend}-restore ({role}) failed: {}\ninput:\n{input}",
            String::from_utf8_lossy(&output.stderr)
        );
        saves[index] = normalise_save(&ns.run(&[&format!("{tool}-{backend}-save")]));
    }
    saves
}

fn pipe_into(cmd: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn restore");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write restore input");
    child.wait_with_output().expect("wait for restore")
}

/// The kernel as judge: for every case, Istio's input and meshinit's, loaded into fresh
/// namespaces, must read back identically from `iptables-save` (which canonicalises
/// syntax), on `backend`.
fn kernel_parity(backend: &str) {
    if !crate::support::require_root(&format!("kernel_parity_{backend}")) {
        return;
    }
    let mut failures = Vec::new();
    for (case, env, args) in CASES {
        let golden = istio_golden("iptables", case);
        let (istio_v4, istio_v6) = istio_restore_inputs(&golden);
        let ours_v4 = print_case(env, args, Some("ipv4"));
        let ours_v6 = if istio_v6.is_empty() {
            String::new()
        } else {
            print_case(env, args, Some("ipv6"))
        };
        let istio = load_and_save("gi", backend, [&istio_v4, &istio_v6]);
        let ours = load_and_save("gm", backend, [&ours_v4, &ours_v6]);
        for (family, (want, got)) in ["ipv4", "ipv6"].iter().zip(istio.iter().zip(ours.iter())) {
            if want != got {
                failures.push(format!(
                    "{case} ({family}, {backend}):\n--- istio\n{want}\n--- meshinit\n{got}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn kernel_parity_legacy() {
    kernel_parity("legacy");
}

#[test]
fn kernel_parity_nft() {
    kernel_parity("nft");
}
