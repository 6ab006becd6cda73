//! The `native` driver: moat's built-in container runtime (crate
//! `moat-runtime`), one supervisor process per running machine.
//!
//! Per-machine state lives in `<root>/machines/<full_name>/`: the runtime's
//! files (supervisor.json, status.json, logs/) plus `native.json` (spec hash,
//! id-range number). The root file system comes from a [`RootfsProvider`]
//! (the image store plugs in there); NICs are attached by an optional
//! [`NetworkAttacher`] between create and start, when the container's network
//! namespace exists but its init has not run yet.

use crate::{
    Capabilities, Ctx, Driver, DriverError, ExecOutput, ExecSession, MachineSpec, Probe, Result,
    SessionOpts, SessionProcess,
};
use moat_core::model::{Machine, MachineType, NetworkMode};
use moat_core::observed::{Limits, MachineState as ObsState, ObservedMachine};
use moat_runtime::machine::{self, MachineDir, MachineState};
use moat_runtime::{
    BindMount, ContainerKind, ContainerSpec, IdRange, NetworkSpec, ResourceLimits, SupervisorConfig,
};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An image's run settings (OCI config subset).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// uid:gid inside.
    pub user: Option<(u32, u32)>,
}

/// A root file system ready for one machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedRootfs {
    /// Folder (possibly an overlay mount point) the container runs in.
    pub path: PathBuf,
    pub config: ImageConfig,
    /// Run the image's init as PID 1 (system container) rather than its entrypoint.
    pub system: bool,
    /// Set: `path` is this overlay, left unmounted for the runtime to mount
    /// ([`RootfsProvider::prepare_spec_unmounted`]).
    pub overlay: Option<moat_runtime::idmap::OverlayLayout>,
}

/// Supplies root file systems (the image store implements this).
pub trait RootfsProvider: Send + Sync {
    /// Prepares (or finds, if already prepared) the machine's root file system.
    fn prepare(&self, ctx: &Ctx, machine: &Machine) -> std::result::Result<PreparedRootfs, String>;
    /// Like [`RootfsProvider::prepare`], with the whole spec (NIC, bridge) at
    /// hand: providers that write per-machine files into the root before the
    /// first boot (the cloud-init seed) override this one. Drivers call this.
    fn prepare_spec(
        &self,
        ctx: &Ctx,
        spec: &MachineSpec,
    ) -> std::result::Result<PreparedRootfs, String> {
        self.prepare(ctx, &spec.machine)
    }
    /// Releases it (unmount, remove the writable layer). Missing is not an error.
    fn release(&self, ctx: &Ctx, full_name: &str) -> std::result::Result<(), String>;
    /// Makes sure a prepared root file system is mounted again (after a host
    /// reboot, a snapshot or a restore). Called at every start.
    fn remount(&self, _ctx: &Ctx, _full_name: &str) -> std::result::Result<(), String> {
        Ok(())
    }
    /// [`RootfsProvider::prepare_spec`] for a runtime that mounts an overlay
    /// root itself: an overlay may be left unmounted, its layers in
    /// [`PreparedRootfs::overlay`] (the native supervisor mounts it with
    /// idmapped lower layers at once, instead of replacing a plain mount).
    fn prepare_spec_unmounted(
        &self,
        ctx: &Ctx,
        spec: &MachineSpec,
    ) -> std::result::Result<PreparedRootfs, String> {
        self.prepare_spec(ctx, spec)
    }
    /// [`RootfsProvider::remount`] likewise: `Some` layers when the overlay
    /// is left unmounted for the runtime.
    fn remount_unmounted(
        &self,
        ctx: &Ctx,
        full_name: &str,
    ) -> std::result::Result<Option<moat_runtime::idmap::OverlayLayout>, String> {
        self.remount(ctx, full_name).map(|()| None)
    }
}

