//! `cargo xtask bench`: Ferry side by side with kube-proxy's iptables and
//! nftables rulesets and with no service translation at all, in one lab, in the
//! same run, interleaved and repeated.
//!
//! One lab node (network namespaces, like the tests): a client Pod and ten
//! server Pods (`ferry-loadgen serve`). For every N (Services with ten endpoints
//! each; the measured one last) and every round, each data path is set up from
//! cold, measured with `ferry-loadgen` from the client Pod, and torn down again,
//! so that no path pays for another's state (kube-proxy's rules run through
//! iptables-nft / nft, whose tables and conntrack hooks go away when deleted).
//! The order of the paths rotates from round to round.
//!
//! Data paths: no-NAT (the client dials a server Pod directly: the limit),
//! iptables, nftables, ferry (the TC path: `--socket-lb-pods=false`), ferry
//! (socket LB) (the same agent with socket-level load balancing for Pods, the
//! load generator in the node's cgroup), and north-south only ferry-xdp (the
//! same agent with `--xdp`), ferry-maglev (with `--lb-algorithm maglev`) and
//! ferry-dsr (`--nodeport-mode dsr`, the agent on both nodes).
//! Results go to target/bench/ as Markdown and JSON.
//!
//! Topologies: same-node and cross-node (a client Pod dials a ClusterIP) by
//! default; north-south on request (`--topology north-south`): the external
//! client dials node 1's NodePort and the servers run on node 2, so every flow
//! is DNAT+SNAT on node 1 and forwarded across the underlay, the replies back
//! through node 1: what XDP accelerates.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ferry_bench::{
    iptables,
    loadgen::Report,
    manifests, nftables,
    scenario::{self, Scenario},
    stats::Summary,
};
use ferry_common::{PROG_FROM_NETDEV, PROG_FROM_POD, PROG_XDP_FROM_NETDEV};
use ferry_tests::{
    cluster::{node_addr, pod_cidr, Cluster, EXTERNAL_ADDR},
    in_netns,
    manifests::{client_pod, on_node},
    sys, Lab, Syncs,
};
use serde::Serialize;

const SERVERS: usize = 10;
/// Bound of the per-round sanity check (a balanced path misses one of ten
/// servers in 400 random picks with a probability of about 1e-17).
const SANITY_QUERIES: usize = 400;
const CLIENT: &str = "client";
/// The measured Service's ports, as the scenario defines them.
const TCP_PORT: u16 = scenario::TCP_PORT.1;
const UDP_PORT: u16 = scenario::UDP_PORT.1;
const STREAM_PORT: u16 = scenario::STREAM_PORT.1;
/// The servers' ports (targetPorts; what no-NAT dials): one for TCP and UDP
/// requests, one for the stream.
const SERVER_PORT: u16 = scenario::TCP_PORT.3;
const SERVER_SINK: u16 = scenario::STREAM_PORT.3;
const _: () = assert!(scenario::UDP_PORT.3 == SERVER_PORT);

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Smaller N set (1 and 1,000), shorter measurements: a couple of minutes.
    #[arg(long)]
    quick: bool,
    /// Numbers of Services, comma-separated (default 1,1000,10000; --quick 1,1000).
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<usize>>,
    /// Rounds per N (default 3); each path is measured once per round.
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per measurement (default 3; --quick 1).
    #[arg(long)]
    duration: Option<f64>,
    /// Concurrent client connections for CRR, RR and UDP.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// kube-proxy's iptables backend: legacy (x_tables) or nft (iptables-nft).
    #[arg(long, value_enum, default_value_t = IptablesBackend::Legacy)]
    iptables: IptablesBackend,
    /// Where the client and the servers run (comma-separated: same-node,
    /// cross-node, north-south; default same-node,cross-node).
    #[arg(long, value_delimiter = ',', value_enum)]
    topology: Option<Vec<Topology>>,
    /// Only these data paths (comma-separated: no-nat, iptables, nftables,
    /// ferry, ferry-socklb, ferry-xdp, ferry-maglev, ferry-dsr; default all;
    /// ferry-socklb is measured same-node and cross-node only, ferry-xdp,
    /// ferry-maglev and ferry-dsr north-south only).
    #[arg(long, value_delimiter = ',', value_enum)]
    paths: Option<Vec<DataPath>>,
    /// Use the debug build (checks the harness; figures are not comparable).
    #[arg(long)]
    debug: bool,
    /// Where the results go (default target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Instead of the data paths: the control plane alone (cold start, RSS,
    /// one endpoint change inside the agent and end to end, a sustained
    /// stream of changes), standalone and cluster mode, at --services N
    /// (default 10000,100000; --quick 2000). Results in control-plane.md.
    #[arg(long)]
    control_plane: bool,
    /// Instead of the data paths: the conntrack garbage collector on a TCP
    /// table of this many entries, half of them dead (e.g. 1000000), against
    /// a read-only walk of the same table.
    #[arg(long, value_name = "ENTRIES")]
    gc: Option<u32>,
}

impl Args {
    /// What `cargo xtask test` runs to keep the control-plane benchmark
    /// working: --control-plane --quick at N=1000, debug build.
    pub fn control_plane_check() -> Self {
        Self {
            control_plane: true,
            services: Some(vec![1000]),
            out: Some(crate::root().join("target/bench/ci")),
            ..Self::harness_check()
        }
    }

    /// What `cargo xtask test` runs to keep the harness working: --quick with
    /// N=1, short measurements, the debug build, results under target/bench/ci.
    pub fn harness_check() -> Self {
        Self {
            quick: true,
            services: Some(vec![1]),
            rounds: Some(2),
            duration: Some(0.5),
            workers: 4,
            paths: None,
            topology: None,
            iptables: IptablesBackend::Legacy,
            debug: true,
            out: Some(crate::root().join("target/bench/ci")),
            control_plane: false,
            gc: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IptablesBackend {
    Legacy,
    Nft,
}

impl IptablesBackend {
    fn restore(self) -> &'static str {
        match self {
            IptablesBackend::Legacy => "iptables-legacy-restore",
            IptablesBackend::Nft => "iptables-nft-restore",
        }
    }
}

/// Where the servers run relative to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// Client and servers on one node.
    SameNode,
    /// The client on node 1, the servers on node 2, across the underlay: the
    /// client's node translates, the servers' node only routes.
    CrossNode,
    /// The external client (outside the cluster, no route to Pods) dials node
    /// 1's NodePort; the servers run on node 2: node 1 translates (DNAT to the
    /// server, SNAT to its own address, externalTrafficPolicy Cluster) and
    /// forwards across the underlay; the replies come back through node 1.
    NorthSouth,
}

impl Topology {
    fn title(self) -> &'static str {
        match self {
            Topology::SameNode => "client and servers on one node",
            Topology::CrossNode => "servers on another node",
            Topology::NorthSouth => "external client to node 1's NodePort, servers on node 2",
        }
    }

    /// The rows' label in the tables.
    fn place(self) -> &'static str {
        match self {
            Topology::SameNode => "same node",
            Topology::CrossNode => "other node",
            Topology::NorthSouth => "north-south NodePort",
        }
    }

    /// Lab nodes: the servers run on the last.
    fn nodes(self) -> usize {
        match self {
            Topology::SameNode => 1,
            Topology::CrossNode | Topology::NorthSouth => 2,
        }
    }
}

/// One benchmarked case: a topology and a number of Services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Case {
    topology: Topology,
    services: usize,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "N={} {}", self.services, self.title_short())
    }
}

impl Case {
    fn title_short(&self) -> &'static str {
        match self.topology {
            Topology::SameNode => "same-node",
            Topology::CrossNode => "cross-node",
            Topology::NorthSouth => "north-south",
        }
    }
}

/// Every control-plane step (rules loaded, agent synced) must finish within this.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DataPath {
    NoNat,
    Iptables,
    Nftables,
    /// The agent with TC programs only (socket LB for Pods off).
    Ferry,
    /// The same agent with socket-level load balancing for Pods (its
    /// default): the load generator runs in the node's cgroup, as a Pod's
    /// processes do, so its TCP connections are pointed at a backend at
    /// connect() (its UDP sockets are connected: those stay per packet).
    FerrySocklb,
    /// The same agent with `--xdp` (default mode: generic XDP on the lab's
    /// veths) in front of TC.
    FerryXdp,
    /// The agent (TC) with `--lb-algorithm maglev`: backends chosen by a
    /// Maglev table lookup instead of a random slot.
    FerryMaglev,
    /// The agent (TC) with `--nodeport-mode dsr` on both nodes: node 1
    /// forwards to node 2's backends without SNAT (the frontend in an IPv4
    /// option), and node 2 replies to the client directly.
    FerryDsr,
}

