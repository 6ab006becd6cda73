//! Idmapped overlay roots: the kernel calls behind `rootfs`'s `idmapped` mode.
//!
//! An image layer on disk is owned by 0..65535. Each lower layer is cloned
//! as a detached mount (`open_tree(OPEN_TREE_CLONE)`), given an id mapping
//! with `mount_setattr(MOUNT_ATTR_IDMAP)` (on-disk id `b + k` shows as host
//! id `base + k`), and handed to a new overlayfs by file descriptor
//! (`fsconfig(FSCONFIG_SET_FD, "lowerdir+")`, Linux 6.13+). The upper layer is
//! not idmapped: what the machine writes lands on disk in its own id range,
//! as with the older chown ("shift") mode, so the two modes share uppers.
//!
//! ```text
//! layer dir ──open_tree──> detached clone ──mount_setattr(IDMAP, userns fd)──┐
//!                                                                            ├─> fsopen("overlay")
//! upper/, work/ (paths) ─────────────────────────────────────────────────────┘   fsconfig ... CMD_CREATE
//!                                                     fsmount ──move_mount──> the machine's rootfs
//! ```
//!
//! The user namespace that carries a mapping is made by a short-lived child
//! (raw `clone(CLONE_NEWUSER)`, it only sleeps); its `ns/user` fd outlives it.
//! Detached clones are freed when their fds close; the overlay keeps private
//! clones of its layers, so no extra mount ever shows in mountinfo.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use moat_host::mount::api::{
    MountAttr, AT_EMPTY_PATH, FSCONFIG_CMD_CREATE, FSCONFIG_SET_FD, FSCONFIG_SET_FLAG,
    FSCONFIG_SET_STRING, FSMOUNT_CLOEXEC, FSOPEN_CLOEXEC, MOUNT_ATTR_IDMAP,
    MOVE_MOUNT_F_EMPTY_PATH, OPEN_TREE_CLONE,
};

/// An overlay as mounted: what is needed to mount it again differently.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OverlayLayout {
    /// Top-most first (overlayfs order).
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Mounted `volatile` (a disposable machine's layer).
    #[serde(default)]
    pub volatile: bool,
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

fn owned(rc: libc::c_long) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as libc::c_int) })
}

fn with_context(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A user namespace whose map sends ids `from..from+size` to host ids
/// `to..to+size` (uids and gids alike).
pub fn userns_fd(from: u32, to: u32, size: u32) -> io::Result<OwnedFd> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: a raw clone without CLONE_VM behaves like fork; the child only
    // makes async-signal-safe syscalls (close_range, prctl, getppid, pause,
    // _exit) and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error())
            .map_err(with_context("clone(CLONE_NEWUSER)".into()));
    }
    if pid == 0 {
        // SAFETY: prctl and pause have no memory-safety preconditions; the
        // loop never returns into the parent's copied Rust state.
        unsafe {
            // It needs none of the caller's descriptors: a copy of a
            // daemon's listening socket or of a held lock must not live on
            // here (connecting would then find a daemon that never answers).
            libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // A caller killed before the prctl took effect sends no signal:
            // this helper would pause forever.
            if libc::getppid() != parent {
                libc::_exit(9);
            }
            loop {
                libc::pause();
            }
        }
    }
    let pid = pid as libc::pid_t;
    let map = format!("{from} {to} {size}\n");
    let result = (|| {
        for f in ["uid_map", "gid_map"] {
            let p = format!("/proc/{pid}/{f}");
            fs::write(&p, &map).map_err(with_context(format!("write {p}")))?;
        }
        let p = format!("/proc/{pid}/ns/user");
        fs::File::open(&p)
            .map(OwnedFd::from)
            .map_err(with_context(format!("open {p}")))
    })();
    let _ = crate::sys::kill(pid, libc::SIGKILL);
    let _ = crate::sys::wait_pid(pid);
    result
}

/// A detached clone of the folder `dir`, idmapped through `userns`.
fn idmapped_clone(dir: &Path, userns: &OwnedFd) -> io::Result<OwnedFd> {
    let c = cstring(dir)?;
    // SAFETY: c is a valid path string for the call; the result is checked.
    let tree = owned(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    })
    .map_err(with_context(format!("open_tree({})", dir.display())))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: tree is a detached mount fd, "" with AT_EMPTY_PATH names it,
    // attr is a valid mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).map_err(with_context(format!(
            "mount_setattr(MOUNT_ATTR_IDMAP) on {}",
            dir.display()
        )));
    }
    Ok(tree)
}

