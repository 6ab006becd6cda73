//! Full VMs (`type: vm`): q35 with SeaBIOS (`firmware: bios`, default) or OVMF
//! (`firmware: uefi`), a qcow2 overlay over a base disk, a cloud-init seed, a
//! serial console log, QMP control, optional SPICE display and USB passthrough.
//!
//! ```text
//! create: base disk (images/vm/<image>.qcow2, built or imported on demand)
//!         ─▶ <root>/qemu/<m>/disk.qcow2 (overlay, grown to `disk:`), seed.iso, vm.json
//! start:  tap on the domain bridge ─▶ cgroup moat-<tag>/qemu-<m> ─▶ qemu-system-x86_64
//!         -run-with user=moat-qemu, detached by setsid (command_line, start)
//! stop:   QMP system_powerdown ─▶ wait ≤ timeout ─▶ QMP quit ─▶ SIGKILL; disposable: drop overlay
//! ```
//!
//! Files: `<root>/qemu/<m>/` disk.qcow2, seed.iso, OVMF_VARS.fd, console.log (serial output,
//! what `moat logs` shows), vm.json; `<run_dir>/qemu/<m>/` qmp.sock, console.sock
//! (interactive serial), spice.sock, qemu.pid.
//!
//! Machine states: a `template: true` VM is never started (it is a base for `moat clone`);
//! a `disposable: true` VM gets a fresh overlay at every start and loses it at stop.

use crate::disk;
use crate::qmp::Qmp;
use crate::seed::{self, SeedFormat};
use crate::{machine_dir, pid_file, qemu_pid, run_dir, QemuDriver, QemuError, Record, QEMU};
use moat_core::model::{Display, Firmware, ResolvedNetwork, ResolvedNic, UsbDevice};
use moat_core::observed::MachineState;
use moat_driver::{Ctx, DriverError, ExecOutput, MachineSpec, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// OVMF firmware code (read-only) and the variable store template copied per machine.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Where one VM's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPaths {
    pub disk: PathBuf,
    pub seed: PathBuf,
    pub vars: PathBuf,
    pub console_log: PathBuf,
    pub record: PathBuf,
    pub qmp: PathBuf,
    pub console_sock: PathBuf,
    pub spice: PathBuf,
    pub pid: PathBuf,
}

pub fn paths(ctx: &Ctx, name: &str) -> VmPaths {
    let m = machine_dir(ctx, name);
    let r = run_dir(ctx, name);
    VmPaths {
        disk: m.join("disk.qcow2"),
        seed: m.join("seed.iso"),
        vars: m.join("OVMF_VARS.fd"),
        console_log: m.join("console.log"),
        record: m.join("vm.json"),
        qmp: r.join("qmp.sock"),
        console_sock: r.join("console.sock"),
        spice: r.join("spice.sock"),
        pid: pid_file(ctx, name),
    }
}

/// What a VM keeps next to the driver's record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmRecord {
    /// The overlay's backing file (a base disk or a frozen layer).
    pub base: PathBuf,
    pub base_format: String,
    pub firmware: Firmware,
    pub display: Display,
    pub usb: Vec<UsbDevice>,
    pub template: bool,
    /// `iso` or `vfat`; `None` = no seed.
    pub seed: Option<String>,
}

pub fn read_vm_record(ctx: &Ctx, name: &str) -> Option<VmRecord> {
    serde_json::from_slice(&std::fs::read(paths(ctx, name).record).ok()?).ok()
}

fn write_vm_record(ctx: &Ctx, name: &str, r: &VmRecord) -> std::result::Result<(), QemuError> {
    let p = paths(ctx, name).record;
    let text = serde_json::to_vec_pretty(r).map_err(|e| QemuError::Failed(e.to_string()))?;
    std::fs::write(&p, text).map_err(QemuError::io(format!("writing {}", p.display())))
}

/// Accelerator actually used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Everything the QEMU command line of a VM depends on.
#[derive(Clone, Debug)]
pub struct VmLaunch {
    pub name: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    pub firmware: Firmware,
    pub ovmf_code: PathBuf,
    pub paths: VmPaths,
    pub seed: Option<SeedFormat>,
    pub display: Display,
    pub usb: Vec<UsbDevice>,
    /// (tap, guest MAC)
    pub nic: Option<(String, String)>,
}

