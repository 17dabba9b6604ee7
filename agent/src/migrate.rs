//! Pinned maps that no longer match this build: before the loader reuses the
//! pins in the pin directory, every map the eBPF object declares is compared
//! with its pin (type, key size, value size, max_entries, flags). A pin that
//! differs is unpinned, so the loader creates the map anew; the entries of a
//! map that holds state (flows, the id cursors) are copied into the new map
//! when only its size changed. aya would reuse a pin of any shape otherwise.
//! A rewritten map whose ids flows refer to (the backends) is copied too when
//! its pin has an earlier layout this build knows how to read ([`CUT_VALUES`]).
use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapError, MapInfo, MapType};
use aya_obj::{generated::bpf_map_type, maps::PinningType};
use ferry_common::{
    AFFINITY_MAP, BACKENDS_MAP, BACKEND_LEGACY_SIZE, CONFIG_MAP, COUNTERS_MAP, CT_ANY_MAP, CT_TCP_MAP, FRAGS_MAP,
    FRONTEND_ADDRS_MAP, MAGLEV_MAP, NODE_ADDRS_MAP, REVNAT_MAP, SERVICES_MAP, SOCK_LB_SKIP_MAP, SOCK_REVNAT_MAP,
    SRC_RANGES_MAP, SVC_NAMES_MAP, SVC_STATS_MAP,
};

/// Maps the agent rewrites after every start, or statistics: a pin that does
/// not match is recreated empty.
pub const REWRITTEN: &[&str] = &[
    SERVICES_MAP,
    BACKENDS_MAP,
    REVNAT_MAP,
    SVC_NAMES_MAP,
    SRC_RANGES_MAP,
    NODE_ADDRS_MAP,
    COUNTERS_MAP,
    SVC_STATS_MAP,
    MAGLEV_MAP,
    SOCK_LB_SKIP_MAP,
];

/// Rewritten maps whose keys are ids that state refers to (connection
/// tracking and session affinity name backends by id), with value sizes of
/// earlier layouts that are this layout's value plus fields since dropped
/// from its end. A pin of such a layout is copied, each value cut to this
/// layout's size, instead of recreated empty: the agent reads the ids back
/// and keeps them, so tracked flows still find their backend (a UDP flow
/// whose backend id is gone would be balanced afresh, to another backend).
pub const CUT_VALUES: &[(&str, u32)] = &[(BACKENDS_MAP, BACKEND_LEGACY_SIZE)];

/// Maps that hold state nothing else has: flows (connection tracking, session
/// affinity, socket reverse NAT), the agent's id cursors (config) and the
/// addresses the frontend gate keeps for flows still tracked. A pin that
/// differs only in max_entries is copied into the new map; any other difference
/// loses the entries, with a warning. A map of the object in neither list is
/// treated as state.
pub const STATE: &[&str] = &[
    CT_TCP_MAP,
    CT_ANY_MAP,
    FRAGS_MAP,
    AFFINITY_MAP,
    SOCK_REVNAT_MAP,
    CONFIG_MAP,
    FRONTEND_ADDRS_MAP,
];

