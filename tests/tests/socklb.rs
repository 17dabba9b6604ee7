//! Socket-level load balancing for Pods (issue 16): real clients in Pods (a
//! Pod's network namespace, the node's cgroup where the shim runs Pods), the
//! real agent; assertions on what the clients received, which backend
//! answered, what getpeername() said, and on the connection-tracking table
//! (`ferry ct list`), which the socket path must leave untouched.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ferry_tests::{
    cluster::Cluster,
    manifests::{client_pod, echo_pod, echo_service, itp_service, itp_services, on_node, sticky_service, EMPTY_SVC},
    tcp_ask, udp_try_on, udp_wait_moved, Lab, LabOptions,
};
use socket2::{Domain, Socket, Type};

const READY: Duration = Duration::from_secs(60);
const BACKENDS: [&str; 3] = ["echo-0", "echo-1", "echo-2"];

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// A lab with echo Pods `names` behind `echo` (10.96.0.10: TCP 80, UDP 53),
/// a Service without endpoints (10.96.0.40) and a client Pod.
fn lab(tag: &str, names: &[&str]) -> Result<Lab> {
    let mut opts = LabOptions::new(tag)
        .manifest("service.yaml", &echo_service("echo", "echo", "10.96.0.10"))
        .manifest("empty.yaml", EMPTY_SVC)
        .manifest("client.yaml", &client_pod("client"));
    for n in names {
        opts = opts.manifest(&format!("{n}.yaml"), &echo_pod(n, "echo", None));
    }
    let lab = Lab::start(opts)?;
    if lab.cgroup.is_none() {
        bail!("socket load balancing needs cgroup v2");
    }
    let mut all = names.to_vec();
    all.push("client");
    lab.wait_ready(&all, READY)?;
    lab.wait_until(Duration::from_secs(10), "Services programmed", || {
        let list = lab.ferry(&["svc", "list"])?;
        Ok(list.contains("10.96.0.40:80")
            && names.iter().all(|n| {
                lab.pod(n)
                    .and_then(|p| p.pod_ip)
                    .is_some_and(|ip| list.contains(&ip.to_string()))
            }))
    })?;
    Ok(lab)
}

/// One line over a connected TCP stream.
fn ask_on(stream: &TcpStream) -> Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    (&*stream).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .context("reading the answer")?;
    Ok(line.trim().to_string())
}

/// A TCP connection from Pod `netns` (socket in the node's cgroup) to `to`:
/// the backend that answered and the peer getpeername() reports.
fn pod_tcp(lab: &Lab, netns: &str, to: SocketAddr) -> Result<(String, SocketAddr)> {
    let s = lab.in_pod(netns, move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))??;
    let peer = s.peer_addr()?;
    Ok((ask_on(&s)?, peer))
}

/// One datagram from an unconnected UDP socket of Pod `netns` to `to`: the
/// answer and the address recvfrom() reports it from.
fn pod_udp_sendto(sock: &UdpSocket, to: SocketAddr) -> Result<(String, SocketAddr)> {
    sock.send_to(b"hello\n", to)?;
    let mut buf = [0u8; 512];
    let (n, from) = sock.recv_from(&mut buf).context("no UDP answer")?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
}

/// `n` datagrams from `sock` to `to`: the backends that answered; every
/// answer must be reported from `to`.
fn udp_names(sock: &UdpSocket, to: SocketAddr, n: usize) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for i in 0..n {
        let (name, from) = pod_udp_sendto(sock, to).with_context(|| format!("UDP datagram {i} to {to}"))?;
        assert_eq!(from, to, "UDP answer {i} is reported from the address it was sent to");
        names.insert(name);
    }
    Ok(names)
}

fn all_backends() -> BTreeSet<String> {
    BACKENDS.iter().map(|s| s.to_string()).collect()
}

/// Connection-tracking entries of the node for `frontend` (e.g.
/// "10.96.0.10:80"), both tables.
fn ct_rows(lab: &Lab, frontend: &str) -> Result<Vec<serde_json::Value>> {
    let rows: Vec<serde_json::Value> = serde_json::from_str(&lab.ferry(&["ct", "list", "-o", "json"])?)?;
    Ok(rows
        .into_iter()
        .filter(|r| r["frontend"].as_str().is_some_and(|f| f.contains(frontend)))
        .collect())
}

