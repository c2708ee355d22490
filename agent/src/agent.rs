//! The agent's main loop: put the plugin and entry in place, keep them there (on every
//! change inotify reports, and every few seconds in case one was missed), serve readiness
//! and metrics, run repair, and on SIGTERM remove everything it installed.

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

pub async fn run(settings: Settings) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::default());
    let listener = http::bind(&settings.metrics_addr).await?;
    tokio::spawn(http::serve(listener, metrics.clone()));
    let installer = Installer::new(settings.install.clone());
    let (changed_tx, mut changed) = tokio::sync::mpsc::unbounded_channel();
    watch::spawn(&settings.install.cni_conf_dir, changed_tx)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Runtime)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Runtime)?;

    let mut repair_task = match settings.repair.clone() {
        Some(repair) => {
            let client = kube::Client::try_default()
                .await
                .map_err(|err| RepairError::Client(Box::new(err)))?;
            let metrics = metrics.clone();
            Some(tokio::spawn(async move {
                run_repair(client, repair, &metrics).await;
            }))
        }
        None => None,
    };
    tracing::info!(
        bin_dir = %settings.install.cni_bin_dir.display(),
        conf_dir = %settings.install.cni_conf_dir.display(),
        chained = settings.install.chained,
        repair = settings.repair.is_some(),
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
