//! Processes of a node itself (host network: the node's network namespace and
//! cgroup, like kubelet or a hostNetwork Pod) reaching Services: socket-level
//! load balancing (cgroup connect4/sendmsg4/recvmsg4), no packet NAT. Real
//! clients (socat), assertions on which backend answered.
use std::{collections::BTreeSet, time::Duration};

use anyhow::Result;
use ferry_tests::{
    cluster::{node_addr, Cluster},
    manifests::{echo_pod, echo_service, on_node, ECHO_NODEPORT_SERVICE},
};

#[test]
fn node_processes_reach_clusterip_and_nodeport_over_tcp_and_udp() -> Result<()> {
    let c = Cluster::start(
        "host",
        2,
        &[
            ("service.yaml".into(), echo_service("echo", "echo", "10.96.0.10")),
            ("np.yaml".into(), ECHO_NODEPORT_SERVICE.to_string()),
        ],
        &[],
    )?;
    let (n1, n2) = (c.nodes[0].node.clone(), c.nodes[1].node.clone());
    c.write_manifest("local.yaml", &on_node(&echo_pod("local", "echo", None), &n1))?;
    c.write_manifest("remote.yaml", &on_node(&echo_pod("remote", "echo", None), &n2))?;
    c.wait_ready(&["local", "remote"], Duration::from_secs(60))?;
    let both = BTreeSet::from(["local".to_string(), "remote".to_string()]);
    let node1 = node_addr(0).to_string();
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            "ClusterIP TCP".into(),
            vec!["-T2".into(), "-".into(), "TCP:10.96.0.10:80".into()],
        ),
        // A connected UDP socket (connect4).
        (
            "ClusterIP UDP connected".into(),
            vec!["-T2".into(), "-".into(), "UDP:10.96.0.10:53".into()],
        ),
        // Unconnected (sendmsg4); socat drops answers from any other address
        // than the one it sent to, so an answer proves recvmsg4 reported it
        // from the ClusterIP.
        (
            "ClusterIP UDP sendto".into(),
            vec!["-T2".into(), "-".into(), "UDP-SENDTO:10.96.0.10:53".into()],
        ),
        (
            "NodePort TCP".into(),
            vec!["-T2".into(), "-".into(), format!("TCP:{node1}:30080")],
        ),
        (
            "NodePort UDP sendto".into(),
            vec!["-T2".into(), "-".into(), format!("UDP-SENDTO:{node1}:30053")],
        ),
    ];
    for (what, args) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // One run of socat from node 1 itself: the backend that answered.
        let ask = || Ok(c.nodes[0].host_run("socat", &args, "hello\n")?.trim().to_string());
        let seen = c.nodes[0].wait_answered_by(&format!("{what} from node 1"), &["local", "remote"], ask)?;
        assert_eq!(seen, both, "{what}: only the Service's backends answer");
    }
    Ok(())
}