/// Attaches a machine's NIC inside the network namespace of `pid`, or of a
/// namespace file (the machine's persistent netns).
pub trait NetworkAttacher: Send + Sync {
    fn attach(&self, ctx: &Ctx, spec: &MachineSpec, pid: i32) -> std::result::Result<(), String>;
    /// Attaches into the namespace bind-mounted at `netns`. Attachers that
    /// implement it say so in [`NetworkAttacher::attaches_by_path`].
    fn attach_netns(
        &self,
        _ctx: &Ctx,
        spec: &MachineSpec,
        netns: &Path,
    ) -> std::result::Result<(), String> {
        Err(format!(
            "{}: this network attacher cannot attach into {}",
            spec.machine.full_name,
            netns.display()
        ))
    }
    fn attaches_by_path(&self) -> bool {
        false
    }
}

/// A provider for tests and simple setups: each machine's rootfs is a
/// folder `<base>/<full_name>` that already exists.
pub struct FolderRootfs {
    pub base: PathBuf,
    pub system: bool,
}

impl RootfsProvider for FolderRootfs {
    fn prepare(
        &self,
        _ctx: &Ctx,
        machine: &Machine,
    ) -> std::result::Result<PreparedRootfs, String> {
        let path = self.base.join(&machine.full_name);
        if !path.is_dir() {
            return Err(format!("{} is not a folder", path.display()));
        }
        Ok(PreparedRootfs {
            path,
            config: ImageConfig::default(),
            system: self.system,
            overlay: None,
        })
    }
    fn release(&self, _ctx: &Ctx, _full_name: &str) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// The runtime's session behind the driver's [`SessionProcess`].
#[derive(Debug)]
struct NativeSession(moat_runtime::ExecSession);

impl SessionProcess for NativeSession {
    fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        self.0.resize(rows, cols)
    }
    fn close_stdin(&self) -> std::io::Result<()> {
        self.0.close_stdin()
    }
    fn signal(&self, sig: i32) -> std::io::Result<()> {
        self.0.signal(sig)
    }
    fn wait(&mut self) -> std::io::Result<i32> {
        self.0.wait()
    }
}

/// What the driver records next to the runtime's files.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct NativeRecord {
    spec_hash: String,
    id_number: u32,
    /// The machine has a NIC to attach at start.
    nic: bool,
    /// Made outside any project (`Machine::adhoc`; `ObservedMachine::adhoc`).
    #[serde(default)]
    adhoc: bool,
}

pub struct NativeDriver {
    rootfs: Arc<dyn RootfsProvider>,
    network: Option<Arc<dyn NetworkAttacher>>,
    supervisor: Option<PathBuf>,
    /// Specs of machines created by this process, for attaching NICs at start.
    specs: Mutex<std::collections::BTreeMap<String, MachineSpec>>,
    stop_timeout: Duration,
}

impl NativeDriver {
    pub fn new(rootfs: Arc<dyn RootfsProvider>) -> Self {
        NativeDriver {
            rootfs,
            network: None,
            supervisor: None,
            specs: Mutex::new(Default::default()),
            stop_timeout: Duration::from_secs(10),
        }
    }

    pub fn with_network(mut self, attacher: Arc<dyn NetworkAttacher>) -> Self {
        self.network = Some(attacher);
        self
    }

    /// Path of `moat-supervisor` (default: [`machine::find_supervisor`]).
    pub fn with_supervisor(mut self, path: PathBuf) -> Self {
        self.supervisor = Some(path);
        self
    }

    pub fn machine_dir(ctx: &Ctx, full_name: &str) -> MachineDir {
        MachineDir::new(ctx.root.join("machines").join(full_name))
    }

    fn failed(machine: &str, message: impl Into<String>) -> DriverError {
        DriverError::Failed {
            machine: machine.into(),
            message: message.into(),
        }
    }

