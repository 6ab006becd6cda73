//! Runs one parsed command. Each arm turns CLI arguments into engine calls and
//! prints the result; errors travel up as [`CliError`], which knows its exit code.

use crate::cli::{Cli, Command};
use crate::exit;
use crate::output::Output;
use moat_core::diag::Diagnostics;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Invalid project: the diagnostics say where and why.
    #[error("the project is invalid")]
    Invalid(Diagnostics),
    #[error("no project found in {0}")]
    NoProject(PathBuf),
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(moat_engine::EngineError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Other(String),
    /// An error the daemon reported (printed as the in-process one would be).
    #[error(transparent)]
    Remote(crate::client::RemoteError),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Invalid(_) | CliError::NoProject(_) | CliError::Exists(_) => exit::INVALID,
            CliError::Engine(e) => match e.kind() {
                moat_engine::ErrorKind::Invalid => exit::INVALID,
                moat_engine::ErrorKind::Locked => exit::LOCKED,
                moat_engine::ErrorKind::NotFound => exit::NOT_FOUND,
                moat_engine::ErrorKind::Failed => exit::FAILED,
            },
            CliError::NotFound(_) => exit::NOT_FOUND,
            CliError::Remote(r) => r.code,
            _ => exit::FAILED,
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            CliError::NoProject(_) => Some(
                "pass -f PATH (a moat.yml, an anklume.yml, or their folder), or run `moat init` to write a starter project"
                    .into(),
            ),
            CliError::Exists(_) => Some("pass --force to overwrite it".into()),
            CliError::Engine(e) => e.hint(),
            CliError::Remote(r) => r.hint.clone(),
            _ => None,
        }
    }
}

impl From<moat_engine::EngineError> for CliError {
    fn from(e: moat_engine::EngineError) -> Self {
        match e {
            moat_engine::EngineError::Invalid(d) => CliError::Invalid(d),
            other => CliError::Engine(other),
        }
    }
}

impl From<Diagnostics> for CliError {
    fn from(d: Diagnostics) -> Self {
        CliError::Invalid(d)
    }
}

/// The project path: `-f`, else ./moat.yml, else ./anklume.yml.
fn project_path(cli: &Cli) -> Result<PathBuf, CliError> {
    if let Some(f) = &cli.file {
        return Ok(f.clone());
    }
    for name in ["moat.yml", "anklume.yml"] {
        let p = Path::new(name);
        if p.exists() {
            return Ok(PathBuf::from("."));
        }
    }
    Err(CliError::NoProject(
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    ))
}

pub(crate) fn engine(cli: &Cli) -> Result<moat_engine::Engine, CliError> {
    Ok(moat_engine::Engine::open(moat_engine::Config::for_root(
        &cli.root,
    ))?)
}

/// `moat [GLOBAL OPTIONS] run ...` of the native driver, judged from the raw
/// arguments: its warm supervisor starts before the command line is parsed
/// (about 0.5 ms of clap building and checking the whole command tree), so
/// that even that overlaps the supervisor's start, the longest step of a
/// `run --rm`. A wrong guess costs nothing but a supervisor that exits
/// unused with this process; `Command::Run` asks for one again (kept).
pub fn prespawn_early(args: impl IntoIterator<Item = std::ffi::OsString>) {
    if let Some(driver) = run_driver(args) {
        moat_engine::prespawn_supervisor(driver.as_deref());
    }
}

/// `Some(driver)` when `args` (without argv[0]) look like a `run`.
fn run_driver(args: impl IntoIterator<Item = std::ffi::OsString>) -> Option<Option<String>> {
    let mut args = args.into_iter();
    loop {
        let a = args.next()?.into_string().ok()?;
        match a.as_str() {
            "-f" | "--file" | "--root" | "--color" => {
                args.next()?;
            }
            "run" => break,
            _ if a.starts_with('-') => {}
            _ => return None,
        }
    }
    let mut driver = None;
    while let Some(a) = args.next() {
        let Ok(a) = a.into_string() else { break };
        if a == "--" {
            break;
        }
        if a == "--driver" {
            driver = args.next().and_then(|d| d.into_string().ok());
        } else if let Some(d) = a.strip_prefix("--driver=") {
            driver = Some(d.to_string());
        }
    }
    Some(driver)
}

