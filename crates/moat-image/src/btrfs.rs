//! The btrfs backend of machine root filesystems, used when the store is on btrfs: each image is
//! flattened once into a base subvolume (`images/btrfs/<image id>/`), a machine's rootfs is a
//! writable snapshot of it, and clone / snapshot / restore are subvolume snapshots (constant
//! time, copy-on-write). Subvolumes are handled with the `btrfs` tool (btrfs-progs).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ImageError, IoContext, Result};
use crate::store::{layer_dir_name, random_hex, Image, ImageStore};

/// Whether `path` is on btrfs and the `btrfs` tool is there. `MOAT_STORAGE=overlay` opts out.
pub fn usable(path: &Path) -> bool {
    if std::env::var("MOAT_STORAGE").is_ok_and(|v| v == "overlay") {
        return false;
    }
    let on_btrfs =
        moat_host::mount::fs_magic(path).is_ok_and(|m| m == moat_host::mount::BTRFS_MAGIC);
    on_btrfs
        && Command::new("btrfs")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn btrfs(args: &[&str], paths: &[&Path]) -> Result<()> {
    let mut cmd = Command::new("btrfs");
    cmd.args(args).args(paths);
    let argv = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| ImageError::Command {
        argv: argv.clone(),
        status: "not started".into(),
        stderr: format!("{e}; install btrfs-progs"),
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            argv,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Writable (or, with `readonly`, read-only) snapshot of subvolume `from` at `to`.
pub(crate) fn snapshot(from: &Path, to: &Path, readonly: bool) -> Result<()> {
    if readonly {
        btrfs(&["subvolume", "snapshot", "-r"], &[from, to])
    } else {
        btrfs(&["subvolume", "snapshot"], &[from, to])
    }
}

/// Delete subvolume `p` if it exists.
pub(crate) fn delete(p: &Path) -> Result<()> {
    if fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    btrfs(&["subvolume", "delete"], &[p])
}

pub(crate) fn base_dir(store: &ImageStore) -> PathBuf {
    store.dir().join("btrfs")
}

/// The image's flattened base subvolume, created on first use: the image's layers are mounted
/// as a read-only overlay (which applies the whiteouts) and copied into a new subvolume.
pub(crate) fn ensure_base(store: &ImageStore, image: &Image) -> Result<PathBuf> {
    let dir = base_dir(store);
    fs::create_dir_all(&dir).ctx("create directory", &dir)?;
    let base = dir.join(layer_dir_name(&image.id));
    if base.exists() {
        return Ok(base);
    }
    let tmp = dir.join(format!("tmp-{}", random_hex()));
    btrfs(&["subvolume", "create"], &[&tmp])?;
    let result = (|| {
        let lowers: Vec<PathBuf> = image
            .layers
            .iter()
            .rev()
            .map(|l| store.short_layer_path(l))
            .collect::<Result<_>>()?;
        if lowers.len() == 1 {
            crate::sources::copy_tree(&lowers[0], &tmp)
        } else {
            let mnt = dir.join(format!("mnt-{}", random_hex()));
            fs::create_dir_all(&mnt).ctx("create directory", &mnt)?;
            moat_host::mount::mount_overlay(&lowers, None, &mnt)?;
            let r = crate::sources::copy_tree(&mnt, &tmp);
            let u = moat_host::mount::unmount(&mnt, true);
            let _ = fs::remove_dir(&mnt);
            r?;
            u?;
            Ok(())
        }
    })();
    if let Err(e) = result {
        let _ = delete(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &base).ctx("move base subvolume into place", &base)?;
    Ok(base)
}

/// Delete base subvolumes of images that no longer exist. Caller holds the store lock.
pub(crate) fn gc_bases(store: &ImageStore, live_ids: &[String]) -> Result<Vec<String>> {
    let dir = base_dir(store);
    let mut removed = Vec::new();
    let Ok(rd) = fs::read_dir(&dir) else {
        return Ok(removed);
    };
    let keep: Vec<String> = live_ids.iter().map(|i| layer_dir_name(i)).collect();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name) {
            delete(&e.path())?;
            removed.push(name);
        }
    }
    Ok(removed)
}
