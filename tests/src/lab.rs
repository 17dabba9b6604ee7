//! A lab node: a network namespace running `ferry agent` and `ferry shim` on a
//! manifest directory, as a DaemonSet and the kubelet would on a real node.
use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ferry_shim::status::{self, PodRecord};

use crate::sys;

/// What to build.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Short tag in every name the lab creates (netns, dirs), e.g. "hairpin".
    pub tag: String,
    /// Manifest files to start with: (file name, YAML).
    pub manifests: Vec<(String, String)>,
    /// Extra flags for `ferry agent`.
    pub agent_args: Vec<String>,
    /// The node's pod CIDR.
    pub pod_cidr: String,
    /// Start `ferry agent` (false: Pods only, e.g. for a baseline without Ferry).
    pub agent: bool,
    /// Start `ferry shim` (false: the caller starts it with [`Lab::start_shim`],
    /// e.g. once the names of every node of a multi-node lab are known).
    pub shim: bool,
    /// Pod status directory shared with other nodes (a multi-node lab); by
    /// default the lab's own.
    pub state_dir: Option<PathBuf>,
    /// Test files outside the lab's directory (readiness files, say), removed
    /// with the lab.
    pub scratch: Vec<PathBuf>,
}

impl LabOptions {
    pub fn new(tag: &str) -> Self {
        Self {
            tag: tag.to_string(),
            manifests: Vec::new(),
            agent_args: Vec::new(),
            pod_cidr: "10.244.0.0/24".into(),
            agent: true,
            shim: true,
            state_dir: None,
            scratch: Vec::new(),
        }
    }

    /// Removes `dir` (and what is in it) when the lab goes.
    pub fn scratch_dir(mut self, dir: &Path) -> Self {
        self.scratch.push(dir.to_path_buf());
        self
    }

    pub fn manifest(mut self, file: &str, yaml: &str) -> Self {
        self.manifests.push((file.to_string(), yaml.to_string()));
        self
    }

    /// All *.yaml files of a directory (the shipped lab/manifests, say).
    pub fn manifests_from_dir(mut self, dir: &Path) -> Result<Self> {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            self.manifests.push((name, fs::read_to_string(&path)?));
        }
        Ok(self)
    }
}