    fn rt(machine: &str) -> impl Fn(moat_runtime::RuntimeError) -> DriverError + '_ {
        move |e| Self::failed(machine, e.to_string())
    }

    fn supervisor_path(&self, machine: &str) -> Result<PathBuf> {
        match &self.supervisor {
            Some(p) => Ok(p.clone()),
            None => machine::find_supervisor().map_err(Self::rt(machine)),
        }
    }

    fn read_record(dir: &MachineDir) -> Option<NativeRecord> {
        serde_json::from_slice(&fs::read(dir.dir.join("native.json")).ok()?).ok()
    }

    /// Where a machine's persistent network namespace is bind-mounted.
    pub fn netns_path(ctx: &Ctx, full_name: &str) -> PathBuf {
        ctx.run_dir.join("netns").join(full_name)
    }

    /// The user namespace owning it (for machines with a user namespace).
    pub fn userns_path(ctx: &Ctx, full_name: &str) -> PathBuf {
        ctx.run_dir.join("netns").join(format!("{full_name}.user"))
    }

    /// A machine with a NIC gets a network namespace of its own that outlives
    /// its processes (restart policy, stop/start): the NIC is attached once.
    fn persistent_netns(&self, spec: &MachineSpec) -> bool {
        spec.nic.is_some()
            && spec.machine.network == NetworkMode::Domain
            && self.network.as_ref().is_some_and(|n| n.attaches_by_path())
    }

    /// Makes sure the persistent netns of a machine exists, creating it and
    /// attaching the NIC when it does not (first start, host reboot).
    fn ensure_netns(&self, ctx: &Ctx, full_name: &str, cfg: &SupervisorConfig) -> Result<()> {
        let NetworkSpec::Join(path) = &cfg.container.network else {
            return Ok(());
        };
        let spec = self
            .specs
            .lock()
            .map_err(|_| Self::failed(full_name, "driver state poisoned"))?
            .get(full_name)
            .cloned();
        // An apply killed between binding the network namespace and its
        // user namespace leaves half a pair: made again from scratch.
        let user_bound = cfg
            .container
            .userns_path
            .as_deref()
            .is_none_or(moat_runtime::sys::is_ns_mount);
        if user_bound && moat_runtime::sys::is_ns_mount(path) {
            // An apply killed between creating the veth and enslaving it to
            // the bridge leaves the namespace with a NIC that goes nowhere:
            // attach again (it replaces the pair) unless it is on its bridge.
            if let (Some(net), Some(spec)) = (&self.network, &spec) {
                if let (Some(nic), Some(br)) = (&spec.nic, &spec.bridge) {
                    let master = fs::read_link(format!("/sys/class/net/{}/master", nic.host_if))
                        .ok()
                        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
                    if master.as_deref() != Some(br.name.as_str()) {
                        net.attach_netns(ctx, spec, path).map_err(|e| {
                            Self::failed(full_name, format!("re-attaching the NIC: {e}"))
                        })?;
                    }
                }
            }
            return Ok(());
        }
        let (Some(net), Some(spec)) = (&self.network, spec) else {
            return Err(Self::failed(
                full_name,
                format!(
                    "its network namespace {} is gone and this command cannot attach its NIC; \
                     `moat apply` (or `moat start` with the project) re-creates it",
                    path.display()
                ),
            ));
        };
        let user = cfg
            .container
            .userns_path
            .as_deref()
            .zip(cfg.container.idmap);
        moat_runtime::sys::create_persistent_netns(path, user).map_err(|e| DriverError::Io {
            machine: full_name.into(),
            source: e,
        })?;
        if let Err(e) = net.attach_netns(ctx, &spec, path) {
            let _ = moat_runtime::sys::remove_ns_mount(path);
            let _ = moat_runtime::sys::remove_ns_mount(&Self::userns_path(ctx, full_name));
            return Err(Self::failed(full_name, format!("attaching the NIC: {e}")));
        }
        Ok(())
    }

    fn container_spec(
        &self,
        ctx: &Ctx,
        spec: &MachineSpec,
        rootfs: &PreparedRootfs,
        id_number: u32,
    ) -> Result<ContainerSpec> {
        let m = &spec.machine;
        let args = match (&m.command, rootfs.system) {
            (Some(cmd), _) => cmd.clone(),
            (None, true) => vec![],
            (None, false) => {
                let mut a = rootfs.config.entrypoint.clone();
                a.extend(rootfs.config.cmd.iter().cloned());
                if a.is_empty() {
                    return Err(Self::failed(
                        &m.full_name,
                        "the image has no entrypoint or cmd; set `command:` on the machine",
                    ));
                }
                a
            }
        };
        let kind = if m.command.is_none() && rootfs.system {
            ContainerKind::System
        } else {
            ContainerKind::Application
        };
        let mut cs = ContainerSpec::new(&m.full_name, &rootfs.path, args);
        cs.overlay = rootfs.overlay.clone();
        // Per-root cgroup parent: two roots may both have a machine `pro-dev`.
        cs.cgroup = Some(format!("/moat-{}/{}", ctx.root_tag, m.full_name));
        // The root's `/moat-<tag>` stays for the next machine (`moat destroy`
        // removes it when it is empty).
        cs.keep_cgroup_parent = true;
        cs.kind = kind;
        cs.env = rootfs.config.env.clone();
        cs.cwd = rootfs.config.workdir.clone().unwrap_or_else(|| "/".into());
        cs.user = rootfs.config.user.unwrap_or((0, 0));
        cs.hostname = Some(m.name.clone());
        cs.limits = ResourceLimits {
            cpus: m.cpus,
            memory: m.memory,
            pids: m.pids,
        };
        cs.idmap = Some(IdRange::for_machine(id_number));
        cs.privileged = m.privileged;
        // Defense in depth behind the core's validation: the runtime refuses
        // `privileged` in untrusted and disposable domains too.
        cs.untrusted_domain = matches!(
            m.trust,
            moat_core::model::TrustLevel::Untrusted | moat_core::model::TrustLevel::Disposable
        );
        if self.persistent_netns(spec) && !m.privileged {
            cs.userns_path = Some(Self::userns_path(ctx, &m.full_name));
        }
        cs.network = match m.network {
            NetworkMode::Domain if self.persistent_netns(spec) => {
                NetworkSpec::Join(Self::netns_path(ctx, &m.full_name))
            }
            NetworkMode::Domain => NetworkSpec::Own,
            NetworkMode::Host => NetworkSpec::Host,
            NetworkMode::None => NetworkSpec::None,
        };
        for mnt in &m.mounts {
            let source = PathBuf::from(&mnt.source);
            if !source.is_absolute() {
                return Err(Self::failed(
                    &m.full_name,
                    format!("mount source '{}' must be absolute here (the loader resolves project-relative paths)", mnt.source),
                ));
            }
            cs.mounts.push(BindMount {
                source,
                target: mnt.target.clone(),
                readonly: mnt.readonly,
            });
        }
        let mut hosts = format!("127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {}\n", m.name);
        for (name, ip) in &spec.hosts {
            hosts.push_str(&format!("{ip} {name}\n"));
        }
        cs.etc_hosts = Some(hosts);
        if let Some(b) = &spec.bridge {
            cs.resolv_conf = Some(format!("nameserver {}\n", b.gateway));
        }
        Ok(cs)
    }
}

