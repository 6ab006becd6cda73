//! `moat run`: a docker-like ad-hoc machine from an image. It is not part of
//! the project: the state store records it as `adhoc`, so plans neither list it
//! as an orphan nor prune it. Foreground runs stream the machine's output and
//! return its exit status; `--rm` destroys it afterwards.

use crate::{state_err, Engine, EngineError, Progress, Result};
use moat_core::model::Machine;
use moat_driver::MachineSpec;
use moat_runtime::machine::{MachineDir, MachineState};
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Default)]
pub struct RunOpts {
    pub image: String,
    pub name: Option<String>,
    pub command: Vec<String>,
    pub rm: bool,
    pub detach: bool,
    pub cpus: Option<u32>,
    pub memory: Option<u64>,
    /// `native` (default) or `qemu` (a microVM).
    pub driver: Option<String>,
    /// Attach to this applied domain's network (`native` only); needs `project`.
    pub domain: Option<String>,
    /// The project file (`-f`), to resolve the domain's network and firewall.
    pub project: Option<std::path::PathBuf>,
    /// `run -t`: PID 1 gets a terminal; `Some(TERM)` for its environment.
    /// The outcome then carries the session to relay, and the caller ends
    /// the run with [`Engine::finish_run`].
    pub tty: Option<String>,
}

#[derive(Debug)]
pub struct RunOutcome {
    pub name: String,
    /// The workload's exit status (foreground runs); 128+N for a signal N.
    pub status: Option<i32>,
    /// `run -t`: PID 1's terminal (its master) to relay; its `wait` returns
    /// the exit status.
    pub session: Option<moat_driver::ExecSession>,
}

/// PID 1 of a `run -t` machine behind [`moat_driver::SessionProcess`]: the
/// terminal's master for resizes and ^D, the supervisor for signals, the
/// machine's status for the exit code.
#[derive(Debug)]
struct RunConsole {
    dir: MachineDir,
    /// The pty master, for the window size only.
    master: std::os::fd::OwnedFd,
    /// A copy of the relayed socket: ^D goes after the input before it.
    input: std::os::fd::OwnedFd,
}

