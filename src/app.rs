//! The commands: wires config, plan and render (and, for `apply`, the kernel) together.

use std::io::Write;
use std::time::Instant;

use crate::apply::{
    IpSets, IptablesTools, Netfilter as _, NetlinkIpSets, NetlinkRouting, NftTool, Nftables as _,
    RunLock,
};
use crate::cli::{
    CaptureArgs, Cli, Command, ExplainArgs, FamilyArg, OutputFormat, PrintArgs, ProtoArg,
};
use crate::config::{
    validate, Annotations, AnnotationsVerdict, Config, ConfigOutcome, RunOptions, SystemHost,
    Validated,
};
use crate::error::Error;
use crate::explain::{Direction, Packet, Verdict};
use crate::rules::iptables::render_fresh;
use crate::rules::model::Family;
use crate::rules::model::{Owner, Protocol};
use crate::rules::routes::render_routing;
use crate::rules::{plan_with, PlanOptions, Ruleset};

/// Environment lookup, injectable so tests need not mutate the process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Either the validated settings, or the reason this pod needs nothing done.
pub enum Prepared {
    Skip(String),
    Ready(Box<Validated>),
}

/// Flags, annotations and environment → validated settings. No system state is read
/// beyond the annotations file named on the command line.
pub fn prepare(args: &CaptureArgs, env: Env<'_>) -> Result<Prepared, Error> {
    let mut raw = args.to_raw();
    if let Some(path) = &args.annotations {
        let annotations = Annotations::load(path)?;
        if let AnnotationsVerdict::Skip(reason) = annotations.derive(&mut raw)? {
            return Ok(Prepared::Skip(reason));
        }
    }
    Ok(Prepared::Ready(Box::new(validate(&raw, env)?)))
}

/// Validated settings → a config, reading host facts only where no option settled them.
pub fn resolve(validated: Validated) -> Result<Option<Config>, Error> {
    match validated.resolve(&SystemHost::default())? {
        ConfigOutcome::Skip { reason } => {
            tracing::info!("{reason}; nothing to do");
            Ok(None)
        }
        ConfigOutcome::Capture(config) => Ok(Some(*config)),
    }
}

pub fn run(cli: &Cli, env: Env<'_>) -> Result<(), Error> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match &cli.command {
        Command::Print(args) => print(args, env, &mut out),
        Command::Apply(args) | Command::IstioIptables(args) => apply(args, env, &mut out),
        Command::Cleanup(args) => cleanup(args, env),
        Command::Explain(args) => explain_connection(args, env, &mut out),
        Command::Cni => match crate::cni::run_stdin(env, &mut std::io::stdin(), &mut out) {
            0 => Ok(()),
            code => Err(Error::CniFailed(code)),
        },
        Command::Validate(args) => match configured(args, env)? {
            Some(config) => validate_capture(&config),
            None => Ok(()),
        },
    }
}

fn print(args: &PrintArgs, env: Env<'_>, out: &mut dyn Write) -> Result<(), Error> {
    let Some(config) = configured(&args.capture, env)? else {
        return Ok(());
    };
    if config.run.native_nftables {
        if let Some(family) = args.family {
            let value = match family {
                FamilyArg::Ipv4 => "ipv4",
                FamilyArg::Ipv6 => "ipv6",
            };
            return Err(flag_error(
                "family",
                value,
                "--native-nftables plans one inet ruleset for both families; leave --family out",
            ));
        }
        let text = crate::rules::nft::render::render_plan(&nft_plan(&config));
        return out.write_all(text.as_bytes()).map_err(Error::Output);
    }
    let ruleset = iptables_plan(&config);
    let text = match args.family {
        None => render_plan(&ruleset),
        Some(family) => {
            let family = match family {
                FamilyArg::Ipv4 => Family::V4,
                FamilyArg::Ipv6 => Family::V6,
            };
            let rules = ruleset.family(family).ok_or(Error::Ipv6Disabled)?;
            render_fresh(rules)
        }
    };
    out.write_all(text.as_bytes()).map_err(Error::Output)
}

/// Prepare and resolve in one go, for commands with nothing to do in between.
fn configured(args: &CaptureArgs, env: Env<'_>) -> Result<Option<Config>, Error> {
    match prepare(args, env)? {
        Prepared::Skip(reason) => {
            tracing::info!("{reason}; nothing to do");
            Ok(None)
        }
        Prepared::Ready(validated) => resolve(*validated),
    }
}

