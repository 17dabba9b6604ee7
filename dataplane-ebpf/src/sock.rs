//! Socket-level load balancing, as Cilium's kube-proxy replacement does it:
//! a connect() or an unconnected UDP sendmsg() to a frontend is pointed at a
//! backend before any packet exists, so the connection costs what a direct
//! one does: no DNAT, no connection tracking, no reverse NAT. getpeername()
//! and recvmsg() report the frontend the socket addressed.
//!
//! Which sockets: those of the cgroup the programs are attached to
//! (`--cgroup-path`) whose network namespace is the node's own (host
//! network) or, with `--socket-lb-pods` (config `SOCK_LB_PODS`), any other
//! (Pods) that is not in `FERRY_SOCK_LB_SKIP`. The IPv6 twins serve
//! IPv4-mapped addresses (`::ffff:a.b.c.d`) of dual-stack sockets.
//!
//! What stays on the per-packet (TC) path for Pods, on purpose:
//! - connected UDP: the socket keeps the frontend's address and from_pod
//!   translates each datagram with connection tracking, whose entries the
//!   agent flushes when a backend leaves. cgroup sendmsg4 does not run for
//!   send() on a connected socket, so a socket pointed at a backend at
//!   connect() could never be re-pointed: it would keep sending to a dead
//!   backend (cilium#27300). This way its next datagram reaches a remaining
//!   backend and replies come from the frontend, without a reconnect.
//! - sessionAffinity: ClientIP frontends: affinity is per client address,
//!   which a socket does not have yet at connect(); from_pod applies it with
//!   the same table as for every other client.
//! - loadBalancerSourceRanges frontends: the same reason (the source).
//!
//! The node's own sockets keep the socket path for all of these (there is no
//! TC hook for traffic the node's stack originates towards a frontend).
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext as _,
};
use ferry_common::{config, svc_flags, Counter, RevNat, SockRevKey, PROTO_TCP, PROTO_UDP};

use crate::{
    lb,
    maps::{config, count, SOCK_LB_SKIP, SOCK_REVNAT},
    parse::Packet,
};

/// Verdicts of a sock_addr program.
pub const ALLOW: i32 = 1;
const REJECT: i32 = 0;
/// `-ECONNREFUSED`: what connect() fails with, as for a refused SYN.
const ECONNREFUSED: i32 = 111;
/// 1 where the kernel has `bpf_set_retval` (5.18), set by the agent at load
/// time (read-only data: the verifier knows the value and never looks at the
/// call on older kernels, which would refuse the program).
#[unsafe(no_mangle)]
static SOCK_SET_RETVAL: u32 = 0;

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), wire order.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The address family of the hook (its context fields differ).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    /// IPv4-mapped IPv6 addresses only (IPv6 Services are not supported yet).
    V6,
}

/// Which hook translates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// connect(): TCP, and UDP sockets being connected.
    Connect,
    /// sendmsg() with an address on an unconnected UDP socket.
    Sendmsg,
}

/// Whose socket it is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The node's own network namespace (host network).
    Node,
    /// Another network namespace: a Pod.
    Pod,
}

/// Whether the socket load balancer serves this socket, and as whose.
#[inline(always)]
fn owner(ctx: &SockAddrContext) -> Option<Owner> {
    // SAFETY: helper on our own context.
    let ns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host = u64::from(config(config::HOST_NETNS_COOKIE_LO)) | u64::from(config(config::HOST_NETNS_COOKIE_HI)) << 32;
    if host == 0 {
        // The agent has not configured the hooks (yet).
        return None;
    }
    if ns == host {
        return Some(Owner::Node);
    }
    // SAFETY: looked up and dropped at once.
    if config(config::SOCK_LB_PODS) == 0 || unsafe { SOCK_LB_SKIP.get(&ns) }.is_some() {
        return None;
    }
    Some(Owner::Pod)
}

