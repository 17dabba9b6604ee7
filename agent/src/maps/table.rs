//! One generic typed BPF table. A map is declared once ([`MapDef`], in
//! `defs`): its pinned name, its kind, its key and value types, how messages
//! name it and which flag sizes it. [`Table`] opens it (from the loaded
//! object or from its pin), reads, writes and deletes through it; [`Rows`]
//! and [`stale`]/[`diff`] compare its desired and current contents; [`Info`]
//! describes it to inspection.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    os::fd::AsFd as _,
    path::Path,
};

use aya::maps::{Map, MapData, MapError, MapType};

use super::{kernel::KernelMaps, MapContents};

/// What kind of BPF map a table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hash,
    LruHash,
    PerCpuHash,
    LpmTrie,
    Array,
}

impl Kind {
    pub fn map_type(self) -> MapType {
        match self {
            Kind::Hash => MapType::Hash,
            Kind::LruHash => MapType::LruHash,
            Kind::PerCpuHash => MapType::PerCpuHash,
            Kind::LpmTrie => MapType::LpmTrie,
            Kind::Array => MapType::Array,
        }
    }
}

/// Everything the agent knows about one BPF map. Its key and value types are
/// the agent's view (a source range, a whole Maglev table); its
/// [`MapDef::Kernel`] handle encodes them into `ferry_common`'s wire types.
pub trait MapDef: Sized + 'static {
    /// The pinned name (`ferry_common::*_MAP`, the eBPF static's name).
    const NAME: &'static str;
    const KIND: Kind;
    /// How messages name it: `services map`.
    const SHOWN: &'static str;
    /// The flag that sizes it, if one does.
    const SIZE_FLAG: Option<&'static str> = None;
    /// Pins of an older version may lack it: opened from pins without it,
    /// reads find it empty and writes fail naming it.
    const OPTIONAL: bool = false;
    /// The loader keeps its own handle on it (the node settings array): the
    /// agent takes a second one instead of taking it out of the object.
    const SHARED: bool = false;
    type Key: Ord + Copy + fmt::Debug + 'static;
    type Value: Clone + PartialEq + fmt::Debug + 'static;
    type Kernel: KernelMap<Self::Key, Self::Value>;
    /// An entry's key for messages: `slot 3`, `backend 7`.
    fn describe(k: &Self::Key) -> String;
    /// An error of this map, opening or reading it.
    fn error(source: MapError) -> OpenError {
        OpenError::Map {
            name: Self::NAME,
            source,
        }
    }
}

/// A map among the agent's handles ([`KernelMaps`]).
pub trait Opened: MapDef {
    fn table(maps: &mut KernelMaps) -> &mut Table<Self>;
}

/// A map the agent keeps equal to the desired state: where its rows are in
/// [`MapContents`] (so the sync and its test double need no per-map code).
pub trait Synced: Opened {
    type Rows: Rows<Self::Key, Self::Value> + fmt::Debug;
    fn rows(c: &MapContents) -> &Self::Rows;
    fn rows_mut(c: &mut MapContents) -> &mut Self::Rows;
}

/// A kernel map handle that stores `K → V` (encoding them as the map needs).
pub trait KernelMap<K, V>: Sized {
    fn open(map: Map) -> Result<Self, MapError>;
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError>;
    fn del(&mut self, k: &K) -> Result<(), MapError>;
}

/// A kernel map handle whose entries can be listed.
pub trait Readable<K, V> {
    /// Every entry (entries the agent never writes are skipped).
    fn read(&self) -> Result<Vec<(K, V)>, MapError>;
}

/// Hash and LRU hash maps: the wire types are the agent's.
impl<K: aya::Pod + Ord, V: aya::Pod> KernelMap<K, V> for aya::maps::HashMap<MapData, K, V> {
    fn open(map: Map) -> Result<Self, MapError> {
        Self::try_from(map)
    }
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError> {
        self.insert(k, v, 0)
    }
    fn del(&mut self, k: &K) -> Result<(), MapError> {
        self.remove(k)
    }
}

impl<K: aya::Pod, V: aya::Pod> Readable<K, V> for aya::maps::HashMap<MapData, K, V> {
    fn read(&self) -> Result<Vec<(K, V)>, MapError> {
        self.iter().collect()
    }
}

/// Per-CPU values that add up to one total.
pub trait Total: Copy + Default {
    fn add(self, other: Self) -> Self;
}

