//! `status`, `destroy` and single-machine operations.

use crate::apply::machine_spec;
use crate::{state_err, DestroyTarget, Engine, EngineError, Progress, Result};
use moat_core::model::NetworkMode;
use moat_core::observed::MachineState;
use serde::Serialize;
use std::fmt;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Serialize)]
pub struct DomainStatus {
    pub name: String,
    pub trust_level: String,
    pub subnet: Option<String>,
    pub bridge: Option<String>,
    /// The bridge exists on the host and is up.
    pub up: bool,
    pub enabled: bool,
}

#[derive(Debug, Serialize)]
pub struct MachineStatus {
    pub name: String,
    pub domain: String,
    pub kind: String,
    pub driver: String,
    pub ip: Option<String>,
    /// `domain`, `host` (shares the host's network: admin only) or `none`.
    pub network: String,
    /// `running`, `stopped`, `crashed: <reason>`, or `absent` (declared, not created).
    pub state: String,
    /// Declared in the project (false: an orphan).
    pub declared: bool,
    /// Cluster member the machine runs on (Incus clusters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// Native containers: `idmapped` or `shifted` (how the root's owners fit
    /// the user namespace; see docs/runtime.md), `unmapped` when privileged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs_ownership: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub root: String,
    pub root_tag: String,
    pub project: Option<String>,
    pub domains: Vec<DomainStatus>,
    pub machines: Vec<MachineStatus>,
    /// Whether moat's nftables table is present and matches the project.
    pub firewall: String,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "root {} (tag {}){}",
            self.root,
            self.root_tag,
            self.project
                .as_ref()
                .map(|p| format!(", project {p}"))
                .unwrap_or_default()
        )?;
        writeln!(f, "firewall: {}", self.firewall)?;
        if !self.domains.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "{:<10} {:<13} {:<17} {:<15} STATE",
                "DOMAIN", "TRUST", "SUBNET", "BRIDGE"
            )?;
            for d in &self.domains {
                writeln!(
                    f,
                    "{:<10} {:<13} {:<17} {:<15} {}",
                    d.name,
                    d.trust_level,
                    d.subnet.as_deref().unwrap_or("-"),
                    d.bridge.as_deref().unwrap_or("-"),
                    if !d.enabled {
                        "disabled"
                    } else if d.up {
                        "up"
                    } else {
                        "absent"
                    }
                )?;
            }
        }
        if !self.machines.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "{:<24} {:<9} {:<8} {:<15} {:<8} STATE",
                "MACHINE", "TYPE", "DRIVER", "ADDRESS", "NETWORK"
            )?;
            for m in &self.machines {
                let net = if m.network == "host" {
                    "HOST!"
                } else {
                    m.network.as_str()
                };
                writeln!(
                    f,
                    "{:<24} {:<9} {:<8} {:<15} {:<8} {}{}{}",
                    m.name,
                    m.kind,
                    m.driver,
                    m.ip.as_deref().unwrap_or("-"),
                    net,
                    m.state,
                    m.member
                        .as_ref()
                        .map(|x| format!(" on {x}"))
                        .unwrap_or_default(),
                    if m.declared {
                        ""
                    } else {
                        " (orphan: not in the project)"
                    }
                )?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct DestroyReport {
    pub destroyed: Vec<String>,
}

impl fmt::Display for DestroyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.destroyed.is_empty() {
            return writeln!(f, "Nothing to destroy.");
        }
        for d in &self.destroyed {
            writeln!(f, "destroyed {d}")?;
        }
        Ok(())
    }
}

fn state_word(s: &MachineState) -> String {
    match s {
        MachineState::Running => "running".into(),
        MachineState::Stopped => "stopped".into(),
        MachineState::Crashed { reason } => format!("crashed: {reason}"),
    }
}

