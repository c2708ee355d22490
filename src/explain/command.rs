//! `meshinit explain`: the connection asked about, described as a packet, walked through the
//! planned ruleset, and told as text or JSON.

use std::io::Write;

use super::{explain, Direction, Explanation, Packet, Verdict};
use clap::{Args, ValueEnum};

use crate::config::{Config, ConfigError};
use crate::error::Error;
use crate::rules::iptables::model::{Family, Owner, Protocol};

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

/// The connection asked about, and how to answer (`meshinit explain`'s own flags).
#[derive(Debug, Args)]
pub struct Query {
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
}

/// Explains the connection `args` describe for a pod with `config`; writes the answer.
pub fn run(args: &Query, config: &Config, out: &mut dyn Write) -> Result<(), Error> {
    let packet = described_packet(args, config)?;
    let ruleset = crate::engine::iptables_plan(config);
    let family = if packet.destination.is_ipv6() {
        Family::V6
    } else {
        Family::V4
    };
    let explanation = match ruleset.family(family) {
        Some(rules) => explain(rules, &packet),
        // No IPv6 rules planned: nothing touches IPv6 traffic.
        None => Explanation {
            verdict: Verdict::Direct,
            steps: Vec::new(),
        },
    };
    let text = match args.format {
        OutputFormat::Json => explanation_json(&explanation, family),
        OutputFormat::Text => explanation_text(
            &explanation,
            &packet,
            family,
            config,
            ruleset.family(family).is_some(),
        ),
    };
    out.write_all(text.as_bytes()).map_err(Error::Output)
}

/// The connection `meshinit explain` was asked about, with defaults filled in.
fn described_packet(args: &Query, config: &Config) -> Result<Packet, Error> {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    let direction = if args.inbound {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    let (destination, destination_port) = match (&args.dst, &args.port) {
        (Some(dst), _) => {
            let addr: SocketAddr = dst.parse().map_err(|_| {
                ConfigError::invalid_flag(
                    "dst",
                    dst,
                    "expected ADDR:PORT, such as 198.51.100.30:8200 or [2001:db8::1]:443",
                )
            })?;
            (addr.ip(), addr.port())
        }
        (None, Some(port)) if args.inbound => {
            let port = crate::config::parse::parse_port(port)
                .map_err(|reason| ConfigError::invalid_flag("port", port, reason))?;
            (IpAddr::V4(Ipv4Addr::UNSPECIFIED), port.get())
        }
        _ => {
            return Err(ConfigError::invalid_flag(
                "dst",
                "",
                "explain needs --dst ADDR:PORT (or, with --inbound, --port PORT)",
            )
            .into())
        }
    };
    let source = match &args.src {
        Some(src) => Some(
            src.parse::<IpAddr>()
                .map_err(|_| ConfigError::invalid_flag("src", src, "expected an IP address"))?,
        ),
        None => None,
    };
    let owner = |long: &'static str, value: &Option<String>| {
        value
            .as_deref()
            .map(|v| {
                crate::config::parse::parse_owner(v)
                    .map_err(|reason| ConfigError::invalid_flag(long, v, reason))
            })
            .transpose()
    };
    let (uid, gid) = if args.inbound {
        (None, None)
    } else {
        // By default an app: any uid that is not the proxy's.
        let app = (1000..)
            .map(Owner::Id)
            .find(|id| !config.capture.proxy_uids.contains(id))
            .unwrap_or(Owner::Id(1000));
        let uid = owner("uid", &args.uid)?.unwrap_or(app);
        let gid = owner("gid", &args.gid)?.unwrap_or_else(|| uid.clone());
        (Some(uid), Some(gid))
    };
    let interface = match &args.iface {
        Some(iface) => crate::config::parse::parse_interface(iface)
            .map_err(|reason| ConfigError::invalid_flag("iface", iface, reason))?
            .as_str()
            .to_owned(),
        None if !args.inbound && destination.is_loopback() => "lo".to_owned(),
        None => "eth0".to_owned(),
    };
    Ok(Packet {
        direction,
        protocol: match args.proto {
            ProtoArg::Tcp => Protocol::Tcp,
            ProtoArg::Udp => Protocol::Udp,
        },
        source,
        source_port: None,
        destination,
        destination_port,
        interface,
        uid,
        gid,
    })
}