/// The whole dry-run: each family's restore input, then the routing changes.
pub fn render_plan(ruleset: &Ruleset) -> String {
    let mut text = String::new();
    for family in Family::ALL {
        let tool = match family {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        };
        match ruleset.family(family) {
            Some(rules) => {
                let sets = crate::rules::ipset::render_sets(rules);
                if !sets.is_empty() {
                    text.push_str(&format!(
                        "# {family}: ipsets first (created over netlink; `ipset restore` input)\n"
                    ));
                    text.push_str(&sets);
                }
                text.push_str(&format!("# {family}: {tool} --noflush input\n"));
                text.push_str(&render_fresh(rules));
            }
            None => text.push_str(&format!(
                "# {family}: off (no IPv6 rules; --ipv6 plans them)\n"
            )),
        }
    }
    let routing = render_routing(ruleset);
    if !routing.is_empty() {
        text.push_str("# routing: equivalent ip commands\n");
        text.push_str(&routing);
    }
    text
}

fn apply(args: &CaptureArgs, env: Env<'_>, out: &mut dyn Write) -> Result<(), Error> {
    let validated = match prepare(args, env)? {
        Prepared::Skip(reason) => {
            tracing::info!("{reason}; nothing to do");
            return Ok(());
        }
        Prepared::Ready(validated) => validated,
    };
    let run = validated.run_options().clone();
    if run.dry_run {
        let Some(config) = resolve(*validated)? else {
            return Ok(());
        };
        tracing::info!("dry run: printing the plan, changing nothing");
        let text = if run.native_nftables {
            crate::rules::nft::render::render_plan(&nft_plan(&config))
        } else {
            render_plan(&iptables_plan(&config))
        };
        return out.write_all(text.as_bytes()).map_err(Error::Output);
    }
    if run.skip_rule_apply {
        tracing::info!("--skip-rule-apply: not applying rules");
        if run.run_validation {
            if let Some(config) = resolve(*validated)? {
                validate_capture(&config)?;
            }
        }
        return Ok(());
    }
    enter_pod_namespace(&run)?;
    if run.cleanup_only {
        return remove_everything(&run);
    }
    let Some(config) = resolve(*validated)? else {
        return Ok(());
    };
    install(&config)?;
    crate::caps::drop_all()?;
    if run.run_validation {
        validate_capture(&config)?;
    }
    Ok(())
}

/// Istio's validation probe, for this config's ports and family.
fn validate_capture(config: &Config) -> Result<(), Error> {
    let capture = &config.capture;
    let probe = crate::validate::Probe {
        // Istio probes over IPv6 only for an IPv6 pod; dual-stack pods are probed over IPv4.
        ipv6: capture.ipv6 && !config.run.dual_stack,
        listen_ports: vec![capture.proxy_port, capture.inbound_capture_port],
        probe_port: config.run.probe_port,
        timeout: config.run.probe_timeout,
        proxy_uid: capture
            .proxy_uids
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    };
    crate::validate::run(&probe)?;
    Ok(())
}

