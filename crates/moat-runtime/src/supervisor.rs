//! The per-machine supervisor (run by the `moat-supervisor` binary).
//!
//! One process per running machine, detached from whoever launched it
//! (fork + setsid), single-threaded, driven by poll(2) over: a self-pipe fed
//! by SIGCHLD/SIGTERM/SIGINT handlers, the request socket, and the two pipes
//! carrying the container's stdout/stderr into rotating log files. A machine
//! with a terminal (`run -t`) adds its pty master, drained into the stdout
//! log, and the attached client's socket (`attach`), relayed both ways.
//!
//! ```text
//!  Starting ──create──▶ Created ──start──▶ Running ──PID 1 ends──┬─▶ Exited   (policy says no)
//!     ▲                 (wait_for_start)      │                  ├─▶ Stopped  (stop requested)
//!     └──── backoff ◀── Restarting ◀──────────┴──────────────────┘   (policy says restart)
//!  any create/start error ─▶ Failed
//! ```
//! The container's init is our child (libcontainer clones it as a sibling of
//! its intermediate process), so we reap it with waitpid.

use crate::container::{self, Stdio};
use crate::logs::RotatingLog;
use crate::machine::{MachineDir, Phase, RestartPolicy, Status, SupervisorConfig};
use crate::spec::{ContainerKind, ContainerSpec};
use crate::sys::{self, ExitStatus};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe; the fd is a non-blocking pipe.
    unsafe {
        libc::write(fd, (&b as *const u8).cast(), 1);
    }
}

/// Does nothing: SIGPIPE's handler, see [`main_entry`].
extern "C" fn ignore_signal(_: i32) {}

/// Entry point of the `moat-supervisor` binary: `moat-supervisor <machine dir>`.
/// Returns the process exit code of the launching (parent) half.
pub fn main_entry() -> i32 {
    // Rust ignores SIGPIPE, and an ignored signal stays ignored across exec:
    // the container's processes (libcontainer forks them, std's Command reset
    // does not apply) would all start with SIGPIPE ignored. A handler that
    // does nothing gives us the same EPIPE errors, and exec resets it.
    // SAFETY: installs an async-signal-safe handler; sigaction is zeroed then filled.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGPIPE, &sa, std::ptr::null_mut());
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).map(|a| a == "--exec").unwrap_or(false) {
        return match crate::exec::ExecRequest::parse(&args[2..]) {
            Ok(req) => crate::exec::exec_main(&req),
            Err(usage) => {
                eprintln!("{usage}");
                2
            }
        };
    }
    let mut handover = None;
    let dir = if args.get(1).is_some_and(|a| a == "--wait") {
        // Started ahead of its machine (`machine::prespawn`): set up what
        // does not depend on it, then wait for the folder.
        take_back_affinity();
        crate::cgroups::preload();
        match fork_ahead() {
            Ahead::Launcher(code) => return code,
            Ahead::Daemon(fd) => handover = Some(fd),
            Ahead::NotForked => {}
        }
        match wait_for_go() {
            Ok(Some(d)) => d,
            // The launcher went away without a machine for us.
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("moat-supervisor: --wait: {e}");
                return 1;
            }
        }
    } else {
        match args.get(1) {
            Some(d) => d.clone(),
            None => {
                eprintln!("usage: moat-supervisor <machine folder>");
                return 2;
            }
        }
    };
    let code = supervise(MachineDir::new(dir), &mut handover);
    if let Some(fd) = handover {
        hand_over(fd, code);
    }
    code
}

/// What [`fork_ahead`] made of this process.
enum Ahead {
    /// The half its launcher waits for: exit with this code.
    Launcher(i32),
    /// The supervisor to be: it reports the launcher half's exit code on
    /// this pipe (see [`hand_over`]) once it has its machine or failed.
    Daemon(OwnedFd),
    /// No fork (it failed): the supervisor forks once it has its machine.
    NotForked,
}

