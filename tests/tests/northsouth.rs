//! North-south traffic on a two-node lab: NodePort, ExternalIPs and
//! LoadBalancer IPs reached from the external client namespace, which can reach
//! the nodes' addresses but not the Pods'. One backend runs on each node.
//! Assertions on what the client received, which backend answered, and which
//! address the backend saw the client at.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use ferry_tests::{
    cluster::{node_addr, Cluster, EXTERNAL_ADDR},
    http_get, in_netns,
    manifests::{client_pod, echo_pod, on_node},
    split, sys, tcp_ask, udp_ask, udp_ask_peer, TcpSession,
};

const READY: Duration = Duration::from_secs(60);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// A second address on node 1, outside `--nodeport-addresses`.
const OTHER_NET_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 88, 11);

fn services() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default, creationTimestamp: "2026-01-01T00:00:00Z"}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  selector: {{app: web}}
  externalIPs: ["{EXTERNAL_IP}"]
  ports:
    - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}
    - {{name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30053}}
status:
  loadBalancer:
    ingress: [{{ip: "{LB_IP}"}}]
---
apiVersion: v1
kind: Service
metadata: {{name: far, namespace: default}}
spec:
  type: NodePort
  selector: {{app: far}}
  ports:
    - {{name: http, port: 80, targetPort: 8080, nodePort: 30081}}
    - {{name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30082}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  type: NodePort
  selector: {{app: nobody}}
  ports:
    - {{name: http, port: 80, targetPort: 8080, nodePort: 30099}}
---
apiVersion: v1
kind: Service
metadata: {{name: clash, namespace: default, creationTimestamp: "2026-01-02T00:00:00Z"}}
spec:
  type: NodePort
  selector: {{app: far}}
  ports:
    - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}
"#
    )
}

/// How the agents run: TC only, or with `--xdp` in front.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Tc,
    Xdp,
}

/// `--nodeport-mode` of every agent: how flows reach a backend on the other
/// node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Snat,
    Dsr,
    Hybrid,
}

/// Two nodes, `web-1` on node 1 and `web-2` on node 2 (also the only `far`
/// backend); the external client routes the ExternalIP to node 1 and the
/// LoadBalancer IP to node 2, and has a second address for the SNAT test.
fn cluster(path: Path) -> Result<Cluster> {
    cluster_in(path, Mode::Snat)
}

/// [`cluster`] with the agents in NodePort mode `mode`.
fn cluster_in(path: Path, mode: Mode) -> Result<Cluster> {
    let mut args = vec!["--nodeport-addresses", "192.168.77.0/24"];
    if path == Path::Xdp {
        args.push("--xdp");
    }
    match mode {
        Mode::Snat => {}
        Mode::Dsr => args.extend(["--nodeport-mode", "dsr"]),
        Mode::Hybrid => args.extend(["--nodeport-mode", "hybrid"]),
    }
    let tag = match (path, mode) {
        (Path::Tc, Mode::Snat) => "ns",
        (Path::Xdp, Mode::Snat) => "nsx",
        (Path::Tc, Mode::Dsr) => "nsd",
        (Path::Xdp, Mode::Dsr) => "nsdx",
        (Path::Tc, Mode::Hybrid) => "nsh",
        (Path::Xdp, Mode::Hybrid) => "nshx",
    };
    let c = Cluster::start(tag, 2, &[("services.yaml".into(), services())], &args)?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    c.write_manifest("web-1.yaml", &on_node(&echo_pod("web-1", "web", None), &n1))?;
    c.write_manifest("web-2.yaml", &on_node(&echo_pod("web-2", "web", None), &n2))?;
    c.write_manifest("far.yaml", &on_node(&echo_pod("far-2", "far", None), &n2))?;
    let ext = &c.external;
    c.route_external(EXTERNAL_IP, 0)?;
    c.route_external(LB_IP, 1)?;
    sys::run("ip", &["-n", ext, "addr", "add", "192.168.77.201/24", "dev", "eth0"])?;
    // Node 1's second address, and a way for the client to reach it.
    sys::run(
        "ip",
        &["-n", &n1, "addr", "add", &format!("{OTHER_NET_ADDR}/24"), "dev", "eth0"],
    )?;
    sys::run("ip", &["-n", ext, "addr", "add", "192.168.88.200/24", "dev", "eth0"])?;
    c.wait_ready(&["web-1", "web-2", "far-2"], READY)?;
    Ok(c)
}

