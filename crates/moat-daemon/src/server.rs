//! The server: accepts connections on the socket, one thread each; reads a
//! request, identifies the peer, parses ([`crate::api::parse`]), authorizes
//! ([`crate::auth::Policy`]) and executes the action here, in one place.
//!
//! Engine calls block (SQLite, host commands, threads); a thread per
//! connection runs them directly, and long streams (events, logs, apply
//! progress) are plain writes on that thread.

use crate::api::{self, Action, ApiError, Format, ProjectArg};
use crate::auth::{Need, Peer, Policy};
use crate::events::{Bus, EventKind};
use crate::http::{self, Request};
use moat_engine::{Config, Engine, EngineError, ErrorKind};
use serde::Serialize;
use serde_json::json;
use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The header carrying a project's warnings (compact JSON, ASCII only).
pub const WARNINGS_HEADER: &str = "Moat-Warnings";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another moat daemon already answers on {0}")]
    AlreadyRunning(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("group '{0}' does not exist")]
    NoSuchGroup(String),
    #[error("{0}")]
    Engine(#[from] EngineError),
}

impl DaemonError {
    pub fn hint(&self) -> Option<String> {
        match self {
            DaemonError::AlreadyRunning(_) => {
                Some("stop it first, or give this one another root (--root)".into())
            }
            DaemonError::NoSuchGroup(g) => Some(format!(
                "create it (`groupadd --system {g}`) or pass another --group"
            )),
            _ => None,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// How a daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub root: PathBuf,
    /// The project served when a request names none.
    pub project: Option<PathBuf>,
    pub policy: Policy,
    /// How often to look for drift.
    pub interval: Duration,
    /// Socket path (default: `<run_dir>/moat.sock`).
    pub socket: Option<PathBuf>,
}

impl DaemonConfig {
    pub fn engine_config(&self) -> Config {
        Config::for_root(&self.root)
    }
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| socket_path(&self.engine_config()))
    }
}

/// Where a root's daemon listens.
pub fn socket_path(cfg: &Config) -> PathBuf {
    cfg.run_dir.join("moat.sock")
}

/// One running daemon: configuration, the event bus, and counters.
pub struct Daemon {
    pub cfg: DaemonConfig,
    pub bus: Bus,
    started: Instant,
    /// Last machine states seen (for started/stopped/crashed events).
    pub(crate) machines: Mutex<std::collections::BTreeMap<String, String>>,
}

impl Daemon {
    pub fn new(cfg: DaemonConfig) -> Arc<Daemon> {
        Arc::new(Daemon {
            cfg,
            bus: Bus::default(),
            started: Instant::now(),
            machines: Mutex::default(),
        })
    }

    fn engine_ro(&self) -> Result<Engine, EngineError> {
        Engine::open_readonly(self.cfg.engine_config())
    }

    fn engine_rw(&self) -> Result<Engine, EngineError> {
        Engine::open(self.cfg.engine_config())
    }

    /// The project a request is about: its own, else the daemon's.
    /// An empty path means "no project" (the CLI outside a project folder).
    fn project(&self, p: &ProjectArg) -> Option<PathBuf> {
        match &p.project {
            Some(x) if x.as_os_str().is_empty() => None,
            Some(x) => Some(x.clone()),
            None => self.cfg.project.clone(),
        }
    }

    fn need_project(&self, p: &ProjectArg) -> Result<PathBuf, Failure> {
        self.project(p).ok_or_else(|| Failure {
            status: 400,
            body: Box::new(ErrorBody::plain(
                "no project: the request names none and the daemon serves none",
                "no_project",
                2,
                Some("pass \"project\": \"/abs/path\" or start the daemon with --project DIR"),
            )),
        })
    }

    /// Handle one connection, peer read from the socket.
    pub fn handle(self: &Arc<Self>, stream: UnixStream) {
        let peer = match Peer::of(&stream) {
            Ok(p) => p,
            Err(_) => return,
        };
        self.handle_as(stream, peer);
    }

