//! cgroup delegation for system containers: an init such as systemd must be
//! able to create cgroups below its own, so the container's subtree is
//! handed to the container's root (host uid `host_id`), the way LXC and
//! Incus do it.
//!
//! The layout is detected, not assumed:
//! - **v2** (`/sys/fs/cgroup` is cgroup2): libcontainer creates
//!   `/moat/<name>`; after create we chown that folder and its
//!   `cgroup.procs`, `cgroup.threads`, `cgroup.subtree_control` to the
//!   container's root. Limit files stay root-owned, so the container cannot
//!   raise its own limits. (Untested here: this host is hybrid.)
//! - **v1 / hybrid** (`/sys/fs/cgroup` is a tmpfs of per-controller mounts):
//!   libcontainer's v1 manager does not handle the `name=systemd`
//!   hierarchy, which systemd needs in legacy mode. Before create the
//!   supervisor moves itself into `name=systemd:/moat/<name>` (created and
//!   chowned here) so that init inherits it and the cgroup namespace is
//!   rooted there; after create it moves back. The controllers' own
//!   `/moat/<name>` folders are chowned the same way (folder, `tasks`,
//!   `cgroup.procs`, `cgroup.clone_children`), never their limit files.
//!
//! [`remove_tree`] removes the container's cgroup folders in every
//! hierarchy once its processes are gone, with what the container created
//! below them (systemd makes `init.scope`, `system.slice/...`) deepest
//! first. When it removed them all, `container::delete` skips libcontainer's
//! own delete; otherwise libcontainer's delete finds what is left.

use std::fs;
use std::io;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// How the host's cgroups are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Pure cgroup v2 at /sys/fs/cgroup.
    Unified,
    /// Per-controller v1 mounts (possibly plus a cgroup2 mount at /sys/fs/cgroup/unified).
    Legacy,
}

/// Detects the layout from the file system type of /sys/fs/cgroup.
pub fn layout() -> Layout {
    let Ok(c) = std::ffi::CString::new(ROOT) else {
        return Layout::Legacy;
    };
    // SAFETY: c is a valid NUL-terminated path, st a zeroed statfs the kernel fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above; statfs only writes into st.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC {
        Layout::Unified
    } else {
        Layout::Legacy
    }
}

/// How long a [`preload`]ed mount table is trusted.
const TABLE_FRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// The cgroup mounts of /proc/self/mountinfo (their lines), when read by
/// [`preload`], and when.
static TABLE: std::sync::Mutex<Option<(std::time::Instant, String)>> = std::sync::Mutex::new(None);

/// Reads the cgroup part of the mount table now, for the next
/// [`TABLE_FRESH`] of this process. A warm supervisor does it while it waits
/// for its machine (its CLI is still preparing): then neither the cgroup set-up
/// nor the removal at the end of a short run reads the whole table again
/// (the kernel renders every mount of it, ~0.1 ms each time here). Cgroup
/// hierarchies are mounted at boot and stay; a longer-lived process reads the
/// table again.
/// It also does [`favor_dynmods`], with the same read.
pub fn preload() {
    let all = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    favor_dynmods_with(&all);
    let t = cgroup_lines(&all);
    if let Ok(mut g) = TABLE.lock() {
        *g = Some((std::time::Instant::now(), t));
    }
}

