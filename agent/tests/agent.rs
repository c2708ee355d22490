//! The agent binary, run as the DaemonSet runs it, against temporary CNI directories (no
//! Kubernetes: repair off): readiness follows the entry, a rewrite of the primary's file
//! gets the entry back within a second, and SIGTERM leaves the directory as it was.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PRIMARY: &str = "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"node\",\n  \"plugins\": [\n    {\"type\": \"bridge\", \"bridge\": \"cni0\"}\n  ]\n}\n";

struct Agent {
    child: Child,
    addr: String,
}

impl Agent {
    fn start(bin: &Path, conf: &Path, plugin: &Path) -> Agent {
        // A free port: bound, noted, released for the agent.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_meshinit-cni-agent"))
            .args(["--repair-enabled", "false", "--capture-policy", "off"])
            .args(["--metrics-addr", &addr])
            .arg("--cni-bin-dir")
            .arg(bin)
            .arg("--cni-conf-dir")
            .arg(conf)
            .arg("--plugin-source")
            .arg(plugin)
            .args(["--exclude-namespaces", "kube-system,istio-system"])
            .env_clear()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent starts");
        Agent { child, addr }
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(&self.addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_owned();
        Some((status, body))
    }

    fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&Agent) -> bool,
    ) -> Duration {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done(self) {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{what}: not within {limit:?}");
    }

    fn ready(&self) -> bool {
        self.get("/readyz").is_some_and(|(status, _)| status == 200)
    }

    /// SIGTERM, as the kubelet stops the container; returns the exit status and stderr.
    fn terminate(mut self) -> (bool, String) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let output =
            std::mem::replace(&mut self.child, Command::new("true").spawn().expect("true"))
                .wait_with_output()
                .expect("agent exits");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Node {
    _root: tempfile::TempDir,
    bin: PathBuf,
    conf: PathBuf,
    plugin: PathBuf,
}

fn node() -> Node {
    let root = tempfile::tempdir().expect("tempdir");
    let bin = root.path().join("bin");
    let conf = root.path().join("net.d");
    fs::create_dir(&bin).expect("bin");
    fs::create_dir(&conf).expect("conf");
    let plugin = root.path().join("meshinit");
    fs::write(&plugin, b"\x7fELF not really").expect("plugin");
    Node {
        _root: root,
        bin,
        conf,
        plugin,
    }
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("list")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect()
}

fn has_entry(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["plugins"].as_array().cloned())
        .and_then(|p| p.last().cloned())
        .is_some_and(|last| last["type"] == "meshinit-cni")
}

#[test]
fn installs_repairs_a_rewrite_within_a_second_and_uninstalls_on_sigterm() {
    let node = node();
    let primary = node.conf.join("10-node.conflist");
    fs::write(&primary, PRIMARY).expect("primary");
    let before = snapshot(&node.conf);
    let agent = Agent::start(&node.bin, &node.conf, &node.plugin);
    agent.wait_for("ready", Duration::from_secs(10), Agent::ready);
    assert!(has_entry(&primary));
    assert!(node.bin.join("meshinit-cni").is_file());

    // The primary CNI restarts and writes its file again, as containerd's users see it.
    fs::write(&primary, PRIMARY).expect("rewrite");
    let took = agent.wait_for("entry back", Duration::from_secs(1), |_| {
        has_entry(&primary)
    });
    eprintln!("entry back after {took:?}");
    agent.wait_for("ready again", Duration::from_secs(1), Agent::ready);
    let (status, metrics) = agent.get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("meshinit_cni_config_writes_total 2\n"),
        "{metrics}"
    );

    let (ok, stderr) = agent.terminate();
    assert!(ok, "exit status; stderr:\n{stderr}");
    assert_eq!(
        snapshot(&node.conf),
        before,
        "conflist restored byte for byte"
    );
    assert!(!node.bin.join("meshinit-cni").exists(), "plugin removed");
}

#[test]
fn an_unparsable_primary_is_reported_untouched_and_not_ready() {
    let node = node();
    let primary = node.conf.join("10-broken.conflist");
    fs::write(&primary, "{\"plugins\": [").expect("primary");
    let agent = Agent::start(&node.bin, &node.conf, &node.plugin);
    let mut reason = String::new();
    agent.wait_for("a readiness answer", Duration::from_secs(10), |a| {
        match a.get("/readyz") {
            Some((503, body)) => {
                reason = body;
                true
            }
            _ => false,
        }
    });
    assert!(reason.contains("10-broken.conflist"), "{reason}");
    // It stays unready, and the file stays as it was, over several checks.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!agent.ready());
    assert_eq!(
        fs::read_to_string(&primary).expect("read"),
        "{\"plugins\": ["
    );
    let (ok, stderr) = agent.terminate();
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("10-broken.conflist is not valid CNI configuration"),
        "{stderr}"
    );
    assert_eq!(
        fs::read_to_string(&primary).expect("read"),
        "{\"plugins\": ["
    );
}

#[test]
fn waits_for_the_primary_cni_then_installs_when_it_writes_its_file() {
    let node = node();
    let agent = Agent::start(&node.bin, &node.conf, &node.plugin);
    let mut reason = String::new();
    agent.wait_for("a readiness answer", Duration::from_secs(10), |a| {
        match a.get("/readyz") {
            Some((503, body)) => {
                reason = body;
                true
            }
            _ => false,
        }
    });
    assert!(reason.contains("no CNI network configuration"), "{reason}");
    // The primary CNI starts and writes its configuration, as a new file (written elsewhere
    // and renamed in, as most do).
    let staged = node.bin.join("staged");
    fs::write(&staged, PRIMARY).expect("staged");
    let primary = node.conf.join("10-calico.conflist");
    fs::rename(&staged, &primary).expect("rename into place");
    agent.wait_for("entry written", Duration::from_secs(1), |_| {
        has_entry(&primary)
    });
    agent.wait_for("ready", Duration::from_secs(2), Agent::ready);
    let (ok, stderr) = agent.terminate();
    assert!(ok, "{stderr}");
    assert_eq!(fs::read_to_string(&primary).expect("read"), PRIMARY);
}
