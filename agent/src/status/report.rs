//! What only the running agent knows, written by the agent to a JSON file
//! (`--status-file`, default /run/ferry/status/<node>.json) that `ferry status`
//! reads: a plain file works without any network access, from `ip netns exec`
//! and from `kubectl exec` into the agent's container alike (bpffs cannot hold
//! regular files). The file is replaced atomically (write, then rename) after
//! every sync and every 2 seconds, and removed when the agent stops.
use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// Where the status file of `node` goes by default.
pub fn default_status_file(node: &str) -> PathBuf {
    Path::new("/run/ferry/status").join(format!("{node}.json"))
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The agent's own account of itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentReport {
    pub pid: u32,
    pub version: String,
    pub node: String,
    /// `standalone` or `cluster`.
    pub mode: String,
    pub bpffs_dir: PathBuf,
    /// Unix seconds.
    pub started_at: f64,
    /// Unix seconds; a report much older than the write period means the
    /// agent stopped reporting.
    pub written_at: f64,
    /// /healthz fails when the last successful sync is older than this.
    pub sync_timeout_seconds: f64,
    /// Unix seconds of the last successful sync.
    pub last_sync: Option<f64>,
    /// Successful syncs since the agent started.
    pub sync_generation: u64,
    /// The last sync's error, cleared by the next successful one.
    pub last_sync_error: Option<String>,
    /// Services with frontends of a family the dataplane does not serve
    /// (IPv6 today), one line each, as the last sync named them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_served: Vec<String>,
    /// Cluster mode: each watched resource.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api: Vec<WatchState>,
    /// `--devices`: from-netdev must be attached to each.
    pub devices: Vec<String>,
    /// `--xdp-mode` when `--xdp` is on.
    pub xdp: Option<String>,
    /// The hook the TC programs attach to (`--tc-attach` resolved): `tcx
    /// ingress` or `tc ingress (netlink)`.
    #[serde(default)]
    pub tc_hook: Option<String>,
    /// Devices where XDP could not attach (TC serves them alone).
    #[serde(default)]
    pub xdp_refused: Vec<String>,
    /// Attach errors of the last attach pass (retried every 2 s).
    #[serde(default)]
    pub attach_errors: Vec<AttachError>,
    /// `--cgroup-path`: the socket load balancer is attached there (the agent
    /// does not start when it cannot attach it).
    pub cgroup: Option<PathBuf>,
    /// Whose sockets the socket load balancer serves: `node and Pods`,
    /// `node only` (`--socket-lb-pods=false`), with the skipped namespaces;
    /// None without `--cgroup-path`.
    #[serde(default)]
    pub socket_lb: Option<String>,
    /// Kernel features, probed at start.
    #[serde(default)]
    pub features: Vec<Feature>,
}

/// One watched resource of the API server (cluster mode).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WatchState {
    pub resource: String,
    /// The initial list is done.
    pub listed: bool,
    /// The watch is failing (retried with backoff): its last error.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachError {
    pub program: String,
    pub interface: String,
    pub error: String,
}

/// A kernel feature the dataplane relies on, and whether it is there.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Feature {
    pub name: String,
    pub available: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Feature {
    fn new(name: &str, available: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            available,
            detail: detail.into(),
        }
    }
}

/// Probes what the dataplane needs: the program and map types it loads, BTF,
/// and the kernel release (TCX needs 6.6; the attach itself says if not).
pub fn detect_features() -> Vec<Feature> {
    use aya::{maps::MapType, programs::ProgramType, sys};
    let prog = |name: &str, t: ProgramType| match sys::is_program_supported(t) {
        Ok(ok) => Feature::new(name, ok, ""),
        Err(e) => Feature::new(name, false, e.to_string()),
    };
    let map = |name: &str, t: MapType| match sys::is_map_supported(t) {
        Ok(ok) => Feature::new(name, ok, ""),
        Err(e) => Feature::new(name, false, e.to_string()),
    };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    vec![
        Feature::new("kernel", true, release.trim()),
        Feature::new(
            "btf",
            Path::new("/sys/kernel/btf/vmlinux").exists(),
            "/sys/kernel/btf/vmlinux",
        ),
        prog("tc_program", ProgramType::SchedClassifier),
        prog("xdp_program", ProgramType::Xdp),
        prog("cgroup_sock_addr_program", ProgramType::CgroupSockAddr),
        map("lru_hash_map", MapType::LruHash),
        map("lpm_trie_map", MapType::LpmTrie),
        map("percpu_array_map", MapType::PerCpuArray),
    ]
}

/// The agent's side: keeps the report and writes it.
#[derive(Debug)]
pub struct Reporter {
    path: Option<PathBuf>,
    report: Mutex<AgentReport>,
    /// The last write failed (logged once until a write works again).
    failing: AtomicBool,
}

impl Reporter {
    /// `path` None: nothing is written (`--status-file ""`).
    pub fn new(path: Option<PathBuf>, report: AgentReport) -> Self {
        Self {
            path,
            report: Mutex::new(report),
            failing: AtomicBool::new(false),
        }
    }

    /// Changes the report (written at the next `write`).
    pub fn update(&self, f: impl FnOnce(&mut AgentReport)) {
        f(&mut self.report.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn report(&self) -> AgentReport {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A successful sync.
    pub fn synced(&self) {
        self.update(|r| {
            r.last_sync = Some(unix_now());
            r.sync_generation += 1;
            r.last_sync_error = None;
        });
    }

    /// Writes the report atomically (a temporary file renamed over the old one).
    pub fn write(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut report = self.report();
        report.written_at = unix_now();
        let json = serde_json::to_vec_pretty(&report).map_err(io::Error::other)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)
    }

    /// Writes; a failure is logged (once, until a write works again), not
    /// returned: the dataplane does not depend on the status file.
    pub fn write_logged(&self) {
        let path = self.path.as_deref().unwrap_or(Path::new("")).display();
        match self.write() {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("writing the status file {path} works again");
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!("writing the status file {path} (ferry status reads it): {e}");
                }
            }
        }
    }

    /// Removes the file (the agent stops: nobody reports any more).
    pub fn remove(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Reads a status file.
pub fn read(path: &Path) -> io::Result<AgentReport> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_round_trips_through_an_atomically_replaced_file() {
        let dir = std::env::temp_dir().join(format!("ferry-status-{}", std::process::id()));
        let path = dir.join("node-a.json");
        let r = Reporter::new(
            Some(path.clone()),
            AgentReport {
                node: "node-a".into(),
                ..Default::default()
            },
        );
        r.synced();
        r.synced();
        r.write().unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.sync_generation, 2);
        assert!(back.last_sync.is_some() && back.written_at >= back.last_sync.unwrap());
        assert!(!dir.join("node-a.json.tmp").exists(), "the temporary file is renamed");
        r.remove();
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn features_name_the_kernel_and_the_program_types() {
        let f = detect_features();
        let names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
        assert!(names.contains(&"kernel") && names.contains(&"tc_program"), "{names:?}");
        assert!(!f[0].detail.is_empty(), "the kernel release: {f:?}");
    }
}
