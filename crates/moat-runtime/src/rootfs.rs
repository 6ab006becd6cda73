//! Prepares a caller-provided root file system for one container: ownership
//! for the user namespace, and the `/etc/hosts`, `/etc/resolv.conf` and
//! `/etc/hostname` files moat manages.
//!
//! Ownership (the machine's root is host uid `base`), one of two modes,
//! recorded in `<bundle>/rootfs.json` ([`RootfsRecord`]):
//! - **idmapped** (overlay roots, the default): the caller's overlay is
//!   replaced, at the same mount point, by one whose lower layers are
//!   idmapped mounts (see [`crate::idmap`]): shared image layers stay owned by
//!   0..65535 on disk and are neither chowned nor copied. Files the machine
//!   writes land in its upper layer in its own id range; files moat writes
//!   from the host are moved into that range too (the upper is walked once
//!   per fresh mount, which only holds the machine's own changes). The
//!   mount's source is `moat-idmapped:<base>`, so a restarted supervisor sees
//!   that the mount is already right.
//! - **shifted** (folder and btrfs roots, kernels without idmapped overlay
//!   layers, `MOAT_ROOTFS_OWNERSHIP=shifted`): every uid/gid below the range
//!   size gets `+base` once, marked by the root folder's owner. On an overlay
//!   that copies metadata up into the machine's writable layer only.
//!
//! Both modes store the same thing in the upper layer, so a machine moves
//! from one to the other without conversion. Privileged machines (no user
//! namespace) are `unmapped`.

use crate::idmap::{self, OverlayLayout};
use crate::spec::ContainerSpec;
use crate::RuntimeError;
use serde::{Deserialize, Serialize};
use std::fs;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How the machine's files get their owners in its user namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsOwnership {
    /// Idmapped lower layers; nothing shared is chowned.
    Idmapped,
    /// The tree was chowned into the machine's range.
    Shifted,
    /// No user namespace (privileged): host ids as they are.
    Unmapped,
}

impl RootfsOwnership {
    pub fn as_str(self) -> &'static str {
        match self {
            RootfsOwnership::Idmapped => "idmapped",
            RootfsOwnership::Shifted => "shifted",
            RootfsOwnership::Unmapped => "unmapped",
        }
    }
}

/// What [`prepare`] did last, saved as `<bundle>/rootfs.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsRecord {
    pub ownership: RootfsOwnership,
    /// Host id of the machine's root (0 when unmapped).
    pub base: u32,
    /// The overlay's layers, to mount it again for another range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayLayout>,
    /// Why idmapping was not used, when it was tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
}

pub(crate) const RECORD_FILE: &str = "rootfs.json";
const SOURCE_PREFIX: &str = "moat-idmapped:";

