//! Ferry's eBPF dataplane.
//!
//! Packet paths (one entry program per hook, as in Cilium's bpf/):
//! - `from_pod`: TC ingress on the host side of every Pod veth: service load
//!   balancing for Pod clients (DNAT + connection tracking) and reverse NAT for the
//!   replies of backends; a RST or ICMP port unreachable for Services without
//!   usable backends.
//! - `sock_connect4` / `sock_sendmsg4` / `sock_recvmsg4` / `sock_peer4` (and
//!   their IPv6 twins for IPv4-mapped addresses): cgroup hooks, socket-level
//!   load balancing for the node's own processes and for Pods (see `sock`).
//! - `from_netdev`: TC ingress on the node devices (`--devices`): NodePort,
//!   ExternalIP and LoadBalancer DNAT (+ SNAT to the node for backends on other
//!   nodes, see `nodeport`), and reverse NAT for the replies of backends on
//!   other nodes.
//! - `xdp_from_netdev`: XDP on the node devices (`--xdp`), in front of
//!   from_netdev: forwards the north-south flows to backends on other nodes
//!   (and their replies) before an skb exists; passes the rest on (see `xdp`).
//! - `to_netdev` / `to_pod`: TC egress of the node devices and of the Pod
//!   veths: replies that the node's own stack sends (host-network backends:
//!   the API server, node-local DNS, ingress controllers) are reverse
//!   translated on their way out, where no ingress hook sees them.
//! - `from_netdev_l3` / `to_netdev_l3`: the same two on node devices without
//!   an Ethernet header (WireGuard, TUN; see `parse`).
//!
//! Every packet entry point reads the same way: parse (`parse`), classify
//! against connection tracking (`ct::classify`: a reply, a packet of an
//! established flow, or new; an ICMP error is classified by the flow it
//! quotes, `icmp`), then act: reverse NAT or forward (`nat`), or, for a new
//! flow a frontend takes (`lb`, `nodeport`), open it (`ct::open_flow`) and
//! forward, or refuse it (`reject`).
#![no_std]
#![no_main]

mod csum;
mod ct;
mod dsr;
mod fib;
mod icmp;
mod lb;
mod maps;
mod nat;
mod nodeport;
mod parse;
mod reject;
mod sock;
mod xdp;

use aya_ebpf::{
    bindings::{xdp_action::XDP_DROP, TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use ferry_common::Counter;

use crate::{
    ct::{Class, Opened, Origin},
    maps::{count, count_service},
    sock::{Family, Hook},
};

/// TC ingress on the host side of a Pod's veth: traffic the Pod sends.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    verdict(try_from_pod(&ctx))
}

/// A TC ingress program's verdict: a packet it cannot handle is counted
/// (why) and dropped.
#[inline(always)]
fn verdict(r: Result<i32, Counter>) -> i32 {
    r.unwrap_or_else(|reason| {
        count(reason);
        TC_ACT_SHOT
    })
}

/// cgroup connect4: a socket of the node or of a Pod connecting to a frontend
/// is connected to a backend instead (see `sock`).
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V4, Hook::Connect)
}

/// cgroup sendmsg4: an unconnected UDP datagram to a frontend goes to a backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V4, Hook::Sendmsg)
}

/// cgroup recvmsg4: UDP replies are reported from the frontend addressed.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4)
}

/// cgroup getpeername4: a socket pointed at a backend reports the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_peer4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4)
}

/// The IPv6 twins, for IPv4-mapped addresses of dual-stack sockets.
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V6, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V6, Hook::Sendmsg)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V6)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_peer6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V6)
}

/// TC ingress on a node device (`--devices`): traffic from the network: replies
/// of backends on other nodes (to our Pods, or to north-south clients we SNATed
/// for), and new or tracked north-south flows.
#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    verdict(try_from_netdev(&ctx))
}

/// TC ingress on a node device without an Ethernet header (an L3 device:
/// WireGuard, TUN): from_netdev, once an Ethernet header is pushed in
/// front of the IPv4 packet (see `parse::push_ethernet`).
#[classifier]
pub fn from_netdev_l3(ctx: TcContext) -> i32 {
    if !l3_ipv4(&ctx) {
        return TC_ACT_OK;
    }
    if parse::push_ethernet(&ctx).is_err() {
        count(Counter::DropMalformed);
        return TC_ACT_SHOT;
    }
    verdict(try_from_netdev(&ctx))
}

/// TC egress of a node device: a host-network backend's replies to clients
/// outside the node (NodePort and friends, or Pods on other nodes).
#[classifier]
pub fn to_netdev(ctx: TcContext) -> i32 {
    from_host::<false>(&ctx)
}

/// TC egress of a node device without an Ethernet header: as to_netdev, on
/// the IPv4 header at offset 0.
#[classifier]
pub fn to_netdev_l3(ctx: TcContext) -> i32 {
    if !l3_ipv4(&ctx) {
        return TC_ACT_OK;
    }
    from_host::<true>(&ctx)
}

/// An IPv4 packet at an L3 device's hook whose data starts at the IPv4
/// header; one with outer headers in front is counted and left alone.
#[inline(always)]
fn l3_ipv4(ctx: &TcContext) -> bool {
    if !parse::is_ipv4(ctx) {
        return false;
    }
    if !parse::starts_at_network_header(ctx) {
        count(Counter::L3OuterHeader);
        return false;
    }
    true
}

