//! Istio's native nftables ruleset (`--native-nftables`): a typed model (`model`), the
//! planner that fills it from the same `CaptureConfig` as the iptables plan (`plan`), the
//! transaction that brings the kernel to it (`txn`), and its two forms: `nft -f` text
//! (`render`) and an nfnetlink batch (`encode`).
//!
//! Pure, like the iptables side: no I/O here; `apply::nft` sends the transaction.

pub mod encode;
pub mod model;
pub mod plan;
pub mod render;
pub mod txn;

pub use model::NftRuleset;
pub use plan::{plan, plan_with, PlanOptions};
