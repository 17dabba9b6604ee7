//! Kernels without TCX (before 6.6): the legacy attach path, forced on this
//! kernel with `--tc-attach netlink`; `/readyz` while a program that must be
//! attached is not; XDP native refused, falling back to TC.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use ferry_tests::{
    cluster::{node_addr, Cluster},
    http_get,
    manifests::{client_pod, echo_pod},
    sys, tcp_ask, Lab, LabOptions, TcpSession,
};

const READY: Duration = Duration::from_secs(60);
const VIP: &str = "10.96.0.30";

fn vip() -> SocketAddr {
    format!("{VIP}:80").parse().unwrap()
}

fn nodeport() -> SocketAddr {
    SocketAddr::from((node_addr(0), 30080))
}

fn service() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP}
  selector: {{app: web}}
  ports:
    - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}
"#
    )
}

/// One node (`--devices eth0` plus `agent_args`) with an echo Pod behind a
/// NodePort Service and a client Pod; both the ClusterIP (from the client)
/// and the NodePort (from the external client) answer.
fn one_node(tag: &str, agent_args: &[&str]) -> Result<(Cluster, String)> {
    let manifests = [
        ("service.yaml".to_string(), service()),
        ("web.yaml".to_string(), echo_pod("web-1", "web", None)),
        ("client.yaml".to_string(), client_pod("client")),
    ];
    let c = Cluster::start(tag, 1, &manifests, agent_args)?;
    c.wait_ready(&["web-1", "client"], READY)?;
    let client = c.pod_netns("client")?;
    c.nodes[0].wait_answered_by("the ClusterIP", &["web-1"], || tcp_ask(&client, vip()))?;
    c.nodes[0].wait_answered_by("the NodePort", &["web-1"], || {
        TcpSession::connect(&c.external, nodeport())?.ask()
    })?;
    Ok((c, client))
}

