//! Chain names exactly as kube-proxy derives them, so the generated rulesets
//! look (and hash, and sort) like the real ones.
//!
//! iptables mode (pkg/proxy/iptables/proxier.go): `KUBE-SVC-` + the first 16
//! characters of base32(sha256(servicePortName + protocol)), and `KUBE-SEP-` +
//! the same over servicePortName + protocol + "ip:port"; servicePortName is
//! "namespace/name:portName", protocol lower case.
//!
//! nftables mode (pkg/proxy/nftables/proxier.go): `service-` / `endpoint-` +
//! hashAndTruncate("namespace/name/protocol/portName[__ip/port]"), i.e. the first
//! 8 base32 characters of the sha256 of the name, a dash, then the name itself.
use sha2::{Digest, Sha256};

/// RFC 4648 base32 (standard alphabet, as Go's base32.StdEncoding), no padding.
pub fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &b in data {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn hash32(s: &str) -> String {
    base32(&Sha256::digest(s.as_bytes()))
}

/// kube-proxy's portProtoHash.
pub fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    hash32(&format!("{service_port_name}{protocol}"))[..16].to_string()
}

/// `KUBE-SVC-…` for "namespace/name:port" and a lower-case protocol.
pub fn iptables_service_chain(service_port_name: &str, protocol: &str) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(service_port_name, protocol))
}

/// `KUBE-EXT-…`: a service port's external traffic chain (NodePort,
/// externalIPs, LoadBalancer IPs jump here; it marks for masquerade under
/// externalTrafficPolicy Cluster, then jumps to `KUBE-SVC-…`).
pub fn iptables_external_chain(service_port_name: &str, protocol: &str) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(service_port_name, protocol))
}

/// `KUBE-SEP-…` for an endpoint "ip:port" of a service port.
pub fn iptables_endpoint_chain(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    let h = hash32(&format!("{service_port_name}{protocol}{endpoint}"));
    format!("KUBE-SEP-{}", &h[..16])
}

/// nftables' chain names are at most 256 bytes; kube-proxy keeps 16 for prefixes.
const NFT_BASE_MAX: usize = 240;

/// kube-proxy's hashAndTruncate.
pub fn hash_and_truncate(name: &str) -> String {
    let mut out = format!("{}-{name}", &hash32(name)[..8]);
    if out.len() > NFT_BASE_MAX {
        out.truncate(NFT_BASE_MAX - 3);
        out.push_str("...");
    }
    out
}

/// `service-HASH-namespace/name/protocol/portName`.
pub fn nft_service_chain(namespace: &str, name: &str, protocol: &str, port_name: &str) -> String {
    format!(
        "service-{}",
        hash_and_truncate(&format!("{namespace}/{name}/{protocol}/{port_name}"))
    )
}

/// `external-HASH-namespace/name/protocol/portName`: the external traffic
/// chain (what the service-nodeports map points at).
pub fn nft_external_chain(namespace: &str, name: &str, protocol: &str, port_name: &str) -> String {
    format!(
        "external-{}",
        hash_and_truncate(&format!("{namespace}/{name}/{protocol}/{port_name}"))
    )
}

/// `endpoint-HASH-namespace/name/protocol/portName__ip/port`.
pub fn nft_endpoint_chain(namespace: &str, name: &str, protocol: &str, port_name: &str, ip: &str, port: u16) -> String {
    format!(
        "endpoint-{}",
        hash_and_truncate(&format!("{namespace}/{name}/{protocol}/{port_name}__{ip}/{port}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"fo"), "MZXQ");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    /// Chain names seen in real clusters (kube-proxy's own test data).
    #[test]
    fn iptables_names_match_real_kube_proxy_chains() {
        assert_eq!(
            iptables_service_chain("default/kubernetes:https", "tcp"),
            "KUBE-SVC-NPX46M4PTMTKRN6Y"
        );
        assert_eq!(
            iptables_service_chain("kube-system/kube-dns:dns", "udp"),
            "KUBE-SVC-TCOU7JCQXEZGVUNU"
        );
        assert_eq!(
            iptables_service_chain("kube-system/kube-dns:dns-tcp", "tcp"),
            "KUBE-SVC-ERIFXISQEP7F7OF4"
        );
        assert_eq!(
            iptables_service_chain("kube-system/kube-dns:metrics", "tcp"),
            "KUBE-SVC-JD5MR3NA4I4DYORP"
        );
        assert_eq!(iptables_endpoint_chain("a/b:c", "tcp", "10.0.0.1:80").len(), 25);
        // The same hash as the KUBE-SVC chain, another prefix.
        assert_eq!(
            iptables_external_chain("default/kubernetes:https", "tcp"),
            "KUBE-EXT-NPX46M4PTMTKRN6Y"
        );
    }

    /// The examples in kube-proxy's nftables proxier comments.
    #[test]
    fn nft_names_match_kube_proxy_examples() {
        assert_eq!(
            nft_service_chain("ns1", "svc1", "tcp", "p80"),
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nft_endpoint_chain("ns1", "svc1", "tcp", "p80", "10.180.0.1", 80),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        assert_eq!(
            nft_external_chain("ns1", "svc1", "tcp", "p80"),
            "external-ULMVA6XW-ns1/svc1/tcp/p80"
        );
    }

    #[test]
    fn long_nft_names_are_truncated() {
        let long = "x".repeat(400);
        let n = hash_and_truncate(&long);
        assert_eq!(n.len(), NFT_BASE_MAX);
        assert!(n.ends_with("..."));
    }
}
