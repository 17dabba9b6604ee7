//! Kubernetes Service conformance (issue 19): the sig-network e2e behaviours
//! (test/e2e/network/service.go, networking.go, loadbalancer.go) and Cilium's
//! connectivity tests that Ferry's other tests do not already cover, one test per
//! behaviour, each named after the test it mirrors (in its doc comment). Real
//! agent, shim, Pods and clients in network namespaces; assertions on which
//! backend answered, or that nothing did. Nothing is restarted unless the test
//! says so: every change is a manifest rewritten under a running agent.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ferry_tests::{
    client::udp_ask_on,
    cluster::{node_addr, Cluster},
    http_get, in_netns,
    manifests::{client_pod, draining_echo_pod, echo_pod, echo_service, on_node},
    split, tcp_ask, udp_ask, Lab, LabOptions, TcpSession,
};

const READY: Duration = Duration::from_secs(60);
/// How long a change to a manifest may take to show in the dataplane.
const CONVERGE: Duration = Duration::from_secs(15);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// Whether an answer came from one of `backends`: Ok(true) when it did,
/// Ok(false) when nothing answered (refused, unreachable, timed out), an error
/// when something else answered (a wrong backend is never "not served").
fn answered_by(backends: &[&str], answer: Result<String>) -> Result<bool> {
    match answer {
        Ok(name) if backends.contains(&name.as_str()) => Ok(true),
        Ok(name) => bail!("answered by {name:?}, not one of {backends:?}"),
        Err(_) => Ok(false),
    }
}

/// `metadata:` of a Service manifest with `labels` (YAML flow mapping, may be
/// empty) added.
fn with_labels(yaml: &str, labels: &str) -> String {
    if labels.is_empty() {
        return yaml.to_string();
    }
    yaml.replacen(
        "  namespace: default\n",
        &format!("  namespace: default\n  labels: {{{labels}}}\n"),
        1,
    )
}

/// A lab with echo Pods `echo-a`, `echo-b`, a client, a Service `plain` at
/// 10.96.0.11 (never labelled: shows the agent has synced) and `extra`.
fn echo_lab(tag: &str, extra: &[(&str, String)]) -> Result<(Lab, String)> {
    let mut opts = LabOptions::new(tag)
        .manifest("plain.yaml", &echo_service("plain", "echo", "10.96.0.11"))
        .manifest("client.yaml", &client_pod("client"))
        .manifest("echo-a.yaml", &echo_pod("echo-a", "echo", None))
        .manifest("echo-b.yaml", &echo_pod("echo-b", "echo", None));
    for (file, yaml) in extra {
        opts = opts.manifest(file, yaml);
    }
    let lab = Lab::start(opts)?;
    lab.wait_ready(&["echo-a", "echo-b", "client"], READY)?;
    let client = lab.pod_netns("client")?;
    lab.wait_answered_by("plain TCP", &["echo-a", "echo-b"], || {
        tcp_ask(&client, addr("10.96.0.11:80"))
    })?;
    Ok((lab, client))
}

const ECHO: [&str; 2] = ["echo-a", "echo-b"];

/// Whether `vip` (TCP and UDP) of the labelled Service answers, from the client.
fn echo_served(client: &str) -> Result<(bool, bool)> {
    Ok((
        answered_by(&ECHO, tcp_ask(client, addr("10.96.0.10:80")))?,
        answered_by(&ECHO, udp_ask(client, addr("10.96.0.10:53")))?,
    ))
}

/// e2e service.go "should implement service.kubernetes.io/service-proxy-name"
/// and "should implement service.kubernetes.io/headless": a Service carrying
/// either label gets no frontend (TCP and UDP answer nothing while an unlabelled
/// Service on the same Pods answers), and is served again within seconds of
/// the label's removal, by the same agent process.
#[test]
fn should_implement_service_proxy_name_and_headless_labels() -> Result<()> {
    let labelled = |labels: &str| with_labels(&echo_service("echo", "echo", "10.96.0.10"), labels);
    let (mut lab, client) = echo_lab(
        "labels",
        &[("echo.yaml", labelled("service.kubernetes.io/service-proxy-name: other"))],
    )?;
    let agent = lab.agent_pid();
    for (label, value) in [("service-proxy-name", "other"), ("headless", "\"\"")] {
        let l = format!("service.kubernetes.io/{label}: {value}");
        lab.write_manifest("echo.yaml", &labelled(&l))?;
        lab.wait_until(CONVERGE, &format!("the {label} Service to stop answering"), || {
            Ok(echo_served(&client)? == (false, false))
        })?;
        // The agent has synced (the unlabelled Service answers) and still
        // programs nothing for the labelled one.
        assert!(
            answered_by(&ECHO, tcp_ask(&client, addr("10.96.0.11:80")))?,
            "the unlabelled Service answers"
        );
        assert_eq!(
            echo_served(&client)?,
            (false, false),
            "labelled {label}: TCP and UDP answer nothing"
        );
        let list = lab.ferry(&["svc", "list"])?;
        assert!(!list.contains("10.96.0.10"), "labelled {label} but programmed:\n{list}");

        lab.write_manifest("echo.yaml", &labelled(""))?;
        let start = Instant::now();
        lab.wait_answered_by_within(CONVERGE, "TCP after the label's removal", &ECHO, || {
            tcp_ask(&client, addr("10.96.0.10:80"))
        })?;
        lab.wait_answered_by_within(CONVERGE, "UDP after the label's removal", &ECHO, || {
            udp_ask(&client, addr("10.96.0.10:53"))
        })?;
        eprintln!(
            "{label}: served by both backends {:?} after the label went",
            start.elapsed()
        );
    }
    lab.check_alive()?;
    assert_eq!(lab.agent_pid(), agent, "the same agent throughout");
    Ok(())
}

/// The `web` Service of the type-change test as `kind`, selecting `app: web`
/// with TCP 80 and UDP 53 (NodePorts 30080 and 30053 when the type has them).
fn web_as(kind: &str) -> String {
    let head =
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n";
    let (spec, node_ports, status) = match kind {
        "ExternalName" => (
            "  type: ExternalName\n  externalName: web.example.org\n".to_string(),
            false,
            "",
        ),
        "ClusterIP" => ("  type: ClusterIP\n  clusterIP: 10.96.0.30\n".to_string(), false, ""),
        "NodePort" => ("  type: NodePort\n  clusterIP: 10.96.0.30\n".to_string(), true, ""),
        "LoadBalancer" => (
            "  type: LoadBalancer\n  clusterIP: 10.96.0.30\n".to_string(),
            true,
            "status:\n  loadBalancer:\n    ingress: [{ip: \"203.0.113.20\"}]\n",
        ),
        other => panic!("no Service type {other}"),
    };
    let np = |n: u16| {
        if node_ports {
            format!(", nodePort: {n}")
        } else {
            String::new()
        }
    };
    format!(
        "{head}{spec}  ports:\n    - {{name: http, port: 80, targetPort: 8080{}}}\n    - {{name: dns, port: 53, protocol: UDP, targetPort: 8080{}}}\n{status}",
        np(30080),
        np(30053)
    )
}

