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
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use ferry_common::{
    addr_from_map, addr_to_map, backend_flags, port_from_map, port_to_map, svc_flags, Backend, RevNat, ServiceKey,
    ServiceName, ServiceValue, SCOPE_EXTERNAL, SCOPE_INTERNAL,
};
use ipnet::Ipv4Net;

use super::{IdCursors, MapContents, SourceRange};
use crate::translate::Frontend;

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

    /// Forgets the id of `t`.
    fn free(&mut self, t: &K) {
        if let Some(id) = self.ids.remove(t) {
            self.used.remove(&id);
        }
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
    let mut l = Layout::new(std::mem::take(ids));
    l.full(frontends);
    *ids = l.ids;
    l.desired
}

/// Where a frontend sits in the layout's order (the translation's: address,
/// port, protocol; an internal twin after its external frontend).
type Place = (Tuple, bool);

/// What one laid-out frontend holds, to take it out again.
#[derive(Clone, Debug)]
struct Placed {
    /// Its slot 0.
    k0: ServiceKey,
    /// Every backend it names (slots and draining).
    backends: Vec<Tuple>,
    /// Its Maglev table's backend set.
    table: Option<MaglevKey>,
    /// Its name, reverse-NAT entry and source ranges (shared with its twin).
    name: ServiceName,
    ranges: Vec<Ipv4Net>,
}

/// What an update touched: the keys the sync must look at (old and new).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Slot 0 of every frontend laid out again or taken out.
    pub frontends: BTreeSet<ServiceKey>,
    pub backends: BTreeSet<u32>,
    pub revnats: BTreeSet<u16>,
    pub tables: BTreeSet<u32>,
}

/// The desired map contents with what it takes to change them frontend by
/// frontend: [`Layout::full`] lays out everything (the reference, and the
/// periodic resync), [`Layout::update`] only the frontends given, giving the
/// same contents and ids a full layout of the whole result would.
#[derive(Debug, Default)]
pub struct Layout {
    pub ids: Ids,
    desired: MapContents,
    placed: BTreeMap<Place, Placed>,
    /// Per backend: the frontends naming it, and the value each would write
    /// (usable: true; draining: false).
    refs: HashMap<Tuple, BTreeMap<Place, (bool, Backend)>>,
    /// Per Maglev backend set: how many frontends use its table.
    table_refs: BTreeMap<MaglevKey, usize>,
    /// Maglev frontends without a free table.
    no_table: BTreeSet<Place>,
}

/// What [`Layout::place`] and [`Layout::unplace`] touched, settled by
/// [`Layout::settle`].
#[derive(Default)]
struct Touched {
    backends: BTreeSet<Tuple>,
    frontends: BTreeSet<Tuple>,
    tables: BTreeSet<MaglevKey>,
}

impl Layout {
    pub fn new(ids: Ids) -> Self {
        Self { ids, ..Self::default() }
    }

    /// The desired contents.
    pub fn desired(&self) -> &MapContents {
        &self.desired
    }

    /// Lays out `frontends` (sorted as the translation gives them) from
    /// scratch; ids of keys no longer live are freed.
    pub fn full(&mut self, frontends: &[Frontend]) {
        self.desired = MapContents::default();
        self.placed.clear();
        self.refs.clear();
        self.table_refs.clear();
        self.no_table.clear();
        let mut t = Touched::default();
        for f in frontends {
            self.place(f, &mut t);
        }
        self.settle(&t);
        let live: BTreeSet<Tuple> = self.refs.keys().copied().collect();
        self.ids.backends.retain(&live);
        let live: BTreeSet<Tuple> = self.placed.keys().map(|(t, _)| *t).collect();
        self.ids.frontends.retain(&live);
        let live: BTreeSet<MaglevKey> = self.table_refs.keys().cloned().collect();
        self.ids.maglev.tables.retain(&live);
        self.ids.maglev.computed.retain(|k, _| live.contains(k));
        self.report_no_table(frontends);
    }

    /// Replaces frontends `old` by `new` (each sorted as the translation
    /// gives them; `old` as the last layout had them); the other frontends
    /// stay. Returns the keys whose entries may have changed.
    pub fn update(&mut self, old: &[Frontend], new: &[Frontend]) -> Scope {
        let mut t = Touched::default();
        let mut scope = Scope::default();
        for f in old {
            let Some(place) = place_of(f) else { continue };
            if let Some(p) = self.unplace(place, &mut t) {
                scope.frontends.insert(p.k0);
            }
        }
        for f in new {
            if let Some(k0) = self.place(f, &mut t) {
                scope.frontends.insert(k0);
            }
        }
        // Old ids first: settle frees those no longer live.
        for b in &t.backends {
            scope.backends.extend(self.ids.backends.ids.get(b));
        }
        for f in &t.frontends {
            scope.revnats.extend(self.ids.frontends.ids.get(f).map(|id| *id as u16));
        }
        for k in &t.tables {
            scope.tables.extend(self.ids.maglev.tables.ids.get(k).map(|i| i - 1));
        }
        self.settle(&t);
        self.report_no_table(new);
        scope
    }