/// What a map looks like to the kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl Shape {
    fn of_pin(info: &MapInfo) -> Result<Self, MapError> {
        Ok(Self {
            map_type: info.map_type()?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// What the loader creates from the object's definition `map`, with the
    /// agent's max_entries override if any.
    fn of_object(map: &aya_obj::Map, max_entries: Option<u32>) -> Result<Self, MapError> {
        let map_type = bpf_map_type::try_from(map.map_type())
            .map_err(MapError::from)?
            .try_into()?;
        Ok(Self {
            map_type,
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: max_entries.unwrap_or(map.max_entries()),
            flags: map.map_flags(),
        })
    }

    /// How `self` (the pin) differs from `want`, for the log:
    /// `max_entries 1024 -> 4096, value_size 16 -> 24`.
    pub fn differences(&self, want: &Shape) -> String {
        let mut out = Vec::new();
        if self.map_type != want.map_type {
            out.push(format!("type {:?} -> {:?}", self.map_type, want.map_type));
        }
        for (field, old, new) in [
            ("key_size", self.key_size, want.key_size),
            ("value_size", self.value_size, want.value_size),
            ("max_entries", self.max_entries, want.max_entries),
            ("flags", self.flags, want.flags),
        ] {
            if old != new {
                out.push(format!("{field} {old} -> {new}"));
            }
        }
        out.join(", ")
    }

    /// Maps whose entries can be read and written key by key with one value
    /// buffer (not per-CPU).
    fn copyable(&self) -> bool {
        matches!(
            self.map_type,
            MapType::Hash | MapType::LruHash | MapType::Array | MapType::LpmTrie
        )
    }
}

/// What to do with a pinned map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migration {
    /// The pin matches: the loader reuses it.
    Reuse,
    /// Only max_entries differs and the entries are state: a new map, with as
    /// many of the old entries as fit.
    Copy,
    /// An earlier value layout of [`CUT_VALUES`]: a new map, with the old
    /// entries, values cut to the new size.
    CutValues,
    /// A new, empty map.
    Recreate,
}

/// The decision for a pin of `name` shaped `pinned` where this build expects `want`.
pub fn decide(name: &str, pinned: &Shape, want: &Shape) -> Migration {
    if pinned == want {
        return Migration::Reuse;
    }
    let same_but_value = Shape {
        value_size: want.value_size,
        max_entries: want.max_entries,
        ..*pinned
    } == *want;
    if same_but_value
        && pinned.value_size > want.value_size
        && pinned.copyable()
        && CUT_VALUES.contains(&(name, pinned.value_size))
    {
        return Migration::CutValues;
    }
    let same_layout = Shape {
        max_entries: want.max_entries,
        ..*pinned
    } == *want;
    if REWRITTEN.contains(&name) || !same_layout || !pinned.copyable() {
        Migration::Recreate
    } else {
        Migration::Copy
    }
}

/// Errors of the migration (each names the map and its pin).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("parsing the eBPF object: {0}")]
    Object(#[from] aya_obj::ParseError),
    #[error("map {name}: the object's definition: {source}")]
    Definition { name: String, source: Box<MapError> },
    #[error("map {name}: reading the pin {}: {source}", path.display())]
    Pin {
        name: String,
        path: PathBuf,
        source: Box<MapError>,
    },
    #[error("map {name}: unpinning {}: {source}", path.display())]
    Unpin {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
}

/// A pin taken out of the way whose entries go into the new map once the
/// loader has created it.
pub struct PendingCopy {
    name: String,
    old: MapData,
    pinned: Shape,
    want: Shape,
}

/// How a copy went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Copied {
    copied: u64,
    /// Entries that did not fit (or could not be written).
    lost: u64,
}

/// The shapes this build expects of the pinned maps of `object`: its
/// definitions with `max_entries` overridden as the loader will.
pub fn expected(object: &[u8], max_entries: &[(&str, u32)]) -> Result<BTreeMap<String, Shape>, MigrateError> {
    let obj = aya_obj::Object::parse(object)?;
    let overrides: BTreeMap<&str, u32> = max_entries.iter().copied().collect();
    obj.maps
        .iter()
        .filter(|(_, m)| m.pinning() == PinningType::ByName)
        .map(|(name, m)| {
            let shape = Shape::of_object(m, overrides.get(name.as_str()).copied()).map_err(|source| {
                MigrateError::Definition {
                    name: name.clone(),
                    source: Box::new(source),
                }
            })?;
            Ok((name.clone(), shape))
        })
        .collect()
}

/// Compares the pins in `dir` with `expected` and unpins those that differ
/// (logging what changed), and the maps `expected` does not have. Returns
/// the copies to finish with [`finish`] after the loader has created the new
/// maps.
pub fn prepare(dir: &Path, expected: &BTreeMap<String, Shape>) -> Result<Vec<PendingCopy>, MigrateError> {
    let mut copies = Vec::new();
    for (name, want) in expected {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let pin_error = |source| MigrateError::Pin {
            name: name.clone(),
            path: path.clone(),
            source: Box::new(source),
        };
        let pinned = MapInfo::from_pin(&path)
            .and_then(|i| Shape::of_pin(&i))
            .map_err(pin_error)?;
        let changes = pinned.differences(want);
        match decide(name, &pinned, want) {
            Migration::Reuse => continue,
            Migration::Recreate if REWRITTEN.contains(&name.as_str()) => {
                tracing::info!(map = %name, %changes, "recreating the pinned map (the agent rewrites its contents)");
            }
            Migration::Recreate => tracing::warn!(
                map = %name,
                %changes,
                "recreating the pinned map: its entries are lost (the layout changed, they cannot be copied)"
            ),
            how @ (Migration::Copy | Migration::CutValues) => {
                if how == Migration::CutValues {
                    tracing::info!(map = %name, %changes, "copying the pinned map into this build's layout (values cut, ids kept)");
                }
                let old = MapData::from_pin(&path).map_err(pin_error)?;
                copies.push(PendingCopy {
                    name: name.clone(),
                    old,
                    pinned,
                    want: *want,
                });
            }
        }
        unpin(name, &path)?;
    }
    remove_unknown(dir, expected)?;
    Ok(copies)
}

fn unpin(name: &str, path: &Path) -> Result<(), MigrateError> {
    fs::remove_file(path).map_err(|source| MigrateError::Unpin {
        name: name.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

/// Unpins the maps in `dir` this build does not declare (maps of another
/// version): nothing would use or ever free them otherwise. Only maps: links,
/// directories and other files stay.
fn remove_unknown(dir: &Path, expected: &BTreeMap<String, Shape>) -> Result<(), MigrateError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if expected.contains_key(&name) || MapInfo::from_pin(e.path()).is_err() {
            continue;
        }
        tracing::info!(map = %name, "unpinning a map this build does not have");
        unpin(&name, &e.path())?;
    }
    Ok(())
}

/// Copies the entries of the old maps into the new ones the loader pinned in
/// `dir`, as many as fit, and logs how many were copied and lost. The old
/// programs run on until the new ones are attached, and the flows they open
/// meanwhile (or whose second entry the walk had already passed) are in the
/// old maps only: the returned [`Migrated`] copies those after the swap
/// ([`Migrated::catch_up`]).
pub fn finish(dir: &Path, copies: Vec<PendingCopy>) -> Migrated {
    let mut swapped = Vec::new();
    for c in copies {
        let path = dir.join(&c.name);
        let new_map = match MapData::from_pin(&path) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(map = %c.name, "opening the new map at {}: {e}; the old entries are lost", path.display());
                continue;
            }
        };
        let done = copy_entries(
            &RawMap::new(c.old.fd().as_fd(), &c.pinned),
            &RawMap::new(new_map.fd().as_fd(), &c.want),
            Write::Any,
        );
        let (old, new) = (c.pinned.max_entries, c.want.max_entries);
        if c.pinned.value_size != c.want.value_size {
            tracing::info!(map = %c.name, copied = done.copied, lost = done.lost, "copied the pinned map's entries into this build's layout");
        } else if done.lost > 0 {
            tracing::warn!(map = %c.name, old, new, copied = done.copied, lost = done.lost, "resized the pinned map; entries that did not fit are lost");
        } else {
            tracing::info!(map = %c.name, old, new, copied = done.copied, "resized the pinned map; every entry copied");
        }
        if matches!(c.pinned.map_type, MapType::Hash | MapType::LruHash) && c.pinned.value_size == c.want.value_size {
            swapped.push((c, new_map));
        }
    }
    Migrated { maps: swapped }
}

