//! The cluster as the agent sees it: the input of the pure translation.
use ferry_podstate::PodRecord;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Endpoints, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};

/// An object with where it came from (for error messages).
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub source: String,
    pub object: T,
}

impl<T> Sourced<T> {
    pub fn new(source: impl Into<String>, object: T) -> Self {
        Self {
            source: source.into(),
            object,
        }
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