/// Backend name → the addresses it saw the client at, over `n` connections.
fn spread(c: &Cluster, to: SocketAddr, n: usize) -> Result<BTreeMap<String, BTreeSet<Ipv4Addr>>> {
    let mut out: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for _ in 0..n {
        let mut s = TcpSession::connect(&c.external, to)?;
        assert_eq!(s.peer, to, "the client is connected to what it dialled");
        let (name, seen) = s.ask_peer()?;
        let std::net::IpAddr::V4(ip) = seen.ip() else {
            anyhow::bail!("IPv6 peer {seen}")
        };
        out.entry(name).or_default().insert(ip);
    }
    Ok(out)
}

fn wait_serving(c: &Cluster, to: SocketAddr) -> Result<()> {
    c.nodes[0].wait_until(Duration::from_secs(15), &format!("{to} answering"), || {
        Ok(TcpSession::connect(&c.external, to).and_then(|mut s| s.ask()).is_ok())
    })
}

/// Waits until `to` is answered by every backend in `names`.
fn wait_backends(c: &Cluster, to: SocketAddr, names: &[&str]) -> Result<BTreeSet<String>> {
    c.nodes[0].wait_answered_by(&to.to_string(), names, || TcpSession::connect(&c.external, to)?.ask())
}

#[test]
fn nodeport_externalip_and_loadbalancer_reach_backends_on_both_nodes() -> Result<()> {
    nodeport_externalip_and_loadbalancer(Path::Tc)
}

/// The same with `--xdp`: the same results, and XDP did forward packets
/// itself (the flows through a node to the other node's backend).
#[test]
fn with_xdp_nodeport_externalip_and_loadbalancer_reach_backends_on_both_nodes() -> Result<()> {
    nodeport_externalip_and_loadbalancer(Path::Xdp)
}

fn nodeport_externalip_and_loadbalancer(path: Path) -> Result<()> {
    let c = cluster(path)?;
    let client = EXTERNAL_ADDR;
    for (i, node) in [node_addr(0), node_addr(1)].into_iter().enumerate() {
        let to = SocketAddr::from((node, 30080));
        wait_backends(&c, to, &["web-1", "web-2"])?;
        let seen = spread(&c, to, 40)?;
        let names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            BTreeSet::from(["web-1", "web-2"]),
            "NodePort on node {} reaches both nodes' backends",
            i + 1
        );
        // The backend on the node dialled sees the client itself; the one on
        // the other node sees the dialled node's address (SNAT, Cluster policy).
        let (local, remote) = if i == 0 { ("web-1", "web-2") } else { ("web-2", "web-1") };
        assert_eq!(seen[local], BTreeSet::from([client]), "local backend sees the client");
        assert_eq!(
            seen[remote],
            BTreeSet::from([node]),
            "remote backend sees node {}'s address",
            i + 1
        );
    }
    // UDP NodePort: a connected socket only accepts answers from the address
    // it sent to, so an answer proves the reply was translated back.
    for node in [node_addr(0), node_addr(1)] {
        let to = SocketAddr::from((node, 30053));
        let answers = split(&c.external, 40, |ns| {
            udp_ask(ns, to).with_context(|| format!("UDP via {to}"))
        })?;
        let names: BTreeSet<String> = answers.into_keys().collect();
        assert_eq!(
            names,
            BTreeSet::from(["web-1".to_string(), "web-2".to_string()]),
            "UDP via {to}"
        );
    }
    // ExternalIP (routed to node 1) and LoadBalancer IP (routed to node 2).
    for to in [SocketAddr::from((EXTERNAL_IP, 80)), SocketAddr::from((LB_IP, 80))] {
        wait_backends(&c, to, &["web-1", "web-2"])?;
        let names: BTreeSet<String> = spread(&c, to, 40)?.into_keys().collect();
        assert_eq!(
            names,
            BTreeSet::from(["web-1".to_string(), "web-2".to_string()]),
            "{to}"
        );
    }
    let conntrack = c.nodes[0].ferry(&["ct", "list"])?;
    assert!(
        conntrack.contains(&format!("{}:30080", node_addr(0))),
        "ct list shows NodePort flows:\n{conntrack}"
    );
    assert_xdp(&c, path, &[0, 1])
}

