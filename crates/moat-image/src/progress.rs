//! Progress reporting for long builds and pulls. The store calls a [`Progress`]; the CLI renders it.

use std::io::Write;

/// Receives progress of a build, import or pull.
pub trait Progress: Send + Sync {
    /// A new step begins ("pulling layer 2/5", "running mmdebstrap").
    fn step(&self, message: &str);
    /// One output line of a tool the store runs (mmdebstrap), passed through.
    fn output(&self, _line: &str) {}
    /// Bytes processed so far for `label` (a layer digest, a file), with the total when known.
    fn bytes(&self, _label: &str, _done: u64, _total: Option<u64>) {}
}

/// Ignores all progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn step(&self, _message: &str) {}
}

/// Writes progress as plain lines to stderr (no colours, no cursor movement).
#[derive(Clone, Copy, Debug, Default)]
pub struct StderrProgress;

impl Progress for StderrProgress {
    fn step(&self, message: &str) {
        let _ = writeln!(std::io::stderr(), "==> {message}");
    }
    fn output(&self, line: &str) {
        let _ = writeln!(std::io::stderr(), "    {line}");
    }
    fn bytes(&self, label: &str, done: u64, total: Option<u64>) {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let _ = match total {
            Some(t) => writeln!(
                std::io::stderr(),
                "    {label}: {:.1}/{:.1} MiB",
                mib(done),
                mib(t)
            ),
            None => writeln!(std::io::stderr(), "    {label}: {:.1} MiB", mib(done)),
        };
    }
}
