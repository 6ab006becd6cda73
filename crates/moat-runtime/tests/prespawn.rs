//! `machine::prespawn`: a supervisor started ahead of its machine. In a test
//! binary of its own: the warm supervisor is process-wide, and any `launch`
//! of another test in the same process could take it.

mod common;

use common::*;
use moat_runtime::machine::{self, MachineDir, Phase};
use moat_runtime::{ContainerSpec, IdRange, SupervisorConfig};
use std::time::{Duration, Instant};

#[test]
fn prespawned_supervisor_runs_the_next_launch_and_an_unused_one_exits() {
    if !can_run() {
        return;
    }
    let gone = |pid: u32| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    };
    // One waiting is kept; a prespawn of another binary (here the same
    // one through a symlink) replaces it: its go pipe closed, it exits and
    // is reaped.
    let link_dir = tempfile::tempdir().expect("tempdir");
    let link = link_dir.path().join("moat-supervisor");
    std::os::unix::fs::symlink(supervisor(), &link).expect("symlink");
    let first = machine::prespawn(&link).expect("prespawn");
    assert_eq!(
        machine::prespawn(&link),
        Some(first),
        "a waiting one is kept"
    );
    let second = machine::prespawn(&supervisor()).expect("prespawn");
    assert_ne!(first, second);
    assert!(gone(first), "unused warm supervisor {first} still there");
    let fx = busybox_fixture();
    let name = unique("warm");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, sh("echo warm-out; exit 5"));
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard = Guard(dir.clone());
    machine::launch(&dir, &SupervisorConfig::new(spec), &supervisor()).expect("launch");
    let s = wait_phase(&dir, Phase::Exited, Duration::from_secs(20));
    assert_eq!(s.exit_code, Some(5));
    // The warm one's first half forked the real supervisor and was reaped
    // by this launch: it ran the machine.
    assert!(gone(second), "warm supervisor {second} not reaped");
    assert_ne!(s.supervisor_pid as u32, second);
    let out = std::fs::read_to_string(dir.stdout_log()).expect("stdout log");
    assert!(out.contains("warm-out"), "{out}");

    // A warm one that died before its machine came: launch finds its pipe
    // broken and starts one itself.
    let third = machine::prespawn(&supervisor()).expect("prespawn");
    // SAFETY: kill of a child of this process, not yet reaped.
    assert_eq!(unsafe { libc::kill(third as i32, libc::SIGKILL) }, 0);
    let fx = busybox_fixture();
    let name = unique("warmdead");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, sh("echo fallback-out; exit 6"));
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard2 = Guard(dir.clone());
    machine::launch(&dir, &SupervisorConfig::new(spec), &supervisor()).expect("launch");
    let s = wait_phase(&dir, Phase::Exited, Duration::from_secs(20));
    assert_eq!(s.exit_code, Some(6));
    assert!(gone(third), "dead warm supervisor {third} not reaped");
    let out = std::fs::read_to_string(dir.stdout_log()).expect("stdout log");
    assert!(out.contains("fallback-out"), "{out}");

    // The half this process waits for killed after it forked its daemon
    // half ahead (see `supervisor::fork_ahead`): the daemon may take the
    // machine; the launch starts one the usual way, which runs it or finds
    // it taken and waits for the holder.
    let fourth = machine::prespawn(&supervisor()).expect("prespawn");
    let children = format!("/proc/{fourth}/task/{fourth}/children");
    let deadline = Instant::now() + Duration::from_secs(5);
    let daemon: u32 = loop {
        let c = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = c.split_whitespace().next().and_then(|p| p.parse().ok()) {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "warm supervisor {fourth} did not fork ahead"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    // SAFETY: kill of a child of this process, not yet reaped.
    assert_eq!(unsafe { libc::kill(fourth as i32, libc::SIGKILL) }, 0);
    let fx = busybox_fixture();
    let name = unique("warmhalf");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, sh("echo half-out; exit 7"));
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard3 = Guard(dir.clone());
    machine::launch(&dir, &SupervisorConfig::new(spec), &supervisor()).expect("launch");
    let s = wait_phase(&dir, Phase::Exited, Duration::from_secs(20));
    assert_eq!(s.exit_code, Some(7));
    let out = std::fs::read_to_string(dir.stdout_log()).expect("stdout log");
    assert!(out.contains("half-out"), "{out}");
    assert!(gone(fourth), "killed warm supervisor {fourth} not reaped");
    machine::stop(&dir, Duration::from_secs(5)).expect("stop");
    assert!(gone(daemon), "its daemon half {daemon} is still there");
}
