//! The typed ruleset: what meshinit wants the kernel to hold, as plain data.
//!
//! Nothing here knows iptables syntax; the renderer (`render.rs`) turns this into text and
//! the planner (`plan.rs`) is the only producer. Keeping the model free of strings is what
//! lets `print`, `apply`, `cleanup` and the tests share one source of truth.

use std::sync::Arc;

use ipnet::IpNet;

use super::ipset::IpSet;
pub use crate::rules::decisions::{CtState, TproxyRouting, IPV6_PASSTHROUGH};
pub use crate::values::{Family, Interface, Owner, OwnerKind, Port, PortRange, Protocol};

/// The netfilter tables Istio uses. Declaration order is the render order (Istio sorts table
/// names alphabetically; keeping that order keeps diffs against its goldens readable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Filter,
    Mangle,
    Nat,
    Raw,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Filter, Table::Mangle, Table::Nat, Table::Raw];

    pub fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Kernel-owned chains. Other tools share these, so meshinit never flushes them: it adds and
/// removes only its own rules there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BuiltinChain {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl BuiltinChain {
    pub const ALL: [BuiltinChain; 5] = [
        BuiltinChain::Prerouting,
        BuiltinChain::Input,
        BuiltinChain::Forward,
        BuiltinChain::Output,
        BuiltinChain::Postrouting,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BuiltinChain::Prerouting => "PREROUTING",
            BuiltinChain::Input => "INPUT",
            BuiltinChain::Forward => "FORWARD",
            BuiltinChain::Output => "OUTPUT",
            BuiltinChain::Postrouting => "POSTROUTING",
        }
    }
}

/// The chains meshinit owns, with Istio's names so `iptables-save` reads the same as under
/// istio-init. Owning a chain means meshinit may flush and delete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IstioChain {
    Inbound,
    Redirect,
    InRedirect,
    Output,
    OutputDns,
    Divert,
    Tproxy,
    Drop,
}

impl IstioChain {
    pub const ALL: [IstioChain; 8] = [
        IstioChain::Inbound,
        IstioChain::Redirect,
        IstioChain::InRedirect,
        IstioChain::Output,
        IstioChain::OutputDns,
        IstioChain::Divert,
        IstioChain::Tproxy,
        IstioChain::Drop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            IstioChain::Inbound => "ISTIO_INBOUND",
            IstioChain::Redirect => "ISTIO_REDIRECT",
            IstioChain::InRedirect => "ISTIO_IN_REDIRECT",
            IstioChain::Output => "ISTIO_OUTPUT",
            IstioChain::OutputDns => "ISTIO_OUTPUT_DNS",
            IstioChain::Divert => "ISTIO_DIVERT",
            IstioChain::Tproxy => "ISTIO_TPROXY",
            IstioChain::Drop => "ISTIO_DROP",
        }
    }

    pub fn from_name(name: &str) -> Option<IstioChain> {
        IstioChain::ALL.into_iter().find(|c| c.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chain {
    Builtin(BuiltinChain),
    Istio(IstioChain),
}

impl Chain {
    pub fn name(self) -> &'static str {
        match self {
            Chain::Builtin(c) => c.name(),
            Chain::Istio(c) => c.name(),
        }
    }
}

/// One match of a rule. Order inside a rule is kept as planned, so rendered text lines up
/// with Istio's for side-by-side reading.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    InInterface(Interface),
    OutInterface(Interface),
    Source(IpNet),
    Destination {
        net: IpNet,
        negated: bool,
    },
    Protocol(Protocol),
    /// `--dport PORT`, or `--dport FIRST:LAST` for a range (meshinit's superset).
    DestinationPort {
        port: PortRange,
        negated: bool,
    },
    SourcePort(Port),
    /// `-m multiport [!] --dports a,b`: Istio uses it for "not DNS and not the tunnel port".
    DestinationPorts {
        ports: Vec<Port>,
        negated: bool,
    },
    Owner {
        kind: OwnerKind,
        owner: Owner,
        negated: bool,
    },
    ConntrackState(CtState),
    Mark {
        mark: u32,
        negated: bool,
    },
    ConnMark(u32),
    /// `-m set --match-set NAME dst`: the destination address (or, for a port set, port)
    /// is in the set (`--match-sets`).
    InSet(Arc<IpSet>),
    /// `-m comment --comment meshinit`: marks rules meshinit puts into chains it does not
    /// own, where the target alone cannot say whose rule it is (see `OWNER_COMMENT`).
    OwnerComment,
}