impl Total for ferry_common::SvcStats {
    fn add(self, o: Self) -> Self {
        Self {
            packets: self.packets + o.packets,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// Per-CPU hash maps, read and written as totals: writing sets the first
/// CPU's value and zeroes the others'.
impl<K: aya::Pod, V: aya::Pod + Total> KernelMap<K, V> for aya::maps::PerCpuHashMap<MapData, K, V> {
    fn open(map: Map) -> Result<Self, MapError> {
        Self::try_from(map)
    }
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::IoError(e))?;
        let values = (0..cpus)
            .map(|cpu| if cpu == 0 { *v } else { V::default() })
            .collect::<Vec<_>>();
        let values = aya::maps::PerCpuValues::try_from(values).map_err(MapError::IoError)?;
        self.insert(k, values, 0)
    }
    fn del(&mut self, k: &K) -> Result<(), MapError> {
        self.remove(k)
    }
}

impl<K: aya::Pod, V: aya::Pod + Total> Readable<K, V> for aya::maps::PerCpuHashMap<MapData, K, V> {
    /// Every key with its total over the CPUs. Entries the dataplane adds or
    /// removes meanwhile may be skipped.
    fn read(&self) -> Result<Vec<(K, V)>, MapError> {
        Ok(self
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| (k, per_cpu.iter().fold(V::default(), |a, v| a.add(*v))))
            .collect())
    }
}

/// Arrays of `u32` by index. An array's elements cannot be removed: deleting
/// one sets it to 0.
impl KernelMap<u32, u32> for aya::maps::Array<MapData, u32> {
    fn open(map: Map) -> Result<Self, MapError> {
        Self::try_from(map)
    }
    fn put(&mut self, k: &u32, v: &u32) -> Result<(), MapError> {
        self.set(*k, v, 0)
    }
    fn del(&mut self, k: &u32) -> Result<(), MapError> {
        self.set(*k, 0, 0)
    }
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

/// The map pinned as `name` under `dir`.
pub(crate) fn from_pin(dir: &Path, name: &'static str) -> Result<MapData, OpenError> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|source| OpenError::Pin {
        name,
        path: path.display().to_string(),
        source,
    })
}

/// Where tables are opened from.
pub enum Source<'a> {
    /// The loaded object (which pinned or reused the maps).
    Object(&'a mut aya::Ebpf),
    /// The pins under a directory (inspection commands).
    Pins(&'a Path),
}

/// A second handle on the object's map `name`, which stays in the object.
fn shared(ebpf: &aya::Ebpf, name: &'static str) -> Result<MapData, OpenError> {
    let err = |source| OpenError::Map { name, source };
    let data = match ebpf.map(name) {
        Some(Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) | Map::PerCpuHashMap(d)) => d,
        _ => return Err(OpenError::Missing(name)),
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| err(MapError::IoError(e)))?;
    MapData::from_fd(fd).map_err(err)
}

/// Removing what is already gone is fine.
pub(crate) fn ok_if_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The map declared by `D`, open (None: pins of an older version lack it).
pub struct Table<D: MapDef> {
    map: Option<D::Kernel>,
}

impl<D: MapDef> Table<D> {
    /// Opens the map; from pins, an [`MapDef::OPTIONAL`] one may be missing.
    pub fn open(src: &mut Source<'_>) -> Result<Self, OpenError> {
        let map = match src {
            Source::Object(ebpf) if D::SHARED => Map::from_map_data(shared(ebpf, D::NAME)?).map_err(D::error)?,
            Source::Object(ebpf) => ebpf.take_map(D::NAME).ok_or(OpenError::Missing(D::NAME))?,
            Source::Pins(dir) => match pinned::<D>(dir) {
                Err(OpenError::Pin { .. }) if D::OPTIONAL => return Ok(Self { map: None }),
                r => return r,
            },
        };
        Self::of(map)
    }

    fn of(map: Map) -> Result<Self, OpenError> {
        Ok(Self {
            map: Some(D::Kernel::open(map).map_err(D::error)?),
        })
    }

    /// The kernel handle; an error naming the map when its pin is missing.
    pub fn kernel(&self) -> Result<&D::Kernel, MapError> {
        self.map.as_ref().ok_or_else(|| not_pinned(D::NAME))
    }

    /// The kernel handle alone; an error naming the map when its pin is
    /// missing.
    pub fn into_kernel(self) -> Result<D::Kernel, OpenError> {
        self.map.ok_or_else(|| D::error(not_pinned(D::NAME)))
    }

    pub fn kernel_mut(&mut self) -> Result<&mut D::Kernel, MapError> {
        self.map.as_mut().ok_or_else(|| not_pinned(D::NAME))
    }

    pub fn put(&mut self, k: &D::Key, v: &D::Value) -> Result<(), MapError> {
        self.kernel_mut()?.put(k, v)
    }

    /// Deletes `k`; fine when it is gone already (or the map is).
    pub fn del(&mut self, k: &D::Key) -> Result<(), MapError> {
        match self.map.as_mut() {
            Some(m) => ok_if_missing(m.del(k)),
            None => Ok(()),
        }
    }
}

