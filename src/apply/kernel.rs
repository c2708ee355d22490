//! What the kernel has and holds in this network namespace, asked of it without launching
//! anything; both backends choose and explain with these.
//!
//! Whether iptables-legacy holds anything: `IPT_SO_GET_INFO` (`IP6T_SO_GET_INFO`), which
//! iptables itself uses, gives each table's entry count. A legacy table exists as soon as
//! anything looked at it (`iptables-legacy -L`, a save, a restore that failed and was rolled
//! back), and stays, empty, for the namespace's life. Choosing iptables-legacy because such a
//! table exists strands pods on kernels without the legacy NAT table (Amazon Linux 2023's):
//! the first failed attempt leaves an empty `mangle` table, so every retry chooses legacy
//! again. Only a table holding more than its built-in chains' policies (a rule, or a chain of
//! someone's) counts.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

use crate::netlink::Socket;
use crate::rules::iptables::model::Family;

/// `IPT_SO_GET_INFO` and `IP6T_SO_GET_INFO`: `IPT_BASE_CTL` (64) + 0.
const SO_GET_INFO: libc::c_int = 64;

/// `struct ipt_getinfo` (the same layout as `ip6t_getinfo`).
#[repr(C)]
struct GetInfo {
    name: [u8; 32],
    valid_hooks: u32,
    hook_entry: [u32; 5],
    underflow: [u32; 5],
    num_entries: u32,
    size: u32,
}

/// Whether any legacy table of `family` in this namespace holds a rule or a chain beyond
/// its built-in ones. Tables not yet made are not asked for (asking would make them).
/// When the kernel cannot say, a table that exists counts as in use, as iptables' own
/// detection would have it.
pub fn legacy_rules_present(family: Family) -> bool {
    let file = match family {
        Family::V4 => "/proc/net/ip_tables_names",
        Family::V6 => "/proc/net/ip6_tables_names",
    };
    let Ok(names) = std::fs::read_to_string(file) else {
        return false;
    };
    let names: Vec<&str> = names.split_whitespace().collect();
    if names.is_empty() {
        return false;
    }
    let Some(socket) = raw_socket(family) else {
        return true;
    };
    names
        .iter()
        .any(|name| table_info(&socket, family, name).is_none_or(holds_more_than_builtins))
}

/// A table with only its built-in chains has one entry per hook (the policy) and one
/// closing entry; each rule adds one, each user chain two.
fn holds_more_than_builtins(info: GetInfo) -> bool {
    info.num_entries > info.valid_hooks.count_ones() + 1
}

fn raw_socket(family: Family) -> Option<OwnedFd> {
    let domain = match family {
        Family::V4 => libc::AF_INET,
        Family::V6 => libc::AF_INET6,
    };
    // SAFETY: socket(2) with constant arguments; the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    // SAFETY: a descriptor socket(2) just returned, owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn table_info(socket: &OwnedFd, family: Family, name: &str) -> Option<GetInfo> {
    let level = match family {
        Family::V4 => libc::IPPROTO_IP,
        Family::V6 => libc::IPPROTO_IPV6,
    };
    let mut info = GetInfo {
        name: [0; 32],
        valid_hooks: 0,
        hook_entry: [0; 5],
        underflow: [0; 5],
        num_entries: 0,
        size: 0,
    };
    let bytes = name.as_bytes();
    // The kernel wants a NUL-terminated name of at most 31 bytes.
    if bytes.len() >= info.name.len() {
        return None;
    }
    info.name[..bytes.len()].copy_from_slice(bytes);
    let mut len = std::mem::size_of::<GetInfo>() as libc::socklen_t;
    // SAFETY: `info` is a live, writable `ipt_getinfo` of `len` bytes for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            SO_GET_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info)
}

/// Whether the kernel refuses nf_tables' netlink messages, as one built without nf_tables
/// does (nfnetlink answers EINVAL for a subsystem it lacks, and without nfnetlink there is
/// no such protocol): then neither iptables-nft nor native nftables can work, and legacy
/// may. The chains a successful dump lists are kept for the run.
pub(super) fn nf_tables_missing(chains: &mut Option<Vec<(u8, String, String)>>) -> bool {
    use nix::errno::Errno;
    match Socket::netfilter().and_then(|mut s| s.nftables_chains()) {
        Ok(found) => {
            *chains = Some(found);
            false
        }
        Err(err) => matches!(
            err.errno,
            Errno::EINVAL | Errno::EOPNOTSUPP | Errno::EPROTONOSUPPORT
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(valid_hooks: u32, num_entries: u32) -> GetInfo {
        GetInfo {
            name: [0; 32],
            valid_hooks,
            hook_entry: [0; 5],
            underflow: [0; 5],
            num_entries,
            size: 0,
        }
    }

    #[test]
    fn builtin_chains_alone_are_not_use() {
        // filter: INPUT, FORWARD, OUTPUT (hooks 1, 2, 3), their policies and the end.
        assert!(!holds_more_than_builtins(info(0b01110, 4)));
        // mangle: all five hooks.
        assert!(!holds_more_than_builtins(info(0b11111, 6)));
        // One rule.
        assert!(holds_more_than_builtins(info(0b01110, 5)));
        // nat with one user chain (its head and its RETURN).
        assert!(holds_more_than_builtins(info(0b11011, 7)));
    }
}
