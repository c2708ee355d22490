//! Command-line interface: Istio's `istio-iptables` flags, unchanged, plus meshinit's own.
//!
//! Every value is taken as a string here and validated by `config`, so the same checks
//! and messages apply to flags, environment variables and annotations alike.

use std::path::PathBuf;

use std::ffi::OsString;

use clap::{Args, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::config::build::{RawSettings, Setting};

#[derive(Debug, Parser)]
#[command(
    name = "meshinit",
    version,
    about = "Drop-in replacement for Istio's istio-init: traffic capture rules, applied atomically",
    long_about = "Drop-in replacement for Istio's istio-init.\n\n\
        meshinit takes the flags of Istio's `istio-iptables` unchanged, plans the same \
        ruleset (same tables and chain names), and applies it with one atomic \
        iptables-restore per IP family.",
    args_override_self = true,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    #[command(flatten)]
    pub log: LogArgs,
}

impl Cli {
    /// Parses the command line. Building clap's definition of every subcommand (each with
    /// all of Istio's flags) costs more CPU than planning the ruleset, and every pod start
    /// pays it, so only the subcommand named first is built. Help, version and any error
    /// go through the full definition, so their output is the same either way.
    pub fn parse_args(args: Vec<OsString>) -> Result<Cli, clap::Error> {
        let fast = single_subcommand(&args)
            .and_then(|cmd| cmd.try_get_matches_from(&args).ok())
            .and_then(|matches| Cli::from_arg_matches(&matches).ok());
        match fast {
            Some(cli) => Ok(cli),
            None => Cli::try_parse_from(args),
        }
    }
}

