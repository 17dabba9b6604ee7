//! Operating Ferry: one agent per pin directory, `ferry status`, `ferry
//! cleanup`, and the kube-proxy rules check at start.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use ferry_tests::{
    manifests::{client_pod, echo_pod, echo_service},
    tcp_ask, Lab, LabOptions,
};

const READY: Duration = Duration::from_secs(60);
const VIP: &str = "10.96.0.10";

fn vip() -> SocketAddr {
    format!("{VIP}:80").parse().unwrap()
}

/// A lab with one echo Pod behind 10.96.0.10 and a client Pod, answering.
fn serving_lab(opts: LabOptions) -> Result<(Lab, String)> {
    let lab = Lab::start(
        opts.manifest("service.yaml", &echo_service("echo", "echo", VIP))
            .manifest("echo.yaml", &echo_pod("echo-a", "echo", None))
            .manifest("client.yaml", &client_pod("client")),
    )?;
    lab.wait_ready(&["echo-a", "client"], READY)?;
    let client = lab.pod_netns("client")?;
    lab.wait_answered_by("the ClusterIP", &["echo-a"], || tcp_ask(&client, vip()))?;
    Ok((lab, client))
}

#[test]
fn a_second_agent_for_the_same_pin_directory_is_refused_and_the_first_keeps_serving() -> Result<()> {
    let (mut lab, client) = serving_lab(LabOptions::new("pinlock"))?;
    let pid = lab.agent_pid().context("the lab's agent")?;
    // Other ports: were the lock missing, the second agent would start.
    let (status, out) = lab.agent_once(
        &["--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", ""],
        Duration::from_secs(10),
    )?;
    let status = status.with_context(|| format!("the second agent kept running:\n{out}"))?;
    assert!(!status.success(), "the second agent exits non-zero: {status}\n{out}");
    let dir = lab.bpffs_dir.display().to_string();
    assert!(
        out.contains(&format!("already uses the pin directory {dir}")) && out.contains(&format!("(PID {pid})")),
        "the refusal names the directory and the running agent's PID {pid}:\n{out}"
    );
    lab.check_alive()?;
    for _ in 0..5 {
        assert_eq!(tcp_ask(&client, vip())?, "echo-a", "the first agent keeps serving");
    }
    // Its log goes to a file, not a terminal: text without colour codes.
    let log = lab.agent_log();
    assert!(log.contains("ferry agent started"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "no ANSI escape sequences in a redirected log:\n{log}"
    );
    Ok(())
}

/// Creates the node device `nodev0` (a veth; its peer `nodev0p` is another
/// veth of the node) in the lab's node namespace, up.
fn add_nodev0(lab: &Lab) -> Result<()> {
    let ip = |args: &[&str]| ferry_tests::sys::netns_exec(&lab.node, "ip", args);
    ip(&["link", "add", "nodev0", "type", "veth", "peer", "name", "nodev0p"])?;
    ip(&["link", "set", "nodev0", "up"])?;
    Ok(())
}

/// The rows of `status["programs"]` for `interface` and `program`.
fn program_rows<'a>(status: &'a serde_json::Value, interface: &str, program: &str) -> Vec<&'a serde_json::Value> {
    status["programs"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| r["interface"] == interface && r["program"] == program)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn status_reports_attach_problems_map_fill_and_the_agent_truthfully() -> Result<()> {
    // Two frontends (TCP 80, UDP 53) with one backend each: exactly the 4
    // slots of a 4-entry services map. nodev0 does not exist (yet).
    let opts = LabOptions::new("status");
    let opts = LabOptions {
        agent_args: vec![
            "--devices".into(),
            "nodev0".into(),
            "--services-map-size".into(),
            "4".into(),
            "--xdp".into(),
        ],
        ..opts
    };
    let (mut lab, _client) = serving_lab(opts)?;
    let pid = lab.agent_pid().context("the lab's agent")?;
    let (healthy, s, stderr) = lab.status()?;
    let text = serde_json::to_string_pretty(&s)?;
    assert!(!healthy, "a missing --devices entry is a problem (exit 1):\n{text}");
    assert!(stderr.contains("unhealthy") && stderr.contains("nodev0"), "{stderr}");
    assert_eq!(s["agent"]["running"], true, "{text}");
    assert_eq!(s["agent"]["reporting"], true, "{text}");
    assert_eq!(s["agent"]["pid"], pid, "{text}");
    assert_eq!(s["agent"]["mode"], "standalone", "{text}");
    assert!(s["sync"]["generation"].as_u64().unwrap_or(0) >= 1, "{text}");
    assert!(s["sync"]["age_seconds"].as_f64().is_some_and(|a| a < 60.0), "{text}");
    let missing = program_rows(&s, "nodev0", "from_netdev");
    assert!(
        missing.len() == 1
            && missing[0]["attached"] == false
            && missing[0]["error"].as_str().unwrap_or("").contains("no such interface"),
        "nodev0 is reported as not attached:\n{text}"
    );
    // from_pod on each Pod veth of the node, as the kernel lists TCX programs.
    let pods = s["programs"].as_array().map_or(0, |rows| {
        rows.iter()
            .filter(|r| r["program"] == "from_pod" && r["hook"] == "tcx ingress" && r["attached"] == true)
            .count()
    });
    assert_eq!(pods, 2, "from_pod on the veths of echo-a and client:\n{text}");
    if lab.cgroup.is_some() {
        let cg: BTreeSet<&str> = s["programs"].as_array().map_or(BTreeSet::new(), |rows| {
            rows.iter()
                .filter(|r| r["hook"] == "cgroup" && r["attached"] == true)
                .filter_map(|r| r["program"].as_str())
                .collect()
        });
        assert_eq!(
            cg,
            FERRY_PROGRAMS[5..].iter().copied().collect::<BTreeSet<_>>(),
            "connect, sendmsg, recvmsg and getpeername (4 and 6) on the node's cgroup:\n{text}"
        );
        let lb = s["agent"]["socket_lb"].as_str().unwrap_or_default();
        assert!(
            lb.starts_with("node and Pods (cgroup "),
            "socket LB for the node and its Pods:\n{text}"
        );
    }
    let services = s["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "FERRY_SERVICES"))
        .with_context(|| format!("no FERRY_SERVICES row:\n{text}"))?;
    assert_eq!(
        (services["entries"].as_u64(), services["max"].as_u64()),
        (Some(4), Some(4)),
        "{text}"
    );
    assert_eq!(services["warning"], true, "a full map is flagged:\n{text}");
    assert!(
        s["warnings"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w.as_str().unwrap_or("").contains("FERRY_SERVICES"))),
        "{text}"
    );
    assert_eq!(s["services"]["services"], 1, "{text}");
    assert_eq!(s["services"]["frontends"], 2, "{text}");
    assert_eq!(
        s["services"]["backends"], 2,
        "one backend per port (TCP http, UDP 8080):\n{text}"
    );
    assert!(
        s["features"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["name"] == "tc_program" && f["available"] == true)),
        "{text}"
    );

    // The device appears: the agent attaches from_netdev, the problem is gone
    // (the full map stays a warning, not a failure).
    add_nodev0(&lab)?;
    lab.wait_until(
        Duration::from_secs(15),
        "ferry status healthy once nodev0 exists",
        || {
            let (healthy, s, _) = lab.status()?;
            let attached = program_rows(&s, "nodev0", "from_netdev")
                .iter()
                .any(|r| r["attached"] == true);
            let xdp = program_rows(&s, "nodev0", "xdp_from_netdev")
                .iter()
                .any(|r| r["attached"] == true && r["hook"] == "xdp generic");
            Ok(healthy && attached && xdp)
        },
    )?;
    let table = lab.ferry(&[
        "status",
        "--node-name",
        &lab.node,
        "--status-file",
        &lab.status_file().display().to_string(),
    ])?;
    println!("ferry status:\n{table}");
    assert!(table.starts_with("Health:      OK"), "{table}");
    assert!(table.contains("nodev0") && table.contains("FERRY_SERVICES"), "{table}");

    // No agent: unhealthy, and said so.
    lab.stop_agent();
    let (healthy, s, _) = lab.status()?;
    assert!(!healthy && s["agent"]["running"] == false, "{s:#}");
    assert!(
        !lab.status_file().exists(),
        "the agent removes its report when it stops"
    );
    lab.check_alive().ok();
    Ok(())
}

