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
        )
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
