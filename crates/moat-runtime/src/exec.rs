//! Running an extra process inside a running container (`exec`).
//!
//! libcontainer 0.7's tenant builder does not join the container's *user*
//! namespace, so an exec'd process would run as host root. moat therefore
//! joins the container itself, in a separate single-threaded helper process
//! (`moat-supervisor --exec DIR [--tty ROWS COLS] [--env K=V].. [--login] -- ARGV...`):
//! it moves into the container's cgroups, joins its namespaces (user first),
//! forks into the PID namespace, then applies the container's user,
//! capabilities, no_new_privs and seccomp filter (from the same config.json,
//! through libcontainer's seccomp code) before exec. The helper exits with
//! the process's status.
//!
//! Without `--tty` the process's stdio is the helper's. With `--tty` the
//! helper opens a pty in the container's own devpts (after joining its mount
//! namespace, so `tty` inside names `/dev/pts/N`), makes its slave the
//! process's controlling terminal, and sends the master to the caller over
//! fd 3 (SCM_RIGHTS); see [`crate::session`].

use crate::machine::{MachineDir, MachineState};
use libcontainer::oci_spec::runtime::Spec;
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::str::FromStr;
use std::sync::atomic::{AtomicI32, Ordering};

/// The fd on which a `--tty` helper sends the pty master.
pub const MASTER_SOCKET_FD: RawFd = 3;

/// A parsed `moat-supervisor --exec` command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub dir: std::path::PathBuf,
    pub argv: Vec<String>,
    /// Allocate a pty of this size (rows, cols).
    pub tty: Option<(u16, u16)>,
    /// Extra environment (`K=V`), after the container's.
    pub env: Vec<String>,
    /// Run the user's login shell (from the container's /etc/passwd); `argv` is ignored.
    pub login: bool,
}

impl ExecRequest {
    /// The helper's arguments after `--exec`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--exec".into(), self.dir.clone().into()];
        if let Some((r, c)) = self.tty {
            a.extend(["--tty".into(), r.to_string().into(), c.to_string().into()]);
        }
        for e in &self.env {
            a.extend(["--env".into(), e.into()]);
        }
        if self.login {
            a.push("--login".into());
        }
        a.push("--".into());
        a.extend(self.argv.iter().map(OsString::from));
        a
    }

    /// Parses the arguments that follow `--exec`.
    pub fn parse(args: &[OsString]) -> Result<ExecRequest, String> {
        let usage = || {
            "usage: moat-supervisor --exec DIR [--tty ROWS COLS] [--env K=V].. [--login] -- ARGV..."
                .to_string()
        };
        let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
        let mut req = ExecRequest {
            dir: it.next().ok_or_else(usage)?.into(),
            ..Default::default()
        };
        loop {
            match it.next().as_deref() {
                Some("--tty") => {
                    let mut num = || -> Result<u16, String> {
                        it.next().and_then(|n| n.parse().ok()).ok_or_else(usage)
                    };
                    let (r, c) = (num()?, num()?);
                    req.tty = Some((r, c));
                }
                Some("--env") => req.env.push(it.next().ok_or_else(usage)?),
                Some("--login") => req.login = true,
                Some("--") => break,
                _ => return Err(usage()),
            }
        }
        req.argv = it.collect();
        if req.argv.is_empty() && !req.login {
            return Err(usage());
        }
        Ok(req)
    }
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

fn fail(msg: String) -> i32 {
    eprintln!("moat exec: {msg}");
    126
}

