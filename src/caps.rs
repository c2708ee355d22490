//! Capabilities: check before touching anything, drop everything once the rules are in.

use caps::{CapSet, Capability};

/// What applying rules needs: NET_ADMIN to change netfilter and routing, NET_RAW for the
/// raw sockets iptables uses. Istio's istio-init container is given exactly these.
pub const REQUIRED: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW];

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error(
        "missing capability {}: add it to the init container's securityContext.capabilities.add \
         (Istio's istio-init adds NET_ADMIN and NET_RAW), or use Istio CNI mode, which needs none",
        missing.join(", ")
    )]
    Missing { missing: Vec<String> },

    #[error("reading this process's capabilities failed: {0}")]
    Read(String),

    #[error("dropping capabilities failed: {0}")]
    Drop(String),
}

/// Fails, naming each missing capability, unless all of `REQUIRED` are effective.
pub fn check_required() -> Result<(), CapsError> {
    let effective =
        caps::read(None, CapSet::Effective).map_err(|e| CapsError::Read(e.to_string()))?;
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|cap| !effective.contains(cap))
        .map(|cap| cap.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CapsError::Missing { missing })
    }
}

/// Drops every capability from every set, so whatever runs after the rules are in (the
/// validation probe, log shipping) cannot change the network. The bounding set needs
/// CAP_SETPCAP to shrink; without it, emptying the other sets already leaves nothing usable.
pub fn drop_all() -> Result<(), CapsError> {
    let _ = caps::clear(None, CapSet::Bounding);
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| CapsError::Drop(format!("{set:?}: {e}")))?;
    }
    Ok(())
}
