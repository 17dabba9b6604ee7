//! The kube-proxy iptables-mode ruleset for a [`Scenario`], in iptables-restore
//! format, as pkg/proxy/iptables/proxier.go writes it for ClusterIP Services:
//!
//! ```text
//! PREROUTING/OUTPUT -> KUBE-SERVICES: one rule per Service port (linear)
//!   -d VIP -p tcp --dport 80 -j KUBE-SVC-<hash>
//! KUBE-SVC-<hash>: ! -s clusterCIDR -> KUBE-MARK-MASQ, then one rule per endpoint
//!   -m statistic --mode random --probability 1/k -j KUBE-SEP-<hash> (last unconditional)
//! KUBE-SEP-<hash>: -s self -> KUBE-MARK-MASQ (hairpin), DNAT --to-destination ip:port
//! KUBE-NODEPORTS: last rule of KUBE-SERVICES (addrtype LOCAL); one rule per
//!   NodePort (linear, in scenario order: the measured Service's last)
//!   -p tcp --dport 32767 -j KUBE-EXT-<hash>
//! KUBE-EXT-<hash>: KUBE-MARK-MASQ (externalTrafficPolicy Cluster: the backend
//!   may be on another node), then -j KUBE-SVC-<hash>
//! POSTROUTING -> KUBE-POSTROUTING: MASQUERADE what carries mark 0x4000
//! ```
//!
//! Like kube-proxy, rule comments are dropped when there are more than 1000
//! endpoints ("large cluster mode"), which keeps the ruleset smaller.
use std::fmt::Write as _;

use crate::{
    names::{iptables_endpoint_chain, iptables_external_chain, iptables_service_chain},
    scenario::{Scenario, Service, ServicePort, CLUSTER_CIDR},
};

/// kube-proxy's largeClusterEndpointsThreshold.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;
const MASQ_MARK: &str = "0x4000/0x4000";

/// What the restore input is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Everything, including the jumps from the built-in chains: for
    /// `iptables-restore` (no --noflush) into an empty namespace.
    Initial,
    /// Only kube-proxy's own chains, each declared (hence flushed) and rewritten:
    /// kube-proxy's full resync with `iptables-restore --noflush`.
    Resync,
}

/// The restore input for `scenario`. `stale` are chains of an earlier ruleset
/// that no longer exist (they are flushed and deleted, as kube-proxy does).
pub fn ruleset(scenario: &Scenario, mode: Mode, stale: &[String]) -> String {
    let total_endpoints: usize = scenario.services.iter().map(|s| s.endpoints.len()).sum();
    let comments = total_endpoints <= LARGE_CLUSTER_ENDPOINTS;
    let mut out = String::with_capacity(scenario.services.len() * 2000);
    filter_table(&mut out, mode);
    nat_table(&mut out, scenario, mode, stale, comments);
    out
}

/// Every KUBE-SVC/KUBE-EXT/KUBE-SEP chain of a scenario (to find stale ones).
pub fn service_chains(scenario: &Scenario) -> Vec<String> {
    let mut v = Vec::new();
    for s in &scenario.services {
        for p in &s.ports {
            v.push(iptables_service_chain(&s.port_name(p), p.protocol.lower()));
            if p.node_port.is_some() {
                v.push(iptables_external_chain(&s.port_name(p), p.protocol.lower()));
            }
            for ep in &s.endpoints {
                v.push(sep_chain(s, p, &ep.to_string()));
            }
        }
    }
    v
}

/// The chains of `before` that `after` no longer has: what a resync from
/// `before` to `after` deletes (`ruleset(after, Mode::Resync, stale)`).
pub fn stale_chains(before: &Scenario, after: &Scenario) -> Vec<String> {
    let now: std::collections::HashSet<String> = service_chains(after).into_iter().collect();
    service_chains(before)
        .into_iter()
        .filter(|c| !now.contains(c))
        .collect()
}