/// A warm supervisor forks its daemon half while it waits for its machine,
/// not after: the fork (page tables of the whole binary, the child's first
/// run on a CPU) is then off the path of the run. The launcher (`moat run`)
/// waits for its own child, which now waits for the daemon's word on a
/// pipe and exits with the code the fork at the go used to give.
fn fork_ahead() -> Ahead {
    let Ok((r, w)) = sys::pipe() else {
        return Ahead::NotForked;
    };
    // SAFETY: fork while single-threaded (nothing has spawned threads yet).
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Ahead::NotForked;
    }
    if child == 0 {
        drop(r);
        return Ahead::Daemon(w);
    }
    drop(w);
    // The go and notify pipes, the log: the daemon's alone (a copy here would
    // keep the notify pipe's end of file from its launcher). Nothing else
    // runs or is used in this process any more.
    // SAFETY: no object whose fd is closed here is used or dropped after.
    unsafe { sys::close_fds_except(3, &[r.as_raw_fd() as u32]) };
    let mut b = [0u8; 1];
    let code = match fs::File::from(r).read(&mut b) {
        Ok(1) => i32::from(b[0]),
        // The daemon died before it said anything.
        _ => 1,
    };
    Ahead::Launcher(code)
}

/// Tells the launcher half of [`fork_ahead`] its exit code.
fn hand_over(fd: OwnedFd, code: i32) {
    let b = [code.clamp(0, 255) as u8];
    let _ = fs::File::from(fd).write_all(&b);
}

/// The supervisor of the machine in `dir`, from its lock to its end. With
/// `handover` (a warm supervisor forked ahead), this process is the daemon
/// already: it hands the launcher half its code instead of forking.
fn supervise(dir: MachineDir, handover: &mut Option<OwnedFd>) -> i32 {
    // One supervisor per machine, before anything of the machine is read or
    // touched (socket, status, container state). The lock lives as long as
    // this open file: the forked supervisor below keeps it (close-on-exec, so
    // no container process does).
    let _lock = match fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.lock_path())
        .map(|f| (f.try_lock(), f))
    {
        Ok((Ok(()), f)) => f,
        Ok((Err(fs::TryLockError::WouldBlock), _)) => {
            eprintln!(
                "moat-supervisor: another supervisor runs {}",
                dir.dir.display()
            );
            return crate::machine::SUPERVISOR_BUSY;
        }
        Ok((Err(fs::TryLockError::Error(e)), _)) | Err(e) => {
            eprintln!("moat-supervisor: {}: {e}", dir.lock_path().display());
            return 1;
        }
    };
    let cfg = match dir.read_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("moat-supervisor: {e}");
            return 1;
        }
    };
    let log = match fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.supervisor_log())
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("moat-supervisor: {}: {e}", dir.supervisor_log().display());
            return 1;
        }
    };
    let notify = notify_fd();
    if let Some(fd) = handover.take() {
        // Forked ahead: the launcher half exits 0 now.
        hand_over(fd, 0);
    } else {
        // SAFETY: fork while single-threaded (nothing has spawned threads yet).
        let child = unsafe { libc::fork() };
        if child < 0 {
            eprintln!("moat-supervisor: fork: {}", io::Error::last_os_error());
            return 1;
        }
        if child > 0 {
            return 0;
        }
    }
    // SAFETY: plain syscalls on valid fds in the forked child.
    unsafe {
        libc::setsid();
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
        if let Ok(null) = fs::File::open("/dev/null") {
            libc::dup2(null.as_raw_fd(), 0);
        }
    }
    drop(log);
    let _ = std::env::set_current_dir("/");
    // Started first: the helper makes the network namespace while we set up.
    let ahead = namespaces_ahead(&cfg);
    let code = match Supervisor::new(dir, cfg) {
        Ok(mut s) => {
            s.notify = notify;
            s.ns_ahead = ahead;
            let code = s.run();
            let last = s.notify.take();
            let ns = s.held_mnt_ns.take();
            drop(s);
            let_go_of_the_folder(last, ns);
            code
        }
        Err(e) => {
            eprintln!("moat-supervisor: {e}");
            1
        }
    };
    // SAFETY: leave without running atexit handlers inherited from the parent half.
    unsafe { libc::_exit(code) }
}

