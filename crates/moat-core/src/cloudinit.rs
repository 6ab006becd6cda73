//! cloud-init for machines: merging `cloud_init:` levels and rendering a
//! NoCloud seed.
//!
//! ```text
//!  cloud_init_templates: {name: {...}}          (project)
//!  domains.D.cloud_init:  {template: [..], ...}  (domain defaults)
//!  machines.M.cloud_init: {template: [..], ...}  (machine overrides)
//!        │  loader: expand_level + deep_merge, least specific first
//!        ▼
//!  Machine.cloud_init (one merged JSON map: user-data, meta-data, network-config)
//!        │  render(machine, nic)
//!        ▼
//!  NoCloudSeed { user_data, meta_data, network_config }
//!        │  drivers write it into the root (containers) or a seed volume (VMs)
//! ```
//!
//! Deep merge: maps merge key by key, recursively; scalars and lists from the
//! more specific level replace the less specific one; a `null` removes the key.
//! `user-data` written as a `#cloud-config` string is parsed first so that it
//! merges like a map; any other string (a shell script, `#include`, MIME) is
//! opaque and replaces what lies below it.
//!
//! Pure: no I/O. The instance id is `moat-<machine>-<hash>` where the hash
//! covers the rendered files, so any change in them makes cloud-init run again.

use crate::model::{Machine, Resolved};
use crate::yaml::{self, Node, Typed, Value as YValue};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use yaml_rust2::yaml::Hash as YHash;
use yaml_rust2::{Yaml, YamlEmitter};

/// The keys of a `cloud_init:` map that become seed files.
pub const USER_DATA: &str = "user-data";
pub const META_DATA: &str = "meta-data";
pub const NETWORK_CONFIG: &str = "network-config";
/// The key naming templates to apply below a level's own keys.
pub const TEMPLATE: &str = "template";

/// Where a container's root gets the seed (cloud-init's NoCloud seed folder).
pub const SEED_DIR: &str = "var/lib/cloud/seed/nocloud";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CloudInitError {
    #[error("machine '{machine}': cloud_init.{key} must be a map or a string, found {found}; write it as YAML under the key or as one text block")]
    BadValue {
        machine: String,
        key: &'static str,
        found: String,
    },
    #[error("machine '{machine}': cloud_init.{key} could not be written as YAML: {message}")]
    Emit {
        machine: String,
        key: &'static str,
        message: String,
    },
    #[error("unknown cloud-init template '{name}'; define it under cloud_init_templates: or fix the name")]
    UnknownTemplate { name: String },
}

/// The three files of a NoCloud seed, ready to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoCloudSeed {
    /// Starts with `#cloud-config` (or is the user's own script / MIME text).
    pub user_data: String,
    /// Holds at least `instance-id` and `local-hostname`.
    pub meta_data: String,
    /// Network config version 2; `None` when the machine has no NIC and the
    /// user gave none (cloud-init then keeps its fallback).
    pub network_config: Option<String>,
}

impl NoCloudSeed {
    /// (file name, contents) of every file of the seed, in a fixed order.
    pub fn files(&self) -> Vec<(&'static str, &str)> {
        let mut v = vec![(USER_DATA, self.user_data.as_str())];
        v.push((META_DATA, self.meta_data.as_str()));
        if let Some(n) = &self.network_config {
            v.push((NETWORK_CONFIG, n.as_str()));
        }
        v
    }

    /// The `instance-id` written in the meta-data.
    pub fn instance_id(&self) -> Option<&str> {
        self.meta_data.lines().find_map(|l| {
            l.strip_prefix("instance-id:")
                .map(|v| v.trim().trim_matches('"'))
        })
    }
}

/// A machine's network identity as the seed's default network-config needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedNic {
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub nameservers: Vec<Ipv4Addr>,
}

