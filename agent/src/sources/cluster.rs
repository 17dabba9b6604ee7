//! Cluster mode: Services, EndpointSlices and this node's Node object from the
//! Kubernetes API, kept current by kube-rs watchers and reflectors.
//!
//! Objects are watched untyped (`DynamicObject`) and typed one by one when a
//! snapshot is taken, so an object the k8s-openapi types reject (a string where a
//! port number belongs, say) is reported with its name and field and skipped,
//! instead of failing the whole list and stalling every other Service.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, ApiResource, DynamicObject},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt as _,
    },
    Client,
};
use serde::de::DeserializeOwned;

use crate::{
    error::InputError,
    metrics::Metrics,
    model::{ns_name, NodeInfo, Snapshot, Sourced},
    sources::Input,
};

/// One kind of access the cluster source needs. The RBAC manifests in deploy/
/// grant exactly these (a test compares them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group ("" is the core group).
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Everything the cluster source does with the API: list+watch (the watchers) on
/// the three resources, and one get of this node at start.
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["get", "list", "watch"],
    },
];

/// Where the objects come from in error messages.
const SOURCE: &str = "api";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "in-cluster configuration (outside a cluster, give --kubeconfig PATH, or --manifests DIR for standalone mode)"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("creating the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// How to reach the API and what to watch.
#[derive(Clone, Debug)]
pub struct Config {
    /// A kubeconfig file; None: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (its Node object is watched).
    pub node: String,
}

/// One watched resource: its reflector store and whether its first list is done.
struct Watched {
    what: &'static str,
    store: Store<DynamicObject>,
    ready: Arc<AtomicBool>,
    /// The watch's last error while it fails; None once it works again.
    failing: Arc<Mutex<Option<String>>>,
    /// What the watch changed since the last load.
    dirty: Arc<Mutex<Dirty>>,
}

/// The objects a watch applied or deleted since the last load, by the
/// [`Typer`]'s key: each as it is now (None: deleted). `all`: a (re)list
/// replaced the store (objects deleted during a watch gap come as no event),
/// so only a full load is exact.
#[derive(Debug)]
pub struct Dirty {
    pub objects: HashMap<String, Option<Arc<DynamicObject>>>,
    pub all: bool,
}

impl Default for Dirty {
    fn default() -> Self {
        Self {
            objects: HashMap::new(),
            all: true,
        }
    }
}

impl Dirty {
    fn note(&mut self, o: &DynamicObject, now: Option<&DynamicObject>) {
        self.objects.insert(cache_key(o), now.map(|o| Arc::new(o.clone())));
    }

    /// What was noted, leaving nothing noted.
    fn take(&mut self) -> Self {
        std::mem::replace(
            self,
            Self {
                objects: HashMap::new(),
                all: false,
            },
        )
    }
}

/// The running watchers. `load` gives a snapshot once every initial list is done.
pub struct Cluster {
    services: Watched,
    slices: Watched,
    nodes: Watched,
    node: String,
    typer: Mutex<Typer>,
}

/// Builds a client from `--kubeconfig` or the in-cluster environment.
pub async fn client(cfg: &Config) -> Result<Client, ClusterError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| ClusterError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClusterError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::incluster().map_err(ClusterError::InCluster)?,
    };
    Client::try_from(config).map_err(ClusterError::Client)
}

