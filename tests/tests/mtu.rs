//! Path MTU through the translation: the underlay (the nodes' and the
//! external client's devices) has an MTU of 1400 while the Pods use 1500.
//! A Pod's 1500-byte packets to a Service whose backend is on the other node
//! are too big for the underlay: the dataplane answers them with ICMP
//! "fragmentation needed" quoting them as the Pod sent them (to the
//! ClusterIP), so the Pod's TCP lowers its path MTU instead of blackholing.
//! 300 KB up and down through ClusterIP and NodePort, with real clients.
//! And UDP datagrams of 3,000 and 65,000 bytes, which travel as IP
//! fragments (2 and 45), both ways through every frontend kind: ClusterIP,
//! NodePort (remote backend, SNATed), ExternalIP, LoadBalancer (local
//! backend).
use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use ferry_tests::{
    client::bulk_round_trip,
    cluster::{node_addr, Cluster},
    in_netns,
    manifests::{cat_pod, client_pod, on_node},
    sys,
};

const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: bulk, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  selector: {app: bulk}
  externalIPs: [203.0.113.40]
  ports:
    - {name: data, port: 80, targetPort: 9000, nodePort: 30400}
    - {name: dgram, port: 53, protocol: UDP, targetPort: 9001, nodePort: 30401}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.41}]
"#;
/// The ExternalIP, routed by the external client to node 1 (the backend
/// is on node 2), and the LoadBalancer IP, routed to node 2.
const EXTERNAL_IP: [u8; 4] = [203, 0, 113, 40];
const LB_IP: [u8; 4] = [203, 0, 113, 41];

const SIZE: usize = 300 * 1024;
const DGRAM: usize = 3000;
/// Near the largest UDP payload IPv4 carries (65,507).
const BIG_DGRAM: usize = 65_000;

#[test]
fn three_hundred_kilobytes_each_way_through_a_1400_byte_underlay() -> Result<()> {
    let c = Cluster::start("mtu", 2, &[("bulk.yaml".into(), SERVICE.into())], &[])?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    for ns in [&n1, &n2, &c.external] {
        sys::run("ip", &["-n", ns, "link", "set", "eth0", "mtu", "1400"])?;
    }
    c.write_manifest("bulk-pod.yaml", &on_node(&cat_pod("bulk", "bulk"), &n2))?;
    c.write_manifest("client.yaml", &on_node(&client_pod("client"), &n1))?;
    c.wait_ready(&["bulk", "client"], Duration::from_secs(60))?;
    let pod = c.pod_netns("client")?;
    let clusterip: SocketAddr = "10.96.0.40:80".parse()?;
    c.nodes[0].wait_until(Duration::from_secs(20), "the ClusterIP answering", || {
        in_netns(&pod, move || {
            TcpStream::connect_timeout(&clusterip, Duration::from_secs(1)).is_ok()
        })
    })?;
    // With the veth's offloads (TSO/GSO, as Pods have them). The FIB
    // lookup lets GSO packets pass whatever their segments' size; the path
    // MTU is learned from the flow's full-size packets that are not GSO.
    bulk_round_trip(&pod, clusterip, SIZE)
        .with_context(|| format!("ClusterIP from a Pod on node 1, offloads on\n{}", c.logs()))?;
    let too_big = c.nodes[0].counter("frag_needed")?;
    assert!(
        too_big > 0,
        "the Pod's 1500-byte packets were answered with fragmentation-needed"
    );
    // Segments as the Pod's TCP makes them (no offload merging them), each
    // meeting the MTU check on its own (the Pod's route cache now knows the
    // path MTU).
    sys::netns_exec(&pod, "ethtool", &["-K", "eth0", "tso", "off", "gso", "off"])?;
    bulk_round_trip(&pod, clusterip, SIZE).with_context(|| format!("ClusterIP from a Pod on node 1\n{}", c.logs()))?;
    // NodePort from outside, to the backend on node 2 through node 1 (SNAT).
    bulk_round_trip(&c.external, SocketAddr::from((node_addr(0), 30400)), SIZE)
        .with_context(|| format!("NodePort from outside\n{}", c.logs()))?;
    Ok(())
}

/// A datagram of `size` bytes to `to` from `netns` (sent as fragments),
/// and the same bytes back (fragments again).
fn datagram_round_trip(netns: &str, to: SocketAddr, size: usize) -> Result<()> {
    in_netns(netns, move || -> Result<()> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.connect(to)?;
        let data: Vec<u8> = (0..size).map(|i| (i % 241) as u8).collect();
        s.send(&data)?;
        let mut back = vec![0u8; 65536];
        let n = s.recv(&mut back).context("no answer")?;
        ensure!(back[..n] == data[..], "{n} bytes came back, not the {size} sent");
        Ok(())
    })?
}

#[test]
fn udp_datagrams_up_to_64_kib_both_ways_through_every_frontend_kind() -> Result<()> {
    let c = Cluster::start("frag", 2, &[("bulk.yaml".into(), SERVICE.into())], &[])?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    for (ip, node) in [(EXTERNAL_IP, 0), (LB_IP, 1)] {
        c.route_external(std::net::Ipv4Addr::from(ip), node)?;
    }
    c.write_manifest("bulk-pod.yaml", &on_node(&cat_pod("bulk", "bulk"), &n2))?;
    c.write_manifest("client.yaml", &on_node(&client_pod("client"), &n1))?;
    c.wait_ready(&["bulk", "client"], Duration::from_secs(60))?;
    let pod = c.pod_netns("client")?;
    let node1 = &c.nodes[0];
    for (what, netns, to) in [
        (
            "ClusterIP from a Pod",
            pod.as_str(),
            SocketAddr::from(([10, 96, 0, 40], 53)),
        ),
        (
            "NodePort from outside",
            c.external.as_str(),
            SocketAddr::from((node_addr(0), 30401)),
        ),
        (
            "ExternalIP from outside",
            c.external.as_str(),
            SocketAddr::from((EXTERNAL_IP, 53)),
        ),
        (
            "LoadBalancer IP from outside",
            c.external.as_str(),
            SocketAddr::from((LB_IP, 53)),
        ),
    ] {
        // The first datagrams may race the agent's first sync.
        node1.wait_until(
            Duration::from_secs(20),
            &format!("{what}: {DGRAM} bytes there and back"),
            || Ok(datagram_round_trip(netns, to, DGRAM).is_ok()),
        )?;
        for size in [DGRAM, DGRAM, BIG_DGRAM, BIG_DGRAM] {
            datagram_round_trip(netns, to, size).with_context(|| format!("{what}, {size} bytes\n{}", c.logs()))?;
        }
    }
    Ok(())
}
