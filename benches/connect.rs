//! `cargo bench --bench connect`: how many new TCP connections per second an app in a pod
//! can open through meshinit's capture rules, with the injector's default ruleset and with
//! 10,000 excluded CIDRs, written as one rule per CIDR (a chain, as Istio writes them) or
//! as one set (`--match-sets`: an ipset on iptables, an interval set on nftables), on
//! iptables-legacy, iptables-nft and native nftables. Every connection is captured (REDIRECT to the sidecar's port), so
//! it walks the whole exclude list first: the cost `--match-sets` takes away.
//!
//! Each ruleset lives in a pod namespace of its own, built here (documentation addresses
//! only: the pod 192.0.2.2 behind a veth, the destination 198.51.100.30 behind the peer
//! 192.0.2.1; nothing leaves the namespaces). The app is this process, switched into the
//! pod's namespace: it connects to 198.51.100.30:8200, which the rules redirect to its own
//! listener on port 15001, accepts, and resets the connection (no TIME_WAIT). Runs rotate
//! over the rulesets, so drift hits them alike; each reports the median rate and its ratio
//! to the same backend's default ruleset, measured in the same run. The excluded CIDRs come
//! from a pod annotation file (`--annotations`): 10,000 of them exceed Linux's 128 KiB cap
//! on one argument. Needs root: prints why and exits otherwise.
//!
//! Options (after `--`): `--runs N` (default 7), `--connections N` per run (default 2000),
//! `--cidrs N` (default 10000). `MESHINIT_BIN` selects the binary (`benches/run.sh` points
//! it at the static release build).

mod common;

use common::{meshinit, option};

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{setsockopt, sockopt};

/// The injector's default arguments, without `-x` (the excluded CIDRs come from the
/// annotation file, when there are any).
const INJECTOR_DEFAULT: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "--no-ipv6",
    "--dns-servers",
    "",
];

const DESTINATION: &str = "198.51.100.30:8200";
const SIDECAR_PORT: u16 = 15001;

