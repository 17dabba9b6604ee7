//! The manifests in deploy/ parse as the Kubernetes types they claim to be, and
//! grant exactly what the agent uses: the RBAC rules are the cluster source's
//! `API_ACCESS`, the capabilities are the dataplane's `REQUIRED_CAPABILITIES`, and
//! every flag the DaemonSet passes exists.
use std::{collections::BTreeSet, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use ferry_agent::{dataplane::REQUIRED_CAPABILITIES, sources::cluster::API_ACCESS};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

#[derive(Default)]
struct Deploy {
    accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemonsets: Vec<DaemonSet>,
}

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every YAML file in deploy/, typed by its kind.
fn load() -> Result<Deploy> {
    let mut out = Deploy::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no manifests in {}", deploy_dir().display());
    }
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let v = serde_yaml::Value::deserialize(doc).with_context(|| format!("{} document {i}", f.display()))?;
            if v.is_null() {
                continue;
            }
            let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
            let what = || format!("{} document {i} ({kind})", f.display());
            match kind.as_str() {
                "ServiceAccount" => out.accounts.push(serde_yaml::from_value(v).with_context(what)?),
                "ClusterRole" => out.roles.push(serde_yaml::from_value(v).with_context(what)?),
                "ClusterRoleBinding" => out.bindings.push(serde_yaml::from_value(v).with_context(what)?),
                "DaemonSet" => out.daemonsets.push(serde_yaml::from_value(v).with_context(what)?),
                other => bail!("{}: unexpected kind {other:?}", what()),
            }
        }
    }
    Ok(out)
}

type Grant = BTreeSet<(String, String, String)>;

#[test]
fn rbac_grants_exactly_what_the_cluster_source_uses() -> Result<()> {
    let d = load()?;
    assert_eq!(d.roles.len(), 1, "one ClusterRole");
    let role = &d.roles[0];
    let mut granted = Grant::new();
    for r in role.rules.iter().flatten() {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none(), "{r:?}");
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    assert!(
                        !g.contains('*') && !res.contains('*') && !v.contains('*'),
                        "no wildcards: {r:?}"
                    );
                    granted.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    let used: Grant = API_ACCESS
        .iter()
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(move |v| (a.group.to_string(), a.resource.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(
        granted, used,
        "the ClusterRole grants what the agent uses, no more, no less"
    );

    // The binding ties that role to the DaemonSet's ServiceAccount.
    assert_eq!(d.accounts.len(), 1);
    let sa = &d.accounts[0];
    assert_eq!(d.bindings.len(), 1);
    let b = &d.bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&b.role_ref.name), role.metadata.name.as_ref());
    let subjects = b.subjects.as_deref().unwrap_or_default();
    assert!(
        subjects.iter().any(|s| s.kind == "ServiceAccount"
            && Some(&s.name) == sa.metadata.name.as_ref()
            && s.namespace == sa.metadata.namespace),
        "{subjects:?}"
    );
    let ds = &d.daemonsets[0];
    let spec = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("pod spec")?;
    assert_eq!(spec.service_account_name, sa.metadata.name);
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
    Ok(())
}

#[test]
fn the_daemonset_runs_everywhere_with_only_the_capabilities_the_agent_needs() -> Result<()> {
    let d = load()?;
    assert_eq!(d.daemonsets.len(), 1);
    let ds = &d.daemonsets[0];
    let spec = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("pod spec")?;
    assert_eq!(spec.host_network, Some(true), "hostNetwork");
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    assert_eq!(spec.containers.len(), 1);
    let c = &spec.containers[0];
    let sc = c.security_context.as_ref().context("securityContext")?;
    assert_ne!(sc.privileged, Some(true), "not privileged");
    let caps = sc.capabilities.as_ref().context("capabilities")?;
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    let needed: BTreeSet<&str> = REQUIRED_CAPABILITIES.iter().copied().collect();
    assert_eq!(added, needed, "capabilities.add is exactly REQUIRED_CAPABILITIES");
    assert!(caps.drop.iter().flatten().any(|c| c == "ALL"), "drops the rest");

    // NODE_NAME from the downward API.
    let node = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .context("NODE_NAME env")?;
    let field = node
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .context("fieldRef")?;
    assert_eq!(field.field_path, "spec.nodeName");

    // bpffs from the host (pins outlive the Pod), cgroup v2 read-only.
    let host_paths: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.as_str()))
        .collect();
    assert!(
        host_paths.contains("/sys/fs/bpf") && host_paths.contains("/sys/fs/cgroup"),
        "{host_paths:?}"
    );
    let mounts: BTreeSet<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(mounts.contains("/sys/fs/bpf"), "{mounts:?}");

    // Probes on the health port, kube-proxy's 10256.
    let probe_path = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        p.and_then(|p| p.http_get.as_ref())
            .map(|h| (h.path.clone().unwrap_or_default(), h.port.clone()))
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        probe_path(c.liveness_probe.as_ref()),
        Some(("/healthz".into(), IntOrString::Int(10256)))
    );
    assert_eq!(
        probe_path(c.readiness_probe.as_ref()),
        Some(("/readyz".into(), IntOrString::Int(10256)))
    );
    assert!(c
        .args
        .iter()
        .flatten()
        .any(|a| a == "--healthz-bind-address=0.0.0.0:10256"));

    // Every flag passed exists in the agent's CLI.
    let help = ferry_tests::sys::run(&ferry_tests::sys::ferry_bin()?.to_string_lossy(), &["agent", "--help"])?;
    for a in c.args.iter().flatten().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap_or(a);
        assert!(help.contains(flag), "ferry agent has no flag {flag}:\n{help}");
    }
    assert_eq!(
        c.args.as_ref().and_then(|a| a.first()).map(String::as_str),
        Some("agent")
    );
    Ok(())
}
