//! What the benchmarks share: the binary measured, Istio's injector arguments, options,
//! the throwaway namespaces.
//! (Each bench is a crate of its own; this module is compiled into each, and not every
//! bench uses every item.)
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

/// The meshinit to measure: `MESHINIT_BIN` (`benches/run.sh` points it at the static
/// release build, the one the image ships), else cargo's own build.
pub fn meshinit() -> String {
    std::env::var("MESHINIT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_meshinit").to_owned())
}

/// The args Istio's injector gives istio-init by default.
pub const INJECTOR_DEFAULT: &[&str] = &[
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
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

/// The injector's default args followed by `extra`.
pub fn injector(extra: &[&str]) -> Vec<String> {
    INJECTOR_DEFAULT
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect()
}

/// `args` with the value after `flag` replaced by `value`.
pub fn replace_value(mut args: Vec<String>, flag: &str, value: String) -> Vec<String> {
    let at = args.iter().position(|a| a == flag).expect("flag present") + 1;
    args[at] = value;
    args
}

/// `count` CIDRs to exclude, written as compactly as possible: Linux caps one argument at
/// 128 KiB (MAX_ARG_STRLEN), which is about 10,000 CIDRs in one -x value, for Istio's flag
/// as for meshinit's. Every other /24, so that no two are adjacent and a set
/// (`--match-sets`) keeps them all.
pub fn excluded_cidrs(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("{}.{}.{}.0/24", 1 + i / 1280, i / 128 % 10, i % 128 * 2))
        .collect()
}

/// `--name N` from the bench's arguments (after `--`), else `default`.
pub fn option(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// A throwaway namespace the benchmark switches into to launch a command directly, so
/// neither side pays for an `ip netns exec` wrapper.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    pub fn new(index: usize) -> Namespace {
        let name = format!("mi-bench-{}-{index}", std::process::id());
        let status = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(status.is_ok_and(|s| s.success()), "ip netns add {name}");
        Namespace { name }
    }

    /// Runs `f` with this thread in the namespace: what it spawns starts there.
    pub fn inside<T>(&self, f: impl FnOnce() -> T) -> T {
        let home = File::open("/proc/self/ns/net").expect("own netns");
        let target = File::open(format!("/var/run/netns/{}", self.name)).expect("bench netns");
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("enter bench netns");
        let result = f();
        setns(home.as_fd(), CloneFlags::CLONE_NEWNET).expect("return to own netns");
        result
    }

    /// Runs `cmd` inside the namespace, feeding it `input`; returns wall time and stderr.
    pub fn time(&self, cmd: &mut Command, input: Option<&str>) -> (Duration, String) {
        let (elapsed, output) = self.inside(|| {
            let started = Instant::now();
            let mut child = cmd
                .stdin(if input.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
                stdin.write_all(input.as_bytes()).expect("write input");
            }
            let output = child.wait_with_output().expect("wait");
            (started.elapsed(), output)
        });
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{cmd:?} failed: {stderr}");
        (elapsed, stderr)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
