//! Keeps the maps equal to the desired contents by writing only the difference,
//! in an order that never lets the dataplane see a slot naming a missing backend
//! or a frontend whose count exceeds its slots, deleting what is no longer used
//! before adding (so a nearly full map converges), and frontend by frontend: one
//! that does not fit is reported by name and the others are written. Every
//! write goes through the generic table of its map (`table`, `defs`).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_common::{addr_from_map, port_from_map, svc_flags, Backend, RevNat, ServiceKey, ServiceName, ServiceValue};

use crate::ids::FrontendId;

use super::{
    assignments,
    defs::{Backends, Config, Maglev, Names, RevNats, Services, SourceRanges, Stats},
    layout::Scope,
    maglev_tables_in_use,
    table::{diff, held, stale, Held, MapDef, Rows as _, Synced},
    Assignment, Forgotten, MapContents, MapStore, SourceRange,
};

/// What one sync wrote, and what it could not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub upserts: usize,
    pub deletes: usize,
    /// UDP flows and affinity entries of assignments that ended.
    pub forgotten: Forgotten,
    pub duration: Duration,
    /// Objects left as they were (or out) because a write failed; the rest
    /// was written.
    pub failed: Vec<SyncFailure>,
}

/// A write that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteError {
    /// The map, as messages name it (`services map`).
    pub map: &'static str,
    /// The flag that sizes the map, if one does.
    pub size_flag: Option<&'static str>,
    /// What was written: `writing slot 3`, `deleting backend 7`.
    pub action: String,
    /// The map was full.
    pub full: bool,
    pub error: String,
}

/// An object the sync could not (fully) program, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncFailure {
    /// `frontend default/web:http (ClusterIP)`, `backend 7 (10.0.0.1:8080)`, ...
    pub object: String,
    pub cause: WriteError,
}

impl fmt::Display for SyncFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.cause;
        write!(f, "{} not programmed: {} in the {}", self.object, c.action, c.map)?;
        if c.full {
            write!(f, ": the map is full")?;
            if let Some(flag) = c.size_flag {
                write!(f, " (raise {flag})")?;
            }
        }
        write!(f, ": {}", c.error)
    }
}

/// One entry of the maps the agent owns, as the sync orders them.
#[derive(Clone, Copy, Debug)]
enum Entry {
    Backend(u32, Backend),
    /// The reverse-NAT entry and the frontend's name (written together).
    RevNat(u16, RevNat, ServiceName),
    Range(SourceRange),
    Service(ServiceKey, ServiceValue),
    /// A Maglev table by index (its contents: the desired ones).
    Maglev(u32),
}

/// The key of an [`Entry`], to delete it.
#[derive(Clone, Copy, Debug)]
enum Key {
    Backend(u32),
    RevNat(u16),
    Range(SourceRange),
    Service(ServiceKey),
    Maglev(u32),
}

impl Entry {
    fn key(&self) -> Key {
        match *self {
            Entry::Backend(id, _) => Key::Backend(id),
            Entry::RevNat(id, ..) => Key::RevNat(id),
            Entry::Range(r) => Key::Range(r),
            Entry::Service(k, _) => Key::Service(k),
            Entry::Maglev(i) => Key::Maglev(i),
        }
    }
}

/// Holds what is in the maps (read once at start, then kept in step).
pub struct Syncer<S: MapStore> {
    store: S,
    current: MapContents,
}

impl<S: MapStore> Syncer<S> {
    /// Reads the current contents (pinned maps survive agent restarts).
    pub fn new(store: S) -> Result<Self, S::Error> {
        let current = store.read_all()?;
        Ok(Self { store, current })
    }

    pub fn current(&self) -> &MapContents {
        &self.current
    }

    /// Writes the difference between the maps and `desired`. A failed write
    /// never stops the sync: the object it belongs to is left as it was (or
    /// out, if new), reported in [`SyncStats::failed`], and tried again next
    /// time; everything else is written.
    ///
    /// Order: 1) frontends that keep fewer slots get their lower count (an
    /// update: needs no room); 2) what nothing refers to any more goes:
    /// frontends no longer wanted (slot 0 first, then their slots), slots
    /// beyond their frontend's count, source ranges no filtering frontend
    /// needs, backends no slot names, reverse-NAT ids no entry carries; 3) the
    /// id cursors, before any entry with a new id; 4) frontend by frontend:
    /// its new backends, reverse-NAT entry, source ranges and slots, then its
    /// slot 0 (a frontend whose additions do not all fit takes them back, so
    /// it uses no room), then its changed entries in the same order; then
    /// draining backends (no slot); 5) step 2 again for what step 4 freed;
    /// 6) flows of ended assignments are forgotten. So a frontend that gains
    /// `SOURCE_RANGES` finds its ranges there, and one that loses it (or a
    /// range) stops filtering before its entries go.
    pub fn sync(&mut self, desired: &MapContents) -> SyncStats {
        write(&mut self.store, &mut self.current, desired)
    }

    /// [`Syncer::sync`] restricted to the entries of `scope` (what a
    /// [`Layout::update`] touched), in the same order and with the same
    /// checks, at a cost proportional to the scope. Exact when the maps held
    /// the desired contents of the last layout outside the scope (the last
    /// sync wrote everything: no failure): then nothing outside the scope
    /// refers to what the scope deletes or rewrites. `desired`: the whole
    /// desired contents.
    pub fn sync_scoped(&mut self, desired: &MapContents, scope: &Scope) -> SyncStats {
        let keys = ScopeKeys::of(scope, &self.current, desired);
        let mut cur = keys.restrict(&self.current);
        let st = write(&mut self.store, &mut cur, &keys.restrict(desired));
        keys.merge(&mut self.current, cur);
        st
    }
}

/// Every key of the maps' entries a [`Scope`] covers.
#[derive(Default)]
struct ScopeKeys {
    services: BTreeSet<ServiceKey>,
    backends: BTreeSet<u32>,
    revnats: BTreeSet<u16>,
    tables: BTreeSet<u32>,
}

impl ScopeKeys {
    /// The scope's frontends' slots (all, in `cur` and `desired`), and the
    /// backends, reverse-NAT ids and tables they or the scope name.
    fn of(scope: &Scope, cur: &MapContents, desired: &MapContents) -> Self {
        let mut k = Self {
            backends: scope.backends.clone(),
            revnats: scope.revnats.clone(),
            tables: scope.tables.clone(),
            ..Self::default()
        };
        for k0 in &scope.frontends {
            let from = ServiceKey {
                slot: 0,
                proto: 0,
                scope: 0,
                _pad: [0; 2],
                ..*k0
            };
            let to = ServiceKey {
                slot: u16::MAX,
                proto: u8::MAX,
                scope: u8::MAX,
                _pad: [u8::MAX; 2],
                ..*k0
            };
            for c in [cur, desired] {
                for (key, v) in c.services.range(from..=to) {
                    if key.proto != k0.proto || key.scope != k0.scope {
                        continue;
                    }
                    k.services.insert(*key);
                    k.revnats.insert(v.rev_nat_id);
                    if key.slot > 0 {
                        k.backends.insert(v.backend_id);
                    } else if v.flags & svc_flags::MAGLEV != 0 {
                        k.tables.insert(v.backend_id);
                    }
                }
            }
        }
        k
    }

