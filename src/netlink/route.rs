//! rtnetlink: TPROXY's policy routing (an ip rule for the mark, a local route in its
//! table) and the `::6` address, tagged so that cleanup finds exactly meshinit's. Message
//! payloads are built and matched by pure functions; `Socket`'s methods here send them.

use std::net::Ipv6Addr;

use super::socket::{NetlinkError, Socket};
use super::wire::*;

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_PROTOCOL: u16 = 21;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;

/// The routing protocol number meshinit tags its ip rules and routes with, so cleanup can
/// find exactly its own, whatever mark and table an earlier configuration used.
pub const ROUTE_PROTOCOL: u8 = 224;

/// `fib_rule_hdr` + attributes for "fwmark MARK lookup TABLE", tagged with our protocol.
pub fn rule_payload(family: NlFamily, mark: u32, table: u32) -> Vec<u8> {
    let short_table = u8::try_from(table).unwrap_or(0);
    let mut buf = vec![family as u8, 0, 0, 0, short_table, 0, 0, FR_ACT_TO_TBL];
    buf.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(&mut buf, FRA_FWMARK, &mark.to_ne_bytes());
    push_attr(&mut buf, FRA_TABLE, &table.to_ne_bytes());
    push_attr(&mut buf, FRA_PROTOCOL, &[ROUTE_PROTOCOL]);
    buf
}

/// `rtmsg` + attributes for "local default dev IFINDEX table TABLE", tagged likewise.
pub fn local_route_payload(family: NlFamily, ifindex: u32, table: u32) -> Vec<u8> {
    let short_table = u8::try_from(table).unwrap_or(0);
    let mut buf = vec![
        family as u8,
        0,
        0,
        0,
        short_table,
        ROUTE_PROTOCOL,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ];
    buf.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(&mut buf, RTA_TABLE, &table.to_ne_bytes());
    push_attr(&mut buf, RTA_OIF, &ifindex.to_ne_bytes());
    buf
}

/// `ifaddrmsg` + attributes for an IPv6 host address on interface `ifindex`.
pub fn ipv6_address_payload(address: Ipv6Addr, ifindex: u32) -> Vec<u8> {
    let mut buf = vec![NlFamily::Inet6 as u8, 128, 0, 0];
    buf.extend_from_slice(&ifindex.to_ne_bytes());
    push_attr(&mut buf, IFA_LOCAL, &address.octets());
    push_attr(&mut buf, IFA_ADDRESS, &address.octets());
    buf
}

/// Whether a dumped rule (`fib_rule_hdr` + attributes) carries meshinit's protocol tag.
pub fn rule_is_ours(payload: &[u8]) -> bool {
    payload.len() >= 12
        && attrs(&payload[12..])
            .any(|(kind, value)| kind == FRA_PROTOCOL && value == [ROUTE_PROTOCOL])
}