    /// Handle one connection for a given peer (tests inject peers).
    pub fn handle_as(self: &Arc<Self>, stream: UnixStream, peer: Peer) {
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        });
        let mut conn = stream;
        let req = match http::read_request(&mut reader) {
            Ok(r) => r,
            Err(http::HttpError::Closed) => return,
            Err(e) => {
                let _ = send_error(
                    &mut conn,
                    400,
                    &ErrorBody::plain(&e.to_string(), "bad_request", 2, None),
                );
                return;
            }
        };
        let (route, action) = match api::parse(&req) {
            Ok(x) => x,
            Err(e) => {
                let code = e.status();
                let reason = match e {
                    ApiError::NotFound { .. } => "not_found",
                    ApiError::MethodNotAllowed { .. } => "method_not_allowed",
                    ApiError::BadRequest(_) => "bad_request",
                };
                let _ = send_error(
                    &mut conn,
                    code,
                    &ErrorBody::plain(
                        &e.to_string(),
                        reason,
                        2,
                        Some("GET /v1/health; docs/daemon.md lists the endpoints"),
                    ),
                );
                return;
            }
        };
        // Naming a project other than the daemon's makes the daemon read
        // files as root: only those who may change things may do that.
        let mut need = route.need;
        if let Some(p) = action.project() {
            if !p.as_os_str().is_empty() && Some(p) != self.cfg.project.as_deref() {
                need = Need::Write;
            }
        }
        if let Err(r) = self.cfg.policy.check(&peer, need) {
            let body = json!({
                "error": format!("forbidden: {} {}", req.method, req.path),
                "reason": r.0,
                "exit_code": 1,
            });
            let _ = http::write_response(
                &mut conn,
                403,
                "application/json",
                &[],
                pretty(&body).as_bytes(),
            );
            return;
        }
        if let Err(f) = self.execute(action, &req, &peer, &mut conn, reader) {
            let _ = send_error(&mut conn, f.status, &f.body);
        }
    }

    /// Run one action and write its response. The one place actions act.
    fn execute(
        self: &Arc<Self>,
        action: Action,
        _req: &Request,
        peer: &Peer,
        conn: &mut UnixStream,
        reader: BufReader<UnixStream>,
    ) -> Result<(), Failure> {
        match action {
            Action::Health => {
                let access = if self.cfg.policy.check(peer, Need::Write).is_ok() {
                    "write"
                } else {
                    "read"
                };
                let body = json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "root": self.cfg.root,
                    "project": self.cfg.project,
                    "pid": std::process::id(),
                    "uptime_ms": self.started.elapsed().as_millis() as u64,
                    "peer": peer,
                    "access": access,
                    "event_subscribers": self.bus.subscribers(),
                });
                send_json(conn, &body, None)
            }
            Action::Validate(p, fmt) => {
                let path = self.need_project(&p)?;
                let checked = self.engine_ro()?.check(&path)?;
                let w = Some(&checked.warnings);
                match fmt {
                    Format::Json => send_json(
                        conn,
                        &json!({
                            "valid": true,
                            "warnings": checked.warnings,
                            "project": checked.resolved,
                        }),
                        w,
                    ),
                    Format::Text => {
                        let pr = &checked.resolved.project;
                        send_text(
                            conn,
                            &format!(
                                "valid ({} domains, {} machines, {} policies, {} warnings)",
                                pr.enabled_domains().count(),
                                pr.machines().count(),
                                pr.policies.len(),
                                checked.warnings.0.len()
                            ),
                            w,
                        )
                    }
                }
            }
            Action::Plan(b, fmt) => {
                let path = self.need_project(&ProjectArg {
                    project: b.project.clone(),
                })?;
                let eng = self.engine_ro()?;
                let checked = eng.check(&path)?;
                let report = eng.plan(
                    &checked,
                    &moat_engine::PlanOpts {
                        prune: b.prune,
                        domain: b.domain.clone(),
                    },
                )?;
                let w = Some(&checked.warnings);
                match fmt {
                    Format::Json => send_json(conn, &report, w),
                    Format::Text => send_text(conn, &report.to_string(), w),
                }
            }
            Action::Status(p, fmt) => {
                let status = self.engine_ro()?.status(self.project(&p).as_deref())?;
                match fmt {
                    Format::Json => send_json(conn, &status, None),
                    Format::Text => send_text(conn, &status.to_string(), None),
                }
            }
            Action::Apply(b) => {
                let path = self.need_project(&ProjectArg {
                    project: b.project.clone(),
                })?;
                let opts = moat_engine::ApplyOpts {
                    prune: b.prune,
                    domain: b.domain.clone(),
                    dry_run: b.dry_run,
                    jobs: b.jobs.unwrap_or(4).max(1),
                    wait: b.wait.map(Duration::from_secs),
                };
                self.stream_op(conn, |progress| {
                    self.apply(&path, &opts, progress).map(|r| {
                        json!({
                            "failed": r.failed(),
                            "text": r.to_string(),
                            "pretty": pretty(&r),
                            "report": r,
                        })
                    })
                })
            }
            Action::Destroy(b) => {
                let target = if b.all {
                    moat_engine::DestroyTarget::All
                } else if let Some(d) = &b.domain {
                    moat_engine::DestroyTarget::Domain(d.clone())
                } else {
                    moat_engine::DestroyTarget::Machine(b.machine.clone().unwrap_or_default())
                };
                let project = self.project(&ProjectArg {
                    project: b.project.clone(),
                });
                self.stream_op(conn, |progress| {
                    let mut eng = self.engine_rw()?;
                    let r = eng.destroy(project.as_deref(), &target, b.force, progress)?;
                    for m in &r.destroyed {
                        self.bus.publish(EventKind::MachineRemoved { machine: m.clone() });
                    }
                    Ok(json!({"failed": false, "text": r.to_string(), "pretty": pretty(&r), "report": r}))
                })
            }
            Action::Reconcile(p) => {
                let path = self.need_project(&p)?;
                let r = crate::reconcile::pass(self, &path)?;
                send_json(conn, &r, None)
            }
            Action::Start { machine, project } => {
                self.start(&machine, self.project(&project).as_deref())?;
                send_json(conn, &json!({"machine": machine, "done": "started"}), None)
            }
            Action::Stop { machine, timeout } => {
                self.engine_rw()?
                    .stop_machine(&machine, Duration::from_secs(timeout))?;
                self.note_state(&machine, "stopped");
                send_json(conn, &json!({"machine": machine, "done": "stopped"}), None)
            }
            Action::Restart {
                machine,
                timeout,
                project,
            } => {
                self.engine_rw()?
                    .stop_machine(&machine, Duration::from_secs(timeout))?;
                self.note_state(&machine, "stopped");
                self.start(&machine, self.project(&project).as_deref())?;
                send_json(
                    conn,
                    &json!({"machine": machine, "done": "restarted"}),
                    None,
                )
            }
            Action::Exec { machine, command } => {
                let r = self.engine_rw()?.exec(&machine, &command)?;
                send_json(conn, &exec_json(&r), None)
            }
            Action::ExecStream {
                machine,
                command,
                tty,
            } => crate::exec::stream(self, &machine, &command, tty, conn, reader),
            Action::Logs {
                machine,
                tail,
                follow,
            } => self.logs(conn, &machine, tail, follow),
            Action::Snapshots { machine } => {
                let s = self.engine_ro()?.snapshots(&machine)?;
                send_json(conn, &s, None)
            }
            Action::SnapshotCreate { machine, name } => {
                let name =
                    name.unwrap_or_else(|| format!("snap-{}", crate::events::now_ms() / 1000));
                let s = self.engine_rw()?.snapshot_create(&machine, &name)?;
                send_json(conn, &s, None)
            }
            Action::SnapshotRestore { machine, snapshot } => {
                self.engine_rw()?.snapshot_restore(&machine, &snapshot)?;
                send_json(
                    conn,
                    &json!({"machine": machine, "snapshot": snapshot, "done": "restored"}),
                    None,
                )
            }
            Action::SnapshotRemove { machine, snapshot } => {
                self.engine_rw()?.snapshot_remove(&machine, &snapshot)?;
                send_json(
                    conn,
                    &json!({"machine": machine, "snapshot": snapshot, "done": "removed"}),
                    None,
                )
            }
            Action::Images => {
                let store = self.images()?;
                let list = store.list().map_err(image_failure)?;
                send_json(conn, &list, None)
            }
            Action::ImageBuild(b) => {
                let src = moat_core::load::builtin_image(&b.source).ok_or_else(|| Failure {
                    status: 400,
                    body: Box::new(ErrorBody::plain(
                        &format!("'{}' is not a source moat can build", b.source),
                        "bad_request",
                        2,
                        Some("use busybox, debian/<suite> or ubuntu/<suite>; files are imported (`moat image import`, POST /v1/images/import)"),
                    )),
                })?;
                let name = b.name.unwrap_or_else(|| b.source.clone());
                let store = self.images()?;
                self.stream_lines(conn, |sink| {
                    let img = store
                        .build(&name, &src, &ImageLines(sink))
                        .map_err(image_failure)?;
                    Ok(json!({
                        "failed": false,
                        "text": format!("built {} ({}, {} bytes)", img.name, img.id, img.size),
                        "image": img,
                    }))
                })
            }
            Action::ImageImport(b) => {
                let src = import_source(&b.path, b.kind.as_deref())?;
                let store = self.images()?;
                self.stream_lines(conn, |sink| {
                    let img = store
                        .import(&b.name, &src, &ImageLines(sink))
                        .map_err(image_failure)?;
                    Ok(json!({
                        "failed": false,
                        "text": format!("imported {} ({}, {} layers)", img.name, img.id, img.layers.len()),
                        "image": img,
                    }))
                })
            }
            Action::ImageRemove { name } => {
                self.images()?.remove(&name).map_err(image_failure)?;
                send_json(conn, &json!({"image": name, "done": "removed"}), None)
            }
            Action::ImageGc => {
                let r = self.images()?.gc().map_err(image_failure)?;
                send_json(conn, &r, None)
            }
            Action::Events => self.events(conn),
        }
    }

    fn images(&self) -> Result<moat_image::ImageStore, Failure> {
        moat_image::ImageStore::open(&self.cfg.root).map_err(image_failure)
    }

    /// Apply with events; used by the endpoint and by auto-reconciliation.
    pub(crate) fn apply(
        &self,
        path: &Path,
        opts: &moat_engine::ApplyOpts,
        progress: &dyn moat_engine::Progress,
    ) -> Result<moat_engine::ApplyReport, EngineError> {
        let project = path.display().to_string();
        self.bus.publish(EventKind::ApplyStarted {
            project: project.clone(),
        });
        let fwd = BusProgress {
            bus: &self.bus,
            inner: progress,
        };
        let r = self.engine_rw().and_then(|mut e| e.apply(path, opts, &fwd));
        match &r {
            Ok(rep) => self.bus.publish(EventKind::ApplyFinished {
                project,
                failed: rep.failed(),
            }),
            Err(e) => self.bus.publish(EventKind::ApplyError {
                project,
                error: e.to_string(),
            }),
        }
        r
    }

    fn start(&self, machine: &str, project: Option<&Path>) -> Result<(), EngineError> {
        let eng = self.engine_rw()?;
        match project {
            Some(p) if eng.is_declared(p, machine) => eng.start_machine(p, machine)?,
            _ => eng.start_existing(machine)?,
        }
        self.note_state(machine, "running");
        Ok(())
    }

    /// Record a state change this daemon caused, and say so on the bus.
    fn note_state(&self, machine: &str, state: &str) {
        let mut m = self.machines.lock().unwrap_or_else(|p| p.into_inner());
        let old = m.insert(machine.to_string(), state.to_string());
        if old.as_deref() != Some(state) {
            self.bus.publish(match state {
                "running" => EventKind::MachineStarted {
                    machine: machine.into(),
                },
                _ => EventKind::MachineStopped {
                    machine: machine.into(),
                },
            });
        }
    }

    /// A streamed operation: progress lines, then one `result` or `error` line.
    fn stream_op(
        &self,
        conn: &mut UnixStream,
        op: impl FnOnce(&dyn moat_engine::Progress) -> Result<serde_json::Value, EngineError>,
    ) -> Result<(), Failure> {
        self.stream_lines(conn, |sink| op(sink).map_err(Failure::from))
    }

    /// Progress lines, then one `result` line (the op's value) or `error` line.
    fn stream_lines(
        &self,
        conn: &mut UnixStream,
        op: impl FnOnce(&LineSink) -> Result<serde_json::Value, Failure>,
    ) -> Result<(), Failure> {
        let _ = http::start_stream(conn, 200, "application/x-ndjson", &[]);
        let sink = LineSink {
            conn: Mutex::new(conn.try_clone().ok()),
        };
        let last = match op(&sink) {
            Ok(mut v) => {
                v["type"] = json!("result");
                v
            }
            Err(Failure { mut body, .. }) => {
                body.type_ = Some("error");
                serde_json::to_value(&*body).unwrap_or_default()
            }
        };
        sink.line(&last);
        Ok(())
    }

    fn logs(
        &self,
        conn: &mut UnixStream,
        machine: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<(), Failure> {
        let src = self.engine_ro()?.logs(machine)?;
        let text = src
            .read_all()
            .map_err(|e| Failure::internal(&format!("cannot read {}: {e}", src.describe())))?;
        let mut start = 0;
        if let Some(n) = tail {
            // Last n lines: a trailing newline ends the last line, not a new one.
            let body = text.strip_suffix(b"\n").unwrap_or(&text);
            let mut seen = 0;
            start = 0;
            for (i, b) in body.iter().enumerate().rev() {
                if *b == b'\n' {
                    seen += 1;
                    if seen == n {
                        start = i + 1;
                        break;
                    }
                }
            }
            if n == 0 {
                start = text.len();
            }
        }
        http::start_stream(conn, 200, "text/plain; charset=utf-8", &[])
            .map_err(|_| Failure::gone())?;
        if conn.write_all(&text[start..]).is_err() || !follow {
            return Ok(());
        }
        let mut pos = text.len() as u64;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            if peer_closed(conn) {
                return Ok(());
            }
            let Ok((buf, end)) = src.read_since(pos) else {
                continue;
            };
            pos = end;
            if !buf.is_empty() && conn.write_all(&buf).is_err() {
                return Ok(());
            }
        }
    }

    fn events(&self, conn: &mut UnixStream) -> Result<(), Failure> {
        let rx = self.bus.subscribe();
        http::start_stream(conn, 200, "application/x-ndjson", &[]).map_err(|_| Failure::gone())?;
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(ev) => {
                    let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                    line.push(b'\n');
                    if conn.write_all(&line).is_err() {
                        return Ok(());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if peer_closed(conn) {
                        return Ok(());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }
}

/// Whether the other end closed (a zero-length peek without blocking).
pub(crate) fn peer_closed(conn: &UnixStream) -> bool {
    use std::os::unix::io::AsRawFd;
    let mut b = [0u8; 1];
    // SAFETY: recv into a valid 1-byte buffer on an open fd; MSG_PEEK leaves
    // data in place and MSG_DONTWAIT keeps it from blocking.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n == 0 {
        return true;
    }
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        );
    }
    false
}

