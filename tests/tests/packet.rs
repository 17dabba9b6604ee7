//! Packet tests: the real `from_pod`, `from_netdev` and `xdp_from_netdev`
//! programs run on crafted frames through BPF_PROG_TEST_RUN; the tests check
//! rewritten addresses, ports, MACs, checksums (recomputed here from scratch),
//! verdicts and connection tracking.
use std::{
    net::Ipv4Addr,
    os::fd::{AsFd as _, OwnedFd},
};

use aya::{
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use ferry_agent::{
    dataplane::DATAPLANE_OBJ,
    ids::{FrontendId, FrontendKind, PortId, ServiceId},
    maps::{
        defs::{Backends, Names, RevNats, Services, SourceRanges, Stats},
        kernel,
        kernel::KernelMaps,
        MapStore as _,
    },
};
use ferry_common::{
    addr_to_map, config, ct_flags, port_from_map, port_to_map, Backend, Counter, CtKey, CtValue, RevNat, ServiceKey,
    ServiceValue, CT_DIR_FORWARD, CT_DIR_REPLY, PROG_FROM_NETDEV, PROG_FROM_POD, PROG_XDP_FROM_NETDEV, PROTO_TCP,
    PROTO_UDP, SCOPE_EXTERNAL,
};
use ferry_tests::testrun::{fold, frame, frame_with, l4_checksum, parse, sum16, with_flags, ACK, FIN, SYN};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const VIP: [u8; 4] = [10, 96, 0, 10];
const CLIENT: [u8; 4] = [10, 244, 0, 2];

/// The identity the fixture names a frontend by: Service `default/name`,
/// its port unnamed, its kind from `flags`.
fn frontend_id(name: &str, port: u16, flags: u32) -> FrontendId {
    FrontendId {
        service: ServiceId::new("default", name),
        port: PortId::Number(port),
        kind: FrontendKind::of_flags(flags),
    }
}

/// The dataplane loaded with its maps pinned in a private directory.
struct Fixture {
    ebpf: Ebpf,
    maps: KernelMaps,
    /// The pin directory, removed on drop (also when a load fails).
    pins: ferry_tests::sys::PinDir,
}

impl Fixture {
    fn dir(&self) -> &std::path::Path {
        &self.pins.0
    }

    fn new(tag: &str) -> Self {
        Self::with_ct_tcp_size(tag, None)
    }

    /// With the TCP connection-tracking table of `tcp_size` entries (None:
    /// the object's default).
    fn with_ct_tcp_size(tag: &str, tcp_size: Option<u32>) -> Self {
        let pins = ferry_tests::sys::PinDir::new(&format!("packet-test-{tag}"))
            .expect("a pin directory (packet tests need root: run `cargo xtask test` as root)");
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&pins.0);
        if let Some(n) = tcp_size {
            loader.map_max_entries(ferry_common::CT_TCP_MAP, n);
        }
        let mut ebpf = loader.load(DATAPLANE_OBJ).expect("load object");
        let maps = KernelMaps::from_ebpf(&mut ebpf).expect("maps");
        for name in [
            PROG_FROM_POD,
            PROG_FROM_NETDEV,
            ferry_common::PROG_TO_POD,
            ferry_common::PROG_TO_NETDEV,
        ] {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).expect(name).try_into().expect("classifier");
            prog.load()
                .unwrap_or_else(|e| panic!("the verifier refuses {name}: {e}"));
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(PROG_XDP_FROM_NETDEV)
            .expect("xdp")
            .try_into()
            .expect("xdp program");
        xdp.load()
            .unwrap_or_else(|e| panic!("the verifier refuses {PROG_XDP_FROM_NETDEV}: {e}"));
        Self { ebpf, maps, pins }
    }

    /// Runs from_pod on `frame`: (verdict, output frame).
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_prog(PROG_FROM_POD, frame)
    }

    /// Runs the program `name` on `frame` (aya's test run): (verdict,
    /// output frame).
    fn run_prog(&self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name}: {e}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// A descriptor of the TC program `name`, for a test run in another
    /// network namespace (its FIB lookups use the caller's), where the
    /// program object cannot go.
    fn tc_fd(&self, name: &str) -> OwnedFd {
        let prog: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        prog.fd().unwrap().as_fd().try_clone_to_owned().unwrap()
    }

    /// The XDP program's descriptor, for a test run in another network
    /// namespace (its FIB lookups use the caller's).
    fn xdp_fd(&self) -> OwnedFd {
        let prog: &Xdp = self.ebpf.program(PROG_XDP_FROM_NETDEV).unwrap().try_into().unwrap();
        prog.fd().unwrap().as_fd().try_clone_to_owned().unwrap()
    }

    /// A frontend VIP:port with backends (id, ip, port) in its slots.
    fn service(&mut self, proto: u8, port: u16, rev_nat_id: u16, backends: &[(u32, [u8; 4], u16)]) {
        let backends: Vec<_> = backends.iter().map(|&(id, ip, bport)| (id, ip, bport, 0)).collect();
        self.frontend(VIP, proto, port, rev_nat_id, 0, &backends, "t");
    }

    /// A north-south frontend `addr`:`port` (TCP) of kind `flags` (svc_flags)
    /// with backends (id, ip, port, backend_flags).
    fn external(
        &mut self,
        addr: [u8; 4],
        port: u16,
        rev_nat_id: u16,
        flags: u32,
        backends: &[(u32, [u8; 4], u16, u8)],
    ) {
        self.frontend(addr, PROTO_TCP, port, rev_nat_id, flags, backends, "np");
    }

    /// Any frontend: its backends, slots 1..=n naming them, slot 0 with the
    /// count and `flags`, and its reverse-NAT entry.
    #[allow(clippy::too_many_arguments)]
    fn frontend(
        &mut self,
        addr: [u8; 4],
        proto: u8,
        port: u16,
        rev_nat_id: u16,
        flags: u32,
        backends: &[(u32, [u8; 4], u16, u8)],
        name: &str,
    ) {
        let key = |slot| ServiceKey {
            addr: addr_to_map(addr),
            port: port_to_map(port),
            slot,
            proto,
            scope: SCOPE_EXTERNAL,
            _pad: [0; 2],
        };
        for (i, (id, ip, bport, bflags)) in backends.iter().enumerate() {
            self.maps
                .put::<Backends>(
                    id,
                    &Backend {
                        addr: addr_to_map(*ip),
                        port: port_to_map(*bport),
                        proto,
                        flags: *bflags,
                    },
                )
                .unwrap();
            self.maps
                .put::<Services>(
                    &key(i as u16 + 1),
                    &ServiceValue {
                        backend_id: *id,
                        rev_nat_id,
                        ..Default::default()
                    },
                )
                .unwrap();
        }
        self.maps
            .put::<Services>(
                &key(0),
                &ServiceValue {
                    count: backends.len() as u16,
                    rev_nat_id,
                    flags,
                    ..Default::default()
                },
            )
            .unwrap();
        self.maps
            .put::<RevNats>(
                &rev_nat_id,
                &RevNat {
                    addr: addr_to_map(addr),
                    port: port_to_map(port),
                    _pad: 0,
                },
            )
            .unwrap();
        self.maps
            .put::<Names>(&rev_nat_id, &frontend_id(name, port, flags).to_map())
            .unwrap();
    }

    /// The node address north-south flows are SNATed to.
    fn set_node_addr(&mut self, addr: [u8; 4]) {
        self.set_config(ferry_common::config::NODE_ADDR, addr_to_map(addr));
    }

    /// One of the node's own addresses, as the agent lists them.
    fn add_node_addr(&mut self, addr: [u8; 4]) {
        let mut addrs: aya::maps::HashMap<_, u32, u8> = aya::maps::HashMap::try_from(
            self.ebpf
                .map_mut(ferry_common::NODE_ADDRS_MAP)
                .expect("node addresses map"),
        )
        .unwrap();
        addrs.insert(addr_to_map(addr), 1, 0).unwrap();
    }

    /// Puts `addr` in the frontend gate's map, or takes it out.
    fn gate_addr(&mut self, addr: [u8; 4], present: bool) {
        let mut addrs: aya::maps::HashMap<_, u32, u8> = aya::maps::HashMap::try_from(
            self.ebpf
                .map_mut(ferry_common::FRONTEND_ADDRS_MAP)
                .expect("frontend gate map"),
        )
        .unwrap();
        if present {
            addrs.insert(addr_to_map(addr), 1, 0).unwrap();
        } else {
            addrs.remove(&addr_to_map(addr)).unwrap();
        }
    }

    /// A node setting (`ferry_common::config`).
    fn set_config(&mut self, index: u32, value: u32) {
        let mut config: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(self.ebpf.map_mut(ferry_common::CONFIG_MAP).expect("config map")).unwrap();
        config.set(index, value, 0).unwrap();
    }

    /// The connection-tracking entry of direction `dir` whose key starts
    /// at `src`:`sport`.
    fn ct(&self, dir: u8, src: [u8; 4], sport: u16) -> Option<(CtKey, CtValue)> {
        kernel::read_ct(self.dir())
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.dir == dir && k.saddr == addr_to_map(src) && k.sport == port_to_map(sport))
    }

    /// Rewrites a connection-tracking entry in whichever table holds it.
    fn put_ct(&self, k: CtKey, v: CtValue) {
        for (name, lru) in [(ferry_common::CT_TCP_MAP, false), (ferry_common::CT_ANY_MAP, true)] {
            let data = aya::maps::MapData::from_pin(self.dir().join(name)).unwrap();
            let map = if lru {
                aya::maps::Map::LruHashMap(data)
            } else {
                aya::maps::Map::HashMap(data)
            };
            let mut t: aya::maps::HashMap<_, CtKey, CtValue> = aya::maps::HashMap::try_from(map).unwrap();
            if t.get(&k, 0).is_ok() {
                t.insert(k, v, 0).unwrap();
                return;
            }
        }
        panic!("no entry {k:?}");
    }

    /// Makes both entries of the flow from `client`:`sport` (to a frontend,
    /// backend `backend`:`bport`) expired.
    fn age(&self, client: [u8; 4], sport: u16, backend: [u8; 4], bport: u16) {
        let (fk, fv) = self.ct(CT_DIR_FORWARD, client, sport).expect("tracked");
        // The reply entry of this very flow: to the port the backend saw.
        let (rk, rv) = kernel::read_ct(self.dir())
            .unwrap()
            .into_iter()
            .find(|(k, _)| {
                k.dir == CT_DIR_REPLY
                    && (k.saddr, k.sport, k.dport) == (addr_to_map(backend), port_to_map(bport), fv.nat_port)
            })
            .expect("reply tracked");
        self.put_ct(fk, CtValue { expires: 1, ..fv });
        self.put_ct(rk, CtValue { expires: 1, ..rv });
    }

    fn counter(&self, c: Counter) -> u64 {
        kernel::read_counters(self.dir()).unwrap()[c as usize]
    }
}

