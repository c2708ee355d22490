//! The decisions over pods, with a fake namespace: "rules" are the plan's fingerprint of
//! the annotations and plugin that installed them, so a flush, an annotation change and an
//! upgrade each make CHECK differ the way the real plugin's would.

use super::*;
use std::cell::RefCell;
use std::sync::Mutex;

const NODE: &str = "node-a";
const PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";

fn settings(policy: Policy) -> CaptureSettings {
    CaptureSettings {
        node_name: NODE.into(),
        policy,
        interval: Duration::from_millis(20),
        upgrade: false,
        upgrades_per_minute: 2,
        exclude_namespaces: vec!["legacy".into()],
        plugin: plugin::PluginConf {
            exclude_namespaces: vec!["kube-system".into()],
            proxy_env: BTreeMap::new(),
        },
        plugin_id: "plugin-v2".into(),
        init_container_pods: true,
        repair_init_container_pods: false,
    }
}

fn meshed(name: &str) -> PodView {
    PodView {
        uid: format!("uid-{name}"),
        namespace: "shop".into(),
        name: name.into(),
        annotations: BTreeMap::from([(
            "sidecar.istio.io/status".to_owned(),
            r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"]}"#.to_owned(),
        )]),
        host_network: false,
        running: true,
        node_name: Some(NODE.into()),
        init_args: None,
        init_env: BTreeMap::new(),
    }
}

/// An init-container-mode pod: istio-init with Istio's injector's arguments.
fn init_mode(name: &str) -> PodView {
    let mut pod = with(
        meshed(name),
        "sidecar.istio.io/status",
        r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#,
    );
    pod.init_args = Some(
        "istio-iptables -p 15001 -m REDIRECT"
            .split(' ')
            .map(String::from)
            .collect(),
    );
    pod
}

fn with(mut pod: PodView, key: &str, value: &str) -> PodView {
    pod.annotations.insert(key.into(), value.into());
    pod
}

/// One pod's namespace: the plan installed last (None: flushed), and the calls made.
struct FakeNs {
    installed: RefCell<Option<String>>,
    plugin: String,
    calls: RefCell<Vec<&'static str>>,
    unreachable: bool,
}

impl FakeNs {
    fn new(plugin: &str) -> FakeNs {
        FakeNs {
            installed: RefCell::new(None),
            plugin: plugin.into(),
            calls: RefCell::new(Vec::new()),
            unreachable: false,
        }
    }
    fn plan(&self, pod: &PodView) -> String {
        format!("{}@{}", pod.plan_key(), self.plugin)
    }
    fn installed_for(pod: &PodView, plugin: &str) -> FakeNs {
        let ns = FakeNs::new(plugin);
        *ns.installed.borrow_mut() = Some(ns.plan(pod));
        ns
    }
}

impl PodCapture for FakeNs {
    fn check(&self, pod: &PodView) -> Checked {
        self.calls.borrow_mut().push("check");
        if self.unreachable {
            return Checked::Unreachable("no process of the pod".into());
        }
        // The library's validation, as the production capture does first.
        if let Err(err) = validate(pod, &settings(Policy::Repair).plugin) {
            return err;
        }
        match &*self.installed.borrow() {
            Some(rules) if *rules == self.plan(pod) => Checked::Clean,
            Some(_) => Checked::Drifted("ipv4 nat ISTIO_OUTPUT: unexpected rule".into()),
            None => Checked::Drifted("ipv4 nat OUTPUT: missing `-j ISTIO_OUTPUT`".into()),
        }
    }
    fn apply(&self, pod: &PodView) -> Checked {
        self.calls.borrow_mut().push("apply");
        if let Err(err) = validate(pod, &settings(Policy::Repair).plugin) {
            return err;
        }
        *self.installed.borrow_mut() = Some(self.plan(pod));
        Checked::Clean
    }
}

fn run(pod: &PodView, ns: &FakeNs, settings: &CaptureSettings) -> Outcome {
    reconcile_pod(
        pod,
        ns,
        settings,
        &mut UpgradeBudget::default(),
        0,
        Instant::now(),
    )
}

/// The pod as the agent leaves it: its record annotation set to the outcome's.
fn recorded(pod: &PodView, outcome: &Outcome) -> PodView {
    with(pod.clone(), STATE_ANNOTATION, &outcome.record.render())
}

