//! The client side: `workers` threads hammer their targets until a deadline.
//! With several targets (the no-NAT baseline dials every server directly, as a
//! Service spreads over them), CRR rotates over them per connection, RR and UDP
//! give each worker its own, and the stream uses the first.
use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{cpu::CpuTimes, Report, MAX_DURATION, MAX_WORKERS};
use crate::stats::quantile;

/// At most this many latency samples per worker (about 8 MB).
const MAX_SAMPLES: usize = 2_000_000;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const STREAM_CHUNK: usize = 128 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// TCP connect, one request/response, close; a new connection every time.
    Crr,
    /// Request/response on persistent TCP connections (one per worker).
    Rr,
    /// UDP request/response on one connected socket per worker.
    Udp,
    /// One TCP connection writing as fast as it can to a sink.
    Stream,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Crr => "crr",
            Mode::Rr => "rr",
            Mode::Udp => "udp",
            Mode::Stream => "stream",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClientOpts {
    pub mode: Mode,
    /// At least one.
    pub targets: Vec<SocketAddr>,
    pub duration: Duration,
    pub workers: usize,
    /// Request (and response) size in bytes.
    pub size: usize,
}

#[derive(Default)]
struct WorkerResult {
    requests: u64,
    errors: u64,
    bytes: u64,
    latencies_ns: Vec<u32>,
}

