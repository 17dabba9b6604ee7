//! The benchmark's Services: N-1 fillers and one measured Service, last.
//!
//! Every Service has `endpoints_per_service` endpoints. Only the measured
//! Service's endpoints are real Pods; the fillers point into 100.64.0.0/10, which
//! no lab namespace routes, so they never receive traffic. The measured Service
//! is last everywhere a ruleset is ordered (KUBE-SERVICES), the worst case for
//! linear rule evaluation.
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

pub const NAMESPACE: &str = "default";
/// The measured Service's name.
pub const MEASURED: &str = "measured";
/// The Pods' CIDR in the lab (kube-proxy's --cluster-cidr: no masquerade from it).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// First ClusterIP (10.96.0.1); inside the agent's default --service-cluster-ip-range.
const CLUSTER_IP_BASE: u32 = 0x0a60_0000;
/// Base of the fillers' endpoint addresses (100.64.0.0/10, the shared address
/// space no lab routes: 4,194,304 addresses, 100,000 Services of 10 and more).
pub const FAKE_ENDPOINT_BASE: u32 = 0x6440_0000;
pub const FAKE_ENDPOINTS_MAX: u64 = 1 << 22;
/// Most Services a scenario has (ClusterIPs from 10.96.0.1 stay inside the
/// agent's default --service-cluster-ip-range, 10.96.0.0/12).
pub const SERVICES_MAX: usize = 200_000;
/// Ports of the measured Service: (name, port, protocol, targetPort). HTTP last:
/// it is the one CRR and RR hit, so it is the very last rule of KUBE-SERVICES.
pub const STREAM_PORT: (&str, u16, Protocol, u16) = ("stream", 5201, Protocol::Tcp, 5201);
pub const UDP_PORT: (&str, u16, Protocol, u16) = ("dns", 53, Protocol::Udp, 8080);
pub const TCP_PORT: (&str, u16, Protocol, u16) = ("http", 80, Protocol::Tcp, 8080);
/// Kubernetes' default NodePort range (kube-apiserver's
/// --service-node-port-range; the agent's default too), inclusive: 2768 ports.
pub const NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// "tcp" / "udp", as kube-proxy hashes and nft spells it.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// "TCP" / "UDP", as Kubernetes objects spell it.
    pub fn upper(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: u16,
    /// Set on the ports of NodePort Services (externalTrafficPolicy Cluster).
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Ipv4Addr>,
}

impl Service {
    /// kube-proxy's ServicePortName string: "namespace/name:port".
    pub fn port_name(&self, p: &ServicePort) -> String {
        format!("{}/{}:{}", self.namespace, self.name, p.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// The measured Service is the last one.
    pub services: Vec<Service>,
}

fn port((name, port, protocol, target_port): (&str, u16, Protocol, u16)) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        protocol,
        target_port,
        node_port: None,
    }
}

impl Scenario {
    /// `n` Services (n >= 1) with `per_service` endpoints each; the measured one
    /// (last) has the `real` endpoints, which must number `per_service`.
    pub fn new(n: usize, per_service: usize, real: &[Ipv4Addr]) -> Result<Self> {
        if n == 0 || n > SERVICES_MAX {
            bail!("the number of Services must be within 1..={SERVICES_MAX}, not {n}");
        }
        if per_service == 0 || real.len() != per_service {
            bail!("{per_service} endpoints per Service but {} real endpoints", real.len());
        }
        if ((n - 1) as u64) * per_service as u64 > FAKE_ENDPOINTS_MAX {
            bail!("{n} Services x {per_service} endpoints do not fit in 100.64.0.0/10");
        }
        let mut services = Vec::with_capacity(n);
        for i in 0..n - 1 {
            let endpoints = (0..per_service)
                .map(|j| Ipv4Addr::from(FAKE_ENDPOINT_BASE + (i * per_service + j) as u32))
                .collect();
            services.push(Service {
                namespace: NAMESPACE.into(),
                name: format!("filler-{i:05}"),
                cluster_ip: Self::cluster_ip(i),
                ports: vec![port(TCP_PORT)],
                endpoints,
            });
        }
        services.push(Service {
            namespace: NAMESPACE.into(),
            name: MEASURED.into(),
            cluster_ip: Self::cluster_ip(n - 1),
            ports: vec![port(STREAM_PORT), port(UDP_PORT), port(TCP_PORT)],
            endpoints: real.to_vec(),
        });
        Ok(Self { services })
    }