#[test]
fn pods_reach_every_backend_at_the_socket_without_connection_tracking() -> Result<()> {
    let lab = lab("socklb", &BACKENDS)?;
    let client = lab.pod_netns("client")?;
    let (tcp, udp) = (addr("10.96.0.10:80"), addr("10.96.0.10:53"));
    let forwarded_before = lab.counter("sock_forward")?;

    // TCP: 60 connections, one after the other.
    let mut names = BTreeSet::new();
    for i in 0..60 {
        let (name, peer) = pod_tcp(&lab, &client, tcp).with_context(|| format!("TCP connection {i}"))?;
        assert_eq!(
            peer, tcp,
            "getpeername() of connection {i} is the ClusterIP:port, not the backend"
        );
        names.insert(name);
    }
    assert_eq!(names, all_backends(), "TCP answered by every backend");

    // UDP: 60 datagrams from one unconnected socket; each answer is reported
    // from the ClusterIP:port it was sent to.
    let sock = lab.in_pod(&client, || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    })??;
    assert_eq!(
        udp_names(&sock, udp, 60)?,
        all_backends(),
        "UDP answered by every backend"
    );

    // Nothing was translated per packet: no connection-tracking entry.
    let tracked = ct_rows(&lab, "10.96.0.10")?;
    assert!(
        tracked.is_empty(),
        "socket-LB flows left connection-tracking entries: {tracked:#?}"
    );
    let forwarded = lab.counter("sock_forward")? - forwarded_before;
    assert!(forwarded >= 120, "sock_forward counted {forwarded} of 120 sockets");

    // Hairpin: a backend reaching its own Service gets itself too (its socket
    // is connected to its own address: no SNAT needed).
    let echo0 = lab.pod_netns("echo-0")?;
    lab.wait_answered_by("echo-0 through its own Service", &["echo-0"], || {
        let (name, peer) = pod_tcp(&lab, &echo0, tcp)?;
        anyhow::ensure!(peer == tcp, "getpeername() {peer}");
        Ok(name)
    })?;

    // The control: a client of the same Pod outside the node's cgroup takes
    // the TC path, which tracks its flow (so the check above can fail).
    tcp_ask(&client, tcp)?;
    let tracked = ct_rows(&lab, "10.96.0.10:80")?;
    assert!(!tracked.is_empty(), "the TC path's flow is tracked");
    Ok(())
}

#[test]
fn connect_to_a_service_without_endpoints_fails_with_econnrefused_at_once() -> Result<()> {
    let lab = lab("sockrej", &["echo-0"])?;
    let client = lab.pod_netns("client")?;
    let rejected_before = lab.counter("sock_reject")?;
    for i in 0..5 {
        let (err, took) = lab.in_pod(&client, || {
            let start = Instant::now();
            let r = TcpStream::connect_timeout(&addr("10.96.0.40:80"), Duration::from_secs(3));
            (r.err().map(|e| e.kind()), start.elapsed())
        })?;
        assert_eq!(
            err,
            Some(ErrorKind::ConnectionRefused),
            "TCP connect {i} to a Service without endpoints"
        );
        assert!(
            took < Duration::from_millis(100),
            "TCP connect {i} refused only after {took:?}"
        );
        // UDP: an unconnected send is refused at the socket. A connected
        // socket keeps the Service address (the per-packet path, see
        // sock.rs): its first datagram is answered with ICMP port
        // unreachable, which it reads as ECONNREFUSED at once.
        let (send, recv, took) = lab.in_pod(&client, || -> std::io::Result<_> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            let send = s.send_to(b"hello\n", addr("10.96.0.40:53")).err().map(|e| e.kind());
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.connect(addr("10.96.0.40:53"))?;
            let start = Instant::now();
            s.send(b"hello\n")?;
            let recv = s.recv(&mut [0u8; 64]).err().map(|e| e.kind());
            Ok((send, recv, start.elapsed()))
        })??;
        assert_eq!(send, Some(ErrorKind::ConnectionRefused), "UDP sendto {i}");
        assert_eq!(recv, Some(ErrorKind::ConnectionRefused), "connected UDP {i}");
        assert!(
            took < Duration::from_millis(100),
            "connected UDP {i} refused only after {took:?}"
        );
    }
    let rejected = lab.counter("sock_reject")? - rejected_before;
    assert!(
        rejected >= 10,
        "sock_reject counted {rejected} of 10 (TCP connects, UDP sends)"
    );
    // The Service with an endpoint still answers.
    assert_eq!(pod_tcp(&lab, &client, addr("10.96.0.10:80"))?.0, "echo-0");
    Ok(())
}

