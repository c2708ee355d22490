//! meshinit: Istio's `istio-init`, done as a small static binary.
//!
//! Layers, each unaware of the ones above it: `values` (the value types all share: a leaf),
//! `config` (flags, environment and annotations → a validated `Config`), `rules` (`Config`
//! → a typed ruleset → text), `apply` (ruleset → kernel, behind small traits), `engine` (the
//! backend chosen once: plan, dry-run, install, remove), and on top the commands: `app`
//! (dispatch), `explain`, `validate`, `cni`.

pub mod app;
pub mod apply;
pub mod caps;
pub mod cli;
pub mod cni;
pub mod config;
pub mod engine;
pub mod error;
pub mod explain;
pub mod logging;
pub mod netlink;
pub mod netns;
pub mod rules;
pub mod validate;
pub mod values;

pub use error::Error;