/// `0x046d` from `046d`, `0x046d` or `046D`; `None` when not 1–4 hex digits.
pub fn usb_id(s: &str) -> Option<String> {
    let h = s.trim().trim_start_matches("0x").trim_start_matches("0X");
    (!h.is_empty() && h.len() <= 4 && h.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| format!("0x{}", h.to_ascii_lowercase()))
}

/// The QEMU argv (without the program) of a VM. Pure.
pub fn command_line(l: &VmLaunch) -> Vec<String> {
    let p = &l.paths;
    let s = |x: &Path| x.to_string_lossy().into_owned();
    let mut a: Vec<String> = vec![];
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|x| x.to_string()));
    push(&["-name", &format!("guest={},debug-threads=on", l.name)]);
    push(&["-machine", "q35"]);
    match l.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg,tb-size=64", "-cpu", "max"]),
    }
    push(&[
        "-smp",
        &l.cpus.max(1).to_string(),
        "-m",
        &format!("{}M", l.memory_mib),
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    if l.firmware == Firmware::Uefi {
        push(&[
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                s(&l.ovmf_code)
            ),
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", s(&p.vars)),
        ]);
    }
    // Serial console: an interactive socket, everything also appended to console.log.
    push(&[
        "-chardev",
        &format!(
            "socket,id=con0,path={},server=on,wait=off,logfile={},logappend=on",
            s(&p.console_sock),
            s(&p.console_log)
        ),
        "-serial",
        "chardev:con0",
    ]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", s(&p.qmp))]);
    push(&[
        "-drive",
        &format!(
            "if=none,id=disk0,file={},format=qcow2,cache=writeback,discard=unmap",
            s(&p.disk)
        ),
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=1",
    ]);
    match l.seed {
        Some(SeedFormat::Iso) => push(&[
            "-drive",
            &format!(
                "if=none,id=seed,file={},format=raw,media=cdrom,readonly=on",
                s(&p.seed)
            ),
            "-device",
            "ide-cd,drive=seed,bus=ide.1",
        ]),
        Some(SeedFormat::Vfat) => push(&[
            "-drive",
            &format!("if=none,id=seed,file={},format=raw,readonly=on", s(&p.seed)),
            "-device",
            "virtio-blk-pci,drive=seed",
        ]),
        None => {}
    }
    if let Some((tap, mac)) = &l.nic {
        push(&[
            "-netdev",
            &format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={mac}"),
        ]);
    }
    // q35's root bus takes no hot-plugged devices: one PCIe root port for a
    // disk (or NIC) added at run time through the monitor (`device_add
    // ...,bus=hotplug0`), as libvirt leaves spare ports.
    push(&["-device", "pcie-root-port,id=hotplug0,chassis=1"]);
    match l.display {
        // A plain VGA even when headless: `screendump` and a later viewer have a screen.
        Display::None => push(&["-device", "VGA"]),
        Display::Spice => push(&[
            "-device",
            "qxl-vga",
            "-spice",
            &format!("unix=on,addr={},disable-ticketing=on", s(&p.spice)),
            "-device",
            "virtio-serial-pci",
            "-chardev",
            "spicevmc,id=vdagent,name=vdagent",
            "-device",
            "virtserialport,chardev=vdagent,name=com.redhat.spice.0",
        ]),
    }
    if !l.usb.is_empty() {
        push(&["-device", "qemu-xhci,id=xhci"]);
        for u in &l.usb {
            let (Some(v), Some(pr)) = (usb_id(&u.vendor), usb_id(&u.product)) else {
                continue;
            };
            push(&[
                "-device",
                &format!("usb-host,bus=xhci.0,vendorid={v},productid={pr}"),
            ]);
        }
    }
    // Not -daemonize: its fork would need `spawn=allow`; moat detaches QEMU
    // itself (setsid). `elevateprivileges` stays allowed: `-run-with user=`
    // drops to moat-qemu after the filter is installed (with `deny` QEMU is
    // killed by its own filter); once dropped, no setuid can regain root.
    push(&[
        "-sandbox",
        "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
        "-pidfile",
        &s(&p.pid),
    ]);
    a
}

fn failed(name: &str, e: QemuError) -> DriverError {
    e.on(name)
}

fn io_err(name: &str) -> impl Fn(std::io::Error) -> DriverError + '_ {
    move |source| DriverError::Io {
        machine: name.into(),
        source,
    }
}

