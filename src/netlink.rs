//! Just enough netlink: TPROXY policy routing and the `::6` address (rtnetlink), a listing
//! of nf_tables chains, and sending one nf_tables batch (nfnetlink), without launching `ip`
//! or `nft`.
//!
//! Every launched process costs an init container time and memory; these few messages are
//! simple enough to build by hand. Message building and parsing are pure functions, tested
//! without a kernel; only `Socket` does I/O. The nf_tables batch itself is built by
//! `rules::nft::encode` with the [`Writer`] below.

use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
/// ipset wants its integers flagged as big-endian.
pub(crate) const NLA_F_NET_BYTEORDER: u16 = 0x4000;
const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const HEADER_LEN: usize = 16;

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_PROTOCOL: u16 = 21;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;

pub(crate) const NFNL_SUBSYS_IPSET: u16 = 6;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;

/// The routing protocol number meshinit tags its ip rules and routes with, so cleanup can
/// find exactly its own, whatever mark and table an earlier configuration used.
pub const ROUTE_PROTOCOL: u8 = 224;

/// Address family numbers as netlink uses them (AF_INET, AF_INET6; also NFPROTO_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NlFamily {
    Inet = 2,
    Inet6 = 10,
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

/// Builds netlink messages into one buffer: headers, attributes, nested attributes. Used
/// for an nf_tables batch, many messages sent as one datagram.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn with_capacity(bytes: usize) -> Writer {
        Writer {
            buf: Vec::with_capacity(bytes),
        }
    }

    /// Starts a message (a request, with `flags` added); `finish` closes it.
    pub fn begin(&mut self, kind: u16, flags: u16, seq: u32) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf
            .extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        start
    }

    /// Sets the length of the message begun at `start`.
    pub fn finish(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// Raw bytes (a family header such as `nfgenmsg`).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn attr(&mut self, kind: u16, payload: &[u8]) {
        push_attr(&mut self.buf, kind, payload);
    }

    /// A string attribute, NUL-terminated as the kernel expects.
    pub fn attr_str(&mut self, kind: u16, value: &str) {
        let len = 4 + value.len() + 1;
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// A 32-bit attribute in network byte order (nf_tables' integers).
    pub fn attr_be32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    /// Starts a nested attribute; `end_nest` closes it.
    pub fn begin_nest(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub fn end_nest(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Iterates the (type, payload) attributes in `data`, stopping at the first malformed one.
pub(crate) fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        data = &data[align4(len).min(data.len())..];
        Some((kind, payload))
    })
}

/// `fib_rule_hdr` + attributes for "fwmark MARK lookup TABLE", tagged with our protocol.
pub fn rule_payload(family: NlFamily, mark: u32, table: u32) -> Vec<u8> {
    let short_table = u8::try_from(table).unwrap_or(0);
    let mut buf = vec![family as u8, 0, 0, 0, short_table, 0, 0, FR_ACT_TO_TBL];
    buf.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(&mut buf, FRA_FWMARK, &mark.to_ne_bytes());
    push_attr(&mut buf, FRA_TABLE, &table.to_ne_bytes());
    push_attr(&mut buf, FRA_PROTOCOL, &[ROUTE_PROTOCOL]);
    buf
}

/// `rtmsg` + attributes for "local default dev IFINDEX table TABLE", tagged likewise.
pub fn local_route_payload(family: NlFamily, ifindex: u32, table: u32) -> Vec<u8> {
    let short_table = u8::try_from(table).unwrap_or(0);
    let mut buf = vec![
        family as u8,
        0,
        0,
        0,
        short_table,
        ROUTE_PROTOCOL,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ];
    buf.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(&mut buf, RTA_TABLE, &table.to_ne_bytes());
    push_attr(&mut buf, RTA_OIF, &ifindex.to_ne_bytes());
    buf
}

