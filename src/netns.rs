//! Entering the pod's network namespace (`--network-namespace`).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

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
}

/// Moves the calling thread into the namespace at `path`. Called before any thread or
/// child process exists, so everything meshinit does afterwards happens there.
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|error| NetnsError::Open {
        path: path.to_owned(),
        error,
    })?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
        path: path.to_owned(),
        errno,
    })
}
