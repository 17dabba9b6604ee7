//! Deployments: which Pods to start and stop so that a Deployment has `replicas`
//! Pods of its current template, replaced by a rolling update when the template
//! changes (spec.strategy.rollingUpdate maxSurge / maxUnavailable, Kubernetes'
//! defaults 25% / 25%), the way the Deployment controller scales its ReplicaSets.
//!
//! Pods are named `<deployment>-<i>`, `i` the lowest index no Pod of the
//! Deployment (running or still stopping) uses, so a fresh Deployment of 3 runs
//! `echo-0`, `echo-1`, `echo-2`. With several nodes each plans its own share of
//! the replicas with the indices it owns (`DeploymentDef::slots`), and applies
//! maxSurge / maxUnavailable to that share. Planning is pure; the shim's loop
//! applies it.

/// A Deployment as the shim runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeploymentDef {
    /// `namespace/name`.
    pub key: String,
    pub name: String,
    pub namespace: String,
    pub replicas: u32,
    pub max_surge: u32,
    pub max_unavailable: u32,
    /// The replica indices this node runs (all of them on a single node; with
    /// several nodes, `replicas` is this node's share and its Pods are named
    /// after these indices only, so the nodes never pick the same name).
    pub slots: crate::placement::Slots,
    /// The Pod template (`name` is the Deployment's; the plan names Pods).
    pub template: crate::manifests::PodDef,
}

impl DeploymentDef {
    /// Whether the Pod `name` (`<deployment>-<i>`) is one this node runs: `i`
    /// is one of its slots.
    pub fn owns(&self, name: &str) -> bool {
        let index = name
            .strip_prefix(self.name.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|i| i.parse::<u64>().ok());
        index.is_some_and(|i| self.slots.has(i))
    }
}

/// A Pod of the Deployment that runs (not yet asked to stop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Whether it runs the current template.
    pub current: bool,
    pub ready: bool,
}

/// What to do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Names of new Pods of the current template.
    pub start: Vec<String>,
    /// Pods to terminate (with their grace period).
    pub stop: Vec<String>,
}

/// One step: `members` run, `taken` are names still in use by stopping Pods.
pub fn plan(d: &DeploymentDef, members: &[Member], taken: &[String]) -> Plan {
    let mut out = Plan::default();
    let replicas = d.replicas as usize;
    let (current, old): (Vec<&Member>, Vec<&Member>) = members.iter().partition(|m| m.current);
    let min_available = replicas.saturating_sub(d.max_unavailable as usize);
    let mut ready = members.iter().filter(|m| m.ready).count();
    let mut alive = members.len();

    // Old Pods: unready ones go first (they serve nobody); ready ones while enough
    // Pods stay ready.
    let mut old_sorted = old.clone();
    old_sorted.sort_by_key(|m| (m.ready, std::cmp::Reverse(m.name.clone())));
    for m in old_sorted {
        if !m.ready {
            out.stop.push(m.name.clone());
            alive -= 1;
        } else if ready > min_available {
            out.stop.push(m.name.clone());
            ready -= 1;
            alive -= 1;
        }
    }
    // Scale down: more current Pods than replicas (no rollout in progress).
    let mut current_n = current.len();
    if current_n > replicas {
        let mut extra: Vec<&&Member> = current.iter().collect();
        extra.sort_by_key(|m| (m.ready, std::cmp::Reverse(m.name.clone())));
        for m in extra.into_iter().take(current_n - replicas) {
            out.stop.push(m.name.clone());
            alive -= 1;
        }
        current_n = replicas;
    }
    // New Pods: up to replicas current ones, at most replicas + maxSurge in all.
    let limit = replicas + d.max_surge as usize;
    let mut k = 0u32;
    while current_n < replicas && alive < limit {
        let name = loop {
            let n = format!("{}-{}", d.name, d.slots.index(k));
            k += 1;
            if !members.iter().any(|m| m.name == n) && !taken.contains(&n) {
                break n;
            }
        };
        out.start.push(name);
        current_n += 1;
        alive += 1;
    }
    out
}

