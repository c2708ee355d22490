//! The engine against recording fakes: call order, rollback, convergence, cleanup.

use std::collections::HashMap;

use super::*;
use crate::config::{build_config, ConfigOutcome, HostFacts, RawSettings};
use crate::rules::plan;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Save(Family),
    Restore(Family, String),
    RemoveTables(Family, Vec<Table>),
}

/// Records every call; fails the restore of `fail_family` (on its first attempt) on request.
#[derive(Default)]
struct FakeNetfilter {
    calls: Vec<Call>,
    saves: HashMap<Family, String>,
    fail_family: Option<Family>,
}

impl Netfilter for FakeNetfilter {
    fn describe(&self) -> String {
        "fake".into()
    }
    fn may_hold_rules(&mut self, family: Family) -> bool {
        self.saves.contains_key(&family)
    }
    fn existing_tables(&mut self, _: Family) -> Option<Vec<Table>> {
        Some(vec![])
    }
    fn save(&mut self, family: Family) -> Result<String, ApplyError> {
        self.calls.push(Call::Save(family));
        Ok(self.saves.get(&family).cloned().unwrap_or_default())
    }
    fn restore(&mut self, family: Family, input: &dyn RestoreInput) -> Result<(), ApplyError> {
        self.calls.push(Call::Restore(family, input.text()));
        if self.fail_family == Some(family) {
            self.fail_family = None;
            return Err(ApplyError::Restore {
                program: "fake-restore".into(),
                family,
                line: Some(2),
                line_text: None,
                stderr: "line 2 failed".into(),
            });
        }
        Ok(())
    }
    fn remove_tables(&mut self, family: Family, tables: &[Table]) -> Result<(), ApplyError> {
        self.calls.push(Call::RemoveTables(family, tables.to_vec()));
        Ok(())
    }
    fn processes_launched(&self) -> usize {
        self.calls.len()
    }
}

#[derive(Default)]
struct FakeRouting {
    ensured: Vec<RoutingPlan>,
    undone: Vec<RoutingChanges>,
}

impl Routing for FakeRouting {
    fn ensure(&mut self, plan: &RoutingPlan) -> Result<RoutingChanges, ApplyError> {
        self.ensured.push(*plan);
        let added = plan
            .tproxy
            .map(|(mark, table)| {
                vec![RoutingItem::Rule {
                    family: Family::V4,
                    mark,
                    table,
                }]
            })
            .unwrap_or_default();
        Ok(RoutingChanges { added })
    }
    fn undo(&mut self, changes: &RoutingChanges) -> Result<(), ApplyError> {
        self.undone.push(changes.clone());
        Ok(())
    }
    fn remove_stale(&mut self, _: &RoutingPlan) -> Result<usize, ApplyError> {
        Ok(0)
    }
    fn remove_all(&mut self) -> Result<usize, ApplyError> {
        Ok(0)
    }
}

struct NoHost;
impl HostFacts for NoHost {
    fn detect_ipv6(&self, _: bool) -> Result<bool, crate::config::ConfigError> {
        panic!("tests pass --ipv6 explicitly")
    }
    fn resolv_conf_nameservers(&self) -> Result<Vec<std::net::IpAddr>, crate::config::ConfigError> {
        Ok(vec![])
    }
    fn user_uid(&self, _: &str) -> Option<u32> {
        None
    }
}

fn ruleset(flags: &[(crate::config::build::Setting, &str)]) -> Ruleset {
    let mut raw = RawSettings::default();
    for (setting, value) in flags {
        raw.set_flag(*setting, *value);
    }
    match build_config(&raw, &|_| None, &NoHost).unwrap() {
        ConfigOutcome::Capture(config) => plan(&config.capture),
        ConfigOutcome::Skip { .. } => panic!("skip"),
    }
}

use crate::config::build::Setting as S;

fn restores(nf: &FakeNetfilter) -> Vec<(Family, &str)> {
    nf.calls
        .iter()
        .filter_map(|c| match c {
            Call::Restore(family, input) => Some((*family, input.as_str())),
            _ => None,
        })
        .collect()
}

#[test]
fn fresh_namespace_costs_one_restore_per_family_and_no_save() {
    let rules = ruleset(&[(S::Ipv6, "true"), (S::OutboundCidrs, "*")]);
    let mut nf = FakeNetfilter::default();
    let summary = apply(&mut nf, &mut FakeRouting::default(), &rules).unwrap();
    assert!(
        matches!(
            nf.calls.as_slice(),
            [Call::Restore(Family::V4, _), Call::Restore(Family::V6, _)]
        ),
        "{:?}",
        nf.calls
    );
    assert!(summary.converged.is_empty());
}

