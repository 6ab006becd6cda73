//! Running an extra process inside a running container (`exec`).
//!
//! libcontainer 0.7's tenant builder does not join the container's *user*
//! namespace, so an exec'd process would run as host root. moat therefore
//! joins the container itself, in a separate single-threaded helper process
//! (`moat-supervisor --exec DIR -- ARGV...`): it moves into the container's
//! cgroups, joins its namespaces (user first), forks into the PID namespace,
//! then applies the container's user, capabilities, no_new_privs and seccomp
//! filter (from the same config.json, through libcontainer's seccomp code)
//! before exec. The helper exits with the process's status; its stdio is the
//! process's stdio, so captured output and interactive terminals both work.

use crate::machine::{MachineDir, MachineState};
use libcontainer::oci_spec::runtime::Spec;
use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::str::FromStr;

fn fail(msg: String) -> i32 {
    eprintln!("moat exec: {msg}");
    126
}

/// Entry point of `moat-supervisor --exec DIR -- ARGV...`; returns the exit code.
pub fn exec_main(dir: &MachineDir, argv: &[String]) -> i32 {
    if argv.is_empty() {
        return fail("no command given".into());
    }
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
    // SAFETY: single-threaded helper; the child only sets up credentials and execs.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return fail(format!("fork: {}", io::Error::last_os_error()));
    }
    if child > 0 {
        // Signals from a terminal go to the foreground process group; the
        // helper just waits.
        // SAFETY: ignoring SIGINT/SIGQUIT in the waiting parent.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        }
        return match crate::sys::wait_pid(child) {
            Ok(st) => st.code(),
            Err(e) => fail(format!("wait: {e}")),
        };
    }
    let e = become_container_process(&spec, argv);
    eprintln!("moat exec: {}: {e}", argv[0]);
    // SAFETY: leaving the forked child.
    unsafe {
        libc::_exit(if e.kind() == io::ErrorKind::NotFound {
            127
        } else {
            126
        })
    }
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

fn become_container_process(spec: &Spec, argv: &[String]) -> io::Error {
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
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    for kv in process.env().as_deref().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.exec()
}
