//! Renders the non-netfilter state a plan needs (TPROXY policy routing, the `::6` address)
//! as the equivalent `ip` commands, for the dry-run. Apply programs the same state through
//! its own backend; this text is for people reading the plan.

use std::fmt::Write as _;

use super::model::{Family, Ruleset};

/// One line per change, in the order apply makes them.
pub fn render_routing(ruleset: &Ruleset) -> String {
    let mut out = String::new();
    if ruleset.ipv6_passthrough_address {
        let _ = writeln!(out, "ip -6 addr add ::6/128 dev lo");
    }
    if let Some(routing) = ruleset.tproxy_routing {
        for family in ruleset.families().map(|f| f.family) {
            let flag = match family {
                Family::V4 => "-4",
                Family::V6 => "-6",
            };
            let _ = writeln!(
                out,
                "ip {flag} rule add fwmark {} lookup {}",
                routing.mark, routing.table
            );
            let _ = writeln!(
                out,
                "ip {flag} route add local default dev lo table {}",
                routing.table
            );
        }
    }
    out
}
