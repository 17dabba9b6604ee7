//! Host-network backends: a Service whose endpoint is a process of the node
//! itself (like the `kubernetes` Service's API server, a node-local DNS
//! cache, an ingress controller with hostNetwork). Its replies leave through
//! the node's own stack, not a Pod's veth: the dataplane reverse-translates
//! them at TC egress (to_pod, to_netdev). Real clients: a Pod on the same
//! node and one on the other node (ClusterIP, TCP and UDP), and the external
//! client through the NodePort.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::Result;
use ferry_tests::{
    cluster::{node_addr, Cluster},
    manifests::{client_pod, host_network_service, on_node},
    sys, tcp_ask, udp_ask, TcpSession,
};

/// The host-network backend, processes of node 1 itself, killed on drop:
/// `ferry echo` on TCP 8090, and on UDP 8090 a socat bound to the node's
/// address (a UDP server on a wildcard address answers from whatever source
/// the route to the client picks, which matches no flow, with kube-proxy
/// either: host-network UDP servers bind their address, as node-local DNS
/// caches do).
fn host_processes(node: &str) -> Result<sys::Processes> {
    let ferry = sys::ferry_bin()?.display().to_string();
    let udp = format!("UDP-RECVFROM:8090,bind={},fork", node_addr(0));
    let mut started = sys::Processes::default();
    started.spawn_in(node, &[&ferry, "echo", "--tcp", "8090", "--name", "host-1"])?;
    started.spawn_in(node, &["socat", &udp, "SYSTEM:echo host-1"])?;
    Ok(started)
}

#[test]
fn a_host_network_backend_answers_pods_on_both_nodes_and_outside_clients() -> Result<()> {
    let c = Cluster::start("hostbe", 2, &[], &[])?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    let _servers = host_processes(&n1)?;
    c.write_manifest("hostsvc.yaml", &host_network_service(&n1, node_addr(0)))?;
    c.write_manifest("near.yaml", &on_node(&client_pod("near"), &n1))?;
    c.write_manifest("far.yaml", &on_node(&client_pod("far"), &n2))?;
    c.wait_ready(&["near", "far"], Duration::from_secs(60))?;
    let only = BTreeSet::from(["host-1".to_string()]);
    let tcp: SocketAddr = "10.96.0.50:443".parse()?;
    let udp: SocketAddr = "10.96.0.50:53".parse()?;
    for pod in ["near", "far"] {
        let ns = c.pod_netns(pod)?;
        let seen =
            c.nodes[0].wait_answered_by(&format!("ClusterIP TCP from {pod}"), &["host-1"], || tcp_ask(&ns, tcp))?;
        assert_eq!(seen, only, "{pod}");
        // Several round trips on one connection: every reply comes from the ClusterIP.
        let mut s = TcpSession::connect(&ns, tcp)?;
        assert_eq!(s.peer, tcp);
        for _ in 0..3 {
            assert_eq!(s.ask()?, "host-1", "{pod}: one connection");
        }
        // UDP: a connected socket takes answers only from where it sent to.
        let seen =
            c.nodes[0].wait_answered_by(&format!("ClusterIP UDP from {pod}"), &["host-1"], || udp_ask(&ns, udp))?;
        assert_eq!(seen, only, "{pod} UDP");
    }
    let nodeport = SocketAddr::from((node_addr(0), 30443));
    let seen = c.nodes[0].wait_answered_by("NodePort from outside", &["host-1"], || {
        TcpSession::connect(&c.external, nodeport)?.ask()
    })?;
    assert_eq!(seen, only);
    // On node 1 the translated packets to its own address (from `near` and
    // from outside) were delivered by its stack: counted as such, never as
    // FIB misses.
    let (local, miss) = (c.nodes[0].counter("fib_local")?, c.nodes[0].counter("fib_miss")?);
    assert!(local > 0, "fib_local on node 1: {local}");
    assert_eq!(miss, 0, "fib_miss on node 1 (fib_local {local})");
    Ok(())
}

/// `--nodeport-mode dsr`: the external client dials node 2's NodePort, whose
/// only backend is node 1's own process. Node 2 sends the SYN with the DSR
/// option; node 1 records the flow, and the reply its stack sends is given
/// node 2's NodePort as source at to-netdev, straight to the client.
#[test]
fn with_dsr_a_host_network_backend_answers_through_the_other_nodes_nodeport_directly() -> Result<()> {
    let c = Cluster::start("hostdsr", 2, &[], &["--nodeport-mode", "dsr"])?;
    let n1 = c.nodes[0].node.clone();
    let _servers = host_processes(&n1)?;
    c.write_manifest("hostsvc.yaml", &host_network_service(&n1, node_addr(0)))?;
    let nodeport = SocketAddr::from((node_addr(1), 30443));
    c.nodes[1].wait_answered_by("NodePort of node 2 from outside", &["host-1"], || {
        TcpSession::connect(&c.external, nodeport)?.ask()
    })?;
    let mut s = TcpSession::connect(&c.external, nodeport)?;
    assert_eq!(s.peer, nodeport);
    for _ in 0..3 {
        let (name, peer) = s.ask_peer()?;
        assert_eq!(name, "host-1");
        assert_eq!(peer, s.stream().local_addr()?, "the backend sees the client itself");
    }
    let (node1, node2) = (&c.nodes[0], &c.nodes[1]);
    assert!(node1.counter("dsr_accept")? > 0, "node 1 recorded the flows");
    assert!(
        node1.counter("dsr_reply")? > 0,
        "node 1's to-netdev translated the replies"
    );
    assert!(node2.counter("dsr_forward")? > 0);
    assert_eq!(node2.counter("reverse_nat")?, 0, "no reply passed node 2");
    Ok(())
}
