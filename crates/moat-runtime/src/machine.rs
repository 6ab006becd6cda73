//! The lifecycle API: one machine = one folder holding its supervisor's
//! config, status, socket and logs. Callers launch a supervisor, talk to it
//! over its socket, and read its status file; the state they get back is
//! re-derived from the status file plus a liveness check of the supervisor
//! (PID and start time), so a supervisor killed with SIGKILL shows up as
//! crashed instead of running.
//!
//! ```text
//! <dir>/supervisor.json   what to run (SupervisorConfig), written by launch()
//! <dir>/status.json       written by the supervisor (atomic rename)
//! <dir>/supervisor.sock   requests: start | stop <ms> | kill <sig>
//! <dir>/supervisor.lock   flock held by the one supervisor of the machine
//! <dir>/supervisor.log    the supervisor's own messages
//! <dir>/logs/{stdout,stderr}.log[.N]
//! <dir>/bundle/config.json, <dir>/state/<name>/ (libcontainer)
//! ```

use crate::container::{self, ExecResult};
use crate::spec::ContainerSpec;
use crate::sys;
use crate::RuntimeError;
pub use moat_core::model::RestartPolicy;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What the supervisor runs and how it treats the container's end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorConfig {
    pub container: ContainerSpec,
    pub restart: RestartPolicy,
    /// Give up after this many restarts (`None` = never).
    pub max_restarts: Option<u32>,
    /// Create the container, then wait for a `start` request (lets the caller
    /// attach a NIC to `/proc/<pid>/ns/net` first).
    pub wait_for_start: bool,
    /// Grace period between the stop signal and SIGKILL.
    pub stop_timeout_ms: u64,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    /// Supervise this host command instead of a libcontainer container
    /// (the nspawn driver runs systemd-nspawn this way). `container` then
    /// only names the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<HostProcess>,
}

/// A host command run and watched by the supervisor, in place of a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProcess {
    pub argv: Vec<String>,
    /// `cgroup.procs` files the process writes itself into before exec, so
    /// that the machine's limits hold for it and everything it starts.
    pub cgroup_procs: Vec<PathBuf>,
    /// Network namespace file the process enters before exec.
    pub netns: Option<PathBuf>,
    /// Sent on a stop request; SIGKILL follows after the stop timeout.
    pub stop_signal: i32,
}

impl SupervisorConfig {
    pub fn new(container: ContainerSpec) -> Self {
        SupervisorConfig {
            container,
            restart: RestartPolicy::No,
            max_restarts: None,
            wait_for_start: false,
            stop_timeout_ms: 10_000,
            log_max_bytes: crate::logs::DEFAULT_MAX_BYTES,
            log_keep: crate::logs::DEFAULT_KEEP,
            process: None,
        }
    }
}

/// Where the supervisor is in the container's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Starting,
    /// Namespaces exist, init waits for `start`.
    Created,
    Running,
    /// Waiting for the backoff delay before the next restart.
    Restarting,
    Stopping,
    /// Stopped on request; the supervisor exits (see [`Phase::is_final`]).
    Stopped,
    /// PID 1 ended on its own and is not restarted; the supervisor exits.
    Exited,
    /// The container could not be created or started; the supervisor exits.
    Failed,
}

impl Phase {
    /// The end of the machine's run. Its supervisor saves it as soon as PID 1
    /// has ended (every process of the container is gone then: the kernel
    /// ends a PID namespace's init only after the rest), before it removes
    /// the container's cgroups and state, so that the launcher can tear down
    /// the root file system meanwhile. It may then still be alive for a
    /// moment: whoever reuses or removes the machine folder waits for it to
    /// be gone ([`launch`], [`stop`]).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Stopped | Phase::Exited | Phase::Failed)
    }
}

/// The status file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub phase: Phase,
    pub supervisor_pid: i32,
    /// Start time of the supervisor (clock ticks since boot), against PID reuse.
    pub supervisor_start: u64,
    /// Host PID of the container's init, while it exists.
    pub pid: Option<i32>,
    /// Unix time (seconds) of the last start.
    pub started_at: Option<u64>,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    pub restarts: u32,
    pub message: Option<String>,
    /// How the root's ownership was made for the user namespace at the last create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_ownership: Option<crate::RootfsOwnership>,
}

/// What a caller sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachineState {
    /// Never launched, or its folder holds no status.
    Absent,
    Created {
        pid: i32,
    },
    Running {
        pid: i32,
    },
    /// The supervisor is alive and about to restart the container.
    Restarting {
        restarts: u32,
    },
    Stopped {
        exit_code: Option<i32>,
        exit_signal: Option<i32>,
    },
    /// PID 1 ended badly, the container failed to start, or the supervisor died.
    Crashed {
        reason: String,
    },
}

