//! Prepares a caller-provided root file system for one container: the
//! `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname` files moat manages,
//! and ownership for the user namespace.
//!
//! Ownership: the machine's root is host uid `host_id`. moat shifts the
//! ownership of the machine's own rootfs (every uid/gid below the range size
//! gets `+host_id`) once, marked by the rootfs root folder's owner. With an
//! overlay rootfs this copies metadata up into the machine's writable layer
//! only (overlayfs `metacopy` when enabled), leaving shared lower layers
//! untouched. See docs/runtime.md for why not idmapped mounts yet.

use crate::spec::ContainerSpec;
use crate::RuntimeError;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub(crate) fn prepare(spec: &ContainerSpec) -> Result<(), RuntimeError> {
    let root = &spec.rootfs;
    let meta = fs::metadata(root).map_err(|e| RuntimeError::io(root, e))?;
    if !meta.is_dir() {
        return Err(RuntimeError::io(
            root,
            std::io::Error::other("the rootfs is not a folder"),
        ));
    }
    let etc = root.join("etc");
    if !etc.exists() {
        fs::create_dir_all(&etc).map_err(|e| RuntimeError::io(&etc, e))?;
    }
    let write = |name: &str, text: &str| -> Result<(), RuntimeError> {
        let p = etc.join(name);
        // A symlink (e.g. resolv.conf -> /run/...) would be followed on the host.
        if fs::symlink_metadata(&p)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
        {
            fs::remove_file(&p).map_err(|e| RuntimeError::io(&p, e))?;
        }
        fs::write(&p, text).map_err(|e| RuntimeError::io(&p, e))
    };
    if let Some(h) = &spec.etc_hosts {
        write("hosts", h)?;
    }
    if let Some(r) = &spec.resolv_conf {
        write("resolv.conf", r)?;
    }
    if let Some(h) = &spec.hostname {
        write("hostname", &format!("{h}\n"))?;
    }
    if let (Some(r), false) = (spec.idmap, spec.privileged) {
        let meta = fs::metadata(root).map_err(|e| RuntimeError::io(root, e))?;
        if meta.uid() != r.host_id {
            shift_tree(root, r.host_id, r.size)?;
        }
    }
    Ok(())
}

/// Adds `base` to every uid/gid below `size` in the tree (not following
/// symlinks, staying on one file system).
fn shift_tree(root: &Path, base: u32, size: u32) -> Result<(), RuntimeError> {
    let dev = fs::metadata(root)
        .map_err(|e| RuntimeError::io(root, e))?
        .dev();
    let mut stack = vec![root.to_path_buf()];
    // Children first would be nicer for interruption, but the marker is the
    // root folder, which is shifted last below.
    let mut dirs = Vec::new();
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).map_err(|e| RuntimeError::io(&p, e))?;
        if m.is_dir() && m.dev() == dev {
            for entry in fs::read_dir(&p).map_err(|e| RuntimeError::io(&p, e))? {
                let entry = entry.map_err(|e| RuntimeError::io(&p, e))?;
                stack.push(entry.path());
            }
            dirs.push((p, m));
            continue;
        }
        shift_one(&p, &m, base, size)?;
    }
    for (p, m) in dirs.into_iter().rev() {
        shift_one(&p, &m, base, size)?;
    }
    Ok(())
}

fn shift_one(p: &Path, m: &fs::Metadata, base: u32, size: u32) -> Result<(), RuntimeError> {
    let shift = |id: u32| if id < size { id + base } else { id };
    let (uid, gid) = (shift(m.uid()), shift(m.gid()));
    if uid == m.uid() && gid == m.gid() {
        return Ok(());
    }
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(|e| RuntimeError::io(p, e))?;
    // chown clears setuid/setgid bits on regular files: put them back.
    if m.is_file() && m.mode() & 0o6000 != 0 {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(p, fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(|e| RuntimeError::io(p, e))?;
    }
    Ok(())
}
