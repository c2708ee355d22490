//! The ruleset: a typed model (`model`), the planner that fills it from a `Config`
//! (`plan`), and the renderers that turn it into text (`iptables`, `routes`); `nft` is the
//! same for Istio's native nftables backend.

mod builder;
pub mod iptables;
pub mod model;
pub mod nft;
pub mod plan;
pub mod routes;

pub use model::Ruleset;
pub use plan::plan;
