//! The iptables backend (`iptables.rs`) against recording fakes: call order, rollback,
//! convergence, cleanup.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::iptables::{apply, cleanup, ApplySummary};
use super::*;
use crate::config::{build_config, ConfigOutcome, HostFacts, RawSettings};
use crate::rules::iptables::model::Ruleset;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Save(Family),
    Restore(Family, String),
    RemoveTables(Family, Vec<Table>),
    EnsureSets(Vec<String>),
    RemoveUnusedSets,
    ListSets,
}

/// One log for every fake, so tests see the order of calls across them.
pub(crate) type Journal = Rc<RefCell<Vec<Call>>>;

/// Records every call; fails the restore of `fail_family` (on its first attempt) on request.
#[derive(Default)]
pub(crate) struct FakeNetfilter {
    pub(crate) calls: Journal,
    pub(crate) saves: HashMap<Family, String>,
    pub(crate) fail_family: Option<Family>,
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
        self.calls.borrow_mut().push(Call::Save(family));
        Ok(self.saves.get(&family).cloned().unwrap_or_default())
    }
    fn restore(&mut self, family: Family, input: &dyn RestoreInput) -> Result<(), ApplyError> {
        self.calls
            .borrow_mut()
            .push(Call::Restore(family, input.text()));
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
        self.calls
            .borrow_mut()
            .push(Call::RemoveTables(family, tables.to_vec()));
        Ok(())
    }
    fn processes_launched(&self) -> usize {
        self.calls.borrow().len()
    }
}

impl FakeNetfilter {
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }
}

/// Records into the netfilter fake's journal; fails `ensure` on request; lists `contents`.
pub(crate) struct FakeIpSets {
    pub(crate) calls: Journal,
    pub(crate) fail_ensure: bool,
    pub(crate) contents: Vec<SetContents>,
}

impl FakeIpSets {
    pub(crate) fn sharing(nf: &FakeNetfilter) -> FakeIpSets {
        FakeIpSets {
            calls: Rc::clone(&nf.calls),
            fail_ensure: false,
            contents: Vec::new(),
        }
    }
}

impl IpSets for FakeIpSets {
    fn available(&mut self) -> bool {
        true
    }
    fn ensure(
        &mut self,
        sets: &[std::sync::Arc<crate::rules::iptables::ipset::IpSet>],
    ) -> Result<usize, IpSetError> {
        let names = sets.iter().map(|s| s.name().to_string()).collect();
        self.calls.borrow_mut().push(Call::EnsureSets(names));
        if self.fail_ensure {
            return Err(IpSetError {
                action: "creating",
                set: sets[0].name().to_string(),
                code: 4099,
            });
        }
        Ok(sets.len())
    }
    fn remove_unused(&mut self) -> Result<usize, IpSetError> {
        self.calls.borrow_mut().push(Call::RemoveUnusedSets);
        Ok(0)
    }
    fn contents(&mut self) -> Result<Vec<SetContents>, IpSetError> {
        self.calls.borrow_mut().push(Call::ListSets);
        Ok(self.contents.clone())
    }
}

#[derive(Default)]
pub(crate) struct FakeRouting {
    pub(crate) ensured: Vec<RoutingPlan>,
    pub(crate) undone: Vec<RoutingChanges>,
    pub(crate) fail_ensure: bool,
    pub(crate) fail_remove_all: bool,
    /// What `read` finds.
    pub(crate) state: RoutingState,
}

