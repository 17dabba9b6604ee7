//! A multi-node lab: N lab nodes (each its own network namespace with `ferry
//! agent` and `ferry shim`) joined by an underlay, plus an "external client"
//! namespace that reaches the nodes' addresses but not the Pods'.
//!
//! ```text
//!   node 1 netns            node 2 netns             external netns
//!   eth0 192.168.77.11      eth0 192.168.77.12       eth0 192.168.77.200
//!   pods 10.244.0.0/24      pods 10.244.1.0/24
//!        \                       |                        /
//!         +---------- underlay netns: bridge br0 ---------+
//! ```
//!
//! Node i routes node j's pod CIDR via node j's address; the external client
//! has no route to any pod CIDR. Every node runs its agent with `--devices
//! eth0`, its shim with its own pod CIDR and `--nodes <every node>` (a Pod
//! without spec.nodeName runs on one node the shims agree on), on the same
//! manifests and a shared Pod status directory (what the API server would be).
use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::Result;

use crate::{
    lab::{short, Lab, LabOptions},
    sys,
};

/// The underlay's /24.
pub const UNDERLAY: [u8; 3] = [192, 168, 77];
/// The external client's address on the underlay.
pub const EXTERNAL_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 200);

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Cluster {
    /// The nodes, in order (node i+1 is `nodes[i]`).
    pub nodes: Vec<Lab>,
    /// The external client's namespace.
    pub external: String,
    underlay: String,
    prefix: String,
    state_dir: PathBuf,
}

impl Cluster {
    /// `n` nodes (at least 1) running the manifests; `agent_args` are added to
    /// every agent's `--devices eth0`.
    pub fn start(tag: &str, n: usize, manifests: &[(String, String)], agent_args: &[&str]) -> Result<Self> {
        Self::start_opts(tag, n, manifests, agent_args, true)
    }

    /// Like [`Cluster::start`]; `agents: false` leaves the agents to the caller
    /// (`nodes[i].start_agent()`), e.g. for a baseline without Ferry.
    pub fn start_opts(
        tag: &str,
        n: usize,
        manifests: &[(String, String)],
        agent_args: &[&str],
        agents: bool,
    ) -> Result<Self> {
        sys::require_root()?;
        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("fc{:x}{k}{}", std::process::id() % 0xffff, short(tag));
        let state_dir = std::env::temp_dir().join(format!("ferry-cluster-{prefix}"));
        let _ = fs::remove_dir_all(&state_dir);
        fs::create_dir_all(&state_dir)?;
        let underlay = format!("{prefix}-ul");
        let external = format!("{prefix}-ext");
        let mut cluster = Self {
            nodes: Vec::new(),
            external,
            underlay,
            prefix,
            state_dir,
        };
        cluster.create_underlay()?;
        for i in 0..n {
            let mut opts = LabOptions::new(&format!("{tag}{}", i + 1));
            opts.agent = false;
            opts.shim = false;
            opts.pod_cidr = pod_cidr(i);
            opts.state_dir = Some(cluster.state_dir.clone());
            opts.agent_args = ["--devices", "eth0"]
                .iter()
                .chain(agent_args)
                .map(ToString::to_string)
                .collect();
            opts.manifests = manifests.to_vec();
            let lab = Lab::start(opts)?;
            cluster.nodes.push(lab);
        }
        for i in 0..n {
            cluster.wire_node(i)?;
        }
        // Every shim knows every node: each Pod without spec.nodeName runs on
        // exactly one of them.
        let names = cluster.node_names();
        for lab in &mut cluster.nodes {
            lab.start_shim(&names)?;
        }
        if agents {
            for lab in &mut cluster.nodes {
                lab.start_agent()?;
            }
            // Every agent has its programs attached (loading them takes a
            // second or two): a test that waits on one node's answers only
            // would otherwise race the others'.
            for lab in &cluster.nodes {
                lab.wait_until(Duration::from_secs(30), "the agent started", || {
                    Ok(lab.agent_log().contains("ferry agent started"))
                })?;
            }
        }
        Ok(cluster)
    }