/// Writes progress as JSON lines on the connection (ignoring a gone client:
/// the operation finishes anyway, as it would for a CLI killed mid-apply).
struct LineSink {
    conn: Mutex<Option<UnixStream>>,
}

impl LineSink {
    fn line(&self, v: &serde_json::Value) {
        let mut g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.as_mut() {
            let mut s = serde_json::to_vec(v).unwrap_or_default();
            s.push(b'\n');
            if c.write_all(&s).is_err() {
                *g = None;
            }
        }
    }
}

impl moat_engine::Progress for LineSink {
    fn event(&self, msg: &str) {
        self.line(&json!({"type": "progress", "message": msg}));
    }
    fn warnings(&self, ds: &moat_core::diag::Diagnostics) {
        self.line(&json!({"type": "warnings", "diagnostics": ds}));
    }
}

/// The image store's progress as stream lines: steps are `progress` lines
/// (as apply's), tool output and byte counts `output` lines.
struct ImageLines<'a>(&'a LineSink);

impl moat_image::Progress for ImageLines<'_> {
    fn step(&self, message: &str) {
        self.0
            .line(&json!({"type": "progress", "message": message}));
    }
    fn output(&self, line: &str) {
        self.0.line(&json!({"type": "output", "line": line}));
    }
    fn bytes(&self, label: &str, done: u64, total: Option<u64>) {
        self.0
            .line(&json!({"type": "bytes", "label": label, "done": done, "total": total}));
    }
}

