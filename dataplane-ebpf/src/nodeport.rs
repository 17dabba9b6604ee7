//! North-south service traffic arriving on a node device: NodePort (node
//! address, nodePort), ExternalIPs and LoadBalancer IPs (Service port).
//!
//! A local backend gets the packet DNATed with the client's address kept; its
//! reply goes through from_pod, which restores the frontend and forwards it out
//! of the device. A backend on another node (externalTrafficPolicy: Cluster)
//! gets it DNATed and SNATed to this node's address, so that its reply comes
//! back here, where from_netdev restores both.
use aya_ebpf::{
    bindings::{bpf_sock_tuple, TC_ACT_OK},
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    programs::TcContext,
    EbpfContext,
};
use ferry_common::{backend_flags, config, svc_flags, Counter, DEFAULT_SNAT_PORTS, PROTO_TCP};

use crate::{
    ct::{self, CreateError, NewFlow},
    lb,
    maps::{config, count, count_service},
    nat,
    parse::Packet,
    reject,
};

/// Frontend kinds served from outside the node's Pods.
const EXTERNAL_KINDS: u32 = svc_flags::NODE_PORT | svc_flags::EXTERNAL_IP | svc_flags::LOAD_BALANCER;
/// Random SNAT ports tried for a new flow before giving up (Cilium's
/// SNAT_COLLISION_RETRIES is of the same order).
const SNAT_TRIES: u32 = 32;

/// What a packet arriving on a device is to the north-south path.
pub enum Arrival {
    /// Not for a north-south frontend: the stack's.
    NotOurs,
    /// For a frontend without a usable endpoint; `etp_local`: because the
    /// Service's externalTrafficPolicy is Local and none is on this node.
    NoEndpoint { etp_local: bool },
    /// A new flow, now tracked: to `backend` (address, port), with the
    /// source rewritten to `snat` when the backend is on another node.
    Flow {
        rev_nat_id: u16,
        backend: (u32, u16),
        snat: Option<(u32, u16)>,
    },
}

/// Picks the backend of a new north-south flow and records it in connection
/// tracking (shared by TC and XDP, so that whichever sees the next packet
/// of the flow sends it the same way).
#[inline(always)]
pub fn open<C: EbpfContext>(ctx: &C, pkt: &Packet) -> Result<Arrival, Counter> {
    let Some(service) = lb::lookup_service(pkt) else {
        return Ok(Arrival::NotOurs);
    };
    let svc = &service.value;
    // ClusterIPs are for Pods and the node itself, not for the network.
    if svc.flags & EXTERNAL_KINDS == 0 {
        return Ok(Arrival::NotOurs);
    }
    // A node address and a NodePort as destination, yet the answer to a
    // connection of the node's own (a local client whose ephemeral port
    // happened to be the NodePort): the stack's, never a new flow.
    if svc.flags & svc_flags::NODE_PORT != 0 && local_client(ctx, pkt) {
        count(Counter::NodePortLocalReply);
        return Ok(Arrival::NotOurs);
    }
    // loadBalancerSourceRanges: a client outside them is dropped before
    // anything else, even a reject, so it learns nothing about the Service.
    if !lb::source_allowed(pkt, &service) {
        return Err(Counter::DropSourceRange);
    }
    if svc.count == 0 {
        return Ok(Arrival::NoEndpoint {
            etp_local: svc.flags & svc_flags::ETP_LOCAL != 0,
        });
    }
    let (backend_id, backend) = lb::select_backend(pkt, &service, lb::Chooser::Flow)?;
    let mut flow = NewFlow {
        backend_id,
        backend,
        rev_nat_id: svc.rev_nat_id,
        snat_addr: 0,
        snat_port: 0,
        external: true,
    };
    let snat = if backend.flags & backend_flags::LOCAL != 0 {
        track(ct::create(pkt, &flow, false));
        None
    } else {
        flow.snat_addr = match config(config::NODE_ADDR) {
            0 => pkt.daddr,
            a => a,
        };
        Some((flow.snat_addr, claim_snat_port(pkt, &mut flow)?))
    };
    Ok(Arrival::Flow {
        rev_nat_id: svc.rev_nat_id,
        backend: (backend.addr, backend.port),
        snat,
    })
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

/// Counts the outcome of recording a new flow. A flow that could not be
/// recorded still goes (the node keeps working; its replies may not).
#[inline(always)]
fn track(r: Result<(), CreateError>) {
    count(if r.is_ok() {
        Counter::CtCreated
    } else {
        Counter::DropCtFull
    });
}

/// Records `flow` with an SNAT port of its own: random ports of the SNAT
/// range (`--snat-port-range`), each claimed atomically with the flow's
/// reply tuple, so no two flows ever share one; a port comes free when its
/// flow's entries expire or close. Returns the port (wire order).
#[inline(always)]
fn claim_snat_port(pkt: &Packet, flow: &mut NewFlow) -> Result<u16, Counter> {
    let (min, max) = match (config(config::SNAT_PORT_MIN), config(config::SNAT_PORT_MAX)) {
        (lo, hi) if lo != 0 && lo <= hi && hi <= 0xffff => (lo, hi),
        _ => (u32::from(DEFAULT_SNAT_PORTS.0), u32::from(DEFAULT_SNAT_PORTS.1)),
    };
    let span = max - min + 1;
    // Look for a free port with lookups only (a small loop body keeps the
    // verifier quick), then claim it; losing the claim to a flow created on
    // another CPU meanwhile costs this packet (the client retransmits).
    let mut found = false;
    for _ in 0..SNAT_TRIES {
        // SAFETY: helper without preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        // (No `%`: its divide-by-zero panic path is not a program the
        // verifier accepts.)
        flow.snat_port = ((min + r.checked_rem(span).unwrap_or(0)) as u16).to_be();
        if ct::reply_tuple_free(pkt, flow) {
            found = true;
            break;
        }
    }
    if !found {
        return Err(Counter::DropSnatPorts);
    }
    match ct::create(pkt, flow, true) {
        Err(CreateError::Taken) => Err(Counter::DropSnatPorts),
        created => {
            track(created);
            Ok(flow.snat_port)
        }
    }
}

/// A new north-south flow at TC; `Ok(TC_ACT_OK)` untouched when `pkt` is not
/// for an external frontend.
#[inline(always)]
pub fn new_flow(ctx: &TcContext, pkt: &Packet) -> Result<i32, Counter> {
    match open(ctx, pkt)? {
        Arrival::NotOurs => Ok(TC_ACT_OK),
        // This node does not serve the Service (kube-proxy drops, so a load
        // balancer's health check, not the client, finds out).
        Arrival::NoEndpoint { etp_local: true } => Err(Counter::DropNoBackendExternal),
        // No endpoint at all: refuse at once, like kube-proxy's REJECT rules.
        Arrival::NoEndpoint { etp_local: false } => {
            let answered = reject::rewrite(ctx, pkt)?;
            count(answered);
            crate::bounce(ctx)
        }
        Arrival::Flow {
            rev_nat_id,
            backend,
            snat,
        } => {
            count_service(rev_nat_id, ctx.len());
            forward(ctx, pkt, backend, snat)
        }
    }
}

/// DNAT (and SNAT to the node for a remote backend) of a north-south packet
/// to `backend` (address, port), sent to the backend's device by FIB lookup.
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Packet, backend: (u32, u16), snat: Option<(u32, u16)>) -> Result<i32, Counter> {
    count(Counter::ServiceForward);
    nat::translate_and_send(ctx, pkt, snat.unwrap_or((pkt.saddr, pkt.sport)), backend)
}
