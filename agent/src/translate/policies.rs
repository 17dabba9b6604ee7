//! A Service's policy fields: session affinity, the traffic policies, the
//! load-balancing algorithm, traffic distribution and the LoadBalancer's
//! source ranges. Each is read, checked and named in the error when it is wrong.
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use std::net::IpAddr;

use super::{
    service::ErrorAt, Config, Family, LbAlgorithm, DEFAULT_AFFINITY_TIMEOUT, LB_ALGORITHM_ANNOTATION,
    MAX_AFFINITY_TIMEOUT, SOURCE_RANGES_ANNOTATION,
};
use crate::error::InputError;

/// sessionAffinity: the ClientIP timeout in seconds, 0 for none; None (with
/// an error) when the fields are invalid and the Service is not served.
pub(super) fn affinity_timeout(spec: &ServiceSpec, err: &ErrorAt, errors: &mut Vec<InputError>) -> Option<u32> {
    match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => Some(0),
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT),
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => Some(t as u32),
                Some(t) => {
                    errors.push(err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} out of range 1-{MAX_AFFINITY_TIMEOUT}"),
                    ));
                    None
                }
            }
        }
        Some(other) => {
            errors.push(err(
                "spec.sessionAffinity",
                format!("unknown value {other:?} (None, ClientIP)"),
            ));
            None
        }
    }
}

/// internalTrafficPolicy or externalTrafficPolicy (`field`): whether it is
/// Local; None (with an error) for an unknown value.
pub(super) fn traffic_policy_local(
    field: &str,
    value: Option<&str>,
    err: &ErrorAt,
    errors: &mut Vec<InputError>,
) -> Option<bool> {
    match value {
        None | Some("") | Some("Cluster") => Some(false),
        Some("Local") => Some(true),
        Some(other) => {
            errors.push(err(field, format!("unknown value {other:?} (Cluster, Local)")));
            None
        }
    }
}

/// Whether new flows pick their backend by Maglev: the Service's
/// [`LB_ALGORITHM_ANNOTATION`], else `--lb-algorithm` (also when the
/// annotation's value is unknown, with an error).
pub(super) fn maglev(svc: &Service, cfg: &Config, err: &ErrorAt, errors: &mut Vec<InputError>) -> bool {
    let annotation = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION));
    match annotation.map(|a| a.trim()) {
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
    }
}

/// spec.trafficDistribution: which hints the EndpointSlice controller writes
/// (kube-proxy reads only the hints; standalone mode plays the controller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TrafficDistribution {
    /// Unset (or a value this version does not know: the API server keeps
    /// unknown values, and the controller writes no hints for them).
    Any,
    /// PreferClose (PreferSameZone, its 1.34 name): zone hints.
    PreferSameZone,
    /// PreferSameNode (1.34): node hints, and zone hints as the fallback.
    PreferSameNode,
}

pub(super) fn traffic_distribution(spec: &ServiceSpec) -> TrafficDistribution {
    match spec.traffic_distribution.as_deref() {
        Some("PreferClose") | Some("PreferSameZone") => TrafficDistribution::PreferSameZone,
        Some("PreferSameNode") => TrafficDistribution::PreferSameNode,
        _ => TrafficDistribution::Any,
    }
}

/// What a LoadBalancer Service's source ranges allow on its LoadBalancer IPs.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SourceRanges {
    /// None given (or one of them is 0.0.0.0/0).
    Anyone,
    /// Clients in these prefixes (sorted, deduplicated, host bits cleared).
    Only(Vec<IpNet>),
    /// Entries were given in the field named, and none is valid.
    NoneValid(String),
}

/// spec.loadBalancerSourceRanges, or when it is empty the annotation
/// [`SOURCE_RANGES_ANNOTATION`] (comma separated), like kube-proxy. An entry
/// that is not a CIDR or address (a bare address is a /32 or /128) of either
/// family gets an error and is skipped; the others apply (each to the
/// LoadBalancer IPs of its family).
pub(super) fn source_ranges(svc: &Service, err: &ErrorAt, errors: &mut Vec<InputError>) -> SourceRanges {
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

/// One source range: `a.b.c.d/len`, or `a.b.c.d` for a /32 (IPv6: a /128);
/// host bits cleared.
fn parse_source_range(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        s.parse::<IpNet>().ok()
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    };
    let family = net.map_or(if s.contains(':') { Family::V6 } else { Family::V4 }, Family::of_net);
    net.map(|n| n.trunc())
        .ok_or_else(|| format!("is not an {family} CIDR (like {}) or address", example_cidr(family)))
}

fn example_cidr(family: Family) -> &'static str {
    match family {
        Family::V4 => "203.0.113.0/24",
        Family::V6 => "2001:db8::/64",
    }
}
