//! microVMs (`type: microvm`): QEMU `-M microvm` with qboot, PVH boot of an
//! uncompressed kernel, moat-init as PID 1 from the initramfs.
//!
//! create: record + root disk. The image's root file system becomes an ext4
//! file once per image (`<root>/qemu/images/<image id>.ext4`, `mkfs.ext4 -d`),
//! each machine gets a qcow2 overlay over it (`disk.qcow2`, milliseconds).
//! start: kernel + accelerator + initramfs (shared base + the machine's
//! config.json), tap handed to QEMU as an open fd, QEMU started detached
//! (`-daemonize`) as the `moat-qemu` user with `-sandbox on`, inside its own
//! memory cgroup. The serial console goes to `<run>/console.log`; moat-init
//! prints `@moat-start` / `@moat-exit <code>` there (see [`exit_code`]).

use crate::accel::{self, Chosen};
use crate::{
    guest, initramfs, kernel, machine_dir, pid_file, qemu_pid, run_dir, write_record, QemuDriver,
    QemuError, Record, QEMU, QEMU_USER,
};
use moat_core::observed::MachineState;
use moat_driver::{Ctx, DriverError, ExecOutput, MachineSpec, Result};
use moat_image::MachineFs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const QBOOT: &str = "/usr/share/qemu/qboot.rom";

fn fail(machine: &str, message: impl Into<String>) -> DriverError {
    DriverError::Failed {
        machine: machine.into(),
        message: message.into(),
    }
}

