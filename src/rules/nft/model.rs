//! The typed nftables ruleset: Istio's three `inet` tables, their chains, and the rules to
//! add to them, as plain data.
//!
//! Nothing here knows `nft` syntax; `render.rs` turns this into `nft -f` text and `plan.rs`
//! is the only producer. The leaf types (ports, owners, interfaces, protocols) are shared with
//! the iptables model, so both planners read the same validated `CaptureConfig` values.
//!
//! Unlike iptables, nftables keeps both IP families in one `inet` table, so there is one
//! ruleset, not one per family: IPv6-only rules are simply absent when IPv6 is off.

use ipnet::IpNet;

pub use crate::rules::decisions::{CtState, TproxyRouting, IPV6_PASSTHROUGH};
use crate::values::{Family, Interface, Owner, OwnerKind, Port, PortRange, Protocol};

/// Istio's tables (`constants.IstioProxy*Table`), all of family `inet`. Declaration order is
/// the order Istio's transaction writes them in.
pub use crate::rules::capture::Table;

impl Table {
    pub const ALL: [Table; 3] = [Table::Nat, Table::Mangle, Table::Raw];

    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "istio-proxy-nat",
            Table::Mangle => "istio-proxy-mangle",
            Table::Raw => "istio-proxy-raw",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The chains this table may hold, in the order Istio declares them (its fixed chain
    /// list per table); only those in use are declared.
    pub fn chain_order(self) -> &'static [Chain] {
        match self {
            Table::Nat => &[
                Chain::Prerouting,
                Chain::Output,
                Chain::Inbound,
                Chain::Redirect,
                Chain::InRedirect,
                Chain::IstioOutput,
                Chain::OutputDns,
            ],
            Table::Mangle => &[
                Chain::Prerouting,
                Chain::Output,
                Chain::Divert,
                Chain::Tproxy,
                Chain::Inbound,
                Chain::Drop,
            ],
            Table::Raw => &[
                Chain::Prerouting,
                Chain::Output,
                Chain::Inbound,
                Chain::OutputDns,
            ],
        }
    }

    /// The hook, type and priority of `chain` when it is a base chain of this table (the
    /// iptables table's own priorities: nat -100, mangle -150, raw -300).
    pub fn base_chain(self, chain: Chain) -> Option<BaseChain> {
        let hook = match chain {
            Chain::Prerouting => Hook::Prerouting,
            Chain::Output => Hook::Output,
            _ => return None,
        };
        let (kind, priority) = match (self, hook) {
            (Table::Nat, _) => (ChainType::Nat, -100),
            (Table::Mangle, Hook::Prerouting) => (ChainType::Filter, -150),
            (Table::Mangle, Hook::Output) => (ChainType::Route, -150),
            (Table::Raw, _) => (ChainType::Filter, -300),
        };
        Some(BaseChain {
            kind,
            hook,
            priority,
        })
    }
}

/// Every chain name Istio's nftables backend uses (`constants.*Chain`). `Prerouting` and
/// `Output` are base chains; the rest are regular chains reached by `jump`.
pub use crate::rules::capture::Chain;

impl Chain {
    pub const ALL: [Chain; 10] = [
        Chain::Prerouting,
        Chain::Output,
        Chain::Inbound,
        Chain::Redirect,
        Chain::InRedirect,
        Chain::IstioOutput,
        Chain::OutputDns,
        Chain::Divert,
        Chain::Tproxy,
        Chain::Drop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Chain::Prerouting => "prerouting",
            Chain::Output => "output",
            Chain::Inbound => "istio-inbound",
            Chain::Redirect => "istio-redirect",
            Chain::InRedirect => "istio-in-redirect",
            Chain::IstioOutput => "istio-output",
            Chain::OutputDns => "istio-output-dns",
            Chain::Divert => "istio-divert",
            Chain::Tproxy => "istio-tproxy",
            Chain::Drop => "istio-drop",
        }
    }

    pub fn from_name(name: &str) -> Option<Chain> {
        Chain::ALL.into_iter().find(|c| c.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainType {
    Nat,
    Filter,
    Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Prerouting,
    Output,
}

/// What makes a chain a base chain: where netfilter calls it, and in what order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Source,
    Destination,
}

/// One match of a rule, in the order it is planned (Istio's order, so rendered rules line up
/// with its goldens).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    InInterface(Interface),
    OutInterface(Interface),
    /// `meta l4proto tcp`.
    L4Proto(Protocol),
    /// `ip saddr` / `ip6 daddr [!=] NET`: the family follows the address.
    Address {
        direction: Direction,
        net: IpNet,
        negated: bool,
    },
    /// `ip daddr { NET, NET, ... }`: an anonymous interval set (`--match-sets`) of at least
    /// two networks, all of one family.
    AddressSet {
        direction: Direction,
        nets: Vec<IpNet>,
    },
    /// `tcp dport [!=] PORT` (or a range `8000-8100`), or a set `{ 53, 15008 }` when there
    /// are several (an interval set once one is a range: `{ 80, 8000-8100 }`, its ranges
    /// merged so that none overlap).
    Port {
        protocol: Protocol,
        direction: Direction,
        ports: Vec<PortRange>,
        negated: bool,
    },
    /// `skuid` / `skgid [!=] OWNER`.
    Owner {
        kind: OwnerKind,
        owner: Owner,
        negated: bool,
    },
    ConntrackState(CtState),
    /// The packet mark (`mark [!=] N`).
    Mark {
        mark: u32,
        negated: bool,
    },
    /// The connection mark (`ct mark N`).
    ConnMark(u32),
}

