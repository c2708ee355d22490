# shellcheck shell=bash
# Running pods' capture, checked and repaired by the node agent (sourced by agent.sh; see
# docs/cni-agent.md "Running pods"). Each scenario installs the chart with a short sweep
# interval, starts from the node without meshinit-cni and puts back what it found.
# shellcheck disable=SC2154 # WORK, HELPER_EXE, NODE_NAME...: run.sh's
#   - agent_capture: a CNI-mode pod, checked and recorded captured; its nat OUTPUT flushed
#     inside its namespace → its outbound bypasses the sidecar, then the agent repairs it
#     within the bound (interval + a check), the rules exactly as planned, an Event; its
#     excludeOutboundPorts changed while connections both configurations capture run → the
#     new rules within the bound, none of those connections bypassed; a bad value → an
#     Event naming the annotation and the value, the pod's tables unchanged; an
#     init-container-mode pod checked against istio-init's arguments, its flushed rules
#     reported and left.
#   - agent_capture_kill: the agent and the ADD it runs killed (SIGKILL) as the ADD of a
#     long change starts → the pod holds the old rules or the new ones, nothing between;
#     the restarted agent converges it.
#   - agent_capture_sweep: the node filled to its 110 pods, all but a few meshed CNI-mode
#     pods: one sweep's wall and CPU time and the agent's memory (written to
#     $AGENT_SWEEP_FIGURES when set: tests/k8s/agent-sweep-figures.sh puts them in docs/).

# The sweep interval in these scenarios, and the bound for flushed rules it gives: the
# interval, one check and one repair (each well under a second), and the polling.
CAPTURE_INTERVAL=3
CAPTURE_BOUND_MS=$(((CAPTURE_INTERVAL + 2) * 1000))
PORTS_ANNOTATION=traffic.sidecar.istio.io/excludeOutboundPorts

