//! meshinit's real image, in a real pod lifecycle: the repository's Dockerfile is built
//! offline (once per run, see `support::podman`), and podman runs pods the way a kubelet
//! does: the meshinit image as the init container, with the securityContext Istio's
//! injector gives istio-init, then a fake sidecar and an app, all sharing one network
//! namespace built by the test (documentation addresses only, see `support::topology`).
//!
//! The sidecar and the app are this test binary's helper roles (`support::roles`), bind-
//! mounted into containers of the Debian base image the build used.
//!
//! Needs root and podman: skips with a reason otherwise, fails under `CI=true`.

use std::collections::HashMap;

use crate::injector_template::{rendered_init_args, MOUNTED_ANNOTATIONS};
use crate::support::k8s::{
    downward_api_annotations, require_kubernetes_validate, INIT_CPU_LIMIT, INIT_MEMORY_BYTES,
};
use crate::support::podman::{
    self, assert_blocked_by_init, images, require_podman, CgroupParent, Container, Pod,
    PodContainers,
};
use crate::support::procs::{connect, Background, Outcome, Proto, Reply};
use crate::support::scratch::ScratchDir;
use crate::support::topology::{Topology, PEER_IP};

/// "Vault": a service outside the mesh, on the peer.
const VAULT: &str = "198.51.100.30:8200";
/// Another service on the same address.
const VAULT_8300: &str = "198.51.100.30:8300";
/// The app's port, reached from the peer.
const POD_8080: &str = "192.0.2.2:8080";
/// Each arch's image must stay under this (Istio's proxyv2, which istio-init uses, is
/// ~160 MB).
const MAX_IMAGE_BYTES: u64 = 10_000_000;
/// The largest page size of arm64 kernels users run (RHEL 9's kernel-64k, some Ampere
/// setups): the arm64 image must load there.
const ARM64_MAX_PAGE_SIZE: u32 = 65536;

/// The peer's servers: Vault and its neighbour.
fn peer_listeners() -> Vec<String> {
    [VAULT, VAULT_8300].map(|addr| format!("tcp:{addr}")).into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Redirect,
    Tproxy,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Redirect => "REDIRECT",
            Mode::Tproxy => "TPROXY",
        }
    }
}

/// The init container's args, exactly as Istio's injector renders them for a pod without
/// annotations (pkg/kube/inject/testdata/inject/hello.yaml.injected), in `mode`.
fn injector_args(mode: Mode) -> Vec<&'static str> {
    vec![
        "istio-iptables",
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        mode.as_str(),
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
        "--log_output_level=default:info",
    ]
}

/// podman's spelling of the init container's securityContext and resources, as in
/// manifests/: run as root, no privilege escalation, read-only root filesystem (and no
/// tmpfs podman would add), every capability dropped and, when `granted`, NET_ADMIN and
/// NET_RAW added; the manifests' CPU and memory limits.
fn init_options(granted: bool, cgroup: &CgroupParent) -> Vec<String> {
    let mut options: Vec<String> = [
        "--init-ctr=always",
        "--user=0:0",
        "--security-opt=no-new-privileges",
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop=all",
        // Only the container in the cgroup, not podman's monitor, for the memory peak.
        "--cgroups=no-conmon",
    ]
    .map(String::from)
    .into();
    if granted {
        options.push("--cap-add=NET_ADMIN,NET_RAW".to_owned());
    }
    options.extend([
        format!("--cgroup-parent={}", cgroup.path()),
        format!("--memory={INIT_MEMORY_BYTES}"),
        format!("--cpus={INIT_CPU_LIMIT}"),
    ]);
    options
}

/// The sidecar: Envoy's outbound and inbound listeners. Under REDIRECT it runs as
/// 1337:1337 with no capability; under TPROXY as Istio runs it, uid 0, gid 1337, with
/// NET_ADMIN only, for the transparent inbound listener.
fn sidecar(mode: Mode) -> (Vec<&'static str>, String) {
    let (options, inbound) = match mode {
        Mode::Redirect => (vec!["--user=1337:1337", "--cap-drop=all"], "tcp"),
        Mode::Tproxy => (
            vec!["--user=0:1337", "--cap-drop=all", "--cap-add=NET_ADMIN"],
            "tproxy",
        ),
    };
    let spec = format!("serve sidecar tcp:0.0.0.0:15001 {inbound}:0.0.0.0:15006");
    (options, spec)
}