fn run(what: &str, cmd: &mut Command) {
    let output = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace, deleted on drop (also when the benchmark panics).
struct Namespace {
    name: String,
}

impl Namespace {
    fn new(role: &str) -> Namespace {
        let name = format!("mi-bconn-{}-{role}", std::process::id());
        run(
            &format!("ip netns add {name}"),
            Command::new("ip").args(["netns", "add", &name]),
        );
        Namespace { name }
    }

    fn ip(&self, commands: &[&str]) {
        for line in commands {
            let args: Vec<&str> = line.split_whitespace().collect();
            run(
                &format!("ip -n {} {line}", self.name),
                Command::new("ip").args(["-n", &self.name]).args(&args),
            );
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A pod and its peer (which holds 198.51.100.30), with `args` applied in the pod.
struct Pod {
    pod: Namespace,
    _peer: Namespace,
}

impl Pod {
    fn new(role: &str, args: &[String]) -> Pod {
        let pod = Namespace::new(&format!("{role}-pod"));
        let peer = Namespace::new(&format!("{role}-peer"));
        pod.ip(&[
            "link set lo up",
            &format!("link add eth0 type veth peer name eth0 netns {}", peer.name),
            "addr add 192.0.2.2/24 dev eth0",
            "link set eth0 up",
            "route add 198.51.100.0/24 via 192.0.2.1",
        ]);
        peer.ip(&[
            "link set lo up",
            "addr add 198.51.100.30/32 dev lo",
            "addr add 192.0.2.1/24 dev eth0",
            "link set eth0 up",
        ]);
        run(
            &format!("meshinit apply {role}"),
            Command::new("ip")
                .args(["netns", "exec", &pod.name, &meshinit(), "apply"])
                .args(args)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default()),
        );
        Pod { pod, _peer: peer }
    }

    /// Opens `count` captured connections from inside the pod; returns connections/s.
    fn connection_rate(&self, count: usize) -> f64 {
        let target = format!("/var/run/netns/{}", self.pod.name);
        // A thread of its own: setns changes only the calling thread's namespace.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = File::open(&target).expect("pod netns");
                    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("enter the pod");
                    let listener =
                        TcpListener::bind(("0.0.0.0", SIDECAR_PORT)).expect("sidecar listener");
                    let destination: SocketAddr = DESTINATION.parse().expect("address");
                    let connect = || {
                        let client =
                            TcpStream::connect_timeout(&destination, Duration::from_secs(2))
                                .unwrap_or_else(|e| panic!("connecting to {DESTINATION}: {e}"));
                        let (server, _) = listener.accept().expect("accept");
                        assert_eq!(
                            server.local_addr().map(|a| a.port()).ok(),
                            Some(SIDECAR_PORT),
                            "the connection was not captured"
                        );
                        // A reset instead of a FIN: no TIME_WAIT piles up over the run.
                        setsockopt(
                            &client,
                            sockopt::Linger,
                            &nix::libc::linger {
                                l_onoff: 1,
                                l_linger: 0,
                            },
                        )
                        .expect("SO_LINGER");
                        drop(client);
                        drop(server);
                    };
                    for _ in 0..count.min(100) {
                        connect();
                    }
                    let started = Instant::now();
                    for _ in 0..count {
                        connect();
                    }
                    count as f64 / started.elapsed().as_secs_f64()
                })
                .join()
                .expect("connection thread")
        })
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Scenario {
    name: String,
    backend: &'static str,
    /// The name of the scenario this one's ratio is against (same backend, default rules).
    baseline: Option<usize>,
    args: Vec<String>,
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench connect: skipped, needs root (it creates network namespaces)");
        return;
    }
    let runs = option("--runs", 7).max(1);
    let count = option("--connections", 2000).max(1);
    let cidrs = option("--cidrs", 10_000);
    // Non-adjacent /24s (every other one), so that a set keeps them as separate intervals.
    let excluded: Vec<String> = (0..cidrs)
        .map(|i| format!("10.{}.{}.0/24", i / 128, (i % 128) * 2))
        .collect();
    let annotations =
        std::env::temp_dir().join(format!("mi-bconn-{}.annotations", std::process::id()));
    std::fs::write(
        &annotations,
        format!(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges=\"{}\"\n",
            excluded.join(",")
        ),
    )
    .expect("annotation file");
    let with = |extra: &[&str], many: bool| -> Vec<String> {
        let mut args: Vec<String> = INJECTOR_DEFAULT.iter().map(|s| (*s).to_owned()).collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        if many {
            args.push("--annotations".to_owned());
            args.push(annotations.display().to_string());
        }
        args
    };
    let mut scenarios = Vec::new();
    for (backend, flags) in [
        (
            "iptables-legacy",
            &["--force-iptables-binary", "legacy"][..],
        ),
        ("iptables-nft", &["--force-iptables-binary", "nft"]),
        ("nftables", &["--native-nftables"]),
    ] {
        let baseline = scenarios.len();
        scenarios.push(Scenario {
            name: "injector default".into(),
            backend,
            baseline: None,
            args: with(flags, false),
        });
        scenarios.push(Scenario {
            name: format!("{cidrs} excluded CIDRs, a rule each"),
            backend,
            baseline: Some(baseline),
            args: with(flags, true),
        });
        let mut set_flags = flags.to_vec();
        set_flags.push("--match-sets");
        scenarios.push(Scenario {
            name: format!("{cidrs} excluded CIDRs, one set (--match-sets)"),
            backend,
            baseline: Some(baseline),
            args: with(&set_flags, true),
        });
    }
    let pods: Vec<Pod> = scenarios
        .iter()
        .enumerate()
        .map(|(i, s)| Pod::new(&i.to_string(), &s.args))
        .collect();
    let _ = std::fs::remove_file(&annotations);

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    for run in 0..runs {
        // Rotate the order, so that no ruleset always goes first.
        for k in 0..pods.len() {
            let i = (k + run) % pods.len();
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pods[i].connection_rate(count)
            })) {
                Ok(rate) => rates[i].push(rate),
                Err(_) => {
                    eprintln!(
                        "bench connect: {} on {} failed",
                        scenarios[i].name, scenarios[i].backend
                    );
                    std::process::exit(1);
                }
            }
        }
    }
    let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    println!(
        "new TCP connections/s from an app through meshinit's capture rules ({}), {count} \
         connections per run, median of {runs} runs, rotating",
        meshinit()
    );
    println!();
    println!("| ruleset | backend | connections/s | vs the backend's default ruleset |");
    println!("| --- | --- | --- | --- |");
    for (i, s) in scenarios.iter().enumerate() {
        let ratio = s
            .baseline
            .map(|b| format!("{:.2}x", medians[i] / medians[b]))
            .unwrap_or_else(|| "1.00x".into());
        println!(
            "| {} | {} | {:.0} | {ratio} |",
            s.name, s.backend, medians[i]
        );
    }
    println!();
    for backend in ["iptables-legacy", "iptables-nft", "nftables"] {
        let find = |what: &str| {
            scenarios
                .iter()
                .position(|s| s.backend == backend && s.name.contains(what))
        };
        if let (Some(chain), Some(set)) = (find("a rule each"), find("one set")) {
            println!(
                "{backend}, {cidrs} excluded CIDRs: one set opens {:.1}x as many connections/s as a rule each",
                medians[set] / medians[chain]
            );
        }
    }
}
