//! One container through youki's libcontainer: create (namespaces exist,
//! init waits) → start (init execs PID 1's program) → kill → delete, plus
//! exec of extra processes. The caller owns waiting on PID 1: libcontainer
//! clones init as a sibling, so it is a child of the process that called
//! [`create`].
//!
//! State of libcontainer lives under `state_root/<name>/`; the bundle
//! (config.json) under `bundle/`.

use crate::rootfs;
use crate::spec::{oci_config, ContainerKind, ContainerSpec, NetworkSpec};
use crate::RuntimeError;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Where libcontainer keeps container state and where bundles are written.
#[derive(Clone, Debug)]
pub struct Paths {
    /// libcontainer's root (`<state_root>/<name>/state.json`).
    pub state_root: PathBuf,
    /// Folder holding config.json.
    pub bundle: PathBuf,
}

/// File descriptors given to PID 1 (none = /dev/null).
#[derive(Debug, Default)]
pub struct Stdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// A created container: its init waits for [`start`].
#[derive(Debug)]
pub struct Created {
    /// Host PID of the container's init (use `/proc/<pid>/ns/net` to attach a NIC).
    pub pid: i32,
    /// The master of PID 1's terminal (`ContainerSpec::terminal`).
    pub console: Option<OwnedFd>,
    /// libcontainer's handle, for [`Created::start`] (no reload from disk).
    container: Container,
    /// The read-only cgroup view the init copied (see [`create`]): off the
    /// host right after the start (or when this is dropped unstarted).
    _view: Option<crate::cgroups::ReadOnlyView>,
}

impl Created {
    /// Lets the init run its program, like [`start`] without reading the
    /// container's state back from disk first.
    pub fn start(mut self) -> Result<(), RuntimeError> {
        let name = self.container.id().to_string();
        self.container.start().map_err(lc_err(&name, "start"))
        // The view goes now, while the init runs its program: its unmount
        // waits for an RCU grace period, which between create and start
        // held the start back (~0.1-0.35 ms here).
    }
}

/// Output of a finished exec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code, or 128 + signal number.
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

fn lc_err<'a>(
    container: &'a str,
    op: &'static str,
) -> impl Fn(libcontainer::error::LibcontainerError) -> RuntimeError + 'a {
    move |e| RuntimeError::Libcontainer {
        container: container.to_string(),
        op,
        message: e.to_string(),
    }
}

fn dev_null() -> Result<OwnedFd, RuntimeError> {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| RuntimeError::io("/dev/null", e))?;
    Ok(OwnedFd::from(f))
}

/// The id range of the user namespace that `spec` makes, when it also
/// makes a network namespace of its own: then both can be made ahead, in
/// parallel with the rest of its preparation (`sys::NsAhead`, see
/// [`create`]).
pub fn namespaces_ahead(spec: &ContainerSpec) -> Option<crate::spec::IdRange> {
    (spec.uses_userns()
        && spec.userns_path.is_none()
        && matches!(spec.network, NetworkSpec::Own | NetworkSpec::None))
    .then_some(spec.idmap)
    .flatten()
}

/// Where `create` prepares a container's read-only cgroup view (see
/// `cgroups::readonly_view`), in its bundle folder.
pub fn cgroup_view_dir(bundle: &Path) -> PathBuf {
    bundle.join("cgroupfs")
}

/// `s` joins the namespaces made ahead for it (see [`create`]).
fn joined_namespaces(s: &mut ContainerSpec, f: &crate::sys::FreshNamespaces) {
    // For whoever reads the supervisor's log (and the tests).
    let ino = |fd: &OwnedFd| {
        fd.try_clone()
            .and_then(|d| fs::File::from(d).metadata())
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap_or(0)
    };
    eprintln!(
        "moat: {}: joins namespaces made ahead: user:[{}] net:[{}]",
        s.name,
        ino(&f.user),
        ino(&f.net)
    );
    // The library opens these paths in its own processes, forked from this
    // one: they hold the same descriptors.
    let fd_path = |fd: &OwnedFd| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    s.userns_path = Some(fd_path(&f.user));
    s.network = NetworkSpec::Join(fd_path(&f.net));
}

