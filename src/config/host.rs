//! Facts Istio reads off the machine, behind a trait so that configuration stays testable
//! and a dry-run with explicit options never depends on where it runs.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::error::ConfigError;

pub trait HostFacts {
    /// Whether the pod is IPv6: Istio looks at the first non-loopback, non-link-local
    /// address; with dual-stack, at whether any such address is IPv6.
    fn detect_ipv6(&self, dual_stack: bool) -> Result<bool, ConfigError>;
    /// The `nameserver` entries of resolv.conf.
    fn resolv_conf_nameservers(&self) -> Result<Vec<IpAddr>, ConfigError>;
    /// The uid of a local user, if it exists.
    fn user_uid(&self, name: &str) -> Option<u32>;
}

/// The real machine, as seen from the current network namespace.
#[derive(Debug, Clone)]
pub struct SystemHost {
    pub resolv_conf: PathBuf,
    pub passwd: PathBuf,
}

impl Default for SystemHost {
    fn default() -> Self {
        SystemHost {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            passwd: PathBuf::from("/etc/passwd"),
        }
    }
}

/// Istio's `getLocalIP` rule over an address list in kernel order.
pub fn ipv6_from_addresses(addresses: &[IpAddr], dual_stack: bool) -> Option<bool> {
    let mut usable = addresses.iter().filter(|a| is_pod_address(a));
    if dual_stack {
        let usable: Vec<&IpAddr> = usable.collect();
        if usable.is_empty() {
            return None;
        }
        Some(usable.iter().any(|a| a.is_ipv6()))
    } else {
        usable.next().map(IpAddr::is_ipv6)
    }
}

fn is_pod_address(addr: &IpAddr) -> bool {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(*addr),
        IpAddr::V4(_) => *addr,
    };
    match addr {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
        IpAddr::V6(a) => {
            let link_local_unicast = (a.segments()[0] & 0xffc0) == 0xfe80;
            let link_local_multicast = (a.segments()[0] & 0xff0f) == 0xff02;
            !a.is_loopback() && !link_local_unicast && !link_local_multicast
        }
    }
}

/// The `nameserver` lines of a resolv.conf text, as miekg/dns (Istio's reader) takes them:
/// entries that are not plain IP addresses are skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|server| server.parse().ok())
        })
        .collect()
}

fn uid_in_passwd(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next() == Some(name))
            .then(|| fields.nth(1))
            .flatten()
            .and_then(|uid| uid.parse().ok())
    })
}

impl HostFacts for SystemHost {
    fn detect_ipv6(&self, dual_stack: bool) -> Result<bool, ConfigError> {
        let addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .map_err(|e| ConfigError::Ipv6Detection {
                reason: format!("listing interface addresses failed: {e}"),
            })?
            .filter_map(|ifaddr| {
                let address = ifaddr.address?;
                if let Some(v4) = address.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect();
        ipv6_from_addresses(&addresses, dual_stack).ok_or_else(|| ConfigError::Ipv6Detection {
            reason: "this network namespace has no address other than loopback and link-local ones"
                .into(),
        })
    }

    fn resolv_conf_nameservers(&self) -> Result<Vec<IpAddr>, ConfigError> {
        read(&self.resolv_conf)
            .map(|text| parse_resolv_conf(&text))
            .map_err(|reason| ConfigError::ResolvConf {
                path: self.resolv_conf.clone(),
                reason,
            })
    }

    fn user_uid(&self, name: &str) -> Option<u32> {
        read(&self.passwd)
            .ok()
            .and_then(|text| uid_in_passwd(&text, name))
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn first_pod_address_decides_without_dual_stack() {
        let addrs = ips(&["127.0.0.1", "fe80::1", "192.0.2.10", "2001:db8::10"]);
        assert_eq!(ipv6_from_addresses(&addrs, false), Some(false));
        let addrs = ips(&["::1", "2001:db8::10", "192.0.2.10"]);
        assert_eq!(ipv6_from_addresses(&addrs, false), Some(true));
    }

    #[test]
    fn any_ipv6_address_counts_with_dual_stack() {
        let addrs = ips(&["192.0.2.10", "2001:db8::10"]);
        assert_eq!(ipv6_from_addresses(&addrs, true), Some(true));
        assert_eq!(
            ipv6_from_addresses(&ips(&["192.0.2.10"]), true),
            Some(false)
        );
    }

    #[test]
    fn no_pod_address_is_undecidable() {
        assert_eq!(
            ipv6_from_addresses(&ips(&["127.0.0.1", "::1", "fe80::2"]), false),
            None
        );
    }

    #[test]
    fn resolv_conf_nameservers_only() {
        let text = "search svc.cluster.local\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver bogus\noptions ndots:5\n";
        assert_eq!(
            parse_resolv_conf(text),
            ips(&["192.0.2.53", "2001:db8::53"])
        );
    }

    #[test]
    fn passwd_lookup() {
        let text = "root:x:0:0::/root:/bin/sh\nistio-proxy:x:1337:1337::/home:/bin/false\n";
        assert_eq!(uid_in_passwd(text, "istio-proxy"), Some(1337));
        assert_eq!(uid_in_passwd(text, "nobody"), None);
    }
}
