//! Forwarding north-south packets ourselves: a FIB lookup for the rewritten
//! packet, then a redirect to the egress device with the neighbour's MAC (at
//! TC also through the kernel's neighbour resolution when it is not known yet).
//!
//! Needed because after SNAT (or reverse NAT of a NodePort reply) the packet's
//! source is one of the node's own addresses, and the stack drops packets that
//! arrive with a local source address ("martian source"); and so that the
//! node's netfilter never sees half a translated flow.
//!
//! The route is chosen before the packet is rewritten (`route`), so that a
//! packet too big for the egress device can still be answered with an ICMP
//! "fragmentation needed" quoting it as its sender sent it.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
    },
    cty::c_void,
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
    EbpfContext as _,
};
use ferry_common::Counter;

use crate::{
    maps::{count, is_node_addr},
    parse::{self, set_macs},
};

const AF_INET: u8 = 2;

/// Where the routing table sends a packet.
pub enum Route {
    /// Out of `ifindex` to the next hop `dmac`, from `smac`.
    Forward { ifindex: u32, dmac: [u8; 6], smac: [u8; 6] },
    /// Out of `ifindex` to the next hop `nh`, whose MAC is not known yet.
    NoNeighbour { ifindex: u32, nh: u32 },
    /// The packet is bigger than the egress device's `mtu` (at TC, where the
    /// kernel checks the skb: a GSO packet passes whatever its segments'
    /// size, see `is_skb_forwardable`).
    FragNeeded { mtu: u32 },
    /// "Not forwarded" (BPF_FIB_LKUP_RET_NOT_FWDED): the kernel says the same
    /// for a destination that is an address of the node itself (the route
    /// is of type local: delivered, not forwarded) and for one without any
    /// route (a failed lookup). [`route`] tells them apart ([`Route::Local`],
    /// [`Route::Miss`]) by the node's addresses.
    NotForwarded,
    /// An address of the node itself (a host-network backend, or a client
    /// process of the node): the stack delivers it.
    Local,
    /// No route (or not forwardable): the stack's business.
    Miss,
}

/// The route of the packet once it is rewritten to `saddr` → `daddr`,
/// looked up before the rewrite (the kernel checks the skb against the
/// egress device's MTU).
#[inline(always)]
pub fn route(ctx: &TcContext, saddr: u32, daddr: u32) -> Route {
    route_len(ctx, saddr, daddr, 0)
}

/// [`route`] for a packet of IPv4 total length `tot_len` once rewritten
/// (it grows: the DSR option), checked against the route's MTU instead of
/// the skb's length; 0: the skb is checked.
#[inline(always)]
pub fn route_len(ctx: &TcContext, saddr: u32, daddr: u32, tot_len: u16) -> Route {
    // SAFETY: reading the skb's ingress ifindex.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    match lookup(ctx.as_ptr(), ingress, saddr, daddr, tot_len) {
        // The kernel does not say which: the agent keeps the node's
        // addresses in a map.
        Route::NotForwarded if is_node_addr(daddr) => Route::Local,
        Route::NotForwarded => Route::Miss,
        r => r,
    }
}

/// Looks up the route of `saddr` → `daddr` as if the packet arrived on
/// `ifindex`; `ctx` is the program's context (skb or xdp_md). With
/// `tot_len` (the IPv4 total length; 0: unchecked) a packet bigger than the
/// egress MTU gets no route (XDP leaves it to TC, which answers it).
#[inline(always)]
pub fn lookup(ctx: *mut c_void, ifindex: u32, saddr: u32, daddr: u32, tot_len: u16) -> Route {
    // SAFETY: an all-zero bpf_fib_lookup is a valid request to fill in.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: ctx is the program's context; p lives on our stack for the call.
    let rc = unsafe { fib_lookup(ctx, &mut p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Route::Forward {
            ifindex: p.ifindex,
            dmac: p.dmac,
            smac: p.smac,
        };
    }
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: reading the MTU the lookup wrote.
        return Route::FragNeeded {
            mtu: u32::from(unsafe { p.__bindgen_anon_1.mtu_result }),
        };
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // SAFETY: reading the next hop the lookup wrote (IPv4 family).
        let nh = unsafe { p.__bindgen_anon_4.ipv4_dst };
        return Route::NoNeighbour { ifindex: p.ifindex, nh };
    }
    if rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64 {
        return Route::NotForwarded;
    }
    Route::Miss
}

/// Sends the (rewritten) packet along `route`. To an address of the node,
/// without a route, or when it is too big and may be fragmented, it is left
/// to the stack.
#[inline(always)]
pub fn send(ctx: &TcContext, route: Route) -> i32 {
    match route {
        Route::Forward { ifindex, dmac, smac } => {
            if set_macs(ctx, &dmac, &smac).is_err() {
                count(Counter::FibMiss);
                return TC_ACT_OK;
            }
            // SAFETY: helper without memory arguments.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        Route::NoNeighbour { ifindex, nh } => {
            // SAFETY: an all-zero bpf_redir_neigh is valid; filled in below.
            let mut n: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            n.nh_family = AF_INET as u32;
            n.__bindgen_anon_1.ipv4_nh = nh;
            // SAFETY: n lives on our stack for the call.
            unsafe { bpf_redirect_neigh(ifindex, &mut n, core::mem::size_of::<bpf_redir_neigh>() as i32, 0) as i32 }
        }
        Route::FragNeeded { .. } => TC_ACT_OK,
        Route::Local => {
            count(Counter::FibLocal);
            TC_ACT_OK
        }
        Route::NotForwarded | Route::Miss => {
            count(Counter::FibMiss);
            TC_ACT_OK
        }
    }
}

/// Sends the packet back out of the interface it arrived on (into the Pod, or
/// back to the network on a device): hairpin flows, and the answers built in
/// place of a packet (`reject`).
#[inline(always)]
pub fn bounce(ctx: &TcContext) -> Result<i32, Counter> {
    parse::swap_macs(ctx).map_err(|_| Counter::DropMalformed)?;
    // SAFETY: reading the ifindex of the skb this program runs on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: helper without memory arguments.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
