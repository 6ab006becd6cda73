//! Drivers run machines. Each backend (the built-in container runtime
//! `native`, later `nspawn`, `qemu`, `firecracker`, `incus`) implements
//! [`Driver`]. The engine picks a driver per machine from the machine's
//! `driver:` field and asks it to [`Driver::probe`] the host first, so an
//! unusable backend is reported before anything is changed.
//!
//! Drivers are the source of truth for observed machine state: `observe`
//! re-reads the host every time.

mod ids;
pub mod native;
pub mod nspawn;

use moat_core::model::{Machine, MachineType, ResolvedNic};
use moat_core::observed::{Limits, ObservedMachine};
use std::path::PathBuf;
use std::time::Duration;

/// What a driver needs to know about the moat root it works in.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// The moat root (state, images, machines live below it).
    pub root: PathBuf,
    /// Run-time folder (sockets, pid files), e.g. `/run/moat`.
    pub run_dir: PathBuf,
    /// See `moat_core::naming::root_tag`.
    pub root_tag: String,
}

/// What a driver that keeps one folder per machine in `<root>/machines`
/// (native, nspawn) observes there: each folder through `observe` (which
/// returns `None` for one that is not its own), sorted by full name. No
/// `machines` folder is no machine.
pub(crate) fn list_machine_folders(
    ctx: &Ctx,
    mut observe: impl FnMut(&str) -> Result<Option<ObservedMachine>>,
) -> Result<Vec<ObservedMachine>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(ctx.root.join("machines")) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        if let Some(m) = observe(&e.file_name().to_string_lossy())? {
            out.push(m);
        }
    }
    out.sort_by(|a, b| a.full_name.cmp(&b.full_name));
    Ok(out)
}

/// Everything a driver needs to create one machine.
#[derive(Clone, Debug)]
pub struct MachineSpec {
    pub machine: Machine,
    /// Present when `network: domain`.
    pub nic: Option<ResolvedNic>,
    /// Bridge to attach the NIC to, with gateway and prefix length.
    pub bridge: Option<BridgeInfo>,
    /// Hash of the settings that require a re-create; drivers record it and
    /// report it back in `ObservedMachine::spec_hash`.
    pub spec_hash: String,
    /// DNS names of the machine's domain peers (name → address) for /etc/hosts.
    pub hosts: Vec<(String, std::net::Ipv4Addr)>,
}

#[derive(Clone, Debug)]
pub struct BridgeInfo {
    pub name: String,
    pub gateway: std::net::Ipv4Addr,
    pub prefix_len: u8,
}

/// Result of probing the host for a driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Available,
    /// Why not, and what to do about it.
    Unavailable {
        reason: String,
        hint: String,
    },
}

/// Optional features a driver may offer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub exec: bool,
    pub snapshot: bool,
    pub clone: bool,
    pub console: bool,
    pub update_limits: bool,
}

/// Output of a non-interactive exec.
#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// How to run an interactive process ([`Driver::exec_session`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOpts {
    /// Allocate a terminal of this size (rows, cols); `None` = plain streams.
    pub tty: Option<(u16, u16)>,
    /// Extra environment (`K=V`), e.g. the client's `TERM`.
    pub env: Vec<String>,
    /// Run the user's login shell (argv is then ignored).
    pub login: bool,
}

/// The driver's side of a running interactive process.
pub trait SessionProcess: Send + std::fmt::Debug {
    /// New terminal size (the process gets SIGWINCH); a no-op without a tty.
    fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()>;
    /// End of input (EOF on the stream, ^D on a terminal).
    fn close_stdin(&self) -> std::io::Result<()>;
    /// Sends a signal to the process.
    fn signal(&self, sig: i32) -> std::io::Result<()>;
    /// Waits for the end; the exit code, or 128+N for signal N.
    fn wait(&mut self) -> std::io::Result<i32>;
}

/// A process running in a machine whose I/O is one bidirectional fd:
/// the pty master when `tty`, else a socket (write = stdin, read = stdout
/// and stderr merged). Reading returns 0 or EIO once the process is gone.
#[derive(Debug)]
pub struct ExecSession {
    pub io: std::os::fd::OwnedFd,
    pub tty: bool,
    pub process: Box<dyn SessionProcess>,
}

