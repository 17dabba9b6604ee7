//! The pinned BPF maps, through aya.
use std::{collections::BTreeSet, os::fd::AsFd as _, path::Path};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
};
use ferry_common::{
    addr_from_map, addr_to_map, config, AffinityKey, AffinityValue, Backend, CtKey, CtValue, RevNat, ServiceKey,
    ServiceName, ServiceValue, SrcRangeKey, SvcStats, AFFINITY_MAP, BACKENDS_MAP, CONFIG_MAP, COUNTERS_MAP, CT_ANY_MAP,
    MAGLEV_MAP, PROTO_UDP, REVNAT_MAP, SERVICES_MAP, SRC_RANGES_MAP, SRC_RANGE_ID_BITS, SVC_NAMES_MAP, SVC_STATS_MAP,
};
use ipnet::Ipv4Net;

use crate::ids::FrontendId;

use super::{Assignment, Forgotten, IdCursors, MapContents, MapStore, SourceRange};

/// The maps the agent writes.
pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    revnat: HashMap<MapData, u16, RevNat>,
    names: HashMap<MapData, u16, ServiceName>,
    /// The dataplane's any-table (UDP flows), written by the agent only to
    /// forget flows; dead flows of both tables are the GC's (`crate::ct`).
    ct_any: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// Per-frontend traffic (the dataplane writes it; the agent removes the entry
    /// of a freed reverse-NAT id). None when pins from an older version lack it.
    stats: Option<PerCpuHashMap<MapData, u16, SvcStats>>,
    /// loadBalancerSourceRanges (value unused: 1). None only when inspecting
    /// pins of an older version that lack it.
    src_ranges: Option<LpmTrie<MapData, SrcRangeKey, u8>>,
    /// The node settings array, where the id cursors are kept (the agent's
    /// own handle: the dataplane writes the node settings through another).
    config: Array<MapData, u32>,
    /// Maglev tables. None only when inspecting pins of an older version.
    maglev: Option<Array<MapData, u32>>,
}

fn maglev_map(data: MapData) -> Result<Array<MapData, u32>, OpenError> {
    Array::try_from(Map::Array(data)).map_err(|source| OpenError::Map {
        name: MAGLEV_MAP,
        source,
    })
}

fn config_map(data: MapData) -> Result<Array<MapData, u32>, OpenError> {
    Array::try_from(Map::Array(data)).map_err(|source| OpenError::Map {
        name: CONFIG_MAP,
        source,
    })
}

/// A second handle on the object's config array.
fn config_of(ebpf: &aya::Ebpf) -> Result<Array<MapData, u32>, OpenError> {
    let Some(Map::Array(data)) = ebpf.map(CONFIG_MAP) else {
        return Err(OpenError::Missing(CONFIG_MAP));
    };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| OpenError::Map {
        name: CONFIG_MAP,
        source: MapError::IoError(e),
    })?;
    config_map(MapData::from_fd(fd).map_err(|source| OpenError::Map {
        name: CONFIG_MAP,
        source,
    })?)
}

fn src_ranges_map(data: MapData) -> Result<LpmTrie<MapData, SrcRangeKey, u8>, OpenError> {
    LpmTrie::try_from(Map::LpmTrie(data)).map_err(|source| OpenError::Map {
        name: SRC_RANGES_MAP,
        source,
    })
}

/// The trie key of a source range: the reverse-NAT id (and padding) matched
/// exactly, then the prefix.
fn src_range_key((rev_nat_id, net): SourceRange) -> Key<SrcRangeKey> {
    let data = SrcRangeKey {
        rev_nat_id,
        _pad: 0,
        addr: addr_to_map(net.network().octets()),
    };
    Key::new(SRC_RANGE_ID_BITS + u32::from(net.prefix_len()), data)
}

/// The source range of a trie key; None for a key no agent writes.
fn src_range_of(key: &Key<SrcRangeKey>) -> Option<SourceRange> {
    let len = key.prefix_len().checked_sub(SRC_RANGE_ID_BITS)?;
    let data = key.data();
    let net = Ipv4Net::new(addr_from_map(data.addr).into(), u8::try_from(len).ok()?).ok()?;
    Some((data.rev_nat_id, net.trunc()))
}

