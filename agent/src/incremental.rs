//! The translation kept per Service, so that a change re-translates only the
//! Services it touches ([`Translated::update`]) instead of the whole snapshot
//! ([`Translated::full`], the reference, also run by every periodic resync).
//!
//! An update translates a snapshot of the touched Services alone (with their
//! slices, the node facts and the Pods) with the same pure [`translate`]. The
//! cross-Service passes (ClusterIP and NodePort allocation, frontend
//! conflicts) depend on the Service objects only, so when no Service object
//! changed they give every Service what they gave it last time: the update is
//! exact as long as each touched Service gets back exactly the frontend keys
//! and the errors on its Service object it had (a Service that lost a
//! conflict or needed an allocation gets other keys or errors alone, and is
//! left to a full translation). Changed Service objects
//! are left to a full translation too.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use crate::{
    error::InputError,
    ids::ServiceId,
    model::{ns_name, NodeInfo, Snapshot, Sourced},
    sources::Delta,
    translate::{slice_service, translate, Config, Frontend, HealthCheck, Translation},
};
use ferry_podstate::PodRecord;
use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};

/// Takes `o` out of `v` (one equal object: the source may have parsed it
/// again since, so not necessarily the same one).
fn forget<T: PartialEq>(v: &mut Vec<Sourced<T>>, o: &Sourced<T>) {
    if let Some(i) = v
        .iter()
        .position(|x| x.object == o.object && (&x.source, x.seq) == (&o.source, o.seq))
    {
        v.remove(i);
    }
}

/// The objects of the last full translation, by Service, kept in step by
/// each update (shared with the source, not copied).
#[derive(Debug, Default)]
struct Objects {
    services: HashMap<ServiceId, Vec<Sourced<Service>>>,
    slices: HashMap<ServiceId, Vec<Sourced<EndpointSlice>>>,
    endpoints: HashMap<ServiceId, Vec<Sourced<Endpoints>>>,
    nodes: Vec<Sourced<Node>>,
    node: Option<NodeInfo>,
}

/// The last translation, by Service.
#[derive(Debug, Default)]
pub struct Translated {
    objects: Objects,
    /// Each Service's frontends, sorted as the translation gives them.
    by_service: HashMap<ServiceId, Vec<Frontend>>,
    /// Each Service's frontends of a family the dataplane does not serve
    /// (`Translation::not_served`), sorted likewise.
    not_served: HashMap<ServiceId, Vec<Frontend>>,
    /// Errors by the Service they concern (None: no Service).
    errors: HashMap<Option<ServiceId>, Vec<InputError>>,
    /// Which Service each EndpointSlice (namespace/name) belonged to when
    /// last translated, to file its errors.
    slice_owner: HashMap<String, ServiceId>,
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub allocated: BTreeMap<ServiceId, Vec<IpAddr>>,
    frontends: usize,
    backends: usize,
}

/// What an update changed: each touched Service's frontends before and after
/// (all sorted as the translation gives them).
#[derive(Debug, Default)]
pub struct Changed {
    pub old: Vec<Frontend>,
    pub new: Vec<Frontend>,
}

impl Translated {
    /// Translates everything (the reference).
    pub fn full(&mut self, snapshot: &Snapshot, cfg: &Config) -> &Self {
        let t = translate(snapshot, cfg);
        *self = Self::default();
        for s in &snapshot.services {
            let id = ServiceId::of(&s.object.metadata);
            self.objects.services.entry(id).or_default().push(s.clone());
        }
        for s in &snapshot.endpoint_slices {
            if let Some(svc) = slice_service(&s.object) {
                self.slice_owner.insert(ns_name(&s.object.metadata), svc.clone());
                self.objects.slices.entry(svc).or_default().push(s.clone());
            }
        }
        for e in &snapshot.endpoints {
            let id = ServiceId::of(&e.object.metadata);
            self.objects.endpoints.entry(id).or_default().push(e.clone());
        }
        self.objects.nodes = snapshot.nodes.clone();
        self.objects.node = snapshot.node.clone();
        self.absorb(t);
        self
    }