impl SeedNic {
    /// The NIC of `full_name` in a resolved project (its domain's gateway is
    /// the router and the DNS server), or `None` without `network: domain`.
    pub fn from_resolved(resolved: &Resolved, full_name: &str) -> Option<SeedNic> {
        let m = resolved.project.machine(full_name)?;
        let nic = resolved.nics.get(full_name)?;
        let net = resolved.networks.get(&m.domain)?;
        Some(SeedNic {
            mac: nic.mac,
            address: nic.ip,
            prefix_len: net.subnet.prefix_len(),
            gateway: net.gateway,
            nameservers: vec![net.gateway],
        })
    }
}

/// Merge `over` onto `base`: maps key by key (recursively), anything else
/// replaces; a `null` in `over` removes the key from `base`.
pub fn deep_merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                if v.is_null() {
                    b.remove(k);
                } else if let Some(bv) = b.get_mut(k) {
                    deep_merge(bv, v);
                } else {
                    b.insert(k.clone(), without_nulls(v));
                }
            }
        }
        (b, o) => *b = without_nulls(o),
    }
}

/// `v` with null map values dropped (a null means "no value" at every level).
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The template names a level asks for (`template: a` or `template: [a, b]`).
pub fn template_names(level: &Value) -> Vec<String> {
    match level.get(TEMPLATE) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    }
}

/// One level with its templates applied below its own keys (templates in the
/// order given, later ones over earlier ones), `template:` removed.
pub fn expand_level(
    level: &Value,
    templates: &BTreeMap<String, Value>,
) -> Result<Value, CloudInitError> {
    let mut out = Value::Object(Map::new());
    for name in template_names(level) {
        let t = templates
            .get(&name)
            .ok_or(CloudInitError::UnknownTemplate { name: name.clone() })?;
        // A template may itself name templates (expanded once; no recursion loops).
        let mut t = t.clone();
        if let Value::Object(m) = &mut t {
            m.remove(TEMPLATE);
        }
        deep_merge(&mut out, &normalize(&t));
    }
    let mut own = level.clone();
    if let Value::Object(m) = &mut own {
        m.remove(TEMPLATE);
    }
    deep_merge(&mut out, &normalize(&own));
    Ok(out)
}

/// The effective cloud-init of a machine: every level expanded and merged,
/// least specific first (e.g. `[domain, machine]`). `None` when no level has any.
pub fn effective(
    templates: &BTreeMap<String, Value>,
    levels: &[Option<&Value>],
) -> Result<Option<Value>, CloudInitError> {
    let mut out: Option<Value> = None;
    for level in levels.iter().flatten() {
        let e = expand_level(level, templates)?;
        match &mut out {
            Some(o) => deep_merge(o, &e),
            None => out = Some(e),
        }
    }
    Ok(out)
}

/// `user-data` given as `#cloud-config` text becomes a map so that it merges.
fn normalize(level: &Value) -> Value {
    let mut v = level.clone();
    if let Some(Value::String(s)) = v.get(USER_DATA) {
        if let Some(Ok(parsed)) = parse_cloud_config(s) {
            if let Value::Object(m) = &mut v {
                m.insert(USER_DATA.into(), parsed);
            }
        }
    }
    v
}

/// Parses `#cloud-config` text into a map. `None` when the text is not
/// cloud-config (a script, `#include`, MIME); `Some(Err(message))` when it
/// is but does not parse (or is not a map).
pub fn parse_cloud_config(text: &str) -> Option<Result<Value, String>> {
    let first = text.lines().next()?.trim_end();
    if first != "#cloud-config" {
        return None;
    }
    let file: Arc<str> = Arc::from("user-data");
    let (node, diags) = yaml::parse(&file, "", text);
    if let Some(d) = diags.iter().find(|d| d.is_error()) {
        let at = d
            .loc
            .as_ref()
            .map(|l| format!("line {} of the text: ", l.line));
        return Some(Err(format!("{}{}", at.unwrap_or_default(), d.message)));
    }
    match node.map(|n| node_to_json(&n)) {
        None | Some(Value::Null) => Some(Ok(Value::Object(Map::new()))),
        Some(v @ Value::Object(_)) => Some(Ok(v)),
        Some(_) => Some(Err("expected a map of cloud-config keys".into())),
    }
}

