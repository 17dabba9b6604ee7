//! Header access: Ethernet → IPv4 → TCP/UDP ports, at TC read with
//! bpf_skb_load_bytes so non-linear skbs work too, at XDP read directly from the
//! frame with bounds checks.
//!
//! Devices without an Ethernet header (WireGuard, TUN: "L3 devices")
//! carry the IPv4 header at offset 0: at their ingress an Ethernet header is
//! pushed in front ([`push_ethernet`]), so that every path below, and a
//! redirect into a Pod's veth, works unchanged; at their egress only the
//! reverse translation runs, on [`parse_l3`]'s offsets
//! ([`Packet::l3_off`]).
use core::mem::size_of;

use aya_ebpf::{
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET,
    helpers::{bpf_skb_change_head, bpf_skb_load_bytes_relative},
    programs::{TcContext, XdpContext},
};
use ferry_common::{FragKey, FragPorts, PROTO_TCP, PROTO_UDP};

use crate::maps::FRAGS;

pub const ETH_HLEN: usize = 14;
const ETH_SRC_OFF: usize = 6;
const ETH_TYPE_OFF: usize = 12;
const ETH_P_IP: u16 = 0x0800;
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SRC_OFF: usize = IP_OFF + 12;
pub const IP_DST_OFF: usize = IP_OFF + 16;
const TCP_FLAGS_OFF: usize = 13;
/// IPv4 flags and fragment offset (host order).
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The fields of an IPv4 TCP/UDP packet the load balancer works with. Addresses and
/// ports in wire order, as in the maps.
pub struct Packet {
    /// Offset of the IPv4 header: [`IP_OFF`] behind Ethernet, 0 on an L3
    /// device's egress.
    pub l3_off: usize,
    pub l4_off: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// IPv4 "don't fragment".
    pub dont_fragment: bool,
    /// A fragment of a datagram (the first or a later one).
    pub fragment: bool,
    /// A fragment after the first: no L4 header (the ports come from the
    /// first fragment); only its addresses are rewritten.
    pub later_fragment: bool,
}

impl Packet {
    /// Offset of the IPv4 header checksum.
    #[inline(always)]
    pub fn ip_csum_off(&self) -> usize {
        self.l3_off + 10
    }

    /// Offset of the IPv4 source address (the destination follows it).
    #[inline(always)]
    pub fn ip_src_off(&self) -> usize {
        self.l3_off + 12
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.proto == PROTO_TCP { 16 } else { 6 }
    }

    /// A TCP FIN or RST: the flow is ending.
    #[inline(always)]
    pub fn closing(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }

    /// A TCP SYN without ACK: a client opening a connection.
    #[inline(always)]
    pub fn opening(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// The packet memory of a program: the skb at TC, the frame at XDP.
pub trait Frame {
    /// Reads a `T` at byte offset `off` (unaligned).
    fn load<T>(&self, off: usize) -> Result<T, i64>;
    /// Writes `v` at byte offset `off`, touching no checksum.
    fn store<T>(&self, off: usize, v: &T) -> Result<(), i64>;
}

impl Frame for TcContext {
    #[inline(always)]
    fn load<T>(&self, off: usize) -> Result<T, i64> {
        TcContext::load(self, off)
    }

    #[inline(always)]
    fn store<T>(&self, off: usize, v: &T) -> Result<(), i64> {
        TcContext::store(self, off, v, 0)
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn load<T>(&self, off: usize) -> Result<T, i64> {
        let p = xdp_ptr::<T>(self, off)?;
        // SAFETY: p..p+size_of::<T>() lies inside the frame (checked).
        Ok(unsafe { core::ptr::read_unaligned(p) })
    }

    #[inline(always)]
    fn store<T>(&self, off: usize, v: &T) -> Result<(), i64> {
        let p = xdp_ptr::<T>(self, off)?;
        // SAFETY: as above; the frame is writable at XDP.
        unsafe { core::ptr::write_unaligned(p, core::ptr::read(v)) };
        Ok(())
    }
}

/// A pointer to a `T` at `off` in the XDP frame, if all of it is inside.
#[inline(always)]
fn xdp_ptr<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, i64> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return Err(-1);
    }
    Ok((start + off) as *mut T)
}

/// `Ok(None)`: not IPv4 TCP/UDP, or a fragment after a first one this node
/// did not see: the caller lets it pass untouched.
///
/// Fragments: the first one carries the ports and is recorded (source,
/// destination, IP id, protocol → ports) in `FRAGS`; the ones after it take
/// their ports from there, so every fragment of a datagram follows the same
/// flow (and only its addresses are rewritten: [`Packet::later_fragment`]).
#[inline(always)]
pub fn parse<F: Frame>(ctx: &F) -> Result<Option<Packet>, i64> {
    let ether_type: u16 = ctx.load(ETH_TYPE_OFF)?;
    if ether_type != ETH_P_IP.to_be() {
        return Ok(None);
    }
    parse_ip(ctx, IP_OFF)
}

/// [`parse`] for a frame without an Ethernet header (an L3 device's
/// egress), whose `skb->protocol` the caller has found IPv4.
#[inline(always)]
pub fn parse_l3(ctx: &TcContext) -> Result<Option<Packet>, i64> {
    parse_ip(ctx, 0)
}

/// Whether the skb is IPv4 (`skb->protocol`): on an L3 device, where no
/// Ethernet header says so.
#[inline(always)]
pub fn is_ipv4(ctx: &TcContext) -> bool {
    ctx.skb.protocol() == u32::from(ETH_P_IP.to_be())
}

/// Whether the skb's data starts at its IPv4 header, as on TUN and
/// WireGuard devices; IPIP and GRE devices leave their outer headers in
/// front at ingress (the MAC header is the tunnel's), which no offset here
/// expects.
#[inline(always)]
pub fn starts_at_network_header(ctx: &TcContext) -> bool {
    let Ok(at_start) = ctx.load::<[u8; 20]>(0) else {
        return false;
    };
    let mut net = [0u8; 20];
    // SAFETY: `net` lives on our stack for the call and is 20 bytes long.
    let rc = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb as *const _,
            0,
            net.as_mut_ptr() as *mut _,
            20,
            BPF_HDR_START_NET,
        )
    };
    rc == 0 && at_start == net
}

