//! Desired frontends → exact map entries, with stable ids.
//!
//! Backend ids are stable per {ip, port, proto} while the backend exists, so
//! connection-tracking entries (which name backends by id) stay valid across
//! syncs and agent restarts; ids are not reused right away (a new backend never
//! inherits the flows of a removed one). Reverse-NAT ids are stable per frontend.
use std::{collections::BTreeMap, net::Ipv4Addr};

use ferry_common::{
    addr_from_map, addr_to_map, backend_flags, port_from_map, port_to_map, Backend, RevNat,
    ServiceKey, ServiceName, ServiceValue, SCOPE_EXTERNAL,
};

use super::MapContents;
use crate::translate::Frontend;

type Tuple = (Ipv4Addr, u16, u8);

/// Allocates ids; rebuilt from the maps' contents when the agent starts.
#[derive(Clone, Debug, Default)]
pub struct Ids {
    backends: BTreeMap<Tuple, u32>,
    next_backend: u32,
    frontends: BTreeMap<Tuple, u16>,
    next_revnat: u16,
}

impl Ids {
    /// The ids already in the maps (agent restart).
    pub fn from_contents(c: &MapContents) -> Self {
        let mut ids = Self::default();
        for (id, b) in &c.backends {
            ids.backends.insert((Ipv4Addr::from(addr_from_map(b.addr)), port_from_map(b.port), b.proto), *id);
        }
        for (k, v) in c.services.iter().filter(|(k, _)| k.slot == 0) {
            let t = (Ipv4Addr::from(addr_from_map(k.addr)), port_from_map(k.port), k.proto);
            ids.frontends.insert(t, v.rev_nat_id);
        }
        ids.next_backend = ids.backends.values().max().copied().unwrap_or(0);
        ids.next_revnat = ids.frontends.values().max().copied().unwrap_or(0);
        ids
    }

    fn backend(&mut self, t: Tuple) -> u32 {
        if let Some(id) = self.backends.get(&t) {
            return *id;
        }
        let used: std::collections::BTreeSet<u32> = self.backends.values().copied().collect();
        let mut id = self.next_backend;
        loop {
            id = id.checked_add(1).unwrap_or(1);
            if !used.contains(&id) {
                break;
            }
        }
        self.next_backend = id;
        self.backends.insert(t, id);
        id
    }

    fn revnat(&mut self, t: Tuple) -> u16 {
        if let Some(id) = self.frontends.get(&t) {
            return *id;
        }
        let used: std::collections::BTreeSet<u16> = self.frontends.values().copied().collect();
        let mut id = self.next_revnat;
        loop {
            id = id.checked_add(1).unwrap_or(1);
            if !used.contains(&id) {
                break;
            }
        }
        self.next_revnat = id;
        self.frontends.insert(t, id);
        id
    }

    /// Forgets ids of what is no longer desired.
    fn retain(&mut self, backends: &BTreeMap<Tuple, u32>, frontends: &BTreeMap<Tuple, u16>) {
        self.backends.retain(|t, _| backends.contains_key(t));
        self.frontends.retain(|t, _| frontends.contains_key(t));
    }
}