/// A spanned YAML node as JSON (the same typing rules as the loader).
pub fn node_to_json(node: &Node) -> Value {
    match &node.value {
        YValue::Map(m) => Value::Object(
            m.iter()
                .map(|e| (e.key.clone(), node_to_json(&e.value)))
                .collect(),
        ),
        YValue::Seq(s) => Value::Array(s.iter().map(node_to_json).collect()),
        YValue::Scalar(s) => match s.typed() {
            Typed::Null => Value::Null,
            Typed::Bool(b) => Value::Bool(b),
            Typed::Int(i) => i64::try_from(i)
                .map(Value::from)
                .unwrap_or_else(|_| Value::String(s.text.clone())),
            Typed::Float(f) => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(s.text.clone())),
            Typed::Str(t) => Value::String(t.to_string()),
        },
    }
}

/// JSON as yaml-rust2's document type (map keys keep their order).
pub fn json_to_yaml(v: &Value) -> Yaml {
    match v {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(a) => Yaml::Array(a.iter().map(json_to_yaml).collect()),
        Value::Object(m) => {
            let mut h = YHash::new();
            for (k, v) in m {
                h.insert(Yaml::String(k.clone()), json_to_yaml(v));
            }
            Yaml::Hash(h)
        }
    }
}

/// A YAML document as block-style text without the leading `---`, ending in
/// a newline (multi-line strings as literal blocks).
pub fn emit_yaml(doc: &Yaml) -> Result<String, String> {
    let mut out = String::new();
    {
        let mut e = YamlEmitter::new(&mut out);
        e.multiline_strings(true);
        e.dump(doc).map_err(|e| e.to_string())?;
    }
    let body = out.strip_prefix("---\n").unwrap_or(&out).to_string();
    let body = body.strip_prefix("---").unwrap_or(&body).trim_start();
    Ok(format!("{body}\n"))
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(_) => "a number".into(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a map".into(),
    }
}

fn emit_map(machine: &str, key: &'static str, v: &Value) -> Result<String, CloudInitError> {
    emit_yaml(&json_to_yaml(v)).map_err(|message| CloudInitError::Emit {
        machine: machine.into(),
        key,
        message,
    })
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The default network-config (version 2) for a machine's NIC: matched by
/// MAC (the guest may name it anything), static address, default route and
/// DNS through the domain gateway.
///
/// The default route is `gateway4`, not `routes: [{to: 0.0.0.0/0}]`: Debian's
/// cloud-init renders a route for ifupdown as `post-up route add ... || true`,
/// and `route` (net-tools) is not in a minimal image, so a Debian VM got no
/// default route at all; `gateway4` becomes ifupdown's own `gateway` line
/// (and networkd's `Gateway=`, netplan's deprecated-but-supported key).
pub fn default_network_config(nic: &SeedNic) -> Value {
    serde_json::json!({
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": { "macaddress": mac_string(&nic.mac) },
                "addresses": [format!("{}/{}", nic.address, nic.prefix_len)],
                "gateway4": nic.gateway.to_string(),
                "nameservers": {
                    "addresses": nic.nameservers.iter().map(|a| a.to_string()).collect::<Vec<_>>()
                }
            }
        }
    })
}

