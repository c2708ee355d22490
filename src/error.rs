//! The top-level error: one variant per layer, and the exit code for each class.

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error("--native-nftables is not supported by this meshinit version yet; leave it out to use iptables")]
    NativeNftablesUnsupported,

    #[error("IPv6 is off for this pod, so there is no IPv6 ruleset; pass --ipv6 to plan one")]
    Ipv6Disabled,

    #[error("applying rules is not available in this build yet; use `meshinit print`")]
    ApplyUnavailable,

    #[error("writing the output failed")]
    Output(#[source] std::io::Error),
}

/// Exit codes, documented in the README. Istio exits 1 for every failure but validation.
pub mod exit {
    /// Bad flags, environment or annotations; nothing was changed.
    pub const BAD_INPUT: u8 = 1;
    /// A request meshinit cannot serve in this build or on this machine.
    pub const UNSUPPORTED: u8 = 3;
    /// Writing output failed.
    pub const IO: u8 = 4;
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Ipv6Disabled => exit::BAD_INPUT,
            Error::ApplyUnavailable => exit::UNSUPPORTED,
            Error::NativeNftablesUnsupported => exit::UNSUPPORTED,
            Error::Output(_) => exit::IO,
        }
    }
}
