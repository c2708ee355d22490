# shellcheck shell=bash
# The node agent on the node (sourced by scenarios.sh): charts/meshinit-cni installed with
# helm, as a cluster installs it, onto the node's CNI directories ($WORK/cni/bin and
# $WORK/cni/net.d, which run.sh's node_cni_config manages), with istio.sh's helm.
# shellcheck disable=SC2154 # WORK, repo, NODE_IP, podman_opts...: run.sh's
#
# Each scenario starts from the node without meshinit-cni (no entry in the conflist, no
# plugin binary: run.sh's symlink is moved aside) and puts back what it found
# (agent_restore) when it ends; a run that dies midway is torn down whole by run.sh.
#   - agent_install: the chart installs the agent; the plugin and the entry appear and
#     containerd loads them; a CNI-mode pod is captured; the bridge conflist rewritten as a
#     primary CNI rewrites it gets the entry back within a second; helm uninstall leaves the
#     conflist byte for byte as it was and the plugin gone.
#   - agent_repair: a meshed pod started before the agent fails validation (126) and loops;
#     once the agent is installed, repair deletes it with an Event saying why, and its
#     replacement is captured.
#   - agent_bad_config: an unparsable conflist sorted first (left by another tool): the agent
#     says so, changes nothing and is not Ready; once it is gone, the agent is Ready.

AGENT_IMAGE=localhost/meshinit-cni-agent:k8s
AGENT_RELEASE=meshinit-cni
AGENT_PORT=15014
CONFLIST="$WORK/cni/net.d/10-node.conflist"

# The agent's image (the Dockerfile's `agent` stage, built offline), imported once per run.
agent_image() {
  [ -z "${agent_image_done:-}" ] || return 0
  local start=$SECONDS
  PODMAN_OPTS="${podman_opts[*]}" bash "$repo/tests/podman/build-offline.sh" --target agent "$AGENT_IMAGE" \
    >"$WORK/logs/agent-image-build.out" 2>"$WORK/logs/agent-image-build.err" \
    || die "build-offline.sh --target agent failed: $(tail -n 30 "$WORK/logs/agent-image-build.err")"
  podman save --quiet --format docker-archive -o "$WORK/agent-image.tar" "$AGENT_IMAGE"
  in_node ctr --address "$WORK/containerd.sock" -n k8s.io images import "$WORK/agent-image.tar" >/dev/null
  rm -f "$WORK/agent-image.tar"
  agent_image_done=1
  log "agent image built and imported in $((SECONDS - start))s"
}

# The agent runs on the node's network (hostNetwork) and reaches the API server by its
# Service, as in-cluster clients do (KUBERNETES_SERVICE_HOST). No kube-proxy runs here, so
# the node's own connections to that Service get kube-proxy's rule (nat OUTPUT) while an
# agent scenario runs.
AGENT_SERVICE_RULE=(-d "$SERVICE_IP/32" -p tcp --dport 443 -m comment
  --comment "meshinit agent scenarios: the kubernetes Service (no kube-proxy here)"
  -j DNAT --to-destination "$NODE_IP:6443")
agent_service_rule() { # -A | -D
  ip netns exec "$NODE_NETNS" iptables -w -t nat "$1" OUTPUT "${AGENT_SERVICE_RULE[@]}"
}

# The node as the scenario found it: whether meshinit-cni was chained (run.sh's entry), and
# the plugin's symlink; then the node without either, and the conflist's bytes.
agent_save_node() {
  agent_service_rule -A
  agent_found="$(if grep -q '"meshinit-cni"' "$CONFLIST"; then echo with-meshinit; else echo without-meshinit; fi)"
  node_cni_config without-meshinit
  cp "$CONFLIST" "$WORK/agent-conflist.before"
  agent_plugin_link="$(readlink "$WORK/cni/bin/meshinit-cni")"
  rm "$WORK/cni/bin/meshinit-cni"
}
agent_restore() {
  [ -n "${agent_plugin_link:-}" ] || return 0
  helm uninstall "$AGENT_RELEASE" -n kube-system --wait --timeout 60s >/dev/null 2>&1 || true
  rm -f "$WORK/cni/bin/meshinit-cni" "$WORK/cni/net.d/00-broken.conflist" "$WORK"/cni/net.d/.meshinit-cni*
  ln -s "$agent_plugin_link" "$WORK/cni/bin/meshinit-cni"
  agent_plugin_link=
  node_cni_config "$agent_found"
  agent_service_rule -D
}
agent_logs() { # the agent's log, for a failure's message
  kubectl logs -n kube-system -l app.kubernetes.io/name=meshinit-cni --tail=40 2>&1 || true
}