/// Ferry's programs as the kernel lists them for the node: `bpftool net show`
/// in its network namespace (XDP; this bpftool does not list TCX) and
/// `bpftool cgroup tree` of its cgroup.
fn kernel_listing(lab: &Lab) -> Result<String> {
    let mut out = ferry_tests::sys::netns_exec(&lab.node, "bpftool", &["net", "show"])?;
    if let Some(cg) = &lab.cgroup {
        out.push_str(&ferry_tests::sys::run(
            "bpftool",
            &["cgroup", "tree", &cg.display().to_string()],
        )?);
    }
    Ok(out)
}

const FERRY_PROGRAMS: [&str; 13] = [
    "from_pod",
    "from_netdev",
    "to_pod",
    "to_netdev",
    "xdp_from_netdev",
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_peer4",
    "sock_connect6",
    "sock_sendmsg6",
    "sock_recvmsg6",
    "sock_peer6",
];

/// The programs process `pid` holds (its fds of programs and links, from
/// /proc/PID/fdinfo), by id, named as `bpftool prog show` lists them.
fn programs_of(pid: u32) -> Result<Vec<(u64, String)>> {
    ferry_tests::sys::prog_ids_of(pid)?
        .into_iter()
        .map(|id| {
            let json: serde_json::Value = serde_json::from_str(&ferry_tests::sys::run(
                "bpftool",
                &["-j", "prog", "show", "id", &id.to_string()],
            )?)?;
            Ok((u64::from(id), json["name"].as_str().unwrap_or_default().to_string()))
        })
        .collect()
}

