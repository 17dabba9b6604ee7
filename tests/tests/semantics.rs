//! Service semantics users rely on (issue 7), end to end in network namespaces:
//! reject for Services without endpoints, stale UDP flows, session affinity,
//! graceful termination, internalTrafficPolicy: Local, named ports and protocols,
//! loadBalancerSourceRanges.
//! Real agent, shim, Pods and clients; assertions on what clients receive.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use ferry_tests::{
    cluster::{node_addr, Cluster, EXTERNAL_ADDR},
    in_netns,
    manifests::{
        client_pod, draining_echo_pod, draining_echo_spec, echo_pod, echo_service, indent, itp_services, on_node,
        sticky_service, EMPTY_SVC,
    },
    split, sys, tcp_ask, udp_ask, udp_try_on, udp_wait_moved, Lab, LabOptions, TcpSession,
};

const READY: Duration = Duration::from_secs(60);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn readiness_file(tag: &str, pod: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-sem-{tag}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{pod}.notready"))
}

/// A lab with echo Pods (readiness controlled by files) behind `echo` at
/// 10.96.0.10 (TCP 80, UDP 53), a client, and `extra` manifests.
fn lab(tag: &str, names: &[&str], extra: &[(&str, String)]) -> Result<Lab> {
    let mut opts = LabOptions::new(tag)
        .manifest("service.yaml", &echo_service("echo", "echo", "10.96.0.10"))
        .manifest("client.yaml", &client_pod("client"))
        .scratch_dir(readiness_file(tag, "-").parent().expect("a directory"));
    for n in names {
        let f = readiness_file(tag, n).to_string_lossy().into_owned();
        opts = opts.manifest(&format!("{n}.yaml"), &echo_pod(n, "echo", Some(&f)));
    }
    for (file, yaml) in extra {
        opts = opts.manifest(file, yaml);
    }
    let lab = Lab::start(opts)?;
    let mut all = names.to_vec();
    all.push("client");
    lab.wait_ready(&all, READY)?;
    Ok(lab)
}

fn wait_programmed(lab: &Lab, what: &str) -> Result<()> {
    lab.wait_until(Duration::from_secs(10), &format!("{what} in svc list"), || {
        Ok(lab.ferry(&["svc", "list"])?.contains(what))
    })
}

/// connect() from `netns`: the error kind (None: connected) and how long it took.
fn tcp_connect(netns: &str, to: SocketAddr) -> Result<(Option<ErrorKind>, Duration)> {
    in_netns(netns, move || {
        let start = Instant::now();
        let r = TcpStream::connect_timeout(&to, Duration::from_secs(3));
        (r.err().map(|e| e.kind()), start.elapsed())
    })
}

/// A connected UDP socket in `netns`: one datagram; the error kind of recv (None:
/// an answer came) and how long it took.
fn udp_try(netns: &str, to: SocketAddr) -> Result<(Option<ErrorKind>, Duration)> {
    in_netns(netns, move || -> Result<(Option<ErrorKind>, Duration)> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.connect(to)?;
        let start = Instant::now();
        s.send(b"hello\n")?;
        let mut buf = [0u8; 512];
        let r = s.recv(&mut buf);
        Ok((r.err().map(|e| e.kind()), start.elapsed()))
    })?
}

