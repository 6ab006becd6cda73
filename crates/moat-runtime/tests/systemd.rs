//! A Debian bookworm rootfs with systemd boots as a system container:
//! `systemctl is-system-running` reaches running (or degraded, with the
//! failed units printed), exec works, and stop shuts systemd down with
//! SIGRTMIN+3 within the timeout (not by SIGKILL). Needs root and either
//! mmdebstrap with reachable apt sources (~80 s build, same packages as the
//! image store's `debian/<suite>`) or a prepared rootfs folder in
//! `MOAT_TEST_DEBIAN_ROOTFS` (built there on first use, then reused).

mod common;

use common::{chmod_755, leftovers, machine_number, unique, Guard};
use moat_runtime::machine::{self, MachineDir, MachineState, Phase, SupervisorConfig};
use moat_runtime::{ContainerKind, ContainerSpec, IdRange, NetworkSpec};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What the image store installs for system images (moat-image `SYSTEM_PACKAGES`).
const PACKAGES: &str = "systemd,systemd-sysv,iproute2,dbus,ca-certificates";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Builds a bookworm rootfs into `dest` with mmdebstrap from the host's apt sources.
fn build_rootfs(dest: &Path) -> Result<(), String> {
    if Command::new("mmdebstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("mmdebstrap is not installed (apt-get install mmdebstrap)".into());
    }
    let t = Instant::now();
    let out = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--mode=root", "--format=directory"])
        .arg(format!("--include={PACKAGES}"))
        .arg("bookworm")
        .arg(dest)
        .output()
        .map_err(|e| format!("mmdebstrap: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(dest);
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(format!(
            "mmdebstrap failed (apt sources unreachable?): {}",
            tail.join(" | ")
        ));
    }
    // systemd generates a machine id at first boot, like the image store leaves it.
    let _ = std::fs::write(dest.join("etc/machine-id"), "");
    eprintln!(
        "built the bookworm rootfs in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The source rootfs: the cache folder (built there if empty), or a fresh build.
fn source_rootfs(tmp: &Path) -> Result<PathBuf, String> {
    if let Some(cache) = std::env::var_os("MOAT_TEST_DEBIAN_ROOTFS") {
        let cache = PathBuf::from(cache);
        if !cache.join("sbin/init").exists() {
            build_rootfs(&cache)?;
        }
        return Ok(cache);
    }
    let dest = tmp.join("built");
    build_rootfs(&dest)?;
    Ok(dest)
}

fn exec(dir: &MachineDir, cmd: &str) -> (i32, String) {
    let r = machine::exec(dir, &["/bin/sh".into(), "-c".into(), cmd.into()]).expect("exec");
    let mut s = String::from_utf8_lossy(&r.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&r.stderr));
    (r.status, s.trim().to_string())
}

#[test]
fn debian_systemd_boots_runs_and_stops_cleanly() {
    if !is_root() {
        eprintln!("SKIP: needs root (user namespaces, cgroups, mounts)");
        return;
    }
    std::env::set_var("MOAT_SUPERVISOR", env!("CARGO_BIN_EXE_moat-supervisor"));
    let tmp = tempfile::Builder::new()
        .prefix("moat-sd-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    chmod_755(tmp.path());
    let src = match source_rootfs(tmp.path()) {
        Ok(p) => p,
        Err(reason) => {
            eprintln!("SKIP: no Debian rootfs: {reason}");
            return;
        }
    };
    // The machine's own copy: the runtime shifts its ownership for the user namespace.
    let rootfs = tmp.path().join("rootfs");
    let st = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&src)
        .arg(&rootfs)
        .status()
        .expect("cp");
    assert!(st.success(), "copying the rootfs failed");
    chmod_755(&rootfs);

    let name = unique("sd");
    let mut spec = ContainerSpec::new(&name, &rootfs, Vec::new());
    spec.kind = ContainerKind::System;
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    spec.network = NetworkSpec::None;
    spec.hostname = Some("sdtest".into());
    let mut cfg = SupervisorConfig::new(spec);
    cfg.stop_timeout_ms = 30_000;
    let dir = MachineDir::new(tmp.path().join("machine"));
    let guard = Guard(dir.clone());

    let t0 = Instant::now();
    let state = machine::launch(&dir, &cfg, &machine::find_supervisor().expect("supervisor"))
        .expect("launch");
    assert!(
        matches!(state, MachineState::Running { .. }),
        "not running: {state:?}; supervisor log: {}",
        std::fs::read_to_string(dir.supervisor_log()).unwrap_or_default()
    );
    // comm may still say "init" (the exec'd name) this early: ask for the binary.
    let (_, pid1) = exec(&dir, "readlink /proc/1/exe");
    assert!(pid1.ends_with("/systemd"), "PID 1 is not systemd: {pid1}");
    // systemctl needs systemd's private socket, which appears early in boot.
    let (code, state) = exec(
        &dir,
        "for i in $(seq 300); do [ -S /run/systemd/private ] && break; sleep 0.1; done; \
         timeout 90 systemctl is-system-running --wait",
    );
    let boot = t0.elapsed();
    eprintln!(
        "systemctl is-system-running: {state} (exit {code}) after {:.2} s",
        boot.as_secs_f64()
    );
    if state != "running" {
        let (_, failed) = exec(&dir, "systemctl --failed --no-pager --no-legend");
        eprintln!("failed units:\n{failed}");
        let (_, jobs) = exec(&dir, "systemctl list-jobs --no-pager");
        eprintln!("jobs:\n{jobs}");
    }
    assert!(
        state == "running" || state == "degraded",
        "systemd reached '{state}'; its output: {}",
        std::fs::read_to_string(dir.stderr_log()).unwrap_or_default()
    );

    // systemd really manages cgroups below its own: every service has one.
    let (code, cg) = exec(
        &dir,
        "systemctl show -p ControlGroup systemd-journald.service",
    );
    eprintln!("journald: {cg}");
    let (_, info) = exec(
        &dir,
        "echo cgroupfs: $(stat -fc %T /sys/fs/cgroup) $(ls /sys/fs/cgroup | tr '\\n' ' '); \
         echo PID 1 cgroups: $(grep systemd /proc/1/cgroup); \
         echo running services: $(systemctl list-units --type=service --state=running --no-legend --plain | cut -d' ' -f1)",
    );
    eprintln!("{info}");
    assert_eq!(code, 0);
    assert!(cg.contains("system.slice/systemd-journald.service"), "{cg}");
    let (code, out) = exec(&dir, "echo hello from $(hostname)");
    assert_eq!((code, out.as_str()), (0, "hello from sdtest"));

    let t1 = Instant::now();
    machine::stop(&dir, Duration::from_secs(30)).expect("stop");
    let shutdown = t1.elapsed();
    let status = dir.read_status().expect("status");
    eprintln!(
        "stop took {:.2} s; PID 1 ended with code {:?} signal {:?}",
        shutdown.as_secs_f64(),
        status.exit_code,
        status.exit_signal
    );
    assert_eq!(status.phase, Phase::Stopped);
    assert_ne!(
        status.exit_signal,
        Some(libc::SIGKILL),
        "systemd did not stop on SIGRTMIN+3 within the timeout and was killed"
    );
    assert!(shutdown < Duration::from_secs(30));

    drop(guard);
    let left = leftovers(&name, tmp.path());
    assert!(left.is_empty(), "left behind: {left:#?}");
}
