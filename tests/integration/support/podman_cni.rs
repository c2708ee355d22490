//! podman with its CNI network backend, on a "node" of the test's own: a network namespace
//! where podman runs (`nsenter --net`), so that the CNI bridge, the pods' veths and the
//! remote servers all live there and nothing is created in the test runner's namespace.
//!
//! ```text
//!  node (test's netns)                              pod (podman's netns, per pod)
//!  mi-br0 192.0.2.1/24  ── veth (bridge plugin) ──  eth0 192.0.2.2/24 (host-local)
//!  lo     198.51.100.30/32  ("Vault": 8200, 8300)   routes 198.51.100.0/24, 203.0.113.0/24
//! ```
//!
//! Each node has one CNI network, written by the test into a directory of its own with the
//! plugins it may use (symlinks to Debian's `containernetworking-plugins`, and
//! `meshinit-cni` to the meshinit binary under test) and a containers.conf pointing
//! podman's `network_config_dir` and `cni_plugin_dirs` there; host-local's state lives
//! there too. Images, containers and run state are `support::podman`'s storage (the image
//! is built once per run there). podman passes its own `CNI_ARGS` environment on to the
//! plugins after its `K8S_POD_NAME` (the pod's name): the node sets
//! `K8S_POD_NAMESPACE`, as a kubelet does, so meshinit-cni sees a Kubernetes pod.
//!
//! Everything is removed by guards, also when a test fails: pods (and with them CNI DEL),
//! the namespace, the directory, and any result libcni cached for the network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};

use super::netns::NetNs;
use super::podman::{fresh_name, global_options, PodContainers};
use super::procs::Background;
use super::scratch::ScratchDir;
use super::{expect_success, run_bounded};

/// The pod's address: host-local's range holds only this one, so a restarted pod gets it
/// back.
pub const POD_IP: &str = "192.0.2.2";
/// The node's side of the bridge, the pod's gateway.
pub const NODE_IP: &str = "192.0.2.1";
/// "Vault", a service outside the mesh, served on the node.
pub const VAULT: &str = "198.51.100.30:8200";
/// The Kubernetes namespace the node tells the plugins the pods are in.
pub const POD_NAMESPACE: &str = "shop";
/// The bridge the CNI bridge plugin makes on the node.
const BRIDGE: &str = "mi-br0";
/// Debian's CNI plugins (`containernetworking-plugins`).
pub const CNI_PLUGINS: &str = "/usr/lib/cni";
/// libcni's cache of results, which podman does not let us move.
const CNI_RESULTS: &str = "/var/lib/cni/results";

/// Bound on a podman command (a pod start runs its init containers to completion).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// Programs besides those of `require_podman`: the CNI plugins and nsenter.
pub const REQUIRED: [&str; 4] = [
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
    "nsenter",
];

/// Whether podman's CNI backend can be used here (after `require_podman`): skips with a
/// reason, or fails under `CI=true`.
pub fn require_cni(test_name: &str) -> bool {
    let Some(missing) = REQUIRED.iter().find(|p| which::which(p).is_err()) else {
        return true;
    };
    let reason =
        format!("needs {missing} (scripts/test.sh installs containernetworking-plugins as root)");
    super::skip(test_name, &reason);
    false
}

/// The meshinit binary the node's `meshinit-cni` links to: `MESHINIT_BIN` (the bench
/// points it at the static release build, which the image ships) or cargo's build.
pub fn meshinit_binary() -> PathBuf {
    std::env::var_os("MESHINIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meshinit")))
}

/// The `sidecar.istio.io/status` the injector writes on a pod in Istio CNI mode.
pub const CNI_MODE_STATUS: &str = r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["istio-envoy"]}"#;

/// meshinit's entry in the conflist: an injected pod's annotations (podman passes no
/// `io.kubernetes.cri.pod-annotations`, so they come from the configuration).
pub fn meshinit_plugin(annotations: &[(&str, &str)]) -> Value {
    let mut pod = serde_json::Map::new();
    pod.insert("sidecar.istio.io/status".into(), CNI_MODE_STATUS.into());
    for (k, v) in annotations {
        pod.insert((*k).into(), (*v).into());
    }
    json!({
        "type": "meshinit-cni",
        "exclude_namespaces": ["kube-system", "istio-system"],
        "pod_annotations": pod,
    })
}

