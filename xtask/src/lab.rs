//! `cargo xtask lab --nodes N` (N >= 2): lab/manifests on a multi-node lab
//! (tests/src/cluster.rs: N node namespaces on an underlay, an external client
//! namespace). Every node's shim spreads the Pods without spec.nodeName; this
//! prints where each Pod landed, the addresses and commands to try, checks that
//! every Service answers (ClusterIP from a Pod of each node, NodePort from the
//! external client on each node), and waits for Ctrl-C. Everything is removed
//! when the cluster is dropped: on Ctrl-C, on an error, or with `--once` after
//! the checks.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use ferry_shim::status::PodRecord;
use ferry_tests::{
    cluster::{node_addr, pod_cidr, Cluster, EXTERNAL_ADDR},
    sys, tcp_ask, udp_ask, LabOptions,
};
use k8s_openapi::api::core::v1::Service;
use serde::Deserialize as _;

const READY: Duration = Duration::from_secs(90);
const ANSWER: Duration = Duration::from_secs(30);

/// One port of a Service from the manifests.
struct SvcPort {
    port: u16,
    protocol: String,
    node_port: Option<u16>,
}

/// A Service of the manifests with a ClusterIP and a selector (what the lab
/// can check and show).
struct Svc {
    key: String,
    cluster_ip: Ipv4Addr,
    selector: BTreeMap<String, String>,
    ports: Vec<SvcPort>,
}

pub fn run(nodes: usize, once: bool) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;

    let dir = crate::root().join("lab/manifests");
    let manifests = LabOptions::new("lab").manifests_from_dir(&dir)?.manifests;
    let services = services(&manifests)?;
    println!(
        "lab: starting {nodes} nodes (`ferry agent` + `ferry shim --nodes <all>` each) on {}",
        dir.display()
    );
    let mut cluster = Cluster::start("lab", nodes, &manifests, &[])?;
    let names = cluster.node_names();
    let expected = expected_placement(&dir, &names)?;
    let pods: Vec<&str> = expected.values().flatten().map(String::as_str).collect();
    println!("lab: waiting for the Pods to be ready: {}", pods.join(", "));
    cluster.wait_ready(&pods, READY)?;
    if stop.load(Ordering::SeqCst) {
        println!("lab: interrupted; removing everything");
        return Ok(());
    }
    let records = cluster.nodes[0].pods();
    check_placement(&expected, &records)?;
    print_nodes(&cluster, &records);
    print_services(&services, &records);
    print_examples(&cluster, &services, &records)?;

    println!("\nlab: checking that every Service answers from every node");
    let checked = check_services(&cluster, &services, &records);
    if once {
        checked?;
        println!("\nlab: --once: checks passed; removing everything");
        return Ok(());
    }
    if let Err(e) = checked {
        println!("lab: WARNING: {e:#}\n(the lab keeps running so you can look)");
    }
    println!("\nlab: running. Ctrl-C stops and removes everything (namespaces, Pods, pinned maps).");
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(500));
        for lab in &mut cluster.nodes {
            lab.check_alive()?;
        }
    }
    println!("\nlab: stopping; removing Pods, namespaces and pinned maps");
    Ok(())
}

/// The Services of the manifests that have a ClusterIP and a selector.
fn services(manifests: &[(String, String)]) -> Result<Vec<Svc>> {
    let mut out = Vec::new();
    for (file, text) in manifests {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc).with_context(|| format!("{file}: document {}", i + 1))?;
            if value.get("kind").and_then(|k| k.as_str()) != Some("Service") {
                continue;
            }
            let svc: Service =
                serde_yaml::from_value(value).with_context(|| format!("{file}: document {}: Service", i + 1))?;
            if let Some(s) = svc_of(file, svc)? {
                out.push(s);
            }
        }
    }
    Ok(out)
}

