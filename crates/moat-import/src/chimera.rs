//! Chimera Spawn configuration folders → moat projects.
//!
//! A Chimera Spawn folder holds `config.yaml` (or `chimera.yaml`), `images/`,
//! `profiles/`, `cloud-init/` and `nodes/` (each `*.yaml` a map of names to
//! definitions; `nodes/*.yaml` hold `containers:`). The mapping, in short
//! (docs/import.md has all of it):
//!
//! - each node file becomes a domain (name from the file, at most 9 chars);
//!   its trust level is `admin` when one of its containers keeps host
//!   networking (moat allows `network: host` only there), else `trusted`;
//! - every machine uses `driver: nspawn` (`defaults.driver.container`);
//! - a profile's `.nspawn` settings decide the network (`Private=no`/no veth:
//!   `host`; `Private=yes` without veth: `none`; `Zone=`/`Bridge=`/veth: the
//!   domain bridge), `privileged` (`PrivateUsers=no`, `Capability=all`),
//!   `mounts` (`Bind=`, `BindReadOnly=`); its systemd override gives `cpus`
//!   (`CPUQuota`), `memory` (`MemoryMax`) and `pids` (`TasksMax`);
//! - `ensure: absent` containers are left out, `state: stopped` ones are kept
//!   with a note (moat starts every declared machine);
//! - images become `images:` (a Debian/Ubuntu release is rebuilt with
//!   mmdebstrap, a local tarball is used as is), cloud-init templates become
//!   `cloud_init_templates:`, a container's `cloud_init:` keeps its template
//!   and overrides (`meta_data` → `meta-data`, ...).
//!
//! Whatever has no moat equivalent becomes a [`Note`] with its file and line.
//! Pure: [`convert`] works on [`SourceFiles`]; only [`read_dir`] touches disk.

use crate::{ImportError, Imported, Note, SourceFiles};
use moat_core::cloudinit::{emit_yaml, json_to_yaml, node_to_json, parse_cloud_config};
use moat_core::naming::MAX_DOMAIN_LEN;
use moat_core::yaml::{self, Node};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use yaml_rust2::yaml::Hash as YHash;
use yaml_rust2::Yaml;

/// The sub-folders of a Chimera Spawn configuration folder.
pub const SUBDIRS: &[&str] = &["images", "profiles", "cloud-init", "nodes"];

/// Reads the YAML files of a Chimera Spawn folder (the only I/O here).
pub fn read_dir(dir: &Path) -> Result<SourceFiles, ImportError> {
    let files = SourceFiles::read(dir, SUBDIRS)?;
    if !files.files.iter().any(|(p, _)| p.starts_with("nodes/")) {
        return Err(ImportError::NotASource {
            path: dir.to_path_buf(),
            format: "Chimera Spawn",
            why: "no nodes/*.yaml file (the containers are declared there)".into(),
        });
    }
    Ok(files)
}

/// Network mode a profile asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    Host,
    None,
    Domain,
}

/// What a Chimera profile turns into on a moat machine.
#[derive(Clone, Debug, PartialEq)]
struct ProfileSettings {
    net: Net,
    privileged: bool,
    cpus: Option<u64>,
    memory: Option<String>,
    pids: Option<u64>,
    /// (source, target, readonly)
    mounts: Vec<(String, String, bool)>,
}

impl ProfileSettings {
    fn host(privileged: bool) -> Self {
        ProfileSettings {
            net: Net::Host,
            privileged,
            cpus: None,
            memory: None,
            pids: None,
            mounts: vec![],
        }
    }
}

/// Chimera's catalog profiles, for nodes that name one the folder does not define.
fn builtin_profile(name: &str) -> Option<ProfileSettings> {
    Some(match name {
        "standard" | "isolated" | "non_isolated" => ProfileSettings::host(false),
        "compat" | "privileged" => ProfileSettings::host(true),
        "offline" => ProfileSettings {
            net: Net::None,
            ..ProfileSettings::host(false)
        },
        "private" => ProfileSettings {
            net: Net::Domain,
            ..ProfileSettings::host(false)
        },
        _ => return None,
    })
}

/// A lowercase DNS label of at most `max` characters made from `s`.
fn label(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert(0, 'x');
    }
    out.truncate(max);
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// Collects notes while converting.
struct Cx {
    notes: Vec<Note>,
}

impl Cx {
    fn note(&mut self, file: &str, line: u32, message: impl Into<String>) {
        self.notes.push(Note {
            file: file.into(),
            line,
            message: message.into(),
        });
    }
}

