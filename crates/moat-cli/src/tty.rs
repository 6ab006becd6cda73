//! The client half of interactive exec (`exec -t/-i`, `shell`): puts the
//! caller's terminal in raw mode (restored on drop, also on errors and
//! panics), then relays bytes between our stdin/stdout and the session's fd
//! with poll(2), forwarding window-size changes (SIGWINCH, through a
//! self-pipe) until the process ends; returns its exit code.

use moat_engine::ExecSession;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

static WINCH_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_winch(_: libc::c_int) {
    let fd = WINCH_PIPE.load(Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; the pipe is non-blocking.
    unsafe { libc::write(fd, [0u8].as_ptr().cast(), 1) };
}

/// The size (rows, cols) of the terminal on `fd`, if it is one.
pub fn size_of(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize we own.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}

/// The caller's terminal size: stdin's, else stdout's.
pub fn terminal_size() -> Option<(u16, u16)> {
    size_of(0).or_else(|| size_of(1))
}

/// Raw mode on a terminal while alive; the previous settings come back on drop.
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// `None` when `fd` is not a terminal.
    pub fn enter(fd: RawFd) -> Option<RawMode> {
        // SAFETY: tcgetattr/tcsetattr on a terminal fd with termios structs we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring the settings read in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: write from a live slice.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// One write of as much of `buf` as `fd` takes now (it may be non-blocking:
/// `WouldBlock` then).
fn write_some(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: write from a live slice.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes what `fd` takes now of `pending` and drops it from there. A
/// process that is gone takes nothing more: its output decides the end.
fn flush(fd: RawFd, pending: &mut Vec<u8>) {
    match write_some(fd, pending) {
        Ok(n) => {
            pending.drain(..n);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(_) => pending.clear(),
    }
}

/// Input read from our stdin but not yet taken by the process, at most this
/// much: beyond it the relay stops reading its stdin until the process reads.
const MAX_PENDING: usize = 256 * 1024;

fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: read into a live buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Relays stdin → session and session → stdout until the process ends;
/// returns its exit code. Raw mode is set on our terminal when the session
/// has a tty and stdin is a terminal.
pub fn relay(session: &mut ExecSession) -> io::Result<i32> {
    relay_until(session, None).map(|c| c.unwrap_or(0))
}

/// [`relay`], and when `detach` (a byte such as Ctrl-]) is typed, stop
/// relaying and return `None`: the process goes on (`moat console`).
pub fn relay_until(session: &mut ExecSession, detach: Option<u8>) -> io::Result<Option<i32>> {
    let raw = if session.tty { RawMode::enter(0) } else { None };
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded; both fds are ours.
    let (winch_r, winch_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if session.tty {
        WINCH_PIPE.store(winch_w.as_raw_fd(), Ordering::Relaxed);
        // SAFETY: installing an async-signal-safe handler.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_winch as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(libc::SIGWINCH, &sa, std::ptr::null_mut());
        }
        // The size may have changed since the session was opened.
        if let Some((r, c)) = terminal_size() {
            let _ = session.resize(r, c);
        }
    }
    let io_fd = session.io.as_raw_fd();
    // Writes to the process never block: input it does not read yet waits
    // in `pending` while its output keeps flowing (a blocking write could
    // deadlock with a process blocked on printing what we did not read).
    // SAFETY: fcntl on our own descriptor.
    let io_flags = unsafe { libc::fcntl(io_fd, libc::F_GETFL) };
    if io_flags >= 0 {
        // SAFETY: as above.
        unsafe { libc::fcntl(io_fd, libc::F_SETFL, io_flags | libc::O_NONBLOCK) };
    }
    let mut pending: Vec<u8> = Vec::new();
    // Our stdin ended: the process's input is closed once `pending` is written.
    let mut close_when_written = false;
    let mut stdin_open = true;
    let mut buf = vec![0u8; 32 * 1024];
    let result = loop {
        let mut pfd = [
            libc::pollfd {
                fd: io_fd,
                events: libc::POLLIN | if pending.is_empty() { 0 } else { libc::POLLOUT },
                revents: 0,
            },
            libc::pollfd {
                fd: winch_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if stdin_open && pending.len() < MAX_PENDING {
                    0
                } else {
                    -1
                },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll over a live array.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        if pfd[0].revents & libc::POLLOUT != 0 && !pending.is_empty() {
            flush(io_fd, &mut pending);
            if pending.is_empty() && close_when_written {
                close_when_written = false;
                let _ = session.close_stdin();
            }
        }
        if pfd[0].revents & !libc::POLLOUT != 0 {
            match read(io_fd, &mut buf) {
                // EIO: the pty's last slave was closed (the process ended).
                Ok(0) => break Ok(false),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => break Err(e),
                Ok(n) => {
                    if let Err(e) = write_all(1, &buf[..n]) {
                        break Err(e);
                    }
                }
            }
        }
        if pfd[1].revents != 0 {
            let mut b = [0u8; 64];
            let _ = read(winch_r.as_raw_fd(), &mut b);
            if let Some((r, c)) = terminal_size() {
                let _ = session.resize(r, c);
            }
        }
        if pfd[2].revents != 0 {
            match read(0, &mut buf) {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    // A console leaves the process alone; a session's
                    // process gets the end of its input, after the rest of it.
                    if detach.is_none() {
                        if pending.is_empty() {
                            let _ = session.close_stdin();
                        } else {
                            close_when_written = true;
                        }
                    }
                }
                Ok(n) => {
                    let chunk = &buf[..n];
                    let at = detach.and_then(|d| chunk.iter().position(|&b| b == d));
                    pending.extend_from_slice(&chunk[..at.unwrap_or(n)]);
                    // At once if the process takes it (the usual case).
                    flush(io_fd, &mut pending);
                    if at.is_some() {
                        break Ok(true);
                    }
                }
            }
        }
    };
    if io_flags >= 0 {
        // SAFETY: fcntl on our own descriptor, back to its flags.
        unsafe { libc::fcntl(io_fd, libc::F_SETFL, io_flags) };
    }
    if session.tty {
        // SAFETY: back to the default disposition.
        unsafe { libc::signal(libc::SIGWINCH, libc::SIG_DFL) };
        WINCH_PIPE.store(-1, Ordering::Relaxed);
    }
    // The caller's terminal is itself again while we wait for the exit code.
    drop(raw);
    if result? {
        return Ok(None);
    }
    session.wait().map(Some)
}

/// `moat exec -t/-i` and `moat shell` (empty `argv`: the login shell):
/// opens the session, relays, and returns the process's exit code.
pub fn exec(
    eng: &moat_engine::Engine,
    machine: &str,
    argv: &[String],
    tty: bool,
) -> Result<u8, crate::run::CliError> {
    let mut env = vec![];
    if tty {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
        env.push(format!("TERM={term}"));
    }
    let opts = moat_engine::SessionOpts {
        tty: tty.then(|| terminal_size().unwrap_or((24, 80))),
        env,
        login: argv.is_empty(),
    };
    let mut session = eng.exec_session_opts(machine, argv, &opts)?;
    let code = relay(&mut session).map_err(|e| crate::run::CliError::Io {
        what: format!("relaying the terminal of {machine}"),
        source: e,
    })?;
    Ok(code.clamp(0, 255) as u8)
}
