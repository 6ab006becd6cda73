//! Privileged test of idmapped overlay roots: two busybox machines share one
//! image layer owned by uid 0 on disk; inside, files are owned by root; what
//! a machine writes lands in its upper layer in its own id range; the layer
//! is never chowned; a killed supervisor and a fresh mount (as after a host
//! reboot) both come back idmapped; a frozen upper of one machine serves as
//! a lower of another (clone); nothing stays mounted. Skips when not root.

mod common;

use common::*;
use moat_runtime::machine::{self, MachineDir, MachineState};
use moat_runtime::{ContainerSpec, IdRange, RootfsOwnership, SupervisorConfig};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An overlay mounted on `rootfs`; unmounted on drop (lazily, also on panic).
struct Overlay {
    rootfs: PathBuf,
    upper: PathBuf,
}

impl Overlay {
    fn new(base: &Path, name: &str, lowers: &[PathBuf]) -> Overlay {
        let dir = base.join(name);
        let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        for d in [&upper, &work, &rootfs] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        chmod_755(&dir);
        let o = Overlay { rootfs, upper };
        o.mount(lowers);
        o
    }

    /// A plain overlay, as the image store mounts it.
    fn mount(&self, lowers: &[PathBuf]) {
        let work = self.upper.with_file_name("work");
        moat_host::mount::mount_overlay(lowers, Some((&self.upper, &work)), &self.rootfs)
            .expect("mount overlay");
    }

    fn unmount(&self) {
        while moat_host::mount::is_mount_point(&self.rootfs).unwrap_or(false) {
            if moat_host::mount::unmount(&self.rootfs, false).is_err() {
                let _ = moat_host::mount::unmount(&self.rootfs, true);
            }
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Mountinfo lines whose mount point is `p`.
fn mounts_at(p: &Path) -> Vec<String> {
    let want = p.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(want.as_ref()))
        .map(str::to_string)
        .collect()
}

/// Every (path, uid, gid) in `dir` whose owner is not 0:0.
fn not_root_owned(dir: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).expect("stat");
        if m.uid() != 0 || m.gid() != 0 {
            bad.push(format!("{} {}:{}", p.display(), m.uid(), m.gid()));
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).expect("readdir").flatten() {
                stack.push(e.path());
            }
        }
    }
    bad
}

