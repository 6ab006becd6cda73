//! Thin safe wrappers over the few raw syscalls the runtime and the
//! supervisor need beyond libcontainer: pipes, waitpid, signals, process
//! start times (to tell a live process from a reused PID), and bringing up
//! loopback inside a container's network namespace.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

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

/// Puts `fd` in non-blocking mode.
pub fn set_nonblock(fd: &OwnedFd) {
    // SAFETY: fcntl on an fd the caller owns.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
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

/// Waits up to `timeout` for `pid` (started at `started`, see [`start_time`])
/// to end; true once it has. Through a pidfd, so the caller wakes the moment
/// it ends (not at the next poll tick); without pidfd_open (Linux < 5.3) it
/// checks every 2 ms.
pub fn wait_gone(pid: i32, started: u64, timeout: Duration) -> bool {
    wait_gone_or_closed(pid, started, None, timeout)
}

/// [`wait_gone`], or, with `pipe`, until its write end is closed by all
/// that hold it, whichever comes first: true then. A supervisor closes the
/// notify pipe it writes to as its very last act (see
/// `supervisor::let_go_of_the_folder`), so its end of file means "done"
/// while its exit may still be under way. Bytes read from `pipe` on the way
/// are dropped (they only wake readers).
pub fn wait_gone_or_closed(
    pid: i32,
    started: u64,
    pipe: Option<&OwnedFd>,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    // SAFETY: pidfd_open takes a pid and flags, and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if raw < 0 {
        if io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return true;
        }
        while alive(pid, started) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        return true;
    }
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Checked after the open: the pidfd is then known to be the process
    // recorded, not a later one that got its pid.
    if !alive(pid, started) {
        return true;
    }
    let Some(pipe) = pipe else {
        return wait_readable(&pidfd, timeout) && !alive(pid, started);
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = [pidfd.as_raw_fd(), pipe.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: poll over two live pollfds.
        let r = unsafe { libc::poll(p.as_mut_ptr(), 2, ms) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if r == 0 {
            return false;
        }
        if p[0].revents != 0 {
            return !alive(pid, started);
        }
        let mut buf = [0u8; 64];
        // SAFETY: read into a live buffer from a fd the caller owns.
        let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n == 0 {
            return true;
        }
        if n < 0
            && !matches!(
                io::Error::last_os_error().kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            )
        {
            // Not a pipe we can read: the process's end decides.
            return wait_readable(&pidfd, left) && !alive(pid, started);
        }
    }
}

/// Closes every fd from `from` up but those in `keep` (at most 8; more are
/// not kept), with `close_range`. Async-signal-safe (no allocation): usable
/// in a forked child.
///
/// # Safety
/// Fds owned by live objects are closed under them: the caller must not
/// use (or drop) such objects afterwards, except those in `keep`.
pub unsafe fn close_fds_except(from: u32, keep: &[u32]) {
    let mut k = [u32::MAX; 8];
    let n = keep.len().min(k.len());
    k[..n].copy_from_slice(&keep[..n]);
    k[..n].sort_unstable();
    let mut lo = from;
    for &fd in &k[..n] {
        if fd < lo {
            continue;
        }
        if fd > lo {
            // SAFETY: close_range on a range of fd numbers (see above).
            unsafe { libc::syscall(libc::SYS_close_range, lo, fd - 1, 0u32) };
        }
        lo = fd.saturating_add(1);
    }
    if lo != u32::MAX {
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_close_range, lo, u32::MAX, 0u32) };
    }
}

/// Waits up to `timeout` for `fd` to be readable (or at its end, or in
/// error); true if it is. Interruptions by signals wait again for the rest.
pub fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Rounded up: a 0 ms poll for a sub-millisecond rest would spin.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: poll over one live pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return true;
        }
        if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
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