// --- packets ---------------------------------------------------------------

/// Asserts the IP header checksum and the L4 checksum are right.
fn assert_checksums(f: &[u8]) {
    assert_eq!(fold(sum16(&f[14..34])), 0xffff, "IPv4 header checksum is valid");
    let p = parse(f);
    if f[23] == PROTO_UDP && p.l4_csum == 0 {
        return;
    }
    assert_eq!(p.l4_csum, l4_checksum(f), "L4 checksum matches a full recomputation");
}

fn ct_has(fx: &Fixture, dir: u8, src: [u8; 4], sport: u16) -> bool {
    kernel::read_ct(fx.dir())
        .unwrap()
        .iter()
        .any(|(k, _)| k.dir == dir && k.saddr == addr_to_map(src) && k.sport == port_to_map(sport))
}

// --- tests -----------------------------------------------------------------

#[test]
fn tcp_to_a_clusterip_is_dnated_with_valid_checksums_and_tracked() {
    let mut fx = Fixture::new("tcp");
    fx.service(PROTO_TCP, 80, 1, &[(1, [10, 244, 0, 5], 8080)]);
    let input = frame(PROTO_TCP, CLIENT, VIP, 40000, 80, false);
    let (verdict, out) = fx.run(&input);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!((p.src, p.sport), (CLIENT, 40000), "source untouched");
    assert_eq!((p.dst, p.dport), ([10, 244, 0, 5], 8080), "destination = backend");
    assert_checksums(&out);
    assert!(ct_has(&fx, CT_DIR_FORWARD, CLIENT, 40000), "forward CT entry");
    assert!(ct_has(&fx, CT_DIR_REPLY, [10, 244, 0, 5], 8080), "reply CT entry");
    assert_eq!(fx.counter(Counter::ServiceForward), 1);

    // The backend's reply comes back from the ClusterIP.
    let reply = frame(PROTO_TCP, [10, 244, 0, 5], CLIENT, 8080, 40000, false);
    let (verdict, out) = fx.run(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out);
    assert_eq!((p.src, p.sport), (VIP, 80), "reverse NAT to the ClusterIP");
    assert_eq!((p.dst, p.dport), (CLIENT, 40000));
    assert_checksums(&out);
}

#[test]
fn udp_is_dnated_with_and_without_a_checksum() {
    let mut fx = Fixture::new("udp");
    fx.service(PROTO_UDP, 53, 1, &[(1, [10, 244, 0, 6], 5353)]);
    for zero in [false, true] {
        let input = frame(PROTO_UDP, CLIENT, VIP, 41000 + zero as u16, 53, zero);
        let (verdict, out) = fx.run(&input);
        assert_eq!(verdict, TC_ACT_OK);
        let p = parse(&out);
        assert_eq!((p.dst, p.dport), ([10, 244, 0, 6], 5353));
        if zero {
            assert_eq!(p.l4_csum, 0, "no checksum stays no checksum");
        } else {
            assert_ne!(p.l4_csum, 0);
        }
        assert_checksums(&out);
    }
}

#[test]
fn packets_not_for_a_service_pass_untouched() {
    let mut fx = Fixture::new("pass");
    fx.service(PROTO_TCP, 80, 1, &[(1, [10, 244, 0, 5], 8080)]);
    for input in [
        frame(PROTO_TCP, CLIENT, [10, 244, 0, 9], 40000, 80, false),
        frame(PROTO_TCP, CLIENT, VIP, 40000, 81, false),
        frame(PROTO_UDP, CLIENT, VIP, 40000, 80, false),
    ] {
        let (verdict, out) = fx.run(&input);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, input, "bytes unchanged");
    }
}

#[test]
fn a_flow_keeps_its_backend_until_that_backend_is_gone() {
    let mut fx = Fixture::new("sticky");
    fx.service(PROTO_TCP, 80, 1, &[(1, [10, 244, 0, 5], 8080)]);
    let input = frame(PROTO_TCP, CLIENT, VIP, 42000, 80, false);
    assert_eq!(parse(&fx.run(&input).1).dst, [10, 244, 0, 5]);
    // The Service now lists only other backends; backend 1 still exists.
    fx.service(
        PROTO_TCP,
        80,
        1,
        &[(2, [10, 244, 0, 6], 8080), (3, [10, 244, 0, 7], 8080)],
    );
    for _ in 0..5 {
        assert_eq!(parse(&fx.run(&input).1).dst, [10, 244, 0, 5], "established flow stays");
    }
    // Backend 1 removed: the flow is balanced again onto a live backend.
    fx.maps.del::<Backends>(&1).unwrap();
    let dst = parse(&fx.run(&input).1).dst;
    assert!(
        dst == [10, 244, 0, 6] || dst == [10, 244, 0, 7],
        "moved to a live backend, got {dst:?}"
    );
}

#[test]
fn new_flows_are_spread_over_all_backends() {
    let mut fx = Fixture::new("spread");
    let backends = [
        (1, [10, 244, 0, 5], 8080),
        (2, [10, 244, 0, 6], 8080),
        (3, [10, 244, 0, 7], 8080),
    ];
    fx.service(PROTO_TCP, 80, 1, &backends);
    let mut counts = std::collections::BTreeMap::new();
    for sport in 0..300u16 {
        let out = fx.run(&frame(PROTO_TCP, CLIENT, VIP, 30000 + sport, 80, false)).1;
        assert_checksums(&out);
        *counts.entry(parse(&out).dst).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (b, n) in &counts {
        assert!(*n >= 50, "backend {:?} got {n} of 300: {counts:?}", Ipv4Addr::from(*b));
    }
}

#[test]
fn hairpin_snats_to_the_loopback_address_and_bounces_back() {
    let mut fx = Fixture::new("hairpin");
    fx.service(PROTO_TCP, 80, 1, &[(1, CLIENT, 8080)]);
    let (verdict, out) = fx.run(&frame(PROTO_TCP, CLIENT, VIP, 43000, 80, false));
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back into the Pod's veth");
    let p = parse(&out);
    assert_eq!(
        (p.src, p.sport),
        ([169, 254, 42, 1], 43000),
        "source rewritten (hairpin SNAT)"
    );
    assert_eq!((p.dst, p.dport), (CLIENT, 8080));
    assert_eq!(&out[0..6], &[2, 0, 0, 0, 0, 2], "MACs swapped for the way back");
    assert_checksums(&out);

    let (verdict, out) = fx.run(&frame(PROTO_TCP, CLIENT, [169, 254, 42, 1], 8080, 43000, false));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = parse(&out);
    assert_eq!((p.src, p.sport), (VIP, 80), "reply from the ClusterIP");
    assert_eq!((p.dst, p.dport), (CLIENT, 43000), "to the original client");
    assert_checksums(&out);
}

/// A TCP frame with the given sequence, acknowledgment and flags (payload "hello").
fn tcp_frame(sport: u16, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut f = frame(PROTO_TCP, CLIENT, VIP, sport, 80, false);
    f[38..42].copy_from_slice(&seq.to_be_bytes());
    f[42..46].copy_from_slice(&ack.to_be_bytes());
    f[47] = flags;
    let c = l4_checksum(&f);
    f[50..52].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn tcp_to_a_service_without_backends_gets_a_rst_from_the_clusterip() {
    let mut fx = Fixture::new("rst");
    fx.service(PROTO_TCP, 80, 1, &[]);
    // SYN (seq 1000, carrying 5 bytes): RST|ACK, seq 0, ack = 1000 + 5 + 1 (SYN).
    let (verdict, out) = fx.run(&tcp_frame(44000, 1000, 0, 0x02));
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back into the client's veth");
    assert_eq!(out.len(), 14 + 20 + 20, "payload and options trimmed");
    assert_eq!(&out[0..6], &[2, 0, 0, 0, 0, 2], "MACs swapped for the way back");
    let p = parse(&out);
    assert_eq!((p.src, p.sport), (VIP, 80), "from the ClusterIP:port dialled");
    assert_eq!((p.dst, p.dport), (CLIENT, 44000));
    assert_eq!(u16::from_be_bytes([out[16], out[17]]), 40, "IPv4 total length");
    assert_eq!(out[23], PROTO_TCP);
    assert_eq!(u32::from_be_bytes(out[38..42].try_into().unwrap()), 0, "seq");
    assert_eq!(u32::from_be_bytes(out[42..46].try_into().unwrap()), 1006, "ack");
    assert_eq!(out[46] >> 4, 5, "data offset: no options");
    assert_eq!(out[47], 0x14, "RST|ACK");
    assert_checksums(&out);
    assert_eq!(fx.counter(Counter::RejectTcp), 1);

    // A segment with ACK (a flow whose last backend went away): RST, seq = its ack.
    let (verdict, out) = fx.run(&tcp_frame(44001, 5000, 777_777, 0x18));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        u32::from_be_bytes(out[38..42].try_into().unwrap()),
        777_777,
        "seq = SEG.ACK"
    );
    assert_eq!(out[47], 0x04, "RST only");
    assert_checksums(&out);

    // A RST is never answered.
    let (verdict, _) = fx.run(&tcp_frame(44002, 5000, 1, 0x04));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.counter(Counter::DropNoBackend), 1);
}

