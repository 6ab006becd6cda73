//! A machine's root filesystem: the image's read-only layers stacked under a per-machine
//! writable layer with overlayfs, plus clone, snapshots and disposable machines.
//!
//! ```text
//! <root>/machines/<machine>/fs/
//!   state.json          MachineFsState: image, layer stack (bottom first), disposable
//!   upper/ work/        overlayfs upperdir and workdir (the machine's changes)
//!   rootfs/             mount point: what the runtime gets
//!   snapshots/<n>.json  SnapshotInfo: a saved layer stack
//! ```
//!
//! Freezing: clone and snapshot turn the machine's `upper/` into a read-only store layer
//! (`frozen:<hex>`) with one rename, push it on the machine's layer stack and start a new empty
//! upper. Nothing is copied, so both take the same time whatever the image or upper size. The stack
//! grows by one layer per clone/snapshot (overlayfs accepts up to 500 lower layers).
//!
//! ```text
//!  create ──> [unmounted] ──mount──> [mounted] ──unmount──> [unmounted] ──destroy──> gone
//!               │  clone / snapshot create (freeze) / restore: only while unmounted
//!               │  (snapshot create of a mounted machine copies upper/ instead)
//!  disposable: mount starts from an empty upper/, unmount empties it.
//! ```

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext, Result};
use crate::store::{check_simple_name, now, random_hex, read_json, write_json, Image, ImageStore};

/// A machine's overlay, not mounted: what mounting it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlaySpec {
    /// Top-most first (overlayfs order).
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// A disposable machine's layer: mount it `volatile`.
    pub volatile: bool,
}

/// What the store records about a machine's rootfs (also the machine's layer reference for gc).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineFsState {
    pub machine: String,
    /// The image it was created from (by name and id at that time).
    pub image: String,
    pub image_id: String,
    /// Read-only layers, bottom-most first: the image's, then frozen ones.
    pub layers: Vec<String>,
    /// Fresh writable layer at each mount, emptied at unmount.
    pub disposable: bool,
    pub created: u64,
    /// How the writable layer is made (chosen at create: btrfs when the store is on btrfs).
    #[serde(default)]
    pub backend: Backend,
}

/// How a machine's writable rootfs is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// overlayfs: image layers as lower dirs, `upper/` as the writable layer.
    #[default]
    Overlay,
    /// A writable btrfs snapshot of the image's flattened base subvolume (see crate::btrfs).
    Btrfs,
}

/// A saved state of a machine's rootfs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub created: u64,
    /// The full layer stack to restore, bottom-most first.
    pub layers: Vec<String>,
}

/// A machine's root filesystem in the store.
#[derive(Clone, Debug)]
pub struct MachineFs {
    store: ImageStore,
    dir: PathBuf,
    state: MachineFsState,
}

fn fs_dir(store: &ImageStore, machine: &str) -> PathBuf {
    store.machines_dir().join(machine).join("fs")
}

/// Image ids machines were created from (their btrfs base subvolumes are kept by gc).
pub(crate) fn machine_image_ids(store: &ImageStore) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for m in MachineFs::list(store)? {
        v.push(MachineFs::open(store, &m)?.state.image_id);
    }
    Ok(v)
}

/// Every layer a machine rootfs or snapshot uses.
pub(crate) fn machine_layer_refs(store: &ImageStore) -> Result<BTreeSet<String>> {
    let mut set = BTreeSet::new();
    let md = store.machines_dir();
    for e in fs::read_dir(&md).ctx("read directory", &md)?.flatten() {
        let dir = e.path().join("fs");
        let sp = dir.join("state.json");
        if !sp.exists() {
            continue;
        }
        let st: MachineFsState = read_json(&sp, "machine rootfs state")?;
        set.extend(st.layers);
        let snaps = dir.join("snapshots");
        if let Ok(rd) = fs::read_dir(&snaps) {
            for s in rd.flatten() {
                if s.path().extension().is_some_and(|x| x == "json") {
                    let si: SnapshotInfo = read_json(&s.path(), "snapshot")?;
                    set.extend(si.layers);
                }
            }
        }
    }
    Ok(set)
}

