//! Mount helpers for the image store: overlayfs mounts and unmounts, mount-point checks, and the
//! two overlayfs markers (whiteout device, opaque-dir xattr) that image layers are written with.
//!
//! Thin, safe wrappers over the syscalls; callers pass paths, get a [`MountError`] that names the
//! path and the mount options on failure.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Constants and structs of the new mount API (<linux/mount.h>) that the libc
/// crate does not export; shared by the overlay code here and moat-runtime's
/// idmapped mounts.
pub mod api {
    pub const OPEN_TREE_CLONE: libc::c_uint = 1;
    pub const AT_EMPTY_PATH: libc::c_uint = 0x1000;
    pub const MOUNT_ATTR_RDONLY: libc::c_uint = 1;
    pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
    pub const MOUNT_ATTR_NODEV: u64 = 0x4;
    pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;
    pub const AT_RECURSIVE: libc::c_uint = 0x8000;
    pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
    pub const FSOPEN_CLOEXEC: libc::c_uint = 1;
    pub const FSCONFIG_SET_FLAG: libc::c_uint = 0;
    pub const FSCONFIG_SET_STRING: libc::c_uint = 1;
    pub const FSCONFIG_SET_FD: libc::c_uint = 5;
    pub const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    pub const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    pub const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

    /// `struct mount_attr`, the argument of mount_setattr(2).
    #[repr(C)]
    pub struct MountAttr {
        pub attr_set: u64,
        pub attr_clr: u64,
        pub propagation: u64,
        pub userns_fd: u64,
    }
}

/// A mount-related syscall failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// mount(2) of an overlay failed.
    #[error("cannot mount overlayfs on {target} (options {options}): {source}; check that overlayfs is available and the layer folders exist")]
    Overlay {
        target: PathBuf,
        options: String,
        source: io::Error,
    },
    /// The overlay options do not fit in one page (too many or too long layer paths).
    #[error("overlayfs options for {target} are {len} bytes, more than the kernel accepts (4095); use a store root with a shorter path or fewer layers")]
    OptionsTooLong { target: PathBuf, len: usize },
    /// mount(2) of a tmpfs failed.
    #[error("cannot mount a tmpfs on {target}: {source}; this needs root (CAP_SYS_ADMIN)")]
    Tmpfs { target: PathBuf, source: io::Error },
    /// umount2(2) failed.
    #[error("cannot unmount {target}: {source}; check for processes still using it (fuser -m)")]
    Unmount { target: PathBuf, source: io::Error },
    /// mknod(2) of a whiteout failed.
    #[error("cannot create overlay whiteout {path}: {source}; whiteouts need root (CAP_MKNOD)")]
    Whiteout { path: PathBuf, source: io::Error },
    /// setxattr(2) of the opaque marker failed.
    #[error("cannot mark {path} opaque (trusted.overlay.opaque): {source}; this needs root and a filesystem with trusted xattrs")]
    Opaque { path: PathBuf, source: io::Error },
    /// A path contained a NUL byte.
    #[error("path {0} contains a NUL byte")]
    Nul(PathBuf),
    /// /proc/self/mountinfo could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(io::Error),
}

fn cpath(p: &Path) -> Result<CString, MountError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| MountError::Nul(p.to_path_buf()))
}

/// Mount an overlay on `target`. `lowers` is ordered top-most first (overlayfs order).
/// With an empty `upper` the mount is read-only (lowers only; at least two lowers then).
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
) -> Result<(), MountError> {
    mount_overlay_with(lowers, upper, target, false)
}

