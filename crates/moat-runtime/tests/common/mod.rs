//! Fixtures for the privileged runtime tests: a busybox rootfs, unique
//! names, and a guard that destroys the machine even when a test fails.
#![allow(dead_code)]

use moat_runtime::machine::{self, MachineDir, Phase};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// `None` (after printing why) when the host cannot run these tests.
pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root (user namespaces, cgroups, mounts)");
        return false;
    }
    if !Path::new("/bin/busybox").exists() {
        eprintln!("SKIP: needs /bin/busybox (apt-get install busybox-static)");
        return false;
    }
    std::env::set_var("MOAT_SUPERVISOR", env!("CARGO_BIN_EXE_moat-supervisor"));
    true
}

static N: AtomicU32 = AtomicU32::new(0);

/// A name unique to this run.
pub fn unique(prefix: &str) -> String {
    format!(
        "mt-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A machine number for the id range, different per test process and call.
pub fn machine_number() -> u32 {
    // Stay well inside u32 once multiplied by 65536 and added to the base.
    1000 + (std::process::id() % 20000) + N.fetch_add(1, Ordering::Relaxed)
}

/// A busybox root file system in a fresh temp folder (traversable by the
/// container's unprivileged root).
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub machine_dir: PathBuf,
}

pub fn busybox_fixture() -> Fixture {
    let tmp = tempfile::Builder::new()
        .prefix("moat-rt-")
        .tempdir()
        .expect("tempdir");
    chmod_755(tmp.path());
    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
    for d in [
        "etc", "tmp", "proc", "sys", "dev", "mnt", "root", "sbin", "usr/bin", "usr/sbin",
    ] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    moat_host::busybox::link_applets(Path::new("/bin/busybox"), &rootfs, None)
        .expect("busybox applets");
    chmod_755(&rootfs);
    let machine_dir = tmp.path().join("machine");
    Fixture {
        tmp,
        rootfs,
        machine_dir,
    }
}

pub fn chmod_755(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Destroys the machine on drop (also when the test panics).
pub struct Guard(pub MachineDir);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = machine::destroy(&self.0, Duration::from_millis(500)) {
            eprintln!("cleanup of {}: {e}", self.0.dir.display());
        }
    }
}

pub fn sh(cmd: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), cmd.into()]
}

/// Mount points, cgroup folders and processes that mention `needle`.
pub fn leftovers(name: &str, tmp: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let rootfs = tmp.to_string_lossy();
    for l in mounts.lines() {
        if l.contains(name) || l.contains(rootfs.as_ref()) {
            found.push(format!("mount: {l}"));
        }
    }
    for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Ok(rd) = std::fs::read_dir(base) {
            for e in rd.flatten() {
                let p = e.path().join("moat").join(name);
                if p.exists() {
                    found.push(format!("cgroup: {}", p.display()));
                }
            }
        }
        let p = Path::new(base).join("moat").join(name);
        if p.exists() {
            found.push(format!("cgroup: {}", p.display()));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let env = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if env.contains(name) || env.contains(rootfs.as_ref()) {
                found.push(format!("process {:?}: {env}", e.file_name()));
            }
        }
    }
    found
}

/// The `moat-supervisor` next to the test binaries (see `can_run`).
pub fn supervisor() -> std::path::PathBuf {
    machine::find_supervisor().expect("moat-supervisor")
}

/// Waits until the machine in `dir` reports `want`; panics after `within`.
pub fn wait_phase(dir: &MachineDir, want: Phase, within: Duration) -> moat_runtime::Status {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = dir.read_status() {
            if s.phase == want {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "phase {want:?} not reached: {:?}",
            dir.read_status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