fn stats_map(data: MapData) -> Result<PerCpuHashMap<MapData, u16, SvcStats>, OpenError> {
    PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(|source| OpenError::Map {
        name: SVC_STATS_MAP,
        source,
    })
}

/// Errors opening maps.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {name} at {path}: {source} (is the agent running for this node? see --bpffs-dir)")]
    Pin {
        name: &'static str,
        path: String,
        source: MapError,
    },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
}

pub(crate) fn from_pin(dir: &Path, name: &'static str) -> Result<MapData, OpenError> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|source| OpenError::Pin {
        name,
        path: path.display().to_string(),
        source,
    })
}

fn hash<K: aya::Pod, V: aya::Pod>(name: &'static str, data: MapData) -> Result<HashMap<MapData, K, V>, OpenError> {
    HashMap::try_from(Map::HashMap(data)).map_err(|source| OpenError::Map { name, source })
}

fn lru<K: aya::Pod, V: aya::Pod>(name: &'static str, data: MapData) -> Result<HashMap<MapData, K, V>, OpenError> {
    HashMap::try_from(Map::LruHashMap(data)).map_err(|source| OpenError::Map { name, source })
}

impl KernelMaps {
    /// Takes the maps out of a loaded object (which pinned or reused them).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, OpenError> {
        let mut take = |name: &'static str| match ebpf.take_map(name) {
            Some(Map::HashMap(d)) => Ok(d),
            _ => Err(OpenError::Missing(name)),
        };
        let services = hash(SERVICES_MAP, take(SERVICES_MAP)?)?;
        let backends = hash(BACKENDS_MAP, take(BACKENDS_MAP)?)?;
        let revnat = hash(REVNAT_MAP, take(REVNAT_MAP)?)?;
        let names = hash(SVC_NAMES_MAP, take(SVC_NAMES_MAP)?)?;
        let stats = match ebpf.take_map(SVC_STATS_MAP) {
            Some(Map::PerCpuHashMap(d)) => Some(stats_map(d)?),
            _ => return Err(OpenError::Missing(SVC_STATS_MAP)),
        };
        let src_ranges = match ebpf.take_map(SRC_RANGES_MAP) {
            Some(Map::LpmTrie(d)) => Some(src_ranges_map(d)?),
            _ => return Err(OpenError::Missing(SRC_RANGES_MAP)),
        };
        let config = config_of(ebpf)?;
        let maglev = match ebpf.take_map(MAGLEV_MAP) {
            Some(Map::Array(d)) => Some(maglev_map(d)?),
            _ => return Err(OpenError::Missing(MAGLEV_MAP)),
        };
        let mut take_lru = |name: &'static str| match ebpf.take_map(name) {
            Some(Map::LruHashMap(d)) => Ok(d),
            _ => Err(OpenError::Missing(name)),
        };
        Ok(Self {
            config,
            maglev,
            services,
            backends,
            revnat,
            names,
            stats,
            src_ranges,
            ct_any: lru(CT_ANY_MAP, take_lru(CT_ANY_MAP)?)?,
            affinity: lru(AFFINITY_MAP, take_lru(AFFINITY_MAP)?)?,
        })
    }

    /// Opens the maps pinned under `dir` (inspection commands).
    pub fn from_pins(dir: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            services: hash(SERVICES_MAP, from_pin(dir, SERVICES_MAP)?)?,
            backends: hash(BACKENDS_MAP, from_pin(dir, BACKENDS_MAP)?)?,
            revnat: hash(REVNAT_MAP, from_pin(dir, REVNAT_MAP)?)?,
            names: hash(SVC_NAMES_MAP, from_pin(dir, SVC_NAMES_MAP)?)?,
            ct_any: lru(CT_ANY_MAP, from_pin(dir, CT_ANY_MAP)?)?,
            affinity: lru(AFFINITY_MAP, from_pin(dir, AFFINITY_MAP)?)?,
            stats: from_pin(dir, SVC_STATS_MAP).ok().map(stats_map).transpose()?,
            src_ranges: from_pin(dir, SRC_RANGES_MAP).ok().map(src_ranges_map).transpose()?,
            config: config_map(from_pin(dir, CONFIG_MAP)?)?,
            maglev: from_pin(dir, MAGLEV_MAP).ok().map(maglev_map).transpose()?,
        })
    }
}

