//! A pod with meshinit's rules, its app, a fake sidecar and remote servers: start one, send
//! connections through it, and compare who answered with what Istio's rules would do.

use std::fmt;

use super::meshinit::{apply, dump_rules};
use super::netns::NetNs;
use super::procs::{connect, Background, Creds, Outcome, Proto};
use super::topology::{Topology, PEER_IP, PEER_IP6, POD_IFACE, VM_IFACE};

/// The VM's address behind the pod's kube-virt interface.
const VM_IP: &str = "203.0.113.130";

/// The app's user (any uid but the proxy's).
pub const APP: Creds = Creds::user(1000, 1000);
/// Istio's proxy user.
pub const PROXY: Creds = Creds::user(1337, 1337);

/// TCP ports the sidecar listens on: outbound, inbound, DNS (also over UDP).
const SIDECAR_PORTS: [u16; 3] = [15001, 15006, 15053];
/// The pod's app serves these (8080/8081 inbound, 15021 excluded by Istio, 9090 local;
/// 8079 and 8082 just outside the range 8080-8081).
const APP_PORTS: [u16; 6] = [8079, 8080, 8081, 8082, 15021, 9090];
/// The peer's TCP servers: remote services and DNS (8199 and 8301 just outside the range
/// 8200-8300).
const PEER_PORTS: [u16; 5] = [8199, 8200, 8300, 8301, 53];
/// The peer's UDP DNS servers, each bound to its address so its answer names it.
const PEER_UDP_DNS: [&str; 2] = ["192.0.2.1:53", "203.0.113.53:53"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sidecar {
    /// No proxy running: the app-init-container situation.
    Absent,
    /// Envoy under REDIRECT: plain listeners.
    Redirect,
    /// Envoy under TPROXY: the inbound listener is transparent, and the proxy keeps
    /// CAP_NET_ADMIN to open it.
    Tproxy,
}

/// How a lab is set up: meshinit's arguments and environment, and which sidecar runs.
pub struct Setup<'a> {
    pub args: Vec<String>,
    pub env: &'a [(&'a str, &'a str)],
    pub sidecar: Sidecar,
    pub vm: bool,
    /// Install the rules as a CNI runtime would (this network configuration, ADD), not with
    /// `meshinit apply`; `args` then describe the same settings, for `meshinit explain`.
    pub cni_config: Option<String>,
}

impl<'a> Setup<'a> {
    pub fn new(args: Vec<String>) -> Self {
        Setup {
            args,
            env: &[],
            sidecar: Sidecar::Redirect,
            vm: false,
            cni_config: None,
        }
    }

    pub fn via_cni(mut self, config: String) -> Self {
        self.cni_config = Some(config);
        self
    }

    pub fn env(mut self, env: &'a [(&'a str, &'a str)]) -> Self {
        self.env = env;
        self
    }

    pub fn sidecar(mut self, sidecar: Sidecar) -> Self {
        self.sidecar = sidecar;
        self
    }

    pub fn with_vm(mut self) -> Self {
        self.vm = true;
        self
    }
}

/// Who opens a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// The app in the pod (uid/gid 1000).
    App,
    /// The app in the pod, running with this gid.
    AppGid(u32),
    /// The proxy in the pod (uid 1337).
    Proxy,
    /// A client on the peer, root.
    Peer,
    /// A VM behind the pod's kube-virt interface, root.
    Vm,
}

/// What should answer a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The sidecar's listener on `port`, with this original destination (REDIRECT).
    Captured { port: u16, orig: &'static str },
    /// The sidecar's transparent listener on `port`: the socket's own address is the
    /// original destination, and the client's address is kept (TPROXY).
    Transparent {
        port: u16,
        local: &'static str,
        client_ip: &'static str,
    },
    /// The sidecar's DNS listener, over UDP (no original destination to check).
    DnsProxy,
    /// Not the sidecar: the named server, reached on this address.
    Direct {
        name: &'static str,
        local: &'static str,
    },
    /// Nobody: the connection is refused or times out.
    Fails,
}