    /// The ClusterIP of the i-th Service (10.96.0.1 + i).
    pub fn cluster_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(CLUSTER_IP_BASE + 1 + i as u32)
    }

    pub fn measured(&self) -> &Service {
        // `new` always pushes the measured Service last.
        &self.services[self.services.len() - 1]
    }

    /// The same scenario with one endpoint of the measured Service replaced: the
    /// "one endpoint change" whose propagation the benchmark times.
    pub fn with_measured_endpoint(&self, index: usize, ip: Ipv4Addr) -> Result<Self> {
        let mut next = self.clone();
        let last = next.services.len() - 1;
        let Some(slot) = next.services[last].endpoints.get_mut(index) else {
            bail!("the measured Service has no endpoint #{index}");
        };
        *slot = ip;
        Ok(next)
    }

    /// Number of Service ports (frontends): what `ferry svc list` shows.
    pub fn frontends(&self) -> usize {
        self.services.iter().map(|s| s.ports.len()).sum()
    }

    /// The same Services as NodePort Services (externalTrafficPolicy Cluster),
    /// for north-south traffic, as far as the NodePort range allows: a cluster
    /// has at most one Service port per NodePort (2768 in the default range).
    /// The measured Service's ports take the range's last ports, in port order
    /// (so HTTP, last, gets 32767), whatever N is; the fillers take one each
    /// from the range's start while ports remain, and the fillers beyond that
    /// stay ClusterIP Services. So up to N = 2766 every Service is a NodePort
    /// Service, and beyond, the NodePort ruleset is as large as a real cluster's
    /// can be.
    pub fn with_node_ports(mut self) -> Self {
        let (first, last) = NODE_PORT_RANGE;
        let (measured, fillers) = self
            .services
            .split_last_mut()
            .expect("a scenario has the measured Service");
        let k = measured.ports.len();
        for (j, p) in measured.ports.iter_mut().enumerate() {
            p.node_port = Some(last - (k - 1 - j) as u16);
        }
        let room = usize::from(last - first) + 1 - k;
        for (i, s) in fillers.iter_mut().take(room).enumerate() {
            for p in &mut s.ports {
                p.node_port = Some(first + i as u16);
            }
        }
        self
    }

    /// Number of Service ports with a NodePort.
    pub fn node_ports(&self) -> usize {
        self.services
            .iter()
            .flat_map(|s| &s.ports)
            .filter(|p| p.node_port.is_some())
            .count()
    }

    /// The Services with NodePorts.
    pub fn node_port_services(&self) -> usize {
        self.services
            .iter()
            .filter(|s| s.ports.iter().any(|p| p.node_port.is_some()))
            .count()
    }
}

/// The rulesets' unit tests' scenario: `n` Services of three endpoints,
/// 10.244.0.10-12 the measured one's.
#[cfg(test)]
pub(crate) fn sample(n: usize) -> Scenario {
    let real: Vec<Ipv4Addr> = (0..3).map(|i| Ipv4Addr::new(10, 244, 0, 10 + i)).collect();
    Scenario::new(n, 3, &real).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real(k: usize) -> Vec<Ipv4Addr> {
        (0..k).map(|i| Ipv4Addr::new(10, 244, 0, 10 + i as u8)).collect()
    }

    #[test]
    fn measured_service_is_last_with_real_endpoints() {
        let s = Scenario::new(3, 2, &real(2)).unwrap();
        assert_eq!(s.services.len(), 3);
        assert_eq!(s.measured().name, MEASURED);
        assert_eq!(s.measured().endpoints, real(2));
        assert_eq!(s.measured().cluster_ip, Ipv4Addr::new(10, 96, 0, 3));
        assert_eq!(
            s.services[0].endpoints,
            [Ipv4Addr::new(100, 64, 0, 0), Ipv4Addr::new(100, 64, 0, 1)]
        );
        assert_eq!(s.services[1].endpoints[0], Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(s.frontends(), 2 + 3);
        assert_eq!(
            s.services[0].port_name(&s.services[0].ports[0]),
            "default/filler-00000:http"
        );
    }

    #[test]
    fn node_ports_are_distinct_and_fill_the_range_at_most() {
        let s = Scenario::new(3, 2, &real(2)).unwrap().with_node_ports();
        let np: Vec<Option<u16>> = s.measured().ports.iter().map(|p| p.node_port).collect();
        assert_eq!(np, [Some(32765), Some(32766), Some(32767)]);
        assert_eq!(s.measured().ports[2].name, "http");
        assert_eq!(s.services[0].ports[0].node_port, Some(30000));
        assert_eq!(s.services[1].ports[0].node_port, Some(30001));
        assert_eq!((s.node_ports(), s.node_port_services()), (5, 3));
        // 2765 fillers + the measured Service's 3 ports: the whole range.
        let big = Scenario::new(3000, 1, &real(1)).unwrap().with_node_ports();
        assert_eq!(big.node_ports(), 2768);
        assert_eq!(big.node_port_services(), 2766);
        assert_eq!(big.services[2764].ports[0].node_port, Some(32764));
        assert_eq!(big.services[2765].ports[0].node_port, None);
        let mut all: Vec<u16> = big
            .services
            .iter()
            .flat_map(|s| &s.ports)
            .filter_map(|p| p.node_port)
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 2768);
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(Scenario::new(0, 1, &real(1)).is_err());
        assert!(Scenario::new(2, 3, &real(2)).is_err());
        assert!(Scenario::new(SERVICES_MAX + 1, 1, &real(1)).is_err());
        assert!(
            Scenario::new(200_000, 30, &real(30)).is_err(),
            "6M endpoints do not fit in 100.64.0.0/10"
        );
        assert!(Scenario::new(100_000, 10, &real(10)).is_ok());
    }

    #[test]
    fn endpoint_change_replaces_one_endpoint() {
        let s = Scenario::new(2, 2, &real(2)).unwrap();
        let spare = Ipv4Addr::new(10, 244, 0, 99);
        let t = s.with_measured_endpoint(1, spare).unwrap();
        assert_eq!(t.measured().endpoints, [real(2)[0], spare]);
        assert_eq!(t.services[0], s.services[0]);
        assert!(s.with_measured_endpoint(2, spare).is_err());
    }
}
