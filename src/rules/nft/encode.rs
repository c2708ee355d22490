//! Encodes the nftables transaction (`txn`) as one nfnetlink batch: the messages `nft -f`
//! (nftables 1.0.6) sends for the same text, made without launching nft, so the kernel ends
//! up holding exactly what `nft -f` would leave. `tests/integration/nft_golden.rs` loads
//! both into fresh namespaces and compares what the kernel lists, for every case.
//!
//! Pure: bytes out, no I/O; `netlink::Socket::nftables_batch` sends them. What nft does and
//! this does too:
//! - a match on an address or port is preceded by the protocol match it depends on (`meta
//!   nfproto ipv4` before `ip daddr`, `meta l4proto tcp` before `tcp dport`), unless the
//!   rule already established it;
//! - an address prefix on a byte boundary loads only its bytes; any other is masked;
//! - several ports, or a `--match-sets` list of networks, become an anonymous set created
//!   in the same batch just before its rule (an interval set for networks, overlapping and
//!   adjacent networks merged), described by the same set metadata nft writes;
//! - `insert rule ... index N` goes in front of the rule then at N, which (the table being
//!   flushed or new in the same batch) is always one of this batch's, referenced by an ID.
//!
//! User and group names are resolved by the caller's lookup (nft asks the C library).

use std::collections::{HashMap, HashSet};

use ipnet::IpNet;

use super::model::{BaseChain, Chain, ChainType, Direction, Hook, Match, Position, Statement};
use super::txn::Op;
use crate::netlink::wire::{
    Writer, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NLM_F_ACK,
    NLM_F_APPEND, NLM_F_CREATE,
};
use crate::rules::decisions::CtState;
use crate::values::{Family, Interface, Owner, OwnerKind, PortRange, Protocol};

/// `linux/netfilter/nf_tables.h` and friends: only what meshinit's rules use.
mod sys {
    pub const NFPROTO_INET: u8 = 1;
    pub const NFPROTO_IPV4: u8 = 2;
    pub const NFPROTO_IPV6: u8 = 10;

    pub const NFT_MSG_NEWTABLE: u16 = 0;
    pub const NFT_MSG_DELTABLE: u16 = 2;
    pub const NFT_MSG_NEWCHAIN: u16 = 3;
    pub const NFT_MSG_NEWRULE: u16 = 6;
    pub const NFT_MSG_DELRULE: u16 = 8;
    pub const NFT_MSG_NEWSET: u16 = 9;
    pub const NFT_MSG_NEWSETELEM: u16 = 12;

    pub const NFTA_TABLE_NAME: u16 = 1;
    pub const NFTA_TABLE_FLAGS: u16 = 2;

    pub const NFTA_CHAIN_TABLE: u16 = 1;
    pub const NFTA_CHAIN_NAME: u16 = 3;
    pub const NFTA_CHAIN_HOOK: u16 = 4;
    pub const NFTA_CHAIN_TYPE: u16 = 7;
    pub const NFTA_HOOK_HOOKNUM: u16 = 1;
    pub const NFTA_HOOK_PRIORITY: u16 = 2;
    pub const NF_INET_PRE_ROUTING: u32 = 0;
    pub const NF_INET_LOCAL_OUT: u32 = 3;

    pub const NFTA_RULE_TABLE: u16 = 1;
    pub const NFTA_RULE_CHAIN: u16 = 2;
    pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
    pub const NFTA_RULE_ID: u16 = 9;
    pub const NFTA_RULE_POSITION_ID: u16 = 10;

    pub const NFTA_LIST_ELEM: u16 = 1;
    pub const NFTA_EXPR_NAME: u16 = 1;
    pub const NFTA_EXPR_DATA: u16 = 2;
    pub const NFTA_DATA_VALUE: u16 = 1;
    pub const NFTA_DATA_VERDICT: u16 = 2;
    pub const NFTA_VERDICT_CODE: u16 = 1;
    pub const NFTA_VERDICT_CHAIN: u16 = 2;

    pub const NFT_REG_VERDICT: u32 = 0;
    pub const NFT_REG_1: u32 = 1;

    pub const NF_DROP: i32 = 0;
    pub const NF_ACCEPT: i32 = 1;
    pub const NFT_JUMP: i32 = -3;
    pub const NFT_RETURN: i32 = -5;

    pub const NFTA_META_DREG: u16 = 1;
    pub const NFTA_META_KEY: u16 = 2;
    pub const NFTA_META_SREG: u16 = 3;
    pub const NFT_META_MARK: u32 = 3;
    pub const NFT_META_IIFNAME: u32 = 6;
    pub const NFT_META_OIFNAME: u32 = 7;
    pub const NFT_META_SKUID: u32 = 10;
    pub const NFT_META_SKGID: u32 = 11;
    pub const NFT_META_NFPROTO: u32 = 15;
    pub const NFT_META_L4PROTO: u32 = 16;

    pub const NFTA_CMP_SREG: u16 = 1;
    pub const NFTA_CMP_OP: u16 = 2;
    pub const NFTA_CMP_DATA: u16 = 3;
    pub const NFT_CMP_EQ: u32 = 0;
    pub const NFT_CMP_NEQ: u32 = 1;
    pub const NFT_CMP_LTE: u32 = 3;
    pub const NFT_CMP_GTE: u32 = 5;
    pub const NFTA_RANGE_SREG: u16 = 1;
    pub const NFTA_RANGE_OP: u16 = 2;
    pub const NFTA_RANGE_FROM_DATA: u16 = 3;
    pub const NFTA_RANGE_TO_DATA: u16 = 4;
    pub const NFT_RANGE_NEQ: u32 = 1;

    pub const NFTA_PAYLOAD_DREG: u16 = 1;
    pub const NFTA_PAYLOAD_BASE: u16 = 2;
    pub const NFTA_PAYLOAD_OFFSET: u16 = 3;
    pub const NFTA_PAYLOAD_LEN: u16 = 4;
    pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
    pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

    pub const NFTA_BITWISE_SREG: u16 = 1;
    pub const NFTA_BITWISE_DREG: u16 = 2;
    pub const NFTA_BITWISE_LEN: u16 = 3;
    pub const NFTA_BITWISE_MASK: u16 = 4;
    pub const NFTA_BITWISE_XOR: u16 = 5;

    pub const NFTA_CT_DREG: u16 = 1;
    pub const NFTA_CT_KEY: u16 = 2;
    pub const NFTA_CT_SREG: u16 = 4;
    pub const NFT_CT_STATE: u32 = 0;
    pub const NFT_CT_MARK: u32 = 3;
    pub const NFT_CT_ZONE: u32 = 17;
    pub const NF_CT_STATE_INVALID_BIT: u32 = 1;
    pub const NF_CT_STATE_ESTABLISHED_BIT: u32 = 2;
    pub const NF_CT_STATE_RELATED_BIT: u32 = 4;

    pub const NFTA_IMMEDIATE_DREG: u16 = 1;
    pub const NFTA_IMMEDIATE_DATA: u16 = 2;

    pub const NFTA_LOOKUP_SET: u16 = 1;
    pub const NFTA_LOOKUP_SREG: u16 = 2;
    pub const NFTA_LOOKUP_SET_ID: u16 = 4;
    pub const NFTA_LOOKUP_FLAGS: u16 = 5;
    pub const NFT_LOOKUP_F_INV: u32 = 1;

    pub const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
    pub const NFTA_REDIR_FLAGS: u16 = 3;
    pub const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

    pub const NFTA_TPROXY_FAMILY: u16 = 1;
    pub const NFTA_TPROXY_REG_PORT: u16 = 3;

    pub const NFTA_SET_TABLE: u16 = 1;
    pub const NFTA_SET_NAME: u16 = 2;
    pub const NFTA_SET_FLAGS: u16 = 3;
    pub const NFTA_SET_KEY_TYPE: u16 = 4;
    pub const NFTA_SET_KEY_LEN: u16 = 5;
    pub const NFTA_SET_DESC: u16 = 9;
    pub const NFTA_SET_ID: u16 = 10;
    pub const NFTA_SET_USERDATA: u16 = 13;
    pub const NFTA_SET_DESC_SIZE: u16 = 1;
    pub const NFT_SET_ANONYMOUS: u32 = 0x1;
    pub const NFT_SET_CONSTANT: u32 = 0x2;
    pub const NFT_SET_INTERVAL: u32 = 0x4;

