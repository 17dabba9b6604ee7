//! The kube-proxy nftables-mode ruleset for a [`Scenario`], as `nft -f` input in
//! the shape pkg/proxy/nftables/proxier.go gives its transactions:
//!
//! ```text
//! table ip kube-proxy
//!   nat-prerouting/nat-output (hook, dstnat) -> services:
//!     ip daddr . meta l4proto . th dport vmap @service-ips      (one hash lookup)
//!   service-ips: VIP . proto . port : goto service-<hash>-ns/name/proto/port
//!   service-…: masquerade mark for non-cluster sources, then
//!     numgen random mod k vmap { 0 : goto endpoint-…, … }
//!   endpoint-…: hairpin mark, dnat to ip:port
//!   services, 2nd rule: ip daddr @nodeport-ips meta l4proto . th dport
//!     vmap @service-nodeports                           (NodePorts: one lookup)
//!   service-nodeports: proto . nodePort : goto external-<hash>-ns/name/proto/port
//!   external-…: masquerade mark (externalTrafficPolicy Cluster), goto service-…
//!   nat-postrouting -> masquerading (mark 0x4000); filter-forward: new flows to
//!   ClusterIPs without endpoints/ports are rejected.
//! ```
use std::{fmt::Write as _, net::Ipv4Addr};

use crate::{
    names::{nft_endpoint_chain, nft_external_chain, nft_service_chain},
    scenario::{Scenario, Service, ServicePort, CLUSTER_CIDR},
};

const T: &str = "ip kube-proxy";

fn service_chain(s: &Service, p: &ServicePort) -> String {
    nft_service_chain(&s.namespace, &s.name, p.protocol.lower(), &p.name)
}

fn endpoint_chain(s: &Service, p: &ServicePort, ip: &str) -> String {
    nft_endpoint_chain(&s.namespace, &s.name, p.protocol.lower(), &p.name, ip, p.target_port)
}

fn external_chain(s: &Service, p: &ServicePort) -> String {
    nft_external_chain(&s.namespace, &s.name, p.protocol.lower(), &p.name)
}

/// The whole ruleset (kube-proxy's first, full sync): `nft -f` into a namespace.
/// `nodeport_ips`: the node's addresses that serve NodePorts (kube-proxy's
/// nftables mode defaults --nodeport-addresses to the node's primary IPs).
pub fn ruleset(scenario: &Scenario, nodeport_ips: &[Ipv4Addr]) -> String {
    let mut out = String::with_capacity(scenario.services.len() * 3000);
    let _ = writeln!(out, "add table {T} {{ comment \"rules for kube-proxy\" ; }}");
    let _ = writeln!(out, "flush table {T}");
    base(&mut out);
    for ip in nodeport_ips {
        let _ = writeln!(out, "add element {T} nodeport-ips {{ {ip} }}");
    }
    // Chains first: a rule or map element may only name an existing chain.
    for s in &scenario.services {
        for p in &s.ports {
            let _ = writeln!(out, "add chain {T} {}", service_chain(s, p));
            if p.node_port.is_some() {
                let _ = writeln!(out, "add chain {T} {}", external_chain(s, p));
            }
            for ep in &s.endpoints {
                let _ = writeln!(out, "add chain {T} {}", endpoint_chain(s, p, &ep.to_string()));
            }
        }
    }
    for s in &scenario.services {
        for p in &s.ports {
            let _ = writeln!(out, "add element {T} cluster-ips {{ {} }}", s.cluster_ip);
            let _ = writeln!(
                out,
                "add element {T} service-ips {{ {} . {} . {} : goto {} }}",
                s.cluster_ip,
                p.protocol.lower(),
                p.port,
                service_chain(s, p)
            );
            service_port(&mut out, s, p);
            for ep in &s.endpoints {
                endpoint(&mut out, s, p, &ep.to_string());
            }
            if let Some(node_port) = p.node_port {
                node_port_rules(&mut out, s, p, node_port);
            }
        }
    }
    out
}

/// A NodePort as kube-proxy writes it for externalTrafficPolicy Cluster: the
/// external chain marks for masquerade (the backend may be on another node)
/// and goes on to the service chain; the service-nodeports map points at it.
fn node_port_rules(out: &mut String, s: &Service, p: &ServicePort, node_port: u16) {
    let ext = external_chain(s, p);
    let _ = writeln!(out, "add rule {T} {ext} jump mark-for-masquerade");
    let _ = writeln!(out, "add rule {T} {ext} goto {}", service_chain(s, p));
    let _ = writeln!(
        out,
        "add element {T} service-nodeports {{ {} . {node_port} : goto {ext} }}",
        p.protocol.lower()
    );
}

/// kube-proxy's partial sync after the measured Service's endpoints changed
/// from `before` to `after`: new endpoint chains are added, the Service chains
/// rewritten (flush + the numgen rule over the new endpoints), and the endpoint
/// chains that are gone flushed (kube-proxy deletes them a second later).
pub fn endpoint_update(before: &Scenario, after: &Scenario) -> String {
    let (old, new) = (before.measured(), after.measured());
    let mut out = String::new();
    for p in &new.ports {
        for ep in new.endpoints.iter().filter(|e| !old.endpoints.contains(e)) {
            endpoint(&mut out, new, p, &ep.to_string());
        }
        let _ = writeln!(out, "flush chain {T} {}", service_chain(new, p));
        service_port(&mut out, new, p);
        for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
            let _ = writeln!(out, "flush chain {T} {}", endpoint_chain(old, p, &ep.to_string()));
        }
    }
    out
}

