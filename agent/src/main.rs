//! `ferry`: the agent, the lab's kubelet shim and echo server, and inspection.
use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{
    parser::ValueSource, ArgMatches, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum,
};
use ferry_agent::{dataplane, inspect, kubeproxy, kubeproxyconfig, logging, mountns, run, status, translate};
use ferry_common::{
    ct_timeouts, DEFAULT_BACKENDS_MAX, DEFAULT_SERVICES_MAX, DEFAULT_SNAT_PORTS, DEFAULT_SRC_RANGES_MAX,
};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "eBPF service dataplane for Kubernetes (kube-proxy replacement)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log format on standard error: text (coloured only on a terminal) or
    /// json (one object per line, for log pipelines).
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text, value_name = "FORMAT")]
    log_format: logging::LogFormat,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: program Services into the eBPF dataplane.
    Agent(Box<AgentArgs>),
    /// Services and their backends, as programmed in the maps.
    Svc {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// Connection-tracking entries of the dataplane.
    Ct {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// The dataplane's packet and drop counters (as in /metrics).
    Counters {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// Is this node healthy? Agent, syncs, attached programs, map fill, drops
    /// (exits 1 when unhealthy: usable as a probe).
    Status(StatusArgs),
    /// Remove Ferry from this node: detach every program it attached and
    /// remove its pin directory (refused while an agent runs, unless --force).
    Cleanup(CleanupArgs),
    /// A tiny kubelet for the lab: runs Pods of a manifest directory as processes.
    Shim(ferry_shim::ShimArgs),
    /// The lab's echo server: answers TCP lines, HTTP and UDP with its name.
    Echo(ferry_shim::EchoArgs),
}

#[derive(Args)]
struct NodeArgs {
    /// The node's name (default: $NODE_NAME, then the hostname); it names the
    /// default pin directory.
    #[arg(long, visible_alias = "node", env = "NODE_NAME")]
    node_name: Option<String>,
    /// Pin directory of the maps (default: /sys/fs/bpf/ferry/<node-name>).
    #[arg(long)]
    bpffs_dir: Option<PathBuf>,
}

impl NodeArgs {
    fn dir(&self) -> Result<PathBuf> {
        Ok(match &self.bpffs_dir {
            Some(d) => d.clone(),
            None => dataplane::default_bpffs_dir(&node_name(self.node_name.clone())?),
        })
    }
}

/// Where the agent writes its status report for `ferry status`.
#[derive(Args)]
struct StatusFileArg {
    /// The agent's status report (default: /run/ferry/status/<node-name>.json);
    /// for the agent, empty disables it.
    #[arg(long, value_name = "PATH")]
    status_file: Option<String>,
}

impl StatusFileArg {
    /// None: disabled (an empty path).
    fn path(&self, node: &str) -> Option<PathBuf> {
        match &self.status_file {
            Some(p) if p.is_empty() => None,
            Some(p) => Some(PathBuf::from(p)),
            None => Some(status::default_status_file(node)),
        }
    }
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    status_file: StatusFileArg,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = StatusOutput::Table)]
    output: StatusOutput,
}