    fn create_underlay(&self) -> Result<()> {
        let (ul, ext) = (&self.underlay, &self.external);
        sys::run("ip", &["netns", "add", ul])?;
        sys::run("ip", &["-n", ul, "link", "set", "lo", "up"])?;
        sys::run("ip", &["-n", ul, "link", "add", "br0", "type", "bridge"])?;
        sys::run("ip", &["-n", ul, "link", "set", "br0", "up"])?;
        sys::run("ip", &["netns", "add", ext])?;
        sys::run("ip", &["-n", ext, "link", "set", "lo", "up"])?;
        self.plug(ext, "uext", EXTERNAL_ADDR)
    }

    /// A veth from `ns` (named eth0 there) into the underlay bridge.
    fn plug(&self, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
        let ul = &self.underlay;
        sys::run(
            "ip",
            &[
                "-n", ul, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        sys::run("ip", &["-n", ul, "link", "set", port, "master", "br0", "up"])?;
        sys::run("ip", &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        sys::run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        // Full checksums on the underlay, as on a wire: without this a veth
        // carries a sender's packets with the checksum left to "hardware"
        // (CHECKSUM_PARTIAL), which only the skb knows; XDP would leave all of
        // them to TC.
        sys::run("ip", &["netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off"])?;
        Ok(())
    }

    fn wire_node(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i].node;
        self.plug(node, &format!("u{}", i + 1), node_addr(i))?;
        for j in (0..self.nodes.len()).filter(|j| *j != i) {
            sys::run(
                "ip",
                &[
                    "-n",
                    node,
                    "route",
                    "add",
                    &pod_cidr(j),
                    "via",
                    &node_addr(j).to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// The underlay's network namespace (the bridge br0, and the node i+1's
    /// eth0 peer `u{i+1}`).
    pub fn underlay(&self) -> &str {
        &self.underlay
    }

    /// The nodes' names (their network namespaces), node 1 first.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|l| l.node.clone()).collect()
    }

    /// Writes (or replaces) a manifest on every node.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        for lab in &self.nodes {
            lab.write_manifest(file, yaml)?;
        }
        Ok(())
    }

    /// Writes `nodes.yaml` on every node: a `kind: Node` per lab node, node i
    /// labelled `topology.kubernetes.io/zone: zones[i]` (as a cloud
    /// provider labels Nodes; the agents read their own zone from it).
    pub fn write_node_manifests(&self, zones: &[&str]) -> Result<()> {
        let yaml: Vec<String> = self
            .node_names()
            .iter()
            .zip(zones)
            .map(|(name, zone)| {
                format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    topology.kubernetes.io/zone: {zone}\n")
            })
            .collect();
        self.write_manifest("nodes.yaml", &yaml.join("---\n"))
    }

    /// Removes a manifest from every node.
    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        for lab in &self.nodes {
            lab.remove_manifest(file)?;
        }
        Ok(())
    }

    /// Waits until every named Pod is ready, wherever it runs.
    pub fn wait_ready(&self, names: &[&str], timeout: Duration) -> Result<()> {
        self.nodes[0].wait_ready(names, timeout)
    }

    /// The node a Pod runs on, and its network namespace.
    pub fn pod_netns(&self, name: &str) -> Result<String> {
        self.nodes[0].pod_netns(name)
    }

    /// Routes `ip` (an ExternalIP or LoadBalancer IP) from the external
    /// client's namespace via node `i`, as an upstream router would.
    pub fn route_external(&self, ip: impl std::fmt::Display, i: usize) -> Result<()> {
        let (ip, via) = (format!("{ip}/32"), node_addr(i).to_string());
        sys::run("ip", &["-n", &self.external, "route", "add", &ip, "via", &via]).map(|_| ())
    }

    /// Every node's agent and shim logs.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|l| format!("=== {}\n{}", l.node, l.logs()))
            .collect()
    }
}

/// Node i's address on the underlay (192.168.77.11 for the first).
pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], 11 + i as u8)
}

/// Node i's pod CIDR (10.244.i.0/24).
pub fn pod_cidr(i: usize) -> String {
    format!("10.244.{i}.0/24")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("cluster {} failed; logs:\n{}", self.prefix, self.logs());
        }
        // The nodes first (their shims stop the Pods), then the underlay.
        self.nodes.clear();
        sys::delete_netns_with_prefix(&self.prefix);
        let _ = fs::remove_dir_all(&self.state_dir);
    }
}
