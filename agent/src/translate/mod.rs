//! THE translation: cluster objects in, desired frontends and backends out.
//!
//! A pure function (no I/O, no clock, no randomness): the same snapshot always
//! gives the same result, so it is unit-tested with plain builders and both sources
//! (manifests, API) share it. Map ids and byte layout are `maps::layout`'s job.
//!
//! By concern, in the order [`translate`] runs them:
//! - [`service`]: validating a Service object, field by field, into a
//!   [`service::Valid`] (what its ports, addresses and policies are);
//! - [`policies`]: the Service's policy fields (session affinity, traffic
//!   policies, LB algorithm, traffic distribution, source ranges);
//! - [`slices`]: validating EndpointSlices and Endpoints, and finding a
//!   Service's endpoints among them (or among the shim's Pods);
//! - [`alloc`]: ClusterIPs and NodePorts the Service did not give, allocated
//!   deterministically so every node agrees;
//! - [`frontends`]: every address a client dials for a Service port
//!   (ClusterIP, NodePorts, externalIPs, LoadBalancer IPs), conflicts refused;
//! - [`backends`]: which endpoints take new connections and which only drain.
//!
//! Addresses are family-generic ([`IpAddr`], [`IpNet`]) and both families are
//! read (a dual-stack Service has a ClusterIP of each, `spec.clusterIPs` in
//! `spec.ipFamilies` order, and each frontend leads to the endpoints of its
//! own family); [`Config::families`] says which families the dataplane
//! serves ([`family`]): the frontends of another family are translated into
//! [`Translation::not_served`], not into [`Translation::frontends`], and the
//! maps' byte encoding of a family is `maps::layout`'s.
mod alloc;
mod backends;
mod family;
mod frontends;
mod policies;
mod service;
mod slices;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, net::IpAddr};

use ferry_common::{PROTO_TCP, PROTO_UDP};
use ipnet::IpNet;

use crate::{
    error::InputError,
    ids::{FrontendId, FrontendKind, PortId, ServiceId},
    model::Snapshot,
};

pub use family::{parse_ip, Families, Family, ServiceCidrs};
pub use slices::slice_service;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Settings translation depends on.
#[derive(Clone, Debug)]
pub struct Config {
    /// The address families the dataplane serves (today: IPv4 only): the
    /// frontends of another family go to [`Translation::not_served`].
    pub families: Families,
    /// Where ClusterIPs are allocated for Services without spec.clusterIP
    /// (one range per family; `--service-cluster-ip-range`).
    pub service_cidrs: ServiceCidrs,
    /// This node's name: internalTrafficPolicy: Local keeps the endpoints whose
    /// nodeName equals it, and endpoints on it are marked local. Empty: unknown.
    pub node: String,
    /// Standalone mode plays the endpoints controller: endpoints of Services with a
    /// selector come from the Pods the shim reports. In cluster mode (false) the
    /// cluster's controller has written EndpointSlices for them, and those count.
    pub pod_endpoints: bool,
    /// The node addresses NodePorts are served on (`--nodeport-addresses`),
    /// of both families: a Service's NodePorts are on those of its families.
    pub nodeport_addrs: Vec<IpAddr>,
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
            families: Families::default(),
            service_cidrs: ServiceCidrs::single("10.96.0.0/12".parse().expect("valid CIDR")),
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

/// Every annotation translation reads: the cluster source keeps these and
/// drops the others (kubectl's last-applied-configuration can be most of an
/// object).
pub const READ_ANNOTATIONS: [&str; 2] = [SOURCE_RANGES_ANNOTATION, LB_ALGORITHM_ANNOTATION];

/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

/// sessionAffinityConfig.clientIP.timeoutSeconds when unset (Kubernetes' default).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The API's upper bound for the affinity timeout (one day).
pub const MAX_AFFINITY_TIMEOUT: i32 = 86_400;

/// A service address clients dial: {addr, port, protocol} and where it leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// Its Service, port and kind (the kind's bit is also in `flags`).
    pub id: FrontendId,
    pub addr: IpAddr,
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
    pub source_ranges: Vec<IpNet>,
}

impl Frontend {
    pub fn key(&self) -> (IpAddr, u16, u8) {
        (self.addr, self.port, self.proto)
    }

