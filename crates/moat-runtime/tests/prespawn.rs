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

    // Told the machine's id range ahead (`prespawn_hint`), the warm one makes
    // its user and network namespaces while the launcher prepares: the
    // machine joins them, and sees exactly what it would have made itself.
    let probe = "cat /proc/self/uid_map; readlink /proc/self/ns/net; ls /sys/class/net; \
                 cat /sys/class/net/lo/flags; stat -c 'netowner=%u:%g' /proc/self/net/dev";
    let host_net = std::fs::read_link("/proc/self/ns/net").expect("our netns");
    let host_net = host_net.to_string_lossy().into_owned();
    let range = IdRange::for_machine(machine_number());
    let fourth = machine::prespawn(&supervisor()).expect("prespawn");
    machine::prespawn_hint(range);
    let fx = busybox_fixture();
    let name = unique("warmns");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, sh(probe));
    spec.idmap = Some(range);
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard3 = Guard(dir.clone());
    machine::launch(&dir, &SupervisorConfig::new(spec), &supervisor()).expect("launch");
    let s = wait_phase(&dir, Phase::Exited, Duration::from_secs(20));
    assert!(gone(fourth), "warm supervisor {fourth} not reaped");
    let out = std::fs::read_to_string(dir.stdout_log()).expect("stdout log");
    assert_eq!(s.exit_code, Some(0), "{out}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let map: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        map,
        ["0", &range.host_id.to_string(), &range.size.to_string()],
        "{out}"
    );
    assert!(lines[1].starts_with("net:["), "{out}");
    assert_ne!(
        lines[1], host_net,
        "the machine is in the host's network namespace"
    );
    let log = std::fs::read_to_string(dir.supervisor_log()).unwrap_or_default();
    assert!(
        log.contains("made ahead: user:[") && log.contains(&format!(" {}\n", lines[1])),
        "the machine did not join the namespaces made ahead ({}): {log}",
        lines[1]
    );
    assert_eq!(lines[2], "lo", "interfaces of the machine: {out}");
    let flags = u32::from_str_radix(lines[3].trim_start_matches("0x"), 16).expect("lo flags");
    assert_eq!(flags & 1, 1, "lo is not up: {out}");
    // Owned by the machine's root, as in a namespace it made itself (the
    // kernel takes this owner when the namespace is made).
    assert_eq!(lines[4], "netowner=0:0", "{out}");

    // A hint for another range: the machine makes its own namespaces.
    let other = IdRange::for_machine(machine_number());
    machine::prespawn(&supervisor()).expect("prespawn");
    machine::prespawn_hint(IdRange {
        host_id: other.host_id + other.size,
        size: other.size,
    });
    let fx = busybox_fixture();
    let name = unique("warmother");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, sh(probe));
    spec.idmap = Some(other);
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard4 = Guard(dir.clone());
    machine::launch(&dir, &SupervisorConfig::new(spec), &supervisor()).expect("launch");
    let s = wait_phase(&dir, Phase::Exited, Duration::from_secs(20));
    let out = std::fs::read_to_string(dir.stdout_log()).expect("stdout log");
    assert_eq!(s.exit_code, Some(0), "{out}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let map: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        map,
        ["0", &other.host_id.to_string(), &other.size.to_string()],
        "{out}"
    );
    assert_ne!(lines[1], host_net);
    let log = std::fs::read_to_string(dir.supervisor_log()).unwrap_or_default();
    assert!(!log.contains("made ahead"), "{log}");
    assert_eq!(lines[2], "lo", "{out}");
    assert_eq!(lines[4], "netowner=0:0", "{out}");
}