impl WorkerResult {
    fn sample(&mut self, started: Instant) {
        self.requests += 1;
        if self.latencies_ns.len() < MAX_SAMPLES {
            self.latencies_ns
                .push(started.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
    }
}

/// Only addresses of the private ranges (the lab's Pods and ClusterIPs).
fn check_target(t: &SocketAddr) -> Result<()> {
    match t.ip() {
        IpAddr::V4(ip) if ip.is_private() => Ok(()),
        ip => bail!("{ip} is not a private IPv4 address: the load generator only targets lab addresses"),
    }
}

/// Runs one measurement and reports it.
pub fn run(opts: &ClientOpts) -> Result<Report> {
    if opts.targets.is_empty() {
        bail!("no target");
    }
    for t in &opts.targets {
        check_target(t)?;
    }
    if opts.duration.is_zero() || opts.duration > MAX_DURATION {
        bail!("duration must be within (0, {MAX_DURATION:?}]");
    }
    if opts.workers == 0 || opts.workers > MAX_WORKERS {
        bail!("workers must be within 1..={MAX_WORKERS}");
    }
    if opts.size == 0 || opts.size > 65_000 {
        bail!("size must be within 1..=65000 bytes");
    }
    let workers = if opts.mode == Mode::Stream { 1 } else { opts.workers };
    // Set-up (persistent connections) happens before the barrier; the clock and
    // the CPU accounting start when every worker is ready.
    let barrier = Arc::new(Barrier::new(workers + 1));
    let mut handles = Vec::with_capacity(workers);
    for w in 0..workers {
        let (o, b) = (opts.clone(), barrier.clone());
        handles.push(thread::spawn(move || -> Result<WorkerResult> { worker(&o, w, &b) }));
    }
    barrier.wait();
    let cpu0 = CpuTimes::now();
    let t0 = Instant::now();
    let mut results = Vec::with_capacity(workers);
    for h in handles {
        match h.join() {
            Ok(r) => results.push(r?),
            Err(_) => bail!("a worker thread panicked"),
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu_busy_s = match (cpu0, CpuTimes::now()) {
        (Some(a), Some(b)) => a.busy_secs_until(&b),
        _ => f64::NAN,
    };
    Ok(summarize(opts, workers, elapsed, cpu_busy_s, results))
}

fn summarize(opts: &ClientOpts, workers: usize, elapsed: f64, cpu_busy_s: f64, results: Vec<WorkerResult>) -> Report {
    let requests: u64 = results.iter().map(|r| r.requests).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let mut lat: Vec<u32> = results.into_iter().flat_map(|r| r.latencies_ns).collect();
    lat.sort_unstable();
    let us = |q| quantile(&lat, q).map(|ns| f64::from(ns) / 1000.0);
    let cpu_us_per_request = if cpu_busy_s.is_nan() {
        None
    } else if opts.mode == Mode::Stream {
        (bytes > 0).then(|| cpu_busy_s * 1e6 / (bytes as f64 / (1024.0 * 1024.0)))
    } else {
        (requests > 0).then(|| cpu_busy_s * 1e6 / requests as f64)
    };
    Report {
        mode: opts.mode.name().into(),
        target: opts
            .targets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        workers,
        duration_s: elapsed,
        requests,
        errors,
        requests_per_s: if elapsed > 0.0 { requests as f64 / elapsed } else { 0.0 },
        p50_us: us(0.5),
        p99_us: us(0.99),
        bytes,
        gbit_per_s: if elapsed > 0.0 {
            bytes as f64 * 8.0 / elapsed / 1e9
        } else {
            0.0
        },
        cpu_busy_s: if cpu_busy_s.is_nan() { 0.0 } else { cpu_busy_s },
        cpu_us_per_request,
    }
}

fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Sends `req` and reads exactly as many bytes back (the server echoes).
fn round_trip(s: &mut TcpStream, req: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    s.write_all(req)?;
    s.read_exact(&mut buf[..req.len()])
}

/// After an error, don't spin: failures are counted, not retried in a hot loop.
fn back_off() {
    thread::sleep(Duration::from_millis(5));
}

fn worker(o: &ClientOpts, w: usize, barrier: &Barrier) -> Result<WorkerResult> {
    let n = o.targets.len();
    let mine = o.targets[w % n];
    let req = vec![b'x'; o.size];
    let mut buf = vec![0u8; o.size.max(STREAM_CHUNK)];
    let mut r = WorkerResult::default();
    match o.mode {
        Mode::Crr => {
            barrier.wait();
            let deadline = Instant::now() + o.duration;
            let mut next = w;
            while Instant::now() < deadline {
                let t = Instant::now();
                let target = o.targets[next % n];
                next = next.wrapping_add(1);
                let res = connect(target).and_then(|mut s| {
                    round_trip(&mut s, &req, &mut buf)?;
                    // Close first, as netperf's TCP_CRR does (TIME_WAIT stays
                    // here; the lab enables tcp_tw_reuse in the client Pod).
                    s.shutdown(Shutdown::Both).or(Ok(()))
                });
                match res {
                    Ok(()) => r.sample(t),
                    Err(_) => {
                        r.errors += 1;
                        back_off();
                    }
                }
            }
        }
        Mode::Rr => {
            let mut conn = connect(mine).ok();
            barrier.wait();
            let deadline = Instant::now() + o.duration;
            while Instant::now() < deadline {
                let Some(s) = conn.as_mut() else {
                    r.errors += 1;
                    back_off();
                    conn = connect(mine).ok();
                    continue;
                };
                let t = Instant::now();
                match round_trip(s, &req, &mut buf) {
                    Ok(()) => r.sample(t),
                    Err(_) => {
                        r.errors += 1;
                        conn = None;
                    }
                }
            }
        }
        Mode::Udp => {
            let sock = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))?;
            sock.connect(mine)?;
            barrier.wait();
            let deadline = Instant::now() + o.duration;
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = sock.send(&req).is_ok() && matches!(sock.recv(&mut buf), Ok(n) if n == req.len());
                if ok {
                    r.sample(t);
                } else {
                    r.errors += 1;
                }
            }
        }
        Mode::Stream => {
            let chunk = vec![b's'; STREAM_CHUNK];
            let mut conn = connect(o.targets[0]);
            barrier.wait();
            let deadline = Instant::now() + o.duration;
            match conn.as_mut() {
                Ok(s) => {
                    while Instant::now() < deadline {
                        match s.write(&chunk) {
                            Ok(n) => r.bytes += n as u64,
                            Err(_) => {
                                r.errors += 1;
                                break;
                            }
                        }
                    }
                }
                Err(_) => r.errors += 1,
            }
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn only_private_targets() {
        assert!(check_target(&"10.96.0.1:80".parse().unwrap()).is_ok());
        assert!(check_target(&"8.8.8.8:53".parse().unwrap()).is_err());
        assert!(check_target(&"[::1]:80".parse().unwrap()).is_err());
    }

    #[test]
    fn bad_options_are_errors() {
        let mut o = ClientOpts {
            mode: Mode::Rr,
            targets: vec!["10.0.0.1:1".parse().unwrap()],
            duration: Duration::ZERO,
            workers: 1,
            size: 1,
        };
        assert!(run(&o).is_err());
        o.duration = Duration::from_secs(1);
        o.workers = 0;
        assert!(run(&o).is_err());
    }

    #[test]
    fn summary_counts_and_quantiles() {
        let o = ClientOpts {
            mode: Mode::Rr,
            targets: vec!["10.0.0.1:1".parse().unwrap()],
            duration: Duration::from_secs(1),
            workers: 2,
            size: 1,
        };
        let w = |n: u32| WorkerResult {
            requests: u64::from(n),
            errors: 1,
            bytes: 0,
            latencies_ns: (1..=n).map(|x| x * 1000).collect(),
        };
        let r = summarize(&o, 2, 2.0, 0.5, vec![w(50), w(50)]);
        assert_eq!((r.requests, r.errors), (100, 2));
        assert_eq!(r.requests_per_s, 50.0);
        assert_eq!(r.p50_us, Some(25.0));
        assert_eq!(r.cpu_us_per_request, Some(5000.0));
    }

    /// A loopback echo stands in for a Pod (check_target is bypassed by calling
    /// the worker directly).
    #[test]
    fn rr_worker_talks_to_an_echo_server() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 64];
            while let Ok(n) = s.read(&mut b) {
                if n == 0 || s.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
        let o = ClientOpts {
            mode: Mode::Rr,
            targets: vec![addr],
            duration: Duration::from_millis(200),
            workers: 1,
            size: 16,
        };
        let b = Barrier::new(1);
        let r = worker(&o, 0, &b).unwrap();
        assert!(r.requests > 10, "{} requests", r.requests);
        assert_eq!(r.errors, 0);
    }
}
