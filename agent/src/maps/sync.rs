//! Keeps the maps equal to the desired contents by writing only the difference,
//! in an order that never lets the dataplane see a slot naming a missing backend
//! or a frontend whose count exceeds its slots.
use std::time::{Duration, Instant};

use super::{MapContents, MapStore};

/// What one sync wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub upserts: usize,
    pub deletes: usize,
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
    /// Order: 1) backends, reverse-NAT and names that are new or changed;
    /// 2) backend slots (> 0); 3) frontends (slot 0, with the new count);
    /// 4) slots and frontends no longer wanted; 5) backends, reverse-NAT and names no
    /// longer wanted. On error the maps hold a consistent mix of old and new, and
    /// the next sync (re-reading nothing; `current` tracks each write) continues.
    pub fn sync(&mut self, desired: &MapContents) -> Result<SyncStats, S::Error> {
        let start = Instant::now();
        let mut st = SyncStats::default();
        let cur = &mut self.current;
        for (id, b) in &desired.backends {
            if cur.backends.get(id) != Some(b) {
                self.store.put_backend(*id, *b)?;
                cur.backends.insert(*id, *b);
                st.upserts += 1;
            }
        }
        for (id, r) in &desired.revnat {
            let name = desired.names.get(id).copied().unwrap_or(ferry_common::ServiceName::new(""));
            if cur.revnat.get(id) != Some(r) || cur.names.get(id) != Some(&name) {
                self.store.put_revnat(*id, *r, name)?;
                cur.revnat.insert(*id, *r);
                cur.names.insert(*id, name);
                st.upserts += 1;
            }
        }
        for pass_slot0 in [false, true] {
            for (k, v) in desired.services.iter().filter(|(k, _)| (k.slot == 0) == pass_slot0) {
                if cur.services.get(k) != Some(v) {
                    self.store.put_service(*k, *v)?;
                    cur.services.insert(*k, *v);
                    st.upserts += 1;
                }
            }
        }
        // Frontends first, then their slots, so no frontend points past its slots.
        let stale: Vec<_> = cur.services.keys().filter(|k| !desired.services.contains_key(k)).copied().collect();
        let (slot0, slots): (Vec<_>, Vec<_>) = stale.into_iter().partition(|k| k.slot == 0);
        for k in slot0.iter().chain(slots.iter()) {
            self.store.del_service(k)?;
            cur.services.remove(k);
            st.deletes += 1;
        }
        let stale: Vec<u32> = cur.backends.keys().filter(|id| !desired.backends.contains_key(id)).copied().collect();
        for id in stale {
            self.store.del_backend(id)?;
            cur.backends.remove(&id);
            st.deletes += 1;
        }
        let stale: Vec<u16> = cur.revnat.keys().filter(|id| !desired.revnat.contains_key(id)).copied().collect();
        for id in stale {
            self.store.del_revnat(id)?;
            cur.revnat.remove(&id);
            cur.names.remove(&id);
            st.deletes += 1;
        }
        st.duration = start.elapsed();
        Ok(st)
    }
}
