//! North-south service traffic arriving on a node device: NodePort (node
//! address, nodePort), ExternalIPs and LoadBalancer IPs (Service port).
//!
//! A local backend gets the packet DNATed with the client's address kept; its
//! reply goes through from_pod, which restores the frontend and forwards it out
//! of the device. A backend on another node (externalTrafficPolicy: Cluster)
//! gets it DNATed and SNATed to this node's address, so that its reply comes
//! back here, where from_netdev restores both.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_get_prandom_u32, programs::TcContext};
use ferry_common::{backend_flags, config, svc_flags, Backend, Counter};

use crate::{
    ct::{self, NewFlow},
    fib, lb,
    maps::{config, count, count_service},
    nat::{self, Side},
    parse::Packet,
    reject,
};

/// Frontend kinds served from outside the node's Pods.
const EXTERNAL_KINDS: u32 = svc_flags::NODE_PORT | svc_flags::EXTERNAL_IP | svc_flags::LOAD_BALANCER;
/// Where SNAT ports are picked when the client's own port is taken (the
/// kernel's default ephemeral range).
const SNAT_PORT_MIN: u32 = 32768;
const SNAT_PORT_SPAN: u32 = 60999 - 32768 + 1;
/// Random tries after the client's own port.
const SNAT_TRIES: u32 = 8;

/// What a packet arriving on a device is to the north-south path.
pub enum Arrival {
    /// Not for a north-south frontend: the stack's.
    NotOurs,
    /// For a frontend without a usable endpoint; `etp_local`: because the
    /// Service's externalTrafficPolicy is Local and none is on this node.
    NoEndpoint { etp_local: bool },
    /// A new flow, now tracked: to `backend`, with the source rewritten to
    /// `snat` when the backend is on another node.
    Flow { rev_nat_id: u16, backend: Backend, snat: Option<(u32, u16)> },
}

/// Picks the backend of a new north-south flow and records it in connection
/// tracking (shared by TC and XDP, so that whichever sees the next packet
/// of the flow sends it the same way).
#[inline(always)]
pub fn open(pkt: &Packet) -> Result<Arrival, Counter> {
    let Some(svc) = lb::lookup_service(pkt) else {
        return Ok(Arrival::NotOurs);
    };
    // ClusterIPs are for Pods and the node itself, not for the network.
    if svc.flags & EXTERNAL_KINDS == 0 {
        return Ok(Arrival::NotOurs);
    }
    // loadBalancerSourceRanges: a client outside them is dropped before
    // anything else, even a reject, so it learns nothing about the Service.
    if !lb::source_allowed(pkt, &svc) {
        return Err(Counter::DropSourceRange);
    }
    if svc.count == 0 {
        return Ok(Arrival::NoEndpoint { etp_local: svc.flags & svc_flags::ETP_LOCAL != 0 });
    }
    let (backend_id, b) = lb::select_backend(pkt, &svc)?;
    let snat = if b.flags & backend_flags::LOCAL != 0 {
        None
    } else {
        let addr = match config(config::NODE_ADDR) {
            0 => pkt.daddr,
            a => a,
        };
        Some((addr, snat_port(pkt, &b, addr)?))
    };
    let flow = NewFlow {
        backend_id,
        backend_addr: b.addr,
        backend_port: b.port,
        rev_nat_id: svc.rev_nat_id,
        snat_addr: snat.map_or(0, |(a, _)| a),
        snat_port: snat.map_or(0, |(_, p)| p),
        external: true,
    };
    match ct::create(pkt, &flow) {
        Ok(()) => count(Counter::CtCreated),
        Err(_) => count(Counter::DropCtFull),
    }
    Ok(Arrival::Flow { rev_nat_id: svc.rev_nat_id, backend: b, snat })
}

/// A new north-south flow at TC; `Ok(TC_ACT_OK)` untouched when `pkt` is not
/// for an external frontend.
#[inline(always)]
pub fn new_flow(ctx: &TcContext, pkt: &Packet) -> Result<i32, Counter> {
    match open(pkt)? {
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
        Arrival::Flow { rev_nat_id, backend, snat } => {
            count_service(rev_nat_id, ctx.len());
            forward(ctx, pkt, &backend, snat)
        }
    }
}

/// DNAT (and SNAT for a remote backend) of a north-south packet; a SNATed
/// packet has a node address as source and is forwarded by FIB lookup.
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Packet, b: &Backend, snat: Option<(u32, u16)>) -> Result<i32, Counter> {
    nat::rewrite(ctx, pkt, Side::Dst, pkt.daddr, b.addr, pkt.dport, b.port).map_err(|_| Counter::DropMalformed)?;
    count(Counter::ServiceForward);
    let Some((addr, port)) = snat else {
        return Ok(TC_ACT_OK);
    };
    nat::rewrite(ctx, pkt, Side::Src, pkt.saddr, addr, pkt.sport, port).map_err(|_| Counter::DropMalformed)?;
    Ok(fib::redirect(ctx, addr, b.addr))
}

/// The client's own port if the reply tuple is free, else a random free one.
#[inline(always)]
fn snat_port(pkt: &Packet, b: &Backend, addr: u32) -> Result<u16, Counter> {
    if ct::reply_tuple_free(pkt, b.addr, b.port, addr, pkt.sport) {
        return Ok(pkt.sport);
    }
    for _ in 0..SNAT_TRIES {
        // SAFETY: helper without preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        let port = ((SNAT_PORT_MIN + r % SNAT_PORT_SPAN) as u16).to_be();
        if ct::reply_tuple_free(pkt, b.addr, b.port, addr, port) {
            return Ok(port);
        }
    }
    Err(Counter::DropSnatPorts)
}