/// [`mount_overlay`], optionally `volatile`: overlayfs then skips all syncs to the upper layer,
/// which makes unmount ~20x cheaper; for writable layers that are thrown away anyway. The
/// workdir must be emptied before a volatile overlay is mounted again.
pub fn mount_overlay_with(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
    volatile: bool,
) -> Result<(), MountError> {
    let lower = lowers
        .iter()
        .map(|p| escape_overlay_path(p))
        .collect::<Vec<_>>()
        .join(":");
    let mut options = format!("lowerdir={lower}");
    if let Some((up, work)) = upper {
        options.push_str(&format!(
            ",upperdir={},workdir={}",
            escape_overlay_path(up),
            escape_overlay_path(work)
        ));
        if volatile {
            options.push_str(",volatile");
        }
    }
    if options.len() > 4095 {
        // Too long for mount(2)'s one page: the new mount API takes one lower dir per call
        // (`lowerdir+`, Linux 6.8+).
        return mount_overlay_fsconfig(lowers, upper, target, volatile).map_err(|e| match e {
            Some(e) => e,
            None => MountError::OptionsTooLong {
                target: target.to_path_buf(),
                len: options.len(),
            },
        });
    }
    let t = cpath(target)?;
    let data = CString::new(options.clone()).map_err(|_| MountError::Nul(target.to_path_buf()))?;
    let src = c"overlay";
    let fstype = c"overlay";
    let flags = if upper.is_none() { libc::MS_RDONLY } else { 0 };
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            t.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(MountError::Overlay {
            target: target.to_path_buf(),
            options,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Mount an overlay with fsopen/fsconfig/fsmount/move_mount. `Err(None)` when this kernel lacks
/// the API or `lowerdir+` (the caller reports the options as too long then).
fn mount_overlay_fsconfig(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
    volatile: bool,
) -> Result<(), Option<MountError>> {
    use api::{
        FSCONFIG_CMD_CREATE, FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSMOUNT_CLOEXEC,
        FSOPEN_CLOEXEC, MOUNT_ATTR_RDONLY, MOVE_MOUNT_F_EMPTY_PATH,
    };
    let fail = |what: &str| {
        Some(MountError::Overlay {
            target: target.to_path_buf(),
            options: format!("new mount API, {what}, {} lower dirs", lowers.len()),
            source: io::Error::last_os_error(),
        })
    };
    let fstype = c"overlay";
    // SAFETY: `fstype` is a valid C string; the returned fd is owned below.
    let fsfd = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    if fsfd < 0 {
        return Err(None);
    }
    let fsfd = fsfd as libc::c_int;
    let close = |fd: libc::c_int| {
        // SAFETY: `fd` is an fd this function opened and closes once.
        unsafe { libc::close(fd) };
    };
    let set = |key: &std::ffi::CStr, val: &Path| -> Result<(), ()> {
        let v = CString::new(val.as_os_str().as_bytes()).map_err(|_| ())?;
        // SAFETY: fsfd is a valid fs context fd; key and v are valid C strings for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fsfd,
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                v.as_ptr(),
                0,
            )
        };
        if rc < 0 {
            Err(())
        } else {
            Ok(())
        }
    };
    for l in lowers {
        if set(c"lowerdir+", l).is_err() {
            close(fsfd);
            return Err(None);
        }
    }
    if let Some((up, work)) = upper {
        if set(c"upperdir", up).is_err() || set(c"workdir", work).is_err() {
            let e = fail("upperdir/workdir");
            close(fsfd);
            return Err(e);
        }
        if volatile {
            // SAFETY: fsfd is a valid fs context fd; the key is a valid C string, no value.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_fsconfig,
                    fsfd,
                    FSCONFIG_SET_FLAG,
                    c"volatile".as_ptr(),
                    std::ptr::null::<libc::c_char>(),
                    0,
                )
            };
            if rc < 0 {
                let e = fail("volatile");
                close(fsfd);
                return Err(e);
            }
        }
    }
    // SAFETY: fsfd is a valid fs context fd; the key/value pointers may be null for this command.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fsfd,
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc < 0 {
        let e = fail("create");
        close(fsfd);
        return Err(e);
    }
    let attrs = if upper.is_none() {
        MOUNT_ATTR_RDONLY
    } else {
        0
    };
    // SAFETY: fsfd is a valid, created fs context.
    let mfd = unsafe { libc::syscall(libc::SYS_fsmount, fsfd, FSMOUNT_CLOEXEC, attrs) };
    if mfd < 0 {
        let e = fail("fsmount");
        close(fsfd);
        return Err(e);
    }
    close(fsfd);
    let mfd = mfd as libc::c_int;
    let t = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| Some(MountError::Nul(target.to_path_buf())))?;
    // SAFETY: mfd is a valid detached mount fd; "" with F_EMPTY_PATH names it; t is a valid path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mfd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    let e = if rc < 0 { fail("move_mount") } else { None };
    close(mfd);
    match e {
        Some(e) => Err(Some(e)),
        None => Ok(()),
    }
}

