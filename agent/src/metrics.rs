//! Prometheus metrics (text format, kube-proxy's names where there is one):
//! sync latency, outcome and generation, what is programmed, and, read from the
//! pinned maps at each scrape, connection-tracking use and the dataplane's
//! counters.
//!
//! `/metrics` serves everything; `/metrics/agent` only what the agent keeps in
//! memory (no map is read), cheap enough to poll: tests and the benchmark wait
//! on its sync counters instead of reading the log.
use std::{
    path::PathBuf,
    sync::atomic::AtomicU64,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ferry_common::{Counter as DpCounter, CounterKind};
use hyper::StatusCode;
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};

use crate::{
    admin::Reply,
    ids::{self, FrontendId},
    maps::kernel,
};

type Labels = Vec<(String, String)>;

/// The agent's metrics. Shared (`Arc`) by the sync loop, the watchers and the
/// metrics server.
#[derive(Debug)]
pub struct Metrics {
    /// What the agent keeps in memory (`/metrics/agent`).
    registry: Registry,
    /// What is read from the pinned maps at scrape time (in `/metrics` only).
    dataplane: Registry,
    sync_duration: Histogram,
    network_programming: Histogram,
    syncs: Family<Labels, Counter>,
    sync_writes: Counter,
    last_sync: Gauge<f64, AtomicU64>,
    services: Gauge,
    frontends: Gauge,
    backends: Gauge,
    input_errors: Gauge,
    not_programmed: Gauge,
    sync_errors: Family<Labels, Counter>,
    watch_errors: Family<Labels, Counter>,
    watch_failing: Family<Labels, Gauge>,
    attach_errors: Gauge,
}

/// What one successful sync programmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    pub input_errors: usize,
    /// Objects the sync could not write to the maps (a full map, ...).
    pub not_programmed: usize,
    /// The sync wrote to the maps (upserts or deletes); else it found them
    /// in step.
    pub wrote: bool,
}

/// What made the agent sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncTrigger {
    /// A change of the input (a file, an API object, a relist, the node's
    /// addresses); also the first sync.
    Change,
    /// The periodic full resync (`--sync-period-seconds`).
    Periodic,
}

impl SyncTrigger {
    pub const ALL: [SyncTrigger; 2] = [SyncTrigger::Change, SyncTrigger::Periodic];

    /// The `trigger` label.
    pub const fn label(self) -> &'static str {
        match self {
            SyncTrigger::Change => "change",
            SyncTrigger::Periodic => "periodic",
        }
    }
}

