# shellcheck shell=bash
# Istio's own capture on the node, beside meshinit's (sourced by scenarios.sh after istio.sh,
# whose istiod, helm, app_deployment and start_injected it uses):
#   - Istio's istio-init: pilot-agent, built from the pinned istio.io/istio module as istiod
#     is (build-addons.sh), in an image like Istio's proxy_init (pilot-agent and iptables),
#     which istiod's own template takes from global.proxy_init.image;
#   - Istio's CNI: install-cni and the istio-cni plugin from that module, in an image like
#     Istio's install-cni, installed with Istio's own cni chart from the module cache, its
#     values as a user sets them, chained into the node's conflist; istiod with
#     pilot.cni.enabled renders istio-validation (Istio's image again). Removed at the end
#     (helm uninstall; the conflist checked byte for byte), so that meshinit's agent
#     (agent.sh) is installed on the same node afterwards;
#   - istio_own_meshinit: the same pods and checks with meshinit in both its modes.
# Both images are Debian bookworm's iptables and nftables, the target root meshinit's image
# is gathered from (build-offline.sh made it for run.sh's images), with Istio's binaries
# added: built offline, nothing pulled.
# shellcheck disable=SC2154 # WORK, addons, podman_opts, the images...: run.sh's

ISTIO_INIT_IMAGE=localhost/meshinit-k8s-istio-proxy-init:test
ISTIO_CNI_IMAGE=localhost/meshinit-k8s-istio-install-cni:test
ISTIO_CNI_RELEASE=istio-cni
# install-cni's run directory on the node (the chart's hostPath, not a value): the plugin's
# kubeconfig and the agent's sockets. Removed with the chart when the run made it (and by
# run.sh's teardown).
ISTIO_CNI_RUN_DIR=/var/run/istio-cni

# The images, built and imported once per run.
istio_images() {
  [ -z "${istio_images_done:-}" ] || return 0
  local start=$SECONDS target_root root container tool
  target_root="$(sed -n 's/^target-root //p' "$WORK/logs/image-build.out")"
  [ -n "$target_root" ] || die "no target root in build-offline.sh's output ($WORK/logs/image-build.out)"
  root="$WORK/images/istio-root"
  rm -rf "$root" && mkdir -p "$root"
  container="$(podman create "$target_root" /none)"
  podman export "$container" | tar -C "$root" -xf -
  podman rm "$container" >/dev/null
  # Unpacked, not installed: Debian's postinst would have made iptables an alternative
  # (nft, its default); Istio's own images have it so.
  for tool in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sf "xtables-nft-multi" "$root/usr/sbin/$tool"
  done
  mkdir -p "$root/usr/local/bin" "$root/opt/cni/bin" "$root/run" "$root/tmp"
  chmod 1777 "$root/tmp"
  # proxy_init: pilot-agent, its entrypoint (the template's args start `istio-iptables`).
  cp "$addons/pilot-agent" "$root/usr/local/bin/"
  tar -C "$root" -cf "$WORK/images/istio-init.tar" .
  podman import --quiet --change 'ENTRYPOINT=["/usr/local/bin/pilot-agent"]' \
    "$WORK/images/istio-init.tar" "$ISTIO_INIT_IMAGE" >/dev/null
  rm "$root/usr/local/bin/pilot-agent" "$WORK/images/istio-init.tar"
  # install-cni: as Istio's Dockerfile.install-cni lays it out.
  cp "$addons/install-cni" "$root/usr/local/bin/"
  cp "$addons/istio-cni" "$root/opt/cni/bin/"
  tar -C "$root" -cf "$WORK/images/install-cni.tar" .
  podman import --quiet \
    --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/cni/bin' \
    --change 'WORKDIR=/opt/cni/bin' --change 'CMD=["/usr/local/bin/install-cni"]' \
    "$WORK/images/install-cni.tar" "$ISTIO_CNI_IMAGE" >/dev/null
  rm -rf "$root" "$WORK/images/install-cni.tar"
  podman save --quiet --multi-image-archive --format docker-archive \
    -o "$WORK/images/istio.tar" "$ISTIO_INIT_IMAGE" "$ISTIO_CNI_IMAGE"
  in_node ctr --address "$WORK/containerd.sock" -n k8s.io images import "$WORK/images/istio.tar" >/dev/null
  rm -f "$WORK/images/istio.tar"
  istio_images_done=1
  log "Istio's images built and imported in $((SECONDS - start))s"
}

