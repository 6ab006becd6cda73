//! The `moat` binary: parses the command line, runs the engine in-process, and
//! prints. Data goes to stdout, messages (progress, warnings, errors) to stderr;
//! everything is readable without colour.

mod cli;
mod client;
mod console;
mod daemon;
mod image;
mod import;
mod incus_import;
mod init;
mod kernel;
mod output;
mod run;
mod tty;

use clap::{CommandFactory, Parser};
use cli::{Cli, Command};
use std::process::ExitCode;

/// Exit codes (documented in `moat --help` and docs/cli.md).
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const INVALID: u8 = 2;
    pub const LOCKED: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
}

fn main() -> ExitCode {
    run::prespawn_early(std::env::args_os().skip(1));
    let cli = Cli::parse();
    let out = output::Output::new(cli.color, cli.quiet, cli.verbose);
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "moat", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            let man = clap_mangen::Man::new(Cli::command());
            if let Err(e) = man.render(&mut std::io::stdout()) {
                out.error(&format!("cannot write the man page: {e}"));
                return ExitCode::from(exit::FAILED);
            }
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    match run::dispatch(&cli, &out) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            out.fail(&e);
            ExitCode::from(e.exit_code())
        }
    }
}
