//! Pod status in standalone mode: what the lab's shim (`ferry shim`, the
//! kubelet stand-in) publishes about the Pods it runs, and where. The shim
//! writes these records and the agent reads them (its standalone endpoints
//! controller); this small crate is all the two share, so the agent does not
//! depend on the shim.
//!
//! The shim plays the kubelet; in standalone mode there is no API server, so Pod
//! status goes to files that every node's agent reads (the lab shares one state
//! directory between nodes, like a shared API server):
//!
//! `<state-dir>/pods/<node>/<namespace>_<name>.json`, one [`PodRecord`] each,
//! written atomically (write to a temp file, then rename). A Pod that is gone has no
//! file. The agent watches `<state-dir>/pods` recursively.
use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Default state directory shared by shims and agents on one machine.
pub const DEFAULT_STATE_DIR: &str = "/run/ferry";

/// A container port as declared in the Pod spec (for named targetPorts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPortRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u16,
    /// "TCP" or "UDP" (default "TCP").
    pub protocol: String,
}

/// The status of one Pod as the shim sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub name: String,
    pub namespace: String,
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// All containerPorts of all containers.
    #[serde(default)]
    pub ports: Vec<ContainerPortRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<Ipv4Addr>,
    /// Address of the node running the Pod (its underlay address, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    /// "Pending", "Running", "Succeeded", "Failed".
    pub phase: String,
    /// The Ready condition: all containers started and readiness probes passing.
    /// While `terminating`, the probes keep running and this is the endpoint's
    /// `serving` condition (consumers treat a terminating Pod as not ready).
    pub ready: bool,
    /// The Pod is being deleted (within its termination grace period).
    #[serde(default)]
    pub terminating: bool,
    /// Name of the network namespace (`ip netns exec <netns> ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Container restarts so far (liveness failures, crashes).
    #[serde(default)]
    pub restarts: u32,
}

impl PodRecord {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `<state-dir>/pods`.
pub fn pods_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pods")
}

/// `<state-dir>/pods/<node>/<namespace>_<name>.json`.
pub fn record_path(state_dir: &Path, node: &str, namespace: &str, name: &str) -> PathBuf {
    pods_dir(state_dir).join(node).join(format!("{namespace}_{name}.json"))
}

/// Writes a record atomically.
pub fn write_record(state_dir: &Path, record: &PodRecord) -> io::Result<()> {
    let path = record_path(state_dir, &record.node, &record.namespace, &record.name);
    let dir = path.parent().expect("record path has a parent");
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}_{}.json.tmp", record.namespace, record.name));
    let body = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    fs::write(&tmp, body)?;
    fs::rename(&tmp, &path)
}

/// Removes a record; a missing one is not an error.
pub fn remove_record(state_dir: &Path, node: &str, namespace: &str, name: &str) -> io::Result<()> {
    match fs::remove_file(record_path(state_dir, node, namespace, name)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Reads every record of every node. Unreadable files are returned as errors
/// next to the records that could be read.
pub fn read_all(state_dir: &Path) -> (Vec<PodRecord>, Vec<(PathBuf, String)>) {
    let mut records = Vec::new();
    let mut errors = Vec::new();
    let Ok(nodes) = fs::read_dir(pods_dir(state_dir)) else {
        return (records, errors);
    };
    for node in nodes.flatten() {
        let Ok(files) = fs::read_dir(node.path()) else { continue };
        for file in files.flatten() {
            let path = file.path();
            let is_json = path.extension().is_some_and(|e| e == "json");
            let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !is_json || hidden {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<PodRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => records.push(r),
                Err(e) => errors.push((path, e)),
            }
        }
    }
    records.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (records, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_remove_round_trip() {
        let dir = std::env::temp_dir().join(format!("ferry-status-{}", std::process::id()));
        let rec = PodRecord {
            name: "echo-0".into(),
            namespace: "default".into(),
            node: "node1".into(),
            labels: [("app".to_string(), "echo".to_string())].into(),
            ports: vec![ContainerPortRecord {
                name: Some("http".into()),
                container_port: 8080,
                protocol: "TCP".into(),
            }],
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 2)),
            host_ip: None,
            phase: "Running".into(),
            ready: true,
            terminating: false,
            netns: Some("ferry-node1-echo-0".into()),
            restarts: 0,
        };
        write_record(&dir, &rec).unwrap();
        let (all, errs) = read_all(&dir);
        assert!(errs.is_empty());
        assert_eq!(all, vec![rec.clone()]);
        remove_record(&dir, "node1", "default", "echo-0").unwrap();
        remove_record(&dir, "node1", "default", "echo-0").unwrap();
        assert!(read_all(&dir).0.is_empty());
        let _ = fs::remove_dir_all(&dir);
    }
}
