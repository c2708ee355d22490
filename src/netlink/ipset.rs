//! nfnetlink for ipset: one acknowledged command, one dump. The messages themselves are
//! built in `apply::ipsets`.

use super::socket::Socket;
use super::wire::*;

impl Socket {
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
}
