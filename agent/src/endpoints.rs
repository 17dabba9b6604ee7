//! Endpoints of a Service port, from any of the three places Kubernetes keeps them:
//! Pods matching the selector (standalone mode plays the endpoints controller),
//! EndpointSlices (discovery.k8s.io/v1) and Endpoints (v1).
use std::{collections::BTreeMap, net::IpAddr};

use ferry_podstate::PodRecord;
use k8s_openapi::{
    api::{
        core::v1::{Endpoints, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    model::Sourced,
    translate::{parse_ip, Family},
};

/// One endpoint of a Service port with its conditions (KEP-1672).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    /// hints.forZones: the zones whose clients should use this endpoint
    /// (topology-aware routing; empty: no hint).
    pub zone_hints: Vec<String>,
    /// hints.forNodes: the nodes whose clients should use this endpoint
    /// (`trafficDistribution: PreferSameNode`; empty: no hint).
    pub node_hints: Vec<String>,
}

/// Endpoints of `port` of a Service with a selector: the Pods in its namespace whose
/// labels match, that have an IP and run. With `publish_not_ready`
/// (spec.publishNotReadyAddresses) every such Pod is ready, as the EndpointSlice
/// controller marks it (`ready = publishNotReadyAddresses || (podReady &&
/// !terminating)`); `serving` stays the Pod's own readiness.
pub fn from_pods(
    namespace: &str,
    selector: &BTreeMap<String, String>,
    port: &ServicePort,
    pods: &[PodRecord],
    publish_not_ready: bool,
) -> Vec<Endpoint> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    pods.iter()
        .filter(|p| p.namespace == namespace && p.phase == "Running")
        .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .filter_map(|p| {
            let addr = IpAddr::from(p.pod_ip?);
            let target = match &port.target_port {
                None => u16::try_from(port.port).ok()?,
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok()?,
                Some(IntOrString::String(name)) => {
                    p.ports
                        .iter()
                        .find(|cp| cp.name.as_deref() == Some(name) && cp.protocol == protocol)?
                        .container_port
                }
            };
            Some(Endpoint {
                addr,
                port: target,
                ready: publish_not_ready || (p.ready && !p.terminating),
                serving: p.ready,
                terminating: p.terminating,
                node: Some(p.node.clone()),
                zone_hints: Vec::new(),
                node_hints: Vec::new(),
            })
        })
        .collect()
}

/// The family of a slice's addresses (None for FQDN slices: skipped).
pub fn slice_family(slice: &EndpointSlice) -> Option<Family> {
    Family::of_address_type(&slice.address_type)
}

/// An address of a slice of addressType `family`: valid, and of the slice's
/// family.
pub fn slice_address(a: &str, family: Family) -> Result<IpAddr, String> {
    let addr = parse_ip(a)?;
    if Family::of(addr) != family {
        return Err(format!("not an {family} address (the slice's addressType)"));
    }
    Ok(addr)
}

/// Endpoints of `port` from the EndpointSlices of the Service (label
/// `kubernetes.io/service-name`), matched by port name and protocol, of both
/// families (addressType IPv4 and IPv6).
pub fn from_slices(port: &ServicePort, slices: &[&Sourced<EndpointSlice>]) -> Vec<Endpoint> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    let mut out = Vec::new();
    for s in slices {
        let slice = &s.object;
        let Some(family) = slice_family(slice) else {
            continue;
        };
        let Some(slice_port) = slice.ports.iter().flatten().find(|sp| {
            sp.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or("")
                && sp.protocol.as_deref().unwrap_or("TCP") == protocol
        }) else {
            continue;
        };
        let Some(target) = slice_port.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in &slice.endpoints {
            let cond = ep.conditions.as_ref();
            // Unset `ready` means unknown: interpreted as ready (the API's rule).
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            for a in &ep.addresses {
                // Bad spellings are reported by translate's checks.
                if let Ok(addr) = slice_address(a, family) {
                    out.push(Endpoint {
                        addr,
                        port: target,
                        ready,
                        serving,
                        terminating,
                        node: ep.node_name.clone(),
                        zone_hints: ep
                            .hints
                            .iter()
                            .flat_map(|h| h.for_zones.iter().flatten())
                            .map(|z| z.name.clone())
                            .collect(),
                        node_hints: ep
                            .hints
                            .iter()
                            .flat_map(|h| h.for_nodes.iter().flatten())
                            .map(|n| n.name.clone())
                            .collect(),
                    });
                }
            }
        }
    }
    out
}