#[derive(Args)]
struct CleanupArgs {
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    status_file: StatusFileArg,
    /// Clean up even while an agent holds the pin directory (it then serves
    /// nothing until restarted).
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StatusOutput {
    Table,
    Json,
}

#[derive(Subcommand)]
enum ListCmd {
    List {
        #[command(flatten)]
        node: NodeArgs,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// A table like `kubectl get`.
    Table,
    /// The table with ids and flags.
    Wide,
    Json,
}

#[derive(Args)]
struct AgentArgs {
    /// A kube-proxy configuration file (KubeProxyConfiguration,
    /// kubeproxy.config.k8s.io/v1alpha1): the fields that mean the same here set
    /// the matching flags (flags on the command line win); the others are
    /// logged by name.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Standalone mode: Kubernetes YAML in DIR (Services, EndpointSlices, Endpoints;
    /// Pods and Deployments are the shim's), watched for changes. Without it the
    /// agent runs in cluster mode and watches the Kubernetes API.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Cluster mode: the kubeconfig to reach the API server with (default: the
    /// in-cluster service account).
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Where shims publish Pod status (standalone mode).
    #[arg(long, default_value = ferry_podstate::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(flatten)]
    node: NodeArgs,
    /// Node devices (comma-separated), e.g. eth0: from-netdev is attached to them
    /// (NodePort/ExternalIP/LoadBalancer traffic, replies of backends on other
    /// nodes), from-pod to every other veth.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Also attach XDP to --devices: NodePort/ExternalIP/LoadBalancer flows to
    /// backends on other nodes, and their replies, are forwarded before the
    /// kernel builds an skb. Where XDP cannot attach, TC serves alone (logged).
    #[arg(long)]
    xdp: bool,
    /// How --xdp attaches: auto (native where the driver has it, else generic),
    /// native, or generic.
    #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
    xdp_mode: dataplane::XdpAttach,
    /// How the TC programs attach: tcx (bpf_links, kernel 6.6+), netlink
    /// (a cls_bpf filter on the clsact qdisc, any kernel), or auto (TCX where
    /// the kernel has it, probed at start; netlink otherwise).
    #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
    tc_attach: dataplane::TcAttach,
    /// Serve NodePorts on the node addresses within these CIDRs (comma-separated,
    /// IPv4 and IPv6; the dataplane serves IPv4 ones only for now);
    /// default: the addresses of --devices. Never loopback.
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...", value_parser = parse_cidr)]
    nodeport_addresses: Vec<ipnet::IpNet>,
    /// cgroup v2 directory for socket-level load balancing of the processes
    /// in it: the node's own and, with --socket-lb-pods, Pods' (default: the
    /// cgroup2 root, /sys/fs/cgroup or /sys/fs/cgroup/unified, which holds
    /// every Pod); "none" disables it.
    #[arg(long, value_name = "PATH")]
    cgroup_path: Option<PathBuf>,
    /// Socket-level load balancing for Pods too (sockets of network
    /// namespaces other than the node's, in --cgroup-path): ClusterIPs are
    /// translated at connect()/sendmsg(), no packet NAT or connection
    /// tracking. false: the node's own sockets only (Cilium's
    /// bpf-lb-sock-hostns-only); Pods' traffic then takes the TC path.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    socket_lb_pods: bool,
    /// Network namespaces (comma-separated; a NAME means /run/netns/NAME, or a
    /// path such as /proc/PID/ns/net) whose sockets socket-level load
    /// balancing leaves to the TC path (runtimes that need per-packet
    /// translation); looked up again every 2 s, so one created later counts
    /// once it exists.
    #[arg(long, value_delimiter = ',', value_name = "NETNS,...")]
    socket_lb_skip_netns: Vec<String>,
    /// The NodePort range, inclusive (a nodePort outside it is an error).
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    service_node_port_range: (u16, u16),
    /// ClusterIPs for Services without spec.clusterIP come from here: one
    /// range, or one per family comma-separated (10.96.0.0/12,fd00::/108, as
    /// kube-apiserver's); the first is the primary family.
    #[arg(long, default_value = "10.96.0.0/12", value_name = "CIDR[,CIDR]", value_parser = parse_service_cidrs)]
    service_cluster_ip_range: translate::ServiceCidrs,
    /// Entries of the services map (frontends + backend slots).
    #[arg(long, default_value_t = DEFAULT_SERVICES_MAX)]
    services_map_size: u32,
    /// Entries of the backends map.
    #[arg(long, default_value_t = DEFAULT_BACKENDS_MAX)]
    backends_map_size: u32,
    /// Entries of the TCP connection-tracking table (two per flow). A plain
    /// hash: established flows are never evicted for room; when it is full,
    /// new TCP flows are tracked in the any-table. Default: from the node's
    /// memory (0.25% of it, as Cilium's bpf-map-dynamic-size-ratio), at least
    /// 131072.
    #[arg(long)]
    ct_map_size: Option<u32>,
    /// Entries of the connection-tracking table for UDP (and TCP overflow),
    /// LRU. Default: half the TCP table's.
    #[arg(long)]
    ct_any_map_size: Option<u32>,
    /// Lifetime of an established TCP flow after its last packet
    /// (kube-proxy's conntrack.tcpEstablishedTimeout).
    #[arg(long, value_parser = parse_duration, default_value = secs(ct_timeouts::TCP))]
    ct_timeout_tcp: Duration,
    /// Lifetime of a TCP flow the backend has not answered (SYN sent).
    #[arg(long, value_parser = parse_duration, default_value = secs(ct_timeouts::TCP_SYN))]
    ct_timeout_tcp_syn: Duration,
    /// Lifetime of a TCP flow after a FIN or RST.
    #[arg(long, value_parser = parse_duration, default_value = secs(ct_timeouts::TCP_CLOSE))]
    ct_timeout_tcp_close: Duration,
    /// Lifetime of a UDP flow the backend has not answered (kube-proxy's
    /// conntrack.udpTimeout).
    #[arg(long, value_parser = parse_duration, default_value = secs(ct_timeouts::UDP))]
    ct_timeout_udp: Duration,
    /// Lifetime of a UDP flow the backend answered (conntrack.udpStreamTimeout).
    #[arg(long, value_parser = parse_duration, default_value = secs(ct_timeouts::UDP_STREAM))]
    ct_timeout_udp_stream: Duration,
    /// Source ports of north-south flows SNATed to a backend on another node,
    /// inclusive. Keep it outside net.ipv4.ip_local_port_range (the agent
    /// warns otherwise) so the node's own connections never collide.
    #[arg(long, value_parser = parse_port_range, default_value = port_range(DEFAULT_SNAT_PORTS))]
    snat_port_range: (u16, u16),
    /// How NodePort, ExternalIP and LoadBalancer flows reach a backend on
    /// another node: `snat` (to this node's address; replies come back
    /// through it), `dsr` (direct server return: the backend sees the
    /// client's address and its node answers the client directly; the
    /// frontend travels in an IPv4 option) or `hybrid` (DSR for TCP, SNAT for
    /// UDP). Use the same mode on every node.
    #[arg(long, value_enum, default_value_t = dataplane::NodePortMode::Snat, value_name = "MODE")]
    nodeport_mode: dataplane::NodePortMode,
    /// How new flows pick their backend: `random` (kube-proxy's) or `maglev`
    /// (consistent hashing of the client's address and port: every node
    /// picks the same backend for the same connection, and a backend change
    /// moves about 1/N of the clients). Per Service: the annotation
    /// `ferry.dev/lb-algorithm: random|maglev`.
    #[arg(long, value_enum, default_value_t = translate::LbAlgorithm::Random, value_name = "ALGORITHM")]
    lb_algorithm: translate::LbAlgorithm,
    /// Entries of one Maglev table: a prime, at most 131071 (Cilium's
    /// default 16381). Must be the same on every node.
    #[arg(long, default_value_t = ferry_common::DEFAULT_MAGLEV_TABLE_SIZE, value_parser = parse_maglev_table_size)]
    maglev_table_size: u32,
    /// Maglev tables the map holds (4 bytes × table size each): one per
    /// distinct backend set of the Maglev frontends, plus one while a set
    /// changes. Frontends beyond pick at random (logged).
    #[arg(long, default_value_t = ferry_common::DEFAULT_MAGLEV_TABLES, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    maglev_tables: u32,
    /// Entries of the loadBalancerSourceRanges trie (one per range and
    /// LoadBalancer frontend).
    #[arg(long, default_value_t = DEFAULT_SRC_RANGES_MAX)]
    src_ranges_map_size: u32,
    /// Coalesce bursts of changes: a sync happens at most this long after the
    /// first change of a burst.
    #[arg(long, default_value_t = 100)]
    sync_debounce_ms: u64,
    /// Full resync period in seconds (re-translates everything; writes only what
    /// differs). /healthz fails when no sync succeeded for twice this long.
    #[arg(long, default_value_t = 30)]
    sync_period_seconds: u64,
    /// Where /healthz, /readyz and /livez are served (kube-proxy's port); empty
    /// disables.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// Where /metrics is served (Prometheus text format; kube-proxy's port); empty
    /// disables.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
    #[command(flatten)]
    status_file: StatusFileArg,
    /// kube-proxy's rules on the node at start (KUBE-SERVICES in iptables
    /// legacy or nft, the nftables table kube-proxy): warn (log them with the
    /// cleanup command), fail (refuse to start) or ignore (do not look).
    #[arg(long, value_enum, default_value_t = kubeproxy::KubeProxyRules::Warn, value_name = "MODE")]
    kube_proxy_rules: kubeproxy::KubeProxyRules,
}

/// An optional listen address: empty means off.
fn listen_addr(flag: &str, value: &str) -> Result<Option<std::net::SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("{flag} {value:?}: want IP:PORT (or empty to disable)"))
}

