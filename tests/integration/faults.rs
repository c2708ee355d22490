//! The guarantees under faults: commits held open between tables, kills at any moment.
//!
//! `iptables-restore` commits table by table, so a change of configuration passes through
//! states where some tables hold the new rules and others the old. Here those states are
//! held open on purpose (a stand-in restore commits each table through the real one and
//! waits for the test before the next) and real connections are made in each, and meshinit
//! is killed in each; then a re-run must converge exactly.
//!
//! Needs root: skips with a reason otherwise, fails under `CI=true`.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::lab::{Client, Lab, Setup, Sidecar};
use crate::support::meshinit::{self, command};
use crate::support::netns::NetNs;
use crate::support::procs::{Outcome, Proto};
use crate::support::require_root;
use crate::support::scratch::ScratchDir;
use crate::support::state::{assert_same_state, Backend, State};

/// Inbound TPROXY on 8080, everything outbound captured.
const TPROXY_8080: &[&str] = &["-m", "TPROXY", "-u", "1337", "-b", "8080", "-i", "*"];
/// Inbound REDIRECT on every port but Istio's own, everything outbound captured.
const REDIRECT_ALL: &[&str] = &[
    "-m",
    "REDIRECT",
    "-u",
    "1337",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "-i",
    "*",
];

/// How long one held-open restore may take before the test gives up on it.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// `CONFIG --ipv6 --force-iptables-binary BACKEND`
fn with_backend(config: &[&str], backend: Backend) -> Vec<String> {
    config
        .iter()
        .copied()
        .chain(["--ipv6", "--force-iptables-binary", backend.name()])
        .map(str::to_owned)
        .collect()
}

/// A directory of stand-ins for every `*tables-*-restore`: each reads its whole input,
/// then commits it one table at a time through the real program, and after each commit
/// appends a line to `committed` and waits until the test creates `go-N` (N counting
/// commits across every restore of the run).
struct Stepper {
    dir: ScratchDir,
}

impl Stepper {
    fn new() -> Stepper {
        let dir = ScratchDir::new("stepper");
        for family in ["iptables", "ip6tables"] {
            for backend in ["legacy", "nft"] {
                let name = format!("{family}-{backend}-restore");
                let real = which::which(&name).unwrap_or_else(|err| panic!("{name}: {err}"));
                let script = format!(
                    r#"#!/bin/sh
dir='{dir}'
input=$(mktemp "$dir/input.XXXXXX") || exit 111
cat > "$input"
awk -v out="$input" '/^\*/ {{ n++ }} n {{ print > (out "." n) }}' "$input"
n=1
while [ -f "$input.$n" ]; do
  '{real}' "$@" < "$input.$n" || exit $?
  echo "{name} $(head -n 1 "$input.$n")" >> "$dir/committed"
  step=$(wc -l < "$dir/committed")
  while [ ! -e "$dir/go-$step" ]; do sleep 0.01; done
  n=$((n + 1))
done
"#,
                    dir = dir.path().display(),
                    real = real.display(),
                );
                dir.write_script(&name, &script);
            }
        }
        Stepper { dir }
    }

