//! The planner: compares the desired state (resolved project + firewall +
//! images) with what is observed on the host and lists the actions that make
//! the host match, with their reasons and dependencies.
//!
//! ```text
//!  Desired ─┐
//!           ├─▶ plan() ─▶ Plan { actions (topological, ties by id), orphans }
//!  Observed ┘                 │
//!                             └─▶ engine runs the actions; simulate() does the same on paper
//! ```
//!
//! Dependencies: images and networks first; the firewall after every network
//! change; machine creates/replaces after their network, their image and the
//! firewall (a machine never starts unfiltered); network deletes after the
//! deletes of their machines.
//!
//! Observed resources of this root that are no longer declared are *orphans*:
//! listed, and turned into delete actions only with `prune`. Machines of a
//! disabled domain are not desired: running ones are stopped, none is deleted
//! (re-enabling the domain brings them back as they were).

use crate::model::{Machine, Resolved};
use crate::observed::{Limits, MachineState, Observed, ObservedMachine, ObservedNetwork};
use crate::spec::spec_hash;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The desired firewall, computed by the network layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredFirewall {
    /// Compared with `Observed::firewall_hash`.
    pub hash: String,
    /// Short human summary, e.g. `6 domains isolated, 3 policies`.
    pub summary: String,
}

/// Everything the planner wants on the host.
#[derive(Clone, Debug)]
pub struct Desired {
    pub resolved: Resolved,
    /// `None`: the firewall is not planned (e.g. a caller without the network layer).
    pub firewall: Option<DesiredFirewall>,
    /// Image names needed (as in `Machine::image`).
    pub images: BTreeSet<String>,
    /// Machines moat created earlier (state store ownership records): a missing
    /// one was deleted by hand, which is drift.
    pub created_machines: BTreeSet<String>,
    /// Domains whose network moat created earlier.
    pub created_networks: BTreeSet<String>,
}

impl Desired {
    /// Desired state with the images of every enabled machine, no firewall and
    /// no creation history.
    pub fn new(resolved: Resolved) -> Self {
        let images = resolved
            .project
            .machines()
            .map(|m| m.image.clone())
            .collect();
        Desired {
            resolved,
            firewall: None,
            images,
            created_machines: BTreeSet::new(),
            created_networks: BTreeSet::new(),
        }
    }

    /// The spec hash of a desired machine (with its resolved NIC).
    pub fn spec_hash(&self, m: &Machine) -> String {
        spec_hash(m, self.resolved.nics.get(&m.full_name))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Turn orphans into delete actions.
    pub prune: bool,
    /// Only plan this domain (its network, machines, images; the firewall stays global).
    pub domain: Option<String>,
}

/// What an action does, with what the engine needs to do it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "op")]
pub enum Op {
    CreateNetwork {
        domain: String,
    },
    /// Re-create or bring up the bridge with the resolved settings.
    UpdateNetwork {
        domain: String,
    },
    DeleteNetwork {
        domain: String,
        bridge: String,
    },
    ApplyFirewall {
        hash: String,
    },
    EnsureImage {
        image: String,
    },
    /// Create and start.
    CreateMachine {
        machine: String,
    },
    StartMachine {
        machine: String,
    },
    StopMachine {
        machine: String,
        driver: String,
    },
    /// Change limits in place (then the machine keeps running).
    UpdateMachine {
        machine: String,
        limits: Limits,
    },
    /// Destroy (with the old driver) then create and start.
    ReplaceMachine {
        machine: String,
        old_driver: String,
    },
    DeleteMachine {
        machine: String,
        driver: String,
    },
}

impl Op {
    /// `create`, `update`, `delete`, `apply`, `ensure`, `start`, `stop`, `replace`.
    pub fn verb(&self) -> &'static str {
        match self {
            Op::CreateNetwork { .. } | Op::CreateMachine { .. } => "create",
            Op::UpdateNetwork { .. } | Op::UpdateMachine { .. } => "update",
            Op::DeleteNetwork { .. } | Op::DeleteMachine { .. } => "delete",
            Op::ApplyFirewall { .. } => "apply",
            Op::EnsureImage { .. } => "ensure",
            Op::StartMachine { .. } => "start",
            Op::StopMachine { .. } => "stop",
            Op::ReplaceMachine { .. } => "replace",
        }
    }

