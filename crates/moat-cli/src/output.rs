//! Printing: diagnostics, progress and errors on stderr, data on stdout.
//! Colour only when asked or when writing to a terminal with NO_COLOR unset.

use crate::cli::ColorChoice;
use crate::run::CliError;
use moat_core::diag::{Diagnostic, Diagnostics, Severity};
use std::io::{IsTerminal, Write};

pub struct Output {
    color: bool,
    quiet: bool,
}

const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl Output {
    pub fn new(choice: ColorChoice, quiet: bool, verbose: u8) -> Self {
        let color = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal()
            }
        };
        if verbose > 0 {
            // -v: every host command moat runs (argv), on stderr.
            let level = if verbose > 1 {
                tracing::Level::TRACE
            } else {
                tracing::Level::DEBUG
            };
            let _ = tracing_subscriber::fmt()
                .with_max_level(level)
                .with_writer(std::io::stderr)
                .with_target(false)
                .without_time()
                .try_init();
        }
        Output { color, quiet }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("{code}{s}{RESET}")
        } else {
            s.to_string()
        }
    }

    pub fn diagnostic(&self, d: &Diagnostic) {
        if self.quiet && d.severity == Severity::Warning {
            return;
        }
        let (word, code) = match d.severity {
            Severity::Error => ("error", RED),
            Severity::Warning => ("warning", YELLOW),
        };
        let mut line = format!("{}: ", self.paint(code, word));
        if let Some(loc) = &d.loc {
            line.push_str(&self.paint(BOLD, &loc.to_string()));
            line.push_str(": ");
        }
        if !d.field.is_empty() {
            line.push_str(&d.field);
            line.push_str(": ");
        }
        line.push_str(&d.message);
        if let Some(h) = &d.hint {
            line.push_str(&format!("\n  {} {h}", self.paint(DIM, "hint:")));
        }
        eprintln!("{line}");
    }

    pub fn diagnostics(&self, ds: &Diagnostics) {
        for d in &ds.0 {
            self.diagnostic(d);
        }
    }

    /// A progress or status message (stderr; hidden with --quiet).
    pub fn info(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    pub fn error(&self, msg: &str) {
        eprintln!("{}: {msg}", self.paint(RED, "error"));
    }

    pub fn hint(&self, msg: &str) {
        eprintln!("  {} {msg}", self.paint(DIM, "hint:"));
    }

    /// Print a command's failure: the diagnostics, or the error chain and a hint.
    pub fn fail(&self, e: &CliError) {
        match e {
            CliError::Invalid(ds) => {
                self.diagnostics(ds);
                let n = ds.errors().count();
                eprintln!(
                    "{}",
                    self.paint(
                        RED,
                        &format!(
                            "{n} error{} found; nothing was changed",
                            if n == 1 { "" } else { "s" }
                        )
                    )
                );
            }
            other => {
                self.error(&other.to_string());
                let mut source = std::error::Error::source(other);
                while let Some(s) = source {
                    eprintln!("  caused by: {s}");
                    source = s.source();
                }
                if let Some(h) = other.hint() {
                    self.hint(&h);
                }
            }
        }
    }

    /// Data for the user or for scripts (stdout).
    pub fn data(&self, s: &str) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(s.as_bytes());
        if !s.ends_with('\n') {
            let _ = out.write_all(b"\n");
        }
    }

    pub fn json<T: serde::Serialize>(&self, v: &T) -> Result<(), CliError> {
        let s = serde_json::to_string_pretty(v).map_err(|e| CliError::Other(e.to_string()))?;
        self.data(&s);
        Ok(())
    }
}
