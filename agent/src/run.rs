//! The standalone agent: manifests + Pod status → translate → layout → sync, again
//! whenever the input changes, and from_pod attached to every Pod veth.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use rtnetlink::MulticastGroup;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    dataplane::{self, Dataplane},
    maps::{
        kernel::KernelMaps,
        layout::{layout, Ids},
        sync::Syncer,
    },
    model::Snapshot,
    sources::{manifests, watch},
    translate::{self, translate},
};

/// After a change event, wait this long for the writer to finish (a rename is
/// one event; an editor's write is several in a row).
const QUIET: Duration = Duration::from_millis(5);

/// Everything `ferry agent --manifests` needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub manifests: PathBuf,
    pub state_dir: PathBuf,
    pub node: String,
    pub devices: Vec<String>,
    pub translate: translate::Config,
    pub dataplane: dataplane::Config,
    pub debounce: Duration,
}

/// The sync side: input → maps.
struct Programmer {
    syncer: Syncer<KernelMaps>,
    ids: Ids,
    /// Errors reported last time (each is logged once, when it appears).
    reported: BTreeSet<String>,
    /// ClusterIPs allocated last time (logged when they change).
    allocated: BTreeMap<String, Ipv4Addr>,
    /// Parsed manifest files, re-read only when they change.
    manifests: manifests::DirCache,
}

impl Programmer {
    fn sync(&mut self, cfg: &Config) -> Result<()> {
        let started = Instant::now();
        let mut m = self.manifests.load(&cfg.manifests);
        let (pods, pod_errors) = ferry_shim::status::read_all(&cfg.state_dir);
        for (path, e) in pod_errors {
            tracing::debug!("skipping unreadable pod record {}: {e}", path.display());
        }
        let snapshot = Snapshot {
            pods,
            ..std::mem::take(&mut m.snapshot)
        };
        let parsed = started.elapsed();
        let t = translate(&snapshot, &cfg.translate);
        let translated = started.elapsed();
        let errors: BTreeSet<String> = m
            .errors
            .iter()
            .chain(t.errors.iter())
            .map(ToString::to_string)
            .collect();
        for e in errors.difference(&self.reported) {
            tracing::error!("{e}");
        }
        for e in self.reported.difference(&errors) {
            tracing::info!("resolved: {e}");
        }
        self.reported = errors;
        for (svc, ip) in &t.allocated {
            if self.allocated.get(svc) != Some(ip) {
                tracing::info!(service = %svc, cluster_ip = %ip, "allocated a ClusterIP (spec.clusterIP unset)");
            }
        }
        self.allocated = t.allocated;
        let desired = layout(&t.frontends, &mut self.ids);
        tracing::debug!(
            parse_ms = parsed.as_millis() as u64,
            translate_ms = (translated - parsed).as_millis() as u64,
            layout_ms = (started.elapsed() - translated).as_millis() as u64,
            "sync phases"
        );
        let st = self.syncer.sync(&desired).context("writing the BPF maps")?;
        if st.upserts + st.deletes > 0 {
            let backends: usize = t.frontends.iter().map(|f| f.backends.len()).sum();
            tracing::info!(
                frontends = t.frontends.len(),
                backends,
                upserts = st.upserts,
                deletes = st.deletes,
                forgotten_udp_ct = st.forgotten.ct,
                forgotten_affinity = st.forgotten.affinity,
                write_us = st.duration.as_micros() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                "maps synced"
            );
        } else {
            tracing::debug!(
                total_ms = started.elapsed().as_millis() as u64,
                "maps already in sync"
            );
        }
        Ok(())
    }
}

/// Runs until SIGTERM/SIGINT. The programs and maps stay in place when it stops,
/// so traffic keeps flowing while the agent restarts.
pub async fn run_standalone(cfg: Config) -> Result<()> {
    let (mut dp, maps) = Dataplane::load(&cfg.dataplane)?;
    let syncer = Syncer::new(maps).context("reading the pinned maps")?;
    let ids = Ids::from_contents(syncer.current());
    let mut prog = Programmer {
        syncer,
        ids,
        reported: BTreeSet::new(),
        allocated: BTreeMap::new(),
        manifests: manifests::DirCache::default(),
    };
    tracing::info!(
        node = %cfg.node,
        manifests = %cfg.manifests.display(),
        bpffs = %cfg.dataplane.bpffs_dir.display(),
        "ferry agent started (standalone)"
    );

    let (conn, handle, mut link_events) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).context("netlink")?;
    tokio::spawn(conn);
    attach_all(&handle, &mut dp, &cfg.devices).await;

    let watched = vec![
        cfg.manifests.clone(),
        ferry_shim::status::pods_dir(&cfg.state_dir),
    ];
    let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let _watcher = watch::watch(&watched, tx)?;
    let mut seen = watch::fingerprint(&watched);
    if let Err(e) = prog.sync(&cfg) {
        tracing::error!("sync failed: {e:#}");
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_sync = tokio::time::Instant::now();
    loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                // A change after a quiet spell is synced at once; changes that
                // follow within the debounce window are coalesced into one sync
                // at its end: at most one sync per window, none delayed longer.
                let due = last_sync + cfg.debounce;
                tokio::time::sleep_until(due.max(tokio::time::Instant::now() + QUIET).into()).await;
                while changes.try_recv().is_ok() {}
                last_sync = tokio::time::Instant::now();
                seen = watch::fingerprint(&watched);
                if let Err(e) = prog.sync(&cfg) {
                    tracing::error!("sync failed: {e:#}");
                }
            }
            Some(_) = link_events.next() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, link_events.next()).await {}
                attach_all(&handle, &mut dp, &cfg.devices).await;
            }
            _ = tick.tick() => {
                let now = watch::fingerprint(&watched);
                if now != seen {
                    seen = now;
                    if let Err(e) = prog.sync(&cfg) {
                        tracing::error!("sync failed: {e:#}");
                    }
                }
                attach_all(&handle, &mut dp, &cfg.devices).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(
        "stopping; programs and maps stay pinned in {}",
        cfg.dataplane.bpffs_dir.display()
    );
    Ok(())
}

/// Attaches from_pod to every Pod veth and from_netdev to every node device
/// not attached yet.
async fn attach_all(handle: &rtnetlink::Handle, dp: &mut Dataplane, devices: &[String]) {
    let links = match dataplane::list_links(handle).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("listing links: {e:#}");
            return;
        }
    };
    let wanted = dataplane::hook_interfaces(&links, devices);
    dp.forget_missing(&wanted);
    for ((hook, idx), name) in &wanted {
        if let Err(e) = dp.attach(*hook, name, *idx) {
            // The link may have vanished in between; retried on the next event.
            tracing::warn!("{e:#}");
        }
    }
}
