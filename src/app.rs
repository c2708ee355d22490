//! The commands: each takes its arguments through config, then hands the validated
//! settings to the engine (or to explain, validate, the CNI plugin). Nothing else.

use std::io::Write;

use crate::cli::{CaptureArgs, Cli, Command, FamilyArg, PrintArgs};
use crate::config::{
    validate, Annotations, AnnotationsVerdict, Config, ConfigOutcome, Env, RunOptions, SystemHost,
    Validated,
};
use crate::engine::{self, Engine};
use crate::error::Error;
use crate::values::Family;

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
        Command::Explain(args) => match configured(&args.capture, env)? {
            Some(config) => crate::explain::command::run(&args.query, &config, &mut out),
            None => Ok(()),
        },
        Command::Cni => match crate::cni::run_stdin(env, &mut std::io::stdin(), &mut out) {
            0 => Ok(()),
            code => Err(Error::CniFailed(code)),
        },
        Command::Check(args) => check(args, env, &mut out),
        Command::Validate(args) => match configured(args, env)? {
            Some(config) => validate_capture(&config),
            None => Ok(()),
        },
    }
}

fn print(args: &PrintArgs, env: Env<'_>, out: &mut dyn Write) -> Result<(), Error> {
    let validated = match prepare(&args.capture, env)? {
        Prepared::Skip(reason) => {
            tracing::info!("{reason}; nothing to do");
            return Ok(());
        }
        Prepared::Ready(validated) => validated,
    };
    let text = what_apply_does(*validated, args.family)?;
    out.write_all(text.as_bytes()).map_err(Error::Output)
}

/// What `apply` does with these settings, as `print` (and `apply --dry-run`) shows it: a
/// comment line with the run's settings, then the rules and routing it installs; with
/// --skip-rule-apply or --cleanup-only, only what apply does then. With `family`, only that
/// family's restore input (nothing when apply installs nothing), to pipe into a restore.
fn what_apply_does(validated: Validated, family: Option<FamilyArg>) -> Result<String, Error> {
    let run = validated.run_options().clone();
    let mut text = match family {
        None => engine::notes::run_settings(&run),
        Some(_) => String::new(),
    };
    let note = |text: &mut String, line: &str| {
        if family.is_none() {
            text.push_str(line);
        }
    };
    if run.skip_rule_apply {
        note(&mut text, engine::notes::SKIP_RULE_APPLY);
        return Ok(text);
    }
    if run.cleanup_only {
        note(&mut text, engine::notes::CLEANUP_ONLY);
        return Ok(text);
    }
    let Some(config) = resolve(validated)? else {
        return Ok(text);
    };
    let engine = Engine::of(&config.run);
    text.push_str(&match family {
        None => engine.dry_run(&config),
        Some(FamilyArg::Ipv4) => engine.dry_run_family(&config, Family::V4)?,
        Some(FamilyArg::Ipv6) => engine.dry_run_family(&config, Family::V6)?,
    });
    Ok(text)
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
        tracing::info!("dry run: printing the plan, changing nothing");
        let text = what_apply_does(*validated, None)?;
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
        return Ok(Engine::of(&run).remove_everything(&run)?);
    }
    let Some(config) = resolve(*validated)? else {
        return Ok(());
    };
    Engine::of(&config.run).install(&config)?;
    if run.run_validation {
        // The probe runs with the rules in, and must not be able to change them. Without
        // it nothing runs after the apply: the capabilities end with the process, and
        // dropping them one by one first (some 80 system calls) would only cost each pod.
        crate::caps::drop_all()?;
        validate_capture(&config)?;
    }
    Ok(())
}

/// `check`: the pod's state against the plan of these flags, as CNI CHECK compares them.
fn check(args: &CaptureArgs, env: Env<'_>, out: &mut dyn Write) -> Result<(), Error> {
    let validated = match prepare(args, env)? {
        Prepared::Skip(reason) => {
            tracing::info!("{reason}; nothing to check");
            return Ok(());
        }
        Prepared::Ready(validated) => validated,
    };
    enter_pod_namespace(validated.run_options())?;
    let Some(config) = resolve(*validated)? else {
        return Ok(());
    };
    let drift = Engine::of(&config.run).drift(&config)?;
    for difference in &drift {
        writeln!(out, "{difference}").map_err(Error::Output)?;
    }
    if drift.is_empty() {
        Ok(())
    } else {
        Err(Error::Drifted(drift.len()))
    }
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
    Ok(Engine::of(&run).remove_everything(&run)?)
}