/// Writing through maps opened from pins that lack `name`.
fn not_pinned(name: &str) -> MapError {
    MapError::IoError(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("map {name} is not pinned (pins of an older version)"),
    ))
}

fn no_src_ranges() -> MapError {
    not_pinned(SRC_RANGES_MAP)
}

impl KernelMaps {
    /// The Maglev tables the frontends of `services` name, read back with
    /// the table size in the config array (none while it is 0).
    fn read_maglev(
        &self,
        services: &std::collections::BTreeMap<ServiceKey, ServiceValue>,
    ) -> Result<std::collections::BTreeMap<u32, std::sync::Arc<Vec<u32>>>, MapError> {
        let mut out = std::collections::BTreeMap::new();
        let m = self.config.get(&config::MAGLEV_TABLE_SIZE, 0)?;
        let Some(map) = self.maglev.as_ref().filter(|_| m > 0) else {
            return Ok(out);
        };
        for index in super::maglev_tables_in_use(services) {
            let Some(base) = index
                .checked_mul(m)
                .filter(|b| b.checked_add(m).is_some_and(|end| end <= map.len()))
            else {
                continue;
            };
            let table = (base..base + m)
                .map(|i| map.get(&i, 0))
                .collect::<Result<Vec<u32>, _>>()?;
            out.insert(index, std::sync::Arc::new(table));
        }
        Ok(out)
    }
}

/// Removing what is already gone is fine.
fn ok_if_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl MapStore for KernelMaps {
    type Error = MapError;

    /// E2BIG from a full hash map, ENOSPC from a full LPM trie.
    fn is_full(e: &MapError) -> bool {
        matches!(e, MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)))
    }

    fn read_all(&self) -> Result<MapContents, MapError> {
        let services: std::collections::BTreeMap<ServiceKey, ServiceValue> =
            self.services.iter().collect::<Result<_, _>>()?;
        Ok(MapContents {
            maglev: self.read_maglev(&services)?,
            services,
            backends: self.backends.iter().collect::<Result<_, _>>()?,
            revnat: self.revnat.iter().collect::<Result<_, _>>()?,
            names: self.names.iter().collect::<Result<_, _>>()?,
            source_ranges: match &self.src_ranges {
                Some(t) => t
                    .keys()
                    .filter_map(|k| k.map(|k| src_range_of(&k)).transpose())
                    .collect::<Result<_, _>>()?,
                None => Default::default(),
            },
            cursors: IdCursors {
                backend: self.config.get(&config::LAST_BACKEND_ID, 0)?,
                revnat: self.config.get(&config::LAST_REVNAT_ID, 0)?,
            },
        })
    }
    fn put_maglev(&mut self, index: u32, table: &[u32]) -> Result<(), MapError> {
        let map = self.maglev.as_mut().ok_or_else(|| not_pinned(MAGLEV_MAP))?;
        let base = index.checked_mul(table.len() as u32).ok_or(MapError::OutOfBounds {
            index,
            max_entries: map.len(),
        })?;
        for (i, id) in table.iter().enumerate() {
            map.set(base + i as u32, id, 0)?;
        }
        Ok(())
    }
    fn put_cursors(&mut self, c: IdCursors) -> Result<(), MapError> {
        self.config.set(config::LAST_BACKEND_ID, c.backend, 0)?;
        self.config.set(config::LAST_REVNAT_ID, c.revnat, 0)
    }
    fn put_service(&mut self, k: ServiceKey, v: ServiceValue) -> Result<(), MapError> {
        self.services.insert(k, v, 0)
    }
    fn del_service(&mut self, k: &ServiceKey) -> Result<(), MapError> {
        ok_if_missing(self.services.remove(k))
    }
    fn put_backend(&mut self, id: u32, v: Backend) -> Result<(), MapError> {
        self.backends.insert(id, v, 0)
    }
    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        ok_if_missing(self.backends.remove(&id))
    }
    fn put_revnat(&mut self, id: u16, v: RevNat, name: ServiceName) -> Result<(), MapError> {
        self.revnat.insert(id, v, 0)?;
        self.names.insert(id, name, 0)
    }
    fn del_revnat(&mut self, id: u16) -> Result<(), MapError> {
        ok_if_missing(self.revnat.remove(&id))?;
        if let Some(stats) = self.stats.as_mut() {
            // A reused id starts counting from zero.
            ok_if_missing(stats.remove(&id))?;
        }
        ok_if_missing(self.names.remove(&id))
    }
    fn put_source_range(&mut self, r: SourceRange) -> Result<(), MapError> {
        self.src_ranges
            .as_mut()
            .ok_or_else(no_src_ranges)?
            .insert(&src_range_key(r), 1, 0)
    }
    fn del_source_range(&mut self, r: SourceRange) -> Result<(), MapError> {
        match self.src_ranges.as_mut() {
            Some(t) => ok_if_missing(t.remove(&src_range_key(r))),
            None => Ok(()),
        }
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
            // Entries may be evicted or added while we walk; skip read errors.
            let stale: Vec<CtKey> = self
                .ct_any
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, v)| k.proto == PROTO_UDP && udp.contains(&(v.rev_nat_id, v.backend_id)))
                .map(|(k, _)| k)
                .collect();
            for k in stale {
                ok_if_missing(self.ct_any.remove(&k))?;
                out.ct += 1;
            }
        }
        let stale: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| pairs.contains(&(k.rev_nat_id, v.backend_id)))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            ok_if_missing(self.affinity.remove(&k))?;
            out.affinity += 1;
        }
        Ok(out)
    }
}

