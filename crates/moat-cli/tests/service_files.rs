//! The service files in dist/: the systemd unit passes `systemd-analyze
//! verify`, and the plain init script starts the daemon (the CLI then talks to
//! it), reports its status and stops it without stopping machines' supervisors.

mod common;

use common::is_root;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn dist(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../dist")
        .join(name)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn systemd_unit_verifies() {
    if !have("systemd-analyze") {
        eprintln!("SKIP: systemd-analyze is not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(dist("moat.service")).unwrap();
    // Point ExecStart at the binary under test: verify checks it is executable.
    let unit = unit.replace("/usr/local/bin/moat", env!("CARGO_BIN_EXE_moat"));
    let path = d.path().join("moat.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the daemon started by the init script, whatever the test did.
struct Stop<'a> {
    env: &'a [(&'a str, String)],
}

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        let _ = init(self.env, "stop");
    }
}

fn init(env: &[(&str, String)], action: &str) -> std::process::Output {
    let mut c = Command::new("sh");
    c.arg(dist("moat.init")).arg(action);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Running and not a zombie (on hosts whose PID 1 does not reap, a stopped
/// daemon stays a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

#[test]
fn init_script_starts_reports_and_stops_the_daemon() {
    if !is_root() {
        eprintln!("SKIP: the daemon needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let env: Vec<(&str, String)> = vec![
        ("MOAT", env!("CARGO_BIN_EXE_moat").to_string()),
        ("MOAT_ROOT", root.display().to_string()),
        (
            "MOAT_PIDFILE",
            d.path().join("daemon.pid").display().to_string(),
        ),
        (
            "MOAT_LOG",
            d.path().join("daemon.log").display().to_string(),
        ),
    ];
    let _stop = Stop { env: &env };
    let out = init(&env, "start");
    assert!(
        out.status.success(),
        "start failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = init(&env, "status");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let pid: i32 = std::fs::read_to_string(d.path().join("daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The socket answers: `moat status` goes through the daemon.
    let socket = root.join("run/moat.sock");
    assert!(socket.exists(), "no socket at {}", socket.display());
    let st = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("--root")
        .arg(&root)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    // A second start is a no-op.
    let out = init(&env, "start");
    assert!(String::from_utf8_lossy(&out.stdout).contains("already running"));
    let out = init(&env, "stop");
    assert!(out.status.success());
    let t0 = Instant::now();
    while alive(pid) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(pid), "daemon {pid} still runs");
    let out = init(&env, "status");
    assert_eq!(out.status.code(), Some(3));
}