impl moat_driver::SessionProcess for RunConsole {
    fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        moat_runtime::sys::set_winsize(&self.master, rows, cols)
    }
    fn close_stdin(&self) -> std::io::Result<()> {
        // The terminal's EOF character (VEOF, ^D by default), through the
        // supervisor's relay so that it follows the input sent before it.
        let mut f = std::fs::File::from(self.input.try_clone()?);
        f.write_all(&[4])
    }
    fn signal(&self, sig: i32) -> std::io::Result<()> {
        moat_runtime::machine::kill(&self.dir, sig).map_err(std::io::Error::other)
    }
    fn wait(&mut self) -> std::io::Result<i32> {
        loop {
            match pid1_exit(&self.dir) {
                Some(r) => return r.map_err(std::io::Error::other),
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

/// A session on PID 1's terminal of the machine in `dir`: the socket the
/// supervisor relays, the pty master (window size) and a copy of the socket
/// (^D after the input).
fn console_session(dir: MachineDir) -> std::result::Result<moat_driver::ExecSession, String> {
    let (io, master) = moat_runtime::machine::attach_console(&dir).map_err(|e| e.to_string())?;
    let input = io.try_clone().map_err(|e| e.to_string())?;
    Ok(moat_driver::ExecSession {
        io,
        tty: true,
        process: Box::new(RunConsole { dir, master, input }),
    })
}

impl Engine {
    /// A session on PID 1's terminal of built-in container `name` started
    /// with `run -t` (`-d` included), for `moat console`: `None` when `name`
    /// is no such machine of this root.
    pub fn native_console(&self, name: &str) -> Result<Option<moat_driver::ExecSession>> {
        let dir = MachineDir::new(self.ctx().root.join("machines").join(name));
        let Ok(cfg) = dir.read_config() else {
            return Ok(None);
        };
        if !cfg.container.terminal {
            return Err(EngineError::Failed(format!(
                "{name} has no terminal (it was not started with `moat run -t`); \
                 `moat shell {name}` opens a shell in it"
            )));
        }
        if !matches!(dir.state(), MachineState::Running { .. }) {
            return Err(EngineError::Failed(format!(
                "{name} is not running; `moat start {name}` first"
            )));
        }
        console_session(dir)
            .map(Some)
            .map_err(|e| EngineError::Failed(format!("{name}: {e}")))
    }
}

/// How PID 1 of a run ended: `None` while it runs, its exit code (128+N for
/// signal N), or why it failed when the supervisor recorded no code.
fn pid1_exit(dir: &MachineDir) -> Option<std::result::Result<i32, String>> {
    match dir.state() {
        MachineState::Stopped {
            exit_code,
            exit_signal,
        } => Some(Ok(exit_code.or(exit_signal.map(|s| 128 + s)).unwrap_or(0))),
        MachineState::Crashed { reason } => Some(
            dir.read_status()
                .and_then(|s| s.exit_code.or(s.exit_signal.map(|x| 128 + x)))
                .ok_or(reason),
        ),
        _ => None,
    }
}

/// Gives PID 1 of a created (not started) machine a terminal: the spec the
/// supervisor reads at launch says so, and TERM names the caller's terminal.
fn with_terminal(dir: &MachineDir, term: &str) -> Result<()> {
    let failed = |e: moat_runtime::RuntimeError| EngineError::Failed(e.to_string());
    let mut cfg = dir.read_config().map_err(failed)?;
    cfg.container.terminal = true;
    cfg.container.env.retain(|e| !e.starts_with("TERM="));
    cfg.container.env.push(format!("TERM={term}"));
    dir.write_config(&cfg).map_err(failed)
}

/// Ad-hoc machines (run, clone) are recorded under this resource kind.
pub(crate) const ADHOC: &str = "adhoc";

fn random_suffix() -> String {
    let mut b = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    hex::encode(b)
}

/// Copies what was appended to `path` since `pos` to `out`.
fn pump(path: &std::path::Path, pos: &mut u64, out: &mut dyn Write) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return;
    };
    if f.seek(SeekFrom::Start(*pos)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
        *pos += buf.len() as u64;
        let _ = out.write_all(&buf);
        let _ = out.flush();
    }
}

impl Engine {
    pub fn run(&mut self, opts: &RunOpts, progress: &dyn Progress) -> Result<RunOutcome> {
        crate::prespawn_supervisor(opts.driver.as_deref());
        let host = self.host()?;
        // The image: one already in the store, else a built-in source.
        let image = match host
            .images
            .get(&opts.image)
            .map_err(|e| EngineError::Failed(e.to_string()))?
        {
            Some(i) => i,
            None => {
                let src = moat_core::load::builtin_image(&opts.image).ok_or_else(|| {
                    EngineError::Failed(format!(
                        "no image '{}' in the store, and it is not a source moat can build; \
                         `moat image ls` lists images, `moat image import` adds one",
                        opts.image
                    ))
                })?;
                progress.event(&format!("==> ensure image {}", opts.image));
                host.images
                    .ensure(&opts.image, &src, &crate::apply::ImageProgress(progress))
                    .map_err(|e| EngineError::Failed(e.to_string()))?
            }
        };
        let name = opts
            .name
            .clone()
            .unwrap_or_else(|| format!("run-{}", random_suffix()));
        if let Some(why) =
            moat_core::naming::check_dns_label(&name, moat_core::naming::MAX_FULL_NAME_LEN)
        {
            return Err(EngineError::Failed(format!("machine name '{name}' {why}")));
        }
        let dname = opts.driver.as_deref().unwrap_or("native");
        if opts.tty.is_some() && dname != "native" {
            return Err(EngineError::Failed(format!(
                "run -t works with the native driver only, not '{dname}'"
            )));
        }
        if opts.tty.is_some() && opts.detach && opts.rm {
            return Err(EngineError::Failed(
                "run -t -d --rm: a detached terminal is for `moat console` later; \
                 drop --rm (then `moat destroy` it), or drop -d"
                    .into(),
            ));
        }
        let d = host.driver(dname)?;
        if d.observe(&host.ctx, &name)?.is_some() {
            return Err(EngineError::Failed(format!(
                "a machine named '{name}' exists; pick another --name or `moat destroy {name}`"
            )));
        }
        let command = if opts.command.is_empty() {
            let mut c = image.config.entrypoint.clone();
            c.extend(image.config.cmd.iter().cloned());
            if c.is_empty() {
                return Err(EngineError::Failed(format!(
                    "image '{}' has no entrypoint or cmd; give a command after --",
                    opts.image
                )));
            }
            c
        } else {
            opts.command.clone()
        };
        // The apply lock while the firewall and allocations change (apply,
        // destroy and other runs wait); released once the machine started.
        let lock = match &opts.domain {
            Some(_) if dname != "native" => {
                return Err(EngineError::Failed(format!(
                    "run --domain works with the native driver only, not '{dname}'"
                )))
            }
            Some(_) => Some(
                moat_state::ApplyLock::acquire(&self.cfg.root, Some(Duration::from_secs(60)))
                    .map_err(state_err)?,
            ),
            None => None,
        };
        let attached = match &opts.domain {
            Some(dom) => {
                let project = opts.project.as_deref().ok_or_else(|| {
                    EngineError::Failed(
                        "run --domain needs the project (give -f FILE or run it in the project folder)"
                            .into(),
                    )
                })?;
                Some(self.attach_adhoc(&host, project, dom, &name)?)
            }
            None => None,
        };
        let machine = Machine {
            description: format!("moat run {}", opts.image),
            cpus: opts.cpus,
            memory: opts.memory,
            disposable: opts.rm,
            command: Some(command),
            ..Machine::adhoc(&name, &image.name)
        };
        let machine = if dname == "qemu" {
            Machine {
                kind: moat_core::model::MachineType::Microvm,
                driver: "qemu".into(),
                ..machine
            }
        } else {
            machine
        };
        let machine = match &opts.domain {
            Some(dom) => Machine {
                domain: dom.clone(),
                network: moat_core::model::NetworkMode::Domain,
                ..machine
            },
            None => machine,
        };
        let (nic, bridge, hosts) = match attached {
            Some(a) => (Some(a.nic), Some(a.bridge), a.hosts),
            None => (None, None, vec![]),
        };
        let spec = MachineSpec {
            spec_hash: moat_core::spec::spec_hash(&machine, nic.as_ref()),
            machine,
            nic,
            bridge,
            hosts,
        };
        // A foreground `--rm` machine without a network lives as long as
        // this command: it needs no record in the state store (see
        // `unrecorded`). The others get one before anything is made.
        let state = if unrecorded(opts, dname) {
            None
        } else {
            let state = self.state()?;
            state
                .intend(ADHOC, &name, opts.domain.as_deref(), Some(&name))
                .map_err(state_err)?;
            Some(state)
        };
        let dir = MachineDir::new(host.ctx.root.join("machines").join(&name));
        let started = d
            .create(&host.ctx, &spec)
            .map_err(EngineError::from)
            .and_then(|_| match &opts.tty {
                Some(term) => with_terminal(&dir, term),
                None => Ok(()),
            })
            .and_then(|_| match &state {
                Some(state) => state.mark_done(ADHOC, &name).map_err(state_err),
                None => Ok(()),
            })
            .and_then(|_| d.start(&host.ctx, &name).map_err(EngineError::from));
        if let Err(e) = started {
            // Not kept: `--rm` asked for no machine afterwards (its root
            // would stay mounted), and a domain machine holds an allocation.
            if opts.rm || opts.domain.is_some() {
                let _ = d.destroy(&host.ctx, &name);
                if let Some(state) = &state {
                    let _ = self.release_adhoc(&host, state, &name, opts.project.as_deref());
                }
            }
            return Err(e);
        }
        drop(lock);
        if opts.detach {
            return Ok(RunOutcome {
                name,
                status: None,
                session: None,
            });
        }
        if opts.tty.is_some() {
            let session = match console_session(MachineDir::new(dir.dir.clone())) {
                Ok(session) => session,
                Err(e) => {
                    let _ = d.stop(&host.ctx, &name, Duration::from_secs(1));
                    if opts.rm {
                        let _ = d.destroy(&host.ctx, &name);
                        let _ = self.forget_run(&host, state.as_deref(), &name, opts);
                    }
                    return Err(EngineError::Failed(format!("{name}: {e}")));
                }
            };
            return Ok(RunOutcome {
                name,
                status: None,
                session: Some(session),
            });
        }
        if dname == "qemu" {
            let r = moat_qemu::microvm::follow(
                &host.ctx,
                &name,
                &mut std::io::stdout(),
                Duration::from_secs(120),
            );
            if opts.rm {
                d.destroy(&host.ctx, &name)?;
                self.forget_run(&host, state.as_deref(), &name, opts)?;
            }
            let status = r.map_err(|e| EngineError::Failed(e.to_string()))?;
            return Ok(RunOutcome {
                name,
                status: Some(status),
                session: None,
            });
        }
        let (mut out_pos, mut err_pos) = (0u64, 0u64);
        let mut stdout = std::io::stdout();
        let mut stderr = std::io::stderr();
        // The supervisor wakes us when PID 1's status changes (see
        // `machine::wait_change`); the timeout only paces the log relay.
        let mut sleep = Duration::from_millis(5);
        let t0 = Instant::now();
        let status = loop {
            pump(&dir.stdout_log(), &mut out_pos, &mut stdout);
            pump(&dir.stderr_log(), &mut err_pos, &mut stderr);
            match pid1_exit(&dir) {
                Some(Ok(code)) => break code,
                Some(Err(reason)) => {
                    if opts.rm {
                        let _ = d.destroy(&host.ctx, &name);
                        let _ = self.forget_run(&host, state.as_deref(), &name, opts);
                    }
                    return Err(EngineError::Failed(format!("{name}: {reason}")));
                }
                None => {}
            }
            moat_runtime::machine::wait_change(&dir, sleep);
            // Output relayed quickly at first (fast commands), then less often.
            if t0.elapsed() > Duration::from_millis(200) {
                sleep = Duration::from_millis(20);
            }
        };
        pump(&dir.stdout_log(), &mut out_pos, &mut stdout);
        pump(&dir.stderr_log(), &mut err_pos, &mut stderr);
        if opts.rm {
            d.destroy(&host.ctx, &name)?;
            self.forget_run(&host, state.as_deref(), &name, opts)?;
        }
        Ok(RunOutcome {
            name,
            status: Some(status),
            session: None,
        })
    }

    /// Ends a `run -t` whose terminal session ended: the machine stops with
    /// its PID 1 (a no-op if it did), and `--rm` removes it.
    pub fn finish_run(&self, opts: &RunOpts, name: &str) -> Result<()> {
        let host = self.host()?;
        let d = host.driver(opts.driver.as_deref().unwrap_or("native"))?;
        d.stop(&host.ctx, name, Duration::from_secs(10))?;
        if opts.rm {
            d.destroy(&host.ctx, name)?;
            let dname = opts.driver.as_deref().unwrap_or("native");
            if !unrecorded(opts, dname) {
                let state = self.state()?;
                self.forget_run(&host, Some(&state), name, opts)?;
            }
        }
        Ok(())
    }

    /// After `--rm` destroyed the machine: its record, and for a domain
    /// machine its allocation and firewall entries (under the apply lock).
    fn forget_run(
        &self,
        host: &crate::host::Host,
        state: Option<&moat_state::StateStore>,
        name: &str,
        opts: &RunOpts,
    ) -> Result<()> {
        // No record was made (`unrecorded`).
        let Some(state) = state else {
            return Ok(());
        };
        let _lock = match opts.domain {
            Some(_) => Some(
                moat_state::ApplyLock::acquire(&self.cfg.root, Some(Duration::from_secs(60)))
                    .map_err(state_err)?,
            ),
            None => None,
        };
        self.release_adhoc(host, state, name, opts.project.as_deref())
    }

    /// Names of ad-hoc machines (run, clone) of this root.
    pub(crate) fn adhoc_machines(&self) -> Result<std::collections::BTreeSet<String>> {
        if !self.cfg.root.join("state.db").exists() {
            return Ok(Default::default());
        }
        Ok(self
            .state()?
            .resources()
            .map_err(state_err)?
            .into_iter()
            .filter(|r| r.kind == ADHOC)
            .map(|r| r.name)
            .collect())
    }
}

/// Starts the supervisor of a coming `run` of the native driver ahead (see
/// `moat_runtime::machine::prespawn`), unless one is waiting already: its
/// start then overlaps the caller's own work. Unused, it just exits.
pub fn prespawn_supervisor(driver: Option<&str>) {
    if driver.unwrap_or("native") == "native" {
        if let Ok(sup) = moat_runtime::machine::find_supervisor() {
            moat_runtime::machine::prespawn(&sup);
        }
    }
}

/// Whether `run` makes no record in the state store: a foreground `--rm`
/// run of the native driver without a network. Such a machine lives as long
/// as the command (which destroys it), holds no allocation, and its driver
/// record marks it ad-hoc (`Machine::adhoc`), so a plan leaves it alone
/// while it runs. If the command is killed, what is left is a machine like
/// any other ad-hoc one: `moat ls` shows it and `moat destroy NAME` removes
/// it. This spares the run the store's open, three transactions and the
/// checkpoint at close, with their fsyncs: about 2 ms of `run --rm`.
fn unrecorded(opts: &RunOpts, driver: &str) -> bool {
    opts.rm && !opts.detach && opts.domain.is_none() && driver == "native"
}
