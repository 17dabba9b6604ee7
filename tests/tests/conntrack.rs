//! Connection tracking under pressure, with real clients: idle established
//! TCP connections survive a UDP storm many times the UDP table's size, and
//! tens of thousands of NodePort connections to a backend on another node
//! all succeed on SNAT ports that come back when their flows end.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ferry_tests::{
    client::udp_ask_on,
    cluster::{node_addr, Cluster, EXTERNAL_ADDR},
    in_netns,
    manifests::{client_pod, echo_pod, echo_service, on_node},
    split, sys, tcp_ask, Lab, LabOptions, TcpSession,
};

const READY: Duration = Duration::from_secs(60);

fn services() -> String {
    r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30053}
---
apiVersion: v1
kind: Service
metadata: {name: far, namespace: default}
spec:
  type: NodePort
  selector: {app: far}
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30081}
"#
    .into()
}

/// Sends `n` UDP datagrams to `to` from `n` different sockets (so `n` flows),
/// and counts the answers.
fn udp_storm(netns: &str, to: SocketAddr, n: usize) -> Result<usize> {
    in_netns(netns, move || -> Result<usize> {
        let mut answered = 0;
        for _ in 0..n {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.connect(to)?;
            s.send(b"hello\n")?;
            let mut buf = [0u8; 256];
            if s.recv(&mut buf).is_ok() {
                answered += 1;
            }
        }
        Ok(answered)
    })?
}

#[test]
fn idle_established_tcp_survives_a_udp_storm_many_times_the_udp_table() -> Result<()> {
    // A UDP table of 256 entries (128 flows) and a storm of 3,000 UDP flows.
    let c = Cluster::start(
        "ctstorm",
        1,
        &[("services.yaml".into(), services())],
        &["--ct-any-map-size", "256", "--ct-map-size", "4096"],
    )?;
    let n1 = c.nodes[0].node.clone();
    for i in 1..=3 {
        c.write_manifest(
            &format!("web-{i}.yaml"),
            &on_node(&echo_pod(&format!("web-{i}"), "web", None), &n1),
        )?;
    }
    c.wait_ready(&["web-1", "web-2", "web-3"], READY)?;
    let tcp = SocketAddr::from((node_addr(0), 30080));
    c.nodes[0].wait_answered_by(&tcp.to_string(), &["web-1", "web-2", "web-3"], || {
        TcpSession::connect(&c.external, tcp)?.ask()
    })?;
    // Ten idle connections, each with the backend it got.
    let mut sessions = Vec::new();
    for _ in 0..10 {
        let mut s = TcpSession::connect(&c.external, tcp)?;
        let first = s.ask()?;
        sessions.push((s, first));
    }
    let udp = SocketAddr::from((node_addr(0), 30053));
    let answered = udp_storm(&c.external, udp, 3000)?;
    assert!(
        answered >= 2900,
        "the UDP storm itself is served: {answered} of 3000 answered"
    );
    let table = c.nodes[0].ferry(&["ct", "list", "-o", "json"])?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&table)?;
    let udp_entries = rows.iter().filter(|r| r["protocol"] == "UDP").count();
    assert!(
        udp_entries <= 256,
        "the UDP table holds at most its size: {udp_entries}"
    );
    // Every idle connection still reaches the backend it had.
    for (i, (s, first)) in sessions.iter_mut().enumerate() {
        let again = s
            .ask()
            .with_context(|| format!("connection {i} after the storm\n{}", c.logs()))?;
        assert_eq!(&again, first, "connection {i} is answered by the same backend");
    }
    let established = rows
        .iter()
        .filter(|r| r["protocol"] == "TCP" && r["state"] == "established" && r["direction"] == "forward")
        .count();
    assert!(
        established >= 10,
        "the idle connections are tracked as established: {established}\n{table}"
    );
    Ok(())
}