fn explanation_json(explanation: &Explanation, family: Family) -> String {
    let (verdict, port) = match explanation.verdict {
        Verdict::Redirected { port } => ("redirected", Some(port)),
        Verdict::Tproxied { port } => ("tproxied", Some(port)),
        Verdict::Direct => ("direct", None),
        Verdict::Dropped => ("dropped", None),
    };
    let rules: Vec<String> = explanation.steps.iter().map(ToString::to_string).collect();
    let json = serde_json::json!({
        "verdict": verdict,
        "port": port,
        "family": family.name(),
        "rules": rules,
    });
    format!("{json}\n")
}

fn explanation_text(
    explanation: &Explanation,
    packet: &Packet,
    family: Family,
    config: &Config,
    family_planned: bool,
) -> String {
    let capture = &config.capture;
    let proto = match packet.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    let mut text = match packet.direction {
        Direction::Outbound => format!(
            "outbound {proto} to {} port {} from uid {} (gid {}), leaving by {} ({family}):\n",
            packet.destination,
            packet.destination_port,
            packet.uid.as_ref().map_or("?".into(), ToString::to_string),
            packet.gid.as_ref().map_or("?".into(), ToString::to_string),
            packet.interface
        ),
        Direction::Inbound => format!(
            "inbound {proto} to port {} arriving on {} ({family}):\n",
            packet.destination_port, packet.interface
        ),
    };
    let listener = |port: u16| {
        if port == capture.proxy_port.get() {
            "the sidecar's outbound listener"
        } else if port == capture.inbound_capture_port.get() {
            "the sidecar's inbound listener"
        } else if port == crate::rules::decisions::DNS_PROXY_PORT {
            "the agent's DNS proxy"
        } else {
            "a local listener"
        }
    };
    match explanation.verdict {
        Verdict::Redirected { port } | Verdict::Tproxied { port } => {
            text.push_str(&format!("  {}, {}\n", explanation.verdict, listener(port)))
        }
        Verdict::Direct => text.push_str(&format!("  {}\n", explanation.verdict)),
        Verdict::Dropped => text.push_str("  dropped\n"),
    }
    if !family_planned {
        text.push_str(&format!(
            "  no {family} rules are planned for this pod (--ipv6 plans them)\n"
        ));
    }
    if !explanation.steps.is_empty() {
        text.push_str("\nrules, in the order the packet meets them:\n");
        for step in &explanation.steps {
            text.push_str(&format!(
                "  {:<7} -A {} {}\n",
                step.table.name(),
                step.chain.name(),
                step.rule
            ));
        }
    }
    let to_sidecar = matches!(explanation.verdict, Verdict::Redirected { port } if port == capture.proxy_port.get());
    if packet.direction == Direction::Outbound && to_sidecar {
        let bits = if packet.destination.is_ipv6() {
            128
        } else {
            32
        };
        text.push_str(&format!(
            "\nThis connection goes to the sidecar. Made before istio-proxy listens (from an app's init \
             container fetching secrets from Vault, say), it fails. To let it through:\n\
             \x20 - exclude the port: -o {port} (annotation traffic.sidecar.istio.io/excludeOutboundPorts: \"{port}\")\n\
             \x20 - or the address: -x {dst}/{bits} (traffic.sidecar.istio.io/excludeOutboundIPRanges: \"{dst}/{bits}\")\n\
             \x20 - or run that init container as the proxy's uid (securityContext.runAsUser: {uid})\n\
             \x20 - or start istio-proxy first, as a native sidecar (manifests/ has an example)\n",
            port = packet.destination_port,
            dst = packet.destination,
            uid = capture.proxy_uids.first().map_or("1337".into(), ToString::to_string),
        ));
    }
    text
}
