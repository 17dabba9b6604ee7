//! Cluster mode end to end: the real `ferry agent` in a lab node namespace, with
//! `--kubeconfig` pointing at a fake API server (tests/src/fakeapi.rs) that speaks
//! the list/watch protocol; assertions on the BPF maps (`ferry svc list -o json`),
//! the health and metrics endpoints, the agent's log and the requests it made.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ferry_tests::{
    fakeapi::{FakeApi, Kind},
    http_get,
    manifests::{client_pod, echo_pod},
    metrics::sample,
    split, tcp_ask, Lab, LabOptions,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
/// The agent's health and metrics ports, inside its node namespace.
const HEALTHZ: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256));
const METRICS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249));
/// Long enough for kube's watcher backoff after an outage.
const RECOVER: Duration = Duration::from_secs(60);

/// A lab node whose agent runs in cluster mode against a fake API server that
/// listens inside the node's namespace. Field order: the lab (and its agent)
/// goes first when dropped, then the server.
struct Cluster {
    lab: Lab,
    api: FakeApi,
}

/// Starts the lab and the fake API (with this node's Node object); `setup` adds
/// objects before the agent starts.
fn cluster(opts: LabOptions, setup: impl FnOnce(&Lab, &FakeApi) -> Result<()>) -> Result<Cluster> {
    let mut lab = Lab::start(LabOptions { agent: false, ..opts })?;
    let api = FakeApi::start(Some(&lab.node))?;
    api.apply(node(&lab.node))?;
    setup(&lab, &api)?;
    let kubeconfig = lab.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    lab.start_cluster_agent(&kubeconfig)?;
    Ok(Cluster { lab, api })
}

fn node(name: &str) -> Value {
    json!({
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.2"}]},
    })
}

/// A Service with a selector (cluster mode must use its EndpointSlices anyway).
fn service(name: &str, ip: &str, ports: Value) -> Value {
    json!({
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "selector": {"app": name}, "ports": ports},
    })
}

/// An endpoint: (address, ready, serving, terminating, node).
type Ep<'a> = (&'a str, bool, bool, bool, &'a str);

