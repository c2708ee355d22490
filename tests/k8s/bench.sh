# The node's benchmark (sourced by `run.sh --bench` once the node is Ready, with
# scenarios.sh's pod generators and istio-own.sh's images): the four ways to capture a
# pod's traffic, on the same node in the same run, and the same app with no mesh at all:
#
#   none           the app alone
#   istio-init     Istio's istio-init: pilot-agent istio-iptables (Istio's proxy_init image)
#   meshinit-init  meshinit as istio-init (meshinit's image), Istio's args
#   istio-cni      Istio's CNI plugin (its cni chart's agent installed), istio-validation
#                  Istio's (pilot-agent --run-validation)
#   meshinit-cni   meshinit-cni chained, istio-validation meshinit's
#
# Both plugins are chained at once (bridge, meshinit-cni, istio-cni): the Istio CNI pods
# live in a namespace of their own (ISTIO_BENCH_NS), which meshinit-cni excludes, and
# Istio's agent excludes every other (excludeNamespaces). So each pod pays the other
# plugin's start and early return; the figures of that are printed too.
#
# 1. Pod creation to the app's start: BENCH_PODS rounds (default 21), each one pod of every
#    mode, one at a time, the order turning each round so that no mode always follows
#    another; a round's pods are deleted (and waited for) before the next, so that no CNI
#    DEL runs while a pod starts. t0, the clock before `kubectl create`; t1, the timestamp
#    the runtime gave the app's "ready" line (once its listener is bound), from `kubectl
#    logs --timestamps` (the node's clock is this machine's). p50 and p95 of t1 - t0, ms.
# 2. The capture step, from the kernel's record of each process's exit (exits.py,
#    taskstats), while each pod of 1. started: istio-init's or meshinit's process in its
#    container (parent the containerd shim) and what it ran; the CNI plugin's ADD (parent
#    containerd) and what it ran. CPU time (user + system, the scheduler's, every process
#    of the step), memory peak (the largest high-water RSS among them), processes
#    launched, and for the plugins the wall time per ADD (fork to exit, as the runtime
#    waits for it). p50 over the pods.
# 3. BENCH_SCALE_REPLICAS (default 100) replicas of a Deployment in each capturing mode, one
#    mode after the other, BENCH_SCALE_ROUNDS rounds (default 1), the order turning: seconds
#    from `kubectl apply` until all are Ready; five pods' capture checked with a real
#    connection each.
# shellcheck disable=SC2154 # WORK, here, the images...: run.sh's, scenarios.sh's

ISTIO_BENCH_NS=istio-bench
BENCH_MODES="none istio-init meshinit-init istio-cni meshinit-cni"

plain_pod() { # NAME: the app alone, no mesh
  cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  namespace: meshed
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: $HELPER_IMAGE
    imagePullPolicy: Never
    command: $HELPER_ARGS
    env: [{name: MESHINIT_TEST_NO_PDEATHSIG, value: "1"}, {name: MESHINIT_TEST_ROLE, value: "serve app tcp:0.0.0.0:8080"}]
    securityContext:
      allowPrivilegeEscalation: false
      capabilities: {drop: [ALL]}
      runAsNonRoot: true
      runAsUser: 1000
      runAsGroup: 1000
EOF
}

bench_ns() { # MODE
  if [ "$1" = istio-cni ]; then echo "$ISTIO_BENCH_NS"; else echo meshed; fi
}
bench_manifest() { # MODE NAME: the same pod in each mode
  case "$1" in
    none) plain_pod "$2" ;;
    istio-init)
      INIT_IMAGE="$ISTIO_INIT_IMAGE" INIT_RESOURCES="$ISTIO_INIT_RESOURCES" meshed_pod "$2" '[NET_ADMIN, NET_RAW]' ;;
    meshinit-init) meshed_pod "$2" '[NET_ADMIN, NET_RAW]' ;;
    istio-cni) POD_NS="$ISTIO_BENCH_NS" INIT_IMAGE="$ISTIO_INIT_IMAGE" INIT_RESOURCES="$ISTIO_INIT_RESOURCES" cni_pod "$2" ;;
    meshinit-cni) cni_pod "$2" ;;
  esac
}

