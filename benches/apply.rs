//! `cargo bench --bench apply`: how long `meshinit apply` takes against a bare
//! `iptables-restore` of the very state meshinit produces, each into a fresh network
//! namespace, runs alternating, for the injector's default ruleset and for 10,000 excluded
//! CIDRs, on both iptables backends. Also reports what meshinit launched and its own peak
//! memory, from its summary log line. Then `--match-sets` on iptables (lists as ipsets,
//! made over netlink) against bare `ipset restore` plus restore of the same state. Then the
//! same rulesets with `--native-nftables`:
//! one `nft -f` transaction (bare, of meshinit's printed text, and through meshinit) and
//! one netlink batch (meshinit's default), with and without `--match-sets`, against a bare
//! `iptables-nft-restore` of the iptables form, runs rotating. Needs root; prints why and
//! exits otherwise.
//!
//! Options (after `--`): `--runs N` (default 21), `--cidrs N` (default 10000).
//! `MESHINIT_BIN` selects the binary to measure (`benches/run.sh` points it at the static
//! release build, the one the image ships); the default is cargo's own build.

mod common;

use common::{excluded_cidrs, injector, median, meshinit, option, replace_value, Namespace};

use std::process::Command;
use std::time::Duration;

struct Scenario {
    name: String,
    args: Vec<String>,
    ipv6: bool,
}

fn print_family(args: &[String], family: &str) -> String {
    let mut all = vec!["--family".to_owned(), family.to_owned()];
    all.extend(args.iter().cloned());
    print(&all)
}

/// `meshinit print ARGS`'s output.
fn print(args: &[String]) -> String {
    let output = Command::new(meshinit())
        .env_clear()
        .arg("print")
        .args(args)
        .output()
        .expect("meshinit print");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

fn field(log: &str, name: &str) -> String {
    log.split_whitespace()
        .find_map(|word| word.strip_prefix(&format!("{name}=")))
        .unwrap_or("?")
        .to_owned()
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench apply: skipped, needs root (it creates network namespaces)");
        return;
    }
    let runs = option("--runs", 21).max(1);
    let cidrs = option("--cidrs", 10_000);
    // Rules only: no packet is sent anywhere in this benchmark.
    let many = replace_value(
        injector(&["--no-ipv6"]),
        "-x",
        excluded_cidrs(cidrs).join(","),
    );
    let scenarios = [
        Scenario {
            name: "injector default, IPv4".into(),
            args: injector(&["--no-ipv6"]),
            ipv6: false,
        },
        Scenario {
            name: "injector default, dual-stack".into(),
            args: injector(&["--ipv6"]),
            ipv6: true,
        },
        Scenario {
            name: format!("{cidrs} excluded CIDRs, IPv4"),
            args: many,
            ipv6: false,
        },
    ];

    println!("meshinit apply ({}) vs bare restore of the same rules, fresh namespace each run, {runs} runs each, alternating", meshinit());
    println!();
    println!("| scenario | backend | meshinit apply (median) | bare restore (median) | ratio | processes | meshinit peak RSS |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    // Each run gets a namespace of its own name.
    let index = std::cell::Cell::new(0);
    for scenario in &scenarios {
        let v4 = print_family(&scenario.args, "ipv4");
        let v6 = scenario.ipv6.then(|| print_family(&scenario.args, "ipv6"));
        for backend in ["nft", "legacy"] {
            let (mut ours, mut bare) = (Vec::new(), Vec::new());
            let (mut processes, mut rss) = (String::new(), String::new());
            for run in 0..runs {
                let mut measure_ours = || {
                    index.set(index.get() + 1);
                    let ns = Namespace::new(index.get());
                    let mut cmd = Command::new(meshinit());
                    cmd.env_clear()
                        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                        .arg("apply")
                        .args(&scenario.args)
                        .args(["--force-iptables-binary", backend]);
                    let (elapsed, log) = ns.time(&mut cmd, None);
                    processes = field(&log, "processes");
                    rss = field(&log, "peak_rss_kib");
                    ours.push(elapsed);
                };
                let mut measure_bare = || {
                    index.set(index.get() + 1);
                    let ns = Namespace::new(index.get());
                    let mut total = Duration::ZERO;
                    for (tool, input) in [("iptables", Some(&v4)), ("ip6tables", v6.as_ref())] {
                        let Some(input) = input else { continue };
                        let mut cmd = Command::new(format!("{tool}-{backend}-restore"));
                        cmd.arg("--noflush");
                        total += ns.time(&mut cmd, Some(input)).0;
                    }
                    bare.push(total);
                };
                if run % 2 == 0 {
                    measure_ours();
                    measure_bare();
                } else {
                    measure_bare();
                    measure_ours();
                }
            }
            let (ours, bare) = (median(&mut ours), median(&mut bare));
            println!(
                "| {} | {backend} | {:.2} ms | {:.2} ms | {:.2}x | {processes} | {} KiB |",
                scenario.name,
                ours.as_secs_f64() * 1e3,
                bare.as_secs_f64() * 1e3,
                ours.as_secs_f64() / bare.as_secs_f64(),
                rss
            );
        }
    }
    ipsets(&scenarios, runs, &index);
    nftables(&scenarios, runs, &index);
}

/// One way of getting a scenario's rules into a fresh namespace.
struct Method {
    name: &'static str,
    /// A bare tool fed a text: (program and args, input) for each process, in order.
    bare: Vec<(Vec<String>, String)>,
    /// Or meshinit with these extra arguments.
    meshinit: Option<Vec<String>>,
}

/// Runs every method `runs` times, each in a fresh namespace, rotating the order; returns
/// each method's median and the processes it launched.
fn measure(
    methods: &[Method],
    runs: usize,
    index: &std::cell::Cell<usize>,
) -> (Vec<Duration>, Vec<String>) {
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); methods.len()];
    let mut processes = vec![String::new(); methods.len()];
    for run in 0..runs {
        for k in 0..methods.len() {
            let m = (k + run) % methods.len();
            index.set(index.get() + 1);
            let ns = Namespace::new(index.get());
            let method = &methods[m];
            let elapsed = match &method.meshinit {
                Some(args) => {
                    let mut cmd = Command::new(meshinit());
                    cmd.env_clear()
                        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                        .arg("apply")
                        .args(args);
                    let (elapsed, log) = ns.time(&mut cmd, None);
                    processes[m] = field(&log, "processes");
                    elapsed
                }
                None => {
                    processes[m] = method.bare.len().to_string();
                    method
                        .bare
                        .iter()
                        .map(|(argv, input)| {
                            let mut cmd = Command::new(&argv[0]);
                            cmd.args(&argv[1..]);
                            ns.time(&mut cmd, Some(input)).0
                        })
                        .sum()
                }
            };
            times[m].push(elapsed);
        }
    }
    let medians = times.iter_mut().map(|t| median(t)).collect();
    (medians, processes)
}

