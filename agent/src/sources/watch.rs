//! Change detection for the standalone sources: inotify events (notify) for
//! promptness, plus a cheap fingerprint (names, sizes, mtimes) checked
//! periodically as a safety net, so unchanged input is never re-translated.
use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc::UnboundedSender;

/// Watches `dirs` (recursively); every event sends a `()`.
pub fn watch(dirs: &[PathBuf], tx: UnboundedSender<()>) -> Result<notify::RecommendedWatcher> {
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Reads (open/close without writing) change nothing; counting them would
        // make every sync, which reads the files, trigger the next one.
        if ev.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
        }
    })?;
    for d in dirs {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        w.watch(d, RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", d.display()))?;
    }
    Ok(w)
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