    /// One- to three-character mark used in the human rendering (`+`, `~`, `-`, `-/+`, `>`, `.`).
    pub fn symbol(&self) -> &'static str {
        match self {
            Op::CreateNetwork { .. } | Op::CreateMachine { .. } | Op::EnsureImage { .. } => "+",
            Op::UpdateNetwork { .. } | Op::UpdateMachine { .. } | Op::ApplyFirewall { .. } => "~",
            Op::DeleteNetwork { .. } | Op::DeleteMachine { .. } => "-",
            Op::ReplaceMachine { .. } => "-/+",
            Op::StartMachine { .. } => ">",
            Op::StopMachine { .. } => ".",
        }
    }

    /// `(kind, name)` of the resource acted on.
    pub fn target(&self) -> (&'static str, &str) {
        match self {
            Op::CreateNetwork { domain }
            | Op::UpdateNetwork { domain }
            | Op::DeleteNetwork { domain, .. } => ("network", domain),
            Op::ApplyFirewall { .. } => ("firewall", ""),
            Op::EnsureImage { image } => ("image", image),
            Op::CreateMachine { machine }
            | Op::StartMachine { machine }
            | Op::StopMachine { machine, .. }
            | Op::UpdateMachine { machine, .. }
            | Op::ReplaceMachine { machine, .. }
            | Op::DeleteMachine { machine, .. } => ("machine", machine),
        }
    }

    /// Stable id: `<verb>-<kind>[:<name>]`, e.g. `create-machine:pro-dev`.
    pub fn id(&self) -> String {
        let (kind, name) = self.target();
        if name.is_empty() {
            format!("{}-{kind}", self.verb())
        } else {
            format!("{}-{kind}:{name}", self.verb())
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Action {
    pub id: String,
    #[serde(flatten)]
    pub op: Op,
    /// Why, e.g. `missing`, `stopped by hand (drift)`.
    pub reason: String,
    /// The host changed behind moat's back.
    pub drift: bool,
    /// Ids of actions that must finish first (all present in the same plan).
    pub depends_on: Vec<String>,
}

/// An observed resource of this root that is no longer declared.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Orphan {
    /// `machine` or `network`.
    pub kind: String,
    pub name: String,
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// In execution order: every action comes after its dependencies; ties by id.
    pub actions: Vec<Action>,
    /// Listed when not pruned; with `prune` they appear as delete actions instead.
    pub orphans: Vec<Orphan>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.orphans.is_empty()
    }

    pub fn action(&self, id: &str) -> Option<&Action> {
        self.actions.iter().find(|a| a.id == id)
    }

    /// Whether any action was caused by drift.
    pub fn has_drift(&self) -> bool {
        self.actions.iter().any(|a| a.drift)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "No changes.");
        }
        for a in &self.actions {
            let (kind, name) = a.op.target();
            if name.is_empty() {
                writeln!(f, "{} {} {kind} ({})", a.op.symbol(), a.op.verb(), a.reason)?;
            } else {
                writeln!(
                    f,
                    "{} {} {kind} {name} ({})",
                    a.op.symbol(),
                    a.op.verb(),
                    a.reason
                )?;
            }
        }
        for o in &self.orphans {
            writeln!(f, "! orphan {} {} ({})", o.kind, o.name, o.detail)?;
        }
        let count = |verb: &str| self.actions.iter().filter(|a| a.op.verb() == verb).count();
        let mut parts = Vec::new();
        for verb in [
            "create", "replace", "update", "start", "stop", "delete", "ensure", "apply",
        ] {
            let n = count(verb);
            if n > 0 {
                parts.push(format!("{n} to {verb}"));
            }
        }
        if !self.orphans.is_empty() {
            parts.push(format!(
                "{} orphan(s) kept (pass --prune to delete)",
                self.orphans.len()
            ));
        }
        writeln!(f, "Plan: {}.", parts.join(", "))
    }
}

