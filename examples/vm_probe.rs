//! The checker inside the kernel matrix's VM guests (tests/vm/run.sh): the integration
//! tests' helper roles (tests/integration/support/roles.rs), the same code, as a program of
//! its own, since a guest has no test binary:
//!
//!   vm_probe [--as UID:GID] serve NAME LISTENER…
//!   vm_probe [--as UID:GID] client tcp|udp ADDR
//!
//! with the role module's output (`ready`; `REPLY by=… local=… orig=… client=…`). `--as`
//! plays the role as that user and group (no supplementary groups), as the tests' launcher
//! does: the guest has no setpriv that can (busybox's cannot). With uid 0 the process keeps
//! root's capabilities, as Istio's proxy under TPROXY (uid 0, gid 1337).
//!
//! An example, not a workspace member or a binary of meshinit's, so that meshinit's release
//! build neither builds nor links it; built static for each arch by tests/vm/run.sh.

use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};

// The role module also holds the test binary's entry point and constants the tests use.
#[allow(dead_code, unused_imports)]
#[path = "../tests/integration/support/roles.rs"]
mod roles;

fn main() {
    let mut words: Vec<String> = std::env::args().skip(1).collect();
    if words.first().map(String::as_str) == Some("--as") {
        let Some((uid, gid)) = words.get(1).and_then(|ids| ids.split_once(':')) else {
            eprintln!("vm_probe: --as takes UID:GID");
            std::process::exit(2);
        };
        let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse()) else {
            eprintln!("vm_probe: --as takes numeric UID:GID");
            std::process::exit(2);
        };
        let switched = setgroups(&[])
            .and_then(|()| setgid(Gid::from_raw(gid)))
            .and_then(|()| setuid(Uid::from_raw(uid)));
        if let Err(err) = switched {
            eprintln!("vm_probe: cannot become {uid}:{gid}: {err}");
            std::process::exit(2);
        }
        words.drain(..2);
    }
    std::process::exit(roles::play(&words.join(" ")));
}
