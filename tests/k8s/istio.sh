# shellcheck shell=bash
# istiod on the node, installed as a user installs it: helm (built by build-addons.sh) with
# Istio's charts from the pinned istio.io/istio module (base, then istio-discovery), and the
# pods its webhook injects into a namespace labelled istio-injection=enabled. Sourced by
# scenarios.sh, whose helpers (check, check_traffic, helper_in, ...) it uses.
# shellcheck disable=SC2154 # here, WORK, addons, the images...: run.sh's

ISTIOD_SCENARIOS="istiod_install istio_template istio_template_annotations
  meshinit_template_by_istiod istio_template_cni_mode"

ISTIO_NS=istio-system
INJECTED_NS=injected

istio_charts() {
  local dir
  dir="$(cd "$here/modules/istio" && GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' istio.io/istio)"
  [ -d "$dir/manifests/charts" ] || die "no charts in the istio.io/istio module ($dir)"
  echo "$dir/manifests/charts"
}

helm() { in_node env HOME="$WORK/helm" "$addons/helm" --kubeconfig "$WORK/admin.kubeconfig" "$@"; }

# The values a user of this node gives istiod's chart. The one that matters here is
# global.proxy_init.image: meshinit's image as istio-init (and istio-validation). The rest
# is this node's: images imported into containerd rather than pulled from a registry, and a
# smaller request than istiod's 500m/2Gi, which would not leave the scale scenario's pods
# room on 2 CPUs.
istiod_values() {
  cat <<EOF
global:
  proxy_init:
    image: $MESHINIT_IMAGE
  proxy:
    image: $PROXY_IMAGE
image: $ISTIOD_IMAGE
resources:
  requests: {cpu: 100m, memory: 256Mi}
autoscaleEnabled: false
EOF
}

# A Deployment as a user writes one, for a namespace with injection on: the app (the helper
# role serving 8080), annotations as given (KEY=VALUE ...); with INIT_ROLE, also an init
# container of the app's own playing that role (uid 1000), as the Vault agent's.
app_deployment() { # NAME [ANNOTATION=VALUE ...]
  local name="$1" annotation annotations="{}"
  shift
  if [ "$#" -gt 0 ]; then annotations=; fi
  for annotation in "$@"; do
    annotations="$annotations
        ${annotation%%=*}: \"${annotation#*=}\""
  done
  cat <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $name
  namespace: $INJECTED_NS
spec:
  replicas: 1
  selector:
    matchLabels: {app: $name}
  template:
    metadata:
      labels: {app: $name}
      annotations: $annotations
    spec:
      terminationGracePeriodSeconds: 1
$(app_init_container)
      containers:
      - name: app
        image: $HELPER_IMAGE
        command: $HELPER_ARGS
        env: [{name: MESHINIT_TEST_NO_PDEATHSIG, value: "1"}, {name: MESHINIT_TEST_ROLE, value: "serve app tcp:0.0.0.0:8080"}]
        ports: [{containerPort: 8080}]
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
          runAsNonRoot: true
          runAsUser: 1000
          runAsGroup: 1000
EOF
}

app_init_container() {
  [ -n "${INIT_ROLE:-}" ] || return 0
  cat <<EOF
      initContainers:
      - name: app-init
        image: $HELPER_IMAGE
        command: $HELPER_ARGS
        env: [{name: MESHINIT_TEST_NO_PDEATHSIG, value: "1"}, {name: MESHINIT_TEST_ROLE, value: "$INIT_ROLE"}]
        securityContext: {runAsNonRoot: true, runAsUser: 1000, runAsGroup: 1000}
EOF
}

# What the webhook made of the pod: each init container and container as NAME=IMAGE.
containers_of() { # POD
  kubectl get pod -n "$INJECTED_NS" "$1" \
    -o jsonpath='{range .spec.initContainers[*]}{.name}={.image} {end}{range .spec.containers[*]}{.name}={.image} {end}'
}
init_args_of() { # POD INIT-CONTAINER
  kubectl get pod -n "$INJECTED_NS" "$1" -o jsonpath="{.spec.initContainers[?(@.name==\"$2\")].args}"
}
# A pod whose app's Vault port is excluded (excludeOutboundPorts 8200, however the rules got
# it): its 8200 goes out directly, another port to the same address is captured.
check_vault_port_excluded() { # NAME POD [HOW]
  local vault v
  vault="$(pod_ip outside vault)"
  v="${vault//./\\.}"
  check "$1: app → vault $vault:8200 goes out directly${3:+ ($3)}" \
    "^REPLY by=vault:8200 local=$v:8200 " "$(helper_in "$INJECTED_NS" "$2" app client tcp "$vault:8200")"
  check "$1: app → vault $vault:8300 is captured by 15001" \
    "^REPLY by=sidecar:15001 local=127\\.0\\.0\\.1:15001 orig=$v:8300 " \
    "$(helper_in "$INJECTED_NS" "$2" app client tcp "$vault:8300")"
}

