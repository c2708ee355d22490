//! Errors of the config layer: every one names where the value came from and the value.

use std::fmt;
use std::path::PathBuf;

/// Where a setting's value came from, so an error points at what the user must change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag, by its long name (and short, where it has one).
    Flag {
        long: &'static str,
        short: Option<char>,
    },
    /// An environment variable.
    Env(String),
    /// A pod annotation read from `--annotations`.
    Annotation(String),
    /// A built-in default (only reachable through a bug, but named all the same).
    Default(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag {
                long,
                short: Some(short),
            } => write!(f, "--{long} (-{short})"),
            Origin::Flag { long, short: None } => write!(f, "--{long}"),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Annotation(key) => write!(f, "annotation {key}"),
            Origin::Default(name) => write!(f, "default of {name}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value {value:?} for {origin}: {reason}")]
    InvalidValue {
        origin: Origin,
        value: String,
        reason: String,
    },

    #[error(
        "{origin} lists {count} groups, but the {backend} backend can capture by at most \
         {limit} (one rule must hold them all); list fewer, or name the groups to leave out \
         in ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE instead"
    )]
    TooManyOwnerGroups {
        origin: Origin,
        count: usize,
        limit: usize,
        backend: &'static str,
    },

    #[error("{first} and {second} cannot be used together: {reason}")]
    Conflict {
        first: String,
        second: String,
        reason: String,
    },

    // The cause is part of the message, and so deliberately not a `source` (a field of that
    // name would be one): `report` walks sources, and would print it twice.
    #[error("cannot read annotations file {}: {error}", path.display())]
    AnnotationsUnreadable {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("annotations file {}, line {line}: {reason}", path.display())]
    AnnotationsMalformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    #[error("cannot detect whether the pod uses IPv6: {reason}; pass --ipv6 or --no-ipv6")]
    Ipv6Detection { reason: String },

    #[error("cannot read the DNS servers from {}: {reason}; pass --dns-servers", path.display())]
    ResolvConf { path: PathBuf, reason: String },
}

impl ConfigError {
    /// `--long VALUE` is not acceptable, for `reason`.
    pub fn invalid_flag(long: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            origin: Origin::Flag { long, short: None },
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}