/// The record in `record_dir` (the bundle folder), if any.
pub fn read_record(record_dir: &Path) -> Option<RootfsRecord> {
    let text = fs::read(record_dir.join(RECORD_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_record(record_dir: &Path, rec: &RootfsRecord) -> Result<(), RuntimeError> {
    let p = record_dir.join(RECORD_FILE);
    let tmp = record_dir.join("rootfs.json.tmp");
    let text = serde_json::to_vec_pretty(rec).map_err(|e| RuntimeError::io(&p, e.into()))?;
    fs::write(&tmp, text).map_err(|e| RuntimeError::io(&tmp, e))?;
    fs::rename(&tmp, &p).map_err(|e| RuntimeError::io(&p, e))
}

/// Ownership first (it may replace the mount at the rootfs), then the /etc
/// files, then the record.
///
/// `userns`: a user namespace mapping root to `spec.idmap`, used to idmap
/// image layers instead of making one (see `idmap::prepare_overlay`).
pub(crate) fn prepare(
    spec: &ContainerSpec,
    record_dir: &Path,
    userns: Option<BorrowedFd<'_>>,
) -> Result<RootfsOwnership, RuntimeError> {
    let root = &spec.rootfs;
    let meta = fs::metadata(root).map_err(|e| RuntimeError::io(root, e))?;
    if !meta.is_dir() {
        return Err(RuntimeError::io(
            root,
            std::io::Error::other("the rootfs is not a folder"),
        ));
    }
    // An overlay the caller left to us (`ContainerSpec::overlay`), when
    // nothing is mounted there yet.
    // One read of the mount table for both.
    let top = top_mount(root).filter(|m| m.fstype == "overlay");
    let pending = spec.overlay.as_ref().filter(|_| top.is_none());
    let mut rec = match (spec.idmap, spec.privileged) {
        (Some(r), false) => {
            ensure_ownership(root, r.host_id, r.size, record_dir, top, pending, userns)?
        }
        _ => {
            if let Some(l) = pending {
                remount_plain(root, l)?;
            }
            RootfsRecord {
                ownership: RootfsOwnership::Unmapped,
                base: 0,
                overlay: None,
                fallback_reason: None,
            }
        }
    };
    let owner = match (rec.ownership, spec.idmap) {
        (RootfsOwnership::Unmapped, _) | (_, None) => None,
        (_, Some(r)) => Some(r),
    };
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
        fs::write(&p, text).map_err(|e| RuntimeError::io(&p, e))?;
        // A file moat creates from the host is owned by host root: move it
        // into the machine's range like the rest of its files.
        if let Some(r) = owner {
            for q in [&p, &etc] {
                let m = fs::symlink_metadata(q).map_err(|e| RuntimeError::io(q, e))?;
                shift_one(q, &m, r.host_id, r.size)?;
            }
        }
        Ok(())
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
    if rec.overlay.is_none() {
        // Keep the layout known from an earlier idmapped mount.
        rec.overlay = read_record(record_dir).and_then(|r| r.overlay);
    }
    write_record(record_dir, &rec)?;
    Ok(rec.ownership)
}

/// One line of /proc/self/mountinfo, the fields moat needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    fstype: String,
    source: String,
    super_opts: String,
}

/// The top-most mount whose mount point is `path`.
fn top_mount(path: &Path) -> Option<MountEntry> {
    // One statx tells most starts (nothing mounted there yet) without
    // reading the whole mount table.
    if moat_host::mount::is_mount_point(path).is_ok_and(|m| !m) {
        return None;
    }
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 || moat_host::mount::unescape_mountinfo(fields[4]) != want {
            continue;
        }
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < sep + 4 {
            continue;
        }
        found = Some(MountEntry {
            fstype: fields[sep + 1].to_string(),
            source: moat_host::mount::unescape_mountinfo(fields[sep + 2]),
            super_opts: fields[sep + 3].to_string(),
        });
    }
    found
}

/// `lowerdir=a:b` splits on `:` not escaped by `\`.
fn split_lowerdir(s: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ':' => out.push(PathBuf::from(std::mem::take(&mut cur))),
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(PathBuf::from(cur));
    }
    out
}

/// The layers of a writable overlay from its mountinfo super options.
fn parse_overlay_opts(super_opts: &str) -> Option<OverlayLayout> {
    let mut lowers = Vec::new();
    let (mut upper, mut work, mut volatile) = (None, None, false);
    for opt in super_opts.split(',') {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, moat_host::mount::unescape_mountinfo(v)),
            None => (opt, String::new()),
        };
        match k {
            "lowerdir" | "lowerdir+" => lowers.extend(split_lowerdir(&v)),
            "upperdir" => upper = Some(PathBuf::from(v)),
            "workdir" => work = Some(PathBuf::from(v)),
            // Shown as `fsync=volatile` by recent kernels.
            "volatile" => volatile = true,
            "fsync" if v == "volatile" => volatile = true,
            // Data-only layers (verity setups) are not something moat makes.
            "datadir+" => return None,
            _ => {}
        }
    }
    // A layer shown as `/` was passed by fd (someone's idmapped overlay): its
    // path is unknown.
    if lowers.is_empty()
        || lowers
            .iter()
            .any(|l| !l.is_absolute() || l == Path::new("/"))
    {
        return None;
    }
    Some(OverlayLayout {
        lowers,
        upper: upper?,
        work: work?,
        volatile,
    })
}

