//! A services map too small for every frontend, in the kernel: the sync writes
//! the frontends that fit, names the one that does not (the kernel's E2BIG
//! recognised as a full map) and leaves no part of it behind. Needs root (BPF)
//! but no network namespace.
use std::{collections::BTreeMap, net::Ipv4Addr};

use ferry_agent::{
    dataplane::{Config, Dataplane, MaglevConfig},
    ids::ServiceId,
    maps::{
        kernel::KernelMaps,
        layout::{layout, Ids},
        sync::Syncer,
        MapContents, MapStore as _,
    },
    translate::Frontend,
};
use ferry_common::{addr_from_map, port_from_map, svc_flags};
use ferry_tests::sys::PinDir;

/// A ClusterIP frontend 10.96.0.10:`port` with `n` backends.
fn frontend(port: u16, n: u8) -> Frontend {
    let addrs = (1..=n).map(|i| Ipv4Addr::new(10, 0, port as u8, i));
    Frontend::cluster_ip(
        ServiceId::new("default", "web"),
        Ipv4Addr::new(10, 96, 0, 10),
        port,
        addrs,
        8080,
    )
}

/// A small dataplane pinned in `dir`: `services_max` services-map entries.
fn config(dir: &PinDir, services_max: u32, maglev: MaglevConfig) -> Config {
    Config {
        bpffs_dir: dir.0.clone(),
        tc_attach: ferry_agent::dataplane::TcAttach::Auto,
        services_max,
        backends_max: 64,
        ct: ferry_agent::ct::Sizes { tcp: 1024, any: 1024 },
        src_ranges_max: 64,
        maglev,
    }
}

/// Entries of the services map by frontend port.
fn by_port(c: &MapContents) -> BTreeMap<u16, usize> {
    let mut out = BTreeMap::new();
    for k in c.services.keys() {
        *out.entry(port_from_map(k.port)).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn a_frontend_that_does_not_fit_the_kernel_map_is_named_and_the_rest_are_written() {
    let dir = PinDir::new("fullmap-test").expect("pin dir");
    let cfg = config(&dir, 8, MaglevConfig::default());
    let (_dp, maps) = Dataplane::load(&cfg).expect("loading the dataplane");
    let mut syncer = Syncer::new(maps).expect("reading the maps");
    let mut ids = Ids::from_contents(syncer.current(), cfg.maglev.table_size, cfg.maglev.tables);
    // 3 + 7 + 2 entries for a map of 8: :81 cannot fit.
    let desired = layout(&[frontend(80, 2), frontend(81, 6), frontend(82, 1)], &mut ids);
    let st = syncer.sync(&desired);
    let failed: Vec<String> = st.failed.iter().map(ToString::to_string).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].starts_with("frontend default/web:81 (ClusterIP) not programmed")
            && failed[0].contains("the map is full (raise --services-map-size)"),
        "{failed:?}"
    );
    let kernel = KernelMaps::from_pins(&dir.0)
        .expect("opening the pins")
        .read_all()
        .expect("reading the pins");
    assert_eq!(kernel, *syncer.current(), "the syncer knows what the kernel holds");
    assert_eq!(by_port(&kernel), [(80, 3), (82, 2)].into(), "{kernel:?}");
    assert_eq!(
        kernel.backends.len(),
        3,
        "the backends :81 added were taken back: {:?}",
        kernel.backends
    );
}

