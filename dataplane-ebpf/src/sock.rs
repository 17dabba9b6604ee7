//! Socket-level load balancing for processes in the node's own network
//! namespace (host network), as Cilium does: a connect() or sendmsg() to a
//! frontend is pointed at a backend before any packet exists, so the node's
//! own traffic needs no NAT at all; recvmsg() reports UDP replies as coming from
//! the frontend the socket addressed.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
    EbpfContext as _,
};
use ferry_common::{config, RevNat, SockRevKey, PROTO_TCP, PROTO_UDP};

use crate::{
    lb,
    maps::{config, SOCK_REVNAT},
    parse::Packet,
};

/// Whether the socket is in the node's own network namespace (the agent
/// writes its cookie before attaching these programs). Pods' sockets are left
/// to the TC path: per-client affinity, reject, stale-flow flushing apply there.
#[inline(always)]
fn host_socket(ctx: &SockAddrContext) -> bool {
    let want = u64::from(config(config::HOST_NETNS_COOKIE_LO)) | u64::from(config(config::HOST_NETNS_COOKIE_HI)) << 32;
    // SAFETY: helper on our own context.
    want != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == want
}

/// connect4 (TCP and connected UDP) and sendmsg4 (unconnected UDP): the
/// destination, if it is a frontend with backends, becomes a random backend.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext) {
    if !host_socket(ctx) {
        return;
    }
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return;
    }
    let (vip, vport) = (sa.user_ip4, sa.user_port as u16);
    let pkt = Packet { l3_off: 0, l4_off: 0, proto, saddr: 0, daddr: vip, sport: 0, dport: vport, tcp_flags: 0, dont_fragment: false, fragment: false, later_fragment: false };
    let Some(svc) = lb::lookup_service_in_cluster(&pkt) else {
        return;
    };
    // loadBalancerSourceRanges are not checked here: the client is the node
    // itself, which kube-proxy lets through too (it accepts node addresses
    // whatever the ranges say), and a socket has no source address yet.
    // Without backends the connection goes to the frontend and is refused or
    // times out there (as with kube-proxy for node processes without REJECT).
    let Ok((_, b)) = lb::select_backend(&pkt, &svc, lb::Chooser::Socket) else {
        return;
    };
    if proto == PROTO_UDP {
        // SAFETY: helper on our own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let key = SockRevKey { cookie, addr: b.addr, port: b.port, _pad: 0 };
        // A full table only costs the reply's reported source (LRU anyway).
        let _ = SOCK_REVNAT.insert(&key, &RevNat { addr: vip, port: vport, _pad: 0 }, 0);
    }
    sa.user_ip4 = b.addr;
    sa.user_port = b.port as u32;
}

/// recvmsg4: a UDP datagram from a backend this socket was sent to through a
/// frontend is reported as coming from that frontend.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) {
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey { cookie, addr: sa.user_ip4, port: sa.user_port as u16, _pad: 0 };
    // SAFETY: copied out at once.
    if let Some(front) = unsafe { SOCK_REVNAT.get(&key).copied() } {
        sa.user_ip4 = front.addr;
        sa.user_port = front.port as u32;
    }
}
