//! `moat import incus`: existing Incus state → a moat project (moat.yml text)
//! that adopts it in place, so `moat plan` on the result changes nothing.
//!
//! ```text
//! Incus project P       ─▶ domain sanitize(P), `incus: {project: P, network: N, gateway: G}`,
//!                          subnet from N (the bridge of P's default profile), egress/dhcp from N
//! profile (not default) ─▶ domain profile (config + devices)
//! instance I            ─▶ machine sanitize(I), `incus: {instance: I}`, driver incus, type,
//!                          image alias, limits, ip (static, else the current address),
//!                          profiles, config (minus volatile/image/limits keys)
//! ```
//!
//! Adopted instances carry no moat markers; moat observes them through the
//! names above, repairs their state and limits, and never re-creates them for
//! settings it cannot know (see docs/incus.md).

use crate::client::{enc, Client};
use crate::{mapping, IncusError};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// One Incus project's worth of state, as read from the server.
#[derive(Clone, Debug, Default)]
pub struct ProjectState {
    pub name: String,
    /// The network of the project's default profile `eth0` (JSON), if any.
    pub network: Option<Value>,
    /// Profiles other than `default` (JSON).
    pub profiles: Vec<Value>,
    /// Instances (JSON with config, devices, profiles, type).
    pub instances: Vec<Value>,
    /// Image fingerprint → alias.
    pub aliases: BTreeMap<String, String>,
}

fn last(u: &Value) -> Option<String> {
    let s = u.as_str()?.rsplit('/').next()?;
    Some(s.split('?').next().unwrap_or(s).to_string())
}

/// Reads projects `only` (all projects but moat's own when empty).
pub fn read(c: &Client, only: &[String]) -> Result<Vec<ProjectState>, IncusError> {
    let names: Vec<String> = if only.is_empty() {
        c.get("/1.0/projects")?
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(last)
            .filter(|p| !p.starts_with("moat-"))
            .collect()
    } else {
        only.to_vec()
    };
    let mut out = Vec::new();
    for p in names {
        let q = enc(&p);
        if c.get_opt(&format!("/1.0/projects/{q}"))?.is_none() {
            return Err(IncusError::Config {
                message: format!("no Incus project '{p}' (`incus project list` shows them)"),
            });
        }
        // Aliases live in the project when it has its own images, else in `default`.
        let mut aliases = BTreeMap::new();
        for a in c
            .get(&format!("/1.0/images/aliases?recursion=1&project={q}"))?
            .as_array()
            .into_iter()
            .flatten()
        {
            if let (Some(n), Some(t)) = (a["name"].as_str(), a["target"].as_str()) {
                aliases.insert(t.to_string(), n.to_string());
            }
        }
        let default = c.get_opt(&format!("/1.0/profiles/default?project={q}"))?;
        let network = match default
            .as_ref()
            .and_then(|d| d["devices"]["eth0"]["network"].as_str())
        {
            Some(n) => c.get_opt(&format!("/1.0/networks/{}", enc(n)))?,
            None => None,
        };
        let profiles = c
            .get(&format!("/1.0/profiles?project={q}&recursion=1"))?
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] != "default")
            .cloned()
            .collect();
        let instances = c
            .get(&format!("/1.0/instances?project={q}&recursion=2"))?
            .as_array()
            .cloned()
            .unwrap_or_default();
        out.push(ProjectState {
            name: p,
            network,
            profiles,
            instances,
            aliases,
        });
    }
    Ok(out)
}

/// A DNS label of at most `max` characters from an Incus name.
pub fn sanitize(name: &str, max: usize) -> String {
    let mut s: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        s.insert(0, 'x');
    }
    s.truncate(max);
    s.trim_end_matches('-').to_string()
}

fn q(s: &str) -> String {
    // JSON strings are YAML strings.
    serde_json::to_string(s).unwrap_or_default()
}

fn map_yaml(out: &mut String, indent: usize, m: &serde_json::Map<String, Value>) {
    for (k, v) in m {
        let pad = " ".repeat(indent);
        match v {
            Value::Object(o) => {
                let _ = writeln!(out, "{pad}{}:", q(k));
                map_yaml(out, indent + 2, o);
            }
            Value::String(s) => {
                let _ = writeln!(out, "{pad}{}: {}", q(k), q(s));
            }
            other => {
                let _ = writeln!(out, "{pad}{}: {}", q(k), q(&other.to_string()));
            }
        }
    }
}

/// Instance config keys that are Incus's own bookkeeping or moat's fields.
fn passthrough(k: &str) -> bool {
    !(k.starts_with("volatile.")
        || k.starts_with("image.")
        || k.starts_with("user.moat.")
        || k == "limits.cpu"
        || k == "limits.memory"
        || k == "limits.processes"
        || k == "security.privileged")
}

