//! Running host commands (`ip`, `nft`, `dnsmasq`, ...) behind one small trait.
//!
//! Code that acts on the host builds a [`Cmd`] and hands it to an
//! [`Executor`]. [`HostExecutor`] runs it for real: it logs the argv at debug
//! level, captures stdout/stderr, and turns a non-zero exit into
//! [`HostError::Failed`] naming the argv and stderr. [`RecordingExecutor`] is
//! the fake for unit tests: it records every command and answers from a script
//! of canned outputs, so callers can be tested without root.

use std::collections::VecDeque;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// One command to run: program, arguments, optional stdin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    /// Bytes written to the command's stdin (closed afterwards); `None` = no stdin.
    pub stdin: Option<Vec<u8>>,
    /// A non-zero exit is returned as an [`Output`] instead of an error.
    pub allow_failure: bool,
}

impl Cmd {
    pub fn new(program: impl Into<String>) -> Cmd {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            stdin: None,
            allow_failure: false,
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Cmd {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(data.into());
        self
    }

    /// Accept a non-zero exit (the caller inspects [`Output::status`]).
    pub fn allow_failure(mut self) -> Cmd {
        self.allow_failure = true;
        self
    }

    /// The whole command line, program first.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }

    /// Human-readable command line for logs and errors.
    pub fn display(&self) -> String {
        self.argv().join(" ")
    }
}

/// What a command printed and how it exited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit code; `-1` when killed by a signal.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(stdout: impl Into<String>) -> Output {
        Output {
            status: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Errors from running host commands.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The program could not be started at all.
    #[error("cannot run `{argv}`: {source}; check that `{program}` is installed and in PATH")]
    Spawn {
        program: String,
        argv: String,
        #[source]
        source: std::io::Error,
    },
    /// The program ran and exited non-zero.
    #[error("`{argv}` failed with exit status {status}: {stderr}")]
    Failed {
        argv: String,
        status: i32,
        stderr: String,
    },
}

/// Runs host commands. Implementations must be usable from several threads.
pub trait Executor: Send + Sync {
    fn run(&self, cmd: &Cmd) -> Result<Output, HostError>;
}

impl<E: Executor + ?Sized> Executor for &E {
    fn run(&self, cmd: &Cmd) -> Result<Output, HostError> {
        (**self).run(cmd)
    }
}

/// The real executor: runs the program, waits for it, captures its output.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostExecutor;

impl Executor for HostExecutor {
    fn run(&self, cmd: &Cmd) -> Result<Output, HostError> {
        tracing::debug!(argv = ?cmd.argv(), "run");
        if let Some(output) = sysctl_in_process(cmd) {
            return finish(cmd, output);
        }
        if let Some(output) = nft_elements_in_process(cmd) {
            return finish(cmd, output);
        }
        if let Some(output) = crate::rtnl::run(cmd) {
            return finish(cmd, output);
        }
        let spawn_err = |source| HostError::Spawn {
            program: cmd.program.clone(),
            argv: cmd.display(),
            source,
        };
        // Messages in English whatever the host's locale: callers match
        // some of them ("File exists", "Cannot find device").
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            .env("LC_ALL", "C")
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let (Some(data), Some(mut pipe)) = (&cmd.stdin, child.stdin.take()) {
            // A command that exits without reading all of stdin gives EPIPE;
            // its exit status tells what went wrong, so the write error is not.
            let _ = pipe.write_all(data);
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        let output = Output {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        finish(cmd, output)
    }
}

fn finish(cmd: &Cmd, output: Output) -> Result<Output, HostError> {
    if !output.success() && !cmd.allow_failure {
        tracing::debug!(argv = ?cmd.argv(), status = output.status, stderr = %output.stderr.trim(), "failed");
        return Err(HostError::Failed {
            argv: cmd.display(),
            status: output.status,
            stderr: output.stderr.trim().to_string(),
        });
    }
    Ok(output)
}

/// `sysctl -n KEY` and `sysctl -q -w KEY=VALUE` done the way procps does
/// them (the key's dots become slashes under /proc/sys), without starting a
/// process: a `run --domain` or an apply makes several per machine, and each
/// fork+exec of sysctl costs milliseconds. Other forms run the real program.
fn sysctl_in_process(cmd: &Cmd) -> Option<Output> {
    if cmd.program != "sysctl" || cmd.stdin.is_some() {
        return None;
    }
    let args: Vec<&str> = cmd.args.iter().map(String::as_str).collect();
    let (key, value) = match args.as_slice() {
        ["-n", key] => (*key, None),
        ["-q", "-w", kv] => {
            let (k, v) = kv.split_once('=')?;
            (k, Some(v))
        }
        _ => return None,
    };
    if key.is_empty() || key.contains(['/', ' ']) || key.starts_with('.') {
        return None;
    }
    let path = std::path::PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let failed = |verb: &str, e: std::io::Error| Output {
        status: 255,
        stdout: String::new(),
        stderr: format!("sysctl: cannot {verb} {}: {e}\n", path.display()),
    };
    Some(match value {
        None => match std::fs::read_to_string(&path) {
            Ok(v) => Output::ok(v),
            Err(e) => failed("read", e),
        },
        Some(v) => match std::fs::write(&path, v) {
            Ok(()) => Output::ok(""),
            Err(e) => failed("set", e),
        },
    })
}

/// `nft -f -` of a script that only adds and deletes set elements, over
/// netlink in this process (see [`crate::nfnl`]): the same transaction,
/// without waiting for the kernel's clean-up when the socket closes.
fn nft_elements_in_process(cmd: &Cmd) -> Option<Output> {
    if cmd.program != "nft" || cmd.args != ["-f", "-"] {
        return None;
    }
    let script = std::str::from_utf8(cmd.stdin.as_deref()?).ok()?;
    Some(match crate::nfnl::run_script(script)? {
        Ok(()) => Output::ok(""),
        Err(e) => Output {
            status: 1,
            stdout: String::new(),
            stderr: format!("Error: Could not process rule: {e}\n"),
        },
    })
}

/// Fake executor for unit tests: records every command and answers with
/// scripted outputs (in order), or success with empty output when the script
/// is exhausted. A scripted non-zero status becomes [`HostError::Failed`]
/// unless the command allows failure, as with the real executor.
#[derive(Debug, Default)]
pub struct RecordingExecutor {
    calls: Mutex<Vec<Cmd>>,
    replies: Mutex<VecDeque<(Option<String>, Output)>>,
}

impl RecordingExecutor {
    pub fn new() -> RecordingExecutor {
        RecordingExecutor::default()
    }

    /// Queue a reply for the next command.
    pub fn push_reply(&self, out: Output) {
        self.lock_replies().push_back((None, out));
    }

    /// Queue a reply for the next command whose display string contains `pattern`;
    /// commands that don't match get empty success until it is consumed.
    pub fn push_reply_for(&self, pattern: &str, out: Output) {
        self.lock_replies()
            .push_back((Some(pattern.to_string()), out));
    }

    /// Every command run so far, in order.
    pub fn calls(&self) -> Vec<Cmd> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Every command run so far, as display strings.
    pub fn lines(&self) -> Vec<String> {
        self.calls().iter().map(Cmd::display).collect()
    }

    fn lock_replies(&self) -> std::sync::MutexGuard<'_, VecDeque<(Option<String>, Output)>> {
        // A panic while holding the lock only happens inside a failing test.
        self.replies.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Executor for RecordingExecutor {
    fn run(&self, cmd: &Cmd) -> Result<Output, HostError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cmd.clone());
        let mut replies = self.lock_replies();
        let out = match replies.front() {
            Some((None, _)) => replies.pop_front().map(|r| r.1).unwrap_or_default(),
            Some((Some(p), _)) if cmd.display().contains(p.as_str()) => {
                replies.pop_front().map(|r| r.1).unwrap_or_default()
            }
            _ => Output::default(),
        };
        if !out.success() && !cmd.allow_failure {
            return Err(HostError::Failed {
                argv: cmd.display(),
                status: out.status,
                stderr: out.stderr.trim().to_string(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_executor_captures_output() {
        let out = HostExecutor
            .run(&Cmd::new("sh").args(["-c", "echo hi; echo err >&2"]))
            .unwrap();
        assert_eq!(out.stdout, "hi\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[test]
    fn real_executor_feeds_stdin() {
        let out = HostExecutor.run(&Cmd::new("cat").stdin("abc")).unwrap();
        assert_eq!(out.stdout, "abc");
    }

    #[test]
    fn nonzero_exit_names_argv_and_stderr() {
        let err = HostExecutor
            .run(&Cmd::new("sh").args(["-c", "echo boom >&2; exit 3"]))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c echo boom >&2; exit 3"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
        assert!(msg.contains('3'), "{msg}");
        let out = HostExecutor
            .run(&Cmd::new("sh").args(["-c", "exit 4"]).allow_failure())
            .unwrap();
        assert_eq!(out.status, 4);
    }

    #[test]
    fn simple_sysctl_reads_and_writes_run_in_process() {
        let out = HostExecutor
            .run(&Cmd::new("sysctl").args(["-n", "kernel.ostype"]))
            .unwrap();
        assert_eq!(out.stdout.trim(), "Linux");
        let err = HostExecutor
            .run(&Cmd::new("sysctl").args(["-n", "kernel.moat-no-such-key"]))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sysctl -n kernel.moat-no-such-key"), "{msg}");
        assert!(msg.contains("/proc/sys/kernel/moat-no-such-key"), "{msg}");
        let out = HostExecutor
            .run(
                &Cmd::new("sysctl")
                    .args(["-q", "-w", "kernel.moat-no-such-key=1"])
                    .allow_failure(),
            )
            .unwrap();
        assert!(!out.success());
        assert!(sysctl_in_process(&Cmd::new("sysctl").args(["-a"])).is_none());
        assert!(sysctl_in_process(&Cmd::new("sysctl").args(["-n", "../etc"])).is_none());
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = HostExecutor
            .run(&Cmd::new("/nonexistent/moat-prog"))
            .unwrap_err();
        assert!(matches!(err, HostError::Spawn { .. }));
        assert!(err.to_string().contains("installed"));
    }

    #[test]
    fn recording_executor_records_and_replies() {
        let ex = RecordingExecutor::new();
        ex.push_reply_for("show", Output::ok("listed"));
        assert_eq!(ex.run(&Cmd::new("ip").arg("add")).unwrap().stdout, "");
        assert_eq!(
            ex.run(&Cmd::new("ip").arg("show")).unwrap().stdout,
            "listed"
        );
        ex.push_reply(Output {
            status: 1,
            stdout: String::new(),
            stderr: "no".into(),
        });
        assert!(ex.run(&Cmd::new("false")).is_err());
        assert_eq!(ex.lines(), vec!["ip add", "ip show", "false"]);
    }
}