/// Maps copied at load whose old instance the old programs may still write
/// until the new programs replace them.
#[derive(Default)]
pub struct Migrated {
    /// The copy (its old map) and the new map.
    maps: Vec<(PendingCopy, MapData)>,
}

impl Migrated {
    /// Once every program is swapped (nothing writes the old maps any more):
    /// copies the entries the old maps gained since [`finish`] walked them,
    /// each only where the new map has no entry for its key (the new
    /// programs' entry is newer), and lets the old maps go. Without it a flow
    /// opened during the swap loses its entries (both, or the one the walk
    /// had passed: then the backend's replies are no longer reverse-NATed).
    pub fn catch_up(self) {
        for (c, new) in self.maps {
            let done = copy_entries(
                &RawMap::new(c.old.fd().as_fd(), &c.pinned),
                &RawMap::new(new.fd().as_fd(), &c.want),
                Write::Missing,
            );
            tracing::info!(
                map = %c.name,
                copied = done.copied,
                lost = done.lost,
                "copied the entries the old programs made while the programs were swapped"
            );
        }
    }
}

/// How [`copy_entries`] writes an entry into the new map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    /// Every entry (the new map is fresh).
    Any,
    /// Only keys the new map does not have.
    Missing,
}

/// The load failed after [`prepare`]: the old maps of `copies` go back to
/// their pins (in place of any new map the loader pinned there).
pub fn restore(dir: &Path, copies: Vec<PendingCopy>) {
    for c in copies {
        let path = dir.join(&c.name);
        let _ = fs::remove_file(&path);
        match c.old.pin(&path) {
            Ok(()) => tracing::info!(map = %c.name, "the load failed; the old map is pinned again"),
            Err(e) => {
                tracing::warn!(map = %c.name, "the load failed and the old map could not be pinned again at {}: {e}", path.display())
            }
        }
    }
}

