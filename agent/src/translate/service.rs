//! Validating a Service object: every field Ferry reads, checked and named in
//! the error when it is wrong. A Service that passes becomes a [`Valid`]; one
//! that cannot be served at all gets no frontends, and the others go on.
use std::{collections::BTreeSet, net::IpAddr};

use ferry_common::{PROTO_TCP, PROTO_UDP};
use ipnet::IpNet;
use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{parse_ip, policies, Config, Family};
use crate::{
    error::InputError,
    ids::{ServiceId, ServiceType},
    model::{Snapshot, Sourced},
};

/// A Service served by another proxy (kube-proxy's `--service-proxy-name`
/// semantics: any value but Ferry's own means not ours; Ferry has none).
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// A Service marked headless by label: no proxying.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// How a Service gets its ClusterIP of a family.
pub(super) enum ClusterIp {
    Explicit(IpAddr),
    /// None given: allocated in `--service-cluster-ip-range`'s range of
    /// the family.
    Allocate(Family),
}

impl ClusterIp {
    pub fn family(&self) -> Family {
        match self {
            Self::Explicit(ip) => Family::of(*ip),
            Self::Allocate(f) => *f,
        }
    }
}

/// A Service port that passed validation: its index in spec.ports, the port
/// itself, its number and protocol.
pub(super) type ValidPort<'a> = (usize, &'a ServicePort, u16, u8);

/// A Service that passed validation, with the ports that did.
pub(super) struct Valid<'a> {
    pub svc: &'a Sourced<Service>,
    pub spec: &'a ServiceSpec,
    pub id: ServiceId,
    /// spec.type (never ExternalName: those are not served).
    pub type_: ServiceType,
    /// Its ClusterIPs, one per family, in `spec.ipFamilies` order (the
    /// first is the primary one, spec.clusterIP).
    pub ips: Vec<ClusterIp>,
    pub ports: Vec<ValidPort<'a>>,
    /// sessionAffinity: ClientIP timeout in seconds (0: none).
    pub affinity_timeout: u32,
    /// internalTrafficPolicy: Local.
    pub itp_local: bool,
    /// spec.externalIPs (valid ones, of the Service's families).
    pub external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress[].ip and spec.loadBalancerIP (valid ones;
    /// none when source ranges were given but none is valid: fail closed).
    pub lb_ips: Vec<IpAddr>,
    /// The clients allowed on `lb_ips` (empty: anyone).
    pub source_ranges: Vec<IpNet>,
    /// externalTrafficPolicy: Local.
    pub etp_local: bool,
    /// New flows pick their backend by Maglev.
    pub maglev: bool,
    /// spec.trafficDistribution (standalone mode hints each endpoint for its
    /// node's zone, and for PreferSameNode its node, as the EndpointSlice
    /// controller does).
    pub traffic_distribution: policies::TrafficDistribution,
}

/// The Services of a snapshot after validation.
pub(super) struct Validated<'a> {
    /// The valid ones, in the order conflicts are settled: creation time, then
    /// name (kube-apiserver would have refused the later one).
    pub services: Vec<Valid<'a>>,
    /// Every Service, valid or not (slices of an invalid Service are not
    /// orphans).
    pub names: BTreeSet<ServiceId>,
}

/// Validates every Service of the snapshot.
pub(super) fn validate_all<'a>(snapshot: &'a Snapshot, cfg: &Config, errors: &mut Vec<InputError>) -> Validated<'a> {
    let mut services: Vec<Valid> = Vec::new();
    let mut names = BTreeSet::new();
    for svc in &snapshot.services {
        names.insert(ServiceId::of(&svc.object.metadata));
        if let Some(v) = validate(svc, cfg, errors) {
            services.push(v);
        }
    }
    let created = |v: &Valid| v.svc.object.metadata.creation_timestamp.as_ref().map(|t| t.0);
    services.sort_by(|a, b| (created(a), &a.id).cmp(&(created(b), &b.id)));
    Validated { services, names }
}