    /// Re-translates the Services `delta` touches (`pods`: the shim's
    /// current Pods, unchanged since the last full translation); None when
    /// that is not exact (then translate everything instead).
    pub fn update(&mut self, pods: &[PodRecord], delta: &Delta, cfg: &Config) -> Option<Changed> {
        if !delta.is_endpoints_only() {
            return None;
        }
        let touched = &delta.endpoints;
        let o = &mut self.objects;
        for s in &delta.slices.removed {
            if let Some(v) = slice_service(&s.object).and_then(|svc| o.slices.get_mut(&svc)) {
                forget(v, s);
            }
        }
        for s in &delta.slices.added {
            if let Some(svc) = slice_service(&s.object) {
                o.slices.entry(svc).or_default().push(s.clone());
            }
        }
        for e in &delta.endpoints_objects.removed {
            if let Some(v) = o.endpoints.get_mut(&ServiceId::of(&e.object.metadata)) {
                forget(v, e);
            }
        }
        for e in &delta.endpoints_objects.added {
            let id = ServiceId::of(&e.object.metadata);
            o.endpoints.entry(id).or_default().push(e.clone());
        }
        // In the source's order (the translation of duplicates depends on
        // it): by file and place in it, then (objects of the API, which are
        // all at one place) by name, as the sources give them.
        fn order<T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
            v: &mut [Sourced<T>],
        ) {
            v.sort_by_cached_key(|o| (o.source.clone(), o.seq, ns_name(o.object.metadata())));
        }
        for s in touched {
            if let Some(v) = o.slices.get_mut(s) {
                order(v);
            }
            if let Some(v) = o.endpoints.get_mut(s) {
                order(v);
            }
        }
        fn of<T>(m: &HashMap<ServiceId, Vec<Sourced<T>>>, touched: &BTreeSet<ServiceId>) -> Vec<Sourced<T>> {
            touched.iter().flat_map(|s| m.get(s)).flatten().cloned().collect()
        }
        let sub = Snapshot {
            services: of(&o.services, touched),
            endpoint_slices: of(&o.slices, touched),
            endpoints: of(&o.endpoints, touched),
            pods: pods.to_vec(),
            node: o.node.clone(),
            nodes: o.nodes.clone(),
            ..Snapshot::default()
        };
        let t = translate(&sub, cfg);
        let mut new: HashMap<ServiceId, Vec<Frontend>> = HashMap::new();
        for f in t.frontends.iter().chain(&t.not_served) {
            new.entry(f.id.service.clone()).or_default().push(f.clone());
        }
        let keys = |fs: Option<&Vec<Frontend>>| -> Vec<_> {
            let mut k: Vec<_> = fs
                .into_iter()
                .flatten()
                .map(|f| (f.key(), f.flags & ferry_common::svc_flags::INTERNAL))
                .collect();
            k.sort();
            k
        };
        // The Service objects did not change, so their errors (validation,
        // allocation, conflicts) did not either: the Service alone must give
        // the same ones (else it had a conflict with another Service, or
        // an allocation only all Services give).
        let service_errors = |s: &ServiceId, errors: &mut dyn Iterator<Item = &InputError>| -> BTreeSet<String> {
            let object = format!("Service {s}");
            errors.filter(|e| e.object == object).map(ToString::to_string).collect()
        };
        let had = |s: &ServiceId| -> Vec<Frontend> {
            let served = self.by_service.get(s).into_iter().flatten();
            served
                .chain(self.not_served.get(s).into_iter().flatten())
                .cloned()
                .collect()
        };
        let same = |s: &ServiceId| {
            keys(Some(&had(s))) == keys(new.get(s))
                && service_errors(s, &mut self.errors.get(&Some(s.clone())).into_iter().flatten())
                    == service_errors(s, &mut t.errors.iter())
        };
        if !touched.iter().all(same) {
            return None;
        }
        let mut changed = Changed::default();
        for s in touched {
            let old = self.by_service.remove(s).unwrap_or_default();
            self.not_served.remove(s);
            self.count(&old, false);
            changed.old.extend(old);
            self.errors.remove(&Some(s.clone()));
            self.health_checks.retain(|_, h| h.service != *s);
            self.allocated.remove(s);
        }
        for s in &sub.endpoint_slices {
            if let Some(svc) = slice_service(&s.object) {
                self.slice_owner.insert(ns_name(&s.object.metadata), svc);
            }
        }
        changed.new = t.frontends.clone();
        self.absorb(t);
        Some(changed)
    }

    /// Files a translation's results by Service.
    fn absorb(&mut self, t: Translation) {
        self.count(&t.frontends, true);
        for f in t.frontends {
            self.by_service.entry(f.id.service.clone()).or_default().push(f);
        }
        for f in t.not_served {
            self.not_served.entry(f.id.service.clone()).or_default().push(f);
        }
        for e in t.errors {
            let owner = self.owner(&e.object);
            self.errors.entry(owner).or_default().push(e);
        }
        self.health_checks.extend(t.health_checks);
        self.allocated.extend(t.allocated);
    }

    fn count(&mut self, fs: &[Frontend], add: bool) {
        let backends: usize = fs.iter().map(|f| f.backends.len()).sum();
        if add {
            self.frontends += fs.len();
            self.backends += backends;
        } else {
            self.frontends -= fs.len();
            self.backends -= backends;
        }
    }

    /// The Service an error's object (`Service ns/name`, `EndpointSlice
    /// ns/name`, `Endpoints ns/name`) concerns.
    fn owner(&self, object: &str) -> Option<ServiceId> {
        let id = |s: &str| s.split_once('/').map(|(ns, n)| ServiceId::new(ns, n));
        if let Some(s) = object
            .strip_prefix("Service ")
            .or_else(|| object.strip_prefix("Endpoints "))
        {
            return id(s);
        }
        self.slice_owner.get(object.strip_prefix("EndpointSlice ")?).cloned()
    }

    /// The translation's errors.
    pub fn errors(&self) -> impl Iterator<Item = &InputError> {
        self.errors.values().flatten()
    }

    /// Frontends, backend slots (summed over frontends) and Services with
    /// frontends.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.frontends, self.backends, self.by_service.len())
    }

    /// Every frontend's address (once per frontend, in no particular order).
    pub fn frontend_addrs(&self) -> Vec<std::net::IpAddr> {
        self.by_service.values().flatten().map(|f| f.key().0).collect()
    }

    /// Every frontend, sorted as [`translate`] gives them (for tests).
    pub fn frontends(&self) -> Vec<Frontend> {
        let mut all: Vec<Frontend> = self.by_service.values().flatten().cloned().collect();
        all.sort_by_key(Frontend::key);
        all
    }

    /// The frontends of a family the dataplane does not serve (in no
    /// particular order).
    pub fn not_served_iter(&self) -> impl Iterator<Item = &Frontend> {
        self.not_served.values().flatten()
    }

    /// The frontends of a family the dataplane does not serve, sorted as
    /// [`translate`] gives them (for tests).
    pub fn not_served(&self) -> Vec<Frontend> {
        let mut all: Vec<Frontend> = self.not_served_iter().cloned().collect();
        all.sort_by_key(Frontend::key);
        all
    }

    /// Whether `other` gives the same maps, notices and reports as this:
    /// frontends (served or not), errors, health checks, allocations. The
    /// periodic resync compares the translation it made off the loop with
    /// this one so.
    pub fn same_result(&self, other: &Translated) -> bool {
        let set =
            |e: &mut dyn Iterator<Item = &InputError>| -> BTreeSet<String> { e.map(ToString::to_string).collect() };
        self.by_service == other.by_service
            && self.not_served == other.not_served
            && self.health_checks == other.health_checks
            && self.allocated == other.allocated
            && set(&mut self.errors()) == set(&mut other.errors())
    }

    /// Whether this holds what a full translation of the same snapshot
    /// gives (for tests): frontends, errors, health checks, allocations.
    pub fn same_as(&self, t: &Translation) -> bool {
        let set =
            |e: &mut dyn Iterator<Item = &InputError>| -> BTreeSet<String> { e.map(ToString::to_string).collect() };
        self.frontends() == t.frontends
            && self.not_served() == t.not_served
            && set(&mut self.errors()) == set(&mut t.errors.iter())
            && self.health_checks == t.health_checks
            && self.allocated == t.allocated
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::maps::{
        layout::{layout, Layout},
        sync::{tests::Fake, Syncer},
    };

    /// A seeded xorshift: the same sequence on every run.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        pub(crate) fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
        pub(crate) fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
            &from[self.below(from.len())]
        }
    }

    pub(crate) const SERVICES: usize = 5;
    const PORTS: [(&str, i32, &str); 3] = [("a", 80, "TCP"), ("b", 80, "UDP"), ("c", 443, "TCP")];

    /// A random Service `s<i>`: any type, ClusterIPs, NodePorts and
    /// LoadBalancer IPs from small pools (so they conflict, and some are
    /// allocated), affinity, Maglev, externalTrafficPolicy: Local, source
    /// ranges; some dual-stack (either family first), with externalIPs and
    /// ingress IPs of both families.
    pub(crate) fn service(r: &mut Rng, i: usize) -> Service {
        let type_ = *r.pick(&["ClusterIP", "NodePort", "LoadBalancer"]);
        let mut ports = Vec::new();
        for (name, port, proto) in PORTS {
            if r.chance(50) || (ports.is_empty() && name == "c") {
                let mut p = json!({"name": name, "port": port, "protocol": proto, "targetPort": 8080});
                if type_ != "ClusterIP" {
                    if let Some(np) = r.pick(&[Some(30001), Some(30002), None]) {
                        p["nodePort"] = json!(np);
                    }
                }
                ports.push(p);
            }
        }
        let mut spec = json!({
            "type": type_,
            "clusterIP": r.pick(&["10.96.0.1", "10.96.0.2", "10.96.0.3", ""]),
            "ports": ports,
        });
        if r.chance(30) {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        if r.chance(30) {
            let v4 = spec["clusterIP"].as_str().unwrap_or_default().to_string();
            let v6 = *r.pick(&["fd00::1", "fd00::2", ""]);
            let mut families = vec!["IPv4", "IPv6"];
            let mut ips = vec![v4, v6.to_string()];
            if r.chance(50) {
                families.reverse();
                ips.reverse();
            }
            spec["ipFamilies"] = json!(families);
            spec["ipFamilyPolicy"] = json!(r.pick(&["PreferDualStack", "RequireDualStack"]));
            if ips.iter().all(|ip| !ip.is_empty()) {
                spec["clusterIP"] = json!(ips[0]);
                spec["clusterIPs"] = json!(ips);
            } else {
                spec["clusterIP"] = json!("");
            }
        }
        if r.chance(30) {
            spec["externalIPs"] = json!([r.pick(&["198.51.100.1", "198.51.100.2", "2001:db8::1"])]);
        }
        if type_ != "ClusterIP" && r.chance(40) {
            spec["externalTrafficPolicy"] = json!("Local");
            spec["healthCheckNodePort"] = json!(32000 + i);
        }
        if type_ == "LoadBalancer" && r.chance(40) {
            spec["loadBalancerSourceRanges"] = json!(["10.0.0.0/8", "192.168.0.0/16"]);
        }
        let mut meta = json!({
            "name": format!("s{i}"),
            "namespace": "default",
            "creationTimestamp": format!("2026-01-01T00:00:0{i}Z"),
        });
        if r.chance(30) {
            meta["annotations"] = json!({crate::translate::LB_ALGORITHM_ANNOTATION: "maglev"});
        }
        let status = json!({"loadBalancer": {"ingress": [{"ip": r.pick(&["192.0.2.1", "192.0.2.2", "2001:db8::2"])}]}});
        serde_json::from_value(json!({"metadata": meta, "spec": spec, "status": status})).unwrap()
    }

    /// A random EndpointSlice `<name>` of Service `s<i>` (rarely of none),
    /// of either family.
    pub(crate) fn slice(r: &mut Rng, name: &str, i: usize) -> EndpointSlice {
        let v6 = r.chance(30);
        let endpoints: Vec<_> = (0..r.below(4))
            .map(|_| {
                let n = 1 + r.below(6);
                json!({
                    "addresses": [if v6 { format!("fd00::1:{n}") } else { format!("10.1.0.{n}") }],
                    "conditions": {"ready": r.chance(70), "serving": r.chance(80), "terminating": r.chance(20)},
                    "nodeName": r.pick(&["node1", "node2"]),
                })
            })
            .collect();
        let ports: Vec<_> = PORTS
            .iter()
            .map(|(n, _, p)| json!({"name": n, "port": 8080, "protocol": p}))
            .collect();
        let mut meta = json!({"name": name, "namespace": "default"});
        if !r.chance(3) {
            meta["labels"] = json!({crate::translate::SERVICE_NAME_LABEL: format!("s{i}")});
        }
        let family = if v6 { "IPv6" } else { "IPv4" };
        serde_json::from_value(json!({"metadata": meta, "addressType": family, "endpoints": endpoints, "ports": ports}))
            .unwrap()
    }

    /// One random add, update or delete of a Service or (mostly) a slice,
    /// as an edit of one file would: a changed object keeps its place.
    fn step(r: &mut Rng, s: &mut Snapshot, seq: &mut usize) {
        let i = r.below(SERVICES);
        if r.chance(15) {
            let name = format!("s{i}");
            s.services
                .retain(|x| x.object.metadata.name.as_deref() != Some(name.as_str()));
            if r.chance(80) {
                s.services.push(Sourced::new("svc.yaml", service(r, i)));
            }
        } else {
            let name = format!("e{}", r.below(SERVICES * 2));
            let at = s
                .endpoint_slices
                .iter()
                .position(|x| x.object.metadata.name.as_deref() == Some(name.as_str()));
            *seq += 1;
            let place = at.map_or(*seq, |k| s.endpoint_slices[k].seq);
            let new = (!r.chance(15)).then(|| Sourced::at("eps.yaml", place, slice(r, &name, i)));
            match (at, new) {
                (Some(k), Some(n)) => s.endpoint_slices[k] = n,
                (Some(k), None) => {
                    s.endpoint_slices.remove(k);
                }
                (None, Some(n)) => s.endpoint_slices.push(n),
                (None, None) => {}
            }
        }
    }

    /// Random sequences of changes: after each, the translation kept by
    /// Service equals a full translation of the snapshot, the incremental
    /// layout equals a full layout (with the same ids before the step), the
    /// maps equal it (written in a safe order), and a full resync writes
    /// nothing.
    #[test]
    fn incremental_updates_give_what_a_full_translation_and_layout_give() {
        let cfg = Config {
            node: "node1".into(),
            nodeport_addrs: vec!["192.168.1.1".parse().unwrap(), "2001:db8:1::1".parse().unwrap()],
            service_cidrs: "10.96.0.0/12,fd00::/108".parse().unwrap(),
            ..Config::default()
        };
        let (mut incremental, mut steps, mut not_served) = (0, 0, 0);
        for seed in 1..=40u64 {
            let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (mut snapshot, mut seq) = (Snapshot::default(), 0);
            let mut translated = Translated::default();
            let mut l = Layout::new(crate::maps::layout::Ids::default().with_maglev(251, 8));
            let fake = Fake::default();
            let mut syncer = Syncer::new(fake.clone()).unwrap();
            for n in 0..60 {
                let before = snapshot.clone();
                step(&mut r, &mut snapshot, &mut seq);
                let mut delta = Delta::default();
                delta.add(&before, &snapshot);
                let ids_before = l.ids.clone();
                let changed = (n > 0)
                    .then(|| translated.update(&snapshot.pods, &delta, &cfg))
                    .flatten();
                let st = match &changed {
                    Some(c) => {
                        incremental += 1;
                        let scope = l.update(&c.old, &c.new);
                        syncer.sync_scoped(l.desired(), &scope)
                    }
                    None => {
                        translated.full(&snapshot, &cfg);
                        l.full(&translated.frontends());
                        syncer.sync(l.desired())
                    }
                };
                steps += 1;
                let at = format!("seed {seed} step {n} (incremental: {})", changed.is_some());
                assert!(st.failed.is_empty(), "{at}: {:?}", st.failed);
                let full = translate(&snapshot, &cfg);
                not_served += full.not_served.len();
                if !translated.same_as(&full) {
                    let errs = |e: &mut dyn Iterator<Item = &InputError>| -> BTreeSet<String> {
                        e.map(ToString::to_string).collect()
                    };
                    assert_eq!(translated.frontends(), full.frontends, "{at}: frontends");
                    assert_eq!(translated.not_served(), full.not_served, "{at}: not served");
                    assert_eq!(
                        errs(&mut translated.errors()),
                        errs(&mut full.errors.iter()),
                        "{at}: errors"
                    );
                    assert_eq!(translated.health_checks, full.health_checks, "{at}: health checks");
                    assert_eq!(translated.allocated, full.allocated, "{at}: allocated");
                }
                // What the periodic resync compares: a fresh full
                // translation gives the same result as the kept one.
                let mut fresh = Translated::default();
                fresh.full(&snapshot, &cfg);
                assert!(translated.same_result(&fresh), "{at}: same_result");
                let want = layout(&full.frontends, &mut ids_before.clone());
                assert_eq!(l.desired(), &want, "{at}: layout");
                assert_eq!(syncer.current(), &want, "{at}: maps");
                let maps = fake.maps.borrow().clone();
                assert_eq!(
                    (
                        &maps.services,
                        &maps.backends,
                        &maps.revnat,
                        &maps.names,
                        &maps.source_ranges
                    ),
                    (
                        &want.services,
                        &want.backends,
                        &want.revnat,
                        &want.names,
                        &want.source_ranges
                    ),
                    "{at}: the store"
                );
                assert!(
                    fake.violations.borrow().is_empty(),
                    "{at}: {:?}",
                    fake.violations.borrow()
                );
                let resync = syncer.sync(l.desired());
                assert_eq!(resync.upserts + resync.deletes, 0, "{at}: the full resync wrote");
            }
        }
        // The sequences exercise the incremental path, not only the full one.
        eprintln!("{incremental} of {steps} steps incremental; {not_served} IPv6 frontends seen");
        assert!(incremental * 2 > steps, "{incremental} of {steps} steps incremental");
        assert!(
            not_served > steps,
            "dual-stack Services are generated: {not_served} IPv6 frontends"
        );
    }
}
