//! Direct server return (`--nodeport-mode dsr|hybrid`) in Cilium's "opt"
//! mode: a north-south flow to a backend on another node keeps the client's
//! address (DNAT only, no SNAT) and carries the frontend it was sent to
//! (address, port) to the backend's node in an IPv4 option
//! (`ferry_common::dsr_opt`), inserted behind the base IPv4 header of the
//! TCP SYN and of every UDP datagram ([`forward`], on the balancing node).
//! The backend's node reads it at from_netdev ([`accept`]) and records a
//! reply entry (`ct::record_dsr`), so that the backend's replies leave that
//! node from the frontend, straight to the client, never passing the
//! balancing node again.
//!
//! Why an option and not IPIP: a TCP connection pays 8 bytes on its SYN
//! only (later segments are plain DNAT), no packet needs an outer header
//! (the path MTU stays the device's for data), and no tunnel device is
//! needed on the backend's node. UDP pays 8 bytes per datagram (there is no
//! handshake to carry it once, and the backend node's entry must be
//! recreated after an LRU eviction); a datagram that no longer fits the
//! egress device with them is answered with "fragmentation needed" for the
//! MTU minus the option (DF set), so the client sends smaller ones, or is
//! left to the stack to fragment (no DF; the option is copied into every
//! fragment).
use aya_ebpf::{bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET, programs::TcContext};
use ferry_common::{config, dsr_opt, nodeport_mode, Counter, PROTO_TCP};

use crate::{
    ct::{self, Forward},
    fib::{self, Route},
    maps::{config, count},
    nat::{rewrite, Side},
    parse::Packet,
    reject,
};

/// Longest IPv4 header (IHL 15).
const IP_MAX_HLEN: usize = 60;
/// The base IPv4 header, behind which the option goes.
const IP_BASE_HLEN: usize = 20;

/// Whether `pkt` of a DSR flow carries the option: a TCP SYN opening the
/// connection, every UDP datagram (a later fragment has no L4 header, and
/// the first one carried it).
#[inline(always)]
pub fn needs_option(pkt: &Packet) -> bool {
    if pkt.proto == PROTO_TCP {
        pkt.opening()
    } else {
        !pkt.later_fragment
    }
}

/// Forward direction of a DSR flow at TC (the balancing node): destination
/// := the backend, the source kept, the option added when [`needs_option`];
/// sent by FIB lookup. The route is checked for the packet's length with the
/// option (see the module doc for a datagram that no longer fits).
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Packet, flow: &Forward) -> Result<i32, Counter> {
    let m = |_| Counter::DropMalformed;
    let backend = flow.backend;
    let opt = needs_option(pkt);
    let route = if opt {
        let hlen = pkt.l4_off - pkt.l3_off;
        // No room left for the option among 40 bytes of options already
        // there: without it the backend's replies could not be translated.
        if hlen + dsr_opt::LEN as usize > IP_MAX_HLEN {
            return Err(Counter::DropMalformed);
        }
        let tot_len = u16::from_be(ctx.load::<u16>(pkt.l3_off + 2).map_err(m)?);
        // A GSO packet (UDP GSO) is checked by the kernel segment by segment.
        // SAFETY: reading the skb this program runs on.
        let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
        let len = if gso {
            0
        } else {
            tot_len.saturating_add(dsr_opt::LEN as u16)
        };
        fib::route_len(ctx, pkt.saddr, backend.0, len)
    } else {
        fib::route(ctx, pkt.saddr, backend.0)
    };
    if let (Route::FragNeeded { mtu }, true) = (&route, pkt.dont_fragment) {
        // The client must leave room for the option in what it sends.
        let room = if opt { u32::from(dsr_opt::LEN) } else { 0 };
        reject::fragmentation_needed(ctx, pkt, mtu.saturating_sub(room))?;
        count(Counter::FragNeeded);
        return fib::bounce(ctx);
    }
    rewrite(ctx, pkt, Side::Dst, pkt.daddr, backend.0, pkt.dport, backend.1).map_err(m)?;
    if opt {
        insert_option(ctx, pkt, pkt.daddr, pkt.dport).map_err(m)?;
    }
    count(Counter::DsrForward);
    Ok(fib::send(ctx, route))
}

/// Inserts the DSR option naming the frontend (`addr`, `port`; wire order)
/// behind the 20-byte base header (`BPF_ADJ_ROOM_NET` makes the room there;
/// options already present follow it), and fixes IHL, total length and the
/// header checksum. The L4 checksum does not cover the IPv4 header.
#[inline(always)]
fn insert_option(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    let l3 = pkt.l3_off;
    // Version/IHL, TOS and total length: one 32-bit word.
    let old: [u8; 4] = ctx.load(l3)?;
    ctx.adjust_room(i32::from(dsr_opt::LEN), BPF_ADJ_ROOM_NET, 0)?;
    let tot_len = u16::from_be_bytes([old[2], old[3]]).wrapping_add(u16::from(dsr_opt::LEN));
    let [l0, l1] = tot_len.to_be_bytes();
    let new = [old[0] + (dsr_opt::LEN / 4), old[1], l0, l1];
    let [p0, p1] = port.to_ne_bytes();
    let opt_head = [dsr_opt::TYPE, dsr_opt::LEN, p0, p1];
    ctx.store(l3, &new, 0)?;
    ctx.store(l3 + IP_BASE_HLEN, &opt_head, 0)?;
    ctx.store(l3 + IP_BASE_HLEN + 4, &addr, 0)?;
    let csum_off = pkt.ip_csum_off();
    let word = |b: [u8; 4]| u64::from(u32::from_ne_bytes(b));
    ctx.l3_csum_replace(csum_off, word(old), word(new), 4)?;
    // New words: summed in (from zero).
    ctx.l3_csum_replace(csum_off, 0, word(opt_head), 4)?;
    ctx.l3_csum_replace(csum_off, 0, u64::from(addr), 4)
}

/// On the backend's node (from_netdev, in DSR or hybrid mode): a packet
/// whose first IPv4 option is the DSR option (as [`insert_option`] puts
/// it) and that may carry one (a TCP SYN, a UDP datagram) records its flow
/// for the backend's replies. The packet itself goes on unchanged (the
/// receiving stack ignores an option it does not know).
#[inline(always)]
pub fn accept(ctx: &TcContext, pkt: &Packet) -> Result<(), Counter> {
    if pkt.l4_off - pkt.l3_off < IP_BASE_HLEN + dsr_opt::LEN as usize
        || !needs_option(pkt)
        || config(config::NODEPORT_MODE) == nodeport_mode::SNAT
    {
        return Ok(());
    }
    let m = |_| Counter::DropMalformed;
    let head: [u8; 4] = ctx.load(pkt.l3_off + IP_BASE_HLEN).map_err(m)?;
    if head[0] != dsr_opt::TYPE || head[1] != dsr_opt::LEN {
        return Ok(());
    }
    let addr: u32 = ctx.load(pkt.l3_off + IP_BASE_HLEN + 4).map_err(m)?;
    let port = u16::from_ne_bytes([head[2], head[3]]);
    ct::record_dsr(pkt, (addr, port))?;
    count(Counter::DsrAccept);
    Ok(())
}