/// Writes config.json, prepares the rootfs (ownership, /etc files) and creates
/// the container. On return the namespaces exist and init waits for [`start`].
///
/// `ahead`: the container's user and network namespaces, being made in
/// parallel (`sys::NsAhead`, for a `spec` that would make the same ones:
/// root mapped to `spec.idmap`, a network of its own): the user namespace
/// idmaps the root's image layers, and the container joins both instead of
/// making them on its start path. If the network namespace cannot be had,
/// the container makes its own.
pub fn create(
    spec: &ContainerSpec,
    paths: &Paths,
    stdio: Stdio,
    ahead: Option<crate::sys::NsAhead>,
) -> Result<Created, RuntimeError> {
    spec.validate()?;
    let ahead = ahead.filter(|a| namespaces_ahead(spec) == Some(a.range()));
    fs::create_dir_all(&paths.bundle).map_err(|e| RuntimeError::io(&paths.bundle, e))?;
    fs::create_dir_all(&paths.state_root).map_err(|e| RuntimeError::io(&paths.state_root, e))?;
    // A stale state folder from a crashed supervisor would make create fail
    // (removed first: with it go its cgroups, which the view below binds).
    let stale = paths.state_root.join(&spec.name);
    if stale.exists() {
        let _ = delete(&spec.name, &paths.state_root, true, spec.keep_cgroup_parent);
        let _ = fs::remove_dir_all(&stale);
    }
    // The root first: it may be mounted only now (`ContainerSpec::overlay`),
    // and the spec reads the image's /etc/passwd in it. Meanwhile, on the
    // other CPU (where the namespaces are being made ahead too), what the
    // container is to see at /sys/fs/cgroup on a v1 host (see
    // `cgroups::readonly_view`), off the host again once the container has
    // its copy and is started (`Created::start`). Without it (it could not
    // be made), the library mounts the hierarchies itself.
    let want_view = spec.kind == ContainerKind::Application && !spec.privileged;
    let others = crate::sys::affinity()
        .as_ref()
        .and_then(crate::sys::other_cpus);
    let (prepared, view) = std::thread::scope(|sc| {
        let view = want_view.then(|| {
            sc.spawn(|| {
                if let Some(o) = &others {
                    crate::sys::avoid_cpu(o);
                }
                let owner = spec.uses_userns().then_some(spec.idmap).flatten();
                crate::cgroups::readonly_view(
                    &spec.cgroup_path(),
                    &cgroup_view_dir(&paths.bundle),
                    owner.map(|r| r.host_id),
                )
            })
        });
        let prepared = rootfs::prepare(spec, &paths.bundle, ahead.as_ref().map(|a| a.user()));
        let view = view.and_then(|h| match h.join() {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                eprintln!(
                    "moat: {}: no read-only cgroup view ({e}); the library mounts the hierarchies",
                    spec.name
                );
                None
            }
            Err(_) => None,
        });
        (prepared, view)
    });
    prepared?;
    let fresh = ahead.and_then(|a| match a.finish() {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!(
                "moat: {}: the namespaces made ahead failed ({e}); the container makes its own",
                spec.name
            );
            None
        }
    });
    let joining;
    let spec = match (&fresh, &view) {
        (None, None) => spec,
        _ => {
            let mut s = spec.clone();
            s.cgroup_view = view.as_ref().map(|v| v.path().to_path_buf());
            if let Some(f) = &fresh {
                joined_namespaces(&mut s, f);
            }
            joining = s;
            &joining
        }
    };
    let config = oci_config(spec)?;
    let cfg_path = paths.bundle.join("config.json");
    let text = serde_json::to_vec_pretty(&config).map_err(|e| RuntimeError::InvalidSpec {
        container: spec.name.clone(),
        reason: e.to_string(),
    })?;
    fs::write(&cfg_path, text).map_err(|e| RuntimeError::io(&cfg_path, e))?;

    let stdin = match stdio.stdin {
        Some(fd) => fd,
        None => dev_null()?,
    };
    let stdout = match stdio.stdout {
        Some(fd) => fd,
        None => dev_null()?,
    };
    let stderr = match stdio.stderr {
        Some(fd) => fd,
        None => dev_null()?,
    };
    let err = lc_err(&spec.name, "create");
    crate::cgroups::favor_dynmods();
    // A system container's init gets its own writable cgroup subtree.
    let delegate_to = match (spec.kind, spec.idmap, spec.privileged) {
        (ContainerKind::System, Some(r), false) => Some(r.host_id),
        (ContainerKind::System, _, true) => Some(0),
        _ => None,
    };
    let entered = match delegate_to {
        Some(id) => Some(
            crate::cgroups::enter_before_create(&spec.cgroup_path(), id).map_err(|e| {
                RuntimeError::Sys {
                    container: spec.name.clone(),
                    op: "prepare the name=systemd cgroup",
                    source: e,
                }
            })?,
        ),
        None => None,
    };
    // With a terminal, libcontainer's init makes a pty in the container's
    // devpts and sends its master to this socket: connect and send complete
    // against the listen backlog, so it is accepted after build returns.
    let console_sock = paths.bundle.join("console.sock");
    let console_listener = if spec.terminal {
        let _ = fs::remove_file(&console_sock);
        let l = std::os::unix::net::UnixListener::bind(&console_sock)
            .map_err(|e| RuntimeError::io(&console_sock, e))?;
        Some(l)
    } else {
        None
    };
    let built = ContainerBuilder::new(spec.name.clone(), SyscallType::default())
        .with_executor(DefaultExecutor {})
        .with_root_path(&paths.state_root)
        .map_err(&err)?
        .with_stdin(stdin)
        .with_stdout(stdout)
        .with_stderr(stderr)
        .with_console_socket(console_listener.as_ref().map(|_| console_sock.clone()))
        .validate_id()
        .map_err(&err)?
        .as_init(&paths.bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(&err);
    if let Some(e) = entered {
        let _ = e.leave();
    }
    // The container's init has made its mounts (build returns once it waits
    // for start): the view goes from the host after the start
    // (`Created::start`), or with `view` here on an error.
    let container = built?;
    if let Some(id) = delegate_to {
        crate::cgroups::delegate_after_create(&spec.cgroup_path(), id).map_err(|e| {
            RuntimeError::Sys {
                container: spec.name.clone(),
                op: "delegate the cgroup subtree",
                source: e,
            }
        })?;
    }
    let pid = container
        .pid()
        .map(|p| p.as_raw())
        .ok_or_else(|| RuntimeError::Libcontainer {
            container: spec.name.clone(),
            op: "create",
            message: "no init pid after create".into(),
        })?;
    // (A premade network namespace, joined, has `lo` up already.)
    if matches!(spec.network, NetworkSpec::Own | NetworkSpec::None) {
        crate::sys::loopback_up(pid).map_err(|e| RuntimeError::Sys {
            container: spec.name.clone(),
            op: "bring loopback up",
            source: e,
        })?;
    }
    let console = match console_listener {
        Some(l) => {
            let master = receive_console(&l).map_err(|e| RuntimeError::Sys {
                container: spec.name.clone(),
                op: "receive the terminal's master from the console socket",
                source: e,
            });
            drop(l);
            let _ = fs::remove_file(&console_sock);
            Some(master?)
        }
        None => None,
    };
    Ok(Created {
        pid,
        console,
        container,
        _view: view,
    })
}

