//! Every address a client dials for a valid Service port: the ClusterIP, the
//! node's addresses at the NodePort, externalIPs and LoadBalancer IPs (with an
//! internal-scope twin under externalTrafficPolicy: Local), each claimed once:
//! a later Service asking for a taken address:port gets an error. A
//! dual-stack Service gets them for each of its families (each ClusterIP
//! with the node addresses, externalIPs and LoadBalancer IPs of its family),
//! each leading to the endpoints of its family.
use std::{collections::BTreeMap, net::IpAddr};

use ferry_common::svc_flags;

use super::{
    backends::split,
    proto_name,
    service::Valid,
    slices::{endpoints_of, EndpointIndex},
    BackendSpec, Config, Family, Frontend, HealthCheck, Translation,
};
use crate::{
    endpoints::Endpoint,
    error::InputError,
    ids::{FrontendId, FrontendKind, PortId, ServiceId},
    model::Snapshot,
};

/// Adds the frontends of every port of `valid` (in order: earlier Services win
/// conflicts) to `out`, with the health checks of externalTrafficPolicy: Local.
pub(super) fn build(
    snapshot: &Snapshot,
    cfg: &Config,
    valid: &[Valid],
    ips: Vec<Vec<Option<IpAddr>>>,
    node_ports: &BTreeMap<(ServiceId, usize), u16>,
    out: &mut Translation,
) {
    // Topology-aware routing: this node's zone, for the endpoints' hints.
    let zone = snapshot.zone_of(&cfg.node);
    let split = |all: &[Endpoint], local_only: bool| split(all, local_only, cfg, zone);
    let index = EndpointIndex::new(snapshot);
    let mut claimed: BTreeMap<(IpAddr, u16, u8), ServiceId> = BTreeMap::new();
    // Each ClusterIP of each Service, with the frontends of its family.
    let each_ip = valid
        .iter()
        .zip(ips)
        .flat_map(|(v, ips)| ips.into_iter().flatten().map(move |ip| (v, ip)));
    for (v, ip) in each_ip {
        let family = Family::of(ip);
        for &(i, sp, port, proto) in &v.ports {
            if let Some(owner) = claimed.get(&(ip, port, proto)) {
                out.errors.push(InputError::new(
                    &v.svc.source,
                    format!("Service {}", v.id),
                    format!("spec.ports[{i}]"),
                    format!("{ip}:{port}/{} is already used by Service {owner}", proto_name(proto)),
                ));
                continue;
            }
            claimed.insert((ip, port, proto), v.id.clone());
            let all = endpoints_of(snapshot, &index, v, sp, cfg);
            let mut common = 0;
            if v.affinity_timeout > 0 {
                common |= svc_flags::AFFINITY;
            }
            if v.maglev {
                common |= svc_flags::MAGLEV;
            }
            let port_id = match sp.name.clone().filter(|n| !n.is_empty()) {
                Some(n) => PortId::Name(n),
                None => PortId::Number(port),
            };
            // A frontend leads to the endpoints of its own family (a
            // dual-stack Service's IPv4 addresses to its IPv4 endpoints).
            let of_family = |addr: IpAddr, b: Vec<BackendSpec>| -> Vec<BackendSpec> {
                b.into_iter()
                    .filter(|b| Family::of(b.addr) == Family::of(addr))
                    .collect()
            };
            let frontend = |addr,
                            port,
                            kind: FrontendKind,
                            flags,
                            (backends, draining, fallback): (Vec<_>, Vec<_>, bool)| {
                Frontend {
                    id: FrontendId {
                        service: v.id.clone(),
                        port: port_id.clone(),
                        kind,
                    },
                    addr,
                    port,
                    proto,
                    flags: kind.flag() | flags | common | if fallback { svc_flags::TERMINATING_FALLBACK } else { 0 },
                    backends: of_family(addr, backends),
                    draining: of_family(addr, draining),
                    affinity_timeout: v.affinity_timeout,
                    source_ranges: Vec::new(),
                }
            };
            let itp = if v.itp_local { svc_flags::ITP_LOCAL } else { 0 };
            out.frontends.push(frontend(
                ip,
                port,
                FrontendKind::ClusterIP,
                itp,
                split(&all, v.itp_local),
            ));

            // North-south frontends: the node's addresses at the NodePort,
            // externalIPs and LoadBalancer IPs at the Service port.
            let mut external: Vec<(IpAddr, u16, FrontendKind, String)> = Vec::new();
            if let Some(np) = node_ports.get(&(v.id.clone(), i)) {
                for a in cfg.nodeport_addrs.iter().filter(|a| Family::of(**a) == family) {
                    external.push((*a, *np, FrontendKind::NodePort, format!("spec.ports[{i}].nodePort")));
                }
            }
            for a in v.external_ips.iter().filter(|a| Family::of(**a) == family) {
                external.push((*a, port, FrontendKind::ExternalIP, "spec.externalIPs".into()));
            }
            for a in v.lb_ips.iter().filter(|a| Family::of(**a) == family) {
                external.push((
                    *a,
                    port,
                    FrontendKind::LoadBalancer,
                    "status.loadBalancer.ingress".into(),
                ));
            }
            let etp = if v.etp_local { svc_flags::ETP_LOCAL } else { 0 };
            let backends = split(&all, v.etp_local);
            // The health check counts the endpoints of a served family (a
            // dual-stack Pod is one endpoint of each).
            if v.etp_local && cfg.families.admits(family) {
                let (usable, draining, fallback) = &backends;
                let of_family = (
                    of_family(ip, usable.clone()),
                    of_family(ip, draining.clone()),
                    *fallback,
                );
                count_health_check(v, &of_family, &mut out.health_checks);
            }
            for (addr, eport, kind, field) in external {
                if let Some(owner) = claimed.get(&(addr, eport, proto)) {
                    out.errors.push(InputError::new(
                        &v.svc.source,
                        format!("Service {}", v.id),
                        field,
                        format!(
                            "{addr}:{eport}/{} is already used by Service {owner}",
                            proto_name(proto)
                        ),
                    ));
                    continue;
                }
                claimed.insert((addr, eport, proto), v.id.clone());
                // externalTrafficPolicy: Local is for clients outside the
                // cluster: Pods and the node's processes reach every node's
                // endpoints through an internal-scope twin (kube-proxy's
                // short-circuit of in-cluster traffic to external addresses).
                let twin = v
                    .etp_local
                    .then(|| frontend(addr, eport, kind, svc_flags::INTERNAL, split(&all, false)));
                let twin_flag = if twin.is_some() { svc_flags::INTERNAL_TWIN } else { 0 };
                for mut f in std::iter::once(frontend(addr, eport, kind, etp | twin_flag, backends.clone())).chain(twin)
                {
                    // Only LoadBalancer IPs are filtered (kube-proxy leaves
                    // NodePorts and externalIPs open too), each by the ranges
                    // of its family (none of its family: nobody).
                    if kind == FrontendKind::LoadBalancer && !v.source_ranges.is_empty() {
                        f.flags |= svc_flags::SOURCE_RANGES;
                        f.source_ranges = v
                            .source_ranges
                            .iter()
                            .filter(|n| Family::of_net(**n) == Family::of(addr))
                            .copied()
                            .collect();
                    }
                    out.frontends.push(f);
                }
            }
        }
    }
}

/// Counts a Service's local ready endpoints for its healthCheckNodePort
/// (`backends`: the externalTrafficPolicy: Local split of one of its ports).
fn count_health_check(
    v: &Valid,
    backends: &(Vec<BackendSpec>, Vec<BackendSpec>, bool),
    health_checks: &mut BTreeMap<u16, HealthCheck>,
) {
    let Some(port) = v.spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()) else {
        return;
    };
    let entry = health_checks.entry(port).or_insert_with(|| HealthCheck {
        service: v.id.clone(),
        local_endpoints: 0,
    });
    // Local ready endpoints of the Service (over its ports: the most).
    // Terminating ones taking new connections as the last resort do not
    // count: the node answers 503 and load balancers drain it, as
    // kube-proxy does (KEP-1669).
    let (usable, _, fallback) = backends;
    let ready = if *fallback { 0 } else { usable.len() };
    entry.local_endpoints = entry.local_endpoints.max(ready);
}
