//! Entering the pod's network namespace (`--network-namespace`, and the CNI plugin's
//! `CNI_NETNS`), and with it the user namespace that owns it when that is not ours.
//!
//! A pod with `hostUsers: false` has a network namespace owned by the pod's user namespace.
//! The kernel reads uids and gids in owner matches (`-m owner --uid-owner 1337`) in the
//! user namespace of whoever writes the rule, and refuses the rule (EINVAL) unless that is
//! the network namespace's own. So a CNI plugin, running as the node's root, has to become
//! the pod's root to write them: then 1337 means the pod's istio-proxy, as it does for an
//! init container.

use std::fs::{File, Metadata};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    // The cause is in the message, so not a `source` too (see `error::report`).
    #[error("cannot open network namespace {}: {error}", path.display())]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot enter network namespace {} (needs CAP_SYS_ADMIN): {errno}", path.display())]
    Enter {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error(
        "cannot become root of the user namespace that owns network namespace {} \
         (a pod with hostUsers: false; needs CAP_SYS_ADMIN and CAP_SETUID there): {step}: {errno}",
        path.display()
    )]
    EnterOwner {
        path: PathBuf,
        step: &'static str,
        errno: nix::errno::Errno,
    },
}

/// Moves the calling thread into the namespace at `path`, and, when another user namespace
/// owns it, into that one as its root. Called before any thread or child process exists,
/// so everything meshinit does afterwards happens there.
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let netns = File::open(path).map_err(|error| NetnsError::Open {
        path: path.to_owned(),
        error,
    })?;
    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
        path: path.to_owned(),
        errno,
    })?;
    let fail = |step| {
        move |errno| NetnsError::EnterOwner {
            path: path.to_owned(),
            step,
            errno,
        }
    };
    let owner = File::from(owning_user_namespace(&netns).map_err(fail("NS_GET_USERNS"))?);
    if is_current_user_namespace(&owner) {
        return Ok(());
    }
    setns(owner.as_fd(), CloneFlags::CLONE_NEWUSER).map_err(fail("setns"))?;
    // The node's root is no uid in the pod's namespace; as the pod's root, the restores this
    // process starts keep their capabilities across exec, as they do in an init container.
    match setgroups(&[]) {
        // Refused where the namespace's setgroups is "deny": the node's groups then stay,
        // unmapped, which grants nothing there.
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(errno) => return Err(fail("setgroups")(errno)),
    }
    let root_gid = Gid::from_raw(0);
    setresgid(root_gid, root_gid, root_gid).map_err(fail("setresgid 0"))?;
    let root_uid = Uid::from_raw(0);
    setresuid(root_uid, root_uid, root_uid).map_err(fail("setresuid 0"))?;
    tracing::info!(netns = %path.display(), "entered the user namespace that owns the network namespace, as its root");
    Ok(())
}

// NS_GET_USERNS (linux/nsfs.h): _IO(0xb7, 0x1).
nix::ioctl_none!(ns_get_userns, 0xb7, 0x1);

/// The user namespace that owns the namespace `ns` refers to.
fn owning_user_namespace(ns: &File) -> nix::Result<OwnedFd> {
    // SAFETY: NS_GET_USERNS takes no argument and, on success, returns a new file
    // descriptor that nothing else owns.
    let fd = unsafe { ns_get_userns(ns.as_raw_fd()) }?;
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_current_user_namespace(userns: &File) -> bool {
    match (
        userns.metadata(),
        namespace_id(Path::new("/proc/thread-self/ns/user")),
    ) {
        (Ok(meta), Ok(ours)) => identity(&meta) == ours,
        _ => false,
    }
}

/// A namespace's identity: the device and inode of its nsfs file. Different paths (a
/// `/proc` link, a path through `..`, a bind mount) name the same namespace when these agree.
pub fn namespace_id(path: &Path) -> std::io::Result<(u64, u64)> {
    std::fs::metadata(path).map(|meta| identity(&meta))
}

fn identity(meta: &Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}
