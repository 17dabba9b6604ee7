//! The agent loop, one code path for both sources: a source (manifests + Pod
//! status files, or the Kubernetes API) produces an `Input`; the Programmer
//! translates it and writes the difference to the maps; health and metrics
//! report how that goes; from_pod is attached to every Pod veth.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use ferry_common::FRONTEND_ADDRS_MAP;
use futures::StreamExt as _;
use rtnetlink::MulticastGroup;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    admin::{self, Health},
    dataplane::{self, Dataplane},
    ids::ServiceId,
    incremental::Translated,
    maps::{
        gate::{tracked_frontends, Gate, GateMaps},
        kernel::KernelMaps,
        layout::{Ids, Layout},
        sync::Syncer,
    },
    metrics::{Metrics, Programmed, SyncTrigger},
    sources::{cluster, manifests, watch, Changed, Changes, Input},
    status::report::{detect_features, unix_now, AgentReport, AttachError, Reporter, WatchState},
    translate,
};

/// Where the objects come from.
#[derive(Clone, Debug)]
pub enum Mode {
    /// `--manifests DIR`: YAML files plus the shim's Pod status files.
    Standalone { manifests: PathBuf, state_dir: PathBuf },
    /// The Kubernetes API (in-cluster, or `--kubeconfig`).
    Cluster { kubeconfig: Option<PathBuf> },
}

/// Everything `ferry agent` needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub node: String,
    pub devices: Vec<String>,
    /// `--xdp` / `--xdp-mode`: XDP on the devices too (None: TC only).
    pub xdp: Option<dataplane::XdpAttach>,
    /// `--nodeport-addresses` (empty: the devices' addresses).
    pub nodeport_cidrs: Vec<ipnet::IpNet>,
    /// The cgroup v2 directory the socket load balancer is attached to (None:
    /// not attached).
    pub cgroup: Option<PathBuf>,
    /// `--socket-lb-pods`: the socket load balancer serves Pods' sockets too.
    pub socket_lb_pods: bool,
    /// `--socket-lb-skip-netns`: network namespaces it leaves to the TC path.
    pub socket_lb_skip: Vec<PathBuf>,
    pub translate: translate::Config,
    pub dataplane: dataplane::Config,
    /// Connection-tracking lifetimes and the SNAT port range.
    pub ct: dataplane::CtConfig,
    /// A sync happens at most this long after the first change of a burst.
    pub debounce: Duration,
    /// Full resync period (re-translate; writes only if something differs).
    pub sync_period: Duration,
    /// /healthz fails when the last successful sync is older than this.
    pub healthz_timeout: Duration,
    /// None: not served.
    pub healthz_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// Where `ferry status` finds the agent's report (None: not written).
    pub status_file: Option<PathBuf>,
    /// What to do about kube-proxy's rules found at start.
    pub kube_proxy_rules: crate::kubeproxy::KubeProxyRules,
}

/// The sync side: input → maps.
struct Programmer {
    syncer: Syncer<KernelMaps>,
    layout: Layout,
    /// The last translation, by Service.
    translated: Translated,
    /// What the last translation read besides the objects: a change of
    /// these needs a full translation.
    translated_from: Option<(Vec<ferry_podstate::PodRecord>, Vec<IpAddr>)>,
    /// Errors reported last time (each is logged once, when it appears).
    reported: BTreeSet<String>,
    /// What the last sync could not write to the maps (logged the same way).
    not_programmed: BTreeSet<String>,
    /// ClusterIPs allocated last time (logged when they change).
    allocated: BTreeMap<ServiceId, Vec<IpAddr>>,
    /// The Services with frontends of a family the dataplane does not serve,
    /// as last named (each is warned about once, when it appears).
    not_served: BTreeSet<String>,
    /// The node's addresses and pod CIDRs last time (logged when they change).
    node: Option<crate::model::NodeInfo>,
    /// What translation needs: `--service-cluster-ip-range` and friends, and
    /// where NodePorts are served (`nodeport_addrs`, kept current from netlink
    /// and `--nodeport-addresses`).
    translate: translate::Config,
    /// healthCheckNodePort servers, matched to each translation.
    health_checks: crate::health_check_nodeport::HealthCheckServers,
    /// from_pod's frontend gate (None: could not be opened; the programs
    /// then look every destination up).
    gate: Option<(Gate, GateMaps)>,
    /// The gate overflowed its map (logged once).
    gate_overflow: bool,
}

