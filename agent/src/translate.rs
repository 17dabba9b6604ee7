//! THE translation: cluster objects in, desired frontends and backends out.
//!
//! A pure function (no I/O, no clock, no randomness): the same snapshot always
//! gives the same result, so it is unit-tested with plain builders and both sources
//! (manifests, API) share it. Map ids and byte layout are `maps::layout`'s job.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use ferry_common::{svc_flags, PROTO_TCP, PROTO_UDP};
use ipnet::Ipv4Net;
use k8s_openapi::api::{
    core::v1::{Endpoints, Service, ServicePort, ServiceSpec},
    discovery::v1::EndpointSlice,
};

use crate::{
    endpoints::{self, Endpoint},
    error::InputError,
    model::{ns_name, Snapshot, Sourced},
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service served by another proxy (kube-proxy's `--service-proxy-name`
/// semantics: any value but Ferry's own means not ours; Ferry has none).
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// A Service marked headless by label: no proxying.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Settings translation depends on.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where ClusterIPs are allocated for Services without spec.clusterIP.
    pub service_cidr: Ipv4Net,
    /// This node's name: internalTrafficPolicy: Local keeps the endpoints whose
    /// nodeName equals it, and endpoints on it are marked local. Empty: unknown.
    pub node: String,
    /// Standalone mode plays the endpoints controller: endpoints of Services with a
    /// selector come from the Pods the shim reports. In cluster mode (false) the
    /// cluster's controller has written EndpointSlices for them, and those count.
    pub pod_endpoints: bool,
    /// The node addresses NodePorts are served on (`--nodeport-addresses`).
    pub nodeport_addrs: Vec<Ipv4Addr>,
    /// `--service-node-port-range`, inclusive.
    pub node_port_range: (u16, u16),
    /// `--lb-algorithm`: how new flows pick a backend unless the Service's
    /// [`LB_ALGORITHM_ANNOTATION`] says otherwise.
    pub lb_algorithm: LbAlgorithm,
}

/// How a new flow picks its backend among a frontend's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LbAlgorithm {
    /// Uniformly at random (kube-proxy's behaviour).
    #[default]
    Random,
    /// Maglev consistent hashing over the client address and port: every
    /// node picks the same backend for the same client connection.
    Maglev,
}

/// Per-Service choice of [`LbAlgorithm`] (`random` or `maglev`), over
/// `--lb-algorithm` (Cilium's `service.cilium.io/lb-algorithm`).
pub const LB_ALGORITHM_ANNOTATION: &str = "ferry.dev/lb-algorithm";

impl Default for Config {
    fn default() -> Self {
        Self {
            service_cidr: "10.96.0.0/12".parse().expect("valid CIDR"),
            node: String::new(),
            pod_endpoints: true,
            nodeport_addrs: Vec::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            lb_algorithm: LbAlgorithm::Random,
        }
    }
}

/// The annotation kube-proxy reads when spec.loadBalancerSourceRanges is empty:
/// comma separated CIDRs.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

/// sessionAffinityConfig.clientIP.timeoutSeconds when unset (Kubernetes' default).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The API's upper bound for the affinity timeout (one day).
pub const MAX_AFFINITY_TIMEOUT: i32 = 86_400;

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
    /// Endpoints that exist but take no new connections (not ready, terminating,
    /// or on another node under internalTrafficPolicy: Local), sorted: kept as
    /// backends so established flows to them continue until they end.
    pub draining: Vec<BackendSpec>,
    /// sessionAffinity: ClientIP timeout in seconds (0: no affinity).
    pub affinity_timeout: u32,
    /// loadBalancerSourceRanges (LoadBalancer-IP frontends only, with
    /// `svc_flags::SOURCE_RANGES`): the client prefixes allowed, sorted, host
    /// bits cleared. Empty: anyone.
    pub source_ranges: Vec<Ipv4Net>,
}

impl Frontend {
    pub fn key(&self) -> (Ipv4Addr, u16, u8) {
        (self.addr, self.port, self.proto)
    }

