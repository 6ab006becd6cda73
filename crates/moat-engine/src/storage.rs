//! Clones and snapshots of machine root file systems (image store), wired to
//! the driver's view of the machine (it must be stopped where the store needs
//! the rootfs unmounted).

use crate::run::ADHOC;
use crate::{state_err, Engine, EngineError, Result};
use moat_core::model::{Machine, NetworkMode};
use moat_core::observed::MachineState;
use moat_driver::MachineSpec;
use moat_image::{MachineFs, SnapshotInfo};
use std::path::Path;

/// A VM snapshot in the shape `moat snapshot ls` prints (no image layers).
fn vm_snapshot(s: moat_qemu::vm::VmSnapshot) -> SnapshotInfo {
    SnapshotInfo {
        name: s.name,
        created: s.created,
        layers: vec![],
    }
}

/// An Incus snapshot in the shape `moat snapshot ls` prints.
fn incus_snapshot((name, created): (String, u64)) -> SnapshotInfo {
    SnapshotInfo {
        name,
        created,
        layers: vec![],
    }
}

/// The machine folder of `name` when it is a running built-in (native)
/// container on an image-store root.
fn running_native(
    host: &crate::host::Host,
    name: &str,
) -> Option<moat_runtime::machine::MachineDir> {
    if moat_driver::nspawn::NspawnDriver::record(&host.ctx, name).is_some()
        || !MachineFs::exists(&host.images, name)
    {
        return None;
    }
    let dir = moat_runtime::machine::MachineDir::new(host.ctx.root.join("machines").join(name));
    (dir.config_path().exists()
        && matches!(
            dir.state(),
            moat_runtime::machine::MachineState::Running { .. }
        ))
    .then_some(dir)
}

fn img(e: moat_image::ImageError) -> EngineError {
    EngineError::Failed(e.to_string())
}

impl Engine {
    /// The Incus driver when `machine` is an Incus machine of this root
    /// (snapshots are then Incus's own); only asked when the root has used Incus.
    pub(crate) fn incus_machine(&self, machine: &str) -> Option<moat_incus::IncusDriver> {
        let ctx = self.ctx();
        if !ctx.root.join("incus.json").exists() {
            return None;
        }
        let d = moat_incus::IncusDriver::new();
        d.find(&ctx, machine).ok().flatten().map(|_| d)
    }

    fn require_stopped(&self, host: &crate::host::Host, name: &str, what: &str) -> Result<()> {
        let mut found = false;
        for d in host.drivers.values() {
            if let Some(o) = d.observe(&host.ctx, name)? {
                found = true;
                if o.state == MachineState::Running {
                    return Err(EngineError::Failed(format!(
                        "{name} is running; `moat stop {name}` first, then {what}"
                    )));
                }
            }
        }
        if !found && !MachineFs::exists(&host.images, name) {
            return Err(EngineError::NoSuchMachine(name.into()));
        }
        Ok(())
    }

    /// `moat clone SRC NEW`: NEW gets SRC's files as they are now, in constant
    /// time (SRC's writable layer becomes a shared read-only layer under both).
    /// NEW is an ad-hoc machine (not in the project) without network; it runs
    /// the image's init, or SRC's command when SRC is declared in `project`.
    pub fn clone_machine(&mut self, project: Option<&Path>, src: &str, new: &str) -> Result<()> {
        if let Some(why) =
            moat_core::naming::check_dns_label(new, moat_core::naming::MAX_FULL_NAME_LEN)
        {
            return Err(EngineError::Failed(format!("machine name '{new}' {why}")));
        }
        // Full VMs: qcow2 backing chains (moat-qemu), not the image store.
        if moat_qemu::vm::is_vm(&self.ctx(), src) {
            let state = self.state()?;
            state
                .intend(ADHOC, new, None, Some(new))
                .map_err(state_err)?;
            moat_qemu::vm::clone_vm(&self.ctx(), src, new)?;
            state.mark_done(ADHOC, new).map_err(state_err)?;
            return Ok(());
        }
        let host = self.host()?;
        self.require_stopped(&host, src, "clone it")?;
        let mut fs = MachineFs::open(&host.images, src).map_err(img)?;
        fs.unmount().map_err(img)?;
        let declared = project
            .and_then(|p| self.check(p).ok())
            .and_then(|c| c.resolved.project.machine(src).cloned());
        let state = self.state()?;
        state
            .intend(ADHOC, new, None, Some(new))
            .map_err(state_err)?;
        let cloned = fs.clone_to(new).map_err(img)?;
        let mut m = declared.unwrap_or_else(|| Machine::adhoc(new, &cloned.state().image));
        m.name = new.into();
        m.full_name = new.into();
        m.domain = String::new();
        m.description = format!("clone of {src}");
        m.network = NetworkMode::None;
        m.ephemeral = true;
        m.disposable = false;
        m.adhoc = true;
        let spec = MachineSpec {
            spec_hash: moat_core::spec::spec_hash(&m, None),
            machine: m,
            nic: None,
            bridge: None,
            hosts: vec![],
        };
        // The clone runs under the source's driver (nspawn or native).
        let driver = if moat_driver::nspawn::NspawnDriver::record(&host.ctx, src).is_some() {
            "nspawn"
        } else {
            "native"
        };
        host.driver(driver)?.create(&host.ctx, &spec)?;
        state.mark_done(ADHOC, new).map_err(state_err)?;
        Ok(())
    }

