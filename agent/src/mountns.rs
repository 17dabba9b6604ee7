//! `ip netns exec` runs a command in a private mount namespace with a fresh /sys
//! for the network namespace. There, the host's bpffs is not mounted (every bpffs
//! mount is a separate instance, so pins made in a new one are invisible to
//! everyone else and die with the process), and named network namespaces the shim
//! creates under /run/netns would be invisible outside. Ferry only needs the
//! *network* namespace from `ip netns exec`, so it returns to the mount namespace
//! of the process that launched it.
use std::fs;

use anyhow::{Context as _, Result};
use nix::sched::{setns, CloneFlags};

/// Rejoins the parent's mount namespace when we are in a different one and our
/// /sys/fs/bpf is not a bpffs (the `ip netns exec` case; a container with bpffs
/// mounted in is left alone). Must run while the process is single-threaded.
/// Returns whether it switched.
pub fn rejoin_launcher_mount_ns() -> Result<bool> {
    let own_mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if crate::dataplane::has_bpffs(&own_mounts) {
        return Ok(false);
    }
    let ppid = nix::unistd::getppid();
    let parent = format!("/proc/{ppid}/ns/mnt");
    let (Ok(own_ns), Ok(parent_ns)) = (fs::read_link("/proc/self/ns/mnt"), fs::read_link(&parent)) else {
        return Ok(false);
    };
    if own_ns == parent_ns || ppid.as_raw() <= 1 {
        return Ok(false);
    }
    let f = fs::File::open(&parent).with_context(|| format!("opening {parent}"))?;
    setns(&f, CloneFlags::CLONE_NEWNS).context("joining the launcher's mount namespace")?;
    Ok(true)
}