/// A running lab node. Dropping it removes everything it created.
pub struct Lab {
    /// Prefix of every network namespace the lab created.
    pub prefix: String,
    /// The node's network namespace (and node name).
    pub node: String,
    pub dir: PathBuf,
    pub manifests_dir: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    /// The node's own cgroup (v2): the agent's socket load balancer is attached
    /// here, and host-network clients of the node run in it (never the
    /// machine's root cgroup). None without cgroup v2.
    pub cgroup: Option<PathBuf>,
    ferry: PathBuf,
    /// The binary the agent runs from, when not `ferry` (an upgrade).
    agent_bin: Option<PathBuf>,
    agent: Option<Child>,
    shim: Option<Child>,
    agent_args: Vec<String>,
    pod_cidr: String,
    scratch: Vec<PathBuf>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Creates the node namespace and starts the agent and the shim in it.
    pub fn start(opts: LabOptions) -> Result<Self> {
        sys::require_root()?;
        sys::ensure_bpffs()?;
        let ferry = sys::ferry_bin()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Short: netns and interface names are derived from it.
        let prefix = format!("fl{:x}{n}{}", std::process::id() % 0xffff, short(&opts.tag));
        let node = format!("{prefix}-n1");
        let dir = std::env::temp_dir().join(format!("ferry-lab-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        let manifests_dir = dir.join("manifests");
        let state_dir = opts.state_dir.clone().unwrap_or_else(|| dir.join("state"));
        fs::create_dir_all(&manifests_dir)?;
        fs::create_dir_all(&state_dir)?;
        let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/ferry-lab/{node}"));
        let cgroup = ferry_agent_cgroup_root().map(|root| root.join(format!("ferry-lab-{node}")));
        if let Some(cg) = &cgroup {
            fs::create_dir_all(cg).with_context(|| format!("creating the cgroup {}", cg.display()))?;
        }
        let mut lab = Self {
            prefix,
            node,
            dir,
            manifests_dir,
            state_dir,
            bpffs_dir,
            cgroup,
            ferry,
            agent_bin: None,
            agent: None,
            shim: None,
            agent_args: opts.agent_args.clone(),
            pod_cidr: opts.pod_cidr.clone(),
            scratch: opts.scratch.clone(),
        };
        for (file, yaml) in &opts.manifests {
            lab.write_manifest(file, yaml)?;
        }
        lab.create_node()?;
        if opts.agent {
            lab.start_agent()?;
        }
        if opts.shim {
            lab.start_shim(&[])?;
        }
        Ok(lab)
    }

    /// Starts `ferry shim` on the lab's manifests; `nodes` (if any) are the
    /// lab's nodes, over which it spreads the Pods without spec.nodeName
    /// (`--nodes`; without, this node runs them all).
    pub fn start_shim(&mut self, nodes: &[String]) -> Result<()> {
        let mut args: Vec<String> = vec![
            "shim".into(),
            "--manifests".into(),
            path_str(&self.manifests_dir),
            "--node".into(),
            self.node.clone(),
            "--state-dir".into(),
            path_str(&self.state_dir),
            "--pod-cidr".into(),
            self.pod_cidr.clone(),
        ];
        if !nodes.is_empty() {
            args.extend(["--nodes".into(), nodes.join(",")]);
        }
        if let Some(cg) = &self.cgroup {
            // The node's Pods run in the node's cgroup, where the agent's
            // socket load balancer is attached (as the kubelet's kubepods
            // cgroup sits under the root a real agent attaches to).
            args.extend(["--pod-cgroup".into(), path_str(cg)]);
        }
        self.shim = Some(self.spawn("shim", &self.in_node(), &args)?);
        Ok(())
    }

    fn create_node(&self) -> Result<()> {
        sys::run("ip", &["netns", "add", &self.node])?;
        sys::run("ip", &["-n", &self.node, "link", "set", "lo", "up"])?;
        // Sysctls of the lab's own node namespace only, never the machine's.
        sys::netns_exec(&self.node, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        Ok(())
    }

    /// Starts (or restarts) the agent on the lab's manifest directory.
    pub fn start_agent(&mut self) -> Result<()> {
        let dir = self.manifests_dir.clone();
        self.start_agent_on(&dir)
    }

    /// Starts (or restarts) the agent on another manifest directory (the
    /// benchmark's Services, which the shim need not parse).
    pub fn start_agent_on(&mut self, manifests: &Path) -> Result<()> {
        let source = self.standalone_source(manifests);
        self.spawn_agent(&self.in_node(), &source)
    }

    /// The agent's flags for standalone mode on `manifests`.
    fn standalone_source(&self, manifests: &Path) -> Vec<String> {
        vec![
            "--manifests".into(),
            path_str(manifests),
            "--state-dir".into(),
            path_str(&self.state_dir),
        ]
    }

    /// Starts `ferry agent <source> --node-name … --bpffs-dir … --cgroup-path …`
    /// plus the lab's extra agent flags, through `launcher`.
    fn spawn_agent(&mut self, launcher: &[String], source: &[String]) -> Result<()> {
        let args = self.agent_command(source);
        self.agent = Some(self.spawn_bin(self.agent_binary(), "agent", launcher, &args)?);
        Ok(())
    }

    /// `agent <source> --node-name … --bpffs-dir … --cgroup-path …` plus the
    /// lab's extra agent flags.
    fn agent_command(&self, source: &[String]) -> Vec<String> {
        let mut args: Vec<String> = std::iter::once("agent".to_string())
            .chain(source.iter().cloned())
            .collect();
        args.extend([
            "--node-name".into(),
            self.node.clone(),
            "--bpffs-dir".into(),
            path_str(&self.bpffs_dir),
            "--cgroup-path".into(),
            self.cgroup.as_deref().map(path_str).unwrap_or_else(|| "none".into()),
            "--status-file".into(),
            path_str(&self.status_file()),
        ]);
        args.extend(self.agent_args.iter().cloned());
        args
    }

    /// Where the agent writes its status report (`--status-file`).
    pub fn status_file(&self) -> PathBuf {
        self.dir.join("status.json")
    }

    /// `ferry status -o json` for this node: whether it exited 0 (healthy),
    /// the JSON, and its standard error.
    pub fn status(&self) -> Result<(bool, serde_json::Value, String)> {
        let out = self.ferry_unchecked(&[
            "status",
            "-o",
            "json",
            "--node-name",
            &self.node,
            "--status-file",
            &path_str(&self.status_file()),
        ])?;
        let json = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("ferry status printed no JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
        Ok((
            out.status.success(),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs `ferry <args> --bpffs-dir <the lab's>` in the node, whatever its
    /// exit status.
    pub fn ferry_unchecked(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.node])
            .arg(&self.ferry)
            .args(args)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running ferry {args:?} in {}", self.node))
    }

    /// Runs another `ferry agent` in the node, as the lab would start it (the
    /// lab's manifests, node name, pin directory) plus `extra` flags, for at most
    /// `timeout`: its exit status (None: still running at the deadline, then
    /// killed) and its output. For agents expected to refuse to start.
    pub fn agent_once(&self, extra: &[&str], timeout: Duration) -> Result<(Option<std::process::ExitStatus>, String)> {
        let mut args = self.agent_command(&self.standalone_source(&self.manifests_dir));
        args.extend(extra.iter().map(|s| s.to_string()));
        let out_path = self.log_path("agent-once");
        let _ = fs::remove_file(&out_path);
        let out = fs::File::create(&out_path)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node])
            .arg(self.agent_binary())
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting a second ferry agent")?;
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if start.elapsed() > timeout {
                stop(child, Duration::from_secs(5));
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok((status, fs::read_to_string(&out_path).unwrap_or_default()))
    }

    /// The agent's process id (`ip netns exec` execs it, so this is the agent).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Where the agent's output goes (appended across restarts).
    pub fn agent_log_path(&self) -> PathBuf {
        self.log_path("agent")
    }

    /// Starts the agent in cluster mode, reaching the API through `kubeconfig`
    /// (a fake API server in the node's namespace, say). Extra flags from
    /// `LabOptions::agent_args` are appended.
    pub fn start_cluster_agent(&mut self, kubeconfig: &Path) -> Result<()> {
        self.spawn_agent(&self.in_node(), &["--kubeconfig".into(), path_str(kubeconfig)])
    }

    /// Starts the agent (standalone mode, like `start_agent`) with only the Linux
    /// capabilities `caps` (e.g. "BPF"), as a non-privileged container would run
    /// it. It joins the node's network namespace with nsenter and stays in this
    /// mount namespace (where bpffs is mounted, as in a container with bpffs
    /// mounted in), so it needs no capability to switch mount namespaces.
    pub fn start_agent_with_caps(&mut self, caps: &[&str]) -> Result<()> {
        let set: String = std::iter::once("-all".to_string())
            .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let launcher = [
            "nsenter".to_string(),
            format!("--net=/run/netns/{}", self.node),
            "setpriv".into(),
            format!("--inh-caps={set}"),
            format!("--ambient-caps={set}"),
            format!("--bounding-set={set}"),
        ];
        let source = self.standalone_source(&self.manifests_dir);
        self.spawn_agent(&launcher, &source)
    }

    /// The agent's whole log.
    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.agent_log_path()).unwrap_or_default()
    }

    /// Restarts the agent with `extra` flags added to the lab's.
    pub fn restart_agent_with(&mut self, extra: &[&str]) -> Result<()> {
        self.stop_agent();
        self.agent_args.extend(extra.iter().map(|s| s.to_string()));
        self.start_agent()
    }

    /// Stops the agent (SIGTERM), leaving the dataplane and its pinned maps.
    pub fn stop_agent(&mut self) {
        if let Some(child) = self.agent.take() {
            stop(child, Duration::from_secs(5));
        }
    }

    /// Kills the agent with SIGKILL (no chance to clean up or to finish
    /// anything it was writing) and reaps it.
    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut child) = self.agent.take() {
            child.kill().context("SIGKILL to the agent")?;
            child.wait()?;
        }
        Ok(())
    }

