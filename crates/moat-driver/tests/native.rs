//! The native driver on real containers (root only; skips otherwise):
//! create → start (with a fake NIC attacher seeing the netns) → observe →
//! exec → stop → destroy, with the rootfs from a folder provider.

use moat_core::model::{Machine, NetworkMode};
use moat_core::observed::MachineState;
use moat_driver::native::{FolderRootfs, NativeDriver, NetworkAttacher};
use moat_driver::{Ctx, Driver, MachineSpec, Probe};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct RecordingAttacher(Mutex<Vec<(String, i32)>>);

impl NetworkAttacher for RecordingAttacher {
    fn attach(&self, _ctx: &Ctx, spec: &MachineSpec, pid: i32) -> Result<(), String> {
        if !Path::new(&format!("/proc/{pid}/ns/net")).exists() {
            return Err("no netns".into());
        }
        self.0
            .lock()
            .map_err(|e| e.to_string())?
            .push((spec.machine.full_name.clone(), pid));
        Ok(())
    }
}

fn machine(full_name: &str, command: Option<Vec<String>>) -> Machine {
    Machine {
        name: "m".into(),
        full_name: full_name.into(),
        domain: "d".into(),
        cpus: Some(1),
        memory: Some(64 << 20),
        pids: Some(64),
        network: NetworkMode::Domain,
        ephemeral: false,
        weight: 0,
        command,
        ..Machine::adhoc(full_name, "busybox")
    }
}

/// A folder provider with a busybox root for `full`, a context in a temporary
/// folder, and the supervisor; `None` (after printing why) when the test
/// cannot run here.
fn setup(full: &str) -> Option<(tempfile::TempDir, Ctx, FolderRootfs, String)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/bin/busybox").exists() {
        eprintln!("SKIP: needs root and /bin/busybox");
        return None;
    }
    let sup = std::env::var("MOAT_SUPERVISOR").ok().or_else(|| {
        let exe = std::env::current_exe().ok()?;
        let p = exe.parent()?.parent()?.join("moat-supervisor");
        p.exists().then(|| p.display().to_string())
    });
    let Some(sup) = sup else {
        eprintln!("SKIP: moat-supervisor not built (cargo build -p moat-runtime) and MOAT_SUPERVISOR unset");
        return None;
    };
    let tmp = tempfile::Builder::new()
        .prefix("moat-native-")
        .tempdir()
        .expect("tempdir");
    let rootfs = tmp.path().join("rootfs").join(full);
    std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
    moat_host::busybox::link_applets(Path::new("/bin/busybox"), &rootfs, Some("bin"))
        .expect("busybox applets");
    use std::os::unix::fs::PermissionsExt;
    for p in [
        tmp.path().to_path_buf(),
        tmp.path().join("rootfs"),
        rootfs.clone(),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let ctx = Ctx {
        root: tmp.path().join("root"),
        run_dir: tmp.path().join("run"),
        // Unique per test process (the root's cgroup parent is `/moat-<tag>`).
        root_tag: format!("t{}", std::process::id()),
    };
    let provider = FolderRootfs {
        base: tmp.path().join("rootfs"),
        system: false,
    };
    Some((tmp, ctx, provider, sup))
}

/// Destroys the machine on drop, also when the test fails.
struct Cleanup<'a>(&'a NativeDriver, &'a Ctx, &'a str);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.destroy(self.1, self.2);
        // The root's cgroup parent, kept by the driver for the next machine
        // (`moat destroy` removes it); refused while another test's machine
        // of this process is in it, whose own clean-up then removes it.
        moat_runtime::cgroups::remove_if_empty(&format!("/moat-{}", self.1.root_tag));
    }
}

fn nic(full: &str) -> Option<moat_core::model::ResolvedNic> {
    Some(moat_core::model::ResolvedNic {
        machine: full.into(),
        ip: "10.200.0.2".parse().expect("ip"),
        mac: [2, 0, 0, 0, 0, 2],
        host_if: "vx".into(),
    })
}

