//! `meshinit validate` (and `--run-validation`): prove the capture rules work, as Istio's
//! `istio-validation` container does, before the app starts.
//!
//! Listen on loopback at the envoy and inbound capture ports; once a second, connect from
//! 127.0.0.1 to 127.0.0.6 at the probe port (15002). With the rules in place and this
//! process running as the proxy's uid, the connection is redirected to the inbound
//! capture listener, whose accepted socket reports the probe port as original destination.
//! A random token sent by the client and echoed back proves the reply came from this
//! process's listener, not from something else bound to those ports.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};

use crate::rules::iptables::model::Port;

/// Istio's exit code for a failed validation, which its CNI repair controller watches for.
pub const EXIT_VALIDATION_FAILED: u8 = 126;

const ATTEMPT_INTERVAL: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct Probe {
    pub ipv6: bool,
    pub listen_ports: Vec<Port>,
    pub probe_port: Port,
    pub timeout: Duration,
    pub proxy_uid: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error(
        "iptables validation failed: no connection to {target} was captured within {timeout:?}; \
         workload is not ready for Istio. Check that the capture rules are in place (istio-init \
         or the Istio CNI plugin ran in this pod: `iptables-save -t nat` shows ISTIO_OUTPUT) and \
         that this check runs as the proxy's uid ({uid}, now {current}). Under Istio CNI, the \
         pod may have been scheduled before the node's CNI agent was ready: delete it to retry.{last}"
    )]
    NotCaptured {
        target: SocketAddr,
        timeout: Duration,
        uid: String,
        current: u32,
        last: String,
    },

    #[error("cannot listen on any of {addresses}: {reason} (is the sidecar already running?)")]
    NoListener { addresses: String, reason: String },
}

impl ValidationError {
    pub fn exit_code(&self) -> u8 {
        EXIT_VALIDATION_FAILED
    }
}

fn addresses(ipv6: bool) -> (IpAddr, IpAddr) {
    if ipv6 {
        (
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            crate::rules::iptables::model::IPV6_PASSTHROUGH,
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
        )
    }
}

/// The original destination port of an accepted, redirected connection.
fn original_port(stream: &TcpStream, ipv6: bool) -> Option<u16> {
    if ipv6 {
        getsockopt(&stream.as_fd(), sockopt::Ip6tOriginalDst)
            .ok()
            .map(|addr| u16::from_be(addr.sin6_port))
    } else {
        getsockopt(&stream.as_fd(), sockopt::OriginalDst)
            .ok()
            .map(|addr| u16::from_be(addr.sin_port))
    }
}

/// Echoes each client's token with the original port it was sent to.
fn serve(listener: TcpListener, ipv6: bool, probe_port: u16, found: mpsc::Sender<()>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let port = original_port(&stream, ipv6);
        let mut token = [0u8; 16];
        if stream.read_exact(&mut token).is_err() {
            continue;
        }
        let reply = format!("{} {}", hex(&token), port.unwrap_or(0));
        let _ = stream.write_all(reply.as_bytes());
        if port == Some(probe_port) {
            let _ = found.send(());
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_token() -> [u8; 16] {
    let mut token = [0u8; 16];
    if let Ok(mut urandom) = std::fs::File::open("/dev/urandom") {
        let _ = urandom.read_exact(&mut token);
    }
    // Fallback entropy if /dev/urandom is missing: the token only has to differ from
    // whatever another listener might echo, so time and pid are enough.
    if token == [0u8; 16] {
        let seed = Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id());
        token.copy_from_slice(&seed.to_le_bytes());
    }
    token
}

/// One probe connection; `Ok` when our listener echoed our token for the probe port.
fn attempt(local: IpAddr, target: SocketAddr) -> Result<(), String> {
    let socket = match local {
        IpAddr::V4(_) => nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        ),
        IpAddr::V6(_) => nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet6,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        ),
    }
    .map_err(|e| format!("socket: {e}"))?;
    // Bind the source to loopback as Istio does; 127.0.0.6 is reached over `lo` anyway.
    let bind_to: nix::sys::socket::SockaddrStorage = SocketAddr::new(local, 0).into();
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&socket), &bind_to)
        .map_err(|e| format!("bind: {e}"))?;
    let stream = TcpStream::from(socket);
    let target_storage: nix::sys::socket::SockaddrStorage = target.into();
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&stream), &target_storage)
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let mut stream = stream;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let token = random_token();
    stream
        .write_all(&token)
        .map_err(|e| format!("sending: {e}"))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("reading the reply: {e}"))?;
    let expected = format!("{} {}", hex(&token), target.port());
    if reply == expected {
        Ok(())
    } else if reply.starts_with(&hex(&token)) {
        Err(format!(
            "captured, but with original port {:?}",
            reply.split(' ').nth(1)
        ))
    } else {
        Err(format!(
            "{target} answered, but not through capture (reply {reply:?})"
        ))
    }
}

/// Runs the probe until it succeeds or `timeout` passes.
pub fn run(probe: &Probe) -> Result<(), ValidationError> {
    let (listen_ip, target_ip) = addresses(probe.ipv6);
    let target = SocketAddr::new(target_ip, probe.probe_port.get());
    let (found_tx, found_rx) = mpsc::channel();
    let mut listening = 0;
    let mut last_bind_error = String::new();
    for port in &probe.listen_ports {
        let address = SocketAddr::new(listen_ip, port.get());
        match TcpListener::bind(address) {
            Ok(listener) => {
                tracing::info!(%address, "validation listener up");
                let found = found_tx.clone();
                let (ipv6, probe_port) = (probe.ipv6, probe.probe_port.get());
                thread::spawn(move || serve(listener, ipv6, probe_port, found));
                listening += 1;
            }
            Err(err) => {
                tracing::error!(%address, %err, "cannot listen");
                last_bind_error = err.to_string();
            }
        }
    }
    if listening == 0 {
        let addresses: Vec<String> = probe
            .listen_ports
            .iter()
            .map(|p| SocketAddr::new(listen_ip, p.get()).to_string())
            .collect();
        return Err(ValidationError::NoListener {
            addresses: addresses.join(", "),
            reason: last_bind_error,
        });
    }
    let deadline = Instant::now() + probe.timeout;
    let passed = || tracing::info!(%target, "validation passed: traffic is captured");
    let last = loop {
        let reason = match attempt(listen_ip, target) {
            Ok(()) => {
                passed();
                return Ok(());
            }
            Err(reason) => reason,
        };
        // The listener may have seen the probe even if its reply got lost.
        if found_rx.try_recv().is_ok() {
            passed();
            return Ok(());
        }
        tracing::debug!(%reason, "probe not captured yet");
        let now = Instant::now();
        if now >= deadline {
            break reason;
        }
        thread::sleep(ATTEMPT_INTERVAL.min(deadline - now));
    };
    Err(ValidationError::NotCaptured {
        target,
        timeout: probe.timeout,
        uid: probe.proxy_uid.clone(),
        current: nix::unistd::geteuid().as_raw(),
        last: format!(" Last attempt: {last}."),
    })
}
