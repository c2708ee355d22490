//! From raw strings (flags, annotations, environment) to a validated `Config`.
//!
//! Precedence, highest first: an explicit flag, a value derived from pod annotations, an
//! environment variable (Istio's alias variables beat the flag-named ones, as in Istio), the
//! default. Validation runs over every value before the host is asked anything.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use super::error::{ConfigError, Origin};
use super::host::HostFacts;
use super::parse::{self, PortsOrAll, Reason};
use super::{CaptureConfig, Config, DnsCapture, InboundCapture, OwnerGroups, RunOptions};
use crate::values::Owner;

/// Every setting meshinit reads, Istio's and its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Setting {
    EnvoyPort,
    InboundCapturePort,
    InboundTunnelPort,
    ProxyUid,
    ProxyGid,
    InterceptionMode,
    TproxyMark,
    TproxyRouteTable,
    InboundPorts,
    InboundPortsExclude,
    ExcludeInterfaces,
    OutboundCidrs,
    OutboundCidrsExclude,
    OutboundPorts,
    OutboundPortsExclude,
    KubeVirtInterfaces,
    DryRun,
    ProbePort,
    ProbeTimeout,
    SkipRuleApply,
    RunValidation,
    RedirectDns,
    DropInvalid,
    DualStack,
    CaptureAllDns,
    NetworkNamespace,
    CniMode,
    Reconcile,
    CleanupOnly,
    ForceApply,
    NativeNftables,
    ForceIptablesBinary,
    OwnerGroups,
    OwnerGroupsExclude,
    LoopbackCidr,
    EnvoyUser,
    Ipv6,
    DnsServers,
    XtablesWait,
    XtablesLockfile,
    NftablesApply,
    MatchSets,
}

/// How a setting is spelled on the command line and in the environment.
#[derive(Debug, Clone, Copy)]
pub struct SettingSpec {
    pub setting: Setting,
    /// Long flag name without dashes; `None` for environment-only settings.
    pub long: Option<&'static str>,
    pub short: Option<char>,
    /// Environment variables, weakest first: a later one overrides an earlier one.
    pub envs: &'static [&'static str],
    pub default: &'static str,
    pub is_bool: bool,
    /// The value's name in `--help` (`PORTS`, `CIDRS`, `BOOL`).
    pub value_name: &'static str,
    /// One line for `--help`; the default and the environment variables are added to it.
    pub help: &'static str,
    /// The default as `--help` states it, where the literal default does not say it
    /// (`""`: the literal default, if any).
    pub default_doc: &'static str,
    /// More for `--help` (not `-h`), where one line is not enough.
    pub details: &'static str,
    /// The pod annotations that set it, as Istio's injector and CNI plugin read them.
    pub annotation: Option<Annotation>,
}

/// How pod annotations give a setting (`--annotations`, and the CNI plugin's pod).
#[derive(Debug, Clone, Copy)]
pub enum Annotation {
    /// The first of `keys` the pod has; without any, the default Istio's sidecar injector
    /// renders (`injector`) or its CNI plugin uses (`cni`), where it sets one.
    Keys {
        keys: &'static [&'static str],
        injector: Option<&'static str>,
        cni: Option<&'static str>,
    },
    /// Worked out from `keys` (and fixed ports) in `annotations.rs`, as each of Istio's
    /// components does in its own way.
    Derived { keys: &'static [&'static str] },
}

pub const INJECT: &str = "sidecar.istio.io/inject";
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
pub const STATUS_PORT: &str = "status.sidecar.istio.io/port";

impl SettingSpec {
    const fn doc(mut self, value_name: &'static str, help: &'static str) -> SettingSpec {
        self.value_name = value_name;
        self.help = help;
        self
    }

    const fn default_doc(mut self, default_doc: &'static str) -> SettingSpec {
        self.default_doc = default_doc;
        self
    }

    const fn details(mut self, details: &'static str) -> SettingSpec {
        self.details = details;
        self
    }

    /// Set by the first of `keys` present, else by the injector's or CNI plugin's default.
    const fn annotated(
        mut self,
        keys: &'static [&'static str],
        injector: Option<&'static str>,
        cni: Option<&'static str>,
    ) -> SettingSpec {
        self.annotation = Some(Annotation::Keys {
            keys,
            injector,
            cni,
        });
        self
    }

    const fn derived_from(mut self, keys: &'static [&'static str]) -> SettingSpec {
        self.annotation = Some(Annotation::Derived { keys });
        self
    }
}

const fn spec(
    setting: Setting,
    long: Option<&'static str>,
    short: Option<char>,
    envs: &'static [&'static str],
    default: &'static str,
    is_bool: bool,
) -> SettingSpec {
    SettingSpec {
        setting,
        long,
        short,
        envs,
        default,
        is_bool,
        value_name: "",
        help: "",
        default_doc: "",
        details: "",
        annotation: None,
    }
}

use Setting as S;

