//! Istio's iptables ruleset: a typed model (`model`), the planner that fills it from
//! Istio's steps (`plan`, through `builder`, which resolves Istio's appends and positional
//! inserts), its `iptables-restore` text (`render`), the named ipsets of `--match-sets`
//! (`ipset`) and the TPROXY routing as `ip` commands for the dry-run (`routes`).
//!
//! Pure, like the nftables side: no I/O here; `apply::iptables` runs the restores.

mod builder;
pub mod ipset;
pub mod model;
pub mod plan;
pub mod render;
pub mod routes;

pub use model::Ruleset;
pub use plan::{plan, plan_with, PlanOptions};