fn sep_chain(s: &Service, p: &ServicePort, ip: &str) -> String {
    iptables_endpoint_chain(&s.port_name(p), p.protocol.lower(), &format!("{ip}:{}", p.target_port))
}

fn filter_table(out: &mut String, mode: Mode) {
    out.push_str("*filter\n");
    if mode == Mode::Initial {
        out.push_str(":INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    if mode == Mode::Initial {
        out.push_str(concat!(
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
            "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        ));
    }
    out.push_str(concat!(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n",
    ));
}

fn nat_table(out: &mut String, scenario: &Scenario, mode: Mode, stale: &[String], comments: bool) {
    out.push_str("*nat\n");
    if mode == Mode::Initial {
        out.push_str(
            ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
        );
    }
    for c in ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in service_chains(scenario).iter().chain(stale) {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    if mode == Mode::Initial {
        out.push_str(concat!(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
            "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        ));
    }
    let _ = write!(
        out,
        concat!(
            "-A KUBE-POSTROUTING -m mark ! --mark {m} -j RETURN\n",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
        ),
        m = MASQ_MARK
    );
    // KUBE-SERVICES: one rule per Service port, in scenario order (measured last).
    for s in &scenario.services {
        for p in &s.ports {
            let name = s.port_name(p);
            let proto = p.protocol.lower();
            let _ = writeln!(
                out,
                "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {} -j {}",
                s.cluster_ip,
                p.port,
                iptables_service_chain(&name, proto)
            );
        }
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for s in &scenario.services {
        for p in &s.ports {
            service_rules(out, s, p, comments);
        }
    }
    for c in stale {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
}

fn service_rules(out: &mut String, s: &Service, p: &ServicePort, comments: bool) {
    let name = s.port_name(p);
    let proto = p.protocol.lower();
    let svc = iptables_service_chain(&name, proto);
    if let Some(node_port) = p.node_port {
        // As kube-proxy writes them for externalTrafficPolicy Cluster (the
        // comments stay in large cluster mode, as there).
        let ext = iptables_external_chain(&name, proto);
        let _ = writeln!(
            out,
            "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {node_port} -j {ext}"
        );
        let _ = writeln!(
            out,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(out, "-A {ext} -j {svc}");
    }
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        s.cluster_ip, p.port
    );
    // (address, its KUBE-SEP chain): the chain name is a hash, made once.
    let eps: Vec<(String, String)> = s
        .endpoints
        .iter()
        .map(|ep| {
            let ip = ep.to_string();
            let sep = sep_chain(s, p, &ip);
            (ip, sep)
        })
        .collect();
    let k = eps.len();
    for (i, (ip, sep)) in eps.iter().enumerate() {
        let comment = if comments {
            format!("-m comment --comment \"{name} -> {ip}:{}\" ", p.target_port)
        } else {
            String::new()
        };
        if i + 1 < k {
            // kube-proxy's computeProbability: %0.10f of 1/(remaining endpoints).
            let prob = 1.0 / (k - i) as f64;
            let _ = writeln!(
                out,
                "-A {svc} {comment}-m statistic --mode random --probability {prob:.10} -j {sep}"
            );
        } else {
            let _ = writeln!(out, "-A {svc} {comment}-j {sep}");
        }
    }
    for (ip, sep) in &eps {
        let comment = if comments {
            format!("-m comment --comment {name} ")
        } else {
            String::new()
        };
        let _ = writeln!(out, "-A {sep} {comment}-s {ip}/32 -j KUBE-MARK-MASQ");
        let _ = writeln!(
            out,
            "-A {sep} {comment}-m {proto} -p {proto} -j DNAT --to-destination {ip}:{}",
            p.target_port
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::scenario::sample as scenario;

    #[test]
    fn measured_service_is_the_last_service_rule() {
        let text = ruleset(&scenario(2), Mode::Initial, &[]);
        let svc_rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("-j KUBE-SVC-"))
            .collect();
        assert_eq!(svc_rules.len(), 1 + 3);
        assert!(svc_rules[3].contains("default/measured:http cluster IP"));
        assert!(svc_rules[3].contains("-d 10.96.0.2/32 --dport 80"));
        assert!(text.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"));
    }

    #[test]
    fn endpoints_are_chosen_with_kube_proxy_probabilities() {
        let text = ruleset(&scenario(1), Mode::Initial, &[]);
        let svc = iptables_service_chain("default/measured:http", "tcp");
        let rules: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("-A {svc} "))).collect();
        assert_eq!(rules.len(), 4);
        assert!(rules[0].contains("! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"));
        assert!(rules[1].contains("--probability 0.3333333333"));
        assert!(rules[2].contains("--probability 0.5000000000"));
        assert!(!rules[3].contains("statistic"));
        let sep = iptables_endpoint_chain("default/measured:http", "tcp", "10.244.0.12:8080");
        assert!(rules[3].ends_with(&format!("-j {sep}")));
        assert!(text.contains(&format!("-A {sep} -m comment --comment default/measured:http -m tcp -p tcp -j DNAT --to-destination 10.244.0.12:8080")));
        assert!(text.contains(&format!(
            "-A {sep} -m comment --comment default/measured:http -s 10.244.0.12/32 -j KUBE-MARK-MASQ"
        )));
    }

    #[test]
    fn resync_declares_every_chain_and_deletes_stale_ones() {
        let text = ruleset(&scenario(2), Mode::Resync, &["KUBE-SEP-OLD".into()]);
        assert!(!text.contains("PREROUTING"));
        assert!(text.contains(":KUBE-SEP-OLD - [0:0]\n"));
        assert!(text.contains("-X KUBE-SEP-OLD\n"));
        for c in service_chains(&scenario(2)) {
            assert!(text.contains(&format!(":{c} - [0:0]\n")), "{c} not declared");
        }
    }

    #[test]
    fn node_ports_jump_to_an_external_chain_that_masquerades() {
        let text = ruleset(&scenario(2).with_node_ports(), Mode::Initial, &[]);
        let name = "default/measured:http";
        let (svc, ext) = (
            iptables_service_chain(name, "tcp"),
            iptables_external_chain(name, "tcp"),
        );
        assert!(text.contains(&format!(":{ext} - [0:0]\n")));
        let nodeports: Vec<&str> = text.lines().filter(|l| l.starts_with("-A KUBE-NODEPORTS ")).collect();
        assert_eq!(nodeports.len(), 1 + 3, "one per NodePort");
        assert_eq!(
            nodeports[3],
            format!("-A KUBE-NODEPORTS -m comment --comment {name} -m tcp -p tcp --dport 32767 -j {ext}")
        );
        assert!(nodeports[2].contains("-m udp -p udp --dport 32766 -j KUBE-EXT-"));
        let ext_rules: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("-A {ext} "))).collect();
        assert_eq!(
            ext_rules,
            [
                format!("-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"),
                format!("-A {ext} -j {svc}"),
            ]
        );
        // Reached from KUBE-SERVICES for local destinations; masqueraded in
        // POSTROUTING by the mark.
        assert!(text.contains("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n"));
        assert!(text.contains("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n"));
        assert!(service_chains(&scenario(2).with_node_ports()).contains(&ext));
        // ClusterIP Services have none.
        assert!(!ruleset(&scenario(2), Mode::Initial, &[]).contains("KUBE-EXT-"));
    }

    #[test]
    fn comments_are_dropped_in_large_cluster_mode() {
        let real: Vec<Ipv4Addr> = (0..10).map(|i| Ipv4Addr::new(10, 244, 0, 10 + i)).collect();
        let big = Scenario::new(200, 10, &real).unwrap();
        let text = ruleset(&big, Mode::Initial, &[]);
        assert!(!text
            .lines()
            .any(|l| l.starts_with("-A KUBE-SEP-") && l.contains("comment")));
    }
}
