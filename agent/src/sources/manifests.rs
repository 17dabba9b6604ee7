//! Reading Kubernetes YAML: every *.yaml / *.yml file of a directory, multi-document
//! files too, typed with k8s-openapi. A file or document that does not parse is
//! reported and skipped; the rest is used.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::de::DeserializeOwned;

use crate::{
    error::InputError,
    model::{Snapshot, Sourced},
};

/// The objects of a manifest directory and the problems found reading it.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub snapshot: Snapshot,
    pub errors: Vec<InputError>,
    /// What changed since the previous load, when known (None: unknown, as
    /// at the first load; only a full translation is exact then).
    pub delta: Option<super::Delta>,
    /// The snapshot holds only what the source reads at every load (the
    /// shim's Pods), not the objects: `delta` says what changed.
    pub partial: bool,
}

/// Reads every manifest file of `dir` (once: [`DirCache`] for a directory
/// read again and again).
pub fn load_dir(dir: &Path) -> Manifests {
    DirCache::default().load(dir)
}

/// A manifest directory read again and again: files whose size and mtime did
/// not change are not parsed again (10,000 Services are 10 MB of YAML; one
/// edited file must not cost a re-parse of all of them).
#[derive(Debug, Default)]
pub struct DirCache {
    files: HashMap<PathBuf, Cached>,
    /// The manifest files, sorted, as last listed.
    order: Vec<PathBuf>,
    /// The directory could not be listed.
    dir_error: Option<InputError>,
}

#[derive(Debug)]
struct Cached {
    len: u64,
    modified: Option<SystemTime>,
    parsed: Manifests,
}

impl DirCache {
    /// What [`load_dir`] returns, parsing only new and changed files.
    pub fn load(&mut self, dir: &Path) -> Manifests {
        let delta = self.refresh(dir);
        Manifests {
            delta,
            ..self.assemble()
        }
    }

    /// Re-reads the files of `dir` that are new or changed, and forgets the
    /// removed ones; returns what changed (None: unknown, as at the first
    /// read). Cheap when nothing changed: a directory listing and a stat per
    /// file, no object copied.
    pub fn refresh(&mut self, dir: &Path) -> Option<super::Delta> {
        let mut delta = (!self.files.is_empty()).then(super::Delta::default);
        self.dir_error = None;
        let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(entries) => entries.flatten().map(|e| e.path()).filter(|p| is_manifest(p)).collect(),
            Err(e) => {
                self.files.clear();
                self.order.clear();
                self.dir_error = Some(InputError::new(
                    dir.display().to_string(),
                    "directory",
                    "",
                    e.to_string(),
                ));
                return None;
            }
        };
        files.sort();
        let present: std::collections::HashSet<&PathBuf> = files.iter().collect();
        self.files.retain(|p, c| {
            let keep = present.contains(p);
            if !keep {
                if let Some(d) = delta.as_mut() {
                    d.add(&c.parsed.snapshot, &Snapshot::default());
                }
            }
            keep
        });
        for path in &files {
            let md = fs::metadata(path).ok();
            let (len, modified) = (md.as_ref().map_or(0, |m| m.len()), md.and_then(|m| m.modified().ok()));
            let fresh = self
                .files
                .get(path)
                .is_some_and(|c| c.len == len && c.modified == modified);
            if fresh {
                continue;
            }
            let mut parsed = Manifests::default();
            let readable = load_file(path, &mut parsed);
            match self.files.get_mut(path) {
                // A file caught half-written, or broken by an edit: report
                // it, but keep serving what it said last (no state is lost;
                // delete the file to remove its objects).
                Some(old) if !readable => {
                    old.parsed.errors = parsed.errors;
                    (old.len, old.modified) = (len, modified);
                }
                _ => {
                    let old = self.files.insert(path.clone(), Cached { len, modified, parsed });
                    if let (Some(d), Some(new)) = (delta.as_mut(), self.files.get(path)) {
                        let empty = Snapshot::default();
                        d.add(
                            old.as_ref().map_or(&empty, |o| &o.parsed.snapshot),
                            &new.parsed.snapshot,
                        );
                    }
                }
            }
        }
        self.order = files;
        delta
    }

    /// The errors of the last [`DirCache::refresh`]: of the directory and of
    /// each file.
    pub fn errors(&self) -> Vec<InputError> {
        let files = self.order.iter().filter_map(|p| self.files.get(p));
        self.dir_error
            .iter()
            .chain(files.flat_map(|c| &c.parsed.errors))
            .cloned()
            .collect()
    }

    /// Every object of the last [`DirCache::refresh`], in file order (the
    /// objects are shared, not copied).
    pub fn assemble(&self) -> Manifests {
        let mut out = Manifests::default();
        out.errors.extend(self.dir_error.iter().cloned());
        for c in self.order.iter().filter_map(|p| self.files.get(p)) {
            out.append(&c.parsed);
        }
        out
    }
}