impl Driver for NativeDriver {
    fn name(&self) -> &'static str {
        "native"
    }

    fn probe(&self, _ctx: &Ctx) -> Probe {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Probe::Unavailable {
                reason: "the native runtime needs root".into(),
                hint: "run moat as root (or use the incus driver)".into(),
            };
        }
        if !Path::new("/proc/self/ns/user").exists() {
            return Probe::Unavailable {
                reason: "the kernel has no user namespaces".into(),
                hint: "enable CONFIG_USER_NS".into(),
            };
        }
        if let Err(e) = self.supervisor_path("probe") {
            return Probe::Unavailable {
                reason: e.to_string(),
                hint: "install moat-supervisor next to moat or set MOAT_SUPERVISOR".into(),
            };
        }
        Probe::Available
    }

    fn supports(&self, kind: MachineType) -> bool {
        kind == MachineType::Container
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            exec: true,
            console: true,
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
        let limits = dir
            .read_config()
            .map(|c| Limits {
                cpus: c.container.limits.cpus,
                memory: c.container.limits.memory,
                pids: c.container.limits.pids,
            })
            .unwrap_or_default();
        settle_first_launch(&dir);
        let state = match dir.state() {
            MachineState::Running { .. } | MachineState::Restarting { .. } => ObsState::Running,
            // Waiting for a `start` that never came: whoever launched it
            // (an apply, the daemon) died between launch and start.
            MachineState::Created { .. } => ObsState::Crashed {
                reason: "created but never started (the apply starting it was interrupted)".into(),
            },
            MachineState::Absent => ObsState::Stopped,
            MachineState::Stopped { .. } => ObsState::Stopped,
            MachineState::Crashed { reason } => ObsState::Crashed { reason },
        };
        Ok(Some(ObservedMachine {
            full_name: full_name.into(),
            driver: "native".into(),
            state,
            spec_hash: rec.spec_hash,
            limits,
            adhoc: rec.adhoc,
        }))
    }

    fn create(&self, ctx: &Ctx, spec: &MachineSpec) -> Result<()> {
        let name = &spec.machine.full_name;
        let dir = Self::machine_dir(ctx, name);
        if let Some(rec) = Self::read_record(&dir) {
            if rec.spec_hash == spec.spec_hash && dir.config_path().exists() {
                self.specs
                    .lock()
                    .map_err(|_| Self::failed(name, "driver state poisoned"))?
                    .insert(name.clone(), spec.clone());
                return Ok(());
            }
        }
        fs::create_dir_all(&dir.dir).map_err(|e| DriverError::Io {
            machine: name.clone(),
            source: e,
        })?;
        if spec.machine.disposable {
            volatile_folder(&dir.dir)
                .map_err(|e| Self::failed(name, format!("mounting its folder's tmpfs: {e}")))?;
        }
        // Reserved under a lock before the slow root preparation: parallel
        // creates must never share a uid band.
        let id_number = crate::ids::reserve(&ctx.root.join("machines"), name, "native", |d| {
            Self::read_record(&MachineDir::new(d)).map(|r| r.id_number)
        })
        .map_err(|e| DriverError::Io {
            machine: name.clone(),
            source: e,
        })?;
        let rootfs = self
            .rootfs
            .prepare_spec_unmounted(ctx, spec)
            .map_err(|e| Self::failed(name, format!("preparing the root file system: {e}")))?;
        let cs = self.container_spec(ctx, spec, &rootfs, id_number)?;
        let mut cfg = SupervisorConfig::new(cs);
        cfg.restart = spec.machine.restart;
        cfg.stop_timeout_ms = self.stop_timeout.as_millis() as u64;
        cfg.wait_for_start =
            spec.nic.is_some() && self.network.is_some() && !self.persistent_netns(spec);
        let text =
            serde_json::to_vec_pretty(&cfg).map_err(|e| Self::failed(name, e.to_string()))?;
        fs::write(dir.config_path(), text).map_err(|e| DriverError::Io {
            machine: name.clone(),
            source: e,
        })?;
        let rec = NativeRecord {
            spec_hash: spec.spec_hash.clone(),
            id_number,
            nic: spec.nic.is_some(),
            adhoc: spec.machine.adhoc,
        };
        let text =
            serde_json::to_vec_pretty(&rec).map_err(|e| Self::failed(name, e.to_string()))?;
        fs::write(dir.dir.join("native.json"), text).map_err(|e| DriverError::Io {
            machine: name.clone(),
            source: e,
        })?;
        self.specs
            .lock()
            .map_err(|_| Self::failed(name, "driver state poisoned"))?
            .insert(name.clone(), spec.clone());
        Ok(())
    }

    fn start(&self, ctx: &Ctx, full_name: &str) -> Result<()> {
        let dir = Self::machine_dir(ctx, full_name);
        if Self::read_record(&dir).is_none() {
            return Err(DriverError::NoSuchMachine {
                machine: full_name.into(),
            });
        }
        match dir.state() {
            MachineState::Running { .. } | MachineState::Restarting { .. } => return Ok(()),
            MachineState::Crashed { .. } => {
                machine::cleanup_dead(&dir).map_err(Self::rt(full_name))?
            }
            MachineState::Created { .. } => {
                // Launched by a process that died before attaching its NIC
                // and starting it: stop that supervisor and launch afresh.
                machine::stop(&dir, Duration::from_millis(100)).map_err(Self::rt(full_name))?;
                machine::cleanup_dead(&dir).map_err(Self::rt(full_name))?
            }
            _ => {}
        }
        let overlay = self
            .rootfs
            .remount_unmounted(ctx, full_name)
            .map_err(|e| Self::failed(full_name, format!("mounting the root file system: {e}")))?;
        let mut cfg = dir.read_config().map_err(Self::rt(full_name))?;
        // What is mounted now (or left to the supervisor to mount).
        cfg.container.overlay = overlay;
        self.ensure_netns(ctx, full_name, &cfg)?;
        let sup = self.supervisor_path(full_name)?;
        let st = machine::launch(&dir, &cfg, &sup).map_err(Self::rt(full_name))?;
        if let MachineState::Created { pid } = st {
            let spec = self
                .specs
                .lock()
                .map_err(|_| Self::failed(full_name, "driver state poisoned"))?
                .get(full_name)
                .cloned();
            if let (Some(net), Some(spec)) = (&self.network, spec) {
                if let Err(e) = net.attach(ctx, &spec, pid) {
                    let _ = machine::stop(&dir, Duration::from_secs(1));
                    return Err(Self::failed(full_name, format!("attaching the NIC: {e}")));
                }
            }
            machine::start(&dir).map_err(Self::rt(full_name))?;
        }
        match dir.state() {
            MachineState::Crashed { reason } => Err(Self::failed(full_name, reason)),
            _ => Ok(()),
        }
    }

    fn stop(&self, ctx: &Ctx, full_name: &str, timeout: Duration) -> Result<()> {
        let dir = Self::machine_dir(ctx, full_name);
        machine::stop(&dir, timeout).map_err(Self::rt(full_name))?;
        machine::cleanup_dead(&dir).map_err(Self::rt(full_name))
    }

    fn destroy(&self, ctx: &Ctx, full_name: &str) -> Result<()> {
        let dir = Self::machine_dir(ctx, full_name);
        // Stop first (no grace period: its files are discarded anyway), then
        // release the root file system (it may be mounted inside the machine
        // folder), then remove the folder. A machine whose PID 1 has just
        // ended (a `run --rm`) has its root file system released while its
        // supervisor removes the container's cgroups and state.
        let release = || {
            self.rootfs.release(ctx, full_name).map_err(|e| {
                Self::failed(full_name, format!("releasing the root file system: {e}"))
            })
        };
        let released = dir.ending();
        if released {
            release()?;
        }
        machine::stop(&dir, Duration::from_millis(100)).map_err(Self::rt(full_name))?;
        machine::cleanup_dead(&dir).map_err(Self::rt(full_name))?;
        if !released {
            release()?;
        }
        // The namespaces before the folder: a destroy killed in between
        // leaves the folder, so the machine is still seen and destroyed
        // again; the other way round, nothing would name the namespaces.
        for ns in [
            Self::netns_path(ctx, full_name),
            Self::userns_path(ctx, full_name),
        ] {
            moat_runtime::sys::remove_ns_mount(&ns).map_err(|e| {
                Self::failed(
                    full_name,
                    format!("removing its namespace file {}: {e}", ns.display()),
                )
            })?;
        }
        // A disposable machine's folder is a tmpfs: unmounting it removes
        // everything in it at once.
        // Most often nothing is mounted below it any more (the root file
        // system was released above): one unmount, no read of the mount table.
        if moat_host::mount::is_mount_point(&dir.dir).unwrap_or(false)
            && moat_host::mount::unmount(&dir.dir, false).is_err()
        {
            // What is still mounted below it first (best effort: a detach of
            // the folder takes the rest with it).
            for m in moat_host::mount::mounts_under(&dir.dir).unwrap_or_default() {
                if m != dir.dir && moat_host::mount::unmount(&m, false).is_err() {
                    let _ = moat_host::mount::unmount(&m, true);
                }
            }
            if moat_host::mount::unmount(&dir.dir, false).is_err() {
                moat_host::mount::unmount(&dir.dir, true)
                    .map_err(|e| Self::failed(full_name, format!("unmounting its folder: {e}")))?;
            }
        }
        machine::destroy(&dir, self.stop_timeout).map_err(Self::rt(full_name))?;
        if let Ok(mut s) = self.specs.lock() {
            s.remove(full_name);
        }
        Ok(())
    }

    fn exec(&self, ctx: &Ctx, full_name: &str, argv: &[String]) -> Result<ExecOutput> {
        let dir = Self::machine_dir(ctx, full_name);
        let r = machine::exec(&dir, argv).map_err(Self::rt(full_name))?;
        Ok(ExecOutput {
            status: r.status,
            stdout: r.stdout,
            stderr: r.stderr,
        })
    }

    fn exec_session(
        &self,
        ctx: &Ctx,
        full_name: &str,
        argv: &[String],
        opts: &SessionOpts,
    ) -> Result<ExecSession> {
        let dir = Self::machine_dir(ctx, full_name);
        if Self::read_record(&dir).is_none() {
            return Err(DriverError::NoSuchMachine {
                machine: full_name.into(),
            });
        }
        let ropts = moat_runtime::SessionOpts {
            tty: opts.tty,
            env: opts.env.clone(),
            login: opts.login,
        };
        let s = moat_runtime::session::open(&dir, argv, &ropts).map_err(Self::rt(full_name))?;
        let io = s.try_clone_fd().map_err(|e| DriverError::Io {
            machine: full_name.into(),
            source: e,
        })?;
        Ok(ExecSession {
            io,
            tty: s.is_tty(),
            process: Box::new(NativeSession(s)),
        })
    }
}

