//! Privileged tests of the runtime: real containers on this host. They skip
//! with a reason when not root. Each test uses unique names and destroys its
//! machine on drop.

mod common;

use common::*;
use moat_runtime::machine::{self, MachineDir, MachineState, Phase};
use moat_runtime::{
    ContainerKind, ContainerSpec, IdRange, NetworkSpec, ResourceLimits, RestartPolicy,
    SupervisorConfig,
};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

fn exec_ok(dir: &MachineDir, cmd: &str) -> (i32, String, String) {
    let r = machine::exec(dir, &sh(cmd)).expect("exec");
    assert!(
        r.status != 126,
        "exec helper failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    (
        r.status,
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

#[test]
fn app_container_exec_limits_hardening_logs_lifecycle() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let name = unique("app");
    let n = machine_number();
    let ids = IdRange::for_machine(n);
    let mut spec = ContainerSpec::new(
        &name,
        &fx.rootfs,
        sh("echo hello-out; echo hello-err >&2; exec sleep 1000"),
    );
    spec.idmap = Some(ids);
    spec.limits = ResourceLimits {
        cpus: Some(1),
        memory: Some(32 << 20),
        pids: Some(30),
    };
    spec.hostname = Some("apphost".into());
    spec.etc_hosts = Some("127.0.0.1 localhost\n10.9.9.9 peer\n".into());
    let dir = MachineDir::new(&fx.machine_dir);
    let guard = Guard(dir.clone());
    let mut cfg = SupervisorConfig::new(spec);
    cfg.stop_timeout_ms = 300;
    let st = machine::launch(&dir, &cfg, &supervisor()).expect("launch");
    let MachineState::Running { pid } = st else {
        panic!("not running: {st:?}")
    };
    // Device access (cgroup v1 here): deny all but the standard nodes. The
    // spec only denies all; the library adds these (see `spec::oci_config`).
    let list = format!(
        "/sys/fs/cgroup/devices{}/devices.list",
        cfg.container.cgroup_path()
    );
    if let Ok(list) = std::fs::read_to_string(&list) {
        let got: std::collections::BTreeSet<&str> = list.lines().collect();
        let want: std::collections::BTreeSet<&str> = [
            "c 1:3 rwm",
            "c 1:5 rwm",
            "c 1:7 rwm",
            "c 1:8 rwm",
            "c 1:9 rwm",
            "c 5:0 rwm",
            "c 5:1 rwm",
            "c 5:2 rwm",
            "c 136:* rwm",
            "c 10:200 rwm",
            "c *:* m",
            "b *:* m",
        ]
        .into();
        assert_eq!(got, want, "devices.list of the container");
    }
    // The host's cgroup2 mount now favours dynamic changes (kernel 6.0+), so
    // the next container's move into its cgroup waits for no grace period.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let major: u32 = kernel.split('.').next().unwrap().parse().unwrap();
    for l in mountinfo.lines().filter(|l| l.contains(" - cgroup2 ")) {
        let mnt = l.split_whitespace().nth(4).unwrap();
        if major >= 6 && (mnt == "/sys/fs/cgroup" || mnt == "/sys/fs/cgroup/unified") {
            assert!(l.contains("favordynmods"), "{l}");
        }
    }

    // Processes start with default signal dispositions: the Rust supervisor
    // ignores SIGPIPE, and an ignored signal would survive exec (`yes | head`
    // would then print "Broken pipe" errors instead of ending quietly).
    let sigpipe_ignored = |status: &str| {
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
            .expect("SigIgn line");
        mask & (1 << (libc::SIGPIPE - 1)) != 0
    };
    let pid1_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(!sigpipe_ignored(&pid1_status), "PID 1 ignores SIGPIPE");
    let (_, exec_status, _) = exec_ok(&dir, "cat /proc/self/status");
    assert!(
        !sigpipe_ignored(&exec_status),
        "exec'd process ignores SIGPIPE"
    );

    // exec returns the exit code
    assert_eq!(exec_ok(&dir, "exit 7").0, 7);
    let (_, host, _) = exec_ok(&dir, "hostname; grep peer /etc/hosts");
    assert!(
        host.contains("apphost") && host.contains("10.9.9.9"),
        "{host}"
    );

    // user namespace
    let (_, map, _) = exec_ok(&dir, "cat /proc/self/uid_map");
    let f: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(
        f,
        vec!["0", &ids.host_id.to_string(), "65536"],
        "uid_map: {map}"
    );
    let host_status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid_line = host_status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or("");
    assert!(
        uid_line.contains(&ids.host_id.to_string()),
        "host sees {uid_line}"
    );
    assert_eq!(exec_ok(&dir, "touch /made-inside").0, 0);
    let meta = std::fs::metadata(fx.rootfs.join("made-inside")).expect("made-inside");
    assert_eq!(meta.uid(), ids.host_id);
    eprintln!("uid_map inside: {}", map.trim());

    // limits visible inside
    let (_, mem, _) = exec_ok(&dir, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max");
    assert_eq!(mem.trim(), (32u64 << 20).to_string());
    let (_, pids, _) = exec_ok(
        &dir,
        "cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max",
    );
    assert_eq!(pids.trim(), "30");
    // a memory hog is OOM-killed
    let (code, out, _) = exec_ok(
        &dir,
        "head -c 200000000 /dev/zero | tr '\\0' a | (x=$(cat); echo survived)",
    );
    assert!(
        !out.contains("survived"),
        "memory hog survived (status {code})"
    );
    eprintln!("memory hog ended with status {code}");

    // seccomp, capabilities, masked paths, read-only /sys, private /dev, loopback
    let (code, _, err) = exec_ok(&dir, "mount -t tmpfs none /mnt");
    assert_ne!(code, 0, "mount succeeded: {err}");
    let (_, seccomp, serr) = exec_ok(
        &dir,
        "grep ^Seccomp: /proc/self/status; grep ^NoNewPrivs: /proc/self/status",
    );
    eprintln!("seccomp check: {seccomp:?} {serr:?}");
    assert!(
        seccomp.contains("Seccomp:\t2") && seccomp.contains("NoNewPrivs:\t1"),
        "{seccomp}"
    );
    let (_, caps, _) = exec_ok(&dir, "grep ^CapEff: /proc/self/status");
    assert_eq!(
        caps.trim(),
        "CapEff:\t00000000a80425fb",
        "Docker's default set expected"
    );
    let (_, kallsyms, _) = exec_ok(&dir, "wc -c < /proc/kallsyms");
    assert_eq!(kallsyms.trim(), "0");
    let (code, _, _) = exec_ok(&dir, "echo 1 > /proc/sys/kernel/panic");
    assert_ne!(code, 0, "/proc/sys is writable");
    let (_, sysmnt, _) = exec_ok(&dir, "grep ' /sys ' /proc/mounts");
    assert!(sysmnt.contains(" ro,"), "/sys not read-only: {sysmnt}");
    // The cgroupfs below it too, every mount of it (on a v1 host: the view
    // `cgroups::readonly_view` made, a bind of each hierarchy's own cgroup).
    let (_, cgmnt, _) = exec_ok(&dir, "grep ' /sys/fs/cgroup' /proc/mounts");
    assert!(!cgmnt.trim().is_empty(), "no cgroupfs inside");
    for l in cgmnt.lines() {
        assert!(l.contains(" ro,"), "writable cgroupfs mount inside: {l}");
    }
    let (code, _, err) = exec_ok(&dir, "touch /sys/fs/cgroup/made-inside");
    assert_ne!(code, 0, "the cgroupfs root is writable");
    assert!(err.contains("Read-only"), "{err}");
    let (_, own, _) = exec_ok(&dir, "cat /proc/self/cgroup");
    for l in own.lines() {
        assert!(l.ends_with(":/"), "not at its cgroup namespace's root: {l}");
    }
    if std::path::Path::new("/sys/fs/cgroup/pids").is_dir() {
        // Its own pids cgroup: PID 1 and the cat are all it holds.
        let (_, procs, _) = exec_ok(&dir, "cat /sys/fs/cgroup/pids/cgroup.procs");
        assert!(procs.lines().any(|l| l.trim() == "1"), "{procs}");
        // The view is off the host once the container has its copy.
        let view = fx.machine_dir.join("bundle").join("cgroupfs");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(
            !mounts.contains(&view.display().to_string()),
            "the cgroup view is still mounted on the host"
        );
        assert!(!view.exists(), "{} left", view.display());
    }
    let (_, dev, _) = exec_ok(&dir, "ls /dev");
    assert!(
        dev.contains("null") && !dev.contains("kmsg") && !dev.contains("sda"),
        "/dev: {dev}"
    );
    let (_, lo, _) = exec_ok(&dir, "ip link show lo");
    assert!(lo.contains("UP"), "lo: {lo}");
    let (code, _, _) = exec_ok(&dir, "unshare -U true");
    assert_ne!(code, 0, "unshare of a user namespace allowed");
    if let Some(keyctl) = build_keyctl_probe(&fx.rootfs) {
        let (code, out, _) = exec_ok(&dir, &keyctl);
        assert!(
            out.contains("keyctl=-1 errno=1"),
            "keyctl probe: {code} {out}"
        );
    }

    // a fork bomb stops at the pids limit (its sleeps linger: last exec before stop)
    let (_, _, bomb_err) = exec_ok(&dir, "for i in $(seq 60); do sleep 3 & done; wait");
    assert!(
        bomb_err.contains("fork") || bomb_err.contains("Resource"),
        "fork bomb: {bomb_err}"
    );

    // logs
    let out = std::fs::read_to_string(dir.stdout_log()).expect("stdout.log");
    let err = std::fs::read_to_string(dir.stderr_log()).expect("stderr.log");
    assert!(
        out.contains("hello-out") && err.contains("hello-err"),
        "logs: {out:?} {err:?}"
    );

    // stop (sleep ignores SIGTERM as PID 1: SIGKILL after the timeout), start, restart
    machine::stop(&dir, Duration::from_millis(300)).expect("stop");
    assert!(
        matches!(dir.state(), MachineState::Stopped { .. }),
        "{:?}",
        dir.state()
    );
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_err(),
        "init still alive"
    );
    let st = machine::launch(&dir, &cfg, &supervisor()).expect("start again");
    let MachineState::Running { pid: pid2 } = st else {
        panic!("{st:?}")
    };
    let st = machine::restart(&dir, Duration::from_millis(300), &supervisor()).expect("restart");
    let MachineState::Running { pid: pid3 } = st else {
        panic!("{st:?}")
    };
    assert!(pid2 != pid && pid3 != pid2);

    // destroy leaves nothing behind
    drop(guard);
    assert!(!fx.machine_dir.exists());
    let left = leftovers(&name, fx.tmp.path());
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// A static C program calling keyctl(2), or `None` without gcc.
fn build_keyctl_probe(rootfs: &std::path::Path) -> Option<String> {
    let gcc = std::process::Command::new("gcc")
        .arg("--version")
        .output()
        .ok()?;
    if !gcc.status.success() {
        eprintln!("note: no gcc, keyctl probe skipped");
        return None;
    }
    let src = rootfs.join("tmp/keyctl.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n#include <errno.h>\n#include <unistd.h>\n#include <sys/syscall.h>\n\
         int main(void){long r=syscall(SYS_keyctl,0,0,0,0,0);printf(\"keyctl=%ld errno=%d\\n\",r,errno);return 0;}\n",
    )
    .ok()?;
    let st = std::process::Command::new("gcc")
        .args(["-static", "-O0", "-o"])
        .arg(rootfs.join("bin/keyctl-probe"))
        .arg(&src)
        .status()
        .ok()?;
    st.success().then(|| "/bin/keyctl-probe".to_string())
}

#[test]
fn restart_policy_on_failure_restarts_n_times() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let name = unique("onfail");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, sh("echo run >> /tmp/count; exit 3"));
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard = Guard(dir.clone());
    let mut cfg = SupervisorConfig::new(spec);
    cfg.restart = RestartPolicy::OnFailure;
    cfg.max_restarts = Some(2);
    machine::launch(&dir, &cfg, &supervisor()).expect("launch");
    let s = wait_phase(&dir, Phase::Exited, Duration::from_secs(20));
    assert_eq!((s.restarts, s.exit_code), (2, Some(3)));
    let runs = std::fs::read_to_string(fx.rootfs.join("tmp/count")).expect("count");
    assert_eq!(runs.lines().count(), 3);
    assert!(
        matches!(dir.state(), MachineState::Crashed { .. }),
        "{:?}",
        dir.state()
    );
    eprintln!("state after 2 restarts: {:?}", dir.state());
}

