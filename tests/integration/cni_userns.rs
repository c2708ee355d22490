//! `meshinit-cni` for a pod with `hostUsers: false`: its network namespace belongs to a user
//! namespace of its own, whose uids are other uids on the node (here the pod's 1337 is the
//! node's 101337). The kernel takes the uid of an owner match in the user namespace of
//! whoever writes the rule, and refuses (EINVAL) a rule written from another than the
//! network namespace's own, which is what broke Istio's CNI plugin there
//! (istio/istio#58750). The plugin enters the pod's user namespace as its root to write the
//! rules, so 1337 means the pod's proxy, as it does for an init container.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::cni::{config_for, invoke_with, with_args};
use crate::support::netns::NetNs;
use crate::support::procs::{connect_with, helper_command_via, Background, Creds, Outcome};
use crate::support::{expect_success, require_root, run_bounded};

/// The node's first uid for the pod's uid 0.
const POD_UID_BASE: u32 = 100_000;

/// A pod's namespaces: a user namespace mapping 0..65536 to POD_UID_BASE.., and a network
/// namespace it owns, held by a sleeping process (both go when it is killed, on drop).
struct UsernsPod {
    holder: Child,
}

impl UsernsPod {
    fn start() -> UsernsPod {
        let holder = Command::new("unshare")
            .args(["--user", "--net", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare a user and a network namespace");
        let mut pod = UsernsPod { holder };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pod.is_in_a_user_namespace_of_its_own() {
            if let Ok(Some(status)) = pod.holder.try_wait() {
                panic!("unshare exited ({status}) before the pod's namespaces were up");
            }
            assert!(
                Instant::now() < deadline,
                "the pod's user namespace was not set up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The maps, written as a runtime does (the node's root may map any range; unshare's
        // own --map-users would ask /etc/subuid).
        let map = format!("0 {POD_UID_BASE} 65536");
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{}/{file}", pod.pid()), &map)
                .unwrap_or_else(|err| panic!("writing the pod's {file}: {err}"));
        }
        pod
    }

    fn pid(&self) -> String {
        self.holder.id().to_string()
    }

    fn uid_map(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/uid_map", self.pid())).unwrap_or_default()
    }

    fn is_in_a_user_namespace_of_its_own(&self) -> bool {
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).ok();
        ns(&self.pid()) != ns("self")
    }

    fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.pid())
    }

    /// `argv` in the pod's network namespace, as the node's root.
    fn run(&self, argv: &[&str]) -> String {
        let output = run_bounded(
            Command::new("nsenter")
                .args(["--target", &self.pid(), "--net", "--"])
                .args(argv),
            Duration::from_secs(10),
        );
        expect_success(&format!("{argv:?} in the pod"), output)
    }

    /// Enters both of the pod's namespaces, as the pod's root (nsenter's default), before
    /// the helper drops to its uid.
    fn launcher(&self) -> Vec<String> {
        ["nsenter", "--target", &self.pid(), "--user", "--net", "--"]
            .map(String::from)
            .to_vec()
    }
}

impl Drop for UsernsPod {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

#[test]
fn cni_add_in_a_pod_with_its_own_user_namespace() {
    if !require_root("cni_add_in_a_pod_with_its_own_user_namespace") {
        return;
    }
    capture_in_a_pod_with_its_own_user_namespace(
        &config_for(&[]),
        &["iptables-nft-save"],
        "--uid-owner 1337",
    );
}

/// The same with meshinit's nftables (over netlink), where the kernel reads `skuid` in the
/// network namespace's user namespace whoever writes the rule: entering it changes nothing
/// there, and must break nothing.
#[test]
fn cni_add_in_a_pod_with_its_own_user_namespace_native_nftables() {
    if !require_root("cni_add_in_a_pod_with_its_own_user_namespace_native_nftables") {
        return;
    }
    capture_in_a_pod_with_its_own_user_namespace(
        &with_args(
            &config_for(&[]),
            &[("native-nftables", "true"), ("nftables-apply", "netlink")],
        ),
        &["nft", "list", "ruleset"],
        "skuid 1337",
    );
}

fn capture_in_a_pod_with_its_own_user_namespace(config: &str, listing: &[&str], exemption: &str) {
    let pod = UsernsPod::start();
    assert_eq!(
        pod.uid_map().split_whitespace().collect::<Vec<_>>(),
        ["0", &POD_UID_BASE.to_string(), "65536"],
        "the pod's uids are not the node's"
    );
    let peer = NetNs::new("uspeer");
    peer.run(&[
        "ip",
        "link",
        "add",
        "p0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pod.pid(),
    ]);
    peer.run(&["ip", "addr", "add", "192.0.2.1/24", "dev", "p0"]);
    peer.run(&["ip", "link", "set", "p0", "up"]);
    pod.run(&["ip", "link", "set", "lo", "up"]);
    pod.run(&["ip", "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    pod.run(&["ip", "link", "set", "eth0", "up"]);
    let _peer_server = Background::serve(&peer, None, "peer", &["tcp:192.0.2.1:8300".to_owned()]);

    let add = invoke_with(&[], &pod.netns(), "ADD", config.as_bytes());
    assert_eq!(add.code, Some(0), "ADD for the pod: {add:?}");
    let rules = pod.run(listing);
    assert!(
        rules.contains(exemption),
        "the proxy's exemption ({exemption}) is in the pod's rules:\n{rules}"
    );

    let launcher = pod.launcher();
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let proxy = Creds::user(1337, 1337);
    let app = Creds::user(1000, 1000);
    let _sidecar = Background::start(
        helper_command_via(&launcher, Some(proxy), "serve sidecar tcp:0.0.0.0:15001"),
        "the sidecar, as the pod's 1337".to_owned(),
    );
    let outcome = |creds| {
        connect_with(helper_command_via(
            &launcher,
            Some(creds),
            "client tcp 192.0.2.1:8300",
        ))
    };
    match outcome(app) {
        Outcome::Answered(reply) => {
            assert_eq!(
                (reply.by.as_str(), reply.port),
                ("sidecar", 15001),
                "the app (pod uid 1000) is captured: {reply:?}"
            );
            assert_eq!(reply.orig, Some("192.0.2.1:8300".parse().expect("addr")));
        }
        failed => panic!("the app's connection: {failed:?}"),
    }
    match outcome(proxy) {
        Outcome::Answered(reply) => assert_eq!(
            reply.by,
            "peer",
            "the proxy (pod uid 1337, node uid {}) goes out directly: {reply:?}",
            POD_UID_BASE + 1337
        ),
        failed => panic!("the proxy's connection: {failed:?}"),
    }

    let del = invoke_with(&[], &pod.netns(), "DEL", config.as_bytes());
    assert_eq!(del.code, Some(0), "DEL for the pod: {del:?}");
    let left = pod.run(listing);
    assert!(
        !left.to_lowercase().contains("istio"),
        "DEL leaves none of meshinit's rules:\n{left}"
    );
}
