//! Pods that raced the agent: scheduled on this node before meshinit-cni was in place,
//! they started without capture rules, so their validation init container exits 126 and
//! the pod loops. They are deleted (their controller recreates them, now with the plugin)
//! or labelled, as Istio's `repair.deletePods` / `repair.labelPods`, with an Event on the
//! pod saying why.
//!
//! The choice is a pure function of the pod (`repair_action`), and `process_pods` takes
//! any stream of pods and any `PodActions`, so tests feed it synthetic pods and a fake.

use crate::error::RepairError;
use crate::metrics::{Metrics, RepairAction};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ContainerStatus, Event, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use std::future::Future;

/// The exit code of Istio's validation (and `meshinit validate`) when the rules are not
/// in place.
pub const VALIDATION_FAILED: i32 = 126;

#[derive(Debug, Clone)]
pub struct RepairSettings {
    pub node_name: String,
    pub init_container_name: String,
    pub delete_pods: bool,
    pub label_pods: bool,
    pub label_key: String,
    pub label_value: String,
}

/// What to do with `pod`, if anything.
pub fn repair_action(pod: &Pod, settings: &RepairSettings) -> Option<RepairAction> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let on_this_node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| n == settings.node_name);
    if !on_this_node {
        return None;
    }
    let statuses = pod.status.as_ref()?.init_container_statuses.as_ref()?;
    let validation = statuses
        .iter()
        .find(|s| s.name == settings.init_container_name)?;
    if !failed_validation(validation) {
        return None;
    }
    if settings.delete_pods {
        return Some(RepairAction::Delete);
    }
    let labelled = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(&settings.label_key))
        .is_some_and(|v| *v == settings.label_value);
    (settings.label_pods && !labelled).then_some(RepairAction::Label)
}

/// Terminated with 126 now, or waiting to be restarted after terminating with 126 (the
/// crash loop's usual state).
fn failed_validation(status: &ContainerStatus) -> bool {
    let exit = |s: Option<&k8s_openapi::api::core::v1::ContainerState>| {
        s.and_then(|s| s.terminated.as_ref()).map(|t| t.exit_code)
    };
    if exit(status.state.as_ref()) == Some(VALIDATION_FAILED) {
        return true;
    }
    let waiting = status.state.as_ref().is_some_and(|s| s.waiting.is_some());
    waiting && exit(status.last_state.as_ref()) == Some(VALIDATION_FAILED)
}

/// Why, in the pod's Event.
pub fn event_message(action: RepairAction, settings: &RepairSettings) -> String {
    let done = match action {
        RepairAction::Delete => "deleted so that it is recreated with them".to_owned(),
        RepairAction::Label => format!(
            "labelled {}={} for its owner to act on",
            settings.label_key, settings.label_value
        ),
    };
    format!(
        "init container {} exited {VALIDATION_FAILED}: the pod started on node {} before meshinit-cni was in place, so it has no traffic capture rules; {done}",
        settings.init_container_name, settings.node_name
    )
}

/// The API calls repair makes, so that tests can record them instead.
pub trait PodActions {
    fn delete(&self, pod: &Pod) -> impl Future<Output = Result<(), RepairError>> + Send;
    fn label(
        &self,
        pod: &Pod,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), RepairError>> + Send;
    fn event(
        &self,
        pod: &Pod,
        action: RepairAction,
        message: &str,
    ) -> impl Future<Output = Result<(), RepairError>> + Send;
}

