//! `IncusDriver`: moat's `Driver` trait on top of the Incus REST API.
//!
//! The connection comes from the project's `incus:` settings (handed over by
//! [`Driver::configure`] and remembered in `<root>/incus.json`, so commands
//! run without the project, like `moat status`, reach the same server), else
//! the local Unix socket.
//!
//! Observation lists the instances of every `moat-<tag>-*` project; only
//! instances carrying `user.moat.managed=true` are moat's. Others found there
//! are reported by [`Driver::unmanaged`] and never changed.

use crate::client::{enc, Client};
use crate::mapping::{self, project_name, project_prefix, MANAGED};
use crate::{image, IncusError};
use moat_core::model::{MachineType, Project};
use moat_core::observed::{Limits, ObservedMachine, ObservedNetwork};
use moat_driver::{
    Capabilities, Ctx, DomainNetwork, Driver, DriverError, ExecOutput, ExecSession, MachineSpec,
    Probe, Result, SessionOpts,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

/// Connection settings as remembered in `<root>/incus.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub url: Option<String>,
    pub socket: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub server_cert: Option<PathBuf>,
    /// Existing Incus objects the project adopts (remembered with the rest,
    /// so `moat status` without the project finds them too).
    #[serde(default)]
    pub adopt: Adoption,
}

/// Existing Incus objects moat manages under other names than its own
/// (`incus:` in domains and machines, as `moat import incus` writes them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    /// Domain → Incus project.
    #[serde(default)]
    pub projects: BTreeMap<String, String>,
    /// Domain → bridge network.
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// Machine full name → (project, instance) of an adopted instance.
    #[serde(default)]
    pub instances: BTreeMap<String, (String, String)>,
}

impl Adoption {
    pub fn from_project(p: &Project, tag: &str) -> Adoption {
        let mut a = Adoption::default();
        let Some(c) = &p.incus else {
            return a;
        };
        for (d, x) in &c.domains {
            if let Some(pr) = &x.project {
                a.projects.insert(d.clone(), pr.clone());
            }
            if let Some(n) = &x.network {
                a.networks.insert(d.clone(), n.clone());
            }
        }
        for dom in p.domains.values() {
            for m in dom.machines.values() {
                if let Some(i) = c.instances.get(&m.full_name) {
                    let project = a.project(tag, &dom.name);
                    a.instances
                        .insert(m.full_name.clone(), (project, i.clone()));
                }
            }
        }
        a
    }

    /// Incus project of `domain`: the adopted one, else `moat-<tag>-<domain>`.
    pub fn project(&self, tag: &str, domain: &str) -> String {
        self.projects
            .get(domain)
            .cloned()
            .unwrap_or_else(|| project_name(tag, domain))
    }

    /// The machine an adopted instance stands for.
    fn machine_of(&self, project: &str, instance: &str) -> Option<&str> {
        self.instances
            .iter()
            .find(|(_, (p, i))| p == project && i == instance)
            .map(|(m, _)| m.as_str())
    }
}

impl Connection {
    pub fn from_project(p: &Project, tag: &str) -> Connection {
        let Some(c) = &p.incus else {
            return Connection::default();
        };
        let abs = |x: &Option<PathBuf>| x.as_ref().map(|x| p.dir.join(x));
        Connection {
            url: c.url.clone(),
            socket: abs(&c.socket),
            client_cert: abs(&c.client_cert),
            client_key: abs(&c.client_key),
            server_cert: abs(&c.server_cert),
            adopt: Adoption::from_project(p, tag),
        }
    }

    pub fn client(&self) -> std::result::Result<Client, IncusError> {
        match &self.url {
            None => Ok(match &self.socket {
                Some(s) => Client::unix(s),
                None => Client::local(),
            }),
            Some(url) => {
                let need = |x: &Option<PathBuf>, what: &str| {
                    x.clone().ok_or_else(|| IncusError::Config {
                        message: format!("`incus.url` is set: `incus.{what}` is needed too"),
                    })
                };
                Client::https(
                    url,
                    &need(&self.client_cert, "client_cert")?,
                    &need(&self.client_key, "client_key")?,
                    &need(&self.server_cert, "server_cert")?,
                )
            }
        }
    }
}

