//! The Pods this node should run: Pods and Deployments (expanded to `replicas`
//! Pods named `<deployment>-<i>`) from a manifest directory, placed on the lab's
//! nodes by spec.nodeName or, without one, by [`crate::placement`].
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Pod, PodSpec},
};
use serde::Deserialize as _;

use crate::{
    placement::{Placement, Slots},
    rollout::DeploymentDef,
};

/// A Pod to run.
#[derive(Clone, Debug, PartialEq)]
pub struct PodDef {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub spec: PodSpec,
    /// Changes whenever anything that needs a restart changes.
    pub fingerprint: String,
    /// `namespace/name` of the Deployment that owns the Pod, if any.
    pub owner: Option<String>,
}

impl PodDef {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub(crate) fn new(name: String, namespace: String, labels: BTreeMap<String, String>, spec: PodSpec) -> Self {
        let fingerprint = serde_json::to_string(&(&labels, &spec)).unwrap_or_default();
        Self {
            name,
            namespace,
            labels,
            spec,
            fingerprint,
            owner: None,
        }
    }
}

/// Everything a manifest directory asks for, before placement.
#[derive(Debug, Default)]
pub struct Manifests {
    /// Pods with their spec.nodeName.
    pods: Vec<(PodDef, Option<String>)>,
    /// Deployments with their template's spec.nodeName.
    deployments: Vec<(DeploymentDef, Option<String>)>,
    /// Names of the Node objects (the lab's nodes, when no `--nodes` is given).
    pub nodes: Vec<String>,
    pub errors: Vec<String>,
}

/// What a manifest directory asks this node to run, and what was wrong with it.
#[derive(Debug, Default)]
pub struct Desired {
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<String, PodDef>,
    /// Deployments by `namespace/name` (their Pods are planned by `rollout`),
    /// with this node's share of the replicas.
    pub deployments: BTreeMap<String, DeploymentDef>,
    /// Standalone Pods other nodes run, by `namespace/name`: names a
    /// Deployment's new Pod must not take.
    pub elsewhere: BTreeSet<String>,
    pub errors: Vec<String>,
}

/// Reads every *.yaml/*.yml of `dir`.
pub fn load_dir(dir: &Path) -> Manifests {
    let mut out = Manifests::default();
    let mut files: Vec<_> = match fs::read_dir(dir) {
        Ok(e) => e.flatten().map(|e| e.path()).collect(),
        Err(e) => {
            out.errors.push(format!("{}: {e}", dir.display()));
            return out;
        }
    };
    files.retain(|p| {
        let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        !hidden && p.extension().is_some_and(|e| e == "yaml" || e == "yml")
    });
    files.sort();
    for path in files {
        let file = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        match fs::read_to_string(&path) {
            Ok(text) => load_str(&file, &text, &mut out),
            Err(e) => out.errors.push(format!("{file}: {e}")),
        }
    }
    out
}

/// Parses one file's documents into `out`.
pub fn load_str(file: &str, text: &str, out: &mut Manifests) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.errors
                    .push(format!("{file}: document {}: not valid YAML: {e}", i + 1));
                break;
            }
        };
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty());
        let what = format!("{file}: {kind} {}", name.unwrap_or("<unnamed>"));
        match kind.as_str() {
            "Pod" => match serde_yaml::from_value::<Pod>(value)
                .map_err(|e| e.to_string())
                .and_then(pod_def)
            {
                Ok(p) => out.pods.push(p),
                Err(e) => out.errors.push(format!("{what}: {e}")),
            },
            "Deployment" => {
                match serde_yaml::from_value::<Deployment>(value)
                    .map_err(|e| e.to_string())
                    .and_then(deployment_def)
                {
                    Ok(d) => out.deployments.push(d),
                    Err(e) => out.errors.push(format!("{what}: {e}")),
                }
            }
            "Node" => match name {
                Some(n) => out.nodes.push(n.to_string()),
                None => out.errors.push(format!("{what}: metadata.name: missing")),
            },
            _ => {}
        }
    }
}

impl Manifests {
    /// What `node` runs: Pods whose spec.nodeName is `node`, and of those
    /// without one the share [`Placement`] gives it over `nodes` (the shim's
    /// `--nodes`; if empty, the Node objects of the manifests; if there are
    /// none either, every Pod without spec.nodeName runs on `node`).
    pub fn place(self, node: &str, nodes: &[String]) -> Desired {
        let mut out = Desired {
            errors: self.errors,
            ..Desired::default()
        };
        let placement = if nodes.is_empty() {
            Placement::new(&self.nodes)
        } else {
            Placement::new(nodes)
        };
        if let Some(p) = placement.as_ref().filter(|p| !p.contains(node)) {
            out.errors.push(format!(
                "node {node} is not one of the lab's nodes {:?} (--nodes, or the Node objects of the manifests): it runs only Pods whose spec.nodeName names it",
                p.nodes()
            ));
        }
        for (pod, pinned) in self.pods {
            let here = match (&pinned, &placement) {
                (Some(n), _) => n == node,
                (None, Some(p)) => p.pod_node(&pod.namespace, &pod.name) == node,
                (None, None) => true,
            };
            if here {
                out.pods.insert(pod.key(), pod);
            } else {
                out.elsewhere.insert(pod.key());
            }
        }
        for (mut d, pinned) in self.deployments {
            let slots = match (&pinned, &placement) {
                (Some(n), _) => (n == node).then_some(Slots::ALL),
                (None, Some(p)) => p.slots(&d.namespace, &d.name, node),
                (None, None) => Some(Slots::ALL),
            };
            if let Some(slots) = slots {
                d.replicas = slots.count(d.replicas);
                d.slots = slots;
                out.deployments.insert(d.key.clone(), d);
            }
        }
        out
    }
}

