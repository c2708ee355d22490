#!/usr/bin/env bash
# A single-node Kubernetes on this machine, built from the pinned Go modules (build.sh), and
# meshinit's pods on it under a real kubelet and containerd:
#
#   bash tests/k8s/run.sh             # build (cached), bring the node up, run the scenarios, tear down
#   bash tests/k8s/run.sh --bench     # instead of the scenarios, the pod-start benchmark (bench.sh)
#   bash tests/k8s/run.sh --keep      # the same, but keep the node up afterwards, until
#                                     # WORK/release exists or run.sh gets SIGINT/SIGTERM
#
# The node: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd 2.x with
# Debian's runc, the kubelet, and Debian's CNI plugins (bridge + host-local, loopback). All of
# it runs inside a network namespace and a mount namespace that this script makes:
#   - the network namespace (NODE_NETNS) holds the node's addresses (NODE_IP on a bridge
#     with no port, the default route into it, so nothing routed there goes anywhere), the CNI
#     bridge with the pod range POD_CIDR, and every iptables rule and sysctl the kubelet and
#     the bridge plugin set; the API server, etcd and the kubelet listen there only;
#   - the mount namespace (a child of the host's, mounts from the host propagate in, none go
#     out) holds every mount containerd and the kubelet make (container root filesystems,
#     volumes, the pods' network namespace files). It lives as long as a holder process.
# Files live under one directory (WORK); cgroups under CGROUP_ROOT in each hierarchy. The
# teardown (a trap, also on failure or interruption) stops the pods, kills every process in
# the mount namespace, removes the cgroups, the namespaces and the directory, and restores
# the kernel settings the kubelet changes (vm.overcommit_memory, kernel.panic, ...).
#
# Addresses are documentation ones, reached only inside the node's namespace: pods in
# 203.0.113.0/25, the node at 203.0.113.254, services in 198.51.100.128/25.
#
# Images are built offline (tests/podman/build-offline.sh, into the podman tests' storage)
# and imported into containerd: meshinit's image, a helper image for the stand-in sidecar and
# the app (the integration tests' helper roles, support::roles), and a pause image (Debian's
# catatonit, as podman's).
#
# Needs root, go, cargo, podman, mmdebstrap, runc, openssl, the CNI plugins.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

keep=
bench=
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    --bench) bench=1 ;;
    *) echo "usage: run.sh [--keep] [--bench]" >&2; exit 2 ;;
  esac
done

NODE_NETNS=mi-k8s-node
NODE_NAME=mi-node
NODE_IP=203.0.113.254
POD_CIDR=203.0.113.0/25
POD_GATEWAY=203.0.113.1
# Services: the upper half of 198.51.100.0/24; the manifests' "Vault" is 198.51.100.30.
SERVICE_CIDR=198.51.100.128/25
SERVICE_IP=198.51.100.129
CGROUP_ROOT=meshinit-k8s
STATE=/var/lib/meshinit-test
WORK="$STATE/k8s-node"
LOCK=/run/meshinit-test/k8s.lock
# The kernel settings the kubelet sets (setupKernelTunables); restored on teardown.
KERNEL_TUNABLES=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