/// Maglev tables through the kernel's array: written at a fresh index before
/// the frontend switches, read back by a restarted agent (which then writes
/// nothing), and the map's size comes from the flags.
#[tokio::test]
async fn maglev_tables_round_trip_through_the_kernel_map() {
    let dir = PinDir::new("maglev-test").expect("pin dir");
    let maglev = MaglevConfig {
        table_size: 251,
        tables: 3,
    };
    let cfg = config(&dir, 64, maglev);
    let (dp, maps) = Dataplane::load(&cfg).expect("loading the dataplane");
    let mut syncer = Syncer::new(maps).expect("reading the maps");
    let mut ids = Ids::from_contents(syncer.current(), maglev.table_size, maglev.tables);
    let with_maglev = |n: u8| {
        let mut f = frontend(80, n);
        f.flags |= svc_flags::MAGLEV;
        f
    };
    for (n, index) in [(3, 0), (2, 1)] {
        let st = syncer.sync(&layout(&[with_maglev(n)], &mut ids));
        assert!(st.failed.is_empty(), "{:?}", st.failed);
        let kernel = KernelMaps::from_pins(&dir.0)
            .expect("opening the pins")
            .read_all()
            .expect("reading the pins");
        assert_eq!(kernel, *syncer.current(), "the syncer knows what the kernel holds");
        let slot0 = kernel.services.iter().find(|(k, _)| k.slot == 0).unwrap().1;
        assert_eq!(
            (slot0.flags & svc_flags::MAGLEV, slot0.backend_id),
            (svc_flags::MAGLEV, index)
        );
        let table = &kernel.maglev[&index];
        assert_eq!(table.len(), 251);
        let mut per_backend: BTreeMap<[u8; 4], usize> = BTreeMap::new();
        for id in table.iter() {
            *per_backend.entry(addr_from_map(kernel.backends[id].addr)).or_default() += 1;
        }
        assert_eq!(per_backend.len(), usize::from(n), "{per_backend:?}");
        assert!(
            per_backend.values().all(|c| c.abs_diff(251 / usize::from(n)) <= 1),
            "{per_backend:?}"
        );
    }
    let info = aya::maps::MapInfo::from_pin(dir.0.join(ferry_common::MAGLEV_MAP)).expect("the Maglev map's pin");
    assert_eq!(info.max_entries(), 3 * 251, "sized by the flags");
    // A restarted agent reads the table back and has nothing to write.
    drop(syncer);
    let mut again = Syncer::new(KernelMaps::from_pins(&dir.0).expect("pins")).expect("reading the maps");
    let mut ids = Ids::from_contents(again.current(), maglev.table_size, maglev.tables);
    let st = again.sync(&layout(&[with_maglev(2)], &mut ids));
    assert!(st.failed.is_empty(), "{:?}", st.failed);
    assert_eq!((st.upserts, st.deletes), (0, 0));
    // Another table size, the same map size (3 x 251 = 251 x 3: the pinned
    // array is reused): the old tables are zeroed, then rewritten whole.
    drop((again, dp));
    let cfg = Config {
        maglev: MaglevConfig {
            table_size: 3,
            tables: 251,
        },
        ..cfg
    };
    let (mut dp, maps) = Dataplane::load(&cfg).expect("loading the dataplane again");
    // Until the new programs are attached, the old ones (still attached in
    // a real node) index their own tables: they are told size 0, random.
    let told = || {
        KernelMaps::from_pins(&dir.0)
            .expect("pins")
            .read_all()
            .expect("reading the pins")
            .maglev
    };
    assert!(told().is_empty(), "no table size told before the programs are swapped");
    dp.after_swap().expect("telling the new size");
    let mut syncer = Syncer::new(maps).expect("reading the maps");
    let reused = aya::maps::MapInfo::from_pin(dir.0.join(ferry_common::MAGLEV_MAP)).expect("the Maglev map's pin");
    assert_eq!(reused.id(), info.id(), "the same array, so the agent zeroed it");
    let stale = &syncer.current().maglev;
    assert!(
        !stale.is_empty() && stale.values().all(|t| t.iter().all(|id| *id == 0)),
        "zeroed: {stale:?}"
    );
    let mut ids = Ids::from_contents(syncer.current(), 3, 251);
    let st = syncer.sync(&layout(&[with_maglev(2)], &mut ids));
    assert!(st.failed.is_empty(), "{:?}", st.failed);
    let kernel = KernelMaps::from_pins(&dir.0)
        .expect("opening the pins")
        .read_all()
        .expect("reading the pins");
    assert_eq!(kernel, *syncer.current());
    let slot0 = kernel.services.iter().find(|(k, _)| k.slot == 0).unwrap().1;
    let table = &kernel.maglev[&slot0.backend_id];
    assert_eq!(table.len(), 3);
    assert!(table.iter().all(|id| kernel.backends.contains_key(id)));
}
