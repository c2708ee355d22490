//! The ipsets that `--match-sets` rules look up, created over netlink (no `ipset` binary,
//! no process).
//!
//! Sets live outside iptables' transactions, so the engine orders around that: sets are
//! created before the rules that name them, and a set is destroyed only once no rule uses
//! it. The kernel counts the rules using each set, which is how "unused" is known, for a
//! set of an earlier configuration as for one left by an interrupted run.

use std::sync::Arc;

use super::{IpSetError, IpSets, SetContents, SetMember, IPSET_ERR_BUSY};
use crate::netlink::wire::{attrs, Writer, NLA_F_NET_BYTEORDER};
use crate::netlink::Socket;
use crate::rules::iptables::ipset::{IpSet, SetMembers, SET_PREFIX};
use crate::rules::iptables::model::Family;

// The ipset netlink protocol (include/uapi/linux/netfilter/ipset/ip_set.h).
/// Version 6 is understood by every kernel since 3.x, and still accepted.
const PROTOCOL: u8 = 6;
const CMD_PROTOCOL: u8 = 1;
const CMD_CREATE: u8 = 2;
const CMD_DESTROY: u8 = 3;
const CMD_FLUSH: u8 = 4;
const CMD_LIST: u8 = 7;
const CMD_ADD: u8 = 9;
const ATTR_PROTOCOL: u16 = 1;
const ATTR_SETNAME: u16 = 2;
const ATTR_TYPENAME: u16 = 3;
const ATTR_REVISION: u16 = 4;
const ATTR_FAMILY: u16 = 5;
const ATTR_FLAGS: u16 = 6;
const ATTR_DATA: u16 = 7;
const ATTR_ADT: u16 = 8;
const ATTR_LINENO: u16 = 9;
const ATTR_IP: u16 = 1;
const ATTR_CIDR: u16 = 3;
const ATTR_PORT: u16 = 4;
const ATTR_PORT_TO: u16 = 5;
const ATTR_HASHSIZE: u16 = 18;
const ATTR_MAXELEM: u16 = 19;
const ATTR_REFERENCES: u16 = 25;
const ATTR_IPADDR_IPV4: u16 = 1;
const ATTR_IPADDR_IPV6: u16 = 2;
/// `IPSET_FLAG_LIST_HEADER`: a listing of names and headers, without members.
const FLAG_LIST_HEADER: u32 = 1 << 2;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NLM_F_EXCL: u16 = 0x200;
/// Members per ADD message: an attribute's length is 16 bits, so the nested list is cut
/// well before 64 KiB (an IPv6 member takes 36 bytes).
const MEMBERS_PER_MESSAGE: usize = 1024;

/// nfgenmsg and the protocol attribute every ipset message starts with.
fn message() -> Writer {
    let mut w = Writer::with_capacity(64);
    // nfgenmsg: AF_INET (as the ipset tool sends), version 0, resource id 0.
    w.raw(&[2, 0, 0, 0]);
    w.attr(ATTR_PROTOCOL, &[PROTOCOL]);
    w
}

fn named(name: &str) -> Writer {
    let mut w = message();
    w.attr_str(ATTR_SETNAME, name);
    w
}

fn be32(w: &mut Writer, kind: u16, value: u32) {
    w.attr(kind | NLA_F_NET_BYTEORDER, &value.to_be_bytes());
}

fn be16(w: &mut Writer, kind: u16, value: u16) {
    w.attr(kind | NLA_F_NET_BYTEORDER, &value.to_be_bytes());
}

/// `create NAME TYPE ...`: revision 0 of each type, the one every kernel has.
pub fn create_message(set: &IpSet) -> Vec<u8> {
    let mut w = named(set.name());
    w.attr_str(ATTR_TYPENAME, set.type_name());
    w.attr(ATTR_REVISION, &[0]);
    let family = match (set.members(), set.family()) {
        // A port set is family-agnostic, as `ipset` makes it.
        (SetMembers::Ports(_), _) => NFPROTO_UNSPEC,
        (SetMembers::Nets(_), Family::V4) => NFPROTO_IPV4,
        (SetMembers::Nets(_), Family::V6) => NFPROTO_IPV6,
    };
    w.attr(ATTR_FAMILY, &[family]);
    let data = w.begin_nest(ATTR_DATA);
    match set.port_range() {
        Some((from, to)) => {
            be16(&mut w, ATTR_PORT, from);
            be16(&mut w, ATTR_PORT_TO, to);
        }
        None => {
            be32(&mut w, ATTR_HASHSIZE, set.hash_size());
            be32(&mut w, ATTR_MAXELEM, set.max_elements());
        }
    }
    w.end_nest(data);
    w.into_bytes()
}