log() { echo "run.sh: $*" >&2; }
failure=
die() { failure="$*"; log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root"
for tool in go cargo podman mmdebstrap runc openssl nsenter unshare ip python3 catatonit; do
  command -v "$tool" >/dev/null || die "needs $tool"
done
for plugin in bridge host-local loopback; do
  [ -x "/usr/lib/cni/$plugin" ] || die "needs /usr/lib/cni/$plugin (containernetworking-plugins)"
done

mkdir -p "$(dirname "$LOCK")" "$STATE"
exec 9>"$LOCK"
flock -n 9 || die "another run.sh holds $LOCK"

timed() { # NAME COMMAND...: runs it, logs how long it took
  local name="$1" start=$SECONDS
  shift
  "$@"
  log "$name took $((SECONDS - start))s"
}

# --- the components ---------------------------------------------------------------------
bin="$(timed "build.sh" bash "$here/build.sh")"
addons="$(timed "build-addons.sh" bash "$here/build-addons.sh")"
export PATH="$bin:$PATH"

# --- the components' processes ---------------------------------------------------------
# A command in the node's namespaces (the holder's, see below).
in_node() { nsenter --target "$holder" --mount --net -- "$@"; }
declare -A component_pid=()
start_component() { # NAME COMMAND...: in the node's namespaces, logging to logs/NAME.log
  local name="$1"
  shift
  in_node "$@" >>"$WORK/logs/$name.log" 2>&1 9>&- &
  component_pid[$name]=$!
}
stop_component() {
  local name="$1" pid="${component_pid[$1]:-}"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  local _
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

# --- teardown -----------------------------------------------------------------------------
holder=
left=
# The values before any run: kept in a file until restored, so that a run killed before it
# could restore them leaves the next run the machine's values, not the kubelet's.
TUNABLES_FILE=/run/meshinit-test/k8s-kernel-tunables
declare -A saved_tunables=()
if [ ! -f "$TUNABLES_FILE" ]; then
  for tunable in "${KERNEL_TUNABLES[@]}"; do
    echo "$tunable=$(sysctl -n "$tunable")"
  done >"$TUNABLES_FILE.tmp"
  mv "$TUNABLES_FILE.tmp" "$TUNABLES_FILE"
fi
while IFS='=' read -r tunable value; do
  saved_tunables[$tunable]="$value"
done <"$TUNABLES_FILE"
run_containerd_existed=
[ -e /run/containerd ] && run_containerd_existed=1
# Istio's CNI agent (istio-own.sh) keeps its run directory at this fixed path of the node,
# a hostPath its chart does not let a user move.
run_istio_cni_existed=
[ -e /var/run/istio-cni ] && run_istio_cni_existed=1

# Every process in the node's mount namespace (the holder's), the holder last.
node_processes() {
  [ -n "$holder" ] || return 0
  local ns pid
  ns="$(readlink "/proc/$holder/ns/mnt" 2>/dev/null)" || return 0
  for pid in /proc/[0-9]*; do
    pid="${pid#/proc/}"
    [ "$pid" != "$holder" ] || continue
    [ "$(readlink "/proc/$pid/ns/mnt" 2>/dev/null)" = "$ns" ] && echo "$pid"
  done
  echo "$holder"
}

# The node's processes outside that mount namespace: the containers (runc gives each its
# own mount namespace; all are in the node's cgroups) and containerd's shims (which run on
# after containerd; found by the socket they serve).
node_strays() {
  find /sys/fs/cgroup/*/"$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null
  pgrep -f -- "-address $WORK/containerd.sock" || true
}
kill_node() { # every process of the node, until none is left (10 rounds at most)
  local pids
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    pids="$(node_processes; node_strays)"
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
    sleep 0.5
  done
  log "processes of the node left: $(node_processes; node_strays)"
  left=1
}

teardown() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  if [ "$status" != 0 ]; then
    log "failed (exit $status); the last lines of each component's log:"
    for f in "$WORK"/logs/*.log; do
      [ -f "$f" ] || continue
      echo "----- $(basename "$f")" >&2
      tail -n 15 "$f" >&2
    done
    [ -z "$failure" ] || log "failed: $failure"
  fi
  if [ -n "$keep" ] && [ -n "$holder" ]; then
    log "--keep: the node stays up (kubectl: $WORK/kubectl.sh) until $WORK/release exists or run.sh gets SIGINT/SIGTERM"
    local released=
    trap 'released=1' INT TERM
    while [ -z "$released" ] && [ ! -e "$WORK/release" ]; do sleep 1; done
    trap - INT TERM
  fi
  log "tearing down"
  # The kubelet first, so that it restarts nothing; then every pod (their CNI DEL runs).
  stop_component kubelet
  if [ -S "$WORK/containerd.sock" ] && [ -n "$holder" ]; then
    timeout 60 nsenter --target "$holder" --mount --net -- crictl --runtime-endpoint "unix://$WORK/containerd.sock" rmp -fa \
      >"$WORK/logs/teardown-crictl.out" 2>&1 || log "crictl rmp -fa failed: $(cat "$WORK/logs/teardown-crictl.out")"
  fi
  for name in containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop_component "$name"
  done
  # Shims, containers, anything left in the mount namespace, then the holder.
  kill_node
  holder=
  # cgroups: deepest first, in every hierarchy.
  local root
  for root in /sys/fs/cgroup/*/"$CGROUP_ROOT" /sys/fs/cgroup/"$CGROUP_ROOT"; do
    [ -d "$root" ] || continue
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      find "$root" -depth -type d -exec rmdir {} + 2>/dev/null
      [ -d "$root" ] || break
      sleep 0.5
    done
    [ -d "$root" ] && { log "could not remove cgroup $root"; left=1; }
  done
  ip netns del "$NODE_NETNS" 2>/dev/null
  local tunable restored=1
  for tunable in "${!saved_tunables[@]}"; do
    sysctl -qw "$tunable=${saved_tunables[$tunable]}" >/dev/null \
      || { log "could not restore $tunable"; restored=; }
  done
  [ -z "$restored" ] || rm -f "$TUNABLES_FILE"
  [ -n "$run_containerd_existed" ] || rm -rf /run/containerd
  [ -n "$run_istio_cni_existed" ] || rm -rf /var/run/istio-cni
  if mount | grep -qF " $WORK"; then
    log "mounts left under $WORK in the host's namespace; not removing it"
  else
    rm -rf "$WORK"
  fi
  if mount | grep -qF " $WORK" || [ -e "$WORK" ]; then left=1; fi
  if [ -n "$left" ] && [ "$status" = 0 ]; then
    log "the teardown left something behind (see above)"
    status=1
  fi
  if [ "$status" = 0 ]; then log "done"; fi
  # The closing line: the scenarios' checks (a failure outside them counts as one more).
  if [ -n "${passes:-}" ]; then
    local failed="${failures:-0}"
    [ "$status" = 0 ] || [ "$failed" != 0 ] || failed=1
    echo "k8s: $passes passed, $failed failed"
  fi
  exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- a clean start ------------------------------------------------------------------------
# A run killed hard (SIGKILL) may have left its processes, namespace, cgroups or directory
# behind: its holder's pid is in WORK/holder.pid; everything in that holder's mount
# namespace goes, then the rest as the teardown removes it.
if [ -f "$WORK/holder.pid" ]; then
  old="$(cat "$WORK/holder.pid")"
  if [ "$(cat "/proc/$old/comm" 2>/dev/null)" = sleep ] \
    && [ "$(readlink "/proc/$old/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ]; then
    log "stopping what an earlier run left running (holder $old)"
    holder="$old"
  fi
fi
kill_node
holder=
for root in /sys/fs/cgroup/*/"$CGROUP_ROOT" /sys/fs/cgroup/"$CGROUP_ROOT"; do
  if [ -d "$root" ]; then
    find "$root" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ ! -d "$root" ] || die "cannot remove $root, left by an earlier run"
  fi
done
ip netns del "$NODE_NETNS" 2>/dev/null || true
if [ -e "$WORK" ]; then
  log "removing $WORK, left by an earlier run"
  rm -rf "$WORK"
fi
# A pod with hostUsers: false runs as an unprivileged uid of the node, which must be able
# to pass through the directories above its root filesystem (containerd's state) to reach
# it: search permission only, no listing.
mkdir -p "$STATE" && chmod 0711 "$STATE"
mkdir -p "$WORK"/{logs,pki,etcd,kubelet,pod-logs,containerd/root,containerd/state,runc,cni/bin,cni/net.d,cni/ipam,images}

# --- namespaces ---------------------------------------------------------------------------
ip netns add "$NODE_NETNS"
node_net="/run/netns/$NODE_NETNS"
ip -n "$NODE_NETNS" link set lo up
# The node's interface: a bridge with no port (this kernel has no dummy devices), so what is
# routed to it goes nowhere.
ip -n "$NODE_NETNS" link add node0 type bridge
ip -n "$NODE_NETNS" addr add "$NODE_IP/32" dev node0
ip -n "$NODE_NETNS" link set node0 up
ip -n "$NODE_NETNS" route add default dev node0
# No kube-proxy runs here. Pods reach the API server through its Service, as a client in a
# pod does (istiod, by KUBERNETES_SERVICE_HOST), so that one Service gets kube-proxy's rule.
ip netns exec "$NODE_NETNS" iptables -w -t nat -A PREROUTING -d "$SERVICE_IP/32" -p tcp --dport 443 \
  -m comment --comment "the kubernetes Service (no kube-proxy here)" -j DNAT --to-destination "$NODE_IP:6443"

# The holder: a process in the node's network namespace and in a new mount namespace,
# which every component joins; mounts made there stay there.
nsenter --net="$node_net" unshare --mount --propagation slave sleep infinity 9>&- &
holder=$!
disown "$holder"
echo "$holder" >"$WORK/holder.pid"
for _ in $(seq 50); do
  [ "$(readlink "/proc/$holder/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] && break
  sleep 0.1
done
[ "$(readlink "/proc/$holder/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] \
  || die "the holder did not get a mount namespace of its own"
# Mounts made in the node's namespace are shared among its mounts (the kubelet wants that for
# its volumes); none propagates to the host, whose mounts stay the masters.
in_node mount --make-rshared /

alive() { kill -0 "${component_pid[$1]}" 2>/dev/null || die "$1 exited; see its log above"; }
wait_for() { # WHAT SECONDS COMPONENT COMMAND...: until COMMAND succeeds, COMPONENT staying up
  local what="$1" seconds="$2" component="$3" start=$SECONDS
  shift 3
  until "$@" >/dev/null 2>&1; do
    alive "$component"
    [ $((SECONDS - start)) -lt "$seconds" ] || die "$what not ready after ${seconds}s"
    sleep 1
  done
  log "$what ready after $((SECONDS - start))s"
}

# --- certificates -------------------------------------------------------------------------
pki="$WORK/pki"
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=meshinit-k8s-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt"
cert() { # NAME SUBJECT [SAN]: a key and a certificate signed by the CA
  local name="$1" subject="$2" san="${3:-}" ext="$pki/$1.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=digitalSignature,keyEncipherment"
    if [ -n "$san" ]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$san"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl_quiet req -newkey rsa:2048 -nodes -subj "$subject" \
    -keyout "$pki/$name.key" -out "$pki/$name.csr"
  openssl_quiet x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 2 -extfile "$ext" -out "$pki/$name.crt"
}
cert apiserver "/CN=kube-apiserver" \
  "IP:127.0.0.1,IP:$NODE_IP,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
cert admin "/O=system:masters/CN=meshinit-k8s-admin"
cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
cert controller-manager "/CN=system:kube-controller-manager"
cert scheduler "/CN=system:kube-scheduler"
openssl_quiet genrsa -out "$pki/sa.key" 2048
openssl_quiet rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

kubeconfig() { # NAME: a kubeconfig for NAME's certificate
  cat >"$WORK/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: node
  cluster:
    certificate-authority: $pki/ca.crt
    server: https://127.0.0.1:6443
users:
- name: $1
  user:
    client-certificate: $pki/$1.crt
    client-key: $pki/$1.key
contexts:
- name: node
  context: {cluster: node, user: $1}
current-context: node
EOF
}
for name in admin kubelet controller-manager scheduler; do kubeconfig "$name"; done
kubectl() { in_node "$bin/kubectl" --kubeconfig "$WORK/admin.kubeconfig" "$@"; }
crictl() { in_node "$bin/crictl" --runtime-endpoint "unix://$WORK/containerd.sock" "$@"; }
cat >"$WORK/kubectl.sh" <<EOF
#!/bin/sh
# kubectl against the node (while run.sh --keep holds it up)
exec nsenter --target $holder --mount --net -- $bin/kubectl --kubeconfig $WORK/admin.kubeconfig "\$@"
EOF
chmod +x "$WORK/kubectl.sh"

# --- etcd, the API server, the controllers ------------------------------------------------
start_component etcd etcd --name node --data-dir "$WORK/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster node=http://127.0.0.1:2380 --listen-metrics-urls "" \
  --unsafe-no-fsync --log-level warn

# --enable-aggregator-routing: the API server calls webhooks (istiod's injector) at their
# Service's endpoints rather than its cluster IP, which no kube-proxy serves here.
start_component kube-apiserver kube-apiserver \
  --etcd-servers http://127.0.0.1:2379 \
  --bind-address 0.0.0.0 --secure-port 6443 --advertise-address "$NODE_IP" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --client-ca-file "$pki/ca.crt" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --kubelet-client-certificate "$pki/admin.crt" --kubelet-client-key "$pki/admin.key" \
  --kubelet-preferred-address-types InternalIP \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --allow-privileged=true --profiling=false --v=1 \
  --enable-aggregator-routing=true
wait_for "kube-apiserver" 180 kube-apiserver kubectl get --raw /readyz

start_component kube-controller-manager kube-controller-manager \
  --kubeconfig "$WORK/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$WORK/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$WORK/controller-manager.kubeconfig" \
  --leader-elect=false --bind-address 127.0.0.1 --secure-port 10257 \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --use-service-account-credentials=true --controllers '*,-nodeipam,-cloud-node-lifecycle' \
  --profiling=false --v=1
start_component kube-scheduler kube-scheduler \
  --kubeconfig "$WORK/scheduler.kubeconfig" \
  --authentication-kubeconfig "$WORK/scheduler.kubeconfig" \
  --authorization-kubeconfig "$WORK/scheduler.kubeconfig" \
  --leader-elect=false --bind-address 127.0.0.1 --secure-port 10259 --profiling=false --v=1

# --- containerd ---------------------------------------------------------------------------
for plugin in bridge host-local loopback; do
  ln -s "/usr/lib/cni/$plugin" "$WORK/cni/bin/$plugin"
done
# meshinit-cni: installed once meshinit's image is built (below), from the image.
# The node's CNI network: the bridge (with host-local addresses), and, with `with-meshinit`,
# meshinit-cni chained after it, taking each pod's annotations from containerd, excluding
# kube-system (MESHINIT_CNI_EXCLUDE, a JSON list, overrides: bench.sh's). containerd
# reloads the directory on a write (not on a file created or renamed into it), so the file
# is rewritten in place, and the change waited for.
node_cni_config() { # with-meshinit | without-meshinit
  local chained=
  if [ "$1" = with-meshinit ]; then
    chained=',
    {
      "type": "meshinit-cni",
      "capabilities": {"io.kubernetes.cri.pod-annotations": true},
      "exclude_namespaces": '"${MESHINIT_CNI_EXCLUDE:-[\"kube-system\"]}"'
    }'
  fi
  cat >"$WORK/cni/10-node.conflist.tmp" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$WORK/cni/ipam"
      }
    }$chained
  ]
}
EOF
  cat "$WORK/cni/10-node.conflist.tmp" >"$WORK/cni/net.d/10-node.conflist"
  rm "$WORK/cni/10-node.conflist.tmp"
  if [ -n "${component_pid[containerd]:-}" ]; then
    wait_for "containerd's CNI configuration ($1)" 30 containerd cni_config_is "$1"
  fi
}
loaded_cni_types() { # the types of the plugins containerd has loaded, in order
  crictl info | python3 -c 'import json,sys
d = json.load(sys.stdin)
c = d.get("cniconfig") or d.get("config", {}).get("cniconfig") or {}
print(" ".join(p["Network"]["type"] for n in c.get("Networks", []) for p in n["Config"]["Plugins"]))'
}
cni_config_is() { # with-meshinit | without-meshinit: what containerd has loaded
  local loaded
  loaded="$(loaded_cni_types)"
  case "$1" in
    with-meshinit) [[ " $loaded " == *" meshinit-cni "* ]] ;;
    *) [[ " $loaded " == *" bridge "* && " $loaded " != *" meshinit-cni "* ]] ;;
  esac
}
node_cni_config without-meshinit
PAUSE_IMAGE=localhost/meshinit-k8s-pause:catatonit
cat >"$WORK/containerd.toml" <<EOF
version = 3
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"

[grpc]
  address = "$WORK/containerd.sock"

[ttrpc]
  address = "$WORK/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = "$WORK/containerd/opt"
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "$PAUSE_IMAGE"
  [plugins.'io.containerd.cri.v1.runtime']
    netns_mounts_under_state_dir = true
    # This machine's root lacks CAP_SYS_RESOURCE (it is not in the bounding set), so no
    # process may lower its oom_score_adj below its parent's: runc would fail to give the
    # sandbox containerd's -998 ("failed to update /proc/self/oom_score_adj: Permission
    # denied"). Keep every container at or above containerd's own, as rootless setups do.
    restrict_oom_score_adj = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = "${MESHINIT_K8S_RUNC:-$addons/runc}"
          Root = "$WORK/runc"
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["$WORK/cni/bin"]
      conf_dir = "$WORK/cni/net.d"
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
EOF
# containerd looks up its shim on PATH; the shim, runc.
start_component containerd env PATH="$bin:$PATH" containerd --config "$WORK/containerd.toml"
wait_for "containerd" 60 containerd crictl info

# --- images -------------------------------------------------------------------------------
export CONTAINERS_CONF="$repo/tests/podman/containers.conf"
podman_opts=(--root "$STATE/podman" --runroot /run/meshinit-test/podman/storage
  --tmpdir /run/meshinit-test/podman/libpod)
podman() { command podman "${podman_opts[@]}" "$@"; }
MESHINIT_IMAGE=localhost/meshinit:k8s
HELPER_IMAGE=localhost/meshinit-k8s-helper:test
# Istio's images, as istiod's chart and injector name them: istiod (pilot-discovery, built
# from the pinned module by build-addons.sh) and a stand-in for istio-proxy (proxyv2).
ISTIOD_IMAGE=localhost/meshinit-k8s-istiod:test
PROXY_IMAGE=localhost/meshinit-k8s-proxy:test
build_images() {
  PODMAN_OPTS="${podman_opts[*]}" bash "$repo/tests/podman/build-offline.sh" "$MESHINIT_IMAGE" \
    >"$WORK/logs/image-build.out" 2>"$WORK/logs/image-build.err" \
    || die "tests/podman/build-offline.sh failed: $(tail -n 30 "$WORK/logs/image-build.err")"
  # The helper: the integration tests' binary (its roles: support::roles), env, and the
  # libraries they load, nothing else.
  local rootfs
  HELPER_EXE="$(cd "$repo" && cargo test --quiet --test integration --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "integration":
        print(m["executable"])')"
  [ -x "$HELPER_EXE" ] || die "could not find the integration test binary"
  rootfs="$WORK/images/helper"
  mkdir -p "$rootfs/usr/bin" "$rootfs/tmp"
  chmod 1777 "$rootfs/tmp"
  cp "$HELPER_EXE" "$rootfs/mi-helper"
  cp /usr/bin/env "$rootfs/usr/bin/env"
  local lib
  for lib in $(ldd "$HELPER_EXE" /usr/bin/env | awk '$2 == "=>" { print $3 } NF == 2 && $1 ~ /^\// { print $1 }' | sort -u); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
  tar -C "$rootfs" -cf "$WORK/images/helper.tar" .
  podman import --quiet "$WORK/images/helper.tar" "$HELPER_IMAGE" >/dev/null
  # The stand-in istio-proxy: the helper, started by Istio's injected container (args
  # `proxy sidecar ...`, which libtest takes as test-name filters after `--`) as a sidecar
  # role: 15001 and 15006 (transparent when istio-proxy has NET_ADMIN, under TPROXY) answer
  # with the original destination, 15021 answers the kubelet's readiness probes.
  podman import --quiet \
    --change 'ENTRYPOINT ["/mi-helper", "support::roles::helper_entrypoint", "--exact", "--nocapture", "--test-threads=1", "--"]' \
    --change 'ENV MESHINIT_TEST_ROLE="serve sidecar tcp:0.0.0.0:15001 inbound:0.0.0.0:15006 http:0.0.0.0:15021"' \
    --change 'ENV MESHINIT_TEST_NO_PDEATHSIG=1' \
    "$WORK/images/helper.tar" "$PROXY_IMAGE" >/dev/null
  # istiod: pilot-discovery alone, as uid 1337 (Istio's image's user; the chart says
  # runAsNonRoot).
  rootfs="$WORK/images/istiod"
  mkdir -p "$rootfs/usr/local/bin" "$rootfs/tmp" "$rootfs/etc"
  chmod 1777 "$rootfs/tmp"
  cp "$addons/pilot-discovery" "$rootfs/usr/local/bin/"
  echo "istio-proxy:x:1337:1337::/tmp:/nonexistent" >"$rootfs/etc/passwd"
  tar -C "$rootfs" -cf "$WORK/images/istiod.tar" .
  podman import --quiet --change 'ENTRYPOINT=["/usr/local/bin/pilot-discovery"]' --change 'USER=1337:1337' \
    "$WORK/images/istiod.tar" "$ISTIOD_IMAGE" >/dev/null
  # The pause image: catatonit (static) as podman's infra containers run it.
  rootfs="$WORK/images/pause"
  mkdir -p "$rootfs"
  cp "$(command -v catatonit)" "$rootfs/catatonit"
  tar -C "$rootfs" -cf "$WORK/images/pause.tar" .
  podman import --quiet --change 'ENTRYPOINT=["/catatonit","-P"]' \
    "$WORK/images/pause.tar" "$PAUSE_IMAGE" >/dev/null
  podman save --quiet --multi-image-archive --format docker-archive \
    -o "$WORK/images/all.tar" "$MESHINIT_IMAGE" "$HELPER_IMAGE" "$PAUSE_IMAGE" "$PROXY_IMAGE" "$ISTIOD_IMAGE"
  in_node ctr --address "$WORK/containerd.sock" -n k8s.io images import \
    "$WORK/images/all.tar" >/dev/null
  rm -rf "$WORK/images"
}
timed "images (build, import)" build_images
# meshinit-cni: the image's own binary (the static release build the node agent installs),
# under the name that makes it the CNI plugin: both modes then run the same build (cargo's
# debug build costs an ADD about 1.6 ms more CPU; docs/measured.md).
install_plugin() {
  local ctr
  ctr="$(podman create "$MESHINIT_IMAGE")"
  podman cp "$ctr:/usr/local/bin/meshinit" "$WORK/cni/meshinit"
  podman rm "$ctr" >/dev/null
}
install_plugin
[ -x "$WORK/cni/meshinit" ] || die "could not copy meshinit out of $MESHINIT_IMAGE"
ln -s "$WORK/cni/meshinit" "$WORK/cni/bin/meshinit-cni"

# --- the kubelet --------------------------------------------------------------------------
for hierarchy in /sys/fs/cgroup/*/; do
  mkdir -p "$hierarchy$CGROUP_ROOT"
  if [ -f "${hierarchy}cpuset.cpus" ]; then
    cat "${hierarchy}cpuset.cpus" >"$hierarchy$CGROUP_ROOT/cpuset.cpus"
    cat "${hierarchy}cpuset.mems" >"$hierarchy$CGROUP_ROOT/cpuset.mems"
  fi
done
echo "nameserver $NODE_IP" >"$WORK/resolv.conf"
cat >"$WORK/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 (hybrid: /sys/fs/cgroup is a tmpfs of v1 hierarchies). Kubelet
# 1.34 runs there with a warning (failCgroupV1 defaults to false); 1.35 and later refuse to
# start unless it is false. Said explicitly, so that a version bump does not change it.
failCgroupV1: false
# No systemd manages this machine's cgroups (PID 1 is not systemd).
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_ROOT
failSwapOn: false
containerRuntimeEndpoint: unix://$WORK/containerd.sock
podLogsDir: $WORK/pod-logs
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
registerNode: true
# The pods' resolv.conf: the node's address, where no DNS server listens (the machine's
# own resolver is not for pods that only talk to each other).
resolvConf: $WORK/resolv.conf
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
# The machine's disk is shared with everything else: evict nothing, collect no images.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 110
# Its own oom_score_adj: it cannot lower it here (no CAP_SYS_RESOURCE, see containerd's
# restrict_oom_score_adj).
oomScoreAdj: 0
EOF
start_kubelet() {
  start_component kubelet kubelet --config "$WORK/kubelet.yaml" \
    --kubeconfig "$WORK/kubelet.kubeconfig" --root-dir "$WORK/kubelet" --cert-dir "$WORK/pki/kubelet" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v=1
}
node_ready() {
  [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
start_kubelet
wait_for "node $NODE_NAME" 180 kubelet node_ready

# --- scenarios ----------------------------------------------------------------------------
# shellcheck source=tests/k8s/scenarios.sh
. "$here/scenarios.sh"
if [ -n "$bench" ]; then
  # shellcheck source=tests/k8s/bench.sh
  . "$here/bench.sh"
  unset passes # no checks: no closing line
  ensure_namespaces
  run_bench
else
  run_scenarios
fi
