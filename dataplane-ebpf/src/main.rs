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
#![no_std]
#![no_main]

mod csum;
mod ct;
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
    helpers::bpf_redirect,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use ferry_common::{addr_to_map, ct_flags, Counter, HAIRPIN_SNAT_ADDR};

use crate::{
    ct::NewFlow,
    maps::{count, count_service},
    nat::Side,
    parse::Packet,
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
    let Some(r) = ct::reply(&pkt) else {
        return Ok(());
    };
    let frontend = r.frontend.ok_or(Counter::DropBackendMissing)?;
    let m = |_| Counter::DropMalformed;
    nat::rewrite(ctx, &pkt, Side::Src, pkt.saddr, frontend.addr, pkt.sport, frontend.port).map_err(m)?;
    if let Some((addr, port)) = r.snat {
        nat::rewrite(ctx, &pkt, Side::Dst, pkt.daddr, addr, pkt.dport, port).map_err(m)?;
    }
    count(Counter::ReverseNat);
    Ok(())
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

fn try_from_netdev(ctx: &TcContext) -> Result<i32, Counter> {
    let Some(pkt) = parse::parse(ctx).map_err(|_| Counter::DropMalformed)? else {
        // An ICMP error about a flow to a backend on another node.
        return Ok(icmp::reverse(ctx)?.unwrap_or(TC_ACT_OK));
    };
    if let Some(r) = ct::reply(&pkt) {
        let external = r.flags & ct_flags::EXTERNAL != 0;
        // Hairpin replies only ever come from the Pod's own veth.
        if !external && r.snat.is_some() {
            return Ok(TC_ACT_OK);
        }
        // A remote backend's reply to a north-south client SNATed to us, or
        // to one of our Pods.
        return reverse_nat(ctx, &pkt, &r);
    }
    if let Some(f) = ct::forward(&pkt) {
        if f.external {
            count_service(f.rev_nat_id, ctx.len());
            return nodeport::forward(ctx, &pkt, f.backend, f.snat);
        }
    }
    nodeport::new_flow(ctx, &pkt)
}

fn try_from_pod(ctx: &TcContext) -> Result<i32, Counter> {
    let Some(pkt) = parse::parse(ctx).map_err(|_| Counter::DropMalformed)? else {
        // An ICMP error a local backend sent about a flow to it.
        return Ok(icmp::reverse(ctx)?.unwrap_or(TC_ACT_OK));
    };
    // A reply of a backend to a client (or to the hairpin address)? A local
    // backend's reply to a north-south client leaves through a node device;
    // everything else goes back to a Pod of ours.
    if let Some(r) = ct::reply(&pkt) {
        return reverse_nat(ctx, &pkt, &r);
    }
    // A packet of a flow we already balanced.
    if let Some(f) = ct::forward(&pkt) {
        count_service(f.rev_nat_id, ctx.len());
        return dnat(ctx, &pkt, f.backend, f.snat.is_some());
    }
    let Some(svc) = lb::lookup_service_in_cluster(&pkt) else {
        return Ok(TC_ACT_OK);
    };
    // A Pod dialling a LoadBalancer IP is held to its loadBalancerSourceRanges
    // too, as kube-proxy's firewall chain does.
    if !lb::source_allowed(&pkt, &svc) {
        return Err(Counter::DropSourceRange);
    }
    if svc.value.count == 0 {
        // No usable endpoint: refuse at once, like kube-proxy's REJECT rules.
        let answered = reject::rewrite(ctx, &pkt)?;
        count(answered);
        return bounce(ctx);
    }
    let (backend_id, backend) = lb::select_backend(&pkt, &svc, lb::Chooser::Flow)?;
    count_service(svc.value.rev_nat_id, ctx.len());
    let hairpin = backend.addr == pkt.saddr;
    let flow = NewFlow {
        backend_id,
        backend,
        rev_nat_id: svc.value.rev_nat_id,
        snat_addr: if hairpin { addr_to_map(HAIRPIN_SNAT_ADDR) } else { 0 },
        snat_port: pkt.sport,
        external: false,
    };
    // The reply tuple is unique to the client's own tuple: overwritten, never
    // contended.
    match ct::create(&pkt, &flow, false) {
        Ok(()) => count(Counter::CtCreated),
        // Keep the node working when the table is full: this packet still goes.
        Err(_) => count(Counter::DropCtFull),
    }
    dnat(ctx, &pkt, (backend.addr, backend.port), hairpin)
}

/// Forward direction: destination := the backend (address, port), sent
/// straight to the backend's device by FIB lookup (so the node's netfilter
/// sees neither direction of a translated flow, and cannot call its packets
/// INVALID); for hairpin also source := the hairpin address, and the packet
/// goes straight back into the Pod's veth.
#[inline(always)]
fn dnat(ctx: &TcContext, pkt: &Packet, backend: (u32, u16), hairpin: bool) -> Result<i32, Counter> {
    count(Counter::ServiceForward);
    if !hairpin {
        return nat::translate_and_send(ctx, pkt, (pkt.saddr, pkt.sport), backend);
    }
    let m = |_| Counter::DropMalformed;
    nat::rewrite(ctx, pkt, Side::Dst, pkt.daddr, backend.0, pkt.dport, backend.1).map_err(m)?;
    let snat = addr_to_map(HAIRPIN_SNAT_ADDR);
    nat::rewrite(ctx, pkt, Side::Src, pkt.saddr, snat, pkt.sport, pkt.sport).map_err(m)?;
    bounce(ctx)
}

/// Reply direction: source := the frontend the client dialled; with SNAT
/// also destination := the original client. Hairpin replies go straight back
/// into the Pod's veth; all others are forwarded to the client by FIB lookup,
/// past the node's stack: their source may now be a node address (which the
/// stack drops as a martian), and netfilter, which never saw the flow, would
/// take them for INVALID.
#[inline(always)]
fn reverse_nat(ctx: &TcContext, pkt: &Packet, r: &ct::Reply) -> Result<i32, Counter> {
    // The Service was deleted under a live flow.
    let frontend = r.frontend.ok_or(Counter::DropBackendMissing)?;
    count(Counter::ReverseNat);
    let src = (frontend.addr, frontend.port);
    let dst = r.snat.unwrap_or((pkt.daddr, pkt.dport));
    // Hairpin: SNAT without a north-south client.
    if r.snat.is_some() && r.flags & ct_flags::EXTERNAL == 0 {
        let m = |_| Counter::DropMalformed;
        nat::rewrite(ctx, pkt, Side::Src, pkt.saddr, src.0, pkt.sport, src.1).map_err(m)?;
        nat::rewrite(ctx, pkt, Side::Dst, pkt.daddr, dst.0, pkt.dport, dst.1).map_err(m)?;
        return bounce(ctx);
    }
    nat::translate_and_send(ctx, pkt, src, dst)
}

/// Sends the packet back out of the interface it arrived on (into the Pod, or
/// back to the network on a device).
#[inline(always)]
pub(crate) fn bounce(ctx: &TcContext) -> Result<i32, Counter> {
    parse::swap_macs(ctx).map_err(|_| Counter::DropMalformed)?;
    // SAFETY: reading the ifindex of the skb this program runs on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: helper without memory arguments.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
