//! Starting the helper roles (see `roles`) inside a namespace, as a given user.
//!
//! The chain is `ip netns exec NS [setpriv --reuid --regid --clear-groups [caps]] <this test
//! binary> support::roles::helper_entrypoint --exact …`; `ip` and `setpriv` exec in place,
//! so the child we hold is the helper itself.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use super::netns::NetNs;
use super::roles::{CLIENT_TIMEOUT, ENTRYPOINT, READY, ROLE_ENV};
use super::run_bounded;

/// How long a server may take to bind its listeners.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Whose credentials a helper runs with; `None` where used means root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Keep CAP_NET_ADMIN (ambient) after dropping root, as Istio's proxy does under TPROXY.
    pub net_admin: bool,
}

impl Creds {
    pub const fn user(uid: u32, gid: u32) -> Creds {
        Creds {
            uid,
            gid,
            net_admin: false,
        }
    }

    pub const fn with_net_admin(self) -> Creds {
        Creds {
            net_admin: true,
            ..self
        }
    }
}

fn helper_command(ns: &NetNs, creds: Option<Creds>, role: &str) -> Command {
    let argv = helper_argv(creds);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut cmd = ns.command(&argv);
    cmd.env(ROLE_ENV, role);
    cmd
}

/// The helper playing `role` as `creds`, started by `launcher` (a program and its
/// arguments that exec the rest, such as `nsenter --target PID --user --net`): for places
/// that are not a named network namespace.
pub fn helper_command_via(launcher: &[&str], creds: Option<Creds>, role: &str) -> Command {
    let (program, args) = launcher.split_first().expect("a launcher");
    let mut cmd = Command::new(program);
    cmd.args(args).args(helper_argv(creds)).env(ROLE_ENV, role);
    cmd
}

fn helper_argv(creds: Option<Creds>) -> Vec<String> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut argv: Vec<String> = Vec::new();
    if let Some(creds) = creds {
        argv.extend([
            "setpriv".to_owned(),
            format!("--reuid={}", creds.uid),
            format!("--regid={}", creds.gid),
            "--clear-groups".to_owned(),
        ]);
        if creds.net_admin {
            argv.extend(["--inh-caps=+net_admin", "--ambient-caps=+net_admin"].map(String::from));
        }
    }
    argv.push(exe.to_string_lossy().into_owned());
    argv.extend([ENTRYPOINT, "--exact", "--nocapture", "--test-threads=1"].map(String::from));
    argv
}

/// A long-running helper (a server), killed and reaped on drop.
pub struct Background {
    what: String,
    child: Child,
}

impl Background {
    /// Starts `serve NAME LISTENER…` and waits until it reports its listeners bound.
    pub fn serve(ns: &NetNs, creds: Option<Creds>, name: &str, listeners: &[String]) -> Self {
        let role = format!("serve {name} {}", listeners.join(" "));
        let what = format!("{role:?} in {} as {creds:?}", ns.name());
        Background::start(helper_command(ns, creds, &role), what)
    }

    /// Starts a `serve` role's command (from `helper_command_via`) and waits until it
    /// reports its listeners bound.
    pub fn start(mut command: Command, what: String) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {what}: {err}"));
        let lines = line_channel(child.stdout.take().expect("piped stdout"));
        // Until READY, stdout carries only libtest's banner; after it, nothing we read.
        let ready =
            std::iter::from_fn(|| lines.recv_timeout(READY_TIMEOUT).ok()).any(|line| line == READY);
        let mut background = Background { what, child };
        if !ready {
            let _ = background.child.kill();
            let mut stderr = String::new();
            if let Some(mut pipe) = background.child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!("{} did not get ready:\n{stderr}", background.what);
        }
        background
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn line_channel(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// What a server said about the connection it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The answering server's name (`sidecar` for the fake proxy).
    pub by: String,
    /// The port of the listener that answered.
    pub port: u16,
    pub local: SocketAddr,
    /// The destination the client asked for, before NAT (None: no conntrack entry).
    pub orig: Option<SocketAddr>,
    pub client: SocketAddr,
}

impl Reply {
    fn parse(line: &str) -> Option<Reply> {
        let mut fields = std::collections::HashMap::new();
        for word in line.split_whitespace() {
            let (key, value) = word.split_once('=')?;
            fields.insert(key, value);
        }
        let (by, port) = fields.get("by")?.rsplit_once(':')?;
        Some(Reply {
            by: by.to_owned(),
            port: port.parse().ok()?,
            local: fields.get("local")?.parse().ok()?,
            orig: match *fields.get("orig")? {
                "-" => None,
                orig => Some(orig.parse().ok()?),
            },
            client: fields.get("client")?.parse().ok()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Answered(Reply),
    Failed(String),
}

/// Runs one client exchange inside `ns` and reports who answered.
pub fn connect(ns: &NetNs, creds: Option<Creds>, proto: Proto, target: &str) -> Outcome {
    let role = format!("client {} {target}", proto.as_str());
    connect_with(helper_command(ns, creds, &role))
}

/// Runs a `client` role's command (from `helper_command_via`) and reports who answered.
pub fn connect_with(mut command: Command) -> Outcome {
    // The client bounds connect and read itself; this only guards against a hang.
    client_outcome(&run_bounded(&mut command, CLIENT_TIMEOUT * 3))
}

/// What a `client` role's run reported, wherever it ran (a namespace, a container).
pub fn client_outcome(output: &std::process::Output) -> Outcome {
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines() {
        if let Some(reply) = line.strip_prefix("REPLY ") {
            return Reply::parse(reply).map_or_else(
                || Outcome::Failed(format!("unparsable answer {reply:?}")),
                Outcome::Answered,
            );
        }
        if let Some(reason) = line.strip_prefix("FAIL ") {
            return Outcome::Failed(reason.to_owned());
        }
    }
    Outcome::Failed(format!(
        "client gave no result ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}