/// Whether the kernel still has program `id` (attached somewhere, or held).
fn program_exists(id: u64) -> bool {
    ferry_tests::sys::run("bpftool", &["prog", "show", "id", &id.to_string()]).is_ok()
}

#[test]
fn cleanup_leaves_no_program_or_pin_and_a_later_agent_starts_clean() -> Result<()> {
    let opts = LabOptions {
        agent_args: vec![
            "--devices".into(),
            "nodev0".into(),
            "--xdp".into(),
            "--log-format".into(),
            "json".into(),
        ],
        ..LabOptions::new("cleanup")
    };
    let (mut lab, client) = serving_lab(opts)?;
    add_nodev0(&lab)?;
    lab.wait_until(Duration::from_secs(15), "XDP on nodev0", || {
        Ok(kernel_listing(&lab)?.contains("nodev0"))
    })?;
    let before = kernel_listing(&lab)?;
    println!("before cleanup:\n{before}");
    let pid = lab.agent_pid().context("the lab's agent")?;
    // The L3 devices' twins (from_netdev_l3, to_netdev_l3) are loaded too,
    // but this lab has no L3 device: attached nowhere, they go with the agent.
    let programs: Vec<_> = programs_of(pid)?
        .into_iter()
        .filter(|(_, n)| !n.ends_with("_l3"))
        .collect();
    println!("the agent's programs: {programs:?}");
    let expected: &[&str] = if lab.cgroup.is_some() {
        &FERRY_PROGRAMS
    } else {
        &FERRY_PROGRAMS[..3]
    };
    for p in expected {
        assert!(
            programs.iter().any(|(_, n)| n == p),
            "the agent holds {p}: {programs:?}"
        );
    }
    assert!(
        before.contains("nodev0") && (lab.cgroup.is_none() || before.contains("sock_connect4")),
        "{before}"
    );
    let (node, status_file) = (lab.node.clone(), lab.status_file().display().to_string());
    let cleanup = [
        "cleanup",
        "--node-name",
        node.as_str(),
        "--status-file",
        status_file.as_str(),
    ];

    // Refused while the agent runs.
    let out = lab.ferry_unchecked(&cleanup)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused while an agent runs: {stderr}");
    assert!(
        stderr.contains(&format!(
            "(PID {pid}) holds the pin directory {}",
            lab.bpffs_dir.display()
        )),
        "{stderr}"
    );
    assert!(
        lab.bpffs_dir.is_dir() && kernel_listing(&lab)? == before,
        "nothing was removed"
    );

    // Stopped, the programs stay attached (held by the pinned links) until cleanup.
    lab.stop_agent();
    assert!(
        programs.iter().all(|(id, _)| program_exists(*id)),
        "the pins keep every program"
    );
    let out = lab.ferry_unchecked(&cleanup)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("ferry cleanup:\n{stdout}");
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let after = kernel_listing(&lab)?;
    println!("after cleanup:\n{after}");
    assert!(
        !after.contains("nodev0"),
        "XDP is still attached after cleanup:\n{after}"
    );
    for p in FERRY_PROGRAMS {
        assert!(!after.contains(p), "{p} is still attached after cleanup:\n{after}");
    }
    // A program attached anywhere (TCX included) would still exist.
    for (id, name) in &programs {
        assert!(!program_exists(*id), "program {id} ({name}) still exists after cleanup");
    }
    assert!(
        !lab.bpffs_dir.exists(),
        "the pin directory {} is gone",
        lab.bpffs_dir.display()
    );
    let again = lab.ferry_unchecked(&cleanup)?;
    assert!(
        again.status.success() && String::from_utf8_lossy(&again.stdout).contains("nothing of Ferry's found"),
        "a second cleanup finds nothing: {again:?}"
    );

    // A later agent starts from scratch and serves.
    lab.start_agent()?;
    lab.wait_answered_by("the ClusterIP after cleanup", &["echo-a"], || tcp_ask(&client, vip()))?;
    lab.wait_until(Duration::from_secs(15), "a healthy node after cleanup", || {
        Ok(lab.status()?.0)
    })?;
    assert_json_log(&lab.agent_log());
    Ok(())
}

