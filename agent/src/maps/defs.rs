//! The maps the agent opens, one declaration each (see `table`), with the
//! encoders of the maps whose kernel form is not the agent's: the
//! source-ranges trie (prefix keys) and the Maglev array (whole tables).
use std::{collections::BTreeMap, collections::BTreeSet, sync::Arc};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, Map, MapData, MapError, PerCpuHashMap,
};
use ferry_common::{
    addr_from_map, addr_to_map, AffinityKey, AffinityValue, Backend, CtKey, CtValue, RevNat, ServiceKey, ServiceName,
    ServiceValue, SrcRangeKey, SvcStats, AFFINITY_MAP, BACKENDS_MAP, CONFIG_MAP, CT_ANY_MAP, CT_TCP_MAP,
    FRONTEND_ADDRS_MAP, MAGLEV_MAP, REVNAT_MAP, SERVICES_MAP, SRC_RANGES_MAP, SRC_RANGE_ID_BITS, SVC_NAMES_MAP,
    SVC_STATS_MAP,
};
use ipnet::Ipv4Net;

use super::{
    kernel::KernelMaps,
    table::{Info, KernelMap, Kind, MapDef, Opened, Readable, Synced, Table},
    MapContents, SourceRange,
};

/// Where a declared map lives: its [`Table`] among the agent's handles
/// ([`KernelMaps`]) and, for a map the sync keeps in step, its rows in
/// [`MapContents`].
macro_rules! fields {
    ($def:ty: $table:ident) => {
        impl Opened for $def {
            fn table(m: &mut KernelMaps) -> &mut Table<Self> {
                &mut m.$table
            }
        }
    };
    ($def:ty: $table:ident, $rows:ident: $ty:ty) => {
        fields!($def: $table);
        impl Synced for $def {
            type Rows = $ty;
            fn rows(c: &MapContents) -> &$ty {
                &c.$rows
            }
            fn rows_mut(c: &mut MapContents) -> &mut $ty {
                &mut c.$rows
            }
        }
    };
}

/// Frontends (slot 0) and their backend slots.
pub struct Services;
impl MapDef for Services {
    const NAME: &'static str = SERVICES_MAP;
    const KIND: Kind = Kind::Hash;
    const SHOWN: &'static str = "services map";
    const SIZE_FLAG: Option<&'static str> = Some("--services-map-size");
    type Key = ServiceKey;
    type Value = ServiceValue;
    type Kernel = HashMap<MapData, ServiceKey, ServiceValue>;
    fn describe(k: &ServiceKey) -> String {
        format!("slot {}", k.slot)
    }
}
fields!(Services: services, services: BTreeMap<ServiceKey, ServiceValue>);

/// Backends by id.
pub struct Backends;
impl MapDef for Backends {
    const NAME: &'static str = BACKENDS_MAP;
    const KIND: Kind = Kind::Hash;
    const SHOWN: &'static str = "backends map";
    const SIZE_FLAG: Option<&'static str> = Some("--backends-map-size");
    type Key = u32;
    type Value = Backend;
    type Kernel = HashMap<MapData, u32, Backend>;
    fn describe(id: &u32) -> String {
        format!("backend {id}")
    }
}
fields!(Backends: backends, backends: BTreeMap<u32, Backend>);

/// Reverse NAT by reverse-NAT id (one per frontend).
pub struct RevNats;
impl MapDef for RevNats {
    const NAME: &'static str = REVNAT_MAP;
    const KIND: Kind = Kind::Hash;
    const SHOWN: &'static str = "reverse-NAT map";
    type Key = u16;
    type Value = RevNat;
    type Kernel = HashMap<MapData, u16, RevNat>;
    fn describe(id: &u16) -> String {
        format!("reverse-NAT id {id}")
    }
}
fields!(RevNats: revnat, revnat: BTreeMap<u16, RevNat>);

/// Frontend names by reverse-NAT id (for inspection and metrics).
pub struct Names;
impl MapDef for Names {
    const NAME: &'static str = SVC_NAMES_MAP;
    const KIND: Kind = Kind::Hash;
    const SHOWN: &'static str = "names map";
    type Key = u16;
    type Value = ServiceName;
    type Kernel = HashMap<MapData, u16, ServiceName>;
    fn describe(id: &u16) -> String {
        format!("the name of reverse-NAT id {id}")
    }
}
fields!(Names: names, names: BTreeMap<u16, ServiceName>);

