//! Small helpers around the commands tests and the lab may use (`ip`, `mount`).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// Runs a command, failing with its stderr if it exits non-zero.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip netns exec NS cmd args...`.
pub fn netns_exec(ns: &str, cmd: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", ns, cmd];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// The ids of the BPF programs process `pid` holds a descriptor of
/// (`prog_id:` in /proc/PID/fdinfo): the agent's programs.
pub fn prog_ids_of(pid: u32) -> Result<std::collections::BTreeSet<u32>> {
    let mut ids = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .with_context(|| format!("the descriptors of process {pid}"))?
        .flatten()
    {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:")?.trim().parse::<u32>().ok()),
        );
    }
    Ok(ids)
}

/// Long-running commands in network namespaces (servers, tunnels), killed
/// when dropped, so that a failing test leaves none behind.
#[derive(Default)]
pub struct Processes(Vec<std::process::Child>);

impl Processes {
    /// Starts `cmd` (program and arguments) in `ns`, output discarded.
    pub fn spawn_in(&mut self, ns: &str, cmd: &[&str]) -> Result<()> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {cmd:?} in {ns}"))?;
        self.0.push(child);
        Ok(())
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Names of all network namespaces (`ip netns list`).
pub fn netns_list() -> Vec<String> {
    run("ip", &["netns", "list"])
        .map(|out| {
            out.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes every network namespace whose name starts with `prefix`.
/// Deletes the lab's namespaces, first killing any process still in them (a
/// Pod whose shim was stopped before its grace period ended, say), so that
/// nothing outlives the test.
pub fn delete_netns_with_prefix(prefix: &str) {
    for ns in netns_list() {
        if ns.starts_with(prefix) {
            if let Ok(pids) = run("ip", &["netns", "pids", &ns]) {
                for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                    // SAFETY: kill(2) on a pid listed in our own test namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = run("ip", &["netns", "delete", &ns]);
        }
    }
}

/// Makes sure a bpf filesystem is mounted at /sys/fs/bpf (the agent does the same).
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).map(|_| ())
}

/// A private pin directory under /sys/fs/bpf for a test that loads the
/// dataplane without a network namespace; removed with its pins when dropped
/// (also when the test fails).
pub struct PinDir(pub PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/ferry-<tag>-<pid>`, empty (bpffs mounted if missing).
    /// Fails unless running as root (BPF).
    pub fn new(tag: &str) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("this test needs root (BPF)");
        }
        ensure_bpffs()?;
        let dir = PathBuf::from(format!("/sys/fs/bpf/ferry-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `ferry` binary to test: $FERRY_BIN, else the one cargo built next to the
/// running executable (target/<profile>/ferry).
pub fn ferry_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir: Option<&Path> = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join("ferry");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
    }
    bail!(
        "the ferry binary was not found next to {}; build it (cargo build -p ferry) or set FERRY_BIN",
        exe.display()
    )
}

/// Fails unless we are root: the lab needs CAP_NET_ADMIN and CAP_BPF.
pub fn require_root() -> Result<()> {
    if !nix_is_root() {
        bail!("the lab needs root (network namespaces and BPF); run `cargo xtask test` as root");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
