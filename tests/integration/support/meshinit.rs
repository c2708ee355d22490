//! Running meshinit inside a test namespace, as an init container would.

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

/// Every iptables rule in `ns`, both backends, for failure messages.
pub fn dump_rules(ns: &NetNs) -> String {
    [
        "iptables-legacy-save",
        "iptables-nft-save",
        "ip6tables-legacy-save",
        "ip6tables-nft-save",
    ]
    .iter()
    .map(|program| {
        let output = ns.exec(&[program]);
        format!("## {program}\n{}", String::from_utf8_lossy(&output.stdout))
    })
    .collect()
}
