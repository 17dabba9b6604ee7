//! Address and port rewrites with checksums fixed by the kernel helpers
//! (bpf_l3_csum_replace / bpf_l4_csum_replace), which also handle CHECKSUM_PARTIAL
//! skbs from veths and UDP's "no checksum" zero.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use ferry_common::PROTO_UDP;

use crate::parse::{Packet, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF};

/// Which endpoint of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

/// Rewrites the source or destination address and port of `pkt` from
/// (`old_addr`, `old_port`) to (`new_addr`, `new_port`).
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
    let (addr_off, port_off) = match side {
        Side::Src => (IP_SRC_OFF, pkt.l4_off),
        Side::Dst => (IP_DST_OFF, pkt.l4_off + 2),
    };
    let csum_off = pkt.l4_csum_off();
    // UDP: a zero checksum means "none" and must stay zero.
    let mangled_0 = if pkt.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled_0 | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)?;
        ctx.store(addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled_0 | 2)?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}
