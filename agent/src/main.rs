//! `ferry`: the agent, the lab's kubelet shim and echo server, and inspection.
use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_agent::{dataplane, inspect, mountns, run, translate};
use ferry_common::{DEFAULT_BACKENDS_MAX, DEFAULT_CT_MAX, DEFAULT_SERVICES_MAX};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "eBPF service dataplane for Kubernetes (kube-proxy replacement)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: program Services into the eBPF dataplane.
    Agent(AgentArgs),
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
    /// Standalone mode: Kubernetes YAML in DIR (Services, EndpointSlices, Endpoints;
    /// Pods and Deployments are the shim's), watched for changes.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Where shims publish Pod status (standalone mode).
    #[arg(long, default_value = ferry_shim::status::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(flatten)]
    node: NodeArgs,
    /// Node devices (comma-separated), e.g. eth0: from-netdev is attached to them
    /// (replies of backends on other nodes), from-pod to every other veth.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// ClusterIPs for Services without spec.clusterIP come from here.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: ipnet::Ipv4Net,
    /// Entries of the services map (frontends + backend slots).
    #[arg(long, default_value_t = DEFAULT_SERVICES_MAX)]
    services_map_size: u32,
    /// Entries of the backends map.
    #[arg(long, default_value_t = DEFAULT_BACKENDS_MAX)]
    backends_map_size: u32,
    /// Entries of the connection-tracking map (two per flow).
    #[arg(long, default_value_t = DEFAULT_CT_MAX)]
    ct_map_size: u32,
    /// Coalesce bursts of changes for this long before syncing.
    #[arg(long, default_value_t = 100)]
    sync_debounce_ms: u64,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Before any thread exists (setns into a mount namespace requires it).
    if let Some(pid) = mountns::rejoin_launcher_mount_ns()? {
        tracing::debug!(
            pid,
            "joined the mount namespace of PID {pid} (ip netns exec)"
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        Cmd::Agent(a) => rt.block_on(agent(a)),
        Cmd::Shim(a) => rt.block_on(ferry_shim::run_shim(a)),
        Cmd::Echo(a) => rt.block_on(ferry_shim::run_echo(a)),
        Cmd::Svc {
            cmd: ListCmd::List { node, output },
        } => {
            let rows = inspect::services(&node.dir()?)?;
            match output {
                Output::Table | Output::Wide => {
                    print!("{}", inspect::print_services(&rows, output == Output::Wide))
                }
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            }
            Ok(())
        }
        Cmd::Ct {
            cmd: ListCmd::List { node, output },
        } => {
            let rows = inspect::connections(&node.dir()?)?;
            match output {
                Output::Table | Output::Wide => print!("{}", inspect::print_connections(&rows)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            }
            Ok(())
        }
    }
}

async fn agent(a: AgentArgs) -> Result<()> {
    let Some(manifests) = a.manifests else {
        bail!("cluster mode is not implemented yet; use --manifests DIR (standalone mode)");
    };
    let node = node_name(a.node.node_name.clone())?;
    let bpffs_dir = match a.node.bpffs_dir {
        Some(d) => d,
        None => dataplane::default_bpffs_dir(&node),
    };
    run::run_standalone(run::Config {
        manifests,
        state_dir: a.state_dir,
        translate: translate::Config {
            service_cidr: a.service_cluster_ip_range,
            node: node.clone(),
        },
        node,
        devices: a.devices,
        dataplane: dataplane::Config {
            bpffs_dir,
            services_max: a.services_map_size,
            backends_max: a.backends_map_size,
            ct_max: a.ct_map_size,
        },
        debounce: Duration::from_millis(a.sync_debounce_ms),
    })
    .await
}