# Applies the Deployments (names) given on stdin and waits for each, all at once.
start_injected() { # NAME...
  kubectl apply -f - >/dev/null
  local name
  for name in "$@"; do rollout "$INJECTED_NS" "$name"; done
}

scenario_istiod_install() {
  local charts start=$SECONDS
  charts="$(istio_charts)"
  mkdir -p "$WORK/helm"
  istiod_values >"$WORK/istiod-values.yaml"
  helm install istio-base "$charts/base" -n "$ISTIO_NS" --create-namespace --wait >/dev/null \
    || die "helm install istio-base failed"
  if ! helm install istiod "$charts/istio-control/istio-discovery" -n "$ISTIO_NS" \
    -f "$WORK/istiod-values.yaml" --wait --timeout 5m >"$WORK/logs/helm-istiod.log" 2>&1; then
    cat "$WORK/logs/helm-istiod.log" >&2
    kubectl describe pods -n "$ISTIO_NS" >&2
    kubectl logs -n "$ISTIO_NS" deployment/istiod --tail=50 >&2 || true
    die "helm install istiod failed"
  fi
  log "istiod installed and Ready $((SECONDS - start))s after helm install"
  check "istiod: its Deployment is available (helm install --wait)" '^1$' \
    "$(kubectl get deployment -n "$ISTIO_NS" istiod -o jsonpath='{.status.availableReplicas}')"
  # istiod writes its CA into the webhook configuration once it serves; until then the
  # API server cannot call it.
  local bundle="" _
  for _ in $(seq 60); do
    bundle="$(kubectl get mutatingwebhookconfiguration istio-sidecar-injector \
      -o jsonpath='{.webhooks[0].clientConfig.caBundle}')"
    [ -n "$bundle" ] && break
    sleep 1
  done
  check "istiod: it has patched its CA into istio-sidecar-injector" '.' "$bundle"
  kubectl create namespace "$INJECTED_NS" >/dev/null
  kubectl label namespace "$INJECTED_NS" istio-injection=enabled >/dev/null
}

# Istio's own "sidecar" template, global.proxy_init.image set to meshinit's image: an
# ordinary Deployment, injected by istiod's webhook. istio-init is meshinit with Istio's
# args; its traffic checks are those of every meshed pod.
scenario_istio_template() {
  node_cni_config without-meshinit
  start_injected plain < <(app_deployment plain)
  local pod
  pod="$(deployment_pod "$INJECTED_NS" plain)"
  check "istiod injected istio-init as meshinit's image and istio-proxy" \
    "istio-init=${MESHINIT_IMAGE//./\\.} .*istio-proxy=${PROXY_IMAGE//./\\.} " "$(containers_of "$pod")"
  check "istio-init has Istio's args" \
    '^\["istio-iptables","-p","15001","-z","15006","-u","1337","-m","REDIRECT","-i","\*","-x","","-b","\*","-d","15090,15021,15020","--log_output_level=default:info"\]$' \
    "$(init_args_of "$pod" istio-init)"
  check "$pod: istio-init (meshinit's image) exit code" '^0$' \
    "$(kubectl get pod -n "$INJECTED_NS" "$pod" -o jsonpath='{.status.initContainerStatuses[?(@.name=="istio-init")].state.terminated.exitCode}')"
  show_log "$INJECTED_NS" "$pod" istio-init
  check_traffic "$pod" "$INJECTED_NS"
  kubectl delete deployment -n "$INJECTED_NS" plain --wait=true >/dev/null

  # The Vault app: its own init container fetches from Vault before the app starts. With
  # istio-proxy as a native sidecar (the nativeSidecar annotation), istiod puts it between
  # istio-init and that init container, which then reaches Vault through it.
  local vault
  vault="$(pod_ip outside vault)"
  start_injected vault-app < <(
    INIT_ROLE="client tcp $vault:8200" app_deployment vault-app sidecar.istio.io/nativeSidecar=true)
  pod="$(deployment_pod "$INJECTED_NS" vault-app)"
  check "vault-app: istiod placed istio-proxy as a native sidecar between istio-init and the app's init container" \
    '^istio-init=[^ ]+ istio-proxy=[^ ]+ app-init=' "$(containers_of "$pod")"
  check "vault-app: the app's init container reached Vault $vault:8200 through istio-proxy's 15001" \
    "^REPLY by=sidecar:15001 local=127\\.0\\.0\\.1:15001 orig=${vault//./\\.}:8200 " \
    "$(kubectl logs -n "$INJECTED_NS" "$pod" -c app-init | answer)"
  check_traffic "$pod" "$INJECTED_NS"
  kubectl delete deployment -n "$INJECTED_NS" vault-app --wait=true >/dev/null
}

