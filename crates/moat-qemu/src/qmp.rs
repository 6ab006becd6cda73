//! A small QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! ```text
//! connect ─▶ read greeting {"QMP": ...} ─▶ qmp_capabilities ─▶ ready
//! execute(cmd, args) ─▶ {"execute": cmd, "arguments": args}
//!                    ◀─ events ({"event": ...}, skipped) … {"return": …} | {"error": …}
//! ```
//!
//! One request at a time, line-delimited JSON; asynchronous events that
//! arrive before the answer are kept in [`Qmp::events`] (shutdown waits for
//! `SHUTDOWN`). Used for graceful ACPI shutdown (`system_powerdown`), `quit`,
//! `screendump`, `query-status` and internal snapshots of running VMs.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error(
        "cannot connect to the QMP socket {path}: {source}; is the VM running? (`moat status`)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "QMP socket {path}: unexpected answer ({message}); the QEMU version may be unsupported"
    )]
    Protocol { path: PathBuf, message: String },
    #[error("QMP command '{command}' failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

pub type Result<T> = std::result::Result<T, QmpError>;

/// A negotiated QMP session.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received so far (names, in order).
    pub events: Vec<String>,
}

impl Qmp {
    /// Connects and negotiates capabilities. Every read waits at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.into(),
            source,
        })?;
        let io = |source| QmpError::Io {
            path: path.into(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut q = Qmp {
            path: path.into(),
            reader: BufReader::new(stream),
            writer,
            events: vec![],
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(q.protocol(format!("no greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn protocol(&self, message: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            message,
        }
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QEMU closed the connection",
                ),
            });
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(format!("{e}: {}", line.trim())))
    }

    /// Runs one command; its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut text = req.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let msg = self.read_message()?;
            if let Some(ev) = msg.get("event").and_then(Value::as_str) {
                self.events.push(ev.to_string());
                continue;
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: e["class"].as_str().unwrap_or("Error").into(),
                    desc: e["desc"].as_str().unwrap_or("").into(),
                });
            }
            return Err(self.protocol(format!("neither return nor error: {msg}")));
        }
    }

    /// `running`, `paused`, `shutdown`, `internal-error`, ...
    pub fn query_status(&mut self) -> Result<String> {
        let r = self.execute("query-status", None)?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.protocol(format!("query-status: {r}")))
    }

    /// Presses the ACPI power button (the guest decides to shut down).
    pub fn system_powerdown(&mut self) -> Result<()> {
        self.execute("system_powerdown", None).map(|_| ())
    }

    /// Ends QEMU at once (no guest shutdown).
    pub fn quit(&mut self) -> Result<()> {
        match self.execute("quit", None) {
            Ok(_) => Ok(()),
            // QEMU may close the socket before answering.
            Err(QmpError::Io { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Saves the primary display as a PNG file (written by the QEMU process:
    /// the folder must be writable by the user QEMU runs as).
    pub fn screendump_png(&mut self, file: &Path) -> Result<()> {
        self.execute(
            "screendump",
            Some(json!({ "filename": file.to_string_lossy(), "format": "png" })),
        )
        .map(|_| ())
    }

    /// A human monitor command; its text output.
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        let r = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }

    /// Internal snapshot of the running VM (disks + RAM + devices) named `tag`.
    /// HMP `savevm`: a single call, where QMP `snapshot-save` is a job.
    pub fn savevm(&mut self, tag: &str) -> Result<()> {
        self.hmp_checked("savevm", tag)
    }

    /// Back to an internal snapshot while running.
    pub fn loadvm(&mut self, tag: &str) -> Result<()> {
        self.hmp_checked("loadvm", tag)
    }

    pub fn delvm(&mut self, tag: &str) -> Result<()> {
        self.hmp_checked("delvm", tag)
    }

    fn hmp_checked(&mut self, cmd: &str, tag: &str) -> Result<()> {
        if tag.is_empty() || tag.chars().any(|c| c.is_whitespace() || c == '"') {
            return Err(QmpError::Command {
                command: cmd.into(),
                class: "InvalidParameter".into(),
                desc: format!("snapshot name '{tag}' must be one word"),
            });
        }
        let out = self.hmp(&format!("{cmd} {tag}"))?;
        // HMP reports failures as text, not as a QMP error.
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(QmpError::Command {
                command: cmd.into(),
                class: "GenericError".into(),
                desc: out.trim().to_string(),
            })
        }
    }

    /// Waits until QEMU sends `SHUTDOWN` or closes the socket, at most `timeout`.
    pub fn wait_shutdown(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if self.events.iter().any(|e| e == "SHUTDOWN") {
            return true;
        }
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self
                .reader
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(10))));
            match self.read_message() {
                Ok(m) => {
                    if m.get("event").and_then(Value::as_str) == Some("SHUTDOWN") {
                        return true;
                    }
                }
                Err(QmpError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    return true
                }
                Err(_) => {}
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greeting, then canned answers per command.
    fn fake(
        dir: &Path,
        answers: Vec<&'static str>,
    ) -> (PathBuf, std::thread::JoinHandle<Vec<Value>>) {
        let path = dir.join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut seen = vec![];
            for a in answers {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(serde_json::from_str(&line).unwrap());
                w.write_all(a.as_bytes()).unwrap();
            }
            seen
        });
        (path, h)
    }

    #[test]
    fn negotiates_skips_events_and_reports_errors() {
        let d = tempfile::tempdir().unwrap();
        let (p, h) = fake(
            d.path(),
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"RESUME\"}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
                "{\"return\": \"Error: no block device can store vmstate\\r\\n\"}\n",
            ],
        );
        let mut q = Qmp::connect(&p, Duration::from_secs(5)).unwrap();
        assert_eq!(q.query_status().unwrap(), "running");
        assert_eq!(q.events, vec!["RESUME"]);
        let e = q.screendump_png(Path::new("/x/s.png")).unwrap_err();
        assert!(e.to_string().contains("screendump") && e.to_string().contains("nope"));
        assert!(q.savevm("s1").unwrap_err().to_string().contains("vmstate"));
        assert!(q.savevm("two words").is_err());
        let seen = h.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[2]["arguments"]["format"], "png");
        assert_eq!(seen[3]["arguments"]["command-line"], "savevm s1");
    }
}