/// loadBalancerSourceRanges: (reverse-NAT id, client prefix), a trie.
pub struct SourceRanges;
impl MapDef for SourceRanges {
    const NAME: &'static str = SRC_RANGES_MAP;
    const KIND: Kind = Kind::LpmTrie;
    const SHOWN: &'static str = "source-ranges map";
    const SIZE_FLAG: Option<&'static str> = Some("--src-ranges-map-size");
    const OPTIONAL: bool = true;
    type Key = SourceRange;
    type Value = ();
    type Kernel = LpmTrie<MapData, SrcRangeKey, u8>;
    fn describe((id, net): &SourceRange) -> String {
        format!("source range {net} of reverse-NAT id {id}")
    }
}
fields!(SourceRanges: src_ranges, source_ranges: BTreeSet<SourceRange>);

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

/// Source ranges as trie prefixes (value unused: 1).
impl KernelMap<SourceRange, ()> for LpmTrie<MapData, SrcRangeKey, u8> {
    fn open(map: Map) -> Result<Self, MapError> {
        Self::try_from(map)
    }
    fn put(&mut self, r: &SourceRange, (): &()) -> Result<(), MapError> {
        self.insert(&src_range_key(*r), 1, 0)
    }
    fn del(&mut self, r: &SourceRange) -> Result<(), MapError> {
        self.remove(&src_range_key(*r))
    }
}

impl Readable<SourceRange, ()> for LpmTrie<MapData, SrcRangeKey, u8> {
    fn read(&self) -> Result<Vec<(SourceRange, ())>, MapError> {
        self.keys()
            .filter_map(|k| k.map(|k| src_range_of(&k)).transpose())
            .map(|r| r.map(|r| (r, ())))
            .collect()
    }
}

/// Maglev tables: table `i` (its M backend ids) at elements `i*M..(i+1)*M`.
pub struct Maglev;
impl MapDef for Maglev {
    const NAME: &'static str = MAGLEV_MAP;
    const KIND: Kind = Kind::Array;
    const SHOWN: &'static str = "Maglev map";
    const SIZE_FLAG: Option<&'static str> = Some("--maglev-tables");
    const OPTIONAL: bool = true;
    type Key = u32;
    type Value = Arc<Vec<u32>>;
    type Kernel = MaglevArray;
    fn describe(i: &u32) -> String {
        format!("Maglev table {i}")
    }
}
fields!(Maglev: maglev, maglev: BTreeMap<u32, Arc<Vec<u32>>>);

/// The Maglev array, written and read a whole table at a time.
pub struct MaglevArray(Array<MapData, u32>);

impl MaglevArray {
    /// Tables `indices` of `m` entries each (indices beyond the array are
    /// skipped).
    pub fn read_tables(
        &self,
        m: u32,
        indices: impl IntoIterator<Item = u32>,
    ) -> Result<BTreeMap<u32, Arc<Vec<u32>>>, MapError> {
        let mut out = BTreeMap::new();
        for index in indices {
            let Some(base) = index
                .checked_mul(m)
                .filter(|b| b.checked_add(m).is_some_and(|end| end <= self.0.len()))
            else {
                continue;
            };
            let table = (base..base + m)
                .map(|i| self.0.get(&i, 0))
                .collect::<Result<Vec<u32>, _>>()?;
            out.insert(index, Arc::new(table));
        }
        Ok(out)
    }
}

impl KernelMap<u32, Arc<Vec<u32>>> for MaglevArray {
    fn open(map: Map) -> Result<Self, MapError> {
        Array::try_from(map).map(Self)
    }
    /// Writes the whole table `index`.
    fn put(&mut self, index: &u32, table: &Arc<Vec<u32>>) -> Result<(), MapError> {
        let base = index.checked_mul(table.len() as u32).ok_or(MapError::OutOfBounds {
            index: *index,
            max_entries: self.0.len(),
        })?;
        for (i, id) in table.iter().enumerate() {
            self.0.set(base + i as u32, id, 0)?;
        }
        Ok(())
    }
    /// Nothing to write: a table no frontend names is never read, and is
    /// written whole before a frontend names its index again.
    fn del(&mut self, _: &u32) -> Result<(), MapError> {
        Ok(())
    }
}

/// The node settings array, where the agent keeps the id cursors (the loader
/// writes the settings through its own handle).
pub struct Config;
impl MapDef for Config {
    const NAME: &'static str = CONFIG_MAP;
    const KIND: Kind = Kind::Array;
    const SHOWN: &'static str = "config map";
    const SHARED: bool = true;
    type Key = u32;
    type Value = u32;
    type Kernel = Array<MapData, u32>;
    fn describe(i: &u32) -> String {
        format!("setting {i}")
    }
}
fields!(Config: config);

