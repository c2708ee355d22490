//! `cargo bench --bench burst`: a node starting many pods at once. 110 pods (the kubelet's
//! default pod limit) each apply the injector's default ruleset at the same moment, against
//! 110 bare `iptables-<backend>-restore --noflush --wait` of the very input meshinit
//! produces (each reading it from a file, as `restore < FILE` does), on both iptables
//! backends, launched two ways:
//!
//! - directly: the benchmark enters each namespace itself and starts the command there, as
//!   a container runtime starts an init container in the pod's namespace;
//! - through `ip netns exec NS`, as a person tries it by hand (`ip` adds a process, a mount
//!   namespace and a remount of /sys to each side).
//!
//! Every process of a burst is started before the first is waited for, and nothing is fed
//! through a pipe, so no start waits on another's exit. Rounds come in pairs, a meshinit
//! burst and a bare one back to back, which goes first alternating; the ratio is the median
//! of the pairs' ratios (with their range), since the machine's load is shared and drifts
//! more between pairs than within one. Wall time from the first
//! start to the last exit; CPU time is every process of the burst, user and system
//! (`RUSAGE_CHILDREN`: the restores meshinit starts are its own children, waited for).
//! Namespaces are made before and deleted after, untimed. Needs root; prints why and exits
//! otherwise.
//!
//! Options (after `--`): `--pods N` (default 110), `--runs N` (default 5).
//! `MESHINIT_BIN` selects the binary (`benches/run.sh` points it at the static build).

mod common;

use common::{median, meshinit, option, INJECTOR_DEFAULT};

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

/// `count` throwaway namespaces, deleted on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new(round: usize, count: usize) -> Namespaces {
        let names: Vec<String> = (0..count)
            .map(|i| format!("mi-burst-{}-{round}-{i}", std::process::id()))
            .collect();
        let batch: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
        run_ip_batch(&batch);
        Namespaces(names)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let batch: String = self.0.iter().map(|n| format!("netns del {n}\n")).collect();
        run_ip_batch(&batch);
    }
}

fn run_ip_batch(batch: &str) {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("ip -batch");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(batch.as_bytes())
        .expect("ip batch input");
    assert!(child.wait().expect("ip").success(), "ip -batch failed");
}

#[derive(Clone, Copy, PartialEq)]
enum Style {
    /// Started by this process from inside the namespace.
    Direct,
    /// Started as `ip netns exec NS ARGV`.
    IpNetnsExec,
}

/// What one burst took: wall time, and the CPU time of every process in it.
struct Burst {
    wall: Duration,
    cpu: Duration,
}

fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<nix::libc::rusage>();
        assert_eq!(
            nix::libc::getrusage(nix::libc::RUSAGE_CHILDREN, &mut usage),
            0,
            "getrusage"
        );
        usage
    };
    let time = |t: nix::libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Starts `argv` once in every namespace (stdin from `input`, if any), all before waiting
