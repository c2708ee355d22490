//! Parsers for single setting values. Each returns the reason on failure; the caller adds
//! where the value came from. No parser panics on any input (a property test checks).

use std::net::IpAddr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};

use super::{ForcedBackend, InterceptionMode, NftablesApply, OutboundInclude};
use crate::values::OUTBOUND_MARK;
use crate::values::{Interface, Owner, Port, PortRange};

pub type Reason = String;

/// Istio splits lists on commas and drops empty items ("6000,7000," is two ports); meshinit
/// also trims blanks around items, which Istio would pass on to iptables and fail there.
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Go's `strconv.ParseBool`, which Istio's flags and environment variables use.
pub fn parse_bool(value: &str) -> Result<bool, Reason> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err("expected a boolean: true or false (or 1, 0, t, f)".into()),
    }
}

pub fn parse_port(value: &str) -> Result<Port, Reason> {
    let value = value.trim();
    let number: u32 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a port number (expected 1-65535)"))?;
    u16::try_from(number)
        .ok()
        .and_then(Port::new)
        .ok_or_else(|| format!("port {number} is out of range (expected 1-65535)"))
}

/// One entry of a port list: a port, or a range `first-last` with
/// 1 <= first <= last <= 65535 (meshinit's superset of Istio's lists, as Linkerd's).
pub fn parse_port_range(value: &str) -> Result<PortRange, Reason> {
    let value = value.trim();
    let Some((first, last)) = value.split_once('-') else {
        return parse_port(value).map(PortRange::from);
    };
    let bad = || {
        format!(
            "{value:?} is not a port range (expected FIRST-LAST, with 1 <= FIRST <= LAST <= 65535)"
        )
    };
    let bound = |text: &str| -> Result<Port, Reason> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        parse_port(text).map_err(|_| bad())
    };
    let (first, last) = (bound(first)?, bound(last)?);
    PortRange::new(first, last).ok_or_else(|| {
        format!("{value:?} is not a port range: {first} is greater than {last} (expected FIRST-LAST, with 1 <= FIRST <= LAST <= 65535)")
    })
}

/// A port list: ports and ranges (`80,8000-8100`).
pub fn parse_port_list(value: &str) -> Result<Vec<PortRange>, Reason> {
    split_list(value).map(parse_port_range).collect()
}

/// `*` or a port list, as `-b` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortsOrAll {
    All,
    List(Vec<PortRange>),
}

pub fn parse_ports_or_all(value: &str) -> Result<PortsOrAll, Reason> {
    if value.trim() == "*" {
        return Ok(PortsOrAll::All);
    }
    if split_list(value).any(|item| item == "*") {
        return Err("\"*\" means every port and cannot be mixed with a list of ports".into());
    }
    parse_port_list(value).map(PortsOrAll::List)
}

pub fn parse_cidr(value: &str) -> Result<IpNet, Reason> {
    let bad = || format!("{value:?} is not a CIDR range such as 10.0.0.0/8 or 2001:db8::/32");
    let Some((addr, prefix)) = value.split_once('/') else {
        return Err(match value.parse::<IpAddr>() {
            Ok(addr) => {
                let bits = if addr.is_ipv4() { 32 } else { 128 };
                format!(
                    "{value:?} is an address, not a CIDR range; write {value}/{bits} for just that address"
                )
            }
            Err(_) => bad(),
        });
    };
    // Lists of thousands of CIDRs are parsed on every pod start: std's address parser
    // and a digit check are all it takes.
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // Istio parses with Go's netip.ParsePrefix, which refuses a leading zero ("/08"): Istio
    // fails the run, so meshinit refuses it up front rather than read it as /8.
    if prefix.len() > 1 && prefix.starts_with('0') {
        let trimmed = prefix.trim_start_matches('0');
        let trimmed = if trimmed.is_empty() { "0" } else { trimmed };
        return Err(format!(
            "{value:?}: the prefix length /{prefix} has a leading zero; write /{trimmed}"
        ));
    }
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    IpNet::new(addr, prefix).map_err(|_| bad())
}

