//! Which of a Service port's endpoints take new connections and which only
//! keep the ones they have: readiness, terminating fallback, traffic policy
//! Local, and topology hints.
use super::{BackendSpec, Config};
use crate::endpoints::{self, Endpoint};

/// The endpoints new connections may use (sorted), the ones that only keep
/// their established connections (sorted: not ready, terminating, not on
/// this node when `local_only`, or hinted for other nodes or zones), and
/// whether the usable ones are the serving+terminating fallback. Without
/// `local_only` (kube-proxy's "cluster endpoints"), node or zone hints apply
/// as [`endpoints::topology`] decides for this node (in `zone`, if known).
pub(super) fn split(
    all: &[Endpoint],
    local_only: bool,
    cfg: &Config,
    zone: Option<&str>,
) -> (Vec<BackendSpec>, Vec<BackendSpec>, bool) {
    let all = endpoints::merge(all.to_vec());
    let (candidates, remote): (Vec<Endpoint>, Vec<Endpoint>) = if local_only {
        all.into_iter()
            .partition(|e| e.node.as_deref() == Some(cfg.node.as_str()))
    } else if let Some(mode) = endpoints::topology(&all, &cfg.node, zone) {
        all.into_iter().partition(|e| mode.admits(e))
    } else {
        (all, Vec::new())
    };
    let (usable, fallback) = endpoints::usable(candidates.clone());
    let mut draining: Vec<BackendSpec> = candidates
        .into_iter()
        .chain(remote)
        .filter(|e| !usable.iter().any(|u| (u.addr, u.port) == (e.addr, e.port)))
        .map(|e| backend_spec(&e, cfg))
        .collect();
    draining.sort();
    draining.dedup_by(|a, b| (a.addr, a.port) == (b.addr, b.port));
    (
        usable.iter().map(|e| backend_spec(e, cfg)).collect(),
        draining,
        fallback,
    )
}

fn backend_spec(e: &Endpoint, cfg: &Config) -> BackendSpec {
    BackendSpec {
        addr: e.addr,
        port: e.port,
        terminating: e.terminating,
        local: !cfg.node.is_empty() && e.node.as_deref() == Some(cfg.node.as_str()),
    }
}
