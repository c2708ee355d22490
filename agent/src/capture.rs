//! Running pods stay right: for each meshed CNI-mode pod on this node, on start, on every
//! change to the pod and every `interval`, the agent asks the plugin to CHECK the pod's
//! namespace against the plan its current annotations give, and, by policy, re-applies
//! (ADD) when they differ: after the rules were flushed or edited, after the pod's capture
//! annotations changed (a live update), or, opted in, after an upgraded meshinit plans
//! differently for the same annotations (at a bounded rate). Each result is recorded: an
//! Event on the pod when it drifts, is repaired, has a bad annotation or cannot be
//! reached; the annotation `meshinit.io/capture` with the capture state; the metrics.
//!
//! The decisions are pure functions over the pod, what the plugin answered and what was
//! recorded (`select`, `cause`, `decide`); `reconcile_pod` runs one pod through them
//! against any `PodCapture` (the production one finds the namespace in /proc and runs the
//! plugin); `process` is the loop over a stream of pod events, reporting through any
//! `CaptureReporter`. Tests drive all of it with fakes.

pub mod netns;
pub mod plugin;

use crate::metrics::{CaptureCause, CaptureFailure, Metrics};
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

/// The annotation the agent keeps the pod's capture state in.
pub const STATE_ANNOTATION: &str = "meshinit.io/capture";
/// `"false"` on a pod: the agent never checks or changes it.
pub const OPT_OUT_ANNOTATION: &str = "meshinit.io/reconcile";
const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// What the agent does with what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Check and record; never change a pod.
    Report,
    /// Re-apply when a pod differs from its plan.
    Repair,
}

#[derive(Debug, Clone)]
pub struct CaptureSettings {
    pub node_name: String,
    pub policy: Policy,
    /// How often every pod is checked when nothing changed.
    pub interval: Duration,
    /// Re-apply pods whose rules differ only because this meshinit plans differently.
    pub upgrade: bool,
    /// At most this many such upgrades a minute on this node.
    pub upgrades_per_minute: u32,
    /// Namespaces the agent leaves alone (besides the plugin's own excluded ones).
    pub exclude_namespaces: Vec<String>,
    /// The plugin's settings, as in the node's entry.
    pub plugin: plugin::PluginConf,
    /// Identifies the plugin binary: a record with another one was made by another meshinit.
    pub plugin_id: String,
    /// Check init-container-mode pods too (against istio-init's arguments).
    pub init_container_pods: bool,
    /// Re-apply those too, under `policy: repair` (istio-init's arguments, as it ran them);
    /// otherwise they are reported only.
    pub repair_init_container_pods: bool,
}

/// What the agent reads of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub host_network: bool,
    /// Its sandbox runs and its init containers are done (Running, an address, not
    /// being deleted).
    pub running: bool,
    pub node_name: Option<String>,
    /// Init-container mode: istio-init's arguments (`istio-iptables -p 15001 ...`), and
    /// the values of its environment given literally.
    pub init_args: Option<Vec<String>>,
    pub init_env: BTreeMap<String, String>,
}

