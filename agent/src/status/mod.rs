//! `ferry status`: is this node healthy? The agent's own report (see
//! [`report`]) for what only it knows (version, mode, API, syncs, attach
//! errors), checked against the kernel for the rest: who holds the pin
//! directory, the maps' fill, and the programs actually attached to this
//! network namespace's interfaces and to the cgroup.
pub(crate) mod kernel_view;
mod metrics;
pub mod report;
mod table;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use metrics::MapFillCollector;
pub use report::{default_status_file, AgentReport, Reporter};
pub use table::print;

use crate::{inspect, pinlock};
use kernel_view::{MapRow, ProgramRow};

/// The agent rewrites its report every 2 seconds; older than this, it has
/// stopped reporting.
const STALE_SECONDS: f64 = 10.0;
/// A map this full is worth a warning.
pub const MAP_WARN_PERCENT: f64 = 90.0;

/// What to look at.
#[derive(Clone, Debug)]
pub struct Options {
    pub bpffs_dir: PathBuf,
    pub status_file: PathBuf,
}

/// The node at a glance. `healthy` is false when `problems` is not empty;
/// `warnings` do not change it.
#[derive(Debug, Serialize)]
pub struct Status {
    pub healthy: bool,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
    pub bpffs_dir: PathBuf,
    pub status_file: PathBuf,
    pub agent: AgentView,
    pub sync: Option<SyncView>,
    pub programs: Vec<ProgramRow>,
    pub maps: Vec<MapRow>,
    pub services: Option<Counts>,
    /// Dataplane drop counters that are not zero.
    pub drops: Vec<inspect::CounterRow>,
    pub features: Vec<report::Feature>,
}

#[derive(Debug, Default, Serialize)]
pub struct AgentView {
    /// A process holds the pin directory's lock.
    pub running: bool,
    pub pid: Option<u32>,
    /// Its status file is fresh.
    pub reporting: bool,
    pub version: Option<String>,
    pub node: Option<String>,
    pub mode: Option<String>,
    pub uptime_seconds: Option<f64>,
    /// Whose sockets the socket load balancer serves (see the report).
    pub socket_lb: Option<String>,
    /// Cluster mode: each watched resource.
    pub api: Vec<report::WatchState>,
}

#[derive(Debug, Serialize)]
pub struct SyncView {
    /// RFC 3339.
    pub last_success: Option<String>,
    pub age_seconds: Option<f64>,
    /// Successful syncs since the agent started.
    pub generation: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Counts {
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
}

impl Status {
    /// Nothing looked at yet.
    fn empty(opts: &Options) -> Self {
        Self {
            healthy: false,
            problems: Vec::new(),
            warnings: Vec::new(),
            bpffs_dir: opts.bpffs_dir.clone(),
            status_file: opts.status_file.clone(),
            agent: AgentView::default(),
            sync: None,
            programs: Vec::new(),
            maps: Vec::new(),
            services: None,
            drops: Vec::new(),
            features: Vec::new(),
        }
    }
}

/// Errors that keep `ferry status` from saying anything.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Lock(#[from] pinlock::PinLockError),
    #[error("listing the interfaces of this network namespace: {0}")]
    Netlink(String),
}

/// Looks at the node. Must run in the node's network namespace (where the
/// agent runs: `ip netns exec`, the host, or the agent's container).
pub async fn gather(opts: &Options) -> Result<Status, StatusError> {
    let mut s = Status::empty(opts);
    if !opts.bpffs_dir.is_dir() {
        s.problems.push(format!(
            "no pin directory {}: Ferry has not run on this node (or --node-name/--bpffs-dir name another)",
            opts.bpffs_dir.display()
        ));
        return Ok(s);
    }
    let report = agent_view(&mut s, opts)?;
    if let Some(r) = &report {
        sync_view(&mut s, r);
        s.features = r.features.clone();
    }
    s.programs = kernel_view::programs(&opts.bpffs_dir, report.as_ref())
        .await
        .map_err(StatusError::Netlink)?;
    program_problems(&mut s);
    s.maps = kernel_view::maps(&opts.bpffs_dir);
    map_problems(&mut s);
    dataplane_view(&mut s, &opts.bpffs_dir);
    s.healthy = s.problems.is_empty();
    Ok(s)
}

