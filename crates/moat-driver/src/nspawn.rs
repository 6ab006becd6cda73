//! The `nspawn` driver: machines run by systemd-nspawn.
//!
//! Two ways to run nspawn, chosen per machine at create time:
//! - **moat supervision** (hosts without systemd as PID 1, like this one):
//!   `moat-supervisor` runs `systemd-nspawn --register=no --keep-unit` as a
//!   host process. Before exec the process writes itself into the machine's
//!   cgroups (`/moat-<tag>/<name>`, limits written by [`cgroup`]) and, for
//!   `network: domain`, enters a network namespace moat prepared and wired
//!   to the domain bridge. Logs, exit status and restart policy are the
//!   supervisor's, exactly as for the native driver.
//! - **systemd** (the host runs systemd): a transient service
//!   (`systemd-run … systemd-nspawn --register=yes --keep-unit`) with the
//!   limits as unit properties, registered with machined. Not exercised on
//!   the project's test host (no systemd there).
//!
//! ```text
//! create: image store → rootfs (MachineFs) ; nspawn.json (argv, ids, NIC)
//! start:  remount rootfs → /etc/hosts, resolv.conf → cgroups + limits
//!         → netns file + NIC (domain) → supervisor runs nspawn
//!         → wait for the container's PID 1 → mask /proc entries
//! stop:   supervisor: SIGTERM to nspawn (nspawn sends SIGRTMIN+3 to a
//!         booted init, SIGTERM to a command) → timeout → SIGKILL
//!         → kill leftovers in the cgroups → remove cgroups, netns
//! ```
//!
//! Per-machine files live in `<root>/machines/<full_name>/` like the native
//! driver's (so `moat logs` finds `logs/stdout.log`), with `nspawn.json` in
//! place of `native.json`; the root file system is the image store's
//! [`moat_image::MachineFs`] (its mount point is `PreparedRootfs::path`),
//! so snapshots and clones work the same way.

pub mod args;
pub mod cgroup;
mod mask;
mod session;
mod shift;

use crate::native::{PreparedRootfs, RootfsProvider};
use crate::{
    BridgeInfo, Capabilities, Ctx, Driver, DriverError, ExecOutput, MachineSpec, Probe, Result,
};
use args::{Plan, Supervision};
use moat_core::model::{MachineType, NetworkMode, ResolvedNic};
use moat_core::observed::{Limits, MachineState as ObsState, ObservedMachine};
use moat_runtime::machine::{self, MachineDir, MachineState};
use moat_runtime::{ContainerSpec, HostProcess, IdRange, SupervisorConfig};
use serde::{Deserialize, Serialize};
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Wires a machine's NIC into a network namespace file (the engine's network
/// layer implements this: veth on the domain bridge, address, route, rules).
pub trait NetnsAttacher: Send + Sync {
    fn attach_netns(
        &self,
        ctx: &Ctx,
        domain: &str,
        nic: &ResolvedNic,
        bridge: &BridgeInfo,
        netns: &Path,
    ) -> std::result::Result<(), String>;
}

/// The NIC as recorded (ResolvedNic and BridgeInfo are not serializable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicRecord {
    pub host_if: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
}

/// What the driver records at create time (`nspawn.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NspawnRecord {
    pub spec_hash: String,
    pub id_number: u32,
    /// Host id that root inside maps to (`None`: no user namespace).
    pub id_base: Option<u32>,
    /// The root is on overlayfs: moat shifts its ownership before start.
    #[serde(default)]
    pub moat_shifts: bool,
    pub domain: String,
    /// `domain`, `host` or `none`.
    pub network: String,
    pub nic: Option<NicRecord>,
    /// `-b`: the image's init runs (system container).
    pub boot: bool,
    /// The root file system's mount point (image store MachineFs).
    pub rootfs: PathBuf,
    pub read_only: bool,
    /// `/moat-<tag>/<name>`.
    pub cgroup: String,
    pub limits: Limits,
    /// `systemd` when a transient unit runs it, else `moat`.
    pub supervision: String,
    /// The nspawn command line.
    pub argv: Vec<String>,
    pub restart: moat_core::model::RestartPolicy,
    /// Contents for /etc/hosts and /etc/resolv.conf, written at every start.
    pub etc_hosts: String,
    pub resolv_conf: Option<String>,
}