#[test]
fn udp_to_a_service_without_backends_gets_icmp_port_unreachable() {
    let mut fx = Fixture::new("icmp");
    fx.service(PROTO_UDP, 53, 1, &[]);
    let input = frame(PROTO_UDP, CLIENT, VIP, 45000, 53, false);
    let (verdict, out) = fx.run(&input);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        out.len(),
        14 + 20 + 8 + 28,
        "IPv4 + ICMP + quoted IPv4 header and 8 bytes"
    );
    assert_eq!(fold(sum16(&out[14..34])), 0xffff, "IPv4 header checksum is valid");
    assert_eq!(&out[26..30], &VIP, "from the ClusterIP");
    assert_eq!(&out[30..34], &CLIENT);
    assert_eq!(out[23], 1, "ICMP");
    assert_eq!((out[34], out[35]), (3, 3), "destination unreachable, port");
    assert_eq!(fold(sum16(&out[34..])), 0xffff, "ICMP checksum is valid");
    assert_eq!(
        &out[42..70],
        &input[14..42],
        "the datagram's headers are quoted unchanged"
    );
    assert_eq!(fx.counter(Counter::RejectUdp), 1);
}

#[test]
fn session_affinity_sends_new_flows_of_a_client_to_one_backend() {
    let mut fx = Fixture::new("affinity");
    let backends = [
        (1, [10, 244, 0, 5], 8080),
        (2, [10, 244, 0, 6], 8080),
        (3, [10, 244, 0, 7], 8080),
    ];
    fx.service(PROTO_TCP, 80, 1, &backends);
    let key = ServiceKey {
        addr: addr_to_map(VIP),
        port: port_to_map(80),
        slot: 0,
        proto: PROTO_TCP,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    let v = ServiceValue {
        count: 3,
        rev_nat_id: 1,
        flags: ferry_common::svc_flags::AFFINITY,
        affinity_timeout: 60,
        ..Default::default()
    };
    fx.maps.put::<Services>(&key, &v).unwrap();
    let first = parse(&fx.run(&frame(PROTO_TCP, CLIENT, VIP, 46000, 80, false)).1).dst;
    for sport in 1..50u16 {
        let out = fx.run(&frame(PROTO_TCP, CLIENT, VIP, 46000 + sport, 80, false)).1;
        assert_eq!(parse(&out).dst, first, "new flow {sport} of the same client");
    }
    assert_eq!(fx.counter(Counter::AffinityHit), 49);
    // Other clients are balanced on their own.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..60u8 {
        seen.insert(parse(&fx.run(&frame(PROTO_TCP, [10, 244, 1, i], VIP, 47000, 80, false)).1).dst);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn translated_packets_are_counted_per_service_and_a_freed_id_starts_from_zero() {
    let mut fx = Fixture::new("svcstats");
    fx.service(PROTO_TCP, 80, 7, &[(1, [10, 244, 0, 5], 8080)]);
    let f = frame(PROTO_TCP, CLIENT, VIP, 40000, 80, false);
    // A new flow, then a packet of the tracked flow: both counted.
    for _ in 0..2 {
        let (verdict, _) = fx.run(&f);
        assert_eq!(verdict, TC_ACT_OK);
    }
    // Not for a service: not counted.
    fx.run(&frame(PROTO_TCP, CLIENT, [10, 96, 0, 99], 40000, 80, false));
    let stats = kernel::read_svc_stats(fx.dir()).unwrap();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(
        stats[0].0,
        Some(frontend_id("t", 80, 0)),
        "the name read back from the kernel"
    );
    assert_eq!(stats[0].1.packets, 2);
    assert_eq!(stats[0].1.bytes, 2 * f.len() as u64);
    // The id freed as the sync frees it: its counters go with it.
    fx.maps.del::<RevNats>(&7).unwrap();
    fx.maps.clear::<Stats>(&7).unwrap();
    fx.maps.del::<Names>(&7).unwrap();
    assert!(kernel::read_svc_stats(fx.dir()).unwrap().is_empty());
}

#[test]
fn nodeport_to_a_remote_backend_is_dnated_and_snated_and_the_reply_restored() {
    const NODE: [u8; 4] = [192, 168, 77, 11];
    const EXT: [u8; 4] = [192, 168, 77, 200];
    const EXT2: [u8; 4] = [192, 168, 77, 201];
    const REMOTE: [u8; 4] = [10, 244, 1, 5];
    let mut fx = Fixture::new("nodeport");
    fx.external(
        NODE,
        30080,
        3,
        ferry_common::svc_flags::NODE_PORT,
        &[(1, REMOTE, 8080, 0)],
    );
    fx.set_node_addr(NODE);
    // Client → node:30080 becomes node:P → backend:8080 with P from the SNAT
    // port range (outside the node's ephemeral ports), checksums right.
    let (_, out) = fx.run_prog(PROG_FROM_NETDEV, &frame(PROTO_TCP, EXT, NODE, 45000, 30080, false));
    let p = parse(&out);
    assert_eq!((p.dst, p.dport), (REMOTE, 8080), "DNAT to the backend");
    assert_eq!(p.src, NODE, "SNAT to the node");
    let range = ferry_common::DEFAULT_SNAT_PORTS.0..=ferry_common::DEFAULT_SNAT_PORTS.1;
    assert!(range.contains(&p.sport), "SNAT port {} in {range:?}", p.sport);
    assert_checksums(&out);
    // A second client with the same source port to the same backend: another port.
    let (_, out2) = fx.run_prog(PROG_FROM_NETDEV, &frame(PROTO_TCP, EXT2, NODE, 45000, 30080, false));
    let p2 = parse(&out2);
    assert_eq!(p2.src, NODE);
    assert!(range.contains(&p2.sport));
    assert_ne!(p2.sport, p.sport, "the reply tuple of the first flow is taken");
    assert_checksums(&out2);
    // The backend's replies come back to the node and go to each client, from
    // the address and port it dialled.
    for (client, snat_port) in [(EXT, p.sport), (EXT2, p2.sport)] {
        let (_, reply) = fx.run_prog(
            PROG_FROM_NETDEV,
            &frame(PROTO_TCP, REMOTE, NODE, 8080, snat_port, false),
        );
        let r = parse(&reply);
        assert_eq!((r.src, r.sport), (NODE, 30080), "from the NodePort");
        assert_eq!((r.dst, r.dport), (client, 45000), "to the client");
        assert_checksums(&reply);
    }
    // A ClusterIP-only frontend is not served from the network.
    fx.service(PROTO_TCP, 80, 1, &[(2, [10, 244, 0, 5], 8080)]);
    let input = frame(PROTO_TCP, EXT, VIP, 45001, 80, false);
    let (verdict, out) = fx.run_prog(PROG_FROM_NETDEV, &input);
    assert_eq!((verdict, out), (TC_ACT_OK, input), "untouched");
}

// --- XDP -------------------------------------------------------------------

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const NODE2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x12];
const EXT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xc8];

/// A network namespace for the XDP program's FIB lookups (BPF_PROG_TEST_RUN
/// looks up routes in the caller's): node 1's address on a veth, node
/// 2 (routing the Pod CIDR 10.244.1.0/24) and the external client as known
/// neighbours, forwarding on. Deleted on drop, also when a test fails.
struct FibNetns(String);

impl FibNetns {
    fn new(tag: &str) -> Self {
        let name = format!("ferry-pkt-{}-{tag}", std::process::id());
        let _ = ferry_tests::sys::run("ip", &["netns", "del", &name]);
        ferry_tests::sys::run("ip", &["netns", "add", &name]).expect("netns");
        let ns = Self(name);
        let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        let steps: Vec<Vec<String>> = vec![
            vec!["link".into(), "set".into(), "lo".into(), "up".into()],
            vec![
                "link".into(),
                "add".into(),
                "d0".into(),
                "address".into(),
                mac(NODE_MAC),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                "d0p".into(),
            ],
            vec!["link".into(), "set".into(), "d0p".into(), "up".into()],
            vec![
                "addr".into(),
                "add".into(),
                "192.168.77.11/24".into(),
                "dev".into(),
                "d0".into(),
            ],
            vec!["link".into(), "set".into(), "d0".into(), "up".into()],
            vec![
                "neigh".into(),
                "add".into(),
                "192.168.77.12".into(),
                "lladdr".into(),
                mac(NODE2_MAC),
                "dev".into(),
                "d0".into(),
                "nud".into(),
                "permanent".into(),
            ],
            vec![
                "neigh".into(),
                "add".into(),
                "192.168.77.200".into(),
                "lladdr".into(),
                mac(EXT_MAC),
                "dev".into(),
                "d0".into(),
                "nud".into(),
                "permanent".into(),
            ],
            vec![
                "route".into(),
                "add".into(),
                "10.244.1.0/24".into(),
                "via".into(),
                "192.168.77.12".into(),
            ],
        ];
        for step in &steps {
            let mut args = vec!["-n", ns.0.as_str()];
            args.extend(step.iter().map(String::as_str));
            ferry_tests::sys::run("ip", &args).expect("netns setup");
        }
        ferry_tests::sys::netns_exec(&ns.0, "sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"]).expect("forwarding");
        ns
    }

    /// Runs the program `fd` on `frame` inside this namespace.
    fn run(&self, fd: &OwnedFd, frame: Vec<u8>) -> (u32, Vec<u8>) {
        let fd = fd.try_clone().expect("dup the program's descriptor");
        let r = ferry_tests::in_netns(&self.0, move || ferry_tests::testrun::run(fd.as_fd(), &frame, 1))
            .expect("test run in the netns")
            .expect("BPF_PROG_TEST_RUN");
        (r.verdict, r.frame)
    }
}