/// One table row per method, `first` naming the scenario (and backend): its median, its
/// ratio to the first method's (the baseline), the processes it launched.
fn print_rows(first: &str, methods: &[Method], medians: &[Duration], processes: &[String]) {
    for (m, method) in methods.iter().enumerate() {
        println!(
            "| {first} | {} | {:.2} ms | {:.2}x | {} |",
            method.name,
            medians[m].as_secs_f64() * 1e3,
            medians[m].as_secs_f64() / medians[0].as_secs_f64(),
            processes[m]
        );
    }
}

/// The part of `meshinit print`'s output under headers starting with `header`.
fn printed_section(printed: &str, header: &str) -> String {
    let mut inside = false;
    let mut out = String::new();
    for line in printed.lines() {
        if line.starts_with("# ") {
            inside = line.starts_with(header);
            continue;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `--match-sets` on iptables: meshinit (sets over netlink, then one restore per family)
/// against bare `ipset restore` of the same sets then the same restores, and both against
/// the bare restore of the plain chains. Needs the `ipset` tool for the bare runs.
fn ipsets(scenarios: &[Scenario], runs: usize, index: &std::cell::Cell<usize>) {
    if Command::new("ipset").arg("version").output().is_err() {
        println!();
        println!("iptables --match-sets: skipped, needs the ipset tool for its baseline");
        return;
    }
    println!();
    println!(
        "iptables --match-sets (lists as ipsets), fresh namespace each run, {runs} runs each, \
         rotating; ratios against a bare restore of the plain chains"
    );
    println!();
    println!("| scenario | backend | method | median | vs bare restore, chains | processes |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for scenario in scenarios {
        let mut with_sets = scenario.args.clone();
        with_sets.push("--match-sets".to_owned());
        let printed = print(&with_sets);
        let families: &[&str] = if scenario.ipv6 {
            &["ipv4", "ipv6"]
        } else {
            &["ipv4"]
        };
        for backend in ["nft", "legacy"] {
            let restores = |args: &[String]| -> Vec<(Vec<String>, String)> {
                families
                    .iter()
                    .map(|family| {
                        let tool = if *family == "ipv4" {
                            "iptables"
                        } else {
                            "ip6tables"
                        };
                        (
                            vec![format!("{tool}-{backend}-restore"), "--noflush".to_owned()],
                            print_family(args, family),
                        )
                    })
                    .collect()
            };
            let sets: String = families
                .iter()
                .map(|family| printed_section(&printed, &format!("# {family}: ipsets")))
                .collect();
            let mut bare_sets = vec![(
                vec![
                    "ipset".to_owned(),
                    "-exist".to_owned(),
                    "restore".to_owned(),
                ],
                sets,
            )];
            bare_sets.extend(restores(&with_sets));
            let forced = |args: &[String]| {
                let mut all = args.to_vec();
                all.extend(["--force-iptables-binary".to_owned(), backend.to_owned()]);
                all
            };
            let methods = [
                Method {
                    name: "bare restore, chains",
                    bare: restores(&scenario.args),
                    meshinit: None,
                },
                Method {
                    name: "bare ipset restore + restore, sets",
                    bare: bare_sets,
                    meshinit: None,
                },
                Method {
                    name: "meshinit, --match-sets",
                    bare: Vec::new(),
                    meshinit: Some(forced(&with_sets)),
                },
            ];
            let (medians, processes) = measure(&methods, runs, index);
            print_rows(
                &format!("{} | {backend}", scenario.name),
                &methods,
                &medians,
                &processes,
            );
            println!(
                "| {} | {backend} | meshinit vs bare, sets | | {:.2}x | |",
                scenario.name,
                medians[2].as_secs_f64() / medians[1].as_secs_f64()
            );
        }
    }
}

/// The nftables table: bare `iptables-nft-restore` (the baseline), bare `nft -f`,
/// meshinit through nft and over netlink, with and without sets.
fn nftables(scenarios: &[Scenario], runs: usize, index: &std::cell::Cell<usize>) {
    println!();
    println!(
        "--native-nftables: one transaction, fresh namespace each run, {runs} runs each, rotating; \
         ratios against a bare iptables-nft-restore of the iptables form of the same rules"
    );
    println!();
    println!("| scenario | method | median | vs bare iptables-nft-restore | processes |");
    println!("| --- | --- | --- | --- | --- |");
    let native = |extra: &[&str], args: &[String]| -> Vec<String> {
        let mut all = args.to_vec();
        all.push("--native-nftables".to_owned());
        all.extend(extra.iter().map(|s| (*s).to_owned()));
        all
    };
    let nft_f = || vec!["nft".to_owned(), "-f".to_owned(), "-".to_owned()];
    for scenario in scenarios {
        let mut restore = vec![(
            vec!["iptables-nft-restore".to_owned(), "--noflush".to_owned()],
            print_family(&scenario.args, "ipv4"),
        )];
        if scenario.ipv6 {
            restore.push((
                vec!["ip6tables-nft-restore".to_owned(), "--noflush".to_owned()],
                print_family(&scenario.args, "ipv6"),
            ));
        }
        let methods = [
            Method {
                name: "bare iptables-nft-restore",
                bare: restore,
                meshinit: None,
            },
            Method {
                name: "bare nft -f",
                bare: vec![(nft_f(), print(&native(&[], &scenario.args)))],
                meshinit: None,
            },
            Method {
                name: "meshinit, nft -f",
                bare: Vec::new(),
                meshinit: Some(native(&["--nftables-apply=nft"], &scenario.args)),
            },
            Method {
                name: "meshinit, netlink",
                bare: Vec::new(),
                meshinit: Some(native(&["--nftables-apply=netlink"], &scenario.args)),
            },
            Method {
                name: "bare nft -f, --match-sets",
                bare: vec![(nft_f(), print(&native(&["--match-sets"], &scenario.args)))],
                meshinit: None,
            },
            Method {
                name: "meshinit, netlink, --match-sets",
                bare: Vec::new(),
                meshinit: Some(native(
                    &["--nftables-apply=netlink", "--match-sets"],
                    &scenario.args,
                )),
            },
        ];
        let (medians, processes) = measure(&methods, runs, index);
        print_rows(&scenario.name, &methods, &medians, &processes);
    }
}
