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