#[test]
fn freeze_stops_every_process_until_thawed() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let name = unique("freeze");
    // Two processes (a child loop and PID 1's loop) each add a line every 10 ms.
    let mut spec = ContainerSpec::new(
        &name,
        &fx.rootfs,
        sh("(while :; do echo c >> /tmp/ticks; usleep 10000; done) & \
            while :; do echo p >> /tmp/ticks; usleep 10000; done"),
    );
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard = Guard(dir.clone());
    let mut cfg = SupervisorConfig::new(spec);
    cfg.stop_timeout_ms = 300;
    machine::launch(&dir, &cfg, &supervisor()).expect("launch");
    let ticks = || {
        std::fs::read_to_string(fx.rootfs.join("tmp/ticks"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticks() < 4 {
        assert!(Instant::now() < deadline, "the loops never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let frozen = machine::freeze(&dir, Duration::from_secs(10)).expect("freeze");
    let at_freeze = ticks();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ticks(), at_freeze, "a process ran while frozen");
    assert!(matches!(dir.state(), MachineState::Running { .. }));
    frozen.thaw().expect("thaw");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticks() < at_freeze + 4 {
        assert!(
            Instant::now() < deadline,
            "the loops did not go on after thaw"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Dropping the guard thaws too (a failed snapshot must not leave it frozen).
    drop(machine::freeze(&dir, Duration::from_secs(10)).expect("freeze again"));
    let n = ticks();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticks() < n + 4 {
        assert!(Instant::now() < deadline, "still frozen after drop");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A caller killed while the machine is frozen (its guard never runs):
    // stop still works, the supervisor thaws first.
    std::mem::forget(machine::freeze(&dir, Duration::from_secs(10)).expect("freeze"));
    let t = Instant::now();
    machine::stop(&dir, Duration::from_secs(2)).expect("stop");
    assert!(
        !matches!(dir.state(), MachineState::Running { .. }),
        "{:?}",
        dir.state()
    );
    eprintln!("stop of a frozen machine: {:?}", t.elapsed());
}

#[test]
fn supervisor_killed_is_reported_crashed_and_repaired() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let name = unique("sigkill");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, vec!["/bin/sleep".into(), "1000".into()]);
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    spec.network = NetworkSpec::Own;
    let dir = MachineDir::new(&fx.machine_dir);
    let guard = Guard(dir.clone());
    let mut cfg = SupervisorConfig::new(spec);
    cfg.wait_for_start = true;
    cfg.stop_timeout_ms = 200;
    // create → the caller could attach a NIC to /proc/<pid>/ns/net here → start
    let st = machine::launch(&dir, &cfg, &supervisor()).expect("launch");
    let MachineState::Created { pid } = st else {
        panic!("{st:?}")
    };
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("netns");
    assert_ne!(
        ns,
        std::fs::read_link("/proc/self/ns/net").expect("own netns")
    );
    machine::start(&dir).expect("start");
    wait_phase(&dir, Phase::Running, Duration::from_secs(5));

    let sup = dir.read_status().expect("status").supervisor_pid;
    // SAFETY: kill(2) of the supervisor this test launched.
    unsafe { libc::kill(sup, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while dir.supervisor_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = dir.state();
    eprintln!("after SIGKILL of the supervisor: {st:?}");
    assert!(matches!(&st, MachineState::Crashed { reason } if reason.contains("supervisor died")));
    // repair: clean what is left, launch again
    machine::cleanup_dead(&dir).expect("cleanup");
    cfg.wait_for_start = false;
    let st = machine::launch(&dir, &cfg, &supervisor()).expect("relaunch");
    assert!(matches!(st, MachineState::Running { .. }), "{st:?}");
    let rss = moat_runtime::sys::rss_kib(dir.read_status().expect("status").supervisor_pid);
    eprintln!("idle supervisor RSS: {rss:?} KiB");
    drop(guard);
    let left = leftovers(&name, fx.tmp.path());
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[test]
fn system_container_runs_busybox_init_and_stops() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    std::fs::write(
        fx.rootfs.join("etc/inittab"),
        "::sysinit:/bin/echo booted\n::respawn:/bin/sleep 1000\n::shutdown:/bin/echo shutting-down\n",
    )
    .expect("inittab");
    let _ = std::fs::remove_file(fx.rootfs.join("sbin/init"));
    std::os::unix::fs::symlink("/bin/busybox", fx.rootfs.join("sbin/init")).expect("init link");
    let name = unique("sys");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, vec![]);
    spec.kind = ContainerKind::System;
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard = Guard(dir.clone());
    let mut cfg = SupervisorConfig::new(spec);
    cfg.stop_timeout_ms = 3000;
    let st = machine::launch(&dir, &cfg, &supervisor()).expect("launch");
    assert!(matches!(st, MachineState::Running { .. }), "{st:?}");
    let (_, ps, _) = exec_ok(&dir, "cat /proc/1/cmdline | tr '\\0' ' '");
    assert!(
        ps.starts_with("init") || ps.contains("/sbin/init"),
        "PID 1 is {ps}"
    );
    let t = Instant::now();
    machine::stop(&dir, Duration::from_secs(3)).expect("stop");
    eprintln!("busybox init stopped in {:?}", t.elapsed());
    let out = std::fs::read_to_string(dir.stdout_log()).unwrap_or_default();
    assert!(out.contains("booted"), "stdout: {out}");
}

#[test]
fn privileged_container_has_no_user_namespace_nor_seccomp() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let name = unique("priv");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, vec!["/bin/sleep".into(), "1000".into()]);
    spec.privileged = true;
    spec.idmap = None;
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard = Guard(dir.clone());
    let mut cfg = SupervisorConfig::new(spec.clone());
    cfg.stop_timeout_ms = 200;
    machine::launch(&dir, &cfg, &supervisor()).expect("launch");
    let (_, out, _) = exec_ok(
        &dir,
        "cat /proc/self/uid_map; grep -E '^(Seccomp|CapEff):' /proc/self/status",
    );
    assert!(
        out.contains("4294967295") && out.contains("Seccomp:\t0"),
        "{out}"
    );
    assert!(!out.contains("a80425fb"), "{out}");
    // defense in depth: refused for untrusted domains
    spec.untrusted_domain = true;
    assert!(machine::launch(
        &MachineDir::new(fx.tmp.path().join("m2")),
        &SupervisorConfig::new(spec),
        &supervisor()
    )
    .is_err());
}

/// The supervisor reports PID 1's end before it removes the container's
/// cgroups and state (the launcher releases the root meanwhile): a launch
/// right then waits for it instead of failing, and a stop returns once the
/// cgroups are gone.
#[test]
fn an_ended_machine_relaunches_at_once_and_stop_waits_for_its_cleanup() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let name = unique("ended");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, vec!["/bin/true".into()]);
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard = Guard(dir.clone());
    let cfg = SupervisorConfig::new(spec);
    let mut ending_seen = 0;
    for round in 0..5 {
        machine::launch(&dir, &cfg, &supervisor())
            .unwrap_or_else(|e| panic!("launch {round} right after the last run ended: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.read_status().is_some_and(|s| s.phase.is_final()) {
            assert!(Instant::now() < deadline, "{:?}", dir.read_status());
            std::thread::sleep(Duration::from_micros(200));
        }
        ending_seen += usize::from(dir.ending());
    }
    let last = dir.read_status().expect("a status");
    machine::stop(&dir, Duration::from_secs(5)).expect("stop");
    // Stop returns once the supervisor let go of the machine: it may still
    // be exiting, with nothing of the folder open any more.
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{}/fd", last.supervisor_pid)) {
        for fd in rd.flatten() {
            let to = std::fs::read_link(fd.path()).unwrap_or_default();
            assert!(
                !to.starts_with(&fx.machine_dir),
                "the supervisor still has {} open after stop",
                to.display()
            );
        }
    }
    assert!(moat_runtime::sys::wait_gone(
        last.supervisor_pid,
        last.supervisor_start,
        Duration::from_secs(2)
    ));
    let cgroups: Vec<String> = leftovers(&name, fx.tmp.path())
        .into_iter()
        .filter(|l| l.starts_with("cgroup"))
        .collect();
    assert!(cgroups.is_empty(), "after stop: {cgroups:?}");
    assert!(
        matches!(dir.state(), MachineState::Stopped { .. }),
        "{:?}",
        dir.state()
    );
    eprintln!("5 runs of /bin/true; the supervisor was still finishing when 'exited' was read in {ending_seen} of them");
}

/// One supervisor per machine. A launch killed after it removed the old
/// status and before its supervisor wrote the first one left the next launch
/// nothing to see: it started a second supervisor, which failed on the
/// existing container. Now the second one finds the machine's lock held,
/// exits with `SUPERVISOR_BUSY` touching nothing, and the launch waits for
/// the first one's status instead of failing.
#[test]
fn a_second_supervisor_for_a_machine_touches_nothing() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let name = unique("lock");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, sh("sleep 1000"));
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard = Guard(dir.clone());
    let cfg = SupervisorConfig::new(spec);
    std::fs::create_dir_all(&dir.dir).expect("mkdir");
    // The test plays the first supervisor (that of the killed launch): it
    // holds the lock while `launch` runs.
    let lock = std::fs::File::create(dir.lock_path()).expect("lock file");
    lock.lock().expect("lock");
    let (d, c) = (dir.clone(), cfg.clone());
    let launching = std::thread::spawn(move || machine::launch(&d, &c, &supervisor()));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!launching.is_finished(), "launch waits for the lock holder");
    assert!(
        dir.read_status().is_none(),
        "the busy supervisor wrote a status"
    );
    assert!(
        !dir.socket_path().exists(),
        "the busy supervisor made a socket"
    );
    // The first supervisor gets going: the launch sees its machine running.
    drop(lock);
    let st = std::process::Command::new(supervisor())
        .arg(&dir.dir)
        .status()
        .expect("supervisor");
    assert!(st.success(), "{st}");
    let state = launching.join().expect("join").expect("launch");
    assert!(matches!(state, MachineState::Running { .. }), "{state:?}");
    let pid = dir.read_status().and_then(|s| s.pid);

    // A supervisor started for the running machine leaves it alone.
    let st = std::process::Command::new(supervisor())
        .arg(&dir.dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("supervisor");
    assert_eq!(st.code(), Some(machine::SUPERVISOR_BUSY));
    assert_eq!(dir.read_status().and_then(|s| s.pid), pid);
    let (code, out, _) = exec_ok(&dir, "echo alive");
    assert_eq!((code, out.trim()), (0, "alive"));
    machine::stop(&dir, Duration::from_millis(300)).expect("stop");
    assert!(!dir.supervisor_alive());
}

