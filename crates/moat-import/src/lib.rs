//! Imports: other tools' configuration folders turned into moat projects.
//!
//! ```text
//!  folder ──read (edge: files only)──▶ SourceFiles ──convert (pure)──▶ Imported
//!                                                                      │ moat.yml text
//!                                                                      └ notes: what was not carried over (file:line)
//! ```
//!
//! One module per source format ([`chimera`]); each exposes `read_dir` and a
//! pure `convert`. The CLI (`moat import <format> DIR`) prints the notes and
//! writes the text.
#![forbid(unsafe_code)]

pub mod chimera;

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{}: {source}; check the path and its permissions", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a {format} configuration folder: {why}", path.display())]
    NotASource {
        path: PathBuf,
        format: &'static str,
        why: String,
    },
    #[error("{file}:{line}: {message}")]
    Invalid {
        file: String,
        line: u32,
        message: String,
    },
    #[error("writing the moat project failed: {0}")]
    Emit(String),
}

/// One thing the conversion could not carry over (or changed), and where.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Note {
    /// Path relative to the imported folder.
    pub file: String,
    pub line: u32,
    pub message: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// The result of an import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    /// The project name written in moat.yml.
    pub project: String,
    /// moat.yml contents.
    pub moat_yml: String,
    /// Sorted by file and line.
    pub notes: Vec<Note>,
    /// Full names (`<domain>-<machine>`) of the machines written.
    pub machines: Vec<String>,
}

/// The files of a source folder, as text: (path relative to the folder, contents).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceFiles {
    pub files: Vec<(String, String)>,
}

impl SourceFiles {
    /// Reads every `*.yaml` / `*.yml` file at the top of `dir` and in the
    /// given sub-folders (not deeper), sorted by path.
    pub fn read(dir: &Path, subdirs: &[&str]) -> Result<SourceFiles, ImportError> {
        let mut files = Vec::new();
        let read_err = |path: &Path, source| ImportError::Read {
            path: path.to_path_buf(),
            source,
        };
        for sub in std::iter::once("").chain(subdirs.iter().copied()) {
            let d = if sub.is_empty() {
                dir.to_path_buf()
            } else {
                dir.join(sub)
            };
            if !d.is_dir() {
                if sub.is_empty() {
                    return Err(read_err(
                        &d,
                        std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
                    ));
                }
                continue;
            }
            for e in std::fs::read_dir(&d).map_err(|e| read_err(&d, e))? {
                let e = e.map_err(|e| read_err(&d, e))?;
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if !(name.ends_with(".yaml") || name.ends_with(".yml")) || !p.is_file() {
                    continue;
                }
                let text = std::fs::read_to_string(&p).map_err(|e| read_err(&p, e))?;
                let rel = if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                };
                files.push((rel, text));
            }
        }
        files.sort();
        Ok(SourceFiles { files })
    }
}