impl Routing for FakeRouting {
    fn ensure(&mut self, plan: &RoutingPlan) -> Result<RoutingChanges, ApplyError> {
        self.ensured.push(*plan);
        if self.fail_ensure {
            return Err(ApplyError::Netlink(crate::netlink::NetlinkError {
                what: "adding a rule",
                errno: nix::errno::Errno::EPERM,
            }));
        }
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
        if self.fail_remove_all {
            return Err(ApplyError::Netlink(crate::netlink::NetlinkError {
                what: "removing a rule",
                errno: nix::errno::Errno::EPERM,
            }));
        }
        Ok(0)
    }
    fn read(&mut self, passthrough_address: bool) -> Result<RoutingState, ApplyError> {
        Ok(RoutingState {
            entries: self.state.entries.clone(),
            passthrough_address: passthrough_address && self.state.passthrough_address,
        })
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
    ruleset_with(flags, crate::rules::PlanOptions::default())
}

fn ruleset_with(
    flags: &[(crate::config::build::Setting, &str)],
    options: crate::rules::PlanOptions,
) -> Ruleset {
    let mut raw = RawSettings::default();
    for (setting, value) in flags {
        raw.set_flag(*setting, *value);
    }
    match build_config(&raw, &|_| None, &NoHost).unwrap() {
        ConfigOutcome::Capture(config) => {
            crate::rules::iptables::plan_with(&config.capture, options)
        }
        ConfigOutcome::Skip { .. } => panic!("skip"),
    }
}

use crate::config::build::Setting as S;

fn restores(nf: &FakeNetfilter) -> Vec<(Family, String)> {
    nf.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Restore(family, input) => Some((family, input)),
            _ => None,
        })
        .collect()
}

/// `apply` with routing and sets fakes.
fn apply_to(nf: &mut FakeNetfilter, rules: &Ruleset) -> Result<ApplySummary, ApplyError> {
    let mut sets = FakeIpSets::sharing(nf);
    apply(nf, &mut FakeRouting::default(), &mut sets, rules)
}