/// Pushes an Ethernet header (zero MACs, type IPv4) in front of an L3
/// device's IPv4 packet. The kernel moves the skb's MAC header to it: the
/// stack, if the packet is passed on, skips it again (at TC ingress the MAC
/// header's length is pulled after the program), and a redirect out of an L3
/// device strips it; a redirect into an Ethernet device uses it, with the
/// MACs the FIB lookup gave.
#[inline(always)]
pub fn push_ethernet(ctx: &TcContext) -> Result<(), i64> {
    // SAFETY: helper on our own skb; no memory arguments.
    let rc = unsafe { bpf_skb_change_head(ctx.skb.skb as *mut _, ETH_HLEN as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    ctx.store(ETH_TYPE_OFF, &ETH_P_IP.to_be(), 0)
}

/// The IPv4 header at `l3`, then TCP/UDP.
#[inline(always)]
fn parse_ip<F: Frame>(ctx: &F, l3: usize) -> Result<Option<Packet>, i64> {
    let vihl: u8 = ctx.load(l3)?;
    let ihl = (vihl & 0x0f) as usize;
    if vihl >> 4 != 4 || ihl < 5 {
        return Ok(None);
    }
    let frags = u16::from_be(ctx.load(l3 + 6)?);
    let proto: u8 = ctx.load(l3 + 9)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(None);
    }
    let (saddr, daddr): (u32, u32) = (ctx.load(l3 + 12)?, ctx.load(l3 + 16)?);
    let l4_off = l3 + ihl * 4;
    let fragment = FragKey {
        saddr,
        daddr,
        id: ctx.load(l3 + 4)?,
        proto,
        _pad: 0,
    };
    let (sport, dport, later_fragment) = if frags & IP_OFFSET_MASK != 0 {
        // SAFETY: copied out at once.
        let Some(p) = (unsafe { FRAGS.get(&fragment).copied() }) else {
            return Ok(None);
        };
        (p.sport, p.dport, true)
    } else {
        let ports = FragPorts {
            sport: ctx.load(l4_off)?,
            dport: ctx.load(l4_off + 2)?,
        };
        if frags & IP_MF != 0 {
            // A full table only costs the fragments of the oldest datagrams (LRU).
            let _ = FRAGS.insert(&fragment, &ports, 0);
        }
        (ports.sport, ports.dport, false)
    };
    let tcp_flags = if proto == PROTO_TCP && !later_fragment {
        ctx.load(l4_off + TCP_FLAGS_OFF)?
    } else {
        0
    };
    Ok(Some(Packet {
        l3_off: l3,
        l4_off,
        proto,
        saddr,
        daddr,
        sport,
        dport,
        tcp_flags,
        dont_fragment: frags & IP_DF != 0,
        fragment: frags & (IP_MF | IP_OFFSET_MASK) != 0,
        later_fragment,
    }))
}

/// Swaps the Ethernet source and destination, for a packet sent back out of the
/// interface it came in on (hairpin).
#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), i64> {
    let dst: [u8; 6] = ctx.load(0)?;
    let src: [u8; 6] = ctx.load(ETH_SRC_OFF)?;
    ctx.store(0, &src, 0)?;
    ctx.store(ETH_SRC_OFF, &dst, 0)
}

/// Writes the Ethernet destination and source, for a packet forwarded to a
/// next hop.
#[inline(always)]
pub fn set_macs<F: Frame>(ctx: &F, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), i64> {
    ctx.store(0, dst)?;
    ctx.store(ETH_SRC_OFF, src)
}