fn empty_dir(p: &Path) -> Result<()> {
    if p.exists() {
        fs::remove_dir_all(p).ctx("remove", p)?;
    }
    fs::create_dir_all(p).ctx("create directory", p)
}

fn is_empty_dir(p: &Path) -> Result<bool> {
    match fs::read_dir(p) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).ctx("read directory", p),
    }
}

impl MachineFs {
    /// Create the rootfs of `machine` from `image` (unmounted). Fails if it exists.
    pub fn create(
        store: &ImageStore,
        machine: &str,
        image: &Image,
        disposable: bool,
    ) -> Result<MachineFs> {
        check_simple_name("machine", machine)?;
        let _l = store.lock()?;
        let dir = fs_dir(store, machine);
        if dir.join("state.json").exists() {
            return Err(ImageError::MachineExists(machine.to_string()));
        }
        for l in &image.layers {
            if !store.has_layer(l) {
                return Err(ImageError::BadSource {
                    source_desc: image.source.clone(),
                    reason: format!(
                        "layer {l} of image {} is missing; build the image again",
                        image.name
                    ),
                });
            }
        }
        // The machine's folder when it exists already (the native driver made
        // a disposable machine's a tmpfs), else where it will be made.
        let home = dir.parent().filter(|p| p.is_dir());
        let backend = if crate::btrfs::usable(home.unwrap_or(&store.machines_dir())) {
            Backend::Btrfs
        } else {
            Backend::Overlay
        };
        let state = MachineFsState {
            machine: machine.to_string(),
            image: image.name.clone(),
            image_id: image.id.clone(),
            layers: image.layers.clone(),
            disposable,
            created: now(),
            backend,
        };
        match backend {
            Backend::Overlay => {
                for d in ["upper", "work", "rootfs"] {
                    fs::create_dir_all(dir.join(d)).ctx("create directory", dir.join(d))?;
                }
            }
            Backend::Btrfs => {
                fs::create_dir_all(&dir).ctx("create directory", &dir)?;
                let base = crate::btrfs::ensure_base(store, image)?;
                if !disposable {
                    crate::btrfs::snapshot(&base, &dir.join("rootfs"), false)?;
                }
            }
        }
        // A disposable machine does not outlive a crash: no fsync.
        crate::store::write_json_with(&dir.join("state.json"), &state, !disposable)?;
        Ok(MachineFs {
            store: store.clone(),
            dir,
            state,
        })
    }

    /// The rootfs of `machine`.
    pub fn open(store: &ImageStore, machine: &str) -> Result<MachineFs> {
        check_simple_name("machine", machine)?;
        let dir = fs_dir(store, machine);
        let sp = dir.join("state.json");
        if !sp.exists() {
            return Err(ImageError::NoSuchMachine(machine.to_string()));
        }
        let state = read_json(&sp, "machine rootfs state")?;
        Ok(MachineFs {
            store: store.clone(),
            dir,
            state,
        })
    }

    /// Whether `machine` has a rootfs in the store.
    pub fn exists(store: &ImageStore, machine: &str) -> bool {
        fs_dir(store, machine).join("state.json").exists()
    }