fn forced_shift() -> bool {
    std::env::var("MOAT_ROOTFS_OWNERSHIP").is_ok_and(|v| v == "shifted")
}

/// `top`: the overlay mounted at `root` now, if any.
fn ensure_ownership(
    root: &Path,
    base: u32,
    size: u32,
    record_dir: &Path,
    top: Option<MountEntry>,
    pending: Option<&OverlayLayout>,
    userns: Option<BorrowedFd<'_>>,
) -> Result<RootfsRecord, RuntimeError> {
    let tag = format!("{SOURCE_PREFIX}{base}");
    let mut reason = None;
    let mut layout = None;
    if let Some(m) = &top {
        if m.source == tag && !forced_shift() {
            // Already right (a restart, or a supervisor started again).
            return Ok(RootfsRecord {
                ownership: RootfsOwnership::Idmapped,
                base,
                overlay: read_record(record_dir).and_then(|r| r.overlay),
                fallback_reason: None,
            });
        }
        layout = if m.source.starts_with(SOURCE_PREFIX) {
            // Idmapped (for another range, or to be shifted instead): only
            // the record knows its layers.
            let l = read_record(record_dir).and_then(|r| r.overlay);
            if l.is_none() {
                return Err(RuntimeError::io(
                    root,
                    std::io::Error::other(format!(
                        "mounted as {} for another id range and no {RECORD_FILE} says how it was made; \
                         hint: stop the machine, unmount {} and start it again",
                        m.source,
                        root.display()
                    )),
                ));
            }
            l
        } else {
            parse_overlay_opts(&m.super_opts)
        };
        if layout.is_none() {
            reason = Some(format!("unusual overlay options: {}", m.super_opts));
        }
    } else if let Some(l) = pending {
        layout = Some(l.clone());
    } else {
        reason = Some("not an overlay mount (folder or btrfs root)".into());
    }
    if let Some(l) = &layout {
        let mounted = top.is_some();
        if forced_shift() {
            reason = Some("MOAT_ROOTFS_OWNERSHIP=shifted".into());
            if !mounted
                || top
                    .as_ref()
                    .is_some_and(|m| m.source.starts_with(SOURCE_PREFIX))
            {
                remount_plain(root, l)?;
            }
        } else {
            match idmap::probe(record_dir)
                .and_then(|()| idmap_overlay(root, l, base, size, &tag, mounted, userns))
            {
                Ok(()) => {
                    return Ok(RootfsRecord {
                        ownership: RootfsOwnership::Idmapped,
                        base,
                        overlay: Some(l.clone()),
                        fallback_reason: None,
                    })
                }
                Err(e) => {
                    eprintln!(
                        "moat: {}: idmapped rootfs not possible ({e}); chowning it instead",
                        root.display()
                    );
                    reason = Some(e);
                    if top_mount(root).is_none_or(|m| m.fstype != "overlay") {
                        remount_plain(root, l)?;
                    }
                }
            }
        }
    }
    // A root the idmap attempt already touched may carry the marker without
    // being shifted: then walk it whatever the marker says.
    let meta = fs::metadata(root).map_err(|e| RuntimeError::io(root, e))?;
    if meta.uid() != base || layout.is_some() {
        shift_tree(root, base, size)?;
    }
    Ok(RootfsRecord {
        ownership: RootfsOwnership::Shifted,
        base,
        overlay: layout,
        fallback_reason: reason,
    })
}