impl Expect {
    fn matches(self, outcome: &Outcome) -> bool {
        let Outcome::Answered(reply) = outcome else {
            return self == Expect::Fails;
        };
        let by = |name: &str, port: u16| reply.by == name && reply.port == port;
        let is = |addr: Option<std::net::SocketAddr>, want: &str| {
            addr.is_some_and(|addr| addr.to_string() == want)
        };
        match self {
            Expect::Captured { port, orig } => by("sidecar", port) && is(reply.orig, orig),
            Expect::Transparent {
                port,
                local,
                client_ip,
            } => {
                by("sidecar", port)
                    && is(Some(reply.local), local)
                    && reply.client.ip().to_string() == client_ip
            }
            Expect::DnsProxy => by("sidecar", 15053),
            Expect::Direct { name, local } => reply.by == name && is(Some(reply.local), local),
            Expect::Fails => false,
        }
    }
}

/// One connection to make and its expected outcome.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    pub from: Client,
    pub proto: Proto,
    pub to: &'static str,
    pub expect: Expect,
}

pub fn tcp(from: Client, to: &'static str, expect: Expect) -> Check {
    Check {
        from,
        proto: Proto::Tcp,
        to,
        expect,
    }
}

pub fn udp(from: Client, to: &'static str, expect: Expect) -> Check {
    Check {
        from,
        proto: Proto::Udp,
        to,
        expect,
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {} → {}", self.from, self.proto.as_str(), self.to)
    }
}

pub struct Lab {
    // Declared first so the processes stop before their namespaces are deleted.
    _servers: Vec<Background>,
    topo: Topology,
    what: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    sidecar: Sidecar,
}

impl Lab {
    /// Builds the namespaces, starts the servers and the sidecar, applies the rules.
    pub fn start(setup: &Setup<'_>) -> Lab {
        let builder = Topology::builder();
        let topo = if setup.vm { builder.with_vm() } else { builder }.build();
        let mut peer = on_any_address("tcp", &PEER_PORTS);
        peer.extend(PEER_UDP_DNS.map(|addr| format!("udp:{addr}")));
        let mut servers = vec![
            Background::serve(&topo.peer, None, "peer", &peer),
            Background::serve(
                &topo.pod,
                Some(APP),
                "app",
                &on_any_address("tcp", &APP_PORTS),
            ),
        ];
        let sidecar = match setup.sidecar {
            Sidecar::Absent => None,
            Sidecar::Redirect => Some((PROXY, "tcp")),
            Sidecar::Tproxy => Some((PROXY.with_net_admin(), "tproxy")),
        };
        if let Some((creds, kind)) = sidecar {
            let mut listeners = on_any_address(kind, &SIDECAR_PORTS);
            // Like Istio's agent, on loopback: REDIRECT sends the app's queries to
            // 127.0.0.1, and the answer must come from there for conntrack to undo the NAT.
            listeners.extend(["udp:127.0.0.1:15053", "udp:[::1]:15053"].map(String::from));
            servers.push(Background::serve(
                &topo.pod,
                Some(creds),
                "sidecar",
                &listeners,
            ));
        }
        let args: Vec<&str> = setup.args.iter().map(String::as_str).collect();
        match &setup.cni_config {
            Some(config) => {
                let result = super::cni::invoke(&topo.pod, "ADD", config);
                assert_eq!(
                    result.code,
                    Some(0),
                    "CNI ADD failed: {}\n{}",
                    result.stdout,
                    result.stderr
                );
            }
            None => apply(&topo.pod, &args, setup.env),
        }
        Lab {
            _servers: servers,
            topo,
            what: format!(
                "meshinit {:?} with env {:?}, sidecar {:?}",
                setup.args, setup.env, setup.sidecar
            ),
            args: setup.args.clone(),
            env: setup
                .env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            sidecar: setup.sidecar,
        }
    }

