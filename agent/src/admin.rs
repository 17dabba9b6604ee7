//! Health endpoints, kube-proxy style: `/healthz` (200 while the last sync is
//! recent, 503 otherwise, with kube-proxy's JSON body), `/readyz` (200 once the
//! first full sync landed) and `/livez` (200 while the process serves), plus the
//! tiny HTTP server that `/metrics` shares.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{HeaderValue, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What a route answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn json(status: StatusCode, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            body,
        }
    }
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Serves GET requests on `listener` with `route(path)` until the runtime stops.
pub fn spawn_server(
    listener: TcpListener,
    route: impl Fn(&str) -> Reply + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let route = Arc::new(route);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let route = route.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let r = route(req.uri().path());
                    async move {
                        let mut resp = Response::new(Full::new(Bytes::from(r.body)));
                        *resp.status_mut() = r.status;
                        resp.headers_mut()
                            .insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
                        Ok::<_, Infallible>(resp)
                    }
                });
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                    tracing::debug!("health/metrics connection: {e}");
                }
            });
        }
    })
}

/// Binds `addr` (port 0 picks a free port) and says where.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let local = l.local_addr()?;
    tracing::info!("{what} listening on http://{local}");
    Ok((l, local))
}

/// The agent's health as the sync loop reports it.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// A sync older than this makes /healthz fail.
    timeout: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last successful sync (monotonic, wall clock).
    last_sync: Option<(Instant, SystemTime)>,
    /// What that sync could not write to the maps (the rest is serving).
    not_programmed: Vec<String>,
    /// Programs that must be attached and are not: not ready while any is.
    unattached: Vec<String>,
    /// API resources whose list/watch is failing now, with the error.
    api_failing: Vec<String>,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self {
            started: Instant::now(),
            timeout,
            state: Mutex::new(State::default()),
        }
    }

    /// A sync wrote the maps (or found them in step), all but `not_programmed`.
    pub fn synced<'a>(&self, not_programmed: impl IntoIterator<Item = &'a String>) {
        let mut st = self.lock();
        st.last_sync = Some((Instant::now(), SystemTime::now()));
        st.not_programmed = not_programmed.into_iter().cloned().collect();
    }

    /// The programs the last attach pass could not attach (or the devices it
    /// could not find), each with the reason; empty when all are attached.
    pub fn attached(&self, unattached: Vec<String>) {
        self.lock().unattached = unattached;
    }

    /// The API resources whose list/watch is failing now ("services: error"):
    /// /readyz names them while the maps serve the last good state.
    pub fn api_failing(&self, failing: Vec<String>) {
        self.lock().api_failing = failing;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the data is still valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ready once the first full sync landed and while every program that
    /// must be attached is; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        let st = self.lock();
        if st.last_sync.is_none() {
            return Err("the first sync has not been applied".into());
        }
        if !st.unattached.is_empty() {
            return Err(format!("not attached: {}", st.unattached.join("; ")));
        }
        Ok(())
    }

    /// Healthy while the last sync is recent; before the first one, for
    /// `timeout` after start (the first list may take a while).
    pub fn is_healthy(&self) -> bool {
        match self.lock().last_sync {
            Some((at, _)) => at.elapsed() <= self.timeout,
            None => self.started.elapsed() <= self.timeout,
        }
    }

    /// The routes of the health port.
    pub fn route(&self, path: &str) -> Reply {
        match path {
            "/healthz" => {
                let (last, not_programmed) = {
                    let st = self.lock();
                    (st.last_sync.map(|(_, t)| t), st.not_programmed.clone())
                };
                let mut body = serde_json::json!({
                    "lastUpdated": last.map(rfc3339).unwrap_or_default(),
                    "currentTime": rfc3339(SystemTime::now()),
                });
                // Still healthy: everything else is served.
                if !not_programmed.is_empty() {
                    body["notProgrammed"] = serde_json::json!(not_programmed);
                }
                let status = if self.is_healthy() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                Reply::json(status, body.to_string())
            }
            // Still ready while the API is in trouble: the maps serve the last
            // good state (failing closed would change nothing in them), and
            // the body says what is stale.
            "/readyz" => match self.readiness() {
                Err(why) => Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                Ok(()) => {
                    let failing = self.lock().api_failing.clone();
                    if failing.is_empty() {
                        Reply::text(StatusCode::OK, "ok\n")
                    } else {
                        Reply::text(
                            StatusCode::OK,
                            format!(
                                "ok: serving the last good state; failing API watches: {}\n",
                                failing.join("; ")
                            ),
                        )
                    }
                }
            },
            "/livez" => Reply::text(StatusCode::OK, "ok\n"),
            _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_follows_the_last_sync_and_readyz_the_first() {
        let h = Health::new(Duration::from_millis(200));
        assert_eq!(h.route("/healthz").status, StatusCode::OK, "grace after start");
        assert_eq!(h.route("/readyz").status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h.route("/livez").status, StatusCode::OK);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(h.route("/healthz").status, StatusCode::SERVICE_UNAVAILABLE);
        h.synced(&["frontend default/big:80 (ClusterIP) not programmed: the map is full".to_string()]);
        let r = h.route("/healthz");
        assert_eq!(r.status, StatusCode::OK, "the rest is served");
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            body["notProgrammed"][0], "frontend default/big:80 (ClusterIP) not programmed: the map is full",
            "{body}"
        );
        h.synced(&[]);
        let body: serde_json::Value = serde_json::from_str(&h.route("/healthz").body).unwrap();
        assert!(body.get("notProgrammed").is_none(), "{body}");
        assert!(body["lastUpdated"].as_str().unwrap().ends_with('Z'), "{body}");
        assert!(body["currentTime"].as_str().unwrap().ends_with('Z'), "{body}");
        assert_eq!(h.route("/readyz").status, StatusCode::OK);
        assert_eq!(h.route("/readyz").body, "ok\n");
        // The API in trouble: still ready (the last good state is served),
        // and the body names the failing watch.
        h.api_failing(vec!["services: 410 Gone".into()]);
        let r = h.route("/readyz");
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.contains("failing API watches: services: 410 Gone"), "{}", r.body);
        h.api_failing(Vec::new());
        assert_eq!(h.route("/readyz").body, "ok\n");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(h.route("/healthz").status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h.route("/nope").status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn readyz_fails_naming_what_is_not_attached_and_recovers() {
        let h = Health::new(Duration::from_secs(60));
        h.synced(&[]);
        h.attached(vec!["from_netdev on eth1: no such interface (--devices)".into()]);
        let r = h.route("/readyz");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.body.contains("from_netdev on eth1: no such interface"), "{}", r.body);
        assert_eq!(h.route("/healthz").status, StatusCode::OK, "syncing goes on");
        h.attached(Vec::new());
        assert_eq!(h.route("/readyz").status, StatusCode::OK);
    }

    #[tokio::test]
    async fn serves_http_on_an_ephemeral_port() {
        let h = Arc::new(Health::new(Duration::from_secs(60)));
        let (l, addr) = bind("127.0.0.1:0".parse().unwrap(), "health").await.unwrap();
        let h2 = h.clone();
        spawn_server(l, move |p| h2.route(p));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        h.synced(&[]);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let hz = get("/healthz").await;
        assert!(hz.starts_with("HTTP/1.1 200") && hz.contains("lastUpdated"), "{hz}");
    }
}