/// Renders the NoCloud seed of `machine` from its (already merged)
/// `cloud_init`, with `nic` for the default network-config. Works for a
/// machine without `cloud_init:` too (defaults only).
pub fn render(machine: &Machine, nic: Option<&SeedNic>) -> Result<NoCloudSeed, CloudInitError> {
    let name = machine.full_name.as_str();
    let empty = Value::Object(Map::new());
    let ci = machine.cloud_init.as_ref().unwrap_or(&empty);
    let ci = normalize(ci);
    let part = |key: &'static str| ci.get(key).filter(|v| !v.is_null());
    let bad = |key: &'static str, v: &Value| CloudInitError::BadValue {
        machine: name.into(),
        key,
        found: describe(v),
    };

    let user_data = match part(USER_DATA) {
        None => "#cloud-config\n{}\n".to_string(),
        Some(v @ Value::Object(_)) => format!("#cloud-config\n{}", emit_map(name, USER_DATA, v)?),
        // Scripts, #include, MIME: verbatim. Headerless text is cloud-config.
        Some(Value::String(s)) if s.starts_with('#') || s.starts_with("Content-Type") => {
            ensure_newline(s)
        }
        Some(Value::String(s)) => format!("#cloud-config\n{}", ensure_newline(s)),
        Some(v) => return Err(bad(USER_DATA, v)),
    };

    let network_config = match part(NETWORK_CONFIG) {
        Some(v @ Value::Object(_)) => Some(emit_map(name, NETWORK_CONFIG, v)?),
        Some(Value::String(s)) => Some(ensure_newline(s)),
        Some(v) => return Err(bad(NETWORK_CONFIG, v)),
        None => match nic {
            Some(n) => Some(emit_map(name, NETWORK_CONFIG, &default_network_config(n))?),
            None => None,
        },
    };

    // The user's meta-data over the defaults; the instance id covers
    // everything else so a change anywhere re-runs cloud-init.
    let user_meta = match part(META_DATA) {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(Value::String(s)) => match parse_plain_map(s) {
            Some(m) => m,
            None => return Err(bad(META_DATA, &Value::String(s.clone()))),
        },
        Some(v) => return Err(bad(META_DATA, v)),
    };
    let mut meta = Map::new();
    let mut h = Sha256::new();
    h.update(user_data.as_bytes());
    h.update([0]);
    h.update(network_config.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(&user_meta).unwrap_or_default());
    let hash = hex::encode(h.finalize());
    meta.insert(
        "instance-id".into(),
        Value::String(format!("moat-{name}-{}", &hash[..12])),
    );
    meta.insert("local-hostname".into(), Value::String(machine.name.clone()));
    for (k, v) in user_meta {
        meta.insert(k, v);
    }
    let meta_data = emit_map(name, META_DATA, &Value::Object(meta))?;
    Ok(NoCloudSeed {
        user_data,
        meta_data,
        network_config,
    })
}