/// Sets IFF_UP on `lo` in the network namespace of `pid`. A socket belongs
/// to the network namespace it was made in: this thread enters the target's
/// namespace just for `socket()` and goes back at once (setns(CLONE_NEWNET)
/// changes the calling thread only), then sets the flag through that socket.
pub fn loopback_up(pid: i32) -> io::Result<()> {
    let target = fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let ours = fs::File::open("/proc/thread-self/ns/net")?;
    // SAFETY: setns on open namespace fds; this thread is back in its own
    // namespace before the block ends (or the process aborts, below).
    let sock = unsafe {
        if libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        let made = io::Error::last_os_error();
        if libc::setns(ours.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            // Never carry on in a container's network namespace.
            std::process::abort();
        }
        if s < 0 {
            return Err(made);
        }
        OwnedFd::from_raw_fd(s)
    };
    // SAFETY: ioctls on our socket with a zeroed, NUL-terminated ifreq.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
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

/// A close-on-exec Unix stream socket pair.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints for socketpair to fill.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so both fds are open and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets a terminal's window size (TIOCSWINSZ); the foreground process group gets SIGWINCH.
pub fn set_winsize(fd: &impl std::os::fd::AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `fd` over the Unix socket `sock` (SCM_RIGHTS, with one data byte).
pub fn send_fd(sock: &impl std::os::fd::AsRawFd, fd: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    send_fds(sock, &[fd.as_raw_fd()])
}

/// Sends `fds` (at most [`MAX_FDS`]) in one SCM_RIGHTS message with one data byte.
pub fn send_fds(sock: &impl std::os::fd::AsRawFd, fds: &[i32]) -> io::Result<()> {
    if fds.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::other("send_fds: 1 to MAX_FDS descriptors"));
    }
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let data_len = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call,
    // and the cmsg header and its data are written inside `cbuf` (CMSG_FIRSTHDR
    // of a buffer of CMSG_SPACE(data_len) bytes is non-null and has room).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(data_len) as usize;
        let data = libc::CMSG_DATA(c).cast::<i32>();
        for (i, fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(data.add(i), *fd);
        }
        if libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Most descriptors [`send_fds`] sends and [`recv_fds`] takes in one message.
pub const MAX_FDS: usize = 4;

/// Receives one fd sent with [`send_fd`]; `Ok(None)` when the peer closed
/// the socket without sending one.
pub fn recv_fd(sock: &impl std::os::fd::AsRawFd) -> io::Result<Option<OwnedFd>> {
    Ok(recv_fds(sock)?.into_iter().next())
}

/// Receives the fds of one [`send_fds`] message (empty when the peer closed
/// the socket, or sent data without descriptors).
pub fn recv_fds(sock: &impl std::os::fd::AsRawFd) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let max = (MAX_FDS * std::mem::size_of::<i32>()) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(max) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: as in send_fds; the kernel fills at most `space` control bytes,
    // the data length comes from its cmsg header, and every received
    // SCM_RIGHTS fd is new and ours.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let n = loop {
            let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break n;
            }
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        if n == 0 || c.is_null() || (*c).cmsg_type != libc::SCM_RIGHTS {
            return Ok(Vec::new());
        }
        let header = libc::CMSG_LEN(0) as usize;
        let count = ((*c).cmsg_len as usize).saturating_sub(header) / std::mem::size_of::<i32>();
        let data = libc::CMSG_DATA(c).cast::<i32>();
        Ok((0..count.min(MAX_FDS))
            .map(|i| OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))))
            .collect())
    }
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Whether `path` is a bind-mounted namespace (nsfs), e.g. a live persistent netns.
pub fn is_ns_mount(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills a struct we own from a NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC
    }
}