/// A machine folder.
#[derive(Clone, Debug)]
pub struct MachineDir {
    pub dir: PathBuf,
}

impl MachineDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        MachineDir { dir: dir.into() }
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("supervisor.json")
    }
    pub fn status_path(&self) -> PathBuf {
        self.dir.join("status.json")
    }
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("supervisor.sock")
    }
    /// Held (`flock`) by the machine's supervisor for its whole life: a
    /// second one for the same folder exits at once ([`SUPERVISOR_BUSY`]).
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("supervisor.lock")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }
    pub fn stdout_log(&self) -> PathBuf {
        self.logs_dir().join("stdout.log")
    }
    pub fn stderr_log(&self) -> PathBuf {
        self.logs_dir().join("stderr.log")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.dir.join("supervisor.log")
    }
    pub fn bundle_dir(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    pub fn state_root(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn container_paths(&self) -> container::Paths {
        container::Paths {
            state_root: self.state_root(),
            bundle: self.bundle_dir(),
        }
    }

    /// How the root's ownership was made at the machine's last create
    /// (`None` before the first one): `<bundle>/rootfs.json`.
    pub fn rootfs_record(&self) -> Option<crate::RootfsRecord> {
        crate::rootfs::read_record(&self.bundle_dir())
    }

    pub fn rootfs_ownership(&self) -> Option<crate::RootfsOwnership> {
        self.rootfs_record().map(|r| r.ownership)
    }

    fn err(&self, message: impl Into<String>) -> RuntimeError {
        RuntimeError::Machine {
            dir: self.dir.clone(),
            message: message.into(),
        }
    }

    pub fn read_config(&self) -> Result<SupervisorConfig, RuntimeError> {
        let p = self.config_path();
        let text = fs::read(&p).map_err(|e| RuntimeError::io(&p, e))?;
        serde_json::from_slice(&text).map_err(|e| self.err(format!("bad {}: {e}", p.display())))
    }

    pub fn read_status(&self) -> Option<Status> {
        let text = fs::read(self.status_path()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Is the supervisor recorded in the status file still alive?
    pub fn supervisor_alive(&self) -> bool {
        self.read_status()
            .map(|s| sys::alive(s.supervisor_pid, s.supervisor_start))
            .unwrap_or(false)
    }

    /// PID 1 has ended and the supervisor, still alive, is removing the
    /// container (see [`Phase::is_final`]): nothing of the machine runs on
    /// its root file system any more.
    pub fn ending(&self) -> bool {
        self.read_status()
            .is_some_and(|s| s.phase.is_final() && sys::alive(s.supervisor_pid, s.supervisor_start))
    }

    /// The machine's state, re-derived from its status file and the host.
    pub fn state(&self) -> MachineState {
        let Some(s) = self.read_status() else {
            return MachineState::Absent;
        };
        let alive = sys::alive(s.supervisor_pid, s.supervisor_start);
        match s.phase {
            Phase::Starting
            | Phase::Created
            | Phase::Running
            | Phase::Restarting
            | Phase::Stopping
                if !alive =>
            {
                MachineState::Crashed {
                    reason: format!(
                        "supervisor died (pid {}); the next apply repairs it",
                        s.supervisor_pid
                    ),
                }
            }
            Phase::Starting | Phase::Restarting => MachineState::Restarting {
                restarts: s.restarts,
            },
            Phase::Created => MachineState::Created {
                pid: s.pid.unwrap_or(0),
            },
            Phase::Running | Phase::Stopping => MachineState::Running {
                pid: s.pid.unwrap_or(0),
            },
            Phase::Stopped => MachineState::Stopped {
                exit_code: s.exit_code,
                exit_signal: s.exit_signal,
            },
            Phase::Exited => match (s.exit_code, s.exit_signal) {
                (Some(0), None) => MachineState::Stopped {
                    exit_code: Some(0),
                    exit_signal: None,
                },
                (code, sig) => MachineState::Crashed {
                    reason: match sig {
                        Some(sig) => format!("PID 1 was killed by signal {sig}"),
                        None => format!("PID 1 exited with status {}", code.unwrap_or(-1)),
                    },
                },
            },
            Phase::Failed => MachineState::Crashed {
                reason: s
                    .message
                    .unwrap_or_else(|| "the container failed to start".into()),
            },
        }
    }

    /// Saves the supervisor config that the next launch reads.
    pub fn write_config(&self, config: &SupervisorConfig) -> Result<(), RuntimeError> {
        let text = serde_json::to_vec_pretty(config)
            .map_err(|e| self.err(format!("cannot encode the supervisor config: {e}")))?;
        let cfg = self.config_path();
        // Written beside and renamed: a caller killed mid-write (kill -9 of
        // `moat apply`) must not leave a truncated config that no later start
        // can read.
        let tmp = self.dir.join("supervisor.json.tmp");
        fs::write(&tmp, text).map_err(|e| RuntimeError::io(&tmp, e))?;
        fs::rename(&tmp, &cfg).map_err(|e| RuntimeError::io(&cfg, e))
    }

    /// Sends one request line to the supervisor and returns its answer.
    fn request(&self, line: &str) -> Result<String, RuntimeError> {
        let sock = self.socket_path();
        let mut s = UnixStream::connect(&sock).map_err(|e| RuntimeError::io(&sock, e))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| RuntimeError::io(&sock, e))?;
        s.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| RuntimeError::io(&sock, e))?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .map_err(|e| RuntimeError::io(&sock, e))?;
        let answer = answer.trim().to_string();
        match answer.strip_prefix("err ") {
            Some(msg) => Err(self.err(format!("supervisor refused '{line}': {msg}"))),
            None => Ok(answer),
        }
    }
}

/// Finds the `moat-supervisor` binary: `$MOAT_SUPERVISOR`, next to the
/// current executable (or its parent, for test binaries in `deps/`), then PATH.
pub fn find_supervisor() -> Result<PathBuf, RuntimeError> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("MOAT_SUPERVISOR") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join("moat-supervisor");
            if p.is_file() {
                return Ok(p);
            }
            tried.push(p.display().to_string());
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("moat-supervisor");
            if p.is_file() {
                return Ok(p);
            }
        }
        tried.push("PATH".into());
    }
    Err(RuntimeError::NoSupervisor {
        tried: tried.join(", "),
    })
}

