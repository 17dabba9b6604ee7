//! ClusterIP end to end: real agent, real shim, real Pods in network namespaces,
//! real TCP and UDP clients; assertions on what the clients received and which
//! backend (Pod name) answered.
use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use ferry_tests::{
    manifests::{client_pod, echo_pod, echo_service},
    split, tcp_ask, udp_ask, Lab, LabOptions, TcpSession,
};

const READY: Duration = Duration::from_secs(60);
const VIP: &str = "10.96.0.10";

fn tcp_vip() -> SocketAddr {
    format!("{VIP}:80").parse().unwrap()
}
fn udp_vip() -> SocketAddr {
    format!("{VIP}:53").parse().unwrap()
}

/// A lab with echo Pods `names` behind Service `echo` (10.96.0.10) and a client Pod.
fn echo_lab(tag: &str, names: &[&str], readiness_files: bool) -> Result<Lab> {
    echo_lab_with(tag, names, readiness_files, &echo_service("echo", "echo", VIP))
}

/// The Service `echo` as a dual-stack Service whose first family is IPv6,
/// as the API server resolves one (`ipFamilies: [IPv6, IPv4]`, one ClusterIP
/// per family in that order): its IPv4 ClusterIP is still 10.96.0.10.
fn dual_stack_ipv6_first(service: &str) -> String {
    service.replacen(
        &format!("  clusterIP: {VIP}\n"),
        &format!(
            "  clusterIP: fd00::10\n  clusterIPs: [fd00::10, {VIP}]\n  ipFamilies: [IPv6, IPv4]\n  ipFamilyPolicy: RequireDualStack\n"
        ),
        1,
    )
}

