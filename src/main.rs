//! The `meshinit` binary: parse, run, and turn any error into one line and an exit code.

use std::process::ExitCode;

use meshinit::cli::Cli;
use meshinit::error::exit;

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // A CNI runtime executes the plugin by its configured type name, with no arguments.
    let invoked_as = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name());
    if invoked_as.is_some_and(|name| name == "meshinit-cni") {
        args.insert(1, "cni".into());
    }
    let cli = match Cli::parse_args(args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            // Help and version are not failures; usage errors exit 1 as Istio's do.
            return if err.use_stderr() {
                ExitCode::from(exit::BAD_INPUT)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    meshinit::logging::init(&cli.log);
    match meshinit::app::run(&cli, &meshinit::app::process_env) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("meshinit: {}", meshinit::error::report(&err));
            ExitCode::from(err.exit_code())
        }
    }
}
