//! Maglev consistent hashing and topology-aware routing on a two-node lab.
//!
//! Maglev: the external client, from fixed source ports, reaches a NodePort
//! Service through node 1 and through node 2 and gets the same backend for
//! each port: exactly the one the Maglev table (computed here with the
//! agent's own code) names for the port's hash; the ports spread evenly; one
//! backend removed moves the ports it had and (almost) no others.
//!
//! Topology: a Service with `trafficDistribution: PreferClose` keeps each
//! zone's Pods on the zone's endpoint, `PreferSameNode` each node's Pods on
//! the node's endpoint, and both fall back when the near endpoint goes away.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use ferry_agent::maglev;
use ferry_common::{addr_to_map, maglev_flow_hash, port_to_map, DEFAULT_MAGLEV_TABLE_SIZE, PROTO_TCP};
use ferry_tests::{
    cluster::{node_addr, Cluster, EXTERNAL_ADDR},
    manifests::{client_pod, echo_pod, on_node},
    split, tcp_ask, TcpSession,
};

const READY: Duration = Duration::from_secs(60);
const NODE_PORT: u16 = 30080;
/// Source ports the external client uses, one connection each per node.
fn ports() -> std::ops::Range<u16> {
    21_000..23_000
}

const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  annotations: {ferry.dev/lb-algorithm: maglev}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
"#;

/// Which backend answers each source port through `node`'s NodePort (a new
/// connection each, closed with a RST so the port can be used again at once).
fn answers(c: &Cluster, node: usize) -> Result<BTreeMap<u16, String>> {
    let to = SocketAddr::from((node_addr(node), NODE_PORT));
    let mut out = BTreeMap::new();
    for port in ports() {
        let mut s = TcpSession::connect_from(&c.external, SocketAddr::from((EXTERNAL_ADDR, port)), to)
            .with_context(|| format!("source port {port} through node {}", node + 1))?;
        out.insert(port, s.ask()?);
        s.abort()?;
    }
    Ok(out)
}

/// The backend the Maglev table over `backends` (name, Pod address) names
/// for each source port, computed as the agent and the dataplane do.
fn predicted(backends: &[(String, Ipv4Addr)]) -> BTreeMap<u16, String> {
    let m = DEFAULT_MAGLEV_TABLE_SIZE;
    let addrs: Vec<(Ipv4Addr, u16)> = backends.iter().map(|(_, a)| (*a, 8080)).collect();
    let table = maglev::table(&addrs, m);
    let client = addr_to_map(EXTERNAL_ADDR.octets());
    ports()
        .map(|p| {
            let h = maglev_flow_hash(client, port_to_map(p), port_to_map(NODE_PORT), PROTO_TCP);
            (p, backends[table[(h % m) as usize] as usize].0.clone())
        })
        .collect()
}

fn counts(answers: &BTreeMap<u16, String>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for name in answers.values() {
        *out.entry(name.clone()).or_insert(0) += 1;
    }
    out
}

#[test]
fn maglev_gives_a_client_port_the_same_backend_through_every_node_and_a_removal_moves_about_one_nth() -> Result<()> {
    maglev_through_both_nodes(false)
}

/// The same with `--xdp`: XDP forwards the flows to the other node's
/// backends, choosing them with the same code.
#[test]
fn with_xdp_maglev_gives_a_client_port_the_same_backend_through_every_node() -> Result<()> {
    maglev_through_both_nodes(true)
}

