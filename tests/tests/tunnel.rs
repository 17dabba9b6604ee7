//! An overlay between the nodes, as VXLAN CNIs (flannel, Calico VXLAN) build
//! it: the Pod CIDRs are routed over `vx0`, a VXLAN device on the underlay
//! (MTU 1450 while the Pods use 1500), which is one of the agent's
//! `--devices` beside eth0. Pods reach a backend on the other node through
//! the tunnel (ClusterIP, TCP and UDP, 300 KB each way), and the external
//! client reaches it through node 1's NodePort, SNATed into the tunnel.
//!
//! And the same over L3 devices, which carry IP packets without an Ethernet
//! header (WireGuard, IPIP, GRE, OpenVPN, wireguard-go): TUN devices,
//! tunnelled over UDP on the underlay by socat, as userspace VPNs do.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result};
use ferry_tests::{
    client::bulk_round_trip,
    cluster::{node_addr, pod_cidr, Cluster, EXTERNAL_ADDR},
    in_netns,
    manifests::{cat_pod, client_pod, echo_pod, host_network_service, on_node},
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
        sys::run(
            "ip",
            &[
                "-n",
                ns,
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                "42",
                "dstport",
                "4789",
                "local",
                &local,
                "dev",
                "eth0",
                "nolearning",
            ],
        )?;
        for j in (0..n).filter(|j| *j != i) {
            sys::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "bridge",
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    "vx0",
                    "dst",
                    &node_addr(j).to_string(),
                ],
            )?;
        }
        sys::run(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", overlay_addr(i)),
                "dev",
                "vx0",
            ],
        )?;
        sys::run("ip", &["-n", ns, "link", "set", "vx0", "up"])?;
        for j in (0..n).filter(|j| *j != i) {
            sys::run(
                "ip",
                &[
                    "-n",
                    ns,
                    "route",
                    "replace",
                    &pod_cidr(j),
                    "via",
                    &overlay_addr(j),
                    "dev",
                    "vx0",
                ],
            )?;
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
    let c = Cluster::start(
        "vxlan",
        2,
        &[("web.yaml".into(), SERVICE.into())],
        &["--devices", "vx0"],
    )?;
    build_overlay(&c)?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    c.write_manifest("web-2.yaml", &on_node(&echo_pod("web-2", "web", None), &n2))?;
    c.write_manifest(
        "cat.yaml",
        &format!("{}---\n{CAT_SERVICE}", on_node(&cat_pod("cat", "cat"), &n2)),
    )?;
    c.write_manifest("client.yaml", &on_node(&client_pod("client"), &n1))?;
    c.wait_ready(&["web-2", "cat", "client"], Duration::from_secs(60))?;
    let pod = c.pod_netns("client")?;
    let node1 = &c.nodes[0];
    node1.wait_until(Duration::from_secs(20), "from_netdev on vx0", || {
        Ok(node1.agent_log().contains("ifname=\"vx0\""))
    })?;
    let only = BTreeSet::from(["web-2".to_string()]);
    let tcp: SocketAddr = "10.96.0.60:80".parse()?;
    let udp: SocketAddr = "10.96.0.60:53".parse()?;
    assert_eq!(
        node1.wait_answered_by("ClusterIP TCP over the overlay", &["web-2"], || tcp_ask(&pod, tcp))?,
        only
    );
    assert_eq!(
        node1.wait_answered_by("ClusterIP UDP over the overlay", &["web-2"], || udp_ask(&pod, udp))?,
        only
    );
    // Full-size segments from the Pod, one by one: the tunnel's MTU (1450)
    // answers them with fragmentation-needed, then they fit.
    sys::netns_exec(&pod, "ethtool", &["-K", "eth0", "tso", "off", "gso", "off"])?;
    let cat: SocketAddr = "10.96.0.61:80".parse()?;
    node1.wait_until(Duration::from_secs(20), "the cat Service answering", || {
        in_netns(&pod, move || {
            TcpStream::connect_timeout(&cat, Duration::from_secs(1)).is_ok()
        })
    })?;
    bulk_round_trip(&pod, cat, 300 * 1024).with_context(|| format!("300 KB through the overlay\n{}", c.logs()))?;
    // NodePort on node 1 from outside, to the backend on node 2: SNATed and
    // sent into the tunnel; the reply comes back out of it.
    let nodeport = SocketAddr::from((node_addr(0), 30600));
    assert_eq!(
        node1.wait_answered_by("NodePort into the overlay", &["web-2"], || TcpSession::connect(
            &c.external,
            nodeport
        )?
        .ask())?,
        only
    );
    // The traffic really went through the tunnel, and met its MTU.
    let sent: u64 = sys::netns_exec(&n1, "cat", &["/sys/class/net/vx0/statistics/tx_packets"])?
        .trim()
        .parse()?;
    assert!(sent > 200, "{sent} packets sent into vx0");
    assert!(
        node1.counter("frag_needed")? > 0,
        "the Pod's 1500-byte segments met the tunnel's 1450"
    );
    Ok(())
}

