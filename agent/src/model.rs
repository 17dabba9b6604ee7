//! The cluster as the agent sees it: the input of the pure translation.
use std::sync::Arc;

use ferry_podstate::PodRecord;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Endpoints, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};

/// An object with where it came from (for error messages). Shared: a clone
/// is a reference count, so a source can hand out its whole snapshot at every
/// sync without copying the objects.
#[derive(Debug)]
pub struct Sourced<T>(Arc<Item<T>>);

/// What a [`Sourced`] holds.
#[derive(Clone, Debug)]
pub struct Item<T> {
    pub source: String,
    /// Its place among the objects of its kind in `source` (document order).
    pub seq: usize,
    pub object: T,
}

impl<T> Sourced<T> {
    pub fn new(source: impl Into<String>, object: T) -> Self {
        Self::at(source, 0, object)
    }

    /// The `seq`-th object of its kind in `source`.
    pub fn at(source: impl Into<String>, seq: usize, object: T) -> Self {
        Self(Arc::new(Item {
            source: source.into(),
            seq,
            object,
        }))
    }
}

impl<T> Clone for Sourced<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> std::ops::Deref for Sourced<T> {
    type Target = Item<T>;
    fn deref(&self) -> &Item<T> {
        &self.0
    }
}

/// Copy on write: the other holders keep what they had.
impl<T: Clone> std::ops::DerefMut for Sourced<T> {
    fn deref_mut(&mut self) -> &mut Item<T> {
        Arc::make_mut(&mut self.0)
    }
}

/// Everything translation needs, from either source (manifests or the API).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Sourced<Service>>,
    pub endpoint_slices: Vec<Sourced<EndpointSlice>>,
    pub endpoints: Vec<Sourced<Endpoints>>,
    /// Pods as the kubelet (shim) reports them; used to derive endpoints of
    /// Services with a selector in standalone mode.
    pub pods: Vec<PodRecord>,
    /// Pods and Deployments declared in the manifests. The shim runs them and its
    /// records (`pods`) are what counts; these are parsed so a broken one is
    /// reported, and kept for inspection.
    pub pod_specs: Vec<Sourced<Pod>>,
    pub deployments: Vec<Sourced<Deployment>>,
    /// This node as the API describes it (cluster mode): its addresses and pod
    /// CIDRs. Standalone mode has no Node object.
    pub node: Option<NodeInfo>,
    /// Nodes declared in the manifests (standalone mode: the lab's nodes with
    /// their `topology.kubernetes.io/zone` labels).
    pub nodes: Vec<Sourced<Node>>,
}

/// The Node label naming its zone (topology-aware routing).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl Snapshot {
    /// The zone of node `name`: its Node's [`ZONE_LABEL`] (cluster mode: the
    /// agent's own Node; standalone: the Node manifests). None when unknown
    /// or empty.
    pub fn zone_of(&self, name: &str) -> Option<&str> {
        if let Some(n) = self.node.as_ref().filter(|n| n.name == name) {
            return n.zone.as_deref().filter(|z| !z.is_empty());
        }
        self.nodes
            .iter()
            .find(|n| n.object.metadata.name.as_deref() == Some(name))
            .and_then(|n| n.object.metadata.labels.as_ref()?.get(ZONE_LABEL))
            .map(String::as_str)
            .filter(|z| !z.is_empty())
    }
}

/// What the agent needs of its own Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// status.addresses: (type, address), e.g. ("InternalIP", "192.168.1.10").
    pub addresses: Vec<(String, String)>,
    /// spec.podCIDRs (or spec.podCIDR).
    pub pod_cidrs: Vec<String>,
    /// The label `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
}

/// `namespace/name` of an object's metadata.
pub fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}