/// A disposable machine's folder (its supervisor files, logs, libcontainer
/// state and, through the image store, its writable layer) is a tmpfs of its
/// own: all of it goes at once when the machine goes, nothing of it reaches
/// the disk, and after a host crash only an empty folder is left. Like
/// systemd-nspawn's `--volatile=overlay`, what the machine writes lives in
/// memory, charged to the memory cgroup of the process that writes it (the
/// machine's own, so `memory:` bounds it). Idempotent (a crashed run's tmpfs
/// is reused as it is).
///
/// Only an empty folder gets one: a machine that was created on disk (before
/// it became disposable, or with `MOAT_DISPOSABLE_TMPFS=0`) stays there, as
/// a tmpfs over its files would hide a running supervisor's.
fn volatile_folder(dir: &std::path::Path) -> std::result::Result<(), String> {
    if std::env::var("MOAT_DISPOSABLE_TMPFS").is_ok_and(|v| v == "0") {
        return Ok(());
    }
    if moat_host::mount::is_mount_point(dir).map_err(|e| e.to_string())? {
        return Ok(());
    }
    let empty = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .next()
        .is_none();
    if !empty {
        return Ok(());
    }
    moat_host::mount::mount_tmpfs(dir, "moat-volatile", 0o755).map_err(|e| e.to_string())
}

