//! A fake Kubernetes API server that speaks the real list/watch HTTP protocol for
//! the three resources the agent watches, so cluster mode is tested without a
//! kube-apiserver:
//!
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/api/v1/nodes` (with `fieldSelector=metadata.name=X` / `metadata.namespace=X`):
//!   a JSON list with `metadata.resourceVersion` (items without kind/apiVersion,
//!   as the real server sends them); `limit` is honoured, pages chained by a
//!   `continue` token. [`FakeApi::paginate`] makes pages smaller than asked
//!   (the server may) and can make every continuation fail with 410 Expired,
//!   so a client only ever gets part of a list.
//! - the same with `watch=true&resourceVersion=N`: newline-delimited
//!   ADDED/MODIFIED/DELETED events after N, BOOKMARK events every second when
//!   `allowWatchBookmarks=true`, the stream ends after `timeoutSeconds`.
//!   An N older than the last compaction gets a watch ERROR event with code 410
//!   (Expired), as kube-apiserver does, and the stream ends.
//! - `GET /api/v1/nodes/NAME`: the object or a 404 Status.
//!
//! The state lives outside the server, so the server can be stopped (every
//! connection drops, like a crashed apiserver) and restarted on the same port
//! with the same objects. It can listen inside a network namespace (a socket
//! belongs to the namespace of the thread that made it), so an agent in a lab
//! node namespace reaches it at 127.0.0.1.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

/// The resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
    fn from_name(kind: &str) -> Option<Self> {
        [Kind::Service, Kind::EndpointSlice, Kind::Node]
            .into_iter()
            .find(|k| k.name() == kind)
    }
}

/// (kind, namespace, name)
type Key = (Kind, String, String);

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, kind, event type, object), oldest first.
    history: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Every request: `path?query`.
    requests: Vec<String>,
    /// Resources whose requests fail with 503 (an unhealthy apiserver).
    blocked: Vec<Kind>,
    /// At most this many items per list page (None: `limit` alone).
    page_cap: Option<usize>,
    /// Continued lists (second page on) get 410 Expired.
    continue_expired: bool,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// Bumped on every change (wakes watch streams); a bump of `expire` makes
    /// every open watch stream end with a 410 ERROR event.
    changed: watch::Sender<u64>,
    expire: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Server {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The fake API server. Dropping it stops the server.
pub struct FakeApi {
    shared: Arc<Shared>,
    netns: Option<String>,
    pub port: u16,
    server: Option<Server>,
}

impl FakeApi {
    /// Starts on 127.0.0.1 (a free port) inside `netns` (None: this namespace).
    pub fn start(netns: Option<&str>) -> Result<Self> {
        let mut api = Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    rv: 100,
                    ..Default::default()
                }),
                changed: watch::channel(0).0,
                expire: watch::channel(0).0,
            }),
            netns: netns.map(str::to_string),
            port: 0,
            server: None,
        };
        api.restart()?;
        Ok(api)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Stops the server: the listener closes and every connection drops.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            if let Some(tx) = s.stop.take() {
                let _ = tx.send(());
            }
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// (Re)starts the server on the same port (a free one the first time).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u16>>();
        let shared = self.shared.clone();
        let netns = self.netns.clone();
        let port = self.port;
        let thread = std::thread::spawn(move || {
            let setup = || -> Result<(tokio::runtime::Runtime, tokio::net::TcpListener)> {
                if let Some(ns) = &netns {
                    let path = format!("/run/netns/{ns}");
                    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
                    // SAFETY: setns on this thread only; the fd is valid for the call.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns into {path}: {}", std::io::Error::last_os_error());
                    }
                }
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let listener = rt.block_on(async {
                    let s = tokio::net::TcpSocket::new_v4()?;
                    s.set_reuseaddr(true)?;
                    s.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
                    s.listen(128)
                })?;
                Ok((rt, listener))
            };
            let (rt, listener) = match setup() {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(listener.local_addr().map(|a| a.port()).map_err(anyhow::Error::from));
            rt.block_on(async move {
                tokio::select! {
                    _ = accept_loop(listener, shared) => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every connection task: clients see the
            // connections reset, as when an apiserver dies.
        });
        let port = ready_rx.recv().map_err(|_| anyhow!("fake API server thread died"))??;
        self.port = port;
        self.server = Some(Server {
            stop: Some(stop_tx),
            thread: Some(thread),
        });
        Ok(())
    }

    /// Creates or replaces an object (its `kind` says which resource); returns
    /// the new resourceVersion.
    pub fn apply(&self, mut obj: Value) -> Result<u64> {
        let kind = obj["kind"]
            .as_str()
            .and_then(Kind::from_name)
            .ok_or_else(|| anyhow!("object without a known kind: {obj}"))?;
        obj["apiVersion"] = json!(kind.api_version());
        let key = key_of(kind, &obj)?;
        let mut inner = self.shared.lock();
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{}-{}-{}", kind.name(), key.1, key.2));
        }
        let ty = if inner.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        inner.objects.insert(key, obj.clone());
        inner.history.push((rv, kind, ty, obj));
        drop(inner);
        self.shared.changed.send_replace(rv);
        Ok(rv)
    }

    /// Deletes an object; false if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut inner = self.shared.lock();
        let Some(mut obj) = inner.objects.remove(&(kind, namespace.to_string(), name.to_string())) else {
            return false;
        };
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.history.push((rv, kind, "DELETED", obj));
        drop(inner);
        self.shared.changed.send_replace(rv);
        true
    }

    /// Forgets the event history (etcd compaction): watches from any earlier
    /// resourceVersion get 410 Gone and must relist.
    pub fn compact(&self) {
        let mut inner = self.shared.lock();
        inner.compacted = inner.rv;
        inner.history.clear();
    }

    /// Compacts and ends every open watch stream with a 410 ERROR event.
    pub fn expire_watches(&self) {
        self.compact();
        self.shared.expire.send_modify(|n| *n += 1);
    }

    /// Makes every request for `kind` fail with 503 (or work again).
    pub fn block(&self, kind: Kind, blocked: bool) {
        let mut inner = self.shared.lock();
        inner.blocked.retain(|k| *k != kind);
        if blocked {
            inner.blocked.push(kind);
        }
    }

    /// Serves lists in pages of at most `page_cap` items, and with
    /// `continue_expired` answers every continuation with 410 Expired, as
    /// kube-apiserver does when the continue token has been compacted: a
    /// client then has only the first page of the list.
    pub fn paginate(&self, page_cap: Option<usize>, continue_expired: bool) {
        let mut inner = self.shared.lock();
        inner.page_cap = page_cap;
        inner.continue_expired = continue_expired;
    }

    /// Every request so far (`path?query`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Requests for `path` (lists and watches), in order.
    pub fn requests_for(&self, kind: Kind) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.split('?').next() == Some(kind.path()))
            .collect()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let t = std::time::Instant::now();
        self.stop();
        if t.elapsed() > Duration::from_secs(5) {
            eprintln!("fake API server on port {}: stopping took {:?}", self.port, t.elapsed());
        }
    }
}

fn key_of(kind: Kind, obj: &Value) -> Result<Key> {
    let name = obj["metadata"]["name"]
        .as_str()
        .ok_or_else(|| anyhow!("object without metadata.name: {obj}"))?;
    let ns = match kind {
        Kind::Node => "",
        _ => obj["metadata"]["namespace"].as_str().unwrap_or("default"),
    };
    Ok((kind, ns.to_string(), name.to_string()))
}

type Body = BoxBody<Bytes, Infallible>;

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req)) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

/// Query parameters, decoded.
fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `metadata.name=a,metadata.namespace=b` → a filter on objects.
fn field_filter(sel: Option<&String>) -> Vec<(String, String)> {
    sel.map(|s| {
        s.split(',')
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.trim_end_matches('=').to_string(), v.to_string()))
            .collect()
    })
    .unwrap_or_default()
}

fn matches(obj: &Value, filter: &[(String, String)]) -> bool {
    filter.iter().all(|(k, v)| match k.as_str() {
        "metadata.name" => obj["metadata"]["name"].as_str() == Some(v),
        "metadata.namespace" => obj["metadata"]["namespace"].as_str() == Some(v),
        _ => true,
    })
}

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let q = query(&req);
    shared
        .lock()
        .requests
        .push(format!("{path}?{}", req.uri().query().unwrap_or("")));
    if req.method() != hyper::Method::GET {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "the fake API server is read-only"),
        );
    }
    let kinds = [Kind::Service, Kind::EndpointSlice, Kind::Node];
    if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
        let inner = shared.lock();
        return match inner.objects.get(&(Kind::Node, String::new(), name.to_string())) {
            Some(o) => json_response(StatusCode::OK, o),
            None => json_response(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", &format!("nodes \"{name}\" not found")),
            ),
        };
    }
    let Some(kind) = kinds.into_iter().find(|k| k.path() == path) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", &format!("the server could not find {path}")),
        );
    };
    if shared.lock().blocked.contains(&kind) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &status(503, "ServiceUnavailable", "blocked by the test"),
        );
    }
    let filter = field_filter(q.get("fieldSelector"));
    if q.get("watch").map(String::as_str) == Some("true") {
        return watch_response(shared, kind, &q, filter);
    }
    let inner = shared.lock();
    // `continue` is "<resourceVersion>:<offset>" (opaque to clients).
    let offset = match q.get("continue").filter(|c| !c.is_empty()) {
        None => 0,
        Some(_) if inner.continue_expired => {
            return json_response(
                StatusCode::GONE,
                &status(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                ),
            );
        }
        Some(c) => match c.split_once(':').and_then(|(_, o)| o.parse::<usize>().ok()) {
            Some(o) => o,
            None => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &status(400, "BadRequest", "invalid continue token"),
                );
            }
        },
    };
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let page = match (limit, inner.page_cap) {
        (Some(l), Some(c)) => l.min(c),
        (l, c) => l.or(c).unwrap_or(usize::MAX),
    };
    let all: Vec<&Value> = inner
        .objects
        .iter()
        .filter(|((k, _, _), o)| *k == kind && matches(o, &filter))
        .map(|(_, o)| o)
        .collect();
    let more = all.len() > offset.saturating_add(page);
    let items: Vec<Value> = all
        .into_iter()
        .skip(offset)
        .take(page)
        .map(|o| {
            let mut o = o.clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            o
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": if more {
                json!({"resourceVersion": inner.rv.to_string(), "continue": format!("{}:{}", inner.rv, offset + page)})
            } else {
                json!({"resourceVersion": inner.rv.to_string()})
            },
            "items": items,
        }),
    )
}

fn watch_response(
    shared: &Arc<Shared>,
    kind: Kind,
    q: &BTreeMap<String, String>,
    filter: Vec<(String, String)>,
) -> Response<Body> {
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(1800u64);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let shared = shared.clone();
    let mut changed = shared.changed.subscribe();
    let mut expire = shared.expire.subscribe();
    tokio::spawn(async move {
        let line = |v: Value| {
            let mut s = v.to_string();
            s.push('\n');
            Bytes::from(s)
        };
        let gone = |rv: u64, compacted: u64| {
            json!({"type": "ERROR", "object": status(
                410, "Expired",
                &format!("too old resource version: {rv} ({compacted})"),
            )})
        };
        let mut cursor = from;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let (events, expired, rv) = {
                let inner = shared.lock();
                if cursor < inner.compacted {
                    (Vec::new(), Some(inner.compacted), inner.rv)
                } else {
                    let ev: Vec<(u64, Value)> = inner
                        .history
                        .iter()
                        .filter(|(rv, k, _, o)| *rv > cursor && *k == kind && matches(o, &filter))
                        .map(|(rv, _, ty, o)| (*rv, json!({"type": ty, "object": o})))
                        .collect();
                    (ev, None, inner.rv)
                }
            };
            if let Some(compacted) = expired {
                let _ = tx.send(line(gone(cursor, compacted))).await;
                return;
            }
            for (rv, ev) in events {
                if tx.send(line(ev)).await.is_err() {
                    return;
                }
                cursor = rv;
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = expire.changed() => {
                    let c = shared.lock().compacted;
                    let _ = tx.send(line(gone(cursor, c))).await;
                    return;
                }
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"type": "BOOKMARK", "object": {
                        "kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()},
                    }});
                    if tx.send(line(bm)).await.is_err() {
                        return;
                    }
                    // Everything up to rv was sent or filtered out.
                    cursor = cursor.max(rv);
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