impl Cluster {
    /// Starts the three watchers. Every change (and every completed (re)list)
    /// sends when it was received on `changes`. Never blocks on the API: an unreachable API
    /// server is retried with backoff in the background.
    pub async fn start(cfg: &Config, changes: super::Changes, metrics: Arc<Metrics>) -> Result<Self, ClusterError> {
        let client = client(cfg).await?;
        let node_ar = ApiResource::erase::<Node>(&());
        let nodes_api: Api<DynamicObject> = Api::all_with(client.clone(), &node_ar);
        // The one `get`: tells early and clearly when --node-name is wrong.
        {
            let api = nodes_api.clone();
            let node = cfg.node.clone();
            tokio::spawn(async move {
                match api.get_opt(&node).await {
                    Ok(Some(_)) => tracing::info!(node = %node, "found this node in the API"),
                    Ok(None) => tracing::warn!(
                        node = %node,
                        "Node {node} does not exist in the API: check --node-name / NODE_NAME"
                    ),
                    Err(e) => tracing::debug!("getting Node {node}: {e}"),
                }
            });
        }
        let svc_ar = ApiResource::erase::<Service>(&());
        let slice_ar = ApiResource::erase::<EndpointSlice>(&());
        let services = spawn_watch(
            "services",
            Api::all_with(client.clone(), &svc_ar),
            svc_ar,
            watcher::Config::default(),
            changes.clone(),
            metrics.clone(),
        );
        let slices = spawn_watch(
            "endpointslices",
            Api::all_with(client.clone(), &slice_ar),
            slice_ar,
            watcher::Config::default(),
            changes.clone(),
            metrics.clone(),
        );
        let nodes = spawn_watch(
            "nodes",
            nodes_api,
            node_ar,
            watcher::Config::default().fields(&format!("metadata.name={}", cfg.node)),
            changes,
            metrics,
        );
        Ok(Self {
            services,
            slices,
            nodes,
            node: cfg.node.clone(),
            typer: Mutex::new(Typer::default()),
        })
    }

    /// Whether every watcher has finished its first list.
    pub fn is_ready(&self) -> bool {
        [&self.services, &self.slices, &self.nodes]
            .iter()
            .all(|w| w.ready.load(Ordering::Acquire))
    }

    /// The resources whose first list is not done yet.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        [&self.services, &self.slices, &self.nodes]
            .iter()
            .filter(|w| !w.ready.load(Ordering::Acquire))
            .map(|w| w.what)
            .collect()
    }

    /// Each watched resource: its first list done, its current error.
    pub fn watch_states(&self) -> Vec<crate::status::report::WatchState> {
        [&self.services, &self.slices, &self.nodes]
            .iter()
            .map(|w| crate::status::report::WatchState {
                resource: w.what.to_string(),
                listed: w.ready.load(Ordering::Acquire),
                error: w.failing.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            })
            .collect()
    }

    /// The objects as the last load typed them (what the maps were
    /// programmed from), nothing read from the watches; None before a whole
    /// load.
    pub fn cached(&self) -> Option<Input> {
        self.typer.lock().unwrap_or_else(|e| e.into_inner()).cached()
    }

    /// The current objects, typed; None until every initial list is done (a
    /// partial view would delete the Services not listed yet).
    /// `partial`: when only EndpointSlices changed since the last load (no
    /// Service, no relist), the input says which ([`Input::delta`]) instead
    /// of holding every object: the work is the change's, not the cluster's.
    pub fn load(&self, partial: bool) -> Option<Input> {
        if !self.is_ready() {
            return None;
        }
        let mut typer = self.typer.lock().unwrap_or_else(|e| e.into_inner());
        // Taken before the stores are read: a change after this is noted
        // again (and seen twice, which is harmless), never lost.
        let take = |w: &Watched| w.dirty.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (services, slices) = (take(&self.services), take(&self.slices));
        let nodes = self.nodes.store.state();
        if partial && typer.primed && !services.all && services.objects.is_empty() && !slices.all {
            return Some(typer.changed(slices.objects, &nodes, &self.node));
        }
        Some(typer.input(
            &self.services.store.state(),
            &self.slices.store.state(),
            &nodes,
            &self.node,
        ))
    }
}

/// Drops what translation never reads before an object is stored, as
/// kube-proxy's informers do with their transforms: managedFields and the
/// annotations not in [`crate::translate::READ_ANNOTATIONS`] (together often
/// most of an object's size).
fn strip(o: &mut DynamicObject) {
    o.metadata.managed_fields = None;
    if let Some(a) = o.metadata.annotations.as_mut() {
        a.retain(|k, _| crate::translate::READ_ANNOTATIONS.contains(&k.as_str()));
    }
}