istiod_upgrade() { # WHAT HELM-FLAGS...
  local what="$1"
  shift
  helm upgrade istiod "$(istio_charts)/istio-control/istio-discovery" -n "$ISTIO_NS" --reuse-values \
    "$@" --wait --timeout 5m >/dev/null || die "helm upgrade istiod ($what) failed"
}

# DNS capture as a user turns it on for a pod (proxyMetadata, which istiod renders into
# the env of istio-init and istio-proxy, where Istio's CNI plugin reads it too). The
# stand-in istio-proxy takes its role from the same env: it answers on 15053 (UDP, where
# Istio's agent serves DNS) besides its usual listeners.
DNS_PROXY_CONFIG='{\"proxyMetadata\": {\"ISTIO_META_DNS_CAPTURE\": \"true\", \"MESHINIT_TEST_ROLE\": \"serve sidecar tcp:0.0.0.0:15001 inbound:0.0.0.0:15006 http:0.0.0.0:15021 udp:127.0.0.1:15053\"}}'

# A Deployment of app_deployment's with hostUsers: false.
without_host_users() { sed 's/^    spec:$/    spec:\n      hostUsers: false/'; }

# The scenarios' pods, all at once, in the mode istiod now injects (PREFIX names them): a
# pod with Istio's defaults; excludes (excludeOutboundPorts 8200, includeOutboundIPRanges);
# TPROXY; DNS capture; the Vault app with istio-proxy as a native sidecar.
istio_own_deployments() { # PREFIX
  local p="$1" vault
  vault="$(pod_ip outside vault)"
  app_deployment "$p-plain"
  echo ---
  app_deployment "$p-excluded" traffic.sidecar.istio.io/excludeOutboundPorts=8200
  echo ---
  app_deployment "$p-ranges" traffic.sidecar.istio.io/includeOutboundIPRanges=198.51.100.0/25
  echo ---
  app_deployment "$p-tproxy" sidecar.istio.io/interceptionMode=TPROXY
  echo ---
  app_deployment "$p-dns" "proxy.istio.io/config=$DNS_PROXY_CONFIG"
  echo ---
  INIT_ROLE="client tcp $vault:8200" app_deployment "$p-vault" sidecar.istio.io/nativeSidecar=true
}