/// The top-level command with just the subcommand `args[1]` names, if it names one.
fn single_subcommand(args: &[OsString]) -> Option<clap::Command> {
    let name = [
        "istio-iptables",
        "apply",
        "cleanup",
        "validate",
        "print",
        "explain",
    ]
    .into_iter()
    .find(|known| args.get(1).and_then(|a| a.to_str()) == Some(*known))?;
    let sub = clap::Command::new(name).args_override_self(true);
    let sub = match name {
        "print" => PrintArgs::augment_args(sub),
        "explain" => ExplainArgs::augment_args(sub),
        _ => CaptureArgs::augment_args(sub),
    };
    let top = clap::Command::new("meshinit")
        .args_override_self(true)
        .subcommand_required(true);
    Some(LogArgs::augment_args(top).subcommand(sub))
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the capture rules, exactly as Istio's `istio-iptables` (same flags).
    ///
    /// This is the name Istio's injection template uses; it is the same as `apply`.
    #[command(name = "istio-iptables")]
    IstioIptables(CaptureArgs),
    /// Apply the capture rules to this (or --network-namespace's) network namespace.
    Apply(CaptureArgs),
    /// Print what `apply` would do: restore input per family, then routing changes.
    Print(PrintArgs),
    /// Remove everything meshinit (or istio-init) added, whatever configuration added it.
    Cleanup(CaptureArgs),
    /// Check that traffic is captured here, as Istio's istio-validation container does.
    ///
    /// Run it as the proxy's uid (1337), with no capabilities. It listens on loopback at
    /// the envoy and inbound capture ports and connects to 127.0.0.6 at
    /// --iptables-probe-port once a second; exits 0 when the capture rules redirect that
    /// connection, 126 after --probe-timeout otherwise.
    Validate(CaptureArgs),
    /// Say whether a connection would be captured, and by which rules, before deploying.
    ///
    /// Walks the planned ruleset (the same one `apply` installs) for the first packet of
    /// the connection. Outbound: `--dst 198.51.100.30:8200 [--uid 1000]`. Inbound:
    /// `--inbound --port 8080`.
    Explain(ExplainArgs),
    /// Run as a chained CNI plugin (spec 1.0): the runtime sets CNI_COMMAND, CNI_NETNS,
    /// CNI_ARGS and passes the network configuration on stdin.
    ///
    /// Install the binary in the CNI plugin directory as `meshinit-cni` (a symlink is
    /// enough: invoked under that name, meshinit acts as this subcommand) and chain it
    /// after the pod network's plugins.
    Cni,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Destination address and port (outbound; with --inbound, the pod's address).
    #[arg(long, value_name = "ADDR:PORT")]
    pub dst: Option<String>,

    /// The connection arrives at the pod instead of leaving it.
    #[arg(long)]
    pub inbound: bool,

    /// With --inbound: the pod's port, when the pod's address does not matter.
    #[arg(long, value_name = "PORT")]
    pub port: Option<String>,

    /// Source address (inbound: the client's).
    #[arg(long, value_name = "ADDR")]
    pub src: Option<String>,

    /// The uid of the process opening an outbound connection. [default: 1000, an app]
    #[arg(long, value_name = "UID")]
    pub uid: Option<String>,

    /// Its gid. [default: the uid]
    #[arg(long, value_name = "GID")]
    pub gid: Option<String>,

    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: ProtoArg,

    /// The interface it leaves by (or arrives on). [default: lo for loopback
    /// destinations, else eth0]
    #[arg(long, value_name = "IFACE")]
    pub iface: Option<String>,

    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,

    #[command(flatten)]
    pub capture: CaptureArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FamilyArg {
    Ipv4,
    Ipv6,
}

#[derive(Debug, Args)]
pub struct PrintArgs {
    /// Print only this family's iptables-restore input, ready to pipe into
    /// `iptables-restore` or `ip6tables-restore`.
    #[arg(long, value_enum, value_name = "FAMILY")]
    pub family: Option<FamilyArg>,

    #[command(flatten)]
    pub capture: CaptureArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level: error, warn, info, debug or trace.
    ///
    /// The full restore input is logged at debug. Logs go to stderr; data to stdout.
    #[arg(long, global = true, env = "MESHINIT_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log format: plain for people, json for log pipelines.
    #[arg(
        long,
        global = true,
        env = "MESHINIT_LOG_FORMAT",
        value_enum,
        value_name = "FORMAT"
    )]
    pub log_format: Option<LogFormat>,

    /// pilot-agent's log level flag ("default:info", "info"), mapped onto --log-level.
    #[arg(long = "log_output_level", global = true, value_name = "SCOPES")]
    pub istio_log_output_level: Option<String>,

    /// pilot-agent's JSON logging flag, mapped onto --log-format=json.
    #[arg(long = "log_as_json", global = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub istio_log_as_json: Option<String>,

    /// Other pilot-agent logging flags: accepted so Istio's templates work, and ignored.
    #[arg(long = "log_caller", global = true, hide = true)]
    pub istio_log_caller: Option<String>,
    #[arg(long = "log_stacktrace_level", global = true, hide = true)]
    pub istio_log_stacktrace_level: Option<String>,
    #[arg(long = "log_target", global = true, hide = true)]
    pub istio_log_target: Option<String>,
    #[arg(long = "log_rotate", global = true, hide = true)]
    pub istio_log_rotate: Option<String>,
    #[arg(long = "log_rotate_max_age", global = true, hide = true)]
    pub istio_log_rotate_max_age: Option<String>,
    #[arg(long = "log_rotate_max_backups", global = true, hide = true)]
    pub istio_log_rotate_max_backups: Option<String>,
    #[arg(long = "log_rotate_max_size", global = true, hide = true)]
    pub istio_log_rotate_max_size: Option<String>,
}

/// Istio's `istio-iptables` flags. Each also reads the environment variable of its name
/// upper-cased with '-' as '_' (not --envoy-port), as Istio does; a flag beats a value
/// from --annotations, which beats the environment.
#[derive(Debug, Default, Args)]
pub struct CaptureArgs {
    /// Envoy's outbound port: all captured outbound TCP is redirected here. [default: 15001]
    #[arg(short = 'p', long = "envoy-port", value_name = "PORT")]
    pub envoy_port: Option<String>,

    /// Port that captured inbound TCP is redirected to. [default: 15006]
    /// [env: INBOUND_CAPTURE_PORT]
    #[arg(short = 'z', long = "inbound-capture-port", value_name = "PORT")]
    pub inbound_capture_port: Option<String>,

