//! The top-level error: one variant per layer, and the exit code for each class.

use crate::apply::ApplyError;
use crate::caps::CapsError;
use crate::config::ConfigError;
use crate::engine::EngineError;
use crate::netns::NetnsError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error(transparent)]
    Caps(#[from] CapsError),

    #[error(transparent)]
    Netns(#[from] NetnsError),

    #[error(transparent)]
    Apply(#[from] ApplyError),

    #[error(transparent)]
    Validation(#[from] crate::validate::ValidationError),

    /// `EngineError::Ipv6Disabled`, kept apart for its exit code.
    #[error(transparent)]
    Ipv6Disabled(EngineError),

    /// Already reported to the runtime as CNI error JSON on stdout.
    #[error("CNI command failed (details in the JSON result on stdout)")]
    CniFailed(u8),

    #[error("writing the output failed")]
    Output(#[source] std::io::Error),

    /// `check`: the namespace could not be compared with the plan.
    #[error(transparent)]
    Check(Box<crate::engine::DriftError>),

    /// `check`: the namespace differs from the plan (each difference is on stdout).
    #[error("capture rules drifted ({0} difference(s) from the plan, listed on stdout)")]
    Drifted(usize),
}

impl From<EngineError> for Error {
    fn from(err: EngineError) -> Error {
        match err {
            EngineError::Config(err) => Error::Config(err),
            EngineError::Caps(err) => Error::Caps(err),
            EngineError::Apply(err) => Error::Apply(err),
            EngineError::Ipv6Disabled => Error::Ipv6Disabled(err),
        }
    }
}

impl From<crate::engine::DriftError> for Error {
    fn from(err: crate::engine::DriftError) -> Error {
        Error::Check(Box::new(err))
    }
}

/// The error and each of its causes, once each: `a: b: c`.
///
/// Each error type either shows its cause in its own message or returns it as its
/// `source()`, never both (the Rust API guidelines' rule), so walking the sources repeats
/// nothing. Messages that embed their cause are the ones also shown alone, as the CNI
/// plugin's error details are.
pub fn report(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Exit codes, documented in the README. Istio exits 1 for every failure but validation
/// (126); meshinit keeps 1 for bad input and splits the rest by what the user must fix.
pub mod exit {
    /// Bad flags, environment or annotations; nothing was changed.
    pub const BAD_INPUT: u8 = 1;
    /// The container lacks something: a capability, an iptables binary, the namespace.
    pub const ENVIRONMENT: u8 = 2;
    /// The kernel refused the rules; whatever was applied was rolled back.
    pub const APPLY_FAILED: u8 = 3;
    /// Writing output failed.
    pub const IO: u8 = 4;
    /// `check`: the namespace differs from the plan.
    pub const DRIFTED: u8 = 5;
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Ipv6Disabled(_) => exit::BAD_INPUT,
            Error::Caps(_) | Error::Netns(_) => exit::ENVIRONMENT,
            Error::Apply(
                ApplyError::MissingBinary { .. }
                | ApplyError::Spawn { .. }
                | ApplyError::LockFile { .. }
                | ApplyError::RunLock { .. },
            ) => exit::ENVIRONMENT,
            Error::Apply(_) => exit::APPLY_FAILED,
            Error::Validation(err) => err.exit_code(),
            Error::Output(_) => exit::IO,
            Error::Check(_) => exit::ENVIRONMENT,
            Error::Drifted(_) => exit::DRIFTED,
            Error::CniFailed(code) => *code,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use super::*;
    use crate::netlink::NetlinkError;
    use crate::rules::iptables::model::Family;

    fn not_found() -> io::Error {
        io::Error::from(io::ErrorKind::NotFound)
    }

    /// One error of every kind that carries a cause, in each layer, as `main` gets it.
    fn errors_with_causes() -> Vec<(Error, String)> {
        let cause = not_found().to_string();
        let errno = nix::errno::Errno::EPERM.to_string();
        vec![
            (
                ConfigError::AnnotationsUnreadable {
                    path: PathBuf::from("/nonexistent"),
                    error: not_found(),
                }
                .into(),
                cause.clone(),
            ),
            (
                NetnsError::Open {
                    path: PathBuf::from("/nonexistent"),
                    error: not_found(),
                }
                .into(),
                cause.clone(),
            ),
            (
                NetnsError::Enter {
                    path: PathBuf::from("/run/netns/pod"),
                    errno: nix::errno::Errno::EPERM,
                }
                .into(),
                errno.clone(),
            ),
            (
                ApplyError::Spawn {
                    program: "iptables-restore".into(),
                    error: not_found(),
                }
                .into(),
                cause.clone(),
            ),
            (
                ApplyError::Netlink(NetlinkError {
                    what: "dump rules",
                    errno: nix::errno::Errno::EPERM,
                })
                .into(),
                errno.clone(),
            ),
            (
                ApplyError::RollbackFailed {
                    failure: Box::new(ApplyError::Spawn {
                        program: "ip6tables-restore".into(),
                        error: not_found(),
                    }),
                    family: Family::V4,
                    rollback: Box::new(ApplyError::Save {
                        program: "iptables-save".into(),
                        stderr: "locked".into(),
                    }),
                }
                .into(),
                cause.clone(),
            ),
            (
                ApplyError::LockFile {
                    path: PathBuf::from("/run/xtables.lock"),
                    error: not_found(),
                }
                .into(),
                cause.clone(),
            ),
            (
                ApplyError::Several(vec![
                    ApplyError::Spawn {
                        program: "iptables-save".into(),
                        error: not_found(),
                    },
                    ApplyError::RunLock {
                        errno: nix::errno::Errno::EPERM,
                    },
                ])
                .into(),
                cause.clone(),
            ),
            (Error::Output(not_found()), cause),
        ]
    }

    /// Issue 11 §6: `print --annotations /nonexistent` said "No such file or directory (os
    /// error 2): No such file or directory (os error 2)". Every cause is reported once, and
    /// no error both shows its cause and returns it as its source.
    #[test]
    fn report_shows_each_cause_once() {
        for (err, cause) in errors_with_causes() {
            let report = report(&err);
            assert_eq!(
                report.matches(&cause).count(),
                1,
                "{cause:?} not exactly once in: {report}"
            );
            let mut link: &dyn std::error::Error = &err;
            while let Some(source) = link.source() {
                assert!(
                    !link.to_string().contains(&source.to_string()),
                    "{link} shows its source and returns it too"
                );
                link = source;
            }
        }
    }

    /// The message alone (what the CNI plugin puts in its error details) keeps the cause
    /// of errors that show it, so nothing is lost by not returning it as a source.
    #[test]
    fn messages_that_show_their_cause_keep_it() {
        for (err, cause) in errors_with_causes() {
            if std::error::Error::source(&err).is_none() {
                assert!(err.to_string().contains(&cause), "{err}");
            }
        }
    }
}
