//! Forwarding north-south packets ourselves: a FIB lookup for the rewritten
//! packet, then a redirect to the egress device with the neighbour's MAC (or
//! through the kernel's neighbour resolution when it is not known yet).
//!
//! Needed because after SNAT (or reverse NAT of a NodePort reply) the packet's
//! source is one of the node's own addresses, and the stack drops packets that
//! arrive with a local source address ("martian source").
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use ferry_common::Counter;

use crate::maps::count;

const AF_INET: u8 = 2;
const ETH_ALEN: usize = 6;

/// Sends the packet (already rewritten: `saddr` → `daddr`) out of the device
/// the routing table picks. Without a route it is left to the stack.
#[inline(always)]
pub fn redirect(ctx: &TcContext, saddr: u32, daddr: u32) -> i32 {
    // SAFETY: an all-zero bpf_fib_lookup is a valid request to fill in.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    // SAFETY: reading the skb's ingress ifindex.
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: ctx is the skb; p lives on our stack for the call.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if ctx.store(0, &p.dmac, 0).is_err() || ctx.store(ETH_ALEN, &p.smac, 0).is_err() {
            count(Counter::FibMiss);
            return TC_ACT_OK;
        }
        // SAFETY: helper without memory arguments.
        return unsafe { bpf_redirect(p.ifindex, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // SAFETY: reading the next hop the lookup wrote (IPv4 family).
        let nh_addr = unsafe { p.__bindgen_anon_4.ipv4_dst };
        // SAFETY: an all-zero bpf_redir_neigh is valid; filled in below.
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = AF_INET as u32;
        nh.__bindgen_anon_1.ipv4_nh = nh_addr;
        // SAFETY: nh lives on our stack for the call.
        return unsafe {
            bpf_redirect_neigh(p.ifindex, &mut nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0)
        } as i32;
    }
    count(Counter::FibMiss);
    TC_ACT_OK
}