/// A node: its namespace, its CNI network (the bridge plugin, then `chained` plugins) and
/// the remote servers. Pods borrow it, so they go first.
pub struct Node {
    _servers: Option<Background>,
    netns: NetNs,
    dir: ScratchDir,
    network: String,
    /// The `CNI_ARGS` podman runs with (and passes on to the plugins).
    cni_args: Option<String>,
}

impl Node {
    /// A node whose network chains `chained` (e.g. [`meshinit_plugin`]) after the bridge,
    /// and whose podman passes `K8S_POD_NAMESPACE` as a kubelet does.
    pub fn new(chained: &[Value]) -> Node {
        Node::with_cni_args(chained, Some(format!("K8S_POD_NAMESPACE={POD_NAMESPACE}")))
    }

    /// [`Node::new`], with plain podman's `CNI_ARGS` (only its own `K8S_POD_NAME`).
    pub fn without_pod_namespace(chained: &[Value]) -> Node {
        Node::with_cni_args(chained, None)
    }

    fn with_cni_args(chained: &[Value], cni_args: Option<String>) -> Node {
        let netns = NetNs::new("node");
        netns.ip_batch(
            "link set lo up\n\
             addr add 198.51.100.30/32 dev lo\n",
        );
        let dir = ScratchDir::new("cni");
        let network = fresh_name("net");
        let plugins = dir.path().join("plugins");
        let config = dir.path().join("net");
        for sub in [&plugins, &config] {
            std::fs::create_dir_all(sub).expect("CNI directories");
        }
        for plugin in ["bridge", "host-local", "loopback", "portmap"] {
            let target = Path::new(CNI_PLUGINS).join(plugin);
            std::os::unix::fs::symlink(&target, plugins.join(plugin)).expect("plugin link");
        }
        std::os::unix::fs::symlink(meshinit_binary(), plugins.join("meshinit-cni"))
            .expect("meshinit-cni link");
        let bridge = json!({
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": dir.path().join("ipam"),
                "ranges": [[{
                    "subnet": "192.0.2.0/24",
                    "gateway": NODE_IP,
                    "rangeStart": POD_IP,
                    "rangeEnd": POD_IP,
                }]],
                "routes": [{"dst": "198.51.100.0/24"}, {"dst": "203.0.113.0/24"}],
            },
        });
        let mut list = vec![bridge];
        list.extend_from_slice(chained);
        let conflist = json!({"cniVersion": "1.0.0", "name": network, "plugins": list});
        dir.write(
            &format!("net/{network}.conflist"),
            &serde_json::to_string_pretty(&conflist).expect("JSON"),
        );
        let base = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/podman/containers.conf"),
        )
        .expect("tests/podman/containers.conf");
        dir.write(
            "containers.conf",
            &format!(
                "{base}\n[network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\n\
                 cni_plugin_dirs = [\"{}\"]\n",
                config.display(),
                plugins.display()
            ),
        );
        let servers = Background::serve(
            &netns,
            None,
            "peer",
            &[
                "tcp:198.51.100.30:8200".to_owned(),
                "tcp:198.51.100.30:8300".to_owned(),
            ],
        );
        Node {
            _servers: Some(servers),
            netns,
            dir,
            network,
            cni_args,
        }
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// The plugin directory (CNI_PATH).
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    /// The network's conflist, as podman reads it.
    pub fn conflist(&self) -> Value {
        let text = std::fs::read_to_string(
            self.dir
                .path()
                .join("net")
                .join(format!("{}.conflist", self.network)),
        )
        .expect("conflist");
        serde_json::from_str(&text).expect("conflist JSON")
    }

    /// `podman ARGS` on this node: in its namespace, with its containers.conf and (unless
    /// made [`Node::without_pod_namespace`]) the `CNI_ARGS` a kubelet would add.
    pub fn podman(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.netns.name()))
            .arg("podman")
            .args(global_options())
            .args(args)
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"));
        match &self.cni_args {
            Some(args) => cmd.env("CNI_ARGS", args),
            None => cmd.env_remove("CNI_ARGS"),
        };
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run_bounded(&mut self.podman(args), COMMAND_TIMEOUT)
    }

    pub fn expect(&self, args: &[&str]) -> String {
        expect_success(&format!("podman {args:?}"), self.run(args))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The servers stop before their namespace goes; the rest drop after this.
        self._servers.take();
        // libcni caches each attachment's result until DEL; a pod removed without one
        // (a crashed podman) leaves it behind.
        let prefix = format!("{}-", self.network);
        if let Ok(entries) = std::fs::read_dir(CNI_RESULTS) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// A pod on a node's network, with an infra container (podman's pause image) that holds
/// its network namespace, as a kubelet's sandbox does: CNI ADD runs when it starts, before
/// any init container. Removed with its containers on drop.
pub struct Pod<'a> {
    node: &'a Node,
    name: String,
}

