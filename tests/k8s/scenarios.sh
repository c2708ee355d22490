# The scenarios run.sh runs on the node once it is Ready (sourced by run.sh, which defines
# kubectl, crictl, in_node, log, die, and the images).
#
# Init-container mode: a pod whose init container is meshinit's image with the arguments
# Istio's injector renders for istio-init (REDIRECT, every port and address captured), a
# stand-in istio-proxy (uid 1337, listeners on 15001 and 15006 that answer with the
# connection's SO_ORIGINAL_DST, and 15021 for its readiness probe) and an app (uid 1000,
# serving 8080). A "Vault" pod outside the mesh serves 8200. Checked with real connections,
# made from inside the containers with `kubectl exec`:
#   - the app's connection to Vault reaches istio-proxy's 15001, Vault as its original
#     destination;
#   - istio-proxy's own connection to Vault reaches Vault, from the pod's address;
#   - Vault's connection to the app's 8080 reaches istio-proxy's 15006, 8080 as its
#     original destination; so does the node's (the kubelet's side of the bridge).
# And the same pod with NET_ADMIN and NET_RAW not granted: istio-init exits 2 and the app
# never starts.

# The helper roles (support::roles) are the integration tests' binary: `/mi-helper` in the
# helper image, run with its role in MESHINIT_TEST_ROLE.
HELPER_ARGS='["/mi-helper", "support::roles::helper_entrypoint", "--exact", "--nocapture", "--test-threads=1"]'
helper_in() { # NAMESPACE POD CONTAINER ROLE...: runs a helper role in that container
  local ns="$1" pod="$2" container="$3"
  shift 3
  kubectl exec -n "$ns" "$pod" -c "$container" -- /usr/bin/env MESHINIT_TEST_ROLE="$*" \
    /mi-helper support::roles::helper_entrypoint --exact --nocapture --test-threads=1
}
# The answer line of a client role (REPLY ... or FAIL ...).
answer() { grep -E '^(REPLY|FAIL) ' | head -n1; }

failures=0
check() { # WHAT EXPECTED-REGEX ANSWER
  if [[ "$3" =~ $2 ]]; then
    log "ok: $1: $3"
  else
    log "FAILED: $1: expected /$2/, got: ${3:-nothing}"
    failures=$((failures + 1))
  fi
}

# istio-init's arguments, as Istio's injector renders them for a pod without annotations.
ISTIO_INIT_ARGS='["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info"]'

meshed_pod() { # NAME CAPABILITIES-ADD (a JSON list)
  cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  namespace: meshed
  labels: {app: $1}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  initContainers:
  - name: istio-init
    image: $MESHINIT_IMAGE
    imagePullPolicy: Never
    args: $ISTIO_INIT_ARGS
    resources:
      requests: {cpu: 10m, memory: 16Mi}
      limits: {cpu: "1", memory: 16Mi}
    securityContext:
      allowPrivilegeEscalation: false
      capabilities: {add: $2, drop: [ALL]}
      privileged: false
      readOnlyRootFilesystem: true
      runAsGroup: 0
      runAsNonRoot: false
      runAsUser: 0
  containers:
  - name: app
    image: $HELPER_IMAGE
    imagePullPolicy: Never
    command: $HELPER_ARGS
    env: [{name: MESHINIT_TEST_ROLE, value: "serve app tcp:0.0.0.0:8080"}]
    ports: [{containerPort: 8080}]
    securityContext:
      allowPrivilegeEscalation: false
      capabilities: {drop: [ALL]}
      runAsUser: 1000
      runAsGroup: 1000
  - name: istio-proxy
    image: $HELPER_IMAGE
    imagePullPolicy: Never
    command: $HELPER_ARGS
    env: [{name: MESHINIT_TEST_ROLE, value: "serve sidecar tcp:0.0.0.0:15001 tcp:0.0.0.0:15006 tcp:0.0.0.0:15021"}]
    readinessProbe:
      tcpSocket: {port: 15021}
      periodSeconds: 1
    securityContext:
      allowPrivilegeEscalation: false
      capabilities: {drop: [ALL]}
      privileged: false
      readOnlyRootFilesystem: true
      runAsGroup: 1337
      runAsNonRoot: true
      runAsUser: 1337
EOF
}

vault_pod() {
  cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: vault
  namespace: outside
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: vault
    image: $HELPER_IMAGE
    imagePullPolicy: Never
    command: $HELPER_ARGS
    env: [{name: MESHINIT_TEST_ROLE, value: "serve vault tcp:0.0.0.0:8200"}]
    readinessProbe:
      tcpSocket: {port: 8200}
      periodSeconds: 1
    securityContext:
      runAsUser: 1000
      runAsGroup: 1000
EOF
}