    /// What translation makes of a plain TCP ClusterIP Service port `name`
    /// on `addr:port`: its ready endpoints `backends` (on other nodes), all on
    /// `backend_port`. For tests of what comes after translation.
    pub fn cluster_ip(
        name: impl Into<String>,
        addr: Ipv4Addr,
        port: u16,
        backends: impl IntoIterator<Item = Ipv4Addr>,
        backend_port: u16,
    ) -> Self {
        let backends = backends
            .into_iter()
            .map(|addr| BackendSpec {
                addr,
                port: backend_port,
                terminating: false,
                local: false,
            })
            .collect();
        Self {
            name: name.into(),
            addr,
            port,
            proto: PROTO_TCP,
            flags: svc_flags::CLUSTER_IP,
            backends,
            draining: Vec::new(),
            affinity_timeout: 0,
            source_ranges: Vec::new(),
        }
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
    /// healthCheckNodePort → what it reports (Services with
    /// externalTrafficPolicy: Local and a healthCheckNodePort).
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// What a healthCheckNodePort answers, as kube-proxy's: the Service and how
/// many of its endpoints are ready on this node (200 when some are, 503 when
/// none, so load balancers send external traffic only to nodes that serve it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
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
    /// sessionAffinity: ClientIP timeout in seconds (0: none).
    affinity_timeout: u32,
    /// internalTrafficPolicy: Local.
    itp_local: bool,
    /// type NodePort or LoadBalancer: every port gets a NodePort.
    node_ports: bool,
    /// spec.externalIPs (valid ones).
    external_ips: Vec<Ipv4Addr>,
    /// status.loadBalancer.ingress[].ip and spec.loadBalancerIP (valid ones;
    /// none when source ranges were given but none is valid: fail closed).
    lb_ips: Vec<Ipv4Addr>,
    /// The clients allowed on `lb_ips` (empty: anyone).
    source_ranges: Vec<Ipv4Net>,
    /// externalTrafficPolicy: Local.
    etp_local: bool,
    /// New flows pick their backend by Maglev.
    maglev: bool,
    /// spec.trafficDistribution: PreferClose (standalone mode hints each
    /// endpoint for its node's zone, as the EndpointSlice controller does).
    prefer_close: bool,
}

pub fn translate(snapshot: &Snapshot, cfg: &Config) -> Translation {
    let mut out = Translation::default();
    let mut valid: Vec<Valid> = Vec::new();
    let mut known: BTreeSet<String> = BTreeSet::new();
    for svc in &snapshot.services {
        known.insert(ns_name(&svc.object.metadata));
        if let Some(v) = validate(svc, cfg, &mut out.errors) {
            valid.push(v);
        }
    }
    check_orphans(snapshot, &known, &mut out.errors);
    check_endpoint_addresses(snapshot, &mut out.errors);

    // Earlier Services win conflicts: creation time, then name (kube-apiserver
    // would have refused the later one).
    let created = |v: &Valid| v.svc.object.metadata.creation_timestamp.as_ref().map(|t| t.0);
    valid.sort_by(|a, b| (created(a), &a.key).cmp(&(created(b), &b.key)));
    let ips = assign_cluster_ips(&valid, cfg, &mut out.errors);
    for (v, ip) in valid.iter().zip(&ips) {
        if let (ClusterIp::Allocate, Some(ip)) = (&v.ip, ip) {
            out.allocated.insert(v.key.clone(), *ip);
        }
    }

    let node_ports = assign_node_ports(&valid, cfg, &mut out.errors);
    // Topology-aware routing: this node's zone, for the endpoints' hints.
    let zone = snapshot.zone_of(&cfg.node);
    let split = |all: &[Endpoint], local_only: bool| split(all, local_only, cfg, zone);
    let index = EndpointIndex::new(snapshot);
    let mut claimed: BTreeMap<(Ipv4Addr, u16, u8), String> = BTreeMap::new();
    for (v, ip) in valid.iter().zip(ips) {
        let Some(ip) = ip else { continue };
        for &(i, sp, port, proto) in &v.ports {
            if let Some(owner) = claimed.get(&(ip, port, proto)) {
                out.errors.push(InputError::new(
                    &v.svc.source,
                    format!("Service {}", v.key),
                    format!("spec.ports[{i}]"),
                    format!("{ip}:{port}/{} is already used by Service {owner}", proto_name(proto)),
                ));
                continue;
            }
            claimed.insert((ip, port, proto), v.key.clone());
            let all = endpoints_of(snapshot, &index, v, sp, cfg.pod_endpoints);
            let mut common = 0;
            if v.affinity_timeout > 0 {
                common |= svc_flags::AFFINITY;
            }
            if v.maglev {
                common |= svc_flags::MAGLEV;
            }
            let port_name = sp
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| port.to_string());
            let name = format!("{}:{port_name}", v.key);
            let frontend = |addr, port, flags, (backends, draining, fallback): (Vec<_>, Vec<_>, bool)| Frontend {
                name: name.clone(),
                addr,
                port,
                proto,
                flags: flags | common | if fallback { svc_flags::TERMINATING_FALLBACK } else { 0 },
                backends,
                draining,
                affinity_timeout: v.affinity_timeout,
                source_ranges: Vec::new(),
            };
            let itp = if v.itp_local { svc_flags::ITP_LOCAL } else { 0 };
            out.frontends.push(frontend(
                ip,
                port,
                svc_flags::CLUSTER_IP | itp,
                split(&all, v.itp_local),
            ));

            // North-south frontends: the node's addresses at the NodePort,
            // externalIPs and LoadBalancer IPs at the Service port.
            let mut external: Vec<(Ipv4Addr, u16, u32, String)> = Vec::new();
            if v.node_ports {
                if let Some(np) = node_ports.get(&(v.key.clone(), i)) {
                    for a in &cfg.nodeport_addrs {
                        external.push((*a, *np, svc_flags::NODE_PORT, format!("spec.ports[{i}].nodePort")));
                    }
                }
            }
            for a in &v.external_ips {
                external.push((*a, port, svc_flags::EXTERNAL_IP, "spec.externalIPs".into()));
            }
            for a in &v.lb_ips {
                external.push((*a, port, svc_flags::LOAD_BALANCER, "status.loadBalancer.ingress".into()));
            }
            let etp = if v.etp_local { svc_flags::ETP_LOCAL } else { 0 };
            let backends = split(&all, v.etp_local);
            if let Some(hc) = v.etp_local.then_some(v.spec.health_check_node_port).flatten() {
                if let Ok(port) = u16::try_from(hc) {
                    let meta = &v.svc.object.metadata;
                    let entry = out.health_checks.entry(port).or_insert_with(|| HealthCheck {
                        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
                        name: meta.name.clone().unwrap_or_default(),
                        local_endpoints: 0,
                    });
                    // Local ready endpoints of the Service (over its ports: the
                    // most). Terminating ones taking new connections as the
                    // last resort do not count: the node answers 503 and load
                    // balancers drain it, as kube-proxy does (KEP-1669).
                    let (usable, _, fallback) = &backends;
                    let ready = if *fallback { 0 } else { usable.len() };
                    entry.local_endpoints = entry.local_endpoints.max(ready);
                }
            }
            for (addr, eport, kind, field) in external {
                if let Some(owner) = claimed.get(&(addr, eport, proto)) {
                    out.errors.push(InputError::new(
                        &v.svc.source,
                        format!("Service {}", v.key),
                        field,
                        format!(
                            "{addr}:{eport}/{} is already used by Service {owner}",
                            proto_name(proto)
                        ),
                    ));
                    continue;
                }
                claimed.insert((addr, eport, proto), v.key.clone());
                // externalTrafficPolicy: Local is for clients outside the
                // cluster: Pods and the node's processes reach every node's
                // endpoints through an internal-scope twin (kube-proxy's
                // short-circuit of in-cluster traffic to external addresses).
                let twin = v
                    .etp_local
                    .then(|| frontend(addr, eport, kind | svc_flags::INTERNAL, split(&all, false)));
                let twin_flag = if twin.is_some() { svc_flags::INTERNAL_TWIN } else { 0 };
                for mut f in
                    std::iter::once(frontend(addr, eport, kind | etp | twin_flag, backends.clone())).chain(twin)
                {
                    // Only LoadBalancer IPs are filtered (kube-proxy leaves
                    // NodePorts and externalIPs open too).
                    if kind == svc_flags::LOAD_BALANCER && !v.source_ranges.is_empty() {
                        f.flags |= svc_flags::SOURCE_RANGES;
                        f.source_ranges = v.source_ranges.clone();
                    }
                    out.frontends.push(f);
                }
            }
        }
    }
    out.frontends.sort_by_key(Frontend::key);
    out
}