impl Drop for FibNetns {
    fn drop(&mut self) {
        let _ = ferry_tests::sys::run("ip", &["netns", "del", &self.0]);
    }
}

fn macs(f: &[u8]) -> ([u8; 6], [u8; 6]) {
    (f[0..6].try_into().unwrap(), f[6..12].try_into().unwrap())
}

#[test]
fn xdp_forwards_nodeport_flows_to_remote_backends_and_their_replies_with_valid_checksums() {
    const NODE: [u8; 4] = [192, 168, 77, 11];
    const EXT: [u8; 4] = [192, 168, 77, 200];
    const REMOTE: [u8; 4] = [10, 244, 1, 5];
    let mut fx = Fixture::new("xdp");
    let ns = FibNetns::new("xdp");
    fx.external(
        NODE,
        30080,
        3,
        ferry_common::svc_flags::NODE_PORT,
        &[(1, REMOTE, 8080, 0)],
    );
    fx.set_node_addr(NODE);
    let fd = fx.xdp_fd();
    // Client → node:30080 leaves as node:P → backend:8080 towards node 2,
    // sent by XDP itself (to the veth: a redirect).
    let (verdict, out) = ns.run(&fd, frame(PROTO_TCP, EXT, NODE, 45000, 30080, false));
    assert_eq!(verdict, XDP_REDIRECT, "XDP sends it out itself");
    let p = parse(&out);
    assert_eq!((p.dst, p.dport), (REMOTE, 8080), "DNAT to the backend");
    assert_eq!(p.src, NODE, "SNAT to the node");
    assert!((ferry_common::DEFAULT_SNAT_PORTS.0..=ferry_common::DEFAULT_SNAT_PORTS.1).contains(&p.sport));
    assert_eq!(macs(&out), (NODE2_MAC, NODE_MAC), "to node 2's MAC, from the node's");
    assert_checksums(&out);
    assert!(
        ct_has(&fx, CT_DIR_FORWARD, EXT, 45000),
        "tracked (TC would find the same entry)"
    );
    // The backend's reply goes back to the client from the NodePort.
    let (verdict, reply) = ns.run(&fd, frame(PROTO_TCP, REMOTE, NODE, 8080, p.sport, false));
    assert_eq!(verdict, XDP_REDIRECT);
    let r = parse(&reply);
    assert_eq!((r.src, r.sport), (NODE, 30080), "from the NodePort");
    assert_eq!((r.dst, r.dport), (EXT, 45000), "to the client");
    assert_eq!(macs(&reply).0, EXT_MAC);
    assert_checksums(&reply);
    assert_eq!(fx.counter(Counter::XdpForward), 2);
}

#[test]
fn xdp_leaves_local_backends_partial_checksums_and_other_traffic_to_tc_untouched() {
    const NODE: [u8; 4] = [192, 168, 77, 11];
    const EXT: [u8; 4] = [192, 168, 77, 200];
    const REMOTE: [u8; 4] = [10, 244, 1, 5];
    const LOCAL: [u8; 4] = [10, 244, 0, 5];
    let mut fx = Fixture::new("xdp-pass");
    let ns = FibNetns::new("xdp-pass");
    fx.external(
        NODE,
        30080,
        3,
        ferry_common::svc_flags::NODE_PORT,
        &[(1, REMOTE, 8080, 0)],
    );
    fx.external(
        NODE,
        30081,
        4,
        ferry_common::svc_flags::NODE_PORT,
        &[(2, LOCAL, 8080, ferry_common::backend_flags::LOCAL)],
    );
    fx.set_node_addr(NODE);
    let fd = fx.xdp_fd();
    // A local backend: TC delivers it, XDP only tracks the flow.
    let input = frame(PROTO_TCP, EXT, NODE, 45001, 30081, false);
    let (verdict, out) = ns.run(&fd, input.clone());
    assert_eq!((verdict, &out), (XDP_PASS, &input), "passed on untouched");
    assert!(ct_has(&fx, CT_DIR_FORWARD, EXT, 45001), "tracked for TC");
    // The L4 checksum field holding only the pseudo-header sum (a local
    // sender's checksum offload): left to TC, untouched.
    let mut partial = frame(PROTO_TCP, EXT, NODE, 45002, 30080, false);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&partial[26..34]);
    pseudo.extend_from_slice(&[0, PROTO_TCP]);
    pseudo.extend_from_slice(&((partial.len() - 34) as u16).to_be_bytes());
    partial[50..52].copy_from_slice(&fold(sum16(&pseudo)).to_be_bytes());
    let (verdict, out) = ns.run(&fd, partial.clone());
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &partial),
        "partial checksum: passed on untouched"
    );
    assert_eq!(fx.counter(Counter::XdpPassPartialCsum), 1);
    // Not a frontend: untouched.
    let other = frame(PROTO_TCP, EXT, NODE, 45003, 22, false);
    assert_eq!(ns.run(&fd, other.clone()), (XDP_PASS, other));
    assert_eq!(fx.counter(Counter::XdpForward), 0);
}

#[test]
fn load_balancer_source_ranges_admit_only_clients_in_range() {
    use ferry_common::{backend_flags, svc_flags};
    const LB: [u8; 4] = [203, 0, 113, 20];
    const LOCAL: [u8; 4] = [10, 244, 0, 5];
    let mut fx = Fixture::new("srcrange");
    let restricted = svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES;
    fx.external(LB, 80, 4, restricted, &[(1, LOCAL, 8080, backend_flags::LOCAL)]);
    fx.maps
        .put::<SourceRanges>(&(4, "192.168.77.200/32".parse().unwrap()), &())
        .unwrap();
    fx.maps
        .put::<SourceRanges>(&(4, "10.1.0.0/16".parse().unwrap()), &())
        .unwrap();
    // Another frontend's range admits nobody here.
    fx.maps
        .put::<SourceRanges>(&(5, "192.168.77.0/24".parse().unwrap()), &())
        .unwrap();
    for (client, allowed) in [
        ([192, 168, 77, 200], true),
        ([10, 1, 2, 3], true),
        ([192, 168, 77, 201], false),
        ([10, 2, 0, 1], false),
    ] {
        let (verdict, out) = fx.run_prog(PROG_FROM_NETDEV, &frame(PROTO_TCP, client, LB, 45000, 80, false));
        if allowed {
            assert_eq!(
                (verdict, parse(&out).dst),
                (TC_ACT_OK, LOCAL),
                "{client:?} is in range: DNAT"
            );
        } else {
            assert_eq!(verdict, TC_ACT_SHOT, "{client:?} is out of range: dropped");
        }
    }
    assert_eq!(fx.counter(Counter::DropSourceRange), 2);
    // A Pod dialling the LoadBalancer IP is held to the ranges as well.
    let (verdict, _) = fx.run(&frame(PROTO_TCP, CLIENT, LB, 40000, 80, false));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.counter(Counter::DropSourceRange), 3);
    // Without the flag the trie is not consulted: anyone gets in.
    fx.external(
        LB,
        80,
        4,
        svc_flags::LOAD_BALANCER,
        &[(1, LOCAL, 8080, backend_flags::LOCAL)],
    );
    let (verdict, out) = fx.run_prog(
        PROG_FROM_NETDEV,
        &frame(PROTO_TCP, [192, 168, 77, 201], LB, 45001, 80, false),
    );
    assert_eq!((verdict, parse(&out).dst), (TC_ACT_OK, LOCAL));
    assert_eq!(fx.counter(Counter::DropSourceRange), 3);
}

// --- connection tracking ---------------------------------------------------

const SEC: u64 = 1_000_000_000;

/// The lifetime an entry was given, in whole seconds (rounded).
fn lifetime(v: &CtValue) -> u64 {
    (v.expires - ferry_agent::ct::monotonic_ns() + SEC / 2) / SEC
}

#[test]
fn tcp_flows_go_syn_sent_established_closing_with_the_configured_lifetimes() {
    let mut fx = Fixture::new("ctstate");
    const B: [u8; 4] = [10, 244, 0, 5];
    fx.service(PROTO_TCP, 80, 1, &[(1, B, 8080)]);
    fx.set_config(ferry_common::config::CT_TIMEOUT_TCP, 1000);
    fx.set_config(ferry_common::config::CT_TIMEOUT_TCP_CLOSE, 7);
    fx.run(&frame(PROTO_TCP, CLIENT, VIP, 46000, 80, false));
    let (fk, fwd) = fx.ct(CT_DIR_FORWARD, CLIENT, 46000).expect("forward entry");
    assert_eq!(fwd.flags & ct_flags::REPLIED, 0, "SYN sent");
    assert_eq!(ferry_agent::ct::State::of(&fk, &fwd).name(), "syn-sent");
    assert_eq!(
        lifetime(&fwd),
        u64::from(ferry_common::ct_timeouts::TCP_SYN),
        "the built-in SYN lifetime"
    );
    // The backend's SYN-ACK: both entries established, with the configured lifetime.
    fx.run(&with_flags(frame(PROTO_TCP, B, CLIENT, 8080, 46000, false), SYN | ACK));
    for (dir, src, port) in [(CT_DIR_FORWARD, CLIENT, 46000), (CT_DIR_REPLY, B, 8080)] {
        let (k, v) = fx.ct(dir, src, port).unwrap();
        assert_eq!(ferry_agent::ct::State::of(&k, &v).name(), "established", "{dir}");
        assert_eq!(lifetime(&v), 1000, "{dir}");
    }
    // The client's FIN: its entry is closing, with the closing lifetime.
    let (verdict, out) = fx.run(&with_flags(frame(PROTO_TCP, CLIENT, VIP, 46000, 80, false), FIN | ACK));
    assert_eq!((verdict, parse(&out).dst), (TC_ACT_OK, B), "still to its backend");
    let (k, v) = fx.ct(CT_DIR_FORWARD, CLIENT, 46000).unwrap();
    assert_eq!(ferry_agent::ct::State::of(&k, &v).name(), "closing");
    assert_eq!(lifetime(&v), 7);
    // UDP: unreplied, then a stream.
    fx.service(PROTO_UDP, 53, 2, &[(2, B, 5353)]);
    fx.run(&frame(PROTO_UDP, CLIENT, VIP, 46001, 53, false));
    let (_, v) = fx.ct(CT_DIR_FORWARD, CLIENT, 46001).unwrap();
    assert_eq!(lifetime(&v), u64::from(ferry_common::ct_timeouts::UDP));
    fx.run(&frame(PROTO_UDP, B, CLIENT, 5353, 46001, false));
    let (_, v) = fx.ct(CT_DIR_FORWARD, CLIENT, 46001).unwrap();
    assert_eq!(lifetime(&v), u64::from(ferry_common::ct_timeouts::UDP_STREAM));
}

