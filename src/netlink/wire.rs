//! The netlink wire format: message headers, attributes, the writer that builds messages
//! and the parser of acknowledgements. Pure: no I/O, so the nf_tables and ipset encoders
//! use it, and it is tested without a kernel.

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
/// ipset wants its integers flagged as big-endian.
pub(crate) const NLA_F_NET_BYTEORDER: u16 = 0x4000;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const HEADER_LEN: usize = 16;

pub(crate) const NFNL_SUBSYS_IPSET: u16 = 6;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 0x11;

/// Address family numbers as netlink uses them (AF_INET, AF_INET6; also NFPROTO_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NlFamily {
    Inet = 2,
    Inet6 = 10,
}

pub(crate) fn align4(len: usize) -> usize {
    (len + 3) & !3
}

pub(crate) fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
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
pub fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_attributes_stop_iteration() {
        assert_eq!(attrs(&[200, 0, 1, 0, 9]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0]).count(), 0);
    }
}
