//! The apply lock: `flock` on `<root>/apply.lock`, so the kernel releases it
//! when the holder dies however it dies, plus the holder's pid and start time
//! written in the file so a second apply can say who holds it.
//!
//! The file is opened close-on-exec: programs moat runs do not inherit the
//! lock. (A process that forks *without* exec does; such code must close it.)

use crate::time::{format_utc, now};
use crate::{Result, StateError};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a waiting apply retries.
const POLL: Duration = Duration::from_millis(50);

/// Who holds the lock, as recorded in the lock file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockHolder {
    pub pid: u32,
    /// Unix seconds.
    pub started_at: i64,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {}, running since {}",
            self.pid,
            format_utc(self.started_at)
        )
    }
}

/// Held while an apply runs; released on drop (or when the process dies).
#[derive(Debug)]
pub struct ApplyLock {
    file: File,
    path: PathBuf,
}

enum Try {
    Got,
    Busy,
}

fn try_flock(file: &File, path: &Path) -> Result<Try> {
    loop {
        // SAFETY: flock on a file descriptor we own (borrowed from `file`, which
        // outlives the call); no memory is passed to the kernel.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Try::Got);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(Try::Busy),
            Some(libc::EINTR) => continue,
            _ => {
                return Err(StateError::Io {
                    path: path.to_path_buf(),
                    source: err,
                })
            }
        }
    }
}

impl ApplyLock {
    /// Take the apply lock of `root`. With `wait: None`, fail at once when
    /// another apply holds it; with `Some(d)`, retry for up to `d`.
    pub fn acquire(root: &Path, wait: Option<Duration>) -> Result<ApplyLock> {
        std::fs::create_dir_all(root).map_err(|source| StateError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let path = root.join("apply.lock");
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let start = Instant::now();
        loop {
            match try_flock(&file, &path)? {
                Try::Got => break,
                Try::Busy => {}
            }
            let holder = Self::holder(root)
                .map(|h| h.to_string())
                .unwrap_or_else(|| "pid unknown".into());
            match wait {
                None => {
                    return Err(StateError::Locked {
                        root: root.to_path_buf(),
                        holder,
                    })
                }
                Some(d) if start.elapsed() >= d => {
                    return Err(StateError::LockTimeout {
                        root: root.to_path_buf(),
                        holder,
                        waited_secs: d.as_secs(),
                    })
                }
                Some(_) => std::thread::sleep(POLL),
            }
        }
        let mut lock = ApplyLock {
            file,
            path: path.clone(),
        };
        lock.record().map_err(io)?;
        Ok(lock)
    }

    fn record(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        write!(self.file, "pid {}\nstarted {}\n", std::process::id(), now())?;
        self.file.flush()
    }

    /// The holder recorded in `<root>/apply.lock`, if any (the record may be
    /// stale when nobody holds the lock).
    pub fn holder(root: &Path) -> Option<LockHolder> {
        let mut s = String::new();
        File::open(root.join("apply.lock"))
            .ok()?
            .read_to_string(&mut s)
            .ok()?;
        let mut pid = None;
        let mut started = None;
        for line in s.lines() {
            match line.split_once(' ') {
                Some(("pid", v)) => pid = v.trim().parse().ok(),
                Some(("started", v)) => started = v.trim().parse().ok(),
                _ => {}
            }
        }
        Some(LockHolder {
            pid: pid?,
            started_at: started?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApplyLock {
    fn drop(&mut self) {
        // Clear the record while still holding the lock; closing the file
        // releases it.
        let _ = self.file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_fails_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = ApplyLock::acquire(dir.path(), None).unwrap();
        let e = ApplyLock::acquire(dir.path(), None)
            .unwrap_err()
            .to_string();
        let want = format!(
            "another moat apply (pid {}, running since ",
            std::process::id()
        );
        assert!(e.starts_with(&want), "{e}");
        assert!(
            e.ends_with(&format!(
                " UTC) holds the lock on {}; wait for it or pass --wait",
                dir.path().display()
            )),
            "{e}"
        );
        let e = ApplyLock::acquire(dir.path(), Some(Duration::from_millis(120))).unwrap_err();
        assert!(matches!(e, StateError::LockTimeout { .. }), "{e}");
        drop(held);
        assert!(ApplyLock::holder(dir.path()).is_none());
        ApplyLock::acquire(dir.path(), None).unwrap();
    }

    #[test]
    fn waiting_thread_gets_the_lock_when_released() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let held = ApplyLock::acquire(&root, None).unwrap();
        let r2 = root.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let l = ApplyLock::acquire(&r2, Some(Duration::from_secs(20)));
            (l.is_ok(), start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
        let (ok, waited) = t.join().unwrap();
        assert!(ok);
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
    }
}