/// Istio 1.30's `istio-iptables` flags (`tools/istio-iptables/pkg/cmd/root.go`), with the
/// environment variables `flag.BindEnv` derives from them, then meshinit's additions.
#[rustfmt::skip]
pub const SETTINGS: &[SettingSpec] = &[
    spec(S::EnvoyPort, Some("envoy-port"), Some('p'), &[], "15001", false)
        .doc("PORT", "Envoy's outbound port: all captured outbound TCP is redirected here."),
    spec(S::InboundCapturePort, Some("inbound-capture-port"), Some('z'), &["INBOUND_CAPTURE_PORT"], "15006", false)
        .doc("PORT", "Port that captured inbound TCP is redirected to."),
    spec(S::InboundTunnelPort, Some("inbound-tunnel-port"), Some('e'), &["INBOUND_TUNNEL_PORT"], "15008", false)
        .doc("PORT", "Istio's inbound tunnel (HBONE) port, never captured."),
    spec(S::ProxyUid, Some("proxy-uid"), Some('u'), &["PROXY_UID"], "", false)
        .doc("UIDS", "Uid(s) whose traffic is never captured: the proxy's.")
        .default_doc("uid of ENVOY_USER, else 1337"),
    spec(S::ProxyGid, Some("proxy-gid"), Some('g'), &["PROXY_GID"], "", false)
        .doc("GIDS", "Gid(s) whose traffic is never captured.")
        .default_doc("the proxy uid(s)"),
    spec(S::InterceptionMode, Some("istio-inbound-interception-mode"), Some('m'), &["ISTIO_INBOUND_INTERCEPTION_MODE"], "", false)
        .doc("MODE", "Inbound interception mode: REDIRECT or TPROXY (exact case; anything else is an error, where Istio would silently use REDIRECT). NONE captures nothing.")
        .annotated(&[INTERCEPTION_MODE], None, Some("REDIRECT")),
    spec(S::TproxyMark, Some("istio-inbound-tproxy-mark"), Some('t'), &["ISTIO_INBOUND_TPROXY_MARK"], "1337", false)
        .doc("MARK", "Packet mark for TPROXY."),
    spec(S::TproxyRouteTable, Some("istio-inbound-tproxy-route-table"), Some('r'), &["ISTIO_INBOUND_TPROXY_ROUTE_TABLE"], "133", false)
        .doc("TABLE", "Routing table for TPROXY."),
    spec(S::InboundPorts, Some("istio-inbound-ports"), Some('b'), &["ISTIO_INBOUND_PORTS"], "", false)
        .doc("PORTS", "Inbound ports to capture: a list of ports and ranges (80,8000-8100), \"*\" for all, empty for none.")
        .default_doc("none")
        .annotated(&[INCLUDE_INBOUND_PORTS], Some("*"), Some("*")),
    spec(S::InboundPortsExclude, Some("istio-local-exclude-ports"), Some('d'), &["ISTIO_LOCAL_EXCLUDE_PORTS"], "", false)
        .doc("PORTS", "Inbound ports (and ranges, 8000-8100) never captured; only with -b '*'.")
        .derived_from(&[EXCLUDE_INBOUND_PORTS, STATUS_PORT]),
    spec(S::ExcludeInterfaces, Some("istio-exclude-interfaces"), Some('c'), &["ISTIO_EXCLUDE_INTERFACES"], "", false)
        .doc("IFACES", "Interfaces whose traffic is never captured, either way.")
        .annotated(&[EXCLUDE_INTERFACES], None, Some("")),
    spec(S::OutboundCidrs, Some("istio-service-cidr"), Some('i'), &["ISTIO_SERVICE_CIDR"], "", false)
        .doc("CIDRS", "Outbound destinations to capture: CIDRs (IPv4 and IPv6 mixed), \"*\" for all, empty for none.")
        .default_doc("none")
        .annotated(&[INCLUDE_OUTBOUND_IP_RANGES], Some("*"), Some("*")),
    spec(S::OutboundCidrsExclude, Some("istio-service-exclude-cidr"), Some('x'), &["ISTIO_SERVICE_EXCLUDE_CIDR"], "", false)
        .doc("CIDRS", "Outbound destinations never captured.")
        .annotated(&[EXCLUDE_OUTBOUND_IP_RANGES], Some(""), Some("")),
    spec(S::OutboundPorts, Some("istio-outbound-ports"), Some('q'), &["ISTIO_OUTBOUND_PORTS"], "", false)
        .doc("PORTS", "Outbound TCP ports (and ranges, 8000-8100) always captured, whatever the destination.")
        .annotated(&[INCLUDE_OUTBOUND_PORTS], None, Some("")),
    spec(S::OutboundPortsExclude, Some("istio-local-outbound-ports-exclude"), Some('o'), &["ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"], "", false)
        .doc("PORTS", "Outbound ports (and ranges, 8000-8100) never captured (TCP and UDP). This is the fix for an app init container that must reach, say, Vault before the sidecar runs.")
        .annotated(&[EXCLUDE_OUTBOUND_PORTS], None, Some("15020")),
    spec(S::KubeVirtInterfaces, Some("kube-virt-interfaces"), Some('k'), &["KUBE_VIRT_INTERFACES"], "", false)
        .doc("IFACES", "Virtual interfaces (e.g. KubeVirt VMs) whose inbound traffic is treated as outbound.")
        .annotated(&[REROUTE_VIRTUAL_INTERFACES, KUBEVIRT_INTERFACES], None, None),
    spec(S::DryRun, Some("dry-run"), Some('n'), &["DRY_RUN"], "false", true)
        .doc("BOOL", "Print what would be applied instead of applying it."),
    spec(S::ProbePort, Some("iptables-probe-port"), None, &["IPTABLES_PROBE_PORT"], "15002", false)
        .doc("PORT", "Port the validation probe connects to."),
    spec(S::ProbeTimeout, Some("probe-timeout"), None, &["PROBE_TIMEOUT"], "5s", false)
        .doc("DURATION", "How long validation waits, as a Go duration."),
    spec(S::SkipRuleApply, Some("skip-rule-apply"), None, &["SKIP_RULE_APPLY"], "false", true)
        .doc("BOOL", "Do not apply rules (with --run-validation: only validate)."),
    spec(S::RunValidation, Some("run-validation"), None, &["RUN_VALIDATION"], "false", true)
        .doc("BOOL", "After applying, check that the rules capture traffic (Istio's istio-validation)."),
    spec(S::RedirectDns, Some("redirect-dns"), None, &["REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"], "false", true)
        .doc("BOOL", "Capture DNS (UDP and TCP port 53) to the agent on 15053."),
    spec(S::DropInvalid, Some("drop-invalid"), None, &["DROP_INVALID", "INVALID_DROP"], "false", true)
        .doc("BOOL", "Drop conntrack-INVALID packets instead of letting them reset connections."),
    spec(S::DualStack, Some("dual-stack"), None, &["DUAL_STACK", "ISTIO_DUAL_STACK"], "false", true)
        .doc("BOOL", "Dual-stack pod: IPv6 rules when any address is IPv6."),
    spec(S::CaptureAllDns, Some("capture-all-dns"), None, &["CAPTURE_ALL_DNS"], "false", true)
        .doc("BOOL", "With --redirect-dns: capture DNS to any server, not only resolv.conf's."),
    spec(S::NetworkNamespace, Some("network-namespace"), None, &["NETWORK_NAMESPACE"], "", false)
        .doc("PATH", "Network namespace to apply in (a path such as /var/run/netns/pod)."),
    spec(S::CniMode, Some("cni-mode"), None, &["CNI_MODE"], "false", true)
        .doc("BOOL", "Running as a CNI plugin (a node-wide xtables lock is then shared)."),
    spec(S::Reconcile, Some("reconcile"), None, &["RECONCILE"], "false", true)
        .doc("BOOL", "Converge rules left by an earlier, different configuration. meshinit always does, atomically, so this is accepted for compatibility."),
    spec(S::CleanupOnly, Some("cleanup-only"), None, &["CLEANUP_ONLY"], "false", true)
        .doc("BOOL", "Only remove the rules (same as `meshinit cleanup`)."),
    spec(S::ForceApply, Some("force-apply"), None, &["FORCE_APPLY"], "false", true)
        .doc("BOOL", "Apply even if the rules look in place. meshinit's apply always converges, so this changes nothing."),
    spec(S::NativeNftables, Some("native-nftables"), None, &["NATIVE_NFTABLES"], "false", true)
        .doc("BOOL", "Use native nftables instead of iptables."),
    spec(S::ForceIptablesBinary, Some("force-iptables-binary"), None, &["FORCE_IPTABLES_BINARY"], "", false)
        .doc("legacy|nft", "Force the iptables implementation: legacy or nft.")
        .default_doc("detect"),
    spec(S::OwnerGroups, None, None, &["ISTIO_OUTBOUND_OWNER_GROUPS"], "*", false),
    spec(S::OwnerGroupsExclude, None, None, &["ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"], "", false),
    spec(S::LoopbackCidr, None, None, &["ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"], "127.0.0.1/32", false),
    spec(S::EnvoyUser, None, None, &["ENVOY_USER"], "istio-proxy", false),
    // meshinit's own: what Istio reads off the machine, made explicit.
    spec(S::Ipv6, Some("ipv6"), None, &["MESHINIT_IPV6"], "", true)
        .doc("BOOL", "Plan IPv6 rules too, instead of detecting it from the pod's addresses as Istio does."),
    spec(S::DnsServers, Some("dns-servers"), None, &["MESHINIT_DNS_SERVERS"], "", false)
        .doc("IPS", "DNS servers whose queries --redirect-dns captures, instead of resolv.conf's; empty means none."),
    spec(S::XtablesWait, Some("xtables-wait"), None, &["MESHINIT_XTABLES_WAIT"], "30", false)
        .doc("SECONDS", "Seconds to wait for a lock another process holds: iptables-legacy's xtables lock (XTABLES_LOCKFILE, shared by every pod of a node unless each has its own), or another meshinit run in this network namespace."),
    // iptables' own variable: meshinit takes the lock iptables-legacy would.
    spec(S::XtablesLockfile, None, None, &["XTABLES_LOCKFILE"], "/run/xtables.lock", false),
    spec(S::NftablesApply, Some("nftables-apply"), None, &["MESHINIT_NFTABLES_APPLY"], "auto", false)
        .doc("auto|netlink|nft", "How --native-nftables programs the kernel: auto, netlink or nft.")
        .details("auto sends the transaction over netlink, with no nft binary needed, and falls back to `nft -f` (logging why) if that fails; netlink never launches nft; nft always does."),
    spec(S::MatchSets, Some("match-sets"), None, &["MESHINIT_MATCH_SETS"], "false", true)
        .doc("BOOL", "Match long CIDR and port lists with one set each instead of one rule per entry.")
        .details("Each list of excluded or included CIDRs or ports becomes one rule, so what a new connection costs does not grow with the lists; verdicts are the same. On iptables the sets are ipsets, made over netlink (a kernel without ipset gets the plain rules, with a warning); with --native-nftables, nftables sets."),
];