const PATHS: [DataPath; 8] = [
    DataPath::NoNat,
    DataPath::Iptables,
    DataPath::Nftables,
    DataPath::Ferry,
    DataPath::FerrySocklb,
    DataPath::FerryXdp,
    DataPath::FerryMaglev,
    DataPath::FerryDsr,
];

impl DataPath {
    fn name(self) -> &'static str {
        match self {
            DataPath::NoNat => "no-NAT",
            DataPath::Iptables => "iptables",
            DataPath::Nftables => "nftables",
            DataPath::Ferry => "ferry",
            DataPath::FerrySocklb => "ferry (socket LB)",
            DataPath::FerryXdp => "ferry-xdp",
            DataPath::FerryMaglev => "ferry-maglev",
            DataPath::FerryDsr => "ferry-dsr",
        }
    }

    /// Ferry's agent runs (with or without XDP).
    fn is_ferry(self) -> bool {
        matches!(
            self,
            DataPath::Ferry | DataPath::FerrySocklb | DataPath::FerryXdp | DataPath::FerryMaglev | DataPath::FerryDsr
        )
    }

    /// XDP acts only on traffic that enters a node device for a
    /// NodePort/ExternalIP/LoadBalancer frontend with a backend on another
    /// node (and its replies): elsewhere ferry-xdp would measure ferry again.
    /// Socket LB serves sockets of the node and its Pods, never an external
    /// client's: north-south it would measure ferry again. ferry-maglev is
    /// the north-south row of Maglev against random (SNAT both).
    fn measured_in(self, topology: Topology) -> bool {
        match self {
            DataPath::FerryXdp | DataPath::FerryMaglev | DataPath::FerryDsr => topology == Topology::NorthSouth,
            DataPath::FerrySocklb => topology != Topology::NorthSouth,
            _ => true,
        }
    }

    /// The agent's flags beyond the lab's `--devices eth0`.
    fn agent_args(self) -> &'static [&'static str] {
        match self {
            DataPath::Ferry => &["--socket-lb-pods=false"],
            DataPath::FerryXdp => &["--xdp", "--socket-lb-pods=false"],
            // Every Service has its own backends, so its own table: 10,000
            // tables of 251 entries (10 MB) instead of the default 16381
            // (the lookup per new flow is the same whatever the size).
            DataPath::FerryMaglev => &[
                "--lb-algorithm",
                "maglev",
                "--maglev-table-size",
                "251",
                "--maglev-tables",
                "10240",
                "--socket-lb-pods=false",
            ],
            DataPath::FerryDsr => &["--nodeport-mode", "dsr", "--socket-lb-pods=false"],
            _ => &[],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Metric {
    CrrPerS,
    RrPerS,
    RrP50Us,
    RrP99Us,
    UdpPerS,
    StreamGbitPerS,
    CrrCpuUs,
    RrCpuUs,
    UdpCpuUs,
    /// Control plane: from nothing to all N Services programmed.
    ColdStartMs,
    /// Control plane: one endpoint of the measured Service replaced.
    EndpointChangeMs,
    /// Agent resident memory with N Services programmed.
    AgentRssMib,
    /// Failed connections/requests in the measurements (timeouts, resets).
    Errors,
    /// Time in Ferry's BPF programs per CRR connection (all hooks, from the
    /// kernel's run-time statistics).
    CrrBpfNs,
    /// Time in Ferry's BPF programs per RR request (both directions).
    RrBpfNs,
    /// BPF_PROG_TEST_RUN of the agent's program: a new flow's first packet.
    TestRunNewFlowNs,
    /// BPF_PROG_TEST_RUN: a packet of a tracked flow.
    TestRunEstablishedNs,
    /// BPF_PROG_TEST_RUN: a packet no Service matches.
    TestRunUntranslatedNs,
}

impl Metric {
    fn title(self) -> &'static str {
        match self {
            Metric::CrrPerS => "TCP connect/request/response/close (CRR), connections per second",
            Metric::RrPerS => "TCP request/response on persistent connections (RR), requests per second",
            Metric::RrP50Us => "RR latency p50, microseconds",
            Metric::RrP99Us => "RR latency p99, microseconds",
            Metric::UdpPerS => "UDP request/response, requests per second",
            Metric::StreamGbitPerS => "Single-stream TCP throughput, Gbit/s",
            Metric::CrrCpuUs => "CPU per CRR connection (all cores, /proc/stat), microseconds",
            Metric::RrCpuUs => "CPU per RR request, microseconds",
            Metric::UdpCpuUs => "CPU per UDP request, microseconds",
            Metric::ColdStartMs => "Control plane: cold start to all N Services programmed, ms",
            Metric::EndpointChangeMs => "Control plane: one endpoint change reaching the dataplane, ms",
            Metric::AgentRssMib => "Agent resident memory with N Services, MiB",
            Metric::Errors => "Failed requests per round (connect errors, timeouts, resets)",
            Metric::CrrBpfNs => "Time in Ferry's BPF programs per CRR connection (kernel run-time statistics), ns",
            Metric::RrBpfNs => {
                "Time in Ferry's BPF programs per RR request, both directions (kernel run-time statistics), ns"
            }
            Metric::TestRunNewFlowNs => {
                "BPF_PROG_TEST_RUN: a new flow's first packet in the entry program (from_pod for a ClusterIP, from_netdev or \
                 xdp_from_netdev for a NodePort), ns"
            }
            Metric::TestRunEstablishedNs => "BPF_PROG_TEST_RUN: a packet of a tracked flow in the entry program, ns",
            Metric::TestRunUntranslatedNs => {
                "BPF_PROG_TEST_RUN: a packet no Service matches (Pod to Pod, or to a node port nobody serves), ns"
            }
        }
    }

    fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::CrrPerS | Metric::RrPerS | Metric::UdpPerS | Metric::StreamGbitPerS
        )
    }
}

/// Samples per (case, metric, path).
type Samples = BTreeMap<(Case, Metric, DataPath), Vec<f64>>;

struct Plan {
    topologies: Vec<Topology>,
    iptables: IptablesBackend,
    ns: Vec<usize>,
    paths: Vec<DataPath>,
    /// --paths was given (a path skipped for a topology is then noted).
    paths_explicit: bool,
    rounds: usize,
    duration: f64,
    workers: usize,
    profile: &'static str,
}

impl Plan {
    fn from(args: &Args) -> Result<Self> {
        let ns = args.services.clone().unwrap_or(if args.quick {
            vec![1, 1000]
        } else {
            vec![1, 1000, 10_000]
        });
        if ns.is_empty() || ns.iter().any(|n| !(1..=scenario::SERVICES_MAX).contains(n)) {
            bail!("--services: every N must be within 1..={}", scenario::SERVICES_MAX);
        }
        let rounds = args.rounds.unwrap_or(3);
        if !(1..=20).contains(&rounds) {
            bail!("--rounds must be within 1..=20");
        }
        let duration = args.duration.unwrap_or(if args.quick { 1.0 } else { 3.0 });
        if !(0.1..=60.0).contains(&duration) {
            bail!("--duration must be within 0.1..=60 seconds");
        }
        let paths = args.paths.clone().unwrap_or(PATHS.to_vec());
        if paths.is_empty() {
            bail!("--paths: name at least one data path");
        }
        let topologies = args
            .topology
            .clone()
            .unwrap_or(vec![Topology::SameNode, Topology::CrossNode]);
        if topologies.is_empty() {
            bail!("--topology: name at least one");
        }
        Ok(Self {
            topologies,
            iptables: args.iptables,
            ns,
            paths,
            paths_explicit: args.paths.is_some(),
            rounds,
            duration,
            workers: args.workers,
            profile: if args.debug { "debug" } else { "release" },
        })
    }
}