/// A parsed file whose root is a map, or `None` after a note.
fn parse_map(cx: &mut Cx, file: &str, text: &str) -> Option<Node> {
    let f: Arc<str> = Arc::from(file);
    let (node, diags) = yaml::parse(&f, "", text);
    if let Some(d) = diags.iter().find(|d| d.is_error()) {
        let line = d.loc.as_ref().map_or(1, |l| l.line);
        cx.note(file, line, format!("skipped: {}", d.message));
        return None;
    }
    let node = node?;
    if node.as_map().is_none() {
        cx.note(
            file,
            node.loc.line,
            "skipped: expected a map of names to definitions",
        );
        return None;
    }
    Some(node)
}

fn scalar(n: &Node) -> Option<String> {
    n.as_scalar().map(|s| s.text.clone())
}

/// The values of the proxy settings in config.yaml (for templates).
type Proxy = BTreeMap<String, String>;

/// Renders the small Jinja subset Chimera's templates use: `{{ proxy.KEY }}`
/// and `{% if proxy[.KEY] [and|or ...] %} ... {% else %} ... {% endif %}`.
/// Lines holding only a block tag vanish. `Err` names the first construct
/// outside that subset.
fn render_jinja(text: &str, proxy: &Proxy) -> Result<String, String> {
    fn atom(a: &str, proxy: &Proxy) -> Result<bool, String> {
        match a.strip_prefix("proxy") {
            Some("") => Ok(!proxy.is_empty()),
            Some(k) if k.starts_with('.') => Ok(proxy.get(&k[1..]).is_some_and(|v| !v.is_empty())),
            _ => Err(format!("condition '{a}'")),
        }
    }
    fn cond(c: &str, proxy: &Proxy) -> Result<bool, String> {
        let mut any = false;
        for alt in c.split(" or ") {
            let mut all = true;
            for a in alt.split(" and ") {
                let a = a.trim();
                let v = match a.strip_prefix("not ") {
                    Some(rest) => !atom(rest.trim(), proxy)?,
                    None => atom(a, proxy)?,
                };
                all &= v;
            }
            any |= all;
        }
        Ok(any)
    }
    if !text.contains("{%") && !text.contains("{{") {
        return Ok(text.to_string());
    }
    // Stack of (this branch active, some branch already taken).
    let mut stack: Vec<(bool, bool)> = vec![];
    let active = |s: &Vec<(bool, bool)>| s.iter().all(|f| f.0);
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if let Some(tag) = t.strip_prefix("{%").and_then(|r| r.strip_suffix("%}")) {
            let tag = tag.trim().trim_matches('-').trim();
            if let Some(c) = tag.strip_prefix("if ") {
                let v = cond(c, proxy)?;
                stack.push((v, v));
            } else if let Some(c) = tag.strip_prefix("elif ") {
                let v = cond(c, proxy)?;
                let top = stack.last_mut().ok_or("'elif' without 'if'")?;
                *top = (!top.1 && v, top.1 || v);
            } else if tag == "else" {
                let top = stack.last_mut().ok_or("'else' without 'if'")?;
                *top = (!top.1, true);
            } else if tag == "endif" {
                stack.pop().ok_or("'endif' without 'if'")?;
            } else {
                return Err(format!("tag '{{% {tag} %}}'"));
            }
            continue;
        }
        if t.contains("{%") {
            return Err("a block tag inside a line".into());
        }
        if !active(&stack) {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("{{") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let j = after.find("}}").ok_or("an unclosed '{{'")?;
            let expr = after[..j].trim();
            match expr.strip_prefix("proxy.") {
                Some(k) => out.push_str(proxy.get(k).map_or("", String::as_str)),
                None => return Err(format!("expression '{{{{ {expr} }}}}'")),
            }
            rest = &after[j + 2..];
        }
        out.push_str(rest);
    }
    if !stack.is_empty() {
        return Err("an 'if' without 'endif'".into());
    }
    Ok(out)
}

/// `Key=Value` lines of an INI text by section, with their line offsets.
fn ini(text: &str) -> Vec<(String, String, String, u32)> {
    let mut section = String::new();
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(s) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = s.trim().to_string();
            continue;
        }
        if let Some((k, v)) = t.split_once('=') {
            out.push((
                section.clone(),
                k.trim().to_string(),
                v.trim().to_string(),
                i as u32,
            ));
        }
    }
    out
}

fn yes(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "yes" | "true" | "1" | "on")
}