fn svc_of(file: &str, svc: Service) -> Result<Option<Svc>> {
    let name = svc.metadata.name.unwrap_or_default();
    let key = format!("{}/{name}", svc.metadata.namespace.as_deref().unwrap_or("default"));
    let Some(spec) = svc.spec else {
        return Ok(None);
    };
    let (Some(ip), Some(selector)) = (spec.cluster_ip, spec.selector) else {
        return Ok(None);
    };
    let cluster_ip: Ipv4Addr = ip
        .parse()
        .with_context(|| format!("{file}: Service {key}: spec.clusterIP {ip:?}"))?;
    let mut ports = Vec::new();
    for p in spec.ports.unwrap_or_default() {
        let port =
            u16::try_from(p.port).with_context(|| format!("{file}: Service {key}: spec.ports.port {}", p.port))?;
        let node_port = p
            .node_port
            .map(u16::try_from)
            .transpose()
            .with_context(|| format!("{file}: Service {key}: spec.ports.nodePort"))?;
        let protocol = p.protocol.unwrap_or_else(|| "TCP".into());
        ports.push(SvcPort {
            port,
            protocol,
            node_port,
        });
    }
    Ok(Some(Svc {
        key,
        cluster_ip,
        selector,
        ports,
    }))
}

/// Node -> the Pods its shim runs, computed with the shim's own placement
/// (`ferry_shim::manifests`), so the lab can tell if the shims disagreed.
fn expected_placement(dir: &Path, nodes: &[String]) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for node in nodes {
        let desired = ferry_shim::manifests::load_dir(dir).place(node, nodes);
        if !desired.errors.is_empty() {
            bail!("{}: {}", dir.display(), desired.errors.join("; "));
        }
        let mut pods: Vec<String> = desired.pods.values().map(|p| p.name.clone()).collect();
        for d in desired.deployments.values() {
            pods.extend(ferry_shim::rollout::plan(d, &[], &[]).start);
        }
        out.insert(node.clone(), pods);
    }
    Ok(out)
}

/// Every expected Pod runs once, on its node.
fn check_placement(expected: &BTreeMap<String, Vec<String>>, records: &[PodRecord]) -> Result<()> {
    for (node, pods) in expected {
        for pod in pods {
            let on: Vec<&str> = records
                .iter()
                .filter(|r| &r.name == pod)
                .map(|r| r.node.as_str())
                .collect();
            ensure!(
                on == [node.as_str()],
                "pod {pod} should run on {node} only, runs on {on:?}"
            );
        }
    }
    Ok(())
}

fn print_nodes(c: &Cluster, records: &[PodRecord]) {
    println!();
    for (i, lab) in c.nodes.iter().enumerate() {
        println!(
            "node {}: netns {}  address {}  pod CIDR {}",
            i + 1,
            lab.node,
            node_addr(i),
            pod_cidr(i)
        );
        let mine: Vec<&PodRecord> = records.iter().filter(|r| r.node == lab.node).collect();
        if mine.is_empty() {
            println!("    (no Pods)");
        }
        for r in mine {
            println!(
                "    pod {:<10} ip {:<12} netns {}",
                r.name,
                r.pod_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                r.netns.as_deref().unwrap_or("")
            );
        }
    }
    println!(
        "external client: netns {}  address {EXTERNAL_ADDR}  (reaches the nodes' addresses, not the Pods')",
        c.external
    );
}

/// Whether the Service selects the Pod.
fn selects(svc: &Svc, r: &PodRecord) -> bool {
    svc.selector.iter().all(|(k, v)| r.labels.get(k) == Some(v))
}

fn backends<'a>(svc: &Svc, records: &'a [PodRecord]) -> Vec<&'a PodRecord> {
    records.iter().filter(|r| selects(svc, r)).collect()
}

fn print_services(services: &[Svc], records: &[PodRecord]) {
    println!("\nServices (lab/manifests):");
    for svc in services {
        let names: Vec<&str> = backends(svc, records).iter().map(|r| r.name.as_str()).collect();
        for p in &svc.ports {
            let node_port = p.node_port.map(|n| format!("  NodePort {n}")).unwrap_or_default();
            println!(
                "    {:<18} {}:{}/{}{node_port}  backends {}",
                svc.key,
                svc.cluster_ip,
                p.port,
                p.protocol,
                names.join(" ")
            );
        }
    }
}