/// The supervisor has a helper make a container's user and network
/// namespaces while it prepares the rest (`sys::NsAhead`); the container
/// joins them and sees what it would have made itself: its own id map, a
/// network namespace of its own with only `lo`, up, and `/proc/net` owned
/// by its root (the kernel takes that owner when the namespace is made).
/// Each restart gets new ones; a host-network machine gets none.
#[test]
fn a_container_joins_the_namespaces_made_ahead_for_it() {
    if !can_run() {
        return;
    }
    let probe = "cat /proc/self/uid_map; readlink /proc/self/ns/net; ls /sys/class/net; \
                 cat /sys/class/net/lo/flags; stat -c 'netowner=%u:%g' /proc/self/net/dev";
    let host_net = std::fs::read_link("/proc/self/ns/net").expect("our netns");
    let host_net = host_net.to_string_lossy().into_owned();
    let fx = busybox_fixture();
    let name = unique("ahead");
    let range = IdRange::for_machine(machine_number());
    // Fails twice (then gives up): three containers, each with new namespaces.
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, sh(&format!("{probe}; exit 1")));
    spec.idmap = Some(range);
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard = Guard(dir.clone());
    let mut cfg = SupervisorConfig::new(spec);
    cfg.restart = RestartPolicy::OnFailure;
    cfg.max_restarts = Some(2);
    machine::launch(&dir, &cfg, &supervisor()).expect("launch");
    let s = wait_phase(&dir, Phase::Exited, Duration::from_secs(30));
    assert_eq!(s.restarts, 2);
    let out = std::fs::read_to_string(dir.stdout_log()).expect("stdout log");
    let log = std::fs::read_to_string(dir.supervisor_log()).unwrap_or_default();
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 15, "{out}");
    for run in lines.chunks(5) {
        let map: Vec<&str> = run[0].split_whitespace().collect();
        assert_eq!(
            map,
            ["0", &range.host_id.to_string(), &range.size.to_string()],
            "{out}"
        );
        assert!(run[1].starts_with("net:[") && run[1] != host_net, "{out}");
        assert!(
            log.contains(&format!(" {}\n", run[1])),
            "{} was not made ahead: {log}",
            run[1]
        );
        assert_eq!(run[2], "lo", "interfaces: {out}");
        let flags = u32::from_str_radix(run[3].trim_start_matches("0x"), 16).expect("lo flags");
        assert_eq!(flags & 1, 1, "lo is not up: {out}");
        assert_eq!(run[4], "netowner=0:0", "{out}");
    }
    // One pair made for each container (a namespace's inode number is
    // reused once it is freed, so equal numbers say nothing here).
    assert_eq!(
        log.matches("joins namespaces made ahead").count(),
        3,
        "{log}"
    );

    // The host's network: nothing to make ahead.
    let fx = busybox_fixture();
    let mut spec = ContainerSpec::new(
        unique("aheadhost"),
        &fx.rootfs,
        sh("readlink /proc/self/ns/net"),
    );
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    spec.network = NetworkSpec::Host;
    let dir = MachineDir::new(&fx.machine_dir);
    let _guard2 = Guard(dir.clone());
    machine::launch(&dir, &SupervisorConfig::new(spec), &supervisor()).expect("launch");
    wait_phase(&dir, Phase::Exited, Duration::from_secs(20));
    let out = std::fs::read_to_string(dir.stdout_log()).expect("stdout log");
    assert_eq!(out.trim(), host_net);
    let log = std::fs::read_to_string(dir.supervisor_log()).unwrap_or_default();
    assert!(!log.contains("made ahead"), "{log}");
}