    /// Snapshot a machine's files. Stopped: constant time (its writable layer
    /// becomes a shared read-only layer). A running built-in container: its
    /// processes are frozen (cgroup freezer) while its writable layer is copied
    /// into a new read-only layer (time grows with what it changed), then
    /// thawed, so the snapshot is crash-consistent. Other running machines
    /// (nspawn) are refused.
    pub fn snapshot_create(&self, machine: &str, name: &str) -> Result<SnapshotInfo> {
        // Full VMs: qcow2 internal snapshots, of running VMs too (with memory).
        if moat_qemu::vm::is_vm(&self.ctx(), machine) {
            let s = moat_qemu::vm::snapshot_create(&self.ctx(), machine, name)?;
            return Ok(vm_snapshot(s));
        }
        if let Some(d) = self.incus_machine(machine) {
            d.snapshot(&self.ctx(), machine, name)?;
            let all = d.snapshot_list(&self.ctx(), machine)?;
            return Ok(incus_snapshot(
                all.into_iter()
                    .find(|(n, _)| n == name)
                    .unwrap_or((name.to_string(), 0)),
            ));
        }
        let host = self.host()?;
        if let Some(dir) = running_native(&host, machine) {
            // Frozen under the store lock (a second snapshot waits for the
            // lock, not inside a freeze), thawed when the copy is saved.
            let mut fs = MachineFs::open(&host.images, machine).map_err(img)?;
            return fs
                .snapshot_create_held(name, || {
                    moat_runtime::machine::freeze(&dir, std::time::Duration::from_secs(10))
                        .map_err(|e| e.to_string())
                })
                .map_err(img);
        }
        self.require_stopped(&host, machine, "snapshot it")?;
        let mut fs = MachineFs::open(&host.images, machine).map_err(img)?;
        fs.unmount().map_err(img)?;
        fs.snapshot_create(name).map_err(img)
    }

    pub fn snapshots(&self, machine: &str) -> Result<Vec<SnapshotInfo>> {
        if moat_qemu::vm::is_vm(&self.ctx(), machine) {
            let v = moat_qemu::vm::snapshots(&self.ctx(), machine)?;
            return Ok(v.into_iter().map(vm_snapshot).collect());
        }
        if let Some(d) = self.incus_machine(machine) {
            let v = d.snapshot_list(&self.ctx(), machine)?;
            return Ok(v.into_iter().map(incus_snapshot).collect());
        }
        let host = self.host()?;
        MachineFs::open(&host.images, machine)
            .map_err(img)?
            .snapshots()
            .map_err(img)
    }

    /// Bring a stopped machine's files back to a snapshot.
    pub fn snapshot_restore(&self, machine: &str, name: &str) -> Result<()> {
        if moat_qemu::vm::is_vm(&self.ctx(), machine) {
            return Ok(moat_qemu::vm::snapshot_restore(&self.ctx(), machine, name)?);
        }
        if let Some(d) = self.incus_machine(machine) {
            return Ok(d.restore(&self.ctx(), machine, name)?);
        }
        let host = self.host()?;
        self.require_stopped(&host, machine, "restore it")?;
        let mut fs = MachineFs::open(&host.images, machine).map_err(img)?;
        fs.unmount().map_err(img)?;
        fs.snapshot_restore(name).map_err(img)
    }

    pub fn snapshot_remove(&self, machine: &str, name: &str) -> Result<()> {
        if moat_qemu::vm::is_vm(&self.ctx(), machine) {
            return Ok(moat_qemu::vm::snapshot_remove(&self.ctx(), machine, name)?);
        }
        if let Some(d) = self.incus_machine(machine) {
            return Ok(d.delete_snapshot(&self.ctx(), machine, name)?);
        }
        let host = self.host()?;
        MachineFs::open(&host.images, machine)
            .map_err(img)?
            .snapshot_remove(name)
            .map_err(img)
    }
}
