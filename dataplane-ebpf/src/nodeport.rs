//! North-south service traffic arriving on a node device: NodePort (node
//! address, nodePort), ExternalIPs and LoadBalancer IPs (Service port).
//!
//! A local backend gets the packet DNATed with the client's address kept; its
//! reply goes through from_pod, which restores the frontend and forwards it out
//! of the device. A backend on another node (externalTrafficPolicy: Cluster)
//! gets it DNATed and SNATed to this node's address, so that its reply comes
//! back here, where from_netdev restores both. Which of the two, and the
//! SNAT port, is `ct::open_flow`'s (`Origin::External`); this module decides
//! which packets are north-south flows at all.
use aya_ebpf::{
    bindings::bpf_sock_tuple,
    helpers::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    EbpfContext,
};
use ferry_common::{svc_flags, Counter, PROTO_TCP};

use crate::{
    ct::{self, Opened, Origin},
    lb,
    maps::count,
    parse::Packet,
};

/// Frontend kinds served from outside the node's Pods.
const EXTERNAL_KINDS: u32 = svc_flags::NODE_PORT | svc_flags::EXTERNAL_IP | svc_flags::LOAD_BALANCER;

/// A new north-south flow from a packet arriving on a device (shared by TC
/// and XDP): None when `pkt` is not for a north-south frontend (it is the
/// stack's), else what opening it came to (`ct::open_flow`).
#[inline(always)]
pub fn open<C: EbpfContext>(ctx: &C, pkt: &Packet) -> Result<Option<Opened>, Counter> {
    let Some(service) = lb::lookup_service(pkt) else {
        return Ok(None);
    };
    // ClusterIPs are for Pods and the node itself, not for the network.
    if service.value.flags & EXTERNAL_KINDS == 0 {
        return Ok(None);
    }
    // A node address and a NodePort as destination, yet the answer to a
    // connection of the node's own (a local client whose ephemeral port
    // happened to be the NodePort): the stack's, never a new flow.
    if service.value.flags & svc_flags::NODE_PORT != 0 && local_client(ctx, pkt) {
        count(Counter::NodePortLocalReply);
        return Ok(None);
    }
    ct::open_flow(pkt, &service, Origin::External).map(Some)
}

/// Whether `pkt` belongs to a connection of a socket on this node: a TCP
/// socket that is not listening (connecting or established), or a connected
/// UDP socket whose peer sent it. A listener on the NodePort does not count:
/// NodePort traffic to it is still the Service's, as with kube-proxy.
#[inline(always)]
fn local_client<C: EbpfContext>(ctx: &C, pkt: &Packet) -> bool {
    const TCP_LISTEN: u32 = 10;
    const BPF_F_CURRENT_NETNS: u64 = u64::MAX; // (u64)-1
                                               // SAFETY: all-zero is a valid tuple (plain integers); the IPv4 member is
                                               // written before use.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = pkt.saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = pkt.daddr;
    tuple.__bindgen_anon_1.ipv4.sport = pkt.sport;
    tuple.__bindgen_anon_1.ipv4.dport = pkt.dport;
    let size = core::mem::size_of::<u32>() as u32 * 3;
    let tcp = pkt.proto == PROTO_TCP;
    // SAFETY: the helpers read `size` bytes of the tuple on our stack; a
    // returned socket is released below before anything else happens.
    let sk = unsafe {
        if tcp {
            bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, BPF_F_CURRENT_NETNS, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, size, BPF_F_CURRENT_NETNS, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket the helper returned, read before it is released.
    let ours = unsafe {
        if tcp {
            (*sk).state != TCP_LISTEN
        } else {
            (*sk).dst_ip4 == pkt.saddr && (*sk).dst_port == pkt.sport
        }
    };
    // SAFETY: releasing the reference the lookup took.
    unsafe { bpf_sk_release(sk as *mut _) };
    ours
}