/// One member's attributes, inside its `IPSET_ATTR_DATA`.
fn write_member(w: &mut Writer, member: Member) {
    match member {
        Member::Net(net) => {
            let ip = w.begin_nest(ATTR_IP);
            match net {
                ipnet::IpNet::V4(v4) => w.attr(
                    ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER,
                    &v4.network().octets(),
                ),
                ipnet::IpNet::V6(v6) => w.attr(
                    ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER,
                    &v6.network().octets(),
                ),
            }
            w.end_nest(ip);
            w.attr(ATTR_CIDR, &[net.prefix_len()]);
        }
        Member::Ports(first, last) => {
            be16(w, ATTR_PORT, first);
            // A range is one member, `ipset add NAME 8000-8100`'s attributes.
            if last != first {
                be16(w, ATTR_PORT_TO, last);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Member {
    Net(ipnet::IpNet),
    /// A port, or a range of ports (first, last).
    Ports(u16, u16),
}

/// `add NAME MEMBER` for every member, as few messages as the attribute size allows.
pub fn add_messages(set: &IpSet) -> Vec<Vec<u8>> {
    let members: Vec<Member> = match set.members() {
        SetMembers::Nets(nets) => nets.iter().map(|n| Member::Net(*n)).collect(),
        SetMembers::Ports(ports) => ports
            .iter()
            .map(|p| Member::Ports(p.first().get(), p.last().get()))
            .collect(),
    };
    members
        .chunks(MEMBERS_PER_MESSAGE)
        .map(|chunk| {
            let mut w = named(set.name());
            // The kernel wants a line number with a list of members (`ipset restore`'s,
            // for its error messages).
            w.attr(ATTR_LINENO, &0u32.to_ne_bytes());
            let adt = w.begin_nest(ATTR_ADT);
            for member in chunk {
                let data = w.begin_nest(ATTR_DATA);
                write_member(&mut w, *member);
                w.end_nest(data);
            }
            w.end_nest(adt);
            w.into_bytes()
        })
        .collect()
}

/// A set of meshinit's found in the kernel, with how many rules use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedSet {
    pub name: String,
    pub references: u32,
}

/// A LIST reply's set name and reference count; `None` for a reply that is not a header.
pub fn parse_listed(payload: &[u8]) -> Option<ListedSet> {
    let attributes = payload.get(4..)?;
    let mut name = None;
    let mut references = None;
    for (kind, value) in attrs(attributes) {
        match kind {
            ATTR_SETNAME => {
                let text = value.split(|b| *b == 0).next()?;
                name = Some(String::from_utf8_lossy(text).into_owned());
            }
            ATTR_DATA => {
                for (inner, v) in attrs(value) {
                    if inner == ATTR_REFERENCES && v.len() == 4 {
                        references = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
                    }
                }
            }
            _ => {}
        }
    }
    Some(ListedSet {
        name: name?,
        references: references?,
    })
}

/// A LIST reply's set name and the members it carries (a set's members may come in several
/// replies); `None` for a reply without a set name.
pub fn parse_members(payload: &[u8]) -> Option<(String, Vec<SetMember>)> {
    let attributes = payload.get(4..)?;
    let mut name = None;
    let mut members = Vec::new();
    for (kind, value) in attrs(attributes) {
        match kind {
            ATTR_SETNAME => {
                let text = value.split(|b| *b == 0).next()?;
                name = Some(String::from_utf8_lossy(text).into_owned());
            }
            ATTR_ADT => members.extend(
                attrs(value)
                    .filter(|(inner, _)| *inner == ATTR_DATA)
                    .filter_map(|(_, data)| parse_member(data)),
            ),
            _ => {}
        }
    }
    Some((name?, members))
}

/// One member's `IPSET_ATTR_DATA`: an address with its prefix length, or a port.
fn parse_member(data: &[u8]) -> Option<SetMember> {
    let mut address = None;
    let mut cidr = None;
    for (kind, value) in attrs(data) {
        match kind {
            ATTR_IP => {
                address = attrs(value).find_map(|(family, bytes)| match family {
                    ATTR_IPADDR_IPV4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
                    ATTR_IPADDR_IPV6 => {
                        <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from)
                    }
                    _ => None,
                })
            }
            ATTR_CIDR => cidr = value.first().copied(),
            ATTR_PORT => {
                return <[u8; 2]>::try_from(value)
                    .ok()
                    .map(|b| SetMember::Port(u16::from_be_bytes(b)))
            }
            _ => {}
        }
    }
    let address = address?;
    let full = if address.is_ipv4() { 32 } else { 128 };
    ipnet::IpNet::new(address, cidr.unwrap_or(full))
        .ok()
        .map(SetMember::Net)
}

/// ipsets over a netfilter netlink socket, opened on first use.
#[derive(Default)]
pub struct NetlinkIpSets {
    socket: Option<Socket>,
}

impl NetlinkIpSets {
    fn socket(&mut self, set: &str) -> Result<&mut Socket, IpSetError> {
        let error = |errno: nix::errno::Errno| IpSetError {
            action: "opening a netlink socket for",
            set: set.to_string(),
            code: errno as i32,
        };
        if self.socket.is_none() {
            self.socket = Some(Socket::netfilter().map_err(|e| error(e.errno))?);
        }
        self.socket
            .as_mut()
            .ok_or_else(|| error(nix::errno::Errno::EBADF))
    }

    fn request(
        &mut self,
        action: &'static str,
        set: &str,
        command: u8,
        flags: u16,
        payload: &[u8],
    ) -> Result<(), IpSetError> {
        self.socket(set)?
            .ipset_request(command, flags, payload)
            .map_err(|code| IpSetError {
                action,
                set: set.to_string(),
                code,
            })
    }

    /// meshinit's sets in this namespace, with their reference counts.
    pub fn list_ours(&mut self) -> Result<Vec<ListedSet>, IpSetError> {
        let mut w = message();
        be32(&mut w, ATTR_FLAGS, FLAG_LIST_HEADER);
        let replies = self
            .socket("(all)")?
            .ipset_dump(CMD_LIST, &w.into_bytes())
            .map_err(|code| IpSetError {
                action: "listing",
                set: "(all)".into(),
                code,
            })?;
        Ok(replies
            .iter()
            .filter_map(|p| parse_listed(p))
            .filter(|s| s.name.starts_with(SET_PREFIX))
            .collect())
    }

    fn fill(&mut self, set: &IpSet) -> Result<(), IpSetError> {
        for payload in add_messages(set) {
            // Without NLM_F_EXCL a member already there is no error.
            self.request("adding to", set.name(), CMD_ADD, 0, &payload)?;
        }
        Ok(())
    }

    fn destroy(&mut self, name: &str) -> Result<(), IpSetError> {
        self.request(
            "destroying",
            name,
            CMD_DESTROY,
            0,
            &named(name).into_bytes(),
        )
    }
}

impl IpSets for NetlinkIpSets {
    fn contents(&mut self) -> Result<Vec<SetContents>, IpSetError> {
        let replies = self
            .socket("(all)")?
            .ipset_dump(CMD_LIST, &message().into_bytes())
            .map_err(|code| IpSetError {
                action: "listing",
                set: "(all)".into(),
                code,
            })?;
        let mut sets: Vec<SetContents> = Vec::new();
        for (name, members) in replies.iter().filter_map(|p| parse_members(p)) {
            if !name.starts_with(SET_PREFIX) {
                continue;
            }
            match sets.iter_mut().find(|s| s.name == name) {
                Some(set) => set.members.extend(members),
                None => sets.push(SetContents {
                    name,
                    members: members.into_iter().collect(),
                }),
            }
        }
        Ok(sets)
    }

    fn available(&mut self) -> bool {
        let probe = message().into_bytes();
        match self.request("probing", "(none)", CMD_PROTOCOL, 0, &probe) {
            Ok(()) => true,
            Err(err) => {
                tracing::debug!(%err, "no ipset support");
                false
            }
        }
    }

    fn ensure(&mut self, sets: &[Arc<IpSet>]) -> Result<usize, IpSetError> {
        let present = self.list_ours()?;
        let mut created = 0;
        for set in sets {
            match present.iter().find(|p| p.name == set.name()) {
                // In use: rules only ever name a set once it is complete, and its name
                // says what it holds.
                Some(listed) if listed.references > 0 => continue,
                // Left by a run that stopped before its rules went in: maybe half filled.
                Some(_) => {
                    self.request(
                        "flushing",
                        set.name(),
                        CMD_FLUSH,
                        0,
                        &named(set.name()).into_bytes(),
                    )?;
                }
                None => {
                    self.request(
                        "creating",
                        set.name(),
                        CMD_CREATE,
                        NLM_F_EXCL,
                        &create_message(set),
                    )?;
                    created += 1;
                }
            }
            self.fill(set)?;
        }
        Ok(created)
    }

    fn remove_unused(&mut self) -> Result<usize, IpSetError> {
        let mut removed = 0;
        for listed in self.list_ours()? {
            if listed.references > 0 {
                continue;
            }
            match self.destroy(&listed.name) {
                Ok(()) => removed += 1,
                // A rule deleted a moment ago may release its set a little later.
                Err(err) if err.code == IPSET_ERR_BUSY => {
                    tracing::debug!(set = %listed.name, "still in use; left");
                }
                Err(err) => return Err(err),
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::iptables::ipset::SetList;
    use crate::rules::iptables::model::Port;

    /// (kind without flags, flags, payload) of each top-level attribute after nfgenmsg.
    fn top(message: &[u8]) -> Vec<(u16, Vec<u8>)> {
        attrs(&message[4..]).map(|(k, v)| (k, v.to_vec())).collect()
    }

    fn raw_kinds(data: &[u8]) -> Vec<u16> {
        let mut kinds = Vec::new();
        let mut rest = data;
        while rest.len() >= 4 {
            let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
            kinds.push(u16::from_ne_bytes([rest[2], rest[3]]));
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
        kinds
    }

    #[test]
    fn create_names_type_family_and_big_endian_sizes() {
        let set = IpSet::nets(
            SetList::ExcludedNets,
            Family::V6,
            &[
                "2001:db8::/32".parse().unwrap(),
                "2001:db8:1::/48".parse().unwrap(),
            ],
        );
        let message = create_message(&set);
        let attributes = top(&message);
        assert_eq!(attributes[0], (ATTR_PROTOCOL, vec![PROTOCOL]));
        let name = [set.name().as_bytes(), &[0]].concat();
        assert_eq!(attributes[1], (ATTR_SETNAME, name));
        assert_eq!(attributes[2], (ATTR_TYPENAME, b"hash:net\0".to_vec()));
        assert_eq!(attributes[3], (ATTR_REVISION, vec![0]));
        assert_eq!(attributes[4], (ATTR_FAMILY, vec![NFPROTO_IPV6]));
        let data = &attributes[5];
        assert_eq!(data.0, ATTR_DATA);
        assert_eq!(
            raw_kinds(&data.1),
            [
                ATTR_HASHSIZE | NLA_F_NET_BYTEORDER,
                ATTR_MAXELEM | NLA_F_NET_BYTEORDER
            ]
        );
        let sizes: Vec<Vec<u8>> = attrs(&data.1).map(|(_, v)| v.to_vec()).collect();
        assert_eq!(sizes, [64u32.to_be_bytes(), 65536u32.to_be_bytes()]);
    }

    #[test]
    fn port_sets_are_family_agnostic_bitmaps_of_their_range() {
        let ports: Vec<crate::values::PortRange> = [9000, 8200]
            .iter()
            .map(|p| Port::new(*p).unwrap().into())
            .collect();
        let set = IpSet::ports(SetList::ExcludedOutboundPorts, Family::V6, &ports);
        let attributes = top(&create_message(&set));
        assert_eq!(attributes[2], (ATTR_TYPENAME, b"bitmap:port\0".to_vec()));
        assert_eq!(attributes[4], (ATTR_FAMILY, vec![NFPROTO_UNSPEC]));
        let range: Vec<Vec<u8>> = attrs(&attributes[5].1).map(|(_, v)| v.to_vec()).collect();
        assert_eq!(range, [8200u16.to_be_bytes(), 9000u16.to_be_bytes()]);
        let adds = add_messages(&set);
        assert_eq!(adds.len(), 1);
        let adt = top(&adds[0]).pop().unwrap();
        assert_eq!(adt.0, ATTR_ADT);
        let members: Vec<Vec<u8>> = attrs(&adt.1)
            .map(|(kind, data)| {
                assert_eq!(kind, ATTR_DATA);
                attrs(data).next().unwrap().1.to_vec()
            })
            .collect();
        assert_eq!(members, [8200u16.to_be_bytes(), 9000u16.to_be_bytes()]);
    }

    #[test]
    fn a_port_range_is_one_member_with_port_to() {
        let range = crate::rules::iptables::plan::tests::range;
        let set = IpSet::ports(
            SetList::ExcludedOutboundPorts,
            Family::V4,
            &[range(8000, 8100), range(80, 80)],
        );
        let adds = add_messages(&set);
        let adt = top(&adds[0]).pop().unwrap();
        let members: Vec<Vec<(u16, Vec<u8>)>> = attrs(&adt.1)
            .map(|(_, data)| attrs(data).map(|(k, v)| (k, v.to_vec())).collect())
            .collect();
        assert_eq!(
            members,
            [
                vec![(ATTR_PORT, 80u16.to_be_bytes().to_vec())],
                vec![
                    (ATTR_PORT, 8000u16.to_be_bytes().to_vec()),
                    (ATTR_PORT_TO, 8100u16.to_be_bytes().to_vec())
                ],
            ]
        );
    }

    #[test]
    fn networks_are_split_over_messages_that_fit_an_attribute() {
        let nets: Vec<ipnet::IpNet> = (0..2500u32)
            .map(|i| {
                ipnet::IpNet::V6(
                    ipnet::Ipv6Net::new((0x2001_0db8_u128 << 96 | u128::from(i) << 64).into(), 64)
                        .unwrap(),
                )
            })
            .collect();
        let set = IpSet::nets(SetList::IncludedNets, Family::V6, &nets);
        let messages = add_messages(&set);
        assert_eq!(messages.len(), 3);
        let mut seen = 0;
        for message in &messages {
            let adt = top(message).pop().unwrap();
            assert!(adt.1.len() < usize::from(u16::MAX));
            for (_, data) in attrs(&adt.1) {
                let fields: Vec<(u16, Vec<u8>)> =
                    attrs(data).map(|(k, v)| (k, v.to_vec())).collect();
                assert_eq!(fields[1], (ATTR_CIDR, vec![64]));
                let address: Vec<u8> = attrs(&fields[0].1).next().unwrap().1.to_vec();
                assert_eq!(address.len(), 16);
                seen += 1;
            }
        }
        assert_eq!(seen, 2500);
    }

    #[test]
    fn listing_reads_names_and_references() {
        let mut w = named("meshinit-excl-nets4-0badc0de");
        w.attr_str(ATTR_TYPENAME, "hash:net");
        let data = w.begin_nest(ATTR_DATA);
        be32(&mut w, ATTR_HASHSIZE, 64);
        be32(&mut w, ATTR_REFERENCES, 2);
        w.end_nest(data);
        assert_eq!(
            parse_listed(&w.into_bytes()),
            Some(ListedSet {
                name: "meshinit-excl-nets4-0badc0de".into(),
                references: 2
            })
        );
        assert_eq!(parse_listed(&named("x").into_bytes()), None, "no header");
    }

    #[test]
    fn errors_say_what_the_kernel_meant() {
        let busy = IpSetError {
            action: "destroying",
            set: "meshinit-x".into(),
            code: IPSET_ERR_BUSY,
        };
        assert_eq!(
            busy.to_string(),
            "destroying ipset meshinit-x: set in use by a rule"
        );
        let errno = IpSetError {
            action: "creating",
            set: "meshinit-x".into(),
            code: nix::errno::Errno::EPERM as i32,
        };
        assert!(errno.to_string().contains("EPERM"), "{errno}");
    }

    #[test]
    fn listing_reads_members_of_both_kinds() {
        let mut w = named("meshinit-excl-nets4-00000000");
        let adt = w.begin_nest(ATTR_ADT);
        for net in ["192.0.2.0/24", "2001:db8::/32"] {
            let data = w.begin_nest(ATTR_DATA);
            write_member(&mut w, Member::Net(net.parse().unwrap()));
            w.end_nest(data);
        }
        let data = w.begin_nest(ATTR_DATA);
        write_member(&mut w, Member::Ports(8200, 8200));
        w.end_nest(data);
        w.end_nest(adt);
        let (name, members) = parse_members(&w.into_bytes()).unwrap();
        assert_eq!(name, "meshinit-excl-nets4-00000000");
        assert_eq!(
            members,
            [
                SetMember::Net("192.0.2.0/24".parse().unwrap()),
                SetMember::Net("2001:db8::/32".parse().unwrap()),
                SetMember::Port(8200),
            ]
        );
        assert_eq!(parse_members(&message().into_bytes()), None);
    }
}