/// An import source from the request, as `moat image import` makes it:
/// `oci:REF`, else an absolute path whose kind is given or detected.
fn import_source(path: &str, kind: Option<&str>) -> Result<moat_core::model::ImageSource, Failure> {
    use moat_core::model::ImageSource;
    if let Some(r) = path.strip_prefix("oci:") {
        return Ok(ImageSource::Oci {
            reference: r.into(),
        });
    }
    let p = Path::new(path);
    let meta = std::fs::metadata(p).map_err(|e| Failure {
        status: 404,
        body: Box::new(ErrorBody::plain(
            &format!("cannot read {path}: {e}"),
            "not_found",
            4,
            Some("give a path that exists on the daemon's host"),
        )),
    })?;
    let kind = match kind {
        Some(k) => k.to_string(),
        None if meta.is_dir() && p.join("index.json").exists() => "oci-layout".into(),
        None if meta.is_dir() => "folder".into(),
        None => detect_archive(p).into(),
    };
    let path = path.to_string();
    Ok(match kind.as_str() {
        "tarball" => ImageSource::Tarball { path },
        "folder" => ImageSource::Folder { path },
        "oci-layout" => ImageSource::OciLayout { path },
        "oci-archive" => ImageSource::OciArchive { path },
        "docker-archive" => ImageSource::DockerArchive { path },
        k => {
            return Err(Failure {
                status: 400,
                body: Box::new(ErrorBody::plain(
                    &format!("kind '{k}' is not an import kind"),
                    "bad_request",
                    2,
                    Some("use tarball, folder, oci-layout, oci-archive or docker-archive, or leave kind out"),
                )),
            })
        }
    })
}