/// Creates a new network namespace with `lo` up and bind-mounts it on
/// `net` (an empty file is created), so that it outlives every process in
/// it: containers join it by path and keep the NIC attached to it once.
///
/// With `user = Some((file, range))` the network namespace is owned by a new
/// user namespace mapping root to `range` (bind-mounted on `file` too): a
/// container with a user namespace can only join a network namespace its
/// user namespace owns, so it joins both. See [`with_ns_helper`].
pub fn create_persistent_netns(
    net: &std::path::Path,
    user: Option<(&std::path::Path, crate::spec::IdRange)>,
) -> io::Result<()> {
    let touch = |p: &std::path::Path| -> io::Result<()> {
        // A namespace still bound there (a caller killed half-way through
        // this function or through removing a pair) is replaced: opening an
        // nsfs file for writing fails with EPERM.
        remove_ns_mount(p)
            .and_then(|()| match p.parent() {
                Some(dir) => fs::create_dir_all(dir),
                None => Ok(()),
            })
            .and_then(|()| {
                fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(p)
                    .map(|_| ())
            })
            .map_err(|e| io::Error::new(e.kind(), format!("preparing {}: {e}", p.display())))
    };
    touch(net)?;
    if let Some((u, _)) = user {
        touch(u)?;
    }
    let result = with_ns_helper(user.map(|(_, r)| r), |child| {
        bind(&format!("/proc/{child}/ns/net"), net)?;
        if let Some((u, _)) = user {
            bind(&format!("/proc/{child}/ns/user"), u)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        let _ = remove_ns_mount(net);
        if let Some((u, _)) = user {
            let _ = remove_ns_mount(u);
        }
        return Err(io::Error::new(
            e.kind(),
            format!(
                "creating a network namespace on {} failed: {e}",
                net.display()
            ),
        ));
    }
    Ok(())
}

/// A user namespace and a network namespace it owns, `lo` up (see
/// [`NsAhead`]), as open namespace files (close-on-exec).
#[derive(Debug)]
pub struct FreshNamespaces {
    pub user: OwnedFd,
    pub net: OwnedFd,
}

/// A machine's user namespace (root mapped to `range`) and a network
/// namespace it owns, `lo` up, made by a helper process in parallel with
/// the rest of the machine's preparation: [`NsAhead::start`] returns once
/// the user namespace is mapped (the helper goes on making the network
/// namespace, ~0.7 ms of kernel time here), [`NsAhead::finish`] waits for
/// the network namespace. The map is written before the network namespace
/// is made: the kernel takes the owner of `/proc/net` and of `lo`'s sysfs
/// files from the owning user namespace's root at that moment, so with no
/// map yet they would show as `nobody` inside and be closed to the
/// machine's root. Dropped unfinished, the helper is killed and reaped.
#[derive(Debug)]
pub struct NsAhead {
    range: crate::spec::IdRange,
    helper: Helper,
    user: OwnedFd,
    from_child: fs::File,
    to_child: fs::File,
}

/// A child process that is killed and reaped if dropped before [`Helper::wait`].
#[derive(Debug)]
struct Helper(libc::pid_t);

impl Helper {
    fn wait(self) -> io::Result<ExitStatus> {
        let pid = self.0;
        std::mem::forget(self);
        wait_pid(pid)
    }

    /// Kills it (a helper that already exited keeps its status) and reaps it.
    fn stop(self) -> io::Result<ExitStatus> {
        let _ = kill(self.0, libc::SIGKILL);
        self.wait()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = kill(self.0, libc::SIGKILL);
        let _ = wait_pid(self.0);
    }
}

impl NsAhead {
    /// Forks the helper and maps its user namespace.
    pub fn start(range: crate::spec::IdRange) -> io::Result<NsAhead> {
        use std::io::{Read, Write};
        let (pid, mut from_child, mut to_child) = spawn_ns_helper(true)?;
        let helper = Helper(pid);
        let mut map_user = || -> io::Result<OwnedFd> {
            let mut b = [0u8; 1];
            from_child.read_exact(&mut b)?;
            write_id_maps(pid, range)?;
            to_child.write_all(&b)?;
            let p = format!("/proc/{pid}/ns/user");
            fs::File::open(&p)
                .map(OwnedFd::from)
                .map_err(|e| io::Error::new(e.kind(), format!("{p}: {e}")))
        };
        match map_user() {
            Ok(user) => Ok(NsAhead {
                range,
                helper,
                user,
                from_child,
                to_child,
            }),
            Err(e) => {
                let st = helper.stop();
                Err(io::Error::new(e.kind(), format!("{e} (helper {st:?})")))
            }
        }
    }

    pub fn range(&self) -> crate::spec::IdRange {
        self.range
    }

    /// The user namespace, mapped already (for idmapped mounts).
    pub fn user(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.user.as_fd()
    }

    /// Waits for the network namespace; the helper then exits.
    pub fn finish(self) -> io::Result<FreshNamespaces> {
        use std::io::{Read, Write};
        use std::os::unix::fs::MetadataExt;
        let NsAhead {
            helper,
            user,
            mut from_child,
            mut to_child,
            ..
        } = self;
        let pid = helper.0;
        let mut open_net = || -> io::Result<OwnedFd> {
            let mut b = [0u8; 1];
            from_child.read_exact(&mut b)?;
            let p = format!("/proc/{pid}/ns/net");
            let net =
                fs::File::open(&p).map_err(|e| io::Error::new(e.kind(), format!("{p}: {e}")))?;
            // The pipes order the helper's steps, so this is its new
            // namespace; checked all the same: never hand a machine ours.
            let id = |f: &fs::File| f.metadata().map(|m| (m.dev(), m.ino()));
            if id(&net)? == id(&fs::File::open("/proc/self/ns/net")?)? {
                return Err(io::Error::other(
                    "the network namespace made for the machine is this process's own",
                ));
            }
            to_child.write_all(&b)?;
            Ok(net.into())
        };
        match open_net() {
            Ok(net) => {
                let _ = helper.wait();
                Ok(FreshNamespaces { user, net })
            }
            Err(e) => {
                let st = helper.stop();
                Err(io::Error::new(e.kind(), format!("{e} (helper {st:?})")))
            }
        }
    }
}

fn write_id_maps(pid: libc::pid_t, range: crate::spec::IdRange) -> io::Result<()> {
    let map = format!("0 {} {}\n", range.host_id, range.size);
    for f in ["uid_map", "gid_map"] {
        let p = format!("/proc/{pid}/{f}");
        fs::write(&p, &map).map_err(|e| io::Error::new(e.kind(), format!("write {p}: {e}")))?;
    }
    Ok(())
}

/// Runs `then(pid)` while a helper `pid` (see [`spawn_ns_helper`]) sits in
/// its new network namespace, owned, with `user = Some(range)`, by its new
/// user namespace mapping root to `range`; the helper exits when `then`
/// returns.
fn with_ns_helper<T>(
    user: Option<crate::spec::IdRange>,
    then: impl FnOnce(libc::pid_t) -> io::Result<T>,
) -> io::Result<T> {
    use std::io::{Read, Write};
    let (child, mut from_child, mut to_child) = spawn_ns_helper(user.is_some())?;
    let result = (|| -> io::Result<T> {
        let mut b = [0u8; 1];
        if let Some(range) = user {
            from_child.read_exact(&mut b)?;
            write_id_maps(child, range)?;
            to_child.write_all(&b)?;
        }
        from_child.read_exact(&mut b)?;
        let out = then(child)?;
        to_child.write_all(&b)?;
        Ok(out)
    })();
    drop(to_child);
    let st = wait_pid(child)?;
    result.map_err(|e| io::Error::new(e.kind(), format!("{e} (helper {st:?})")))
}

/// Forks a helper that makes namespaces for the caller, who never changes
/// namespace itself: with `with_user`, the helper enters a new user
/// namespace, writes a byte and waits for one (the caller writes its id
/// maps meanwhile); then it enters a new network namespace, brings `lo` up,
/// writes a byte and waits for one (the caller opens or mounts its
/// `/proc/<pid>/ns/*` meanwhile), and exits. Returns its pid, the read end
/// of its bytes and the write end of the caller's.
fn spawn_ns_helper(with_user: bool) -> io::Result<(libc::pid_t, fs::File, fs::File)> {
    let (to_parent_r, to_parent_w) = pipe()?;
    let (to_child_r, to_child_w) = pipe()?;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // The helper's unshare(CLONE_NEWNET) is ~0.5 ms of kernel work that
    // does not yield; Linux starts a forked child on its parent's CPU, so
    // the parent, which goes on preparing the machine meanwhile, sat
    // runnable behind it while the other CPU idled (scheduler trace: ~0.6 ms
    // of a `moat run`). The helper moves to the other CPUs first.
    let cpus = affinity().as_ref().and_then(other_cpus);
    // SAFETY: fork in a process that may have threads: the child only calls
    // async-signal-safe syscalls (close, prctl, sched_getcpu,
    // sched_setaffinity, unshare, read, write, socket, ioctl, _exit).
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        use std::os::fd::AsRawFd;
        let (w, r) = (to_parent_w.as_raw_fd(), to_child_r.as_raw_fd());
        // SAFETY: raw syscalls on our pipe fds and a zeroed ifreq.
        unsafe {
            // None of the caller's descriptors but our two pipe ends: a
            // copy of its lock (the apply lock), of a container's output
            // pipe or of a listening socket must not live on here. Without
            // our copies of the caller's pipe ends, our reads see EOF when
            // it dies, and the death signal ends us even in a syscall that
            // does not return.
            close_fds_except(0, &[w as u32, r as u32]);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(9);
            }
            if let Some(others) = &cpus {
                avoid_cpu(others);
            }
            let mut b = [0u8; 1];
            if with_user {
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    libc::_exit(1);
                }
                // The parent writes our id maps.
                libc::write(w, b.as_ptr().cast(), 1);
                if libc::read(r, b.as_mut_ptr().cast(), 1) != 1 {
                    libc::_exit(2);
                }
            }
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                libc::_exit(3);
            }
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                libc::_exit(4);
            }
            let mut req: libc::ifreq = std::mem::zeroed();
            req.ifr_name[0] = b'l' as libc::c_char;
            req.ifr_name[1] = b'o' as libc::c_char;
            if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) != 0 {
                libc::_exit(5);
            }
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(s, libc::SIOCSIFFLAGS, &req) != 0 {
                libc::_exit(6);
            }
            // The parent opens or mounts our namespaces, then lets us go.
            libc::write(w, b.as_ptr().cast(), 1);
            libc::read(r, b.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    drop(to_parent_w);
    drop(to_child_r);
    Ok((
        child,
        fs::File::from(to_parent_r),
        fs::File::from(to_child_w),
    ))
}