/// Human size for limits: `512MiB`, `1GiB`, `1536KiB`, `100B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (u, n) in UNITS {
        if b >= n && b & (n - 1) == 0 {
            return format!("{}{u}", b / n);
        }
    }
    format!("{b}B")
}

fn opt<T: fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "none".into())
}

/// Limit differences worth an update: only limits the files set are compared
/// (a driver may report host defaults for the others).
fn limit_changes(m: &Machine, seen: &Limits) -> Vec<String> {
    let mut out = Vec::new();
    if m.cpus.is_some() && m.cpus != seen.cpus {
        out.push(format!("cpus {} → {}", opt(seen.cpus), opt(m.cpus)));
    }
    if m.memory.is_some() && m.memory != seen.memory {
        out.push(format!(
            "memory {} → {}",
            opt(seen.memory.map(human_bytes)),
            opt(m.memory.map(human_bytes))
        ));
    }
    if m.pids.is_some() && m.pids != seen.pids {
        out.push(format!("pids {} → {}", opt(seen.pids), opt(m.pids)));
    }
    out
}

fn desired_limits(m: &Machine) -> Limits {
    Limits {
        cpus: m.cpus,
        memory: m.memory,
        pids: m.pids,
    }
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Whether `full_name` belongs to `domain` (`<domain>-<machine>`).
fn in_domain(full_name: &str, domain: &str) -> bool {
    full_name.len() > domain.len() + 1
        && full_name.starts_with(domain)
        && full_name.as_bytes()[domain.len()] == b'-'
}

struct Builder {
    actions: BTreeMap<String, Action>,
}

impl Builder {
    fn add(&mut self, op: Op, reason: impl Into<String>, drift: bool, deps: Vec<String>) -> String {
        let id = op.id();
        self.actions.insert(
            id.clone(),
            Action {
                id: id.clone(),
                op,
                reason: reason.into(),
                drift,
                depends_on: deps,
            },
        );
        id
    }
}

/// Compute the actions that bring `observed` to `desired`. Pure and
/// deterministic: the same inputs give the same plan, byte for byte.
pub fn plan(desired: &Desired, observed: &Observed, opts: &PlanOptions) -> Plan {
    let r = &desired.resolved;
    let project = &r.project;
    let in_scope = |domain: &str| opts.domain.as_deref().is_none_or(|d| d == domain);
    let mut b = Builder {
        actions: BTreeMap::new(),
    };
    let mut orphans = Vec::new();

    // Images needed by the machines in scope.
    let scoped_machines: Vec<&Machine> =
        project.machines().filter(|m| in_scope(&m.domain)).collect();
    let wanted_images: BTreeSet<&str> = scoped_machines
        .iter()
        .map(|m| m.image.as_str())
        .filter(|i| desired.images.contains(*i))
        .chain(
            desired
                .images
                .iter()
                .map(String::as_str)
                .filter(|_| opts.domain.is_none()),
        )
        .collect();
    let mut image_action: BTreeMap<&str, String> = BTreeMap::new();
    for img in wanted_images {
        if !observed.images.contains(img) {
            let id = b.add(
                Op::EnsureImage {
                    image: img.to_string(),
                },
                "missing",
                false,
                vec![],
            );
            image_action.insert(img, id);
        }
    }

    // Networks.
    let mut net_action: BTreeMap<String, String> = BTreeMap::new();
    for (name, net) in r.networks.iter().filter(|(n, _)| in_scope(n)) {
        let reason = match observed.networks.get(name) {
            None if desired.created_networks.contains(name) => Some((
                Op::CreateNetwork {
                    domain: name.clone(),
                },
                "deleted by hand (drift)".to_string(),
                true,
            )),
            None => Some((
                Op::CreateNetwork {
                    domain: name.clone(),
                },
                "missing".to_string(),
                false,
            )),
            Some(seen) => network_change(name, net, seen),
        };
        if let Some((op, why, drift)) = reason {
            net_action.insert(name.clone(), b.add(op, why, drift, vec![]));
        }
    }
    let mut net_deletes: Vec<(String, String)> = Vec::new();
    for (name, seen) in observed.networks.iter().filter(|(n, _)| in_scope(n)) {
        if r.networks.contains_key(name) {
            continue;
        }
        match project.domains.get(name) {
            // A disabled domain's network stays, for when it is enabled again.
            Some(d) if !d.enabled => {}
            _ => {
                if opts.prune {
                    net_deletes.push((name.clone(), seen.bridge.clone()));
                } else {
                    orphans.push(Orphan {
                        kind: "network".into(),
                        name: name.clone(),
                        detail: format!("bridge {}, domain not declared", seen.bridge),
                    });
                }
            }
        }
    }

    // Machines.
    let declared: BTreeSet<&str> = project.machines().map(|m| m.full_name.as_str()).collect();
    let mut machine_deletes: Vec<String> = Vec::new();
    let mut creates: Vec<(Op, String, bool, &str, &str)> = Vec::new();
    for m in &scoped_machines {
        let hash = desired.spec_hash(m);
        let name = &m.full_name;
        match observed.machines.get(name) {
            None => {
                let (why, drift) = if desired.created_machines.contains(name) && !m.disposable {
                    ("deleted by hand (drift)", true)
                } else {
                    ("missing", false)
                };
                creates.push((
                    Op::CreateMachine {
                        machine: name.clone(),
                    },
                    why.into(),
                    drift,
                    &m.domain,
                    &m.image,
                ));
            }
            // An empty recorded hash is an adopted machine moat never created
            // (`moat import incus`): its settings are unknown, it is kept.
            Some(seen) if !seen.spec_hash.is_empty() && seen.spec_hash != hash => {
                let why = if seen.driver != m.driver {
                    format!("driver changed {} → {}", seen.driver, m.driver)
                } else {
                    format!(
                        "settings changed (spec {} → {})",
                        short(&seen.spec_hash),
                        short(&hash)
                    )
                };
                creates.push((
                    Op::ReplaceMachine {
                        machine: name.clone(),
                        old_driver: seen.driver.clone(),
                    },
                    why,
                    false,
                    &m.domain,
                    &m.image,
                ));
            }
            Some(seen) if m.disposable && seen.state != MachineState::Running => {
                creates.push((
                    Op::ReplaceMachine {
                        machine: name.clone(),
                        old_driver: seen.driver.clone(),
                    },
                    "disposable machine stopped: re-created fresh".into(),
                    false,
                    &m.domain,
                    &m.image,
                ));
            }
            Some(seen) => {
                let changes = limit_changes(m, &seen.limits);
                let mut deps = vec![];
                if !changes.is_empty() {
                    let mut lim = seen.limits.clone();
                    let want = desired_limits(m);
                    lim.cpus = want.cpus.or(lim.cpus);
                    lim.memory = want.memory.or(lim.memory);
                    lim.pids = want.pids.or(lim.pids);
                    let why = format!("limit {} (drift)", changes.join(", limit "));
                    deps.push(b.add(
                        Op::UpdateMachine {
                            machine: name.clone(),
                            limits: lim,
                        },
                        why,
                        true,
                        vec![],
                    ));
                }
                match &seen.state {
                    MachineState::Running => {}
                    // Templates are never started: they are bases for clones.
                    MachineState::Stopped if m.template => {}
                    MachineState::Stopped => {
                        b.add(
                            Op::StartMachine {
                                machine: name.clone(),
                            },
                            "stopped by hand (drift)",
                            true,
                            deps,
                        );
                    }
                    MachineState::Crashed { reason } => {
                        b.add(
                            Op::StartMachine {
                                machine: name.clone(),
                            },
                            format!("crashed: {reason} (drift)"),
                            true,
                            deps,
                        );
                    }
                }
            }
        }
    }
    for (name, seen) in &observed.machines {
        if declared.contains(name.as_str()) {
            continue;
        }
        // Which declared domain it belongs to, if any (longest matching name).
        let domain = project
            .domains
            .keys()
            .filter(|d| in_domain(name, d))
            .max_by_key(|d| d.len());
        if let Some(d) = &opts.domain {
            if !in_domain(name, d) || domain.is_some_and(|x| x != d) {
                continue;
            }
        }
        let disabled = domain
            .and_then(|d| project.domains.get(d))
            .filter(|d| !d.enabled && d.machines.values().any(|m| &m.full_name == name));
        if let Some(d) = disabled {
            if seen.state == MachineState::Running {
                b.add(
                    Op::StopMachine {
                        machine: name.clone(),
                        driver: seen.driver.clone(),
                    },
                    format!("domain {} is disabled", d.name),
                    false,
                    vec![],
                );
            }
            continue;
        }
        if opts.prune {
            machine_deletes.push(b.add(
                Op::DeleteMachine {
                    machine: name.clone(),
                    driver: seen.driver.clone(),
                },
                "orphan",
                false,
                vec![],
            ));
        } else {
            orphans.push(Orphan {
                kind: "machine".into(),
                name: name.clone(),
                detail: format!("driver {}, not declared", seen.driver),
            });
        }
    }

    for (domain, bridge) in net_deletes {
        let deps = machine_deletes.iter().filter(|id| {
            id.split_once(':')
                .is_some_and(|(_, m)| in_domain(m, &domain))
        });
        let deps = deps.cloned().collect();
        let id = b.add(
            Op::DeleteNetwork {
                domain: domain.clone(),
                bridge,
            },
            "orphan",
            false,
            deps,
        );
        net_action.insert(domain, id);
    }

    // Firewall: after every network change; before any machine starts.
    let mut fw_id = None;
    if let Some(fw) = &desired.firewall {
        let why = match &observed.firewall_hash {
            None => Some(("missing".to_string(), false)),
            Some(h) if *h != fw.hash => Some((
                format!("ruleset differs from the files: {}", fw.summary),
                false,
            )),
            Some(_) => None,
        };
        if let Some((why, drift)) = why {
            let deps = net_action.values().cloned().collect();
            fw_id = Some(b.add(
                Op::ApplyFirewall {
                    hash: fw.hash.clone(),
                },
                why,
                drift,
                deps,
            ));
        }
    }

    for (op, why, drift, domain, image) in creates {
        let mut deps: Vec<String> = Vec::new();
        if let Some(n) = net_action.get(domain) {
            deps.push(n.clone());
        }
        if let Some(i) = image_action.get(image) {
            deps.push(i.clone());
        }
        deps.extend(fw_id.clone());
        b.add(op, why, drift, deps);
    }

    let mut orphans_sorted = orphans;
    orphans_sorted.sort();
    Plan {
        actions: topo_order(b.actions),
        orphans: orphans_sorted,
    }
}

fn network_change(
    name: &str,
    net: &crate::model::ResolvedNetwork,
    seen: &ObservedNetwork,
) -> Option<(Op, String, bool)> {
    let op = Op::UpdateNetwork {
        domain: name.to_string(),
    };
    if seen.subnet != Some(net.subnet) {
        return Some((
            op,
            format!("subnet {} → {}", opt(seen.subnet), net.subnet),
            false,
        ));
    }
    if seen.bridge != net.bridge {
        return Some((
            op,
            format!("bridge {} → {}", seen.bridge, net.bridge),
            false,
        ));
    }
    if !seen.up {
        return Some((op, "bridge down (drift)".into(), true));
    }
    None
}

/// Kahn's algorithm, smallest id first among the ready actions.
fn topo_order(actions: BTreeMap<String, Action>) -> Vec<Action> {
    // Indices follow id order (the map is sorted), so the smallest ready index
    // is the smallest ready id.
    let mut list: Vec<Option<Action>> = actions.into_values().map(Some).collect();
    let index: BTreeMap<String, usize> = list
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.as_ref().map(|a| (a.id.clone(), i)))
        .collect();
    let mut waiting = vec![0usize; list.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); list.len()];
    for (i, slot) in list.iter_mut().enumerate() {
        let Some(a) = slot else { continue };
        a.depends_on.sort();
        a.depends_on.dedup();
        a.depends_on.retain(|d| index.contains_key(d));
        waiting[i] = a.depends_on.len();
        for d in &a.depends_on {
            dependents[index[d]].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..list.len()).filter(|i| waiting[*i] == 0).collect();
    let mut out = Vec::with_capacity(list.len());
    while let Some(i) = ready.pop_first() {
        for &d in &dependents[i] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.insert(d);
            }
        }
        out.extend(list[i].take());
    }
    // Edges only point at kinds planned earlier, so there is no cycle; were
    // there one, its actions would still be kept, in id order, at the end.
    out.extend(list.into_iter().flatten());
    out
}

