//! Desired frontends → exact map entries, with stable ids.
//!
//! Backend ids are stable per {ip, port, proto} while the backend exists, so
//! connection-tracking entries (which name backends by id) stay valid across
//! syncs and agent restarts; ids are not reused right away (a new backend never
//! inherits the flows of a removed one). Reverse-NAT ids are stable per frontend.
//!
//! This is where the translation's family-generic addresses meet the maps'
//! IPv4 encoding ([`v4`]): an IPv6 frontend or backend that got past the
//! translation's family gate is left out here, with an error, never truncated.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use ferry_common::{
    addr_from_map, addr_to_map, backend_flags, port_from_map, port_to_map, svc_flags, Backend, RevNat, ServiceKey,
    ServiceValue, SCOPE_EXTERNAL, SCOPE_INTERNAL,
};

use super::{IdCursors, MapContents};
use crate::{ids::FrontendId, translate::Frontend};

/// A frontend or backend as the IPv4 maps know it: {ip, port, proto}.
type Tuple = (Ipv4Addr, u16, u8);

/// An address the IPv4 maps cannot hold.
#[derive(Debug, PartialEq, Eq)]
pub struct NotIpv4(pub IpAddr);

impl fmt::Display for NotIpv4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is IPv6: the dataplane's maps hold IPv4 addresses only", self.0)
    }
}

/// The IPv4 maps' encoding edge: `addr` as they hold it.
pub fn v4(addr: IpAddr) -> Result<Ipv4Addr, NotIpv4> {
    match addr {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(_) => Err(NotIpv4(addr)),
    }
}

/// Stable ids for keys: a key keeps its id while it is live; a new key gets the
/// next free id after the last one handed out (wrapping within `1..=max`), so a
/// freed id is reused only after the whole space went round.
#[derive(Clone, Debug)]
struct Allocator<K = Tuple> {
    ids: BTreeMap<K, u32>,
    used: BTreeSet<u32>,
    last: u32,
    max: u32,
}

impl<K: Ord + Clone> Allocator<K> {
    fn new(max: u32) -> Self {
        Self {
            ids: BTreeMap::new(),
            used: BTreeSet::new(),
            last: 0,
            max,
        }
    }

    fn insert(&mut self, t: K, id: u32) {
        self.ids.insert(t, id);
        self.used.insert(id);
        self.last = self.last.max(id);
    }

    /// Goes on after `cursor`, the last id a previous agent handed out (0:
    /// unknown, as with pins of an older version: after the highest live id).
    fn resume(&mut self, cursor: u32) {
        if cursor != 0 {
            self.last = cursor.min(self.max);
        }
    }

    /// The id of `t`; None only when every id is taken.
    fn get(&mut self, t: K) -> Option<u32> {
        if let Some(id) = self.ids.get(&t) {
            return Some(*id);
        }
        if self.used.len() as u64 >= u64::from(self.max) {
            return None;
        }
        let mut id = self.last;
        loop {
            id = if id >= self.max { 1 } else { id + 1 };
            if !self.used.contains(&id) {
                break;
            }
        }
        self.ids.insert(t, id);
        self.used.insert(id);
        self.last = id;
        Some(id)
    }

    /// Forgets the ids of keys not in `live`.
    fn retain(&mut self, live: &BTreeSet<K>) {
        let used = &mut self.used;
        self.ids.retain(|t, id| {
            let keep = live.contains(t);
            if !keep {
                used.remove(id);
            }
            keep
        });
    }
}

/// The backends a Maglev table is computed from: {ip, port, proto} of each,
/// sorted. Frontends with the same backends share one table.
type MaglevKey = Vec<Tuple>;

/// Maglev tables: their size M and indices in the Maglev map, one per
/// distinct backend set, allocated like ids so that a changed set gets a
/// fresh index (written whole before its frontends switch to it) and the old
/// one is reused only after the others went round.
#[derive(Clone, Debug)]
struct MaglevIds {
    size: u32,
    /// Table index + 1 per backend set.
    tables: Allocator<MaglevKey>,
    /// Computed tables (indices into the key), kept while their set is live.
    computed: BTreeMap<MaglevKey, Arc<Vec<u32>>>,
    /// Maglev frontends the last layout found no free table for.
    without_table: usize,
}

/// Backend ids (per {ip, port, proto}) and reverse-NAT ids (per frontend
/// {vip, port, proto}); rebuilt from the maps' contents when the agent starts.
#[derive(Clone, Debug)]
pub struct Ids {
    backends: Allocator,
    frontends: Allocator,
    maglev: MaglevIds,
}