#[test]
fn only_this_nodes_meshed_cni_pods_are_checked() {
    let s = settings(Policy::Repair);
    assert_eq!(select(&meshed("a"), &s), Scope::Check);
    let skipped = |pod: PodView, words: &str| match select(&pod, &s) {
        Scope::Skip(reason) => assert!(reason.contains(words), "{reason} for {pod:?}"),
        Scope::Check => panic!("{pod:?} is checked; expected skipped ({words})"),
    };
    let mut plain = meshed("plain");
    plain.annotations.clear();
    skipped(plain, "not injected");
    // Another mesh's pod: its own annotations, no istio-proxy.
    let mut linkerd = meshed("linkerd");
    linkerd.annotations = BTreeMap::from([(
        "linkerd.io/proxy-version".to_owned(),
        "stable-2.14".to_owned(),
    )]);
    skipped(linkerd, "not injected");
    let mut other_container = meshed("other");
    other_container.annotations.insert(
        "sidecar.istio.io/status".into(),
        r#"{"containers":["app"]}"#.into(),
    );
    skipped(other_container, "no istio-proxy");
    skipped(
        with(meshed("off"), "sidecar.istio.io/inject", "false"),
        "inject",
    );
    skipped(
        with(meshed("out"), OPT_OUT_ANNOTATION, "false"),
        "opted out",
    );
    let mut legacy = meshed("legacy");
    legacy.namespace = "legacy".into();
    skipped(legacy, "legacy is excluded");
    let mut system = meshed("dns");
    system.namespace = "kube-system".into();
    skipped(system, "kube-system is excluded");
    let mut host = meshed("host");
    host.host_network = true;
    skipped(host, "node's network");
    let mut elsewhere = meshed("elsewhere");
    elsewhere.node_name = Some("node-b".into());
    skipped(elsewhere, "another node");
    let mut starting = meshed("starting");
    starting.running = false;
    skipped(starting, "not running");
    // Init-container mode: checked against istio-init's arguments, unless the value is off,
    // or there are none, or injection is off.
    assert_eq!(select(&init_mode("init"), &s), Scope::Check);
    let mut no_args = init_mode("no-args");
    no_args.init_args = None;
    skipped(no_args, "no arguments");
    skipped(
        with(init_mode("off"), "sidecar.istio.io/inject", "false"),
        "inject is false",
    );
    let mut off = settings(Policy::Repair);
    off.init_container_pods = false;
    match select(&init_mode("init"), &off) {
        Scope::Skip(reason) => assert!(reason.contains("initContainerPods"), "{reason}"),
        Scope::Check => panic!("checked with capture.initContainerPods off"),
    }
}

#[test]
fn init_container_mode_pods_are_reported_and_changed_only_when_opted_in() {
    let pod = init_mode("a");
    let ns = FakeNs::new("plugin-v2");
    let outcome = run(&pod, &ns, &settings(Policy::Repair));
    assert_eq!(outcome.state, State::Drifted);
    assert!(outcome.repaired.is_none());
    assert!(
        !ns.calls.borrow().contains(&"apply"),
        "{:?}",
        ns.calls.borrow()
    );
    let event = outcome.event.expect("an Event");
    assert!(
        event.message.contains("init-container mode: reported only"),
        "{}",
        event.message
    );
    // Opted in: re-applied, under policy repair only.
    let mut opted_in = settings(Policy::Repair);
    opted_in.repair_init_container_pods = true;
    let ns = FakeNs::new("plugin-v2");
    let outcome = run(&pod, &ns, &opted_in);
    assert_eq!(outcome.repaired, Some(CaptureCause::Drift), "{outcome:?}");
    assert!(ns.calls.borrow().contains(&"apply"));
    let mut report = settings(Policy::Report);
    report.repair_init_container_pods = true;
    let ns = FakeNs::new("plugin-v2");
    assert!(run(&pod, &ns, &report).repaired.is_none());
    assert!(!ns.calls.borrow().contains(&"apply"));
    // istio-init's arguments become `meshinit check`'s.
    let args = pod.init_args.clone().unwrap();
    assert_eq!(plugin::init_check_args(&args), Some(&args[1..]));
    assert_eq!(plugin::init_check_args(&["sh".to_owned()]), None);
    assert_eq!(
        plugin::init_outcome(
            Some(5),
            b"ipv4 nat OUTPUT: missing `-j ISTIO_OUTPUT`\nipv4 x\n",
            b""
        ),
        Checked::Drifted("ipv4 nat OUTPUT: missing `-j ISTIO_OUTPUT`; ipv4 x".into())
    );
    assert_eq!(
        plugin::init_outcome(
            Some(1),
            b"",
            b" INFO x\nmeshinit: invalid value \"80x\" for -b\n"
        ),
        Checked::Invalid("istio-init's arguments: invalid value \"80x\" for -b".into())
    );
    assert_eq!(plugin::init_outcome(Some(0), b"", b""), Checked::Clean);
}