impl PodView {
    pub fn of(pod: &Pod) -> Option<PodView> {
        let meta = &pod.metadata;
        let status = pod.status.as_ref();
        let spec = pod.spec.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or_default();
        Some(PodView {
            uid: meta.uid.clone()?,
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            annotations: meta.annotations.clone().unwrap_or_default(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            // Running: a pod still in its init containers is the plugin's ADD's and
            // repair's (one that raced the agent is deleted and recreated).
            running: meta.deletion_timestamp.is_none()
                && status
                    .and_then(|s| s.pod_ip.as_deref())
                    .is_some_and(|ip| !ip.is_empty())
                && phase == "Running",
            node_name: spec.and_then(|s| s.node_name.clone()),
            init_args: istio_init(pod).and_then(|c| c.args.clone()),
            init_env: istio_init(pod)
                .and_then(|c| c.env.as_ref())
                .map(|env| {
                    env.iter()
                        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// An init-container-mode pod whose istio-init arguments the agent can plan from.
    pub fn init_mode(&self) -> bool {
        init_container_mode(self) && self.init_args.is_some()
    }

    /// The annotations as the plan reads them: all but the agent's own record, so that
    /// writing the record is not a change to act on.
    pub fn plan_key(&self) -> String {
        let mut hash = Fnv::default();
        for (k, v) in self
            .annotations
            .iter()
            .filter(|(k, _)| *k != STATE_ANNOTATION)
        {
            hash.write(k.as_bytes());
            hash.write(&[0]);
            hash.write(v.as_bytes());
            hash.write(&[0]);
        }
        hash.hex()
    }

    pub fn record(&self) -> Option<Record> {
        Record::parse(self.annotations.get(STATE_ANNOTATION)?)
    }
}

fn istio_init(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .as_ref()?
        .iter()
        .find(|c| c.name == "istio-init")
}

/// FNV-1a, 64 bits: a stable fingerprint (std's hasher may change between releases, and a
/// record outlives the agent that wrote it).
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    pub fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Whether the agent looks at a pod at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Check,
    Skip(String),
}

/// Only meshed CNI-mode pods of this node that run in a namespace of their own, selected
/// as the plugin selects them (the library's `skip_reason`), and not opted out.
pub fn select(pod: &PodView, settings: &CaptureSettings) -> Scope {
    let skip = |reason: String| Scope::Skip(reason);
    if pod.node_name.as_deref() != Some(settings.node_name.as_str()) {
        return skip("on another node".into());
    }
    if pod.host_network {
        return skip("on the node's network".into());
    }
    if pod.annotations.get(OPT_OUT_ANNOTATION).map(String::as_str) == Some("false") {
        return skip(format!("opted out ({OPT_OUT_ANNOTATION}: \"false\")"));
    }
    if settings.exclude_namespaces.contains(&pod.namespace) {
        return skip(format!("namespace {} is excluded", pod.namespace));
    }
    let conf = meshinit::cni::NetConf {
        cni_version: "1.0.0".into(),
        prev_result: None,
        exclude_namespaces: settings.plugin.exclude_namespaces.clone(),
        annotations: Some(pod.annotations.clone()),
        proxy_env: settings.plugin.proxy_env.clone(),
        args: BTreeMap::new(),
    };
    if init_container_mode(pod) {
        // istio-init's arguments are its plan; the plugin's selection is not its.
        if !settings.init_container_pods {
            return skip(
                "init-container mode (istio-init): capture.initContainerPods is off".into(),
            );
        }
        if pod.init_args.is_none() {
            return skip(
                "init-container mode, but istio-init has no arguments to plan from".into(),
            );
        }
        let inject = pod.annotations.get("sidecar.istio.io/inject");
        if inject.is_some_and(|v| meshinit::config::parse::parse_bool(v) == Ok(false)) {
            return skip("sidecar.istio.io/inject is false".into());
        }
    } else if let Some(reason) =
        meshinit::cni::skip_reason(&conf, Some(&(pod.namespace.clone(), pod.name.clone())))
    {
        return skip(reason);
    }
    if !pod.running {
        return skip("not running yet".into());
    }
    Scope::Check
}

fn init_container_mode(pod: &PodView) -> bool {
    pod.annotations
        .get(STATUS_ANNOTATION)
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .and_then(|s| s.get("initContainers").cloned())
        .and_then(|l| l.as_array().cloned())
        .is_some_and(|l| l.iter().any(|c| c.as_str() == Some("istio-init")))
}

/// What the plugin answered, or why it could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    Clean,
    /// CHECK's differences.
    Drifted(String),
    /// A bad value: the details name the annotation and the value.
    Invalid(String),
    /// The pod's namespace could not be found or entered.
    Unreachable(String),
    Failed(String),
}

/// The capture state recorded on the pod (`meshinit.io/capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Captured,
    Drifted,
    Invalid,
    Unreachable,
    Failed,
    /// Rules an older meshinit planned; left until upgrades are allowed.
    UpgradePending,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Captured => "captured",
            State::Drifted => "drifted",
            State::Invalid => "invalid",
            State::Unreachable => "unreachable",
            State::Failed => "failed",
            State::UpgradePending => "upgrade-pending",
        }
    }
    fn parse(text: &str) -> Option<State> {
        [
            State::Captured,
            State::Drifted,
            State::Invalid,
            State::Unreachable,
            State::Failed,
            State::UpgradePending,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// The record: the state, and what the pod's rules were last found matching: the plan of
/// which annotations (`plan_key`), by which plugin binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub state: State,
    pub annotations: String,
    pub plugin: String,
}

impl Record {
    pub fn render(&self) -> String {
        serde_json::json!({
            "state": self.state.as_str(),
            "annotations": self.annotations,
            "plugin": self.plugin,
        })
        .to_string()
    }
    pub fn parse(text: &str) -> Option<Record> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        Some(Record {
            state: State::parse(v.get("state")?.as_str()?)?,
            annotations: v.get("annotations")?.as_str()?.to_owned(),
            plugin: v.get("plugin")?.as_str()?.to_owned(),
        })
    }
}

/// Why a pod's rules differ from its plan, from what was recorded when they last matched.
pub fn cause(record: Option<&Record>, plan_key: &str, plugin_id: &str) -> CaptureCause {
    match record {
        Some(r) if r.annotations != plan_key => CaptureCause::Annotations,
        Some(r) if r.plugin != plugin_id && r.state != State::Drifted => CaptureCause::Upgrade,
        _ => CaptureCause::Drift,
    }
}

/// What to do about a pod that differs from its plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Apply(CaptureCause),
    Report(CaptureCause),
    /// An upgrade, over this minute's allowance: the next sweep tries again.
    Defer,
}

pub fn decide(
    cause: CaptureCause,
    settings: &CaptureSettings,
    upgrade_allowed: bool,
    init_mode: bool,
) -> Verdict {
    match (settings.policy, cause) {
        // Init-container-mode pods are checked and reported, changed only when opted in:
        // their rules are istio-init's, which the pod's owner may expect to stay as it left them.
        _ if init_mode && !settings.repair_init_container_pods => Verdict::Report(cause),
        (Policy::Report, _) => Verdict::Report(cause),
        (Policy::Repair, CaptureCause::Upgrade) if !settings.upgrade => Verdict::Report(cause),
        (Policy::Repair, CaptureCause::Upgrade) if !upgrade_allowed => Verdict::Defer,
        (Policy::Repair, _) => Verdict::Apply(cause),
    }
}

/// Checks and changes a pod's namespace (production: `ProcCapture`).
pub trait PodCapture {
    fn check(&self, pod: &PodView) -> Checked;
    fn apply(&self, pod: &PodView) -> Checked;
}

/// Upgrades done in the last minute, for the per-node rate.
#[derive(Debug, Default)]
pub struct UpgradeBudget {
    done: VecDeque<Instant>,
}

impl UpgradeBudget {
    pub fn allowed(&mut self, now: Instant, per_minute: u32) -> bool {
        while self
            .done
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.done.pop_front();
        }
        self.done.len() < per_minute as usize
    }
    pub fn spend(&mut self, now: Instant) {
        self.done.push_back(now);
    }
}

