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
    cluster::{node_addr, Cluster},
    in_netns,
    manifests::{echo_pod, on_node},
    sys, TcpSession,
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
    let c = Cluster::start("ctstorm", 1, &[("services.yaml".into(), services())], &["--ct-any-map-size", "256", "--ct-map-size", "4096"])?;
    let n1 = c.nodes[0].node.clone();
    for i in 1..=3 {
        c.write_manifest(&format!("web-{i}.yaml"), &on_node(&echo_pod(&format!("web-{i}"), "web", None), &n1))?;
    }
    c.wait_ready(&["web-1", "web-2", "web-3"], READY)?;
    let tcp = SocketAddr::from((node_addr(0), 30080));
    c.nodes[0].wait_answered_by(&tcp.to_string(), &["web-1", "web-2", "web-3"], || TcpSession::connect(&c.external, tcp)?.ask())?;
    // Ten idle connections, each with the backend it got.
    let mut sessions = Vec::new();
    for _ in 0..10 {
        let mut s = TcpSession::connect(&c.external, tcp)?;
        let first = s.ask()?;
        sessions.push((s, first));
    }
    let udp = SocketAddr::from((node_addr(0), 30053));
    let answered = udp_storm(&c.external, udp, 3000)?;
    assert!(answered >= 2900, "the UDP storm itself is served: {answered} of 3000 answered");
    let table = c.nodes[0].ferry(&["ct", "list", "-o", "json"])?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&table)?;
    let udp_entries = rows.iter().filter(|r| r["protocol"] == "UDP").count();
    assert!(udp_entries <= 256, "the UDP table holds at most its size: {udp_entries}");
    // Every idle connection still reaches the backend it had.
    for (i, (s, first)) in sessions.iter_mut().enumerate() {
        let again = s.ask().with_context(|| format!("connection {i} after the storm\n{}", c.logs()))?;
        assert_eq!(&again, first, "connection {i} is answered by the same backend");
    }
    let established = rows
        .iter()
        .filter(|r| r["protocol"] == "TCP" && r["state"] == "established" && r["direction"] == "forward")
        .count();
    assert!(established >= 10, "the idle connections are tracked as established: {established}\n{table}");
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
    sys::netns_exec(&c.external, "sysctl", &["-qw", "net.ipv4.ip_local_port_range=1024 65000"])?;
    sys::netns_exec(&c.external, "sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    let to = SocketAddr::from((node_addr(0), 30081));
    c.nodes[0].wait_answered_by(&to.to_string(), &["far-2"], || TcpSession::connect(&c.external, to)?.ask())?;
    let started = Instant::now();
    let (names, failed, first_error) = sequential_connections(&c.external, to, 40_000)?;
    let took = started.elapsed();
    // Above about 2,000 new connections a second to one backend, the default
    // SNAT range (20,000 ports) is busier than the closing lifetime (10 s)
    // frees it: a SYN may then find no port at once and is retransmitted by
    // the client (counted as snat_ports_exhausted), but no connection fails.
    let retried = c.nodes[0].counter("snat_ports_exhausted")?;
    eprintln!("40000 connections in {took:?} ({:.0}/s), {failed} failed, {retried} SYNs found no SNAT port at first", 40_000.0 / took.as_secs_f64());
    assert_eq!(failed, 0, "every connection succeeds; first error: {first_error:?}\n{}", c.logs());
    assert_eq!(names, BTreeSet::from(["far-2".to_string()]));
    Ok(())
}
