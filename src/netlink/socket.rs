//! The one place netlink does I/O: a socket of one protocol, sending requests and reading
//! their replies and acknowledgements.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

use super::wire::*;

/// A netlink socket of one protocol.
pub struct Socket {
    pub(super) fd: OwnedFd,
    pub(super) seq: u32,
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

    pub(super) fn open(protocol: SockProtocol) -> Result<Socket, NetlinkError> {
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

    pub(super) fn push_message(
        &mut self,
        buf: &mut Vec<u8>,
        kind: u16,
        flags: u16,
        payload: &[u8],
    ) -> u32 {
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

    /// Sends `bytes` (whole messages, a batch) as one datagram.
    pub(super) fn send_datagram(&mut self, bytes: &[u8]) -> Result<(), Errno> {
        sendto(
            self.fd.as_raw_fd(),
            bytes,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map(drop)
    }

    /// Reads one datagram into `buf`; its length.
    pub(super) fn recv_datagram(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
        recv(self.fd.as_raw_fd(), buf, MsgFlags::empty())
    }

    pub(super) fn send(&mut self, kind: u16, flags: u16, payload: &[u8]) -> Result<u32, Errno> {
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
    pub(super) fn receive(&mut self, seq: u32, each: impl FnMut(u16, &[u8])) -> Result<(), Errno> {
        self.receive_code(seq, each).map_err(Errno::from_raw)
    }

    /// `receive`, with the kernel's error code as it came: ipset's own codes lie above
    /// 4096, where `Errno` has no names.
    pub(super) fn receive_code(
        &mut self,
        seq: u32,
        mut each: impl FnMut(u16, &[u8]),
    ) -> Result<(), i32> {
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

    pub(super) fn request(&mut self, kind: u16, flags: u16, payload: &[u8]) -> Result<(), Errno> {
        let seq = self.send(kind, flags | NLM_F_ACK, payload)?;
        self.receive(seq, |_, _| {})
    }

    pub(super) fn dump(&mut self, kind: u16, payload: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, Errno> {
        let seq = self.send(kind, NLM_F_DUMP, payload)?;
        let mut out = Vec::new();
        self.receive(seq, |k, p| out.push((k, p.to_vec())))?;
        Ok(out)
    }

    /// Adds something that may already exist; `Ok(false)` when it did.
    pub(super) fn ensure(
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
    pub(super) fn remove(
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
}

pub(super) fn libc_eproto() -> i32 {
    Errno::EPROTO as i32
}
