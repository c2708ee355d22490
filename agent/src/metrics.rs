//! What the agent reports on its port: readiness for the kubelet's probe and counters in
//! Prometheus' text format. Hand-written: a handful of counters need no metrics crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    repaired_deleted: AtomicU64,
    repaired_labeled: AtomicU64,
    repair_errors: AtomicU64,
    entry_writes: AtomicU64,
    install_errors: AtomicU64,
    /// `Ok` when the plugin and entry are in place, else why not (served by /readyz).
    readiness: Mutex<Option<Result<(), String>>>,
    capture: Mutex<CaptureMetrics>,
}

/// Why a running pod's rules differed from its plan; the `cause` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureCause {
    /// Rules changed inside the pod (flushed, edited) or never matched.
    Drift,
    /// The pod's capture annotations changed since its rules last matched.
    Annotations,
    /// The same annotations, planned differently by this meshinit.
    Upgrade,
}

impl CaptureCause {
    pub const ALL: [CaptureCause; 3] = [
        CaptureCause::Drift,
        CaptureCause::Annotations,
        CaptureCause::Upgrade,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureCause::Drift => "drift",
            CaptureCause::Annotations => "annotations",
            CaptureCause::Upgrade => "upgrade",
        }
    }
    /// The reason of the Event a re-apply records.
    pub fn event_reason(self) -> &'static str {
        match self {
            CaptureCause::Drift => "MeshinitCaptureRepaired",
            CaptureCause::Annotations => "MeshinitCaptureUpdated",
            CaptureCause::Upgrade => "MeshinitCaptureUpgraded",
        }
    }
}

/// Why a pod's check or repair failed; the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureFailure {
    /// Its network namespace could not be found or opened.
    Netns,
    /// A bad annotation value.
    Invalid,
    /// The plugin failed to check.
    Plugin,
    /// Re-applying failed, or left the pod differing from its plan.
    Repair,
}

impl CaptureFailure {
    pub const ALL: [CaptureFailure; 4] = [
        CaptureFailure::Netns,
        CaptureFailure::Invalid,
        CaptureFailure::Plugin,
        CaptureFailure::Repair,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureFailure::Netns => "netns",
            CaptureFailure::Invalid => "invalid",
            CaptureFailure::Plugin => "plugin",
            CaptureFailure::Repair => "repair",
        }
    }
}

/// Upper bounds of the check-duration histogram, in seconds.
const CHECK_BUCKETS: [f64; 8] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default)]
struct CaptureMetrics {
    checked: u64,
    drifted: u64,
    repaired: [u64; 3],
    failed: [u64; 4],
    deferred: u64,
    check_buckets: [u64; 8],
    check_count: u64,
    check_sum: f64,
    sweep_seconds: f64,
    sweep_cpu_seconds: f64,
    sweep_pods: usize,
}

/// What the repair controller did to a pod; the `action` label of its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairAction {
    Delete,
    Label,
}

impl RepairAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairAction::Delete => "delete",
            RepairAction::Label => "label",
        }
    }
}