/// A TUN device `dev` (no Ethernet header: ARPHRD_NONE, like WireGuard's)
/// with `cidr`, in `ns`, its packets carried in UDP from `local` to `peer`
/// (port 4790 + `port`) by a socat of `procs`; MTU 1400 (under the
/// underlay's 1500 with the UDP overhead).
fn tun_link(
    procs: &mut sys::Processes,
    ns: &str,
    dev: &str,
    cidr: &str,
    local: Ipv4Addr,
    peer: Ipv4Addr,
    port: u16,
) -> Result<()> {
    let udp = format!("UDP-DATAGRAM:{peer}:{p},bind={local}:{p}", p = 4790 + port);
    let tun = format!("TUN:{cidr},tun-name={dev},tun-type=tun,iff-no-pi,iff-up");
    procs.spawn_in(ns, &["socat", &udp, &tun])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sys::netns_exec(ns, "ip", &["link", "set", dev, "mtu", "1400"]).is_err() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "socat made no {dev} in {ns}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Node i's address on its TUN link to the external client (the client's
/// end is .2 of the same /24).
fn l3_front(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, i as u8 + 1, 1)
}

#[test]
fn services_work_over_l3_devices_without_an_ethernet_header() -> Result<()> {
    over_l3_devices("l3dev", &[])
}

/// The same with cls_bpf filters (kernels before 6.6), which run the
/// programs at ingress with the same MAC-header handling.
#[test]
fn services_work_over_l3_devices_with_netlink_tc_filters() -> Result<()> {
    over_l3_devices("l3nl", &["--tc-attach", "netlink"])
}