/// A duration: "90s", "10m", "24h" (humantime), or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 30s, 10m, 24h)"))?,
    };
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?}: at least 1s"));
    }
    Ok(d)
}

/// A flag default of `n` seconds.
fn secs(n: u32) -> clap::builder::OsStr {
    format!("{n}s").into()
}

/// A flag default "LOW-HIGH".
fn port_range((lo, hi): (u16, u16)) -> clap::builder::OsStr {
    format!("{lo}-{hi}").into()
}

/// The default size of the TCP connection-tracking table on a node with
/// `mem_bytes` of memory: 0.25% of it (Cilium's bpf-map-dynamic-size-ratio)
/// at about 128 bytes an entry (key, value, the kernel's element header),
/// between 131072 and 4194304 entries.
fn ct_tcp_size_for(mem_bytes: u64) -> u32 {
    let entries = mem_bytes / 400 / 128;
    entries.clamp(131_072, 4_194_304) as u32
}

/// MemTotal of /proc/meminfo in bytes.
fn mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim();
    kb.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// The connection-tracking table sizes: the flags, or derived from memory.
fn ct_sizes(tcp: Option<u32>, any: Option<u32>) -> Result<ferry_agent::ct::Sizes> {
    let tcp = tcp.unwrap_or_else(|| mem_total().map_or(ferry_common::DEFAULT_CT_TCP_MAX, ct_tcp_size_for));
    let any = any.unwrap_or((tcp / 2).max(ferry_common::DEFAULT_CT_ANY_MAX.min(tcp)));
    if tcp == 0 || any == 0 {
        bail!("--ct-map-size and --ct-any-map-size must be at least 1");
    }
    Ok(ferry_agent::ct::Sizes { tcp, any })
}