    /// What translation makes of a plain TCP ClusterIP Service port (unnamed)
    /// of `service` on `addr:port`: its ready endpoints `backends` (on other
    /// nodes), all on `backend_port`. For tests of what comes after translation.
    pub fn cluster_ip(
        service: ServiceId,
        addr: impl Into<IpAddr>,
        port: u16,
        backends: impl IntoIterator<Item = impl Into<IpAddr>>,
        backend_port: u16,
    ) -> Self {
        let backends = backends
            .into_iter()
            .map(|addr| BackendSpec {
                addr: addr.into(),
                port: backend_port,
                terminating: false,
                local: false,
            })
            .collect();
        let kind = FrontendKind::ClusterIP;
        Self {
            id: FrontendId {
                service,
                port: PortId::Number(port),
                kind,
            },
            addr: addr.into(),
            port,
            proto: PROTO_TCP,
            flags: kind.flag(),
            backends,
            draining: Vec::new(),
            affinity_timeout: 0,
            source_ranges: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub port: u16,
    pub terminating: bool,
    /// The endpoint runs on this node (EndpointSlice nodeName, Pod node).
    pub local: bool,
}

/// The result: what the maps should hold, and what was wrong with the input.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    /// The frontends of the families the dataplane serves
    /// ([`Config::families`]), sorted by (addr, port, proto).
    pub frontends: Vec<Frontend>,
    /// The frontends of the other families (IPv6 today), translated the same
    /// way (with the endpoints of their family) but not programmed; sorted
    /// likewise. [`not_served_notices`] names them once per Service.
    pub not_served: Vec<Frontend>,
    pub errors: Vec<InputError>,
    /// ClusterIPs allocated for Services without one of a family they have
    /// (in `spec.ipFamilies` order), for the caller to log.
    pub allocated: BTreeMap<ServiceId, Vec<IpAddr>>,
    /// healthCheckNodePort → what it reports (Services with
    /// externalTrafficPolicy: Local and a healthCheckNodePort).
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// What a healthCheckNodePort answers, as kube-proxy's: the Service and how
/// many of its endpoints are ready on this node (200 when some are, 503 when
/// none, so load balancers send external traffic only to nodes that serve it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceId,
    pub local_endpoints: usize,
}

/// Translates a snapshot of cluster objects into the frontends this node
/// serves, with every problem in the input named by object and field.
pub fn translate(snapshot: &Snapshot, cfg: &Config) -> Translation {
    let mut out = Translation::default();
    let valid = service::validate_all(snapshot, cfg, &mut out.errors);
    slices::check(snapshot, &valid.names, &mut out.errors);
    let ips = alloc::cluster_ips(&valid.services, cfg, &mut out.errors);
    for (v, ips) in valid.services.iter().zip(&ips) {
        let allocated: Vec<IpAddr> = v
            .ips
            .iter()
            .zip(ips)
            .filter_map(|(given, ip)| match (given, ip) {
                (service::ClusterIp::Allocate(_), Some(ip)) => Some(*ip),
                _ => None,
            })
            .collect();
        if !allocated.is_empty() {
            out.allocated.insert(v.id.clone(), allocated);
        }
    }
    let node_ports = alloc::node_ports(&valid.services, cfg, &mut out.errors);
    frontends::build(snapshot, cfg, &valid.services, ips, &node_ports, &mut out);
    let (served, not_served) = std::mem::take(&mut out.frontends)
        .into_iter()
        .partition(|f| cfg.families.admits(Family::of(f.addr)));
    (out.frontends, out.not_served) = (served, not_served);
    out.frontends.sort_by_key(Frontend::key);
    out.not_served.sort_by_key(Frontend::key);
    out
}

/// One line per Service among `not_served` (frontends of a family the
/// dataplane does not serve), naming them: "default/web: IPv6 frontends
/// [fd00::10]:80/TCP not served: this dataplane serves IPv4 only". Sorted;
/// the same translation gives the same lines, so a caller logging each line
/// when it appears names each Service once, not at every sync.
pub fn not_served_notices<'a>(not_served: impl IntoIterator<Item = &'a Frontend>, served: Families) -> Vec<String> {
    let mut by_service: BTreeMap<(&ServiceId, Family), std::collections::BTreeSet<_>> = BTreeMap::new();
    for f in not_served {
        by_service
            .entry((&f.id.service, Family::of(f.addr)))
            .or_default()
            .insert(f.key());
    }
    let serves = match (served.admits(Family::V4), served.admits(Family::V6)) {
        (true, false) => "IPv4 only",
        (false, true) => "IPv6 only",
        _ => "other families",
    };
    by_service
        .into_iter()
        .map(|((svc, family), fs)| {
            let fs: Vec<String> = fs
                .into_iter()
                .map(|(addr, port, proto)| format!("{}/{}", std::net::SocketAddr::new(addr, port), proto_name(proto)))
                .collect();
            format!(
                "{svc}: {family} frontends {} not served: this dataplane serves {serves}",
                fs.join(", ")
            )
        })
        .collect()
}

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        _ => "?",
    }
}