/// The on-disk id base of a layer: 0 for an image layer; for a frozen
/// writable layer (clone, snapshot) the id range of the machine that wrote
/// it, found from the owner of the layer's root or its top-level entries,
/// aligned on moat's range grid.
pub fn layer_base(dir: &Path, size: u32) -> u32 {
    let mut uids = Vec::new();
    if let Ok(m) = fs::metadata(dir) {
        uids.push(m.uid());
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten().take(64) {
            if let Ok(m) = e.metadata() {
                uids.push(m.uid());
            }
        }
    }
    let base = crate::profile::ID_BASE;
    match uids.into_iter().find(|u| *u >= size) {
        Some(u) if u >= base => base + (u - base) / size * size,
        Some(u) => u / size * size,
        None => 0,
    }
}

/// A prepared overlay context: lowers idmapped and set, upper/work set; not
/// created yet (the plain mount using the same upper may still be there).
pub struct PendingOverlay {
    fsfd: OwnedFd,
    /// The idmapped clones: closing the last fd of a detached mount
    /// dissolves it, and overlayfs only clones its layers at create.
    _lowers: Vec<OwnedFd>,
}

fn fsconfig(
    fsfd: &OwnedFd,
    cmd: libc::c_uint,
    key: Option<&CStr>,
    value: *const libc::c_void,
    aux: libc::c_int,
) -> io::Result<()> {
    // SAFETY: fsfd is an fs context fd; key/value are valid for `cmd` (NULL
    // where the command takes none) and outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fsfd.as_raw_fd(),
            cmd,
            key.map_or(std::ptr::null(), |k| k.as_ptr()),
            value,
            aux,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("{e}{}", kernel_messages(fsfd)),
        ));
    }
    Ok(())
}

/// What the kernel logged into the fs context (overlayfs explains refusals there).
fn kernel_messages(fsfd: &OwnedFd) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 512];
    for _ in 0..8 {
        // SAFETY: buf is a valid writable buffer of its length.
        let n = unsafe { libc::read(fsfd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.push_str(" (");
        out.push_str(String::from_utf8_lossy(&buf[..n as usize]).trim());
        out.push(')');
    }
    out
}

/// Sets up an overlay context for `layout` whose lowers show on-disk ids
/// `b..b+size` (`b` from [`layer_base`]) as `base..base+size`. `userns`,
/// when given, maps `0..size` to `base..base+size` (the machine's own user
/// namespace): image layers (`b` = 0) are idmapped through it instead of a
/// user namespace made here.
pub fn prepare_overlay(
    layout: &OverlayLayout,
    base: u32,
    size: u32,
    source: &str,
    userns: Option<BorrowedFd<'_>>,
) -> io::Result<PendingOverlay> {
    // SAFETY: the type name is a valid C string; the result is checked.
    let fsfd =
        owned(unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) })
            .map_err(with_context("fsopen(overlay)".into()))?;
    let src = CString::new(source)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "source holds a NUL byte"))?;
    fsconfig(
        &fsfd,
        FSCONFIG_SET_STRING,
        Some(c"source"),
        src.as_ptr().cast(),
        0,
    )
    .map_err(with_context("fsconfig source".into()))?;
    let mut namespaces: BTreeMap<u32, OwnedFd> = BTreeMap::new();
    if let Some(u) = userns {
        namespaces.insert(0, u.try_clone_to_owned()?);
    }
    let mut trees = Vec::with_capacity(layout.lowers.len());
    for lower in &layout.lowers {
        let b = layer_base(lower, size);
        let ns = match namespaces.entry(b) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(userns_fd(b, base, size)?),
        };
        let tree = idmapped_clone(lower, ns)?;
        fsconfig(
            &fsfd,
            FSCONFIG_SET_FD,
            Some(c"lowerdir+"),
            std::ptr::null(),
            tree.as_raw_fd(),
        )
        .map_err(with_context(format!(
            "fsconfig lowerdir+ (fd of {})",
            lower.display()
        )))?;
        trees.push(tree);
    }
    for (key, p) in [(c"upperdir", &layout.upper), (c"workdir", &layout.work)] {
        let v = cstring(p)?;
        fsconfig(&fsfd, FSCONFIG_SET_STRING, Some(key), v.as_ptr().cast(), 0)
            .map_err(with_context(format!("fsconfig {key:?} {}", p.display())))?;
    }
    if layout.volatile {
        fsconfig(
            &fsfd,
            FSCONFIG_SET_FLAG,
            Some(c"volatile"),
            std::ptr::null(),
            0,
        )
        .map_err(with_context("fsconfig volatile".into()))?;
    }
    Ok(PendingOverlay {
        fsfd,
        _lowers: trees,
    })
}

