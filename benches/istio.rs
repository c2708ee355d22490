//! `cargo bench --bench istio`: Istio's own `pilot-agent istio-iptables` against
//! `meshinit istio-iptables` with the same flags, each into a fresh network namespace holding
//! one veth with a documentation address (as a pod's), runs alternating, for the injector's
//! default ruleset (IPv4, and dual-stack), TPROXY with DNS capture, and 1,000 excluded CIDRs.
//!
//! Per case and side: the median wall time; the processes launched (every successful
//! `execve` of the whole tree, the first included, counted by `strace -f` in a run of its
//! own, never a timed one); the memory peak of the whole tree (a fresh memory cgroup per
//! run, entered before the first exec: cgroup v2's `memory.peak`, or v1's
//! `memory.max_usage_in_bytes`); and whether the final state is the same: every iptables
//! save (both backends, both families) and the routing (rules, TPROXY's table), with
//! meshinit's owner comment (`-m comment --comment meshinit`, `owner-comment` in
//! tests/parity-differences.md; the routing tag, docs/parity.md) removed and empty tables
//! left out (see `state`). A
//! different state fails the benchmark.
//!
//! `benches/istio.sh` builds both binaries and runs this as root. Options (after `--`):
//! `--runs N` (default 21), `--cidrs N` (default 1000). `PILOT_AGENT` is Istio's binary,
//! `MESHINIT_BIN` meshinit's. Without root or `PILOT_AGENT` it prints why and exits.

mod common;

use common::{excluded_cidrs, injector, median, meshinit, option, replace_value, Namespace};

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Case {
    name: String,
    args: Vec<String>,
    ipv6: bool,
}

/// A memory cgroup of its own for one run: the child enters it before its first exec, so
/// everything the tree allocates is charged here and nothing of the benchmark's.
struct Cgroup {
    dir: PathBuf,
    peak: &'static str,
}

impl Cgroup {
    /// Under cgroup v2 only where the memory controller is already enabled for children of
    /// the root; else under v1's memory hierarchy. None if neither is there.
    fn new(name: &str) -> Option<Cgroup> {
        let v2 = fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let (dir, peak) = if v2 {
            (PathBuf::from("/sys/fs/cgroup").join(name), "memory.peak")
        } else if PathBuf::from("/sys/fs/cgroup/memory/memory.max_usage_in_bytes").exists() {
            (
                PathBuf::from("/sys/fs/cgroup/memory").join(name),
                "memory.max_usage_in_bytes",
            )
        } else {
            return None;
        };
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Some(Cgroup { dir, peak })
    }

    fn procs(&self) -> File {
        OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
            .expect("open cgroup.procs")
    }

    fn peak_bytes(&self) -> u64 {
        let text = fs::read_to_string(self.dir.join(self.peak)).expect("read memory peak");
        text.trim().parse().expect("memory peak is a number")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.dir);
    }
}

/// A fresh namespace set up as a pod's: loopback up, one veth with 192.0.2.2/24 (and
/// 2001:db8::2/64 for `ipv6`), the address the two tools detect the pod's family from.
fn pod(index: usize, ipv6: bool) -> Namespace {
    let ns = Namespace::new(index);
    let mut batch = String::from(
        "link set lo up\n\
         link add mi0 type veth peer name mi1\n\
         addr add 192.0.2.2/24 dev mi0\n",
    );
    if ipv6 {
        batch.push_str("addr add 2001:db8::2/64 dev mi0 nodad\n");
    }
    batch.push_str("link set mi1 up\nlink set mi0 up\n");
    run_with_input(
        Command::new("ip").args(["-n", &ns.name, "-batch", "-"]),
        &batch,
    );
    ns
}

fn run_with_input(cmd: &mut Command, input: &str) {
    let mut child = cmd.stdin(Stdio::piped()).spawn().expect("spawn");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).expect("write input");
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "{cmd:?} failed");
}

/// The command line of one side, with the environment a container would give it: PATH only.
fn command(argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// One timed run in `ns`: wall time from spawn to exit, and the tree's memory peak in bytes.
fn timed(ns: &Namespace, argv: &[String], cgroup: Option<&Cgroup>) -> (Duration, Option<u64>) {
    let mut cmd = command(argv);
    let procs = cgroup.map(Cgroup::procs);
    if let Some(procs) = &procs {
        let fd = procs.as_raw_fd();
        // SAFETY: only a write(2) to a descriptor opened before the fork, which stays open
        // until the child has been waited for; nothing is allocated between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::write(BorrowedFd::borrow_raw(fd), b"0")?;
                Ok(())
            });
        }
    }
    let (elapsed, output) = ns.inside(|| {
        let started = Instant::now();
        let output = cmd.output().expect("spawn");
        (started.elapsed(), output)
    });
    assert!(
        output.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (elapsed, cgroup.map(Cgroup::peak_bytes))
}

