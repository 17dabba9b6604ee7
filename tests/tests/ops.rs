//! Operating Ferry: one agent per pin directory, `ferry status`, `ferry
//! cleanup`, and the kube-proxy rules check at start.
use std::{net::SocketAddr, time::Duration};

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
    Ok(())
}
