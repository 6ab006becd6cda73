//! Full VMs (`type: vm`) under TCG: lifecycle, QMP, screendump, snapshots,
//! clones, templates and disposables on a blank disk (no guest OS: fast
//! enough for CI), and a Debian VM built by
//! `moat image build --vm` booting with cloud-init and shutting down on the
//! ACPI power button.
//!
//! Needs root, qemu-system-x86_64, qemu-img, qemu-io and genisoimage; skips
//! with a reason otherwise. Every VM lives in a per-test temporary root and is
//! killed and removed on drop.

use moat_core::model::{Display, Firmware, Machine, MachineType};
use moat_driver::{Ctx, Driver, MachineSpec};
use moat_qemu::vm::{self, StopOutcome};
use moat_qemu::{disk, QemuDriver};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root".into());
    }
    for t in ["qemu-system-x86_64", "qemu-img", "qemu-io", "genisoimage"] {
        if !have(t) {
            return Some(format!("{t} is not installed (scripts/deps.sh --test)"));
        }
    }
    None
}

macro_rules! require_host {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

/// A temporary moat root with a qemu driver; kills and removes its VMs on drop.
struct Root {
    dir: tempfile::TempDir,
    ctx: Ctx,
    driver: QemuDriver,
}

impl Root {
    fn new() -> Root {
        let dir = tempfile::Builder::new()
            .prefix("moat-vmtest-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let root = dir.path().to_path_buf();
        let root_str = root.to_string_lossy().into_owned();
        let ctx = Ctx {
            root: root.clone(),
            run_dir: root.join("run"),
            root_tag: moat_core::naming::root_tag(&root_str),
        };
        let images = moat_image::ImageStore::open(&root).unwrap();
        let driver = QemuDriver::new(images, moat_core::naming::if_alias(&root_str));
        Root { dir, ctx, driver }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A blank qcow2 base disk registered as VM image `name`.
    fn blank_image(&self, name: &str, size: u64) -> PathBuf {
        let p = disk::base_path(self.root(), name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        disk::create_blank(&p, size).unwrap();
        p
    }

    fn spec(&self, name: &str, image: &str, f: impl FnOnce(&mut Machine)) -> MachineSpec {
        let mut m = Machine::adhoc(name, image);
        m.kind = MachineType::Vm;
        m.driver = "qemu".into();
        m.memory = Some(128 << 20);
        m.accel = moat_core::model::Accel::Tcg;
        f(&mut m);
        MachineSpec {
            spec_hash: format!("test-{name}"),
            machine: m,
            nic: None,
            bridge: None,
            hosts: vec![],
        }
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Ok(list) = self.driver.list(&self.ctx) {
            for m in list {
                let _ = self.driver.destroy(&self.ctx, &m.full_name);
            }
        }
    }
}

fn qemu_io(disk: &Path, cmd: &str) -> (bool, String) {
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(disk)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (
        o.status.success() && !text.contains("Pattern verification failed"),
        text,
    )
}

/// qemu-io on a disk a running QEMU holds (`-U`: shared, read-only).
fn qemu_io_shared(disk: &Path, cmd: &str) -> (bool, String) {
    let o = Command::new("qemu-io")
        .args(["-U", "-r", "-f", "qcow2", "-c", cmd])
        .arg(disk)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (
        o.status.success() && !text.contains("Pattern verification failed"),
        text,
    )
}

/// Runs a qemu-io command on the running VM's disk through the monitor
/// (QEMU 10 prints its output on its own stdout, not in the HMP answer).
fn hmp_io(ctx: &Ctx, name: &str, cmd: &str) {
    let mut q =
        moat_qemu::qmp::Qmp::connect(&vm::paths(ctx, name).qmp, Duration::from_secs(30)).unwrap();
    let out = q.hmp(&format!("qemu-io disk0 \"{cmd}\"")).unwrap();
    assert!(!out.to_lowercase().contains("error"), "{out}");
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id() % 100000)
}

/// The running VM's QEMU is the moat-qemu user and sits in the machine's memory
/// cgroup, limited to guest RAM + 256 MiB.
fn assert_least_privilege(ctx: &Ctx, name: &str, memory_mib: u64) {
    let p = vm::paths(ctx, name);
    let pid = std::fs::read_to_string(&p.pid).unwrap().trim().to_string();
    let (uid, _) = moat_qemu::microvm::qemu_user().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let ids: Vec<u32> = uids[4..]
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(ids, vec![uid; 4], "real/effective/saved/fs uid of QEMU");
    // `-sandbox on,...,spawn=deny`: a seccomp filter (mode 2), and no fork
    // was needed (moat detached QEMU itself: it leads its own session).
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], pid, "QEMU is its own session leader");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!("/moat-{}/qemu-{name}", ctx.root_tag);
    let limit = (memory_mib + 256) << 20;
    let (dir, file) = if Path::new("/sys/fs/cgroup/memory").is_dir() {
        assert!(
            cg.lines()
                .any(|l| l.contains(":memory:") && l.ends_with(&want)),
            "QEMU not in {want}:\n{cg}"
        );
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
    } else {
        assert!(cg.lines().any(|l| l == format!("0::{want}")), "{cg}");
        ("/sys/fs/cgroup", "memory.max")
    };
    let got = std::fs::read_to_string(format!("{dir}{want}/{file}")).unwrap();
    assert_eq!(got.trim(), limit.to_string());
}

#[test]
fn vm_lifecycle_qmp_screendump_snapshots_clone() {
    require_host!();
    let r = Root::new();
    r.blank_image("blank", 16 << 20);
    let name = unique("vmt");
    let spec = r.spec(&name, "blank", |m| {
        m.cloud_init = Some(serde_json::json!({
            "user-data": {"users": [{"name": "moat"}]}
        }));
    });
    r.driver.create(&r.ctx, &spec).unwrap();
    let p = vm::paths(&r.ctx, &name);
    // The overlay sits on the base; the seed is an ISO labelled cidata.
    let info = disk::info(&p.disk).unwrap();
    assert_eq!(
        info.backing.as_deref(),
        Some(disk::base_path(r.root(), "blank").to_str().unwrap())
    );
    let iso = std::fs::read(&p.seed).unwrap();
    assert_eq!(&iso[32808..32814], b"cidata", "ISO9660 volume id");

    r.driver.start(&r.ctx, &name).unwrap();
    assert!(vm::is_running(&r.ctx, &name));
    assert_least_privilege(&r.ctx, &name, 128);
    let mut q = moat_qemu::qmp::Qmp::connect(&p.qmp, Duration::from_secs(30)).unwrap();
    assert_eq!(q.query_status().unwrap(), "running");
    drop(q);

    // The display works: SeaBIOS's screen as a PNG.
    let png = r.root().join("screen.png");
    vm::screendump(&r.ctx, &name, &png).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    eprintln!("screendump: {} bytes", bytes.len());

    // A write through the running VM's disk stays after stop (not disposable).
    hmp_io(&r.ctx, &name, "write -P 0xab 0 64k");
    // Snapshot of the running VM (disk + memory).
    vm::snapshot_create(&r.ctx, &name, "live").unwrap();
    // No guest OS answers the power button: quit after the timeout.
    let t = Instant::now();
    let outcome = vm::shut_down(&r.ctx, &name, Duration::from_secs(1)).unwrap();
    assert_eq!(outcome, StopOutcome::Quit);
    eprintln!("stop without a guest OS: {:?}", t.elapsed());
    r.driver
        .stop(&r.ctx, &name, Duration::from_secs(1))
        .unwrap();
    assert!(!vm::is_running(&r.ctx, &name));
    assert!(qemu_io(&p.disk, "read -P 0xab 0 64k").0);

    // Snapshots of the stopped VM: create, change, restore, list, remove.
    vm::snapshot_create(&r.ctx, &name, "s1").unwrap();
    assert!(qemu_io(&p.disk, "write -P 0xcd 0 64k").0);
    vm::snapshot_restore(&r.ctx, &name, "s1").unwrap();
    assert!(qemu_io(&p.disk, "read -P 0xab 0 64k").0);
    let snaps = vm::snapshots(&r.ctx, &name).unwrap();
    let names: Vec<_> = snaps
        .iter()
        .map(|s| (s.name.as_str(), s.with_memory))
        .collect();
    assert_eq!(names, vec![("live", true), ("s1", false)]);
    vm::snapshot_remove(&r.ctx, &name, "s1").unwrap();
    vm::snapshot_remove(&r.ctx, &name, "live").unwrap();
    assert!(vm::snapshots(&r.ctx, &name).unwrap().is_empty());

    // Clone: both get an overlay on the frozen former disk; data is shared.
    let new = unique("vmc");
    vm::clone_vm(&r.ctx, &name, &new).unwrap();
    let np = vm::paths(&r.ctx, &new);
    let chain = disk::chain(&np.disk).unwrap();
    assert_eq!(chain.len(), 3, "clone → frozen layer → base");
    assert_eq!(disk::chain(&p.disk).unwrap()[1].filename, chain[1].filename);
    assert!(qemu_io(&np.disk, "read -P 0xab 0 64k").0);
    // Writes to the clone do not reach the source.
    assert!(qemu_io(&np.disk, "write -P 0x11 0 64k").0);
    assert!(qemu_io(&p.disk, "read -P 0xab 0 64k").0);
    assert!(r.driver.observe(&r.ctx, &new).unwrap().is_some());

    // Destroying both leaves no frozen layer behind.
    r.driver.destroy(&r.ctx, &new).unwrap();
    r.driver.destroy(&r.ctx, &name).unwrap();
    let layers = disk::store_dir(r.root()).join("layers");
    let left = std::fs::read_dir(&layers).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0);
}