    /// PATH with the stand-ins first.
    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    fn committed(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("committed"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until commit `step` has happened (returning what it committed) or `run` ends.
    fn wait(&self, step: usize, run: &mut Child) -> Result<String, ExitStatus> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(line) = self.committed().get(step - 1) {
                return Ok(line.clone());
            }
            if let Some(status) = run.try_wait().expect("waiting for meshinit") {
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "commit {step} did not come within {STEP_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn release(&self, step: usize) {
        std::fs::write(self.dir.path().join(format!("go-{step}")), "").expect("go file");
    }

    fn reset(&self) {
        for entry in std::fs::read_dir(self.dir.path()).expect("stepper dir") {
            let path = entry.expect("stepper entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name == "committed" || name.starts_with("go-") || name.starts_with("input.") {
                std::fs::remove_file(&path).expect("removing a stepper file");
            }
        }
    }
}

/// `meshinit apply ARGS` in `ns` through the stepper, in a process group of its own (so
/// the test can kill it with everything it started), output to files in the stepper's dir.
fn start_stepped(ns: &NetNs, stepper: &Stepper, args: &[String]) -> Child {
    let mut argv = vec!["apply"];
    argv.extend(args.iter().map(String::as_str));
    let mut cmd = command(ns, &[], &argv);
    let out = |name: &str| File::create(stepper.dir.path().join(name)).expect("output file");
    cmd.env("PATH", stepper.path())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out("stdout"))
        .stderr(out("stderr"));
    cmd.spawn().expect("starting meshinit")
}

/// Connections that both configurations capture (to the pod's addresses and the peer's, see
/// `support::topology`), and the sidecar port each must reach.
const BOTH_CAPTURE: [(Client, &str, u16); 4] = [
    (Client::Peer, "192.0.2.2:8080", 15006),
    (Client::Peer, "[2001:db8::2]:8080", 15006),
    (Client::App, "198.51.100.30:8200", 15001),
    (Client::App, "[2001:db8::1]:8200", 15001),
];

/// Panics, naming `moment`, unless every connection both configurations capture reaches
/// the sidecar.
fn assert_captured(lab: &Lab, moment: &str) {
    let wrong: Vec<String> = BOTH_CAPTURE
        .iter()
        .filter_map(|&(from, to, port)| {
            let outcome = lab.connect(from, Proto::Tcp, to);
            let captured =
                matches!(&outcome, Outcome::Answered(r) if r.by == "sidecar" && r.port == port);
            (!captured).then(|| {
                format!("  {from:?} → {to}: expected the sidecar's {port}, got {outcome:?}")
            })
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{moment}:\n{}\nrules in the pod:\n{}",
        wrong.join("\n"),
        meshinit::dump_rules(lab.pod())
    );
}

/// From `from` to `to` on `backend`, in a pod whose sidecar listens transparently (so it
/// takes connections redirected and tproxied alike):
/// 1. held open after each table's commit, every connection both capture is captured;
/// 2. killed (with its restore) after each commit, the same holds, and a re-run of `to`
///    converges to exactly what an uninterrupted run leaves.
fn mode_change_under_faults(backend: Backend, from: &[&str], to: &[&str]) {
    let (from, to) = (with_backend(from, backend), with_backend(to, backend));
    let lab = Lab::start(&Setup::new(from.clone()).sidecar(Sidecar::Tproxy));
    let what = format!("{backend:?}: {from:?} → {to:?}");
    let apply = |args: &[String]| {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        meshinit::apply(lab.pod(), &argv, &[]);
    };
    // The end states to compare with, each reached without interruption.
    apply(&to);
    let to_state = State::capture(lab.pod());
    apply(&from);
    let from_state = State::capture(lab.pod());
    assert_captured(&lab, &format!("{what}: before"));

    let stepper = Stepper::new();
    let mut run = start_stepped(lab.pod(), &stepper, &to);
    let mut steps = 0;
    loop {
        match stepper.wait(steps + 1, &mut run) {
            Ok(committed) => {
                steps += 1;
                assert_captured(
                    &lab,
                    &format!("{what}: held after commit {steps} ({committed})"),
                );
                stepper.release(steps);
            }
            Err(status) => {
                assert!(status.success(), "{what}: meshinit failed ({status})");
                break;
            }
        }
    }
    // Both families, and at least two tables each: the moments in between were there.
    assert!(
        steps >= 4,
        "{what}: only {steps} commits: {:?}",
        stepper.committed()
    );
    assert_same_state(
        &format!("{what}: stepped (got)"),
        &to_state,
        &State::capture(lab.pod()),
    );

    for kill_after in 1..steps {
        apply(&from);
        assert_same_state(
            &format!("{what}: back to the start"),
            &from_state,
            &State::capture(lab.pod()),
        );
        stepper.reset();
        let mut run = start_stepped(lab.pod(), &stepper, &to);
        for step in 1..=kill_after {
            let committed = stepper.wait(step, &mut run).unwrap_or_else(|status| {
                panic!("{what}: meshinit ended ({status}) before commit {step}")
            });
            if step < kill_after {
                stepper.release(step);
            } else {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(run.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = run.wait();
                assert_captured(
                    &lab,
                    &format!("{what}: killed after commit {step} ({committed})"),
                );
            }
        }
        apply(&to);
        assert_same_state(
            &format!("{what}: re-run after a kill after commit {kill_after} (got) vs uninterrupted (expected)"),
            &to_state,
            &State::capture(lab.pod()),
        );
    }
}

fn on_each_backend(check: impl Fn(Backend) + Sync) {
    std::thread::scope(|scope| {
        for backend in Backend::ALL {
            let check = &check;
            scope.spawn(move || check(backend));
        }
    });
}

#[test]
fn tproxy_to_redirect_keeps_inbound_captured_between_tables() {
    if !require_root("tproxy_to_redirect_keeps_inbound_captured_between_tables") {
        return;
    }
    on_each_backend(|backend| mode_change_under_faults(backend, TPROXY_8080, REDIRECT_ALL));
}

#[test]
fn redirect_to_tproxy_keeps_inbound_captured_between_tables() {
    if !require_root("redirect_to_tproxy_keeps_inbound_captured_between_tables") {
        return;
    }
    on_each_backend(|backend| mode_change_under_faults(backend, REDIRECT_ALL, TPROXY_8080));
}
