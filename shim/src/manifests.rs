//! The Pods this node should run: Pods and Deployments (expanded to `replicas`
//! Pods named `<deployment>-<i>`) from a manifest directory.
use std::{collections::BTreeMap, fs, path::Path};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::{Pod, PodSpec}};
use serde::Deserialize as _;

use crate::rollout::DeploymentDef;

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
        Self { name, namespace, labels, spec, fingerprint, owner: None }
    }
}

/// What a manifest directory asks this node to run, and what was wrong with it.
#[derive(Debug, Default)]
pub struct Desired {
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<String, PodDef>,
    /// Deployments by `namespace/name` (their Pods are planned by `rollout`).
    pub deployments: BTreeMap<String, DeploymentDef>,
    pub errors: Vec<String>,
}

/// Reads every *.yaml/*.yml of `dir`; keeps the Pods for `node` (spec.nodeName
/// equal to it, or unset).
pub fn load_dir(dir: &Path, node: &str) -> Desired {
    let mut out = Desired::default();
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
            Ok(text) => load_str(&file, &text, node, &mut out),
            Err(e) => out.errors.push(format!("{file}: {e}")),
        }
    }
    out
}

/// Parses one file's documents into `out`.
pub fn load_str(file: &str, text: &str, node: &str, out: &mut Desired) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.errors.push(format!("{file}: document {}: not valid YAML: {e}", i + 1));
                break;
            }
        };
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>")
            .to_string();
        let what = format!("{file}: {kind} {name}");
        let pods = match kind.as_str() {
            "Pod" => serde_yaml::from_value::<Pod>(value).map_err(|e| e.to_string()).and_then(pod_defs),
            "Deployment" => {
                match serde_yaml::from_value::<Deployment>(value).map_err(|e| e.to_string()).and_then(deployment_def) {
                    Ok((d, node_name)) => {
                        if node_name.as_deref().is_none_or(|n| n == node) {
                            out.deployments.insert(d.key.clone(), d);
                        }
                    }
                    Err(e) => out.errors.push(format!("{what}: {e}")),
                }
                continue;
            }
            _ => continue,
        };
        match pods {
            Ok(pods) => {
                for (p, node_name) in pods {
                    if node_name.as_deref().is_none_or(|n| n == node) {
                        out.pods.insert(p.key(), p);
                    }
                }
            }
            Err(e) => out.errors.push(format!("{what}: {e}")),
        }
    }
}

type Defs = Vec<(PodDef, Option<String>)>;

fn pod_defs(pod: Pod) -> Result<Defs, String> {
    let meta = pod.metadata;
    let name = meta.name.filter(|n| !n.is_empty()).ok_or("metadata.name: missing")?;
    let spec = pod.spec.ok_or("spec: missing")?;
    check_spec(&spec)?;
    let node = spec.node_name.clone();
    let labels = meta.labels.unwrap_or_default();
    let ns = meta.namespace.unwrap_or_else(|| "default".into());
    Ok(vec![(PodDef::new(name, ns, labels, spec), node)])
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
        Some(other) => return Err(format!("spec.strategy.type: unknown {other:?} (RollingUpdate, Recreate)")),
    };
    let node = template_spec.node_name.clone();
    let template = PodDef::new(name.clone(), ns.clone(), labels, template_spec);
    Ok((
        DeploymentDef { key: format!("{ns}/{name}"), name, namespace: ns, replicas, max_surge, max_unavailable, template },
        node,
    ))
}

fn check_spec(spec: &PodSpec) -> Result<(), String> {
    if spec.containers.is_empty() {
        return Err("spec.containers: at least one container is needed".into());
    }
    for (i, c) in spec.containers.iter().chain(spec.init_containers.iter().flatten()).enumerate() {
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

    #[test]
    fn deployments_expand_to_replicas_with_template_labels() {
        let mut d = Desired::default();
        load_str("d.yaml", DEPLOY, "n1", &mut d);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let dep = &d.deployments["default/echo"];
        assert_eq!((dep.replicas, dep.max_surge, dep.max_unavailable), (3, 1, 0));
        assert_eq!(dep.template.labels["app"], "echo");
        let p = crate::rollout::plan(dep, &[], &[]);
        assert_eq!(p.start, ["echo-0", "echo-1", "echo-2"]);
    }

    #[test]
    fn pods_of_other_nodes_are_skipped_and_bad_documents_reported() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeName: n2, containers: [{name: c, command: [sleep, '1']}]}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: b}\nspec: {containers: [{name: c, command: [sleep, '1']}]}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: c}\nspec: {containers: [{name: c, image: busybox}]}\n";
        let mut d = Desired::default();
        load_str("p.yaml", text, "n1", &mut d);
        assert_eq!(d.pods.keys().cloned().collect::<Vec<_>>(), ["default/b"]);
        assert_eq!(d.errors.len(), 1);
        assert!(d.errors[0].starts_with("p.yaml: Pod c: container c"), "{:?}", d.errors);
    }

    #[test]
    fn broken_yaml_is_an_error_naming_the_file() {
        let mut d = Desired::default();
        load_str("x.yaml", "kind: Pod\nmetadata: [oops: : \n", "n1", &mut d);
        assert_eq!(d.errors.len(), 1);
        assert!(d.errors[0].starts_with("x.yaml: document 1"), "{:?}", d.errors);
    }

    #[test]
    fn fingerprint_changes_with_the_spec() {
        let mut a = Desired::default();
        load_str("d.yaml", DEPLOY, "n1", &mut a);
        let mut b = Desired::default();
        load_str("d.yaml", &DEPLOY.replace("echo]", "echo, --tcp, '80']"), "n1", &mut b);
        assert_ne!(
            a.deployments["default/echo"].template.fingerprint,
            b.deployments["default/echo"].template.fingerprint
        );
    }
}