#[test]
fn disposable_vm_forgets_its_changes_and_templates_do_not_start() {
    require_host!();
    let r = Root::new();
    r.blank_image("blank", 16 << 20);
    let name = unique("vmd");
    let spec = r.spec(&name, "blank", |m| m.disposable = true);
    r.driver.create(&r.ctx, &spec).unwrap();
    let p = vm::paths(&r.ctx, &name);
    r.driver.start(&r.ctx, &name).unwrap();
    hmp_io(&r.ctx, &name, "write -P 0xab 0 64k");
    // (That such a write reaches the overlay is shown by the lifecycle test.)
    r.driver.stop(&r.ctx, &name, Duration::ZERO).unwrap();
    assert!(!p.disk.exists(), "a stopped disposable VM has no overlay");
    r.driver.start(&r.ctx, &name).unwrap();
    let (same, out) = qemu_io_shared(&p.disk, "read -P 0xab 0 64k");
    assert!(!same, "the write is gone after stop/start: {out}");
    r.driver.stop(&r.ctx, &name, Duration::ZERO).unwrap();

    // A template is created but never started; clones of it are ordinary VMs.
    let t = unique("vmtpl");
    let spec = r.spec(&t, "blank", |m| m.template = true);
    r.driver.create(&r.ctx, &spec).unwrap();
    let e = r.driver.start(&r.ctx, &t).unwrap_err().to_string();
    assert!(e.contains("template"), "{e}");
    let c = unique("vmfromtpl");
    vm::clone_vm(&r.ctx, &t, &c).unwrap();
    r.driver.start(&r.ctx, &c).unwrap();
    assert!(vm::is_running(&r.ctx, &c));
    r.driver.stop(&r.ctx, &c, Duration::ZERO).unwrap();
}