fn bind(src: &str, target: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let s =
        std::ffi::CString::new(src).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let t = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: mount with NUL-terminated paths and null fs type/data.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts and removes a persistent namespace file; missing is not an error.
pub fn remove_ns_mount(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    while is_ns_mount(path) {
        // SAFETY: umount2 with a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Reads `rel` (relative, e.g. `etc/passwd`) of the tree at `root` as the
/// machine would see it: symlinks and `..` resolve inside `root`
/// (`openat2` with `RESOLVE_IN_ROOT`, no magic links), so an image cannot
/// point the host at its own files; only a regular file is opened for
/// reading (an image's device node or FIFO is never opened). At most `max`
/// bytes; `None` when it cannot be read that way (missing, not a regular
/// file, too big, or a kernel before 5.6).
pub fn read_in_root(root: &std::path::Path, rel: &str, max: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    let c_root = std::ffi::CString::new(root.as_os_str().as_bytes()).ok()?;
    let c_rel = std::ffi::CString::new(rel).ok()?;
    // SAFETY: open of a NUL-terminated path; returns a new fd or -1.
    let dir = unsafe {
        libc::open(
            c_root.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return None;
    }
    // SAFETY: `dir` is a new fd that nothing else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    // SAFETY: open_how is plain data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a live dir fd, a NUL-terminated path and a
    // pointer to `how` with its size; returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    } as i32;
    if fd < 0 {
        return None;
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    let path_fd = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let t = path_fd.metadata().ok()?.file_type();
    if !t.is_file() || t.is_fifo() || t.is_char_device() || t.is_block_device() {
        return None;
    }
    // The same inode, opened for reading through our own descriptor.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", path_fd.as_raw_fd()))
        .ok()?;
    let mut buf = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut buf).ok()?;
    (buf.len() <= max).then_some(buf)
}

/// This process's CPU affinity, when it allows more than one CPU.
pub fn affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 (this thread) and a live cpu_set_t of the size given.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    // SAFETY: CPU_COUNT reads a valid cpu_set_t.
    (rc == 0 && unsafe { libc::CPU_COUNT(&set) } > 1).then_some(set)
}

/// The CPUs of `set` but the one this thread runs on now, for a child
/// about to be forked to move to (see [`avoid_cpu`]); `None` when that
/// leaves none or the CPU is unknown.
pub fn other_cpus(set: &libc::cpu_set_t) -> Option<libc::cpu_set_t> {
    // SAFETY: sched_getcpu takes no argument.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu < 0 || cpu as usize >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return None;
    }
    let mut others = *set;
    // SAFETY: CPU_CLR and CPU_COUNT on a valid cpu_set_t; a CPU number the
    // kernel gave is within its size.
    let left = unsafe {
        libc::CPU_CLR(cpu as usize, &mut others);
        libc::CPU_COUNT(&others)
    };
    (left > 0).then_some(others)
}

/// In a freshly forked child: moves to `others` (from [`other_cpus`], taken
/// in the parent before the fork, so the child leaves its parent's CPU
/// wherever the kernel put it first). Async-signal-safe (one system call).
pub fn avoid_cpu(others: &libc::cpu_set_t) {
    set_affinity(0, others);
}

/// Best effort: `pid`'s CPU affinity becomes `set`.
pub fn set_affinity(pid: i32, set: &libc::cpu_set_t) {
    // SAFETY: a live cpu_set_t of the size given; errors are ignored.
    unsafe { libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), set) };
}

