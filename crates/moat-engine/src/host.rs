//! The engine's view of the host: the network layer, the image store and the
//! drivers, wired together. Adapters here plug the image store into the native
//! driver (root file systems) and the network layer into it (NICs).

use crate::{EngineError, Result};
use ipnet::Ipv4Net;
use moat_core::model::{Machine, ResolvedNetwork};
use moat_driver::native::{
    ImageConfig as DriverImageConfig, NativeDriver, NetworkAttacher, PreparedRootfs, RootfsProvider,
};
use moat_driver::{Ctx, Driver, MachineSpec};
use moat_host::exec::HostExecutor;
use moat_image::{ImageStore, MachineFs};
use moat_net::{NetHost, NetnsTarget};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Supplies machine root file systems from the image store (overlay of the
/// image's layers plus a per-machine writable layer).
pub struct StoreRootfs {
    pub store: ImageStore,
}

/// `uid[:gid]` as numbers; names are resolved to 0 (root) when not numeric.
fn parse_user(u: &Option<String>) -> Option<(u32, u32)> {
    let u = u.as_deref()?;
    let mut it = u.splitn(2, ':');
    let uid = it.next()?.parse().ok()?;
    let gid = it.next().and_then(|g| g.parse().ok()).unwrap_or(uid);
    Some((uid, gid))
}

impl RootfsProvider for StoreRootfs {
    fn prepare(
        &self,
        _ctx: &Ctx,
        machine: &Machine,
    ) -> std::result::Result<PreparedRootfs, String> {
        self.prepare_with(machine, true)
    }

    /// The root, plus the cloud-init seed when the machine has `cloud_init:`.
    fn prepare_spec(
        &self,
        ctx: &Ctx,
        spec: &MachineSpec,
    ) -> std::result::Result<PreparedRootfs, String> {
        let prepared = self.prepare(ctx, &spec.machine)?;
        crate::cloudinit::write_seed(&prepared.path, spec).map_err(|e| e.to_string())?;
        Ok(prepared)
    }

    /// An overlay root is left for the supervisor to mount, unless a
    /// cloud-init seed must be written into it first.
    fn prepare_spec_unmounted(
        &self,
        ctx: &Ctx,
        spec: &MachineSpec,
    ) -> std::result::Result<PreparedRootfs, String> {
        if spec.machine.cloud_init.is_some() {
            return self.prepare_spec(ctx, spec);
        }
        self.prepare_with(&spec.machine, false)
    }

    fn remount_unmounted(
        &self,
        _ctx: &Ctx,
        full_name: &str,
    ) -> std::result::Result<Option<moat_runtime::idmap::OverlayLayout>, String> {
        if !MachineFs::exists(&self.store, full_name) {
            return Ok(None);
        }
        let fs = MachineFs::open(&self.store, full_name).map_err(|e| e.to_string())?;
        match fs.overlay_unmounted().map_err(|e| e.to_string())? {
            Some(o) => Ok(Some(layout(o))),
            None => fs.mount().map(|_| None).map_err(|e| e.to_string()),
        }
    }

    fn remount(&self, _ctx: &Ctx, full_name: &str) -> std::result::Result<(), String> {
        if !MachineFs::exists(&self.store, full_name) {
            return Ok(());
        }
        let fs = MachineFs::open(&self.store, full_name).map_err(|e| e.to_string())?;
        fs.mount().map(|_| ()).map_err(|e| e.to_string())
    }

    fn release(&self, _ctx: &Ctx, full_name: &str) -> std::result::Result<(), String> {
        if !MachineFs::exists(&self.store, full_name) {
            return Ok(());
        }
        let fs = MachineFs::open(&self.store, full_name).map_err(|e| e.to_string())?;
        // Unmounts first; a disposable machine's writable layer is not
        // emptied separately, it goes with the rest.
        fs.destroy().map_err(|e| e.to_string())
    }
}

/// The runtime's name for an unmounted machine overlay.
fn layout(o: moat_image::OverlaySpec) -> moat_runtime::idmap::OverlayLayout {
    moat_runtime::idmap::OverlayLayout {
        lowers: o.lowers,
        upper: o.upper,
        work: o.work,
        volatile: o.volatile,
    }
}

impl StoreRootfs {
    /// The machine's root from the store: mounted, or (`mount` false, an
    /// overlay not mounted yet) its layers for the runtime to mount.
    fn prepare_with(
        &self,
        machine: &Machine,
        mount: bool,
    ) -> std::result::Result<PreparedRootfs, String> {
        let image = self
            .store
            .get(&machine.image)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("image '{}' is not in the store", machine.image))?;
        let fs = if MachineFs::exists(&self.store, &machine.full_name) {
            MachineFs::open(&self.store, &machine.full_name).map_err(|e| e.to_string())?
        } else {
            MachineFs::create(&self.store, &machine.full_name, &image, machine.disposable)
                .map_err(|e| e.to_string())?
        };
        let overlay = if mount {
            None
        } else {
            fs.overlay_unmounted()
                .map_err(|e| e.to_string())?
                .map(layout)
        };
        let path = match overlay {
            Some(_) => fs.rootfs(),
            None => fs.mount().map_err(|e| e.to_string())?,
        };
        let c = &image.config;
        Ok(PreparedRootfs {
            path,
            config: DriverImageConfig {
                entrypoint: c.entrypoint.clone(),
                cmd: c.cmd.clone(),
                env: c.env.clone(),
                workdir: c.workdir.clone(),
                user: parse_user(&c.user),
            },
            // A declared machine is long-lived: run the image's init when it has one
            // (system container); `command:` overrides (the driver decides).
            system: c.init.is_some(),
            overlay,
        })
    }
}