    pub const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
    pub const NFTA_SET_ELEM_LIST_SET: u16 = 2;
    pub const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
    pub const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
    pub const NFTA_SET_ELEM_KEY: u16 = 1;
    pub const NFTA_SET_ELEM_FLAGS: u16 = 3;
    pub const NFTA_SET_ELEM_USERDATA: u16 = 6;
    pub const NFT_SET_ELEM_INTERVAL_END: u32 = 1;

    /// nft's data types (`enum datatypes`) for set keys.
    pub const TYPE_IPADDR: u32 = 7;
    pub const TYPE_IP6ADDR: u32 = 8;
    pub const TYPE_INET_SERVICE: u32 = 13;

    /// nft's set metadata (libnftnl's `NFTNL_UDATA_SET_*`): key byte order, auto-merge,
    /// and the key's expression (`typeof`), here always a payload field.
    pub const UDATA_SET_KEYBYTEORDER: u8 = 0;
    pub const UDATA_SET_MERGE_ELEMENTS: u8 = 2;
    pub const UDATA_SET_KEY_TYPEOF: u8 = 3;
    pub const UDATA_TYPEOF_EXPR: u8 = 0;
    pub const UDATA_TYPEOF_DATA: u8 = 1;
    pub const UDATA_PAYLOAD_DESC: u8 = 0;
    pub const UDATA_PAYLOAD_TYPE: u8 = 1;
    pub const BYTEORDER_BIG_ENDIAN: u32 = 2;
    pub const EXPR_PAYLOAD: u32 = 7;
    /// nft's protocol descriptions (`enum proto_desc_id`) and their fields.
    pub const PROTO_DESC_UDP: u32 = 6;
    pub const PROTO_DESC_TCP: u32 = 8;
    pub const PROTO_DESC_IP: u32 = 12;
    pub const PROTO_DESC_IP6: u32 = 13;
    pub const TH_SPORT: u32 = 1;
    pub const TH_DPORT: u32 = 2;
    pub const IPHDR_SADDR: u32 = 11;
    pub const IPHDR_DADDR: u32 = 12;
    pub const IP6HDR_SADDR: u32 = 8;
    pub const IP6HDR_DADDR: u32 = 9;
    /// An element's metadata: the interval it starts runs to the end of the key space.
    pub const UDATA_SET_ELEM_FLAGS: u8 = 1;
    pub const SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
}

const IFNAMSIZ: usize = 16;
/// Elements per NEWSETELEM message are limited so that each message stays small (nft
/// splits large sets across messages too).
const ELEMENTS_BYTES_PER_MESSAGE: usize = 8192;

/// One nfnetlink batch, ready to send: `BATCH_BEGIN`, the messages, `BATCH_END`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    bytes: Vec<u8>,
    /// The generation the kernel checks before committing, if any.
    generation: Option<u32>,
    /// For each message after `BATCH_BEGIN`, in order: the operation it came from.
    op_of_message: Vec<usize>,
}

/// `BATCH_BEGIN`'s sequence number; the messages follow it.
const BEGIN_SEQ: u32 = 1;

impl Batch {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn begin_seq(&self) -> u32 {
        BEGIN_SEQ
    }

    /// The nf_tables generation the batch is checked against, if any.
    pub fn generation(&self) -> Option<u32> {
        self.generation
    }

    /// The last message's sequence number: the one that asks for an acknowledgement.
    pub fn last_seq(&self) -> u32 {
        BEGIN_SEQ + self.op_of_message.len() as u32
    }

    /// How many messages (not counting `BATCH_BEGIN` and `BATCH_END`).
    pub fn messages(&self) -> usize {
        self.op_of_message.len()
    }

    /// The index, among the operations encoded, of the one message `seq` belongs to.
    pub fn op_index(&self, seq: u32) -> Option<usize> {
        let index = seq.checked_sub(BEGIN_SEQ + 1)?;
        self.op_of_message.get(index as usize).copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("no {} named {name:?} in {}", owner_word(*.kind), owner_file(*.kind))]
    UnknownOwner { kind: OwnerKind, name: String },
    #[error("insert rule {table} {chain} index {index}: the chain has no rule there")]
    NoRuleAtIndex {
        table: &'static str,
        chain: &'static str,
        index: usize,
    },
}

fn owner_word(kind: OwnerKind) -> &'static str {
    match kind {
        OwnerKind::Uid => "user",
        OwnerKind::Gid => "group",
    }
}

fn owner_file(kind: OwnerKind) -> &'static str {
    match kind {
        OwnerKind::Uid => "/etc/passwd",
        OwnerKind::Gid => "/etc/group",
    }
}

/// A user or group name → its id, or `None` if there is none of that name.
pub type OwnerLookup<'a> = &'a dyn Fn(OwnerKind, &str) -> Option<u32>;

/// `BATCH_BEGIN`'s attribute: the generation the batch was planned against.
const NFNL_BATCH_GENID: u16 = 1;

/// Encodes `ops` as one batch. With `generation` (what the kernel's state was read at), the
/// kernel refuses the batch (`ERESTART`) if anything changed nf_tables since. Fails,
/// encoding nothing, on a user or group name `lookup` does not know.
pub fn encode(
    ops: &[Op<'_>],
    lookup: OwnerLookup<'_>,
    generation: Option<u32>,
) -> Result<Batch, EncodeError> {
    let (positions, referenced) = insert_positions(ops)?;
    let rules = ops
        .iter()
        .filter(|op| matches!(op, Op::Rule { .. }))
        .count();
    let mut e = Encoder {
        w: Writer::with_capacity(64 + ops.len() * 48 + rules * 256),
        seq: BEGIN_SEQ,
        set_id: 0,
        op_of_message: Vec::with_capacity(ops.len()),
        last_message: None,
        lookup,
    };
    let subsystem = NFNL_SUBSYS_NFTABLES.to_be_bytes();
    let batch_header = [0, 0, subsystem[0], subsystem[1]];
    let begin = e.w.begin(NFNL_MSG_BATCH_BEGIN, 0, BEGIN_SEQ);
    e.w.raw(&batch_header);
    if let Some(generation) = generation {
        e.w.attr_be32(NFNL_BATCH_GENID, generation);
    }
    e.w.finish(begin);
    for (index, op) in ops.iter().enumerate() {
        e.op(index, op, &positions, &referenced)?;
    }
    let Encoder {
        mut w,
        seq,
        op_of_message,
        last_message,
        ..
    } = e;
    let end = w.begin(NFNL_MSG_BATCH_END, 0, seq + 1);
    w.raw(&batch_header);
    w.finish(end);
    let mut bytes = w.into_bytes();
    // Only the last message asks for an acknowledgement: a refused one is reported anyway.
    if let Some(start) = last_message {
        let flags = u16::from_ne_bytes([bytes[start + 6], bytes[start + 7]]) | NLM_F_ACK;
        bytes[start + 6..start + 8].copy_from_slice(&flags.to_ne_bytes());
    }
    Ok(Batch {
        bytes,
        generation,
        op_of_message,
    })
}

/// For each insert (by operation index), the rule it goes in front of: the one at its index
/// once the operations before it ran. Also the set of rules referenced so.
fn insert_positions(
    ops: &[Op<'_>],
) -> Result<(HashMap<usize, usize>, HashSet<usize>), EncodeError> {
    let mut chains: HashMap<(super::model::Table, Chain), Vec<usize>> = HashMap::new();
    let mut positions = HashMap::new();
    let mut referenced = HashSet::new();
    for (index, op) in ops.iter().enumerate() {
        match op {
            Op::FlushTable(table) | Op::DeleteTable(table) => {
                chains.retain(|(t, _), _| t != table);
            }
            Op::Rule { table, op } => {
                let rules = chains.entry((*table, op.chain)).or_default();
                match op.position {
                    Position::Append => rules.push(index),
                    Position::Insert { index: at } => {
                        let Some(&before) = rules.get(at) else {
                            return Err(EncodeError::NoRuleAtIndex {
                                table: table.name(),
                                chain: op.chain.name(),
                                index: at,
                            });
                        };
                        positions.insert(index, before);
                        referenced.insert(before);
                        rules.insert(at, index);
                    }
                }
            }
            Op::AddTable(_) | Op::AddChain { .. } => {}
        }
    }
    Ok((positions, referenced))
}

/// A rule's ID within the batch, for the rule at operation `index`.
fn rule_id(index: usize) -> u32 {
    index as u32 + 1
}

/// An anonymous set a match needs.
enum AnonSet<'a> {
    Ports {
        protocol: Protocol,
        direction: Direction,
        ports: &'a [PortRange],
    },
    Nets {
        direction: Direction,
        nets: &'a [IpNet],
    },
}

fn anon_set(m: &Match) -> Option<AnonSet<'_>> {
    match m {
        Match::Port {
            protocol,
            direction,
            ports,
            ..
        } if ports.len() > 1 => Some(AnonSet::Ports {
            protocol: *protocol,
            direction: *direction,
            ports,
        }),
        Match::AddressSet { direction, nets } if nets.len() > 1 => Some(AnonSet::Nets {
            direction: *direction,
            nets,
        }),
        _ => None,
    }
}