pub struct IncusDriver {
    client: RwLock<Option<Client>>,
    adopt: RwLock<Adoption>,
    /// Serialises image uploads (machine creates run in parallel).
    image_lock: Mutex<()>,
    pub stop_timeout: Duration,
}

impl Default for IncusDriver {
    fn default() -> Self {
        Self::new()
    }
}

fn failed(machine: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Failed {
        machine: machine.into(),
        message: e.to_string(),
    }
}

/// Instance found in one of the root's projects.
#[derive(Clone, Debug)]
pub struct Found {
    pub project: String,
    pub inst: Value,
    /// The machine it is: moat's own instances by name, adopted ones by the
    /// project's `incus:` names; `None` for instances moat leaves alone.
    pub machine: Option<String>,
}

impl IncusDriver {
    pub fn new() -> Self {
        IncusDriver {
            client: RwLock::new(None),
            adopt: RwLock::new(Adoption::default()),
            image_lock: Mutex::new(()),
            stop_timeout: Duration::from_secs(10),
        }
    }

    /// A driver bound to one server (tests, import).
    pub fn with_client(client: Client) -> Self {
        let d = Self::new();
        if let Ok(mut g) = d.client.write() {
            *g = Some(client);
        }
        d
    }

    fn conn_file(ctx: &Ctx) -> PathBuf {
        ctx.root.join("incus.json")
    }

    /// The client for this root: configured, remembered, or the local socket.
    pub fn client(&self, ctx: &Ctx) -> std::result::Result<Client, IncusError> {
        if let Ok(g) = self.client.read() {
            if let Some(c) = g.as_ref() {
                return Ok(c.clone());
            }
        }
        let conn: Connection = std::fs::read(Self::conn_file(ctx))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let c = conn.client()?;
        if let Ok(mut g) = self.adopt.write() {
            *g = conn.adopt.clone();
        }
        if let Ok(mut g) = self.client.write() {
            *g = Some(c.clone());
        }
        Ok(c)
    }

    /// The adopted names in effect (configured, else remembered).
    pub fn adoption(&self) -> Adoption {
        self.adopt.read().map(|a| a.clone()).unwrap_or_default()
    }

    fn cl(&self, ctx: &Ctx, machine: &str) -> Result<Client> {
        self.client(ctx).map_err(|e| failed(machine, e))
    }

    /// Every instance of this root's projects, with its state (`recursion=2`).
    /// An unreachable server yields nothing: a host without Incus has no
    /// Incus machines.
    pub fn instances(&self, ctx: &Ctx) -> std::result::Result<Vec<Found>, IncusError> {
        let c = self.client(ctx)?;
        let all = match c.get("/1.0/instances?all-projects=true&recursion=2") {
            Ok(v) => v,
            Err(IncusError::Connect { .. }) => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let prefix = project_prefix(&ctx.root_tag);
        let adopt = self.adoption();
        Ok(all
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| {
                let p = i["project"].as_str()?;
                let name = i["name"].as_str()?;
                let ours = p.starts_with(&prefix) || adopt.projects.values().any(|x| x == p);
                // Managed instances of other roots' projects are theirs.
                let machine = match adopt.machine_of(p, name) {
                    Some(m) => Some(m.to_string()),
                    None if ours && mapping::is_managed(i) => Some(name.to_string()),
                    None => None,
                };
                (ours || machine.is_some()).then(|| Found {
                    project: p.to_string(),
                    inst: i.clone(),
                    machine,
                })
            })
            .collect())
    }

    /// The managed instance `full_name`, if any.
    pub fn find(&self, ctx: &Ctx, full_name: &str) -> Result<Option<Found>> {
        let all = self.instances(ctx).map_err(|e| failed(full_name, e))?;
        Ok(all
            .into_iter()
            .find(|f| f.machine.as_deref() == Some(full_name)))
    }

    fn must_find(&self, ctx: &Ctx, full_name: &str) -> Result<Found> {
        self.find(ctx, full_name)?
            .ok_or_else(|| DriverError::NoSuchMachine {
                machine: full_name.into(),
            })
    }

    fn inst_path(f: &Found, suffix: &str) -> String {
        format!(
            "/1.0/instances/{}{suffix}?project={}",
            enc(f.inst["name"].as_str().unwrap_or("")),
            enc(&f.project)
        )
    }

