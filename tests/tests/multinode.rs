//! Several lab nodes joined by an underlay (tests/src/cluster.rs): each runs its
//! own agent and shim on the same manifests; Pods say where they run
//! (spec.nodeName). Real clients, assertions on which backend answered.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::Result;
use ferry_tests::{
    cluster::Cluster,
    manifests::{client_pod, echo_pod, echo_service, on_node},
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
    let mut seen = BTreeSet::new();
    c.nodes[0].wait_until(Duration::from_secs(20), "both backends answering", || {
        seen.insert(tcp_ask(&client, addr("10.96.0.10:80"))?);
        seen.insert(udp_ask(&client, addr("10.96.0.10:53"))?);
        Ok(seen.len() == 2)
    })?;
    assert_eq!(seen, BTreeSet::from(["local".to_string(), "remote".to_string()]));
    Ok(())
}
