//! Interactive exec for nspawn machines ([`crate::Driver::exec_session`]):
//! `nsenter` into the machine (see `NspawnDriver::exec_command`) with its
//! stdio on a host pty (`tty`) or on one end of a socket pair; the caller
//! gets the other side as one bidirectional fd.

use crate::SessionProcess;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

#[derive(Debug)]
pub struct NsenterSession {
    pid: i32,
    /// Our side: the pty master or our socket end (a dup of the caller's).
    io: OwnedFd,
    tty: bool,
}

fn last() -> io::Error {
    io::Error::last_os_error()
}

/// Spawns `cmd` on a pty of `size` (rows, cols) or a socket pair.
pub fn spawn(
    mut cmd: Command,
    tty: Option<(u16, u16)>,
) -> io::Result<(OwnedFd, Box<dyn SessionProcess>)> {
    let (ours, theirs) = match tty {
        Some((rows, cols)) => {
            let (mut m, mut s) = (-1, -1);
            let ws = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: openpty writes two fds into m and s; ws is a valid winsize.
            if unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) }
                < 0
            {
                return Err(last());
            }
            // SAFETY: both fds were just returned by openpty and are owned here.
            unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
        }
        None => {
            let mut fds = [-1; 2];
            // SAFETY: socketpair fills fds with two new fds on success.
            if unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            } < 0
            {
                return Err(last());
            }
            // SAFETY: both fds were just created and are owned here.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        }
    };
    cmd.stdin(Stdio::from(theirs.try_clone()?))
        .stdout(Stdio::from(theirs.try_clone()?))
        .stderr(Stdio::from(theirs));
    if tty.is_some() {
        // SAFETY: setsid and ioctl are async-signal-safe; stdin is the slave.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(last());
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn()?;
    let caller = ours.try_clone()?;
    Ok((
        caller,
        Box::new(NsenterSession {
            pid: child.id() as i32,
            io: ours,
            tty: tty.is_some(),
        }),
    ))
}

impl SessionProcess for NsenterSession {
    fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        if !self.tty {
            return Ok(());
        }
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
        if unsafe { libc::ioctl(self.io.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(last());
        }
        Ok(())
    }

    fn close_stdin(&self) -> io::Result<()> {
        if self.tty {
            // ^D at the start of a line: end of input for the line discipline.
            // SAFETY: writes one byte from a valid buffer.
            if unsafe { libc::write(self.io.as_raw_fd(), b"\x04".as_ptr().cast(), 1) } < 0 {
                return Err(last());
            }
        // SAFETY: shutdown on a socket we own.
        } else if unsafe { libc::shutdown(self.io.as_raw_fd(), libc::SHUT_WR) } < 0 {
            return Err(last());
        }
        Ok(())
    }

    fn signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: kill(2) to our own child.
        if unsafe { libc::kill(self.pid, sig) } < 0 {
            return Err(last());
        }
        Ok(())
    }

    fn wait(&mut self) -> io::Result<i32> {
        let mut st = 0;
        loop {
            // SAFETY: waits for our own child; st is a valid int.
            let r = unsafe { libc::waitpid(self.pid, &mut st, 0) };
            if r == self.pid {
                break;
            }
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return Err(last());
            }
        }
        Ok(if libc::WIFEXITED(st) {
            libc::WEXITSTATUS(st)
        } else {
            128 + libc::WTERMSIG(st)
        })
    }
}
