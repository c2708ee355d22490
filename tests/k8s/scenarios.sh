# The scenarios run.sh runs on the node once it is Ready (sourced by run.sh, which defines
# kubectl, crictl, in_node, log, die, here, repo, WORK, and the images).
# shellcheck disable=SC2154 # here, repo, WORK, NODE_NAME...: run.sh's
#
# The pods: meshinit's image as the init container (istio-init with the arguments Istio's
# injector renders, or istio-validation in CNI mode), a stand-in istio-proxy (listeners on
# 15001 and 15006 that answer with the connection's SO_ORIGINAL_DST, and 15021 for its
# readiness probe) and an app (uid 1000, serving 8080); a "Vault" pod outside the mesh
# serves 8200. Each traffic check is a real connection, made from inside the containers
# with `kubectl exec` or from the node (check_traffic):
#   - the app's connection to Vault reaches istio-proxy's 15001, Vault as its original
#     destination;
#   - istio-proxy's own connection to Vault reaches Vault, from the pod's address;
#   - Vault's and the node's connections to the app's 8080 reach istio-proxy's 15006, 8080
#     as their original destination;
#   - 15021 (excluded inbound) is not captured.
# The scenarios (run_scenarios, at the end, runs them in order): init-container mode
# (REDIRECT, TPROXY, without capabilities), CNI mode (meshinit-cni chained, annotations
# from containerd), Pod Security Admission, restarts, user namespaces (hostUsers: false, in
# both modes), 50 replicas of each mode, a node without the plugin, the repository's
# manifests/, then istiod's (istio.sh) and the node agent's (agent.sh).

# istiod, installed with helm, and the pods its webhook injects.
# shellcheck source=tests/k8s/istio.sh
. "$here/istio.sh"
# Istio's own istio-init and CNI, built from the pinned module, on the same node.
# shellcheck source=tests/k8s/istio-own.sh
. "$here/istio-own.sh"
# The node agent (charts/meshinit-cni), installed with helm.
# shellcheck source=tests/k8s/agent.sh
. "$here/agent.sh"

# The helper roles (support::roles) are the integration tests' binary: `/mi-helper` in the
# helper image, run with its role in MESHINIT_TEST_ROLE.
HELPER_ARGS='["/mi-helper", "support::roles::helper_entrypoint", "--exact", "--nocapture", "--test-threads=1"]'
# Prints the client's answer line (REPLY ... or FAIL ...). The role runs with
# MESHINIT_TEST_NO_PDEATHSIG: the parent runc gives an exec'd process exits while it runs.
# Should `kubectl exec` itself fail (the helper never ran: no answer line), it is tried
# again, twice at most, and what it printed is shown.
helper_in() { # NAMESPACE POD CONTAINER ROLE...: runs a helper role in that container
  local ns="$1" pod="$2" container="$3" out try
  shift 3
  for try in 1 2 3; do
    out="$(kubectl exec -n "$ns" "$pod" -c "$container" -- /usr/bin/env MESHINIT_TEST_NO_PDEATHSIG=1 MESHINIT_TEST_ROLE="$*" \
      /mi-helper support::roles::helper_entrypoint --exact --nocapture --test-threads=1 2>&1)"
    if answer <<<"$out" | grep -q .; then
      answer <<<"$out"
      return
    fi
    log "kubectl exec in $ns/$pod/$container gave no answer (try $try): $out"
    sleep 1
  done
}
# The answer line of a client role (REPLY ... or FAIL ...).
answer() { grep -E '^(REPLY|FAIL) ' | head -n1; }

passes=0
failures=0
check() { # WHAT EXPECTED-REGEX ANSWER
  if [[ "$3" =~ $2 ]]; then
    passes=$((passes + 1))
    log "ok: $1: $3"
  else
    log "FAILED: $1: expected /$2/, got: ${3:-nothing}"
    failures=$((failures + 1))
  fi
}

# istio-init's arguments, as Istio's injector renders them for a pod without annotations.
ISTIO_INIT_ARGS='["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info"]'

# The init container's resources in manifests/ (meshinit's); Istio's injector's defaults
# (global.proxy_init.resources) for Istio's image.
MESHINIT_INIT_RESOURCES='{requests: {cpu: 10m, memory: 16Mi}, limits: {cpu: "1", memory: 16Mi}}'
ISTIO_INIT_RESOURCES='{requests: {cpu: 10m, memory: 40Mi}, limits: {cpu: 2000m, memory: 1024Mi}}'

# The sidecar.istio.io/status Istio's injector writes, in each mode.
INIT_MODE_STATUS='{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy"]}'
CNI_MODE_STATUS='{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["istio-envoy"]}'

