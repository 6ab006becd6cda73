//! `moat import incus`: existing Incus state → a moat project (moat.yml text).
//!
//! ```text
//! Incus project P      ─▶ domain sanitize(P) (subnet: from the bridge of P's default profile)
//! profile (not default) ─▶ domain profile (config + devices)
//! instance             ─▶ machine: driver incus, type, image alias, limits, ip (eth0
//!                         ipv4.address), profiles, config (minus volatile/image/limits keys)
//! ```
//!
//! What is written describes the state; applying it creates the machines in
//! moat's own Incus projects (`moat-<tag>-<domain>`, bridges `mt<tag>-<domain>`).
//! Adopting the existing objects in place (so that `moat plan` on the result is
//! empty) is not implemented: it needs per-domain project/bridge and per-machine
//! instance-name overrides in moat's model.

use crate::client::{enc, Client};
use crate::{mapping, IncusError};
use serde_json::Value;
use std::collections::BTreeMap;
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
    let mut aliases = BTreeMap::new();
    for a in c
        .get("/1.0/images/aliases?recursion=1")?
        .as_array()
        .into_iter()
        .flatten()
    {
        if let (Some(n), Some(t)) = (a["name"].as_str(), a["target"].as_str()) {
            aliases.insert(t.to_string(), n.to_string());
        }
    }
    let mut out = Vec::new();
    for p in names {
        let q = enc(&p);
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
            .get(&format!("/1.0/instances?project={q}&recursion=1"))?
            .as_array()
            .cloned()
            .unwrap_or_default();
        out.push(ProjectState {
            name: p,
            network,
            profiles,
            instances,
            aliases: aliases.clone(),
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

/// The moat.yml describing `projects`.
pub fn describe(projects: &[ProjectState], project_name: &str) -> String {
    let mut y = String::new();
    let _ = writeln!(
        y,
        "# Written by `moat import incus` from the Incus server's state."
    );
    let _ = writeln!(y, "schema_version: 1");
    let _ = writeln!(y, "project: {}", q(project_name));
    let _ = writeln!(y, "defaults:\n  driver: {{ container: incus, vm: incus }}");
    let _ = writeln!(y, "domains:");
    for p in projects {
        let domain = sanitize(&p.name, moat_core::naming::MAX_DOMAIN_LEN);
        let _ = writeln!(y, "  {domain}:");
        let _ = writeln!(
            y,
            "    description: {}",
            q(&format!("Incus project {}", p.name))
        );
        if let Some(net) = p
            .network
            .as_ref()
            .and_then(|n| n["config"]["ipv4.address"].as_str())
            .and_then(|a| a.parse::<ipnet::Ipv4Net>().ok())
        {
            let _ = writeln!(y, "    subnet: {}", q(&net.trunc().to_string()));
        }
        if !p.profiles.is_empty() {
            let _ = writeln!(y, "    profiles:");
            for prof in &p.profiles {
                let name = sanitize(prof["name"].as_str().unwrap_or("p"), 63);
                let _ = writeln!(y, "      {name}:");
                for key in ["config", "devices"] {
                    if let Some(o) = prof[key].as_object().filter(|o| !o.is_empty()) {
                        let _ = writeln!(y, "        {key}:");
                        map_yaml(&mut y, 10, o);
                    }
                }
            }
        }
        let _ = writeln!(y, "    machines:");
        if p.instances.is_empty() {
            let _ = writeln!(y, "      {{}}");
        }
        for i in &p.instances {
            let iname = i["name"].as_str().unwrap_or("m");
            let short = iname.strip_prefix(&format!("{domain}-")).unwrap_or(iname);
            let _ = writeln!(y, "      {}:", sanitize(short, 50));
            if i["type"] == "virtual-machine" {
                let _ = writeln!(y, "        type: vm");
            }
            let fp = i["config"]["volatile.base_image"].as_str().unwrap_or("");
            if let Some(alias) = p.aliases.get(fp) {
                let _ = writeln!(y, "        image: {}", q(alias));
            }
            let l = mapping::limits_of(i);
            if let Some(c) = l.cpus {
                let _ = writeln!(y, "        cpus: {c}");
            }
            if let Some(m) = l.memory {
                let _ = writeln!(y, "        memory: {}MiB", m >> 20);
            }
            if let Some(n) = l.pids {
                let _ = writeln!(y, "        pids: {n}");
            }
            if i["config"]["security.privileged"] == "true" {
                let _ = writeln!(y, "        privileged: true");
            }
            if let Some(ip) = i["devices"]["eth0"]["ipv4.address"].as_str() {
                let _ = writeln!(y, "        ip: {}", q(ip));
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
                map_yaml(&mut y, 10, &cfg);
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn describes_a_project() {
        let p = ProjectState {
            name: "Web_Prod".into(),
            network: Some(json!({"config": {"ipv4.address": "10.9.8.1/24"}})),
            profiles: vec![
                json!({"name": "big", "config": {"limits.cpu.allowance": "50%"}, "devices": {}}),
            ],
            instances: vec![json!({
                "name": "web", "type": "container",
                "config": {"limits.cpu": "2", "limits.memory": "512MiB", "volatile.base_image": "f1",
                           "security.nesting": "true", "volatile.eth0.hwaddr": "x"},
                "devices": {"eth0": {"ipv4.address": "10.9.8.5"}},
                "profiles": ["default", "big"],
            })],
            aliases: [("f1".to_string(), "busybox".to_string())].into(),
        };
        let y = describe(&[p], "imported");
        assert!(y.contains("  web-prod:\n"), "{y}");
        assert!(y.contains("subnet: \"10.9.8.0/24\""), "{y}");
        assert!(
            y.contains(
                "      web:\n        image: \"busybox\"\n        cpus: 2\n        memory: 512MiB\n"
            ),
            "{y}"
        );
        assert!(y.contains("ip: \"10.9.8.5\""), "{y}");
        assert!(y.contains("profiles: [big]"), "{y}");
        assert!(y.contains("\"security.nesting\": \"true\""), "{y}");
        assert!(!y.contains("volatile"), "{y}");
    }
}
