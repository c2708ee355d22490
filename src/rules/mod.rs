//! The ruleset: Istio's steps for a `Config`, whatever the backend (`capture`, over the
//! values in `decisions`); a typed model (`model`), the planner that writes the steps into it
//! (`plan`), and the renderers that turn it into text (`iptables`, `routes`); `nft` is the
//! same for Istio's native nftables backend.

mod builder;
pub mod capture;
pub mod decisions;
pub mod ipset;
pub mod iptables;
pub mod model;
pub mod nft;
pub mod plan;
pub mod routes;

pub use model::Ruleset;
pub use plan::{plan, plan_with};

/// How the planners write long lists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// `--match-sets`: each list of CIDRs or ports (excluded or included, outbound or
    /// inbound) becomes one rule matching a set (an nftables interval set; a named ipset on
    /// iptables) instead of one rule per entry, so what a new connection costs does not grow
    /// with the lists. Same verdicts: the rules a list expands to all end alike, so one rule
    /// over their union, in the same place, decides the same. A list of one stays a plain
    /// match.
    pub match_sets: bool,
}
