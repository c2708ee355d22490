# The node's benchmarks (sourced by `run.sh --bench` once the node is Ready, with
# scenarios.sh's pod generators): from the pod's creation to its app's start, for the same
# app with no mesh at all, in init-container mode (meshinit as istio-init) and in CNI mode
# (meshinit-cni chained, istio-validation as the init container).
#
# BENCH_PODS pods of each (default 21), one at a time, the modes taking turns, so that a
# drift in the machine's load spreads over all three. For each pod: t0, the clock just
# before `kubectl create`; t1, the timestamp the runtime gave the app's "ready" line (printed
# once its listener is bound), read with `kubectl logs --timestamps` (nanoseconds, the
# node's clock, which is this machine's). Reported: median and quartiles of t1 - t0, in ms.

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

bench_one() { # MODE NAME: prints the milliseconds from creation to the app's ready line
  local mode="$1" name="$2" manifest t0 t1
  case "$mode" in
    none) manifest="$(plain_pod "$name")" ;;
    init) manifest="$(meshed_pod "$name" '[NET_ADMIN, NET_RAW]')" ;;
    cni) manifest="$(cni_pod "$name")" ;;
  esac
  t0="$(date +%s.%N)"
  kubectl create -f - <<<"$manifest" >/dev/null
  kubectl wait --timeout=120s -n meshed "pod/$name" --for=condition=Ready >/dev/null \
    || die "bench: pod $name ($mode) did not become Ready"
  t1="$(kubectl logs -n meshed "$name" -c app --timestamps | awk '$2 == "ready" { print $1; exit }')"
  [ -n "$t1" ] || die "bench: no ready line from $name's app"
  kubectl delete pod -n meshed "$name" --wait=false >/dev/null
  python3 -c 'import sys, datetime
t0 = float(sys.argv[1])
ts = sys.argv[2].rstrip("Z")
whole, _, frac = ts.partition(".")
t1 = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc).timestamp()
t1 += float("0." + (frac or "0"))
print(round((t1 - t0) * 1000))' "$t0" "$t1"
}