agent_install() { # [HELM-ARGS...]
  mkdir -p "$WORK/helm"
  helm install "$AGENT_RELEASE" "$repo/charts/meshinit-cni" -n kube-system \
    --set image.repository="${AGENT_IMAGE%:*}" --set image.tag="${AGENT_IMAGE##*:}" \
    --set image.pullPolicy=Never \
    --set cniBinDir="$WORK/cni/bin" --set cniConfDir="$WORK/cni/net.d" \
    --set metricsPort="$AGENT_PORT" "$@" >"$WORK/logs/helm-agent.log" 2>&1 \
    || die "helm install $AGENT_RELEASE failed: $(cat "$WORK/logs/helm-agent.log")"
}
# Until the agent's pod is Ready: helm's --wait can return before a DaemonSet recreated
# right after an uninstall has its new pod, so readiness is waited for here.
agent_wait_ready() {
  wait_until 120 agent_is_ready >/dev/null \
    || log "the agent is not Ready after 120 s: $(kubectl describe pods -n kube-system -l app.kubernetes.io/name=meshinit-cni | tail -n 20) $(agent_logs)"
}
agent_is_ready() { [ "$(agent_ready)" = true ]; }
agent_pod() { kubectl get pods -n kube-system -l app.kubernetes.io/name=meshinit-cni -o jsonpath='{.items[0].metadata.name}'; }
agent_ready() {
  kubectl get pods -n kube-system -l app.kubernetes.io/name=meshinit-cni \
    -o jsonpath='{.items[0].status.containerStatuses[0].ready}'
}
agent_get() { # PATH: the agent's answer on its port, from the node
  in_node python3 -c 'import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())' "http://$NODE_IP:$AGENT_PORT$1"
}
# The types of the conflist's plugins, in order ("bridge meshinit-cni").
conflist_types() {
  python3 -c 'import json,sys
try:
    print(" ".join(p["type"] for p in json.load(open(sys.argv[1]))["plugins"]))
except Exception as e:
    print("unreadable:", e)' "$CONFLIST"
}
wait_until() { # SECONDS COMMAND...: polls every 50 ms; prints the milliseconds taken
  # Measured when the successful check has finished: an upper bound, which includes the
  # check's own time (a python3 start, 100-250 ms on this machine under load).
  local limit_ms=$(($1 * 1000)) start now
  shift
  start=$(date +%s%3N)
  while :; do
    if "$@"; then now=$(date +%s%3N); echo $((now - start)); return 0; fi
    now=$(date +%s%3N)
    [ $((now - start)) -lt "$limit_ms" ] || { echo "timeout"; return 1; }
    sleep 0.05
  done
}
entry_present() { [ "$(conflist_types)" = "bridge meshinit-cni" ]; }

