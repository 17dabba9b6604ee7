//! Who a Service and each of its frontends are: typed identities from
//! translation to the maps, inspection and metrics.
//!
//! `Display` is for people (logs, errors, `ferry svc list`); nothing parses it
//! back. The service-names map holds a [`FrontendId`] as explicit fields,
//! written and read only by [`FrontendId::to_map`] and [`FrontendId::from_map`].
use std::{cmp::Ordering, fmt};

use ferry_common::{frontend_kind, svc_flags, ServiceName};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A Service: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceId {
    pub namespace: String,
    pub name: String,
}

impl ServiceId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The Service an object's metadata names (namespace `default` when unset).
    pub fn of(meta: &ObjectMeta) -> Self {
        Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or("<unnamed>"),
        )
    }
}

/// Ordered as the text `namespace/name` is: the order Services claim
/// addresses and get ClusterIPs in, which every node (whatever its version)
/// must agree on.
impl Ord for ServiceId {
    fn cmp(&self, other: &Self) -> Ordering {
        // Without building the texts (this orders every Service of a sync):
        // different namespaces decide, compared as `namespace/`.
        if self.namespace == other.namespace {
            return self.name.cmp(&other.name);
        }
        let (a, b) = (self.namespace.as_bytes(), other.namespace.as_bytes());
        let n = a.len().min(b.len());
        match a[..n].cmp(&b[..n]) {
            // One is a prefix of the other: its '/' meets the other's next byte.
            Ordering::Equal if a.len() < b.len() => b'/'.cmp(&b[n]),
            Ordering::Equal => a[n].cmp(&b'/'),
            decided => decided,
        }
    }
}

impl PartialOrd for ServiceId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service port: its name, or its number when it has none.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortId {
    Name(String),
    Number(u16),
}

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortId::Name(n) => f.write_str(n),
            PortId::Number(p) => write!(f, "{p}"),
        }
    }
}

/// The kind of address a client dials for a Service port.
///
/// The internal-scope twin of a NodePort, ExternalIP or LoadBalancer
/// frontend (externalTrafficPolicy: Local, `svc_flags::INTERNAL`) is not a
/// kind of its own: it is the same frontend (same address, reverse-NAT id and
/// identity) with the endpoints of every node, for clients inside the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

impl FrontendKind {
    pub const ALL: [FrontendKind; 4] = [
        FrontendKind::ClusterIP,
        FrontendKind::NodePort,
        FrontendKind::ExternalIP,
        FrontendKind::LoadBalancer,
    ];

    /// Its bit in `ServiceValue::flags`.
    pub const fn flag(self) -> u32 {
        match self {
            FrontendKind::ClusterIP => svc_flags::CLUSTER_IP,
            FrontendKind::NodePort => svc_flags::NODE_PORT,
            FrontendKind::ExternalIP => svc_flags::EXTERNAL_IP,
            FrontendKind::LoadBalancer => svc_flags::LOAD_BALANCER,
        }
    }

    /// The kind a service entry's flags carry (ClusterIP when none does).
    pub fn of_flags(flags: u32) -> Self {
        Self::ALL
            .into_iter()
            .find(|k| flags & k.flag() != 0)
            .unwrap_or(FrontendKind::ClusterIP)
    }

    /// Its code in `ServiceName::kind`.
    const fn to_map(self) -> u8 {
        match self {
            FrontendKind::ClusterIP => frontend_kind::CLUSTER_IP,
            FrontendKind::NodePort => frontend_kind::NODE_PORT,
            FrontendKind::ExternalIP => frontend_kind::EXTERNAL_IP,
            FrontendKind::LoadBalancer => frontend_kind::LOAD_BALANCER,
        }
    }

    fn from_map(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.to_map() == code)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIP => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIP => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frontend: one kind of address of one Service port. Its addresses (a
/// NodePort has one per node address) share it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendId {
    pub service: ServiceId,
    pub port: PortId,
    pub kind: FrontendKind,
}

/// `namespace/name:port (Kind)`.
impl fmt::Display for FrontendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} ({})", self.service, self.port, self.kind)
    }
}

