//! A services map too small for every frontend, in the kernel: the sync writes
//! the frontends that fit, names the one that does not (the kernel's E2BIG
//! recognised as a full map) and leaves no part of it behind. Needs root (BPF)
//! but no network namespace.
use std::{collections::BTreeMap, net::Ipv4Addr};

use ferry_agent::{
    dataplane::{Config, Dataplane},
    maps::{
        kernel::KernelMaps,
        layout::{layout, Ids},
        sync::Syncer,
        MapContents, MapStore as _,
    },
    translate::Frontend,
};
use ferry_common::port_from_map;
use ferry_tests::sys::PinDir;

/// A ClusterIP frontend 10.96.0.10:`port` with `n` backends.
fn frontend(port: u16, n: u8) -> Frontend {
    let addrs = (1..=n).map(|i| Ipv4Addr::new(10, 0, port as u8, i));
    Frontend::cluster_ip(
        format!("default/web:{port}"),
        Ipv4Addr::new(10, 96, 0, 10),
        port,
        addrs,
        8080,
    )
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
    let cfg = Config {
        bpffs_dir: dir.0.clone(),
        tc_attach: ferry_agent::dataplane::TcAttach::Auto,
        services_max: 8,
        backends_max: 64,
        ct: ferry_agent::ct::Sizes { tcp: 1024, any: 1024 },
        src_ranges_max: 64,
        maglev: Default::default(),
    };
    let (_dp, maps) = Dataplane::load(&cfg).expect("loading the dataplane");
    let mut syncer = Syncer::new(maps).expect("reading the maps");
    let mut ids = Ids::from_contents(syncer.current());
    // 3 + 7 + 2 entries for a map of 8: :81 cannot fit.
    let desired = layout(
        &[frontend(80, 2), frontend(81, 6), frontend(82, 1)],
        &mut ids,
    );
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
    assert_eq!(
        kernel,
        *syncer.current(),
        "the syncer knows what the kernel holds"
    );
    assert_eq!(by_port(&kernel), [(80, 3), (82, 2)].into(), "{kernel:?}");
    assert_eq!(
        kernel.backends.len(),
        3,
        "the backends :81 added were taken back: {:?}",
        kernel.backends
    );
}