/// Every line of a `--log-format json` log is one JSON object with a level
/// and a message, and the agent's start is among them.
fn assert_json_log(log: &str) {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["fields"]["message"].is_string()),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "ferry agent started" && l["fields"]["mode"] == "standalone"),
        "{log}"
    );
}

/// The metric names of an exposition: every sample line's name and every
/// `# TYPE` name.
fn exported_names(exposition: &str) -> std::collections::BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') || line.is_empty() => None,
            None => line.split(['{', ' ']).next(),
        })
        .map(str::to_string)
        .collect()
}

/// The `ferry_*` metric names a file mentions.
fn mentioned_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("ferry_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `ferry_*` in prose is not a metric.
        if end > "ferry_".len() {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end.max(1)..];
    }
    out
}

#[test]
fn metrics_named_by_the_dashboard_and_alerts_exist() -> Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring");
    let dashboard = std::fs::read_to_string(dir.join("ferry-dashboard.json"))?;
    let alerts = std::fs::read_to_string(dir.join("ferry-alerts.yaml"))?;
    let dash_json: serde_json::Value = serde_json::from_str(&dashboard).context("the dashboard is JSON")?;
    assert!(dash_json["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let rules: serde_yaml::Value = serde_yaml::from_str(&alerts).context("the alerts are YAML")?;
    let alert_names: Vec<&str> = rules["groups"][0]["rules"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for want in [
        "FerrySyncFailing",
        "FerryMapNearlyFull",
        "FerryAttachErrors",
        "FerryDropsRising",
    ] {
        assert!(alert_names.contains(&want), "alert {want} is defined: {alert_names:?}");
    }

    // What the agent exports, from its registry via /metrics (with pinned maps,
    // so the dataplane's metrics are there too).
    let (lab, _client) = serving_lab(LabOptions::new("metricnames"))?;
    let node = lab.node.clone();
    let (code, body) = ferry_tests::http_get(&node, "127.0.0.1:10249".parse()?, "/metrics")?;
    assert_eq!(code, 200, "{body}");
    let mut exported = exported_names(&body);
    // Label families appear once they have a child: the agent's registry with
    // one of each (the same registry the agent serves).
    let registry =
        ferry_agent::metrics::Metrics::new(None, ferry_agent::ct::Sizes { tcp: 1, any: 1 }, Default::default());
    registry.sync_error("map_write");
    registry.watch_error("services");
    exported.extend(exported_names(&registry.encode()?));
    for must in [
        "ferry_attach_errors",
        "ferry_map_entries",
        "ferry_drops_total",
        "ferry_sync_errors_total",
    ] {
        assert!(exported.contains(must), "{must} is exported:\n{body}");
    }
    for (file, text) in [("ferry-dashboard.json", &dashboard), ("ferry-alerts.yaml", &alerts)] {
        let mentioned = mentioned_names(text);
        assert!(mentioned.len() >= 5, "{file} names metrics: {mentioned:?}");
        let unknown: Vec<&String> = mentioned.iter().filter(|m| !exported.contains(*m)).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the agent does not export: {unknown:?}\nexported: {exported:?}"
        );
    }
    Ok(())
}

const KUBE_PROXY_WARNING: &str = "kube-proxy's rules are on this node";

#[test]
fn kube_proxy_rules_are_reported_at_start_and_nothing_is_said_without_them() -> Result<()> {
    // Without: silent.
    let (clean, _) = serving_lab(LabOptions::new("nokp"))?;
    let log = clean.agent_log();
    assert!(
        log.contains("ferry agent started") && !log.contains("kube-proxy"),
        "{log}"
    );
    drop(clean);

    // With KUBE-SERVICES in iptables-nft's and iptables-legacy's nat table
    // of the node (its own network namespace) before the agent starts.
    let mut lab = Lab::start(LabOptions {
        agent: false,
        ..LabOptions::new("kp")
    })?;
    for iptables in ["iptables", "iptables-legacy"] {
        ferry_tests::sys::netns_exec(&lab.node, iptables, &["-t", "nat", "-N", "KUBE-SERVICES"])?;
    }
    lab.start_agent()?;
    lab.wait_until(Duration::from_secs(15), "the agent started", || {
        Ok(lab.agent_log().contains("ferry agent started"))
    })?;
    let log = lab.agent_log();
    let warning = log
        .lines()
        .find(|l| l.contains(KUBE_PROXY_WARNING))
        .with_context(|| format!("no warning:\n{log}"))?;
    for want in [
        "WARN",
        "iptables-nft: chain KUBE-SERVICES in nftables table ip nat",
        "iptables-legacy: chain KUBE-SERVICES in table nat",
        "kube-proxy --cleanup",
    ] {
        assert!(warning.contains(want), "{want:?} in the warning: {warning}");
    }

    // --kube-proxy-rules=fail: refuses to start, saying why.
    lab.stop_agent();
    let (status, out) = lab.agent_once(&["--kube-proxy-rules", "fail"], Duration::from_secs(10))?;
    assert!(status.is_some_and(|s| !s.success()), "refused: {status:?}\n{out}");
    assert!(
        out.contains(KUBE_PROXY_WARNING) && out.contains("--kube-proxy-rules=warn"),
        "{out}"
    );
    Ok(())
}

#[test]
fn a_kube_proxy_configuration_file_drives_the_agent() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-kpconfig-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("kube-proxy.yaml");
    std::fs::write(
        &file,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
         kind: KubeProxyConfiguration\n\
         healthzBindAddress: 127.0.0.1:10266\n\
         metricsBindAddress: 127.0.0.1:10267\n\
         clusterCIDR: 10.244.0.0/16\n\
         notAField: 1\n",
    )?;
    let opts = LabOptions {
        agent_args: vec!["--config".into(), file.display().to_string()],
        ..LabOptions::new("kpconf").scratch_dir(&dir)
    };
    let (lab, _client) = serving_lab(opts)?;
    let (code, _) = ferry_tests::http_get(&lab.node, "127.0.0.1:10266".parse()?, "/readyz")?;
    assert_eq!(code, 200, "/readyz where healthzBindAddress says");
    let (code, body) = ferry_tests::http_get(&lab.node, "127.0.0.1:10267".parse()?, "/metrics")?;
    assert!(
        code == 200 && body.contains("ferry_services 1"),
        "/metrics where metricsBindAddress says: {body}"
    );
    assert!(
        ferry_tests::http_get(&lab.node, "127.0.0.1:10256".parse()?, "/readyz").is_err(),
        "not on the default port"
    );
    let log = lab.agent_log();
    assert!(log.contains("--config: notAField: unknown field"), "{log}");
    assert!(log.contains("--config: clusterCIDR: not used"), "{log}");
    Ok(())
}

