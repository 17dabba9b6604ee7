//! Named network namespaces (`/run/netns/<name>`, as `ip netns` keeps them) without
//! shelling out: a thread unshares a new network namespace and bind-mounts it.
use std::{
    fs,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};
use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{setns, unshare, CloneFlags},
};

pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates `/run/netns/<name>` holding a new network namespace.
pub fn create(name: &str) -> Result<()> {
    fs::create_dir_all(NETNS_DIR)?;
    let target = path(name);
    if target.exists() {
        delete(name)?;
    }
    fs::File::create(&target).with_context(|| format!("creating {}", target.display()))?;
    let t = target.clone();
    let r = std::thread::spawn(move || -> Result<()> {
        // Only this thread changes network namespace; it ends right after.
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &t,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .context("bind-mounting the namespace")?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))?;
    if r.is_err() {
        let _ = fs::remove_file(&target);
    }
    r.with_context(|| format!("creating network namespace {name}"))
}

/// Removes a named network namespace (it disappears once no process is in it).
pub fn delete(name: &str) -> Result<()> {
    let target = path(name);
    let _ = umount2(&target, MntFlags::MNT_DETACH);
    match fs::remove_file(&target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Names of the namespaces under /run/netns.
pub fn list() -> Vec<String> {
    fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// An open handle on a named namespace.
pub fn open(name: &str) -> Result<OwnedFd> {
    let f = fs::File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
    Ok(f.into())
}

/// Runs `f` on a thread inside the namespace `fd` (sockets it creates stay there).
pub fn run_in<T: Send + 'static>(fd: &OwnedFd, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let fd = fd.try_clone()?;
    std::thread::spawn(move || -> Result<T> {
        setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))?
}
