//! meshinit-cni's node agent: installs the plugin and its CNI configuration entry on a
//! node, keeps the entry there while the primary CNI rewrites its file, removes both on
//! termination, and repairs pods that started before it was ready (docs/cni-agent.md).

pub mod agent;
pub mod capture;
pub mod conflist;
pub mod error;
pub mod files;
pub mod http;
pub mod install;
pub mod metrics;
pub mod repair;
pub mod settings;
pub mod watch;
