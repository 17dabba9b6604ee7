//! One agent per pin directory: the agent holds `flock(LOCK_EX)` on an fd of
//! the pin directory itself for its whole life (bpffs directories take flock
//! like any other; bpffs cannot hold a regular lock file). The kernel drops
//! the lock when the process dies, however it dies, so there is no stale lock
//! to clean up. Who holds it is found in /proc/locks by the directory's device
//! and inode.
use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// Taking the pin-directory lock failed.
#[derive(Debug, thiserror::Error)]
pub enum PinLockError {
    #[error("creating the pin directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("opening the pin directory {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "another ferry agent{} already uses the pin directory {path}; \
         one agent per pin directory (stop it, or pick another --node-name/--bpffs-dir)",
        holder_suffix(*.holder)
    )]
    Held { path: PathBuf, holder: Option<u32> },
    #[error("locking the pin directory {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

fn holder_suffix(holder: Option<u32>) -> String {
    holder.map(|pid| format!(" (PID {pid})")).unwrap_or_default()
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
}

/// Takes the lock on `dir` (created if missing), without waiting.
pub fn acquire(dir: &Path) -> Result<PinLock, PinLockError> {
    std::fs::create_dir_all(dir).map_err(|source| PinLockError::Create {
        path: dir.to_path_buf(),
        source,
    })?;
    let file = File::open(dir).map_err(|source| PinLockError::Open {
        path: dir.to_path_buf(),
        source,
    })?;
    // `held_by` (ferry status, ferry cleanup) holds a shared lock for an
    // instant: a few tries tell that from an agent, which holds it for good.
    for _ in 0..PROBE_TRIES {
        match try_flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => return Ok(PinLock { _dir: file }),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(source) => {
                return Err(PinLockError::Lock {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
    Err(PinLockError::Held {
        path: dir.to_path_buf(),
        holder: holder(dir),
    })
}

/// Tries, 20 ms apart, before the lock counts as held.
const PROBE_TRIES: u32 = 10;

/// Whether some process holds the lock on `dir`, and which (None inside:
/// held, but the holder is not visible in /proc/locks, e.g. another PID
/// namespace). Ok(None) when nobody holds it or `dir` does not exist.
pub fn held_by(dir: &Path) -> Result<Option<Option<u32>>, PinLockError> {
    let file = match File::open(dir) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PinLockError::Open {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    // A shared probe: it fails exactly when someone holds the exclusive lock,
    // and is released when `file` closes.
    match try_flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
        Ok(()) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(Some(holder(dir))),
        Err(source) => Err(PinLockError::Lock {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn try_flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock(2) on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The PID holding an exclusive flock on `dir`, from /proc/locks.
fn holder(dir: &Path) -> Option<u32> {
    let meta = std::fs::metadata(dir).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// Parses /proc/locks lines such as
/// `1: FLOCK  ADVISORY  WRITE 12161 00:28:19030 0 EOF` (device as hex
/// major:minor, then the inode) for the WRITE flock on (`dev`, `ino`).
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts with "1: ->"; skip those.
        match f.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, file, ..] if *file == want => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_directory_and_the_holder() {
        let dir = std::env::temp_dir().join(format!("ferry-pinlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(held_by(&dir).unwrap(), None);
        let first = acquire(&dir).unwrap();
        let err = acquire(&dir).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("PID {}", std::process::id())), "{msg}");
        assert_eq!(held_by(&dir).unwrap(), Some(Some(std::process::id())));
        drop(first);
        assert_eq!(held_by(&dir).unwrap(), None);
        acquire(&dir).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(held_by(&dir).unwrap(), None, "a missing directory is not held");
    }

    #[test]
    fn a_status_probe_at_the_same_moment_does_not_refuse_the_agent() {
        let dir = std::env::temp_dir().join(format!("ferry-pinlock-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let probe = File::open(&dir).unwrap();
        try_flock(&probe, libc::LOCK_SH | libc::LOCK_NB).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(60));
            drop(probe);
        });
        let lock = acquire(&dir);
        release.join().unwrap();
        assert!(lock.is_ok(), "{lock:?}");
        drop(lock);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn proc_locks_lines_are_matched_by_device_and_inode() {
        let locks = "1: FLOCK  ADVISORY  WRITE 12161 00:28:19030 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 999 00:28:19030 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 77 00:28:19031 0 EOF\n\
                     3: FLOCK  ADVISORY  READ 88 fd:01:19030 0 EOF\n";
        let dev = libc::makedev(0, 0x28);
        assert_eq!(holder_in(locks, dev, 19030), Some(12161));
        assert_eq!(holder_in(locks, dev, 19031), None, "POSIX locks are not ours");
        assert_eq!(holder_in(locks, libc::makedev(0xfd, 1), 19030), None, "READ is a probe");
        assert_eq!(holder_in(locks, dev, 1), None);
    }
}
