//! Shared by the root CLI tests: a private moat root that cleans up after itself.
#![allow(dead_code)]

pub mod scan;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn supervisor() -> Option<PathBuf> {
    let moat = PathBuf::from(env!("CARGO_BIN_EXE_moat"));
    let sup = moat.with_file_name("moat-supervisor");
    if sup.exists() {
        return Some(sup);
    }
    let ok = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "moat-runtime",
            "--bin",
            "moat-supervisor",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .is_ok_and(|s| s.success());
    (ok && sup.exists()).then_some(sup)
}

/// A root of its own; `Drop` destroys what it holds and unmounts leftovers.
/// A fresh root for a test that runs containers, or `None` after a SKIP
/// line when this host cannot (not root, no supervisor).
pub fn root_or_skip() -> Option<Root> {
    if !is_root() {
        eprintln!("SKIP: needs root (containers, mounts, cgroups)");
        return None;
    }
    let Some(sup) = supervisor() else {
        eprintln!("SKIP: moat-supervisor could not be built");
        return None;
    };
    Some(Root::new(sup))
}

pub struct Root {
    pub dir: tempfile::TempDir,
    pub sup: PathBuf,
    _forward: ForwardHold,
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// `net.ipv4.ip_forward` (apply turns it on) as it was before this test
/// process's first holder, written back when the last holder goes. Tests
/// run on parallel threads: a save/restore per test let one test restore the
/// value under another's apply, or leave it on after both.
pub struct ForwardHold;

static FORWARD: std::sync::Mutex<(usize, Option<String>)> = std::sync::Mutex::new((0, None));

impl ForwardHold {
    pub fn new() -> ForwardHold {
        let mut f = FORWARD.lock().unwrap_or_else(|p| p.into_inner());
        if f.0 == 0 {
            f.1 = std::fs::read_to_string(IP_FORWARD).ok();
        }
        f.0 += 1;
        ForwardHold
    }
}

impl Default for ForwardHold {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ForwardHold {
    fn drop(&mut self) {
        let mut f = FORWARD.lock().unwrap_or_else(|p| p.into_inner());
        f.0 -= 1;
        if f.0 == 0 {
            if let Some(v) = f.1.take() {
                let _ = std::fs::write(IP_FORWARD, v.trim());
            }
        }
    }
}

impl Root {
    pub fn new(sup: PathBuf) -> Root {
        Root {
            dir: tempfile::tempdir().expect("tempdir"),
            sup,
            _forward: ForwardHold::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn moat(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_moat"))
            .arg("--root")
            .arg(self.path())
            .args(args)
            .env("MOAT_SUPERVISOR", &self.sup)
            .env("NO_COLOR", "1")
            .output()
            .expect("run moat")
    }
    /// `moat ARGS` with `input` on its stdin (a pipe).
    #[allow(dead_code)]
    pub fn moat_input(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_moat"))
            .arg("--root")
            .arg(self.path())
            .args(args)
            .env("MOAT_SUPERVISOR", &self.sup)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run moat");
        if let Some(mut i) = child.stdin.take() {
            let _ = i.write_all(input.as_bytes());
        }
        child.wait_with_output().expect("wait moat")
    }
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.moat(args);
        assert!(
            o.status.success(),
            "moat {args:?} failed ({:?}): {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    pub fn mounts(&self) -> Vec<String> {
        let root = self.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = self.moat(&["destroy", "--all", "--force"]);
        let mut m = self.mounts();
        m.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in m {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
    }
}