#[test]
fn a_connected_udp_socket_moves_to_a_remaining_backend_when_its_backend_is_removed() -> Result<()> {
    let lab = lab("sockstale", &["echo-a", "echo-b"])?;
    let client = lab.pod_netns("client")?;
    let vip = addr("10.96.0.10:53");
    let sock = lab.in_pod(&client, move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.connect(vip)?;
        Ok(s)
    })??;
    assert_eq!(sock.peer_addr()?, vip, "getpeername() of the connected UDP socket");
    let mine = udp_try_on(&sock).context("first UDP answer")?;
    for _ in 0..5 {
        assert_eq!(
            udp_try_on(&sock).as_deref(),
            Some(mine.as_str()),
            "the socket keeps its backend"
        );
    }
    let other = if mine == "echo-a" { "echo-b" } else { "echo-a" };
    // Its backend is deleted: the Pod goes (1 s grace) and leaves the Service.
    lab.remove_manifest(&format!("{mine}.yaml"))?;
    let (took, before) = udp_wait_moved(&sock, other, Duration::from_secs(2))
        .with_context(|| format!("after {mine} was deleted\n{}", lab.logs()))?;
    println!(
        "moved to {other} {took:?} after {mine} was deleted ({} datagrams before)",
        before.len()
    );
    for _ in 0..5 {
        assert_eq!(udp_try_on(&sock).as_deref(), Some(other), "and stays there");
    }
    // The socket never reconnected: its peer is still the Service (the
    // answers above arrived on it, so they came from that address).
    assert_eq!(sock.peer_addr()?, vip, "getpeername() after the move");
    Ok(())
}

#[test]
fn an_ipv4_mapped_ipv6_socket_of_a_pod_reaches_an_ipv4_service() -> Result<()> {
    let lab = lab("sock6", &BACKENDS)?;
    let client = lab.pod_netns("client")?;
    let mapped = |port| {
        SocketAddr::V6(SocketAddrV6::new(
            Ipv4Addr::new(10, 96, 0, 10).to_ipv6_mapped(),
            port,
            0,
            0,
        ))
    };
    let (tcp, udp) = (mapped(80), mapped(53));
    let dual = |ty: Type| -> std::io::Result<Socket> {
        let s = Socket::new(Domain::IPV6, ty, None)?;
        s.set_only_v6(false)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    };
    let mut names = BTreeSet::new();
    for i in 0..30 {
        let s = lab.in_pod(&client, move || -> std::io::Result<TcpStream> {
            let s = dual(Type::STREAM)?;
            s.connect_timeout(&tcp.into(), Duration::from_secs(2))?;
            Ok(s.into())
        })??;
        assert_eq!(s.peer_addr()?, tcp, "getpeername() of IPv6 connection {i}");
        names.insert(ask_on(&s)?);
    }
    assert_eq!(names, all_backends(), "TCP over IPv4-mapped IPv6");
    let sock: UdpSocket = lab.in_pod(&client, move || dual(Type::DGRAM).map(UdpSocket::from))??;
    assert_eq!(udp_names(&sock, udp, 30)?, all_backends(), "UDP over IPv4-mapped IPv6");
    let tracked = ct_rows(&lab, "10.96.0.10")?;
    assert!(
        tracked.is_empty(),
        "IPv6 socket-LB flows left connection-tracking entries: {tracked:#?}"
    );
    Ok(())
}

#[test]
fn skipped_namespaces_and_socket_lb_pods_false_leave_pods_to_the_tc_path() -> Result<()> {
    let mut lab = lab("sockskip", &["echo-0"])?;
    let client = lab.pod_netns("client")?;
    let echo0 = lab.pod_netns("echo-0")?;
    let tcp = addr("10.96.0.10:80");
    // The client's namespace is skipped: its connection is tracked (TC path),
    // echo-0's still is not.
    lab.restart_agent_with(&["--socket-lb-skip-netns", &client])?;
    let forwarded = lab.counter("sock_forward")?;
    lab.wait_until(Duration::from_secs(10), "the client's flow tracked", || {
        let (name, peer) = pod_tcp(&lab, &client, tcp)?;
        anyhow::ensure!(name == "echo-0" && peer == tcp, "{name} {peer}");
        Ok(!ct_rows(&lab, "10.96.0.10:80")?.is_empty())
    })?;
    let before = ct_rows(&lab, "10.96.0.10:80")?.len();
    assert_eq!(pod_tcp(&lab, &echo0, tcp)?.0, "echo-0");
    assert_eq!(
        ct_rows(&lab, "10.96.0.10:80")?.len(),
        before,
        "echo-0's connection is not tracked"
    );
    assert!(
        lab.counter("sock_forward")? > forwarded,
        "echo-0's socket was translated"
    );
    // --socket-lb-pods=false: no Pod gets socket LB (the node's own still does).
    lab.restart_agent_with(&["--socket-lb-pods=false"])?;
    lab.wait_until(Duration::from_secs(10), "echo-0's flow tracked", || {
        let before = ct_rows(&lab, "10.96.0.10:80")?.len();
        assert_eq!(pod_tcp(&lab, &echo0, tcp)?.0, "echo-0");
        Ok(ct_rows(&lab, "10.96.0.10:80")?.len() > before)
    })?;
    Ok(())
}

