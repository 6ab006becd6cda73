//! The `qemu` driver: runs `type: microvm` machines (`-M microvm`, direct
//! kernel boot, moat's own init in the initramfs; [`microvm`]) and `type: vm`
//! machines (q35 with BIOS/UEFI; [`vm`]).
//!
//! Data flow: `create` writes a [`Record`] (what the machine is, its NIC,
//! its spec hash) to `<root>/qemu/<machine>/record.json` and lets the
//! machine-type module prepare disks; `start`/`stop`/`destroy`/`exec` read the
//! record back and dispatch on its kind. Run-time files (pid file, sockets,
//! serial log) live in `<run_dir>/qemu/<machine>/`. QEMU runs detached
//! (its own session, `-pidfile`), as the unprivileged `moat-qemu` user, so it
//! outlives the CLI; liveness is the pid file plus `/proc/<pid>`.

pub mod accel;
pub mod disk;
pub mod guest;
pub mod initramfs;
pub mod kernel;
pub mod microvm;
pub mod qmp;
pub mod seed;
pub mod vm;
pub mod vmimage;

use moat_core::model::{Accel, MachineType};
use moat_core::observed::{Limits, MachineState, ObservedMachine};
use moat_driver::{Capabilities, Ctx, Driver, DriverError, ExecOutput, MachineSpec, Probe, Result};
use moat_host::exec::HostExecutor;
use moat_image::ImageStore;
use moat_net::NetHost;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The QEMU system emulator moat runs.
pub const QEMU: &str = "qemu-system-x86_64";
/// The unprivileged user QEMU runs as (created on first use).
pub const QEMU_USER: &str = "moat-qemu";

/// Errors of the qemu driver's helpers (kernels, initramfs, QEMU processes).
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: `{cmd}` failed: {stderr}")]
    Command {
        what: String,
        cmd: String,
        stderr: String,
    },
    #[error("{0}")]
    Failed(String),
}

impl QemuError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
        let what = what.into();
        move |source| QemuError::Io { what, source }
    }

    /// As a driver error for `machine`.
    pub fn on(self, machine: &str) -> DriverError {
        DriverError::Failed {
            machine: machine.into(),
            message: self.to_string(),
        }
    }
}

/// The machine's NIC as the driver keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicRecord {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// Host-side tap name.
    pub host_if: String,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    pub domain: String,
}

impl NicRecord {
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// What `create` recorded about a machine; read back by every other call.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub full_name: String,
    pub kind: MachineType,
    pub spec_hash: String,
    pub image: String,
    pub cpus: Option<u32>,
    pub memory: Option<u64>,
    pub disk: Option<u64>,
    pub pids: Option<u32>,
    pub kernel: Option<String>,
    pub accel: Accel,
    pub command: Option<Vec<String>>,
    pub disposable: bool,
    pub nic: Option<NicRecord>,
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// The whole machine as declared (for fields this record does not copy:
    /// firmware, display, usb, cloud_init, ...).
    pub machine: serde_json::Value,
}

impl Record {
    pub fn from_spec(spec: &MachineSpec) -> Record {
        let m = &spec.machine;
        let nic = match (&spec.nic, &spec.bridge) {
            (Some(n), Some(b)) => Some(NicRecord {
                ip: n.ip,
                mac: n.mac,
                host_if: n.host_if.clone(),
                bridge: b.name.clone(),
                gateway: b.gateway,
                prefix_len: b.prefix_len,
                domain: m.domain.clone(),
            }),
            _ => None,
        };
        Record {
            full_name: m.full_name.clone(),
            kind: m.kind,
            spec_hash: spec.spec_hash.clone(),
            image: m.image.clone(),
            cpus: m.cpus,
            memory: m.memory,
            disk: m.disk,
            pids: m.pids,
            kernel: m.kernel.clone(),
            accel: m.accel,
            command: m.command.clone(),
            disposable: m.disposable,
            nic,
            hosts: spec.hosts.clone(),
            machine: serde_json::to_value(m).unwrap_or(serde_json::Value::Null),
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            cpus: self.cpus,
            memory: self.memory,
            pids: self.pids,
        }
    }

    /// Guest memory in MiB (default 128 for microVMs, 512 for VMs).
    pub fn memory_mib(&self) -> u64 {
        match self.memory {
            Some(b) => (b / (1024 * 1024)).max(32),
            None if self.kind == MachineType::Microvm => 128,
            None => 512,
        }
    }
}

/// Persistent per-machine folder: `<root>/qemu/<machine>`.
pub fn machine_dir(ctx: &Ctx, full_name: &str) -> PathBuf {
    ctx.root.join("qemu").join(full_name)
}

/// Run-time per-machine folder: `<run_dir>/qemu/<machine>`.
pub fn run_dir(ctx: &Ctx, full_name: &str) -> PathBuf {
    ctx.run_dir.join("qemu").join(full_name)
}

/// Pid file QEMU writes (`-pidfile`).
pub fn pid_file(ctx: &Ctx, full_name: &str) -> PathBuf {
    run_dir(ctx, full_name).join("qemu.pid")
}