pub fn run(args: Args) -> Result<()> {
    if let Some(entries) = args.gc {
        println!("xtask: the conntrack garbage collector at {entries} entries (release build)");
        return crate::run_cmd(crate::cargo().args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "ferry",
            "--example",
            "ct_gc_bench",
            "--",
            "--entries",
            &entries.to_string(),
        ]));
    }
    if args.control_plane {
        return crate::control_plane::run(&crate::control_plane::Plan {
            ns: args
                .services
                .clone()
                .unwrap_or(if args.quick { vec![2000] } else { vec![10_000, 100_000] }),
            quick: args.quick,
            profile: if args.debug { "debug" } else { "release" },
            out: args.out.clone().unwrap_or_else(|| crate::root().join("target/bench")),
        });
    }
    let plan = Plan::from(&args)?;
    // The tree measured: what is built now, not what is checked out at the end.
    let measured = commit();
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst));
    let out_dir = args.out.clone().unwrap_or_else(|| crate::root().join("target/bench"));
    build(&plan)?;
    let bin = crate::root().join("target").join(plan.profile);
    // The lab starts `ferry` from here (ferry_tests::sys::ferry_bin).
    std::env::set_var("FERRY_BIN", bin.join("ferry"));
    for tool in [plan.iptables.restore(), "nft"] {
        which(tool).with_context(|| format!("{tool} is missing: run `cargo xtask setup`"))?;
    }
    let mut notes = Vec::new();
    let stats = crate::bpfstats::enable();
    if let Err(e) = &stats {
        notes.push(format!("no BPF run-time statistics: {e:#}"));
    }
    let mut ctx = Ctx {
        loadgen: bin.join("ferry-loadgen"),
        plan: &plan,
        samples: Samples::new(),
        answered: BTreeMap::new(),
        notes,
        files: None,
        xdp: Vec::new(),
        bpf_stats: stats.is_ok(),
        bpf: Vec::new(),
    };
    let started = Instant::now();
    for &topology in &plan.topologies {
        for &n in &plan.ns {
            ctx.bench_case(Case { topology, services: n })?;
        }
    }
    let mut report = Output::new(
        &plan,
        measured,
        ctx.samples,
        ctx.answered,
        ctx.notes,
        ctx.xdp,
        started.elapsed(),
    );
    report.bpf = ctx.bpf;
    report.write(&out_dir)
}

fn build(plan: &Plan) -> Result<()> {
    println!("bench: building the agent and the load generator ({})", plan.profile);
    let mut cmd = crate::cargo();
    cmd.args(["build", "--package", "ferry", "--package", "ferry-bench", "--bins"]);
    if plan.profile == "release" {
        cmd.arg("--release");
    }
    crate::run_cmd(&mut cmd)
}

fn server_pod(i: usize, loadgen: &Path) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: srv-{i}
  namespace: default
  labels:
    app: bench
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: server
      command: ["{bin}", "serve", "--tcp", "{SERVER_PORT}", "--udp", "{SERVER_PORT}", "--sink", "{SERVER_SINK}", "--name", "srv-{i}"]
      readinessProbe:
        tcpSocket:
          port: {SERVER_PORT}
        periodSeconds: 1
"#,
        bin = loadgen.display()
    )
}

/// A fresh lab for one measurement of one path: node 1 (with the client Pod,
/// except north-south, where the client is the lab's external namespace) and,
/// cross-node and north-south, a second node with the server Pods; nothing
/// else runs. The path is set up on node 1 (the client's node, or north-south
/// the node dialled). Dropping it removes everything (namespaces, rules,
/// pinned maps and links, processes).
struct Node {
    cluster: Cluster,
    topology: Topology,
    /// The load generator's network namespace.
    client: String,
    servers: Vec<Ipv4Addr>,
}

impl Node {
    /// The lab for `path`: its agent flags are set here (`start_agent_on`
    /// starts the agent later, timed, if the path is ferry's).
    fn start(loadgen: &Path, topology: Topology, path: DataPath) -> Result<Self> {
        let nodes = topology.nodes();
        let cluster = Cluster::start_opts("bench", nodes, &[], path.agent_args(), false)?;
        let client_node = cluster.nodes[0].node.clone();
        let server_node = cluster.nodes[nodes - 1].node.clone();
        let client_pod_runs = topology != Topology::NorthSouth;
        if client_pod_runs {
            cluster.write_manifest("client.yaml", &on_node(&client_pod(CLIENT), &client_node))?;
        }
        for i in 0..SERVERS {
            cluster.write_manifest(
                &format!("srv-{i}.yaml"),
                &on_node(&server_pod(i, loadgen), &server_node),
            )?;
        }
        let names: Vec<String> = (0..SERVERS).map(|i| format!("srv-{i}")).collect();
        let mut wait: Vec<&str> = names.iter().map(String::as_str).collect();
        if client_pod_runs {
            wait.push(CLIENT);
        }
        cluster.wait_ready(&wait, Duration::from_secs(60))?;
        let lab = &cluster.nodes[0];
        let servers: Vec<Ipv4Addr> = names
            .iter()
            .map(|n| {
                lab.pod(n)
                    .and_then(|p| p.pod_ip)
                    .with_context(|| format!("pod {n} has no IP"))
            })
            .collect::<Result<_>>()?;
        let client = if client_pod_runs {
            cluster.pod_netns(CLIENT)?
        } else {
            cluster.external.clone()
        };
        // CRR leaves every closed connection in TIME_WAIT on the client (it
        // closes first, as netperf's TCP_CRR does): let the next measurement
        // reuse those ports. Sysctls of the lab's client namespace only.
        netns_stdin(
            &client,
            "sysctl",
            &[
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65535",
            ],
            "",
            CONTROL_TIMEOUT,
        )?;
        if topology == Topology::NorthSouth {
            // Node 1 sends what it forwards back out the interface it came in
            // on (the underlay): an ICMP redirect would teach the external
            // client to skip node 1 for the no-NAT path. Node 1's own
            // namespace only.
            netns_stdin(
                &client_node,
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0",
                ],
                "",
                CONTROL_TIMEOUT,
            )?;
        }
        Ok(Self {
            cluster,
            topology,
            client,
            servers,
        })
    }

    /// no-NAT north-south: the same hops as the NodePort paths, without any
    /// translation. The external client reaches node 2's Pods through node 1
    /// (which routes them on to node 2), and node 2 sends the replies back
    /// through node 1 too (with NAT they go to node 1's address). The lab is
    /// new for every path and round, so these routes live for this one only.
    fn route_through_node1(&self) -> Result<()> {
        let via = node_addr(0).to_string();
        let (ext, node2) = (&self.cluster.external, &self.cluster.nodes[1].node);
        sys::run("ip", &["-n", ext, "route", "add", &pod_cidr(1), "via", &via])
            .context("routing the external client to node 2's Pods via node 1")?;
        sys::run(
            "ip",
            &["-n", node2, "route", "add", &format!("{EXTERNAL_ADDR}/32"), "via", &via],
        )
        .context("routing node 2's replies to the external client via node 1")?;
        Ok(())
    }

    /// The client's node: where rules are loaded and the agent runs.
    fn lab(&mut self) -> &mut Lab {
        &mut self.cluster.nodes[0]
    }
}

/// What BPF_PROG_TEST_RUN runs for a ferry path (see `synthetic`): node 1's
/// entry program for the case's frontend (a Pod dialing the ClusterIP, or the
/// external client dialing node 1's NodePort). None for the other paths, and
/// for ferry (socket LB), whose from_pod is ferry's.
fn synthetic_probe<'a>(
    node: &'a mut Node,
    case: Case,
    path: DataPath,
    files: &Files,
) -> Option<crate::synthetic::Probe<'a>> {
    let north_south = case.topology == Topology::NorthSouth;
    let program = match path {
        DataPath::NoNat | DataPath::Iptables | DataPath::Nftables | DataPath::FerrySocklb => return None,
        DataPath::FerryXdp if north_south => PROG_XDP_FROM_NETDEV,
        _ if north_south => PROG_FROM_NETDEV,
        _ => PROG_FROM_POD,
    };
    let SocketAddr::V4(frontend) = *files.frontend.get(&TCP_PORT)? else {
        return None;
    };
    let backends = node
        .servers
        .iter()
        .map(|ip| SocketAddrV4::new(*ip, SERVER_PORT))
        .collect();
    let (client, untranslated) = if north_south {
        // The discard port of node 1's own address: no Service there.
        (EXTERNAL_ADDR, SocketAddrV4::new(*frontend.ip(), 9))
    } else {
        // A Pod address of node 1 no lab Pod has; dialing a server directly.
        (
            Ipv4Addr::new(10, 244, 0, 199),
            SocketAddrV4::new(*node.servers.first()?, SERVER_PORT),
        )
    };
    let lab = node.lab();
    Some(crate::synthetic::Probe {
        agent_pid: lab.agent_pid()?,
        netns: &lab.node,
        program,
        client,
        frontend,
        backends,
        untranslated,
    })
}

