//! The apply lock across processes: a lock held by a killed process is free
//! again, and a live holder is named in the error. The child is this test
//! binary re-run with an environment variable (no root needed).

use moat_state::{ApplyLock, StateError};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const CHILD_ENV: &str = "MOAT_STATE_LOCK_CHILD";

/// In the child: take the lock, say so, and hold it until killed.
#[test]
fn child_holder() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return; // a normal run: nothing to do
    };
    let _lock =
        ApplyLock::acquire(std::path::Path::new(&root), None).expect("child takes the lock");
    println!("LOCKED");
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn lock_of_a_killed_process_is_free_again() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "child_holder", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let locked = lines.any(|l| l.map(|l| l.contains("LOCKED")).unwrap_or(false));
    if !locked {
        let _ = child.kill();
        let _ = child.wait();
        panic!("child never took the lock");
    }
    let e = ApplyLock::acquire(dir.path(), None).unwrap_err();
    let msg = e.to_string();
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(e, StateError::Locked { .. }), "{msg}");
    assert!(
        msg.contains(&format!("(pid {}, running since", child.id())),
        "{msg}"
    );
    // Killed with SIGKILL: no destructor ran, the kernel dropped the flock.
    let l = ApplyLock::acquire(dir.path(), Some(Duration::from_secs(5)));
    assert!(l.is_ok(), "{:?}", l.err());
}