/// The result of [`describe`]: moat.yml text and what could not be carried over.
#[derive(Clone, Debug, Default)]
pub struct Described {
    pub moat_yml: String,
    /// One line per thing changed or not carried over.
    pub notes: Vec<String>,
    /// Machine full names written.
    pub machines: Vec<String>,
}

/// A name not in `taken`: `base`, else `base-2`, `base-3`, ... (cut to `max`).
fn unique(base: &str, max: usize, taken: &mut BTreeSet<String>) -> String {
    let mut n = 1;
    loop {
        let cand = if n == 1 {
            base.to_string()
        } else {
            let suffix = format!("-{n}");
            let mut b = base.to_string();
            b.truncate(max.saturating_sub(suffix.len()));
            format!("{}{suffix}", b.trim_end_matches('-'))
        };
        if taken.insert(cand.clone()) {
            return cand;
        }
        n += 1;
    }
}

/// The address an instance has on eth0: its static one, else its current lease.
fn instance_ip(i: &Value) -> Option<String> {
    if let Some(ip) = i["devices"]["eth0"]["ipv4.address"].as_str() {
        return Some(ip.to_string());
    }
    i["state"]["network"]["eth0"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["family"] == "inet" && a["scope"] == "global")
        .and_then(|a| a["address"].as_str())
        .map(str::to_string)
}