# The pod generators below read, besides their arguments: INIT_IMAGE, the init container's
# image (default meshinit's; bench.sh gives Istio's proxy_init image), and INIT_RESOURCES
# (default the manifests' 16Mi; Istio's own defaults for Istio's image, whose peak is
# larger); MODE, the interception mode
# (REDIRECT, the default, or TPROXY: istio-init's -m, and istio-proxy as Istio runs it in
# that mode: uid 0, gid 1337, NET_ADMIN, a transparent inbound listener); POD_NS, the
# namespace (default meshed); POD_SECURITY, the pod's securityContext (default {}).
meshed_pod() { # NAME CAPABILITIES-ADD (a JSON list): init-container mode
  local args="${ISTIO_INIT_ARGS/\"REDIRECT\"/\"${MODE:-REDIRECT}\"}"
  pod_with_init "$1" "$INIT_MODE_STATUS" <<EOF
  - name: istio-init
    image: ${INIT_IMAGE:-$MESHINIT_IMAGE}
    imagePullPolicy: Never
    args: $args
    resources: ${INIT_RESOURCES:-$MESHINIT_INIT_RESOURCES}
    securityContext:
      allowPrivilegeEscalation: false
      capabilities: {add: $2, drop: [ALL]}
      privileged: false
      readOnlyRootFilesystem: true
      runAsGroup: 0
      runAsNonRoot: false
      runAsUser: 0
EOF
}