#[test]
fn an_expired_flow_is_balanced_afresh_unless_its_other_direction_lives() {
    let mut fx = Fixture::new("ctexp");
    const A: [u8; 4] = [10, 244, 0, 5];
    const B: [u8; 4] = [10, 244, 0, 6];
    fx.service(PROTO_UDP, 53, 1, &[(1, A, 5353)]);
    let query = frame(PROTO_UDP, CLIENT, VIP, 47000, 53, false);
    assert_eq!(parse(&fx.run(&query).1).dst, A);
    fx.run(&frame(PROTO_UDP, A, CLIENT, 5353, 47000, false));
    // A now also serves, and is no longer the only one: B joins the slots.
    fx.service(PROTO_UDP, 53, 1, &[(2, B, 5353)]);
    // Only the forward entry expired: the backend still answers, the flow lives.
    let (k, v) = fx.ct(CT_DIR_FORWARD, CLIENT, 47000).unwrap();
    fx.put_ct(k, CtValue { expires: 1, ..v });
    assert_eq!(parse(&fx.run(&query).1).dst, A, "alive through its reply direction");
    assert_eq!(fx.counter(Counter::CtExpired), 0);
    // Both expired: the flow is dead, and the next datagram is a new flow.
    fx.age(CLIENT, 47000, A, 5353);
    assert_eq!(parse(&fx.run(&query).1).dst, B, "balanced afresh (B is the only slot)");
    assert_eq!(fx.counter(Counter::CtExpired), 1);
    assert!(
        fx.ct(CT_DIR_REPLY, A, 5353).is_none(),
        "the dead flow's reply entry is gone"
    );
}

#[test]
fn established_connections_keep_a_removed_backend_but_a_reused_port_is_balanced_afresh() {
    let mut fx = Fixture::new("ctstale");
    const A: [u8; 4] = [10, 244, 0, 5];
    const B: [u8; 4] = [10, 244, 0, 6];
    fx.service(PROTO_TCP, 80, 1, &[(1, A, 8080)]);
    let syn = frame(PROTO_TCP, CLIENT, VIP, 48000, 80, false);
    assert_eq!(parse(&fx.run(&syn).1).dst, A);
    fx.run(&with_flags(frame(PROTO_TCP, A, CLIENT, 8080, 48000, false), SYN | ACK));
    // A leaves the Service and every map (kube-proxy leaves its conntrack
    // entries: the connection runs to its end).
    fx.service(PROTO_TCP, 80, 1, &[(2, B, 8080)]);
    fx.maps.del::<Backends>(&1).unwrap();
    let data = with_flags(syn.clone(), ACK);
    for _ in 0..3 {
        assert_eq!(
            parse(&fx.run(&data).1).dst,
            A,
            "the established connection keeps its backend"
        );
    }
    // The client reuses its port for a new connection: a SYN on an answered
    // flow is not a retransmission; it goes to a backend that serves.
    let (verdict, out) = fx.run(&syn);
    assert_eq!((verdict, parse(&out).dst), (TC_ACT_OK, B));
    assert_eq!(fx.counter(Counter::CtStaleRebalanced), 1);
    assert!(
        fx.ct(CT_DIR_REPLY, A, 8080).is_none(),
        "the old flow's reply entry is gone"
    );
    // UDP: once its backend is gone, the next datagram goes to one that serves.
    fx.service(PROTO_UDP, 53, 2, &[(3, A, 5353)]);
    let dgram = frame(PROTO_UDP, CLIENT, VIP, 48001, 53, false);
    assert_eq!(parse(&fx.run(&dgram).1).dst, A);
    fx.service(PROTO_UDP, 53, 2, &[(4, B, 5353)]);
    fx.maps.del::<Backends>(&3).unwrap();
    assert_eq!(parse(&fx.run(&dgram).1).dst, B);
}

#[test]
fn snat_ports_are_claimed_once_and_come_free_when_their_flow_is_dead() {
    const NODE: [u8; 4] = [192, 168, 77, 11];
    const REMOTE: [u8; 4] = [10, 244, 1, 5];
    let mut fx = Fixture::new("snatports");
    fx.external(
        NODE,
        30080,
        3,
        ferry_common::svc_flags::NODE_PORT,
        &[(1, REMOTE, 8080, 0)],
    );
    fx.set_node_addr(NODE);
    // A range of two ports.
    fx.set_config(ferry_common::config::SNAT_PORT_MIN, 20000);
    fx.set_config(ferry_common::config::SNAT_PORT_MAX, 20001);
    let client = |i: u8| [192, 168, 77, 200 + i];
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..2 {
        // (Forwarded by a FIB lookup that finds no route here: TC_ACT_OK.)
        let (verdict, out) = fx.run_prog(
            PROG_FROM_NETDEV,
            &frame(PROTO_TCP, client(i), NODE, 45000, 30080, false),
        );
        assert_eq!((verdict, parse(&out).dst), (TC_ACT_OK, REMOTE));
        ports.insert(parse(&out).sport);
    }
    assert_eq!(ports, [20000, 20001].into(), "each flow its own port");
    // Both taken: a third flow is dropped and counted, never given a taken port.
    let third = frame(PROTO_TCP, client(2), NODE, 45000, 30080, false);
    assert_eq!(fx.run_prog(PROG_FROM_NETDEV, &third).0, TC_ACT_SHOT);
    assert_eq!(fx.counter(Counter::DropSnatPorts), 1);
    // The first flow ends (both entries expired): its port is free again.
    let (_, fwd) = fx.ct(CT_DIR_FORWARD, client(0), 45000).unwrap();
    let freed = port_from_map(fwd.nat_port);
    fx.age(client(0), 45000, REMOTE, 8080);
    let (verdict, out) = fx.run_prog(PROG_FROM_NETDEV, &third);
    assert_eq!((verdict, parse(&out).sport), (TC_ACT_OK, freed));
    // Its reply goes to the third client, not to the first.
    let (_, reply) = fx.run_prog(PROG_FROM_NETDEV, &frame(PROTO_TCP, REMOTE, NODE, 8080, freed, false));
    assert_eq!(parse(&reply).dst, client(2));
}

#[test]
fn a_full_tcp_table_tracks_new_flows_in_the_any_table() {
    let mut fx = Fixture::with_ct_tcp_size("cttcpfull", Some(4));
    const A: [u8; 4] = [10, 244, 0, 5];
    fx.service(PROTO_TCP, 80, 1, &[(1, A, 8080)]);
    for sport in 49000..49003u16 {
        fx.run(&frame(PROTO_TCP, CLIENT, VIP, sport, 80, false));
    }
    // Two flows fill the TCP table (four entries); the third is tracked all the same.
    assert_eq!(fx.counter(Counter::CtTcpFull), 1);
    assert_eq!(fx.counter(Counter::CtCreated), 3);
    for sport in 49000..49003u16 {
        let (_, out) = fx.run(&frame(PROTO_TCP, A, CLIENT, 8080, sport, false));
        assert_eq!(
            (parse(&out).src, parse(&out).sport),
            (VIP, 80),
            "reply of flow {sport} reverse-NATed"
        );
    }
}

// --- path MTU ----------------------------------------------------------------

/// `f` with "don't fragment" set, IPv4 checksum recomputed.
fn dont_fragment(mut f: Vec<u8>) -> Vec<u8> {
    f[20] |= 0x40;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = !fold(sum16(&f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn a_translated_packet_too_big_for_its_device_is_answered_with_fragmentation_needed_quoting_it_untranslated() {
    const REMOTE: [u8; 4] = [10, 244, 1, 5];
    let mut fx = Fixture::new("mtu");
    let ns = FibNetns::new("mtu");
    // The route to the backend leaves by a device with a 1400-byte MTU.
    ferry_tests::sys::run("ip", &["-n", &ns.0, "link", "set", "d0", "mtu", "1400"]).expect("mtu");
    fx.service(PROTO_TCP, 80, 1, &[(1, REMOTE, 8080)]);
    let fd = fx.tc_fd(PROG_FROM_POD);
    let big = dont_fragment(frame_with(PROTO_TCP, CLIENT, VIP, 47500, 80, false, &[7u8; 1460]));
    assert_eq!(big.len(), 14 + 1500);
    let (verdict, out) = ns.run(&fd, big.clone());
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "sent back to the client (fib misses: {})",
        fx.counter(Counter::FibMiss)
    );
    assert_eq!(out[23], 1, "ICMP");
    let icmp = &out[34..];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 4),
        "destination unreachable, fragmentation needed"
    );
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1400, "the next hop's MTU");
    let p = parse(&out);
    assert_eq!(
        (p.src, p.dst),
        (VIP, CLIENT),
        "from the ClusterIP the client dialled, to the client"
    );
    // The quote is the client's packet as it sent it: to the ClusterIP.
    assert_eq!(
        &icmp[8..8 + 28],
        &big[14..14 + 28],
        "the untranslated IPv4 header and ports"
    );
    assert_eq!(fold(sum16(&out[14..34])), 0xffff, "IPv4 checksum");
    assert_eq!(fold(sum16(icmp)), 0xffff, "ICMP checksum");
    assert_eq!(fx.counter(Counter::FragNeeded), 1);
    // Without DF it is translated and left to the stack, which fragments it.
    let frag_ok = frame_with(PROTO_TCP, CLIENT, VIP, 47501, 80, false, &[7u8; 1460]);
    let (verdict, out) = ns.run(&fd, frag_ok);
    assert_eq!((verdict, parse(&out).dst), (TC_ACT_OK, REMOTE));
    // One that fits is translated and sent to the backend's device itself.
    let (verdict, out) = ns.run(&fd, dont_fragment(frame(PROTO_TCP, CLIENT, VIP, 47502, 80, false)));
    assert_eq!((verdict, parse(&out).dst), (TC_ACT_REDIRECT, REMOTE));
    assert_checksums(&out);
}

