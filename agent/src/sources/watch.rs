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
        let Ok(e) = ev else { return };
        if is_change(&e.kind) && !e.paths.iter().all(|p| is_temporary(p)) {
            let _ = tx.send(super::Changed {
                at: std::time::Instant::now(),
                settled: settles(&e.kind),
            });
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

/// Writers' temporary files (renamed into place when complete): hidden
/// ones, backups (`~`), `.tmp` and editor swap files. No source reads them,
/// and their events are no change.
fn is_temporary(p: &Path) -> bool {
    let name = p.file_name().unwrap_or_default().to_string_lossy();
    let ext = p.extension().unwrap_or_default();
    name.starts_with('.') || name.ends_with('~') || ["tmp", "swp", "swx"].iter().any(|t| ext == *t)
}

/// Whether an event leaves its file complete: a closed write, a rename
/// (into place), a removal. Not a creation or a write still going on.
fn settles(kind: &notify::EventKind) -> bool {
    use notify::{
        event::{AccessKind, AccessMode, ModifyKind},
        EventKind,
    };
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_)
    )
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

    use notify::event::{RemoveKind, RenameMode};

    use super::{is_change, is_temporary, settles};

    #[test]
    fn reading_is_not_a_change() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(AccessMode::Read))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Any)));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }

    #[test]
    fn temporary_files_are_no_input() {
        for t in [
            ".measured.yaml.swp",
            "measured.tmp~",
            ".default_web.json.tmp",
            "x.yaml.tmp",
        ] {
            assert!(is_temporary(std::path::Path::new(t)), "{t}");
        }
        for f in ["measured.yaml", "default_web.json", "node1", "node1.example.com"] {
            assert!(!is_temporary(std::path::Path::new(f)), "{f}");
        }
    }

    #[test]
    fn closed_writes_renames_and_removals_settle_a_change() {
        assert!(settles(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(settles(&EventKind::Modify(ModifyKind::Name(RenameMode::To))));
        assert!(settles(&EventKind::Remove(RemoveKind::File)));
        assert!(!settles(&EventKind::Create(CreateKind::File)));
        assert!(!settles(&EventKind::Modify(ModifyKind::Any)));
    }
}