#[test]
fn a_pod_matching_its_plan_is_recorded_and_left_alone() {
    let pod = meshed("a");
    let ns = FakeNs::installed_for(&pod, "plugin-v2");
    let outcome = run(&pod, &ns, &settings(Policy::Repair));
    assert_eq!(outcome.state, State::Captured);
    assert_eq!(outcome.event, None);
    assert_eq!(*ns.calls.borrow(), ["check"]);
    assert_eq!(outcome.record.annotations, pod.plan_key());
    assert_eq!(outcome.record.plugin, "plugin-v2");
}

#[test]
fn flushed_rules_are_repaired_by_policy_and_only_reported_otherwise() {
    let pod = meshed("a");
    let ns = FakeNs::installed_for(&pod, "plugin-v2");
    let first = run(&pod, &ns, &settings(Policy::Repair));
    let pod = recorded(&pod, &first);
    *ns.installed.borrow_mut() = None;

    let report = run(&pod, &ns, &settings(Policy::Report));
    assert_eq!(report.state, State::Drifted);
    assert!(report.drifted && report.repaired.is_none());
    let event = report.event.expect("an Event");
    assert!(event.warning && event.reason == "MeshinitCaptureDrifted");
    assert!(
        event.message.contains("missing `-j ISTIO_OUTPUT`"),
        "{}",
        event.message
    );
    assert!(
        event.message.contains("policy: report"),
        "{}",
        event.message
    );
    assert_eq!(*ns.installed.borrow(), None, "report changes nothing");

    let repair = run(&pod, &ns, &settings(Policy::Repair));
    assert_eq!(repair.state, State::Captured);
    assert_eq!(repair.repaired, Some(CaptureCause::Drift));
    let event = repair.event.expect("an Event");
    assert_eq!(event.reason, "MeshinitCaptureRepaired");
    assert!(!event.warning);
    assert_eq!(*ns.installed.borrow(), Some(ns.plan(&pod)));
    // Checked, re-applied, and checked again: a repair is only counted once verified.
    assert_eq!(
        ns.calls.borrow()[ns.calls.borrow().len() - 3..],
        ["check", "apply", "check"]
    );
}

#[test]
fn a_changed_annotation_is_applied_and_a_bad_one_leaves_the_rules() {
    let pod = meshed("a");
    let ns = FakeNs::installed_for(&pod, "plugin-v2");
    let pod = recorded(&pod, &run(&pod, &ns, &settings(Policy::Repair)));

    let changed = with(pod.clone(), PORTS, "8200");
    let outcome = run(&changed, &ns, &settings(Policy::Repair));
    assert_eq!(outcome.repaired, Some(CaptureCause::Annotations));
    assert_eq!(
        outcome.event.as_ref().map(|e| e.reason),
        Some("MeshinitCaptureUpdated")
    );
    assert_eq!(*ns.installed.borrow(), Some(ns.plan(&changed)));
    assert_eq!(outcome.record.annotations, changed.plan_key());
    let changed = recorded(&changed, &outcome);

    let before = ns.installed.borrow().clone();
    let bad = with(changed.clone(), PORTS, "8200,80x");
    let outcome = run(&bad, &ns, &settings(Policy::Repair));
    assert_eq!(outcome.state, State::Invalid);
    assert_eq!(outcome.failed, Some(CaptureFailure::Invalid));
    let event = outcome.event.expect("an Event");
    assert_eq!(event.reason, "MeshinitCaptureInvalid");
    assert!(
        event.message.contains(PORTS) && event.message.contains("80x"),
        "{}",
        event.message
    );
    assert!(
        event.message.contains("left as they are"),
        "{}",
        event.message
    );
    assert_eq!(
        *ns.installed.borrow(),
        before,
        "the running rules are untouched"
    );
    assert!(!ns.calls.borrow().ends_with(&["apply"]));
    // The record keeps what the rules last matched, so that fixing the value is seen as
    // an annotation change.
    assert_eq!(outcome.record.annotations, changed.plan_key());
}