fn pod_def(pod: Pod) -> Result<(PodDef, Option<String>), String> {
    let meta = pod.metadata;
    let name = meta.name.filter(|n| !n.is_empty()).ok_or("metadata.name: missing")?;
    let spec = pod.spec.ok_or("spec: missing")?;
    check_spec(&spec)?;
    let node = spec.node_name.clone();
    let labels = meta.labels.unwrap_or_default();
    let ns = meta.namespace.unwrap_or_else(|| "default".into());
    Ok((PodDef::new(name, ns, labels, spec), node))
}

fn deployment_def(d: Deployment) -> Result<(DeploymentDef, Option<String>), String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let meta = d.metadata;
    let name = meta.name.filter(|n| !n.is_empty()).ok_or("metadata.name: missing")?;
    let ns = meta.namespace.unwrap_or_else(|| "default".into());
    let spec = d.spec.ok_or("spec: missing")?;
    let replicas = spec.replicas.unwrap_or(1);
    let replicas = u32::try_from(replicas).map_err(|_| format!("spec.replicas: {replicas} is negative"))?;
    let template_spec = spec.template.spec.ok_or("spec.template.spec: missing")?;
    check_spec(&template_spec)?;
    let labels = spec.template.metadata.and_then(|m| m.labels).unwrap_or_default();
    let strategy = spec.strategy.unwrap_or_default();
    let (max_surge, max_unavailable) = match strategy.type_.as_deref() {
        None | Some("RollingUpdate") => {
            let ru = strategy.rolling_update.unwrap_or_default();
            let s = |v: Option<IntOrString>| match v {
                Some(IntOrString::Int(n)) => Some(n.to_string()),
                Some(IntOrString::String(s)) => Some(s),
                None => None,
            };
            crate::rollout::resolve(s(ru.max_surge).as_deref(), s(ru.max_unavailable).as_deref(), replicas)?
        }
        Some("Recreate") => (0, replicas.max(1)),
        Some(other) => {
            return Err(format!(
                "spec.strategy.type: unknown {other:?} (RollingUpdate, Recreate)"
            ))
        }
    };
    let node = template_spec.node_name.clone();
    let template = PodDef::new(name.clone(), ns.clone(), labels, template_spec);
    Ok((
        DeploymentDef {
            key: format!("{ns}/{name}"),
            name,
            namespace: ns,
            replicas,
            max_surge,
            max_unavailable,
            slots: Slots::ALL,
            template,
        },
        node,
    ))
}