fn slice(name: &str, svc: &str, eps: &[Ep], ports: Value) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(addr, ready, serving, terminating, node)| {
            json!({
                "addresses": [addr], "nodeName": node,
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            })
        })
        .collect();
    json!({
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

fn web_ports() -> Value {
    json!([
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
    ])
}
fn web_slice_ports() -> Value {
    json!([
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 5353, "protocol": "UDP"},
    ])
}

/// The maps as `frontend/proto` → sorted backend addresses.
fn frontends(lab: &Lab) -> Result<BTreeMap<String, Vec<String>>> {
    let out = lab.ferry(&["svc", "list", "-o", "json"])?;
    let rows: Vec<Value> = serde_json::from_str(&out).context("svc list -o json")?;
    let mut m = BTreeMap::new();
    for r in rows {
        let key = format!(
            "{}/{}",
            r["frontend"].as_str().unwrap_or("?"),
            r["protocol"].as_str().unwrap_or("?")
        );
        let mut backends: Vec<String> = r["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| b["address"].as_str().unwrap_or("missing").to_string())
            .collect();
        backends.sort();
        m.insert(key, backends);
    }
    Ok(m)
}

fn want(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect()
}

fn wait_maps(c: &Cluster, timeout: Duration, expect: &BTreeMap<String, Vec<String>>) -> Result<()> {
    let mut last = BTreeMap::new();
    let r = c.lab.wait_until(timeout, &format!("maps == {expect:?}"), || {
        last = frontends(&c.lab)?;
        Ok(&last == expect)
    });
    r.with_context(|| format!("last seen: {last:?}"))
}

#[test]
fn services_and_slices_reach_the_maps_and_follow_changes() -> Result<()> {
    let c = cluster(LabOptions::new("cwatch"), |_, api| {
        api.apply(service("web", "10.96.0.10", web_ports()))?;
        // Two slices of one Service, merged by the service-name label; one
        // endpoint not ready.
        api.apply(slice(
            "web-a",
            "web",
            &[
                ("10.244.1.2", true, true, false, "n1"),
                ("10.244.1.3", false, false, false, "n1"),
            ],
            web_slice_ports(),
        ))?;
        api.apply(slice(
            "web-b",
            "web",
            &[("10.244.2.2", true, true, false, "n2")],
            web_slice_ports(),
        ))?;
        api.apply(service(
            "other",
            "10.96.0.20",
            json!([{"port": 443, "targetPort": 8443}]),
        ))?;
        api.apply(slice(
            "other-1",
            "other",
            &[("10.244.3.3", true, true, false, "n3")],
            json!([{"port": 8443, "protocol": "TCP"}]),
        ))?;
        Ok(())
    })?;
    wait_maps(
        &c,
        WAIT,
        &want(&[
            ("10.96.0.10:53/UDP", &["10.244.1.2:5353", "10.244.2.2:5353"]),
            ("10.96.0.10:80/TCP", &["10.244.1.2:8080", "10.244.2.2:8080"]),
            ("10.96.0.20:443/TCP", &["10.244.3.3:8443"]),
        ]),
    )?;

    // Health and metrics, kube-proxy style, on the default ports of the node
    // namespace.
    let ns = &c.lab.node;
    let (code, _) = http_get(ns, HEALTHZ, "/readyz")?;
    assert_eq!(code, 200, "ready after the first sync");
    let (code, body) = http_get(ns, HEALTHZ, "/healthz")?;
    assert_eq!(code, 200, "{body}");
    let hz: Value = serde_json::from_str(&body).context("healthz JSON")?;
    assert!(hz["lastUpdated"].as_str().is_some_and(|s| !s.is_empty()), "{hz}");
    assert!(hz["currentTime"].as_str().is_some(), "{hz}");
    assert_eq!(http_get(ns, HEALTHZ, "/livez")?.0, 200);
    let (code, metrics) = http_get(ns, METRICS, "/metrics")?;
    assert_eq!(code, 200);
    for m in [
        "ferry_services 2",
        "ferry_frontends 3",
        "ferry_backends 5",
        "ferry_sync_proxy_rules_duration_seconds_count",
        "ferry_sync_proxy_rules_last_timestamp_seconds",
        "ferry_conntrack_entries{table=\"tcp\"} 0",
        "ferry_drops_total{reason=\"no_backend\"}",
    ] {
        assert!(metrics.contains(m), "metrics lack {m:?}:\n{metrics}");
    }

    // The watcher's requests: the default list-then-watch strategy, bookmarks,
    // and only this node.
    let svc = c.api.requests_for(Kind::Service);
    assert!(svc.iter().any(|r| !r.contains("watch=true")), "a list: {svc:?}");
    assert!(
        svc.iter().any(|r| r.contains("watch=true")
            && r.contains("allowWatchBookmarks=true")
            && r.contains("resourceVersion=")),
        "a watch from the list's resourceVersion: {svc:?}"
    );
    let nodes = c.api.requests_for(Kind::Node);
    let sel = format!("fieldSelector=metadata.name%3D{}", c.lab.node);
    assert!(!nodes.is_empty() && nodes.iter().all(|r| r.contains(&sel)), "{nodes:?}");

    // A burst of changes is coalesced: 20 updates of one slice within
    // milliseconds give a few syncs (at most --sync-debounce-ms after the first),
    // not 20, and the maps end at the last state.
    let before = c.lab.syncs()?.writes;
    for i in 0..20 {
        let addr = format!("10.244.2.{}", 10 + i);
        let eps: [Ep; 1] = [(addr.as_str(), true, true, false, "n2")];
        c.api.apply(slice("web-b", "web", &eps, web_slice_ports()))?;
    }
    wait_maps(
        &c,
        WAIT,
        &want(&[
            ("10.96.0.10:53/UDP", &["10.244.1.2:5353", "10.244.2.29:5353"]),
            ("10.96.0.10:80/TCP", &["10.244.1.2:8080", "10.244.2.29:8080"]),
            ("10.96.0.20:443/TCP", &["10.244.3.3:8443"]),
        ]),
    )?;
    // The maps show the last state a moment before that sync is counted.
    c.lab
        .wait_until(WAIT, "the burst's syncs counted", || Ok(c.lab.syncs()?.writes > before))?;
    let syncs = c.lab.syncs()?.writes - before;
    assert!((1..=3).contains(&syncs), "{syncs} syncs for a burst of 20 changes");

    // An endpoint stops being ready: it leaves the maps.
    c.api.apply(slice(
        "web-b",
        "web",
        &[("10.244.2.2", false, false, false, "n2")],
        web_slice_ports(),
    ))?;
    wait_maps(
        &c,
        WAIT,
        &want(&[
            ("10.96.0.10:53/UDP", &["10.244.1.2:5353"]),
            ("10.96.0.10:80/TCP", &["10.244.1.2:8080"]),
            ("10.96.0.20:443/TCP", &["10.244.3.3:8443"]),
        ]),
    )?;

    // The Service (and, as the garbage collector would, its slices) is deleted:
    // everything it had leaves the maps; the other Service stays.
    assert!(c.api.delete(Kind::Service, "default", "web"));
    assert!(c.api.delete(Kind::EndpointSlice, "default", "web-a"));
    assert!(c.api.delete(Kind::EndpointSlice, "default", "web-b"));
    wait_maps(&c, WAIT, &want(&[("10.96.0.20:443/TCP", &["10.244.3.3:8443"])]))?;
    c.lab.wait_until(WAIT, "metrics follow", || {
        let m = http_get(ns, METRICS, "/metrics")?.1;
        Ok(m.contains("ferry_services 1") && m.contains("ferry_backends 1"))
    })?;
    // Quiet when nothing changes: bookmarks and idle watches cause no syncs
    // (neither one after a change nor a write; a periodic resync that writes
    // nothing may happen).
    let syncs = |s: ferry_tests::Syncs| (s.after_change, s.writes);
    // First the changes made above settle: the deletions of the slices may
    // come a few ms after the Service's in a sync of their own (the
    // coalescing window is paced by the syncs' cost).
    let mut before = syncs(c.lab.syncs()?);
    c.lab.wait_until(WAIT, "the syncs of the deletions done", || {
        std::thread::sleep(Duration::from_millis(500));
        let now = syncs(c.lab.syncs()?);
        let settled = now == before;
        before = now;
        Ok(settled)
    })?;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(syncs(c.lab.syncs()?), before, "{}", c.lab.logs());
    Ok(())
}

/// The periodic resync translates everything on a blocking thread, so it
/// holds up no change: with a resync every second and an endpoint change
/// every 30 ms, the resyncs keep being counted (each one taken when no other
/// sync ran while it translated, else dropped, and after three dropped in a
/// row one runs on the loop), the changes keep reaching the maps, and the
/// maps end at the last state.
#[test]
fn periodic_resyncs_made_off_the_loop_land_beside_a_stream_of_changes() -> Result<()> {
    let mut opts = LabOptions::new("cresync");
    opts.agent_args
        .extend(["--sync-period-seconds".to_string(), "1".to_string()]);
    let c = cluster(opts, |_, api| {
        api.apply(service("web", "10.96.0.10", web_ports()))?;
        api.apply(slice(
            "web-a",
            "web",
            &[("10.244.1.2", true, true, false, "n1")],
            web_slice_ports(),
        ))?;
        Ok(())
    })?;
    let first = want(&[
        ("10.96.0.10:53/UDP", &["10.244.1.2:5353"]),
        ("10.96.0.10:80/TCP", &["10.244.1.2:8080"]),
    ]);
    wait_maps(&c, WAIT, &first)?;
    let before = c.lab.syncs()?;
    let started = Instant::now();
    let mut i = 0u32;
    while started.elapsed() < Duration::from_secs(4) {
        let addr = format!("10.244.1.{}", 10 + i % 200);
        let eps: [Ep; 1] = [(addr.as_str(), true, true, false, "n1")];
        c.api.apply(slice("web-a", "web", &eps, web_slice_ports()))?;
        i += 1;
        std::thread::sleep(Duration::from_millis(30));
    }
    let last = format!("10.244.1.{}", 10 + (i - 1) % 200);
    wait_maps(
        &c,
        WAIT,
        &want(&[
            ("10.96.0.10:53/UDP", &[format!("{last}:5353").as_str()]),
            ("10.96.0.10:80/TCP", &[format!("{last}:8080").as_str()]),
        ]),
    )?;
    // Quiet again: the next resync lands (nothing else runs meanwhile).
    let during = c.lab.syncs()?;
    c.lab.wait_until(WAIT, "a resync after the stream", || {
        Ok(c.lab.syncs()?.periodic > during.periodic)
    })?;
    let after = c.lab.syncs()?;
    let log = c.lab.agent_log();
    assert!(
        after.after_change - before.after_change >= 20,
        "{} change-driven syncs for {i} changes",
        after.after_change - before.after_change
    );
    assert!(
        after.periodic - before.periodic >= 2,
        "{} periodic resyncs in 4 s and more:\n{log}",
        after.periodic - before.periodic
    );
    assert!(!log.contains("the periodic resync's translation failed"), "{log}");
    Ok(())
}

#[test]
fn first_sync_waits_for_every_list_and_an_outage_keeps_the_last_state() -> Result<()> {
    let mut c = cluster(LabOptions::new("coutage"), |_, api| {
        api.apply(service("web", "10.96.0.10", web_ports()))?;
        api.apply(slice(
            "web-a",
            "web",
            &[("10.244.1.2", true, true, false, "n1")],
            web_slice_ports(),
        ))?;
        api.apply(service(
            "other",
            "10.96.0.20",
            json!([{"port": 443, "targetPort": 8443}]),
        ))?;
        api.apply(slice(
            "other-1",
            "other",
            &[("10.244.3.3", true, true, false, "n3")],
            json!([{"port": 8443, "protocol": "TCP"}]),
        ))?;
        // Slices cannot be listed yet: Services alone must not be programmed
        // (they would have no backends).
        api.block(Kind::EndpointSlice, true);
        Ok(())
    })?;
    let ns = c.lab.node.clone();
    c.lab.wait_until(WAIT, "services listed", || {
        Ok(c.api
            .requests_for(Kind::Service)
            .iter()
            .any(|r| r.contains("watch=true")))
    })?;
    // The agent may still be loading its programs (seconds on a busy
    // machine): give it its 2 s once it runs its loop (writes its report).
    c.lab
        .wait_until(WAIT, "the agent's status report", || Ok(c.lab.status_file().exists()))?;
    std::thread::sleep(Duration::from_secs(2));
    c.lab.check_alive()?;
    assert_eq!(
        frontends(&c.lab)?,
        BTreeMap::new(),
        "nothing programmed before every list is done"
    );
    assert_eq!(
        http_get(&ns, HEALTHZ, "/readyz")?.0,
        503,
        "not ready before the first sync"
    );
    // `ferry status` says which list is missing.
    let (_, status, _) = c.lab.status()?;
    assert_eq!(status["agent"]["mode"], "cluster", "{status:#}");
    let listed = |s: &serde_json::Value, what: &str| {
        s["agent"]["api"]
            .as_array()
            .and_then(|a| a.iter().find(|w| w["resource"] == what))
            .map(|w| w["listed"].clone())
    };
    assert_eq!(listed(&status, "services"), Some(json!(true)), "{status:#}");
    assert_eq!(listed(&status, "endpointslices"), Some(json!(false)), "{status:#}");

    c.api.block(Kind::EndpointSlice, false);
    let full = want(&[
        ("10.96.0.10:53/UDP", &["10.244.1.2:5353"]),
        ("10.96.0.10:80/TCP", &["10.244.1.2:8080"]),
        ("10.96.0.20:443/TCP", &["10.244.3.3:8443"]),
    ]);
    wait_maps(&c, RECOVER, &full)?;
    assert_eq!(http_get(&ns, HEALTHZ, "/readyz")?.0, 200);

    // The API server dies. Meanwhile the cluster changes and etcd compacts.
    c.api.stop();
    assert!(c.api.delete(Kind::Service, "default", "other"));
    assert!(c.api.delete(Kind::EndpointSlice, "default", "other-1"));
    c.api.apply(slice(
        "web-a",
        "web",
        &[
            ("10.244.1.2", true, true, false, "n1"),
            ("10.244.1.4", true, true, false, "n1"),
        ],
        web_slice_ports(),
    ))?;
    c.api.compact();
    std::thread::sleep(Duration::from_secs(3));
    // The agent keeps serving the last state and stays healthy.
    c.lab.check_alive()?;
    assert_eq!(frontends(&c.lab)?, full, "the last state stays during the outage");
    assert_eq!(http_get(&ns, HEALTHZ, "/healthz")?.0, 200);
    assert!(c.lab.agent_log().contains("watch failed, retrying with backoff"));
    c.lab
        .wait_until(Duration::from_secs(10), "ferry status naming the failing watch", || {
            let (_, s, _) = c.lab.status()?;
            Ok(s["warnings"].as_array().is_some_and(|w| {
                w.iter()
                    .any(|w| w.as_str().is_some_and(|w| w.contains("watch is failing")))
            }))
        })?;

    // It comes back: the agent's resourceVersion is too old (410), it relists
    // and converges.
    c.api.restart()?;
    wait_maps(
        &c,
        RECOVER,
        &want(&[
            ("10.96.0.10:53/UDP", &["10.244.1.2:5353", "10.244.1.4:5353"]),
            ("10.96.0.10:80/TCP", &["10.244.1.2:8080", "10.244.1.4:8080"]),
        ]),
    )?;
    assert!(c.lab.agent_log().contains("relisted"), "{}", c.lab.logs());
    Ok(())
}

#[test]
fn gone_410_mid_watch_relists_and_an_unchanged_relist_writes_nothing() -> Result<()> {
    let c = cluster(LabOptions::new("cgone"), |_, api| {
        api.apply(service("web", "10.96.0.10", web_ports()))?;
        api.apply(slice(
            "web-a",
            "web",
            &[("10.244.1.2", true, true, false, "n1")],
            web_slice_ports(),
        ))?;
        Ok(())
    })?;
    let first = want(&[
        ("10.96.0.10:53/UDP", &["10.244.1.2:5353"]),
        ("10.96.0.10:80/TCP", &["10.244.1.2:8080"]),
    ]);
    wait_maps(&c, WAIT, &first)?;
    let lists = |api: &FakeApi| {
        api.requests_for(Kind::Service)
            .iter()
            .filter(|r| !r.contains("watch=true"))
            .count()
    };
    let lists_before = lists(&c.api);
    let synced_before = c.lab.syncs()?;

    // Every open watch ends with an ERROR event, code 410: the watchers relist.
    // Nothing changed, so nothing is written.
    c.api.expire_watches();
    c.lab
        .wait_until(RECOVER, "a relist of services", || Ok(lists(&c.api) > lists_before))?;
    c.lab.wait_until(RECOVER, "the relist logged", || {
        Ok(c.lab.agent_log().contains("relisted"))
    })?;
    c.lab.wait_until(RECOVER, "the relist's sync", || {
        Ok(c.lab.syncs()?.after_change > synced_before.after_change)
    })?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        c.lab.syncs()?.writes,
        synced_before.writes,
        "an unchanged relist wrote to the maps:\n{}",
        c.lab.logs()
    );
    assert_eq!(frontends(&c.lab)?, first);
    let log = c.lab.agent_log();
    assert!(
        log.lines()
            .any(|l| l.contains("maps already in sync, nothing written") && l.contains("upserts")),
        "the relist's sync logs that it wrote nothing:\n{log}"
    );

    // After the relist the watch works again.
    c.api.apply(slice(
        "web-a",
        "web",
        &[("10.244.1.9", true, true, false, "n1")],
        web_slice_ports(),
    ))?;
    wait_maps(
        &c,
        WAIT,
        &want(&[
            ("10.96.0.10:53/UDP", &["10.244.1.9:5353"]),
            ("10.96.0.10:80/TCP", &["10.244.1.9:8080"]),
        ]),
    )?;
    Ok(())
}

/// Issue 19, API server trouble: a relist that only ever gets its first page
/// (every continuation answered 410 Expired) is a partial list. The agent
/// keeps serving the last good state (a partial list must not delete the
/// Services on the pages it never got), says so on /readyz, in
/// ferry_watch_failing and ferry_watch_errors, and converges once whole lists
/// come back. (Outages and 410 on a watch: the two tests above.)
#[test]
fn a_partial_list_keeps_the_last_good_state_is_reported_and_converges() -> Result<()> {
    let names = ["a", "b", "c"];
    let mut c = cluster(LabOptions::new("cpartial"), |_, api| {
        for (i, n) in names.iter().enumerate() {
            api.apply(service(
                n,
                &format!("10.96.0.{}", 10 + i),
                json!([{"name": "http", "port": 80, "targetPort": 8080}]),
            ))?;
            api.apply(slice(
                &format!("{n}-1"),
                n,
                &[(&format!("10.244.1.{}", 2 + i), true, true, false, "n1")],
                json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
            ))?;
        }
        Ok(())
    })?;
    let ns = c.lab.node.clone();
    let full = want(&[
        ("10.96.0.10:80/TCP", &["10.244.1.2:8080"]),
        ("10.96.0.11:80/TCP", &["10.244.1.3:8080"]),
        ("10.96.0.12:80/TCP", &["10.244.1.4:8080"]),
    ]);
    wait_maps(&c, WAIT, &full)?;
    assert_eq!(http_get(&ns, HEALTHZ, "/readyz")?, (200, "ok\n".to_string()));

    // Lists come one object a page and continuations expire; the watches end
    // with 410, so every watcher relists, and gets one object of each kind.
    // Meanwhile `c` is deleted: only a whole list may take it away.
    c.api.paginate(Some(1), true);
    let expired = |api: &FakeApi| {
        api.requests_for(Kind::Service)
            .iter()
            .filter(|r| r.contains("continue="))
            .count()
    };
    c.api.expire_watches();
    c.lab
        .wait_until(RECOVER, "two continued service lists (and their 410s)", || {
            Ok(expired(&c.api) >= 2)
        })?;
    // Only now, with no watch left to tell of it (a live watch would, and
    // rightly), `c` goes.
    assert!(c.api.delete(Kind::Service, "default", "c"));
    assert!(c.api.delete(Kind::EndpointSlice, "default", "c-1"));
    let seen = expired(&c.api);
    c.lab
        .wait_until(RECOVER, "another continued service list after the deletion", || {
            Ok(expired(&c.api) > seen)
        })?;
    c.lab
        .wait_until(WAIT, "/readyz and metrics naming the failing watch", || {
            let (code, body) = http_get(&ns, HEALTHZ, "/readyz")?;
            let m = http_get(&ns, METRICS, "/metrics")?.1;
            Ok(code == 200
                && body.contains("failing API watches")
                && body.contains("services")
                && sample(&m, "ferry_watch_failing{resource=\"services\"}") == Some(1.0))
        })?;
    let m = http_get(&ns, METRICS, "/metrics")?.1;
    let errors = sample(&m, "ferry_watch_errors_total{resource=\"services\"}").unwrap_or(0.0);
    assert!(errors >= 1.0, "ferry_watch_errors_total for services: {errors}\n{m}");
    c.lab.check_alive()?;
    assert_eq!(
        frontends(&c.lab)?,
        full,
        "a partial list changes nothing: the last good state stays"
    );

    // Whole lists again: the agent converges (c goes), and says it is well.
    c.api.paginate(Some(1), false);
    wait_maps(
        &c,
        RECOVER,
        &want(&[
            ("10.96.0.10:80/TCP", &["10.244.1.2:8080"]),
            ("10.96.0.11:80/TCP", &["10.244.1.3:8080"]),
        ]),
    )?;
    assert!(
        c.api
            .requests_for(Kind::Service)
            .iter()
            .any(|r| r.contains("continue=")),
        "the lists were paged"
    );
    c.lab.wait_until(WAIT, "/readyz and metrics well again", || {
        let body = http_get(&ns, HEALTHZ, "/readyz")?.1;
        let m = http_get(&ns, METRICS, "/metrics")?.1;
        Ok(body == "ok\n" && sample(&m, "ferry_watch_failing{resource=\"services\"}") == Some(0.0))
    })?;
    Ok(())
}

#[test]
fn a_malformed_object_is_reported_and_the_rest_is_programmed() -> Result<()> {
    let c = cluster(LabOptions::new("cbad"), |_, api| {
        api.apply(service("web", "10.96.0.10", web_ports()))?;
        api.apply(slice(
            "web-a",
            "web",
            &[("10.244.1.2", true, true, false, "n1")],
            web_slice_ports(),
        ))?;
        // Not a Service k8s-openapi accepts: the port is a string.
        api.apply(service("broken", "10.96.0.30", json!([{"port": "eighty"}])))?;
        // Valid JSON, invalid value: caught by the translation.
        api.apply(service("wrongip", "10.96.0.999", json!([{"port": 80}])))?;
        Ok(())
    })?;
    wait_maps(
        &c,
        WAIT,
        &want(&[
            ("10.96.0.10:53/UDP", &["10.244.1.2:5353"]),
            ("10.96.0.10:80/TCP", &["10.244.1.2:8080"]),
        ]),
    )?;
    let log = c.lab.agent_log();
    let line = log
        .lines()
        .find(|l| l.contains("Service default/broken"))
        .with_context(|| format!("no error about Service default/broken:\n{log}"))?;
    assert!(line.contains("spec.ports[0].port"), "names the field: {line}");
    let line = log
        .lines()
        .find(|l| l.contains("Service default/wrongip"))
        .with_context(|| format!("no error about Service default/wrongip:\n{log}"))?;
    assert!(line.contains("spec.clusterIP"), "names the field: {line}");

    // Fixed: programmed, and the error is reported resolved.
    c.api.apply(service("broken", "10.96.0.30", json!([{"port": 8080}])))?;
    c.lab.wait_until(WAIT, "the fixed Service programmed", || {
        Ok(frontends(&c.lab)?.contains_key("10.96.0.30:8080/TCP"))
    })?;
    c.lab.wait_until(WAIT, "resolved logged", || {
        Ok(c.lab
            .agent_log()
            .lines()
            .any(|l| l.contains("resolved") && l.contains("default/broken")))
    })?;
    Ok(())
}

#[test]
fn a_pod_reaches_a_clusterip_learned_from_the_api() -> Result<()> {
    // Real Pods (run by the shim) whose addresses reach the agent only through
    // EndpointSlices served by the fake API.
    let opts = LabOptions::new("cpkt")
        .manifest("echo-a.yaml", &echo_pod("echo-a", "echo", None))
        .manifest("echo-b.yaml", &echo_pod("echo-b", "echo", None))
        .manifest("client.yaml", &client_pod("client"));
    let c = cluster(opts, |lab, api| {
        lab.wait_ready(&["echo-a", "echo-b", "client"], Duration::from_secs(60))?;
        api.apply(service(
            "echo",
            "10.96.0.10",
            json!([{"name": "http", "port": 80, "targetPort": "http"}]),
        ))?;
        let mut eps = Vec::new();
        for p in ["echo-a", "echo-b"] {
            let ip = lab
                .pod(p)
                .and_then(|r| r.pod_ip)
                .with_context(|| format!("{p} has an IP"))?;
            eps.push(ip.to_string());
        }
        let list: Vec<Ep> = eps
            .iter()
            .map(|ip| (ip.as_str(), true, true, false, lab.node.as_str()))
            .collect();
        api.apply(slice(
            "echo-1",
            "echo",
            &list,
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        ))?;
        Ok(())
    })?;
    let lab = &c.lab;

    let client = lab.pod_netns("client")?;
    let vip: SocketAddr = "10.96.0.10:80".parse()?;
    lab.wait_answered_by("the ClusterIP", &["echo-a", "echo-b"], || tcp_ask(&client, vip))?;
    let seen = split(&client, 40, |ns| tcp_ask(ns, vip))?;
    if seen.keys().map(String::as_str).collect::<Vec<_>>() != ["echo-a", "echo-b"] {
        bail!("want answers from echo-a and echo-b, got {seen:?}\n{}", lab.logs());
    }
    // Per-Service traffic counters: at least the 41 connections' packets.
    let (_, metrics) = http_get(&lab.node, METRICS, "/metrics")?;
    let packets: u64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("ferry_service_packets_total{")
                && l.contains("service=\"default/echo\"")
                && l.contains("port=\"http\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no packet counter for default/echo:http in\n{metrics}"))?;
    assert!(packets >= 41 * 3, "{packets} packets counted for 41 connections");
    assert!(
        metrics.contains("ferry_service_bytes_total{service=\"default/echo\",port=\"http\"}"),
        "{metrics}"
    );
    // The same counters in `ferry svc list -o json`.
    let rows: Vec<Value> = serde_json::from_str(&lab.ferry(&["svc", "list", "-o", "json"])?)?;
    let row = rows
        .iter()
        .find(|r| r["frontend"] == "10.96.0.10:80")
        .context("the frontend in svc list")?;
    assert!(row["packets"].as_u64().unwrap_or(0) >= packets, "{row}");
    Ok(())
}