/// The endpoints new connections may use (sorted), the ones that only keep
/// their established connections (sorted: not ready, terminating, not on
/// this node when `local_only`, or hinted for other zones), and whether the
/// usable ones are the serving+terminating fallback. Without `local_only`
/// (kube-proxy's "cluster endpoints"), zone hints apply when this node's
/// `zone` is known and [`endpoints::can_use_topology`] says so.
fn split(
    all: &[Endpoint],
    local_only: bool,
    cfg: &Config,
    zone: Option<&str>,
) -> (Vec<BackendSpec>, Vec<BackendSpec>, bool) {
    let (candidates, remote): (Vec<Endpoint>, Vec<Endpoint>) = if local_only {
        all.iter()
            .cloned()
            .partition(|e| e.node.as_deref() == Some(cfg.node.as_str()))
    } else if let Some(zone) = zone.filter(|z| endpoints::can_use_topology(all, z)) {
        all.iter()
            .cloned()
            .partition(|e| e.zone_hints.iter().any(|h| h == zone))
    } else {
        (all.to_vec(), Vec::new())
    };
    let (usable, fallback) = endpoints::usable(candidates.clone());
    let mut draining: Vec<BackendSpec> = candidates
        .into_iter()
        .chain(remote)
        .filter(|e| !usable.iter().any(|u| (u.addr, u.port) == (e.addr, e.port)))
        .map(|e| backend_spec(&e, cfg))
        .collect();
    draining.sort();
    draining.dedup_by(|a, b| (a.addr, a.port) == (b.addr, b.port));
    (
        usable.iter().map(|e| backend_spec(e, cfg)).collect(),
        draining,
        fallback,
    )
}

/// NodePorts by (Service, port index): explicit ones first (a later Service
/// asking for a taken one gets an error), then the missing ones allocated as
/// kube-apiserver would, deterministically here (a stable hash of the Service
/// port into the range, probing onward), so every node agrees.
fn assign_node_ports(valid: &[Valid], cfg: &Config, errors: &mut Vec<InputError>) -> BTreeMap<(String, usize), u16> {
    let mut out = BTreeMap::new();
    let mut taken: BTreeMap<(u16, u8), String> = BTreeMap::new();
    let mut missing = Vec::new();
    for v in valid.iter().filter(|v| v.node_ports) {
        for &(i, sp, _, proto) in &v.ports {
            let Some(np) = sp.node_port else {
                missing.push((v, i, proto));
                continue;
            };
            let np = np as u16; // validated: within the range
            if let Some(owner) = taken.get(&(np, proto)) {
                errors.push(InputError::new(
                    &v.svc.source,
                    format!("Service {}", v.key),
                    format!("spec.ports[{i}].nodePort"),
                    format!("{np}/{} is already used by Service {owner}", proto_name(proto)),
                ));
                continue;
            }
            taken.insert((np, proto), v.key.clone());
            out.insert((v.key.clone(), i), np);
        }
    }
    let (lo, hi) = cfg.node_port_range;
    let size = u32::from(hi.saturating_sub(lo)) + 1;
    for (v, i, proto) in missing {
        let found = probe(&format!("{}:{i}", v.key), size, |k| {
            !taken.contains_key(&(lo + k as u16, proto))
        })
        .map(|k| lo + k as u16);
        match found {
            Some(np) => {
                taken.insert((np, proto), v.key.clone());
                out.insert((v.key.clone(), i), np);
            }
            None => errors.push(InputError::new(
                &v.svc.source,
                format!("Service {}", v.key),
                format!("spec.ports[{i}].nodePort"),
                format!("no free NodePort in {lo}-{hi}"),
            )),
        }
    }
    out
}

