//! A host command supervised in place of a container (see
//! [`crate::machine::HostProcess`]): the nspawn driver runs systemd-nspawn
//! this way. The child starts its own session (so a stop can reach the
//! whole group), enters the given network namespace and writes itself into
//! the machine's cgroups before exec, so nothing it starts escapes them.

use crate::machine::HostProcess;
use crate::RuntimeError;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// Spawns `p` with stdout/stderr on the given pipes; returns its PID. The
/// caller reaps it (waitpid), the `Child` handle is dropped on purpose.
pub fn spawn(
    p: &HostProcess,
    name: &str,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
) -> Result<i32, RuntimeError> {
    let sys_err = |op: &'static str| {
        move |source: io::Error| RuntimeError::Sys {
            container: name.to_string(),
            op,
            source,
        }
    };
    let Some((prog, args)) = p.argv.split_first() else {
        return Err(RuntimeError::InvalidSpec {
            container: name.into(),
            reason: "the host process has an empty command line".into(),
        });
    };
    // Everything the child needs is opened before fork: only raw syscalls run
    // between fork and exec.
    let netns = match &p.netns {
        Some(path) => Some(fs::File::open(path).map_err(|e| RuntimeError::io(path, e))?),
        None => None,
    };
    let mut procs = Vec::new();
    for f in &p.cgroup_procs {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(f)
            .map_err(|e| RuntimeError::io(f, e))?;
        procs.push(file);
    }
    let zero = CString::new("0").map_err(|_| sys_err("cgroup")(io::ErrorKind::Other.into()))?;
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::null());
    if let Some(fd) = stdout {
        cmd.stdout(Stdio::from(fd));
    }
    if let Some(fd) = stderr {
        cmd.stderr(Stdio::from(fd));
    }
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let proc_fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure only calls async-signal-safe syscalls (setsid,
    // write, setns) on fds opened before fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            for fd in &proc_fds {
                // "0" moves the writing process.
                if libc::write(*fd, zero.as_ptr().cast(), 1) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(sys_err("spawning the host process"))?;
    drop(procs);
    drop(netns);
    Ok(child.id() as i32)
}