/// The CPUs of `set`, as a list for an environment variable: `0,1,3`.
pub fn cpu_list(set: &libc::cpu_set_t) -> String {
    (0..8 * std::mem::size_of::<libc::cpu_set_t>())
        // SAFETY: CPU_ISSET on a valid cpu_set_t, within its size.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, set) })
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The set of [`cpu_list`]'s text; `None` when it names no CPU or is not
/// such a list.
pub fn parse_cpu_list(s: &str) -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is valid (the empty set).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    let mut any = false;
    for part in s.split(',') {
        let c: usize = part.trim().parse().ok().filter(|c| *c < max)?;
        // SAFETY: CPU_SET on a valid cpu_set_t, within its size (checked).
        unsafe { libc::CPU_SET(c, &mut set) };
        any = true;
    }
    any.then_some(set)
}

/// A child started by [`spawn_nowait`], before its exec is known to be done.
#[derive(Debug)]
pub struct Spawned {
    pub pid: libc::pid_t,
    /// Close-on-exec in the child: end of file once its exec succeeded, the
    /// exec's errno (4 bytes) when it failed.
    exec_result: Option<OwnedFd>,
}

impl Spawned {
    /// Whether the exec succeeded, waiting for it if it has not happened yet
    /// (once: later calls answer from the first).
    pub fn exec_done(&mut self) -> io::Result<()> {
        let Some(fd) = self.exec_result.take() else {
            return Ok(());
        };
        let mut buf = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            // SAFETY: read into the live remainder of buf from an fd we own.
            let n = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    buf[got..].as_mut_ptr().cast(),
                    buf.len() - got,
                )
            };
            match n {
                0 => break,
                n if n > 0 => got += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        match got {
            0 => Ok(()),
            4 => Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf))),
            _ => Err(io::Error::other("short report of a failed exec")),
        }
    }
}

