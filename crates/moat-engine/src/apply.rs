//! `apply`: lock the root, recover from an interrupted apply, save allocations,
//! plan, then run the plan's actions in dependency order, machine actions in
//! parallel (bounded by `jobs`). Every action is journaled before it starts
//! and every host resource is recorded as *intended* before it is created, so
//! an apply killed at any point leaves a state the next apply completes.

use crate::host::Host;
use crate::{state_err, ApplyOpts, Checked, Engine, EngineError, Progress, Result};
use moat_core::model::{NetworkMode, Resolved};
use moat_core::plan::{Action, Op, Plan};
use moat_driver::{BridgeInfo, MachineSpec};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

/// What one action did.
#[derive(Debug, Clone, Serialize)]
pub struct ActionResult {
    pub id: String,
    pub ok: bool,
    pub error: Option<String>,
    pub millis: u64,
}

#[derive(Debug, Serialize)]
pub struct ApplyReport {
    pub apply_id: String,
    pub dry_run: bool,
    /// The plan that was (or, with --dry-run, would be) run.
    pub plan: Plan,
    pub results: Vec<ActionResult>,
    /// Actions not run because something they depend on failed.
    pub skipped: Vec<String>,
    /// Unfinished actions of an earlier, interrupted apply that this one completed.
    pub recovered: Vec<String>,
    pub millis: u64,
}

impl ApplyReport {
    pub fn failed(&self) -> bool {
        self.results.iter().any(|r| !r.ok) || !self.skipped.is_empty()
    }
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dry_run {
            return write!(f, "{}", self.plan);
        }
        if self.plan.actions.is_empty() {
            write!(f, "{}", self.plan)?;
            return writeln!(f, "Nothing to do ({} ms).", self.millis);
        }
        let ok = self.results.iter().filter(|r| r.ok).count();
        let failed = self.results.len() - ok;
        for r in self.results.iter().filter(|r| !r.ok) {
            writeln!(f, "failed: {}: {}", r.id, r.error.as_deref().unwrap_or("?"))?;
        }
        for s in &self.skipped {
            writeln!(f, "skipped: {s} (a dependency failed)")?;
        }
        for o in &self.plan.orphans {
            writeln!(
                f,
                "orphan: {} {} ({}); `moat apply --prune` deletes it",
                o.kind, o.name, o.detail
            )?;
        }
        writeln!(
            f,
            "Applied: {ok} done, {failed} failed, {} skipped in {:.2} s.",
            self.skipped.len(),
            self.millis as f64 / 1000.0
        )
    }
}

/// Adapts the engine's progress to the image store's.
pub(crate) struct ImageProgress<'a>(pub(crate) &'a dyn Progress);
impl moat_image::Progress for ImageProgress<'_> {
    fn step(&self, message: &str) {
        self.0.event(&format!("    {message}"));
    }
    fn output(&self, line: &str) {
        self.0.event(&format!("    | {line}"));
    }
}

/// The driver-facing spec of one machine.
pub(crate) fn machine_spec(resolved: &Resolved, full_name: &str) -> Option<MachineSpec> {
    let m = resolved.project.machine(full_name)?.clone();
    let nic = if m.network == NetworkMode::Domain {
        resolved.nics.get(full_name).cloned()
    } else {
        None
    };
    let bridge = resolved.networks.get(&m.domain).map(|n| BridgeInfo {
        name: n.bridge.clone(),
        gateway: n.gateway,
        prefix_len: n.subnet.prefix_len(),
    });
    let mut hosts = Vec::new();
    if let Some(d) = resolved.project.domains.get(&m.domain) {
        for peer in d.machines.values() {
            if let Some(n) = resolved.nics.get(&peer.full_name) {
                hosts.push((peer.name.clone(), n.ip));
                hosts.push((peer.full_name.clone(), n.ip));
            }
        }
    }
    let spec_hash = moat_core::spec::spec_hash(&m, resolved.nics.get(full_name));
    Some(MachineSpec {
        bridge: if nic.is_some() { bridge } else { None },
        nic,
        spec_hash,
        hosts,
        machine: m,
    })
}