#[test]
fn upgrades_wait_for_the_chart_value_and_go_at_the_per_node_rate() {
    let pods: Vec<PodView> = ["a", "b", "c"].into_iter().map(meshed).collect();
    // Each pod's rules and record were made by the previous meshinit.
    let namespaces: Vec<FakeNs> = pods
        .iter()
        .map(|p| FakeNs::installed_for(p, "plugin-v1"))
        .collect();
    let pods: Vec<PodView> = pods
        .iter()
        .zip(&namespaces)
        .map(|(pod, _)| {
            let record = Record {
                state: State::Captured,
                annotations: pod.plan_key(),
                plugin: "plugin-v1".into(),
            };
            with(pod.clone(), STATE_ANNOTATION, &record.render())
        })
        .collect();
    // The new binary plans differently for the same annotations.
    let upgraded_ns = |ns: &FakeNs| FakeNs {
        installed: RefCell::new(ns.installed.borrow().clone()),
        ..FakeNs::new("plugin-v2")
    };
    let now = Instant::now();

    let off = settings(Policy::Repair);
    let ns = upgraded_ns(&namespaces[0]);
    let outcome = reconcile_pod(&pods[0], &ns, &off, &mut UpgradeBudget::default(), 0, now);
    assert_eq!(outcome.state, State::UpgradePending);
    assert!(outcome
        .event
        .as_ref()
        .is_some_and(|e| e.message.contains("upgrades are not enabled")));
    assert!(!ns.calls.borrow().contains(&"apply"));
    // The record still names the old plugin: the cause stays visible to the next sweep.
    assert_eq!(outcome.record.plugin, "plugin-v1");

    let mut on = settings(Policy::Repair);
    on.upgrade = true;
    let mut budget = UpgradeBudget::default();
    let results: Vec<Outcome> = pods
        .iter()
        .zip(&namespaces)
        .map(|(pod, ns)| reconcile_pod(pod, &upgraded_ns(ns), &on, &mut budget, 0, now))
        .collect();
    assert_eq!(results[0].repaired, Some(CaptureCause::Upgrade));
    assert_eq!(results[1].repaired, Some(CaptureCause::Upgrade));
    assert!(
        results[2].deferred && results[2].repaired.is_none(),
        "{:?}",
        results[2]
    );
    // A minute later the third goes.
    let later = now + Duration::from_secs(61);
    let third = reconcile_pod(
        &pods[2],
        &upgraded_ns(&namespaces[2]),
        &on,
        &mut budget,
        0,
        later,
    );
    assert_eq!(third.repaired, Some(CaptureCause::Upgrade));
}

#[test]
fn an_unreachable_pod_backs_off() {
    let pod = meshed("a");
    let mut ns = FakeNs::new("plugin-v2");
    ns.unreachable = true;
    let outcome = run(&pod, &ns, &settings(Policy::Repair));
    assert_eq!(outcome.state, State::Unreachable);
    assert_eq!(outcome.failed, Some(CaptureFailure::Netns));
    assert_eq!(outcome.retry_after, Some(FIRST_BACKOFF));
    assert_eq!(backoff(2), FIRST_BACKOFF * 2);
    assert_eq!(backoff(40), MAX_BACKOFF);
}

#[test]
fn records_round_trip_and_causes_follow_them() {
    let record = Record {
        state: State::UpgradePending,
        annotations: "00ff".into(),
        plugin: "p1".into(),
    };
    assert_eq!(Record::parse(&record.render()), Some(record.clone()));
    assert_eq!(Record::parse("{\"state\":\"bogus\"}"), None);
    assert_eq!(cause(None, "00ff", "p2"), CaptureCause::Drift);
    assert_eq!(
        cause(Some(&record), "0a0a", "p2"),
        CaptureCause::Annotations
    );
    assert_eq!(cause(Some(&record), "00ff", "p2"), CaptureCause::Upgrade);
    assert_eq!(cause(Some(&record), "00ff", "p1"), CaptureCause::Drift);
    // Writing the record is not an annotation change.
    let pod = meshed("a");
    assert_eq!(
        pod.plan_key(),
        with(pod.clone(), STATE_ANNOTATION, &record.render()).plan_key()
    );
    assert_ne!(pod.plan_key(), with(pod.clone(), PORTS, "1").plan_key());
}

/// Records what the loop reports.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(String, &'static str, String)>>,
    records: Mutex<Vec<(String, Record)>>,
}

impl CaptureReporter for Recorder {
    async fn event(&self, pod: &PodView, event: &EventSpec) -> Result<(), String> {
        self.events
            .lock()
            .unwrap()
            .push((pod.name.clone(), event.reason, event.message.clone()));
        Ok(())
    }
    async fn record(&self, pod: &PodView, record: &Record) -> Result<(), String> {
        self.records
            .lock()
            .unwrap()
            .push((pod.name.clone(), record.clone()));
        Ok(())
    }
}

