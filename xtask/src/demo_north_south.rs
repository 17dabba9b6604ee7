//! The north-south part of `cargo xtask run`: a two-node lab with a
//! LoadBalancer Service (NodePort 30080, an ExternalIP, a LoadBalancer IP) and
//! one backend per node, the agents running with `--xdp`; the external client
//! dials each node's NodePort, the ExternalIP and the LoadBalancer IP, and the
//! demo prints which backend (on which node) answered, which address that
//! backend saw the client at, and how many packets XDP forwarded itself.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use ferry_tests::{
    cluster::{node_addr, Cluster, EXTERNAL_ADDR},
    manifests::{echo_pod, on_node},
    TcpSession,
};

const EXTERNAL_IP: &str = "203.0.113.10";
const LB_IP: &str = "203.0.113.20";
const REQUESTS: usize = 20;

const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  selector: {app: web}
  externalIPs: ["203.0.113.10"]
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
status:
  loadBalancer:
    ingress: [{ip: "203.0.113.20"}]
"#;

/// Runs the demo; false if a path did not reach both backends.
pub fn run() -> Result<bool> {
    println!("\nlab: north-south: two nodes on an underlay, an external client, a LoadBalancer Service");
    let c = Cluster::start("demons", 2, &[("web.yaml".into(), SERVICE.into())], &["--xdp"])?;
    let nodes: Vec<String> = c.nodes.iter().map(|l| l.node.clone()).collect();
    for (i, n) in nodes.iter().enumerate() {
        c.write_manifest(
            &format!("web-{}.yaml", i + 1),
            &on_node(&echo_pod(&format!("web-{}", i + 1), "web", None), n),
        )?;
    }
    c.route_external(EXTERNAL_IP, 0)?;
    c.route_external(LB_IP, 1)?;
    c.wait_ready(&["web-1", "web-2"], Duration::from_secs(60))?;
    for (i, n) in nodes.iter().enumerate() {
        println!("  node {} netns {n} address {} runs web-{}", i + 1, node_addr(i), i + 1);
    }
    println!(
        "  external client netns {} address {EXTERNAL_ADDR} (no route to Pods)",
        c.external
    );
    let mut ok = true;
    for (what, to) in [
        ("NodePort on node 1", SocketAddr::from((node_addr(0), 30080))),
        ("NodePort on node 2", SocketAddr::from((node_addr(1), 30080))),
        ("ExternalIP (routed to node 1)", format!("{EXTERNAL_IP}:80").parse()?),
        ("LoadBalancer IP (routed to node 2)", format!("{LB_IP}:80").parse()?),
    ] {
        // Every agent programs both backends within a moment of them being ready.
        c.nodes[0].wait_answered_by(&to.to_string(), &["web-1", "web-2"], || {
            TcpSession::connect(&c.external, to)?.ask()
        })?;
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for _ in 0..REQUESTS {
            let mut s = TcpSession::connect(&c.external, to).with_context(|| format!("connecting to {to}"))?;
            let (name, seen) = s.ask_peer()?;
            *counts.entry((name, seen.ip().to_string())).or_default() += 1;
        }
        println!("\n{REQUESTS} TCP connections from the external client to {to} ({what}):");
        for ((name, seen), n) in &counts {
            let node = if name == "web-1" { 1 } else { 2 };
            println!(
                "  {name} (node {node}) saw the client as {seen:<15} {n:>3}  {}",
                "#".repeat(*n)
            );
        }
        ok &= ["web-1", "web-2"].iter().all(|b| counts.keys().any(|(n, _)| n == b));
    }
    println!("\n  (a backend on the node dialled sees the client; the other node's backend sees the");
    println!("   dialled node's address: SNAT, so that its reply comes back the same way)");
    for (i, lab) in c.nodes.iter().enumerate() {
        let xdp = lab.counter("xdp_forward")?;
        println!(
            "  node {}: {xdp} packets forwarded by XDP itself (to/from the other node's backend)",
            i + 1
        );
    }
    Ok(ok)
}