#[test]
fn a_service_without_endpoints_refuses_tcp_and_udp_at_once() -> Result<()> {
    let lab = lab("reject", &["echo-a"], &[("empty.yaml", EMPTY_SVC.to_string())])?;
    let client = lab.pod_netns("client")?;
    wait_programmed(&lab, "10.96.0.40:80")?;
    // A silent drop would show as a timeout after the SYN's (or the datagram's)
    // retransmission, a second or more. Every attempt is refused within 100 ms.
    for _ in 0..5 {
        let (err, took) = tcp_connect(&client, addr("10.96.0.40:80"))?;
        assert_eq!(
            err,
            Some(ErrorKind::ConnectionRefused),
            "TCP connect to a Service without endpoints"
        );
        assert!(took < Duration::from_millis(100), "TCP refused only after {took:?}");
        let (err, took) = udp_try(&client, addr("10.96.0.40:53"))?;
        assert_eq!(
            err,
            Some(ErrorKind::ConnectionRefused),
            "UDP to a Service without endpoints"
        );
        assert!(took < Duration::from_millis(100), "UDP refused only after {took:?}");
    }
    // The Service that has an endpoint still answers, and the reject was counted.
    assert_eq!(tcp_ask(&client, addr("10.96.0.10:80"))?, "echo-a");
    // Its only endpoint turns unready: refused as well (nothing left to use).
    std::fs::write(readiness_file("reject", "echo-a"), b"")?;
    lab.wait_until(Duration::from_secs(10), "echo refuses", || {
        Ok(tcp_connect(&client, addr("10.96.0.10:80"))?.0 == Some(ErrorKind::ConnectionRefused))
    })?;
    // From zero endpoints to one (kubernetes#48370): a connected UDP socket that
    // was refused gets answers as soon as the endpoint is back; nothing stale.
    let vip = addr("10.96.0.10:53");
    let sock = in_netns(&client, move || -> Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        s.connect(vip)?;
        Ok(s)
    })??;
    let mut buf = [0u8; 512];
    sock.send(b"hello\n")?;
    let refused = sock.recv(&mut buf).map_err(|e| e.kind());
    assert_eq!(refused.err(), Some(ErrorKind::ConnectionRefused));
    std::fs::remove_file(readiness_file("reject", "echo-a"))?;
    lab.wait_until(Duration::from_secs(10), "the same UDP socket gets an answer", || {
        let _ = sock.send(b"hello\n");
        Ok(sock.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"echo-a\n"))
    })?;
    Ok(())
}

#[test]
fn a_udp_client_moves_to_a_live_backend_when_its_backend_stops_being_used() -> Result<()> {
    let tag = "staleudp";
    let lab = lab(tag, &["echo-a", "echo-b"], &[])?;
    let client = lab.pod_netns("client")?;
    let vip = addr("10.96.0.10:53");
    lab.wait_answered_by("UDP", &["echo-a", "echo-b"], || udp_ask(&client, vip))?;
    let sock = in_netns(&client, move || -> Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.connect(vip)?;
        Ok(s)
    })??;
    let ask = udp_try_on;
    let mine = ask(&sock).context("first UDP answer")?;
    for _ in 0..5 {
        assert_eq!(ask(&sock).as_deref(), Some(mine.as_str()), "the flow keeps its backend");
    }
    let other = if mine == "echo-a" { "echo-b" } else { "echo-a" };
    // Its backend turns unready (it keeps running and would still answer).
    std::fs::write(readiness_file(tag, &mine), b"")?;
    lab.wait_until(Duration::from_secs(10), "backend not ready", || {
        Ok(lab.pod(&mine).is_some_and(|p| !p.ready))
    })?;
    let (took, before) = udp_wait_moved(&sock, other, Duration::from_secs(1))
        .with_context(|| format!("after {mine} was taken out\n{}", lab.logs()))?;
    println!("moved to {other} after {took:?} ({} datagrams before)", before.len());
    for _ in 0..5 {
        assert_eq!(ask(&sock).as_deref(), Some(other), "and stays there");
    }
    Ok(())
}