/// An uncompressed tar holding `index.json` is an OCI archive, one holding
/// `manifest.json` a docker archive; anything else a rootfs tarball.
fn detect_archive(path: &Path) -> &'static str {
    let Ok(f) = std::fs::File::open(path) else {
        return "tarball";
    };
    let mut ar = tar::Archive::new(f);
    if let Ok(entries) = ar.entries() {
        for e in entries.take(64).flatten() {
            let name = e
                .path()
                .map(|p| p.to_string_lossy().trim_start_matches("./").to_string());
            match name.as_deref() {
                Ok("index.json") | Ok("oci-layout") => return "oci-archive",
                Ok("manifest.json") => return "docker-archive",
                _ => {}
            }
        }
    }
    "tarball"
}

/// Forwards progress to a sink and to the event bus.
struct BusProgress<'a> {
    bus: &'a Bus,
    inner: &'a dyn moat_engine::Progress,
}

impl moat_engine::Progress for BusProgress<'_> {
    fn event(&self, msg: &str) {
        self.bus.publish(EventKind::ApplyProgress {
            message: msg.to_string(),
        });
        self.inner.event(msg);
    }
    fn warnings(&self, ds: &moat_core::diag::Diagnostics) {
        self.inner.warnings(ds);
    }
}

/// Progress nobody reads (auto-reconciliation: the bus gets it).
pub(crate) struct NoProgress;
impl moat_engine::Progress for NoProgress {
    fn event(&self, _: &str) {}
    fn warnings(&self, _: &moat_core::diag::Diagnostics) {}
}