pub fn dispatch(cli: &Cli, out: &Output) -> Result<u8, CliError> {
    if let Some(code) = crate::client::route(cli, out)? {
        return Ok(code);
    }
    match &cli.command {
        Command::Daemon(a) => crate::daemon::run(cli, out, a),
        Command::Events(a) => crate::daemon::events(cli, out, a),
        Command::Validate(a) => {
            let path = project_path(cli)?;
            let eng = moat_engine::Engine::open_readonly(moat_engine::Config::for_root(&cli.root))?;
            let checked = eng.check(&path)?;
            out.diagnostics(&checked.warnings);
            if a.json {
                out.json(&serde_json::json!({
                    "valid": true,
                    "warnings": checked.warnings,
                    "project": checked.resolved,
                }))?;
            } else {
                let p = &checked.resolved.project;
                out.info(&format!(
                    "{}: valid ({} domains, {} machines, {} policies, {} warnings)",
                    path.display(),
                    p.enabled_domains().count(),
                    p.machines().count(),
                    p.policies.len(),
                    checked.warnings.0.len()
                ));
            }
            Ok(exit::OK)
        }
        Command::Plan(a) => {
            let path = project_path(cli)?;
            let eng = moat_engine::Engine::open_readonly(moat_engine::Config::for_root(&cli.root))?;
            let checked = eng.check(&path)?;
            out.diagnostics(&checked.warnings);
            let opts = moat_engine::PlanOpts {
                prune: a.prune,
                domain: a.domain.clone(),
            };
            let report = eng.plan(&checked, &opts)?;
            if a.json {
                out.json(&report)?;
            } else {
                out.data(&report.to_string());
            }
            Ok(exit::OK)
        }
        Command::Apply(a) => {
            let path = project_path(cli)?;
            let mut eng = engine(cli)?;
            let opts = moat_engine::ApplyOpts {
                prune: a.prune,
                domain: a.domain.clone(),
                dry_run: a.dry_run,
                jobs: a.jobs.max(1),
                wait: a.wait.map(std::time::Duration::from_secs),
            };
            let progress = Progress { out, quiet: a.json };
            let report = eng.apply(&path, &opts, &progress)?;
            if a.json {
                out.json(&report)?;
            } else {
                out.data(&report.to_string());
            }
            Ok(if report.failed() {
                exit::FAILED
            } else {
                exit::OK
            })
        }
        Command::Status(a) => {
            let eng = moat_engine::Engine::open_readonly(moat_engine::Config::for_root(&cli.root))?;
            let path = project_path(cli).ok();
            let status = eng.status(path.as_deref())?;
            if a.json {
                out.json(&status)?;
            } else {
                out.data(&status.to_string());
            }
            Ok(exit::OK)
        }
        Command::Destroy(a) => {
            let mut eng = engine(cli)?;
            let target = if a.all {
                moat_engine::DestroyTarget::All
            } else if let Some(d) = &a.domain {
                moat_engine::DestroyTarget::Domain(d.clone())
            } else if let Some(m) = &a.machine {
                moat_engine::DestroyTarget::Machine(m.clone())
            } else {
                return Err(CliError::Other(
                    "say what to destroy: a MACHINE, --domain D or --all".into(),
                ));
            };
            let project = project_path(cli).ok();
            let report = eng.destroy(
                project.as_deref(),
                &target,
                a.force,
                &Progress { out, quiet: false },
            )?;
            out.data(&report.to_string());
            Ok(exit::OK)
        }
        Command::Init(a) => {
            let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from("."));
            let path = crate::init::write_starter(&dir, a.force)?;
            out.info(&format!(
                "wrote {}; next: `moat validate -f {}` then `moat plan -f {}`",
                path.display(),
                dir.display(),
                dir.display()
            ));
            Ok(exit::OK)
        }
        Command::Start(a) => {
            let eng = engine(cli)?;
            // Declared machines start from the project (NIC, limits); ad-hoc
            // ones (run -d, clones) as they were created.
            match project_path(cli) {
                Ok(path) if eng.is_declared(&path, &a.machine) => {
                    eng.start_machine(&path, &a.machine)?
                }
                _ => eng.start_existing(&a.machine)?,
            }
            out.info(&format!("started {}", a.machine));
            Ok(exit::OK)
        }
        Command::Stop(a) => {
            engine(cli)?.stop_machine(&a.machine, std::time::Duration::from_secs(a.timeout))?;
            out.info(&format!("stopped {}", a.machine));
            Ok(exit::OK)
        }
        Command::Restart(a) => {
            let eng = engine(cli)?;
            eng.stop_machine(&a.machine, std::time::Duration::from_secs(a.timeout))?;
            match project_path(cli) {
                Ok(path) if eng.is_declared(&path, &a.machine) => {
                    eng.start_machine(&path, &a.machine)?
                }
                _ => eng.start_existing(&a.machine)?,
            }
            out.info(&format!("restarted {}", a.machine));
            Ok(exit::OK)
        }
        Command::Exec(a) => {
            if a.tty || a.interactive {
                let eng = engine(cli)?;
                return crate::tty::exec(&eng, &a.machine, &a.command, a.tty);
            }
            let r = engine(cli)?.exec(&a.machine, &a.command)?;
            use std::io::Write;
            let _ = std::io::stdout().write_all(&r.stdout);
            let _ = std::io::stderr().write_all(&r.stderr);
            Ok(r.status.clamp(0, 255) as u8)
        }
        Command::Logs(a) => {
            let src = engine(cli)?.logs(&a.machine)?;
            let read_err = |e| CliError::Io {
                what: format!("cannot read {}", src.describe()),
                source: e,
            };
            let bytes = src.read_all().map_err(read_err)?;
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let from = a.tail.map(|n| lines.len().saturating_sub(n)).unwrap_or(0);
            for l in &lines[from..] {
                out.data(l);
            }
            if a.follow {
                // Print what is appended, until interrupted (a rotated log is
                // read again from its start).
                use std::io::Write;
                let mut pos = bytes.len() as u64;
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    let Ok((buf, end)) = src.read_since(pos) else {
                        continue;
                    };
                    pos = end;
                    if !buf.is_empty() {
                        let mut o = std::io::stdout().lock();
                        let _ = o.write_all(&buf);
                        let _ = o.flush();
                    }
                }
            }
            Ok(exit::OK)
        }
        Command::Network(cmd) => {
            let path = project_path(cli)?;
            let eng = moat_engine::Engine::open_readonly(moat_engine::Config::for_root(&cli.root))?;
            let checked = eng.check(&path)?;
            out.diagnostics(&checked.warnings);
            match cmd {
                crate::cli::NetworkCmd::Rules => {
                    let rules = eng.rules(&checked);
                    out.data(&rules.script());
                    out.info(&rules.summary());
                }
                crate::cli::NetworkCmd::Status { json } => {
                    let st = eng.network_status(&checked)?;
                    if *json {
                        out.json(&st)?;
                    } else {
                        out.data(&st.to_string());
                    }
                }
            }
            Ok(exit::OK)
        }
        Command::Shell(a) => crate::tty::exec(&engine(cli)?, &a.machine, &[], true),
        Command::Run(a) => {
            // First thing: the supervisor's start then overlaps all of ours.
            moat_engine::prespawn_supervisor(a.driver.as_deref());
            let mut eng = engine(cli)?;
            let opts = moat_engine::RunOpts {
                image: a.image.clone(),
                name: a.name.clone(),
                command: a.command.clone(),
                rm: a.rm,
                detach: a.detach,
                driver: a.driver.clone(),
                domain: a.domain.clone(),
                project: match &a.domain {
                    Some(_) => Some(project_path(cli)?),
                    None => None,
                },
                tty: a
                    .tty
                    .then(|| std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into())),
                ..Default::default()
            };
            let r = eng.run(&opts, &Progress { out, quiet: false })?;
            if let Some(mut session) = r.session {
                let relayed = crate::tty::relay(&mut session);
                // The machine goes (--rm) whatever the relay says.
                let finished = eng.finish_run(&opts, &r.name);
                let code = relayed.map_err(|e| CliError::Io {
                    what: format!("relaying the terminal of {}", r.name),
                    source: e,
                })?;
                finished?;
                return Ok(code.clamp(0, 255) as u8);
            }
            match r.status {
                None => {
                    out.data(&r.name);
                    Ok(exit::OK)
                }
                Some(code) => Ok(code.clamp(0, 255) as u8),
            }
        }
        Command::Clone(a) => {
            let t = std::time::Instant::now();
            let project = project_path(cli).ok();
            engine(cli)?.clone_machine(project.as_deref(), &a.source, &a.new)?;
            out.info(&format!(
                "cloned {} to {} in {:.1} ms; `moat start {}` runs it",
                a.source,
                a.new,
                t.elapsed().as_secs_f64() * 1000.0,
                a.new
            ));
            Ok(exit::OK)
        }
        Command::Snapshot(cmd) => {
            use crate::cli::SnapshotCmd;
            let eng = engine(cli)?;
            match cmd {
                SnapshotCmd::Create { machine, name } => {
                    let name = name.clone().unwrap_or_else(|| {
                        let secs = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0);
                        format!("snap-{secs}")
                    });
                    eng.snapshot_create(machine, &name)?;
                    out.data(&name);
                }
                SnapshotCmd::Ls { machine, json } => {
                    let snaps = eng.snapshots(machine)?;
                    if *json {
                        out.json(&snaps)?;
                    } else {
                        for s in &snaps {
                            out.data(&s.name);
                        }
                    }
                }
                SnapshotCmd::Restore { machine, name } => {
                    eng.snapshot_restore(machine, name)?;
                    out.info(&format!("{machine} restored to snapshot {name}"));
                }
                SnapshotCmd::Rm { machine, name } => {
                    eng.snapshot_remove(machine, name)?;
                    out.info(&format!("removed snapshot {name} of {machine}"));
                }
            }
            Ok(exit::OK)
        }
        Command::Image(cmd) => crate::image::run(cli, out, cmd),
        Command::Kernel(cmd) => crate::kernel::run(cli, out, cmd),
        Command::Import(cmd) => crate::import::run(out, &cli.root, cmd),
        Command::Console(a) => crate::console::run(cli, out, a),
        Command::Completions { .. } | Command::Man => Ok(exit::OK),
    }
}