/// TC egress of the host side of a Pod's veth: a host-network backend's
/// replies to a Pod of this node.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    from_host::<false>(&ctx)
}

/// Reverse NAT of the replies the node's stack itself sends (a local
/// host-network backend): only locally generated packets (no ingress
/// device), which no ingress hook has seen, are looked up; the packet then
/// leaves where the stack routed it. `L3`: the device has no Ethernet
/// header.
#[inline(always)]
fn from_host<const L3: bool>(ctx: &TcContext) -> i32 {
    // SAFETY: reading the skb this program runs on.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return TC_ACT_OK;
    }
    match try_from_host::<L3>(ctx) {
        Ok(()) => TC_ACT_OK,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_from_host<const L3: bool>(ctx: &TcContext) -> Result<(), Counter> {
    let parsed = if L3 { parse::parse_l3(ctx) } else { parse::parse(ctx) };
    let Some(pkt) = parsed.map_err(|_| Counter::DropMalformed)? else {
        return Ok(());
    };
    // Only replies are ours here: the node's own connections to frontends
    // were pointed at their backends at connect() (socket LB), or are not
    // translated at all; a lookup of the forward direction would cost every
    // packet the node sends.
    match ct::reply(&pkt) {
        Some(r) => nat::reverse_in_place(ctx, &pkt, &r),
        None => Ok(()),
    }
}

/// XDP on a node device (`--xdp`): the fast path of from_netdev for
/// north-south flows through this node to other nodes.
#[xdp]
pub fn xdp_from_netdev(ctx: XdpContext) -> u32 {
    match xdp::try_xdp(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(reason);
            XDP_DROP
        }
    }
}

/// from_netdev: parse, classify against connection tracking, act.
fn try_from_netdev(ctx: &TcContext) -> Result<i32, Counter> {
    let Some(pkt) = parse::parse(ctx).map_err(|_| Counter::DropMalformed)? else {
        // An ICMP error about a flow to a backend on another node.
        return icmp_error(ctx);
    };
    // A DSR flow another node balanced to a backend here: recorded, so that
    // the backend's replies leave from the frontend (`dsr`).
    dsr::accept(ctx, &pkt)?;
    let flow = match ct::classify(&pkt) {
        // Hairpin replies only ever come from the Pod's own veth.
        Class::Reply(r) if r.hairpin() => return Ok(TC_ACT_OK),
        // A remote backend's reply to a north-south client SNATed to us, or
        // to one of our Pods.
        Class::Reply(r) => return nat::reverse(ctx, &pkt, &r),
        Class::Established(f) if f.external => f,
        // Not tracked as north-south: new, if a north-south frontend takes it.
        Class::Established(_) | Class::New => match nodeport::open(ctx, &pkt)? {
            None => return Ok(TC_ACT_OK),
            Some(Opened::Flow(f)) => f,
            // This node does not serve the Service (kube-proxy drops, so a
            // load balancer's health check, not the client, finds out).
            Some(Opened::NoEndpoint { etp_local: true }) => return Err(Counter::DropNoBackendExternal),
            // No endpoint at all: refuse at once, like kube-proxy's REJECT rules.
            Some(Opened::NoEndpoint { etp_local: false }) => return reject::refuse(ctx, &pkt),
        },
    };
    count_service(flow.rev_nat_id, ctx.len());
    nat::forward(ctx, &pkt, &flow)
}

/// from_pod: parse, classify against connection tracking, act.
fn try_from_pod(ctx: &TcContext) -> Result<i32, Counter> {
    let Some(pkt) = parse::parse(ctx).map_err(|_| Counter::DropMalformed)? else {
        // An ICMP error a local backend sent about a flow to it.
        return icmp_error(ctx);
    };
    // A packet to an address that is no frontend (Pod to Pod, or a
    // connection socket LB already pointed at a backend) can only be a
    // backend's reply: the forward conntrack and services lookups are skipped.
    if !maps::may_be_frontend(pkt.daddr) {
        return match ct::reply(&pkt) {
            Some(r) => nat::reverse(ctx, &pkt, &r),
            None => Ok(TC_ACT_OK),
        };
    }
    let flow = match ct::classify(&pkt) {
        // A backend's reply to a client (or to the hairpin address). A local
        // backend's reply to a north-south client leaves through a node
        // device; everything else goes back to a Pod of ours.
        Class::Reply(r) => return nat::reverse(ctx, &pkt, &r),
        Class::Established(f) => f,
        Class::New => {
            let Some(svc) = lb::lookup_service_in_cluster(&pkt) else {
                return Ok(TC_ACT_OK);
            };
            // A Pod dialling a LoadBalancer IP is held to its
            // loadBalancerSourceRanges too, as kube-proxy's firewall chain does.
            match ct::open_flow(&pkt, &svc, Origin::Pod)? {
                Opened::Flow(f) => f,
                // No usable endpoint: refuse at once, like kube-proxy's REJECT rules.
                Opened::NoEndpoint { .. } => return reject::refuse(ctx, &pkt),
            }
        }
    };
    count_service(flow.rev_nat_id, ctx.len());
    nat::forward(ctx, &pkt, &flow)
}

/// A packet that is not TCP or UDP: an ICMP error related to a tracked flow
/// is translated back towards its client (`icmp`); anything else passes.
#[inline(always)]
fn icmp_error(ctx: &TcContext) -> Result<i32, Counter> {
    Ok(icmp::reverse(ctx)?.unwrap_or(TC_ACT_OK))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
