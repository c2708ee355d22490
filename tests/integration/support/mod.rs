//! Shared test support: privilege checks, throwaway network namespaces, traffic helpers.
//!
//! Everything that touches the kernel happens inside namespaces created here and deleted by
//! guards, never in the namespace the tests run in.

pub mod cni;
pub mod groups;
pub mod k8s;
pub mod lab;
pub mod meshinit;
pub mod netns;
pub mod podman;
pub mod podman_cni;
pub mod procs;
pub mod roles;
pub mod scratch;
pub mod state;
pub mod stepper;
pub mod topology;

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The `istio-iptables` arguments Istio's injector gives istio-init by default.
#[rustfmt::skip]
pub const INJECTOR_DEFAULT: &[&str] = &[
    "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b",
    "*", "-d", "15090,15021,15020",
];

/// `INJECTOR_DEFAULT` followed by `extra`.
pub fn injector_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    INJECTOR_DEFAULT
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

/// Programs a real-kernel test needs besides root.
const REQUIRED_PROGRAMS: [&str; 3] = ["ip", "iptables", "setpriv"];

/// Whether a test that needs root and real namespaces can run here.
///
/// When it cannot, it prints why and returns false, so the test passes as skipped on a
/// laptop; under `CI=true` it panics instead, since there the test must run.
pub fn require_root(test_name: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("needs root (network namespaces and iptables)".to_owned())
    } else {
        REQUIRED_PROGRAMS
            .iter()
            .find(|program| which::which(program).is_err())
            .map(|program| format!("needs `{program}` on PATH"))
    };
    let Some(reason) = reason else {
        return true;
    };
    skip(test_name, &reason);
    false
}

/// Whether the tests run under CI (`CI=true`), where every test must run: nothing skips.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "true")
}

/// The one way a test skips: it prints why on a developer's machine, and panics under
/// `CI=true`, where a skipped test would pass without checking anything.
pub fn skip(test_name: &str, reason: &str) {
    if in_ci() {
        panic!("{test_name}: cannot run under CI=true: {reason}");
    }
    eprintln!("skipping {test_name}: {reason}");
}

/// Runs `cmd` to completion, killing it after `timeout`; stdout and stderr are captured.
/// A timeout shows up as a failed exit status and a note at the end of stderr.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {shown}: {err}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("waiting for a killed child");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let mut stderr = stderr.join().expect("stderr reader");
    if timed_out {
        stderr.extend_from_slice(format!("\n(killed after {timeout:?}: {shown})").as_bytes());
    }
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr,
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Panics with the command, status and both streams unless `output` succeeded; returns stdout.
pub fn expect_success(what: &str, output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