/// A domain's network as a driver that creates bridges needs it.
fn domain_network(
    resolved: &Resolved,
    n: &moat_core::model::ResolvedNetwork,
) -> moat_driver::DomainNetwork {
    let d = resolved.project.domains.get(&n.domain);
    moat_driver::DomainNetwork {
        domain: n.domain.clone(),
        bridge: n.bridge.clone(),
        subnet: n.subnet,
        gateway: n.gateway,
        dhcp: d.is_some_and(|d| d.dhcp),
        addresses: resolved
            .nics
            .values()
            .filter(|nic| n.subnet.contains(&nic.ip))
            .map(|nic| nic.ip)
            .collect(),
        profiles: d.map(|d| d.profiles.clone()).unwrap_or_default(),
    }
}

const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Engine {
    pub fn apply(
        &mut self,
        path: &Path,
        opts: &ApplyOpts,
        progress: &dyn Progress,
    ) -> Result<ApplyReport> {
        let t0 = Instant::now();
        let _lock = moat_state::ApplyLock::acquire(&self.cfg.root, opts.wait).map_err(state_err)?;
        let mut state = self.state()?;
        let checked = self.check(path)?;
        progress.warnings(&checked.warnings);

        // An interrupted apply: its unfinished actions show up again in the plan
        // below (the host is re-observed), so closing them is enough.
        let recovered: Vec<String> = state
            .incomplete()
            .map_err(state_err)?
            .into_iter()
            .map(|e| e.action_id)
            .collect();
        if !recovered.is_empty() {
            progress.event(&format!(
                "completing an interrupted apply ({} unfinished: {})",
                recovered.len(),
                recovered.join(", ")
            ));
        }

        let host = self.host()?;
        let observed = self.observe_managed(&host, &checked)?;
        if !opts.dry_run {
            self.reconcile_records(&state, &host, &checked.resolved, &observed, progress)?;
        }
        let desired = self.desired(&checked, Some(&state))?;
        let plan = moat_core::plan::plan(
            &desired,
            &observed,
            &moat_core::plan::PlanOptions {
                prune: opts.prune,
                domain: opts.domain.clone(),
            },
        );
        let apply_id = moat_state::StateStore::new_apply_id();
        if opts.dry_run {
            return Ok(ApplyReport {
                apply_id,
                dry_run: true,
                plan,
                results: vec![],
                skipped: vec![],
                recovered,
                millis: t0.elapsed().as_millis() as u64,
            });
        }
        check_address_clashes(&checked.resolved)?;
        // Allocations first: they must be stable even if we die right after.
        if !plan.actions.is_empty() || !recovered.is_empty() {
            state
                .save_allocations(&checked.resolved.allocations)
                .map_err(state_err)?;
            state
                .close_incomplete(&format!("superseded by apply {apply_id}"))
                .map_err(state_err)?;
        }

        let mut results: Vec<ActionResult> = Vec::new();
        let mut done: BTreeSet<String> = BTreeSet::new();
        let mut failed: BTreeSet<String> = BTreeSet::new();
        let mut skipped: Vec<String> = Vec::new();
        let mut pending: Vec<&Action> = plan.actions.iter().collect();
        let jobs = opts.jobs.max(1);

        while !pending.is_empty() {
            // Actions whose dependencies failed or were skipped are skipped too.
            let (blocked, rest): (Vec<&Action>, Vec<&Action>) =
                pending.into_iter().partition(|a| {
                    a.depends_on
                        .iter()
                        .any(|d| failed.contains(d) || skipped.contains(d))
                });
            for a in blocked {
                skipped.push(a.id.clone());
            }
            let (ready, later): (Vec<&Action>, Vec<&Action>) = rest
                .into_iter()
                .partition(|a| a.depends_on.iter().all(|d| done.contains(d)));
            if ready.is_empty() {
                skipped.extend(later.iter().map(|a| a.id.clone()));
                break;
            }
            pending = later;
            for wave in ready.chunks(jobs) {
                let mut entries = Vec::new();
                for a in wave {
                    let json = serde_json::to_string(a).unwrap_or_default();
                    let entry = state
                        .journal_start(&apply_id, &a.id, &json)
                        .map_err(state_err)?;
                    self.intend(&state, &checked.resolved, &a.op)?;
                    progress.event(&format!("==> {}", describe(a)));
                    entries.push(entry);
                }
                let outcomes: Vec<(std::result::Result<(), String>, u64)> =
                    std::thread::scope(|s| {
                        let handles: Vec<_> = wave
                            .iter()
                            .map(|a| {
                                let host = &host;
                                let checked = &checked;
                                s.spawn(move || {
                                    let t = Instant::now();
                                    let r = run_action(host, checked, a, progress);
                                    (r, t.elapsed().as_millis() as u64)
                                })
                            })
                            .collect();
                        handles
                            .into_iter()
                            .map(|h| {
                                h.join()
                                    .unwrap_or_else(|_| (Err("the action panicked".into()), 0))
                            })
                            .collect()
                    });
                for ((a, entry), (r, ms)) in wave.iter().zip(entries).zip(outcomes) {
                    match r {
                        Ok(()) => {
                            state.journal_done(entry).map_err(state_err)?;
                            self.record_done(&state, &checked.resolved, &a.op)?;
                            done.insert(a.id.clone());
                            results.push(ActionResult {
                                id: a.id.clone(),
                                ok: true,
                                error: None,
                                millis: ms,
                            });
                        }
                        Err(e) => {
                            state.journal_failed(entry, &e).map_err(state_err)?;
                            progress.event(&format!("    failed: {e}"));
                            failed.insert(a.id.clone());
                            results.push(ActionResult {
                                id: a.id.clone(),
                                ok: false,
                                error: Some(e),
                                millis: ms,
                            });
                        }
                    }
                }
            }
        }
        Ok(ApplyReport {
            apply_id,
            dry_run: false,
            plan,
            results,
            skipped,
            recovered,
            millis: t0.elapsed().as_millis() as u64,
        })
    }

    /// Bring the ownership records in line with the host, for when an apply
    /// or destroy was killed between recording and acting: a pending intent
    /// whose resource exists is confirmed; a record whose resource is gone is
    /// dropped (the plan re-creates what is still declared and records it
    /// again), after removing what a cut-short creation left (a machine folder
    /// no driver lists, a dnsmasq for a bridge that is gone).
    fn reconcile_records(
        &self,
        state: &moat_state::StateStore,
        host: &Host,
        resolved: &Resolved,
        observed: &moat_core::observed::Observed,
        progress: &dyn Progress,
    ) -> Result<()> {
        let bridges: BTreeSet<&str> = observed
            .networks
            .values()
            .map(|n| n.bridge.as_str())
            .collect();
        for r in state.resources().map_err(state_err)? {
            let present = match r.kind.as_str() {
                "machine" => observed.machines.contains_key(&r.name),
                "network" => bridges.contains(r.name.as_str()),
                "nft-table" => observed.firewall_hash.is_some(),
                _ => continue,
            };
            if present {
                if r.pending {
                    state.mark_done(&r.kind, &r.name).map_err(state_err)?;
                }
                continue;
            }
            if r.kind == "machine" && host.ctx.root.join("machines").join(&r.name).exists() {
                // A folder no driver lists: created, but killed before the
                // driver wrote its record. Its declared driver removes it
                // (native, whose folders these are, when no longer declared).
                let driver = resolved
                    .project
                    .machine(&r.name)
                    .map_or("native", |m| m.driver.as_str());
                progress.event(&format!("    removing the remains of machine {}", r.name));
                let removed = host
                    .driver(driver)
                    .and_then(|d| d.destroy(&host.ctx, &r.name).map_err(EngineError::from));
                if let Err(e) = removed {
                    // Keep the record so that `moat destroy` can still find it.
                    progress.event(&format!(
                        "    could not remove the remains of machine {}: {e}",
                        r.name
                    ));
                    continue;
                }
            }
            if r.kind == "network" {
                let _ = host.net.stop_dhcp(&r.name, &host.ctx.run_dir);
            }
            state.forget(&r.kind, &r.name).map_err(state_err)?;
        }
        Ok(())
    }

    /// Record what an action is about to create, before it exists.
    fn intend(&self, state: &moat_state::StateStore, resolved: &Resolved, op: &Op) -> Result<()> {
        match op {
            Op::CreateNetwork { domain } | Op::UpdateNetwork { domain } => {
                if let Some(n) = resolved.networks.get(domain) {
                    state
                        .intend("network", &n.bridge, Some(domain), None)
                        .map_err(state_err)?;
                }
            }
            Op::ApplyFirewall { .. } => {
                let t = moat_core::naming::nft_table(&self.tag);
                state
                    .intend("nft-table", &t, None, None)
                    .map_err(state_err)?;
            }
            Op::CreateMachine { machine } | Op::ReplaceMachine { machine, .. } => {
                let domain = resolved.project.machine(machine).map(|m| m.domain.as_str());
                state
                    .intend("machine", machine, domain, Some(machine))
                    .map_err(state_err)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Record the outcome of a finished action in the ownership table.
    fn record_done(
        &self,
        state: &moat_state::StateStore,
        resolved: &Resolved,
        op: &Op,
    ) -> Result<()> {
        match op {
            Op::CreateNetwork { domain } | Op::UpdateNetwork { domain } => {
                if let Some(n) = resolved.networks.get(domain) {
                    state.mark_done("network", &n.bridge).map_err(state_err)?;
                }
            }
            Op::ApplyFirewall { .. } => {
                state
                    .mark_done("nft-table", &moat_core::naming::nft_table(&self.tag))
                    .map_err(state_err)?;
                let rules = moat_net::render(resolved, moat_net::RenderOptions::default());
                // Only used to show rule-level changes in later plans.
                let _ = std::fs::write(self.applied_rules_path(), rules.body);
            }
            Op::CreateMachine { machine } | Op::ReplaceMachine { machine, .. } => {
                state.mark_done("machine", machine).map_err(state_err)?;
            }
            Op::DeleteMachine { machine, .. } => {
                state.forget("machine", machine).map_err(state_err)?
            }
            Op::DeleteNetwork { bridge, .. } => {
                state.forget("network", bridge).map_err(state_err)?
            }
            _ => {}
        }
        Ok(())
    }
}

fn describe(a: &Action) -> String {
    let (kind, name) = a.op.target();
    let verb = a.id.split('-').next().unwrap_or("");
    if name.is_empty() {
        format!("{verb} {kind} ({})", a.reason)
    } else {
        format!("{verb} {kind} {name} ({})", a.reason)
    }
}

/// Runs one action on the host. Errors are strings: they end up in the journal
/// and the report, attributed to the action.
fn run_action(
    host: &Host,
    checked: &Checked,
    a: &Action,
    progress: &dyn Progress,
) -> std::result::Result<(), String> {
    let resolved = &checked.resolved;
    let alias = moat_core::naming::if_alias(&host.ctx.root.to_string_lossy());
    let spec =
        |m: &str| machine_spec(resolved, m).ok_or_else(|| format!("machine {m} is not declared"));
    let err = |e: &dyn std::fmt::Display| e.to_string();
    match &a.op {
        Op::CreateNetwork { domain } | Op::UpdateNetwork { domain } => {
            let n = resolved
                .networks
                .get(domain)
                .ok_or_else(|| format!("domain {domain} has no network"))?;
            if let Some(d) = host.network_driver(resolved, domain) {
                return d
                    .ensure_network(&host.ctx, &domain_network(resolved, n))
                    .map_err(|e| err(&e));
            }
            host.net.ensure_bridge(n, &alias).map_err(|e| err(&e))?;
            let d = resolved.project.domains.get(domain);
            if d.is_some_and(|d| d.dhcp) {
                let nics: Vec<_> = resolved
                    .nics
                    .iter()
                    .filter(|(m, _)| {
                        resolved
                            .project
                            .machine(m)
                            .is_some_and(|m| &m.domain == domain)
                    })
                    .map(|(_, n)| n)
                    .collect();
                host.net
                    .ensure_dhcp(n, &nics, &host.ctx.run_dir)
                    .map_err(|e| err(&e))?;
            }
            Ok(())
        }
        Op::DeleteNetwork { bridge, .. } => {
            for d in host.drivers.values().filter(|d| d.manages_networks()) {
                if d.delete_network(&host.ctx, bridge).map_err(|e| err(&e))? {
                    return Ok(());
                }
            }
            let _ = host.net.stop_dhcp(bridge, &host.ctx.run_dir);
            host.net.delete_bridge(bridge).map_err(|e| err(&e))
        }
        Op::ApplyFirewall { .. } => {
            let rules = moat_net::render(resolved, moat_net::RenderOptions::default());
            host.net
                .apply_ruleset(&rules)
                .map(|_| ())
                .map_err(|e| err(&e))
        }
        Op::EnsureImage { image } => {
            let source =
                moat_core::load::resolve_image(&resolved.project, image).ok_or_else(|| {
                    format!("no source known for image '{image}'; declare it under `images:`")
                })?;
            // A cloud image is a full VM's base disk, kept by the qemu driver.
            if let moat_core::model::ImageSource::CloudImage { path } = &source {
                return moat_qemu::vmimage::import_cloud_image(
                    &host.ctx.root,
                    image,
                    std::path::Path::new(path),
                )
                .map(|_| ())
                .map_err(|e| err(&e));
            }
            host.images
                .ensure(image, &source, &ImageProgress(progress))
                .map(|_| ())
                .map_err(|e| err(&e))
        }
        Op::CreateMachine { machine } => {
            let s = spec(machine)?;
            let d = host.driver(&s.machine.driver).map_err(|e| err(&e))?;
            d.create(&host.ctx, &s).map_err(|e| err(&e))?;
            if s.machine.template {
                // A template is a base for clones: created, never started.
                return Ok(());
            }
            d.start(&host.ctx, machine).map_err(|e| err(&e))
        }
        Op::StartMachine { machine } => {
            let s = spec(machine)?;
            let d = host.driver(&s.machine.driver).map_err(|e| err(&e))?;
            // create is idempotent; it hands the driver the NIC to attach at start.
            d.create(&host.ctx, &s).map_err(|e| err(&e))?;
            d.start(&host.ctx, machine).map_err(|e| err(&e))
        }
        Op::StopMachine { machine, driver } => {
            let d = host.driver(driver).map_err(|e| err(&e))?;
            d.stop(&host.ctx, machine, STOP_TIMEOUT)
                .map_err(|e| err(&e))
        }
        Op::UpdateMachine { machine, limits } => {
            let s = spec(machine)?;
            let d = host.driver(&s.machine.driver).map_err(|e| err(&e))?;
            d.update_limits(&host.ctx, machine, limits)
                .map_err(|e| err(&e))
        }
        Op::ReplaceMachine {
            machine,
            old_driver,
        } => {
            let old = host.driver(old_driver).map_err(|e| err(&e))?;
            old.destroy(&host.ctx, machine).map_err(|e| err(&e))?;
            let s = spec(machine)?;
            let d = host.driver(&s.machine.driver).map_err(|e| err(&e))?;
            d.create(&host.ctx, &s).map_err(|e| err(&e))?;
            d.start(&host.ctx, machine).map_err(|e| err(&e))
        }
        Op::DeleteMachine { machine, driver } => {
            let d = host.driver(driver).map_err(|e| err(&e))?;
            d.destroy(&host.ctx, machine).map_err(|e| err(&e))
        }
    }
}

impl From<moat_driver::DriverError> for EngineError {
    fn from(e: moat_driver::DriverError) -> Self {
        match e {
            moat_driver::DriverError::NoSuchMachine { machine } => {
                EngineError::NoSuchMachine(machine)
            }
            other => EngineError::Failed(other.to_string()),
        }
    }
}

/// A domain subnet that some other interface of the host already uses (another
/// moat root, a VPN, the LAN) would break routing and DHCP: refuse up front.
fn check_address_clashes(resolved: &Resolved) -> Result<()> {
    use moat_host::exec::{Cmd, Executor, HostExecutor};
    let Ok(out) = HostExecutor.run(&Cmd::new("ip").args(["-j", "-4", "addr", "show"])) else {
        return Ok(()); // the network layer reports its own errors later
    };
    let links: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    let ours = moat_core::naming::bridge_name(&resolved.root_tag, "");
    let mut problems = Vec::new();
    for l in links.as_array().into_iter().flatten() {
        let ifname = l["ifname"].as_str().unwrap_or("");
        if ifname.starts_with(&ours) {
            continue;
        }
        for a in l["addr_info"].as_array().into_iter().flatten() {
            let (Some(local), Some(plen)) = (a["local"].as_str(), a["prefixlen"].as_u64()) else {
                continue;
            };
            let Ok(addr) = local.parse::<std::net::Ipv4Addr>() else {
                continue;
            };
            let Ok(theirs) = ipnet::Ipv4Net::new(addr, plen as u8) else {
                continue;
            };
            for n in resolved.networks.values() {
                // A domain's own bridge (an adopted Incus network) is no clash.
                if ifname == n.bridge {
                    continue;
                }
                if n.subnet.contains(&addr) || theirs.trunc().contains(&n.gateway) {
                    problems.push(format!(
                        "domain '{}' wants {} but interface {ifname} already has {local}/{plen}",
                        n.domain, n.subnet
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(EngineError::Failed(format!(
        "address clash on this host: {}; give the domain a `subnet:` of its own or change \
         `addressing.base` (another moat root using the same addresses must be destroyed first)",
        problems.join("; ")
    )))
}