/// One node serving NodePorts on its underlay address, with `services`, echo
/// Pods `backends` (labelled `app: web`) and a client Pod on it, and the
/// external client routing the LoadBalancer IP to the node; once the Pods are
/// ready.
fn one_node_cluster(tag: &str, services: String, backends: &[&str]) -> Result<Cluster> {
    let c = Cluster::start(
        tag,
        1,
        &[
            ("services.yaml".into(), services),
            ("client.yaml".into(), client_pod("client")),
        ],
        &["--nodeport-addresses", "192.168.77.0/24"],
    )?;
    let n1 = c.nodes[0].node.clone();
    for b in backends {
        c.write_manifest(&format!("{b}.yaml"), &on_node(&echo_pod(b, "web", None), &n1))?;
    }
    c.route_external(LB_IP, 0)?;
    let mut pods = backends.to_vec();
    pods.push("client");
    c.wait_ready(&pods, READY)?;
    Ok(c)
}

/// What answers, from a Pod and from outside the cluster.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Reach {
    cluster_ip_tcp: bool,
    cluster_ip_udp: bool,
    node_port_tcp: bool,
    node_port_udp: bool,
    load_balancer: bool,
}

const WEB: [&str; 2] = ["web-1", "web-2"];

fn reach(c: &Cluster, client: &str) -> Result<Reach> {
    let node = node_addr(0);
    let ext = &c.external;
    Ok(Reach {
        cluster_ip_tcp: answered_by(&WEB, tcp_ask(client, addr("10.96.0.30:80")))?,
        cluster_ip_udp: answered_by(&WEB, udp_ask(client, addr("10.96.0.30:53")))?,
        node_port_tcp: answered_by(&WEB, tcp_ask(ext, SocketAddr::from((node, 30080))))?,
        node_port_udp: answered_by(&WEB, udp_ask(ext, SocketAddr::from((node, 30053))))?,
        load_balancer: answered_by(&WEB, tcp_ask(ext, SocketAddr::from((LB_IP, 80))))?,
    })
}

/// e2e service.go "should be able to change the type from ExternalName to
/// ClusterIP", "... from ClusterIP to ExternalName", "... from NodePort to
/// ExternalName", "should be able to update NodePorts with two same port
/// numbers but different protocols" and loadbalancer.go "should be able to
/// change the type and ports of a TCP service": one Service goes ExternalName →
/// ClusterIP → NodePort → LoadBalancer → ClusterIP → ExternalName in place;
/// after each change the ClusterIP (from a Pod), the NodePorts and the
/// LoadBalancer IP (from outside) answer exactly when the type has them: a
/// released NodePort answers nothing.
#[test]
fn should_be_able_to_change_the_type_in_place_and_release_node_ports() -> Result<()> {
    let c = one_node_cluster("types", web_as("ExternalName"), &WEB)?;
    let client = c.pod_netns("client")?;
    let lab = &c.nodes[0];
    let agent = lab.agent_pid();
    let nothing = Reach {
        cluster_ip_tcp: false,
        cluster_ip_udp: false,
        node_port_tcp: false,
        node_port_udp: false,
        load_balancer: false,
    };
    let cluster_ip = Reach {
        cluster_ip_tcp: true,
        cluster_ip_udp: true,
        ..nothing
    };
    let node_port = Reach {
        node_port_tcp: true,
        node_port_udp: true,
        ..cluster_ip
    };
    let load_balancer = Reach {
        load_balancer: true,
        ..node_port
    };
    for (kind, want) in [
        ("ExternalName", nothing),
        ("ClusterIP", cluster_ip),
        ("NodePort", node_port),
        ("LoadBalancer", load_balancer),
        ("ClusterIP", cluster_ip),
        ("ExternalName", nothing),
    ] {
        c.write_manifest("services.yaml", &web_as(kind))?;
        let start = Instant::now();
        let mut last = None;
        lab.wait_until(CONVERGE, &format!("{kind}: {want:?}"), || {
            let now = reach(&c, &client)?;
            last = Some(now);
            Ok(now == want)
        })?;
        eprintln!("{kind}: {want:?} after {:?}", start.elapsed());
        // Both backends answer where something should.
        if want.cluster_ip_tcp {
            lab.wait_answered_by(&format!("{kind} ClusterIP"), &WEB, || {
                tcp_ask(&client, addr("10.96.0.30:80"))
            })?;
        }
        if want.node_port_tcp {
            lab.wait_answered_by(&format!("{kind} NodePort"), &WEB, || {
                tcp_ask(&c.external, SocketAddr::from((node_addr(0), 30080)))
            })?;
        }
        // And it stays so (not one lucky probe).
        assert_eq!(reach(&c, &client)?, want, "{kind}, again");
        let list = lab.ferry(&["svc", "list"])?;
        assert_eq!(
            list.contains(":30080"),
            want.node_port_tcp,
            "{kind}: NodePort 30080 in svc list:\n{list}"
        );
    }
    for l in &c.nodes {
        assert_eq!(l.agent_pid(), agent, "no restart");
    }
    Ok(())
}

/// `GET /` on node `i`'s healthCheckNodePort 32000 from the external client:
/// the status and the `localEndpoints` it reports.
fn health(c: &Cluster, i: usize) -> Result<(u16, u64)> {
    let (status, body) = http_get(&c.external, SocketAddr::from((node_addr(i), 32000)), "/")?;
    let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("health check body {body:?}"))?;
    let n = v["localEndpoints"]
        .as_u64()
        .with_context(|| format!("no localEndpoints in {body}"))?;
    Ok((status, n))
}

/// Which backends answer `n` new connections from the external client to `to`.
fn external_split(c: &Cluster, to: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>> {
    split(&c.external, n, |ns| tcp_ask(ns, to))
}

/// e2e service.go "should fallback to local terminating endpoints when there
/// are no ready endpoints with externalTrafficPolicy=Local" and "should
/// fallback to terminating endpoints when there are no ready endpoints with
/// externallTrafficPolicy=Cluster" (sic), with loadbalancer.go's health check
/// of ETP=Local: `web-1` (node 1) drains for 30 s after its deletion, `web-2`
/// (node 2) stays ready. Through node 1, the Local Service falls back to its
/// only local endpoint, terminating (never to node 2's ready one), while its
/// healthCheckNodePort answers 503 with 0 local endpoints so load balancers
/// drain the node; the Cluster Service prefers the ready endpoint on node 2.
#[test]
fn should_fallback_to_terminating_endpoints_only_without_ready_ones_for_both_traffic_policies() -> Result<()> {
    let svc = |name: &str, policy: &str, node_port: u16, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  externalTrafficPolicy: {policy}\n{extra}  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {node_port}}}]\n"
        )
    };
    let services = format!(
        "{}---\n{}",
        svc("local", "Local", 30080, "  healthCheckNodePort: 32000\n"),
        svc("cluster", "Cluster", 30081, "")
    );
    let c = Cluster::start(
        "term",
        2,
        &[("web.yaml".into(), services)],
        &["--nodeport-addresses", "192.168.77.0/24"],
    )?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    c.write_manifest("web-1.yaml", &on_node(&draining_echo_pod("web-1", "web", 30), &n1))?;
    c.write_manifest("web-2.yaml", &on_node(&echo_pod("web-2", "web", None), &n2))?;
    c.wait_ready(&["web-1", "web-2"], READY)?;
    let lab = &c.nodes[0];
    let local = SocketAddr::from((node_addr(0), 30080));
    let cluster = SocketAddr::from((node_addr(0), 30081));
    lab.wait_answered_by("Local via node 1", &["web-1"], || tcp_ask(&c.external, local))?;
    lab.wait_answered_by("Cluster via node 1", &WEB, || tcp_ask(&c.external, cluster))?;
    lab.wait_until(CONVERGE, "health checks 200 on both nodes", || {
        Ok(health(&c, 0).is_ok_and(|h| h == (200, 1)) && health(&c, 1).is_ok_and(|h| h == (200, 1)))
    })?;
    let seen = external_split(&c, local, 20)?;
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["web-1"],
        "Local: the local endpoint only: {seen:?}"
    );

    // Delete web-1 (from every node's manifests): it terminates for 30 s,
    // still serving.
    c.remove_manifest("web-1.yaml")?;
    lab.wait_until(CONVERGE, "web-1 terminating", || {
        Ok(lab.pod("web-1").is_some_and(|p| p.terminating))
    })?;
    lab.wait_until(
        CONVERGE,
        "node 1's health check to report no ready local endpoint",
        || Ok(health(&c, 0).is_ok_and(|h| h == (503, 0))),
    )?;
    lab.wait_until(CONVERGE, "Cluster to leave the terminating endpoint", || {
        Ok(!external_split(&c, cluster, 10)?.contains_key("web-1"))
    })?;
    let local_seen = external_split(&c, local, 20)?;
    let cluster_seen = external_split(&c, cluster, 20)?;
    let (h1, h2) = (health(&c, 0)?, health(&c, 1)?);
    assert!(
        lab.pod("web-1").is_some_and(|p| p.terminating),
        "web-1 still terminating while measured"
    );
    assert_eq!(
        local_seen.keys().collect::<Vec<_>>(),
        ["web-1"],
        "Local, no ready local endpoint: the local terminating one, never node 2's: {local_seen:?}"
    );
    assert_eq!(
        cluster_seen.keys().collect::<Vec<_>>(),
        ["web-2"],
        "Cluster: the ready endpoint only: {cluster_seen:?}"
    );
    assert_eq!(h1, (503, 0), "node 1: only a terminating local endpoint");
    assert_eq!(h2, (200, 1), "node 2: its ready endpoint");
    Ok(())
}