struct Ctx<'a> {
    loadgen: PathBuf,
    plan: &'a Plan,
    samples: Samples,
    /// Which servers answered the sanity check, per (case, path).
    answered: BTreeMap<(Case, DataPath), BTreeSet<String>>,
    /// What could not be measured, and why (printed under the tables).
    notes: Vec<String>,
    /// The inputs for the current case (regenerated if the Pods' IPs change).
    files: Option<(Case, Vec<Ipv4Addr>, std::rc::Rc<Files>)>,
    /// ferry-xdp: how XDP attached on node 1 and what it forwarded itself
    /// (the xdp_forward counter) in each round.
    xdp: Vec<XdpRound>,
    /// The kernel counts BPF run time (see bpfstats).
    bpf_stats: bool,
    /// Per program, per round: what it cost under CRR and RR.
    bpf: Vec<BpfRow>,
}

/// One of Ferry's programs under one load in one round.
#[derive(Clone, Debug, Serialize)]
struct BpfRow {
    #[serde(flatten)]
    case: Case,
    path: DataPath,
    round: usize,
    /// "crr" or "rr".
    mode: &'static str,
    program: String,
    /// Runs of the program per connection (CRR) or request (RR).
    runs_per_request: f64,
    ns_per_run: f64,
}

/// What ferry-xdp's XDP program did in one round: without packets forwarded
/// by XDP itself, ferry-xdp measured TC again.
#[derive(Clone, Debug, Serialize)]
struct XdpRound {
    #[serde(flatten)]
    case: Case,
    round: usize,
    /// From the agent's log ("xdp_from_netdev attached (…)"), if it attached.
    attached: Option<String>,
    /// Node 1's xdp_forward counter after the round's measurements.
    xdp_forward: u64,
}

/// What a path's set-up gives: its cold-start time, and for ferry the agent's
/// memory once programmed.
struct SetUp {
    cold_start: Duration,
    rss_mib: Option<f64>,
}

