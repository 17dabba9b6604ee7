//! Change detection for the standalone sources: inotify events (notify) for
//! promptness, plus a cheap fingerprint (names, sizes, mtimes) checked
//! periodically as a safety net, so unchanged input is never re-translated.
use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use notify::{RecursiveMode, Watcher as _};

/// Watches `dirs` (recursively); every change sends when it was received. Reads are not
/// changes: the agent's own reading of the files must not trigger another sync.
pub fn watch(dirs: &[PathBuf], tx: super::Changes) -> Result<notify::RecommendedWatcher> {
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|e| is_change(&e.kind)) {
            let _ = tx.send(std::time::Instant::now());
        }
    })?;
    for d in dirs {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        w.watch(d, RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", d.display()))?;
    }
    Ok(w)
}

/// Whether an event changes what the files say (not an open, read or close
/// without writing).
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::{event::AccessKind, event::AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// (path, size, mtime) of every file below `dirs`, sorted.
pub fn fingerprint(dirs: &[PathBuf]) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    for d in dirs {
        walk(d, &mut out, 0);
    }
    out.sort();
    out
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() && depth < 3 {
            walk(&e.path(), out, depth + 1);
        } else if md.is_file() {
            out.push((e.path(), md.len(), md.modified().ok()));
        }
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};

    use super::is_change;

    #[test]
    fn reading_is_not_a_change() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(AccessMode::Read))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Any)));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }
}
