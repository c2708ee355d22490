//! Named ipsets for `--match-sets` on the iptables backend, and their `ipset restore` text.
//!
//! A chain of one rule per excluded CIDR costs every new connection a walk down the list;
//! a `hash:net` set costs one lookup per distinct prefix length, a `bitmap:port` set one
//! bit test. The rules then say `-m set --match-set NAME dst`.
//!
//! A set's name ends in a hash of its contents. That is what makes a re-run with new lists
//! atomic: the new contents go into a new set, the rules switch to it inside the family's
//! one `iptables-restore` transaction, and only then is the old set, no longer referenced,
//! destroyed. A re-run with the same lists finds its sets already there. The names are the
//! same in a dry-run and in the kernel.

use std::fmt::Write as _;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use crate::rules::capture::SetList;
use crate::values::{merge_port_ranges, Family, PortRange};

/// Every set meshinit creates starts with this, so cleanup finds exactly its own.
pub const SET_PREFIX: &str = "meshinit-";
/// The kernel's limit on a set name, without its terminating NUL.
pub const MAX_NAME_LEN: usize = 31;

/// What a set holds: networks of one family (`hash:net`) or ports (`bitmap:port`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SetMembers {
    /// Truncated to their prefix, sorted, without duplicates; never a /0 (`hash:net`
    /// refuses it; it is held as its two halves).
    Nets(Vec<IpNet>),
    /// Sorted, without duplicates; with a range among them, merged (sorted, overlapping and
    /// adjacent ranges joined), since the kernel refuses to add a port a set holds already.
    Ports(Vec<PortRange>),
}

/// One named set: what `-m set --match-set NAME dst` looks up.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpSet {
    name: String,
    family: Family,
    members: SetMembers,
}

impl IpSet {
    /// The set of `nets` (all of `family`) for `list`.
    pub fn nets(list: SetList, family: Family, nets: &[IpNet]) -> Arc<IpSet> {
        let mut members: Vec<IpNet> = nets.iter().flat_map(|n| halves_of_default(*n)).collect();
        members.sort();
        members.dedup();
        IpSet::named(list, family, SetMembers::Nets(members))
    }

    /// The set of `ports` for `list`, in `family`'s rules.
    pub fn ports(list: SetList, family: Family, ports: &[PortRange]) -> Arc<IpSet> {
        let members = if ports.iter().any(|p| p.single().is_none()) {
            merge_port_ranges(ports)
        } else {
            let mut members = ports.to_vec();
            members.sort();
            members.dedup();
            members
        };
        IpSet::named(list, family, SetMembers::Ports(members))
    }