#[test]
fn clone_is_an_overlay_whatever_the_disk_size() {
    require_host!();
    let r = Root::new();
    for (image, size) in [("small", 10u64 << 20), ("big", 10u64 << 30)] {
        r.blank_image(image, size);
        let name = unique(&format!("vm{image}"));
        r.driver
            .create(&r.ctx, &r.spec(&name, image, |_| {}))
            .unwrap();
        let new = format!("{name}c");
        vm::clone_vm(&r.ctx, &name, &new).unwrap();
        let info = disk::info(&vm::paths(&r.ctx, &new).disk).unwrap();
        assert_eq!(info.virtual_size, size);
        // A new qcow2 header and tables, not a copy of the disk.
        assert!(
            info.actual_size < 1 << 20,
            "{image}: clone takes {} bytes",
            info.actual_size
        );
        assert!(info.backing.is_some());
    }
}

#[test]
fn disk_size_grows_the_overlay() {
    require_host!();
    let r = Root::new();
    r.blank_image("blank", 16 << 20);
    let name = unique("vmg");
    r.driver
        .create(&r.ctx, &r.spec(&name, "blank", |m| m.disk = Some(1 << 30)))
        .unwrap();
    let info = disk::info(&vm::paths(&r.ctx, &name).disk).unwrap();
    assert_eq!(info.virtual_size, 1 << 30);
}