/// `ifaddrmsg` + attributes for an IPv6 host address on interface `ifindex`.
pub fn ipv6_address_payload(address: Ipv6Addr, ifindex: u32) -> Vec<u8> {
    let mut buf = vec![NlFamily::Inet6 as u8, 128, 0, 0];
    buf.extend_from_slice(&ifindex.to_ne_bytes());
    push_attr(&mut buf, IFA_LOCAL, &address.octets());
    push_attr(&mut buf, IFA_ADDRESS, &address.octets());
    buf
}

/// Whether a dumped rule (`fib_rule_hdr` + attributes) carries meshinit's protocol tag.
pub fn rule_is_ours(payload: &[u8]) -> bool {
    payload.len() >= 12
        && attrs(&payload[12..])
            .any(|(kind, value)| kind == FRA_PROTOCOL && value == [ROUTE_PROTOCOL])
}

/// Whether a dumped rule is meshinit's "fwmark MARK lookup TABLE".
pub fn rule_matches(payload: &[u8], mark: u32, table: u32) -> bool {
    if !rule_is_ours(payload) {
        return false;
    }
    let u32_attr = |wanted: u16| {
        attrs(&payload[12..]).find_map(|(kind, value)| {
            (kind == wanted && value.len() == 4)
                .then(|| u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
        })
    };
    u32_attr(FRA_FWMARK) == Some(mark)
        && u32_attr(FRA_TABLE).unwrap_or(u32::from(payload[4])) == table
}

/// (fwmark, table) of a dumped rule, to name it in a report.
pub fn rule_mark_table(payload: &[u8]) -> (Option<u32>, u32) {
    let u32_attr = |wanted: u16| {
        attrs(payload.get(12..).unwrap_or_default()).find_map(|(kind, value)| {
            (kind == wanted && value.len() == 4)
                .then(|| u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
        })
    };
    let header_table = payload.get(4).copied().map_or(0, u32::from);
    (
        u32_attr(FRA_FWMARK),
        u32_attr(FRA_TABLE).unwrap_or(header_table),
    )
}

/// (table, whether it is a `local` route) of a dumped route, to name it in a report.
pub fn route_table(payload: &[u8]) -> (u32, bool) {
    let attr_table = attrs(payload.get(12..).unwrap_or_default()).find_map(|(kind, value)| {
        (kind == RTA_TABLE && value.len() == 4)
            .then(|| u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
    });
    let header_table = payload.get(4).copied().map_or(0, u32::from);
    (
        attr_table.unwrap_or(header_table),
        payload.get(7) == Some(&RTN_LOCAL),
    )
}

/// Whether a dumped address (`ifaddrmsg` + attributes) is `address` on `ifindex`.
pub fn address_matches(payload: &[u8], address: Ipv6Addr, ifindex: u32) -> bool {
    let Some(index) = payload.get(4..8) else {
        return false;
    };
    u32::from_ne_bytes([index[0], index[1], index[2], index[3]]) == ifindex
        && attrs(payload.get(8..).unwrap_or_default())
            .any(|(kind, value)| kind == IFA_ADDRESS && value == address.octets())
}

/// Whether a dumped route is meshinit's local default route in `table`.
pub fn route_matches(payload: &[u8], table: u32) -> bool {
    if !route_is_ours(payload) {
        return false;
    }
    let attr_table = attrs(&payload[12..]).find_map(|(kind, value)| {
        (kind == RTA_TABLE && value.len() == 4)
            .then(|| u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
    });
    attr_table.unwrap_or(u32::from(payload[4])) == table && payload[7] == RTN_LOCAL
}

/// Whether a dumped route (`rtmsg` + attributes) carries meshinit's protocol tag.
pub fn route_is_ours(payload: &[u8]) -> bool {
    payload.len() >= 12 && payload[5] == ROUTE_PROTOCOL
}

/// (nf family, table, chain) of one dumped nf_tables chain.
pub fn parse_chain(payload: &[u8]) -> Option<(u8, String, String)> {
    let family = *payload.first()?;
    let mut table = None;
    let mut name = None;
    for (kind, value) in attrs(payload.get(4..)?) {
        let text = || {
            String::from_utf8_lossy(value)
                .trim_end_matches('\0')
                .to_owned()
        };
        match kind {
            NFTA_CHAIN_TABLE => table = Some(text()),
            NFTA_CHAIN_NAME => name = Some(text()),
            _ => {}
        }
    }
    Some((family, table?, name?))
}

/// The generation in a `NFT_MSG_NEWGEN` reply (`nfgenmsg` + attributes).
pub fn parse_generation(payload: &[u8]) -> Option<u32> {
    attrs(payload.get(4..)?).find_map(|(kind, value)| {
        (kind == NFTA_GEN_ID && value.len() == 4)
            .then(|| u32::from_be_bytes([value[0], value[1], value[2], value[3]]))
    })
}

/// A netlink socket of one protocol.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

/// Why an nf_tables batch was not committed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Io(#[from] NetlinkError),
    /// The kernel refused the batch, changing nothing: the errno of each refused message,
    /// by sequence number (the batch's own when the whole batch was refused).
    #[error("the kernel refused the batch ({})", refusals(.0))]
    Refused(Vec<(u32, Errno)>),
    /// Neither an error nor the acknowledgement came back: whether the batch was committed
    /// is unknown.
    #[error("the kernel did not acknowledge the batch")]
    NoAck,
}

fn refusals(errors: &[(u32, Errno)]) -> String {
    errors
        .iter()
        .map(|(seq, errno)| format!("message {seq}: {errno}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The (sequence number, error code) of each netlink error or acknowledgement in `data`,
/// which may end in a truncated message.
pub fn acknowledgements(mut data: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while data.len() >= HEADER_LEN {
        let msg_len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
        if msg_len < HEADER_LEN {
            break;
        }
        if kind == NLMSG_ERROR {
            if let Some(code) = data.get(HEADER_LEN..HEADER_LEN + 4) {
                out.push((
                    seq,
                    i32::from_ne_bytes([code[0], code[1], code[2], code[3]]),
                ));
            }
        }
        data = &data[align4(msg_len).min(data.len())..];
    }
    out
}

/// A netlink request that failed, with the kernel's errno.
#[derive(Debug, thiserror::Error)]
#[error("netlink {what}: {errno}")]
pub struct NetlinkError {
    pub what: &'static str,
    pub errno: Errno,
}

impl Socket {
    pub fn route() -> Result<Socket, NetlinkError> {
        Socket::open(SockProtocol::NetlinkRoute)
    }

    pub fn netfilter() -> Result<Socket, NetlinkError> {
        Socket::open(SockProtocol::NetlinkNetFilter)
    }

    fn open(protocol: SockProtocol) -> Result<Socket, NetlinkError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )
        .map_err(|errno| NetlinkError {
            what: "socket",
            errno,
        })?;
        Ok(Socket { fd, seq: 1 })
    }

    fn push_message(&mut self, buf: &mut Vec<u8>, kind: u16, flags: u16, payload: &[u8]) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        buf.extend_from_slice(&((HEADER_LEN + payload.len()) as u32).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&self.seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(payload);
        buf.resize(align4(buf.len()), 0);
        self.seq
    }

    fn send(&mut self, kind: u16, flags: u16, payload: &[u8]) -> Result<u32, Errno> {
        let mut msg = Vec::with_capacity(HEADER_LEN + payload.len());
        let seq = self.push_message(&mut msg, kind, flags, payload);
        sendto(
            self.fd.as_raw_fd(),
            &msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        Ok(seq)
    }

    /// Reads replies to `seq`, handing each data message's (type, payload) to `each`, until
    /// the final ACK or DONE. Returns the kernel's error, if any.
    fn receive(&mut self, seq: u32, each: impl FnMut(u16, &[u8])) -> Result<(), Errno> {
        self.receive_code(seq, each).map_err(Errno::from_raw)
    }

    /// `receive`, with the kernel's error code as it came: ipset's own codes lie above
    /// 4096, where `Errno` has no names.
    fn receive_code(&mut self, seq: u32, mut each: impl FnMut(u16, &[u8])) -> Result<(), i32> {
        let mut buf = vec![0u8; 65536];
        loop {
            let len =
                recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|e| e as i32)?;
            let mut data = &buf[..len];
            while data.len() >= HEADER_LEN {
                let msg_len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                let msg_seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
                if msg_len < HEADER_LEN || msg_len > data.len() {
                    return Err(Errno::EBADMSG as i32);
                }
                let payload = &data[HEADER_LEN..msg_len];
                data = &data[align4(msg_len).min(data.len())..];
                if msg_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc_eproto());
                        return if code == 0 { Ok(()) } else { Err(-code) };
                    }
                    _ => each(kind, payload),
                }
            }
        }
    }

    /// One ipset command (`payload`: nfgenmsg and attributes), acknowledged; the error is
    /// the kernel's code (an errno, or one of ipset's above 4096).
    pub fn ipset_request(&mut self, command: u8, flags: u16, payload: &[u8]) -> Result<(), i32> {
        let kind = (NFNL_SUBSYS_IPSET << 8) | u16::from(command);
        let seq = self
            .send(kind, flags | NLM_F_ACK, payload)
            .map_err(|e| e as i32)?;
        self.receive_code(seq, |_, _| {})
    }

    /// One ipset dump: every reply's payload.
    pub fn ipset_dump(&mut self, command: u8, payload: &[u8]) -> Result<Vec<Vec<u8>>, i32> {
        let kind = (NFNL_SUBSYS_IPSET << 8) | u16::from(command);
        let seq = self.send(kind, NLM_F_DUMP, payload).map_err(|e| e as i32)?;
        let mut out = Vec::new();
        self.receive_code(seq, |_, p| out.push(p.to_vec()))?;
        Ok(out)
    }

    fn request(&mut self, kind: u16, flags: u16, payload: &[u8]) -> Result<(), Errno> {
        let seq = self.send(kind, flags | NLM_F_ACK, payload)?;
        self.receive(seq, |_, _| {})
    }

    fn dump(&mut self, kind: u16, payload: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, Errno> {
        let seq = self.send(kind, NLM_F_DUMP, payload)?;
        let mut out = Vec::new();
        self.receive(seq, |k, p| out.push((k, p.to_vec())))?;
        Ok(out)
    }

    /// Adds something that may already exist; `Ok(false)` when it did.
    fn ensure(
        &mut self,
        kind: u16,
        payload: &[u8],
        what: &'static str,
    ) -> Result<bool, NetlinkError> {
        match self.request(kind, NLM_F_CREATE | NLM_F_EXCL, payload) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Ok(false),
            Err(errno) => Err(NetlinkError { what, errno }),
        }
    }

    /// Removes something that may already be gone.
    fn remove(
        &mut self,
        kind: u16,
        payload: &[u8],
        what: &'static str,
    ) -> Result<(), NetlinkError> {
        match self.request(kind, 0, payload) {
            Ok(()) | Err(Errno::ENOENT) | Err(Errno::ESRCH) | Err(Errno::EADDRNOTAVAIL) => Ok(()),
            Err(errno) => Err(NetlinkError { what, errno }),
        }
    }

    /// Rules are looked up first: without an explicit priority the kernel gives each new
    /// rule its own, so NLM_F_EXCL never sees a duplicate.
    pub fn ensure_rule(
        &mut self,
        family: NlFamily,
        mark: u32,
        table: u32,
    ) -> Result<bool, NetlinkError> {
        let header = [family as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let existing = self
            .dump(RTM_GETRULE, &header)
            .map_err(|errno| NetlinkError {
                what: "listing ip rules",
                errno,
            })?;
        if existing.iter().any(|(_, p)| rule_matches(p, mark, table)) {
            return Ok(false);
        }
        self.ensure(
            RTM_NEWRULE,
            &rule_payload(family, mark, table),
            "adding ip rule",
        )
    }

    pub fn ensure_local_route(
        &mut self,
        family: NlFamily,
        ifindex: u32,
        table: u32,
    ) -> Result<bool, NetlinkError> {
        self.ensure(
            RTM_NEWROUTE,
            &local_route_payload(family, ifindex, table),
            "adding local route",
        )
    }

    pub fn ensure_ipv6_address(
        &mut self,
        address: Ipv6Addr,
        ifindex: u32,
    ) -> Result<bool, NetlinkError> {
        self.ensure(
            RTM_NEWADDR,
            &ipv6_address_payload(address, ifindex),
            "adding IPv6 address",
        )
    }

    pub fn remove_rule(
        &mut self,
        family: NlFamily,
        mark: u32,
        table: u32,
    ) -> Result<(), NetlinkError> {
        self.remove(
            RTM_DELRULE,
            &rule_payload(family, mark, table),
            "deleting ip rule",
        )
    }

    pub fn remove_local_route(
        &mut self,
        family: NlFamily,
        ifindex: u32,
        table: u32,
    ) -> Result<(), NetlinkError> {
        self.remove(
            RTM_DELROUTE,
            &local_route_payload(family, ifindex, table),
            "deleting local route",
        )
    }

    pub fn remove_ipv6_address(
        &mut self,
        address: Ipv6Addr,
        ifindex: u32,
    ) -> Result<(), NetlinkError> {
        self.remove(
            RTM_DELADDR,
            &ipv6_address_payload(address, ifindex),
            "deleting IPv6 address",
        )
    }

    /// The rules and routes tagged with `ROUTE_PROTOCOL`, in both families, as (family,
    /// whether it is a rule, payload).
    pub fn tagged_routing(&mut self) -> Result<Vec<(NlFamily, bool, Vec<u8>)>, NetlinkError> {
        let mut found = Vec::new();
        for family in [NlFamily::Inet, NlFamily::Inet6] {
            let header = [family as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            for (is_rule, dump, what) in [
                (true, RTM_GETRULE, "listing ip rules"),
                (false, RTM_GETROUTE, "listing routes"),
            ] {
                let listed = self
                    .dump(dump, &header)
                    .map_err(|errno| NetlinkError { what, errno })?;
                found.extend(
                    listed
                        .into_iter()
                        .filter(|(_, p)| {
                            if is_rule {
                                rule_is_ours(p)
                            } else {
                                route_is_ours(p)
                            }
                        })
                        .map(|(_, p)| (family, is_rule, p)),
                );
            }
        }
        Ok(found)
    }

    /// Whether the IPv6 `address` is on interface `ifindex`.
    pub fn has_ipv6_address(
        &mut self,
        address: Ipv6Addr,
        ifindex: u32,
    ) -> Result<bool, NetlinkError> {
        let header = [NlFamily::Inet6 as u8, 0, 0, 0, 0, 0, 0, 0];
        let listed = self
            .dump(RTM_GETADDR, &header)
            .map_err(|errno| NetlinkError {
                what: "listing addresses",
                errno,
            })?;
        Ok(listed
            .iter()
            .any(|(_, p)| address_matches(p, address, ifindex)))
    }

    /// Deletes the rules and routes tagged with `ROUTE_PROTOCOL`, in both families, except
    /// those `keep` accepts (given the family, whether it is a rule, and the payload).
    /// Returns how many were removed.
    pub fn remove_tagged(
        &mut self,
        keep: &dyn Fn(NlFamily, bool, &[u8]) -> bool,
    ) -> Result<usize, NetlinkError> {
        let mut removed = 0;
        for family in [NlFamily::Inet, NlFamily::Inet6] {
            let header = [family as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            for (is_rule, dump, delete, what) in [
                (true, RTM_GETRULE, RTM_DELRULE, "ip rules"),
                (false, RTM_GETROUTE, RTM_DELROUTE, "routes"),
            ] {
                let listed = self.dump(dump, &header).map_err(|errno| NetlinkError {
                    what: if is_rule {
                        "listing ip rules"
                    } else {
                        "listing routes"
                    },
                    errno,
                })?;
                let ours = |p: &[u8]| {
                    if is_rule {
                        rule_is_ours(p)
                    } else {
                        route_is_ours(p)
                    }
                };
                for (_, payload) in listed
                    .iter()
                    .filter(|(_, p)| ours(p) && !keep(family, is_rule, p))
                {
                    tracing::debug!(what, "removing meshinit's earlier routing");
                    self.remove(delete, payload, "deleting tagged routing")?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Deletes the nf_tables table `name` of `family` (with whatever is left in it) in one
    /// nfnetlink batch. A table that is already gone is not an error.
    pub fn delete_nftables_table(
        &mut self,
        family: NlFamily,
        name: &str,
    ) -> Result<(), NetlinkError> {
        let subsystem = NFNL_SUBSYS_NFTABLES.to_be_bytes();
        let batch_header = [0, 0, subsystem[0], subsystem[1]];
        let mut payload = vec![family as u8, 0, 0, 0];
        let mut table_name = name.as_bytes().to_vec();
        table_name.push(0);
        push_attr(&mut payload, NFTA_TABLE_NAME, &table_name);
        let mut buf = Vec::new();
        self.push_message(&mut buf, NFNL_MSG_BATCH_BEGIN, 0, &batch_header);
        let seq = self.push_message(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE,
            NLM_F_ACK,
            &payload,
        );
        self.push_message(&mut buf, NFNL_MSG_BATCH_END, 0, &batch_header);
        let error = |errno| NetlinkError {
            what: "deleting an nf_tables table",
            errno,
        };
        sendto(
            self.fd.as_raw_fd(),
            &buf,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(error)?;
        match self.receive(seq, |_, _| {}) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(errno) => Err(error(errno)),
        }
    }

    /// Sends an nf_tables batch (`BATCH_BEGIN` … `BATCH_END`, built with [`Writer`]) as one
    /// datagram, which the kernel commits all or nothing. Only the message numbered
    /// `ack_seq` (the last) asks for an acknowledgement; any refused message gets an error
    /// of its own, and a batch refused whole gets one for `begin_seq`. The kernel handles
    /// the batch while sending it, so the answers are waiting when `sendto` returns; the
    /// receive timeout only guards against a kernel that never answers.
    pub fn nftables_batch(
        &mut self,
        batch: &[u8],
        begin_seq: u32,
        ack_seq: u32,
    ) -> Result<(), BatchError> {
        use nix::sys::socket::{setsockopt, sockopt};
        let error = |what, errno| BatchError::Io(NetlinkError { what, errno });
        // A large ruleset does not fit the default send buffer (about 208 KiB) as one
        // datagram; SO_SNDBUFFORCE (CAP_NET_ADMIN, which applying needs anyway) lifts it.
        let needed = batch.len() + 4096;
        if needed > 128 * 1024 {
            setsockopt(&self.fd, sockopt::SndBufForce, &needed)
                .or_else(|_| setsockopt(&self.fd, sockopt::SndBuf, &needed))
                .map_err(|errno| error("sizing the send buffer", errno))?;
        }
        setsockopt(
            &self.fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(5, 0),
        )
        .map_err(|errno| error("setting a receive timeout", errno))?;
        sendto(
            self.fd.as_raw_fd(),
            batch,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(|errno| error("sending the nf_tables batch", errno))?;
        let mut buf = vec![0u8; 65536];
        let mut refused = Vec::new();
        loop {
            let len = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(len) => len.min(buf.len()),
                Err(Errno::EAGAIN) => return Err(BatchError::NoAck),
                Err(errno) => return Err(error("reading the batch's acknowledgement", errno)),
            };
            let mut done = false;
            for (seq, code) in acknowledgements(&buf[..len]) {
                if code != 0 {
                    refused.push((seq, Errno::from_raw(-code)));
                }
                done |= seq == ack_seq || (seq == begin_seq && code != 0);
            }
            if done {
                break;
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(BatchError::Refused(refused))
        }
    }

    /// nf_tables' current generation: the ruleset's version, which every committed batch
    /// advances.
    pub fn nftables_generation(&mut self) -> Result<u32, NetlinkError> {
        let error = |errno| NetlinkError {
            what: "reading the nf_tables generation",
            errno,
        };
        let seq = self
            .send(
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
                NLM_F_ACK,
                &[0, 0, 0, 0],
            )
            .map_err(error)?;
        let mut generation = None;
        self.receive(seq, |_, payload| {
            generation = generation.or_else(|| parse_generation(payload));
        })
        .map_err(error)?;
        generation.ok_or_else(|| error(Errno::EBADMSG))
    }

    /// Every nf_tables chain in this namespace as (nf family, table, chain).
    pub fn nftables_chains(&mut self) -> Result<Vec<(u8, String, String)>, NetlinkError> {
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN;
        // nfgenmsg: any family, version 0, resource id 0.
        let replies = self
            .dump(kind, &[0, 0, 0, 0])
            .map_err(|errno| NetlinkError {
                what: "listing nf_tables chains",
                errno,
            })?;
        Ok(replies
            .iter()
            .filter_map(|(_, payload)| parse_chain(payload))
            .collect())
    }
}

fn libc_eproto() -> i32 {
    Errno::EPROTO as i32
}

/// The index of interface `name` in the current network namespace.
pub fn interface_index(name: &str) -> Result<u32, NetlinkError> {
    nix::net::if_::if_nametoindex(name).map_err(|errno| NetlinkError {
        what: "finding the loopback interface",
        errno,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_payload_layout() {
        let p = rule_payload(NlFamily::Inet, 1337, 133);
        assert_eq!(&p[..8], &[2, 0, 0, 0, 133, 0, 0, FR_ACT_TO_TBL]);
        let found: Vec<(u16, Vec<u8>)> = attrs(&p[12..]).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(found[0], (FRA_FWMARK, 1337u32.to_ne_bytes().to_vec()));
        assert_eq!(found[1], (FRA_TABLE, 133u32.to_ne_bytes().to_vec()));
        assert_eq!(found[2], (FRA_PROTOCOL, vec![ROUTE_PROTOCOL]));
        assert!(rule_is_ours(&p));
        assert!(rule_matches(&p, 1337, 133));
        assert!(!rule_matches(&p, 1337, 134));
        assert!(!rule_matches(&p, 1, 133));
    }

    #[test]
    fn large_tables_use_the_attribute_only() {
        let p = rule_payload(NlFamily::Inet6, 1, 1000);
        assert_eq!(p[0], 10);
        assert_eq!(p[4], 0, "header table is RT_TABLE_UNSPEC beyond 255");
    }

    #[test]
    fn route_payload_is_local_host_scope_and_tagged() {
        let p = local_route_payload(NlFamily::Inet, 1, 133);
        assert_eq!(
            &p[..8],
            &[2, 0, 0, 0, 133, ROUTE_PROTOCOL, RT_SCOPE_HOST, RTN_LOCAL]
        );
        assert!(route_is_ours(&p));
        assert!(route_matches(&p, 133));
        assert!(!route_matches(&p, 134));
        let mut other = p.clone();
        other[5] = 4;
        assert!(!route_is_ours(&other));
    }

    #[test]
    fn address_payload() {
        let p = ipv6_address_payload(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6), 1);
        assert_eq!(&p[..4], &[10, 128, 0, 0]);
        assert_eq!(attrs(&p[8..]).count(), 2);
    }

    #[test]
    fn chain_parsing() {
        let mut p = vec![2, 0, 0, 0];
        push_attr(&mut p, NFTA_CHAIN_TABLE, b"nat\0");
        push_attr(&mut p, NFTA_CHAIN_NAME, b"ISTIO_OUTPUT\0");
        assert_eq!(
            parse_chain(&p),
            Some((2, "nat".into(), "ISTIO_OUTPUT".into()))
        );
        assert_eq!(parse_chain(&[2, 0]), None);
    }

    #[test]
    fn generation_parsing() {
        let mut p = vec![0, 0, 0, 0];
        push_attr(&mut p, NFTA_GEN_ID, &7u32.to_be_bytes());
        assert_eq!(parse_generation(&p), Some(7));
        assert_eq!(parse_generation(&[0, 0, 0, 0]), None);
    }

    #[test]
    fn malformed_attributes_stop_iteration() {
        assert_eq!(attrs(&[200, 0, 1, 0, 9]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0]).count(), 0);
    }
}