cni_pod() { # NAME: CNI mode, istio-validation as Istio's injector renders it
  local args="${ISTIO_INIT_ARGS%]}, \"--run-validation\", \"--skip-rule-apply\"]"
  pod_with_init "$1" "$CNI_MODE_STATUS" <<EOF
  - name: istio-validation
    image: ${INIT_IMAGE:-$MESHINIT_IMAGE}
    imagePullPolicy: Never
    args: $args
    resources: ${INIT_RESOURCES:-$MESHINIT_INIT_RESOURCES}
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

pod_with_init() { # NAME STATUS-ANNOTATION, the init container's YAML on stdin
  local init proxy_security inbound=tcp
  init="$(cat)"
  if [ "${MODE:-REDIRECT}" = TPROXY ]; then
    inbound=tproxy
    proxy_security='{allowPrivilegeEscalation: false, capabilities: {add: [NET_ADMIN], drop: [ALL]}, privileged: false, readOnlyRootFilesystem: true, runAsGroup: 1337, runAsNonRoot: false, runAsUser: 0}'
  else
    proxy_security='{allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}, privileged: false, readOnlyRootFilesystem: true, runAsGroup: 1337, runAsNonRoot: true, runAsUser: 1337}'
  fi
  cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  namespace: ${POD_NS:-meshed}
  labels: {app: $1}
  annotations:
    sidecar.istio.io/status: '$2'
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  securityContext: ${POD_SECURITY:-{\}}
  initContainers:
$init
  containers:
  - name: app
    image: $HELPER_IMAGE
    imagePullPolicy: Never
    command: $HELPER_ARGS
    env: [{name: MESHINIT_TEST_NO_PDEATHSIG, value: "1"}, {name: MESHINIT_TEST_ROLE, value: "serve app tcp:0.0.0.0:8080"}]
    ports: [{containerPort: 8080}]
    securityContext:
      allowPrivilegeEscalation: false
      capabilities: {drop: [ALL]}
      runAsNonRoot: true
      runAsUser: 1000
      runAsGroup: 1000
  - name: istio-proxy
    image: $HELPER_IMAGE
    imagePullPolicy: Never
    command: $HELPER_ARGS
    env: [{name: MESHINIT_TEST_NO_PDEATHSIG, value: "1"}, {name: MESHINIT_TEST_ROLE, value: "serve sidecar tcp:0.0.0.0:15001 $inbound:0.0.0.0:15006 tcp:0.0.0.0:15021"}]
    readinessProbe:
      tcpSocket: {port: 15021}
      periodSeconds: 1
    securityContext: $proxy_security
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
    env: [{name: MESHINIT_TEST_NO_PDEATHSIG, value: "1"}, {name: MESHINIT_TEST_ROLE, value: "serve vault tcp:0.0.0.0:8200"}]
    readinessProbe:
      tcpSocket: {port: 8200}
      periodSeconds: 1
    securityContext:
      runAsUser: 1000
      runAsGroup: 1000
EOF
}

pod_ip() { kubectl get pod -n "$1" "$2" -o jsonpath='{.status.podIP}'; }

ensure_namespaces() {
  kubectl get namespace meshed >/dev/null 2>&1 || kubectl create namespace meshed >/dev/null
  kubectl get namespace outside >/dev/null 2>&1 || kubectl create namespace outside >/dev/null
  if ! kubectl get pod -n outside vault >/dev/null 2>&1; then
    vault_pod | kubectl apply -f - >/dev/null
  fi
  kubectl wait --timeout=180s -n outside pod/vault --for=condition=Ready >/dev/null \
    || die "the vault pod did not become Ready: $(kubectl describe pod -n outside vault)"
}

# (Called with the manifest by redirection, not in a pipeline: its checks must count.)
start_pod() { # NAME INIT-CONTAINER, the manifest on stdin: applies it, waits until Ready
  local start=$SECONDS
  kubectl apply -f - >/dev/null
  if ! kubectl wait --timeout=180s -n "${POD_NS:-meshed}" "pod/$1" --for=condition=Ready >/dev/null; then
    kubectl describe pod -n "${POD_NS:-meshed}" "$1" >&2
    kubectl logs -n "${POD_NS:-meshed}" "$1" -c "$2" >&2 || true
    die "pod $1 did not become Ready"
  fi
  log "pod $1 Ready $((SECONDS - start))s after it was applied"
  check "$1: $2 (meshinit's image) exit code" '^0$' "$(kubectl get pod -n "${POD_NS:-meshed}" "$1" \
    -o jsonpath='{.status.initContainerStatuses[0].state.terminated.exitCode}')"
  show_log "${POD_NS:-meshed}" "$1" "$2"
}

show_log() { # NAMESPACE POD CONTAINER: the container's log, indented, on stderr
  log "$2: $3's log:"
  kubectl logs -n "$1" "$2" -c "$3" | sed 's/^/    /' >&2
}

# The exit code of the init container's latest finished run: its current state's if it
# has exited, else its previous run's (the kubelet restarts a failed init container);
# empty until a run has finished.
init_exit_code() { # POD
  local now before
  IFS='|' read -r now before < <(kubectl get pod -n "${POD_NS:-meshed}" "$1" -o jsonpath='{.status.initContainerStatuses[0].state.terminated.exitCode}{"|"}{.status.initContainerStatuses[0].lastState.terminated.exitCode}{"\n"}')
  echo "${now:-$before}"
}
init_restarts() { # POD: how often the kubelet has run the init container again
  kubectl get pod -n "${POD_NS:-meshed}" "$1" -o jsonpath='{.status.initContainerStatuses[0].restartCount}'
}

# A pod that must never get past its init container: it exits EXPECTED, the app never runs.
# The app's check is made once the kubelet has run the init container again after a
# failure: it had its chance to start the app then, and did not.
check_blocked() { # POD INIT-CONTAINER EXPECTED-EXIT WHY LOG-REGEX
  local start=$SECONDS code= restarts=
  while [ $((SECONDS - start)) -lt 120 ]; do
    code="$(init_exit_code "$1")"
    restarts="$(init_restarts "$1")"
    [ -n "$code" ] && [ "${restarts:-0}" -ge 1 ] && break
    sleep 1
  done
  check "$1: $2 exits $3 ($4)" "^$3\$" "$code"
  check "$1: the kubelet ran $2 again after it failed (restarts)" '^[1-9][0-9]*$' "$restarts"
  # The log of a run that exited: the previous one once the kubelet has restarted it, or
  # the current one (read again for a few seconds: the kubelet may be between the two).
  local logs start=$SECONDS
  while :; do
    logs="$(kubectl logs -n "${POD_NS:-meshed}" "$1" -c "$2" --previous 2>/dev/null | tr '\n' ' ' || true)"
    [[ "$logs" =~ $5 ]] && break
    logs="$(kubectl logs -n "${POD_NS:-meshed}" "$1" -c "$2" 2>&1 | tr '\n' ' ' || true)"
    [[ "$logs" =~ $5 ]] && break
    [ $((SECONDS - start)) -lt 15 ] || break
    sleep 1
  done
  check "$1: $2's log says why" "$5" "$logs"
  check "$1: the app never started (not running, never ran)" '^$' \
    "$(kubectl get pod -n "${POD_NS:-meshed}" "$1" -o jsonpath='{.status.containerStatuses[?(@.name=="app")].state.running}{.status.containerStatuses[?(@.name=="app")].state.terminated}{.status.containerStatuses[?(@.name=="app")].lastState.terminated}')"
}

# The traffic checks of a meshed pod, with real connections.
check_traffic() { # POD [NAMESPACE [APP-CONTAINER [APP-PORT]]]
  local name="$1" ns="${2:-meshed}" app="${3:-app}" port="${4:-8080}"
  local vault pod
  vault="$(pod_ip outside vault)"
  pod="$(pod_ip "$ns" "$name")"
  local v="${vault//./\\.}" p="${pod//./\\.}" ip_re='[0-9.]+'
  log "$name: pod $pod, vault $vault"
  check "$name: $app → vault $vault:8200 is captured by istio-proxy's 15001, original destination kept" \
    "^REPLY by=sidecar:15001 local=127\\.0\\.0\\.1:15001 orig=$v:8200 client=$p:[0-9]+$" \
    "$(helper_in "$ns" "$name" "$app" client tcp "$vault:8200")"
  check "$name: istio-proxy ($([ "${MODE:-}" = TPROXY ] && echo "uid 0, gid 1337" || echo "uid 1337")) → vault $vault:8200 goes out directly" \
    "^REPLY by=vault:8200 local=$v:8200 orig=- client=$p:[0-9]+$" \
    "$(helper_in "$ns" "$name" istio-proxy client tcp "$vault:8200")"
  # Inbound, REDIRECT: to 15006's own address, the original destination from conntrack;
  # TPROXY: the listener on 15006 accepts it with the app's address and port as its local
  # address, the client's address kept.
  local inbound_re="local=$p:15006 orig=$p:$port"
  [ "${MODE:-REDIRECT}" != TPROXY ] || inbound_re="local=$p:$port orig=[^ ]+"
  check "$name: vault → $app $pod:$port is captured by istio-proxy's 15006 (${MODE:-REDIRECT}), original destination kept" \
    "^REPLY by=sidecar:15006 $inbound_re client=$v:[0-9]+$" \
    "$(helper_in outside vault vault client tcp "$pod:$port")"
  check "$name: node → $app $pod:$port is captured by istio-proxy's 15006 (${MODE:-REDIRECT})" \
    "^REPLY by=sidecar:15006 $inbound_re client=$ip_re:[0-9]+$" \
    "$(in_node env MESHINIT_TEST_NO_PDEATHSIG=1 MESHINIT_TEST_ROLE="client tcp $pod:$port" "$HELPER_EXE" \
      support::roles::helper_entrypoint --exact --nocapture --test-threads=1 | answer)"
  # (Not NATed: its original destination, if conntrack has one, is where it went.)
  check "$name: vault → istio-proxy's 15021 (excluded inbound) is not captured" \
    "^REPLY by=sidecar:15021 local=$p:15021 orig=($p:15021|-) client=$v:[0-9]+$" \
    "$(helper_in outside vault vault client tcp "$pod:15021")"
}

delete_pod() { kubectl delete pod -n "${POD_NS:-meshed}" "$1" --wait=true --timeout=60s >/dev/null; }

scenario_init_container_mode() {
  start_pod meshed istio-init < <(meshed_pod meshed '[NET_ADMIN, NET_RAW]')
  check_traffic meshed
  delete_pod meshed
}

# TPROXY: istio-init with -m TPROXY (the TPROXY rules, the fwmark routing in table 133),
# istio-proxy as uid 0, gid 1337, with NET_ADMIN for its transparent inbound listener.
scenario_init_container_mode_tproxy() {
  MODE=TPROXY start_pod tproxy istio-init < <(MODE=TPROXY meshed_pod tproxy '[NET_ADMIN, NET_RAW]')
  MODE=TPROXY check_traffic tproxy
  delete_pod tproxy
}

scenario_init_container_without_capabilities() {
  meshed_pod denied '[]' | kubectl apply -f - >/dev/null
  check_blocked denied istio-init 2 "the container lacks NET_ADMIN/NET_RAW" NET_ADMIN
  delete_pod denied
}

# CNI mode: meshinit-cni chained after the bridge; containerd passes the pod's annotations
# (io.kubernetes.cri.pod-annotations), from which it takes the pod to be in CNI mode.
scenario_cni_mode() {
  node_cni_config with-meshinit
  start_pod cni istio-validation < <(cni_pod cni)
  check "cni: istio-validation (uid 1337, no capabilities) says it passed" 'validation passed' \
    "$(kubectl logs -n meshed cni -c istio-validation 2>&1 | tr '\n' ' ')"
  check_traffic cni
  # An init-container-mode pod on the same node: the plugin leaves it to istio-init.
  start_pod meshed-on-cni-node istio-init < <(meshed_pod meshed-on-cni-node '[NET_ADMIN, NET_RAW]')
  check_traffic meshed-on-cni-node
  delete_pod meshed-on-cni-node
  delete_pod cni
}

# Pod Security Admission (the API server's own): a namespace enforcing "baseline" refuses an
# init-container-mode pod (istio-init adds NET_ADMIN and NET_RAW); a CNI-mode pod passes
# "restricted" (the pod runs as non-root with the runtime's default seccomp profile; no
# container adds a capability) and is captured. Needs meshinit-cni chained.
scenario_pod_security() {
  kubectl create namespace psa-baseline >/dev/null
  kubectl label namespace psa-baseline pod-security.kubernetes.io/enforce=baseline >/dev/null
  local out
  out="$(POD_NS=psa-baseline meshed_pod refused '[NET_ADMIN, NET_RAW]' | kubectl apply -f - 2>&1)" \
    && out="accepted: $out"
  check "baseline refuses the init-container-mode pod, with the API server's message" \
    'violates PodSecurity "baseline:latest": non-default capabilities \(container "istio-init" must not include "NET_ADMIN", "NET_RAW" in securityContext.capabilities.add\)' \
    "$out"
  kubectl create namespace psa-restricted >/dev/null
  kubectl label namespace psa-restricted pod-security.kubernetes.io/enforce=restricted >/dev/null
  local restricted='{runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}'
  POD_NS=psa-restricted start_pod restricted istio-validation \
    < <(POD_NS=psa-restricted POD_SECURITY="$restricted" cni_pod restricted)
  check "restricted admits the CNI-mode pod" '^Running$' \
    "$(kubectl get pod -n psa-restricted restricted -o jsonpath='{.status.phase}')"
  check_traffic restricted psa-restricted
  POD_NS=psa-restricted delete_pod restricted
}

# The pod's sandbox id (the ready one).
sandbox_of() { # POD
  crictl pods --name "^$1\$" --namespace "${POD_NS:-meshed}" --state ready -q 2>/dev/null | head -n1
}
# Waits until POD runs in a sandbox other than OLD and is Ready again.
wait_new_sandbox() { # POD OLD-SANDBOX
  local start=$SECONDS now
  while [ $((SECONDS - start)) -lt 120 ]; do
    now="$(sandbox_of "$1")"
    if [ -n "$now" ] && [ "$now" != "$2" ] \
      && kubectl wait --timeout=5s -n "${POD_NS:-meshed}" "pod/$1" --for=condition=Ready >/dev/null 2>&1; then
      log "$1: running in a new sandbox, Ready, $((SECONDS - start))s after the old one stopped"
      return 0
    fi
    sleep 1
  done
  die "$1 did not come back in a new sandbox"
}
# Whether the kubelet (since it started) has finished a first sync ("create") of as many pods
# as are bound to the node: its pod workers' own count (kubelet_pod_worker_duration_seconds).
kubelet_synced_every_pod() {
  local synced bound
  synced="$(kubectl get --raw "/api/v1/nodes/$NODE_NAME/proxy/metrics" 2>/dev/null \
    | awk '/^kubelet_pod_worker_duration_seconds_count\{.*operation_type="create"/ { n += $2 } END { print n + 0 }')"
  bound="$(kubectl get pods -A --field-selector "spec.nodeName=$NODE_NAME" -o name | wc -l)"
  [ "$bound" -gt 0 ] && [ "$synced" -ge "$bound" ]
}
restarts_of() { # POD: each container's restart count
  kubectl get pod -n "${POD_NS:-meshed}" "$1" \
    -o jsonpath='{range .status.initContainerStatuses[*]}{.name}={.restartCount} {end}{range .status.containerStatuses[*]}{.name}={.restartCount} {end}'
}
init_started_at() { # POD
  kubectl get pod -n "${POD_NS:-meshed}" "$1" \
    -o jsonpath='{.status.initContainerStatuses[0].state.terminated.startedAt}'
}

# Restarts, in both modes on the node with meshinit-cni chained: the kubelet restarted
# leaves running pods alone (no init container runs again, nothing restarts) and they stay
# captured; a pod whose sandbox is stopped (`crictl stopp`: CNI DEL, the network namespace
# gone) gets a new one from the kubelet, its init container runs again (CNI mode: ADD
# again, istio-validation passes) and it is captured again; deleted, the pods leave no
# address reserved and no network namespace on the node.
scenario_restarts() {
  node_cni_config with-meshinit
  start_pod cni-r istio-validation < <(cni_pod cni-r)
  start_pod init-r istio-init < <(meshed_pod init-r '[NET_ADMIN, NET_RAW]')
  local pod before_restarts before_init
  declare -A before_restarts=() before_init=()
  for pod in cni-r init-r; do
    before_restarts[$pod]="$(restarts_of "$pod")"
    before_init[$pod]="$(init_started_at "$pod")"
  done
  stop_component kubelet
  log "kubelet stopped; starting it again"
  start_kubelet
  wait_for "node $NODE_NAME (kubelet restarted)" 120 kubelet node_ready
  # "Nothing restarted" is judged once the new kubelet has synced every pod of the node
  # (its first sync of a pod is where it would run an init container again), not after a
  # fixed wait.
  wait_for "the restarted kubelet's first sync of each of the node's pods" 120 kubelet kubelet_synced_every_pod
  for pod in cni-r init-r; do
    check "$pod: after the kubelet's restart, nothing restarted" "^${before_restarts[$pod]}\$" \
      "$(restarts_of "$pod")"
    check "$pod: after the kubelet's restart, the init container did not run again" \
      "^${before_init[$pod]}\$" "$(init_started_at "$pod")"
    check_traffic "$pod"
  done
  local old init_before
  for pod in cni-r init-r; do
    init_before="$(init_started_at "$pod")"
    old="$(sandbox_of "$pod")"
    [ -n "$old" ] || die "no sandbox for $pod"
    crictl stopp "$old" >/dev/null 2>&1 || die "crictl stopp $old failed"
    wait_new_sandbox "$pod" "$old"
    check "$pod: in its new sandbox, its init container ran again (it started at $init_before)" \
      "^[0-9TZ:-]+\$" "$(init_started_at "$pod" | grep -vxF "$init_before")"
    check "$pod: and exited 0" '^0$' \
      "$(kubectl get pod -n meshed "$pod" -o jsonpath='{.status.initContainerStatuses[0].state.terminated.exitCode}')"
    check_traffic "$pod"
  done
  delete_pod cni-r
  delete_pod init-r
  # What is left on the node: the addresses host-local reserved, the network namespaces
  # containerd made: only the vault pod's.
  local ips netns start=$SECONDS
  while :; do
    ips="$(find "$WORK/cni/ipam" -type f -name '203.0.113.*' -printf '%f ')"
    netns="$(find "$WORK/containerd/state/io.containerd.grpc.v1.cri/netns" -mindepth 1 -printf '%f\n' 2>/dev/null | wc -l)"
    if [ "$ips" = "$(pod_ip outside vault) " ] && [ "$netns" = 1 ]; then break; fi
    [ $((SECONDS - start)) -lt 30 ] || break
    sleep 1
  done
  check "deleted pods leave no reserved address (only vault's is)" "^$(pod_ip outside vault) \$" "$ips"
  check "deleted pods leave no network namespace (only vault's is)" '^1$' "$netns"
}

# The uid map of a container's first process, as the node sees it: "0 0 4294967295" in the
# node's own user namespace; a pod with hostUsers: false maps its 0 elsewhere.
uid_map_of() { # NAMESPACE POD CONTAINER
  local pod_id container_id pid
  pod_id="$(crictl pods --namespace "$1" --name "$2" --state ready -q | head -n1)"
  container_id="$(crictl ps -a --pod "$pod_id" --name "$3" -q | head -n1)"
  pid="$(crictl inspect -o go-template --template '{{.info.pid}}' "$container_id")"
  tr -s ' ' <"/proc/$pid/uid_map" | sed 's/^ //'
}

# User namespaces (hostUsers: false; Istio's istio-init broke there, istio/istio#58750), in
# both modes: the pod's containers run in a user namespace of their own, which also owns
# the pod's network namespace; istio-init's NET_ADMIN is that namespace's, and enough.
scenario_user_namespaces() {
  check "the node's runtime handlers support user namespaces (runc with idmapped mounts)" '^true( true)*$' \
    "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.runtimeHandlers[*].features.userNamespaces}')"
  local mode pod init
  for mode in init cni; do
    pod="userns-$mode"
    if [ "$mode" = cni ]; then
      node_cni_config with-meshinit
      init=istio-validation
      start_pod "$pod" "$init" < <(cni_pod "$pod" | sed 's/^spec:$/spec:\n  hostUsers: false/')
    else
      node_cni_config without-meshinit
      init=istio-init
      start_pod "$pod" "$init" < <(meshed_pod "$pod" '[NET_ADMIN, NET_RAW]' | sed 's/^spec:$/spec:\n  hostUsers: false/')
    fi
    check "$pod: the app runs in a user namespace of its own (its uid 0 is not the node's)" \
      '^0 [1-9][0-9]* 65536$' "$(uid_map_of meshed "$pod" app)"
    check_traffic "$pod"
    delete_pod "$pod"
  done
}

# A pod manifest (stdin) as the template of a Deployment of REPLICAS.
as_deployment() { # NAME REPLICAS
  python3 -c 'import sys, yaml
pod = yaml.safe_load(sys.stdin)
name, replicas = sys.argv[1], int(sys.argv[2])
meta = pod["metadata"]
print(yaml.safe_dump({
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": name, "namespace": meta["namespace"]},
    "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
             "template": {"metadata": {"labels": {"app": name},
                                       "annotations": meta.get("annotations", {})},
                          "spec": pod["spec"]}}}))' "$1" "$2"
}