/// The app: uid 1000, no capability, serving 8080 (which the capture sends to the
/// sidecar instead).
const APP_OPTIONS: [&str; 2] = ["--user=1000:1000", "--cap-drop=all"];
const APP_SPEC: &str = "serve app tcp:0.0.0.0:8080";

/// A pod in `topo.pod`'s namespace with meshinit's image as its init container (args for
/// `mode`, plus `extra`), a sidecar and an app; not started.
fn meshed_pod(
    topo: &Topology,
    mode: Mode,
    granted: bool,
    extra: &[&str],
    cgroup: &CgroupParent,
) -> Pod {
    let mut args = injector_args(mode);
    args.extend_from_slice(extra);
    meshed_pod_with(topo, mode, granted, &args, &[], cgroup)
}

/// [`meshed_pod`] with the init container's args (`istio-iptables …`) and more options.
fn meshed_pod_with(
    topo: &Topology,
    mode: Mode,
    granted: bool,
    args: &[&str],
    more_options: &[String],
    cgroup: &CgroupParent,
) -> Pod {
    let images = images();
    let pod = Pod::new("pod", &topo.pod);
    let mut options = init_options(granted, cgroup);
    options.extend_from_slice(more_options);
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    pod.create("init", &options, &images.meshinit, args);
    let (sidecar_options, sidecar_spec) = sidecar(mode);
    pod.create_helper("sidecar", &sidecar_options, &images.base, &sidecar_spec);
    pod.create_helper("app", &APP_OPTIONS, &images.base, APP_SPEC);
    pod
}

fn answered(outcome: &Outcome) -> Option<&Reply> {
    match outcome {
        Outcome::Answered(reply) => Some(reply),
        Outcome::Failed(_) => None,
    }
}

/// Starts a pod that must come up, and checks its traffic: the app's connection to Vault
/// reaches the sidecar's outbound listener with Vault as original destination; the peer's
/// connection to the app's 8080 reaches the inbound listener (REDIRECT: original
/// destination kept; TPROXY: the listener's own address is 8080's, the client's address
/// is kept); the sidecar's own connection to Vault is not captured. Returns the init
/// container's logs.
fn check_meshed_pod(test: &str, topo: &Topology, pod: &Pod, mode: Mode) -> String {
    check_pod_traffic(test, topo, pod, mode, &[(VAULT, true)])
}

/// [`check_meshed_pod`], with the app's outbound connections to make: (target, whether the
/// sidecar takes it; if not, the peer itself must answer).
fn check_pod_traffic(
    test: &str,
    topo: &Topology,
    pod: &Pod,
    mode: Mode,
    outbound: &[(&str, bool)],
) -> String {
    let started = pod.start();
    let init_logs = pod.logs("init");
    assert!(
        started.status.success(),
        "{test}: pod start failed ({}): {}\ninit container:\n{init_logs}",
        started.status,
        String::from_utf8_lossy(&started.stderr)
    );
    assert_eq!(pod.state("init").exit_code, 0, "{test}: {init_logs}");
    pod.wait_ready("sidecar");
    pod.wait_ready("app");

    let inbound = connect(&topo.peer, None, Proto::Tcp, POD_8080);
    let proxy_own = pod.connect("sidecar", "1337:1337", Proto::Tcp, VAULT);

    let mut wrong = Vec::new();
    for &(target, captured) in outbound {
        let got = pod.connect("app", "1000:1000", Proto::Tcp, target);
        let ok = answered(&got).is_some_and(|r| {
            if captured {
                r.by == "sidecar"
                    && r.port == 15001
                    && r.orig.is_some_and(|o| o.to_string() == target)
            } else {
                r.by == "peer" && r.local.to_string() == target
            }
        });
        if !ok {
            let expected = if captured {
                format!("the sidecar's 15001 with original destination {target}")
            } else {
                "the peer itself".to_owned()
            };
            wrong.push(format!("app → {target}: expected {expected}, got {got:?}"));
        }
    }
    let inbound_ok = answered(&inbound).is_some_and(|r| {
        r.by == "sidecar"
            && r.port == 15006
            && match mode {
                Mode::Redirect => r.orig.is_some_and(|o| o.to_string() == POD_8080),
                Mode::Tproxy => {
                    r.local.to_string() == POD_8080 && r.client.ip().to_string() == PEER_IP
                }
            }
    });
    if !inbound_ok {
        wrong.push(format!(
            "peer → {POD_8080}: expected the sidecar's 15006 ({mode:?}), got {inbound:?}"
        ));
    }
    let proxy_ok =
        answered(&proxy_own).is_some_and(|r| r.by == "peer" && r.local.to_string() == VAULT);
    if !proxy_ok {
        wrong.push(format!(
            "sidecar (1337) → {VAULT}: expected the peer itself, got {proxy_own:?}"
        ));
    }
    assert!(
        wrong.is_empty(),
        "{test}:\n{}\ninit container:\n{init_logs}\nrules in the pod:\n{}",
        wrong.join("\n"),
        crate::support::meshinit::dump_rules(&topo.pod)
    );
    init_logs
}

