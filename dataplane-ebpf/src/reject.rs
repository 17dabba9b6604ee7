//! Answers for connections to a Service without usable backends, as kube-proxy's
//! REJECT rules give them: TCP gets a RST from the address:port the client dialled
//! (so connect() fails at once with ECONNREFUSED), UDP gets an ICMP port
//! unreachable quoting the datagram (a connected socket sees ECONNREFUSED).
//!
//! The packet is rewritten in place into the answer (new IPv4 and L4 headers,
//! checksums computed from scratch, length set with bpf_skb_change_tail); the
//! answer goes back out of the interface the packet came in by: into the client
//! Pod, or back to the network on a device (`refuse`).
//!
//! The same ICMP builder answers a packet too big for the device its
//! translated form would leave by ("fragmentation needed", with that MTU),
//! quoting the packet as its sender sent it, so path MTU discovery works
//! through the translation (`fragmentation_needed`).
use aya_ebpf::{helpers::bpf_skb_change_tail, programs::TcContext};
use ferry_common::{Counter, PROTO_TCP};

use crate::{
    csum::{checksum, sum_words},
    fib,
    maps::count,
    parse::{Packet, ETH_HLEN, IP_OFF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// The original IPv4 header (without options) and 8 bytes of its UDP header.
const QUOTE_LEN: usize = 28;

/// Answers `pkt` with its rejection, sent back out of the interface it came
/// in by (counted as what it was: a RST or an ICMP port unreachable).
#[inline(always)]
pub fn refuse(ctx: &TcContext, pkt: &Packet) -> Result<i32, Counter> {
    count(rewrite(ctx, pkt)?);
    fib::bounce(ctx)
}

/// Rewrites `pkt` into its rejection. `Err` for a packet that gets no answer
/// (a TCP RST is never answered; IPv4 options are not quoted): the caller drops
/// it with that reason.
#[inline(always)]
fn rewrite(ctx: &TcContext, pkt: &Packet) -> Result<Counter, Counter> {
    // The first fragment is answered; the ones after it are dropped with it.
    if pkt.later_fragment {
        return Err(Counter::DropNoBackend);
    }
    if pkt.proto == PROTO_TCP {
        tcp_rst(ctx, pkt)?;
        Ok(Counter::RejectTcp)
    } else {
        icmp_unreachable(ctx, pkt, ICMP_PORT_UNREACH, 0)?;
        Ok(Counter::RejectUdp)
    }
}

/// RFC 9293 3.10.7.1 (CLOSED state): a segment with ACK gets `<SEQ=SEG.ACK><CTL=RST>`,
/// one without gets `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`.
#[inline(always)]
fn tcp_rst(ctx: &TcContext, pkt: &Packet) -> Result<(), Counter> {
    if pkt.tcp_flags & TCP_RST != 0 {
        return Err(Counter::DropNoBackend);
    }
    let m = |_| Counter::DropMalformed;
    let tot_len = u16::from_be(ctx.load::<u16>(IP_OFF + 2).map_err(m)?) as u32;
    let seq = u32::from_be(ctx.load::<u32>(pkt.l4_off + 4).map_err(m)?);
    let ack = u32::from_be(ctx.load::<u32>(pkt.l4_off + 8).map_err(m)?);
    let doff = ((ctx.load::<u8>(pkt.l4_off + 12).map_err(m)? >> 4) as u32) * 4;
    let (out_seq, out_ack, flags) = if pkt.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let ihl = (pkt.l4_off - IP_OFF) as u32;
        let mut len = tot_len.saturating_sub(ihl + doff);
        if pkt.tcp_flags & TCP_SYN != 0 {
            len += 1;
        }
        if pkt.tcp_flags & TCP_FIN != 0 {
            len += 1;
        }
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };

    let mut h = [0u8; 40];
    ip_header(&mut h, 40, PROTO_TCP, pkt.daddr, pkt.saddr);
    let t = 20;
    h[t..t + 2].copy_from_slice(&pkt.dport.to_ne_bytes());
    h[t + 2..t + 4].copy_from_slice(&pkt.sport.to_ne_bytes());
    h[t + 4..t + 8].copy_from_slice(&out_seq.to_be_bytes());
    h[t + 8..t + 12].copy_from_slice(&out_ack.to_be_bytes());
    h[t + 12] = 5 << 4;
    h[t + 13] = flags;
    // Pseudo-header: addresses, protocol, TCP length.
    let mut sum = sum_words(&h[12..20], PROTO_TCP as u32 + 20);
    sum = sum_words(&h[20..40], sum);
    h[t + 16..t + 18].copy_from_slice(&checksum(sum).to_be_bytes());

    set_len(ctx, ETH_HLEN + 40)?;
    ctx.store(IP_OFF, &h, 0).map_err(m)
}

/// Rewrites `pkt` (as its sender sent it: untranslated) into an ICMP
/// "fragmentation needed" with the next hop's `mtu`, from the address it was
/// sent to.
#[inline(always)]
pub fn fragmentation_needed(ctx: &TcContext, pkt: &Packet, mtu: u32) -> Result<(), Counter> {
    icmp_unreachable(ctx, pkt, ICMP_FRAG_NEEDED, mtu as u16)
}

/// ICMP destination unreachable (`code`; `mtu` for fragmentation needed)
/// quoting the IPv4 header and the first 8 bytes of the datagram, from the
/// address the sender sent to (the ClusterIP, for a client).
#[inline(always)]
fn icmp_unreachable(ctx: &TcContext, pkt: &Packet, code: u8, mtu: u16) -> Result<(), Counter> {
    if pkt.l4_off != IP_OFF + 20 {
        // IPv4 options: not quoted (Pods practically never send them).
        return Err(Counter::DropNoBackend);
    }
    let m = |_| Counter::DropMalformed;
    let quote: [u8; QUOTE_LEN] = ctx.load(IP_OFF).map_err(m)?;
    let mut h = [0u8; 20 + 8 + QUOTE_LEN];
    ip_header(&mut h, (20 + 8 + QUOTE_LEN) as u16, IPPROTO_ICMP, pkt.daddr, pkt.saddr);
    h[20] = ICMP_DEST_UNREACH;
    h[21] = code;
    h[26..28].copy_from_slice(&mtu.to_be_bytes());
    h[28..28 + QUOTE_LEN].copy_from_slice(&quote);
    let csum = checksum(sum_words(&h[20..], 0));
    h[22..24].copy_from_slice(&csum.to_be_bytes());

    set_len(ctx, ETH_HLEN + 20 + 8 + QUOTE_LEN)?;
    ctx.store(IP_OFF, &h, 0).map_err(m)
}

/// A fresh IPv4 header without options in `h[..20]`, checksum included.
#[inline(always)]
fn ip_header(h: &mut [u8], tot_len: u16, proto: u8, saddr: u32, daddr: u32) {
    h[0] = 0x45;
    h[2..4].copy_from_slice(&tot_len.to_be_bytes());
    h[8] = 64; // TTL
    h[9] = proto;
    h[12..16].copy_from_slice(&saddr.to_ne_bytes());
    h[16..20].copy_from_slice(&daddr.to_ne_bytes());
    let csum = checksum(sum_words(&h[..20], 0));
    h[10..12].copy_from_slice(&csum.to_be_bytes());
}

/// Trims (or grows) the packet to `len` bytes.
#[inline(always)]
fn set_len(ctx: &TcContext, len: usize) -> Result<(), Counter> {
    // SAFETY: the skb this program runs on; no pointers into the packet are
    // held across the call (all access goes through load/store).
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if rc != 0 {
        return Err(Counter::DropMalformed);
    }
    Ok(())
}