impl Engine {
    /// Domains and machines: declared ones (when a project is given) merged
    /// with what the host shows for this root.
    pub fn status(&self, project: Option<&Path>) -> Result<Status> {
        let checked = match project {
            Some(p) => Some(self.check(p)?),
            None => None,
        };
        let mut members = std::collections::BTreeMap::new();
        let observed = if self.cfg.root.exists() {
            let host = self.host()?;
            let o = self.observe(&host)?;
            for d in host.drivers.values() {
                members.extend(d.locations(&host.ctx).unwrap_or_default());
            }
            Some(o)
        } else {
            None
        };
        let observed = observed.unwrap_or_default();
        let mut domains = Vec::new();
        let mut machines = Vec::new();
        let mut firewall = match &observed.firewall_hash {
            Some(_) => "applied".to_string(),
            None => "absent".to_string(),
        };
        if let Some(c) = &checked {
            let r = &c.resolved;
            let want = self.rules(c).hash;
            if let Some(h) = &observed.firewall_hash {
                firewall = if *h == want {
                    "applied, up to date".into()
                } else {
                    "applied, differs from the project (run moat apply)".into()
                };
            }
            for d in r.project.domains.values() {
                let net = r.networks.get(&d.name);
                domains.push(DomainStatus {
                    name: d.name.clone(),
                    trust_level: d.trust_level.as_str().into(),
                    subnet: net.map(|n| n.subnet.to_string()),
                    bridge: net.map(|n| n.bridge.clone()),
                    up: observed.networks.get(&d.name).is_some_and(|n| n.up),
                    enabled: d.enabled,
                });
            }
            for m in r.project.machines() {
                let obs = observed.machines.get(&m.full_name);
                machines.push(MachineStatus {
                    name: m.full_name.clone(),
                    domain: m.domain.clone(),
                    kind: m.kind.as_str().into(),
                    driver: m.driver.clone(),
                    ip: r.nics.get(&m.full_name).map(|n| n.ip.to_string()),
                    network: match m.network {
                        NetworkMode::Domain => "domain",
                        NetworkMode::Host => "host",
                        NetworkMode::None => "none",
                    }
                    .into(),
                    state: obs
                        .map(|o| state_word(&o.state))
                        .unwrap_or_else(|| "absent".into()),
                    declared: true,
                    member: members.get(&m.full_name).cloned(),
                    rootfs_ownership: self.rootfs_ownership(&m.full_name, &m.driver),
                });
            }
        } else {
            for n in observed.networks.values() {
                domains.push(DomainStatus {
                    name: n.domain.clone(),
                    trust_level: "?".into(),
                    subnet: n.subnet.map(|s| s.to_string()),
                    bridge: Some(n.bridge.clone()),
                    up: n.up,
                    enabled: true,
                });
            }
        }
        for (name, o) in &observed.machines {
            if machines.iter().any(|m| &m.name == name) {
                continue;
            }
            machines.push(MachineStatus {
                name: name.clone(),
                domain: "?".into(),
                kind: "?".into(),
                driver: o.driver.clone(),
                // An ad-hoc machine on a domain (`run --domain`) has a NIC.
                ip: checked
                    .as_ref()
                    .and_then(|c| c.resolved.nics.get(name))
                    .map(|n| n.ip.to_string()),
                network: "?".into(),
                state: state_word(&o.state),
                declared: checked.is_none(),
                member: members.get(name).cloned(),
                rootfs_ownership: self.rootfs_ownership(name, &o.driver),
            });
        }
        Ok(Status {
            root: self.root_str.clone(),
            root_tag: self.tag.clone(),
            project: checked.map(|c| c.resolved.project.name),
            domains,
            machines,
            firewall,
        })
    }

    /// What the built-in runtime recorded at the machine's last start.
    fn rootfs_ownership(&self, full_name: &str, driver: &str) -> Option<String> {
        if driver != "native" {
            return None;
        }
        moat_runtime::MachineDir::new(self.cfg.root.join("machines").join(full_name))
            .rootfs_ownership()
            .map(|o| o.as_str().to_string())
    }