/// A translated packet whose new destination is an address of the node
/// itself (a host-network backend: the API server, a node-local DNS cache)
/// is not forwarded by the FIB lookup but delivered by the stack: counted as
/// `fib_local`, not as a `fib_miss`, which stays for destinations without a
/// route (the kernel answers "not forwarded" to both: the node's addresses,
/// which the agent writes to a map, tell them apart). From a Pod to a
/// ClusterIP and from outside to a NodePort.
#[test]
fn a_translated_packet_to_an_address_of_the_node_counts_as_local_delivery_not_as_a_fib_miss() {
    const NODE: [u8; 4] = [192, 168, 77, 11];
    const EXT: [u8; 4] = [192, 168, 77, 200];
    // No route leads there (the namespace has no default route).
    const NOWHERE: [u8; 4] = [10, 99, 0, 5];
    const VIP2: [u8; 4] = [10, 96, 0, 11];
    let mut fx = Fixture::new("fiblocal");
    let ns = FibNetns::new("fiblocal");
    let local = ferry_common::backend_flags::LOCAL;
    fx.service(PROTO_TCP, 443, 1, &[(1, NODE, 8090)]);
    fx.external(
        NODE,
        30443,
        2,
        ferry_common::svc_flags::NODE_PORT,
        &[(2, NODE, 8090, local)],
    );
    fx.frontend(VIP2, PROTO_TCP, 80, 3, 0, &[(3, NOWHERE, 8080, 0)], "nowhere");
    fx.set_node_addr(NODE);
    fx.add_node_addr(NODE);
    let counts = |fx: &Fixture| (fx.counter(Counter::FibLocal), fx.counter(Counter::FibMiss));

    let (verdict, out) = ns.run(
        &fx.tc_fd(PROG_FROM_POD),
        frame(PROTO_TCP, CLIENT, VIP, 47600, 443, false),
    );
    let p = parse(&out);
    assert_eq!(
        (verdict, p.dst, p.dport),
        (TC_ACT_OK, NODE, 8090),
        "translated and left to the stack"
    );
    assert_checksums(&out);
    assert_eq!(counts(&fx), (1, 0), "a Pod to the ClusterIP: (fib_local, fib_miss)");

    let (verdict, out) = ns.run(
        &fx.tc_fd(PROG_FROM_NETDEV),
        frame(PROTO_TCP, EXT, NODE, 45600, 30443, false),
    );
    let p = parse(&out);
    assert_eq!(
        (verdict, p.src, p.dst, p.dport),
        (TC_ACT_OK, EXT, NODE, 8090),
        "translated, the client kept"
    );
    assert_checksums(&out);
    assert_eq!(counts(&fx), (2, 0), "outside to the NodePort: (fib_local, fib_miss)");

    // A backend no route leads to is still a miss (left to the stack, which
    // answers it as unreachable).
    let (verdict, out) = ns.run(
        &fx.tc_fd(PROG_FROM_POD),
        frame(PROTO_TCP, CLIENT, VIP2, 47601, 80, false),
    );
    assert_eq!((verdict, parse(&out).dst), (TC_ACT_OK, NOWHERE));
    assert_eq!(counts(&fx), (2, 1), "no route: (fib_local, fib_miss)");
}

// --- ICMP errors ---------------------------------------------------------------

