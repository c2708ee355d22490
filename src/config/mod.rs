//! Validated configuration: flags, environment and pod annotations become one `Config`.
//!
//! This layer decides *what* the user asked for and rejects anything ambiguous. It does no
//! I/O of its own: facts about the machine (addresses, resolv.conf, /etc/passwd) come in
//! through the `HostFacts` trait, and are only asked for when no explicit option settles
//! them, so a dry-run with explicit options is reproducible anywhere.

mod annotations;
pub mod build;
mod error;
mod host;
pub mod parse;
mod proxy_metadata;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};

pub use annotations::{Annotations, AnnotationsVerdict};
pub use build::{build_config, validate, ConfigOutcome, RawSettings, Validated};
pub use error::{ConfigError, Origin};
pub use host::{HostFacts, SystemHost};

/// Environment lookup, injectable so tests need not mutate the process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

use crate::values::{Interface, Owner, Port, PortRange};

/// How inbound connections reach the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterceptionMode {
    /// NAT REDIRECT to the inbound capture port; the sidecar sees the pod as the source.
    Redirect,
    /// TPROXY in mangle: the sidecar sees the client's real source address.
    Tproxy,
}

/// Which inbound TCP ports go to the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundCapture {
    Off,
    /// `-b '*'`: every port but these (`-d`).
    AllExcept(Vec<PortRange>),
    /// `-b LIST`: only these ports (`-d` is then ignored, as in Istio).
    Only(Vec<PortRange>),
}

/// Which outbound destinations go to the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundInclude {
    Off,
    All,
    Only(Vec<IpNet>),
}

/// Whose outbound traffic is captured, by the process's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerGroups {
    /// `ISTIO_OUTBOUND_OWNER_GROUPS=*` (the default), minus these.
    AllExcept(Vec<Owner>),
    Only(Vec<Owner>),
}

/// DNS capture to the agent's resolver on 15053.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsCapture {
    Off,
    /// Only queries to these servers (normally the pod's resolv.conf).
    Servers {
        v4: Vec<Ipv4Addr>,
        v6: Vec<Ipv6Addr>,
    },
    /// Every query to port 53, whatever the server.
    All,
}

/// Everything the planner needs: the shape of the capture ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    pub proxy_port: Port,
    pub inbound_capture_port: Port,
    pub inbound_tunnel_port: Port,
    pub proxy_uids: Vec<Owner>,
    pub proxy_gids: Vec<Owner>,
    pub interception: InterceptionMode,
    pub tproxy_mark: u32,
    pub tproxy_route_table: u32,
    pub inbound: InboundCapture,
    pub outbound_include: OutboundInclude,
    pub outbound_exclude: Vec<IpNet>,
    pub outbound_ports_include: Vec<PortRange>,
    pub outbound_ports_exclude: Vec<PortRange>,
    pub kube_virt_interfaces: Vec<Interface>,
    pub exclude_interfaces: Vec<Interface>,
    pub dns: DnsCapture,
    pub drop_invalid: bool,
    pub ipv6: bool,
    pub owner_groups: OwnerGroups,
    pub host_ipv4_loopback: Ipv4Net,
}

/// Which iptables implementation to drive (Istio's `--force-iptables-binary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForcedBackend {
    Legacy,
    Nft,
}

/// How `--native-nftables` gets its transaction into the kernel (`--nftables-apply`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NftablesApply {
    /// Over netlink; if that fails, the same transaction through `nft -f`, saying why.
    #[default]
    Auto,
    /// Over netlink only: fail rather than launch `nft`.
    Netlink,
    /// Through `nft -f` only (as before meshinit spoke netlink).
    Nft,
}

/// Options that shape a run rather than the ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    pub dry_run: bool,
    pub skip_rule_apply: bool,
    pub run_validation: bool,
    pub probe_port: Port,
    pub probe_timeout: Duration,
    pub network_namespace: Option<PathBuf>,
    pub cni_mode: bool,
    pub reconcile: bool,
    pub cleanup_only: bool,
    pub force_apply: bool,
    pub native_nftables: bool,
    pub force_backend: Option<ForcedBackend>,
    pub dual_stack: bool,
    /// How long to wait for the xtables lock that iptables-legacy shares node-wide.
    pub xtables_wait: Duration,
    /// The lock iptables-legacy takes (`XTABLES_LOCKFILE`, else iptables' default).
    pub xtables_lockfile: PathBuf,
    pub nftables_apply: NftablesApply,
    /// Match long CIDR and port lists with sets (`--match-sets`: ipsets on iptables).
    pub match_sets: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub capture: CaptureConfig,
    pub run: RunOptions,
}