/// e2e service.go "should create endpoints for unready pods"
/// (publishNotReadyAddresses): a Pod whose readiness probe fails is served by
/// a Service that publishes not-ready addresses, and not by one that does not.
/// In standalone mode the agent plays the EndpointSlice controller over the
/// shim's Pod records.
#[test]
fn should_create_endpoints_for_unready_pods() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-conf-unready-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let never = dir.join("never-ready");
    std::fs::write(&never, b"")?;
    let svc = |name: &str, ip: &str, publish: bool| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  publishNotReadyAddresses: {publish}\n  selector: {{app: unready}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
        )
    };
    let opts = LabOptions::new("unready")
        .scratch_dir(&dir)
        .manifest("client.yaml", &client_pod("client"))
        .manifest("published.yaml", &svc("published", "10.96.0.12", true))
        .manifest("unpublished.yaml", &svc("unpublished", "10.96.0.13", false))
        .manifest(
            "unready.yaml",
            &echo_pod("unready", "unready", Some(&never.to_string_lossy())),
        );
    let lab = Lab::start(opts)?;
    lab.wait_ready(&["client"], READY)?;
    lab.wait_until(READY, "the unready Pod running with an IP", || {
        Ok(lab
            .pod("unready")
            .is_some_and(|p| p.phase == "Running" && p.pod_ip.is_some()))
    })?;
    let client = lab.pod_netns("client")?;
    lab.wait_answered_by("the published Service", &["unready"], || {
        tcp_ask(&client, addr("10.96.0.12:80"))
    })?;
    assert!(
        lab.pod("unready").is_some_and(|p| !p.ready),
        "the Pod is still not ready"
    );
    let seen = split(&client, 10, |ns| tcp_ask(ns, addr("10.96.0.12:80")))?;
    assert_eq!(seen.get("unready"), Some(&10), "{seen:?}");
    let list = lab.ferry(&["svc", "list"])?;
    assert!(
        list.contains("10.96.0.13:80"),
        "the unpublished Service is programmed:\n{list}"
    );
    assert!(
        tcp_ask(&client, addr("10.96.0.13:80")).is_err(),
        "a Service that does not publish them has no endpoint"
    );
    Ok(())
}

/// A Service `multi` at 10.96.0.14 selecting the echo Pods, with TCP and UDP
/// on each of the ports 8001-8010 (20 ports), named `{prefix}-tcp-N` and
/// `{prefix}-udp-N`.
fn multi_port_service(prefix: &str) -> String {
    let mut ports = String::new();
    for n in 1..=10 {
        for proto in ["TCP", "UDP"] {
            let lower = proto.to_lowercase();
            ports.push_str(&format!(
                "    - {{name: {prefix}-{lower}-{n}, port: {}, protocol: {proto}, targetPort: 8080}}\n",
                8000 + n
            ));
        }
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: multi, namespace: default}}\nspec:\n  clusterIP: 10.96.0.14\n  selector: {{app: echo}}\n  ports:\n{ports}"
    )
}

/// e2e service.go "should serve multiport endpoints from pods" and "should be
/// able to update service type to NodePort listening on same port number but
/// different protocol", at scale: one Service with 20 ports, TCP and UDP on
/// the same ten numbers, every one answered by both backends; then every port
/// renamed in place: an established connection keeps its backend and every
/// port is still answered.
#[test]
fn should_serve_multiport_endpoints_with_tcp_and_udp_on_one_port_and_survive_a_rename() -> Result<()> {
    let (lab, client) = echo_lab("multiport", &[("multi.yaml", multi_port_service("a"))])?;
    let all_answer = |what: &str| -> Result<()> {
        for n in 1..=10u16 {
            let to = SocketAddr::from(([10, 96, 0, 14], 8000 + n));
            lab.wait_answered_by(&format!("{what} TCP {to}"), &ECHO, || tcp_ask(&client, to))?;
            lab.wait_answered_by(&format!("{what} UDP {to}"), &ECHO, || udp_ask(&client, to))?;
        }
        Ok(())
    };
    all_answer("before the rename")?;
    let list = lab.ferry(&["svc", "list"])?;
    assert_eq!(list.matches("10.96.0.14:").count(), 20, "20 frontends:\n{list}");
    assert!(list.contains("a-udp-7"), "port names in svc list:\n{list}");

    let mut held = TcpSession::connect(&client, addr("10.96.0.14:8005"))?;
    let backend = held.ask()?;
    lab.write_manifest("multi.yaml", &multi_port_service("b"))?;
    lab.wait_until(CONVERGE, "the renamed ports in svc list", || {
        let list = lab.ferry(&["svc", "list"])?;
        Ok(list.contains("b-udp-7") && !list.contains("a-udp-7"))
    })?;
    for i in 0..5 {
        assert_eq!(
            held.ask().with_context(|| format!("request {i} after the rename"))?,
            backend,
            "the same backend"
        );
    }
    all_answer("after the rename")?;
    assert_eq!(held.ask()?, backend, "still the same backend");
    Ok(())
}

/// The `sticky` Service: NodePort 30080 over `app: web`, with ClientIP
/// affinity of `timeout` seconds, or none.
fn sticky(timeout: Option<u32>) -> String {
    let affinity = match timeout {
        Some(t) => {
            format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n")
        }
        None => "  sessionAffinity: None\n".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.40\n  selector: {{app: web}}\n{affinity}  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]\n"
    )
}