/// Entry point of `moat-supervisor --exec ...`; returns the exit code.
pub fn exec_main(req: &ExecRequest) -> i32 {
    let dir = MachineDir::new(&req.dir);
    let pid = match dir.state() {
        MachineState::Running { pid } => pid,
        other => {
            return fail(format!(
                "{}: machine is not running ({other:?})",
                dir.dir.display()
            ))
        }
    };
    let cfg_path = dir.bundle_dir().join("config.json");
    let spec = match Spec::load(&cfg_path) {
        Ok(s) => s,
        Err(e) => return fail(format!("{}: {e}", cfg_path.display())),
    };
    if let Err(e) = join_cgroups(pid) {
        return fail(format!("joining the cgroups of pid {pid}: {e}"));
    }
    if let Err(e) = join_namespaces(pid) {
        return fail(format!("joining the namespaces of pid {pid}: {e}"));
    }
    let master = match req.tty {
        Some((rows, cols)) => match open_pty(rows, cols) {
            Ok(m) => Some(m),
            Err(e) => return fail(format!("opening a pty in the container: {e}")),
        },
        None => None,
    };
    // SAFETY: single-threaded helper; the child only sets up credentials and execs.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return fail(format!("fork: {}", io::Error::last_os_error()));
    }
    if child > 0 {
        CHILD.store(child, Ordering::Relaxed);
        // SAFETY: signal dispositions of the waiting parent: terminal signals
        // reach the child through its own terminal or process group; a caller
        // ending the session (SIGTERM/SIGHUP to us) ends the process too.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
            libc::signal(
                libc::SIGTERM,
                forward_signal as *const () as libc::sighandler_t,
            );
            libc::signal(
                libc::SIGHUP,
                forward_signal as *const () as libc::sighandler_t,
            );
        }
        if let Some(m) = master {
            // SAFETY: fd 3 was given to us by the caller (see crate::session).
            let sock = unsafe { OwnedFd::from_raw_fd(MASTER_SOCKET_FD) };
            if let Err(e) = crate::sys::send_fd(&sock, &m) {
                forward_signal(libc::SIGKILL);
                let _ = crate::sys::wait_pid(child);
                return fail(format!("sending the pty to the caller: {e}"));
            }
            drop(sock);
            drop(m);
        }
        return match crate::sys::wait_pid(child) {
            Ok(st) => st.code(),
            Err(e) => fail(format!("wait: {e}")),
        };
    }
    if let Some(m) = master {
        if let Err(e) = take_pty(&m) {
            eprintln!("moat exec: pty: {e}");
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(126) }
        }
        drop(m);
        // SAFETY: the caller's socket is the parent's business.
        unsafe { libc::close(MASTER_SOCKET_FD) };
    }
    let e = become_container_process(&spec, req);
    let name = req
        .argv
        .first()
        .map(String::as_str)
        .unwrap_or("login shell");
    eprintln!("moat exec: {name}: {e}");
    // SAFETY: leaving the forked child.
    unsafe {
        libc::_exit(if e.kind() == io::ErrorKind::NotFound {
            127
        } else {
            126
        })
    }
}

/// Opens a new pty master in the devpts of our (the container's) mount
/// namespace, unlocked and sized.
fn open_pty(rows: u16, cols: u16) -> io::Result<OwnedFd> {
    // SAFETY: open with a constant NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open succeeded; we own the fd.
    let m = unsafe { OwnedFd::from_raw_fd(fd) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK takes a pointer to an int.
    if unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    crate::sys::set_winsize(&m, rows, cols)?;
    Ok(m)
}

/// In the forked child: a new session whose controlling terminal is the
/// pty's slave, on stdin, stdout and stderr.
fn take_pty(master: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain syscalls on fds we own; TIOCGPTPEER opens the slave of
    // this very master (no path lookup).
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        let slave = libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY,
        );
        if slave < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(slave, libc::TIOCSCTTY, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        for target in 0..3 {
            if libc::dup2(slave, target) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if slave > 2 {
            libc::close(slave);
        }
    }
    Ok(())
}

/// Writes our PID into the cgroup of every hierarchy `pid` belongs to.
fn join_cgroups(pid: i32) -> io::Result<()> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() }.to_string();
    for line in cgroups.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let mnt = mountinfo.lines().find_map(|m| {
            let (pre, post) = m.split_once(" - ")?;
            let mut post = post.split_whitespace();
            let fstype = post.next()?;
            let opts = post.nth(1).unwrap_or("");
            let point = pre.split_whitespace().nth(4)?;
            let matches = if ctrls.is_empty() {
                fstype == "cgroup2"
            } else {
                let name = ctrls.strip_prefix("name=").unwrap_or(ctrls);
                fstype == "cgroup"
                    && ctrls.split(',').all(|c| {
                        opts.split(',')
                            .any(|o| o == c || o == format!("name={name}"))
                    })
            };
            matches.then(|| point.to_string())
        });
        let Some(mnt) = mnt else { continue };
        let procs = format!("{mnt}{path}/cgroup.procs");
        if std::path::Path::new(&procs).exists() {
            fs::write(&procs, &me)?;
        }
    }
    Ok(())
}