#[test]
fn v6_failure_rolls_back_v4_and_routing() {
    let rules = ruleset(&[
        (S::Ipv6, "true"),
        (S::InterceptionMode, "TPROXY"),
        (S::InboundPorts, "*"),
    ]);
    let mut nf = FakeNetfilter {
        fail_family: Some(Family::V6),
        ..Default::default()
    };
    let mut routing = FakeRouting::default();
    let err = apply(&mut nf, &mut routing, &rules).unwrap_err();
    assert!(err.to_string().contains("ipv6"), "{err}");
    let restores = restores(&nf);
    let (family, undo) = restores.last().expect("a rollback");
    assert_eq!(*family, Family::V4, "{:?}", nf.calls);
    assert!(
        undo.contains("-X ISTIO_OUTPUT") && undo.contains("-D PREROUTING"),
        "{undo}"
    );
    assert!(
        nf.calls.contains(&Call::Save(Family::V6)),
        "the failed family is read back"
    );
    assert_eq!(routing.undone.len(), 1, "routing changes are undone");
}

#[test]
fn v6_failure_puts_a_saved_v4_back_exactly() {
    let rules = ruleset(&[(S::Ipv6, "true")]);
    let previous =
        "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";
    let mut nf = FakeNetfilter {
        fail_family: Some(Family::V6),
        saves: HashMap::from([(Family::V4, previous.to_owned())]),
        ..Default::default()
    };
    apply(&mut nf, &mut FakeRouting::default(), &rules).unwrap_err();
    let restores = restores(&nf);
    assert_eq!(
        restores.last(),
        Some(&(
            Family::V4,
            "*nat\n-F\n-X\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
        ))
    );
}

#[test]
fn rerun_converges_in_one_restore() {
    let rules = ruleset(&[(S::Ipv6, "false"), (S::OutboundCidrs, "*")]);
    let old = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_DROP - [0:0]\n-A PREROUTING -i eth7 -m comment --comment meshinit -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";
    let mut nf = FakeNetfilter {
        saves: HashMap::from([(Family::V4, old.to_owned())]),
        ..Default::default()
    };
    let summary = apply(&mut nf, &mut FakeRouting::default(), &rules).unwrap();
    assert_eq!(summary.converged, [Family::V4]);
    let [Call::Save(Family::V4), Call::Restore(Family::V4, input), ..] = nf.calls.as_slice() else {
        panic!("{:?}", nf.calls)
    };
    for expected in [
        "-D PREROUTING -i eth7 -m comment --comment meshinit -j RETURN",
        "-D OUTPUT -j ISTIO_OUTPUT",
        "-X ISTIO_DROP",
        "-A OUTPUT -j ISTIO_OUTPUT",
    ] {
        assert!(input.contains(expected), "missing {expected:?} in\n{input}");
    }
    assert_eq!(restores(&nf).len(), 1);
}

#[test]
fn ipv6_rules_of_an_earlier_config_go_when_ipv6_is_off() {
    let rules = ruleset(&[(S::Ipv6, "false")]);
    let old_v6 =
        "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";
    let mut nf = FakeNetfilter {
        saves: HashMap::from([(Family::V6, old_v6.to_owned())]),
        ..Default::default()
    };
    let summary = apply(&mut nf, &mut FakeRouting::default(), &rules).unwrap();
    assert_eq!(summary.converged, [Family::V6]);
    let restores = restores(&nf);
    assert_eq!(restores.len(), 2);
    assert_eq!(restores[1].0, Family::V6);
    assert!(
        restores[1].1.contains("-X ISTIO_OUTPUT"),
        "{}",
        restores[1].1
    );
    assert!(nf
        .calls
        .contains(&Call::RemoveTables(Family::V6, vec![Table::Nat])));
}

#[test]
fn cleanup_touches_only_families_that_may_hold_rules() {
    let old =
        "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";
    let mut nf = FakeNetfilter {
        saves: HashMap::from([(Family::V4, old.to_owned())]),
        ..Default::default()
    };
    let removed = cleanup(&mut nf, &mut FakeRouting::default(), &Family::ALL).unwrap();
    assert_eq!(removed, 2);
    assert_eq!(nf.calls.len(), 3, "{:?}", nf.calls);
    assert_eq!(
        nf.calls[2],
        Call::RemoveTables(Family::V4, vec![Table::Nat])
    );
}
