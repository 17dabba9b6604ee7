//! `cargo xtask bench --control-plane`: the agent's control plane at N
//! Services, measured as a new user would meet it: the release agent on N
//! Services of `ENDPOINTS` endpoints each, in standalone mode (manifest files)
//! and in cluster mode (the fake API server, a list of every object, then a
//! watch stream of changes). No traffic: the rows are
//!
//! - cold start: agent started → every Service programmed (its own completion
//!   stamp, `ferry_sync_proxy_rules_last_timestamp_seconds`);
//! - agent RSS after the cold start and after the changes;
//! - one endpoint change, `CHANGES` times, one at a time: inside the agent
//!   (event received → maps written, the difference of its
//!   `ferry_network_programming_duration_seconds` histogram's exact sum and
//!   count around the change) and end to end (file written or object applied →
//!   the agent's completion stamp); p50 and p99;
//! - a sustained stream of endpoint changes (`RATE` per second for `STREAM`
//!   seconds: files rewritten, or slices applied): whether the agent keeps up, by markers (a new Service
//!   every half second) and how long each took to be programmed under that
//!   load, and how many syncs served the changes (coalescing).
use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::bench::{atomic_write, rss_mib_of as rss_mib, unix_now};
use anyhow::{bail, Context as _, Result};
use ferry_bench::{
    manifests::service_yaml,
    scenario::{Protocol, Service, ServicePort, FAKE_ENDPOINTS_MAX, FAKE_ENDPOINT_BASE, NAMESPACE, SERVICES_MAX},
};
use ferry_tests::{fakeapi::FakeApi, metrics::histogram, Lab, LabOptions, Syncs};
use serde_json::{json, Value};

/// Endpoints per Service (the "10,000 Services × 10 endpoints").
const ENDPOINTS: usize = 10;
/// Services whose endpoints change, each alone in its file (an endpoint
/// change rewrites one small file, as the shim's Pod status does).
const CHURN: usize = 100;
/// Single endpoint changes timed per mode.
const CHANGES: usize = 50;
/// The sustained stream: changes per second, for this many seconds.
const RATE: u32 = 1000;
const STREAM: Duration = Duration::from_secs(5);
/// Fillers per manifest file.
const SHARD: usize = 1000;
/// The agent's own histogram of event → maps written.
const PROGRAMMING: &str = "ferry_network_programming_duration_seconds";
/// Its stand-in where the agent has no such histogram: the sync alone.
const SYNC_DURATION: &str = "ferry_sync_proxy_rules_duration_seconds";
/// ClusterIPs: 10.96.0.1 + i (inside the agent's default range).
const CLUSTER_IP_BASE: u32 = 0x0a60_0001;
/// Addresses an endpoint change puts in (after the fillers' own).
const NEW_ENDPOINT_BASE: u32 = FAKE_ENDPOINT_BASE + (FAKE_ENDPOINTS_MAX as u32) / 2;

pub struct Plan {
    pub ns: Vec<usize>,
    pub quick: bool,
    pub profile: &'static str,
    pub out: PathBuf,
}

/// What one mode at one N measured.
#[derive(Default)]
struct Row {
    mode: &'static str,
    n: usize,
    cold_start_s: Option<f64>,
    rss_mib: Option<f64>,
    rss_after_mib: Option<f64>,
    /// (inside the agent, end to end), seconds, one per change.
    changes: Vec<(Option<f64>, f64)>,
    inside_metric: &'static str,
    stream: Option<Stream>,
    notes: Vec<String>,
}

struct Stream {
    written: usize,
    seconds: f64,
    syncs: u64,
    /// Each marker's time to be programmed under the stream, seconds.
    markers: Vec<f64>,
    /// After the stream stopped: until its last change was programmed.
    drain_s: f64,
}