/// The base disk for `image`: an absolute path to a disk file, a VM image
/// already in `images/vm/`, or `debian/<suite>`/`ubuntu/<suite>` (built now).
fn base_disk(d: &QemuDriver, ctx: &Ctx, image: &str) -> std::result::Result<PathBuf, QemuError> {
    let p = Path::new(image);
    if p.is_absolute() {
        return crate::vmimage::import_cloud_image(&ctx.root, image, p);
    }
    let base = disk::base_path(&ctx.root, image);
    if base.exists() {
        return Ok(base);
    }
    if crate::vmimage::vm_image_source(image).is_some() {
        return crate::vmimage::build_vm_image(
            &d.images,
            image,
            image,
            &moat_image::StderrProgress,
        );
    }
    Err(QemuError::Failed(format!(
        "no VM disk for image '{image}'; run `moat image build --vm {image}` (debian/<suite>), \
         or declare it as a cloud image under images: ({{source: cloud-image, path: ...}})"
    )))
}

fn field<T: for<'de> Deserialize<'de> + Default>(rec: &Record, key: &str) -> T {
    rec.machine
        .get(key)
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// Renders and writes the machine's cloud-init seed.
fn write_seed(spec: &MachineSpec, out: &Path) -> std::result::Result<SeedFormat, QemuError> {
    let nic = match (&spec.nic, &spec.bridge) {
        (Some(n), Some(b)) => Some(moat_core::cloudinit::SeedNic {
            mac: n.mac,
            address: n.ip,
            prefix_len: b.prefix_len,
            gateway: b.gateway,
            nameservers: vec![b.gateway],
        }),
        _ => None,
    };
    let s = moat_core::cloudinit::render(&spec.machine, nic.as_ref())
        .map_err(|e| QemuError::Failed(e.to_string()))?;
    seed::build(&s, out)
}

pub fn create(d: &QemuDriver, ctx: &Ctx, spec: &MachineSpec) -> Result<()> {
    let m = &spec.machine;
    let name = m.full_name.as_str();
    let p = paths(ctx, name);
    if let (Some(old), Some(_)) = (crate::read_record(ctx, name)?, read_vm_record(ctx, name)) {
        if old.spec_hash == spec.spec_hash && p.disk.exists() {
            return Ok(());
        }
    }
    if qemu_pid(&p.pid).is_some() {
        return Err(DriverError::Failed {
            machine: name.into(),
            message: "is running with other settings; `moat stop` it, then apply again".into(),
        });
    }
    let dir = machine_dir(ctx, name);
    std::fs::create_dir_all(&dir).map_err(io_err(name))?;
    let base = base_disk(d, ctx, &m.image).map_err(|e| failed(name, e))?;
    let base_format = disk::info(&base).map_err(|e| failed(name, e))?.format;
    // Keep the disk (the machine's data) when only other settings changed.
    if !p.disk.exists() {
        disk::create_overlay(&base, &base_format, &p.disk).map_err(|e| failed(name, e))?;
    }
    if let Some(size) = m.disk {
        disk::grow(&p.disk, size).map_err(|e| failed(name, e))?;
    }
    let seed = write_seed(spec, &p.seed).map_err(|e| failed(name, e))?;
    let vr = VmRecord {
        base,
        base_format,
        firmware: m.firmware,
        display: m.display,
        usb: m.usb.clone(),
        template: m.template,
        seed: Some(
            match seed {
                SeedFormat::Iso => "iso",
                SeedFormat::Vfat => "vfat",
            }
            .into(),
        ),
    };
    write_vm_record(ctx, name, &vr).map_err(|e| failed(name, e))?;
    crate::write_record(ctx, &Record::from_spec(spec))
}

/// KVM when asked for, or with `auto` when the microVM probe (accel.rs, cached
/// per host boot in `<run_dir>/qemu/accel`) found that KVM guests run; TCG otherwise.
fn resolve_accel(a: moat_core::model::Accel, run_dir: &Path) -> Accel {
    match a {
        moat_core::model::Accel::Kvm => Accel::Kvm,
        moat_core::model::Accel::Tcg => Accel::Tcg,
        moat_core::model::Accel::Auto => {
            let boot =
                std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
            let cached =
                std::fs::read_to_string(run_dir.join("qemu").join("accel")).unwrap_or_default();
            if cached.trim() == format!("{} kvm", boot.trim()) {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
    }
}

/// The launch settings of a created VM.
pub fn launch_of(ctx: &Ctx, rec: &Record, vr: &VmRecord) -> VmLaunch {
    let seed = match vr.seed.as_deref() {
        Some("iso") => Some(SeedFormat::Iso),
        Some("vfat") => Some(SeedFormat::Vfat),
        _ => None,
    };
    VmLaunch {
        name: rec.full_name.clone(),
        memory_mib: rec.memory_mib(),
        cpus: rec.cpus.unwrap_or(1),
        accel: resolve_accel(rec.accel, &ctx.run_dir),
        firmware: vr.firmware,
        ovmf_code: PathBuf::from(OVMF_CODE),
        paths: paths(ctx, &rec.full_name),
        seed,
        display: vr.display,
        usb: vr.usb.clone(),
        nic: rec
            .nic
            .as_ref()
            .map(|n| (n.host_if.clone(), n.mac_string())),
    }
}

pub fn start(d: &QemuDriver, ctx: &Ctx, rec: &Record) -> Result<()> {
    let name = rec.full_name.as_str();
    let p = paths(ctx, name);
    if qemu_pid(&p.pid).is_some() {
        return Ok(());
    }
    let vr = read_vm_record(ctx, name).ok_or_else(|| DriverError::Failed {
        machine: name.into(),
        message: format!(
            "{} is missing; destroy the machine and apply again",
            p.record.display()
        ),
    })?;
    if vr.template {
        return Err(DriverError::Failed {
            machine: name.into(),
            message: format!(
                "is a template (never started); `moat clone {name} NEW` makes a VM from it"
            ),
        });
    }
    // A disposable VM always starts from a fresh overlay; a lost one is recreated.
    if field::<bool>(rec, "disposable") || rec.disposable || !p.disk.exists() {
        let _ = std::fs::remove_file(&p.disk);
        disk::create_overlay(&vr.base, &vr.base_format, &p.disk).map_err(|e| failed(name, e))?;
        if let Some(size) = rec.disk {
            disk::grow(&p.disk, size).map_err(|e| failed(name, e))?;
        }
    }
    if vr.firmware == Firmware::Uefi && !p.vars.exists() {
        std::fs::copy(OVMF_VARS, &p.vars).map_err(|e| {
            failed(
                name,
                QemuError::Failed(format!(
                    "copying {OVMF_VARS}: {e}; apt-get install ovmf for firmware: uefi"
                )),
            )
        })?;
    }
    let rd = run_dir(ctx, name);
    std::fs::create_dir_all(&rd).map_err(io_err(name))?;
    for f in [&p.qmp, &p.console_sock, &p.spice, &p.pid] {
        let _ = std::fs::remove_file(f);
    }
    if let Some(n) = &rec.nic {
        let nic = ResolvedNic {
            machine: name.into(),
            ip: n.ip,
            mac: n.mac,
            host_if: n.host_if.clone(),
        };
        let net = ResolvedNetwork {
            domain: n.domain.clone(),
            subnet: ipnet_of(n.gateway, n.prefix_len),
            gateway: n.gateway,
            bridge: n.bridge.clone(),
        };
        d.net
            .attach_tap(&nic, &net, &d.alias)
            .map_err(|e| failed(name, QemuError::Failed(format!("creating the tap: {e}"))))?;
    }
    let launch = launch_of(ctx, rec, &vr);
    let args = command_line(&launch);
    // Least privilege: QEMU opens disks, sockets and the tap as root, then drops to
    // moat-qemu (`-run-with user=`) before the guest runs. Its files are moat-qemu's so
    // what it creates later (screendumps in the run folder) works; root still reaches
    // the sockets. The cgroup is joined before exec, so QEMU is in it.
    let (uid, gid) = crate::microvm::qemu_user().map_err(|e| failed(name, e))?;
    let mdir = machine_dir(ctx, name);
    for f in [&mdir, &rd, &p.disk, &p.seed, &p.vars, &p.console_log] {
        if f.exists() {
            crate::microvm::chown(f, uid, gid);
        }
    }
    let procs = crate::microvm::cgroup(ctx, rec);
    let procs_fd = procs
        .as_ref()
        .and_then(|p| std::fs::OpenOptions::new().write(true).open(p).ok());
    let procs_raw = procs_fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let err_file = rd.join("qemu.err");
    let stderr = std::fs::File::create(&err_file).map_err(io_err(name))?;
    let mut cmd = Command::new(QEMU);
    cmd.args(&args)
        .arg("-run-with")
        .arg(format!("user={uid}:{gid}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    // SAFETY: only write(2) and setsid(2), async-signal-safe, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if let Some(fd) = procs_raw {
                libc::write(fd, b"0".as_ptr().cast(), 1);
            }
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        failed(
            name,
            QemuError::Failed(format!(
                "cannot run {QEMU}: {e}; apt-get install qemu-system-x86"
            )),
        )
    })?;
    // Started once QEMU runs as moat-qemu (it drops after initialising the
    // machine, pid file and monitor); an exit first is a failure, with
    // QEMU's own message.
    let t = std::time::Instant::now();
    let dropped = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .map(|ids| ids.split_whitespace().all(|x| x == uid.to_string()))
            })
            .unwrap_or(false)
    };
    let started = loop {
        if let Ok(Some(_)) = child.try_wait() {
            break false;
        }
        if p.qmp.exists() && qemu_pid(&p.pid).is_some_and(dropped) {
            break true;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if !started {
        crate::microvm::remove_cgroup(ctx, name);
        return Err(failed(
            name,
            QemuError::Command {
                what: "starting the VM".into(),
                cmd: format!("{QEMU} {}", args.join(" ")),
                stderr: std::fs::read_to_string(&err_file)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            },
        ));
    }
    // Reaped by a thread while this process lives, by init after.
    std::thread::spawn(move || child.wait());
    Ok(())
}

fn ipnet_of(gw: std::net::Ipv4Addr, prefix: u8) -> ipnet::Ipv4Net {
    ipnet::Ipv4Net::new(gw, prefix)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| ipnet::Ipv4Net::from(gw))
}

fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    stat.rsplit(')')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .is_some_and(|st| st != "Z")
}

fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !alive(pid)
}

/// How a VM stop went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    NotRunning,
    /// The guest shut down after the ACPI power button.
    Graceful,
    /// QMP `quit` after the timeout.
    Quit,
    /// SIGKILL.
    Killed,
}

/// Stops the VM's QEMU: ACPI power button, then `quit`, then SIGKILL.
pub fn shut_down(
    ctx: &Ctx,
    name: &str,
    timeout: Duration,
) -> std::result::Result<StopOutcome, QemuError> {
    let p = paths(ctx, name);
    let Some(pid) = qemu_pid(&p.pid) else {
        return Ok(StopOutcome::NotRunning);
    };
    let qmp = Qmp::connect(&p.qmp, Duration::from_secs(5));
    if let Ok(mut q) = qmp {
        if !timeout.is_zero() && q.system_powerdown().is_ok() && wait_gone(pid, timeout) {
            return Ok(StopOutcome::Graceful);
        }
        let _ = q.quit();
        if wait_gone(pid, Duration::from_secs(3)) {
            return Ok(StopOutcome::Quit);
        }
    }
    // SAFETY: kill(2) with a pid we read from QEMU's pid file and checked is QEMU.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid, Duration::from_secs(5));
    Ok(StopOutcome::Killed)
}