fn read_cgroup_lines() -> String {
    cgroup_lines(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

fn cgroup_lines(all: &str) -> String {
    all.lines()
        .filter(|l| {
            l.split_once(" - ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .is_some_and(|t| t == "cgroup" || t == "cgroup2")
        })
        .fold(String::new(), |mut acc, l| {
            acc.push_str(l);
            acc.push('\n');
            acc
        })
}

/// The cgroup lines of the mount table: [`preload`]ed if recent, else read.
fn mount_table() -> String {
    if let Ok(g) = TABLE.lock() {
        if let Some((at, t)) = g.as_ref() {
            if at.elapsed() < TABLE_FRESH {
                return t.clone();
            }
        }
    }
    read_cgroup_lines()
}

/// Turn on the cgroup2 `favordynmods` option (kernel 6.0+) once per host
/// boot, unless `MOAT_CGROUP_FAVORDYNMODS=0`.
///
/// Moving a process into a cgroup takes the kernel's global
/// `cgroup_threadgroup_rwsem` for writing, and by default that waits for an
/// RCU grace period: 6 to 14 ms on this 2-core VM for the first move after
/// a pause, paid by every container start (runc pays it too). With
/// `favordynmods` the lock is kept in its slow-reader mode instead, which
/// makes the move take under 1 ms and fork/exit a little dearer (a shared
/// atomic instead of a per-CPU counter). The lock is shared by all
/// hierarchies, so on a v1 hybrid host the option on the cgroup2 mount
/// (`/sys/fs/cgroup/unified`) serves the v1 controllers too.
///
/// The mount is reconfigured with its current options plus this one, so
/// `nsdelegate` and the other flags stay. Errors are ignored: inside a
/// container, or on an older kernel, moat simply runs without it.
pub fn favor_dynmods() {
    // Done once per process ([`preload`] does it in a warm supervisor): the
    // mount table is not read again for nothing.
    if FAVOR_DYNMODS.is_completed() {
        return;
    }
    favor_dynmods_with(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
}

static FAVOR_DYNMODS: std::sync::Once = std::sync::Once::new();

/// [`favor_dynmods`] with the mount table (all of it) read by the caller.
fn favor_dynmods_with(info: &str) {
    FAVOR_DYNMODS.call_once(|| {
        if std::env::var_os("MOAT_CGROUP_FAVORDYNMODS").is_some_and(|v| v == "0") {
            return;
        }
        let Some((mnt, flags, data)) = favordynmods_remount(info) else {
            return;
        };
        let (Ok(m), Ok(d)) = (std::ffi::CString::new(mnt), std::ffi::CString::new(data)) else {
            return;
        };
        // SAFETY: remount of an existing mount point with valid C strings.
        // A failure leaves the mount as it was.
        let _ = unsafe {
            libc::mount(
                std::ptr::null(),
                m.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | flags,
                d.as_ptr().cast(),
            )
        };
    });
}

/// `(mount point, mount flags, options)` of the remount that adds
/// `favordynmods` to the cgroup2 mount under /sys/fs/cgroup (the topmost one
/// there), or `None` when there is none, it has the option already, or it is
/// read-only here. A read-only view is left alone: a remount without
/// `MS_BIND` reconfigures the superblock, which every mount namespace
/// shares, and would make cgroupfs read-only for the whole host. The
/// per-mount flags (`nosuid`, `nodev`, ...) are passed back, or a remount
/// would drop them; a flag this code does not know means no remount.
fn favordynmods_remount(mountinfo: &str) -> Option<(String, libc::c_ulong, String)> {
    const MS_NOSYMFOLLOW: libc::c_ulong = 256;
    let l = mountinfo.lines().rev().find(|l| {
        let mnt = l.split_whitespace().nth(4);
        mnt == Some(ROOT) || mnt == Some("/sys/fs/cgroup/unified")
    })?;
    let (left, right) = l.split_once(" - ")?;
    let left: Vec<&str> = left.split_whitespace().collect();
    let right: Vec<&str> = right.split_whitespace().collect();
    let (Some(mnt), Some(mnt_opts), Some(&"cgroup2"), Some(super_opts)) =
        (left.get(4), left.get(5), right.first(), right.get(2))
    else {
        return None;
    };
    let mut opts: Vec<&str> = Vec::new();
    for o in super_opts.split(',') {
        match o {
            "ro" | "favordynmods" => return None,
            "rw" => {}
            o => opts.push(o),
        }
    }
    opts.push("favordynmods");
    let mut flags: libc::c_ulong = 0;
    for o in mnt_opts.split(',') {
        flags |= match o {
            "rw" => 0,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            "strictatime" => libc::MS_STRICTATIME,
            "nosymfollow" => MS_NOSYMFOLLOW,
            _ => return None, // "ro", or a flag a remount could drop
        };
    }
    Some((mnt.to_string(), flags, opts.join(",")))
}

/// The v1 hierarchies mounted under /sys/fs/cgroup (their mount points).
fn v1_mounts() -> Vec<PathBuf> {
    v1_mounts_in(&mount_table())
}

fn v1_mounts_in(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mnt = left.split_whitespace().nth(4)?;
            (fstype == "cgroup" && mnt.starts_with(ROOT)).then(|| PathBuf::from(mnt))
        })
        .collect()
}

/// Every folder of the container's cgroup (`cgroup`: its path below each
/// hierarchy's root, e.g. `/moat-<tag>/<name>`), over all hierarchies.
fn container_dirs(cgroup: &str) -> Vec<PathBuf> {
    let mountinfo = match layout() {
        Layout::Unified => String::new(),
        Layout::Legacy => mount_table(),
    };
    container_dirs_in(cgroup, &mountinfo)
}

/// [`container_dirs`] with the mount table read (unused on a v2 host).
fn container_dirs_in(cgroup: &str, mountinfo: &str) -> Vec<PathBuf> {
    let rel = cgroup.trim_start_matches('/').to_string();
    match layout() {
        Layout::Unified => vec![Path::new(ROOT).join(rel)],
        Layout::Legacy => {
            let mut v: Vec<PathBuf> = v1_mounts_in(mountinfo)
                .into_iter()
                .map(|m| m.join(&rel))
                .collect();
            let unified = Path::new(ROOT).join("unified").join(&rel);
            v.push(unified);
            v
        }
    }
}

/// Removes the folder `cgroup` (e.g. a root's `/moat-<tag>`) in every
/// hierarchy where it is empty; an rmdir refuses one that still holds a
/// container's folder or a process, which then stays.
pub fn remove_if_empty(cgroup: &str) {
    let mountinfo = mount_table();
    let mut dirs = container_dirs_in(cgroup, &mountinfo);
    if let Some(m) = systemd_v1_mount_in(&mountinfo) {
        dirs.push(m.join(cgroup.trim_start_matches('/')));
    }
    for d in dirs {
        let _ = fs::remove_dir(d);
    }
}

/// Freeze (`frozen`) or thaw every process of the container's cgroup
/// (`cgroup` as for [`container_dirs`]), subtree included, and wait until the
/// kernel reports it done: v2 `cgroup.freeze` / `cgroup.events`, v1 the
/// freezer hierarchy's `freezer.state` (FREEZING until every task stopped).
pub fn set_frozen(cgroup: &str, frozen: bool, timeout: std::time::Duration) -> io::Result<()> {
    let rel = cgroup.trim_start_matches('/');
    let (file, value, done): (PathBuf, &str, Box<dyn Fn() -> bool>) = match layout() {
        Layout::Unified => {
            let dir = Path::new(ROOT).join(rel);
            let events = dir.join("cgroup.events");
            let want = if frozen { "frozen 1" } else { "frozen 0" };
            (
                dir.join("cgroup.freeze"),
                if frozen { "1" } else { "0" },
                Box::new(move || {
                    fs::read_to_string(&events).is_ok_and(|e| e.lines().any(|l| l == want))
                }),
            )
        }
        Layout::Legacy => {
            let mnt = v1_mounts()
                .into_iter()
                .find(|m| {
                    m.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.split(',').any(|c| c == "freezer"))
                })
                .ok_or_else(|| io::Error::other("no v1 freezer hierarchy is mounted"))?;
            let state = mnt.join(rel).join("freezer.state");
            let want = if frozen { "FROZEN" } else { "THAWED" };
            (
                state.clone(),
                want,
                Box::new(move || fs::read_to_string(&state).is_ok_and(|s| s.trim() == want)),
            )
        }
    };
    fs::write(&file, value)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        if std::time::Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} did not reach '{value}' in {timeout:?}", file.display()),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Ok(())
}