/// A systemd size (`4096M`, `2G`, bytes) as a moat size; `None` for
/// `infinity`, percentages and what does not parse.
fn systemd_size(v: &str) -> Option<String> {
    let v = v.trim();
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, ""),
    };
    let n: u64 = num.parse().ok()?;
    let unit = match unit {
        "" => return Some(n.to_string()),
        "K" => "KiB",
        "M" => "MiB",
        "G" => "GiB",
        "T" => "TiB",
        _ => return None,
    };
    Some(format!("{n}{unit}"))
}

/// Converts one profile definition.
fn profile(cx: &mut Cx, file: &str, name: &str, def: &Node) -> ProfileSettings {
    let mut p = ProfileSettings {
        net: Net::Host,
        ..ProfileSettings::host(false)
    };
    let Some(entries) = def.as_map() else {
        cx.note(
            file,
            def.loc.line,
            format!("profile '{name}': expected a map; treated as the standard profile"),
        );
        return p;
    };
    let mut private = false;
    let mut veth = false;
    let mut zone = false;
    for e in entries {
        // A block scalar's position is its first content line.
        let base = e.value.loc.line;
        match e.key.as_str() {
            "description" => {}
            "nspawn_config_content" => {
                let text = scalar(&e.value).unwrap_or_default();
                for (sec, k, v, off) in ini(&text) {
                    let line = base + off;
                    match (sec.as_str(), k.as_str()) {
                        ("Exec", "Boot") if yes(&v) => {}
                        ("Exec", "Boot") => cx.note(file, line, format!("profile '{name}': Boot={v}: moat boots the image's init when it has one; give the machine a `command:` for an application container")),
                        ("Exec", "NotifyReady") => {}
                        ("Exec", "PrivateUsers") if !yes(&v) && v != "pick" && v != "identity" => {
                            p.privileged = true;
                            cx.note(file, line, format!("profile '{name}': PrivateUsers={v}: mapped to `privileged: true` (no user namespace)"));
                        }
                        ("Exec", "PrivateUsers") => {}
                        ("Exec", "Capability") if v == "all" => {
                            p.privileged = true;
                        }
                        ("Network", "Private") => private = yes(&v),
                        ("Network", "VirtualEthernet") => veth = yes(&v),
                        ("Network", "Zone") | ("Network", "Bridge") => zone = true,
                        ("Files", "Bind") | ("Files", "BindReadOnly") => {
                            let mut parts = v.splitn(3, ':');
                            let src = parts.next().unwrap_or_default().to_string();
                            let dst = parts.next().map_or(src.clone(), str::to_string);
                            if parts.next().is_some() {
                                cx.note(file, line, format!("profile '{name}': {k}={v}: mount options are dropped"));
                            }
                            p.mounts.push((src, dst, k == "BindReadOnly"));
                        }
                        _ => cx.note(file, line, format!("profile '{name}': [{sec}] {k}={v} is not carried over")),
                    }
                }
            }
            "systemd_override_content" => {
                let text = scalar(&e.value).unwrap_or_default();
                for (sec, k, v, off) in ini(&text) {
                    let line = base + off;
                    match (sec.as_str(), k.as_str()) {
                        ("Service", "CPUQuota") => {
                            match v.strip_suffix('%').and_then(|n| n.trim().parse::<u64>().ok()) {
                                Some(pct) if pct > 0 => {
                                    let cpus = pct.div_ceil(100);
                                    if pct % 100 != 0 {
                                        cx.note(file, line, format!("profile '{name}': CPUQuota={v} rounded up to cpus: {cpus}"));
                                    }
                                    p.cpus = Some(cpus);
                                }
                                _ => cx.note(file, line, format!("profile '{name}': CPUQuota={v} is not carried over")),
                            }
                        }
                        ("Service", "MemoryMax") => match systemd_size(&v) {
                            Some(m) => p.memory = Some(m),
                            None => cx.note(file, line, format!("profile '{name}': MemoryMax={v} is not carried over (moat takes a size)")),
                        },
                        ("Service", "TasksMax") => match v.parse::<u64>() {
                            Ok(n) => p.pids = Some(n),
                            Err(_) => cx.note(file, line, format!("profile '{name}': TasksMax={v} is not carried over (moat takes a number)")),
                        },
                        _ => cx.note(file, line, format!("profile '{name}': systemd [{sec}] {k}={v} is not carried over")),
                    }
                }
            }
            other => cx.note(
                file,
                e.key_loc.line,
                format!("profile '{name}': '{other}' is not carried over"),
            ),
        }
    }
    p.net = if zone || veth {
        Net::Domain
    } else if private {
        Net::None
    } else {
        Net::Host
    };
    p
}

