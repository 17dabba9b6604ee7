//! THE translation: cluster objects in, desired frontends and backends out.
//!
//! A pure function (no I/O, no clock, no randomness): the same snapshot always
//! gives the same result, so it is unit-tested with plain builders and both sources
//! (manifests, API) share it. Map ids and byte layout are `maps::layout`'s job.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ferry_common::{svc_flags, PROTO_TCP, PROTO_UDP};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use crate::{
    endpoints::{self, Endpoint},
    error::InputError,
    model::{ns_name, Snapshot, Sourced},
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Settings translation depends on.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where ClusterIPs are allocated for Services without spec.clusterIP.
    pub service_cidr: Ipv4Net,
    /// Standalone mode plays the endpoints controller: endpoints of Services with a
    /// selector come from the Pods the shim reports. In cluster mode (false) the
    /// cluster's controller has written EndpointSlices for them, and those count.
    pub pod_endpoints: bool,
    /// This node: endpoints whose nodeName is this node are marked local.
    pub node: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            service_cidr: "10.96.0.0/12".parse().expect("valid CIDR"),
            pod_endpoints: true,
            node: None,
        }
    }
}

/// A service address clients dial: {addr, port, protocol} and where it leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name:port-name` (or `:port` for unnamed ports).
    pub name: String,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// `ferry_common::svc_flags`.
    pub flags: u32,
    /// The endpoints new connections may go to, sorted.
    pub backends: Vec<BackendSpec>,
}

impl Frontend {
    pub fn key(&self) -> (Ipv4Addr, u16, u8) {
        (self.addr, self.port, self.proto)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendSpec {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub terminating: bool,
    /// The endpoint runs on this node (EndpointSlice nodeName, Pod node).
    pub local: bool,
}

/// The result: what the maps should hold, and what was wrong with the input.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    /// Sorted by (addr, port, proto).
    pub frontends: Vec<Frontend>,
    pub errors: Vec<InputError>,
    /// ClusterIPs allocated for Services without spec.clusterIP
    /// (`namespace/name` → address), for the caller to log.
    pub allocated: BTreeMap<String, Ipv4Addr>,
}

/// How a Service gets its ClusterIP.
enum ClusterIp {
    Explicit(Ipv4Addr),
    Allocate,
}

/// A Service that passed validation, with the ports that did.
struct Valid<'a> {
    svc: &'a Sourced<Service>,
    spec: &'a ServiceSpec,
    key: String,
    ip: ClusterIp,
    /// (index in spec.ports, the port, its valid port number and protocol).
    ports: Vec<(usize, &'a ServicePort, u16, u8)>,
}

pub fn translate(snapshot: &Snapshot, cfg: &Config) -> Translation {
    let mut out = Translation::default();
    let mut valid: Vec<Valid> = Vec::new();
    let mut known: BTreeSet<String> = BTreeSet::new();
    for svc in &snapshot.services {
        known.insert(ns_name(&svc.object.metadata));
        if let Some(v) = validate(svc, &mut out.errors) {
            valid.push(v);
        }
    }
    check_orphans(snapshot, &known, &mut out.errors);

    // Earlier Services win conflicts: creation time, then name (kube-apiserver
    // would have refused the later one).
    valid.sort_by(|a, b| {
        let ta = a
            .svc
            .object
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0);
        let tb = b
            .svc
            .object
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0);
        (ta, &a.key).cmp(&(tb, &b.key))
    });
    let ips = assign_cluster_ips(&valid, cfg, &mut out.errors);
    for (v, ip) in valid.iter().zip(&ips) {
        if let (ClusterIp::Allocate, Some(ip)) = (&v.ip, ip) {
            out.allocated.insert(v.key.clone(), *ip);
        }
    }

    let mut claimed: BTreeMap<(Ipv4Addr, u16, u8), String> = BTreeMap::new();
    for (v, ip) in valid.iter().zip(ips) {
        let Some(ip) = ip else { continue };
        for &(i, sp, port, proto) in &v.ports {
            if let Some(owner) = claimed.get(&(ip, port, proto)) {
                out.errors.push(InputError::new(
                    &v.svc.source,
                    format!("Service {}", v.key),
                    format!("spec.ports[{i}]"),
                    format!(
                        "{ip}:{port}/{} is already used by Service {owner}",
                        proto_name(proto)
                    ),
                ));
                continue;
            }
            claimed.insert((ip, port, proto), v.key.clone());
            let all = endpoints_of(snapshot, v, sp, cfg.pod_endpoints);
            let (usable, fallback) = endpoints::usable(all);
            let mut flags = svc_flags::CLUSTER_IP;
            if fallback {
                flags |= svc_flags::TERMINATING_FALLBACK;
            }
            let port_name = sp
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| port.to_string());
            out.frontends.push(Frontend {
                name: format!("{}:{port_name}", v.key),
                addr: ip,
                port,
                proto,
                flags,
                backends: usable
                    .into_iter()
                    .map(|e| BackendSpec {
                        addr: e.addr,
                        port: e.port,
                        terminating: e.terminating,
                        local: cfg.node.is_some() && e.node == cfg.node,
                    })
                    .collect(),
            });
        }
    }
    out.frontends.sort_by_key(Frontend::key);
    out
}

