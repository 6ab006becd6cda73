//! `moat daemon` (serve the API on the root's socket, in the foreground) and
//! `moat events` (print the daemon's event stream as JSON lines).

use crate::cli::Cli;
use crate::exit;
use crate::output::Output;
use crate::run::CliError;
use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Project served when a request names none: watched and reconciled
    /// (default: the global -f, else none)
    #[arg(long, value_name = "DIR")]
    pub project: Option<PathBuf>,
    /// Group whose members may change things (default: `moat` if it exists, else root only)
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// What other local users get: read-only endpoints, or nothing
    #[arg(long, value_enum, default_value_t = OthersArg::Read)]
    pub others: OthersArg,
    /// Seconds between drift checks of the project
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub interval: u64,
    /// Socket path (default: <run folder>/moat.sock, /run/moat/moat.sock for the default root)
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum OthersArg {
    Read,
    None,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Socket path (default: the root's)
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

fn daemon_err(e: moat_daemon::DaemonError) -> CliError {
    let hint = e.hint();
    CliError::Remote(crate::client::RemoteError::new(
        e.to_string(),
        hint,
        exit::FAILED,
    ))
}

/// Run the daemon in the foreground until killed. Prints
/// `listening on <socket>` on stdout once the socket accepts connections.
pub fn run(cli: &Cli, out: &Output, a: &DaemonArgs) -> Result<u8, CliError> {
    let project = match a.project.as_ref().or(cli.file.as_ref()) {
        Some(p) => Some(std::fs::canonicalize(p).map_err(|e| CliError::Io {
            what: format!("cannot read the project {}", p.display()),
            source: e,
        })?),
        None => None,
    };
    // Open the root for changes now: a root that cannot work fails here, not
    // on the first request.
    moat_engine::Engine::open(moat_engine::Config::for_root(&cli.root))?;
    let others = match a.others {
        OthersArg::Read => moat_daemon::Others::Read,
        OthersArg::None => moat_daemon::Others::None,
    };
    let policy = moat_daemon::policy(a.group.as_deref(), others).map_err(daemon_err)?;
    let cfg = moat_daemon::DaemonConfig {
        root: cli.root.clone(),
        project,
        policy,
        interval: std::time::Duration::from_secs(a.interval.max(1)),
        socket: a.socket.clone(),
    };
    let listener = moat_daemon::bind(&cfg).map_err(daemon_err)?;
    let sock = cfg.socket_path();
    out.info(&format!(
        "moat daemon {} (pid {}): root {}, project {}, admin group {}, others {:?}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        cfg.root.display(),
        cfg.project
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into()),
        cfg.policy
            .group
            .as_ref()
            .map(|g| g.0.clone())
            .unwrap_or_else(|| "none (root only)".into()),
        a.others
    ));
    {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "listening on {}", sock.display());
        let _ = o.flush();
    }
    moat_daemon::serve(moat_daemon::Daemon::new(cfg), listener).map_err(daemon_err)?;
    Ok(exit::OK)
}

/// Print events as JSON lines until the daemon goes away or we are killed.
pub fn events(cli: &Cli, _out: &Output, a: &EventsArgs) -> Result<u8, CliError> {
    let sock = a
        .socket
        .clone()
        .unwrap_or_else(|| moat_daemon::socket_path(&moat_engine::Config::for_root(&cli.root)));
    let client = moat_daemon::client::Client::new(&sock);
    let (head, mut r) = client.open("GET", "/v1/events", None, &[]).map_err(|e| {
        CliError::Remote(crate::client::RemoteError::new(
            e.to_string(),
            Some("start one with `moat daemon` (events come only from a running daemon)".into()),
            exit::FAILED,
        ))
    })?;
    if head.status != 200 {
        let mut body = Vec::new();
        let _ = std::io::Read::read_to_end(&mut r, &mut body);
        return Err(crate::client::error_from_body(head.status, &body));
    }
    let mut line = String::new();
    let mut o = std::io::stdout();
    loop {
        line.clear();
        match std::io::BufRead::read_line(&mut r, &mut line) {
            Ok(0) | Err(_) => return Ok(exit::OK),
            Ok(_) => {
                if o.write_all(line.as_bytes()).is_err() || o.flush().is_err() {
                    return Ok(exit::OK);
                }
            }
        }
    }
}