# A node's worth of pods: a Deployment of SCALE_REPLICAS (default 50) in each mode; every
# pod reaches Ready, and every one's app is captured (its connection to Vault reaches its
# own istio-proxy's 15001 with Vault as original destination).
scenario_scale() {
  local replicas="${SCALE_REPLICAS:-50}" mode name manifest start pods pod ip vault bad re
  vault="$(pod_ip outside vault)"
  for mode in init cni; do
    name="scale-$mode"
    if [ "$mode" = cni ]; then
      node_cni_config with-meshinit
      manifest="$(cni_pod "$name" | as_deployment "$name" "$replicas")"
    else
      manifest="$(meshed_pod "$name" '[NET_ADMIN, NET_RAW]' | as_deployment "$name" "$replicas")"
    fi
    start=$SECONDS
    kubectl apply -f - <<<"$manifest" >/dev/null
    if kubectl rollout status -n meshed "deployment/$name" --timeout=600s >/dev/null; then
      check "$name: all $replicas pods Ready ($((SECONDS - start))s)" "^$replicas\$" \
        "$(kubectl get deployment -n meshed "$name" -o jsonpath='{.status.readyReplicas}')"
    else
      check "$name: all $replicas pods Ready within 600s" "^$replicas\$" \
        "$(kubectl get deployment -n meshed "$name" -o jsonpath='{.status.readyReplicas}')"
    fi
    pods="$(kubectl get pods -n meshed -l "app=$name" -o jsonpath='{range .items[*]}{.metadata.name}={.status.podIP}{"\n"}{end}')"
    bad=
    while IFS='=' read -r pod ip; do
      [ -n "$pod" ] || continue
      re="^REPLY by=sidecar:15001 local=127\\.0\\.0\\.1:15001 orig=${vault//./\\.}:8200 client=${ip//./\\.}:[0-9]+\$"
      [[ "$(helper_in meshed "$pod" app client tcp "$vault:8200")" =~ $re ]] || bad="$bad $pod"
    done <<<"$pods"
    check "$name: every pod's app is captured ($(wc -l <<<"$pods") pods checked; not captured:${bad:- none})" \
      '^$' "$bad"
    kubectl delete deployment -n meshed "$name" --wait=true >/dev/null
    kubectl wait --for=delete pod -n meshed -l "app=$name" --timeout=300s >/dev/null 2>&1 || true
  done
}

