//! The scenario as Kubernetes YAML for `ferry agent --manifests`: Services
//! without selectors plus manual EndpointSlices (as in the user's lecture 000),
//! in compact flow style so 10,000 Services stay a few MB.
use std::fmt::Write as _;

use crate::scenario::{Scenario, Service};

/// File names: the fillers, and the measured Service with its slice alone in a
/// file so an endpoint change rewrites one small file.
pub const FILLERS_FILE: &str = "fillers.yaml";
pub const MEASURED_FILE: &str = "measured.yaml";

/// (file name, YAML) for every Service of the scenario.
pub fn files(scenario: &Scenario) -> Vec<(String, String)> {
    let (measured, fillers) = scenario
        .services
        .split_last()
        .expect("a scenario has the measured Service");
    let mut out = String::with_capacity(fillers.len() * 900);
    for s in fillers {
        service(&mut out, s);
    }
    vec![
        (FILLERS_FILE.into(), out),
        (MEASURED_FILE.into(), service_yaml(measured)),
    ]
}

/// One Service and its EndpointSlice (the measured Service's file,
/// [`MEASURED_FILE`], say).
pub fn service_yaml(measured: &Service) -> String {
    let mut m = String::new();
    service(&mut m, measured);
    m
}

fn service(out: &mut String, s: &Service) {
    let ports: Vec<String> = s
        .ports
        .iter()
        .map(|p| {
            let node_port = p.node_port.map(|np| format!(", nodePort: {np}")).unwrap_or_default();
            format!(
                "{{name: {}, port: {}, targetPort: {}, protocol: {}{node_port}}}",
                p.name,
                p.port,
                p.target_port,
                p.protocol.upper()
            )
        })
        .collect();
    // NodePort Services keep the default externalTrafficPolicy (Cluster).
    let kind = if s.ports.iter().any(|p| p.node_port.is_some()) {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let _ = writeln!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec: {{type: {kind}, clusterIP: {}, ports: [{}]}}",
        s.name,
        s.namespace,
        s.cluster_ip,
        ports.join(", ")
    );
    let slice_ports: Vec<String> = s
        .ports
        .iter()
        .map(|p| {
            format!(
                "{{name: {}, port: {}, protocol: {}}}",
                p.name,
                p.target_port,
                p.protocol.upper()
            )
        })
        .collect();
    let endpoints: Vec<String> = s
        .endpoints
        .iter()
        .map(|ip| format!("  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}"))
        .collect();
    let _ = writeln!(
        out,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {n}-bench, namespace: {ns}, labels: {{kubernetes.io/service-name: {n}}}}}\naddressType: IPv4\nports: [{}]\nendpoints:\n{}",
        slice_ports.join(", "),
        endpoints.join("\n"),
        n = s.name,
        ns = s.namespace,
    );
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn measured_service_has_its_own_file_with_a_slice() {
        let real: Vec<Ipv4Addr> = (0..2).map(|i| Ipv4Addr::new(10, 244, 0, 10 + i)).collect();
        let f = files(&Scenario::new(3, 2, &real).unwrap());
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].1.matches("kind: Service\n").count(), 2);
        assert_eq!(f[0].1.matches("kind: EndpointSlice\n").count(), 2);
        let m = &f[1].1;
        assert!(m.contains("metadata: {name: measured, namespace: default}"));
        assert!(m.contains("clusterIP: 10.96.0.3"));
        assert!(m.contains("{name: dns, port: 53, targetPort: 8080, protocol: UDP}"));
        assert!(m.contains("labels: {kubernetes.io/service-name: measured}"));
        assert!(m.contains("  - {addresses: [\"10.244.0.11\"], conditions: {ready: true}}"));
        assert!(m.contains("spec: {type: ClusterIP,"));
    }

    #[test]
    fn node_port_services_name_their_node_ports() {
        let real: Vec<Ipv4Addr> = (0..2).map(|i| Ipv4Addr::new(10, 244, 0, 10 + i)).collect();
        let f = files(&Scenario::new(2, 2, &real).unwrap().with_node_ports());
        let m = &f[1].1;
        assert!(m.contains("spec: {type: NodePort, clusterIP: 10.96.0.2, ports: ["));
        assert!(m.contains("{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 32767}"));
        assert!(m.contains("{name: dns, port: 53, targetPort: 8080, protocol: UDP, nodePort: 32766}"));
        assert!(f[0].1.contains("type: NodePort") && f[0].1.contains("nodePort: 30000}"));
    }
}
