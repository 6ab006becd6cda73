//! Interactive exec sessions: the caller's half of `exec -t`, `shell` and
//! streaming exec (the daemon's HTTP Upgrade).
//!
//! ```text
//!  caller ──spawn──▶ moat-supervisor --exec DIR [--tty R C] -- ARGV   (see crate::exec)
//!    ▲  tty:  fd 3 = socketpair end ──SCM_RIGHTS──▶ pty master (opened in the container's devpts)
//!    └─ !tty: stdin/stdout/stderr of the helper = one socketpair end; the caller keeps the other
//! ```
//!
//! Either way the caller ends up with one bidirectional fd: bytes written go
//! to the process's stdin, bytes read are its output (stdout and stderr
//! merged). [`ExecSession::wait`] returns the process's exit code (128+N for
//! a signal N).

use crate::exec::{ExecRequest, MASTER_SOCKET_FD};
use crate::machine::{find_supervisor, MachineDir, MachineState};
use crate::{sys, RuntimeError};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// What to run and how.
#[derive(Clone, Debug, Default)]
pub struct SessionOpts {
    /// Allocate a pty of this size (rows, cols); `None` = no terminal.
    pub tty: Option<(u16, u16)>,
    /// Extra environment (`K=V`), e.g. `TERM`.
    pub env: Vec<String>,
    /// Run the user's login shell instead of `argv`.
    pub login: bool,
}

/// A process running inside a machine, with its I/O on one fd.
#[derive(Debug)]
pub struct ExecSession {
    io: OwnedFd,
    tty: bool,
    child: Child,
    status: Option<i32>,
}

impl ExecSession {
    /// The pty master (tty) or the socket (no tty).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.io.as_fd()
    }
    /// A duplicate of [`Self::fd`] (for a reader and a writer thread).
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.io.try_clone()
    }
    pub fn is_tty(&self) -> bool {
        self.tty
    }
    /// Host PID of the helper (signals sent to it reach the process).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// New terminal size; the process gets SIGWINCH. A no-op without a tty.
    pub fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        if !self.tty {
            return Ok(());
        }
        sys::set_winsize(&self.io, rows, cols)
    }
    /// End of input: EOF on the socket, or the terminal's EOF character (^D).
    pub fn close_stdin(&self) -> std::io::Result<()> {
        if self.tty {
            // SAFETY: write of one byte from a local buffer to an fd we own.
            let r = unsafe { libc::write(self.io.as_raw_fd(), [4u8].as_ptr().cast(), 1) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            return Ok(());
        }
        // SAFETY: shutdown on a socket we own.
        if unsafe { libc::shutdown(self.io.as_raw_fd(), libc::SHUT_WR) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    /// Sends `sig` to the process (through the helper, which forwards SIGTERM and SIGHUP).
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        sys::kill(self.child.id() as i32, sig)
    }
    /// Waits for the process to end; its exit code, or 128+N for signal N.
    pub fn wait(&mut self) -> std::io::Result<i32> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let st = self.child.wait()?;
        let code = exit_code(st);
        self.status = Some(code);
        Ok(code)
    }
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// Starts `argv` (or the login shell) in the running machine of `dir`.
pub fn open(
    dir: &MachineDir,
    argv: &[String],
    opts: &SessionOpts,
) -> Result<ExecSession, RuntimeError> {
    let err = |m: String| RuntimeError::Machine {
        dir: dir.dir.clone(),
        message: m,
    };
    match dir.state() {
        MachineState::Running { .. } => {}
        other => {
            return Err(err(format!(
                "machine is not running ({other:?}); start it first"
            )))
        }
    }
    if argv.is_empty() && !opts.login {
        return Err(err("no command given".into()));
    }
    let req = ExecRequest {
        dir: dir.dir.clone(),
        argv: argv.to_vec(),
        tty: opts.tty,
        env: opts.env.clone(),
        login: opts.login,
    };
    let sup = find_supervisor()?;
    let io_err = |e| RuntimeError::io(&dir.dir, e);
    let (mine, theirs) = sys::socketpair().map_err(io_err)?;
    let mut cmd = Command::new(&sup);
    cmd.args(req.to_args());
    if opts.tty.is_some() {
        let fd = theirs.as_raw_fd();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if fd == MASTER_SOCKET_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                } else if libc::dup2(fd, MASTER_SOCKET_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    } else {
        cmd.stdin(Stdio::from(theirs.try_clone().map_err(io_err)?))
            .stdout(Stdio::from(theirs.try_clone().map_err(io_err)?))
            .stderr(Stdio::from(theirs.try_clone().map_err(io_err)?));
    }
    let mut child = cmd.spawn().map_err(|e| RuntimeError::io(&sup, e))?;
    drop(theirs);
    drop(cmd);
    let io = if opts.tty.is_some() {
        match sys::recv_fd(&mine) {
            Ok(Some(master)) => master,
            other => {
                // The helper failed before it had a pty: its stderr says why.
                let mut msg = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut msg);
                }
                let st = child.wait().map(exit_code).unwrap_or(-1);
                if let Err(e) = other {
                    msg.push_str(&format!(" (receiving the pty: {e})"));
                }
                return Err(err(format!("exec helper exited with {st}: {}", msg.trim())));
            }
        }
    } else {
        mine
    };
    Ok(ExecSession {
        io,
        tty: opts.tty.is_some(),
        child,
        status: None,
    })
}