/// e2e service.go "should have session affinity work for service with type
/// clusterIP", "... for NodePort service", "should be able to switch session
/// affinity for service with type clusterIP", "... for NodePort service" and
/// "should have session affinity timeout work for NodePort service": three
/// backends; with ClientIP affinity 15 consecutive connections of a Pod (to
/// the ClusterIP) and of an external client (to the NodePort) each reach one
/// backend; after the timeout (1 s, the least the API allows, plus margin) of
/// silence the choice is made afresh (over bounded rounds more than one backend
/// is chosen); switched off, new connections spread again; switched on, they
/// stick again. The agent is never restarted.
#[test]
fn should_have_session_affinity_work_switch_and_time_out_for_clusterip_and_nodeport() -> Result<()> {
    let backends = ["web-1", "web-2", "web-3"];
    let c = one_node_cluster("affinity", sticky(None), &backends)?;
    let lab = &c.nodes[0];
    let pod = c.pod_netns("client")?;
    let vip = addr("10.96.0.40:80");
    let node_port = SocketAddr::from((node_addr(0), 30080));
    let clients = [(pod.as_str(), vip), (c.external.as_str(), node_port)];
    let spread = |what: &str| -> Result<()> {
        for (ns, to) in clients {
            lab.wait_answered_by(&format!("{what}: {to}"), &backends, || tcp_ask(ns, to))?;
        }
        Ok(())
    };
    let sticks = |ns: &str, to: SocketAddr| -> Result<bool> { Ok(split(ns, 15, |ns| tcp_ask(ns, to))?.len() == 1) };
    spread("without affinity")?;

    for round in ["on", "on again"] {
        c.write_manifest("services.yaml", &sticky(Some(1)))?;
        for (ns, to) in clients {
            lab.wait_until(
                CONVERGE,
                &format!("affinity {round}: 15 connections to {to}, one backend"),
                || sticks(ns, to),
            )?;
            for _ in 0..3 {
                let seen = split(ns, 15, |ns| tcp_ask(ns, to))?;
                assert_eq!(
                    seen.len(),
                    1,
                    "affinity {round}, {to}: 15 consecutive connections, one backend: {seen:?}"
                );
            }
        }
        let json = lab.ferry(&["svc", "list", "-o", "json"])?;
        assert!(
            json.contains("\"affinity_timeout_seconds\": 1"),
            "svc list shows the timeout:\n{json}"
        );

        // Silence for longer than the timeout: each next connection is
        // balanced afresh. Any one round stays with 1/3; 12 rounds all
        // staying is (1/3)^11 while expiry works, never when it does not.
        let mut chosen = BTreeSet::new();
        for _ in 0..12 {
            std::thread::sleep(Duration::from_millis(2500));
            chosen.insert(tcp_ask(&c.external, node_port)?);
            if chosen.len() > 1 {
                break;
            }
        }
        assert!(
            chosen.len() > 1,
            "affinity {round} never expired after 1 s of silence: {chosen:?}"
        );

        c.write_manifest("services.yaml", &sticky(None))?;
        spread("affinity switched off")?;
    }
    Ok(())
}

/// One UDP datagram of `size` bytes from `netns` to `to`: the answer.
fn udp_ask_sized(netns: &str, to: SocketAddr, size: usize) -> Result<String> {
    in_netns(netns, move || -> Result<String> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.connect(to)?;
        let mut payload = vec![b'x'; size];
        payload[size - 1] = b'\n';
        assert_eq!(s.send(&payload)?, size, "sent whole");
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).context("no UDP answer")?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    })?
}

/// A client's namespace and the TCP and UDP addresses of a Service it reaches.
type Path = (String, SocketAddr, SocketAddr);

/// The `web` NodePort Service (TCP 80/30080, UDP 53/30053) on one node with
/// `web-1` and `web-2`, and a client Pod: the Pod's and the external client's
/// namespaces with the ClusterIP and the NodePort (TCP, UDP) each reaches,
/// once every backend answers small requests on each.
fn large_request_cluster(tag: &str) -> Result<(Cluster, Vec<Path>)> {
    let c = one_node_cluster(tag, web_as("NodePort"), &WEB)?;
    let paths = vec![
        (c.pod_netns("client")?, addr("10.96.0.30:80"), addr("10.96.0.30:53")),
        (
            c.external.clone(),
            SocketAddr::from((node_addr(0), 30080)),
            SocketAddr::from((node_addr(0), 30053)),
        ),
    ];
    for (ns, tcp, udp) in &paths {
        c.nodes[0].wait_answered_by(&format!("small requests to {tcp}"), &WEB, || tcp_ask(ns, *tcp))?;
        c.nodes[0].wait_answered_by(&format!("small datagrams to {udp}"), &WEB, || udp_ask(ns, *udp))?;
    }
    Ok((c, paths))
}

/// e2e networking.go "should be able to handle large requests: http",
/// through a ClusterIP from a Pod and a NodePort from outside: HTTP requests of
/// over 2,000 bytes (more than one segment on the 1500-byte MTU) reach a
/// backend, whose answer comes back.
#[test]
fn should_be_able_to_handle_large_requests_http() -> Result<()> {
    let (_c, paths) = large_request_cluster("largetcp")?;
    let path = format!("/{}", "p".repeat(2000));
    for (ns, tcp, _) in &paths {
        let seen = split(ns, 10, |ns| {
            let (status, body) = http_get(ns, *tcp, &path)?;
            anyhow::ensure!(status == 200, "HTTP {status}");
            Ok(body.trim().to_string())
        })?;
        assert!(
            seen.keys().all(|k| WEB.contains(&k.as_str())),
            "2,000-byte HTTP requests to {tcp}: {seen:?}"
        );
    }
    Ok(())
}

/// e2e networking.go "should be able to handle large requests: udp", through
/// a ClusterIP from a Pod and a NodePort from outside: 1,400-byte datagrams
/// (one packet) are answered, and 2,000-byte ones (two IPv4 fragments, the
/// second without the UDP header: the dataplane's fragment tracking) too.
#[test]
fn should_be_able_to_handle_large_requests_udp() -> Result<()> {
    let (_c, paths) = large_request_cluster("largeudp")?;
    for (ns, _, udp) in &paths {
        for size in [1400, 2000] {
            let seen = split(ns, 10, |ns| {
                udp_ask_sized(ns, *udp, size).with_context(|| format!("{size} bytes to {udp}"))
            })?;
            assert!(
                seen.keys().all(|k| WEB.contains(&k.as_str())),
                "{size}-byte datagrams to {udp}: {seen:?}"
            );
        }
    }
    Ok(())
}

