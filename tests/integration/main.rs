//! meshinit's integration tests: one binary, one module per area.
//!
//! Tests that need root and real network namespaces skip with a printed reason when run
//! unprivileged on a laptop, and fail under CI (`CI=true`), where they must run.

mod chart;
mod cni;
mod cni_runtime;
mod cni_userns;
mod detection;
mod e2e;
mod faults;
mod golden;
mod image;
mod image_nftables;
mod injector_template;
mod istio_oracle;
mod layers;
mod lifecycle;
mod lock;
mod manifests;
mod nft_golden;
mod support;
mod validate;
