//! The image store's error type.

use std::io;
use std::path::PathBuf;

/// Something the image store could not do. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A filesystem operation on a store or source path failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A mount helper failed.
    #[error(transparent)]
    Mount(#[from] moat_host::mount::MountError),
    /// An external command (mmdebstrap, cp, ...) failed.
    #[error("command `{argv}` failed ({status}): {stderr}")]
    Command {
        argv: String,
        status: String,
        stderr: String,
    },
    /// A JSON document (manifest, config, store metadata) is malformed.
    #[error(
        "cannot parse {what} {path}: {source}; the file is corrupt or not what it claims to be"
    )]
    Json {
        what: &'static str,
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The source is not usable as described.
    #[error("image source {source_desc}: {reason}")]
    BadSource { source_desc: String, reason: String },
    /// A layer's content does not match the digest announced for it.
    #[error("layer {expected} of {source_desc} has digest {actual}; the archive is corrupt, re-download or re-export it")]
    DigestMismatch {
        source_desc: String,
        expected: String,
        actual: String,
    },
    /// No image has this name.
    #[error(
        "no image named {0:?}; `moat image ls` lists the images, `moat image build` creates one"
    )]
    NoSuchImage(String),
    /// No machine filesystem of this name.
    #[error("machine {0:?} has no root filesystem in the image store; create the machine first")]
    NoSuchMachine(String),
    /// A machine filesystem of this name already exists.
    #[error("machine {0:?} already has a root filesystem; destroy it first or pick another name")]
    MachineExists(String),
    /// The operation needs the machine's rootfs unmounted (machine stopped).
    #[error("machine {machine:?} is running (its rootfs is mounted); stop it before {op}")]
    MachineMounted { machine: String, op: &'static str },
    /// No snapshot of this name.
    #[error(
        "machine {machine:?} has no snapshot {snapshot:?}; `moat snapshot ls {machine}` lists them"
    )]
    NoSuchSnapshot { machine: String, snapshot: String },
    /// A snapshot of this name exists already.
    #[error("machine {machine:?} already has a snapshot {snapshot:?}; remove it first or pick another name")]
    SnapshotExists { machine: String, snapshot: String },
    /// A name (image, machine, snapshot) has characters the store cannot use.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    /// The host's apt configuration has no source for this distribution.
    #[error("no apt source for {distro} is configured on this host (looked in /etc/apt/sources.list and /etc/apt/sources.list.d); add a {distro} mirror entry there, or import a {distro} rootfs tarball instead")]
    NoAptSource { distro: String },
    /// Pulling from a registry failed.
    #[error("pull of {reference}: {reason}; check the reference, the network and the registry's availability")]
    Pull { reference: String, reason: String },
}

/// Shorthand for results in this crate.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Attach the operation and path to an io::Error.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| ImageError::Io {
            op,
            path: path.into(),
            source,
        })
    }
}