/// Ferry's own rule (Kubernetes' strict IP validation, KEP-4858; e2e has no
/// test): a clusterIP spelled with leading zeros ("10.96.0.010": 10.96.0.10 to
/// Go's sloppy parser, 10.96.0.8 to inet_aton) is refused with an error naming
/// the Service and the field; neither reading is served, the other Services
/// are; once spelled plainly it is served, by the same agent.
#[test]
fn a_cluster_ip_with_leading_zeros_is_refused_by_name_and_never_misread() -> Result<()> {
    let octal = |ip: &str| {
        echo_service("odd", "echo", ip)
            .replace("clusterIP: ", "clusterIP: \"")
            .replace("\n  selector", "\"\n  selector")
    };
    let (lab, client) = echo_lab("oddip", &[("odd.yaml", octal("10.96.0.010"))])?;
    lab.wait_until(CONVERGE, "the error in the agent's log", || {
        Ok(lab
            .agent_log()
            .contains("Service default/odd: spec.clusterIP: \"10.96.0.010\": not an IPv4 address: leading zeros"))
    })?;
    let list = lab.ferry(&["svc", "list"])?;
    for reading in ["10.96.0.10:", "10.96.0.8:"] {
        assert!(!list.contains(reading), "{reading} programmed:\n{list}");
    }
    for reading in ["10.96.0.10:80", "10.96.0.8:80"] {
        assert!(
            !answered_by(&ECHO, tcp_ask(&client, addr(reading)))?,
            "{reading} answers"
        );
    }
    assert!(
        answered_by(&ECHO, tcp_ask(&client, addr("10.96.0.11:80")))?,
        "the other Service answers"
    );
    lab.write_manifest("odd.yaml", &octal("10.96.0.10"))?;
    lab.wait_answered_by_within(CONVERGE, "the plainly spelled ClusterIP", &ECHO, || {
        tcp_ask(&client, addr("10.96.0.10:80"))
    })?;
    Ok(())
}

/// conntrack.go "should be able to preserve UDP traffic when server pod
/// cycles for a NodePort service": an external client sends from one fixed
/// source port to a NodePort; its backend Pod is deleted and another one
/// created; the same socket is answered by the new Pod within seconds (the
/// stale flow to the deleted Pod is not kept).
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_nodeport_service() -> Result<()> {
    let c = Cluster::start(
        "udpcycle",
        1,
        &[("web.yaml".into(), web_as("NodePort"))],
        &["--nodeport-addresses", "192.168.77.0/24"],
    )?;
    let n1 = c.nodes[0].node.clone();
    c.write_manifest("web-1.yaml", &on_node(&echo_pod("web-1", "web", None), &n1))?;
    c.wait_ready(&["web-1"], READY)?;
    let lab = &c.nodes[0];
    let to = SocketAddr::from((node_addr(0), 30053));
    let sock = in_netns(&c.external, move || -> Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:54321")?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.connect(to)?;
        Ok(s)
    })??;
    lab.wait_until(CONVERGE, "web-1 answering the fixed-port client", || {
        Ok(udp_ask_on(&sock)? == "web-1")
    })?;

    c.remove_manifest("web-1.yaml")?;
    c.write_manifest("web-2.yaml", &on_node(&echo_pod("web-2", "web", None), &n1))?;
    // The client keeps sending while the Pods are swapped.
    let mut before = BTreeMap::<String, usize>::new();
    let mut ask = || {
        let a = udp_ask_on(&sock).unwrap_or_else(|_| "(nothing)".into());
        *before.entry(a.clone()).or_default() += 1;
        a
    };
    lab.wait_until(READY, "web-2 ready", || {
        ask();
        Ok(lab.pod("web-2").is_some_and(|p| p.ready))
    })?;
    let since = Instant::now();
    lab.wait_until(
        Duration::from_secs(5),
        "web-2 answering the same socket within 5 s of turning ready",
        || Ok(ask() == "web-2"),
    )?;
    eprintln!(
        "web-2 answered the fixed-port socket {:?} after turning ready; before: {before:?}",
        since.elapsed()
    );
    for _ in 0..5 {
        assert_eq!(udp_ask_on(&sock)?, "web-2", "and keeps answering");
    }
    Ok(())
}

/// (next sequence number to send, next one expected) of a connected socket,
/// read in TCP repair mode (as CRIU does; needs CAP_NET_ADMIN), which is left
/// at once: the connection carries on.
fn tcp_sequence_numbers(stream: &std::net::TcpStream) -> Result<(u32, u32)> {
    use std::os::fd::AsRawFd as _;
    const TCP_REPAIR: libc::c_int = 19;
    const TCP_REPAIR_QUEUE: libc::c_int = 20;
    const TCP_QUEUE_SEQ: libc::c_int = 21;
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    let fd = stream.as_raw_fd();
    let set = |opt: libc::c_int, v: libc::c_int| -> Result<()> {
        // SAFETY: setsockopt on a socket we own, with an int-sized value.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&v as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        anyhow::ensure!(rc == 0, "setsockopt({opt}, {v}): {}", std::io::Error::last_os_error());
        Ok(())
    };
    let seq = |queue: libc::c_int| -> Result<u32> {
        set(TCP_REPAIR_QUEUE, queue)?;
        let mut v: u32 = 0;
        let mut len = size_of::<u32>() as libc::socklen_t;
        // SAFETY: getsockopt into a u32 of the length given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                TCP_QUEUE_SEQ,
                (&mut v as *mut u32).cast(),
                &mut len,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "getsockopt(TCP_QUEUE_SEQ): {}",
            std::io::Error::last_os_error()
        );
        Ok(v)
    };
    set(TCP_REPAIR, 1)?;
    let seqs = seq(TCP_SEND_QUEUE).and_then(|snd| Ok((snd, seq(TCP_RECV_QUEUE)?)));
    set(TCP_REPAIR, 0)?;
    seqs
}

const ACK: u8 = 0x10;
const RST_ACK: u8 = 0x14;

/// Sends one bare TCP segment (`flags`, no payload) from `netns` through a
/// raw socket: the kernel adds the IPv4 header, from `from`'s address (the
/// namespace's own); the TCP checksum is computed here.
fn inject_tcp(netns: &str, from: SocketAddr, to: SocketAddr, seq: u32, ack: u32, flags: u8) -> Result<()> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (from, to) else {
        bail!("IPv4 only")
    };
    let mut seg = [0u8; 20];
    seg[0..2].copy_from_slice(&src.port().to_be_bytes());
    seg[2..4].copy_from_slice(&dst.port().to_be_bytes());
    seg[4..8].copy_from_slice(&seq.to_be_bytes());
    seg[8..12].copy_from_slice(&ack.to_be_bytes());
    seg[12] = 5 << 4; // data offset: 5 words
    seg[13] = flags;
    seg[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        b.chunks(2)
            .for_each(|c| sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
    };
    add(&src.ip().octets());
    add(&dst.ip().octets());
    add(&[0, libc::IPPROTO_TCP as u8, 0, seg.len() as u8]);
    add(&seg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    seg[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    in_netns(netns, move || -> Result<()> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::TCP))?;
        s.send_to(&seg, &SocketAddr::from((*dst.ip(), 0)).into())?;
        Ok(())
    })?
}