/// Reports the init container's memory peak, and fails if it comes near the manifests'
/// limit (it ran under that limit too, so an overrun would have been killed).
fn check_memory(test: &str, cgroup: &CgroupParent) {
    let peak = cgroup.peak_memory();
    eprintln!(
        "{test}: init container memory peak {:.1} MiB (limit {} MiB)",
        peak as f64 / f64::from(1 << 20),
        INIT_MEMORY_BYTES >> 20
    );
    assert!(
        peak < INIT_MEMORY_BYTES / 2,
        "{test}: the init container's memory peak, {peak} bytes, leaves less than half of \
         the manifests' limit ({INIT_MEMORY_BYTES}) spare"
    );
}

/// A fresh pod in `mode`, init container args `extra` added: traffic is captured, and the
/// init container's memory stays well inside the manifests' limit. Returns the init
/// container's logs and the namespace's nftables ruleset.
fn pod_lifecycle(test: &str, mode: Mode, extra: &[&str]) -> Option<(String, String)> {
    if !require_podman(test) {
        return None;
    }
    let topo = Topology::builder().build();
    let _vault = Background::serve(&topo.peer, None, "peer", &peer_listeners());
    let cgroup = CgroupParent::new("init");
    let pod = meshed_pod(&topo, mode, true, extra, &cgroup);
    let logs = check_meshed_pod(test, &topo, &pod, mode);
    check_memory(test, &cgroup);
    Some((logs, topo.pod.run(&["nft", "list", "ruleset"])))
}

#[test]
fn pod_redirect() {
    let test = "pod_redirect";
    if let Some((logs, _)) = pod_lifecycle(test, Mode::Redirect, &[]) {
        assert!(
            logs.contains("backend=\"iptables-nft\""),
            "{test}: expected the nft backend in a fresh namespace:\n{logs}"
        );
    }
}

#[test]
fn pod_tproxy() {
    let test = "pod_tproxy";
    if let Some((_, ruleset)) = pod_lifecycle(test, Mode::Tproxy, &[]) {
        assert!(
            ruleset.contains("table ip mangle") && ruleset.contains("TPROXY"),
            "{test}: expected TPROXY rules in the mangle table:\n{ruleset}"
        );
    }
}

/// Istio's `global.nativeNftables: true` adds `--native-nftables`: meshinit programs Istio's
/// inet tables itself, over netlink (`--nftables-apply=auto`); the image's `nft -f` runs
/// only if netlink fails.
#[test]
fn pod_native_nftables() {
    let test = "pod_native_nftables";
    if let Some((_, ruleset)) = pod_lifecycle(test, Mode::Redirect, &["--native-nftables"]) {
        assert!(
            ruleset.contains("table inet istio-proxy-nat") && !ruleset.contains("ISTIO_OUTPUT"),
            "{test}: expected Istio's inet tables and no iptables chains:\n{ruleset}"
        );
    }
}