    /// The entries of `c` in the scope.
    fn restrict(&self, c: &MapContents) -> MapContents {
        fn pick<K: Ord + Copy, V: Clone>(m: &BTreeMap<K, V>, keys: &BTreeSet<K>) -> BTreeMap<K, V> {
            keys.iter().filter_map(|k| m.get(k).map(|v| (*k, v.clone()))).collect()
        }
        MapContents {
            services: pick(&c.services, &self.services),
            backends: pick(&c.backends, &self.backends),
            revnat: pick(&c.revnat, &self.revnats),
            names: pick(&c.names, &self.revnats),
            source_ranges: self
                .revnats
                .iter()
                .flat_map(|id| ranges_of(&c.source_ranges, *id))
                .collect(),
            cursors: c.cursors,
            maglev: pick(&c.maglev, &self.tables),
        }
    }

    /// Puts the scope's entries of `sub` (the maps' after a scoped write)
    /// back into `cur`.
    fn merge(&self, cur: &mut MapContents, sub: MapContents) {
        fn put<K: Ord + Copy, V: Clone>(m: &mut BTreeMap<K, V>, keys: &BTreeSet<K>, sub: &BTreeMap<K, V>) {
            for k in keys {
                match sub.get(k) {
                    Some(v) => m.insert(*k, v.clone()),
                    None => m.remove(k),
                };
            }
        }
        put(&mut cur.services, &self.services, &sub.services);
        put(&mut cur.backends, &self.backends, &sub.backends);
        put(&mut cur.revnat, &self.revnats, &sub.revnat);
        put(&mut cur.names, &self.revnats, &sub.names);
        put(&mut cur.maglev, &self.tables, &sub.maglev);
        for id in &self.revnats {
            for r in ranges_of(&cur.source_ranges, *id) {
                cur.source_ranges.remove(&r);
            }
        }
        cur.source_ranges.extend(sub.source_ranges);
        cur.cursors = sub.cursors;
    }
}

/// The source ranges of reverse-NAT id `id`.
fn ranges_of(ranges: &BTreeSet<SourceRange>, id: u16) -> Vec<SourceRange> {
    ranges
        .range((id, ipnet::Ipv4Net::default())..)
        .take_while(|r| r.0 == id)
        .copied()
        .collect()
}

/// The writes of one sync of `cur` (the maps' contents, kept in step) to
/// `desired`, in the order [`Syncer::sync`] describes.
fn write<S: MapStore>(store: &mut S, cur: &mut MapContents, desired: &MapContents) -> SyncStats {
    let start = Instant::now();
    let before = assignments(cur);
    let mut w = Writes {
        store,
        cur,
        st: SyncStats::default(),
        tables: desired.maglev.clone(),
    };
    w.shrink(desired);
    w.delete_unused(desired);
    if w.cursors(desired) {
        for (k, v) in desired.services.iter().filter(|(k, _)| k.slot == 0) {
            w.frontend(desired, k, v);
        }
        w.draining(desired);
    }
    w.delete_unused(desired);
    w.forget(&before);
    let mut st = w.st;
    st.duration = start.elapsed();
    st
}

/// One sync's writes: each updates `cur` and the stats when it succeeds.
struct Writes<'a, S: MapStore> {
    store: &'a mut S,
    cur: &'a mut MapContents,
    st: SyncStats,
    /// The desired Maglev tables.
    tables: BTreeMap<u32, Arc<Vec<u32>>>,
}