/// With XDP, every node logged how XDP attached, and the XDP programs of
/// the nodes in `forwarding` (indices: the nodes that had flows to a backend on
/// another node) forwarded packets themselves; without, no XDP forwarded.
fn assert_xdp(c: &Cluster, path: Path, forwarding: &[usize]) -> Result<()> {
    for (i, node) in c.nodes.iter().enumerate() {
        let forwarded = node.counter("xdp_forward")?;
        match path {
            Path::Xdp => {
                // A node whose flows went only through the other node may
                // still be loading its programs (the test did not wait for it).
                node.wait_until(Duration::from_secs(20), "xdp_from_netdev attached", || {
                    Ok(node.agent_log().contains("xdp_from_netdev attached"))
                })?;
                if forwarding.contains(&i) {
                    assert!(forwarded > 0, "node {}: XDP forwarded no packet", i + 1);
                }
            }
            Path::Tc => assert_eq!(forwarded, 0, "node {}: XDP forwarded packets without --xdp", i + 1),
        }
    }
    Ok(())
}

#[test]
fn snat_ports_collide_nodeport_addresses_are_honoured_and_duplicates_are_refused() -> Result<()> {
    snat_ports_nodeport_addresses_and_duplicates(Path::Tc)
}

#[test]
fn with_xdp_snat_ports_collide_nodeport_addresses_are_honoured_and_duplicates_are_refused() -> Result<()> {
    snat_ports_nodeport_addresses_and_duplicates(Path::Xdp)
}

fn snat_ports_nodeport_addresses_and_duplicates(path: Path) -> Result<()> {
    let mut c = cluster(path)?;
    // Two external clients, the same source port, the same remote backend
    // through node 1: the second flow gets another SNAT port; both work.
    let to = SocketAddr::from((node_addr(0), 30081));
    wait_serving(&c, to)?;
    let mut a = TcpSession::connect_from(&c.external, "192.168.77.200:40001".parse()?, to)?;
    let mut b = TcpSession::connect_from(&c.external, "192.168.77.201:40001".parse()?, to)?;
    for _ in 0..3 {
        let (na, sa) = a.ask_peer()?;
        let (nb, sb) = b.ask_peer()?;
        assert_eq!((na.as_str(), nb.as_str()), ("far-2", "far-2"));
        assert_eq!(
            (sa.ip(), sb.ip()),
            (node_addr(0).into(), node_addr(0).into()),
            "both SNATed to node 1"
        );
        assert_ne!(sa.port(), sb.port(), "distinct SNAT ports");
    }
    // Node 1's address outside --nodeport-addresses: not served (the kernel
    // refuses, nothing listens there).
    let outside = SocketAddr::from((OTHER_NET_ADDR, 30080));
    let err = TcpSession::connect(&c.external, outside)
        .err()
        .context("the NodePort answered outside --nodeport-addresses")?;
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
    // A NodePort Service without any endpoint refuses at once (TCP RST from
    // the address dialled), like kube-proxy's REJECT rules; never a hang.
    let started = std::time::Instant::now();
    let err = TcpSession::connect(&c.external, SocketAddr::from((node_addr(0), 30099)))
        .err()
        .context("a NodePort without endpoints answered")?;
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "refused only after {:?}",
        started.elapsed()
    );
    // The later Service asking for a NodePort already taken: an error naming
    // it and the field; the earlier keeps it (its backends answered above,
    // never the later one's far-2).
    let logs = c.nodes[0].agent_log();
    assert!(
        logs.contains("Service default/clash")
            && logs.contains("spec.ports[0].nodePort")
            && logs.contains("30080/TCP is already used by Service default/web"),
        "{logs}"
    );
    // Node 1 forwarded the flows to far-2 on node 2.
    assert_xdp(&c, path, &[0])?;
    // An agent restart keeps the programs attached (pinned links, the new
    // agent swaps its programs in) and the connections going.
    c.nodes[0].stop_agent();
    assert_eq!(a.ask_peer()?.0, "far-2", "served while no agent runs");
    c.nodes[0].start_agent()?;
    // The device's hooks attach in order: TC, then XDP.
    let last = if path == Path::Xdp {
        "xdp_from_netdev"
    } else {
        "from_netdev"
    };
    let reused = format!("{last} attached (reused pinned link)");
    c.nodes[0].wait_until(
        Duration::from_secs(20),
        &format!("the restarted agent logging {reused:?}"),
        || Ok(c.nodes[0].agent_log().contains(&reused)),
    )?;
    for s in [&mut a, &mut b] {
        assert_eq!(s.ask_peer()?.0, "far-2", "served after the restart");
    }
    Ok(())
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_health_checks_tell_the_nodes_apart() -> Result<()> {
    let svc = r#"apiVersion: v1
kind: Service
metadata: {name: loc, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  selector: {app: loc}
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30090}
"#;
    let c = Cluster::start("etp", 2, &[("loc.yaml".into(), svc.into())], &[])?;
    let n1 = c.nodes[0].node.clone();
    c.write_manifest("loc-1.yaml", &on_node(&echo_pod("loc-1", "loc", None), &n1))?;
    c.wait_ready(&["loc-1"], READY)?;
    // Node 1 has the endpoint: the backend sees the client itself, every time.
    let on1 = SocketAddr::from((node_addr(0), 30090));
    wait_serving(&c, on1)?;
    let seen = spread(&c, on1, 20)?;
    assert_eq!(
        seen,
        BTreeMap::from([("loc-1".to_string(), BTreeSet::from([EXTERNAL_ADDR]))])
    );
    // Node 2 has none: it does not serve the Service (kube-proxy drops too).
    let on2 = SocketAddr::from((node_addr(1), 30090));
    assert!(
        TcpSession::connect(&c.external, on2).is_err(),
        "node 2 must not serve a Local Service without local endpoints"
    );
    // healthCheckNodePort on every node: 200 with the local count, 503 without.
    c.nodes[0].wait_until(Duration::from_secs(10), "health checks answering", || {
        Ok(
            http_get(&c.external, SocketAddr::from((node_addr(0), 32100)), "/").is_ok_and(|(s, _)| s == 200)
            // Node 2's server starts with its own agent's sync.
            && http_get(&c.external, SocketAddr::from((node_addr(1), 32100)), "/").is_ok(),
        )
    })?;
    let (status, body) = http_get(&c.external, SocketAddr::from((node_addr(0), 32100)), "/")?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"localEndpoints\":1") && body.contains("\"name\":\"loc\""),
        "{body}"
    );
    let (status, body) = http_get(&c.external, SocketAddr::from((node_addr(1), 32100)), "/")?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    Ok(())
}

