//! Containers as host processes inside the Pod's network namespace.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    process::Stdio,
};

use k8s_openapi::api::core::v1::Container;
use tokio::process::{Child, Command};

/// The Pod facts a container's environment can refer to (downward API).
pub struct PodInfo<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// The node the Pod was placed on: this shim's, as a shim runs only the
    /// Pods placed on its node (spec.nodeName, or `crate::placement`).
    pub node: &'a str,
    pub ip: Ipv4Addr,
}

/// The container's environment: its `env` (values and fieldRefs), plus HOSTNAME,
/// POD_NAME, POD_NAMESPACE, POD_IP where not set, and PATH with the directory of
/// the running `ferry` first (so manifests can say `command: [ferry, echo]`).
pub fn environment(c: &Container, pod: &PodInfo) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    let path = match exe_dir {
        Some(d) => format!("{}:{path}", d.display()),
        None => path,
    };
    env.insert("PATH".into(), path);
    env.insert("HOME".into(), "/root".into());
    for (k, v) in [
        ("HOSTNAME", pod.name.to_string()),
        ("POD_NAME", pod.name.to_string()),
        ("POD_NAMESPACE", pod.namespace.to_string()),
        ("POD_IP", pod.ip.to_string()),
    ] {
        env.insert(k.into(), v);
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            v.clone()
        } else if let Some(f) = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
            match f.field_path.as_str() {
                "metadata.name" => pod.name.to_string(),
                "metadata.namespace" => pod.namespace.to_string(),
                "status.podIP" | "status.podIPs" => pod.ip.to_string(),
                "spec.nodeName" => pod.node.to_string(),
                other => {
                    tracing::warn!(pod = pod.name, "env {}: fieldRef {other} is not supported", e.name);
                    String::new()
                }
            }
        } else {
            String::new()
        };
        env.insert(e.name.clone(), value);
    }
    env.into_iter().collect()
}

/// A command that runs in the network namespace `ns`, in its own process group.
pub fn command_in(ns: &OwnedFd, prog: &str, args: &[String], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().cloned())
        .process_group(0)
        .kill_on_drop(true);
    let fd = ns.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setns) between fork and exec; `ns`
    // outlives the spawn call.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Starts a container; output goes to `log`.
pub fn start(c: &Container, ns: &OwnedFd, env: &[(String, String)], log: &Path) -> std::io::Result<Child> {
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    let Some((prog, args)) = argv.split_first() else {
        return Err(std::io::Error::other(format!("container {}: no command", c.name)));
    };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = command_in(ns, prog, args, env);
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    if let Some(dir) = &c.working_dir {
        cmd.current_dir(dir);
    }
    cmd.spawn()
}

/// Sends `sig` to a container's process group.
pub fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_resolves_field_refs_and_adds_pod_facts() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "env": [
                {"name": "A", "value": "1"},
                {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
            ]
        }))
        .unwrap();
        let pod = PodInfo {
            name: "echo-0",
            namespace: "default",
            node: "n1",
            ip: Ipv4Addr::new(10, 244, 0, 2),
        };
        let env: BTreeMap<_, _> = environment(&c, &pod).into_iter().collect();
        assert_eq!(env["A"], "1");
        assert_eq!(env["ME"], "echo-0");
        assert_eq!(env["IP"], "10.244.0.2");
        assert_eq!(env["NODE"], "n1");
        assert_eq!(env["HOSTNAME"], "echo-0");
        assert_eq!(env["POD_NAMESPACE"], "default");
        assert!(env["PATH"].contains(':'));
    }
}
