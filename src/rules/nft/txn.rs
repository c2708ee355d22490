//! The transaction that takes meshinit's tables from what the kernel holds to the plan, as
//! a list of operations. Both the `nft -f` text (`render`) and the netlink batch (`encode`)
//! are made from this one list, in its order, so the two programs can never disagree.
//!
//! Pure: no I/O, no text, no bytes.
//!
//! For a fresh namespace it is what Istio's backend sends: per table `add table`, `flush
//! table`, `add chain` for each chain in use, then the rule operations in Istio's order.
//! `flush table` makes a re-run with the same configuration converge inside the
//! transaction. When the table now holds other chains than the plan's (an earlier
//! configuration's), it is deleted first, in the same transaction, so it ends up exactly as
//! a fresh one; tables the plan no longer uses are deleted. `add table` before each `delete
//! table` makes a missing table no error.

use super::model::{BaseChain, Chain, ExistingTables, NftRuleset, RuleOp, Table};

/// One operation of the transaction (one `nft` command, one netlink message or a few).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Creates the table if it is missing (`add table`).
    AddTable(Table),
    /// Deletes every rule of the table (`flush table`).
    FlushTable(Table),
    /// Deletes the table and everything in it (`delete table`).
    DeleteTable(Table),
    /// Creates the chain if it is missing (`add chain`), as a base chain when `base` is set.
    AddChain {
        table: Table,
        chain: Chain,
        base: Option<BaseChain>,
    },
    /// `add rule` or `insert rule ... index N`.
    Rule { table: Table, op: &'a RuleOp },
}

/// The operations that take meshinit's tables from `existing` to `ruleset`. With
/// `Some(&ExistingTables::default())` (a fresh namespace) this is exactly what `print`
/// shows; with `None` (the current state is unknown) every planned table is rebuilt and
/// every other table of meshinit's is deleted.
pub fn transaction<'a>(ruleset: &'a NftRuleset, existing: Option<&ExistingTables>) -> Vec<Op<'a>> {
    let mut ops = Vec::with_capacity(8 + ruleset.rule_count());
    for table in &ruleset.tables {
        // Flushed, a table holding exactly the planned chains is as a fresh one would be;
        // any other (an earlier configuration's) is rebuilt, so that stale chains go and
        // new ones are not listed after the old.
        let rebuild = match existing {
            None => true,
            Some(existing) => existing.table(table.table).is_some_and(|chains| {
                !chains
                    .iter()
                    .map(String::as_str)
                    .eq(table.chains.iter().map(|c| c.name()))
            }),
        };
        if rebuild {
            push_delete(&mut ops, table.table);
        }
        ops.push(Op::AddTable(table.table));
        ops.push(Op::FlushTable(table.table));
        for chain in &table.chains {
            ops.push(Op::AddChain {
                table: table.table,
                chain: *chain,
                base: table.base_chain(*chain),
            });
        }
        for op in &table.ops {
            ops.push(Op::Rule {
                table: table.table,
                op,
            });
        }
    }
    for table in Table::ALL {
        if ruleset.table(table).is_some() {
            continue;
        }
        let present = existing.is_none_or(|existing| existing.table(table).is_some());
        if present {
            push_delete(&mut ops, table);
        }
    }
    ops
}

/// The operations that delete `tables` (all of meshinit's, normally), whether or not they
/// exist.
pub fn cleanup(tables: &[Table]) -> Vec<Op<'static>> {
    let mut ops = Vec::with_capacity(2 * tables.len());
    for table in tables {
        push_delete(&mut ops, *table);
    }
    ops
}

fn push_delete(ops: &mut Vec<Op<'_>>, table: Table) {
    ops.push(Op::AddTable(table));
    ops.push(Op::DeleteTable(table));
}
