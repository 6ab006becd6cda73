//! One-time ownership shift of a machine's root for its user namespace
//! (uid/gid `n < 65536` → `base + n`), done by moat before nspawn runs:
//! nspawn 252 cannot idmap an overlayfs root and falls back to its own
//! recursive chown, which is several times slower. The marker is the owner
//! of the root folder (shifted last), which nspawn also checks, so it then
//! leaves the tree alone. On an overlay with `metacopy=on` only metadata is
//! copied up into the machine's writable layer; shared layers are untouched.
//! POSIX ACL entries are not shifted (minimal images carry none).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Is the tree already shifted to `base`?
pub fn is_shifted(root: &Path, base: u32) -> bool {
    fs::symlink_metadata(root).is_ok_and(|m| m.uid() == base)
}

/// Shifts every owner below `size` by `base`, staying on one file system and
/// never following symlinks. The root folder goes last (it is the marker).
pub fn shift_tree(root: &Path, base: u32, size: u32) -> io::Result<()> {
    let ctx = |p: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    let dev = fs::metadata(root).map_err(|e| ctx(root, e))?.dev();
    let mut stack = vec![root.to_path_buf()];
    let mut dirs = Vec::new();
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).map_err(|e| ctx(&p, e))?;
        if m.is_dir() && m.dev() == dev {
            for entry in fs::read_dir(&p).map_err(|e| ctx(&p, e))? {
                stack.push(entry.map_err(|e| ctx(&p, e))?.path());
            }
            dirs.push((p, m));
            continue;
        }
        shift_one(&p, &m, base, size).map_err(|e| ctx(&p, e))?;
    }
    for (p, m) in dirs.into_iter().rev() {
        shift_one(&p, &m, base, size).map_err(|e| ctx(&p, e))?;
    }
    Ok(())
}

fn shift_one(p: &Path, m: &fs::Metadata, base: u32, size: u32) -> io::Result<()> {
    let shift = |id: u32| if id < size { id + base } else { id };
    let (uid, gid) = (shift(m.uid()), shift(m.gid()));
    if uid == m.uid() && gid == m.gid() {
        return Ok(());
    }
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
    // chown clears setuid/setgid on regular files: put them back.
    if m.is_file() && m.mode() & 0o6000 != 0 {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(p, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_is_the_root_owner() {
        let t = tempfile::tempdir().expect("tempdir");
        let uid = fs::metadata(t.path()).expect("meta").uid();
        assert!(is_shifted(t.path(), uid));
        assert!(!is_shifted(t.path(), uid + 1));
    }
}