/// Who holds the pin directory, and their report if it is current.
fn agent_view(s: &mut Status, opts: &Options) -> Result<Option<AgentReport>, StatusError> {
    let holder = pinlock::held_by(&opts.bpffs_dir)?;
    s.agent.running = holder.is_some();
    s.agent.pid = holder.flatten();
    if !s.agent.running {
        s.problems.push(format!(
            "no agent is running for {} (the programs keep serving the last state; nothing updates them)",
            opts.bpffs_dir.display()
        ));
        return Ok(None);
    }
    let report = match report::read(&opts.status_file) {
        Ok(r) => r,
        Err(e) => {
            s.problems.push(format!(
                "the agent{} does not report: reading {}: {e} (see --status-file)",
                pid_suffix(s.agent.pid),
                opts.status_file.display()
            ));
            return Ok(None);
        }
    };
    let age = report::unix_now() - report.written_at;
    if s.agent.pid.is_some_and(|pid| pid != report.pid) || age > STALE_SECONDS {
        s.problems.push(format!(
            "the agent{} does not report: {} was written {age:.0}s ago by PID {}",
            pid_suffix(s.agent.pid),
            opts.status_file.display(),
            report.pid
        ));
        return Ok(None);
    }
    s.agent.reporting = true;
    s.agent.pid = Some(report.pid);
    s.agent.version = Some(report.version.clone());
    s.agent.node = Some(report.node.clone());
    s.agent.mode = Some(report.mode.clone());
    s.agent.socket_lb = report.socket_lb.clone();
    s.agent.uptime_seconds = Some(report::unix_now() - report.started_at);
    s.agent.api = report.api.clone();
    for w in &report.api {
        if let Some(e) = &w.error {
            s.warnings
                .push(format!("API: the {} watch is failing (retried): {e}", w.resource));
        }
        if !w.listed {
            s.warnings
                .push(format!("API: the initial list of {} is not done", w.resource));
        }
    }
    Ok(Some(report))
}

fn pid_suffix(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (PID {p})")).unwrap_or_default()
}

/// The last sync, against the same limit as /healthz.
fn sync_view(s: &mut Status, r: &AgentReport) {
    let now = report::unix_now();
    let age = r.last_sync.map(|t| now - t);
    s.sync = Some(SyncView {
        last_success: r.last_sync.map(rfc3339),
        age_seconds: age,
        generation: r.sync_generation,
        last_error: r.last_sync_error.clone(),
    });
    let limit = r.sync_timeout_seconds;
    match age {
        Some(a) if a > limit => s.problems.push(format!(
            "the last successful sync was {a:.0}s ago (more than {limit:.0}s)"
        )),
        None if now - r.started_at > limit => s.problems.push(format!(
            "no successful sync since the agent started {:.0}s ago",
            now - r.started_at
        )),
        _ => {}
    }
    if let Some(e) = &r.last_sync_error {
        s.problems.push(format!("the last sync failed: {e}"));
    }
    s.warnings.extend(r.not_served.iter().cloned());
}