/// Starts a detached supervisor for the machine in `dir` and waits until the
/// container is created (and, unless `wait_for_start`, started).
/// Returns the state then: `Created`/`Running` with init's host PID.
pub fn launch(
    dir: &MachineDir,
    config: &SupervisorConfig,
    supervisor: &Path,
) -> Result<MachineState, RuntimeError> {
    config.container.validate()?;
    if let Some(s) = dir.read_status() {
        if !wait_finished(dir, &s)? && sys::alive(s.supervisor_pid, s.supervisor_start) {
            return Err(dir.err("a supervisor is already running for this machine; stop it first"));
        }
    }
    fs::create_dir_all(&dir.dir).map_err(|e| RuntimeError::io(&dir.dir, e))?;
    dir.write_config(config)?;
    let _ = fs::remove_file(dir.status_path());

    // The supervisor forks and its first process exits at once: waiting for
    // it leaves no zombie, and the real supervisor is re-parented to init.
    // It has the write end of a pipe and writes a byte at each status
    // change: this process wakes then, instead of polling the status file.
    let (st, notify_r) = match take_warm(supervisor).map(|w| w.go(dir)) {
        Some(Ok(r)) => r,
        // Not delivered (none waiting, or it died): start one here.
        None | Some(Err(_)) => {
            let (notify_r, notify_w) = sys::pipe().map_err(|e| RuntimeError::io(&dir.dir, e))?;
            let mut cmd = supervisor_command(supervisor, &notify_w, None);
            cmd.arg(&dir.dir);
            let st = cmd.status().map_err(|e| RuntimeError::io(supervisor, e))?;
            (Some(st), notify_r)
        }
    };
    // Non-blocking: two waiters (daemon threads) may both see it readable.
    sys::set_nonblock(&notify_r);
    remember_notify(dir, notify_r);
    // Another supervisor holds the machine: one started by a launch that
    // was killed after it removed the old status and before that supervisor
    // wrote its first one. That one runs the machine; wait for it as for ours.
    if let Some(st) = st.filter(|st| !st.success() && st.code() != Some(SUPERVISOR_BUSY)) {
        return Err(dir.err(format!(
            "{} {} exited with {st}; see {}",
            supervisor.display(),
            dir.dir.display(),
            dir.supervisor_log().display()
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = dir.read_status() {
            match s.phase {
                Phase::Created if config.wait_for_start => return Ok(dir.state()),
                Phase::Running | Phase::Exited | Phase::Failed | Phase::Stopped => {
                    return Ok(dir.state())
                }
                Phase::Restarting => return Ok(dir.state()),
                _ => {}
            }
            if !sys::alive(s.supervisor_pid, s.supervisor_start) {
                return Ok(dir.state());
            }
        }
        if Instant::now() > deadline {
            return Err(dir.err(format!(
                "the supervisor did not report the container as started within 30 s; see {}",
                dir.supervisor_log().display()
            )));
        }
        wait_change(dir, Duration::from_millis(50));
    }
}

/// `moat-supervisor` with the write end of the notify pipe (and, for a
/// warm one, the read end of its go pipe) open across exec, its fd numbers
/// in the environment.
fn supervisor_command(supervisor: &Path, notify_w: &OwnedFd, go_r: Option<&OwnedFd>) -> Command {
    let w = notify_w.as_raw_fd();
    let g = go_r.map(|g| g.as_raw_fd());
    let mut cmd = Command::new(supervisor);
    cmd.stdin(std::process::Stdio::null())
        .env(NOTIFY_FD_ENV, w.to_string());
    if let Some(g) = g {
        cmd.env(GO_FD_ENV, g.to_string());
    }
    // SAFETY: fcntl is async-signal-safe; the fds stay open until after spawn.
    unsafe {
        cmd.pre_exec(move || {
            for fd in std::iter::once(w).chain(g) {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// The environment variable that gives a warm supervisor its go fd.
pub(crate) const GO_FD_ENV: &str = "MOAT_SUPERVISOR_GO_FD";

/// The environment variable that gives a warm supervisor the CPU affinity
/// to take back once it runs (see [`prespawn`]), as a list: `0,1`.
pub(crate) const CPUS_ENV: &str = "MOAT_SUPERVISOR_CPUS";

/// A supervisor started ahead of its machine (see [`prespawn`]): it
/// execs, loads and sets itself up, then blocks reading its go pipe.
struct Warm {
    supervisor: PathBuf,
    child: sys::Spawned,
    /// Reaped (by [`Warm::go`]).
    reaped: bool,
    go: Option<OwnedFd>,
    notify_r: Option<OwnedFd>,
}

/// A warm supervisor that could not be handed its machine.
struct NotDelivered;

impl Warm {
    /// Hands the machine folder to the warm supervisor, then waits for its
    /// first process (which forks the real supervisor and exits, as in a
    /// plain launch): its exit status, `None` when it cannot be had (the
    /// machine is the supervisor's all the same: the caller must not start
    /// another). `Err` when it was not delivered (its exec failed, or it
    /// died meanwhile; dropping `self` reaps it): the caller starts one.
    fn go(
        mut self,
        dir: &MachineDir,
    ) -> Result<(Option<std::process::ExitStatus>, OwnedFd), NotDelivered> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::process::ExitStatusExt;
        self.child.exec_done().map_err(|_| NotDelivered)?;
        let mut f = fs::File::from(self.go.take().ok_or(NotDelivered)?);
        // A supervisor that died meanwhile: EPIPE (SIGPIPE is ignored here).
        f.write_all(dir.dir.as_os_str().as_bytes())
            .map_err(|_| NotDelivered)?;
        drop(f);
        let notify_r = self.notify_r.take().ok_or(NotDelivered)?;
        let st = loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid out pointer.
            let r = unsafe { libc::waitpid(self.child.pid, &mut status, 0) };
            if r == self.child.pid {
                break Some(std::process::ExitStatus::from_raw(status));
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break None;
            }
        };
        self.reaped = true;
        // Killed, not exited: the daemon half it forked ahead (see
        // `supervisor::fork_ahead`) may or may not have the machine. A
        // supervisor started the usual way then runs it, or finds it taken
        // (`SUPERVISOR_BUSY`) and the launch waits for the holder's status.
        if st.is_some_and(|s| s.signal().is_some()) {
            return Err(NotDelivered);
        }
        Ok((st, notify_r))
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        // Never handed a machine (its notify end is still ours): it has
        // nothing to run, so it is ended outright (no wait on it reaching
        // its read of the go pipe), then reaped.
        if self.notify_r.take().is_some() {
            let _ = sys::kill(self.child.pid, libc::SIGKILL);
        }
        if !self.reaped {
            let _ = sys::wait_pid(self.child.pid);
        }
    }
}

static WARM: std::sync::Mutex<Option<Warm>> = std::sync::Mutex::new(None);

/// Starts a supervisor ahead of [`launch`], so that its exec, loading and
/// set-up overlap the caller's own work (recording the machine, preparing
/// its root) instead of following it. The next `launch` of this process
/// with the same supervisor binary hands it the machine; one left unused
/// exits when this process closes the pipe (its exit, or the next
/// prespawn). Best effort: on any failure `launch` starts one as usual.
/// Returns the warm supervisor's PID; one of the same binary already
/// waiting is kept (and its PID returned).
///
/// This process does not wait for the supervisor's exec (see
/// [`sys::spawn_nowait`]); `launch` learns whether it worked.
pub fn prespawn(supervisor: &Path) -> Option<u32> {
    let mut slot = WARM.lock().ok()?;
    if let Some(w) = slot.as_ref() {
        if w.supervisor == supervisor {
            return Some(w.child.pid as u32);
        }
    }
    let spawn = || -> std::io::Result<Warm> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let (notify_r, notify_w) = sys::pipe()?;
        let (go_r, go_w) = sys::pipe()?;
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a NUL byte in an argument",
                )
            })
        };
        let prog = cstr(supervisor.as_os_str().as_bytes())?;
        let argv = vec![prog.clone(), cstr(b"--wait")?];
        // The supervisor starts on another CPU than this launcher's. Linux
        // puts a forked child on its parent's CPU, where it often preempts
        // the parent: the launcher, whose preparation of the machine is
        // what the warm supervisor then waits for, sat behind the
        // supervisor's exec and start-up (~1.1 ms, in 26 of 40 runs here)
        // while the other CPU idled. The child leaves this CPU before its
        // exec, and takes back the affinity given in CPUS_ENV once it runs.
        let mask = sys::affinity();
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            if [NOTIFY_FD_ENV, GO_FD_ENV, CPUS_ENV]
                .iter()
                .any(|n| k.as_bytes() == n.as_bytes())
            {
                continue;
            }
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            if let Ok(c) = CString::new(kv) {
                envp.push(c);
            }
        }
        envp.push(cstr(
            format!("{NOTIFY_FD_ENV}={}", notify_w.as_raw_fd()).as_bytes(),
        )?);
        envp.push(cstr(
            format!("{GO_FD_ENV}={}", go_r.as_raw_fd()).as_bytes(),
        )?);
        if let Some(m) = &mask {
            envp.push(cstr(format!("{CPUS_ENV}={}", sys::cpu_list(m)).as_bytes())?);
        }
        let child = sys::spawn_nowait(
            &prog,
            &argv,
            &envp,
            &[notify_w.as_raw_fd(), go_r.as_raw_fd()],
            mask.as_ref(),
        )?;
        Ok(Warm {
            supervisor: supervisor.to_path_buf(),
            child,
            reaped: false,
            go: Some(go_w),
            notify_r: Some(notify_r),
        })
    };
    let w = spawn().ok()?;
    let pid = w.child.pid as u32;
    let old = slot.replace(w);
    drop(slot);
    drop(old);
    Some(pid)
}