/// An ICMP error (`kind`, `code`) from `src` to `dst` quoting `quoted` (an
/// IPv4 packet, or its beginning), with correct checksums.
fn icmp_error(src: [u8; 4], dst: [u8; 4], kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let icmp_len = 8 + quoted.len();
    let mut f = vec![0u8; 14 + 20 + icmp_len];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + icmp_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = !fold(sum16(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f[34] = kind;
    f[35] = code;
    f[42..].copy_from_slice(quoted);
    let c = !fold(sum16(&f[34..]));
    f[36..38].copy_from_slice(&c.to_be_bytes());
    f
}

/// The IPv4 header and 8-byte UDP header (no payload) of a datagram, as it
/// would be quoted whole, checksums right.
fn udp_header_only(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = frame_with(PROTO_UDP, src, dst, sport, dport, false, &[]);
    f.drain(..14);
    f
}

/// Asserts every checksum of an ICMP error frame: outer IPv4, ICMP, quoted
/// IPv4, and the quoted UDP one (the quote holding the whole datagram).
fn assert_icmp_checksums(f: &[u8]) {
    assert_eq!(fold(sum16(&f[14..34])), 0xffff, "outer IPv4 checksum");
    assert_eq!(fold(sum16(&f[34..])), 0xffff, "ICMP checksum");
    let inner = &f[42..];
    assert_eq!(fold(sum16(&inner[..20])), 0xffff, "quoted IPv4 checksum");
    let mut pseudo = inner[12..20].to_vec();
    pseudo.extend_from_slice(&[0, PROTO_UDP, 0, 8]);
    assert_eq!(
        fold(sum16(&pseudo) + sum16(&inner[20..28])),
        0xffff,
        "quoted UDP checksum"
    );
}

#[test]
fn icmp_errors_about_translated_flows_reach_the_client_translated_back() {
    let mut fx = Fixture::new("icmp");
    const B: [u8; 4] = [10, 244, 0, 6];
    fx.service(PROTO_UDP, 53, 1, &[(1, B, 5353)]);
    // The client's datagram to the ClusterIP, as the backend got it.
    let sent = frame_with(PROTO_UDP, CLIENT, VIP, 41000, 53, false, &[]);
    assert_eq!(parse(&fx.run(&sent).1).dst, B);
    // The backend answers "port unreachable", quoting the datagram it got.
    let err = icmp_error(B, CLIENT, 3, 3, &udp_header_only(CLIENT, B, 41000, 5353));
    let (_, out) = fx.run(&err);
    let p = parse(&out);
    assert_eq!((p.src, p.dst), (VIP, CLIENT), "from the ClusterIP, to the client");
    let q = &out[42..];
    assert_eq!(
        (&q[12..16], &q[16..20]),
        (&CLIENT[..], &VIP[..]),
        "the quote names the ClusterIP"
    );
    assert_eq!(
        (u16::from_be_bytes([q[20], q[21]]), u16::from_be_bytes([q[22], q[23]])),
        (41000, 53)
    );
    assert_icmp_checksums(&out);
    assert_eq!(fx.counter(Counter::IcmpErrorTranslated), 1);
    // An error about a flow nobody tracks passes untouched.
    let stray = icmp_error(B, CLIENT, 3, 3, &udp_header_only(CLIENT, B, 41001, 5353));
    assert_eq!(fx.run(&stray), (TC_ACT_OK, stray.clone()));

    // North-south to a backend on another node: a router on the way says
    // "fragmentation needed" to the node about the SNATed packet; the client
    // gets it about its own packet to the NodePort.
    const NODE: [u8; 4] = [192, 168, 77, 11];
    const EXT: [u8; 4] = [192, 168, 77, 200];
    const REMOTE: [u8; 4] = [10, 244, 1, 5];
    const ROUTER: [u8; 4] = [192, 168, 77, 1];
    fx.frontend(
        NODE,
        PROTO_UDP,
        30053,
        3,
        ferry_common::svc_flags::NODE_PORT,
        &[(2, REMOTE, 5353, 0)],
        "np",
    );
    fx.set_node_addr(NODE);
    let (_, fwd) = fx.run_prog(
        PROG_FROM_NETDEV,
        &frame_with(PROTO_UDP, EXT, NODE, 45000, 30053, false, &[]),
    );
    let snat_port = parse(&fwd).sport;
    let err = icmp_error(ROUTER, NODE, 3, 4, &udp_header_only(NODE, REMOTE, snat_port, 5353));
    let (_, out) = fx.run_prog(PROG_FROM_NETDEV, &err);
    let p = parse(&out);
    assert_eq!((p.src, p.dst), (ROUTER, EXT), "from the router still, to the client");
    let q = &out[42..];
    assert_eq!((&q[12..16], &q[16..20]), (&EXT[..], &NODE[..]));
    assert_eq!(
        (u16::from_be_bytes([q[20], q[21]]), u16::from_be_bytes([q[22], q[23]])),
        (45000, 30053)
    );
    assert_icmp_checksums(&out);
}

// --- IP fragments ------------------------------------------------------------

/// A UDP datagram from `src`:`sport` to `dst`:`dport` with `payload`, cut
/// into two IPv4 fragments at `split` bytes of the UDP segment (a multiple
/// of 8), IP id `id`: (first fragment with the UDP header, second without).
fn fragmented(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
    split: usize,
    id: u16,
) -> (Vec<u8>, Vec<u8>) {
    let whole = frame_with(PROTO_UDP, src, dst, sport, dport, false, payload);
    let segment = &whole[34..];
    let piece = |data: &[u8], offset: usize, more: bool| {
        let mut f = whole[..34].to_vec();
        f.extend_from_slice(data);
        f[16..18].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        f[18..20].copy_from_slice(&id.to_be_bytes());
        let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        f[20..22].copy_from_slice(&flags.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = !fold(sum16(&f[14..34]));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    (
        piece(&segment[..split], 0, true),
        piece(&segment[split..], split, false),
    )
}

/// The UDP checksum of a datagram reassembled from `first` and `second`,
/// computed from scratch (with the field as it is: 0xffff means right).
fn reassembled_udp_checksum(first: &[u8], second: &[u8]) -> u16 {
    let mut segment = first[34..].to_vec();
    segment.extend_from_slice(&second[34..]);
    let mut pseudo = first[26..34].to_vec();
    pseudo.extend_from_slice(&[0, PROTO_UDP]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    fold(sum16(&pseudo) + sum16(&segment))
}

#[test]
fn every_fragment_of_a_datagram_follows_its_first_both_ways() {
    let mut fx = Fixture::new("frags");
    const B: [u8; 4] = [10, 244, 0, 6];
    fx.service(PROTO_UDP, 53, 1, &[(1, B, 5353)]);
    let payload: Vec<u8> = (0..2992).map(|i| (i % 199) as u8).collect();
    let (first, second) = fragmented(CLIENT, VIP, 42000, 53, &payload, 1480, 0x1234);
    let (_, f1) = fx.run(&first);
    let (_, f2) = fx.run(&second);
    for (what, f) in [("first", &f1), ("second", &f2)] {
        assert_eq!(
            (&f[26..30], &f[30..34]),
            (&CLIENT[..], &B[..]),
            "{what} fragment to the backend"
        );
        assert_eq!(fold(sum16(&f[14..34])), 0xffff, "{what} fragment's IPv4 checksum");
    }
    assert_eq!(parse(&f1).dport, 5353, "the port, in the first fragment");
    assert_eq!(&f2[34..], &second[34..], "the second fragment's data untouched");
    assert_eq!(
        reassembled_udp_checksum(&f1, &f2),
        0xffff,
        "the datagram's UDP checksum is right once reassembled"
    );
    // The backend's answer, fragmented too, comes back from the ClusterIP.
    let (r1, r2) = fragmented(B, CLIENT, 5353, 42000, &payload, 1480, 0x4321);
    let (_, o1) = fx.run(&r1);
    let (_, o2) = fx.run(&r2);
    for f in [&o1, &o2] {
        assert_eq!((&f[26..30], &f[30..34]), (&VIP[..], &CLIENT[..]));
        assert_eq!(fold(sum16(&f[14..34])), 0xffff);
    }
    assert_eq!(parse(&o1).sport, 53);
    assert_eq!(reassembled_udp_checksum(&o1, &o2), 0xffff);
    // A later fragment whose first one was never seen passes untouched.
    let (_, orphan) = fragmented(CLIENT, VIP, 42001, 53, &payload, 1480, 0x9999);
    assert_eq!(fx.run(&orphan), (TC_ACT_OK, orphan.clone()));
}

// --- host-network backends -----------------------------------------------------

#[test]
fn replies_of_a_host_network_backend_are_reverse_translated_on_their_way_out() {
    let mut fx = Fixture::new("hostnet");
    // The backend is a process of the node itself (hostNetwork).
    const NODE: [u8; 4] = [192, 168, 77, 11];
    fx.service(PROTO_TCP, 80, 1, &[(1, NODE, 6443)]);
    let (_, out) = fx.run(&frame(PROTO_TCP, CLIENT, VIP, 43500, 80, false));
    assert_eq!((parse(&out).dst, parse(&out).dport), (NODE, 6443));
    // Its reply leaves through the node's stack: out of the Pod's veth
    // (to_pod) or a device (to_netdev), where it gets the ClusterIP back.
    for prog in [ferry_common::PROG_TO_POD, ferry_common::PROG_TO_NETDEV] {
        let reply = with_flags(frame(PROTO_TCP, NODE, CLIENT, 6443, 43500, false), SYN | ACK);
        let (verdict, out) = fx.run_prog(prog, &reply);
        assert_eq!(verdict, TC_ACT_OK, "{prog}: continues where the stack sent it");
        let p = parse(&out);
        assert_eq!((p.src, p.sport), (VIP, 80), "{prog}: from the ClusterIP");
        assert_eq!((p.dst, p.dport), (CLIENT, 43500), "{prog}");
        assert_checksums(&out);
    }
    // Anything else leaves untouched.
    let other = frame(PROTO_TCP, NODE, CLIENT, 22, 43501, false);
    assert_eq!(
        fx.run_prog(ferry_common::PROG_TO_POD, &other),
        (TC_ACT_OK, other.clone())
    );
}

/// Every packet program passes the verifier, the L3 twins too (the fixture
/// loads the others), and says what it cost: instructions the verifier
/// walked (its limit is 1,000,000 per program) and the program's size, for
/// comparing changes that move code between the entry points and the shared
/// functions they inline.
#[test]
fn every_packet_program_passes_the_verifier_and_reports_its_cost() {
    let mut fx = Fixture::new("verifier-cost");
    for name in [ferry_common::PROG_FROM_NETDEV_L3, ferry_common::PROG_TO_NETDEV_L3] {
        let prog: &mut SchedClassifier = fx.ebpf.program_mut(name).expect(name).try_into().expect("classifier");
        prog.load()
            .unwrap_or_else(|e| panic!("the verifier refuses {name}: {e}"));
    }
    for name in [
        PROG_FROM_POD,
        PROG_FROM_NETDEV,
        ferry_common::PROG_FROM_NETDEV_L3,
        ferry_common::PROG_TO_POD,
        ferry_common::PROG_TO_NETDEV,
        ferry_common::PROG_TO_NETDEV_L3,
        PROG_XDP_FROM_NETDEV,
    ] {
        let info = fx.ebpf.program(name).expect(name).info().expect("program info");
        let verified = info
            .verified_instruction_count()
            .expect("the kernel reports verified instructions");
        let size = info.size_translated().unwrap_or(0);
        eprintln!("verifier: {name}: {verified} instructions verified, {size} bytes translated");
        assert!(verified > 0 && verified < 1_000_000, "{name}: {verified}");
    }
}

/// The frontend gate (`maps::gate`): with it on, a Pod's packet to an
/// address neither in the service CIDR nor in the gate's map is not looked
/// up (it passes as it is), while ClusterIPs in the CIDR, addresses in the
/// map and backends' replies are translated as before.
#[test]
fn the_frontend_gate_skips_lookups_only_for_addresses_that_are_no_frontend() {
    const EXTERNAL: [u8; 4] = [192, 0, 2, 7];
    let mut fx = Fixture::new("gate");
    fx.service(PROTO_TCP, 80, 1, &[(1, [10, 244, 0, 5], 8080)]);
    fx.frontend(EXTERNAL, PROTO_TCP, 80, 2, 0, &[(2, [10, 244, 0, 6], 8080, 0)], "ext");
    fx.set_config(config::SERVICE_CIDR_ADDR, addr_to_map([10, 96, 0, 0]));
    fx.set_config(config::SERVICE_CIDR_MASK, addr_to_map([255, 240, 0, 0]));
    fx.set_config(config::FRONTEND_GATE, 1);

    // In the CIDR: translated, and its reply reverse-translated.
    let (_, out) = fx.run(&frame(PROTO_TCP, CLIENT, VIP, 40000, 80, false));
    assert_eq!(parse(&out).dst, [10, 244, 0, 5]);
    let (_, out) = fx.run(&frame(PROTO_TCP, [10, 244, 0, 5], CLIENT, 8080, 40000, false));
    assert_eq!(
        (parse(&out).src, parse(&out).sport),
        (VIP, 80),
        "a reply to a non-frontend is still looked up"
    );

    // Outside the CIDR and not in the gate's map: not looked up at all.
    let input = frame(PROTO_TCP, CLIENT, EXTERNAL, 40001, 80, false);
    let (verdict, out) = fx.run(&input);
    assert_eq!((verdict, &out), (TC_ACT_OK, &input), "the gate let a lookup through");
    assert!(!ct_has(&fx, CT_DIR_FORWARD, CLIENT, 40001));

    // In the gate's map: translated.
    fx.gate_addr(EXTERNAL, true);
    let (_, out) = fx.run(&input);
    assert_eq!(parse(&out).dst, [10, 244, 0, 6]);
    assert_checksums(&out);

    // Gate off: every destination is looked up, the map's content aside.
    fx.gate_addr(EXTERNAL, false);
    fx.set_config(config::FRONTEND_GATE, 0);
    let (_, out) = fx.run(&frame(PROTO_TCP, CLIENT, EXTERNAL, 40002, 80, false));
    assert_eq!(parse(&out).dst, [10, 244, 0, 6]);
}

// --- direct server return -------------------------------------------------

/// Splits a frame whose IPv4 header carries the DSR option first into the
/// option's 8 bytes and the frame without it (IHL, total length and header
/// checksum as before the option), after checking the header with it.
fn strip_dsr_option(f: &[u8]) -> ([u8; 8], Vec<u8>) {
    assert_eq!(f[14], 0x47, "IHL 7: the base header and the 8-byte option");
    assert_eq!(
        fold(sum16(&f[14..42])),
        0xffff,
        "IPv4 header checksum (option included) is valid"
    );
    let opt: [u8; 8] = f[34..42].try_into().unwrap();
    let mut plain = [&f[..34], &f[42..]].concat();
    plain[14] = 0x45;
    let tot_len = u16::from_be_bytes([f[16], f[17]]);
    assert_eq!(usize::from(tot_len), f.len() - 14, "total length counts the option");
    plain[16..18].copy_from_slice(&(tot_len - 8).to_be_bytes());
    plain[24..26].copy_from_slice(&[0, 0]);
    let c = !fold(sum16(&plain[14..34]));
    plain[24..26].copy_from_slice(&c.to_be_bytes());
    (opt, plain)
}

#[test]
fn dsr_keeps_the_client_carries_the_frontend_in_an_ip_option_and_the_backends_node_restores_it() {
    use ferry_common::{dsr_opt, nodeport_mode, svc_flags::NODE_PORT};
    const NODE: [u8; 4] = [192, 168, 77, 11];
    const EXT: [u8; 4] = [192, 168, 77, 200];
    const REMOTE: [u8; 4] = [10, 244, 1, 5];
    let mut fx = Fixture::new("dsr");
    fx.external(NODE, 30080, 3, NODE_PORT, &[(1, REMOTE, 8080, 0)]);
    fx.frontend(NODE, PROTO_UDP, 30053, 4, NODE_PORT, &[(2, REMOTE, 5353, 0)], "np");
    fx.set_node_addr(NODE);
    fx.set_config(config::NODEPORT_MODE, nodeport_mode::DSR);
    let option = |port: u16| {
        let mut o = [dsr_opt::TYPE, dsr_opt::LEN, 0, 0, 0, 0, 0, 0];
        o[2..4].copy_from_slice(&port.to_be_bytes());
        o[4..8].copy_from_slice(&NODE);
        o
    };
    // The SYN: DNAT only (the client stays the source), the option naming
    // node:30080 behind the base header; L4 checksum right for the new
    // destination.
    let syn = frame(PROTO_TCP, EXT, NODE, 45000, 30080, false);
    let (_, out) = fx.run_prog(PROG_FROM_NETDEV, &syn);
    assert_eq!(out.len(), syn.len() + 8, "8 bytes longer");
    let (opt, plain) = strip_dsr_option(&out);
    assert_eq!(opt, option(30080), "the frontend in the option");
    let p = parse(&plain);
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (EXT, 45000, REMOTE, 8080),
        "DNAT only"
    );
    assert_checksums(&plain);
    let (_, fv) = fx.ct(CT_DIR_FORWARD, EXT, 45000).expect("tracked");
    assert_eq!(
        fv.flags & (ct_flags::DSR | ct_flags::SNAT),
        ct_flags::DSR,
        "a DSR flow, no SNAT"
    );
    // The handshake's ACK: plain DNAT, no option; it marks the flow
    // established (no reply ever passes this node).
    let ack = with_flags(frame(PROTO_TCP, EXT, NODE, 45000, 30080, false), ACK);
    let (_, out) = fx.run_prog(PROG_FROM_NETDEV, &ack);
    assert_eq!(out.len(), ack.len(), "no option after the SYN");
    let p = parse(&out);
    assert_eq!((p.src, p.dst, p.dport), (EXT, REMOTE, 8080));
    assert_checksums(&out);
    let (_, fv) = fx.ct(CT_DIR_FORWARD, EXT, 45000).expect("tracked");
    assert_ne!(fv.flags & ct_flags::REPLIED, 0, "established by the client's ACK");
    // Every UDP datagram carries the option.
    let dgram = frame(PROTO_UDP, EXT, NODE, 45001, 30053, false);
    let mut to_backend = Vec::new();
    for _ in 0..2 {
        let (_, out) = fx.run_prog(PROG_FROM_NETDEV, &dgram);
        let (opt, plain) = strip_dsr_option(&out);
        assert_eq!(opt, option(30053));
        let p = parse(&plain);
        assert_eq!((p.src, p.sport, p.dst, p.dport), (EXT, 45001, REMOTE, 5353));
        assert_checksums(&plain);
        to_backend = out;
    }
    assert_eq!(fx.counter(Counter::DsrForward), 4);
    // Hybrid: UDP is SNATed to the node (no option), TCP still DSR.
    fx.set_config(config::NODEPORT_MODE, nodeport_mode::HYBRID);
    let (_, out) = fx.run_prog(PROG_FROM_NETDEV, &frame(PROTO_UDP, EXT, NODE, 45002, 30053, false));
    assert_eq!(out[14], 0x45, "hybrid: no option on UDP");
    assert_eq!(parse(&out).src, NODE, "hybrid: UDP SNATed to the node");
    let (_, tcp_syn) = fx.run_prog(PROG_FROM_NETDEV, &frame(PROTO_TCP, EXT, NODE, 45003, 30080, false));
    assert_eq!(strip_dsr_option(&tcp_syn).0, option(30080), "hybrid: TCP is DSR");

    // The backend's node: the option recorded (the packet goes on as it
    // came), and the backend's reply leaves from the frontend.
    let mut be = Fixture::new("dsr-be");
    be.set_config(config::NODEPORT_MODE, nodeport_mode::DSR);
    let (verdict, out) = be.run_prog(PROG_FROM_NETDEV, &to_backend);
    assert_eq!((verdict, &out), (TC_ACT_OK, &to_backend), "delivered as it came");
    let (k, v) = be
        .ct(CT_DIR_REPLY, REMOTE, 5353)
        .expect("the flow recorded from the option");
    assert_eq!((k.daddr, port_from_map(k.dport)), (addr_to_map(EXT), 45001));
    assert_eq!((v.nat_addr, port_from_map(v.nat_port)), (addr_to_map(NODE), 30053));
    assert_ne!(v.flags & ct_flags::DSR, 0);
    assert_eq!(be.counter(Counter::DsrAccept), 1);
    let reply = frame(PROTO_UDP, REMOTE, EXT, 5353, 45001, false);
    let (_, out) = be.run(&reply);
    let r = parse(&out);
    assert_eq!(
        (r.src, r.sport, r.dst, r.dport),
        (NODE, 30053, EXT, 45001),
        "from the frontend to the client"
    );
    assert_checksums(&out);
    assert_eq!(be.counter(Counter::DsrReply), 1);
    // An ICMP error the backend sends about the flow (quoting the datagram
    // as it got it: the option, the UDP header) reaches the client from the
    // frontend, about its own datagram to the frontend.
    let quoted = &to_backend[14..14 + 28 + 8];
    let err = icmp_error(REMOTE, EXT, 3, 3, quoted);
    let (_, out) = be.run(&err);
    assert_eq!(
        (&out[26..30], &out[30..34]),
        (&NODE[..], &EXT[..]),
        "from the frontend, to the client"
    );
    let q = &out[42..];
    assert_eq!(
        (&q[12..16], &q[16..20]),
        (&EXT[..], &NODE[..]),
        "the quote names the frontend"
    );
    assert_eq!(
        (u16::from_be_bytes([q[28], q[29]]), u16::from_be_bytes([q[30], q[31]])),
        (45001, 30053)
    );
    assert_eq!(fold(sum16(&out[14..34])), 0xffff, "outer IPv4 checksum");
    assert_eq!(fold(sum16(&out[34..])), 0xffff, "ICMP checksum");
    assert_eq!(fold(sum16(&q[..28])), 0xffff, "quoted IPv4 checksum (option included)");
    assert_eq!(be.counter(Counter::IcmpErrorTranslated), 1);
    // In SNAT mode a node ignores the option (nobody outside may steer a
    // Pod's replies).
    be.set_config(config::NODEPORT_MODE, nodeport_mode::SNAT);
    let (verdict, out) = be.run_prog(PROG_FROM_NETDEV, &tcp_syn);
    assert_eq!((verdict, &out), (TC_ACT_OK, &tcp_syn), "passed untouched");
    assert!(be.ct(CT_DIR_REPLY, REMOTE, 8080).is_none(), "not recorded in snat mode");
    assert_eq!(be.counter(Counter::DsrAccept), 1);
}

#[test]
fn xdp_passes_the_packets_that_need_the_dsr_option_to_tc_and_dnats_the_rest() {
    use ferry_common::{nodeport_mode, svc_flags::NODE_PORT};
    const NODE: [u8; 4] = [192, 168, 77, 11];
    const EXT: [u8; 4] = [192, 168, 77, 200];
    const REMOTE: [u8; 4] = [10, 244, 1, 5];
    let mut fx = Fixture::new("xdp-dsr");
    let ns = FibNetns::new("xdp-dsr");
    fx.external(NODE, 30080, 3, NODE_PORT, &[(1, REMOTE, 8080, 0)]);
    fx.frontend(NODE, PROTO_UDP, 30053, 4, NODE_PORT, &[(2, REMOTE, 5353, 0)], "np");
    fx.set_node_addr(NODE);
    fx.set_config(config::NODEPORT_MODE, nodeport_mode::DSR);
    let fd = fx.xdp_fd();
    // The SYN: the flow is opened (TC finds it) and the packet passed on
    // untouched, for TC to make the option's room.
    let syn = frame(PROTO_TCP, EXT, NODE, 45000, 30080, false);
    let (verdict, out) = ns.run(&fd, syn.clone());
    assert_eq!((verdict, &out), (XDP_PASS, &syn), "the SYN goes to TC as it came");
    let (_, fv) = fx.ct(CT_DIR_FORWARD, EXT, 45000).expect("opened by XDP");
    assert_ne!(fv.flags & ct_flags::DSR, 0);
    // So does every UDP datagram.
    let dgram = frame(PROTO_UDP, EXT, NODE, 45001, 30053, false);
    let (verdict, out) = ns.run(&fd, dgram.clone());
    assert_eq!((verdict, &out), (XDP_PASS, &dgram));
    // The rest of the connection: DNAT only, the client kept, sent by XDP.
    let ack = with_flags(frame(PROTO_TCP, EXT, NODE, 45000, 30080, false), ACK);
    let (verdict, out) = ns.run(&fd, ack);
    assert_eq!(verdict, XDP_REDIRECT, "XDP sends it out itself");
    let p = parse(&out);
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (EXT, 45000, REMOTE, 8080),
        "DNAT only"
    );
    assert_eq!(macs(&out), (NODE2_MAC, NODE_MAC));
    assert_checksums(&out);
    assert_eq!(fx.counter(Counter::XdpForward), 1);
    assert_eq!(fx.counter(Counter::DsrForward), 1);
}