# The same pod on a node without the plugin: istio-validation finds no capture and exits
# 126, so the app never starts.
scenario_cni_mode_without_plugin() {
  node_cni_config without-meshinit
  cni_pod unplugged | kubectl apply -f - >/dev/null
  check_blocked unplugged istio-validation 126 "traffic is not captured" 'captur'
  delete_pod unplugged
}

# The repository's manifests, applied as a user applies them, adapted to this node by
# adapt.py (local images; istio-proxy and the apps played by the helper roles).
apply_manifest() { # FILE CONTAINER=ROLE...
  python3 "$here/adapt.py" "$repo/manifests/$1" "$MESHINIT_IMAGE" "$HELPER_IMAGE" "${@:2}" \
    | kubectl apply -f - >/dev/null
}
deployment_pod() { # NAMESPACE DEPLOYMENT: its pod (the first)
  kubectl get pods -n "$1" -l "app=$2" -o jsonpath='{.items[0].metadata.name}'
}
rollout() { # NAMESPACE DEPLOYMENT
  local start=$SECONDS
  if ! kubectl rollout status -n "$1" "deployment/$2" --timeout=180s >/dev/null; then
    kubectl describe pods -n "$1" -l "app=$2" >&2
    # (Pods the API server refused, a webhook's refusal among them, are only in events.)
    kubectl get events -n "$1" --field-selector involvedObject.kind=ReplicaSet >&2 || true
    die "deployment $1/$2 did not become available"
  fi
  log "deployment $1/$2 available $((SECONDS - start))s after it was applied"
}