impl Metrics {
    pub fn count_repair(&self, action: RepairAction) {
        match action {
            RepairAction::Delete => &self.repaired_deleted,
            RepairAction::Label => &self.repaired_labeled,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_repair_error(&self) {
        self.repair_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_entry_write(&self) {
        self.entry_writes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_install_error(&self) {
        self.install_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_readiness(&self, readiness: Result<(), String>) {
        if let Ok(mut slot) = self.readiness.lock() {
            *slot = Some(readiness);
        }
    }

    /// `Ok` only after a check found everything in place.
    pub fn readiness(&self) -> Result<(), String> {
        match self.readiness.lock() {
            Ok(slot) => slot
                .clone()
                .unwrap_or_else(|| Err("not checked yet".into())),
            Err(_) => Err("readiness state poisoned".into()),
        }
    }

    /// One pod's check, and what came of it.
    pub fn count_check(&self, outcome: &crate::capture::Outcome) {
        let Ok(mut m) = self.capture.lock() else {
            return;
        };
        m.checked += 1;
        m.drifted += u64::from(outcome.drifted);
        m.deferred += u64::from(outcome.deferred);
        if let Some(cause) = outcome.repaired {
            if let Some(i) = CaptureCause::ALL.iter().position(|c| *c == cause) {
                m.repaired[i] += 1;
            }
        }
        if let Some(why) = outcome.failed {
            if let Some(i) = CaptureFailure::ALL.iter().position(|c| *c == why) {
                m.failed[i] += 1;
            }
        }
    }

    pub fn observe_check(&self, took: std::time::Duration) {
        let Ok(mut m) = self.capture.lock() else {
            return;
        };
        let seconds = took.as_secs_f64();
        m.check_count += 1;
        m.check_sum += seconds;
        for (i, bound) in CHECK_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                m.check_buckets[i] += 1;
            }
        }
    }

    /// The last sweep over every checked pod: wall time, CPU time (the agent's and the
    /// plugin runs'), pods.
    pub fn set_sweep(&self, wall: std::time::Duration, cpu_seconds: f64, pods: usize) {
        let Ok(mut m) = self.capture.lock() else {
            return;
        };
        m.sweep_seconds = wall.as_secs_f64();
        m.sweep_cpu_seconds = cpu_seconds;
        m.sweep_pods = pods;
    }

    fn render_capture(&self) -> String {
        let Ok(m) = self.capture.lock() else {
            return String::new();
        };
        let mut out = format!(
            "# HELP meshinit_cni_capture_checks_total Running pods' capture checked against their plan.\n\
             # TYPE meshinit_cni_capture_checks_total counter\n\
             meshinit_cni_capture_checks_total {}\n\
             # HELP meshinit_cni_capture_drifted_total Checks that found a pod's capture differing from its plan.\n\
             # TYPE meshinit_cni_capture_drifted_total counter\n\
             meshinit_cni_capture_drifted_total {}\n\
             # HELP meshinit_cni_capture_deferred_total Upgrades put off by the per-node rate.\n\
             # TYPE meshinit_cni_capture_deferred_total counter\n\
             meshinit_cni_capture_deferred_total {}\n\
             # HELP meshinit_cni_capture_repaired_total Pods re-applied and found matching their plan, by why they differed.\n\
             # TYPE meshinit_cni_capture_repaired_total counter\n",
            m.checked, m.drifted, m.deferred
        );
        for (cause, n) in CaptureCause::ALL.iter().zip(m.repaired) {
            out.push_str(&format!(
                "meshinit_cni_capture_repaired_total{{cause=\"{}\"}} {n}\n",
                cause.as_str()
            ));
        }
        out.push_str(
            "# HELP meshinit_cni_capture_failed_total Checks or repairs that failed, by reason.\n\
             # TYPE meshinit_cni_capture_failed_total counter\n",
        );
        for (why, n) in CaptureFailure::ALL.iter().zip(m.failed) {
            out.push_str(&format!(
                "meshinit_cni_capture_failed_total{{reason=\"{}\"}} {n}\n",
                why.as_str()
            ));
        }
        out.push_str(
            "# HELP meshinit_cni_capture_check_seconds Time to check one pod (and repair it, when it is).\n\
             # TYPE meshinit_cni_capture_check_seconds histogram\n",
        );
        for (bound, n) in CHECK_BUCKETS.iter().zip(m.check_buckets) {
            out.push_str(&format!(
                "meshinit_cni_capture_check_seconds_bucket{{le=\"{bound}\"}} {n}\n"
            ));
        }
        out.push_str(&format!(
            "meshinit_cni_capture_check_seconds_bucket{{le=\"+Inf\"}} {c}\n\
             meshinit_cni_capture_check_seconds_sum {:.6}\n\
             meshinit_cni_capture_check_seconds_count {c}\n\
             # HELP meshinit_cni_capture_sweep_seconds Wall time of the last sweep over every checked pod.\n\
             # TYPE meshinit_cni_capture_sweep_seconds gauge\n\
             meshinit_cni_capture_sweep_seconds {:.6}\n\
             # HELP meshinit_cni_capture_sweep_cpu_seconds CPU time of the last sweep (the agent and the plugin runs).\n\
             # TYPE meshinit_cni_capture_sweep_cpu_seconds gauge\n\
             meshinit_cni_capture_sweep_cpu_seconds {:.6}\n\
             # HELP meshinit_cni_capture_sweep_pods Pods the last sweep checked.\n\
             # TYPE meshinit_cni_capture_sweep_pods gauge\n\
             meshinit_cni_capture_sweep_pods {}\n",
            m.check_sum,
            m.sweep_seconds,
            m.sweep_cpu_seconds,
            m.sweep_pods,
            c = m.check_count,
        ));
        out
    }

    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let ready = u8::from(self.readiness().is_ok());
        format!(
            "# HELP meshinit_cni_repair_pods_total Pods that raced the agent (validation exit 126), by what was done to them.\n\
             # TYPE meshinit_cni_repair_pods_total counter\n\
             meshinit_cni_repair_pods_total{{action=\"delete\"}} {}\n\
             meshinit_cni_repair_pods_total{{action=\"label\"}} {}\n\
             # HELP meshinit_cni_repair_errors_total Repair actions the API server refused.\n\
             # TYPE meshinit_cni_repair_errors_total counter\n\
             meshinit_cni_repair_errors_total {}\n\
             # HELP meshinit_cni_config_writes_total Times the agent wrote its entry into the CNI configuration.\n\
             # TYPE meshinit_cni_config_writes_total counter\n\
             meshinit_cni_config_writes_total {}\n\
             # HELP meshinit_cni_install_errors_total Failed attempts to put the plugin or its entry in place.\n\
             # TYPE meshinit_cni_install_errors_total counter\n\
             meshinit_cni_install_errors_total {}\n\
             # HELP meshinit_cni_ready Whether the plugin and its entry are in place.\n\
             # TYPE meshinit_cni_ready gauge\n\
             meshinit_cni_ready {ready}\n",
            get(&self.repaired_deleted),
            get(&self.repaired_labeled),
            get(&self.repair_errors),
            get(&self.entry_writes),
            get(&self.install_errors),
        ) + &self.render_capture()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_readiness_show_in_the_text_format() {
        let m = Metrics::default();
        assert!(m.readiness().is_err(), "not ready before the first check");
        m.count_repair(RepairAction::Delete);
        m.count_repair(RepairAction::Delete);
        m.count_repair(RepairAction::Label);
        m.set_readiness(Ok(()));
        let text = m.render();
        assert!(
            text.contains("meshinit_cni_repair_pods_total{action=\"delete\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("meshinit_cni_repair_pods_total{action=\"label\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("meshinit_cni_ready 1\n"), "{text}");
        m.set_readiness(Err("gone".into()));
        assert!(m.render().contains("meshinit_cni_ready 0\n"));
    }
}