/// The owner-group include list becomes one rule that returns when the socket's group is
/// none of them (Istio's structure: the negations must hold together, so they cannot be
/// split across rules). Istio caps the list at 64, but neither backend can load such a rule:
/// these are the largest lists each can.
///
/// iptables: `iptables-restore` (legacy and nft alike) splits a line into at most 254 words
/// (`MAX_ARGC` 255), counting its own name and `-t nat`; the rule is `-A ISTIO_OUTPUT`, five
/// words per group (`-m owner ! --gid-owner G`) and `-j RETURN`: 7 + 5n <= 254. From 50 on it
/// stops with "Parser cannot handle more arguments".
pub const MAX_OWNER_GROUPS_INCLUDE_IPTABLES: usize = 49;
/// nftables: the kernel takes at most 128 expressions per rule (`NFT_RULE_MAXEXPRS`); each
/// `skgid != G` is two (load, compare), plus the counter and the return: 2n + 2 <= 128.
/// From 64 on the kernel refuses the rule (EINVAL), over netlink and through nft alike.
pub const MAX_OWNER_GROUPS_INCLUDE_NFTABLES: usize = 63;

pub fn spec_of(setting: Setting) -> &'static SettingSpec {
    SETTINGS
        .iter()
        .find(|s| s.setting == setting)
        .unwrap_or_else(|| unreachable!("every Setting has a row in SETTINGS"))
}