fn check_spec(spec: &PodSpec) -> Result<(), String> {
    if spec.containers.is_empty() {
        return Err("spec.containers: at least one container is needed".into());
    }
    for (i, c) in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .enumerate()
    {
        if c.command.as_ref().is_none_or(|c| c.is_empty()) {
            return Err(format!(
                "container {} ({i}): command: required (images are not run; the command runs as a process)",
                c.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOY: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: echo}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: echo}}\n  template:\n    metadata: {labels: {app: echo}}\n    spec:\n      containers: [{name: e, command: [ferry, echo]}]\n";

    fn pod(name: &str, node: Option<&str>) -> String {
        let node = node.map(|n| format!("nodeName: {n}, ")).unwrap_or_default();
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec: {{{node}containers: [{{name: c, command: [sleep, '1']}}]}}\n")
    }

    fn parse(text: &str) -> Manifests {
        let mut m = Manifests::default();
        load_str("m.yaml", text, &mut m);
        m
    }

    /// What each node runs: (node, its Pods' keys, its Deployments' local replicas).
    fn per_node(text: &str, nodes: &[&str], flag: &[String]) -> Vec<(String, Vec<String>, Vec<u32>)> {
        nodes
            .iter()
            .map(|n| {
                let d = parse(text).place(n, flag);
                assert!(d.errors.is_empty(), "{:?}", d.errors);
                let pods = d.pods.keys().cloned().collect();
                let replicas = d.deployments.values().map(|d| d.replicas).collect();
                (n.to_string(), pods, replicas)
            })
            .collect()
    }

    #[test]
    fn deployments_expand_to_replicas_with_template_labels() {
        let d = parse(DEPLOY).place("n1", &[]);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let dep = &d.deployments["default/echo"];
        assert_eq!((dep.replicas, dep.max_surge, dep.max_unavailable), (3, 1, 0));
        assert_eq!(dep.template.labels["app"], "echo");
        let p = crate::rollout::plan(dep, &[], &[]);
        assert_eq!(p.start, ["echo-0", "echo-1", "echo-2"]);
    }

    #[test]
    fn pods_of_other_nodes_are_skipped_and_bad_documents_reported() {
        let text = format!("{}---\n{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: c}}\nspec: {{containers: [{{name: c, image: busybox}}]}}\n", pod("a", Some("n2")), pod("b", None));
        let d = parse(&text).place("n1", &[]);
        assert_eq!(d.pods.keys().cloned().collect::<Vec<_>>(), ["default/b"]);
        assert_eq!(d.elsewhere.iter().cloned().collect::<Vec<_>>(), ["default/a"]);
        assert_eq!(d.errors.len(), 1);
        assert!(d.errors[0].starts_with("m.yaml: Pod c: container c"), "{:?}", d.errors);
    }

    #[test]
    fn without_a_node_list_every_node_runs_the_unpinned_pods() {
        let text = format!("{}---\n{DEPLOY}", pod("b", None));
        for (node, pods, replicas) in per_node(&text, &["n1", "n2"], &[]) {
            assert_eq!((pods, replicas), (vec!["default/b".to_string()], vec![3]), "{node}");
        }
    }

    #[test]
    fn with_a_node_list_each_unpinned_pod_runs_on_exactly_one_node() {
        let names: Vec<String> = (0..12).map(|i| format!("web-{i}")).collect();
        let text: Vec<String> = names.iter().map(|n| pod(n, None)).collect();
        let text = text.join("---\n");
        let nodes = ["n1", "n2", "n3"];
        let flag: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        let placed = per_node(&text, &nodes, &flag);
        let mut all: Vec<String> = placed.iter().flat_map(|(_, pods, _)| pods.clone()).collect();
        all.sort();
        let mut want: Vec<String> = names.iter().map(|n| format!("default/{n}")).collect();
        want.sort();
        assert_eq!(all, want, "every Pod once: {placed:?}");
        assert!(
            placed.iter().filter(|(_, pods, _)| !pods.is_empty()).count() >= 2,
            "spread: {placed:?}"
        );
        // The same answer again (stable), and whatever order --nodes lists.
        let flag_reversed: Vec<String> = flag.iter().rev().cloned().collect();
        assert_eq!(per_node(&text, &nodes, &flag_reversed), placed);
    }

    #[test]
    fn node_objects_stand_in_for_the_node_list() {
        let nodes = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n2}\n---\n";
        let text = format!("{nodes}{}", DEPLOY.replace("replicas: 3", "replicas: 6"));
        let placed = per_node(&text, &["n1", "n2"], &[]);
        assert_eq!(
            placed.iter().map(|(_, _, r)| r[0]).collect::<Vec<_>>(),
            [3, 3],
            "{placed:?}"
        );
        // The Pod names the two nodes plan are disjoint and make up echo-0..5.
        let mut names: Vec<String> = ["n1", "n2"]
            .iter()
            .flat_map(|n| {
                let d = parse(&text).place(n, &[]);
                crate::rollout::plan(&d.deployments["default/echo"], &[], &[]).start
            })
            .collect();
        names.sort();
        assert_eq!(names, (0..6).map(|i| format!("echo-{i}")).collect::<Vec<_>>());
    }

    #[test]
    fn node_name_wins_over_spreading() {
        let text = format!(
            "{}---\n{}",
            pod("a", Some("n2")),
            DEPLOY.replace("    spec:\n", "    spec:\n      nodeName: n1\n")
        );
        let flag = vec!["n1".to_string(), "n2".to_string()];
        let placed = per_node(&text, &["n1", "n2"], &flag);
        assert_eq!(placed[0], ("n1".to_string(), vec![], vec![3]));
        assert_eq!(placed[1], ("n2".to_string(), vec!["default/a".to_string()], vec![]));
    }

    #[test]
    fn a_node_missing_from_the_list_is_reported() {
        let d = parse(&pod("a", None)).place("n9", &["n1".to_string()]);
        assert!(d.pods.is_empty());
        assert_eq!(d.errors.len(), 1);
        assert!(d.errors[0].contains("node n9 is not one of"), "{:?}", d.errors);
    }

    #[test]
    fn broken_yaml_is_an_error_naming_the_file() {
        let m = parse("kind: Pod\nmetadata: [oops: : \n");
        assert_eq!(m.errors.len(), 1);
        assert!(m.errors[0].starts_with("m.yaml: document 1"), "{:?}", m.errors);
    }

    #[test]
    fn fingerprint_changes_with_the_spec() {
        let a = parse(DEPLOY).place("n1", &[]);
        let b = parse(&DEPLOY.replace("echo]", "echo, --tcp, '80']")).place("n1", &[]);
        assert_ne!(
            a.deployments["default/echo"].template.fingerprint,
            b.deployments["default/echo"].template.fingerprint
        );
    }
}