/// A Maglev table size: a prime, 3 to 131071 (Cilium's upper bound).
fn parse_maglev_table_size(s: &str) -> Result<u32, String> {
    let m: u32 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(3..=131_071).contains(&m) || !ferry_agent::maglev::is_prime(m) {
        return Err(format!(
            "{m} is not a prime between 3 and 131071 (e.g. 251, 1021, 4093, 16381, 65521)"
        ));
    }
    Ok(m)
}

/// "LOW-HIGH", 1 <= LOW <= HIGH <= 65535.
/// `--socket-lb-skip-netns` entries: a bare name is one of `ip netns`'s
/// (/run/netns/NAME), anything with a slash a path.
fn netns_path(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        std::path::Path::new("/run/netns").join(name)
    }
}

/// A CIDR of either family: `--nodeport-addresses`.
fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse().map_err(|e| format!("{e}"))
}

/// `--service-cluster-ip-range`: one range per family.
fn parse_service_cidrs(s: &str) -> Result<translate::ServiceCidrs, String> {
    s.parse()
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected LOW-HIGH, e.g. 30000-32767"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo > hi {
        return Err(format!("{lo}-{hi}: the low end is above the high end"));
    }
    Ok((lo, hi))
}

fn node_name(flag: Option<String>) -> Result<String> {
    if let Some(n) = flag.filter(|n| !n.is_empty()) {
        return Ok(n);
    }
    let h = nix::unistd::gethostname().context("hostname")?;
    Ok(h.to_string_lossy().into_owned())
}