#[test]
fn in_cluster_clients_reach_an_external_traffic_policy_local_service_from_a_node_without_its_endpoint() -> Result<()> {
    // kube-proxy short-circuits Pods and node processes dialling a
    // LoadBalancer IP, an ExternalIP or a NodePort to every endpoint of the
    // Service: externalTrafficPolicy: Local is for outside clients only.
    let svc = r#"apiVersion: v1
kind: Service
metadata: {name: loc, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: loc}
  externalIPs: [203.0.113.31]
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30091}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.30}]
"#;
    let c = Cluster::start("etpin", 2, &[("loc.yaml".into(), svc.into())], &[])?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    c.write_manifest("loc-1.yaml", &on_node(&echo_pod("loc-1", "loc", None), &n1))?;
    c.write_manifest("client.yaml", &on_node(&client_pod("client"), &n2))?;
    c.wait_ready(&["loc-1", "client"], READY)?;
    let pod = c.pod_netns("client")?;
    let targets = [
        ("LoadBalancer IP", SocketAddr::from(([203, 0, 113, 30], 80))),
        ("ExternalIP", SocketAddr::from(([203, 0, 113, 31], 80))),
        ("NodePort of node 2", SocketAddr::from((node_addr(1), 30091))),
    ];
    for (what, to) in targets {
        // A Pod on node 2, which has no endpoint of the Service.
        let answer = c.nodes[1].wait_answered_by(&format!("{what} {to} from a Pod on node 2"), &["loc-1"], || {
            tcp_ask(&pod, to)
        })?;
        assert_eq!(answer, BTreeSet::from(["loc-1".to_string()]), "{what}");
        // A process of node 2 itself (socket-level load balancing).
        let args = ["-T2".to_string(), "-".to_string(), format!("TCP:{to}")];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let host = c.nodes[1].wait_answered_by(&format!("{what} {to} from node 2 itself"), &["loc-1"], || {
            Ok(c.nodes[1].host_run("socat", &args, "hello\n")?.trim().to_string())
        })?;
        assert_eq!(host, BTreeSet::from(["loc-1".to_string()]), "{what} from the node");
    }
    // Outside clients still get externalTrafficPolicy: Local: node 2 does not
    // serve its NodePort to them.
    assert!(
        TcpSession::connect(&c.external, SocketAddr::from((node_addr(1), 30091))).is_err(),
        "node 2 must not serve outside clients"
    );
    assert_eq!(
        TcpSession::connect(&c.external, SocketAddr::from((node_addr(0), 30091)))?.ask()?,
        "loc-1"
    );
    let svcs = c.nodes[1].ferry(&["svc", "list", "-o", "wide"])?;
    assert!(
        svcs.contains("in-cluster"),
        "svc list shows the in-cluster twins:\n{svcs}"
    );
    Ok(())
}