/// conntrack.go "proxy implementation should not be vulnerable to the invalid
/// conntrack state bug": out-of-window segments of an established connection
/// to a ClusterIP, one from the backend towards the client (kube-proxy's case:
/// left untranslated, the client would answer it with an RST that the backend
/// accepts) and one from the client towards the Service, must not reset the
/// connection. The client's sequence numbers are read from its socket, so the
/// stray segment's ack is exactly what the backend would accept in an RST: the
/// test fails if the dataplane leaves the backend's segment untranslated.
#[test]
fn proxy_implementation_should_not_be_vulnerable_to_the_invalid_conntrack_state_bug() -> Result<()> {
    let (lab, client) = echo_lab("invalid", &[("echo.yaml", echo_service("echo", "echo", "10.96.0.10"))])?;
    let vip = addr("10.96.0.10:80");
    lab.wait_answered_by("the Service", &ECHO, || tcp_ask(&client, vip))?;
    let mut session = TcpSession::connect(&client, vip)?;
    let backend = session.ask()?;
    let local = session.stream().local_addr()?;
    let backend_addr = SocketAddr::from((lab.pod(&backend).and_then(|p| p.pod_ip).context("backend IP")?, 8080));
    let backend_ns = lab.pod_netns(&backend)?;
    for round in 0..3u32 {
        let (snd, rcv) = tcp_sequence_numbers(session.stream())?;
        // Far outside the client's receive window, ack exactly the client's
        // next byte: what the backend would expect.
        inject_tcp(&backend_ns, backend_addr, local, rcv.wrapping_add(1 << 30), snd, ACK)?;
        // And the client's own stray segment towards the Service.
        inject_tcp(&client, local, vip, snd.wrapping_add(1 << 30), rcv, ACK)?;
        // The stray segments are handled (or answered) by now: a round trip
        // on the connection itself comes after them.
        assert_eq!(
            session
                .ask()
                .with_context(|| format!("round {round}: the connection after stray segments"))?,
            backend,
            "round {round}: the same backend"
        );
    }
    // Still open after a pause (an RST would have closed it by now).
    lab.wait_until(Duration::from_secs(2), "a request on the same connection", || {
        Ok(session.ask()? == backend)
    })?;

    // The control: what the client sends when it gets the backend's segment
    // untranslated (from an address it has no connection with) is an RST with
    // seq = that segment's ack, to the backend's own address, which the
    // dataplane leaves alone. The backend accepts it: the connection dies. So
    // the sequence numbers above were right, and the first half of the test
    // would have caught an untranslated stray segment.
    let (snd, rcv) = tcp_sequence_numbers(session.stream())?;
    inject_tcp(&client, local, backend_addr, snd, rcv, RST_ACK)?;
    lab.wait_until(
        Duration::from_secs(5),
        "the connection reset by the control RST",
        || Ok(session.ask().is_err()),
    )?;
    Ok(())
}

/// The conn-disrupt Service: `web` at 10.96.0.40, TCP 80 and UDP 53 to 8080 on
/// NodePorts 30080 and 30053, over `app: web`.
const DISRUPT_SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.40
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30053}
"#;

/// A long-lived flow of the conn-disrupt test: a TCP connection or a
/// connected UDP socket, the backend that answered it first, and why it broke
/// if it did.
struct Held {
    path: &'static str,
    sock: HeldSocket,
    backend: String,
    broken: Option<String>,
}

enum HeldSocket {
    Tcp(std::net::TcpStream),
    Udp(UdpSocket),
}

/// How long a held flow may take to answer: TCP retransmits what a moment
/// without a program might drop; a UDP datagram is sent up to three times.
const HELD_TCP_TIMEOUT: Duration = Duration::from_secs(5);
const HELD_UDP_TIMEOUT: Duration = Duration::from_secs(1);
const HELD_UDP_TRIES: usize = 3;

impl Held {
    fn send(&mut self) -> std::io::Result<()> {
        use std::io::Write as _;
        match &mut self.sock {
            HeldSocket::Tcp(s) => s.write_all(b"hello\n"),
            HeldSocket::Udp(s) => s.send(b"hello\n").map(drop),
        }
    }

    /// The answer to what [`Held::send`] sent; UDP datagrams are sent again
    /// when no answer comes (`resent` counts them).
    fn receive(&mut self, resent: &mut usize) -> Result<String> {
        use std::io::Read as _;
        match &mut self.sock {
            HeldSocket::Tcp(s) => {
                let mut line = Vec::new();
                let mut chunk = [0u8; 64];
                while !line.ends_with(b"\n") {
                    let n = s.read(&mut chunk).context("reading the answer")?;
                    if n == 0 {
                        bail!("closed by the other end");
                    }
                    line.extend_from_slice(&chunk[..n]);
                }
                Ok(String::from_utf8_lossy(&line).trim().to_string())
            }
            HeldSocket::Udp(s) => {
                let mut buf = [0u8; 256];
                for attempt in 1..=HELD_UDP_TRIES {
                    match s.recv(&mut buf) {
                        Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
                        Err(e) if attempt == HELD_UDP_TRIES => {
                            return Err(e).context(format!("no answer to {attempt} datagrams"))
                        }
                        Err(_) => {
                            *resent += 1;
                            s.send(b"hello\n")?;
                        }
                    }
                }
                unreachable!("the last attempt returns")
            }
        }
    }
}

/// One exchange on every held flow not yet broken, pipelined: a line out on
/// each, then each answer read. A flow that gets no answer, or an answer from
/// another backend than its first, is broken. Returns the UDP datagrams sent
/// again.
fn exchange(held: &mut [Held]) -> usize {
    for h in held.iter_mut().filter(|h| h.broken.is_none()) {
        if let Err(e) = h.send() {
            h.broken = Some(format!("sending: {e}"));
        }
    }
    let mut resent = 0;
    for h in held.iter_mut().filter(|h| h.broken.is_none()) {
        match h.receive(&mut resent) {
            Ok(name) if h.backend.is_empty() => h.backend = name,
            Ok(name) if name == h.backend => {}
            Ok(name) => h.broken = Some(format!("answered by {name}, not {}", h.backend)),
            Err(e) => h.broken = Some(format!("{e:#}")),
        }
    }
    resent
}

/// Opens `n` long-lived flows from `netns` to `to` (TCP connections, or
/// connected UDP sockets) and learns each one's backend.
fn hold(netns: &str, path: &'static str, to: SocketAddr, tcp: bool, n: usize) -> Result<Vec<Held>> {
    let socks = in_netns(netns, move || -> Result<Vec<HeldSocket>> {
        (0..n)
            .map(|_| {
                let sock = if tcp {
                    let s = std::net::TcpStream::connect_timeout(&to, HELD_TCP_TIMEOUT)?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(HELD_TCP_TIMEOUT))?;
                    HeldSocket::Tcp(s)
                } else {
                    let s = UdpSocket::bind("0.0.0.0:0")?;
                    s.set_read_timeout(Some(HELD_UDP_TIMEOUT))?;
                    s.connect(to)?;
                    HeldSocket::Udp(s)
                };
                Ok::<_, std::io::Error>(sock)
            })
            .enumerate()
            .map(|(i, s)| s.with_context(|| format!("{path}: opening flow {i} to {to}")))
            .collect()
    })??;
    let mut held: Vec<Held> = socks
        .into_iter()
        .map(|sock| Held {
            path,
            sock,
            backend: String::new(),
            broken: None,
        })
        .collect();
    exchange(&mut held);
    if let Some(h) = held.iter().find(|h| h.broken.is_some()) {
        bail!("{path}: a flow failed before the test began: {:?}", h.broken);
    }
    Ok(held)
}

/// Whether the agent is down: odd while it is (from the kill or stop until
/// the new one is ready), counted up at each change.
type AgentDown = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// What a stream of new connections saw.
#[derive(Debug, Default)]
struct LoadReport {
    ok: usize,
    /// Failures of attempts that overlapped no downtime of the agent.
    failed: Vec<String>,
    /// Failures of attempts made (at least partly) while the agent was down.
    failed_while_down: Vec<String>,
    /// Attempts while the agent was down, successful or not.
    while_down: usize,
    /// UDP datagrams sent again for want of an answer.
    resent: usize,
    /// The slowest successful attempt, and how many took over a second.
    slowest: Duration,
    slow: usize,
}