/// The read-only cgroup view of an application container on a v1 host
/// (`cgroups::readonly_view`) is on the host only from the container's
/// create to its start: one left by a supervisor killed meanwhile is removed by the next
/// create and by the clean-up after a dead supervisor (so `destroy` can
/// remove the folder).
#[test]
fn a_cgroup_view_left_behind_is_removed() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let name = unique("view");
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, sh("exec sleep 1000"));
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    let cgroup = spec.cgroup_path();
    let dir = MachineDir::new(&fx.machine_dir);
    let guard = Guard(dir.clone());
    let view_dir = moat_runtime::container::cgroup_view_dir(&dir.bundle_dir());
    std::fs::create_dir_all(dir.bundle_dir()).unwrap();
    if moat_runtime::cgroups::layout() == moat_runtime::cgroups::Layout::Unified
        || moat_host::mount::propagates(fx.tmp.path()).unwrap_or(true)
    {
        // No view here: a cgroup v2 host keeps the library's one cgroup2
        // mount, and none is made below a shared mount.
        let none = moat_runtime::cgroups::readonly_view(&cgroup, &view_dir, None).expect("view");
        assert!(none.is_none(), "a view on a v2 host or a shared mount");
        assert!(!view_dir.exists(), "{} made", view_dir.display());
        eprintln!("no view on this host (cgroup v2 or a shared mount), as expected");
        return;
    }
    let mounted = |p: &std::path::Path| {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&p.display().to_string()))
    };
    // What a killed supervisor leaves: the view, mounted, read-only.
    let view = moat_runtime::cgroups::readonly_view(&cgroup, &view_dir, None)
        .expect("view")
        .expect("a view on a v1 host");
    std::mem::forget(view);
    assert!(mounted(&view_dir));
    let probe = view_dir.join("made-on-host");
    assert!(std::fs::write(&probe, "x").is_err(), "the view is writable");
    let mems = std::fs::read_dir(&view_dir).unwrap().count();
    assert!(mems > 0, "an empty view");
    // The next create replaces it, and removes it once the container has
    // its copy.
    let mut cfg = SupervisorConfig::new(spec);
    cfg.stop_timeout_ms = 300;
    let st = machine::launch(&dir, &cfg, &supervisor()).expect("launch");
    assert!(matches!(st, MachineState::Running { .. }), "{st:?}");
    assert!(
        !mounted(&view_dir),
        "the view is still mounted after the start"
    );
    let (_, inside, _) = exec_ok(&dir, "ls /sys/fs/cgroup | wc -l");
    assert!(inside.trim().parse::<usize>().unwrap() >= mems, "{inside}");
    // A dead supervisor's clean-up removes one too.
    machine::stop(&dir, Duration::from_secs(2)).expect("stop");
    let view = moat_runtime::cgroups::readonly_view(&cgroup, &view_dir, None)
        .expect("view")
        .expect("a view on a v1 host");
    std::mem::forget(view);
    assert!(mounted(&view_dir));
    machine::cleanup_dead(&dir).expect("cleanup_dead");
    assert!(!mounted(&view_dir), "cleanup_dead left the view mounted");
    assert!(!view_dir.exists());
    drop(guard);
    moat_runtime::cgroups::remove_tree(&cgroup);
    let left = leftovers(&name, fx.tmp.path());
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Below a shared mount (`/` on a host booted with systemd) no view is made
/// (its tmpfs would be copied into the other mount namespaces of the peer
/// group and stay there): the library mounts the hierarchies itself.
#[test]
fn below_a_shared_mount_the_library_mounts_the_cgroup_hierarchies() {
    if !can_run() {
        return;
    }
    // (On a cgroup v2 host the library's mount is used anyway: the same checks hold.)
    let fx = busybox_fixture();
    let name = unique("shared");
    // The machine folder on a tmpfs of its own, shared.
    let shared = fx.tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    moat_host::mount::mount_tmpfs(&shared, "moat-test-shared", 0o755).expect("tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = moat_host::mount::unmount(&self.0, true);
        }
    }
    let _unmount = Unmount(shared.clone());
    let st = std::process::Command::new("mount")
        .args(["--make-shared"])
        .arg(&shared)
        .status()
        .expect("mount --make-shared");
    assert!(st.success());
    assert!(moat_host::mount::propagates(&shared).unwrap());
    let mut spec = ContainerSpec::new(&name, &fx.rootfs, sh("exec sleep 1000"));
    spec.idmap = Some(IdRange::for_machine(machine_number()));
    let dir = MachineDir::new(shared.join("machine"));
    let guard = Guard(dir.clone());
    let mut cfg = SupervisorConfig::new(spec);
    cfg.stop_timeout_ms = 300;
    let st = machine::launch(&dir, &cfg, &supervisor()).expect("launch");
    assert!(matches!(st, MachineState::Running { .. }), "{st:?}");
    let (_, mnt, _) = exec_ok(&dir, "grep ' /sys/fs/cgroup ' /proc/mounts");
    assert!(!mnt.contains("moat-cgroup"), "a view was made: {mnt}");
    let (_, pids, _) = exec_ok(&dir, "ls /sys/fs/cgroup | wc -l");
    assert!(pids.trim().parse::<usize>().unwrap() > 0);
    drop(guard);
    let left = leftovers(&name, fx.tmp.path());
    let left: Vec<&String> = left
        .iter()
        .filter(|l| !l.contains("moat-test-shared"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