/// Errors end the process with status 1 and the whole cause chain on one line
/// (not a backtrace, whatever RUST_BACKTRACE says).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    logging::init(cli.log_format);
    // Before any thread exists (setns into a mount namespace requires it).
    if let Some(pid) = mountns::rejoin_launcher_mount_ns()? {
        tracing::debug!(pid, "joined the mount namespace of PID {pid} (ip netns exec)");
    }
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        Cmd::Agent(a) => {
            let cfg = agent_config(*a, matches.subcommand_matches("agent"))?;
            rt.block_on(run::run(cfg))
        }
        Cmd::Shim(a) => rt.block_on(ferry_shim::run_shim(a)),
        Cmd::Echo(a) => rt.block_on(ferry_shim::run_echo(a)),
        Cmd::Status(a) => rt.block_on(print_status(a)),
        Cmd::Cleanup(a) => rt.block_on(cleanup(a)),
        Cmd::Svc {
            cmd: ListCmd::List { node, output },
        } => print_list(&inspect::services(&node.dir()?)?, output, inspect::print_services),
        Cmd::Ct {
            cmd: ListCmd::List { node, output },
        } => print_list(&inspect::connections(&node.dir()?)?, output, |rows, _| {
            inspect::print_connections(rows)
        }),
        Cmd::Counters {
            cmd: ListCmd::List { node, output },
        } => print_list(&inspect::counters(&node.dir()?)?, output, |rows, _| {
            inspect::print_counters(rows)
        }),
    }
}

/// Prints the rows of an inspection command as a table (`table(rows, wide)`)
/// or as JSON.
fn print_list<T: serde::Serialize>(rows: &[T], output: Output, table: impl Fn(&[T], bool) -> String) -> Result<()> {
    match output {
        Output::Table | Output::Wide => print!("{}", table(rows, output == Output::Wide)),
        Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
    }
    Ok(())
}

/// `ferry status`: prints the status; an unhealthy node is an error (exit 1).
async fn print_status(a: StatusArgs) -> Result<()> {
    let node = node_name(a.node.node_name.clone())?;
    let opts = status::Options {
        bpffs_dir: a.node.dir()?,
        status_file: a
            .status_file
            .path(&node)
            .unwrap_or_else(|| status::default_status_file(&node)),
    };
    let s = status::gather(&opts).await?;
    match a.output {
        StatusOutput::Table => print!("{}", status::print(&s)),
        StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&s)?),
    }
    if !s.healthy {
        bail!("unhealthy: {}", s.problems.join("; "));
    }
    Ok(())
}

/// `ferry cleanup`: says what it removed.
async fn cleanup(a: CleanupArgs) -> Result<()> {
    let node = node_name(a.node.node_name.clone())?;
    let dir = a.node.dir()?;
    let done = ferry_agent::cleanup::cleanup(&dir, a.status_file.path(&node).as_deref(), a.force).await?;
    for line in &done {
        println!("{line}");
    }
    if done.is_empty() {
        println!("nothing of Ferry's found for {}", dir.display());
    }
    Ok(())
}