#[test]
fn uefi_vm_starts_with_ovmf() {
    require_host!();
    if !Path::new(vm::OVMF_CODE).exists() {
        eprintln!("SKIP: OVMF is not installed (apt-get install ovmf)");
        return;
    }
    let r = Root::new();
    r.blank_image("blank", 16 << 20);
    let name = unique("vmu");
    r.driver
        .create(
            &r.ctx,
            &r.spec(&name, "blank", |m| {
                m.firmware = Firmware::Uefi;
                m.display = Display::Spice;
            }),
        )
        .unwrap();
    r.driver.start(&r.ctx, &name).unwrap();
    let p = vm::paths(&r.ctx, &name);
    assert!(p.vars.exists(), "per-machine UEFI variable store");
    assert!(p.spice.exists(), "SPICE socket");
    let cmdline = std::fs::read_to_string(format!(
        "/proc/{}/cmdline",
        std::fs::read_to_string(&p.pid).unwrap().trim()
    ))
    .unwrap()
    .replace('\0', " ");
    assert!(cmdline.contains("if=pflash"), "{cmdline}");
    // OVMF under TCG is slow; its first console output only with MOAT_TEST_SLOW=1.
    if std::env::var_os("MOAT_TEST_SLOW").is_some() {
        let t = Instant::now();
        let deadline = t + Duration::from_secs(300);
        let mut seen = false;
        while Instant::now() < deadline {
            let log = std::fs::read_to_string(&p.console_log).unwrap_or_default();
            if !log.trim().is_empty() {
                seen = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("OVMF first serial output after {:?}: {seen}", t.elapsed());
        assert!(seen);
    }
    r.driver.stop(&r.ctx, &name, Duration::ZERO).unwrap();
}

/// Where built Debian VM disks are kept between runs (delete it to rebuild).
const VM_DISK_CACHE: &str = "/var/tmp/moat-test-vmdisk";

/// The cache key of the debian/bookworm VM disk: what it is built from (suite,
/// packages, boot configuration, partition layout).
fn vm_disk_key() -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(
        format!(
            "{:?}",
            moat_qemu::vmimage::vm_image_source("debian/bookworm")
        )
        .as_bytes(),
    );
    h.update(moat_image::sources::SYSTEM_PACKAGES.join(",").as_bytes());
    h.update(moat_qemu::vmimage::syslinux_cfg("").as_bytes());
    h.update(moat_qemu::vmimage::partition_script(64, 1024).as_bytes());
    hex::encode(&h.finalize()[..8])
}

/// The debian/bookworm VM disk of root `r`: built by `moat image build --vm`'s
/// function on a cold cache (then kept in [`VM_DISK_CACHE`]), copied from the
/// cache otherwise. Returns whether it was built.
fn debian_vm_disk(r: &Root) -> bool {
    let cached = Path::new(VM_DISK_CACHE).join(format!("bookworm-{}.qcow2", vm_disk_key()));
    let out = disk::base_path(r.root(), "debian/bookworm");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    // One builder at a time (tests of this file run in parallel): the others wait
    // and copy its result instead of running mmdebstrap too.
    std::fs::create_dir_all(VM_DISK_CACHE).unwrap();
    let lock = std::fs::File::create(Path::new(VM_DISK_CACHE).join(".lock")).unwrap();
    // SAFETY: flock on a file descriptor this function owns; released when `lock` drops.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let t = Instant::now();
    if cached.is_file() {
        let st = Command::new("cp")
            .args(["--reflink=auto", "--sparse=always"])
            .arg(&cached)
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success(), "copying {}", cached.display());
        eprintln!(
            "VM disk copied from {} in {:?}",
            cached.display(),
            t.elapsed()
        );
        return false;
    }
    let disk = moat_qemu::vmimage::build_vm_image(
        &r.driver.images,
        "debian/bookworm",
        "debian/bookworm",
        &moat_image::StderrProgress,
    )
    .unwrap();
    eprintln!(
        "VM image built in {:?} ({} bytes)",
        t.elapsed(),
        std::fs::metadata(&disk).unwrap().len()
    );
    // Keep it for the next run (written aside, then renamed: a cut run leaves no half file).
    let _ = std::fs::create_dir_all(VM_DISK_CACHE);
    if let Ok(old) = std::fs::read_dir(VM_DISK_CACHE) {
        for e in old.flatten().filter(|e| e.file_name() != ".lock") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let tmp = cached.with_extension("tmp");
    if std::fs::copy(&disk, &tmp).is_ok() {
        let _ = std::fs::rename(&tmp, &cached);
    }
    true
}

/// The demonstration: `moat image build --vm debian/bookworm`, cloud-init sets a
/// user and a file, the guest shows both on its serial console, and
/// `moat stop` shuts it down through ACPI. The disk is built once and kept in
/// /var/tmp/moat-test-vmdisk (a cold run builds it: ~15 min more); the boot
/// under TCG takes minutes. MOAT_TEST_QUICK=1 skips it.
#[test]
fn debian_vm_boots_with_cloud_init_and_powers_off() {
    require_host!();
    if std::env::var_os("MOAT_TEST_QUICK").is_some() {
        eprintln!("SKIP: MOAT_TEST_QUICK is set (the Debian VM boot under TCG takes minutes)");
        return;
    }
    for t in ["mmdebstrap", "syslinux", "mkfs.vfat", "mcopy", "sfdisk"] {
        if !have(t) {
            eprintln!("SKIP: {t} is not installed (scripts/deps.sh --test)");
            return;
        }
    }
    let r = Root::new();
    let t0 = Instant::now();
    let built = debian_vm_disk(&r);
    let name = unique("vmdeb");
    // MOAT_TEST_VM_ANALYZE=1: cloud-init's own timing on the console too.
    let analyze = if std::env::var_os("MOAT_TEST_VM_ANALYZE").is_some() {
        "cloud-init analyze blame; systemd-analyze critical-chain --no-pager; "
    } else {
        ""
    };
    let runcmd = format!(
        "sh -c '{analyze}id moatuser; cat /etc/moat-hello; echo MOAT-RUNCMD-DONE' > /dev/ttyS0 2>&1"
    );
    let spec = r.spec(&name, "debian/bookworm", |m| {
        m.memory = Some(1 << 30);
        m.cpus = Some(2);
        m.cloud_init = Some(serde_json::json!({
            "user-data": {
                "users": [{"name": "moatuser", "shell": "/bin/sh"}],
                "write_files": [{"path": "/etc/moat-hello", "content": "hello-from-cloud-init\n"}],
                "runcmd": [runcmd]
            }
        }));
    });
    r.driver.create(&r.ctx, &spec).unwrap();
    let t = Instant::now();
    r.driver.start(&r.ctx, &name).unwrap();
    let p = vm::paths(&r.ctx, &name);
    let deadline = t + Duration::from_secs(900);
    let mut log = String::new();
    // When each console line appeared (host clock): where the boot time goes.
    let mut timeline = String::new();
    let mut seen = 0;
    while Instant::now() < deadline {
        log = std::fs::read_to_string(&p.console_log).unwrap_or_default();
        let complete = log.rfind('\n').map(|i| i + 1).unwrap_or(0);
        if complete > seen {
            for l in log[seen..complete].lines() {
                timeline.push_str(&format!("{:7.1} {l}\n", t.elapsed().as_secs_f64()));
            }
            seen = complete;
        }
        if log.contains("MOAT-RUNCMD-DONE") {
            break;
        }
        assert!(vm::is_running(&r.ctx, &name), "the VM died:\n{log}");
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("cloud-init runcmd done after {:?}", t.elapsed());
    assert!(log.contains("hello-from-cloud-init"), "{log}");
    assert!(log.contains("(moatuser)"), "{log}");
    let png = r.root().join("debian.png");
    vm::screendump(&r.ctx, &name, &png).unwrap();
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    if let Ok(dir) = std::env::var("MOAT_TEST_ARTIFACTS") {
        let _ = std::fs::copy(&png, Path::new(&dir).join("debian-vm.png"));
        let _ = std::fs::write(Path::new(&dir).join("debian-vm-console.log"), &log);
        let _ = std::fs::write(Path::new(&dir).join("debian-vm-timeline.log"), &timeline);
    }
    let t = Instant::now();
    let outcome = vm::shut_down(&r.ctx, &name, Duration::from_secs(300)).unwrap();
    eprintln!("ACPI shutdown: {outcome:?} after {:?}", t.elapsed());
    assert_eq!(outcome, StopOutcome::Graceful);
    r.driver.stop(&r.ctx, &name, Duration::ZERO).unwrap();
    eprintln!(
        "whole test {:?} (disk {})",
        t0.elapsed(),
        if built { "built" } else { "from the cache" }
    );
}

/// The newest test executable `<prefix>-<hash>` next to this one (cargo's
/// `target/debug/deps`), if cargo built it.
fn sibling_test_binary(prefix: &str) -> Option<PathBuf> {
    let deps = std::env::current_exe().ok()?.parent()?.to_path_buf();
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(&deps).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(hash) = name.strip_prefix(&format!("{prefix}-")) else {
            continue;
        };
        if hash.len() != 16 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        use std::os::unix::fs::PermissionsExt;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            continue;
        }
        let t = meta.modified().ok()?;
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, e.path()));
        }
    }
    best.map(|(_, p)| p)
}