fn run_cmd(machine: &str, what: &str, cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| fail(machine, format!("{what}: {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(fail(
            machine,
            format!(
                "{what}: {cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// uid and gid of the `moat-qemu` user, created (system user, no home, no
/// shell) when missing.
pub fn qemu_user() -> std::result::Result<(u32, u32), QemuError> {
    let lookup = || {
        let name = std::ffi::CString::new(QEMU_USER).ok()?;
        // SAFETY: getpwnam returns a pointer into static storage or null; read at once.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            return None;
        }
        // SAFETY: non-null passwd entry.
        unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
    };
    if let Some(ids) = lookup() {
        return Ok(ids);
    }
    let out = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home"])
        .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
        .arg(QEMU_USER)
        .output()
        .map_err(QemuError::io("creating the moat-qemu user (useradd)"))?;
    if !out.status.success() && lookup().is_none() {
        return Err(QemuError::Command {
            what: "creating the moat-qemu user".into(),
            cmd: "useradd --system moat-qemu".into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    lookup().ok_or_else(|| QemuError::Failed("user moat-qemu missing after useradd".into()))
}

pub(crate) fn chown(p: &Path, uid: u32, gid: u32) {
    let _ = std::os::unix::fs::chown(p, Some(uid), Some(gid));
}

/// The image's root file system as an ext4 file (built once per image id).
fn base_disk(d: &QemuDriver, ctx: &Ctx, rec: &Record) -> Result<PathBuf> {
    let name = &rec.full_name;
    let image = d
        .images
        .get(&rec.image)
        .map_err(|e| fail(name, e.to_string()))?
        .ok_or_else(|| {
            fail(
                name,
                format!(
                    "image '{}' is not in the store; run `moat image pull` or apply",
                    rec.image
                ),
            )
        })?;
    let dir = ctx.root.join("qemu").join("images");
    std::fs::create_dir_all(&dir).map_err(|source| DriverError::Io {
        machine: name.clone(),
        source,
    })?;
    let size_mib = rec.disk.map(|b| b / (1024 * 1024)).unwrap_or(1024).max(64);
    let base = dir.join(format!(
        "{}-{size_mib}.ext4",
        &image.id[..image.id.len().min(16)]
    ));
    if base.is_file() {
        return Ok(base);
    }
    // A temporary machine file system gives the image's merged layers.
    let tmp_name = format!("qemu-build-{}", std::process::id());
    let fs = MachineFs::create(&d.images, &tmp_name, &image, true)
        .map_err(|e| fail(name, e.to_string()))?;
    let result = (|| {
        let rootfs = fs.mount().map_err(|e| fail(name, e.to_string()))?;
        let tmp = base.with_extension("tmp");
        run_cmd(
            name,
            "making the root disk",
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
                .arg(&rootfs)
                .arg(&tmp)
                .arg(format!("{size_mib}M")),
        )?;
        std::fs::rename(&tmp, &base).map_err(|source| DriverError::Io {
            machine: name.clone(),
            source,
        })
    })();
    let _ = fs.unmount();
    let _ = fs.destroy();
    result.map(|_| base)
}

fn overlay(ctx: &Ctx, rec: &Record, base: &Path) -> Result<PathBuf> {
    let disk = machine_dir(ctx, &rec.full_name).join("disk.qcow2");
    let _ = std::fs::remove_file(&disk);
    run_cmd(
        &rec.full_name,
        "making the machine's disk overlay",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(&disk),
    )?;
    Ok(disk)
}

pub fn create(d: &QemuDriver, ctx: &Ctx, spec: &MachineSpec) -> Result<()> {
    let rec = Record::from_spec(spec);
    if let Some(old) = crate::read_record(ctx, &rec.full_name)? {
        if old.spec_hash == rec.spec_hash
            && machine_dir(ctx, &rec.full_name)
                .join("disk.qcow2")
                .is_file()
        {
            return Ok(());
        }
    }
    write_record(ctx, &rec)?;
    let base = base_disk(d, ctx, &rec)?;
    overlay(ctx, &rec, &base)?;
    Ok(())
}

/// The guest's config.json (what moat-init runs and how).
fn guest_config(d: &QemuDriver, rec: &Record) -> Result<serde_json::Value> {
    let image = d
        .images
        .get(&rec.image)
        .map_err(|e| fail(&rec.full_name, e.to_string()))?;
    let c = image.map(|i| i.config).unwrap_or_default();
    let argv: Vec<String> = match &rec.command {
        Some(cmd) if !cmd.is_empty() => cmd.clone(),
        _ => c.entrypoint.iter().chain(c.cmd.iter()).cloned().collect(),
    };
    let mode = if argv.is_empty() && c.init.is_some() {
        "init"
    } else {
        "run"
    };
    let (uid, gid) = c
        .user
        .as_deref()
        .and_then(|u| {
            let mut it = u.splitn(2, ':');
            let uid: u32 = it.next()?.parse().ok()?;
            Some((uid, it.next().and_then(|g| g.parse().ok()).unwrap_or(uid)))
        })
        .unwrap_or((0, 0));
    let mut env = c.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let short = rec.full_name.clone();
    Ok(serde_json::json!({
        "mode": mode,
        "argv": argv,
        "env": env,
        "workdir": c.workdir,
        "uid": uid,
        "gid": gid,
        "hostname": rec.machine.get("name").and_then(|v| v.as_str()).unwrap_or(&short),
        "ip": rec.nic.as_ref().map(|n| format!("{}/{}", n.ip, n.prefix_len)),
        "gateway": rec.nic.as_ref().map(|n| n.gateway.to_string()),
        "hosts": rec.hosts.iter().map(|(n, ip)| (n.clone(), ip.to_string())).collect::<Vec<_>>(),
    }))
}

fn initramfs_base(ctx: &Ctx, k: &kernel::Kernel) -> std::result::Result<PathBuf, QemuError> {
    use sha2::Digest;
    let init = initramfs::find_init()?;
    let meta =
        std::fs::metadata(&init).map_err(QemuError::io(format!("reading {}", init.display())))?;
    let mut h = sha2::Sha256::new();
    h.update(k.vmlinux.to_string_lossy().as_bytes());
    h.update(format!("{:?}", k.modules).as_bytes());
    h.update(format!("{}-{:?}", meta.len(), meta.modified().ok()).as_bytes());
    h.update(init.to_string_lossy().as_bytes());
    let key = hex::encode(&h.finalize()[..8]);
    let dir = ctx.root.join("qemu").join("initramfs");
    let path = dir.join(format!("{key}.cpio"));
    if !path.is_file() {
        std::fs::create_dir_all(&dir)
            .map_err(QemuError::io(format!("creating {}", dir.display())))?;
        let data = initramfs::base(&init, k.modules.as_deref())?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, data).map_err(QemuError::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(QemuError::io(format!("writing {}", path.display())))?;
    }
    Ok(path)
}

/// Memory cgroup (v1 or v2) for one QEMU process (microVM or full VM), limited to
/// guest RAM + 256 MiB; its `cgroup.procs` file.
pub(crate) fn cgroup(ctx: &Ctx, rec: &Record) -> Option<PathBuf> {
    let sub = format!("moat-{}/qemu-{}", ctx.root_tag, rec.full_name);
    let base = if Path::new("/sys/fs/cgroup/memory").is_dir() {
        PathBuf::from("/sys/fs/cgroup/memory")
    } else if Path::new("/sys/fs/cgroup/cgroup.controllers").is_file() {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        return None;
    };
    let dir = base.join(sub);
    std::fs::create_dir_all(&dir).ok()?;
    // Guest RAM plus QEMU's own (TCG code cache, device emulation).
    let limit = (rec.memory_mib() + 256) * 1024 * 1024;
    let _ = std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string());
    let _ = std::fs::write(dir.join("memory.max"), limit.to_string());
    Some(dir.join("cgroup.procs"))
}

pub(crate) fn remove_cgroup(ctx: &Ctx, name: &str) {
    for base in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"] {
        let dir = Path::new(base).join(format!("moat-{}/qemu-{name}", ctx.root_tag));
        // A just-killed QEMU may not be reaped yet: the cgroup is busy briefly.
        for _ in 0..50 {
            if !dir.exists() || std::fs::remove_dir(&dir).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The root's parent group goes with its last machine (rmdir fails while in use).
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Open the machine's tap (created by the network layer) for QEMU: QEMU gets
/// the fd, so it needs no access to /dev/net/tun.
fn open_tap(name: &str) -> std::result::Result<std::fs::File, QemuError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(QemuError::io("opening /dev/net/tun"))?;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    for (i, b) in name.bytes().take(15).enumerate() {
        req.name[i] = b;
    }
    // SAFETY: TUNSETIFF with a valid, fully initialised ifreq-sized buffer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if r != 0 {
        return Err(QemuError::Io {
            what: format!("attaching to tap {name}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(f)
}

/// QEMU's command line for a machine (without `-pidfile`/`-sandbox`).
pub fn qemu_args(
    rec: &Record,
    k: &kernel::Kernel,
    accel: Chosen,
    initrd: &Path,
    disk: &Path,
    run: &Path,
    tap_fd: Option<i32>,
) -> Vec<String> {
    let append = format!(
        "console=ttyS0 reboot=t panic=-1 quiet loglevel=3 rdinit=/init {}",
        accel.cmdline()
    );
    let mut a: Vec<String> = vec![
        "-M".into(),
        "microvm,x-option-roms=off,rtc=off".into(),
        "-bios".into(),
        QBOOT.into(),
        "-accel".into(),
        accel.qemu_arg().into(),
        "-m".into(),
        rec.memory_mib().to_string(),
        "-smp".into(),
        rec.cpus.unwrap_or(1).to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        k.vmlinux.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        append.trim().to_string(),
        "-chardev".into(),
        format!("file,id=con,path={}", run.join("console.log").display()),
        "-serial".into(),
        "chardev:con".into(),
        "-drive".into(),
        format!("id=root,file={},format=qcow2,if=none", disk.display()),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=ctl,path={},server=on,wait=off",
            run.join("ctl.sock").display()
        ),
        "-device".into(),
        "virtserialport,chardev=ctl,name=moat.ctl".into(),
        // The workload's stdout and stderr, apart from kernel and init messages.
        "-chardev".into(),
        format!("file,id=out,path={}", run.join("output.log").display()),
        "-device".into(),
        "virtserialport,chardev=out,name=moat.out".into(),
    ];
    if let (Some(nic), Some(fd)) = (&rec.nic, tap_fd) {
        a.extend([
            "-netdev".into(),
            format!("tap,id=n0,fd={fd},vhost=off"),
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={}", nic.mac_string()),
        ]);
    }
    a
}

pub fn start(d: &QemuDriver, ctx: &Ctx, rec: &Record) -> Result<()> {
    let name = &rec.full_name;
    let pidf = pid_file(ctx, name);
    if qemu_pid(&pidf).is_some() {
        return Ok(());
    }
    let kernels = kernel::store_dir(d.images.dir());
    let k = kernel::resolve(&kernels, rec.kernel.as_deref()).map_err(|e| e.on(name))?;
    let base = initramfs_base(ctx, &k).map_err(|e| e.on(name))?;
    let (uid, gid) = qemu_user().map_err(|e| e.on(name))?;
    let run = run_dir(ctx, name);
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run).map_err(|source| DriverError::Io {
        machine: name.clone(),
        source,
    })?;
    chown(&run, uid, gid);
    let cfg = guest_config(d, rec)?;
    let base_bytes = std::fs::read(&base).map_err(|source| DriverError::Io {
        machine: name.clone(),
        source,
    })?;
    let initrd = run.join("initrd.img");
    std::fs::write(
        &initrd,
        initramfs::with_config(&base_bytes, cfg.to_string().as_bytes()),
    )
    .map_err(|source| DriverError::Io {
        machine: name.clone(),
        source,
    })?;
    let accel = accel::choose(rec.accel, &ctx.run_dir, || {
        probe_kvm(&k, &base, &run.join("probe.log"))
    });
    let mdir = machine_dir(ctx, name);
    let mut disk = mdir.join("disk.qcow2");
    if rec.disposable || !disk.is_file() {
        let b = base_disk(d, ctx, rec)?;
        disk = overlay(ctx, rec, &b)?;
    }
    chown(&mdir, uid, gid);
    chown(&disk, uid, gid);
    // The tap: created on the bridge with the domain's rules, opened here.
    let tap = match &rec.nic {
        Some(nic) => {
            let net = moat_core::model::ResolvedNetwork {
                domain: nic.domain.clone(),
                subnet: ipnet::Ipv4Net::new(nic.gateway, nic.prefix_len)
                    .map_err(|e| fail(name, e.to_string()))?
                    .trunc(),
                gateway: nic.gateway,
                bridge: nic.bridge.clone(),
            };
            let rnic = moat_core::model::ResolvedNic {
                machine: name.clone(),
                ip: nic.ip,
                mac: nic.mac,
                host_if: nic.host_if.clone(),
            };
            d.net
                .attach_tap(&rnic, &net, &d.alias)
                .map_err(|e| fail(name, e.to_string()))?;
            Some(open_tap(&nic.host_if).map_err(|e| e.on(name))?)
        }
        None => None,
    };
    let args = qemu_args(
        rec,
        &k,
        accel,
        &initrd,
        &disk,
        &run,
        tap.as_ref().map(|_| 3),
    );
    // For `bench/vm` (replays the same command line) and for debugging.
    let _ = std::fs::write(run.join("qemu.args"), args.join("\n") + "\n");
    let procs = cgroup(ctx, rec);
    let procs_fd = procs
        .as_ref()
        .and_then(|p| std::fs::OpenOptions::new().write(true).open(p).ok());
    let mut cmd = Command::new(QEMU);
    cmd.args(&args)
        .arg("-sandbox")
        .arg("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
        .arg("-pidfile")
        .arg(&pidf)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(qemu_err(&run).map_err(|source| DriverError::Io {
            machine: name.clone(),
            source,
        })?);
    let tap_raw = tap.as_ref().map(|f| f.as_raw_fd());
    let procs_raw = procs_fd.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: only async-signal-safe calls (write, dup2, setsid, setgroups,
    // setgid, setuid) between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if let Some(fd) = procs_raw {
                libc::write(fd, b"0".as_ptr().cast(), 1);
            }
            if let Some(fd) = tap_raw {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::setsid();
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Not -daemonize: the sandbox forbids its setsid. QEMU is detached by
    // setsid above; a thread reaps it while this process lives, init after.
    let mut child = cmd.spawn().map_err(|e| {
        fail(
            name,
            format!("starting {QEMU}: {e}; is qemu-system-x86 installed?"),
        )
    })?;
    let t = Instant::now();
    let started = loop {
        if let Ok(Some(_)) = child.try_wait() {
            break false;
        }
        // output.log too: `moat logs` right after start must find it.
        if qemu_pid(&pidf).is_some()
            && run.join("ctl.sock").exists()
            && run.join("output.log").exists()
        {
            break true;
        }
        if t.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if !started {
        let _ = child.kill();
        let _ = child.wait();
        if let Some(nic) = &rec.nic {
            let _ = d.net.detach(&nic.host_if);
        }
        let err = std::fs::read_to_string(run.join("qemu.err")).unwrap_or_default();
        return Err(fail(
            name,
            format!(
                "{QEMU} failed: {} (command: {QEMU} {})",
                err.trim(),
                args.join(" ")
            ),
        ));
    }
    std::thread::spawn(move || child.wait());
    Ok(())
}

fn qemu_err(run: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::create(run.join("qemu.err"))
}

/// Boot the kernel under KVM with the probe flag; true when moat-init ran.
fn probe_kvm(k: &kernel::Kernel, initrd: &Path, log: &Path) -> bool {
    let _ = std::fs::remove_file(log);
    let child = Command::new(QEMU)
        .args(["-M", "microvm,x-option-roms=off,rtc=off", "-bios", QBOOT])
        .args([
            "-accel",
            "kvm",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot", "-kernel"])
        .arg(&k.vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 reboot=t panic=-1 quiet moat.probe",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let ok = accel::wait_marker(log, "@moat-probe-ok", Duration::from_secs(15));
    let _ = child.kill();
    let _ = child.wait();
    ok
}

pub fn state(_d: &QemuDriver, ctx: &Ctx, rec: &Record) -> MachineState {
    if qemu_pid(&pid_file(ctx, &rec.full_name)).is_some() {
        return MachineState::Running;
    }
    let log = run_dir(ctx, &rec.full_name).join("console.log");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if let Some(line) = text.lines().rev().find(|l| l.starts_with("@moat-error ")) {
        return MachineState::Crashed {
            reason: line.trim_start_matches("@moat-error ").to_string(),
        };
    }
    MachineState::Stopped
}

/// The workload's exit code, from the console log (`None` while it runs or
/// when the guest died without reporting).
pub fn exit_code(ctx: &Ctx, full_name: &str) -> Option<i32> {
    let text = std::fs::read_to_string(run_dir(ctx, full_name).join("console.log")).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("@moat-exit ")?.trim().parse().ok())
}

/// The console log (kernel and moat-init messages, the `@moat-*` markers).
pub fn console_log(ctx: &Ctx, full_name: &str) -> PathBuf {
    run_dir(ctx, full_name).join("console.log")
}

/// The workload's output (stdout and stderr, in order), written by QEMU from the
/// guest's virtio-serial port `moat.out`.
pub fn output_log(ctx: &Ctx, full_name: &str) -> PathBuf {
    run_dir(ctx, full_name).join("output.log")
}

/// What `moat logs` shows: the workload's output, or the console of a machine
/// started before the output port existed.
pub fn log_file(ctx: &Ctx, full_name: &str) -> PathBuf {
    let out = output_log(ctx, full_name);
    if out.exists() {
        out
    } else {
        console_log(ctx, full_name)
    }
}

/// The workload output so far: the output port's file, or (older machines)
/// the console lines between the markers.
fn output_so_far(ctx: &Ctx, full_name: &str, console: &str) -> Vec<u8> {
    match std::fs::read(output_log(ctx, full_name)) {
        Ok(t) => t,
        Err(_) => workload_output(console).into_bytes(),
    }
}

/// Workload output: the console lines between `@moat-start` and `@moat-exit`.
pub fn workload_output(console: &str) -> String {
    let mut out = String::new();
    let mut on = false;
    for l in console.split_inclusive('\n') {
        let t = l.trim();
        if t == "@moat-start" {
            on = true;
            continue;
        }
        if t.starts_with("@moat-exit ") {
            break;
        }
        if on {
            out.push_str(l);
        }
    }
    out.replace("\r\n", "\n")
}

/// Wait until QEMU has exited (or `timeout`); true when it did.
pub fn wait_exit(ctx: &Ctx, full_name: &str, timeout: Duration) -> bool {
    let pidf = pid_file(ctx, full_name);
    let t = Instant::now();
    while t.elapsed() < timeout {
        if qemu_pid(&pidf).is_none() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn cleanup_after_stop(d: &QemuDriver, ctx: &Ctx, rec: &Record) {
    if let Some(nic) = &rec.nic {
        let _ = d.net.detach(&nic.host_if);
    }
    remove_cgroup(ctx, &rec.full_name);
    if rec.disposable {
        let _ = std::fs::remove_file(machine_dir(ctx, &rec.full_name).join("disk.qcow2"));
    }
}

pub fn stop(d: &QemuDriver, ctx: &Ctx, rec: &Record, timeout: Duration) -> Result<()> {
    let name = &rec.full_name;
    let pidf = pid_file(ctx, name);
    if qemu_pid(&pidf).is_some() {
        // Graceful: SIGTERM to the workload; moat-init powers off after it.
        let sock = run_dir(ctx, name).join("ctl.sock");
        if !timeout.is_zero() && guest::stop(&sock).is_ok() && wait_exit(ctx, name, timeout) {
            cleanup_after_stop(d, ctx, rec);
            return Ok(());
        }
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            if let Some(pid) = qemu_pid(&pidf) {
                // SAFETY: signalling the QEMU process named by our pid file.
                unsafe { libc::kill(pid, sig) };
            }
            if wait_exit(ctx, name, Duration::from_secs(3)) {
                break;
            }
        }
        if qemu_pid(&pidf).is_some() {
            return Err(fail(name, "QEMU does not exit; kill it by hand"));
        }
    }
    cleanup_after_stop(d, ctx, rec);
    Ok(())
}

pub fn destroy(d: &QemuDriver, ctx: &Ctx, rec: &Record) -> Result<()> {
    stop(d, ctx, rec, Duration::ZERO)?;
    let _ = std::fs::remove_dir_all(run_dir(ctx, &rec.full_name));
    std::fs::remove_dir_all(machine_dir(ctx, &rec.full_name)).or_else(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(DriverError::Io {
                machine: rec.full_name.clone(),
                source: e,
            })
        }
    })
}

pub fn exec(_d: &QemuDriver, ctx: &Ctx, rec: &Record, argv: &[String]) -> Result<ExecOutput> {
    let name = &rec.full_name;
    if argv.is_empty() {
        return Err(fail(name, "exec needs a command"));
    }
    let sock = run_dir(ctx, name).join("ctl.sock");
    let r = guest::exec(&sock, argv, Duration::from_secs(30)).map_err(|e| e.on(name))?;
    Ok(ExecOutput {
        status: r.status,
        stdout: r.stdout.into_bytes(),
        stderr: r.stderr.into_bytes(),
    })
}

/// Follow a started microVM in the foreground (`moat run --driver qemu`):
/// copy the workload's output to `out` as it appears, and return its exit
/// code when the VM has powered off. Boot is bounded by `boot_timeout`.
pub fn follow(
    ctx: &Ctx,
    full_name: &str,
    out: &mut dyn std::io::Write,
    boot_timeout: Duration,
) -> std::result::Result<i32, QemuError> {
    let log = console_log(ctx, full_name);
    let pidf = pid_file(ctx, full_name);
    let t0 = Instant::now();
    let mut shown = 0usize;
    loop {
        let alive = qemu_pid(&pidf).is_some();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let cur = output_so_far(ctx, full_name, &text);
        if cur.len() > shown {
            let _ = out.write_all(&cur[shown..]);
            let _ = out.flush();
            shown = cur.len();
        }
        if !alive {
            if let Some(code) = exit_code(ctx, full_name) {
                return Ok(code);
            }
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            return Err(QemuError::Failed(format!(
                "{full_name}: the microVM stopped without reporting an exit code; last console lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        if !text.contains("@moat-start") && t0.elapsed() > boot_timeout {
            if let Some(pid) = qemu_pid(&pidf) {
                // SAFETY: signalling the QEMU process named by our pid file.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            return Err(QemuError::Failed(format!(
                "{full_name}: no boot within {}s; console log: {}",
                boot_timeout.as_secs(),
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_output_between_markers() {
        let c = "kernel junk\n@moat-start\r\nhello\r\nworld\n@moat-exit 3\n";
        assert_eq!(workload_output(c), "hello\nworld\n");
    }
}