/// Checks a Service; returns None when it gets no dataplane entries at all.
fn validate<'a>(svc: &'a Sourced<Service>, errors: &mut Vec<InputError>) -> Option<Valid<'a>> {
    let key = ns_name(&svc.object.metadata);
    let err = |field: &str, msg: String| {
        InputError::new(&svc.source, format!("Service {key}"), field, msg)
    };
    if svc.object.metadata.name.as_deref().unwrap_or("").is_empty() {
        errors.push(err("metadata.name", "missing".into()));
        return None;
    }
    let Some(spec) = svc.object.spec.as_ref() else {
        errors.push(err("spec", "missing".into()));
        return None;
    };
    match spec.type_.as_deref() {
        None | Some("ClusterIP") | Some("NodePort") | Some("LoadBalancer") => {}
        Some("ExternalName") => return None, // DNS only: nothing to program.
        Some(other) => {
            errors.push(err(
                "spec.type",
                format!("unknown type {other:?} (ClusterIP, NodePort, LoadBalancer, ExternalName)"),
            ));
            return None;
        }
    }
    let ip = match spec.cluster_ip.as_deref() {
        Some("None") => return None, // headless: DNS only.
        None | Some("") => ClusterIp::Allocate,
        Some(s) => match s.parse::<Ipv4Addr>() {
            Ok(ip) => ClusterIp::Explicit(ip),
            Err(_) => {
                let why = if s.contains(':') {
                    "IPv6 is not supported yet"
                } else {
                    "not an IPv4 address"
                };
                errors.push(err("spec.clusterIP", format!("{s:?}: {why}")));
                return None;
            }
        },
    };
    let mut ports = Vec::new();
    for (i, sp) in spec.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let Some(port) = u16::try_from(sp.port).ok().filter(|p| *p > 0) else {
            errors.push(err(
                &field("port"),
                format!("{} out of range 1-65535", sp.port),
            ));
            continue;
        };
        let proto = match sp.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => PROTO_TCP,
            "UDP" => PROTO_UDP,
            "SCTP" => {
                errors.push(err(&field("protocol"), "SCTP is not supported yet".into()));
                continue;
            }
            other => {
                errors.push(err(
                    &field("protocol"),
                    format!("unknown protocol {other:?} (TCP, UDP, SCTP)"),
                ));
                continue;
            }
        };
        if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) =
            &sp.target_port
        {
            if !(1..=65535).contains(t) {
                errors.push(err(
                    &field("targetPort"),
                    format!("{t} out of range 1-65535"),
                ));
                continue;
            }
        }
        ports.push((i, sp, port, proto));
    }
    Some(Valid {
        svc,
        spec,
        key,
        ip,
        ports,
    })
}