/// overlayfs splits its options on `,` and lowerdir on `:`; both are escaped with `\`.
fn escape_overlay_path(p: &Path) -> String {
    let s = p.to_string_lossy();
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, ',' | ':' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Mount a fresh tmpfs (`mode` for its root folder, e.g. 0o755; nosuid,
/// nodev; the kernel's default size, half of RAM) at `target`.
pub fn mount_tmpfs(target: &Path, source: &str, mode: u32) -> Result<(), MountError> {
    let t = cpath(target)?;
    let src = CString::new(source).map_err(|_| MountError::Nul(target.to_path_buf()))?;
    let fstype = CString::new("tmpfs").expect("no NUL");
    let data = CString::new(format!("mode={mode:o}")).expect("no NUL");
    // SAFETY: all four are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            t.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(MountError::Tmpfs {
            target: target.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Unmount `target`. With `lazy`, detach it even when busy (MNT_DETACH).
pub fn unmount(target: &Path, lazy: bool) -> Result<(), MountError> {
    let t = cpath(target)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `t` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(t.as_ptr(), flags) };
    if rc != 0 {
        return Err(MountError::Unmount {
            target: target.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether `path` is a mount point: statx's mount-root attribute (Linux 5.8+,
/// one syscall), else /proc/self/mountinfo (a path that does not exist is not).
pub fn is_mount_point(path: &Path) -> Result<bool, MountError> {
    if let Some(root) = statx_mount_root(path) {
        return Ok(root);
    }
    is_mount_point_in_mountinfo(path)
}

/// `Some(is the root of a mount)`, or None when statx cannot tell.
fn statx_mount_root(path: &Path) -> Option<bool> {
    let c = cpath(path).ok()?;
    // SAFETY: an all-zero statx is a valid value to be overwritten.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a live, writable statx.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            0,
            &mut st,
        )
    };
    if rc != 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => Some(false),
            _ => None,
        };
    }
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    (st.stx_attributes_mask & bit != 0).then_some(st.stx_attributes & bit != 0)
}

fn is_mount_point_in_mountinfo(path: &Path) -> Result<bool, MountError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    let want = path.to_string_lossy();
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == want))
}

/// Whether a mount made at `path` (a folder) would propagate to other mount
/// namespaces: the mount that holds `path` is in a shared peer group
/// (`shared:N` in mountinfo, as `/` is on a host booted with systemd). A
/// mount made below a private or slave mount stays where it is made.
pub fn propagates(path: &Path) -> Result<bool, MountError> {
    let c = cpath(path)?;
    // SAFETY: an all-zero statx is a valid value to be overwritten.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a live, writable statx.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_NO_AUTOMOUNT,
            libc::STATX_MNT_ID,
            &mut st,
        )
    };
    if rc != 0 {
        return Err(MountError::MountInfo(io::Error::last_os_error()));
    }
    if st.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(MountError::MountInfo(io::Error::other(
            "statx gives no mount id (kernel older than 5.8)",
        )));
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    Ok(shared_in(&info, st.stx_mnt_id))
}

/// Whether mount `id` of the mountinfo text `info` is in a shared peer group.
fn shared_in(info: &str, id: u64) -> bool {
    info.lines().any(|l| {
        let mut f = l.split(' ');
        f.next().and_then(|i| i.parse::<u64>().ok()) == Some(id)
            && l.split(" - ")
                .next()
                .is_some_and(|left| left.split(' ').skip(6).any(|o| o.starts_with("shared:")))
    })
}