/// An Event to record on the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSpec {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// One pod's check: what to record, what to count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub state: State,
    pub record: Record,
    pub event: Option<EventSpec>,
    pub drifted: bool,
    pub repaired: Option<CaptureCause>,
    pub failed: Option<CaptureFailure>,
    /// Try this pod again no sooner than this (a pod that cannot be reached, a failure).
    pub retry_after: Option<Duration>,
    pub deferred: bool,
}

/// The first wait after a failure; doubled each time, up to `MAX_BACKOFF`.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Runs one pod through check, decision and (by policy) repair.
pub fn reconcile_pod(
    pod: &PodView,
    capture: &impl PodCapture,
    settings: &CaptureSettings,
    budget: &mut UpgradeBudget,
    failures: u32,
    now: Instant,
) -> Outcome {
    let key = pod.plan_key();
    let previous = pod.record();
    let record = |state: State, matched: bool| Record {
        state,
        // Only rules found matching the plan move the record to these annotations and
        // this plugin; otherwise the cause of the difference must stay visible next time.
        annotations: if matched {
            key.clone()
        } else {
            previous
                .as_ref()
                .map_or_else(String::new, |r| r.annotations.clone())
        },
        plugin: if matched {
            settings.plugin_id.clone()
        } else {
            previous
                .as_ref()
                .map_or_else(String::new, |r| r.plugin.clone())
        },
    };
    let mut outcome = Outcome {
        state: State::Captured,
        record: record(State::Captured, true),
        event: None,
        drifted: false,
        repaired: None,
        failed: None,
        retry_after: None,
        deferred: false,
    };
    // A failure to reach or run on the pod is retried after a backoff; a bad value is
    // not retried until the annotations change (the loop sees to that).
    let retry = Some(backoff(failures + 1));
    let fail = |mut outcome: Outcome,
                state: State,
                why: CaptureFailure,
                reason: &'static str,
                message: String| {
        outcome.state = state;
        outcome.record = record(state, false);
        outcome.failed = Some(why);
        outcome.retry_after = (why != CaptureFailure::Invalid).then_some(retry).flatten();
        outcome.event = Some(EventSpec {
            warning: true,
            reason,
            message,
        });
        outcome
    };
    let details = match capture.check(pod) {
        Checked::Clean => return outcome,
        Checked::Drifted(details) => details,
        Checked::Invalid(details) => {
            return fail(
                outcome,
                State::Invalid,
                CaptureFailure::Invalid,
                "MeshinitCaptureInvalid",
                format!("{details}; the running capture rules are left as they are"),
            )
        }
        Checked::Unreachable(why) => {
            return fail(
                outcome,
                State::Unreachable,
                CaptureFailure::Netns,
                "MeshinitCaptureUnreachable",
                format!("cannot check the pod's capture rules: {why}"),
            )
        }
        Checked::Failed(why) => {
            return fail(
                outcome,
                State::Failed,
                CaptureFailure::Plugin,
                "MeshinitCaptureCheckFailed",
                format!("checking the pod's capture rules failed: {why}"),
            )
        }
    };
    outcome.drifted = true;
    let cause = cause(previous.as_ref(), &key, &settings.plugin_id);
    let allowed = budget.allowed(now, settings.upgrades_per_minute);
    match decide(cause, settings, allowed, pod.init_mode()) {
        Verdict::Report(cause) => {
            let state = if cause == CaptureCause::Upgrade {
                State::UpgradePending
            } else {
                State::Drifted
            };
            outcome.state = state;
            outcome.record = record(state, false);
            outcome.event = Some(EventSpec {
                warning: true,
                reason: "MeshinitCaptureDrifted",
                message: format!(
                    "capture rules differ from the plan ({}): {details}; not re-applied ({})",
                    cause.as_str(),
                    match (settings.policy, cause) {
                        _ if pod.init_mode() && !settings.repair_init_container_pods => {
                            "init-container mode: reported only (capture.repairInitContainerPods is off)"
                        }
                        (Policy::Report, _) => "policy: report",
                        _ => "upgrades are not enabled",
                    }
                ),
            });
            outcome
        }
        Verdict::Defer => {
            outcome.state = State::UpgradePending;
            outcome.record = record(State::UpgradePending, false);
            outcome.deferred = true;
            outcome
        }
        Verdict::Apply(cause) => {
            if cause == CaptureCause::Upgrade {
                budget.spend(now);
            }
            let applied = capture.apply(pod);
            // Re-applied is not enough: the pod must now match the plan.
            let after = if applied == Checked::Clean {
                capture.check(pod)
            } else {
                applied
            };
            match after {
                Checked::Clean => {
                    outcome.repaired = Some(cause);
                    outcome.event = Some(EventSpec {
                        warning: false,
                        reason: cause.event_reason(),
                        message: format!(
                            "capture rules differed from the plan ({}): {details}; re-applied, and they match it now",
                            cause.as_str()
                        ),
                    });
                    outcome
                }
                Checked::Invalid(details) => fail(
                    outcome,
                    State::Invalid,
                    CaptureFailure::Invalid,
                    "MeshinitCaptureInvalid",
                    format!("{details}; the running capture rules are left as they are"),
                ),
                other => {
                    let why = match other {
                        Checked::Drifted(d) => format!("still differs after re-applying: {d}"),
                        Checked::Unreachable(w) | Checked::Failed(w) => w,
                        Checked::Clean | Checked::Invalid(_) => String::new(),
                    };
                    fail(
                        outcome,
                        State::Failed,
                        CaptureFailure::Repair,
                        "MeshinitCaptureRepairFailed",
                        format!("capture rules differ from the plan ({details}); re-applying failed: {why}"),
                    )
                }
            }
        }
    }
}