    /// Istio's inbound tunnel (HBONE) port, never captured. [default: 15008]
    /// [env: INBOUND_TUNNEL_PORT]
    #[arg(short = 'e', long = "inbound-tunnel-port", value_name = "PORT")]
    pub inbound_tunnel_port: Option<String>,

    /// Uid(s) whose traffic is never captured: the proxy's. [default: uid of ENVOY_USER,
    /// else 1337] [env: PROXY_UID]
    #[arg(short = 'u', long = "proxy-uid", value_name = "UIDS")]
    pub proxy_uid: Option<String>,

    /// Gid(s) whose traffic is never captured. [default: the proxy uid(s)] [env: PROXY_GID]
    #[arg(short = 'g', long = "proxy-gid", value_name = "GIDS")]
    pub proxy_gid: Option<String>,

    /// Inbound interception mode: REDIRECT or TPROXY (exact case; anything else is an
    /// error, where Istio would silently use REDIRECT). NONE captures nothing.
    /// [env: ISTIO_INBOUND_INTERCEPTION_MODE]
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        value_name = "MODE"
    )]
    pub interception_mode: Option<String>,

    /// Packet mark for TPROXY. [default: 1337] [env: ISTIO_INBOUND_TPROXY_MARK]
    #[arg(short = 't', long = "istio-inbound-tproxy-mark", value_name = "MARK")]
    pub tproxy_mark: Option<String>,

    /// Routing table for TPROXY. [default: 133] [env: ISTIO_INBOUND_TPROXY_ROUTE_TABLE]
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        value_name = "TABLE"
    )]
    pub tproxy_route_table: Option<String>,

    /// Inbound ports to capture: a list of ports and ranges (80,8000-8100), "*" for all,
    /// empty for none. [default: none] [env: ISTIO_INBOUND_PORTS]
    #[arg(short = 'b', long = "istio-inbound-ports", value_name = "PORTS")]
    pub inbound_ports: Option<String>,

    /// Inbound ports (and ranges, 8000-8100) never captured; only with -b '*'.
    /// [env: ISTIO_LOCAL_EXCLUDE_PORTS]
    #[arg(short = 'd', long = "istio-local-exclude-ports", value_name = "PORTS")]
    pub local_exclude_ports: Option<String>,

    /// Interfaces whose traffic is never captured, either way.
    /// [env: ISTIO_EXCLUDE_INTERFACES]
    #[arg(short = 'c', long = "istio-exclude-interfaces", value_name = "IFACES")]
    pub exclude_interfaces: Option<String>,

    /// Outbound destinations to capture: CIDRs (IPv4 and IPv6 mixed), "*" for all, empty
    /// for none. [default: none] [env: ISTIO_SERVICE_CIDR]
    #[arg(short = 'i', long = "istio-service-cidr", value_name = "CIDRS")]
    pub service_cidr: Option<String>,

    /// Outbound destinations never captured. [env: ISTIO_SERVICE_EXCLUDE_CIDR]
    #[arg(short = 'x', long = "istio-service-exclude-cidr", value_name = "CIDRS")]
    pub service_exclude_cidr: Option<String>,

    /// Outbound TCP ports (and ranges, 8000-8100) always captured, whatever the destination.
    /// [env: ISTIO_OUTBOUND_PORTS]
    #[arg(short = 'q', long = "istio-outbound-ports", value_name = "PORTS")]
    pub outbound_ports: Option<String>,

    /// Outbound ports (and ranges, 8000-8100) never captured (TCP and UDP). This is the
    /// fix for an app init container that must reach, say, Vault before the sidecar runs.
    /// [env: ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE]
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        value_name = "PORTS"
    )]
    pub local_outbound_ports_exclude: Option<String>,

    /// Virtual interfaces (e.g. KubeVirt VMs) whose inbound traffic is treated as outbound.
    /// [env: KUBE_VIRT_INTERFACES]
    #[arg(short = 'k', long = "kube-virt-interfaces", value_name = "IFACES")]
    pub kube_virt_interfaces: Option<String>,

    /// Print what would be applied instead of applying it. [env: DRY_RUN]
    #[arg(short = 'n', long = "dry-run", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub dry_run: Option<String>,

    /// Capture DNS (UDP and TCP port 53) to the agent on 15053.
    /// [env: REDIRECT_DNS, ISTIO_META_DNS_CAPTURE]
    #[arg(long = "redirect-dns", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub redirect_dns: Option<String>,

    /// With --redirect-dns: capture DNS to any server, not only resolv.conf's.
    /// [env: CAPTURE_ALL_DNS]
    #[arg(long = "capture-all-dns", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub capture_all_dns: Option<String>,

    /// Drop conntrack-INVALID packets instead of letting them reset connections.
    /// [env: DROP_INVALID, INVALID_DROP]
    #[arg(long = "drop-invalid", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub drop_invalid: Option<String>,

    /// Dual-stack pod: IPv6 rules when any address is IPv6. [env: DUAL_STACK, ISTIO_DUAL_STACK]
    #[arg(long = "dual-stack", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub dual_stack: Option<String>,

    /// After applying, check that the rules capture traffic (Istio's istio-validation).
    /// [env: RUN_VALIDATION]
    #[arg(long = "run-validation", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub run_validation: Option<String>,

    /// Do not apply rules (with --run-validation: only validate). [env: SKIP_RULE_APPLY]
    #[arg(long = "skip-rule-apply", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub skip_rule_apply: Option<String>,

    /// Port the validation probe connects to. [default: 15002] [env: IPTABLES_PROBE_PORT]
    #[arg(long = "iptables-probe-port", value_name = "PORT")]
    pub iptables_probe_port: Option<String>,

    /// How long validation waits, as a Go duration. [default: 5s] [env: PROBE_TIMEOUT]
    #[arg(long = "probe-timeout", value_name = "DURATION")]
    pub probe_timeout: Option<String>,

    /// Network namespace to apply in (a path such as /var/run/netns/pod).
    /// [env: NETWORK_NAMESPACE]
    #[arg(long = "network-namespace", value_name = "PATH")]
    pub network_namespace: Option<String>,

    /// Running as a CNI plugin (a node-wide xtables lock is then shared). [env: CNI_MODE]
    #[arg(long = "cni-mode", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub cni_mode: Option<String>,

    /// Converge rules left by an earlier, different configuration. meshinit always does,
    /// atomically, so this is accepted for compatibility. [env: RECONCILE]
    #[arg(long = "reconcile", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub reconcile: Option<String>,

    /// Only remove the rules (same as `meshinit cleanup`). [env: CLEANUP_ONLY]
    #[arg(long = "cleanup-only", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub cleanup_only: Option<String>,

    /// Apply even if the rules look in place. meshinit's apply always converges, so this
    /// changes nothing. [env: FORCE_APPLY]
    #[arg(long = "force-apply", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub force_apply: Option<String>,

    /// Use native nftables instead of iptables. [env: NATIVE_NFTABLES]
    #[arg(long = "native-nftables", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub native_nftables: Option<String>,

    /// Force the iptables implementation: legacy or nft. [default: detect]
    /// [env: FORCE_IPTABLES_BINARY]
    #[arg(long = "force-iptables-binary", value_name = "legacy|nft")]
    pub force_iptables_binary: Option<String>,

    /// Read pod annotations (a Downward API file) and derive the settings Istio's
    /// injector would render from them; explicit flags still win.
    #[arg(long = "annotations", value_name = "FILE")]
    pub annotations: Option<PathBuf>,

    /// Plan IPv6 rules too, instead of detecting it from the pod's addresses as Istio
    /// does. [env: MESHINIT_IPV6]
    #[arg(long = "ipv6", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL", overrides_with = "no_ipv6")]
    pub ipv6: Option<String>,

    /// Plan IPv4 rules only, instead of detecting.
    #[arg(long = "no-ipv6", overrides_with = "ipv6")]
    pub no_ipv6: bool,

    /// DNS servers whose queries --redirect-dns captures, instead of resolv.conf's; empty
    /// means none. [env: MESHINIT_DNS_SERVERS]
    #[arg(long = "dns-servers", value_name = "IPS")]
    pub dns_servers: Option<String>,

    /// Seconds a restore waits for the xtables lock, which iptables-legacy shares across
    /// every pod on the node. [default: 30] [env: MESHINIT_XTABLES_WAIT]
    #[arg(long = "xtables-wait", value_name = "SECONDS")]
    pub xtables_wait: Option<String>,

    /// How --native-nftables programs the kernel: auto, netlink or nft. [default: auto]
    /// [env: MESHINIT_NFTABLES_APPLY]
    ///
    /// auto sends the transaction over netlink, with no nft binary needed, and falls back to
    /// `nft -f` (logging why) if that fails; netlink never launches nft; nft always does.
    #[arg(long = "nftables-apply", value_name = "auto|netlink|nft")]
    pub nftables_apply: Option<String>,

    /// Match long CIDR and port lists with one set each instead of one rule per entry.
    /// [env: MESHINIT_MATCH_SETS]
    ///
    /// Each list of excluded or included CIDRs or ports becomes one rule, so what a new
    /// connection costs does not grow with the lists; verdicts are the same. On iptables
    /// the sets are ipsets, made over netlink (a kernel without ipset gets the plain
    /// rules, with a warning); with --native-nftables, nftables sets.
    #[arg(long = "match-sets", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub match_sets: Option<String>,
}

