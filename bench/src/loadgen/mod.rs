//! The load generator: clients that measure one data path for a fixed time and a
//! server for the lab's Pods. The clients are plain blocking sockets on a few
//! threads (one per worker) so their own overhead is small and the same for
//! every path; the server is tokio, so one process serves many connections.
//!
//! Every loop is bounded: clients stop at their deadline (at most
//! [`MAX_DURATION`]), socket operations have timeouts, and latency samples are
//! capped per worker.
pub mod client;
pub mod cpu;
pub mod server;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use client::{run, ClientOpts, Mode};

/// No measurement runs longer than this.
pub const MAX_DURATION: Duration = Duration::from_secs(120);
/// No more workers than this.
pub const MAX_WORKERS: usize = 64;

/// One measurement's result, printed as JSON by `ferry-loadgen`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub mode: String,
    pub target: String,
    pub workers: usize,
    /// Measured wall time.
    pub duration_s: f64,
    /// Completed requests (CRR: connections with their request/response).
    pub requests: u64,
    /// Failed connects, timeouts, short answers.
    pub errors: u64,
    pub requests_per_s: f64,
    /// Latency of one request (CRR: connect + request + response).
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Stream mode: bytes written.
    pub bytes: u64,
    pub gbit_per_s: f64,
    /// Busy CPU time of the whole machine (all cores, /proc/stat) while measuring.
    pub cpu_busy_s: f64,
    /// cpu_busy_s per request (stream: per MiB), in microseconds.
    pub cpu_us_per_request: Option<f64>,
}