# meshinit's init container under the kubelet's own cgroups (cgroup v1, the cgroupfs
# driver). Its CPU time: the container's cgroup goes soon after it exits, but its pod's
# stays and counts dead children's CPU time (cpuacct is hierarchical); between istio-init's
# exit and the app's start (the kubelet's next relist, most of a second) only the pause
# container and istio-init have run in the pod, so istio-init's is the pod's cpuacct.usage
# less the pause container's. Its memory peak: memory.max_usage_in_bytes of its own cgroup,
# read over and over while it exists (it only grows; the last reading is taken after the
# container exits, before the runtime removes the cgroup). Both count runc's init, which
# runs in the container's cgroup before it execs meshinit, as the podman figures do. Prints
# "PEAK-KIB CPU-MS", or nothing if the app started before the reading (the pod is then left
# out).
watch_peaks() { # POD-MEMORY-CGROUP STOP-FILE: prints "CGROUP PEAK-BYTES" for each child seen
  declare -A peak=()
  local dir value
  while [ ! -e "$2" ]; do
    for dir in "$1"/*/; do
      read -r value 2>/dev/null <"${dir}memory.max_usage_in_bytes" || continue
      [ "$value" -gt "${peak[$dir]:-0}" ] && peak[$dir]=$value
    done
  done
  for dir in "${!peak[@]}"; do echo "$(basename "$dir") ${peak[$dir]}"; done
}

init_resources() { # POD
  local pod="$1" uid qos code="" _ pod_mem pod_cpu pause_id app cpu pause_cpu peak stop watcher
  uid="$(kubectl get pod -n meshed "$pod" -o jsonpath='{.metadata.uid}')"
  qos="$(kubectl get pod -n meshed "$pod" -o jsonpath='{.status.qosClass}' | tr '[:upper:]' '[:lower:]')"
  pod_mem="/sys/fs/cgroup/memory/$CGROUP_ROOT/kubepods/$qos/pod$uid"
  pod_cpu="/sys/fs/cgroup/cpuacct/$CGROUP_ROOT/kubepods/$qos/pod$uid"
  stop="$WORK/$pod.stop"
  watch_peaks "$pod_mem" "$stop" >"$WORK/$pod.peaks" &
  watcher=$!
  for _ in $(seq 400); do
    code="$(kubectl get pod -n meshed "$pod" -o jsonpath='{.status.initContainerStatuses[0].state.terminated.exitCode}')"
    [ -n "$code" ] && break
    sleep 0.02
  done
  pause_id="$(crictl pods --namespace meshed --name "$pod" -q | head -n1)"
  cpu="$(cat "$pod_cpu/cpuacct.usage")"
  pause_cpu="$(cat "$pod_cpu/$pause_id/cpuacct.usage")"
  app="$(kubectl get pod -n meshed "$pod" -o jsonpath='{.status.containerStatuses[?(@.name=="app")].state.running}')"
  touch "$stop"
  wait "$watcher"
  [ "$code" = 0 ] && [ -z "$app" ] || return 0
  # The peak of the one child that is not the pause container (nor the app: not started).
  peak="$(awk -v pause="$pause_id" '$1 != pause { print $2 }' "$WORK/$pod.peaks" | sort -n | tail -n1)"
  [ -n "$peak" ] || return 0
  echo "$((peak / 1024)) $(((cpu - pause_cpu) / 1000000))"
}

# BENCH_RESOURCE_PODS init-container-mode pods (default 21), one at a time: meshinit's
# memory peak and CPU time as istio-init, against the manifests' requests and limits.
run_resources() {
  local pods="${BENCH_RESOURCE_PODS:-21}" i name out peaks="" cpus=""
  node_cni_config without-meshinit
  for i in $(seq "$pods"); do
    name="res-$i"
    kubectl create -f - <<<"$(meshed_pod "$name" '[NET_ADMIN, NET_RAW]')" >/dev/null
    out="$(init_resources "$name")"
    if [ -n "$out" ]; then
      peaks+="${out% *} "
      cpus+="${out#* } "
    fi
    kubectl delete pod -n meshed "$name" --wait=true >/dev/null
  done
  echo "istio-init (meshinit's image) under the kubelet's cgroups, $(wc -w <<<"$peaks") of $pods pods read before the app started (requests: cpu 10m, memory 16Mi; limits: cpu 1, memory 16Mi):"
  python3 -c 'import statistics, sys
for what, unit, values in (("memory peak", "KiB", sys.argv[1]), ("CPU time", "ms", sys.argv[2])):
    v = sorted(int(x) for x in values.split())
    q1, median, q3 = statistics.quantiles(v, n=4)
    print(f"  {what:26} median {median:6.0f} {unit}  quartiles {q1:6.0f} {q3:6.0f}  min {v[0]:6}  max {v[-1]:6}")' \
    "$peaks" "$cpus"
}

run_bench() {
  local pods="${BENCH_PODS:-21}" i mode
  if [ -n "${BENCH_SCALE_ONLY:-}" ]; then
    run_scale_phases
    return
  fi
  node_cni_config with-meshinit
  declare -A results=([none]="" [init]="" [cni]="")
  log "bench: $pods pods of each mode, one at a time, the modes taking turns"
  for i in $(seq "$pods"); do
    for mode in none init cni; do
      results[$mode]+="$(bench_one "$mode" "bench-$mode-$i") "
    done
  done
  kubectl wait --for=delete pod -n meshed --all --timeout=120s >/dev/null 2>&1 || true
  echo "pod creation to the app's start (ms), $pods pods each, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg):"
  run_resources
  # A node's worth of pods: BENCH_SCALE_REPLICAS (default 100) of a Deployment in each
  # mode, all Ready and every one captured; the time each took is in its line.
  passes=0 failures=0
  SCALE_REPLICAS="${BENCH_SCALE_REPLICAS:-100}" scenario_scale
  [ "$failures" = 0 ] || die "bench: the scaled Deployments did not all become Ready and captured"
  unset passes # the benchmark's output is its figures, not a count of checks
  for mode in none init cni; do
    python3 -c 'import statistics, sys
mode, values = sys.argv[1], sorted(int(v) for v in sys.argv[2].split())
q1, median, q3 = statistics.quantiles(values, n=4)
print(f"  {mode:5} median {median:6.0f}  quartiles {q1:6.0f} {q3:6.0f}  min {values[0]:6}  max {values[-1]:6}")' \
      "$mode" "${results[$mode]}"
  done
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