impl Manifests {
    fn append(&mut self, other: &Manifests) {
        let (a, b) = (&mut self.snapshot, &other.snapshot);
        a.services.extend_from_slice(&b.services);
        a.endpoint_slices.extend_from_slice(&b.endpoint_slices);
        a.endpoints.extend_from_slice(&b.endpoints);
        a.pods.extend_from_slice(&b.pods);
        a.pod_specs.extend_from_slice(&b.pod_specs);
        a.deployments.extend_from_slice(&b.deployments);
        a.nodes.extend_from_slice(&b.nodes);
        self.errors.extend_from_slice(&other.errors);
    }
}

/// Parses one file into `out`; false if it could not be read or is not YAML.
fn load_file(path: &Path, out: &mut Manifests) -> bool {
    let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    match fs::read_to_string(path) {
        Ok(text) => load_str(&name, &text, out),
        Err(e) => {
            out.errors.push(InputError::new(name, "file", "", e.to_string()));
            false
        }
    }
}

/// Whether a path is a manifest file (not hidden, .yaml or .yml).
pub fn is_manifest(p: &Path) -> bool {
    let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
    let yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
    !hidden && yaml && p.is_file()
}

/// Parses the documents of one file into `out`.
/// Returns false if the text is not valid YAML (a syntax error ends the
/// stream: the rest of the file is unreadable).
pub fn load_str(source: &str, text: &str, out: &mut Manifests) -> bool {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_name = format!("document {}", i + 1);
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.errors
                    .push(InputError::new(source, doc_name, "", format!("not valid YAML: {e}")));
                return false;
            }
        };
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
        let api_version = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let object = describe(&kind, &value).unwrap_or(doc_name);
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => push(source, &object, value, &mut out.snapshot.services, &mut out.errors),
            ("discovery.k8s.io/v1", "EndpointSlice") => push(
                source,
                &object,
                value,
                &mut out.snapshot.endpoint_slices,
                &mut out.errors,
            ),
            ("v1", "Endpoints") => push(source, &object, value, &mut out.snapshot.endpoints, &mut out.errors),
            // The shim runs these; the agent learns about Pods from the shim's status
            // records, but checks them here too so a broken one is reported.
            ("v1", "Pod") => push(source, &object, value, &mut out.snapshot.pod_specs, &mut out.errors),
            ("v1", "Node") => push(source, &object, value, &mut out.snapshot.nodes, &mut out.errors),
            ("apps/v1", "Deployment") => push(source, &object, value, &mut out.snapshot.deployments, &mut out.errors),
            (_, "") => out.errors.push(InputError::new(
                source,
                object,
                "kind",
                "missing: every document needs apiVersion and kind",
            )),
            (v, k) => tracing::debug!(source, object, "ignoring {k} ({v})"),
        }
    }
    true
}

fn push<T: DeserializeOwned>(
    source: &str,
    object: &str,
    value: serde_yaml::Value,
    into: &mut Vec<Sourced<T>>,
    errors: &mut Vec<InputError>,
) {
    match serde_yaml::from_value::<T>(value) {
        Ok(obj) => into.push(Sourced::at(source, into.len(), obj)),
        Err(e) => errors.push(InputError::new(
            source,
            object,
            "",
            format!("does not match the schema: {e}"),
        )),
    }
}

/// `Kind namespace/name` from an untyped document.
fn describe(kind: &str, value: &serde_yaml::Value) -> Option<String> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let ns = meta.get("namespace").and_then(|n| n.as_str()).unwrap_or("default");
    Some(format!("{kind} {ns}/{name}"))
}

