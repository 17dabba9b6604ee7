//! Several lab nodes joined by an underlay (tests/src/cluster.rs): each runs its
//! own agent and shim on the same manifests; Pods say where they run
//! (spec.nodeName) or the shims spread them. Real clients, assertions on which
//! backend answered.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use anyhow::{ensure, Result};
use ferry_tests::{
    cluster::{node_addr, pod_cidr, Cluster},
    manifests::{client_pod, echo_deployment, echo_pod, echo_service, on_node},
    tcp_ask, udp_ask, TcpSession,
};

const READY: Duration = Duration::from_secs(60);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A Pod on node 1 reaches a ClusterIP whose backends run on node 2 only, then
/// on both nodes: the request crosses the underlay, from_netdev on node 1
/// reverse-translates the reply, and the client sees the ClusterIP it dialled
/// (a TCP connection would be reset otherwise, a UDP answer dropped).
#[test]
fn a_pod_reaches_a_clusterip_with_a_backend_on_another_node() -> Result<()> {
    let svc = echo_service("echo", "echo", "10.96.0.10");
    let c = Cluster::start("xnode", 2, &[("service.yaml".into(), svc)], &[])?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    c.write_manifest("client.yaml", &on_node(&client_pod("client"), &n1))?;
    c.write_manifest("remote.yaml", &on_node(&echo_pod("remote", "echo", None), &n2))?;
    c.wait_ready(&["client", "remote"], READY)?;
    let client = c.pod_netns("client")?;
    c.nodes[0].wait_until(Duration::from_secs(10), "the remote backend answering", || {
        Ok(tcp_ask(&client, addr("10.96.0.10:80")).is_ok())
    })?;
    for _ in 0..10 {
        assert_eq!(tcp_ask(&client, addr("10.96.0.10:80"))?, "remote");
        assert_eq!(udp_ask(&client, addr("10.96.0.10:53"))?, "remote");
    }
    // A persistent connection: every reply carries the ClusterIP back.
    let mut s = TcpSession::connect(&client, addr("10.96.0.10:80"))?;
    assert_eq!(s.peer, addr("10.96.0.10:80"));
    for _ in 0..5 {
        assert_eq!(s.ask()?, "remote");
    }
    // A second backend on the client's own node: both are used.
    c.write_manifest("local.yaml", &on_node(&echo_pod("local", "echo", None), &n1))?;
    c.wait_ready(&["local"], READY)?;
    let both = ["local", "remote"];
    let seen = c.nodes[0].wait_answered_by("TCP", &both, || tcp_ask(&client, addr("10.96.0.10:80")))?;
    assert_eq!(seen, BTreeSet::from(both.map(String::from)));
    let seen = c.nodes[0].wait_answered_by("UDP", &both, || udp_ask(&client, addr("10.96.0.10:53")))?;
    assert_eq!(seen, BTreeSet::from(both.map(String::from)));
    Ok(())
}

const SPREAD_SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: spread, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  selector: {app: spread}
  ports:
    - {name: http, port: 80, targetPort: http, nodePort: 30080}
"#;

/// A Deployment of 4 and a client Pod, none with spec.nodeName, in a 2-node
/// cluster: the shims (each with `--nodes` of both) run every Pod exactly once
/// and spread the replicas 2 + 2; each Pod has an address of its node's pod
/// CIDR; the Service's ClusterIP (from the client) and its NodePort (from the
/// external client, on either node) reach all four. Scaled to 2, one stays on
/// each node.
#[test]
fn unpinned_pods_are_spread_over_the_nodes_and_run_once() -> Result<()> {
    let replicas = 4;
    let c = Cluster::start(
        "spread",
        2,
        &[
            ("service.yaml".into(), SPREAD_SERVICE.into()),
            ("echo.yaml".into(), echo_deployment("echo", "spread", replicas)),
            ("client.yaml".into(), client_pod("client")),
        ],
        &[],
    )?;
    let names: Vec<String> = (0..replicas).map(|i| format!("echo-{i}")).collect();
    let mut wait: Vec<&str> = names.iter().map(String::as_str).collect();
    wait.push("client");
    c.wait_ready(&wait, READY)?;
    // Both shims have run a few loops by now: a Pod run twice, or a replica too
    // many, would show as a second record or another name.
    std::thread::sleep(Duration::from_secs(3));
    let records = c.nodes[0].pods();
    let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &records {
        let i = c.nodes.iter().position(|l| l.node == r.node);
        ensure!(i.is_some(), "pod {} on unknown node {}", r.name, r.node);
        let cidr = pod_cidr(i.unwrap_or(0));
        let net = cidr.trim_end_matches("0/24");
        ensure!(
            r.pod_ip.is_some_and(|ip| ip.to_string().starts_with(net)),
            "pod {} on {} has address {:?}, not of its node's pod CIDR {cidr}",
            r.name,
            r.node,
            r.pod_ip
        );
        per_node.entry(r.node.clone()).or_default().push(r.name.clone());
    }
    let mut all: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
    all.sort();
    let mut want = names.clone();
    want.push("client".into());
    want.sort();
    assert_eq!(all, want, "every Pod exactly once: {per_node:?}");
    for lab in &c.nodes {
        let echo = per_node
            .get(&lab.node)
            .map_or(0, |p| p.iter().filter(|n| n.starts_with("echo-")).count());
        assert_eq!(echo, 2, "two of four replicas on {}: {per_node:?}", lab.node);
    }
    eprintln!("placement: {per_node:?}");

    let want: BTreeSet<String> = names.iter().cloned().collect();
    let client = c.pod_netns("client")?;
    let cluster_ip = addr("10.96.0.30:80");
    let seen = c.nodes[0].wait_answered_by("the ClusterIP", &names, || tcp_ask(&client, cluster_ip))?;
    assert_eq!(seen, want, "only the replicas answer");
    for i in 0..c.nodes.len() {
        let node_port = SocketAddr::from((node_addr(i), 30080));
        let seen = c.nodes[0].wait_answered_by(&format!("NodePort {node_port}"), &names, || {
            tcp_ask(&c.external, node_port)
        })?;
        assert_eq!(seen, want, "only the replicas answer on {node_port}");
    }
    // Scaled down to 2: each node keeps the lowest index of its share, so one
    // replica stays on each node.
    c.write_manifest("echo.yaml", &echo_deployment("echo", "spread", 2))?;
    c.nodes[0].wait_until(Duration::from_secs(30), "echo-2 and echo-3 gone", || {
        let echo: Vec<String> = c.nodes[0]
            .pods()
            .into_iter()
            .filter(|r| r.name.starts_with("echo-"))
            .map(|r| r.name)
            .collect();
        Ok(echo == ["echo-0", "echo-1"])
    })?;
    let on = |name: &str| c.nodes[0].pod(name).map(|r| r.node);
    assert_ne!(on("echo-0"), on("echo-1"), "one replica per node");
    Ok(())
}
