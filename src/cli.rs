//! Command-line interface: Istio's `istio-iptables` flags, unchanged, plus meshinit's own.
//!
//! Every value is taken as a string here and validated by `config`, so the same checks
//! and messages apply to flags, environment variables and annotations alike.

use std::path::PathBuf;

use std::ffi::OsString;

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::config::build::{RawSettings, Setting, SettingSpec, SETTINGS};
use crate::explain::command::Query;
pub use crate::logging::{LogArgs, LogFormat};

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
    /// Compare this (or --network-namespace's) namespace with what `apply` would install
    /// for the same flags, as CNI CHECK compares: every rule, routing entry and set member
    /// of meshinit's. Exits 0 when nothing differs; otherwise prints each difference, one a
    /// line, and exits 5. Changes nothing.
    Check(CaptureArgs),
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

/// `explain`'s arguments: the connection asked about, then the pod's capture settings.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub query: Query,

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

/// Istio's `istio-iptables` flags, each with its help, default and environment variables
/// from the one settings table (`config::build::SETTINGS`), plus meshinit's `--annotations`
/// and `--no-ipv6`. Values are kept as given: `config` validates flags, environment and
/// annotations alike. A flag beats a value from --annotations, which beats the environment.
#[derive(Debug, Default, Clone)]
pub struct CaptureArgs {
    /// The flags given, by the setting each sets.
    flags: RawSettings,
    /// Read pod annotations (a Downward API file) and derive the settings Istio's
    /// injector would render from them.
    pub annotations: Option<PathBuf>,
}

impl CaptureArgs {
    /// The explicitly given flags, keyed by the setting they set.
    pub fn to_raw(&self) -> RawSettings {
        self.flags.clone()
    }

    /// What the flag for `setting` was given as, if it was.
    pub fn flag(&self, setting: Setting) -> Option<&str> {
        self.flags.flag(setting)
    }
}

/// Whether pflag parses the flag's value (a boolean, port or duration), not just keeps it.
fn typed(spec: &SettingSpec) -> bool {
    spec.is_bool || matches!(spec.setting, Setting::ProbePort | Setting::ProbeTimeout)
}

/// The command-line argument for `spec`, if it has a flag.
fn flag_arg(spec: &SettingSpec) -> Option<Arg> {
    let long = spec.long?;
    let default = match (spec.default_doc, spec.is_bool) {
        ("", true) => "",
        ("", false) => spec.default,
        (stated, _) => stated,
    };
    let mut help = spec.help.to_owned();
    if !default.is_empty() {
        help.push_str(&format!(" [default: {default}]"));
    }
    if !spec.envs.is_empty() {
        help.push_str(&format!(" [env: {}]", spec.envs.join(", ")));
    }
    let mut arg = Arg::new(long)
        .long(long)
        .value_name(spec.value_name)
        .help(help.clone());
    if let Some(short) = spec.short {
        arg = arg.short(short);
    }
    if !spec.details.is_empty() {
        arg = arg.long_help(format!("{help}\n\n{}", spec.details));
    }
    if typed(spec) {
        // pflag parses every occurrence of a typed flag, not just the last: all are kept.
        arg = arg.action(ArgAction::Append);
    }
    if spec.is_bool {
        // pflag's booleans: `--flag` alone is true, a value needs `=`.
        arg = arg
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true");
    } else {
        // pflag gives a flag that takes a value the next argument, whatever it looks like
        // (`--probe-timeout -1s`); config then judges the value.
        arg = arg.allow_hyphen_values(true);
    }
    Some(arg)
}

