//! `cargo xtask run` / `cargo xtask lab --nodes 1`: the lab from lab/manifests, with live
//! traffic through the Services and which backend answered.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use ferry_tests::{tcp_ask, udp_ask, Lab, LabOptions};

/// The Services of lab/manifests/services.yaml and the Pods behind them.
const TCP_SERVICE: &str = "10.96.0.10:80";
const UDP_SERVICE: &str = "10.96.0.11:53";
const BACKENDS: &[&str] = &["echo-0", "echo-1", "echo-2"];
const CLIENT: &str = "client";
const REQUESTS: usize = 30;

pub fn run(once: bool, demo: bool) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;

    let manifests = crate::root().join("lab/manifests");
    println!(
        "lab: starting a node namespace with `ferry agent` and `ferry shim` on {}",
        manifests.display()
    );
    let lab = Lab::start(LabOptions::new("demo").manifests_from_dir(&manifests)?)?;
    println!("lab: node netns {}; waiting for the Pods to be ready", lab.node);
    let mut pods: Vec<&str> = BACKENDS.to_vec();
    pods.push(CLIENT);
    lab.wait_ready(&pods, Duration::from_secs(60))?;
    for p in lab.pods() {
        println!(
            "  pod {:<8} ip {:<12} ready {:<5} netns {}",
            p.name,
            p.pod_ip.map(|i| i.to_string()).unwrap_or_default(),
            p.ready,
            p.netns.unwrap_or_default()
        );
    }
    let client = lab.pod_netns(CLIENT)?;
    let tcp: SocketAddr = TCP_SERVICE.parse()?;
    let udp: SocketAddr = UDP_SERVICE.parse()?;
    // The agent programs the maps within a second of the Pods turning ready
    // (later on a busy machine): wait until every backend has answered, not
    // just the first, or the split below misses one.
    lab.wait_answered_by("the TCP Service", BACKENDS, || tcp_ask(&client, tcp))?;

    println!("\n$ ferry svc list\n{}", lab.ferry(&["svc", "list"])?);
    if demo {
        let mut ok = true;
        ok &= show_split("TCP", &client, tcp, tcp_ask)?;
        ok &= show_split("UDP", &client, udp, udp_ask)?;
        ok &= crate::demo_north_south::run()?;
        if once {
            println!("\n$ ferry ct list (first lines)");
            for line in lab.ferry(&["ct", "list"])?.lines().take(8) {
                println!("{line}");
            }
            if !ok {
                bail!("a Service did not reach every backend");
            }
            println!("\nlab: demo done; removing everything");
            return Ok(());
        }
    }
    if once {
        println!("\nlab: ready; --once: removing everything");
        return Ok(());
    }
    println!("\nlab: running; enter a Pod with `ip netns exec {client} bash`. Ctrl-C stops and cleans up.");
    let mut tick = 0u64;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_secs(1));
        if demo {
            tick += 1;
            let t = tcp_ask(&client, tcp).unwrap_or_else(|e| format!("error: {e}"));
            let u = udp_ask(&client, udp).unwrap_or_else(|e| format!("error: {e}"));
            println!("[{tick:>4}s] client -> {TCP_SERVICE}/tcp answered by {t:<8}  {UDP_SERVICE}/udp answered by {u}");
        }
    }
    println!("\nlab: stopping; removing Pods, namespaces and pinned maps");
    Ok(())
}

/// Sends REQUESTS requests and prints which backend answered how often.
/// Returns whether every backend answered at least once.
fn show_split(
    proto: &str,
    client: &str,
    addr: SocketAddr,
    ask: impl Fn(&str, SocketAddr) -> Result<String>,
) -> Result<bool> {
    let mut counts: BTreeMap<String, usize> = BACKENDS.iter().map(|b| (b.to_string(), 0)).collect();
    for _ in 0..REQUESTS {
        let who = ask(client, addr).with_context(|| format!("{proto} request to {addr}"))?;
        *counts.entry(who).or_default() += 1;
    }
    println!("\n{REQUESTS} {proto} requests from pod {CLIENT} to {addr}, one connection each:");
    for (backend, n) in &counts {
        println!("  {backend:<8} {n:>3}  {}", "#".repeat(*n));
    }
    Ok(BACKENDS.iter().all(|b| counts.get(*b).copied().unwrap_or(0) > 0))
}
