//! What an apply or cleanup holds from before it changes anything until it is done,
//! rollback included, and never beyond the process: so it is either never started or
//! never interleaved with another.
//!
//! - [`RunLock`]: one meshinit run at a time in a network namespace (an init container
//!   restarted while a CNI plugin acts, a CNI ADD retried). An abstract unix socket name is
//!   scoped to its network namespace and released by the kernel when the last process
//!   holding the socket ends, so it needs no file on a path pods may not share, and a
//!   killed run never leaves it behind.
//! - [`XtablesLock`]: iptables-legacy's node-wide lock, taken once for the whole apply
//!   instead of by each `iptables-restore` in turn, so that a rollback can never find it
//!   taken by someone else half way. The restores meshinit starts are then pointed at a
//!   private [`ChildLock`] (`XTABLES_LOCKFILE`), which they get at once. An apply that is
//!   one commit (one restore of one table into a fresh namespace, nothing after it to roll
//!   back) has no "half way": its restore is pointed at the node's lock file and takes the
//!   lock around that commit only, as every iptables command does, so pods starting
//!   together queue for the commit alone and not for meshinit's own start and exit.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr};

use super::ApplyError;

/// The abstract socket name that marks a meshinit run in progress in this namespace.
const RUN_LOCK_NAME: &[u8] = b"meshinit/run";

/// Held while this process (or anything it started) lives.
#[derive(Debug)]
pub struct RunLock {
    _socket: OwnedFd,
}

impl RunLock {
    /// Waits, at most `wait`, until no other meshinit run applies or cleans up in the
    /// current network namespace.
    pub fn acquire(wait: Duration) -> Result<RunLock, ApplyError> {
        let address = UnixAddr::new_abstract(RUN_LOCK_NAME).map_err(run_lock_error)?;
        // Inherited by the processes meshinit starts: a restore or nft left running by a
        // killed meshinit keeps the namespace until it has finished too.
        let socket = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .map_err(run_lock_error)?;
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(1);
        loop {
            match bind(socket.as_raw_fd(), &address) {
                Ok(()) => return Ok(RunLock { _socket: socket }),
                Err(Errno::EADDRINUSE) if Instant::now() < deadline => {
                    if pause == Duration::from_millis(1) {
                        tracing::info!(
                            "another meshinit run is at work in this network namespace; waiting"
                        );
                    }
                    std::thread::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(Errno::EADDRINUSE) => return Err(ApplyError::RunInProgress { wait }),
                Err(errno) => return Err(run_lock_error(errno)),
            }
        }
    }
}

fn run_lock_error(errno: Errno) -> ApplyError {
    ApplyError::RunLock { errno }
}

/// iptables-legacy's lock, held for the whole apply.
#[derive(Debug)]
pub struct XtablesLock {
    _held: Flock<File>,
}

impl XtablesLock {
    /// Takes the lock at `path` (iptables' `XTABLES_LOCKFILE`, or its default), waiting at
    /// most `wait` for whoever holds it.
    pub fn acquire(path: &Path, wait: Duration) -> Result<XtablesLock, ApplyError> {
        // Inherited by the processes meshinit starts, so that a restore left running by a
        // killed meshinit still holds the lock until it ends.
        let file = open_lock_file(path)?;
        let held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => held,
            Err((file, Errno::EWOULDBLOCK)) => {
                tracing::info!(lock = %path.display(), "the xtables lock is held; waiting");
                wait_for_lock(file, wait).ok_or_else(|| ApplyError::LockTimeout {
                    path: path.to_owned(),
                    wait,
                })?
            }
            Err((_, errno)) => {
                return Err(ApplyError::LockFile {
                    path: path.to_owned(),
                    error: std::io::Error::from(errno),
                })
            }
        };
        Ok(XtablesLock { _held: held })
    }
}

/// The lock file the restores meshinit starts are pointed at (`XTABLES_LOCKFILE`): a
/// descriptor they inherit and open anew through /proc, so they need no writable /run and
/// no path of their own. Either a private file nobody else has, which they get at once,
/// while meshinit holds the node's lock for them ([`XtablesLock`]); or the node's lock file
/// itself, for a run that is one commit, whose restore then takes the lock around that
/// commit as any iptables command does.
#[derive(Debug)]
pub struct ChildLock {
    fd: OwnedFd,
}

impl ChildLock {
    /// An anonymous file: the restores lock it without waiting for anyone.
    pub fn private() -> Result<ChildLock, ApplyError> {
        nix::sys::memfd::memfd_create(
            c"meshinit-xtables-lock",
            nix::sys::memfd::MemFdCreateFlag::empty(),
        )
        .map(|fd| ChildLock { fd })
        .map_err(|errno| ApplyError::LockFile {
            path: PathBuf::from("memfd:meshinit-xtables-lock"),
            error: std::io::Error::from(errno),
        })
    }

    /// The node's lock file at `path`, opened (created if missing) as iptables opens it,
    /// but not locked: the restores lock it themselves.
    pub fn node(path: &Path) -> Result<ChildLock, ApplyError> {
        let file = open_lock_file(path)?;
        Ok(ChildLock {
            fd: OwnedFd::from(file),
        })
    }

    /// `XTABLES_LOCKFILE` for the processes meshinit starts: they inherit the descriptor
    /// and open it anew through /proc.
    pub fn path_for_children(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Opens the lock file as iptables does (created if missing, never written), inheritable
/// by the processes meshinit starts.
fn open_lock_file(path: &Path) -> Result<File, ApplyError> {
    let file_error = |error| ApplyError::LockFile {
        path: path.to_owned(),
        error,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_CREAT)
        .mode(0o600)
        .open(path)
        .map_err(file_error)?;
    inheritable(&file).map_err(file_error)?;
    Ok(file)
}

fn inheritable(fd: &impl AsRawFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
        .map(drop)
        .map_err(std::io::Error::from)
}

/// A blocking `flock`, so waiters queue in the kernel as iptables' own `--wait` does,
/// bounded by `wait`. A lock obtained after giving up is dropped with the channel's
/// message, which releases it.
fn wait_for_lock(file: File, wait: Duration) -> Option<Flock<File>> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(held) = Flock::lock(file, FlockArg::LockExclusive) {
            let _ = sender.send(held);
        }
    });
    receiver.recv_timeout(wait).ok()
}
