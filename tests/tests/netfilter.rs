//! Netfilter on the node: kube-proxy's leftover `KUBE-FORWARD ... --ctstate
//! INVALID -j DROP` (and a firewall's INPUT twin) in both node namespaces.
//! Translated flows must pass: the dataplane sends both directions of a
//! translated flow past the stack (FIB lookup + redirect), so conntrack never
//! sees half a flow and never calls its packets INVALID. Real clients:
//! Pods, the external client and a node process, over several round trips
//! per connection (the ACKs after the handshake are what INVALID would drop).
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::Result;
use ferry_tests::{
    cluster::{node_addr, Cluster},
    manifests::{client_pod, echo_pod, echo_service, on_node, ECHO_NODEPORT_SERVICE},
    sys, udp_ask, TcpSession,
};

/// Three round trips on one connection: the backend that answered them all.
fn conversation(netns: &str, to: SocketAddr) -> Result<String> {
    let mut s = TcpSession::connect(netns, to)?;
    let first = s.ask()?;
    for _ in 0..2 {
        anyhow::ensure!(s.ask()? == first, "one connection, one backend");
    }
    Ok(first)
}

#[test]
fn translated_flows_pass_kube_proxys_invalid_drop_rules() -> Result<()> {
    let c = Cluster::start(
        "nfinv",
        2,
        &[
            ("service.yaml".into(), echo_service("echo", "echo", "10.96.0.10")),
            ("np.yaml".into(), ECHO_NODEPORT_SERVICE.into()),
        ],
        &[],
    )?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    for n in [&n1, &n2] {
        for chain in ["FORWARD", "INPUT"] {
            sys::netns_exec(
                n,
                "iptables",
                &[
                    "-w",
                    "-A",
                    chain,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "INVALID",
                    "-j",
                    "DROP",
                ],
            )?;
        }
    }
    c.write_manifest("local.yaml", &on_node(&echo_pod("local", "echo", None), &n1))?;
    c.write_manifest("remote.yaml", &on_node(&echo_pod("remote", "echo", None), &n2))?;
    c.write_manifest("client.yaml", &on_node(&client_pod("client"), &n1))?;
    c.wait_ready(&["local", "remote", "client"], Duration::from_secs(60))?;
    let both = BTreeSet::from(["local".to_string(), "remote".to_string()]);
    let pod = c.pod_netns("client")?;
    let clusterip: SocketAddr = "10.96.0.10:80".parse()?;
    let udp: SocketAddr = "10.96.0.10:53".parse()?;
    let nodeport = SocketAddr::from((node_addr(0), 30080));
    let node1 = &c.nodes[0];
    let seen = node1.wait_answered_by("ClusterIP TCP from a Pod", &["local", "remote"], || {
        conversation(&pod, clusterip)
    })?;
    assert_eq!(seen, both);
    let seen = node1.wait_answered_by("ClusterIP UDP from a Pod", &["local", "remote"], || udp_ask(&pod, udp))?;
    assert_eq!(seen, both);
    let seen = node1.wait_answered_by("NodePort from outside", &["local", "remote"], || {
        conversation(&c.external, nodeport)
    })?;
    assert_eq!(seen, both);
    let args = ["-T2", "-", "TCP:10.96.0.10:80"];
    let seen = node1.wait_answered_by("ClusterIP from node 1 itself", &["local", "remote"], || {
        Ok(node1.host_run("socat", &args, "hello\n")?.trim().to_string())
    })?;
    assert_eq!(seen, both);
    // The rules were in place throughout.
    let rules = sys::netns_exec(&n1, "iptables", &["-w", "-L", "FORWARD", "-v", "-n", "-x"])?;
    assert!(rules.contains("ctstate INVALID"), "{rules}");
    Ok(())
}