/// `n` connections one after the other from `netns` to `to`, each asking one
/// line and closing first (as an HTTP client does): the names that answered
/// and how many failed (with the first error).
fn sequential_connections(netns: &str, to: SocketAddr, n: usize) -> Result<(BTreeSet<String>, usize, Option<String>)> {
    in_netns(netns, move || {
        let mut names = BTreeSet::new();
        let (mut failed, mut first_error) = (0, None);
        for _ in 0..n {
            let attempt = || -> Result<String> {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                s.write_all(b"hello\n")?;
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line)?;
                if line.is_empty() {
                    bail!("closed without an answer");
                }
                Ok(line.trim().to_string())
            };
            match attempt() {
                Ok(name) => {
                    names.insert(name);
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        (names, failed, first_error)
    })
}

#[test]
fn forty_thousand_nodeport_connections_to_a_remote_backend_all_succeed() -> Result<()> {
    let c = Cluster::start("ct40k", 2, &[("services.yaml".into(), services())], &[])?;
    let n2 = c.nodes[1].node.clone();
    c.write_manifest("far.yaml", &on_node(&echo_pod("far-2", "far", None), &n2))?;
    c.wait_ready(&["far-2"], READY)?;
    // The client may use 60,000 source ports and reuse those in TIME_WAIT (its
    // own namespace): the limit under test is the node's SNAT, not the client's.
    sys::netns_exec(
        &c.external,
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=1024 65000"],
    )?;
    sys::netns_exec(&c.external, "sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    let to = SocketAddr::from((node_addr(0), 30081));
    c.nodes[0].wait_answered_by(&to.to_string(), &["far-2"], || {
        TcpSession::connect(&c.external, to)?.ask()
    })?;
    let started = Instant::now();
    let (names, failed, first_error) = sequential_connections(&c.external, to, 40_000)?;
    let took = started.elapsed();
    // Above about 2,000 new connections a second to one backend, the default
    // SNAT range (20,000 ports) is busier than the closing lifetime (10 s)
    // frees it: a SYN may then find no port at once and is retransmitted by
    // the client (counted as snat_ports_exhausted), but no connection fails.
    let retried = c.nodes[0].counter("snat_ports_exhausted")?;
    eprintln!(
        "40000 connections in {took:?} ({:.0}/s), {failed} failed, {retried} SYNs found no SNAT port at first",
        40_000.0 / took.as_secs_f64()
    );
    assert_eq!(
        failed,
        0,
        "every connection succeeds; first error: {first_error:?}\n{}",
        c.logs()
    );
    assert_eq!(names, BTreeSet::from(["far-2".to_string()]));
    Ok(())
}

/// An echo Pod labelled `app: web` and `role: <role>`.
fn web_pod(name: &str, role: &str) -> String {
    echo_pod(name, "web", None).replace("    app: web\n", &format!("    app: web\n    role: {role}\n"))
}

/// The `web` Service (10.96.0.50) selecting `selector` (a YAML flow map).
fn web_service(selector: &str) -> String {
    echo_service("web", "web", "10.96.0.50")
        .replace("  selector:\n    app: web\n", &format!("  selector: {selector}\n"))
}

#[test]
fn kill_9_and_restart_under_load_breaks_no_connection_and_misroutes_none() -> Result<()> {
    let web: SocketAddr = "10.96.0.50:80".parse()?;
    let fresh: SocketAddr = "10.96.0.52:80".parse()?;
    let mut lab = Lab::start(
        LabOptions::new("ctkill")
            .manifest("web.yaml", &web_service("{app: web}"))
            .manifest("old.yaml", &echo_service("old", "old", "10.96.0.51"))
            .manifest("web-a.yaml", &web_pod("web-a", "a"))
            .manifest("web-b.yaml", &web_pod("web-b", "b"))
            .manifest("old-1.yaml", &echo_pod("old-1", "old", None))
            .manifest("client.yaml", &client_pod("client")),
    )?;
    lab.wait_ready(&["web-a", "web-b", "old-1", "client"], READY)?;
    let client = lab.pod_netns("client")?;
    lab.wait_answered_by(&web.to_string(), &["web-a", "web-b"], || tcp_ask(&client, web))?;
    // Established connections to both backends.
    let mut sessions = Vec::new();
    for _ in 0..60 {
        let mut s = TcpSession::connect(&client, web)?;
        let name = s.ask()?;
        sessions.push((s, name));
        let on = |b: &str| sessions.iter().filter(|(_, n)| n == b).count();
        if on("web-a") >= 2 && on("web-b") >= 2 {
            break;
        }
    }
    assert!(sessions.iter().any(|(_, n)| n == "web-a"), "a connection on web-a");
    // New connections all along, counting failures.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, client) = (stop.clone(), client.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match tcp_ask(&client, web) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{e:#}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // kill -9; meanwhile web-a leaves the Service (it keeps running), `old`
    // is deleted and `fresh` created.
    let pid = lab.agent_pid().context("agent pid")?;
    // SAFETY: signalling the agent process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    lab.stop_agent();
    lab.write_manifest("web.yaml", &web_service("{role: b}"))?;
    lab.remove_manifest("old.yaml")?;
    lab.write_manifest("fresh.yaml", &echo_service("fresh", "old", "10.96.0.52"))?;
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent()?;
    lab.wait_answered_by(&fresh.to_string(), &["old-1"], || tcp_ask(&client, fresh))?;
    lab.wait_until(Duration::from_secs(10), "web served by web-b alone", || {
        Ok(split(&client, 20, |ns| tcp_ask(ns, web))?.keys().eq(["web-b"].iter()))
    })?;
    // Nothing misrouted: new connections reach only what each Service selects now.
    let after = split(&client, 40, |ns| tcp_ask(ns, web))?;
    assert_eq!(after.keys().collect::<Vec<_>>(), ["web-b"], "{after:?}");
    let fresh_split = split(&client, 20, |ns| tcp_ask(ns, fresh))?;
    assert_eq!(fresh_split.keys().collect::<Vec<_>>(), ["old-1"], "{fresh_split:?}");
    // Nothing broken: every established connection still reaches its backend,
    // web-a's too (it left the Service while the agent was down; kube-proxy
    // lets such connections run to their end).
    for (i, (s, name)) in sessions.iter_mut().enumerate() {
        let again = s
            .ask()
            .with_context(|| format!("session {i} (on {name}) after the restart\n{}", lab.logs()))?;
        assert_eq!(&again, name, "session {i}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().map_err(|_| anyhow::anyhow!("load thread panicked"))?;
    assert!(ok > 20, "the load ran: {ok} connections");
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed during the restart: {:?}",
        failed.len(),
        ok + failed.len(),
        failed.first()
    );
    Ok(())
}

/// One TCP connection from `netns`, local port `port`, to `to`: asks a line and
/// aborts (RST, so the port is free again at once). The backend that answered.
fn ask_from_port(netns: &str, port: u16, to: SocketAddr) -> Result<String> {
    let mut s = TcpSession::connect_from(netns, SocketAddr::from(([0, 0, 0, 0], port)), to)?;
    let name = s.ask()?;
    s.abort()?;
    Ok(name)
}

#[test]
fn a_client_reusing_its_port_after_its_backend_left_reaches_a_remaining_one() -> Result<()> {
    let tag = "ctreuse";
    let dir = std::env::temp_dir().join(format!("ferry-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let notready = |pod: &str| dir.join(format!("{pod}.notready"));
    let mut opts = LabOptions::new(tag)
        .scratch_dir(&dir)
        .manifest("service.yaml", &echo_service("echo", "echo", "10.96.0.10"))
        .manifest("client.yaml", &client_pod("client"));
    for pod in ["echo-a", "echo-b"] {
        let f = notready(pod).to_string_lossy().into_owned();
        opts = opts.manifest(&format!("{pod}.yaml"), &echo_pod(pod, "echo", Some(&f)));
    }
    let lab = Lab::start(opts)?;
    lab.wait_ready(&["echo-a", "echo-b", "client"], READY)?;
    let client = lab.pod_netns("client")?;
    let (tcp, udp): (SocketAddr, SocketAddr) = ("10.96.0.10:80".parse()?, "10.96.0.10:53".parse()?);
    lab.wait_answered_by(&tcp.to_string(), &["echo-a", "echo-b"], || tcp_ask(&client, tcp))?;
    // TCP and UDP from fixed source ports; whichever backend each got leaves
    // the Service (not ready: it keeps running and stays in the backends map
    // for the connections it has, like a terminating endpoint).
    let first = ask_from_port(&client, 41000, tcp)?;
    let udp_sock = in_netns(&client, move || -> Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:41001")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.connect(udp)?;
        Ok(s)
    })??;
    let udp_first = udp_ask_on(&udp_sock)?;
    let gone = first.clone();
    std::fs::write(notready(&gone), "")?;
    let other = if gone == "echo-a" { "echo-b" } else { "echo-a" };
    lab.wait_until(Duration::from_secs(15), &format!("{gone} out of the Service"), || {
        Ok(split(&client, 20, |ns| tcp_ask(ns, tcp))?.keys().eq([other].iter()))
    })?;
    // The same 4-tuples again: a new connection, and the next datagram, go to
    // the backend that remains.
    for i in 0..3 {
        assert_eq!(
            ask_from_port(&client, 41000, tcp)?,
            other,
            "TCP from the reused port, try {i}"
        );
    }
    if udp_first == gone {
        assert_eq!(
            udp_ask_on(&udp_sock)?,
            other,
            "UDP from the same socket after its backend left"
        );
    } else {
        // Its backend stayed: the socket keeps it.
        assert_eq!(udp_ask_on(&udp_sock)?, udp_first);
    }
    Ok(())
}

#[test]
fn answers_to_the_nodes_own_connections_from_a_nodeport_number_are_not_taken_for_nodeport_traffic() -> Result<()> {
    let c = Cluster::start("ctnpreply", 1, &[("services.yaml".into(), services())], &[])?;
    let n1 = c.nodes[0].node.clone();
    c.write_manifest("web-1.yaml", &on_node(&echo_pod("web-1", "web", None), &n1))?;
    c.wait_ready(&["web-1"], READY)?;
    let nodeport = SocketAddr::from((node_addr(0), 30080));
    c.nodes[0].wait_answered_by(&nodeport.to_string(), &["web-1"], || {
        TcpSession::connect(&c.external, nodeport)?.ask()
    })?;
    // A server outside the cluster, and a process of node 1 whose connection
    // to it happens to use 30080 (TCP) and 30053 (UDP) as its own ports.
    let listener = in_netns(&c.external, || std::net::TcpListener::bind((EXTERNAL_ADDR, 9000)))??;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut line = String::new();
        BufReader::new(s.try_clone()?).read_line(&mut line)?;
        s.write_all(format!("outside heard {}", line).as_bytes())?;
        Ok(())
    });
    let udp_server = in_netns(&c.external, || UdpSocket::bind((EXTERNAL_ADDR, 9001)))??;
    let udp_echo = std::thread::spawn(move || -> Result<()> {
        let mut buf = [0u8; 64];
        udp_server.set_read_timeout(Some(Duration::from_secs(10)))?;
        let (n, from) = udp_server.recv_from(&mut buf)?;
        udp_server.send_to(&buf[..n], from)?;
        Ok(())
    });
    let (tcp_answer, udp_answer) = in_netns(&n1, move || -> Result<(String, String)> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.bind(&SocketAddr::from((node_addr(0), 30080)).into())?;
        sock.connect_timeout(&SocketAddr::from((EXTERNAL_ADDR, 9000)).into(), Duration::from_secs(3))?;
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"node\n")?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        let u = UdpSocket::bind((node_addr(0), 30053))?;
        u.set_read_timeout(Some(Duration::from_secs(3)))?;
        u.connect((EXTERNAL_ADDR, 9001))?;
        u.send(b"ping")?;
        let mut buf = [0u8; 64];
        let n = u.recv(&mut buf)?;
        Ok((line.trim().to_string(), String::from_utf8_lossy(&buf[..n]).into_owned()))
    })?
    .with_context(|| format!("node 1's own connections from its NodePort numbers\n{}", c.logs()))?;
    assert_eq!(tcp_answer, "outside heard node");
    assert_eq!(udp_answer, "ping");
    server.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    udp_echo.join().map_err(|_| anyhow::anyhow!("udp server panicked"))??;
    assert!(c.nodes[0].counter("nodeport_local_reply")? >= 2, "counted");
    // The NodePorts still serve clients.
    assert_eq!(TcpSession::connect(&c.external, nodeport)?.ask()?, "web-1");
    Ok(())
}
