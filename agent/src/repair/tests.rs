//! Pod selection on k8s-openapi Pod fixtures, and `process_pods` fed a synthetic stream
//! with a fake that records each API call.

use super::*;
use serde_json::json;
use std::sync::Mutex;

fn settings() -> RepairSettings {
    RepairSettings {
        node_name: "node-a".into(),
        init_container_name: "istio-validation".into(),
        delete_pods: true,
        label_pods: false,
        label_key: "cni.istio.io/uninitialized".into(),
        label_value: "true".into(),
    }
}

/// A pod on `node` whose init container `name` is in `state` (JSON of a ContainerState),
/// with `last_state`.
fn pod(
    name: &str,
    node: &str,
    init: &str,
    state: serde_json::Value,
    last_state: serde_json::Value,
) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "containers": [{"name": "app"}]},
        "status": {"initContainerStatuses": [{
            "name": init, "image": "x", "imageID": "", "ready": false, "restartCount": 3,
            "state": state, "lastState": last_state,
        }]},
    }))
    .expect("a valid Pod")
}

fn terminated(code: i32) -> serde_json::Value {
    json!({"terminated": {"exitCode": code}})
}

fn crash_loop() -> serde_json::Value {
    json!({"waiting": {"reason": "CrashLoopBackOff"}})
}

#[test]
fn validation_exit_126_is_repaired_now_or_in_its_crash_loop() {
    let s = settings();
    let now = pod(
        "a",
        "node-a",
        "istio-validation",
        terminated(126),
        json!({}),
    );
    assert_eq!(repair_action(&now, &s), Some(RepairAction::Delete));
    let looping = pod(
        "b",
        "node-a",
        "istio-validation",
        crash_loop(),
        terminated(126),
    );
    assert_eq!(repair_action(&looping, &s), Some(RepairAction::Delete));
}

#[test]
fn other_pods_are_left_alone() {
    let s = settings();
    for (why, p) in [
        (
            "passed",
            pod("a", "node-a", "istio-validation", terminated(0), json!({})),
        ),
        (
            "other exit code",
            pod("a", "node-a", "istio-validation", terminated(1), json!({})),
        ),
        (
            "another node",
            pod(
                "a",
                "node-b",
                "istio-validation",
                terminated(126),
                json!({}),
            ),
        ),
        (
            "another init container",
            pod("a", "node-a", "istio-init", terminated(126), json!({})),
        ),
        (
            "running again after a 126",
            pod(
                "a",
                "node-a",
                "istio-validation",
                json!({"running": {}}),
                terminated(126),
            ),
        ),
    ] {
        assert_eq!(repair_action(&p, &s), None, "{why}");
    }
    let mut deleting = pod(
        "a",
        "node-a",
        "istio-validation",
        terminated(126),
        json!({}),
    );
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    assert_eq!(repair_action(&deleting, &s), None, "already being deleted");
    let no_status: Pod = serde_json::from_value(
        json!({"metadata": {"name": "x"}, "spec": {"nodeName": "node-a", "containers": []}}),
    )
    .expect("pod");
    assert_eq!(repair_action(&no_status, &s), None);
}

#[test]
fn init_container_name_is_configurable() {
    let mut s = settings();
    s.init_container_name = "meshinit-validation".into();
    let p = pod(
        "a",
        "node-a",
        "meshinit-validation",
        terminated(126),
        json!({}),
    );
    assert_eq!(repair_action(&p, &s), Some(RepairAction::Delete));
    let istio = pod(
        "a",
        "node-a",
        "istio-validation",
        terminated(126),
        json!({}),
    );
    assert_eq!(repair_action(&istio, &s), None);
}

#[test]
fn label_mode_labels_once() {
    let mut s = settings();
    s.delete_pods = false;
    s.label_pods = true;
    let mut p = pod(
        "a",
        "node-a",
        "istio-validation",
        terminated(126),
        json!({}),
    );
    assert_eq!(repair_action(&p, &s), Some(RepairAction::Label));
    p.metadata.labels = Some([(s.label_key.clone(), s.label_value.clone())].into());
    assert_eq!(repair_action(&p, &s), None, "already labelled");
    s.label_pods = false;
    p.metadata.labels = None;
    assert_eq!(
        repair_action(&p, &s),
        None,
        "neither deleting nor labelling"
    );
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    fail_deletes: bool,
}