/// Why a service-names map value is not a [`FrontendId`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("no frontend kind (an empty entry)")]
    Empty,
    #[error("unknown frontend kind {0}")]
    Kind(u8),
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
}

impl FrontendId {
    /// The service-names map value. A field longer than the map's (the API
    /// refuses such names; a manifest file might not) is cut on a character
    /// boundary: the names are for people and metrics, never for the dataplane.
    pub fn to_map(&self) -> ServiceName {
        let mut v = ServiceName {
            kind: self.kind.to_map(),
            ..ServiceName::default()
        };
        put(&mut v.namespace, &self.service.namespace);
        put(&mut v.name, &self.service.name);
        match &self.port {
            PortId::Name(n) => put(&mut v.port_name, n),
            PortId::Number(p) => v.port = *p,
        }
        v
    }

    /// The identity a service-names map value holds.
    pub fn from_map(v: &ServiceName) -> Result<Self, NameError> {
        let kind = match v.kind {
            0 => return Err(NameError::Empty),
            k => FrontendKind::from_map(k).ok_or(NameError::Kind(k))?,
        };
        let port_name = get(&v.port_name, "the port name")?;
        Ok(Self {
            service: ServiceId::new(get(&v.namespace, "the namespace")?, get(&v.name, "the name")?),
            port: if port_name.is_empty() {
                PortId::Number(v.port)
            } else {
                PortId::Name(port_name.to_string())
            },
            kind,
        })
    }
}

/// The Service (`namespace/name`) and port (name, or number when unnamed)
/// that `ferry svc list` and the metrics show for a frontend (empty strings
/// for one without a valid names-map entry).
pub fn service_and_port(id: Option<&FrontendId>) -> (String, String) {
    id.map_or_else(Default::default, |id| (id.service.to_string(), id.port.to_string()))
}

/// Writes `s` NUL-padded into `field`, cut on a character boundary.
fn put(field: &mut [u8], s: &str) {
    let mut end = s.len().min(field.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    field[..end].copy_from_slice(&s.as_bytes()[..end]);
}

/// The text of a NUL-padded field.
fn get<'a>(field: &'a [u8], what: &'static str) -> Result<&'a str, NameError> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end]).map_err(|_| NameError::Utf8(what))
}

/// A Service's spec.type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    /// A DNS name only: nothing to program.
    ExternalName,
}

impl ServiceType {
    /// spec.type as the API object has it (unset: ClusterIP); the error names
    /// the value and the ones allowed.
    pub fn from_spec(type_: Option<&str>) -> Result<Self, String> {
        Ok(match type_ {
            None | Some("ClusterIP") => ServiceType::ClusterIP,
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => ServiceType::ExternalName,
            Some(other) => {
                return Err(format!(
                    "unknown type {other:?} (ClusterIP, NodePort, LoadBalancer, ExternalName)"
                ))
            }
        })
    }

    /// Every port gets a NodePort (NodePort and LoadBalancer Services).
    pub fn has_node_ports(self) -> bool {
        matches!(self, ServiceType::NodePort | ServiceType::LoadBalancer)
    }
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(port: PortId, kind: FrontendKind) -> FrontendId {
        FrontendId {
            service: ServiceId::new("kube-system", "dns"),
            port,
            kind,
        }
    }

    #[test]
    fn display_is_namespace_name_port_and_kind() {
        assert_eq!(ServiceId::new("default", "web").to_string(), "default/web");
        assert_eq!(
            id(PortId::Name("dns-udp".into()), FrontendKind::ClusterIP).to_string(),
            "kube-system/dns:dns-udp (ClusterIP)"
        );
        assert_eq!(
            id(PortId::Number(53), FrontendKind::LoadBalancer).to_string(),
            "kube-system/dns:53 (LoadBalancer)"
        );
        assert_eq!(ServiceType::ExternalName.to_string(), "ExternalName");
    }