impl Programmer {
    /// `after_change`: the sync follows an input change (or a relist), so a no-op
    /// is worth an info line; periodic resyncs log it at debug.
    /// `loaded`: how long reading the source took (logged with the phases).
    /// `reload`: the whole input, when `input` is partial and a full
    /// translation is needed after all.
    /// `pre`: the full translation of `input`, made off the loop (the
    /// periodic resync, [`Resync`]); when it gives what the maps were laid
    /// out from, nothing is laid out or written.
    fn sync(
        &mut self,
        input: Input,
        after_change: bool,
        loaded: Duration,
        reload: impl FnOnce() -> Option<Input>,
        pre: Option<Translated>,
    ) -> Programmed {
        let started = Instant::now();
        let Input {
            mut snapshot,
            mut errors,
            delta,
            partial,
        } = input;
        let mut same_facts = snapshot.node == self.node;
        if !same_facts {
            if let Some(n) = &snapshot.node {
                tracing::info!(node = %n.name, addresses = ?n.addresses, pod_cidrs = ?n.pod_cidrs, "node");
            }
            self.node = snapshot.node.clone();
        }
        // Only what changed, when the source says what did (not in the
        // periodic resync: it repairs whatever drifted), the maps held
        // everything the last layout wanted, and nothing else translation
        // reads changed; else everything.
        same_facts &= self
            .translated_from
            .as_ref()
            .is_some_and(|(pods, np)| *pods == snapshot.pods && *np == self.translate.nodeport_addrs);
        let unchanged = pre
            .as_ref()
            .is_some_and(|t| self.not_programmed.is_empty() && self.translated.same_result(t));
        let changed = delta
            .filter(|_| after_change && same_facts && self.not_programmed.is_empty())
            .and_then(|d| self.translated.update(&snapshot.pods, &d, &self.translate));
        let incremental = changed.is_some();
        if !incremental {
            if partial {
                let Some(whole) = reload() else {
                    tracing::warn!(
                        "the input could not be read whole; the maps keep their contents until the next sync"
                    );
                    return self.programmed(self.reported.len(), false);
                };
                (snapshot, errors) = (whole.snapshot, whole.errors);
            }
            match pre {
                Some(t) => self.translated = t,
                None => {
                    self.translated.full(&snapshot, &self.translate);
                }
            }
            self.translated_from = Some((snapshot.pods.clone(), self.translate.nodeport_addrs.clone()));
        }
        let translated = started.elapsed();
        let errors: BTreeSet<String> = errors
            .iter()
            .chain(self.translated.errors())
            .map(ToString::to_string)
            .collect();
        report_changes(&self.reported, &errors);
        let input_errors = errors.len();
        self.reported = errors;
        if !incremental {
            for (svc, ips) in &self.translated.allocated {
                if self.allocated.get(svc) != Some(ips) {
                    for ip in ips {
                        tracing::info!(service = %svc, cluster_ip = %ip, "allocated a ClusterIP (spec.clusterIP unset)");
                    }
                }
            }
            self.allocated = self.translated.allocated.clone();
        }
        // The notices name frontend keys only, which an incremental update
        // keeps (it is taken only then).
        if !incremental {
            let not_served: BTreeSet<String> =
                translate::not_served_notices(self.translated.not_served_iter(), self.translate.families)
                    .into_iter()
                    .collect();
            for n in not_served.difference(&self.not_served) {
                tracing::warn!("{n}");
            }
            for n in self.not_served.difference(&not_served) {
                tracing::info!("no longer unserved: {n}");
            }
            self.not_served = not_served;
        }
        self.health_checks.reconcile(&self.translated.health_checks);
        if unchanged {
            // Addresses that stopped being frontends leave the gate in time.
            self.sync_gate(self.translated.frontend_addrs());
            tracing::debug!(
                total_ms = started.elapsed().as_millis() as u64,
                "periodic resync: the translation made off the loop is unchanged; nothing laid out or written"
            );
            return self.programmed(input_errors, false);
        }
        let laid_out = Instant::now();
        let st = match changed {
            Some(c) => {
                let scope = self.layout.update(&c.old, &c.new);
                let layout_took = laid_out.elapsed();
                (self.syncer.sync_scoped(self.layout.desired(), &scope), layout_took)
            }
            None => {
                self.layout.full(&self.translated.frontends());
                let layout_took = laid_out.elapsed();
                (self.syncer.sync(self.layout.desired()), layout_took)
            }
        };
        let (st, layout_took) = st;
        tracing::debug!(
            incremental,
            load_us = loaded.as_micros() as u64,
            translate_us = translated.as_micros() as u64,
            layout_us = layout_took.as_micros() as u64,
            sync_us = st.duration.as_micros() as u64,
            "sync phases"
        );
        // An incremental sync keeps every frontend's address (it is taken
        // only when the touched Services keep their frontend keys).
        if !incremental {
            self.sync_gate(self.translated.frontend_addrs());
        }
        let failed: BTreeSet<String> = st.failed.iter().map(ToString::to_string).collect();
        report_changes(&self.not_programmed, &failed);
        self.not_programmed = failed;
        let (frontends, backends, _) = self.translated.counts();
        if st.upserts + st.deletes > 0 {
            tracing::info!(
                frontends,
                backends,
                upserts = st.upserts,
                deletes = st.deletes,
                forgotten_udp_ct = st.forgotten.ct,
                forgotten_affinity = st.forgotten.affinity,
                write_us = st.duration.as_micros() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                "maps synced"
            );
        } else if after_change {
            tracing::info!(
                upserts = 0,
                deletes = 0,
                total_ms = started.elapsed().as_millis() as u64,
                "maps already in sync, nothing written"
            );
        } else {
            tracing::debug!(
                upserts = 0,
                deletes = 0,
                total_ms = started.elapsed().as_millis() as u64,
                "maps already in sync, nothing written"
            );
        }
        self.programmed(input_errors, st.upserts + st.deletes > 0)
    }