/// Endpoints of `port` from a v1 Endpoints object (subsets, matched by port
/// name), of both families.
pub fn from_endpoints(port: &ServicePort, endpoints: &Endpoints) -> Vec<Endpoint> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    let mut out = Vec::new();
    for subset in endpoints.subsets.iter().flatten() {
        let Some(p) = subset.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or("")
                && p.protocol.as_deref().unwrap_or("TCP") == protocol
        }) else {
            continue;
        };
        let Ok(target) = u16::try_from(p.port) else {
            continue;
        };
        let sets = [
            (subset.addresses.iter().flatten(), true),
            (subset.not_ready_addresses.iter().flatten(), false),
        ];
        for (addrs, ready) in sets {
            for a in addrs {
                if let Ok(addr) = parse_ip(&a.ip) {
                    out.push(Endpoint {
                        addr,
                        port: target,
                        ready,
                        serving: ready,
                        terminating: false,
                        node: a.node_name.clone(),
                        zone_hints: Vec::new(),
                        node_hints: Vec::new(),
                    });
                }
            }
        }
    }
    out
}

/// Which hints narrow a node's endpoints (kube-proxy's topology modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology<'a> {
    /// The endpoints hinted for this node (`hints.forNodes`).
    SameNode(&'a str),
    /// The endpoints hinted for this node's zone (`hints.forZones`).
    SameZone(&'a str),
}

impl Topology<'_> {
    /// Whether `e` serves clients on this node in this mode.
    pub fn admits(self, e: &Endpoint) -> bool {
        match self {
            Topology::SameNode(node) => e.node_hints.iter().any(|n| n == node),
            Topology::SameZone(zone) => e.zone_hints.iter().any(|z| z == zone),
        }
    }
}

/// The hints that apply on `node` (in `zone`, if known), as kube-proxy
/// decides (`topologyModeFromHints`, pkg/proxy/topology.go): node hints when
/// every ready endpoint has one and at least one is hinted for this node;
/// else zone hints when every ready endpoint has one and at least one is
/// hinted for this zone; else none, and all endpoints are used (hints
/// missing, or none left for this node or zone).
pub fn topology<'a>(all: &[Endpoint], node: &'a str, zone: Option<&'a str>) -> Option<Topology<'a>> {
    let ready = || all.iter().filter(|e| e.ready);
    let applies = |hints: fn(&Endpoint) -> &[String], mode: Topology| {
        ready().all(|e| !hints(e).is_empty()) && ready().any(|e| mode.admits(e))
    };
    let same_node = Topology::SameNode(node);
    if !node.is_empty() && applies(|e| e.node_hints.as_slice(), same_node) {
        return Some(same_node);
    }
    let same_zone = Topology::SameZone(zone?);
    applies(|e| e.zone_hints.as_slice(), same_zone).then_some(same_zone)
}

/// Plays the EndpointSlice controller for `trafficDistribution: PreferClose`
/// (standalone mode): each endpoint is hinted for the zone of its node
/// (`zone_of`); endpoints on a node of unknown zone get no hint, which turns
/// the hints off for the whole Service (see [`topology`]).
pub fn hint_own_zones<'a>(all: &mut [Endpoint], zone_of: impl Fn(&str) -> Option<&'a str>) {
    for e in all {
        e.zone_hints = e
            .node
            .as_deref()
            .and_then(&zone_of)
            .map(|z| vec![z.to_string()])
            .unwrap_or_default();
    }
}

/// Plays the EndpointSlice controller for `trafficDistribution:
/// PreferSameNode` (standalone mode; zone hints come from [`hint_own_zones`]
/// as well, as the controller writes both): each endpoint is hinted for its
/// own node.
pub fn hint_own_nodes(all: &mut [Endpoint]) {
    for e in all {
        e.node_hints = e.node.iter().cloned().collect();
    }
}

/// A Service port's endpoints from all its slices, each address and port
/// once, as kube-proxy's EndpointSlice cache merges them before hints are
/// read: a duplicate counts with its best condition (ready, then serving), and
/// of equals the one with topology hints is kept. Sorted by address and port.
pub fn merge(mut all: Vec<Endpoint>) -> Vec<Endpoint> {
    all.sort_by_key(|e| {
        (
            e.addr,
            e.port,
            !e.ready,
            !e.serving,
            e.zone_hints.is_empty() && e.node_hints.is_empty(),
        )
    });
    all.dedup_by(|a, b| a.addr == b.addr && a.port == b.port);
    all
}

