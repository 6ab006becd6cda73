//! Interactive exec over an upgraded connection (`Upgrade: moat-exec`),
//! backed by the engine's exec sessions (a pty, or plain streams).
//!
//! After `101 Switching Protocols` both directions carry frames:
//! `[channel: u8][length: u32 big-endian][data]`.
//!
//! ```text
//! client → daemon   0 stdin (an empty frame closes stdin)
//!                   5 resize (rows u16 BE, cols u16 BE; tty only)
//!                   6 signal (i32 BE)
//! daemon → client   1 output (stdout and stderr merged, as a terminal shows them)
//!                   3 exit status (i32 BE; the last frame)
//!                   4 error text (the session could not run)
//! ```
//!
//! Two threads per session: this one copies the process's output to the
//! client and finally sends the exit status; a second one applies the
//! client's frames (input, resize, signals) to the session.

use crate::server::{Daemon, Failure};
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

pub const STDIN: u8 = 0;
pub const OUTPUT: u8 = 1;
pub const EXIT: u8 = 3;
pub const ERROR: u8 = 4;
pub const RESIZE: u8 = 5;
pub const SIGNAL: u8 = 6;

pub fn write_frame(w: &mut impl Write, channel: u8, data: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(5 + data.len());
    buf.push(channel);
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf)
}

/// One frame, or `None` at end of stream.
pub fn read_frame(r: &mut impl Read) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > 16 << 20 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame larger than 16 MiB",
        ));
    }
    let mut data = vec![0; len];
    r.read_exact(&mut data)?;
    Ok(Some((head[0], data)))
}

pub(crate) fn stream(
    daemon: &Arc<Daemon>,
    machine: &str,
    command: &[String],
    tty: Option<(u16, u16)>,
    conn: &mut UnixStream,
    mut reader: BufReader<UnixStream>,
) -> Result<(), Failure> {
    let eng = moat_engine::Engine::open(daemon.cfg.engine_config())?;
    // Errors before the upgrade are plain HTTP errors (404 for a missing machine).
    let session = eng.exec_session(machine, command, tty.is_some(), tty)?;
    let head =
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: moat-exec\r\n\r\n";
    conn.write_all(head.as_bytes())
        .map_err(|_| Failure::gone())?;
    let mut out = std::fs::File::from(session.io.try_clone().map_err(|_| Failure::gone())?);
    let mut input = std::fs::File::from(session.io.try_clone().map_err(|_| Failure::gone())?);
    let session = Arc::new(Mutex::new(session));

    // Client frames → the session. Ends at the client's EOF (not an error:
    // `echo x | client` closes its side early) or when the process is gone.
    let s2 = session.clone();
    let _ = std::thread::Builder::new()
        .name("moat-exec-in".into())
        .stack_size(128 << 10)
        .spawn(move || loop {
            let frame = match read_frame(&mut reader) {
                Ok(Some(f)) => f,
                _ => {
                    let _ = lock(&s2).close_stdin();
                    return;
                }
            };
            match frame {
                (STDIN, d) if d.is_empty() => {
                    let _ = lock(&s2).close_stdin();
                }
                (STDIN, d) if input.write_all(&d).is_err() => return,
                (RESIZE, d) if d.len() == 4 => {
                    let rows = u16::from_be_bytes([d[0], d[1]]);
                    let cols = u16::from_be_bytes([d[2], d[3]]);
                    let _ = lock(&s2).resize(rows, cols);
                }
                (SIGNAL, d) if d.len() == 4 => {
                    let _ = lock(&s2).signal(i32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                }
                _ => {}
            }
        });

    // The process's output → the client; EOF (or EIO on a pty) when it ends.
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if write_frame(conn, OUTPUT, &buf[..n]).is_err() {
                    // The client left: end the process as a hang-up would.
                    let _ = lock(&session).signal(libc::SIGHUP);
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let status = lock(&session).wait();
    match status {
        Ok(code) => {
            let _ = write_frame(conn, EXIT, &code.to_be_bytes());
        }
        Err(e) => {
            let _ = write_frame(conn, ERROR, e.to_string().as_bytes());
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
