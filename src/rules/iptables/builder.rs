//! Accumulates planned rules per family, table and chain, resolving appends and positional
//! inserts into each chain's final contents as they happen.
//!
//! Istio describes its ruleset as a sequence of `-A` and `-I CHAIN N` commands; the planner
//! follows that sequence so its logic can be read next to Istio's, and this builder turns it
//! into plain data: the order rules will have in the kernel.

use super::model::{
    Chain, ChainRules, Family, FamilyRuleset, Match, Rule, Table, TableRules, Target,
};
pub use crate::rules::capture::Families;

#[derive(Debug)]
struct FamilyBuilder {
    family: Family,
    /// (table, chain) in first-use order.
    chains: Vec<(Table, ChainRules)>,
}

impl FamilyBuilder {
    fn chain_mut(&mut self, table: Table, chain: Chain) -> &mut ChainRules {
        let index = match self
            .chains
            .iter()
            .position(|(t, c)| *t == table && c.chain == chain)
        {
            Some(index) => index,
            None => {
                self.chains.push((
                    table,
                    ChainRules {
                        chain,
                        head: Vec::new(),
                        rules: Vec::new(),
                    },
                ));
                self.chains.len() - 1
            }
        };
        &mut self.chains[index].1
    }

    fn declare_jump_target(&mut self, table: Table, rule: &Rule) {
        if let Target::Jump(target) = rule.target {
            self.chain_mut(table, Chain::Istio(target));
        }
    }

    fn append(&mut self, table: Table, chain: Chain, rule: Rule) {
        // The chain is declared before its jump target, as Istio orders its `-N` lines.
        self.chain_mut(table, chain);
        self.declare_jump_target(table, &rule);
        self.chain_mut(table, chain).rules.push(rule);
    }

    /// `-I CHAIN position` (1-based). In a built-in chain only position 1 is meaningful to
    /// meshinit: "in front of everything", which the `head` list keeps apart from the rules
    /// other tools own.
    fn insert(&mut self, table: Table, chain: Chain, position: usize, rule: Rule) {
        self.chain_mut(table, chain);
        self.declare_jump_target(table, &rule);
        let target = self.chain_mut(table, chain);
        let list = match chain {
            Chain::Builtin(_) => &mut target.head,
            Chain::Istio(_) => &mut target.rules,
        };
        let index = position.saturating_sub(1).min(list.len());
        list.insert(index, rule);
    }

    fn finish(self) -> FamilyRuleset {
        let mut tables: Vec<TableRules> = Vec::new();
        for (table, chain) in self.chains {
            match tables.iter_mut().find(|t| t.table == table) {
                Some(existing) => existing.chains.push(chain),
                None => tables.push(TableRules {
                    table,
                    chains: vec![chain],
                }),
            }
        }
        tables.sort_by_key(|t| t.table);
        FamilyRuleset {
            family: self.family,
            tables,
        }
    }
}

/// Collects the plan for IPv4 and, when enabled, IPv6.
#[derive(Debug)]
pub struct RulesetBuilder {
    v4: FamilyBuilder,
    v6: Option<FamilyBuilder>,
}

impl RulesetBuilder {
    pub fn new(ipv6: bool) -> RulesetBuilder {
        RulesetBuilder {
            v4: FamilyBuilder {
                family: Family::V4,
                chains: Vec::new(),
            },
            v6: ipv6.then(|| FamilyBuilder {
                family: Family::V6,
                chains: Vec::new(),
            }),
        }
    }

    /// Hands `rule` to each family's builder it applies to, cloning only when both do.
    fn each(&mut self, families: Families, rule: Rule, op: impl Fn(&mut FamilyBuilder, Rule)) {
        let v6 = self.v6.as_mut().filter(|_| families.includes(Family::V6));
        match (families.includes(Family::V4), v6) {
            (true, Some(v6)) => {
                op(v6, rule.clone());
                op(&mut self.v4, rule);
            }
            (true, None) => op(&mut self.v4, rule),
            (false, Some(v6)) => op(v6, rule),
            (false, None) => {}
        }
    }

    pub fn append(&mut self, families: Families, table: Table, chain: Chain, rule: Rule) {
        let rule = tag_if_unowned(chain, rule);
        self.each(families, rule, |b, rule| b.append(table, chain, rule));
    }

    pub fn insert(
        &mut self,
        families: Families,
        table: Table,
        chain: Chain,
        position: usize,
        rule: Rule,
    ) {
        let rule = tag_if_unowned(chain, rule);
        self.each(families, rule, |b, rule| {
            b.insert(table, chain, position, rule)
        });
    }

    pub fn finish(self) -> (FamilyRuleset, Option<FamilyRuleset>) {
        (self.v4.finish(), self.v6.map(FamilyBuilder::finish))
    }
}

/// Rules meshinit puts into chains it does not own carry the owner comment unless their
/// target already names one of meshinit's chains, so cleanup can find exactly them.
fn tag_if_unowned(chain: Chain, mut rule: Rule) -> Rule {
    if matches!(chain, Chain::Builtin(_)) && !rule.jumps_to_own_chain() {
        rule.matches.push(Match::OwnerComment);
    }
    rule
}