fn take_warm(supervisor: &Path) -> Option<Warm> {
    let w = WARM.lock().ok()?.take()?;
    (w.supervisor == supervisor).then_some(w)
}

/// Exit code of a supervisor that found another one holding its machine's
/// [`MachineDir::lock_path`]: it touched nothing of the machine.
pub const SUPERVISOR_BUSY: i32 = 75;

/// The environment variable that gives the supervisor its notify fd.
pub(crate) const NOTIFY_FD_ENV: &str = "MOAT_SUPERVISOR_NOTIFY_FD";

/// Read ends of the notify pipes of the supervisors this process launched,
/// by machine folder (see [`launch`], [`wait_change`]).
static NOTIFY: std::sync::Mutex<Vec<(PathBuf, OwnedFd)>> = std::sync::Mutex::new(Vec::new());

/// A long-lived launcher (the daemon) keeps at most this many.
const NOTIFY_KEPT: usize = 64;

fn remember_notify(dir: &MachineDir, fd: OwnedFd) {
    set_finished(dir, None);
    if let Ok(mut v) = NOTIFY.lock() {
        v.retain(|(d, _)| d != &dir.dir);
        if v.len() >= NOTIFY_KEPT {
            v.remove(0);
        }
        v.push((dir.dir.clone(), fd));
    }
}