/// Applies `--config FILE` to the flags that were not given (on the command
/// line or by environment): the file overrides defaults, flags override the
/// file.
fn apply_config_file(a: &mut AgentArgs, given: Option<&ArgMatches>) -> Result<()> {
    let Some(path) = a.config.clone() else {
        return Ok(());
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let loaded = kubeproxyconfig::load(&path, cpus)?;
    for field in &loaded.ignored {
        tracing::warn!(file = %path.display(), "--config: {field}");
    }
    let unset = |id: &str| {
        !matches!(
            given.and_then(|m| m.value_source(id)),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let s = loaded.settings;
    set(unset("node_name"), &mut a.node.node_name, s.node_name.map(Some));
    set(
        unset("kubeconfig") && a.manifests.is_none(),
        &mut a.kubeconfig,
        s.kubeconfig.map(Some),
    );
    set(
        unset("healthz_bind_address"),
        &mut a.healthz_bind_address,
        s.healthz_bind_address,
    );
    set(
        unset("metrics_bind_address"),
        &mut a.metrics_bind_address,
        s.metrics_bind_address,
    );
    set(
        unset("nodeport_addresses"),
        &mut a.nodeport_addresses,
        s.nodeport_addresses,
    );
    set(unset("ct_map_size"), &mut a.ct_map_size, s.ct_map_size.map(Some));
    set(unset("ct_timeout_tcp"), &mut a.ct_timeout_tcp, s.ct_timeout_tcp);
    set(unset("ct_timeout_udp"), &mut a.ct_timeout_udp, s.ct_timeout_udp);
    set(
        unset("ct_timeout_udp_stream"),
        &mut a.ct_timeout_udp_stream,
        s.ct_timeout_udp_stream,
    );
    set(
        unset("sync_period_seconds"),
        &mut a.sync_period_seconds,
        s.sync_period_seconds,
    );
    set(unset("sync_debounce_ms"), &mut a.sync_debounce_ms, s.sync_debounce_ms);
    Ok(())
}

/// `*slot = value` when `unset` and the file has a value.
fn set<T>(unset: bool, slot: &mut T, value: Option<T>) {
    if let (true, Some(v)) = (unset, value) {
        *slot = v;
    }
}

/// The agent's configuration from its flags (and `--config`).
fn agent_config(mut a: AgentArgs, given: Option<&ArgMatches>) -> Result<run::Config> {
    apply_config_file(&mut a, given)?;
    let mode = match a.manifests {
        Some(manifests) => run::Mode::Standalone {
            manifests,
            state_dir: a.state_dir,
        },
        None => run::Mode::Cluster {
            kubeconfig: a.kubeconfig,
        },
    };
    if a.sync_period_seconds == 0 {
        bail!("--sync-period-seconds must be at least 1");
    }
    let sync_period = Duration::from_secs(a.sync_period_seconds);
    let node = node_name(a.node.node_name.clone())?;
    let bpffs_dir = match a.node.bpffs_dir {
        Some(d) => d,
        None => dataplane::default_bpffs_dir(&node),
    };
    let pod_endpoints = matches!(mode, run::Mode::Standalone { .. });
    let status_file = a.status_file.path(&node);
    Ok(run::Config {
        mode,
        translate: translate::Config {
            families: translate::Families::default(),
            service_cidrs: a.service_cluster_ip_range,
            pod_endpoints,
            node: node.clone(),
            nodeport_addrs: Vec::new(),
            node_port_range: a.service_node_port_range,
            lb_algorithm: a.lb_algorithm,
        },
        nodeport_cidrs: a.nodeport_addresses,
        cgroup: match a.cgroup_path {
            Some(p) if p.as_os_str() == "none" => None,
            Some(p) => Some(p),
            None => {
                let found =
                    dataplane::default_cgroup(&std::fs::read_to_string("/proc/self/mounts").unwrap_or_default());
                if found.is_none() {
                    tracing::warn!(
                        "no cgroup v2 mount found: node processes get no socket load balancing (--cgroup-path)"
                    );
                }
                found
            }
        },
        socket_lb_pods: a.socket_lb_pods,
        socket_lb_skip: a.socket_lb_skip_netns.iter().map(|n| netns_path(n)).collect(),
        node,
        devices: a.devices,
        xdp: a.xdp.then_some(a.xdp_mode),
        dataplane: dataplane::Config {
            bpffs_dir,
            tc_attach: a.tc_attach,
            services_max: a.services_map_size,
            backends_max: a.backends_map_size,
            ct: ct_sizes(a.ct_map_size, a.ct_any_map_size)?,
            src_ranges_max: a.src_ranges_map_size,
            maglev: dataplane::MaglevConfig {
                table_size: a.maglev_table_size,
                tables: a.maglev_tables,
            },
        },
        ct: dataplane::CtConfig {
            timeout_tcp_syn: a.ct_timeout_tcp_syn,
            timeout_tcp: a.ct_timeout_tcp,
            timeout_tcp_close: a.ct_timeout_tcp_close,
            timeout_udp: a.ct_timeout_udp,
            timeout_udp_stream: a.ct_timeout_udp_stream,
            snat_ports: a.snat_port_range,
            nodeport_mode: a.nodeport_mode,
        },
        debounce: Duration::from_millis(a.sync_debounce_ms),
        sync_period,
        healthz_timeout: 2 * sync_period,
        healthz_addr: listen_addr("--healthz-bind-address", &a.healthz_bind_address)?,
        metrics_addr: listen_addr("--metrics-bind-address", &a.metrics_bind_address)?,
        status_file,
        kube_proxy_rules: a.kube_proxy_rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's configuration for a command line.
    fn config(args: &[&str]) -> run::Config {
        let m = Cli::command().try_get_matches_from(args).unwrap();
        let Cmd::Agent(a) = Cli::from_arg_matches(&m).unwrap().cmd else {
            panic!("not the agent: {args:?}")
        };
        agent_config(*a, m.subcommand_matches("agent")).unwrap()
    }

    #[test]
    fn a_kube_proxy_configuration_drives_the_same_config_as_the_flags_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("ferry-kpconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kube-proxy.yaml");
        std::fs::write(
            &file,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
             kind: KubeProxyConfiguration\n\
             hostnameOverride: node-7\n\
             clientConnection: {kubeconfig: /etc/kube/kp.conf}\n\
             healthzBindAddress: 127.0.0.1:10266\n\
             metricsBindAddress: 127.0.0.1:10267\n\
             nodePortAddresses: [192.168.0.0/16]\n\
             conntrack: {maxPerCore: 1, min: 100000, tcpEstablishedTimeout: 2h0m0s, udpStreamTimeout: 5m0s}\n\
             syncPeriod: 45s\n\
             minSyncPeriod: 250ms\n\
             mode: ipvs\n",
        )
        .unwrap();
        let path = file.display().to_string();
        let from_file = config(&["ferry", "agent", "--config", &path, "--cgroup-path", "none"]);
        let from_flags = config(&[
            "ferry",
            "agent",
            "--node-name",
            "node-7",
            "--kubeconfig",
            "/etc/kube/kp.conf",
            "--healthz-bind-address",
            "127.0.0.1:10266",
            "--metrics-bind-address",
            "127.0.0.1:10267",
            "--nodeport-addresses",
            "192.168.0.0/16",
            "--ct-map-size",
            "200000",
            "--ct-timeout-tcp",
            "2h",
            "--ct-timeout-udp-stream",
            "300",
            "--sync-period-seconds",
            "45",
            "--sync-debounce-ms",
            "250",
            "--cgroup-path",
            "none",
        ]);
        assert_eq!(format!("{from_file:?}"), format!("{from_flags:?}"));
        assert_eq!(
            from_file.dataplane.ct.tcp, 200000,
            "100000 connections, two entries each"
        );
        assert_eq!(
            from_file.ct.timeout_tcp,
            Duration::from_secs(7200),
            "conntrack.tcpEstablishedTimeout"
        );
        assert_eq!(
            from_file.ct.timeout_udp_stream,
            Duration::from_secs(300),
            "conntrack.udpStreamTimeout"
        );

        let mixed = config(&[
            "ferry",
            "agent",
            "--config",
            &path,
            "--healthz-bind-address",
            "127.0.0.1:1",
            "--node-name",
            "n2",
            "--cgroup-path",
            "none",
        ]);
        assert_eq!(
            mixed.healthz_addr,
            Some("127.0.0.1:1".parse().unwrap()),
            "the flag wins"
        );
        assert_eq!(mixed.node, "n2", "the flag wins");
        assert_eq!(
            mixed.metrics_addr, from_file.metrics_addr,
            "the file still sets the rest"
        );
        assert_eq!(mixed.sync_period, Duration::from_secs(45));

        let standalone = config(&[
            "ferry",
            "agent",
            "--config",
            &path,
            "--manifests",
            "/tmp",
            "--cgroup-path",
            "none",
        ]);
        assert!(
            matches!(standalone.mode, run::Mode::Standalone { .. }),
            "clientConnection.kubeconfig does not turn --manifests into cluster mode"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn socket_lb_serves_pods_by_default_and_the_escape_hatches_parse() {
        let default = config(&["ferry", "agent", "--manifests", "/tmp", "--cgroup-path", "none"]);
        assert!(default.socket_lb_pods, "on by default");
        assert!(default.socket_lb_skip.is_empty());
        let off = config(&[
            "ferry",
            "agent",
            "--manifests",
            "/tmp",
            "--cgroup-path",
            "none",
            "--socket-lb-pods=false",
            "--socket-lb-skip-netns",
            "pod-a,/proc/1/ns/net",
        ]);
        assert!(!off.socket_lb_pods);
        assert_eq!(
            off.socket_lb_skip,
            [PathBuf::from("/run/netns/pod-a"), PathBuf::from("/proc/1/ns/net")]
        );
        let bad =
            Cli::command().try_get_matches_from(["ferry", "agent", "--manifests", "/tmp", "--socket-lb-pods=maybe"]);
        assert!(
            bad.is_err_and(|e| e.to_string().contains("--socket-lb-pods")),
            "a bad value names the flag"
        );
    }

    #[test]
    fn address_flags_take_both_families_and_refuse_two_ranges_of_one_naming_the_flag() {
        let c = config(&[
            "ferry",
            "agent",
            "--service-cluster-ip-range",
            "10.100.0.0/16",
            "--nodeport-addresses",
            "192.168.0.0/16,10.0.0.0/8",
            "--cgroup-path",
            "none",
        ]);
        assert_eq!(c.translate.service_cidrs.to_string(), "10.100.0.0/16");
        assert_eq!(c.translate.service_cidrs.v6, None);
        assert_eq!(c.translate.families, translate::Families::IPV4);
        let cidrs: Vec<String> = c.nodeport_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(cidrs, ["192.168.0.0/16", "10.0.0.0/8"]);
        // Both families, IPv6 first: the primary family is IPv6; the
        // frontend gate takes the IPv4 range.
        let dual = config(&[
            "ferry",
            "agent",
            "--service-cluster-ip-range",
            "fd00::/108,10.96.0.0/12",
            "--nodeport-addresses",
            "10.0.0.0/8,fd00:1::/64",
            "--cgroup-path",
            "none",
        ]);
        let sc = dual.translate.service_cidrs;
        assert_eq!(sc.primary, translate::Family::V6);
        assert_eq!(sc.v4, Some("10.96.0.0/12".parse().unwrap()));
        assert_eq!(sc.v6, Some("fd00::/108".parse().unwrap()));
        let cidrs: Vec<String> = dual.nodeport_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(cidrs, ["10.0.0.0/8", "fd00:1::/64"]);
        let default = config(&["ferry", "agent", "--cgroup-path", "none"]);
        assert_eq!(default.translate.service_cidrs.to_string(), "10.96.0.0/12");
        for (flag, value, why) in [
            (
                "--service-cluster-ip-range",
                "10.96.0.0/12,10.100.0.0/16",
                "two IPv4 ranges",
            ),
            ("--service-cluster-ip-range", "fd00::/108,fd01::/108", "two IPv6 ranges"),
            (
                "--service-cluster-ip-range",
                "10.96.0.0/12,fd00::/108,fd01::/108",
                "at most two ranges",
            ),
            (
                "--service-cluster-ip-range",
                "10.96.0.0/33",
                "invalid IP address syntax",
            ),
            (
                "--nodeport-addresses",
                "10.0.0.0/8,fd00::/129",
                "invalid IP address syntax",
            ),
        ] {
            let e = Cli::command()
                .try_get_matches_from(["ferry", "agent", flag, value])
                .expect_err(value)
                .to_string();
            assert!(e.contains(flag) && e.contains(why), "{value}: {e}");
        }
    }
}