#[test]
fn session_affinity_holds_for_new_connections_and_expires() -> Result<()> {
    let tag = "affinity";
    let aff = sticky_service(2);
    let names = ["echo-a", "echo-b", "echo-c", "echo-d"];
    let lab = lab(tag, &names, &[("sticky.yaml", aff)])?;
    let client = lab.pod_netns("client")?;
    let vip = addr("10.96.0.50:80");
    lab.wait_until(Duration::from_secs(10), "all backends programmed", || {
        Ok(split(&client, 40, |ns| tcp_ask(ns, addr("10.96.0.10:80")))?.len() == 4)
    })?;
    let json = lab.ferry(&["svc", "list", "-o", "json"])?;
    assert!(
        json.contains("\"affinity_timeout_seconds\": 2"),
        "svc list shows the timeout:\n{json}"
    );
    let seen = split(&client, 50, |ns| tcp_ask(ns, vip))?;
    assert_eq!(seen.len(), 1, "50 new connections of one client, one backend: {seen:?}");
    let mut current = seen.keys().next().cloned().context("a backend")?;

    // No traffic for longer than the timeout: the next connection is balanced
    // anew. 3 of 4 backends are a move; bounded rounds keep this from flaking
    // ((1/4)^8 that it never moves while expiry works).
    let mut moved = false;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(2600));
        let now = tcp_ask(&client, vip)?;
        if now != current {
            moved = true;
            current = now;
            break;
        }
    }
    assert!(moved, "affinity never expired after 2 s without traffic");
    // And it holds again for the new backend.
    let seen = split(&client, 20, |ns| tcp_ask(ns, vip))?;
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec![&current], "{seen:?}");

    // The backend stops being usable: new connections leave it at once.
    std::fs::write(readiness_file(tag, &current), b"")?;
    lab.wait_until(Duration::from_secs(10), "backend not ready", || {
        Ok(lab.pod(&current).is_some_and(|p| !p.ready))
    })?;
    lab.wait_until(Duration::from_secs(2), "affinity moves off the unready backend", || {
        Ok(tcp_ask(&client, vip)? != current)
    })?;
    let seen = split(&client, 20, |ns| tcp_ask(ns, vip))?;
    assert!(!seen.contains_key(&current) && seen.len() == 1, "{seen:?}");
    Ok(())
}