/// Every mount point at or below `prefix`, deepest first (the order to unmount them in).
pub fn mounts_under(prefix: &Path) -> Result<Vec<PathBuf>, MountError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| PathBuf::from(unescape_mountinfo(mp)))
        .filter(|p| p.starts_with(prefix))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    Ok(v)
}

/// mountinfo (and seq_show_option) escape space, tab, newline and backslash as `\ooo`.
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Create an overlayfs whiteout (a 0:0 character device) at `path`.
pub fn make_whiteout(path: &Path) -> Result<(), MountError> {
    let p = cpath(path)?;
    // SAFETY: `p` is a valid NUL-terminated string; mknod does not keep the pointer.
    let rc = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) };
    if rc != 0 {
        return Err(MountError::Whiteout {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Mark directory `path` opaque for overlayfs (`trusted.overlay.opaque=y`): lower layers' entries
/// below it are hidden.
pub fn set_opaque(path: &Path) -> Result<(), MountError> {
    let p = cpath(path)?;
    let name = c"trusted.overlay.opaque";
    let val = b"y";
    // SAFETY: `p` and `name` are valid NUL-terminated strings, `val` a valid 1-byte buffer.
    let rc =
        unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), val.as_ptr().cast(), val.len(), 0) };
    if rc != 0 {
        return Err(MountError::Opaque {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Set extended attribute `name` on `path` itself (not following a symlink).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: `p` and `n` are valid C strings and `value` a valid buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The filesystem type magic of `path` (statfs f_type), e.g. to detect btrfs.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: statfs is plain data; zeroed is a valid value for it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `p` is a valid C string and `st` a valid out-pointer for the call's duration.
    let rc = unsafe { libc::statfs(p.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// statfs magic of btrfs.
pub const BTRFS_MAGIC: i64 = 0x9123_683e;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_in_a_shared_peer_group_propagates() {
        let info = "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    26 25 0:22 / /proc rw,nosuid - proc proc rw\n\
                    40 25 0:40 / /var/lib/moat/machines/m rw master:7 - tmpfs t rw\n";
        assert!(shared_in(info, 25));
        assert!(!shared_in(info, 26));
        assert!(!shared_in(info, 40), "a slave does not send");
        assert!(!shared_in(info, 99));
    }

    #[test]
    fn escapes_overlay_separators() {
        assert_eq!(escape_overlay_path(Path::new("/a:b,c")), "/a\\:b\\,c");
    }

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/tail\\04"), "/tail\\04");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")).unwrap_or(true));
    }

    /// statx and mountinfo agree on a tmpfs, the folder under it, a plain
    /// folder and a missing path (needs root for the mount; skipped without).
    #[test]
    fn mount_point_checks_agree_on_a_tmpfs() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("m");
        std::fs::create_dir(&m).unwrap();
        let missing = t.path().join("missing");
        for p in [t.path(), m.as_path(), missing.as_path()] {
            assert!(!is_mount_point(p).unwrap(), "{}", p.display());
            assert!(!is_mount_point_in_mountinfo(p).unwrap());
        }
        mount_tmpfs(&m, "moat-test", 0o700).unwrap();
        let checked = || {
            assert_eq!(statx_mount_root(&m), Some(true));
            assert!(is_mount_point(&m).unwrap());
            assert!(is_mount_point_in_mountinfo(&m).unwrap());
            let meta = std::fs::metadata(&m).unwrap();
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
            std::fs::create_dir(m.join("sub")).unwrap();
            assert!(!is_mount_point(&m.join("sub")).unwrap());
        };
        let r = std::panic::catch_unwind(checked);
        unmount(&m, false).unwrap();
        assert!(!is_mount_point(&m).unwrap());
        r.unwrap();
    }
}
