//! Running meshinit inside a test namespace, as an init container would.

use std::process::Command;
use std::time::Duration;

use super::netns::NetNs;
use super::{expect_success, run_bounded};

const MESHINIT: &str = env!("CARGO_BIN_EXE_meshinit");
const TIMEOUT: Duration = Duration::from_secs(20);

/// Installs meshinit's capture rules for `args` (and `env`, e.g. the owner-group
/// variables) in `ns` with `meshinit apply`, as the init container would; panics with
/// meshinit's output if that fails.
pub fn apply(ns: &NetNs, args: &[&str], env: &[(&str, &str)]) {
    let mut cmd = ns.command(&[MESHINIT, "apply"]);
    // Only PATH and `env`: nothing in the test runner's environment may change the config.
    cmd.args(args).env_clear().envs(env.iter().copied());
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let what = format!("meshinit apply {args:?} (env {env:?}) in {}", ns.name());
    expect_success(&what, run_bounded(&mut cmd, TIMEOUT));
}

/// Every iptables rule in `ns`, both backends, and the nftables ruleset, for failure
/// messages.
pub fn dump_rules(ns: &NetNs) -> String {
    [
        &["iptables-legacy-save"][..],
        &["iptables-nft-save"],
        &["ip6tables-legacy-save"],
        &["ip6tables-nft-save"],
        &["nft", "list", "ruleset"],
    ]
    .iter()
    .map(|argv| {
        let output = ns.exec(argv);
        format!(
            "## {}\n{}",
            argv.join(" "),
            String::from_utf8_lossy(&output.stdout)
        )
    })
    .collect()
}

/// `[wrapper…] meshinit ARGS` inside `ns` (ARGS start with the subcommand), with an
/// environment of PATH alone, as [`apply`] runs it; not started, so a test can still change
/// PATH or redirect output.
pub fn command(ns: &NetNs, wrapper: &[&str], args: &[&str]) -> Command {
    let mut cmd = ns.command(wrapper);
    cmd.arg(MESHINIT).args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// What one meshinit run did, success or not.
#[derive(Debug)]
pub struct Ran {
    pub what: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Panics, showing the run, unless it exited with `code`.
    pub fn assert_exit(&self, code: i32) -> &Ran {
        assert_eq!(
            self.code,
            Some(code),
            "{self}\nexpected exit code {code}, got {:?}",
            self.code
        );
        self
    }

    /// Panics, showing the run, unless stderr contains every one of `needles`.
    pub fn assert_stderr_mentions(&self, needles: &[&str]) -> &Ran {
        let missing: Vec<&&str> = needles
            .iter()
            .filter(|needle| !self.stderr.contains(**needle))
            .collect();
        assert!(
            missing.is_empty(),
            "{self}\nexpected stderr to mention {needles:?}; missing {missing:?}"
        );
        self
    }

    /// Panics, showing the run, if stderr contains `needle`.
    pub fn assert_stderr_lacks(&self, needle: &str) -> &Ran {
        assert!(
            !self.stderr.contains(needle),
            "{self}\nexpected stderr not to mention {needle:?}"
        );
        self
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\nexit code {:?}\nstdout:\n{}\nstderr:\n{}",
            self.what, self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` (from [`command`]), bounded like [`apply`].
pub fn run(mut cmd: Command) -> Ran {
    let what = format!("{cmd:?}");
    let output = run_bounded(&mut cmd, TIMEOUT);
    Ran {
        what,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
