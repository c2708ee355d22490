//! A stand-in for every `*tables-*-restore` that holds a run open between the tables it
//! commits: each reads its whole input, then commits it one table at a time through the
//! real program (as `iptables-restore` itself does, table by table), and after each commit
//! waits for the test. The moments in between, which a real restore passes through in
//! microseconds, last as long as the test needs to look at them.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::meshinit::command;
use super::netns::NetNs;
use super::scratch::ScratchDir;

/// How long one held-open restore may take before the test gives up on it.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory of stand-ins for every `*tables-*-restore`: each reads its whole input,
/// then commits it one table at a time through the real program, and after each commit
/// appends a line to `committed` and waits until the test creates `go-N` (N counting
/// commits across every restore of the run).
pub struct Stepper {
    dir: ScratchDir,
}

impl Stepper {
    pub fn new() -> Stepper {
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

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// PATH with the stand-ins first.
    pub fn path(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    pub fn committed(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("committed"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until commit `step` has happened (returning what it committed) or `run` ends.
    pub fn wait(&self, step: usize, run: &mut Child) -> Result<String, ExitStatus> {
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

    pub fn release(&self, step: usize) {
        std::fs::write(self.dir.path().join(format!("go-{step}")), "").expect("go file");
    }

    pub fn reset(&self) {
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
pub fn start_stepped(ns: &NetNs, stepper: &Stepper, args: &[String]) -> Child {
    let mut argv = vec!["apply"];
    argv.extend(args.iter().map(String::as_str));
    let mut cmd = command(ns, &[], &argv);
    let out = |name: &str| File::create(stepper.dir().join(name)).expect("output file");
    cmd.env("PATH", stepper.path())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out("stdout"))
        .stderr(out("stderr"));
    cmd.spawn().expect("starting meshinit")
}