/// One new TCP connection or UDP socket from the calling thread's network
/// namespace to `to`: a line sent, the backend's name back.
fn new_flow(tcp: bool, to: SocketAddr, resent: &mut usize) -> Result<String> {
    let mut h = Held {
        path: "new",
        sock: if tcp {
            let s = std::net::TcpStream::connect_timeout(&to, HELD_TCP_TIMEOUT).context("connecting")?;
            s.set_read_timeout(Some(HELD_TCP_TIMEOUT))?;
            HeldSocket::Tcp(s)
        } else {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(HELD_UDP_TIMEOUT))?;
            s.connect(to)?;
            HeldSocket::Udp(s)
        },
        backend: String::new(),
        broken: None,
    };
    h.send()?;
    h.receive(resent)
}

/// New flows from `netns` at a steady rate, TCP to `tcp` and UDP to `udp` in
/// turn, every `every`, until `stop`; each must be answered by one of
/// `backends`. Runs on a thread of its own.
fn steady_load(
    netns: String,
    (tcp, udp): (SocketAddr, SocketAddr),
    backends: &'static [&'static str],
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    down: AgentDown,
) -> std::thread::JoinHandle<Result<LoadReport>> {
    use std::sync::atomic::Ordering::SeqCst;
    std::thread::spawn(move || {
        in_netns(&netns, move || {
            let mut r = LoadReport::default();
            let start = Instant::now();
            for i in 0u32.. {
                if stop.load(SeqCst) {
                    break;
                }
                let (is_tcp, to) = if i % 2 == 0 { (true, tcp) } else { (false, udp) };
                let before = down.load(SeqCst);
                let t = Instant::now();
                let result = new_flow(is_tcp, to, &mut r.resent).and_then(|name| {
                    if backends.contains(&name.as_str()) {
                        Ok(())
                    } else {
                        bail!("answered by {name:?}")
                    }
                });
                let took = t.elapsed();
                let during_downtime = before % 2 == 1 || down.load(SeqCst) != before;
                r.while_down += usize::from(during_downtime);
                match result {
                    Ok(()) => {
                        r.ok += 1;
                        r.slowest = r.slowest.max(took);
                        r.slow += usize::from(took > Duration::from_secs(1));
                    }
                    Err(e) => {
                        let what = format!("{} to {to}: {e:#}", if is_tcp { "TCP" } else { "UDP" });
                        if during_downtime {
                            r.failed_while_down.push(what);
                        } else {
                            r.failed.push(what);
                        }
                    }
                }
                // A steady rate: the next one on schedule, without catching up.
                let next = start + every * (i + 1);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            r
        })
    })
}

const DISRUPT_BACKENDS: [&str; 4] = ["web-1", "web-2", "web-3", "web-4"];

/// Waits until a round of the held flows that began after now has completed
/// (two more rounds).
fn full_round(lab: &Lab, rounds: &std::sync::atomic::AtomicUsize, what: &str) -> Result<()> {
    let now = rounds.load(std::sync::atomic::Ordering::SeqCst);
    lab.wait_until(Duration::from_secs(60), what, || {
        Ok(rounds.load(std::sync::atomic::Ordering::SeqCst) >= now + 2)
    })
}

/// `--flag value` in `args` set to `value` (added if missing).
fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
}