    /// Names of all machines with a rootfs.
    pub fn list(store: &ImageStore) -> Result<Vec<String>> {
        let md = store.machines_dir();
        let mut v: Vec<String> = fs::read_dir(&md)
            .ctx("read directory", &md)?
            .flatten()
            .filter(|e| e.path().join("fs/state.json").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    }

    pub fn name(&self) -> &str {
        &self.state.machine
    }

    pub fn state(&self) -> &MachineFsState {
        &self.state
    }

    /// Where the rootfs is mounted: the path to hand to the runtime.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// The machine's writable layer (its changes against the image): `upper/` with overlayfs,
    /// the rootfs subvolume itself with btrfs.
    pub fn upper(&self) -> PathBuf {
        match self.state.backend {
            Backend::Overlay => self.dir.join("upper"),
            Backend::Btrfs => self.rootfs(),
        }
    }

    /// Whether the rootfs is in use (overlay mounted; for btrfs, between mount and unmount).
    pub fn is_mounted(&self) -> Result<bool> {
        match self.state.backend {
            Backend::Overlay => Ok(moat_host::mount::is_mount_point(&self.rootfs())?),
            Backend::Btrfs => Ok(self.dir.join("active").exists()),
        }
    }

    fn btrfs_base(&self) -> PathBuf {
        crate::btrfs::base_dir(&self.store).join(crate::store::layer_dir_name(&self.state.image_id))
    }

    /// A btrfs machine's rootfs subvolume, made from the base when missing (disposable).
    fn btrfs_ensure_rootfs(&self) -> Result<()> {
        if !self.rootfs().exists() {
            crate::btrfs::snapshot(&self.btrfs_base(), &self.rootfs(), false)?;
        }
        Ok(())
    }

    fn save(&self) -> Result<()> {
        write_json(&self.dir.join("state.json"), &self.state)
    }

    fn lowers(&self) -> Result<Vec<PathBuf>> {
        self.state
            .layers
            .iter()
            .rev()
            .map(|l| self.store.short_layer_path(l))
            .collect()
    }

    /// Mount the rootfs (idempotent) and return its path. Disposable machines start empty.
    pub fn mount(&self) -> Result<PathBuf> {
        let rootfs = self.rootfs();
        if self.is_mounted()? {
            return Ok(rootfs);
        }
        if self.state.backend == Backend::Btrfs {
            if self.state.disposable {
                crate::btrfs::delete(&rootfs)?;
            }
            self.btrfs_ensure_rootfs()?;
            let a = self.dir.join("active");
            fs::write(&a, b"").ctx("write", &a)?;
            return Ok(rootfs);
        }
        let o = self.overlay_ready()?;
        // A disposable machine's changes are thrown away: skip overlayfs's syncs (cheap unmount).
        moat_host::mount::mount_overlay_with(
            &o.lowers,
            Some((&o.upper, &o.work)),
            &rootfs,
            o.volatile,
        )?;
        Ok(rootfs)
    }

    /// Everything [`MachineFs::mount`] does but the mount itself, for a
    /// caller that mounts the overlay its own way (the native runtime's
    /// supervisor mounts it with idmapped lower layers at once). `None` when
    /// the rootfs is mounted already or is a btrfs snapshot (then
    /// [`MachineFs::mount`] it instead).
    pub fn overlay_unmounted(&self) -> Result<Option<OverlaySpec>> {
        if self.state.backend == Backend::Btrfs || self.is_mounted()? {
            return Ok(None);
        }
        self.overlay_ready().map(Some)
    }

    /// The overlay's folders made (a disposable machine's emptied).
    fn overlay_ready(&self) -> Result<OverlaySpec> {
        if self.state.disposable {
            // Normally emptied at unmount already; a crash may have left changes behind.
            if !is_empty_dir(&self.upper())? {
                empty_dir(&self.upper())?;
            }
            if !is_empty_dir(&self.dir.join("work"))? {
                empty_dir(&self.dir.join("work"))?;
            }
        }
        for d in ["upper", "work", "rootfs"] {
            fs::create_dir_all(self.dir.join(d)).ctx("create directory", self.dir.join(d))?;
        }
        Ok(OverlaySpec {
            lowers: self.lowers()?,
            upper: self.upper(),
            work: self.dir.join("work"),
            volatile: self.state.disposable,
        })
    }

    /// Unmount the rootfs (idempotent; detaches lazily when busy). Disposable machines lose their
    /// changes here.
    pub fn unmount(&self) -> Result<()> {
        self.unmount_inner(true)
    }

    fn unmount_inner(&self, reset_disposable: bool) -> Result<()> {
        let rootfs = self.rootfs();
        // Most often the overlay is all there is: one unmount, no read of the
        // mount table (the kernel refuses it with EBUSY while anything is
        // mounted below it or it is in use, and the loop below sees to that).
        // One statx checks that no second mount was stacked below it.
        let done = self.state.backend == Backend::Overlay
            && moat_host::mount::unmount(&rootfs, false).is_ok()
            && !moat_host::mount::is_mount_point(&rootfs).unwrap_or(true);
        // Mounts the runtime left below the rootfs (proc, dev, ...) go first.
        let left = if done {
            Vec::new()
        } else {
            moat_host::mount::mounts_under(&rootfs)?
        };
        for m in left {
            if moat_host::mount::unmount(&m, false).is_err() {
                moat_host::mount::unmount(&m, true)?;
            }
        }
        if self.state.backend == Backend::Btrfs {
            if self.state.disposable && reset_disposable {
                crate::btrfs::delete(&rootfs)?;
            }
            let a = self.dir.join("active");
            if a.exists() {
                fs::remove_file(&a).ctx("remove", &a)?;
            }
            return Ok(());
        }
        if self.state.disposable && reset_disposable {
            empty_dir(&self.upper())?;
            empty_dir(&self.dir.join("work"))?;
        }
        Ok(())
    }

    /// Unmount and delete the machine's rootfs and snapshots. Layers stay until gc.
    pub fn destroy(self) -> Result<()> {
        self.unmount_inner(false)?;
        let _l = self.store.lock()?;
        if self.state.backend == Backend::Btrfs {
            crate::btrfs::delete(&self.rootfs())?;
            for s in self.snapshots()? {
                crate::btrfs::delete(&self.snapshot_subvol(&s.name))?;
            }
        }
        // A disposable machine whose folder is a tmpfs of its own (the
        // native driver's): the files go when its owner unmounts it, right
        // after this; removing them one by one first only costs time.
        let own_tmpfs = self.state.backend == Backend::Overlay
            && self.state.disposable
            && self
                .dir
                .parent()
                .is_some_and(|p| moat_host::mount::is_mount_point(p).unwrap_or(false));
        if !own_tmpfs {
            fs::remove_dir_all(&self.dir).ctx("remove", &self.dir)?;
        }
        if let Some(parent) = self.dir.parent() {
            // The machine's folder may hold other tools' files; remove it only when empty.
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    /// Turn upper/ into a read-only layer with one rename. None when upper/ is empty.
    /// Caller holds the store lock and has checked the rootfs is unmounted.
    fn freeze_upper(&mut self) -> Result<Option<String>> {
        let upper = self.upper();
        if is_empty_dir(&upper)? {
            return Ok(None);
        }
        let id = format!("frozen:{}", random_hex());
        // The size is not computed: that would walk the tree, and freezing must stay O(1).
        self.store.install_layer_dir(
            &upper,
            &id,
            &format!("frozen upper of {}", self.state.machine),
            0,
        )?;
        self.state.layers.push(id.clone());
        self.save()?;
        empty_dir(&upper)?;
        empty_dir(&self.dir.join("work"))?;
        Ok(Some(id))
    }

    fn require_unmounted(&self, op: &'static str) -> Result<()> {
        if self.is_mounted()? {
            return Err(ImageError::MachineMounted {
                machine: self.state.machine.clone(),
                op,
            });
        }
        Ok(())
    }

    /// Clone this (stopped) machine's rootfs as `new`, in constant time: this machine's changes
    /// are frozen into a shared read-only layer and both machines get empty writable layers.
    pub fn clone_to(&mut self, new: &str) -> Result<MachineFs> {
        check_simple_name("machine", new)?;
        self.require_unmounted("cloning it")?;
        let _l = self.store.lock()?;
        let dir = fs_dir(&self.store, new);
        if dir.join("state.json").exists() {
            return Err(ImageError::MachineExists(new.to_string()));
        }
        let state = MachineFsState {
            machine: new.to_string(),
            created: now(),
            ..self.state.clone()
        };
        if self.state.backend == Backend::Btrfs {
            fs::create_dir_all(dir.join("snapshots"))
                .ctx("create directory", dir.join("snapshots"))?;
            if !self.state.disposable {
                self.btrfs_ensure_rootfs()?;
                crate::btrfs::snapshot(&self.rootfs(), &dir.join("rootfs"), false)?;
            }
            write_json(&dir.join("state.json"), &state)?;
            return Ok(MachineFs {
                store: self.store.clone(),
                dir,
                state,
            });
        }
        self.freeze_upper()?;
        let state = MachineFsState {
            layers: self.state.layers.clone(),
            ..state
        };
        for d in ["upper", "work", "rootfs", "snapshots"] {
            fs::create_dir_all(dir.join(d)).ctx("create directory", dir.join(d))?;
        }
        write_json(&dir.join("state.json"), &state)?;
        Ok(MachineFs {
            store: self.store.clone(),
            dir,
            state,
        })
    }

    fn snapshot_path(&self, name: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{name}.json"))
    }

    fn snapshot_subvol(&self, name: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{name}.subvol"))
    }

    /// Save the current rootfs as snapshot `name`. Stopped machine: constant time (freeze).
    /// Mounted machine: upper/ is copied into a new read-only layer (time grows with the changes).
    pub fn snapshot_create(&mut self, name: &str) -> Result<SnapshotInfo> {
        self.snapshot_create_held(name, || Ok(()))
    }

    /// [`Self::snapshot_create`] of a machine that is running: `hold` is
    /// called once the store is locked and the name checked, right before the
    /// files are read, and what it returns (a frozen machine) is dropped once
    /// they are saved; its error aborts with nothing changed.
    pub fn snapshot_create_held<G>(
        &mut self,
        name: &str,
        hold: impl FnOnce() -> std::result::Result<G, String>,
    ) -> Result<SnapshotInfo> {
        check_simple_name("snapshot", name)?;
        let mounted = self.is_mounted()?;
        let _l = self.store.lock()?;
        if self.snapshot_path(name).exists() {
            return Err(ImageError::SnapshotExists {
                machine: self.state.machine.clone(),
                snapshot: name.to_string(),
            });
        }
        let _held = hold().map_err(|e| ImageError::Io {
            op: "hold still for a snapshot:",
            path: self.dir.clone(),
            source: std::io::Error::other(e),
        })?;
        let sd = self.dir.join("snapshots");
        fs::create_dir_all(&sd).ctx("create directory", &sd)?;
        let layers = if self.state.backend == Backend::Btrfs {
            // Read-only snapshot; fine while the machine runs (crash-consistent).
            self.btrfs_ensure_rootfs()?;
            crate::btrfs::snapshot(&self.rootfs(), &self.snapshot_subvol(name), true)?;
            self.state.layers.clone()
        } else if mounted {
            let mut layers = self.state.layers.clone();
            if !is_empty_dir(&self.upper())? {
                let st = self.store.staging()?;
                crate::sources::copy_tree(&self.upper(), st.path())?;
                let id = format!("frozen:{}", random_hex());
                let size = crate::layer::tree_size(st.path())?;
                self.store.install_layer_dir(
                    st.path(),
                    &id,
                    &format!("snapshot {name} of {}", self.state.machine),
                    size,
                )?;
                layers.push(id);
            }
            layers
        } else {
            self.freeze_upper()?;
            self.state.layers.clone()
        };
        fs::create_dir_all(self.dir.join("snapshots"))
            .ctx("create directory", self.dir.join("snapshots"))?;
        let info = SnapshotInfo {
            name: name.to_string(),
            created: now(),
            layers,
        };
        write_json(&self.snapshot_path(name), &info)?;
        Ok(info)
    }

    /// The machine's snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let d = self.dir.join("snapshots");
        let mut v: Vec<SnapshotInfo> = Vec::new();
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "json") {
                    v.push(read_json(&e.path(), "snapshot")?);
                }
            }
        }
        v.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        Ok(v)
    }

    fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        check_simple_name("snapshot", name)?;
        let p = self.snapshot_path(name);
        if !p.exists() {
            return Err(ImageError::NoSuchSnapshot {
                machine: self.state.machine.clone(),
                snapshot: name.to_string(),
            });
        }
        read_json(&p, "snapshot")
    }

    /// Put the rootfs back to snapshot `name` (machine stopped). Changes since are discarded.
    pub fn snapshot_restore(&mut self, name: &str) -> Result<()> {
        self.require_unmounted("restoring a snapshot")?;
        let snap = self.snapshot(name)?;
        let _l = self.store.lock()?;
        if self.state.backend == Backend::Btrfs {
            crate::btrfs::delete(&self.rootfs())?;
            return crate::btrfs::snapshot(&self.snapshot_subvol(name), &self.rootfs(), false);
        }
        self.state.layers = snap.layers;
        self.save()?;
        empty_dir(&self.upper())?;
        empty_dir(&self.dir.join("work"))
    }

    /// Delete snapshot `name`. Its layers stay while the machine (or gc's other referents) uses them.
    pub fn snapshot_remove(&self, name: &str) -> Result<()> {
        self.snapshot(name)?;
        let _l = self.store.lock()?;
        if self.state.backend == Backend::Btrfs {
            crate::btrfs::delete(&self.snapshot_subvol(name))?;
        }
        let p = self.snapshot_path(name);
        fs::remove_file(&p).ctx("remove", &p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::Built;
    use crate::store::ImageConfig;

    fn store_with_image() -> (tempfile::TempDir, ImageStore, Image) {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::open(d.path()).unwrap();
        let st = s.staging().unwrap();
        // A "big" layer: clone must not copy it.
        fs::write(st.path().join("big"), vec![7u8; 1 << 20]).unwrap();
        s.commit_layer(st, "sha256:base", "test").unwrap();
        let img = s
            .commit_image(
                "img",
                Built {
                    layers: vec!["sha256:base".into()],
                    config: ImageConfig::default(),
                    source: "test".into(),
                },
            )
            .unwrap();
        (d, s, img)
    }

    #[test]
    fn clone_moves_upper_and_shares_layers() {
        let (_d, s, img) = store_with_image();
        let mut a = MachineFs::create(&s, "a", &img, false).unwrap();
        fs::write(a.upper().join("changed"), b"x").unwrap();
        let upper_ino =
            std::os::unix::fs::MetadataExt::ino(&fs::metadata(a.upper().join("changed")).unwrap());
        let b = a.clone_to("b").unwrap();
        assert_eq!(a.state().layers, b.state().layers);
        assert_eq!(a.state().layers.len(), 2);
        let frozen = s.layer_path(&a.state().layers[1]);
        // Same inode: the change was moved, not copied; the base layer is untouched.
        let ino =
            std::os::unix::fs::MetadataExt::ino(&fs::metadata(frozen.join("changed")).unwrap());
        assert_eq!(ino, upper_ino);
        assert!(is_empty_dir(&a.upper()).unwrap());
        assert!(is_empty_dir(&b.upper()).unwrap());
        assert!(fs::read_dir(s.dir().join("tmp")).unwrap().next().is_none());
        // gc keeps everything a machine uses, even once the image is gone.
        s.remove("img").unwrap();
        assert!(s.gc().unwrap().removed_layers.is_empty());
        a.destroy().unwrap();
        assert!(s.gc().unwrap().removed_layers.is_empty());
        b.destroy().unwrap();
        assert_eq!(s.gc().unwrap().removed_layers.len(), 2);
    }

    #[test]
    fn snapshot_restore_brings_back_the_stack() {
        let (_d, s, img) = store_with_image();
        let mut m = MachineFs::create(&s, "m", &img, false).unwrap();
        fs::write(m.upper().join("v"), b"1").unwrap();
        let snap = m.snapshot_create("one").unwrap();
        assert_eq!(snap.layers.len(), 2);
        fs::write(m.upper().join("v"), b"2").unwrap();
        m.snapshot_create("two").unwrap();
        m.snapshot_restore("one").unwrap();
        assert_eq!(m.state().layers, snap.layers);
        assert_eq!(m.snapshots().unwrap().len(), 2);
        m.snapshot_remove("two").unwrap();
        assert_eq!(m.snapshots().unwrap().len(), 1);
        // The layer only "two" used is garbage now.
        assert_eq!(s.gc().unwrap().removed_layers.len(), 1);
        assert!(matches!(
            m.snapshot_restore("two"),
            Err(ImageError::NoSuchSnapshot { .. })
        ));
    }
}