/// Copies the entries of `old` into `new` (same key size; a value of `new`
/// is the first bytes of one of `old`, see [`CUT_VALUES`]): at most
/// `new`'s max_entries (an LRU map would evict rather than refuse), visiting at
/// most `old`'s max_entries keys (a key deleted while we walk restarts the walk).
fn copy_entries(old: &RawMap, new: &RawMap, how: Write) -> Copied {
    let mut out = Copied::default();
    let mut key: Option<Vec<u8>> = None;
    let mut value = vec![0u8; old.value_size];
    // Never longer than the old value (a shorter one was decided only for
    // the layouts of CUT_VALUES).
    let new_len = new.value_size.min(old.value_size);
    for _ in 0..old.max_entries {
        let next = match old.next_key(key.as_deref()) {
            Ok(Some(k)) => k,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("walking the old map: {e}");
                break;
            }
        };
        match old.lookup(&next, &mut value) {
            Ok(true) if out.copied < u64::from(new.max_entries) => match new.update(&next, &value[..new_len], how) {
                Ok(()) => out.copied += 1,
                // Written by the new programs already (a Missing copy).
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    tracing::debug!("copying an entry: {e}");
                    out.lost += 1;
                }
            },
            Ok(true) => out.lost += 1,
            // Deleted (or expired) while we walk.
            Ok(false) => {}
            Err(e) => {
                tracing::debug!("reading an entry: {e}");
                out.lost += 1;
            }
        }
        key = Some(next);
    }
    out
}

/// A map read and written as bytes (aya's typed maps need the types at
/// compile time; a migration knows only the sizes).
struct RawMap<'a> {
    fd: BorrowedFd<'a>,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

/// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

impl<'a> RawMap<'a> {
    fn new(fd: BorrowedFd<'a>, shape: &Shape) -> Self {
        Self {
            fd,
            key_size: shape.key_size as usize,
            value_size: shape.value_size as usize,
            max_entries: shape.max_entries,
        }
    }