/// The unvalidated inputs: explicit flags and annotation-derived values.
#[derive(Debug, Clone, Default)]
pub struct RawSettings {
    flags: BTreeMap<Setting, String>,
    /// Earlier values of a flag given more than once: the last one is in effect, but pflag
    /// parses each, so a typed one (boolean, port, duration) must parse too.
    overridden: Vec<(Setting, String)>,
    annotations: BTreeMap<Setting, (String, String)>,
}

impl RawSettings {
    pub fn set_flag(&mut self, setting: Setting, value: impl Into<String>) {
        self.flags.insert(setting, value.into());
    }

    /// A value given for `setting` by a flag that a later one of the same flag overrides.
    pub fn set_overridden_flag(&mut self, setting: Setting, value: impl Into<String>) {
        self.overridden.push((setting, value.into()));
    }

    /// The value given by flag for `setting`, if any.
    pub fn flag(&self, setting: Setting) -> Option<&str> {
        self.flags.get(&setting).map(String::as_str)
    }

    /// A value Istio's injector would have rendered from annotation `key`.
    pub fn set_annotation(&mut self, setting: Setting, key: &str, value: impl Into<String>) {
        self.annotations
            .insert(setting, (key.to_owned(), value.into()));
    }
}

/// What a run should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOutcome {
    Capture(Box<Config>),
    /// Capture is switched off for this pod (interception mode NONE); nothing to change.
    Skip {
        reason: String,
    },
}

struct Resolver<'a> {
    raw: &'a RawSettings,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Resolver<'_> {
    fn value(&self, setting: Setting) -> (String, Origin) {
        let spec = spec_of(setting);
        if let Some(value) = self.raw.flags.get(&setting) {
            let long = spec.long.unwrap_or("?");
            return (
                value.clone(),
                Origin::Flag {
                    long,
                    short: spec.short,
                },
            );
        }
        if let Some((key, value)) = self.raw.annotations.get(&setting) {
            return (value.clone(), Origin::Annotation(key.clone()));
        }
        for name in spec.envs.iter().rev() {
            if let Some(value) = (self.env)(name) {
                // An empty boolean variable: Istio's binding sets the flag from it, and
                // pflag's failed parse leaves false, overriding a weaker variable
                // (REDIRECT_DNS=true ISTIO_META_DNS_CAPTURE= is off). So it is false here,
                // except for meshinit's own variables, where empty means unset (detect).
                if spec.is_bool && value.trim().is_empty() {
                    if name.starts_with("MESHINIT_") {
                        continue;
                    }
                    return ("false".to_owned(), Origin::Env((*name).to_owned()));
                }
                return (value, Origin::Env((*name).to_owned()));
            }
        }
        (
            spec.default.to_owned(),
            Origin::Default(spec.long.unwrap_or("setting")),
        )
    }

    fn parsed<T>(
        &self,
        setting: Setting,
        parser: impl Fn(&str) -> Result<T, Reason>,
    ) -> Result<T, ConfigError> {
        let (value, origin) = self.value(setting);
        parser(&value).map_err(|reason| ConfigError::InvalidValue {
            origin,
            value,
            reason,
        })
    }

    fn flag(&self, setting: Setting) -> Result<bool, ConfigError> {
        self.parsed(setting, parse::parse_bool)
    }

    /// `Some` when the setting was given anywhere but its default.
    fn explicit(&self, setting: Setting) -> Option<(String, Origin)> {
        let (value, origin) = self.value(setting);
        (!matches!(origin, Origin::Default(_))).then_some((value, origin))
    }
}