/// Per-frontend traffic by reverse-NAT id (the dataplane counts; the agent
/// removes the entry of a freed id).
pub struct Stats;
impl MapDef for Stats {
    const NAME: &'static str = SVC_STATS_MAP;
    const KIND: Kind = Kind::PerCpuHash;
    const SHOWN: &'static str = "service stats map";
    const OPTIONAL: bool = true;
    type Key = u16;
    type Value = SvcStats;
    type Kernel = PerCpuHashMap<MapData, u16, SvcStats>;
    fn describe(id: &u16) -> String {
        format!("the traffic of reverse-NAT id {id}")
    }
}
fields!(Stats: stats);

/// The dataplane's connection tracking of UDP and other flows (the agent
/// forgets flows of ended assignments).
pub struct CtAny;
impl MapDef for CtAny {
    const NAME: &'static str = CT_ANY_MAP;
    const KIND: Kind = Kind::LruHash;
    const SHOWN: &'static str = "connection-tracking map";
    const SIZE_FLAG: Option<&'static str> = Some("--ct-any-map-size");
    type Key = CtKey;
    type Value = CtValue;
    type Kernel = HashMap<MapData, CtKey, CtValue>;
    fn describe(k: &CtKey) -> String {
        format!("flow {k:?}")
    }
}
fields!(CtAny: ct_any);

/// Session affinity (the agent forgets ended assignments).
pub struct Affinity;
impl MapDef for Affinity {
    const NAME: &'static str = AFFINITY_MAP;
    const KIND: Kind = Kind::LruHash;
    const SHOWN: &'static str = "affinity map";
    type Key = AffinityKey;
    type Value = AffinityValue;
    type Kernel = HashMap<MapData, AffinityKey, AffinityValue>;
    fn describe(k: &AffinityKey) -> String {
        format!("affinity {k:?}")
    }
}
fields!(Affinity: affinity);

/// The dataplane's connection tracking of TCP flows (its garbage collector
/// is `crate::ct`'s).
pub struct CtTcp;
impl MapDef for CtTcp {
    const NAME: &'static str = CT_TCP_MAP;
    const KIND: Kind = Kind::Hash;
    const SHOWN: &'static str = "TCP connection-tracking map";
    const SIZE_FLAG: Option<&'static str> = Some("--ct-map-size");
    type Key = CtKey;
    type Value = CtValue;
    type Kernel = HashMap<MapData, CtKey, CtValue>;
    fn describe(k: &CtKey) -> String {
        format!("flow {k:?}")
    }
}

/// The frontend gate's addresses (`super::gate`; the agent writes it
/// through its own handle, beside the sync).
pub struct FrontendAddrs;
impl MapDef for FrontendAddrs {
    const NAME: &'static str = FRONTEND_ADDRS_MAP;
    const KIND: Kind = Kind::Hash;
    const SHOWN: &'static str = "frontend addresses map";
    type Key = u32;
    type Value = u8;
    type Kernel = HashMap<MapData, u32, u8>;
    fn describe(a: &u32) -> String {
        format!("address {}", std::net::Ipv4Addr::from(addr_from_map(*a)))
    }
}

/// Every map declared here.
pub const ALL: [Info; 12] = [
    Info::of::<CtTcp>(),
    Info::of::<Services>(),
    Info::of::<Backends>(),
    Info::of::<RevNats>(),
    Info::of::<Names>(),
    Info::of::<SourceRanges>(),
    Info::of::<Maglev>(),
    Info::of::<Config>(),
    Info::of::<Stats>(),
    Info::of::<CtAny>(),
    Info::of::<Affinity>(),
    Info::of::<FrontendAddrs>(),
];

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

    #[test]
    fn every_declaration_matches_the_ebpf_object() {
        let object = crate::migrate::expected(crate::dataplane::DATAPLANE_OBJ, &[]).unwrap();
        for info in ALL {
            let shape = object
                .get(info.name)
                .unwrap_or_else(|| panic!("{} is not in the eBPF object", info.name));
            assert_eq!(shape.map_type, info.kind.map_type(), "{}", info.name);
        }
    }

    #[test]
    fn every_map_is_declared_once() {
        let names: BTreeSet<&str> = ALL.iter().map(|i| i.name).collect();
        assert_eq!(names.len(), ALL.len());
        assert_eq!(
            Info::find(SERVICES_MAP).and_then(|i| i.size_flag),
            Some("--services-map-size")
        );
        assert_eq!(Info::find("FERRY_NOPE"), None);
    }
}