/// Names the Service in an error about `field`.
pub(super) type ErrorAt<'e> = dyn Fn(&str, String) -> InputError + 'e;

/// Checks a Service; returns None when it gets no dataplane entries at all.
fn validate<'a>(svc: &'a Sourced<Service>, cfg: &Config, errors: &mut Vec<InputError>) -> Option<Valid<'a>> {
    let id = ServiceId::of(&svc.object.metadata);
    let err = |field: &str, msg: String| InputError::new(&svc.source, format!("Service {id}"), field, msg);
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
    let type_ = match ServiceType::from_spec(spec.type_.as_deref()) {
        Ok(ServiceType::ExternalName) => return None, // DNS only: nothing to program.
        Ok(t) => t,
        Err(why) => {
            errors.push(err("spec.type", why));
            return None;
        }
    };
    let ips = cluster_ips(spec, cfg, &err, errors)?;
    let ports = ports(spec, type_.has_node_ports(), cfg, &err, errors);
    let affinity_timeout = policies::affinity_timeout(spec, &err, errors)?;
    let itp_local = policies::traffic_policy_local(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
        &err,
        errors,
    )?;
    let families: Vec<Family> = ips.iter().map(ClusterIp::family).collect();
    let external_ips = addresses(
        &families,
        "externalIPs",
        spec.external_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(k, v)| (format!("spec.externalIPs[{k}]"), v.clone()))
            .collect(),
        &err,
        errors,
    );
    let mut lb_ips = Vec::new();
    let mut source_ranges = Vec::new();
    if type_ == ServiceType::LoadBalancer {
        lb_ips = addresses(&families, "loadBalancer", load_balancer_ips(&svc.object), &err, errors);
        match policies::source_ranges(&svc.object, &err, errors) {
            policies::SourceRanges::Anyone => {}
            policies::SourceRanges::Only(r) => source_ranges = r,
            policies::SourceRanges::NoneValid(field) => {
                // The operator asked for a restriction we cannot honour:
                // serve no LoadBalancer IP rather than serve it to everyone.
                errors.push(err(
                    &field,
                    "no valid entry: the LoadBalancer IPs are not served (fail closed); ClusterIP, NodePorts and externalIPs are".into(),
                ));
                lb_ips.clear();
            }
        }
    }
    let etp_local = policies::traffic_policy_local(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
        &err,
        errors,
    )?;
    let maglev = policies::maglev(&svc.object, cfg, &err, errors);
    let traffic_distribution = policies::traffic_distribution(spec);
    Some(Valid {
        svc,
        spec,
        id,
        type_,
        ips,
        ports,
        affinity_timeout,
        itp_local,
        external_ips,
        lb_ips,
        source_ranges,
        etp_local,
        maglev,
        traffic_distribution,
    })
}

/// The Service's ports that are valid: number, protocol, targetPort and (for
/// NodePort and LoadBalancer Services) nodePort in range. An invalid port is
/// left out; the others are served.
fn ports<'a>(
    spec: &'a ServiceSpec,
    node_ports: bool,
    cfg: &Config,
    err: &ErrorAt,
    errors: &mut Vec<InputError>,
) -> Vec<ValidPort<'a>> {
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
        if let Some(IntOrString::Int(t)) = &sp.target_port {
            if !(1..=65535).contains(t) {
                errors.push(err(&field("targetPort"), format!("{t} out of range 1-65535")));
                continue;
            }
        }
        let (lo, hi) = cfg.node_port_range;
        if let Some(np) = sp
            .node_port
            .filter(|np| node_ports && !(i32::from(lo)..=i32::from(hi)).contains(np))
        {
            errors.push(err(
                &field("nodePort"),
                format!("{np} is outside the NodePort range {lo}-{hi} (--service-node-port-range)"),
            ));
            continue;
        }
        ports.push((i, sp, port, proto));
    }
    ports
}

