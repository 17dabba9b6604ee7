//! `ip netns exec` runs a command in a private mount namespace with a fresh /sys
//! for the network namespace. There, the host's bpffs is not mounted (every bpffs
//! mount is a separate instance, so pins made in a new one are invisible to
//! everyone else and die with the process), and named network namespaces the shim
//! creates under /run/netns would be invisible outside. Ferry only needs the
//! *network* namespace from `ip netns exec`, so it returns to the mount namespace
//! of the process that launched it, or of PID 1 when the launcher is already gone
//! (a backgrounded `ip netns exec ... &` whose shell exited: we were reparented).
use std::{fs, io, path::PathBuf};

use nix::sched::{setns, CloneFlags};

/// Joining another mount namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum MountNsError {
    #[error("opening {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("joining the mount namespace of PID {pid}: {source}")]
    Setns { pid: i32, source: nix::Error },
    #[error("returning to {} after joining PID {pid}'s mount namespace: {source}", path.display())]
    Chdir { pid: i32, path: PathBuf, source: io::Error },
}

use crate::dataplane::has_bpffs;

/// Rejoins the launcher's (or PID 1's) mount namespace when we are in a different
/// one and our /sys/fs/bpf is not a bpffs (the `ip netns exec` case; a container
/// with bpffs mounted in is left alone). A candidate that has bpffs mounted is
/// preferred. Must run while the process is single-threaded. Returns the PID
/// whose mount namespace was joined.
pub fn rejoin_launcher_mount_ns() -> Result<Option<i32>, MountNsError> {
    if has_bpffs(&fs::read_to_string("/proc/self/mounts").unwrap_or_default()) {
        return Ok(None);
    }
    let Ok(own_ns) = fs::read_link("/proc/self/ns/mnt") else {
        return Ok(None);
    };
    let ppid = nix::unistd::getppid().as_raw();
    let mut candidates: Vec<i32> = [ppid, 1]
        .into_iter()
        .filter(|pid| *pid >= 1)
        .filter(|pid| fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|ns| ns != own_ns))
        .collect();
    candidates.dedup();
    // Prefer a namespace that already has the shared bpffs.
    candidates.sort_by_key(|pid| !has_bpffs(&fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap_or_default()));
    let Some(&pid) = candidates.first() else {
        if ppid == 1 {
            tracing::warn!(
                "/sys/fs/bpf is not a bpffs here and no other mount namespace can be joined \
                 (the launcher exited); maps pinned now are private to this process"
            );
        }
        return Ok(None);
    };
    let path = format!("/proc/{pid}/ns/mnt");
    let f = fs::File::open(&path).map_err(|source| MountNsError::Open {
        path: path.clone(),
        source,
    })?;
    // setns(CLONE_NEWNS) moves the working directory to the new root; relative
    // paths on the command line must keep meaning what the user meant.
    let cwd = std::env::current_dir().ok();
    setns(&f, CloneFlags::CLONE_NEWNS).map_err(|source| MountNsError::Setns { pid, source })?;
    if let Some(path) = cwd {
        std::env::set_current_dir(&path).map_err(|source| MountNsError::Chdir { pid, path, source })?;
    }
    Ok(Some(pid))
}