fn chown_delegated(dir: &Path, id: u32) -> io::Result<()> {
    chown(dir, Some(id), Some(id))?;
    for f in [
        "cgroup.procs",
        "tasks",
        "cgroup.clone_children",
        "cgroup.threads",
        "cgroup.subtree_control",
    ] {
        let p = dir.join(f);
        if p.exists() {
            chown(&p, Some(id), Some(id))?;
        }
    }
    Ok(())
}

/// The `name=systemd` hierarchy's mount point, on a v1/hybrid host.
fn systemd_v1_mount() -> Option<PathBuf> {
    systemd_v1_mount_in(&mount_table())
}

fn systemd_v1_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let (fstype, _src, opts) = (r.next()?, r.next()?, r.next()?);
        let mnt = left.split_whitespace().nth(4)?;
        (fstype == "cgroup" && opts.split(',').any(|o| o == "name=systemd"))
            .then(|| PathBuf::from(mnt))
    })
}

/// Our own cgroup in the `name=systemd` hierarchy (to return to after create).
fn own_systemd_cgroup() -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, ctl, path) = (p.next()?, p.next()?, p.next()?);
        (ctl == "name=systemd").then(|| path.to_string())
    })
}

/// Undo for [`enter_before_create`]: moves the caller back where it was.
pub struct Entered {
    back: Option<PathBuf>,
}