    /// Delete machines (and with --domain/--all, networks and the firewall)
    /// that this root created. Machines declared `ephemeral: false` need `force`.
    pub fn destroy(
        &mut self,
        project: Option<&Path>,
        target: &DestroyTarget,
        force: bool,
        progress: &dyn Progress,
    ) -> Result<DestroyReport> {
        let _lock = moat_state::ApplyLock::acquire(&self.cfg.root, None).map_err(state_err)?;
        let state = self.state()?;
        let checked = match project {
            Some(p) => self.check(p).ok(),
            None => None,
        };
        let host = self.host()?;
        let observed = self.observe(&host)?;
        let domain_of = |m: &str| -> Option<String> {
            if let Some(c) = &checked {
                if let Some(mm) = c.resolved.project.machine(m) {
                    return Some(mm.domain.clone());
                }
            }
            state
                .resources()
                .ok()?
                .into_iter()
                .find(|r| r.kind == "machine" && r.name == m)
                .and_then(|r| r.domain)
        };
        // A machine no driver lists but whose record or folder is still
        // there: a disposable one after a host reboot (its tmpfs folder came
        // back empty), or a creation cut short. Removed like the remains below.
        let mut remains_of = None;
        let victims: Vec<String> = match target {
            DestroyTarget::Machine(m) if observed.machines.contains_key(m) => vec![m.clone()],
            DestroyTarget::Machine(m) => {
                let recorded = state
                    .resources()
                    .map(|rs| rs.iter().any(|r| r.kind == "machine" && &r.name == m))
                    .unwrap_or(false);
                if !recorded && !self.cfg.root.join("machines").join(m).exists() {
                    return Err(EngineError::NoSuchMachine(m.clone()));
                }
                remains_of = Some(m.clone());
                vec![]
            }
            DestroyTarget::Domain(d) => observed
                .machines
                .keys()
                .filter(|m| domain_of(m).as_deref() == Some(d.as_str()))
                .cloned()
                .collect(),
            DestroyTarget::All => observed.machines.keys().cloned().collect(),
        };
        if !force {
            if let Some(c) = &checked {
                let protected: Vec<&String> = victims
                    .iter()
                    .filter(|m| {
                        c.resolved
                            .project
                            .machine(m)
                            .is_some_and(|mm| !mm.ephemeral)
                    })
                    .collect();
                if !protected.is_empty() {
                    return Err(EngineError::Failed(format!(
                        "refusing to destroy {} (declared `ephemeral: false`); pass --force to destroy anyway",
                        protected.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
            }
        }
        let mut destroyed = Vec::new();
        // Machines are independent: destroy them a few at a time.
        for wave in victims.chunks(8) {
            let results: Vec<(String, Result<()>)> = std::thread::scope(|sc| {
                let handles: Vec<_> = wave
                    .iter()
                    .map(|m| {
                        let host = &host;
                        let o = &observed.machines[m];
                        progress.event(&format!("==> destroy machine {m}"));
                        sc.spawn(move || {
                            let r = host
                                .driver(&o.driver)
                                .and_then(|d| d.destroy(&host.ctx, m).map_err(EngineError::from));
                            (m.clone(), r)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            (
                                String::new(),
                                Err(EngineError::Failed("destroy panicked".into())),
                            )
                        })
                    })
                    .collect()
            });
            for (m, r) in results {
                r?;
                state.forget("machine", &m).map_err(state_err)?;
                self.release_adhoc(&host, &state, &m, project)?;
                destroyed.push(format!("machine {m}"));
            }
        }
        // Folders of machines whose creation was cut short (killed before
        // the driver wrote its record, so no driver lists them).
        let mut remains: Vec<String> = remains_of.into_iter().collect();
        if !matches!(target, DestroyTarget::Machine(_)) {
            let rd = std::fs::read_dir(self.cfg.root.join("machines"));
            for e in rd.into_iter().flatten().flatten() {
                let m = e.file_name().to_string_lossy().into_owned();
                let ours = match target {
                    DestroyTarget::Domain(d) => domain_of(&m).as_deref() == Some(d.as_str()),
                    _ => true,
                };
                if observed.machines.contains_key(&m) || !ours {
                    continue;
                }
                remains.push(m);
            }
        }
        for m in remains {
            let driver = checked
                .as_ref()
                .and_then(|c| c.resolved.project.machine(&m))
                .map_or("native", |mm| mm.driver.as_str());
            host.driver(driver)?.destroy(&host.ctx, &m)?;
            state.forget("machine", &m).map_err(state_err)?;
            self.release_adhoc(&host, &state, &m, project)?;
            destroyed.push(format!("remains of machine {m}"));
        }
        let nets: Vec<_> = match target {
            DestroyTarget::Machine(_) => vec![],
            DestroyTarget::Domain(d) => observed
                .networks
                .values()
                .filter(|n| &n.domain == d)
                .collect(),
            DestroyTarget::All => observed.networks.values().collect(),
        };
        for n in nets {
            progress.event(&format!("==> destroy network {} ({})", n.domain, n.bridge));
            // A bridge a driver created (Incus) goes through that driver.
            let mut by_driver = false;
            for d in host.drivers.values().filter(|d| d.manages_networks()) {
                if d.delete_network(&host.ctx, &n.bridge)? {
                    by_driver = true;
                    break;
                }
            }
            if !by_driver {
                let _ = host.net.stop_dhcp(&n.bridge, &host.ctx.run_dir);
                host.net
                    .delete_bridge(&n.bridge)
                    .map_err(|e| EngineError::Failed(e.to_string()))?;
            }
            state.forget("network", &n.bridge).map_err(state_err)?;
            destroyed.push(format!("network {}", n.bridge));
        }
        if matches!(target, DestroyTarget::All) {
            host.net
                .cleanup_root(&self.tag)
                .map_err(|e| EngineError::Failed(e.to_string()))?;
            let t = moat_core::naming::nft_table(&self.tag);
            state.forget("nft-table", &t).map_err(state_err)?;
            // Records of what an interrupted apply meant to create but never
            // did, and its unfinished journal entries: nothing is left to finish.
            for r in state.resources().map_err(state_err)? {
                if matches!(r.kind.as_str(), "machine" | "network" | "nft-table") {
                    if r.kind == "network" {
                        let _ = host.net.stop_dhcp(&r.name, &host.ctx.run_dir);
                    }
                    state.forget(&r.kind, &r.name).map_err(state_err)?;
                }
            }
            state
                .close_incomplete("superseded by destroy --all")
                .map_err(state_err)?;
            let _ = std::fs::remove_file(self.applied_rules_path());
            remove_stale_sockets(&self.cfg.run_dir);
            destroyed.push(format!("nftables tables {t}"));
        }
        // The root's cgroup parents (`/moat-<tag>` in each hierarchy), kept
        // by its machines for the next one: removed when now empty.
        moat_runtime::cgroups::remove_if_empty(&format!("/moat-{}", self.tag));
        Ok(DestroyReport { destroyed })
    }

    /// Start one declared machine (creating it if needed).
    pub fn start_machine(&self, project: &Path, name: &str) -> Result<()> {
        let checked = self.check(project)?;
        let spec = machine_spec(&checked.resolved, name)
            .ok_or_else(|| EngineError::NoSuchMachine(name.into()))?;
        let host = self.host()?;
        let d = host.driver(&spec.machine.driver)?;
        d.create(&host.ctx, &spec)?;
        d.start(&host.ctx, name)?;
        Ok(())
    }

    /// Start a machine that exists already (ad-hoc ones: run -d, clones).
    pub fn start_existing(&self, name: &str) -> Result<()> {
        let (host, d) = self.observed_driver(name)?;
        host.driver(&d)?.start(&host.ctx, name)?;
        Ok(())
    }

    fn observed_driver(&self, name: &str) -> Result<(crate::host::Host, String)> {
        let host = self.host()?;
        for (dname, d) in &host.drivers {
            if d.observe(&host.ctx, name)?.is_some() {
                let dname = dname.to_string();
                return Ok((host, dname));
            }
        }
        Err(EngineError::NoSuchMachine(name.into()))
    }

    pub fn stop_machine(&self, name: &str, timeout: Duration) -> Result<()> {
        let (host, d) = self.observed_driver(name)?;
        host.driver(&d)?.stop(&host.ctx, name, timeout)?;
        Ok(())
    }

    pub fn exec(&self, name: &str, argv: &[String]) -> Result<moat_driver::ExecOutput> {
        let (host, d) = self.observed_driver(name)?;
        Ok(host.driver(&d)?.exec(&host.ctx, name, argv)?)
    }

    /// An interactive process in a running machine: a pty of `size` (rows,
    /// cols; default 24x80) when `tty`, plain streams otherwise; an empty
    /// `argv` runs the login shell. With a tty, `TERM` is `xterm-256color`
    /// unless set through [`Engine::exec_session_opts`].
    pub fn exec_session(
        &self,
        name: &str,
        argv: &[String],
        tty: bool,
        size: Option<(u16, u16)>,
    ) -> Result<moat_driver::ExecSession> {
        let opts = moat_driver::SessionOpts {
            tty: tty.then(|| size.unwrap_or((24, 80))),
            env: if tty {
                vec!["TERM=xterm-256color".into()]
            } else {
                vec![]
            },
            login: argv.is_empty(),
        };
        self.exec_session_opts(name, argv, &opts)
    }

    pub fn exec_session_opts(
        &self,
        name: &str,
        argv: &[String],
        opts: &moat_driver::SessionOpts,
    ) -> Result<moat_driver::ExecSession> {
        let (host, d) = self.observed_driver(name)?;
        Ok(host.driver(&d)?.exec_session(&host.ctx, name, argv, opts)?)
    }

    /// Where `moat logs` reads a machine's output: a file (native, nspawn,
    /// QEMU), or an Incus instance's console log through the API.
    pub fn logs(&self, name: &str) -> Result<LogSource> {
        if let Some(driver) = self.incus_machine(name) {
            return Ok(LogSource::Incus {
                driver: Box::new(driver),
                ctx: self.ctx(),
                machine: name.to_string(),
            });
        }
        Ok(LogSource::File(self.log_path(name)?))
    }

    /// Path of a machine's stdout log (native driver layout).
    pub fn log_path(&self, name: &str) -> Result<std::path::PathBuf> {
        // A full VM's serial console log.
        let vm_log = moat_qemu::vm::paths(&self.ctx(), name).console_log;
        if vm_log.exists() {
            return Ok(vm_log);
        }
        // A microVM's workload output (or, started before moat.out existed, its console).
        let microvm_log = moat_qemu::microvm::log_file(&self.ctx(), name);
        if microvm_log.exists() {
            return Ok(microvm_log);
        }
        let dir = moat_driver::native::NativeDriver::machine_dir(&self.ctx(), name);
        let p = dir.stdout_log();
        if !p.exists() {
            return Err(EngineError::NoSuchMachine(name.into()));
        }
        Ok(p)
    }
}

/// A machine's log, read whole or followed ([`Engine::logs`]).
pub enum LogSource {
    File(std::path::PathBuf),
    Incus {
        driver: Box<moat_incus::IncusDriver>,
        ctx: moat_driver::Ctx,
        machine: String,
    },
}

impl LogSource {
    /// Everything logged so far.
    pub fn read_all(&self) -> std::io::Result<Vec<u8>> {
        Ok(self.read_since(0)?.0)
    }

    /// What was logged after the first `pos` bytes, and the new position. A
    /// log now shorter than `pos` (rotated, or a restarted instance's console)
    /// is read again from its start.
    pub fn read_since(&self, pos: u64) -> std::io::Result<(Vec<u8>, u64)> {
        use std::io::{Read, Seek, SeekFrom};
        let path = match self {
            LogSource::File(p) => p.clone(),
            LogSource::Incus {
                driver,
                ctx,
                machine,
            } => driver
                .sync_console(ctx, machine)
                .map_err(|e| std::io::Error::other(e.to_string()))?,
        };
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        let from = if len < pos { 0 } else { pos };
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let end = from + buf.len() as u64;
        Ok((buf, end))
    }

    /// What is read, for error messages.
    pub fn describe(&self) -> String {
        match self {
            LogSource::File(p) => p.display().to_string(),
            LogSource::Incus { machine, .. } => format!("the Incus console log of {machine}"),
        }
    }
}

/// `moat network status`: bridges, addresses, attached ports, rule counters.
#[derive(Debug, Serialize)]
pub struct NetworkStatus {
    pub table: String,
    pub firewall: String,
    pub bridges: Vec<BridgeStatus>,
    /// (chain, rule comment, packets) for moat's counted rules.
    pub counters: Vec<(String, String, u64)>,
}

#[derive(Debug, Serialize)]
pub struct BridgeStatus {
    pub domain: String,
    pub bridge: String,
    pub subnet: String,
    pub gateway: String,
    pub up: bool,
    /// Host-side interfaces attached to the bridge, with the machine using each.
    pub ports: Vec<(String, Option<String>)>,
}

impl fmt::Display for NetworkStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "nftables {}: {}", self.table, self.firewall)?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<10} {:<15} {:<17} {:<15} {:<6} PORTS",
            "DOMAIN", "BRIDGE", "SUBNET", "GATEWAY", "STATE"
        )?;
        for b in &self.bridges {
            let ports: Vec<String> = b
                .ports
                .iter()
                .map(|(p, m)| match m {
                    Some(m) => format!("{p}={m}"),
                    None => p.clone(),
                })
                .collect();
            writeln!(
                f,
                "{:<10} {:<15} {:<17} {:<15} {:<6} {}",
                b.domain,
                b.bridge,
                b.subnet,
                b.gateway,
                if b.up { "up" } else { "absent" },
                if ports.is_empty() {
                    "-".into()
                } else {
                    ports.join(" ")
                }
            )?;
        }
        if !self.counters.is_empty() {
            writeln!(f)?;
            writeln!(f, "{:>10}  {:<10} RULE", "PACKETS", "CHAIN")?;
            for (chain, comment, n) in &self.counters {
                writeln!(f, "{n:>10}  {chain:<10} {comment}")?;
            }
        }
        Ok(())
    }
}

