//! XDP acceleration on the node devices (`--xdp`): the north-south packets
//! that only pass through this node, a NodePort/ExternalIP/LoadBalancer flow
//! to a backend on another node and that backend's replies, are translated
//! and sent back out before an skb exists (XDP_TX, or XDP_REDIRECT to another
//! device).
//!
//! Everything else goes on to TC (`XDP_PASS`) unchanged: flows to local
//! backends (delivered by from_netdev, which finds the connection-tracking
//! entry XDP made), frontends without endpoints (reject or drop), packets
//! whose next hop has no neighbour entry yet (TC's redirect_neigh resolves
//! it), and packets whose L4 checksum is incomplete. So XDP and TC always
//! agree: XDP does a subset of from_netdev's work, with the same maps.
use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    helpers::bpf_redirect,
    programs::XdpContext,
    EbpfContext as _,
};
use ferry_common::{ct_flags, Counter, PROTO_UDP};

use crate::{
    csum,
    ct::{self, Class, Opened},
    dsr,
    fib::{self, Route},
    maps::{count, count_service},
    nat::{self, Side},
    nodeport,
    parse::{self, Frame as _, Packet, IP_CSUM_OFF, IP_OFF},
};

/// The rewrite XDP applies: new (address, port) for both ends.
struct Translation {
    src: (u32, u16),
    dst: (u32, u16),
}

/// xdp_from_netdev: parse, classify against connection tracking, act (or
/// pass on to TC).
pub fn try_xdp(ctx: &XdpContext) -> Result<u32, Counter> {
    let Some(pkt) = parse::parse(ctx).map_err(|_| Counter::DropMalformed)? else {
        return Ok(XDP_PASS);
    };
    // Fragments are TC's (their L4 checksum spans other packets).
    if pkt.fragment {
        return Ok(XDP_PASS);
    }
    let flow = match ct::classify(&pkt) {
        // A remote backend's reply to a north-south client we SNATed for.
        Class::Reply(r) => {
            let both = ct_flags::EXTERNAL | ct_flags::SNAT;
            let (Some(frontend), Some(client), true) = (r.frontend, r.snat, r.flags & both == both) else {
                return Ok(XDP_PASS);
            };
            let t = Translation {
                src: (frontend.addr, frontend.port),
                dst: client,
            };
            return send(ctx, &pkt, &t, Counter::ReverseNat);
        }
        // A north-south flow: tracked already, or new.
        Class::Established(f) if f.external => f,
        Class::Established(_) => return Ok(XDP_PASS),
        Class::New => match nodeport::open(ctx, &pkt)? {
            Some(Opened::Flow(f)) => f,
            None | Some(Opened::NoEndpoint { .. }) => return Ok(XDP_PASS),
        },
    };
    let src = match flow.snat {
        Some(src) => src,
        // Direct server return: the client's address kept. A packet that
        // carries the option (a SYN, a UDP datagram) needs its room made,
        // which TC does (`dsr::forward`, on the entry opened here).
        None if flow.dsr && !dsr::needs_option(&pkt) => (pkt.saddr, pkt.sport),
        // A local backend: TC delivers it (the entry tells it where).
        None => return Ok(XDP_PASS),
    };
    let t = Translation { src, dst: flow.backend };
    let verdict = send(ctx, &pkt, &t, Counter::ServiceForward)?;
    if verdict != XDP_PASS && flow.dsr {
        count(Counter::DsrForward);
    }
    if verdict != XDP_PASS {
        count_service(flow.rev_nat_id, (ctx.data_end() - ctx.data()) as u32);
    }
    Ok(verdict)
}

/// Rewrites `pkt` as `t` says and sends it to its next hop, or passes it on
/// untouched when XDP cannot finish the job (see the module doc).
#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Packet, t: &Translation, what: Counter) -> Result<u32, Counter> {
    if !checksum_complete(ctx, pkt)? {
        count(Counter::XdpPassPartialCsum);
        return Ok(XDP_PASS);
    }
    let m = |_| Counter::DropMalformed;
    let tot_len = u16::from_be(ctx.load::<u16>(IP_OFF + 2).map_err(m)?);
    // A packet about to expire is the stack's (it answers "time exceeded").
    let ttl: u8 = ctx.load(IP_OFF + 8).map_err(m)?;
    if ttl <= 1 {
        return Ok(XDP_PASS);
    }
    let ingress = ctx.ingress_ifindex() as u32;
    // Too big for the egress device: TC answers "fragmentation needed".
    let Route::Forward { ifindex, dmac, smac } = fib::lookup(ctx.as_ptr(), ingress, t.src.0, t.dst.0, tot_len) else {
        return Ok(XDP_PASS);
    };
    decrement_ttl(ctx).map_err(m)?;
    nat::rewrite_xdp(ctx, pkt, Side::Dst, pkt.daddr, t.dst.0, pkt.dport, t.dst.1).map_err(m)?;
    nat::rewrite_xdp(ctx, pkt, Side::Src, pkt.saddr, t.src.0, pkt.sport, t.src.1).map_err(m)?;
    parse::set_macs(ctx, &dmac, &smac).map_err(m)?;
    count(what);
    count(Counter::XdpForward);
    if ifindex == ingress {
        return Ok(XDP_TX);
    }
    // SAFETY: helper without memory arguments.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
}

/// A router's hop: TTL - 1, with the IPv4 checksum updated (the TTL is the
/// high byte of the 16-bit word at offset 8, beside the protocol).
#[inline(always)]
fn decrement_ttl(ctx: &XdpContext) -> Result<(), i64> {
    let word: u16 = ctx.load(IP_OFF + 8)?;
    let ip_csum: u16 = ctx.load(IP_CSUM_OFF)?;
    let [ttl, proto] = word.to_ne_bytes();
    let new = u16::from_ne_bytes([ttl - 1, proto]);
    ctx.store(IP_OFF + 8, &new)?;
    ctx.store(IP_CSUM_OFF, &csum::replace2(ip_csum, word, new))
}

/// Whether the L4 checksum is a full one. A local sender on a virtual device
/// (a veth) leaves only the pseudo-header's sum in the field for the device to
/// finish ("checksum offload"), and so does GRO for the segments it merged
/// (which generic XDP sees); only the skb knows that, so such packets go on
/// to TC, whose checksum helpers handle them. A full checksum equals that
/// sum about once in 65536 packets, which then just take the TC path.
#[inline(always)]
fn checksum_complete(ctx: &XdpContext, pkt: &Packet) -> Result<bool, Counter> {
    let m = |_| Counter::DropMalformed;
    let field: u16 = ctx.load(pkt.l4_csum_off()).map_err(m)?;
    if pkt.proto == PROTO_UDP && field == 0 {
        return Ok(true); // no checksum at all
    }
    let tot_len = u16::from_be(ctx.load::<u16>(IP_OFF + 2).map_err(m)?);
    let l4_len = tot_len.wrapping_sub((pkt.l4_off - IP_OFF) as u16);
    // The pseudo-header as it lies in the packet: addresses, zero + protocol,
    // L4 length (summed in the same byte order the field is loaded in).
    let sum = (pkt.saddr & 0xffff)
        + (pkt.saddr >> 16)
        + (pkt.daddr & 0xffff)
        + (pkt.daddr >> 16)
        + u16::from_ne_bytes([0, pkt.proto]) as u32
        + u16::from_ne_bytes(l4_len.to_be_bytes()) as u32;
    Ok(field != csum::fold(sum))
}