fn parse_cidrs(value: &str) -> Result<Vec<IpNet>, Reason> {
    split_list(value).map(parse_cidr).collect()
}

/// `-i`: `*` for everything, empty for nothing, or CIDRs of either family.
pub fn parse_outbound_include(value: &str) -> Result<OutboundInclude, Reason> {
    if value.trim() == "*" {
        return Ok(OutboundInclude::All);
    }
    if split_list(value).any(|item| item == "*") {
        return Err("\"*\" means every destination and cannot be mixed with CIDR ranges".into());
    }
    let nets = parse_cidrs(value)?;
    Ok(if nets.is_empty() {
        OutboundInclude::Off
    } else {
        OutboundInclude::Only(nets)
    })
}

/// `-x`: CIDRs only. Istio rejects `*` here too (excluding everything is "-i ''").
pub fn parse_outbound_exclude(value: &str) -> Result<Vec<IpNet>, Reason> {
    if split_list(value).any(|item| item == "*") {
        return Err(
            "\"*\" is not allowed in an exclude list; to capture no outbound traffic, set the include list (-i) to \"\""
                .into(),
        );
    }
    parse_cidrs(value)
}

/// A user or group: a number, or a name iptables will resolve.
pub fn parse_owner(value: &str) -> Result<Owner, Reason> {
    if let Ok(id) = value.parse::<u32>() {
        return Ok(Owner::Id(id));
    }
    let body = value.strip_suffix('$').unwrap_or(value);
    let valid_name = !body.is_empty()
        && value.len() <= 32
        && body.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid_name {
        Ok(Owner::Name(value.to_owned()))
    } else {
        Err(format!(
            "{value:?} is neither a numeric id (0-4294967295) nor a user/group name"
        ))
    }
}

pub fn parse_owner_list(value: &str) -> Result<Vec<Owner>, Reason> {
    split_list(value).map(parse_owner).collect()
}

/// Kernel interface names: 1-15 bytes, none of '/', ':' or blanks; meshinit further keeps
/// to letters, digits, '_', '.', '-', plus iptables' trailing '+' wildcard.
pub fn parse_interface(value: &str) -> Result<Interface, Reason> {
    let body = value.strip_suffix('+').unwrap_or(value);
    if value.len() > 15 {
        return Err(format!(
            "interface name {value:?} is longer than 15 characters"
        ));
    }
    let valid = !body.is_empty()
        && body != "."
        && body != ".."
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(Interface::new_unchecked(value.to_owned()))
    } else {
        Err(format!(
            "{value:?} is not an interface name (letters, digits, '_', '.', '-', optionally ending in '+')"
        ))
    }
}

pub fn parse_interface_list(value: &str) -> Result<Vec<Interface>, Reason> {
    split_list(value).map(parse_interface).collect()
}

/// The interception mode, or `None` for Istio's `NONE` (capture nothing).
pub fn parse_interception_mode(value: &str) -> Result<Option<InterceptionMode>, Reason> {
    match value {
        // Istio's default: an empty mode is REDIRECT.
        "" | "REDIRECT" => Ok(Some(InterceptionMode::Redirect)),
        "TPROXY" => Ok(Some(InterceptionMode::Tproxy)),
        "NONE" => Ok(None),
        other => {
            let upper = other.trim().to_ascii_uppercase();
            let hint = if ["REDIRECT", "TPROXY", "NONE"].contains(&upper.as_str()) {
                format!(" (values are case-sensitive: did you mean {upper}?)")
            } else {
                String::new()
            };
            Err(format!(
                "expected REDIRECT or TPROXY{hint}; Istio would silently use REDIRECT here"
            ))
        }
    }
}

pub fn parse_tproxy_mark(value: &str) -> Result<u32, Reason> {
    let mark: u32 = value
        .trim()
        .parse()
        .map_err(|_| "expected a decimal packet mark (1-4294967295)".to_owned())?;
    if mark == 0 {
        return Err("mark 0 means \"unmarked\" and cannot select TPROXY traffic".into());
    }
    if mark == OUTBOUND_MARK {
        return Err(format!(
            "mark {OUTBOUND_MARK} is the mark Istio's rules give the sidecar's own connections back to the app; pick another"
        ));
    }
    Ok(mark)
}