/// Commands to paste: a Pod of node 1 to each ClusterIP, the external client
/// to each NodePort, the agent's maps.
fn print_examples(c: &Cluster, services: &[Svc], records: &[PodRecord]) -> Result<()> {
    let ferry = sys::ferry_bin()?;
    println!("\nTry:");
    let pod = records.iter().find(|r| r.netns.is_some() && !is_backend(services, r));
    if let Some(pod) = pod.or(records.first()) {
        let ns = pod.netns.as_deref().unwrap_or_default();
        for svc in services {
            for p in &svc.ports {
                let to = format!("{}:{}", svc.cluster_ip, p.port);
                match p.protocol.as_str() {
                    "UDP" => println!(
                        "    echo hi | ip netns exec {ns} socat -T1 - UDP:{to}    # pod {} -> {} (UDP)",
                        pod.name, svc.key
                    ),
                    _ => println!(
                        "    ip netns exec {ns} curl -s http://{to}/    # pod {} -> {}",
                        pod.name, svc.key
                    ),
                }
            }
        }
        println!("    ip netns exec {ns} bash    # a shell in pod {}", pod.name);
    }
    for svc in services {
        for p in svc.ports.iter().filter(|p| p.node_port.is_some()) {
            let np = p.node_port.unwrap_or_default();
            for i in 0..c.nodes.len() {
                let to = format!("{}:{np}", node_addr(i));
                match p.protocol.as_str() {
                    "UDP" => println!(
                        "    echo hi | ip netns exec {} socat -T1 - UDP:{to}    # external -> NodePort of node {}",
                        c.external,
                        i + 1
                    ),
                    _ => println!(
                        "    ip netns exec {} curl -s http://{to}/    # external -> NodePort of node {}",
                        c.external,
                        i + 1
                    ),
                }
            }
        }
    }
    let lab = &c.nodes[0];
    println!(
        "    ip netns exec {} {} svc list --bpffs-dir {}    # node 1's frontends and backends",
        lab.node,
        ferry.display(),
        lab.bpffs_dir.display()
    );
    Ok(())
}

fn is_backend(services: &[Svc], r: &PodRecord) -> bool {
    services.iter().any(|s| selects(s, r))
}

/// Each Service port answers, by every backend and only them: its ClusterIP
/// from a Pod of each node (a node without Pods is skipped), its NodePort
/// from the external client on each node's address.
fn check_services(c: &Cluster, services: &[Svc], records: &[PodRecord]) -> Result<()> {
    for svc in services {
        let want: BTreeSet<String> = backends(svc, records).iter().map(|r| r.name.clone()).collect();
        if want.is_empty() {
            println!("    {}: no backends, not checked", svc.key);
            continue;
        }
        for p in &svc.ports {
            for (i, lab) in c.nodes.iter().enumerate() {
                let mine = records.iter().filter(|r| r.node == lab.node && r.netns.is_some());
                let Some(pod) = mine.clone().find(|r| !want.contains(&r.name)).or(mine.clone().next()) else {
                    println!("    node {}: no Pod to ask from", i + 1);
                    continue;
                };
                let to = SocketAddr::from((svc.cluster_ip, p.port));
                let from = pod.netns.clone().unwrap_or_default();
                let what = format!("{} {to}/{} from pod {} (node {})", svc.key, p.protocol, pod.name, i + 1);
                answered_by_all(c, &what, &from, to, &p.protocol, &want)?;
            }
            let Some(np) = p.node_port else { continue };
            for i in 0..c.nodes.len() {
                let to = SocketAddr::from((node_addr(i), np));
                let what = format!("{} NodePort {to}/{} from the external client", svc.key, p.protocol);
                answered_by_all(c, &what, &c.external, to, &p.protocol, &want)?;
            }
        }
    }
    Ok(())
}

/// Asks `to` from the netns `from` until every backend in `want` answered;
/// an answer from anyone else is an error.
fn answered_by_all(
    c: &Cluster,
    what: &str,
    from: &str,
    to: SocketAddr,
    protocol: &str,
    want: &BTreeSet<String>,
) -> Result<()> {
    let names: Vec<&String> = want.iter().collect();
    let seen = c.nodes[0].wait_answered_by_within(ANSWER, what, &names, || match protocol {
        "UDP" => udp_ask(from, to),
        _ => tcp_ask(from, to),
    })?;
    ensure!(&seen == want, "{what}: answered by {seen:?}, only {want:?} should");
    println!(
        "    ok  {what}: answered by {}",
        seen.into_iter().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}