fn backend_spec(e: &Endpoint, cfg: &Config) -> BackendSpec {
    BackendSpec {
        addr: e.addr,
        port: e.port,
        terminating: e.terminating,
        local: !cfg.node.is_empty() && e.node.as_deref() == Some(cfg.node.as_str()),
    }
}

/// Checks a Service; returns None when it gets no dataplane entries at all.
fn validate<'a>(svc: &'a Sourced<Service>, cfg: &Config, errors: &mut Vec<InputError>) -> Option<Valid<'a>> {
    let key = ns_name(&svc.object.metadata);
    let err = |field: &str, msg: String| InputError::new(&svc.source, format!("Service {key}"), field, msg);
    if svc.object.metadata.name.as_deref().unwrap_or("").is_empty() {
        errors.push(err("metadata.name", "missing".into()));
        return None;
    }
    // Services another proxy serves, and those marked headless: kube-proxy's
    // informers leave them out (label selector `!service.kubernetes.io/
    // service-proxy-name,!service.kubernetes.io/headless`), and so does Ferry.
    // They are served again as soon as the label goes away.
    let labels = svc.object.metadata.labels.as_ref();
    if [SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL]
        .iter()
        .any(|l| labels.is_some_and(|m| m.contains_key(*l)))
    {
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
        Some(s) => match parse_ipv4(s) {
            Ok(ip) => ClusterIp::Explicit(ip),
            Err(why) => {
                errors.push(err("spec.clusterIP", format!("{s:?}: {why}")));
                return None;
            }
        },
    };
    let mut ports = Vec::new();
    for (i, sp) in spec.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let Some(port) = u16::try_from(sp.port).ok().filter(|p| *p > 0) else {
            errors.push(err(&field("port"), format!("{} out of range 1-65535", sp.port)));
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
        if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) = &sp.target_port {
            if !(1..=65535).contains(t) {
                errors.push(err(&field("targetPort"), format!("{t} out of range 1-65535")));
                continue;
            }
        }
        ports.push((i, sp, port, proto));
    }
    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => 0,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => t as u32,
                Some(t) => {
                    errors.push(err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} out of range 1-{MAX_AFFINITY_TIMEOUT}"),
                    ));
                    return None;
                }
            }
        }
        Some(other) => {
            errors.push(err(
                "spec.sessionAffinity",
                format!("unknown value {other:?} (None, ClientIP)"),
            ));
            return None;
        }
    };
    let itp_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            errors.push(err(
                "spec.internalTrafficPolicy",
                format!("unknown value {other:?} (Cluster, Local)"),
            ));
            return None;
        }
    };
    // (The type was checked above.)
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort") | Some("LoadBalancer"));
    let (lo, hi) = cfg.node_port_range;
    ports.retain(|&(i, sp, _, _)| match sp.node_port {
        Some(np) if node_ports && !(i32::from(lo)..=i32::from(hi)).contains(&np) => {
            errors.push(err(
                &format!("spec.ports[{i}].nodePort"),
                format!("{np} is outside the NodePort range {lo}-{hi} (--service-node-port-range)"),
            ));
            false
        }
        _ => true,
    });
    let addrs = |field: &str, values: Vec<(String, String)>, errors: &mut Vec<InputError>| -> Vec<Ipv4Addr> {
        let mut out = Vec::new();
        for (f, v) in values {
            match parse_ipv4(&v) {
                Ok(a) => out.push(a),
                Err(why) => errors.push(err(&f, format!("{v:?} is {why} ({field})"))),
            }
        }
        out.sort();
        out.dedup();
        out
    };
    let external_ips = addrs(
        "externalIPs",
        spec.external_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(k, v)| (format!("spec.externalIPs[{k}]"), v.clone()))
            .collect(),
        errors,
    );
    let mut lb: Vec<(String, String)> = Vec::new();
    if spec.type_.as_deref() == Some("LoadBalancer") {
        if let Some(ip) = spec.load_balancer_ip.as_ref().filter(|s| !s.is_empty()) {
            lb.push(("spec.loadBalancerIP".into(), ip.clone()));
        }
        let ingress = svc
            .object
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        // ipMode Proxy: the load balancer proxies to the nodes, so traffic to
        // its IP must reach it, not be short-circuited here (kube-proxy >= 1.30).
        for (k, ing) in ingress
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, i)| i.ip_mode.as_deref() != Some("Proxy"))
        {
            if let Some(ip) = ing.ip.as_ref().filter(|s| !s.is_empty()) {
                lb.push((format!("status.loadBalancer.ingress[{k}].ip"), ip.clone()));
            }
        }
    }
    let mut lb_ips = addrs("loadBalancer", lb, errors);
    let source_ranges = if spec.type_.as_deref() == Some("LoadBalancer") {
        match source_ranges(&svc.object, &err, errors) {
            SourceRanges::Anyone => Vec::new(),
            SourceRanges::Only(r) => r,
            SourceRanges::NoneValid(field) => {
                // The operator asked for a restriction we cannot honour:
                // serve no LoadBalancer IP rather than serve it to everyone.
                errors.push(err(
                    &field,
                    "no valid entry: the LoadBalancer IPs are not served (fail closed); ClusterIP, NodePorts and externalIPs are".into(),
                ));
                lb_ips.clear();
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    let etp_local = match spec.external_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            errors.push(err(
                "spec.externalTrafficPolicy",
                format!("unknown value {other:?} (Cluster, Local)"),
            ));
            return None;
        }
    };
    let annotation = svc
        .object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION));
    let maglev = match annotation.map(|a| a.trim()) {
        None => cfg.lb_algorithm == LbAlgorithm::Maglev,
        Some("maglev") => true,
        Some("random") => false,
        Some(other) => {
            errors.push(err(
                &format!("metadata.annotations[{LB_ALGORITHM_ANNOTATION}]"),
                format!("unknown value {other:?} (random, maglev); --lb-algorithm applies"),
            ));
            cfg.lb_algorithm == LbAlgorithm::Maglev
        }
    };
    // kube-proxy reads only the hints; the EndpointSlice controller writes
    // them for PreferClose (and PreferSameZone, its 1.34 name).
    let prefer_close = matches!(
        spec.traffic_distribution.as_deref(),
        Some("PreferClose") | Some("PreferSameZone")
    );
    Some(Valid {
        svc,
        spec,
        key,
        ip,
        ports,
        affinity_timeout,
        itp_local,
        node_ports,
        external_ips,
        lb_ips,
        source_ranges,
        etp_local,
        maglev,
        prefer_close,
    })
}