/// The veths of the node's namespace (eth0, the node device, and the Pods').
fn veths(node: &str) -> Result<Vec<String>> {
    let out = sys::netns_exec(node, "ip", &["-o", "link", "show", "type", "veth"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect())
}

/// Interface → the lines of `tc filter show dev <it> ingress` that name one
/// of Ferry's programs.
fn ferry_filters(node: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for dev in veths(node)? {
        let text = sys::netns_exec(node, "tc", &["filter", "show", "dev", &dev, "ingress"]).unwrap_or_default();
        let lines = text
            .lines()
            .filter(|l| l.contains("from_pod") || l.contains("from_netdev"))
            .map(str::to_string)
            .collect();
        out.insert(dev, lines);
    }
    Ok(out)
}

/// Every veth has exactly one Ferry filter, at Ferry's priority and handle;
/// returns interface → the program id in it.
fn one_filter_each(node: &str) -> Result<BTreeMap<String, String>> {
    let filters = ferry_filters(node)?;
    assert!(filters.len() >= 3, "eth0 and two Pod veths: {filters:?}");
    let mut ids = BTreeMap::new();
    for (dev, lines) in &filters {
        assert_eq!(lines.len(), 1, "one Ferry filter on {dev}: {filters:#?}");
        let line = &lines[0];
        assert!(
            line.contains("pref 16 ") && line.contains("handle 0xf3 "),
            "Ferry's priority and handle: {line}"
        );
        let want = if dev == "eth0" { "from_netdev" } else { "from_pod" };
        assert!(line.contains(want), "{want} on {dev}: {line}");
        let id = line
            .split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .context("a program id")?;
        ids.insert(dev.clone(), id.to_string());
    }
    Ok(ids)
}

/// Asks the ClusterIP (from the client Pod) and the NodePort (from the
/// external client) in a loop until stopped: (answers, failures).
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(client: &str, external: &str) -> Self {
        let (stop, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (client, external) = (client.to_string(), external.to_string());
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (what, r) in [
                    ("ClusterIP", tcp_ask(&client, vip())),
                    (
                        "NodePort",
                        TcpSession::connect(&external, nodeport()).and_then(|mut t| t.ask()),
                    ),
                ] {
                    match r {
                        Ok(name) if name == "web-1" => o.fetch_add(1, Ordering::Relaxed),
                        other => {
                            f.lock().unwrap().push(format!("{what}: {other:?}"));
                            0
                        }
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.ok.load(Ordering::Relaxed), self.failed.lock().unwrap().clone())
    }
}

#[test]
fn netlink_tc_serves_keeps_one_filter_across_restarts_and_cleanup_removes_it() -> Result<()> {
    let (mut c, client) = one_node("nltc", &["--tc-attach", "netlink"])?;
    let node = c.nodes[0].node.clone();
    let before = one_filter_each(&node)?;
    println!("filters: {:#?}", ferry_filters(&node)?);
    let (_, status, stderr) = c.nodes[0].status()?;
    let rows = status["programs"].as_array().context("status programs")?;
    for dev in before.keys() {
        let mut hooks: Vec<&str> = rows
            .iter()
            .filter(|r| r["interface"] == dev.as_str())
            .filter_map(|r| r["hook"].as_str())
            .collect();
        hooks.sort_unstable();
        assert_eq!(
            hooks,
            ["tc egress (netlink)", "tc ingress (netlink)"],
            "ferry status shows {dev} attached through netlink only, both ways: {status:#}\n{stderr}"
        );
    }

    // Stopped, then restarted, with traffic all along: the filters stay while
    // no agent runs, and the new agent replaces its program in them.
    let traffic = Traffic::start(&client, &c.external);
    std::thread::sleep(Duration::from_millis(300));
    c.nodes[0].stop_agent();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(one_filter_each(&node)?, before, "the filters outlive the agent");
    c.nodes[0].start_agent()?;
    c.nodes[0].wait_until(
        Duration::from_secs(20),
        "the restarted agent's programs in the filters",
        || {
            let now = ferry_filters(&node)?;
            Ok(now.values().all(|l| l.len() == 1)
                && !before
                    .iter()
                    .any(|(dev, id)| now[dev][0].contains(&format!(" id {id} "))))
        },
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = traffic.stop();
    println!("requests across the restart: {ok} answered, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "no request failed across the restart ({ok} answered): {failed:?}"
    );
    assert!(ok > 20, "traffic ran across the restart: {ok} answers");
    let after = one_filter_each(&node)?;
    println!("after the restart: {:#?}", ferry_filters(&node)?);
    assert_eq!(after.len(), before.len());
    let log = c.nodes[0].agent_log();
    assert!(log.contains("replaced Ferry's filter"), "{log}");
    assert_eq!(tcp_ask(&client, vip())?, "web-1");

    // Cleanup removes every filter.
    c.nodes[0].stop_agent();
    let done = c.nodes[0].ferry(&["cleanup", "--node-name", &node])?;
    println!("cleanup: {done}");
    let left = ferry_filters(&node)?;
    assert!(left.values().all(Vec::is_empty), "no Ferry filter left: {left:#?}");
    assert!(done.contains("removed the tc filter of from_pod"), "{done}");
    assert!(
        tcp_ask(&client, vip()).is_err(),
        "nothing serves the ClusterIP after cleanup"
    );
    Ok(())
}

/// `/readyz` from the node's namespace: (status code, body).
fn readyz(lab: &Lab) -> Result<(u16, String)> {
    http_get(&lab.node, "127.0.0.1:10256".parse()?, "/readyz")
}

#[test]
fn readyz_fails_naming_a_missing_device_until_it_exists() -> Result<()> {
    let opts = LabOptions {
        agent_args: vec!["--devices".into(), "nodev9".into()],
        ..LabOptions::new("readyz").manifest("client.yaml", &client_pod("client"))
    };
    let lab = Lab::start(opts)?;
    lab.wait_ready(&["client"], READY)?;
    lab.wait_until(Duration::from_secs(15), "/readyz naming nodev9", || {
        let (code, body) = readyz(&lab)?;
        Ok(code == 503 && body.contains("from_netdev on nodev9: no such interface"))
    })?;
    let ip = |args: &[&str]| sys::netns_exec(&lab.node, "ip", args);
    ip(&["link", "add", "nodev9", "type", "veth", "peer", "name", "nodev9p"])?;
    ip(&["link", "set", "nodev9", "up"])?;
    ip(&["link", "set", "nodev9p", "up"])?;
    lab.wait_until(Duration::from_secs(15), "/readyz 200 once nodev9 exists", || {
        Ok(readyz(&lab)?.0 == 200)
    })?;
    ip(&["link", "del", "nodev9"])?;
    lab.wait_until(Duration::from_secs(15), "/readyz 503 again once nodev9 is gone", || {
        let (code, body) = readyz(&lab)?;
        Ok(code == 503 && body.contains("nodev9"))
    })?;
    Ok(())
}

/// Native XDP on a veth is refused when the peer's MTU exceeds what fits in a
/// page and the program does not declare XDP fragments (the kernel's veth
/// driver: "Peer MTU is too large to set XDP"): with `--xdp-mode native` the
/// agent warns, falls back to TC on that device, stays ready and serves. With
/// the peer's MTU back at 1500, the same agent flags attach native XDP (the
/// refusal was the MTU's).
#[test]
fn xdp_native_refused_falls_back_to_tc_and_keeps_serving() -> Result<()> {
    let manifests = [
        ("service.yaml".to_string(), service()),
        ("web.yaml".to_string(), echo_pod("web-1", "web", None)),
        ("client.yaml".to_string(), client_pod("client")),
    ];
    let mut c = Cluster::start_opts("natfb", 1, &manifests, &["--xdp", "--xdp-mode", "native"], false)?;
    let underlay = c.underlay().to_string();
    let peer_mtu = |mtu: &str| sys::run("ip", &["-n", &underlay, "link", "set", "u1", "mtu", mtu]);
    peer_mtu("9000")?;
    c.nodes[0].start_agent()?;
    c.wait_ready(&["web-1", "client"], READY)?;
    let client = c.pod_netns("client")?;
    let lab = &c.nodes[0];
    lab.wait_answered_by("the ClusterIP", &["web-1"], || tcp_ask(&client, vip()))?;
    lab.wait_answered_by("the NodePort", &["web-1"], || {
        TcpSession::connect(&c.external, nodeport())?.ask()
    })?;
    let log = lab.agent_log();
    assert!(
        log.contains("XDP could not attach, falling back to TC only on this device"),
        "{log}"
    );
    let eth0 = sys::netns_exec(&lab.node, "ip", &["link", "show", "eth0"])?;
    assert!(!eth0.contains("prog/xdp"), "no XDP on eth0: {eth0}");
    assert_eq!(readyz(lab)?.0, 200, "falling back to TC is no readiness failure");
    let (_, status, _) = lab.status()?;
    let refused = status["programs"].as_array().into_iter().flatten().any(|r| {
        r["interface"] == "eth0"
            && r["hook"] == "xdp"
            && r["error"].as_str().is_some_and(|e| e.contains("XDP could not attach"))
    });
    assert!(refused, "ferry status names the fallback: {status:#}");
    for _ in 0..10 {
        assert_eq!(TcpSession::connect(&c.external, nodeport())?.ask()?, "web-1");
    }

    // The control: the peer's MTU back to 1500, native XDP attaches.
    c.nodes[0].stop_agent();
    peer_mtu("1500")?;
    c.nodes[0].start_agent()?;
    let lab = &c.nodes[0];
    lab.wait_until(Duration::from_secs(20), "native XDP on eth0", || {
        Ok(sys::netns_exec(&lab.node, "ip", &["link", "show", "eth0"])?.contains("prog/xdp"))
    })?;
    lab.wait_answered_by("the NodePort", &["web-1"], || {
        TcpSession::connect(&c.external, nodeport())?.ask()
    })?;
    Ok(())
}

/// interface → the hooks `ferry status` shows Ferry's TC programs on.
fn tc_hooks(lab: &Lab) -> Result<BTreeMap<String, Vec<String>>> {
    let (_, status, stderr) = lab.status()?;
    let rows = status["programs"]
        .as_array()
        .with_context(|| format!("status programs: {stderr}"))?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r["program"] == "from_pod" && r["attached"] == true)
    {
        let (dev, hook) = (
            r["interface"].as_str().unwrap_or_default(),
            r["hook"].as_str().unwrap_or_default(),
        );
        out.entry(dev.to_string()).or_default().push(hook.to_string());
    }
    Ok(out)
}

/// An agent restarted with the other `--tc-attach` takes the other agent's
/// attachment away once its own is in: never both (a packet would be
/// translated twice), never none.
#[test]
fn switching_tc_attach_modes_leaves_one_attachment_per_veth() -> Result<()> {
    let opts = LabOptions::new("tcswitch")
        .manifest("service.yaml", &ferry_tests::manifests::echo_service("web", "web", VIP))
        .manifest("web.yaml", &echo_pod("web-1", "web", None))
        .manifest("client.yaml", &client_pod("client"));
    let mut lab = Lab::start(opts)?;
    lab.wait_ready(&["web-1", "client"], READY)?;
    let client = lab.pod_netns("client")?;
    lab.wait_answered_by("the ClusterIP", &["web-1"], || tcp_ask(&client, vip()))?;
    let tcx = tc_hooks(&lab)?;
    assert!(
        tcx.len() >= 2 && tcx.values().all(|h| h == &["tcx ingress"]),
        "auto on this kernel: TCX: {tcx:?}"
    );

    lab.stop_agent();
    let (_, out) = lab.agent_once(&["--tc-attach", "netlink"], Duration::from_secs(4))?;
    let netlink = tc_hooks(&lab)?;
    assert_eq!(
        netlink.keys().collect::<Vec<_>>(),
        tcx.keys().collect::<Vec<_>>(),
        "{out}"
    );
    assert!(
        netlink.values().all(|h| h == &["tc ingress (netlink)"]),
        "netlink only, the TCX links detached: {netlink:?}\n{out}"
    );
    assert_eq!(tcp_ask(&client, vip())?, "web-1", "served by the filters with no agent");

    lab.start_agent()?;
    lab.wait_until(Duration::from_secs(15), "TCX only again", || {
        let hooks = tc_hooks(&lab)?;
        Ok(hooks.keys().eq(tcx.keys()) && hooks.values().all(|h| h == &["tcx ingress"]))
    })?;
    assert!(
        ferry_filters(&lab.node)?.values().all(Vec::is_empty),
        "the netlink filters are gone"
    );
    assert_eq!(tcp_ask(&client, vip())?, "web-1");
    Ok(())
}
