//! The top-level error: one variant per layer, and the exit code for each class.

use crate::apply::ApplyError;
use crate::caps::CapsError;
use crate::config::ConfigError;
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

    #[error("IPv6 is off for this pod, so there is no IPv6 ruleset; pass --ipv6 to plan one")]
    Ipv6Disabled,

    /// Already reported to the runtime as CNI error JSON on stdout.
    #[error("CNI command failed (details in the JSON result on stdout)")]
    CniFailed(u8),

    #[error("writing the output failed")]
    Output(#[source] std::io::Error),
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
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Ipv6Disabled => exit::BAD_INPUT,
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
            Error::CniFailed(code) => *code,
        }
    }
}