pub fn parse_route_table(value: &str) -> Result<u32, Reason> {
    let table: u32 = value
        .trim()
        .parse()
        .map_err(|_| "expected a routing table number (1-252 or 256-4294967295)".to_owned())?;
    match table {
        0 => Err("table 0 is not a routing table".into()),
        253 => Err("table 253 is the kernel's \"default\" table; pick an unused one".into()),
        254 => Err("table 254 is the kernel's \"main\" table; pick an unused one".into()),
        255 => Err("table 255 is the kernel's \"local\" table; pick an unused one".into()),
        table => Ok(table),
    }
}

/// Go's `time.ParseDuration` ("5s", "1m30s", "250ms", "-1s"), which `--probe-timeout` takes
/// through pflag. A negative duration is accepted, as Go accepts it, and means what Istio's
/// timer makes of it: no waiting. `Duration` has no sign, so it is zero: one probe, no retry.
pub fn parse_go_duration(value: &str) -> Result<Duration, Reason> {
    let bad = || format!("{value:?} is not a duration such as 5s, 500ms or 1m30s");
    // Go trims nothing: " 5s" is refused.
    let (negative, rest) = match value.as_bytes().first() {
        Some(b'-') => (true, &value[1..]),
        Some(b'+') => (false, &value[1..]),
        _ => (false, value),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut rest = rest;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let digits = &rest[..number_len];
        // Go: digits before or after the point (".5", "1."), one point at most.
        if digits == "." || digits.matches('.').count() > 1 {
            return Err(bad());
        }
        let number: f64 = match digits {
            d if d.ends_with('.') => d[..d.len() - 1].parse(),
            d if d.starts_with('.') => format!("0{d}").parse(),
            d => d.parse(),
        }
        .map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    // Go's durations are int64 nanoseconds: about 2562047 hours at most.
    if total * 1e9 > i64::MAX as f64 {
        return Err(bad());
    }
    if negative {
        return Ok(Duration::ZERO);
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// A port as pflag's uint16 flags read it (`strconv.ParseUint(s, 0, 16)`), which is how
/// Istio reads `--iptables-probe-port`: decimal, or Go's `0x`, `0o`, `0b` and leading-zero
/// octal forms, with `_` between digits; then 1-65535.
pub fn parse_go_port(value: &str) -> Result<Port, Reason> {
    let bad = || format!("{value:?} is not a port number (expected 1-65535)");
    let lower = value.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    // Go's underscoreOK: an underscore only between digits, or right after a base prefix.
    let prefixed = radix != 10;
    let underscores_ok = digits
        .split('_')
        .enumerate()
        .all(|(i, part)| !part.is_empty() || (i == 0 && prefixed));
    if underscores_ok {
        let clean: String = digits.chars().filter(|c| *c != '_').collect();
        if clean.is_empty() || !clean.chars().all(|c| c.is_digit(radix)) {
            return Err(bad());
        }
        let number = u64::from_str_radix(&clean, radix).map_err(|_| bad())?;
        return u16::try_from(number)
            .ok()
            .and_then(Port::new)
            .ok_or_else(|| format!("port {number} is out of range (expected 1-65535)"));
    }
    Err(bad())
}

/// Istio's `ValidateIPv4LoopbackCidr`: an IPv4 loopback range with a /8 to /32 mask.
pub fn parse_loopback_cidr(value: &str) -> Result<Ipv4Net, Reason> {
    let not_v4 = || format!("{value:?} is not an IPv4 CIDR range such as 127.0.0.1/32");
    // Istio reads it with netip.ParsePrefix, untrimmed: the same refusals as other CIDRs.
    let net = match parse_cidr(value).map_err(|_| not_v4())? {
        IpNet::V4(net) => net,
        IpNet::V6(_) => return Err(not_v4()),
    };
    if !net.addr().is_loopback() {
        return Err(format!(
            "{} is not a loopback address (127.0.0.0/8)",
            net.addr()
        ));
    }
    if net.prefix_len() < 8 {
        return Err(format!(
            "mask /{} is wider than the loopback range; expected /8 to /32",
            net.prefix_len()
        ));
    }
    Ok(net)
}

pub fn parse_ip_list(value: &str) -> Result<Vec<IpAddr>, Reason> {
    split_list(value)
        .map(|item| {
            item.parse::<IpAddr>()
                .map_err(|_| format!("{item:?} is not an IP address"))
        })
        .collect()
}

/// Whole seconds, 1 to 3600: how long a restore may wait for the xtables lock.
pub fn parse_wait_seconds(value: &str) -> Result<Duration, Reason> {
    match value.trim().parse::<u64>() {
        Ok(secs @ 1..=3600) => Ok(Duration::from_secs(secs)),
        _ => Err("expected whole seconds from 1 to 3600".into()),
    }
}

pub fn parse_backend(value: &str) -> Result<Option<ForcedBackend>, Reason> {
    // Istio's Validate compares the value exactly: " nft" is refused.
    match value {
        "" => Ok(None),
        "legacy" => Ok(Some(ForcedBackend::Legacy)),
        "nft" => Ok(Some(ForcedBackend::Nft)),
        _ => Err("expected \"legacy\" or \"nft\"".into()),
    }
}

pub fn parse_nftables_apply(value: &str) -> Result<NftablesApply, Reason> {
    match value.trim() {
        "auto" => Ok(NftablesApply::Auto),
        "netlink" => Ok(NftablesApply::Netlink),
        "nft" => Ok(NftablesApply::Nft),
        _ => Err("expected \"auto\", \"netlink\" or \"nft\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nftables_apply_modes() {
        assert_eq!(parse_nftables_apply("auto"), Ok(NftablesApply::Auto));
        assert_eq!(parse_nftables_apply("netlink"), Ok(NftablesApply::Netlink));
        assert_eq!(parse_nftables_apply(" nft "), Ok(NftablesApply::Nft));
        assert!(parse_nftables_apply("libnftnl").is_err());
    }

    #[test]
    fn bools_follow_go() {
        assert_eq!(parse_bool("T"), Ok(true));
        assert_eq!(parse_bool("0"), Ok(false));
        assert!(parse_bool("yes").is_err());
        assert!(parse_bool("").is_err());
    }

    #[test]
    fn ports_reject_zero_and_out_of_range() {
        assert_eq!(parse_port("8080").map(Port::get), Ok(8080));
        assert!(parse_port("0").unwrap_err().contains("out of range"));
        assert!(parse_port("99999").unwrap_err().contains("99999"));
        assert!(parse_port("http").unwrap_err().contains("not a port"));
        assert!(parse_port("-1").is_err());
    }

    #[test]
    fn port_lists_drop_empty_items_like_istio() {
        let ports = parse_port_list("6000,7000,").unwrap();
        assert_eq!(
            ports
                .iter()
                .filter_map(|p| p.single())
                .map(|p| p.get())
                .collect::<Vec<_>>(),
            [6000, 7000]
        );
        assert_eq!(parse_port_list(" 80 , 443").unwrap().len(), 2);
        assert!(parse_port_list("").unwrap().is_empty());
    }

    #[test]
    fn port_lists_take_ranges() {
        let ports = parse_port_list("80, 8000-8100,9000-9000,1-65535").unwrap();
        let shown: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown, ["80", "8000-8100", "9000", "1-65535"]);
        assert_eq!(ports[1].first().get(), 8000);
        assert_eq!(ports[1].last().get(), 8100);
        assert_eq!(
            parse_ports_or_all("8080-8081"),
            Ok(PortsOrAll::List(vec![ports_range(8080, 8081)]))
        );
    }

    use crate::values::tests::range as ports_range;

    #[test]
    fn port_ranges_reject_anything_but_first_to_last() {
        for bad in [
            "8100-8000",
            "0-10",
            "10-0",
            "1-65536",
            "70000-70001",
            "-80",
            "80-",
            "8000--8100",
            "8000-8100-8200",
            "a-b",
            "80 - 90",
            "+1-2",
            "1-+2",
            "-",
            "*-80",
        ] {
            let err = parse_port_list(bad).unwrap_err();
            assert!(
                err.contains("port range")
                    || err.contains("port number")
                    || err.contains("out of range"),
                "{bad}: {err}"
            );
        }
        assert!(parse_port_list("8100-8000")
            .unwrap_err()
            .contains("8100 is greater than 8000"));
    }

    #[test]
    fn wildcard_ports_cannot_mix_with_a_list() {
        assert_eq!(parse_ports_or_all("*"), Ok(PortsOrAll::All));
        assert!(parse_ports_or_all("*,80")
            .unwrap_err()
            .contains("cannot be mixed"));
    }

    #[test]
    fn cidrs_need_a_prefix_length() {
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("2001:db8::/32").is_ok());
        assert!(parse_cidr("1.2.3.4").unwrap_err().contains("1.2.3.4/32"));
        assert!(parse_cidr("10.0.0/8").is_err());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.0/+8").is_err());
        assert!(parse_cidr("10.0.0.0/").is_err());
        assert!(parse_cidr("2001:db8::/129").is_err());
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.1.2.3/8");
    }

    #[test]
    fn include_cidrs_take_wildcard_and_empty() {
        assert_eq!(parse_outbound_include("*"), Ok(OutboundInclude::All));
        assert_eq!(parse_outbound_include(""), Ok(OutboundInclude::Off));
        assert!(parse_outbound_include("*,10.0.0.0/8").is_err());
    }

    #[test]
    fn exclude_cidrs_reject_wildcard() {
        assert!(parse_outbound_exclude("*")
            .unwrap_err()
            .contains("not allowed"));
        assert_eq!(parse_outbound_exclude("").unwrap(), vec![]);
    }

    #[test]
    fn owners_are_ids_or_names() {
        assert_eq!(parse_owner("1337"), Ok(Owner::Id(1337)));
        assert_eq!(parse_owner("java"), Ok(Owner::Name("java".into())));
        assert!(parse_owner("rm -rf").is_err());
        assert!(parse_owner("-1").is_err());
        assert!(parse_owner("99999999999").is_err());
    }

    #[test]
    fn interfaces_follow_kernel_rules() {
        assert!(parse_interface("eth0").is_ok());
        assert!(parse_interface("veth+").is_ok());
        assert!(parse_interface("bond0.100").is_ok());
        assert!(parse_interface("a23456789012345x")
            .unwrap_err()
            .contains("15"));
        assert!(parse_interface("eth0:1").is_err());
        assert!(parse_interface("eth 0").is_err());
        assert!(parse_interface("..").is_err());
    }

    #[test]
    fn interception_mode_is_strict() {
        assert_eq!(
            parse_interception_mode(""),
            Ok(Some(InterceptionMode::Redirect))
        );
        assert_eq!(
            parse_interception_mode("TPROXY"),
            Ok(Some(InterceptionMode::Tproxy))
        );
        assert_eq!(parse_interception_mode("NONE"), Ok(None));
        assert!(parse_interception_mode("tproxy")
            .unwrap_err()
            .contains("did you mean TPROXY"));
        assert!(parse_interception_mode("FOO")
            .unwrap_err()
            .contains("REDIRECT or TPROXY"));
    }

    #[test]
    fn marks_and_tables_reject_reserved_values() {
        assert_eq!(parse_tproxy_mark("1337"), Ok(1337));
        assert!(parse_tproxy_mark("0").is_err());
        assert!(parse_tproxy_mark("1338").unwrap_err().contains("1338"));
        assert_eq!(parse_route_table("133"), Ok(133));
        assert!(parse_route_table("254").unwrap_err().contains("main"));
        assert!(parse_route_table("x").is_err());
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert!(parse_go_duration("5").is_err());
        // Go accepts signs; a negative timeout waits for nothing (one probe).
        assert_eq!(parse_go_duration("-5s"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("-0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("+2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_go_duration(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1.s"), Ok(Duration::from_secs(1)));
        for bad in ["-", "", " 5s", "5s ", ".s", "1..5s", "3000000h", "--1s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_go_duration("5x").is_err());
        assert!(parse_go_duration("s").is_err());
    }

    #[test]
    fn go_ports_as_pflag_reads_them() {
        for (text, port) in [
            ("15002", 15002),
            ("0x3a9a", 15002),
            ("0X3A9A", 15002),
            ("035232", 15002),
            ("0o35232", 15002),
            ("15_002", 15002),
            ("0x_3a9a", 15002),
            ("0b1", 1),
            ("0_17", 15),
        ] {
            assert_eq!(parse_go_port(text).map(Port::get), Ok(port), "{text}");
        }
        for bad in [
            "0", "65536", "", "-1", "+1", "_1", "1_", "1__0", "0x", "08", "1 ", "x",
        ] {
            assert!(parse_go_port(bad).is_err(), "{bad:?}");
        }
    }

    // Found by the independent differential of issue 20: Istio's netip.ParsePrefix refuses
    // a leading zero in the prefix length.
    #[test]
    fn prefix_lengths_with_a_leading_zero_are_refused() {
        for bad in [
            "10.0.0.0/08",
            "2001:db8::/032",
            "10.0.0.0/00",
            "10.0.0.0/008",
        ] {
            let err = parse_cidr(bad).unwrap_err();
            assert!(err.contains("leading zero"), "{bad}: {err}");
        }
        assert!(parse_cidr("10.0.0.0/0").is_ok());
        assert!(parse_loopback_cidr("127.0.0.1/08").is_err());
        assert!(parse_loopback_cidr("127.0.0.1/8").is_ok());
    }

    #[test]
    fn loopback_cidr_follows_istio() {
        assert!(parse_loopback_cidr("127.0.0.1/8").is_ok());
        assert!(parse_loopback_cidr("10.0.0.1/32")
            .unwrap_err()
            .contains("loopback"));
        assert!(parse_loopback_cidr("127.0.0.1/4")
            .unwrap_err()
            .contains("/8 to /32"));
        assert!(parse_loopback_cidr("::1/128").is_err());
    }

    #[test]
    fn backends() {
        assert_eq!(parse_backend(""), Ok(None));
        assert_eq!(parse_backend("nft"), Ok(Some(ForcedBackend::Nft)));
        assert!(parse_backend("iptables").is_err());
        assert!(parse_backend(" nft").is_err());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn no_parser_panics(input in any::<String>()) {
                let _ = parse_bool(&input);
                let _ = parse_port(&input);
                let _ = parse_port_list(&input);
                let _ = parse_ports_or_all(&input);
                let _ = parse_cidr(&input);
                let _ = parse_outbound_include(&input);
                let _ = parse_outbound_exclude(&input);
                let _ = parse_owner(&input);
                let _ = parse_owner_list(&input);
                let _ = parse_interface(&input);
                let _ = parse_interface_list(&input);
                let _ = parse_interception_mode(&input);
                let _ = parse_tproxy_mark(&input);
                let _ = parse_route_table(&input);
                let _ = parse_go_duration(&input);
                let _ = parse_go_port(&input);
                let _ = parse_loopback_cidr(&input);
                let _ = parse_ip_list(&input);
                let _ = parse_backend(&input);
                let _ = parse_wait_seconds(&input);
            }

            #[test]
            fn list_shaped_inputs_never_panic(input in "[0-9a-z*:./, -]{0,40}") {
                let _ = parse_port_list(&input);
                let _ = parse_outbound_include(&input);
                let _ = parse_go_duration(&input);
                let _ = parse_interface_list(&input);
            }
        }
    }
}
