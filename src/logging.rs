//! Logging setup: `tracing` to stderr, plain or JSON, with pilot-agent's flags mapped on.

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use tracing::Level;

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

/// The level from `--log-level`, else pilot-agent's `--log_output_level` ("default:info",
/// "info", "all:debug,default:warn"), else info. Unknown words fall back to info with a
/// warning rather than failing the pod over a logging flag.
pub fn level(args: &LogArgs) -> (Level, Option<String>) {
    let requested = args.log_level.clone().or_else(|| {
        args.istio_log_output_level.as_deref().map(|scopes| {
            scopes
                .split(',')
                .filter_map(|scope| match scope.split_once(':') {
                    Some(("default" | "all", level)) => Some(level),
                    Some(_) => None,
                    None => Some(scope),
                })
                .next_back()
                .unwrap_or("info")
                .to_owned()
        })
    });
    match requested.as_deref().map(str::trim) {
        None => (Level::INFO, None),
        Some(word) => match word.to_ascii_lowercase().as_str() {
            "error" | "fatal" | "none" => (Level::ERROR, None),
            "warn" | "warning" => (Level::WARN, None),
            "info" => (Level::INFO, None),
            "debug" => (Level::DEBUG, None),
            "trace" => (Level::TRACE, None),
            _ => (
                Level::INFO,
                Some(format!("unknown log level {word:?}, using info")),
            ),
        },
    }
}

fn json(args: &LogArgs) -> bool {
    match args.log_format {
        Some(format) => format == LogFormat::Json,
        None => args
            .istio_log_as_json
            .as_deref()
            .is_some_and(|v| crate::config::parse::parse_bool(v) == Ok(true)),
    }
}

pub fn init(args: &LogArgs) {
    let (level, warning) = level(args);
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let installed = if json(args) {
        tracing::subscriber::set_global_default(builder.json().flatten_event(true).finish())
    } else {
        tracing::subscriber::set_global_default(builder.without_time().finish())
    };
    if installed.is_err() {
        return;
    }
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn args(extra: &[&str]) -> LogArgs {
        let mut argv = vec!["meshinit", "print"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().log
    }

    #[test]
    fn pilot_agent_levels_map_onto_ours() {
        assert_eq!(
            level(&args(&["--log_output_level=default:debug"])).0,
            Level::DEBUG
        );
        assert_eq!(level(&args(&["--log_output_level=warn"])).0, Level::WARN);
        assert_eq!(
            level(&args(&["--log_output_level=ads:debug,default:error"])).0,
            Level::ERROR
        );
        assert_eq!(level(&args(&[])).0, Level::INFO);
        assert!(level(&args(&["--log-level", "loud"])).1.is_some());
    }

    #[test]
    fn log_as_json_selects_json() {
        assert!(json(&args(&["--log_as_json"])));
        assert!(!json(&args(&["--log_as_json=false"])));
        assert!(!json(&args(&["--log_as_json", "--log-format", "plain"])));
    }
}