/// ClusterIPs: explicit ones as given (outside the range is fine, as with a real
/// apiserver's second range); the others by a stable hash of namespace/name into
/// the range, probing onward on collision, in name order. Same input, same IPs:
/// on every node and across restarts.
fn assign_cluster_ips(
    valid: &[Valid],
    cfg: &Config,
    errors: &mut Vec<InputError>,
) -> Vec<Option<Ipv4Addr>> {
    let mut used: BTreeSet<Ipv4Addr> = valid
        .iter()
        .filter_map(|v| match v.ip {
            ClusterIp::Explicit(ip) => Some(ip),
            ClusterIp::Allocate => None,
        })
        .collect();
    let net = cfg.service_cidr;
    let base = u32::from(net.network());
    let size = (1u64 << (32 - net.prefix_len())).saturating_sub(2).max(1) as u32;
    let mut order: Vec<usize> = (0..valid.len())
        .filter(|i| matches!(valid[*i].ip, ClusterIp::Allocate))
        .collect();
    order.sort_by(|a, b| valid[*a].key.cmp(&valid[*b].key));
    let mut out: Vec<Option<Ipv4Addr>> = valid
        .iter()
        .map(|v| match v.ip {
            ClusterIp::Explicit(ip) => Some(ip),
            ClusterIp::Allocate => None,
        })
        .collect();
    for i in order {
        let start = fnv1a(valid[i].key.as_bytes()) % size;
        let found = (0..size)
            .map(|k| Ipv4Addr::from(base + 1 + (start + k) % size))
            .find(|ip| !used.contains(ip));
        match found {
            Some(ip) => {
                used.insert(ip);
                out[i] = Some(ip);
            }
            None => errors.push(InputError::new(
                &valid[i].svc.source,
                format!("Service {}", valid[i].key),
                "spec.clusterIP",
                format!("no free address left in {net}"),
            )),
        }
    }
    out
}

/// FNV-1a: a stable hash (std's hasher is randomly seeded).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ *b as u32).wrapping_mul(0x0100_0193)
    })
}

fn endpoints_of(
    snapshot: &Snapshot,
    v: &Valid,
    sp: &ServicePort,
    pod_endpoints: bool,
) -> Vec<Endpoint> {
    let meta = &v.svc.object.metadata;
    let ns = meta.namespace.as_deref().unwrap_or("default");
    let name = meta.name.as_deref().unwrap_or_default();
    if pod_endpoints {
        if let Some(selector) = v.spec.selector.as_ref().filter(|s| !s.is_empty()) {
            return endpoints::from_pods(ns, selector, sp, &snapshot.pods);
        }
    }
    let slices: Vec<_> = snapshot
        .endpoint_slices
        .iter()
        .filter(|s| {
            s.object.metadata.namespace.as_deref().unwrap_or("default") == ns
                && slice_service(&s.object).as_deref() == Some(name)
        })
        .collect();
    let mut all = endpoints::from_slices(sp, &slices);
    for e in &snapshot.endpoints {
        if ns_name(&e.object.metadata) == v.key {
            all.extend(endpoints::from_endpoints(sp, &e.object));
        }
    }
    all
}

fn slice_service(slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Option<String> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .cloned()
}

/// EndpointSlices and Endpoints must belong to a Service we know.
fn check_orphans(snapshot: &Snapshot, known: &BTreeSet<String>, errors: &mut Vec<InputError>) {
    for s in &snapshot.endpoint_slices {
        let meta = &s.object.metadata;
        let object = format!("EndpointSlice {}", ns_name(meta));
        let field = format!("metadata.labels[{SERVICE_NAME_LABEL}]");
        match slice_service(&s.object) {
            None => errors.push(InputError::new(
                &s.source,
                object,
                field,
                "missing: the slice belongs to no Service",
            )),
            Some(svc) => {
                let key = format!("{}/{svc}", meta.namespace.as_deref().unwrap_or("default"));
                if !known.contains(&key) {
                    errors.push(InputError::new(
                        &s.source,
                        object,
                        field,
                        format!("unknown Service {key}"),
                    ));
                }
            }
        }
    }
    for e in &snapshot.endpoints {
        let key = ns_name(&e.object.metadata);
        if !known.contains(&key) {
            errors.push(InputError::new(
                &e.source,
                format!("Endpoints {key}"),
                "metadata.name",
                format!("unknown Service {key}"),
            ));
        }
    }
}