/// The comment that tags meshinit's non-jump rules in built-in chains, so cleanup removes
/// exactly those and never another tool's look-alike rule.
pub const OWNER_COMMENT: &str = "meshinit";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Jump(IstioChain),
    Return,
    Accept,
    Drop,
    Redirect { to_port: Port },
    Tproxy { mark: u32, on_port: Port },
    SetMark(u32),
    ConnMarkSave,
    ConnMarkRestore,
    CtZone(u16),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub target: Target,
}

impl Rule {
    pub fn new(matches: Vec<Match>, target: Target) -> Rule {
        Rule { matches, target }
    }

    /// Whether the rule's target alone shows it belongs to meshinit.
    pub fn jumps_to_own_chain(&self) -> bool {
        matches!(self.target, Target::Jump(_))
    }
}

/// The planned contents of one chain in one table.
///
/// `head` exists for built-in chains only: rules that must sit in front of whatever other
/// tools already put there (Istio inserts them at position 1). `rules` are appended after.
/// For meshinit's own chains `head` is always empty and `rules` is the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRules {
    pub chain: Chain,
    pub head: Vec<Rule>,
    pub rules: Vec<Rule>,
}

impl ChainRules {
    pub fn all_rules(&self) -> impl Iterator<Item = &Rule> {
        self.head.iter().chain(self.rules.iter())
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One table's chains, in first-use order. Own chains appear even when empty if a rule jumps
/// to them (iptables refuses a jump to a missing chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    pub table: Table,
    pub chains: Vec<ChainRules>,
}

impl TableRules {
    pub fn chain(&self, chain: Chain) -> Option<&ChainRules> {
        self.chains.iter().find(|c| c.chain == chain)
    }

    pub fn own_chains(&self) -> impl Iterator<Item = IstioChain> + '_ {
        self.chains.iter().filter_map(|c| match c.chain {
            Chain::Istio(own) => Some(own),
            Chain::Builtin(_) => None,
        })
    }

    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(ChainRules::len).sum()
    }
}

/// Everything meshinit wants in one family's netfilter tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyRuleset {
    pub family: Family,
    /// Only tables with at least one chain, in `Table` order.
    pub tables: Vec<TableRules>,
}

impl FamilyRuleset {
    /// The sets the family's rules look up, each once, in the order the rules name them.
    pub fn sets(&self) -> Vec<Arc<IpSet>> {
        let mut sets: Vec<Arc<IpSet>> = Vec::new();
        let all = self
            .tables
            .iter()
            .flat_map(|t| t.chains.iter())
            .flat_map(|c| c.all_rules())
            .flat_map(|r| r.matches.iter());
        for m in all {
            if let Match::InSet(set) = m {
                if !sets.iter().any(|s| s.name() == set.name()) {
                    sets.push(Arc::clone(set));
                }
            }
        }
        sets
    }

    pub fn table(&self, table: Table) -> Option<&TableRules> {
        self.tables.iter().find(|t| t.table == table)
    }

    pub fn rule_count(&self) -> usize {
        self.tables.iter().map(TableRules::rule_count).sum()
    }
}

/// The complete plan: per-family rulesets plus the non-netfilter state Istio also sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub v4: FamilyRuleset,
    /// `None` when IPv6 is off: meshinit then leaves ip6tables alone entirely.
    pub v6: Option<FamilyRuleset>,
    /// Present in TPROXY mode with inbound capture; applies to every planned family.
    pub tproxy_routing: Option<TproxyRouting>,
    /// Istio adds `::6/128` to `lo` whenever IPv6 is on: the source address of the sidecar's
    /// inbound passthrough connections, which the rules use to tell them apart.
    pub ipv6_passthrough_address: bool,
}

impl Ruleset {
    pub fn families(&self) -> impl Iterator<Item = &FamilyRuleset> {
        std::iter::once(&self.v4).chain(self.v6.as_ref())
    }

    pub fn family(&self, family: Family) -> Option<&FamilyRuleset> {
        match family {
            Family::V4 => Some(&self.v4),
            Family::V6 => self.v6.as_ref(),
        }
    }
}
