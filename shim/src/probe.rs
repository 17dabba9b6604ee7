//! Probes as the kubelet runs them (user's lecture 002): startup, liveness and
//! readiness, each httpGet, tcpSocket or exec, with Kubernetes' timing fields.
//! The bookkeeping is a pure state machine; running a probe is separate.
use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::OwnedFd,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Container, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// What to check.
#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    Http { port: u16, path: String },
    Tcp { port: u16 },
    Exec { command: Vec<String> },
}

/// A probe's settings with Kubernetes' defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub check: Check,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// Builds a probe spec; named ports resolve against the container's ports.
pub fn spec(p: &Probe, container: &Container) -> Result<Spec, String> {
    let port = |port: &IntOrString| -> Result<u16, String> {
        match port {
            IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n} out of range")),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
                .ok_or_else(|| format!("no containerPort named {name:?}")),
        }
    };
    let check = if let Some(h) = &p.http_get {
        Check::Http {
            port: port(&h.port)?,
            path: h.path.clone().unwrap_or_else(|| "/".into()),
        }
    } else if let Some(t) = &p.tcp_socket {
        Check::Tcp { port: port(&t.port)? }
    } else if let Some(e) = &p.exec {
        Check::Exec {
            command: e.command.clone().unwrap_or_default(),
        }
    } else {
        return Err("no handler (httpGet, tcpSocket or exec)".into());
    };
    let secs = |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    Ok(Spec {
        check,
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
    })
}

/// Consecutive results → verdict, as the kubelet counts them.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    pub spec: Spec,
    ok_streak: u32,
    fail_streak: u32,
    /// The current verdict.
    pub passing: bool,
}

impl State {
    /// `initially`: readiness and startup start failing, liveness passing.
    pub fn new(spec: Spec, initially: bool) -> Self {
        Self {
            spec,
            ok_streak: 0,
            fail_streak: 0,
            passing: initially,
        }
    }

    /// Records one result; returns the verdict when it flips.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
            if !self.passing && self.ok_streak >= self.spec.success_threshold {
                self.passing = true;
                return Some(true);
            }
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
            if self.passing && self.fail_streak >= self.spec.failure_threshold {
                self.passing = false;
                return Some(false);
            }
            // A probe that never passed still counts its failures (startup).
            if !self.passing && self.fail_streak >= self.spec.failure_threshold {
                return Some(false);
            }
        }
        None
    }
}

/// Runs one check against a Pod. HTTP and TCP go from the node's namespace to the
/// Pod IP (as the kubelet does); exec runs in the Pod's network namespace.
pub async fn run(check: &Check, pod_ip: Ipv4Addr, timeout: Duration, ns: &OwnedFd, env: &[(String, String)]) -> bool {
    let attempt = async {
        match check {
            Check::Tcp { port } => TcpStream::connect(SocketAddr::from((pod_ip, *port))).await.is_ok(),
            Check::Http { port, path } => http_get(SocketAddr::from((pod_ip, *port)), path).await.unwrap_or(false),
            Check::Exec { command } => exec(command, ns, env, timeout).await,
        }
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or(false)
}

async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<bool> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/ferry-shim\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let code: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((200..400).contains(&code))
}

async fn exec(command: &[String], ns: &OwnedFd, env: &[(String, String)], timeout: Duration) -> bool {
    let Some((prog, args)) = command.split_first() else {
        return false;
    };
    let mut cmd = crate::container::command_in(ns, prog, args, env);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let Ok(mut child) = cmd.spawn() else { return false };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status.success(),
        _ => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(success: u32, failure: u32) -> Spec {
        Spec {
            check: Check::Tcp { port: 1 },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    #[test]
    fn readiness_needs_success_threshold_and_drops_after_failure_threshold() {
        let mut r = State::new(s(2, 3), false);
        assert_eq!(r.record(true), None);
        assert_eq!(r.record(true), Some(true));
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(true), None, "a success resets the failure streak");
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(false), None);
        assert_eq!(r.record(false), Some(false));
        assert!(!r.passing);
    }

    #[test]
    fn liveness_starts_passing_and_fails_after_threshold() {
        let mut l = State::new(s(1, 2), true);
        assert_eq!(l.record(false), None);
        assert_eq!(l.record(false), Some(false));
    }

    #[test]
    fn startup_that_never_passes_reports_failure_at_threshold() {
        let mut st = State::new(s(1, 2), false);
        assert_eq!(st.record(false), None);
        assert_eq!(st.record(false), Some(false));
    }

    #[test]
    fn defaults_and_named_ports() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "ports": [{"name": "http", "containerPort": 8080}]
        }))
        .unwrap();
        let p: Probe =
            serde_json::from_value(serde_json::json!({"httpGet": {"port": "http", "path": "/healthz"}})).unwrap();
        let sp = spec(&p, &c).unwrap();
        assert_eq!(
            sp.check,
            Check::Http {
                port: 8080,
                path: "/healthz".into()
            }
        );
        assert_eq!(
            (sp.period, sp.timeout, sp.success_threshold, sp.failure_threshold),
            (Duration::from_secs(10), Duration::from_secs(1), 1, 3)
        );
        let bad: Probe = serde_json::from_value(serde_json::json!({"tcpSocket": {"port": "nope"}})).unwrap();
        assert!(spec(&bad, &c).is_err());
    }
}