/// Starts `prog` with `argv` and `envp` (`KEY=value`) like
/// `std::process::Command::spawn`, stdin on /dev/null and the descriptors
/// of `keep` left open across the exec, but returns at once after the fork:
/// `spawn` waits until the child has exec'd, and on this 2-core host that
/// wait (the child's exec, and its move off this CPU first) was ~1 ms of a
/// `moat run`. [`Spawned::exec_done`] tells, later, whether the exec
/// worked. With `cpus`, the child first moves to the CPUs of that set other
/// than this thread's (see [`other_cpus`]); the program must then put its
/// affinity back itself (it is not known here when the exec is done).
///
/// The child calls async-signal-safe functions only, so this may run in a
/// process with threads.
pub fn spawn_nowait(
    prog: &std::ffi::CStr,
    argv: &[std::ffi::CString],
    envp: &[std::ffi::CString],
    keep: &[i32],
    cpus: Option<&libc::cpu_set_t>,
) -> io::Result<Spawned> {
    let null = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/null")?;
    let (err_r, err_w) = pipe()?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let others = cpus.and_then(other_cpus);
    // SAFETY: the child only makes async-signal-safe calls (sigprocmask,
    // sigaction, dup2, fcntl, sched_getcpu, sched_setaffinity, execve,
    // write, _exit) on data prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; every pointer was made before the fork and is live.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Rust ignores SIGPIPE, and an ignored signal stays ignored
            // across exec (std's spawn puts it back too).
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let ok = libc::dup2(null.as_raw_fd(), 0) == 0
                && keep
                    .iter()
                    .all(|fd| libc::fcntl(*fd, libc::F_SETFD, 0) == 0);
            if ok {
                if let Some(o) = &others {
                    avoid_cpu(o);
                }
                libc::execve(prog.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
            }
            let errno = *libc::__errno_location();
            libc::write(err_w.as_raw_fd(), errno.to_ne_bytes().as_ptr().cast(), 4);
            libc::_exit(127);
        }
    }
    drop(err_w);
    Ok(Spawned {
        pid,
        exec_result: Some(err_r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::io::Read;

    #[test]
    fn a_cpu_list_reads_back_as_the_same_set() {
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for c in [0usize, 1, 5, 63] {
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        let text = cpu_list(&set);
        assert_eq!(text, "0,1,5,63");
        let back = parse_cpu_list(&text).expect("a list");
        assert_eq!(cpu_list(&back), text);
        assert!(parse_cpu_list("").is_none());
        assert!(parse_cpu_list("0,x").is_none());
        assert!(parse_cpu_list("999999").is_none());
    }

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn close_fds_except_closes_all_from_the_first_but_the_kept_ones() {
        let files: Vec<fs::File> = (0..4)
            .map(|_| fs::File::open("/dev/null").unwrap())
            .collect();
        let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        let (r, w) = pipe().unwrap();
        let (first, wn) = (fds[0], w.as_raw_fd());
        // SAFETY: the child only makes async-signal-safe calls and exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            unsafe {
                close_fds_except(first as u32, &[wn as u32, fds[2] as u32]);
                let mut mask = 0u8;
                for (i, fd) in fds.iter().enumerate() {
                    if libc::fcntl(*fd, libc::F_GETFD) != -1 {
                        mask |= 1 << i;
                    }
                }
                libc::write(wn, (&mask as *const u8).cast(), 1);
                libc::_exit(0);
            }
        }
        drop(w);
        let mut got = Vec::new();
        fs::File::from(r).read_to_end(&mut got).unwrap();
        let mut st = 0;
        unsafe { libc::waitpid(child, &mut st, 0) };
        assert_eq!(got, vec![0b0100], "only the kept file stays open");
    }

    /// A `sleep` child that holds none of our pipes, with its start time.
    fn sleeper(secs: &str) -> (std::process::Child, i32, u64) {
        let child = std::process::Command::new("sleep")
            .arg(secs)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let started = start_time(pid).expect("the child runs");
        (child, pid, started)
    }

    #[test]
    fn a_closed_pipe_ends_the_wait_while_the_process_still_runs() {
        let (r, w) = pipe().unwrap();
        let (mut child, pid, started) = sleeper("5");
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            // A status byte first: read and dropped, the wait goes on.
            let _ = std::io::Write::write_all(&mut fs::File::from(w.try_clone().unwrap()), b"s");
            std::thread::sleep(Duration::from_millis(50));
            drop(w);
        });
        let t = Instant::now();
        assert!(wait_gone_or_closed(
            pid,
            started,
            Some(&r),
            Duration::from_secs(4)
        ));
        assert!(
            t.elapsed() >= Duration::from_millis(90),
            "{:?}",
            t.elapsed()
        );
        assert!(alive(pid, started), "the process itself was not waited for");
        closer.join().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_process_that_ends_ends_the_wait_even_with_its_pipe_held_elsewhere() {
        let (r, _w) = pipe().unwrap();
        let (mut child, pid, started) = sleeper("0.1");
        assert!(wait_gone_or_closed(
            pid,
            started,
            Some(&r),
            Duration::from_secs(4)
        ));
        assert!(!alive(pid, started));
        child.wait().unwrap();
        // Neither: the wait gives up after its time.
        let (mut child, pid, started) = sleeper("5");
        let t = Instant::now();
        assert!(!wait_gone_or_closed(
            pid,
            started,
            Some(&r),
            Duration::from_millis(100)
        ));
        assert!(t.elapsed() >= Duration::from_millis(100));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn spawn_nowait_runs_the_program_with_its_env_and_kept_fds() {
        let (r, w) = pipe().unwrap();
        let script = format!("echo \"$MOAT_T\" >&{}", w.as_raw_fd());
        let mut child = spawn_nowait(
            &c("/bin/sh"),
            &[c("sh"), c("-c"), c(&script)],
            &[c("MOAT_T=hello"), c("PATH=/usr/bin:/bin")],
            &[w.as_raw_fd()],
            affinity().as_ref(),
        )
        .expect("spawn");
        child.exec_done().expect("exec");
        assert_eq!(wait_pid(child.pid).unwrap(), ExitStatus::Code(0));
        drop(w);
        let mut out = String::new();
        fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello\n");
    }

    #[test]
    fn spawn_nowait_reports_a_failed_exec_later() {
        let mut child = spawn_nowait(
            &c("/nonexistent/moat-supervisor"),
            &[c("moat-supervisor")],
            &[],
            &[],
            None,
        )
        .expect("the fork itself works");
        let e = child.exec_done().expect_err("no such program");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert_eq!(wait_pid(child.pid).unwrap(), ExitStatus::Code(127));
    }
}