/// Mounts the overlay at `root` with idmapped lowers, replacing the plain
/// one there when `mounted`. Before the old mount goes, nothing has changed;
/// after, a failure mounts the plain overlay again (the caller then shifts).
fn idmap_overlay(
    root: &Path,
    layout: &OverlayLayout,
    base: u32,
    size: u32,
    tag: &str,
    mounted: bool,
    userns: Option<BorrowedFd<'_>>,
) -> Result<(), String> {
    let pending =
        idmap::prepare_overlay(layout, base, size, tag, userns).map_err(|e| e.to_string())?;
    if mounted {
        moat_host::mount::unmount(root, false).map_err(|e| e.to_string())?;
    }
    let done = (|| -> Result<(), String> {
        reset_volatile_work(layout).map_err(|e| e.to_string())?;
        shift_tree(&layout.upper, base, size).map_err(|e| e.to_string())?;
        let mnt = pending.create().map_err(|e| e.to_string())?;
        idmap::attach(&mnt, root).map_err(|e| e.to_string())
    })();
    if let Err(e) = done {
        remount_plain(root, layout).map_err(|r| format!("{e}; then {r}"))?;
        return Err(e);
    }
    Ok(())
}

fn remount_plain(root: &Path, layout: &OverlayLayout) -> Result<(), RuntimeError> {
    if top_mount(root).is_some_and(|m| m.fstype == "overlay") {
        moat_host::mount::unmount(root, false)
            .map_err(|e| RuntimeError::io(root, std::io::Error::other(e.to_string())))?;
    }
    reset_volatile_work(layout)?;
    moat_host::mount::mount_overlay_with(
        &layout.lowers,
        Some((&layout.upper, &layout.work)),
        root,
        layout.volatile,
    )
    .map_err(|e| RuntimeError::io(root, std::io::Error::other(e.to_string())))
}

/// overlayfs refuses to mount a `volatile` overlay again on a workdir that
/// a volatile mount used (`work/incompat/volatile`): the data is thrown away
/// anyway (a disposable machine), so start from an empty workdir.
fn reset_volatile_work(layout: &OverlayLayout) -> Result<(), RuntimeError> {
    if !layout.volatile {
        return Ok(());
    }
    let w = &layout.work;
    for e in fs::read_dir(w).map_err(|e| RuntimeError::io(w, e))? {
        let p = e.map_err(|e| RuntimeError::io(w, e))?.path();
        let r = if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(|e| RuntimeError::io(&p, e))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_overlay_options() {
        let l = parse_overlay_opts(
            "rw,lowerdir=/s/l/aa:/s/l/b\\:c,upperdir=/m/up\\054x,workdir=/m/work,volatile,uuid=on",
        )
        .expect("layout");
        assert_eq!(
            l.lowers,
            vec![PathBuf::from("/s/l/aa"), PathBuf::from("/s/l/b:c")]
        );
        assert_eq!(l.upper, PathBuf::from("/m/up,x"));
        assert_eq!(l.work, PathBuf::from("/m/work"));
        assert!(l.volatile);
        let l = parse_overlay_opts("rw,lowerdir=/a,upperdir=/u,workdir=/w,uuid=on,fsync=volatile")
            .expect("layout");
        assert!(l.volatile);
        let l = parse_overlay_opts("rw,lowerdir+=/a,lowerdir+=/b,upperdir=/u,workdir=/w")
            .expect("layout");
        assert_eq!(l.lowers.len(), 2);
        assert!(!l.volatile);
        // Read-only overlays and detached-fd layers are not re-mountable.
        assert_eq!(parse_overlay_opts("ro,lowerdir=/a:/b"), None);
        assert_eq!(
            parse_overlay_opts("rw,lowerdir+=/,upperdir=/u,workdir=/w"),
            None
        );
    }

    #[test]
    fn record_round_trip() {
        let t = tempfile::tempdir().expect("tempdir");
        let rec = RootfsRecord {
            ownership: RootfsOwnership::Idmapped,
            base: 1_065_536,
            overlay: None,
            fallback_reason: None,
        };
        write_record(t.path(), &rec).expect("write");
        assert_eq!(read_record(t.path()), Some(rec));
        let text = fs::read_to_string(t.path().join(RECORD_FILE)).expect("read");
        assert!(text.contains("\"idmapped\""));
    }
}