    /// Lays out one frontend: its slots, slot 0 and Maglev table; its
    /// backends, reverse-NAT entry, name and ranges are settled later.
    fn place(&mut self, f: &Frontend, t: &mut Touched) -> Option<ServiceKey> {
        let vip = v4_of(f, "frontend", f.addr)?;
        let place = place_of(f)?;
        let Some(rev_nat_id) = self.ids.revnat(place.0) else {
            tracing::error!(frontend = %f.id, "no free reverse-NAT id; frontend left out");
            return None;
        };
        t.frontends.insert(place.0);
        let key = |slot: u16| ServiceKey {
            addr: addr_to_map(vip.octets()),
            port: port_to_map(f.port),
            slot,
            proto: f.proto,
            scope: if place.1 { SCOPE_INTERNAL } else { SCOPE_EXTERNAL },
            _pad: [0; 2],
        };
        let backend_value = |addr: Ipv4Addr, b: &crate::translate::BackendSpec| Backend {
            addr: addr_to_map(addr.octets()),
            port: port_to_map(b.port),
            proto: f.proto,
            flags: if b.terminating { backend_flags::TERMINATING } else { 0 }
                | if b.local { backend_flags::LOCAL } else { 0 },
        };
        // This frontend's value of each backend: a usable one's (the last),
        // else a draining one's (the first).
        let mut mine: BTreeMap<Tuple, (bool, Backend)> = BTreeMap::new();
        let mut slot: u16 = 0;
        let mut slotted: Vec<(u32, Tuple)> = Vec::new();
        for b in &f.backends {
            let Some(addr) = v4_of(f, "backend", b.addr) else {
                continue;
            };
            let bt = (addr, b.port, f.proto);
            let Some(id) = self.ids.backend(bt) else {
                tracing::error!(frontend = %f.id, backend = %b.addr, "no free backend id; backend left out");
                continue;
            };
            let Some(next) = slot.checked_add(1) else {
                tracing::error!(frontend = %f.id, "more than 65535 backends; the rest left out");
                break;
            };
            slot = next;
            slotted.push((id, bt));
            mine.insert(bt, (true, backend_value(addr, b)));
            self.desired.services.insert(
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
            let bt = (addr, b.port, f.proto);
            if self.ids.backend(bt).is_some() {
                // A backend usable for one frontend and draining for another
                // keeps the usable one's flags.
                mine.entry(bt).or_insert_with(|| (false, backend_value(addr, b)));
            }
        }
        for (bt, v) in &mine {
            self.refs.entry(*bt).or_default().insert(place, *v);
            t.backends.insert(*bt);
        }
        // Maglev: the frontend names its table in slot 0 (a frontend
        // without backends needs none: it rejects).
        let mut flags = f.flags;
        let mut table_index = 0;
        let mut table = None;
        self.no_table.remove(&place);
        if flags & svc_flags::MAGLEV != 0 {
            flags &= !svc_flags::MAGLEV;
            if !slotted.is_empty() {
                match self.ids.maglev_table(&slotted) {
                    Some((index, positions)) => {
                        let k = sorted_key(&slotted);
                        *self.table_refs.entry(k.clone()).or_default() += 1;
                        t.tables.insert(k.clone());
                        table = Some(k);
                        self.desired.maglev.insert(index, positions);
                        table_index = index;
                        flags |= svc_flags::MAGLEV;
                    }
                    None => {
                        self.no_table.insert(place);
                    }
                }
            }
        }
        let k0 = key(0);
        self.desired.services.insert(
            k0,
            ServiceValue {
                backend_id: table_index,
                count: slot,
                rev_nat_id,
                flags,
                affinity_timeout: f.affinity_timeout,
            },
        );
        // An IPv4 frontend's clients are IPv4: its ranges of another family
        // match none of them.
        let ranges = f
            .source_ranges
            .iter()
            .filter_map(|net| match net {
                ipnet::IpNet::V4(net) => Some(net.trunc()),
                ipnet::IpNet::V6(_) => None,
            })
            .collect();
        self.placed.insert(
            place,
            Placed {
                k0,
                backends: mine.into_keys().collect(),
                table,
                name: f.id.to_map(),
                ranges,
            },
        );
        Some(k0)
    }

    /// Takes a frontend out (its slots and slot 0; the rest is settled).
    fn unplace(&mut self, place: Place, t: &mut Touched) -> Option<Placed> {
        let p = self.placed.remove(&place)?;
        self.no_table.remove(&place);
        t.frontends.insert(place.0);
        if let Some(v0) = self.desired.services.remove(&p.k0) {
            for slot in 1..=v0.count {
                self.desired.services.remove(&ServiceKey { slot, ..p.k0 });
            }
        }
        for b in &p.backends {
            if let Some(r) = self.refs.get_mut(b) {
                r.remove(&place);
            }
            t.backends.insert(*b);
        }
        if let Some(k) = &p.table {
            if let Some(n) = self.table_refs.get_mut(k) {
                *n -= 1;
            }
            t.tables.insert(k.clone());
        }
        Some(p)
    }

    /// Settles what placing and taking out touched: each backend's value
    /// (the last usable frontend's in order, else the first draining one's),
    /// each reverse-NAT id's entry, name and ranges (the last of its
    /// frontends'), and the ids and tables no longer live.
    fn settle(&mut self, t: &Touched) {
        for bt in &t.backends {
            let Some(&id) = self.ids.backends.ids.get(bt) else {
                continue;
            };
            let refs = self.refs.get(bt).filter(|r| !r.is_empty());
            let value = refs.map(|r| {
                r.values()
                    .rev()
                    .find(|(usable, _)| *usable)
                    .or_else(|| r.values().next())
                    .map(|(_, v)| *v)
            });
            match value.flatten() {
                Some(v) => {
                    self.desired.backends.insert(id, v);
                }
                None => {
                    self.refs.remove(bt);
                    self.desired.backends.remove(&id);
                    self.ids.backends.free(bt);
                }
            }
        }
        for ft in &t.frontends {
            let Some(&id) = self.ids.frontends.ids.get(ft) else {
                continue;
            };
            let id = id as u16;
            let old: Vec<SourceRange> = self
                .desired
                .source_ranges
                .range((id, Ipv4Net::default())..)
                .take_while(|r| r.0 == id)
                .copied()
                .collect();
            for r in old {
                self.desired.source_ranges.remove(&r);
            }
            let mine: Vec<&Placed> = self.placed.range((*ft, false)..=(*ft, true)).map(|(_, p)| p).collect();
            let Some(last) = mine.last() else {
                self.desired.revnat.remove(&id);
                self.desired.names.remove(&id);
                self.ids.frontends.free(ft);
                continue;
            };
            self.desired.revnat.insert(
                id,
                RevNat {
                    addr: addr_to_map(ft.0.octets()),
                    port: port_to_map(ft.1),
                    _pad: 0,
                },
            );
            self.desired.names.insert(id, last.name);
            for p in &mine {
                self.desired.source_ranges.extend(p.ranges.iter().map(|n| (id, *n)));
            }
        }
        for k in &t.tables {
            if self.table_refs.get(k).is_some_and(|n| *n == 0) {
                self.table_refs.remove(k);
                if let Some(i) = self.ids.maglev.tables.ids.get(k) {
                    self.desired.maglev.remove(&(i - 1));
                }
                self.ids.maglev.tables.free(k);
                self.ids.maglev.computed.remove(k);
            }
        }
        self.desired.cursors = self.ids.cursors();
    }

    /// Said once per change of their number, not at every sync.
    fn report_no_table(&mut self, frontends: &[Frontend]) {
        if self.no_table.len() == self.ids.maglev.without_table {
            return;
        }
        self.ids.maglev.without_table = self.no_table.len();
        if !self.no_table.is_empty() {
            let first: Vec<String> = frontends
                .iter()
                .filter(|f| place_of(f).is_some_and(|p| self.no_table.contains(&p)))
                .take(5)
                .map(|f| f.id.to_string())
                .collect();
            tracing::error!(
                frontends = self.no_table.len(),
                first = %first.join(", "),
                "no free Maglev table for these frontends (raise --maglev-tables); their new flows pick a backend at random"
            );
        }
    }
}

/// Where `f` sits in the layout's order (None: not IPv4).
fn place_of(f: &Frontend) -> Option<Place> {
    let vip = v4(f.addr).ok()?;
    Some(((vip, f.port, f.proto), f.flags & svc_flags::INTERNAL != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ids::FrontendId, translate::BackendSpec};
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
