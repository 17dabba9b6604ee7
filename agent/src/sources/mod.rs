//! Where the objects come from. Standalone mode: a directory of manifests plus the
//! shim's Pod status files. Cluster mode: the Kubernetes API (kube-rs watchers).
//! Both produce an [`Input`] for the same translation and syncer.
pub mod cluster;
pub mod manifests;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{core::v1::Endpoints, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    Metadata,
};

use crate::{
    ids::ServiceId,
    model::{ns_name, Snapshot, Sourced},
};

/// What a source produces: the objects and the problems found reading them.
pub type Input = manifests::Manifests;

/// What changed between two loads of a source, by the Service it concerns,
/// for a translation of only what changed.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    /// Services whose Service object was added, changed or removed.
    pub services: BTreeSet<ServiceId>,
    /// Services whose EndpointSlices or Endpoints were added, changed or
    /// removed (the Service a slice names before and after).
    pub endpoints: BTreeSet<ServiceId>,
    /// Something else changed that translation reads (a Node, a slice
    /// naming no Service): only a full translation is exact.
    pub other: bool,
    /// The EndpointSlices that went (changed or removed) and came (changed
    /// or added), the same objects the source held and holds now.
    pub slices: Objects<EndpointSlice>,
    /// The same for Endpoints.
    pub endpoints_objects: Objects<Endpoints>,
}

/// Objects that went and came.
#[derive(Clone, Debug)]
pub struct Objects<T> {
    pub removed: Vec<Sourced<T>>,
    pub added: Vec<Sourced<T>>,
}

impl<T> Default for Objects<T> {
    fn default() -> Self {
        Self {
            removed: Vec::new(),
            added: Vec::new(),
        }
    }
}

impl Delta {
    /// Only EndpointSlices or Endpoints of known Services changed.
    pub fn is_endpoints_only(&self) -> bool {
        !self.other && self.services.is_empty()
    }

    /// Adds what differs between `old` and `new` (the objects of one file,
    /// before and after).
    pub fn add(&mut self, old: &Snapshot, new: &Snapshot) {
        let own = |m: &ObjectMeta| Some(ServiceId::of(m));
        self.other |= touched(
            &old.services,
            &new.services,
            |s| own(&s.metadata),
            &mut self.services,
            &mut Objects::default(),
        );
        self.other |= touched(
            &old.endpoint_slices,
            &new.endpoint_slices,
            crate::translate::slice_service,
            &mut self.endpoints,
            &mut self.slices,
        );
        self.other |= touched(
            &old.endpoints,
            &new.endpoints,
            |e| own(&e.metadata),
            &mut self.endpoints,
            &mut self.endpoints_objects,
        );
        // Nodes give zones; the Pods that count are the shim's records
        // (compared by the caller), not these.
        if old
            .nodes
            .iter()
            .map(|n| &n.object)
            .ne(new.nodes.iter().map(|n| &n.object))
        {
            self.other = true;
        }
    }
}

/// Adds to `out` the Services (`service`) of the objects that differ between
/// `old` and `new`, and those objects to `objects`; true when one of them
/// names no Service.
fn touched<T: PartialEq + Metadata<Ty = ObjectMeta>>(
    old: &[Sourced<T>],
    new: &[Sourced<T>],
    service: impl Fn(&T) -> Option<ServiceId>,
    out: &mut BTreeSet<ServiceId>,
    objects: &mut Objects<T>,
) -> bool {
    let mut orphan = false;
    for key in changed(old, new, |o| ns_name(o.object.metadata())) {
        let of = |v: &[Sourced<T>]| -> Vec<Sourced<T>> {
            v.iter()
                .filter(|o| ns_name(o.object.metadata()) == key)
                .cloned()
                .collect()
        };
        let (went, came) = (of(old), of(new));
        for o in went.iter().chain(&came) {
            match service(&o.object) {
                Some(s) => {
                    out.insert(s);
                }
                None => orphan = true,
            }
        }
        objects.removed.extend(went);
        objects.added.extend(came);
    }
    orphan
}

/// The keys of the objects that differ (added, removed or changed) between
/// `old` and `new`.
fn changed<T: PartialEq>(
    old: &[Sourced<T>],
    new: &[Sourced<T>],
    key: impl Fn(&Sourced<T>) -> String,
) -> BTreeSet<String> {
    let by_key = |v: &[Sourced<T>]| -> BTreeMap<String, Vec<usize>> {
        let mut m: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, o) in v.iter().enumerate() {
            m.entry(key(o)).or_default().push(i);
        }
        m
    };
    let (a, b) = (by_key(old), by_key(new));
    let same = |k: &String| match (a.get(k), b.get(k)) {
        (Some(x), Some(y)) => {
            x.len() == y.len()
                && x.iter().zip(y).all(|(i, j)| {
                    old[*i].object == new[*j].object && (&old[*i].source, old[*i].seq) == (&new[*j].source, new[*j].seq)
                })
        }
        _ => false,
    };
    a.keys().chain(b.keys()).filter(|k| !same(k)).cloned().collect()
}

/// A change notice: when the agent received the event (a file-system
/// notification, a watch event, a completed list). The sync it triggers is
/// timed from the earliest pending one (`ferry_network_programming_duration_seconds`).
#[derive(Clone, Copy, Debug)]
pub struct Changed {
    pub at: std::time::Instant,
    /// The change is complete as it is (a closed write, a file renamed into
    /// place or removed, an API event): the sync need not wait for more of
    /// it. Else (a file being written) it waits a moment for the writer.
    pub settled: bool,
}

impl Changed {
    /// A complete change, received now.
    pub fn now() -> Self {
        Self {
            at: std::time::Instant::now(),
            settled: true,
        }
    }
}

/// Where sources send their change notices.
pub type Changes = tokio::sync::mpsc::UnboundedSender<Changed>;