impl Default for Ids {
    fn default() -> Self {
        Self {
            backends: Allocator::new(u32::MAX),
            frontends: Allocator::new(u32::from(u16::MAX)),
            maglev: MaglevIds {
                size: ferry_common::DEFAULT_MAGLEV_TABLE_SIZE,
                tables: Allocator::new(ferry_common::DEFAULT_MAGLEV_TABLES),
                computed: BTreeMap::new(),
                without_table: 0,
            },
        }
    }
}

/// The Maglev key of a frontend's slotted backends (id, tuple).
fn sorted_key(slots: &[(u32, Tuple)]) -> MaglevKey {
    let mut key: MaglevKey = slots.iter().map(|(_, t)| *t).collect();
    key.sort();
    key.dedup();
    key
}

/// The Maglev key of the backends of frontend `k0` (slot 0) in `c`: what
/// its slots name. None when a slot or backend is missing.
fn maglev_key(c: &MapContents, k0: &ServiceKey, count: u16) -> Option<MaglevKey> {
    let mut key = (1..=count)
        .map(|slot| {
            let id = c.services.get(&ServiceKey { slot, ..*k0 })?.backend_id;
            let b = c.backends.get(&id)?;
            Some((Ipv4Addr::from(addr_from_map(b.addr)), port_from_map(b.port), b.proto))
        })
        .collect::<Option<Vec<_>>>()?;
    key.sort();
    key.dedup();
    Some(key)
}

impl Ids {
    /// Maglev tables of `size` entries (a prime), at most `tables` of them
    /// (`--maglev-table-size`, `--maglev-tables`).
    pub fn with_maglev(mut self, size: u32, tables: u32) -> Self {
        self.maglev = MaglevIds {
            size,
            tables: Allocator::new(tables),
            computed: BTreeMap::new(),
            without_table: 0,
        };
        self
    }

    /// The ids already in the maps, and the allocators' cursors (agent
    /// restart), with Maglev tables as [`Ids::with_maglev`] says.
    pub fn from_contents(c: &MapContents, maglev_size: u32, maglev_tables: u32) -> Self {
        let mut ids = Self::default().with_maglev(maglev_size, maglev_tables);
        for (id, b) in &c.backends {
            ids.backends.insert(
                (Ipv4Addr::from(addr_from_map(b.addr)), port_from_map(b.port), b.proto),
                *id,
            );
        }
        for (k, v) in c.services.iter().filter(|(k, _)| k.slot == 0) {
            let t = (Ipv4Addr::from(addr_from_map(k.addr)), port_from_map(k.port), k.proto);
            ids.frontends.insert(t, u32::from(v.rev_nat_id));
            if v.flags & svc_flags::MAGLEV != 0 && v.backend_id < maglev_tables {
                if let Some(key) = maglev_key(c, k, v.count) {
                    ids.maglev.tables.insert(key, v.backend_id + 1);
                }
            }
        }
        ids.backends.resume(c.cursors.backend);
        ids.frontends.resume(c.cursors.revnat);
        ids
    }

    /// The allocators' cursors, to keep with the maps.
    pub fn cursors(&self) -> IdCursors {
        IdCursors {
            backend: self.backends.last,
            revnat: self.frontends.last,
        }
    }

    fn backend(&mut self, t: Tuple) -> Option<u32> {
        self.backends.get(t)
    }

    fn revnat(&mut self, t: Tuple) -> Option<u16> {
        self.frontends.get(t).and_then(|id| u16::try_from(id).ok())
    }

    /// The index and contents (backend ids) of the Maglev table over `slots`
    /// (backend id and {ip, port, proto} of each); None when every table
    /// index is taken.
    fn maglev_table(&mut self, slots: &[(u32, Tuple)]) -> Option<(u32, Arc<Vec<u32>>)> {
        let key = sorted_key(slots);
        let index = self.maglev.tables.get(key.clone())? - 1;
        let size = self.maglev.size;
        let positions = self
            .maglev
            .computed
            .entry(key.clone())
            .or_insert_with_key(|key| {
                let backends: Vec<(Ipv4Addr, u16)> = key.iter().map(|(a, p, _)| (*a, *p)).collect();
                Arc::new(crate::maglev::table(&backends, size))
            })
            .clone();
        let ids: BTreeMap<Tuple, u32> = slots.iter().map(|(id, t)| (*t, *id)).collect();
        Some((
            index,
            Arc::new(positions.iter().map(|&i| ids[&key[i as usize]]).collect()),
        ))
    }
}