/// What a LoadBalancer Service's source ranges allow on its LoadBalancer IPs.
#[derive(Debug, PartialEq, Eq)]
enum SourceRanges {
    /// None given (or one of them is 0.0.0.0/0).
    Anyone,
    /// Clients in these prefixes (sorted, deduplicated, host bits cleared).
    Only(Vec<Ipv4Net>),
    /// Entries were given in the field named, and none is valid.
    NoneValid(String),
}

/// spec.loadBalancerSourceRanges, or when it is empty the annotation
/// [`SOURCE_RANGES_ANNOTATION`] (comma separated), like kube-proxy. An entry
/// that is not an IPv4 CIDR or address (a bare address is a /32) gets an error
/// and is skipped; the others apply.
fn source_ranges(
    svc: &Service,
    err: &impl Fn(&str, String) -> InputError,
    errors: &mut Vec<InputError>,
) -> SourceRanges {
    let spec = svc.spec.as_ref().and_then(|s| s.load_balancer_source_ranges.as_ref());
    let (field, entries): (String, Vec<&str>) = match spec.filter(|r| !r.is_empty()) {
        Some(r) => (
            "spec.loadBalancerSourceRanges".into(),
            r.iter().map(String::as_str).collect(),
        ),
        None => {
            let annotation = svc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION));
            match annotation.map(|a| a.trim()).filter(|a| !a.is_empty()) {
                Some(a) => (
                    format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"),
                    a.split(',').collect(),
                ),
                None => return SourceRanges::Anyone,
            }
        }
    };
    let mut out = Vec::new();
    for (i, entry) in entries.iter().map(|e| e.trim()).enumerate() {
        match parse_source_range(entry) {
            Ok(net) => out.push(net),
            Err(why) => errors.push(err(&format!("{field}[{i}]"), format!("{entry:?} {why}; entry skipped"))),
        }
    }
    if out.is_empty() {
        return SourceRanges::NoneValid(field);
    }
    if out.iter().any(|n| n.prefix_len() == 0) {
        return SourceRanges::Anyone;
    }
    out.sort();
    out.dedup();
    SourceRanges::Only(out)
}

/// One source range: `a.b.c.d/len`, or `a.b.c.d` for a /32; host bits cleared.
fn parse_source_range(s: &str) -> Result<Ipv4Net, &'static str> {
    if s.contains(':') {
        return Err("is IPv6, which is not supported yet");
    }
    let net = if s.contains('/') {
        s.parse::<Ipv4Net>().ok()
    } else {
        s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from)
    };
    net.map(|n| n.trunc())
        .ok_or("is not an IPv4 CIDR (like 203.0.113.0/24) or address")
}