/// Renders engine progress events on stderr.
pub struct Progress<'a> {
    pub(crate) out: &'a Output,
    pub(crate) quiet: bool,
}

impl moat_engine::Progress for Progress<'_> {
    fn event(&self, msg: &str) {
        if !self.quiet {
            self.out.info(msg);
        }
    }
    fn warnings(&self, ds: &Diagnostics) {
        self.out.diagnostics(ds);
    }
}

#[cfg(test)]
mod early_tests {
    use super::run_driver;

    fn args(a: &[&str]) -> Vec<std::ffi::OsString> {
        a.iter().map(Into::into).collect()
    }

    #[test]
    fn a_run_is_recognised_behind_global_options() {
        assert_eq!(run_driver(args(&["run", "--rm", "busybox"])), Some(None));
        assert_eq!(
            run_driver(args(&["--root", "/r", "-f", "run", "-q", "run", "busybox"])),
            Some(None)
        );
        assert_eq!(
            run_driver(args(&["run", "--driver", "qemu", "img"])),
            Some(Some("qemu".into()))
        );
        assert_eq!(
            run_driver(args(&[
                "run",
                "--driver=native",
                "img",
                "--",
                "--driver",
                "x"
            ])),
            Some(Some("native".into()))
        );
    }

    #[test]
    fn other_commands_are_not_a_run() {
        assert_eq!(run_driver(args(&["apply"])), None);
        assert_eq!(run_driver(args(&["-f", "run", "apply", "run"])), None);
        assert_eq!(run_driver(args(&["--root"])), None);
        assert_eq!(run_driver(args(&[])), None);
    }
}