/// for any; then waits for all.
fn burst(namespaces: &Namespaces, style: Style, argv: &[String], input: Option<&Path>) -> Burst {
    let home = File::open("/proc/self/ns/net").expect("own netns");
    let targets: Vec<File> = namespaces
        .0
        .iter()
        .map(|ns| File::open(format!("/var/run/netns/{ns}")).expect("bench netns"))
        .collect();
    let stdin = || match input {
        Some(path) => Stdio::from(File::open(path).expect("restore input")),
        None => Stdio::null(),
    };
    let cpu_before = children_cpu();
    let started = Instant::now();
    let children: Vec<Child> = namespaces
        .0
        .iter()
        .zip(&targets)
        .map(|(ns, target)| {
            let mut command = match style {
                Style::Direct => {
                    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("enter netns");
                    let mut command = Command::new(&argv[0]);
                    command.args(&argv[1..]);
                    command
                }
                Style::IpNetnsExec => {
                    let mut command = Command::new("ip");
                    command.args(["netns", "exec", ns]).args(argv);
                    command
                }
            };
            let child = command
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .stdin(stdin())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            if style == Style::Direct {
                setns(home.as_fd(), CloneFlags::CLONE_NEWNET).expect("return to own netns");
            }
            child
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().expect("wait");
        assert!(
            output.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Burst {
        wall: started.elapsed(),
        cpu: children_cpu() - cpu_before,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Medians of one side's rounds.
#[derive(Default)]
struct Side {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
}

impl Side {
    fn push(&mut self, burst: Burst) {
        self.wall.push(burst.wall);
        self.cpu.push(burst.cpu);
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench burst: skipped, needs root (it creates network namespaces)");
        return;
    }
    let pods = option("--pods", 110);
    let runs = option("--runs", 5).max(1);
    let input_text = {
        let output = Command::new(meshinit())
            .env_clear()
            .args(["print", "--family", "ipv4"])
            .args(INJECTOR_DEFAULT)
            .arg("--no-ipv6")
            .output()
            .expect("meshinit print");
        String::from_utf8(output.stdout).expect("utf-8")
    };
    let input: PathBuf =
        std::env::temp_dir().join(format!("mi-burst-{}.rules", std::process::id()));
    std::fs::write(&input, &input_text).expect("write restore input");
    let meshinit_path = std::fs::canonicalize(meshinit()).expect("meshinit binary");
    println!(
        "{pods} pods applying at once (injector default, IPv4), {runs} rounds each, alternating: \
         meshinit istio-iptables vs bare restore --wait of the same input; {} cores, load \
         average at the start {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!();
    println!("| backend | launched | meshinit (median wall) | bare restores (median wall) | ratio, median of pairs (range) | CPU per pod, meshinit / bare |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut round = 0;
    for backend in ["legacy", "nft"] {
        let mut apply: Vec<String> = vec![
            meshinit_path.to_string_lossy().into_owned(),
            "istio-iptables".into(),
        ];
        apply.extend(INJECTOR_DEFAULT.iter().map(|s| (*s).to_owned()));
        apply.push("--no-ipv6".into());
        apply.extend(["--force-iptables-binary".into(), backend.into()]);
        let restore = which(&format!("iptables-{backend}-restore"));
        let bare: Vec<String> = vec![restore, "--noflush".into(), "--wait".into()];
        for (style, label) in [
            (Style::Direct, "directly"),
            (Style::IpNetnsExec, "`ip netns exec`"),
        ] {
            let (mut ours, mut theirs) = (Side::default(), Side::default());
            let mut ratios = Vec::new();
            for run in 0..runs {
                // A pair of bursts back to back, which goes first alternating: the machine's
                // load (shared, and it drifts) is as alike as it gets within a pair.
                round += 2;
                let (ours_ns, bare_ns) = (round - 1, round);
                let run_ours = || burst(&Namespaces::new(ours_ns, pods), style, &apply, None);
                let run_bare =
                    || burst(&Namespaces::new(bare_ns, pods), style, &bare, Some(&input));
                let (a, b) = if run % 2 == 0 {
                    let a = run_ours();
                    (a, run_bare())
                } else {
                    let b = run_bare();
                    (run_ours(), b)
                };
                ratios.push(a.wall.as_secs_f64() / b.wall.as_secs_f64());
                ours.push(a);
                theirs.push(b);
            }
            ratios.sort_by(f64::total_cmp);
            let (wall_ours, wall_theirs) = (median(&mut ours.wall), median(&mut theirs.wall));
            let (cpu_ours, cpu_theirs) = (median(&mut ours.cpu), median(&mut theirs.cpu));
            let per_pod = |d: Duration| d.as_secs_f64() * 1000.0 / pods as f64;
            println!(
                "| iptables-{backend} | {label} | {} | {} | {:.2}x ({:.2}x-{:.2}x) | {:.2} / {:.2} ms |",
                ms(wall_ours),
                ms(wall_theirs),
                ratios[ratios.len() / 2],
                ratios[0],
                ratios[ratios.len() - 1],
                per_pod(cpu_ours),
                per_pod(cpu_theirs),
            );
        }
    }
    println!();
    println!("load average at the end: {}", load_average());
    let _ = std::fs::remove_file(&input);
}

/// The program's full path, so that `ip netns exec` and a direct start find the same one.
fn which(program: &str) -> String {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} not found"))
        .to_string_lossy()
        .into_owned()
}
