//! Address and port rewrites: what a flow's packets become in each
//! direction ([`forward`], [`reverse`]), and the rewrites themselves. At TC the checksums are fixed by the kernel
//! helpers (bpf_l3_csum_replace / bpf_l4_csum_replace), which also handle
//! CHECKSUM_PARTIAL skbs from veths and UDP's "no checksum" zero. At XDP there
//! is no skb: the checksums are updated here (RFC 1624), which is right for
//! complete checksums only (see `xdp::checksum_complete`; the arithmetic is in
//! `csum`).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use ferry_common::{addr_to_map, ct_flags, Counter, HAIRPIN_SNAT_ADDR, PROTO_UDP};

use crate::{
    csum,
    ct::{Forward, Reply},
    dsr,
    fib::{self, Route},
    maps::count,
    parse::{Frame as _, Packet},
    reject,
};

/// Forward direction at TC: destination := the flow's backend (address,
/// port), source := its SNAT address and port if it has one; sent straight
/// to the backend's device by FIB lookup (so the node's netfilter sees
/// neither direction of a translated flow, and cannot call its packets
/// INVALID). Hairpin (a Pod reaching itself): source := the hairpin address,
/// and the packet goes straight back into the Pod's veth.
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Packet, flow: &Forward) -> Result<i32, Counter> {
    count(Counter::ServiceForward);
    if flow.dsr {
        return dsr::forward(ctx, pkt, flow);
    }
    let backend = flow.backend;
    match flow.snat {
        Some(_) if !flow.external => {
            let m = |_| Counter::DropMalformed;
            rewrite(ctx, pkt, Side::Dst, pkt.daddr, backend.0, pkt.dport, backend.1).map_err(m)?;
            let hairpin = addr_to_map(HAIRPIN_SNAT_ADDR);
            rewrite(ctx, pkt, Side::Src, pkt.saddr, hairpin, pkt.sport, pkt.sport).map_err(m)?;
            fib::bounce(ctx)
        }
        snat => translate_and_send(ctx, pkt, snat.unwrap_or((pkt.saddr, pkt.sport)), backend),
    }
}

/// Reply direction at TC ingress: source := the frontend the client
/// dialled; with SNAT also destination := the original client. Hairpin
/// replies go straight back into the Pod's veth; all others are forwarded to
/// the client by FIB lookup, past the node's stack: their source may now be
/// a node address (which the stack drops as a martian), and netfilter, which
/// never saw the flow, would take them for INVALID.
#[inline(always)]
pub fn reverse(ctx: &TcContext, pkt: &Packet, r: &Reply) -> Result<i32, Counter> {
    // The Service was deleted under a live flow.
    let frontend = r.frontend.ok_or(Counter::DropBackendMissing)?;
    count(Counter::ReverseNat);
    count_dsr_reply(r);
    let src = (frontend.addr, frontend.port);
    let dst = r.snat.unwrap_or((pkt.daddr, pkt.dport));
    if r.hairpin() {
        let m = |_| Counter::DropMalformed;
        rewrite(ctx, pkt, Side::Src, pkt.saddr, src.0, pkt.sport, src.1).map_err(m)?;
        rewrite(ctx, pkt, Side::Dst, pkt.daddr, dst.0, pkt.dport, dst.1).map_err(m)?;
        return fib::bounce(ctx);
    }
    translate_and_send(ctx, pkt, src, dst)
}

/// Reply direction at TC egress (a reply the node's own stack sends, of a
/// host-network backend): rewritten as [`reverse`] does, and left where the
/// stack routed it.
#[inline(always)]
pub fn reverse_in_place(ctx: &TcContext, pkt: &Packet, r: &Reply) -> Result<(), Counter> {
    let frontend = r.frontend.ok_or(Counter::DropBackendMissing)?;
    let m = |_| Counter::DropMalformed;
    rewrite(ctx, pkt, Side::Src, pkt.saddr, frontend.addr, pkt.sport, frontend.port).map_err(m)?;
    if let Some((addr, port)) = r.snat {
        rewrite(ctx, pkt, Side::Dst, pkt.daddr, addr, pkt.dport, port).map_err(m)?;
    }
    count(Counter::ReverseNat);
    count_dsr_reply(r);
    Ok(())
}