/// A namespace where something (a CNI plugin, say) already used iptables-legacy: meshinit
/// follows it, as Istio does, and iptables-legacy's lock must work on the read-only root.
#[test]
fn pod_legacy_backend_on_read_only_root() {
    let test = "pod_legacy_backend_on_read_only_root";
    if !require_podman(test) {
        return;
    }
    let topo = Topology::builder().build();
    topo.pod.run(&[
        "iptables-legacy",
        "-t",
        "filter",
        "-A",
        "INPUT",
        "-p",
        "icmp",
        "-j",
        "ACCEPT",
    ]);
    let _vault = Background::serve(&topo.peer, None, "peer", &peer_listeners());
    let cgroup = CgroupParent::new("init");
    let pod = meshed_pod(&topo, Mode::Redirect, true, &[], &cgroup);
    let logs = check_meshed_pod(test, &topo, &pod, Mode::Redirect);
    assert!(
        logs.contains("backend=\"iptables-legacy\""),
        "{test}: expected the legacy backend:\n{logs}"
    );
    check_memory(test, &cgroup);
    let saved = topo.pod.run(&["iptables-legacy-save"]);
    assert!(
        saved.contains("-j ISTIO_OUTPUT") && saved.contains("-p icmp -j ACCEPT"),
        "{test}: expected meshinit's rules beside the earlier one:\n{saved}"
    );
}

