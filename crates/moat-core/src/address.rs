//! Address allocation: AnKLuMe's numbering convention on a fresh state, and
//! stable allocations afterwards (existing domains and machines never renumber).
//!
//! Data flow: `Project` + prior `Allocations` (from the state store) →
//! [`allocate`] → `Resolved` (networks, NICs, the new `Allocations` to persist).
//!
//! Rules, in the order they are applied:
//!
//! 1. **Subnets.** A domain's `subnet:` override is used as is (prefix /16–/29).
//!    Otherwise a subnet allocated earlier (in `prior`) is kept. A new domain gets
//!    the convention's subnet `A.(B + zone × zone_step).seq.0/24`, where `seq` is
//!    its index among the enabled domains of its trust level in name order, if
//!    that subnet is free; else the next free `seq` of its zone (wrapping to 0).
//!    Disabled domains get no network, but a subnet they held keeps being
//!    reserved for them (re-enabling one does not renumber it), unless an
//!    enabled domain now needs it.
//! 2. **Gateway**: the last usable address (`.254` for a /24).
//! 3. **Machines** (`network: domain` only): an explicit `ip` is used as is
//!    (any usable address but the gateway); else an address allocated earlier is
//!    kept; else the lowest free address of the automatic range, in machine name
//!    order. The automatic range is `.1`–`.99` for convention /24s (AnKLuMe's)
//!    and every usable address below the gateway for `subnet:` overrides.
//! 4. **ifnums**: a small number per machine, kept forever, lowest unused for
//!    new ones; it names the machine's host-side interface.
//!
//! An `ip` outside the domain subnet is an error in moat's format; in an
//! AnKLuMe project it is a warning and the machine gets an automatic address
//! (AnKLuMe itself tolerated it).

use crate::diag::{Diagnostic, Diagnostics, Loc};
use crate::model::{
    Allocations, Domain, Format, Machine, NetworkMode, Project, Resolved, ResolvedNetwork,
    ResolvedNic,
};
use crate::naming;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The outcome of a successful allocation: the resolved project (carrying the
/// new allocations) and warnings.
#[derive(Debug)]
pub struct Allocated {
    pub resolved: Resolved,
    pub warnings: Diagnostics,
}

/// Smallest and largest prefix accepted for a `subnet:` override.
pub const MIN_PREFIX: u8 = 16;
pub const MAX_PREFIX: u8 = 29;
/// AnKLuMe's range for automatic addresses in a convention /24.
const AUTO_FIRST: u32 = 1;
const AUTO_LAST: u32 = 99;

/// Gateway of a domain subnet: its last usable address.
pub fn gateway(net: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.broadcast()) - 1)
}

/// Gateway of a domain: an adopted Incus network's own address, else [`gateway`].
pub fn domain_gateway(project: &Project, domain: &str, net: &Ipv4Net) -> Ipv4Addr {
    project
        .incus_adopted(domain)
        .and_then(|a| a.gateway)
        .filter(|g| net.contains(g))
        .unwrap_or_else(|| gateway(net))
}

/// The subnet the convention gives to sequence number `seq` of trust zone `zone`,
/// or `None` when the second octet would pass 255 or `seq` does not fit.
pub fn convention_subnet(project: &Project, zone: u8, seq: u32) -> Option<Ipv4Net> {
    let [a, b] = project.addressing.base;
    let second = u32::from(b) + u32::from(zone) * u32::from(project.addressing.zone_step);
    if second > 255 || seq > 255 {
        return None;
    }
    Ipv4Net::new(Ipv4Addr::new(a, second as u8, seq as u8, 0), 24).ok()
}