    /// One element command; `key` and `value` must hold the map's key and
    /// value sizes (checked).
    fn call(
        &self,
        cmd: libc::c_long,
        key: Option<&[u8]>,
        value: *mut u8,
        value_len: usize,
        flags: u64,
    ) -> io::Result<()> {
        let key_len = key.map_or(self.key_size, <[u8]>::len);
        let want = if cmd == BPF_MAP_GET_NEXT_KEY {
            self.key_size
        } else {
            self.value_size
        };
        if key_len != self.key_size || value_len != want {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer sizes differ from the map's",
            ));
        }
        let attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.map_or(0, |k| k.as_ptr() as u64),
            value: value as u64,
            flags,
        };
        // SAFETY: `attr` is a valid prefix of `union bpf_attr` for element
        // commands; the kernel reads `key_size` bytes at `key` (or none: a null
        // key asks for the first key) and reads or writes `want` bytes at
        // `value`, and both buffers have exactly those lengths (checked above).
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &attr as *const ElemAttr, size_of::<ElemAttr>()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The key after `key` (the first one with None); None at the end.
    fn next_key(&self, key: Option<&[u8]>) -> io::Result<Option<Vec<u8>>> {
        let mut next = vec![0u8; self.key_size];
        match self.call(BPF_MAP_GET_NEXT_KEY, key, next.as_mut_ptr(), next.len(), 0) {
            Ok(()) => Ok(Some(next)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The value of `key` into `value`; false when there is none.
    fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        match self.call(BPF_MAP_LOOKUP_ELEM, Some(key), value.as_mut_ptr(), value.len(), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn update(&self, key: &[u8], value: &[u8], how: Write) -> io::Result<()> {
        let flags = match how {
            Write::Any => BPF_ANY,
            Write::Missing => BPF_NOEXIST,
        };
        // The kernel only reads the value of an update.
        self.call(
            BPF_MAP_UPDATE_ELEM,
            Some(key),
            value.as_ptr().cast_mut(),
            value.len(),
            flags,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(map_type: MapType, value_size: u32, max_entries: u32) -> Shape {
        Shape {
            map_type,
            key_size: 16,
            value_size,
            max_entries,
            flags: 0,
        }
    }

    #[test]
    fn state_is_copied_only_when_nothing_but_the_size_changed() {
        let want = shape(MapType::LruHash, 24, 4096);
        assert_eq!(decide(CT_ANY_MAP, &want, &want), Migration::Reuse);
        assert_eq!(
            decide(CT_ANY_MAP, &shape(MapType::LruHash, 24, 1024), &want),
            Migration::Copy
        );
        assert_eq!(
            decide(CT_ANY_MAP, &shape(MapType::LruHash, 16, 4096), &want),
            Migration::Recreate,
            "value layout"
        );
        assert_eq!(
            decide(CT_ANY_MAP, &shape(MapType::LruHash, 16, 1024), &want),
            Migration::Recreate,
            "layout and size"
        );
        assert_eq!(
            decide(CT_ANY_MAP, &shape(MapType::Hash, 24, 1024), &want),
            Migration::Recreate,
            "type"
        );
        let flags = Shape {
            flags: 1,
            ..shape(MapType::LruHash, 24, 1024)
        };
        assert_eq!(decide(CT_ANY_MAP, &flags, &want), Migration::Recreate, "flags");
        let per_cpu = shape(MapType::LruPerCpuHash, 24, 4096);
        assert_eq!(
            decide(
                "FERRY_NEW_STATE",
                &Shape {
                    max_entries: 1,
                    ..per_cpu
                },
                &per_cpu
            ),
            Migration::Recreate,
            "per-CPU values are not copied"
        );
        assert_eq!(
            decide("FERRY_NEW_STATE", &shape(MapType::LruHash, 24, 1024), &want),
            Migration::Copy,
            "unlisted: state"
        );
    }

    #[test]
    fn rewritten_maps_are_recreated_whatever_changed() {
        let want = shape(MapType::Hash, 16, 4096);
        assert_eq!(decide(SERVICES_MAP, &want, &want), Migration::Reuse);
        assert_eq!(
            decide(SERVICES_MAP, &shape(MapType::Hash, 16, 1024), &want),
            Migration::Recreate
        );
        let counters = shape(MapType::PerCpuArray, 8, 16);
        assert_eq!(
            decide(COUNTERS_MAP, &shape(MapType::PerCpuArray, 8, 8), &counters),
            Migration::Recreate
        );
    }

    #[test]
    fn backends_of_the_layout_with_node_addr_are_copied_values_cut() {
        let want = Shape {
            key_size: 4,
            ..shape(MapType::Hash, size_of::<ferry_common::Backend>() as u32, 4096)
        };
        let legacy = Shape {
            value_size: BACKEND_LEGACY_SIZE,
            ..want
        };
        assert_eq!(decide(BACKENDS_MAP, &legacy, &want), Migration::CutValues);
        let legacy_small = Shape {
            max_entries: 16,
            ..legacy
        };
        assert_eq!(decide(BACKENDS_MAP, &legacy_small, &want), Migration::CutValues);
        let other = Shape { value_size: 16, ..want };
        assert_eq!(
            decide(BACKENDS_MAP, &other, &want),
            Migration::Recreate,
            "an unknown layout"
        );
        let other_key = Shape { key_size: 8, ..legacy };
        assert_eq!(
            decide(BACKENDS_MAP, &other_key, &want),
            Migration::Recreate,
            "another key"
        );
        assert_eq!(
            decide(
                SERVICES_MAP,
                &Shape {
                    value_size: BACKEND_LEGACY_SIZE,
                    ..want
                },
                &want
            ),
            Migration::Recreate,
            "only the listed maps"
        );
    }

    #[test]
    fn differences_name_each_field() {
        let want = shape(MapType::LruHash, 24, 4096);
        assert_eq!(
            shape(MapType::LruHash, 16, 1024).differences(&want),
            "value_size 16 -> 24, max_entries 1024 -> 4096"
        );
        assert_eq!(
            shape(MapType::Hash, 24, 4096).differences(&want),
            "type Hash -> LruHash"
        );
    }

    /// Every pinned map of the dataplane object is in exactly one list, so a
    /// new map's author decides what a mismatch costs.
    #[test]
    fn every_pinned_map_of_the_object_is_listed_once() {
        let maps = expected(crate::dataplane::DATAPLANE_OBJ, &[]).unwrap();
        for name in maps.keys() {
            let n = REWRITTEN.contains(&name.as_str()) as u8 + STATE.contains(&name.as_str()) as u8;
            assert_eq!(
                n, 1,
                "{name} must be in exactly one of migrate::REWRITTEN and migrate::STATE"
            );
        }
        for name in REWRITTEN.iter().chain(STATE) {
            assert!(
                maps.contains_key(*name),
                "{name} is listed but the object has no pinned map of that name"
            );
        }
    }

    #[test]
    fn the_object_s_shapes_follow_the_overrides() {
        let maps = expected(crate::dataplane::DATAPLANE_OBJ, &[(CT_ANY_MAP, 1234)]).unwrap();
        let ct = maps[CT_ANY_MAP];
        assert_eq!(
            (ct.map_type, ct.key_size, ct.value_size, ct.max_entries),
            (MapType::LruHash, 16, 40, 1234)
        );
        assert_eq!(maps[CONFIG_MAP].max_entries, ferry_common::config::COUNT);
    }
}