/// The TCX/XDP links process `pid` holds, from /proc/PID/fdinfo: their
/// interface indexes (0 once detached).
fn interface_links_of(pid: u32) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        if field("link_type:").is_some_and(|t| t == "tcx" || t == "xdp") {
            out.push(field("ifindex:").and_then(|i| i.parse().ok()).unwrap_or(u64::MAX));
        }
    }
    Ok(out)
}

#[test]
fn cleanup_force_detaches_links_a_running_agent_holds_even_without_their_pins() -> Result<()> {
    let (lab, client) = serving_lab(LabOptions::new("force"))?;
    let pid = lab.agent_pid().context("the lab's agent")?;
    let before = interface_links_of(pid)?;
    assert!(
        before.len() == 4 && before.iter().all(|i| *i > 0),
        "from_pod and to_pod on two veths: {before:?}"
    );
    // Lose the pins of the interface links: only the agent holds them now.
    for e in std::fs::read_dir(lab.bpffs_dir.join("links"))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("from_pod-") || name.starts_with("to_pod-") {
            std::fs::remove_file(e.path())?;
        }
    }
    assert_eq!(tcp_ask(&client, vip())?, "echo-a", "still attached, held by the agent");
    let out = lab.ferry_unchecked(&["cleanup", "--force", "--node-name", &lab.node])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("ferry cleanup --force:\n{stdout}");
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("(not pinned)").count(), 4, "{stdout}");
    let after = interface_links_of(pid)?;
    assert!(
        after.len() == 4 && after.iter().all(|i| *i == 0),
        "the agent's links are detached: {after:?}"
    );
    assert!(!lab.bpffs_dir.exists());
    Ok(())
}