/// The init container exactly as Istio's injector renders the injection template
/// (injector-template/) for a pod whose annotations exclude Vault's port and capture inbound
/// 8080 only: meshinit reads the injected pod's annotations from the Downward API file,
/// mounted where the template mounts it.
#[test]
fn pod_with_injection_template() {
    let test = "pod_with_injection_template";
    if !require_podman(test) || !require_kubernetes_validate(test) {
        return;
    }
    const ANNOTATIONS: &[(&str, &str)] = &[
        ("kubectl.kubernetes.io/default-container", "app"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "8200"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "8080"),
    ];
    // Rendered by Istio's injector; the file holds the injected pod's annotations.
    let Some((args, annotations)) = rendered_init_args(ANNOTATIONS) else {
        return;
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let annotations: Vec<(&str, &str)> = annotations
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let dir = ScratchDir::new("podinfo");
    let file = dir.write("annotations", &downward_api_annotations(&annotations));
    let mount = format!("--volume={}:{MOUNTED_ANNOTATIONS}:ro", file.display());

    let topo = Topology::builder().build();
    let _vault = Background::serve(&topo.peer, None, "peer", &peer_listeners());
    let cgroup = CgroupParent::new("init");
    let pod = meshed_pod_with(&topo, Mode::Redirect, true, &args, &[mount], &cgroup);
    check_pod_traffic(
        test,
        &topo,
        &pod,
        Mode::Redirect,
        &[(VAULT, false), (VAULT_8300, true)],
    );
    check_memory(test, &cgroup);
}

/// The same pod without NET_ADMIN and NET_RAW: the init container fails with meshinit's
/// message naming both, changes nothing, and neither the sidecar nor the app ever starts.
#[test]
fn pod_without_capabilities_never_starts() {
    let test = "pod_without_capabilities_never_starts";
    if !require_podman(test) {
        return;
    }
    for mode in [Mode::Redirect, Mode::Tproxy] {
        let topo = Topology::builder().build();
        let cgroup = CgroupParent::new("init");
        let pod = meshed_pod(&topo, mode, false, &[], &cgroup);
        let started = pod.start();
        assert_blocked_by_init(
            &format!("{test} ({mode:?}, no capabilities)"),
            &pod,
            &started,
            "init",
            2,
            &["CAP_NET_ADMIN", "CAP_NET_RAW", "securityContext"],
            &["sidecar", "app"],
        );
        let rules = crate::support::meshinit::dump_rules(&topo.pod);
        assert!(
            !rules.contains("ISTIO"),
            "{test} ({mode:?}): the failed init container left rules:\n{rules}"
        );
    }
}

/// The image: runs `meshinit --version` as its entrypoint, carries the OCI labels, stays
/// small, and holds meshinit, iptables' tools, nft and their libraries, and nothing else:
/// no shell, no package manager.
#[test]
fn image_is_minimal() {
    let test = "image_is_minimal";
    if !require_podman(test) {
        return;
    }
    let image = &images().meshinit;
    let version = env!("CARGO_PKG_VERSION");

    let run = Container::create("version", &["--network=none"], image, &["--version"]).run();
    let stdout = podman_stdout(test, &run);
    assert_eq!(stdout.trim(), format!("meshinit {version}"), "{test}");

    let shell = Container::create(
        "shell",
        &["--network=none", "--entrypoint=/bin/sh"],
        image,
        &["-c", "true"],
    )
    .run();
    assert!(!shell.status.success(), "{test}: /bin/sh ran in the image");

    check_image(test, image, podman::host_arch());
}

/// The same image for the other arch (arm64 on amd64), built on this machine with no
/// emulation: its metadata, files and static meshinit are checked as for this arch's, and
/// its programs run under qemu's user-mode emulator (podman cannot start a container of
/// another arch here), with the image's own libraries.
#[test]
fn image_is_minimal_other_arch() {
    let test = "image_is_minimal_other_arch";
    if !require_podman(test) || !require_qemu_user(test, podman::other_arch()) {
        return;
    }
    let image = podman::other_arch_image();
    let root = check_image(test, image, podman::other_arch());
    let version = env!("CARGO_PKG_VERSION");
    let ran = qemu_user(
        podman::other_arch(),
        root.path(),
        "usr/local/bin/meshinit",
        None,
    );
    assert_eq!(ran.trim(), format!("meshinit {version}"), "{test}");
    // nft opens its netlink socket before it reads its arguments, and qemu's user mode
    // has no NETLINK_NETFILTER: nft's own complaint shows it loaded with its libraries.
    for (program, argv0, expected) in [
        (
            "usr/sbin/xtables-nft-multi",
            "iptables-nft-save",
            "v1.8.9 (nf_tables)",
        ),
        (
            "usr/sbin/xtables-legacy-multi",
            "ip6tables-legacy-restore",
            "v1.8.9 (legacy)",
        ),
        ("usr/sbin/nft", "nft", "Unable to initialize Netlink socket"),
    ] {
        let ran = qemu_user(podman::other_arch(), root.path(), program, Some(argv0));
        assert!(
            ran.contains(expected) || ran.contains("nftables v1.0.6"),
            "{test}: {argv0} --version printed {ran:?}"
        );
    }
}

/// The arm64 image on a kernel with 64 KiB pages, under qemu's user mode with that page
/// size (`-p`; the image's loader then maps with it, and refuses an object laid out for
/// smaller pages: "ELF load command address/offset not page-aligned"): meshinit runs;
/// iptables and ip6tables load each of the image's extensions as iptables-save does for a
/// rule another tool made (`-m NAME -h`, else `-j NAME -h`, without the loader's complaint
/// about the file); the loader maps every other
/// ELF object (`--list`: the tools, the libraries, ebtables' and arptables' extensions).
#[test]
fn arm64_image_loads_on_64k_pages() {
    let test = "arm64_image_loads_on_64k_pages";
    if !require_podman(test) || !require_qemu_user(test, "arm64") {
        return;
    }
    let image = if podman::host_arch() == "arm64" {
        images().meshinit.as_str()
    } else {
        podman::other_arch_image()
    };
    let (files, root) = image_files(image);
    let page_size = ARM64_MAX_PAGE_SIZE.to_string();
    let run = |program: &str, argv0: Option<&str>, args: &[&str]| {
        let mut command =
            qemu_user_command("arm64", root.path(), &["-p", &page_size], program, argv0);
        let output =
            crate::support::run_bounded(command.args(args), std::time::Duration::from_secs(60));
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), printed)
    };
    let (_, printed) = run("usr/local/bin/meshinit", None, &["--version"]);
    assert_eq!(
        printed.trim(),
        format!("meshinit {}", env!("CARGO_PKG_VERSION")),
        "{test}"
    );

    let extensions = format!("usr/lib/{}/xtables/", multiarch("arm64"));
    let loader = "usr/lib/ld-linux-aarch64.so.1";
    let mut loaded = 0;
    let mut failed = Vec::new();
    for (path, kind) in &files {
        let Some(file) = (*kind == 'f').then(|| root.path().join(path)) else {
            continue;
        };
        let elf = std::fs::read(&file).expect("image file");
        if elf_machine(&elf).is_none() || path == "usr/local/bin/meshinit" || path == loader {
            continue;
        }
        let extension = path.strip_prefix(&extensions).and_then(|name| {
            name.strip_prefix("lib")?
                .strip_suffix(".so")?
                .split_once('_')
        });
        let (ok, printed) = match extension {
            Some((family @ ("xt" | "ipt" | "ip6t"), name)) => {
                let program = if family == "ip6t" {
                    "ip6tables-legacy"
                } else {
                    "iptables-legacy"
                };
                // A file xtables could not load is named with the loader's complaint
                // (`-j NAME` then still succeeds: NAME is taken for a chain).
                let complaint = format!("/{path}: ");
                let multi = "usr/sbin/xtables-legacy-multi";
                let mut tried = None;
                for option in ["-m", "-j"] {
                    let (ok, printed) = run(multi, Some(program), &[option, name, "-h"]);
                    let ok = ok && !printed.contains(&complaint);
                    tried = Some((ok, printed));
                    if ok {
                        break;
                    }
                }
                tried.expect("tried")
            }
            _ => run(loader, None, &["--list", &file.to_string_lossy()]),
        };
        if ok {
            loaded += 1;
        } else {
            failed.push(format!("{path}: {}", printed.trim()));
        }
    }
    eprintln!("{test}: {loaded} ELF objects load with {ARM64_MAX_PAGE_SIZE}-byte pages");
    assert!(failed.is_empty(), "{test}: {failed:#?}");
    assert!(
        loaded > 100,
        "{test}: only {loaded} ELF objects in the image"
    );
}

