//! Pinned maps of another shape than this build's (an older version, other
//! flags) are migrated when the agent loads the dataplane: flow state copied
//! into a resized map, maps the agent rewrites recreated, and pins that match
//! reused as they are. Needs root (BPF) but no network namespace.
use std::{fs, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, MapInfo};
use aya_obj::generated::bpf_map_type;
use ferry_agent::{
    dataplane::{Config, Dataplane},
    maps::{IdCursors, MapStore as _},
};
use ferry_common::{
    addr_to_map, config, port_to_map, AffinityKey, AffinityValue, Backend, CtKey, CtValue, AFFINITY_MAP, BACKENDS_MAP,
    BACKEND_LEGACY_SIZE, CONFIG_MAP, COUNTERS_MAP, COUNTER_COUNT, CT_ANY_MAP, SERVICES_MAP, SVC_NAMES_MAP,
};
use ferry_tests::sys::PinDir;

/// Creates and pins a map `name` of the given shape in `dir`.
fn pin(dir: &Path, name: &str, map_type: bpf_map_type, key: u32, value: u32, max: u32) -> MapData {
    let def = aya_obj::Map::new_from_params(map_type as u32, key, value, max, 0);
    let data = MapData::create(def, name, None).unwrap_or_else(|e| panic!("creating {name}: {e}"));
    data.pin(dir.join(name))
        .unwrap_or_else(|e| panic!("pinning {name}: {e}"));
    data
}

fn info(dir: &Path, name: &str) -> MapInfo {
    MapInfo::from_pin(dir.join(name)).unwrap_or_else(|e| panic!("{name} is not pinned: {e}"))
}

fn ct_key(i: u32) -> CtKey {
    CtKey {
        saddr: i,
        daddr: 7,
        sport: 1000,
        dport: 80,
        proto: 6,
        dir: 0,
        _pad: [0; 2],
    }
}

fn ct(dir: &Path) -> HashMap<MapData, CtKey, CtValue> {
    HashMap::try_from(Map::LruHashMap(MapData::from_pin(dir.join(CT_ANY_MAP)).unwrap())).unwrap()
}

fn cfg(dir: &Path, ct_max: u32) -> Config {
    Config {
        bpffs_dir: dir.to_path_buf(),
        tc_attach: ferry_agent::dataplane::TcAttach::Auto,
        services_max: 64,
        backends_max: 64,
        ct: ferry_agent::ct::Sizes { tcp: 64, any: ct_max },
        src_ranges_max: 64,
        maglev: Default::default(),
    }
}

