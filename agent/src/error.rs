//! One error enum per layer, each naming the file, directory or object involved, so a
//! message says what to look at rather than only "permission denied".

use std::path::PathBuf;

/// Installing, checking or removing the plugin and its CNI configuration entry.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "writing {path}: {source} (is the hostPath mounted read-write, and is the agent root?)"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid CNI configuration: {reason}; left as it is (the runtime cannot load it either: fix or remove it)")]
    Unparsable { path: PathBuf, reason: String },
    #[error("no CNI network configuration (.conflist, .conf or .json) in {dir}: waiting for the primary CNI to write one")]
    NoPrimary { dir: PathBuf },
    #[error("the configured cniConfFileName {path} does not exist: waiting for it")]
    ConfiguredMissing { path: PathBuf },
    #[error("the plugin to install, {path}, is missing or unreadable: {source}")]
    PluginSource {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl InstallError {
    /// A state the agent waits out (the primary CNI has not written its file yet), as
    /// opposed to one that needs a person.
    pub fn is_waiting(&self) -> bool {
        matches!(
            self,
            InstallError::NoPrimary { .. } | InstallError::ConfiguredMissing { .. }
        )
    }
}

/// Settings given on the command line or in the environment that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--{flag} {value:?}: {reason}")]
pub struct SettingsError {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

/// Acting on a pod that raced the agent.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("{action} pod {namespace}/{name}: {source}")]
    Api {
        action: &'static str,
        namespace: String,
        name: String,
        source: Box<kube::Error>,
    },
    #[error("connecting to the Kubernetes API: {0}")]
    Client(#[source] Box<kube::Error>),
}

/// The metrics and readiness endpoint.
#[derive(Debug, thiserror::Error)]
#[error("listening on {addr} for metrics and /readyz: {source}")]
pub struct ServeError {
    pub addr: String,
    pub source: std::io::Error,
}

/// Everything `main` can stop on.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Repair(#[from] RepairError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("watching {dir} for changes: {source}")]
    Watch { dir: PathBuf, source: nix::Error },
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}
