//! The engine: turns a project into host changes.
//!
//! ```text
//! check:  project files ─▶ moat_core::check (load + allocate, prior allocations from state)
//! plan:   observe host (drivers + network layer) ─▶ moat_core::plan ─▶ PlanReport
//! apply:  lock ─▶ journal each action ─▶ run actions in dependency order ─▶ save allocations
//! ```
//!
//! The engine owns no state of its own between runs: the YAML is the desired
//! state, the host (through drivers) the observed state, and the state store
//! only what cannot be observed (allocations, ownership, the journal).

mod apply;
pub mod cloudinit;
mod host;
mod run;
mod rundomain;
mod status;
mod storage;

pub use apply::ApplyReport;
pub use moat_driver::{ExecSession, SessionOpts};
pub use run::{prespawn_supervisor, RunOpts, RunOutcome};
pub use status::{DestroyReport, LogSource, NetworkStatus, Status};

use moat_core::address::Allocated;
use moat_core::diag::Diagnostics;
use moat_core::model::{Allocations, Resolved};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a moat root lives.
#[derive(Clone, Debug)]
pub struct Config {
    pub root: PathBuf,
    /// Sockets and pid files: /run/moat for the default root, `<root>/run` otherwise.
    pub run_dir: PathBuf,
}

impl Config {
    pub fn for_root(root: &Path) -> Config {
        let run_dir = if root == Path::new("/var/lib/moat") {
            PathBuf::from("/run/moat")
        } else {
            root.join("run")
        };
        Config {
            root: root.to_path_buf(),
            run_dir,
        }
    }
}

/// Broad classes of failure, mapped to exit codes by the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Invalid,
    Locked,
    NotFound,
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the project is invalid")]
    Invalid(Diagnostics),
    #[error("{0}")]
    Locked(String),
    #[error("no machine named '{0}' in this root")]
    NoSuchMachine(String),
    #[error("{what} is not implemented yet")]
    NotYet { what: &'static str },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

impl EngineError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Invalid(_) => ErrorKind::Invalid,
            EngineError::Locked(_) => ErrorKind::Locked,
            EngineError::NoSuchMachine(_) => ErrorKind::NotFound,
            _ => ErrorKind::Failed,
        }
    }
    pub fn hint(&self) -> Option<String> {
        match self {
            EngineError::Locked(_) => Some("wait for it to finish, or pass --wait SECONDS".into()),
            EngineError::NoSuchMachine(_) => Some("`moat status` lists the machines".into()),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Receives progress of long operations (the CLI prints it on stderr).
pub trait Progress: Send + Sync {
    fn event(&self, msg: &str);
    fn warnings(&self, ds: &Diagnostics);
}

/// A validated project with its allocations.
pub struct Checked {
    pub resolved: Resolved,
    pub warnings: Diagnostics,
}

#[derive(Clone, Debug, Default)]
pub struct PlanOpts {
    pub prune: bool,
    pub domain: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ApplyOpts {
    pub prune: bool,
    pub domain: Option<String>,
    pub dry_run: bool,
    pub jobs: usize,
    pub wait: Option<Duration>,
}

#[derive(Clone, Debug)]
pub enum DestroyTarget {
    Machine(String),
    Domain(String),
    All,
}

/// A plan, ready to print (Display) or serialize (`--json`).
#[derive(Debug, Serialize)]
pub struct PlanReport {
    #[serde(flatten)]
    pub plan: moat_core::plan::Plan,
    /// The ruleset summary (`nftables moat_x: N rules, ...`).
    pub firewall: String,
    /// Actions an interrupted apply left unfinished (the next apply completes them).
    pub interrupted: Vec<String>,
    /// Firewall lines added (`+ ...`) and removed (`- ...`) since the last
    /// applied ruleset; empty when the firewall does not change.
    pub firewall_diff: Vec<String>,
    /// Things drivers see in this root's space that moat did not create
    /// (e.g. an instance made by hand in a moat Incus project): never touched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unmanaged: Vec<String>,
}

impl fmt::Display for PlanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.interrupted.is_empty() {
            writeln!(
                f,
                "An earlier apply was interrupted during: {} (this apply completes it)",
                self.interrupted.join(", ")
            )?;
        }
        write!(f, "{}", self.plan)?;
        if self
            .plan
            .actions
            .iter()
            .any(|a| matches!(a.op, moat_core::plan::Op::ApplyFirewall { .. }))
        {
            writeln!(f, "  firewall: {}", self.firewall)?;
            for l in &self.firewall_diff {
                writeln!(f, "    {l}")?;
            }
        }
        for u in &self.unmanaged {
            writeln!(f, "  unmanaged: {u}")?;
        }
        Ok(())
    }
}

pub struct Engine {
    cfg: Config,
    root_str: String,
    tag: String,
    /// State store connections not in use: opening one costs a schema check
    /// and the last close a WAL checkpoint (two fsyncs), so an engine keeps
    /// them (one per concurrent user) until it is dropped.
    idle_states: std::sync::Mutex<Vec<moat_state::StateStore>>,
}

/// A state store connection of an [`Engine`], back in its pool when dropped.
pub(crate) struct StateRef<'a> {
    engine: &'a Engine,
    store: Option<moat_state::StateStore>,
}