/// (name, map id) of every pinned map, sorted.
fn map_ids(dir: &Path) -> Vec<(String, u32)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            MapInfo::from_pin(e.path()).ok().map(|i| (name, i.id()))
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn pinned_maps_of_another_shape_are_migrated() {
    let dir = PinDir::new("migrate-test").expect("pin dir");
    let d = dir.0.as_path();

    // An older agent's pins: a small CT with 10 flows, an affinity map with a
    // value of another layout, a 4-entry config, 8 counters, 16 services, and
    // backends in the layout with a trailing node_addr (12 bytes).
    let backend = Backend {
        addr: addr_to_map([10, 244, 0, 7]),
        port: port_to_map(8080),
        proto: 6,
        flags: 1,
    };
    {
        let mut old_backends: HashMap<MapData, u32, [u8; 12]> = HashMap::try_from(Map::HashMap(pin(
            d,
            BACKENDS_MAP,
            bpf_map_type::BPF_MAP_TYPE_HASH,
            4,
            BACKEND_LEGACY_SIZE,
            16,
        )))
        .unwrap();
        let mut legacy = [0u8; 12];
        legacy[..4].copy_from_slice(&backend.addr.to_ne_bytes());
        legacy[4..6].copy_from_slice(&backend.port.to_ne_bytes());
        legacy[6] = backend.proto;
        legacy[7] = backend.flags;
        for id in [7, 4_000_000] {
            old_backends.insert(id, legacy, 0).unwrap();
        }
        let mut old_ct: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(pin(
            d,
            CT_ANY_MAP,
            bpf_map_type::BPF_MAP_TYPE_LRU_HASH,
            16,
            size_of::<CtValue>() as u32,
            32,
        )))
        .unwrap();
        for i in 0..10 {
            old_ct
                .insert(
                    ct_key(i),
                    CtValue {
                        backend_id: i,
                        ..Default::default()
                    },
                    0,
                )
                .unwrap();
        }
        let mut aff: HashMap<MapData, AffinityKey, u64> = HashMap::try_from(Map::LruHashMap(pin(
            d,
            AFFINITY_MAP,
            bpf_map_type::BPF_MAP_TYPE_LRU_HASH,
            8,
            8,
            32,
        )))
        .unwrap();
        aff.insert(
            AffinityKey {
                client: 1,
                rev_nat_id: 1,
                _pad: 0,
            },
            5,
            0,
        )
        .unwrap();
        let mut conf: Array<MapData, u32> = Array::try_from(Map::Array(pin(
            d,
            CONFIG_MAP,
            bpf_map_type::BPF_MAP_TYPE_ARRAY,
            4,
            4,
            4,
        )))
        .unwrap();
        conf.set(config::NODE_ADDR, 0x0a00_0001, 0).unwrap();
        pin(d, COUNTERS_MAP, bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 8);
        pin(d, SERVICES_MAP, bpf_map_type::BPF_MAP_TYPE_HASH, 12, 16, 16);
        // The service-names map of the versions that kept the name as text.
        let mut names: HashMap<MapData, u16, [u8; 128]> = HashMap::try_from(Map::HashMap(pin(
            d,
            SVC_NAMES_MAP,
            bpf_map_type::BPF_MAP_TYPE_HASH,
            2,
            128,
            16,
        )))
        .unwrap();
        let mut text = [0u8; 128];
        text[..28].copy_from_slice(b"default/web:http (ClusterIP)");
        names.insert(1, text, 0).unwrap();
        pin(d, "FERRY_GONE", bpf_map_type::BPF_MAP_TYPE_HASH, 4, 4, 4);
    }

    let (dp, maps) = Dataplane::load(&cfg(d, 128)).expect("loading the dataplane over the old pins");
    drop((dp, maps));
    assert!(
        !d.join("FERRY_GONE").exists(),
        "a map this build does not have is unpinned"
    );
    assert!(d.join("links").is_dir(), "only maps are unpinned");
    assert_eq!(
        info(d, CT_ANY_MAP).max_entries(),
        128,
        "CT resized to --ct-any-map-size"
    );
    let flows: Vec<_> = ct(d).iter().map(Result::unwrap).collect();
    assert_eq!(flows.len(), 10, "every flow copied: {flows:?}");
    assert!(flows.iter().all(|(k, v)| v.backend_id == k.saddr), "{flows:?}");
    let aff = info(d, AFFINITY_MAP);
    assert_eq!(
        aff.value_size() as usize,
        size_of::<AffinityValue>(),
        "affinity recreated with this build's layout"
    );
    let aff: HashMap<MapData, AffinityKey, AffinityValue> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(d.join(AFFINITY_MAP)).unwrap())).unwrap();
    assert_eq!(aff.keys().count(), 0, "entries of another layout are not copied");
    assert_eq!(info(d, CONFIG_MAP).max_entries(), config::COUNT);
    let conf: Array<MapData, u32> =
        Array::try_from(Map::Array(MapData::from_pin(d.join(CONFIG_MAP)).unwrap())).unwrap();
    assert_eq!(
        conf.get(&config::NODE_ADDR, 0).unwrap(),
        0x0a00_0001,
        "config entries copied"
    );
    assert_eq!(info(d, COUNTERS_MAP).max_entries(), COUNTER_COUNT, "counters recreated");
    assert_eq!(
        info(d, SVC_NAMES_MAP).value_size() as usize,
        size_of::<ferry_common::ServiceName>(),
        "the names map recreated with its typed layout"
    );
    let names: HashMap<MapData, u16, ferry_common::ServiceName> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(d.join(SVC_NAMES_MAP)).unwrap())).unwrap();
    assert_eq!(
        names.keys().count(),
        0,
        "old names are not copied (the agent rewrites them)"
    );
    assert_eq!(
        info(d, SERVICES_MAP).max_entries(),
        64,
        "services recreated at --services-map-size"
    );
    // The backends keep their ids (flows name them), in this build's layout.
    assert_eq!(info(d, BACKENDS_MAP).value_size() as usize, size_of::<Backend>());
    assert_eq!(info(d, BACKENDS_MAP).max_entries(), 64, "at --backends-map-size");
    let backends: HashMap<MapData, u32, Backend> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(d.join(BACKENDS_MAP)).unwrap())).unwrap();
    let mut copied: Vec<(u32, Backend)> = backends.iter().map(Result::unwrap).collect();
    copied.sort();
    assert_eq!(
        copied,
        vec![(7, backend), (4_000_000, backend)],
        "backends copied, ids kept"
    );

    // The same build and flags again: every pin is reused as it is.
    let before = map_ids(d);
    assert!(before.len() >= 10, "{before:?}");
    drop(Dataplane::load(&cfg(d, 128)).expect("second load"));
    assert_eq!(map_ids(d), before, "a restart with the same flags keeps every map");

    // The id cursors the agent keeps in the config array survive restarts.
    let (dp, mut maps) = Dataplane::load(&cfg(d, 128)).expect("third load");
    let cursors = IdCursors {
        backend: 4_000_000_000,
        revnat: 65_000,
    };
    maps.put_cursors(cursors).expect("writing the cursors");
    drop((dp, maps));

    // A smaller CT: as many flows as fit are copied.
    let (dp, maps) = Dataplane::load(&cfg(d, 4)).expect("fourth load");
    assert_eq!(maps.read_all().expect("reading the maps").cursors, cursors);
    drop((dp, maps));
    assert_eq!(info(d, CT_ANY_MAP).max_entries(), 4);
    assert_eq!(ct(d).keys().count(), 4, "4 of the 10 flows fit");
}

