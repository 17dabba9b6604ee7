//! healthCheckNodePort servers, as kube-proxy runs them: for every Service with
//! externalTrafficPolicy: Local, an HTTP server on its healthCheckNodePort on
//! every node answering 200 with the number of the Service's endpoints on this
//! node, or 503 when there is none, so that cloud load balancers only send
//! external traffic to nodes that serve it.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use hyper::StatusCode;

use crate::{
    admin::{spawn_server, Reply},
    translate::HealthCheck,
};

/// The running servers, by port.
#[derive(Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, (Arc<Mutex<HealthCheck>>, tokio::task::JoinHandle<()>)>,
}

impl HealthCheckServers {
    /// Starts, updates and stops servers to match `want`. Must run inside the
    /// tokio runtime. A port that cannot be bound is logged and retried on the
    /// next sync.
    pub fn reconcile(&mut self, want: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, (_, task)| {
            let keep = want.contains_key(port);
            if !keep {
                task.abort();
                tracing::info!(port, "healthCheckNodePort server stopped");
            }
            keep
        });
        for (port, hc) in want {
            if let Some((state, _)) = self.servers.get(port) {
                *state.lock().unwrap_or_else(|e| e.into_inner()) = hc.clone();
                continue;
            }
            match listen(*port) {
                Ok(listener) => {
                    let state = Arc::new(Mutex::new(hc.clone()));
                    let s = state.clone();
                    let task = spawn_server(listener, move |_path| {
                        reply(&s.lock().unwrap_or_else(|e| e.into_inner()))
                    });
                    tracing::info!(port, service = %hc.service, "healthCheckNodePort server started");
                    self.servers.insert(*port, (state, task));
                }
                Err(e) => tracing::error!("Service {}: healthCheckNodePort {port}: {e}", hc.service),
            }
        }
    }
}

fn listen(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// kube-proxy's answer: 200 with local endpoints, 503 without.
pub fn reply(hc: &HealthCheck) -> Reply {
    let status = if hc.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": hc.service.namespace, "name": hc.service.name},
        "localEndpoints": hc.local_endpoints,
        "serviceProxyHealthy": true,
    });
    Reply::json(status, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_kube_proxy() {
        let hc = HealthCheck {
            service: crate::ids::ServiceId::new("default", "web"),
            local_endpoints: 2,
        };
        let r = reply(&hc);
        assert_eq!(r.status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
        let r = reply(&HealthCheck {
            local_endpoints: 0,
            ..hc
        });
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