fn maglev_through_both_nodes(xdp: bool) -> Result<()> {
    let mut args = vec!["--nodeport-addresses", "192.168.77.0/24"];
    if xdp {
        args.push("--xdp");
    }
    let c = Cluster::start(
        if xdp { "mgx" } else { "mg" },
        2,
        &[("web.yaml".into(), SERVICE.into())],
        &args,
    )?;
    let names = ["web-1", "web-2", "web-3", "web-4"];
    for (i, name) in names.iter().enumerate() {
        let node = &c.nodes[i / 2].node;
        c.write_manifest(&format!("{name}.yaml"), &on_node(&echo_pod(name, "web", None), node))?;
    }
    c.wait_ready(&names, READY)?;
    let backends: Vec<(String, Ipv4Addr)> = names
        .iter()
        .map(|n| {
            Ok((
                n.to_string(),
                c.nodes[0].pod(n).and_then(|p| p.pod_ip).context("pod IP")?,
            ))
        })
        .collect::<Result<_>>()?;
    for node in 0..2 {
        let to = SocketAddr::from((node_addr(node), NODE_PORT));
        c.nodes[0].wait_answered_by(&to.to_string(), &names, || TcpSession::connect(&c.external, to)?.ask())?;
    }

    let start = Instant::now();
    let (via1, via2) = (answers(&c, 0)?, answers(&c, 1)?);
    let took = start.elapsed();
    let differ: Vec<_> = ports().filter(|p| via1[p] != via2[p]).collect();
    ensure!(
        differ.is_empty(),
        "{} of {} source ports got another backend through node 2: {:?}",
        differ.len(),
        ports().len(),
        &differ[..differ.len().min(10)]
    );
    let want = predicted(&backends);
    let mispredicted = ports().filter(|p| via1[p] != want[p]).count();
    ensure!(
        mispredicted == 0,
        "{mispredicted} ports answered by another backend than the Maglev table names"
    );
    let spread = counts(&via1);
    let even = ports().len() / names.len();
    eprintln!(
        "{} ports x 2 nodes in {took:?}; spread {spread:?} (even: {even})",
        ports().len()
    );
    for (name, n) in &spread {
        ensure!(
            n.abs_diff(even) * 100 <= even * 10,
            "{name} got {n} of {} ports (even: {even}): {spread:?}",
            ports().len()
        );
    }
    let wide = c.nodes[0].ferry(&["svc", "list", "-o", "wide"])?;
    ensure!(
        wide.lines()
            .filter(|l| l.contains("default/web") && l.contains("maglev"))
            .count()
            >= 2,
        "svc list shows the flag:\n{wide}"
    );
    for lab in &c.nodes {
        ensure!(
            lab.counter("maglev_selected")? >= ports().len() as u64,
            "{}: maglev_selected counted",
            lab.node
        );
        if xdp {
            ensure!(
                lab.counter("xdp_forward")? > 0,
                "{}: XDP forwarded flows to the other node's backends",
                lab.node
            );
        }
    }

    // web-3 goes: only its ports move, to the table over the other three.
    c.remove_manifest("web-3.yaml")?;
    let rest: Vec<(String, Ipv4Addr)> = backends.iter().filter(|(n, _)| n != "web-3").cloned().collect();
    let want = predicted(&rest);
    let probe = ports().find(|p| via1[p] == "web-3").context("a port on web-3")?;
    for i in 0..2 {
        c.nodes[i].wait_until(
            Duration::from_secs(20),
            &format!("web-3's ports to move on node {}", i + 1),
            || {
                let to = SocketAddr::from((node_addr(i), NODE_PORT));
                let mut s = TcpSession::connect_from(&c.external, SocketAddr::from((EXTERNAL_ADDR, probe)), to)?;
                let name = s.ask()?;
                s.abort()?;
                Ok(name != "web-3")
            },
        )?;
    }
    let (after1, after2) = (answers(&c, 0)?, answers(&c, 1)?);
    ensure!(
        ports().all(|p| after1[&p] == after2[&p]),
        "after the removal the nodes still agree"
    );
    ensure!(
        ports().all(|p| after1[&p] == want[&p]),
        "after the removal: the table over three backends"
    );
    let on_removed = ports().filter(|p| via1[p] == "web-3").count();
    let moved = ports().filter(|p| via1[p] != after1[p]).count();
    let moved_others = ports().filter(|p| via1[p] != "web-3" && via1[p] != after1[p]).count();
    eprintln!(
        "removing 1 of 4 backends moved {moved} of {} ports ({:.1}%; ideal 25%): {on_removed} of web-3, {moved_others} others",
        ports().len(),
        100.0 * moved as f64 / ports().len() as f64
    );
    ensure!(moved >= on_removed, "every port of web-3 moved");
    ensure!(
        moved_others * 100 <= ports().len() * 3,
        "{moved_others} ports of remaining backends moved"
    );

    // Session affinity wins over Maglev (as in Cilium): new connections of
    // the client, whatever their port, go to its first backend.
    c.write_manifest(
        "web.yaml",
        &SERVICE.replace(
            "  selector: {app: web}\n",
            "  selector: {app: web}\n  sessionAffinity: ClientIP\n",
        ),
    )?;
    let to = SocketAddr::from((node_addr(0), NODE_PORT));
    c.nodes[0].wait_until(Duration::from_secs(20), "affinity in force", || {
        TcpSession::connect(&c.external, to)?.ask()?;
        Ok(c.nodes[0].counter("affinity_hit")? > 0)
    })?;
    let sticky = split(&c.external, 30, |ns| TcpSession::connect(ns, to)?.ask())?;
    ensure!(
        sticky.len() == 1,
        "30 connections from 30 ports with affinity: {sticky:?}"
    );
    Ok(())
}

