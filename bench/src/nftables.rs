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
//!   nat-postrouting -> masquerading (mark 0x4000); filter-forward: new flows to
//!   ClusterIPs without endpoints/ports are rejected.
//! ```
use std::fmt::Write as _;

use crate::{
    names::{nft_endpoint_chain, nft_service_chain},
    scenario::{Scenario, Service, ServicePort, CLUSTER_CIDR},
};

const T: &str = "ip kube-proxy";

fn service_chain(s: &Service, p: &ServicePort) -> String {
    nft_service_chain(&s.namespace, &s.name, p.protocol.lower(), &p.name)
}

fn endpoint_chain(s: &Service, p: &ServicePort, ip: &str) -> String {
    nft_endpoint_chain(&s.namespace, &s.name, p.protocol.lower(), &p.name, ip, p.target_port)
}

/// The whole ruleset (kube-proxy's first, full sync): `nft -f` into a namespace.
pub fn ruleset(scenario: &Scenario) -> String {
    let mut out = String::with_capacity(scenario.services.len() * 3000);
    let _ = writeln!(out, "add table {T} {{ comment \"rules for kube-proxy\" ; }}");
    let _ = writeln!(out, "flush table {T}");
    base(&mut out);
    // Chains first: a rule or map element may only name an existing chain.
    for s in &scenario.services {
        for p in &s.ports {
            let _ = writeln!(out, "add chain {T} {}", service_chain(s, p));
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
        }
    }
    out
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
    let _ = writeln!(out, "add rule {T} {chain} meta l4proto {} dnat to {ip}:{}", p.protocol.lower(), p.target_port);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn scenario(n: usize) -> Scenario {
        let real: Vec<Ipv4Addr> = (0..3).map(|i| Ipv4Addr::new(10, 244, 0, 10 + i)).collect();
        Scenario::new(n, 3, &real).unwrap()
    }

    #[test]
    fn services_are_one_verdict_map_lookup() {
        let text = ruleset(&scenario(2));
        assert!(text.contains("add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n"));
        let measured = nft_service_chain("default", "measured", "tcp", "http");
        assert!(text.contains(&format!("add element ip kube-proxy service-ips {{ 10.96.0.2 . tcp . 80 : goto {measured} }}")));
        let ep = nft_endpoint_chain("default", "measured", "tcp", "http", "10.244.0.10", 8080);
        assert!(text.contains(&format!("numgen random mod 3 vmap {{ 0 : goto {ep} ,")));
        assert!(text.contains(&format!("add rule ip kube-proxy {ep} meta l4proto tcp dnat to 10.244.0.10:8080")));
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
        assert_eq!(text.lines().filter(|l| l.starts_with("add chain") && l.contains("__10.244.0.99/")).count(), 3);
        assert_eq!(text.lines().filter(|l| l.contains("numgen random mod 3")).count(), 3);
        assert_eq!(text.lines().filter(|l| l.starts_with("flush chain") && l.contains("__10.244.0.12/")).count(), 3);
    }
}