    fn state(&self, c: &Client, f: &Found, body: Value) -> std::result::Result<(), IncusError> {
        c.call("PUT", &Self::inst_path(f, "/state"), Some(&body))
            .map(|_| ())
    }

    /// Cluster members (empty when the server is not clustered).
    pub fn members(c: &Client) -> std::result::Result<Vec<String>, IncusError> {
        let info = c.get("/1.0")?;
        if !info["environment"]["server_clustered"]
            .as_bool()
            .unwrap_or(false)
        {
            return Ok(vec![]);
        }
        let m = c.get("/1.0/cluster/members")?;
        Ok(m.as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| last_segment(u.as_str()?))
            .collect())
    }

    /// Where an instance runs (cluster member), `None` when not clustered.
    pub fn location(&self, ctx: &Ctx, full_name: &str) -> Result<Option<String>> {
        let f = self.must_find(ctx, full_name)?;
        Ok(f.inst["location"]
            .as_str()
            .filter(|l| !l.is_empty() && *l != "none")
            .map(str::to_string))
    }

    /// The console of a running machine (the pty its init writes to) at
    /// `size` (rows, cols), relayed over Incus's websockets; the caller
    /// leaves it by closing the session's fd.
    pub fn console_session(
        &self,
        ctx: &Ctx,
        full_name: &str,
        size: (u16, u16),
    ) -> Result<ExecSession> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        crate::session::console(&c, &Self::inst_path(&f, "/console"), &f.project, size)
            .map_err(|e| failed(full_name, e))
    }

    /// What the machine's console printed so far (Incus's console log).
    pub fn console_log(&self, ctx: &Ctx, full_name: &str) -> Result<Vec<u8>> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        c.get_raw(&Self::inst_path(&f, "/console"))
            .map_err(|e| failed(full_name, e))
    }

    /// moat's copy of a machine's console log. Incus hands each part of the
    /// console log out once (a read empties it), so `moat logs` appends what
    /// it reads here and prints this file; destroy removes it.
    pub fn console_copy(ctx: &Ctx, full_name: &str) -> std::path::PathBuf {
        ctx.root
            .join("incus-console")
            .join(format!("{full_name}.log"))
    }

    /// Appends what the console printed since the last read to
    /// [`Self::console_copy`] and returns that file.
    pub fn sync_console(&self, ctx: &Ctx, full_name: &str) -> Result<std::path::PathBuf> {
        use std::io::Write;
        let new = self.console_log(ctx, full_name)?;
        let path = Self::console_copy(ctx, full_name);
        let io = |e: std::io::Error| DriverError::Io {
            machine: full_name.to_string(),
            source: e,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        f.write_all(&new).map_err(io)?;
        Ok(path)
    }

    /// Takes a snapshot `name` of a machine.
    pub fn snapshot(&self, ctx: &Ctx, full_name: &str, name: &str) -> Result<()> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        c.call(
            "POST",
            &Self::inst_path(&f, "/snapshots"),
            Some(&json!({"name": name})),
        )
        .map(|_| ())
        .map_err(|e| failed(full_name, e))
    }

    /// Restores snapshot `name` (the instance is stopped first and started
    /// again if it was running).
    pub fn restore(&self, ctx: &Ctx, full_name: &str, name: &str) -> Result<()> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        let was_running = f.inst["status"].as_str() == Some("Running");
        if was_running {
            self.stop(ctx, full_name, self.stop_timeout)?;
        }
        let mut inst = c
            .get(&Self::inst_path(&f, ""))
            .map_err(|e| failed(full_name, e))?;
        inst["restore"] = json!(name);
        c.call("PUT", &Self::inst_path(&f, ""), Some(&inst))
            .map_err(|e| failed(full_name, e))?;
        if was_running {
            self.start(ctx, full_name)?;
        }
        Ok(())
    }

    pub fn snapshots(&self, ctx: &Ctx, full_name: &str) -> Result<Vec<String>> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        let v = c
            .get(&Self::inst_path(&f, "/snapshots"))
            .map_err(|e| failed(full_name, e))?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| last_segment(u.as_str()?))
            .collect())
    }

    /// Snapshots with their creation time (Unix seconds; 0 when unreadable).
    pub fn snapshot_list(&self, ctx: &Ctx, full_name: &str) -> Result<Vec<(String, u64)>> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        let path = Self::inst_path(&f, "/snapshots").replacen('?', "?recursion=1&", 1);
        let v = c.get(&path).map_err(|e| failed(full_name, e))?;
        let mut out: Vec<(String, u64)> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let name = s["name"].as_str()?;
                // `name` may come as `instance/snapshot`.
                let name = name.rsplit('/').next().unwrap_or(name).to_string();
                let t = s["created_at"].as_str().and_then(unix_secs).unwrap_or(0);
                Some((name, t))
            })
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        Ok(out)
    }

    pub fn delete_snapshot(&self, ctx: &Ctx, full_name: &str, name: &str) -> Result<()> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        c.call(
            "DELETE",
            &Self::inst_path(&f, &format!("/snapshots/{}", enc(name))),
            None,
        )
        .map(|_| ())
        .map_err(|e| failed(full_name, e))
    }

    fn ensure_project(
        &self,
        c: &Client,
        tag: &str,
        domain: &str,
    ) -> std::result::Result<(), IncusError> {
        let p = self.adoption().project(tag, domain);
        if c.get_opt(&format!("/1.0/projects/{}", enc(&p)))?.is_none() {
            let mut body = mapping::project_body(tag, domain);
            body["name"] = json!(p);
            match c.call("POST", "/1.0/projects", Some(&body)) {
                Ok(_) => {}
                Err(e) if e.to_string().contains("already exists") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Creates the per-member pending networks a cluster needs before the
    /// network itself ([`mapping::NetworkKind::BridgePerMember`]: one bridge
    /// per member, same subnet, not connected; with OVN the domain gets one
    /// OVN network instead). Run here on a single-member cluster only.
    fn cluster_pending(
        c: &Client,
        members: &[String],
        bridge: &str,
    ) -> std::result::Result<(), IncusError> {
        for m in members {
            let body = json!({"name": bridge, "type": "bridge"});
            match c.call(
                "POST",
                &format!("/1.0/networks?target={}", enc(m)),
                Some(&body),
            ) {
                Ok(_) => {}
                Err(e) if e.to_string().contains("already") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether the server could give a domain one network across members (OVN).
    pub fn is_ovn_capable(c: &Client) -> bool {
        c.get("/1.0")
            .ok()
            .and_then(|i| {
                i["config"]["network.ovn.northbound_connection"]
                    .as_str()
                    .map(|s| !s.is_empty())
            })
            .unwrap_or(false)
    }
}

/// `2026-11-22T09:30:00.123456789Z` (UTC, as Incus writes it) → Unix seconds.
fn unix_secs(t: &str) -> Option<u64> {
    let (date, time) = t.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut h = time.get(..8)?.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
    // Days from civil (proleptic Gregorian), 1970-01-01 = 0.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// `/1.0/x/NAME?project=P` → `NAME`.
fn last_segment(url: &str) -> Option<String> {
    let s = url.split('?').next()?.rsplit('/').next()?;
    Some(s.to_string())
}

fn already(e: &IncusError, what: &str) -> bool {
    let s = e.to_string();
    s.contains(what)
}

impl Driver for IncusDriver {
    fn name(&self) -> &'static str {
        "incus"
    }

    fn probe(&self, ctx: &Ctx) -> Probe {
        match self.client(ctx).and_then(|c| c.get("/1.0")) {
            Ok(v) if v["auth"].as_str() == Some("trusted") => Probe::Available,
            Ok(_) => Probe::Unavailable {
                reason: "the Incus server does not trust this client".into(),
                hint: "add the client certificate: `incus config trust add-certificate CERT`"
                    .into(),
            },
            Err(e) => Probe::Unavailable {
                reason: e.to_string(),
                hint: "start incusd (scripts/incus-env.sh start), or set `incus: {url, ...}` \
                       in the project"
                    .into(),
            },
        }
    }

    fn supports(&self, kind: MachineType) -> bool {
        // VMs need the server's VM support (vhost_vsock); containers always work.
        matches!(kind, MachineType::Container | MachineType::Vm)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            exec: true,
            snapshot: true,
            clone: false,
            console: true,
            update_limits: true,
        }
    }

    fn configure(&self, ctx: &Ctx, project: &Project) -> Result<()> {
        let conn = Connection::from_project(project, &ctx.root_tag);
        let client = conn.client().map_err(|e| failed("incus", e))?;
        if let Ok(mut g) = self.client.write() {
            *g = Some(client);
        }
        if let Ok(mut g) = self.adopt.write() {
            *g = conn.adopt.clone();
        }
        // Remembered for commands run without the project (status, destroy).
        if ctx.root.is_dir() && project.machines().any(|m| m.driver == "incus") {
            if let Ok(b) = serde_json::to_vec_pretty(&conn) {
                let _ = std::fs::write(Self::conn_file(ctx), b);
            }
        }
        Ok(())
    }

    fn list(&self, ctx: &Ctx) -> Result<Vec<ObservedMachine>> {
        let all = self.instances(ctx).map_err(|e| failed("incus", e))?;
        Ok(all
            .iter()
            .filter_map(|f| mapping::observe_as(&f.inst, f.machine.as_deref()?))
            .collect())
    }

    fn observe(&self, ctx: &Ctx, full_name: &str) -> Result<Option<ObservedMachine>> {
        Ok(self
            .find(ctx, full_name)?
            .and_then(|f| mapping::observe_as(&f.inst, f.machine.as_deref()?)))
    }

    fn create(&self, ctx: &Ctx, spec: &MachineSpec) -> Result<()> {
        let m = &spec.machine;
        let name = m.full_name.as_str();
        let c = self.cl(ctx, name)?;
        let adopt = self.adoption();
        let project = adopt.project(&ctx.root_tag, &m.domain);
        let iname = adopt
            .instances
            .get(name)
            .map(|(_, i)| i.clone())
            .unwrap_or_else(|| name.to_string());
        let all = self.instances(ctx).map_err(|e| failed(name, e))?;
        if let Some(f) = all
            .iter()
            .find(|f| f.project == project && f.inst["name"].as_str() == Some(iname.as_str()))
        {
            if f.machine.as_deref() != Some(name) {
                return Err(failed(
                    name,
                    format!(
                        "Incus project {project} holds an instance '{iname}' that moat did not \
                         create; moat leaves it alone: rename or delete it by hand, or adopt \
                         it with `incus: {{instance: {iname}}}` on the machine"
                    ),
                ));
            }
            return Ok(());
        }
        self.ensure_project(&c, &ctx.root_tag, &m.domain)
            .map_err(|e| failed(name, e))?;
        {
            let _g = self.image_lock.lock();
            image::ensure(&c, &m.image).map_err(|e| failed(name, e))?;
        }
        for vol in m.persistent.keys() {
            let body =
                json!({"name": mapping::volume_name(name, vol), "type": "custom", "config": {}});
            match c.call(
                "POST",
                &format!(
                    "/1.0/storage-pools/{}/volumes/custom?project={}",
                    mapping::POOL,
                    enc(&project)
                ),
                Some(&body),
            ) {
                Ok(_) => {}
                Err(e) if already(&e, "already exists") => {}
                Err(e) => return Err(failed(name, e)),
            }
        }
        let mut body = mapping::instance_body(spec, &m.image).map_err(|e| failed(name, e))?;
        body["name"] = json!(iname);
        let mut path = format!("/1.0/instances?project={}", enc(&project));
        if let Some(t) = &m.target {
            path.push_str(&format!("&target={}", enc(t)));
        }
        c.call("POST", &path, Some(&body))
            .map(|_| ())
            .map_err(|e| failed(name, e))
    }

    fn start(&self, ctx: &Ctx, full_name: &str) -> Result<()> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        if f.inst["status"].as_str() == Some("Running") {
            return Ok(());
        }
        match self.state(&c, &f, json!({"action": "start"})) {
            Ok(()) => Ok(()),
            Err(e) if already(&e, "already running") => Ok(()),
            Err(e) => Err(failed(full_name, e)),
        }
    }

    fn stop(&self, ctx: &Ctx, full_name: &str, timeout: Duration) -> Result<()> {
        let c = self.cl(ctx, full_name)?;
        let Some(f) = self.find(ctx, full_name)? else {
            return Ok(());
        };
        if f.inst["status"].as_str() == Some("Stopped") {
            return Ok(());
        }
        let secs = timeout.as_secs().max(1);
        let clean = self.state(
            &c,
            &f,
            json!({"action": "stop", "timeout": secs, "force": false}),
        );
        if clean.is_ok() {
            return Ok(());
        }
        // A clean stop can be lost (early boot) or time out: force it.
        match self.state(&c, &f, json!({"action": "stop", "force": true})) {
            Ok(()) => Ok(()),
            Err(e) if already(&e, "already stopped") => Ok(()),
            Err(e) => Err(failed(full_name, e)),
        }
    }

    fn destroy(&self, ctx: &Ctx, full_name: &str) -> Result<()> {
        let _ = std::fs::remove_file(Self::console_copy(ctx, full_name));
        let c = self.cl(ctx, full_name)?;
        let Some(f) = self.find(ctx, full_name)? else {
            return Ok(());
        };
        if f.inst["status"].as_str() != Some("Stopped") {
            match self.state(&c, &f, json!({"action": "stop", "force": true})) {
                Ok(()) => {}
                Err(e) if already(&e, "already stopped") => {}
                Err(e) => return Err(failed(full_name, e)),
            }
        }
        match c.call("DELETE", &Self::inst_path(&f, ""), None) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(failed(full_name, e)),
        }
    }

    fn update_limits(&self, ctx: &Ctx, full_name: &str, limits: &Limits) -> Result<()> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        let mut inst = c
            .get(&Self::inst_path(&f, ""))
            .map_err(|e| failed(full_name, e))?;
        let mut config: std::collections::BTreeMap<String, String> =
            serde_json::from_value(inst["config"].clone()).unwrap_or_default();
        mapping::apply_limits(&mut config, limits);
        inst["config"] = json!(config);
        c.call("PUT", &Self::inst_path(&f, ""), Some(&inst))
            .map(|_| ())
            .map_err(|e| failed(full_name, e))
    }

    fn exec(&self, ctx: &Ctx, full_name: &str, argv: &[String]) -> Result<ExecOutput> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        let body = json!({
            "command": argv,
            "record-output": true,
            "wait-for-websocket": false,
            "interactive": false,
            "environment": {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        });
        let meta = c
            .call("POST", &Self::inst_path(&f, "/exec"), Some(&body))
            .map_err(|e| failed(full_name, e))?;
        let mut out = ExecOutput {
            status: meta["return"].as_i64().unwrap_or(-1) as i32,
            ..Default::default()
        };
        for (fd, buf) in [("1", &mut out.stdout), ("2", &mut out.stderr)] {
            if let Some(p) = meta["output"][fd].as_str() {
                let with_project = format!("{p}?project={}", enc(&f.project));
                *buf = c.get_raw(&with_project).map_err(|e| failed(full_name, e))?;
                // The log files stay on the server until deleted.
                let _ = c.send("DELETE", &with_project, None);
            }
        }
        Ok(out)
    }

    fn exec_session(
        &self,
        ctx: &Ctx,
        full_name: &str,
        argv: &[String],
        opts: &SessionOpts,
    ) -> Result<ExecSession> {
        let c = self.cl(ctx, full_name)?;
        let f = self.must_find(ctx, full_name)?;
        crate::session::exec(&c, &Self::inst_path(&f, "/exec"), &f.project, argv, opts).map_err(
            |e| match e.to_string() {
                m if m.contains("not running") => {
                    failed(full_name, format!("{m}; `moat start {full_name}` first"))
                }
                m => failed(full_name, m),
            },
        )
    }

    fn manages_networks(&self) -> bool {
        true
    }

    fn uses_image_store(&self) -> bool {
        false
    }

    fn locations(&self, ctx: &Ctx) -> Result<BTreeMap<String, String>> {
        let all = self.instances(ctx).map_err(|e| failed("incus", e))?;
        Ok(all
            .into_iter()
            .filter_map(|f| {
                let loc = f.inst["location"].as_str()?;
                let machine = f.machine.clone()?;
                (!loc.is_empty() && loc != "none").then(|| (machine, loc.to_string()))
            })
            .collect())
    }

    fn list_networks(&self, ctx: &Ctx) -> Result<Vec<ObservedNetwork>> {
        let c = self.client(ctx).map_err(|e| failed("incus", e))?;
        let nets = match c.get("/1.0/networks?recursion=1") {
            Ok(v) => v,
            Err(IncusError::Connect { .. }) => return Ok(vec![]),
            Err(e) => return Err(failed("incus", e)),
        };
        let mut out = Vec::new();
        let adopt = self.adoption();
        for n in nets.as_array().into_iter().flatten() {
            // An adopted network is the domain's bridge as long as it exists.
            if let Some((domain, _)) = adopt.networks.iter().find(|(_, b)| n["name"] == **b) {
                out.push(mapping::observe_adopted_network(domain, n));
                continue;
            }
            let Some(domain) = n["config"][mapping::DOMAIN].as_str() else {
                continue;
            };
            if n["config"][mapping::ROOT].as_str() != Some(ctx.root_tag.as_str()) {
                continue;
            }
            // Wired: the project exists and its default profile uses the bridge.
            let p = adopt.project(&ctx.root_tag, domain);
            let wired = c
                .get_opt(&format!("/1.0/profiles/default?project={}", enc(&p)))
                .ok()
                .flatten()
                .is_some_and(|prof| prof["devices"]["eth0"]["network"] == n["name"]);
            if let Some(o) = mapping::observe_network(&ctx.root_tag, n, wired) {
                out.push(o);
            }
        }
        Ok(out)
    }

    fn ensure_network(&self, ctx: &Ctx, net: &DomainNetwork) -> Result<()> {
        let who = format!("network {}", net.bridge);
        let c = self.client(ctx).map_err(|e| failed(&who, e))?;
        let tag = &ctx.root_tag;
        let body = mapping::network_body(tag, net);
        let path = format!("/1.0/networks/{}", enc(&net.bridge));
        let err = |e: IncusError| failed(&who, e);
        let adopt = self.adoption();
        let adopted = adopt.networks.contains_key(&net.domain);
        match c.get_opt(&path).map_err(err)? {
            // An adopted network keeps its own settings; only its address follows the files.
            Some(mut old) if adopted => {
                let want = body["config"]["ipv4.address"].clone();
                if old["config"]["ipv4.address"] != want {
                    old["config"]["ipv4.address"] = want;
                    let put = json!({"config": old["config"], "description": old["description"]});
                    c.call("PUT", &path, Some(&put)).map_err(err)?;
                }
            }
            Some(_) => {
                let put = json!({"config": body["config"], "description": body["description"]});
                c.call("PUT", &path, Some(&put)).map_err(err)?;
            }
            None => {
                let members = Self::members(&c).map_err(err)?;
                let ovn = members.len() > 1 && Self::is_ovn_capable(&c);
                match mapping::network_kind(members.len(), ovn) {
                    // Not run on this host (no OVN): the bodies are unit-tested only.
                    mapping::NetworkKind::Ovn => {
                        let acl = mapping::ovn_acl_body(tag, net);
                        match c.call("POST", "/1.0/network-acls", Some(&acl)) {
                            Ok(_) => {}
                            Err(e) if e.to_string().contains("already exists") => {}
                            Err(e) => return Err(err(e)),
                        }
                        let ovn = mapping::ovn_network_body(tag, net, mapping::OVN_UPLINK);
                        c.call("POST", "/1.0/networks", Some(&ovn)).map_err(err)?;
                    }
                    kind => {
                        if kind == mapping::NetworkKind::BridgePerMember {
                            Self::cluster_pending(&c, &members, &net.bridge).map_err(err)?;
                        }
                        c.call("POST", "/1.0/networks", Some(&body)).map_err(err)?;
                    }
                }
            }
        }
        self.ensure_project(&c, tag, &net.domain).map_err(err)?;
        let p = adopt.project(tag, &net.domain);
        let dpath = format!("/1.0/profiles/default?project={}", enc(&p));
        let mut profile = mapping::default_profile(&net.bridge);
        if adopted || adopt.projects.contains_key(&net.domain) {
            // An adopted project's default profile keeps its devices; eth0 is
            // pointed at the bridge.
            if let Some(old) = c.get_opt(&dpath).map_err(err)? {
                let mut devices = old["devices"].clone();
                if !devices.is_object() {
                    devices = json!({});
                }
                devices["eth0"] = profile["devices"]["eth0"].clone();
                if devices.get("root").is_none() {
                    devices["root"] = profile["devices"]["root"].clone();
                }
                profile = json!({"description": old["description"], "config": old["config"], "devices": devices});
            }
        }
        c.call("PUT", &dpath, Some(&profile)).map_err(err)?;
        for prof in net.profiles.values() {
            let b = mapping::profile_body(prof);
            let ppath = format!("/1.0/profiles/{}?project={}", enc(&prof.name), enc(&p));
            if c.get_opt(&ppath).map_err(err)?.is_some() {
                c.call("PUT", &ppath, Some(&b)).map_err(err)?;
            } else {
                c.call(
                    "POST",
                    &format!("/1.0/profiles?project={}", enc(&p)),
                    Some(&b),
                )
                .map_err(err)?;
            }
        }
        Ok(())
    }

    fn delete_network(&self, ctx: &Ctx, bridge: &str) -> Result<bool> {
        let who = format!("network {bridge}");
        let c = self.client(ctx).map_err(|e| failed(&who, e))?;
        let err = |e: IncusError| failed(&who, e);
        let path = format!("/1.0/networks/{}", enc(bridge));
        let net = match c.get_opt(&path) {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(false),
            Err(IncusError::Connect { .. }) => return Ok(false),
            Err(e) => return Err(err(e)),
        };
        // An adopted network is the user's: left in place, and nobody else's to delete.
        if self.adoption().networks.values().any(|b| b == bridge) {
            return Ok(true);
        }
        if net["config"][mapping::ROOT].as_str() != Some(ctx.root_tag.as_str()) {
            return Ok(false);
        }
        let adopt = self.adoption();
        // An adopted project is the user's: never deleted with the network.
        if let Some(domain) = net["config"][mapping::DOMAIN]
            .as_str()
            .filter(|d| !adopt.projects.contains_key(*d))
        {
            let p = project_name(&ctx.root_tag, domain);
            let pq = enc(&p);
            if c.get_opt(&format!("/1.0/projects/{pq}"))
                .map_err(err)?
                .is_some()
            {
                // Persistent volumes and profiles go with the domain; instances
                // were deleted before (unmanaged ones make the delete fail, with
                // Incus's message naming them).
                let vols = c
                    .get(&format!(
                        "/1.0/storage-pools/{}/volumes/custom?project={pq}",
                        mapping::POOL
                    ))
                    .unwrap_or_default();
                for v in vols.as_array().into_iter().flatten() {
                    if let Some(u) = v.as_str() {
                        let name = u.rsplit('/').next().unwrap_or("");
                        let _ = c.call(
                            "DELETE",
                            &format!(
                                "/1.0/storage-pools/{}/volumes/custom/{}?project={pq}",
                                mapping::POOL,
                                enc(name)
                            ),
                            None,
                        );
                    }
                }
                let profs = c
                    .get(&format!("/1.0/profiles?project={pq}"))
                    .unwrap_or_default();
                for u in profs.as_array().into_iter().flatten() {
                    let name = u.as_str().and_then(|u| u.rsplit('/').next()).unwrap_or("");
                    let name = name.split('?').next().unwrap_or("");
                    if name != "default" && !name.is_empty() {
                        let _ = c.call(
                            "DELETE",
                            &format!("/1.0/profiles/{}?project={pq}", enc(name)),
                            None,
                        );
                    }
                }
                // The default profile points at the bridge: detach before deleting.
                let _ = c.call(
                    "PUT",
                    &format!("/1.0/profiles/default?project={pq}"),
                    Some(&json!({"config": {}, "devices": {}})),
                );
                c.call("DELETE", &format!("/1.0/projects/{pq}"), None)
                    .map_err(err)?;
            }
        }
        c.call("DELETE", &path, None).map_err(err)?;
        // An OVN domain's ACL goes with its network.
        if net["type"].as_str() == Some("ovn") {
            if let Some(acl) = net["config"]["security.acls"].as_str() {
                let _ = c.call("DELETE", &format!("/1.0/network-acls/{}", enc(acl)), None);
            }
        }
        Ok(true)
    }

    fn unmanaged(&self, ctx: &Ctx) -> Result<Vec<String>> {
        let all = self.instances(ctx).map_err(|e| failed("incus", e))?;
        Ok(all
            .iter()
            .filter(|f| f.machine.is_none() && f.inst["config"][MANAGED].as_str() != Some("true"))
            .map(|f| {
                format!(
                    "incus instance {}/{} (not created by moat; left alone)",
                    f.project,
                    f.inst["name"].as_str().unwrap_or("?")
                )
            })
            .collect())
    }
}