/// After QEMU is gone: drop a disposable overlay, remove run-time files and the tap.
fn after_stop(d: &QemuDriver, ctx: &Ctx, rec: &Record) {
    let p = paths(ctx, &rec.full_name);
    if rec.disposable {
        let _ = std::fs::remove_file(&p.disk);
    }
    for f in [&p.qmp, &p.console_sock, &p.spice, &p.pid] {
        let _ = std::fs::remove_file(f);
    }
    if let Some(n) = &rec.nic {
        let _ = d.net.detach(&n.host_if);
    }
    crate::microvm::remove_cgroup(ctx, &rec.full_name);
}

pub fn stop(d: &QemuDriver, ctx: &Ctx, rec: &Record, timeout: Duration) -> Result<()> {
    shut_down(ctx, &rec.full_name, timeout).map_err(|e| failed(&rec.full_name, e))?;
    after_stop(d, ctx, rec);
    Ok(())
}

pub fn destroy(d: &QemuDriver, ctx: &Ctx, rec: &Record) -> Result<()> {
    let name = rec.full_name.as_str();
    shut_down(ctx, name, Duration::ZERO).map_err(|e| failed(name, e))?;
    after_stop(d, ctx, rec);
    let _ = std::fs::remove_dir_all(run_dir(ctx, name));
    std::fs::remove_dir_all(machine_dir(ctx, name))
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(io_err(name))?;
    gc(ctx).map_err(|e| failed(name, e))?;
    Ok(())
}