#[test]
fn native_driver_lifecycle() {
    let full = format!("d-nat{}", std::process::id());
    let Some((_tmp, ctx, provider, sup)) = setup(&full) else {
        return;
    };
    let attacher = Arc::new(RecordingAttacher(Mutex::new(vec![])));
    let driver = NativeDriver::new(Arc::new(provider))
        .with_network(attacher.clone())
        .with_supervisor(sup.into());
    assert_eq!(driver.probe(&ctx), Probe::Available);

    let spec = MachineSpec {
        machine: machine(&full, Some(vec!["/bin/sleep".into(), "1000".into()])),
        nic: nic(&full),
        bridge: None,
        spec_hash: "h1".into(),
        hosts: vec![("peer".into(), "10.200.0.3".parse().expect("ip"))],
    };
    let _cleanup = Cleanup(&driver, &ctx, &full);
    driver.create(&ctx, &spec).expect("create");
    driver.create(&ctx, &spec).expect("create again is a no-op");
    driver.start(&ctx, &full).expect("start");
    assert_eq!(
        attacher.0.lock().expect("lock").len(),
        1,
        "NIC attached once"
    );
    let obs = driver
        .observe(&ctx, &full)
        .expect("observe")
        .expect("exists");
    assert_eq!(obs.state, MachineState::Running);
    assert_eq!(obs.spec_hash, "h1");
    assert_eq!(obs.limits.memory, Some(64 << 20));
    let out = driver
        .exec(
            &ctx,
            &full,
            &[
                "/bin/sh".into(),
                "-c".into(),
                "grep peer /etc/hosts; exit 4".into(),
            ],
        )
        .expect("exec");
    assert_eq!(out.status, 4);
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.200.0.3"));
    driver
        .stop(&ctx, &full, Duration::from_millis(200))
        .expect("stop");
    let obs = driver
        .observe(&ctx, &full)
        .expect("observe")
        .expect("exists");
    assert_eq!(obs.state, MachineState::Stopped);
    assert_eq!(driver.list(&ctx).expect("list").len(), 1);
    driver.destroy(&ctx, &full).expect("destroy");
    assert!(driver.observe(&ctx, &full).expect("observe").is_none());
    assert!(!ctx.root.join("machines").join(&full).exists());
}

/// Attaches into a persistent network namespace by path (as the real
/// network code does), counting the attachments.
struct PathAttacher(Mutex<u32>);

impl NetworkAttacher for PathAttacher {
    fn attach(&self, _ctx: &Ctx, _spec: &MachineSpec, _pid: i32) -> Result<(), String> {
        Err("attaches by path only".into())
    }
    fn attach_netns(&self, _ctx: &Ctx, _spec: &MachineSpec, netns: &Path) -> Result<(), String> {
        if !moat_runtime::sys::is_ns_mount(netns) {
            return Err(format!("{} is no namespace", netns.display()));
        }
        *self.0.lock().map_err(|e| e.to_string())? += 1;
        Ok(())
    }
    fn attaches_by_path(&self) -> bool {
        true
    }
}

/// An apply killed half-way through making or removing a machine's pair of
/// persistent namespaces (network + the user namespace owning it) leaves one
/// of the two bound: the next start makes the pair again. The user namespace
/// left bound once failed the start with EPERM (kill test in CI).
#[test]
fn half_a_namespace_pair_is_made_again() {
    let full = format!("d-nsp{}", std::process::id());
    let Some((_tmp, ctx, provider, sup)) = setup(&full) else {
        return;
    };
    let attacher = Arc::new(PathAttacher(Mutex::new(0)));
    let driver = NativeDriver::new(Arc::new(provider))
        .with_network(attacher.clone())
        .with_supervisor(sup.into());
    let spec = MachineSpec {
        machine: machine(&full, Some(vec!["/bin/sleep".into(), "1000".into()])),
        nic: nic(&full),
        bridge: None,
        spec_hash: "h1".into(),
        hosts: vec![],
    };
    let _cleanup = Cleanup(&driver, &ctx, &full);
    let (net, user) = (
        NativeDriver::netns_path(&ctx, &full),
        NativeDriver::userns_path(&ctx, &full),
    );
    let attached = || *attacher.0.lock().expect("lock");
    let running = |what: &str| {
        let obs = driver
            .observe(&ctx, &full)
            .expect("observe")
            .expect("exists");
        assert_eq!(obs.state, MachineState::Running, "{what}");
        let out = driver
            .exec(&ctx, &full, &["/bin/true".into()])
            .expect("exec");
        assert_eq!(out.status, 0, "{what}");
        assert!(moat_runtime::sys::is_ns_mount(&net), "{what}");
        assert!(moat_runtime::sys::is_ns_mount(&user), "{what}");
    };
    driver.create(&ctx, &spec).expect("create");
    driver.start(&ctx, &full).expect("start");
    running("first start");
    assert_eq!(attached(), 1);

    // Killed between binding the network namespace and the user namespace:
    // the user namespace file is there, empty.
    driver
        .stop(&ctx, &full, Duration::from_millis(200))
        .expect("stop");
    moat_runtime::sys::remove_ns_mount(&user).expect("unmount");
    std::fs::write(&user, b"").expect("touch");
    driver.start(&ctx, &full).expect("start with half a pair");
    running("user namespace missing");
    assert_eq!(attached(), 2, "the NIC is attached to the new namespace");

    // Killed between removing the two mounts: the user namespace is still
    // bound, the network namespace is not.
    driver
        .stop(&ctx, &full, Duration::from_millis(200))
        .expect("stop");
    moat_runtime::sys::remove_ns_mount(&net).expect("unmount");
    driver
        .start(&ctx, &full)
        .expect("start over a bound user namespace");
    running("network namespace missing");
    assert_eq!(attached(), 3);

    driver.destroy(&ctx, &full).expect("destroy");
    assert!(!net.exists() && !user.exists());
}
