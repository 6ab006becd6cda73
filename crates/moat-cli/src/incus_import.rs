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
use moat_incus::driver::Connection;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct IncusImportArgs {
    /// Incus project to import (repeatable; default: every project but moat's own `moat-*`)
    #[arg(long = "project", value_name = "P")]
    pub projects: Vec<String>,
    /// Where to write: a folder (gets moat.yml) or a file; default stdout
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Project name (default: `incus`)
    #[arg(short = 'n', long = "name")]
    pub name: Option<String>,
    /// Overwrite an existing output file
    #[arg(long)]
    pub force: bool,
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

pub fn run(out: &Output, a: &IncusImportArgs) -> Result<u8, CliError> {
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
    let name = a.name.clone().unwrap_or_else(|| "incus".into());
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
    match &a.output {
        None => out.data(&d.moat_yml),
        Some(o) => {
            let (path, dir) = crate::import::write_project(o, a.force, &d.moat_yml)?;
            out.info(&format!(
                "wrote {}; next: `moat plan -f {}` (nothing to change but moat's firewall)",
                path.display(),
                dir.display()
            ));
        }
    }
    Ok(exit::OK)
}