impl Args for CaptureArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let cmd = SETTINGS
            .iter()
            .filter_map(flag_arg)
            .fold(cmd, |cmd, arg| cmd.arg(arg));
        cmd.arg(
            Arg::new("annotations")
                .long("annotations")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "Read pod annotations (a Downward API file) and derive the settings \
                     Istio's injector would render from them; explicit flags still win.",
                ),
        )
        .arg(
            Arg::new("no-ipv6")
                .long("no-ipv6")
                .action(ArgAction::SetTrue)
                .overrides_with("ipv6")
                .help("Plan IPv4 rules only, instead of detecting."),
        )
        .mut_arg("ipv6", |arg| arg.overrides_with("no-ipv6"))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for CaptureArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = CaptureArgs::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for spec in SETTINGS {
            let Some(long) = spec.long else { continue };
            let given: Vec<&String> = if typed(spec) {
                matches
                    .get_many::<String>(long)
                    .map(Iterator::collect)
                    .unwrap_or_default()
            } else {
                matches.get_one::<String>(long).into_iter().collect()
            };
            if let Some((last, earlier)) = given.split_last() {
                for value in earlier {
                    self.flags
                        .set_overridden_flag(spec.setting, (*value).clone());
                }
                self.flags.set_flag(spec.setting, (*last).clone());
            }
        }
        if matches.get_flag("no-ipv6") {
            self.flags.set_flag(Setting::Ipv6, "false");
        }
        if let Some(path) = matches.get_one::<PathBuf>("annotations") {
            self.annotations = Some(path.clone());
        }
        Ok(())
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

    /// The settings table is the one definition of the flags: each one has its help and
    /// value name there, and `--help` shows its environment variables and default.
    #[test]
    fn every_flag_is_documented_from_the_settings_table() {
        let cmd = Cli::command();
        let apply = cmd.find_subcommand("apply").unwrap();
        for spec in SETTINGS {
            let Some(long) = spec.long else { continue };
            assert!(!spec.help.is_empty(), "--{long} has no help");
            assert!(!spec.value_name.is_empty(), "--{long} has no value name");
            let arg = apply
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .unwrap();
            let help = arg.get_help().unwrap().to_string();
            for env in spec.envs {
                assert!(help.contains(env), "--{long}'s help lacks {env}: {help}");
            }
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
        assert_eq!(args.flag(Setting::OutboundCidrsExclude), Some(""));
        assert_eq!(
            args.flag(Setting::InboundPortsExclude),
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
        assert_eq!(args.flag(Setting::RedirectDns), Some("true"));
        assert_eq!(args.flag(Setting::DryRun), Some("true"));
        assert_eq!(args.flag(Setting::DropInvalid), Some("false"));
    }

    #[test]
    fn repeated_flags_take_the_last_value_like_pflag() {
        let cli = parse(&["meshinit", "apply", "-p", "1", "-p", "2"]);
        let Command::Apply(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.flag(Setting::EnvoyPort), Some("2"));
    }

    // Found by the independent differential of issue 20: pflag takes `-1s` as the value.
    #[test]
    fn a_value_starting_with_a_dash_is_the_flags_value_like_pflag() {
        let cli = parse(&[
            "meshinit",
            "apply",
            "--probe-timeout",
            "-1s",
            "-p",
            "-1",
            "-i",
            "--redirect-dns",
        ]);
        let Command::Apply(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.flag(Setting::ProbeTimeout), Some("-1s"));
        assert_eq!(args.flag(Setting::EnvoyPort), Some("-1"));
        assert_eq!(args.flag(Setting::OutboundCidrs), Some("--redirect-dns"));
        assert_eq!(args.flag(Setting::RedirectDns), None);
        let args: Vec<OsString> = ["meshinit", "validate", "--probe-timeout", "-1s"]
            .map(OsString::from)
            .to_vec();
        assert_eq!(
            format!("{:?}", Cli::parse_args(args.clone()).unwrap()),
            format!("{:?}", Cli::try_parse_from(args).unwrap())
        );
    }

    /// pflag parses each occurrence of a typed flag: an earlier bad one is refused (exit 1,
    /// naming it), though the last is in effect.
    #[test]
    fn every_occurrence_of_a_typed_flag_must_parse_like_pflag() {
        let env = |_: &str| None;
        for argv in [
            &[
                "meshinit",
                "apply",
                "--probe-timeout=garbage",
                "--probe-timeout=5s",
            ][..],
            &[
                "meshinit",
                "apply",
                "--iptables-probe-port",
                "x",
                "--iptables-probe-port",
                "1",
            ],
            &["meshinit", "apply", "--redirect-dns=yes", "--redirect-dns"],
        ] {
            let Command::Apply(args) = parse(argv).command else {
                panic!()
            };
            let err = crate::config::validate(&args.to_raw(), &env).expect_err("refused");
            assert!(
                err.to_string().starts_with("invalid value"),
                "{argv:?}: {err}"
            );
        }
        let Command::Apply(args) = parse(&[
            "meshinit",
            "apply",
            "--redirect-dns=false",
            "--redirect-dns",
            "-p",
            "x",
            "-p",
            "1",
        ])
        .command
        else {
            panic!()
        };
        assert_eq!(args.flag(Setting::RedirectDns), Some("true"));
        assert!(crate::config::validate(&args.to_raw(), &env).is_ok());
    }

    #[test]
    fn no_ipv6_maps_to_false() {
        let cli = parse(&["meshinit", "print", "--no-ipv6"]);
        let Command::Print(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.capture.flag(Setting::Ipv6), Some("false"));
    }
}