/// Whether a dumped rule is meshinit's "fwmark MARK lookup TABLE".
pub fn rule_matches(payload: &[u8], mark: u32, table: u32) -> bool {
    if !rule_is_ours(payload) {
        return false;
    }
    let u32_attr = |wanted: u16| {
        attrs(&payload[12..]).find_map(|(kind, value)| {
            (kind == wanted && value.len() == 4)
                .then(|| u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
        })
    };
    u32_attr(FRA_FWMARK) == Some(mark)
        && u32_attr(FRA_TABLE).unwrap_or(u32::from(payload[4])) == table
}

/// (fwmark, table) of a dumped rule, to name it in a report.
pub fn rule_mark_table(payload: &[u8]) -> (Option<u32>, u32) {
    let u32_attr = |wanted: u16| {
        attrs(payload.get(12..).unwrap_or_default()).find_map(|(kind, value)| {
            (kind == wanted && value.len() == 4)
                .then(|| u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
        })
    };
    let header_table = payload.get(4).copied().map_or(0, u32::from);
    (
        u32_attr(FRA_FWMARK),
        u32_attr(FRA_TABLE).unwrap_or(header_table),
    )
}

/// (table, whether it is a `local` route) of a dumped route, to name it in a report.
pub fn route_table(payload: &[u8]) -> (u32, bool) {
    let attr_table = attrs(payload.get(12..).unwrap_or_default()).find_map(|(kind, value)| {
        (kind == RTA_TABLE && value.len() == 4)
            .then(|| u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
    });
    let header_table = payload.get(4).copied().map_or(0, u32::from);
    (
        attr_table.unwrap_or(header_table),
        payload.get(7) == Some(&RTN_LOCAL),
    )
}

/// Whether a dumped address (`ifaddrmsg` + attributes) is `address` on `ifindex`.
pub fn address_matches(payload: &[u8], address: Ipv6Addr, ifindex: u32) -> bool {
    let Some(index) = payload.get(4..8) else {
        return false;
    };
    u32::from_ne_bytes([index[0], index[1], index[2], index[3]]) == ifindex
        && attrs(payload.get(8..).unwrap_or_default())
            .any(|(kind, value)| kind == IFA_ADDRESS && value == address.octets())
}

/// Whether a dumped route is meshinit's local default route in `table`.
pub fn route_matches(payload: &[u8], table: u32) -> bool {
    if !route_is_ours(payload) {
        return false;
    }
    let attr_table = attrs(&payload[12..]).find_map(|(kind, value)| {
        (kind == RTA_TABLE && value.len() == 4)
            .then(|| u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
    });
    attr_table.unwrap_or(u32::from(payload[4])) == table && payload[7] == RTN_LOCAL
}

/// Whether a dumped route (`rtmsg` + attributes) carries meshinit's protocol tag.
pub fn route_is_ours(payload: &[u8]) -> bool {
    payload.len() >= 12 && payload[5] == ROUTE_PROTOCOL
}

impl Socket {
    /// Rules are looked up first: without an explicit priority the kernel gives each new
    /// rule its own, so NLM_F_EXCL never sees a duplicate.
    pub fn ensure_rule(
        &mut self,
        family: NlFamily,
        mark: u32,
        table: u32,
    ) -> Result<bool, NetlinkError> {
        let header = [family as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let existing = self
            .dump(RTM_GETRULE, &header)
            .map_err(|errno| NetlinkError {
                what: "listing ip rules",
                errno,
            })?;
        if existing.iter().any(|(_, p)| rule_matches(p, mark, table)) {
            return Ok(false);
        }
        self.ensure(
            RTM_NEWRULE,
            &rule_payload(family, mark, table),
            "adding ip rule",
        )
    }

    pub fn ensure_local_route(
        &mut self,
        family: NlFamily,
        ifindex: u32,
        table: u32,
    ) -> Result<bool, NetlinkError> {
        self.ensure(
            RTM_NEWROUTE,
            &local_route_payload(family, ifindex, table),
            "adding local route",
        )
    }

    pub fn ensure_ipv6_address(
        &mut self,
        address: Ipv6Addr,
        ifindex: u32,
    ) -> Result<bool, NetlinkError> {
        self.ensure(
            RTM_NEWADDR,
            &ipv6_address_payload(address, ifindex),
            "adding IPv6 address",
        )
    }

    pub fn remove_rule(
        &mut self,
        family: NlFamily,
        mark: u32,
        table: u32,
    ) -> Result<(), NetlinkError> {
        self.remove(
            RTM_DELRULE,
            &rule_payload(family, mark, table),
            "deleting ip rule",
        )
    }

    pub fn remove_local_route(
        &mut self,
        family: NlFamily,
        ifindex: u32,
        table: u32,
    ) -> Result<(), NetlinkError> {
        self.remove(
            RTM_DELROUTE,
            &local_route_payload(family, ifindex, table),
            "deleting local route",
        )
    }

    pub fn remove_ipv6_address(
        &mut self,
        address: Ipv6Addr,
        ifindex: u32,
    ) -> Result<(), NetlinkError> {
        self.remove(
            RTM_DELADDR,
            &ipv6_address_payload(address, ifindex),
            "deleting IPv6 address",
        )
    }

    /// The rules and routes tagged with `ROUTE_PROTOCOL`, in both families, as (family,
    /// whether it is a rule, payload).
    pub fn tagged_routing(&mut self) -> Result<Vec<(NlFamily, bool, Vec<u8>)>, NetlinkError> {
        let mut found = Vec::new();
        for family in [NlFamily::Inet, NlFamily::Inet6] {
            let header = [family as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            for (is_rule, dump, what) in [
                (true, RTM_GETRULE, "listing ip rules"),
                (false, RTM_GETROUTE, "listing routes"),
            ] {
                let listed = self
                    .dump(dump, &header)
                    .map_err(|errno| NetlinkError { what, errno })?;
                found.extend(
                    listed
                        .into_iter()
                        .filter(|(_, p)| {
                            if is_rule {
                                rule_is_ours(p)
                            } else {
                                route_is_ours(p)
                            }
                        })
                        .map(|(_, p)| (family, is_rule, p)),
                );
            }
        }
        Ok(found)
    }

    /// Whether the IPv6 `address` is on interface `ifindex`.
    pub fn has_ipv6_address(
        &mut self,
        address: Ipv6Addr,
        ifindex: u32,
    ) -> Result<bool, NetlinkError> {
        let header = [NlFamily::Inet6 as u8, 0, 0, 0, 0, 0, 0, 0];
        let listed = self
            .dump(RTM_GETADDR, &header)
            .map_err(|errno| NetlinkError {
                what: "listing addresses",
                errno,
            })?;
        Ok(listed
            .iter()
            .any(|(_, p)| address_matches(p, address, ifindex)))
    }

    /// Deletes the rules and routes tagged with `ROUTE_PROTOCOL`, in both families, except
    /// those `keep` accepts (given the family, whether it is a rule, and the payload).
    /// Returns how many were removed.
    pub fn remove_tagged(
        &mut self,
        keep: &dyn Fn(NlFamily, bool, &[u8]) -> bool,
    ) -> Result<usize, NetlinkError> {
        let mut removed = 0;
        for family in [NlFamily::Inet, NlFamily::Inet6] {
            let header = [family as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            for (is_rule, dump, delete, what) in [
                (true, RTM_GETRULE, RTM_DELRULE, "ip rules"),
                (false, RTM_GETROUTE, RTM_DELROUTE, "routes"),
            ] {
                let listed = self.dump(dump, &header).map_err(|errno| NetlinkError {
                    what: if is_rule {
                        "listing ip rules"
                    } else {
                        "listing routes"
                    },
                    errno,
                })?;
                let ours = |p: &[u8]| {
                    if is_rule {
                        rule_is_ours(p)
                    } else {
                        route_is_ours(p)
                    }
                };
                for (_, payload) in listed
                    .iter()
                    .filter(|(_, p)| ours(p) && !keep(family, is_rule, p))
                {
                    tracing::debug!(what, "removing meshinit's earlier routing");
                    self.remove(delete, payload, "deleting tagged routing")?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// The index of interface `name` in the current network namespace.
pub fn interface_index(name: &str) -> Result<u32, NetlinkError> {
    nix::net::if_::if_nametoindex(name).map_err(|errno| NetlinkError {
        what: "finding the loopback interface",
        errno,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_payload_layout() {
        let p = rule_payload(NlFamily::Inet, 1337, 133);
        assert_eq!(&p[..8], &[2, 0, 0, 0, 133, 0, 0, FR_ACT_TO_TBL]);
        let found: Vec<(u16, Vec<u8>)> = attrs(&p[12..]).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(found[0], (FRA_FWMARK, 1337u32.to_ne_bytes().to_vec()));
        assert_eq!(found[1], (FRA_TABLE, 133u32.to_ne_bytes().to_vec()));
        assert_eq!(found[2], (FRA_PROTOCOL, vec![ROUTE_PROTOCOL]));
        assert!(rule_is_ours(&p));
        assert!(rule_matches(&p, 1337, 133));
        assert!(!rule_matches(&p, 1337, 134));
        assert!(!rule_matches(&p, 1, 133));
    }

    #[test]
    fn large_tables_use_the_attribute_only() {
        let p = rule_payload(NlFamily::Inet6, 1, 1000);
        assert_eq!(p[0], 10);
        assert_eq!(p[4], 0, "header table is RT_TABLE_UNSPEC beyond 255");
    }

    #[test]
    fn route_payload_is_local_host_scope_and_tagged() {
        let p = local_route_payload(NlFamily::Inet, 1, 133);
        assert_eq!(
            &p[..8],
            &[2, 0, 0, 0, 133, ROUTE_PROTOCOL, RT_SCOPE_HOST, RTN_LOCAL]
        );
        assert!(route_is_ours(&p));
        assert!(route_matches(&p, 133));
        assert!(!route_matches(&p, 134));
        let mut other = p.clone();
        other[5] = 4;
        assert!(!route_is_ours(&other));
    }

    #[test]
    fn address_payload() {
        let p = ipv6_address_payload(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6), 1);
        assert_eq!(&p[..4], &[10, 128, 0, 0]);
        assert_eq!(attrs(&p[8..]).count(), 2);
    }
}
