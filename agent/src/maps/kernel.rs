//! The pinned BPF maps, through aya: one [`Table`] per map declared in
//! `defs`.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya::maps::{Map, MapData, MapError, PerCpuArray};
use ferry_common::{config, AffinityKey, CtKey, CtValue, RevNat, SvcStats, COUNTERS_MAP, PROTO_UDP};

pub use super::table::OpenError;
pub(crate) use super::table::{from_pin, ok_if_missing};
use super::{
    defs::{Affinity, Backends, Config, CtAny, Maglev, Names, RevNats, Services, SourceRanges, Stats},
    maglev_tables_in_use,
    table::{pinned, MapDef, Opened, Source, Synced, Table},
    Assignment, Forgotten, IdCursors, MapContents, MapStore,
};

use crate::ids::FrontendId;

/// The maps the agent writes (fields: see each declaration in `defs`).
pub struct KernelMaps {
    pub(super) services: Table<Services>,
    pub(super) backends: Table<Backends>,
    pub(super) revnat: Table<RevNats>,
    pub(super) names: Table<Names>,
    pub(super) src_ranges: Table<SourceRanges>,
    pub(super) maglev: Table<Maglev>,
    pub(super) config: Table<Config>,
    pub(super) stats: Table<Stats>,
    pub(super) ct_any: Table<CtAny>,
    pub(super) affinity: Table<Affinity>,
}

impl KernelMaps {
    pub fn open(mut src: Source<'_>) -> Result<Self, OpenError> {
        let src = &mut src;
        Ok(Self {
            services: Table::open(src)?,
            backends: Table::open(src)?,
            revnat: Table::open(src)?,
            names: Table::open(src)?,
            src_ranges: Table::open(src)?,
            maglev: Table::open(src)?,
            config: Table::open(src)?,
            stats: Table::open(src)?,
            ct_any: Table::open(src)?,
            affinity: Table::open(src)?,
        })
    }

    /// Takes the maps out of a loaded object (which pinned or reused them).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, OpenError> {
        Self::open(Source::Object(ebpf))
    }

    /// Opens the maps pinned under `dir` (inspection commands).
    pub fn from_pins(dir: &Path) -> Result<Self, OpenError> {
        Self::open(Source::Pins(dir))
    }
}

/// Removes every entry of `map` whose key and value `stale` picks; how many.
/// Entries may be evicted or added while we walk: read errors are skipped.
fn forget<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<MapData, K, V>,
    stale: impl Fn(&K, &V) -> bool,
) -> Result<usize, MapError> {
    let keys: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| stale(k, v))
        .map(|(k, _)| k)
        .collect();
    for k in &keys {
        ok_if_missing(map.remove(k))?;
    }
    Ok(keys.len())
}

impl MapStore for KernelMaps {
    type Error = MapError;

    /// E2BIG from a full hash map, ENOSPC from a full LPM trie.
    fn is_full(e: &MapError) -> bool {
        matches!(e, MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)))
    }

    fn read_all(&self) -> Result<MapContents, MapError> {
        let services = self.services.read()?;
        let settings = self.config.kernel()?;
        let setting = |i| settings.get(&i, 0);
        // Only the Maglev tables frontends name, with the table size in the
        // config array (none while it is 0).
        let m = setting(config::MAGLEV_TABLE_SIZE)?;
        let maglev = match self.maglev.kernel() {
            Ok(array) if m > 0 => array.read_tables(m, maglev_tables_in_use(&services))?,
            _ => BTreeMap::new(),
        };
        Ok(MapContents {
            maglev,
            services,
            backends: self.backends.read()?,
            revnat: self.revnat.read()?,
            names: self.names.read()?,
            source_ranges: self.src_ranges.read()?.into_keys().collect(),
            cursors: IdCursors {
                backend: setting(config::LAST_BACKEND_ID)?,
                revnat: setting(config::LAST_REVNAT_ID)?,
            },
        })
    }

    fn put<D: Synced>(&mut self, k: &D::Key, v: &D::Value) -> Result<(), MapError> {
        D::table(self).put(k, v)
    }

    fn del<D: Synced>(&mut self, k: &D::Key) -> Result<(), MapError> {
        D::table(self).del(k)
    }

    fn clear<D: Opened>(&mut self, k: &D::Key) -> Result<(), MapError> {
        D::table(self).del(k)
    }

    fn put_cursors(&mut self, c: IdCursors) -> Result<(), MapError> {
        self.config.put(&config::LAST_BACKEND_ID, &c.backend)?;
        self.config.put(&config::LAST_REVNAT_ID, &c.revnat)
    }

    fn forget_flows(&mut self, gone: &BTreeSet<Assignment>) -> Result<Forgotten, MapError> {
        let pairs: BTreeSet<(u16, u32)> = gone.iter().map(|(r, b, _)| (*r, *b)).collect();
        let udp: BTreeSet<(u16, u32)> = gone
            .iter()
            .filter(|(_, _, p)| *p == PROTO_UDP)
            .map(|(r, b, _)| (*r, *b))
            .collect();
        let mut out = Forgotten::default();
        if !udp.is_empty() {
            out.ct = forget(self.ct_any.kernel_mut()?, |k: &CtKey, v: &CtValue| {
                k.proto == PROTO_UDP && udp.contains(&(v.rev_nat_id, v.backend_id))
            })?;
        }
        out.affinity = forget(self.affinity.kernel_mut()?, |k: &AffinityKey, v| {
            pairs.contains(&(k.rev_nat_id, v.backend_id))
        })?;
        Ok(out)
    }
}

/// Connection-tracking entries pinned under `dir`, of both tables.
pub fn read_ct(dir: &Path) -> Result<Vec<(CtKey, CtValue)>, OpenError> {
    Ok(crate::ct::Tables::open(dir)?.read().0.into_iter().collect())
}

/// The reverse-NAT map pinned under `dir` (entries that vanish mid-walk are
/// skipped).
pub fn read_revnat(dir: &Path) -> Result<BTreeMap<u16, RevNat>, OpenError> {
    let revnat = pinned::<RevNats>(dir)?;
    Ok(revnat
        .kernel()
        .map_err(RevNats::error)?
        .iter()
        .filter_map(Result::ok)
        .collect())
}

/// The dataplane's counters, summed over CPUs, indexed by `ferry_common::Counter`.
pub fn read_counters(dir: &Path) -> Result<Vec<u64>, OpenError> {
    let data = from_pin(dir, COUNTERS_MAP)?;
    let arr: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|source| OpenError::Map {
            name: COUNTERS_MAP,
            source,
        })?;
    Ok(arr
        .iter()
        .map(|v| v.map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0))
        .collect())
}

/// Per-frontend traffic pinned under `dir`, summed over CPUs, by reverse-NAT id.
pub fn read_svc_stats_by_id(dir: &Path) -> Result<BTreeMap<u16, SvcStats>, OpenError> {
    pinned::<Stats>(dir)?.read().map_err(Stats::error)
}

/// Per-frontend traffic pinned under `dir`, summed over CPUs, with the
/// frontend's identity from the service-names map (None: no valid entry).
pub fn read_svc_stats(dir: &Path) -> Result<Vec<(Option<FrontendId>, SvcStats)>, OpenError> {
    let stats = read_svc_stats_by_id(dir)?;
    let names = pinned::<Names>(dir)?;
    let names = names.kernel().map_err(Names::error)?;
    Ok(stats
        .into_iter()
        .map(|(id, total)| {
            let name = names.get(&id, 0).ok().and_then(|n| FrontendId::from_map(&n).ok());
            (name, total)
        })
        .collect())
}
