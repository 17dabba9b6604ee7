//! Service lookup and backend selection (Cilium's lb4 layout: slot 0 describes
//! the frontend, slots 1..=count name backends).
use aya_ebpf::helpers::bpf_get_prandom_u32;
use ferry_common::{Backend, Counter, ServiceKey, ServiceValue, SCOPE_EXTERNAL};

use crate::{
    maps::{BACKENDS, SERVICES},
    parse::Packet,
};

/// The frontend `pkt` is addressed to, if any.
#[inline(always)]
pub fn lookup_service(pkt: &Packet) -> Option<ServiceValue> {
    let key = service_key(pkt, 0);
    // SAFETY: copied out at once.
    unsafe { SERVICES.get(key).copied() }
}

/// A backend by id, if it still exists.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { BACKENDS.get(id).copied() }
}

/// Picks a backend uniformly at random among the frontend's slots.
#[inline(always)]
pub fn select_backend(pkt: &Packet, svc: &ServiceValue) -> Result<(u32, Backend), Counter> {
    if svc.count == 0 {
        // Hook for reject (TCP RST / ICMP unreachable) once implemented: today a
        // counted drop.
        return Err(Counter::DropNoBackend);
    }
    // SAFETY: helper without preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = (r % svc.count as u32) as u16 + 1;
    // SAFETY: copied out at once.
    let slot_value = unsafe { SERVICES.get(service_key(pkt, slot)).copied() };
    let id = slot_value.ok_or(Counter::DropBackendMissing)?.backend_id;
    let b = backend(id).ok_or(Counter::DropBackendMissing)?;
    Ok((id, b))
}

#[inline(always)]
fn service_key(pkt: &Packet, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        slot,
        proto: pkt.proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    }
}