scenario_agent_install() {
  agent_image
  agent_save_node
  agent_install
  agent_wait_ready
  check "agent: Ready once installed" '^true$' "$(agent_ready)"
  check "agent: the plugin is in the node's CNI bin dir, a file (not run.sh's symlink) that answers VERSION" \
    '"supportedVersions"' \
    "$([ -f "$WORK/cni/bin/meshinit-cni" ] && [ ! -L "$WORK/cni/bin/meshinit-cni" ] \
      && CNI_COMMAND=VERSION "$WORK/cni/bin/meshinit-cni" </dev/null 2>&1)"
  check "agent: meshinit-cni chained last in the bridge conflist" '^bridge meshinit-cni$' "$(conflist_types)"
  check "agent: the entry declares the annotations capability and excludes kube-system" \
    '^\{"io.kubernetes.cri.pod-annotations": true\} \["kube-system"\]$' \
    "$(python3 -c 'import json,sys; p=json.load(open(sys.argv[1]))["plugins"][-1]; print(json.dumps(p["capabilities"]), json.dumps(p["exclude_namespaces"]))' "$CONFLIST")"
  wait_for "containerd's CNI configuration (the agent's entry)" 30 containerd cni_config_is with-meshinit
  start_pod agent-cni istio-validation < <(cni_pod agent-cni)
  check_traffic agent-cni
  delete_pod agent-cni

  # A primary CNI restarting rewrites its file, without our entry. The agent's second
  # write (its metrics) shows that it noticed and put the entry back.
  local took
  cat "$WORK/agent-conflist.before" >"$CONFLIST"
  took="$(wait_until 5 entry_present)"
  check "agent: the rewritten bridge conflist has the entry back within a second (ms, at most)" '^[0-9]{1,3}$' "$took"
  check "agent: metrics count two writes of the entry (the install, the repair of the rewrite)" '^meshinit_cni_config_writes_total 2$' \
    "$(agent_get /metrics | grep '^meshinit_cni_config_writes_total')"
  check "agent: /readyz" '^ok$' "$(agent_get /readyz)"
  wait_for "containerd's CNI configuration (the entry back)" 30 containerd cni_config_is with-meshinit

  helm uninstall "$AGENT_RELEASE" -n kube-system --wait --timeout 60s >/dev/null
  wait_until 60 agent_gone >/dev/null || die "the agent's pod did not go away"
  check "agent: uninstalled, the conflist is byte for byte what it was" '^same$' \
    "$(if cmp -s "$WORK/agent-conflist.before" "$CONFLIST"; then echo same; else diff "$WORK/agent-conflist.before" "$CONFLIST"; fi)"
  check "agent: uninstalled, the plugin is gone and no file of the agent's is left" '^$' \
    "$(ls -A "$WORK/cni/bin/meshinit-cni" "$WORK"/cni/net.d/.meshinit-cni* 2>/dev/null)"
  agent_restore
}
agent_gone() { [ -z "$(kubectl get pods -n kube-system -l app.kubernetes.io/name=meshinit-cni -o name)" ]; }

# A Deployment of one CNI-mode pod (cni_pod's), so that a deleted pod is recreated.
raced_deployment() {
  cni_pod raced | python3 -c 'import sys, yaml
pod = yaml.safe_load(sys.stdin)
print(yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deployment",
  "metadata": {"name": "raced", "namespace": pod["metadata"]["namespace"]},
  "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "raced"}},
    "template": {"metadata": {"labels": pod["metadata"]["labels"],
      "annotations": pod["metadata"]["annotations"]}, "spec": pod["spec"]}}}))'
}

scenario_agent_repair() {
  agent_image
  agent_save_node
  raced_deployment | kubectl apply -f - >/dev/null
  local start=$SECONDS raced=
  while [ $((SECONDS - start)) -lt 120 ]; do
    raced="$(deployment_pod meshed raced)"
    [ -n "$raced" ] && [ -n "$(init_exit_code "$raced")" ] && break
    sleep 1
  done
  check "repair: the pod started before the agent fails validation" '^126$' "$(init_exit_code "$raced")"
  local uid
  uid="$(kubectl get pod -n meshed "$raced" -o jsonpath='{.metadata.uid}')"
  agent_install
  agent_wait_ready
  wait_until 60 pod_gone meshed "$raced" >/dev/null || log "$raced still there; the agent's log: $(agent_logs)"
  check "repair: the agent deleted $raced" '^gone$' "$(pod_gone meshed "$raced" && echo gone)"
  rollout meshed raced
  local replacement
  replacement="$(deployment_pod meshed raced)"
  check "repair: its replacement is a new pod whose istio-validation passed" "^[^ ]+ 0$" \
    "$(kubectl get pod -n meshed "$replacement" -o jsonpath='{.metadata.uid} {.status.initContainerStatuses[0].state.terminated.exitCode}' | grep -v "^$uid ")"
  check_traffic "$replacement"
  check "repair: an Event on the deleted pod says why" \
    'MeshinitCNIRepairDeleted: init container istio-validation exited 126: the pod started on node .* before meshinit-cni was in place' \
    "$(kubectl get events -n meshed --field-selector "involvedObject.name=$raced" \
      -o jsonpath='{range .items[*]}{.reason}: {.message}{"\n"}{end}' | grep MeshinitCNIRepair)"
  check "repair: counted in the agent's metrics" '^meshinit_cni_repair_pods_total\{action="delete"\} 1$' \
    "$(agent_get /metrics | grep 'action="delete"')"
  kubectl delete deployment -n meshed raced --wait=true --timeout=60s >/dev/null
  helm uninstall "$AGENT_RELEASE" -n kube-system --wait --timeout 60s >/dev/null
  wait_until 60 agent_gone >/dev/null || die "the agent's pod did not go away"
  check "repair: uninstalled, the conflist is byte for byte what it was" '^same$' \
    "$(if cmp -s "$WORK/agent-conflist.before" "$CONFLIST"; then echo same; else echo differs; fi)"
  agent_restore
}
pod_gone() { ! kubectl get pod -n "$1" "$2" >/dev/null 2>&1; }
agent_probe_refused() {
  kubectl get events -n kube-system --field-selector "involvedObject.name=$(agent_pod),reason=Unhealthy" \
    -o jsonpath='{range .items[*]}{.message}{"\n"}{end}' 2>/dev/null | grep -q 'Readiness probe failed: HTTP probe failed with statuscode: 503'
}