fn base(out: &mut String) {
    let _ = write!(
        out,
        concat!(
            "add chain {t} mark-for-masquerade\n",
            "add rule {t} mark-for-masquerade mark set mark or 0x4000\n",
            "add chain {t} masquerading\n",
            "add rule {t} masquerading mark and 0x4000 == 0 return\n",
            "add rule {t} masquerading mark set mark xor 0x4000\n",
            "add rule {t} masquerading masquerade fully-random\n",
            "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n",
            "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n",
            "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n",
            "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n",
            "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n",
            "add chain {t} services\n",
            "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n",
            "add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n",
            "add chain {t} service-endpoints-check\n",
            "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n",
            "add chain {t} cluster-ips-check\n",
            "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n",
            "add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}\n",
            "add rule {t} filter-forward ct state new jump service-endpoints-check\n",
            "add rule {t} filter-forward ct state new jump cluster-ips-check\n",
            "add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n",
            "add rule {t} nat-prerouting jump services\n",
            "add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n",
            "add rule {t} nat-output jump services\n",
            "add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n",
            "add rule {t} nat-postrouting jump masquerading\n",
        ),
        t = T
    );
}

fn service_port(out: &mut String, s: &Service, p: &ServicePort) {
    let chain = service_chain(s, p);
    let proto = p.protocol.lower();
    let _ = writeln!(out, "add chain {T} {chain}");
    let _ = writeln!(
        out,
        "add rule {T} {chain} ip daddr {} {proto} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.cluster_ip, p.port
    );
    let elements: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", endpoint_chain(s, p, &ep.to_string())))
        .collect();
    let _ = writeln!(
        out,
        "add rule {T} {chain} numgen random mod {} vmap {{ {} }}",
        s.endpoints.len(),
        elements.join(" , ")
    );
}

fn endpoint(out: &mut String, s: &Service, p: &ServicePort, ip: &str) {
    let chain = endpoint_chain(s, p, ip);
    let _ = writeln!(out, "add chain {T} {chain}");
    let _ = writeln!(out, "add rule {T} {chain} ip saddr {ip} jump mark-for-masquerade");
    let _ = writeln!(
        out,
        "add rule {T} {chain} meta l4proto {} dnat to {ip}:{}",
        p.protocol.lower(),
        p.target_port
    );
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::scenario::sample as scenario;

    #[test]
    fn services_are_one_verdict_map_lookup() {
        let text = ruleset(&scenario(2), &[]);
        assert!(text.contains("add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n"));
        let measured = nft_service_chain("default", "measured", "tcp", "http");
        assert!(text.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.2 . tcp . 80 : goto {measured} }}"
        )));
        let ep = nft_endpoint_chain("default", "measured", "tcp", "http", "10.244.0.10", 8080);
        assert!(text.contains(&format!("numgen random mod 3 vmap {{ 0 : goto {ep} ,")));
        assert!(text.contains(&format!(
            "add rule ip kube-proxy {ep} meta l4proto tcp dnat to 10.244.0.10:8080"
        )));
    }

    #[test]
    fn node_ports_are_one_more_map_lookup_to_an_external_chain() {
        let text = ruleset(&scenario(2).with_node_ports(), &[Ipv4Addr::new(192, 168, 77, 11)]);
        assert!(text.contains("add element ip kube-proxy nodeport-ips { 192.168.77.11 }\n"));
        assert!(text.contains(
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n"
        ));
        let ext = nft_external_chain("default", "measured", "tcp", "http");
        let svc = nft_service_chain("default", "measured", "tcp", "http");
        assert!(text.contains(&format!("add chain ip kube-proxy {ext}\n")));
        assert!(text.contains(&format!(
            "add element ip kube-proxy service-nodeports {{ tcp . 32767 : goto {ext} }}\n"
        )));
        assert!(text.contains(&format!(
            "add rule ip kube-proxy {ext} jump mark-for-masquerade\nadd rule ip kube-proxy {ext} goto {svc}\n"
        )));
        assert!(text.contains("service-nodeports { udp . 32766 : goto external-"));
        // The chain exists before the element that names it.
        assert!(text.find(&format!("add chain ip kube-proxy {ext}")) < text.find(&format!("goto {ext} }}")));
        assert_eq!(
            text.matches("add element ip kube-proxy service-nodeports").count(),
            1 + 3
        );
        assert!(!ruleset(&scenario(2), &[]).contains("external-"));
    }

    #[test]
    fn endpoint_update_touches_only_the_measured_service() {
        let before = scenario(2);
        let spare = Ipv4Addr::new(10, 244, 0, 99);
        let after = before.with_measured_endpoint(2, spare).unwrap();
        let text = endpoint_update(&before, &after);
        assert!(!text.contains("filler"));
        // Three ports: one new endpoint chain, one rewritten service chain and one
        // flushed endpoint chain each.
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("add chain") && l.contains("__10.244.0.99/"))
                .count(),
            3
        );
        assert_eq!(text.lines().filter(|l| l.contains("numgen random mod 3")).count(), 3);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("flush chain") && l.contains("__10.244.0.12/"))
                .count(),
            3
        );
    }
}