/// Runs one watcher + reflector in the background.
fn spawn_watch(
    what: &'static str,
    api: Api<DynamicObject>,
    ar: ApiResource,
    config: watcher::Config,
    changes: super::Changes,
    metrics: Arc<Metrics>,
) -> Watched {
    let writer: Writer<DynamicObject> = Writer::new(ar);
    let store = writer.as_reader();
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    let reader = store.clone();
    let dirty = Arc::new(Mutex::new(Dirty::default()));
    let noted = dirty.clone();
    let note = move |f: &dyn Fn(&mut Dirty)| f(&mut noted.lock().unwrap_or_else(|e| e.into_inner()));
    let failing_state = Arc::new(Mutex::new(None));
    let last_error = failing_state.clone();
    let set_error = move |e: Option<String>| *last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff().modify(strip));
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    if !flag.swap(true, Ordering::AcqRel) {
                        tracing::info!(resource = what, objects = reader.len(), "initial list done");
                    } else {
                        tracing::info!(resource = what, objects = reader.len(), "relisted");
                    }
                    failing = false;
                    set_error(None);
                    note(&|d| d.all = true);
                    let _ = changes.send(super::Changed::now());
                }
                Ok(ref ev @ (watcher::Event::Apply(ref o) | watcher::Event::Delete(ref o))) => {
                    let now = matches!(ev, watcher::Event::Apply(_)).then_some(o);
                    note(&|d| d.note(o, now));
                    if failing {
                        tracing::info!(resource = what, "watch resumed");
                        failing = false;
                        set_error(None);
                    }
                    let _ = changes.send(super::Changed::now());
                }
                Ok(watcher::Event::Init) => tracing::debug!(resource = what, "listing"),
                Ok(watcher::Event::InitApply(_)) => {}
                Err(e) => {
                    metrics.watch_error(what);
                    // The store keeps the last state; the maps keep serving it.
                    tracing::warn!(
                        resource = what,
                        "watch failed, retrying with backoff (the maps keep the last state): {e}"
                    );
                    failing = true;
                    set_error(Some(e.to_string()));
                }
            }
        }
    });
    Watched {
        what,
        store,
        ready,
        failing: failing_state,
        dirty,
    }
}

/// Types the watched objects (skipping and reporting those that do not fit) and
/// makes the snapshot translation takes. Keeps each object's typed form (or its
/// error) until its resourceVersion changes, so a sync re-types only what changed.
#[derive(Default)]
pub struct Typer {
    services: Typed<Service>,
    slices: Typed<EndpointSlice>,
    nodes: Typed<Node>,
    /// Conversions done so far (for tests).
    pub conversions: usize,
    /// A whole input was made: the caches hold what translation last saw.
    primed: bool,
}

/// Cache of one kind: key ([`cache_key`]) → (resourceVersion, typed or error),
/// and the errors among them.
struct Typed<T> {
    by_key: HashMap<String, (Option<String>, Result<T, InputError>)>,
    errors: BTreeMap<String, InputError>,
}

impl<T> Default for Typed<T> {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            errors: BTreeMap::new(),
        }
    }
}

/// An object's key in the caches: its uid, else its name.
fn cache_key(o: &DynamicObject) -> String {
    o.metadata.uid.clone().unwrap_or_else(|| ns_or_cluster(o))
}

impl<T: DeserializeOwned + Clone> Typed<T> {
    /// One object changed (`now`; None: deleted): its typed form before and
    /// after, the cache and its errors kept in step.
    fn apply(
        &mut self,
        kind: &str,
        key: String,
        now: Option<&DynamicObject>,
        conversions: &mut usize,
    ) -> (Option<T>, Option<T>) {
        let old = self.by_key.remove(&key).and_then(|(_, r)| r.ok());
        self.errors.remove(&key);
        let Some(o) = now else {
            return (old, None);
        };
        *conversions += 1;
        let r: Result<T, InputError> = typed(kind, o);
        let new = match &r {
            Ok(t) => Some(t.clone()),
            Err(e) => {
                self.errors.insert(key.clone(), e.clone());
                None
            }
        };
        self.by_key.insert(key, (o.metadata.resource_version.clone(), r));
        (old, new)
    }

