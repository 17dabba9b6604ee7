//! What a Service may leave to the API server, allocated here as it would:
//! ClusterIPs (Services without spec.clusterIP, standalone mode) and NodePorts
//! (ports without nodePort), deterministically, so every node and every
//! restart agrees.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{
    family::{host_count, nth_host, Family},
    proto_name,
    service::{ClusterIp, Valid},
    Config,
};
use crate::{error::InputError, ids::ServiceId};

/// ClusterIPs, per Service in its families' order: explicit ones as given
/// (outside the range is fine, as with a real apiserver's second range); the
/// others by a stable hash of namespace/name into the range of their family
/// (`--service-cluster-ip-range`), probing onward on collision, in name order.
/// Same input, same IPs: on every node and across restarts. None where no
/// address could be had (no range of the family, or none free), with an error.
pub(super) fn cluster_ips(valid: &[Valid], cfg: &Config, errors: &mut Vec<InputError>) -> Vec<Vec<Option<IpAddr>>> {
    let mut out: Vec<Vec<Option<IpAddr>>> = valid
        .iter()
        .map(|v| {
            v.ips
                .iter()
                .map(|ip| match ip {
                    ClusterIp::Explicit(ip) => Some(*ip),
                    ClusterIp::Allocate(_) => None,
                })
                .collect()
        })
        .collect();
    let mut used: BTreeSet<IpAddr> = out.iter().flatten().flatten().copied().collect();
    // (Service, its k-th family) to allocate, in name order.
    let mut order: Vec<(usize, usize, Family)> = valid
        .iter()
        .enumerate()
        .flat_map(|(i, v)| {
            v.ips.iter().enumerate().filter_map(move |(k, ip)| match ip {
                ClusterIp::Allocate(f) => Some((i, k, *f)),
                ClusterIp::Explicit(_) => None,
            })
        })
        .collect();
    order.sort_by(|a, b| valid[a.0].id.cmp(&valid[b.0].id));
    for (i, k, family) in order {
        let field = if k == 0 {
            "spec.clusterIP".to_string()
        } else {
            format!("spec.clusterIPs[{k}]")
        };
        let error =
            |why: String| InputError::new(&valid[i].svc.source, format!("Service {}", valid[i].id), &field, why);
        let Some(net) = cfg.service_cidrs.get(family) else {
            errors.push(error(format!(
                "no {family} range in --service-cluster-ip-range ({}) to allocate the Service's {family} ClusterIP (spec.ipFamilies) from",
                cfg.service_cidrs
            )));
            continue;
        };
        let size = host_count(net);
        let found =
            probe(&valid[i].id.to_string(), size, |k| !used.contains(&nth_host(net, k))).map(|k| nth_host(net, k));
        match found {
            Some(ip) => {
                used.insert(ip);
                out[i][k] = Some(ip);
            }
            None => errors.push(error(format!("no free address left in {net}"))),
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

/// NodePorts by (Service, port index): explicit ones first (a later Service
/// asking for a taken one gets an error), then the missing ones allocated as
/// kube-apiserver would, deterministically here (a stable hash of the Service
/// port into the range, probing onward), so every node agrees.
pub(super) fn node_ports(
    valid: &[Valid],
    cfg: &Config,
    errors: &mut Vec<InputError>,
) -> BTreeMap<(ServiceId, usize), u16> {
    let mut out = BTreeMap::new();
    let mut taken: BTreeMap<(u16, u8), ServiceId> = BTreeMap::new();
    let mut missing = Vec::new();
    for v in valid.iter().filter(|v| v.type_.has_node_ports()) {
        for &(i, sp, _, proto) in &v.ports {
            let Some(np) = sp.node_port else {
                missing.push((v, i, proto));
                continue;
            };
            let np = np as u16; // validated: within the range
            if let Some(owner) = taken.get(&(np, proto)) {
                errors.push(InputError::new(
                    &v.svc.source,
                    format!("Service {}", v.id),
                    format!("spec.ports[{i}].nodePort"),
                    format!("{np}/{} is already used by Service {owner}", proto_name(proto)),
                ));
                continue;
            }
            taken.insert((np, proto), v.id.clone());
            out.insert((v.id.clone(), i), np);
        }
    }
    let (lo, hi) = cfg.node_port_range;
    let size = u32::from(hi.saturating_sub(lo)) + 1;
    for (v, i, proto) in missing {
        let found = probe(&format!("{}:{i}", v.id), size, |k| {
            !taken.contains_key(&(lo + k as u16, proto))
        })
        .map(|k| lo + k as u16);
        match found {
            Some(np) => {
                taken.insert((np, proto), v.id.clone());
                out.insert((v.id.clone(), i), np);
            }
            None => errors.push(InputError::new(
                &v.svc.source,
                format!("Service {}", v.id),
                format!("spec.ports[{i}].nodePort"),
                format!("no free NodePort in {lo}-{hi}"),
            )),
        }
    }
    out
}