pub fn run(plan: &Plan) -> Result<()> {
    if plan.ns.iter().any(|n| !(CHURN + 1..=SERVICES_MAX).contains(n)) {
        bail!(
            "--services: every N must be within {}..={SERVICES_MAX} for --control-plane",
            CHURN + 1
        );
    }
    println!(
        "bench: building the agent ({}) for the control-plane benchmark",
        plan.profile
    );
    let mut cmd = crate::cargo();
    cmd.args(["build", "--package", "ferry", "--bin", "ferry"]);
    if plan.profile == "release" {
        cmd.arg("--release");
    }
    crate::run_cmd(&mut cmd)?;
    std::env::set_var(
        "FERRY_BIN",
        crate::root().join("target").join(plan.profile).join("ferry"),
    );
    let mut rows = Vec::new();
    for &n in &plan.ns {
        for cluster in [false, true] {
            let mode = if cluster { "cluster" } else { "standalone" };
            println!("bench: control plane, {mode} mode, N={n}");
            let mut row = Row {
                mode,
                n,
                ..Row::default()
            };
            let outcome = if cluster {
                measure_cluster(plan, n, &mut row)
            } else {
                measure_standalone(plan, n, &mut row)
            };
            if let Err(e) = outcome {
                println!("bench:   failed: {e:#}");
                row.notes.push(format!("failed: {e:#}"));
            }
            print_row(&row);
            rows.push(row);
        }
    }
    let md = markdown(plan, &rows);
    fs::create_dir_all(&plan.out)?;
    let path = plan.out.join("control-plane.md");
    fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("\n{md}\nbench: written to {}", path.display());
    if rows.iter().any(|r| r.cold_start_s.is_none()) {
        bail!("the control-plane benchmark could not program every Service in one of its runs (see the notes)");
    }
    Ok(())
}

fn services(n: usize) -> Vec<Service> {
    (0..n)
        .map(|i| Service {
            namespace: NAMESPACE.into(),
            name: format!("svc-{i:06}"),
            cluster_ip: Ipv4Addr::from(CLUSTER_IP_BASE + i as u32),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: 8080,
                node_port: None,
            }],
            endpoints: (0..ENDPOINTS)
                .map(|j| Ipv4Addr::from(FAKE_ENDPOINT_BASE + (i * ENDPOINTS + j) as u32))
                .collect(),
        })
        .collect()
}

/// The k-th endpoint change of a churn Service: its first endpoint replaced
/// by a fresh address.
fn changed(s: &Service, k: usize) -> Service {
    let mut s = s.clone();
    s.endpoints[0] = Ipv4Addr::from(NEW_ENDPOINT_BASE + k as u32);
    s
}

/// A marker: a new Service, so its frontend count says the agent got there.
fn marker(n: usize, k: usize) -> Service {
    let mut s = services(1).remove(0);
    s.name = format!("marker-{k:04}");
    s.cluster_ip = Ipv4Addr::from(CLUSTER_IP_BASE + (n + k) as u32);
    s
}

/// The agent's map sizes for `frontends` frontends of `endpoints` endpoints
/// each: every frontend and backend slot, with room (never below the
/// defaults). 100,000 Services of 10 need them raised, as a user would.
pub fn map_size_args(frontends: usize, endpoints: usize) -> Vec<String> {
    let entries = |x: usize| (x + x / 4).next_power_of_two().max(262_144).to_string();
    vec![
        "--services-map-size".into(),
        entries(frontends * (1 + endpoints) + 1024),
        "--backends-map-size".into(),
        entries(frontends * endpoints + 1024),
    ]
}

fn lab(tag: &str, n: usize) -> Result<Lab> {
    Lab::start(LabOptions {
        agent: false,
        shim: false,
        agent_args: map_size_args(n, ENDPOINTS),
        ..LabOptions::new(tag)
    })
}

