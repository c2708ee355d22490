//! Running meshinit inside a test namespace, as an init container would.

use std::process::Command;
use std::time::Duration;

use super::netns::NetNs;
use super::{expect_success, run_bounded};

const MESHINIT: &str = env!("CARGO_BIN_EXE_meshinit");
const TIMEOUT: Duration = Duration::from_secs(20);

/// Installs meshinit's capture rules for `args` (and `env`, e.g. the owner-group
/// variables) in `ns`; panics with meshinit's output if that fails.
pub fn apply(ns: &NetNs, args: &[&str], env: &[(&str, &str)]) {
    apply_via_restore(ns, args, env);
}

/// `meshinit`, inside `ns`, with only PATH and `env` in its environment, so nothing in
/// the test runner's environment changes the configuration.
fn meshinit(ns: &NetNs, subcommand: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = ns.command(&[MESHINIT, subcommand]);
    cmd.args(args).env_clear().envs(env.iter().copied());
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let what = format!("meshinit {subcommand} {args:?} (env {env:?}) in {}", ns.name());
    expect_success(&what, run_bounded(&mut cmd, TIMEOUT))
}

/// The real thing: `meshinit apply`.
#[allow(dead_code)]
fn apply_via_meshinit(ns: &NetNs, args: &[&str], env: &[(&str, &str)]) {
    meshinit(ns, "apply", args, env);
}

/// Stand-in until `meshinit apply` works: `meshinit print`'s restore input per family,
/// fed to `iptables-restore --noflush` (the backend --force-iptables-binary names), and
/// its routing section run as the `ip` commands it lists.
fn apply_via_restore(ns: &NetNs, args: &[&str], env: &[(&str, &str)]) {
    let plan = meshinit(ns, "print", args, env);
    let backend = forced_backend(args, env);
    let mut section: Option<(&str, String)> = None;
    let mut sections = Vec::new();
    for line in plan.lines() {
        if let Some(header) = line.strip_prefix("# ") {
            sections.extend(section.take());
            section = Some((header, String::new()));
        } else if let Some((_, body)) = section.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    sections.extend(section);
    for (header, body) in sections {
        let restore = match header.split(':').next() {
            Some("ipv4") => "iptables",
            Some("ipv6") => "ip6tables",
            _ => {
                for command in body.lines() {
                    let argv: Vec<&str> = command.split_whitespace().collect();
                    ns.run(&argv);
                }
                continue;
            }
        };
        if body.is_empty() {
            continue; // "# ipv6: off"
        }
        let program = match backend.as_deref() {
            Some(backend) => format!("{restore}-{backend}-restore"),
            None => format!("{restore}-restore"),
        };
        restore_input(ns, &program, &body);
    }
}

fn forced_backend(args: &[&str], env: &[(&str, &str)]) -> Option<String> {
    let mut forced = env
        .iter()
        .find(|(key, _)| *key == "FORCE_IPTABLES_BINARY")
        .map(|(_, value)| value.to_string());
    for (i, arg) in args.iter().enumerate() {
        if let Some(value) = arg.strip_prefix("--force-iptables-binary=") {
            forced = Some(value.to_owned());
        } else if *arg == "--force-iptables-binary" {
            forced = args.get(i + 1).map(|value| value.to_string());
        }
    }
    forced
}

fn restore_input(ns: &NetNs, program: &str, input: &str) {
    let file = std::env::temp_dir().join(format!("{}.{program}", ns.name()));
    std::fs::write(&file, input).expect("writing restore input");
    let mut cmd: Command = ns.command(&[program, "--noflush", "-w", "5"]);
    cmd.arg(&file);
    let output = run_bounded(&mut cmd, TIMEOUT);
    let _ = std::fs::remove_file(&file);
    expect_success(&format!("{program} in {} with:\n{input}", ns.name()), output);
}

/// Every iptables rule in `ns`, both backends, for failure messages.
pub fn dump_rules(ns: &NetNs) -> String {
    ["iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"]
        .iter()
        .map(|program| {
            let output = ns.exec(&[program]);
            format!("## {program}\n{}", String::from_utf8_lossy(&output.stdout))
        })
        .collect()
}