/// The endpoints that take new connections: the ready ones; if none is ready, the
/// serving and terminating ones (graceful termination, KEP-1669). Sorted, deduped
/// by address and port (the same endpoint listed twice counts with its best
/// condition). The second value says whether the fallback was used.
pub fn usable(all: Vec<Endpoint>) -> (Vec<Endpoint>, bool) {
    let all = merge(all);
    let ready: Vec<Endpoint> = all.iter().filter(|e| e.ready).cloned().collect();
    if !ready.is_empty() {
        return (ready, false);
    }
    let fallback: Vec<Endpoint> = all.into_iter().filter(|e| e.serving && e.terminating).collect();
    let used = !fallback.is_empty();
    (fallback, used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_podstate::ContainerPortRecord;
    use std::net::Ipv4Addr;

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addr: Ipv4Addr::new(10, 0, 0, last).into(),
            port: 80,
            ready,
            serving,
            terminating,
            node: None,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    #[test]
    fn a_duplicate_from_another_slice_does_not_turn_hints_off() {
        let hinted = |last, zone: &str| Endpoint {
            zone_hints: vec![zone.to_string()],
            ..ep(last, true, true, false)
        };
        // Slice A: .1 for zone a, .2 for zone b; slice B lists .1 again, without hints.
        let all = vec![hinted(1, "a"), hinted(2, "b"), ep(1, true, true, false)];
        assert_eq!(
            topology(&all, "n1", Some("a")),
            None,
            "unmerged, the duplicate has no hint"
        );
        let merged = merge(all);
        assert_eq!(merged, vec![hinted(1, "a"), hinted(2, "b")]);
        assert_eq!(topology(&merged, "n1", Some("a")), Some(Topology::SameZone("a")));
        // A ready duplicate wins over a not-ready one, hints or not.
        let not_ready = Endpoint {
            ready: false,
            ..hinted(3, "a")
        };
        assert_eq!(
            merge(vec![not_ready, ep(3, true, true, false)]),
            vec![ep(3, true, true, false)]
        );
    }

    #[test]
    fn duplicates_count_with_their_best_condition() {
        let (u, fallback) = usable(vec![
            ep(1, false, false, false),
            ep(2, true, true, false),
            ep(1, true, true, false),
        ]);
        assert!(!fallback);
        assert_eq!(u, vec![ep(1, true, true, false), ep(2, true, true, false)]);
        // Not serving and terminating: not even a fallback.
        let (u, fallback) = usable(vec![ep(1, false, false, true), ep(2, false, true, false)]);
        assert!(u.is_empty() && !fallback);
    }

    #[test]
    fn pods_must_match_namespace_labels_phase_and_have_an_ip() {
        let base = PodRecord {
            name: "p".into(),
            namespace: "default".into(),
            node: "n1".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            ports: vec![ContainerPortRecord {
                name: Some("web".into()),
                container_port: 8080,
                protocol: "TCP".into(),
            }],
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 2)),
            host_ip: None,
            phase: "Running".into(),
            ready: true,
            terminating: false,
            netns: None,
            restarts: 0,
        };
        let other_ns = PodRecord {
            namespace: "prod".into(),
            ..base.clone()
        };
        let pending = PodRecord {
            phase: "Pending".into(),
            ..base.clone()
        };
        let no_ip = PodRecord {
            pod_ip: None,
            ..base.clone()
        };
        let other_app = PodRecord {
            labels: [("app".to_string(), "db".to_string())].into(),
            ..base.clone()
        };
        let pods = [base, other_ns, pending, no_ip, other_app];
        let selector: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let port: ServicePort = serde_json::from_str(r#"{"port": 80, "targetPort": "web"}"#).expect("valid port");
        let eps = from_pods("default", &selector, &port, &pods, false);
        assert_eq!(eps.len(), 1);
        assert_eq!((eps[0].addr, eps[0].port), (Ipv4Addr::new(10, 244, 0, 2).into(), 8080));
        // A named port the Pod does not have: the Pod is no endpoint of that port.
        let port: ServicePort = serde_json::from_str(r#"{"port": 80, "targetPort": "nope"}"#).expect("valid port");
        assert!(from_pods("default", &selector, &port, &pods, false).is_empty());
    }
}