fn range_of(net: &Ipv4Net) -> (u32, u32) {
    (u32::from(net.network()), u32::from(net.broadcast()))
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Where to point at a machine's `ip`: the field itself when known.
fn ip_loc(m: &Machine) -> Option<Loc> {
    m.ip_loc.clone().or_else(|| m.loc.clone())
}

fn ip_field(m: &Machine) -> String {
    format!("domains.{}.machines.{}.ip", m.domain, m.name)
}

/// Non-overlapping set of subnets, for "is this candidate free" queries.
#[derive(Default)]
struct Used {
    /// start → (end, domain)
    by_start: BTreeMap<u32, (u32, String)>,
}

impl Used {
    /// The domain holding a subnet overlapping `net`, if any.
    fn conflict(&self, net: &Ipv4Net) -> Option<&str> {
        let (start, end) = range_of(net);
        // Entries never overlap each other, so ends grow with starts: the last
        // entry starting at or before `end` is the only candidate.
        self.by_start
            .range(..=end)
            .next_back()
            .filter(|(_, (e, _))| *e >= start)
            .map(|(_, (_, d))| d.as_str())
    }
    fn insert(&mut self, net: &Ipv4Net, domain: &str) {
        let (start, end) = range_of(net);
        self.by_start.insert(start, (end, domain.to_string()));
    }
}

/// Resolve `project` against the allocations already made (`prior`, from the
/// state store; empty on a fresh root). `root` is the moat root path (names of
/// host resources derive from it). Pure: the caller persists
/// `resolved.allocations`.
///
/// On error, the returned diagnostics hold every error found plus the warnings.
pub fn allocate(
    project: &Project,
    prior: &Allocations,
    root: &str,
) -> Result<Allocated, Diagnostics> {
    let tag = naming::root_tag(root);
    let mut diags = Diagnostics::default();
    let subnets = allocate_subnets(project, prior, &mut diags);

    let mut alloc = Allocations {
        subnets: subnets.clone(),
        ..Allocations::default()
    };
    for d in project.domains.values() {
        let Some(net) = subnets.get(&d.name) else {
            continue;
        };
        if d.enabled {
            allocate_machines(project, d, net, prior, &mut alloc, &mut diags);
        } else {
            // Keep what a disabled domain's machines held, for when it comes back.
            for m in d.machines.values() {
                if let Some(ip) = prior.addresses.get(&m.full_name) {
                    if net.contains(ip) {
                        alloc.addresses.insert(m.full_name.clone(), *ip);
                    }
                }
            }
        }
    }
    allocate_ifnums(project, prior, &mut alloc);

    if diags.has_errors() {
        diags.sort();
        return Err(diags);
    }

    let mut networks = BTreeMap::new();
    let mut nics = BTreeMap::new();
    for d in project.enabled_domains() {
        let Some(net) = alloc.subnets.get(&d.name) else {
            continue;
        };
        // An adopted Incus network keeps its own name and address.
        let adopted = project.incus_adopted(&d.name);
        networks.insert(
            d.name.clone(),
            ResolvedNetwork {
                domain: d.name.clone(),
                subnet: *net,
                gateway: domain_gateway(project, &d.name, net),
                bridge: adopted
                    .and_then(|a| a.network.clone())
                    .unwrap_or_else(|| naming::bridge_name(&tag, &d.name)),
            },
        );
        for m in d.machines.values() {
            if m.network != NetworkMode::Domain {
                continue;
            }
            let (Some(ip), Some(ifnum)) = (
                alloc.addresses.get(&m.full_name),
                alloc.ifnums.get(&m.full_name),
            ) else {
                continue;
            };
            nics.insert(
                m.full_name.clone(),
                ResolvedNic {
                    machine: m.full_name.clone(),
                    ip: *ip,
                    mac: naming::mac_for(&tag, &m.full_name),
                    host_if: naming::host_if_name(&tag, *ifnum),
                },
            );
        }
    }
    diags.sort();
    Ok(Allocated {
        resolved: Resolved {
            project: project.clone(),
            root_tag: tag,
            networks,
            nics,
            allocations: alloc,
        },
        warnings: diags,
    })
}

/// A subnet recorded earlier, if it is still a usable domain subnet (a state
/// file edited by hand could hold anything).
fn prior_subnet(prior: &Allocations, domain: &str) -> Option<Ipv4Net> {
    prior
        .subnets
        .get(domain)
        .filter(|n| (MIN_PREFIX..=MAX_PREFIX).contains(&n.prefix_len()) && n.network() == n.addr())
        .copied()
}

/// Step 1: one subnet per enabled domain (plus reservations of disabled ones).
fn allocate_subnets(
    project: &Project,
    prior: &Allocations,
    diags: &mut Diagnostics,
) -> BTreeMap<String, Ipv4Net> {
    // Subnets that are fixed before numbering new domains: overrides and prior ones.
    let mut fixed: Vec<(Ipv4Net, &Domain, bool)> = Vec::new();
    for d in project.enabled_domains() {
        if let Some(net) = d.subnet {
            let field = format!("domains.{}.subnet", d.name);
            if !(MIN_PREFIX..=MAX_PREFIX).contains(&net.prefix_len()) {
                diags.push(
                    Diagnostic::error(
                        d.loc.clone(),
                        field,
                        format!(
                            "{net} has a /{} prefix; a domain subnet must be /{MIN_PREFIX} to /{MAX_PREFIX}",
                            net.prefix_len()
                        ),
                    )
                    .with_hint("use a prefix between /16 and /29, e.g. /24"),
                );
                continue;
            }
            if net.network() != net.addr() {
                diags.push(
                    Diagnostic::error(d.loc.clone(), field, format!("{net} has host bits set"))
                        .with_hint(format!("write the network address: {}", net.trunc())),
                );
                continue;
            }
            fixed.push((net, d, true));
        } else if let Some(net) = prior_subnet(prior, &d.name) {
            // Kept even when the trust level changed (never renumber), but say
            // so: the subnet no longer tells the domain's zone.
            let zone = convention_subnet(project, d.trust_level.zone(), 0)
                .and_then(|n| Ipv4Net::new(n.network(), 16).ok());
            if let Some(zone) = zone.filter(|z| !z.contains(&net)) {
                diags.push(
                    Diagnostic::warning(
                        d.loc.clone(),
                        format!("domains.{}.subnet", d.name),
                        format!(
                            "domain '{}' keeps {net}, allocated earlier, although its trust level {} numbers from {zone}",
                            d.name,
                            d.trust_level.as_str()
                        ),
                    )
                    .with_hint("set `subnet:` on the domain to move it (its machines get new addresses)"),
                );
            }
            fixed.push((net, d, false));
        }
    }

    // Overlaps among fixed subnets: sort by start; each one is compared with
    // the one reaching furthest so far.
    fixed.sort_by_key(|(n, d, _)| {
        (
            u32::from(n.network()),
            std::cmp::Reverse(n.prefix_len()),
            d.name.clone(),
        )
    });
    let mut widest: Option<(Ipv4Net, &Domain, bool)> = None;
    let mut out: BTreeMap<String, Ipv4Net> = BTreeMap::new();
    let mut used = Used::default();
    for (net, d, is_override) in &fixed {
        if let Some((wnet, wd, w_override)) = &widest {
            if overlaps(net, wnet) {
                // Blame an override rather than an earlier allocation, and the
                // later domain in name order when both are overrides.
                let (blamed, other, other_net, other_override) =
                    if *is_override && (!w_override || d.name > wd.name) {
                        (*d, *wd, *wnet, *w_override)
                    } else {
                        (*wd, *d, *net, *is_override)
                    };
                let blamed_net = if blamed.name == d.name { *net } else { *wnet };
                let field = format!("domains.{}.subnet", blamed.name);
                let how = if other_override {
                    ""
                } else {
                    " (allocated earlier)"
                };
                let msg = if blamed_net == other_net {
                    format!(
                        "{blamed_net} is also the subnet of domain '{}'{how}; two domains cannot share a subnet",
                        other.name
                    )
                } else {
                    format!(
                        "{blamed_net} overlaps {other_net}, the subnet of domain '{}'{how}",
                        other.name
                    )
                };
                diags.push(
                    Diagnostic::error(blamed.loc.clone(), field, msg).with_hint(
                        "give each domain a subnet of its own, or remove `subnet:` to let moat number it",
                    ),
                );
                continue;
            }
        }
        let reaches = u32::from(net.broadcast());
        if widest
            .as_ref()
            .is_none_or(|(w, _, _)| u32::from(w.broadcast()) < reaches)
        {
            widest = Some((*net, d, *is_override));
        }
        out.insert(d.name.clone(), *net);
        used.insert(net, &d.name);
    }

    // Disabled domains keep their earlier subnet when nothing enabled wants it.
    for d in project.domains.values().filter(|d| !d.enabled) {
        if let Some(net) = prior_subnet(prior, &d.name) {
            if used.conflict(&net).is_none() {
                out.insert(d.name.clone(), net);
                used.insert(&net, &d.name);
            }
        }
    }

    // New domains, zone by zone, in name order.
    let mut by_level: BTreeMap<_, Vec<&Domain>> = BTreeMap::new();
    for d in project.enabled_domains() {
        by_level.entry(d.trust_level).or_default().push(d);
    }
    for (level, domains) in by_level {
        let zone = level.zone();
        for (seq, d) in domains.iter().enumerate() {
            if d.subnet.is_some() || out.contains_key(&d.name) {
                continue;
            }
            let field = format!("domains.{}.subnet", d.name);
            if convention_subnet(project, zone, 0).is_none() {
                let [a, b] = project.addressing.base;
                diags.push(
                    Diagnostic::error(
                        d.loc.clone(),
                        field,
                        format!(
                            "trust level {} puts this domain's subnets at {a}.{}.x.0, past 255 (addressing.base {a}.{b}, zone_step {})",
                            level.as_str(),
                            u32::from(b) + u32::from(zone) * u32::from(project.addressing.zone_step),
                            project.addressing.zone_step
                        ),
                    )
                    .with_hint("lower addressing.base or addressing.zone_step, or set `subnet:` on the domain"),
                );
                continue;
            }
            let seq = seq as u32;
            let found = (seq..=255)
                .chain(0..seq.min(256))
                .filter_map(|s| convention_subnet(project, zone, s))
                .find(|n| used.conflict(n).is_none());
            match found {
                Some(net) => {
                    out.insert(d.name.clone(), net);
                    used.insert(&net, &d.name);
                }
                None => {
                    let zone_net = convention_subnet(project, zone, 0)
                        .and_then(|n| n.supernet_for(16))
                        .map(|n| n.to_string())
                        .unwrap_or_default();
                    diags.push(
                        Diagnostic::error(
                            d.loc.clone(),
                            field,
                            format!(
                                "no free /24 left for this domain in the {} zone ({zone_net}): every /24 of it is used by another domain",
                                level.as_str()
                            ),
                        )
                        .with_hint("move some domains to another trust level, or set `subnet:` on this domain"),
                    );
                }
            }
        }
    }
    out
}

trait SupernetFor {
    fn supernet_for(&self, prefix: u8) -> Option<Ipv4Net>;
}

impl SupernetFor for Ipv4Net {
    fn supernet_for(&self, prefix: u8) -> Option<Ipv4Net> {
        Ipv4Net::new(self.network(), prefix).ok().map(|n| n.trunc())
    }
}

/// Step 3: addresses of one enabled domain's machines.
fn allocate_machines(
    project: &Project,
    d: &Domain,
    net: &Ipv4Net,
    prior: &Allocations,
    alloc: &mut Allocations,
    diags: &mut Diagnostics,
) {
    let anklume = project.format == Format::Anklume;
    let (network, broadcast) = range_of(net);
    let gw = u32::from(domain_gateway(project, &d.name, net));
    let adopted_gw = gw != u32::from(gateway(net));
    let (auto_first, auto_last) = if d.subnet.is_none() && net.prefix_len() == 24 {
        (network + AUTO_FIRST, network + AUTO_LAST)
    } else if adopted_gw {
        (network + 1, broadcast - 1)
    } else {
        (network + 1, gw - 1)
    };
    // address → (machine full name, explicit?)
    let mut taken: BTreeMap<u32, (&str, bool)> = BTreeMap::new();
    if adopted_gw {
        // An adopted network's gateway sits inside the automatic range.
        taken.insert(gw, ("the gateway", true));
    }
    let machines: Vec<&Machine> = d
        .machines
        .values()
        .filter(|m| m.network == NetworkMode::Domain)
        .collect();
    let mut needs_auto: Vec<&Machine> = Vec::new();
    // Machines whose out-of-subnet ip was ignored (AnKLuMe format): warned once
    // their automatic address is known.
    let mut ignored_ip: Vec<&Machine> = Vec::new();
    let mut explicit: BTreeSet<&str> = BTreeSet::new();

    for m in &machines {
        let Some(ip) = m.ip else { continue };
        let a = u32::from(ip);
        if !net.contains(&ip) {
            if anklume {
                ignored_ip.push(m);
            } else {
                diags.push(
                    Diagnostic::error(
                        ip_loc(m),
                        ip_field(m),
                        format!(
                            "{ip} is outside the subnet of domain '{}' ({net})",
                            d.name
                        ),
                    )
                    .with_hint(format!(
                        "set an ip inside {net} (from {} to {}), or remove `ip:` to get one automatically",
                        Ipv4Addr::from(network + 1),
                        Ipv4Addr::from(gw - 1)
                    )),
                );
            }
            continue;
        }
        let what = if a == network {
            Some("the network address")
        } else if a == broadcast {
            Some("the broadcast address")
        } else if a == gw {
            Some("the gateway")
        } else {
            None
        };
        if let Some(what) = what {
            diags.push(
                Diagnostic::error(
                    ip_loc(m),
                    ip_field(m),
                    format!("{ip} is {what} of {net}; it cannot be a machine's address"),
                )
                .with_hint(format!(
                    "pick an address from {} to {}",
                    Ipv4Addr::from(network + 1),
                    Ipv4Addr::from(gw - 1)
                )),
            );
            explicit.insert(&m.full_name);
            continue;
        }
        if let Some((other, _)) = taken.get(&a) {
            diags.push(
                Diagnostic::error(
                    ip_loc(m),
                    ip_field(m),
                    format!("{ip} is also the ip of machine '{other}'"),
                )
                .with_hint("give each machine its own address, or remove `ip:` from one of them"),
            );
            explicit.insert(&m.full_name);
            continue;
        }
        taken.insert(a, (&m.full_name, true));
        explicit.insert(&m.full_name);
        alloc.addresses.insert(m.full_name.clone(), ip);
    }

    for m in &machines {
        if explicit.contains(m.full_name.as_str()) {
            continue;
        }
        let kept = prior.addresses.get(&m.full_name).copied().filter(|ip| {
            let a = u32::from(*ip);
            net.contains(ip) && a != network && a != broadcast && a != gw
        });
        match kept {
            Some(ip) => match taken.get(&u32::from(ip)) {
                Some((other, true)) => {
                    // An explicit ip claims an address allocated earlier: refuse
                    // rather than renumber the machine holding it.
                    let other_m = d.machines.values().find(|x| x.full_name == *other);
                    diags.push(
                        Diagnostic::error(
                            other_m.and_then(ip_loc),
                            other_m.map(ip_field).unwrap_or_default(),
                            format!(
                                "{ip} is already allocated to machine '{}' (moat never renumbers a machine)",
                                m.full_name
                            ),
                        )
                        .with_hint(format!(
                            "choose a free address, or first give '{}' an explicit ip elsewhere",
                            m.full_name
                        )),
                    );
                }
                _ => {
                    taken.insert(u32::from(ip), (&m.full_name, false));
                    alloc.addresses.insert(m.full_name.clone(), ip);
                }
            },
            None => needs_auto.push(m),
        }
    }

    // Lowest free address first; taking addresses only moves the answer up.
    let mut cursor = auto_first;
    for m in needs_auto {
        while cursor <= auto_last && taken.contains_key(&cursor) {
            cursor += 1;
        }
        if cursor > auto_last {
            diags.push(
                Diagnostic::error(
                    m.loc.clone(),
                    format!("domains.{}.machines.{}", d.name, m.name),
                    format!(
                        "no free address left for this machine in {net}: automatic addresses go from {} to {}",
                        Ipv4Addr::from(auto_first),
                        Ipv4Addr::from(auto_last)
                    ),
                )
                .with_hint("move machines to another domain, or give the domain a larger `subnet:`"),
            );
            continue;
        }
        taken.insert(cursor, (&m.full_name, false));
        alloc
            .addresses
            .insert(m.full_name.clone(), Ipv4Addr::from(cursor));
    }

    for m in ignored_ip {
        let Some(ip) = m.ip else { continue };
        let instead = alloc
            .addresses
            .get(&m.full_name)
            .map(|a| format!("; moat assigned {a} instead"))
            .unwrap_or_default();
        diags.push(
            Diagnostic::warning(
                ip_loc(m),
                ip_field(m),
                format!(
                    "{ip} is outside the subnet of domain '{}' ({net}){instead}",
                    d.name
                ),
            )
            .with_hint(format!(
                "set an ip inside {net}, or remove `ip:`, to silence this warning"
            )),
        );
    }
}

/// Step 4: interface numbers, kept for existing machines, lowest unused for new ones.
fn allocate_ifnums(project: &Project, prior: &Allocations, alloc: &mut Allocations) {
    let wanted: Vec<&str> = project
        .domains
        .values()
        .flat_map(|d| d.machines.values())
        .filter(|m| m.network == NetworkMode::Domain && alloc.addresses.contains_key(&m.full_name))
        .map(|m| m.full_name.as_str())
        .collect();
    let mut used: BTreeSet<u32> = BTreeSet::new();
    let mut new = Vec::new();
    for name in wanted {
        match prior.ifnums.get(name) {
            Some(n) if used.insert(*n) => {
                alloc.ifnums.insert(name.to_string(), *n);
            }
            _ => new.push(name),
        }
    }
    let mut next = 0u32;
    for name in new {
        while used.contains(&next) {
            next += 1;
        }
        used.insert(next);
        alloc.ifnums.insert(name.to_string(), next);
    }
}
