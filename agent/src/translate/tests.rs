use super::*;
use crate::{endpoints, model::Sourced};
use ferry_common::svc_flags;
use ferry_podstate::{ContainerPortRecord, PodRecord};
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};
use std::net::Ipv4Addr;

/// An IPv4 address, as the translation holds it.
fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    Ipv4Addr::new(a, b, c, d).into()
}

/// An address as the translation parses it.
fn parse_ipv4(s: &str) -> Result<IpAddr, String> {
    parse_ip(s)
}

fn last_octet(a: IpAddr) -> u8 {
    match a {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    }
}

fn svc(y: &str) -> Sourced<Service> {
    Sourced::new("s.yaml", serde_yaml::from_str(y).expect("test service parses"))
}
fn slice(y: &str) -> Sourced<EndpointSlice> {
    Sourced::new("e.yaml", serde_yaml::from_str(y).expect("test slice parses"))
}
fn pod(name: &str, ip: [u8; 4], ready: bool, terminating: bool) -> PodRecord {
    PodRecord {
        name: name.into(),
        namespace: "default".into(),
        node: "n1".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
        ports: vec![ContainerPortRecord {
            name: Some("http".into()),
            container_port: 8080,
            protocol: "TCP".into(),
        }],
        pod_ip: Some(Ipv4Addr::from(ip)),
        host_ip: None,
        phase: "Running".into(),
        ready,
        terminating,
        netns: None,
        restarts: 0,
    }
}
const WEB: &str = "metadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: http}\n  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}\n";

fn run(s: &Snapshot) -> Translation {
    translate(s, &Config::default())
}