/// The pty master libcontainer's init sent to the console socket.
fn receive_console(l: &std::os::unix::net::UnixListener) -> std::io::Result<OwnedFd> {
    l.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stream = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the container's init did not connect to the console socket",
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    crate::sys::recv_fd(&stream)?
        .ok_or_else(|| std::io::Error::other("the console socket carried no file descriptor"))
}

fn load(name: &str, state_root: &Path) -> Result<Container, RuntimeError> {
    let dir = state_root.join(name);
    if !dir.join("state.json").exists() {
        return Err(RuntimeError::NoSuchContainer {
            container: name.into(),
        });
    }
    // libcontainer's load checks that the recorded init exists, then reads
    // its /proc/<pid>/stat: an init that just died (killed by
    // `cleanup_dead`, whose wait ends at its exit, not at its reaping) can
    // be reaped by PID 1 in between, and the read fails with "File not
    // found". Loaded again, it is gone and the container stopped.
    let mut tries = 0;
    loop {
        match Container::load(dir.clone()) {
            Ok(c) => return Ok(c),
            Err(e) if tries < 5 && e.to_string().contains("/proc/") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(e) => return Err(lc_err(name, "load")(e)),
        }
    }
}

/// Lets a created container's init run its program.
pub fn start(name: &str, state_root: &Path) -> Result<(), RuntimeError> {
    let mut c = load(name, state_root)?;
    c.start().map_err(lc_err(name, "start"))
}