fn exec(dir: &MachineDir, cmd: &str) -> String {
    let r = machine::exec(dir, &sh(cmd)).expect("exec");
    assert_eq!(r.status, 0, "{cmd}: {}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stdout).trim().to_string()
}

fn launch(dir: &MachineDir, name: &str, rootfs: &Path, ids: IdRange) -> i32 {
    let mut spec = ContainerSpec::new(name, rootfs, sh("exec sleep 1000"));
    spec.idmap = Some(ids);
    spec.hostname = Some("idm".into());
    let mut cfg = SupervisorConfig::new(spec);
    cfg.stop_timeout_ms = 300;
    let sup = machine::find_supervisor().expect("moat-supervisor");
    match machine::launch(dir, &cfg, &sup).expect("launch") {
        MachineState::Running { pid } => pid,
        other => panic!("{name} not running: {other:?}; {:?}", dir.read_status()),
    }
}

fn assert_idmapped(dir: &MachineDir, o: &Overlay, ids: IdRange) {
    assert_eq!(
        dir.rootfs_ownership(),
        Some(RootfsOwnership::Idmapped),
        "{:?}",
        dir.rootfs_record()
    );
    assert_eq!(
        dir.read_status().and_then(|s| s.rootfs_ownership),
        Some(RootfsOwnership::Idmapped)
    );
    let at = mounts_at(&o.rootfs);
    assert_eq!(at.len(), 1, "one mount at the rootfs: {at:?}");
    assert!(
        at[0].contains(&format!(" moat-idmapped:{} ", ids.host_id)),
        "{at:?}"
    );
}

#[test]
fn idmapped_rootfs_shares_layers_without_chown() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let layer = fx.rootfs.clone();
    assert!(
        not_root_owned(&layer).is_empty(),
        "the fixture is root-owned"
    );
    let base = fx.tmp.path();

    let a_ids = IdRange::for_machine(machine_number());
    let b_ids = IdRange::for_machine(machine_number());
    let oa = Overlay::new(base, "a", std::slice::from_ref(&layer));
    let ob = Overlay::new(base, "b", std::slice::from_ref(&layer));
    let (a_name, b_name) = (unique("idma"), unique("idmb"));
    let a = MachineDir::new(base.join("a/machine"));
    let b = MachineDir::new(base.join("b/machine"));
    let ga = Guard(a.clone());
    let gb = Guard(b.clone());

    launch(&a, &a_name, &oa.rootfs, a_ids);
    launch(&b, &b_name, &ob.rootfs, b_ids);
    assert_idmapped(&a, &oa, a_ids);
    assert_idmapped(&b, &ob, b_ids);

    for (dir, o, ids) in [(&a, &oa, a_ids), (&b, &ob, b_ids)] {
        // Inside: image files and the files moat wrote are root's.
        let owners = exec(
            dir,
            "stat -c %u:%g / /bin/busybox /etc /etc/hostname | sort -u",
        );
        assert_eq!(owners, "0:0", "owners inside");
        exec(
            dir,
            "touch /made-inside && mkdir -p /root/d && echo x >> /bin/busybox-copy",
        );
        // On disk: the machine's upper holds its range.
        for f in ["made-inside", "root/d", "etc/hostname", "bin/busybox-copy"] {
            let m = std::fs::metadata(o.upper.join(f)).expect(f);
            assert_eq!((m.uid(), m.gid()), (ids.host_id, ids.host_id), "{f}");
        }
        let m = std::fs::metadata(&o.upper).expect("upper");
        assert_eq!(m.uid(), ids.host_id, "upper root");
    }
    // The shared layer: untouched, still root-owned, nothing copied into it.
    assert!(
        not_root_owned(&layer).is_empty(),
        "layer chowned: {:?}",
        not_root_owned(&layer)
    );
    assert!(!layer.join("made-inside").exists());

    // A supervisor killed with SIGKILL: the next launch finds the mount right.
    let s = a.read_status().expect("status");
    let _ = moat_runtime::sys::kill(s.supervisor_pid, libc::SIGKILL);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.supervisor_alive() {
        assert!(std::time::Instant::now() < deadline, "supervisor survived");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(a.state(), MachineState::Crashed { .. }));
    machine::cleanup_dead(&a).expect("cleanup");
    launch(&a, &a_name, &oa.rootfs, a_ids);
    assert_idmapped(&a, &oa, a_ids);
    assert_eq!(exec(&a, "stat -c %u /made-inside"), "0");

    // After a host reboot the store mounts a plain overlay again.
    machine::stop(&a, Duration::from_millis(300)).expect("stop");
    oa.unmount();
    oa.mount(std::slice::from_ref(&layer));
    launch(&a, &a_name, &oa.rootfs, a_ids);
    assert_idmapped(&a, &oa, a_ids);
    assert_eq!(
        exec(&a, "stat -c %u:%g /made-inside /bin/sh | sort -u"),
        "0:0"
    );

    // Clone: A's upper, frozen, under a third machine with its own range.
    machine::stop(&a, Duration::from_millis(300)).expect("stop");
    drop(ga);
    oa.unmount();
    let c_ids = IdRange::for_machine(machine_number());
    let oc = Overlay::new(base, "c", &[oa.upper.clone(), layer.clone()]);
    let c = MachineDir::new(base.join("c/machine"));
    let gc = Guard(c.clone());
    let c_name = unique("idmc");
    launch(&c, &c_name, &oc.rootfs, c_ids);
    assert_idmapped(&c, &oc, c_ids);
    assert_eq!(
        exec(&c, "stat -c %u:%g /made-inside /root/d /bin/sh | sort -u"),
        "0:0"
    );

    // Destroy: nothing of the machines stays mounted.
    drop(gc);
    drop(gb);
    oc.unmount();
    ob.unmount();
    let tmp = base.to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&tmp) || l.contains("moat-idmapped"))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    for n in [&a_name, &b_name, &c_name] {
        assert!(
            leftovers(n, base).is_empty(),
            "{n}: {:?}",
            leftovers(n, base)
        );
    }
}