impl PendingOverlay {
    /// Creates the overlay and returns it as a detached mount.
    pub fn create(self) -> io::Result<OwnedFd> {
        fsconfig(&self.fsfd, FSCONFIG_CMD_CREATE, None, std::ptr::null(), 0)
            .map_err(with_context("create the idmapped overlay".into()))?;
        // SAFETY: fsfd is a created fs context; the result is checked.
        owned(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                self.fsfd.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                0 as libc::c_uint,
            )
        })
        .map_err(with_context("fsmount of the idmapped overlay".into()))
    }
}

/// Attaches a detached mount on `target`.
pub fn attach(mount: &OwnedFd, target: &Path) -> io::Result<()> {
    let t = cstring(target)?;
    // SAFETY: mount is a detached mount fd, "" with F_EMPTY_PATH names it; t
    // is a valid path string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).map_err(with_context(format!(
            "move_mount onto {}",
            target.display()
        )));
    }
    Ok(())
}

/// Where a successful [`probe`] is remembered for the running kernel (the
/// boot id): every supervisor start asked again, at about 2 ms each.
const PROBE_CACHE: &str = "/run/moat/idmap-probe-ok";

fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Can this kernel build an overlay from idmapped lower layers passed by fd?
/// Tried on a tiny overlay in a temporary folder below `scratch` (nothing is
/// attached; the folder is removed), once per process, and a success once per
/// boot (the kernel cannot change without one): later supervisors read
/// [`PROBE_CACHE`].
pub fn probe(scratch: &Path) -> Result<(), String> {
    static RESULT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    RESULT
        .get_or_init(|| {
            let boot = boot_id();
            if boot.is_some()
                && fs::read_to_string(PROBE_CACHE)
                    .ok()
                    .map(|c| c.trim().to_string())
                    == boot
            {
                return Ok(());
            }
            let dir = scratch.join(format!(".idmap-probe-{}", std::process::id()));
            let r = (|| -> io::Result<()> {
                let layout = OverlayLayout {
                    lowers: vec![dir.join("lower")],
                    upper: dir.join("upper"),
                    work: dir.join("work"),
                    volatile: false,
                };
                for d in [&layout.lowers[0], &layout.upper, &layout.work] {
                    fs::create_dir_all(d)?;
                }
                let base = crate::profile::ID_BASE;
                let size = crate::profile::IDS_PER_MACHINE;
                prepare_overlay(&layout, base, size, "moat-idmap-probe", None)?
                    .create()
                    .map(drop)
            })();
            let _ = fs::remove_dir_all(&dir);
            if let (Ok(()), Some(b)) = (&r, &boot) {
                let cache = Path::new(PROBE_CACHE);
                if let Some(parent) = cache.parent() {
                    let _ = fs::create_dir_all(parent);
                }
                let tmp = cache.with_extension(format!("tmp-{}", std::process::id()));
                if fs::write(&tmp, b).is_ok() {
                    let _ = fs::rename(&tmp, cache);
                }
            }
            r.map_err(|e| e.to_string())
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_base_of_image_and_frozen_layers() {
        let size = crate::profile::IDS_PER_MACHINE;
        let t = tempfile::tempdir().expect("tempdir");
        let me = fs::metadata(t.path()).expect("stat").uid();
        // Whoever runs the unit tests owns the folder: a low uid is an image layer.
        if me < size {
            assert_eq!(layer_base(t.path(), size), 0);
        }
        assert_eq!(layer_base(Path::new("/nonexistent/moat"), size), 0);
    }
}
