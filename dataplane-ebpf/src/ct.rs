//! Connection tracking: one LRU entry per direction of a service flow.
//!
//! FORWARD entries are keyed by the packet as the client sends it (to the
//! frontend) and name the backend; REPLY entries are keyed by the reply as the
//! backend sends it and carry what reverse NAT must restore.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use ferry_common::{ct_flags, CtKey, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY};

use crate::{maps::CT, parse::Packet};

/// The key of `pkt`'s own tuple in direction `dir`.
#[inline(always)]
pub fn key(pkt: &Packet, dir: u8) -> CtKey {
    CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir,
        _pad: [0; 2],
    }
}

/// The entry for `pkt` in direction `dir`, refreshed (last seen, closing).
#[inline(always)]
pub fn lookup(pkt: &Packet, dir: u8) -> Option<&'static mut CtValue> {
    let entry = CT.get_ptr_mut(key(pkt, dir))?;
    // SAFETY: a valid map value pointer; racing updates of these plain fields are
    // harmless (timestamps and sticky flags).
    let entry = unsafe { &mut *entry };
    entry.last_seen = now();
    if pkt.closing() {
        entry.flags |= ct_flags::CLOSING;
    }
    Some(entry)
}

/// Where an entry's flow has its source rewritten to ([`ct_flags::SNAT`]:
/// hairpin, or north-south to a backend on another node): the client's
/// address and port in a reply entry, the SNAT address and port in a
/// forward one.
#[inline(always)]
pub fn snat(entry: &CtValue) -> Option<(u32, u16)> {
    (entry.flags & ct_flags::SNAT != 0).then_some((entry.nat_addr, entry.nat_port))
}

/// What a new flow was assigned to.
pub struct NewFlow {
    pub backend_id: u32,
    pub backend_addr: u32,
    pub backend_port: u16,
    pub rev_nat_id: u16,
    /// The source is rewritten to (`snat_addr`, `snat_port`) (0: not
    /// rewritten): hairpin, or a north-south flow to a backend on another node.
    pub snat_addr: u32,
    pub snat_port: u16,
    /// A north-south flow (NodePort, ExternalIP, LoadBalancer).
    pub external: bool,
}

/// Records both directions of a new flow. Errors mean the table is full.
#[inline(always)]
pub fn create(pkt: &Packet, flow: &NewFlow) -> Result<(), i32> {
    let snat = flow.snat_addr != 0;
    let flags = if snat { ct_flags::SNAT } else { 0 }
        | if flow.external { ct_flags::EXTERNAL } else { 0 };
    let snat_port = if snat { flow.snat_port } else { pkt.sport };
    let last_seen = now();
    let forward = CtValue {
        last_seen,
        backend_id: flow.backend_id,
        rev_nat_id: flow.rev_nat_id,
        flags: ct_flags::SERVICE | flags,
        nat_addr: flow.snat_addr,
        nat_port: snat_port,
        _pad: 0,
    };
    let reply_key = CtKey {
        saddr: flow.backend_addr,
        daddr: if snat { flow.snat_addr } else { pkt.saddr },
        sport: flow.backend_port,
        dport: snat_port,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let reply = CtValue {
        last_seen,
        backend_id: flow.backend_id,
        rev_nat_id: flow.rev_nat_id,
        flags,
        nat_addr: pkt.saddr,
        nat_port: pkt.sport,
        _pad: 0,
    };
    // Reply first: once the forward entry exists, replies must be translatable.
    CT.insert(reply_key, reply, 0)?;
    CT.insert(key(pkt, CT_DIR_FORWARD), forward, 0)
}

/// Whether the reply tuple (backend → `addr`:`port`) is free for `pkt`'s flow:
/// unused, or already this very flow's (a retransmitted SYN).
#[inline(always)]
pub fn reply_tuple_free(pkt: &Packet, backend_addr: u32, backend_port: u16, addr: u32, port: u16) -> bool {
    let k = CtKey {
        saddr: backend_addr,
        daddr: addr,
        sport: backend_port,
        dport: port,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    match unsafe { CT.get(&k) } {
        None => true,
        Some(v) => v.nat_addr == pkt.saddr && v.nat_port == pkt.sport,
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}