# manifests/namespace.yaml and manifests/deployment.yaml: Istio's injected Deployment with
# meshinit as istio-init (its resources, its read-only root filesystem), istio-proxy as a
# regular container.
scenario_manifests_deployment() {
  kubectl apply -f "$repo/manifests/namespace.yaml" >/dev/null
  # The configMap istio-proxy mounts (istiod publishes it; nothing reads it here).
  kubectl create configmap -n meshed-apps istio-ca-root-cert --from-literal=root-cert.pem= >/dev/null
  apply_manifest deployment.yaml 'hello=serve app tcp:0.0.0.0:80'
  rollout meshed-apps hello
  local pod
  pod="$(deployment_pod meshed-apps hello)"
  check "deployment.yaml: istio-init exit code" '^0$' "$(kubectl get pod -n meshed-apps "$pod" \
    -o jsonpath='{.status.initContainerStatuses[0].state.terminated.exitCode}')"
  check_traffic "$pod" meshed-apps hello 80
}

# manifests/vault-app-native-sidecar.yaml: istio-proxy as a native sidecar, started before
# the app's own init container, whose connection to Vault (198.51.100.30:8200) the sidecar
# must take.
scenario_manifests_vault_native_sidecar() {
  kubectl create configmap -n meshed-apps vault-agent-config >/dev/null
  apply_manifest vault-app-native-sidecar.yaml \
    'vault-agent-init=client tcp 198.51.100.30:8200' 'vault-app=serve app tcp:0.0.0.0:8080'
  rollout meshed-apps vault-app
  local pod ip
  pod="$(deployment_pod meshed-apps vault-app)"
  ip="$(pod_ip meshed-apps "$pod")"
  check "vault-app-native-sidecar.yaml: vault-agent-init (an init container after the native sidecar) reached Vault through istio-proxy's 15001" \
    "^REPLY by=sidecar:15001 local=127\\.0\\.0\\.1:15001 orig=198\\.51\\.100\\.30:8200 client=${ip//./\\.}:[0-9]+$" \
    "$(kubectl logs -n meshed-apps "$pod" -c vault-agent-init | answer)"
  check_traffic "$pod" meshed-apps vault-app 8080
}

