//! `cargo bench --bench burst`: a node starting many pods at once. 110 pods (the kubelet's
//! default pod limit) each apply the injector's default ruleset at the same moment, against
//! 110 bare `iptables-restore --wait` of the very input meshinit produces, on both iptables
//! backends, rounds alternating. On iptables-legacy every one of them takes the node-wide
//! xtables lock in turn, so this measures how well they queue for it. Wall time from the
//! first start to the last exit; namespaces are made before and deleted after, untimed.
//! Needs root; prints why and exits otherwise.
//!
//! Options (after `--`): `--pods N` (default 110), `--runs N` (default 5).
//! `MESHINIT_BIN` selects the binary (`benches/run.sh` points it at the static build).

mod common;

use common::{median, meshinit, option, INJECTOR_DEFAULT};

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `count` throwaway namespaces, deleted on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new(round: usize, count: usize) -> Namespaces {
        let names: Vec<String> = (0..count)
            .map(|i| format!("mi-burst-{}-{round}-{i}", std::process::id()))
            .collect();
        let batch: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
        run_ip_batch(&batch);
        Namespaces(names)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let batch: String = self.0.iter().map(|n| format!("netns del {n}\n")).collect();
        run_ip_batch(&batch);
    }
}

fn run_ip_batch(batch: &str) {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("ip -batch");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(batch.as_bytes())
        .expect("ip batch input");
    assert!(child.wait().expect("ip").success(), "ip -batch failed");
}

/// Starts one process per namespace at once (each fed `input`), waits for all; wall time.
fn burst(namespaces: &Namespaces, argv: &[String], input: Option<&str>) -> Duration {
    let started = Instant::now();
    let children: Vec<Child> = namespaces
        .0
        .iter()
        .map(|ns| {
            Command::new("ip")
                .args(["netns", "exec", ns])
                .args(argv)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .stdin(if input.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for mut child in children {
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes()).expect("input");
        }
        let output = child.wait_with_output().expect("wait");
        assert!(
            output.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    started.elapsed()
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench burst: skipped, needs root (it creates network namespaces)");
        return;
    }
    let pods = option("--pods", 110);
    let runs = option("--runs", 5).max(1);
    let input = {
        let output = Command::new(meshinit())
            .env_clear()
            .args(["print", "--family", "ipv4"])
            .args(INJECTOR_DEFAULT)
            .arg("--no-ipv6")
            .output()
            .expect("meshinit print");
        String::from_utf8(output.stdout).expect("utf-8")
    };
    println!("{pods} pods applying at once (injector default, IPv4), {runs} rounds each, alternating: meshinit apply vs bare restore --wait of the same input");
    println!();
    println!("| backend | meshinit (median wall) | bare restores (median wall) | ratio |");
    println!("| --- | --- | --- | --- |");
    let mut round = 0;
    for backend in ["legacy", "nft"] {
        let mut apply: Vec<String> = vec![meshinit(), "apply".into()];
        apply.extend(INJECTOR_DEFAULT.iter().map(|s| (*s).to_owned()));
        apply.push("--no-ipv6".into());
        apply.extend(["--force-iptables-binary".into(), backend.into()]);
        let bare: Vec<String> = vec![
            format!("iptables-{backend}-restore"),
            "--noflush".into(),
            "--wait".into(),
        ];
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            round += 1;
            ours.push(burst(&Namespaces::new(round, pods), &apply, None));
            round += 1;
            theirs.push(burst(&Namespaces::new(round, pods), &bare, Some(&input)));
        }
        let (ours, theirs) = (median(&mut ours), median(&mut theirs));
        println!(
            "| iptables-{backend} | {} | {} | {:.2}x |",
            ms(ours),
            ms(theirs),
            ours.as_secs_f64() / theirs.as_secs_f64()
        );
    }
}