/// The moat.yml adopting `projects` (`incus_block`: the project's `incus:`
/// connection lines, if any, already indented by two spaces).
pub fn describe(projects: &[ProjectState], project_name: &str, incus_block: &str) -> Described {
    let mut out = Described::default();
    let y = &mut out.moat_yml;
    let _ = writeln!(
        y,
        "# Written by `moat import incus` from the Incus server's state: every domain and\n\
         # machine below adopts an existing Incus object (`incus:` names it)."
    );
    let _ = writeln!(y, "schema_version: 1");
    let _ = writeln!(y, "project: {}", q(project_name));
    let _ = writeln!(y, "defaults:\n  driver: {{ container: incus, vm: incus }}");
    if !incus_block.is_empty() {
        let _ = writeln!(y, "incus:\n{incus_block}");
    }
    let _ = writeln!(y, "domains:");
    let mut domains = BTreeSet::from(["host".to_string()]);
    let mut networks = BTreeSet::new();
    for p in projects {
        let mut domain = sanitize(&p.name, moat_core::naming::MAX_DOMAIN_LEN);
        if domain != p.name.to_ascii_lowercase() {
            out.notes.push(format!(
                "Incus project {}: domain named '{domain}' (moat domain names are DNS labels of at most {} characters)",
                p.name,
                moat_core::naming::MAX_DOMAIN_LEN
            ));
        }
        domain = unique(&domain, moat_core::naming::MAX_DOMAIN_LEN, &mut domains);
        let _ = writeln!(y, "  {domain}:");
        let _ = writeln!(
            y,
            "    description: {}",
            q(&format!("Incus project {}", p.name))
        );
        let net = p.network.as_ref();
        let addr = net
            .and_then(|n| n["config"]["ipv4.address"].as_str())
            .and_then(|a| a.parse::<ipnet::Ipv4Net>().ok());
        let mut adopt = vec![format!("project: {}", q(&p.name))];
        let net_name = net.and_then(|n| n["name"].as_str()).unwrap_or("");
        let (lo, hi) = (
            moat_core::address::MIN_PREFIX,
            moat_core::address::MAX_PREFIX,
        );
        let net = match (net, addr) {
            (Some(_), Some(a)) if !(lo..=hi).contains(&a.prefix_len()) => {
                out.notes.push(format!(
                    "Incus project {}: network {net_name} is a /{} (moat domains take /{lo} to /{hi}); moat gives the domain its own network",
                    p.name,
                    a.prefix_len()
                ));
                None
            }
            (Some(_), Some(_)) if !networks.insert(net_name.to_string()) => {
                out.notes.push(format!(
                    "Incus project {}: network {net_name} is already the bridge of another domain (one bridge per moat domain); moat gives this domain its own network",
                    p.name
                ));
                None
            }
            _ => net,
        };
        let skipped = net.is_none() && !net_name.is_empty() && addr.is_some();
        match (net, addr) {
            (Some(n), Some(a)) => {
                let subnet = a.trunc();
                let _ = writeln!(y, "    subnet: {}", q(&subnet.to_string()));
                if n["config"]["ipv4.nat"].as_str() != Some("true") {
                    let _ = writeln!(y, "    egress: none");
                }
                if n["config"]["ipv4.dhcp"].as_str() == Some("false") {
                    let _ = writeln!(y, "    dhcp: false");
                }
                adopt.push(format!("network: {}", q(n["name"].as_str().unwrap_or(""))));
                if a.addr() != moat_core::address::gateway(&subnet) {
                    adopt.push(format!("gateway: {}", q(&a.addr().to_string())));
                }
            }
            (Some(n), None) => out.notes.push(format!(
                "Incus project {}: network {} has no IPv4 address; moat gives the domain its own network",
                p.name,
                n["name"].as_str().unwrap_or("?")
            )),
            (None, _) if skipped => {}
            (None, _) => out.notes.push(format!(
                "Incus project {}: its default profile has no bridge NIC; moat gives the domain its own network",
                p.name
            )),
        }
        let _ = writeln!(y, "    incus: {{ {} }}", adopt.join(", "));
        if !p.profiles.is_empty() {
            let _ = writeln!(y, "    profiles:");
            for prof in &p.profiles {
                let name = sanitize(prof["name"].as_str().unwrap_or("p"), 63);
                let _ = writeln!(y, "      {name}:");
                for key in ["config", "devices"] {
                    if let Some(o) = prof[key].as_object().filter(|o| !o.is_empty()) {
                        let _ = writeln!(y, "        {key}:");
                        map_yaml(y, 10, o);
                    }
                }
            }
        }
        let _ = writeln!(y, "    machines:");
        if p.instances.is_empty() {
            let _ = writeln!(y, "      {{}}");
        }
        let mut names = BTreeSet::new();
        let max = moat_core::naming::MAX_FULL_NAME_LEN - domain.len() - 1;
        for i in &p.instances {
            let iname = i["name"].as_str().unwrap_or("m");
            let short = iname.strip_prefix(&format!("{domain}-")).unwrap_or(iname);
            let mname = unique(&sanitize(short, max), max, &mut names);
            out.machines.push(format!("{domain}-{mname}"));
            let _ = writeln!(y, "      {mname}:");
            let _ = writeln!(y, "        incus: {{ instance: {} }}", q(iname));
            if i["type"] == "virtual-machine" {
                let _ = writeln!(y, "        type: vm");
            }
            let fp = i["config"]["volatile.base_image"].as_str().unwrap_or("");
            match p.aliases.get(fp) {
                Some(alias) => {
                    let _ = writeln!(y, "        image: {}", q(alias));
                }
                None => out.notes.push(format!(
                    "instance {}/{iname}: its image has no alias; `image:` is left at the default (only used if moat re-creates it)",
                    p.name
                )),
            }
            let l = mapping::limits_of(i);
            if let Some(c) = l.cpus {
                let _ = writeln!(y, "        cpus: {c}");
            }
            if let Some(m) = l.memory {
                let _ = writeln!(y, "        memory: {}", moat_core::plan::human_bytes(m));
            }
            if let Some(n) = l.pids {
                let _ = writeln!(y, "        pids: {n}");
            }
            if i["config"]["security.privileged"] == "true" {
                let _ = writeln!(y, "        privileged: true");
            }
            let has_nic = i["expanded_devices"]["eth0"]["type"] == "nic"
                || i["devices"]["eth0"]["type"] == "nic";
            if !has_nic {
                let _ = writeln!(y, "        network: none");
            } else if let Some(ip) = instance_ip(i) {
                let _ = writeln!(y, "        ip: {}", q(&ip));
            }
            if i["status"].as_str() != Some("Running") {
                out.notes.push(format!(
                    "instance {}/{iname} is {}: moat starts every declared machine (run `moat stop {domain}-{mname}` after apply to keep it stopped)",
                    p.name,
                    i["status"].as_str().unwrap_or("not running")
                ));
            }
            let profs: Vec<String> = i["profiles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str())
                .filter(|p| *p != "default")
                .map(|p| sanitize(p, 63))
                .collect();
            if !profs.is_empty() {
                let _ = writeln!(y, "        profiles: [{}]", profs.join(", "));
            }
            let mut cfg = serde_json::Map::new();
            for (k, v) in i["config"].as_object().into_iter().flatten() {
                if passthrough(k) {
                    cfg.insert(k.clone(), v.clone());
                }
            }
            if !cfg.is_empty() {
                let _ = writeln!(y, "        config:");
                map_yaml(y, 10, &cfg);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What `describe` writes loads and resolves onto the adopted names: the
    /// bridge and gateway are Incus's, a machine without an address gets one
    /// that is not the gateway, a stopped instance and a missing alias are notes.
    #[test]
    fn described_project_resolves_onto_adopted_names() {
        let p = ProjectState {
            name: "lab".into(),
            network: Some(json!({"name": "labbr0",
                "config": {"ipv4.address": "10.9.8.1/24", "ipv4.nat": "true"}})),
            profiles: vec![],
            instances: vec![
                json!({"name": "a", "type": "container", "status": "Running",
                       "config": {"volatile.base_image": "f1"},
                       "expanded_devices": {"eth0": {"type": "nic"}}, "devices": {},
                       "state": {"network": {"eth0": {"addresses": [
                           {"family": "inet", "scope": "global", "address": "10.9.8.77"}]}}},
                       "profiles": ["default"]}),
                json!({"name": "b", "type": "container", "status": "Stopped",
                       "config": {"volatile.base_image": "unknown"},
                       "expanded_devices": {"eth0": {"type": "nic"}}, "devices": {},
                       "profiles": ["default"]}),
            ],
            aliases: [("f1".to_string(), "debian/12".to_string())].into(),
        };
        let d = describe(&[p], "lab", "");
        assert_eq!(d.notes.len(), 2, "{:?}", d.notes);
        assert!(d.notes[0].contains("no alias"), "{:?}", d.notes);
        assert!(d.notes[1].contains("is Stopped"), "{:?}", d.notes);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("moat.yml"), &d.moat_yml).expect("write");
        let (a, _) = moat_core::check(
            dir.path(),
            &moat_core::model::Allocations::default(),
            "/var/lib/moat",
        )
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.moat_yml));
        let r = a.resolved;
        let net = &r.networks["lab"];
        assert_eq!(net.bridge, "labbr0");
        assert_eq!(net.gateway.to_string(), "10.9.8.1");
        assert_eq!(r.nics["lab-a"].ip.to_string(), "10.9.8.77");
        let b = r.nics["lab-b"].ip;
        assert!(
            b.to_string() != "10.9.8.1" && b.to_string() != "10.9.8.77",
            "{b}"
        );
        let inc = r.project.incus.as_ref().expect("incus");
        assert_eq!(inc.instances["lab-a"], "a");
        assert_eq!(inc.domains["lab"].project.as_deref(), Some("lab"));
        assert_eq!(
            r.project.machine("lab-a").map(|m| m.image.as_str()),
            Some("debian/12")
        );
        assert_eq!(
            r.project.domains["lab"].egress,
            moat_core::model::Egress::Nat
        );
    }

    #[test]
    fn shared_or_odd_networks_are_not_adopted_twice() {
        let proj = |name: &str, addr: &str| ProjectState {
            name: name.into(),
            network: Some(json!({"name": "incusbr0", "config": {"ipv4.address": addr}})),
            ..Default::default()
        };
        let d = describe(
            &[
                proj("one", "10.5.5.1/24"),
                proj("two", "10.5.5.1/24"),
                proj("three", "10.0.0.1/8"),
            ],
            "x",
            "",
        );
        assert_eq!(
            d.moat_yml.matches("network: \"incusbr0\"").count(),
            1,
            "{}",
            d.moat_yml
        );
        assert_eq!(d.notes.len(), 2, "{:?}", d.notes);
        assert!(d.notes[0].contains("already the bridge of another domain"));
        assert!(d.notes[1].contains("is a /8"));
    }

    #[test]
    fn describes_a_project() {
        let p = ProjectState {
            name: "Web_Prod".into(),
            network: Some(json!({"name": "br0", "config": {"ipv4.address": "10.9.8.1/24"}})),
            profiles: vec![
                json!({"name": "big", "config": {"limits.cpu.allowance": "50%"}, "devices": {}}),
            ],
            instances: vec![json!({
                "name": "web", "type": "container",
                "config": {"limits.cpu": "2", "limits.memory": "512MiB", "volatile.base_image": "f1",
                           "security.nesting": "true", "volatile.eth0.hwaddr": "x"},
                "devices": {"eth0": {"type": "nic", "ipv4.address": "10.9.8.5"}},
                "profiles": ["default", "big"],
            })],
            aliases: [("f1".to_string(), "busybox".to_string())].into(),
        };
        let d = describe(&[p], "imported", "");
        let y = d.moat_yml;
        assert!(y.contains("  web-prod:\n"), "{y}");
        assert!(
            y.contains("incus: { project: \"Web_Prod\", network: \"br0\", gateway: \"10.9.8.1\" }"),
            "{y}"
        );
        assert!(y.contains("incus: { instance: \"web\" }"), "{y}");
        assert!(y.contains("egress: none"), "{y}");
        assert_eq!(d.machines, vec!["web-prod-web".to_string()]);
        assert!(y.contains("subnet: \"10.9.8.0/24\""), "{y}");
        assert!(
            y.contains("        image: \"busybox\"\n        cpus: 2\n        memory: 512MiB\n"),
            "{y}"
        );
        assert!(y.contains("ip: \"10.9.8.5\""), "{y}");
        assert!(y.contains("profiles: [big]"), "{y}");
        assert!(y.contains("\"security.nesting\": \"true\""), "{y}");
        assert!(!y.contains("volatile"), "{y}");
    }
}