/// A stream of pod events, `gap` apart, then quiet for `tail` before it ends.
fn timed(events: Vec<PodEvent>, gap: Duration, tail: Duration) -> impl Stream<Item = PodEvent> {
    futures::stream::unfold(
        (events.into_iter(), false),
        move |(mut rest, done)| async move {
            match rest.next() {
                Some(event) => {
                    tokio::time::sleep(gap).await;
                    Some((event, (rest, false)))
                }
                None if !done => {
                    tokio::time::sleep(tail).await;
                    None
                }
                None => None,
            }
        },
    )
}

#[tokio::test(flavor = "current_thread")]
async fn the_loop_checks_on_changes_and_sweeps_without_tight_retries() {
    let s = settings(Policy::Repair);
    let good = meshed("good");
    let lost = meshed("lost");
    let bad = with(meshed("bad"), PORTS, "80x");
    let plain = {
        let mut p = meshed("plain");
        p.annotations.clear();
        p
    };
    let namespaces: HashMap<String, FakeNs> = [
        ("good", FakeNs::installed_for(&good, "plugin-v2")),
        (
            "lost",
            FakeNs {
                unreachable: true,
                ..FakeNs::new("plugin-v2")
            },
        ),
        ("bad", FakeNs::installed_for(&meshed("bad"), "plugin-v2")),
        ("plain", FakeNs::new("plugin-v2")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let checks: RefCell<Vec<String>> = RefCell::new(Vec::new());
    let budget = RefCell::new(UpgradeBudget::default());
    let check = |pod: PodView, failures: u32, now: Instant| {
        checks.borrow_mut().push(pod.name.clone());
        let ns = &namespaces[&pod.name];
        let outcome = reconcile_pod(&pod, ns, &s, &mut budget.borrow_mut(), failures, now);
        async move { outcome }
    };
    // The good pod's rules are flushed between its first check and a later change of the
    // agent's own annotation (which alone must not trigger a check).
    let recorder = Recorder::default();
    let metrics = Metrics::default();
    let events = vec![
        PodEvent::Changed(good.clone()),
        PodEvent::Changed(lost.clone()),
        PodEvent::Changed(bad.clone()),
        PodEvent::Changed(plain.clone()),
    ];
    let flushed = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        *namespaces["good"].installed.borrow_mut() = None;
    };
    let (_, ()) = tokio::join!(
        process(
            timed(events, Duration::from_millis(5), Duration::from_millis(400)),
            &s,
            check,
            &recorder,
            &metrics
        ),
        flushed
    );
    let checks = checks.into_inner();
    let count = |name: &str| checks.iter().filter(|n| *n == name).count();
    assert_eq!(count("plain"), 0, "an un-meshed pod is never checked");
    assert_eq!(
        count("lost"),
        1,
        "an unreachable pod waits its backoff: {checks:?}"
    );
    assert_eq!(
        count("bad"),
        1,
        "a bad value is not retried until it changes: {checks:?}"
    );
    // 20 ms sweeps over about 400 ms.
    assert!(count("good") >= 5, "swept: {checks:?}");
    assert_eq!(
        *namespaces["good"].installed.borrow(),
        Some(namespaces["good"].plan(&good)),
        "the flushed pod was repaired by a sweep"
    );
    assert_eq!(
        *namespaces["bad"].installed.borrow(),
        Some(namespaces["bad"].plan(&meshed("bad"))),
        "the bad value left the rules"
    );
    let events = recorder.events.lock().unwrap().clone();
    let reasons = |name: &str| -> Vec<&'static str> {
        events.iter().filter(|e| e.0 == name).map(|e| e.1).collect()
    };
    assert_eq!(reasons("good"), ["MeshinitCaptureRepaired"]);
    assert_eq!(reasons("lost"), ["MeshinitCaptureUnreachable"]);
    assert_eq!(reasons("bad"), ["MeshinitCaptureInvalid"]);
    let text = metrics.render();
    for line in [
        "meshinit_cni_capture_repaired_total{cause=\"drift\"} 1\n",
        "meshinit_cni_capture_failed_total{reason=\"netns\"} 1\n",
        "meshinit_cni_capture_failed_total{reason=\"invalid\"} 1\n",
        "meshinit_cni_capture_drifted_total 1\n",
        // A sweep checks the pods that are due: not the one backing off, not the bad value.
        "meshinit_cni_capture_sweep_pods 1\n",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    let records = recorder.records.lock().unwrap().clone();
    let last = |name: &str| {
        records
            .iter()
            .rev()
            .find(|r| r.0 == name)
            .map(|r| r.1.state)
    };
    assert_eq!(last("good"), Some(State::Captured));
    assert_eq!(last("lost"), Some(State::Unreachable));
    assert_eq!(last("bad"), Some(State::Invalid));
}