fn forget_notify(dir: &MachineDir) {
    if let Ok(mut v) = NOTIFY.lock() {
        v.retain(|(d, _)| d != &dir.dir);
    }
}

/// A copy of the read end of `dir`'s notify pipe, if this process has one.
fn notify_pipe(dir: &MachineDir) -> Option<OwnedFd> {
    NOTIFY.lock().ok().and_then(|v| {
        v.iter()
            .find(|(d, _)| d == &dir.dir)
            .and_then(|(_, fd)| fd.try_clone().ok())
    })
}

/// Supervisors (machine folder, pid, start time) launched by this process
/// that said they were done with their folder by closing their notify pipe
/// after their container ended, and may still be exiting.
type Finished = (PathBuf, i32, u64);
static FINISHED: std::sync::Mutex<Vec<Finished>> = std::sync::Mutex::new(Vec::new());

/// Whether the supervisor of `s` is done with `dir` (see [`FINISHED`]).
fn finished(dir: &MachineDir, s: &Status) -> bool {
    FINISHED.lock().is_ok_and(|v| {
        v.iter()
            .any(|(d, p, t)| d == &dir.dir && *p == s.supervisor_pid && *t == s.supervisor_start)
    })
}

/// Records that the supervisor of `s` is done with `dir` (`Some`), or
/// forgets the folder (`None`).
fn set_finished(dir: &MachineDir, s: Option<&Status>) {
    if let Ok(mut v) = FINISHED.lock() {
        v.retain(|(d, _, _)| d != &dir.dir);
        if let Some(s) = s {
            if v.len() >= NOTIFY_KEPT {
                v.remove(0);
            }
            v.push((dir.dir.clone(), s.supervisor_pid, s.supervisor_start));
        }
    }
}