/// Written to the standard error as it is, not captured by the test harness:
/// the counts show in every run's log, passed or failed.
fn report(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Cilium's conn-disrupt test (its connectivity suite's "no-interrupted-
/// connections" check around an agent restart and upgrade), at scale: 4
/// backends behind one Service; 2,000 TCP connections and 200 connected UDP
/// sockets held from two client Pods to its ClusterIP, and 500 TCP + 100 UDP
/// from outside the cluster to its NodePort, each exchanging a line in turn the
/// whole time; new TCP connections and UDP sockets opened at a steady rate
/// from a Pod and from outside. Meanwhile the agent is killed with SIGKILL
/// (down for 2 s) and started again, stopped and started again, then upgraded:
/// stopped and started from another binary file, on the same pins, with
/// connection-tracking tables twice as large (the pinned tables are migrated:
/// every flow copied into new maps while the old programs still run, then the
/// programs swapped). Every held flow must keep being answered by the backend
/// that answered it first, and no new connection may fail, also while the
/// agent is down (the programs stay attached and serve from the pinned maps).
#[test]
fn conn_disrupt_no_connection_breaks_across_kill_9_restart_and_upgrade_under_load() -> Result<()> {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst},
        Arc,
    };
    // Thousands of sockets here, hundreds in each echo Pod (which inherits
    // the limit through the shim).
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) == 0 && nofile.rlim_cur < 16384 {
            nofile.rlim_cur = nofile.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &nofile);
        }
    }
    let (ct_before, ct_after) = (("65536", "32768"), ("131072", "65536"));
    let mut c = Cluster::start(
        "disrupt",
        1,
        &[
            ("web.yaml".into(), DISRUPT_SERVICE.into()),
            ("client-1.yaml".into(), client_pod("client-1")),
            ("client-2.yaml".into(), client_pod("client-2")),
        ],
        &[
            "--nodeport-addresses",
            "192.168.77.0/24",
            "--ct-map-size",
            ct_before.0,
            "--ct-any-map-size",
            ct_before.1,
        ],
    )?;
    let n1 = c.nodes[0].node.clone();
    for b in DISRUPT_BACKENDS {
        c.write_manifest(&format!("{b}.yaml"), &on_node(&echo_pod(b, "web", None), &n1))?;
    }
    let mut pods = DISRUPT_BACKENDS.to_vec();
    pods.extend(["client-1", "client-2"]);
    c.wait_ready(&pods, READY)?;
    let (vip_tcp, vip_udp) = (addr("10.96.0.40:80"), addr("10.96.0.40:53"));
    let (np_tcp, np_udp) = (
        SocketAddr::from((node_addr(0), 30080)),
        SocketAddr::from((node_addr(0), 30053)),
    );
    let clients = [c.pod_netns("client-1")?, c.pod_netns("client-2")?];
    let external = c.external.clone();
    {
        let lab = &c.nodes[0];
        for (ns, tcp, udp) in [(&clients[0], vip_tcp, vip_udp), (&external, np_tcp, np_udp)] {
            lab.wait_answered_by(&tcp.to_string(), &DISRUPT_BACKENDS, || tcp_ask(ns, tcp))?;
            lab.wait_answered_by(&udp.to_string(), &DISRUPT_BACKENDS, || udp_ask(ns, udp))?;
        }
    }

    let opened = Instant::now();
    let mut held = Vec::new();
    for ns in &clients {
        held.extend(hold(ns, "ClusterIP TCP", vip_tcp, true, 1000)?);
        held.extend(hold(ns, "ClusterIP UDP", vip_udp, false, 100)?);
    }
    held.extend(hold(&external, "NodePort TCP", np_tcp, true, 500)?);
    held.extend(hold(&external, "NodePort UDP", np_udp, false, 100)?);
    let paths = ["ClusterIP TCP", "ClusterIP UDP", "NodePort TCP", "NodePort UDP"];
    for path in paths {
        let on: BTreeSet<&str> = held
            .iter()
            .filter(|h| h.path == path)
            .map(|h| h.backend.as_str())
            .collect();
        assert_eq!(on, BTreeSet::from(DISRUPT_BACKENDS), "{path} flows on every backend");
    }
    report(&format!(
        "conn-disrupt: {} flows held, opened in {:?}\n",
        held.len(),
        opened.elapsed()
    ));

    // The held flows exchange a line each, round after round, on a thread of
    // their own; `rounds` counts the completed rounds.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let holder = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        std::thread::spawn(move || {
            let (mut resent, mut slowest) = (0, Duration::ZERO);
            while !stop.load(SeqCst) {
                let t = Instant::now();
                resent += exchange(&mut held);
                slowest = slowest.max(t.elapsed());
                rounds.fetch_add(1, SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
            (held, resent, slowest)
        })
    };
    let down: AgentDown = Arc::new(AtomicU64::new(0));
    let every = Duration::from_millis(20);
    let loads = [
        steady_load(
            clients[0].clone(),
            (vip_tcp, vip_udp),
            &DISRUPT_BACKENDS,
            every,
            stop.clone(),
            down.clone(),
        ),
        steady_load(
            external.clone(),
            (np_tcp, np_udp),
            &DISRUPT_BACKENDS,
            every,
            stop.clone(),
            down.clone(),
        ),
    ];
    std::thread::sleep(Duration::from_secs(2));
    full_round(&c.nodes[0], &rounds, "a round of the held flows before any restart")?;

    // The agent goes down (`kill`: SIGKILL, else SIGTERM), stays down for
    // `pause`, and starts again; the time until its /readyz said 200.
    let restart = |lab: &mut Lab, kill: bool, pause: Duration| -> Result<Duration> {
        let old = lab.agent_pid();
        let t = Instant::now();
        down.fetch_add(1, SeqCst);
        if kill {
            lab.kill_agent()?;
        } else {
            lab.stop_agent();
        }
        std::thread::sleep(pause);
        lab.start_agent()?;
        let readyz = SocketAddr::from(([127, 0, 0, 1], 10256));
        let node = lab.node.clone();
        lab.wait_until(Duration::from_secs(30), "the agent ready again", || {
            Ok(http_get(&node, readyz, "/readyz").is_ok_and(|(code, _)| code == 200))
        })?;
        down.fetch_add(1, SeqCst);
        lab.check_alive()?;
        assert_ne!(lab.agent_pid(), old, "a new agent process");
        Ok(t.elapsed())
    };
    let mut downtime = Vec::new();
    downtime.push(("SIGKILL", restart(&mut c.nodes[0], true, Duration::from_secs(2))?));
    full_round(&c.nodes[0], &rounds, "a round of the held flows after the SIGKILL")?;
    downtime.push(("restart", restart(&mut c.nodes[0], false, Duration::ZERO)?));
    full_round(&c.nodes[0], &rounds, "a round of the held flows after the restart")?;

    // The upgrade: another binary file, larger connection-tracking tables.
    let lab = &mut c.nodes[0];
    let next = lab.dir.join("ferry-next");
    std::fs::copy(lab.agent_binary(), &next).context("copying the agent's binary")?;
    lab.set_agent_binary(&next);
    set_flag(lab.agent_args_mut(), "--ct-map-size", ct_after.0);
    set_flag(lab.agent_args_mut(), "--ct-any-map-size", ct_after.1);
    let log_before = lab.agent_log().len();
    downtime.push(("upgrade", restart(lab, false, Duration::ZERO)?));
    let pid = lab.agent_pid().context("the agent's pid")?;
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe"))?,
        next,
        "the agent runs from the new binary"
    );
    // What the upgrade did to the pinned tables: each map's line of the log
    // ("resized the pinned map; every entry copied ... copied=N") and its size
    // now (checked last, after the flows).
    let upgrade_log = lab.agent_log()[log_before..].to_string();
    let mut migrated = Vec::new();
    for (map, size) in [
        (ferry_common::CT_TCP_MAP, ct_after.0),
        (ferry_common::CT_ANY_MAP, ct_after.1),
    ] {
        let line = upgrade_log
            .lines()
            .find(|l| l.contains("resized the pinned map") && l.contains(map))
            .map(str::to_string);
        let entries = aya::maps::MapInfo::from_pin(lab.bpffs_dir.join(map))?.max_entries();
        // The second pass, after the swap: what the old programs added meanwhile.
        let caught_up = upgrade_log
            .lines()
            .find(|l| l.contains("while the programs were swapped") && l.contains(map))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("copied=")))
            .unwrap_or("no")
            .to_string();
        migrated.push((map, size, line, entries, caught_up));
    }
    full_round(&c.nodes[0], &rounds, "a round of the held flows after the upgrade")?;
    std::thread::sleep(Duration::from_secs(1));

    stop.store(true, SeqCst);
    let (held, resent, slowest_round) = holder
        .join()
        .map_err(|_| anyhow::anyhow!("the holder thread panicked"))?;
    let [a, b] = loads.map(|l| l.join());
    let (a, b) = (
        a.map_err(|_| anyhow::anyhow!("a load thread panicked"))??,
        b.map_err(|_| anyhow::anyhow!("a load thread panicked"))??,
    );

    let mut out = format!(
        "conn-disrupt: agent downtime (kill or stop to /readyz 200): {}\n",
        downtime
            .iter()
            .map(|(what, d)| format!("{what} {d:.2?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (map, _, line, entries, caught_up) in &migrated {
        let copied = line
            .as_deref()
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("copied=")))
            .unwrap_or("no");
        out.push_str(&format!(
            "conn-disrupt: upgrade: {map} now {entries} entries, {copied} entries copied, \
             {caught_up} more after the swap\n"
        ));
    }
    for path in paths {
        let of: Vec<&Held> = held.iter().filter(|h| h.path == path).collect();
        let broken = of.iter().filter(|h| h.broken.is_some()).count();
        out.push_str(&format!(
            "conn-disrupt: held {path}: {} held, {broken} broken\n",
            of.len()
        ));
    }
    out.push_str(&format!(
        "conn-disrupt: held flows: {} rounds, the slowest {slowest_round:.2?}, {resent} UDP datagrams sent again\n",
        rounds.load(SeqCst)
    ));
    for (who, r) in [
        ("from a Pod to the ClusterIP", &a),
        ("from outside to the NodePort", &b),
    ] {
        out.push_str(&format!(
            "conn-disrupt: new flows {who}: {} ok, {} failed, {} failed while the agent was down \
             ({} made then), slowest {:.2?}, {} over 1 s, {} UDP datagrams sent again\n",
            r.ok,
            r.failed.len(),
            r.failed_while_down.len(),
            r.while_down,
            r.slowest,
            r.slow,
            r.resent
        ));
    }
    report(&out);

    let broken: Vec<String> = held
        .iter()
        .filter_map(|h| Some(format!("{} on {}: {}", h.path, h.backend, h.broken.as_ref()?)))
        .collect();
    assert!(
        broken.is_empty(),
        "{} held flows broke, the first: {:?}\n{}",
        broken.len(),
        broken.first(),
        c.logs()
    );
    for (who, r) in [("a Pod", &a), ("outside", &b)] {
        assert!(r.ok > 100 && r.while_down > 0, "the load from {who} ran: {r:?}");
        assert!(
            r.failed.is_empty() && r.failed_while_down.is_empty(),
            "new flows from {who} failed: {:?} / while the agent was down: {:?}",
            r.failed,
            r.failed_while_down
        );
    }
    for (map, size, line, entries, _) in migrated {
        let line = line.with_context(|| format!("{map} was not migrated:\n{upgrade_log}"))?;
        assert!(line.contains("every entry copied"), "{line}");
        assert_eq!(entries.to_string(), size, "{map} resized");
    }
    Ok(())
}
