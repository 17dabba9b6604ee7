//! `ferry cleanup`: removes Ferry from a node. Detaches every link the agent
//! pinned under `<pin dir>/links` (TCX, XDP, cgroup), then any Ferry program
//! still attached to an interface of this network namespace through a link
//! nobody pinned or a netlink tc filter (`--tc-attach netlink`), removes the pin directory (which frees the maps) and the
//! status file. Refuses while an agent holds the pin directory, unless forced.
use std::{
    collections::BTreeSet,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::Link as _,
    tc::{SchedClassifierLink, TcHandle},
};
use ferry_common::PROG_XDP_FROM_NETDEV;

use crate::{
    bpfsys, pinlock,
    status::kernel_view::{ferry_tcx_programs, interfaces, link_pins, program_names, Iface},
};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(
        "an agent{} holds the pin directory {path}: stop it first (delete the DaemonSet, or \
         SIGTERM it), or pass --force",
        pid.map(|p| format!(" (PID {p})")).unwrap_or_default()
    )]
    AgentRunning { path: PathBuf, pid: Option<u32> },
    #[error(transparent)]
    Lock(#[from] pinlock::PinLockError),
    #[error("listing the interfaces of this network namespace: {0}")]
    Netlink(String),
    #[error("removing the pin directory {path}: {source}")]
    RemoveDir { path: PathBuf, source: io::Error },
    #[error("{} attachment(s) could not be removed: {}", .0.len(), .0.join("; "))]
    Left(Vec<String>),
}

/// What was done, one line each.
pub type Done = Vec<String>;

/// Removes Ferry's attachments and pins for the pin directory `dir`. Must run
/// in the node's network namespace (for the interfaces' attachments).
pub async fn cleanup(dir: &Path, status_file: Option<&Path>, force: bool) -> Result<Done, CleanupError> {
    if let Some(pid) = pinlock::held_by(dir)? {
        if !force {
            return Err(CleanupError::AgentRunning {
                path: dir.to_path_buf(),
                pid,
            });
        }
        tracing::warn!(
            "an agent holds {}; going on (--force): it will serve nothing",
            dir.display()
        );
    }
    let mut done = Done::new();
    let mut left = Vec::new();
    for (file, path) in link_pins(dir) {
        match detach_pinned(&path) {
            Ok(()) => done.push(format!("detached the pinned link {file}")),
            Err(e) => left.push(format!("pinned link {}: {e}", path.display())),
        }
    }
    let (more, failed) = detach_unpinned().await?;
    done.extend(more);
    left.extend(failed);
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|source| CleanupError::RemoveDir {
            path: dir.to_path_buf(),
            source,
        })?;
        done.push(format!("removed the pin directory {} (and its maps)", dir.display()));
    }
    if let Some(f) = status_file.filter(|f| f.exists()) {
        if std::fs::remove_file(f).is_ok() {
            done.push(format!("removed the status file {}", f.display()));
        }
    }
    if !left.is_empty() {
        return Err(CleanupError::Left(left));
    }
    Ok(done)
}

/// Detaches the link pinned at `path` (even if a running agent holds it too)
/// and unpins it.
fn detach_pinned(path: &Path) -> io::Result<()> {
    let fd = bpfsys::obj_get(path)?;
    bpfsys::link_detach(fd.as_fd())?;
    std::fs::remove_file(path)
}

/// Ferry programs still attached to this network namespace's interfaces
/// (their pins lost, say): each link of theirs is detached. Returns what was
/// done and what could not be.
async fn detach_unpinned() -> Result<(Done, Vec<String>), CleanupError> {
    let ifaces = interfaces().await.map_err(CleanupError::Netlink)?;
    let (mut done, mut left) = remove_tc_filters(&ifaces);
    let names = program_names();
    let mut progs: BTreeSet<(u32, String, String)> = BTreeSet::new();
    for i in &ifaces {
        for (name, id, _) in ferry_tcx_programs(&i.name) {
            progs.insert((id, name, i.name.clone()));
        }
        if let Some((_, id)) = i.xdp {
            if names.get(&id).is_some_and(|n| n == PROG_XDP_FROM_NETDEV) {
                progs.insert((id, PROG_XDP_FROM_NETDEV.to_string(), i.name.clone()));
            }
        }
    }
    if progs.is_empty() {
        return Ok((done, left));
    }
    let ids: BTreeSet<u32> = progs.iter().map(|(id, _, _)| *id).collect();
    // Every link of these programs: one agent loaded them for this namespace.
    let links: Vec<(u32, u32)> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| ids.contains(&l.program_id()))
        .map(|l| (l.id(), l.program_id()))
        .collect();
    for (link, prog) in &links {
        match bpfsys::link_get_fd_by_id(*link).and_then(|fd| bpfsys::link_detach(fd.as_fd())) {
            Ok(()) => done.push(format!("detached link {link} of program {prog} (not pinned)")),
            Err(e) => left.push(format!("link {link} of program {prog}: {e}")),
        }
    }
    for (id, name, ifname) in progs {
        if !links.iter().any(|(_, p)| *p == id) {
            left.push(format!("{name} (program {id}) on {ifname} is attached without a link"));
        }
    }
    Ok((done, left))
}

/// Deletes Ferry's netlink tc filters (clsact ingress and egress) from the
/// interfaces.
/// Returns what was done and what could not be.
fn remove_tc_filters(ifaces: &[Iface]) -> (Done, Vec<String>) {
    let (mut done, mut left) = (Done::new(), Vec::new());
    for i in ifaces {
        for f in &i.tc_filters {
            let what = format!(
                "the tc filter of {} on {} (priority {}, handle {:#x})",
                f.program, i.name, f.priority, f.handle
            );
            let link = SchedClassifierLink::attached(&i.name, f.direction, f.priority, TcHandle::from(f.handle), None);
            match link
                .map_err(|e| e.to_string())
                .and_then(|l| l.detach().map_err(|e| e.to_string()))
            {
                Ok(()) => done.push(format!("removed {what}")),
                Err(e) => left.push(format!("{what}: {e}")),
            }
        }
    }
    (done, left)
}