    /// The binary the agent runs from (by default the one the shim and
    /// `ferry` commands run from).
    pub fn agent_binary(&self) -> &Path {
        self.agent_bin.as_deref().unwrap_or(&self.ferry)
    }

    /// Starts the agent from another binary file from now on (an upgrade: a
    /// copy of the build at another path, say); takes effect at the next
    /// start.
    pub fn set_agent_binary(&mut self, binary: &Path) {
        self.agent_bin = Some(binary.to_path_buf());
    }

    /// The extra flags the agent is started with (`LabOptions::agent_args`),
    /// to change for the next start (another map size, say).
    pub fn agent_args_mut(&mut self) -> &mut Vec<String> {
        &mut self.agent_args
    }

    /// How the lab runs a process in its node: `ip netns exec NODE`.
    fn in_node(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.node.clone()]
    }

    fn log_path(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.log"))
    }

    /// Runs `<launcher> ferry <args>`, its output appended to `<what>.log`.
    fn spawn(&self, what: &str, launcher: &[String], args: &[String]) -> Result<Child> {
        self.spawn_bin(&self.ferry, what, launcher, args)
    }

    /// Runs `<launcher> <binary> <args>`, its output appended to `<what>.log`.
    fn spawn_bin(&self, binary: &Path, what: &str, launcher: &[String], args: &[String]) -> Result<Child> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(what))?;
        let (program, launcher_args) = launcher.split_first().context("an empty launcher")?;
        Command::new(program)
            .args(launcher_args)
            .arg(binary)
            .args(args)
            // Own process group: a Ctrl-C in the terminal reaches only the lab's
            // owner, which then stops the shim first (it removes its Pods).
            .process_group(0)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting ferry {what} with {launcher:?}"))
    }

    /// Writes (or replaces) a manifest file atomically.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.manifests_dir.join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        fs::remove_file(self.manifests_dir.join(file))?;
        Ok(())
    }

    /// The shim's record of a Pod.
    pub fn pod(&self, name: &str) -> Option<PodRecord> {
        status::read_all(&self.state_dir).0.into_iter().find(|r| r.name == name)
    }

    /// All Pod records of the lab.
    pub fn pods(&self) -> Vec<PodRecord> {
        status::read_all(&self.state_dir).0
    }

    /// The network namespace of a Pod.
    pub fn pod_netns(&self, name: &str) -> Result<String> {
        self.pod(name)
            .and_then(|r| r.netns)
            .with_context(|| format!("pod {name} has no network namespace yet\n{}", self.logs()))
    }

    /// Waits until every named Pod is ready.
    pub fn wait_ready(&self, names: &[&str], timeout: Duration) -> Result<()> {
        self.wait_until(timeout, &format!("pods {names:?} ready"), || {
            Ok(names
                .iter()
                .all(|n| self.pod(n).is_some_and(|r| r.ready && r.pod_ip.is_some())))
        })
    }

    /// Asks with `ask` until every backend in `names` has answered at least
    /// once (the agent programs each backend shortly after its Pod turns
    /// ready, so the first answer alone does not mean all are in the maps).
    /// Returns every name that answered, for callers that check no other did.
    pub fn wait_answered_by<S: AsRef<str>>(
        &self,
        what: &str,
        names: &[S],
        ask: impl FnMut() -> Result<String>,
    ) -> Result<std::collections::BTreeSet<String>> {
        self.wait_answered_by_within(Duration::from_secs(20), what, names, ask)
    }

    /// [`Lab::wait_answered_by`] with another timeout.
    pub fn wait_answered_by_within<S: AsRef<str>>(
        &self,
        timeout: Duration,
        what: &str,
        names: &[S],
        mut ask: impl FnMut() -> Result<String>,
    ) -> Result<std::collections::BTreeSet<String>> {
        let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
        let mut seen = std::collections::BTreeSet::new();
        self.wait_until(timeout, &format!("{what} answered by {names:?}"), || {
            seen.insert(ask()?);
            Ok(names.iter().all(|n| seen.contains(*n)))
        })?;
        Ok(seen)
    }

    /// Polls `cond` every 100 ms until it is true or `timeout` passes.
    pub fn wait_until(&self, timeout: Duration, what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
        let start = Instant::now();
        let mut last_err = None;
        loop {
            match cond() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what} (last error: {last_err:?})\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `ferry <args>` against this node's maps (svc list, ct list).
    pub fn ferry(&self, args: &[&str]) -> Result<String> {
        let mut all = args.to_vec();
        let dir = path_str(&self.bpffs_dir);
        all.extend_from_slice(&["--bpffs-dir", &dir]);
        sys::netns_exec(&self.node, &path_str(&self.ferry), &all)
    }

    /// A dataplane counter of this node by its `/metrics` name (e.g.
    /// `xdp_forward`), through `ferry counters list`.
    pub fn counter(&self, name: &str) -> Result<u64> {
        let json: serde_json::Value = serde_json::from_str(&self.ferry(&["counters", "list", "-o", "json"])?)?;
        json.as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == name))
            .and_then(|r| r["value"].as_u64())
            .with_context(|| format!("no counter {name} in `ferry counters list`"))
    }

    /// The agent's sync counters, from its `/metrics/agent` (what tests
    /// and the benchmark wait on, not the log).
    pub fn syncs(&self) -> Result<crate::Syncs> {
        crate::Syncs::parse(&self.agent_metrics()?)
    }

    /// The agent's own metrics (`/metrics/agent`: no map is read), as text.
    pub fn agent_metrics(&self) -> Result<String> {
        let addr = self.metrics_addr()?;
        let (code, body) = crate::http_get(&self.node, addr, "/metrics/agent")
            .with_context(|| format!("the agent's metrics at {addr} in {}", self.node))?;
        if code != 200 {
            bail!("the agent's metrics at {addr} in {}: HTTP {code}: {body}", self.node);
        }
        Ok(body)
    }

    /// Where the agent serves metrics in the node's namespace: its
    /// `--metrics-bind-address` (an unspecified address is reached on
    /// 127.0.0.1), by default kube-proxy's 127.0.0.1:10249.
    pub fn metrics_addr(&self) -> Result<std::net::SocketAddr> {
        metrics_addr(&self.agent_args)
    }

    /// The agent's and the shim's logs (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for what in ["agent", "shim"] {
            let text = fs::read_to_string(self.log_path(what)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {what} log (last {} lines) ---\n", tail.len()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Whether the agent/shim processes are still running.
    pub fn check_alive(&mut self) -> Result<()> {
        let mut exited = Vec::new();
        for (what, child) in [("agent", &mut self.agent), ("shim", &mut self.shim)] {
            if let Some(status) = child.as_mut().map(Child::try_wait).transpose()?.flatten() {
                exited.push(format!("ferry {what} exited: {status}"));
            }
        }
        if !exited.is_empty() {
            bail!("{}\n{}", exited.join("; "), self.logs());
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("lab {} failed; logs:\n{}", self.prefix, self.logs());
        }
        // Each step is timed: a slow one is reported (a loaded machine, or a
        // process that does not stop).
        let prefix = self.prefix.clone();
        let slow = |what: &str, t: Instant| {
            if t.elapsed() > Duration::from_secs(5) {
                eprintln!("lab {prefix}: {what} took {:?}", t.elapsed());
            }
        };
        // The shim stops its Pods and removes their namespaces on SIGTERM.
        let t = Instant::now();
        if let Some(child) = self.shim.take() {
            stop(child, Duration::from_secs(15));
        }
        slow("stopping the shim", t);
        let t = Instant::now();
        self.stop_agent();
        slow("stopping the agent", t);
        let t = Instant::now();
        sys::delete_netns_with_prefix(&self.prefix);
        slow("deleting the network namespaces", t);
        let _ = fs::remove_dir_all(&self.bpffs_dir);
        if let Some(cg) = &self.cgroup {
            // Empty by now (the processes in it have exited): rmdir detaches
            // the socket programs with it.
            let _ = fs::remove_dir(cg);
        }
        let _ = fs::remove_dir(self.bpffs_dir.parent().unwrap_or(Path::new("/nonexistent")));
        let _ = fs::remove_dir_all(&self.dir);
        for d in &self.scratch {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop(mut child: Child, grace: Duration) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Up to four alphanumerics of a test's tag, for namespace name prefixes.
pub(crate) fn short(tag: &str) -> String {
    tag.chars().filter(|c| c.is_ascii_alphanumeric()).take(4).collect()
}

/// The metrics address `agent_args` give the agent (see [`Lab::metrics_addr`]).
fn metrics_addr(agent_args: &[String]) -> Result<std::net::SocketAddr> {
    const FLAG: &str = "--metrics-bind-address";
    let mut given = None;
    for (i, a) in agent_args.iter().enumerate() {
        if a == FLAG {
            given = agent_args.get(i + 1).map(String::as_str);
        } else if let Some(v) = a.strip_prefix(FLAG).and_then(|v| v.strip_prefix('=')) {
            given = Some(v);
        }
    }
    let text = given.unwrap_or("127.0.0.1:10249");
    if text.is_empty() {
        bail!("the agent serves no metrics ({FLAG} is empty)");
    }
    let mut addr: std::net::SocketAddr = text.parse().with_context(|| format!("{FLAG} {text:?}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(addr)
}

/// Moves this whole process into the cgroup `cg`.
fn join_cgroup(cg: &Path) -> Result<()> {
    fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving the test process into {}", cg.display()))
}

/// Moves the process back into its cgroup when dropped.
struct CgroupReturn(PathBuf);

impl Drop for CgroupReturn {
    fn drop(&mut self) {
        if let Err(e) = join_cgroup(&self.0) {
            eprintln!("{e:#}");
        }
    }
}

/// The cgroup v2 root (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid
/// machines), where lab nodes get cgroups of their own.
fn ferry_agent_cgroup_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, target, fstype) = (f.next(), f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| target.to_string())
        })
        .find(|t| t == "/sys/fs/cgroup" || t == "/sys/fs/cgroup/unified")
        .map(PathBuf::from)
}

impl Lab {
    /// Runs `f` on a thread inside the network namespace `netns` (a Pod's)
    /// while this process is in the node's cgroup, so that the sockets `f`
    /// creates belong to the node's cgroup as a Pod process's do (the shim
    /// runs Pods there): the node's socket load balancer serves them. The
    /// process goes back to its own cgroup afterwards (also when `f` panics).
    /// Every thread of the process moves meanwhile, so tests using it run
    /// one at a time (`--test-threads=1`, as `cargo xtask test` runs them).
    pub fn in_pod<T: Send + 'static>(&self, netns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let cg = self.cgroup.as_ref().context("no cgroup v2 on this machine")?;
        let root = ferry_agent_cgroup_root().context("no cgroup v2 root")?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("not in a cgroup v2")?;
        let back = CgroupReturn(root.join(own.trim().trim_start_matches('/')));
        join_cgroup(cg)?;
        let out = crate::client::in_netns(netns, f);
        drop(back);
        out
    }

    /// Runs `program args` as a process of the node itself (host network: the
    /// node's network namespace, the node's cgroup), feeding it `input`; its
    /// standard output.
    pub fn host_run(&self, program: &str, args: &[&str], input: &str) -> Result<String> {
        let cg = self.cgroup.as_ref().context("no cgroup v2 on this machine")?;
        let script = format!("echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"", cg.display());
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node))
            .args(["sh", "-c", &script, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program} in node {}", self.node))?;
        std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} in node {}: {}",
                self.node,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_address_follows_the_agent_flags() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(metrics_addr(&[]).unwrap().to_string(), "127.0.0.1:10249");
        let moved = args(&["--xdp", "--metrics-bind-address", "0.0.0.0:10300"]);
        assert_eq!(metrics_addr(&moved).unwrap().to_string(), "127.0.0.1:10300");
        let last_wins = args(&[
            "--metrics-bind-address=127.0.0.1:1",
            "--metrics-bind-address=10.0.0.1:2",
        ]);
        assert_eq!(metrics_addr(&last_wins).unwrap().to_string(), "10.0.0.1:2");
        let off = metrics_addr(&args(&["--metrics-bind-address", ""])).unwrap_err();
        assert!(off.to_string().contains("serves no metrics"), "{off}");
    }
}