fn measure_standalone(plan: &Plan, n: usize, row: &mut Row) -> Result<()> {
    let all = services(n);
    let (churn, fillers) = all.split_at(CHURN);
    let mut lab = lab("cps", n)?;
    let dir = lab.dir.join("bench-manifests");
    fs::create_dir_all(&dir)?;
    for (i, shard) in fillers.chunks(SHARD).enumerate() {
        let text: String = shard.iter().map(service_yaml).collect();
        fs::write(dir.join(format!("fillers-{i:03}.yaml")), text)?;
    }
    let churn_file = |i: usize| dir.join(format!("churn-{i:03}.yaml"));
    for (i, s) in churn.iter().enumerate() {
        fs::write(churn_file(i), service_yaml(s))?;
    }
    let t0 = unix_now();
    lab.start_agent_on(&dir)?;
    let ready = wait(&mut lab, None, |s| s.frontends == n as u64, Duration::from_secs(600))?;
    row.cold_start_s = Some(ready.last_sync_s - t0);
    row.rss_mib = lab.agent_pid().and_then(rss_mib);
    let quiet = if plan.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(2)
    };
    std::thread::sleep(quiet);
    let changes = if plan.quick { 10 } else { CHANGES };
    for k in 0..changes {
        let s = changed(&churn[k % CHURN], k);
        let write = || atomic_write(&churn_file(k % CHURN), &service_yaml(&s));
        row.push(one_change(&mut lab, write)?);
    }
    let mut change = |k: usize| atomic_write(&churn_file(k % CHURN), &service_yaml(&changed(&churn[k % CHURN], k)));
    let mut add_marker =
        |m: usize| atomic_write(&dir.join(format!("marker-{m:04}.yaml")), &service_yaml(&marker(n, m)));
    row.stream = Some(stream(plan, &mut lab, n, &mut change, &mut add_marker)?);
    row.rss_after_mib = lab.agent_pid().and_then(rss_mib);
    Ok(())
}