# "Vault" outside the pods, where manifests/ put it: 198.51.100.30:8200, on the node (its
# namespace has the address; the pods' default route leads there). Answers as node-vault.
start_node_vault() {
  # (Once per run: later scenarios find it serving.)
  ! grep -qsx ready "$WORK/logs/node-vault.log" || return 0
  ip -n "$NODE_NETNS" addr add 198.51.100.30/32 dev node0
  in_node env MESHINIT_TEST_ROLE="serve node-vault tcp:198.51.100.30:8200" "$HELPER_EXE" \
    support::roles::helper_entrypoint --exact --nocapture --test-threads=1 \
    >"$WORK/logs/node-vault.log" 2>&1 9>&- &
  local _
  for _ in $(seq 50); do
    grep -qx ready "$WORK/logs/node-vault.log" && return 0
    sleep 0.1
  done
  die "the node's Vault did not start: $(cat "$WORK/logs/node-vault.log")"
}

# manifests/vault-app-alternatives.yaml, in CNI mode as it is written: the pods' annotations
# reach meshinit-cni from containerd. vault-app-excluded excludes Vault
# (excludeOutboundPorts 8200, excludeOutboundIPRanges 198.51.100.30/32): its init
# container reaches the node's Vault directly, and the app's other outbound is still
# captured. vault-app-proxy-uid runs that init container as uid 1337: directly too, and the
# pod is captured as any other.
scenario_manifests_vault_alternatives() {
  node_cni_config with-meshinit
  start_node_vault
  apply_manifest vault-app-alternatives.yaml \
    'vault-agent-init=client tcp 198.51.100.30:8200' 'vault-app=serve app tcp:0.0.0.0:8080'
  rollout meshed-apps vault-app-excluded
  rollout meshed-apps vault-app-proxy-uid
  local name pod ip vault p v
  vault="$(pod_ip outside vault)"
  v="${vault//./\\.}"
  for name in vault-app-excluded vault-app-proxy-uid; do
    pod="$(deployment_pod meshed-apps "$name")"
    ip="$(pod_ip meshed-apps "$pod")"
    p="${ip//./\\.}"
    check "$name: vault-agent-init reached the node's Vault directly, not through the sidecar" \
      "^REPLY by=node-vault:8200 local=198\\.51\\.100\\.30:8200 orig=[^ ]+ client=$p:[0-9]+\$" \
      "$(kubectl logs -n meshed-apps "$pod" -c vault-agent-init | answer)"
  done
  pod="$(deployment_pod meshed-apps vault-app-excluded)"
  ip="$(pod_ip meshed-apps "$pod")"
  p="${ip//./\\.}"
  check "vault-app-excluded: the app's connection to port 8200 anywhere goes out directly (excludeOutboundPorts)" \
    "^REPLY by=vault:8200 local=$v:8200 orig=[^ ]+ client=$p:[0-9]+\$" \
    "$(helper_in meshed-apps "$pod" vault-app client tcp "$vault:8200")"
  check "vault-app-excluded: the app's connection to another port is captured by istio-proxy's 15001" \
    "^REPLY by=sidecar:15001 local=127\\.0\\.0\\.1:15001 orig=$v:8300 client=$p:[0-9]+\$" \
    "$(helper_in meshed-apps "$pod" vault-app client tcp "$vault:8300")"
  check "vault-app-excluded: inbound to the app's 8080 is captured by istio-proxy's 15006" \
    "^REPLY by=sidecar:15006 local=$p:15006 orig=$p:8080 client=$v:[0-9]+\$" \
    "$(helper_in outside vault vault client tcp "$ip:8080")"
  check_traffic "$(deployment_pod meshed-apps vault-app-proxy-uid)" meshed-apps vault-app 8080
}

# Every scenario, in this order; K8S_SCENARIOS (names without "scenario_", blank-separated)
# runs only those, in the order given, for work on one of them.
SCENARIOS="init_container_mode init_container_mode_tproxy init_container_without_capabilities
  cni_mode pod_security restarts user_namespaces scale
  cni_mode_without_plugin manifests_deployment manifests_vault_native_sidecar
  manifests_vault_alternatives $ISTIOD_SCENARIOS $ISTIO_OWN_SCENARIOS $AGENT_SCENARIOS"

run_scenarios() {
  ensure_namespaces
  local scenario start
  for scenario in ${K8S_SCENARIOS:-$SCENARIOS}; do
    declare -F "scenario_$scenario" >/dev/null || die "no scenario $scenario (K8S_SCENARIOS)"
    log "scenario $scenario"
    start=$SECONDS
    "scenario_$scenario"
    log "scenario $scenario took $((SECONDS - start))s"
  done
  if [ "$failures" -gt 0 ]; then
    die "$failures check(s) failed"
  fi
  log "every check passed"
}
