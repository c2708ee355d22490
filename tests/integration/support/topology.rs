//! A pod and the network around it, built from namespaces and veth pairs, using only
//! documentation addresses (RFC 5737, RFC 3849). Nothing is routed out of the namespaces.
//!
//! ```text
//!  vm (optional)                 pod                              peer
//!  eth0 203.0.113.130/25 ── vmtap0 203.0.113.129/25
//!                                eth0 192.0.2.2/24  ─────────── eth0 192.0.2.1/24
//!                                     2001:db8::2/64                  2001:db8::1/64
//!                                                                lo   198.51.100.30/32
//!                                                                     203.0.113.10/32
//!                                                                     203.0.113.53/32
//! ```
//! The pod reaches 198.51.100.0/24 and 203.0.113.0/24 via the peer; interface names are
//! chosen inside each namespace, so nothing is ever created in the test runner's namespace.

use super::netns::NetNs;

pub const POD_IP: &str = "192.0.2.2";
pub const PEER_IP: &str = "192.0.2.1";
pub const POD_IP6: &str = "2001:db8::2";
pub const PEER_IP6: &str = "2001:db8::1";
/// The pod's interface towards the peer.
pub const POD_IFACE: &str = "eth0";
/// The pod's interface towards the VM, as KubeVirt's tap device.
pub const VM_IFACE: &str = "vmtap0";

/// Extra peer addresses: "remote services" the pod talks to.
pub const PEER_EXTRA: [&str; 3] = ["198.51.100.30", "203.0.113.10", "203.0.113.53"];

pub struct Topology {
    pub pod: NetNs,
    pub peer: NetNs,
    pub vm: Option<NetNs>,
}

#[derive(Debug, Default)]
pub struct TopologyBuilder {
    vm: bool,
}

impl TopologyBuilder {
    /// Adds a "vm" namespace behind the pod, which routes through the pod as its gateway.
    pub fn with_vm(mut self) -> Self {
        self.vm = true;
        self
    }

    pub fn build(self) -> Topology {
        let pod = NetNs::new("pod");
        let peer = NetNs::new("peer");
        pod.ip_batch(&format!(
            "link set lo up\n\
             link add {POD_IFACE} type veth peer name eth0 netns {peer}\n\
             addr add {POD_IP}/24 dev {POD_IFACE}\n\
             addr add {POD_IP6}/64 dev {POD_IFACE} nodad\n\
             link set {POD_IFACE} up\n\
             route add 198.51.100.0/24 via {PEER_IP}\n\
             route add 203.0.113.0/24 via {PEER_IP}\n",
            peer = peer.name()
        ));
        let extra: String = PEER_EXTRA
            .iter()
            .map(|ip| format!("addr add {ip}/32 dev lo\n"))
            .collect();
        peer.ip_batch(&format!(
            "link set lo up\n\
             addr add {PEER_IP}/24 dev eth0\n\
             addr add {PEER_IP6}/64 dev eth0 nodad\n\
             link set eth0 up\n\
             {extra}"
        ));
        let vm = self.vm.then(|| {
            let vm = NetNs::new("vm");
            pod.ip_batch(&format!(
                "link add {VM_IFACE} type veth peer name eth0 netns {vm}\n\
                 addr add 203.0.113.129/25 dev {VM_IFACE}\n\
                 link set {VM_IFACE} up\n",
                vm = vm.name()
            ));
            vm.ip_batch(
                "link set lo up\n\
                 addr add 203.0.113.130/25 dev eth0\n\
                 link set eth0 up\n\
                 route add default via 203.0.113.129\n",
            );
            pod.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            vm
        });
        Topology { pod, peer, vm }
    }
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }
}