pub fn read_record(ctx: &Ctx, full_name: &str) -> Result<Option<Record>> {
    let path = machine_dir(ctx, full_name).join("record.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DriverError::Io {
                machine: full_name.into(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| DriverError::Failed {
            machine: full_name.into(),
            message: format!(
                "{} is damaged ({e}); destroy the machine and apply again",
                path.display()
            ),
        })
}

pub fn write_record(ctx: &Ctx, rec: &Record) -> Result<()> {
    let dir = machine_dir(ctx, &rec.full_name);
    let io = |source| DriverError::Io {
        machine: rec.full_name.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let text = serde_json::to_string_pretty(rec).map_err(|e| DriverError::Failed {
        machine: rec.full_name.clone(),
        message: e.to_string(),
    })?;
    let tmp = dir.join("record.json.tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, dir.join("record.json")).map_err(io)
}

/// The live QEMU process of a machine, from its pid file (`None` when the
/// file is missing or the process is gone or is not QEMU).
pub fn qemu_pid(pid_file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if !comm.starts_with("qemu") {
        return None;
    }
    // A zombie is not running.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit(')').next()?.split_whitespace().next()?;
    (state != "Z").then_some(pid)
}

/// The driver. Holds the image store (root disks, image configs, kernels)
/// and the network layer (taps on domain bridges).
pub struct QemuDriver {
    pub images: ImageStore,
    pub net: NetHost<HostExecutor>,
    /// Interface alias marking this root's host interfaces.
    pub alias: String,
}

impl QemuDriver {
    pub fn new(images: ImageStore, alias: String) -> QemuDriver {
        QemuDriver {
            images,
            net: NetHost::new(HostExecutor),
            alias,
        }
    }

    fn record(&self, ctx: &Ctx, full_name: &str) -> Result<Record> {
        read_record(ctx, full_name)?.ok_or_else(|| DriverError::NoSuchMachine {
            machine: full_name.into(),
        })
    }

    fn state_of(&self, ctx: &Ctx, rec: &Record) -> MachineState {
        match rec.kind {
            MachineType::Vm => vm::state(self, ctx, rec),
            _ => microvm::state(self, ctx, rec),
        }
    }
}

impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn probe(&self, _ctx: &Ctx) -> Probe {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(QEMU).is_file()))
            .unwrap_or(false);
        if found {
            Probe::Available
        } else {
            Probe::Unavailable {
                reason: format!("{QEMU} is not installed"),
                hint: "install it: apt-get install qemu-system-x86 qemu-utils (or scripts/deps.sh)"
                    .into(),
            }
        }
    }

    fn supports(&self, kind: MachineType) -> bool {
        matches!(kind, MachineType::Vm | MachineType::Microvm)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            exec: true,
            snapshot: false,
            clone: false,
            console: true,
            update_limits: false,
        }
    }

    fn list(&self, ctx: &Ctx) -> Result<Vec<ObservedMachine>> {
        let dir = ctx.root.join("qemu");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => {
                return Err(DriverError::Io {
                    machine: dir.display().to_string(),
                    source,
                })
            }
        };
        let mut out = vec![];
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(m) = self.observe(ctx, &name)? {
                out.push(m);
            }
        }
        out.sort_by(|a, b| a.full_name.cmp(&b.full_name));
        Ok(out)
    }

    fn observe(&self, ctx: &Ctx, full_name: &str) -> Result<Option<ObservedMachine>> {
        let Some(rec) = read_record(ctx, full_name)? else {
            return Ok(None);
        };
        Ok(Some(ObservedMachine {
            full_name: rec.full_name.clone(),
            driver: "qemu".into(),
            state: self.state_of(ctx, &rec),
            spec_hash: rec.spec_hash.clone(),
            limits: rec.limits(),
            adhoc: false,
        }))
    }

    fn create(&self, ctx: &Ctx, spec: &MachineSpec) -> Result<()> {
        match spec.machine.kind {
            MachineType::Vm => vm::create(self, ctx, spec),
            MachineType::Microvm => microvm::create(self, ctx, spec),
            MachineType::Container => Err(DriverError::Unsupported {
                driver: "qemu".into(),
                what: format!(
                    "containers ({}); use `driver: native` or `type: microvm`",
                    spec.machine.full_name
                ),
            }),
        }
    }

    fn start(&self, ctx: &Ctx, full_name: &str) -> Result<()> {
        let rec = self.record(ctx, full_name)?;
        match rec.kind {
            MachineType::Vm => vm::start(self, ctx, &rec),
            _ => microvm::start(self, ctx, &rec),
        }
    }

    fn stop(&self, ctx: &Ctx, full_name: &str, timeout: Duration) -> Result<()> {
        let rec = self.record(ctx, full_name)?;
        match rec.kind {
            MachineType::Vm => vm::stop(self, ctx, &rec, timeout),
            _ => microvm::stop(self, ctx, &rec, timeout),
        }
    }

    fn destroy(&self, ctx: &Ctx, full_name: &str) -> Result<()> {
        let Some(rec) = read_record(ctx, full_name)? else {
            return Ok(());
        };
        match rec.kind {
            MachineType::Vm => vm::destroy(self, ctx, &rec),
            _ => microvm::destroy(self, ctx, &rec),
        }
    }

    fn exec(&self, ctx: &Ctx, full_name: &str, argv: &[String]) -> Result<ExecOutput> {
        let rec = self.record(ctx, full_name)?;
        match rec.kind {
            MachineType::Vm => vm::exec(self, ctx, &rec, argv),
            _ => microvm::exec(self, ctx, &rec, argv),
        }
    }
}