#[test]
fn prefer_close_keeps_a_zones_pods_on_its_endpoints_and_falls_back_when_they_go() -> Result<()> {
    // One node per zone: each zone's client reaches its zone's endpoint.
    topology_keeps_clients_near("zn", "PreferClose", ["zone-a", "zone-b"])
}

#[test]
fn prefer_same_node_keeps_a_nodes_pods_on_its_endpoints_and_falls_back_when_they_go() -> Result<()> {
    // Both nodes in one zone: zone hints would give each client both
    // endpoints; node hints keep each on its own node's.
    topology_keeps_clients_near("sn", "PreferSameNode", ["zone-a", "zone-a"])
}

/// A Service with `trafficDistribution: DISTRIBUTION` and one endpoint on
/// each of two nodes (in `zones`): each node's client Pod reaches its own
/// node's endpoint only; when node 1's endpoint goes, its client falls back
/// to node 2's; without the field, both clients reach both endpoints.
fn topology_keeps_clients_near(tag: &str, distribution: &str, zones: [&str; 2]) -> Result<()> {
    let service = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: near, namespace: default}}
spec:
  clusterIP: 10.96.0.31
  selector: {{app: near}}
  trafficDistribution: {distribution}
  ports:
    - {{name: http, port: 80, targetPort: 8080}}
"#
    );
    let c = Cluster::start(tag, 2, &[("near.yaml".into(), service.clone())], &[])?;
    c.write_node_manifests(&zones)?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    c.write_manifest("near-a.yaml", &on_node(&echo_pod("near-a", "near", None), &n1))?;
    c.write_manifest("near-b.yaml", &on_node(&echo_pod("near-b", "near", None), &n2))?;
    c.write_manifest("client-a.yaml", &on_node(&client_pod("client-a"), &n1))?;
    c.write_manifest("client-b.yaml", &on_node(&client_pod("client-b"), &n2))?;
    c.wait_ready(&["near-a", "near-b", "client-a", "client-b"], READY)?;
    let to: SocketAddr = "10.96.0.31:80".parse()?;
    let (ca, cb) = (c.pod_netns("client-a")?, c.pod_netns("client-b")?);
    // Each node's client reaches its near endpoint only.
    c.nodes[0].wait_answered_by("the ClusterIP from node 1", &["near-a"], || tcp_ask(&ca, to))?;
    // Node 2's agent may still be loading its programs.
    c.nodes[1].wait_answered_by("the ClusterIP from node 2", &["near-b"], || tcp_ask(&cb, to))?;
    let a = split(&ca, 30, |ns| tcp_ask(ns, to))?;
    let b = split(&cb, 30, |ns| tcp_ask(ns, to))?;
    ensure!(
        a == BTreeMap::from([("near-a".to_string(), 30)]),
        "{distribution}: node 1's client: {a:?}"
    );
    ensure!(
        b == BTreeMap::from([("near-b".to_string(), 30)]),
        "{distribution}: node 2's client: {b:?}"
    );
    // Node 1's endpoint goes: its clients fall back to node 2's.
    c.remove_manifest("near-a.yaml")?;
    c.nodes[0].wait_answered_by("the ClusterIP from node 1 after near-a left", &["near-b"], || {
        tcp_ask(&ca, to)
    })?;
    let a = split(&ca, 20, |ns| tcp_ask(ns, to))?;
    ensure!(
        a == BTreeMap::from([("near-b".to_string(), 20)]),
        "{distribution}: node 1's client falls back: {a:?}"
    );
    // Without the field, both endpoints serve both nodes' clients.
    c.write_manifest("near-a.yaml", &on_node(&echo_pod("near-a", "near", None), &n1))?;
    c.wait_ready(&["near-a"], READY)?;
    c.write_manifest(
        "near.yaml",
        &service.replace(&format!("  trafficDistribution: {distribution}\n"), ""),
    )?;
    c.nodes[0].wait_answered_by(
        &format!("the ClusterIP from node 1 without {distribution}"),
        &["near-a", "near-b"],
        || tcp_ask(&ca, to),
    )?;
    Ok(())
}
