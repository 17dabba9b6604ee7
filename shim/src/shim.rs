//! The shim's main loop: desired Pods (manifests) against running Pods.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use notify::Watcher as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    manifests::{self, PodDef},
    netns, network,
    pod::{Ctx, PodHandle},
    rollout, status, ShimArgs,
};

pub async fn run(args: ShimArgs) -> Result<()> {
    let gateway = args
        .pod_cidr
        .hosts()
        .next()
        .context("--pod-cidr has no host addresses")?;
    check_nodes(&args)?;
    if let Some(cg) = &args.pod_cgroup {
        // Every Pod process is forked from here and inherits the cgroup.
        let procs = cg.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string()).with_context(|| {
            format!(
                "joining the cgroup {} (--pod-cgroup): writing {}",
                cg.display(),
                procs.display()
            )
        })?;
    }
    if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        tracing::warn!(
            "net.ipv4.ip_forward is 0 in this network namespace: Pods cannot reach each other through the node"
        );
    }
    let ctx = Arc::new(Ctx {
        node: args.node.clone(),
        state_dir: args.state_dir.clone(),
        gateway,
        node_netlink: network::handle_here()?,
        host_ip: None,
        readiness_changed: tokio::sync::Notify::new(),
    });
    remove_leftovers(&ctx);

    let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if e.is_ok() {
            let _ = tx.send(());
        }
    })?;
    watcher
        .watch(&args.manifests, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", args.manifests.display()))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let max_grace = Duration::from_secs(args.max_grace_seconds);
    tracing::info!(node = %args.node, nodes = ?args.nodes, cidr = %args.pod_cidr, manifests = %args.manifests.display(), "ferry shim started");

    let mut running: BTreeMap<String, PodHandle> = BTreeMap::new();
    let mut stopping: Vec<PodHandle> = Vec::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    loop {
        let desired = manifests::load_dir(&args.manifests).place(&args.node, &args.nodes);
        let errors: BTreeSet<String> = desired.errors.iter().cloned().collect();
        for e in errors.difference(&reported) {
            tracing::error!("{e}");
        }
        reported = errors;
        stopping.retain(|h| !h.is_finished());
        // Gone or changed: terminate. A Deployment's Pods go when it goes, or
        // when their index is no longer this node's (the Node objects changed);
        // while it exists, rollout plans them.
        let outdated: Vec<String> = running
            .iter()
            .filter(|(k, h)| match &h.def.owner {
                Some(d) => desired.deployments.get(d).is_none_or(|d| !d.owns(&h.def.name)),
                None => desired.pods.get(*k).is_none_or(|d| d.fingerprint != h.def.fingerprint),
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in outdated {
            if let Some(h) = running.remove(&k) {
                h.stop(grace(&h.def, max_grace));
                stopping.push(h);
            }
        }
        // Deployments: start and stop Pods as the rolling update allows.
        let mut planned: Vec<PodDef> = Vec::new();
        for d in desired.deployments.values() {
            let members: Vec<rollout::Member> = running
                .values()
                .filter(|h| h.def.owner.as_deref() == Some(d.key.as_str()))
                .map(|h| rollout::Member {
                    name: h.def.name.clone(),
                    current: h.def.fingerprint == d.template.fingerprint,
                    ready: h.is_ready(),
                })
                .collect();
            // Names a new Pod must not take: stopping Pods, other running Pods and
            // standalone Pods of the namespace (also those other nodes run).
            let ns_prefix = format!("{}/", d.namespace);
            let elsewhere = desired
                .elsewhere
                .iter()
                .filter_map(|k| k.strip_prefix(&ns_prefix).map(str::to_string));
            let taken: Vec<String> = stopping
                .iter()
                .map(|h| &h.def)
                .chain(
                    running
                        .values()
                        .map(|h| &h.def)
                        .filter(|p| p.owner.as_deref() != Some(d.key.as_str())),
                )
                .chain(desired.pods.values())
                .filter(|p| p.namespace == d.namespace)
                .map(|p| p.name.clone())
                .chain(elsewhere)
                .collect();
            let plan = rollout::plan(d, &members, &taken);
            for name in plan.stop {
                if let Some(h) = running.remove(&format!("{}/{name}", d.namespace)) {
                    tracing::info!(deployment = %d.key, pod = %name, "deployment: stopping a Pod (rolling update or scale-down)");
                    h.stop(grace(&h.def, max_grace));
                    stopping.push(h);
                }
            }
            for name in plan.start {
                let mut def = d.template.clone();
                def.name = name;
                def.owner = Some(d.key.clone());
                planned.push(def);
            }
        }
        // New: start, once a previous incarnation has fully stopped.
        let new: Vec<PodDef> = desired.pods.values().cloned().chain(planned).collect();
        for def in &new {
            let k = &def.key();
            if running.contains_key(k) || stopping.iter().any(|h| &h.def.key() == k) {
                continue;
            }
            let used: BTreeSet<Ipv4Addr> = running.values().chain(stopping.iter()).map(|h| h.ip).collect();
            let Some(ip) = args.pod_cidr.hosts().skip(1).find(|ip| !used.contains(ip)) else {
                tracing::error!(pod = %k, "no free address in {}", args.pod_cidr);
                continue;
            };
            tracing::info!(pod = %k, %ip, "starting");
            running.insert(k.clone(), PodHandle::spawn(ctx.clone(), def.clone(), ip));
        }
        tokio::select! {
            Some(()) = changes.recv() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                while changes.try_recv().is_ok() {}
            }
            _ = tick.tick() => {}
            _ = ctx.readiness_changed.notified() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping every Pod");
    let fast = Duration::from_secs(2);
    for h in running.values() {
        h.stop(grace(&h.def, max_grace).min(fast));
    }
    for h in running.into_values().chain(stopping) {
        h.wait().await;
    }
    Ok(())
}

/// `--nodes`, if given, must name this node: otherwise it would run no Pod
/// without spec.nodeName, and the ones placed on the missing node would run
/// nowhere.
fn check_nodes(args: &ShimArgs) -> Result<()> {
    if let Some(empty) = args.nodes.iter().find(|n| n.trim().is_empty()) {
        anyhow::bail!("--nodes {:?}: a node name is empty ({empty:?})", args.nodes.join(","));
    }
    if !args.nodes.is_empty() && !args.nodes.contains(&args.node) {
        anyhow::bail!(
            "--nodes {}: does not include this node (--node {})",
            args.nodes.join(","),
            args.node
        );
    }
    Ok(())
}

fn grace(def: &PodDef, max: Duration) -> Duration {
    let secs = def.spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64;
    Duration::from_secs(secs).min(max)
}

/// A previous shim of this node that crashed may have left namespaces and records.
fn remove_leftovers(ctx: &Ctx) {
    let prefix = format!("{}-", ctx.node);
    for ns in netns::list().into_iter().filter(|n| n.starts_with(&prefix)) {
        tracing::info!(netns = %ns, "removing a leftover Pod namespace");
        let _ = netns::delete(&ns);
    }
    let dir = status::pods_dir(&ctx.state_dir).join(&ctx.node);
    let _ = std::fs::remove_dir_all(&dir);
}
