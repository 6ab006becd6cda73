//! VM disks: qcow2 backing chains through `qemu-img`.
//!
//! ```text
//! <root>/images/vm/<name>.qcow2        base disks (`moat image build --vm`, imported cloud images)
//! <root>/images/vm/layers/<hex>.qcow2  frozen overlays (a machine's disk at a clone); read-only
//! <root>/qemu/<machine>/disk.qcow2     the machine's writable overlay (backing: a base or a layer)
//! ```
//!
//! Clone of a stopped VM: its overlay is *frozen* (renamed into `layers/`, never written again),
//! then the source and the clone each get a fresh empty overlay on it: two `rename`/`create`
//! calls, whatever the disk size. A disposable VM's overlay is recreated empty at each start and
//! removed at stop. Snapshots are qcow2 internal snapshots of the machine's overlay (its
//! backing files never change, so they capture the whole disk).

use crate::QemuError;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `qemu-img`.
pub const QEMU_IMG: &str = "qemu-img";

/// Runs a command; its stdout, or an error naming what was being done.
pub(crate) fn run(what: &str, cmd: &mut Command) -> Result<String, QemuError> {
    let argv = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.output().map_err(|e| QemuError::Command {
        what: what.into(),
        cmd: argv.clone(),
        stderr: format!("{e} (is it installed? scripts/deps.sh installs it)"),
    })?;
    if !out.status.success() {
        return Err(QemuError::Command {
            what: what.into(),
            cmd: argv,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `qemu-img info` says about one image.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ImgInfo {
    pub filename: String,
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    #[serde(rename = "full-backing-filename", default)]
    pub backing: Option<String>,
    #[serde(default)]
    pub snapshots: Vec<ImgSnapshot>,
}

/// A qcow2 internal snapshot.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
pub struct ImgSnapshot {
    pub name: String,
    /// Bytes of saved VM state (0 for a disk-only snapshot).
    #[serde(rename = "vm-state-size", default)]
    pub vm_state_size: u64,
    #[serde(rename = "date-sec", default)]
    pub date_sec: u64,
}

pub fn parse_info(json: &str) -> Result<ImgInfo, QemuError> {
    serde_json::from_str(json)
        .map_err(|e| QemuError::Failed(format!("cannot read `qemu-img info` output: {e}")))
}

/// `qemu-img info` (shared-lock mode, so it also works while QEMU runs).
pub fn info(path: &Path) -> Result<ImgInfo, QemuError> {
    let out = run(
        &format!("reading disk {}", path.display()),
        Command::new(QEMU_IMG)
            .args(["info", "-U", "--output=json"])
            .arg(path),
    )?;
    parse_info(&out)
}

/// Every file of the backing chain, the image itself first.
pub fn chain(path: &Path) -> Result<Vec<ImgInfo>, QemuError> {
    let out = run(
        &format!("reading the backing chain of {}", path.display()),
        Command::new(QEMU_IMG)
            .args(["info", "-U", "--backing-chain", "--output=json"])
            .arg(path),
    )?;
    // One file: an object; several: an array.
    if out.trim_start().starts_with('[') {
        serde_json::from_str(&out)
            .map_err(|e| QemuError::Failed(format!("cannot read `qemu-img info` output: {e}")))
    } else {
        Ok(vec![parse_info(&out)?])
    }
}

/// The argv of `qemu-img create` for an empty overlay over `base`.
pub fn overlay_args(base: &Path, base_format: &str, overlay: &Path) -> Vec<String> {
    vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-b".into(),
        base.to_string_lossy().into_owned(),
        "-F".into(),
        base_format.into(),
        overlay.to_string_lossy().into_owned(),
    ]
}

/// An empty qcow2 overlay over `base` (constant time: nothing is copied).
pub fn create_overlay(base: &Path, base_format: &str, overlay: &Path) -> Result<(), QemuError> {
    run(
        &format!("creating disk {}", overlay.display()),
        Command::new(QEMU_IMG).args(overlay_args(base, base_format, overlay)),
    )
    .map(|_| ())
}

/// An empty qcow2 disk of `size` bytes.
pub fn create_blank(path: &Path, size: u64) -> Result<(), QemuError> {
    run(
        &format!("creating disk {}", path.display()),
        Command::new(QEMU_IMG)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size.to_string()),
    )
    .map(|_| ())
}

/// Grows the disk to `size` bytes (never shrinks: a smaller size is ignored,
/// the guest's file systems would be cut).
pub fn grow(path: &Path, size: u64) -> Result<bool, QemuError> {
    let i = info(path)?;
    if size <= i.virtual_size {
        return Ok(false);
    }
    run(
        &format!("resizing disk {}", path.display()),
        Command::new(QEMU_IMG)
            .args(["resize", "-q", "-f", &i.format])
            .arg(path)
            .arg(size.to_string()),
    )?;
    Ok(true)
}

fn snapshot_op(path: &Path, flag: &str, name: &str, what: &str) -> Result<(), QemuError> {
    run(
        &format!("{what} snapshot '{name}' of {}", path.display()),
        Command::new(QEMU_IMG)
            .args(["snapshot", flag, name])
            .arg(path),
    )
    .map(|_| ())
}

pub fn snapshot_create(path: &Path, name: &str) -> Result<(), QemuError> {
    snapshot_op(path, "-c", name, "creating")
}

pub fn snapshot_apply(path: &Path, name: &str) -> Result<(), QemuError> {
    snapshot_op(path, "-a", name, "restoring")
}

pub fn snapshot_delete(path: &Path, name: &str) -> Result<(), QemuError> {
    snapshot_op(path, "-d", name, "deleting")
}

pub fn snapshots(path: &Path) -> Result<Vec<ImgSnapshot>, QemuError> {
    Ok(info(path)?.snapshots)
}

/// Where VM base disks and frozen layers live.
pub fn store_dir(root: &Path) -> PathBuf {
    root.join("images").join("vm")
}

/// The base disk of VM image `name` (`debian/bookworm` → `debian%2Fbookworm.qcow2`).
pub fn base_path(root: &Path, name: &str) -> PathBuf {
    store_dir(root).join(format!("{}.qcow2", moat_image::store::escape_name(name)))
}

fn random_hex() -> String {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    let mut h = Sha256::new();
    h.update(b);
    h.update(std::process::id().to_le_bytes());
    hex::encode(&h.finalize()[..12])
}

/// Freezes `overlay` into a read-only layer of the store (one rename) and
/// puts a fresh empty overlay on it at the same path. Returns the layer.
pub fn freeze(root: &Path, overlay: &Path) -> Result<PathBuf, QemuError> {
    let layers = store_dir(root).join("layers");
    std::fs::create_dir_all(&layers)
        .map_err(QemuError::io(format!("creating {}", layers.display())))?;
    let layer = layers.join(format!("{}.qcow2", random_hex()));
    std::fs::rename(overlay, &layer).map_err(QemuError::io(format!(
        "moving {} to {}",
        overlay.display(),
        layer.display()
    )))?;
    if let Err(e) = create_overlay(&layer, "qcow2", overlay) {
        // Put the machine's disk back as it was.
        let _ = std::fs::rename(&layer, overlay);
        return Err(e);
    }
    set_readonly(&layer);
    Ok(layer)
}

fn set_readonly(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444));
}