    /// What the maps hold now.
    fn programmed(&self, input_errors: usize, wrote: bool) -> Programmed {
        let (frontends, backends, services) = self.translated.counts();
        Programmed {
            services,
            frontends,
            backends,
            input_errors,
            not_programmed: self.not_programmed.len(),
            wrote,
        }
    }
}

impl Programmer {
    /// Tells from_pod which destinations may be frontends (`maps::gate`).
    fn sync_gate(&mut self, frontends: Vec<IpAddr>) {
        let Some((gate, maps)) = &mut self.gate else {
            return;
        };
        let written = maps.held().and_then(|held| {
            let plan = gate.plan(&held, frontends, Instant::now());
            if plan.overflow != self.gate_overflow {
                if plan.overflow {
                    tracing::warn!(
                        addresses = plan.addrs.len(),
                        "more frontend addresses outside --service-cluster-ip-range than {FRONTEND_ADDRS_MAP} holds: from_pod looks every destination up"
                    );
                }
                self.gate_overflow = plan.overflow;
            }
            maps.write(&held, &plan)
        });
        if let Err(e) = written {
            tracing::warn!("writing {FRONTEND_ADDRS_MAP} (from_pod's frontend gate): {e}");
        }
    }
}

/// Opens from_pod's frontend gate. A gate that was never on (a fresh map,
/// or pins of a version without it) first keeps the frontends of the flows
/// already tracked. None (with a warning) if the pins cannot be read: the
/// gate then stays as it is, off unless an earlier agent turned it on.
fn open_gate(cfg: &Config) -> Option<(Gate, GateMaps)> {
    let dir = &cfg.dataplane.bpffs_dir;
    let maps = match GateMaps::open(dir) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("from_pod's frontend gate: {e}");
            return None;
        }
    };
    // from_pod sees IPv4 packets only: the IPv4 range is its gate's.
    let cidr = cfg.translate.service_cidrs.v4;
    let c = &cfg.ct;
    let linger = [
        c.timeout_tcp_syn,
        c.timeout_tcp,
        c.timeout_tcp_close,
        c.timeout_udp,
        c.timeout_udp_stream,
    ]
    .into_iter()
    .max()
    .unwrap_or_default();
    let mut gate = Gate::new(cidr, linger);
    match maps.is_on() {
        Ok(true) => {}
        Ok(false) => match crate::maps::kernel::read_ct(dir) {
            Ok(flows) => gate.linger_from(tracked_frontends(&flows), Instant::now()),
            Err(e) => {
                tracing::warn!("from_pod's frontend gate stays off: reading the tracked flows: {e}");
                return None;
            }
        },
        Err(e) => {
            tracing::warn!("from_pod's frontend gate: {e}");
            return None;
        }
    }
    Some((gate, maps))
}

/// Logs the messages of `now` that were not in `before` (at error), and says
/// which of `before` are resolved: each problem is logged once, when it appears.
fn report_changes(before: &BTreeSet<String>, now: &BTreeSet<String>) {
    for e in now.difference(before) {
        tracing::error!("{e}");
    }
    for e in before.difference(now) {
        tracing::info!("resolved: {e}");
    }
}

/// The periodic resync's translation, running on a blocking thread: the
/// whole input translated as a full sync would, without holding up the
/// change-driven syncs meanwhile (about 100 ms at 10,000 Services).
struct Resync {
    /// The loop's sync count when it started: if another sync ran since,
    /// what it made is stale and dropped.
    generation: u64,
    started: Instant,
    job: tokio::task::JoinHandle<(Input, Translated)>,
}

/// A resync's translation, made off the loop, with the input it is of.
struct Resynced {
    input: Input,
    fresh: Translated,
    loaded: Duration,
}

/// Resyncs dropped in a row (another sync ran while each translated) before
/// one runs on the loop.
const RESYNC_DROPS_MAX: u32 = 3;

impl Resync {
    fn start(input: Input, cfg: translate::Config, generation: u64) -> Self {
        let job = tokio::task::spawn_blocking(move || {
            let mut fresh = Translated::default();
            fresh.full(&input.snapshot, &cfg);
            (input, fresh)
        });
        Self {
            generation,
            started: Instant::now(),
            job,
        }
    }

    /// The running resync's result; never, while none runs.
    async fn done(job: &mut Option<Self>) -> Result<(Input, Translated), tokio::task::JoinError> {
        match job {
            Some(j) => (&mut j.job).await,
            None => std::future::pending().await,
        }
    }
}

