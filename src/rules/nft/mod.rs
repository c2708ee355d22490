//! Istio's native nftables ruleset (`--native-nftables`): a typed model (`model`), the
//! planner that fills it from the same `CaptureConfig` as the iptables plan (`plan`), and the
//! renderer that turns it into one `nft -f` transaction (`render`).
//!
//! Pure, like the iptables side: no I/O here; `apply::nft` runs the transaction.

pub mod model;
pub mod plan;
pub mod render;

pub use model::NftRuleset;
pub use plan::plan;
