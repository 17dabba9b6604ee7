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