/// Change-driven syncs are paced to at most one per PACING times the last
/// one's duration (see the main loop).
const PACING: u32 = 10;

/// After a change event that leaves a file incomplete (a creation, a write
/// not closed yet), wait this long for the writer to finish (an editor's
/// write is several events in a row; a closed write or a rename into place
/// is complete, and synced at once).
const QUIET: Duration = Duration::from_millis(5);

/// A running source.
enum Source {
    Standalone {
        manifests: PathBuf,
        state_dir: PathBuf,
        /// The watched directories and their fingerprint when last loaded.
        watched: Vec<PathBuf>,
        loaded: Arc<Mutex<Fingerprint>>,
        /// Parsed manifest files, re-parsed only when they change.
        cache: Mutex<manifests::DirCache>,
        _watcher: notify::RecommendedWatcher,
    },
    Cluster(cluster::Cluster),
}

type Fingerprint = Vec<(PathBuf, u64, Option<std::time::SystemTime>)>;

impl Source {
    async fn start(cfg: &Config, tx: Changes, metrics: Arc<Metrics>) -> Result<Self> {
        match &cfg.mode {
            Mode::Standalone { manifests, state_dir } => {
                let watched = vec![manifests.clone(), ferry_podstate::pods_dir(state_dir)];
                let watcher = watch::watch(&watched, tx.clone())?;
                let loaded = Arc::new(Mutex::new(Fingerprint::new()));
                // Safety net for missed inotify events: a cheap fingerprint,
                // compared with the one of the last load.
                let (dirs, last) = (watched.clone(), loaded.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(2));
                    loop {
                        tick.tick().await;
                        let now = watch::fingerprint(&dirs);
                        let changed = *last.lock().unwrap_or_else(|e| e.into_inner()) != now;
                        if changed && tx.send(Changed::now()).is_err() {
                            break;
                        }
                    }
                });
                Ok(Self::Standalone {
                    manifests: manifests.clone(),
                    state_dir: state_dir.clone(),
                    watched,
                    loaded,
                    cache: Mutex::new(manifests::DirCache::default()),
                    _watcher: watcher,
                })
            }
            Mode::Cluster { kubeconfig } => {
                let c = cluster::Cluster::start(
                    &cluster::Config {
                        kubeconfig: kubeconfig.clone(),
                        node: cfg.node.clone(),
                    },
                    tx,
                    metrics,
                )
                .await?;
                Ok(Self::Cluster(c))
            }
        }
    }

    /// The current input; None while the source is not ready (cluster mode
    /// before every initial list is done).
    /// `partial`: a change-triggered sync, which may take the snapshot's
    /// objects as the source last gave them when the change says which
    /// (then only the Pods are read and [`Input::partial`] is set).
    fn load(&self, partial: bool) -> Option<Input> {
        match self {
            Self::Standalone {
                manifests,
                state_dir,
                watched,
                loaded,
                cache,
                ..
            } => {
                // Before reading: a change during the read is seen again.
                *loaded.lock().unwrap_or_else(|e| e.into_inner()) = watch::fingerprint(watched);
                let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                let delta = cache.refresh(manifests);
                let mut m = match delta {
                    Some(d) if partial && d.is_endpoints_only() => Input {
                        errors: cache.errors(),
                        delta: Some(d),
                        partial: true,
                        ..Input::default()
                    },
                    delta => Input {
                        delta,
                        ..cache.assemble()
                    },
                };
                let (pods, pod_errors) = ferry_podstate::read_all(state_dir);
                for (path, e) in pod_errors {
                    tracing::debug!("skipping unreadable pod record {}: {e}", path.display());
                }
                m.snapshot.pods = pods;
                Some(m)
            }
            Self::Cluster(c) => c.load(partial),
        }
    }

    /// The input as the last load left it, without reading what changed
    /// since (that is the next change-driven sync's to read): what the
    /// periodic resync translates off the loop, so that the translation it
    /// makes is of what the maps were programmed from. None before a first
    /// whole load.
    fn cached(&self) -> Option<Input> {
        match self {
            Self::Standalone { state_dir, cache, .. } => {
                let cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                let mut m = cache.assemble();
                m.snapshot.pods = ferry_podstate::read_all(state_dir).0;
                Some(m)
            }
            Self::Cluster(c) => c.cached(),
        }
    }

    /// Cluster mode: the state of each watch.
    fn watch_states(&self) -> Vec<WatchState> {
        match self {
            Self::Standalone { .. } => Vec::new(),
            Self::Cluster(c) => c.watch_states(),
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Self::Standalone { .. } => "standalone",
            Self::Cluster(_) => "cluster",
        }
    }
}