/// Plans `config` and applies it in the current network namespace: what the init
/// container and the CNI plugin both do once the settings are known.
pub fn install(config: &Config) -> Result<(), Error> {
    if config.run.native_nftables {
        return install_nftables(config);
    }
    let run = &config.run;
    let families: Vec<Family> = if config.capture.ipv6 {
        Family::ALL.to_vec()
    } else {
        vec![Family::V4]
    };
    let started = Instant::now();
    let _run_lock = RunLock::acquire(run.xtables_wait)?;
    let mut tools = IptablesTools::detect(run.force_backend, &families, run.xtables_wait)?;
    tools.prepare(&families)?;
    let mut sets = NetlinkIpSets::default();
    let ruleset = kernel_plan(config, &mut sets);
    tools.hold_xtables_lock(&run.xtables_lockfile)?;
    let mut routing = NetlinkRouting::default();
    let summary = crate::apply::apply(&mut tools, &mut routing, &mut sets, &ruleset);
    tools.release_xtables_lock();
    let summary = summary?;
    let rules: Vec<String> = summary
        .rules
        .iter()
        .map(|(family, table, count)| format!("{family}/{}={count}", table.name()))
        .collect();
    tracing::info!(
        backend = tools.backend().name(),
        rules = %rules.join(","),
        converged = ?summary.converged,
        routing_added = summary.routing_added,
        routing_removed = summary.routing_removed,
        sets_created = summary.sets_created,
        sets_removed = summary.sets_removed,
        processes = tools.processes_launched(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        peak_rss_kib = peak_rss_kib(),
        "applied"
    );
    Ok(())
}

/// The iptables plan for `config` as asked (`--match-sets` shapes it): what a dry-run
/// prints and `explain` walks.
pub fn iptables_plan(config: &Config) -> Ruleset {
    let options = PlanOptions {
        match_sets: config.run.match_sets,
    };
    plan_with(&config.capture, options)
}

/// The iptables plan to apply here: with `--match-sets` on a kernel without ipset, the
/// plain chains, which decide the same.
pub fn kernel_plan(config: &Config, sets: &mut dyn IpSets) -> Ruleset {
    if config.run.match_sets && !sets.available() {
        tracing::warn!(
            "--match-sets: this kernel has no ipset support (CONFIG_IP_SET); \
             matching one rule per list entry instead"
        );
        return plan_with(&config.capture, PlanOptions::default());
    }
    iptables_plan(config)
}

/// The nftables plan for `config` (`--match-sets` shapes it).
pub fn nft_plan(config: &Config) -> crate::rules::nft::NftRuleset {
    let options = crate::rules::nft::PlanOptions {
        match_sets: config.run.match_sets,
    };
    crate::rules::nft::plan_with(&config.capture, options)
}

/// `install` for `--native-nftables`: one transaction for both families, over netlink or
/// through `nft -f -` (`--nftables-apply`).
fn install_nftables(config: &Config) -> Result<(), Error> {
    let started = Instant::now();
    let _run_lock = RunLock::acquire(config.run.xtables_wait)?;
    let mut nft = NftTool::new();
    let mode = config.run.nftables_apply;
    if mode == crate::config::NftablesApply::Nft {
        nft.require()?;
    }
    let ruleset = nft_plan(config);
    let summary =
        crate::apply::apply_nftables(&mut nft, &mut NetlinkRouting::default(), &ruleset, mode)?;
    let rules: Vec<String> = summary
        .rules
        .iter()
        .map(|(table, count)| format!("inet/{}={count}", table.name()))
        .collect();
    tracing::info!(
        backend = "nftables",
        via = summary.programmed.via(),
        match_sets = config.run.match_sets,
        rules = %rules.join(","),
        converged = summary.converged,
        routing_added = summary.routing_added,
        routing_removed = summary.routing_removed,
        processes = nft.processes_launched(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        peak_rss_kib = peak_rss_kib(),
        "applied"
    );
    Ok(())
}

/// This process's own peak resident memory in KiB (children excluded), for the summary
/// line: the init container's memory limit is sized from it. `VmHWM`, because the
/// `getrusage` peak survives exec and would report the container runtime's own.
fn peak_rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(-1)
}

/// Checks capabilities first, so a pod without them fails before anything is touched.
fn enter_pod_namespace(run: &RunOptions) -> Result<(), Error> {
    crate::caps::check_required()?;
    if let Some(path) = &run.network_namespace {
        crate::netns::enter(path)?;
        tracing::info!(netns = %path.display(), "entered network namespace");
    }
    Ok(())
}

fn cleanup(args: &CaptureArgs, env: Env<'_>) -> Result<(), Error> {
    // Bad flags are refused here too, before anything is touched.
    let run = match prepare(args, env)? {
        Prepared::Ready(validated) => validated.run_options().clone(),
        Prepared::Skip(_) => {
            let mut raw = args.to_raw();
            raw.set_flag(crate::config::build::Setting::InterceptionMode, "REDIRECT");
            validate(&raw, env)?.run_options().clone()
        }
    };
    enter_pod_namespace(&run)?;
    remove_everything(&run)
}

/// Removes meshinit's rules from both families (IPv6 when ip6tables exists), its nftables
/// tables (`--native-nftables`: only those), and routing.
pub fn remove_everything(run: &RunOptions) -> Result<(), Error> {
    let started = Instant::now();
    let _run_lock = RunLock::acquire(run.xtables_wait)?;
    let mut nft = NftTool::new();
    if run.native_nftables {
        let removed = crate::apply::cleanup_native(
            &mut nft,
            &mut NetlinkRouting::default(),
            run.nftables_apply,
        )?;
        crate::caps::drop_all()?;
        tracing::info!(
            backend = "nftables",
            removed,
            processes = nft.processes_launched(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cleaned up"
        );
        return Ok(());
    }
    let (mut tools, families) =
        match IptablesTools::detect(run.force_backend, &Family::ALL, run.xtables_wait) {
            Ok(tools) => (tools, Family::ALL.to_vec()),
            Err(err) => {
                tracing::debug!(%err, "no usable ip6tables; cleaning IPv4 only");
                let tools =
                    IptablesTools::detect(run.force_backend, &[Family::V4], run.xtables_wait)?;
                (tools, vec![Family::V4])
            }
        };
    tools.hold_xtables_lock(&run.xtables_lockfile)?;
    let removed = crate::apply::cleanup(
        &mut tools,
        &mut NetlinkRouting::default(),
        &mut NetlinkIpSets::default(),
        &families,
    );
    // Tables an earlier --native-nftables run left: one netlink dump, nft only if there are.
    let mut failures = Vec::new();
    let removed = crate::apply::keep_going(removed, &mut failures)
        + crate::apply::keep_going(
            crate::apply::cleanup_nftables(&mut nft, run.nftables_apply),
            &mut failures,
        );
    crate::apply::all_of(failures)?;
    crate::caps::drop_all()?;
    tracing::info!(
        backend = tools.backend().name(),
        removed,
        processes = tools.processes_launched() + nft.processes_launched(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "cleaned up"
    );
    Ok(())
}

fn flag_error(long: &'static str, value: &str, reason: impl Into<String>) -> Error {
    Error::Config(crate::config::ConfigError::InvalidValue {
        origin: crate::config::Origin::Flag { long, short: None },
        value: value.to_owned(),
        reason: reason.into(),
    })
}

/// The connection `meshinit explain` was asked about, with defaults filled in.
fn described_packet(args: &ExplainArgs, config: &Config) -> Result<Packet, Error> {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    let direction = if args.inbound {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    let (destination, destination_port) = match (&args.dst, &args.port) {
        (Some(dst), _) => {
            let addr: SocketAddr = dst.parse().map_err(|_| {
                flag_error(
                    "dst",
                    dst,
                    "expected ADDR:PORT, such as 198.51.100.30:8200 or [2001:db8::1]:443",
                )
            })?;
            (addr.ip(), addr.port())
        }
        (None, Some(port)) if args.inbound => {
            let port = crate::config::parse::parse_port(port)
                .map_err(|reason| flag_error("port", port, reason))?;
            (IpAddr::V4(Ipv4Addr::UNSPECIFIED), port.get())
        }
        _ => {
            return Err(flag_error(
                "dst",
                "",
                "explain needs --dst ADDR:PORT (or, with --inbound, --port PORT)",
            ))
        }
    };
    let source = match &args.src {
        Some(src) => Some(
            src.parse::<IpAddr>()
                .map_err(|_| flag_error("src", src, "expected an IP address"))?,
        ),
        None => None,
    };
    let owner = |long: &'static str, value: &Option<String>| {
        value
            .as_deref()
            .map(|v| {
                crate::config::parse::parse_owner(v).map_err(|reason| flag_error(long, v, reason))
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
            .map_err(|reason| flag_error("iface", iface, reason))?
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

fn explain_connection(args: &ExplainArgs, env: Env<'_>, out: &mut dyn Write) -> Result<(), Error> {
    let Some(config) = configured(&args.capture, env)? else {
        return Ok(());
    };
    let packet = described_packet(args, &config)?;
    let ruleset = iptables_plan(&config);
    let family = if packet.destination.is_ipv6() {
        Family::V6
    } else {
        Family::V4
    };
    let explanation = match ruleset.family(family) {
        Some(rules) => crate::explain::explain(rules, &packet),
        // No IPv6 rules planned: nothing touches IPv6 traffic.
        None => crate::explain::Explanation {
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
            &config,
            ruleset.family(family).is_some(),
        ),
    };
    out.write_all(text.as_bytes()).map_err(Error::Output)
}

fn explanation_json(explanation: &crate::explain::Explanation, family: Family) -> String {
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
    explanation: &crate::explain::Explanation,
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
        } else if port == crate::rules::plan::DNS_PROXY_PORT {
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