#[test]
fn fresh_namespace_costs_one_restore_per_family_and_no_save() {
    let rules = ruleset(&[(S::Ipv6, "true"), (S::OutboundCidrs, "*")]);
    let mut nf = FakeNetfilter::default();
    let summary = apply_to(&mut nf, &rules).unwrap();
    assert!(
        matches!(
            nf.calls().as_slice(),
            [Call::Restore(Family::V4, _), Call::Restore(Family::V6, _)]
        ),
        "{:?}",
        nf.calls()
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
    let mut sets = FakeIpSets::sharing(&nf);
    let err = apply(&mut nf, &mut routing, &mut sets, &rules).unwrap_err();
    assert!(err.to_string().contains("ipv6"), "{err}");
    let restores = restores(&nf);
    let (family, undo) = restores.last().expect("a rollback");
    assert_eq!(*family, Family::V4, "{:?}", nf.calls());
    assert!(
        undo.contains("-X ISTIO_OUTPUT") && undo.contains("-D PREROUTING"),
        "{undo}"
    );
    assert!(
        nf.calls().contains(&Call::Save(Family::V6)),
        "the failed family is read back"
    );
    // A fresh pod's routing would have come after its rules: none was added.
    assert!(routing.ensured.is_empty(), "{:?}", routing.ensured);
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
    apply_to(&mut nf, &rules).unwrap_err();
    let restores = restores(&nf);
    assert_eq!(
        restores.last(),
        Some(&(
            Family::V4,
            "*nat\n-F\n-X\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
                .to_string()
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
    let summary = apply_to(&mut nf, &rules).unwrap();
    assert_eq!(summary.converged, [Family::V4]);
    let calls = nf.calls();
    let [Call::Save(Family::V4), Call::Restore(Family::V4, input), ..] = calls.as_slice() else {
        panic!("{:?}", nf.calls())
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
    let summary = apply_to(&mut nf, &rules).unwrap();
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
        .calls()
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
    let mut sets = FakeIpSets::sharing(&nf);
    let removed = cleanup(
        &mut nf,
        &mut FakeRouting::default(),
        &mut sets,
        &Family::ALL,
    )
    .unwrap();
    assert_eq!(removed, 2);
    let calls = nf.calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(
        calls[3],
        Call::RemoveUnusedSets,
        "sets go once no rule uses them"
    );
    assert_eq!(calls[2], Call::RemoveTables(Family::V4, vec![Table::Nat]));
}

fn with_sets() -> crate::rules::PlanOptions {
    crate::rules::PlanOptions { match_sets: true }
}

const LISTS: [(S, &str); 3] = [
    (S::Ipv6, "true"),
    (S::OutboundCidrs, "*"),
    (
        S::OutboundCidrsExclude,
        "192.0.2.0/24,198.51.100.0/24,2001:db8::/32,2001:db8:1::/48",
    ),
];

#[test]
fn sets_exist_before_the_rules_naming_them_and_unused_ones_go_after() {
    let rules = ruleset_with(&LISTS, with_sets());
    let mut nf = FakeNetfilter::default();
    let summary = apply_to(&mut nf, &rules).unwrap();
    let calls = nf.calls();
    let [Call::EnsureSets(names), Call::Restore(Family::V4, v4), Call::Restore(Family::V6, _), Call::RemoveUnusedSets] =
        calls.as_slice()
    else {
        panic!("{calls:?}")
    };
    assert_eq!(names.len(), 2, "one set per family: {names:?}");
    assert!(
        v4.contains(&format!("--match-set {} dst", names[0])),
        "{v4}"
    );
    assert_eq!(summary.sets_created, 2);
}

#[test]
fn no_set_calls_without_sets() {
    let rules = ruleset(&LISTS);
    let mut nf = FakeNetfilter::default();
    apply_to(&mut nf, &rules).unwrap();
    assert!(
        !nf.calls()
            .iter()
            .any(|c| matches!(c, Call::EnsureSets(_) | Call::RemoveUnusedSets)),
        "{:?}",
        nf.calls()
    );
}

#[test]
fn sets_that_cannot_be_made_stop_the_apply_before_any_rule() {
    let rules = ruleset_with(&LISTS, with_sets());
    let mut nf = FakeNetfilter::default();
    let mut sets = FakeIpSets::sharing(&nf);
    sets.fail_ensure = true;
    let err = apply(&mut nf, &mut FakeRouting::default(), &mut sets, &rules).unwrap_err();
    assert!(err.to_string().contains("too many sets"), "{err}");
    assert_sets_made_then_removed_and_no_rules(&nf);
}

#[test]
fn a_failed_family_leaves_its_new_sets_unused_and_removed() {
    let rules = ruleset_with(&LISTS, with_sets());
    let mut nf = FakeNetfilter {
        fail_family: Some(Family::V6),
        ..Default::default()
    };
    apply_to(&mut nf, &rules).unwrap_err();
    let calls = nf.calls();
    assert_eq!(calls.last(), Some(&Call::RemoveUnusedSets), "{calls:?}");
    let rollback = calls
        .iter()
        .rposition(|c| matches!(c, Call::Restore(Family::V4, _)))
        .unwrap();
    assert!(rollback < calls.len() - 1, "sets go after the rollback");
}

#[test]
fn rerun_without_sets_removes_an_earlier_configs_sets() {
    let rules = ruleset(&[(S::Ipv6, "false"), (S::OutboundCidrs, "*")]);
    let old = "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -m set --match-set meshinit-excl-nets4-0badc0de dst -j RETURN\nCOMMIT\n";
    let mut nf = FakeNetfilter {
        saves: HashMap::from([(Family::V4, old.to_owned())]),
        ..Default::default()
    };
    apply_to(&mut nf, &rules).unwrap();
    let calls = nf.calls();
    assert!(
        matches!(
            calls.as_slice(),
            [
                Call::Save(_),
                Call::Restore(_, _),
                ..,
                Call::RemoveUnusedSets
            ]
        ),
        "{calls:?}"
    );
}

#[test]
fn rerun_removes_sets_an_interrupted_run_left_unused() {
    // The rules already switched away from the sets (the run was killed before it removed
    // them): nothing in the save names a set, yet a re-run must sweep them.
    let rules = ruleset(&[(S::Ipv6, "false"), (S::OutboundCidrs, "*")]);
    let old = "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n";
    let mut nf = FakeNetfilter {
        saves: HashMap::from([(Family::V4, old.to_owned())]),
        ..Default::default()
    };
    apply_to(&mut nf, &rules).unwrap();
    assert_eq!(
        nf.calls().last(),
        Some(&Call::RemoveUnusedSets),
        "{:?}",
        nf.calls()
    );
}

#[test]
fn failed_routing_takes_a_fresh_pods_rules_and_sets_back() {
    let rules = ruleset_with(
        &[
            (S::Ipv6, "true"),
            (S::InterceptionMode, "TPROXY"),
            (S::InboundPorts, "*"),
            (S::OutboundCidrsExclude, "198.51.100.0/24,203.0.113.0/24"),
        ],
        with_sets(),
    );
    let mut nf = FakeNetfilter::default();
    let mut sets = FakeIpSets::sharing(&nf);
    let mut routing = FakeRouting {
        fail_ensure: true,
        ..Default::default()
    };
    apply(&mut nf, &mut routing, &mut sets, &rules).unwrap_err();
    let calls = nf.calls();
    assert!(
        matches!(calls.first(), Some(Call::EnsureSets(_))),
        "{calls:?}"
    );
    assert_eq!(calls.last(), Some(&Call::RemoveUnusedSets), "{calls:?}");
    // The rules went in (a fresh pod's routing follows them), then came out again.
    let restores = restores(&nf);
    for family in Family::ALL {
        let of_family: Vec<&String> = restores
            .iter()
            .filter(|(f, _)| *f == family)
            .map(|(_, input)| input)
            .collect();
        assert_eq!(of_family.len(), 2, "{family}: {calls:?}");
        assert!(of_family[1].contains("-X ISTIO_TPROXY"), "{}", of_family[1]);
    }
}

#[test]
fn routing_failure_over_existing_rules_changes_no_rule() {
    // Over rules of ours the routing goes first, so its failure stops the apply there.
    let rules = ruleset(&[
        (S::Ipv6, "false"),
        (S::InterceptionMode, "TPROXY"),
        (S::InboundPorts, "*"),
    ]);
    let old =
        "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";
    let mut nf = FakeNetfilter {
        saves: HashMap::from([(Family::V4, old.to_owned())]),
        ..Default::default()
    };
    let mut sets = FakeIpSets::sharing(&nf);
    let mut routing = FakeRouting {
        fail_ensure: true,
        ..Default::default()
    };
    apply(&mut nf, &mut routing, &mut sets, &rules).unwrap_err();
    assert!(restores(&nf).is_empty(), "{:?}", nf.calls());
}

/// The apply stopped before any rule: the sets it made were removed, nothing else touched.
fn assert_sets_made_then_removed_and_no_rules(nf: &FakeNetfilter) {
    assert!(
        matches!(
            nf.calls().as_slice(),
            [Call::EnsureSets(_), Call::RemoveUnusedSets]
        ),
        "{:?}",
        nf.calls()
    );
}

#[test]
fn cleanup_keeps_going_and_reports_every_failure() {
    let ours =
        "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";
    let mut nf = FakeNetfilter {
        saves: HashMap::from([(Family::V4, ours.to_owned()), (Family::V6, ours.to_owned())]),
        fail_family: Some(Family::V4),
        ..Default::default()
    };
    let mut routing = FakeRouting {
        fail_remove_all: true,
        ..Default::default()
    };
    let mut sets = FakeIpSets::sharing(&nf);
    let err = cleanup(&mut nf, &mut routing, &mut sets, &Family::ALL).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, ApplyError::Several(all) if all.len() == 2),
        "{message}"
    );
    assert!(
        message.contains("ipv4") && message.contains("removing a rule"),
        "{message}"
    );
    // The failure of ipv4 did not keep ipv6 or the sets from being cleaned.
    assert!(restores(&nf).iter().any(|(f, _)| *f == Family::V6));
    assert_eq!(nf.calls().last(), Some(&Call::RemoveUnusedSets));
}