#[test]
fn folder_root_is_shifted() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let dir = MachineDir::new(&fx.machine_dir);
    let _g = Guard(dir.clone());
    let ids = IdRange::for_machine(machine_number());
    launch(&dir, &unique("idmf"), &fx.rootfs, ids);
    assert_eq!(dir.rootfs_ownership(), Some(RootfsOwnership::Shifted));
    let rec = dir.rootfs_record().expect("record");
    assert!(rec.fallback_reason.is_some(), "{rec:?}");
    assert_eq!(exec(&dir, "stat -c %u /bin/busybox"), "0");
    let m = std::fs::metadata(fx.rootfs.join("bin/busybox")).expect("stat");
    assert_eq!(m.uid(), ids.host_id);
}

/// The store can leave a machine's overlay unmounted and name its layers
/// (`ContainerSpec::overlay`): the supervisor mounts it idmapped at once (no
/// plain mount to replace), and a privileged machine gets it plain.
#[test]
fn an_overlay_left_unmounted_is_mounted_by_the_supervisor() {
    if !can_run() {
        return;
    }
    let fx = busybox_fixture();
    let layer = fx.rootfs.clone();
    let base = fx.tmp.path();
    let o = Overlay::new(base, "u", std::slice::from_ref(&layer));
    o.unmount();
    let layout = moat_runtime::idmap::OverlayLayout {
        lowers: vec![layer.clone()],
        upper: o.upper.clone(),
        work: o.upper.with_file_name("work"),
        volatile: false,
    };
    let ids = IdRange::for_machine(machine_number());
    let name = unique("idmu");
    let dir = MachineDir::new(base.join("u/machine"));
    let guard = Guard(dir.clone());
    let mut spec = ContainerSpec::new(&name, &o.rootfs, sh("exec sleep 1000"));
    spec.idmap = Some(ids);
    spec.overlay = Some(layout.clone());
    let mut cfg = SupervisorConfig::new(spec);
    cfg.stop_timeout_ms = 300;
    let sup = machine::find_supervisor().expect("moat-supervisor");
    let st = machine::launch(&dir, &cfg, &sup).expect("launch");
    assert!(matches!(st, MachineState::Running { .. }), "{st:?}");
    assert_idmapped(&dir, &o, ids);
    assert_eq!(
        exec(&dir, "stat -c %u:%g / /bin/busybox /etc/hostname | sort -u"),
        "0:0"
    );
    assert!(not_root_owned(&layer).is_empty(), "layer chowned");

    // Stopped and unmounted (a host reboot): the next launch mounts it again.
    machine::stop(&dir, Duration::from_millis(300)).expect("stop");
    o.unmount();
    machine::launch(&dir, &cfg, &sup).expect("launch again");
    assert_idmapped(&dir, &o, ids);
    machine::stop(&dir, Duration::from_millis(300)).expect("stop");
    drop(guard);
    o.unmount();

    // Privileged (no user namespace): a plain overlay.
    let pname = unique("idmp");
    let pdir = MachineDir::new(base.join("u/pmachine"));
    let pguard = Guard(pdir.clone());
    let mut spec = ContainerSpec::new(&pname, &o.rootfs, sh("exec sleep 1000"));
    spec.privileged = true;
    spec.overlay = Some(layout);
    let mut cfg = SupervisorConfig::new(spec);
    cfg.stop_timeout_ms = 300;
    let st = machine::launch(&pdir, &cfg, &sup).expect("launch privileged");
    assert!(matches!(st, MachineState::Running { .. }), "{st:?}");
    let at = mounts_at(&o.rootfs);
    assert!(
        at.len() == 1 && at[0].contains(" overlay ") && !at[0].contains("moat-idmapped"),
        "{at:?}"
    );
    assert_eq!(exec(&pdir, "stat -c %u /bin/busybox"), "0");
    drop(pguard);
    o.unmount();
    for n in [&name, &pname] {
        assert!(
            leftovers(n, base).is_empty(),
            "{n}: {:?}",
            leftovers(n, base)
        );
    }
}