/// The end of a supervisor: every fd it still has is closed, stdout and
/// stderr (`supervisor.log`, in the machine folder) put on /dev/null, and
/// the notify pipe last. Its launcher takes the end of file on that pipe for
/// "done with the machine folder" (see `machine::wait_finished`) and may
/// unmount or remove the folder while this process is still exiting: its
/// memory teardown is then off the launcher's path, and so is the teardown
/// of a disposable container's mount namespace (`held`, closed after).
fn let_go_of_the_folder(notify: Option<OwnedFd>, held: Option<OwnedFd>) {
    let keep: Vec<u32> = [&notify, &held]
        .into_iter()
        .flatten()
        .map(|fd| fd.as_raw_fd() as u32)
        .collect();
    // SAFETY: plain syscalls; nothing else runs in this process any more
    // (the container is gone, its threads were joined), so closing fds that
    // no owner will close again is sound: the process exits right after.
    unsafe {
        if let Ok(null) = fs::File::open("/dev/null") {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
        sys::close_fds_except(3, &keep);
    }
    drop(notify);
    drop(held);
}

/// A pipe end the launcher left open across exec, its number in `var`:
/// taken out of the environment (not passed on to what we start, such as
/// a `process` machine's host process) and made close-on-exec (no
/// container process keeps it). `Ok(None)`: no such variable.
fn inherited_fd(var: &str) -> io::Result<Option<OwnedFd>> {
    let Ok(val) = std::env::var(var) else {
        return Ok(None);
    };
    // Single-threaded here, so changing the environment is sound.
    std::env::remove_var(var);
    let n: i32 = val.parse().ok().filter(|n| *n > 2).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{var} is not an fd number above 2"),
        )
    })?;
    // SAFETY: fcntl on a number: fails with EBADF when it is not an open fd.
    if unsafe { libc::fcntl(n, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the launcher handed this fd to us alone; it is open (checked).
    Ok(Some(unsafe {
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n)
    }))
}

/// A warm supervisor left its launcher's CPU before its exec (see
/// `machine::prespawn`): it takes back the launcher's affinity, which the
/// machine's processes inherit from it. Single-threaded here, so changing
/// the environment is sound.
fn take_back_affinity() {
    let Ok(list) = std::env::var(crate::machine::CPUS_ENV) else {
        return;
    };
    std::env::remove_var(crate::machine::CPUS_ENV);
    match sys::parse_cpu_list(&list) {
        Some(set) => sys::set_affinity(0, &set),
        None => eprintln!(
            "moat-supervisor: {} is not a list of CPUs: {list}",
            crate::machine::CPUS_ENV
        ),
    }
}

/// A warm supervisor's machine folder: all its launcher writes to the go
/// pipe before closing it. `Ok(None)` when it closed it with nothing
/// written (no machine for us); `Err` on anything else (a launcher that
/// wrote the folder then sees us fail at once instead of waiting).
fn wait_for_go() -> io::Result<Option<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStringExt;
    let fd = inherited_fd(crate::machine::GO_FD_ENV)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "no go pipe (MOAT_SUPERVISOR_GO_FD) in the environment",
        )
    })?;
    let mut buf = Vec::new();
    fs::File::from(fd).read_to_end(&mut buf)?;
    Ok((!buf.is_empty()).then(|| std::ffi::OsString::from_vec(buf)))
}

/// The user and network namespaces of the container of `cfg`, started now
/// in a helper (see `sys::NsAhead`, `container::create`) when it would make
/// such namespaces. Silently none when they cannot be: the container then
/// makes its own (and reports what fails).
fn namespaces_ahead(cfg: &SupervisorConfig) -> Option<sys::NsAhead> {
    if cfg.process.is_some() {
        return None;
    }
    let range = container::namespaces_ahead(&cfg.container)?;
    sys::NsAhead::start(range).ok()
}

/// The write end of the launcher's notify pipe (see `machine::launch`), when
/// it gave one: non-blocking (a launcher that stopped reading never blocks
/// us).
fn notify_fd() -> Option<OwnedFd> {
    let fd = inherited_fd(crate::machine::NOTIFY_FD_ENV).ok()??;
    sys::set_nonblock(&fd);
    Some(fd)
}