/// A Debian/Ubuntu release named in an image name or URL.
fn distro_release(s: &str) -> Option<(&'static str, &'static str)> {
    let s = s.to_ascii_lowercase();
    const RELEASES: &[(&str, &[&str], &str)] = &[
        ("debian", &["debian-11", "bullseye"], "bullseye"),
        ("debian", &["debian-12", "bookworm"], "bookworm"),
        ("debian", &["debian-13", "trixie"], "trixie"),
        ("ubuntu", &["ubuntu-20.04", "focal"], "focal"),
        ("ubuntu", &["ubuntu-22.04", "jammy"], "jammy"),
        ("ubuntu", &["ubuntu-24.04", "noble"], "noble"),
    ];
    RELEASES
        .iter()
        .find(|(_, keys, _)| keys.iter().any(|k| s.contains(k)))
        .map(|(d, _, suite)| (*d, *suite))
}

/// Converts one image definition to a moat `images:` entry.
fn image(
    cx: &mut Cx,
    file: &str,
    (name, line): (&str, u32),
    def: &Node,
    cloud_init: bool,
) -> Option<Value> {
    let mut kind = String::from("tar");
    let mut source = String::new();
    if let Some(entries) = def.as_map() {
        for e in entries {
            let v = scalar(&e.value).unwrap_or_default();
            match e.key.as_str() {
                "type" => kind = v,
                "source" => source = v,
                "verify" => {}
                "custom_files" if e.value.as_seq().is_some_and(|s| s.is_empty()) => {}
                "nspawn_parameters" if e.value.as_seq().is_some_and(|s| s.is_empty()) => {}
                "custom_files" => cx.note(file, e.key_loc.line, format!("image '{name}': custom_files are not applied; change the image or use cloud-init write_files")),
                "nspawn_parameters" => cx.note(file, e.key_loc.line, format!("image '{name}': nspawn_parameters (kernel-style arguments to the guest's systemd) are not passed")),
                other => cx.note(file, e.key_loc.line, format!("image '{name}': '{other}' is not carried over")),
            }
        }
    }
    let local = source
        .strip_prefix("file://")
        .or_else(|| source.starts_with('/').then_some(source.as_str()));
    if let (Some(path), "tar") = (local, kind.as_str()) {
        return Some(serde_json::json!({"source": "tarball", "path": path}));
    }
    if let Some((distro, suite)) = distro_release(name).or_else(|| distro_release(&source)) {
        cx.note(file, line, format!(
            "image '{name}': {} is not fetched; moat builds {distro}/{suite} with mmdebstrap instead (same release, not the same cloud image){}",
            if source.is_empty() { "the download".to_string() } else { source.clone() },
            if cloud_init { ", with cloud-init added" } else { "" }
        ));
        let mut m = serde_json::json!({"source": distro, "suite": suite});
        if cloud_init {
            m["packages"] = serde_json::json!(["cloud-init"]);
        }
        return Some(m);
    }
    cx.note(file, line, format!(
        "image '{name}': a {kind} image from '{source}' has no moat equivalent; download it and declare it as `source: tarball` (machines using it are left out)"
    ));
    None
}

/// A cloud-init part (`user_data` text, `meta_data` map...) as moat writes it.
fn ci_part(cx: &mut Cx, file: &str, what: &str, n: &Node, proxy: &Proxy) -> Value {
    match n.as_scalar() {
        Some(s) => {
            let text = match render_jinja(&s.text, proxy) {
                Ok(t) => t,
                Err(e) => {
                    cx.note(file, n.loc.line, format!("{what}: Jinja {e} is not supported; the text is kept as is: fix it by hand"));
                    return Value::String(s.text.clone());
                }
            };
            if text != s.text {
                cx.note(
                    file,
                    n.loc.line,
                    format!(
                        "{what}: Jinja rendered with config.yaml's proxy settings at import time"
                    ),
                );
            }
            match parse_cloud_config(&text) {
                Some(Ok(v)) => v,
                Some(Err(e)) => {
                    cx.note(
                        file,
                        n.loc.line,
                        format!("{what}: kept as text (does not parse as YAML: {e})"),
                    );
                    Value::String(text)
                }
                None => Value::String(text),
            }
        }
        None => node_to_json(n),
    }
}