/// Records results on pods (production: through the API server).
pub trait CaptureReporter {
    fn event(
        &self,
        pod: &PodView,
        event: &EventSpec,
    ) -> impl Future<Output = Result<(), String>> + Send;
    fn record(
        &self,
        pod: &PodView,
        record: &Record,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// A pod event from the watch.
#[derive(Debug, Clone)]
pub enum PodEvent {
    Changed(PodView),
    Deleted(String),
}

#[derive(Debug)]
struct Known {
    pod: PodView,
    key: String,
    failures: u32,
    not_before: Option<Instant>,
    last_event: Option<(&'static str, String)>,
    /// A bad annotation is not retried until the annotations change.
    invalid_key: Option<String>,
}

/// The loop: every pod event and every `interval`, the pods that need a check go through
/// `reconcile_pod`, one at a time (`run` puts each on a blocking thread in production).
pub async fn process<S, R, F, Fut>(
    events: S,
    settings: &CaptureSettings,
    mut check: F,
    reporter: &R,
    metrics: &Metrics,
) where
    S: Stream<Item = PodEvent>,
    R: CaptureReporter,
    F: FnMut(PodView, u32, Instant) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let events = events.fuse();
    futures::pin_mut!(events);
    let mut known: HashMap<String, Known> = HashMap::new();
    let mut queue: VecDeque<String> = VecDeque::new();
    let mut sweep = tokio::time::interval(settings.interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The sweep under way: when it began, the CPU time then, the pods it checked so far.
    let mut sweep_started: Option<(Instant, f64, usize)> = None;
    let mut ended = false;
    loop {
        // Events first, without waiting: a change goes ahead of the sweep's queue.
        while let Some(Some(event)) = events.next().now_or_never() {
            on_event(event, settings, &mut known, &mut queue);
        }
        if let Some(uid) = queue.pop_front() {
            let due = known.get(&uid).filter(|entry| {
                entry.not_before.is_none_or(|t| Instant::now() >= t)
                    && entry.invalid_key.as_deref() != Some(entry.key.as_str())
            });
            if let Some(entry) = due {
                let started = Instant::now();
                let outcome = check(entry.pod.clone(), entry.failures, started).await;
                metrics.observe_check(started.elapsed());
                report(&uid, outcome, &mut known, reporter, metrics).await;
                if let Some(sweep) = sweep_started.as_mut() {
                    sweep.2 += 1;
                }
            }
            if queue.is_empty() {
                if let Some((wall, cpu, checked)) = sweep_started.take() {
                    metrics.set_sweep(wall.elapsed(), cpu_seconds() - cpu, checked);
                }
            }
            continue;
        }
        if ended {
            return;
        }
        tokio::select! {
            event = events.next() => match event {
                Some(event) => on_event(event, settings, &mut known, &mut queue),
                // Tests end the stream; the production watch does not end.
                None => ended = true,
            },
            // A sweep still going covers every pod: sweeps never overlap, so a node whose
            // sweep takes longer than the interval is swept back to back, not faster.
            _ = sweep.tick(), if sweep_started.is_none() => {
                for uid in known.keys() {
                    if !queue.contains(uid) {
                        queue.push_back(uid.clone());
                    }
                }
                if !queue.is_empty() {
                    sweep_started = Some((Instant::now(), cpu_seconds(), 0));
                }
            }
        }
    }
}

fn on_event(
    event: PodEvent,
    settings: &CaptureSettings,
    known: &mut HashMap<String, Known>,
    queue: &mut VecDeque<String>,
) {
    let pod = match event {
        PodEvent::Deleted(uid) => {
            known.remove(&uid);
            return;
        }
        PodEvent::Changed(pod) => pod,
    };
    if let Scope::Skip(reason) = select(&pod, settings) {
        if known.remove(&pod.uid).is_some() {
            tracing::debug!(namespace = %pod.namespace, pod = %pod.name, %reason, "no longer checked");
        }
        return;
    }
    let key = pod.plan_key();
    let uid = pod.uid.clone();
    let changed = match known.get_mut(&uid) {
        Some(entry) => {
            let changed = entry.key != key;
            entry.pod = pod;
            if changed {
                entry.key = key;
                // New annotations: a bad value may be fixed, a failure may not recur.
                entry.not_before = None;
                entry.failures = 0;
            }
            changed
        }
        None => {
            known.insert(
                uid.clone(),
                Known {
                    pod,
                    key,
                    failures: 0,
                    not_before: None,
                    last_event: None,
                    invalid_key: None,
                },
            );
            true
        }
    };
    if changed && !queue.contains(&uid) {
        queue.push_front(uid);
    }
}

async fn report<R: CaptureReporter>(
    uid: &str,
    outcome: Outcome,
    known: &mut HashMap<String, Known>,
    reporter: &R,
    metrics: &Metrics,
) {
    let Some(entry) = known.get_mut(uid) else {
        return;
    };
    metrics.count_check(&outcome);
    let pod = entry.pod.clone();
    entry.failures = if outcome.retry_after.is_some() {
        entry.failures + 1
    } else {
        0
    };
    entry.not_before = outcome.retry_after.map(|d| Instant::now() + d);
    entry.invalid_key = (outcome.state == State::Invalid).then(|| entry.key.clone());
    if let Some(event) = &outcome.event {
        // An Event when something new happens, not on every sweep of a pod in the same state.
        let this = (event.reason, event.message.clone());
        if outcome.repaired.is_some() || entry.last_event.as_ref() != Some(&this) {
            tracing::info!(namespace = %pod.namespace, pod = %pod.name, reason = event.reason, message = %event.message, "capture");
            if let Err(err) = reporter.event(&pod, event).await {
                tracing::warn!(%err, "recording a capture Event");
            }
            entry.last_event = Some(this);
        }
    } else if outcome.state == State::Captured {
        entry.last_event = None;
    }
    if pod.record().as_ref() != Some(&outcome.record) {
        match reporter.record(&pod, &outcome.record).await {
            Ok(()) => {
                // The watch brings the pod back with it; until then, this is what it holds.
                if let Some(entry) = known.get_mut(uid) {
                    entry
                        .pod
                        .annotations
                        .insert(STATE_ANNOTATION.into(), outcome.record.render());
                }
            }
            Err(err) => tracing::warn!(%err, "recording the capture state"),
        }
    }
}

/// This process's CPU time and its children's (the plugin runs), in seconds.
pub fn cpu_seconds() -> f64 {
    let usage = |who| {
        nix::sys::resource::getrusage(who).map_or(0.0, |u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
    };
    usage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        + usage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
}

/// A `PodCapture` that cannot run (the check's thread panicked): reported as a failure,
/// retried after the backoff.
pub struct Unavailable(pub String);

impl PodCapture for Unavailable {
    fn check(&self, _: &PodView) -> Checked {
        Checked::Failed(self.0.clone())
    }
    fn apply(&self, _: &PodView) -> Checked {
        Checked::Failed(self.0.clone())
    }
}

/// The production `PodCapture`: the namespace from /proc, the plugin run on it.
#[derive(Debug)]
pub struct ProcCapture {
    pub processes: netns::PodProcesses,
    pub plugin: plugin::PluginRunner,
}

impl ProcCapture {
    fn run(&self, command: plugin::CniCommand, pod: &PodView) -> Checked {
        match self.processes.open(&pod.uid) {
            Ok(netns) => self.plugin.run(command, pod, &netns),
            Err(err) => Checked::Unreachable(err.to_string()),
        }
    }
}

impl PodCapture for ProcCapture {
    fn check(&self, pod: &PodView) -> Checked {
        if pod.init_mode() {
            // meshinit itself validates istio-init's arguments (a bad one: exit 1).
            return match self.processes.open(&pod.uid) {
                Ok(netns) => self.plugin.check_init(pod, &netns),
                Err(err) => Checked::Unreachable(err.to_string()),
            };
        }
        // A bad value is found before the pod is touched at all (the plugin would refuse
        // it too, after entering the namespace).
        if let Err(err) = validate(pod, &self.plugin.conf) {
            return err;
        }
        self.run(plugin::CniCommand::Check, pod)
    }
    fn apply(&self, pod: &PodView) -> Checked {
        if pod.init_mode() {
            return match self.processes.open(&pod.uid) {
                Ok(netns) => self.plugin.apply_init(pod, &netns),
                Err(err) => Checked::Unreachable(err.to_string()),
            };
        }
        if let Err(err) = validate(pod, &self.plugin.conf) {
            return err;
        }
        self.run(plugin::CniCommand::Add, pod)
    }
}

/// The pod's settings validated by the library, as the plugin validates them.
pub fn validate(pod: &PodView, conf: &plugin::PluginConf) -> Result<(), Checked> {
    let netconf = meshinit::cni::NetConf {
        cni_version: "1.0.0".into(),
        prev_result: None,
        exclude_namespaces: conf.exclude_namespaces.clone(),
        annotations: Some(pod.annotations.clone()),
        proxy_env: conf.proxy_env.clone(),
        args: BTreeMap::new(),
    };
    // The plugin's environment is the runtime's CNI_* variables; nothing else of it
    // changes the pod's settings.
    let env = |_: &str| None;
    meshinit::cni::validate_pod_settings(&netconf, &env).map_err(|err| {
        if err.code == meshinit::cni::code::INVALID_CONFIG {
            Checked::Invalid(err.details)
        } else {
            Checked::Failed(format!("{}: {}", err.msg, err.details))
        }
    })
}

/// Fingerprint of the plugin binary: a record made with another binary was made by
/// another meshinit, which may plan differently.
pub fn plugin_id(binary: &std::path::Path) -> String {
    let mut hash = Fnv::default();
    match std::fs::read(binary) {
        Ok(bytes) => hash.write(&bytes),
        Err(_) => hash.write(binary.as_os_str().as_encoded_bytes()),
    }
    hash.hex()
}

#[cfg(test)]
mod tests;

/// `CaptureReporter` through the API server: Events, and the record as a merge patch of
/// the pod's annotation (the ClusterRole's `patch pods`).
pub struct KubeReporter {
    pub client: kube::Client,
    pub node_name: String,
}

impl CaptureReporter for KubeReporter {
    async fn event(&self, pod: &PodView, event: &EventSpec) -> Result<(), String> {
        let made = crate::repair::pod_event(
            crate::repair::PodRef {
                namespace: Some(&pod.namespace),
                name: Some(&pod.name),
                uid: Some(&pod.uid),
            },
            event.reason,
            &event.message,
            event.warning,
            &self.node_name,
        );
        kube::Api::<k8s_openapi::api::core::v1::Event>::namespaced(
            self.client.clone(),
            &pod.namespace,
        )
        .create(&Default::default(), &made)
        .await
        .map(|_| ())
        .map_err(|err| format!("Event on pod {}/{}: {err}", pod.namespace, pod.name))
    }

    async fn record(&self, pod: &PodView, record: &Record) -> Result<(), String> {
        let patch =
            serde_json::json!({"metadata": {"annotations": {STATE_ANNOTATION: record.render()}}});
        kube::Api::<Pod>::namespaced(self.client.clone(), &pod.namespace)
            .patch(
                &pod.name,
                &Default::default(),
                &kube::api::Patch::Merge(patch),
            )
            .await
            .map(|_| ())
            .map_err(|err| format!("annotating pod {}/{}: {err}", pod.namespace, pod.name))
    }
}