impl Entered {
    pub fn leave(self) -> io::Result<()> {
        match &self.back {
            Some(procs) => fs::write(procs, std::process::id().to_string()),
            None => Ok(()),
        }
    }
}

/// v1 only: creates `name=systemd:/moat/<name>` owned by the container's root
/// and moves the calling process into it, so the init it creates inherits it.
pub fn enter_before_create(cgroup: &str, host_id: u32) -> io::Result<Entered> {
    if layout() == Layout::Unified {
        return Ok(Entered { back: None });
    }
    let Some(mnt) = systemd_v1_mount() else {
        return Ok(Entered { back: None });
    };
    let dir = mnt.join(cgroup.trim_start_matches('/'));
    fs::create_dir_all(&dir)?;
    chown_delegated(&dir, host_id)?;
    let back = own_systemd_cgroup()
        .map(|p| mnt.join(p.trim_start_matches('/')).join("cgroup.procs"))
        .unwrap_or_else(|| mnt.join("cgroup.procs"));
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())?;
    Ok(Entered { back: Some(back) })
}

/// After create, before start: hands the container's cgroup folders (all
/// hierarchies) to its root.
pub fn delegate_after_create(cgroup: &str, host_id: u32) -> io::Result<()> {
    for d in container_dirs(cgroup) {
        if d.is_dir() {
            chown_delegated(&d, host_id)?;
        }
    }
    Ok(())
}

/// Removes the container's cgroup folders (`cgroup`, e.g. `/moat-<tag>/<name>`)
/// in every hierarchy, `name=systemd` included (libcontainer does not manage
/// that one), with the sub-cgroups the container made below them, deepest
/// first. The container's processes must be gone. True when none of the
/// container's cgroup folders is left (a folder holding a process stays).
/// The parent folder (`/moat` or `/moat-<tag>`) goes too when it is left
/// empty, unless `keep_parent` (see `ContainerSpec::keep_cgroup_parent`).
pub fn remove_tree(cgroup: &str) -> bool {
    remove_tree_with(cgroup, false)
}

/// [`remove_tree`], keeping the parent folder when `keep_parent`.
pub fn remove_tree_with(cgroup: &str, keep_parent: bool) -> bool {
    let mut gone = true;
    let mountinfo = mount_table();
    let mut dirs = container_dirs_in(cgroup, &mountinfo);
    if let Some(m) = systemd_v1_mount_in(&mountinfo) {
        let d = m.join(cgroup.trim_start_matches('/'));
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    for d in dirs {
        // Most often a leaf (an application container makes no
        // sub-cgroups): one rmdir. Otherwise (EBUSY) what is below it first.
        match fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => {
                let mut all = Vec::new();
                collect_dirs(&d, &mut all);
                // Deepest first; the container's own folder last.
                all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
                for p in all {
                    let _ = fs::remove_dir(&p);
                }
                if fs::remove_dir(&d).is_err() && d.exists() {
                    gone = false;
                }
            }
        }
        // The parent (`/moat` or `/moat-<tag>`) goes with its last container.
        if keep_parent {
            continue;
        }
        if let Some(parent) = d.parent() {
            if parent
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("moat"))
            {
                let _ = fs::remove_dir(parent);
            }
        }
    }
    gone
}

fn collect_dirs(d: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let p = e.path();
                collect_dirs(&p, out);
                out.push(p);
            }
        }
    }
}

/// The v1 controllers libcontainer's cgroup manager places a container in
/// (libcgroups' `v1::CONTROLLERS`): in a hierarchy with one of them the
/// container's init lives in its own cgroup; in the others (`name=systemd`,
/// `rdma`, `misc`) it stays in its supervisor's.
const MANAGED_V1: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "memory",
    "pids",
    "perf_event",
    "blkio",
    "net_prio",
    "net_cls",
    "freezer",
];

/// One v1 hierarchy mounted directly below /sys/fs/cgroup: its mount point
/// and its super options (controllers, `name=`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct V1Hierarchy {
    mount: PathBuf,
    opts: Vec<String>,
}