/// A selector-less Service `zoned` with one EndpointSlice whose
/// endpoints are given as (last octet, zone hints, ready).
fn zoned(extra_spec: &str, eps: &[(u8, &[&str], bool)]) -> Snapshot {
    let mut y = String::from("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: zoned-1, namespace: default, labels: {kubernetes.io/service-name: zoned}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n");
    for (last, zones, ready) in eps {
        let hints = if zones.is_empty() {
            String::new()
        } else {
            format!(
                ", hints: {{forZones: [{}]}}",
                zones
                    .iter()
                    .map(|z| format!("{{name: {z}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        y += &format!("- {{addresses: [10.244.0.{last}], conditions: {{ready: {ready}}}{hints}}}\n");
    }
    Snapshot {
        services: vec![svc(&format!("metadata: {{name: zoned, namespace: default}}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{{name: http, port: 80}}]\n{extra_spec}"))],
        endpoint_slices: vec![slice(&y)],
        nodes: vec![node("n1", "zone-a"), node("n2", "zone-b")],
        ..Default::default()
    }
}

fn node(name: &str, zone: &str) -> Sourced<k8s_openapi::api::core::v1::Node> {
    let y = format!("metadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n");
    Sourced::new("nodes.yaml", serde_yaml::from_str(&y).expect("test node parses"))
}

/// The last octets of the usable and of the draining backends of the
/// only frontend, translated on node `node`.
fn usable_on(s: &Snapshot, node: &str) -> (Vec<u8>, Vec<u8>) {
    let t = translate(
        s,
        &Config {
            node: node.into(),
            ..Config::default()
        },
    );
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let f = &t.frontends[0];
    let last = |b: &[BackendSpec]| b.iter().map(|b| last_octet(b.addr)).collect();
    (last(&f.backends), last(&f.draining))
}

#[test]
fn zone_hints_keep_a_zones_clients_on_its_endpoints_as_kube_proxy_does() {
    let s = zoned(
        "",
        &[(1, &["zone-a"], true), (2, &["zone-a"], true), (3, &["zone-b"], true)],
    );
    assert_eq!(
        usable_on(&s, "n1"),
        (vec![1, 2], vec![3]),
        "zone-a: its two endpoints; the other drains"
    );
    assert_eq!(usable_on(&s, "n2"), (vec![3], vec![1, 2]));
    // A node without a zone label, or an unknown node: every endpoint.
    assert_eq!(usable_on(&s, "n9"), (vec![1, 2, 3], vec![]));
    // No endpoint hinted for the zone (they went away): every endpoint.
    let s = zoned("", &[(3, &["zone-b"], true), (4, &["zone-b"], true)]);
    assert_eq!(usable_on(&s, "n1"), (vec![3, 4], vec![]));
    // The zone's only endpoint is not ready: hints of ready endpoints only count.
    let s = zoned("", &[(1, &["zone-a"], false), (3, &["zone-b"], true)]);
    assert_eq!(usable_on(&s, "n1"), (vec![3], vec![1]));
    // One ready endpoint without a hint turns the hints off.
    let s = zoned("", &[(1, &["zone-a"], true), (3, &[], true)]);
    assert_eq!(usable_on(&s, "n1"), (vec![1, 3], vec![]));
    // An endpoint may serve several zones.
    let s = zoned("", &[(1, &["zone-a", "zone-b"], true), (3, &["zone-b"], true)]);
    assert_eq!(usable_on(&s, "n2"), (vec![1, 3], vec![]));
    assert_eq!(usable_on(&s, "n1"), (vec![1], vec![3]));
}

#[test]
fn zone_hints_do_not_apply_under_local_traffic_policies() {
    let mut s = zoned(
        "  internalTrafficPolicy: Local\n",
        &[(1, &["zone-a"], true), (3, &["zone-b"], true)],
    );
    // Local policy: endpoints on this node (none here have a node), no topology.
    assert_eq!(usable_on(&s, "n1"), (vec![], vec![1, 3]));
    s.services = vec![svc("metadata: {name: zoned, namespace: default}\nspec:\n  type: NodePort\n  externalTrafficPolicy: Local\n  clusterIP: 10.96.0.20\n  ports: [{name: http, port: 80, nodePort: 30080}]\n")];
    let cfg = Config {
        node: "n1".into(),
        nodeport_addrs: vec![v4(192, 168, 77, 11)],
        ..Config::default()
    };
    let t = translate(&s, &cfg);
    let np = t
        .frontends
        .iter()
        .find(|f| f.flags & svc_flags::NODE_PORT != 0 && f.flags & svc_flags::INTERNAL == 0)
        .unwrap();
    assert!(
        np.backends.is_empty(),
        "externalTrafficPolicy: Local uses local endpoints only"
    );
    let cluster_ip = t
        .frontends
        .iter()
        .find(|f| f.flags & svc_flags::CLUSTER_IP != 0)
        .unwrap();
    assert_eq!(
        cluster_ip
            .backends
            .iter()
            .map(|b| last_octet(b.addr))
            .collect::<Vec<_>>(),
        [1],
        "the ClusterIP follows the hints"
    );
}

/// A selector Service `web` with `trafficDistribution: DISTRIBUTION` (none
/// when empty), its Pods (name, last octet, node) and the nodes (name, zone).
fn distributed(distribution: &str, pods: &[(&str, u8, &str)], nodes: &[(&str, &str)]) -> Snapshot {
    let field = if distribution.is_empty() {
        String::new()
    } else {
        format!("  trafficDistribution: {distribution}\n")
    };
    let y = format!("metadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {{app: web}}\n{field}  ports: [{{name: http, port: 80, targetPort: 8080}}]\n");
    Snapshot {
        services: vec![svc(&y)],
        pods: pods.iter().map(|&(name, ip, node)| pod_on(name, ip, node)).collect(),
        nodes: nodes.iter().map(|&(name, zone)| node(name, zone)).collect(),
        ..Default::default()
    }
}

/// A ready Pod of `web` on `node`.
fn pod_on(name: &str, ip: u8, node: &str) -> PodRecord {
    PodRecord {
        node: node.into(),
        ..pod(name, [10, 244, 0, ip], true, false)
    }
}

#[test]
fn prefer_close_hints_each_pod_for_its_nodes_zone_in_standalone_mode() {
    let pods = [("a", 1, "n1"), ("b", 2, "n2"), ("c", 3, "n2")];
    let mut s = distributed("PreferClose", &pods, &[("n1", "zone-a"), ("n2", "zone-b")]);
    assert_eq!(usable_on(&s, "n1"), (vec![1], vec![2, 3]));
    assert_eq!(usable_on(&s, "n2"), (vec![2, 3], vec![1]));
    // zone-a's Pod goes: n1 falls back to every endpoint.
    s.pods.remove(0);
    assert_eq!(usable_on(&s, "n1"), (vec![2, 3], vec![]));
    // A Pod on a node of unknown zone: no hints at all (as the controller).
    s.pods.push(pod_on("d", 4, "n3"));
    assert_eq!(usable_on(&s, "n2"), (vec![2, 3, 4], vec![]));
    // Without trafficDistribution the Pods get no hints.
    let s = distributed("", &pods[..2], &[("n1", "zone-a"), ("n2", "zone-b")]);
    assert_eq!(usable_on(&s, "n1"), (vec![1, 2], vec![]));
}

/// The slice of [`zoned`] with node hints too: (last octet, zone hints,
/// node hints, ready).
fn node_hinted(eps: &[(u8, &[&str], &[&str], bool)]) -> Snapshot {
    let zones: Vec<(u8, &[&str], bool)> = eps.iter().map(|&(l, z, _, r)| (l, z, r)).collect();
    let mut s = zoned("", &zones);
    for (ep, (_, _, nodes, _)) in s.endpoint_slices[0].object.endpoints.iter_mut().zip(eps) {
        if nodes.is_empty() {
            continue;
        }
        let hints = ep.hints.get_or_insert_with(Default::default);
        hints.for_nodes = Some(
            nodes
                .iter()
                .map(|n| k8s_openapi::api::discovery::v1::ForNode { name: n.to_string() })
                .collect(),
        );
    }
    s
}

#[test]
fn node_hints_keep_a_nodes_clients_on_its_endpoints_before_zone_hints() {
    let (a, b) = (&["zone-a"][..], &["zone-b"][..]);
    // PreferSameNode as the controller writes it: node and zone hints.
    let s = node_hinted(&[(1, a, &["n1"], true), (2, a, &["n1"], true), (3, b, &["n2"], true)]);
    assert_eq!(usable_on(&s, "n1"), (vec![1, 2], vec![3]), "n1: its own endpoints");
    assert_eq!(usable_on(&s, "n2"), (vec![3], vec![1, 2]));
    // A node with no endpoint hinted for it falls back to its zone's.
    let s = node_hinted(&[(1, a, &["n9"], true), (3, b, &["n2"], true)]);
    assert_eq!(usable_on(&s, "n1"), (vec![1], vec![3]), "n1: no node hint, zone-a's");
    // One ready endpoint without a node hint turns node hints off (zone hints stay).
    let s = node_hinted(&[(1, a, &["n1"], true), (2, a, &[], true), (3, b, &["n2"], true)]);
    assert_eq!(usable_on(&s, "n1"), (vec![1, 2], vec![3]));
    // Only not-ready endpoints hinted for this node: they do not count.
    let s = node_hinted(&[(1, a, &["n1"], false), (3, b, &["n2"], true)]);
    assert_eq!(usable_on(&s, "n1"), (vec![3], vec![1]));
    // Node hints without zone hints, on a node of no zone: node hints alone.
    let s = node_hinted(&[(1, &[], &["n1"], true), (3, &[], &["n2"], true)]);
    assert_eq!(usable_on(&s, "n1"), (vec![1], vec![3]));
    assert_eq!(
        usable_on(&s, "n9"),
        (vec![1, 3], vec![]),
        "an unknown node: every endpoint"
    );
}

#[test]
fn prefer_same_node_hints_each_pod_for_its_node_in_standalone_mode() {
    let mut s = distributed(
        "PreferSameNode",
        &[("a", 1, "n1"), ("b", 2, "n2"), ("c", 3, "n3")],
        &[("n1", "zone-a"), ("n2", "zone-b"), ("n3", "zone-b")],
    );
    assert_eq!(usable_on(&s, "n1"), (vec![1], vec![2, 3]));
    assert_eq!(usable_on(&s, "n2"), (vec![2], vec![1, 3]));
    // n2's Pod goes: n2 falls back to its zone (zone-b: n3's Pod).
    s.pods.remove(1);
    assert_eq!(usable_on(&s, "n2"), (vec![3], vec![1]));
}

#[test]
fn the_lb_algorithm_comes_from_the_flag_or_the_services_annotation() {
    let with = |ann: &str| {
        let y = WEB.replace(
            "metadata: {name: web, namespace: default}",
            &format!("metadata: {{name: web, namespace: default{ann}}}"),
        );
        Snapshot {
            services: vec![svc(&y)],
            pods: vec![pod("a", [10, 244, 0, 2], true, false)],
            ..Default::default()
        }
    };
    let maglev = |s: &Snapshot, algo: LbAlgorithm| {
        let t = translate(
            s,
            &Config {
                lb_algorithm: algo,
                ..Config::default()
            },
        );
        let flags: Vec<bool> = t.frontends.iter().map(|f| f.flags & svc_flags::MAGLEV != 0).collect();
        (flags, t.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>())
    };
    let none: Vec<String> = vec![];
    assert_eq!(
        maglev(&with(""), LbAlgorithm::Random),
        (vec![false, false], none.clone())
    );
    assert_eq!(maglev(&with(""), LbAlgorithm::Maglev), (vec![true, true], none.clone()));
    let ann = |v: &str| with(&format!(", annotations: {{{LB_ALGORITHM_ANNOTATION}: {v}}}"));
    assert_eq!(
        maglev(&ann("maglev"), LbAlgorithm::Random),
        (vec![true, true], none.clone())
    );
    assert_eq!(maglev(&ann("random"), LbAlgorithm::Maglev), (vec![false, false], none));
    let (flags, errors) = maglev(&ann("ring-hash"), LbAlgorithm::Random);
    assert_eq!(flags, [false, false], "a bad value: the flag applies");
    assert_eq!(
        errors,
        [format!("s.yaml: Service default/web: metadata.annotations[{LB_ALGORITHM_ANNOTATION}]: unknown value \"ring-hash\" (random, maglev); --lb-algorithm applies")]
    );
}

#[test]
fn clusterip_with_selector_multi_port_and_named_target_port() {
    let s = Snapshot {
        services: vec![svc(WEB)],
        pods: vec![
            pod("a", [10, 244, 0, 2], true, false),
            pod("b", [10, 244, 0, 3], true, false),
        ],
        ..Default::default()
    };
    let t = run(&s);
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    assert_eq!(t.frontends.len(), 2);
    let dns = &t.frontends[0];
    assert_eq!((dns.addr, dns.port, dns.proto), (v4(10, 96, 0, 10), 53, PROTO_UDP));
    assert_eq!(dns.backends.iter().map(|b| b.port).collect::<Vec<_>>(), [5353, 5353]);
    let http = &t.frontends[1];
    assert_eq!(http.id.to_string(), "default/web:http (ClusterIP)");
    assert_eq!(http.flags, svc_flags::CLUSTER_IP);
    // Named targetPort: resolved through the Pod's ports ("http" is TCP 8080).
    assert_eq!(
        http.backends,
        vec![
            BackendSpec {
                addr: v4(10, 244, 0, 2),
                port: 8080,
                terminating: false,
                local: false,
            },
            BackendSpec {
                addr: v4(10, 244, 0, 3),
                port: 8080,
                terminating: false,
                local: false,
            },
        ]
    );
}

#[test]
fn not_ready_pods_are_left_out_and_terminating_ones_are_the_fallback() {
    let mut s = Snapshot {
        services: vec![svc(WEB)],
        pods: vec![
            pod("a", [10, 244, 0, 2], true, false),
            pod("b", [10, 244, 0, 3], false, false),
        ],
        ..Default::default()
    };
    let t = run(&s);
    assert_eq!(t.frontends[1].backends.len(), 1, "only the ready Pod");
    // Nothing ready; a serving+terminating Pod still takes new connections.
    s.pods = vec![
        pod("a", [10, 244, 0, 2], true, true),
        pod("b", [10, 244, 0, 3], false, false),
    ];
    let t = run(&s);
    let http = &t.frontends[1];
    assert_eq!(
        http.backends,
        vec![BackendSpec {
            addr: v4(10, 244, 0, 2),
            port: 8080,
            terminating: true,
            local: false,
        }]
    );
    assert_ne!(http.flags & svc_flags::TERMINATING_FALLBACK, 0);
    // No Pods: the frontend exists with no backends.
    s.pods.clear();
    assert!(run(&s).frontends.iter().all(|f| f.backends.is_empty()));
}

#[test]
fn health_check_counts_local_ready_endpoints_and_no_terminating_fallback() {
    let y = "metadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]\n";
    let cfg = Config {
        node: "n1".into(),
        nodeport_addrs: vec![v4(192, 168, 77, 11)],
        ..Config::default()
    };
    let count = |pods: Vec<PodRecord>| {
        let t = translate(
            &Snapshot {
                services: vec![svc(y)],
                pods,
                ..Default::default()
            },
            &cfg,
        );
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        t.health_checks.get(&32000).map(|h| h.local_endpoints)
    };
    let ready = pod("a", [10, 244, 0, 2], true, false);
    let terminating = pod("b", [10, 244, 0, 3], true, true);
    assert_eq!(count(vec![ready.clone(), terminating.clone()]), Some(1));
    // Only a serving+terminating endpoint left: it takes new connections
    // (the fallback), but the node reports none, so load balancers drain it.
    assert_eq!(count(vec![terminating]), Some(0));
    assert_eq!(count(Vec::new()), Some(0));
}

#[test]
fn publish_not_ready_addresses_serves_pods_that_are_not_ready() {
    let y = "metadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  publishNotReadyAddresses: true\n  ports: [{name: http, port: 80, targetPort: http}]\n";
    let unready = pod("a", [10, 244, 0, 2], false, false);
    let t = run(&Snapshot {
        services: vec![svc(y)],
        pods: vec![unready.clone()],
        ..Default::default()
    });
    assert_eq!(
        t.frontends[0].backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
        [v4(10, 244, 0, 2)]
    );
    let t = run(&Snapshot {
        services: vec![svc(WEB)],
        pods: vec![unready],
        ..Default::default()
    });
    assert!(
        t.frontends.iter().all(|f| f.backends.is_empty()),
        "without it, no backend"
    );
    // The conditions, as the EndpointSlice controller sets them: ready =
    // publishNotReadyAddresses || (podReady && !terminating), serving =
    // podReady.
    let pods = [
        pod("a", [10, 244, 0, 2], true, false),
        pod("b", [10, 244, 0, 3], false, false),
        pod("c", [10, 244, 0, 4], true, true),
        pod("d", [10, 244, 0, 5], false, true),
    ];
    let selector: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
    let port: ServicePort = serde_json::from_str(r#"{"port": 80, "targetPort": 8080}"#).expect("valid port");
    let conditions = |publish| {
        endpoints::from_pods("default", &selector, &port, &pods, publish)
            .iter()
            .map(|e| (e.ready, e.serving, e.terminating))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        conditions(false),
        [
            (true, true, false),
            (false, false, false),
            (false, true, true),
            (false, false, true)
        ]
    );
    assert_eq!(
        conditions(true),
        [
            (true, true, false),
            (true, false, false),
            (true, true, true),
            (true, false, true)
        ]
    );
}

#[test]
fn unusual_ip_spellings_are_refused_with_the_object_and_field_never_misread() {
    assert_eq!(parse_ipv4("10.96.0.10"), Ok(v4(10, 96, 0, 10)));
    for bad in [
        "010.096.000.010",
        "10.96.0.010",
        " 10.96.0.10",
        "10.96.0.10 ",
        "0x0a.96.0.10",
        "10.96.10",
        "167772170",
    ] {
        let why = parse_ipv4(bad).expect_err(bad);
        assert!(why.starts_with("not an IPv4 address"), "{bad}: {why}");
    }
    assert!(parse_ipv4("10.96.0.010").unwrap_err().contains("leading zeros"));
    assert!(parse_ipv4(" 10.96.0.10").unwrap_err().contains("whitespace"));
    let services = [
        "metadata: {name: octal, namespace: default}\nspec:\n  clusterIP: \"010.096.000.010\"\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
        "metadata: {name: ext, namespace: default}\nspec:\n  clusterIP: 10.96.0.20\n  externalIPs: [\" 203.0.113.10\", \"203.0.113.011\", 203.0.113.12]\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    ];
    let s = Snapshot {
        services: services.iter().map(|y| svc(y)).collect(),
        endpoint_slices: vec![slice(
            "metadata: {name: ext-1, namespace: default, labels: {kubernetes.io/service-name: ext}}\naddressType: IPv4\nendpoints:\n- addresses: [\"010.244.000.002\"]\n- addresses: [10.244.0.3]\nports: [{name: http, port: 8080}]\n",
        )],
        endpoints: vec![Sourced::new(
            "e.yaml",
            serde_yaml::from_str::<Endpoints>(
                "metadata: {name: ext, namespace: default}\nsubsets: [{addresses: [{ip: \"10.244.0.04\"}], ports: [{name: http, port: 8080}]}]\n",
            )
            .expect("test endpoints parse"),
        )],
        ..Default::default()
    };
    let t = run(&s);
    let errors: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
    for want in [
        "Service default/octal: spec.clusterIP: \"010.096.000.010\": not an IPv4 address: leading zeros",
        "Service default/ext: spec.externalIPs[0]: \" 203.0.113.10\" is not an IPv4 address: it has surrounding whitespace",
        "Service default/ext: spec.externalIPs[1]: \"203.0.113.011\" is not an IPv4 address: leading zeros",
        "EndpointSlice default/ext-1: endpoints[0].addresses[0]: \"010.244.000.002\" is not an IPv4 address: leading zeros",
        "Endpoints default/ext: subsets[0].addresses[0].ip: \"10.244.0.04\" is not an IPv4 address: leading zeros",
    ] {
        assert!(errors.iter().any(|e| e.contains(want)), "no error {want:?} in {errors:#?}");
    }
    assert_eq!(errors.len(), 5, "{errors:#?}");
    // Nothing misread: no octal (8.78.0.8) or decimal reading of the bad
    // spellings, the good externalIP and endpoint served.
    let frontends: Vec<(IpAddr, Vec<IpAddr>)> = t
        .frontends
        .iter()
        .map(|f| (f.addr, f.backends.iter().map(|b| b.addr).collect()))
        .collect();
    let good = vec![v4(10, 244, 0, 3)];
    assert_eq!(
        frontends,
        [(v4(10, 96, 0, 20), good.clone()), (v4(203, 0, 113, 12), good)],
        "{frontends:?}"
    );
}

#[test]
fn headless_and_external_name_get_nothing_and_no_error() {
    let s = Snapshot {
        services: vec![
            svc("metadata: {name: h}\nspec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}\n"),
            svc("metadata: {name: x}\nspec: {type: ExternalName, externalName: example.org}\n"),
        ],
        ..Default::default()
    };
    let t = run(&s);
    assert!(t.frontends.is_empty() && t.errors.is_empty(), "{t:?}");
}

#[test]
fn services_of_another_proxy_or_labelled_headless_are_left_out_until_the_label_goes() {
    let web = |labels: &str| {
        svc(&format!(
            "metadata: {{name: web, labels: {{{labels}}}}}\nspec: {{clusterIP: 10.96.0.20, ports: [{{port: 80}}]}}\n"
        ))
    };
    for label in [
        "service.kubernetes.io/service-proxy-name: other",
        "service.kubernetes.io/headless: \"\"",
    ] {
        let t = run(&Snapshot {
            services: vec![web(label)],
            ..Default::default()
        });
        assert!(t.frontends.is_empty() && t.errors.is_empty(), "{label}: {t:?}");
    }
    let t = run(&Snapshot {
        services: vec![web("app: web")],
        ..Default::default()
    });
    assert_eq!(t.frontends.len(), 1, "served once the label is gone");
}

#[test]
fn load_balancer_ingress_in_proxy_ip_mode_is_not_served_on_the_node() {
    let mut lb = lb_svc("", "");
    let ing = lb
        .object
        .status
        .as_mut()
        .unwrap()
        .load_balancer
        .as_mut()
        .unwrap()
        .ingress
        .as_mut()
        .unwrap();
    ing[0].ip_mode = Some("Proxy".into());
    ing.push(k8s_openapi::api::core::v1::LoadBalancerIngress {
        ip: Some("203.0.113.21".into()),
        ip_mode: Some("VIP".into()),
        ..Default::default()
    });
    let t = run_lb(lb);
    let lb_ips: Vec<IpAddr> = t
        .frontends
        .iter()
        .filter(|f| f.flags & svc_flags::LOAD_BALANCER != 0)
        .map(|f| f.addr)
        .collect();
    assert_eq!(lb_ips, [v4(203, 0, 113, 21)], "only the VIP-mode ingress");
}

#[test]
fn bad_ports_and_protocols_name_the_field_and_spare_the_rest() {
    let s = Snapshot {
        services: vec![svc(
            "metadata: {name: bad}\nspec:\n  clusterIP: 10.96.0.20\n  ports:\n  - {name: a, port: 70000}\n  - {name: b, port: 81, protocol: QUIC}\n  - {name: c, port: 82, protocol: SCTP}\n  - {name: d, port: 83, targetPort: 0}\n  - {name: ok, port: 84}\n",
        )],
        ..Default::default()
    };
    let t = run(&s);
    let msgs: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
    assert_eq!(msgs.len(), 4, "{msgs:#?}");
    assert!(
        msgs[0].contains("s.yaml: Service default/bad: spec.ports[0].port: 70000 out of range 1-65535"),
        "{msgs:#?}"
    );
    assert!(
        msgs[1].contains("spec.ports[1].protocol: unknown protocol \"QUIC\""),
        "{msgs:#?}"
    );
    assert!(
        msgs[2].contains("spec.ports[2].protocol: SCTP is not supported yet"),
        "{msgs:#?}"
    );
    assert!(msgs[3].contains("spec.ports[3].targetPort"), "{msgs:#?}");
    assert_eq!(t.frontends.len(), 1);
    assert_eq!(t.frontends[0].port, 84);
}

#[test]
fn selectorless_services_use_slices_and_endpoints_and_orphans_are_errors() {
    let s = Snapshot {
        services: vec![
            svc("metadata: {name: manual}\nspec: {clusterIP: 10.96.0.30, ports: [{name: web, port: 8000}]}\n"),
            svc("metadata: {name: legacy}\nspec: {clusterIP: 10.96.0.31, ports: [{port: 9000}]}\n"),
        ],
        endpoint_slices: vec![
            slice("metadata: {name: manual-1, labels: {kubernetes.io/service-name: manual}}\naddressType: IPv4\nendpoints:\n- {addresses: [10.0.0.1], conditions: {ready: true}}\n- {addresses: [10.0.0.2], conditions: {ready: false}}\nports: [{name: web, port: 8080}]\n"),
            slice("metadata: {name: nobody-1, labels: {kubernetes.io/service-name: nobody}}\naddressType: IPv4\nendpoints: []\n"),
        ],
        endpoints: vec![Sourced::new(
            "e.yaml",
            serde_yaml::from_str::<Endpoints>("metadata: {name: legacy}\nsubsets: [{addresses: [{ip: 10.0.1.1}], ports: [{port: 9090}]}]\n").unwrap(),
        )],
        ..Default::default()
    };
    let t = run(&s);
    assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
    assert!(
        t.errors[0].to_string().contains("EndpointSlice default/nobody-1"),
        "{}",
        t.errors[0]
    );
    assert!(
        t.errors[0].to_string().contains("unknown Service default/nobody"),
        "{}",
        t.errors[0]
    );
    let manual = t.frontends.iter().find(|f| f.port == 8000).unwrap();
    assert_eq!(
        manual.backends,
        vec![BackendSpec {
            addr: v4(10, 0, 0, 1),
            port: 8080,
            terminating: false,
            local: false,
        }]
    );
    let legacy = t.frontends.iter().find(|f| f.port == 9000).unwrap();
    assert_eq!(
        legacy.backends,
        vec![BackendSpec {
            addr: v4(10, 0, 1, 1),
            port: 9090,
            terminating: false,
            local: false,
        }]
    );
}

#[test]
fn cluster_mode_uses_slices_for_services_with_a_selector() {
    // Two slices of one Service (merged by the service-name label); the Pods
    // the shim reports do not count in cluster mode.
    let mut s = Snapshot {
        services: vec![svc(WEB)],
        endpoint_slices: vec![
            slice("metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n- {addresses: [10.0.0.1], nodeName: n1, conditions: {ready: true, serving: true, terminating: false}}\n- {addresses: [10.0.0.2], nodeName: n2, conditions: {ready: false, serving: true, terminating: true}}\nports: [{name: http, port: 8080, protocol: TCP}]\n"),
            slice("metadata: {name: web-2, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n- {addresses: [10.0.0.3], nodeName: n2, conditions: {ready: true}}\nports: [{name: http, port: 8080, protocol: TCP}]\n"),
        ],
        pods: vec![pod("a", [10, 244, 0, 2], true, false)],
        ..Default::default()
    };
    let cfg = Config {
        pod_endpoints: false,
        node: "n1".into(),
        ..Config::default()
    };
    let t = translate(&s, &cfg);
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let http = t.frontends.iter().find(|f| f.port == 80).unwrap();
    let addrs: Vec<_> = http.backends.iter().map(|b| b.addr).collect();
    assert_eq!(addrs, [v4(10, 0, 0, 1), v4(10, 0, 0, 3)]);
    // nodeName tells local from remote.
    let local: Vec<_> = http.backends.iter().map(|b| b.local).collect();
    assert_eq!(local, [true, false]);
    assert_eq!(http.flags & svc_flags::TERMINATING_FALLBACK, 0);
    // No ready endpoint left: the serving+terminating one takes new connections.
    s.endpoint_slices.truncate(1);
    s.endpoint_slices[0]
        .object
        .endpoints
        .retain(|e| e.addresses[0] == "10.0.0.2");
    let t = translate(&s, &cfg);
    let http = t.frontends.iter().find(|f| f.port == 80).unwrap();
    assert_eq!(
        http.backends,
        vec![BackendSpec {
            addr: v4(10, 0, 0, 2),
            port: 8080,
            terminating: true,
            local: false,
        }]
    );
    assert_ne!(http.flags & svc_flags::TERMINATING_FALLBACK, 0);
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_earlier_service() {
    let s = Snapshot {
        services: vec![
            svc("metadata: {name: b-later}\nspec: {clusterIP: 10.96.0.40, ports: [{port: 80}]}\n"),
            svc("metadata: {name: a-first}\nspec: {clusterIP: 10.96.0.40, ports: [{port: 80}, {port: 81}]}\n"),
        ],
        ..Default::default()
    };
    let t = run(&s);
    assert_eq!(
        t.frontends.iter().map(|f| f.id.to_string()).collect::<Vec<_>>(),
        ["default/a-first:80 (ClusterIP)", "default/a-first:81 (ClusterIP)"]
    );
    assert_eq!(t.errors.len(), 1);
    assert!(
        t.errors[0].to_string().contains(
            "Service default/b-later: spec.ports[0]: 10.96.0.40:80/TCP is already used by Service default/a-first"
        ),
        "{}",
        t.errors[0]
    );
}

#[test]
fn session_affinity_default_explicit_and_bad_timeouts() {
    let base = "metadata: {name: aff}\nspec:\n  clusterIP: 10.96.0.50\n  ports: [{port: 80}]\n";
    let t = run(&Snapshot {
        services: vec![svc(&format!("{base}  sessionAffinity: ClientIP\n"))],
        ..Default::default()
    });
    assert_eq!(t.frontends[0].affinity_timeout, DEFAULT_AFFINITY_TIMEOUT);
    assert_ne!(t.frontends[0].flags & svc_flags::AFFINITY, 0);
    let t = run(&Snapshot {
        services: vec![svc(&format!(
            "{base}  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 2}}}}\n"
        ))],
        ..Default::default()
    });
    assert_eq!(t.frontends[0].affinity_timeout, 2);
    let t = run(&Snapshot {
        services: vec![svc(base)],
        ..Default::default()
    });
    assert_eq!(
        (
            t.frontends[0].affinity_timeout,
            t.frontends[0].flags & svc_flags::AFFINITY
        ),
        (0, 0)
    );
    let t = run(&Snapshot {
        services: vec![svc(&format!(
            "{base}  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 0}}}}\n"
        ))],
        ..Default::default()
    });
    assert!(t.frontends.is_empty());
    assert!(
        t.errors[0].to_string().contains(
            "Service default/aff: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 out of range 1-86400"
        ),
        "{}",
        t.errors[0]
    );
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
    let local = "metadata: {name: loc}\nspec:\n  clusterIP: 10.96.0.60\n  internalTrafficPolicy: Local\n  ports: [{name: web, port: 80}]\n";
    let slice_yaml = |node: &str| {
        format!("metadata: {{name: loc-1, labels: {{kubernetes.io/service-name: loc}}}}\naddressType: IPv4\nendpoints:\n- {{addresses: [10.0.0.1], nodeName: n1}}\n- {{addresses: [10.0.0.2], nodeName: {node}}}\nports: [{{name: web, port: 8080}}]\n")
    };
    // The Service translated on `node`, with loc-1's endpoints on n1 and n2.
    let on = |node: &str, service: &str| {
        let cfg = Config {
            node: node.into(),
            ..Config::default()
        };
        let snapshot = Snapshot {
            services: vec![svc(service)],
            endpoint_slices: vec![slice(&slice_yaml("n2"))],
            ..Default::default()
        };
        translate(&snapshot, &cfg)
    };
    let t = on("n1", local);
    let f = &t.frontends[0];
    assert_ne!(f.flags & svc_flags::ITP_LOCAL, 0);
    assert_eq!(
        f.backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
        [v4(10, 0, 0, 1)],
        "only n1's endpoint"
    );
    assert_eq!(
        f.draining.iter().map(|b| b.addr).collect::<Vec<_>>(),
        [v4(10, 0, 0, 2)],
        "the remote one only keeps its flows"
    );
    // On another node: no local endpoint, no backend (the dataplane rejects).
    assert!(on("n3", local).frontends[0].backends.is_empty());
    // Cluster policy (the default) uses both.
    let cluster = local.replace("internalTrafficPolicy: Local", "internalTrafficPolicy: Cluster");
    assert_eq!(on("n3", &cluster).frontends[0].backends.len(), 2);
    let t = on("n1", &local.replace("Local", "Nearby"));
    assert!(
        t.errors[0]
            .to_string()
            .contains("spec.internalTrafficPolicy: unknown value \"Nearby\""),
        "{}",
        t.errors[0]
    );
}

#[test]
fn not_ready_and_terminating_endpoints_drain() {
    let s = Snapshot {
        services: vec![svc(WEB)],
        pods: vec![
            pod("a", [10, 244, 0, 2], true, false),
            pod("b", [10, 244, 0, 3], false, false),
            pod("c", [10, 244, 0, 4], true, true),
        ],
        ..Default::default()
    };
    let http = &run(&s).frontends[1];
    assert_eq!(http.backends.len(), 1);
    assert_eq!(
        http.draining,
        vec![
            BackendSpec {
                addr: v4(10, 244, 0, 3),
                port: 8080,
                terminating: false,
                local: false,
            },
            BackendSpec {
                addr: v4(10, 244, 0, 4),
                port: 8080,
                terminating: true,
                local: false,
            },
        ]
    );
}

#[test]
fn named_target_ports_resolve_per_endpoint_and_protocols_share_a_port_number() {
    let dns = "metadata: {name: dns, namespace: default}\nspec:\n  clusterIP: 10.96.0.70\n  selector: {app: web}\n  ports:\n  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: dns-tcp}\n  - {name: dns, port: 53, protocol: UDP, targetPort: dns}\n";
    let mut a = pod("a", [10, 244, 0, 2], true, false);
    a.ports = vec![
        ContainerPortRecord {
            name: Some("dns-tcp".into()),
            container_port: 5300,
            protocol: "TCP".into(),
        },
        ContainerPortRecord {
            name: Some("dns".into()),
            container_port: 5301,
            protocol: "UDP".into(),
        },
    ];
    let mut b = pod("b", [10, 244, 0, 3], true, false);
    b.ports = vec![
        ContainerPortRecord {
            name: Some("dns-tcp".into()),
            container_port: 6300,
            protocol: "TCP".into(),
        },
        // Same name, wrong protocol: not this port's endpoint for UDP.
        ContainerPortRecord {
            name: Some("dns".into()),
            container_port: 6301,
            protocol: "TCP".into(),
        },
    ];
    let t = run(&Snapshot {
        services: vec![svc(dns)],
        pods: vec![a, b],
        ..Default::default()
    });
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let ports = |proto: u8| {
        let f = t.frontends.iter().find(|f| f.proto == proto).unwrap();
        assert_eq!((f.addr, f.port), (v4(10, 96, 0, 70), 53));
        f.backends
            .iter()
            .map(|b| (last_octet(b.addr), b.port))
            .collect::<Vec<_>>()
    };
    assert_eq!(t.frontends.len(), 2, "TCP and UDP on port 53 are two frontends");
    assert_eq!(ports(PROTO_TCP), [(2, 5300), (3, 6300)]);
    assert_eq!(ports(PROTO_UDP), [(2, 5301)]);

    // EndpointSlices: the slice's port for the name, per slice.
    let svc2 = "metadata: {name: multi}\nspec:\n  clusterIP: 10.96.0.71\n  ports:\n  - {name: web, port: 80, targetPort: http}\n";
    let t = run(&Snapshot {
        services: vec![svc(svc2)],
        endpoint_slices: vec![
            slice("metadata: {name: multi-1, labels: {kubernetes.io/service-name: multi}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\nports: [{name: web, port: 8080}]\n"),
            slice("metadata: {name: multi-2, labels: {kubernetes.io/service-name: multi}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.2]}]\nports: [{name: web, port: 9090}]\n"),
        ],
        ..Default::default()
    });
    assert_eq!(
        t.frontends[0]
            .backends
            .iter()
            .map(|b| (last_octet(b.addr), b.port))
            .collect::<Vec<_>>(),
        [(1, 8080), (2, 9090)]
    );
}

#[test]
fn cluster_ips_are_allocated_stably_inside_the_range() {
    let a = svc("metadata: {name: a}\nspec: {ports: [{port: 80}]}\n");
    let b = svc("metadata: {name: b}\nspec: {ports: [{port: 80}]}\n");
    let t1 = run(&Snapshot {
        services: vec![a.clone(), b.clone()],
        ..Default::default()
    });
    let t2 = run(&Snapshot {
        services: vec![b, a],
        ..Default::default()
    });
    let ips = |t: &Translation| {
        t.frontends
            .iter()
            .map(|f| (f.id.clone(), f.addr))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(ips(&t1), ips(&t2), "order of input does not matter");
    let range: IpNet = "10.96.0.0/12".parse().unwrap();
    assert!(t1.frontends.iter().all(|f| range.contains(&f.addr)));
    assert_ne!(t1.frontends[0].addr, t1.frontends[1].addr);
}

#[test]
fn nodeport_externalip_and_loadbalancer_frontends() {
    let y = "metadata: {name: lb, namespace: default, creationTimestamp: \"2026-01-01T00:00:00Z\"}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.30\n  selector: {app: web}\n  externalIPs: [203.0.113.10, nope]\n  externalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, targetPort: http, nodePort: 30080}\n  - {name: big, port: 81, targetPort: http, nodePort: 40000}\n  - {name: auto, port: 82, targetPort: http}\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.20}]}}\n";
    let dup = "metadata: {name: dup, namespace: default, creationTimestamp: \"2026-01-02T00:00:00Z\"}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.31\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: http, nodePort: 30080}\n";
    let mut remote = pod("r", [10, 244, 1, 2], true, false);
    remote.node = "n2".into();
    let s = Snapshot {
        services: vec![svc(y), svc(dup)],
        pods: vec![pod("a", [10, 244, 0, 2], true, false), remote],
        ..Default::default()
    };
    let cfg = Config {
        node: "n1".into(),
        nodeport_addrs: vec![v4(192, 168, 77, 11), v4(192, 168, 77, 12)],
        ..Config::default()
    };
    let t = translate(&s, &cfg);
    let errors: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "s.yaml: Service default/lb: spec.ports[1].nodePort: 40000 is outside the NodePort range 30000-32767 (--service-node-port-range)",
            "s.yaml: Service default/lb: spec.externalIPs[1]: \"nope\" is not an IP address (externalIPs)",
            "s.yaml: Service default/dup: spec.ports[0].nodePort: 30080/TCP is already used by Service default/lb",
        ]
    );
    let of = |addr: [u8; 4], port: u16| {
        t.frontends
            .iter()
            .find(|f| f.addr == IpAddr::from(addr) && f.port == port)
    };
    // NodePort on every NodePort address; ExternalIP and LoadBalancer IP at
    // the Service port; externalTrafficPolicy: Local keeps the local backend.
    for (addr, port, kind) in [
        ([192, 168, 77, 11], 30080, svc_flags::NODE_PORT),
        ([192, 168, 77, 12], 30080, svc_flags::NODE_PORT),
        ([203, 0, 113, 10], 80, svc_flags::EXTERNAL_IP),
        ([203, 0, 113, 20], 80, svc_flags::LOAD_BALANCER),
    ] {
        let f = of(addr, port).unwrap_or_else(|| panic!("{addr:?}:{port} missing: {:?}", t.frontends));
        assert_eq!(f.flags & kind, kind);
        assert_ne!(f.flags & svc_flags::ETP_LOCAL, 0);
        assert_eq!(
            f.backends.iter().map(|b| (b.addr, b.local)).collect::<Vec<_>>(),
            [(v4(10, 244, 0, 2), true)]
        );
        assert_eq!(f.draining.len(), 1, "the remote endpoint keeps its flows only");
    }
    // The ClusterIP keeps both endpoints.
    assert_eq!(of([10, 96, 0, 30], 80).unwrap().backends.len(), 2);
    // The port without a nodePort gets one in the range, the same every time.
    // (Outside clients' frontends: each also has an in-cluster twin.)
    let auto: Vec<u16> = t
        .frontends
        .iter()
        .filter(|f| f.addr == v4(192, 168, 77, 11) && f.port != 30080 && f.flags & svc_flags::INTERNAL == 0)
        .map(|f| f.port)
        .collect();
    assert_eq!(auto.len(), 1, "{:?}", t.frontends);
    assert!((30000..=32767).contains(&auto[0]));
    assert!(translate(&s, &cfg).frontends.iter().any(|f| f.port == auto[0]));
    // No NodePort frontend for the out-of-range port, none for the duplicate.
    assert!(of([192, 168, 77, 11], 40000).is_none());
    assert!(!t
        .frontends
        .iter()
        .any(|f| f.addr == v4(10, 96, 0, 31) && f.backends.is_empty()));
}

#[test]
fn external_traffic_policy_local_gets_an_in_cluster_twin_with_every_nodes_endpoints() {
    let y = "metadata: {name: lb}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.30\n  externalTrafficPolicy: Local\n  externalIPs: [203.0.113.10]\n  ports: [{name: http, port: 80, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.20}]}}\n";
    let s = Snapshot {
        services: vec![svc(y)],
        endpoint_slices: vec![slice("metadata: {name: lb-1, labels: {kubernetes.io/service-name: lb}}\naddressType: IPv4\nendpoints:\n- {addresses: [10.0.0.1], nodeName: n1}\n- {addresses: [10.0.0.2], nodeName: n2}\nports: [{name: http, port: 8080}]\n")],
        ..Default::default()
    };
    let cfg = Config {
        node: "n1".into(),
        nodeport_addrs: vec![v4(192, 168, 77, 11)],
        ..Config::default()
    };
    let t = translate(&s, &cfg);
    let addrs = |f: &Frontend| f.backends.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>();
    for (addr, port) in [
        ([192, 168, 77, 11], 30080),
        ([203, 0, 113, 10], 80),
        ([203, 0, 113, 20], 80),
    ] {
        let of: Vec<&Frontend> = t
            .frontends
            .iter()
            .filter(|f| f.addr == IpAddr::from(addr) && f.port == port)
            .collect();
        assert_eq!(of.len(), 2, "{addr:?}: {of:?}");
        let (ext, twin) = (of[0], of[1]);
        assert_eq!(
            ext.flags & (svc_flags::ETP_LOCAL | svc_flags::INTERNAL_TWIN),
            svc_flags::ETP_LOCAL | svc_flags::INTERNAL_TWIN
        );
        assert_eq!(addrs(ext), ["10.0.0.1"], "outside clients: this node's endpoints");
        assert_eq!(
            twin.flags & (svc_flags::ETP_LOCAL | svc_flags::INTERNAL),
            svc_flags::INTERNAL
        );
        assert_eq!(
            addrs(twin),
            ["10.0.0.1", "10.0.0.2"],
            "in-cluster clients: every node's"
        );
    }
    // The ClusterIP has no twin, and externalTrafficPolicy: Cluster makes none.
    assert_eq!(t.frontends.iter().filter(|f| f.addr == v4(10, 96, 0, 30)).count(), 1);
    let t = translate(
        &Snapshot {
            services: vec![svc(&y.replace("Local", "Cluster"))],
            ..s.clone()
        },
        &cfg,
    );
    assert!(t
        .frontends
        .iter()
        .all(|f| f.flags & (svc_flags::INTERNAL | svc_flags::INTERNAL_TWIN) == 0));
}

/// A LoadBalancer Service at 203.0.113.20 (ingress) with a NodePort and an
/// externalIP, and `extra` lines appended to its metadata and spec.
fn lb_svc(meta: &str, spec: &str) -> Sourced<Service> {
    svc(&format!(
        "metadata:\n  name: lb\n  namespace: shop\n{meta}spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.80\n  externalIPs: [203.0.113.10]\n  ports: [{{name: http, port: 80, nodePort: 30080}}]\n{spec}status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.20}}]}}}}\n"
    ))
}

fn run_lb(s: Sourced<Service>) -> Translation {
    let cfg = Config {
        nodeport_addrs: vec![v4(192, 168, 77, 11)],
        ..Config::default()
    };
    translate(
        &Snapshot {
            services: vec![s],
            ..Default::default()
        },
        &cfg,
    )
}

/// (addr, flags, source ranges as text) of every frontend.
fn restrictions(t: &Translation) -> Vec<(IpAddr, u32, Vec<String>)> {
    t.frontends
        .iter()
        .map(|f| {
            (
                f.addr,
                f.flags & svc_flags::SOURCE_RANGES,
                f.source_ranges.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

#[test]
fn load_balancer_source_ranges_restrict_only_the_load_balancer_ips() {
    let t = run_lb(lb_svc(
        "",
        "  loadBalancerSourceRanges: [192.168.77.200/32, 10.1.2.3/16, 192.168.77.200, \" 172.16.0.0/12 \"]\n",
    ));
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let open = |a: [u8; 4]| (IpAddr::from(a), 0, Vec::<String>::new());
    assert_eq!(
        restrictions(&t),
        [
            open([10, 96, 0, 80]),
            open([192, 168, 77, 11]),
            open([203, 0, 113, 10]),
            (
                v4(203, 0, 113, 20),
                svc_flags::SOURCE_RANGES,
                // Sorted, host bits cleared, a bare address is a /32, duplicates once.
                vec![
                    "10.1.0.0/16".to_string(),
                    "172.16.0.0/12".into(),
                    "192.168.77.200/32".into()
                ]
            ),
        ],
        "ClusterIP, NodePort and externalIP stay open"
    );
    // 0.0.0.0/0 among them: anyone, no lookup at all.
    let t = run_lb(lb_svc("", "  loadBalancerSourceRanges: [10.0.0.0/8, 0.0.0.0/0]\n"));
    assert!(t
        .frontends
        .iter()
        .all(|f| f.flags & svc_flags::SOURCE_RANGES == 0 && f.source_ranges.is_empty()));
    // A NodePort Service has no LoadBalancer IP to restrict.
    let np = svc("metadata: {name: np}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.81\n  loadBalancerSourceRanges: [bad]\n  ports: [{port: 80}]\n");
    let t = run_lb(np);
    assert!(t.errors.is_empty(), "{:?}", t.errors);
}

#[test]
fn the_source_ranges_annotation_applies_when_the_field_is_empty() {
    let ann = format!("  annotations: {{{SOURCE_RANGES_ANNOTATION}: \" 192.168.77.200/32, 10.0.0.0/8 \"}}\n");
    let t = run_lb(lb_svc(&ann, ""));
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let lb = t
        .frontends
        .iter()
        .find(|f| f.flags & svc_flags::LOAD_BALANCER != 0)
        .unwrap();
    assert_eq!(
        lb.source_ranges,
        [
            "10.0.0.0/8".parse::<IpNet>().unwrap(),
            "192.168.77.200/32".parse().unwrap()
        ]
    );
    assert_ne!(lb.flags & svc_flags::SOURCE_RANGES, 0);
    // The field wins over the annotation.
    let t = run_lb(lb_svc(&ann, "  loadBalancerSourceRanges: [172.16.0.0/12]\n"));
    let lb = t
        .frontends
        .iter()
        .find(|f| f.flags & svc_flags::LOAD_BALANCER != 0)
        .unwrap();
    assert_eq!(lb.source_ranges, ["172.16.0.0/12".parse::<IpNet>().unwrap()]);
    // An empty annotation restricts nothing.
    let t = run_lb(lb_svc(
        &format!("  annotations: {{{SOURCE_RANGES_ANNOTATION}: \" \"}}\n"),
        "",
    ));
    assert!(t.errors.is_empty() && t.frontends.iter().all(|f| f.flags & svc_flags::SOURCE_RANGES == 0));
}

#[test]
fn bad_source_ranges_are_reported_and_skipped() {
    let t = run_lb(lb_svc(
        "",
        "  loadBalancerSourceRanges: [192.168.77.200/32, 10.0.0.0/33, \"2001:db8::/129\", nope]\n",
    ));
    let errors: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "s.yaml: Service shop/lb: spec.loadBalancerSourceRanges[1]: \"10.0.0.0/33\" is not an IPv4 CIDR (like 203.0.113.0/24) or address; entry skipped",
            "s.yaml: Service shop/lb: spec.loadBalancerSourceRanges[2]: \"2001:db8::/129\" is not an IPv6 CIDR (like 2001:db8::/64) or address; entry skipped",
            "s.yaml: Service shop/lb: spec.loadBalancerSourceRanges[3]: \"nope\" is not an IPv4 CIDR (like 203.0.113.0/24) or address; entry skipped",
        ]
    );
    let lb = t
        .frontends
        .iter()
        .find(|f| f.flags & svc_flags::LOAD_BALANCER != 0)
        .expect("the valid entry still applies");
    assert_eq!(lb.source_ranges, ["192.168.77.200/32".parse::<IpNet>().unwrap()]);
    // In the annotation, the entry's index in the list is named.
    let t = run_lb(lb_svc(
        &format!("  annotations: {{{SOURCE_RANGES_ANNOTATION}: \"10.0.0.0/8, x \"}}\n"),
        "",
    ));
    assert_eq!(
        t.errors[0].to_string(),
        format!("s.yaml: Service shop/lb: metadata.annotations[{SOURCE_RANGES_ANNOTATION}][1]: \"x\" is not an IPv4 CIDR (like 203.0.113.0/24) or address; entry skipped")
    );
}

#[test]
fn no_valid_source_range_leaves_the_load_balancer_ips_out_and_the_rest_working() {
    let t = run_lb(lb_svc(
        "",
        "  loadBalancerSourceRanges: [\"10.0.0.0/40\", \"fd00::/200\"]\n",
    ));
    let errors: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert_eq!(
        errors[2],
        "s.yaml: Service shop/lb: spec.loadBalancerSourceRanges: no valid entry: the LoadBalancer IPs are not served (fail closed); ClusterIP, NodePorts and externalIPs are"
    );
    let addrs: Vec<IpAddr> = t.frontends.iter().map(|f| f.addr).collect();
    assert_eq!(addrs, [v4(10, 96, 0, 80), v4(192, 168, 77, 11), v4(203, 0, 113, 10)]);
    assert!(t
        .frontends
        .iter()
        .all(|f| f.flags & (svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES) == 0));
}

/// Services, slices and Endpoints with IPv6 addresses in every field the
/// translation reads, beside IPv4 ones: an IPv6-only Service, dual-stack
/// ones of either order, a dual-stack LoadBalancer with externalIPs, ingress
/// IPs and source ranges of both families, and slices and Endpoints of both.
fn mixed_families() -> Snapshot {
    let services = [
        "metadata: {name: v6, namespace: default}\nspec:\n  clusterIP: \"fd00::10\"\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
        // Dual stack, IPv6 first: spec.clusterIP is the IPv6 one.
        "metadata: {name: v6-first, namespace: default}\nspec:\n  clusterIP: \"fd00::20\"\n  clusterIPs: [\"fd00::20\", 10.96.0.20]\n  ipFamilies: [IPv6, IPv4]\n  ipFamilyPolicy: PreferDualStack\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
        // Dual stack, IPv4 first.
        "metadata: {name: v4-first, namespace: default}\nspec:\n  clusterIP: 10.96.0.21\n  clusterIPs: [10.96.0.21, \"fd00::21\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
        "metadata: {name: lb, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.30\n  clusterIPs: [10.96.0.30, \"fd00::30\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack\n  externalIPs: [\"2001:db8::1\", 203.0.113.1]\n  loadBalancerSourceRanges: [\"2001:db8::/32\", 10.0.0.0/8]\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: \"2001:db8::2\"}, {ip: 203.0.113.2}]\n",
    ];
    Snapshot {
        services: services.iter().map(|y| svc(y)).collect(),
        endpoint_slices: vec![
            slice("metadata: {name: lb-4, namespace: default, labels: {kubernetes.io/service-name: lb}}\naddressType: IPv4\nendpoints:\n- addresses: [\"fd00::5\"]\n- addresses: [10.244.0.5]\nports: [{name: http, port: 8080}]\n"),
            slice("metadata: {name: lb-6, namespace: default, labels: {kubernetes.io/service-name: lb}}\naddressType: IPv6\nendpoints:\n- addresses: [\"fd00::7\"]\nports: [{name: http, port: 8080}]\n"),
            slice("metadata: {name: v6-first-6, namespace: default, labels: {kubernetes.io/service-name: v6-first}}\naddressType: IPv6\nendpoints:\n- addresses: [\"fd00::1:20\"]\nports: [{name: http, port: 8080}]\n"),
            slice("metadata: {name: v6-first-4, namespace: default, labels: {kubernetes.io/service-name: v6-first}}\naddressType: IPv4\nendpoints:\n- addresses: [10.244.0.20]\nports: [{name: http, port: 8080}]\n"),
            // An IPv6-only Service's slice: its endpoints feed no IPv4 frontend.
            slice("metadata: {name: v6-6, namespace: default, labels: {kubernetes.io/service-name: v6}}\naddressType: IPv6\nendpoints:\n- addresses: [\"fd00::1:10\"]\nports: [{name: http, port: 8080}]\n"),
        ],
        endpoints: vec![Sourced::new(
            "e.yaml",
            serde_yaml::from_str::<Endpoints>(
                "metadata: {name: lb, namespace: default}\nsubsets: [{addresses: [{ip: \"fd00::6\"}, {ip: 10.244.0.6}], ports: [{name: http, port: 8080}]}]\n",
            )
            .expect("test endpoints parse"),
        )],
        ..Default::default()
    }
}

/// The translation settings of the family tests: NodePorts on one node
/// address of each family.
fn dual_cfg() -> Config {
    Config {
        nodeport_addrs: vec![v4(192, 168, 1, 1), "2001:db8:1::1".parse().unwrap()],
        ..Config::default()
    }
}

/// Each frontend's address, its backends' addresses and its source ranges.
fn addresses_backends_ranges(fs: &[Frontend]) -> Vec<(IpAddr, Vec<IpAddr>, Vec<String>)> {
    fs.iter()
        .map(|f| {
            (
                f.addr,
                f.backends.iter().map(|b| b.addr).collect(),
                f.source_ranges.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn ipv4_frontends_of_every_service_are_served_with_ipv4_endpoints_and_ipv6_ones_translated_aside() {
    let t = translate(&mixed_families(), &dual_cfg());
    let errors: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        ["e.yaml: EndpointSlice default/lb-4: endpoints[0].addresses[0]: \"fd00::5\" is not an IPv4 address (the slice's addressType); the endpoint is left out"],
        "nothing else is wrong: IPv6 is no error"
    );
    let lb4 = vec![v4(10, 244, 0, 5), v4(10, 244, 0, 6)];
    let range = |r: &str| vec![r.to_string()];
    // Served: every IPv4 frontend, an IPv6-first dual-stack Service's IPv4
    // ClusterIP included (spec.clusterIPs[1]), each with IPv4 endpoints only.
    assert_eq!(
        addresses_backends_ranges(&t.frontends),
        [
            (v4(10, 96, 0, 20), vec![v4(10, 244, 0, 20)], vec![]),
            (v4(10, 96, 0, 21), vec![], vec![]),
            (v4(10, 96, 0, 30), lb4.clone(), vec![]),
            (v4(192, 168, 1, 1), lb4.clone(), vec![]),
            (v4(203, 0, 113, 1), lb4.clone(), vec![]),
            (v4(203, 0, 113, 2), lb4, range("10.0.0.0/8")),
        ]
    );
    // Translated but not served: the IPv6 frontends, each with the IPv6
    // endpoints (slices of addressType IPv6 and IPv6 Endpoints addresses).
    let lb6 = vec![ip("fd00::6"), ip("fd00::7")];
    assert_eq!(
        addresses_backends_ranges(&t.not_served),
        [
            (ip("2001:db8::1"), lb6.clone(), vec![]),
            (ip("2001:db8::2"), lb6.clone(), range("2001:db8::/32")),
            (ip("2001:db8:1::1"), lb6.clone(), vec![]),
            (ip("fd00::10"), vec![ip("fd00::1:10")], vec![]),
            (ip("fd00::20"), vec![ip("fd00::1:20")], vec![]),
            (ip("fd00::21"), vec![], vec![]),
            (ip("fd00::30"), lb6, vec![]),
        ]
    );
    let kinds: Vec<(IpAddr, FrontendKind)> = t.not_served.iter().map(|f| (f.addr, f.id.kind)).collect();
    assert!(
        kinds.contains(&(ip("2001:db8:1::1"), FrontendKind::NodePort)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(ip("2001:db8::2"), FrontendKind::LoadBalancer)),
        "{kinds:?}"
    );
    // Each Service with IPv6 frontends is named once, all of them in one line.
    assert_eq!(
        not_served_notices(&t.not_served, cfg_families()),
        [
            "default/lb: IPv6 frontends [2001:db8::1]:80/TCP, [2001:db8::2]:80/TCP, [2001:db8:1::1]:30080/TCP, [fd00::30]:80/TCP not served: this dataplane serves IPv4 only",
            "default/v4-first: IPv6 frontends [fd00::21]:80/TCP not served: this dataplane serves IPv4 only",
            "default/v6: IPv6 frontends [fd00::10]:80/TCP not served: this dataplane serves IPv4 only",
            "default/v6-first: IPv6 frontends [fd00::20]:80/TCP not served: this dataplane serves IPv4 only",
        ]
    );
}

fn cfg_families() -> Families {
    Config::default().families
}

#[test]
fn with_both_families_served_the_same_translation_serves_the_ipv6_frontends_too() {
    let cfg = Config {
        families: Families::IPV4_IPV6,
        ..dual_cfg()
    };
    let both = translate(&mixed_families(), &cfg);
    let v4_only = translate(&mixed_families(), &dual_cfg());
    assert!(both.not_served.is_empty());
    let mut union = v4_only.frontends.clone();
    union.extend(v4_only.not_served.clone());
    union.sort_by_key(Frontend::key);
    assert_eq!(both.frontends, union, "the gate only sorts frontends, it changes none");
    assert!(not_served_notices(&both.not_served, cfg.families).is_empty());
}

#[test]
fn an_ipv6_only_service_is_named_and_the_other_services_are_served() {
    let s = Snapshot {
        services: vec![
            svc("metadata: {name: web6, namespace: default}\nspec:\n  clusterIP: \"fd00::10\"\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n  type: NodePort\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\n"),
            svc("metadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.10\n  type: NodePort\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]\n"),
        ],
        endpoint_slices: vec![
            slice("metadata: {name: web6-1, namespace: default, labels: {kubernetes.io/service-name: web6}}\naddressType: IPv6\nendpoints:\n- addresses: [\"fd00::1:1\"]\nports: [{name: http, port: 8080}]\n"),
            slice("metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n- addresses: [10.244.0.1]\nports: [{name: http, port: 8080}]\n"),
        ],
        ..Default::default()
    };
    let t = translate(&s, &dual_cfg());
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let served: Vec<(IpAddr, u16)> = t.frontends.iter().map(|f| (f.addr, f.port)).collect();
    assert_eq!(served, [(v4(10, 96, 0, 10), 80), (v4(192, 168, 1, 1), 30081)]);
    assert!(t
        .frontends
        .iter()
        .all(|f| f.backends.iter().map(|b| b.addr).eq([v4(10, 244, 0, 1)])));
    assert_eq!(
        not_served_notices(&t.not_served, cfg_families()),
        ["default/web6: IPv6 frontends [2001:db8:1::1]:30080/TCP, [fd00::10]:80/TCP not served: this dataplane serves IPv4 only"]
    );
}

/// The errors (without the file) and the served frontends' addresses of `spec`
/// (under Service `default/d`, one port 80) translated with `cidrs`.
fn family_fields(spec: &str, cidrs: &str) -> (Vec<String>, Vec<IpAddr>, Vec<IpAddr>) {
    let s = Snapshot {
        services: vec![
            svc(&format!(
                "metadata: {{name: d, namespace: default}}\nspec:\n{spec}  ports: [{{port: 80}}]\n"
            )),
            // Another Service, unaffected by anything wrong with d.
            svc("metadata: {name: ok, namespace: default}\nspec:\n  clusterIP: 10.96.0.99\n  ports: [{port: 80}]\n"),
        ],
        ..Default::default()
    };
    let cfg = Config {
        service_cidrs: cidrs.parse().unwrap(),
        ..Config::default()
    };
    let t = translate(&s, &cfg);
    assert!(
        t.frontends.iter().any(|f| f.addr == v4(10, 96, 0, 99)),
        "{spec}: the other Service is served"
    );
    let mine = |fs: &[Frontend]| -> Vec<IpAddr> {
        fs.iter()
            .filter(|f| f.id.service.to_string() == "default/d")
            .map(|f| f.addr)
            .collect()
    };
    let errors = t
        .errors
        .iter()
        .map(|e| e.to_string().trim_start_matches("s.yaml: ").to_string())
        .collect();
    (errors, mine(&t.frontends), mine(&t.not_served))
}

#[test]
fn inconsistent_family_fields_are_refused_naming_the_service_and_field() {
    for (spec, want) in [
        (
            "  clusterIPs: [10.96.0.10]\n  ipFamilyPolicy: RequireDualStack\n",
            "Service default/d: spec.clusterIPs: RequireDualStack needs a ClusterIP of each family; spec.clusterIPs has one, 10.96.0.10",
        ),
        (
            "  clusterIP: 10.96.0.10\n  ipFamilyPolicy: RequireDualStack\n",
            "Service default/d: spec.clusterIP: RequireDualStack needs a ClusterIP of each family; spec.clusterIP has one, 10.96.0.10",
        ),
        (
            "  clusterIPs: [10.96.0.10]\n  ipFamilies: [IPv4]\n  ipFamilyPolicy: RequireDualStack\n",
            "Service default/d: spec.ipFamilies: RequireDualStack needs both families; spec.ipFamilies has only IPv4",
        ),
        (
            "  clusterIPs: [10.96.0.10, \"fd00::10\"]\n  ipFamilies: [IPv6, IPv4]\n",
            "Service default/d: spec.clusterIPs[0]: 10.96.0.10 is IPv4 but spec.ipFamilies[0] is IPv6: the ClusterIPs must follow spec.ipFamilies' order",
        ),
        (
            "  clusterIP: \"fd00::10\"\n  ipFamilies: [IPv4]\n",
            "Service default/d: spec.clusterIP: fd00::10 is IPv6 but spec.ipFamilies[0] is IPv4: the ClusterIPs must follow spec.ipFamilies' order",
        ),
        (
            "  clusterIPs: [10.96.0.10, 10.96.0.11]\n",
            "Service default/d: spec.clusterIPs[1]: 10.96.0.11 is a second IPv4 ClusterIP (after 10.96.0.10): at most one per family",
        ),
        (
            "  clusterIPs: [10.96.0.10, \"fd00::10\"]\n  ipFamilies: [IPv4]\n",
            "Service default/d: spec.clusterIPs: 2 ClusterIPs for the 1 family of spec.ipFamilies",
        ),
        (
            "  clusterIP: 10.96.0.11\n  clusterIPs: [10.96.0.10]\n",
            "Service default/d: spec.clusterIP: \"10.96.0.11\" is not spec.clusterIPs[0] (\"10.96.0.10\"): it must be the first of spec.clusterIPs",
        ),
        (
            "  clusterIPs: [10.96.0.10, \"fd00::10\"]\n  ipFamilyPolicy: SingleStack\n",
            "Service default/d: spec.ipFamilyPolicy: SingleStack, but the Service has 2 families (IPv4, IPv6)",
        ),
        (
            "  clusterIPs: [10.96.0.10]\n  ipFamilies: [IPv4, IPv4]\n",
            "Service default/d: spec.ipFamilies[1]: IPv4 is listed twice",
        ),
        (
            "  clusterIPs: [10.96.0.10]\n  ipFamilies: [IPv5]\n",
            "Service default/d: spec.ipFamilies[0]: unknown family \"IPv5\" (IPv4, IPv6)",
        ),
        (
            "  clusterIPs: [10.96.0.10]\n  ipFamilyPolicy: DualStackPlease\n",
            "Service default/d: spec.ipFamilyPolicy: unknown policy \"DualStackPlease\" (SingleStack, PreferDualStack, RequireDualStack)",
        ),
        (
            "  ipFamilyPolicy: RequireDualStack\n",
            "Service default/d: spec.ipFamilyPolicy: RequireDualStack needs both families, and --service-cluster-ip-range (10.96.0.0/12) has a range of one",
        ),
    ] {
        let (errors, served, not_served) = family_fields(spec, "10.96.0.0/12");
        assert_eq!(errors, [want], "{spec}");
        assert!(served.is_empty() && not_served.is_empty(), "{spec}: refused whole");
    }
}

#[test]
fn the_families_a_service_is_given_decide_what_is_allocated_and_served() {
    let dual = "10.96.0.0/12,fd00::/108";
    let in_range = |a: &IpAddr, r: &str| r.parse::<IpNet>().unwrap().contains(a);
    // PreferDualStack without ClusterIPs: one of each family, primary first.
    let (errors, served, not_served) = family_fields("  ipFamilyPolicy: PreferDualStack\n", dual);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(served.len() == 1 && in_range(&served[0], "10.96.0.0/12"), "{served:?}");
    assert!(
        not_served.len() == 1 && in_range(&not_served[0], "fd00::/108"),
        "{not_served:?}"
    );
    // ... and only the primary one with a single range (PreferDualStack
    // asks, RequireDualStack insists).
    let (errors, served, not_served) = family_fields("  ipFamilyPolicy: PreferDualStack\n", "10.96.0.0/12");
    assert!(
        errors.is_empty() && served.len() == 1 && not_served.is_empty(),
        "{errors:?}"
    );
    // No policy: single stack in the primary family, IPv6 here.
    let (errors, served, not_served) = family_fields("", "fd00::/108,10.96.0.0/12");
    assert!(errors.is_empty() && served.is_empty(), "{errors:?} {served:?}");
    assert!(not_served.len() == 1 && in_range(&not_served[0], "fd00::/108"));
    // ipFamilies with one ClusterIP given: the other family's is allocated.
    let (errors, served, not_served) = family_fields(
        "  clusterIPs: [\"fd00::10\"]\n  ipFamilies: [IPv6, IPv4]\n  ipFamilyPolicy: RequireDualStack\n",
        dual,
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(not_served, [ip("fd00::10")]);
    assert!(served.len() == 1 && in_range(&served[0], "10.96.0.0/12"), "{served:?}");
    // A family without a range to allocate in: named, the other family served.
    let (errors, served, not_served) = family_fields(
        "  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack\n",
        "10.96.0.0/12",
    );
    assert_eq!(
        errors,
        ["Service default/d: spec.clusterIPs[1]: no IPv6 range in --service-cluster-ip-range (10.96.0.0/12) to allocate the Service's IPv6 ClusterIP (spec.ipFamilies) from"]
    );
    assert!(served.len() == 1 && not_served.is_empty());
    // A single-stack Service's externalIPs and ingress IPs of the other
    // family are not served, and named (kube-proxy leaves them out too).
    let (errors, served, _) = family_fields(
        "  clusterIP: 10.96.0.10\n  externalIPs: [\"2001:db8::1\", 203.0.113.1]\n",
        dual,
    );
    assert_eq!(
        errors,
        ["Service default/d: spec.externalIPs[0]: \"2001:db8::1\" is IPv6 and the Service has no IPv6 ClusterIP (spec.ipFamilies); not served (externalIPs)"]
    );
    assert_eq!(served, [v4(10, 96, 0, 10), v4(203, 0, 113, 1)]);
    // Headless in either spelling: nothing, no error.
    for spec in [
        "  clusterIP: None\n",
        "  clusterIPs: [None]\n  ipFamilies: [IPv6, IPv4]\n",
    ] {
        let (errors, served, not_served) = family_fields(spec, dual);
        assert!(
            errors.is_empty() && served.is_empty() && not_served.is_empty(),
            "{spec}: {errors:?}"
        );
    }
}

#[test]
fn slices_feed_only_the_frontends_of_their_family() {
    // An IPv4-only Service with an IPv6 slice (a stale one, or a mislabelled
    // one): its IPv4 ClusterIP gets the IPv4 endpoints only.
    let s = Snapshot {
        services: vec![svc("metadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n")],
        endpoint_slices: vec![
            slice("metadata: {name: web-6, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\nendpoints:\n- addresses: [\"fd00::1:1\"]\nports: [{name: http, port: 8080}]\n"),
            slice("metadata: {name: web-4, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n- addresses: [10.244.0.1]\nports: [{name: http, port: 8080}]\n"),
        ],
        ..Default::default()
    };
    let t = run(&s);
    assert!(t.errors.is_empty() && t.not_served.is_empty(), "{:?}", t.errors);
    assert_eq!(
        addresses_backends_ranges(&t.frontends),
        [(v4(10, 96, 0, 10), vec![v4(10, 244, 0, 1)], vec![])]
    );
}