/// What the rule has established so far, as nft tracks it to add dependencies.
#[derive(Default)]
struct Context {
    network: Option<Family>,
    transport: Option<Protocol>,
}

struct Encoder<'l> {
    w: Writer,
    seq: u32,
    set_id: u32,
    op_of_message: Vec<usize>,
    last_message: Option<usize>,
    lookup: OwnerLookup<'l>,
}

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

/// The interface name as nft compares it: the whole name padded to IFNAMSIZ, or for
/// iptables' `eth+` wildcard only the prefix.
fn interface_bytes(iface: &Interface) -> Vec<u8> {
    match iface.as_str().strip_suffix('+') {
        Some(prefix) => prefix.as_bytes().to_vec(),
        None => {
            let mut bytes = iface.as_str().as_bytes().to_vec();
            bytes.resize(IFNAMSIZ.max(bytes.len()), 0);
            bytes
        }
    }
}

/// (offset in the network header, address length) of `direction`'s address.
fn address_field(family: Family, direction: Direction) -> (u32, usize) {
    match (family, direction) {
        (Family::V4, Direction::Source) => (12, 4),
        (Family::V4, Direction::Destination) => (16, 4),
        (Family::V6, Direction::Source) => (8, 16),
        (Family::V6, Direction::Destination) => (24, 16),
    }
}

fn network_bytes(net: &IpNet) -> Vec<u8> {
    match net.trunc() {
        IpNet::V4(n) => n.network().octets().to_vec(),
        IpNet::V6(n) => n.network().octets().to_vec(),
    }
}

fn mask_bytes(net: &IpNet) -> Vec<u8> {
    match net {
        IpNet::V4(n) => n.netmask().octets().to_vec(),
        IpNet::V6(n) => n.netmask().octets().to_vec(),
    }
}