/// maxSurge / maxUnavailable: an absolute number or a percentage of replicas
/// (surge rounds up, unavailable down, as Kubernetes does). Both zero is not
/// allowed by the API; here it becomes maxUnavailable 1 so a rollout can finish.
pub fn resolve(surge: Option<&str>, unavailable: Option<&str>, replicas: u32) -> Result<(u32, u32), String> {
    let parse = |v: Option<&str>, field: &str, round_up: bool| -> Result<u32, String> {
        let v = v.unwrap_or("25%");
        if let Some(p) = v.strip_suffix('%') {
            let p: u64 = p
                .parse()
                .map_err(|_| format!("spec.strategy.rollingUpdate.{field}: {v:?} is not a number or percentage"))?;
            let scaled = p * u64::from(replicas);
            let n = if round_up { scaled.div_ceil(100) } else { scaled / 100 };
            Ok(n as u32)
        } else {
            v.parse()
                .map_err(|_| format!("spec.strategy.rollingUpdate.{field}: {v:?} is not a number or percentage"))
        }
    };
    let s = parse(surge, "maxSurge", true)?;
    let u = parse(unavailable, "maxUnavailable", false)?;
    Ok(if s == 0 && u == 0 { (0, 1) } else { (s, u) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(replicas: u32, surge: u32, unavailable: u32) -> DeploymentDef {
        let mut m = crate::manifests::Manifests::default();
        crate::manifests::load_str(
            "d.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: echo}\nspec:\n  selector: {matchLabels: {app: echo}}\n  template:\n    metadata: {labels: {app: echo}}\n    spec:\n      containers: [{name: e, command: [ferry, echo]}]\n",
            &mut m,
        );
        let mut def = m.place("n1", &[]).deployments.remove("default/echo").expect("parsed");
        def.replicas = replicas;
        def.max_surge = surge;
        def.max_unavailable = unavailable;
        def
    }
    fn m(name: &str, current: bool, ready: bool) -> Member {
        Member {
            name: name.into(),
            current,
            ready,
        }
    }

    #[test]
    fn a_fresh_deployment_starts_all_replicas() {
        let p = plan(&dep(3, 1, 0), &[], &[]);
        assert_eq!(p.start, ["echo-0", "echo-1", "echo-2"]);
        assert!(p.stop.is_empty());
    }

    #[test]
    fn a_rolling_update_surges_first_and_never_drops_below_min_available() {
        let d = dep(3, 1, 0);
        // Template changed: one new Pod (surge), no old one stops yet.
        let old = [
            m("echo-0", false, true),
            m("echo-1", false, true),
            m("echo-2", false, true),
        ];
        let p = plan(&d, &old, &[]);
        assert_eq!((p.start.as_slice(), p.stop.len()), (&["echo-3".to_string()][..], 0));
        // The new Pod runs but is not ready: wait.
        let mut now = old.to_vec();
        now.push(m("echo-3", true, false));
        assert_eq!(plan(&d, &now, &[]), Plan::default());
        // Ready: one old Pod goes, and the next new Pod takes its room.
        now[3].ready = true;
        let p = plan(&d, &now, &[]);
        assert_eq!(p.stop, ["echo-2"]);
        assert_eq!(p.start, ["echo-4"]);
        // While echo-4 is not ready, no other old Pod goes.
        let now = [
            m("echo-0", false, true),
            m("echo-1", false, true),
            m("echo-3", true, true),
            m("echo-4", true, false),
        ];
        assert_eq!(plan(&d, &now, &["echo-2".to_string()]), Plan::default());
        // Done: three current Pods, nothing to do.
        let done = [
            m("echo-3", true, true),
            m("echo-4", true, true),
            m("echo-0", true, true),
        ];
        assert_eq!(plan(&d, &done, &[]), Plan::default());
    }

    #[test]
    fn max_unavailable_lets_old_pods_go_first_and_scale_down_works() {
        let d = dep(3, 0, 1);
        let old = [
            m("echo-0", false, true),
            m("echo-1", false, true),
            m("echo-2", false, true),
        ];
        let p = plan(&d, &old, &[]);
        assert_eq!(p.stop, ["echo-2"], "no surge: an old Pod makes room first");
        assert_eq!(p.start, ["echo-3"], "and a new one takes it");
        let p = plan(&dep(1, 1, 0), &[m("echo-0", true, true), m("echo-1", true, true)], &[]);
        assert_eq!(p.stop, ["echo-1"]);
    }

    #[test]
    fn a_node_names_its_share_after_its_own_indices_only() {
        // Node 2 of 2 owns the odd indices: of 5 replicas, echo-1 and echo-3.
        let mut d = dep(2, 1, 0);
        d.slots = crate::placement::Slots { first: 1, stride: 2 };
        assert_eq!(plan(&d, &[], &[]).start, ["echo-1", "echo-3"]);
        // A rolling update surges with the next index of its own, never
        // another node's.
        let old = [m("echo-1", false, true), m("echo-3", false, true)];
        assert_eq!(plan(&d, &old, &[]).start, ["echo-5"]);
        assert_eq!(plan(&d, &old, &["echo-5".to_string()]).start, ["echo-7"]);
        assert!(d.owns("echo-1") && d.owns("echo-7"));
        assert!(!d.owns("echo-0") && !d.owns("echo-x") && !d.owns("other-1") && !d.owns("echo-"));
        assert!(dep(3, 1, 0).owns("echo-0"), "a single node owns every index");
    }

    #[test]
    fn percentages_round_like_kubernetes() {
        assert_eq!(resolve(None, None, 3), Ok((1, 0)));
        assert_eq!(resolve(Some("50%"), Some("1"), 4), Ok((2, 1)));
        assert_eq!(resolve(Some("0"), Some("0"), 4), Ok((0, 1)));
        assert!(resolve(Some("lots"), None, 3).unwrap_err().contains("maxSurge"));
    }
}