impl CaptureArgs {
    /// The explicitly given flags, keyed by the setting they set.
    pub fn to_raw(&self) -> RawSettings {
        let mut raw = RawSettings::default();
        let fields: [(Setting, &Option<String>); 37] = [
            (Setting::EnvoyPort, &self.envoy_port),
            (Setting::InboundCapturePort, &self.inbound_capture_port),
            (Setting::InboundTunnelPort, &self.inbound_tunnel_port),
            (Setting::ProxyUid, &self.proxy_uid),
            (Setting::ProxyGid, &self.proxy_gid),
            (Setting::InterceptionMode, &self.interception_mode),
            (Setting::TproxyMark, &self.tproxy_mark),
            (Setting::TproxyRouteTable, &self.tproxy_route_table),
            (Setting::InboundPorts, &self.inbound_ports),
            (Setting::InboundPortsExclude, &self.local_exclude_ports),
            (Setting::ExcludeInterfaces, &self.exclude_interfaces),
            (Setting::OutboundCidrs, &self.service_cidr),
            (Setting::OutboundCidrsExclude, &self.service_exclude_cidr),
            (Setting::OutboundPorts, &self.outbound_ports),
            (
                Setting::OutboundPortsExclude,
                &self.local_outbound_ports_exclude,
            ),
            (Setting::KubeVirtInterfaces, &self.kube_virt_interfaces),
            (Setting::DryRun, &self.dry_run),
            (Setting::RedirectDns, &self.redirect_dns),
            (Setting::CaptureAllDns, &self.capture_all_dns),
            (Setting::DropInvalid, &self.drop_invalid),
            (Setting::DualStack, &self.dual_stack),
            (Setting::RunValidation, &self.run_validation),
            (Setting::SkipRuleApply, &self.skip_rule_apply),
            (Setting::ProbePort, &self.iptables_probe_port),
            (Setting::ProbeTimeout, &self.probe_timeout),
            (Setting::NetworkNamespace, &self.network_namespace),
            (Setting::CniMode, &self.cni_mode),
            (Setting::Reconcile, &self.reconcile),
            (Setting::CleanupOnly, &self.cleanup_only),
            (Setting::ForceApply, &self.force_apply),
            (Setting::NativeNftables, &self.native_nftables),
            (Setting::ForceIptablesBinary, &self.force_iptables_binary),
            (Setting::DnsServers, &self.dns_servers),
            (Setting::Ipv6, &self.ipv6),
            (Setting::XtablesWait, &self.xtables_wait),
            (Setting::NftablesApply, &self.nftables_apply),
            (Setting::MatchSets, &self.match_sets),
        ];
        for (setting, value) in fields {
            if let Some(value) = value {
                raw.set_flag(setting, value.clone());
            }
        }
        if self.no_ipv6 {
            raw.set_flag(Setting::Ipv6, "false");
        }
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::build::SETTINGS;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every setting with a flag in the settings table has exactly that flag, with the same
    /// short name, on the capture subcommands.
    #[test]
    fn every_istio_flag_is_accepted_with_its_short_name() {
        let cmd = Cli::command();
        let apply = cmd.find_subcommand("istio-iptables").unwrap();
        for spec in SETTINGS {
            let Some(long) = spec.long else { continue };
            let arg = apply
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .unwrap_or_else(|| panic!("--{long} is missing"));
            assert_eq!(arg.get_short(), spec.short, "short name of --{long}");
        }
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap()
    }

    /// The fast path must parse exactly as the full definition does.
    #[test]
    fn single_subcommand_parsing_matches_the_full_definition() {
        let cases: &[&[&str]] = &[
            &[
                "meshinit",
                "istio-iptables",
                "-p",
                "15001",
                "-i",
                "*",
                "-x",
                "",
                "-b",
                "*",
                "--log_output_level=default:info",
                "--redirect-dns",
                "-n",
            ],
            &[
                "meshinit",
                "apply",
                "-p",
                "1",
                "-p",
                "2",
                "--log-level",
                "debug",
                "--no-ipv6",
            ],
            &[
                "meshinit",
                "print",
                "--family",
                "ipv6",
                "--ipv6=true",
                "-k",
                "eth1",
            ],
            &["meshinit", "cleanup", "--network-namespace", "/run/netns/x"],
            &["meshinit", "validate", "--probe-timeout", "1s"],
            &["meshinit", "--log-format", "json", "apply"],
        ];
        for argv in cases {
            let args: Vec<OsString> = argv.iter().map(OsString::from).collect();
            let fast = Cli::parse_args(args.clone()).unwrap();
            let full = Cli::try_parse_from(args).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{full:?}"), "{argv:?}");
        }
    }

    #[test]
    fn errors_and_help_come_from_the_full_definition() {
        let err = Cli::parse_args(
            ["meshinit", "apply", "--bogus"]
                .map(OsString::from)
                .to_vec(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        let help = Cli::parse_args(["meshinit", "apply", "--help"].map(OsString::from).to_vec())
            .unwrap_err();
        assert!(
            help.to_string().contains("Apply the capture rules"),
            "{help}"
        );
    }

    #[test]
    fn injector_default_args_parse() {
        let cli = parse(&[
            "meshinit",
            "istio-iptables",
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
            "-m",
            "REDIRECT",
            "-i",
            "*",
            "-x",
            "",
            "-b",
            "*",
            "-d",
            "15090,15021,15020",
            "--log_output_level=default:info",
        ]);
        let Command::IstioIptables(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.service_exclude_cidr.as_deref(), Some(""));
        assert_eq!(
            args.local_exclude_ports.as_deref(),
            Some("15090,15021,15020")
        );
        assert_eq!(
            cli.log.istio_log_output_level.as_deref(),
            Some("default:info")
        );
    }

    #[test]
    fn bool_flags_take_optional_values_like_pflag() {
        let cli = parse(&[
            "meshinit",
            "apply",
            "--redirect-dns",
            "-n",
            "--drop-invalid=false",
        ]);
        let Command::Apply(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.redirect_dns.as_deref(), Some("true"));
        assert_eq!(args.dry_run.as_deref(), Some("true"));
        assert_eq!(args.drop_invalid.as_deref(), Some("false"));
    }

    #[test]
    fn repeated_flags_take_the_last_value_like_pflag() {
        let cli = parse(&["meshinit", "apply", "-p", "1", "-p", "2"]);
        let Command::Apply(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.envoy_port.as_deref(), Some("2"));
    }

    #[test]
    fn no_ipv6_maps_to_false() {
        let cli = parse(&["meshinit", "print", "--no-ipv6"]);
        let Command::Print(args) = cli.command else {
            panic!()
        };
        assert!(args.capture.no_ipv6);
    }
}