/// status.loadBalancer.ingress[].ip and spec.loadBalancerIP, with the field
/// each came from.
fn load_balancer_ips(svc: &Service) -> Vec<(String, String)> {
    let mut lb: Vec<(String, String)> = Vec::new();
    if let Some(ip) = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_ref())
        .filter(|s| !s.is_empty())
    {
        lb.push(("spec.loadBalancerIP".into(), ip.clone()));
    }
    let ingress = svc
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
    lb
}

/// The valid addresses among `(field, value)`, sorted and deduplicated; an
/// invalid one, or one of a family the Service has no ClusterIP of (not in
/// `families`: kube-proxy serves a Service in the families of its ClusterIPs
/// only), gets an error naming its field (`what`: the list it is in).
fn addresses(
    families: &[Family],
    what: &str,
    values: Vec<(String, String)>,
    err: &ErrorAt,
    errors: &mut Vec<InputError>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (f, v) in values {
        match parse_ip(&v) {
            Ok(a) if families.contains(&Family::of(a)) => out.push(a),
            Ok(a) => errors.push(err(
                &f,
                format!(
                    "{v:?} is {} and the Service has no {0} ClusterIP (spec.ipFamilies); not served ({what})",
                    Family::of(a)
                ),
            )),
            Err(why) => errors.push(err(&f, format!("{v:?} is {why} ({what})"))),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// What `spec.ipFamilyPolicy` allows (named as the API spells it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
enum FamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// The Service's ClusterIPs, one per family in `spec.ipFamilies` order: the
/// given ones (`spec.clusterIPs`, or `spec.clusterIP` without it) and the
/// families to allocate one in. The API server has resolved these fields
/// into a consistent whole (clusterIPs in ipFamilies' order, at most one per
/// family, as many as ipFamilyPolicy asks for); an object that is not is
/// refused with an error naming the field (None; None too for a headless
/// Service, without error). Standalone manifests may leave them out: no
/// `spec.ipFamilies` means the families of the given ClusterIPs, or, with
/// none, the primary family of `--service-cluster-ip-range` (and its other
/// one for PreferDualStack and RequireDualStack).
fn cluster_ips(
    spec: &ServiceSpec,
    cfg: &Config,
    err: &ErrorAt,
    errors: &mut Vec<InputError>,
) -> Option<Vec<ClusterIp>> {
    let single = spec.cluster_ip.as_deref().filter(|s| !s.is_empty());
    let given: Vec<(String, &str)> = match spec.cluster_ips.as_ref().filter(|v| !v.is_empty()) {
        Some(list) => {
            if let Some(ip) = single.filter(|ip| *ip != list[0]) {
                errors.push(err(
                    "spec.clusterIP",
                    format!(
                        "{ip:?} is not spec.clusterIPs[0] ({:?}): it must be the first of spec.clusterIPs",
                        list[0]
                    ),
                ));
                return None;
            }
            list.iter()
                .enumerate()
                .map(|(k, s)| (format!("spec.clusterIPs[{k}]"), s.as_str()))
                .collect()
        }
        None => single.map(|s| ("spec.clusterIP".to_string(), s)).into_iter().collect(),
    };
    if given.first().is_some_and(|(_, s)| *s == "None") {
        return None; // headless: DNS only.
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for (field, s) in &given {
        let ip = match parse_ip(s) {
            Ok(ip) => ip,
            Err(why) => {
                errors.push(err(field, format!("{s:?}: {why}")));
                return None;
            }
        };
        if let Some(first) = ips.iter().find(|a| Family::of(**a) == Family::of(ip)) {
            errors.push(err(
                field,
                format!(
                    "{ip} is a second {} ClusterIP (after {first}): at most one per family",
                    Family::of(ip)
                ),
            ));
            return None;
        }
        ips.push(ip);
    }
    let ips_field = if spec.cluster_ips.as_ref().is_some_and(|v| !v.is_empty()) {
        "spec.clusterIPs"
    } else {
        "spec.clusterIP"
    };
    let policy = match spec.ip_family_policy.as_deref() {
        None | Some("") => None,
        Some("SingleStack") => Some(FamilyPolicy::SingleStack),
        Some("PreferDualStack") => Some(FamilyPolicy::PreferDualStack),
        Some("RequireDualStack") => Some(FamilyPolicy::RequireDualStack),
        Some(other) => {
            errors.push(err(
                "spec.ipFamilyPolicy",
                format!("unknown policy {other:?} (SingleStack, PreferDualStack, RequireDualStack)"),
            ));
            return None;
        }
    };
    let mut families: Vec<Family> = Vec::new();
    for (k, f) in spec.ip_families.iter().flatten().enumerate() {
        let field = format!("spec.ipFamilies[{k}]");
        let Some(family) = Family::of_address_type(f) else {
            errors.push(err(&field, format!("unknown family {f:?} (IPv4, IPv6)")));
            return None;
        };
        if families.contains(&family) {
            errors.push(err(&field, format!("{family} is listed twice")));
            return None;
        }
        families.push(family);
    }
    if families.is_empty() {
        families = ips.iter().map(|a| Family::of(*a)).collect();
    }
    if families.is_empty() {
        let cidrs = &cfg.service_cidrs;
        families.push(cidrs.primary);
        if matches!(
            policy,
            Some(FamilyPolicy::PreferDualStack | FamilyPolicy::RequireDualStack)
        ) {
            families.extend(cidrs.secondary());
        }
    }
    if ips.len() > families.len() {
        errors.push(err(
            ips_field,
            format!(
                "{} ClusterIPs for the {} famil{} of spec.ipFamilies",
                ips.len(),
                families.len(),
                if families.len() == 1 { "y" } else { "ies" }
            ),
        ));
        return None;
    }
    for (k, (ip, family)) in ips.iter().zip(&families).enumerate() {
        if Family::of(*ip) != *family {
            let field = if ips_field == "spec.clusterIP" {
                ips_field.to_string()
            } else {
                format!("spec.clusterIPs[{k}]")
            };
            errors.push(err(
                &field,
                format!(
                    "{ip} is {} but spec.ipFamilies[{k}] is {family}: the ClusterIPs must follow spec.ipFamilies' order",
                    Family::of(*ip)
                ),
            ));
            return None;
        }
    }
    match policy {
        Some(FamilyPolicy::SingleStack) if families.len() > 1 => {
            errors.push(err(
                "spec.ipFamilyPolicy",
                format!(
                    "SingleStack, but the Service has {} families ({})",
                    families.len(),
                    families.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ),
            ));
            return None;
        }
        Some(FamilyPolicy::RequireDualStack) if families.len() < 2 => {
            let listed = spec.ip_families.as_ref().is_some_and(|f| !f.is_empty());
            let (field, why) = if listed {
                (
                    "spec.ipFamilies",
                    format!(
                        "RequireDualStack needs both families; spec.ipFamilies has only {}",
                        families[0]
                    ),
                )
            } else if !ips.is_empty() {
                (
                    ips_field,
                    format!(
                        "RequireDualStack needs a ClusterIP of each family; {ips_field} has one, {}",
                        ips[0]
                    ),
                )
            } else {
                (
                    "spec.ipFamilyPolicy",
                    format!(
                        "RequireDualStack needs both families, and --service-cluster-ip-range ({}) has a range of one",
                        cfg.service_cidrs
                    ),
                )
            };
            errors.push(err(field, why));
            return None;
        }
        _ => {}
    }
    Some(
        families
            .iter()
            .enumerate()
            .map(|(k, f)| {
                ips.get(k)
                    .map_or(ClusterIp::Allocate(*f), |ip| ClusterIp::Explicit(*ip))
            })
            .collect(),
    )
}
