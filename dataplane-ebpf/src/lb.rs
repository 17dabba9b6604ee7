//! Service lookup and backend selection (Cilium's lb4 layout: slot 0 describes
//! the frontend, slots 1..=count name backends), with session affinity.
use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use ferry_common::{
    config as cfg, maglev_flow_hash, svc_flags, AffinityKey, AffinityValue, Backend, Counter, ServiceKey, ServiceValue,
    SrcRangeKey, SCOPE_EXTERNAL, SCOPE_INTERNAL, SRC_RANGE_ID_BITS,
};

use crate::{
    maps::{config, count, AFFINITY, BACKENDS, MAGLEV, SERVICES, SRC_RANGES},
    parse::Packet,
};

/// A frontend as one scope of the services map has it.
#[derive(Clone, Copy)]
pub struct Service {
    pub value: ServiceValue,
    /// The scope its slots are looked up in.
    pub scope: u8,
}

/// The frontend `pkt` is addressed to, as clients from outside the cluster
/// see it (external scope).
#[inline(always)]
pub fn lookup_service(pkt: &Packet) -> Option<Service> {
    lookup(pkt, SCOPE_EXTERNAL)
}

/// The frontend `pkt` is addressed to, as clients inside the cluster (Pods,
/// the node's processes) see it: the internal-scope twin where the frontend
/// has one (externalTrafficPolicy: Local, short-circuited to every node's
/// endpoints as kube-proxy does), else the frontend itself.
#[inline(always)]
pub fn lookup_service_in_cluster(pkt: &Packet) -> Option<Service> {
    let svc = lookup(pkt, SCOPE_EXTERNAL)?;
    if svc.value.flags & svc_flags::INTERNAL_TWIN != 0 {
        if let Some(twin) = lookup(pkt, SCOPE_INTERNAL) {
            return Some(twin);
        }
    }
    Some(svc)
}

#[inline(always)]
fn lookup(pkt: &Packet, scope: u8) -> Option<Service> {
    // SAFETY: copied out at once.
    let value = unsafe { SERVICES.get(service_key(pkt, scope, 0)).copied() }?;
    Some(Service { value, scope })
}

/// Whether a new flow from `pkt.saddr` may use the frontend `svc`
/// (loadBalancerSourceRanges). Frontends without [`svc_flags::SOURCE_RANGES`]
/// (the agent sets it on LoadBalancer-IP frontends with ranges only; never on
/// ClusterIP, NodePort or ExternalIP ones, which kube-proxy does not filter
/// either) cost one bit test. Otherwise the client must match a prefix the
/// agent stored for the frontend's reverse-NAT id: the key's first
/// [`SRC_RANGE_ID_BITS`] (id and padding) match exactly, the address by
/// longest prefix. Uses only the packet, so every hook (TC, XDP) can call it.
#[inline(always)]
pub fn source_allowed(pkt: &Packet, svc: &Service) -> bool {
    let svc = &svc.value;
    if svc.flags & svc_flags::SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SRC_RANGE_ID_BITS + 32,
        SrcRangeKey {
            rev_nat_id: svc.rev_nat_id,
            _pad: 0,
            addr: pkt.saddr,
        },
    );
    SRC_RANGES.get(&key).is_some()
}

/// A backend by id, if it still exists.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { BACKENDS.get(id).copied() }
}

/// What a backend is chosen for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Chooser {
    /// A packet of a new flow (TC, XDP): Maglev frontends hash its tuple.
    Flow,
    /// A socket at connect()/sendmsg() (socket LB): it has no source address
    /// or port yet, so a hash would send every socket to one backend: always
    /// random.
    Socket,
}

/// The backend for a new flow to a frontend with `svc.count > 0`: with
/// sessionAffinity the client's previous backend while its entry is fresh and the
/// backend exists (the agent removes entries of backends that leave the
/// Service; affinity wins over Maglev, as in Cilium), otherwise, for a
/// [`svc_flags::MAGLEV`] frontend and a flow, the backend its Maglev table
/// names for the flow's hash (the same on every node), else one chosen
/// uniformly at random among the slots.
#[inline(always)]
pub fn select_backend(pkt: &Packet, service: &Service, chooser: Chooser) -> Result<(u32, Backend), Counter> {
    let svc = &service.value;
    let affinity = svc.flags & svc_flags::AFFINITY != 0;
    let key = AffinityKey {
        client: pkt.saddr,
        rev_nat_id: svc.rev_nat_id,
        _pad: 0,
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if affinity {
        if let Some(entry) = AFFINITY.get_ptr_mut(&key) {
            // SAFETY: a valid map value pointer; racing writers store the same
            // kind of plain values.
            let entry = unsafe { &mut *entry };
            let timeout_ns = svc.affinity_timeout as u64 * 1_000_000_000;
            if now.wrapping_sub(entry.last_used) <= timeout_ns {
                if let Some(b) = backend(entry.backend_id) {
                    entry.last_used = now;
                    count(Counter::AffinityHit);
                    return Ok((entry.backend_id, b));
                }
            }
        }
    }
    let maglev = chooser == Chooser::Flow && svc.flags & svc_flags::MAGLEV != 0;
    let (id, b) = match maglev.then(|| maglev_backend(pkt, svc)).flatten() {
        Some(found) => found,
        None => random_backend(pkt, svc, service.scope)?,
    };
    if affinity {
        let value = AffinityValue {
            last_used: now,
            backend_id: id,
            _pad: 0,
        };
        // A full table only costs stickiness (LRU evicts the oldest anyway).
        let _ = AFFINITY.insert(&key, &value, 0);
    }
    Ok((id, b))
}

/// The backend the frontend's Maglev table names for `pkt`; None (the
/// caller picks at random) when the table size is not known, or the entry is
/// empty or names a backend that is gone: only while the agent rewrites the
/// tables (a new table size) or a sync is under way.
#[inline(always)]
fn maglev_backend(pkt: &Packet, svc: &ServiceValue) -> Option<(u32, Backend)> {
    let m = config(cfg::MAGLEV_TABLE_SIZE);
    if m == 0 {
        return None;
    }
    let h = maglev_flow_hash(pkt.saddr, pkt.sport, pkt.dport, pkt.proto);
    let index = svc.backend_id.wrapping_mul(m).wrapping_add(h % m);
    let id = MAGLEV.get(index).copied().filter(|id| *id != 0)?;
    let b = backend(id)?;
    count(Counter::MaglevSelected);
    Some((id, b))
}

#[inline(always)]
fn random_backend(pkt: &Packet, svc: &ServiceValue, scope: u8) -> Result<(u32, Backend), Counter> {
    if svc.count == 0 {
        return Err(Counter::DropNoBackend);
    }
    // SAFETY: helper without preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = (r % svc.count as u32) as u16 + 1;
    // SAFETY: copied out at once.
    let slot_value = unsafe { SERVICES.get(service_key(pkt, scope, slot)).copied() };
    let id = slot_value.ok_or(Counter::DropBackendMissing)?.backend_id;
    let b = backend(id).ok_or(Counter::DropBackendMissing)?;
    Ok((id, b))
}

#[inline(always)]
fn service_key(pkt: &Packet, scope: u8, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        slot,
        proto: pkt.proto,
        scope,
        _pad: [0; 2],
    }
}
