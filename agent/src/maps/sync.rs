//! Keeps the maps equal to the desired contents by writing only the difference,
//! in an order that never lets the dataplane see a slot naming a missing backend
//! or a frontend whose count exceeds its slots.
use std::time::{Duration, Instant};

use super::{assignments, Forgotten, MapContents, MapStore};

/// What one sync wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub upserts: usize,
    pub deletes: usize,
    /// UDP flows and affinity entries of assignments that ended.
    pub forgotten: Forgotten,
    pub duration: Duration,
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

    /// Writes the difference between the maps and `desired`.
    ///
    /// Order: 1) backends, reverse-NAT, names and source ranges that are new or
    /// changed; 2) backend slots (> 0); 3) frontends (slot 0, with the new
    /// count and flags); 4) slots and frontends no longer wanted; 5) source
    /// ranges, backends, reverse-NAT and names no longer wanted. So a frontend
    /// that gains `SOURCE_RANGES` finds its ranges already there, and one that
    /// loses it (or a range) stops filtering before its entries go: allowed
    /// clients are never dropped on the way. On error the maps hold a consistent
    /// mix of old and new, and the next sync (re-reading nothing; `current`
    /// tracks each write) continues.
    pub fn sync(&mut self, desired: &MapContents) -> Result<SyncStats, S::Error> {
        let start = Instant::now();
        let mut st = SyncStats::default();
        let before = assignments(&self.current);
        let cur = &mut self.current;
        // Before any entry that carries an id handed out since the last write.
        if cur.cursors != desired.cursors {
            self.store.put_cursors(desired.cursors)?;
            cur.cursors = desired.cursors;
            st.upserts += 1;
        }
        for (id, b) in &desired.backends {
            if cur.backends.get(id) != Some(b) {
                self.store.put_backend(*id, *b)?;
                cur.backends.insert(*id, *b);
                st.upserts += 1;
            }
        }
        for (id, r) in &desired.revnat {
            let name = desired
                .names
                .get(id)
                .copied()
                .unwrap_or(ferry_common::ServiceName::new(""));
            if cur.revnat.get(id) != Some(r) || cur.names.get(id) != Some(&name) {
                self.store.put_revnat(*id, *r, name)?;
                cur.revnat.insert(*id, *r);
                cur.names.insert(*id, name);
                st.upserts += 1;
            }
        }
        let new: Vec<_> = desired.source_ranges.difference(&cur.source_ranges).copied().collect();
        for r in new {
            self.store.put_source_range(r)?;
            cur.source_ranges.insert(r);
            st.upserts += 1;
        }
        for pass_slot0 in [false, true] {
            for (k, v) in desired
                .services
                .iter()
                .filter(|(k, _)| (k.slot == 0) == pass_slot0)
            {
                if cur.services.get(k) != Some(v) {
                    self.store.put_service(*k, *v)?;
                    cur.services.insert(*k, *v);
                    st.upserts += 1;
                }
            }
        }
        // Frontends first, then their slots, so no frontend points past its slots.
        let stale: Vec<_> = cur
            .services
            .keys()
            .filter(|k| !desired.services.contains_key(k))
            .copied()
            .collect();
        let (slot0, slots): (Vec<_>, Vec<_>) = stale.into_iter().partition(|k| k.slot == 0);
        for k in slot0.iter().chain(slots.iter()) {
            self.store.del_service(k)?;
            cur.services.remove(k);
            st.deletes += 1;
        }
        let stale: Vec<_> = cur.source_ranges.difference(&desired.source_ranges).copied().collect();
        for r in stale {
            self.store.del_source_range(r)?;
            cur.source_ranges.remove(&r);
            st.deletes += 1;
        }
        let stale: Vec<u32> = cur
            .backends
            .keys()
            .filter(|id| !desired.backends.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            self.store.del_backend(id)?;
            cur.backends.remove(&id);
            st.deletes += 1;
        }
        let stale: Vec<u16> = cur
            .revnat
            .keys()
            .filter(|id| !desired.revnat.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            self.store.del_revnat(id)?;
            cur.revnat.remove(&id);
            cur.names.remove(&id);
            st.deletes += 1;
        }
        // Last: the slots no longer name these backends, so no new flow can
        // recreate what is forgotten here.
        let gone: std::collections::BTreeSet<_> =
            before.difference(&assignments(cur)).copied().collect();
        if !gone.is_empty() {
            st.forgotten = self.store.forget_flows(&gone)?;
        }
        st.duration = start.elapsed();
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, convert::Infallible, net::Ipv4Addr, rc::Rc};

    use ferry_common::{
        svc_flags, Backend, RevNat, ServiceKey, ServiceName, ServiceValue, PROTO_TCP,
    };

    use super::*;
    use crate::{
        maps::layout::{layout, Ids},
        translate::{BackendSpec, Frontend},
    };

    /// An in-memory map store that logs every write.
    #[derive(Clone, Default)]
    struct Fake {
        maps: Rc<RefCell<MapContents>>,
        log: Rc<RefCell<Vec<String>>>,
    }

    impl MapStore for Fake {
        type Error = Infallible;
        fn read_all(&self) -> Result<MapContents, Infallible> {
            Ok(self.maps.borrow().clone())
        }
        fn put_service(&mut self, k: ServiceKey, v: ServiceValue) -> Result<(), Infallible> {
            self.log
                .borrow_mut()
                .push(format!("put svc slot {} count {}", k.slot, v.count));
            self.maps.borrow_mut().services.insert(k, v);
            Ok(())
        }
        fn del_service(&mut self, k: &ServiceKey) -> Result<(), Infallible> {
            self.log
                .borrow_mut()
                .push(format!("del svc slot {}", k.slot));
            self.maps.borrow_mut().services.remove(k);
            Ok(())
        }
        fn put_backend(&mut self, id: u32, v: Backend) -> Result<(), Infallible> {
            self.log.borrow_mut().push(format!("put backend {id}"));
            self.maps.borrow_mut().backends.insert(id, v);
            Ok(())
        }
        fn del_backend(&mut self, id: u32) -> Result<(), Infallible> {
            self.log.borrow_mut().push(format!("del backend {id}"));
            self.maps.borrow_mut().backends.remove(&id);
            Ok(())
        }
        fn put_revnat(&mut self, id: u16, v: RevNat, n: ServiceName) -> Result<(), Infallible> {
            self.log.borrow_mut().push(format!("put revnat {id}"));
            self.maps.borrow_mut().revnat.insert(id, v);
            self.maps.borrow_mut().names.insert(id, n);
            Ok(())
        }
        fn del_revnat(&mut self, id: u16) -> Result<(), Infallible> {
            self.log.borrow_mut().push(format!("del revnat {id}"));
            self.maps.borrow_mut().revnat.remove(&id);
            self.maps.borrow_mut().names.remove(&id);
            Ok(())
        }
        fn put_source_range(&mut self, r: crate::maps::SourceRange) -> Result<(), Infallible> {
            self.log.borrow_mut().push(format!("put range {}/{}", r.0, r.1));
            self.maps.borrow_mut().source_ranges.insert(r);
            Ok(())
        }
        fn del_source_range(&mut self, r: crate::maps::SourceRange) -> Result<(), Infallible> {
            self.log.borrow_mut().push(format!("del range {}/{}", r.0, r.1));
            self.maps.borrow_mut().source_ranges.remove(&r);
            Ok(())
        }
        fn put_cursors(&mut self, c: crate::maps::IdCursors) -> Result<(), Infallible> {
            self.log.borrow_mut().push(format!("put cursors {}/{}", c.backend, c.revnat));
            self.maps.borrow_mut().cursors = c;
            Ok(())
        }
        fn forget_flows(
            &mut self,
            gone: &std::collections::BTreeSet<crate::maps::Assignment>,
        ) -> Result<Forgotten, Infallible> {
            for (rev, id, proto) in gone {
                self.log
                    .borrow_mut()
                    .push(format!("forget flows {rev}/{id}/{proto}"));
            }
            Ok(Forgotten::default())
        }
    }

    /// `c` with the id cursors left out (they stay when every entry is gone).
    fn without_cursors(c: &MapContents) -> MapContents {
        MapContents { cursors: Default::default(), ..c.clone() }
    }

    fn fe(backends: &[u8]) -> Frontend {
        Frontend {
            name: "default/web:80".into(),
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: PROTO_TCP,
            flags: svc_flags::CLUSTER_IP,
            backends: backends
                .iter()
                .map(|b| BackendSpec {
                    addr: Ipv4Addr::new(10, 0, 0, *b),
                    port: 8080,
                    terminating: false,
                    local: false,
                })
                .collect(),
            draining: Vec::new(),
            affinity_timeout: 0,
            source_ranges: Vec::new(),
        }
    }

    #[test]
    fn writes_only_the_difference_in_a_safe_order() {
        let fake = Fake::default();
        let mut s = Syncer::new(fake.clone()).unwrap();
        let mut ids = Ids::default();
        let st = s.sync(&layout(&[fe(&[1, 2, 3])], &mut ids)).unwrap();
        assert_eq!(
            st.upserts,
            1 + 3 + 1 + 4,
            "the id cursors, 3 backends, 1 revnat, 4 service entries"
        );
        let log = fake.log.borrow().clone();
        let pos = |p: &str| log.iter().position(|l| l.starts_with(p)).unwrap();
        assert_eq!(log[0], "put cursors 3/1", "the cursors before the ids they cover: {log:?}");
        assert!(pos("put backend") < pos("put svc slot 1"), "{log:?}");
        assert!(
            log.iter()
                .rposition(|l| l.starts_with("put svc slot 3"))
                .unwrap()
                < pos("put svc slot 0"),
            "{log:?}"
        );

        // Nothing changed: nothing written.
        fake.log.borrow_mut().clear();
        let st = s.sync(&layout(&[fe(&[1, 2, 3])], &mut ids)).unwrap();
        assert_eq!((st.upserts, st.deletes), (0, 0));
        assert!(fake.log.borrow().is_empty());

        // One backend less: the count shrinks before its slot and backend go.
        let st = s.sync(&layout(&[fe(&[1, 2])], &mut ids)).unwrap();
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
        s.sync(&layout(&[], &mut ids)).unwrap();
        let log = fake.log.borrow().clone();
        assert_eq!(log[0], "del svc slot 0", "{log:?}");
        let revnat = log
            .iter()
            .position(|l| l.starts_with("del revnat"))
            .unwrap();
        assert!(
            log[revnat + 1..]
                .iter()
                .all(|l| l.starts_with("forget flows")),
            "flows are forgotten last: {log:?}"
        );
        assert_eq!(log.iter().filter(|l| l.starts_with("forget")).count(), 2);
        assert_eq!(without_cursors(&fake.maps.borrow()), MapContents::default());
    }

    #[test]
    fn a_backend_that_leaves_the_slots_but_keeps_draining_has_its_flows_forgotten() {
        let fake = Fake::default();
        let mut s = Syncer::new(fake.clone()).unwrap();
        let mut ids = Ids::default();
        s.sync(&layout(&[fe(&[1, 2])], &mut ids)).unwrap();
        fake.log.borrow_mut().clear();
        // .2 turns terminating: no slot, still a backend (established flows).
        let mut f = fe(&[1]);
        f.draining = fe(&[2]).backends;
        s.sync(&layout(&[f], &mut ids)).unwrap();
        let log = fake.log.borrow().clone();
        assert_eq!(
            log,
            [
                "put svc slot 0 count 1",
                "del svc slot 2",
                "forget flows 1/2/6"
            ],
            "{log:?}"
        );
        assert_eq!(fake.maps.borrow().backends.len(), 2, "the backend stays");
    }

    /// A LoadBalancer frontend restricted to `ranges` (none: unrestricted).
    fn lb(ranges: &[&str]) -> Frontend {
        let mut f = fe(&[1]);
        f.addr = Ipv4Addr::new(203, 0, 113, 20);
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
        s.sync(&layout(&[lb(&[])], &mut ids)).unwrap();
        // Restricting: the entries exist before the frontend asks for them.
        fake.log.borrow_mut().clear();
        s.sync(&layout(&[lb(&["10.1.0.0/16", "192.168.77.200/32"])], &mut ids)).unwrap();
        let log = fake.log.borrow().clone();
        assert_eq!(log, ["put range 1/10.1.0.0/16", "put range 1/192.168.77.200/32", "put svc slot 0 count 1"], "{log:?}");
        // One range changes: the new one first, the old one after.
        fake.log.borrow_mut().clear();
        let st = s.sync(&layout(&[lb(&["10.2.0.0/16", "192.168.77.200/32"])], &mut ids)).unwrap();
        let log = fake.log.borrow().clone();
        assert_eq!(log, ["put range 1/10.2.0.0/16", "del range 1/10.1.0.0/16"], "{log:?}");
        assert_eq!((st.upserts, st.deletes), (1, 1));
        // Unrestricting: the flag goes before the entries.
        fake.log.borrow_mut().clear();
        s.sync(&layout(&[lb(&[])], &mut ids)).unwrap();
        let log = fake.log.borrow().clone();
        assert_eq!(log, ["put svc slot 0 count 1", "del range 1/10.2.0.0/16", "del range 1/192.168.77.200/32"], "{log:?}");
        // The Service goes away: nothing is left behind.
        s.sync(&layout(&[lb(&["10.2.0.0/16"])], &mut ids)).unwrap();
        s.sync(&layout(&[], &mut ids)).unwrap();
        assert_eq!(without_cursors(&fake.maps.borrow()), MapContents::default());
        assert_eq!(*s.current(), *fake.maps.borrow());
    }

    #[test]
    fn starts_from_what_the_maps_hold() {
        let fake = Fake::default();
        let mut ids = Ids::default();
        let desired = layout(&[fe(&[1, 2])], &mut ids);
        Syncer::new(fake.clone()).unwrap().sync(&desired).unwrap();
        // A restarted agent: same desired state, no writes at all.
        fake.log.borrow_mut().clear();
        let mut again = Syncer::new(fake.clone()).unwrap();
        let mut ids2 = Ids::from_contents(again.current());
        let st = again.sync(&layout(&[fe(&[1, 2])], &mut ids2)).unwrap();
        assert_eq!((st.upserts, st.deletes), (0, 0));
        assert!(fake.log.borrow().is_empty(), "{:?}", fake.log.borrow());
    }
}
