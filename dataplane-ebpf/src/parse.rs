//! Header access: Ethernet → IPv4 → TCP/UDP ports, read with bpf_skb_load_bytes so
//! non-linear skbs work too.
use aya_ebpf::programs::TcContext;
use ferry_common::{PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_SRC_OFF: usize = 6;
const ETH_TYPE_OFF: usize = 12;
const ETH_P_IP: u16 = 0x0800;
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SRC_OFF: usize = IP_OFF + 12;
pub const IP_DST_OFF: usize = IP_OFF + 16;
const TCP_FLAGS_OFF: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// The fields of an IPv4 TCP/UDP packet the load balancer works with. Addresses and
/// ports in wire order, as in the maps.
pub struct Packet {
    pub l4_off: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

impl Packet {
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
}

/// `Ok(None)`: not IPv4 TCP/UDP, or a fragment: the caller lets it pass untouched.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Packet>, i64> {
    let ether_type: u16 = ctx.load(ETH_TYPE_OFF)?;
    if ether_type != ETH_P_IP.to_be() {
        return Ok(None);
    }
    let vihl: u8 = ctx.load(IP_OFF)?;
    let ihl = (vihl & 0x0f) as usize;
    if vihl >> 4 != 4 || ihl < 5 {
        return Ok(None);
    }
    // More-fragments or a fragment offset: no ports to translate on (not supported).
    let frags = u16::from_be(ctx.load(IP_OFF + 6)?);
    if frags & 0x3fff != 0 {
        return Ok(None);
    }
    let proto: u8 = ctx.load(IP_OFF + 9)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(None);
    }
    let l4_off = IP_OFF + ihl * 4;
    let tcp_flags = if proto == PROTO_TCP { ctx.load(l4_off + TCP_FLAGS_OFF)? } else { 0 };
    Ok(Some(Packet {
        l4_off,
        proto,
        saddr: ctx.load(IP_SRC_OFF)?,
        daddr: ctx.load(IP_DST_OFF)?,
        sport: ctx.load(l4_off)?,
        dport: ctx.load(l4_off + 2)?,
        tcp_flags,
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