impl Metrics {
    /// `bpffs_dir`: where the dataplane's maps are pinned (read at each scrape);
    /// None leaves the dataplane metrics out (unit tests).
    pub fn new(bpffs_dir: Option<PathBuf>, ct: crate::ct::Sizes, gc: crate::ct::GcReport) -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "ferry_sync_proxy_rules_duration_seconds",
            "Time to translate the input and write the difference to the BPF maps",
            sync_duration.clone(),
        );
        // From 10 µs to 5 s: fine enough for sub-millisecond changes.
        let network_programming = Histogram::new(exponential_buckets(0.000_01, 2.0, 20));
        registry.register(
            "ferry_network_programming_duration_seconds",
            "Time from the agent receiving a change (a file-system event, a watch event) to the maps holding it, per \
             change-triggered sync; coalesced changes are timed from the earliest (kube-proxy's \
             network_programming_duration, measured inside the agent)",
            network_programming.clone(),
        );
        let syncs = Family::<Labels, Counter>::default();
        registry.register(
            "ferry_sync_proxy_rules",
            "Completed syncs, by what triggered them (change, periodic); their sum is the sync generation \
             (`ferry status`)",
            syncs.clone(),
        );
        for t in SyncTrigger::ALL {
            // Exposed as 0 before the first sync.
            let _ = syncs.get_or_create(&trigger_labels(t));
        }
        let sync_writes = Counter::default();
        registry.register(
            "ferry_sync_proxy_rules_writes",
            "Completed syncs that wrote to the maps (the \"maps synced\" log line)",
            sync_writes.clone(),
        );
        let last_sync = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "ferry_sync_proxy_rules_last_timestamp_seconds",
            "When the maps were last synced successfully (Unix time)",
            last_sync.clone(),
        );
        let services = Gauge::default();
        registry.register(
            "ferry_services",
            "Services with at least one frontend programmed",
            services.clone(),
        );
        let frontends = Gauge::default();
        registry.register(
            "ferry_frontends",
            "Frontends (address, port, protocol) programmed",
            frontends.clone(),
        );
        let backends = Gauge::default();
        registry.register(
            "ferry_backends",
            "Backend slots programmed, summed over frontends",
            backends.clone(),
        );
        let input_errors = Gauge::default();
        registry.register(
            "ferry_input_errors",
            "Objects (or fields) skipped because they are invalid, at the last sync",
            input_errors.clone(),
        );
        let not_programmed = Gauge::default();
        registry.register(
            "ferry_sync_not_programmed",
            "Objects (frontends, backends) the last sync could not write to the maps, e.g. a full map; the rest was written",
            not_programmed.clone(),
        );
        let sync_errors = Family::<Labels, Counter>::default();
        registry.register("ferry_sync_errors", "Syncs that failed, by reason", sync_errors.clone());
        let watch_errors = Family::<Labels, Counter>::default();
        registry.register(
            "ferry_watch_errors",
            "Failed list/watch calls to the API server, by resource (retried with backoff)",
            watch_errors.clone(),
        );
        let watch_failing = Family::<Labels, Gauge>::default();
        registry.register(
            "ferry_watch_failing",
            "1 while the list/watch of a resource is failing (the maps keep serving the last good state), else 0",
            watch_failing.clone(),
        );
        let attach_errors = Gauge::default();
        registry.register(
            "ferry_attach_errors",
            "Programs that failed to attach at the last attach pass (retried every 2 s)",
            attach_errors.clone(),
        );
        let mut dataplane = Registry::default();
        if let Some(dir) = bpffs_dir {
            dataplane.register_collector(Box::new(crate::status::MapFillCollector { dir: dir.clone() }));
            dataplane.register_collector(Box::new(DataplaneCollector { dir, ct, gc }));
        }
        Self {
            registry,
            dataplane,
            sync_duration,
            network_programming,
            syncs,
            sync_writes,
            last_sync,
            services,
            frontends,
            backends,
            input_errors,
            not_programmed,
            sync_errors,
            watch_errors,
            watch_failing,
            attach_errors,
        }
    }

    /// Whether the list/watch of `resource` is failing now.
    pub fn set_watch_failing(&self, resource: &str, failing: bool) {
        self.watch_failing
            .get_or_create(&vec![("resource".into(), resource.into())])
            .set(i64::from(failing));
    }

    /// Attach errors of the last attach pass.
    pub fn set_attach_errors(&self, n: usize) {
        self.attach_errors.set(n as i64);
    }

    /// A completed sync: the maps hold all the input but `p.not_programmed`.
    pub fn sync_ok(&self, took: Duration, trigger: SyncTrigger, p: Programmed) {
        self.sync_duration.observe(took.as_secs_f64());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_sync.set(now.as_secs_f64());
        self.services.set(p.services as i64);
        self.frontends.set(p.frontends as i64);
        self.backends.set(p.backends as i64);
        self.input_errors.set(p.input_errors as i64);
        self.not_programmed.set(p.not_programmed as i64);
        if p.wrote {
            self.sync_writes.inc();
        }
        // Counted last, once everything else of this sync is set.
        self.syncs.get_or_create(&trigger_labels(trigger)).inc();
    }

    /// A change-triggered sync wrote the maps `took` after the earliest
    /// change it covers was received.
    pub fn network_programmed(&self, took: Duration) {
        self.network_programming.observe(took.as_secs_f64());
    }

    /// reason: `map_write`, `not_programmed` (a sync that wrote all but some
    /// objects), ...
    pub fn sync_error(&self, reason: &str) {
        self.sync_errors
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    pub fn watch_error(&self, resource: &str) {
        self.watch_errors
            .get_or_create(&vec![("resource".into(), resource.into())])
            .inc();
    }

    /// The text exposition: everything (`/metrics`).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = self.encode_agent()?;
        prometheus_text::encode(&mut out, &self.dataplane)?;
        Ok(out)
    }

    /// Only what the agent keeps in memory (`/metrics/agent`): no map is read.
    pub fn encode_agent(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The route of the metrics port.
    pub fn route(&self, path: &str) -> Reply {
        let body = match path {
            "/metrics" => self.encode(),
            "/metrics/agent" => self.encode_agent(),
            _ => return Reply::text(StatusCode::NOT_FOUND, "not found\n"),
        };
        match body {
            Ok(body) => Reply {
                status: StatusCode::OK,
                content_type: prometheus_text::CONTENT_TYPE,
                body,
            },
            Err(e) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }
}

fn trigger_labels(t: SyncTrigger) -> Labels {
    vec![("trigger".into(), t.label().into())]
}

/// Reads the pinned maps at scrape time: the per-CPU counters (summed) and
/// per-frontend stats, which live in the kernel and survive agent restarts;
/// and connection-tracking use as the garbage collector last counted it
/// (walking a table of a million entries on every scrape is not an option).
#[derive(Debug)]
struct DataplaneCollector {
    dir: PathBuf,
    ct: crate::ct::Sizes,
    gc: crate::ct::GcReport,
}

/// A gauge or counter family with one `table` label per connection-tracking
/// table.
fn encode_per_table(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: [u64; 2],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (table, v) in ["tcp", "any"].into_iter().zip(values) {
        let labels: Labels = vec![("table".into(), table.into())];
        ConstGauge::new(v as i64).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_per_table(
            &mut encoder,
            "ferry_conntrack_max",
            "Size of each connection-tracking table (--ct-map-size: tcp, --ct-any-map-size: any)",
            [u64::from(self.ct.tcp), u64::from(self.ct.any)],
        )?;
        let gc = *self.gc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(gc) = gc {
            encode_per_table(
                &mut encoder,
                "ferry_conntrack_entries",
                "Connection-tracking entries in use (two per flow), as the garbage collector last counted them",
                [gc.tcp_entries, gc.any_entries],
            )?;
            let m = encoder.encode_descriptor(
                "ferry_conntrack_gc_deleted",
                "Connection-tracking entries of dead flows the garbage collector deleted",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(gc.deleted).encode(m)?;
            let m = encoder.encode_descriptor(
                "ferry_conntrack_gc_runs",
                "Garbage collector runs",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(gc.runs).encode(m)?;
            let m = encoder.encode_descriptor(
                "ferry_conntrack_gc_duration_seconds",
                "How long the last garbage collector run took",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::<f64>::new(gc.last_duration.as_secs_f64()).encode(m)?;
        }
        match kernel::read_svc_stats(&self.dir) {
            Ok(mut stats) => {
                stats.sort_by(|a, b| a.0.cmp(&b.0));
                for (name, help, pick) in [
                    (
                        "ferry_service_packets",
                        "Packets sent to a frontend and translated, by frontend",
                        (|s: &ferry_common::SvcStats| s.packets) as fn(&_) -> u64,
                    ),
                    (
                        "ferry_service_bytes",
                        "Bytes (at TC ingress) sent to a frontend and translated, by frontend",
                        |s: &ferry_common::SvcStats| s.bytes,
                    ),
                ] {
                    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                    for (frontend, st) in &stats {
                        let labels = frontend_labels(frontend.as_ref());
                        ConstCounter::new(pick(st)).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
            Err(e) => tracing::debug!("metrics: reading the service stats map: {e}"),
        }
        let counters = match kernel::read_counters(&self.dir) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("metrics: reading the counters map: {e}");
                return Ok(());
            }
        };
        let value = |c: DpCounter| counters.get(c as usize).copied().unwrap_or(0);
        for (name, help, label, kind) in [
            (
                "ferry_drops",
                "Packets the dataplane dropped, by reason",
                "reason",
                CounterKind::Drop,
            ),
            (
                "ferry_packets",
                "Packets the dataplane handled, by what it did",
                "kind",
                CounterKind::Packet,
            ),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for c in DpCounter::ALL.iter().filter(|c| c.kind() == kind) {
                let labels: Labels = vec![(label.into(), c.name().into())];
                ConstCounter::new(value(*c)).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A frontend's labels: its Service (`namespace/name`) and port (name, or
/// number when unnamed); empty when the names map has no entry for it.
fn frontend_labels(id: Option<&FrontendId>) -> Labels {
    let (service, port) = ids::service_and_port(id);
    vec![("service".into(), service), ("port".into(), port)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{FrontendKind, PortId, ServiceId};

    #[test]
    fn exposition_has_kube_proxy_style_names() {
        let m = Metrics::new(None, crate::ct::Sizes { tcp: 1024, any: 512 }, Default::default());
        let before = m.encode().unwrap();
        for want in [
            "ferry_sync_proxy_rules_total{trigger=\"change\"} 0",
            "ferry_sync_proxy_rules_total{trigger=\"periodic\"} 0",
            "ferry_sync_proxy_rules_writes_total 0",
        ] {
            assert!(
                before.contains(want),
                "missing {want:?} before the first sync in\n{before}"
            );
        }
        let p = Programmed {
            services: 2,
            frontends: 3,
            backends: 7,
            input_errors: 1,
            not_programmed: 2,
            wrote: true,
        };
        m.sync_ok(Duration::from_millis(3), SyncTrigger::Change, p);
        m.sync_ok(
            Duration::from_millis(1),
            SyncTrigger::Periodic,
            Programmed { wrote: false, ..p },
        );
        m.sync_ok(
            Duration::from_millis(1),
            SyncTrigger::Change,
            Programmed { wrote: false, ..p },
        );
        m.network_programmed(Duration::from_micros(250));
        m.network_programmed(Duration::from_micros(750));
        m.sync_error("map_write");
        m.watch_error("services");
        let text = m.encode().unwrap();
        for want in [
            "ferry_sync_proxy_rules_duration_seconds_count 3",
            "ferry_network_programming_duration_seconds_count 2",
            "ferry_network_programming_duration_seconds_sum 0.001",
            "ferry_network_programming_duration_seconds_bucket{le=\"0.00032\"} 1",
            "ferry_sync_proxy_rules_total{trigger=\"change\"} 2",
            "ferry_sync_proxy_rules_total{trigger=\"periodic\"} 1",
            "ferry_sync_proxy_rules_writes_total 1",
            "ferry_services 2",
            "ferry_frontends 3",
            "ferry_backends 7",
            "ferry_input_errors 1",
            "ferry_sync_not_programmed 2",
            "ferry_sync_errors_total{reason=\"map_write\"} 1",
            "ferry_watch_errors_total{resource=\"services\"} 1",
            "# TYPE ferry_sync_proxy_rules_last_timestamp_seconds gauge",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert_eq!(m.route("/metrics").status, StatusCode::OK);
        assert_eq!(m.route("/metrics/agent").body, m.encode_agent().unwrap());
        let web = FrontendId {
            service: ServiceId::new("default", "web"),
            port: PortId::Name("http".into()),
            kind: FrontendKind::ClusterIP,
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            frontend_labels(Some(&web)),
            [pair("service", "default/web"), pair("port", "http")]
        );
        assert_eq!(frontend_labels(None), [pair("service", ""), pair("port", "")]);
        assert_eq!(m.route("/x").status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_agent_path_reads_no_map() {
        let dir = std::env::temp_dir().join(format!("ferry-metrics-no-pins-{}", std::process::id()));
        let m = Metrics::new(Some(dir), crate::ct::Sizes { tcp: 1024, any: 512 }, Default::default());
        let all = m.encode().unwrap();
        let agent = m.encode_agent().unwrap();
        assert!(all.contains("ferry_conntrack_max{table=\"tcp\"} 1024"), "{all}");
        assert!(!agent.contains("ferry_conntrack_max"), "{agent}");
        assert!(agent.contains("ferry_sync_proxy_rules_writes_total 0"), "{agent}");
        assert!(all.starts_with(&agent));
    }
}
