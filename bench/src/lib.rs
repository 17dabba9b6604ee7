//! Ferry's benchmark kit (issue 6).
//!
//! - [`loadgen`]: the load generator behind the `ferry-loadgen` binary: TCP
//!   connect/request/close (CRR), request/response on persistent connections (RR),
//!   UDP request/response and single-stream TCP throughput, plus the server side
//!   the lab's Pods run.
//! - [`scenario`]: N Services with their endpoints, the measured one last.
//! - [`iptables`] / [`nftables`]: the rulesets kube-proxy would write for a
//!   scenario in its iptables and nftables modes, so that Ferry is compared with
//!   what users would otherwise run.
//! - [`manifests`]: the same scenario as Kubernetes YAML for `ferry agent`.
//! - [`names`]: kube-proxy's chain names (sha256 + base32, as kube-proxy does).
//! - [`stats`]: medians and spreads over rounds.
pub mod iptables;
pub mod loadgen;
pub mod manifests;
pub mod names;
pub mod nftables;
pub mod scenario;
pub mod stats;