#[test]
fn connections_to_a_terminating_endpoint_continue_and_it_is_the_last_resort() -> Result<()> {
    let opts = LabOptions::new("graceful")
        .manifest("service.yaml", &echo_service("echo", "echo", "10.96.0.10"))
        .manifest("client.yaml", &client_pod("client"))
        .manifest("echo-a.yaml", &draining_echo_pod("echo-a", "echo", 20))
        .manifest("echo-b.yaml", &draining_echo_pod("echo-b", "echo", 20));
    let lab = Lab::start(opts)?;
    lab.wait_ready(&["echo-a", "echo-b", "client"], READY)?;
    let client = lab.pod_netns("client")?;
    let vip = addr("10.96.0.10:80");
    lab.wait_until(Duration::from_secs(10), "both backends answer", || {
        Ok(split(&client, 30, |ns| tcp_ask(ns, vip))?.len() == 2)
    })?;
    let mut session = TcpSession::connect(&client, vip)?;
    let mine = session.ask()?;
    let other = if mine == "echo-a" { "echo-b" } else { "echo-a" };

    // Delete the Pod: it terminates with 20 s of grace.
    lab.remove_manifest(&format!("{mine}.yaml"))?;
    lab.wait_until(Duration::from_secs(10), "terminating", || {
        Ok(lab.pod(&mine).is_some_and(|p| p.terminating))
    })?;
    lab.wait_until(Duration::from_secs(5), "new connections avoid it", || {
        Ok(!split(&client, 10, |ns| tcp_ask(ns, vip))?.contains_key(&mine))
    })?;
    let new = split(&client, 20, |ns| tcp_ask(ns, vip))?;
    assert_eq!(
        new.keys().collect::<Vec<_>>(),
        vec![other],
        "new connections go to the ready one: {new:?}"
    );
    // The long-running request keeps going on the terminating endpoint.
    for i in 0..15 {
        assert_eq!(
            session
                .ask()
                .with_context(|| format!("request {i} on the established connection"))?,
            mine
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // No ready endpoint left: the serving+terminating ones take new connections.
    lab.remove_manifest(&format!("{other}.yaml"))?;
    lab.wait_until(Duration::from_secs(10), "both terminating", || {
        Ok(lab.pod(other).is_some_and(|p| p.terminating))
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let fallback = split(&client, 20, |ns| tcp_ask(ns, vip))?;
    let both: BTreeSet<&str> = ["echo-a", "echo-b"].into();
    assert!(fallback.keys().all(|k| both.contains(k.as_str())), "{fallback:?}");
    assert_eq!(session.ask()?, mine, "the established connection still works");
    Ok(())
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() -> Result<()> {
    let lab = lab("itp", &["echo-a"], &[])?;
    let client = lab.pod_netns("client")?;
    let ip = lab.pod("echo-a").and_then(|p| p.pod_ip).context("echo-a has an IP")?;
    for (file, yaml) in itp_services(ip, &lab.node) {
        lab.write_manifest(&file, &yaml)?;
    }
    for a in ["10.96.0.61:80", "10.96.0.62:80", "10.96.0.63:80"] {
        wait_programmed(&lab, a)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tcp_ask(&client, addr("10.96.0.61:80"))?,
        "echo-a",
        "Local with a local endpoint"
    );
    assert_eq!(
        tcp_ask(&client, addr("10.96.0.63:80"))?,
        "echo-a",
        "Cluster uses any node's endpoint"
    );
    let (err, took) = tcp_connect(&client, addr("10.96.0.62:80"))?;
    assert_eq!(
        err,
        Some(ErrorKind::ConnectionRefused),
        "Local without a local endpoint is rejected"
    );
    assert!(took < Duration::from_millis(100), "{took:?}");
    Ok(())
}

#[test]
fn named_target_ports_resolve_per_pod_and_tcp_and_udp_share_a_port() -> Result<()> {
    let pod = |name: &str, tcp: u16, udp: u16| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: dns}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: dns
      command: ["ferry", "echo", "--tcp", "{tcp}", "--udp", "{udp}"]
      ports:
        - {{name: dns-tcp, containerPort: {tcp}, protocol: TCP}}
        - {{name: dns, containerPort: {udp}, protocol: UDP}}
      readinessProbe:
        tcpSocket: {{port: dns-tcp}}
        periodSeconds: 1
"#
        )
    };
    let svc = r#"apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  clusterIP: 10.96.0.70
  selector: {app: dns}
  ports:
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: dns-tcp}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
  - {name: alt, port: 8053, protocol: TCP, targetPort: dns-tcp}
"#;
    let opts = LabOptions::new("namedports")
        .manifest("dns.yaml", svc)
        .manifest("client.yaml", &client_pod("client"))
        .manifest("dns-a.yaml", &pod("dns-a", 5300, 5301))
        .manifest("dns-b.yaml", &pod("dns-b", 6300, 6301));
    let lab = Lab::start(opts)?;
    lab.wait_ready(&["dns-a", "dns-b", "client"], READY)?;
    let client = lab.pod_netns("client")?;
    let both = ["dns-a", "dns-b"];
    lab.wait_answered_by("TCP 53", &both, || tcp_ask(&client, addr("10.96.0.70:53")))?;
    lab.wait_answered_by("UDP 53", &both, || udp_ask(&client, addr("10.96.0.70:53")))?;
    lab.wait_answered_by("TCP 8053", &both, || tcp_ask(&client, addr("10.96.0.70:8053")))?;
    for (what, counts) in [
        ("TCP 53", split(&client, 60, |ns| tcp_ask(ns, addr("10.96.0.70:53")))?),
        ("UDP 53", split(&client, 60, |ns| udp_ask(ns, addr("10.96.0.70:53")))?),
        (
            "TCP 8053",
            split(&client, 60, |ns| tcp_ask(ns, addr("10.96.0.70:8053")))?,
        ),
    ] {
        assert_eq!(
            counts.keys().map(String::as_str).collect::<Vec<_>>(),
            both,
            "{what}: {counts:?}"
        );
    }
    Ok(())
}

fn echo_deployment(version: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: default}}
spec:
  replicas: 3
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}
  selector:
    matchLabels: {{app: echo}}
  template:
    metadata:
      labels: {{app: echo, version: {version}}}
    spec:
{}"#,
        indent(&draining_echo_spec(3), 6)
    )
}

