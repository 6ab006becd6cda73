//! One-time ownership shift of a machine's root for its user namespace
//! (uid/gid `n < 65536` → `base + n`), done by moat before nspawn runs:
//! nspawn 252 cannot idmap an overlayfs root and falls back to its own
//! recursive chown, which is several times slower. The marker is the owner
//! of the root folder (shifted last), which nspawn also checks, so it then
//! leaves the tree alone. On an overlay with `metacopy=on` only metadata is
//! copied up into the machine's writable layer; shared layers are untouched.
//! POSIX ACL entries are not shifted (minimal images carry none).
//! A root already shifted for another range (a clone of another machine:
//! same files, new range) is moved from that range to the new one.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

/// Is `p` on overlayfs (which nspawn 252 cannot idmap)?
pub fn is_overlay(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: c is a valid NUL-terminated path; st is zeroed and only written by statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == OVERLAYFS_SUPER_MAGIC
}

/// Is the tree already shifted to `base`?
pub fn is_shifted(root: &Path, base: u32) -> bool {
    fs::symlink_metadata(root).is_ok_and(|m| m.uid() == base)
}

/// Moves every owner in `[from, from + size)` to `base + (id - from)`, where
/// `from` is the root folder's current owner when that is another range's
/// base (≥ `size`), else 0. Stays on one file system, never follows
/// symlinks; the root folder goes last (it is the marker).
pub fn shift_tree(root: &Path, base: u32, size: u32) -> io::Result<()> {
    let ctx = |p: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    let root_meta = fs::metadata(root).map_err(|e| ctx(root, e))?;
    let dev = root_meta.dev();
    let from = if root_meta.uid() >= size {
        root_meta.uid()
    } else {
        0
    };
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
        shift_one(&p, &m, from, base, size).map_err(|e| ctx(&p, e))?;
    }
    for (p, m) in dirs.into_iter().rev() {
        shift_one(&p, &m, from, base, size).map_err(|e| ctx(&p, e))?;
    }
    Ok(())
}

fn shift_one(p: &Path, m: &fs::Metadata, from: u32, base: u32, size: u32) -> io::Result<()> {
    let shift = |id: u32| {
        if id >= from && id - from < size {
            id - from + base
        } else {
            id
        }
    };
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
    fn shifts_from_zero_and_from_another_range() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // lchown to other ids needs root; covered by the root tests
        }
        let t = tempfile::tempdir().expect("tempdir");
        let f = t.path().join("f");
        fs::write(&f, "x").expect("write");
        std::os::unix::fs::lchown(t.path(), Some(0), Some(0)).expect("chown");
        std::os::unix::fs::lchown(&f, Some(5), Some(5)).expect("chown");
        shift_tree(t.path(), 200_000, 65536).expect("shift");
        assert_eq!(fs::metadata(&f).expect("meta").uid(), 200_005);
        assert!(is_shifted(t.path(), 200_000));
        shift_tree(t.path(), 400_000, 65536).expect("reshift");
        assert_eq!(fs::metadata(&f).expect("meta").uid(), 400_005);
        assert!(is_shifted(t.path(), 400_000));
    }

    #[test]
    fn marker_is_the_root_owner() {
        let t = tempfile::tempdir().expect("tempdir");
        let uid = fs::metadata(t.path()).expect("meta").uid();
        assert!(is_shifted(t.path(), uid));
        assert!(!is_shifted(t.path(), uid + 1));
    }
}