fn rfc3339(unix: f64) -> String {
    k8s_openapi::jiff::Timestamp::from_microsecond((unix * 1e6) as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Attach errors, devices without from-netdev, XDP fallbacks.
fn program_problems(s: &mut Status) {
    for p in &s.programs {
        if let Some(e) = &p.error {
            let line = format!("{} on {} ({}): {e}", p.program, p.interface, p.hook);
            if p.hook.starts_with("xdp") {
                s.warnings.push(line);
            } else {
                s.problems.push(line);
            }
        }
    }
}

fn map_problems(s: &mut Status) {
    for m in &s.maps {
        if let Some(e) = &m.error {
            s.problems.push(format!("map {}: {e}", m.name));
        } else if m.warning {
            s.warnings.push(m.fill_warning());
        }
    }
}

/// What the maps program, and the drops counted.
fn dataplane_view(s: &mut Status, dir: &Path) {
    match inspect::services(dir) {
        Ok(rows) => {
            let services: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.service.as_str()).collect();
            let backends: std::collections::BTreeSet<u32> = rows
                .iter()
                .flat_map(|r| r.backends.iter().filter_map(|b| b.id))
                .collect();
            s.services = Some(Counts {
                services: services.len(),
                frontends: rows.len(),
                backends: backends.len(),
            });
        }
        Err(e) => s.problems.push(format!("reading the service maps: {e}")),
    }
    match inspect::counters(dir) {
        Ok(rows) => {
            s.drops = rows
                .into_iter()
                .filter(|r| r.kind == ferry_common::CounterKind::Drop.as_str() && r.value > 0)
                .collect()
        }
        Err(e) => s.problems.push(format!("reading the counters: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status::empty(&Options {
            bpffs_dir: "/nonexistent".into(),
            status_file: "/nonexistent.json".into(),
        })
    }

    fn report(started_ago: f64, synced_ago: Option<f64>) -> AgentReport {
        let now = report::unix_now();
        AgentReport {
            started_at: now - started_ago,
            last_sync: synced_ago.map(|a| now - a),
            sync_timeout_seconds: 60.0,
            sync_generation: 3,
            ..Default::default()
        }
    }

    #[test]
    fn syncs_are_judged_against_the_healthz_limit() {
        for (r, problem) in [
            (report(10.0, None), None),
            (report(100.0, None), Some("no successful sync since the agent started")),
            (report(100.0, Some(5.0)), None),
            (
                report(300.0, Some(200.0)),
                Some("the last successful sync was 200s ago (more than 60s)"),
            ),
        ] {
            let mut s = status();
            sync_view(&mut s, &r);
            match problem {
                None => assert!(s.problems.is_empty(), "{:?}", s.problems),
                Some(p) => assert!(
                    s.problems.len() == 1 && s.problems[0].starts_with(p),
                    "{:?}",
                    s.problems
                ),
            }
            assert_eq!(s.sync.as_ref().map(|y| y.generation), Some(3));
        }
        let mut s = status();
        sync_view(
            &mut s,
            &AgentReport {
                last_sync_error: Some("map full".into()),
                ..report(1.0, Some(1.0))
            },
        );
        assert_eq!(s.problems, ["the last sync failed: map full"]);
        // Frontends of a family not served are warnings, not problems.
        let mut s = status();
        let line = "default/web: IPv6 frontends [fd00::10]:80/TCP not served: this dataplane serves IPv4 only";
        sync_view(
            &mut s,
            &AgentReport {
                not_served: vec![line.into()],
                ..report(1.0, Some(1.0))
            },
        );
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(s.warnings, [line]);
    }

    #[test]
    fn attach_errors_are_problems_xdp_fallbacks_and_full_maps_warnings() {
        let mut s = status();
        let row = |hook: &str, error: Option<&str>| ProgramRow {
            interface: "eth0".into(),
            ifindex: Some(2),
            hook: hook.into(),
            program: "p".into(),
            attached: error.is_none(),
            error: error.map(Into::into),
        };
        s.programs = vec![
            row("tcx ingress", None),
            row("tcx ingress", Some("EBUSY")),
            row("xdp", Some("no driver")),
        ];
        program_problems(&mut s);
        assert_eq!(s.problems, ["p on eth0 (tcx ingress): EBUSY"]);
        assert_eq!(s.warnings, ["p on eth0 (xdp): no driver"]);
        s.maps = vec![MapRow {
            name: "FERRY_CT".into(),
            type_: "LruHash".into(),
            entries: Some(95),
            max: 100,
            percent: Some(95.0),
            warning: true,
            error: None,
            size_flag: None,
        }];
        map_problems(&mut s);
        assert_eq!(s.warnings[1], "map FERRY_CT is 95% full (95 of 100 entries)");
        assert_eq!(s.problems.len(), 1, "a full map is a warning");
        let text = print(&s);
        assert!(text.starts_with("Health:      UNHEALTHY"), "{text}");
        assert!(text.contains("ERROR: EBUSY") && text.contains("95%  WARNING"), "{text}");
    }
}