/// `addr` (of frontend `f`, or one of its backends: `what`) as the IPv4 maps
/// hold it; None, with an error naming the frontend, when it is IPv6.
fn v4_of(f: &Frontend, what: &str, addr: IpAddr) -> Option<Ipv4Addr> {
    v4(addr)
        .map_err(|e| tracing::error!(frontend = %f.id, "{what} {e}; {what} left out"))
        .ok()
}

/// The map contents for `frontends`. A frontend or backend that gets no id (all
/// taken: far beyond the map sizes) is left out and logged.
pub fn layout(frontends: &[Frontend], ids: &mut Ids) -> MapContents {
    let mut out = MapContents::default();
    let mut live_backends = BTreeSet::new();
    let mut live_frontends = BTreeSet::new();
    let mut live_tables = BTreeSet::new();
    let mut no_table: Vec<&FrontendId> = Vec::new();
    for f in frontends {
        let Some(vip) = v4_of(f, "frontend", f.addr) else {
            continue;
        };
        let Some(rev_nat_id) = ids.revnat((vip, f.port, f.proto)) else {
            tracing::error!(frontend = %f.id, "no free reverse-NAT id; frontend left out");
            continue;
        };
        live_frontends.insert((vip, f.port, f.proto));
        let key = |slot: u16| ServiceKey {
            addr: addr_to_map(vip.octets()),
            port: port_to_map(f.port),
            slot,
            proto: f.proto,
            scope: if f.flags & svc_flags::INTERNAL != 0 {
                SCOPE_INTERNAL
            } else {
                SCOPE_EXTERNAL
            },
            _pad: [0; 2],
        };
        let backend_value = |addr: Ipv4Addr, b: &crate::translate::BackendSpec| Backend {
            addr: addr_to_map(addr.octets()),
            port: port_to_map(b.port),
            proto: f.proto,
            flags: if b.terminating { backend_flags::TERMINATING } else { 0 }
                | if b.local { backend_flags::LOCAL } else { 0 },
        };
        let mut slot: u16 = 0;
        let mut slotted: Vec<(u32, Tuple)> = Vec::new();
        for b in &f.backends {
            let Some(addr) = v4_of(f, "backend", b.addr) else {
                continue;
            };
            let t = (addr, b.port, f.proto);
            let Some(id) = ids.backend(t) else {
                tracing::error!(frontend = %f.id, backend = %b.addr, "no free backend id; backend left out");
                continue;
            };
            let Some(next) = slot.checked_add(1) else {
                tracing::error!(frontend = %f.id, "more than 65535 backends; the rest left out");
                break;
            };
            slot = next;
            slotted.push((id, t));
            live_backends.insert(t);
            out.backends.insert(id, backend_value(addr, b));
            out.services.insert(
                key(slot),
                ServiceValue {
                    backend_id: id,
                    count: 0,
                    rev_nat_id,
                    flags: 0,
                    affinity_timeout: 0,
                },
            );
        }
        // Draining endpoints: backends without a slot, so established flows to
        // them keep their backend (and new ones never get it).
        for b in &f.draining {
            let Some(addr) = v4_of(f, "backend", b.addr) else {
                continue;
            };
            let t = (addr, b.port, f.proto);
            if let Some(id) = ids.backend(t) {
                live_backends.insert(t);
                // A backend usable for one frontend and draining for another
                // keeps the usable one's flags.
                out.backends.entry(id).or_insert_with(|| backend_value(addr, b));
            }
        }
        // Maglev: the frontend names its table in slot 0 (a frontend
        // without backends needs none: it rejects).
        let mut flags = f.flags;
        let mut table_index = 0;
        if flags & svc_flags::MAGLEV != 0 {
            flags &= !svc_flags::MAGLEV;
            if !slotted.is_empty() {
                match ids.maglev_table(&slotted) {
                    Some((index, table)) => {
                        live_tables.insert(sorted_key(&slotted));
                        out.maglev.insert(index, table);
                        table_index = index;
                        flags |= svc_flags::MAGLEV;
                    }
                    None => no_table.push(&f.id),
                }
            }
        }
        out.services.insert(
            key(0),
            ServiceValue {
                backend_id: table_index,
                count: slot,
                rev_nat_id,
                flags,
                affinity_timeout: f.affinity_timeout,
            },
        );
        out.revnat.insert(
            rev_nat_id,
            RevNat {
                addr: addr_to_map(vip.octets()),
                port: port_to_map(f.port),
                _pad: 0,
            },
        );
        out.names.insert(rev_nat_id, f.id.to_map());
        // An IPv4 frontend's clients are IPv4: its ranges of another family
        // match none of them.
        out.source_ranges
            .extend(f.source_ranges.iter().filter_map(|net| match net {
                ipnet::IpNet::V4(net) => Some((rev_nat_id, net.trunc())),
                ipnet::IpNet::V6(_) => None,
            }));
    }
    ids.backends.retain(&live_backends);
    ids.frontends.retain(&live_frontends);
    // Said once per change of their number, not at every sync.
    if no_table.len() != ids.maglev.without_table {
        ids.maglev.without_table = no_table.len();
        if !no_table.is_empty() {
            tracing::error!(
                frontends = no_table.len(),
                first = %no_table.iter().take(5).map(ToString::to_string).collect::<Vec<_>>().join(", "),
                "no free Maglev table for these frontends (raise --maglev-tables); their new flows pick a backend at random"
            );
        }
    }
    ids.maglev.tables.retain(&live_tables);
    ids.maglev.computed.retain(|k, _| live_tables.contains(k));
    out.cursors = ids.cursors();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::BackendSpec;
    use ferry_common::{svc_flags, PROTO_TCP};

    fn fe(port: u16, backends: &[[u8; 4]]) -> Frontend {
        let addrs = backends.iter().map(|b| Ipv4Addr::from(*b));
        Frontend::cluster_ip(
            crate::ids::ServiceId::new("default", "web"),
            Ipv4Addr::new(10, 96, 0, 10),
            port,
            addrs,
            8080,
        )
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
            assert!(
                c.backends.contains_key(&v.backend_id),
                "slot {} names a backend",
                k.slot
            );
            assert_eq!(v.rev_nat_id, slot0.rev_nat_id);
        }
        let rn = c.revnat[&slot0.rev_nat_id];
        assert_eq!((addr_from_map(rn.addr), port_from_map(rn.port)), ([10, 96, 0, 10], 80));
        let name = FrontendId::from_map(&c.names[&slot0.rev_nat_id]).unwrap();
        assert_eq!(name.to_string(), "default/web:80 (ClusterIP)");
    }

    #[test]
    fn source_ranges_are_keyed_by_the_frontends_reverse_nat_id() {
        let mut ids = Ids::default();
        let mut lb = fe(80, &[[10, 0, 0, 1]]);
        lb.addr = Ipv4Addr::new(203, 0, 113, 20).into();
        lb.flags = svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES;
        lb.source_ranges = vec!["192.168.77.200/32".parse().unwrap(), "10.1.0.0/16".parse().unwrap()];
        let c = layout(&[fe(80, &[[10, 0, 0, 1]]), lb], &mut ids);
        let lb_id = c
            .services
            .iter()
            .find(|(k, _)| k.slot == 0 && addr_from_map(k.addr) == [203, 0, 113, 20])
            .unwrap()
            .1
            .rev_nat_id;
        let want: BTreeSet<_> = [
            (lb_id, "10.1.0.0/16".parse().unwrap()),
            (lb_id, "192.168.77.200/32".parse().unwrap()),
        ]
        .into();
        assert_eq!(c.source_ranges, want, "only the restricted frontend has entries");
    }

    #[test]
    fn backend_ids_are_stable_and_not_reused_at_once() {
        let mut ids = Ids::default();
        let c1 = layout(&[fe(80, &[[10, 0, 0, 1], [10, 0, 0, 2]])], &mut ids);
        let id_of =
            |c: &MapContents, ip: [u8; 4]| *c.backends.iter().find(|(_, b)| addr_from_map(b.addr) == ip).unwrap().0;
        let b2 = id_of(&c1, [10, 0, 0, 2]);
        // .1 goes away, .3 arrives: .2 keeps its id, .3 gets a fresh one (not .1's).
        let c2 = layout(&[fe(80, &[[10, 0, 0, 2], [10, 0, 0, 3]])], &mut ids);
        assert_eq!(id_of(&c2, [10, 0, 0, 2]), b2);
        assert!(id_of(&c2, [10, 0, 0, 3]) > b2.max(id_of(&c1, [10, 0, 0, 1])));
    }

    #[test]
    fn allocator_wraps_and_reports_exhaustion() {
        let t = |i: u8| (Ipv4Addr::new(10, 0, 0, i), 80, PROTO_TCP);
        let mut a = Allocator::new(3);
        assert_eq!([a.get(t(1)), a.get(t(2)), a.get(t(3))], [Some(1), Some(2), Some(3)]);
        assert_eq!(a.get(t(4)), None, "all ids taken: no id, no endless search");
        a.retain(&[t(1), t(3)].into());
        assert_eq!(a.get(t(4)), Some(2), "wraps to the freed id");
        assert_eq!(a.get(t(1)), Some(1), "live keys keep their id");
    }

    /// The id of the only backend and the reverse-NAT id of the only frontend of `c`.
    fn only_ids(c: &MapContents) -> (u32, u16) {
        assert_eq!((c.backends.len(), c.revnat.len()), (1, 1), "{c:?}");
        (*c.backends.keys().next().unwrap(), *c.revnat.keys().next().unwrap())
    }

    #[test]
    fn a_restarted_agent_does_not_hand_out_ids_freed_before_the_restart() {
        let mut ids = Ids::default();
        let a = layout(&[fe(80, &[[10, 0, 0, 1]])], &mut ids);
        let gone = layout(&[], &mut ids);
        assert!(gone.backends.is_empty() && gone.revnat.is_empty());
        // Restart: nothing live in the maps, only the cursors.
        let mut fresh = Ids::from_contents(&gone, 251, 4);
        let b = layout(&[fe(81, &[[10, 0, 0, 2]])], &mut fresh);
        let ((a_backend, a_revnat), (b_backend, b_revnat)) = (only_ids(&a), only_ids(&b));
        assert_ne!(b_backend, a_backend, "B's backend got A's freed backend id");
        assert_ne!(b_revnat, a_revnat, "B's frontend got A's freed reverse-NAT id");
        assert_eq!(
            b.cursors,
            IdCursors {
                backend: b_backend,
                revnat: u32::from(b_revnat)
            }
        );
    }

    #[test]
    fn pins_without_cursors_resume_after_the_highest_live_id() {
        let mut ids = Ids::default();
        let c = layout(&[fe(80, &[[10, 0, 0, 1], [10, 0, 0, 2]])], &mut ids);
        let old = MapContents {
            cursors: IdCursors::default(),
            ..c.clone()
        };
        let mut fresh = Ids::from_contents(&old, 251, 4);
        assert_eq!(fresh.cursors(), c.cursors);
        let next = layout(&[fe(80, &[[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3]])], &mut fresh);
        assert_eq!(next.cursors.backend, c.cursors.backend + 1);
    }

    #[test]
    fn ids_are_recovered_from_map_contents() {
        let mut ids = Ids::default();
        let c1 = layout(&[fe(80, &[[10, 0, 0, 1]]), fe(81, &[[10, 0, 0, 2]])], &mut ids);
        let mut fresh = Ids::from_contents(&c1, 251, 4);
        let c2 = layout(&[fe(80, &[[10, 0, 0, 1]]), fe(81, &[[10, 0, 0, 2]])], &mut fresh);
        assert_eq!(c1, c2, "a restarted agent computes the same contents");
    }

    #[test]
    fn the_ipv4_edge_leaves_ipv6_frontends_and_backends_out_and_encodes_the_rest() {
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            v4(v6("fd00::10")).unwrap_err().to_string(),
            "fd00::10 is IPv6: the dataplane's maps hold IPv4 addresses only"
        );
        let mut ids = Ids::default();
        let mut mixed = fe(80, &[[10, 0, 0, 1]]);
        mixed.backends.push(BackendSpec {
            addr: v6("fd00::1"),
            ..mixed.backends[0].clone()
        });
        mixed.draining.push(BackendSpec {
            addr: v6("fd00::2"),
            ..mixed.backends[0].clone()
        });
        let mut only_v6 = fe(81, &[[10, 0, 0, 2]]);
        only_v6.addr = v6("fd00::10");
        let mut lb = fe(82, &[[10, 0, 0, 1]]);
        lb.flags = svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES;
        lb.source_ranges = vec!["10.1.0.0/16".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
        let c = layout(&[mixed, only_v6, lb], &mut ids);
        // Two IPv4 frontends, each with its one IPv4 backend (shared): the
        // IPv6 frontend got no reverse-NAT id, the IPv6 backends no id.
        assert_eq!(c.revnat.len(), 2, "{c:?}");
        assert_eq!(c.backends.len(), 1, "{c:?}");
        assert!(c.revnat.values().all(|r| addr_from_map(r.addr) == [10, 96, 0, 10]));
        assert!(c.services.iter().all(|(k, v)| k.slot != 0 || v.count == 1));
        let ranges: Vec<String> = c.source_ranges.iter().map(|(_, n)| n.to_string()).collect();
        assert_eq!(ranges, ["10.1.0.0/16"]);
        assert_eq!(ids.frontends.ids.len(), 2, "no id is held for the IPv6 frontend");
    }
}