/// Makes `change(k)` (the k-th endpoint change of a churn Service) at `RATE`
/// per second for `STREAM`, with `add_marker(m)` (a new Service) every half
/// second; then adds one last marker and waits for it.
fn stream(
    plan: &Plan,
    lab: &mut Lab,
    n: usize,
    change: &mut dyn FnMut(usize) -> Result<()>,
    add_marker: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<Stream> {
    let (rate, length) = if plan.quick {
        (RATE / 5, Duration::from_secs(1))
    } else {
        (RATE, STREAM)
    };
    let before = lab.syncs()?;
    let started = Instant::now();
    let mut written = 0usize;
    // (marker index, Unix time written)
    let mut markers: Vec<(usize, f64)> = Vec::new();
    let mut done: Vec<f64> = Vec::new();
    let mut next_poll = Instant::now();
    while started.elapsed() < length {
        let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as usize;
        while written < due {
            change(10_000 + written)?;
            written += 1;
        }
        if markers.len() < (started.elapsed().as_millis() / 500) as usize + 1 {
            add_marker(markers.len())?;
            markers.push((markers.len(), unix_now()));
        }
        if Instant::now() >= next_poll {
            record_markers(lab, n, &markers, &mut done)?;
            next_poll = Instant::now() + Duration::from_millis(20);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let seconds = started.elapsed().as_secs_f64();
    let stopped = unix_now();
    // The last marker was written after every change: once it is programmed,
    // so is everything before it (each load reads every changed file).
    let last = markers.len();
    add_marker(last)?;
    markers.push((last, unix_now()));
    let end = wait(
        lab,
        None,
        |s| s.frontends == (n + last + 1) as u64,
        Duration::from_secs(120),
    )?;
    record_markers(lab, n, &markers, &mut done)?;
    Ok(Stream {
        written,
        seconds,
        syncs: end.generation() - before.generation(),
        markers: done,
        drain_s: end.last_sync_s - stopped,
    })
}

/// Markers programmed since the last look: the time each took.
fn record_markers(lab: &mut Lab, n: usize, markers: &[(usize, f64)], done: &mut Vec<f64>) -> Result<()> {
    let now = lab.syncs()?;
    let programmed = (now.frontends as usize).saturating_sub(n);
    while done.len() < programmed.min(markers.len()) {
        let (_, written) = markers[done.len()];
        done.push((now.last_sync_s - written).max(0.0));
    }
    Ok(())
}

fn measure_cluster(plan: &Plan, n: usize, row: &mut Row) -> Result<()> {
    let all = services(n);
    let mut lab = lab("cpc", n)?;
    let api = FakeApi::start(Some(&lab.node))?;
    api.apply(json!({
        "kind": "Node",
        "metadata": {"name": lab.node},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.2"}]},
    }))?;
    for s in &all {
        api.apply(service_json(s))?;
        api.apply(slice_json(s))?;
    }
    let kubeconfig = lab.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let t0 = unix_now();
    lab.start_cluster_agent(&kubeconfig)?;
    let ready = wait(&mut lab, None, |s| s.frontends == n as u64, Duration::from_secs(600))?;
    row.cold_start_s = Some(ready.last_sync_s - t0);
    row.rss_mib = lab.agent_pid().and_then(rss_mib);
    std::thread::sleep(if plan.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(2)
    });
    let changes = if plan.quick { 10 } else { CHANGES };
    for k in 0..changes {
        let s = changed(&all[k % CHURN], k);
        let apply = || api.apply(slice_json(&s)).map(drop);
        row.push(one_change(&mut lab, apply)?);
    }
    let mut change = |k: usize| api.apply(slice_json(&changed(&all[k % CHURN], k))).map(drop);
    let mut add_marker = |m: usize| {
        let s = marker(n, m);
        api.apply(slice_json(&s))?;
        api.apply(service_json(&s)).map(drop)
    };
    row.stream = Some(stream(plan, &mut lab, n, &mut change, &mut add_marker)?);
    row.rss_after_mib = lab.agent_pid().and_then(rss_mib);
    Ok(())
}

/// One change: its time inside the agent (and the metric that says so) and
/// end to end.
struct Change {
    inside: Option<(f64, &'static str)>,
    end_to_end: f64,
}

impl Row {
    fn push(&mut self, c: Change) {
        if let Some((_, metric)) = c.inside {
            self.inside_metric = metric;
        }
        self.changes.push((c.inside.map(|(s, _)| s), c.end_to_end));
    }
}

/// One change, timed inside the agent and end to end.
fn one_change(lab: &mut Lab, change: impl FnOnce() -> Result<()>) -> Result<Change> {
    let before_text = lab.agent_metrics()?;
    let before = Syncs::parse(&before_text)?;
    let from = unix_now();
    change()?;
    let done = wait(lab, Some(before), |_| true, Duration::from_secs(60))?;
    let after_text = lab.agent_metrics()?;
    let inside = [PROGRAMMING, SYNC_DURATION].into_iter().find_map(|name| {
        let (s0, c0) = histogram(&before_text, name)?;
        let (s1, c1) = histogram(&after_text, name)?;
        (c1 > c0).then(|| ((s1 - s0) / (c1 - c0) as f64, name))
    });
    Ok(Change {
        inside,
        end_to_end: (done.last_sync_s - from).max(0.0),
    })
}

/// Polls `/metrics/agent` every 20 ms until a sync that wrote (since
/// `before`, if given) shows `cond`.
fn wait(lab: &mut Lab, before: Option<Syncs>, cond: impl Fn(&Syncs) -> bool, timeout: Duration) -> Result<Syncs> {
    let started = Instant::now();
    loop {
        let last = match lab.syncs() {
            Ok(now) if now.writes > before.map_or(0, |b| b.writes) && cond(&now) => return Ok(now),
            Ok(now) => format!("{now:?}"),
            Err(e) => format!("{e:#}"),
        };
        lab.check_alive()?;
        if started.elapsed() > timeout {
            bail!("ferry agent: not programmed within {timeout:?} (last seen: {last})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn service_json(s: &Service) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| json!({"name": p.name, "port": p.port, "targetPort": p.target_port, "protocol": p.protocol.upper()}))
        .collect();
    json!({
        "kind": "Service",
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": {"clusterIP": s.cluster_ip.to_string(), "ports": ports},
    })
}

fn slice_json(s: &Service) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| json!({"name": p.name, "port": p.target_port, "protocol": p.protocol.upper()}))
        .collect();
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-bench", s.name), "namespace": s.namespace,
                     "labels": {"kubernetes.io/service-name": s.name}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// p50 and p99 of `v` (nearest rank), in milliseconds.
fn p50_p99_ms(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1] * 1000.0;
    Some((rank(0.50), rank(0.99)))
}

fn print_row(r: &Row) {
    let ms = |v: Option<(f64, f64)>| v.map_or("-".into(), |(a, b)| format!("p50 {a:.2} ms, p99 {b:.2} ms"));
    let inside: Vec<f64> = r.changes.iter().filter_map(|c| c.0).collect();
    let e2e: Vec<f64> = r.changes.iter().map(|c| c.1).collect();
    println!(
        "bench:   cold start {}, RSS {}; one endpoint change inside the agent {}, end to end {}",
        r.cold_start_s.map_or("-".into(), |s| format!("{s:.2} s")),
        r.rss_mib.map_or("-".into(), |m| format!("{m:.0} MiB")),
        ms(p50_p99_ms(&inside)),
        ms(p50_p99_ms(&e2e)),
    );
}

fn markdown(plan: &Plan, rows: &[Row]) -> String {
    let mut md = String::from("# Ferry control-plane benchmark\n\n");
    md.push_str(&format!(
        "{} build; N Services of {ENDPOINTS} endpoints each (fake addresses, no traffic); {} single endpoint changes per row, \
         one at a time; `inside` is the agent's own histogram ({PROGRAMMING}, or {SYNC_DURATION} where the agent lacks it: \
         see the column), `end to end` is file written / object applied → the agent's completion stamp (polled every 20 ms).\n\n",
        plan.profile,
        if plan.quick { 10 } else { CHANGES },
    ));
    md.push_str("| mode | N | cold start | RSS after start | RSS after changes | one change inside p50 / p99 | end to end p50 / p99 | measured by |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---|\n");
    let ms = |v: Option<(f64, f64)>| v.map_or("-".into(), |(a, b)| format!("{a:.2} / {b:.2} ms"));
    let mib = |m: Option<f64>| m.map_or("-".into(), |m| format!("{m:.0} MiB"));
    for r in rows {
        let inside: Vec<f64> = r.changes.iter().filter_map(|c| c.0).collect();
        let e2e: Vec<f64> = r.changes.iter().map(|c| c.1).collect();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.mode,
            r.n,
            r.cold_start_s.map_or("-".into(), |s| format!("{s:.2} s")),
            mib(r.rss_mib),
            mib(r.rss_after_mib),
            ms(p50_p99_ms(&inside)),
            ms(p50_p99_ms(&e2e)),
            if r.inside_metric.is_empty() {
                "-"
            } else {
                r.inside_metric
            },
        ));
    }
    md.push_str("\n## Sustained endpoint changes\n\n");
    md.push_str("| mode | N | changes written | rate | syncs | changes per sync | marker p50 / p99 under load | drain after the stream |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        if let Some(s) = &r.stream {
            md.push_str(&format!(
                "| {} | {} | {} | {:.0}/s | {} | {:.1} | {} | {:.0} ms |\n",
                r.mode,
                r.n,
                s.written,
                s.written as f64 / s.seconds,
                s.syncs,
                s.written as f64 / s.syncs.max(1) as f64,
                ms(p50_p99_ms(&s.markers)),
                s.drain_s * 1000.0,
            ));
        }
    }
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|r| r.notes.iter().map(move |n| format!("- {} N={}: {n}", r.mode, r.n)))
        .collect();
    if !notes.is_empty() {
        md.push_str("\n## Notes\n\n");
        md.push_str(&notes.join("\n"));
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(|i| f64::from(i) / 1000.0).collect();
        assert_eq!(p50_p99_ms(&v), Some((50.0, 99.0)));
        assert_eq!(p50_p99_ms(&[0.002]), Some((2.0, 2.0)));
        assert_eq!(p50_p99_ms(&[]), None);
    }

    #[test]
    fn maps_are_sized_for_every_frontend_and_slot() {
        let a = map_size_args(100_000, ENDPOINTS);
        let services: usize = a[1].parse().unwrap();
        let backends: usize = a[3].parse().unwrap();
        assert!(services >= 100_000 * 11, "{services}");
        assert!(backends >= 100_000 * 10, "{backends}");
        assert_eq!(map_size_args(10, ENDPOINTS)[1], "262144");
    }

    #[test]
    fn changed_endpoints_never_collide_with_the_fillers() {
        let n = SERVICES_MAX;
        let last_filler = FAKE_ENDPOINT_BASE + (n * ENDPOINTS) as u32;
        assert!(NEW_ENDPOINT_BASE > last_filler);
        let s = &services(3)[2];
        assert_eq!(changed(s, 7).endpoints[0], Ipv4Addr::from(NEW_ENDPOINT_BASE + 7));
        assert_eq!(changed(s, 7).endpoints[1..], s.endpoints[1..]);
    }
}