/// What `status` shows about one nspawn machine beyond the common fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NspawnDetails {
    pub network: String,
    pub boot: bool,
    pub supervision: String,
    pub leader: Option<i32>,
    /// /proc entries masked by moat in the running container.
    pub masked: Vec<String>,
    /// /proc entries that should be masked and are not (a gap to report).
    pub unmasked: Vec<String>,
}

pub struct NspawnDriver {
    rootfs: Arc<dyn RootfsProvider>,
    network: Option<Arc<dyn NetnsAttacher>>,
    supervisor: Option<PathBuf>,
    /// systemd-nspawn, looked up on PATH at first use (not when the driver
    /// is made: every `moat` command makes one).
    nspawn: std::sync::OnceLock<PathBuf>,
    stop_timeout: Duration,
    /// Forces a supervision mode (tests); `None` detects.
    force: Option<Supervision>,
}

/// How long a start may take until the container's PID 1 runs.
const START_TIMEOUT_S: u64 = 180;

fn failed(machine: &str, message: impl Into<String>) -> DriverError {
    DriverError::Failed {
        machine: machine.into(),
        message: message.into(),
    }
}

fn io_err(machine: &str) -> impl Fn(std::io::Error) -> DriverError + '_ {
    move |e| DriverError::Io {
        machine: machine.into(),
        source: e,
    }
}

fn rt(machine: &str) -> impl Fn(moat_runtime::RuntimeError) -> DriverError + '_ {
    move |e| failed(machine, e.to_string())
}

/// Does the host run systemd as its service manager?
pub fn host_runs_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Finds a program on PATH.
fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

impl NspawnDriver {
    pub fn new(rootfs: Arc<dyn RootfsProvider>) -> Self {
        NspawnDriver {
            rootfs,
            network: None,
            supervisor: None,
            nspawn: std::sync::OnceLock::new(),
            stop_timeout: Duration::from_secs(10),
            force: None,
        }
    }

    fn nspawn(&self) -> &PathBuf {
        self.nspawn.get_or_init(|| {
            which("systemd-nspawn").unwrap_or_else(|| "/usr/bin/systemd-nspawn".into())
        })
    }

    pub fn with_network(mut self, attacher: Arc<dyn NetnsAttacher>) -> Self {
        self.network = Some(attacher);
        self
    }

    /// Path of `moat-supervisor` (default: [`machine::find_supervisor`]).
    pub fn with_supervisor(mut self, path: PathBuf) -> Self {
        self.supervisor = Some(path);
        self
    }

    /// Grace period of a stop before SIGKILL (default 10 s).
    pub fn with_stop_timeout(mut self, t: Duration) -> Self {
        self.stop_timeout = t;
        self
    }

    /// Always use moat's own supervision, even on a systemd host.
    pub fn with_moat_supervision(mut self) -> Self {
        self.force = Some(Supervision::Moat);
        self
    }

    /// The machine's folder (same layout as the native driver's).
    pub fn machine_dir(ctx: &Ctx, full_name: &str) -> MachineDir {
        MachineDir::new(ctx.root.join("machines").join(full_name))
    }

    /// The recorded settings of an nspawn machine, `None` when it is not one.
    pub fn record(ctx: &Ctx, full_name: &str) -> Option<NspawnRecord> {
        Self::read_record(&Self::machine_dir(ctx, full_name))
    }

    fn read_record(dir: &MachineDir) -> Option<NspawnRecord> {
        serde_json::from_slice(&fs::read(dir.dir.join("nspawn.json")).ok()?).ok()
    }

    fn netns_path(dir: &MachineDir) -> PathBuf {
        dir.dir.join("netns")
    }

    fn unit_name(ctx: &Ctx, full_name: &str) -> String {
        format!("moat-{}-{}", ctx.root_tag, full_name)
    }

