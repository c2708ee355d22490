//! The ruleset: Istio's steps for a `Config`, whatever the backend (`capture`, over the
//! values in `decisions`), and one folder per backend that writes those steps in its own
//! model and renders them: `iptables` (Istio's iptables rules, with named ipsets for
//! `--match-sets` and the TPROXY routing as `ip` commands) and `nft` (Istio's native
//! nftables tables). Each folder has the same shape: `model`, `plan`, `render`, and what
//! the backend needs besides.

pub mod capture;
pub mod decisions;
pub mod iptables;
pub mod nft;

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
