//! One Pod's life: sandbox (netns + veth), init containers, containers with
//! restarts and probes, status records, and graceful termination.
use std::{
    net::Ipv4Addr,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Container;
use nix::sys::signal::Signal;
use tokio::{process::Child, sync::watch, task::JoinHandle};

use crate::{
    container::{self, PodInfo},
    manifests::PodDef,
    netns, network, probe,
    status::{self, ContainerPortRecord, PodRecord},
};

/// What every Pod of this shim shares.
pub struct Ctx {
    pub node: String,
    pub state_dir: PathBuf,
    pub gateway: Ipv4Addr,
    pub node_netlink: rtnetlink::Handle,
    pub host_ip: Option<Ipv4Addr>,
    /// Signalled when a Pod's readiness changes (a rolling update may proceed).
    pub readiness_changed: tokio::sync::Notify,
}

impl Ctx {
    pub fn netns_name(&self, namespace: &str, name: &str) -> String {
        if namespace == "default" {
            format!("{}-{name}", self.node)
        } else {
            format!("{}-{namespace}-{name}", self.node)
        }
    }
}

/// A running Pod task; `stop` asks it to terminate with a grace period.
pub struct PodHandle {
    pub def: PodDef,
    pub ip: Ipv4Addr,
    stop: watch::Sender<Option<Duration>>,
    /// The Ready condition as last published (false once terminating).
    ready: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl PodHandle {
    pub fn spawn(ctx: Arc<Ctx>, def: PodDef, ip: Ipv4Addr) -> Self {
        let (stop, rx) = watch::channel(None);
        let (ready_tx, ready) = watch::channel(false);
        let task = tokio::spawn(run(ctx, def.clone(), ip, rx, ready_tx));
        Self {
            def,
            ip,
            stop,
            ready,
            task,
        }
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    pub fn stop(&self, grace: Duration) {
        let _ = self.stop.send(Some(grace));
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// One container with its process, restarts and probes.
struct Running {
    c: Container,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    restarts: u32,
    retry_at: Option<Instant>,
    startup: Option<(probe::State, Instant)>,
    liveness: Option<(probe::State, Instant)>,
    readiness: Option<(probe::State, Instant)>,
}

impl Running {
    fn new(c: Container, env: Vec<(String, String)>, log: PathBuf) -> Self {
        Self {
            c,
            env,
            log,
            child: None,
            restarts: 0,
            retry_at: Some(Instant::now()),
            startup: None,
            liveness: None,
            readiness: None,
        }
    }

    fn start(&mut self, ns: &OwnedFd, pod: &str) {
        match container::start(&self.c, ns, &self.env, &self.log) {
            Ok(child) => {
                tracing::info!(pod, container = %self.c.name, pid = child.id(), "container started");
                self.child = Some(child);
                self.retry_at = None;
                let now = Instant::now();
                let mk = |p: &Option<k8s_openapi::api::core::v1::Probe>, initially: bool| {
                    let p = p.as_ref()?;
                    match probe::spec(p, &self.c) {
                        Ok(s) => {
                            let first = now + s.initial_delay;
                            Some((probe::State::new(s, initially), first))
                        }
                        Err(e) => {
                            tracing::error!(pod, container = %self.c.name, "probe ignored: {e}");
                            None
                        }
                    }
                };
                self.startup = mk(&self.c.startup_probe, false);
                self.liveness = mk(&self.c.liveness_probe, true);
                self.readiness = mk(&self.c.readiness_probe, false);
            }
            Err(e) => {
                tracing::error!(pod, container = %self.c.name, "cannot start: {e}");
                self.retry_at = Some(Instant::now() + backoff(self.restarts));
            }
        }
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            container::signal(&child, Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn ready(&self) -> bool {
        self.running()
            && self.startup.as_ref().is_none_or(|(s, _)| s.passing)
            && self.readiness.as_ref().is_none_or(|(s, _)| s.passing)
    }
}

fn backoff(restarts: u32) -> Duration {
    Duration::from_millis((500u64 << restarts.min(5)).min(10_000))
}

/// Which probe of a container to run.
#[derive(Clone, Copy)]
enum Kind {
    Startup,
    Liveness,
    Readiness,
}

async fn run(
    ctx: Arc<Ctx>,
    def: PodDef,
    ip: Ipv4Addr,
    mut stop: watch::Receiver<Option<Duration>>,
    ready: watch::Sender<bool>,
) {
    let publish = |ctx: &Ctx, rec: &PodRecord| {
        let now = rec.ready && !rec.terminating;
        if ready.send_replace(now) != now {
            ctx.readiness_changed.notify_one();
        }
        publish(ctx, rec);
    };
    let name = def.name.clone();
    let ns_name = ctx.netns_name(&def.namespace, &def.name);
    let veth = network::host_veth_name(&def.key());
    let mut rec = PodRecord {
        name: def.name.clone(),
        namespace: def.namespace.clone(),
        node: ctx.node.clone(),
        labels: def.labels.clone(),
        ports: ports(&def),
        pod_ip: Some(ip),
        host_ip: ctx.host_ip,
        phase: "Pending".into(),
        ready: false,
        terminating: false,
        netns: Some(ns_name.clone()),
        restarts: 0,
    };
    publish(&ctx, &rec);
    let sandbox = async {
        netns::create(&ns_name)?;
        network::setup(&ctx.node_netlink, &ns_name, &veth, ip, ctx.gateway).await?;
        netns::open(&ns_name)
    };
    let ns = match sandbox.await {
        Ok(ns) => ns,
        Err(e) => {
            tracing::error!(pod = %name, "sandbox: {e:#}");
            rec.phase = "Failed".into();
            publish(&ctx, &rec);
            let _ = stop.changed().await;
            cleanup(&ctx, &def, &ns_name, &veth).await;
            return;
        }
    };
    let info = PodInfo {
        name: &def.name,
        namespace: &def.namespace,
        node: &ctx.node,
        ip,
    };
    let log = |c: &str| {
        ctx.state_dir
            .join("logs")
            .join(&ctx.node)
            .join(format!("{}_{}_{c}.log", def.namespace, def.name))
    };

    // Init containers, in order, each to completion.
    for c in def.spec.init_containers.iter().flatten() {
        let env = container::environment(c, &info);
        let mut attempt = 0u32;
        loop {
            let result = match container::start(c, &ns, &env, &log(&c.name)) {
                Ok(mut child) => tokio::select! {
                    s = child.wait() => s.map(|s| s.success()).unwrap_or(false),
                    _ = stop.changed() => {
                        container::signal(&child, Signal::SIGKILL);
                        let _ = child.wait().await;
                        cleanup(&ctx, &def, &ns_name, &veth).await;
                        return;
                    }
                },
                Err(e) => {
                    tracing::error!(pod = %name, container = %c.name, "init container: {e}");
                    false
                }
            };
            if result {
                tracing::info!(pod = %name, container = %c.name, "init container completed");
                break;
            }
            attempt += 1;
            tracing::warn!(pod = %name, container = %c.name, attempt, "init container failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(backoff(attempt)) => {}
                _ = stop.changed() => {
                    cleanup(&ctx, &def, &ns_name, &veth).await;
                    return;
                }
            }
        }
    }

    let policy = def.spec.restart_policy.clone().unwrap_or_else(|| "Always".into());
    let mut cs: Vec<Running> = def
        .spec
        .containers
        .iter()
        .map(|c| Running::new(c.clone(), container::environment(c, &info), log(&c.name)))
        .collect();
    // Published at once: a Pod whose readiness probe never passes is Running
    // all the same (a publishNotReadyAddresses Service serves it).
    rec.phase = "Running".into();
    publish(&ctx, &rec);
    let grace = loop {
        // Containers: exits, restarts.
        for r in cs.iter_mut() {
            if let Some(child) = r.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    tracing::warn!(pod = %name, container = %r.c.name, %status, "container exited");
                    r.child = None;
                    let again = match policy.as_str() {
                        "Never" => false,
                        "OnFailure" => !status.success(),
                        _ => true,
                    };
                    r.retry_at = again.then(|| Instant::now() + backoff(r.restarts));
                    if again {
                        r.restarts += 1;
                    }
                }
            }
            if r.child.is_none() && r.retry_at.is_some_and(|t| t <= Instant::now()) {
                r.start(&ns, &name);
            }
        }
        // Probes that are due.
        for r in cs.iter_mut().filter(|r| r.running()) {
            let started = r.startup.as_ref().is_none_or(|(s, _)| s.passing);
            let kinds: &[Kind] = if started {
                &[Kind::Liveness, Kind::Readiness]
            } else {
                &[Kind::Startup]
            };
            for kind in kinds {
                let slot = match kind {
                    Kind::Startup => &mut r.startup,
                    Kind::Liveness => &mut r.liveness,
                    Kind::Readiness => &mut r.readiness,
                };
                let Some((state, due)) = slot.as_mut() else { continue };
                if *due > Instant::now() {
                    continue;
                }
                let ok = probe::run(&state.spec.check, ip, state.spec.timeout, &ns, &r.env).await;
                *due = Instant::now() + state.spec.period;
                let flipped = state.record(ok);
                let restart = match (kind, flipped) {
                    (Kind::Readiness, Some(v)) => {
                        tracing::info!(pod = %name, container = %r.c.name, ready = v, "readiness changed");
                        false
                    }
                    (Kind::Liveness, Some(false)) => {
                        tracing::warn!(pod = %name, container = %r.c.name, "liveness probe failed; restarting");
                        true
                    }
                    (Kind::Startup, Some(false)) => {
                        tracing::warn!(pod = %name, container = %r.c.name, "startup probe failed; restarting");
                        true
                    }
                    _ => false,
                };
                if restart {
                    r.kill().await;
                    r.restarts += 1;
                    r.retry_at = Some(Instant::now());
                    break;
                }
            }
        }
        let mut next = rec.clone();
        next.ready = cs.iter().all(Running::ready);
        next.restarts = cs.iter().map(|r| r.restarts).sum();
        if next != rec {
            rec = next;
            publish(&ctx, &rec);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            r = stop.changed() => {
                break if r.is_ok() { (*stop.borrow()).unwrap_or_default() } else { Duration::ZERO };
            }
        }
    };

    // Terminating (KEP-1669): out of the Services' ready set at once, SIGTERM,
    // then up to the grace period during which the readiness probes keep running
    // and `ready` reports "serving" (a serving+terminating endpoint still takes
    // new connections when a Service has no ready one), then SIGKILL.
    rec.terminating = true;
    publish(&ctx, &rec);
    tracing::info!(pod = %name, grace_s = grace.as_secs_f32(), "terminating");
    for r in &cs {
        if let Some(c) = &r.child {
            container::signal(c, Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        for r in cs.iter_mut() {
            if let Some(child) = r.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    tracing::info!(pod = %name, container = %r.c.name, %status, "container exited");
                    r.child = None;
                }
            }
        }
        if cs.iter().all(|r| !r.running()) || Instant::now() >= deadline {
            break;
        }
        for r in cs.iter_mut().filter(|r| r.running()) {
            let Some((state, due)) = r.readiness.as_mut() else {
                continue;
            };
            if *due > Instant::now() {
                continue;
            }
            let ok = probe::run(&state.spec.check, ip, state.spec.timeout, &ns, &r.env).await;
            *due = Instant::now() + state.spec.period;
            state.record(ok);
        }
        let serving = cs.iter().all(Running::ready);
        if serving != rec.ready {
            rec.ready = serving;
            tracing::info!(pod = %name, serving, "terminating; serving changed");
            publish(&ctx, &rec);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in cs.iter_mut() {
        r.kill().await;
    }
    drop(ns);
    cleanup(&ctx, &def, &ns_name, &veth).await;
}

fn ports(def: &PodDef) -> Vec<ContainerPortRecord> {
    def.spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(ContainerPortRecord {
                name: p.name.clone(),
                container_port: u16::try_from(p.container_port).ok()?,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            })
        })
        .collect()
}

fn publish(ctx: &Ctx, rec: &PodRecord) {
    if let Err(e) = status::write_record(&ctx.state_dir, rec) {
        tracing::error!(pod = %rec.name, "writing status: {e}");
    }
}

async fn cleanup(ctx: &Ctx, def: &PodDef, ns_name: &str, veth: &str) {
    if let Err(e) = network::teardown(&ctx.node_netlink, veth).await {
        tracing::warn!(pod = %def.name, "removing veth: {e:#}");
    }
    if let Err(e) = netns::delete(ns_name) {
        tracing::warn!(pod = %def.name, "removing netns: {e:#}");
    }
    if let Err(e) = status::remove_record(&ctx.state_dir, &ctx.node, &def.namespace, &def.name) {
        tracing::warn!(pod = %def.name, "removing status: {e}");
    }
    tracing::info!(pod = %def.name, "removed");
}
