//! Host side of the microVM guest channel: a virtio-serial port named
//! `moat.ctl`, backed on the host by a Unix socket QEMU listens on
//! (`<run dir>/ctl.sock`). One JSON request a line, one JSON reply a line;
//! moat-init serves it (see crates/moat-init).

use crate::QemuError;
use serde::Deserialize;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Deserialize)]
pub struct Reply {
    pub status: i32,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
}

/// Send one request and read its reply.
pub fn request(
    sock: &Path,
    req: &serde_json::Value,
    timeout: Duration,
) -> Result<Reply, QemuError> {
    let what = format!("guest channel {}", sock.display());
    let mut s = UnixStream::connect(sock).map_err(QemuError::io(format!(
        "{what}: connecting (is the microVM running?)"
    )))?;
    s.set_read_timeout(Some(timeout))
        .map_err(QemuError::io(what.clone()))?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(QemuError::io(what.clone()))?;
    let mut r = BufReader::new(s);
    let mut answer = String::new();
    r.read_line(&mut answer)
        .map_err(QemuError::io(format!("{what}: no answer from moat-init")))?;
    serde_json::from_str(answer.trim())
        .map_err(|e| QemuError::Failed(format!("{what}: bad answer {answer:?}: {e}")))
}

/// Run `argv` in the guest (chrooted in its root disk, with the workload's env).
pub fn exec(sock: &Path, argv: &[String], timeout: Duration) -> Result<Reply, QemuError> {
    request(
        sock,
        &serde_json::json!({"op": "exec", "argv": argv}),
        timeout,
    )
}

/// Ask moat-init to send SIGTERM to the workload (the VM powers off when it ends).
pub fn stop(sock: &Path) -> Result<(), QemuError> {
    request(
        sock,
        &serde_json::json!({"op": "stop"}),
        Duration::from_secs(5),
    )
    .map(|_| ())
}