/// The OCI image index (`podman manifest`) holding both arches' images, as the README says
/// to push it: pushed to an OCI layout directory, its index lists one manifest per arch,
/// each the image built for that arch.
#[test]
fn image_index_holds_both_arches() {
    let test = "image_index_holds_both_arches";
    if !require_podman(test) {
        return;
    }
    let images_by_arch = [
        (podman::host_arch(), images().meshinit.clone()),
        (podman::other_arch(), podman::other_arch_image().to_owned()),
    ];
    let list = format!("localhost/meshinit-index:{}", podman::fresh_name("index"));
    podman::expect(&["manifest", "create", &list]);
    let _list = podman::RemoveImage(list.clone());
    for (_, image) in &images_by_arch {
        podman::expect(&[
            "manifest",
            "add",
            &list,
            &format!("containers-storage:{image}"),
        ]);
    }
    let dir = ScratchDir::new("index");
    let layout = dir.path().join("oci");
    let layout = layout.to_str().expect("utf-8 path");
    podman::expect(&["manifest", "push", "--all", &list, &format!("oci:{layout}")]);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("oci/index.json")).expect("index.json"),
    )
    .expect("index.json is JSON");
    // The layout's index names the pushed list; the list names the images.
    let list_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("list digest");
    let blob = |digest: &str| -> serde_json::Value {
        let path = dir.path().join("oci/blobs").join(digest.replace(':', "/"));
        serde_json::from_str(&std::fs::read_to_string(path).expect("blob")).expect("JSON blob")
    };
    let pushed = blob(list_digest);
    let mut arches: Vec<String> = pushed["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("{test}: no manifests in {pushed}"))
        .iter()
        .map(|m| {
            let platform = &m["platform"];
            let arch = platform["architecture"].as_str().unwrap_or("?").to_owned();
            // The manifest's config is that arch's image.
            let manifest = blob(m["digest"].as_str().expect("manifest digest"));
            let config = blob(
                manifest["config"]["digest"]
                    .as_str()
                    .expect("config digest"),
            );
            assert_eq!(config["architecture"], platform["architecture"], "{test}");
            assert_eq!(platform["os"], "linux", "{test}");
            arch
        })
        .collect();
    arches.sort();
    let mut expected: Vec<String> = images_by_arch
        .iter()
        .map(|(a, _)| (*a).to_owned())
        .collect();
    expected.sort();
    assert_eq!(arches, expected, "{test}: the index's platforms");
}