impl std::ops::Deref for StateRef<'_> {
    type Target = moat_state::StateStore;
    fn deref(&self) -> &moat_state::StateStore {
        self.store.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for StateRef<'_> {
    fn deref_mut(&mut self) -> &mut moat_state::StateStore {
        self.store.as_mut().expect("present until drop")
    }
}

impl Drop for StateRef<'_> {
    fn drop(&mut self) {
        if let (Some(s), Ok(mut idle)) = (self.store.take(), self.engine.idle_states.lock()) {
            if s.is_idle() {
                idle.push(s);
            }
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let what = what.into();
    move |source| EngineError::Io { what, source }
}

fn state_err(e: moat_state::StateError) -> EngineError {
    match e {
        moat_state::StateError::Locked { .. } => EngineError::Locked(e.to_string()),
        other => EngineError::Failed(other.to_string()),
    }
}

impl Engine {
    fn new(cfg: Config) -> Engine {
        let root_str = cfg.root.to_string_lossy().into_owned();
        let tag = moat_core::naming::root_tag(&root_str);
        Engine {
            cfg,
            root_str,
            tag,
            idle_states: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Open a root for changes (creates it if missing).
    pub fn open(cfg: Config) -> Result<Engine> {
        std::fs::create_dir_all(&cfg.root).map_err(io(format!(
            "cannot create the moat root {}",
            cfg.root.display()
        )))?;
        std::fs::create_dir_all(&cfg.run_dir).map_err(io(format!(
            "cannot create the run folder {}",
            cfg.run_dir.display()
        )))?;
        check_searchable(&cfg.root)?;
        Ok(Engine::new(cfg))
    }

    /// Open a root for reading only; a missing root is an empty one.
    pub fn open_readonly(cfg: Config) -> Result<Engine> {
        Ok(Engine::new(cfg))
    }

    pub fn root(&self) -> &Path {
        &self.cfg.root
    }

    pub fn root_tag(&self) -> &str {
        &self.tag
    }

    fn has_state(&self) -> bool {
        self.cfg.root.join("state.db").exists()
    }

    fn state(&self) -> Result<StateRef<'_>> {
        let idle = self.idle_states.lock().ok().and_then(|mut v| v.pop());
        let store = match idle {
            Some(s) => s,
            None => moat_state::StateStore::open(&self.cfg.root).map_err(state_err)?,
        };
        Ok(StateRef {
            engine: self,
            store: Some(store),
        })
    }

    fn prior_allocations(&self) -> Result<Allocations> {
        if !self.has_state() {
            return Ok(Allocations::default());
        }
        self.state()?.load_allocations().map_err(state_err)
    }

    fn ctx(&self) -> moat_driver::Ctx {
        moat_driver::Ctx {
            root: self.cfg.root.clone(),
            run_dir: self.cfg.run_dir.clone(),
            root_tag: self.tag.clone(),
        }
    }

    fn host(&self) -> Result<host::Host> {
        host::Host::open(self.ctx(), &self.root_str)
    }

    /// Load, validate and allocate the project at `path`.
    pub fn check(&self, path: &Path) -> Result<Checked> {
        let prior = self.prior_allocations()?;
        let (Allocated { resolved, .. }, warnings) =
            moat_core::check(path, &prior, &self.root_str).map_err(EngineError::Invalid)?;
        // Ad-hoc machines on a domain (`run --domain`) keep their NICs.
        let adhoc = self.adhoc_domains()?;
        let resolved = if adhoc.is_empty() {
            resolved
        } else {
            rundomain::with_adhoc(resolved, &adhoc, &prior, &self.root_str)
        };
        Ok(Checked { resolved, warnings })
    }

    /// Whether the project at `path` declares machine `name` (false when invalid).
    pub fn is_declared(&self, path: &Path, name: &str) -> bool {
        self.check(path)
            .is_ok_and(|c| c.resolved.project.machine(name).is_some())
    }

    /// The ruleset moat would apply for this project.
    pub fn rules(&self, checked: &Checked) -> moat_net::Ruleset {
        moat_net::render(&checked.resolved, moat_net::RenderOptions::default())
    }

    /// Everything of this root the host shows now.
    fn observe(&self, host: &host::Host) -> Result<moat_core::observed::Observed> {
        let (mut networks, firewall_hash) = host
            .net
            .observe(&self.tag)
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        // Bridges created by a driver (Incus) are observed through it.
        for d in host.drivers.values().filter(|d| d.manages_networks()) {
            for n in d
                .list_networks(&host.ctx)
                .map_err(|e| EngineError::Failed(e.to_string()))?
            {
                networks.insert(n.domain.clone(), n);
            }
        }
        let mut machines = BTreeMap::new();
        for d in host.drivers.values() {
            for m in d
                .list(&host.ctx)
                .map_err(|e| EngineError::Failed(e.to_string()))?
            {
                machines.insert(m.full_name.clone(), m);
            }
        }
        let images = host
            .images
            .list()
            .map_err(|e| EngineError::Failed(e.to_string()))?
            .into_iter()
            .map(|i| i.name)
            .collect();
        Ok(moat_core::observed::Observed {
            networks,
            machines,
            firewall_hash,
            images,
        })
    }

    /// What the host shows, less the ad-hoc machines (`moat run`, clones):
    /// those are not the project's, so plans never list or prune them.
    fn observe_managed(
        &self,
        host: &host::Host,
        checked: &Checked,
    ) -> Result<moat_core::observed::Observed> {
        for d in host.drivers.values() {
            d.configure(&host.ctx, &checked.resolved.project)?;
        }
        let mut o = self.observe(host)?;
        for name in self.adhoc_machines()? {
            o.machines.remove(&name);
        }
        // Those a driver recorded as ad-hoc itself (a foreground `run --rm`
        // has no record in the state store).
        o.machines.retain(|_, m| !m.adhoc);
        // Images of drivers with their own store (Incus) are not moat's to build.
        let project = &checked.resolved.project;
        let own_store = |m: &&moat_core::model::Machine| {
            host.drivers
                .get(m.driver.as_str())
                .is_some_and(|d| !d.uses_image_store())
        };
        for m in project.machines().filter(own_store) {
            if !project
                .machines()
                .any(|x| x.image == m.image && !own_store(&x))
            {
                o.images.insert(m.image.clone());
            }
        }
        // A full VM boots its base disk, not a container image: with the disk
        // there (`moat image build --vm`, a cloud image, a copy), the image
        // needs nothing, or apply would build a container image for nothing.
        for m in project
            .machines()
            .filter(|m| m.kind == moat_core::model::MachineType::Vm)
        {
            let only_vms = !project
                .machines()
                .any(|x| x.image == m.image && x.kind != moat_core::model::MachineType::Vm);
            if only_vms && moat_qemu::disk::base_path(&host.ctx.root, &m.image).exists() {
                o.images.insert(m.image.clone());
            }
        }
        // A domain whose DHCP server died is a network to repair (drift).
        for d in checked
            .resolved
            .project
            .enabled_domains()
            .filter(|d| d.dhcp)
        {
            // A driver-made bridge has the driver's DHCP server.
            if host.network_driver(&checked.resolved, &d.name).is_some() {
                continue;
            }
            if let Some(n) = o.networks.get_mut(&d.name) {
                if moat_net::dhcp::running_pid(&self.cfg.run_dir, &n.bridge).is_none() {
                    n.up = false;
                }
            }
        }
        Ok(o)
    }

    fn desired(
        &self,
        checked: &Checked,
        state: Option<&moat_state::StateStore>,
    ) -> Result<moat_core::plan::Desired> {
        let mut desired = moat_core::plan::Desired::new(checked.resolved.clone());
        let rules = self.rules(checked);
        desired.firewall = Some(moat_core::plan::DesiredFirewall {
            hash: rules.hash.clone(),
            summary: rules.summary(),
        });
        if let Some(st) = state {
            for r in st.resources().map_err(state_err)? {
                match r.kind.as_str() {
                    "machine" if !r.pending => {
                        desired.created_machines.insert(r.name);
                    }
                    "network" if !r.pending => {
                        if let Some(d) = r.domain {
                            desired.created_networks.insert(d);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(desired)
    }

    pub fn plan(&self, checked: &Checked, opts: &PlanOpts) -> Result<PlanReport> {
        let host = self.host()?;
        let state = if self.has_state() {
            Some(self.state()?)
        } else {
            None
        };
        let desired = self.desired(checked, state.as_deref())?;
        let observed = self.observe_managed(&host, checked)?;
        let plan = moat_core::plan::plan(
            &desired,
            &observed,
            &moat_core::plan::PlanOptions {
                prune: opts.prune,
                domain: opts.domain.clone(),
            },
        );
        let interrupted = match &state {
            Some(st) => st
                .incomplete()
                .map_err(state_err)?
                .into_iter()
                .map(|e| e.action_id)
                .collect(),
            None => vec![],
        };
        let rules = self.rules(checked);
        let firewall_diff = if plan
            .actions
            .iter()
            .any(|a| matches!(a.op, moat_core::plan::Op::ApplyFirewall { .. }))
        {
            let old = std::fs::read_to_string(self.applied_rules_path()).unwrap_or_default();
            firewall_diff(&old, &rules.body)
        } else {
            vec![]
        };
        let unmanaged = host
            .drivers
            .values()
            .flat_map(|d| d.unmanaged(&host.ctx).unwrap_or_default())
            .collect();
        Ok(PlanReport {
            plan,
            firewall: rules.summary(),
            interrupted,
            firewall_diff,
            unmanaged,
        })
    }

    /// Where the last applied ruleset is kept, to show what a plan changes.
    pub(crate) fn applied_rules_path(&self) -> PathBuf {
        self.cfg.root.join("firewall.nft")
    }
}

/// Containers run as unprivileged host uids (user namespaces): every folder
/// above the root must let them through (the `x` bit for others), or each
/// container fails with an obscure "failed to prepare rootfs".
fn check_searchable(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let abs = std::fs::canonicalize(root).map_err(io(format!(
        "cannot resolve the moat root {}",
        root.display()
    )))?;
    // The root itself is moat's (0700 works: the runtime enters it as root).
    for dir in abs.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(EngineError::Failed(format!(
                "the moat root {} is below {}, which other users cannot enter (mode {:o}); \
                 containers run as unprivileged users and could not reach their files. \
                 Use another --root, or `chmod o+x {}`",
                abs.display(),
                dir.display(),
                meta.permissions().mode() & 0o7777,
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Rule-level difference between two rulesets (`nft -f` text): lines only in
/// `new` as `+ line`, lines only in `old` as `- line`, structure lines
/// (braces, table/chain headers, the hash comment) left out.
pub fn firewall_diff(old: &str, new: &str) -> Vec<String> {
    fn rules(s: &str) -> std::collections::BTreeSet<&str> {
        s.lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty()
                    && *l != "}"
                    && !l.starts_with("table ")
                    && !l.starts_with("chain ")
                    && !l.starts_with("comment ")
                    && !l.contains(" comment \"moat ")
                    && !l.starts_with('#')
            })
            .collect()
    }
    let (o, n) = (rules(old), rules(new));
    let mut out: Vec<String> = n.difference(&o).map(|l| format!("+ {l}")).collect();
    out.extend(o.difference(&n).map(|l| format!("- {l}")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(e: &Engine) -> usize {
        e.idle_states.lock().expect("pool").len()
    }

    #[test]
    fn state_connections_are_opened_once_and_reused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = Engine::open_readonly(Config::for_root(tmp.path())).expect("engine");
        assert_eq!(idle(&e), 0);
        {
            let a = e.state().expect("state");
            assert_eq!(idle(&e), 0);
            // A second user while the first holds one gets its own connection.
            let b = e.state().expect("state");
            b.intend("adhoc", "m1", None, Some("m1")).expect("intend");
            // Each sees the other's committed writes.
            assert!(a
                .resources()
                .expect("resources")
                .iter()
                .any(|r| r.name == "m1"));
        }
        assert_eq!(idle(&e), 2, "both connections are back in the pool");
        let c = e.state().expect("state");
        assert_eq!(idle(&e), 1, "one taken from the pool, none opened");
        assert!(c.is_idle());
        drop(c);
        assert_eq!(idle(&e), 2);
    }

    #[test]
    fn firewall_diff_shows_rules_not_structure() {
        let old = "table inet t {\n chain f {\n  a accept\n  b drop\n }\n}\n";
        let new = "table inet t {\n chain f {\n  a accept\n  c accept\n }\n}\n";
        assert_eq!(
            super::firewall_diff(old, new),
            vec!["+ c accept", "- b drop"]
        );
    }
}
