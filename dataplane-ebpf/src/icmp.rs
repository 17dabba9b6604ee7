//! ICMP errors about translated flows, on their way to the client.
//!
//! A backend (or a router on its side) that answers a translated packet with
//! an ICMP error ("port unreachable", "fragmentation needed", "time
//! exceeded", ...) quotes the packet as it received it: from the client (or
//! the node address it was SNATed to) to the backend. The client's socket
//! knows only the frontend, so such an error would be dropped and path MTU
//! discovery would blackhole. Here the quoted header is translated back the
//! way the flow's replies are (the quoted destination becomes the frontend,
//! an SNATed source the client again), the outer header with it, and every
//! checksum the change touches is fixed incrementally: the outer IPv4 one,
//! the quoted IPv4 one, the quoted UDP/TCP one when it is in the quote, and
//! the ICMP one over all of that (netfilter NAT does the same for kube-proxy;
//! Cilium translates ICMP errors in BPF).
use aya_ebpf::programs::TcContext;
use ferry_common::{Counter, CtKey, CT_DIR_REPLY, PROTO_TCP, PROTO_UDP};

use crate::{
    ct, fib,
    maps::count,
    parse::{ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF},
};

const ETH_P_IP: u16 = 0x0800;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// ICMP header: type, code, checksum, 4 bytes of rest.
const ICMP_HLEN: usize = 8;

/// An ICMP error quoting a TCP or UDP packet.
struct Quote {
    /// Offsets of the ICMP checksum, the quoted IPv4 header and its L4 header.
    icmp_csum: usize,
    ip: usize,
    l4: usize,
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

/// Translates an ICMP error about a tracked flow back towards its client
/// and sends it there; `Ok(None)` for any other packet.
#[inline(always)]
pub fn reverse(ctx: &TcContext) -> Result<Option<i32>, Counter> {
    let Some(q) = quote(ctx).map_err(|_| Counter::DropMalformed)? else {
        return Ok(None);
    };
    // The flow's reply entry: the quoted packet's tuple, reversed.
    let key = CtKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let Some(flow) = ct::related(&key) else {
        return Ok(None);
    };
    let Some(frontend) = flow.frontend else {
        return Ok(None);
    };
    let m = |_| Counter::DropMalformed;
    let outer_src: u32 = ctx.load(IP_SRC_OFF).map_err(m)?;
    let outer_dst: u32 = ctx.load(IP_DST_OFF).map_err(m)?;
    // The backend itself answered: from the frontend, as its replies are.
    let new_src = if outer_src == q.daddr { frontend.addr } else { outer_src };
    // An SNATed flow (hairpin, north-south to another node): the client is
    // in the entry; otherwise it is the quoted source itself.
    let (client, client_port) = flow.snat.unwrap_or((q.saddr, q.sport));
    let route = fib::route(ctx, new_src, client);
    rewrite_quote(ctx, &q, (client, client_port), (frontend.addr, frontend.port)).map_err(m)?;
    replace_outer(ctx, IP_SRC_OFF, outer_src, new_src).map_err(m)?;
    replace_outer(ctx, IP_DST_OFF, outer_dst, client).map_err(m)?;
    count(Counter::IcmpErrorTranslated);
    Ok(Some(fib::send(ctx, route)))
}

/// The quote of an ICMP error about a TCP or UDP packet, if `ctx` is one.
#[inline(always)]
fn quote(ctx: &TcContext) -> Result<Option<Quote>, i64> {
    let ether_type: u16 = ctx.load(12)?;
    if ether_type != ETH_P_IP.to_be() {
        return Ok(None);
    }
    let vihl: u8 = ctx.load(IP_OFF)?;
    let proto: u8 = ctx.load(IP_OFF + 9)?;
    let frags = u16::from_be(ctx.load(IP_OFF + 6)?);
    if vihl >> 4 != 4 || proto != IPPROTO_ICMP || frags & 0x3fff != 0 {
        return Ok(None);
    }
    let icmp = IP_OFF + usize::from(vihl & 0x0f) * 4;
    let kind: u8 = ctx.load(icmp)?;
    if !matches!(kind, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
        return Ok(None);
    }
    let ip = icmp + ICMP_HLEN;
    let inner_vihl: u8 = ctx.load(ip)?;
    let inner_proto: u8 = ctx.load(ip + 9)?;
    if inner_vihl >> 4 != 4 || (inner_proto != PROTO_TCP && inner_proto != PROTO_UDP) {
        return Ok(None);
    }
    let l4 = ip + usize::from(inner_vihl & 0x0f) * 4;
    Ok(Some(Quote {
        icmp_csum: icmp + 2,
        ip,
        l4,
        proto: inner_proto,
        saddr: ctx.load(ip + 12)?,
        daddr: ctx.load(ip + 16)?,
        sport: ctx.load(l4)?,
        dport: ctx.load(l4 + 2)?,
    }))
}

/// The quoted packet as the client sent it: from `client`, to `frontend`.
#[inline(always)]
fn rewrite_quote(ctx: &TcContext, q: &Quote, client: (u32, u16), frontend: (u32, u16)) -> Result<(), i64> {
    let ip_csum = q.ip + 10;
    let old_ip_csum: u16 = ctx.load(ip_csum)?;
    // The quoted L4 checksum, when the quote holds it (UDP's always does; a
    // zero UDP checksum means none).
    let l4_csum = q.l4 + if q.proto == PROTO_TCP { 16 } else { 6 };
    let old_l4_csum: Option<u16> = ctx
        .load::<u16>(l4_csum)
        .ok()
        .filter(|c| *c != 0 || q.proto == PROTO_TCP);
    for (off, old, new) in [(q.ip + 12, q.saddr, client.0), (q.ip + 16, q.daddr, frontend.0)] {
        if old != new {
            ctx.l3_csum_replace(ip_csum, u64::from(old), u64::from(new), 4)?;
            if old_l4_csum.is_some() {
                ctx.l3_csum_replace(l4_csum, u64::from(old), u64::from(new), 4)?;
            }
            ctx.l4_csum_replace(q.icmp_csum, u64::from(old), u64::from(new), 4)?;
            ctx.store(off, &new, 0)?;
        }
    }
    for (off, old, new) in [(q.l4, q.sport, client.1), (q.l4 + 2, q.dport, frontend.1)] {
        if old != new {
            if old_l4_csum.is_some() {
                ctx.l3_csum_replace(l4_csum, u64::from(old), u64::from(new), 2)?;
            }
            ctx.l4_csum_replace(q.icmp_csum, u64::from(old), u64::from(new), 2)?;
            ctx.store(off, &new, 0)?;
        }
    }
    // The ICMP checksum covers the quoted checksums too.
    let new_ip_csum: u16 = ctx.load(ip_csum)?;
    ctx.l4_csum_replace(q.icmp_csum, u64::from(old_ip_csum), u64::from(new_ip_csum), 2)?;
    if let Some(old) = old_l4_csum {
        let new: u16 = ctx.load(l4_csum)?;
        ctx.l4_csum_replace(q.icmp_csum, u64::from(old), u64::from(new), 2)?;
    }
    Ok(())
}

/// Rewrites an outer address at `off` with the IPv4 checksum (ICMP has no
/// pseudo-header).
#[inline(always)]
fn replace_outer(ctx: &TcContext, off: usize, old: u32, new: u32) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)?;
    ctx.store(off, &new, 0)
}

const _: () = assert!(IP_OFF == ETH_HLEN);