/// How long a machine runs before its supervisor drops what it does not
/// need resident while idle: not at once, or a short run (`moat run --rm
/// busybox -- true`) pays for the trim and then for faulting its code back
/// in to record the exit.
const TRIM_AFTER: Duration = Duration::from_millis(500);

struct Supervisor {
    /// See [`notify_fd`]: a byte is written at each status save.
    notify: Option<OwnedFd>,
    dir: MachineDir,
    cfg: SupervisorConfig,
    status: Status,
    listener: UnixListener,
    sig_r: OwnedFd,
    out_r: OwnedFd,
    out_w: OwnedFd,
    err_r: OwnedFd,
    err_w: OwnedFd,
    out_log: RotatingLog,
    err_log: RotatingLog,
    init: Option<i32>,
    init_exit: Option<ExitStatus>,
    stop_requested: bool,
    kill_at: Option<Instant>,
    /// When a machine still running gets its supervisor's memory trimmed
    /// (see [`TRIM_AFTER`]).
    trim_at: Option<Instant>,
    start_requested: bool,
    /// PID 1's terminal master (`ContainerSpec::terminal`): drained into
    /// the stdout log, relayed to the attached client.
    console: Option<OwnedFd>,
    /// The attached terminal client (`attach`): our end of its socket pair.
    client: Option<UnixStream>,
    /// The terminal's last output, replayed to a client when it attaches.
    replay: Vec<u8>,
    /// The container created and not started yet (libcontainer's handle).
    created: Option<container::Created>,
    /// Namespaces being made for the next container (see
    /// [`namespaces_ahead`]); `create` starts them itself when none are.
    ns_ahead: Option<sys::NsAhead>,
    /// A disposable container's mount namespace, held from its creation:
    /// its teardown (its few dozen mounts, the overlay, an RCU grace period)
    /// then happens when this process lets go of it after the exit was
    /// reported and the folder released (see [`let_go_of_the_folder`]),
    /// not in PID 1's exit, before anyone learns of it.
    held_mnt_ns: Option<OwnedFd>,
}

/// How much of the terminal's output a newly attached client gets first (the
/// prompt printed before `run -t` attached, the screen's tail on re-attach).
const REPLAY_BYTES: usize = 4096;

/// Writes `data` to the non-blocking `fd`, waiting at most `wait` in all
/// for room when it is full. `Ok(false)`: the time ran out and the rest was
/// not written (the peer does not read); `Err`: the peer is gone.
fn write_within(fd: i32, mut data: &[u8], wait: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + wait;
    while !data.is_empty() {
        // SAFETY: write from a live slice.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n > 0 {
            data = &data[n as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: poll over one live pollfd; EINTR loops back here.
                unsafe { libc::poll(&mut p, 1, left.as_millis() as i32 + 1) };
            }
            _ => return Err(e),
        }
    }
    Ok(true)
}

/// At most this much output (terminal, stdout, stderr each) is taken per
/// poll round, so a process that prints without pause cannot starve
/// requests and signals.
const OUTPUT_BYTES_PER_ROUND: usize = 256 * 1024;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn stop_signal(spec: &ContainerSpec) -> i32 {
    if let Some(s) = spec.stop_signal {
        return s;
    }
    let systemd = spec.kind == ContainerKind::System
        && (spec.effective_args()[0].contains("systemd")
            || fs::read_link(spec.rootfs.join("sbin/init"))
                .map(|t| t.to_string_lossy().contains("systemd"))
                .unwrap_or(false));
    if systemd {
        sys::sigrtmin_plus_3()
    } else {
        libc::SIGTERM
    }
}