impl Ctx<'_> {
    fn bench_case(&mut self, case: Case) -> Result<()> {
        let n = case.services;
        println!(
            "\nbench: N = {n} Services x {SERVERS} endpoints, the measured Service last, {}; every path on a fresh lab",
            case.topology.title()
        );
        let paths: Vec<DataPath> = self
            .plan
            .paths
            .iter()
            .copied()
            .filter(|p| p.measured_in(case.topology))
            .collect();
        if self.plan.paths_explicit {
            for p in self.plan.paths.iter().filter(|p| !p.measured_in(case.topology)) {
                self.notes.push(format!(
                    "{case} {}: skipped (XDP only acts on north-south traffic; here it would measure ferry again)",
                    p.name()
                ));
            }
        }
        if paths.is_empty() {
            return Ok(());
        }
        if case.topology == Topology::NorthSouth {
            self.notes.push(node_port_note(n));
        }
        for round in 0..self.plan.rounds {
            let mut order = paths.clone();
            let k = order.len();
            order.rotate_left(round % k);
            for path in order {
                check_interrupted()?;
                let mut node = Node::start(&self.loadgen, case.topology, path)?;
                let files = self.files_for(case, &node.servers)?;
                let s = match self.set_up(&mut node, path, &files) {
                    Ok(s) => s,
                    Err(e) if e.is::<TimedOut>() => {
                        println!("  round {} {:<8} set-up: {e}", round + 1, path.name());
                        self.notes
                            .push(format!("{case} round {} {}: set-up {e}", round + 1, path.name()));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                self.measure(&mut node, case, round, path, &files, &s)?;
            }
        }
        Ok(())
    }

    /// The scenario files for a case and these server IPs (cached: the shim
    /// gives the same IPs to the same Pods). North-south, the Services are
    /// NodePort Services (see [`Scenario::with_node_ports`]).
    fn files_for(&mut self, case: Case, servers: &[Ipv4Addr]) -> Result<std::rc::Rc<Files>> {
        if let Some((cc, cs, f)) = &self.files {
            if *cc == case && cs == servers {
                return Ok(f.clone());
            }
        }
        let n = case.services;
        let mut scenario = Scenario::new(n, SERVERS, servers)?;
        if case.topology == Topology::NorthSouth {
            scenario = scenario.with_node_ports();
        }
        let changed = scenario.with_measured_endpoint(SERVERS - 1, Ipv4Addr::new(10, 244, 0, 250))?;
        // A directory of its own: the Files this replaces removes its own on drop.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferry-bench-{}-{n}-{k}", std::process::id()));
        let files = std::rc::Rc::new(Files::write(&dir, &scenario, &changed)?);
        self.files = Some((case, servers.to_vec(), files.clone()));
        Ok(files)
    }

    fn set_up(&mut self, node: &mut Node, path: DataPath, files: &Files) -> Result<SetUp> {
        let ns = node.lab().node.clone();
        let started = Instant::now();
        let cold_start = match path {
            DataPath::NoNat if node.topology == Topology::NorthSouth => {
                node.route_through_node1()?;
                started.elapsed()
            }
            DataPath::NoNat => started.elapsed(),
            DataPath::Iptables => {
                netns_stdin(&ns, self.plan.iptables.restore(), &[], &files.iptables, CONTROL_TIMEOUT)?;
                started.elapsed()
            }
            DataPath::Nftables => {
                netns_stdin(&ns, "nft", &["-f", "-"], &files.nft, CONTROL_TIMEOUT)?;
                started.elapsed()
            }
            DataPath::Ferry
            | DataPath::FerrySocklb
            | DataPath::FerryXdp
            | DataPath::FerryMaglev
            | DataPath::FerryDsr => {
                files.reset_ferry()?;
                let sizes = crate::control_plane::map_size_args(files.frontends, SERVERS);
                if path == DataPath::FerryDsr {
                    // The backends' node translates the replies: its agent
                    // runs too (untimed, before node 1's).
                    let node2 = &mut node.cluster.nodes[1];
                    node2.agent_args_mut().extend(sizes.clone());
                    node2.start_agent_on(&files.ferry_dir)?;
                    wait_for_sync(node2, None, Some(files.frontends), CONTROL_TIMEOUT)?;
                }
                node.lab().agent_args_mut().extend(sizes);
                let from = unix_now();
                node.lab().start_agent_on(&files.ferry_dir)?;
                let done = wait_for_sync(node.lab(), None, Some(files.frontends), CONTROL_TIMEOUT)?;
                since(from, &done)
            }
        };
        let rss_mib = if path.is_ferry() {
            node.lab().agent_pid().and_then(rss_mib_of)
        } else {
            None
        };
        Ok(SetUp { cold_start, rss_mib })
    }

    fn measure(
        &mut self,
        node: &mut Node,
        case: Case,
        round: usize,
        path: DataPath,
        files: &Files,
        setup: &SetUp,
    ) -> Result<()> {
        let n = case;
        // no-NAT dials every server directly, as the Service spreads over them,
        // so that both sides load the same ten servers. The others dial the
        // measured Service: its ClusterIP, or north-south node 1's NodePort.
        let servers = node.servers.clone();
        let frontend = files.frontend.clone();
        let target = move |port: u16, direct: u16| -> Vec<SocketAddr> {
            match path {
                DataPath::NoNat => servers.iter().map(|ip| SocketAddr::from((*ip, direct))).collect(),
                _ => vec![frontend[&port]],
            }
        };
        let answered = sanity(&node.client, &target(UDP_PORT, SERVER_PORT))?;
        let expected = SERVERS;
        print!(
            "  round {} {:<8} answered by {:>2}/{expected} servers",
            round + 1,
            path.name(),
            answered.len()
        );
        if answered.len() < expected {
            println!();
            bail!(
                "{}: only {answered:?} answered; the data path is not balancing",
                path.name()
            );
        }
        self.answered.entry((n, path)).or_default().extend(answered);
        if path != DataPath::NoNat {
            self.push(n, Metric::ColdStartMs, path, setup.cold_start.as_secs_f64() * 1e3);
            print!(" | cold start {:>7.1} ms", setup.cold_start.as_secs_f64() * 1e3);
        }
        if let Some(rss) = setup.rss_mib {
            self.push(n, Metric::AgentRssMib, path, rss);
        }
        let workers = self.plan.workers;
        // ferry (socket LB): the load generator runs in node 1's cgroup, where
        // the agent's socket hooks are (as the shim's Pods do).
        let cgroup = match path {
            DataPath::FerrySocklb => Some(node.lab().cgroup.clone().context("ferry (socket LB) needs cgroup v2")?),
            _ => None,
        };
        let sock_forward_before = if cgroup.is_some() {
            node.lab().counter("sock_forward")?
        } else {
            0
        };
        let client_ns = node.client.clone();
        let client = (client_ns.as_str(), cgroup.as_deref());
        // Ferry's programs' run time around CRR and RR (see bpfstats).
        let agent = if path.is_ferry() && self.bpf_stats {
            node.lab().agent_pid()
        } else {
            None
        };
        let bpf = || agent.map(crate::bpfstats::of_process).transpose();
        let bpf_before = bpf()?;
        let crr = self.loadgen(client, "crr", target(TCP_PORT, SERVER_PORT), workers)?;
        let bpf_crr = bpf()?;
        let rr = self.loadgen(client, "rr", target(TCP_PORT, SERVER_PORT), workers)?;
        let bpf_rr = bpf()?;
        if let (Some(a), Some(b), Some(c)) = (&bpf_before, &bpf_crr, &bpf_rr) {
            for (m, mode, (from, to), report) in [
                (Metric::CrrBpfNs, "crr", (a, b), &crr),
                (Metric::RrBpfNs, "rr", (b, c), &rr),
            ] {
                if report.requests == 0 {
                    continue;
                }
                let requests = report.requests as f64;
                self.push(n, m, path, crate::bpfstats::delta(from, to).ns as f64 / requests);
                for (program, runs) in crate::bpfstats::delta_by_name(from, to) {
                    if runs.count > 0 {
                        let ns_per_run = runs.ns as f64 / runs.count as f64;
                        self.bpf.push(BpfRow {
                            case,
                            path,
                            round: round + 1,
                            mode,
                            program,
                            runs_per_request: runs.count as f64 / requests,
                            ns_per_run,
                        });
                    }
                }
            }
        }
        let udp = self.loadgen(client, "udp", target(UDP_PORT, SERVER_PORT), workers)?;
        let stream = self.loadgen(client, "stream", target(STREAM_PORT, SERVER_SINK), 1)?;
        if cgroup.is_some() {
            // Without sockets translated at connect(), this round measured the
            // TC path again.
            let translated = node.lab().counter("sock_forward")? - sock_forward_before;
            print!(" | sockets translated {translated}");
            if translated < crr.requests {
                self.notes.push(format!(
                    "**{case} round {} ferry (socket LB): only {translated} sockets translated at connect() for {} CRR \
                     connections**: part of this round took the TC path",
                    round + 1,
                    crr.requests
                ));
            }
        }
        for (m, v) in [
            (Metric::CrrPerS, Some(crr.requests_per_s)),
            (Metric::CrrCpuUs, crr.cpu_us_per_request),
            (Metric::RrPerS, Some(rr.requests_per_s)),
            (Metric::RrP50Us, rr.p50_us),
            (Metric::RrP99Us, rr.p99_us),
            (Metric::RrCpuUs, rr.cpu_us_per_request),
            (Metric::UdpPerS, Some(udp.requests_per_s)),
            (Metric::UdpCpuUs, udp.cpu_us_per_request),
            (Metric::StreamGbitPerS, Some(stream.gbit_per_s)),
        ] {
            if let Some(v) = v {
                self.push(n, m, path, v);
            }
        }
        print!(
            " | crr {:>6.0}/s rr {:>6.0}/s udp {:>6.0}/s stream {:>5.2} Gbit/s",
            crr.requests_per_s, rr.requests_per_s, udp.requests_per_s, stream.gbit_per_s
        );
        let errors = crr.errors + rr.errors + udp.errors + stream.errors;
        if errors > 0 {
            print!(
                " | errors crr {} rr {} udp {} stream {}",
                crr.errors, rr.errors, udp.errors, stream.errors
            );
        }
        self.push(n, Metric::Errors, path, errors as f64);
        if path == DataPath::FerryXdp {
            self.check_xdp(node, case, round)?;
        }
        if path == DataPath::FerryDsr {
            // Without DSR-forwarded flows this round measured SNAT again.
            let dsr = node
                .lab()
                .counter("dsr_forward")
                .context("reading node 1's dsr_forward counter")?;
            print!(" | DSR-forwarded {dsr} flows");
            if dsr == 0 {
                println!();
                bail!(
                    "{case} round {} ferry-dsr: node 1 forwarded no flow with DSR (dsr_forward = 0)",
                    round + 1
                );
            }
        }
        // Before the endpoint change: the probe's backends are the servers.
        if let Some(probe) = synthetic_probe(node, case, path, files) {
            match crate::synthetic::measure(&probe) {
                Ok(f) => {
                    self.push(n, Metric::TestRunNewFlowNs, path, f.new_flow_ns);
                    self.push(n, Metric::TestRunEstablishedNs, path, f.established_ns);
                    self.push(n, Metric::TestRunUntranslatedNs, path, f.untranslated_ns);
                    print!(
                        " | test run: new {:.0} ns, tracked {:.0} ns, untranslated {:.0} ns",
                        f.new_flow_ns, f.established_ns, f.untranslated_ns
                    );
                }
                Err(e) => {
                    print!(" | test run: {e:#}");
                    self.notes
                        .push(format!("{case} round {} {}: test run {e:#}", round + 1, path.name()));
                }
            }
        }
        if path != DataPath::NoNat {
            match self.endpoint_change(node, path, files) {
                Ok(change) => {
                    self.push(n, Metric::EndpointChangeMs, path, change.as_secs_f64() * 1e3);
                    print!(" | endpoint change {:>7.1} ms", change.as_secs_f64() * 1e3);
                }
                Err(e) if e.is::<TimedOut>() => {
                    print!(" | endpoint change: {e}");
                    self.notes.push(format!(
                        "{case} round {} {}: endpoint change {e}",
                        round + 1,
                        path.name()
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        println!();
        Ok(())
    }

    /// Records how XDP attached on node 1 and how many packets it forwarded
    /// itself; none is said loudly in the notes (the comparison with ferry
    /// would then be TC against TC).
    fn check_xdp(&mut self, node: &mut Node, case: Case, round: usize) -> Result<()> {
        let lab = node.lab();
        let attached = lab.agent_log().lines().map(strip_ansi).find_map(|l| {
            Some(
                l[l.find("xdp_from_netdev attached (")? + 26..]
                    .split(')')
                    .next()?
                    .to_string(),
            )
        });
        let xdp_forward = lab
            .counter("xdp_forward")
            .context("reading node 1's xdp_forward counter")?;
        print!(
            " | XDP forwarded {xdp_forward} packets ({})",
            attached.as_deref().unwrap_or("not attached")
        );
        if xdp_forward == 0 {
            self.notes.push(format!(
                "**{case} round {} ferry-xdp: XDP FORWARDED NO PACKET** (xdp_forward = 0 on node 1, XDP {}): \
                 this round measured TC again, not XDP; its ferry-xdp figures compare nothing",
                round + 1,
                attached
                    .as_deref()
                    .map_or("not attached".into(), |a| format!("attached {a}"))
            ));
        }
        self.xdp.push(XdpRound {
            case,
            round: round + 1,
            attached,
            xdp_forward,
        });
        Ok(())
    }

    fn push(&mut self, n: Case, m: Metric, p: DataPath, v: f64) {
        self.samples.entry((n, m, p)).or_default().push(v);
    }

    /// Runs `ferry-loadgen MODE` in the client's network namespace (and, if
    /// given, in a cgroup).
    fn loadgen(
        &self,
        (client, cgroup): (&str, Option<&Path>),
        mode: &str,
        targets: Vec<SocketAddr>,
        workers: usize,
    ) -> Result<Report> {
        let target = targets.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let mut cmd = match cgroup {
            // Join the cgroup first: `ip netns exec` mounts a fresh /sys, which
            // has no cgroup2 mount; the cgroup is inherited across the exec.
            Some(cg) => {
                let mut cmd = Command::new("sh");
                let script = format!(
                    "echo $$ > {}/cgroup.procs && exec ip netns exec {client} \"$0\" \"$@\"",
                    cg.display()
                );
                cmd.args(["-c", &script]);
                cmd
            }
            None => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", client]);
                cmd
            }
        };
        let out = cmd
            .arg(&self.loadgen)
            .args([mode, "--target", &target])
            .args([
                "--duration",
                &self.plan.duration.to_string(),
                "--workers",
                &workers.to_string(),
            ])
            .stderr(Stdio::inherit())
            .output()
            .context("running ferry-loadgen")?;
        if !out.status.success() {
            bail!("ferry-loadgen {mode} {target} failed ({})", out.status);
        }
        let report: Report = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("ferry-loadgen printed {:?}", String::from_utf8_lossy(&out.stdout)))?;
        if report.requests == 0 && report.bytes == 0 {
            bail!(
                "ferry-loadgen {mode} {target}: nothing got through ({} errors)",
                report.errors
            );
        }
        Ok(report)
    }

    /// One endpoint of the measured Service replaced, timed until the dataplane
    /// has it: kube-proxy's full iptables-restore, an nft transaction of the
    /// changed chains, ferry's incremental map sync (file change → maps written).
    fn endpoint_change(&self, node: &mut Node, path: DataPath, files: &Files) -> Result<Duration> {
        let ns = node.lab().node.clone();
        let started = Instant::now();
        match path {
            DataPath::NoNat => {}
            DataPath::Iptables => netns_stdin(
                &ns,
                self.plan.iptables.restore(),
                &["--noflush"],
                &files.iptables_resync,
                CONTROL_TIMEOUT,
            )?,
            DataPath::Nftables => netns_stdin(&ns, "nft", &["-f", "-"], &files.nft_update, CONTROL_TIMEOUT)?,
            DataPath::Ferry
            | DataPath::FerrySocklb
            | DataPath::FerryXdp
            | DataPath::FerryMaglev
            | DataPath::FerryDsr => {
                let before = node
                    .lab()
                    .syncs()
                    .context("the agent's sync counters before the change")?;
                let from = unix_now();
                files.change_ferry()?;
                let done = wait_for_sync(node.lab(), Some(before), None, CONTROL_TIMEOUT)?;
                return Ok(since(from, &done));
            }
        }
        Ok(started.elapsed())
    }
}

/// Asks the UDP echo "who are you?" from fresh sockets: which servers answer.
/// Asks until all `SERVERS` answered, at most `SANITY_QUERIES` times: a
/// fixed 60 missed one of ten random backends about once in 55 runs.
fn sanity(client: &str, targets: &[SocketAddr]) -> Result<BTreeSet<String>> {
    let targets = targets.to_vec();
    in_netns(client, move || -> Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        for i in 0..SANITY_QUERIES {
            if names.len() == SERVERS {
                break;
            }
            let target = targets[i % targets.len()];
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.connect(target)?;
            s.send(b"?")?;
            let mut buf = [0u8; 256];
            let k = s
                .recv(&mut buf)
                .with_context(|| format!("no UDP answer from {target}"))?;
            names.insert(String::from_utf8_lossy(&buf[..k]).trim().to_string());
        }
        Ok(names)
    })?
}

/// How north-south gives the Services NodePorts, for the notes: the NodePort
/// range fits 2768 Service ports, so beyond N = 2766 some fillers stay ClusterIP.
fn node_port_note(n: usize) -> String {
    // The same assignment as the measured scenario's (endpoints do not matter).
    let (services, ports) = Scenario::new(n, 1, &[Ipv4Addr::UNSPECIFIED])
        .map(Scenario::with_node_ports)
        .map_or((0, 0), |s| (s.node_port_services(), s.node_ports()));
    let rest = n.saturating_sub(services);
    let mut note = format!(
        "N={n} north-south: NodePort Services {services} of {n} ({ports} NodePorts, distinct, in 30000-32767; the measured \
         Service's on 32765-32767, its HTTP port's the last rule of KUBE-NODEPORTS), externalTrafficPolicy Cluster; \
         iptables and nftables rules and the ferry agent on node 1 only, node 2 only routes"
    );
    if rest > 0 {
        note.push_str(&format!(
            "; the other {rest} fillers are ClusterIP Services (the NodePort range holds 2768 ports)"
        ));
    }
    note
}

/// The inputs of every path for one case.
struct Files {
    dir: PathBuf,
    /// What the clients dial for each port of the measured Service: its
    /// ClusterIP, or for a NodePort Service node 1's address at the NodePort.
    frontend: BTreeMap<u16, SocketAddr>,
    /// Frontends in all: what ferry's `ferry_frontends` counts (one per
    /// Service port, plus one per NodePort: node 1 serves them on its one
    /// address).
    frontends: usize,
    iptables: String,
    iptables_resync: String,
    nft: String,
    nft_update: String,
    ferry_dir: PathBuf,
    measured: String,
    measured_changed: String,
}

impl Files {
    fn write(dir: &Path, scenario: &Scenario, changed: &Scenario) -> Result<Self> {
        let _ = fs::remove_dir_all(dir);
        let ferry_dir = dir.join("manifests");
        fs::create_dir_all(&ferry_dir)?;
        for (file, yaml) in manifests::files(scenario) {
            fs::write(ferry_dir.join(&file), yaml)?;
        }
        let measured = manifests::service_yaml(scenario.measured());
        let measured_changed = manifests::service_yaml(changed.measured());
        let stale = iptables::stale_chains(scenario, changed);
        let node1 = node_addr(0);
        let frontend = scenario
            .measured()
            .ports
            .iter()
            .map(|p| {
                let to = match p.node_port {
                    Some(np) => SocketAddr::from((node1, np)),
                    None => SocketAddr::from((scenario.measured().cluster_ip, p.port)),
                };
                (p.port, to)
            })
            .collect();
        // kube-proxy's nftables mode serves NodePorts on the node's primary
        // address; without NodePorts the set stays empty, as before.
        let nodeport_ips = if scenario.node_ports() > 0 {
            vec![node1]
        } else {
            Vec::new()
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            frontend,
            frontends: scenario.frontends() + scenario.node_ports(),
            iptables: iptables::ruleset(scenario, iptables::Mode::Initial, &[]),
            iptables_resync: iptables::ruleset(changed, iptables::Mode::Resync, &stale),
            nft: nftables::ruleset(scenario, &nodeport_ips),
            nft_update: nftables::endpoint_update(scenario, changed),
            ferry_dir,
            measured,
            measured_changed,
        })
    }

    fn reset_ferry(&self) -> Result<()> {
        atomic_write(&self.ferry_dir.join(manifests::MEASURED_FILE), &self.measured)
    }

    fn change_ferry(&self) -> Result<()> {
        atomic_write(&self.ferry_dir.join(manifests::MEASURED_FILE), &self.measured_changed)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn atomic_write(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp~");
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Waits until the agent's sync counters (`/metrics/agent`, polled every
/// 2 ms) show a sync that wrote the maps since `before` (None: since the agent
/// started), with `frontends` frontends programmed, if given. Until the agent
/// listens, a poll fails; the last failure is named if none succeeds in time.
/// Waits for the agent's next sync that wrote (see [`synced`]) and returns
/// its counters. Polled every 20 ms: the time taken is read from the agent's
/// own completion timestamp ([`since`]), so polling faster would only take
/// CPU from the sync it measures (two cores).
fn wait_for_sync(lab: &mut Lab, before: Option<Syncs>, frontends: Option<usize>, timeout: Duration) -> Result<Syncs> {
    let started = Instant::now();
    loop {
        let last = match lab.syncs() {
            Ok(now) if synced(before.as_ref(), &now, frontends) => return Ok(now),
            Ok(now) => format!("{now:?}"),
            Err(e) => format!("{e:#}"),
        };
        lab.check_alive()?;
        if started.elapsed() > timeout {
            return Err(TimedOut(format!("ferry agent: no sync within {timeout:?} (last seen: {last})")).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Unix time now, in seconds (the agent stamps its syncs with the same
/// clock).
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// From `from` (Unix seconds) to the completion of the sync `done` reports.
fn since(from: f64, done: &Syncs) -> Duration {
    Duration::from_secs_f64((done.last_sync_s - from).max(0.0))
}

/// Whether `now` shows a sync that wrote the maps since `before` (None: any),
/// with `frontends` frontends programmed, if given.
fn synced(before: Option<&Syncs>, now: &Syncs, frontends: Option<usize>) -> bool {
    now.writes > before.map_or(0, |b| b.writes) && frontends.is_none_or(|want| now.frontends == want as u64)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn rss_mib_of(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// A control-plane command that did not finish in time (reported in the
/// results, not fatal).
#[derive(Debug)]
struct TimedOut(String);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "timed out: {}", self.0)
    }
}

impl std::error::Error for TimedOut {}

/// Runs `cmd args` in a namespace with `input` on stdin; killed after `timeout`.
fn netns_stdin(ns: &str, cmd: &str, args: &[&str], input: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd}"))?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    // stderr is small (an error message); read it after the exit.
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TimedOut(format!("{cmd} {args:?} took more than {timeout:?}")).into());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("{cmd} {args:?} in {ns}: {}", err.trim());
    }
    Ok(())
}

/// Set by Ctrl-C: the run stops between measurements (the lab is removed).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn which(tool: &str) -> Result<()> {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()?;
    if !ok.success() {
        bail!("{tool} not found");
    }
    Ok(())
}

/// The results: summaries per (N, metric, path), rendered as tables.
#[derive(Serialize)]
struct Output {
    machine: String,
    kernel: String,
    /// `git describe` of the tree measured.
    commit: String,
    command: String,
    profile: &'static str,
    rounds: usize,
    duration_s: f64,
    workers: usize,
    elapsed_s: f64,
    iptables_backend: IptablesBackend,
    /// What could not be measured, and why.
    notes: Vec<String>,
    /// Which servers answered the sanity check, per case and path.
    answered: Vec<(Case, DataPath, Vec<String>)>,
    /// ferry-xdp: how XDP attached and what it forwarded, per round.
    xdp: Vec<XdpRound>,
    /// Ferry's programs one by one, per round (kernel run-time statistics).
    bpf: Vec<BpfRow>,
    results: Vec<Row>,
}

#[derive(Serialize)]
struct Row {
    #[serde(flatten)]
    case: Case,
    metric: Metric,
    path: DataPath,
    #[serde(flatten)]
    summary: Summary,
    samples: Vec<f64>,
}

impl Output {
    /// `commit`: the tree measured (`git describe` when the run started).
    fn new(
        plan: &Plan,
        commit: String,
        samples: Samples,
        answered: BTreeMap<(Case, DataPath), BTreeSet<String>>,
        notes: Vec<String>,
        xdp: Vec<XdpRound>,
        elapsed: Duration,
    ) -> Self {
        let results = samples
            .into_iter()
            .filter_map(|((case, metric, path), v)| {
                Some(Row {
                    case,
                    metric,
                    path,
                    summary: Summary::of(&v)?,
                    samples: v,
                })
            })
            .collect();
        Self {
            machine: machine(),
            commit,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
            profile: plan.profile,
            rounds: plan.rounds,
            duration_s: plan.duration,
            workers: plan.workers,
            elapsed_s: elapsed.as_secs_f64(),
            iptables_backend: plan.iptables,
            notes,
            answered: answered
                .into_iter()
                .map(|((n, p), s)| (n, p, s.into_iter().collect()))
                .collect(),
            xdp,
            bpf: Vec::new(),
            results,
        }
    }

    fn plan_iptables(&self) -> &'static str {
        self.iptables_backend.restore()
    }

    fn get(&self, c: Case, m: Metric, p: DataPath) -> Option<&Summary> {
        self.results
            .iter()
            .find(|r| r.case == c && r.metric == m && r.path == p)
            .map(|r| &r.summary)
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Machine: {}, kernel {}, commit {}. `cargo xtask {}` ({} build): {} rounds, {} s per measurement, {} concurrent clients, \
             iptables via {}; took {:.0} s.\n\
             Each cell: median over rounds (± spread = (max-min)/median). Ratios: a ferry path's median over the other path's \
             (ferry-xdp's over ferry's too); for rates > 1 means the ferry path is faster, for times and CPU < 1 means it is cheaper. \
             A cell in parentheses has a spread over {NOISY_PCT}%: noise, not a result, and so is a ratio in parentheses.\n",
            self.machine,
            self.kernel,
            self.commit,
            self.command,
            self.profile,
            self.rounds,
            self.duration_s,
            self.workers,
            self.plan_iptables(),
            self.elapsed_s
        ));
        let ns: BTreeSet<Case> = self.results.iter().map(|r| r.case).collect();
        let metrics: BTreeSet<Metric> = self.results.iter().map(|r| r.metric).collect();
        for m in metrics {
            let paths: Vec<DataPath> = PATHS
                .into_iter()
                .filter(|p| self.results.iter().any(|r| r.metric == m && r.path == *p))
                .collect();
            let better = if m.higher_is_better() {
                "higher is better"
            } else {
                "lower is better"
            };
            out.push_str(&format!("\n### {} ({better})\n\n| Services, servers |", m.title()));
            for p in &paths {
                out.push_str(&format!(" {} |", p.name()));
            }
            // Each ferry path over every path before it (ferry-xdp over ferry too).
            let ratios: Vec<(DataPath, DataPath)> = paths
                .iter()
                .filter(|f| f.is_ferry())
                .flat_map(|&f| paths.iter().filter(move |&&o| o < f).map(move |&o| (f, o)))
                .collect();
            for (f, o) in &ratios {
                out.push_str(&format!(" {} / {} |", f.name(), o.name()));
            }
            out.push_str("\n|---:|");
            for _ in 0..paths.len() + ratios.len() {
                out.push_str("---:|");
            }
            out.push('\n');
            for &n in &ns {
                out.push_str(&format!("| {}, {} |", n.services, n.topology.place()));
                for &p in &paths {
                    match self.get(n, m, p) {
                        Some(s) if noisy(s) => {
                            out.push_str(&format!(" ({} ±{:.0}%) |", fmt_num(s.median), s.spread_pct()))
                        }
                        Some(s) => out.push_str(&format!(" {} ±{:.0}% |", fmt_num(s.median), s.spread_pct())),
                        None => out.push_str(" – |"),
                    }
                }
                for &(f, o) in &ratios {
                    match (self.get(n, m, f), self.get(n, m, o)) {
                        (Some(f), Some(o)) if o.median != 0.0 && (noisy(f) || noisy(o)) => {
                            out.push_str(&format!(" ({:.2}) |", f.median / o.median))
                        }
                        (Some(f), Some(o)) if o.median != 0.0 => {
                            out.push_str(&format!(" {:.2} |", f.median / o.median))
                        }
                        _ => out.push_str(" – |"),
                    }
                }
                out.push('\n');
            }
        }
        if !self.notes.is_empty() {
            out.push_str("\nNotes (set-up, and what could not be measured):\n\n");
            for note in &self.notes {
                out.push_str(&format!("- {note}\n"));
            }
        }
        if !self.xdp.is_empty() {
            out.push_str(
                "\nferry-xdp: XDP on node 1, and the packets it forwarded itself (xdp_forward after each round):\n\n",
            );
            for x in &self.xdp {
                let how = x
                    .attached
                    .as_deref()
                    .map_or("NOT attached".into(), |a| format!("attached ({a})"));
                let zero = if x.xdp_forward == 0 {
                    " **(none: TC did all the work)**"
                } else {
                    ""
                };
                out.push_str(&format!(
                    "- {} round {}: {how}, xdp_forward {}{zero}\n",
                    x.case, x.round, x.xdp_forward
                ));
            }
        }
        out.push_str(&self.bpf_markdown());
        out.push_str("\nServers that answered the per-round sanity check (UDP queries from fresh sockets until all ten answered, at most 400):\n\n");
        for (c, p, names) in &self.answered {
            out.push_str(&format!("- {c} {}: {}\n", p.name(), names.len()));
        }
        out
    }

    /// Ferry's programs one by one: runs per request and ns per run,
    /// medians over the rounds.
    fn bpf_markdown(&self) -> String {
        // (case, path, load, program) → (runs per request, ns per run), one per round.
        type Cells<'a> = BTreeMap<(Case, DataPath, &'a str, &'a str), (Vec<f64>, Vec<f64>)>;
        let mut cells: Cells = BTreeMap::new();
        for r in &self.bpf {
            let cell = cells.entry((r.case, r.path, r.mode, r.program.as_str())).or_default();
            cell.0.push(r.runs_per_request);
            cell.1.push(r.ns_per_run);
        }
        if cells.is_empty() {
            return String::new();
        }
        let mut out = String::from(
            "\nFerry's BPF programs one by one (kernel run-time statistics; medians over rounds): runs per CRR connection or RR \
             request, and nanoseconds per run:\n\n| case | path | load | program | runs per request | ns per run |\n|---|---|---|---|---:|---:|\n",
        );
        for ((case, path, mode, program), (runs, ns)) in cells {
            let median = |v: &[f64]| Summary::of(v).map_or(0.0, |s| s.median);
            out.push_str(&format!(
                "| {case} | {} | {mode} | {program} | {:.1} | {} |\n",
                path.name(),
                median(&runs),
                fmt_num(median(&ns))
            ));
        }
        out
    }

    fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir)?;
        let md = self.markdown();
        let json = serde_json::to_string_pretty(self)?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        for (name, text) in [
            (format!("bench-{stamp}.md"), &md),
            (format!("bench-{stamp}.json"), &json),
            ("latest.md".into(), &md),
            ("latest.json".into(), &json),
        ] {
            fs::write(dir.join(name), text)?;
        }
        println!(
            "\n{md}\nbench: written to {}/latest.md and latest.json (and bench-{stamp}.*)",
            dir.display()
        );
        Ok(())
    }
}