# Creates MODE's pod NAME, waits until Ready; prints "MS T0 T-END": the milliseconds from
# creation to the app's ready line, and the window (epoch seconds) the capture step ran in.
bench_one() { # MODE NAME
  local mode="$1" name="$2" ns manifest t0 t1 tend
  ns="$(bench_ns "$mode")"
  manifest="$(bench_manifest "$mode" "$name")"
  t0="$(date +%s.%N)"
  kubectl create -f - <<<"$manifest" >/dev/null
  kubectl wait --timeout=120s -n "$ns" "pod/$name" --for=condition=Ready >/dev/null \
    || die "bench: pod $name ($mode) did not become Ready: $(kubectl describe pod -n "$ns" "$name" | tail -n 30)"
  tend="$(date +%s.%N)"
  t1="$(kubectl logs -n "$ns" "$name" -c app --timestamps | awk '$2 == "ready" { print $1; exit }')"
  [ -n "$t1" ] || die "bench: no ready line from $name's app"
  python3 -c 'import sys, datetime
t0 = float(sys.argv[1])
ts = sys.argv[2].rstrip("Z")
whole, _, frac = ts.partition(".")
t1 = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc).timestamp()
t1 += float("0." + (frac or "0"))
print(round((t1 - t0) * 1000), sys.argv[1], sys.argv[3])' "$t0" "$t1" "$tend"
}

# Both plugins chained, Istio's agent installed (its chart, as istio-own.sh installs it,
# with every namespace but ISTIO_BENCH_NS excluded).
bench_setup() {
  istio_images
  mkdir -p "$WORK/helm"
  kubectl get namespace "$ISTIO_BENCH_NS" >/dev/null 2>&1 || kubectl create namespace "$ISTIO_BENCH_NS" >/dev/null
  MESHINIT_CNI_EXCLUDE="[\"kube-system\", \"$ISTIO_BENCH_NS\"]" node_cni_config with-meshinit
  agent_service_rule -A
  {
    istio_cni_values
    echo "excludeNamespaces: [kube-system, istio-system, meshed, outside]"
  } >"$WORK/istio-cni-values.yaml"
  helm install "$ISTIO_CNI_RELEASE" "$(istio_charts)/istio-cni" -n "$ISTIO_NS" --create-namespace \
    -f "$WORK/istio-cni-values.yaml" --wait --timeout 3m >"$WORK/logs/helm-istio-cni.log" 2>&1 \
    || die "helm install $ISTIO_CNI_RELEASE failed: $(cat "$WORK/logs/helm-istio-cni.log")"
  wait_until 30 bench_chain_ready >/dev/null || die "bench: the conflist is not bridge meshinit-cni istio-cni: $(conflist_types)"
  wait_for "containerd's CNI configuration (both plugins)" 30 containerd bench_chain_loaded
}
bench_chain_ready() { [ "$(conflist_types)" = "bridge meshinit-cni istio-cni" ]; }
bench_chain_loaded() { [[ " $(loaded_cni_types) " == *" bridge meshinit-cni istio-cni "* ]]; }

run_bench() {
  local rounds="${BENCH_PODS:-21}" i mode order out ms t0 tend exits watcher
  if [ -n "${BENCH_SCALE_ONLY:-}" ]; then
    run_scale_phases
    return
  fi
  bench_setup
  declare -A starts=() windows=()
  exits="$WORK/exits.jsonl"
  python3 "$here/exits.py" "$exits" >"$WORK/logs/exits.out" 2>&1 9>&- &
  watcher=$!
  wait_until 10 grep -qx ready "$WORK/logs/exits.out" >/dev/null || die "exits.py did not start: $(cat "$WORK/logs/exits.out")"
  log "bench: $rounds rounds, one pod of each mode ($BENCH_MODES) each, one at a time"
  order="$BENCH_MODES"
  for i in $(seq "$rounds"); do
    for mode in $order; do
      out="$(bench_one "$mode" "b-$mode-$i")"
      read -r ms t0 tend <<<"$out"
      starts[$mode]+="$ms "
      windows[$mode]+="$t0:$tend "
    done
    for mode in $order; do
      kubectl delete pod -n "$(bench_ns "$mode")" "b-$mode-$i" --wait=false >/dev/null
    done
    for mode in $order; do
      kubectl wait --for=delete -n "$(bench_ns "$mode")" "pod/b-$mode-$i" --timeout=120s >/dev/null 2>&1 || true
    done
    # The next round starts with the mode after this round's first.
    order="${order#* } ${order%% *}"
  done
  kill -TERM "$watcher"
  wait "$watcher" 2>/dev/null || true

  local load
  load="$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "== pod creation to the app's start (ms), $rounds pods of each mode, $(nproc) cores, load average $load"
  for mode in $BENCH_MODES; do
    python3 -c 'import statistics, sys
mode, v = sys.argv[1], sorted(int(x) for x in sys.argv[2].split())
q = statistics.quantiles(v, n=20, method="inclusive")
print(f"  {mode:14} p50 {statistics.median(v):6.0f}  p95 {q[18]:6.0f}  min {v[0]:6}  max {v[-1]:6}  n {len(v)}")' \
      "$mode" "${starts[$mode]}"
  done
  echo "== the capture step, per pod (p50 over the pods; from the kernel's exit records)"
  for mode in $BENCH_MODES; do
    [ "$mode" != none ] || continue
    python3 "$here/exits-report.py" "$exits" "$mode" "${windows[$mode]}" \
      || log "bench: $mode's capture step was not found in every pod's window (see its line)"
  done
  echo "== the other plugin's start and early return, per pod (p50), paid by every pod"
  python3 "$here/exits-report.py" "$exits" skip-istio-cni "${windows[none]} ${windows[istio-init]} ${windows[meshinit-init]} ${windows[meshinit-cni]}"
  python3 "$here/exits-report.py" "$exits" skip-meshinit-cni "${windows[none]} ${windows[istio-init]} ${windows[meshinit-init]} ${windows[istio-cni]}"

  local scale_rounds="${BENCH_SCALE_ROUNDS:-1}" took
  declare -A scaled=()
  echo "== ${BENCH_SCALE_REPLICAS:-100} replicas of a Deployment, from apply to all Ready, $scale_rounds round(s), the order turning"
  order="istio-init meshinit-init istio-cni meshinit-cni"
  for i in $(seq "$scale_rounds"); do
    for mode in $order; do
      took="$(bench_scale "$mode")"
      scaled[$mode]+="$took "
    done
    order="${order#* } ${order%% *}"
  done
  for mode in istio-init meshinit-init istio-cni meshinit-cni; do
    echo "  $(printf '%-14s' "$mode") seconds to all Ready, each round: ${scaled[$mode]}"
  done
  echo "== $(date -u '+%F %H:%M UTC'), load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
}