fn join_namespaces(pid: i32) -> io::Result<()> {
    // User first: the others are owned by it.
    for (ns, flag) in [
        ("user", libc::CLONE_NEWUSER),
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        let theirs = format!("/proc/{pid}/ns/{ns}");
        let mine = format!("/proc/self/ns/{ns}");
        if fs::read_link(&theirs)? == fs::read_link(&mine)? {
            continue;
        }
        let f = fs::File::open(&theirs)?;
        // SAFETY: setns on an open namespace fd.
        if unsafe { libc::setns(f.as_raw_fd(), flag) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("setns {ns}: {e}")));
        }
    }
    Ok(())
}

/// The login shell and home of `uid` from the container's /etc/passwd
/// (we are in its mount namespace): `/bin/sh` and `/` when absent.
fn login_of(uid: u32) -> (String, String) {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 7 && f[2].parse::<u32>().ok() == Some(uid))
                .then(|| (f[6].to_string(), f[5].to_string()))
        })
        .filter(|(sh, _)| !sh.is_empty() && std::path::Path::new(sh).exists())
        .unwrap_or_else(|| ("/bin/sh".into(), "/".into()))
}

fn become_container_process(spec: &Spec, req: &ExecRequest) -> io::Error {
    let Some(process) = spec.process() else {
        return io::Error::other("config.json has no process");
    };
    let cwd = process.cwd().clone();
    if let Err(e) = std::env::set_current_dir(&cwd) {
        return io::Error::new(e.kind(), format!("chdir {}: {e}", cwd.display()));
    }
    let uid = process.user().uid();
    let gid = process.user().gid();
    let caps_of =
        |set: Option<&HashSet<libcontainer::oci_spec::runtime::Capability>>| -> caps::CapsHashSet {
            set.map(|s| {
                s.iter()
                    .filter_map(|c| {
                        // oci-spec displays `CHOWN`, the caps crate parses `CAP_CHOWN`.
                        let name = c.to_string();
                        let name = if name.starts_with("CAP_") {
                            name
                        } else {
                            format!("CAP_{name}")
                        };
                        caps::Capability::from_str(&name).ok()
                    })
                    .collect()
            })
            .unwrap_or_default()
        };
    let pc = process.capabilities().as_ref();
    let bounding = caps_of(pc.and_then(|c| c.bounding().as_ref()));
    let effective = caps_of(pc.and_then(|c| c.effective().as_ref()));
    let permitted = caps_of(pc.and_then(|c| c.permitted().as_ref()));
    // Drop the bounding set while we still hold CAP_SETPCAP.
    for cap in caps::all() {
        if !bounding.contains(&cap) {
            let _ = caps::drop(None, caps::CapSet::Bounding, cap);
        }
    }
    // SAFETY: plain credential syscalls in the forked child.
    unsafe {
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            return io::Error::last_os_error();
        }
    }
    // Effective must stay a subset of permitted at every step.
    if let Err(e) = caps::set(None, caps::CapSet::Effective, &effective)
        .and_then(|_| caps::set(None, caps::CapSet::Permitted, &permitted))
        .and_then(|_| caps::set(None, caps::CapSet::Inheritable, &caps::CapsHashSet::new()))
        .and_then(|_| caps::clear(None, caps::CapSet::Ambient))
    {
        return io::Error::other(format!("capabilities: {e}"));
    }
    if process.no_new_privileges().unwrap_or(false) {
        // SAFETY: prctl with constant arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    }
    if let Some(seccomp) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        if let Err(e) = libcontainer::seccomp::initialize_seccomp(seccomp) {
            return io::Error::other(format!("seccomp: {e}"));
        }
    }
    let mut cmd;
    let mut login_env = vec![];
    if req.login {
        let (shell, home) = login_of(uid);
        let base = shell.rsplit('/').next().unwrap_or("sh").to_string();
        cmd = std::process::Command::new(&shell);
        // A leading '-' in argv[0] makes sh, bash, dash and busybox a login shell.
        cmd.arg0(format!("-{base}"));
        if std::env::set_current_dir(&home).is_err() {
            let _ = std::env::set_current_dir("/");
        }
        login_env = vec![format!("HOME={home}"), format!("SHELL={shell}")];
        if uid == 0 {
            login_env.push("USER=root".into());
        }
    } else {
        cmd = std::process::Command::new(&req.argv[0]);
        cmd.args(&req.argv[1..]);
    }
    cmd.env_clear();
    let base_env = process.env().as_deref().unwrap_or_default();
    for kv in base_env.iter().chain(&login_env).chain(&req.env) {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.exec()
}