/// Removes a file on drop (the payload disk lives outside the test root so
/// that QEMU, running as moat-qemu, can open it when it is hot-plugged).
struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The built-in runtime on cgroup v2. This host is a cgroup v1 hybrid; the
/// Debian VM boots with systemd's default, the unified (v2-only) hierarchy.
/// A disk hot-plugged into it carries moat-runtime's own test executables
/// (limits visible and enforced inside, seccomp, masked paths, capabilities,
/// restart policy, a killed supervisor, busybox init; and the Debian systemd
/// system container that must reach `running`/`degraded` and stop cleanly),
/// the supervisor, busybox and the Debian rootfs: cloud-init runs them there
/// and the console must show both suites passing with nothing skipped.
/// MOAT_TEST_QUICK=1 skips it.
#[test]
fn runtime_tests_pass_on_cgroup_v2_in_a_debian_vm() {
    require_host!();
    if std::env::var_os("MOAT_TEST_QUICK").is_some() {
        eprintln!("SKIP: MOAT_TEST_QUICK is set (a Debian VM under TCG takes minutes)");
        return;
    }
    for t in [
        "mmdebstrap",
        "syslinux",
        "mkfs.vfat",
        "mcopy",
        "sfdisk",
        "mkfs.ext4",
    ] {
        if !have(t) {
            eprintln!("SKIP: {t} is not installed (scripts/deps.sh --test)");
            return;
        }
    }
    let (Some(runtime), Some(systemd)) = (
        sibling_test_binary("runtime"),
        sibling_test_binary("systemd"),
    ) else {
        eprintln!("SKIP: moat-runtime's test executables are not built (`cargo test --workspace` builds them)");
        return;
    };
    // The supervisor cargo builds beside the test executables' folder.
    let sup = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("moat-supervisor"))
        .unwrap();
    if !sup.is_file() {
        eprintln!("SKIP: {} is not built", sup.display());
        return;
    }
    let rootfs = std::env::var_os("MOAT_TEST_DEBIAN_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/moat-test-debian-rootfs"));
    if !rootfs.join("sbin/init").exists() || !Path::new("/bin/busybox").is_file() {
        eprintln!(
            "SKIP: needs the Debian rootfs at {} (the nspawn tests build it) and /bin/busybox",
            rootfs.display()
        );
        return;
    }
    let r = Root::new();
    let t0 = Instant::now();
    debian_vm_disk(&r);

    // The payload: an ext4 image labelled MOATPAY, made from a staging folder.
    let stage = r.root().join("payload");
    std::fs::create_dir_all(&stage).unwrap();
    let cp = |from: &Path, to: &str| {
        let st = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(from)
            .arg(stage.join(to))
            .status()
            .unwrap();
        assert!(st.success(), "copying {}", from.display());
    };
    cp(&runtime, "runtime");
    cp(&systemd, "systemd");
    cp(&sup, "moat-supervisor");
    cp(Path::new("/bin/busybox"), "busybox");
    cp(&rootfs, "rootfs");
    // The systemd test names the supervisor by its build path: the same path in the guest.
    let build_sup = sup.clone();
    let script = format!(
        "#!/bin/sh\n\
         echo GUEST-CGROUP: $(stat -fc %T /sys/fs/cgroup) kernel $(uname -r)\n\
         [ -x /bin/busybox ] || cp /mnt/busybox /bin/busybox\n\
         mkdir -p {dir} && ln -sf /mnt/moat-supervisor {sup}\n\
         cd /tmp\n\
         export MOAT_SUPERVISOR=/mnt/moat-supervisor MOAT_TEST_DEBIAN_ROOTFS=/mnt/rootfs RUST_BACKTRACE=1\n\
         /mnt/runtime --test-threads=1 --nocapture 2>&1; echo GUEST-RUNTIME-RC=$?\n\
         /mnt/systemd --test-threads=1 --nocapture 2>&1; echo GUEST-SYSTEMD-RC=$?\n\
         echo GUEST-LEFT: $(find /sys/fs/cgroup -path '*moat*' -type d | wc -l) cgroups, $(grep -c ' /var/tmp/moat-\\| /tmp/' /proc/mounts) mounts\n\
         echo MOAT-GUEST-DONE\n",
        dir = build_sup.parent().unwrap().display(),
        sup = build_sup.display(),
    );
    std::fs::write(stage.join("guest.sh"), script).unwrap();
    let img = PathBuf::from(format!(
        "/var/tmp/moat-cg2-payload-{}.img",
        std::process::id()
    ));
    let _img_guard = RemoveOnDrop(img.clone());
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "MOATPAY", "-d"])
        .arg(&stage)
        .arg(&img)
        .arg("1600M")
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 -d of the payload");
    let _ = std::fs::remove_dir_all(&stage);
    let mut perm = std::fs::metadata(&img).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(&img, perm).unwrap();
    eprintln!("payload ready after {:?}", t0.elapsed());

    let name = unique("vmcg2");
    let runcmd = "sh -c 'for i in $(seq 900); do [ -e /dev/disk/by-label/MOATPAY ] && break; sleep 1; done; \
                  mount -o ro /dev/disk/by-label/MOATPAY /mnt && sh /mnt/guest.sh' > /dev/ttyS0 2>&1";
    let spec = r.spec(&name, "debian/bookworm", |m| {
        m.memory = Some(1536 << 20);
        m.cpus = Some(2);
        m.cloud_init = Some(serde_json::json!({"user-data": {"runcmd": [runcmd]}}));
    });
    r.driver.create(&r.ctx, &spec).unwrap();
    let t = Instant::now();
    r.driver.start(&r.ctx, &name).unwrap();
    // Hot-plug the payload (read-only) through the monitor.
    let mut q =
        moat_qemu::qmp::Qmp::connect(&vm::paths(&r.ctx, &name).qmp, Duration::from_secs(30))
            .unwrap();
    let out = q
        .hmp(&format!(
            "drive_add 0 if=none,id=moatpay,file={},format=raw,readonly=on",
            img.display()
        ))
        .unwrap();
    assert!(!out.to_lowercase().contains("error"), "drive_add: {out}");
    let out = q
        .hmp("device_add virtio-blk-pci,drive=moatpay,id=moatpaydev,bus=hotplug0")
        .unwrap();
    assert!(!out.to_lowercase().contains("error"), "device_add: {out}");
    drop(q);
    let p = vm::paths(&r.ctx, &name);
    let deadline = t + Duration::from_secs(1500);
    let mut log = String::new();
    while Instant::now() < deadline {
        log = std::fs::read_to_string(&p.console_log).unwrap_or_default();
        if log.contains("MOAT-GUEST-DONE") {
            break;
        }
        assert!(vm::is_running(&r.ctx, &name), "the VM died:\n{log}");
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("guest tests done after {:?}", t.elapsed());
    if let Ok(dir) = std::env::var("MOAT_TEST_ARTIFACTS") {
        let _ = std::fs::write(Path::new(&dir).join("cgroup2-vm-console.log"), &log);
    }
    let guest = log.find("GUEST-CGROUP:").map(|i| &log[i..]).unwrap_or(&log);
    assert!(log.contains("MOAT-GUEST-DONE"), "timed out:\n{guest}");
    assert!(guest.contains("GUEST-CGROUP: cgroup2fs"), "{guest}");
    assert!(guest.contains("GUEST-RUNTIME-RC=0"), "{guest}");
    assert!(guest.contains("GUEST-SYSTEMD-RC=0"), "{guest}");
    assert!(!guest.contains("SKIP"), "a guest test skipped:\n{guest}");
    assert_eq!(guest.matches("test result: ok").count(), 2, "{guest}");
    assert!(guest.contains("GUEST-LEFT: 0 cgroups, 0 mounts"), "{guest}");
    vm::shut_down(&r.ctx, &name, Duration::ZERO).unwrap();
    r.driver.stop(&r.ctx, &name, Duration::ZERO).unwrap();
    eprintln!("whole test {:?}", t0.elapsed());
}
