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
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::lab::{Client, Lab, Setup, Sidecar};
use crate::support::meshinit::{self, command};
use crate::support::netns::NetNs;
use crate::support::procs::{Outcome, Proto};
use crate::support::require_root;
use crate::support::scratch::ScratchDir;
use crate::support::state::{assert_same_state, Backend, State, NFT};
use crate::support::stepper::{start_stepped, Stepper, STEP_TIMEOUT};

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

/// `CONFIG --ipv6 ENGINE…`
fn with_engine(config: &[&str], engine: &[&str]) -> Vec<String> {
    config
        .iter()
        .chain(&["--ipv6"])
        .chain(engine)
        .map(|s| (*s).to_owned())
        .collect()
}

/// `--force-iptables-binary BACKEND`
fn iptables(backend: Backend) -> [&'static str; 2] {
    ["--force-iptables-binary", backend.name()]
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

/// `meshinit apply ARGS` in the lab's pod; panics unless it succeeds.
fn apply_in(lab: &Lab, args: &[String]) {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    meshinit::apply(lab.pod(), &argv, &[]);
}

/// A pod whose sidecar listens transparently (so it takes redirected and tproxied
/// connections alike), given `to` and then `from`; with the state each of them leaves when
/// applied without interruption: (the lab, `from`'s state, `to`'s state).
fn lab_between(from: &[String], to: &[String]) -> (Lab, State, State) {
    let lab = Lab::start(&Setup::new(from.to_vec()).sidecar(Sidecar::Tproxy));
    apply_in(&lab, to);
    let to_state = State::capture(lab.pod());
    apply_in(&lab, from);
    let from_state = State::capture(lab.pod());
    (lab, from_state, to_state)
}

/// From `from` to `to` on `backend`, in a pod whose sidecar listens transparently (so it
/// takes connections redirected and tproxied alike):
/// 1. held open after each table's commit, every connection both capture is captured;
/// 2. killed (with its restore) after each commit, the same holds, and a re-run of `to`
///    converges to exactly what an uninterrupted run leaves.
fn mode_change_under_faults(backend: Backend, from: &[&str], to: &[&str]) {
    let engine = iptables(backend);
    let (from, to) = (with_engine(from, &engine), with_engine(to, &engine));
    let what = format!("{backend:?}: {from:?} → {to:?}");
    let (lab, from_state, to_state) = lab_between(&from, &to);
    let apply = |args: &[String]| apply_in(&lab, args);
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
                let moment = format!("{what}: killed after commit {step} ({committed})");
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(run.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let status = run.wait().expect("waiting for meshinit");
                assert_landed_between(
                    &moment,
                    status,
                    (stepper.committed().len(), kill_after),
                    &State::capture(lab.pod()),
                    (&from_state, &to_state),
                );
                assert_captured(&lab, &moment);
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

/// Panics, naming `moment`, unless a kill held after a commit landed there: meshinit was
/// still running (the kill is what ended it), no commit came after the held one, and the
/// namespace holds neither the old configuration nor the new one. A kill that came after
/// meshinit had ended would prove nothing.
fn assert_landed_between(
    moment: &str,
    status: ExitStatus,
    (commits, held): (usize, usize),
    now: &State,
    (from, to): (&State, &State),
) {
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGKILL as i32),
        "{moment}: meshinit was not running when it was killed ({status})"
    );
    assert_eq!(
        commits, held,
        "{moment}: {commits} commits happened, the kill was meant to land after {held}"
    );
    assert!(
        now != from && now != to,
        "{moment}: the namespace holds the {} configuration, not one in between",
        if now == from { "old" } else { "new" }
    );
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

/// A long exclude list (so writing and committing take a while) that leaves every
/// address [`BOTH_CAPTURE`] connects to alone: 203.0.113.0/24 as /32s, and 4,096 /48s of
/// 2001:db8:1000::/36. No two overlap, as nft's interval sets require.
fn long_exclude_list() -> String {
    let v4 = (0..256).map(|i| format!("203.0.113.{i}/32"));
    let v6 = (0..4096).map(|i| format!("2001:db8:{:x}::/48", 0x1000 + i));
    v4.chain(v6).collect::<Vec<_>>().join(",")
}

/// What is killed: meshinit alone (the OOM killer's choice, say; what it started runs on),
/// or meshinit with everything it started (a container's end).
#[derive(Debug, Clone, Copy)]
enum Kill {
    Meshinit,
    Group,
}

/// Where a kill landed.
#[derive(Debug, Clone, Copy)]
struct Landed {
    /// How long after meshinit started.
    delay: Duration,
    /// Whether a process meshinit had started (a restore, nft) was running then.
    in_child: bool,
}

/// How often a moment is tried, each time earlier, before the test gives up on landing it.
const ATTEMPTS: u32 = 6;

/// Starts a run (`start`, which also sets up what it runs over) and kills it as `kill`
/// says `delay` later, until a kill lands while meshinit still runs: on a busy machine a
/// run can end sooner than the timed one, and then the same moment is tried again,
/// earlier. Panics, naming `what`, if none of [`ATTEMPTS`] did: a kill after the end
/// proves nothing. Returns what `start` returned for the run that was killed mid-run.
fn kill_mid_run<T>(
    what: &str,
    kill: Kill,
    delay: Duration,
    mut start: impl FnMut() -> (T, Child),
) -> (T, Landed) {
    let (first, mut delay) = (delay, delay);
    for _ in 0..ATTEMPTS {
        let (context, mut run) = start();
        std::thread::sleep(delay);
        if let Some(in_child) = kill_and_settle(&mut run, kill) {
            return (context, Landed { delay, in_child });
        }
        delay /= 2;
    }
    panic!("{what}: meshinit had ended before each of {ATTEMPTS} {kill:?} kills, made from {first:?} down to {:?} after it started", delay * 2);
}

/// Stops `run`, kills it as `kill` says, and waits until every process it had started has
/// ended too, so that whatever they were going to commit is committed. `None` if `run`
/// had already ended; else whether it had a process of its own running (the kill landed
/// while a restore or nft ran). Panics unless the kill is what ended it.
fn kill_and_settle(run: &mut Child, kill: Kill) -> Option<bool> {
    use nix::sys::signal::{kill as send, killpg, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(run.id() as i32);
    // Stopped, it can start nothing more, so its list of children is complete. A signal
    // is only sent by kill(2): wait until meshinit has stopped, or has ended (a process
    // already on its way out ends instead), so that "running" is not a guess.
    let _ = send(pid, Signal::SIGSTOP);
    let stopped = match waitpid(pid, Some(WaitPidFlag::WUNTRACED)) {
        Ok(WaitStatus::Stopped(..)) => true,
        Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => false,
        other => panic!("meshinit neither stopped nor ended after SIGSTOP: {other:?}"),
    };
    let children = children_of(run.id());
    if stopped {
        let _ = match kill {
            Kill::Meshinit => send(pid, Signal::SIGKILL),
            Kill::Group => killpg(pid, Signal::SIGKILL),
        };
        let status = run.wait().expect("waiting for meshinit");
        assert_eq!(
            status.signal(),
            Some(Signal::SIGKILL as i32),
            "meshinit, stopped while running, ended otherwise than by the kill: {status}"
        );
    }
    let deadline = Instant::now() + STEP_TIMEOUT;
    for &child in &children {
        while is_alive(child) {
            assert!(Instant::now() < deadline, "process {child} did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    stopped.then_some(!children.is_empty())
}

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Running, or not yet reaped but not a zombie.
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// Kills meshinit at many moments of a change from `from` to `to` with `engine` (both
/// with a long exclude list), alternating what is killed. After each kill: every
/// connection both configurations capture is captured; `atomic` engines hold exactly the
/// old or the new tables; a re-run converges exactly.
fn killed_at_any_moment(engine: &[&str], atomic: bool) {
    let long = long_exclude_list();
    let config = |base: &[&str]| -> Vec<String> {
        let mut args = with_engine(base, engine);
        args.extend(["-x".to_owned(), long.clone()]);
        args
    };
    let (from, to) = (config(TPROXY_8080), config(REDIRECT_ALL));
    let what = format!("{engine:?}: TPROXY → REDIRECT");
    let (lab, from_state, to_state) = lab_between(&from, &to);
    let apply = |args: &[String]| apply_in(&lab, args);
    assert_ne!(from_state, to_state);

    // How long an uninterrupted change takes; the kills are spread over it.
    let plain = ScratchDir::new("kill");
    let start = |dir: &ScratchDir| {
        let mut argv = vec!["apply"];
        argv.extend(to.iter().map(String::as_str));
        let mut cmd = command(lab.pod(), &[], &argv);
        let out = |name: &str| File::create(dir.path().join(name)).expect("output file");
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(out("stdout"))
            .stderr(out("stderr"));
        cmd.spawn().expect("starting meshinit")
    };
    let began = Instant::now();
    let status = start(&plain).wait().expect("meshinit");
    let took = began.elapsed();
    assert!(status.success(), "{what}: uninterrupted run failed");
    assert_same_state(
        &format!("{what}: uninterrupted"),
        &to_state,
        &State::capture(lab.pod()),
    );

    const MOMENTS: u32 = 12;
    let (mut in_child, mut ended_old, mut ended_new) = (0, 0, 0);
    for moment in 0..MOMENTS {
        let kill = if moment % 2 == 0 {
            Kill::Meshinit
        } else {
            Kill::Group
        };
        let moment_what = format!("{what}: moment {moment} of {MOMENTS} of a {took:?} run");
        let ((), landed) = kill_mid_run(&moment_what, kill, took * moment / MOMENTS, || {
            apply(&from);
            ((), start(&plain))
        });
        in_child += usize::from(landed.in_child);
        let moment_what = format!(
            "{what}: {kill:?} killed {:?} into a {took:?} run",
            landed.delay
        );
        assert_captured(&lab, &moment_what);
        let now = State::capture(lab.pod());
        if now == from_state {
            ended_old += 1;
        } else if now == to_state {
            ended_new += 1;
        } else if atomic {
            // The tables are one transaction; the old routing they no longer use goes
            // after it, so a kill in between may leave that (inert) routing: the re-run
            // below removes it.
            let tables = |state: &State| state.section(NFT).to_owned();
            assert!(
                tables(&now) == tables(&from_state) || tables(&now) == tables(&to_state),
                "{moment_what}: the nftables tables are neither the old nor the new:\n{}",
                tables(&now)
            );
        }
        apply(&to);
        assert_same_state(
            &format!("{moment_what}, then re-run (got) vs uninterrupted (expected)"),
            &to_state,
            &State::capture(lab.pod()),
        );
    }
    eprintln!(
        "{what}: {MOMENTS} kills over {took:?}, every one while meshinit ran ({in_child} while a process it started ran); left the old state {ended_old} times, the new {ended_new}, a mix {}",
        MOMENTS - ended_old - ended_new
    );
}

#[test]
fn iptables_killed_at_any_moment_keeps_capture_and_converges() {
    if !require_root("iptables_killed_at_any_moment_keeps_capture_and_converges") {
        return;
    }
    on_each_backend(|backend| killed_at_any_moment(&iptables(backend), false));
}

/// The same with the lists as ipsets, which live outside iptables' commits: made and
/// filled first, under names no rule uses yet, removed once no rule uses them.
#[test]
fn iptables_with_sets_killed_at_any_moment_keeps_capture_and_converges() {
    if !require_root("iptables_with_sets_killed_at_any_moment_keeps_capture_and_converges") {
        return;
    }
    on_each_backend(|backend| {
        let [flag, name] = iptables(backend);
        killed_at_any_moment(&[flag, name, "--match-sets"], false);
    });
}

#[test]
fn nftables_killed_at_any_moment_is_all_or_nothing() {
    if !require_root("nftables_killed_at_any_moment_is_all_or_nothing") {
        return;
    }
    std::thread::scope(|scope| {
        for via in ["--nftables-apply=netlink", "--nftables-apply=nft"] {
            scope.spawn(move || killed_at_any_moment(&["--native-nftables", via], true));
        }
    });
}

/// nft commits whatever it has read when its input ends, so it must never be started on
/// input that can still be cut short. A stand-in `nft` that waits before reading, with
/// meshinit killed as soon as that stand-in starts, must still read exactly the input an
/// uninterrupted run hands it.
#[test]
fn nft_is_never_handed_a_truncated_transaction() {
    if !require_root("nft_is_never_handed_a_truncated_transaction") {
        return;
    }
    let ns = NetNs::new("nft-input");
    ns.ip_batch("link set lo up\n");
    let fake = ScratchDir::new("fake-nft");
    let dir = fake.path().display().to_string();
    fake.write_script(
        "nft",
        &format!(
            "#!/bin/sh\ntouch '{dir}/started'\nsleep 0.3\ncat > '{dir}/input'\ntouch '{dir}/done'\nexit 1\n"
        ),
    );
    let mut args = with_engine(REDIRECT_ALL, &["--native-nftables", "--nftables-apply=nft"]);
    args.extend(["-x".to_owned(), long_exclude_list()]);
    let start = || {
        for marker in ["started", "input", "done"] {
            let _ = std::fs::remove_file(fake.path().join(marker));
        }
        let mut argv = vec!["apply"];
        argv.extend(args.iter().map(String::as_str));
        let mut cmd = command(&ns, &[], &argv);
        cmd.env(
            "PATH",
            format!("{dir}:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        cmd.spawn().expect("starting meshinit")
    };
    let wait_for = |marker: &str| {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !fake.path().join(marker).exists() {
            assert!(
                Instant::now() < deadline,
                "the stand-in nft never got to {marker}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let read_input = || std::fs::read_to_string(fake.path().join("input")).expect("input");

    let mut whole = start();
    let _ = whole.wait();
    wait_for("done");
    let expected = read_input();
    assert!(
        expected.len() > 100_000,
        "a long transaction: {} bytes",
        expected.len()
    );

    let mut killed = start();
    wait_for("started");
    let _ = killed.kill();
    let status = killed.wait().expect("waiting for meshinit");
    // Killed while it had nft running, not after it ended: else nothing was cut short.
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGKILL as i32),
        "meshinit was not running when killed as nft started: {status}"
    );
    wait_for("done");
    let got = read_input();
    assert!(
        got == expected,
        "nft read {} of {} bytes after meshinit was killed; it would have committed them",
        got.len(),
        expected.len()
    );
}

/// A fresh pod killed at any moment of its first (TPROXY) apply, then given another
/// configuration (REDIRECT), ends exactly as a pod given only that one: nothing the killed
/// run added (TPROXY's ip rule and table-133 route above all) is left for good.
#[test]
fn a_first_apply_killed_at_any_moment_leaves_nothing_behind_a_rerun() {
    if !require_root("a_first_apply_killed_at_any_moment_leaves_nothing_behind_a_rerun") {
        return;
    }
    let engines: [&[&str]; 3] = [
        &["--force-iptables-binary", "nft"],
        &["--native-nftables", "--nftables-apply=netlink"],
        &["--native-nftables", "--nftables-apply=nft"],
    ];
    std::thread::scope(|scope| {
        for engine in engines {
            scope.spawn(move || first_apply_killed(engine));
        }
    });
}

fn first_apply_killed(engine: &[&str]) {
    let mut first = with_engine(TPROXY_8080, engine);
    first.extend(["-x".to_owned(), long_exclude_list()]);
    let second = with_engine(REDIRECT_ALL, engine);
    let argv = |args: &[String]| -> Vec<String> {
        std::iter::once("apply".to_owned())
            .chain(args.iter().cloned())
            .collect()
    };
    let pod = || {
        let ns = NetNs::new("first-kill");
        ns.ip_batch("link set lo up\n");
        ns
    };
    let only_second = pod();
    let second_args: Vec<&str> = second.iter().map(String::as_str).collect();
    meshinit::apply(&only_second, &second_args, &[]);
    let expected = State::capture(&only_second);

    let first_argv = argv(&first);
    let first_argv: Vec<&str> = first_argv.iter().map(String::as_str).collect();
    let timed = pod();
    let began = Instant::now();
    let status = command(&timed, &[], &first_argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("meshinit");
    let took = began.elapsed();
    assert!(status.success(), "{engine:?}: the first apply alone failed");

    const MOMENTS: u32 = 10;
    let mut in_child = 0;
    for moment in 1..=MOMENTS {
        let kill = if moment % 2 == 0 {
            Kill::Meshinit
        } else {
            Kill::Group
        };
        let what = format!("{engine:?}: first apply, moment {moment} of {MOMENTS} of {took:?}");
        let (ns, landed) = kill_mid_run(&what, kill, took * moment / (MOMENTS + 1), || {
            let ns = pod();
            let mut run = command(&ns, &[], &first_argv);
            run.process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let run = run.spawn().expect("meshinit");
            (ns, run)
        });
        in_child += usize::from(landed.in_child);
        meshinit::apply(&ns, &second_args, &[]);
        assert_same_state(
            &format!(
                "{engine:?}: first apply {kill:?}-killed {:?} into {took:?}, then the second (got) vs the second alone (expected)",
                landed.delay
            ),
            &expected,
            &State::capture(&ns),
        );
    }
    eprintln!(
        "{engine:?}: {MOMENTS} first applies killed while meshinit ran ({in_child} while a process it started ran)"
    );
}