fn v1_hierarchies_in(mountinfo: &str) -> Vec<V1Hierarchy> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut r = right.split_whitespace();
            let (fstype, _src, opts) = (r.next()?, r.next()?, r.next()?);
            let mnt = PathBuf::from(moat_host::mount::unescape_mountinfo(
                left.split_whitespace().nth(4)?,
            ));
            (fstype == "cgroup" && mnt.parent() == Some(Path::new(ROOT))).then(|| V1Hierarchy {
                mount: mnt,
                opts: opts
                    .split(',')
                    .filter(|o| *o != "rw" && *o != "ro")
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// The cgroup a process of `proc_cgroup` (the text of a /proc/PID/cgroup)
/// has in hierarchy `h`.
fn cgroup_in(h: &V1Hierarchy, proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, ctl, path) = (p.next()?, p.next()?, p.next()?);
        let ctls: Vec<&str> = ctl.split(',').filter(|c| !c.is_empty()).collect();
        (!ctls.is_empty() && ctls.iter().all(|c| h.opts.iter().any(|o| o == c)))
            .then(|| path.to_string())
    })
}

/// Where each hierarchy's folder of the container is, on the host: its own
/// cgroup (`cgroup`) where libcontainer places it, its supervisor's
/// (`proc_cgroup`, this process's /proc/self/cgroup) in the others. `None`
/// for a hierarchy where this process's cgroup is unknown.
fn view_sources(
    hierarchies: &[V1Hierarchy],
    cgroup: &str,
    proc_cgroup: &str,
) -> Vec<(V1Hierarchy, Option<PathBuf>)> {
    let rel = cgroup.trim_start_matches('/');
    hierarchies
        .iter()
        .map(|h| {
            let managed = h.opts.iter().any(|o| MANAGED_V1.contains(&o.as_str()));
            let src = if managed {
                Some(h.mount.join(rel))
            } else {
                cgroup_in(h, proc_cgroup).map(|p| h.mount.join(p.trim_start_matches('/')))
            };
            (h.clone(), src)
        })
        .collect()
}

/// A read-only copy of what a container sees at /sys/fs/cgroup on a v1 host
/// (see [`readonly_view`]), mounted on the host until the container has
/// copied it.
#[derive(Debug)]
pub struct ReadOnlyView {
    dir: PathBuf,
}

impl ReadOnlyView {
    /// The folder to bind at the container's /sys/fs/cgroup.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ReadOnlyView {
    /// Off the host, with everything below it (the container keeps its
    /// copy): one detach, no wait for the mounts to be idle.
    fn drop(&mut self) {
        release_view(&self.dir);
    }
}

/// Removes a view left at `dir` (a supervisor killed before it dropped its
/// [`ReadOnlyView`]); nothing when there is none. One `statx` when none.
pub fn release_view(dir: &Path) {
    if moat_host::mount::is_mount_point(dir).unwrap_or(false) {
        let _ = moat_host::mount::unmount(dir, true);
    }
    let _ = fs::remove_dir(dir);
}

fn mount_sys(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |b: &[u8]| {
        CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
    };
    let src = src.map(|s| c(s.as_os_str().as_bytes())).transpose()?;
    let target_c = c(target.as_os_str().as_bytes())?;
    let fstype = fstype.map(|t| c(t.as_bytes())).transpose()?;
    let data = data.map(|d| c(d.as_bytes())).transpose()?;
    let p = |o: &Option<CString>| o.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: valid NUL-terminated strings or NULL, as mount(2) takes them.
    let rc = unsafe {
        libc::mount(
            p(&src),
            target_c.as_ptr(),
            p(&fstype),
            flags,
            p(&data).cast(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mount on {}: {e}", target.display()),
        ));
    }
    Ok(())
}