/// `cloud_init:` of a template or container, keys renamed to moat's.
fn cloud_init(
    cx: &mut Cx,
    file: &str,
    owner: &str,
    n: &Node,
    proxy: &Proxy,
    templates: &BTreeSet<String>,
) -> Value {
    let mut out = Map::new();
    let Some(entries) = n.as_map() else {
        cx.note(
            file,
            n.loc.line,
            format!("{owner}: cloud_init is not a map; left out"),
        );
        return Value::Object(out);
    };
    for e in entries {
        let key = match e.key.as_str() {
            "user_data" | "user-data" => "user-data",
            "meta_data" | "meta-data" => "meta-data",
            "network_config" | "network-config" => "network-config",
            "template" => {
                match scalar(&e.value) {
                    Some(t) if templates.contains(&t) => {
                        out.insert("template".into(), Value::String(t));
                    }
                    Some(t) => cx.note(file, e.value.loc.line, format!("{owner}: cloud-init template '{t}' is not defined in cloud-init/; left out")),
                    None => cx.note(file, e.value.loc.line, format!("{owner}: template must be a name; left out")),
                }
                continue;
            }
            other => {
                cx.note(file, e.key_loc.line, format!("{owner}: cloud_init '{other}' is not carried over (moat writes user-data, meta-data and network-config)"));
                continue;
            }
        };
        if e.value.is_null() {
            continue;
        }
        let v = ci_part(cx, file, &format!("{owner}: {}", e.key), &e.value, proxy);
        out.insert(key.into(), v);
    }
    Value::Object(out)
}

fn y(s: &str) -> Yaml {
    Yaml::String(s.to_string())
}

fn hash(entries: Vec<(&str, Yaml)>) -> Yaml {
    let mut h = YHash::new();
    for (k, v) in entries {
        h.insert(y(k), v);
    }
    Yaml::Hash(h)
}

/// A converted container.
struct MachineOut {
    name: String,
    yaml: Yaml,
    host_net: bool,
}

