//! The processes tests run inside namespaces: servers (the fake sidecar is one) and clients.
//!
//! The test binary is its own helper: `procs` re-executes it, inside a namespace and with
//! the wanted uid/gid, to run only [`helper_entrypoint`], which reads its role from
//! [`ROLE_ENV`], plays it and exits the process. Without that variable it is an empty test.
//!
//! Role specs (whitespace-separated words):
//! - `serve NAME LISTENER…`, LISTENER being `tcp:ADDR`, `udp:ADDR`, `tproxy:ADDR` (TCP
//!   with `IP_TRANSPARENT`, as Envoy's inbound listener under TPROXY), `inbound:ADDR` (TCP,
//!   transparent when the process may set it: Istio gives istio-proxy `NET_ADMIN` under
//!   TPROXY only, so one stand-in image serves both modes) or `http:ADDR` (TCP that also
//!   answers a kubelet's HTTP probe, see [`HTTP_GRACE`]). Prints [`READY`] once
//!   every listener is bound, then answers each connection or datagram with one line:
//!   `by=NAME:PORT local=ADDR orig=ADDR|- client=ADDR` (PORT: the listener's port; orig: the
//!   connection's original destination from conntrack, `-` when there is none).
//! - `client tcp|udp ADDR`: connects (sending `ping` for UDP), prints `REPLY <line>` or
//!   `FAIL <reason>`, exits 0 or 1. Every step is bounded by [`CLIENT_TIMEOUT`].

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::socket::{
    bind, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
};

/// The environment variable that turns the helper test into a role.
pub const ROLE_ENV: &str = "MESHINIT_TEST_ROLE";
/// Set (to anything) where the role must not die with its parent process.
pub const NO_PDEATHSIG_ENV: &str = "MESHINIT_TEST_NO_PDEATHSIG";
/// The full libtest name of [`helper_entrypoint`], for `--exact`.
pub const ENTRYPOINT: &str = "support::roles::helper_entrypoint";
/// What a server prints once it accepts connections.
pub const READY: &str = "ready";
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an `http:` listener waits for a request before it answers as a plain one. A
/// kubelet's prober sends its GET at once; the tests' clients send nothing and read.
pub const HTTP_GRACE: Duration = Duration::from_millis(200);

/// How a listener answers.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Line,
    HttpOrLine,
}

/// Runs the role named in [`ROLE_ENV`] and exits; does nothing when it is unset.
#[test]
fn helper_entrypoint() {
    let Ok(spec) = std::env::var(ROLE_ENV) else {
        return;
    };
    // Never outlive the test that started us, even if it is killed. Not where the parent
    // is a runtime's short-lived process (`kubectl exec` under a kubelet: runc's exec parent
    // exits while the role runs, which would kill it): tests/k8s sets NO_PDEATHSIG_ENV.
    if std::env::var_os(NO_PDEATHSIG_ENV).is_none() {
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    }
    // End libtest's "test … " line, so that our output starts on lines of its own.
    println!();
    std::process::exit(play(&spec));
}

/// Plays the role `spec` names (see the module's documentation); returns the exit code.
/// Also the whole of the VM guests' checker, examples/vm_probe.rs.
pub fn play(spec: &str) -> i32 {
    let words: Vec<&str> = spec.split_whitespace().collect();
    match words.as_slice() {
        ["serve", name, listeners @ ..] => serve(name, listeners),
        ["client", proto, target] => client(proto, target),
        _ => {
            eprintln!("unknown role {spec:?}");
            2
        }
    }
}

fn serve(name: &str, listeners: &[&str]) -> i32 {
    let mut threads = Vec::new();
    for spec in listeners {
        let Some((kind, addr)) = spec.split_once(':') else {
            eprintln!("bad listener {spec:?}");
            return 2;
        };
        let addr: SocketAddr = match addr.parse() {
            Ok(addr) => addr,
            Err(err) => {
                eprintln!("bad listener address {addr:?}: {err}");
                return 2;
            }
        };
        let (ty, transparent, answer) = match kind {
            "tcp" => (SockType::Stream, Some(false), Answer::Line),
            "tproxy" => (SockType::Stream, Some(true), Answer::Line),
            "inbound" => (SockType::Stream, None, Answer::Line),
            "http" => (SockType::Stream, Some(false), Answer::HttpOrLine),
            "udp" => (SockType::Datagram, Some(false), Answer::Line),
            _ => {
                eprintln!("bad listener kind {kind:?}");
                return 2;
            }
        };
        let opened = match transparent {
            Some(transparent) => open(addr, ty, transparent),
            None => open(addr, ty, true).or_else(|err| match err {
                nix::errno::Errno::EPERM => open(addr, ty, false),
                err => Err(err),
            }),
        };
        let fd = match opened {
            Ok(fd) => fd,
            Err(err) => {
                eprintln!("cannot listen on {spec}: {err}");
                return 1;
            }
        };
        let label = format!("{name}:{}", addr.port());
        threads.push(std::thread::spawn(move || match ty {
            SockType::Stream => accept_loop(TcpListener::from(fd), &label, answer),
            _ => datagram_loop(UdpSocket::from(fd), &label),
        }));
    }
    println!("{READY}");
    let _ = std::io::stdout().flush();
    for thread in threads {
        let _ = thread.join();
    }
    0
}