/// On a v1 (or hybrid) host, for an application container with a
/// read-only cgroupfs: builds at `dir` what it is to see at /sys/fs/cgroup
/// (a tmpfs with, per v1 hierarchy, a read-only bind of its own cgroup
/// folder there, the host's symlinks such as `cpu -> cpu,cpuacct`, then the
/// tmpfs itself read-only and owned by the container's root `owner`), for
/// the spec to bind (`ContainerSpec::cgroup_view`). The container's cgroup
/// folders are made here (libcontainer then finds them).
///
/// Why: libcontainer mounts each v1 hierarchy itself, in the container's
/// cgroup namespace, through its checked path resolution: 1.3 ms of the
/// ~7 ms of its create in a `moat run --rm busybox -- true` here (A/B of 60
/// runs). It also left them (and the tmpfs below them) writable
/// whatever the spec said: the files were safe only by their ownership.
/// Here each is a read-only bind, which the container cannot make writable
/// (the kernel locks the flag in its user namespace); what it sees is the
/// same as a namespaced mount shows: its own cgroup as each hierarchy's
/// root.
///
/// `None` on a cgroup v2 host (libcontainer's single cgroup2 mount is kept),
/// and when the mount that holds `dir` is shared (a host booted with
/// systemd makes `/` shared): a tmpfs mounted there would be copied into
/// every mount namespace of that peer group (and of its slaves), and those
/// copies would stay after this one goes. Otherwise nothing propagates from
/// there; the tmpfs is made private too, before anything is mounted on it.
pub fn readonly_view(
    cgroup: &str,
    dir: &Path,
    owner: Option<u32>,
) -> io::Result<Option<ReadOnlyView>> {
    if layout() == Layout::Unified {
        return Ok(None);
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    // Unknown (a kernel without statx's mount id) counts as shared.
    if moat_host::mount::propagates(parent).unwrap_or(true) {
        return Ok(None);
    }
    let hierarchies = v1_hierarchies_in(&mount_table());
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let sources = view_sources(&hierarchies, cgroup, &own);
    release_view(dir);
    fs::create_dir(dir).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    let view = ReadOnlyView {
        dir: dir.to_path_buf(),
    };
    let data = match owner {
        Some(id) => format!("mode=755,size=64k,uid={id},gid={id}"),
        None => "mode=755,size=64k".to_string(),
    };
    let safe = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_sys(
        Some(Path::new("moat-cgroup")),
        dir,
        Some("tmpfs"),
        safe,
        Some(&data),
    )?;
    mount_sys(None, dir, None, libc::MS_PRIVATE, None)?;
    for (h, src) in &sources {
        let Some(src) = src else { continue };
        let Some(name) = h.mount.file_name() else {
            continue;
        };
        fs::create_dir_all(src)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        let at = dir.join(name);
        fs::create_dir(&at)?;
        mount_sys(Some(src), &at, None, libc::MS_BIND, None)?;
    }
    // The host's aliases of comounted hierarchies (`cpu -> cpu,cpuacct`).
    if let Ok(rd) = fs::read_dir(ROOT) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_symlink()) {
                if let Ok(target) = fs::read_link(e.path()) {
                    let _ = std::os::unix::fs::symlink(target, dir.join(e.file_name()));
                }
            }
        }
    }
    readonly_tree(dir, &sources)?;
    Ok(Some(view))
}