    #[test]
    fn the_names_map_codec_round_trips_every_kind_and_port() {
        for kind in FrontendKind::ALL {
            for port in [PortId::Name("http".into()), PortId::Number(8080), PortId::Number(0)] {
                let want = id(port, kind);
                let v = want.to_map();
                assert_eq!(FrontendId::from_map(&v), Ok(want.clone()));
                assert_eq!(FrontendKind::of_flags(kind.flag() | svc_flags::AFFINITY), kind);
            }
        }
        // Fields at the API's limits fit whole.
        let long = FrontendId {
            service: ServiceId::new("n".repeat(63), "s".repeat(63)),
            port: PortId::Name("p".repeat(15)),
            kind: FrontendKind::NodePort,
        };
        assert_eq!(FrontendId::from_map(&long.to_map()), Ok(long));
        // Fields the map has no NUL for (64 bytes) still read back whole.
        let full = ServiceId::new("n".repeat(64), "é".repeat(32));
        let v = FrontendId {
            service: full.clone(),
            port: PortId::Number(1),
            kind: FrontendKind::ClusterIP,
        }
        .to_map();
        assert_eq!(FrontendId::from_map(&v).unwrap().service, full);
    }

    #[test]
    fn the_codec_cuts_overlong_names_on_a_char_boundary_and_refuses_garbage() {
        let v = FrontendId {
            service: ServiceId::new("default", "é".repeat(40)), // 80 bytes
            port: PortId::Name("x".repeat(20)),
            kind: FrontendKind::ExternalIP,
        }
        .to_map();
        let back = FrontendId::from_map(&v).unwrap();
        assert_eq!(back.service.name, "é".repeat(32));
        assert_eq!(back.port, PortId::Name("x".repeat(16)));
        assert_eq!(FrontendId::from_map(&ServiceName::default()), Err(NameError::Empty));
        let bad_kind = ServiceName { kind: 9, ..v };
        assert_eq!(FrontendId::from_map(&bad_kind), Err(NameError::Kind(9)));
        let mut bad_text = v;
        bad_text.namespace[0] = 0xff;
        assert_eq!(FrontendId::from_map(&bad_text), Err(NameError::Utf8("the namespace")));
    }

    #[test]
    fn inspection_shows_service_and_port_of_an_entry() {
        let named = id(PortId::Name("dns-udp".into()), FrontendKind::NodePort);
        assert_eq!(
            service_and_port(Some(&named)),
            ("kube-system/dns".into(), "dns-udp".into())
        );
        let unnamed = id(PortId::Number(80), FrontendKind::ClusterIP);
        assert_eq!(
            service_and_port(Some(&unnamed)),
            ("kube-system/dns".into(), "80".into())
        );
        assert_eq!(service_and_port(None), (String::new(), String::new()));
    }

    #[test]
    fn service_ids_order_as_their_text() {
        // '-' sorts before '/': "a-x/c" < "a/b" as text, though "a" < "a-x".
        let mut ids = [
            ServiceId::new("a", "b"),
            ServiceId::new("ab", "a"),
            ServiceId::new("a-x", "c"),
            ServiceId::new("a", "a"),
            ServiceId::new("b", ""),
            ServiceId::new("a.b", "z"),
            ServiceId::new("", "q"),
        ];
        ids.sort();
        let text: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let mut sorted = text.clone();
        sorted.sort();
        assert_eq!(text, sorted);
        assert_eq!(text, ["/q", "a-x/c", "a.b/z", "a/a", "a/b", "ab/a", "b/"]);
        for x in &ids {
            for y in &ids {
                assert_eq!(x.cmp(y), x.to_string().cmp(&y.to_string()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn service_types_from_the_spec() {
        assert_eq!(ServiceType::from_spec(None), Ok(ServiceType::ClusterIP));
        assert_eq!(
            ServiceType::from_spec(Some("LoadBalancer")),
            Ok(ServiceType::LoadBalancer)
        );
        assert!(ServiceType::LoadBalancer.has_node_ports() && !ServiceType::ClusterIP.has_node_ports());
        let e = ServiceType::from_spec(Some("Headless")).unwrap_err();
        assert!(e.contains("\"Headless\"") && e.contains("ExternalName"), "{e}");
    }
}