impl Recorder {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }
    fn record(&self, call: String) {
        self.calls.lock().expect("lock").push(call);
    }
}

impl PodActions for Recorder {
    async fn delete(&self, pod: &Pod) -> Result<(), RepairError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        self.record(format!("delete {name}"));
        if self.fail_deletes {
            return Err(RepairError::Client(Box::new(
                kube::Error::LinesCodecMaxLineLengthExceeded,
            )));
        }
        Ok(())
    }
    async fn label(&self, pod: &Pod, key: &str, value: &str) -> Result<(), RepairError> {
        self.record(format!(
            "label {} {key}={value}",
            pod.metadata.name.clone().unwrap_or_default()
        ));
        Ok(())
    }
    async fn event(
        &self,
        pod: &Pod,
        action: RepairAction,
        message: &str,
    ) -> Result<(), RepairError> {
        assert!(message.contains("istio-validation exited 126"), "{message}");
        self.record(format!(
            "event {} {}",
            pod.metadata.name.clone().unwrap_or_default(),
            action.as_str()
        ));
        Ok(())
    }
}

#[tokio::test]
async fn the_stream_is_acted_on_in_order_with_an_event_before_each_action() {
    let pods: Vec<Result<Pod, String>> = vec![
        Ok(pod(
            "ok",
            "node-a",
            "istio-validation",
            terminated(0),
            json!({}),
        )),
        Ok(pod(
            "raced",
            "node-a",
            "istio-validation",
            terminated(126),
            json!({}),
        )),
        Err("watch restarted".into()),
        Ok(pod(
            "looping",
            "node-a",
            "istio-validation",
            crash_loop(),
            terminated(126),
        )),
    ];
    let recorder = Recorder::default();
    let metrics = Metrics::default();
    process_pods(
        futures::stream::iter(pods),
        &settings(),
        &recorder,
        &metrics,
    )
    .await;
    assert_eq!(
        recorder.calls(),
        [
            "event raced delete",
            "delete raced",
            "event looping delete",
            "delete looping"
        ]
    );
    assert!(metrics
        .render()
        .contains("meshinit_cni_repair_pods_total{action=\"delete\"} 2\n"));
}

#[tokio::test]
async fn a_refused_action_is_counted_as_an_error_not_a_repair() {
    let recorder = Recorder {
        fail_deletes: true,
        ..Default::default()
    };
    let metrics = Metrics::default();
    let pods: Vec<Result<Pod, String>> = vec![Ok(pod(
        "raced",
        "node-a",
        "istio-validation",
        terminated(126),
        json!({}),
    ))];
    process_pods(
        futures::stream::iter(pods),
        &settings(),
        &recorder,
        &metrics,
    )
    .await;
    let text = metrics.render();
    assert!(
        text.contains("meshinit_cni_repair_pods_total{action=\"delete\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("meshinit_cni_repair_errors_total 1\n"),
        "{text}"
    );
}

#[test]
fn the_event_points_at_the_pod_and_says_why() {
    let p = pod(
        "raced",
        "node-a",
        "istio-validation",
        terminated(126),
        json!({}),
    );
    let message = event_message(RepairAction::Delete, &settings());
    let event = repair_event(&p, RepairAction::Delete, &message, "node-a");
    assert_eq!(event.involved_object.kind.as_deref(), Some("Pod"));
    assert_eq!(event.involved_object.name.as_deref(), Some("raced"));
    assert_eq!(event.involved_object.uid.as_deref(), Some("uid-raced"));
    assert_eq!(event.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let text = event.message.unwrap_or_default();
    assert!(
        text.contains("node node-a before meshinit-cni was in place"),
        "{text}"
    );
    assert!(text.contains("deleted so that it is recreated"), "{text}");
}
