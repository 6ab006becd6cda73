//! Continuous reconciliation.
//!
//! One background thread, ticking every second:
//! - the project's files (`*.yml`/`*.yaml` under the project path, their
//!   mtimes and sizes) are fingerprinted; a change → `project_changed` and a
//!   reconcile pass;
//! - every [`WATCH_EVERY`], machine states are observed and changes become
//!   `machine_started/stopped/crashed` events (this is also how a restarted
//!   daemon re-attaches: it observes what runs, it never restarts anything);
//! - every `--interval`, a reconcile pass.
//!
//! A pass plans the project against the host; a non-empty plan is drift,
//! reported as `drift_found`, and applied only when the project says
//! `reconcile: auto`. A pass that finds the apply lock taken skips.

use crate::events::EventKind;
use crate::server::{Daemon, NoProgress};
use moat_engine::{Engine, EngineError};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const WATCH_EVERY: Duration = Duration::from_secs(2);

/// What one pass found and did.
#[derive(Debug, Serialize)]
pub struct PassReport {
    pub project: String,
    /// Plan actions (ids) that would bring the host back to the project.
    pub drift: Vec<String>,
    /// `report` or `auto`.
    pub mode: &'static str,
    /// Whether an apply ran (mode auto and drift found).
    pub repaired: bool,
    pub failed: bool,
}

/// One reconcile pass over `project`.
pub fn pass(daemon: &Daemon, project: &Path) -> Result<PassReport, EngineError> {
    let eng = Engine::open_readonly(daemon.cfg.engine_config())?;
    let checked = eng.check(project)?;
    let auto = checked.resolved.project.reconcile == moat_core::model::Reconcile::Auto;
    let plan = eng.plan(&checked, &moat_engine::PlanOpts::default())?;
    let drift: Vec<String> = plan.plan.actions.iter().map(|a| a.id.clone()).collect();
    let name = project.display().to_string();
    let mut report = PassReport {
        project: name.clone(),
        drift: drift.clone(),
        mode: if auto { "auto" } else { "report" },
        repaired: false,
        failed: false,
    };
    if drift.is_empty() {
        return Ok(report);
    }
    daemon.bus.publish(EventKind::DriftFound {
        project: name.clone(),
        actions: drift,
    });
    if auto {
        let opts = moat_engine::ApplyOpts {
            jobs: 4,
            ..Default::default()
        };
        match daemon.apply(project, &opts, &NoProgress) {
            Ok(r) => {
                report.repaired = true;
                report.failed = r.failed();
                daemon.bus.publish(EventKind::DriftRepaired {
                    project: name,
                    failed: r.failed(),
                });
            }
            // Someone else is applying: they converge the host; skip.
            Err(EngineError::Locked(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// A fingerprint of the project's files: (path, mtime, size) of each.
pub fn fingerprint(project: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut out = Vec::new();
    walk(project, 0, &mut out);
    out.sort();
    out
}

fn walk(p: &Path, depth: u32, out: &mut Vec<(PathBuf, SystemTime, u64)>) {
    let Ok(meta) = std::fs::metadata(p) else {
        return;
    };
    if meta.is_file() {
        out.push((
            p.to_path_buf(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        ));
        return;
    }
    if !meta.is_dir() || depth > 3 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(p) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let is_yaml = name.ends_with(".yml") || name.ends_with(".yaml");
        if is_yaml || path.is_dir() {
            walk(&path, depth + 1, out);
        }
    }
}

/// Observe machine states; publish what changed since last time.
pub fn watch_machines(daemon: &Daemon) {
    let Ok(eng) = Engine::open_readonly(daemon.cfg.engine_config()) else {
        return;
    };
    let Ok(status) = eng.status(None) else {
        return;
    };
    let now: BTreeMap<String, String> = status
        .machines
        .into_iter()
        .map(|m| (m.name, m.state))
        .collect();
    let mut seen = daemon.machines.lock().unwrap_or_else(|p| p.into_inner());
    let first = seen.is_empty();
    for (name, state) in &now {
        let old = seen.get(name);
        if old == Some(state) {
            continue;
        }
        let kind = if state == "running" {
            EventKind::MachineStarted {
                machine: name.clone(),
            }
        } else if let Some(reason) = state.strip_prefix("crashed: ") {
            EventKind::MachineCrashed {
                machine: name.clone(),
                reason: reason.to_string(),
            }
        } else if old.is_none() {
            EventKind::MachineAppeared {
                machine: name.clone(),
                state: state.clone(),
            }
        } else {
            EventKind::MachineStopped {
                machine: name.clone(),
            }
        };
        // The first observation after a (re)start is the baseline, not news.
        if !first {
            daemon.bus.publish(kind);
        }
    }
    for name in seen.keys() {
        if !now.contains_key(name) && !first {
            daemon.bus.publish(EventKind::MachineRemoved {
                machine: name.clone(),
            });
        }
    }
    *seen = now;
}

/// Start the background thread.
pub fn spawn(daemon: Arc<Daemon>) {
    let _ = std::thread::Builder::new()
        .name("moat-reconcile".into())
        .spawn(move || run(daemon));
}

fn run(daemon: Arc<Daemon>) {
    let project = daemon.cfg.project.clone();
    let mut print = project.as_deref().map(fingerprint);
    let mut last_pass = Instant::now();
    let mut last_watch = Instant::now() - WATCH_EVERY;
    let mut first_pass = true;
    loop {
        if last_watch.elapsed() >= WATCH_EVERY {
            watch_machines(&daemon);
            last_watch = Instant::now();
        }
        if let Some(p) = &project {
            let now = fingerprint(p);
            let changed = print.as_ref() != Some(&now);
            if changed {
                daemon.bus.publish(EventKind::ProjectChanged {
                    project: p.display().to_string(),
                });
                print = Some(now);
            }
            if changed || first_pass || last_pass.elapsed() >= daemon.cfg.interval {
                let _ = pass(&daemon, p);
                last_pass = Instant::now();
                first_pass = false;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