/// Removes frozen disk layers no VM of this root uses any more.
pub fn gc(ctx: &Ctx) -> std::result::Result<usize, QemuError> {
    let mut disks = vec![];
    if let Ok(rd) = std::fs::read_dir(ctx.root.join("qemu")) {
        for e in rd.flatten() {
            disks.push(e.path().join("disk.qcow2"));
            if let Some(vr) = read_vm_record(ctx, &e.file_name().to_string_lossy()) {
                disks.push(vr.base);
            }
        }
    }
    disk::gc_layers(&ctx.root, &disks)
}

pub fn state(_d: &QemuDriver, ctx: &Ctx, rec: &Record) -> MachineState {
    if qemu_pid(&paths(ctx, &rec.full_name).pid).is_some() {
        MachineState::Running
    } else {
        MachineState::Stopped
    }
}

pub fn exec(_d: &QemuDriver, _ctx: &Ctx, rec: &Record, _argv: &[String]) -> Result<ExecOutput> {
    Err(DriverError::Unsupported {
        driver: "qemu".into(),
        what: format!(
            "exec into full VMs ({}): there is no guest agent; use `moat console {}` or ssh",
            rec.full_name, rec.full_name
        ),
    })
}

fn vm_record_of(ctx: &Ctx, name: &str) -> Result<(Record, VmRecord)> {
    let rec = crate::read_record(ctx, name)?.ok_or_else(|| DriverError::NoSuchMachine {
        machine: name.into(),
    })?;
    let vr = read_vm_record(ctx, name).ok_or_else(|| DriverError::Failed {
        machine: name.into(),
        message: "is not a full VM (no vm.json)".into(),
    })?;
    Ok((rec, vr))
}

/// Whether `name` is a full VM of the qemu driver in this root.
pub fn is_vm(ctx: &Ctx, name: &str) -> bool {
    read_vm_record(ctx, name).is_some()
}

/// Whether the VM's QEMU runs.
pub fn is_running(ctx: &Ctx, name: &str) -> bool {
    qemu_pid(&paths(ctx, name).pid).is_some()
}

/// `moat clone SRC NEW` for a stopped VM, in constant time: SRC's overlay is
/// frozen into a read-only layer and both get a fresh overlay on it. NEW has
/// no network (like container clones) and keeps SRC's settings and seed.
pub fn clone_vm(ctx: &Ctx, src: &str, new: &str) -> Result<()> {
    let (rec, vr) = vm_record_of(ctx, src)?;
    if is_running(ctx, src) {
        return Err(DriverError::Failed {
            machine: src.into(),
            message: format!("is running; `moat stop {src}` first, then clone it"),
        });
    }
    if crate::read_record(ctx, new)?.is_some() {
        return Err(DriverError::Failed {
            machine: new.into(),
            message: "already exists; pick another name".into(),
        });
    }
    let sp = paths(ctx, src);
    let np = paths(ctx, new);
    // A disposable source has no overlay between runs: clone its base.
    let layer = if sp.disk.exists() && !rec.disposable {
        disk::freeze(&ctx.root, &sp.disk).map_err(|e| failed(src, e))?
    } else {
        vr.base.clone()
    };
    let layer_format = if layer == vr.base {
        vr.base_format.clone()
    } else {
        "qcow2".to_string()
    };
    std::fs::create_dir_all(machine_dir(ctx, new)).map_err(io_err(new))?;
    disk::create_overlay(&layer, &layer_format, &np.disk).map_err(|e| failed(new, e))?;
    if sp.seed.exists() {
        std::fs::copy(&sp.seed, &np.seed).map_err(io_err(new))?;
    }
    if sp.vars.exists() {
        std::fs::copy(&sp.vars, &np.vars).map_err(io_err(new))?;
    }
    // The source now runs on the frozen layer too.
    if layer != vr.base {
        let mut svr = vr.clone();
        svr.base = layer.clone();
        svr.base_format = "qcow2".into();
        write_vm_record(ctx, src, &svr).map_err(|e| failed(src, e))?;
    }
    let nvr = VmRecord {
        base: layer,
        base_format: layer_format,
        template: false,
        ..vr
    };
    write_vm_record(ctx, new, &nvr).map_err(|e| failed(new, e))?;
    let mut nrec = rec;
    nrec.full_name = new.into();
    nrec.nic = None;
    nrec.disposable = false;
    nrec.spec_hash = format!("clone-of-{src}");
    if let Some(o) = nrec.machine.as_object_mut() {
        o.insert("full_name".into(), new.into());
        o.insert("name".into(), new.into());
        o.insert("template".into(), false.into());
        o.insert("disposable".into(), false.into());
        o.insert("network".into(), "none".into());
    }
    crate::write_record(ctx, &nrec)
}