/// Connection-tracking entries pinned under `dir`, of both tables.
pub fn read_ct(dir: &Path) -> Result<Vec<(CtKey, CtValue)>, OpenError> {
    Ok(crate::ct::Tables::open(dir)?.read().0.into_iter().collect())
}

/// The reverse-NAT map pinned under `dir`.
pub fn read_revnat(dir: &Path) -> Result<std::collections::BTreeMap<u16, RevNat>, OpenError> {
    let revnat: HashMap<MapData, u16, RevNat> = hash(REVNAT_MAP, from_pin(dir, REVNAT_MAP)?)?;
    Ok(revnat.iter().filter_map(Result::ok).collect())
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
pub fn read_svc_stats_by_id(dir: &Path) -> Result<std::collections::BTreeMap<u16, SvcStats>, OpenError> {
    let stats = stats_map(from_pin(dir, SVC_STATS_MAP)?)?;
    Ok(stats
        .iter()
        .filter_map(Result::ok)
        .map(|(id, per_cpu)| {
            let total = per_cpu.iter().fold(SvcStats::default(), |a, s| SvcStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
            });
            (id, total)
        })
        .collect())
}

/// Per-frontend traffic pinned under `dir`, summed over CPUs, with the
/// frontend's identity from the service-names map (None: no valid entry).
pub fn read_svc_stats(dir: &Path) -> Result<Vec<(Option<FrontendId>, SvcStats)>, OpenError> {
    let stats = read_svc_stats_by_id(dir)?;
    let names: HashMap<MapData, u16, ServiceName> = hash(SVC_NAMES_MAP, from_pin(dir, SVC_NAMES_MAP)?)?;
    Ok(stats
        .into_iter()
        .map(|(id, total)| {
            let name = names.get(&id, 0).ok().and_then(|n| FrontendId::from_map(&n).ok());
            (name, total)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_range_keys_round_trip_in_wire_order() {
        let r: SourceRange = (7, "192.168.77.0/24".parse().unwrap());
        let key = src_range_key(r);
        assert_eq!(key.prefix_len(), 32 + 24);
        let data = key.data();
        assert_eq!((data.rev_nat_id, data._pad), (7, 0));
        assert_eq!(
            data.addr.to_ne_bytes(),
            [192, 168, 77, 0],
            "the trie compares bytes in network order"
        );
        assert_eq!(src_range_of(&key), Some(r));
        assert_eq!(src_range_of(&Key::new(16, data)), None, "shorter than the id: not ours");
        assert_eq!(src_range_of(&Key::new(32 + 33, data)), None);
    }
}
