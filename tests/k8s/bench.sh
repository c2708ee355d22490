# The pod-start benchmark (sourced by `run.sh --bench` once the node is Ready, with
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

run_bench() {
  local pods="${BENCH_PODS:-21}" i mode
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
  for mode in none init cni; do
    python3 -c 'import statistics, sys
mode, values = sys.argv[1], sorted(int(v) for v in sys.argv[2].split())
q1, median, q3 = statistics.quantiles(values, n=4)
print(f"  {mode:5} median {median:6.0f}  quartiles {q1:6.0f} {q3:6.0f}  min {values[0]:6}  max {values[-1]:6}")' \
      "$mode" "${results[$mode]}"
  done
}