# The checks every mode's pods pass, with real connections: PREFIX's Deployments, INIT the
# init container istiod rendered (istio-init or istio-validation), IMAGE its image.
istio_own_checks() { # PREFIX INIT IMAGE
  local p="$1" init="$2" image="$3" pod vault v
  vault="$(pod_ip outside vault)"
  v="${vault//./\\.}"
  pod="$(deployment_pod "$INJECTED_NS" "$p-plain")"
  check "$p-plain: istiod rendered $init as $image" "(^| )$init=${image//./\\.} " "$(containers_of "$pod")"
  check "$p-plain: $init exited 0" '^0$' \
    "$(kubectl get pod -n "$INJECTED_NS" "$pod" -o jsonpath="{.status.initContainerStatuses[?(@.name==\"$init\")].state.terminated.exitCode}")"
  show_log "$INJECTED_NS" "$pod" "$init"
  check_traffic "$pod" "$INJECTED_NS"

  pod="$(deployment_pod "$INJECTED_NS" "$p-excluded")"
  check_vault_port_excluded "$p-excluded" "$pod" "excludeOutboundPorts"

  pod="$(deployment_pod "$INJECTED_NS" "$p-ranges")"
  check "$p-ranges: app → 198.51.100.30:8200 (included) is captured by 15001" \
    '^REPLY by=sidecar:15001 local=127\.0\.0\.1:15001 orig=198\.51\.100\.30:8200 ' \
    "$(helper_in "$INJECTED_NS" "$pod" app client tcp 198.51.100.30:8200)"
  check "$p-ranges: app → vault $vault:8200 (not included) goes out directly" \
    "^REPLY by=vault:8200 local=$v:8200 " "$(helper_in "$INJECTED_NS" "$pod" app client tcp "$vault:8200")"

  pod="$(deployment_pod "$INJECTED_NS" "$p-tproxy")"
  MODE=TPROXY check_traffic "$pod" "$INJECTED_NS"

  pod="$(deployment_pod "$INJECTED_NS" "$p-dns")"
  # (The pods' nameserver is the node's address: the kubelet's clusterDNS.) Every mode
  # takes the pod's own DNS capture from proxy.istio.io/config: istiod renders it into
  # istio-proxy's environment, which Istio's plugin reads; meshinit-cni reads the annotation.
  check "$p-dns: app → its nameserver $NODE_IP:53 (UDP) is captured by istio-proxy's 15053" \
    '^REPLY by=sidecar:15053 local=127\.0\.0\.1:15053 ' \
    "$(helper_in "$INJECTED_NS" "$pod" app client udp "$NODE_IP:53")"
  check_traffic "$pod" "$INJECTED_NS"

  pod="$(deployment_pod "$INJECTED_NS" "$p-vault")"
  check "$p-vault: istio-proxy is a native sidecar between $init and the app's init container" \
    "^$init=[^ ]+ istio-proxy=[^ ]+ app-init=" "$(containers_of "$pod")"
  check "$p-vault: the app's init container reached Vault $vault:8200 through istio-proxy's 15001" \
    "^REPLY by=sidecar:15001 local=127\\.0\\.0\\.1:15001 orig=$v:8200 " \
    "$(kubectl logs -n "$INJECTED_NS" "$pod" -c app-init | answer)"
  check_traffic "$pod" "$INJECTED_NS"
}
istio_own_cleanup() { # PREFIX
  local p="$1"
  kubectl delete deployment -n "$INJECTED_NS" "$p-plain" "$p-excluded" "$p-ranges" "$p-tproxy" \
    "$p-dns" "$p-vault" --wait=true >/dev/null
}

# Istio's istio-init: istiod's template, global.proxy_init.image Istio's proxy_init image.
scenario_istio_init() {
  istio_images
  node_cni_config without-meshinit
  istiod_upgrade "Istio's proxy_init image" --set global.proxy_init.image="$ISTIO_INIT_IMAGE" \
    --set pilot.cni.enabled=false
  wait_for_injection "istio-init as Istio's proxy_init image" \
    '{.spec.initContainers[0].name}={.spec.initContainers[0].image}' "^istio-init=${ISTIO_INIT_IMAGE//./\\.}\$"
  start_injected istio-init-plain istio-init-excluded istio-init-ranges istio-init-tproxy \
    istio-init-dns istio-init-vault < <(istio_own_deployments istio-init)
  istio_own_checks istio-init istio-init "$ISTIO_INIT_IMAGE"
  local pod
  pod="$(deployment_pod "$INJECTED_NS" istio-init-plain)"
  check "istio-init-plain: the log is pilot-agent's istio-iptables (Istio's, not meshinit's)" \
    'Running iptables restore with: iptables-(nft|legacy)-restore' \
    "$(kubectl logs -n "$INJECTED_NS" "$pod" -c istio-init 2>&1 | grep -o 'Running iptables restore with: [^ ]*')"
  istio_own_cleanup istio-init

  # hostUsers: false: istio-init's NET_ADMIN is the pod's user namespace's, which owns the
  # pod's network namespace: enough (istio/istio#58750 says so too).
  istio_own_user_namespaces istio-init
}

# The same pods and checks with meshinit in both of its modes, injected by the same istiod:
# its image as istio-init, then meshinit-cni chained with pilot.cni.enabled (istio-
# validation meshinit's image), so that the four ways pass one set of checks.
scenario_istio_own_meshinit() {
  local mode init image="$MESHINIT_IMAGE" cni p
  for mode in init cni; do
    p="mi-$mode"
    if [ "$mode" = init ]; then
      node_cni_config without-meshinit
      init=istio-init cni=false
    else
      node_cni_config with-meshinit
      init=istio-validation cni=true
    fi
    istiod_upgrade "meshinit's image, pilot.cni.enabled=$cni" \
      --set global.proxy_init.image="$image" --set pilot.cni.enabled="$cni"
    wait_for_injection "$init as meshinit's image" \
      '{.spec.initContainers[0].name}={.spec.initContainers[0].image}' "^$init=${image//./\\.}\$"
    start_injected "$p-plain" "$p-excluded" "$p-ranges" "$p-tproxy" "$p-dns" "$p-vault" \
      < <(istio_own_deployments "$p")
    istio_own_checks "$p" "$init" "$image"
    istio_own_cleanup "$p"
    istio_own_user_namespaces "$p"
  done
  node_cni_config without-meshinit
  istiod_upgrade "pilot.cni.enabled off" --set pilot.cni.enabled=false
}

# --- Istio's CNI ---------------------------------------------------------------------------
ISTIO_CNI_DS=istio-cni-node
# The chart's values a user of this node sets: its CNI directories, the image imported
# into containerd (not pulled), and repair by deleting the broken pod (the chart's other
# documented mode) rather than in place: in-place repair finds the pod's network
# namespace from PID 1's (/host/proc/1/ns/net), which is not this node's (the node is a
# network namespace of its own) and which this machine's root may not even open (its PID 1
# is the sandbox's; "failed to Statfs /host/proc/1/ns/net: permission denied").
istio_cni_values() {
  cat <<EOF
cniBinDir: $WORK/cni/bin
cniConfDir: $WORK/cni/net.d
image: $ISTIO_CNI_IMAGE
pullPolicy: Never
repair:
  repairPods: false
  deletePods: true
EOF
}
raced_event_seen() { pod_events "$INJECTED_NS" "$1" | grep -qx 'DeleteBrokenPod: pod detected as broken, deleted'; }
istio_cni_pod() { kubectl get pods -n "$ISTIO_NS" -l "k8s-app=$ISTIO_CNI_DS" -o jsonpath='{.items[0].metadata.name}'; }
istio_cni_logs() { kubectl logs -n "$ISTIO_NS" -l "k8s-app=$ISTIO_CNI_DS" --tail=-1 2>&1 || true; }
istio_cni_gone() { [ -z "$(kubectl get pods -n "$ISTIO_NS" -l "k8s-app=$ISTIO_CNI_DS" -o name)" ]; }
istio_cni_chained() { [ "$(conflist_types)" = "bridge istio-cni" ]; }
istio_cni_loaded() { [[ " $(loaded_cni_types) " == *" bridge istio-cni "* ]]; }
init_exit_code_of() { # POD INIT: the latest finished run's exit code (empty until one finished)
  local now before
  IFS='|' read -r now before < <(kubectl get pod -n "$INJECTED_NS" "$1" -o jsonpath="{.status.initContainerStatuses[?(@.name==\"$2\")].state.terminated.exitCode}{\"|\"}{.status.initContainerStatuses[?(@.name==\"$2\")].lastState.terminated.exitCode}{\"\\n\"}")
  echo "${now:-$before}"
}
pod_events() { # NAMESPACE POD: its events, one a line, "REASON: MESSAGE"
  kubectl get events -n "$1" --field-selector "involvedObject.name=$2" \
    -o jsonpath='{range .items[*]}{.reason}: {.message}{"\n"}{end}'
}
wait_init_exit() { # DEPLOYMENT INIT: waits (120 s at most) until its pod's INIT has exited; prints "POD CODE"
  local start=$SECONDS pod="" code=""
  while [ $((SECONDS - start)) -lt 120 ]; do
    pod="$(deployment_pod "$INJECTED_NS" "$1")"
    if [ -n "$pod" ]; then
      code="$(init_exit_code_of "$pod" "$2")"
      [ -z "$code" ] || break
    fi
    sleep 1
  done
  echo "$pod $code"
}

# Istio's CNI as a user installs it beside istiod: the cni chart, then istiod with
# pilot.cni.enabled. A pod created before the agent (istiod already rendering
# istio-validation) is Istio's raced pod, which its repair controller fixes in place.
scenario_istio_cni() {
  istio_images
  agent_service_rule -A # the plugin, on the node, reaches the API server by its Service
  node_cni_config without-meshinit
  cp "$CONFLIST" "$WORK/istio-cni-conflist.before"
  local made_run_dir=
  [ -e "$ISTIO_CNI_RUN_DIR" ] || made_run_dir=1
  istiod_upgrade "pilot.cni.enabled, Istio's proxy_init image" \
    --set global.proxy_init.image="$ISTIO_INIT_IMAGE" --set pilot.cni.enabled=true
  wait_for_injection "istio-validation as Istio's proxy_init image (pilot.cni.enabled)" \
    '{.spec.initContainers[0].name}={.spec.initContainers[0].image}' "^istio-validation=${ISTIO_INIT_IMAGE//./\\.}\$"

  # The raced pod: its istio-validation finds no capture and fails with Istio's code.
  app_deployment istio-cni-raced | kubectl apply -f - >/dev/null
  local raced code raced_uid
  read -r raced code < <(wait_init_exit istio-cni-raced istio-validation)
  check "istio-cni-raced: started before the agent, istio-validation (Istio's) fails with 126" '^126$' "$code"
  raced_uid="$(kubectl get pod -n "$INJECTED_NS" "$raced" -o jsonpath='{.metadata.uid}')"

  istio_cni_values >"$WORK/istio-cni-values.yaml"
  local start=$SECONDS
  helm install "$ISTIO_CNI_RELEASE" "$(istio_charts)/istio-cni" -n "$ISTIO_NS" \
    -f "$WORK/istio-cni-values.yaml" --wait --timeout 3m >"$WORK/logs/helm-istio-cni.log" 2>&1 \
    || die "helm install $ISTIO_CNI_RELEASE failed: $(cat "$WORK/logs/helm-istio-cni.log"; istio_cni_logs | tail -n 30)"
  # (helm's --wait can return before the DaemonSet has a pod; the agent writes the conflist
  # entry once the plugin is in place.)
  wait_until 120 istio_cni_chained >/dev/null || log "no istio-cni entry after 120 s: $(istio_cni_logs | tail -n 20)"
  log "Istio's CNI agent installed and its entry written $((SECONDS - start))s after helm install"
  check "istio-cni: chained last in the bridge conflist" '^bridge istio-cni$' "$(conflist_types)"
  check "istio-cni: the plugin is in the node's CNI bin dir and answers VERSION" '"supportedVersions"' \
    "$([ -f "$WORK/cni/bin/istio-cni" ] && CNI_COMMAND=VERSION "$WORK/cni/bin/istio-cni" </dev/null 2>&1)"
  wait_for "containerd's CNI configuration (istio-cni chained)" 30 containerd istio_cni_loaded

  # Istio's repair: the raced pod, deleted by the agent with an Event saying why; its
  # replacement is captured.
  wait_until 60 pod_gone "$INJECTED_NS" "$raced" >/dev/null || log "$raced still there: $(istio_cni_logs | tail -n 20)"
  check "istio-cni-raced: Istio's repair deleted $raced" '^gone$' "$(pod_gone "$INJECTED_NS" "$raced" && echo gone)"
  # (Istio's agent records the Event through an event broadcaster, which sends it on its
  # own time, after the deletion as often as not.)
  wait_until 30 raced_event_seen "$raced" >/dev/null || true
  check "istio-cni-raced: an Event on it says why" '^DeleteBrokenPod: pod detected as broken, deleted$' \
    "$(pod_events "$INJECTED_NS" "$raced" | grep -m1 -x 'DeleteBrokenPod: pod detected as broken, deleted')"
  rollout "$INJECTED_NS" istio-cni-raced
  local repaired
  repaired="$(deployment_pod "$INJECTED_NS" istio-cni-raced)"
  check "istio-cni-raced: its replacement is a new pod whose istio-validation passed" '^[^ ]+ 0$' \
    "$(kubectl get pod -n "$INJECTED_NS" "$repaired" -o jsonpath='{.metadata.uid} {.status.initContainerStatuses[0].state.terminated.exitCode}' | grep -v "^$raced_uid ")"
  check_traffic "$repaired" "$INJECTED_NS"
  kubectl delete deployment -n "$INJECTED_NS" istio-cni-raced --wait=true >/dev/null

  start_injected istio-cni-plain istio-cni-excluded istio-cni-ranges istio-cni-tproxy \
    istio-cni-dns istio-cni-vault < <(istio_own_deployments istio-cni)
  istio_own_checks istio-cni istio-validation "$ISTIO_INIT_IMAGE"
  istio_own_cleanup istio-cni

  # hostUsers: false, which istio/istio#58750 reports broken under Istio's CNI
  # (istio-validation failing): on this node it is not. containerd 2.x makes a user-
  # namespaced pod's network namespace inside the pod's user namespace, and the kernel
  # reads the plugin's `--uid-owner 1337` in the namespace's own user namespace, so
  # istio-proxy's uid 1337 there matches. The checks say so; should it break, they fail.
  istio_own_user_namespaces istio-cni
  log "istio-cni: the restore commands in its agent's log (the plugin's lines): $(istio_cni_logs | grep -o 'Running iptables restore with: [^ ]*' | sort | uniq -c | tr '\n' ' ')"
  istio_cni_agent_restart

  # Removed as a user removes it; the node as it was, for meshinit's agent.
  helm uninstall "$ISTIO_CNI_RELEASE" -n "$ISTIO_NS" --wait --timeout 60s >/dev/null
  wait_until 60 istio_cni_gone >/dev/null || die "Istio's CNI agent did not go away"
  # Istio's agent takes its entry out by writing the file anew (its keys sorted, indented),
  # where meshinit's leaves the bytes: the same configuration is what is checked.
  log "istio-cni: uninstalled, the conflist's bytes are $(cmp -s "$WORK/istio-cni-conflist.before" "$CONFLIST" && echo "as they were" || echo "rewritten")"
  check "istio-cni: uninstalled, the conflist holds the same configuration as before (JSON)" '^same$' \
    "$(python3 -c 'import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
print("same" if a == b else f"differs: {b}")' "$WORK/istio-cni-conflist.before" "$CONFLIST")"
  check "istio-cni: uninstalled, the plugin is gone from the node's CNI bin dir" '^$' \
    "$(ls -A "$WORK/cni/bin/istio-cni" 2>/dev/null)"
  wait_for "containerd's CNI configuration (istio-cni removed)" 30 containerd cni_config_is without-meshinit
  [ -z "$made_run_dir" ] || rm -rf "$ISTIO_CNI_RUN_DIR"
  agent_service_rule -D
  istiod_upgrade "meshinit's image again, pilot.cni.enabled off" \
    --set global.proxy_init.image="$MESHINIT_IMAGE" --set pilot.cni.enabled=false
}

# A pod with hostUsers: false (PREFIX-userns), captured as any other.
istio_own_user_namespaces() { # PREFIX
  local pod
  start_injected "$1-userns" < <(app_deployment "$1-userns" | without_host_users)
  pod="$(deployment_pod "$INJECTED_NS" "$1-userns")"
  check "$1-userns: the app runs in a user namespace of its own (its uid 0 is not the node's)" \
    '^0 [1-9][0-9]* 65536$' "$(uid_map_of "$INJECTED_NS" "$pod" app)"
  check_traffic "$pod" "$INJECTED_NS"
  kubectl delete deployment -n "$INJECTED_NS" "$1-userns" --wait=true >/dev/null
}

# The agent restarted while pods start: a Deployment of ISTIO_CNI_RESTART_REPLICAS (default
# 6) created as the agent's pod is deleted; the DaemonSet starts a new one. Every pod ends
# Ready and captured (by the plugin, or by repair once the new agent runs).
istio_cni_agent_restart() {
  local replicas="${ISTIO_CNI_RESTART_REPLICAS:-6}" old pods pod ip bad="" vault re
  vault="$(pod_ip outside vault)"
  old="$(istio_cni_pod)"
  app_deployment istio-cni-restart | sed "s/^  replicas: 1$/  replicas: $replicas/" | kubectl apply -f - >/dev/null
  kubectl delete pod -n "$ISTIO_NS" "$old" --wait=false >/dev/null
  wait_until 120 istio_cni_replaced "$old" >/dev/null || log "no new agent pod after 120 s: $(istio_cni_logs | tail -n 20)"
  if ! kubectl rollout status -n "$INJECTED_NS" deployment/istio-cni-restart --timeout=300s >/dev/null; then
    kubectl get pods -n "$INJECTED_NS" -l app=istio-cni-restart -o wide >&2
  fi
  check "istio-cni-restart: all $replicas pods Ready across the agent's restart" "^$replicas\$" \
    "$(kubectl get deployment -n "$INJECTED_NS" istio-cni-restart -o jsonpath='{.status.readyReplicas}')"
  pods="$(kubectl get pods -n "$INJECTED_NS" -l app=istio-cni-restart -o jsonpath='{range .items[*]}{.metadata.name}={.status.podIP}{"\n"}{end}')"
  while IFS='=' read -r pod ip; do
    [ -n "$pod" ] || continue
    re="^REPLY by=sidecar:15001 local=127\\.0\\.0\\.1:15001 orig=${vault//./\\.}:8200 client=${ip//./\\.}:[0-9]+\$"
    [[ "$(helper_in "$INJECTED_NS" "$pod" app client tcp "$vault:8200")" =~ $re ]] || bad="$bad $pod"
  done <<<"$pods"
  check "istio-cni-restart: every pod's app is captured (not captured:${bad:- none})" '^$' "$bad"
  log "istio-cni-restart: pods the new agent deleted as broken: $(istio_cni_logs | grep -c 'Pod detected as broken, deleting')"
  check "istio-cni-restart: the new agent is Ready" '^true$' \
    "$(kubectl get pods -n "$ISTIO_NS" -l "k8s-app=$ISTIO_CNI_DS" -o jsonpath='{.items[0].status.containerStatuses[0].ready}')"
  kubectl delete deployment -n "$INJECTED_NS" istio-cni-restart --wait=true >/dev/null
}
istio_cni_replaced() { # OLD-POD: a new agent pod is Ready
  local now
  now="$(istio_cni_pod)"
  [ -n "$now" ] && [ "$now" != "$1" ] \
    && [ "$(kubectl get pod -n "$ISTIO_NS" "$now" -o jsonpath='{.status.containerStatuses[0].ready}')" = true ]
}

# shellcheck disable=SC2034 # scenarios.sh's list takes them
ISTIO_OWN_SCENARIOS="istio_init istio_own_meshinit istio_cni"