/// [`echo_lab`] with the Service's manifest given.
fn echo_lab_with(tag: &str, names: &[&str], readiness_files: bool, service: &str) -> Result<Lab> {
    let mut opts = LabOptions::new(tag)
        .manifest("service.yaml", service)
        .manifest("client.yaml", &client_pod("client"));
    let dir = std::env::temp_dir().join(format!("ferry-ready-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    opts = opts.scratch_dir(&dir);
    for n in names {
        let file = dir.join(format!("{n}.notready"));
        let f = readiness_files.then(|| file.to_string_lossy().into_owned());
        opts = opts.manifest(&format!("{n}.yaml"), &echo_pod(n, "echo", f.as_deref()));
    }
    let lab = Lab::start(opts)?;
    let mut all = names.to_vec();
    all.push("client");
    lab.wait_ready(&all, READY)?;
    Ok(lab)
}

fn readiness_file(tag: &str, pod: &str) -> std::path::PathBuf {
    std::env::temp_dir()
        .join(format!("ferry-ready-{tag}-{}", std::process::id()))
        .join(format!("{pod}.notready"))
}

/// Waits until new connections from `client` reach exactly the backends `want`.
fn wait_backends(lab: &Lab, client: &str, want: &[&str]) -> Result<()> {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    lab.wait_until(Duration::from_secs(10), &format!("backends {want:?}"), || {
        let seen = split(client, 60, |ns| tcp_ask(ns, tcp_vip()))?;
        Ok(seen.keys().cloned().collect::<Vec<_>>() == want)
    })
}

#[test]
fn tcp_and_udp_are_balanced_over_every_ready_backend() -> Result<()> {
    balanced_over_every_ready_backend("split", &echo_service("echo", "echo", VIP))
}

/// The same for a dual-stack Service whose first family is IPv6: reached on
/// its IPv4 ClusterIP with its IPv4 endpoints (the IPv6 frontends are not
/// served by this dataplane yet, and the agent says so once).
#[test]
fn a_dual_stack_service_with_ipv6_first_is_balanced_on_its_ipv4_cluster_ip() -> Result<()> {
    let service = dual_stack_ipv6_first(&echo_service("echo", "echo", VIP));
    assert!(service.contains("ipFamilies: [IPv6, IPv4]"), "{service}");
    balanced_over_every_ready_backend("split6", &service)
}

fn balanced_over_every_ready_backend(tag: &str, service: &str) -> Result<()> {
    let lab = echo_lab_with(tag, &["echo-a", "echo-b", "echo-c"], false, service)?;
    let client = lab.pod_netns("client")?;
    // Pods turn ready a few ms apart and the agent may program them in two syncs.
    wait_backends(&lab, &client, &["echo-a", "echo-b", "echo-c"])?;

    let tcp = split(&client, 300, |ns| tcp_ask(ns, tcp_vip()))?;
    println!("TCP split over 300 connections: {tcp:?}");
    let udp = split(&client, 300, |ns| udp_ask(ns, udp_vip()))?;
    println!("UDP split over 300 sockets: {udp:?}");
    for (proto, counts) in [("TCP", &tcp), ("UDP", &udp)] {
        assert_eq!(counts.len(), 3, "{proto}: every backend answers: {counts:?}");
        for b in ["echo-a", "echo-b", "echo-c"] {
            let n = counts.get(b).copied().unwrap_or(0);
            assert!(n >= 50, "{proto}: {b} answered {n} of 300 (want >= 50): {counts:?}");
        }
    }
    // The inspection commands read the same maps.
    let svc = lab.ferry(&["svc", "list"])?;
    assert!(svc.contains("10.96.0.10:80"), "svc list shows the frontend:\n{svc}");
    let ct = lab.ferry(&["ct", "list"])?;
    assert!(ct.contains("10.96.0.10"), "ct list shows flows to the ClusterIP:\n{ct}");
    let not_served = lab
        .agent_log()
        .lines()
        .filter(|l| l.contains("not served") && l.contains("[fd00::10]"))
        .count();
    let want = usize::from(service.contains("fd00::10"));
    assert_eq!(
        not_served,
        want,
        "the IPv6 frontends named {want} time(s):\n{}",
        lab.agent_log()
    );
    Ok(())
}

#[test]
fn established_connection_keeps_its_backend_while_endpoints_change() -> Result<()> {
    let mut lab = echo_lab("sticky", &["echo-a", "echo-b", "echo-c"], false)?;
    let client = lab.pod_netns("client")?;
    lab.wait_until(Duration::from_secs(5), "service answers", || {
        Ok(tcp_ask(&client, tcp_vip()).is_ok())
    })?;

    let mut session = TcpSession::connect(&client, tcp_vip())?;
    let mine = session.ask()?;
    assert_eq!(session.peer, tcp_vip(), "the client sees the ClusterIP it dialled");

    // Add an endpoint: the flow stays; new connections reach the new Pod.
    lab.write_manifest("echo-d.yaml", &echo_pod("echo-d", "echo", None))?;
    lab.wait_ready(&["echo-d"], READY)?;
    wait_backends(&lab, &client, &["echo-a", "echo-b", "echo-c", "echo-d"])?;
    assert_eq!(session.ask()?, mine, "after an endpoint was added");

    // Remove the other endpoints: the flow still answers from its backend.
    let others: Vec<&str> = ["echo-a", "echo-b", "echo-c"]
        .into_iter()
        .filter(|b| *b != mine)
        .collect();
    for o in &others {
        lab.remove_manifest(&format!("{o}.yaml"))?;
    }
    let mut left = vec![mine.as_str(), "echo-d"];
    left.sort();
    wait_backends(&lab, &client, &left)?;
    for _ in 0..5 {
        assert_eq!(session.ask()?, mine, "after other endpoints were removed");
    }

    // A restart of the agent keeps the pinned maps and the flow.
    lab.stop_agent();
    assert_eq!(session.ask()?, mine, "while the agent is down");
    lab.start_agent()?;
    std::thread::sleep(Duration::from_secs(2));
    lab.check_alive()?;
    assert_eq!(session.ask()?, mine, "after the agent restarted");
    Ok(())
}

#[test]
fn removed_endpoint_gets_no_new_connections() -> Result<()> {
    let lab = echo_lab("remove", &["echo-a", "echo-b", "echo-c"], false)?;
    let client = lab.pod_netns("client")?;
    wait_backends(&lab, &client, &["echo-a", "echo-b", "echo-c"])?;
    lab.remove_manifest("echo-b.yaml")?;
    lab.wait_until(Duration::from_secs(15), "echo-b gone", || {
        Ok(lab.pod("echo-b").is_none())
    })?;
    let tcp = split(&client, 100, |ns| tcp_ask(ns, tcp_vip()))?;
    let udp = split(&client, 100, |ns| udp_ask(ns, udp_vip()))?;
    assert!(
        !tcp.contains_key("echo-b") && tcp.len() == 2,
        "TCP after removal: {tcp:?}"
    );
    assert!(
        !udp.contains_key("echo-b") && udp.len() == 2,
        "UDP after removal: {udp:?}"
    );
    Ok(())
}

#[test]
fn failing_readiness_probe_takes_the_pod_out_and_back_in() -> Result<()> {
    let tag = "probe";
    let lab = echo_lab(tag, &["echo-a", "echo-b", "echo-c"], true)?;
    let client = lab.pod_netns("client")?;
    wait_backends(&lab, &client, &["echo-a", "echo-b", "echo-c"])?;

    let file = readiness_file(tag, "echo-b");
    std::fs::write(&file, b"")?;
    lab.wait_until(Duration::from_secs(10), "echo-b not ready", || {
        Ok(lab.pod("echo-b").is_some_and(|p| !p.ready))
    })?;
    wait_backends(&lab, &client, &["echo-a", "echo-c"])?;
    let tcp = split(&client, 100, |ns| tcp_ask(ns, tcp_vip()))?;
    assert!(
        !tcp.contains_key("echo-b"),
        "not-ready Pod got new connections: {tcp:?}"
    );

    std::fs::remove_file(&file)?;
    wait_backends(&lab, &client, &["echo-a", "echo-b", "echo-c"])?;
    Ok(())
}

#[test]
fn hairpin_a_pod_reaches_itself_through_its_service() -> Result<()> {
    let lab = echo_lab("hairpin", &["echo-a", "echo-b"], false)?;
    let me = lab.pod_netns("echo-a")?;
    let client = lab.pod_netns("client")?;
    wait_backends(&lab, &client, &["echo-a", "echo-b"])?;
    let tcp = split(&me, 60, |ns| tcp_ask(ns, tcp_vip()))?;
    let udp = split(&me, 60, |ns| udp_ask(ns, udp_vip()))?;
    println!("from echo-a: TCP {tcp:?} UDP {udp:?}");
    assert!(
        tcp.get("echo-a").copied().unwrap_or(0) > 0,
        "TCP hairpin never answered: {tcp:?}"
    );
    assert!(
        udp.get("echo-a").copied().unwrap_or(0) > 0,
        "UDP hairpin never answered: {udp:?}"
    );
    assert!(tcp.contains_key("echo-b") && udp.contains_key("echo-b"));
    Ok(())
}

#[test]
fn bad_manifests_next_to_good_ones_leave_the_good_services_working() -> Result<()> {
    let bad_port = r#"apiVersion: v1
kind: Service
metadata: {name: bad-port, namespace: default}
spec:
  clusterIP: 10.96.0.20
  selector: {app: echo}
  ports: [{port: 70000, targetPort: 8080}]
"#;
    let bad_proto = r#"apiVersion: v1
kind: Service
metadata: {name: bad-proto, namespace: default}
spec:
  clusterIP: 10.96.0.21
  selector: {app: echo}
  ports: [{port: 80, protocol: QUIC, targetPort: 8080}]
"#;
    let orphan_slice = r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: nobody-abc
  namespace: default
  labels: {kubernetes.io/service-name: nobody}
addressType: IPv4
endpoints: [{addresses: ["10.244.0.99"]}]
ports: [{port: 80}]
"#;
    let mut opts = LabOptions::new("badinput")
        .manifest(
            "0-broken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: [this is: not: yaml\n",
        )
        .manifest("1-bad-port.yaml", bad_port)
        .manifest("2-bad-proto.yaml", bad_proto)
        .manifest("3-orphan-slice.yaml", orphan_slice)
        .manifest("service.yaml", &echo_service("echo", "echo", VIP))
        .manifest("client.yaml", &client_pod("client"));
    for n in ["echo-a", "echo-b"] {
        opts = opts.manifest(&format!("{n}.yaml"), &echo_pod(n, "echo", None));
    }
    let mut lab = Lab::start(opts)?;
    lab.wait_ready(&["echo-a", "echo-b", "client"], READY)?;
    let client = lab.pod_netns("client")?;
    wait_backends(&lab, &client, &["echo-a", "echo-b"])?;
    lab.check_alive()?;

    let log = lab.logs();
    for needle in [
        "0-broken.yaml",
        "1-bad-port.yaml",
        "70000",
        "2-bad-proto.yaml",
        "QUIC",
        "nobody",
    ] {
        assert!(log.contains(needle), "the agent's errors name {needle:?}:\n{log}");
    }
    let svc = lab.ferry(&["svc", "list"])?;
    assert!(
        !svc.contains("10.96.0.20") && !svc.contains("10.96.0.21"),
        "bad Services programmed:\n{svc}"
    );

    // Fixing the file brings the Service up within a second or so.
    lab.write_manifest("1-bad-port.yaml", &bad_port.replace("70000", "8081"))?;
    let fixed: SocketAddr = "10.96.0.20:8081".parse()?;
    lab.wait_until(Duration::from_secs(3), "fixed Service answers", || {
        Ok(tcp_ask(&client, fixed).is_ok())
    })?;
    Ok(())
}

#[test]
fn service_without_selector_uses_a_manual_endpointslice() -> Result<()> {
    let lab = echo_lab("manual", &["echo-a", "echo-b"], false)?;
    let client = lab.pod_netns("client")?;
    let ip = lab.pod("echo-b").and_then(|p| p.pod_ip).expect("echo-b has an IP");
    let manual = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: manual, namespace: default}}
spec:
  clusterIP: 10.96.0.30
  ports: [{{name: web, port: 8000, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: manual-1
  namespace: default
  labels: {{kubernetes.io/service-name: manual}}
addressType: IPv4
endpoints: [{{addresses: ["{ip}"], conditions: {{ready: true}}}}]
ports: [{{name: web, port: 8080, protocol: TCP}}]
"#
    );
    lab.write_manifest("manual.yaml", &manual)?;
    let addr: SocketAddr = "10.96.0.30:8000".parse()?;
    lab.wait_until(Duration::from_secs(3), "manual Service answers", || {
        Ok(tcp_ask(&client, addr).is_ok())
    })?;
    let seen = split(&client, 20, |ns| tcp_ask(ns, addr))?;
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        vec!["echo-b"],
        "only the manual endpoint: {seen:?}"
    );
    // Deleting the file removes the Service from the dataplane.
    lab.remove_manifest("manual.yaml")?;
    lab.wait_until(Duration::from_secs(3), "manual Service gone", || {
        Ok(!lab.ferry(&["svc", "list"])?.contains("10.96.0.30"))
    })?;
    Ok(())
}

/// deploy/daemonset.yaml grants only `REQUIRED_CAPABILITIES`, not privileged:
/// with exactly those the agent loads, pins, attaches and balances traffic.
#[test]
fn the_agent_works_with_only_the_capabilities_the_daemonset_grants() -> Result<()> {
    let opts = LabOptions::new("caps")
        .manifest("service.yaml", &echo_service("echo", "echo", VIP))
        .manifest("client.yaml", &client_pod("client"))
        .manifest("echo-a.yaml", &echo_pod("echo-a", "echo", None))
        .manifest("echo-b.yaml", &echo_pod("echo-b", "echo", None));
    let mut lab = Lab::start(LabOptions { agent: false, ..opts })?;
    lab.start_agent_with_caps(ferry_agent::dataplane::REQUIRED_CAPABILITIES)?;
    lab.wait_ready(&["echo-a", "echo-b", "client"], READY)?;
    let client = lab.pod_netns("client")?;
    wait_backends(&lab, &client, &["echo-a", "echo-b"])?;
    lab.check_alive()?;
    Ok(())
}