/// Converts a Chimera Spawn folder's files into a moat project named `project`.
pub fn convert(project: &str, src: &SourceFiles) -> Result<Imported, ImportError> {
    let mut cx = Cx { notes: vec![] };
    let project = label(project, 63);
    let mut proxy = Proxy::new();
    let mut images_def: Vec<(String, String, u32, Node)> = vec![];
    let mut profiles: BTreeMap<String, ProfileSettings> = BTreeMap::new();
    let mut ci_defs: Vec<(String, String, Node)> = vec![];
    let mut nodes: Vec<(String, Node)> = vec![];

    for (file, text) in &src.files {
        let Some(root) = parse_map(&mut cx, file, text) else {
            continue;
        };
        let entries = root.as_map().unwrap_or_default();
        match file.split_once('/').map(|(d, _)| d) {
            None if file == "config.yaml" || file == "chimera.yaml" => {
                for e in entries {
                    if e.key == "proxy" {
                        for p in e.value.as_map().unwrap_or_default() {
                            if let Some(v) = scalar(&p.value) {
                                proxy.insert(p.key.clone(), v);
                            }
                        }
                        cx.note(file, e.key_loc.line, "proxy: used to render cloud-init templates; moat has no proxy setting for machines");
                    } else {
                        cx.note(
                            file,
                            e.key_loc.line,
                            format!("'{}': Chimera server setting, not carried over", e.key),
                        );
                    }
                }
            }
            None => cx.note(file, 1, "not a Chimera Spawn file; ignored"),
            Some("images") => {
                for e in entries {
                    images_def.push((file.clone(), e.key.clone(), e.key_loc.line, e.value.clone()));
                }
            }
            Some("profiles") => {
                for e in entries {
                    let p = profile(&mut cx, file, &e.key, &e.value);
                    profiles.insert(e.key.clone(), p);
                }
            }
            Some("cloud-init") => {
                for e in entries {
                    ci_defs.push((file.clone(), e.key.clone(), e.value.clone()));
                }
            }
            Some(_) => nodes.push((file.clone(), root.clone())),
        }
    }

    let template_names: BTreeSet<String> = ci_defs.iter().map(|(_, n, _)| n.clone()).collect();
    let mut templates = YHash::new();
    for (file, name, def) in &ci_defs {
        let v = cloud_init(
            &mut cx,
            file,
            &format!("template '{name}'"),
            def,
            &proxy,
            &template_names,
        );
        let moat_name = label(name, 63);
        if &moat_name != name {
            cx.note(
                file,
                def.loc.line,
                format!("template '{name}' renamed '{moat_name}' (moat names are DNS labels)"),
            );
        }
        templates.insert(y(&moat_name), json_to_yaml(&v));
    }

    // Which images feed machines with cloud-init (they need the package).
    struct Decl {
        file: String,
        line: u32,
        name: String,
        image: Option<String>,
        profile: String,
        state: Option<(String, u32)>,
        cloud_init: Option<Node>,
    }
    let mut decls: Vec<Decl> = vec![];
    for (file, root) in &nodes {
        let entries = root.as_map().unwrap_or_default();
        let mut found = false;
        for e in entries {
            if e.key != "containers" {
                cx.note(
                    file,
                    e.key_loc.line,
                    format!("'{}' is not carried over (only containers are)", e.key),
                );
                continue;
            }
            found = true;
            for c in e.value.as_map().unwrap_or_default() {
                let mut d = Decl {
                    file: file.clone(),
                    line: c.key_loc.line,
                    name: c.key.clone(),
                    image: None,
                    profile: "standard".into(),
                    state: None,
                    cloud_init: None,
                };
                let mut absent = false;
                for f in c.value.as_map().unwrap_or_default() {
                    let v = scalar(&f.value);
                    match f.key.as_str() {
                        "ensure" => match v.as_deref() {
                            Some("present") => {}
                            Some("absent") => absent = true,
                            other => cx.note(
                                file,
                                f.value.loc.line,
                                format!(
                                    "container '{}': ensure: {} is unknown; treated as present",
                                    c.key,
                                    other.unwrap_or("?")
                                ),
                            ),
                        },
                        "state" => d.state = v.map(|s| (s, f.value.loc.line)),
                        "image" => d.image = v,
                        "profile" => d.profile = v.unwrap_or_else(|| "standard".into()),
                        "cloud_init" => d.cloud_init = Some(f.value.clone()),
                        other => cx.note(
                            file,
                            f.key_loc.line,
                            format!("container '{}': '{other}' is not carried over", c.key),
                        ),
                    }
                }
                if absent {
                    cx.note(file, c.key_loc.line, format!("container '{}': ensure: absent, left out (moat removes undeclared machines with `apply --prune`)", c.key));
                    continue;
                }
                decls.push(d);
            }
        }
        if !found {
            cx.note(
                file,
                1,
                "no 'containers:' map; nothing imported from this file",
            );
        }
    }
    let with_ci: BTreeSet<String> = decls
        .iter()
        .filter(|d| d.cloud_init.is_some())
        .filter_map(|d| d.image.clone())
        .collect();

    let mut images = YHash::new();
    let mut image_names: BTreeMap<String, String> = BTreeMap::new();
    for (file, name, line, def) in &images_def {
        if let Some(v) = image(&mut cx, file, (name, *line), def, with_ci.contains(name)) {
            let moat_name = label(name, 63);
            if &moat_name != name {
                cx.note(
                    file,
                    *line,
                    format!("image '{name}' renamed '{moat_name}' (moat names are DNS labels)"),
                );
            }
            images.insert(y(&moat_name), json_to_yaml(&v));
            image_names.insert(name.clone(), moat_name);
        }
    }

    // Domains: one per node file.
    let mut domains = YHash::new();
    let mut used_domains = BTreeSet::new();
    let mut machines_out = vec![];
    let mut by_file: BTreeMap<String, Vec<&Decl>> = BTreeMap::new();
    for d in &decls {
        by_file.entry(d.file.clone()).or_default().push(d);
    }
    for (file, _) in &nodes {
        let stem = file
            .trim_start_matches("nodes/")
            .trim_end_matches(".yaml")
            .trim_end_matches(".yml");
        let mut dname = label(stem, MAX_DOMAIN_LEN);
        let base = dname.clone();
        let mut i = 2;
        while !used_domains.insert(dname.clone()) {
            let suffix = i.to_string();
            let mut b = base.clone();
            b.truncate(MAX_DOMAIN_LEN - suffix.len());
            dname = format!("{}{suffix}", b.trim_end_matches('-'));
            i += 1;
        }
        if dname != stem {
            cx.note(file, 1, format!("node '{stem}' becomes domain '{dname}' (domain names are DNS labels of at most {MAX_DOMAIN_LEN} characters)"));
        }
        let mut ms: Vec<MachineOut> = vec![];
        for d in by_file.get(file).map(Vec::as_slice).unwrap_or_default() {
            let mname = label(&d.name, 63 - dname.len() - 1);
            if mname != d.name {
                cx.note(
                    file,
                    d.line,
                    format!("container '{}' becomes machine '{mname}'", d.name),
                );
            }
            let mut fields: Vec<(&str, Yaml)> = vec![];
            match d.image.as_ref().map(|i| (i, image_names.get(i))) {
                Some((_, Some(moat_img))) => fields.push(("image", y(moat_img))),
                Some((img, None)) => {
                    if let Some((distro, suite)) = distro_release(img) {
                        fields.push(("image", y(&format!("{distro}/{suite}"))));
                        cx.note(file, d.line, format!("container '{}': image '{img}' is not defined in images/; using {distro}/{suite}", d.name));
                    } else {
                        cx.note(file, d.line, format!("container '{}': image '{img}' cannot be carried over; container left out", d.name));
                        continue;
                    }
                }
                None => cx.note(
                    file,
                    d.line,
                    format!(
                        "container '{}': no image; moat's default image is used",
                        d.name
                    ),
                ),
            }
            let p = match profiles
                .get(&d.profile)
                .cloned()
                .or_else(|| builtin_profile(&d.profile))
            {
                Some(p) => p,
                None => {
                    cx.note(file, d.line, format!("container '{}': profile '{}' is not defined; the standard profile (host network) is used", d.name, d.profile));
                    ProfileSettings::host(false)
                }
            };
            match p.net {
                Net::Host => fields.push(("network", y("host"))),
                Net::None => fields.push(("network", y("none"))),
                Net::Domain => {}
            }
            if p.privileged {
                fields.push(("privileged", Yaml::Boolean(true)));
            }
            if let Some(c) = p.cpus {
                fields.push(("cpus", Yaml::Integer(c as i64)));
            }
            if let Some(m) = &p.memory {
                fields.push(("memory", y(m)));
            }
            if let Some(n) = p.pids {
                fields.push(("pids", Yaml::Integer(n as i64)));
            }
            if !p.mounts.is_empty() {
                let list = p
                    .mounts
                    .iter()
                    .map(|(s, t, ro)| {
                        let mut m = vec![("source", y(s)), ("target", y(t))];
                        if *ro {
                            m.push(("readonly", Yaml::Boolean(true)));
                        }
                        hash(m)
                    })
                    .collect();
                fields.push(("mounts", Yaml::Array(list)));
            }
            if let Some(n) = &d.cloud_init {
                let v = cloud_init(
                    &mut cx,
                    file,
                    &format!("container '{}'", d.name),
                    n,
                    &proxy,
                    &template_names,
                );
                let mut v = v;
                if let Some(Value::String(t)) = v.get("template").cloned() {
                    v["template"] = Value::String(label(&t, 63));
                }
                fields.push(("cloud_init", json_to_yaml(&v)));
            }
            match &d.state {
                None => {}
                Some((s, _)) if s == "running" => {}
                Some((s, line)) if s == "stopped" => cx.note(file, *line, format!(
                    "container '{}': state: stopped; moat starts every declared machine: run `moat stop {dname}-{mname}` after apply", d.name
                )),
                Some((s, line)) => cx.note(file, *line, format!("container '{}': state: {s} is unknown; the machine will run", d.name)),
            }
            ms.push(MachineOut {
                name: mname,
                yaml: hash(fields),
                host_net: p.net == Net::Host,
            });
        }
        let host = ms.iter().any(|m| m.host_net);
        let mut mh = YHash::new();
        for m in ms {
            machines_out.push(format!("{dname}-{}", m.name));
            mh.insert(y(&m.name), m.yaml);
        }
        let dom = hash(vec![
            ("description", y(&format!("Chimera Spawn {file}"))),
            ("trust_level", y(if host { "admin" } else { "trusted" })),
            ("machines", Yaml::Hash(mh)),
        ]);
        domains.insert(y(&dname), dom);
    }

    let mut top: Vec<(&str, Yaml)> = vec![
        ("schema_version", Yaml::Integer(1)),
        ("project", y(&project)),
        (
            "defaults",
            hash(vec![("driver", hash(vec![("container", y("nspawn"))]))]),
        ),
    ];
    if !images.is_empty() {
        top.push(("images", Yaml::Hash(images)));
    }
    if !templates.is_empty() {
        top.push(("cloud_init_templates", Yaml::Hash(templates)));
    }
    top.push(("domains", Yaml::Hash(domains)));
    let body = emit_yaml(&hash(top)).map_err(ImportError::Emit)?;
    let moat_yml = format!(
        "# Imported from a Chimera Spawn folder by `moat import chimera`.\n\
         # What could not be carried over was printed by the import; see docs/import.md.\n{body}"
    );
    cx.notes.sort();
    machines_out.sort();
    Ok(Imported {
        project,
        moat_yml,
        notes: cx.notes,
        machines: machines_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> SourceFiles {
        SourceFiles {
            files: list
                .iter()
                .map(|(p, t)| (p.to_string(), t.to_string()))
                .collect(),
        }
    }

    #[test]
    fn labels() {
        assert_eq!(label("test-node1", 9), "test-node");
        assert_eq!(
            label("ubuntu-22.04-cloud-tar", 63),
            "ubuntu-22-04-cloud-tar"
        );
        assert_eq!(label("1st", 9), "x1st");
        assert_eq!(label("Dev_Node", 9), "dev-node");
    }

    #[test]
    fn jinja_subset() {
        let t = "#cloud-config\n{% if proxy and proxy.http_proxy %}\nenv: {{ proxy.http_proxy }}\n{% else %}\nenv: none\n{% endif %}\nx: 1\n";
        let mut p = Proxy::new();
        assert_eq!(
            render_jinja(t, &p).unwrap(),
            "#cloud-config\nenv: none\nx: 1\n"
        );
        p.insert("http_proxy".into(), "http://p:3128".into());
        assert_eq!(
            render_jinja(t, &p).unwrap(),
            "#cloud-config\nenv: http://p:3128\nx: 1\n"
        );
        assert!(render_jinja("{% for x in y %}\n{% endfor %}\n", &p).is_err());
        assert!(render_jinja("{{ ds.meta_data }}", &p).is_err());
    }

    #[test]
    fn profiles_map_to_network_privilege_and_limits() {
        let text = "p:\n  nspawn_config_content: |\n    [Exec]\n    Boot=true\n    PrivateUsers=no\n    Capability=all\n    Parameters=systemd.mask=x\n    [Network]\n    Private=no\n    VirtualEthernet=no\n    [Files]\n    BindReadOnly=/srv/data:/data\n  systemd_override_content: |\n    [Service]\n    CPUQuota=150%\n    MemoryMax=4096M\n    TasksMax=512\n    IOWeight=10\n";
        let mut cx = Cx { notes: vec![] };
        let node = parse_map(&mut cx, "profiles/p.yaml", text).unwrap();
        let e = &node.as_map().unwrap()[0];
        let p = profile(&mut cx, "profiles/p.yaml", "p", &e.value);
        assert_eq!(p.net, Net::Host);
        assert!(p.privileged);
        assert_eq!(p.cpus, Some(2));
        assert_eq!(p.memory.as_deref(), Some("4096MiB"));
        assert_eq!(p.pids, Some(512));
        assert_eq!(p.mounts, vec![("/srv/data".into(), "/data".into(), true)]);
        let msgs: Vec<String> = cx.notes.iter().map(|n| n.to_string()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("profiles/p.yaml:7: ") && m.contains("Parameters")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("profiles/p.yaml:18: ") && m.contains("IOWeight")),
            "{msgs:#?}"
        );
        assert!(msgs.iter().any(|m| m.contains("rounded up")), "{msgs:#?}");
    }

    #[test]
    fn converts_a_small_folder() {
        let src = files(&[
            ("config.yaml", "agent:\n  log_level: INFO\n"),
            ("images/debian.yaml", "debian-12-cloud-tar:\n  type: tar\n  source: https://example.invalid/debian-12.tar.xz\n"),
            ("cloud-init/base.yaml", "base:\n  meta_data: {}\n  user_data: |\n    #cloud-config\n    users:\n      - name: ops\n"),
            ("nodes/lab.yaml", "containers:\n  web:\n    ensure: present\n    state: running\n    image: debian-12-cloud-tar\n    profile: private\n    cloud_init:\n      template: base\n      meta_data:\n        role: web\n  old:\n    ensure: absent\n    image: debian-12-cloud-tar\n  db:\n    ensure: present\n    state: stopped\n    image: debian-12-cloud-tar\n"),
        ]);
        let out = convert("My Lab", &src).unwrap();
        assert_eq!(out.project, "my-lab");
        assert_eq!(out.machines, ["lab-db", "lab-web"]);
        let y = &out.moat_yml;
        assert!(y.contains("container: nspawn"), "{y}");
        assert!(y.contains("source: debian"), "{y}");
        assert!(y.contains("suite: bookworm"), "{y}");
        assert!(y.contains("- cloud-init"), "{y}");
        assert!(y.contains("trust_level: admin"), "{y}");
        let msgs: Vec<String> = out.notes.iter().map(|n| n.to_string()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("nodes/lab.yaml:11: ") && m.contains("absent")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("nodes/lab.yaml:16: ") && m.contains("stopped")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter().any(|m| m.starts_with("config.yaml:1: ")),
            "{msgs:#?}"
        );
    }
}
