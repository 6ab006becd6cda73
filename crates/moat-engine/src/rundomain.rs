//! `moat run --domain D`: an ad-hoc machine on an applied domain's network.
//!
//! The state store records the machine as `adhoc` with its domain. Every
//! [`Engine::check`] then resolves the project as if the domain declared it
//! (see [`with_adhoc`]): it gets an address and an ifnum like a declared machine
//! (kept in the allocations, so neither a concurrent run nor the next apply
//! reuses them), and its NIC joins `resolved.nics`, so the rendered ruleset
//! gives it the same isolation and anti-spoofing entries, and the next apply's
//! firewall hash already counts it (no drift, nothing removed). The machine
//! itself is not added to the project: plans never create, replace or prune it.
//!
//! Releasing (`--rm`, `moat destroy`) forgets the record and the allocation and
//! re-renders the ruleset without it; the host interface goes with the
//! machine's network namespace.

use crate::run::ADHOC;
use crate::{state_err, Engine, EngineError, Result};
use moat_core::model::{Allocations, Machine, NetworkMode, Resolved, ResolvedNic};
use moat_driver::BridgeInfo;
use std::collections::BTreeMap;
use std::path::Path;

/// `resolved` re-allocated with the ad-hoc machines `(name, domain)` added to
/// their domains, then with the project put back: only allocations and NICs
/// change. Records whose domain is gone or disabled are left out.
pub(crate) fn with_adhoc(
    resolved: Resolved,
    adhoc: &[(String, String)],
    prior: &Allocations,
    root: &str,
) -> Resolved {
    let mut project = resolved.project.clone();
    let mut added = false;
    for (name, domain) in adhoc {
        if project.machine(name).is_some() {
            continue;
        }
        let Some(d) = project.domains.get_mut(domain).filter(|d| d.enabled) else {
            continue;
        };
        if d.machines.contains_key(name) {
            continue;
        }
        d.machines.insert(
            name.clone(),
            Machine {
                domain: domain.clone(),
                network: NetworkMode::Domain,
                ..Machine::adhoc(name, "")
            },
        );
        added = true;
    }
    if !added {
        return resolved;
    }
    match moat_core::address::allocate(&project, prior, root) {
        Ok(a) => Resolved {
            project: resolved.project,
            ..a.resolved
        },
        Err(_) => resolved,
    }
}

/// What `run --domain` needs to create the machine with a NIC.
pub(crate) struct Attached {
    pub nic: moat_core::model::ResolvedNic,
    pub bridge: BridgeInfo,
    pub hosts: Vec<(String, std::net::Ipv4Addr)>,
}

impl Engine {
    /// `(name, domain)` of the ad-hoc machines attached to a domain.
    pub(crate) fn adhoc_domains(&self) -> Result<Vec<(String, String)>> {
        if !self.cfg.root.join("state.db").exists() {
            return Ok(vec![]);
        }
        Ok(self
            .state()?
            .resources()
            .map_err(state_err)?
            .into_iter()
            .filter(|r| r.kind == ADHOC)
            .filter_map(|r| r.domain.map(|d| (r.name, d)))
            .collect())
    }

    /// Record `name` as an ad-hoc machine of `domain`, allocate its address and
    /// ifnum, and apply the ruleset that includes it. The caller holds the
    /// apply lock.
    pub(crate) fn attach_adhoc(
        &self,
        host: &crate::host::Host,
        project: &Path,
        domain: &str,
        name: &str,
    ) -> Result<Attached> {
        let checked = self.check(project)?;
        let r = &checked.resolved;
        if r.project.machine(name).is_some()
            || r.project
                .domains
                .get(domain)
                .is_some_and(|d| d.machines.contains_key(name))
        {
            return Err(EngineError::Failed(format!(
                "'{name}' is a machine of the project; pick another --name"
            )));
        }
        let Some(net) = r.networks.get(domain) else {
            return Err(EngineError::Failed(format!(
                "domain '{domain}' is not in the project (or is disabled); \
                 `moat status` lists the domains"
            )));
        };
        let state = self.state()?;
        let applied = state
            .resources()
            .map_err(state_err)?
            .iter()
            .any(|x| x.kind == "network" && !x.pending && x.domain.as_deref() == Some(domain));
        if !applied || !link_is_up(&net.bridge, &moat_core::naming::if_alias(&self.root_str)) {
            return Err(EngineError::Failed(format!(
                "domain '{domain}' is not applied yet (bridge {} is missing); run `moat apply` first",
                net.bridge
            )));
        }
        state
            .intend(ADHOC, name, Some(domain), Some(name))
            .map_err(state_err)?;
        let attached = self.render_with(host, checked.resolved, name, domain);
        if attached.is_err() {
            let _ = self.release_adhoc(host, &state, name, Some(project));
        }
        attached
    }

