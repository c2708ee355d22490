//! Istio's own code as the judge: differential parity over generated configurations.
//!
//! `interop/istio` builds `istio-oracle`, Istio's capture code (the pinned `istio.io/istio`
//! module in its go.mod) run the way Istio's golden tests run it: flags and environment
//! bound by Istio's command, then the iptables planner with its dry-run dependencies and the
//! nftables planner with knftables' fake. No root, no kernel.
//!
//! - `oracle_reproduces_istio_goldens`: for each of Istio's 55 golden cases, the oracle's
//!   output is byte for byte the golden file shipped in that same module, so the oracle
//!   drives Istio as Istio's tests do; and meshinit's `print` for the case equals it.
//! - `differential_parity`: a seeded generator of configurations covering everything
//!   `istio-iptables` reads (`generate`); for each, meshinit's `print` and `print
//!   --native-nftables` must equal Istio's rulesets, rule for rule in the same order, or
//!   both must refuse the configuration. The only differences allowed are the ones listed in
//!   `tests/parity-differences.md`, and each listed one must still occur.
//! - `kernel_lists_a_sample_alike` (root): a sample of those configurations, Istio's output
//!   and meshinit's loaded into fresh namespaces, must read back alike from the kernel; the
//!   proof that what the comparison sets aside as spelling is spelling.
//! - `kernel_judges_port_ranges_at_their_edges` (root): configurations whose port lists hold
//!   ranges (meshinit's superset; Istio is given them expanded) are not compared as text;
//!   a sample is judged on real connections at the ranges' edges instead.
//! - `istio_injector_renders_meshinit_for_sample_pods`: Istio's real injector
//!   (`istio-inject-oracle`, the same module) injects sample pods with Istio's template
//!   (meshinit's image swapped in) and with meshinit's `injector-template/`; meshinit, run as
//!   either pod's istio-init, must plan what Istio's code plans for Istio's istio-init.
//!
//! `MESHINIT_PARITY_SEED=N` replays a run (the seed is printed on failure),
//! `MESHINIT_PARITY_CASES=N` asks for more (or fewer) than the default 2,000 configurations,
//! `MESHINIT_PARITY_ONLY=I` runs configuration I of the seed alone.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

use meshinit::config::build::{SettingSpec, SETTINGS};
use meshinit::config::Origin;

use crate::golden::{diff_states, meshinit, replay, OWNER_COMMENT};

const DEFAULT_CASES: usize = 2000;

fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---- The oracle ----

/// The oracle binary and the pinned Istio module's directory (which holds Istio's goldens),
/// built by `interop/istio/build.sh` (a no-op when already built). None when Go is missing
/// outside CI; under CI a failed build fails the test.
fn oracle() -> Option<(PathBuf, PathBuf)> {
    built("rules")
}

/// `interop/istio/build.sh TARGET`: the binary and the Istio module's directory.
pub(crate) fn built(target: &str) -> Option<(PathBuf, PathBuf)> {
    let script = project_dir().join("interop/istio/build.sh");
    let output = Command::new("bash").arg(&script).arg(target).output();
    let failure = match output {
        Ok(out) if out.status.success() => {
            let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            let moddir = std::fs::read_to_string(format!("{}.moddir", bin.display()))
                .expect("build.sh records the module directory beside the binary");
            return Some((bin, PathBuf::from(moddir.trim())));
        }
        Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
        Err(err) => err.to_string(),
    };
    crate::support::skip(
        "Istio parity",
        &format!("the {target} oracle did not build ({failure}); Istio's code not consulted"),
    );
    None
}

/// What Istio answers for one request (see interop/istio/main.go).
#[derive(Debug)]
struct Answer {
    error: Option<String>,
    iptables: Result<(String, String, String), String>,
    nftables: Option<String>,
    nftables_error: Option<String>,
    /// Istio's resolved settings that shape the run, not the rules.
    run: Option<Value>,
    /// The routing Istio set up, as sorted `ip` commands (asked as root only).
    routes: Option<String>,
    /// Istio's run failed setting its routing up, after planning its rules.
    routes_error: Option<String>,
}

impl Answer {
    /// Istio's iptables restore inputs and nftables transaction, when it planned both
    /// without an error.
    fn planned_by_both(&self) -> Option<(&(String, String, String), &String)> {
        match (
            &self.iptables,
            &self.nftables,
            &self.nftables_error,
            &self.error,
        ) {
            (Ok(iptables), Some(nft), None, None) => Some((iptables, nft)),
            _ => None,
        }
    }
}

/// Sends every request to one oracle process, one JSON line each, and reads the answers.
fn ask(bin: &PathBuf, requests: &[Value]) -> Vec<Answer> {
    let mut child = Command::new(bin)
        .arg("rules")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start istio-oracle");
    let mut stdin = child.stdin.take().expect("stdin");
    let input: String = requests.iter().map(|r| format!("{r}\n")).collect();
    // The oracle answers each line as it reads it; write from another thread so neither
    // side waits on a full pipe.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().expect("wait for istio-oracle");
    writer
        .join()
        .expect("writer thread")
        .expect("write requests");
    assert!(
        output.status.success(),
        "istio-oracle failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("utf-8 answers");
    let answers: Vec<Answer> = text
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("an answer is JSON");
            let s = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
            let ipt = &v["iptables"];
            Answer {
                error: s("error"),
                iptables: match s("iptables_error") {
                    Some(err) => Err(err),
                    None => Ok((
                        ipt["ipv4"].as_str().unwrap_or_default().to_owned(),
                        ipt["ipv6"].as_str().unwrap_or_default().to_owned(),
                        ipt["executed"].as_str().unwrap_or_default().to_owned(),
                    )),
                },
                nftables: s("nftables"),
                nftables_error: s("nftables_error"),
                run: v.get("run").cloned(),
                routes: match s("routes_unavailable") {
                    Some(err) => panic!("the oracle could not set Istio's routing up: {err}"),
                    None => s("routes"),
                },
                routes_error: s("routes_error"),
            }
        })
        .collect();
    assert_eq!(answers.len(), requests.len(), "one answer per request");
    answers
}

// ---- The deliberate differences ----

/// The ids of `tests/parity-differences.md`'s table, the one list of allowed differences.
fn documented_differences() -> BTreeSet<String> {
    let path = project_dir().join("tests/parity-differences.md");
    let text = std::fs::read_to_string(&path).expect("tests/parity-differences.md");
    text.lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(id, _)| id.to_owned())
        .collect()
}

const OWNER_COMMENT_ID: &str = "owner-comment";
const SPELLING: &str = "spelling";
const NFT_DECLARES: &str = "nft-declares-jump-targets";
const NFT_WILDCARD: &str = "nft-interface-wildcard";
const REJECTS_MODE: &str = "rejects-interception-mode";
const REJECTS_PORT: &str = "rejects-port";
const REJECTS_MARK: &str = "rejects-tproxy-mark-or-table";
const REJECTS_OWNER: &str = "rejects-owner";
const REJECTS_INTERFACE: &str = "rejects-interface";
const REJECTS_BOOLEAN: &str = "rejects-boolean";
const ACCEPTS_BLANKS: &str = "accepts-blanks";
const MODE_NONE: &str = "mode-none";
const REJECTS_GROUPS: &str = "rejects-owner-groups-beyond-one-rule";
const PORT_RANGES: &str = "port-ranges";
const REJECTS_UNPARSABLE: &str = "rejects-unparsable-number";
const NEGATIVE_TIMEOUT: &str = "negative-probe-timeout-is-zero";
const CLEANUP_ROUTING: &str = "cleanup-only-adds-no-routing";
const VALIDATES_SKIPPED: &str = "validates-when-skipping";
/// Not a difference: marks a value both refuse.
const BOTH: &str = "both refuse";

/// Every id this test knows how to allow; must be exactly the documented ones.
const KNOWN: &[&str] = &[
    OWNER_COMMENT_ID,
    SPELLING,
    NFT_DECLARES,
    NFT_WILDCARD,
    REJECTS_MODE,
    REJECTS_PORT,
    REJECTS_MARK,
    REJECTS_OWNER,
    REJECTS_INTERFACE,
    REJECTS_BOOLEAN,
    ACCEPTS_BLANKS,
    MODE_NONE,
    REJECTS_GROUPS,
    PORT_RANGES,
    REJECTS_UNPARSABLE,
    NEGATIVE_TIMEOUT,
    CLEANUP_ROUTING,
    VALIDATES_SKIPPED,
];

#[test]
fn every_deliberate_difference_is_documented_once() {
    let documented = documented_differences();
    let known: BTreeSet<String> = KNOWN.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(
        documented, known,
        "tests/parity-differences.md and this test's list of allowed differences disagree"
    );
}

// ---- Comparing rulesets ----

/// iptables: Istio's restore input per family against meshinit's `print`, replayed into
/// chains (`golden::replay`, which sets the owner comment aside and unifies spelling).
fn compare_iptables(
    istio: &(String, String, String),
    ours: &str,
    seen: &mut BTreeSet<&'static str>,
) -> Result<(), String> {
    let (v4, v6, _) = istio;
    let mut text = v4.clone();
    if !v6.trim().is_empty() {
        text.push_str("\n# ipv6\n");
        text.push_str(v6);
    }
    let (want, got) = (replay(&text), replay(ours));
    if want != got {
        return Err(diff_states(&want, &got));
    }
    if ours.contains(OWNER_COMMENT) {
        seen.insert(OWNER_COMMENT_ID);
    }
    if text.contains("--to-port ") {
        seen.insert(SPELLING);
    }
    Ok(())
}

/// One nft statement with spelling unified: `meta skuid` is `skuid`, addresses in one form,
/// blanks collapsed; meshinit's `"eth*"` is Istio's `eth+` (noted when it happens).
fn normalise_nft(line: &str, seen: &mut BTreeSet<&'static str>) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut out = Vec::with_capacity(words.len());
    for (i, word) in words.iter().enumerate() {
        if *word == "meta" && matches!(words.get(i + 1), Some(&"skuid") | Some(&"skgid")) {
            continue;
        }
        if let Some(name) = word.strip_prefix('"').and_then(|w| w.strip_suffix("*\"")) {
            seen.insert(NFT_WILDCARD);
            out.push(format!("{name}+"));
            continue;
        }
        let canonical = word
            .parse::<ipnet::IpNet>()
            .map(|n| n.to_string())
            .or_else(|_| word.parse::<std::net::IpAddr>().map(|a| a.to_string()))
            .unwrap_or_else(|_| (*word).to_owned());
        out.push(canonical);
    }
    out.join(" ")
}

/// nftables: Istio's transaction (knftables' dump) against meshinit's `print
/// --native-nftables`, statement for statement in order. Where Istio's transaction was
/// refused for a jump to an undeclared chain, meshinit must declare exactly those chains
/// (`nft-declares-jump-targets`), and nothing else may differ: meshinit's statements
/// without precisely those declarations must be Istio's.
fn compare_nftables(
    istio: &str,
    istio_error: Option<&str>,
    ours: &str,
    seen: &mut BTreeSet<&'static str>,
) -> Result<(), String> {
    let want: Vec<String> = istio
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| normalise_nft(l, seen))
        .collect();
    let mut got: Vec<String> = ours
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| normalise_nft(l, seen))
        .collect();
    if istio.contains("meta skuid") || istio.contains("meta skgid") {
        seen.insert(SPELLING);
    }
    if istio_error.is_some_and(|e| e.contains("no such chain")) {
        let undeclared = undeclared_jump_targets(&want);
        if undeclared.is_empty() {
            return Err(format!(
                "Istio's transaction was refused ({}) but jumps to no undeclared chain",
                istio_error.unwrap_or_default()
            ));
        }
        let expected: BTreeSet<String> = undeclared
            .iter()
            .map(|(table, chain)| format!("add chain inet {table} {chain}"))
            .collect();
        let added: BTreeSet<String> = got
            .iter()
            .filter(|l| l.starts_with("add chain") && !want.contains(l))
            .cloned()
            .collect();
        if added != expected {
            return Err(format!(
                "Istio's transaction jumps to undeclared chains {expected:?}; meshinit declares {added:?} beyond Istio's"
            ));
        }
        got.retain(|l| !expected.contains(l));
        seen.insert(NFT_DECLARES);
    } else if let Some(err) = istio_error {
        return Err(format!(
            "Istio's transaction was refused ({err}) but meshinit's was not"
        ));
    }
    if want == got {
        return Ok(());
    }
    let mut report = String::new();
    for i in 0..want.len().max(got.len()) {
        let (w, g) = (want.get(i), got.get(i));
        if w != g {
            report.push_str(&format!(
                "statement {}:\n  istio:    {}\n  meshinit: {}\n",
                i + 1,
                w.map_or("(none)", String::as_str),
                g.map_or("(none)", String::as_str)
            ));
        }
    }
    Err(report)
}

/// The chains Istio's statements jump to (or go to) without declaring them, by table.
fn undeclared_jump_targets(statements: &[String]) -> Vec<(String, String)> {
    let declared: BTreeSet<(String, String)> = statements
        .iter()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["add", "chain", "inet", table, chain, ..] => {
                    Some(((*table).to_owned(), (*chain).to_owned()))
                }
                _ => None,
            }
        })
        .collect();
    let mut missing = Vec::new();
    for line in statements {
        let w: Vec<&str> = line.split_whitespace().collect();
        let ["add", "rule", "inet", table, ..] = w.as_slice() else {
            continue;
        };
        for pair in w.windows(2) {
            if matches!(pair[0], "jump" | "goto") {
                let key = ((*table).to_owned(), pair[1].to_owned());
                if !declared.contains(&key) && !missing.contains(&key) {
                    missing.push(key);
                }
            }
        }
    }
    missing
}

// ---- meshinit ----