/// A config whose every value is valid, with the machine facts still to be filled in.
#[derive(Debug, Clone)]
pub struct Validated {
    config: Config,
    ipv6: Option<bool>,
    dns_servers: Option<Vec<IpAddr>>,
    redirect_dns: bool,
    capture_all_dns: bool,
    /// `ENVOY_USER`, when no proxy uid was given and it must be looked up.
    envoy_user: Option<String>,
    gid_follows_uid: bool,
    skip: Option<String>,
    /// Settings given but ignored (as Istio ignores them); logged by `resolve`.
    warnings: Vec<String>,
}

/// Phase one: parse and check every value. Pure.
pub fn validate(
    raw: &RawSettings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Validated, ConfigError> {
    let r = Resolver { raw, env };
    let port = |s| r.parsed(s, parse::parse_port);
    for (setting, value) in &raw.overridden {
        let spec = spec_of(*setting);
        let parsed = match setting {
            S::ProbePort => parse::parse_go_port(value).map(drop),
            S::ProbeTimeout => parse::parse_go_duration(value).map(drop),
            _ if spec.is_bool => parse::parse_bool(value).map(drop),
            _ => Ok(()),
        };
        parsed.map_err(|reason| ConfigError::InvalidValue {
            origin: Origin::Flag {
                long: spec.long.unwrap_or("?"),
                short: spec.short,
            },
            value: value.clone(),
            reason,
        })?;
    }

    let proxy_port = port(S::EnvoyPort)?;
    let inbound_capture_port = port(S::InboundCapturePort)?;
    let inbound_tunnel_port = port(S::InboundTunnelPort)?;
    let proxy_uids = r.parsed(S::ProxyUid, parse::parse_owner_list)?;
    let proxy_gids = r.parsed(S::ProxyGid, parse::parse_owner_list)?;
    let mode = r.parsed(S::InterceptionMode, parse::parse_interception_mode)?;
    let tproxy_mark = r.parsed(S::TproxyMark, parse::parse_tproxy_mark)?;
    let tproxy_route_table = r.parsed(S::TproxyRouteTable, parse::parse_route_table)?;
    let inbound_ports = r.parsed(S::InboundPorts, parse::parse_ports_or_all)?;
    let inbound_exclude = r.parsed(S::InboundPortsExclude, parse::parse_port_list)?;
    let exclude_interfaces = r.parsed(S::ExcludeInterfaces, parse::parse_interface_list)?;
    let outbound_include = r.parsed(S::OutboundCidrs, parse::parse_outbound_include)?;
    let outbound_exclude = r.parsed(S::OutboundCidrsExclude, parse::parse_outbound_exclude)?;
    let outbound_ports_include = r.parsed(S::OutboundPorts, parse::parse_port_list)?;
    let outbound_ports_exclude = r.parsed(S::OutboundPortsExclude, parse::parse_port_list)?;
    let kube_virt_interfaces = r.parsed(S::KubeVirtInterfaces, parse::parse_interface_list)?;
    let probe_port = r.parsed(S::ProbePort, parse::parse_go_port)?;
    let probe_timeout = r.parsed(S::ProbeTimeout, parse::parse_go_duration)?;
    let network_namespace = r.parsed(S::NetworkNamespace, |v| {
        Ok::<_, Reason>((!v.is_empty()).then(|| PathBuf::from(v)))
    })?;
    let force_backend = r.parsed(S::ForceIptablesBinary, parse::parse_backend)?;
    let host_ipv4_loopback = r.parsed(S::LoopbackCidr, parse::parse_loopback_cidr)?;
    let (owner_groups, owner_groups_warning) = owner_groups(&r)?;
    let redirect_dns = r.flag(S::RedirectDns)?;
    let capture_all_dns = r.flag(S::CaptureAllDns)?;
    let dual_stack = r.flag(S::DualStack)?;
    let ipv6 = match r.explicit(S::Ipv6) {
        Some((value, origin)) => {
            Some(
                parse::parse_bool(&value).map_err(|reason| ConfigError::InvalidValue {
                    origin,
                    value,
                    reason,
                })?,
            )
        }
        None => None,
    };
    let dns_servers = match r.explicit(S::DnsServers) {
        Some((value, origin)) => {
            Some(
                parse::parse_ip_list(&value).map_err(|reason| ConfigError::InvalidValue {
                    origin,
                    value,
                    reason,
                })?,
            )
        }
        None => None,
    };
    let run = RunOptions {
        dry_run: r.flag(S::DryRun)?,
        skip_rule_apply: r.flag(S::SkipRuleApply)?,
        run_validation: r.flag(S::RunValidation)?,
        probe_port,
        probe_timeout,
        network_namespace,
        cni_mode: r.flag(S::CniMode)?,
        reconcile: r.flag(S::Reconcile)?,
        cleanup_only: r.flag(S::CleanupOnly)?,
        force_apply: r.flag(S::ForceApply)?,
        native_nftables: r.flag(S::NativeNftables)?,
        force_backend,
        dual_stack,
        xtables_wait: r.parsed(S::XtablesWait, parse::parse_wait_seconds)?,
        xtables_lockfile: PathBuf::from(r.value(S::XtablesLockfile).0),
        nftables_apply: r.parsed(S::NftablesApply, parse::parse_nftables_apply)?,
        match_sets: r.flag(S::MatchSets)?,
    };
    let drop_invalid = r.flag(S::DropInvalid)?;

    let inbound = match inbound_ports {
        PortsOrAll::All => InboundCapture::AllExcept(inbound_exclude),
        // Istio captures inbound once the value is non-empty, even when it lists no port
        // (","): the jump to ISTIO_INBOUND is installed, with no port rules behind it.
        PortsOrAll::List(ports) if ports.is_empty() && r.value(S::InboundPorts).0.is_empty() => {
            InboundCapture::Off
        }
        PortsOrAll::List(ports) => InboundCapture::Only(ports),
    };
    // Istio looks up ENVOY_USER, and lets the gids follow the uids, only when the value is
    // empty: a value listing no id (",") means none, so nothing is exempt.
    let envoy_user = r
        .value(S::ProxyUid)
        .0
        .is_empty()
        .then(|| r.value(S::EnvoyUser).0);
    let gid_follows_uid = r.value(S::ProxyGid).0.is_empty();
    let skip = mode.is_none().then(|| {
        let (value, origin) = r.value(S::InterceptionMode);
        format!("interception mode is {value} (from {origin}): traffic is not captured")
    });

    let capture = CaptureConfig {
        proxy_port,
        inbound_capture_port,
        inbound_tunnel_port,
        proxy_uids,
        proxy_gids,
        interception: mode.unwrap_or(super::InterceptionMode::Redirect),
        tproxy_mark,
        tproxy_route_table,
        inbound,
        outbound_include,
        outbound_exclude,
        outbound_ports_include,
        outbound_ports_exclude,
        kube_virt_interfaces,
        exclude_interfaces,
        dns: DnsCapture::Off,
        drop_invalid,
        ipv6: false,
        owner_groups,
        host_ipv4_loopback,
    };
    Ok(Validated {
        config: Config { capture, run },
        ipv6,
        dns_servers,
        redirect_dns,
        capture_all_dns,
        envoy_user,
        gid_follows_uid,
        skip,
        warnings: owner_groups_warning.into_iter().collect(),
    })
}

/// Whose outbound traffic is captured, by group, and a warning when a setting is ignored.
fn owner_groups(r: &Resolver<'_>) -> Result<(OwnerGroups, Option<String>), ConfigError> {
    let (include, origin) = r.value(S::OwnerGroups);
    let exclude = r.parsed(S::OwnerGroupsExclude, parse::parse_owner_list)?;
    if include.trim() == "*" {
        return Ok((OwnerGroups::AllExcept(exclude), None));
    }
    let groups = parse::parse_owner_list(&include).map_err(|reason| ConfigError::InvalidValue {
        origin: origin.clone(),
        value: include.clone(),
        reason,
    })?;
    let (backend, limit) = if r.flag(S::NativeNftables)? {
        ("nftables", MAX_OWNER_GROUPS_INCLUDE_NFTABLES)
    } else {
        ("iptables", MAX_OWNER_GROUPS_INCLUDE_IPTABLES)
    };
    if groups.len() > limit {
        return Err(ConfigError::TooManyOwnerGroups {
            origin,
            count: groups.len(),
            limit,
            backend,
        });
    }
    // Istio uses the include list and ignores the exclude list; so does meshinit, but says so,
    // since the pod's author evidently meant both.
    let warning = (!exclude.is_empty()).then(|| {
        let (_, exclude_origin) = r.value(S::OwnerGroupsExclude);
        format!(
            "{exclude_origin} is ignored: {origin} lists the groups whose traffic is captured, \
             and Istio then ignores the exclusions"
        )
    });
    Ok((OwnerGroups::Only(groups), warning))
}

impl Validated {
    pub fn run_options(&self) -> &RunOptions {
        &self.config.run
    }

    /// Settings that were given but are ignored, each as a sentence naming the setting.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Phase two: fill in what only the machine knows, asking `host` only for what no
    /// option settled.
    pub fn resolve(self, host: &dyn HostFacts) -> Result<ConfigOutcome, ConfigError> {
        if let Some(reason) = self.skip {
            return Ok(ConfigOutcome::Skip { reason });
        }
        // Here rather than in `validate`, which stays pure: every caller that goes on to
        // capture (apply, print, explain, the CNI plugin) resolves, so each says it once.
        for warning in &self.warnings {
            tracing::warn!("{warning}");
        }
        let mut config = self.config;
        let capture = &mut config.capture;
        if let Some(user) = &self.envoy_user {
            // Istio: the uid of ENVOY_USER if that user exists, else 1337.
            let uid = host.user_uid(user).unwrap_or(DEFAULT_PROXY_UID);
            capture.proxy_uids = vec![Owner::Id(uid)];
        }
        if self.gid_follows_uid {
            capture.proxy_gids = capture.proxy_uids.clone();
        }
        capture.ipv6 = match self.ipv6 {
            Some(ipv6) => ipv6,
            None => host.detect_ipv6(config.run.dual_stack)?,
        };
        capture.dns = if !self.redirect_dns {
            DnsCapture::Off
        } else if self.capture_all_dns {
            DnsCapture::All
        } else {
            let servers = match self.dns_servers {
                Some(servers) => servers,
                None => host.resolv_conf_nameservers()?,
            };
            // Split by how the address is written, as Istio does: "::127.0.0.53" is IPv6.
            let v4: Vec<_> = servers
                .iter()
                .filter_map(|s| match s {
                    IpAddr::V4(a) => Some(*a),
                    IpAddr::V6(_) => None,
                })
                .collect();
            let v6: Vec<_> = servers
                .iter()
                .filter_map(|s| match s {
                    IpAddr::V6(a) => Some(*a),
                    IpAddr::V4(_) => None,
                })
                .collect();
            if v4.is_empty() && v6.is_empty() {
                tracing::warn!(
                    "DNS capture is on, but capture-all-dns is off and no DNS servers are known: DNS is not captured"
                );
                DnsCapture::Off
            } else {
                DnsCapture::Servers { v4, v6 }
            }
        };
        Ok(ConfigOutcome::Capture(Box::new(config)))
    }
}

/// Both phases at once, for callers that have no reason to act in between.
pub fn build_config(
    raw: &RawSettings,
    env: &dyn Fn(&str) -> Option<String>,
    host: &dyn HostFacts,
) -> Result<ConfigOutcome, ConfigError> {
    validate(raw, env)?.resolve(host)
}

/// The uid used when nothing else decides it (Istio's `DefaultProxyUID`).
pub const DEFAULT_PROXY_UID: u32 = 1337;

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn each_annotation_sets_one_setting() {
        let mut seen = BTreeMap::new();
        for spec in SETTINGS {
            let keys = match spec.annotation {
                Some(Annotation::Keys { keys, .. } | Annotation::Derived { keys }) => keys,
                None => continue,
            };
            assert!(!keys.is_empty(), "{:?}", spec.setting);
            for key in keys {
                let earlier = seen.insert(*key, spec.setting);
                assert!(
                    earlier.is_none(),
                    "{key} sets {earlier:?} and {:?}",
                    spec.setting
                );
            }
        }
        assert!(
            !seen.contains_key(INJECT),
            "{INJECT} decides whether, not how"
        );
    }

    /// `n` numeric groups, as ISTIO_OUTBOUND_OWNER_GROUPS would list them.
    fn groups(n: usize) -> String {
        (0..n)
            .map(|i| (2000 + i).to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn validated(env: &[(&str, &str)], native_nftables: bool) -> Result<Validated, ConfigError> {
        let mut raw = RawSettings::default();
        if native_nftables {
            raw.set_flag(Setting::NativeNftables, "true");
        }
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        validate(&raw, &|name| env.get(name).cloned())
    }

    #[test]
    fn owner_groups_up_to_each_backends_limit() {
        for (native, limit) in [
            (false, MAX_OWNER_GROUPS_INCLUDE_IPTABLES),
            (true, MAX_OWNER_GROUPS_INCLUDE_NFTABLES),
        ] {
            let list = groups(limit);
            let ok = validated(&[("ISTIO_OUTBOUND_OWNER_GROUPS", &list)], native);
            assert!(ok.is_ok(), "{limit} groups (native {native}): {ok:?}");
        }
    }

    /// Issue 11 §6: from 50 groups iptables-restore cannot parse the rule, from 64 the kernel
    /// refuses the nftables rule; refused here, naming the variable, the count and the limit.
    #[test]
    fn owner_groups_beyond_the_backends_limit_are_refused() {
        for (native, backend, limit) in [
            (false, "iptables", MAX_OWNER_GROUPS_INCLUDE_IPTABLES),
            (true, "nftables", MAX_OWNER_GROUPS_INCLUDE_NFTABLES),
        ] {
            for count in [limit + 1, 64] {
                let list = groups(count);
                let err = validated(&[("ISTIO_OUTBOUND_OWNER_GROUPS", &list)], native)
                    .expect_err("too many groups");
                let message = err.to_string();
                for needle in [
                    "environment variable ISTIO_OUTBOUND_OWNER_GROUPS".to_owned(),
                    format!("lists {count} groups"),
                    format!("the {backend} backend can capture by at most {limit}"),
                ] {
                    assert!(message.contains(&needle), "{needle:?} not in: {message}");
                }
            }
        }
    }

    #[test]
    fn excluded_owner_groups_have_no_limit() {
        let list = groups(200);
        let ok = validated(&[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", &list)], false);
        assert!(ok.is_ok(), "{ok:?}");
    }

    const BOTH: &[(&str, &str)] = &[
        ("ISTIO_OUTBOUND_OWNER_GROUPS", "2000"),
        ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "3000"),
    ];

    /// Issue 11 §6: with both lists set, the exclusions are ignored (as in Istio), and the
    /// validated config says so, naming the ignored variable.
    #[test]
    fn both_owner_group_lists_warn_that_the_exclusions_are_ignored() {
        let v = validated(BOTH, false).expect("valid");
        assert_eq!(v.warnings().len(), 1, "{:?}", v.warnings());
        assert!(
            v.warnings()[0]
                .starts_with("environment variable ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE is ignored"),
            "{:?}",
            v.warnings()
        );
        assert_eq!(
            v.config.capture.owner_groups,
            OwnerGroups::Only(vec![Owner::Id(2000)])
        );
        for one in [&BOTH[..1], &BOTH[1..]] {
            let v = validated(one, false).expect("valid");
            assert!(v.warnings().is_empty(), "{one:?}: {:?}", v.warnings());
        }
    }

    /// A buffer the test's subscriber writes its log lines to.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct NoHost;

    impl HostFacts for NoHost {
        fn detect_ipv6(&self, _: bool) -> Result<bool, ConfigError> {
            Ok(false)
        }
        fn resolv_conf_nameservers(&self) -> Result<Vec<IpAddr>, ConfigError> {
            Ok(vec![])
        }
        fn user_uid(&self, _: &str) -> Option<u32> {
            None
        }
    }

    /// ... and resolving it logs that warning, at WARN, through tracing.
    #[test]
    fn both_owner_group_lists_log_a_warning() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let v = validated(BOTH, false).expect("valid");
            v.resolve(&NoHost).expect("resolves");
        });
        let logged =
            String::from_utf8(captured.0.lock().expect("log buffer").clone()).expect("utf-8 log");
        let warnings: Vec<&str> = logged.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warnings.len(), 1, "{logged}");
        assert!(
            warnings[0].contains("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE is ignored"),
            "{logged}"
        );
    }

    /// Knows one user, istio-proxy with uid 1337; IPv6 and DNS always come from flags here.
    struct Host;
    impl HostFacts for Host {
        fn detect_ipv6(&self, _: bool) -> Result<bool, ConfigError> {
            Ok(false)
        }
        fn resolv_conf_nameservers(&self) -> Result<Vec<std::net::IpAddr>, ConfigError> {
            Ok(vec![])
        }
        fn user_uid(&self, name: &str) -> Option<u32> {
            (name == "istio-proxy").then_some(1337)
        }
    }

    fn capture(flags: &[(Setting, &str)]) -> CaptureConfig {
        let mut raw = RawSettings::default();
        for (setting, value) in flags {
            raw.set_flag(*setting, *value);
        }
        let validated = validate(&raw, &|_| None).expect("valid");
        match validated.resolve(&Host).expect("resolves") {
            ConfigOutcome::Capture(config) => config.capture,
            ConfigOutcome::Skip { reason } => panic!("skipped: {reason}"),
        }
    }

    // Found by the differential test against Istio's code (tests/integration/istio_oracle.rs).
    #[test]
    fn a_list_value_naming_no_item_is_set_not_unset() {
        // Istio tests the value, not the list: "," looks up no ENVOY_USER and gives no gids.
        let c = capture(&[(Setting::ProxyUid, ",")]);
        assert_eq!((c.proxy_uids, c.proxy_gids), (vec![], vec![]));
        let c = capture(&[(Setting::ProxyUid, "7"), (Setting::ProxyGid, ",")]);
        assert_eq!((c.proxy_uids, c.proxy_gids), (vec![Owner::Id(7)], vec![]));
        // Unset: the uid of ENVOY_USER, and the gids follow the uids.
        let c = capture(&[]);
        assert_eq!(c.proxy_gids, vec![Owner::Id(1337)]);
        // "-b ," installs the jump to ISTIO_INBOUND with no port behind it; "-b ''" nothing.
        let c = capture(&[(Setting::InboundPorts, ",")]);
        assert_eq!(c.inbound, InboundCapture::Only(vec![]));
        let c = capture(&[(Setting::InboundPorts, "")]);
        assert_eq!(c.inbound, InboundCapture::Off);
    }

    // Found by the differential (issue 20): pflag sets a boolean from an empty variable to
    // false, and Istio's alias variables are read after the flag-named ones.
    #[test]
    fn an_empty_boolean_variable_is_false_and_overrides_a_weaker_one() {
        let v = validated(
            &[("REDIRECT_DNS", "true"), ("ISTIO_META_DNS_CAPTURE", "")],
            false,
        )
        .expect("valid");
        assert!(!v.redirect_dns);
        let v = validated(&[("REDIRECT_DNS", "true")], false).expect("valid");
        assert!(v.redirect_dns);
        // meshinit's own: empty is unset, so IPv6 is still detected.
        let v = validated(&[("MESHINIT_IPV6", "")], false).expect("valid");
        assert_eq!(v.ipv6, None);
    }

    #[test]
    fn every_port_list_takes_ranges_and_refuses_bad_ones_by_name() {
        let range = crate::values::tests::range;
        let c = capture(&[
            (Setting::InboundPorts, "8080-8081,9000"),
            (Setting::OutboundPorts, "3000-3100"),
            (Setting::OutboundPortsExclude, "8200-8300"),
        ]);
        assert_eq!(
            c.inbound,
            InboundCapture::Only(vec![range(8080, 8081), range(9000, 9000)])
        );
        assert_eq!(c.outbound_ports_include, vec![range(3000, 3100)]);
        assert_eq!(c.outbound_ports_exclude, vec![range(8200, 8300)]);
        let c = capture(&[
            (Setting::InboundPorts, "*"),
            (Setting::InboundPortsExclude, "15020-15021"),
        ]);
        assert_eq!(
            c.inbound,
            InboundCapture::AllExcept(vec![range(15020, 15021)])
        );
        for setting in [
            Setting::InboundPorts,
            Setting::InboundPortsExclude,
            Setting::OutboundPorts,
            Setting::OutboundPortsExclude,
        ] {
            let mut raw = RawSettings::default();
            raw.set_flag(setting, "80,8300-8200");
            let err = validate(&raw, &|_| None).expect_err("refused").to_string();
            assert!(err.contains("8300-8200"), "{err}");
            assert!(err.contains("port range"), "{err}");
        }
    }
}