/// Renders the seed of `full_name` in a resolved project (NIC looked up there).
/// `None` when the project has no such machine.
pub fn render_resolved(
    resolved: &Resolved,
    full_name: &str,
) -> Option<Result<NoCloudSeed, CloudInitError>> {
    let m = resolved.project.machine(full_name)?;
    let nic = SeedNic::from_resolved(resolved, full_name);
    Some(render(m, nic.as_ref()))
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// meta-data given as YAML text.
fn parse_plain_map(text: &str) -> Option<Map<String, Value>> {
    let file: Arc<str> = Arc::from("meta-data");
    let (node, diags) = yaml::parse(&file, "", text);
    if diags.iter().any(|d| d.is_error()) {
        return None;
    }
    match node.map(|n| node_to_json(&n)) {
        None | Some(Value::Null) => Some(Map::new()),
        Some(Value::Object(m)) => Some(m),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn machine(ci: Option<Value>) -> Machine {
        let mut m = Machine::adhoc("web", "debian/bookworm");
        m.full_name = "lab-web".into();
        m.domain = "lab".into();
        m.cloud_init = ci;
        m
    }

    fn nic() -> SeedNic {
        SeedNic {
            mac: [0x02, 0xab, 0, 0, 0, 7],
            address: "10.120.0.5".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.120.0.254".parse().unwrap(),
            nameservers: vec!["10.120.0.254".parse().unwrap()],
        }
    }

    #[test]
    fn deep_merge_maps_recursively_scalars_and_lists_replace() {
        let mut base = json!({"a": {"x": 1, "y": [1, 2]}, "b": "keep", "c": 3});
        deep_merge(
            &mut base,
            &json!({"a": {"y": [9], "z": true}, "c": null, "d": {"n": null, "m": 1}}),
        );
        assert_eq!(
            base,
            json!({"a": {"x": 1, "y": [9], "z": true}, "b": "keep", "d": {"m": 1}})
        );
    }

    #[test]
    fn templates_then_domain_then_machine() {
        let mut t = BTreeMap::new();
        t.insert(
            "base".to_string(),
            json!({"user-data": "#cloud-config\npackages: [vim]\nusers:\n  - name: ops\ntimezone: UTC\n"}),
        );
        t.insert(
            "tz".to_string(),
            json!({"user-data": {"timezone": "Europe/Paris"}}),
        );
        let domain = json!({"template": "base", "meta-data": {"zone": "lab"}});
        let machine = json!({"template": ["tz"], "user-data": {"packages": ["htop"]}});
        let e = effective(&t, &[Some(&domain), Some(&machine)])
            .unwrap()
            .unwrap();
        assert_eq!(
            e,
            json!({
                "user-data": {"packages": ["htop"], "users": [{"name": "ops"}], "timezone": "Europe/Paris"},
                "meta-data": {"zone": "lab"}
            })
        );
        assert_eq!(effective(&t, &[None, None]).unwrap(), None);
        let err = effective(&t, &[Some(&json!({"template": "nope"}))]).unwrap_err();
        assert_eq!(
            err,
            CloudInitError::UnknownTemplate {
                name: "nope".into()
            }
        );
    }

    #[test]
    fn opaque_user_data_replaces() {
        let t = BTreeMap::new();
        let domain = json!({"user-data": {"packages": ["vim"]}});
        let machine = json!({"user-data": "#!/bin/sh\necho hi\n"});
        let e = effective(&t, &[Some(&domain), Some(&machine)])
            .unwrap()
            .unwrap();
        assert_eq!(e, json!({"user-data": "#!/bin/sh\necho hi\n"}));
    }

    #[test]
    fn renders_a_complete_seed() {
        let m = machine(Some(json!({
            "user-data": {
                "users": [{"name": "alice", "shell": "/bin/bash"}],
                "write_files": [{"path": "/etc/motd", "content": "hello\nworld\n"}]
            }
        })));
        let s = render(&m, Some(&nic())).unwrap();
        assert!(
            s.user_data.starts_with("#cloud-config\n"),
            "{}",
            s.user_data
        );
        assert!(s.user_data.contains("name: alice"), "{}", s.user_data);
        assert!(s.user_data.contains("content: |\n"), "{}", s.user_data);
        let id = s.instance_id().unwrap().to_string();
        assert!(id.starts_with("moat-lab-web-"), "{id}");
        assert!(
            s.meta_data.contains("local-hostname: web"),
            "{}",
            s.meta_data
        );
        let net = s.network_config.clone().unwrap();
        assert!(net.contains("version: 2"), "{net}");
        assert!(
            net.contains("macaddress: \"02:ab:00:00:00:07\"")
                || net.contains("macaddress: 02:ab:00:00:00:07"),
            "{net}"
        );
        assert!(net.contains("10.120.0.5/24"), "{net}");
        assert!(net.contains("gateway4: 10.120.0.254"), "{net}");
        assert!(!net.contains("routes"), "{net}");
        // The rendered text parses back to what was meant.
        let back = parse_cloud_config(&s.user_data).unwrap().unwrap();
        assert_eq!(back["write_files"][0]["content"], json!("hello\nworld\n"));
        let files: Vec<&str> = s.files().iter().map(|f| f.0).collect();
        assert_eq!(files, ["user-data", "meta-data", "network-config"]);
    }

    #[test]
    fn instance_id_is_stable_and_follows_content() {
        let m = machine(Some(json!({"user-data": {"runcmd": [["true"]]}})));
        let a = render(&m, Some(&nic())).unwrap();
        let b = render(&m, Some(&nic())).unwrap();
        assert_eq!(a, b);
        let mut n2 = nic();
        n2.address = "10.120.0.6".parse().unwrap();
        let c = render(&m, Some(&n2)).unwrap();
        assert_ne!(a.instance_id(), c.instance_id());
        let m2 = machine(Some(json!({"user-data": {"runcmd": [["false"]]}})));
        let d = render(&m2, Some(&nic())).unwrap();
        assert_ne!(a.instance_id(), d.instance_id());
        // A user-given instance id wins.
        let m3 = machine(Some(json!({"meta-data": {"instance-id": "mine"}})));
        assert_eq!(render(&m3, None).unwrap().instance_id(), Some("mine"));
    }

    #[test]
    fn given_network_config_and_no_nic() {
        let m = machine(Some(json!({
            "network-config": {"version": 2, "ethernets": {"eth0": {"dhcp4": true}}}
        })));
        let s = render(&m, Some(&nic())).unwrap();
        assert!(s.network_config.unwrap().contains("dhcp4: true"));
        let s = render(&machine(None), None).unwrap();
        assert_eq!(s.user_data, "#cloud-config\n{}\n");
        assert_eq!(s.network_config, None);
        assert_eq!(s.files().len(), 2);
    }

    #[test]
    fn text_parts_and_bad_values() {
        let m = machine(Some(json!({
            "user-data": "#!/bin/sh\ntouch /x",
            "meta-data": "purpose: dev\n"
        })));
        let s = render(&m, None).unwrap();
        assert_eq!(s.user_data, "#!/bin/sh\ntouch /x\n");
        assert!(s.meta_data.contains("purpose: dev"));
        let m = machine(Some(json!({"user-data": 3})));
        assert!(matches!(
            render(&m, None),
            Err(CloudInitError::BadValue {
                key: "user-data",
                ..
            })
        ));
        assert_eq!(parse_cloud_config("#!/bin/sh\n"), None);
        assert!(matches!(
            parse_cloud_config("#cloud-config\n- a\n"),
            Some(Err(_))
        ));
        assert_eq!(parse_cloud_config("#cloud-config\n"), Some(Ok(json!({}))));
    }

    #[test]
    fn the_loader_merges_templates_domain_and_machine() {
        let text = "schema_version: 1
cloud_init_templates:
  base:
    user-data: |
      #cloud-config
      users: [{name: ops}]
      timezone: UTC
    meta-data: {owner: t}
domains:
  lab:
    cloud_init:
      template: base
      meta-data: {owner: d}
    machines:
      a:
        cloud_init:
          user-data: {timezone: Europe/Paris}
      b: {}
  other:
    machines:
      c: {}
";
        let l = crate::load::load_str("moat.yml", text).unwrap();
        let p = &l.project;
        let a = p.machine("lab-a").unwrap().cloud_init.clone().unwrap();
        assert_eq!(
            a,
            json!({"user-data": {"users": [{"name": "ops"}], "timezone": "Europe/Paris"}, "meta-data": {"owner": "d"}})
        );
        let b = p.machine("lab-b").unwrap().cloud_init.clone().unwrap();
        assert_eq!(b["user-data"]["timezone"], "UTC");
        assert_eq!(p.machine("other-c").unwrap().cloud_init, None);
        assert!(
            !l.warnings.to_string().contains("cloud_init"),
            "{}",
            l.warnings
        );
    }

    #[test]
    fn strings_that_look_like_other_types_stay_strings() {
        let m = machine(Some(
            json!({"user-data": {"a": "yes", "b": "1", "c": "", "d": "x: y"}}),
        ));
        let s = render(&m, None).unwrap();
        let back = parse_cloud_config(&s.user_data).unwrap().unwrap();
        assert_eq!(back, json!({"a": "yes", "b": "1", "c": "", "d": "x: y"}));
    }
}