/// The processes `argv` launches in a fresh pod namespace: successful execs of the whole
/// tree under `strace -f` (the first one, `argv` itself, included). None without strace.
fn processes(index: usize, case: &Case, argv: &[String]) -> Option<usize> {
    let ns = pod(index, case.ipv6);
    let log = std::env::temp_dir().join(format!("{}.strace", ns.name));
    let mut traced = vec![
        "strace".to_owned(),
        "-f".to_owned(),
        "-qq".to_owned(),
        "-e".to_owned(),
        "trace=execve".to_owned(),
        "-e".to_owned(),
        "signal=none".to_owned(),
        "-o".to_owned(),
        log.display().to_string(),
        "--".to_owned(),
    ];
    traced.extend(argv.iter().cloned());
    let output = ns.inside(|| command(&traced).output());
    let output = output.ok()?;
    let text = fs::read_to_string(&log).ok();
    let _ = fs::remove_file(&log);
    assert!(
        output.status.success(),
        "{traced:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A call strace saw interrupted is two lines, "<unfinished ...>" and "<... execve
    // resumed>) = 0": only the second ends with the result.
    Some(
        text?
            .lines()
            .filter(|l| l.contains("execve") && l.trim_end().ends_with("= 0"))
            .count(),
    )
}

/// What a run leaves in the namespace: every iptables save, the routing rules and the
/// TPROXY route table (133, `-r`'s default), with comment headers and counters dropped and
/// meshinit's owner comment and routing tag (protocol 224 on TPROXY's rule and route)
/// removed. The kernel's own route tables are not compared: they change as the veth comes
/// up, at the kernel's pace. Tables that hold nothing (no rule, no chain of their own,
/// every policy ACCEPT) are left out: Istio's probe of each binary (`-A`, then `-D`, of a
/// rule in nat's INPUT) leaves such a nat table behind in both backends and both families,
/// which changes no packet's path.
fn state(ns: &Namespace) -> String {
    let dumps: [&[&str]; 8] = [
        &["iptables-legacy-save"],
        &["ip6tables-legacy-save"],
        &["iptables-nft-save"],
        &["ip6tables-nft-save"],
        &["ip", "-4", "rule", "list"],
        &["ip", "-6", "rule", "list"],
        &["ip", "-4", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show", "table", "all"],
    ];
    let mut out = String::new();
    for argv in dumps {
        let output = ns
            .inside(|| Command::new(argv[0]).args(&argv[1..]).output())
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        assert!(output.status.success(), "{argv:?} failed");
        out.push_str(&format!("== {}\n", argv.join(" ")));
        let mut table: Vec<String> = Vec::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let tproxy_table = || {
                let words: Vec<&str> = line.split_whitespace().collect();
                words.windows(2).any(|w| w == ["table", "133"])
            };
            if line.starts_with('#') || (argv.contains(&"route") && !tproxy_table()) {
                continue;
            }
            let line = match line.strip_prefix(':') {
                Some(chain) => format!(":{}", chain.split(" [").next().unwrap_or(chain)),
                None => line.replace(" -m comment --comment meshinit", ""),
            };
            if line.starts_with('*') || !table.is_empty() {
                table.push(line);
                if table.last().is_some_and(|l| l == "COMMIT") {
                    let empty = table[1..table.len() - 1]
                        .iter()
                        .all(|l| l.starts_with(':') && l.ends_with(" ACCEPT"));
                    if !empty {
                        out.extend(table.iter().map(|l| format!("{l}\n")));
                    }
                    table.clear();
                }
            } else {
                // meshinit's routing tag (docs/parity.md, "Routing tag").
                out.push_str(&line.replace(" proto 224", ""));
                out.push('\n');
            }
        }
    }
    out
}

/// The lines of `a` not in `b`, and of `b` not in `a`, for the failure message.
fn difference(a: &str, b: &str) -> String {
    let only = |x: &str, y: &str| -> Vec<String> {
        x.lines()
            .filter(|l| !y.lines().any(|m| m == *l))
            .map(str::to_owned)
            .collect()
    };
    format!(
        "only after Istio:\n{}\nonly after meshinit:\n{}\nafter Istio, in full:\n{a}\nafter meshinit, in full:\n{b}",
        only(a, b).join("\n"),
        only(b, a).join("\n")
    )
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench istio: skipped, needs root (it creates network namespaces)");
        return;
    }
    let Some(pilot_agent) = std::env::var_os("PILOT_AGENT") else {
        eprintln!(
            "bench istio: skipped, PILOT_AGENT is not set (bash benches/istio.sh builds \
             Istio's pilot-agent from the pinned module and sets it)"
        );
        return;
    };
    let pilot_agent = pilot_agent.to_string_lossy().into_owned();
    let runs = option("--runs", 21).max(1);
    let cidrs = option("--cidrs", 1000);

    let tproxy = replace_value(injector(&["--redirect-dns"]), "-m", "TPROXY".to_owned());
    let many = replace_value(injector(&[]), "-x", excluded_cidrs(cidrs).join(","));
    let cases = [
        Case {
            name: "injector default, IPv4".into(),
            args: injector(&[]),
            ipv6: false,
        },
        Case {
            name: "injector default, dual-stack".into(),
            args: injector(&["--dual-stack"]),
            ipv6: true,
        },
        Case {
            name: "TPROXY with DNS capture (--redirect-dns)".into(),
            args: tproxy,
            ipv6: false,
        },
        Case {
            name: format!("{cidrs} excluded CIDRs"),
            args: many,
            ipv6: false,
        },
    ];

    let probe = Cgroup::new(&format!("mi-bench-istio-{}-probe", std::process::id()));
    let memory_note = match &probe {
        Some(c) => format!("memory peak: {} of a fresh cgroup per run", c.peak),
        None => "memory peak: not measured (no cgroup memory controller)".to_owned(),
    };
    drop(probe);
    println!(
        "pilot-agent istio-iptables ({pilot_agent}) vs meshinit istio-iptables ({}), same \
         flags, fresh namespace each run, {runs} runs each, alternating; processes: execs of \
         the whole tree under strace -f, one untimed run; {memory_note}",
        meshinit()
    );
    println!();
    println!(
        "| ruleset | Istio (median) | meshinit (median) | Istio ÷ meshinit | processes, Istio / \
         meshinit | memory peak (median), Istio / meshinit | final state |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");

    let sides = |case: &Case| -> [Vec<String>; 2] {
        let argv = |program: &str| {
            let mut all = vec![program.to_owned(), "istio-iptables".to_owned()];
            all.extend(case.args.iter().cloned());
            all
        };
        [argv(&pilot_agent), argv(&meshinit())]
    };
    let mut index = 0;
    for case in &cases {
        let argvs = sides(case);
        let mut walls: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        let mut peaks: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
        for run in 0..runs {
            let mut states = [String::new(), String::new()];
            for k in 0..2 {
                let side = (k + run) % 2;
                index += 1;
                let ns = pod(index, case.ipv6);
                let cgroup = Cgroup::new(&ns.name);
                let (wall, peak) = timed(&ns, &argvs[side], cgroup.as_ref());
                walls[side].push(wall);
                peaks[side].extend(peak);
                states[side] = state(&ns);
            }
            assert!(
                states[0] == states[1],
                "{}: the final states differ (run {run}):\n{}",
                case.name,
                difference(&states[0], &states[1])
            );
        }
        let counts: Vec<String> = argvs
            .iter()
            .map(|argv| {
                index += 1;
                processes(index, case, argv).map_or("? (no strace)".to_owned(), |n| n.to_string())
            })
            .collect();
        let [istio, ours] = walls.each_mut().map(|w| median(w));
        let memory = if peaks[0].is_empty() {
            "—".to_owned()
        } else {
            let [a, b] = peaks.each_mut().map(|p| {
                p.sort_unstable();
                p[p.len() / 2]
            });
            format!(
                "{:.1} MiB / {:.1} MiB ({:.1}x)",
                mib(a),
                mib(b),
                a as f64 / b as f64
            )
        };
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.1}x | {} / {} | {memory} | equal in all {runs} runs |",
            case.name,
            istio.as_secs_f64() * 1e3,
            ours.as_secs_f64() * 1e3,
            istio.as_secs_f64() / ours.as_secs_f64(),
            counts[0],
            counts[1],
        );
    }
}
