//! nfnetlink for nf_tables: listing chains, reading the ruleset's generation, deleting a
//! table, and sending one batch (built by `rules::nft::encode`) as a single transaction.

use nix::errno::Errno;

use super::socket::{NetlinkError, Socket};
use super::wire::*;

const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;

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

impl Socket {
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
        self.send_datagram(&buf).map_err(error)?;
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
        self.send_datagram(batch)
            .map_err(|errno| error("sending the nf_tables batch", errno))?;
        let mut buf = vec![0u8; 65536];
        let mut refused = Vec::new();
        loop {
            let len = match self.recv_datagram(&mut buf) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
