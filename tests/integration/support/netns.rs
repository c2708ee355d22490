//! A named network namespace that lives exactly as long as its guard.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{expect_success, run_bounded};

/// Bound on any single `ip`/`iptables` command; they take milliseconds.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A throwaway namespace, `mi-<pid>-<n>-<role>`, deleted on drop (also when a test panics),
/// after killing whatever still runs in it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(role: &str) -> NetNs {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("mi-{}-{n}-{role}", std::process::id());
        expect_success(
            &format!("creating netns {name}"),
            run_bounded(
                Command::new("ip").args(["netns", "add", &name]),
                COMMAND_TIMEOUT,
            ),
        );
        NetNs { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <name> argv…`, ready for more arguments, environment or spawning.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs `argv` inside the namespace and returns what it did, success or not.
    pub fn exec(&self, argv: &[&str]) -> Output {
        run_bounded(&mut self.command(argv), COMMAND_TIMEOUT)
    }

    /// Runs `argv` inside the namespace; panics unless it succeeds. Returns stdout.
    pub fn run(&self, argv: &[&str]) -> String {
        expect_success(&format!("{argv:?} in {}", self.name), self.exec(argv))
    }

    /// Runs `ip` commands (one per line, without the leading `ip`) inside the namespace.
    pub fn ip_batch(&self, commands: &str) {
        let script = std::env::temp_dir().join(format!("{}.ip", self.name));
        std::fs::write(&script, commands).expect("writing an ip batch file");
        let what = format!("ip batch in {}:\n{commands}", self.name);
        let output = run_bounded(
            Command::new("ip")
                .args(["-n", &self.name, "-batch"])
                .arg(&script),
            COMMAND_TIMEOUT,
        );
        let _ = std::fs::remove_file(&script);
        expect_success(&what, output);
    }

    fn kill_remaining(&self) {
        let output = run_bounded(
            Command::new("ip").args(["netns", "pids", &self.name]),
            COMMAND_TIMEOUT,
        );
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.kill_remaining();
        let output = run_bounded(
            Command::new("ip").args(["netns", "delete", &self.name]),
            COMMAND_TIMEOUT,
        );
        if !output.status.success() {
            // Never panic here: it may run while a failed test unwinds.
            eprintln!(
                "warning: could not delete netns {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