/// The kind of frontend named by `svc_flags` (as in `ServiceName`: "(ClusterIP)").
pub fn frontend_type(flags: u32) -> &'static str {
    if flags & svc_flags::NODE_PORT != 0 {
        "NodePort"
    } else if flags & svc_flags::LOAD_BALANCER != 0 {
        "LoadBalancer"
    } else if flags & svc_flags::EXTERNAL_IP != 0 {
        "ExternalIP"
    } else {
        "ClusterIP"
    }
}

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_shim::status::{ContainerPortRecord, PodRecord};
    use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};

    fn svc(y: &str) -> Sourced<Service> {
        Sourced::new(
            "s.yaml",
            serde_yaml::from_str(y).expect("test service parses"),
        )
    }
    fn slice(y: &str) -> Sourced<EndpointSlice> {
        Sourced::new(
            "e.yaml",
            serde_yaml::from_str(y).expect("test slice parses"),
        )
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
        assert_eq!(
            (dns.addr, dns.port, dns.proto),
            (Ipv4Addr::new(10, 96, 0, 10), 53, PROTO_UDP)
        );
        assert_eq!(
            dns.backends.iter().map(|b| b.port).collect::<Vec<_>>(),
            [5353, 5353]
        );
        let http = &t.frontends[1];
        assert_eq!(http.name, "default/web:http");
        assert_eq!(http.flags, svc_flags::CLUSTER_IP);
        // Named targetPort: resolved through the Pod's ports ("http" is TCP 8080).
        assert_eq!(
            http.backends,
            vec![
                BackendSpec {
                    addr: Ipv4Addr::new(10, 244, 0, 2),
                    port: 8080,
                    terminating: false,
local: false
                },
                BackendSpec {
                    addr: Ipv4Addr::new(10, 244, 0, 3),
                    port: 8080,
                    terminating: false,
local: false
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
                addr: Ipv4Addr::new(10, 244, 0, 2),
                port: 8080,
                terminating: true,
local: false
            }]
        );
        assert_ne!(http.flags & svc_flags::TERMINATING_FALLBACK, 0);
        // No Pods: the frontend exists with no backends.
        s.pods.clear();
        assert!(run(&s).frontends.iter().all(|f| f.backends.is_empty()));
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
            msgs[0].contains(
                "s.yaml: Service default/bad: spec.ports[0].port: 70000 out of range 1-65535"
            ),
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
            t.errors[0]
                .to_string()
                .contains("EndpointSlice default/nobody-1"),
            "{}",
            t.errors[0]
        );
        assert!(
            t.errors[0]
                .to_string()
                .contains("unknown Service default/nobody"),
            "{}",
            t.errors[0]
        );
        let manual = t.frontends.iter().find(|f| f.port == 8000).unwrap();
        assert_eq!(
            manual.backends,
            vec![BackendSpec {
                addr: Ipv4Addr::new(10, 0, 0, 1),
                port: 8080,
                terminating: false,
local: false
            }]
        );
        let legacy = t.frontends.iter().find(|f| f.port == 9000).unwrap();
        assert_eq!(
            legacy.backends,
            vec![BackendSpec {
                addr: Ipv4Addr::new(10, 0, 1, 1),
                port: 9090,
                terminating: false,
local: false
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
            node: Some("n1".into()),
            ..Config::default()
        };
        let t = translate(&s, &cfg);
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let http = t.frontends.iter().find(|f| f.port == 80).unwrap();
        let addrs: Vec<_> = http.backends.iter().map(|b| b.addr).collect();
        assert_eq!(addrs, [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 3)]);
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
                addr: Ipv4Addr::new(10, 0, 0, 2),
                port: 8080,
                terminating: true,
local: false
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
            t.frontends
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
            ["default/a-first:80", "default/a-first:81"]
        );
        assert_eq!(t.errors.len(), 1);
        assert!(t.errors[0].to_string().contains("Service default/b-later: spec.ports[0]: 10.96.0.40:80/TCP is already used by Service default/a-first"), "{}", t.errors[0]);
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
                .map(|f| (f.name.clone(), f.addr))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(ips(&t1), ips(&t2), "order of input does not matter");
        let range: Ipv4Net = "10.96.0.0/12".parse().unwrap();
        assert!(t1.frontends.iter().all(|f| range.contains(&f.addr)));
        assert_ne!(t1.frontends[0].addr, t1.frontends[1].addr);
    }
}