    fn all(
        &mut self,
        kind: &str,
        objs: &[Arc<DynamicObject>],
        errors: &mut Vec<InputError>,
        conversions: &mut usize,
    ) -> Vec<T> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(objs.len());
        for o in objs {
            let key = cache_key(o);
            let rv = o.metadata.resource_version.clone();
            let fresh = matches!(self.by_key.get(&key), Some((cached, _)) if rv.is_some() && *cached == rv);
            if !fresh {
                *conversions += 1;
                self.by_key.insert(key.clone(), (rv, typed(kind, o)));
            }
            if let Some((_, r)) = self.by_key.get(&key) {
                match r {
                    Ok(t) => out.push(t.clone()),
                    Err(e) => errors.push(e.clone()),
                }
            }
            seen.insert(key);
        }
        self.by_key.retain(|k, _| seen.contains(k));
        self.errors = self
            .by_key
            .iter()
            .filter_map(|(k, (_, r))| Some((k.clone(), r.as_ref().err()?.clone())))
            .collect();
        out
    }
}

impl Typer {
    pub fn input(
        &mut self,
        services: &[Arc<DynamicObject>],
        slices: &[Arc<DynamicObject>],
        nodes: &[Arc<DynamicObject>],
        node: &str,
    ) -> Input {
        let mut errors = Vec::new();
        let n = &mut self.conversions;
        let mut svcs: Vec<Sourced<Service>> = self
            .services
            .all("Service", services, &mut errors, n)
            .into_iter()
            .map(|s| Sourced::new(SOURCE, s))
            .collect();
        svcs.sort_by_key(|s| ns_name(&s.object.metadata));
        let mut eps: Vec<Sourced<EndpointSlice>> = self
            .slices
            .all("EndpointSlice", slices, &mut errors, n)
            .into_iter()
            .map(|s| Sourced::new(SOURCE, s))
            .collect();
        eps.sort_by_key(|s| ns_name(&s.object.metadata));
        let node = self.node(nodes, node, &mut errors);
        errors.sort_by_key(ToString::to_string);
        self.primed = true;
        Input {
            snapshot: Snapshot {
                services: svcs,
                endpoint_slices: eps,
                node,
                ..Default::default()
            },
            errors,
            // A whole input: translated whole.
            delta: None,
            partial: false,
        }
    }

