//! Exclusive locks that hold across processes (`flock` on a lock file), for work that two
//! programs sharing a data dir must not do at the same time: downloading one blob, rewriting
//! `auth.json`.
//!
//! The holder removes the lock file when it lets go, so lock files do not pile up. A waiter that
//! then gets the lock on the removed file notices (the path no longer names the inode it locked)
//! and tries again on the path's new file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::Error;

/// A held lock; dropping it removes the lock file and releases the lock, in that order.
#[derive(Debug)]
pub(crate) struct FileLock {
    path: PathBuf,
    // Declared after `path` only for reading order: `drop` removes the file before this closes.
    _file: Flock<File>,
}

impl FileLock {
    /// Blocks until this process holds the lock at `path` (created mode 0600 if missing). Call it
    /// from a blocking thread.
    pub(crate) fn acquire(path: &Path) -> Result<FileLock, Error> {
        let fail = |e: io::Error| Error::io(format!("locking {}", path.display()), e);
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(fail)?;
            let locked = loop {
                match Flock::lock(file, FlockArg::LockExclusive) {
                    Ok(locked) => break locked,
                    Err((f, Errno::EINTR)) => file = f,
                    Err((_, errno)) => return Err(fail(errno.into())),
                }
            };
            let held = locked.metadata().map_err(fail)?;
            match fs::metadata(path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(FileLock { path: path.to_path_buf(), _file: locked });
                }
                // The previous holder removed it while we waited: lock whatever is there now.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(fail(e)),
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // While still holding the lock, so nobody can have locked this inode through the path.
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove lock file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn excludes_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock-x");
        let inside = Arc::new(AtomicUsize::new(0));
        let max_inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (path, inside, max_inside) = (path.clone(), inside.clone(), max_inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let _lock = FileLock::acquire(&path).unwrap();
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        max_inside.fetch_max(n, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(max_inside.load(Ordering::SeqCst), 1, "two holders at once");
        assert!(!path.exists(), "the lock file is left behind");
    }
}