# istiod reloads its injector configuration from its mounted ConfigMap some seconds after
# a helm upgrade; until then it injects as before. Waits until a pod (a server-side dry run,
# which the webhook sees as any other) is injected as wanted.
wait_for_injection() { # WHAT JSONPATH REGEX [ANNOTATION=VALUE ...]
  local what="$1" path="$2" re="$3" got="" _ annotation flags=()
  shift 3
  for annotation in "$@"; do flags+=(--annotations="$annotation"); done
  for _ in $(seq 60); do
    got="$(kubectl run -n "$INJECTED_NS" injection-probe --image="$HELPER_IMAGE" --restart=Never \
      "${flags[@]}" --dry-run=server -o jsonpath="$path" 2>&1 || true)"
    [[ "$got" =~ $re ]] && break
    sleep 1
  done
  check "istiod injects $what (a server-side dry run)" "$re" "$got"
}

# The annotations istiod renders into istio-init's args: excludeOutboundPorts,
# includeOutboundIPRanges, interceptionMode TPROXY (istio-proxy then uid 0 with NET_ADMIN).
scenario_istio_template_annotations() {
  start_node_vault
  start_injected excluded-port included-ranges tproxy < <(
    app_deployment excluded-port traffic.sidecar.istio.io/excludeOutboundPorts=8200
    echo ---
    app_deployment included-ranges traffic.sidecar.istio.io/includeOutboundIPRanges=198.51.100.0/25
    echo ---
    app_deployment tproxy sidecar.istio.io/interceptionMode=TPROXY
  )
  local vault pod v
  vault="$(pod_ip outside vault)"
  v="${vault//./\\.}"

  pod="$(deployment_pod "$INJECTED_NS" excluded-port)"
  check "excluded-port: istio-init has -o 8200" '"-o","8200"' "$(init_args_of "$pod" istio-init)"
  check_vault_port_excluded excluded-port "$pod"

  pod="$(deployment_pod "$INJECTED_NS" included-ranges)"
  check "included-ranges: istio-init has -i 198.51.100.0/25" '"-i","198\.51\.100\.0/25"' \
    "$(init_args_of "$pod" istio-init)"
  check "included-ranges: app → 198.51.100.30:8200 (included) is captured by 15001" \
    '^REPLY by=sidecar:15001 local=127\.0\.0\.1:15001 orig=198\.51\.100\.30:8200 ' \
    "$(helper_in "$INJECTED_NS" "$pod" app client tcp 198.51.100.30:8200)"
  check "included-ranges: app → vault $vault:8200 (not included) goes out directly" \
    "^REPLY by=vault:8200 local=$v:8200 " "$(helper_in "$INJECTED_NS" "$pod" app client tcp "$vault:8200")"

  pod="$(deployment_pod "$INJECTED_NS" tproxy)"
  check "tproxy: istio-init has -m TPROXY" '"-m","TPROXY"' "$(init_args_of "$pod" istio-init)"
  check "tproxy: istiod runs istio-proxy as uid 0 with NET_ADMIN" '(^| )0 .*NET_ADMIN' \
    "$(kubectl get pod -n "$INJECTED_NS" "$pod" -o jsonpath='{.spec.containers[?(@.name=="istio-proxy")].securityContext.runAsUser} {.spec.containers[?(@.name=="istio-proxy")].securityContext.capabilities.add}{.spec.initContainers[?(@.name=="istio-proxy")].securityContext.runAsUser} {.spec.initContainers[?(@.name=="istio-proxy")].securityContext.capabilities.add}')"
  MODE=TPROXY check_traffic "$pod" "$INJECTED_NS"
  kubectl delete deployment -n "$INJECTED_NS" excluded-port included-ranges tproxy --wait=true >/dev/null
}