/// Waits up to `timeout` for the status of `dir` to change. Wakes at once
/// when the supervisor that this process launched for it saves a status or
/// exits; otherwise (another process launched it) sleeps min(timeout,
/// 300 µs) before the caller looks again.
pub fn wait_change(dir: &MachineDir, timeout: Duration) {
    let Some(fd) = notify_pipe(dir) else {
        std::thread::sleep(timeout.min(Duration::from_micros(300)));
        return;
    };
    if sys::wait_readable(&fd, timeout) {
        let mut buf = [0u8; 64];
        // SAFETY: read into a live buffer from an fd we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n == 0 {
            // The supervisor is gone, or done (see [`wait_finished`]):
            // nothing will come any more.
            forget_notify(dir);
            if let Some(s) = dir.read_status().filter(|s| s.phase.is_final()) {
                set_finished(dir, Some(&s));
            }
        }
    }
}

/// Lets a container launched with `wait_for_start` run.
/// Returns once the supervisor has started it (or it failed).
pub fn start(dir: &MachineDir) -> Result<(), RuntimeError> {
    dir.request("start")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(s) = dir.read_status() {
        if s.phase != Phase::Created || !sys::alive(s.supervisor_pid, s.supervisor_start) {
            break;
        }
        if Instant::now() > deadline {
            return Err(dir.err("the container did not start within 30 s"));
        }
        wait_change(dir, Duration::from_millis(50));
    }
    Ok(())
}

/// When `s` says the container has ended while its supervisor is still
/// alive (see [`Phase::is_final`]), waits for it to finish removing the
/// container and exit: true then, false when there was nothing to wait for,
/// an error if it is still there after 30 s (a v1 cgroup removal can take a
/// while on a loaded host). A supervisor this process launched is done
/// when it closes its notify pipe, its last act (see
/// `supervisor::let_go_of_the_folder`): its exit is not waited for then.
fn wait_finished(dir: &MachineDir, s: &Status) -> Result<bool, RuntimeError> {
    if !s.phase.is_final() {
        return Ok(false);
    }
    if finished(dir, s) {
        return Ok(true);
    }
    if !sys::alive(s.supervisor_pid, s.supervisor_start) {
        return Ok(false);
    }
    let pipe = notify_pipe(dir);
    let (pid, started) = (s.supervisor_pid, s.supervisor_start);
    if !sys::wait_gone_or_closed(pid, started, pipe.as_ref(), Duration::from_secs(30)) {
        return Err(dir.err("the supervisor did not exit after its container ended"));
    }
    forget_notify(dir);
    if pipe.is_some() {
        set_finished(dir, Some(s));
    }
    Ok(true)
}

/// Asks PID 1 to stop (SIGRTMIN+3 for systemd, SIGTERM otherwise, or the
/// spec's stop signal), SIGKILL after `timeout`, and waits for the supervisor
/// to exit. A machine that is not running is not an error.
pub fn stop(dir: &MachineDir, timeout: Duration) -> Result<(), RuntimeError> {
    let Some(s) = dir.read_status() else {
        return Ok(());
    };
    if !sys::alive(s.supervisor_pid, s.supervisor_start) {
        return cleanup_dead(dir);
    }
    if wait_finished(dir, &s)? {
        // PID 1 had ended: the supervisor removed the container and exited.
        return Ok(());
    }
    if let Err(e) = dir.request(&format!("stop {}", timeout.as_millis())) {
        // The container may have just ended on its own: the supervisor is then
        // exiting and no longer answers. That is a stopped machine, not an error.
        if !sys::wait_gone(s.supervisor_pid, s.supervisor_start, Duration::from_secs(2)) {
            return Err(e);
        }
        return Ok(());
    }
    if !sys::wait_gone(
        s.supervisor_pid,
        s.supervisor_start,
        timeout + Duration::from_secs(10),
    ) {
        return Err(dir.err("the supervisor did not exit after stop"));
    }
    Ok(())
}