    /// `resolved` (checked before `name` was recorded) with `name` allocated.
    fn render_with(
        &self,
        host: &crate::host::Host,
        resolved: Resolved,
        name: &str,
        domain: &str,
    ) -> Result<Attached> {
        let mut state = self.state()?;
        let prior = state.load_allocations().map_err(state_err)?;
        let mut r = with_adhoc(resolved, &self.adhoc_domains()?, &prior, &self.root_str);
        avoid_dying_interface(
            &mut r.nics,
            &mut r.allocations.ifnums,
            &r.root_tag,
            name,
            link_exists,
        );
        let r = &r;
        let (Some(nic), Some(net)) = (r.nics.get(name), r.networks.get(domain)) else {
            return Err(EngineError::Failed(format!(
                "no free address left in domain '{domain}' for '{name}'; \
                 stop an ad-hoc machine or widen the domain's `subnet:`"
            )));
        };
        // Only this machine's allocation is added: the rest of the project
        // may hold unapplied changes, which are apply's to record.
        let mut alloc = prior;
        alloc.addresses.insert(name.into(), nic.ip);
        if let Some(n) = r.allocations.ifnums.get(name) {
            alloc.ifnums.insert(name.into(), *n);
        }
        state.save_allocations(&alloc).map_err(state_err)?;
        self.apply_rules(host, r)?;
        let mut hosts = Vec::new();
        if let Some(d) = r.project.domains.get(domain) {
            for peer in d.machines.values() {
                if let Some(n) = r.nics.get(&peer.full_name) {
                    hosts.push((peer.name.clone(), n.ip));
                    hosts.push((peer.full_name.clone(), n.ip));
                }
            }
        }
        Ok(Attached {
            nic: nic.clone(),
            bridge: BridgeInfo {
                name: net.bridge.clone(),
                gateway: net.gateway,
                prefix_len: net.subnet.prefix_len(),
            },
            hosts,
        })
    }

    /// The ruleset of `resolved`, in one atomic `nft -f`: in place from the
    /// ruleset applied last when only machine ports changed (the usual case:
    /// this machine's anti-spoofing entries), else replaced as apply does.
    fn apply_rules(&self, host: &crate::host::Host, resolved: &Resolved) -> Result<()> {
        let rules = moat_net::render(resolved, moat_net::RenderOptions::default());
        let old = std::fs::read_to_string(self.applied_rules_path()).ok();
        host.net
            .update_ruleset(old.as_deref(), &rules)
            .map_err(|e| EngineError::Failed(format!("{e}; `moat apply` repairs the firewall")))?;
        let _ = std::fs::write(self.applied_rules_path(), rules.body);
        Ok(())
    }

    /// Forget ad-hoc machine `name` (record, address, ifnum); when it was on a
    /// domain and the project is at hand, re-render the ruleset without it
    /// (else the next apply does). The caller holds the apply lock and has
    /// destroyed the machine.
    pub(crate) fn release_adhoc(
        &self,
        host: &crate::host::Host,
        state: &moat_state::StateStore,
        name: &str,
        project: Option<&Path>,
    ) -> Result<()> {
        let had_domain = state
            .resources()
            .map_err(state_err)?
            .iter()
            .any(|r| r.kind == ADHOC && r.name == name && r.domain.is_some());
        state.forget(ADHOC, name).map_err(state_err)?;
        if !had_domain {
            return Ok(());
        }
        let mut st = self.state()?;
        let mut alloc = st.load_allocations().map_err(state_err)?;
        alloc.addresses.remove(name);
        alloc.ifnums.remove(name);
        st.save_allocations(&alloc).map_err(state_err)?;
        if let Some(p) = project {
            if let Ok(checked) = self.check(p) {
                self.apply_rules(host, &checked.resolved)?;
            }
        }
        Ok(())
    }
}