impl Engine {
    pub fn network_status(&self, checked: &crate::Checked) -> Result<NetworkStatus> {
        let host = self.host()?;
        let fail = |e: moat_net::NetError| EngineError::Failed(e.to_string());
        let (observed, hash) = host.net.observe(&self.tag).map_err(fail)?;
        let ports = host.net.ports(&self.tag).map_err(fail)?;
        let want = self.rules(checked);
        let firewall = match hash {
            None => "absent (run moat apply)".to_string(),
            Some(h) if h == want.hash => format!("applied, up to date ({} rules)", want.rule_count),
            Some(_) => "applied, differs from the project (run moat apply)".to_string(),
        };
        let r = &checked.resolved;
        let owner: std::collections::BTreeMap<&str, &str> = r
            .nics
            .values()
            .map(|n| (n.host_if.as_str(), n.machine.as_str()))
            .collect();
        let bridges = r
            .networks
            .values()
            .map(|n| BridgeStatus {
                domain: n.domain.clone(),
                bridge: n.bridge.clone(),
                subnet: n.subnet.to_string(),
                gateway: n.gateway.to_string(),
                up: observed.get(&n.domain).is_some_and(|o| o.up),
                ports: ports
                    .iter()
                    .filter(|(_, master)| master.as_deref() == Some(n.bridge.as_str()))
                    .map(|(p, _)| (p.clone(), owner.get(p.as_str()).map(|s| s.to_string())))
                    .collect(),
            })
            .collect();
        let counters = host.net.counters(&self.tag).map_err(fail)?;
        Ok(NetworkStatus {
            table: want.table,
            firewall,
            bridges,
            counters,
        })
    }
}

/// Sockets in the run folder nobody listens on any more (a daemon killed
/// with SIGKILL cannot remove its own); a live daemon's socket stays.
fn remove_stale_sockets(run_dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in rd.flatten() {
        let socket = e.file_type().is_ok_and(|t| t.is_socket());
        if socket && std::os::unix::net::UnixStream::connect(e.path()).is_err() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
