//! Ferry's lab: network namespaces with a real agent and kubelet shim in them, and
//! clients that talk to Services from inside Pod namespaces.
//!
//! Used by the netns integration tests (tests/tests/*.rs) and by `cargo xtask run`,
//! so the demo and the tests exercise exactly the same set-up.
//!
//! Everything a [`Lab`] creates is named after a unique prefix and removed when it
//! is dropped, also when a test panics: processes, network namespaces (the node's
//! and every Pod's), the pinned BPF maps, and the temporary directories.
pub mod client;
pub mod cluster;
pub mod fakeapi;
pub mod lab;
pub mod manifests;
pub mod metrics;
pub mod sys;
pub mod testrun;

pub use client::{http_get, in_netns, split, tcp_ask, udp_ask, udp_ask_peer, udp_try_on, udp_wait_moved, TcpSession};
pub use lab::{Lab, LabOptions};
pub use metrics::Syncs;
