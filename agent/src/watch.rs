//! Notices changes to the CNI configuration directory (a primary CNI rewriting its file on
//! restart, another file appearing) through inotify, so the entry is put back at once
//! rather than at the next periodic check.

use crate::error::AgentError;
use crate::files::OWN_PREFIX;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::path::Path;
use tokio::sync::mpsc::UnboundedSender;

/// Starts a thread that sends `()` for every change in `dir` not made to the agent's own
/// files. It ends when the receiver is dropped (at its next event).
pub fn spawn(dir: &Path, changed: UnboundedSender<()>) -> Result<(), AgentError> {
    let watch_err = |source| AgentError::Watch {
        dir: dir.to_owned(),
        source,
    };
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(watch_err)?;
    inotify
        .add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF,
        )
        .map_err(watch_err)?;
    std::thread::Builder::new()
        .name("cni-conf-watch".into())
        .spawn(move || loop {
            let events = match inotify.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(err) => {
                    tracing::error!(%err, "reading inotify events; falling back to periodic checks");
                    return;
                }
            };
            let relevant = events.iter().any(|event| {
                event
                    .name
                    .as_ref()
                    .is_none_or(|name| !name.to_string_lossy().starts_with(OWN_PREFIX))
            });
            if relevant && changed.send(()).is_err() {
                return;
            }
        })
        .map_err(AgentError::Runtime)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_rewrite_is_reported_and_our_own_files_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        spawn(dir.path(), tx).expect("watching");
        std::fs::write(dir.path().join(format!("{OWN_PREFIX}.x.tmp")), "ours").expect("write");
        let quiet = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(quiet.is_err(), "the agent's own files are not a change");
        std::fs::write(dir.path().join("10-node.conflist"), "{}").expect("write");
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("reported within 2 s")
            .expect("sender alive");
    }
}