#[test]
fn dsr_keeps_the_client_address_and_the_backends_node_answers_the_client_directly() -> Result<()> {
    direct_server_return(Path::Tc)
}

/// The same with `--xdp`: XDP passes the packets that carry the option (the
/// SYN, UDP datagrams) to TC and DNATs the rest of the connection itself.
#[test]
fn with_xdp_dsr_keeps_the_client_address_and_the_backends_node_answers_the_client_directly() -> Result<()> {
    direct_server_return(Path::Xdp)
}

/// `--nodeport-mode dsr` on both nodes; `far-2`, on node 2, is the only
/// backend of `far`, reached through node 1.
fn direct_server_return(path: Path) -> Result<()> {
    let c = cluster_in(path, Mode::Dsr)?;
    let (node1, node2) = (&c.nodes[0], &c.nodes[1]);
    let tcp = SocketAddr::from((node_addr(0), 30081));
    wait_serving(&c, tcp)?;
    // TCP: the backend sees the client itself, on every connection and for
    // every request of one (the segments after the SYN carry no option).
    let seen = spread(&c, tcp, 20)?;
    assert_eq!(
        seen,
        BTreeMap::from([("far-2".to_string(), BTreeSet::from([EXTERNAL_ADDR]))]),
        "DSR: the remote backend sees the external client's address"
    );
    let mut s = TcpSession::connect(&c.external, tcp)?;
    for _ in 0..5 {
        let (name, peer) = s.ask_peer()?;
        assert_eq!((name.as_str(), peer.ip()), ("far-2", EXTERNAL_ADDR.into()));
        assert_eq!(peer.port(), s.stream().local_addr()?.port(), "the client's port kept");
    }
    // UDP: the same; the socket is connected to node 1's NodePort, so an
    // answer at all proves it came from there.
    let udp = SocketAddr::from((node_addr(0), 30082));
    for _ in 0..10 {
        let (name, peer) = udp_ask_peer(&c.external, udp)?;
        assert_eq!(
            (name.as_str(), peer.ip()),
            ("far-2", EXTERNAL_ADDR.into()),
            "UDP via {udp}"
        );
    }
    // Replies never passed back through node 1: it translated none, node 2
    // recorded the flows from the option and translated every reply.
    let counters = |n: &ferry_tests::Lab| -> Result<[u64; 4]> {
        Ok([
            n.counter("dsr_forward")?,
            n.counter("dsr_accept")?,
            n.counter("dsr_reply")?,
            n.counter("reverse_nat")?,
        ])
    };
    let [fwd1, acc1, rep1, rev1] = counters(node1)?;
    let [fwd2, acc2, rep2, rev2] = counters(node2)?;
    eprintln!("node 1: dsr_forward {fwd1} dsr_accept {acc1} dsr_reply {rep1} reverse_nat {rev1}");
    eprintln!("node 2: dsr_forward {fwd2} dsr_accept {acc2} dsr_reply {rep2} reverse_nat {rev2}");
    assert!(fwd1 > 0, "node 1 forwarded the flows by DSR");
    assert_eq!([acc1, rep1, rev1], [0, 0, 0], "no reply passed back through node 1");
    assert!(fwd2 == 0 && rep2 > 0 && rev2 == rep2, "node 2 translated the replies");
    // One SYN per TCP connection (at least 22: the wait, 20, 1) and every
    // UDP datagram (10) carried the option.
    assert!(acc2 >= 32, "node 2 recorded {acc2} DSR packets");
    // A local backend is unchanged (no SNAT anyway): through node 1, web-1
    // (local) and web-2 (remote, DSR) both see the client.
    let web = SocketAddr::from((node_addr(0), 30080));
    wait_backends(&c, web, &["web-1", "web-2"])?;
    let seen = spread(&c, web, 30)?;
    for name in ["web-1", "web-2"] {
        assert_eq!(
            seen.get(name),
            Some(&BTreeSet::from([EXTERNAL_ADDR])),
            "{name}: {seen:?}"
        );
    }
    let conntrack = node2.ferry(&["ct", "list"])?;
    assert!(
        conntrack.contains("dsr") && conntrack.contains(&format!("{}:30081", node_addr(0))),
        "node 2's ct list shows the DSR flows with their frontend:\n{conntrack}"
    );
    // Without DF a datagram bigger than the MTU travels as fragments: the
    // first one (1500 bytes), too big with the option, is left to node 1's
    // stack to fragment again (the option is copied into each piece).
    let frag_needed = node1.counter("frag_needed")?;
    let answer = in_netns(&c.external, move || -> Result<String> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.connect(udp)?;
        s.send(&[b'y'; 3000])?;
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).context("no answer to a fragmented datagram")?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    })??;
    assert_eq!(answer, "far-2", "a fragmented datagram by DSR");
    assert_eq!(node1.counter("frag_needed")?, frag_needed, "no DF: no frag needed");
    // A datagram that fits the device but not with the option (DF set):
    // answered with "fragmentation needed" for the MTU minus the option's
    // 8 bytes; the client's next datagram of that size passes.
    let frag_needed = node1.counter("frag_needed")?;
    let mtu = in_netns(&c.external, move || datagram_at_path_mtu(udp))??;
    assert_eq!(mtu, 1492, "the path MTU the client learned");
    assert!(
        node1.counter("frag_needed")? > frag_needed,
        "node 1 answered frag needed"
    );
    assert_xdp(&c, path, &[0])
}

