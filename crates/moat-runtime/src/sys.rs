//! Thin safe wrappers over the few raw syscalls the runtime and the
//! supervisor need beyond libcontainer: pipes, waitpid, signals, process
//! start times (to tell a live process from a reused PID), and bringing up
//! loopback inside a container's network namespace.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// Shell convention: the code, or 128 + signal.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }

    fn from_raw(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        }
    }
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Blocks until child `pid` ends.
pub fn wait_pid(pid: i32) -> io::Result<ExitStatus> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Non-blocking wait for any child: `Some((pid, status))` for one that ended.
pub fn try_wait_any() -> Option<(i32, ExitStatus)> {
    let mut status = 0;
    // SAFETY: status is a valid out pointer.
    let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if r > 0 {
        Some((r, ExitStatus::from_raw(status)))
    } else {
        None
    }
}

/// kill(2); a missing process is not an error.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    if pid <= 0 {
        return Ok(());
    }
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::kill(pid, sig) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// SIGRTMIN+3: systemd's "halt" request.
pub fn sigrtmin_plus_3() -> i32 {
    libc::SIGRTMIN() + 3
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat),
/// `None` if it does not exist or is a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Is `pid` alive and the same process as when `started` was recorded?
pub fn alive(pid: i32, started: u64) -> bool {
    pid > 0 && start_time(pid) == Some(started)
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sets IFF_UP on `lo` in the network namespace of `pid`. Done in a forked
/// child so the caller never changes namespace.
pub fn loopback_up(pid: i32) -> io::Result<()> {
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))?;
    use std::os::fd::AsRawFd;
    let nsfd = ns.as_raw_fd();
    // SAFETY: fork in a process that may have threads: the child only calls
    // async-signal-safe syscalls (setns, socket, ioctl, _exit) before exiting.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: raw syscalls on valid fds and a zeroed, NUL-terminated ifreq.
        unsafe {
            if libc::setns(nsfd, libc::CLONE_NEWNET) != 0 {
                libc::_exit(1);
            }
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                libc::_exit(2);
            }
            let mut req: libc::ifreq = std::mem::zeroed();
            req.ifr_name[0] = b'l' as libc::c_char;
            req.ifr_name[1] = b'o' as libc::c_char;
            if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) != 0 {
                libc::_exit(3);
            }
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(s, libc::SIOCSIFFLAGS, &req) != 0 {
                libc::_exit(4);
            }
            libc::_exit(0);
        }
    }
    match wait_pid(child)? {
        ExitStatus::Code(0) => Ok(()),
        other => Err(io::Error::other(format!(
            "setting lo up in the netns of pid {pid} failed ({other:?})"
        ))),
    }
}

/// Drops what an idle supervisor no longer needs resident: free heap is
/// returned to the kernel, and the PTEs of our own executable's code are
/// dropped (they fault back in from the page cache when used). Only
/// read-execute mappings are touched: they are never written, so nothing is
/// lost; data and RELRO pages are left alone.
pub fn trim_resident_memory() {
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
    let Ok(exe) = fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(maps) = fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let exe = exe.to_string_lossy();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if perms != "r-xp" || f.nth(3) != Some(exe.as_ref()) {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        // SAFETY: a read-execute, never-written private file mapping of our
        // executable: dropping its pages only causes re-faults from the file.
        unsafe {
            libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED);
        }
    }
}

/// The calling process's capability bounding set (bit n = capability n).
pub fn bounding_set() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("CapBnd:"))?.to_string();
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .unwrap_or(u64::MAX)
}