/// Attaches NICs through the network layer.
pub struct NetAttacher {
    pub net: NetHost<HostExecutor>,
    pub alias: String,
}

impl NetworkAttacher for NetAttacher {
    fn attach(&self, _ctx: &Ctx, spec: &MachineSpec, pid: i32) -> std::result::Result<(), String> {
        self.attach_to(spec, &NetnsTarget::Pid(pid as u32))
    }

    fn attach_netns(
        &self,
        _ctx: &Ctx,
        spec: &MachineSpec,
        netns: &std::path::Path,
    ) -> std::result::Result<(), String> {
        self.attach_to(spec, &NetnsTarget::Path(netns.to_path_buf()))
    }

    fn attaches_by_path(&self) -> bool {
        true
    }
}

impl NetAttacher {
    fn attach_to(
        &self,
        spec: &MachineSpec,
        target: &NetnsTarget,
    ) -> std::result::Result<(), String> {
        let (Some(nic), Some(br)) = (&spec.nic, &spec.bridge) else {
            return Ok(());
        };
        let subnet = Ipv4Net::new(br.gateway, br.prefix_len)
            .map_err(|e| e.to_string())?
            .trunc();
        let net = ResolvedNetwork {
            domain: spec.machine.domain.clone(),
            subnet,
            gateway: br.gateway,
            bridge: br.name.clone(),
        };
        self.net
            .attach(nic, &net, &self.alias, target)
            .map_err(|e| e.to_string())
    }
}

/// The nspawn driver's NICs: the same veth wiring, into the network
/// namespace file moat prepared for the machine.
impl moat_driver::nspawn::NetnsAttacher for NetAttacher {
    fn attach_netns(
        &self,
        _ctx: &Ctx,
        domain: &str,
        nic: &moat_core::model::ResolvedNic,
        br: &moat_driver::BridgeInfo,
        netns: &std::path::Path,
    ) -> std::result::Result<(), String> {
        let subnet = Ipv4Net::new(br.gateway, br.prefix_len)
            .map_err(|e| e.to_string())?
            .trunc();
        let net = ResolvedNetwork {
            domain: domain.into(),
            subnet,
            gateway: br.gateway,
            bridge: br.name.clone(),
        };
        self.net
            .attach(nic, &net, &self.alias, &NetnsTarget::Path(netns.into()))
            .map_err(|e| e.to_string())
    }
}

/// Everything the engine acts on.
pub struct Host {
    pub ctx: Ctx,
    pub net: NetHost<HostExecutor>,
    pub images: ImageStore,
    pub drivers: BTreeMap<&'static str, Arc<dyn Driver>>,
}

impl Host {
    pub fn open(ctx: Ctx, root_str: &str) -> Result<Host> {
        let images = ImageStore::open(&ctx.root).map_err(|e| EngineError::Failed(e.to_string()))?;
        let net = NetHost::new(HostExecutor);
        let native = NativeDriver::new(Arc::new(StoreRootfs {
            store: images.clone(),
        }))
        .with_network(Arc::new(NetAttacher {
            net: NetHost::new(HostExecutor),
            alias: moat_core::naming::if_alias(root_str),
        }));
        let mut drivers: BTreeMap<&'static str, Arc<dyn Driver>> = BTreeMap::new();
        drivers.insert("native", Arc::new(native));
        let nspawn = moat_driver::nspawn::NspawnDriver::new(Arc::new(StoreRootfs {
            store: images.clone(),
        }))
        .with_network(Arc::new(NetAttacher {
            net: NetHost::new(HostExecutor),
            alias: moat_core::naming::if_alias(root_str),
        }));
        drivers.insert("nspawn", Arc::new(nspawn));
        drivers.insert("incus", Arc::new(moat_incus::IncusDriver::new()));
        drivers.insert(
            "qemu",
            Arc::new(moat_qemu::QemuDriver::new(
                images.clone(),
                moat_core::naming::if_alias(root_str),
            )),
        );
        Ok(Host {
            ctx,
            net,
            images,
            drivers,
        })
    }

    /// The driver that creates `domain`'s bridge itself (the first of its
    /// machines' drivers that manages networks), if any.
    pub fn network_driver(
        &self,
        resolved: &moat_core::model::Resolved,
        domain: &str,
    ) -> Option<&Arc<dyn Driver>> {
        let d = resolved.project.domains.get(domain)?;
        d.machines
            .values()
            .filter_map(|m| self.drivers.get(m.driver.as_str()))
            .find(|d| d.manages_networks())
    }

    pub fn driver(&self, name: &str) -> Result<&Arc<dyn Driver>> {
        self.drivers.get(name).ok_or_else(|| {
            EngineError::Failed(format!(
                "driver '{name}' is not available in this version (available: {})",
                self.drivers.keys().copied().collect::<Vec<_>>().join(", ")
            ))
        })
    }
}