impl<S: MapStore> Writes<'_, S> {
    /// A failed write to map `D`.
    fn error<D: MapDef>(&self, action: String, e: S::Error) -> WriteError {
        WriteError {
            map: D::SHOWN,
            size_flag: D::SIZE_FLAG,
            action,
            full: S::is_full(&e),
            error: e.to_string(),
        }
    }

    fn fail(&mut self, object: String, cause: WriteError) {
        self.st.failed.push(SyncFailure { object, cause });
    }

    /// Writes `k → v` into map `D` and keeps `cur` in step.
    fn put_row<D: Synced>(&mut self, k: &D::Key, v: &D::Value) -> Result<(), WriteError> {
        self.store
            .put::<D>(k, v)
            .map_err(|e| self.error::<D>(format!("writing {}", D::describe(k)), e))?;
        D::rows_mut(self.cur).set(*k, v.clone());
        Ok(())
    }

    /// Deletes `k` from map `D` and keeps `cur` in step.
    fn del_row<D: Synced>(&mut self, k: &D::Key) -> Result<(), WriteError> {
        self.store
            .del::<D>(k)
            .map_err(|e| self.error::<D>(format!("deleting {}", D::describe(k)), e))?;
        D::rows_mut(self.cur).unset(k);
        Ok(())
    }

    fn held(&self, e: &Entry) -> Held {
        let cur = &*self.cur;
        match e {
            Entry::Backend(id, b) => held(Backends::rows(cur), id, b),
            Entry::RevNat(id, r, n) => match held(RevNats::rows(cur), id, r) {
                Held::Same if held(Names::rows(cur), id, n) == Held::Same => Held::Same,
                Held::Same => Held::Differs,
                other => other,
            },
            Entry::Range(r) => held(SourceRanges::rows(cur), r, &()),
            Entry::Service(k, v) => held(Services::rows(cur), k, v),
            Entry::Maglev(i) => match (self.tables.get(i), cur.maglev.contains_key(i)) {
                (Some(t), _) => held(Maglev::rows(cur), i, t),
                (None, true) => Held::Differs,
                (None, false) => Held::Absent,
            },
        }
    }

    fn put(&mut self, e: &Entry) -> Result<(), WriteError> {
        match *e {
            Entry::Backend(id, b) => self.put_row::<Backends>(&id, &b)?,
            Entry::RevNat(id, r, n) => {
                self.put_row::<RevNats>(&id, &r)?;
                self.put_row::<Names>(&id, &n)?;
            }
            Entry::Range(r) => self.put_row::<SourceRanges>(&r, &())?,
            Entry::Service(k, v) => self.put_row::<Services>(&k, &v)?,
            Entry::Maglev(i) => {
                let Some(t) = self.tables.get(&i).cloned() else {
                    return Ok(());
                };
                self.maglev_not_in_use(e)?;
                self.put_row::<Maglev>(&i, &t)?;
            }
        }
        self.st.upserts += 1;
        Ok(())
    }

    /// A table a frontend's slot 0 names in the maps is never rewritten:
    /// its new flows would be balanced by a half-written table, or by
    /// another Service's (the allocator frees an index once no desired
    /// frontend wants it, while a frontend whose switch failed still names
    /// it). The frontend that wants it waits, random, until it is free.
    /// A zeroed table (another --maglev-table-size) means random already:
    /// it is rewritten where it is.
    /// Checked cheapest-first: an index that differs is rare.
    fn maglev_not_in_use(&self, e: &Entry) -> Result<(), WriteError> {
        let Entry::Maglev(i) = *e else { return Ok(()) };
        let differs = self.held(e) == Held::Differs;
        let zeroed = || self.cur.maglev.get(&i).is_some_and(|t| t.iter().all(|id| *id == 0));
        if differs && !zeroed() && maglev_tables_in_use(&self.cur.services).contains(&i) {
            return Err(WriteError {
                map: Maglev::SHOWN,
                size_flag: None,
                action: format!("writing {}", Maglev::describe(&i)),
                full: false,
                error: "a frontend in the maps still uses this table".into(),
            });
        }
        Ok(())
    }

    fn del(&mut self, key: Key) -> Result<(), WriteError> {
        match key {
            Key::Backend(id) => self.del_row::<Backends>(&id)?,
            Key::RevNat(id) => {
                self.del_row::<RevNats>(&id)?;
                // A reused id starts counting from zero.
                self.store
                    .clear::<Stats>(&id)
                    .map_err(|e| self.error::<Stats>(format!("deleting {}", Stats::describe(&id)), e))?;
                self.del_row::<Names>(&id)?;
            }
            Key::Range(r) => self.del_row::<SourceRanges>(&r)?,
            Key::Service(k) => self.del_row::<Services>(&k)?,
            Key::Maglev(i) => {
                // An array has nothing to delete: the table is only forgotten.
                Maglev::rows_mut(self.cur).unset(&i);
                return Ok(());
            }
        }
        self.st.deletes += 1;
        Ok(())
    }

    /// `frontend <name>` of reverse-NAT id `id` (the desired name, else the
    /// current one, else the key).
    fn frontend_name(&self, desired: &MapContents, id: u16, k: &ServiceKey) -> String {
        let name = desired.names.get(&id).or(self.cur.names.get(&id));
        match name.and_then(|n| FrontendId::from_map(n).ok()) {
            Some(n) => format!("frontend {n}"),
            None => format!(
                "frontend {}:{}/{}",
                std::net::Ipv4Addr::from(addr_from_map(k.addr)),
                port_from_map(k.port),
                k.proto
            ),
        }
    }

    fn backend_name(&self, desired: &MapContents, id: u32) -> String {
        match desired.backends.get(&id).or(self.cur.backends.get(&id)) {
            Some(b) => format!(
                "backend {id} ({}:{})",
                std::net::Ipv4Addr::from(addr_from_map(b.addr)),
                port_from_map(b.port)
            ),
            None => format!("backend {id}"),
        }
    }

    /// Step 1: the frontends that keep fewer slots get their lower count.
    fn shrink(&mut self, desired: &MapContents) {
        let lower: Vec<_> = desired
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .filter_map(|(k, want)| {
                let have = self.cur.services.get(k)?;
                (want.count < have.count).then_some((*k, *want, *have))
            })
            .collect();
        for (k, want, have) in lower {
            let mut v = ServiceValue {
                count: want.count,
                ..have
            };
            // A Maglev table may name the backends that are about to go:
            // switch to the new table now if it can be written (it names
            // only backends the maps hold), else pick at random among the
            // remaining slots until step 4 writes it.
            if have.flags & svc_flags::MAGLEV != 0 {
                v.flags &= !svc_flags::MAGLEV;
                v.backend_id = 0;
                if want.flags & svc_flags::MAGLEV != 0 && self.maglev_writable(want.backend_id) {
                    let table = Entry::Maglev(want.backend_id);
                    let written = self.held(&table) == Held::Same || self.put(&table).is_ok();
                    if written {
                        v.flags |= svc_flags::MAGLEV;
                        v.backend_id = want.backend_id;
                    }
                }
            }
            if let Err(e) = self.put(&Entry::Service(k, v)) {
                let name = self.frontend_name(desired, v.rev_nat_id, &k);
                self.fail(name, e);
            }
        }
    }

    /// Whether the desired Maglev table `index` names only backends the maps
    /// hold already.
    fn maglev_writable(&self, index: u32) -> bool {
        self.tables
            .get(&index)
            .is_some_and(|t| t.iter().all(|id| self.cur.backends.contains_key(id)))
    }

    /// Steps 2 and 5: deletes the entries `desired` does not have that nothing
    /// in the maps refers to any more.
    fn delete_unused(&mut self, desired: &MapContents) {
        let gone = stale(&self.cur.services, &desired.services);
        let (slot0, slots): (Vec<_>, Vec<_>) = gone.into_iter().partition(|k| k.slot == 0);
        for k in slot0 {
            self.delete_service(desired, k);
        }
        for k in slots {
            let frontend = ServiceKey { slot: 0, ..k };
            let counted = self.cur.services.get(&frontend).is_some_and(|f| f.count >= k.slot);
            if !counted {
                self.delete_service(desired, k);
            }
        }
        let unused: Vec<SourceRange> = stale(&self.cur.source_ranges, &desired.source_ranges)
            .into_iter()
            .filter(|r| self.range_unused(desired, r.0))
            .collect();
        for r in unused {
            if let Err(e) = self.del(Key::Range(r)) {
                let name = format!("source ranges of reverse-NAT id {}", r.0);
                self.fail(name, e);
            }
        }
        // Backends the slots or a Maglev table in use name.
        let tables = maglev_tables_in_use(&self.cur.services);
        let named: BTreeSet<u32> = self
            .cur
            .services
            .iter()
            .filter(|(k, _)| k.slot > 0)
            .map(|(_, v)| v.backend_id)
            .chain(
                tables
                    .iter()
                    .filter_map(|i| self.cur.maglev.get(i))
                    .flat_map(|t| t.iter().copied()),
            )
            .collect();
        let unused = stale(&self.cur.backends, &desired.backends).into_iter();
        for id in unused.filter(|id| !named.contains(id)).collect::<Vec<_>>() {
            if let Err(e) = self.del(Key::Backend(id)) {
                let name = self.backend_name(desired, id);
                self.fail(name, e);
            }
        }
        let named = maglev_tables_in_use(&self.cur.services);
        let unused = stale(&self.cur.maglev, &desired.maglev).into_iter();
        for i in unused.filter(|i| !named.contains(i)).collect::<Vec<_>>() {
            let _ = self.del(Key::Maglev(i));
        }
        let carried: BTreeSet<u16> = self.cur.services.values().map(|v| v.rev_nat_id).collect();
        let unused = stale(&self.cur.revnat, &desired.revnat).into_iter();
        for id in unused.filter(|id| !carried.contains(id)).collect::<Vec<_>>() {
            if let Err(e) = self.del(Key::RevNat(id)) {
                self.fail(format!("reverse-NAT id {id}"), e);
            }
        }
    }

    fn delete_service(&mut self, desired: &MapContents, k: ServiceKey) {
        if let Err(e) = self.del(Key::Service(k)) {
            let id = self.cur.services.get(&k).map_or(0, |v| v.rev_nat_id);
            let name = self.frontend_name(desired, id, &k);
            self.fail(name, e);
        }
    }

    /// Whether the stale source ranges of reverse-NAT id `id` may go: no
    /// frontend filters with them, or its desired ranges are all in place
    /// and it still filters (so no allowed client is refused meanwhile).
    fn range_unused(&self, desired: &MapContents, id: u16) -> bool {
        let filters = |c: &MapContents| {
            c.services
                .iter()
                .any(|(k, v)| k.slot == 0 && v.rev_nat_id == id && v.flags & svc_flags::SOURCE_RANGES != 0)
        };
        let all_in = desired
            .source_ranges
            .iter()
            .filter(|r| r.0 == id)
            .all(|r| self.cur.source_ranges.contains(r));
        !filters(self.cur) || (filters(desired) && all_in)
    }

    /// Step 3: the id cursors. False when they could not be written: then no
    /// entry with a new id may be.
    fn cursors(&mut self, desired: &MapContents) -> bool {
        if self.cur.cursors == desired.cursors {
            return true;
        }
        match self.store.put_cursors(desired.cursors) {
            Ok(()) => {
                self.cur.cursors = desired.cursors;
                self.st.upserts += 1;
                true
            }
            Err(e) => {
                let e = self.error::<Config>("writing the id cursors".into(), e);
                self.fail("every new or changed frontend and backend".into(), e);
                false
            }
        }
    }

    /// Step 4 for one frontend (`k0`, `v0`: its slot 0).
    fn frontend(&mut self, desired: &MapContents, k0: &ServiceKey, v0: &ServiceValue) {
        // Its Maglev table first, whole, whatever the maps hold at that index
        // (an index freed by the allocator may still hold another set's
        // table): slot 0 names it only once it is there. The rest below.
        let (tables, entries): (Vec<Entry>, Vec<Entry>) = frontend_entries(desired, k0, v0)
            .into_iter()
            .partition(|e| matches!(e, Entry::Maglev(_)));
        for table in &tables {
            if self.held(table) != Held::Same {
                if let Err(e) = self.put(table) {
                    let name = self.frontend_name(desired, v0.rev_nat_id, k0);
                    self.fail(name, e);
                    return;
                }
            }
        }
        let mut added = Vec::new();
        let mut result = Ok(());
        let absent: Vec<Entry> = entries
            .iter()
            .filter(|e| self.held(e) == Held::Absent)
            .copied()
            .collect();
        for e in &absent {
            result = self.put(e);
            if result.is_err() {
                break;
            }
            added.push(e.key());
        }
        if result.is_err() {
            // Nothing refers to the additions yet (slot 0 is written last).
            for key in added.into_iter().rev() {
                let _ = self.del(key);
            }
        } else {
            let changed: Vec<Entry> = entries
                .iter()
                .filter(|e| self.held(e) == Held::Differs)
                .copied()
                .collect();
            result = changed.iter().try_for_each(|e| self.put(e));
        }
        if let Err(e) = result {
            let name = self.frontend_name(desired, v0.rev_nat_id, k0);
            self.fail(name, e);
        }
    }

    /// Step 4, last: backends no slot names (draining endpoints: established
    /// flows keep them).
    fn draining(&mut self, desired: &MapContents) {
        let named: BTreeSet<u32> = desired
            .services
            .iter()
            .filter(|(k, _)| k.slot > 0)
            .map(|(_, v)| v.backend_id)
            .collect();
        let changed = diff(&self.cur.backends, &desired.backends).into_iter();
        for (id, b) in changed.filter(|(id, _)| !named.contains(id)) {
            if let Err(err) = self.put(&Entry::Backend(id, b)) {
                let name = self.backend_name(desired, id);
                self.fail(name, err);
            }
        }
    }

    /// Step 6: flows of assignments that ended (`before` minus what the maps
    /// assign now). Last: the slots no longer name these backends, so no new
    /// flow can recreate what is forgotten here.
    fn forget(&mut self, before: &BTreeSet<Assignment>) {
        let gone: BTreeSet<_> = before.difference(&assignments(self.cur)).copied().collect();
        if gone.is_empty() {
            return;
        }
        match self.store.forget_flows(&gone) {
            Ok(f) => self.st.forgotten = f,
            Err(e) => {
                let e = WriteError {
                    map: "connection-tracking/affinity maps",
                    size_flag: None,
                    action: "forgetting their UDP flows and affinity".into(),
                    full: S::is_full(&e),
                    error: e.to_string(),
                };
                self.fail(format!("{} ended backend assignments", gone.len()), e);
            }
        }
    }
}