bench_scale() { # MODE
  local mode="$1" replicas="${BENCH_SCALE_REPLICAS:-100}" ns name start took ready vault pod ip bad="" re
  ns="$(bench_ns "$mode")"
  name="scale-$mode"
  vault="$(pod_ip outside vault)"
  start=$SECONDS
  bench_manifest "$mode" "$name" | as_deployment "$name" "$replicas" | kubectl apply -f - >/dev/null
  kubectl rollout status -n "$ns" "deployment/$name" --timeout=900s >/dev/null || true
  took=$((SECONDS - start))
  ready="$(kubectl get deployment -n "$ns" "$name" -o jsonpath='{.status.readyReplicas}')"
  # A few of them captured (a real connection from the app to Vault reaches istio-proxy).
  while IFS='=' read -r pod ip; do
    [ -n "$pod" ] || continue
    re="^REPLY by=sidecar:15001 local=127\\.0\\.0\\.1:15001 orig=${vault//./\\.}:8200 client=${ip//./\\.}:[0-9]+\$"
    [[ "$(helper_in "$ns" "$pod" app client tcp "$vault:8200")" =~ $re ]] || bad="$bad $pod"
  done < <(kubectl get pods -n "$ns" -l "app=$name" -o jsonpath='{range .items[*]}{.metadata.name}={.status.podIP}{"\n"}{end}' | shuf -n 5)
  log "bench: $mode: ${took} s to ${ready:-0}/$replicas Ready; 5 sampled pods captured: $([ -z "$bad" ] && echo yes || echo "no:$bad")"
  [ "${ready:-0}" = "$replicas" ] && [ -z "$bad" ] || die "bench: $name: ${ready:-0}/$replicas Ready, not captured:${bad:- none}"
  kubectl delete deployment -n "$ns" "$name" --wait=true >/dev/null
  kubectl wait --for=delete pod -n "$ns" -l "app=$name" --timeout=600s >/dev/null 2>&1 || true
  echo "$took"
}