    /// What the caches hold, as [`Typer::input`] gave it (None before it
    /// ran): no object typed or read again.
    pub fn cached(&self) -> Option<Input> {
        if !self.primed {
            return None;
        }
        fn all<T: Clone + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
            t: &Typed<T>,
        ) -> Vec<Sourced<T>> {
            let mut v: Vec<Sourced<T>> = t
                .by_key
                .values()
                .filter_map(|(_, r)| r.as_ref().ok())
                .map(|o| Sourced::new(SOURCE, o.clone()))
                .collect();
            v.sort_by_cached_key(|s| ns_name(s.object.metadata()));
            v
        }
        let node = self
            .nodes
            .by_key
            .values()
            .find_map(|(_, r)| r.as_ref().ok())
            .cloned()
            .map(node_info);
        let mut errors: Vec<InputError> = [&self.services.errors, &self.slices.errors, &self.nodes.errors]
            .into_iter()
            .flat_map(|e| e.values().cloned())
            .collect();
        errors.sort_by_key(ToString::to_string);
        Some(Input {
            snapshot: Snapshot {
                services: all(&self.services),
                endpoint_slices: all(&self.slices),
                node,
                ..Default::default()
            },
            errors,
            delta: None,
            partial: false,
        })
    }

    /// This node's facts (typed again only when its object changed).
    fn node(&mut self, nodes: &[Arc<DynamicObject>], node: &str, errors: &mut Vec<InputError>) -> Option<NodeInfo> {
        let ours: Vec<Arc<DynamicObject>> = nodes
            .iter()
            .filter(|o| o.metadata.name.as_deref() == Some(node))
            .cloned()
            .collect();
        self.nodes
            .all("Node", &ours, errors, &mut self.conversions)
            .into_iter()
            .next()
            .map(node_info)
    }

    /// Only EndpointSlices changed since the last input (`slices`, as
    /// [`Dirty`] noted them): an input of the node's facts and what changed
    /// ([`Input::delta`], [`Input::partial`]), the errors of every object.
    /// The slices that went are the typed forms the last input gave, so the
    /// translation kept by Service finds them.
    pub fn changed(
        &mut self,
        slices: HashMap<String, Option<Arc<DynamicObject>>>,
        nodes: &[Arc<DynamicObject>],
        node: &str,
    ) -> Input {
        let mut errors = Vec::new();
        let node = self.node(nodes, node, &mut errors);
        let mut d = super::Delta::default();
        for (key, now) in slices {
            let (went, came) = self
                .slices
                .apply("EndpointSlice", key, now.as_deref(), &mut self.conversions);
            for s in went.iter().chain(&came) {
                match crate::translate::slice_service(s) {
                    Some(id) => {
                        d.endpoints.insert(id);
                    }
                    None => d.other = true,
                }
            }
            d.slices.removed.extend(went.map(|s| Sourced::new(SOURCE, s)));
            d.slices.added.extend(came.map(|s| Sourced::new(SOURCE, s)));
        }
        errors.extend(
            [&self.services.errors, &self.slices.errors]
                .into_iter()
                .flat_map(|e| e.values().cloned()),
        );
        errors.sort_by_key(ToString::to_string);
        Input {
            snapshot: Snapshot {
                node,
                ..Default::default()
            },
            errors,
            delta: Some(d),
            partial: true,
        }
    }
}

/// One object into its k8s-openapi type; on failure an error naming the object
/// and the field.
fn typed<T: DeserializeOwned>(kind: &str, obj: &DynamicObject) -> Result<T, InputError> {
    let object = format!("{kind} {}", ns_or_cluster(obj));
    let value = serde_json::to_value(obj).map_err(|e| InputError::new(SOURCE, object.clone(), "", e.to_string()))?;
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        InputError::new(SOURCE, object, field, e.into_inner().to_string())
    })
}

fn ns_or_cluster(obj: &DynamicObject) -> String {
    match &obj.metadata.namespace {
        Some(_) => ns_name(&obj.metadata),
        None => obj.metadata.name.clone().unwrap_or_else(|| "<unnamed>".into()),
    }
}

