//! The value types every layer shares: IP families, protocols, ports, owners, interfaces,
//! and the marks Istio reserves. A leaf: it imports nothing of meshinit's, so `config` (which
//! validates these values) and `rules` (which plans with them) both depend on it, and on
//! nothing above.

use std::fmt;

/// Envoy marks its connections back to the app with this in TPROXY mode (Istio's
/// `OutboundMark`); the inbound rules let them through, so no TPROXY mark may be it.
pub const OUTBOUND_MARK: u32 = 1338;

/// An IP family; every ruleset and route is planned per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of a network's addresses.
    pub fn of(net: &ipnet::IpNet) -> Family {
        match net {
            ipnet::IpNet::V4(_) => Family::V4,
            ipnet::IpNet::V6(_) => Family::V6,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A TCP/UDP port, never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(u16);

impl Port {
    pub fn new(port: u16) -> Option<Port> {
        (port != 0).then_some(Port(port))
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An entry of a port list: one port, or (meshinit's superset of Istio, as Linkerd has)
/// a range `first-last` of ports, both included. `first <= last` always holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    first: Port,
    last: Port,
}

impl PortRange {
    /// The range `first..=last`; `None` unless `first <= last`.
    pub fn new(first: Port, last: Port) -> Option<PortRange> {
        (first <= last).then_some(PortRange { first, last })
    }

    pub fn first(self) -> Port {
        self.first
    }

    pub fn last(self) -> Port {
        self.last
    }

    /// One port, not a range (`8080`, or `8080-8080`).
    pub fn single(self) -> Option<Port> {
        (self.first == self.last).then_some(self.first)
    }

    pub fn contains(self, port: u16) -> bool {
        (self.first.get()..=self.last.get()).contains(&port)
    }

    /// How many ports it covers.
    pub fn port_count(self) -> u32 {
        u32::from(self.last.get()) - u32::from(self.first.get()) + 1
    }

    /// Its ports, one by one.
    pub fn ports(self) -> impl Iterator<Item = Port> {
        (self.first.get()..=self.last.get()).map(Port)
    }
}

impl From<Port> for PortRange {
    fn from(port: Port) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }
}

/// A single port shows as the port (`Port(8080)`), a range as `Ports(8000-8100)`.
impl fmt::Debug for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.single() {
            Some(port) => write!(f, "{port:?}"),
            None => write!(f, "Ports({}-{})", self.first, self.last),
        }
    }
}

/// `8080`, or `8000-8100` for a range (nft's and the flags' spelling; iptables writes
/// `8000:8100`, see `rules::iptables`).
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.single() {
            Some(port) => write!(f, "{port}"),
            None => write!(f, "{}-{}", self.first, self.last),
        }
    }
}

/// Ranges sorted and merged where they overlap or touch: the same ports, fewest ranges.
pub fn merge_port_ranges(ranges: &[PortRange]) -> Vec<PortRange> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut merged: Vec<PortRange> = Vec::with_capacity(sorted.len());
    for range in sorted {
        match merged.last_mut() {
            Some(last) if u32::from(range.first.get()) <= u32::from(last.last.get()) + 1 => {
                last.last = last.last.max(range.last);
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// A user or group as iptables' owner match takes it: a number, or a name the kernel-side
/// tool resolves (Istio passes names such as `java` through unchanged).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    Id(u32),
    Name(String),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Id(id) => write!(f, "{id}"),
            Owner::Name(name) => f.write_str(name),
        }
    }
}

/// A network interface name, validated to what the kernel accepts (plus iptables' `+`
/// wildcard suffix).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Interface(String);

impl Interface {
    /// Callers validate first (see `config::parse`); this only wraps.
    pub(crate) fn new_unchecked(name: String) -> Interface {
        Interface(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnerKind {
    Uid,
    Gid,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `a..=b` as a port range (tests everywhere build their lists with it).
    pub(crate) fn range(a: u16, b: u16) -> PortRange {
        PortRange::new(Port::new(a).unwrap(), Port::new(b).unwrap()).unwrap()
    }

    /// One port as a range.
    pub(crate) fn port(p: u16) -> PortRange {
        range(p, p)
    }

    #[test]
    fn ranges_are_ordered_and_spelled_as_lists_take_them() {
        assert!(PortRange::new(Port::new(9).unwrap(), Port::new(8).unwrap()).is_none());
        assert_eq!(range(8000, 8100).to_string(), "8000-8100");
        assert_eq!(range(80, 80).to_string(), "80");
        assert_eq!(PortRange::from(Port::new(80).unwrap()), range(80, 80));
        assert_eq!(range(8000, 8100).port_count(), 101);
        assert!(range(8000, 8100).contains(8000) && range(8000, 8100).contains(8100));
        assert!(!range(8000, 8100).contains(7999) && !range(8000, 8100).contains(8101));
        assert_eq!(range(1, 65535).port_count(), 65535);
    }

    #[test]
    fn merging_joins_overlapping_and_adjacent_ranges() {
        let merged = merge_port_ranges(&[
            range(8050, 8200),
            range(80, 80),
            range(8000, 8100),
            range(81, 81),
            range(65535, 65535),
            range(443, 443),
        ]);
        assert_eq!(
            merged,
            [
                range(80, 81),
                range(443, 443),
                range(8000, 8200),
                range(65535, 65535)
            ]
        );
    }
}