    fn named(list: SetList, family: Family, members: SetMembers) -> Arc<IpSet> {
        let mut set = IpSet {
            name: String::new(),
            family,
            members,
        };
        let digit = match family {
            Family::V4 => '4',
            Family::V6 => '6',
        };
        set.name = format!(
            "{SET_PREFIX}{}{digit}-{:08x}",
            list.token(),
            fnv1a(&(set.create_line("") + &set.member_lines("")))
        );
        debug_assert!(set.name.len() <= MAX_NAME_LEN);
        Arc::new(set)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn members(&self) -> &SetMembers {
        &self.members
    }

    pub fn len(&self) -> usize {
        match &self.members {
            SetMembers::Nets(nets) => nets.len(),
            SetMembers::Ports(ports) => ports.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ipset type name, as the kernel and `ipset` call it.
    pub fn type_name(&self) -> &'static str {
        match self.members {
            SetMembers::Nets(_) => "hash:net",
            SetMembers::Ports(_) => "bitmap:port",
        }
    }

    /// A `bitmap:port` set covers a fixed range: the members' own, to keep it small.
    pub fn port_range(&self) -> Option<(u16, u16)> {
        match &self.members {
            SetMembers::Ports(ports) => Some((
                ports.first().map_or(1, |p| p.first().get()),
                ports.last().map_or(1, |p| p.last().get()),
            )),
            SetMembers::Nets(_) => None,
        }
    }

    /// `hash:net` sizing: buckets for every member up front, so filling it never resizes.
    pub fn hash_size(&self) -> u32 {
        (self.len() as u32).max(64).next_power_of_two()
    }

    pub fn max_elements(&self) -> u32 {
        (self.len() as u32).max(65536)
    }

    /// Whether a packet to `address`:`port` is in the set (for `explain`).
    pub fn contains(&self, address: std::net::IpAddr, port: u16) -> bool {
        match &self.members {
            SetMembers::Nets(nets) => nets.iter().any(|n| n.contains(&address)),
            SetMembers::Ports(ports) => ports.iter().any(|p| p.contains(port)),
        }
    }

    /// `create NAME TYPE OPTIONS`, as `ipset save` writes it.
    fn create_line(&self, name: &str) -> String {
        match (&self.members, self.port_range()) {
            (_, Some((from, to))) => format!("create {name} bitmap:port range {from}-{to}"),
            (_, None) => format!(
                "create {name} hash:net family {} hashsize {} maxelem {}",
                match self.family {
                    Family::V4 => "inet",
                    Family::V6 => "inet6",
                },
                self.hash_size(),
                self.max_elements()
            ),
        }
    }

    fn member_lines(&self, name: &str) -> String {
        let mut out = String::new();
        match &self.members {
            SetMembers::Nets(nets) => {
                for net in nets {
                    let _ = writeln!(out, "add {name} {net}");
                }
            }
            SetMembers::Ports(ports) => {
                for port in ports {
                    let _ = writeln!(out, "add {name} {port}");
                }
            }
        }
        out
    }

    /// The set as `ipset restore` input (what meshinit creates over netlink).
    pub fn restore_text(&self) -> String {
        let mut out = self.create_line(&self.name);
        out.push('\n');
        out.push_str(&self.member_lines(&self.name));
        out
    }
}

/// `hash:net` holds prefixes of 1 to 32 (128) bits; a default route is its two halves.
fn halves_of_default(net: IpNet) -> Vec<IpNet> {
    let net = net.trunc();
    if net.prefix_len() != 0 {
        return vec![net];
    }
    match net {
        IpNet::V4(_) => ["0.0.0.0/1", "128.0.0.0/1"]
            .iter()
            .filter_map(|n| n.parse::<Ipv4Net>().ok().map(IpNet::V4))
            .collect(),
        IpNet::V6(_) => ["::/1", "8000::/1"]
            .iter()
            .filter_map(|n| n.parse::<Ipv6Net>().ok().map(IpNet::V6))
            .collect(),
    }
}

/// FNV-1a (32 bits): stable across builds and platforms, unlike std's hasher, so a set's
/// name only changes when its contents do.
fn fnv1a(text: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in text.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// `ipset restore` input for `sets`; empty when there are none.
pub fn render_sets(sets: &[Arc<IpSet>]) -> String {
    sets.iter().map(|s| s.restore_text()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn port(p: u16) -> PortRange {
        crate::values::Port::new(p).unwrap().into()
    }

    #[test]
    fn names_fit_the_kernel_and_follow_contents_only() {
        let a = IpSet::nets(
            SetList::ExcludedNets,
            Family::V4,
            &nets(&["192.0.2.0/24", "10.0.0.0/8"]),
        );
        let same = IpSet::nets(
            SetList::ExcludedNets,
            Family::V4,
            &nets(&["10.0.0.0/8", "192.0.2.0/24", "10.0.0.0/8"]),
        );
        let other = IpSet::nets(
            SetList::ExcludedNets,
            Family::V4,
            &nets(&["10.0.0.0/8", "198.51.100.0/24"]),
        );
        assert_eq!(a.name(), same.name(), "order and duplicates do not matter");
        assert_ne!(a.name(), other.name());
        assert!(a.name().starts_with("meshinit-excl-nets4-"), "{}", a.name());
        for list in [
            SetList::ExcludedNets,
            SetList::IncludedNets,
            SetList::ExcludedOutboundPorts,
            SetList::IncludedOutboundPorts,
            SetList::ExcludedInboundPorts,
            SetList::IncludedInboundPorts,
        ] {
            let set = IpSet::ports(list, Family::V6, &[port(65535), port(1)]);
            assert!(set.name().len() <= MAX_NAME_LEN, "{}", set.name());
            assert!(set.name().starts_with(SET_PREFIX));
        }
        let v4 = IpSet::ports(SetList::ExcludedInboundPorts, Family::V4, &[port(1)]);
        let v6 = IpSet::ports(SetList::ExcludedInboundPorts, Family::V6, &[port(1)]);
        assert_ne!(v4.name(), v6.name(), "one set per family");
    }

    #[test]
    fn members_are_truncated_and_a_default_route_is_two_halves() {
        let set = IpSet::nets(
            SetList::IncludedNets,
            Family::V4,
            &nets(&["10.1.2.3/8", "0.0.0.0/0", "10.0.0.0/8"]),
        );
        assert_eq!(
            set.members(),
            &SetMembers::Nets(nets(&["0.0.0.0/1", "10.0.0.0/8", "128.0.0.0/1"]))
        );
        let v6 = IpSet::nets(SetList::IncludedNets, Family::V6, &nets(&["::/0"]));
        assert_eq!(v6.members(), &SetMembers::Nets(nets(&["::/1", "8000::/1"])));
        assert!(v6.contains("2001:db8::1".parse().unwrap(), 0));
    }

    #[test]
    fn restore_text_is_what_ipset_save_prints() {
        let set = IpSet::nets(
            SetList::ExcludedNets,
            Family::V6,
            &nets(&["2001:db8::/32", "2001:db8:1::/48"]),
        );
        let name = set.name();
        assert_eq!(
            set.restore_text(),
            format!(
                "create {name} hash:net family inet6 hashsize 64 maxelem 65536\n\
                 add {name} 2001:db8::/32\nadd {name} 2001:db8:1::/48\n"
            )
        );
        let ports = IpSet::ports(
            SetList::ExcludedOutboundPorts,
            Family::V4,
            &[port(8300), port(8200)],
        );
        let name = ports.name();
        assert_eq!(
            ports.restore_text(),
            format!(
                "create {name} bitmap:port range 8200-8300\nadd {name} 8200\nadd {name} 8300\n"
            )
        );
        assert!(ports.contains("192.0.2.1".parse().unwrap(), 8300));
        assert!(!ports.contains("192.0.2.1".parse().unwrap(), 8250));
        // A range is one member, `ipset restore` syntax; overlapping ones are merged (the
        // kernel refuses to add a port twice).
        let range = crate::rules::iptables::plan::tests::range;
        let ranged = IpSet::ports(
            SetList::ExcludedOutboundPorts,
            Family::V4,
            &[range(8200, 8300), port(80), range(8250, 8400)],
        );
        let name = ranged.name();
        assert_eq!(
            ranged.restore_text(),
            format!(
                "create {name} bitmap:port range 80-8400\nadd {name} 80\nadd {name} 8200-8400\n"
            )
        );
        assert!(ranged.contains("192.0.2.1".parse().unwrap(), 8400));
        assert!(!ranged.contains("192.0.2.1".parse().unwrap(), 8199));
    }
}