/// A supervisor busy with its first launch may belong to a process that died
/// (an apply killed between launch and start): wait until it has created the
/// container, so that the caller sees `Created` (never started) rather than a
/// launch in progress it would take for running.
fn settle_first_launch(dir: &MachineDir) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Some(s) = dir.read_status() {
        let launching = s.phase == machine::Phase::Starting && s.restarts == 0;
        if !launching
            || !matches!(dir.state(), MachineState::Restarting { .. })
            || std::time::Instant::now() > deadline
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::model::TrustLevel;

    #[test]
    fn untrusted_and_disposable_domains_mark_the_container_spec() {
        let d = NativeDriver::new(Arc::new(FolderRootfs {
            base: "/nonexistent".into(),
            system: false,
        }));
        let ctx = Ctx {
            root: "/nonexistent".into(),
            run_dir: "/nonexistent/run".into(),
            root_tag: "t".into(),
        };
        let mut m = Machine::adhoc("d-m", "busybox");
        m.command = Some(vec!["true".into()]);
        let rootfs = PreparedRootfs {
            path: "/r".into(),
            config: ImageConfig::default(),
            system: false,
            overlay: None,
        };
        for (trust, untrusted) in [
            (TrustLevel::Untrusted, true),
            (TrustLevel::Disposable, true),
            (TrustLevel::SemiTrusted, false),
            (TrustLevel::Admin, false),
        ] {
            m.trust = trust;
            let spec = MachineSpec {
                machine: m.clone(),
                nic: None,
                bridge: None,
                spec_hash: String::new(),
                hosts: vec![],
            };
            let cs = d.container_spec(&ctx, &spec, &rootfs, 1).unwrap();
            assert_eq!(cs.untrusted_domain, untrusted, "{trust:?}");
        }
    }
}