/// `meshinit print ARGS --native-nftables=NATIVE` with exactly `env` (the backend forced
/// last, so it wins over any the configuration chooses): its output, or its error.
fn meshinit_print(
    args: &[String],
    env: &[(String, String)],
    native: bool,
) -> Result<String, String> {
    let mut with = args.to_vec();
    with.push(format!("--native-nftables={native}"));
    meshinit_print_as_given(&with, env)
}

/// `meshinit print ARGS` with exactly `env`: its output, or its error.
fn meshinit_print_as_given(args: &[String], env: &[(String, String)]) -> Result<String, String> {
    let mut cmd = Command::new(meshinit());
    cmd.env_clear().arg("print");
    cmd.args(args);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let out = cmd.output().expect("run meshinit");
    match out.status.code() {
        Some(0) => Ok(String::from_utf8(out.stdout).expect("utf-8 output")),
        Some(1) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        code => panic!(
            "meshinit print {args:?} exited {code:?} (expected 0, or 1 for bad input): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

// ---- The generator ----

/// splitmix64: small, seedable, and the same on every platform, so a seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// A value meshinit refuses and Istio passes on: the deliberate difference (id of
/// tests/parity-differences.md) it exercises, and the setting and whole value meshinit's
/// refusal must name, exactly (`invalid value VALUE for ORIGIN`).
#[derive(Debug, Clone)]
struct Reject {
    id: &'static str,
    origin: String,
    value: String,
}

/// One generated configuration: `istio-iptables` flags and environment, plus the two facts
/// Istio reads off the machine (IPv6, resolv.conf's servers), which meshinit takes as flags.
#[derive(Debug, Default)]
struct Config {
    args: Vec<String>,
    env: Vec<(String, String)>,
    ipv6: bool,
    dns: Vec<String>,
    /// Values meshinit refuses and Istio passes on; meshinit's refusal must name one.
    rejects: Vec<Reject>,
    /// Values both refuse (id `BOTH`): where they were set, so that either side's refusal,
    /// when several settings are bad, can be checked against one of them.
    refused_by_both: Vec<Reject>,
    /// Refused values of the setting being generated, until `set` knows where it went.
    pending: Vec<&'static str>,
    /// Holds list items with blanks around them.
    blanks: bool,
    /// Interception mode NONE, which meshinit takes as "capture nothing".
    mode_none: bool,
    /// Sets an option that shapes the run rather than the rules (validation, skipping,
    /// cleanup-only, a namespace, a backend): not for tests that apply the rules.
    shapes_run: bool,
    /// Port ranges (first, last) its port lists hold: meshinit's superset of Istio's lists
    /// (deliberate difference `port-ranges`). Istio, and meshinit for the comparison of
    /// everything else, are given the lists with each range expanded to its ports; meshinit
    /// must accept the ranges themselves, and the kernel judges them on real traffic at the
    /// ranges' edges (`kernel_judges_port_ranges_at_their_edges`).
    ranges: Vec<(u16, u16)>,
}

/// The settings that hold port lists, by flag and by environment variable.
const PORT_LIST_SETTINGS: &[&str] = &[
    "istio-inbound-ports",
    "istio-local-exclude-ports",
    "istio-outbound-ports",
    "istio-local-outbound-ports-exclude",
];

/// meshinit's row for Istio's flag `--long`: its short name and environment variables.
fn spec(long: &str) -> &'static SettingSpec {
    SETTINGS
        .iter()
        .find(|s| s.long == Some(long))
        .unwrap_or_else(|| panic!("meshinit has no --{long}"))
}

/// A command-line argument or environment variable, as the setting it sets (its long flag,
/// or the variable for environment-only ones), when it is one of those holding port lists.
fn port_list_setting(name: &str) -> bool {
    let long = name
        .trim_start_matches('-')
        .split('=')
        .next()
        .unwrap_or_default();
    let by_short = SETTINGS
        .iter()
        .find(|s| name.len() == 2 && name.starts_with('-') && s.short == name.chars().nth(1));
    let by_env = SETTINGS.iter().find(|s| s.envs.contains(&name));
    let spec = by_short
        .or(by_env)
        .or_else(|| SETTINGS.iter().find(|s| s.long == Some(long)));
    spec.and_then(|s| s.long)
        .is_some_and(|l| PORT_LIST_SETTINGS.contains(&l))
}

/// A port list with each range `a-b` written out as its ports (`a,a+1,...,b`): what Istio,
/// which has no ranges, is given for meshinit's list. Other items are kept as they are.
fn expand_ranges(list: &str) -> String {
    list.split(',')
        .map(|item| {
            let range = item.trim().split_once('-').and_then(|(a, b)| {
                let (a, b) = (a.parse::<u16>().ok()?, b.parse::<u16>().ok()?);
                (a <= b).then_some((a, b))
            });
            match range {
                Some((a, b)) => (a..=b).map(|p| p.to_string()).collect::<Vec<_>>().join(","),
                None => item.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Flag values that a later occurrence or the flag itself overrides: never in effect.
const DECOYS: &[&str] = &["garbage", "", "1,2", "-x"];

impl Config {
    /// Notes that `value` is one meshinit refuses (deliberate difference `id`).
    fn refuse<'v>(&mut self, id: &'static str, value: &'v str) -> &'v str {
        self.pending.push(id);
        value
    }

    /// Notes that `value` is one both refuse.
    fn bad<'v>(&mut self, value: &'v str) -> &'v str {
        self.pending.push(BOTH);
        value
    }

    /// The refusals noted while making `value`, now that it is known where it went.
    fn settle(&mut self, origin: &Origin, value: &str) {
        for id in std::mem::take(&mut self.pending) {
            let reject = Reject {
                id,
                origin: origin.to_string(),
                value: value.to_owned(),
            };
            if id == BOTH {
                self.refused_by_both.push(reject);
            } else {
                self.rejects.push(reject);
            }
        }
    }

    /// `--long` with `value` in one of pflag's forms: `-s VALUE`, `--long VALUE`, `--long=VALUE`.
    fn push_flag(&mut self, rng: &mut Rng, spec: &SettingSpec, value: &str) -> Origin {
        let long = spec.long.expect("a flag");
        match (spec.short, rng.below(3)) {
            (Some(short), 0) => self.args.extend([format!("-{short}"), value.to_owned()]),
            (_, 1) => self.args.push(format!("--{long}={value}")),
            _ => self.args.extend([format!("--{long}"), value.to_owned()]),
        }
        Origin::Flag {
            long,
            short: spec.short,
        }
    }

    /// Sets Istio's setting `--long` in one of the forms Istio reads: the flag in each of
    /// pflag's spellings, an environment variable (any alias), both (the flag wins over a
    /// decoy), or the flag repeated (the last wins over a decoy). `decoy` is what an
    /// overridden value may be; `typed`: pflag parses it (and both refuse the decoys).
    /// `unparsable_in_env`: Istio's binding
    /// silently takes the zero value for this one in the environment, and meshinit refuses.
    fn set_with(
        &mut self,
        rng: &mut Rng,
        long: &str,
        value: String,
        typed: bool,
        unparsable_in_env: bool,
    ) {
        let spec = spec(long);
        let env = (!spec.envs.is_empty()).then(|| spec.envs[rng.below(spec.envs.len())]);
        let decoy = DECOYS[rng.below(DECOYS.len())];
        let origin = match (env, rng.below(100)) {
            (Some(env), 0..=21) => {
                self.env.push((env.to_owned(), value.clone()));
                if unparsable_in_env {
                    self.pending.push(REJECTS_UNPARSABLE);
                }
                Origin::Env(env.to_owned())
            }
            (_, 38..) if unparsable_in_env => {
                self.pending.push(BOTH);
                self.push_flag(rng, spec, &value)
            }
            (Some(env), 22..=29) => {
                self.env.push((env.to_owned(), decoy.to_owned()));
                if unparsable_in_env {
                    self.pending.push(BOTH);
                }
                self.push_flag(rng, spec, &value)
            }
            (_, 30..=37) => {
                // pflag parses the overridden value of a typed flag too: none of the decoys
                // is a port or a duration, so both refuse it.
                let origin = self.push_flag(rng, spec, decoy);
                if typed {
                    self.pending.push(BOTH);
                    self.settle(&origin, decoy);
                }
                if unparsable_in_env {
                    self.pending.push(BOTH);
                }
                self.push_flag(rng, spec, &value)
            }
            _ => self.push_flag(rng, spec, &value),
        };
        self.settle(&origin, &value);
    }

    fn set(&mut self, rng: &mut Rng, long: &str, value: String) {
        self.set_with(rng, long, value, false, false);
    }

    /// An environment-only setting.
    fn set_env(&mut self, name: &str, value: String) {
        self.settle(&Origin::Env(name.to_owned()), &value);
        self.env.push((name.to_owned(), value));
    }

    /// A boolean: the bare flag (or its short name), `--flag=VALUE` in Go's spellings, the
    /// flag repeated, an environment variable with one of Go's spellings (now and then an
    /// empty or unparsable one), two aliases at once (the later one wins in Istio, even
    /// empty), or a variable and the flag.
    fn set_bool(&mut self, rng: &mut Rng, long: &str) {
        const GO: &[&str] = &["true", "1", "T", "TRUE", "True", "false", "0", "F", "f", ""];
        let spec = spec(long);
        let flag = |c: &mut Config, rng: &mut Rng| match spec.short {
            Some(short) if rng.chance(50) => c.args.push(format!("-{short}")),
            _ => c.args.push(format!("--{long}")),
        };
        let envs = spec.envs;
        match rng.below(100) {
            0..=34 => flag(self, rng),
            35..=46 => {
                let v = rng.pick(&GO[..GO.len() - 1]);
                self.args.push(format!("--{long}={v}"));
            }
            47..=52 => {
                // pflag parses the overridden one too: "yes" is refused by both.
                let v = rng.pick(&["false", "true", "0", "yes"]);
                self.args.push(format!("--{long}={v}"));
                if v == "yes" {
                    self.pending.push(BOTH);
                    self.settle(
                        &Origin::Flag {
                            long: spec.long.expect("a flag"),
                            short: spec.short,
                        },
                        v,
                    );
                }
                flag(self, rng);
            }
            _ if envs.is_empty() => flag(self, rng),
            53..=74 => {
                let name = envs[rng.below(envs.len())];
                // The comparison forces the backend by flag, so NATIVE_NFTABLES is never read.
                let value = if rng.chance(4) && long != "native-nftables" {
                    self.refuse(REJECTS_BOOLEAN, rng.pick(&["yes", "on"]))
                } else {
                    rng.pick(GO)
                };
                self.set_env(name, value.to_owned());
            }
            75..=84 if envs.len() > 1 => {
                // Istio reads the aliases in order; the last one set decides.
                let (weaker, stronger) = (rng.pick(GO), rng.pick(GO));
                self.env.push((envs[0].to_owned(), weaker.to_owned()));
                self.env.push((envs[1].to_owned(), stronger.to_owned()));
            }
            _ => {
                let name = envs[rng.below(envs.len())];
                let value = rng.pick(&["true", "false", "yes", ""]);
                self.env.push((name.to_owned(), value.to_owned()));
                flag(self, rng);
            }
        }
    }
    fn list(&mut self, rng: &mut Rng, pool: &[&str], max: usize) -> String {
        let mut items: Vec<String> = Vec::new();
        for _ in 0..=rng.below(max) {
            let item = match items.last() {
                // Duplicates are kept as Istio keeps them: one rule each.
                Some(last) if rng.chance(10) => last.clone(),
                _ if rng.chance(4) => String::new(),
                _ => rng.pick(pool).to_owned(),
            };
            items.push(item);
        }
        if rng.chance(4) {
            // Blanks around items, but no item of blanks alone: Istio would write a rule
            // matching an empty value, which iptables and nft refuse.
            self.blanks = true;
            items.retain(|item| !item.is_empty());
            return items.join(", ");
        }
        items.join(",")
    }

    fn ports(&mut self, rng: &mut Rng) -> String {
        const PORTS: &[&str] = &[
            "80", "443", "8080", "15001", "15006", "15008", "15020", "53", "1", "65535", "9090",
            "31000", "32000", "3306",
        ];
        // Ranges meshinit takes and Istio does not: small ones (Istio gets them expanded,
        // one rule per port), at the ends of the port space, of one port, around Istio's
        // own ports.
        const RANGES: &[(u16, u16)] = &[
            (8000, 8020),
            (15000, 15010),
            (1, 20),
            (65520, 65535),
            (80, 80),
            (3306, 3307),
            (31000, 31005),
            (15006, 15008),
        ];
        let mut list = self.list(rng, PORTS, 4);
        if rng.chance(12) {
            let (a, b) = RANGES[rng.below(RANGES.len())];
            if !list.is_empty() || rng.chance(50) {
                list.push(',');
            }
            list.push_str(&format!("{a}-{b}"));
            self.ranges.push((a, b));
        }
        if rng.chance(3) {
            list.push(',');
            list.push_str(self.refuse(REJECTS_PORT, rng.pick(&["0", "70000", "http", "*"])));
        }
        list
    }

    fn cidrs(&mut self, rng: &mut Rng) -> String {
        const CIDRS: &[&str] = &[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3/32",
            "192.168.0.0/16",
            "0.0.0.0/0",
            "127.1.2.3/32",
            "127.0.0.0/8",
            "169.254.169.254/32",
            "10.1.2.3/8",
            "2001:db8::/32",
            "fd00::/8",
            "::1/128",
            "::/0",
            "2001:db8::1/128",
            "fe80::/10",
            "::ffff:10.0.0.0/104",
        ];
        let mut list = self.list(rng, CIDRS, 4);
        if rng.chance(3) {
            // Not a CIDR (an address; a prefix length with a leading zero, which Go's
            // netip.ParsePrefix refuses): both refuse.
            list.push(',');
            let bad = rng.pick(&["10.0.0.1", "10.0.0.0/08", "2001:db8::/032"]);
            list.push_str(self.bad(bad));
        }
        list
    }

    fn owners(&mut self, rng: &mut Rng) -> String {
        let mut list = self.list(
            rng,
            &["1337", "0", "1000", "3", "4", "nobody", "istio-proxy"],
            3,
        );
        if rng.chance(2) {
            list.push(',');
            list.push_str(self.refuse(REJECTS_OWNER, "bad name"));
        }
        list
    }

    fn interfaces(&mut self, rng: &mut Rng) -> String {
        let mut list = self.list(rng, &["eth1", "not-istio-nic", "net1", "veth+", "eth0"], 3);
        if rng.chance(3) {
            list.push(',');
            let bad = rng.pick(&["bad/if", "a-very-long-ifname", "a:b"]);
            list.push_str(self.refuse(REJECTS_INTERFACE, bad));
        }
        list
    }
}

fn generate(rng: &mut Rng) -> Config {
    let mut c = Config {
        ipv6: rng.chance(50),
        ..Config::default()
    };
    let r = rng;
    if r.chance(10) {
        let v = r.pick(&["15001", "15101"]).to_owned();
        c.set(r, "envoy-port", v);
    }
    if r.chance(10) {
        let v = r.pick(&["15006", "15106"]).to_owned();
        c.set(r, "inbound-capture-port", v);
    }
    if r.chance(10) {
        let v = r.pick(&["15008", "15009", "8443"]).to_owned();
        c.set(r, "inbound-tunnel-port", v);
    }
    if r.chance(85) {
        let v = c.owners(r);
        c.set(r, "proxy-uid", v);
    } else if r.chance(40) {
        // No uid: both look this user up on this machine (1337 if it has none).
        let user = r.pick(&["root", "nobody", "no-such-user"]);
        c.set_env("ENVOY_USER", user.to_owned());
    }
    if r.chance(40) {
        let v = c.owners(r);
        c.set(r, "proxy-gid", v);
    }
    const MODE: &str = "istio-inbound-interception-mode";
    match r.below(100) {
        0..=39 => {}
        40..=59 => c.set(r, MODE, "REDIRECT".into()),
        60..=96 => c.set(r, MODE, "TPROXY".into()),
        97 => {
            c.mode_none = true;
            c.set(r, MODE, "NONE".into());
        }
        _ => {
            let v = c
                .refuse(REJECTS_MODE, r.pick(&["tproxy", "FOO", "redirect"]))
                .to_owned();
            c.set(r, MODE, v);
        }
    }
    if r.chance(25) {
        let v = if r.chance(8) {
            c.refuse(REJECTS_MARK, r.pick(&["0", "1338", "x"]))
        } else {
            r.pick(&["1337", "100", "4242"])
        };
        c.set(r, "istio-inbound-tproxy-mark", v.to_owned());
    }
    if r.chance(20) {
        let v = if r.chance(8) {
            c.refuse(REJECTS_MARK, r.pick(&["0", "254", "x"]))
        } else {
            r.pick(&["133", "100", "1000"])
        };
        c.set(r, "istio-inbound-tproxy-route-table", v.to_owned());
    }
    const INBOUND: &str = "istio-inbound-ports";
    match r.below(100) {
        0..=19 => {}
        20..=29 => c.set(r, INBOUND, String::new()),
        30..=64 => c.set(r, INBOUND, "*".into()),
        _ => {
            let v = c.ports(r);
            c.set(r, INBOUND, v);
        }
    }
    if r.chance(40) {
        let v = c.ports(r);
        c.set(r, "istio-local-exclude-ports", v);
    }
    const INCLUDE: &str = "istio-service-cidr";
    match r.below(100) {
        0..=24 => {}
        25..=34 => c.set(r, INCLUDE, String::new()),
        35..=59 => c.set(r, INCLUDE, "*".into()),
        _ => {
            let v = c.cidrs(r);
            c.set(r, INCLUDE, v);
        }
    }
    if r.chance(45) {
        // "*" here is refused by both.
        let v = if r.chance(3) {
            c.bad("*").to_owned()
        } else {
            c.cidrs(r)
        };
        c.set(r, "istio-service-exclude-cidr", v);
    }
    if r.chance(20) {
        let v = c.ports(r);
        c.set(r, "istio-outbound-ports", v);
    }
    if r.chance(25) {
        let v = c.ports(r);
        c.set(r, "istio-local-outbound-ports-exclude", v);
    }
    if r.chance(15) {
        let v = c.interfaces(r);
        c.set(r, "istio-exclude-interfaces", v);
    }
    if r.chance(15) {
        let v = c.interfaces(r);
        c.set(r, "kube-virt-interfaces", v);
    }
    // Owner groups: environment only; Istio allows at most 64 included.
    match r.below(100) {
        0..=59 => {}
        60..=69 => c.set_env("ISTIO_OUTBOUND_OWNER_GROUPS", "*".into()),
        70..=95 => {
            let v = c.list(r, &["java", "202", "888", "ftp", "1337"], 5);
            c.set_env("ISTIO_OUTBOUND_OWNER_GROUPS", v);
        }
        _ => {
            // Around Istio's 64 and each backend's limit in one rule (49, 63).
            let n = *[48usize, 49, 50, 63, 64, 65].get(r.below(6)).unwrap_or(&64);
            let v: Vec<String> = (0..n).map(|i| (2000 + i).to_string()).collect();
            if n > 64 {
                c.bad("");
            }
            c.set_env("ISTIO_OUTBOUND_OWNER_GROUPS", v.join(","));
        }
    }
    if r.chance(25) {
        let v = c.list(r, &["java", "202", "888", "ftp", "1337"], 4);
        c.set_env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", v);
    }
    if r.chance(45) {
        c.set_bool(r, "redirect-dns");
        if r.chance(25) {
            c.set_bool(r, "capture-all-dns");
        }
        for _ in 0..r.below(4) {
            let server = r.pick(&[
                "10.96.0.10",
                "8.8.8.8",
                "127.0.0.53",
                "fd00::a",
                "::127.0.0.53",
                "2001:db8::53",
            ]);
            c.dns.push(server.to_owned());
        }
    }
    if r.chance(15) {
        c.set_bool(r, "drop-invalid");
    }
    if r.chance(10) {
        c.set_bool(r, "dual-stack");
    }
    if r.chance(12) {
        // The last three are refused by both (not loopback; mask wider than /8; a prefix
        // length with a leading zero).
        let v = match r.below(7) {
            0 => c.bad("10.0.0.1/32"),
            1 => c.bad("127.0.0.1/4"),
            2 => c.bad("127.0.0.1/08"),
            _ => r.pick(&[
                "127.0.0.1/8",
                "127.0.0.0/16",
                "127.0.0.1/32",
                "127.1.2.3/24",
            ]),
        };
        c.set_env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", v.to_owned());
    }
    // The settings that shape the run rather than the rules: compared with Istio's resolved
    // settings (`# run:` of meshinit's print), and what they make apply do.
    for long in [
        "run-validation",
        "skip-rule-apply",
        "cleanup-only",
        "reconcile",
        "force-apply",
        "cni-mode",
        "native-nftables",
        "dry-run",
    ] {
        if r.chance(if long == "cleanup-only" || long == "skip-rule-apply" {
            5
        } else {
            8
        }) {
            c.shapes_run = true;
            c.set_bool(r, long);
            if long == "skip-rule-apply" && r.chance(40) {
                // Istio, planning nothing, never parses it (`validates-when-skipping`).
                let v = c.bad("10.0.0.0/08").to_owned();
                c.set(r, "istio-service-exclude-cidr", v);
            }
        }
    }
    if r.chance(12) {
        // Go durations; a bare number is not one: refused by both as a flag, and by meshinit
        // from the environment, where Istio silently takes 0.
        let (v, bad) = match r.below(12) {
            0 => ("5", true),
            1 => ("", true),
            2 => ("1x", true),
            _ => (
                r.pick(&[
                    "5s", "1s", "0", "0s", "-1s", "-5m", "1m30s", "250ms", ".5s", "+2s", "1.5h",
                ]),
                false,
            ),
        };
        c.set_with(r, "probe-timeout", v.to_owned(), true, bad);
    }
    if r.chance(12) {
        // pflag's uint16: Go's number syntax (0x, 0o, leading-zero octal, `_`); 0 is taken
        // by Istio (a probe to port 0) and refused by meshinit; anything past 65535 or not a
        // number is refused by both as a flag, and by meshinit from the environment, where
        // Istio silently takes 65535 or 0.
        let (v, bad) = match r.below(14) {
            0 => ("65536", true),
            1 => ("abc", true),
            2 => ("-1", true),
            3 => ("", true),
            4 => (c.refuse(REJECTS_PORT, "0"), false),
            _ => (
                r.pick(&[
                    "15002", "15020", "0x3a9a", "035232", "1_000", "65535", "1", "0o17",
                ]),
                false,
            ),
        };
        c.set_with(r, "iptables-probe-port", v.to_owned(), true, bad);
    }
    if r.chance(6) {
        c.shapes_run = true;
        let v = r
            .pick(&["", "/var/run/netns/pod", "/proc/1/ns/net"])
            .to_owned();
        c.set(r, "network-namespace", v);
    }
    if r.chance(6) {
        c.shapes_run = true;
        // The last two are refused by both (Istio's Validate takes "", legacy or nft only).
        let v = match r.below(5) {
            0 => c.bad("iptables"),
            1 => c.bad(" nft"),
            _ => r.pick(&["", "legacy", "nft"]),
        };
        c.set(r, "force-iptables-binary", v.to_owned());
    }
    if r.chance(8) {
        // pilot-agent's logging flags, which Istio's injection template passes.
        let v = r.pick(&["default:info", "default:debug,iptables:info", "all:none"]);
        if r.chance(50) {
            c.args.push(format!("--log_output_level={v}"));
        } else {
            c.args
                .extend(["--log_output_level".to_owned(), v.to_owned()]);
        }
    }
    c
}

/// The configuration for case `index` of a run seeded with `seed`: each case has its own
/// generator, so one case replays alone.
fn case(seed: u64, index: usize) -> Config {
    let mut rng = Rng(seed ^ (index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    generate(&mut rng)
}

impl Config {
    /// The arguments and environment with every port range expanded (what Istio is given),
    /// and, with `trim`, blanks around list items removed.
    fn rewritten(&self, trim: bool) -> (Vec<String>, Vec<(String, String)>) {
        let fix = |value: &str| {
            let value = expand_ranges(value);
            if trim {
                value
                    .split(',')
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                value
            }
        };
        let env = self
            .env
            .iter()
            .map(|(k, v)| {
                let v = if port_list_setting(k) || trim {
                    fix(v)
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect();
        let mut args = self.args.clone();
        for i in 0..args.len() {
            if let Some((flag, value)) = args[i].split_once('=') {
                if flag.starts_with("--") && (port_list_setting(flag) || trim) {
                    args[i] = format!("{flag}={}", fix(value));
                }
            } else if i > 0 && (port_list_setting(&args[i - 1]) || trim) {
                args[i] = fix(&args[i]);
            }
        }
        (args, env)
    }

    /// What Istio is asked: the configuration, with port ranges expanded (and with `trim`,
    /// blanks around list items removed).
    fn request(&self, trim: bool, routes: bool) -> Value {
        let (args, env) = self.rewritten(trim);
        let env: BTreeMap<String, String> = env.into_iter().collect();
        json!({"args": args, "env": env, "ipv6": self.ipv6, "dns_servers": self.dns, "routes": routes})
    }

    /// meshinit's arguments: the same flags, plus what Istio would have read off the machine.
    fn meshinit_args(&self) -> Vec<String> {
        with_ipv6(self.args.clone(), self.ipv6, &self.dns)
    }

    /// meshinit's arguments and environment with the port ranges expanded, as Istio's are.
    fn meshinit_expanded(&self) -> (Vec<String>, Vec<(String, String)>) {
        let (args, env) = self.rewritten(false);
        (with_ipv6(args, self.ipv6, &self.dns), env)
    }

    fn describe(&self) -> String {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        format!(
            "env [{}] meshinit print {:?}",
            env.join(" "),
            self.meshinit_args()
        )
    }
}

fn with_ipv6(mut args: Vec<String>, ipv6: bool, dns: &[String]) -> Vec<String> {
    args.push(if ipv6 { "--ipv6" } else { "--no-ipv6" }.to_owned());
    args.push("--dns-servers".to_owned());
    args.push(dns.join(","));
    args
}
// ---- The verdict for one configuration ----

/// How a backend's verdicts went, for the run's summary: rulesets compared equal, both
/// refused (naming the same setting), meshinit refused a listed value, meshinit accepted
/// blanks Istio fails on (and planned what Istio plans without them).
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    compared: usize,
    both_refused: usize,
    refused_listed: usize,
    blanks: usize,
}

/// The setting a refusal is about, as the long flag (or, for an environment-only setting,
/// the variable): meshinit's `invalid value V for ORIGIN` and `ORIGIN lists ...`.
fn meshinit_blame(why: &str) -> Option<String> {
    if let Some(rest) = why.split(" for --").nth(1) {
        return rest.split([' ', ':']).next().map(str::to_owned);
    }
    let rest = why.split("environment variable ").nth(1)?;
    let name = rest.split([' ', ':']).next()?;
    Some(setting_of_env(name))
}

/// Whether meshinit's refusal names exactly this setting and whole value (as meshinit was
/// given it: port ranges expanded).
fn names_exactly(why: &str, reject: &Reject) -> bool {
    [reject.value.clone(), expand_ranges(&reject.value)]
        .iter()
        .any(|value| why.contains(&format!("invalid value {value:?} for {}:", reject.origin)))
}

/// The setting an origin (`--long (-s)`, `environment variable NAME`) names.
fn canonical(origin: &str) -> String {
    match origin.strip_prefix("environment variable ") {
        Some(name) => setting_of_env(name),
        None => origin
            .trim_start_matches("--")
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

/// The long flag an environment variable sets, or the variable for environment-only ones.
fn setting_of_env(name: &str) -> String {
    SETTINGS
        .iter()
        .find(|s| s.envs.contains(&name))
        .and_then(|s| s.long)
        .map_or_else(|| name.to_owned(), str::to_owned)
}

/// The setting Istio's error is about: pflag names the flag; Istio's Validate names the
/// variable (or its check); netip.ParsePrefix names only the value, which is found in the
/// settings that hold CIDRs.
fn istio_blame(err: &str, config: &Config) -> Option<String> {
    if let Some(rest) = err.split("\" for \"").nth(1) {
        // invalid argument "V" for "-s, --long" flag
        let flag = rest.split('"').next()?;
        return flag.rsplit("--").next().map(str::to_owned);
    }
    // tproxy.ConfigureRoutes, after the rules.
    if err.contains("InboundTProxyMark") {
        return Some("istio-inbound-tproxy-mark".into());
    }
    // The kernel refuses a rule for table 0 (EINVAL).
    if err.contains("InboundTProxyRouteTable") || err.contains("failed to configure netlink rule") {
        return Some("istio-inbound-tproxy-route-table".into());
    }
    if err.contains("OUTBOUND_IP_RANGES_EXCLUDE") {
        return Some("istio-service-exclude-cidr".into());
    }
    if err.contains("FORCE_IPTABLES_BINARY") {
        return Some("force-iptables-binary".into());
    }
    if err.contains("owner groups") {
        return Some("ISTIO_OUTBOUND_OWNER_GROUPS".into());
    }
    if err.contains("loopback")
        || err.contains("mask in range")
        || err.contains("failed to parse CIDR")
    {
        return Some("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR".into());
    }
    let value = err.split("ParsePrefix(\"").nth(1)?.split('"').next()?;
    ["istio-service-cidr", "istio-service-exclude-cidr"]
        .into_iter()
        .find(|long| {
            config
                .effective(long)
                .is_some_and(|v| v.split(',').any(|item| item == value))
        })
        .map(str::to_owned)
}

impl Config {
    /// The value Istio and meshinit take for `--long`: the last flag, else the strongest
    /// variable set.
    fn effective(&self, long: &str) -> Option<String> {
        // Walk the arguments as pflag does: a flag that takes a value takes the next
        // argument, whatever it looks like (`-b -x` sets -b to "-x").
        let takes_value = |arg: &str| {
            arg == "--log_output_level"
                || SETTINGS.iter().any(|s| {
                    !s.is_bool
                        && (s.long.is_some_and(|l| arg == format!("--{l}"))
                            || s.short.is_some_and(|c| arg == format!("-{c}")))
                })
        };
        let spec = spec(long);
        let names = [
            Some(format!("--{long}")),
            spec.short.map(|s| format!("-{s}")),
        ];
        let mut flag = None;
        let mut i = 0;
        while i < self.args.len() {
            let arg = &self.args[i];
            if let Some(value) = arg.strip_prefix(&format!("--{long}=")) {
                flag = Some(value.to_owned());
            } else if takes_value(arg) {
                if names.iter().flatten().any(|n| n == arg) {
                    flag = self.args.get(i + 1).cloned();
                }
                i += 1;
            }
            i += 1;
        }
        flag.or_else(|| {
            spec.envs.iter().rev().find_map(|name| {
                self.env
                    .iter()
                    .rev()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            })
        })
    }
}

/// What a run's judge needs of Istio's answer for one backend.
struct Istio<'a> {
    error: Option<&'a str>,
    /// Istio planned nothing (--skip-rule-apply).
    skipped: bool,
    /// Istio's answer for the configuration with blanks around list items removed.
    trimmed: Option<&'a Answer>,
}

fn judge(
    tally: &mut Tally,
    config: &Config,
    istio: Istio<'_>,
    ours: &Result<String, String>,
    compare: impl FnOnce(&str, &mut BTreeSet<&'static str>) -> Result<(), String>,
    compare_trimmed: impl FnOnce(&Answer, &str, &mut BTreeSet<&'static str>) -> Result<(), String>,
    seen: &mut BTreeSet<&'static str>,
) -> Result<(), String> {
    match (istio.error, ours) {
        (None, Ok(ours)) if config.mode_none && config.rejects.is_empty() => {
            // Istio plans REDIRECT; meshinit must plan nothing at all.
            if ours
                .lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
            {
                return Err(format!("mode NONE, yet meshinit planned rules:\n{ours}"));
            }
            seen.insert(MODE_NONE);
            Ok(())
        }
        (None, Ok(ours)) => {
            if !config.rejects.is_empty() {
                return Err(format!(
                    "meshinit accepted a value the differences list says it refuses ({:?})",
                    config.rejects
                ));
            }
            tally.compared += 1;
            compare(ours, seen)
        }
        (Some(err), Err(why)) => {
            let (want, got) = (istio_blame(err, config), meshinit_blame(why));
            // With several bad settings each side may meet another first: then each must
            // name one the generator made bad (meshinit by exact setting and value).
            let named = |r: &&Reject| Some(canonical(&r.origin)) == got;
            let exactly = |r: &&Reject| names_exactly(why, r);
            let meshinit_ok = got.is_some()
                && (got == want
                    || config
                        .rejects
                        .iter()
                        .chain(&config.refused_by_both)
                        .any(|r| named(&r) && exactly(&r)));
            // Istio fails on blanks around items (`accepts-blanks`), which meshinit takes.
            let blanks = config.blanks && err.contains("ParsePrefix(\" ");
            let istio_ok = want.is_some()
                && (want == got
                    || blanks
                    // A value meshinit refuses that Istio fails on later (a TPROXY mark
                    // `x` when it sets the routing up), or one both refuse.
                    || config
                        .refused_by_both
                        .iter()
                        .chain(&config.rejects)
                        .any(|r| Some(canonical(&r.origin)) == want));
            if !(meshinit_ok && istio_ok) {
                return Err(format!(
                    "both refuse, but not for the same setting: Istio ({want:?}): {err}\n  meshinit ({got:?}): {why}"
                ));
            }
            tally.both_refused += 1;
            Ok(())
        }
        (None, Err(why))
            if istio.skipped && config.refused_by_both.iter().any(|r| names_exactly(why, r)) =>
        {
            // Istio plans nothing with --skip-rule-apply, so never parses the lists.
            seen.insert(VALIDATES_SKIPPED);
            tally.refused_listed += 1;
            Ok(())
        }
        (None, Err(why)) if !config.rejects.is_empty() => {
            // The refusal must be for one of the values listed as refused, by exactly the
            // setting and whole value, not another.
            let quoted: Vec<&Reject> = config
                .rejects
                .iter()
                .filter(|r| names_exactly(why, r))
                .collect();
            if quoted.is_empty() {
                return Err(format!(
                    "meshinit refused for another reason than {:?}: {why}",
                    config.rejects
                ));
            }
            seen.extend(quoted.iter().map(|r| r.id));
            tally.refused_listed += 1;
            Ok(())
        }
        (None, Err(why)) => Err(format!("meshinit refused what Istio accepts: {why}")),
        (Some(err), Ok(ours)) if config.blanks && err.contains("ParsePrefix") => {
            // Istio fails on the blanks; without them it must plan what meshinit plans.
            let Some(trimmed) = istio.trimmed else {
                return Err(format!("no answer from Istio without the blanks ({err})"));
            };
            if config.mode_none {
                // Without the blanks Istio plans REDIRECT; meshinit, rightly, nothing.
                if ours
                    .lines()
                    .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
                {
                    return Err(format!("mode NONE, yet meshinit planned rules:\n{ours}"));
                }
                seen.insert(MODE_NONE);
            } else {
                compare_trimmed(trimmed, ours, seen).map_err(|diff| {
                    format!("with the blanks trimmed, Istio plans otherwise:\n{diff}")
                })?;
            }
            seen.insert(ACCEPTS_BLANKS);
            tally.blanks += 1;
            Ok(())
        }
        (Some(err), Ok(_)) => Err(format!("meshinit accepted what Istio refuses: {err}")),
    }
}

/// What a run observed: the deliberate differences it needed, and the verdicts per backend
/// (iptables, nftables), and how many run settings and routing tables were compared.
#[derive(Debug, Default)]
struct Observed {
    seen: BTreeSet<&'static str>,
    tally: [Tally; 2],
    settings_compared: usize,
    routes_compared: usize,
}

impl Observed {
    fn merge(&mut self, other: Observed) {
        self.seen.extend(other.seen);
        for (mine, theirs) in self.tally.iter_mut().zip(other.tally) {
            mine.compared += theirs.compared;
            mine.both_refused += theirs.both_refused;
            mine.refused_listed += theirs.refused_listed;
            mine.blanks += theirs.blanks;
        }
        self.settings_compared += other.settings_compared;
        self.routes_compared += other.routes_compared;
    }
}

/// How many owner groups `config` includes, when that is more than `limit`: what a backend
/// can hold in its one rule, so meshinit refuses it (deliberate difference `REJECTS_GROUPS`).
fn groups_beyond(config: &Config, limit: usize) -> Option<usize> {
    let (_, value) = config
        .env
        .iter()
        .find(|(name, _)| name == "ISTIO_OUTBOUND_OWNER_GROUPS")?;
    let count = value.split(',').filter(|g| !g.trim().is_empty()).count();
    (value.trim() != "*" && count > limit).then_some(count)
}

/// For a configuration with more owner groups than `limit`: meshinit must refuse it, naming
/// the count and the limit (or refuse it for another listed value). `None`: not such a case.
fn judge_group_limit(
    config: &Config,
    limit: usize,
    ours: &Result<String, String>,
    tally: &mut Tally,
    seen: &mut BTreeSet<&'static str>,
) -> Option<Result<(), String>> {
    let count = groups_beyond(config, limit)?;
    Some(match ours {
        Err(why)
            if why.contains(&format!("lists {count} groups"))
                && why.contains(&format!("at most {limit}")) =>
        {
            seen.insert(REJECTS_GROUPS);
            tally.refused_listed += 1;
            Ok(())
        }
        // Refused first for another value the list names: the judge decides.
        Err(_) => return None,
        Ok(_) => Err(format!(
            "meshinit accepted {count} owner groups, more than its limit of {limit}"
        )),
    })
}

/// The `# run:` line of meshinit's print, as option → value.
fn run_line(ours: &str) -> Option<BTreeMap<String, String>> {
    let line = ours.lines().find_map(|l| l.strip_prefix("# run: "))?;
    Some(
        line.split(" --")
            .filter_map(|kv| kv.trim_start_matches("--").split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect(),
    )
}

/// meshinit's resolved run settings (its print's `# run:` line) against Istio's.
fn compare_run(
    istio: &Value,
    ours: &str,
    native_decided: Option<bool>,
    seen: &mut BTreeSet<&'static str>,
) -> Result<(), String> {
    let got = run_line(ours).ok_or("meshinit's print has no `# run:` line")?;
    let mut want = BTreeMap::new();
    for (key, field) in [
        ("dry-run", "dry_run"),
        ("skip-rule-apply", "skip_rule_apply"),
        ("cleanup-only", "cleanup_only"),
        ("run-validation", "run_validation"),
        ("cni-mode", "cni_mode"),
        ("reconcile", "reconcile"),
        ("force-apply", "force_apply"),
        ("dual-stack", "dual_stack"),
    ] {
        want.insert(key, istio[field].as_bool().unwrap_or_default().to_string());
    }
    want.insert("iptables-probe-port", istio["probe_port"].to_string());
    want.insert(
        "network-namespace",
        istio["network_namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    );
    want.insert(
        "force-iptables-binary",
        istio["force_iptables_binary"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    );
    let nanos = istio["probe_timeout_ns"].as_i64().unwrap_or_default();
    if nanos < 0 {
        seen.insert(NEGATIVE_TIMEOUT);
    }
    let got_nanos = got
        .get("probe-timeout")
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|s| (s * 1e9).round() as i64);
    if got_nanos != Some(nanos.max(0)) {
        return Err(format!(
            "probe timeout: Istio {nanos}ns, meshinit {:?}",
            got.get("probe-timeout")
        ));
    }
    if let Some(native) = native_decided {
        if istio["native_nftables"].as_bool() != Some(native) {
            return Err(format!(
                "native nftables: Istio {}, meshinit {native}",
                istio["native_nftables"]
            ));
        }
    }
    let differ: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(**k) != Some(*v))
        .map(|(k, v)| format!("--{k}: Istio {v:?}, meshinit {:?}", got.get(*k)))
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(format!("run settings differ: {}", differ.join("; ")))
    }
}

/// The routing meshinit's print shows (`ip ...` lines), sorted, against what Istio's
/// tproxy.ConfigureRoutes left in the oracle's namespace. With --cleanup-only Istio still
/// sets up TPROXY routing, while meshinit removes it (`cleanup-only-adds-no-routing`).
fn compare_routes(
    istio: &str,
    cleanup_only: bool,
    ours: &str,
    seen: &mut BTreeSet<&'static str>,
) -> Result<(), String> {
    // iptables' print lists them as commands, nftables' (applied over netlink) as comments.
    let mut got: Vec<&str> = ours
        .lines()
        .map(|l| l.trim_start_matches(['#', ' ']))
        .filter(|l| l.starts_with("ip "))
        .collect();
    got.sort_unstable();
    let want: Vec<&str> = istio.lines().filter(|l| !l.is_empty()).collect();
    if cleanup_only && !want.is_empty() && got.is_empty() {
        seen.insert(CLEANUP_ROUTING);
        return Ok(());
    }
    if want == got {
        return Ok(());
    }
    Err(format!(
        "routing differs:\n  istio:    {want:?}\n  meshinit: {got:?}"
    ))
}

/// With --cleanup-only, Istio's nftables transaction only deletes its three tables
/// (`add table T` + `delete table T` each); meshinit's print installs nothing and names each
/// table it removes.
fn compare_nft_cleanup(istio: &str, ours: &str) -> Result<(), String> {
    let mut tables = Vec::new();
    for line in istio.lines().filter(|l| !l.trim().is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["add" | "delete", "table", "inet", name] => tables.push(*name),
            _ => return Err(format!("Istio's cleanup transaction holds {line:?}")),
        }
    }
    if ours
        .lines()
        .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        return Err(format!("--cleanup-only, yet meshinit plans:\n{ours}"));
    }
    match tables.iter().find(|t| !ours.contains(**t)) {
        Some(t) => Err(format!(
            "meshinit's --cleanup-only does not say it removes {t}"
        )),
        None => Ok(()),
    }
}

/// Whether the configuration asks for native nftables anywhere (flag or variable).
fn mentions_native(config: &Config) -> bool {
    config.args.iter().any(|a| a.contains("native-nftables"))
        || config.env.iter().any(|(k, _)| k == "NATIVE_NFTABLES")
}

fn check(
    config: &Config,
    answer: &Answer,
    trimmed: Option<&Answer>,
    observed: &mut Observed,
) -> Vec<String> {
    let Observed { seen, tally, .. } = observed;
    let mut failures = Vec::new();
    // Ranges: meshinit must take them; everything else is compared with the lists expanded,
    // as Istio was given them.
    let (args, env) = config.meshinit_expanded();
    let istio_plans =
        answer.error.is_none() && answer.iptables.is_ok() && answer.routes_error.is_none();
    if !config.ranges.is_empty()
        && config.rejects.is_empty()
        && config.refused_by_both.is_empty()
        && istio_plans
    {
        match meshinit_print(&config.meshinit_args(), &config.env, false) {
            Ok(_) => {
                seen.insert(PORT_RANGES);
            }
            Err(why) if groups_beyond(config, MAX_GROUPS_IPTABLES).is_some() => drop(why),
            Err(why) => failures.push(format!("meshinit refused port ranges: {why}")),
        }
    }
    let run = answer.run.as_ref();
    let cleanup_only = run.is_some_and(|r| r["cleanup_only"].as_bool() == Some(true));
    let skipped = run.is_some_and(|r| r["skip_rule_apply"].as_bool() == Some(true));
    let mut settings_compared = 0;
    let mut routes_compared = 0;

    let ours = meshinit_print(&args, &env, false);
    let routes_error = answer.routes_error.as_deref();
    let istio_error = answer
        .error
        .as_deref()
        .or(answer.iptables.as_ref().err().map(String::as_str))
        .or(routes_error);
    let verdict = judge_group_limit(config, MAX_GROUPS_IPTABLES, &ours, &mut tally[0], seen)
        .unwrap_or_else(|| {
            judge(
                &mut tally[0],
                config,
                Istio {
                    error: istio_error,
                    skipped,
                    trimmed,
                },
                &ours,
                |ours, seen| {
                    compare_iptables(answer.iptables.as_ref().expect("no error"), ours, seen)?;
                    if let Some(run) = run {
                        // Only a run forced to iptables shows it: asked again unforced when
                        // the configuration chooses a backend.
                        let native = if mentions_native(config) {
                            let unforced = meshinit_print_as_given(&args, &env)
                                .map_err(|e| format!("refused unforced: {e}"))?;
                            let decided =
                                run_line(&unforced).and_then(|r| r.get("native-nftables").cloned());
                            Some(decided.as_deref() == Some("true"))
                        } else {
                            Some(false)
                        };
                        compare_run(run, ours, native, seen)?;
                        settings_compared += 1;
                    }
                    if let Some(routes) = &answer.routes {
                        compare_routes(routes, cleanup_only, ours, seen)?;
                        routes_compared += 1;
                    }
                    Ok(())
                },
                |trimmed, ours, seen| match &trimmed.iptables {
                    Ok(istio) if trimmed.error.is_none() => compare_iptables(istio, ours, seen),
                    other => Err(format!("Istio refuses it trimmed too: {other:?}")),
                },
                seen,
            )
        });
    if let Err(why) = verdict {
        failures.push(format!("iptables: {why}"));
    }

    let ours = meshinit_print(&args, &env, true);
    let (nft, nft_error) = (&answer.nftables, answer.nftables_error.as_deref());
    // A transaction refused only for an undeclared chain is planned; compare what it holds.
    let refused_for_chain = nft_error.is_some_and(|e| e.contains("no such chain"));
    let istio_error = answer
        .error
        .as_deref()
        .or(if refused_for_chain { None } else { nft_error })
        .or(routes_error);
    let verdict = judge_group_limit(config, MAX_GROUPS_NFTABLES, &ours, &mut tally[1], seen)
        .unwrap_or_else(|| {
            judge(
                &mut tally[1],
                config,
                Istio {
                    error: istio_error,
                    skipped,
                    trimmed,
                },
                &ours,
                |ours, seen| {
                    let istio = nft.as_deref().unwrap_or_default();
                    if cleanup_only {
                        return compare_nft_cleanup(istio, ours);
                    }
                    compare_nftables(istio, nft_error, ours, seen)?;
                    if let Some(routes) = &answer.routes {
                        compare_routes(routes, cleanup_only, ours, seen)?;
                    }
                    Ok(())
                },
                |trimmed, ours, seen| match (&trimmed.error, &trimmed.nftables) {
                    (None, Some(istio)) if cleanup_only => compare_nft_cleanup(istio, ours),
                    (None, Some(istio)) => {
                        compare_nftables(istio, trimmed.nftables_error.as_deref(), ours, seen)
                    }
                    other => Err(format!("Istio refuses it trimmed too: {other:?}")),
                },
                seen,
            )
        });
    if let Err(why) = verdict {
        failures.push(format!("nftables: {why}"));
    }
    observed.settings_compared += settings_compared;
    observed.routes_compared += routes_compared;
    failures
}

const MAX_GROUPS_IPTABLES: usize = meshinit::config::build::MAX_OWNER_GROUPS_INCLUDE_IPTABLES;
const MAX_GROUPS_NFTABLES: usize = meshinit::config::build::MAX_OWNER_GROUPS_INCLUDE_NFTABLES;

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// `MESHINIT_PARITY_SEED`, or a fresh seed (printed on failure) so each run covers new ground.
fn seed() -> u64 {
    env_number("MESHINIT_PARITY_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    })
}

/// Whether the oracle can set Istio's routing up for real (it needs root).
fn routes_asked() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn differential_parity() {
    let Some((bin, _)) = oracle() else { return };
    let seed = seed();
    let count = env_number("MESHINIT_PARITY_CASES").map_or(DEFAULT_CASES, |n| n as usize);
    let indices: Vec<usize> = match env_number("MESHINIT_PARITY_ONLY") {
        Some(i) => vec![i as usize],
        None => (0..count).collect(),
    };
    let started = Instant::now();
    let routes = routes_asked();
    if !routes {
        crate::support::skip(
            "differential_parity routing",
            "not root: the oracle cannot set Istio's routing up; routing not compared",
        );
    }
    let configs: Vec<Config> = indices.iter().map(|&i| case(seed, i)).collect();
    let mut requests: Vec<Value> = configs.iter().map(|c| c.request(false, routes)).collect();
    // Configurations with blanks in lists are asked again without them (accepts-blanks).
    let blanked: Vec<usize> = (0..configs.len()).filter(|&i| configs[i].blanks).collect();
    requests.extend(blanked.iter().map(|&i| configs[i].request(true, false)));
    let mut answers = ask(&bin, &requests);
    let extra = answers.split_off(configs.len());
    let mut trimmed: Vec<Option<Answer>> = (0..configs.len()).map(|_| None).collect();
    for (i, answer) in blanked.into_iter().zip(extra) {
        trimmed[i] = Some(answer);
    }
    let asked = started.elapsed();

    // meshinit runs twice per configuration; two threads keep both cores busy.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let chunk = configs.len().div_ceil(workers).max(1);
    let results: Vec<(Vec<(usize, String)>, Observed)> = std::thread::scope(|s| {
        let handles: Vec<_> = configs
            .chunks(chunk)
            .zip(answers.chunks(chunk))
            .zip(trimmed.chunks(chunk))
            .zip(indices.chunks(chunk))
            .map(|(((configs, answers), trimmed), indices)| {
                s.spawn(move || {
                    let mut observed = Observed::default();
                    let mut failures = Vec::new();
                    for (((config, answer), trimmed), &index) in
                        configs.iter().zip(answers).zip(trimmed).zip(indices)
                    {
                        for failure in check(config, answer, trimmed.as_ref(), &mut observed) {
                            failures.push((index, format!("{}\n  {failure}", config.describe())));
                        }
                    }
                    (failures, observed)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect()
    });
    let mut failures = Vec::new();
    let mut observed = Observed::default();
    for (f, o) in results {
        failures.extend(f);
        observed.merge(o);
    }
    let seen = &observed.seen;
    eprintln!(
        "differential_parity: seed {seed}, {} configurations, oracle {:.1}s, total {:.1}s\n  \
         iptables {:?}\n  nftables {:?}\n  run settings compared {}, routing compared {}\n  \
         differences needed: {seen:?}",
        indices.len(),
        asked.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        observed.tally[0],
        observed.tally[1],
        observed.settings_compared,
        observed.routes_compared,
    );
    let replay = format!("replay with MESHINIT_PARITY_SEED={seed} MESHINIT_PARITY_CASES={count}");
    if !failures.is_empty() {
        let shown: Vec<String> = failures
            .iter()
            .take(env_number("MESHINIT_PARITY_SHOW").map_or(5, |n| n as usize))
            .map(|(i, f)| format!("case {i} (MESHINIT_PARITY_ONLY={i}): {f}"))
            .collect();
        panic!(
            "{} of {} checks differ from Istio ({replay}):\n\n{}",
            failures.len(),
            indices.len() * 2,
            shown.join("\n\n")
        );
    }
    // Each listed difference must still be needed: a stale entry would allow a regression.
    if indices.len() >= DEFAULT_CASES {
        let unused: Vec<&&str> = KNOWN
            .iter()
            .filter(|id| !seen.contains(**id))
            .filter(|id| routes || **id != CLEANUP_ROUTING)
            .collect();
        assert!(
            unused.is_empty(),
            "listed differences no configuration needed ({replay}): {unused:?}"
        );
        assert!(
            observed.settings_compared >= indices.len() / 4,
            "only {} configurations had their run settings compared",
            observed.settings_compared
        );
    }
}

/// Issue 20: `print` (and `apply --dry-run`) shows what `apply` does with the same flags:
/// nothing with --skip-rule-apply, only the cleanup with --cleanup-only; and the values the
/// independent differential found are handled as Istio's parser handles them, or refused
/// naming the setting and the value.
#[test]
fn print_shows_what_apply_does_and_values_parse_as_in_istio() {
    let base = [
        "-m",
        "TPROXY",
        "-b",
        "*",
        "-i",
        "*",
        "--no-ipv6",
        "--dns-servers",
        "",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| (*s).to_owned()).collect()
    };
    for (flag, says) in [
        ("--skip-rule-apply", "installs and removes nothing"),
        ("--cleanup-only", "istio-proxy-mangle"),
    ] {
        for native in [false, true] {
            let ours = meshinit_print(&with(&[flag]), &[], native).expect("accepted");
            let planned: Vec<&str> = ours
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .collect();
            assert!(planned.is_empty(), "{flag}: print plans {planned:?}");
            assert!(ours.contains(says), "{flag}: {ours}");
            assert!(ours.contains(&format!("{flag}=true")), "{flag}: {ours}");
        }
        let out = Command::new(meshinit())
            .env_clear()
            .arg("apply")
            .arg("-n")
            .args(with(&[flag]))
            .output()
            .expect("run meshinit");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(says),
            "apply -n {flag}: {text}"
        );
        assert!(!text.contains("-j TPROXY"), "apply -n {flag}: {text}");
    }
    let timeout = |args: &[&str], env: &[(&str, &str)]| {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        meshinit_print(&with(args), &env, false)
            .map(|out| run_line(&out).expect("a run line")["probe-timeout"].clone())
    };
    assert_eq!(
        timeout(&["--probe-timeout", "-1s"], &[]),
        Ok("0s".to_owned())
    );
    assert_eq!(timeout(&["--probe-timeout=-1s"], &[]), Ok("0s".to_owned()));
    assert_eq!(
        timeout(&[], &[("PROBE_TIMEOUT", "-1s")]),
        Ok("0s".to_owned())
    );
    assert_eq!(
        timeout(&["--probe-timeout", "1m30s"], &[]),
        Ok("90s".to_owned())
    );
    for (args, env, names) in [
        (
            &["-i", "10.0.0.0/08"][..],
            &[][..],
            "\"10.0.0.0/08\" for --istio-service-cidr (-i)",
        ),
        (
            &["-x", "2001:db8::/032"],
            &[],
            "\"2001:db8::/032\" for --istio-service-exclude-cidr (-x)",
        ),
        (
            &[],
            &[("PROBE_TIMEOUT", "5")],
            "\"5\" for environment variable PROBE_TIMEOUT",
        ),
        (
            &[],
            &[("IPTABLES_PROBE_PORT", "65536")],
            "\"65536\" for environment variable IPTABLES_PROBE_PORT",
        ),
    ] {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let err = meshinit_print(&with(args), &env, false).expect_err("refused");
        assert!(err.contains(names), "{args:?} {env:?}: {err}");
    }
}

// ---- The kernel as judge, for a sample ----

/// How many generated configurations are also loaded into namespaces per run
/// (`MESHINIT_PARITY_KERNEL_SAMPLE` asks for more).
const KERNEL_SAMPLE: usize = 20;

/// How many configurations a kernel test may draw per configuration it must judge: a seed
/// that does not yield its sample within that fails, rather than judging fewer. Configurations
/// with port ranges that the kernel can judge are rarer among the generator's forms and
/// run settings.
const DRAWS_PER_JUDGED: usize = 60;
const DRAWS_PER_JUDGED_RANGE: usize = 400;

/// Draws configurations of `seed` in turn, asks Istio about those that `fit` (a batch at a
/// time), and hands each with Istio's answer to `judge`, until exactly `sample` were
/// judged: `judge` says `Ok` when the kernel judged the configuration, or why it was set
/// aside. Panics if `sample * draws_per_judged` draws do not yield them. Prints the count.
fn judge_a_sample(
    what: &str,
    bin: &PathBuf,
    (seed, sample, draws_per_judged): (u64, usize, usize),
    fit: impl Fn(&Config) -> Result<(), &'static str>,
    mut judge: impl FnMut(usize, &Config, &Answer) -> Result<(), &'static str>,
) {
    let limit = sample * draws_per_judged;
    // Generating is cheap and the oracle quick: a quarter of the limit at a time.
    let batch = (limit / 4).max(1);
    let mut set_aside: BTreeMap<&'static str, usize> = BTreeMap::new();
    let (mut judged, mut drawn) = (0, 0);
    while judged < sample {
        assert!(
            drawn < limit,
            "{what}: seed {seed}: {judged} of {sample} configurations judged by the kernel in {drawn} drawn (set aside: {set_aside:?})"
        );
        let mut candidates = Vec::new();
        for index in drawn..(drawn + batch).min(limit) {
            let config = case(seed, index);
            match fit(&config) {
                Ok(()) => candidates.push((index, config)),
                Err(why) => *set_aside.entry(why).or_default() += 1,
            }
        }
        drawn = (drawn + batch).min(limit);
        let requests: Vec<Value> = candidates
            .iter()
            .map(|(_, c)| c.request(false, false))
            .collect();
        let answers = ask(bin, &requests);
        for ((index, config), answer) in candidates.iter().zip(&answers) {
            if judged == sample {
                break;
            }
            match judge(*index, config, answer) {
                Ok(()) => judged += 1,
                Err(why) => *set_aside.entry(why).or_default() += 1,
            }
        }
    }
    eprintln!(
        "{what}: seed {seed}: {judged} configurations judged by the kernel, of {drawn} drawn (set aside: {set_aside:?})"
    );
}

/// Set aside unless every value would load on a test machine. Names only this machine may
/// know (users, groups) would make a load fail on either side alike; numeric owners and the
/// overlay's java/ftp groups load anywhere. So would 60-odd included owner groups: Istio
/// allows 64, but their one rule has more words than iptables-restore 1.8.9's parser takes
/// ("Parser cannot handle more arguments").
fn loads_here(c: &Config) -> Result<(), &'static str> {
    if !c.rejects.is_empty() {
        return Err("meshinit refuses it on purpose");
    }
    if !c.refused_by_both.is_empty() {
        return Err("both refuse it");
    }
    if c.shapes_run {
        return Err("shapes the run (validation, skipping, cleanup-only, a namespace, a backend)");
    }
    let mut values = c.args.iter().chain(c.env.iter().map(|(_, v)| v));
    if values.any(|v| v.contains("nobody") || v.contains("istio-proxy")) {
        return Err("names a user only some machines have");
    }
    let mut values = c.args.iter().chain(c.env.iter().map(|(_, v)| v));
    if values.any(|v| v.matches(',').count() >= 40) {
        return Err("a list too long for iptables-restore's parser");
    }
    Ok(())
}

/// As root: a sample of generated configurations whose rulesets compared equal with only
/// the owner comment and spelling set aside, each side loaded into a fresh namespace (iptables
/// through iptables-nft-restore, nftables through `nft -f`); the kernel must list the same.
/// This is what those two allowances claim. Exactly the sample's number of configurations
/// are loaded and read back with rules in them; a seed that does not yield them fails.
#[test]
fn kernel_lists_a_sample_alike() {
    if !crate::support::require_root("istio_oracle::kernel_lists_a_sample_alike") {
        return;
    }
    let Some((bin, _)) = oracle() else { return };
    let seed = seed();
    let sample = env_number("MESHINIT_PARITY_KERNEL_SAMPLE").map_or(KERNEL_SAMPLE, |n| n as usize);
    let allowed: BTreeSet<&str> = [OWNER_COMMENT_ID, SPELLING].into();
    let mut failures = Vec::new();
    let judge = |index: usize, config: &Config, answer: &Answer| {
        let Some((istio, nft)) = answer.planned_by_both() else {
            return Err("Istio refused it");
        };
        let args = config.meshinit_args();
        let (Ok(ours), Ok(ours_nft)) = (
            meshinit_print(&args, &config.env, false),
            meshinit_print(&args, &config.env, true),
        ) else {
            return Err("meshinit refused it");
        };
        let mut seen = BTreeSet::new();
        let equal = compare_iptables(istio, &ours, &mut seen).is_ok()
            && compare_nftables(nft, None, &ours_nft, &mut seen).is_ok();
        if !equal || !seen.iter().all(|id| allowed.contains(id)) {
            return Err("compared with other differences than spelling");
        }
        let family = |family: &str| {
            let mut with: Vec<String> = vec!["--family".into(), family.into()];
            with.extend(args.iter().cloned());
            meshinit_print(&with, &config.env, false).expect("accepted above")
        };
        let ours_v6 = if config.ipv6 {
            family("ipv6")
        } else {
            String::new()
        };
        let want = crate::golden::load_and_save("oi", "nft", [&istio.0, &istio.1]);
        let got = crate::golden::load_and_save("om", "nft", [&family("ipv4"), &ours_v6]);
        let listed = |role: &str, text: &str| {
            let ns = crate::support::netns::NetNs::new(role);
            let _groups = crate::support::groups::GroupOverlay::new(ns.name());
            crate::nft_golden::nft_load(&ns, text, role);
            crate::nft_golden::listing(&ns)
        };
        let (want_nft, got_nft) = (listed("oni", nft), listed("onm", &ours_nft));
        // Nothing loaded (mode NONE, say) would read back alike whatever was compared.
        let holds_rules = |text: &str| text.contains("ISTIO") || text.contains("istio");
        if !holds_rules(&want[0]) || !holds_rules(&want_nft) {
            return Err("loads no rules");
        }
        if want != got {
            failures.push(format!(
                "case {index}: {}\n  iptables-save differs:\n--- istio\n{}\n--- meshinit\n{}",
                config.describe(),
                want.join("\n"),
                got.join("\n")
            ));
        }
        if want_nft != got_nft {
            failures.push(format!(
                "case {index}: {}\n  nft list ruleset differs:\n--- istio\n{want_nft}\n--- meshinit\n{got_nft}",
                config.describe()
            ));
        }
        Ok(())
    };
    judge_a_sample(
        "kernel_lists_a_sample_alike",
        &bin,
        (seed, sample, DRAWS_PER_JUDGED),
        loads_here,
        judge,
    );
    assert!(
        failures.is_empty(),
        "the kernel lists Istio's and meshinit's rules differently (MESHINIT_PARITY_SEED={seed}):\n{}",
        failures.join("\n\n")
    );
}

// ---- Istio's golden cases ----

/// Istio's golden cases as its tests configure them (`tools/istio-*/pkg/capture/run_test.go`):
/// Config fields by their JSON names, on top of the tests' base configuration. The last is
/// nftables only.
#[rustfmt::skip]
const GOLDEN: &[(&str, &str)] = &[
    ("ipv6-empty-inbound-ports", r#"{"INBOUND_PORTS_INCLUDE":"","ENABLE_INBOUND_IPV6":true}"#),
    ("ip-range", r#"{"OUTBOUND_IPRANGES_EXCLUDE":"1.1.0.0/16","OUTBOUND_IPRANGES_INCLUDE":"9.9.0.0/16","DRY_RUN":true,"REDIRECT_DNS":true,"ENABLE_INBOUND_IPV6":false,"PROXY_GID":"1,2","PROXY_UID":"3,4","DNS_SERVERS_V4":["127.0.0.53"]}"#),
    ("tproxy", r#"{"INBOUND_INTERCEPTION_MODE":"TPROXY","INBOUND_PORTS_INCLUDE":"*","OUTBOUND_IPRANGES_EXCLUDE":"1.1.0.0/16","OUTBOUND_IPRANGES_INCLUDE":"9.9.0.0/16","DRY_RUN":true,"REDIRECT_DNS":true,"DNS_SERVERS_V4":["127.0.0.53"],"PROXY_GID":"1337","PROXY_UID":"1337","EXCLUDE_INTERFACES":"not-istio-nic","ENABLE_INBOUND_IPV6":true}"#),
    ("ipv6-inbound-ports", r#"{"INBOUND_PORTS_INCLUDE":"4000,5000","ENABLE_INBOUND_IPV6":true}"#),
    ("ipv6-virt-interfaces", r#"{"INBOUND_PORTS_INCLUDE":"4000,5000","KUBE_VIRT_INTERFACES":"eth0,eth1","ENABLE_INBOUND_IPV6":true}"#),
    ("ipv6-ipnets", r#"{"INBOUND_PORTS_INCLUDE":"4000,5000","INBOUND_PORTS_EXCLUDE":"6000,7000,","KUBE_VIRT_INTERFACES":"eth0,eth1","OUTBOUND_IPRANGES_EXCLUDE":"2001:db8::/32","OUTBOUND_IPRANGES_INCLUDE":"2001:db8::/32","ENABLE_INBOUND_IPV6":true}"#),
    ("ipv6-uid-gid", r#"{"INBOUND_PORTS_INCLUDE":"4000,5000","INBOUND_PORTS_EXCLUDE":"6000,7000","KUBE_VIRT_INTERFACES":"eth0,eth1","PROXY_GID":"1,2","PROXY_UID":"3,4","ENABLE_INBOUND_IPV6":true,"OUTBOUND_IPRANGES_EXCLUDE":"2001:db8::/32","OUTBOUND_IPRANGES_INCLUDE":"2001:db8::/32"}"#),
    ("ipv6-outbound-ports", r#"{"INBOUND_PORTS_INCLUDE":"","OUTBOUND_PORTS_INCLUDE":"32000,31000","ENABLE_INBOUND_IPV6":true}"#),
    ("empty", r#"{}"#),
    ("kube-virt-interfaces", r#"{"KUBE_VIRT_INTERFACES":"eth1,eth2","OUTBOUND_IPRANGES_INCLUDE":"*"}"#),
    ("ipnets", r#"{"OUTBOUND_IPRANGES_INCLUDE":"10.0.0.0/8"}"#),
    ("ipnets-with-kube-virt-interfaces", r#"{"KUBE_VIRT_INTERFACES":"eth1,eth2","OUTBOUND_IPRANGES_INCLUDE":"10.0.0.0/8"}"#),
    ("inbound-ports-include", r#"{"INBOUND_PORTS_INCLUDE":"32000,31000"}"#),
    ("inbound-ports-wildcard", r#"{"INBOUND_PORTS_INCLUDE":"*"}"#),
    ("inbound-ports-tproxy", r#"{"INBOUND_PORTS_INCLUDE":"32000,31000","INBOUND_INTERCEPTION_MODE":"TPROXY"}"#),
    ("inbound-ports-wildcard-tproxy", r#"{"INBOUND_PORTS_INCLUDE":"*","INBOUND_INTERCEPTION_MODE":"TPROXY"}"#),
    ("dns-uid-gid", r#"{"REDIRECT_DNS":true,"DNS_SERVERS_V4":["127.0.0.53"],"DNS_SERVERS_V6":["::127.0.0.53"],"PROXY_GID":"1,2","PROXY_UID":"3,4","ENABLE_INBOUND_IPV6":true}"#),
    ("ipv6-dns-uid-gid", r#"{"ENABLE_INBOUND_IPV6":true,"REDIRECT_DNS":true,"PROXY_GID":"1,2","PROXY_UID":"3,4"}"#),
    ("outbound-owner-groups", r#"{"OUTBOUND_OWNER_GROUPS_INCLUDE":"java,202"}"#),
    ("outbound-owner-groups-exclude", r#"{"OUTBOUND_OWNER_GROUPS_EXCLUDE":"888,ftp"}"#),
    ("ipv6-dns-outbound-owner-groups", r#"{"ENABLE_INBOUND_IPV6":true,"REDIRECT_DNS":true,"OUTBOUND_OWNER_GROUPS_INCLUDE":"java,202"}"#),
    ("ipv6-dns-outbound-owner-groups-exclude", r#"{"ENABLE_INBOUND_IPV6":true,"REDIRECT_DNS":true,"OUTBOUND_OWNER_GROUPS_EXCLUDE":"888,ftp"}"#),
    ("outbound-ports-include", r#"{"OUTBOUND_PORTS_INCLUDE":"32000,31000"}"#),
    ("loopback-outbound-iprange", r#"{"OUTBOUND_IPRANGES_INCLUDE":"127.1.2.3/32","DRY_RUN":true,"REDIRECT_DNS":true,"DNS_SERVERS_V4":["127.0.0.53"],"ENABLE_INBOUND_IPV6":false,"PROXY_GID":"1,2","PROXY_UID":"3,4"}"#),
    ("basic-exclude-nic", r#"{"EXCLUDE_INTERFACES":"not-istio-nic"}"#),
    ("drop-invalid", r#"{"DROP_INVALID":true}"#),
    ("host-ipv4-loopback-cidr", r#"{"HOST_IPV4_LOOPBACK_CIDR":"127.0.0.1/8"}"#),
    ("inbound-ports-empty-tproxy", r#"{"INBOUND_PORTS_INCLUDE":"","INBOUND_INTERCEPTION_MODE":"TPROXY"}"#),
];

/// meshinit's arguments for a golden case: golden.rs's and nft_golden.rs's own table.
fn golden_args(name: &str) -> (Vec<(String, String)>, Vec<String>) {
    const NFT_ONLY: &[&str] = &["-b", "", "-m", "TPROXY"];
    let (env, args): (&[(&str, &str)], &[&str]) = crate::golden::CASES
        .iter()
        .find(|(case, _, _)| *case == name)
        .map_or((&[], NFT_ONLY), |(_, env, args)| (env, args));
    let base = ["-u", "1337", "-g", "1337", "--no-ipv6"];
    (
        env.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        base.iter().chain(args).map(|s| (*s).to_owned()).collect(),
    )
}

#[test]
fn oracle_reproduces_istio_goldens() {
    let Some((bin, moddir)) = oracle() else {
        return;
    };
    let requests: Vec<Value> = GOLDEN
        .iter()
        .map(|(_, config)| json!({"config": serde_json::from_str::<Value>(config).expect("JSON")}))
        .collect();
    let answers = ask(&bin, &requests);
    let testdata = |backend: &str, case: &str| {
        moddir.join(format!(
            "tools/istio-{backend}/pkg/capture/testdata/{case}.golden"
        ))
    };
    let mut failures = Vec::new();
    let mut seen = BTreeSet::new();
    for ((case, _), answer) in GOLDEN.iter().zip(&answers) {
        assert!(answer.error.is_none(), "{case}: {answer:?}");
        // 1. The oracle is Istio's golden test: the same output, byte for byte.
        let ipt_golden = std::fs::read_to_string(testdata("iptables", case));
        if let Ok(golden) = &ipt_golden {
            let executed = &answer.iptables.as_ref().expect("iptables planned").2;
            if executed.trim_end() != golden.trim_end() {
                failures.push(format!(
                    "{case}: the oracle's iptables output is not Istio's golden"
                ));
            }
        }
        let nft_golden = std::fs::read_to_string(testdata("nftables", case))
            .expect("every case has an nftables golden");
        if answer.nftables.as_deref().map(str::trim_end) != Some(nft_golden.trim_end()) {
            failures.push(format!(
                "{case}: the oracle's nftables output is not Istio's golden"
            ));
        }
        // 2. meshinit plans what Istio plans for the case.
        let (env, args) = golden_args(case);
        if let Ok(istio) = &answer.iptables {
            if ipt_golden.is_ok() {
                let ours = meshinit_print(&args, &env, false).expect("meshinit accepts the case");
                if let Err(diff) = compare_iptables(istio, &ours, &mut seen) {
                    failures.push(format!("{case}: meshinit's iptables differ:\n{diff}"));
                }
            }
        }
        let ours = meshinit_print(&args, &env, true).expect("meshinit accepts the case");
        let (nft, nft_error) = (&answer.nftables, &answer.nftables_error);
        if let Err(diff) = compare_nftables(
            nft.as_deref().unwrap_or_default(),
            nft_error.as_deref(),
            &ours,
            &mut seen,
        ) {
            failures.push(format!("{case}: meshinit's nftables differ:\n{diff}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let ipt_cases = GOLDEN
        .iter()
        .filter(|(case, _)| testdata("iptables", case).exists())
        .count();
    assert_eq!(ipt_cases, 27, "Istio's iptables golden cases, all covered");
}

// ---- Istio's real injector ----

/// The image meshinit's template names, and the one Istio's template is given in its place
/// (`values.global.proxy_init.image`, the one-value swap the README promises).
pub(crate) const MESHINIT_IMAGE: &str = "registry.example/istio/meshinit:0.1.0";

/// A sample pod for the injector: its annotations, istioctl `--set`s for the mesh, whether
/// istiod runs with native sidecars, whether Istio CNI is installed (the sidecar template
/// then renders istio-validation instead of istio-init), istio-proxy's runAsUser if the pod
/// sets it, and rules that Istio's ruleset must show (the sample's point).
pub(crate) struct InjectSample {
    pub name: &'static str,
    pub annotations: &'static [(&'static str, &'static str)],
    pub set: &'static [&'static str],
    pub native_sidecars: bool,
    pub cni: bool,
    pub proxy_run_as_user: Option<u32>,
    pub expect: &'static [&'static str],
}

impl InjectSample {
    /// The init container Istio's sidecar template renders: istio-validation with Istio CNI.
    pub fn init_container(&self) -> &'static str {
        if self.cni {
            "istio-validation"
        } else {
            "istio-init"
        }
    }
}

#[rustfmt::skip]
const INJECT_SAMPLES: &[InjectSample] = &[
    InjectSample { name: "plain", annotations: &[], set: &[], native_sidecars: false, cni: false, proxy_run_as_user: None,
        expect: &["-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN"] },
    InjectSample { name: "vault", annotations: &[
            ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "198.51.100.30/32"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "8200"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "8080,9090")],
        set: &[], native_sidecars: false, cni: false, proxy_run_as_user: None,
        expect: &["-A ISTIO_OUTPUT -p tcp --dport 8200 -j RETURN", "-A ISTIO_OUTPUT -d 198.51.100.30/32 -j RETURN"] },
    InjectSample { name: "tproxy-annotation", annotations: &[("sidecar.istio.io/interceptionMode", "TPROXY")],
        set: &[], native_sidecars: false, cni: false, proxy_run_as_user: None, expect: &["-j TPROXY"] },
    InjectSample { name: "tproxy-mesh-default", annotations: &[],
        set: &["meshConfig.defaultConfig.interceptionMode=TPROXY"], native_sidecars: false, cni: false, proxy_run_as_user: None,
        expect: &["-j TPROXY"] },
    InjectSample { name: "interception-none", annotations: &[("sidecar.istio.io/interceptionMode", "NONE")],
        set: &[], native_sidecars: false, cni: false, proxy_run_as_user: None, expect: &[] },
    InjectSample { name: "dns-capture", annotations: &[],
        set: &["meshConfig.defaultConfig.proxyMetadata.ISTIO_META_DNS_CAPTURE=true"], native_sidecars: false, cni: false,
        proxy_run_as_user: None, expect: &["-j REDIRECT --to-ports 15053"] },
    InjectSample { name: "native-sidecars", annotations: &[], set: &[], native_sidecars: true, cni: false, proxy_run_as_user: None,
        expect: &["-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"] },
    InjectSample { name: "exclude-interfaces", annotations: &[("traffic.sidecar.istio.io/excludeInterfaces", "eth1")],
        set: &[], native_sidecars: false, cni: false, proxy_run_as_user: None, expect: &["-i eth1"] },
    InjectSample { name: "kube-virt", annotations: &[("traffic.sidecar.istio.io/kubevirtInterfaces", "net1")],
        set: &[], native_sidecars: false, cni: false, proxy_run_as_user: None, expect: &["-i net1"] },
    InjectSample { name: "proxy-run-as-user", annotations: &[], set: &[], native_sidecars: false, cni: false,
        proxy_run_as_user: Some(2000), expect: &["--uid-owner 2000"] },
    // Istio CNI: the pod's rules come from the node's plugin; the init container is
    // istio-validation (`--run-validation --skip-rule-apply`), with and without native sidecars.
    InjectSample { name: "istio-cni", annotations: &[
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "8200")],
        set: &[], native_sidecars: false, cni: true, proxy_run_as_user: None,
        expect: &["-A ISTIO_OUTPUT -p tcp --dport 8200 -j RETURN"] },
    InjectSample { name: "istio-cni-native-sidecars", annotations: &[], set: &[], native_sidecars: true, cni: true,
        proxy_run_as_user: None, expect: &["-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"] },
];

/// The sample as a Pod, with `extra` annotations.
pub(crate) fn sample_pod(sample: &InjectSample, extra: &[(&str, &str)]) -> String {
    let mut pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: default\n",
        sample.name
    );
    let annotations: Vec<&(&str, &str)> = sample.annotations.iter().chain(extra).collect();
    if !annotations.is_empty() {
        pod.push_str("  annotations:\n");
        for (key, value) in annotations {
            pod.push_str(&format!("    {key}: {value:?}\n"));
        }
    }
    pod.push_str("spec:\n  containers:\n  - name: app\n    image: registry.example/app:1.0\n");
    if let Some(uid) = sample.proxy_run_as_user {
        pod.push_str(&format!(
            "  - name: istio-proxy\n    image: auto\n    securityContext:\n      runAsUser: {uid}\n"
        ));
    }
    pod
}

/// The pod as Istio's injector injects it, with the charts' values and `set`, and
/// IstioOperator `files` on top.
pub(crate) fn injected(
    bin: &PathBuf,
    moddir: &std::path::Path,
    sample: &InjectSample,
    pod: &str,
    set: &[&str],
    files: &[PathBuf],
) -> String {
    let request = json!({
        "yaml": pod,
        "set": sample.set.iter().chain(set).chain(sample.cni.then_some(&"components.cni.enabled=true")).collect::<Vec<_>>(),
        "files": files,
        "charts": moddir.join("manifests"),
    });
    let mut cmd = Command::new(bin);
    // istiod reads this feature from its environment.
    cmd.env("ENABLE_NATIVE_SIDECARS", sample.native_sidecars.to_string());
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start istio-inject-oracle");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("write the request");
    let out = child
        .wait_with_output()
        .expect("wait for istio-inject-oracle");
    assert!(
        out.status.success(),
        "{}: Istio's injector failed: {}",
        sample.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 YAML")
}

/// The injected pod's annotations, as the kubelet writes them into a Downward API file.
pub(crate) fn pod_annotations(file: &std::path::Path) -> Vec<(String, String)> {
    let script = "import sys, yaml, json\n\
                  docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
                  print(json.dumps(docs[0]['metadata'].get('annotations') or {}))";
    let out = crate::support::run_bounded(
        Command::new("python3").args(["-c", script]).arg(file),
        std::time::Duration::from_secs(30),
    );
    let text = crate::support::expect_success("reading annotations", out);
    let map: BTreeMap<String, String> = serde_json::from_str(&text).expect("annotations JSON");
    map.into_iter().collect()
}

/// An environment: variables and their values.
pub(crate) type Env = Vec<(String, String)>;

/// The init container that captures traffic (istio-validation with Istio CNI), if the
/// injected pod has one: its image, args and plain environment.
pub(crate) fn istio_init(
    file: &std::path::Path,
    name: &str,
    container: &str,
) -> Option<(String, Vec<String>, Env)> {
    let found = crate::support::k8s::containers(file);
    let init = found.get(&format!("{name}/initContainers/{container}"))?;
    let args = crate::support::k8s::list(init, "args");
    let env = (0..)
        .map_while(|i| init.get(&format!("env.{i}.name")).map(|n| (i, n.clone())))
        .filter_map(|(i, n)| init.get(&format!("env.{i}.value")).map(|v| (n, v.clone())))
        .collect();
    Some((init.get("image").cloned().unwrap_or_default(), args, env))
}

/// Istio's real injector renders each sample pod twice: with Istio's own template, given
/// meshinit's image for istio-init; and with meshinit's template (injector-template/, by its
/// IstioOperator overlay, opted in by annotation). Both pods must be valid Pods for the
/// Kubernetes versions meshinit supports and run meshinit as istio-init (as istio-validation,
/// `--run-validation --skip-rule-apply`, with Istio CNI). meshinit, given either init
/// container's args (and environment, and for its template the pod's annotations as a
/// Downward API file), must plan exactly what Istio's own code plans for the args Istio's
/// template renders: iptables and nftables, the same comparison as `differential_parity`.
#[test]
fn istio_injector_renders_meshinit_for_sample_pods() {
    let test = "istio_injector_renders_meshinit_for_sample_pods";
    if !crate::support::k8s::require_kubernetes_validate(test) {
        return;
    }
    let (Some((rules, _)), Some((inject, moddir))) = (oracle(), built("inject")) else {
        return;
    };
    let dir = crate::support::scratch::ScratchDir::new("istio-injector");
    let operator = project_dir().join("injector-template/istio-operator.yaml");
    let swap = format!("values.global.proxy_init.image={MESHINIT_IMAGE}");
    let mounted = crate::injector_template::MOUNTED_ANNOTATIONS;
    let dns = ["10.96.0.10".to_owned()];
    let mut failures = Vec::new();
    for sample in INJECT_SAMPLES {
        let what = format!("{test}: {}", sample.name);
        let by_istio = injected(
            &inject,
            &moddir,
            sample,
            &sample_pod(sample, &[]),
            &[&swap],
            &[],
        );
        let by_meshinit = injected(
            &inject,
            &moddir,
            sample,
            &sample_pod(sample, &[("inject.istio.io/templates", "sidecar,meshinit")]),
            &[],
            std::slice::from_ref(&operator),
        );
        let mut plans = Vec::new();
        for (template, yaml) in [
            ("Istio's template", &by_istio),
            ("meshinit's template", &by_meshinit),
        ] {
            let file = dir.write(&format!("{}-{}.yaml", sample.name, plans.len()), yaml);
            for version in crate::support::k8s::VERSIONS {
                let output = crate::support::k8s::validate(&file, version);
                assert!(
                    output.status.success(),
                    "{what}: {template}: not a valid Pod for Kubernetes {version}:\n{}{}\n{yaml}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            // Native sidecars: istio-proxy an init container (restartPolicy Always), after
            // istio-init; otherwise a container.
            let field = if sample.native_sidecars {
                "initContainers"
            } else {
                "containers"
            };
            let proxy = format!("{}/{field}/istio-proxy", sample.name);
            assert!(
                crate::support::k8s::containers(&file).contains_key(&proxy),
                "{what}: {template}: no {proxy}"
            );
            let container = sample.init_container();
            let Some((image, args, env)) = istio_init(&file, sample.name, container) else {
                plans.push(None);
                continue;
            };
            assert_eq!(
                image, MESHINIT_IMAGE,
                "{what}: {template}: {container}'s image"
            );
            assert_eq!(
                args.first().map(String::as_str),
                Some("istio-iptables"),
                "{what}: {template}"
            );
            // With Istio CNI, the init container only validates (meshinit validate), and
            // no istio-init programs rules beside the plugin.
            let validates = ["--run-validation", "--skip-rule-apply"]
                .iter()
                .all(|flag| args.iter().any(|arg| arg == flag));
            assert_eq!(
                validates, sample.cni,
                "{what}: {template}: {container}'s args {args:?}"
            );
            if sample.cni {
                assert!(
                    istio_init(&file, sample.name, "istio-init").is_none(),
                    "{what}: {template}: istio-init beside istio-validation"
                );
            }
            let annotations = dir.write(
                &format!("{}-{}.annotations", sample.name, plans.len()),
                &crate::support::k8s::downward_api_annotations(
                    &pod_annotations(&file)
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect::<Vec<_>>(),
                ),
            );
            let args: Vec<String> = args[1..]
                .iter()
                .map(|arg| {
                    if arg == mounted {
                        annotations.to_string_lossy().into_owned()
                    } else {
                        arg.clone()
                    }
                })
                .collect();
            plans.push(Some((args, env)));
        }
        let [istio_plan, meshinit_plan] = [plans[0].take(), plans[1].take()];
        let Some((istio_args, istio_env)) = istio_plan else {
            // Only interception mode NONE renders no istio-init; meshinit's template, merged
            // onto that, must then plan nothing.
            assert!(
                sample.expect.is_empty(),
                "{what}: Istio's template rendered no istio-init"
            );
            if let Some((args, env)) = meshinit_plan {
                let config = Config {
                    args: with_machine(&args, &dns),
                    env,
                    ..Config::default()
                };
                let ours = meshinit_print(&config.args, &config.env, false)
                    .expect("meshinit accepts its template's args");
                assert!(
                    !ours.lines().any(|l| l.starts_with("-A")),
                    "{what}: meshinit planned rules:\n{ours}"
                );
            }
            continue;
        };
        // istio-validation (Istio CNI) plans nothing with --skip-rule-apply, on both sides
        // (differential_parity compares that); the rules its args describe are compared.
        let istio_args = without_skip(&istio_args);
        let answer = ask(
            &rules,
            &[
                json!({"args": istio_args, "env": istio_env.iter().cloned().collect::<BTreeMap<_, _>>(),
            "ipv6": false, "dns_servers": dns}),
            ],
        );
        let answer = &answer[0];
        let istio = match (&answer.error, &answer.iptables) {
            (None, Ok(istio)) => istio,
            other => panic!(
                "{what}: Istio's code refused its own template's args {istio_args:?}: {other:?}"
            ),
        };
        for needle in sample.expect {
            assert!(
                istio.0.contains(needle),
                "{what}: Istio's rules lack {needle:?}:\n{}",
                istio.0
            );
        }
        let candidates = [
            (
                "Istio's template",
                Some((istio_args.clone(), istio_env.clone())),
            ),
            ("meshinit's template", meshinit_plan),
        ];
        for (template, plan) in candidates {
            let Some((args, env)) = plan else {
                failures.push(format!("{what}: {template} rendered no istio-init"));
                continue;
            };
            let args = with_machine(&without_skip(&args), &dns);
            let mut seen = BTreeSet::new();
            let ipt = meshinit_print(&args, &env, false)
                .map_err(|e| format!("refused: {e}"))
                .and_then(|ours| compare_iptables(istio, &ours, &mut seen));
            let nft = meshinit_print(&args, &env, true)
                .map_err(|e| format!("refused: {e}"))
                .and_then(|ours| {
                    compare_nftables(
                        answer.nftables.as_deref().unwrap_or_default(),
                        answer.nftables_error.as_deref(),
                        &ours,
                        &mut seen,
                    )
                });
            for (backend, result) in [("iptables", ipt), ("nftables", nft)] {
                if let Err(diff) = result {
                    failures.push(format!("{what}: {template}: meshinit {args:?} (env {env:?}) plans other {backend} than Istio for {istio_args:?}:\n{diff}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `args` without `--skip-rule-apply`.
fn without_skip(args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| *a != "--skip-rule-apply")
        .cloned()
        .collect()
}

/// `args` with what Istio would read off the machine made explicit, as in `Config`.
fn with_machine(args: &[String], dns: &[String]) -> Vec<String> {
    let mut all = args.to_vec();
    all.extend([
        "--no-ipv6".to_owned(),
        "--dns-servers".to_owned(),
        dns.join(","),
    ]);
    all
}

/// The inject oracle is Istio's injection test: for the proxy_init image swap, Istio's own
/// golden (`pkg/kube/inject/testdata/inject/hello.yaml.proxyInitImageName.injected`).
#[test]
fn inject_oracle_reproduces_istio_golden() {
    let Some((inject, moddir)) = built("inject") else {
        return;
    };
    let testdata = moddir.join("pkg/kube/inject/testdata/inject");
    let pod = std::fs::read_to_string(testdata.join("hello.yaml")).expect("Istio's input");
    let sample = InjectSample {
        name: "hello",
        annotations: &[],
        set: &["values.global.proxy_init.image=proxyInitTest"],
        // Istio's test runs on nodes that support native sidecars, so they are on.
        native_sidecars: true,
        cni: false,
        proxy_run_as_user: None,
        expect: &[],
    };
    let got = injected(&inject, &moddir, &sample, &pod, &[], &[]);
    let want = std::fs::read_to_string(testdata.join("hello.yaml.proxyInitImageName.injected"))
        .expect("Istio's golden");
    assert!(
        got == want,
        "the inject oracle is not Istio's injection test:\n{got}"
    );
}

// ---- Port ranges, judged by the kernel on real traffic ----

/// How many generated configurations with port ranges are judged on real traffic per run
/// (`MESHINIT_PARITY_RANGE_SAMPLE` asks for more).
const RANGE_SAMPLE: usize = 6;

/// Who answered a connection (the server's name and listening port), or that none did.
fn verdict(outcome: &crate::support::procs::Outcome) -> String {
    match outcome {
        crate::support::procs::Outcome::Answered(reply) => format!("{}:{}", reply.by, reply.port),
        crate::support::procs::Outcome::Failed(_) => "nobody".to_owned(),
    }
}

/// The ports at and around each range's edges: a-1, a, b, b+1 (within 1-65535), without
/// the sidecar's own ports (the fake sidecar listens there).
fn edge_ports(ranges: &[(u16, u16)]) -> Vec<u16> {
    const SIDECAR: [u16; 4] = [15001, 15006, 15101, 15106];
    let mut ports: Vec<u16> = ranges
        .iter()
        .flat_map(|&(a, b)| [a.checked_sub(1), Some(a), Some(b), b.checked_add(1)])
        .flatten()
        .filter(|p| *p != 0 && !SIDECAR.contains(p))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Istio's IPv4 restore input, loaded into `ns`.
fn load_iptables(ns: &crate::support::netns::NetNs, rules: &str) {
    let mut child = ns
        .command(&["iptables-nft-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn iptables-nft-restore");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .expect("write restore input");
    let out = child.wait_with_output().expect("wait for restore");
    assert!(
        out.status.success(),
        "iptables-nft-restore failed: {}\ninput:\n{rules}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How a pod's rules get there.
enum Load<'a> {
    /// Istio's iptables restore input for IPv4, through `iptables-nft-restore`.
    Iptables(&'a str),
    /// Istio's nftables transaction, through `nft -f`.
    Nft(&'a str),
    /// `meshinit apply` with these arguments and environment.
    Meshinit(Vec<String>, &'a [(String, String)]),
}

/// Loads the rules into a fresh pod with an app, a fake sidecar and a peer listening, makes
/// the app's connections to the peer and the peer's to the pod on each of `ports`, and
/// says who answered each.
fn verdicts_at(load: Load<'_>, ports: &[u16]) -> Vec<String> {
    use crate::support::lab::{APP, PROXY};
    use crate::support::procs::{connect, Background, Proto};
    let topo = crate::support::topology::Topology::builder().build();
    // The app (uid 1000) listens on ports below 1024 too (ranges such as 1-20).
    topo.pod
        .run(&["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"]);
    let listen = |ports: &[u16]| -> Vec<String> {
        ports.iter().map(|p| format!("tcp:0.0.0.0:{p}")).collect()
    };
    let _servers = [
        Background::serve(&topo.peer, None, "peer", &listen(ports)),
        Background::serve(&topo.pod, Some(APP), "app", &listen(ports)),
        Background::serve(
            &topo.pod,
            Some(PROXY),
            "sidecar",
            &listen(&[15001, 15006, 15101, 15106]),
        ),
    ];
    let _groups = crate::support::groups::GroupOverlay::new(topo.pod.name());
    match load {
        Load::Nft(rules) => crate::nft_golden::nft_load(&topo.pod, rules, "range check"),
        Load::Meshinit(args, env) => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            crate::support::meshinit::apply(&topo.pod, &args, &env);
        }
        Load::Iptables(rules) => load_iptables(&topo.pod, rules),
    }
    let targets: Vec<(bool, String)> = ports
        .iter()
        .flat_map(|p| {
            [
                (true, format!("198.51.100.30:{p}")),
                (false, format!("{}:{p}", crate::support::topology::POD_IP)),
            ]
        })
        .collect();
    std::thread::scope(|scope| {
        let running: Vec<_> = targets
            .iter()
            .map(|(outbound, to)| {
                let topo = &topo;
                scope.spawn(move || {
                    let outcome = if *outbound {
                        connect(&topo.pod, Some(APP), Proto::Tcp, to)
                    } else {
                        connect(&topo.peer, None, Proto::Tcp, to)
                    };
                    let who = if *outbound { "app" } else { "peer" };
                    format!("{who} → {to}: {}", verdict(&outcome))
                })
            })
            .collect();
        running
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect()
    })
}

/// As root: generated configurations whose port lists hold ranges (REDIRECT, so that no
/// TPROXY routing is needed), Istio's rules for the lists with the ranges expanded (loaded
/// from its output) and meshinit's with one match per range (installed by `meshinit apply`
/// on every engine), each in a fresh pod; real connections at each range's edges (a-1, a,
/// b, b+1), outbound from the app and inbound from a peer, must be answered by the same
/// listener under both. Exactly the sample's number of configurations, each with an edge
/// that changes who answers under Istio's rules, are judged so; a seed that does not yield
/// them fails.
#[test]
fn kernel_judges_port_ranges_at_their_edges() {
    if !crate::support::require_root("istio_oracle::kernel_judges_port_ranges_at_their_edges") {
        return;
    }
    let Some((bin, _)) = oracle() else { return };
    let seed = seed();
    let sample = env_number("MESHINIT_PARITY_RANGE_SAMPLE").map_or(RANGE_SAMPLE, |n| n as usize);
    let fit = |c: &Config| {
        if c.ranges.is_empty() {
            return Err("holds no port range");
        }
        if c.mode_none {
            return Err("mode NONE captures nothing");
        }
        let mut values = c.args.iter().chain(c.env.iter().map(|(_, v)| v));
        // Istio's nft reads `eth+` as a literal name (`nft-interface-wildcard`) and then
        // refuses the transaction.
        if values.any(|v| v.contains("TPROXY") || v.contains('+')) {
            return Err("TPROXY or an interface wildcard");
        }
        loads_here(c)
    };
    let mut failures = Vec::new();
    let judge = |index: usize, config: &Config, answer: &Answer| {
        let Some((istio, istio_nft)) = answer.planned_by_both() else {
            return Err("Istio refused it");
        };
        let args = config.meshinit_args();
        let (Ok(_), Ok(_)) = (
            meshinit_print(&args, &config.env, false),
            meshinit_print(&args, &config.env, true),
        ) else {
            failures.push(format!(
                "case {index}: {}\n  meshinit refused what Istio accepts expanded",
                config.describe()
            ));
            return Err("meshinit refused it (a failure)");
        };
        let ports = edge_ports(&config.ranges);
        let istio_iptables = verdicts_at(Load::Iptables(&istio.0), &ports);
        let istio_nftables = verdicts_at(Load::Nft(istio_nft), &ports);
        // Judged at its edges only if the edges decide something: some connection there is
        // answered by another listener than the others in its direction.
        let answers = |who: &str| -> BTreeSet<&str> {
            istio_iptables
                .iter()
                .filter(|v| v.starts_with(who))
                .filter_map(|v| v.rsplit(": ").next())
                .collect()
        };
        if answers("app").len() < 2 && answers("peer").len() < 2 {
            return Err("the same listener answers at every edge");
        }
        // meshinit as it installs itself, on every engine.
        let engines: [(&str, &[&str], &Vec<String>); 5] = [
            ("iptables", &[], &istio_iptables),
            ("iptables --match-sets", &["--match-sets"], &istio_iptables),
            (
                "nftables over netlink",
                &["--native-nftables", "--nftables-apply=netlink"],
                &istio_nftables,
            ),
            (
                "nftables via nft",
                &["--native-nftables", "--nftables-apply=nft"],
                &istio_nftables,
            ),
            (
                "nftables over netlink --match-sets",
                &[
                    "--native-nftables",
                    "--nftables-apply=netlink",
                    "--match-sets",
                ],
                &istio_nftables,
            ),
        ];
        for (backend, extra, want) in engines {
            let mut with: Vec<String> = args.clone();
            with.extend(extra.iter().map(|s| (*s).to_owned()));
            let got = verdicts_at(Load::Meshinit(with, &config.env), &ports);
            let differ: Vec<String> = want
                .iter()
                .zip(&got)
                .filter(|(w, g)| w != g)
                .map(|(w, g)| format!("    istio {w}\n    meshinit {g}"))
                .collect();
            if !differ.is_empty() {
                failures.push(format!(
                    "case {index} ({backend}): {}\n{}",
                    config.describe(),
                    differ.join("\n")
                ));
            }
        }
        Ok(())
    };
    judge_a_sample(
        "kernel_judges_port_ranges_at_their_edges",
        &bin,
        (seed, sample, DRAWS_PER_JUDGED_RANGE),
        fit,
        judge,
    );
    assert!(
        failures.is_empty(),
        "real connections at port ranges' edges went differently under Istio's rules for the expanded lists (MESHINIT_PARITY_SEED={seed}):\n{}",
        failures.join("\n\n")
    );
}