    /// What `meshinit explain` says about `check`, as (verdict, port), from the same
    /// arguments and environment the pod's rules were applied with.
    fn explained(&self, check: &Check) -> (String, Option<u16>) {
        let to_v6 = check.to.starts_with('[');
        let mut args: Vec<String> = vec!["explain".into(), "--format".into(), "json".into()];
        args.extend(self.args.iter().cloned());
        args.extend(["--dst".into(), check.to.into()]);
        args.extend(["--proto".into(), check.proto.as_str().into()]);
        let mut flag = |name: &str, value: String| args.extend([name.to_owned(), value]);
        match check.from {
            Client::App => flag("--uid", APP.uid.to_string()),
            Client::AppGid(gid) => {
                flag("--uid", APP.uid.to_string());
                flag("--gid", gid.to_string());
            }
            Client::Proxy => flag("--uid", PROXY.uid.to_string()),
            Client::Peer => {
                args.push("--inbound".into());
                let src = if to_v6 { PEER_IP6 } else { PEER_IP };
                args.extend([
                    "--src".into(),
                    src.into(),
                    "--iface".into(),
                    POD_IFACE.into(),
                ]);
            }
            Client::Vm => {
                args.push("--inbound".into());
                args.extend([
                    "--src".into(),
                    VM_IP.into(),
                    "--iface".into(),
                    VM_IFACE.into(),
                ]);
            }
        }
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_meshinit"))
            .args(&args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run meshinit explain");
        let json = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "meshinit {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let field = |name: &str| {
            json.split(&format!("\"{name}\":"))
                .nth(1)
                .map(|rest| {
                    rest.split([',', '}'])
                        .next()
                        .unwrap_or("")
                        .trim_matches('"')
                        .to_owned()
                })
                .unwrap_or_default()
        };
        (field("verdict"), field("port").parse().ok())
    }

    /// Whether explain's verdict describes what the real connection did.
    fn agrees(&self, outcome: &Outcome, (verdict, port): &(String, Option<u16>)) -> bool {
        let captured = matches!(verdict.as_str(), "redirected" | "tproxied");
        match outcome {
            Outcome::Answered(reply) if reply.by == "sidecar" => {
                captured && *port == Some(reply.port)
            }
            Outcome::Answered(_) => verdict == "direct",
            // Nothing answered: captured to a sidecar that is not running, or dropped.
            _ => (captured && self.sidecar == Sidecar::Absent) || verdict == "dropped",
        }
    }

    /// The pod's namespace, to look at its state.
    pub fn pod(&self) -> &NetNs {
        &self.topo.pod
    }

    fn client(&self, from: Client) -> (&NetNs, Option<Creds>) {
        match from {
            Client::App => (&self.topo.pod, Some(APP)),
            Client::AppGid(gid) => (&self.topo.pod, Some(Creds::user(APP.uid, gid))),
            Client::Proxy => (&self.topo.pod, Some(PROXY)),
            Client::Peer => (&self.topo.peer, None),
            Client::Vm => (self.topo.vm.as_ref().expect("a lab started with_vm"), None),
        }
    }

    /// Makes one connection and reports who answered, for tests that judge it themselves.
    pub fn connect(&self, from: Client, proto: Proto, to: &str) -> Outcome {
        let (ns, creds) = self.client(from);
        connect(ns, creds, proto, to)
    }

    /// Makes every connection (concurrently) and panics listing each one that did not end
    /// as expected, with the pod's rules.
    pub fn check(&self, checks: &[Check]) {
        let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
            let running: Vec<_> = checks
                .iter()
                .map(|check| {
                    let (ns, creds) = self.client(check.from);
                    scope.spawn(move || connect(ns, creds, check.proto, check.to))
                })
                .collect();
            running
                .into_iter()
                .map(|thread| thread.join().expect("client thread"))
                .collect()
        });
        let mut wrong: Vec<String> = checks
            .iter()
            .zip(&outcomes)
            .filter(|(check, outcome)| !check.expect.matches(outcome))
            .map(|(check, outcome)| {
                format!(
                    "  {check}\n    expected {:?}\n    got      {outcome:?}",
                    check.expect
                )
            })
            .collect();
        // `meshinit explain` must agree with the kernel on every connection made.
        for (check, outcome) in checks.iter().zip(&outcomes) {
            let explained = self.explained(check);
            if !self.agrees(outcome, &explained) {
                wrong.push(format!(
                    "  {check}\n    meshinit explain says {explained:?}\n    the kernel did    {outcome:?}"
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{}:\n{}\nrules in the pod:\n{}",
            self.what,
            wrong.join("\n"),
            dump_rules(&self.topo.pod)
        );
    }
}

/// `kind` listeners on `ports`, on every address of both families.
fn on_any_address(kind: &str, ports: &[u16]) -> Vec<String> {
    ports
        .iter()
        .flat_map(|port| ["0.0.0.0", "[::]"].map(|any| format!("{kind}:{any}:{port}")))
        .collect()
}