pod_pid() { # POD: the node's PID of a process of the pod's sandbox
  crictl inspectp "$(sandbox_of "$1")" | python3 -c 'import json, sys; print(json.load(sys.stdin)["info"]["pid"])'
}
in_pod_net() { # PID COMMAND...: in the pod's network namespace, from the node
  local pid="$1"
  shift
  in_node nsenter --target "$pid" --net -- "$@"
}
# meshinit's part of the pod's nat table.
pod_nat() { in_pod_net "$1" iptables-nft-save -t nat | grep ISTIO || true; }
# Every table of the pod, without counters.
pod_tables() { in_pod_net "$1" iptables-nft-save | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//'; }
nat_is() { [ "$(pod_nat "$1")" = "$2" ]; }
nat_has() { pod_nat "$1" | grep -qF -- "$2"; }
# One connection from inside the pod's namespace, as root (captured as the app's are).
pod_connect() { # PID TARGET
  in_pod_net "$1" env MESHINIT_TEST_NO_PDEATHSIG=1 MESHINIT_TEST_ROLE="client tcp $2" "$HELPER_EXE" \
    support::roles::helper_entrypoint --exact --nocapture --test-threads=1 2>/dev/null | answer
}
# Connections in a loop until connections_stop; each answer line in FILE.
connections_start() { # PID TARGET FILE
  rm -f "$3" "$3.stop"
  (while [ ! -e "$3.stop" ]; do pod_connect "$1" "$2"; done) >"$3" 2>/dev/null &
  connections_pid=$!
}
connections_stop() { # FILE: prints "N made, M bypassed" (bypassed: not answered by 15001)
  touch "$1.stop"
  wait "$connections_pid" 2>/dev/null || true
  echo "$(grep -c . "$1") made, $(grep -vc 'by=sidecar:15001' "$1") bypassed"
}
capture_state() { # POD: the state the agent recorded (meshinit.io/capture)
  kubectl get pod -n meshed "$1" -o jsonpath='{.metadata.annotations.meshinit\.io/capture}' \
    | python3 -c 'import json, sys
try:
    print(json.load(sys.stdin)["state"])
except Exception:
    print("none")'
}
capture_state_is() { [ "$(capture_state "$1")" = "$2" ]; }
capture_events() { # POD REASON: the messages of the pod's Events with that reason
  kubectl get events -n meshed --field-selector "involvedObject.name=$1,reason=$2" \
    -o jsonpath='{range .items[*]}{.message}{"\n"}{end}'
}
pod_has_event() { [ -n "$(capture_events "$1" "$2")" ]; }
within_bound() { # MS: "ok MS" when a number within CAPTURE_BOUND_MS
  if [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -le "$CAPTURE_BOUND_MS" ]; then echo "ok $1"; else echo "over: $1"; fi
}
agent_metric() { agent_get /metrics | grep -v '^#' | grep -F "$1 " | awk '{print $2}'; }

capture_setup() { # POD: the agent installed with the short interval, and a CNI-mode pod
  agent_image
  agent_save_node
  agent_install --set capture.intervalSeconds="$CAPTURE_INTERVAL"
  agent_wait_ready
  wait_for "containerd's CNI configuration (the agent's entry)" 30 containerd cni_config_is with-meshinit
  start_pod "$1" istio-validation < <(cni_pod "$1")
  local took
  took="$(wait_until 30 capture_state_is "$1" captured)"
  check "capture: the agent checked the running pod $1 and recorded it captured (ms)" '^[0-9]+$' "$took"
}
capture_teardown() { # POD
  delete_pod "$1"
  helm uninstall "$AGENT_RELEASE" -n kube-system --wait --timeout 60s >/dev/null
  wait_until 60 agent_gone >/dev/null || die "the agent's pod did not go away"
  agent_restore
}

scenario_agent_capture() {
  capture_setup capture
  local pid vault planned took before counts
  pid="$(pod_pid capture)"
  vault="$(pod_ip outside vault)"
  planned="$(pod_nat "$pid")"

  # Flushed inside the pod: uncaptured until the agent's next sweep repairs it.
  in_pod_net "$pid" iptables-nft -t nat -F OUTPUT
  check "capture: nat OUTPUT flushed, the pod's connection to $vault:8300 bypasses the sidecar" \
    '^(FAIL|REPLY by=vault)' "$(pod_connect "$pid" "$vault:8300")"
  took="$(wait_until 30 nat_is "$pid" "$planned")"
  check "capture: the flushed rules are back exactly as planned within ${CAPTURE_BOUND_MS} ms (interval ${CAPTURE_INTERVAL} s + a check)" \
    '^ok ' "$(within_bound "$took")"
  connections_start "$pid" "$vault:8300" "$WORK/capture-after-repair"
  sleep 2
  check "capture: after the repair, connections are captured" '^[1-9][0-9]* made, 0 bypassed$' \
    "$(connections_stop "$WORK/capture-after-repair")"
  wait_until 10 pod_has_event capture MeshinitCaptureRepaired >/dev/null || true
  check "capture: an Event on the pod says it was repaired, and why" \
    'capture rules differed from the plan \(drift\): .*OUTPUT.*re-applied' \
    "$(capture_events capture MeshinitCaptureRepaired)"
  check "capture: counted in meshinit_cni_capture_repaired_total{cause=\"drift\"}" '^[1-9]' \
    "$(agent_metric 'meshinit_cni_capture_repaired_total{cause="drift"}')"

  # A live annotation change, while connections both configurations capture run.
  connections_start "$pid" "$vault:8300" "$WORK/capture-during-change"
  sleep 1
  kubectl annotate pod -n meshed capture "$PORTS_ANNOTATION=8200" --overwrite >/dev/null
  took="$(wait_until 30 nat_has "$pid" '--dport 8200 -j RETURN')"
  sleep 1
  counts="$(connections_stop "$WORK/capture-during-change")"
  check "capture: excludeOutboundPorts=8200 reaches the pod's rules within ${CAPTURE_BOUND_MS} ms, without a restart" \
    '^ok ' "$(within_bound "$took")"
  check "capture: connections to $vault:8300 (captured before and after) made during the change: none bypassed" \
    '^[1-9][0-9]* made, 0 bypassed$' "$counts"
  check "capture: now the pod's connection to $vault:8200 goes out directly" \
    "^REPLY by=vault:8200 " "$(pod_connect "$pid" "$vault:8200")"
  check "capture: and to $vault:8300 is still captured" "^REPLY by=sidecar:15001 " "$(pod_connect "$pid" "$vault:8300")"
  check "capture: the pod restarted nothing" '^0$' \
    "$(kubectl get pod -n meshed capture -o jsonpath='{.status.containerStatuses[0].restartCount}')"
  wait_until 10 pod_has_event capture MeshinitCaptureUpdated >/dev/null || true
  check "capture: an Event says the new annotations were applied" 'differed from the plan \(annotations\)' \
    "$(capture_events capture MeshinitCaptureUpdated)"

  # A bad value: the rules stay, the Event names the annotation and the value.
  wait_until 10 capture_state_is capture captured >/dev/null || true
  before="$(pod_tables "$pid")"
  kubectl annotate pod -n meshed capture "$PORTS_ANNOTATION=8200,80x" --overwrite >/dev/null
  took="$(wait_until 30 pod_has_event capture MeshinitCaptureInvalid)"
  check "capture: a bad excludeOutboundPorts is reported in an Event within ${CAPTURE_BOUND_MS} ms" '^ok ' "$(within_bound "$took")"
  check "capture: the Event names the annotation and the value, and says the rules are left" \
    "invalid value \"8200,80x\" for annotation $PORTS_ANNOTATION.*left as they are" \
    "$(capture_events capture MeshinitCaptureInvalid)"
  sleep "$CAPTURE_INTERVAL"
  check "capture: the pod's tables are unchanged after a sweep" '^unchanged$' \
    "$(if [ "$(pod_tables "$pid")" = "$before" ]; then echo unchanged; else diff <(echo "$before") <(pod_tables "$pid"); fi)"
  check "capture: the pod's recorded state is invalid" '^invalid$' "$(capture_state capture)"
  check "capture: meshinit_cni_capture_failed_total{reason=\"invalid\"}" '^[1-9]' \
    "$(agent_metric 'meshinit_cni_capture_failed_total{reason="invalid"}')"

  # An init-container-mode pod: checked against istio-init's arguments, reported, left.
  start_pod capture-init istio-init < <(meshed_pod capture-init '[NET_ADMIN, NET_RAW]')
  took="$(wait_until 30 capture_state_is capture-init captured)"
  check "capture: an init-container-mode pod checked against istio-init's arguments, recorded captured (ms)" '^[0-9]+$' "$took"
  local init_pid
  init_pid="$(pod_pid capture-init)"
  in_pod_net "$init_pid" iptables-nft -t nat -F OUTPUT
  took="$(wait_until 30 pod_has_event capture-init MeshinitCaptureDrifted)"
  check "capture: its flushed rules are reported within ${CAPTURE_BOUND_MS} ms" '^ok ' "$(within_bound "$took")"
  check "capture: the Event names the difference and says it is only reported" \
    "missing \`-j ISTIO_OUTPUT\`.*init-container mode: reported only" "$(capture_events capture-init MeshinitCaptureDrifted)"
  sleep "$CAPTURE_INTERVAL"
  check "capture: its rules are left as they are (still flushed after a sweep)" '^flushed$' \
    "$(nat_has "$init_pid" '-A OUTPUT' && echo repaired || echo flushed)"
  # Opted in (capture.repairInitContainerPods): re-applied with istio-init's arguments.
  helm upgrade "$AGENT_RELEASE" "$repo/charts/meshinit-cni" -n kube-system --reuse-values \
    --set capture.repairInitContainerPods=true >"$WORK/logs/helm-agent-init-repair.log" 2>&1 \
    || die "helm upgrade failed: $(cat "$WORK/logs/helm-agent-init-repair.log")"
  took="$(wait_until 90 nat_has "$init_pid" '-A OUTPUT -j ISTIO_OUTPUT')"
  check "capture: with capture.repairInitContainerPods, its flushed rules are re-applied (ms after the helm upgrade)" \
    '^[0-9]+$' "$took"
  wait_until 10 pod_has_event capture-init MeshinitCaptureRepaired >/dev/null || true
  check "capture: an Event says it was repaired" 'drift' "$(capture_events capture-init MeshinitCaptureRepaired)"
  delete_pod capture-init
  capture_teardown capture
}

# Waits (up to 60 s) for the agent's process to start a plugin run with CNI_COMMAND=ADD,
# and SIGKILLs the agent the moment it sees one; prints "AGENT-PID ADD-PID" and whether the
# ADD was still running just after the kill. Polls /proc in a loop of its own (python: a
# shell's pgrep per round is slower than a small ADD).
kill_agent_during_add() {
  python3 - <<'PY'
import os, signal, sys, time

def agent_pid():
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if open(f"/proc/{p}/cmdline", "rb").read().startswith(b"/usr/local/bin/meshinit-cni-agent"):
                    return p
            except OSError:
                pass
    return None

def children(agent):
    found = []
    try:
        for task in os.listdir(f"/proc/{agent}/task"):
            try:
                found += open(f"/proc/{agent}/task/{task}/children").read().split()
            except OSError:
                pass
    except OSError:
        pass
    return found

deadline = time.time() + 60
agent = None
while time.time() < deadline:
    agent = agent or agent_pid()
    for child in children(agent) if agent else []:
        try:
            env = open(f"/proc/{child}/environ", "rb").read()
        except OSError:
            continue
        if b"CNI_COMMAND=ADD\0" in env:
            # The ADD too: it would otherwise outlive the agent and finish its change.
            os.kill(int(child), signal.SIGKILL)
            os.kill(int(agent), signal.SIGKILL)
            try:
                state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "gone"
            running = "while the plugin ran" if state not in ("gone", "Z", "X") else "after the plugin ended"
            print(agent, child, running)
            sys.exit(0)
sys.exit(1)
PY
}

scenario_agent_capture_kill() {
  capture_setup capture-kill
  local pid old new mid child agent ranges took landed
  pid="$(pod_pid capture-kill)"
  old="$(pod_nat "$pid")"
  # A long change (768 excluded addresses), so that the kill lands while it is applied.
  ranges="$(python3 -c 'print(",".join(f"{n}.{i}/32" for n in ("192.0.2", "198.51.100", "203.0.113") for i in range(256)))')"
  local killer="$WORK/capture-kill.out"
  kill_agent_during_add >"$killer" &
  local killer_pid=$!
  sleep 0.5
  kubectl annotate pod -n meshed capture-kill "traffic.sidecar.istio.io/excludeOutboundIPRanges=$ranges" --overwrite >/dev/null
  wait "$killer_pid" || die "no ADD by the agent seen within 60 s: $(agent_logs)"
  read -r agent child landed <"$killer"
  log "capture: killed the agent (pid $agent) $landed (ADD pid $child)"
  # Once no plugin run of the old agent is left, the pod holds what the kill left.
  wait_until 30 sh -c "! kill -0 $child 2>/dev/null" >/dev/null || true
  mid="$(pod_nat "$pid")"
  agent_restarted() {
    [ "$(kubectl get pods -n kube-system -l app.kubernetes.io/name=meshinit-cni -o jsonpath='{.items[0].status.containerStatuses[0].restartCount}')" -ge 1 ] 2>/dev/null
  }
  wait_until 120 agent_restarted >/dev/null || true
  check "capture: the agent restarted" '^[1-9]' \
    "$(kubectl get pods -n kube-system -l app.kubernetes.io/name=meshinit-cni -o jsonpath='{.items[0].status.containerStatuses[0].restartCount}')"
  took="$(wait_until 120 nat_has "$pid" '-d 203.0.113.255/32 -j RETURN')"
  converged() { nat_has "$pid" '-d 203.0.113.255/32 -j RETURN' && capture_state_is capture-kill captured; }
  wait_until 120 converged >/dev/null || true
  new="$(pod_nat "$pid")"
  check "capture: the agent killed during a change; the restarted agent converges the pod (ms)" '^[0-9]+$' "$took"
  check "capture: the restarted agent recorded the pod captured" '^captured$' "$(capture_state capture-kill)"
  check "capture: what the kill left is the old rules or the new ones, nothing between ($landed)" '^(old|new)$' \
    "$(if [ "$mid" = "$old" ]; then echo old; elif [ "$mid" = "$new" ]; then echo new; else echo "neither: $(diff <(echo "$old") <(echo "$mid") | head -n 5)"; fi)"
  capture_teardown capture-kill
}

scenario_agent_capture_sweep() {
  agent_image
  agent_save_node
  agent_install --set capture.intervalSeconds=20
  agent_wait_ready
  wait_for "containerd's CNI configuration (the agent's entry)" 30 containerd cni_config_is with-meshinit
  local others replicas start pods wall cpu rss hwm agent
  others="$(kubectl get pods -A --field-selector "spec.nodeName=$NODE_NAME" -o name | wc -l)"
  replicas=$((110 - others))
  start=$SECONDS
  kubectl apply -f - >/dev/null <<<"$(cni_pod sweep | as_deployment sweep "$replicas")"
  kubectl rollout status -n meshed deployment/sweep --timeout=900s >/dev/null \
    || log "sweep: not all $replicas pods Ready within 900 s"
  check "sweep: $replicas meshed CNI-mode pods Ready ($((SECONDS - start)) s), $((others + replicas)) pods on the node" \
    "^$replicas\$" "$(kubectl get deployment -n meshed sweep -o jsonpath='{.status.readyReplicas}')"
  # A sweep that began once every pod was known (the gauge counts the pods it went over).
  sweep_covers() { [ "$(agent_metric meshinit_cni_capture_sweep_pods)" -ge "$replicas" ] 2>/dev/null; }
  wait_until 120 sweep_covers >/dev/null || log "sweep: no sweep over $replicas pods within 120 s"
  sleep 21
  wait_until 60 sweep_covers >/dev/null || true
  pods="$(agent_metric meshinit_cni_capture_sweep_pods)"
  wall="$(agent_metric meshinit_cni_capture_sweep_seconds)"
  cpu="$(agent_metric meshinit_cni_capture_sweep_cpu_seconds)"
  agent="$(pgrep -f '^/usr/local/bin/meshinit-cni-agent' | head -n1)"
  rss="$(awk '/^VmRSS/ {print $2}' "/proc/$agent/status")"
  hwm="$(awk '/^VmHWM/ {print $2}' "/proc/$agent/status")"
  check "sweep: one sweep over $pods pods: wall ${wall} s, CPU ${cpu} s; the agent's memory: RSS ${rss} KiB, peak ${hwm} KiB" \
    '^[0-9]+ [0-9.]+ [0-9.]+ [0-9]+$' "$pods $wall $cpu $rss"
  check "sweep: every pod recorded captured" "^$replicas\$" \
    "$(kubectl get pods -n meshed -l app=sweep -o jsonpath='{range .items[*]}{.metadata.annotations.meshinit\.io/capture}{"\n"}{end}' | grep -c '"captured"')"
  if [ -n "${AGENT_SWEEP_FIGURES:-}" ]; then
    printf 'node_pods=%s\nmeshed_pods=%s\nswept_pods=%s\nsweep_wall_s=%s\nsweep_cpu_s=%s\nagent_rss_kib=%s\nagent_peak_rss_kib=%s\nload=%s\n' \
      "$((others + replicas))" "$replicas" "$pods" "$wall" "$cpu" "$rss" "$hwm" "$(cut -d' ' -f1 /proc/loadavg)" >"$AGENT_SWEEP_FIGURES"
  fi
  kubectl delete deployment -n meshed sweep --wait=true >/dev/null
  kubectl wait --for=delete pod -n meshed -l app=sweep --timeout=600s >/dev/null 2>&1 || true
  helm uninstall "$AGENT_RELEASE" -n kube-system --wait --timeout 60s >/dev/null
  wait_until 60 agent_gone >/dev/null || die "the agent's pod did not go away"
  agent_restore
}

# The record the agent would have written under another meshinit for POD's annotations
# once its opt-out is removed: the same annotations fingerprint (FNV-1a over them, the
# agent's record left out, as the agent computes it), another plugin's.
older_record() { # POD
  kubectl get pod -n meshed "$1" -o json | python3 -c 'import json, sys
annotations = json.load(sys.stdin)["metadata"].get("annotations", {})
h = 0xcbf29ce484222325
for k in sorted(annotations):
    if k in ("meshinit.io/capture", "meshinit.io/reconcile"):
        continue
    for b in k.encode() + b"\0" + annotations[k].encode() + b"\0":
        h = ((h ^ b) * 0x100000001b3) & (2**64 - 1)
print(json.dumps({"state": "captured", "annotations": f"{h:016x}", "plugin": "an-older-meshinit"}))'
}
upgraded_count() { # how many of the upgrade pods are recorded captured by this agent's plugin
  kubectl get pods -n meshed -l app=upgrade -o jsonpath='{range .items[*]}{.metadata.annotations.meshinit\.io/capture}{"\n"}{end}' \
    | grep '"captured"' | grep -vc an-older-meshinit
}
upgraded_all() { [ "$(upgraded_count)" = 3 ]; }

# An upgrade as the agent sees one: three pods whose rules an older meshinit planned
# differently for the same annotations (an extra rule it would have made) and whose record
# that older plugin wrote. Without capture.upgrade they are reported and left; with it,
# they converge at capture.upgradesPerMinute (2): two at once, the third a minute later.
scenario_agent_capture_upgrade() {
  agent_image
  agent_save_node
  agent_install --set capture.intervalSeconds="$CAPTURE_INTERVAL" --set capture.upgradesPerMinute=2
  agent_wait_ready
  wait_for "containerd's CNI configuration (the agent's entry)" 30 containerd cni_config_is with-meshinit
  kubectl apply -f - >/dev/null <<<"$(cni_pod upgrade | as_deployment upgrade 3)"
  rollout meshed upgrade
  local pod pid pods took
  pods="$(kubectl get pods -n meshed -l app=upgrade -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')"
  # Each pod opted out while the older meshinit's state is made (so that no sweep repairs
  # it halfway), then in again with the older record in the same update.
  for pod in $pods; do
    wait_until 30 capture_state_is "$pod" captured >/dev/null || true
    kubectl annotate pod -n meshed "$pod" meshinit.io/reconcile=false >/dev/null
    sleep 1
    pid="$(pod_pid "$pod")"
    in_pod_net "$pid" iptables-nft -t nat -I ISTIO_OUTPUT 1 -p tcp --dport 9999 -j RETURN
    kubectl annotate pod -n meshed "$pod" "meshinit.io/capture=$(older_record "$pod")" meshinit.io/reconcile- --overwrite >/dev/null
  done
  pod="$(head -n1 <<<"$pods")"
  took="$(wait_until 30 capture_state_is "$pod" upgrade-pending)"
  check "upgrade: without capture.upgrade, a pod an older meshinit set up is recorded upgrade-pending (ms)" '^[0-9]+$' "$took"
  check "upgrade: its rules are left as they were" '--dport 9999 -j RETURN' "$(pod_nat "$(pod_pid "$pod")")"
  wait_until 10 pod_has_event "$pod" MeshinitCaptureDrifted >/dev/null || true
  check "upgrade: an Event says why it is left" 'differ from the plan \(upgrade\).*upgrades are not enabled' \
    "$(capture_events "$pod" MeshinitCaptureDrifted)"
  helm upgrade "$AGENT_RELEASE" "$repo/charts/meshinit-cni" -n kube-system --reuse-values \
    --set capture.upgrade=true >"$WORK/logs/helm-agent-upgrade.log" 2>&1 \
    || die "helm upgrade failed: $(cat "$WORK/logs/helm-agent-upgrade.log")"
  local start=$SECONDS
  while [ $((SECONDS - start)) -lt 90 ] && [ "$(upgraded_count)" -lt 2 ]; do sleep 0.5; done
  sleep 5
  check "upgrade: with capture.upgrade, two pods converge at once, the third waits (upgradesPerMinute: 2)" '^2$' "$(upgraded_count)"
  check "upgrade: the third counted as deferred" '^[1-9]' "$(agent_metric meshinit_cni_capture_deferred_total)"
  took="$(wait_until 90 upgraded_all)"
  check "upgrade: the third converges a minute later (ms after the first two)" '^[0-9]+$' "$took"
  for pod in $pods; do
    check "upgrade: $pod's rules are this meshinit's plan (the older rule gone)" '^gone$' \
      "$(pod_nat "$(pod_pid "$pod")" | grep -q -- '--dport 9999' && echo still || echo gone)"
  done
  check "upgrade: Events say so" 'differed from the plan \(upgrade\)' "$(capture_events "$pod" MeshinitCaptureUpgraded)"
  kubectl delete deployment -n meshed upgrade --wait=true >/dev/null
  kubectl wait --for=delete pod -n meshed -l app=upgrade --timeout=120s >/dev/null 2>&1 || true
  helm uninstall "$AGENT_RELEASE" -n kube-system --wait --timeout 60s >/dev/null
  wait_until 60 agent_gone >/dev/null || die "the agent's pod did not go away"
  agent_restore
}

# shellcheck disable=SC2034 # agent.sh's list takes them
AGENT_CAPTURE_SCENARIOS="agent_capture agent_capture_kill agent_capture_upgrade agent_capture_sweep"
