//! The nftables-only image (the Dockerfile's `nftables-only` target): the static binary
//! alone, no iptables, no nft, no library, no shell. In a pod's init container it programs
//! Istio's nftables tables over netlink, and the pod's traffic is captured.
//!
//! The image is the Dockerfile's own target, built offline by `build-offline.sh --target
//! nftables-only` (`support::podman`) after the default image, whose `build` stage, the
//! compiled binary, it takes from podman's layer cache. The pod is run as in `image.rs`:
//! the injector's arguments and securityContext, a fake sidecar and app, in a namespace of
//! the test's own (documentation addresses only).
//!
//! Needs root and podman: skips with a reason otherwise, fails under `CI=true`.

use crate::support::podman::{
    self, images, nftables_only_image, require_podman, Container, Pod, PodContainers,
};
use crate::support::procs::{connect, Background, Outcome, Proto};
use crate::support::scratch::ScratchDir;
use crate::support::topology::Topology;

const VAULT: &str = "198.51.100.30:8200";
const POD_8080: &str = "192.0.2.2:8080";
/// The Dockerfile's label on this target, which the default image's title does not have.
const TITLE: &str = "meshinit (nftables only)";

/// The injector's init container arguments (Istio's `hello.yaml.injected`, REDIRECT).
fn injector_args() -> &'static [&'static str] {
    static ARGS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    ARGS.get_or_init(|| {
        let mut args = vec!["istio-iptables"];
        args.extend(crate::support::injector_args(&[
            "--log_output_level=default:info",
        ]));
        args
    })
}

/// Istio's istio-init securityContext, as podman options: root, no privilege escalation,
/// read-only root, all capabilities dropped but NET_ADMIN and NET_RAW.
const INIT_OPTIONS: &[&str] = &[
    "--init-ctr=always",
    "--user=0:0",
    "--security-opt=no-new-privileges",
    "--read-only",
    "--read-only-tmpfs=false",
    "--cap-drop=all",
    "--cap-add=NET_ADMIN,NET_RAW",
];

#[test]
fn nftables_only_image_is_the_binary_alone() {
    let test = "nftables_only_image_is_the_binary_alone";
    if !require_podman(test) {
        return;
    }
    let image = nftables_only_image();
    let container = Container::create("files", &["--network=none"], image, &[]);
    let dir = ScratchDir::new("export");
    let tar = dir.path().join("rootfs.tar");
    let tar = tar.to_str().expect("utf-8 path");
    podman::expect(&["export", "--output", tar, container.name()]);
    let listing = crate::support::expect_success(
        "tar -tvf",
        crate::support::run_bounded(
            std::process::Command::new("tar").args(["-tvf", tar]),
            std::time::Duration::from_secs(30),
        ),
    );
    // Every entry that is not a directory (`tar -tv`: mode owner size date time path),
    // but the files podman writes into every container it creates.
    let podmans = [
        "etc/hosts",
        "etc/hostname",
        "etc/resolv.conf",
        "run/.containerenv",
    ];
    let files: Vec<&str> = listing
        .lines()
        .filter(|line| !line.starts_with('d'))
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| !podmans.contains(path))
        .collect();
    assert_eq!(files, ["usr/local/bin/meshinit"], "{test}:\n{listing}");
    let inspect = podman::expect(&[
        "image",
        "inspect",
        "--format",
        r#"{{.Size}}|{{index .Labels "org.opencontainers.image.title"}}"#,
        image,
    ]);
    let (size, title) = inspect.trim().split_once('|').expect("size|title");
    eprintln!("{test}: {image} is {size} bytes");
    assert_eq!(
        title, TITLE,
        "{test}: not the Dockerfile's nftables-only target"
    );
}

#[test]
fn pod_with_the_nftables_only_image() {
    let test = "pod_with_the_nftables_only_image";
    if !require_podman(test) {
        return;
    }
    let image = nftables_only_image();
    let topo = Topology::builder().build();
    let _vault = Background::serve(&topo.peer, None, "peer", &[format!("tcp:{VAULT}")]);
    let pod = Pod::new("pod", &topo.pod);
    pod.create("init", INIT_OPTIONS, image, injector_args());
    let base = &images().base;
    pod.create_helper(
        "sidecar",
        &["--user=1337:1337", "--cap-drop=all"],
        base,
        "serve sidecar tcp:0.0.0.0:15001 tcp:0.0.0.0:15006",
    );
    pod.create_helper(
        "app",
        &["--user=1000:1000", "--cap-drop=all"],
        base,
        "serve app tcp:0.0.0.0:8080",
    );
    let started = pod.start();
    let logs = pod.logs("init");
    assert!(
        started.status.success() && pod.state("init").exit_code == 0,
        "{test}: pod start failed: {}\ninit container:\n{logs}",
        String::from_utf8_lossy(&started.stderr)
    );
    for needle in ["backend=\"nftables\"", "via=\"netlink\"", "processes=0"] {
        assert!(logs.contains(needle), "{test}: no {needle} in\n{logs}");
    }
    pod.wait_ready("sidecar");
    pod.wait_ready("app");

    let by = |outcome: &Outcome| match outcome {
        Outcome::Answered(reply) => Some((reply.by.clone(), reply.port, reply.orig)),
        Outcome::Failed(_) => None,
    };
    let app = pod.connect("app", "1000:1000", Proto::Tcp, VAULT);
    let inbound = connect(&topo.peer, None, Proto::Tcp, POD_8080);
    let proxy = pod.connect("sidecar", "1337:1337", Proto::Tcp, VAULT);
    let rules = topo.pod.run(&["nft", "list", "ruleset"]);
    let vault = VAULT.parse().ok();
    let pod_8080 = POD_8080.parse().ok();
    assert_eq!(
        by(&app),
        Some(("sidecar".into(), 15001, vault)),
        "{test}: app → Vault\n{rules}"
    );
    assert_eq!(
        by(&inbound),
        Some(("sidecar".into(), 15006, pod_8080)),
        "{test}: peer → app\n{rules}"
    );
    assert!(
        matches!(&proxy, Outcome::Answered(r) if r.by == "peer"),
        "{test}: the sidecar's own connection: {proxy:?}\n{rules}"
    );
    assert!(
        rules.contains("table inet istio-proxy-nat"),
        "{test}:\n{rules}"
    );
}