impl PodContainers for Pod<'_> {
    fn podman_run(&self, args: &[&str]) -> Output {
        self.node.run(args)
    }

    fn pod_name(&self) -> &str {
        &self.name
    }

    /// The pod joins the node's CNI network through its infra container.
    fn container_options(&self) -> Vec<&str> {
        vec!["--pull=never"]
    }
}

impl<'a> Pod<'a> {
    pub fn new(node: &'a Node, role: &str) -> Pod<'a> {
        let pod = Pod {
            node,
            name: fresh_name(role),
        };
        node.expect(&[
            "pod",
            "create",
            "--name",
            &pod.name,
            "--network",
            &node.network,
        ]);
        pod
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `podman pod stop`: every container, then the infra container (CNI DEL).
    pub fn stop(&self) -> Output {
        self.node.run(&["pod", "stop", "--time", "0", &self.name])
    }

    /// When container `role` last started, in ns since the epoch.
    pub fn started_at(&self, role: &str) -> i128 {
        self.started_at_of(&self.container_name(role))
    }

    /// When the infra container last started: podman starts it once CNI ADD is done.
    pub fn infra_started_at(&self) -> i128 {
        let infra = self.node.expect(&[
            "pod",
            "inspect",
            "--format",
            "{{.InfraContainerID}}",
            &self.name,
        ]);
        self.started_at_of(infra.trim())
    }

    fn started_at_of(&self, container: &str) -> i128 {
        let out = self.node.expect(&[
            "inspect",
            "--format",
            "{{.State.StartedAt.UnixNano}}",
            container,
        ]);
        out.trim()
            .parse()
            .unwrap_or_else(|err| panic!("StartedAt of {container}: {out:?}: {err}"))
    }

    /// The capabilities container `role` runs with (podman's `EffectiveCaps`).
    pub fn effective_caps(&self, role: &str) -> Vec<String> {
        let out = self.inspect(role, "{{json .EffectiveCaps}}");
        serde_json::from_str::<Option<Vec<String>>>(&out)
            .unwrap_or_else(|err| panic!("EffectiveCaps of {role}: {out:?}: {err}"))
            .unwrap_or_default()
    }

    /// The pod's network namespace, as podman made it (`/run/netns/netns-…`), while the
    /// infra container runs.
    pub fn netns_path(&self) -> PathBuf {
        let infra = self.node.expect(&[
            "pod",
            "inspect",
            "--format",
            "{{.InfraContainerID}}",
            &self.name,
        ]);
        let path = self.node.expect(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.SandboxKey}}",
            infra.trim(),
        ]);
        PathBuf::from(path.trim())
    }

    /// Runs `argv` in the pod's network namespace (only that: `nsenter --net`), bounded.
    pub fn in_netns(&self, argv: &[&str]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()))
            .args(argv);
        run_bounded(&mut cmd, Duration::from_secs(10))
    }

    /// Every iptables rule in the pod's namespace, on both backends and both families,
    /// normalised for comparison: comment lines dropped, counters zeroed.
    pub fn iptables_save(&self) -> String {
        let mut all = String::new();
        for tool in [
            "iptables-nft-save",
            "ip6tables-nft-save",
            "iptables-legacy-save",
            "ip6tables-legacy-save",
        ] {
            let out = expect_success(tool, self.in_netns(&[tool]));
            all.push_str(&format!("## {tool}\n{}", normalise_save(&out)));
        }
        all
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        let output = self
            .node
            .run(&["pod", "rm", "--force", "--time", "0", &self.name]);
        if !output.status.success() {
            eprintln!(
                "warning: could not remove pod {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// `iptables-save` output without its `#` lines and with every counter `[0:0]`.
pub fn normalise_save(save: &str) -> String {
    let mut out = String::new();
    for line in save.lines().filter(|l| !l.starts_with('#')) {
        let line = match line.rfind(" [") {
            Some(at) if line.starts_with(':') && line.ends_with(']') => {
                format!("{} [0:0]", &line[..at])
            }
            _ => line.to_owned(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[test]
fn normalise_save_zeroes_counters_and_drops_comments() {
    let save = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [3:180]\n\
                :ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n# Completed\n";
    assert_eq!(
        normalise_save(save),
        "*nat\n:PREROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
    );
}