pod_ip() { kubectl get pod -n "$1" "$2" -o jsonpath='{.status.podIP}'; }

scenario_init_container_mode() {
  kubectl create namespace meshed >/dev/null
  kubectl create namespace outside >/dev/null
  vault_pod | kubectl apply -f - >/dev/null
  local start=$SECONDS
  meshed_pod meshed '[NET_ADMIN, NET_RAW]' | kubectl apply -f - >/dev/null
  kubectl wait --timeout=180s -n outside pod/vault --for=condition=Ready >/dev/null \
    || die "the vault pod did not become Ready: $(kubectl describe pod -n outside vault)"
  if ! kubectl wait --timeout=180s -n meshed pod/meshed --for=condition=Ready >/dev/null; then
    kubectl describe pod -n meshed meshed >&2
    kubectl logs -n meshed meshed -c istio-init >&2 || true
    die "the meshed pod did not become Ready"
  fi
  log "meshed pod Ready $((SECONDS - start))s after it was applied"
  local init_exit
  init_exit="$(kubectl get pod -n meshed meshed \
    -o jsonpath='{.status.initContainerStatuses[0].state.terminated.exitCode}')"
  check "istio-init (meshinit's image) exit code" '^0$' "$init_exit"
  log "istio-init's log:"
  kubectl logs -n meshed meshed -c istio-init | sed 's/^/    /' >&2

  local vault pod
  vault="$(pod_ip outside vault)"
  pod="$(pod_ip meshed meshed)"
  log "pod $pod, vault $vault"
  local ip_re='[0-9.]+'
  check "app (uid 1000) → vault $vault:8200 is captured by istio-proxy's 15001, original destination kept" \
    "^REPLY by=sidecar:15001 local=$ip_re:15001 orig=${vault//./\\.}:8200 client=${pod//./\\.}:[0-9]+$" \
    "$(helper_in meshed meshed app client tcp "$vault:8200" | answer)"
  check "istio-proxy (uid 1337) → vault $vault:8200 goes out directly" \
    "^REPLY by=vault:8200 local=${vault//./\\.}:8200 orig=${vault//./\\.}:8200 client=${pod//./\\.}:[0-9]+$" \
    "$(helper_in meshed meshed istio-proxy client tcp "$vault:8200" | answer)"
  check "vault → app $pod:8080 is captured by istio-proxy's 15006, original destination kept" \
    "^REPLY by=sidecar:15006 local=${pod//./\\.}:15006 orig=${pod//./\\.}:8080 client=${vault//./\\.}:[0-9]+$" \
    "$(helper_in outside vault vault client tcp "$pod:8080" | answer)"
  check "node → app $pod:8080 is captured by istio-proxy's 15006" \
    "^REPLY by=sidecar:15006 local=${pod//./\\.}:15006 orig=${pod//./\\.}:8080 client=$ip_re:[0-9]+$" \
    "$(in_node env MESHINIT_TEST_ROLE="client tcp $pod:8080" "$HELPER_EXE" \
      support::roles::helper_entrypoint --exact --nocapture --test-threads=1 | answer)"
  check "vault → istio-proxy's 15021 (excluded inbound) is not captured" \
    "^REPLY by=sidecar:15021 local=${pod//./\\.}:15021 " \
    "$(helper_in outside vault vault client tcp "$pod:15021" | answer)"
  kubectl delete pod -n meshed meshed --wait=true --timeout=60s >/dev/null
}

scenario_init_container_without_capabilities() {
  meshed_pod denied '[]' | kubectl apply -f - >/dev/null
  local start=$SECONDS exit_code=
  while [ $((SECONDS - start)) -lt 120 ]; do
    exit_code="$(kubectl get pod -n meshed denied -o jsonpath='{.status.initContainerStatuses[0].lastState.terminated.exitCode}{.status.initContainerStatuses[0].state.terminated.exitCode}')"
    [ -n "$exit_code" ] && break
    sleep 1
  done
  check "istio-init without NET_ADMIN/NET_RAW exits 2 (the container lacks something)" '^2' "$exit_code"
  check "its log names the missing capability" 'NET_ADMIN' \
    "$(kubectl logs -n meshed denied -c istio-init 2>&1 | tr '\n' ' ')"
  check "the app never started" '^$' \
    "$(kubectl get pod -n meshed denied -o jsonpath='{.status.containerStatuses[?(@.name=="app")].state.running}')"
  kubectl delete pod -n meshed denied --wait=true --timeout=60s >/dev/null
}

run_scenarios() {
  scenario_init_container_mode
  scenario_init_container_without_capabilities
  if [ "$failures" -gt 0 ]; then
    die "$failures check(s) failed"
  fi
  log "every check passed"
}