scenario_agent_bad_config() {
  agent_image
  agent_save_node
  # Another tool's file, sorted first: the runtime would use it, and cannot parse it.
  printf '{"cniVersion": "1.0.0", "plugins": [' >"$WORK/cni/net.d/00-broken.conflist"
  agent_install
  # Not Ready is judged once the kubelet has probed the agent and been refused (its
  # Unhealthy event), not after a fixed wait.
  local probed
  probed="$(wait_until 60 agent_probe_refused)" \
    || log "no refused readiness probe within 60 s: $(kubectl get events -n kube-system 2>&1 | tail -n 20)"
  check "bad config: the kubelet probed the agent's /readyz and was refused (ms)" '^[0-9]+$' "$probed"
  check "bad config: the agent is not Ready while the first conflist is unparsable" '^false$' "$(agent_ready)"
  check "bad config: its log names the file and says it is left alone" \
    '00-broken.conflist is not valid CNI configuration.*left as it is' \
    "$(kubectl logs -n kube-system "$(agent_pod)" 2>&1 | tr '\n' ' ')"
  check "bad config: /readyz says why" '^503 not ready: .*00-broken.conflist' "$(agent_get /readyz | head -n1)"
  check "bad config: the broken file and the bridge conflist are untouched" '^untouched$' \
    "$([ "$(cat "$WORK/cni/net.d/00-broken.conflist")" = '{"cniVersion": "1.0.0", "plugins": [' ] \
      && cmp -s "$WORK/agent-conflist.before" "$CONFLIST" && echo untouched)"
  rm "$WORK/cni/net.d/00-broken.conflist"
  local took
  took="$(wait_until 10 entry_present)"
  check "bad config: once it is removed, the entry is in the bridge conflist (ms)" '^[0-9]+$' "$took"
  kubectl wait --timeout=30s -n kube-system pod -l app.kubernetes.io/name=meshinit-cni --for=condition=Ready >/dev/null
  check "bad config: then the agent is Ready" '^true$' "$(agent_ready)"
  helm uninstall "$AGENT_RELEASE" -n kube-system --wait --timeout 60s >/dev/null
  wait_until 60 agent_gone >/dev/null || die "the agent's pod did not go away"
  check "bad config: uninstalled, the conflist is byte for byte what it was" '^same$' \
    "$(if cmp -s "$WORK/agent-conflist.before" "$CONFLIST"; then echo same; else echo differs; fi)"
  agent_restore
}

# shellcheck source=tests/k8s/agent-capture.sh
. "$here/agent-capture.sh"

# shellcheck disable=SC2034 # scenarios.sh's list takes them
AGENT_SCENARIOS="agent_install agent_repair agent_bad_config $AGENT_CAPTURE_SCENARIOS"
