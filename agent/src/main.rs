//! `meshinit-cni-agent`: parses its settings, sets up logging, runs the agent, and is the
//! one place that prints a fatal error and picks the exit code.

use clap::Parser;
use meshinit_cni_agent::{agent, settings::Args};
use std::process::ExitCode;

fn main() -> ExitCode {
    let settings = match Args::parse().validate() {
        Ok(settings) => settings,
        Err(err) => return fail(&err, 2),
    };
    // Colours only on a terminal: `kubectl logs` shows escape codes as they are.
    let builder = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(settings.log_level)
        .with_writer(std::io::stderr);
    if settings.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&err, 1),
    };
    match runtime.block_on(agent::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err, 1),
    }
}

/// Prints `meshinit-cni-agent: a: b: c`, the error and its causes.
fn fail(err: &dyn std::error::Error, code: u8) -> ExitCode {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    eprintln!("meshinit-cni-agent: {message}");
    ExitCode::from(code)
}