/// From a socket with DF set (IP_PMTUDISC_DO) connected to `to`: a
/// datagram of the device's full 1500 bytes, which must be refused by the
/// path (the error comes back as EMSGSIZE), then the path MTU the kernel
/// learned, and a datagram of that size answered.
fn datagram_at_path_mtu(to: SocketAddr) -> Result<u32> {
    use std::os::fd::AsRawFd as _;
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let on: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: setsockopt on our socket with an int option.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            &on as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(rc == 0, "IP_MTU_DISCOVER: {}", std::io::Error::last_os_error());
    s.connect(to)?;
    let mut buf = [0u8; 2048];
    // 1472 bytes of payload: 1500 with the IPv4 and UDP headers.
    s.send(&[b'x'; 1472])?;
    let err = s.recv(&mut buf).err().context("a 1500-byte datagram was answered")?;
    anyhow::ensure!(
        err.raw_os_error() == Some(libc::EMSGSIZE),
        "expected EMSGSIZE for the 1500-byte datagram, got {err}"
    );
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into an int on our stack.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            &mut mtu as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    anyhow::ensure!(rc == 0, "IP_MTU: {}", std::io::Error::last_os_error());
    let payload = mtu as usize - 28;
    s.send(&vec![b'x'; payload])?;
    let n = s.recv(&mut buf).context("no answer to a datagram at the path MTU")?;
    anyhow::ensure!(
        &buf[..n] == b"far-2\n",
        "answer {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    Ok(mtu as u32)
}

/// `--nodeport-mode hybrid`: DSR for TCP, SNAT for UDP (the backend sees
/// node 1's address for UDP).
#[test]
fn hybrid_mode_returns_tcp_directly_and_snats_udp() -> Result<()> {
    let c = cluster_in(Path::Tc, Mode::Hybrid)?;
    let tcp = SocketAddr::from((node_addr(0), 30081));
    wait_serving(&c, tcp)?;
    let seen = spread(&c, tcp, 10)?;
    assert_eq!(
        seen,
        BTreeMap::from([("far-2".to_string(), BTreeSet::from([EXTERNAL_ADDR]))]),
        "TCP: direct server return"
    );
    let udp = SocketAddr::from((node_addr(0), 30082));
    for _ in 0..5 {
        let (name, peer) = udp_ask_peer(&c.external, udp)?;
        assert_eq!(
            (name.as_str(), peer.ip()),
            ("far-2", node_addr(0).into()),
            "UDP: SNATed to node 1"
        );
    }
    let (node1, node2) = (&c.nodes[0], &c.nodes[1]);
    // Node 2 answered the TCP flows itself (11 connections: the wait and
    // the 10 above) and no UDP datagram; node 1 reversed the UDP replies only.
    let (acc2, rep2) = (node2.counter("dsr_accept")?, node2.counter("dsr_reply")?);
    assert!(acc2 >= 10 && rep2 > 0, "node 2: dsr_accept {acc2}, dsr_reply {rep2}");
    assert_eq!(node1.counter("reverse_nat")?, 5, "node 1 reversed the 5 UDP answers");
    Ok(())
}
