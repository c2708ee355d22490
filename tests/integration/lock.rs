//! The xtables lock that iptables-legacy shares across every pod on a node: meshinit waits
//! for it, within a bound, and says so when the bound runs out, changing nothing.

use std::process::{Command, Stdio};

use crate::support::meshinit::{command, run};
use crate::support::netns::NetNs;
use crate::support::{injector_args, require_root};

/// Holds `/run/xtables.lock` (as another pod's iptables would) until dropped.
struct LockHolder(std::process::Child);

impl LockHolder {
    fn hold(seconds: u32) -> LockHolder {
        // -o: the lock stays with flock itself, so killing flock releases it.
        let mut child = Command::new("flock")
            .args([
                "-o",
                "/run/xtables.lock",
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

#[test]
fn lock_wait_is_bounded_and_says_so() {
    if !require_root("lock_wait_is_bounded_and_says_so") {
        return;
    }
    let ns = NetNs::new("lock");
    let mut args = vec!["apply"];
    args.extend(injector_args(&[
        "--no-ipv6",
        "--force-iptables-binary",
        "legacy",
        "--xtables-wait",
        "1",
    ]));
    {
        let _held = LockHolder::hold(10);
        run(command(&ns, &[], &args))
            .assert_exit(3)
            .assert_stderr_mentions(&["gave up after 1s", "xtables lock", "--xtables-wait"]);
    }
    let save = ns.run(&["iptables-legacy-save"]);
    assert!(!save.contains("ISTIO"), "nothing applied:\n{save}");
    // With the lock free again, the same run goes through.
    run(command(&ns, &[], &args)).assert_exit(0);
}