/// Removes frozen layers no disk in `roots` (machine overlays, base disks)
/// reaches through its backing chain. Returns how many were removed.
pub fn gc_layers(root: &Path, disks: &[PathBuf]) -> Result<usize, QemuError> {
    let layers = store_dir(root).join("layers");
    let Ok(rd) = std::fs::read_dir(&layers) else {
        return Ok(0);
    };
    let mut used = std::collections::BTreeSet::new();
    for d in disks.iter().filter(|d| d.exists()) {
        for i in chain(d)? {
            used.insert(PathBuf::from(&i.filename));
        }
    }
    let mut n = 0;
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "qcow2") && !used.contains(&p) {
            std::fs::remove_file(&p).map_err(QemuError::io(format!("removing {}", p.display())))?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_argv_names_the_backing_format() {
        let a = overlay_args(
            Path::new("/b/base.qcow2"),
            "raw",
            Path::new("/m/disk.qcow2"),
        );
        assert_eq!(
            a.join(" "),
            "create -q -f qcow2 -b /b/base.qcow2 -F raw /m/disk.qcow2"
        );
    }

    #[test]
    fn parses_qemu_img_info() {
        let j = r#"{"virtual-size": 10737418240, "filename": "/m/disk.qcow2", "format": "qcow2",
            "actual-size": 200704, "full-backing-filename": "/b/base.qcow2",
            "backing-filename": "/b/base.qcow2",
            "snapshots": [{"icount": 0, "vm-state-size": 0, "date-sec": 1700000000,
              "date-nsec": 0, "vm-clock-sec": 0, "vm-clock-nsec": 0, "id": "1", "name": "s1"}],
            "dirty-flag": false}"#;
        let i = parse_info(j).unwrap();
        assert_eq!(i.virtual_size, 10 << 30);
        assert_eq!(i.backing.as_deref(), Some("/b/base.qcow2"));
        assert_eq!(i.snapshots[0].name, "s1");
        assert_eq!(
            base_path(Path::new("/r"), "debian/bookworm"),
            Path::new("/r/images/vm/debian%2Fbookworm.qcow2")
        );
    }
}
