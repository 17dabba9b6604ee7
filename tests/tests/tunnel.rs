//! An overlay between the nodes, as VXLAN CNIs (flannel, Calico VXLAN) build
//! it: the Pod CIDRs are routed over `vx0`, a VXLAN device on the underlay
//! (MTU 1450 while the Pods use 1500), which is one of the agent's
//! `--devices` beside eth0. Pods reach a backend on the other node through
//! the tunnel (ClusterIP, TCP and UDP, 300 KB each way), and the external
//! client reaches it through node 1's NodePort, SNATed into the tunnel.
use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result};
use ferry_tests::{
    client::bulk_round_trip,
    cluster::{node_addr, pod_cidr, Cluster},
    in_netns,
    manifests::{cat_pod, client_pod, echo_pod, on_node},
    sys, tcp_ask, udp_ask, TcpSession,
};

const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30600}
    - {name: dns, port: 53, protocol: UDP, targetPort: 8080}
"#;

/// Node i's address on the overlay.
fn overlay_addr(i: usize) -> String {
    format!("172.30.0.{}", i + 1)
}

/// A VXLAN device vx0 on each node, the other node as its flood entry, and
/// the Pod CIDRs of the other nodes routed over it.
fn build_overlay(c: &Cluster) -> Result<()> {
    let n = c.nodes.len();
    for (i, lab) in c.nodes.iter().enumerate() {
        let ns = lab.node.as_str();
        let local = node_addr(i).to_string();
        sys::run("ip", &["-n", ns, "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789", "local", &local, "dev", "eth0", "nolearning"])?;
        for j in (0..n).filter(|j| *j != i) {
            sys::run("ip", &["netns", "exec", ns, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst", &node_addr(j).to_string()])?;
        }
        sys::run("ip", &["-n", ns, "addr", "add", &format!("{}/24", overlay_addr(i)), "dev", "vx0"])?;
        sys::run("ip", &["-n", ns, "link", "set", "vx0", "up"])?;
        for j in (0..n).filter(|j| *j != i) {
            sys::run("ip", &["-n", ns, "route", "replace", &pod_cidr(j), "via", &overlay_addr(j), "dev", "vx0"])?;
        }
    }
    Ok(())
}

/// The `cat` Service in front of the echo-everything Pod.
const CAT_SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: cat, namespace: default}
spec:
  clusterIP: 10.96.0.61
  selector: {app: cat}
  ports: [{name: data, port: 80, targetPort: 9000}]
"#;

#[test]
fn services_work_across_a_vxlan_overlay() -> Result<()> {
    let c = Cluster::start("vxlan", 2, &[("web.yaml".into(), SERVICE.into())], &["--devices", "vx0"])?;
    build_overlay(&c)?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    c.write_manifest("web-2.yaml", &on_node(&echo_pod("web-2", "web", None), &n2))?;
    c.write_manifest("cat.yaml", &format!("{}---\n{CAT_SERVICE}", on_node(&cat_pod("cat", "cat"), &n2)))?;
    c.write_manifest("client.yaml", &on_node(&client_pod("client"), &n1))?;
    c.wait_ready(&["web-2", "cat", "client"], Duration::from_secs(60))?;
    let pod = c.pod_netns("client")?;
    let node1 = &c.nodes[0];
    node1.wait_until(Duration::from_secs(20), "from_netdev on vx0", || Ok(node1.agent_log().contains("ifname=\"vx0\"")))?;
    let only = BTreeSet::from(["web-2".to_string()]);
    let tcp: SocketAddr = "10.96.0.60:80".parse()?;
    let udp: SocketAddr = "10.96.0.60:53".parse()?;
    assert_eq!(node1.wait_answered_by("ClusterIP TCP over the overlay", &["web-2"], || tcp_ask(&pod, tcp))?, only);
    assert_eq!(node1.wait_answered_by("ClusterIP UDP over the overlay", &["web-2"], || udp_ask(&pod, udp))?, only);
    // Full-size segments from the Pod, one by one: the tunnel's MTU (1450)
    // answers them with fragmentation-needed, then they fit.
    sys::netns_exec(&pod, "ethtool", &["-K", "eth0", "tso", "off", "gso", "off"])?;
    let cat: SocketAddr = "10.96.0.61:80".parse()?;
    node1.wait_until(Duration::from_secs(20), "the cat Service answering", || {
        Ok(in_netns(&pod, move || TcpStream::connect_timeout(&cat, Duration::from_secs(1)).is_ok())?)
    })?;
    bulk_round_trip(&pod, cat, 300 * 1024).with_context(|| format!("300 KB through the overlay\n{}", c.logs()))?;
    // NodePort on node 1 from outside, to the backend on node 2: SNATed and
    // sent into the tunnel; the reply comes back out of it.
    let nodeport = SocketAddr::from((node_addr(0), 30600));
    assert_eq!(node1.wait_answered_by("NodePort into the overlay", &["web-2"], || TcpSession::connect(&c.external, nodeport)?.ask())?, only);
    // The traffic really went through the tunnel, and met its MTU.
    let sent: u64 = sys::netns_exec(&n1, "cat", &["/sys/class/net/vx0/statistics/tx_packets"])?.trim().parse()?;
    assert!(sent > 200, "{sent} packets sent into vx0");
    assert!(node1.counter("frag_needed")? > 0, "the Pod's 1500-byte segments met the tunnel's 1450");
    Ok(())
}