/// The entries frontend `k0` needs, in the order they may be written: the
/// backends its slots name, its reverse-NAT entry, its source ranges, its
/// slots, and its slot 0.
fn frontend_entries(desired: &MapContents, k0: &ServiceKey, v0: &ServiceValue) -> Vec<Entry> {
    let id = v0.rev_nat_id;
    let slots: Vec<(ServiceKey, ServiceValue)> = (1..=v0.count)
        .filter_map(|slot| {
            let k = ServiceKey { slot, ..*k0 };
            desired.services.get(&k).map(|v| (k, *v))
        })
        .collect();
    let backends: BTreeSet<u32> = slots.iter().map(|(_, v)| v.backend_id).collect();
    let mut out: Vec<Entry> = backends
        .iter()
        .filter_map(|b| desired.backends.get(b).map(|v| Entry::Backend(*b, *v)))
        .collect();
    if let Some(r) = desired.revnat.get(&id) {
        let name = desired.names.get(&id).copied().unwrap_or_default();
        out.push(Entry::RevNat(id, *r, name));
    }
    out.extend(
        desired
            .source_ranges
            .iter()
            .filter(|r| r.0 == id)
            .map(|r| Entry::Range(*r)),
    );
    out.extend(slots.into_iter().map(|(k, v)| Entry::Service(k, v)));
    if v0.flags & svc_flags::MAGLEV != 0 {
        // Before slot 0 switches to it.
        out.push(Entry::Maglev(v0.backend_id));
    }
    out.push(Entry::Service(*k0, *v0));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{any::Any, cell::RefCell, net::Ipv4Addr, rc::Rc};

    use ferry_common::{svc_flags, ServiceKey, ServiceValue};

    use super::*;
    use crate::{
        maps::{
            layout::{layout, Ids},
            table::{Opened, Rows},
        },
        translate::Frontend,
    };

    /// An in-memory map store that logs every write; the services map
    /// refuses new keys beyond its capacity, as a full BPF hash map does
    /// (updates of existing keys still work).
    #[derive(Clone, Default)]
    pub(crate) struct Fake {
        pub(crate) maps: Rc<RefCell<MapContents>>,
        log: Rc<RefCell<Vec<String>>>,
        services_cap: Rc<std::cell::Cell<Option<usize>>>,
        /// Writes after which the dataplane would have seen a frontend
        /// counting a missing slot, a slot naming a missing backend, a
        /// frontend without its reverse-NAT entry, or a Maglev frontend whose
        /// table is missing or names a missing backend (or was rewritten in
        /// use).
        pub(crate) violations: Rc<RefCell<Vec<String>>>,
        /// Entries removed from maps the dataplane writes: (map, key).
        cleared: Rc<RefCell<Vec<(&'static str, String)>>>,
    }

    impl Fake {
        fn check(&self, after: &str) {
            let m = self.maps.borrow();
            for (k, v) in m.services.iter().filter(|(k, _)| k.slot == 0) {
                let broken = (1..=v.count).any(|slot| {
                    m.services
                        .get(&ServiceKey { slot, ..*k })
                        .is_none_or(|s| !m.backends.contains_key(&s.backend_id))
                }) || !m.revnat.contains_key(&v.rev_nat_id)
                    || (v.flags & svc_flags::MAGLEV != 0
                        && m.maglev
                            .get(&v.backend_id)
                            .is_none_or(|t| t.is_empty() || t.iter().any(|id| !m.backends.contains_key(id))));
                if broken {
                    self.violations
                        .borrow_mut()
                        .push(format!("after {after}: frontend {}:{}", k.addr, k.port));
                }
            }
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("map full (E2BIG)")]
    pub(crate) struct Full;

    /// Whether a map holding `rows` (capacity `cap`) refuses `key`.
    fn refuses<K, V>(rows: &impl Rows<K, V>, key: &K, cap: Option<usize>) -> bool {
        cap.is_some_and(|cap| rows.row(key).is_none() && rows.keys_of().count() >= cap)
    }

    /// The line the fake logs for a write to map `name` (None: not logged).
    fn line(op: &str, name: &str, k: &dyn Any, v: Option<&dyn Any>) -> Option<String> {
        Some(match name {
            ferry_common::SERVICES_MAP => {
                let k = k.downcast_ref::<ServiceKey>()?;
                match v {
                    Some(v) => format!(
                        "{op} svc slot {} count {}",
                        k.slot,
                        v.downcast_ref::<ServiceValue>()?.count
                    ),
                    None => format!("{op} svc slot {}", k.slot),
                }
            }
            ferry_common::BACKENDS_MAP => format!("{op} backend {}", k.downcast_ref::<u32>()?),
            ferry_common::REVNAT_MAP => format!("{op} revnat {}", k.downcast_ref::<u16>()?),
            ferry_common::SRC_RANGES_MAP => {
                let (id, net) = k.downcast_ref::<crate::maps::SourceRange>()?;
                format!("{op} range {id}/{net}")
            }
            ferry_common::MAGLEV_MAP => format!("{op} maglev {}", k.downcast_ref::<u32>()?),
            _ => return None,
        })
    }

    impl MapStore for Fake {
        type Error = Full;
        fn is_full(_: &Full) -> bool {
            true
        }
        fn read_all(&self) -> Result<MapContents, Full> {
            let mut c = self.maps.borrow().clone();
            // As the kernel store: only the tables frontends name are read.
            let used = crate::maps::maglev_tables_in_use(&c.services);
            c.maglev.retain(|i, _| used.contains(i));
            Ok(c)
        }
        fn put<D: Synced>(&mut self, k: &D::Key, v: &D::Value) -> Result<(), Full> {
            if D::NAME == Services::NAME && refuses(D::rows(&self.maps.borrow()), k, self.services_cap.get()) {
                return Err(Full);
            }
            let line = line("put", D::NAME, k, Some(v as &dyn Any));
            if let Some(l) = &line {
                self.log.borrow_mut().push(l.clone());
            }
            if let Some(index) = (k as &dyn Any)
                .downcast_ref::<u32>()
                .filter(|_| D::NAME == Maglev::NAME)
            {
                let in_use = self
                    .maps
                    .borrow()
                    .services
                    .iter()
                    .any(|(k, v)| k.slot == 0 && v.flags & svc_flags::MAGLEV != 0 && v.backend_id == *index);
                if in_use {
                    self.violations
                        .borrow_mut()
                        .push(format!("Maglev table {index} rewritten while a frontend uses it"));
                }
            }
            D::rows_mut(&mut self.maps.borrow_mut()).set(*k, v.clone());
            self.check(line.as_deref().unwrap_or(D::NAME));
            Ok(())
        }
        fn del<D: Synced>(&mut self, k: &D::Key) -> Result<(), Full> {
            let line = line("del", D::NAME, k, None);
            if let Some(l) = &line {
                self.log.borrow_mut().push(l.clone());
            }
            D::rows_mut(&mut self.maps.borrow_mut()).unset(k);
            self.check(line.as_deref().unwrap_or(D::NAME));
            Ok(())
        }
        fn clear<D: Opened>(&mut self, k: &D::Key) -> Result<(), Full> {
            self.cleared.borrow_mut().push((D::NAME, format!("{k:?}")));
            Ok(())
        }
        fn put_cursors(&mut self, c: crate::maps::IdCursors) -> Result<(), Full> {
            self.log
                .borrow_mut()
                .push(format!("put cursors {}/{}", c.backend, c.revnat));
            self.maps.borrow_mut().cursors = c;
            Ok(())
        }
        fn forget_flows(
            &mut self,
            gone: &std::collections::BTreeSet<crate::maps::Assignment>,
        ) -> Result<Forgotten, Full> {
            for (rev, id, proto) in gone {
                self.log.borrow_mut().push(format!("forget flows {rev}/{id}/{proto}"));
            }
            Ok(Forgotten::default())
        }
    }

    /// `c` with the id cursors left out (they stay when every entry is gone).
    fn without_cursors(c: &MapContents) -> MapContents {
        MapContents {
            cursors: Default::default(),
            ..c.clone()
        }
    }

    /// The stats of a sync that wrote everything.
    fn ok(st: SyncStats) -> SyncStats {
        assert!(st.failed.is_empty(), "{:?}", st.failed);
        st
    }

    fn fe(backends: &[u8]) -> Frontend {
        fe_on(80, backends)
    }

    /// A ClusterIP frontend on `port` with backends 10.0.0.`b`:8080.
    fn fe_on(port: u16, backends: &[u8]) -> Frontend {
        let addrs = backends.iter().map(|b| Ipv4Addr::new(10, 0, 0, *b));
        Frontend::cluster_ip(
            crate::ids::ServiceId::new("default", "web"),
            Ipv4Addr::new(10, 96, 0, 10),
            port,
            addrs,
            8080,
        )
    }

    #[test]
    fn writes_only_the_difference_in_a_safe_order() {
        let fake = Fake::default();
        let mut s = Syncer::new(fake.clone()).unwrap();
        let mut ids = Ids::default();
        let st = ok(s.sync(&layout(&[fe(&[1, 2, 3])], &mut ids)));
        assert_eq!(
            st.upserts,
            1 + 3 + 1 + 4,
            "the id cursors, 3 backends, 1 revnat, 4 service entries"
        );
        let log = fake.log.borrow().clone();
        let pos = |p: &str| log.iter().position(|l| l.starts_with(p)).unwrap();
        assert_eq!(
            log[0], "put cursors 3/1",
            "the cursors before the ids they cover: {log:?}"
        );
        assert!(pos("put backend") < pos("put svc slot 1"), "{log:?}");
        assert!(
            log.iter().rposition(|l| l.starts_with("put svc slot 3")).unwrap() < pos("put svc slot 0"),
            "{log:?}"
        );

        // Nothing changed: nothing written.
        fake.log.borrow_mut().clear();
        let st = ok(s.sync(&layout(&[fe(&[1, 2, 3])], &mut ids)));
        assert_eq!((st.upserts, st.deletes), (0, 0));
        assert!(fake.log.borrow().is_empty());

        // One backend less: the count shrinks before its slot and backend go.
        let st = ok(s.sync(&layout(&[fe(&[1, 2])], &mut ids)));
        let log = fake.log.borrow().clone();
        assert_eq!(
            log,
            [
                "put svc slot 0 count 2",
                "del svc slot 3",
                "del backend 3",
                "forget flows 1/3/6"
            ],
            "{log:?}"
        );
        assert_eq!((st.upserts, st.deletes), (1, 2));
        assert_eq!(*fake.maps.borrow(), *s.current());

        // Service gone: frontend first, then slots, then backends and revnat.
        fake.log.borrow_mut().clear();
        ok(s.sync(&layout(&[], &mut ids)));
        let log = fake.log.borrow().clone();
        assert_eq!(log[0], "del svc slot 0", "{log:?}");
        let revnat = log.iter().position(|l| l.starts_with("del revnat")).unwrap();
        assert!(
            log[revnat + 1..].iter().all(|l| l.starts_with("forget flows")),
            "flows are forgotten last: {log:?}"
        );
        assert_eq!(log.iter().filter(|l| l.starts_with("forget")).count(), 2);
        assert_eq!(without_cursors(&fake.maps.borrow()), MapContents::default());
        assert_eq!(
            *fake.cleared.borrow(),
            [(ferry_common::SVC_STATS_MAP, "1".to_string())],
            "the freed reverse-NAT id's traffic counters go with it"
        );
    }

    #[test]
    fn a_backend_that_leaves_the_slots_but_keeps_draining_has_its_flows_forgotten() {
        let fake = Fake::default();
        let mut s = Syncer::new(fake.clone()).unwrap();
        let mut ids = Ids::default();
        ok(s.sync(&layout(&[fe(&[1, 2])], &mut ids)));
        fake.log.borrow_mut().clear();
        // .2 turns terminating: no slot, still a backend (established flows).
        let mut f = fe(&[1]);
        f.draining = fe(&[2]).backends;
        ok(s.sync(&layout(&[f], &mut ids)));
        let log = fake.log.borrow().clone();
        assert_eq!(
            log,
            ["put svc slot 0 count 1", "del svc slot 2", "forget flows 1/2/6"],
            "{log:?}"
        );
        assert_eq!(fake.maps.borrow().backends.len(), 2, "the backend stays");
    }

    /// A LoadBalancer frontend restricted to `ranges` (none: unrestricted).
    fn lb(ranges: &[&str]) -> Frontend {
        let mut f = fe(&[1]);
        f.addr = Ipv4Addr::new(203, 0, 113, 20).into();
        f.flags = svc_flags::LOAD_BALANCER;
        if !ranges.is_empty() {
            f.flags |= svc_flags::SOURCE_RANGES;
        }
        f.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
        f
    }

    #[test]
    fn source_ranges_are_added_before_the_flag_and_removed_after_it() {
        let fake = Fake::default();
        let mut s = Syncer::new(fake.clone()).unwrap();
        let mut ids = Ids::default();
        ok(s.sync(&layout(&[lb(&[])], &mut ids)));
        // Restricting: the entries exist before the frontend asks for them.
        fake.log.borrow_mut().clear();
        ok(s.sync(&layout(&[lb(&["10.1.0.0/16", "192.168.77.200/32"])], &mut ids)));
        let log = fake.log.borrow().clone();
        assert_eq!(
            log,
            [
                "put range 1/10.1.0.0/16",
                "put range 1/192.168.77.200/32",
                "put svc slot 0 count 1"
            ],
            "{log:?}"
        );
        // One range changes: the new one first, the old one after.
        fake.log.borrow_mut().clear();
        let st = ok(s.sync(&layout(&[lb(&["10.2.0.0/16", "192.168.77.200/32"])], &mut ids)));
        let log = fake.log.borrow().clone();
        assert_eq!(log, ["put range 1/10.2.0.0/16", "del range 1/10.1.0.0/16"], "{log:?}");
        assert_eq!((st.upserts, st.deletes), (1, 1));
        // Unrestricting: the flag goes before the entries.
        fake.log.borrow_mut().clear();
        ok(s.sync(&layout(&[lb(&[])], &mut ids)));
        let log = fake.log.borrow().clone();
        assert_eq!(
            log,
            [
                "put svc slot 0 count 1",
                "del range 1/10.2.0.0/16",
                "del range 1/192.168.77.200/32"
            ],
            "{log:?}"
        );
        // The Service goes away: nothing is left behind.
        ok(s.sync(&layout(&[lb(&["10.2.0.0/16"])], &mut ids)));
        ok(s.sync(&layout(&[], &mut ids)));
        assert_eq!(without_cursors(&fake.maps.borrow()), MapContents::default());
        assert_eq!(*s.current(), *fake.maps.borrow());
    }

    fn maglev(backends: &[u8]) -> Frontend {
        let mut f = fe(backends);
        f.flags |= svc_flags::MAGLEV;
        f
    }

    /// The backend address each entry of the Maglev table of the only
    /// frontend names.
    fn maglev_addrs(c: &MapContents) -> Vec<[u8; 4]> {
        let v0 = c.services.iter().find(|(k, _)| k.slot == 0).unwrap().1;
        assert_ne!(v0.flags & svc_flags::MAGLEV, 0);
        c.maglev[&v0.backend_id]
            .iter()
            .map(|id| ferry_common::addr_from_map(c.backends[id].addr))
            .collect()
    }

    #[test]
    fn a_changed_maglev_table_is_written_whole_at_a_fresh_index_before_its_frontend_switches() {
        let fake = Fake::default();
        let mut s = Syncer::new(fake.clone()).unwrap();
        let mut ids = Ids::default().with_maglev(251, 4);
        ok(s.sync(&layout(&[maglev(&[1, 2, 3])], &mut ids)));
        let log = fake.log.borrow().clone();
        let (table, slot0) = (
            log.iter().position(|l| l == "put maglev 0").expect("table 0 written"),
            log.iter().position(|l| l.starts_with("put svc slot 0")).unwrap(),
        );
        assert!(table < slot0, "{log:?}");
        let before = maglev_addrs(&fake.maps.borrow());
        assert_eq!(before.len(), 251);
        // Backend .3 leaves: a new table at index 1, then slot 0.
        fake.log.borrow_mut().clear();
        ok(s.sync(&layout(&[maglev(&[1, 2])], &mut ids)));
        let log = fake.log.borrow().clone();
        let (table, slot0) = (
            log.iter().position(|l| l == "put maglev 1").expect("table 1 written"),
            log.iter().position(|l| l.starts_with("put svc slot 0")).unwrap(),
        );
        assert!(table < slot0, "{log:?}");
        assert!(
            !log.iter().any(|l| l == "put maglev 0"),
            "the table in use is never rewritten: {log:?}"
        );
        let after = maglev_addrs(&fake.maps.borrow());
        // Entries of .1 and .2 (two thirds) mostly stay where they were.
        let kept = before.iter().zip(&after).filter(|(b, a)| b == a).count();
        assert!(kept >= 150, "{kept} of 251 entries kept");
        assert_eq!(
            s.current().maglev.keys().copied().collect::<Vec<_>>(),
            [1],
            "table 0 forgotten"
        );
        assert!(fake.violations.borrow().is_empty(), "{:?}", fake.violations.borrow());
        // A restarted agent finds the table and writes nothing.
        fake.log.borrow_mut().clear();
        let mut again = Syncer::new(fake.clone()).unwrap();
        let mut ids2 = Ids::from_contents(again.current(), 251, 4);
        let st = ok(again.sync(&layout(&[maglev(&[1, 2])], &mut ids2)));
        assert_eq!((st.upserts, st.deletes), (0, 0), "{:?}", fake.log.borrow());
        // Without backends the frontend needs no table; random again: none.
        ok(again.sync(&layout(&[maglev(&[])], &mut ids2)));
        assert!(again.current().maglev.is_empty());
        ok(again.sync(&layout(&[fe(&[1, 2])], &mut ids2)));
        assert!(again.current().maglev.is_empty());
        let v0 = *again.current().services.iter().find(|(k, _)| k.slot == 0).unwrap().1;
        assert_eq!((v0.flags & svc_flags::MAGLEV, v0.backend_id), (0, 0));
    }

    #[test]
    fn a_table_still_named_by_a_frontend_whose_switch_failed_is_never_given_to_another() {
        let fake = Fake::default();
        let mut s = Syncer::new(fake.clone()).unwrap();
        let mut ids = Ids::default().with_maglev(251, 2);
        ok(s.sync(&layout(&[maglev(&[1, 2, 3])], &mut ids)));
        let a_table = |c: &MapContents| {
            c.services
                .iter()
                .find(|(k, _)| k.slot == 0 && k.port == ferry_common::port_to_map(80))
                .map(|(_, v)| v.backend_id)
        };
        assert_eq!(a_table(s.current()), Some(0));
        // A grows a slot while the services map is full: its switch to a new
        // table fails, and it keeps naming table 0, which the allocator has
        // freed (no desired frontend wants A's old backend set).
        fake.services_cap.set(Some(fake.maps.borrow().services.len()));
        let st = s.sync(&layout(&[maglev(&[1, 2, 3, 4])], &mut ids));
        assert!(!st.failed.is_empty(), "A could not switch");
        assert_eq!(a_table(s.current()), Some(0));
        // Another Service with Maglev gets index 0 from the allocator (the
        // only free one): its table must not be written over A's.
        fake.services_cap.set(None);
        let mut c = maglev(&[5, 6]);
        c.port = 81;
        let st = s.sync(&layout(&[maglev(&[1, 2, 3, 4]), c.clone()], &mut ids));
        assert!(fake.violations.borrow().is_empty(), "{:?}", fake.violations.borrow());
        // Both converge once A has moved off table 0.
        let st2 = s.sync(&layout(&[maglev(&[1, 2, 3, 4]), c], &mut ids));
        assert!(fake.violations.borrow().is_empty(), "{:?}", fake.violations.borrow());
        assert!(
            st2.failed.is_empty(),
            "converged: {:?} (the sync before: {:?})",
            st2.failed,
            st.failed
        );
        let tables: BTreeSet<u32> = crate::maps::maglev_tables_in_use(&s.current().services);
        assert_eq!(tables.len(), 2, "A and C each on a table of their own: {tables:?}");
        // And each table names exactly its own frontend's backends, also
        // after the sync in which C first wanted index 0.
        let m = s.current();
        for (k, v) in m
            .services
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.flags & svc_flags::MAGLEV != 0)
        {
            let slots: BTreeSet<u32> = (1..=v.count)
                .map(|slot| m.services[&ServiceKey { slot, ..*k }].backend_id)
                .collect();
            let named: BTreeSet<u32> = m.maglev[&v.backend_id].iter().copied().collect();
            assert_eq!(named, slots, "port {}", ferry_common::port_from_map(k.port));
        }
    }

    #[test]
    fn frontends_with_the_same_backends_share_a_table_and_full_tables_fall_back_to_random() {
        let fake = Fake::default();
        let mut s = Syncer::new(fake.clone()).unwrap();
        let mut ids = Ids::default().with_maglev(251, 2);
        let mut np = maglev(&[1, 2]);
        np.addr = Ipv4Addr::new(192, 168, 77, 11).into();
        np.port = 30080;
        np.flags = svc_flags::NODE_PORT | svc_flags::MAGLEV;
        let other = |port, b: &[u8]| {
            let mut f = maglev(b);
            f.port = port;
            f
        };
        let c = layout(&[maglev(&[1, 2]), np, other(81, &[3]), other(82, &[4])], &mut ids);
        assert_eq!(c.maglev.len(), 2, "two distinct backend sets, two tables");
        let random: Vec<_> = c
            .services
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.flags & svc_flags::MAGLEV == 0)
            .collect();
        assert_eq!(random.len(), 1, "the third set found no free table: {random:?}");
        ok(s.sync(&c));
        assert!(fake.violations.borrow().is_empty(), "{:?}", fake.violations.borrow());
    }

    #[test]
    fn starts_from_what_the_maps_hold() {
        let fake = Fake::default();
        let mut ids = Ids::default();
        let desired = layout(&[fe(&[1, 2])], &mut ids);
        ok(Syncer::new(fake.clone()).unwrap().sync(&desired));
        // A restarted agent: same desired state, no writes at all.
        fake.log.borrow_mut().clear();
        let mut again = Syncer::new(fake.clone()).unwrap();
        let mut ids2 = Ids::from_contents(
            again.current(),
            ferry_common::DEFAULT_MAGLEV_TABLE_SIZE,
            ferry_common::DEFAULT_MAGLEV_TABLES,
        );
        let st = ok(again.sync(&layout(&[fe(&[1, 2])], &mut ids2)));
        assert_eq!((st.upserts, st.deletes), (0, 0));
        assert!(fake.log.borrow().is_empty(), "{:?}", fake.log.borrow());
    }

    #[test]
    fn ids_freed_before_a_restart_are_not_handed_out_after_it() {
        let fake = Fake::default();
        let mut s = Syncer::new(fake.clone()).unwrap();
        let mut ids = Ids::default();
        let a = layout(&[fe_on(80, &[1, 2])], &mut ids);
        ok(s.sync(&a));
        ok(s.sync(&layout(&[], &mut ids)));
        // Restart: the maps hold no entry, only the cursors.
        let mut again = Syncer::new(fake.clone()).unwrap();
        let mut ids = Ids::from_contents(
            again.current(),
            ferry_common::DEFAULT_MAGLEV_TABLE_SIZE,
            ferry_common::DEFAULT_MAGLEV_TABLES,
        );
        let b = layout(&[fe_on(81, &[3, 4])], &mut ids);
        ok(again.sync(&b));
        let a_ids: BTreeSet<u32> = a.backends.keys().copied().collect();
        assert!(
            b.backends.keys().all(|id| !a_ids.contains(id)),
            "{a_ids:?} / {:?}",
            b.backends.keys()
        );
        assert!(
            b.revnat.keys().all(|id| !a.revnat.contains_key(id)),
            "{:?} / {:?}",
            a.revnat,
            b.revnat
        );
        assert_eq!(fake.maps.borrow().cursors, b.cursors);
    }

    /// The frontends' entries in the services map of `c`, by port.
    fn services_by_port(c: &MapContents) -> std::collections::BTreeMap<u16, usize> {
        let mut out = std::collections::BTreeMap::new();
        for k in c.services.keys() {
            *out.entry(ferry_common::port_from_map(k.port)).or_default() += 1;
        }
        out
    }

    /// An empty store whose services map holds `cap` entries, its syncer, and ids.
    fn with_services_cap(cap: usize) -> (Fake, Syncer<Fake>, Ids) {
        let fake = Fake::default();
        fake.services_cap.set(Some(cap));
        let s = Syncer::new(fake.clone()).unwrap();
        (fake, s, Ids::default())
    }

    #[test]
    fn a_nearly_full_services_map_converges_by_deleting_first() {
        let (fake, mut s, mut ids) = with_services_cap(8);
        ok(s.sync(&layout(&[fe_on(80, &[1, 2]), fe_on(81, &[3, 4])], &mut ids)));
        assert_eq!(fake.maps.borrow().services.len(), 6);
        // :80 goes, :82 (5 entries) comes: 6 + 5 > 8 unless :80 goes first.
        fake.log.borrow_mut().clear();
        let desired = layout(&[fe_on(81, &[3, 4]), fe_on(82, &[5, 6, 7, 8])], &mut ids);
        ok(s.sync(&desired));
        assert_eq!(fake.maps.borrow().services, desired.services);
        assert_eq!(*fake.maps.borrow(), *s.current());
        let log = fake.log.borrow().clone();
        let first_put = log.iter().position(|l| l.starts_with("put svc")).unwrap();
        let deleted_first = log[..first_put].iter().filter(|l| l.starts_with("del svc"));
        assert_eq!(deleted_first.count(), 3, "{log:?}");
        assert_eq!(*fake.violations.borrow(), Vec::<String>::new());
    }

    #[test]
    fn a_frontend_that_does_not_fit_is_named_and_the_rest_are_written() {
        let (fake, mut s, mut ids) = with_services_cap(8);
        ok(s.sync(&layout(&[fe_on(80, &[1, 2])], &mut ids)));
        // :80 changes a backend, :81 (7 entries) cannot fit, :82 (2) can.
        let frontends = [
            fe_on(80, &[1, 3]),
            fe_on(81, &[11, 12, 13, 14, 15, 16]),
            fe_on(82, &[21]),
        ];
        let desired = layout(&frontends, &mut ids);
        let st = s.sync(&desired);
        let failed: Vec<String> = st.failed.iter().map(ToString::to_string).collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            failed[0].starts_with("frontend default/web:81 (ClusterIP) not programmed: writing slot ")
                && failed[0].contains("in the services map: the map is full (raise --services-map-size)"),
            "{failed:?}"
        );
        let m = fake.maps.borrow().clone();
        assert_eq!(services_by_port(&m), [(80, 3), (82, 2)].into(), "{m:?}");
        for port in [80, 82] {
            let mut want = desired.clone();
            want.services.retain(|k, _| ferry_common::port_from_map(k.port) == port);
            let have: std::collections::BTreeMap<_, _> = m
                .services
                .iter()
                .filter(|(k, _)| ferry_common::port_from_map(k.port) == port)
                .map(|(k, v)| (*k, *v))
                .collect();
            assert_eq!(have, want.services, ":{port} is written as desired");
        }
        assert_eq!(
            m.backends.len(),
            3,
            "the additions of :81 were taken back: {:?}",
            m.backends
        );
        assert_eq!(m, *s.current());
        assert_eq!(*fake.violations.borrow(), Vec::<String>::new());
        // Room made: the next sync writes :81.
        fake.services_cap.set(Some(16));
        ok(s.sync(&desired));
        assert_eq!(fake.maps.borrow().services, desired.services);
    }
}