/// ClusterIPs: explicit ones as given (outside the range is fine, as with a real
/// apiserver's second range); the others by a stable hash of namespace/name into
/// the range, probing onward on collision, in name order. Same input, same IPs:
/// on every node and across restarts.
fn assign_cluster_ips(valid: &[Valid], cfg: &Config, errors: &mut Vec<InputError>) -> Vec<Option<Ipv4Addr>> {
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
        let found = probe(&valid[i].key, size, |k| !used.contains(&Ipv4Addr::from(base + 1 + k)))
            .map(|k| Ipv4Addr::from(base + 1 + k));
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

/// Deterministic allocation in a range of `size`: the first offset `free`
/// accepts, starting at a stable hash of `key` and probing onward (wrapping).
/// Same input, same result: on every node and across restarts.
fn probe(key: &str, size: u32, free: impl Fn(u32) -> bool) -> Option<u32> {
    let start = fnv1a(key.as_bytes()) % size;
    (0..size).map(|k| (start + k) % size).find(|k| free(*k))
}

/// FNV-1a: a stable hash (std's hasher is randomly seeded).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(0x811c_9dc5u32, |h, b| (h ^ *b as u32).wrapping_mul(0x0100_0193))
}

/// EndpointSlices and Endpoints by the `namespace/name` of their Service,
/// built once per translation so that finding a Service's endpoints does not
/// scan every object (10,000 Services must not cost 10,000²).
struct EndpointIndex<'a> {
    slices: HashMap<String, Vec<&'a Sourced<EndpointSlice>>>,
    endpoints: HashMap<String, Vec<&'a Sourced<Endpoints>>>,
}

impl<'a> EndpointIndex<'a> {
    fn new(snapshot: &'a Snapshot) -> Self {
        let mut slices: HashMap<String, Vec<_>> = HashMap::new();
        for s in &snapshot.endpoint_slices {
            if let Some(svc) = slice_service(&s.object) {
                let ns = s.object.metadata.namespace.as_deref().unwrap_or("default");
                slices.entry(format!("{ns}/{svc}")).or_default().push(s);
            }
        }
        let mut endpoints: HashMap<String, Vec<_>> = HashMap::new();
        for e in &snapshot.endpoints {
            endpoints.entry(ns_name(&e.object.metadata)).or_default().push(e);
        }
        Self { slices, endpoints }
    }
}

fn endpoints_of(
    snapshot: &Snapshot,
    index: &EndpointIndex,
    v: &Valid,
    sp: &ServicePort,
    pod_endpoints: bool,
) -> Vec<Endpoint> {
    let meta = &v.svc.object.metadata;
    let ns = meta.namespace.as_deref().unwrap_or("default");
    if pod_endpoints {
        if let Some(selector) = v.spec.selector.as_ref().filter(|s| !s.is_empty()) {
            let publish_not_ready = v.spec.publish_not_ready_addresses.unwrap_or(false);
            let mut all = endpoints::from_pods(ns, selector, sp, &snapshot.pods, publish_not_ready);
            if v.prefer_close {
                endpoints::hint_own_zones(&mut all, |node| snapshot.zone_of(node));
            }
            return all;
        }
    }
    let slices = index.slices.get(&v.key).map(Vec::as_slice).unwrap_or_default();
    let mut all = endpoints::from_slices(sp, slices);
    for e in index.endpoints.get(&v.key).into_iter().flatten() {
        all.extend(endpoints::from_endpoints(sp, &e.object));
    }
    all
}

fn slice_service(slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Option<String> {
    slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL).cloned()
}

/// An IPv4 address as a Kubernetes object spells it: dotted decimal only.
/// Leading zeros ("010.096.000.010": octal to inet_aton, decimal to Go's
/// ParseIPSloppy, so two proxies would disagree) and surrounding whitespace are
/// refused rather than guessed at; the error says why.
pub fn parse_ipv4(s: &str) -> Result<Ipv4Addr, &'static str> {
    if let Ok(a) = s.parse::<Ipv4Addr>() {
        return Ok(a);
    }
    let octets: Vec<&str> = s.split('.').collect();
    let numeric = octets.len() == 4
        && octets
            .iter()
            .all(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()));
    Err(if s.trim() != s {
        "not an IPv4 address: it has surrounding whitespace"
    } else if s.contains(':') {
        "IPv6, not supported yet"
    } else if numeric && octets.iter().any(|o| o.len() > 1 && o.starts_with('0')) {
        "not an IPv4 address: leading zeros are ambiguous (octal to some parsers, decimal to others); write it without them"
    } else {
        "not an IPv4 address"
    })
}