#[test]
fn traffic_policies_and_affinity_hold_for_pod_sockets() -> Result<()> {
    let lab = lab("sockpol", &BACKENDS)?;
    let client = lab.pod_netns("client")?;
    let ip = lab.pod("echo-0").and_then(|p| p.pod_ip).context("echo-0 has an IP")?;
    // Manual EndpointSlices: echo-0's address, on this node or said to be on
    // another one.
    for (file, yaml) in itp_services(ip, &lab.node) {
        lab.write_manifest(&file, &yaml)?;
    }
    lab.write_manifest("sticky.yaml", &sticky_service(10800))?;
    lab.wait_until(Duration::from_secs(10), "the Services programmed", || {
        let list = lab.ferry(&["svc", "list"])?;
        Ok(["10.96.0.61:80", "10.96.0.62:80", "10.96.0.63:80", "10.96.0.50:80"]
            .iter()
            .all(|a| list.contains(a)))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    // internalTrafficPolicy at the socket: Local with a local endpoint and
    // Cluster with a remote one are served, without tracking; Local without a
    // local endpoint is refused at connect().
    for a in ["10.96.0.61:80", "10.96.0.63:80"] {
        let (name, peer) = pod_tcp(&lab, &client, addr(a))?;
        assert_eq!((name.as_str(), peer), ("echo-0", addr(a)), "{a}");
        let tracked = ct_rows(&lab, a)?;
        assert!(tracked.is_empty(), "{a} was tracked: {tracked:#?}");
    }
    let refused = lab.in_pod(&client, || {
        TcpStream::connect_timeout(&addr("10.96.0.62:80"), Duration::from_secs(3))
            .err()
            .map(|e| e.kind())
    })?;
    assert_eq!(
        refused,
        Some(ErrorKind::ConnectionRefused),
        "Local without a local endpoint"
    );
    // sessionAffinity: ClientIP is per client address, which a socket does not
    // have at connect(): the TC path serves it (tracked), and one client
    // keeps one backend over 30 new connections.
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let (name, peer) = pod_tcp(&lab, &client, addr("10.96.0.50:80"))?;
        assert_eq!(peer, addr("10.96.0.50:80"));
        seen.insert(name);
    }
    assert_eq!(seen.len(), 1, "30 connections of one client, one backend: {seen:?}");
    assert!(
        !ct_rows(&lab, "10.96.0.50:80")?.is_empty(),
        "affinity flows take the TC path"
    );
    Ok(())
}

#[test]
fn a_tcp_connect_to_a_backend_removed_meanwhile_fails_fast() -> Result<()> {
    let lab = lab("sockgone", &["echo-0"])?;
    lab.write_manifest("hole.yaml", &client_pod("hole"))?;
    lab.wait_ready(&["hole"], READY)?;
    let client = lab.pod_netns("client")?;
    let hole = lab.pod_netns("hole")?;
    let hole_ip = lab.pod("hole").and_then(|p| p.pod_ip).context("hole has an IP")?;
    // The only backend drops SYNs: the client's connect() is still going
    // on when the backend Pod is deleted.
    ferry_tests::sys::netns_exec(
        &hole,
        "iptables",
        &["-A", "INPUT", "-p", "tcp", "--dport", "8080", "-j", "DROP"],
    )?;
    lab.write_manifest(
        "gone.yaml",
        &itp_service("gone", "10.96.0.70", "Cluster", &hole_ip.to_string(), &lab.node),
    )?;
    lab.wait_until(Duration::from_secs(10), "10.96.0.70 programmed", || {
        Ok(lab.ferry(&["svc", "list"])?.contains("10.96.0.70:80"))
    })?;
    let (err, took) = std::thread::scope(|s| -> Result<_> {
        let connecting = s.spawn(|| {
            lab.in_pod(&client, || {
                let start = Instant::now();
                let r = TcpStream::connect_timeout(&addr("10.96.0.70:80"), Duration::from_secs(20));
                (r.err().map(|e| e.kind()), start.elapsed())
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        lab.remove_manifest("hole.yaml")?;
        lab.remove_manifest("gone.yaml")?;
        connecting
            .join()
            .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
    })?;
    println!("connect() ended with {err:?} after {took:?}");
    // The socket is connected to the backend's own address, so the node's
    // ICMP unreachable for it (its route went with the Pod) ends the
    // connect() at the next SYN retransmission instead of after 2 minutes of
    // them (on the TC path the socket, connected to the ClusterIP, ignores
    // an ICMP error quoting the backend).
    assert!(
        matches!(
            err,
            Some(ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable | ErrorKind::ConnectionRefused)
        ),
        "connect() to a backend deleted meanwhile: {err:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(5), "connect() failed only after {took:?}");
    Ok(())
}

#[test]
fn a_pod_reaches_backends_on_both_nodes_at_the_socket() -> Result<()> {
    let c = Cluster::start(
        "sockx",
        2,
        &[("service.yaml".into(), echo_service("echo", "echo", "10.96.0.10"))],
        &[],
    )?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    c.write_manifest("client.yaml", &on_node(&client_pod("client"), &n1))?;
    c.write_manifest("local.yaml", &on_node(&echo_pod("local", "echo", None), &n1))?;
    c.write_manifest("remote.yaml", &on_node(&echo_pod("remote", "echo", None), &n2))?;
    c.wait_ready(&["client", "local", "remote"], READY)?;
    let client = c.pod_netns("client")?;
    let node1 = &c.nodes[0];
    let (tcp, udp) = (addr("10.96.0.10:80"), addr("10.96.0.10:53"));
    let both: BTreeSet<String> = ["local", "remote"].map(String::from).into();
    let seen = node1.wait_answered_by("TCP from a Pod of node 1", &["local", "remote"], || {
        let (name, peer) = pod_tcp(node1, &client, tcp)?;
        anyhow::ensure!(peer == tcp, "getpeername() {peer}");
        Ok(name)
    })?;
    assert_eq!(seen, both);
    let sock = node1.in_pod(&client, || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    })??;
    assert_eq!(udp_names(&sock, udp, 40)?, both, "UDP from a Pod of node 1");
    // Neither node tracked anything: the remote backend got a plain
    // Pod-to-Pod flow.
    for (i, node) in c.nodes.iter().enumerate() {
        let tracked = ct_rows(node, "10.96.0.10")?;
        assert!(
            tracked.is_empty(),
            "node {} tracked socket-LB flows: {tracked:#?}",
            i + 1
        );
    }
    Ok(())
}

#[test]
fn the_nodes_own_sockets_get_the_same_hooks() -> Result<()> {
    let lab = lab("socknode", &BACKENDS)?;
    // The node's own network namespace, in the node's cgroup: a host process.
    let node = lab.node.clone();
    let tcp = addr("10.96.0.10:80");
    let mut names = BTreeSet::new();
    for _ in 0..30 {
        let (name, peer) = pod_tcp(&lab, &node, tcp)?;
        assert_eq!(peer, tcp, "getpeername() of a node process's connection");
        names.insert(name);
    }
    assert_eq!(names, all_backends(), "TCP from the node");
    let mapped = SocketAddr::V6(SocketAddrV6::new(
        Ipv4Addr::new(10, 96, 0, 10).to_ipv6_mapped(),
        80,
        0,
        0,
    ));
    let s = lab.in_pod(&node, move || -> std::io::Result<TcpStream> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.connect_timeout(&mapped.into(), Duration::from_secs(2))?;
        Ok(s.into())
    })??;
    assert_eq!(
        s.peer_addr()?,
        mapped,
        "getpeername() of an IPv4-mapped connection from the node"
    );
    assert!(BACKENDS.contains(&ask_on(&s)?.as_str()));
    let refused = lab.in_pod(&node, || {
        let start = Instant::now();
        let r = TcpStream::connect_timeout(&addr("10.96.0.40:80"), Duration::from_secs(3));
        (r.err().map(|e| e.kind()), start.elapsed())
    })?;
    assert_eq!(
        refused.0,
        Some(ErrorKind::ConnectionRefused),
        "a node process's connect to a Service without endpoints"
    );
    assert!(refused.1 < Duration::from_millis(100), "refused after {:?}", refused.1);
    Ok(())
}