    fn supervision(&self) -> Supervision {
        self.force.unwrap_or(if host_runs_systemd() {
            Supervision::Systemd
        } else {
            Supervision::Moat
        })
    }

    fn supervisor_path(&self, machine: &str) -> Result<PathBuf> {
        match &self.supervisor {
            Some(p) => Ok(p.clone()),
            None => machine::find_supervisor().map_err(rt(machine)),
        }
    }

    fn hierarchies(rec: &NspawnRecord) -> Vec<cgroup::Hierarchy> {
        let mi = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        cgroup::hierarchies(&mi, &rec.cgroup)
    }

    /// The container's PID 1 (nspawn's child) once nspawn has set it up and
    /// exec'd the payload.
    pub fn leader(ctx: &Ctx, full_name: &str) -> Option<i32> {
        let dir = Self::machine_dir(ctx, full_name);
        let rec = Self::read_record(&dir)?;
        let nspawn_pid = if rec.supervision == "systemd" {
            systemd_main_pid(&Self::unit_name(ctx, full_name))?
        } else {
            match dir.state() {
                MachineState::Running { pid } => pid,
                _ => return None,
            }
        };
        leader_of(nspawn_pid)
    }

    /// Details for `status` (network mode, boot, masking).
    pub fn details(ctx: &Ctx, full_name: &str) -> Option<NspawnDetails> {
        let rec = Self::record(ctx, full_name)?;
        let leader = Self::leader(ctx, full_name);
        let (masked, unmasked) = match leader {
            Some(pid) => mask::check(pid),
            None => (vec![], vec![]),
        };
        Some(NspawnDetails {
            network: rec.network,
            boot: rec.boot,
            supervision: rec.supervision,
            leader,
            masked,
            unmasked,
        })
    }