/// Endpoint addresses that are no IPv4 address: each named with its object
/// and field (the endpoint is left out of every Service).
fn check_endpoint_addresses(snapshot: &Snapshot, errors: &mut Vec<InputError>) {
    for s in snapshot
        .endpoint_slices
        .iter()
        .filter(|s| s.object.address_type == "IPv4")
    {
        for (i, ep) in s.object.endpoints.iter().enumerate() {
            for (j, a) in ep.addresses.iter().enumerate() {
                if let Err(why) = parse_ipv4(a) {
                    errors.push(InputError::new(
                        &s.source,
                        format!("EndpointSlice {}", ns_name(&s.object.metadata)),
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is {why}; the endpoint is left out"),
                    ));
                }
            }
        }
    }
    for e in &snapshot.endpoints {
        for (i, subset) in e.object.subsets.iter().flatten().enumerate() {
            let sets = [
                ("addresses", &subset.addresses),
                ("notReadyAddresses", &subset.not_ready_addresses),
            ];
            for (field, addrs) in sets {
                for (j, a) in addrs.iter().flatten().enumerate() {
                    if let Err(why) = parse_ipv4(&a.ip) {
                        errors.push(InputError::new(
                            &e.source,
                            format!("Endpoints {}", ns_name(&e.object.metadata)),
                            format!("subsets[{i}].{field}[{j}].ip"),
                            format!("{:?} is {why}; the endpoint is left out", a.ip),
                        ));
                    }
                }
            }
        }
    }
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
    use ferry_podstate::{ContainerPortRecord, PodRecord};
    use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};

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
        let last = |b: &[BackendSpec]| b.iter().map(|b| b.addr.octets()[3]).collect();
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
            nodeport_addrs: vec![Ipv4Addr::new(192, 168, 77, 11)],
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
                .map(|b| b.addr.octets()[3])
                .collect::<Vec<_>>(),
            [1],
            "the ClusterIP follows the hints"
        );
    }

    #[test]
    fn prefer_close_hints_each_pod_for_its_nodes_zone_in_standalone_mode() {
        let y = "metadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  trafficDistribution: PreferClose\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";
        let on = |name: &str, ip: u8, node: &str| PodRecord {
            node: node.into(),
            ..pod(name, [10, 244, 0, ip], true, false)
        };
        let mut s = Snapshot {
            services: vec![svc(y)],
            pods: vec![on("a", 1, "n1"), on("b", 2, "n2"), on("c", 3, "n2")],
            nodes: vec![node("n1", "zone-a"), node("n2", "zone-b")],
            ..Default::default()
        };
        assert_eq!(usable_on(&s, "n1"), (vec![1], vec![2, 3]));
        assert_eq!(usable_on(&s, "n2"), (vec![2, 3], vec![1]));
        // zone-a's Pod goes: n1 falls back to every endpoint.
        s.pods.remove(0);
        assert_eq!(usable_on(&s, "n1"), (vec![2, 3], vec![]));
        // A Pod on a node of unknown zone: no hints at all (as the controller).
        s.pods.push(on("d", 4, "n3"));
        assert_eq!(usable_on(&s, "n2"), (vec![2, 3, 4], vec![]));
        // Without trafficDistribution the Pods get no hints.
        s.services = vec![svc(&y.replace("  trafficDistribution: PreferClose\n", ""))];
        s.pods = vec![on("a", 1, "n1"), on("b", 2, "n2")];
        assert_eq!(usable_on(&s, "n1"), (vec![1, 2], vec![]));
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
        assert_eq!(
            (dns.addr, dns.port, dns.proto),
            (Ipv4Addr::new(10, 96, 0, 10), 53, PROTO_UDP)
        );
        assert_eq!(dns.backends.iter().map(|b| b.port).collect::<Vec<_>>(), [5353, 5353]);
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
                    local: false,
                },
                BackendSpec {
                    addr: Ipv4Addr::new(10, 244, 0, 3),
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
                addr: Ipv4Addr::new(10, 244, 0, 2),
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
            nodeport_addrs: vec![Ipv4Addr::new(192, 168, 77, 11)],
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
            [Ipv4Addr::new(10, 244, 0, 2)]
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
        assert_eq!(parse_ipv4("10.96.0.10"), Ok(Ipv4Addr::new(10, 96, 0, 10)));
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
        let frontends: Vec<(Ipv4Addr, Vec<Ipv4Addr>)> = t
            .frontends
            .iter()
            .map(|f| (f.addr, f.backends.iter().map(|b| b.addr).collect()))
            .collect();
        let good = vec![Ipv4Addr::new(10, 244, 0, 3)];
        assert_eq!(
            frontends,
            [
                (Ipv4Addr::new(10, 96, 0, 20), good.clone()),
                (Ipv4Addr::new(203, 0, 113, 12), good)
            ],
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
            svc(&format!("metadata: {{name: web, labels: {{{labels}}}}}\nspec: {{clusterIP: 10.96.0.20, ports: [{{port: 80}}]}}\n"))
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
        let lb_ips: Vec<Ipv4Addr> = t
            .frontends
            .iter()
            .filter(|f| f.flags & svc_flags::LOAD_BALANCER != 0)
            .map(|f| f.addr)
            .collect();
        assert_eq!(lb_ips, [Ipv4Addr::new(203, 0, 113, 21)], "only the VIP-mode ingress");
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
                addr: Ipv4Addr::new(10, 0, 0, 1),
                port: 8080,
                terminating: false,
                local: false,
            }]
        );
        let legacy = t.frontends.iter().find(|f| f.port == 9000).unwrap();
        assert_eq!(
            legacy.backends,
            vec![BackendSpec {
                addr: Ipv4Addr::new(10, 0, 1, 1),
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
            t.frontends.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            ["default/a-first:80", "default/a-first:81"]
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
            [Ipv4Addr::new(10, 0, 0, 1)],
            "only n1's endpoint"
        );
        assert_eq!(
            f.draining.iter().map(|b| b.addr).collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 0, 0, 2)],
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
                    addr: Ipv4Addr::new(10, 244, 0, 3),
                    port: 8080,
                    terminating: false,
                    local: false,
                },
                BackendSpec {
                    addr: Ipv4Addr::new(10, 244, 0, 4),
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
            assert_eq!((f.addr, f.port), (Ipv4Addr::new(10, 96, 0, 70), 53));
            f.backends
                .iter()
                .map(|b| (b.addr.octets()[3], b.port))
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
                .map(|b| (b.addr.octets()[3], b.port))
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
                .map(|f| (f.name.clone(), f.addr))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(ips(&t1), ips(&t2), "order of input does not matter");
        let range: Ipv4Net = "10.96.0.0/12".parse().unwrap();
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
            nodeport_addrs: vec![Ipv4Addr::new(192, 168, 77, 11), Ipv4Addr::new(192, 168, 77, 12)],
            ..Config::default()
        };
        let t = translate(&s, &cfg);
        let errors: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "s.yaml: Service default/lb: spec.ports[1].nodePort: 40000 is outside the NodePort range 30000-32767 (--service-node-port-range)",
                "s.yaml: Service default/lb: spec.externalIPs[1]: \"nope\" is not an IPv4 address (externalIPs)",
                "s.yaml: Service default/dup: spec.ports[0].nodePort: 30080/TCP is already used by Service default/lb",
            ]
        );
        let of = |addr: [u8; 4], port: u16| {
            t.frontends
                .iter()
                .find(|f| f.addr == Ipv4Addr::from(addr) && f.port == port)
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
                [(Ipv4Addr::new(10, 244, 0, 2), true)]
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
            .filter(|f| {
                f.addr == Ipv4Addr::new(192, 168, 77, 11) && f.port != 30080 && f.flags & svc_flags::INTERNAL == 0
            })
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
            .any(|f| f.addr == Ipv4Addr::new(10, 96, 0, 31) && f.backends.is_empty()));
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
            nodeport_addrs: vec![Ipv4Addr::new(192, 168, 77, 11)],
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
                .filter(|f| f.addr == Ipv4Addr::from(addr) && f.port == port)
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
        assert_eq!(
            t.frontends
                .iter()
                .filter(|f| f.addr == Ipv4Addr::new(10, 96, 0, 30))
                .count(),
            1
        );
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
            nodeport_addrs: vec![Ipv4Addr::new(192, 168, 77, 11)],
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
    fn restrictions(t: &Translation) -> Vec<(Ipv4Addr, u32, Vec<String>)> {
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
        let open = |a: [u8; 4]| (Ipv4Addr::from(a), 0, Vec::<String>::new());
        assert_eq!(
            restrictions(&t),
            [
                open([10, 96, 0, 80]),
                open([192, 168, 77, 11]),
                open([203, 0, 113, 10]),
                (
                    Ipv4Addr::new(203, 0, 113, 20),
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
                "10.0.0.0/8".parse::<Ipv4Net>().unwrap(),
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
        assert_eq!(lb.source_ranges, ["172.16.0.0/12".parse::<Ipv4Net>().unwrap()]);
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
            "  loadBalancerSourceRanges: [192.168.77.200/32, 10.0.0.0/33, \"2001:db8::/32\", nope]\n",
        ));
        let errors: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "s.yaml: Service shop/lb: spec.loadBalancerSourceRanges[1]: \"10.0.0.0/33\" is not an IPv4 CIDR (like 203.0.113.0/24) or address; entry skipped",
                "s.yaml: Service shop/lb: spec.loadBalancerSourceRanges[2]: \"2001:db8::/32\" is IPv6, which is not supported yet; entry skipped",
                "s.yaml: Service shop/lb: spec.loadBalancerSourceRanges[3]: \"nope\" is not an IPv4 CIDR (like 203.0.113.0/24) or address; entry skipped",
            ]
        );
        let lb = t
            .frontends
            .iter()
            .find(|f| f.flags & svc_flags::LOAD_BALANCER != 0)
            .expect("the valid entry still applies");
        assert_eq!(lb.source_ranges, ["192.168.77.200/32".parse::<Ipv4Net>().unwrap()]);
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
            "  loadBalancerSourceRanges: [\"10.0.0.0/40\", \"fd00::/8\"]\n",
        ));
        let errors: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(
            errors[2],
            "s.yaml: Service shop/lb: spec.loadBalancerSourceRanges: no valid entry: the LoadBalancer IPs are not served (fail closed); ClusterIP, NodePorts and externalIPs are"
        );
        let addrs: Vec<Ipv4Addr> = t.frontends.iter().map(|f| f.addr).collect();
        assert_eq!(
            addrs,
            [
                Ipv4Addr::new(10, 96, 0, 80),
                Ipv4Addr::new(192, 168, 77, 11),
                Ipv4Addr::new(203, 0, 113, 10)
            ]
        );
        assert!(t
            .frontends
            .iter()
            .all(|f| f.flags & (svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES) == 0));
    }
}