impl ExecSession {
    pub fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        self.process.resize(rows, cols)
    }
    pub fn close_stdin(&self) -> std::io::Result<()> {
        self.process.close_stdin()
    }
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        self.process.signal(sig)
    }
    pub fn wait(&mut self) -> std::io::Result<i32> {
        self.process.wait()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// driver '{driver}' is not usable on this host: {reason}
    #[error("driver '{driver}' is not usable on this host: {reason}")]
    Unavailable { driver: String, reason: String },
    #[error("machine '{machine}' does not exist")]
    NoSuchMachine { machine: String },
    #[error("driver '{driver}' does not support {what}")]
    Unsupported { driver: String, what: String },
    #[error("{machine}: {message}")]
    Failed { machine: String, message: String },
    #[error("{machine}: {source}")]
    Io {
        machine: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, DriverError>;

/// A backend that runs machines.
///
/// Every method is idempotent where that makes sense: `create` of an existing
/// machine with the same spec hash succeeds, `destroy` of a missing one too.
pub trait Driver: Send + Sync {
    fn name(&self) -> &'static str;
    fn probe(&self, ctx: &Ctx) -> Probe;
    fn supports(&self, kind: MachineType) -> bool;
    fn capabilities(&self) -> Capabilities;

    /// All machines of this root that this driver knows about.
    fn list(&self, ctx: &Ctx) -> Result<Vec<ObservedMachine>>;
    fn observe(&self, ctx: &Ctx, full_name: &str) -> Result<Option<ObservedMachine>>;

    fn create(&self, ctx: &Ctx, spec: &MachineSpec) -> Result<()>;
    fn start(&self, ctx: &Ctx, full_name: &str) -> Result<()>;
    fn stop(&self, ctx: &Ctx, full_name: &str, timeout: Duration) -> Result<()>;
    fn destroy(&self, ctx: &Ctx, full_name: &str) -> Result<()>;

    fn update_limits(&self, _ctx: &Ctx, full_name: &str, _limits: &Limits) -> Result<()> {
        Err(DriverError::Unsupported {
            driver: self.name().into(),
            what: format!("changing limits in place ({full_name})"),
        })
    }

    fn exec(&self, _ctx: &Ctx, full_name: &str, _argv: &[String]) -> Result<ExecOutput> {
        Err(DriverError::Unsupported {
            driver: self.name().into(),
            what: format!("exec ({full_name})"),
        })
    }

    /// Starts an interactive process (a pty or plain streams on one fd).
    fn exec_session(
        &self,
        _ctx: &Ctx,
        full_name: &str,
        _argv: &[String],
        _opts: &SessionOpts,
    ) -> Result<ExecSession> {
        Err(DriverError::Unsupported {
            driver: self.name().into(),
            what: format!("interactive exec ({full_name})"),
        })
    }

    /// Reads driver settings from the project (e.g. the `incus:` connection).
    /// Called by the engine before it observes or acts.
    fn configure(&self, _ctx: &Ctx, _project: &moat_core::model::Project) -> Result<()> {
        Ok(())
    }

    /// Whether this driver creates the bridges of its machines' domains itself
    /// (Incus does); the engine then skips its own bridge and DHCP server and
    /// calls [`Driver::ensure_network`] / [`Driver::delete_network`] instead.
    fn manages_networks(&self) -> bool {
        false
    }

    /// The domain networks of this root that the driver created.
    fn list_networks(&self, _ctx: &Ctx) -> Result<Vec<moat_core::observed::ObservedNetwork>> {
        Ok(vec![])
    }

    /// Creates or updates a domain's network (bridge named `net.bridge`).
    fn ensure_network(&self, _ctx: &Ctx, net: &DomainNetwork) -> Result<()> {
        Err(DriverError::Unsupported {
            driver: self.name().into(),
            what: format!("domain networks ({})", net.domain),
        })
    }

    /// Deletes a domain network it created; `Ok(false)` when it is not one of its own.
    fn delete_network(&self, _ctx: &Ctx, _bridge: &str) -> Result<bool> {
        Ok(false)
    }

    /// Things the driver sees in this root's space but did not create
    /// (reported, never touched), e.g. `incus instance pro/web (unmanaged)`.
    fn unmanaged(&self, _ctx: &Ctx) -> Result<Vec<String>> {
        Ok(vec![])
    }

    /// Whether the driver's machines take their images from moat's image
    /// store (`false` for Incus: images live on the server).
    fn uses_image_store(&self) -> bool {
        true
    }

    /// Where machines run when the driver places them on cluster members
    /// (Incus): machine full name → member. Empty otherwise.
    fn locations(&self, _ctx: &Ctx) -> Result<std::collections::BTreeMap<String, String>> {
        Ok(Default::default())
    }
}

/// A domain network for a driver that creates its own bridges.
#[derive(Clone, Debug)]
pub struct DomainNetwork {
    pub domain: String,
    pub bridge: String,
    pub subnet: ipnet::Ipv4Net,
    pub gateway: std::net::Ipv4Addr,
    pub dhcp: bool,
    /// Addresses allocated to the domain's machines.
    pub addresses: Vec<std::net::Ipv4Addr>,
    /// The domain's profiles.
    pub profiles: std::collections::BTreeMap<String, moat_core::model::Profile>,
}