#[test]
fn a_rolling_update_under_a_steady_request_stream_loses_nothing() -> Result<()> {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    };
    let opts = LabOptions::new("rolling")
        .manifest("service.yaml", &echo_service("echo", "echo", "10.96.0.10"))
        .manifest("client.yaml", &client_pod("client"))
        .manifest("echo.yaml", &echo_deployment("v1"));
    let lab = Lab::start(opts)?;
    lab.wait_ready(&["echo-0", "echo-1", "echo-2", "client"], READY)?;
    let client = lab.pod_netns("client")?;
    let vip = addr("10.96.0.10:80");
    lab.wait_until(Duration::from_secs(10), "three backends answer", || {
        Ok(split(&client, 40, |ns| tcp_ask(ns, vip))?.len() == 3)
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<Result<String, String>>>> = Arc::default();
    let stream = {
        let (stop, results, client) = (stop.clone(), results.clone(), client.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let r = tcp_ask(&client, vip).map_err(|e| format!("{e:#}"));
                results.lock().unwrap().push(r);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    lab.write_manifest("echo.yaml", &echo_deployment("v2"))?;
    let done = lab.wait_until(Duration::from_secs(90), "rollout to v2 done", || {
        let echo: Vec<_> = lab
            .pods()
            .into_iter()
            .filter(|p| p.labels.get("app").map(String::as_str) == Some("echo"))
            .collect();
        Ok(echo.len() == 3
            && echo
                .iter()
                .all(|p| p.ready && !p.terminating && p.labels.get("version").map(String::as_str) == Some("v2")))
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let _ = stream.join();
    done?;
    let results = results.lock().unwrap();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results.iter().flatten() {
        *by.entry(r.as_str()).or_default() += 1;
    }
    println!(
        "rollout took {:?}; {} requests: {by:?}; {} failed",
        started.elapsed(),
        results.len(),
        failures.len()
    );
    assert!(results.len() > 100, "the stream ran: {} requests", results.len());
    assert!(
        failures.is_empty(),
        "requests failed during the rollout: {failures:?}\n{}",
        lab.logs()
    );
    let v2: Vec<String> = lab
        .pods()
        .into_iter()
        .filter(|p| p.name.starts_with("echo-"))
        .map(|p| p.name)
        .collect();
    assert!(
        v2.iter().any(|n| by.contains_key(n.as_str())),
        "the new Pods {v2:?} answered: {by:?}"
    );
    Ok(())
}

const SOURCE_RANGES_LB_IP: &str = "203.0.113.40";

/// A LoadBalancer Service `guarded` at [`SOURCE_RANGES_LB_IP`] (NodePort 30180),
/// with `ranges` (a YAML list) as its loadBalancerSourceRanges when given.
fn guarded_service(ranges: Option<&str>) -> String {
    let ranges = ranges
        .map(|r| format!("  loadBalancerSourceRanges: {r}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: guarded, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.90
  selector: {{app: guarded}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: 30180}}
{ranges}status:
  loadBalancer:
    ingress: [{{ip: "{SOURCE_RANGES_LB_IP}"}}]
"#
    )
}

/// One request from the external namespace bound to `from`: the backend's name.
fn ask_from(c: &Cluster, from: &str, to: SocketAddr) -> Result<String> {
    TcpSession::connect_from(&c.external, addr(&format!("{from}:0")), to)?.ask()
}

#[test]
fn load_balancer_source_ranges_admit_only_clients_in_range_on_the_load_balancer_ip() -> Result<()> {
    // .200 is allowed; the invalid entry is reported and skipped.
    let c = Cluster::start(
        "lbsr",
        1,
        &[(
            "guarded.yaml".into(),
            guarded_service(Some(r#"["192.168.77.200/32", "not-a-cidr"]"#)),
        )],
        &["--nodeport-addresses", "192.168.77.0/24", "--src-ranges-map-size", "64"],
    )?;
    let node = c.nodes[0].node.clone();
    c.write_manifest(
        "guarded-1.yaml",
        &on_node(&echo_pod("guarded-1", "guarded", None), &node),
    )?;
    c.write_manifest("client.yaml", &on_node(&client_pod("client"), &node))?;
    let ext = &c.external;
    c.route_external(SOURCE_RANGES_LB_IP, 0)?;
    sys::run("ip", &["-n", ext, "addr", "add", "192.168.77.201/24", "dev", "eth0"])?;
    c.wait_ready(&["guarded-1", "client"], READY)?;
    let lb = addr(&format!("{SOURCE_RANGES_LB_IP}:80"));
    let nodeport = SocketAddr::from((node_addr(0), 30180));
    let (allowed, other) = (EXTERNAL_ADDR.to_string(), "192.168.77.201");
    c.nodes[0].wait_until(
        Duration::from_secs(15),
        "the allowed client served on the LoadBalancer IP",
        || Ok(ask_from(&c, &allowed, lb).is_ok()),
    )?;
    assert_eq!(ask_from(&c, &allowed, lb)?, "guarded-1");
    let wide = c.nodes[0].ferry(&["svc", "list", "-o", "wide"])?;
    assert_eq!(
        wide.matches("source-ranges").count(),
        1,
        "only the LoadBalancer frontend is flagged:\n{wide}"
    );
    let rows: serde_json::Value = serde_json::from_str(&c.nodes[0].ferry(&["svc", "list", "-o", "json"])?)?;
    let ranges: Vec<&serde_json::Value> = rows
        .as_array()
        .context("svc list JSON")?
        .iter()
        .filter_map(|r| r.get("source_ranges"))
        .collect();
    assert_eq!(
        ranges,
        [&serde_json::json!(["192.168.77.200/32"])],
        "svc list shows the ranges of the LoadBalancer frontend:\n{rows:#}"
    );
    // The client outside the ranges: dropped, so the connect times out (2 s).
    let started = Instant::now();
    let err = ask_from(&c, other, lb)
        .err()
        .context(".201 got through the LoadBalancer IP")?;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "bounded: {:?}",
        started.elapsed()
    );
    assert!(
        format!("{err:#}").contains("timed out"),
        "a silent drop, not a refusal: {err:#}"
    );
    // ... but the NodePort is not filtered (kube-proxy does not either).
    assert_eq!(ask_from(&c, other, nodeport)?, "guarded-1");
    // A Pod (10.244.0.x, outside the ranges) dialling the LoadBalancer IP is held to them too.
    let client = c.pod_netns("client")?;
    assert_eq!(
        tcp_connect(&client, lb)?.0,
        Some(ErrorKind::TimedOut),
        "a Pod outside the ranges"
    );
    let logs = c.nodes[0].agent_log();
    assert!(
        logs.contains("Service default/guarded: spec.loadBalancerSourceRanges[1]: \"not-a-cidr\" is not an IPv4 CIDR"),
        "the bad entry is reported with its Service and field:\n{logs}"
    );
    // The restriction is lifted: everyone gets in, the entries are gone.
    c.write_manifest("guarded.yaml", &guarded_service(None))?;
    c.nodes[0].wait_until(
        Duration::from_secs(15),
        ".201 served once the ranges are removed",
        || Ok(ask_from(&c, other, lb).is_ok_and(|name| name == "guarded-1")),
    )?;
    assert_eq!(tcp_connect(&client, lb)?.0, None, "the Pod gets in too");
    assert!(!c.nodes[0]
        .ferry(&["svc", "list", "-o", "wide"])?
        .contains("source-ranges"));
    Ok(())
}
