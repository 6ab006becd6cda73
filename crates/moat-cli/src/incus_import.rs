//! `moat import incus [--project P]... [-o OUT]`: reads a live Incus server
//! (local socket, or HTTPS with a client certificate) and writes a moat project
//! that adopts its projects, networks, profiles and instances in place.
//!
//! Reading and describing live in `moat_incus::import`; this module turns the
//! arguments into a client, prints the notes (stderr) and writes moat.yml
//! (stdout or OUT), like the folder importers.

use crate::exit;
use crate::output::Output;
use crate::run::CliError;
use clap::Args;
use moat_core::diag::Diagnostic;
use moat_core::plan::Op;
use moat_incus::driver::Connection;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct IncusImportArgs {
    /// Incus project to import (repeatable; default: every project but moat's own `moat-*`)
    #[arg(long = "project", value_name = "P")]
    pub projects: Vec<String>,
    #[command(flatten)]
    pub write: crate::import::WriteArgs,
    /// After writing (needs -o), install moat's isolation rules for the
    /// imported domains now: the only change moat would make, so that
    /// `moat plan` on the result is empty. Without it `moat apply` does it.
    #[arg(long, requires = "output")]
    pub apply_firewall: bool,
    /// Local Unix socket of incusd (default /var/lib/incus/unix.socket, or $INCUS_SOCKET)
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    pub socket: Option<PathBuf>,
    /// Remote server `https://HOST:PORT` (needs --client-cert, --client-key, --server-cert)
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long, value_name = "PEM", requires = "url")]
    pub client_cert: Option<PathBuf>,
    #[arg(long, value_name = "PEM", requires = "url")]
    pub client_key: Option<PathBuf>,
    #[arg(long, value_name = "PEM", requires = "url")]
    pub server_cert: Option<PathBuf>,
}

fn abs(p: &Option<PathBuf>) -> Option<PathBuf> {
    p.as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
}

/// The `incus:` lines of the written project (absolute paths, so the project
/// reaches the same server wherever it is written).
fn incus_block(c: &Connection) -> String {
    let mut out = Vec::new();
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    if let Some(u) = &c.url {
        out.push(format!("  url: {}", q(u)));
    }
    for (k, v) in [
        ("socket", &c.socket),
        ("client_cert", &c.client_cert),
        ("client_key", &c.client_key),
        ("server_cert", &c.server_cert),
    ] {
        if let Some(p) = v {
            out.push(format!("  {k}: {}", q(&p.to_string_lossy())));
        }
    }
    out.join("\n")
}

pub fn run(out: &Output, root: &Path, a: &IncusImportArgs) -> Result<u8, CliError> {
    let conn = Connection {
        url: a.url.clone(),
        socket: abs(&a.socket),
        client_cert: abs(&a.client_cert),
        client_key: abs(&a.client_key),
        server_cert: abs(&a.server_cert),
        ..Connection::default()
    };
    let incus_err = |e: moat_incus::IncusError| CliError::Other(e.to_string());
    let client = conn.client().map_err(incus_err)?;
    let states = moat_incus::import::read(&client, &a.projects).map_err(incus_err)?;
    if states.is_empty() {
        return Err(CliError::NotFound(
            "no Incus project to import (moat's own `moat-*` projects are skipped); \
             name one with --project"
                .into(),
        ));
    }
    let name = a.write.name.clone().unwrap_or_else(|| "incus".into());
    let d = moat_incus::import::describe(&states, &name, &incus_block(&conn));
    for n in &d.notes {
        out.diagnostic(&Diagnostic::warning(None, "", n.clone()));
    }
    out.info(&format!(
        "imported {} Incus project(s), {} machine(s) into project '{name}' ({} notes above)",
        states.len(),
        d.machines.len(),
        d.notes.len()
    ));
    let Some(o) = &a.write.output else {
        out.data(&d.moat_yml);
        return Ok(exit::OK);
    };
    let (path, dir) = crate::import::write_project(o, a.write.force, &d.moat_yml)?;
    out.info(&format!("wrote {}", path.display()));
    if a.apply_firewall {
        apply_firewall(out, root, &path)?;
        out.info(&format!(
            "next: `moat plan -f {}` (nothing to change)",
            dir.display()
        ));
    } else {
        out.info(&format!(
            "next: `moat plan -f {}`: its one action is moat's firewall (isolation \
             between the imported domains), which `moat apply` installs",
            dir.display()
        ));
    }
    Ok(exit::OK)
}

/// Installs the firewall of the project just written, and nothing else: if
/// the plan holds any other action (the import did not describe something
/// exactly), nothing is applied and the actions are named.
fn apply_firewall(out: &Output, root: &Path, project: &Path) -> Result<(), CliError> {
    let mut eng = moat_engine::Engine::open(moat_engine::Config::for_root(root))?;
    let checked = eng.check(project)?;
    let report = eng.plan(&checked, &moat_engine::PlanOpts::default())?;
    let others: Vec<String> = report
        .plan
        .actions
        .iter()
        .filter(|a| !matches!(a.op, Op::ApplyFirewall { .. }))
        .map(|a| a.id.clone())
        .collect();
    if !others.is_empty() {
        return Err(CliError::Other(format!(
            "not installing the firewall: the plan of {} also holds {}; \
             review it with `moat plan -f {}`",
            project.display(),
            others.join(", "),
            project.display()
        )));
    }
    if report.plan.actions.is_empty() {
        out.info("moat's firewall for these domains is already installed");
        return Ok(());
    }
    for l in &report.firewall_diff {
        out.info(&format!("  firewall {l}"));
    }
    let progress = crate::run::Progress { out, quiet: false };
    let opts = moat_engine::ApplyOpts {
        jobs: 1,
        ..Default::default()
    };
    let applied = eng.apply(project, &opts, &progress)?;
    if applied.failed() {
        return Err(CliError::Other(format!(
            "installing moat's firewall failed:\n{applied}"
        )));
    }
    out.info(&format!(
        "installed moat's firewall: the imported domains are isolated from each other; \
         open flows with `policies:` in {}",
        project.display()
    ));
    Ok(())
}