/// The previous agent's programs run on, on the old maps, until the new
/// programs are attached: a flow they open after the load copied the old map
/// (or whose second entry the copy had already walked past) reaches the new
/// map when the swap is done (`Dataplane::after_swap`), without overwriting
/// what the new programs wrote meanwhile.
#[tokio::test]
async fn flows_opened_while_the_programs_are_swapped_are_copied_after_the_swap() {
    let dir = PinDir::new("migrate-swap-test").expect("pin dir");
    let d = dir.0.as_path();
    let value = |backend_id| CtValue {
        backend_id,
        ..Default::default()
    };
    drop(Dataplane::load(&cfg(d, 64)).expect("the first agent's load"));
    // What the old programs hold on to: the map behind the pin.
    let mut old = ct(d);
    old.insert(ct_key(1), value(1), 0).unwrap();

    // The upgrade: a larger table, copied at load.
    let (mut dp, maps) = Dataplane::load(&cfg(d, 128)).expect("the upgrade's load");
    assert_eq!(info(d, CT_ANY_MAP).max_entries(), 128);
    let mut new = ct(d);
    assert_eq!(new.get(&ct_key(1), 0).unwrap().backend_id, 1, "copied at load");
    // Between the load and the swap: the old programs open a flow and
    // refresh one; a new program already tracks another under a key the
    // old map has too.
    old.insert(ct_key(2), value(2), 0).unwrap();
    old.insert(ct_key(3), value(3), 0).unwrap();
    new.insert(ct_key(3), value(30), 0).unwrap();
    assert!(new.get(&ct_key(2), 0).is_err(), "not in the new map before the swap");

    dp.after_swap().expect("after the swap");
    drop((dp, maps));
    let new = ct(d);
    assert_eq!(
        new.get(&ct_key(2), 0).unwrap().backend_id,
        2,
        "the flow opened during the swap"
    );
    assert_eq!(
        new.get(&ct_key(3), 0).unwrap().backend_id,
        30,
        "the new programs' entry is kept"
    );
    assert_eq!(new.get(&ct_key(1), 0).unwrap().backend_id, 1);
}