# `BENCH_SCALE_ONLY=1 run.sh --bench`: only the 100-replica Deployments, BENCH_SCALE_ROUNDS
# rounds (default 2) of both modes, the order rotated each round, each on a node left quiet for BENCH_SCALE_SETTLE seconds (default 20) after the
# previous Deployment's pods are gone (the kernel tears down their network namespaces
# after the API server has forgotten them). For each: the time to all Ready, and, per pod,
# where it went (from the pod's conditions and container states, to the second; medians and
# 90th percentiles over the pods): sandbox (creation to PodReadyToStartContainers: the
# runtime's sandbox, CNI ADD included), init (its init container's run), app (init done to
# Ready); the kubelet's RunPodSandbox time (its runtime_operations histogram, mean over the
# Deployment); and in CNI mode each ADD's own elapsed_ms, from meshinit-cni's log line
# (containerd passes a plugin's stderr to its own).
scale_phases() { # NAME: per-pod phases of the Deployment's pods, as one line
  kubectl get pods -n meshed -l "app=$1" -o json | python3 -c 'import json, sys, datetime, statistics
t = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
phases = {"sandbox": [], "init": [], "app": []}
for pod in json.load(sys.stdin)["items"]:
    cond = {c["type"]: t(c["lastTransitionTime"]) for c in pod["status"].get("conditions", [])}
    created = t(pod["metadata"]["creationTimestamp"])
    init = pod["status"]["initContainerStatuses"][0]["state"].get("terminated", {})
    if "PodReadyToStartContainers" not in cond or not init or "Ready" not in cond:
        continue
    phases["sandbox"].append(cond["PodReadyToStartContainers"] - created)
    phases["init"].append(t(init["finishedAt"]) - t(init["startedAt"]))
    phases["app"].append(cond["Ready"] - cond["Initialized"])
def q(v):
    v = sorted(v)
    return f"median {statistics.median(v):4.1f}s p90 {v[int(len(v) * 0.9)]:4.1f}s max {v[-1]:4.0f}s"
print("; ".join(f"{k} {q(v)}" for k, v in phases.items() if v))'
}
sandbox_histogram() { # prints "SUM COUNT" of the kubelet's run_podsandbox operations so far
  kubectl get --raw "/api/v1/nodes/$NODE_NAME/proxy/metrics" | awk '
    /^kubelet_runtime_operations_duration_seconds_sum\{operation_type="run_podsandbox"\}/ { s = $2 }
    /^kubelet_runtime_operations_duration_seconds_count\{operation_type="run_podsandbox"\}/ { c = $2 }
    END { print s + 0, c + 0 }'
}
run_scale_phases() {
  local replicas="${BENCH_SCALE_REPLICAS:-100}" rounds="${BENCH_SCALE_ROUNDS:-2}" round mode name manifest start took before after log_from
  log "bench: $replicas replicas per Deployment, $rounds rounds, the modes' order rotated each round"
  local modes="init cni" plugin
  # BENCH_SCALE_PLUGIN=PATH: CNI mode once more per round with PATH as the plugin (cni-alt).
  plugin="$(readlink "$WORK/cni/bin/meshinit-cni")"
  [ -z "${BENCH_SCALE_PLUGIN:-}" ] || modes="init cni cni-alt"
  for round in $(seq "$rounds"); do
    # The order rotates each round, so that no mode always follows the same one.
    for mode in $(python3 -c 'import sys; m = sys.argv[2].split(); r = int(sys.argv[1]) - 1; print(*(m[r % len(m):] + m[:r % len(m)]))' "$round" "$modes"); do
      name="phases-$mode-$round"
      ln -sfn "$plugin" "$WORK/cni/bin/meshinit-cni"
      [ "$mode" != cni-alt ] || ln -sfn "$BENCH_SCALE_PLUGIN" "$WORK/cni/bin/meshinit-cni"
      if [ "${mode%-alt}" = cni ]; then
        node_cni_config with-meshinit
        manifest="$(cni_pod "$name" | as_deployment "$name" "$replicas")"
      else
        node_cni_config without-meshinit
        manifest="$(meshed_pod "$name" '[NET_ADMIN, NET_RAW]' | as_deployment "$name" "$replicas")"
      fi
      sleep "${BENCH_SCALE_SETTLE:-20}"
      before="$(sandbox_histogram)"
      log_from=$(($(wc -l <"$WORK/logs/containerd.log") + 1))
      local load
      load="$(cut -d' ' -f1-3 /proc/loadavg)"
      start=$(date +%s.%N)
      kubectl apply -f - <<<"$manifest" >/dev/null
      kubectl rollout status -n meshed "deployment/$name" --timeout=600s >/dev/null \
        || die "bench: deployment $name did not become Ready"
      took="$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")"
      after="$(sandbox_histogram)"
      echo "round $round, $mode: all $replicas Ready in ${took}s (load average at the start $load)"
      echo "  per pod: $(scale_phases "$name")"
      python3 -c 'import sys
(s0, c0), (s1, c1) = (map(float, a.split()) for a in sys.argv[1:3])
print(f"  kubelet RunPodSandbox: mean {1000 * (s1 - s0) / max(c1 - c0, 1):.0f} ms over {c1 - c0:.0f}")' "$before" "$after"
      if [ "${mode%-alt}" = cni ]; then
        tail -n "+$log_from" "$WORK/logs/containerd.log" | grep -o 'applied backend=[^ ]*.*elapsed_ms=[0-9]*' \
          | sed 's/.*elapsed_ms=//' | python3 -c 'import sys, statistics
v = sorted(int(x) for x in sys.stdin)
if v: print(f"  meshinit-cni ADD (its own elapsed_ms): {len(v)} ADDs, median {statistics.median(v):.0f} ms, p90 {v[int(len(v) * 0.9)]} ms, max {v[-1]} ms")'
      fi
      kubectl delete deployment -n meshed "$name" --wait=true >/dev/null
      kubectl wait --for=delete pod -n meshed -l "app=$name" --timeout=300s >/dev/null 2>&1 || true
    done
  done
  ln -sfn "$plugin" "$WORK/cni/bin/meshinit-cni"
}
