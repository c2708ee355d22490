//! The commands: wires config, plan and render (and, for `apply`, the kernel) together.

use std::io::Write;

use crate::cli::{CaptureArgs, Cli, Command, FamilyArg, PrintArgs};
use crate::config::{
    validate, Annotations, AnnotationsVerdict, Config, ConfigOutcome, SystemHost, Validated,
};
use crate::error::Error;
use crate::rules::iptables::render_fresh;
use crate::rules::model::Family;
use crate::rules::routes::render_routing;
use crate::rules::{plan, Ruleset};

/// Environment lookup, injectable so tests need not mutate the process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Either the validated settings, or the reason this pod needs nothing done.
pub enum Prepared {
    Skip(String),
    Ready(Validated),
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
    Ok(Prepared::Ready(validate(&raw, env)?))
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
    }
}

fn print(args: &PrintArgs, env: Env<'_>, out: &mut dyn Write) -> Result<(), Error> {
    let Some(config) = configured(&args.capture, env)? else {
        return Ok(());
    };
    let ruleset = plan(&config.capture);
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
        Prepared::Ready(validated) => {
            let config = resolve(validated)?;
            if config.as_ref().is_some_and(|c| c.run.native_nftables) {
                return Err(Error::NativeNftablesUnsupported);
            }
            Ok(config)
        }
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
                text.push_str(&format!("# {family}: {tool} --noflush input\n"));
                text.push_str(&render_fresh(rules));
            }
            None => text.push_str(&format!(
                "# {family}: off (IPv6 not detected; --ipv6 forces it)\n"
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
    let Some(config) = configured(args, env)? else {
        return Ok(());
    };
    if config.run.dry_run {
        tracing::info!("dry run: printing the plan, changing nothing");
        let text = render_plan(&plan(&config.capture));
        return out.write_all(text.as_bytes()).map_err(Error::Output);
    }
    Err(Error::ApplyUnavailable)
}

fn cleanup(args: &CaptureArgs, env: Env<'_>) -> Result<(), Error> {
    let _ = prepare(args, env)?;
    Err(Error::ApplyUnavailable)
}