/// PID 1's terminal (a machine whose spec has `terminal`) from its
/// supervisor: a socket relayed to the terminal (reads give its output, from
/// the last few KiB of what it printed before; end of file once PID 1 is
/// gone; writes are its input), and a copy of the pty master, for its window
/// size only. One client at a time; closing the socket detaches.
pub fn attach_console(dir: &MachineDir) -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    let sock = dir.socket_path();
    let mut s = UnixStream::connect(&sock).map_err(|e| RuntimeError::io(&sock, e))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| RuntimeError::io(&sock, e))?;
    s.write_all(b"attach\n")
        .map_err(|e| RuntimeError::io(&sock, e))?;
    let mut fds = sys::recv_fds(&s).map_err(|e| RuntimeError::io(&sock, e))?;
    if fds.len() == 2 {
        let master = fds.pop().expect("two fds");
        let io = fds.pop().expect("two fds");
        return Ok((io, master));
    }
    // No fds: the supervisor answered with an error line (its first byte
    // went with the failed receive).
    let mut rest = String::new();
    let _ = BufReader::new(s).read_line(&mut rest);
    let why = rest.trim().trim_start_matches("rr ");
    Err(dir.err(format!("cannot attach to the terminal: {why}")))
}

/// Sends `sig` to the container's PID 1 through the supervisor.
pub fn kill(dir: &MachineDir, sig: i32) -> Result<(), RuntimeError> {
    dir.request(&format!("kill {sig}")).map(|_| ())
}

/// Stops the container (if running) and launches it again from the saved config.
pub fn restart(
    dir: &MachineDir,
    timeout: Duration,
    supervisor: &Path,
) -> Result<MachineState, RuntimeError> {
    stop(dir, timeout)?;
    let cfg = dir.read_config()?;
    launch(dir, &cfg, supervisor)
}

fn exec_command(dir: &MachineDir, argv: &[String]) -> Result<Command, RuntimeError> {
    match dir.state() {
        MachineState::Running { .. } => {}
        other => {
            return Err(dir.err(format!(
                "machine is not running ({other:?}); start it first"
            )))
        }
    }
    let mut cmd = Command::new(find_supervisor()?);
    cmd.arg("--exec").arg(&dir.dir).arg("--").args(argv);
    Ok(cmd)
}