/// Gives ad-hoc machine `name` another interface number when the host
/// interface its number names still exists. Numbers are freed when a run
/// ends, but its interface goes only when the kernel tears down the run's
/// network namespace, in the background and a little later: the next run
/// got the same number, found the name taken and had to delete the old
/// interface itself, which waits for an RCU barrier (10 ms and more on a
/// busy host). The lowest number used by no machine and by no interface is
/// taken instead.
fn avoid_dying_interface(
    nics: &mut BTreeMap<String, ResolvedNic>,
    ifnums: &mut BTreeMap<String, u32>,
    root_tag: &str,
    name: &str,
    exists: impl Fn(&str) -> bool,
) {
    let Some(nic) = nics.get_mut(name) else {
        return;
    };
    if !exists(&nic.host_if) {
        return;
    }
    let taken: std::collections::BTreeSet<u32> = ifnums
        .iter()
        .filter(|(m, _)| m.as_str() != name)
        .map(|(_, n)| *n)
        .collect();
    let Some(n) = (0u32..100_000)
        .find(|n| !taken.contains(n) && !exists(&moat_core::naming::host_if_name(root_tag, *n)))
    else {
        return;
    };
    ifnums.insert(name.to_string(), n);
    nic.host_if = moat_core::naming::host_if_name(root_tag, n);
}

/// The sysfs folder of network interface `name` (`None` for a name that
/// cannot be one).
fn net_dir(name: &str) -> Option<std::path::PathBuf> {
    (!name.is_empty() && !name.contains('/'))
        .then(|| std::path::Path::new("/sys/class/net").join(name))
}

/// Whether network interface `name` exists on the host.
fn link_exists(name: &str) -> bool {
    net_dir(name).is_some_and(|d| d.exists())
}

/// Whether network interface `name` exists, is a bridge, carries this
/// root's ownership mark (`alias`) and is administratively up (`IFF_UP`).
/// A few sysfs reads: a full `observe` of the host's bridges and tables
/// costs three processes on every `run --domain`.
fn link_is_up(name: &str, alias: &str) -> bool {
    const IFF_UP: u32 = 0x1;
    let Some(dir) = net_dir(name) else {
        return false;
    };
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    dir.join("bridge").is_dir()
        && read("ifalias").trim() == alias
        && u32::from_str_radix(read("flags").trim().trim_start_matches("0x"), 16)
            .is_ok_and(|f| f & IFF_UP != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Nics = BTreeMap<String, ResolvedNic>;

    fn resolved(ifnums: &[(&str, u32)]) -> (Nics, BTreeMap<String, u32>) {
        let mut nics = Nics::new();
        let mut nums = BTreeMap::new();
        for (m, n) in ifnums {
            nums.insert(m.to_string(), *n);
            nics.insert(
                m.to_string(),
                ResolvedNic {
                    machine: m.to_string(),
                    ip: "10.0.0.1".parse().unwrap(),
                    mac: [0; 6],
                    host_if: moat_core::naming::host_if_name("abc", *n),
                },
            );
        }
        (nics, nums)
    }

    #[test]
    fn a_run_skips_the_number_of_an_interface_still_being_torn_down() {
        // run-b got 0 (freed by an ended run whose mvabc-0 is still there);
        // 1 is another machine's, 2 names a dying interface too: 3.
        let (mut nics, mut nums) = resolved(&[("run-b", 0), ("dev", 1)]);
        let dying = ["mvabc-0", "mvabc-2"];
        avoid_dying_interface(&mut nics, &mut nums, "abc", "run-b", |n| dying.contains(&n));
        assert_eq!(nums["run-b"], 3);
        assert_eq!(nics["run-b"].host_if, "mvabc-3");
        assert_eq!(nums["dev"], 1);
        // Nothing in the way: the number stays.
        let (mut nics, mut nums) = resolved(&[("run-c", 0)]);
        avoid_dying_interface(&mut nics, &mut nums, "abc", "run-c", |_| false);
        assert_eq!(nics["run-c"].host_if, "mvabc-0");
    }
}