/// A cell whose rounds spread more than this (percent of the median)
/// decides nothing.
const NOISY_PCT: f64 = 10.0;

fn noisy(s: &Summary) -> bool {
    s.spread_pct() > NOISY_PCT
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn commit() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(crate::root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mem_kb: u64 = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    format!("{model}, {cores} cores, {} GiB", mem_kb / 1024 / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_is_stripped() {
        let line =
            "\u{1b}[2m2026\u{1b}[0m INFO xdp_from_netdev attached \u{1b}[3mmode\u{1b}[0m\u{1b}[2m=\u{1b}[0mnative";
        assert_eq!(strip_ansi(line), "2026 INFO xdp_from_netdev attached mode=native");
    }

    #[test]
    fn a_sync_counts_when_it_wrote_since_the_baseline_with_the_frontends_wanted() {
        let s = |writes, frontends| Syncs {
            after_change: writes + 1,
            periodic: 0,
            writes,
            frontends,
            last_sync_s: 0.0,
        };
        // Cold start: any sync that wrote, with every frontend.
        assert!(!synced(None, &s(0, 0), Some(30003)), "not synced yet");
        assert!(!synced(None, &s(1, 3), Some(30003)), "synced, but not everything");
        assert!(synced(None, &s(1, 30003), Some(30003)));
        // An endpoint change: the next sync that wrote.
        let before = s(4, 3);
        assert!(!synced(Some(&before), &s(4, 3), None), "nothing new");
        let periodic_noop = Syncs { periodic: 1, ..before };
        assert!(
            !synced(Some(&before), &periodic_noop, None),
            "a sync that wrote nothing"
        );
        assert!(synced(Some(&before), &s(5, 3), None));
    }

    #[test]
    fn ferry_xdp_is_measured_north_south_only() {
        assert!(DataPath::FerryXdp.measured_in(Topology::NorthSouth));
        assert!(!DataPath::FerryXdp.measured_in(Topology::SameNode));
        assert!(!DataPath::FerryXdp.measured_in(Topology::CrossNode));
        assert!(!DataPath::FerrySocklb.measured_in(Topology::NorthSouth));
        assert!(DataPath::FerrySocklb.measured_in(Topology::SameNode));
        assert!(DataPath::FerrySocklb.measured_in(Topology::CrossNode));
        assert!(PATHS
            .iter()
            .filter(|p| **p != DataPath::FerrySocklb)
            .all(|p| p.measured_in(Topology::NorthSouth)));
        assert_eq!(DataPath::FerryXdp.agent_args(), ["--xdp", "--socket-lb-pods=false"]);
        assert!(DataPath::FerryMaglev.measured_in(Topology::NorthSouth));
        assert!(!DataPath::FerryMaglev.measured_in(Topology::SameNode));
        assert_eq!(DataPath::FerryMaglev.agent_args()[..2], ["--lb-algorithm", "maglev"]);
        assert!(DataPath::FerryDsr.measured_in(Topology::NorthSouth));
        assert!(!DataPath::FerryDsr.measured_in(Topology::CrossNode));
        assert_eq!(DataPath::FerryDsr.agent_args()[..2], ["--nodeport-mode", "dsr"]);
        // ferry is the TC path; ferry (socket LB) the agent's default.
        assert_eq!(DataPath::Ferry.agent_args(), ["--socket-lb-pods=false"]);
        assert!(DataPath::FerrySocklb.agent_args().is_empty());
        // The CI check keeps to the default topologies (north-south is opt-in).
        let plan = Plan::from(&Args::harness_check()).unwrap();
        assert_eq!(plan.topologies, [Topology::SameNode, Topology::CrossNode]);
    }

    #[test]
    fn node_port_note_says_what_stays_cluster_ip() {
        let all = node_port_note(1000);
        assert!(
            all.starts_with("N=1000 north-south: NodePort Services 1000 of 1000 (1002 NodePorts,"),
            "{all}"
        );
        assert!(!all.contains("ClusterIP Services"), "{all}");
        let capped = node_port_note(10_000);
        assert!(
            capped.contains(": NodePort Services 2766 of 10000 (2768 NodePorts,"),
            "{capped}"
        );
        assert!(
            capped.contains("the other 7234 fillers are ClusterIP Services"),
            "{capped}"
        );
    }

    #[test]
    fn ferry_xdp_is_compared_with_ferry_and_the_others() {
        let case = Case {
            topology: Topology::NorthSouth,
            services: 1,
        };
        let row = |path, v| Row {
            case,
            metric: Metric::CrrPerS,
            path,
            summary: Summary::of(&[v]).unwrap(),
            samples: vec![v],
        };
        let out = Output {
            machine: String::new(),
            kernel: String::new(),
            commit: String::new(),
            command: String::new(),
            profile: "debug",
            rounds: 1,
            duration_s: 1.0,
            workers: 1,
            elapsed_s: 1.0,
            iptables_backend: IptablesBackend::Legacy,
            notes: Vec::new(),
            answered: Vec::new(),
            xdp: vec![XdpRound {
                case,
                round: 1,
                attached: Some("xdp generic".into()),
                xdp_forward: 0,
            }],
            bpf: Vec::new(),
            results: vec![
                row(DataPath::NoNat, 100.0),
                row(DataPath::Ferry, 80.0),
                row(DataPath::FerryXdp, 88.0),
            ],
        };
        let md = out.markdown();
        assert!(
            md.contains("| no-NAT | ferry | ferry-xdp | ferry / no-NAT | ferry-xdp / no-NAT | ferry-xdp / ferry |\n"),
            "{md}"
        );
        assert!(
            md.contains("| 1, north-south NodePort | 100 ±0% | 80.0 ±0% | 88.0 ±0% | 0.80 | 0.88 | 1.10 |\n"),
            "{md}"
        );
        assert!(
            md.contains("- N=1 north-south round 1: attached (xdp generic), xdp_forward 0 **(none"),
            "{md}"
        );
    }

    #[test]
    fn numbers_are_readable() {
        assert_eq!(fmt_num(1234567.4), "1,234,567");
        assert_eq!(fmt_num(123.4), "123");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
    }
}
