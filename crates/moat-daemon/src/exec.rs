//! Streaming exec over an upgraded connection (`Upgrade: moat-exec`).
//!
//! After `101 Switching Protocols` both directions carry frames:
//! `[channel: u8][length: u32 big-endian][data]`. Channels: 0 stdin
//! (client → daemon; an empty frame closes stdin), 1 stdout, 2 stderr,
//! 3 exit status (4 bytes, i32 big-endian; the last frame), 4 error text.
//!
//! Today the command runs to completion and its output is sent then
//! (the engine's non-interactive exec); stdin frames are read and ignored.

use crate::server::{Daemon, Failure};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const EXIT: u8 = 3;
pub const ERROR: u8 = 4;

pub fn write_frame(w: &mut impl Write, channel: u8, data: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(5 + data.len());
    buf.push(channel);
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf)
}

/// One frame, or `None` at end of stream.
pub fn read_frame(r: &mut impl std::io::Read) -> std::io::Result<Option<(u8, Vec<u8>)>> {
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
    conn: &mut UnixStream,
    _reader: BufReader<UnixStream>,
) -> Result<(), Failure> {
    let eng = moat_engine::Engine::open(daemon.cfg.engine_config())?;
    // Fail before upgrading when the machine does not exist: a plain 404.
    let out = eng.exec(machine, command)?;
    let head =
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: moat-exec\r\n\r\n";
    conn.write_all(head.as_bytes())
        .map_err(|_| Failure::gone())?;
    let _ = write_frame(conn, STDOUT, &out.stdout);
    let _ = write_frame(conn, STDERR, &out.stderr);
    let _ = write_frame(conn, EXIT, &out.status.to_be_bytes());
    Ok(())
}