/// What libcontainer reports, `None` if the container does not exist.
pub fn status(
    name: &str,
    state_root: &Path,
) -> Result<Option<(ContainerStatus, Option<i32>)>, RuntimeError> {
    match load(name, state_root) {
        Ok(mut c) => {
            let _ = c.refresh_status();
            Ok(Some((c.status(), c.pid().map(|p| p.as_raw()))))
        }
        Err(RuntimeError::NoSuchContainer { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// SIGKILL to every process of the container.
pub fn kill_all(name: &str, state_root: &Path) -> Result<(), RuntimeError> {
    let mut c = load(name, state_root)?;
    let sig = libcontainer::signal::Signal::try_from(libc::SIGKILL).map_err(|e| {
        RuntimeError::Libcontainer {
            container: name.into(),
            op: "kill",
            message: e.to_string(),
        }
    })?;
    c.kill(sig, true).map_err(lc_err(name, "kill"))
}

/// The cgroup path a container was created with (its bundle's config.json),
/// `None` when that file cannot be read.
fn recorded_cgroup(c: &Container) -> Option<String> {
    std::fs::read(c.bundle().join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["linux"]["cgroupsPath"].as_str().map(str::to_string))
}

/// [`delete`] for a container whose PID 1 the caller (its supervisor) has
/// reaped, so that nothing of it runs any more (its PID namespace ended
/// with it): its cgroup is the spec's, and nothing is read back from disk
/// (libcontainer's state, the bundle's config) unless removing the cgroup
/// folders fails, when [`delete`] takes over.
pub fn delete_ended(spec: &ContainerSpec, state_root: &Path) -> Result<(), RuntimeError> {
    let (cgroup, keep) = (spec.cgroup_path(), spec.keep_cgroup_parent);
    remove_ended(&cgroup, &spec.name, state_root, keep)
        .unwrap_or_else(|| delete(&spec.name, state_root, true, keep))
}

/// What is left of a container nothing of which runs any more: every
/// folder of `cgroup` (rmdir refuses one that holds a process), then its
/// state folder. `None` when a cgroup folder stays (the caller then takes
/// libcontainer's path).
fn remove_ended(
    cgroup: &str,
    name: &str,
    state_root: &Path,
    keep_cgroup_parent: bool,
) -> Option<Result<(), RuntimeError>> {
    if !crate::cgroups::remove_tree_with(cgroup, keep_cgroup_parent) {
        return None;
    }
    let dir = state_root.join(name);
    Some(match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RuntimeError::io(&dir, e)),
        _ => Ok(()),
    })
}

/// Removes the container: its processes (when `force`), cgroups and state.
/// A missing container is not an error. `keep_cgroup_parent`: see
/// `ContainerSpec::keep_cgroup_parent`.
pub fn delete(
    name: &str,
    state_root: &Path,
    force: bool,
    keep_cgroup_parent: bool,
) -> Result<(), RuntimeError> {
    let mut c = match load(name, state_root) {
        Ok(c) => c,
        Err(RuntimeError::NoSuchContainer { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let recorded = recorded_cgroup(&c);
    // PID 1 gone (its PID namespace ended with it) and every folder of the
    // recorded cgroup removed (rmdir refuses one that holds a process):
    // nothing of the container runs, and its state folder is all that is
    // left. This skips libcontainer's kill and delete, which read the mount
    // table again for every v1 controller (about 2 ms at the end of each
    // `run --rm`). moat sets no poststop hooks and no Intel RDT, the rest of
    // what delete does. No recorded PID (still being created) or no
    // readable cgroup path: the old path.
    let pid1_gone = c
        .pid()
        .is_some_and(|p| crate::sys::start_time(p.as_raw()).is_none());
    if let Some(cg) = recorded.as_deref().filter(|_| pid1_gone) {
        if let Some(r) = remove_ended(cg, name, state_root, keep_cgroup_parent) {
            return r;
        }
    }
    let cgroup = recorded.unwrap_or_else(|| format!("/moat/{name}"));
    if force {
        let _ = kill_all(name, state_root);
        if let Some(pid) = c.pid() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while crate::sys::start_time(pid.as_raw()).is_some()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
    // An init such as systemd made sub-cgroups: they must go first.
    crate::cgroups::remove_tree_with(&cgroup, keep_cgroup_parent);
    let r = c.delete(force).map_err(lc_err(name, "delete"));
    crate::cgroups::remove_tree_with(&cgroup, keep_cgroup_parent);
    r
}