/// A statement: what a matching packet gets. Rules may carry several, in order (a counter,
/// then a mark, then a verdict...).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Statement {
    Counter,
    /// `meta mark set N`.
    SetMark(u32),
    /// `meta mark set ct mark`: restore the packet mark from the connection.
    MarkFromConnMark,
    /// `ct mark set mark`: save the packet mark on the connection.
    ConnMarkFromMark,
    /// `ct zone set N`.
    CtZone(u16),
    /// `tproxy ip to :PORT` (`ip6` for IPv6).
    Tproxy {
        family: Family,
        port: Port,
    },
    /// `redirect to :PORT`.
    Redirect {
        port: Port,
    },
    Return,
    Accept,
    Drop,
    Jump(Chain),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub statements: Vec<Statement>,
}

impl Rule {
    pub fn new(matches: Vec<Match>, statements: Vec<Statement>) -> Rule {
        Rule {
            matches,
            statements,
        }
    }

    pub fn jump_target(&self) -> Option<Chain> {
        self.statements.iter().find_map(|s| match s {
            Statement::Jump(chain) => Some(*chain),
            _ => None,
        })
    }
}

/// Where an operation puts its rule: at the end of the chain, or in front of the rule at
/// `index` (0-based, nftables' `insert rule ... index N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    Append,
    Insert { index: usize },
}

/// One `add rule` / `insert rule` of the transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleOp {
    pub chain: Chain,
    pub position: Position,
    pub rule: Rule,
}

/// One table's part of the transaction: the chains to declare (in declaration order) and the
/// rule operations, in the order Istio issues them. Inserts are kept as inserts, as Istio
/// writes them, so the kernel orders the rules exactly as it does under Istio; `chain_rules`
/// says what that order is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    pub table: Table,
    pub chains: Vec<Chain>,
    pub ops: Vec<RuleOp>,
}

impl TableRules {
    /// The rules of `chain` in the order the kernel holds them once the operations ran on an
    /// empty chain (`insert ... index N` goes in front of the rule now at position N).
    pub fn chain_rules(&self, chain: Chain) -> Vec<&Rule> {
        let mut rules: Vec<&Rule> = Vec::new();
        for op in self.ops.iter().filter(|op| op.chain == chain) {
            match op.position {
                Position::Append => rules.push(&op.rule),
                Position::Insert { index } => rules.insert(index.min(rules.len()), &op.rule),
            }
        }
        rules
    }

    pub fn base_chain(&self, chain: Chain) -> Option<BaseChain> {
        self.table.base_chain(chain)
    }

    pub fn rule_count(&self) -> usize {
        self.ops.len()
    }
}

/// Everything meshinit wants in nftables, plus the routing state TPROXY and IPv6 need (the
/// same as for iptables, programmed over netlink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRuleset {
    /// Only tables with at least one rule, in `Table` order.
    pub tables: Vec<TableRules>,
    /// Whether IPv6 rules were planned.
    pub ipv6: bool,
    /// Present in TPROXY mode with inbound capture.
    pub tproxy_routing: Option<TproxyRouting>,
    /// Istio adds `::6/128` to `lo` whenever IPv6 is on.
    pub ipv6_passthrough_address: bool,
}

impl NftRuleset {
    pub fn table(&self, table: Table) -> Option<&TableRules> {
        self.tables.iter().find(|t| t.table == table)
    }

    pub fn rule_count(&self) -> usize {
        self.tables.iter().map(TableRules::rule_count).sum()
    }
}

/// meshinit's tables as they are in the kernel now, with their chains in kernel order: what
/// a transaction must converge from. Read over netlink; empty for a fresh namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExistingTables {
    /// (table, chain names). A chain name meshinit does not know is kept as read.
    pub tables: Vec<(Table, Vec<String>)>,
    /// nf_tables' generation (ruleset version) this was read at, when known: a netlink
    /// batch that carries it is refused if anything changed since.
    pub generation: Option<u32>,
}

impl ExistingTables {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn table(&self, table: Table) -> Option<&[String]> {
        self.tables
            .iter()
            .find(|(t, _)| *t == table)
            .map(|(_, chains)| chains.as_slice())
    }
}