/// Checks `image` (for Debian arch `arch`): its metadata (entrypoint, labels, arch, size
/// under 10 MB), that it holds exactly meshinit, iptables' tools, nft and their libraries
/// and extensions, and that its meshinit is a static binary for `arch`. Returns the
/// image's filesystem, unpacked.
fn check_image(test: &str, image: &str, arch: &str) -> ScratchDir {
    let version = env!("CARGO_PKG_VERSION");
    let inspect = podman::expect(&[
        "image",
        "inspect",
        "--format",
        "{{.Size}}|{{.Architecture}}|{{json .Config.Entrypoint}}|{{json .Labels}}",
        image,
    ]);
    let mut fields = inspect.trim().splitn(4, '|');
    let size: u64 = fields.next().and_then(|s| s.parse().ok()).expect("size");
    let image_arch = fields.next().expect("architecture");
    let entrypoint = fields.next().expect("entrypoint");
    let labels = fields.next().expect("labels");
    eprintln!(
        "{test}: {image} ({image_arch}) is {:.2} MB",
        size as f64 / 1e6
    );
    assert_eq!(image_arch, arch, "{test}: the image's architecture");
    assert!(size < MAX_IMAGE_BYTES, "{test}: the image is {size} bytes");
    assert_eq!(entrypoint, r#"["/usr/local/bin/meshinit"]"#, "{test}");
    for label in [
        r#""org.opencontainers.image.licenses":"Apache-2.0""#.to_owned(),
        format!(r#""org.opencontainers.image.version":"{version}""#),
        r#""org.opencontainers.image.source":""#.to_owned(),
    ] {
        assert!(labels.contains(&label), "{test}: no {label} in {labels}");
    }

    let (files, root) = image_files(image);
    let multiarch = multiarch(arch);
    let unexpected: Vec<&String> = files
        .iter()
        .filter(|(path, kind)| **kind != 'd' && !expected_file(path, arch))
        .map(|(path, _)| path)
        .collect();
    assert!(
        unexpected.is_empty(),
        "{test}: unexpected files in the image: {unexpected:?}"
    );
    for (program, wanted) in [
        ("usr/local/bin/meshinit", 'f'),
        ("usr/sbin/xtables-legacy-multi", 'f'),
        ("usr/sbin/xtables-nft-multi", 'f'),
        ("usr/sbin/nft", 'f'),
        ("usr/sbin/iptables-legacy-restore", 'l'),
        ("usr/sbin/iptables-legacy-save", 'l'),
        ("usr/sbin/ip6tables-legacy-restore", 'l'),
        ("usr/sbin/ip6tables-legacy-save", 'l'),
        ("usr/sbin/iptables-nft-restore", 'l'),
        ("usr/sbin/iptables-nft-save", 'l'),
        ("usr/sbin/ip6tables-nft-restore", 'l'),
        ("usr/sbin/ip6tables-nft-save", 'l'),
    ] {
        assert_eq!(files.get(program), Some(&wanted), "{test}: {program}");
    }
    // The extensions meshinit's rules use, whatever the flags.
    for extension in [
        "standard",
        "tcp",
        "udp",
        "multiport",
        "owner",
        "conntrack",
        "mark",
        "connmark",
        "comment",
        "REDIRECT",
        "TPROXY",
        "MARK",
        "CONNMARK",
        "CT",
    ] {
        let path = format!("usr/lib/{multiarch}/xtables/libxt_{extension}.so");
        // Some are links, as in Debian: REDIRECT is NAT's.
        assert!(
            matches!(files.get(&path), Some('f' | 'l')),
            "{test}: no {path}"
        );
    }
    let elf = std::fs::read(root.path().join("usr/local/bin/meshinit")).expect("meshinit");
    assert_eq!(
        elf_machine(&elf),
        Some(match arch {
            "arm64" => EM_AARCH64,
            _ => EM_X86_64,
        }),
        "{test}: meshinit is not built for {arch}"
    );
    assert_eq!(
        elf_has_interpreter(&elf),
        Some(false),
        "{test}: meshinit is not a static binary"
    );
    root
}

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

/// A 64-bit little-endian ELF file's machine.
fn elf_machine(elf: &[u8]) -> Option<u16> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    Some(u16::from_le_bytes(elf.get(18..20)?.try_into().ok()?))
}

/// Whether a 64-bit little-endian ELF file asks for a program interpreter (`PT_INTERP`):
/// a dynamically linked executable does, a static one does not.
fn elf_has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let phoff = usize::try_from(u64::from_le_bytes(elf.get(32..40)?.try_into().ok()?)).ok()?;
    let (entsize, count) = (usize::from(u16_at(54)?), usize::from(u16_at(56)?));
    let mut found = false;
    for i in 0..count {
        let at = phoff + i * entsize;
        found |= u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?) == PT_INTERP;
    }
    Some(found)
}

/// Debian's multiarch directory name for `arch`.
fn multiarch(arch: &str) -> &'static str {
    match arch {
        "arm64" => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    }
}