fn over_l3_devices(tag: &str, agent_args: &[&str]) -> Result<()> {
    let args: Vec<&str> = ["--devices", "tun0", "--devices", "xt0"]
        .iter()
        .chain(agent_args)
        .copied()
        .collect();
    let c = Cluster::start(tag, 2, &[("web.yaml".into(), SERVICE.into())], &args)?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    let mut procs = sys::Processes::default();
    // The overlay: tun0 between the nodes, the Pod CIDRs routed over it.
    for (i, j) in [(0, 1), (1, 0)] {
        let ns = &c.nodes[i].node;
        tun_link(
            &mut procs,
            ns,
            "tun0",
            &format!("172.30.0.{}/24", i + 1),
            node_addr(i),
            node_addr(j),
            0,
        )?;
        sys::netns_exec(ns, "ip", &["route", "replace", &pod_cidr(j), "dev", "tun0"])?;
    }
    // The external client behind a TUN link to each node (xt0 there).
    for i in 0..2 {
        let front = l3_front(i);
        let [a, b, cc, _] = front.octets();
        tun_link(
            &mut procs,
            &c.nodes[i].node,
            "xt0",
            &format!("{front}/24"),
            node_addr(i),
            EXTERNAL_ADDR,
            i as u16 + 1,
        )?;
        tun_link(
            &mut procs,
            &c.external,
            &format!("xt{}", i + 1),
            &format!("{a}.{b}.{cc}.2/24"),
            EXTERNAL_ADDR,
            node_addr(i),
            i as u16 + 1,
        )?;
    }
    // A host-network backend on node 1 (its replies leave through to_netdev_l3).
    let ferry = sys::ferry_bin()?.display().to_string();
    procs.spawn_in(&n1, &[&ferry, "echo", "--tcp", "8090", "--name", "host-1"])?;
    c.write_manifest("hostsvc.yaml", &host_network_service(&n1, node_addr(0)))?;
    c.write_manifest("web-1.yaml", &on_node(&echo_pod("web-1", "web", None), &n1))?;
    c.write_manifest("web-2.yaml", &on_node(&echo_pod("web-2", "web", None), &n2))?;
    c.write_manifest("client.yaml", &on_node(&client_pod("client"), &n1))?;
    c.wait_ready(&["web-1", "web-2", "client"], Duration::from_secs(60))?;
    let node1 = &c.nodes[0];
    for lab in &c.nodes {
        lab.wait_until(Duration::from_secs(20), "the L3 programs on tun0 and xt0", || {
            let log = lab.agent_log();
            Ok(["tun0", "xt0"].iter().all(|d| {
                log.lines()
                    .any(|l| l.contains("from_netdev_l3 attached") && l.contains(&format!("ifname=\"{d}\"")))
                    && log
                        .lines()
                        .any(|l| l.contains("to_netdev_l3 attached") && l.contains(&format!("ifname=\"{d}\"")))
            }))
        })?;
    }
    let pod = c.pod_netns("client")?;
    // Untranslated traffic crosses the L3 devices as before (from_netdev_l3
    // on node 2 pushes a header, the stack skips it): a Pod on node 1
    // dials web-2's own address over tun0.
    let web2 = node1.pod("web-2").and_then(|p| p.pod_ip).context("web-2's address")?;
    assert_eq!(
        tcp_ask(&pod, SocketAddr::from((web2, 8080)))?,
        "web-2",
        "Pod to Pod over tun0\n{}",
        c.logs()
    );
    // ClusterIP: web-2's replies come back over tun0 into from_netdev_l3,
    // are reverse translated there and redirected into the client's veth.
    let both = BTreeSet::from(["web-1".to_string(), "web-2".to_string()]);
    let tcp: SocketAddr = "10.96.0.60:80".parse()?;
    let udp: SocketAddr = "10.96.0.60:53".parse()?;
    assert_eq!(
        node1.wait_answered_by("ClusterIP TCP over tun0", &["web-1", "web-2"], || tcp_ask(&pod, tcp))?,
        both
    );
    assert_eq!(
        node1.wait_answered_by("ClusterIP UDP over tun0", &["web-1", "web-2"], || udp_ask(&pod, udp))?,
        both
    );
    // NodePort on each node's xt0 address, from the client behind it: web-1
    // (on node 1) and web-2 (on node 2) are reached from an L3 device, the
    // local one redirected into its veth, the remote one SNATed; the
    // replies leave through xt0 again, from the address the client dialled.
    for i in 0..2 {
        let nodeport = SocketAddr::from((l3_front(i), 30600));
        let what = format!("NodePort {nodeport} over xt0");
        let seen = c.nodes[i].wait_answered_by(&what, &["web-1", "web-2"], || {
            let mut s = TcpSession::connect(&c.external, nodeport)?;
            anyhow::ensure!(s.peer == nodeport, "answered from {}", s.peer);
            s.ask()
        })?;
        assert_eq!(seen, both, "{what}");
    }
    // The host-network backend behind xt0's NodePort: its replies leave
    // through to_netdev_l3, which gives them the NodePort's address.
    let hostport = SocketAddr::from((l3_front(0), 30443));
    let seen = node1.wait_answered_by("host-network backend over xt0", &["host-1"], || {
        let mut s = TcpSession::connect(&c.external, hostport)?;
        s.ask()
    })?;
    assert_eq!(seen, BTreeSet::from(["host-1".to_string()]));
    let mut s = TcpSession::connect(&c.external, hostport)?;
    for _ in 0..3 {
        assert_eq!(s.ask()?, "host-1", "one connection, several round trips");
    }
    // TUN devices start at the IPv4 header: nothing was passed over for
    // outer headers.
    for lab in &c.nodes {
        assert_eq!(lab.counter("l3_outer_header")?, 0, "{}", lab.node);
    }
    // It all went through the TUN devices.
    for (ns, dev) in [(&n1, "tun0"), (&n1, "xt0")] {
        let sent: u64 = sys::netns_exec(ns, "cat", &[&format!("/sys/class/net/{dev}/statistics/tx_packets")])?
            .trim()
            .parse()?;
        assert!(sent > 10, "{sent} packets sent into {dev} on node 1");
    }
    drop(procs);
    Ok(())
}