# meshinit's injection template, added to istiod as its helm values say
# (injector-template/helm-values.yaml, with this node's image), rendered by istiod itself
# for a pod that asks for it; istio-init then reads the pod's annotations from the
# Downward API file.
meshinit_template_values() { # the file's name
  sed "s|image: registry.example/istio/meshinit:0.1.0|image: $MESHINIT_IMAGE|" \
    "$repo/injector-template/helm-values.yaml" >"$WORK/meshinit-template-values.yaml"
  grep -q "image: $MESHINIT_IMAGE" "$WORK/meshinit-template-values.yaml" \
    || die "injector-template/helm-values.yaml no longer names the image this test replaces"
  echo "$WORK/meshinit-template-values.yaml"
}

scenario_meshinit_template_by_istiod() {
  helm upgrade istiod "$(istio_charts)/istio-control/istio-discovery" -n "$ISTIO_NS" --reuse-values \
    -f "$(meshinit_template_values)" --wait --timeout 5m >/dev/null \
    || die "helm upgrade istiod with the meshinit template failed"
  wait_for_injection "meshinit's template" '{.spec.initContainers[0].args}' '"--annotations"' \
    inject.istio.io/templates=sidecar,meshinit
  start_injected templated templated-tproxy < <(
    app_deployment templated inject.istio.io/templates=sidecar,meshinit \
      traffic.sidecar.istio.io/excludeOutboundPorts=8200
    echo ---
    app_deployment templated-tproxy inject.istio.io/templates=sidecar,meshinit \
      sidecar.istio.io/interceptionMode=TPROXY
  )
  local pod
  pod="$(deployment_pod "$INJECTED_NS" templated)"
  check "templated: istiod rendered meshinit's template (istio-init reads the Downward API file)" \
    '"--annotations","/etc/meshinit/pod/annotations"' "$(init_args_of "$pod" istio-init)"
  show_log "$INJECTED_NS" "$pod" istio-init
  check_vault_port_excluded templated "$pod" "excludeOutboundPorts, read from the file"
  pod="$(deployment_pod "$INJECTED_NS" templated-tproxy)"
  check "templated-tproxy: istio-init has -m TPROXY" '"-m","TPROXY"' "$(init_args_of "$pod" istio-init)"
  MODE=TPROXY check_traffic "$pod" "$INJECTED_NS"
  kubectl delete deployment -n "$INJECTED_NS" templated templated-tproxy --wait=true >/dev/null
}

# CNI mode as Istio's users turn it on in istiod (pilot.cni.enabled): the template renders
# istio-validation (meshinit's image, uid 1337, no capabilities) instead of istio-init;
# meshinit-cni, chained on the node, captures the pod from the annotations containerd
# passes it.
scenario_istio_template_cni_mode() {
  node_cni_config with-meshinit
  helm upgrade istiod "$(istio_charts)/istio-control/istio-discovery" -n "$ISTIO_NS" --reuse-values \
    -f "$(meshinit_template_values)" --set pilot.cni.enabled=true --wait --timeout 5m >/dev/null \
    || die "helm upgrade istiod --set pilot.cni.enabled=true failed"
  wait_for_injection "istio-validation (pilot.cni.enabled)" '{.spec.initContainers[0].name}' '^istio-validation$'
  start_injected cni-injected cni-templated < <(
    app_deployment cni-injected
    echo ---
    app_deployment cni-templated inject.istio.io/templates=sidecar,meshinit \
      traffic.sidecar.istio.io/excludeOutboundPorts=8200
  )
  local pod
  pod="$(deployment_pod "$INJECTED_NS" cni-injected)"
  check "cni-injected: istiod injected istio-validation (meshinit's image), no istio-init" \
    "^istio-validation=${MESHINIT_IMAGE//./\\.} " "$(containers_of "$pod")"
  check "cni-injected: istio-validation has Istio's args" '"--run-validation","--skip-rule-apply"' \
    "$(init_args_of "$pod" istio-validation)"
  check "cni-injected: istio-validation (uid 1337, no capabilities) says it passed" 'validation passed' \
    "$(kubectl logs -n "$INJECTED_NS" "$pod" -c istio-validation 2>&1 | tr '\n' ' ')"
  check_traffic "$pod" "$INJECTED_NS"
  # meshinit's template with CNI on: istio-validation is meshinit's validation, and the
  # plugin reads the pod's annotations from containerd.
  pod="$(deployment_pod "$INJECTED_NS" cni-templated)"
  check "cni-templated: meshinit's template renders istio-validation as meshinit's validation" \
    '"--annotations","/etc/meshinit/pod/annotations",.*"--run-validation","--skip-rule-apply"' \
    "$(init_args_of "$pod" istio-validation)"
  check_vault_port_excluded cni-templated "$pod" "excludeOutboundPorts, from containerd"
  kubectl delete deployment -n "$INJECTED_NS" cni-injected cni-templated --wait=true >/dev/null
}