/// The error document every failure returns.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<&'static str>,
    /// What went wrong.
    pub error: String,
    /// A short machine-readable class (`invalid`, `locked`, `not_found`, ...).
    pub reason: String,
    /// The exit code the CLI uses for it.
    pub exit_code: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<moat_core::diag::Diagnostics>,
}

impl ErrorBody {
    fn plain(msg: &str, reason: &str, code: u8, hint: Option<&str>) -> ErrorBody {
        ErrorBody {
            type_: None,
            error: msg.into(),
            reason: reason.into(),
            exit_code: code,
            hint: hint.map(String::from),
            causes: vec![],
            diagnostics: None,
        }
    }
}

/// A failed action: HTTP status and body.
pub(crate) struct Failure {
    status: u16,
    body: Box<ErrorBody>,
}

impl Failure {
    fn internal(msg: &str) -> Failure {
        Failure {
            status: 500,
            body: Box::new(ErrorBody::plain(msg, "failed", 1, None)),
        }
    }
    pub(crate) fn gone() -> Failure {
        Failure::internal("client went away")
    }
}

pub(crate) fn engine_failure(e: &EngineError) -> (u16, ErrorBody) {
    let (status, reason, code) = match e.kind() {
        ErrorKind::Invalid => (422, "invalid", 2),
        ErrorKind::Locked => (409, "locked", 3),
        ErrorKind::NotFound => (404, "not_found", 4),
        ErrorKind::Failed => (500, "failed", 1),
    };
    let mut causes = vec![];
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        causes.push(s.to_string());
        src = s.source();
    }
    let diagnostics = match e {
        EngineError::Invalid(d) => Some(d.clone()),
        _ => None,
    };
    (
        status,
        ErrorBody {
            type_: None,
            error: e.to_string(),
            reason: reason.into(),
            exit_code: code,
            hint: e.hint(),
            causes,
            diagnostics,
        },
    )
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Failure {
        let (status, body) = engine_failure(&e);
        Failure {
            status,
            body: Box::new(body),
        }
    }
}

