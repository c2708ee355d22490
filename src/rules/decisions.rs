//! What Istio decides for a configuration, whatever the backend: its fixed ports, marks and
//! conntrack zones, which addresses mean "loopback" and "the proxy's passthrough" in each
//! family, the proxy's owners, the DNS servers to capture per family, and whether TPROXY
//! needs policy routing. `capture.rs` builds Istio's steps from these values; what Istio
//! decides is changed there or here, once.
//!
//! Pure: no I/O, no text.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{CaptureConfig, DnsCapture, InboundCapture, InterceptionMode};
use crate::values::{Family, Interface, Owner, OwnerKind, Port};

pub use crate::values::OUTBOUND_MARK;

/// `::6`, the IPv6 twin of 127.0.0.6: the inbound passthrough source address.
pub const IPV6_PASSTHROUGH: IpAddr = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));

/// Policy routing that TPROXY needs: packets marked `mark` look up `table`, whose only route
/// delivers everything locally via `lo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TproxyRouting {
    pub mark: u32,
    pub table: u32,
}

/// The conntrack states Istio's rules match, in either backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtState {
    Invalid,
    RelatedEstablished,
}
/// The agent's DNS proxy.
pub const DNS_PROXY_PORT: u16 = 15053;
pub const DNS_PORT: u16 = 53;
/// Conntrack zones that keep the agent's own DNS flows apart from the app's (Istio's fix
/// for UDP conntrack races): upstream queries in zone 1, app ↔ agent in zone 2.
pub const CT_ZONE_UPSTREAM: u16 = 1;
pub const CT_ZONE_CLIENT: u16 = 2;

/// One of the fixed, non-zero ports above.
pub fn fixed_port(port: u16) -> Port {
    Port::new(port).unwrap_or_else(|| unreachable!("fixed ports are non-zero"))
}

/// `addr` as a host route (/32 or /128), as Istio writes single addresses.
pub fn host_net(addr: IpAddr) -> IpNet {
    match addr {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::from(a)),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::from(a)),
    }
}

pub fn lo() -> Interface {
    Interface::new_unchecked("lo".to_owned())
}

/// The loopback range that counts as "the app talking to itself" in `family`: the
/// configured IPv4 range (`ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`), `::1` for IPv6.
pub fn loopback(cfg: &CaptureConfig, family: Family) -> IpNet {
    match family {
        Family::V4 => IpNet::V4(cfg.host_ipv4_loopback),
        Family::V6 => host_net(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    }
}

/// The source Envoy uses for inbound passthrough connections to the app: 127.0.0.6, `::6`.
pub fn passthrough_source(family: Family) -> IpNet {
    match family {
        Family::V4 => host_net(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))),
        Family::V6 => host_net(IPV6_PASSTHROUGH),
    }
}

pub fn tproxy(cfg: &CaptureConfig) -> bool {
    cfg.interception == InterceptionMode::Tproxy
}

pub fn dns_on(cfg: &CaptureConfig) -> bool {
    cfg.dns != DnsCapture::Off
}

/// A proxy uid or gid, with its owner-match kind.
pub type ProxyOwner = (OwnerKind, Owner);

/// The proxy's uids then gids (Istio handles them in two identical loops).
pub fn proxy_owners(cfg: &CaptureConfig) -> Vec<ProxyOwner> {
    let uids = cfg.proxy_uids.iter().map(|o| (OwnerKind::Uid, o.clone()));
    let gids = cfg.proxy_gids.iter().map(|o| (OwnerKind::Gid, o.clone()));
    uids.chain(gids).collect()
}

/// Which DNS traffic is captured: everything on port 53, or queries to these servers of
/// each family (as host routes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsServers {
    pub all: bool,
    pub v4: Vec<IpNet>,
    pub v6: Vec<IpNet>,
}

pub fn dns_servers(cfg: &CaptureConfig) -> DnsServers {
    match &cfg.dns {
        DnsCapture::Off => DnsServers {
            all: false,
            v4: vec![],
            v6: vec![],
        },
        DnsCapture::All => DnsServers {
            all: true,
            v4: vec![],
            v6: vec![],
        },
        DnsCapture::Servers { v4, v6 } => DnsServers {
            all: false,
            v4: v4.iter().map(|a| host_net(IpAddr::V4(*a))).collect(),
            v6: v6.iter().map(|a| host_net(IpAddr::V6(*a))).collect(),
        },
    }
}

/// TPROXY's policy routing (marked packets delivered locally), needed only when inbound
/// traffic is tproxied.
pub fn tproxy_routing(cfg: &CaptureConfig) -> Option<TproxyRouting> {
    (tproxy(cfg) && cfg.inbound != InboundCapture::Off).then_some(TproxyRouting {
        mark: cfg.tproxy_mark,
        table: cfg.tproxy_route_table,
    })
}
