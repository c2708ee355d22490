//! The agent's main loop: put the plugin and entry in place, keep them there (on every
//! change inotify reports, and every few seconds in case one was missed), serve readiness
//! and metrics, run repair, and on SIGTERM remove everything it installed.

use crate::capture::{self, CaptureSettings, PodEvent, PodView};
use crate::error::{AgentError, RepairError};
use crate::install::{Ensured, Installer};
use crate::metrics::Metrics;
use crate::repair::{self, KubeActions, RepairSettings};
use crate::settings::Settings;
use crate::{http, watch};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// How often the entry is checked when nothing was reported: a safety net for a missed
/// event, not the way changes are normally noticed.
const RESYNC: Duration = Duration::from_secs(5);

/// How long after a change the directory is read: a writer that is not atomic (truncate,
/// then write) is finished by then, and the entry is still back well within a second.
const SETTLE: Duration = Duration::from_millis(100);

/// A plugin run on a pod that takes longer is killed and reported (meshinit's own lock wait
/// is 30 s by default).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(settings: Settings) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::default());
    let listener = http::bind(&settings.metrics_addr).await?;
    tokio::spawn(http::serve(listener, metrics.clone()));
    let installer = Installer::new(settings.install.clone());
    let (changed_tx, mut changed) = tokio::sync::mpsc::unbounded_channel();
    watch::spawn(&settings.install.cni_conf_dir, changed_tx)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Runtime)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Runtime)?;

    let client = if settings.repair.is_some() || settings.capture.is_some() {
        Some(
            kube::Client::try_default()
                .await
                .map_err(|err| RepairError::Client(Box::new(err)))?,
        )
    } else {
        None
    };
    let mut repair_task = match (settings.repair.clone(), client.clone()) {
        (Some(repair), Some(client)) => {
            let metrics = metrics.clone();
            Some(tokio::spawn(async move {
                run_repair(client, repair, &metrics).await;
            }))
        }
        _ => None,
    };
    let mut capture_task = match (settings.capture.clone(), client) {
        (Some(capture), Some(client)) => {
            let metrics = metrics.clone();
            let binary = settings.install.plugin_source.clone();
            let proc_root = settings.proc_root.clone();
            Some(tokio::spawn(async move {
                run_capture(client, capture, binary, proc_root, metrics).await;
            }))
        }
        _ => None,
    };
    tracing::info!(
        bin_dir = %settings.install.cni_bin_dir.display(),
        conf_dir = %settings.install.cni_conf_dir.display(),
        chained = settings.install.chained,
        repair = settings.repair.is_some(),
        capture = settings.capture.as_ref().map(|c| match c.policy { capture::Policy::Report => "report", capture::Policy::Repair => "repair" }),
        "meshinit-cni-agent started"
    );

    let mut last_problem = None;
    loop {
        reconcile(&installer, &metrics, &mut last_problem);
        tokio::select! {
            Some(()) = changed.recv() => {
                // A rewrite comes as several events (truncate, write, close): wait for the
                // writer to finish, so a half-written file is not read, then take them as one.
                tokio::time::sleep(SETTLE).await;
                while changed.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(RESYNC) => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = async { if let Some(task) = repair_task.as_mut() { let _ = task.await; } else { std::future::pending::<()>().await } } => {
                tracing::error!("the pod watch ended; repair stops");
                repair_task = None;
            }
            _ = async { if let Some(task) = capture_task.as_mut() { let _ = task.await; } else { std::future::pending::<()>().await } } => {
                tracing::error!("the capture check ended; running pods are no longer checked");
                capture_task = None;
            }
        }
    }
    metrics.set_readiness(Err("shutting down".into()));
    tracing::info!("terminating: removing meshinit-cni's entry and binary");
    match installer.uninstall() {
        Ok(()) => tracing::info!("meshinit-cni removed from the node"),
        Err(errors) => {
            for err in &errors {
                tracing::error!(%err, "uninstalling");
            }
        }
    }
    Ok(())
}