/// Apply `plan` to `observed` on paper, as a perfect engine would: what the
/// host would look like afterwards. Used by tests and `--dry-run` style checks.
pub fn simulate(observed: &Observed, plan: &Plan, desired: &Desired) -> Observed {
    let r = &desired.resolved;
    let mut o = observed.clone();
    let by_name: BTreeMap<&str, &Machine> = r
        .project
        .machines()
        .map(|m| (m.full_name.as_str(), m))
        .collect();
    let machine_obs = |name: &str| -> Option<ObservedMachine> {
        let m = *by_name.get(name)?;
        Some(ObservedMachine {
            full_name: name.to_string(),
            driver: m.driver.clone(),
            state: MachineState::Running,
            spec_hash: desired.spec_hash(m),
            limits: desired_limits(m),
            adhoc: false,
        })
    };
    for a in &plan.actions {
        match &a.op {
            Op::CreateNetwork { domain } | Op::UpdateNetwork { domain } => {
                if let Some(n) = r.networks.get(domain) {
                    o.networks.insert(
                        domain.clone(),
                        ObservedNetwork {
                            domain: domain.clone(),
                            bridge: n.bridge.clone(),
                            subnet: Some(n.subnet),
                            up: true,
                        },
                    );
                }
            }
            Op::DeleteNetwork { domain, .. } => {
                o.networks.remove(domain);
            }
            Op::ApplyFirewall { hash } => o.firewall_hash = Some(hash.clone()),
            Op::EnsureImage { image } => {
                o.images.insert(image.clone());
            }
            Op::CreateMachine { machine } | Op::ReplaceMachine { machine, .. } => {
                if let Some(m) = machine_obs(machine) {
                    o.machines.insert(machine.clone(), m);
                }
            }
            Op::StartMachine { machine } => {
                if let Some(m) = o.machines.get_mut(machine) {
                    m.state = MachineState::Running;
                }
            }
            Op::StopMachine { machine, .. } => {
                if let Some(m) = o.machines.get_mut(machine) {
                    m.state = MachineState::Stopped;
                }
            }
            Op::UpdateMachine { machine, limits } => {
                if let Some(m) = o.machines.get_mut(machine) {
                    m.limits = limits.clone();
                }
            }
            Op::DeleteMachine { machine, .. } => {
                o.machines.remove(machine);
            }
        }
    }
    o
}