/// Runs until SIGTERM/SIGINT. The programs and maps stay in place when it stops,
/// so traffic keeps flowing while the agent restarts.
pub async fn run(cfg: Config) -> Result<()> {
    // First of all: a second agent for the same pin directory stops here,
    // before it binds a port or touches a map or a link.
    dataplane::ensure_bpffs()?;
    let _pin_lock = crate::pinlock::acquire(&cfg.dataplane.bpffs_dir)?;
    let reporter = Reporter::new(cfg.status_file.clone(), initial_report(&cfg));
    crate::kubeproxy::check(cfg.kube_proxy_rules)?;
    let health = Arc::new(Health::new(cfg.healthz_timeout));
    let gc_report = crate::ct::GcReport::default();
    let metrics = Arc::new(Metrics::new(
        Some(cfg.dataplane.bpffs_dir.clone()),
        cfg.dataplane.ct,
        gc_report.clone(),
    ));
    // Bind first: a port in use is a startup error, not a silent gap.
    if let Some(addr) = cfg.healthz_addr {
        let (l, _) = admin::bind(addr, "health server (/healthz, /readyz, /livez)")
            .await
            .with_context(|| format!("binding --healthz-bind-address {addr}"))?;
        let h = health.clone();
        admin::spawn_server(l, move |p| h.route(p));
    }
    if let Some(addr) = cfg.metrics_addr {
        let (l, _) = admin::bind(addr, "metrics server (/metrics)")
            .await
            .with_context(|| format!("binding --metrics-bind-address {addr}"))?;
        let m = metrics.clone();
        admin::spawn_server(l, move |p| m.route(p));
    }

    // The source first: a bad kubeconfig or a missing in-cluster environment is
    // reported before anything touches the kernel. Changes queue up meanwhile.
    let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let source = Source::start(&cfg, tx.clone(), metrics.clone()).await?;

    let (mut dp, maps) = Dataplane::load(&cfg.dataplane)?;
    dp.set_ct_config(&cfg.ct)?;
    reporter.update(|r| r.tc_hook = Some(dp.tc_mode().hook().to_string()));
    dataplane::warn_if_snat_ports_are_ephemeral(cfg.ct.snat_ports);
    tokio::spawn(crate::ct::run_gc(
        cfg.dataplane.bpffs_dir.clone(),
        cfg.dataplane.ct,
        gc_report,
    ));
    let syncer = Syncer::new(maps).context("reading the pinned maps")?;
    let maglev = cfg.dataplane.maglev;
    let ids = Ids::from_contents(syncer.current(), maglev.table_size, maglev.tables);
    let mut prog = Programmer {
        syncer,
        layout: Layout::new(ids),
        translated: Translated::default(),
        translated_from: None,
        reported: BTreeSet::new(),
        not_programmed: BTreeSet::new(),
        allocated: BTreeMap::new(),
        not_served: BTreeSet::new(),
        node: None,
        translate: cfg.translate.clone(),
        health_checks: Default::default(),
        gate: open_gate(&cfg),
        gate_overflow: false,
    };

    let (conn, handle, mut link_events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])
    .context("netlink")?;
    tokio::spawn(conn);
    let mut node_addr = None;
    let outcomes = Outcomes {
        reporter: &reporter,
        metrics: &metrics,
        health: &health,
    };
    follow_links(&handle, &mut dp, &cfg, &mut prog, &mut node_addr, true, outcomes).await;
    if let Some(cg) = &cfg.cgroup {
        dp.attach_cgroup(cg, cfg.socket_lb_pods)?;
        refresh_sock_lb_skip(&mut dp, &cfg.socket_lb_skip, true);
    }
    // Only now that the new programs replaced the old ones (see there).
    dp.after_swap()?;

    tracing::info!(
        node = %cfg.node,
        mode = source.describe(),
        bpffs = %cfg.dataplane.bpffs_dir.display(),
        "ferry agent started"
    );
    // The first sync: at once in standalone mode; in cluster mode as soon as
    // every initial list is done (the watchers send a change then).
    let _ = tx.send(Changed::now());

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(cfg.sync_period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    let mut attach_tick = tokio::time::interval(Duration::from_secs(2));
    // When the first change of a pending burst arrived (and the earliest
    // receipt stamp among its changes), and when the last change-driven sync
    // ran, and how long it took. A change after a quiet spell syncs at once
    // (after QUIET, for the writer to finish); changes soon after a sync are
    // coalesced into one sync at the end of a window of PACING times that
    // sync's duration, `debounce` at most: the agent spends at most about
    // 1/PACING of its time on change-driven syncs under a storm of changes,
    // while a lone change (an incremental sync takes a millisecond or two)
    // waits for nothing, and none is delayed by more than `debounce`.
    let mut pending: Option<Pending> = None;
    let mut last_sync = tokio::time::Instant::now() - cfg.debounce;
    let mut last_took = Duration::ZERO;
    let mut waiting_logged = false;
    // The periodic resync translates on a blocking thread (`Resync`); what
    // it made is taken only if no other sync ran meanwhile (`generation`).
    let mut resync_job: Option<Resync> = None;
    let mut generation = 0u64;
    let mut resyncs_dropped = 0u32;
    loop {
        let window = (last_took * PACING).min(cfg.debounce);
        let deadline = pending.map(|p| p.due().max(last_sync + window));
        tokio::select! {
            Some(at) = changes.recv() => note_change(&mut pending, at),
            _ = sleep_until(deadline), if deadline.is_some() => {
                while let Ok(at) = changes.try_recv() {
                    note_change(&mut pending, at);
                }
                let since = pending.take().map(|p| p.earliest);
                last_sync = tokio::time::Instant::now();
                generation += 1;
                sync(&mut prog, &source, &health, &metrics, &reporter, &mut waiting_logged, since, None);
                last_took = last_sync.elapsed();
            }
            _ = resync.tick() => {
                if resync_job.is_some() {
                    continue;
                }
                if resyncs_dropped >= RESYNC_DROPS_MAX {
                    // Changes never let a resync made off the loop land: this
                    // one runs on the loop, as a safety net must.
                    resyncs_dropped = 0;
                    generation += 1;
                    sync(&mut prog, &source, &health, &metrics, &reporter, &mut waiting_logged, None, None);
                } else if let Some(input) = source.cached() {
                    resync_job = Some(Resync::start(input, prog.translate.clone(), generation));
                }
            }
            done = Resync::done(&mut resync_job) => {
                let job = resync_job.take();
                match (done, job) {
                    (Ok((input, fresh)), Some(job)) if job.generation == generation => {
                        resyncs_dropped = 0;
                        let loaded = job.started.elapsed();
                        let pre = Resynced { input, fresh, loaded };
                        sync(&mut prog, &source, &health, &metrics, &reporter, &mut waiting_logged, None, Some(pre));
                    }
                    (Ok(_), _) => resyncs_dropped += 1,
                    (Err(e), _) => {
                        tracing::warn!("the periodic resync's translation failed: {e}; resyncing on the loop");
                        generation += 1;
                        sync(&mut prog, &source, &health, &metrics, &reporter, &mut waiting_logged, None, None);
                    }
                }
            }
            Some(_) = link_events.next() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, link_events.next()).await {}
                if follow_links(&handle, &mut dp, &cfg, &mut prog, &mut node_addr, true, outcomes).await {
                    generation += 1;
                    note_change(&mut pending, Changed::now());
                }
            }
            _ = attach_tick.tick() => {
                if follow_links(&handle, &mut dp, &cfg, &mut prog, &mut node_addr, false, outcomes).await {
                    generation += 1;
                }
                if cfg.cgroup.is_some() && !cfg.socket_lb_skip.is_empty() {
                    refresh_sock_lb_skip(&mut dp, &cfg.socket_lb_skip, false);
                }
                let states = source.watch_states();
                for w in &states {
                    metrics.set_watch_failing(&w.resource, w.error.is_some());
                }
                health.api_failing(
                    states.iter().filter_map(|w| w.error.as_ref().map(|e| format!("{}: {e}", w.resource))).collect(),
                );
                reporter.update(|r| r.api = states);
                reporter.write_logged();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    reporter.remove();
    tracing::info!(
        "stopping; programs and maps stay pinned in {}",
        cfg.dataplane.bpffs_dir.display()
    );
    Ok(())
}

/// A burst of changes waiting for its sync.
#[derive(Clone, Copy)]
struct Pending {
    /// When its first change arrived.
    first: tokio::time::Instant,
    /// The earliest receipt stamp among its changes.
    earliest: Instant,
    /// Its last change was incomplete (a file being written): wait QUIET
    /// for the writer.
    unsettled: bool,
}

impl Pending {
    fn due(&self) -> tokio::time::Instant {
        if self.unsettled {
            self.first + QUIET
        } else {
            self.first
        }
    }
}

/// A change received: starts a pending burst, or joins the pending one
/// (which keeps its earliest stamp; its last change says whether to wait).
fn note_change(pending: &mut Option<Pending>, c: Changed) {
    match pending {
        Some(p) => {
            p.earliest = p.earliest.min(c.at);
            p.unsettled = !c.settled;
        }
        None => {
            *pending = Some(Pending {
                first: tokio::time::Instant::now(),
                earliest: c.at,
                unsettled: !c.settled,
            })
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One sync, with its outcome reported to the log, health and metrics.
/// `changed`: the sync follows changes, the earliest received then (None:
/// the periodic resync).
#[allow(clippy::too_many_arguments)]
fn sync(
    prog: &mut Programmer,
    source: &Source,
    health: &Health,
    metrics: &Metrics,
    reporter: &Reporter,
    waiting_logged: &mut bool,
    changed: Option<Instant>,
    pre: Option<Resynced>,
) {
    let after_change = changed.is_some();
    let started = Instant::now();
    let (input, fresh) = match pre {
        Some(r) => (Some(r.input), Some((r.fresh, r.loaded))),
        None => (source.load(after_change), None),
    };
    let Some(input) = input else {
        if let Source::Cluster(c) = source {
            if !*waiting_logged {
                tracing::info!(waiting_for = ?c.waiting_for(), "not syncing until every initial list is done");
                *waiting_logged = true;
            }
        }
        return;
    };
    let (fresh, loaded) = match fresh {
        Some((t, loaded)) => (Some(t), loaded),
        None => (None, started.elapsed()),
    };
    let p = prog.sync(input, after_change, loaded, || source.load(false), fresh);
    if let Some(at) = changed {
        metrics.network_programmed(at.elapsed());
    }
    let trigger = if after_change {
        SyncTrigger::Change
    } else {
        SyncTrigger::Periodic
    };
    metrics.sync_ok(started.elapsed(), trigger, p);
    // What could be written is: still a sync (healthy), with what is missing
    // named by /healthz and the status report.
    health.synced(&prog.not_programmed);
    reporter.synced();
    reporter.update(|r| r.not_served = prog.not_served.iter().cloned().collect());
    if p.not_programmed > 0 {
        metrics.sync_error("not_programmed");
        let missing = prog.not_programmed.iter().cloned().collect::<Vec<_>>().join("; ");
        reporter.update(|r| r.last_sync_error = Some(missing));
    }
    reporter.write_logged();
}

/// Where attach outcomes go: the status report, /metrics and /readyz.
#[derive(Clone, Copy)]
struct Outcomes<'a> {
    reporter: &'a Reporter,
    metrics: &'a Metrics,
    health: &'a Health,
}

/// Lists the links once: attaches what is missing and, with `addresses`,
/// re-reads the node's addresses. True when the NodePort addresses changed (a
/// sync is due).
/// Writes the cookies of the `--socket-lb-skip-netns` namespaces that exist
/// into the dataplane; at start (`first`) it says which do not exist yet.
fn refresh_sock_lb_skip(dp: &mut Dataplane, netns: &[PathBuf], first: bool) {
    match dp.set_sock_lb_skip(netns) {
        Ok(missing) => {
            for (path, e) in missing.iter().filter(|_| first) {
                tracing::warn!(netns = %path.display(), "--socket-lb-skip-netns: cannot read its netns cookie yet ({e}; entering a namespace needs CAP_SYS_ADMIN); tried again every 2 s");
            }
        }
        Err(e) => tracing::warn!("{e}"),
    }
}

async fn follow_links(
    handle: &rtnetlink::Handle,
    dp: &mut Dataplane,
    cfg: &Config,
    prog: &mut Programmer,
    node_addr: &mut Option<Ipv4Addr>,
    addresses: bool,
    out: Outcomes<'_>,
) -> bool {
    let links = match dataplane::list_links(handle).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("listing links: {e:#}");
            return false;
        }
    };
    let errors = attach_all(dp, &links, &cfg.devices, cfg.xdp);
    out.health.attached(unattached(&errors, &cfg.devices, &links));
    out.metrics.set_attach_errors(errors.len());
    out.reporter.update(|r| {
        r.attach_errors = errors;
        r.xdp_refused = dp.xdp_refused().map(str::to_string).collect();
    });
    addresses && refresh_addresses(handle, dp, cfg, &links.names, prog, node_addr).await
}

/// Re-reads the node's addresses: where NodePorts are served and the address
/// north-south flows are SNATed to (the first address of the first device).
/// True when the NodePort addresses changed.
async fn refresh_addresses(
    handle: &rtnetlink::Handle,
    dp: &mut Dataplane,
    cfg: &Config,
    links: &BTreeMap<u32, String>,
    prog: &mut Programmer,
    node_addr: &mut Option<Ipv4Addr>,
) -> bool {
    let addrs = match dataplane::list_addresses(handle).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("listing addresses: {e:#}");
            return false;
        }
    };
    let np: Vec<IpAddr> = dataplane::nodeport_addresses(&addrs, links, &cfg.devices, &cfg.nodeport_cidrs);
    // The dataplane's node addresses are IPv4 (its maps are).
    let addrs: Vec<(u32, Ipv4Addr)> = addrs
        .into_iter()
        .filter_map(|(idx, ip)| match ip {
            IpAddr::V4(ip) => Some((idx, ip)),
            IpAddr::V6(_) => None,
        })
        .collect();
    // Every address of the node: translated packets to them are delivered
    // locally (host-network backends), not FIB misses.
    let all: BTreeSet<Ipv4Addr> = addrs.iter().map(|(_, ip)| *ip).collect();
    if let Err(e) = dp.set_node_addrs(&all) {
        tracing::warn!("{e:#}");
    }
    let primary = cfg.devices.iter().find_map(|d| {
        addrs
            .iter()
            .find(|(idx, ip)| links.get(idx) == Some(d) && !ip.is_loopback())
            .map(|(_, ip)| *ip)
    });
    if primary != *node_addr {
        if let Some(a) = primary {
            match dp.set_node_addr(a) {
                Ok(()) => tracing::info!(addr = %a, "node address for SNAT"),
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
        *node_addr = primary;
    }
    if np == prog.translate.nodeport_addrs {
        return false;
    }
    tracing::info!(addresses = ?np, "NodePort addresses");
    prog.translate.nodeport_addrs = np;
    true
}

/// Attaches every hook's program where it is missing, and forgets the
/// interfaces that are gone. Returns the attach errors of this pass.
fn attach_all(
    dp: &mut Dataplane,
    links: &dataplane::Links,
    devices: &[String],
    xdp: Option<dataplane::XdpAttach>,
) -> Vec<AttachError> {
    let wanted = links.hooks(devices, xdp.is_some());
    dp.forget_missing(&wanted);
    let mut errors = Vec::new();
    for ((hook, idx), name) in &wanted {
        let xdp_modes = xdp.map_or(&[][..], |x| x.modes(links.veths.contains(idx)));
        if let Err(e) = dp.attach(*hook, name, *idx, xdp_modes) {
            // The link may have vanished in between; retried on the next event.
            let error = dataplane::with_causes(&e);
            tracing::warn!("{error}");
            errors.push(AttachError {
                program: hook.program().to_string(),
                interface: name.clone(),
                error,
            });
        }
    }
    errors
}

/// What keeps the agent from being ready: every program that failed to
/// attach, and every `--devices` entry this network namespace lacks (its
/// from_netdev cannot be attached). XDP falling back to TC is not in it.
fn unattached(errors: &[AttachError], devices: &[String], links: &dataplane::Links) -> Vec<String> {
    let failed = errors
        .iter()
        .map(|e| format!("{} on {}: {}", e.program, e.interface, e.error));
    let missing = devices
        .iter()
        .filter(|d| !links.names.values().any(|n| n == *d))
        .map(|d| {
            format!(
                "{} on {d}: no such interface (--devices)",
                ferry_common::PROG_FROM_NETDEV
            )
        });
    failed.chain(missing).collect()
}

/// The report as the agent starts.
fn initial_report(cfg: &Config) -> AgentReport {
    AgentReport {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        node: cfg.node.clone(),
        mode: match cfg.mode {
            Mode::Standalone { .. } => "standalone",
            Mode::Cluster { .. } => "cluster",
        }
        .to_string(),
        bpffs_dir: cfg.dataplane.bpffs_dir.clone(),
        started_at: unix_now(),
        sync_timeout_seconds: cfg.healthz_timeout.as_secs_f64(),
        devices: cfg.devices.clone(),
        xdp: cfg.xdp.map(|x| format!("{x:?}").to_lowercase()),
        cgroup: cfg.cgroup.clone(),
        socket_lb: cfg.cgroup.as_ref().map(|cg| {
            let whose = if cfg.socket_lb_pods {
                "node and Pods"
            } else {
                "node only"
            };
            let skipped: Vec<String> = cfg.socket_lb_skip.iter().map(|p| p.display().to_string()).collect();
            let skipped = if skipped.is_empty() {
                String::new()
            } else {
                format!(", skipping {}", skipped.join(", "))
            };
            format!("{whose} (cgroup {}){skipped}", cg.display())
        }),
        features: detect_features(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unattached_names_failed_attaches_and_missing_devices() {
        let links = dataplane::Links {
            names: [(1, "lo".to_string()), (2, "eth0".to_string()), (3, "veth1".to_string())].into(),
            veths: [3].into(),
            l3: Default::default(),
        };
        let errors = vec![AttachError {
            program: "from_pod".into(),
            interface: "veth1".into(),
            error: "Operation not supported".into(),
        }];
        let devices = vec!["eth0".to_string(), "eth1".to_string()];
        assert_eq!(
            unattached(&errors, &devices, &links),
            [
                "from_pod on veth1: Operation not supported",
                "from_netdev on eth1: no such interface (--devices)"
            ]
        );
        assert!(unattached(&[], &devices[..1], &links).is_empty());
    }

    #[test]
    fn l3_devices_get_the_l3_programs_and_no_xdp() {
        let links = dataplane::Links {
            names: [
                (2, "eth0".to_string()),
                (3, "veth1".to_string()),
                (4, "wg0".to_string()),
            ]
            .into(),
            veths: [3].into(),
            l3: [4].into(),
        };
        let devices = vec!["eth0".to_string(), "wg0".to_string()];
        let hooks: Vec<_> = links
            .hooks(&devices, true)
            .into_iter()
            .map(|((h, i), n)| (h, i, n))
            .collect();
        use dataplane::Hook::*;
        assert_eq!(
            hooks,
            [
                (FromPod, 3, "veth1".to_string()),
                (FromNetdev, 2, "eth0".to_string()),
                (XdpFromNetdev, 2, "eth0".to_string()),
                (ToPod, 3, "veth1".to_string()),
                (ToNetdev, 2, "eth0".to_string()),
                (FromNetdevL3, 4, "wg0".to_string()),
                (ToNetdevL3, 4, "wg0".to_string()),
            ]
        );
    }
}