/// Image store errors: a missing image is 404, a bad name or source 422.
fn image_error_body(e: &moat_image::ImageError) -> ErrorBody {
    use moat_image::ImageError as E;
    let (reason, code, hint) = match e {
        // Its message already says what to do.
        E::NoSuchImage(_) => ("not_found", 4, None),
        E::InvalidName { .. } | E::BadSource { .. } => ("invalid", 2, None),
        _ => ("failed", 1, None),
    };
    ErrorBody::plain(&e.to_string(), reason, code, hint)
}

fn image_failure(e: moat_image::ImageError) -> Failure {
    let body = image_error_body(&e);
    let status = match body.exit_code {
        4 => 404,
        2 => 422,
        _ => 500,
    };
    Failure {
        status,
        body: Box::new(body),
    }
}

fn pretty(v: &impl Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into())
}

fn warnings_header(w: Option<&moat_core::diag::Diagnostics>) -> Vec<(&'static str, String)> {
    match w {
        Some(d) if !d.0.is_empty() => vec![(WARNINGS_HEADER, http::ascii_json(d))],
        _ => vec![],
    }
}

/// A JSON body exactly as `moat ... --json` prints it (pretty, newline-ended).
fn send_json(
    conn: &mut UnixStream,
    v: &impl Serialize,
    w: Option<&moat_core::diag::Diagnostics>,
) -> Result<(), Failure> {
    let mut body = pretty(v);
    body.push('\n');
    http::write_response(
        conn,
        200,
        "application/json",
        &warnings_header(w),
        body.as_bytes(),
    )
    .map_err(|_| Failure::gone())
}

