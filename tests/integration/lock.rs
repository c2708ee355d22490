//! What an apply holds while it works: the xtables lock that iptables-legacy shares across
//! every pod on a node, taken once for the whole apply (rollback included) and waited for
//! within a bound; and one meshinit run at a time per network namespace.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::meshinit::{self, command, run};
use crate::support::netns::NetNs;
use crate::support::state::{assert_same_state, State};
use crate::support::stepper::{start_stepped, Stepper};
use crate::support::{injector_args, require_root, INJECTOR_DEFAULT};

const LOCK: &str = "/run/xtables.lock";

/// Holds `/run/xtables.lock` (as another pod's iptables would) until dropped.
struct LockHolder(std::process::Child);

impl LockHolder {
    fn hold(seconds: u32) -> LockHolder {
        // -o: the lock stays with flock itself, so killing flock releases it.
        let mut child = Command::new("flock")
            .args([
                "-o",
                LOCK,
                "sh",
                "-c",
                &format!("echo held; sleep {seconds}"),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("flock (util-linux)");
        // Wait until the lock is really held: flock runs the command only then.
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("read from flock");
        assert_eq!(line.trim(), "held");
        LockHolder(child)
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether someone else holds `/run/xtables.lock` right now.
fn xtables_lock_is_held() -> bool {
    let status = Command::new("flock")
        .args(["-n", LOCK, "true"])
        .status()
        .expect("flock (util-linux)");
    !status.success()
}

/// `apply`, the injector's arguments, dual-stack, on iptables-legacy, then `extra`.
fn legacy_apply<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["apply"];
    args.extend(injector_args(&[
        "--ipv6",
        "--force-iptables-binary",
        "legacy",
    ]));
    args.extend_from_slice(extra);
    args
}

#[test]
fn lock_wait_is_bounded_and_says_so_once() {
    if !require_root("lock_wait_is_bounded_and_says_so_once") {
        return;
    }
    let ns = NetNs::new("lock");
    let args = legacy_apply(&["--xtables-wait", "2"]);
    let ran;
    let took;
    {
        let _held = LockHolder::hold(10);
        let began = Instant::now();
        ran = run(command(&ns, &[], &args));
        took = began.elapsed();
    }
    ran.assert_exit(3)
        .assert_stderr_mentions(&["gave up after 2s", "xtables lock", "--xtables-wait"])
        .assert_stderr_lacks("rolling back");
    assert_eq!(ran.stderr.matches("gave up").count(), 1, "{ran}");
    // One wait for the whole apply, not one per family or per rollback.
    assert!(
        took < Duration::from_millis(3500),
        "waited {took:?} for a 2s --xtables-wait\n{ran}"
    );
    let save = ns.run(&["iptables-legacy-save"]) + &ns.run(&["ip6tables-legacy-save"]);
    assert!(!save.contains("ISTIO"), "nothing applied:\n{save}");
    // With the lock free again, the same run goes through.
    run(command(&ns, &[], &args)).assert_exit(0);
}

#[test]
fn the_xtables_lock_is_held_from_the_first_commit_to_the_last() {
    if !require_root("the_xtables_lock_is_held_from_the_first_commit_to_the_last") {
        return;
    }
    let ns = NetNs::new("lock-held");
    let stepper = Stepper::new();
    let args: Vec<String> = injector_args(&["--ipv6", "--force-iptables-binary", "legacy"])
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
    let mut apply = start_stepped(&ns, &stepper, &args);
    let mut step = 0;
    while let Ok(committed) = stepper.wait(step + 1, &mut apply) {
        step += 1;
        // Between two families' restores, or two tables, nobody else may take it: a
        // rollback after this point must find it still ours.
        assert!(
            xtables_lock_is_held(),
            "after commit {step} ({committed}) the xtables lock was free"
        );
        stepper.release(step);
    }
    let status = apply.wait().expect("meshinit");
    assert!(status.success(), "meshinit failed: {status}");
    assert!(
        step >= 2,
        "both families committed: {:?}",
        stepper.committed()
    );
    // Released when meshinit ended (other tests' iptables-legacy may take it briefly).
    let free = Command::new("flock")
        .args(["-w", "10", LOCK, "true"])
        .status()
        .expect("flock (util-linux)");
    assert!(
        free.success(),
        "the xtables lock stayed held after meshinit ended"
    );
}

/// Whether the lock is free at some moment within about a second: other tests'
/// iptables-legacy take it briefly, a run that holds it keeps it.
fn xtables_lock_comes_free() -> bool {
    (0..100).any(|_| {
        let free = !xtables_lock_is_held();
        if !free {
            std::thread::sleep(Duration::from_millis(10));
        }
        free
    })
}

/// The injector's default pod, IPv4 only, on iptables-legacy: one restore of one table
/// into a fresh namespace, one commit.
fn one_commit_args() -> Vec<String> {
    injector_args(&["--no-ipv6", "--force-iptables-binary", "legacy"])
        .iter()
        .map(|a| (*a).to_owned())
        .collect()
}

/// docs/design.md, "The lock": an apply that is one commit has no "between two commits"
/// to guard, so its restore takes the lock around that commit, as any iptables command
/// does. Once the commit is done, the lock is free while meshinit still runs: the next
/// pod's restore does not wait for this meshinit to see its restore exit and end (on a
/// node starting many pods, that wait was most of each turn at the lock).
#[test]
fn a_one_commit_apply_holds_the_lock_around_its_commit_only() {
    if !require_root("a_one_commit_apply_holds_the_lock_around_its_commit_only") {
        return;
    }
    let ns = NetNs::new("lock-one");
    let stepper = Stepper::new();
    let mut apply = start_stepped(&ns, &stepper, &one_commit_args());
    let committed = stepper
        .wait(1, &mut apply)
        .expect("meshinit ended before committing");
    assert!(
        xtables_lock_comes_free(),
        "after its one commit ({committed}), with meshinit still running, the xtables lock \
         stayed held"
    );
    stepper.release(1);
    let status = apply.wait().expect("meshinit");
    assert!(status.success(), "meshinit failed: {status}");
    assert_eq!(stepper.committed().len(), 1, "{:?}", stepper.committed());
    let save = ns.run(&["iptables-legacy-save", "-t", "nat"]);
    assert!(save.contains("-j ISTIO_OUTPUT"), "not applied:\n{save}");
}

/// The same one-commit pod while another process holds the lock: the restore's own wait
/// is bounded by --xtables-wait and reported as meshinit's own is, nothing applied.
#[test]
fn a_one_commit_apply_waits_for_the_lock_within_the_bound() {
    if !require_root("a_one_commit_apply_waits_for_the_lock_within_the_bound") {
        return;
    }
    let ns = NetNs::new("lock-one-wait");
    let mut argv = vec!["apply".to_owned()];
    argv.extend(one_commit_args());
    argv.extend(["--xtables-wait".to_owned(), "2".to_owned()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (ran, took) = {
        let _held = LockHolder::hold(10);
        let began = Instant::now();
        (run(command(&ns, &[], &argv)), began.elapsed())
    };
    ran.assert_exit(3).assert_stderr_mentions(&[
        "gave up after 2s",
        "xtables lock",
        "--xtables-wait",
    ]);
    assert!(
        took < Duration::from_millis(3500),
        "waited {took:?} for a 2s --xtables-wait\n{ran}"
    );
    let save = ns.run(&["iptables-legacy-save"]);
    assert!(
        !save.contains("ISTIO"),
        "applied despite the timeout:\n{save}"
    );
    // With the lock free again (other tests may take it briefly: the default wait), the
    // same pod goes through.
    run(command(&ns, &[], &argv[..argv.len() - 2])).assert_exit(0);
}

/// The capture arguments with `-m MODE`, dual-stack, on iptables-legacy.
fn legacy_mode(mode: &str) -> Vec<String> {
    let mut args: Vec<String> = INJECTOR_DEFAULT.iter().map(|a| (*a).to_owned()).collect();
    let at = args.iter().position(|a| a == "-m").expect("-m") + 1;
    args[at] = mode.to_owned();
    args.extend(
        [
            "--ipv6",
            "--dns-servers",
            "",
            "--force-iptables-binary",
            "legacy",
        ]
        .map(str::to_owned),
    );
    args
}

/// The kernel refuses a table whose TPROXY target can be reached from another hook than
/// PREROUTING. Someone else's rules in IPv6 mangle jump from OUTPUT, through a chain of
/// their own, into ISTIO_TPROXY while it is empty (the kernel accepts that); once
/// meshinit's TPROXY rule goes in there, the kernel refuses the whole table
/// ("TPROXY target: used from hooks PREROUTING/OUTPUT, but only usable from PREROUTING").
const FOREIGN_V6_JUMP: [&[&str]; 4] = [
    &["ip6tables-legacy", "-t", "mangle", "-N", "ISTIO_TPROXY"],
    &["ip6tables-legacy", "-t", "mangle", "-N", "FOREIGN"],
    &[
        "ip6tables-legacy",
        "-t",
        "mangle",
        "-A",
        "OUTPUT",
        "-j",
        "FOREIGN",
    ],
    &[
        "ip6tables-legacy",
        "-t",
        "mangle",
        "-A",
        "FOREIGN",
        "-j",
        "ISTIO_TPROXY",
    ],
];

/// docs/design.md, "The lock": held "until the apply (rollback included) is done". A pod
/// on REDIRECT changes to TPROXY; IPv4 commits, then the kernel refuses IPv6 (a real
/// refusal, see [`FOREIGN_V6_JUMP`]) and meshinit puts IPv4 back. Its restores, the
/// rollback's among them, are held after each commit: at each, the lock is meshinit's, and
/// once the rollback has begun an iptables-legacy of another pod, started then, must still
/// be waiting for the lock. It gets it once meshinit has ended, and the pod is exactly as
/// before.
#[test]
fn the_xtables_lock_is_held_through_a_rollback_the_kernel_caused() {
    if !require_root("the_xtables_lock_is_held_through_a_rollback_the_kernel_caused") {
        return;
    }
    let ns = NetNs::new("lock-rollback");
    ns.ip_batch("link set lo up\n");
    let redirect = legacy_mode("REDIRECT");
    let argv: Vec<&str> = redirect.iter().map(String::as_str).collect();
    meshinit::apply(&ns, &argv, &[]);
    for command in FOREIGN_V6_JUMP {
        ns.run(command);
    }
    // A rollback leaves the IPv4 mangle table registered, empty (legacy cannot take a
    // table away, docs/limits.md): registered beforehand, the state compares exactly.
    ns.run(&["iptables-legacy", "-t", "mangle", "-S"]);
    let before = State::capture(&ns);

    let other = NetNs::new("lock-other");
    let stepper = Stepper::new();
    let mut apply = start_stepped(&ns, &stepper, &legacy_mode("TPROXY"));
    let stderr = || std::fs::read_to_string(stepper.dir().join("stderr")).unwrap_or_default();
    let mut competitor: Option<Child> = None;
    let (mut step, mut in_rollback) = (0, 0);
    while let Ok(committed) = stepper.wait(step + 1, &mut apply) {
        step += 1;
        assert!(
            xtables_lock_is_held(),
            "after commit {step} ({committed}) the xtables lock was free"
        );
        if stderr().contains("rolling back") {
            in_rollback += 1;
            // Another pod's iptables-legacy, waiting as long as it takes.
            let waiting = competitor.get_or_insert_with(|| {
                other
                    .command(&["iptables-legacy", "-w", "-t", "filter", "-N", "LOCK_PROBE"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("iptables-legacy")
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                waiting.try_wait().expect("iptables-legacy").is_none(),
                "during the rollback, after commit {step} ({committed}), another iptables-legacy took the xtables lock"
            );
        }
        stepper.release(step);
    }
    let status = apply.wait().expect("meshinit");
    let stderr = stderr();
    assert_eq!(status.code(), Some(3), "{status}\n{stderr}");
    for wanted in ["ip6tables-legacy-restore", "rolling back family=ipv4"] {
        assert!(stderr.contains(wanted), "no {wanted:?} in:\n{stderr}");
    }
    // IPv4's tables, then (IPv6 refused at its first table) the rollback's restores, IPv4's
    // last.
    let commits = stepper.committed();
    let (applied, rolled_back) = commits.split_at(step - in_rollback);
    assert!(
        applied.len() == 2
            && applied
                .iter()
                .all(|c| c.starts_with("iptables-legacy-restore"))
            && rolled_back
                .last()
                .is_some_and(|c| c.starts_with("iptables-legacy-restore")),
        "expected IPv4's two commits, then the rollback's, IPv4's last: {commits:?}\n{stderr}"
    );
    // Free again once meshinit ended: the waiting iptables-legacy goes through.
    let mut waiting = competitor.expect("started during the rollback");
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        if let Some(done) = waiting.try_wait().expect("iptables-legacy") {
            break done;
        }
        assert!(
            Instant::now() < deadline,
            "the xtables lock stayed held after meshinit ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(done.success(), "the waiting iptables-legacy failed: {done}");
    assert_same_state(
        "rolled back after the kernel refused IPv6",
        &before,
        &State::capture(&ns),
    );
    eprintln!(
        "the_xtables_lock_is_held_through_a_rollback_the_kernel_caused: {step} commits, {in_rollback} of them the rollback's: {commits:?}"
    );
}

#[test]
fn an_unopenable_lock_file_is_exit_2_and_changes_nothing() {
    if !require_root("an_unopenable_lock_file_is_exit_2_and_changes_nothing") {
        return;
    }
    let ns = NetNs::new("lock-file");
    // Legacy tables already in use here, as after a first run.
    run(command(&ns, &[], &legacy_apply(&[]))).assert_exit(0);
    let before = State::capture(&ns);
    let mut cmd = command(&ns, &[], &legacy_apply(&["-b", "8080"]));
    cmd.env("XTABLES_LOCKFILE", "/nonexistent-dir/xtables.lock");
    run(cmd)
        .assert_exit(2)
        .assert_stderr_mentions(&["/nonexistent-dir/xtables.lock", "XTABLES_LOCKFILE"]);
    assert_same_state("a run without its lock", &before, &State::capture(&ns));
}

/// The engines a namespace can be programmed with.
const ENGINES: [&[&str]; 4] = [
    &["--force-iptables-binary", "legacy"],
    &["--force-iptables-binary", "nft"],
    &["--native-nftables", "--nftables-apply=netlink"],
    &["--native-nftables", "--nftables-apply=nft"],
];

/// Two pod specs that differ in every table and in routing.
const TPROXY_POD: &[&str] = &[
    "-m",
    "TPROXY",
    "-u",
    "1337",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "-i",
    "*",
    "-x",
    "198.51.100.0/24",
    "--redirect-dns",
    "--dns-servers",
    "192.0.2.53",
    "--ipv6",
];
const REDIRECT_POD: &[&str] = &[
    "-m",
    "REDIRECT",
    "-u",
    "1337",
    "-b",
    "8080",
    "-i",
    "203.0.113.0/24,2001:db8::/32",
    "--ipv6",
];

fn spawn_apply(ns: &NetNs, config: &[&str], engine: &[&str], extra: &[&str]) -> Child {
    let mut args = vec!["apply"];
    args.extend_from_slice(config);
    args.extend_from_slice(engine);
    args.extend_from_slice(extra);
    let mut cmd = command(ns, &[], &args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.spawn().expect("starting meshinit")
}

/// Waits for `child`; panics unless it succeeded. Its stderr.
fn finish(child: Child, what: &str) -> String {
    let output = child.wait_with_output().expect("meshinit");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{what}: {}\n{stderr}",
        output.status
    );
    stderr
}

/// What a run that had to wait for another in its namespace logs.
const WAITED: &str = "another meshinit run is at work in this network namespace; waiting";

/// Rounds in which two runs really were at once: one waited for the other.
const ROUNDS: usize = 10;

#[test]
fn two_runs_at_once_in_one_namespace_leave_exactly_one_configuration() {
    if !require_root("two_runs_at_once_in_one_namespace_leave_exactly_one_configuration") {
        return;
    }
    std::thread::scope(|scope| {
        for engine in ENGINES {
            scope.spawn(move || {
                let ns = NetNs::new("two-runs");
                ns.ip_batch("link set lo up\n");
                let apply = |config: &[&str]| {
                    let mut args = config.to_vec();
                    args.extend_from_slice(engine);
                    meshinit::apply(&ns, &args, &[]);
                };
                // Each after the other once, so that both used every table (legacy keeps
                // a table registered, empty, once used).
                apply(TPROXY_POD);
                apply(REDIRECT_POD);
                let redirect = State::capture(&ns);
                apply(TPROXY_POD);
                let tproxy = State::capture(&ns);
                // Two runs started together may still not overlap (the first may be done
                // before the second starts): only rounds where one waited count.
                let (mut round, mut tries) = (0, 0);
                while round < ROUNDS {
                    assert!(
                        tries < ROUNDS * 4,
                        "{engine:?}: in {tries} tries, only {round} rounds had two runs at once"
                    );
                    tries += 1;
                    let first = spawn_apply(&ns, TPROXY_POD, engine, &[]);
                    let second = spawn_apply(&ns, REDIRECT_POD, engine, &[]);
                    let logs = finish(first, "TPROXY pod") + &finish(second, "REDIRECT pod");
                    let now = State::capture(&ns);
                    if now != redirect {
                        assert_same_state(
                            &format!("{engine:?}, try {tries}: neither configuration (expected TPROXY's, or REDIRECT's)"),
                            &tproxy,
                            &now,
                        );
                    }
                    round += usize::from(logs.contains(WAITED));
                }
                eprintln!("{engine:?}: {ROUNDS} rounds of two runs at once, in {tries} tries");
            });
        }
    });
}

#[test]
fn a_second_run_waits_for_the_first_within_its_bound() {
    if !require_root("a_second_run_waits_for_the_first_within_its_bound") {
        return;
    }
    let ns = NetNs::new("run-lock");
    ns.ip_batch("link set lo up\n");
    let engine = ["--force-iptables-binary", "nft"];
    let apply = |config: &[&str]| {
        let mut args = config.to_vec();
        args.extend_from_slice(&engine);
        meshinit::apply(&ns, &args, &[]);
    };
    apply(REDIRECT_POD);
    let redirect = State::capture(&ns);
    apply(TPROXY_POD);

    // A run of the TPROXY pod, held after its first table.
    let stepper = Stepper::new();
    let held: Vec<String> = TPROXY_POD
        .iter()
        .chain(&engine)
        .map(|a| (*a).to_owned())
        .collect();
    let mut first = start_stepped(&ns, &stepper, &held);
    stepper.wait(1, &mut first).expect("a first commit");
    let during = State::capture(&ns);

    // A run that may wait a second gives up, changing nothing.
    let impatient = spawn_apply(&ns, REDIRECT_POD, &engine, &["--xtables-wait", "1"]);
    let output = impatient.wait_with_output().expect("meshinit");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("another meshinit run"), "{stderr}");
    assert_same_state("a run that gave up", &during, &State::capture(&ns));

    // A patient one waits until the first is done, then applies over it.
    let mut patient = spawn_apply(&ns, REDIRECT_POD, &engine, &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        patient.try_wait().expect("meshinit").is_none(),
        "the second run did not wait for the first"
    );
    let mut step = 1;
    loop {
        stepper.release(step);
        step += 1;
        if stepper.wait(step, &mut first).is_err() {
            break;
        }
    }
    finish(first, "the held run");
    finish(patient, "the waiting run");
    assert_same_state(
        "the waiting run's configuration, whole",
        &redirect,
        &State::capture(&ns),
    );
}