    fn write_etc(name: &str, rec: &NspawnRecord) -> Result<()> {
        let etc = rec.rootfs.join("etc");
        if !etc.is_dir() {
            return Ok(());
        }
        // Replace (not write through) a symlink such as resolv.conf →
        // ../run/systemd/resolve/stub-resolv.conf, which would point at the host.
        let put = |file: &str, text: &str| -> Result<()> {
            let p = etc.join(file);
            if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                fs::remove_file(&p).map_err(io_err(name))?;
            }
            fs::write(&p, text).map_err(io_err(name))
        };
        put("hosts", &rec.etc_hosts)?;
        if let Some(r) = &rec.resolv_conf {
            put("resolv.conf", r)?;
        }
        Ok(())
    }

    /// Creates the netns file (if missing) and wires the NIC into it.
    fn prepare_netns(&self, ctx: &Ctx, dir: &MachineDir, rec: &NspawnRecord) -> Result<PathBuf> {
        let name = dir
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = Self::netns_path(dir);
        if !is_nsfs_mount(&path) {
            fs::write(&path, b"").map_err(io_err(&name))?;
            run(
                &name,
                Command::new("unshare")
                    .arg(format!("--net={}", path.display()))
                    .arg("true"),
            )?;
        }
        if let (Some(n), Some(net)) = (&rec.nic, &self.network) {
            let nic = ResolvedNic {
                machine: name.clone(),
                ip: n.ip,
                mac: n.mac,
                host_if: n.host_if.clone(),
            };
            let bridge = BridgeInfo {
                name: n.bridge.clone(),
                gateway: n.gateway,
                prefix_len: n.prefix_len,
            };
            net.attach_netns(ctx, &rec.domain, &nic, &bridge, &path)
                .map_err(|e| failed(&name, format!("attaching the NIC: {e}")))?;
        }
        Ok(path)
    }

    fn remove_netns(dir: &MachineDir) {
        let p = Self::netns_path(dir);
        // Unmounting the last reference frees the namespace and the veth in it.
        while is_nsfs_mount(&p) {
            if !Command::new("umount")
                .arg(&p)
                .output()
                .is_ok_and(|o| o.status.success())
            {
                break;
            }
        }
        let _ = fs::remove_file(&p);
    }

    /// After nspawn is gone: kill what is left in the cgroups, remove them,
    /// the netns and nspawn's leftover folder.
    fn cleanup_after(ctx: &Ctx, full_name: &str, dir: &MachineDir) {
        let Some(rec) = Self::read_record(dir) else {
            return;
        };
        if rec.supervision == "moat" {
            let hs = Self::hierarchies(&rec);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let left = cgroup::pids(&hs);
                if left.is_empty() || Instant::now() > deadline {
                    break;
                }
                for pid in left {
                    // SAFETY: kill(2) with a PID read from the machine's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            moat_runtime::cgroups::remove_tree(&rec.cgroup);
        } else {
            let _ = Command::new("systemctl")
                .args(["reset-failed", &Self::unit_name(ctx, full_name)])
                .output();
        }
        Self::remove_netns(dir);
        let _ = fs::remove_dir_all(args::propagate_dir(full_name));
    }

    fn start_moat(
        &self,
        ctx: &Ctx,
        full_name: &str,
        dir: &MachineDir,
        rec: &NspawnRecord,
    ) -> Result<()> {
        let hs = Self::hierarchies(rec);
        let procs = cgroup::prepare(&hs, &rec.limits).map_err(io_err(full_name))?;
        let netns = match rec.network.as_str() {
            "domain" => Some(self.prepare_netns(ctx, dir, rec)?),
            _ => None,
        };
        // The supervisor's config names a container; with `process` set it
        // only carries the name, the rootfs and the id range for display.
        let mut cs = ContainerSpec::new(full_name, &rec.rootfs, rec.argv.clone());
        cs.idmap = Some(IdRange {
            host_id: args::id_base_for(rec.id_number),
            size: args::IDS_PER_MACHINE,
        });
        cs.cgroup = Some(rec.cgroup.clone());
        let mut cfg = SupervisorConfig::new(cs);
        cfg.restart = rec.restart;
        cfg.stop_timeout_ms = self.stop_timeout.as_millis() as u64;
        cfg.process = Some(HostProcess {
            argv: rec.argv.clone(),
            cgroup_procs: procs,
            netns,
            stop_signal: libc::SIGTERM,
        });
        let sup = self.supervisor_path(full_name)?;
        match machine::launch(dir, &cfg, &sup).map_err(rt(full_name))? {
            MachineState::Crashed { reason } => {
                let log = fs::read_to_string(dir.stderr_log()).unwrap_or_default();
                Self::cleanup_after(ctx, full_name, dir);
                Err(failed(
                    full_name,
                    format!(
                        "systemd-nspawn failed: {reason}; its output: {}",
                        log.trim()
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    fn start_systemd(
        &self,
        ctx: &Ctx,
        full_name: &str,
        dir: &MachineDir,
        rec: &NspawnRecord,
    ) -> Result<()> {
        let unit = Self::unit_name(ctx, full_name);
        let mut m = moat_core::model::Machine::adhoc(full_name, "");
        m.memory = rec.limits.memory;
        m.pids = rec.limits.pids;
        m.cpus = rec.limits.cpus;
        let mut argv = args::systemd_run_argv(&unit, &m, rec.argv.clone());
        fs::create_dir_all(dir.logs_dir()).map_err(io_err(full_name))?;
        let mut extra = vec![
            format!(
                "--property=StandardOutput=append:{}",
                dir.stdout_log().display()
            ),
            format!(
                "--property=StandardError=append:{}",
                dir.stderr_log().display()
            ),
            format!(
                "--property=TimeoutStopSec={}",
                self.stop_timeout.as_secs().max(1)
            ),
        ];
        if rec.network == "domain" {
            let ns = self.prepare_netns(ctx, dir, rec)?;
            extra.push(format!("--property=NetworkNamespacePath={}", ns.display()));
        }
        argv.splice(1..1, extra);
        run(full_name, Command::new(&argv[0]).args(&argv[1..]))?;
        Ok(())
    }

    fn observe_state(ctx: &Ctx, full_name: &str, dir: &MachineDir, rec: &NspawnRecord) -> ObsState {
        if rec.supervision == "systemd" {
            let unit = Self::unit_name(ctx, full_name);
            let out = Command::new("systemctl")
                .args(["is-active", &unit])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            return match out.as_str() {
                "active" | "activating" | "deactivating" | "reloading" => ObsState::Running,
                "failed" => ObsState::Crashed {
                    reason: format!("unit {unit} failed; see `journalctl -u {unit}`"),
                },
                _ => ObsState::Stopped,
            };
        }
        match dir.state() {
            MachineState::Running { .. }
            | MachineState::Created { .. }
            | MachineState::Restarting { .. } => ObsState::Running,
            MachineState::Absent | MachineState::Stopped { .. } => ObsState::Stopped,
            MachineState::Crashed { reason } => ObsState::Crashed { reason },
        }
    }

    /// A command that runs `argv` inside the running machine: nsenter into
    /// all of PID 1's namespaces (user first, so root inside is the
    /// machine's root, not the host's), its root and working folder, after
    /// joining its cgroups (limits hold for exec'd processes too).
    pub fn exec_command(&self, ctx: &Ctx, full_name: &str, argv: &[String]) -> Result<Command> {
        let dir = Self::machine_dir(ctx, full_name);
        let rec = Self::read_record(&dir).ok_or_else(|| DriverError::NoSuchMachine {
            machine: full_name.into(),
        })?;
        let leader = Self::leader(ctx, full_name).ok_or_else(|| {
            failed(
                full_name,
                format!("machine is not running; `moat start {full_name}` first"),
            )
        })?;
        if argv.is_empty() {
            return Err(failed(full_name, "nothing to run: give a command"));
        }
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={leader}"))
            .args(["--all", "--root", "--wd", "--"])
            .args(argv)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/root")
            .env("container", "systemd-nspawn");
        if let Ok(t) = std::env::var("TERM") {
            cmd.env("TERM", t);
        }
        if rec.supervision == "moat" {
            let mut files = Vec::new();
            for h in Self::hierarchies(&rec) {
                let p = h.dir.join("cgroup.procs");
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(io_err(full_name))?;
                files.push(f);
            }
            let fds: Vec<i32> = files.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
            // SAFETY: only write(2) on fds opened before fork; the files are
            // moved into the closure so they stay open until exec.
            unsafe {
                cmd.pre_exec(move || {
                    let _keep = &files;
                    for fd in &fds {
                        if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        Ok(cmd)
    }
}

/// Runs a host command, mapping failure to a driver error with argv and stderr.
fn run(machine: &str, cmd: &mut Command) -> Result<()> {
    let argv = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| failed(machine, format!("{argv}: {e}")))?;
    if !out.status.success() {
        return Err(failed(
            machine,
            format!(
                "{argv} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

fn is_nsfs_mount(p: &Path) -> bool {
    let Ok(mi) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.display().to_string();
    mi.lines().any(|l| {
        let Some((left, right)) = l.split_once(" - ") else {
            return false;
        };
        left.split_whitespace().nth(4) == Some(want.as_str()) && right.starts_with("nsfs ")
    })
}

fn systemd_main_pid(unit: &str) -> Option<i32> {
    let out = Command::new("systemctl")
        .args(["show", "--property=MainPID", "--value", unit])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
}

/// nspawn's child that has exec'd the payload (its `comm` is no longer
/// nspawn's: until then it is still setting up mounts).
fn leader_of(nspawn_pid: i32) -> Option<i32> {
    let children = fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children"))
        .ok()
        .map(|t| {
            t.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_else(|| children_by_scan(nspawn_pid));
    children.into_iter().find(|c| {
        fs::read_to_string(format!("/proc/{c}/comm"))
            .is_ok_and(|comm| comm.trim() != "systemd-nspawn")
    })
}

fn children_by_scan(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(parent) {
                out.push(pid);
            }
        }
    }
    out
}

impl Driver for NspawnDriver {
    fn name(&self) -> &'static str {
        "nspawn"
    }

    fn probe(&self, _ctx: &Ctx) -> Probe {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Probe::Unavailable {
                reason: "systemd-nspawn needs root".into(),
                hint: "run moat as root".into(),
            };
        }
        if !self.nspawn().is_file() {
            return Probe::Unavailable {
                reason: format!("{} is not installed", self.nspawn().display()),
                hint: "install it: apt-get install systemd-container".into(),
            };
        }
        for tool in ["nsenter", "unshare"] {
            if which(tool).is_none() {
                return Probe::Unavailable {
                    reason: format!("{tool} is not installed"),
                    hint: "install util-linux".into(),
                };
            }
        }
        if self.supervision() == Supervision::Moat {
            if let Err(e) = self.supervisor_path("probe") {
                return Probe::Unavailable {
                    reason: e.to_string(),
                    hint: "install moat-supervisor next to moat or set MOAT_SUPERVISOR".into(),
                };
            }
        }
        Probe::Available
    }

    fn supports(&self, kind: MachineType) -> bool {
        kind == MachineType::Container
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            exec: true,
            snapshot: true,
            clone: true,
            ..Capabilities::default()
        }
    }

    fn list(&self, ctx: &Ctx) -> Result<Vec<ObservedMachine>> {
        crate::list_machine_folders(ctx, |name| self.observe(ctx, name))
    }

    fn observe(&self, ctx: &Ctx, full_name: &str) -> Result<Option<ObservedMachine>> {
        let dir = Self::machine_dir(ctx, full_name);
        let Some(rec) = Self::read_record(&dir) else {
            return Ok(None);
        };
        let state = Self::observe_state(ctx, full_name, &dir, &rec);
        let limits = if state == ObsState::Running && rec.supervision == "moat" {
            cgroup::read_limits(&Self::hierarchies(&rec))
        } else {
            rec.limits.clone()
        };
        Ok(Some(ObservedMachine {
            full_name: full_name.into(),
            driver: "nspawn".into(),
            state,
            spec_hash: rec.spec_hash,
            limits,
            adhoc: false,
        }))
    }

    fn create(&self, ctx: &Ctx, spec: &MachineSpec) -> Result<()> {
        let m = &spec.machine;
        let name = &m.full_name;
        let dir = Self::machine_dir(ctx, name);
        if let Some(rec) = Self::read_record(&dir) {
            if rec.spec_hash == spec.spec_hash {
                return Ok(());
            }
        }
        // The loader refuses these with file:line:col; ad-hoc machines and
        // other callers reach the driver directly, so it checks again.
        if m.privileged && !m.trust.allows_privileged() {
            return Err(failed(
                name,
                format!("privileged: true is refused in {} domains; move the machine to a trusted domain or drop privileged", m.trust.as_str()),
            ));
        }
        if m.network == NetworkMode::Host && m.trust != moat_core::model::TrustLevel::Admin {
            return Err(failed(
                name,
                "network: host is only allowed in admin domains; use network: domain or move the machine to an admin domain",
            ));
        }
        if args::wants_no_userns(m) && !m.privileged {
            return Err(failed(
                name,
                "nspawn.PrivateUsers: no needs privileged: true (root inside would be host root)",
            ));
        }
        if m.network == NetworkMode::Domain
            && (spec.nic.is_none() || spec.bridge.is_none())
            && self.network.is_some()
        {
            return Err(failed(name, "network: domain without an address or bridge; run `moat apply` (it allocates them)"));
        }
        for mnt in &m.mounts {
            if !Path::new(&mnt.source).is_absolute() {
                return Err(failed(
                    name,
                    format!("mount source '{}' must be absolute here (the loader resolves project-relative paths)", mnt.source),
                ));
            }
        }
        fs::create_dir_all(&dir.dir).map_err(io_err(name))?;
        // Reserved under a lock before the slow root preparation: parallel
        // creates must never share a uid band.
        let id_number = crate::ids::reserve(&ctx.root.join("machines"), name, "nspawn", |d| {
            Self::read_record(&MachineDir::new(d)).map(|r| r.id_number)
        })
        .map_err(io_err(name))?;
        let rootfs: PreparedRootfs = self
            .rootfs
            .prepare_spec(ctx, spec)
            .map_err(|e| failed(name, format!("preparing the root file system: {e}")))?;
        let boot = m.command.is_none() && rootfs.system;
        let command = match &m.command {
            Some(c) => c.clone(),
            None => {
                let mut a = rootfs.config.entrypoint.clone();
                a.extend(rootfs.config.cmd.iter().cloned());
                a
            }
        };
        if !boot && command.is_empty() {
            return Err(failed(
                name,
                "the image has no init, entrypoint or cmd; set `command:` on the machine",
            ));
        }
        let supervision = self.supervision();
        let id_base = (!args::wants_no_userns(m)).then(|| args::id_base_for(id_number));
        let moat_shifts = id_base.is_some() && shift::is_overlay(&rootfs.path);
        let argv = args::nspawn_argv(
            self.nspawn(),
            &Plan {
                machine: m,
                rootfs: &rootfs.path,
                boot,
                command,
                env: rootfs.config.env.clone(),
                workdir: rootfs.config.workdir.clone(),
                id_base,
                moat_shifts,
                supervision,
            },
        );
        let mut hosts = format!("127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {}\n", m.name);
        for (n, ip) in &spec.hosts {
            hosts.push_str(&format!("{ip} {n}\n"));
        }
        let resolv_conf = match m.network {
            NetworkMode::Domain => spec
                .bridge
                .as_ref()
                .map(|b| format!("nameserver {}\n", b.gateway)),
            NetworkMode::Host => fs::read_to_string("/etc/resolv.conf").ok(),
            NetworkMode::None => None,
        };
        let nic = match (&spec.nic, &spec.bridge, m.network) {
            (Some(n), Some(b), NetworkMode::Domain) => Some(NicRecord {
                host_if: n.host_if.clone(),
                ip: n.ip,
                mac: n.mac,
                bridge: b.name.clone(),
                gateway: b.gateway,
                prefix_len: b.prefix_len,
            }),
            _ => None,
        };
        let rec = NspawnRecord {
            spec_hash: spec.spec_hash.clone(),
            id_number,
            id_base,
            moat_shifts,
            domain: m.domain.clone(),
            network: match m.network {
                NetworkMode::Domain => "domain",
                NetworkMode::Host => "host",
                NetworkMode::None => "none",
            }
            .into(),
            nic,
            boot,
            rootfs: rootfs.path.clone(),
            read_only: args::read_only(m),
            cgroup: format!("/moat-{}/{}", ctx.root_tag, name),
            limits: Limits {
                cpus: m.cpus,
                memory: m.memory,
                pids: m.pids,
            },
            supervision: match supervision {
                Supervision::Moat => "moat",
                Supervision::Systemd => "systemd",
            }
            .into(),
            argv,
            restart: m.restart,
            etc_hosts: hosts,
            resolv_conf,
        };
        let text = serde_json::to_vec_pretty(&rec).map_err(|e| failed(name, e.to_string()))?;
        fs::write(dir.dir.join("nspawn.json"), text).map_err(io_err(name))?;
        Ok(())
    }

    fn start(&self, ctx: &Ctx, full_name: &str) -> Result<()> {
        let dir = Self::machine_dir(ctx, full_name);
        let rec = Self::read_record(&dir).ok_or_else(|| DriverError::NoSuchMachine {
            machine: full_name.into(),
        })?;
        match Self::observe_state(ctx, full_name, &dir, &rec) {
            ObsState::Running => return Ok(()),
            ObsState::Crashed { .. } if rec.supervision == "moat" => {
                machine::cleanup_dead(&dir).map_err(rt(full_name))?;
                Self::cleanup_after(ctx, full_name, &dir);
            }
            _ => {}
        }
        self.rootfs
            .remount(ctx, full_name)
            .map_err(|e| failed(full_name, format!("mounting the root file system: {e}")))?;
        if let (Some(base), true) = (rec.id_base, rec.moat_shifts) {
            if !shift::is_shifted(&rec.rootfs, base) {
                shift::shift_tree(&rec.rootfs, base, args::IDS_PER_MACHINE).map_err(|e| {
                    failed(full_name, format!("shifting the root's ownership: {e}"))
                })?;
            }
        }
        Self::write_etc(full_name, &rec)?;
        if rec.supervision == "systemd" {
            self.start_systemd(ctx, full_name, &dir, &rec)?;
        } else {
            self.start_moat(ctx, full_name, &dir, &rec)?;
        }
        // Wait for PID 1 (nspawn has mounted /proc by then), then mask. The
        // first start of a machine includes nspawn's one-time ownership shift
        // of its root when the file system cannot be idmapped (overlayfs):
        // ~20 s for a 200 MiB Debian root.
        let deadline = Instant::now() + Duration::from_secs(START_TIMEOUT_S);
        loop {
            if let Some(pid) = Self::leader(ctx, full_name) {
                if let Err(e) = mask::apply(pid) {
                    eprintln!("moat: {full_name}: masking /proc entries: {e} (reported in status)");
                }
                return Ok(());
            }
            if Self::observe_state(ctx, full_name, &dir, &rec) != ObsState::Running {
                let log = fs::read_to_string(dir.stderr_log()).unwrap_or_default();
                let _ = self.stop(ctx, full_name, Duration::from_millis(100));
                return Err(failed(
                    full_name,
                    format!(
                        "systemd-nspawn ended during start; its output: {}",
                        log.trim()
                    ),
                ));
            }
            if Instant::now() > deadline {
                return Err(failed(
                    full_name,
                    format!(
                        "the container's PID 1 did not appear within 15 s; see {}",
                        dir.stderr_log().display()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stop(&self, ctx: &Ctx, full_name: &str, timeout: Duration) -> Result<()> {
        let dir = Self::machine_dir(ctx, full_name);
        let Some(rec) = Self::read_record(&dir) else {
            return Ok(());
        };
        if rec.supervision == "systemd" {
            let unit = Self::unit_name(ctx, full_name);
            let _ = Command::new("systemctl").args(["stop", &unit]).output();
        } else {
            machine::stop(&dir, timeout).map_err(rt(full_name))?;
            machine::cleanup_dead(&dir).map_err(rt(full_name))?;
        }
        Self::cleanup_after(ctx, full_name, &dir);
        Ok(())
    }

    fn destroy(&self, ctx: &Ctx, full_name: &str) -> Result<()> {
        let dir = Self::machine_dir(ctx, full_name);
        if Self::read_record(&dir).is_none() {
            return Ok(());
        }
        self.stop(ctx, full_name, Duration::from_millis(500))?;
        self.rootfs
            .release(ctx, full_name)
            .map_err(|e| failed(full_name, format!("releasing the root file system: {e}")))?;
        Self::remove_netns(&dir);
        fs::remove_dir_all(&dir.dir).map_err(io_err(full_name))
    }

    fn exec_session(
        &self,
        ctx: &Ctx,
        full_name: &str,
        argv: &[String],
        opts: &crate::SessionOpts,
    ) -> Result<crate::ExecSession> {
        let login = ["/bin/sh".to_string(), "-l".to_string()];
        let argv = if opts.login || argv.is_empty() {
            &login[..]
        } else {
            argv
        };
        let mut cmd = self.exec_command(ctx, full_name, argv)?;
        for kv in &opts.env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        let (io, process) = session::spawn(cmd, opts.tty).map_err(io_err(full_name))?;
        Ok(crate::ExecSession {
            io,
            tty: opts.tty.is_some(),
            process,
        })
    }

    fn exec(&self, ctx: &Ctx, full_name: &str, argv: &[String]) -> Result<ExecOutput> {
        let out = self
            .exec_command(ctx, full_name, argv)?
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(io_err(full_name))?;
        use std::os::unix::process::ExitStatusExt;
        Ok(ExecOutput {
            status: out
                .status
                .code()
                .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0)),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}
