//! The generated kube-proxy rulesets are accepted by the real tools: checked and
//! then loaded into a throwaway network namespace (needs root, like every netns
//! test of the project), never the machine's own.
use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use ferry_bench::{
    iptables::{self, Mode},
    nftables,
    scenario::Scenario,
};

/// A network namespace deleted on drop, also when the test fails.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("fbt-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "delete", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} failed (run as root)");
        Self(name)
    }

    /// Runs `cmd args` inside the namespace with `input` on stdin.
    fn run(&self, cmd: &str, args: &[&str], input: &str) -> Result<String, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, cmd])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(input.as_bytes()).map_err(|e| e.to_string())?;
        drop(stdin);
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

fn scenario() -> Scenario {
    let real: Vec<Ipv4Addr> = (0..10).map(|i| Ipv4Addr::new(10, 244, 0, 10 + i)).collect();
    Scenario::new(2, 10, &real).expect("scenario")
}

#[test]
fn iptables_ruleset_restores_and_resyncs() {
    let ns = Netns::new("ipt");
    let s = scenario();
    let text = iptables::ruleset(&s, Mode::Initial, &[]);
    ns.run("iptables-restore", &["--test"], &text).unwrap();
    ns.run("iptables-restore", &[], &text).unwrap();
    let saved = ns.run("iptables-save", &["-t", "nat"], "").unwrap();
    assert!(saved.contains("-A KUBE-SERVICES -d 10.96.0.2/32 -p tcp -m comment --comment \"default/measured:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-"), "{saved}");
    assert!(
        saved.contains("-m statistic --mode random --probability 0.1"),
        "{saved}"
    );

    // One endpoint replaced, as kube-proxy resyncs: --noflush, stale chains deleted.
    let t = s.with_measured_endpoint(9, Ipv4Addr::new(10, 244, 0, 99)).unwrap();
    let stale = iptables::stale_chains(&s, &t);
    assert_eq!(stale.len(), 3, "one endpoint chain per port of the measured Service");
    ns.run(
        "iptables-restore",
        &["--noflush"],
        &iptables::ruleset(&t, Mode::Resync, &stale),
    )
    .unwrap();
    let saved = ns.run("iptables-save", &["-t", "nat"], "").unwrap();
    assert!(saved.contains("--to-destination 10.244.0.99:8080"));
    assert!(!saved.contains("--to-destination 10.244.0.19:"));
    assert!(!saved.contains(&stale[0]));
    assert_eq!(
        saved.matches("-A PREROUTING").count(),
        1,
        "the resync leaves the hooks alone"
    );
}

#[test]
fn nft_ruleset_loads_and_updates_incrementally() {
    let ns = Netns::new("nft");
    let s = scenario();
    let text = nftables::ruleset(&s, &[]);
    ns.run("nft", &["-c", "-f", "-"], &text).unwrap();
    ns.run("nft", &["-f", "-"], &text).unwrap();
    let listed = ns.run("nft", &["list", "table", "ip", "kube-proxy"], "").unwrap();
    assert!(listed.contains("numgen random mod 10 vmap"), "{listed}");
    assert!(listed.contains("10.96.0.2 . tcp . 80 : goto service-"));

    let t = s.with_measured_endpoint(9, Ipv4Addr::new(10, 244, 0, 99)).unwrap();
    ns.run("nft", &["-f", "-"], &nftables::endpoint_update(&s, &t)).unwrap();
    let listed = ns.run("nft", &["list", "table", "ip", "kube-proxy"], "").unwrap();
    assert!(listed.contains("dnat to 10.244.0.99:8080"));
    // The replaced endpoint's chains still exist (flushed) but nothing jumps there.
    let numgen: Vec<&str> = listed.lines().filter(|l| l.contains("numgen")).collect();
    assert!(numgen.iter().all(|l| !l.contains("__10.244.0.19/")), "{numgen:?}");
    // A full reload over an existing table works too (flush table first).
    ns.run("nft", &["-f", "-"], &nftables::ruleset(&t, &[])).unwrap();
}

/// The NodePort rules (KUBE-NODEPORTS → KUBE-EXT-…, nft's service-nodeports
/// map → external-… chains) load as generated, in both tools.
#[test]
fn node_port_rulesets_load() {
    let ns = Netns::new("np");
    let s = scenario().with_node_ports();
    ns.run("iptables-restore", &[], &iptables::ruleset(&s, Mode::Initial, &[]))
        .unwrap();
    let saved = ns.run("iptables-save", &["-t", "nat"], "").unwrap();
    assert!(
        saved.contains(
            "-A KUBE-NODEPORTS -p tcp -m comment --comment \"default/measured:http\" -m tcp --dport 32767 -j KUBE-EXT-"
        ),
        "{saved}"
    );
    assert!(saved.contains("masquerade traffic for default/measured:http external destinations\" -j KUBE-MARK-MASQ"));
    ns.run(
        "nft",
        &["-f", "-"],
        &nftables::ruleset(&s, &[Ipv4Addr::new(192, 168, 77, 11)]),
    )
    .unwrap();
    let listed = ns.run("nft", &["list", "table", "ip", "kube-proxy"], "").unwrap();
    assert!(listed.contains("tcp . 32767 : goto external-"), "{listed}");
    assert!(listed.contains("elements = { 192.168.77.11 }"), "{listed}");
}