/// A bound (and, for TCP, listening) socket. IPv6 sockets are IPv6-only so that a `0.0.0.0`
/// and a `[::]` listener can share a port, as Envoy's do.
fn open(addr: SocketAddr, ty: SockType, transparent: bool) -> nix::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    if transparent {
        setsockopt(&fd, sockopt::IpTransparent, &true)?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    if ty == SockType::Stream {
        listen(&fd, Backlog::MAXCONN)?;
    }
    Ok(fd)
}

fn accept_loop(listener: TcpListener, label: &str, answer: Answer) {
    for stream in listener.incoming().flatten() {
        let line = answer_line(
            label,
            stream.local_addr().ok(),
            original_dst(&stream),
            stream.peer_addr().ok(),
        );
        let mut stream = stream;
        let reply = if answer == Answer::HttpOrLine && read_http_request(&mut stream) {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{line}",
                line.len()
            )
        } else {
            line
        };
        let _ = stream.write_all(reply.as_bytes());
    }
}

/// Whether the peer sends an HTTP request within [`HTTP_GRACE`]; reads its head, so that
/// closing the connection after the answer does not reset it (unread input makes a close
/// send RST, which can reach the prober before the answer does).
fn read_http_request(stream: &mut TcpStream) -> bool {
    use std::io::Read;
    if stream.set_read_timeout(Some(HTTP_GRACE)).is_err() {
        return false;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    head.first().is_some_and(u8::is_ascii_uppercase)
}

fn datagram_loop(socket: UdpSocket, label: &str) {
    let mut buf = [0u8; 512];
    while let Ok((_, from)) = socket.recv_from(&mut buf) {
        // A UDP socket has no conntrack-backed original destination to ask for.
        let line = answer_line(label, socket.local_addr().ok(), None, Some(from));
        let _ = socket.send_to(line.as_bytes(), from);
    }
}

fn answer_line(
    label: &str,
    local: Option<SocketAddr>,
    orig: Option<SocketAddr>,
    client: Option<SocketAddr>,
) -> String {
    let show = |addr: Option<SocketAddr>| addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
    format!(
        "by={label} local={} orig={} client={}\n",
        show(local),
        show(orig),
        show(client)
    )
}

/// The connection's destination before NAT (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`);
/// None without a conntrack entry.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let fd = stream.as_fd();
    match stream.local_addr().ok()? {
        SocketAddr::V4(_) => getsockopt(&fd, sockopt::OriginalDst)
            .ok()
            .map(|raw| SocketAddr::V4(SocketAddrV4::from(SockaddrIn::from(raw)))),
        SocketAddr::V6(_) => getsockopt(&fd, sockopt::Ip6tOriginalDst)
            .ok()
            .map(|raw| SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(raw)))),
    }
}

fn client(proto: &str, target: &str) -> i32 {
    let result = target
        .parse::<SocketAddr>()
        .map_err(|err| format!("bad target {target:?}: {err}"))
        .and_then(|target| match proto {
            "tcp" => tcp_exchange(target).map_err(|err| err.to_string()),
            "udp" => udp_exchange(target).map_err(|err| err.to_string()),
            _ => Err(format!("bad protocol {proto:?}")),
        });
    match result {
        Ok(line) => {
            println!("REPLY {}", line.trim_end());
            0
        }
        Err(reason) => {
            println!("FAIL {reason}");
            1
        }
    }
}

fn tcp_exchange(target: SocketAddr) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&target, CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other("connection closed without an answer"));
    }
    Ok(line)
}

fn udp_exchange(target: SocketAddr) -> std::io::Result<String> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send(b"ping")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