/// The map contents for `frontends`.
pub fn layout(frontends: &[Frontend], ids: &mut Ids) -> MapContents {
    let mut out = MapContents::default();
    let mut live_backends = BTreeMap::new();
    let mut live_frontends = BTreeMap::new();
    for f in frontends {
        let rev_nat_id = ids.revnat(f.key());
        live_frontends.insert(f.key(), rev_nat_id);
        let key = |slot: u16| ServiceKey {
            addr: addr_to_map(f.addr.octets()),
            port: port_to_map(f.port),
            slot,
            proto: f.proto,
            scope: SCOPE_EXTERNAL,
            _pad: [0; 2],
        };
        let count = u16::try_from(f.backends.len()).unwrap_or(u16::MAX);
        out.services.insert(
            key(0),
            ServiceValue { backend_id: 0, count, rev_nat_id, flags: f.flags, affinity_timeout: 0 },
        );
        for (i, b) in f.backends.iter().take(count as usize).enumerate() {
            let t = (b.addr, b.port, f.proto);
            let id = ids.backend(t);
            live_backends.insert(t, id);
            let flags = if b.terminating { backend_flags::TERMINATING } else { 0 };
            out.backends.insert(
                id,
                Backend {
                    addr: addr_to_map(b.addr.octets()),
                    port: port_to_map(b.port),
                    proto: f.proto,
                    flags,
                    node_addr: 0,
                },
            );
            out.services.insert(
                key(i as u16 + 1),
                ServiceValue { backend_id: id, count: 0, rev_nat_id, flags: 0, affinity_timeout: 0 },
            );
        }
        out.revnat.insert(
            rev_nat_id,
            RevNat { addr: addr_to_map(f.addr.octets()), port: port_to_map(f.port), _pad: 0 },
        );
        out.names.insert(rev_nat_id, ServiceName::new(&f.name));
    }
    ids.retain(&live_backends, &live_frontends);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::BackendSpec;
    use ferry_common::{svc_flags, PROTO_TCP};

    fn fe(port: u16, backends: &[[u8; 4]]) -> Frontend {
        Frontend {
            name: format!("default/web:{port}"),
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port,
            proto: PROTO_TCP,
            flags: svc_flags::CLUSTER_IP,
            backends: backends.iter().map(|b| BackendSpec { addr: Ipv4Addr::from(*b), port: 8080, terminating: false }).collect(),
        }
    }

    #[test]
    fn slot_zero_counts_and_slots_name_backends() {
        let mut ids = Ids::default();
        let c = layout(&[fe(80, &[[10, 0, 0, 1], [10, 0, 0, 2]])], &mut ids);
        let slot0 = c.services.iter().find(|(k, _)| k.slot == 0).unwrap().1;
        assert_eq!(slot0.count, 2);
        assert_eq!(c.services.len(), 3);
        assert_eq!(c.backends.len(), 2);
        for (k, v) in c.services.iter().filter(|(k, _)| k.slot > 0) {
            assert!(c.backends.contains_key(&v.backend_id), "slot {} names a backend", k.slot);
            assert_eq!(v.rev_nat_id, slot0.rev_nat_id);
        }
        let rn = c.revnat[&slot0.rev_nat_id];
        assert_eq!((addr_from_map(rn.addr), port_from_map(rn.port)), ([10, 96, 0, 10], 80));
        assert_eq!(c.names[&slot0.rev_nat_id].as_str(), "default/web:80");
    }

    #[test]
    fn backend_ids_are_stable_and_not_reused_at_once() {
        let mut ids = Ids::default();
        let c1 = layout(&[fe(80, &[[10, 0, 0, 1], [10, 0, 0, 2]])], &mut ids);
        let id_of = |c: &MapContents, ip: [u8; 4]| *c.backends.iter().find(|(_, b)| addr_from_map(b.addr) == ip).unwrap().0;
        let b2 = id_of(&c1, [10, 0, 0, 2]);
        // .1 goes away, .3 arrives: .2 keeps its id, .3 gets a fresh one (not .1's).
        let c2 = layout(&[fe(80, &[[10, 0, 0, 2], [10, 0, 0, 3]])], &mut ids);
        assert_eq!(id_of(&c2, [10, 0, 0, 2]), b2);
        assert!(id_of(&c2, [10, 0, 0, 3]) > b2.max(id_of(&c1, [10, 0, 0, 1])));
    }

    #[test]
    fn ids_are_recovered_from_map_contents() {
        let mut ids = Ids::default();
        let c1 = layout(&[fe(80, &[[10, 0, 0, 1]]), fe(81, &[[10, 0, 0, 2]])], &mut ids);
        let mut fresh = Ids::from_contents(&c1);
        let c2 = layout(&[fe(80, &[[10, 0, 0, 1]]), fe(81, &[[10, 0, 0, 2]])], &mut fresh);
        assert_eq!(c1, c2, "a restarted agent computes the same contents");
    }
}