/// The IPv4 destination (or peer) in the context, wire order.
#[inline(always)]
fn dest(sa: &bpf_sock_addr, family: Family) -> Option<(u32, u16)> {
    let port = sa.user_port as u16;
    match family {
        Family::V4 => Some((sa.user_ip4, port)),
        Family::V6 => {
            // One 4-byte load per word: the verifier refuses wider context
            // reads of user_ip6.
            // SAFETY: fields of the context the kernel passed.
            let w = |i: usize| unsafe { core::ptr::read_volatile(&sa.user_ip6[i]) };
            (w(0) == 0 && w(1) == 0 && w(2) == V4_MAPPED).then(|| (w(3), port))
        }
    }
}

#[inline(always)]
fn set_dest(sa: &mut bpf_sock_addr, family: Family, addr: u32, port: u16) {
    match family {
        Family::V4 => sa.user_ip4 = addr,
        Family::V6 => sa.user_ip6[3] = addr,
    }
    sa.user_port = port as u32;
}

/// connect4/6 and sendmsg4/6: the destination, if it is a frontend with
/// backends, becomes a backend; a frontend without usable backends fails the
/// call with ECONNREFUSED at once. Returns the program's verdict.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, family: Family, hook: Hook) -> i32 {
    let Some(owner) = owner(ctx) else {
        return ALLOW;
    };
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let Some((vip, vport)) = dest(sa, family) else {
        return ALLOW;
    };
    let pkt = Packet {
        l3_off: 0,
        l4_off: 0,
        proto,
        saddr: 0,
        daddr: vip,
        sport: 0,
        dport: vport,
        tcp_flags: 0,
        dont_fragment: false,
        fragment: false,
        later_fragment: false,
    };
    let Some(svc) = lb::lookup_service_in_cluster(&pkt) else {
        return ALLOW;
    };
    if owner == Owner::Pod {
        // loadBalancerSourceRanges need the client's address, which a socket
        // does not have yet: a Pod's connection to such a frontend is left
        // to from_pod. The node's own sockets are not checked: kube-proxy
        // lets node addresses through whatever the ranges say.
        if svc.value.flags & svc_flags::SOURCE_RANGES != 0 {
            return ALLOW;
        }
        // A connected UDP socket keeps the frontend's address: from_pod
        // translates (or refuses) each datagram, so the socket follows
        // backend changes, also from no endpoint to some (see the module's
        // documentation).
        if proto == PROTO_UDP && hook == Hook::Connect {
            return ALLOW;
        }
    }
    if svc.value.count == 0 {
        // No usable endpoint: refuse at once, as kube-proxy's REJECT rules
        // (and from_pod's RST) do: connect() or sendmsg() fails with
        // ECONNREFUSED.
        count(Counter::SockReject);
        // SAFETY: a global the loader sets; read as the kernel has it.
        if unsafe { core::ptr::read_volatile(&SOCK_SET_RETVAL) } != 0 {
            // SAFETY: helper without memory arguments; cgroup programs may
            // set the return value of the syscall.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        // Without it (kernels before 5.18) the call fails with EPERM.
        return REJECT;
    }
    // sessionAffinity is per client address: left to from_pod for Pods.
    if owner == Owner::Pod && svc.value.flags & svc_flags::AFFINITY != 0 {
        return ALLOW;
    }
    let Ok((_, b)) = lb::select_backend(&pkt, &svc, lb::Chooser::Socket) else {
        // The agent is mid-update: the TC path decides for this connection.
        return ALLOW;
    };
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr: b.addr,
        port: b.port,
        _pad: 0,
    };
    // For getpeername() and UDP replies; a full table only costs what they
    // report (LRU anyway).
    let _ = SOCK_REVNAT.insert(
        &key,
        &RevNat {
            addr: vip,
            port: vport,
            _pad: 0,
        },
        0,
    );
    set_dest(sa, family, b.addr, b.port);
    count(Counter::SockForward);
    ALLOW
}

/// recvmsg4/6 and getpeername4/6: a peer this socket was pointed at through
/// a frontend is reported as that frontend.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some((addr, port)) = dest(sa, family) else {
        return ALLOW;
    };
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(front) = unsafe { SOCK_REVNAT.get(&key).copied() } {
        set_dest(sa, family, front.addr, front.port);
    }
    ALLOW
}