/// A VM snapshot, as `moat snapshot ls` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VmSnapshot {
    pub name: String,
    pub created: u64,
    /// Includes the running state (RAM, devices): taken while the VM ran.
    pub with_memory: bool,
}

fn check_snapshot_name(name: &str) -> std::result::Result<(), QemuError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(QemuError::Failed(format!(
            "snapshot name '{name}' may only hold letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

fn snapshot_target(ctx: &Ctx, name: &str) -> Result<(Record, VmPaths)> {
    let (rec, _) = vm_record_of(ctx, name)?;
    if rec.disposable {
        return Err(DriverError::Failed {
            machine: name.into(),
            message: "is disposable: its disk is discarded at every stop, snapshots make no sense"
                .into(),
        });
    }
    Ok((rec, paths(ctx, name)))
}

fn qmp(p: &VmPaths) -> std::result::Result<Qmp, QemuError> {
    Qmp::connect(&p.qmp, Duration::from_secs(600)).map_err(|e| QemuError::Failed(e.to_string()))
}

/// Snapshot of a VM: of the disk when stopped (`qemu-img snapshot`), of the
/// whole running machine when running (QMP/HMP `savevm`).
pub fn snapshot_create(ctx: &Ctx, name: &str, snap: &str) -> Result<VmSnapshot> {
    let (_, p) = snapshot_target(ctx, name)?;
    check_snapshot_name(snap).map_err(|e| failed(name, e))?;
    if snapshots(ctx, name)?.iter().any(|s| s.name == snap) {
        return Err(failed(
            name,
            QemuError::Failed(format!(
                "already has a snapshot '{snap}'; pick another name"
            )),
        ));
    }
    if is_running(ctx, name) {
        qmp(&p)
            .and_then(|mut q| q.savevm(snap).map_err(|e| QemuError::Failed(e.to_string())))
            .map_err(|e| failed(name, e))?;
    } else {
        disk::snapshot_create(&p.disk, snap).map_err(|e| failed(name, e))?;
    }
    snapshots(ctx, name)?
        .into_iter()
        .find(|s| s.name == snap)
        .ok_or_else(|| {
            failed(
                name,
                QemuError::Failed("the snapshot was not recorded".into()),
            )
        })
}

pub fn snapshots(ctx: &Ctx, name: &str) -> Result<Vec<VmSnapshot>> {
    let (_, p) = snapshot_target(ctx, name)?;
    Ok(disk::snapshots(&p.disk)
        .map_err(|e| failed(name, e))?
        .into_iter()
        .map(|s| VmSnapshot {
            name: s.name,
            created: s.date_sec,
            with_memory: s.vm_state_size > 0,
        })
        .collect())
}

/// Back to a snapshot: `loadvm` while running, the disk only when stopped.
pub fn snapshot_restore(ctx: &Ctx, name: &str, snap: &str) -> Result<()> {
    let (_, p) = snapshot_target(ctx, name)?;
    if is_running(ctx, name) {
        qmp(&p)
            .and_then(|mut q| q.loadvm(snap).map_err(|e| QemuError::Failed(e.to_string())))
            .map_err(|e| failed(name, e))
    } else {
        disk::snapshot_apply(&p.disk, snap).map_err(|e| failed(name, e))
    }
}

pub fn snapshot_remove(ctx: &Ctx, name: &str, snap: &str) -> Result<()> {
    let (_, p) = snapshot_target(ctx, name)?;
    if is_running(ctx, name) {
        qmp(&p)
            .and_then(|mut q| q.delvm(snap).map_err(|e| QemuError::Failed(e.to_string())))
            .map_err(|e| failed(name, e))
    } else {
        disk::snapshot_delete(&p.disk, snap).map_err(|e| failed(name, e))
    }
}

/// Saves the VM's screen as a PNG at `out` (through a file in the run folder,
/// which QEMU can write).
pub fn screendump(ctx: &Ctx, name: &str, out: &Path) -> Result<()> {
    let p = paths(ctx, name);
    let tmp = run_dir(ctx, name).join("screen.png");
    let _ = std::fs::remove_file(&tmp);
    let mut q = qmp(&p).map_err(|e| failed(name, e))?;
    q.screendump_png(&tmp)
        .map_err(|e| failed(name, QemuError::Failed(e.to_string())))?;
    std::fs::copy(&tmp, out).map_err(io_err(name))?;
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> VmLaunch {
        let ctx = Ctx {
            root: "/r".into(),
            run_dir: "/run/m".into(),
            root_tag: "t".into(),
        };
        VmLaunch {
            name: "lab-vm".into(),
            memory_mib: 512,
            cpus: 2,
            accel: Accel::Tcg,
            firmware: Firmware::Bios,
            ovmf_code: OVMF_CODE.into(),
            paths: paths(&ctx, "lab-vm"),
            seed: Some(SeedFormat::Iso),
            display: Display::None,
            usb: vec![],
            nic: Some(("mvt-3".into(), "52:54:00:00:00:03".into())),
        }
    }

    fn joined(l: &VmLaunch) -> String {
        command_line(l).join(" ")
    }

    #[test]
    fn bios_vm_command_line() {
        let c = joined(&launch());
        assert!(c.contains("-machine q35 -accel tcg,tb-size=64 -cpu max -smp 2 -m 512M"));
        assert!(!c.contains("pflash"));
        assert!(c.contains("file=/r/qemu/lab-vm/disk.qcow2,format=qcow2"));
        assert!(c.contains("virtio-blk-pci,drive=disk0,bootindex=1"));
        assert!(c.contains("-device pcie-root-port,id=hotplug0,chassis=1"));
        assert!(c.contains("file=/r/qemu/lab-vm/seed.iso,format=raw,media=cdrom,readonly=on"));
        assert!(c.contains("logfile=/r/qemu/lab-vm/console.log"));
        assert!(c.contains("-qmp unix:/run/m/qemu/lab-vm/qmp.sock,server=on,wait=off"));
        assert!(c.contains("tap,id=net0,ifname=mvt-3,script=no,downscript=no"));
        assert!(c.contains("virtio-net-pci,netdev=net0,mac=52:54:00:00:00:03"));
        assert!(c.contains("-device VGA"));
        assert!(c.contains(
            "-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny -pidfile /run/m/qemu/lab-vm/qemu.pid"
        ));
        assert!(!c.contains("-daemonize"));
        assert!(!c.contains("spice") && !c.contains("xhci"));
    }

    #[test]
    fn uefi_spice_usb_kvm() {
        let mut l = launch();
        l.firmware = Firmware::Uefi;
        l.display = Display::Spice;
        l.accel = Accel::Kvm;
        l.usb = vec![
            UsbDevice {
                vendor: "046D".into(),
                product: "0xc52b".into(),
            },
            UsbDevice {
                vendor: "zz".into(),
                product: "1".into(),
            },
        ];
        l.seed = Some(SeedFormat::Vfat);
        l.nic = None;
        let c = joined(&l);
        assert!(c.contains("-accel kvm -cpu host"));
        assert!(c.contains(&format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
        )));
        assert!(c.contains("if=pflash,format=raw,unit=1,file=/r/qemu/lab-vm/OVMF_VARS.fd"));
        assert!(c.contains("-device qxl-vga -spice unix=on,addr=/run/m/qemu/lab-vm/spice.sock,disable-ticketing=on"));
        assert!(c.contains("-device qemu-xhci,id=xhci -device usb-host,bus=xhci.0,vendorid=0x046d,productid=0xc52b"));
        // The invalid id is left out rather than passed to QEMU.
        assert_eq!(c.matches("usb-host").count(), 1);
        assert!(c.contains("id=seed,file=/r/qemu/lab-vm/seed.iso,format=raw,readonly=on -device virtio-blk-pci,drive=seed"));
        assert!(!c.contains("netdev"));
    }

    #[test]
    fn usb_ids() {
        assert_eq!(usb_id("046d").as_deref(), Some("0x046d"));
        assert_eq!(usb_id("0XC52B").as_deref(), Some("0xc52b"));
        assert_eq!(usb_id("12345"), None);
        assert_eq!(usb_id(""), None);
    }
}