/// The networks as closed ranges [first, last] of addresses, sorted, with overlapping and
/// adjacent ranges merged (as nft's auto-merge does for anonymous interval sets).
pub fn merged_ranges(nets: &[IpNet]) -> Vec<(u128, u128)> {
    let mut ranges: Vec<(u128, u128)> = nets
        .iter()
        .map(|net| match net.trunc() {
            IpNet::V4(n) => (
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            ),
            IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (first, last) in ranges {
        match merged.last_mut() {
            Some((_, end)) if first <= end.saturating_add(1) => *end = (*end).max(last),
            _ => merged.push((first, last)),
        }
    }
    merged
}

/// One element of a set: its key and flags.
struct Element {
    key: Vec<u8>,
    interval_end: bool,
    open: bool,
}

fn key_bytes(value: u128, len: usize) -> Vec<u8> {
    value.to_be_bytes()[16 - len..].to_vec()
}

/// The elements of an interval set over `ranges` as nft writes them: an end at zero unless
/// the first range starts there, then each range's start and the end one past its last
/// address, except for a range running to the last address, whose start is marked open.
fn interval_elements(ranges: &[(u128, u128)], len: usize) -> Vec<Element> {
    let max = if len >= 16 {
        u128::MAX
    } else {
        (1u128 << (8 * len)) - 1
    };
    let mut elements = Vec::with_capacity(1 + 2 * ranges.len());
    if ranges.first().is_some_and(|(first, _)| *first != 0) {
        elements.push(Element {
            key: key_bytes(0, len),
            interval_end: true,
            open: false,
        });
    }
    for (first, last) in ranges {
        elements.push(Element {
            key: key_bytes(*first, len),
            interval_end: false,
            open: *last == max,
        });
        if *last != max {
            elements.push(Element {
                key: key_bytes(last + 1, len),
                interval_end: true,
                open: false,
            });
        }
    }
    elements
}

/// nft's set metadata for a set keyed by payload field `field` of protocol `desc`.
fn set_userdata(interval: bool, desc: u32, field: u32) -> Vec<u8> {
    fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
        out.push(kind);
        out.push(value.len() as u8);
        out.extend_from_slice(value);
    }
    let mut payload = Vec::new();
    tlv(&mut payload, sys::UDATA_PAYLOAD_DESC, &desc.to_ne_bytes());
    tlv(&mut payload, sys::UDATA_PAYLOAD_TYPE, &field.to_ne_bytes());
    let mut typeof_ = Vec::new();
    tlv(
        &mut typeof_,
        sys::UDATA_TYPEOF_EXPR,
        &sys::EXPR_PAYLOAD.to_ne_bytes(),
    );
    tlv(&mut typeof_, sys::UDATA_TYPEOF_DATA, &payload);
    let mut out = Vec::new();
    tlv(
        &mut out,
        sys::UDATA_SET_KEYBYTEORDER,
        &sys::BYTEORDER_BIG_ENDIAN.to_ne_bytes(),
    );
    if interval {
        tlv(&mut out, sys::UDATA_SET_MERGE_ELEMENTS, &1u32.to_ne_bytes());
    }
    tlv(&mut out, sys::UDATA_SET_KEY_TYPEOF, &typeof_);
    out
}

impl Encoder<'_> {
    /// Starts an nf_tables message for operation `op`, with the inet `nfgenmsg`.
    fn begin(&mut self, kind: u16, flags: u16, op: usize) -> usize {
        self.seq += 1;
        let start = self
            .w
            .begin((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, self.seq);
        self.w.raw(&[sys::NFPROTO_INET, 0, 0, 0]);
        self.op_of_message.push(op);
        self.last_message = Some(start);
        start
    }

    fn op(
        &mut self,
        index: usize,
        op: &Op<'_>,
        positions: &HashMap<usize, usize>,
        referenced: &HashSet<usize>,
    ) -> Result<(), EncodeError> {
        match op {
            Op::AddTable(table) => {
                let m = self.begin(sys::NFT_MSG_NEWTABLE, NLM_F_CREATE, index);
                self.w.attr_str(sys::NFTA_TABLE_NAME, table.name());
                self.w.attr_be32(sys::NFTA_TABLE_FLAGS, 0);
                self.w.finish(m);
            }
            Op::DeleteTable(table) => {
                let m = self.begin(sys::NFT_MSG_DELTABLE, 0, index);
                self.w.attr_str(sys::NFTA_TABLE_NAME, table.name());
                self.w.finish(m);
            }
            Op::FlushTable(table) => {
                let m = self.begin(sys::NFT_MSG_DELRULE, 0, index);
                self.w.attr_str(sys::NFTA_RULE_TABLE, table.name());
                self.w.finish(m);
            }
            Op::AddChain { table, chain, base } => {
                let m = self.begin(sys::NFT_MSG_NEWCHAIN, NLM_F_CREATE, index);
                self.w.attr_str(sys::NFTA_CHAIN_TABLE, table.name());
                self.w.attr_str(sys::NFTA_CHAIN_NAME, chain.name());
                if let Some(base) = base {
                    self.base_chain(*base);
                }
                self.w.finish(m);
            }
            Op::Rule { table, op } => {
                let mut sets = Vec::new();
                for m in &op.rule.matches {
                    if let Some(set) = anon_set(m) {
                        sets.push(self.set(index, table.name(), &set));
                    }
                }
                let flags = match op.position {
                    Position::Append => NLM_F_CREATE | NLM_F_APPEND,
                    Position::Insert { .. } => NLM_F_CREATE,
                };
                // Expressions first, into a scratch writer: a name nobody knows must fail
                // before anything of this rule is written.
                let expressions = self.expressions(&op.rule.matches, &op.rule.statements, &sets)?;
                let m = self.begin(sys::NFT_MSG_NEWRULE, flags, index);
                self.w.attr_str(sys::NFTA_RULE_TABLE, table.name());
                self.w.attr_str(sys::NFTA_RULE_CHAIN, op.chain.name());
                let nest = self.w.begin_nest(sys::NFTA_RULE_EXPRESSIONS);
                self.w.raw(&expressions);
                self.w.end_nest(nest);
                if referenced.contains(&index) {
                    self.w.attr_be32(sys::NFTA_RULE_ID, rule_id(index));
                }
                if let Some(before) = positions.get(&index) {
                    self.w
                        .attr_be32(sys::NFTA_RULE_POSITION_ID, rule_id(*before));
                }
                self.w.finish(m);
            }
        }
        Ok(())
    }

    fn base_chain(&mut self, base: BaseChain) {
        let kind = match base.kind {
            ChainType::Nat => "nat",
            ChainType::Filter => "filter",
            ChainType::Route => "route",
        };
        let hook = match base.hook {
            Hook::Prerouting => sys::NF_INET_PRE_ROUTING,
            Hook::Output => sys::NF_INET_LOCAL_OUT,
        };
        self.w.attr_str(sys::NFTA_CHAIN_TYPE, kind);
        let nest = self.w.begin_nest(sys::NFTA_CHAIN_HOOK);
        self.w.attr_be32(sys::NFTA_HOOK_HOOKNUM, hook);
        self.w
            .attr(sys::NFTA_HOOK_PRIORITY, &base.priority.to_be_bytes());
        self.w.end_nest(nest);
    }

    /// Creates an anonymous set (and its elements) for the rule at operation `op`;
    /// returns its ID within the batch.
    fn set(&mut self, op: usize, table: &str, set: &AnonSet<'_>) -> u32 {
        self.set_id += 1;
        let id = self.set_id;
        let (flags, key_type, key_len, size, userdata, elements) = match set {
            AnonSet::Ports {
                protocol,
                direction,
                ports,
            } => {
                let desc = match protocol {
                    Protocol::Tcp => sys::PROTO_DESC_TCP,
                    Protocol::Udp => sys::PROTO_DESC_UDP,
                };
                let field = match direction {
                    Direction::Source => sys::TH_SPORT,
                    Direction::Destination => sys::TH_DPORT,
                };
                if ports.iter().any(|p| p.single().is_none()) {
                    // With a range, an interval set, as nft makes for `{ 80, 8000-8100 }`:
                    // the same elements and metadata as for networks, over 2-byte keys.
                    let ranges: Vec<(u128, u128)> = crate::values::merge_port_ranges(ports)
                        .iter()
                        .map(|r| (u128::from(r.first().get()), u128::from(r.last().get())))
                        .collect();
                    let starts_at_zero = ranges.first().is_some_and(|(first, _)| *first == 0);
                    let size = usize::from(!starts_at_zero) + 2 * ranges.len();
                    (
                        sys::NFT_SET_ANONYMOUS | sys::NFT_SET_CONSTANT | sys::NFT_SET_INTERVAL,
                        sys::TYPE_INET_SERVICE,
                        2,
                        size,
                        set_userdata(true, desc, field),
                        interval_elements(&ranges, 2),
                    )
                } else {
                    let elements: Vec<Element> = ports
                        .iter()
                        .map(|p| Element {
                            key: p.first().get().to_be_bytes().to_vec(),
                            interval_end: false,
                            open: false,
                        })
                        .collect();
                    (
                        sys::NFT_SET_ANONYMOUS | sys::NFT_SET_CONSTANT,
                        sys::TYPE_INET_SERVICE,
                        2,
                        ports.len(),
                        set_userdata(false, desc, field),
                        elements,
                    )
                }
            }
            AnonSet::Nets { direction, nets } => {
                let family = nets.first().map_or(Family::V4, Family::of);
                let (desc, field, key_type, len) = match (family, direction) {
                    (Family::V4, Direction::Source) => {
                        (sys::PROTO_DESC_IP, sys::IPHDR_SADDR, sys::TYPE_IPADDR, 4)
                    }
                    (Family::V4, Direction::Destination) => {
                        (sys::PROTO_DESC_IP, sys::IPHDR_DADDR, sys::TYPE_IPADDR, 4)
                    }
                    (Family::V6, Direction::Source) => (
                        sys::PROTO_DESC_IP6,
                        sys::IP6HDR_SADDR,
                        sys::TYPE_IP6ADDR,
                        16,
                    ),
                    (Family::V6, Direction::Destination) => (
                        sys::PROTO_DESC_IP6,
                        sys::IP6HDR_DADDR,
                        sys::TYPE_IP6ADDR,
                        16,
                    ),
                };
                let ranges = merged_ranges(nets);
                let starts_at_zero = ranges.first().is_some_and(|(first, _)| *first == 0);
                // nft sizes the set for an end at zero (unless not needed) and a start and
                // an end per range.
                let size = usize::from(!starts_at_zero) + 2 * ranges.len();
                (
                    sys::NFT_SET_ANONYMOUS | sys::NFT_SET_CONSTANT | sys::NFT_SET_INTERVAL,
                    key_type,
                    len,
                    size,
                    set_userdata(true, desc, field),
                    interval_elements(&ranges, len),
                )
            }
        };
        let m = self.begin(sys::NFT_MSG_NEWSET, NLM_F_CREATE, op);
        self.w.attr_str(sys::NFTA_SET_TABLE, table);
        self.w.attr_str(sys::NFTA_SET_NAME, "__set%d");
        self.w.attr_be32(sys::NFTA_SET_FLAGS, flags);
        self.w.attr_be32(sys::NFTA_SET_KEY_TYPE, key_type);
        self.w.attr_be32(sys::NFTA_SET_KEY_LEN, key_len as u32);
        self.w.attr_be32(sys::NFTA_SET_ID, id);
        let desc = self.w.begin_nest(sys::NFTA_SET_DESC);
        self.w.attr_be32(sys::NFTA_SET_DESC_SIZE, size as u32);
        self.w.end_nest(desc);
        self.w.attr(sys::NFTA_SET_USERDATA, &userdata);
        self.w.finish(m);

        let mut rest = elements.as_slice();
        while !rest.is_empty() {
            let m = self.begin(sys::NFT_MSG_NEWSETELEM, NLM_F_CREATE, op);
            self.w.attr_str(sys::NFTA_SET_ELEM_LIST_TABLE, table);
            self.w.attr_str(sys::NFTA_SET_ELEM_LIST_SET, "__set%d");
            self.w.attr_be32(sys::NFTA_SET_ELEM_LIST_SET_ID, id);
            let list = self.w.begin_nest(sys::NFTA_SET_ELEM_LIST_ELEMENTS);
            let list_start = self.w.len();
            while let Some((element, after)) = rest.split_first() {
                if self.w.len() - list_start >= ELEMENTS_BYTES_PER_MESSAGE {
                    break;
                }
                self.element(element);
                rest = after;
            }
            self.w.end_nest(list);
            self.w.finish(m);
        }
        id
    }

    fn element(&mut self, element: &Element) {
        let nest = self.w.begin_nest(sys::NFTA_LIST_ELEM);
        if element.interval_end {
            self.w
                .attr_be32(sys::NFTA_SET_ELEM_FLAGS, sys::NFT_SET_ELEM_INTERVAL_END);
        }
        let key = self.w.begin_nest(sys::NFTA_SET_ELEM_KEY);
        self.w.attr(sys::NFTA_DATA_VALUE, &element.key);
        self.w.end_nest(key);
        if element.open {
            let mut userdata = vec![sys::UDATA_SET_ELEM_FLAGS, 4];
            userdata.extend_from_slice(&sys::SET_ELEM_F_INTERVAL_OPEN.to_ne_bytes());
            self.w.attr(sys::NFTA_SET_ELEM_USERDATA, &userdata);
        }
        self.w.end_nest(nest);
    }

    /// A rule's expressions (the contents of `NFTA_RULE_EXPRESSIONS`). `sets` are the IDs
    /// of the anonymous sets made for its matches, in order.
    fn expressions(
        &self,
        matches: &[Match],
        statements: &[Statement],
        sets: &[u32],
    ) -> Result<Vec<u8>, EncodeError> {
        let mut x = Expressions {
            w: Writer::with_capacity(512),
        };
        let mut sets = sets.iter().copied();
        let mut ctx = Context::default();
        for m in matches {
            match m {
                Match::InInterface(iface) => {
                    x.meta_load(sys::NFT_META_IIFNAME);
                    x.cmp(false, &interface_bytes(iface));
                }
                Match::OutInterface(iface) => {
                    x.meta_load(sys::NFT_META_OIFNAME);
                    x.cmp(false, &interface_bytes(iface));
                }
                Match::L4Proto(p) => {
                    x.meta_load(sys::NFT_META_L4PROTO);
                    x.cmp(false, &[protocol_number(*p)]);
                    ctx.transport = Some(*p);
                }
                Match::Address {
                    direction,
                    net,
                    negated,
                } => x.address(&mut ctx, *direction, net, *negated),
                Match::AddressSet { direction, nets } => match nets.as_slice() {
                    [net] => x.address(&mut ctx, *direction, net, false),
                    _ => {
                        let family = nets.first().map_or(Family::V4, Family::of);
                        x.network_dependency(&mut ctx, family);
                        let (offset, len) = address_field(family, *direction);
                        x.payload(sys::NFT_PAYLOAD_NETWORK_HEADER, offset, len as u32);
                        x.lookup(sets.next().unwrap_or_default(), false);
                    }
                },
                Match::Port {
                    protocol,
                    direction,
                    ports,
                    negated,
                } => {
                    if ctx.transport != Some(*protocol) {
                        x.meta_load(sys::NFT_META_L4PROTO);
                        x.cmp(false, &[protocol_number(*protocol)]);
                        ctx.transport = Some(*protocol);
                    }
                    let offset = match direction {
                        Direction::Source => 0,
                        Direction::Destination => 2,
                    };
                    x.payload(sys::NFT_PAYLOAD_TRANSPORT_HEADER, offset, 2);
                    match ports.as_slice() {
                        [port] => match port.single() {
                            Some(port) => x.cmp(*negated, &port.get().to_be_bytes()),
                            // nft's encoding of `tcp dport 8000-8100`: two comparisons;
                            // of `tcp dport != 8000-8100`: one range expression.
                            None if *negated => x.range_neq(
                                &port.first().get().to_be_bytes(),
                                &port.last().get().to_be_bytes(),
                            ),
                            None => {
                                x.cmp_op(sys::NFT_CMP_GTE, &port.first().get().to_be_bytes());
                                x.cmp_op(sys::NFT_CMP_LTE, &port.last().get().to_be_bytes());
                            }
                        },
                        _ => x.lookup(sets.next().unwrap_or_default(), *negated),
                    }
                }
                Match::Owner {
                    kind,
                    owner,
                    negated,
                } => {
                    let id = match owner {
                        Owner::Id(id) => *id,
                        Owner::Name(name) => {
                            (self.lookup)(*kind, name).ok_or_else(|| EncodeError::UnknownOwner {
                                kind: *kind,
                                name: name.clone(),
                            })?
                        }
                    };
                    x.meta_load(match kind {
                        OwnerKind::Uid => sys::NFT_META_SKUID,
                        OwnerKind::Gid => sys::NFT_META_SKGID,
                    });
                    x.cmp(*negated, &id.to_ne_bytes());
                }
                Match::ConntrackState(state) => {
                    let bits = match state {
                        CtState::Invalid => sys::NF_CT_STATE_INVALID_BIT,
                        CtState::RelatedEstablished => {
                            sys::NF_CT_STATE_ESTABLISHED_BIT | sys::NF_CT_STATE_RELATED_BIT
                        }
                    };
                    x.ct_load(sys::NFT_CT_STATE);
                    x.bitwise(&bits.to_ne_bytes(), &[0; 4]);
                    x.cmp(true, &[0; 4]);
                }
                Match::Mark { mark, negated } => {
                    x.meta_load(sys::NFT_META_MARK);
                    x.cmp(*negated, &mark.to_ne_bytes());
                }
                Match::ConnMark(mark) => {
                    x.ct_load(sys::NFT_CT_MARK);
                    x.cmp(false, &mark.to_ne_bytes());
                }
            }
        }
        for s in statements {
            match s {
                Statement::Counter => x.expr("counter", |_| {}),
                Statement::SetMark(mark) => {
                    x.immediate(&mark.to_ne_bytes());
                    x.meta_set(sys::NFT_META_MARK);
                }
                Statement::MarkFromConnMark => {
                    x.ct_load(sys::NFT_CT_MARK);
                    x.meta_set(sys::NFT_META_MARK);
                }
                Statement::ConnMarkFromMark => {
                    x.meta_load(sys::NFT_META_MARK);
                    x.ct_set(sys::NFT_CT_MARK);
                }
                Statement::CtZone(zone) => {
                    x.immediate(&zone.to_ne_bytes());
                    x.ct_set(sys::NFT_CT_ZONE);
                }
                Statement::Tproxy { family, port } => {
                    x.immediate(&port.get().to_be_bytes());
                    let family = match family {
                        Family::V4 => sys::NFPROTO_IPV4,
                        Family::V6 => sys::NFPROTO_IPV6,
                    };
                    x.expr("tproxy", |w| {
                        w.attr_be32(sys::NFTA_TPROXY_FAMILY, u32::from(family));
                        w.attr_be32(sys::NFTA_TPROXY_REG_PORT, sys::NFT_REG_1);
                    });
                }
                Statement::Redirect { port } => {
                    x.immediate(&port.get().to_be_bytes());
                    x.expr("redir", |w| {
                        w.attr_be32(sys::NFTA_REDIR_REG_PROTO_MIN, sys::NFT_REG_1);
                        w.attr_be32(sys::NFTA_REDIR_FLAGS, sys::NF_NAT_RANGE_PROTO_SPECIFIED);
                    });
                }
                Statement::Return => x.verdict(sys::NFT_RETURN, None),
                Statement::Accept => x.verdict(sys::NF_ACCEPT, None),
                Statement::Drop => x.verdict(sys::NF_DROP, None),
                Statement::Jump(chain) => x.verdict(sys::NFT_JUMP, Some(chain.name())),
            }
        }
        Ok(x.w.into_bytes())
    }
}

/// The expressions of one rule, as nftables' netlink attributes.
struct Expressions {
    w: Writer,
}

impl Expressions {
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Writer)) {
        let elem = self.w.begin_nest(sys::NFTA_LIST_ELEM);
        self.w.attr_str(sys::NFTA_EXPR_NAME, name);
        let nest = self.w.begin_nest(sys::NFTA_EXPR_DATA);
        data(&mut self.w);
        self.w.end_nest(nest);
        self.w.end_nest(elem);
    }

    fn meta_load(&mut self, key: u32) {
        self.expr("meta", |w| {
            w.attr_be32(sys::NFTA_META_KEY, key);
            w.attr_be32(sys::NFTA_META_DREG, sys::NFT_REG_1);
        });
    }

    fn meta_set(&mut self, key: u32) {
        self.expr("meta", |w| {
            w.attr_be32(sys::NFTA_META_KEY, key);
            w.attr_be32(sys::NFTA_META_SREG, sys::NFT_REG_1);
        });
    }

    fn ct_load(&mut self, key: u32) {
        self.expr("ct", |w| {
            w.attr_be32(sys::NFTA_CT_KEY, key);
            w.attr_be32(sys::NFTA_CT_DREG, sys::NFT_REG_1);
        });
    }

    fn ct_set(&mut self, key: u32) {
        self.expr("ct", |w| {
            w.attr_be32(sys::NFTA_CT_KEY, key);
            w.attr_be32(sys::NFTA_CT_SREG, sys::NFT_REG_1);
        });
    }

    fn cmp(&mut self, negated: bool, value: &[u8]) {
        self.cmp_op(
            if negated {
                sys::NFT_CMP_NEQ
            } else {
                sys::NFT_CMP_EQ
            },
            value,
        );
    }

    fn cmp_op(&mut self, op: u32, value: &[u8]) {
        self.expr("cmp", |w| {
            w.attr_be32(sys::NFTA_CMP_SREG, sys::NFT_REG_1);
            w.attr_be32(sys::NFTA_CMP_OP, op);
            let data = w.begin_nest(sys::NFTA_CMP_DATA);
            w.attr(sys::NFTA_DATA_VALUE, value);
            w.end_nest(data);
        });
    }

    /// `range neq reg 1 FROM TO`: the register is outside [FROM, TO].
    fn range_neq(&mut self, from: &[u8], to: &[u8]) {
        self.expr("range", |w| {
            w.attr_be32(sys::NFTA_RANGE_SREG, sys::NFT_REG_1);
            w.attr_be32(sys::NFTA_RANGE_OP, sys::NFT_RANGE_NEQ);
            let data = w.begin_nest(sys::NFTA_RANGE_FROM_DATA);
            w.attr(sys::NFTA_DATA_VALUE, from);
            w.end_nest(data);
            let data = w.begin_nest(sys::NFTA_RANGE_TO_DATA);
            w.attr(sys::NFTA_DATA_VALUE, to);
            w.end_nest(data);
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32) {
        self.expr("payload", |w| {
            w.attr_be32(sys::NFTA_PAYLOAD_DREG, sys::NFT_REG_1);
            w.attr_be32(sys::NFTA_PAYLOAD_BASE, base);
            w.attr_be32(sys::NFTA_PAYLOAD_OFFSET, offset);
            w.attr_be32(sys::NFTA_PAYLOAD_LEN, len);
        });
    }

    fn bitwise(&mut self, mask: &[u8], xor: &[u8]) {
        self.expr("bitwise", |w| {
            w.attr_be32(sys::NFTA_BITWISE_SREG, sys::NFT_REG_1);
            w.attr_be32(sys::NFTA_BITWISE_DREG, sys::NFT_REG_1);
            w.attr_be32(sys::NFTA_BITWISE_LEN, mask.len() as u32);
            let m = w.begin_nest(sys::NFTA_BITWISE_MASK);
            w.attr(sys::NFTA_DATA_VALUE, mask);
            w.end_nest(m);
            let x = w.begin_nest(sys::NFTA_BITWISE_XOR);
            w.attr(sys::NFTA_DATA_VALUE, xor);
            w.end_nest(x);
        });
    }

    fn immediate(&mut self, value: &[u8]) {
        self.expr("immediate", |w| {
            w.attr_be32(sys::NFTA_IMMEDIATE_DREG, sys::NFT_REG_1);
            let data = w.begin_nest(sys::NFTA_IMMEDIATE_DATA);
            w.attr(sys::NFTA_DATA_VALUE, value);
            w.end_nest(data);
        });
    }

    fn verdict(&mut self, code: i32, chain: Option<&str>) {
        self.expr("immediate", |w| {
            w.attr_be32(sys::NFTA_IMMEDIATE_DREG, sys::NFT_REG_VERDICT);
            let data = w.begin_nest(sys::NFTA_IMMEDIATE_DATA);
            let verdict = w.begin_nest(sys::NFTA_DATA_VERDICT);
            w.attr(sys::NFTA_VERDICT_CODE, &code.to_be_bytes());
            if let Some(chain) = chain {
                w.attr_str(sys::NFTA_VERDICT_CHAIN, chain);
            }
            w.end_nest(verdict);
            w.end_nest(data);
        });
    }

    fn lookup(&mut self, set_id: u32, negated: bool) {
        self.expr("lookup", |w| {
            w.attr_be32(sys::NFTA_LOOKUP_SREG, sys::NFT_REG_1);
            w.attr_str(sys::NFTA_LOOKUP_SET, "__set%d");
            w.attr_be32(sys::NFTA_LOOKUP_SET_ID, set_id);
            if negated {
                w.attr_be32(sys::NFTA_LOOKUP_FLAGS, sys::NFT_LOOKUP_F_INV);
            }
        });
    }

    /// `meta nfproto ipv4` (or `ipv6`), unless the rule already matched the family.
    fn network_dependency(&mut self, ctx: &mut Context, family: Family) {
        if ctx.network != Some(family) {
            self.meta_load(sys::NFT_META_NFPROTO);
            self.cmp(
                false,
                &[match family {
                    Family::V4 => sys::NFPROTO_IPV4,
                    Family::V6 => sys::NFPROTO_IPV6,
                }],
            );
            ctx.network = Some(family);
        }
    }

    /// `ip daddr [!=] NET`: the whole address, the prefix's bytes, or a mask.
    fn address(&mut self, ctx: &mut Context, direction: Direction, net: &IpNet, negated: bool) {
        let family = Family::of(net);
        self.network_dependency(ctx, family);
        let (offset, len) = address_field(family, direction);
        let prefix = usize::from(net.prefix_len());
        let value = network_bytes(net);
        if prefix == len * 8 {
            self.payload(sys::NFT_PAYLOAD_NETWORK_HEADER, offset, len as u32);
            self.cmp(negated, &value);
        } else if prefix > 0 && prefix % 8 == 0 {
            let bytes = prefix / 8;
            self.payload(sys::NFT_PAYLOAD_NETWORK_HEADER, offset, bytes as u32);
            self.cmp(negated, &value[..bytes]);
        } else {
            self.payload(sys::NFT_PAYLOAD_NETWORK_HEADER, offset, len as u32);
            self.bitwise(&mask_bytes(net), &vec![0; len]);
            self.cmp(negated, &value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InboundCapture, InterceptionMode, OwnerGroups};
    use crate::rules::nft::model::{ExistingTables, Rule, RuleOp, Table};
    use crate::rules::nft::plan::tests::base;
    use crate::rules::nft::plan::{plan, plan_with, PlanOptions};
    use crate::rules::nft::txn::transaction;

    fn no_names(_: OwnerKind, _: &str) -> Option<u32> {
        None
    }

    /// (type, flags, seq, payload) of each message in a batch.
    fn messages(bytes: &[u8]) -> Vec<(u16, u16, u32, &[u8])> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            let flags = u16::from_ne_bytes(rest[6..8].try_into().unwrap());
            let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
            out.push((kind, flags, seq, &rest[16..len]));
            rest = &rest[(len + 3) & !3..];
        }
        assert!(rest.is_empty(), "trailing bytes");
        out
    }

    /// The attributes of `data` as (type without flags, payload).
    fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while data.len() >= 4 {
            let len = u16::from_ne_bytes(data[..2].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(data[2..4].try_into().unwrap()) & 0x3fff;
            out.push((kind, &data[4..len]));
            data = &data[((len + 3) & !3).min(data.len())..];
        }
        out
    }

    fn attr(data: &[u8], kind: u16) -> Option<&[u8]> {
        attrs(data)
            .into_iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v)
    }

    /// The expression names of a NEWRULE message's payload (after `nfgenmsg`).
    fn expression_names(payload: &[u8]) -> Vec<String> {
        let list = attr(&payload[4..], sys::NFTA_RULE_EXPRESSIONS).expect("expressions");
        attrs(list)
            .into_iter()
            .map(|(_, expr)| {
                let name = attr(expr, sys::NFTA_EXPR_NAME).expect("name");
                String::from_utf8_lossy(&name[..name.len() - 1]).into_owned()
            })
            .collect()
    }

    fn kind(msg: u16) -> u16 {
        msg & 0xff
    }

    #[test]
    fn batch_is_begin_messages_end_with_one_ack_on_the_last() {
        let ruleset = plan(&base());
        let ops = transaction(&ruleset, Some(&ExistingTables::default()));
        let batch = encode(&ops, &no_names, None).unwrap();
        let msgs = messages(batch.bytes());
        assert_eq!(msgs.first().map(|m| m.0), Some(NFNL_MSG_BATCH_BEGIN));
        assert_eq!(msgs.last().map(|m| m.0), Some(NFNL_MSG_BATCH_END));
        assert_eq!(
            msgs[0].3,
            [0, 0, 0, 10],
            "nfgenmsg with the nf_tables subsystem"
        );
        let checked = encode(&ops, &no_names, Some(7)).unwrap();
        let begin = messages(checked.bytes())[0].3;
        assert_eq!(
            attr(&begin[4..], NFNL_BATCH_GENID),
            Some(&7u32.to_be_bytes()[..])
        );
        assert_eq!(batch.messages(), msgs.len() - 2);
        assert_eq!(batch.messages(), ops.len(), "no sets in the base plan");
        for (i, (_, flags, seq, _)) in msgs.iter().enumerate() {
            assert_eq!(*seq, BEGIN_SEQ + i as u32);
            let acked = flags & NLM_F_ACK != 0;
            assert_eq!(acked, *seq == batch.last_seq(), "message {i}");
        }
        // add table, flush table, add chain output (a base chain), ...
        let kinds: Vec<u16> = msgs[1..4].iter().map(|m| kind(m.0)).collect();
        assert_eq!(
            kinds,
            [
                sys::NFT_MSG_NEWTABLE,
                sys::NFT_MSG_DELRULE,
                sys::NFT_MSG_NEWCHAIN
            ]
        );
        let hook = attr(&msgs[3].3[4..], sys::NFTA_CHAIN_HOOK).unwrap();
        assert_eq!(
            attr(hook, sys::NFTA_HOOK_PRIORITY),
            Some(&(-100i32).to_be_bytes()[..])
        );
        assert_eq!(batch.op_index(batch.begin_seq() + 3), Some(2));
        assert_eq!(batch.op_index(batch.begin_seq()), None);
    }

    /// Each `cmp` of a rule's expressions as (op, value).
    fn comparisons(payload: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let list = attr(&payload[4..], sys::NFTA_RULE_EXPRESSIONS).expect("expressions");
        attrs(list)
            .into_iter()
            .filter(|(_, expr)| attr(expr, sys::NFTA_EXPR_NAME) == Some(&b"cmp\0"[..]))
            .map(|(_, expr)| {
                let data = attr(expr, sys::NFTA_EXPR_DATA).expect("data");
                let op = attr(data, sys::NFTA_CMP_OP).expect("op");
                let value = attr(
                    attr(data, sys::NFTA_CMP_DATA).expect("value"),
                    sys::NFTA_DATA_VALUE,
                )
                .expect("value");
                (u32::from_be_bytes(op.try_into().unwrap()), value.to_vec())
            })
            .collect()
    }

    #[test]
    fn a_port_range_is_two_comparisons_as_nft_encodes_it() {
        // `nft --debug=netlink` for `tcp dport 8000-8100`: payload, cmp gte 0x1f40,
        // cmp lte 0x1fa4.
        let mut cfg = base();
        cfg.outbound_ports_exclude = vec![crate::rules::iptables::plan::tests::range(8000, 8100)];
        let ruleset = plan(&cfg);
        let ops = transaction(&ruleset, Some(&ExistingTables::default()));
        let batch = encode(&ops, &no_names, None).unwrap();
        let msgs = messages(batch.bytes());
        let ranged: Vec<_> = msgs
            .iter()
            .filter(|m| kind(m.0) == sys::NFT_MSG_NEWRULE)
            .map(|m| comparisons(m.3))
            .filter(|c| c.iter().any(|(op, _)| *op == sys::NFT_CMP_GTE))
            .collect();
        assert_eq!(ranged.len(), 2, "tcp and udp");
        for cmps in ranged {
            assert_eq!(
                cmps[1..],
                [
                    (sys::NFT_CMP_GTE, vec![0x1f, 0x40]),
                    (sys::NFT_CMP_LTE, vec![0x1f, 0xa4])
                ]
            );
        }
        assert!(msgs.iter().all(|m| kind(m.0) != sys::NFT_MSG_NEWSET));
    }

    #[test]
    fn a_set_with_a_range_is_an_interval_set_as_nft_makes_it() {
        // `nft --debug=netlink` for `tcp dport { 80, 8000-8100 }`: set flags 7, size 5,
        // elements 0 [end], 80, 81 [end], 8000, 8101 [end].
        let range = crate::rules::iptables::plan::tests::range;
        let mut cfg = base();
        cfg.outbound_ports_exclude = vec![range(8000, 8050), range(80, 80), range(8040, 8100)];
        let ruleset = plan_with(&cfg, PlanOptions { match_sets: true });
        let ops = transaction(&ruleset, Some(&ExistingTables::default()));
        let batch = encode(&ops, &no_names, None).unwrap();
        let msgs = messages(batch.bytes());
        let set_at = msgs
            .iter()
            .position(|m| kind(m.0) == sys::NFT_MSG_NEWSET)
            .expect("an anonymous set");
        let set = &msgs[set_at].3[4..];
        assert_eq!(
            attr(set, sys::NFTA_SET_FLAGS),
            Some(&7u32.to_be_bytes()[..])
        );
        assert_eq!(
            attr(set, sys::NFTA_SET_KEY_LEN),
            Some(&2u32.to_be_bytes()[..])
        );
        let desc = attr(set, sys::NFTA_SET_DESC).unwrap();
        assert_eq!(
            attr(desc, sys::NFTA_SET_DESC_SIZE),
            Some(&5u32.to_be_bytes()[..])
        );
        let list = attr(&msgs[set_at + 1].3[4..], sys::NFTA_SET_ELEM_LIST_ELEMENTS).unwrap();
        let elements: Vec<(u16, bool)> = attrs(list)
            .into_iter()
            .map(|(_, element)| {
                let key = attr(
                    attr(element, sys::NFTA_SET_ELEM_KEY).unwrap(),
                    sys::NFTA_DATA_VALUE,
                )
                .unwrap();
                (
                    u16::from_be_bytes(key.try_into().unwrap()),
                    attr(element, sys::NFTA_SET_ELEM_FLAGS).is_some(),
                )
            })
            .collect();
        assert_eq!(
            elements,
            [
                (0, true),
                (80, false),
                (81, true),
                (8000, false),
                (8101, true)
            ]
        );
    }

    #[test]
    fn interval_elements_of_ports_run_to_65535() {
        let elements = interval_elements(&[(65000, 65535)], 2);
        let keys: Vec<(Vec<u8>, bool, bool)> = elements
            .into_iter()
            .map(|e| (e.key, e.interval_end, e.open))
            .collect();
        assert_eq!(
            keys,
            [
                (vec![0, 0], true, false),
                (65000u16.to_be_bytes().to_vec(), false, true)
            ]
        );
    }

    #[test]
    fn dependencies_are_added_as_nft_adds_them() {
        // Istio's loopback rule: oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32
        // tcp dport != { 53, 15008 } skuid 1337 counter jump istio-in-redirect.
        let mut cfg = base();
        cfg.dns = crate::config::DnsCapture::All;
        let ruleset = plan(&cfg);
        let ops = transaction(&ruleset, Some(&ExistingTables::default()));
        let batch = encode(&ops, &no_names, None).unwrap();
        let msgs = messages(batch.bytes());
        let set_at = msgs
            .iter()
            .position(|m| kind(m.0) == sys::NFT_MSG_NEWSET)
            .expect("an anonymous set");
        assert_eq!(kind(msgs[set_at + 1].0), sys::NFT_MSG_NEWSETELEM);
        assert_eq!(kind(msgs[set_at + 2].0), sys::NFT_MSG_NEWRULE);
        assert_eq!(
            expression_names(msgs[set_at + 2].3),
            [
                "meta",
                "cmp",
                "meta",
                "cmp",
                "meta",
                "cmp",
                "payload",
                "cmp",
                "payload",
                "lookup",
                "meta",
                "cmp",
                "counter",
                "immediate"
            ]
        );
        // `udp dport 53 counter redirect to :15053`: the l4proto dependency first.
        let udp_dns = msgs
            .iter()
            .filter(|m| kind(m.0) == sys::NFT_MSG_NEWRULE)
            .map(|m| expression_names(m.3))
            .find(|names| names.last().map(String::as_str) == Some("redir"))
            .expect("a redirect");
        assert_eq!(udp_dns[..2], ["meta", "cmp"]);
    }

    #[test]
    fn prefixes_load_their_bytes_or_mask() {
        let rule = |net: &str| {
            let net: IpNet = net.parse().unwrap();
            let op = RuleOp {
                chain: Chain::IstioOutput,
                position: Position::Append,
                rule: Rule::new(
                    vec![Match::Address {
                        direction: Direction::Destination,
                        net,
                        negated: false,
                    }],
                    vec![Statement::Return],
                ),
            };
            let ops = [Op::Rule {
                table: Table::Nat,
                op: &op,
            }];
            let batch = encode(&ops, &no_names, None).unwrap();
            let msgs = messages(batch.bytes());
            expression_names(msgs[1].3)
        };
        let byte_aligned = ["meta", "cmp", "payload", "cmp", "immediate"];
        assert_eq!(rule("10.0.0.0/8"), byte_aligned);
        assert_eq!(rule("192.0.2.1/32"), byte_aligned);
        assert_eq!(rule("2001:db8::/32"), byte_aligned);
        let masked = ["meta", "cmp", "payload", "bitwise", "cmp", "immediate"];
        assert_eq!(rule("10.16.0.0/12"), masked);
        assert_eq!(rule("0.0.0.0/0"), masked);
    }

    #[test]
    fn inserts_reference_the_rule_they_go_before() {
        // TPROXY: istio-inbound gets three inserts, at 0, 1 and 2, in front of the appended
        // "established" rule (index 0 at the time) and of each other.
        let mut cfg = base();
        cfg.interception = InterceptionMode::Tproxy;
        cfg.inbound = InboundCapture::AllExcept(vec![]);
        cfg.ipv6 = true;
        let ruleset = plan(&cfg);
        let ops = transaction(&ruleset, Some(&ExistingTables::default()));
        let (positions, referenced) = insert_positions(&ops).unwrap();
        assert_eq!(positions.len(), 4, "four inserts with IPv6");
        for before in positions.values() {
            assert!(referenced.contains(before));
            assert!(matches!(ops[*before], Op::Rule { .. }));
        }
        let batch = encode(&ops, &no_names, None).unwrap();
        let with_position: Vec<u32> = messages(batch.bytes())
            .iter()
            .filter(|m| kind(m.0) == sys::NFT_MSG_NEWRULE)
            .filter_map(|m| attr(&m.3[4..], sys::NFTA_RULE_POSITION_ID))
            .map(|v| u32::from_be_bytes(v.try_into().unwrap()))
            .collect();
        assert_eq!(with_position.len(), 4);
        // Inserts carry no NLM_F_APPEND.
        for m in messages(batch.bytes()) {
            if kind(m.0) == sys::NFT_MSG_NEWRULE {
                let inserted = attr(&m.3[4..], sys::NFTA_RULE_POSITION_ID).is_some();
                assert_eq!(m.1 & NLM_F_APPEND == 0, inserted);
            }
        }
    }

    #[test]
    fn an_unknown_name_encodes_nothing() {
        let mut cfg = base();
        cfg.owner_groups = OwnerGroups::Only(vec![Owner::Name("java".into())]);
        let ruleset = plan(&cfg);
        let ops = transaction(&ruleset, None);
        assert_eq!(
            encode(&ops, &no_names, None),
            Err(EncodeError::UnknownOwner {
                kind: OwnerKind::Gid,
                name: "java".into()
            })
        );
        assert_eq!(
            EncodeError::UnknownOwner {
                kind: OwnerKind::Gid,
                name: "java".into()
            }
            .to_string(),
            "no group named \"java\" in /etc/group"
        );
        let java = |kind: OwnerKind, name: &str| {
            (kind == OwnerKind::Gid && name == "java").then_some(20001)
        };
        assert!(encode(&ops, &java, None).is_ok());
    }

    #[test]
    fn ranges_merge_overlapping_and_adjacent_networks() {
        let nets: Vec<IpNet> = [
            "192.0.3.0/24",
            "10.0.0.0/8",
            "192.0.2.0/24",
            "10.1.0.0/16",
            "203.0.113.7/32",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        assert_eq!(
            merged_ranges(&nets),
            [
                (0x0a00_0000, 0x0aff_ffff),
                (0xc000_0200, 0xc000_03ff),
                (0xcb00_7107, 0xcb00_7107)
            ]
        );
    }

    #[test]
    fn interval_elements_as_nft_writes_them() {
        let keys = |ranges: &[(u128, u128)]| {
            interval_elements(ranges, 4)
                .iter()
                .map(|e| {
                    (
                        u32::from_be_bytes(e.key.clone().try_into().unwrap()),
                        e.interval_end,
                        e.open,
                    )
                })
                .collect::<Vec<_>>()
        };
        // An end at zero, then start and one-past-the-end for each range.
        assert_eq!(
            keys(&[(10, 19)]),
            [(0, true, false), (10, false, false), (20, true, false)]
        );
        // Starting at zero: no end there. Running to the last address: marked open.
        assert_eq!(
            keys(&[(0, 9), (0xffff_fff0, 0xffff_ffff)]),
            [
                (0, false, false),
                (10, true, false),
                (0xffff_fff0, false, true)
            ]
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn set_metadata_is_nfts() {
        // Captured from `nft --debug=mnl` (nftables 1.0.6) for `tcp dport { 53, 15008 }`
        // and `ip daddr { 10.0.0.0/8, 192.0.2.0/24 }`.
        assert_eq!(
            set_userdata(false, sys::PROTO_DESC_TCP, sys::TH_DPORT),
            [
                0x00, 0x04, 0x02, 0x00, 0x00, 0x00, 0x03, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00,
                0x01, 0x0c, 0x00, 0x04, 0x08, 0x00, 0x00, 0x00, 0x01, 0x04, 0x02, 0x00, 0x00, 0x00
            ]
        );
        assert_eq!(
            set_userdata(true, sys::PROTO_DESC_IP, sys::IPHDR_DADDR),
            [
                0x00, 0x04, 0x02, 0x00, 0x00, 0x00, 0x02, 0x04, 0x01, 0x00, 0x00, 0x00, 0x03, 0x14,
                0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x0c, 0x00, 0x00, 0x00,
                0x01, 0x04, 0x0c, 0x00, 0x00, 0x00
            ]
        );
    }

    #[test]
    fn large_sets_are_split_across_messages() {
        let mut cfg = base();
        cfg.outbound_exclude = (0..4000u32)
            .map(|i| IpNet::V4(ipnet::Ipv4Net::new((0x0a00_0000 + i * 4).into(), 31).unwrap()))
            .collect();
        let ruleset = plan_with(&cfg, PlanOptions { match_sets: true });
        let ops = transaction(&ruleset, Some(&ExistingTables::default()));
        let batch = encode(&ops, &no_names, None).unwrap();
        let msgs = messages(batch.bytes());
        let element_messages: Vec<_> = msgs
            .iter()
            .filter(|m| kind(m.0) == sys::NFT_MSG_NEWSETELEM)
            .collect();
        assert!(element_messages.len() > 1);
        let elements: usize = element_messages
            .iter()
            .map(|m| attrs(attr(&m.3[4..], sys::NFTA_SET_ELEM_LIST_ELEMENTS).unwrap()).len())
            .sum();
        assert_eq!(elements, 1 + 2 * 4000);
        for m in element_messages {
            assert!(m.3.len() < ELEMENTS_BYTES_PER_MESSAGE + 512);
        }
    }
}