/// Acts on every pod of the stream that needs it; ends when the stream does. A failed
/// action is logged and counted, and the next pod is handled.
pub async fn process_pods<S, E, A>(
    pods: S,
    settings: &RepairSettings,
    actions: &A,
    metrics: &Metrics,
) where
    S: Stream<Item = Result<Pod, E>>,
    E: std::fmt::Display,
    A: PodActions,
{
    futures::pin_mut!(pods);
    while let Some(item) = pods.next().await {
        let pod = match item {
            Ok(pod) => pod,
            Err(err) => {
                tracing::warn!(%err, "watching pods on this node");
                continue;
            }
        };
        let Some(action) = repair_action(&pod, settings) else {
            continue;
        };
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let message = event_message(action, settings);
        // The Event first: once deleted, the pod is no longer there to describe.
        if let Err(err) = actions.event(&pod, action, &message).await {
            tracing::warn!(%err, "recording the repair Event");
        }
        let result = match action {
            RepairAction::Delete => actions.delete(&pod).await,
            RepairAction::Label => {
                actions
                    .label(&pod, &settings.label_key, &settings.label_value)
                    .await
            }
        };
        match result {
            Ok(()) => {
                metrics.count_repair(action);
                tracing::info!(%namespace, pod = %name, action = action.as_str(), "repaired a pod that started before meshinit-cni was in place");
            }
            Err(err) => {
                metrics.count_repair_error();
                tracing::warn!(%err, "repairing a pod");
            }
        }
    }
}

/// `PodActions` through the API server.
pub struct KubeActions {
    pub client: kube::Client,
    /// The Event's reporting component and instance.
    pub node_name: String,
}

fn api_error(action: &'static str, pod: &Pod) -> impl FnOnce(kube::Error) -> RepairError {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    move |source| RepairError::Api {
        action,
        namespace,
        name,
        source: Box::new(source),
    }
}

impl KubeActions {
    fn pods(&self, pod: &Pod) -> kube::Api<Pod> {
        kube::Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        )
    }
}

impl PodActions for KubeActions {
    async fn delete(&self, pod: &Pod) -> Result<(), RepairError> {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        self.pods(pod)
            .delete(name, &Default::default())
            .await
            .map(|_| ())
            .map_err(api_error("deleting", pod))
    }

    async fn label(&self, pod: &Pod, key: &str, value: &str) -> Result<(), RepairError> {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let patch = serde_json::json!({"metadata": {"labels": {key: value}}});
        self.pods(pod)
            .patch(name, &Default::default(), &kube::api::Patch::Merge(patch))
            .await
            .map(|_| ())
            .map_err(api_error("labelling", pod))
    }

    async fn event(
        &self,
        pod: &Pod,
        action: RepairAction,
        message: &str,
    ) -> Result<(), RepairError> {
        let event = repair_event(pod, action, message, &self.node_name);
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        kube::Api::<Event>::namespaced(self.client.clone(), namespace)
            .create(&Default::default(), &event)
            .await
            .map(|_| ())
            .map_err(api_error("recording an Event for", pod))
    }
}

/// The Event that explains a repair, as `kubectl describe pod` shows it.
pub fn repair_event(pod: &Pod, action: RepairAction, message: &str, node_name: &str) -> Event {
    let reason = match action {
        RepairAction::Delete => "MeshinitCNIRepairDeleted",
        RepairAction::Label => "MeshinitCNIRepairLabeled",
    };
    pod_event(
        PodRef {
            namespace: pod.metadata.namespace.as_deref(),
            name: pod.metadata.name.as_deref(),
            uid: pod.metadata.uid.as_deref(),
        },
        reason,
        message,
        true,
        node_name,
    )
}

/// The pod an Event is about.
#[derive(Debug, Clone, Copy)]
pub struct PodRef<'a> {
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    pub uid: Option<&'a str>,
}

/// An Event on a pod from the agent of `node_name`.
pub fn pod_event(
    pod: PodRef<'_>,
    reason: &str,
    message: &str,
    warning: bool,
    node_name: &str,
) -> Event {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let owned = |s: Option<&str>| s.map(str::to_owned);
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", pod.name.unwrap_or_default())),
            namespace: owned(pod.namespace),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: owned(pod.name),
            namespace: owned(pod.namespace),
            uid: owned(pod.uid),
            ..Default::default()
        },
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        type_: Some(if warning { "Warning" } else { "Normal" }.into()),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("meshinit-cni-agent".into()),
            host: Some(node_name.to_owned()),
        }),
        reporting_component: Some("meshinit-cni-agent".into()),
        reporting_instance: Some(node_name.to_owned()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
