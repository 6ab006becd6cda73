//! moat's built-in container runtime and the per-machine supervisor.
//!
//! Layers, bottom up:
//! - [`profile`]: the default hardening as data (capabilities, seccomp lists, masked paths).
//! - [`spec`]: [`ContainerSpec`] → OCI runtime spec (config.json).
//! - [`rootfs`], [`idmap`]: the machine's root ownership (idmapped overlay lowers, or a chown).
//! - [`container`]: one container through youki's libcontainer (create / start / kill / delete / exec).
//! - [`supervisor`]: the loop run by the `moat-supervisor` binary: owns one container,
//!   writes its logs with rotation, records its exit, restarts it per policy, obeys stop requests.
//! - [`machine`]: the lifecycle API callers use (launch a supervisor, start, stop, state,
//!   exec, destroy), all keyed by a machine folder.

pub mod cgroups;
pub mod container;
pub mod exec;
pub mod hostproc;
pub mod idmap;
pub mod logs;
pub mod machine;
pub mod profile;
pub mod rootfs;
pub mod session;
pub mod spec;
pub mod supervisor;
pub mod sys;

pub use machine::{HostProcess, MachineDir, MachineState, RestartPolicy, Status, SupervisorConfig};
pub use rootfs::{RootfsOwnership, RootfsRecord};
pub use session::{ExecSession, SessionOpts};
pub use spec::{BindMount, ContainerKind, ContainerSpec, IdRange, NetworkSpec, ResourceLimits};

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container '{container}': invalid spec: {reason}")]
    InvalidSpec { container: String, reason: String },
    #[error("container '{container}': {op} failed: {message}; hint: the supervisor log and `moat logs` usually say more")]
    Libcontainer {
        container: String,
        op: &'static str,
        message: String,
    },
    #[error("container '{container}' does not exist")]
    NoSuchContainer { container: String },
    #[error("container '{container}': {op}: {source}")]
    Sys {
        container: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("machine folder {}: {message}", dir.display())]
    Machine { dir: PathBuf, message: String },
    #[error("the moat-supervisor binary was not found ({tried}); hint: set MOAT_SUPERVISOR to its path or install it next to moat")]
    NoSupervisor { tried: String },
}

impl RuntimeError {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}
