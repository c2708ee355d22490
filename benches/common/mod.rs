//! What the benchmarks share: the binary measured, Istio's injector arguments, options.
//! (Each bench is a crate of its own; this module is compiled into each, and not every
//! bench uses every item.)
#![allow(dead_code)]

use std::time::Duration;

/// The meshinit to measure: `MESHINIT_BIN` (`benches/run.sh` points it at the static
/// release build, the one the image ships), else cargo's own build.
pub fn meshinit() -> String {
    std::env::var("MESHINIT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_meshinit").to_owned())
}

/// The args Istio's injector gives istio-init by default.
pub const INJECTOR_DEFAULT: &[&str] = &[
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
];

/// `--name N` from the bench's arguments (after `--`), else `default`.
pub fn option(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}
