//! Masking /proc entries in a running nspawn container. nspawn 252 mounts
//! the container's /proc after its own bind mounts, so `--inaccessible=` and
//! `--bind-ro=/dev/null:/proc/…` fail there. moat therefore enters the
//! container's mount namespace once PID 1 runs and binds /dev/null over
//! each entry of [`super::args::MASKED_PROC`] (read-only).
//!
//! Limit: these mounts are made in the container's own mount namespace, so
//! they are not locked: root inside the container could unmount them (the
//! built-in runtime's masks are locked). `moat status` reports which entries
//! are masked; the kernel already hides kernel addresses from non-init user
//! namespaces (kallsyms shows zeros).

use super::args::MASKED_PROC;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Binds /dev/null over the masked entries inside PID `leader`'s mount
/// namespace. Runs in a forked child (setns needs a single-threaded process).
pub fn apply(leader: i32) -> io::Result<()> {
    let ns = fs::File::open(format!("/proc/{leader}/ns/mnt"))?;
    let null = CString::new("/dev/null").map_err(io::Error::other)?;
    let targets: Vec<CString> = MASKED_PROC
        .iter()
        .filter_map(|p| CString::new(*p).ok())
        .collect();
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new("/bin/true");
    // SAFETY: between fork and exit the child only makes raw syscalls
    // (setns, mount, _exit) on data prepared before fork; it never returns
    // to Rust code that could allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNS) < 0 {
                libc::_exit(2);
            }
            for t in &targets {
                let flags = libc::MS_BIND;
                if libc::mount(
                    null.as_ptr(),
                    t.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ) == 0
                {
                    let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                    libc::mount(
                        std::ptr::null(),
                        t.as_ptr(),
                        std::ptr::null(),
                        ro,
                        std::ptr::null(),
                    );
                }
            }
            libc::_exit(0);
        });
    }
    let st = cmd.status()?;
    drop(ns);
    if !st.success() {
        return Err(io::Error::other(format!(
            "entering the mount namespace of PID {leader} failed ({st})"
        )));
    }
    let (_, unmasked) = check(leader);
    if !unmasked.is_empty() {
        return Err(io::Error::other(format!(
            "still visible: {}",
            unmasked.join(", ")
        )));
    }
    Ok(())
}

/// (masked, not masked) among the entries that exist in the container.
pub fn check(leader: i32) -> (Vec<String>, Vec<String>) {
    let mi = fs::read_to_string(format!("/proc/{leader}/mountinfo")).unwrap_or_default();
    let mounted: Vec<&str> = mi
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    let mut masked = Vec::new();
    let mut open = Vec::new();
    for p in MASKED_PROC {
        if mounted.contains(p) {
            masked.push(p.to_string());
        } else if fs::metadata(format!("/proc/{leader}/root{p}")).is_ok() {
            open.push(p.to_string());
        }
    }
    (masked, open)
}
