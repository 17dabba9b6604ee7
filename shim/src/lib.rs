//! `ferry shim`: a tiny kubelet for the lab, and `ferry echo`, the lab's echo server.
pub mod container;
pub mod echo;
pub mod manifests;
pub mod netns;
pub mod network;
pub mod placement;
pub mod pod;
pub mod probe;
pub mod rollout;
mod shim;
/// What the shim publishes about its Pods: the records live in their own
/// crate, which the agent reads without depending on the shim.
pub use ferry_podstate as status;

use std::path::PathBuf;

/// `ferry shim` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ShimArgs {
    /// Directory of Kubernetes YAML (Pods and Deployments are run; other kinds ignored).
    #[arg(long)]
    pub manifests: PathBuf,
    /// Name of this node; Pods with another spec.nodeName are left to other nodes.
    #[arg(long)]
    pub node: String,
    /// The lab's nodes (comma-separated, this one included): a Pod without
    /// spec.nodeName runs on exactly one of them, chosen by a hash of its
    /// namespace/name that every node's shim computes alike (Deployment
    /// replicas round-robin from a hashed node). Default: the Node objects of
    /// the manifests; without any, this node runs every such Pod.
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Where Pod status is published for the agents (shared by all nodes of a lab).
    #[arg(long, default_value = status::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// This node's pod CIDR; its first address is the pods' gateway.
    #[arg(long, default_value = "10.244.0.0/24")]
    pub pod_cidr: ipnet::Ipv4Net,
    /// A cgroup v2 directory the shim, and with it every Pod process it starts,
    /// runs in (the kubelet's kubepods cgroup): the node's agent attaches its
    /// socket load balancer there (`ferry agent --cgroup-path`). Default:
    /// stay where started.
    #[arg(long, value_name = "PATH")]
    pub pod_cgroup: Option<PathBuf>,
    /// Upper bound on a Pod's terminationGracePeriodSeconds.
    #[arg(long, default_value_t = 30)]
    pub max_grace_seconds: u64,
}

/// `ferry echo` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct EchoArgs {
    /// TCP ports to serve (line echo and HTTP).
    #[arg(long = "tcp")]
    pub tcp: Vec<u16>,
    /// UDP ports to serve.
    #[arg(long = "udp")]
    pub udp: Vec<u16>,
    /// Name to answer with (default: $POD_NAME, then $HOSTNAME).
    #[arg(long)]
    pub name: Option<String>,
}

/// Runs the shim until SIGINT/SIGTERM, then stops every Pod it started.
pub async fn run_shim(args: ShimArgs) -> anyhow::Result<()> {
    shim::run(args).await
}

/// Runs the echo server until killed.
pub async fn run_echo(args: EchoArgs) -> anyhow::Result<()> {
    echo::run(args).await
}
