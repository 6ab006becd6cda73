use std::path::PathBuf;

/// Errors of the state store and the apply lock. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open the state store {path}: {source}; check that the moat root exists and is writable")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state store {path}: {what} failed: {source}")]
    Sql {
        path: PathBuf,
        what: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state store {path} has schema version {found}, this moat knows up to {known}; upgrade moat")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("state store {path}: {what} holds an invalid value '{value}'; the file may be damaged, restore it from a backup or remove it to start over")]
    Corrupt {
        path: PathBuf,
        what: String,
        value: String,
    },
    #[error("state store {path}: no journal entry {entry}")]
    NoSuchEntry { path: PathBuf, entry: i64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another moat apply ({holder}) holds the lock on {root}; wait for it or pass --wait")]
    Locked { root: PathBuf, holder: String },
    #[error("another moat apply ({holder}) still holds the lock on {root} after waiting {waited_secs}s; wait longer or check that process")]
    LockTimeout {
        root: PathBuf,
        holder: String,
        waited_secs: u64,
    },
}