/// qemu's user-mode emulator for the other arch (Debian's qemu-user).
fn qemu_user_program(arch: &str) -> &'static str {
    match arch {
        "arm64" => "qemu-aarch64",
        _ => "qemu-x86_64",
    }
}

fn require_qemu_user(test: &str, arch: &str) -> bool {
    let program = qemu_user_program(arch);
    if which::which(program).is_ok() {
        return true;
    }
    let reason = format!("needs `{program}` (Debian's qemu-user; scripts/test.sh installs it)");
    crate::support::skip(test, &reason);
    false
}

/// Runs `program --version` from the unpacked image at `root` (its loader and libraries
/// too: qemu's `-L`), as `argv0` when given (the xtables multi-call binaries act on their
/// name); returns what it printed, stdout and stderr.
fn qemu_user(arch: &str, root: &std::path::Path, program: &str, argv0: Option<&str>) -> String {
    let mut command = qemu_user_command(arch, root, &[], program, argv0);
    command.arg("--version");
    let output = crate::support::run_bounded(&mut command, std::time::Duration::from_secs(60));
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// qemu's user mode for `arch` with `options` of its own, running `program` of the
/// unpacked image at `root` with the image's loader and libraries (`-L`), as `argv0` when
/// given; the program's arguments are the caller's to add.
fn qemu_user_command(
    arch: &str,
    root: &std::path::Path,
    options: &[&str],
    program: &str,
    argv0: Option<&str>,
) -> std::process::Command {
    let mut command = std::process::Command::new(qemu_user_program(arch));
    command.arg("-L").arg(root).args(options);
    if let Some(argv0) = argv0 {
        command.args(["-0", argv0]);
    }
    command.arg(root.join(program));
    command
}

fn podman_stdout(test: &str, output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{test}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Every entry of the image's filesystem: path (no leading `/`) → kind (`f` file, `l`
/// link, `d` directory), from `podman export` of a container made from it; and the
/// filesystem itself, unpacked into a scratch directory.
fn image_files(image: &str) -> (HashMap<String, char>, ScratchDir) {
    let container = Container::create("files", &["--network=none"], image, &[]);
    let dir = ScratchDir::new("export");
    let tar = dir.path().join("rootfs.tar");
    let tar = tar.to_str().expect("utf-8 path");
    podman::expect(&["export", "--output", tar, container.name()]);
    let tar_run = |args: &[&str]| {
        crate::support::expect_success(
            &format!("tar {args:?}"),
            crate::support::run_bounded(
                std::process::Command::new("tar").args(args),
                std::time::Duration::from_secs(30),
            ),
        )
    };
    let listing = tar_run(&["-tvf", tar]);
    let root = ScratchDir::new("rootfs");
    tar_run(&["-xf", tar, "-C", root.path().to_str().expect("utf-8 path")]);
    let files = listing
        .lines()
        .filter_map(|line| {
            let kind = match line.chars().next()? {
                '-' => 'f',
                other => other,
            };
            // `tar -tv`: mode owner size date time path [-> target]
            let path = line.split_whitespace().nth(5)?;
            Some((path.trim_end_matches('/').to_owned(), kind))
        })
        .collect();
    (files, root)
}

/// Whether a non-directory may be in the image for `arch`: meshinit, iptables' tools and
/// their names, nft, shared libraries and xtables extensions, the loader, the /lib and
/// /lib64 links.
fn expected_file(path: &str, arch: &str) -> bool {
    let lib = format!("usr/lib/{}/", multiarch(arch));
    let loader = match arch {
        "arm64" => "usr/lib/ld-linux-aarch64.so.1",
        _ => "usr/lib64/ld-linux-x86-64.so.2",
    };
    match path {
        "usr/local/bin/meshinit" | "lib" | "lib64" => true,
        _ if path == loader => true,
        _ if path.starts_with("usr/sbin/") => {
            let name = &path["usr/sbin/".len()..];
            name == "nft"
                || name.starts_with("xtables-")
                || name.starts_with("iptables-")
                || name.starts_with("ip6tables-")
        }
        _ if path.starts_with(&lib) => {
            let name = &path[lib.len()..];
            name.contains(".so") && (!name.contains('/') || name.starts_with("xtables/lib"))
        }
        _ => false,
    }
}