/// One pass: plugin, entry, readiness. Logs a problem once, not on every pass.
fn reconcile(installer: &Installer, metrics: &Metrics, last_problem: &mut Option<String>) {
    let mut problem = None;
    match installer.install_plugin() {
        Ok(true) => {
            tracing::info!(dir = %installer.settings().cni_bin_dir.display(), "installed the meshinit-cni plugin")
        }
        Ok(false) => {}
        Err(err) => problem = Some(err),
    }
    // The entry only once the plugin is there: a runtime must never chain a missing binary.
    if problem.is_none() {
        match installer.ensure_entry() {
            Ok(Ensured::Written(path)) => {
                metrics.count_entry_write();
                tracing::info!(file = %path.display(), "wrote meshinit-cni's entry");
            }
            Ok(Ensured::Unchanged(_)) => {}
            Err(err) => problem = Some(err),
        }
    }
    let message = problem.as_ref().map(ToString::to_string);
    if let Some(err) = &problem {
        if !err.is_waiting() {
            metrics.count_install_error();
        }
        if *last_problem != message {
            if err.is_waiting() {
                tracing::info!(%err, "waiting");
            } else {
                tracing::error!(%err, "cannot put meshinit-cni in place; not ready");
            }
        }
    }
    *last_problem = message;
    metrics.set_readiness(installer.check());
}

async fn run_repair(client: kube::Client, settings: RepairSettings, metrics: &Metrics) {
    let pods: kube::Api<Pod> = kube::Api::all(client.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    let stream = watcher(pods, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    let actions = KubeActions {
        client,
        node_name: settings.node_name.clone(),
    };
    tracing::info!(node = %settings.node_name, init_container = %settings.init_container_name, "repair watching this node's pods");
    repair::process_pods(stream, &settings, &actions, metrics).await;
}

async fn run_capture(
    client: kube::Client,
    mut settings: CaptureSettings,
    binary: std::path::PathBuf,
    proc_root: std::path::PathBuf,
    metrics: Arc<Metrics>,
) {
    settings.plugin_id = capture::plugin_id(&binary);
    let capture = Arc::new(capture::ProcCapture {
        processes: capture::netns::PodProcesses::new(proc_root),
        plugin: capture::plugin::PluginRunner {
            binary,
            conf: settings.plugin.clone(),
            timeout: PLUGIN_TIMEOUT,
        },
    });
    let budget = Arc::new(std::sync::Mutex::new(capture::UpgradeBudget::default()));
    let pods: kube::Api<Pod> = kube::Api::all(client.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    let events = watcher(pods, config)
        .default_backoff()
        .filter_map(|event| async move {
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    PodView::of(&pod).map(PodEvent::Changed)
                }
                Ok(watcher::Event::Delete(pod)) => pod.metadata.uid.map(PodEvent::Deleted),
                Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                Err(err) => {
                    tracing::warn!(%err, "watching pods on this node");
                    None
                }
            }
        })
        .boxed();
    let reporter = capture::KubeReporter {
        client,
        node_name: settings.node_name.clone(),
    };
    let check_settings = settings.clone();
    // The plugin runs are blocking (a child process each): on the blocking pool, one at
    // a time, so that the watch and the metrics endpoint stay responsive.
    let check = move |pod: PodView, failures: u32, now: std::time::Instant| {
        let capture = capture.clone();
        let settings = check_settings.clone();
        let budget = budget.clone();
        async move {
            let name = format!("{}/{}", pod.namespace, pod.name);
            let view = pod.clone();
            let fallback = settings.clone();
            match tokio::task::spawn_blocking(move || {
                let mut budget = budget
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                capture::reconcile_pod(&pod, &*capture, &settings, &mut budget, failures, now)
            })
            .await
            {
                Ok(outcome) => outcome,
                Err(err) => {
                    tracing::error!(%err, pod = %name, "checking a pod's capture");
                    capture::reconcile_pod(
                        &view,
                        &capture::Unavailable(err.to_string()),
                        &fallback,
                        &mut capture::UpgradeBudget::default(),
                        failures,
                        now,
                    )
                }
            }
        }
    };
    tracing::info!(node = %settings.node_name, interval_s = settings.interval.as_secs(), upgrade = settings.upgrade, "checking the capture of this node's meshed pods");
    capture::process(events, &settings, check, &reporter, &metrics).await;
}