fn node_info(n: Node) -> NodeInfo {
    let status = n.status.unwrap_or_default();
    let spec = n.spec.unwrap_or_default();
    let mut pod_cidrs = spec.pod_cidrs.unwrap_or_default();
    if pod_cidrs.is_empty() {
        pod_cidrs.extend(spec.pod_cidr);
    }
    let zone = n
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::model::ZONE_LABEL))
        .cloned();
    NodeInfo {
        zone,
        name: n.metadata.name.unwrap_or_default(),
        addresses: status
            .addresses
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a.type_, a.address))
            .collect(),
        pod_cidrs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: serde_json::Value) -> Arc<DynamicObject> {
        Arc::new(serde_json::from_value(v).expect("a DynamicObject"))
    }

    #[test]
    fn a_malformed_object_is_reported_with_its_field_and_the_rest_is_kept() {
        let services = [
            obj(serde_json::json!({
                "metadata": {"name": "good", "namespace": "default", "resourceVersion": "1"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
            })),
            obj(serde_json::json!({
                "metadata": {"name": "bad", "namespace": "prod", "resourceVersion": "2"},
                "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": "eighty"}]}
            })),
        ];
        let slices = [obj(serde_json::json!({
            "metadata": {"name": "good-1", "namespace": "default", "resourceVersion": "3",
                         "labels": {"kubernetes.io/service-name": "good"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}],
            "ports": [{"port": 8080}]
        }))];
        let nodes = [obj(serde_json::json!({
            "metadata": {"name": "n1", "resourceVersion": "4"},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.5"}]}
        }))];
        let mut typer = Typer::default();
        let input = typer.input(&services, &slices, &nodes, "n1");
        assert_eq!(typer.conversions, 4);
        // Unchanged objects are not typed again; the error is reported again.
        let again = typer.input(&services, &slices, &nodes, "n1");
        assert_eq!(typer.conversions, 4);
        assert_eq!(again.errors, input.errors);
        assert_eq!(again.snapshot.services.len(), 1);
        // The broken Service is fixed (new resourceVersion): typed again, and a
        // deleted slice leaves the cache.
        let fixed = [
            services[0].clone(),
            obj(serde_json::json!({
                "metadata": {"name": "bad", "namespace": "prod", "resourceVersion": "9"},
                "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}
            })),
        ];
        let after = typer.input(&fixed, &[], &nodes, "n1");
        assert_eq!(typer.conversions, 5);
        assert!(after.errors.is_empty(), "{:?}", after.errors);
        assert_eq!(after.snapshot.services.len(), 2);
        assert!(after.snapshot.endpoint_slices.is_empty());
        assert_eq!(input.snapshot.services.len(), 1);
        assert_eq!(input.snapshot.endpoint_slices.len(), 1);
        assert_eq!(input.errors.len(), 1, "{:?}", input.errors);
        let e = input.errors[0].to_string();
        assert!(e.contains("Service prod/bad"), "{e}");
        assert!(e.contains("spec.ports[0].port"), "{e}");
        let node = input.snapshot.node.expect("node info");
        assert_eq!(node.pod_cidrs, ["10.244.1.0/24"]);
        assert_eq!(node.addresses, [("InternalIP".to_string(), "192.168.0.5".to_string())]);
    }

    #[test]
    fn the_nodes_zone_label_reaches_the_snapshot_for_topology_aware_routing() {
        let nodes = [obj(serde_json::json!({
            "metadata": {"name": "n1", "resourceVersion": "4", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "spec": {"podCIDR": "10.244.1.0/24"}
        }))];
        let input = Typer::default().input(&[], &[], &nodes, "n1");
        assert_eq!(
            input.snapshot.node.as_ref().and_then(|n| n.zone.as_deref()),
            Some("zone-a")
        );
        assert_eq!(input.snapshot.zone_of("n1"), Some("zone-a"));
        assert_eq!(input.snapshot.zone_of("n2"), None);
        let unlabelled = [obj(
            serde_json::json!({"metadata": {"name": "n1", "resourceVersion": "5"}}),
        )];
        assert_eq!(
            Typer::default()
                .input(&[], &[], &unlabelled, "n1")
                .snapshot
                .zone_of("n1"),
            None
        );
    }

    #[test]
    fn stored_objects_keep_only_the_annotations_translation_reads() {
        let mut o: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "web",
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"a very\": \"long text\"}",
                    "ferry.dev/lb-algorithm": "maglev",
                    "service.beta.kubernetes.io/load-balancer-source-ranges": "10.0.0.0/8",
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
        }))
        .unwrap();
        strip(&mut o);
        assert!(o.metadata.managed_fields.is_none());
        let kept: Vec<&str> = o
            .metadata
            .annotations
            .iter()
            .flatten()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(
            kept,
            [
                "ferry.dev/lb-algorithm",
                "service.beta.kubernetes.io/load-balancer-source-ranges"
            ]
        );
    }

    /// Cluster mode's incremental path: random watch events (mostly
    /// EndpointSlices applied and deleted, some Services changed), noted as
    /// the watch task notes them and loaded as `Cluster::load` does; after
    /// each step the translation kept by Service equals a full translation
    /// of everything the API holds.
    #[test]
    fn endpoint_slice_events_give_what_a_full_translation_gives() {
        use crate::incremental::{
            tests::{service, slice, Rng, SERVICES},
            Translated,
        };
        let cfg = crate::translate::Config {
            node: "node1".into(),
            nodeport_addrs: vec!["192.168.1.1".parse().unwrap()],
            ..Default::default()
        };
        let dynamic = |v: serde_json::Value, uid: String, rv: usize| {
            let mut v = v;
            v["metadata"]["uid"] = serde_json::json!(uid);
            v["metadata"]["resourceVersion"] = serde_json::json!(rv.to_string());
            Arc::new(serde_json::from_value::<DynamicObject>(v).expect("a DynamicObject"))
        };
        let (mut incremental, mut steps) = (0, 0);
        for seed in 1..=30u64 {
            let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (mut services, mut slices) = (BTreeMap::new(), BTreeMap::new());
            let mut rv = 0;
            for i in 0..SERVICES {
                rv += 1;
                let v = serde_json::to_value(service(&mut r, i)).unwrap();
                services.insert(format!("s{i}"), dynamic(v, format!("s{i}"), rv));
            }
            let all = |m: &BTreeMap<String, Arc<DynamicObject>>| m.values().cloned().collect::<Vec<_>>();
            let mut typer = Typer::default();
            let mut translated = Translated::default();
            translated.full(
                &typer.input(&all(&services), &all(&slices), &[], "node1").snapshot,
                &cfg,
            );
            for n in 0..60 {
                rv += 1;
                let (mut dirty_services, mut dirty_slices) = (Dirty::default().take(), Dirty::default().take());
                let i = r.below(SERVICES);
                if r.chance(10) {
                    let v = serde_json::to_value(service(&mut r, i)).unwrap();
                    let o = dynamic(v, format!("s{i}"), rv);
                    dirty_services.note(&o, Some(&o));
                    services.insert(format!("s{i}"), o);
                } else {
                    let name = format!("e{}", r.below(SERVICES * 2));
                    // Deleted, or applied with a new uid now and then (a
                    // slice deleted and created again between two loads).
                    let uid = format!("{name}-{}", r.below(2));
                    let old = slices.remove(&name);
                    if let Some(o) = &old {
                        dirty_slices.note(o, None);
                    }
                    if r.chance(85) {
                        let v = serde_json::to_value(slice(&mut r, &name, i)).unwrap();
                        let o = dynamic(v, uid, rv);
                        dirty_slices.note(&o, Some(&o));
                        slices.insert(name, o);
                    }
                }
                steps += 1;
                let input = if dirty_services.objects.is_empty() {
                    Some(typer.changed(dirty_slices.objects, &[], "node1"))
                } else {
                    None
                };
                let done = input.and_then(|i| {
                    let d = i.delta.expect("a delta");
                    translated.update(&[], &d, &cfg)
                });
                incremental += usize::from(done.is_some());
                if done.is_none() {
                    translated.full(
                        &typer.input(&all(&services), &all(&slices), &[], "node1").snapshot,
                        &cfg,
                    );
                }
                let whole = Typer::default().input(&all(&services), &all(&slices), &[], "node1");
                let full = crate::translate::translate(&whole.snapshot, &cfg);
                let at = format!("seed {seed} step {n} (incremental: {})", done.is_some());
                assert_eq!(translated.frontends(), full.frontends, "{at}");
                assert!(translated.same_as(&full), "{at}: errors, health checks or allocations");
                // What the periodic resync translates: the caches as they are.
                let cached = typer.cached().expect("primed");
                let mut resynced = Translated::default();
                resynced.full(&cached.snapshot, &cfg);
                assert!(translated.same_result(&resynced), "{at}: the cached input");
                assert_eq!(cached.errors, whole.errors, "{at}: the cached errors");
            }
        }
        assert!(incremental * 3 > steps, "{incremental} of {steps} steps incremental");
    }

    #[test]
    fn access_lists_only_what_the_watchers_use() {
        for a in API_ACCESS {
            assert!(a.verbs.contains(&"list") && a.verbs.contains(&"watch"));
            assert!(!a
                .verbs
                .iter()
                .any(|v| ["create", "update", "patch", "delete"].contains(v)));
        }
    }
}