/// Makes the view at `dir` and every bind below it read-only (and nosuid,
/// nodev, noexec): one recursive mount_setattr(2), or (a kernel before 5.12)
/// one bind remount per mount.
fn readonly_tree(dir: &Path, sources: &[(V1Hierarchy, Option<PathBuf>)]) -> io::Result<()> {
    use moat_host::mount::api::{
        MountAttr, AT_RECURSIVE, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID,
        MOUNT_ATTR_RDONLY,
    };
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    let attr = MountAttr {
        attr_set: u64::from(MOUNT_ATTR_RDONLY)
            | MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a valid path string and a live mount_attr of the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(io::Error::new(
            e.kind(),
            format!(
                "mount_setattr(read-only, recursive) on {}: {e}",
                dir.display()
            ),
        ));
    }
    let flags = libc::MS_BIND
        | libc::MS_REMOUNT
        | libc::MS_RDONLY
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC;
    for (h, src) in sources {
        if let (Some(_), Some(name)) = (src, h.mount.file_name()) {
            mount_sys(None, &dir.join(name), None, flags, None)?;
        }
    }
    mount_sys(None, dir, None, flags, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_binds_the_containers_own_cgroup_or_its_supervisors() {
        let table = "30 29 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                     31 29 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n\
                     32 29 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                     33 29 0:30 / /sys/fs/cgroup/rdma rw - cgroup cgroup rw,rdma\n\
                     34 29 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                     35 34 0:31 /x /sys/fs/cgroup/memory/x rw - cgroup cgroup rw,memory\n";
        let h = v1_hierarchies_in(table);
        // cgroup2 and a mount deeper down are not hierarchies of the view.
        let mounts: Vec<&Path> = h.iter().map(|h| h.mount.as_path()).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/rdma",
                "/sys/fs/cgroup/memory"
            ]
            .map(Path::new)
        );
        let own = "12:rdma:/r\n4:cpu,cpuacct:/user.slice\n1:name=systemd:/system.slice/moat.service\n0::/\n";
        let got: Vec<Option<PathBuf>> = view_sources(&h, "/moat-t/run-1", own)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(
            got,
            vec![
                // Not managed by the library: the supervisor's own cgroup.
                Some(PathBuf::from(
                    "/sys/fs/cgroup/systemd/system.slice/moat.service"
                )),
                // Managed: the container's.
                Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/moat-t/run-1")),
                Some(PathBuf::from("/sys/fs/cgroup/rdma/r")),
                Some(PathBuf::from("/sys/fs/cgroup/memory/moat-t/run-1")),
            ]
        );
        // A hierarchy this process is not in (unknown): left out.
        let sources = view_sources(&h, "/moat-t/run-1", "4:cpu,cpuacct:/\n");
        assert_eq!(sources[0].1, None);
        assert_eq!(sources[2].1, None);
    }

    #[test]
    fn the_cached_table_keeps_the_cgroup_mounts_only() {
        let all = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                   29 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                   30 29 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                   31 29 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n\
                   35 29 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                   90 27 0:50 / /tmp/x rw - overlay overlay rw,lowerdir=/a:/b\n";
        let t = cgroup_lines(all);
        assert_eq!(t.lines().count(), 3, "{t}");
        // What the parsers find in it is what they find in the whole table.
        assert_eq!(v1_mounts_in(&t), v1_mounts_in(all));
        assert_eq!(systemd_v1_mount_in(&t), systemd_v1_mount_in(all));
        assert_eq!(
            v1_mounts_in(&t),
            vec![
                PathBuf::from("/sys/fs/cgroup/systemd"),
                PathBuf::from("/sys/fs/cgroup/memory")
            ]
        );
    }

    #[test]
    fn favordynmods_keeps_the_mount_flags_and_options() {
        let pure = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let (mnt, flags, data) = favordynmods_remount(pure).unwrap();
        assert_eq!(mnt, "/sys/fs/cgroup");
        assert_eq!(
            flags,
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RELATIME
        );
        assert_eq!(data, "nsdelegate,memory_recursiveprot,favordynmods");
        let hybrid = "34 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      35 25 0:31 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        let (mnt, flags, data) = favordynmods_remount(hybrid).unwrap();
        assert_eq!(
            (mnt.as_str(), flags, data.as_str()),
            ("/sys/fs/cgroup/unified", libc::MS_RELATIME, "favordynmods")
        );
        // Already on, or no cgroup2 mount of the host's: nothing to do.
        assert_eq!(
            favordynmods_remount(&pure.replace("recursiveprot", "recursiveprot,favordynmods")),
            None
        );
        assert_eq!(
            favordynmods_remount("35 25 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
        assert_eq!(
            favordynmods_remount("36 25 0:32 / /tmp/x rw - cgroup2 cgroup2 rw\n"),
            None
        );
        // Read-only here (a container's view): the superblock is not touched.
        assert_eq!(
            favordynmods_remount(&pure.replace("rw,nosuid", "ro,nosuid")),
            None
        );
        // The topmost of stacked mounts counts.
        let stacked = format!("{pure}40 30 0:40 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n");
        assert_eq!(favordynmods_remount(&stacked), None);
        let (_, flags, _) =
            favordynmods_remount(&pure.replace("noexec,", "noexec,nosymfollow,")).unwrap();
        assert_eq!(flags & 256, 256);
    }

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn finds_the_v1_hierarchies_and_name_systemd() {
        let m = v1_mounts_in(HYBRID);
        assert_eq!(m.len(), 3);
        assert!(m.contains(&PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(
            systemd_v1_mount_in(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/systemd"))
        );
        let v2 = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert!(v1_mounts_in(v2).is_empty());
        assert_eq!(systemd_v1_mount_in(v2), None);
    }
}