use serde::Deserialize as _;

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Manifests {
        let mut m = Manifests::default();
        let _ = load_str("test.yaml", text, &mut m);
        m
    }

    #[test]
    fn reads_multi_document_files_with_every_kind() {
        let m = load(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: []\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {name: b}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {selector: {}, template: {}}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored}\n",
        );
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert_eq!((m.snapshot.pod_specs.len(), m.snapshot.deployments.len()), (1, 1));
        assert_eq!(m.snapshot.services.len(), 1);
        assert_eq!(m.snapshot.endpoint_slices.len(), 1);
        assert_eq!(m.snapshot.endpoints.len(), 1);
        assert_eq!(m.snapshot.services[0].source, "test.yaml");
    }

    #[test]
    fn broken_yaml_is_reported_with_the_file() {
        let m = load("apiVersion: v1\nkind: Service\nmetadata: [this is: not: yaml\n");
        assert_eq!(m.errors.len(), 1);
        let msg = m.errors[0].to_string();
        assert!(msg.starts_with("test.yaml: document 1: not valid YAML"), "{msg}");
    }

    #[test]
    fn schema_mismatch_names_the_object_and_keeps_the_rest() {
        let m = load(
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: [{port: eighty}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {ports: [{port: 80}]}\n",
        );
        assert_eq!(m.snapshot.services.len(), 1);
        assert_eq!(m.errors.len(), 1);
        let msg = m.errors[0].to_string();
        assert!(msg.contains("test.yaml: Service default/bad"), "{msg}");
    }

    /// A broken file is reported by name; the good file next to it still counts.
    #[test]
    fn a_bad_file_does_not_hide_the_good_ones() {
        let dir = std::env::temp_dir().join(format!("ferry-manifests-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("good.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {ports: [{port: 80}]}\n",
        )
        .unwrap();
        fs::write(dir.join("bad.yml"), "kind: Service\n  metadata: : [\n").unwrap();
        fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        let m = load_dir(&dir);
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(m.snapshot.services.len(), 1);
        assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
        assert!(
            m.errors[0]
                .to_string()
                .starts_with("bad.yml: document 1: not valid YAML"),
            "{}",
            m.errors[0]
        );
    }

    /// The cache re-parses changed files only, and forgets deleted ones.
    #[test]
    fn dir_cache_follows_changes() {
        let dir = std::env::temp_dir().join(format!("ferry-dircache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let svc = |name: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: 80}}]}}\n")
        };
        fs::write(dir.join("a.yaml"), svc("a")).unwrap();
        fs::write(dir.join("b.yaml"), svc("b")).unwrap();
        let mut cache = DirCache::default();
        let names = |m: &Manifests| -> Vec<String> {
            m.snapshot
                .services
                .iter()
                .map(|s| s.object.metadata.name.clone().unwrap_or_default())
                .collect()
        };
        assert_eq!(names(&cache.load(&dir)), ["a", "b"]);
        // A different size, so the change is seen even within one mtime tick.
        fs::write(dir.join("b.yaml"), svc("bee")).unwrap();
        assert_eq!(names(&cache.load(&dir)), ["a", "bee"]);
        fs::remove_file(dir.join("a.yaml")).unwrap();
        fs::write(dir.join("c.yaml"), "kind: [\n").unwrap();
        let m = cache.load(&dir);
        assert_eq!(names(&m), ["bee"]);
        assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
        assert_eq!(cache.files.len(), 2);
        // Broken by an edit: reported, and what the file said before still counts.
        fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
        )
        .unwrap();
        let m = cache.load(&dir);
        assert_eq!(names(&m), ["bee"]);
        assert_eq!(m.errors.len(), 2, "{:?}", m.errors);
        assert!(m
            .errors
            .iter()
            .any(|e| e.to_string().starts_with("b.yaml: document 1: not valid YAML")));
        fs::write(dir.join("b.yaml"), svc("b")).unwrap();
        let m = cache.load(&dir);
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(names(&m), ["b"]);
        assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
    }

    /// Errors found when translating name the file the object came from.
    #[test]
    fn service_errors_name_file_object_and_field() {
        let m = load(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: a, port: 70000}\n  - {name: b, port: 81, protocol: HTTP}\n  - {name: c, port: 82, protocol: SCTP}\n  - {name: d, port: 83}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ghost-1, namespace: prod, labels: {kubernetes.io/service-name: ghost}}\naddressType: IPv4\nendpoints: []\n",
        );
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let t = crate::translate::translate(&m.snapshot, &Default::default());
        let msgs: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            msgs,
            [
                "test.yaml: Service default/web: spec.ports[0].port: 70000 out of range 1-65535",
                "test.yaml: Service default/web: spec.ports[1].protocol: unknown protocol \"HTTP\" (TCP, UDP, SCTP)",
                "test.yaml: Service default/web: spec.ports[2].protocol: SCTP is not supported yet",
                "test.yaml: EndpointSlice prod/ghost-1: metadata.labels[kubernetes.io/service-name]: unknown Service prod/ghost",
            ]
        );
        assert_eq!(
            t.frontends.iter().map(|f| f.port).collect::<Vec<_>>(),
            [83],
            "the good port still works"
        );
    }

    #[test]
    fn missing_kind_is_an_error() {
        let m = load("metadata: {name: x}\n");
        assert_eq!(m.errors.len(), 1);
        assert_eq!(m.errors[0].field, "kind");
    }
}
