//! EndpointSlices and Endpoints: checked (each belongs to a Service we know,
//! each address is valid), and indexed by Service so that finding a Service
//! port's endpoints, among them or among the shim's Pods, does not scan them all.
use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::{
    core::v1::{Endpoints, ServicePort},
    discovery::v1::EndpointSlice,
};

use super::{parse_ip, policies::TrafficDistribution, service::Valid, Config, SERVICE_NAME_LABEL};
use crate::{
    endpoints::{self, Endpoint},
    error::InputError,
    ids::ServiceId,
    model::{ns_name, Snapshot, Sourced},
};

/// Checks every EndpointSlice and Endpoints object; `services` names every
/// Service.
pub(super) fn check(snapshot: &Snapshot, services: &BTreeSet<ServiceId>, errors: &mut Vec<InputError>) {
    check_orphans(snapshot, services, errors);
    check_endpoint_addresses(snapshot, errors);
}

/// EndpointSlices and Endpoints by their Service,
/// built once per translation so that finding a Service's endpoints does not
/// scan every object (10,000 Services must not cost 10,000²).
pub(super) struct EndpointIndex<'a> {
    slices: HashMap<ServiceId, Vec<&'a Sourced<EndpointSlice>>>,
    endpoints: HashMap<ServiceId, Vec<&'a Sourced<Endpoints>>>,
}

impl<'a> EndpointIndex<'a> {
    pub fn new(snapshot: &'a Snapshot) -> Self {
        let mut slices: HashMap<ServiceId, Vec<_>> = HashMap::new();
        for s in &snapshot.endpoint_slices {
            if let Some(svc) = slice_service(&s.object) {
                slices.entry(svc).or_default().push(s);
            }
        }
        let mut endpoints: HashMap<ServiceId, Vec<_>> = HashMap::new();
        for e in &snapshot.endpoints {
            endpoints.entry(ServiceId::of(&e.object.metadata)).or_default().push(e);
        }
        Self { slices, endpoints }
    }
}

pub(super) fn endpoints_of(
    snapshot: &Snapshot,
    index: &EndpointIndex,
    v: &Valid,
    sp: &ServicePort,
    cfg: &Config,
) -> Vec<Endpoint> {
    let meta = &v.svc.object.metadata;
    let ns = meta.namespace.as_deref().unwrap_or("default");
    if cfg.pod_endpoints {
        if let Some(selector) = v.spec.selector.as_ref().filter(|s| !s.is_empty()) {
            let publish_not_ready = v.spec.publish_not_ready_addresses.unwrap_or(false);
            let mut all = endpoints::from_pods(ns, selector, sp, &snapshot.pods, publish_not_ready);
            match v.traffic_distribution {
                TrafficDistribution::Any => {}
                TrafficDistribution::PreferSameZone => {
                    endpoints::hint_own_zones(&mut all, |node| snapshot.zone_of(node));
                }
                TrafficDistribution::PreferSameNode => {
                    endpoints::hint_own_zones(&mut all, |node| snapshot.zone_of(node));
                    endpoints::hint_own_nodes(&mut all);
                }
            }
            return all;
        }
    }
    let slices = index.slices.get(&v.id).map(Vec::as_slice).unwrap_or_default();
    let mut all = endpoints::from_slices(sp, slices);
    for e in index.endpoints.get(&v.id).into_iter().flatten() {
        all.extend(endpoints::from_endpoints(sp, &e.object));
    }
    all
}

/// The Service an EndpointSlice belongs to (its [`SERVICE_NAME_LABEL`]).
pub fn slice_service(slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Option<ServiceId> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
    Some(ServiceId::new(ns, name.as_str()))
}

/// Endpoint addresses that are no address (of the slice's addressType, for
/// EndpointSlices): each named with its object and field (the endpoint is
/// left out of every Service).
fn check_endpoint_addresses(snapshot: &Snapshot, errors: &mut Vec<InputError>) {
    for s in &snapshot.endpoint_slices {
        let Some(family) = endpoints::slice_family(&s.object) else {
            continue;
        };
        for (i, ep) in s.object.endpoints.iter().enumerate() {
            for (j, a) in ep.addresses.iter().enumerate() {
                if let Err(why) = endpoints::slice_address(a, family) {
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
                    if let Err(why) = parse_ip(&a.ip) {
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
fn check_orphans(snapshot: &Snapshot, known: &BTreeSet<ServiceId>, errors: &mut Vec<InputError>) {
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
                if !known.contains(&svc) {
                    errors.push(InputError::new(
                        &s.source,
                        object,
                        field,
                        format!("unknown Service {svc}"),
                    ));
                }
            }
        }
    }
    for e in &snapshot.endpoints {
        let key = ServiceId::of(&e.object.metadata);
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
