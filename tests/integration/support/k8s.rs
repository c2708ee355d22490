//! What the Kubernetes manifests and the image tests share: the init container's resources,
//! sized from what `image::` measures.

/// The init container's memory limit in bytes (`16Mi`); the image tests run the init
/// container under it.
pub const INIT_MEMORY_BYTES: u64 = 16 << 20;
/// The init container's CPU limit, as the manifests write it; the image tests use it too.
pub const INIT_CPU_LIMIT: &str = "1";