impl<D: MapDef> Table<D>
where
    D::Kernel: Readable<D::Key, D::Value>,
{
    /// Every entry (none when the pin is missing).
    pub fn read(&self) -> Result<BTreeMap<D::Key, D::Value>, MapError> {
        match &self.map {
            Some(m) => Ok(m.read()?.into_iter().collect()),
            None => Ok(BTreeMap::new()),
        }
    }
}

/// Opens `D` pinned under `dir` (missing: an error, also for an optional map).
pub fn pinned<D: MapDef>(dir: &Path) -> Result<Table<D>, OpenError> {
    Table::of(Map::from_map_data(from_pin(dir, D::NAME)?).map_err(D::error)?)
}

/// Writing through maps opened from pins that lack `name`.
fn not_pinned(name: &str) -> MapError {
    MapError::IoError(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("map {name} is not pinned (pins of an older version)"),
    ))
}

/// A table's contents in the agent's memory: a map, or a set (value `()`).
pub trait Rows<K, V> {
    fn row(&self, k: &K) -> Option<&V>;
    fn keys_of<'a>(&'a self) -> impl Iterator<Item = &'a K>
    where
        K: 'a;
    fn set(&mut self, k: K, v: V);
    fn unset(&mut self, k: &K);
}

impl<K: Ord, V> Rows<K, V> for BTreeMap<K, V> {
    fn row(&self, k: &K) -> Option<&V> {
        self.get(k)
    }
    fn keys_of<'a>(&'a self) -> impl Iterator<Item = &'a K>
    where
        K: 'a,
    {
        self.keys()
    }
    fn set(&mut self, k: K, v: V) {
        self.insert(k, v);
    }
    fn unset(&mut self, k: &K) {
        self.remove(k);
    }
}

impl<K: Ord> Rows<K, ()> for BTreeSet<K> {
    fn row(&self, k: &K) -> Option<&()> {
        self.contains(k).then_some(&())
    }
    fn keys_of<'a>(&'a self) -> impl Iterator<Item = &'a K>
    where
        K: 'a,
    {
        self.iter()
    }
    fn set(&mut self, k: K, (): ()) {
        self.insert(k);
    }
    fn unset(&mut self, k: &K) {
        self.remove(k);
    }
}

/// Whether the maps hold an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    Absent,
    Differs,
    Same,
}

/// Whether `cur` holds `k` with value `v`.
pub fn held<K, V: PartialEq>(cur: &impl Rows<K, V>, k: &K, v: &V) -> Held {
    match cur.row(k) {
        None => Held::Absent,
        Some(c) if c == v => Held::Same,
        Some(_) => Held::Differs,
    }
}

/// The keys `cur` holds and `desired` does not: what to delete.
pub fn stale<K: Copy, V>(cur: &impl Rows<K, V>, desired: &impl Rows<K, V>) -> Vec<K> {
    cur.keys_of().filter(|k| desired.row(k).is_none()).copied().collect()
}

/// The entries of `desired` that `cur` lacks or holds with another value:
/// what to put.
pub fn diff<K: Copy, V: Clone + PartialEq>(cur: &impl Rows<K, V>, desired: &impl Rows<K, V>) -> Vec<(K, V)> {
    desired
        .keys_of()
        .filter_map(|k| {
            let v = desired.row(k)?;
            (held(cur, k, v) != Held::Same).then(|| (*k, v.clone()))
        })
        .collect()
}

/// A map's declaration, for inspection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    pub name: &'static str,
    pub kind: Kind,
    pub shown: &'static str,
    pub size_flag: Option<&'static str>,
}

impl Info {
    pub const fn of<D: MapDef>() -> Self {
        Self {
            name: D::NAME,
            kind: D::KIND,
            shown: D::SHOWN,
            size_flag: D::SIZE_FLAG,
        }
    }

    /// The declaration of the map pinned as `name`, if the agent declares one.
    pub fn find(name: &str) -> Option<Self> {
        super::defs::ALL.iter().find(|i| i.name == name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_puts_what_is_missing_or_changed_and_stale_deletes_what_is_not_desired() {
        let cur: BTreeMap<u32, u8> = [(1, 1), (2, 2), (3, 3)].into();
        let want: BTreeMap<u32, u8> = [(2, 2), (3, 4), (5, 5)].into();
        assert_eq!(diff(&cur, &want), [(3, 4), (5, 5)]);
        assert_eq!(stale(&cur, &want), [1]);
        assert_eq!(
            [held(&cur, &2, &2), held(&cur, &3, &4), held(&cur, &5, &5)],
            [Held::Same, Held::Differs, Held::Absent]
        );
        // A set is a map to ().
        let cur: BTreeSet<u16> = [1, 2].into();
        let want: BTreeSet<u16> = [2, 3].into();
        assert_eq!(diff(&cur, &want), [(3, ())]);
        assert_eq!(stale(&cur, &want), [1]);
    }
}
