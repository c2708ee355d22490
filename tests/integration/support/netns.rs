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

fn fresh_name(role: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("mi-{}-{n}-{role}", std::process::id())
}

/// A throwaway namespace, `mi-<pid>-<n>-<role>`, deleted on drop (also when a test panics),
/// after killing whatever still runs in it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(role: &str) -> NetNs {
        let name = fresh_name(role);
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

/// Many namespaces at once: created by one `ip -batch`, deleted in parallel on drop (also
/// when a test panics, and also those of a batch that failed half-way).
#[derive(Debug)]
pub struct NetNsGroup {
    members: Vec<NetNs>,
}

impl NetNsGroup {
    /// Threads that delete the members on drop.
    const DELETERS: usize = 8;

    pub fn new(role: &str, count: usize) -> NetNsGroup {
        // Guards first, so that whatever the batch creates is deleted whatever happens.
        let group = NetNsGroup {
            members: (0..count)
                .map(|_| NetNs {
                    name: fresh_name(role),
                })
                .collect(),
        };
        let commands: String = group
            .members
            .iter()
            .map(|ns| format!("netns add {}\n", ns.name))
            .collect();
        let script = std::env::temp_dir().join(format!("mi-{}-{role}-add.ip", std::process::id()));
        std::fs::write(&script, &commands).expect("writing an ip batch file");
        let output = run_bounded(
            Command::new("ip").arg("-batch").arg(&script),
            COMMAND_TIMEOUT,
        );
        let _ = std::fs::remove_file(&script);
        expect_success(&format!("creating {count} namespaces {role}"), output);
        group
    }

    pub fn members(&self) -> &[NetNs] {
        &self.members
    }
}

impl Drop for NetNsGroup {
    fn drop(&mut self) {
        let mut members = std::mem::take(&mut self.members);
        let per_thread = members.len().div_ceil(Self::DELETERS).max(1);
        let mut chunks = Vec::new();
        while !members.is_empty() {
            let rest = members.split_off(per_thread.min(members.len()));
            chunks.push(std::mem::replace(&mut members, rest));
        }
        // Each member's own drop kills what still runs in it and deletes it.
        std::thread::scope(|scope| {
            for chunk in chunks {
                scope.spawn(move || drop(chunk));
            }
        });
    }
}