impl Supervisor {
    fn new(dir: MachineDir, cfg: SupervisorConfig) -> io::Result<Self> {
        let (sig_r, sig_w) = sys::pipe()?;
        sys::set_nonblock(&sig_r);
        sys::set_nonblock(&sig_w);
        SIGNAL_PIPE.store(sig_w.as_raw_fd(), Ordering::Relaxed);
        std::mem::forget(sig_w);
        for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // SAFETY: installs an async-signal-safe handler; sigaction is zeroed then filled.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
        let sock = dir.socket_path();
        let _ = fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)?;
        listener.set_nonblocking(true)?;
        fs::create_dir_all(dir.logs_dir())?;
        let out_log = RotatingLog::open(dir.stdout_log(), cfg.log_max_bytes, cfg.log_keep)?;
        let err_log = RotatingLog::open(dir.stderr_log(), cfg.log_max_bytes, cfg.log_keep)?;
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        sys::set_nonblock(&out_r);
        sys::set_nonblock(&err_r);
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        let status = Status {
            phase: Phase::Starting,
            supervisor_pid: me,
            supervisor_start: sys::start_time(me).unwrap_or(0),
            pid: None,
            started_at: None,
            exit_code: None,
            exit_signal: None,
            restarts: 0,
            message: None,
            rootfs_ownership: None,
        };
        Ok(Supervisor {
            notify: None,
            dir,
            cfg,
            status,
            listener,
            sig_r,
            out_r,
            out_w,
            err_r,
            err_w,
            out_log,
            err_log,
            init: None,
            init_exit: None,
            stop_requested: false,
            kill_at: None,
            trim_at: None,
            start_requested: false,
            console: None,
            client: None,
            replay: Vec::new(),
            created: None,
            ns_ahead: None,
            held_mnt_ns: None,
        })
    }

    fn save(&self) {
        let tmp = self.dir.dir.join("status.json.tmp");
        let Ok(text) = serde_json::to_vec(&self.status) else {
            return;
        };
        if fs::write(&tmp, text).is_ok() {
            let _ = fs::rename(&tmp, self.dir.status_path());
        }
        if let Some(fd) = &self.notify {
            // A full pipe or a launcher gone (EPIPE; SIGPIPE's handler does
            // nothing) is fine: it has the news or no longer wants it.
            // SAFETY: write of one byte from a live buffer to an fd we own.
            let _ = unsafe { libc::write(fd.as_raw_fd(), b"s".as_ptr().cast(), 1) };
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        self.status.phase = phase;
        self.save();
    }

    fn run(&mut self) -> i32 {
        self.save();
        let name = self.cfg.container.name.clone();
        let keep = self.cfg.container.keep_cgroup_parent;
        let root = self.dir.state_root();
        let mut first = true;
        let mut quick_failures = 0u32;
        loop {
            if let Err(e) = self.create() {
                eprintln!("moat-supervisor: {e}");
                self.status.message = Some(e.to_string());
                let _ = container::delete(&name, &root, true, keep);
                self.set_phase(Phase::Failed);
                return self.finish(1);
            }
            if first && self.cfg.wait_for_start {
                self.set_phase(Phase::Created);
                while !self.start_requested && !self.stop_requested {
                    self.poll_once(None);
                }
            }
            first = false;
            if !self.stop_requested {
                let started = match self.cfg.process {
                    Some(_) => Ok(()),
                    None => match self.created.take() {
                        Some(c) => c.start(),
                        None => container::start(&name, &root),
                    },
                };
                if let Err(e) = started {
                    eprintln!("moat-supervisor: {e}");
                    self.status.message = Some(e.to_string());
                    let _ = self.kill_init(libc::SIGKILL);
                    self.wait_init_exit();
                    let _ = container::delete(&name, &root, true, keep);
                    self.set_phase(Phase::Failed);
                    return self.finish(1);
                }
                self.status.started_at = Some(now_secs());
                self.status.message = None;
                self.set_phase(Phase::Running);
                self.trim_at = Some(Instant::now() + TRIM_AFTER);
            } else {
                self.created = None;
                let _ = self.kill_init(libc::SIGKILL);
            }
            let run_start = Instant::now();
            let exit = self.wait_init_exit();
            // The terminal's last output (its client then sees the end).
            self.on_console();
            // All that is left (a pipe may hold up to 1 MiB), within reason.
            self.drain_logs(16 << 20);
            self.init = None;
            self.status.pid = None;
            let (code, sig) = match exit {
                ExitStatus::Code(c) => (Some(c), None),
                ExitStatus::Signal(s) => (None, Some(s)),
            };
            self.status.exit_code = code;
            self.status.exit_signal = sig;
            let failed = exit != ExitStatus::Code(0);
            let again = !self.stop_requested
                && match self.cfg.restart {
                    RestartPolicy::No => false,
                    RestartPolicy::OnFailure => failed,
                    RestartPolicy::Always => true,
                }
                && self
                    .cfg
                    .max_restarts
                    .is_none_or(|m| self.status.restarts < m);
            if !again {
                // The end is reported first (see `Phase::is_final`): the
                // launcher releases the root file system while the cgroups
                // and state go, then waits for this process to exit.
                let _ = fs::remove_file(self.dir.socket_path());
                self.set_phase(if self.stop_requested {
                    Phase::Stopped
                } else {
                    Phase::Exited
                });
            }
            if self.cfg.process.is_none() {
                // PID 1 was reaped above: its cgroup is known, nothing runs.
                if let Err(e) = container::delete_ended(&self.cfg.container, &root) {
                    eprintln!("moat-supervisor: {e}");
                }
            }
            if !again {
                return self.finish(0);
            }
            // Exponential backoff for crash loops, reset after a good run.
            if run_start.elapsed() > Duration::from_secs(10) {
                quick_failures = 0;
            }
            let delay = Duration::from_millis(100u64 << quick_failures.min(8));
            quick_failures += 1;
            self.status.restarts += 1;
            self.set_phase(Phase::Restarting);
            let until = Instant::now() + delay;
            while Instant::now() < until && !self.stop_requested {
                self.poll_once(Some(until));
            }
            if self.stop_requested {
                self.set_phase(Phase::Stopped);
                return self.finish(0);
            }
            self.set_phase(Phase::Starting);
        }
    }

    fn finish(&mut self, code: i32) -> i32 {
        let _ = fs::remove_file(self.dir.socket_path());
        code
    }

    fn create(&mut self) -> Result<(), crate::RuntimeError> {
        if let Some(p) = self.cfg.process.clone() {
            let pid = crate::hostproc::spawn(
                &p,
                &self.cfg.container.name,
                self.out_w.try_clone().ok(),
                self.err_w.try_clone().ok(),
            )?;
            self.init = Some(pid);
            self.init_exit = None;
            self.status.pid = Some(pid);
            return Ok(());
        }
        let stdio = Stdio {
            stdin: None,
            stdout: self.out_w.try_clone().ok(),
            stderr: self.err_w.try_clone().ok(),
        };
        let ahead = self.ns_ahead.take().or_else(|| namespaces_ahead(&self.cfg));
        let mut created = container::create(
            &self.cfg.container,
            &self.dir.container_paths(),
            stdio,
            ahead,
        )?;
        self.console = created.console.take();
        if let Some(m) = &self.console {
            sys::set_nonblock(m);
        }
        self.init = Some(created.pid);
        self.init_exit = None;
        self.status.pid = Some(created.pid);
        self.status.rootfs_ownership = self.dir.rootfs_ownership();
        // Only a disposable root (a volatile overlay, its folder removed after
        // the run): a kept upper layer must be free for the next mount at once.
        self.held_mnt_ns = None;
        if self
            .cfg
            .container
            .overlay
            .as_ref()
            .is_some_and(|o| o.volatile)
        {
            self.held_mnt_ns = fs::File::open(format!("/proc/{}/ns/mnt", created.pid))
                .ok()
                .map(OwnedFd::from);
        }
        self.created = Some(created);
        Ok(())
    }

    fn kill_init(&self, sig: i32) -> io::Result<()> {
        match self.init {
            Some(pid) => sys::kill(pid, sig),
            None => Ok(()),
        }
    }

    fn wait_init_exit(&mut self) -> ExitStatus {
        loop {
            if let Some(e) = self.init_exit {
                return e;
            }
            if self.init.is_none() {
                return ExitStatus::Code(0);
            }
            // poll_once also wakes for `kill_at`.
            self.poll_once(self.trim_at);
            if self.trim_at.is_some_and(|t| Instant::now() >= t) {
                self.trim_at = None;
                if self.init_exit.is_none() {
                    sys::trim_resident_memory();
                }
            }
        }
    }

    fn poll_once(&mut self, until: Option<Instant>) {
        if let Some(at) = self.kill_at {
            if Instant::now() >= at {
                self.kill_at = None;
                let _ = self.kill_init(libc::SIGKILL);
            }
        }
        let deadline = match (until, self.kill_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = deadline
            .map(|d| d.saturating_duration_since(Instant::now()).as_millis() as i32 + 1)
            .unwrap_or(-1);
        let pfd = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // A negative fd is skipped by poll(2).
        let mut fds = [
            pfd(self.sig_r.as_raw_fd()),
            pfd(self.listener.as_raw_fd()),
            pfd(self.out_r.as_raw_fd()),
            pfd(self.err_r.as_raw_fd()),
            pfd(self.console.as_ref().map_or(-1, |m| m.as_raw_fd())),
            pfd(self.client.as_ref().map_or(-1, |c| c.as_raw_fd())),
        ];
        // SAFETY: fds is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n <= 0 {
            return;
        }
        if fds[2].revents != 0 || fds[3].revents != 0 {
            self.drain_logs(OUTPUT_BYTES_PER_ROUND);
        }
        if fds[4].revents != 0 {
            self.on_console();
        }
        if fds[5].revents != 0 {
            self.on_client();
        }
        if fds[0].revents != 0 {
            self.on_signals();
        }
        if fds[1].revents != 0 {
            self.on_requests();
        }
    }

    fn on_signals(&mut self) {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: buf is valid for its length; the pipe is non-blocking.
            let n =
                unsafe { libc::read(self.sig_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            for &s in &buf[..n as usize] {
                if matches!(i32::from(s), libc::SIGTERM | libc::SIGINT | libc::SIGHUP) {
                    self.request_stop(Duration::from_millis(self.cfg.stop_timeout_ms));
                }
            }
        }
        while let Some((pid, st)) = sys::try_wait_any() {
            if Some(pid) == self.init {
                self.init_exit = Some(st);
            }
        }
    }

    fn request_stop(&mut self, timeout: Duration) {
        if self.stop_requested {
            return;
        }
        self.stop_requested = true;
        // A snapshot's freeze whose caller died (SIGKILL) must not keep the
        // machine from stopping: frozen tasks do not act on signals.
        if self.cfg.process.is_none() {
            let _ = crate::cgroups::set_frozen(
                &self.cfg.container.cgroup_path(),
                false,
                Duration::from_secs(2),
            );
        }
        if self.init.is_some() {
            if self.status.phase == Phase::Created {
                let _ = self.kill_init(libc::SIGKILL);
                return;
            }
            self.status.phase = Phase::Stopping;
            self.save();
            let sig = match &self.cfg.process {
                Some(p) => p.stop_signal,
                None => stop_signal(&self.cfg.container),
            };
            let _ = self.kill_init(sig);
            self.kill_at = Some(Instant::now() + timeout);
        }
    }

    fn on_requests(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut words = line.split_whitespace();
            let answer = match (words.next(), words.next()) {
                (Some("start"), _) => {
                    if self.status.phase == Phase::Created {
                        self.start_requested = true;
                        "ok".to_string()
                    } else {
                        format!("err not waiting for start ({:?})", self.status.phase)
                    }
                }
                (Some("stop"), ms) => {
                    let ms = ms
                        .and_then(|m| m.parse().ok())
                        .unwrap_or(self.cfg.stop_timeout_ms);
                    self.request_stop(Duration::from_millis(ms));
                    "ok".into()
                }
                (Some("kill"), Some(sig)) => match sig.parse::<i32>() {
                    Ok(sig) => match self.kill_init(sig) {
                        Ok(()) => "ok".into(),
                        Err(e) => format!("err {e}"),
                    },
                    Err(_) => "err bad signal number".into(),
                },
                (Some("status"), _) => serde_json::to_string(&self.status).unwrap_or_default(),
                // The terminal: a socket relayed to it and a copy of the
                // master (for its size), as SCM_RIGHTS fds (no answer line).
                (Some("attach"), _) => match self.attach(&stream) {
                    Ok(()) => continue,
                    Err(e) => format!("err {e}"),
                },
                _ => "err unknown request".into(),
            };
            let mut w = &stream;
            let _ = w.write_all(format!("{answer}\n").as_bytes());
        }
    }

    /// Hands the terminal to the client on `stream`: one client at a time.
    fn attach(&mut self, stream: &UnixStream) -> Result<(), String> {
        let Some(master) = &self.console else {
            return Err("this machine has no terminal (it was not started by `run -t`)".into());
        };
        if self.client.is_some() {
            return Err(
                "its terminal is attached already (another `moat console` or `run -t`); \
                 leave that one first (Ctrl-])"
                    .into(),
            );
        }
        let (mine, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
        sys::send_fds(stream, &[theirs.as_raw_fd(), master.as_raw_fd()])
            .map_err(|e| format!("sending the terminal: {e}"))?;
        mine.set_nonblocking(true).map_err(|e| e.to_string())?;
        if write_within(mine.as_raw_fd(), &self.replay, Duration::ZERO).is_ok() {
            self.client = Some(mine);
        }
        Ok(())
    }

    /// Terminal output: into the stdout log, the replay tail and the client.
    /// EIO (or end of file) means the last holder of the slave closed it
    /// (PID 1 ended): the terminal and its client go.
    fn on_console(&mut self) {
        let Some(fd) = self.console.as_ref().map(|m| m.as_raw_fd()) else {
            return;
        };
        let mut buf = vec![0u8; 16 * 1024];
        let mut taken = 0;
        let gone = loop {
            if taken >= OUTPUT_BYTES_PER_ROUND {
                break false;
            }
            // SAFETY: buf is valid for buf.len() bytes; fd is the non-blocking master we own.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                break true;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break false,
                    _ => break true,
                }
            }
            let data = &buf[..n as usize];
            taken += data.len();
            if let Err(e) = self.out_log.write_all(data) {
                eprintln!("moat-supervisor: writing a log: {e}");
            }
            self.replay.extend_from_slice(data);
            let excess = self.replay.len().saturating_sub(REPLAY_BYTES);
            self.replay.drain(..excess);
            // A client that does not keep up misses output (the log has
            // it); only a closed one is dropped.
            if let Some(c) = &self.client {
                if write_within(c.as_raw_fd(), data, Duration::ZERO).is_err() {
                    self.client = None;
                }
            }
        };
        if gone {
            self.console = None;
            self.client = None;
        }
    }

    /// Input from the attached client to the terminal; end of file = detached.
    fn on_client(&mut self) {
        let Some(c) = &self.client else {
            return;
        };
        let mut buf = [0u8; 4096];
        let n = match (&*c).read(&mut buf) {
            Ok(0) => {
                self.client = None;
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(_) => {
                self.client = None;
                return;
            }
        };
        if let Some(m) = &self.console {
            // Input the process does not take within 100 ms is dropped (its
            // terminal's input buffer is full): the supervisor must not stall.
            let _ = write_within(m.as_raw_fd(), &buf[..n], Duration::from_millis(100));
        }
    }

    fn drain_logs(&mut self, cap: usize) {
        let mut buf = vec![0u8; 16 * 1024];
        for (fd, log) in [
            (&self.out_r, &mut self.out_log),
            (&self.err_r, &mut self.err_log),
        ] {
            // Capped per round (as the terminal): a process that writes
            // without pause must not starve requests and signals.
            let mut taken = 0;
            while taken < cap {
                // SAFETY: buf is valid for buf.len() bytes; fd is a non-blocking pipe we own.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                taken += n as usize;
                if let Err(e) = log.write_all(&buf[..n as usize]) {
                    eprintln!("moat-supervisor: writing a log: {e}");
                }
            }
        }
    }
}