/// Runs `argv` in the running container (see [`crate::exec`]); returns its
/// exit status and captured output.
pub fn exec(dir: &MachineDir, argv: &[String]) -> Result<ExecResult, RuntimeError> {
    let out = exec_command(dir, argv)?
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| RuntimeError::io(&dir.dir, e))?;
    Ok(ExecResult {
        status: exit_code(out.status),
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

/// Runs `argv` in the running container with the caller's stdin, stdout and
/// stderr (a terminal stays a terminal); returns its exit status.
pub fn exec_interactive(dir: &MachineDir, argv: &[String]) -> Result<i32, RuntimeError> {
    let st = exec_command(dir, argv)?
        .status()
        .map_err(|e| RuntimeError::io(&dir.dir, e))?;
    Ok(exit_code(st))
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// After a supervisor died: kill what is left of its container and remove
/// the libcontainer state and cgroups, so that a new launch starts clean.
pub fn cleanup_dead(dir: &MachineDir) -> Result<(), RuntimeError> {
    if let Some(s) = dir.read_status() {
        // A supervisor still removing its ended container: not at the same
        // time (what it could not remove is seen to below).
        wait_finished(dir, &s)?;
    }
    let Ok(cfg) = dir.read_config() else {
        return Ok(());
    };
    if cfg.process.is_some() {
        // A host process outlives a killed supervisor: end it (it is in its
        // own session, started by the supervisor, identified by start time).
        if let Some(s) = dir.read_status() {
            let ours = |pid: i32| {
                let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let argv0 = cmd.split(|b| *b == 0).next().unwrap_or_default();
                cfg.process
                    .as_ref()
                    .and_then(|p| p.argv.first())
                    .is_some_and(|a| a.as_bytes() == argv0)
            };
            if let Some(pid) = s.pid.filter(|p| *p > 0) {
                if !sys::alive(s.supervisor_pid, s.supervisor_start) && ours(pid) {
                    let _ = sys::kill(-pid, libc::SIGKILL);
                    let _ = sys::kill(pid, libc::SIGKILL);
                }
            }
        }
        return Ok(());
    }
    // A supervisor killed while it created the container may have left the
    // container's cgroup view mounted (one statx when not).
    crate::cgroups::release_view(&container::cgroup_view_dir(&dir.bundle_dir()));
    let name = &cfg.container.name;
    let root = dir.state_root();
    let status = match container::status(name, &root) {
        Ok(s) => s,
        Err(RuntimeError::Libcontainer { .. }) => {
            // A supervisor killed while libcontainer rewrote state.json leaves
            // it unreadable, and nothing could ever load it again: the
            // container is dead with its supervisor, so its state goes.
            let _ = fs::remove_dir_all(root.join(name));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if let Some((_, pid)) = status {
        if let Some(pid) = pid {
            if let Some(started) = sys::start_time(pid) {
                let _ = sys::kill(pid, libc::SIGKILL);
                sys::wait_gone(pid, started, Duration::from_secs(5));
            }
        }
        container::delete(name, &root, true, cfg.container.keep_cgroup_parent)?;
    }
    Ok(())
}

/// Stops the machine (SIGKILL after `timeout`), removes its container,
/// cgroups and its whole folder (logs included).
pub fn destroy(dir: &MachineDir, timeout: Duration) -> Result<(), RuntimeError> {
    if !dir.dir.exists() {
        return Ok(());
    }
    if let Err(e) = stop(dir, timeout) {
        // A wedged supervisor must not keep the machine alive: kill it and
        // clean up after it like after a crash.
        eprintln!("moat: {e}; killing the supervisor");
        if let Some(s) = dir.read_status() {
            if sys::alive(s.supervisor_pid, s.supervisor_start) {
                let _ = sys::kill(s.supervisor_pid, libc::SIGKILL);
            }
        }
    }
    cleanup_dead(dir)?;
    forget_notify(dir);
    fs::remove_dir_all(&dir.dir).map_err(|e| RuntimeError::io(&dir.dir, e))
}

/// A running machine whose processes are frozen (cgroup freezer) until
/// [`Frozen::thaw`] or drop: its files hold still while they are copied.
/// SIGINT, SIGTERM and SIGHUP are blocked in the calling thread meanwhile
/// (delivered after the thaw), so a ^C cannot leave the machine frozen; a
/// supervisor asked to stop thaws its machine first (a SIGKILL of the caller).
#[must_use = "the machine thaws when this is dropped"]
pub struct Frozen {
    cgroup: Option<String>,
    old_mask: libc::sigset_t,
}

impl Frozen {
    /// Thaw now, reporting a failure (drop thaws too, silently).
    pub fn thaw(mut self) -> Result<(), RuntimeError> {
        self.release()
    }

    fn release(&mut self) -> Result<(), RuntimeError> {
        let r = match self.cgroup.take() {
            Some(cg) => thaw_cgroup(&cg),
            None => return Ok(()),
        };
        // SAFETY: restores the mask saved by `freeze` for this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
        r
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// Thaws the cgroup `cg` (a path such as `/moat-x/name`).
fn thaw_cgroup(cg: &str) -> Result<(), RuntimeError> {
    crate::cgroups::set_frozen(cg, false, Duration::from_secs(10)).map_err(|e| RuntimeError::Sys {
        container: cg.to_string(),
        op: "thaw the cgroup",
        source: e,
    })
}

/// Freeze every process of the running machine in `dir` (its container's
/// cgroup, subtree included). A task that cannot stop within `timeout`
/// (stuck in uninterruptible I/O) fails the freeze, and the machine is thawed.
pub fn freeze(dir: &MachineDir, timeout: Duration) -> Result<Frozen, RuntimeError> {
    let cfg = dir.read_config()?;
    let cg = cfg.container.cgroup_path();
    // SAFETY: sigset_t values filled by sigemptyset/sigaddset and
    // pthread_sigmask; only this thread's mask changes.
    let old_mask = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    };
    let frozen = Frozen {
        cgroup: Some(cg.clone()),
        old_mask,
    };
    if let Err(e) = crate::cgroups::set_frozen(&cg, true, timeout) {
        drop(frozen);
        return Err(RuntimeError::Sys {
            container: cfg.container.name.clone(),
            op: "freeze the cgroup",
            source: e,
        });
    }
    Ok(frozen)
}
