//! meshinit: Istio's `istio-init`, done as a small static binary.
//!
//! Layers, each unaware of the ones above it: `config` (flags, environment and annotations
//! → a validated `Config`), `rules` (`Config` → a typed ruleset → text), `app` (wires them
//! to the commands). Only `app` and the system-facing modules touch the machine.

pub mod app;
pub mod apply;
pub mod caps;
pub mod cli;
pub mod cni;
pub mod config;
pub mod error;
pub mod explain;
pub mod logging;
pub mod netlink;
pub mod netns;
pub mod rules;
pub mod validate;

pub use error::Error;