fn send_text(
    conn: &mut UnixStream,
    s: &str,
    w: Option<&moat_core::diag::Diagnostics>,
) -> Result<(), Failure> {
    http::write_response(
        conn,
        200,
        "text/plain; charset=utf-8",
        &warnings_header(w),
        s.as_bytes(),
    )
    .map_err(|_| Failure::gone())
}

fn send_error(conn: &mut UnixStream, status: u16, body: &ErrorBody) -> std::io::Result<()> {
    http::write_response(
        conn,
        status,
        "application/json",
        &[],
        pretty(body).as_bytes(),
    )
}

pub(crate) fn exec_json(r: &moat_driver::ExecOutput) -> serde_json::Value {
    json!({
        "status": r.status,
        "stdout": String::from_utf8_lossy(&r.stdout),
        "stderr": String::from_utf8_lossy(&r.stderr),
        "stdout_base64": crate::b64::encode(&r.stdout),
        "stderr_base64": crate::b64::encode(&r.stderr),
    })
}

/// Bind the socket: refuse when another daemon answers, replace a stale one,
/// then set its mode and group (0660 root:group, 0666 with `--others read`).
pub fn bind(cfg: &DaemonConfig) -> Result<UnixListener, DaemonError> {
    let path = cfg.socket_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    }
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(DaemonError::AlreadyRunning(path));
        }
        std::fs::remove_file(&path).map_err(io(format!(
            "cannot remove the stale socket {}",
            path.display()
        )))?;
    }
    let l =
        UnixListener::bind(&path).map_err(io(format!("cannot listen on {}", path.display())))?;
    let mode = match cfg.policy.others {
        crate::auth::Others::Read => 0o666,
        crate::auth::Others::None => 0o660,
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("cannot set the mode of {}", path.display())))?;
    if let Some((_, gid)) = &cfg.policy.group {
        std::os::unix::fs::chown(&path, None, Some(*gid))
            .map_err(io(format!("cannot give {} to group {gid}", path.display())))?;
    }
    Ok(l)
}

/// Accept connections forever (a thread each), with the watcher running.
pub fn serve(daemon: Arc<Daemon>, listener: UnixListener) -> Result<(), DaemonError> {
    daemon.bus.publish(EventKind::DaemonStarted {
        pid: std::process::id(),
    });
    crate::reconcile::spawn(daemon.clone());
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let d = daemon.clone();
                let spawned = std::thread::Builder::new()
                    .name("moat-conn".into())
                    .stack_size(256 << 10)
                    .spawn(move || d.handle(s));
                if spawned.is_err() {
                    // Out of threads: the client sees its connection closed.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    Ok(())
}

/// The policy from the CLI's words: `--group NAME` (default `moat` when that
/// group exists, else root only) and `--others read|none`.
pub fn policy(group: Option<&str>, others: crate::auth::Others) -> Result<Policy, DaemonError> {
    let group = match group {
        Some(g) => Some((
            g.to_string(),
            crate::auth::group_gid(g).ok_or_else(|| DaemonError::NoSuchGroup(g.into()))?,
        )),
        None => crate::auth::group_gid("moat").map(|gid| ("moat".to_string(), gid)),
    };
    Ok(Policy { group, others })
}

/// Apply's and destroy's Progress must be Send + Sync: Mutex<Option<UnixStream>> is.
const _: fn() = || {
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<LineSink>();
};
