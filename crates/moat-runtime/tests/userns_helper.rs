//! Privileged test: the helper process that `idmap::userns_fd` clones to
//! hold a user namespace never outlives a caller killed with SIGKILL, and
//! holds none of its descriptors. A leftover helper once kept a killed
//! `moat daemon`'s listening socket open, so the next daemon found the
//! socket answering and refused to start.
//!
//! A worker (this test binary run again) calls `userns_fd` in a loop and is
//! killed at random moments; this process is the workers' child subreaper,
//! so an orphaned helper would become its child. Own test binary: the
//! subreaper flag is process-wide. Skips when not root.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WORKER_ENV: &str = "MOAT_TEST_USERNS_WORKER";

/// Live (not zombie) children of this process, from /proc (pid, name).
fn children() -> Vec<(i32, String)> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, split after ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next());
        if ppid == Some(me.as_str()) && state != Some("Z") {
            let pid = head.split(' ').next().and_then(|p| p.parse().ok());
            let comm = head.split_once('(').map(|(_, c)| c.to_string());
            if let (Some(pid), Some(comm)) = (pid, comm) {
                out.push((pid, comm));
            }
        }
    }
    out
}

/// A xorshift seeded from the clock: kill delays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[test]
fn userns_helper_never_outlives_a_killed_caller() {
    if std::env::var_os(WORKER_ENV).is_some() {
        // Worker: say so, then make user namespaces until killed.
        println!("\nUSERNS-WORKER-READY");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let fd = moat_runtime::idmap::userns_fd(0, 3_000_000_000, 1).expect("userns_fd");
            drop(fd);
        }
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: userns_helper_never_outlives_a_killed_caller: needs root");
        return;
    }
    // SAFETY: prctl with an integer argument.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
    let exe = std::env::current_exe().expect("current_exe");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let runs = 150;
    let mut orphans = Vec::new();
    for _ in 0..runs {
        let mut w = Command::new(&exe)
            .args([
                "--exact",
                "userns_helper_never_outlives_a_killed_caller",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker");
        let mut line = String::new();
        let out = w.stdout.take().expect("stdout");
        let mut r = std::io::BufReader::new(out);
        while !line.contains("USERNS-WORKER-READY") {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        let _ = w.kill();
        let _ = w.wait();
        // Orphans come to this process. Helpers that the death signal
        // ends come as well, briefly: let them die, reap them, then count
        // (and end) the ones that live on.
        std::thread::sleep(Duration::from_millis(10));
        // SAFETY: waitpid on our own children, without blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        for (pid, comm) in children() {
            orphans.push(format!("{pid} ({comm})"));
            // SAFETY: kill and waitpid on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
    assert!(
        orphans.is_empty(),
        "{} of {runs} killed callers left a userns helper behind: {}",
        orphans.len(),
        orphans.join(", ")
    );
}