/// A reply of a DSR flow on the backend's node: counted apart too, so that
/// it shows which node the replies left from.
#[inline(always)]
fn count_dsr_reply(r: &Reply) {
    if r.flags & ct_flags::DSR != 0 {
        count(Counter::DsrReply);
    }
}

/// Rewrites `pkt` to come from `src` and go to `dst` (address, port; wire
/// order) and sends it to the device its new destination is routed to, past
/// the node's stack (`fib`). A packet that would be too big for that device
/// and may not be fragmented (DF) is answered instead, back to its sender,
/// with an ICMP "fragmentation needed" quoting it untranslated, so that path
/// MTU discovery works through the translation; one that may be is left to
/// the stack, translated, to fragment.
#[inline(always)]
pub fn translate_and_send(ctx: &TcContext, pkt: &Packet, src: (u32, u16), dst: (u32, u16)) -> Result<i32, Counter> {
    let route = fib::route(ctx, src.0, dst.0);
    if let (Route::FragNeeded { mtu }, true) = (&route, pkt.dont_fragment) {
        reject::fragmentation_needed(ctx, pkt, *mtu)?;
        count(Counter::FragNeeded);
        return fib::bounce(ctx);
    }
    let m = |_| Counter::DropMalformed;
    if dst != (pkt.daddr, pkt.dport) {
        rewrite(ctx, pkt, Side::Dst, pkt.daddr, dst.0, pkt.dport, dst.1).map_err(m)?;
    }
    if src != (pkt.saddr, pkt.sport) {
        rewrite(ctx, pkt, Side::Src, pkt.saddr, src.0, pkt.sport, src.1).map_err(m)?;
    }
    Ok(fib::send(ctx, route))
}

/// Which endpoint of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

/// Rewrites the source or destination address and port of `pkt` from
/// (`old_addr`, `old_port`) to (`new_addr`, `new_port`). A fragment after
/// the first has no L4 header: only its address changes (the datagram's L4
/// checksum, in the first fragment, was fixed there for both).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    side: Side,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let (addr_off, port_off) = offsets(pkt, side);
    if pkt.later_fragment {
        if old_addr != new_addr {
            ctx.l3_csum_replace(pkt.ip_csum_off(), old_addr as u64, new_addr as u64, 4)?;
            ctx.store(addr_off, &new_addr, 0)?;
        }
        return Ok(());
    }
    let csum_off = pkt.l4_csum_off();
    // UDP: a zero checksum means "none" and must stay zero.
    let mangled_0 = if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled_0 | 4,
        )?;
        ctx.l3_csum_replace(pkt.ip_csum_off(), old_addr as u64, new_addr as u64, 4)?;
        ctx.store(addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled_0 | 2)?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

/// Offsets of the address and the port of `side`.
#[inline(always)]
fn offsets(pkt: &Packet, side: Side) -> (usize, usize) {
    match side {
        Side::Src => (pkt.ip_src_off(), pkt.l4_off),
        Side::Dst => (pkt.ip_src_off() + 4, pkt.l4_off + 2),
    }
}

/// [`rewrite`] for XDP, with the IPv4 and L4 checksums updated incrementally
/// here. The L4 checksum must be complete (a packet from the wire).
#[inline(always)]
pub fn rewrite_xdp(
    ctx: &XdpContext,
    pkt: &Packet,
    side: Side,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let (addr_off, port_off) = offsets(pkt, side);
    let csum_off = pkt.l4_csum_off();
    let mut l4: u16 = ctx.load(csum_off)?;
    // UDP: a zero checksum means "none" and stays zero.
    let no_l4_csum = pkt.proto == PROTO_UDP && l4 == 0;
    if old_addr != new_addr {
        let ip: u16 = ctx.load(pkt.ip_csum_off())?;
        ctx.store(pkt.ip_csum_off(), &csum::replace4(ip, old_addr, new_addr))?;
        // The address is part of the L4 pseudo-header.
        l4 = csum::replace4(l4, old_addr, new_addr);
        ctx.store(addr_off, &new_addr)?;
    }
    if old_port != new_port {
        l4 = csum::replace2(l4, old_port, new_port);
        ctx.store(port_off, &new_port)?;
    }
    if !no_l4_csum {
        // UDP sends a computed zero as all ones (zero would mean "none").
        if pkt.proto == PROTO_UDP && l4 == 0 {
            l4 = 0xffff;
        }
        ctx.store(csum_off, &l4)?;
    }
    Ok(())
}
