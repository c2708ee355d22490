//! Just enough netlink: TPROXY policy routing and the `::6` address (rtnetlink, `route`), a
//! listing of nf_tables chains and one nf_tables batch (`nftables`), ipset commands
//! (`ipset`), without launching `ip`, `nft` or `ipset`. The wire format (`wire`) is pure and
//! is all the encoders see; only `socket` does I/O.
//!
//! Every launched process costs an init container time and memory; these few messages are
//! simple enough to build by hand. Message building and parsing are pure functions, tested
//! without a kernel. The nf_tables batch itself is built by `rules::nft::encode` with
//! [`wire::Writer`].

mod ipset;
mod nftables;
mod route;
mod socket;
pub mod wire;

pub use nftables::{parse_chain, parse_generation, BatchError};
pub use route::{
    address_matches, interface_index, ipv6_address_payload, local_route_payload, route_is_ours,
    route_matches, route_table, rule_is_ours, rule_mark_table, rule_matches, rule_payload,
    ROUTE_PROTOCOL,
};
pub use socket::{NetlinkError, Socket};
pub use wire::{acknowledgements, attrs, NlFamily, Writer};
