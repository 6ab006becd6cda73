//! From spanned YAML trees to the model, checking as it goes: key names, value
//! types, enum values, names, sizes, and the references between domains,
//! machines, profiles, images and policies. Every problem is collected in
//! [`Cx`]; nothing stops at the first one.

use super::keys::{self, Key, NOT_ACTED_ON};
use super::{decode, Loaded, ANKLUME_FILE, DOMAINS_DIR, POLICIES_FILE};
use crate::diag::{Diagnostic, Diagnostics, Loc};
use crate::model::{
    Accel, Addressing, Defaults, Display, Domain, Egress, Endpoint, Firmware, Format, ImageSource,
    IncusAdopt, IncusConfig, Machine, MachineType, Mount, NetworkMode, Policy, Ports, Profile,
    Project, Protocol, Reconcile, RestartPolicy, TrustLevel, UsbDevice,
};
use crate::naming::{check_dns_label, MAX_DOMAIN_LEN, MAX_FULL_NAME_LEN};
use crate::suggest;
use crate::yaml::{self, shorten, Entry, Node, Typed, Value};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

/// The newest `schema_version` this moat reads.
pub const SCHEMA_VERSION: i128 = 1;

const TRUST_LEVELS: &[&str] = &[
    "admin",
    "trusted",
    "semi-trusted",
    "untrusted",
    "disposable",
];
const DRIVERS: &[&str] = &["native", "nspawn", "qemu", "firecracker", "incus"];

fn drivers_for(t: MachineType) -> &'static [&'static str] {
    match t {
        MachineType::Container => &["native", "nspawn", "incus"],
        MachineType::Vm => &["qemu", "incus"],
        MachineType::Microvm => &["qemu", "firecracker"],
    }
}

/// Conversion context: the format being read and every diagnostic so far.
struct Cx {
    format: Format,
    diags: Vec<Diagnostic>,
    /// Not-acted-on key → (first place, its field, number of places).
    unacted: BTreeMap<&'static str, (Loc, String, usize)>,
    defaults: Defaults,
    images: BTreeMap<String, ImageSource>,
    /// `cloud_init_templates:` by name.
    ci_templates: BTreeMap<String, serde_json::Value>,
    /// The `cloud_init:` of the domain being converted (its machines' base).
    domain_ci: Option<serde_json::Value>,
    /// `incus:` adoptions of domains and machines, gathered into `Project::incus`.
    incus_domains: BTreeMap<String, IncusAdopt>,
    incus_instances: BTreeMap<String, String>,
}

/// The accepted entries of one map (unknown keys already reported).
#[derive(Default)]
struct Fields<'a> {
    entries: Vec<&'a Entry>,
}

impl<'a> Fields<'a> {
    /// The value of `key`, unless absent or null.
    fn get(&self, key: &str) -> Option<&'a Node> {
        self.entry(key).map(|e| &e.value)
    }
    fn entry(&self, key: &str) -> Option<&'a Entry> {
        self.entries
            .iter()
            .find(|e| e.key == key && !e.value.is_null())
            .copied()
    }
}

fn join(field: &str, key: &str) -> String {
    if field.is_empty() {
        key.to_string()
    } else {
        format!("{field}.{key}")
    }
}

fn list(valid: &[&str]) -> String {
    valid.join(", ")
}

impl Cx {
    fn err(&mut self, loc: &Loc, field: &str, msg: impl Into<String>) {
        self.diags
            .push(Diagnostic::error(Some(loc.clone()), field, msg));
    }
    fn err_hint(
        &mut self,
        loc: &Loc,
        field: &str,
        msg: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.diags
            .push(Diagnostic::error(Some(loc.clone()), field, msg).with_hint(hint));
    }
    fn warn(&mut self, loc: &Loc, field: &str, msg: impl Into<String>, hint: Option<String>) {
        let mut d = Diagnostic::warning(Some(loc.clone()), field, msg);
        d.hint = hint;
        self.diags.push(d);
    }

    /// Note one use of a field listed in [`NOT_ACTED_ON`].
    fn used(&mut self, key: &'static str, loc: &Loc, field: &str) {
        let e = self
            .unacted
            .entry(key)
            .or_insert_with(|| (loc.clone(), field.to_string(), 0));
        if *loc < e.0 {
            e.0 = loc.clone();
            e.1 = field.to_string();
        }
        e.2 += 1;
    }

    /// Check `node` is a map (or null = empty) and report keys not in `known`.
    /// `what` names the map in messages ("in domain 'pro'").
    fn fields<'a>(&mut self, node: &'a Node, field: &str, what: &str, known: &[Key]) -> Fields<'a> {
        let Some(map) = node.as_map() else {
            if !node.is_null() {
                self.err(
                    &node.loc,
                    field,
                    format!("expected a map {what}, found {}", node.describe()),
                );
            }
            return Fields::default();
        };
        let mut out = Fields::default();
        for e in map {
            let f = join(field, &e.key);
            match known.iter().find(|k| k.name == e.key) {
                Some(k) if k.moat_only && self.format == Format::Anklume => self.warn(
                    &e.key_loc,
                    &f,
                    format!(
                        "key '{}' {what} is moat's own and is ignored in an AnKLuMe project",
                        e.key
                    ),
                    Some("to use it, convert the project to moat's format (moat.yml)".into()),
                ),
                Some(_) => out.entries.push(e),
                None => {
                    let sugg = suggest::suffix(&e.key, known.iter().map(|k| k.name));
                    let msg = format!("unknown key '{}' {what}{sugg}", shorten(&e.key));
                    let hint = if known.len() <= 12 {
                        format!(
                            "valid keys here: {}",
                            list(&known.iter().map(|k| k.name).collect::<Vec<_>>())
                        )
                    } else {
                        "docs/format.md lists every key".to_string()
                    };
                    match self.format {
                        Format::Moat => self.err_hint(&e.key_loc, &f, msg, hint),
                        Format::Anklume => {
                            self.warn(&e.key_loc, &f, format!("{msg}; ignored"), Some(hint))
                        }
                    }
                }
            }
        }
        out
    }

    fn string(&mut self, node: &Node, field: &str) -> Option<String> {
        match &node.value {
            Value::Scalar(s) => Some(s.text.clone()),
            _ => {
                self.err(
                    &node.loc,
                    field,
                    format!("expected a string, found {}", node.describe()),
                );
                None
            }
        }
    }

    /// A non-empty string.
    fn name_string(&mut self, node: &Node, field: &str) -> Option<String> {
        let s = self.string(node, field)?;
        if s.trim().is_empty() {
            self.err(&node.loc, field, "must not be empty");
            return None;
        }
        Some(s)
    }

    fn boolean(&mut self, node: &Node, field: &str) -> Option<bool> {
        if let Some(s) = node.as_scalar() {
            match s.typed() {
                Typed::Bool(b) => return Some(b),
                // YAML 1.1 spellings, which PyYAML (and so AnKLuMe) reads as booleans.
                Typed::Str(t) if s.plain => match t.to_ascii_lowercase().as_str() {
                    "yes" | "on" => return Some(true),
                    "no" | "off" => return Some(false),
                    _ => {}
                },
                _ => {}
            }
        }
        self.err(
            &node.loc,
            field,
            format!("expected true or false, found {}", node.describe()),
        );
        None
    }

    fn int(&mut self, node: &Node, field: &str, min: i128, max: i128) -> Option<i128> {
        let range = if max >= i128::from(u32::MAX) {
            format!("at least {min}")
        } else {
            format!("from {min} to {max}")
        };
        let v = match node.as_scalar().map(|s| s.typed()) {
            Some(Typed::Int(i)) => i,
            _ => {
                let found = node.describe();
                self.err(
                    &node.loc,
                    field,
                    format!("expected a whole number {range}, found {found}"),
                );
                return None;
            }
        };
        if v < min || v > max {
            self.err(
                &node.loc,
                field,
                format!("{v} is out of range: expected a whole number {range}"),
            );
            return None;
        }
        Some(v)
    }

    fn u32_min1(&mut self, node: &Node, field: &str) -> Option<u32> {
        self.int(node, field, 1, i128::from(u32::MAX))
            .and_then(|v| u32::try_from(v).ok())
    }

    fn choice(&mut self, node: &Node, field: &str, valid: &[&'static str]) -> Option<&'static str> {
        let text = match node.as_scalar() {
            Some(s) => s.text.as_str(),
            None => {
                self.err(
                    &node.loc,
                    field,
                    format!("expected one of {}, found {}", list(valid), node.describe()),
                );
                return None;
            }
        };
        if let Some(v) = valid.iter().find(|v| **v == text) {
            return Some(v);
        }
        let sugg = suggest::suffix(text, valid.iter().copied());
        self.err(
            &node.loc,
            field,
            format!(
                "invalid value '{}'{sugg}: valid values are {}",
                shorten(text),
                list(valid)
            ),
        );
        None
    }

    fn trust(&mut self, node: &Node, field: &str) -> Option<TrustLevel> {
        self.choice(node, field, TRUST_LEVELS)
            .and_then(TrustLevel::parse)
    }

    fn str_list(&mut self, node: &Node, field: &str) -> Option<Vec<String>> {
        let Some(seq) = node.as_seq() else {
            self.err(
                &node.loc,
                field,
                format!("expected a list of strings, found {}", node.describe()),
            );
            return None;
        };
        let mut out = Vec::new();
        for (i, n) in seq.iter().enumerate() {
            out.push(self.string(n, &format!("{field}[{i}]"))?);
        }
        Some(out)
    }

    fn str_map(&mut self, node: &Node, field: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(map) = node.as_map() else {
            if !node.is_null() {
                self.err(
                    &node.loc,
                    field,
                    format!(
                        "expected a map of names to strings, found {}",
                        node.describe()
                    ),
                );
            }
            return out;
        };
        for e in map {
            if let Some(v) = self.string(&e.value, &join(field, &e.key)) {
                out.insert(e.key.clone(), v);
            }
        }
        out
    }

    fn size(&mut self, node: &Node, field: &str) -> Option<u64> {
        let r = match node.as_scalar().map(|s| (s.typed(), s.text.as_str())) {
            Some((Typed::Int(i), _)) => {
                u64::try_from(i).map_err(|_| "must be a positive size".to_string())
            }
            Some((_, t)) => parse_size(t),
            None => Err(format!("expected a size, found {}", node.describe())),
        };
        match r {
            Ok(0) => {
                self.err(&node.loc, field, "must be greater than 0");
                None
            }
            Ok(v) => Some(v),
            Err(e) => {
                self.err_hint(
                    &node.loc,
                    field,
                    e,
                    "write a number of bytes or a size with a unit: 512MiB, 4GiB, 1G, 2GB (K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB of 1000)",
                );
                None
            }
        }
    }

    /// An image reference: a name from `images:` or a built-in source.
    fn image_ref(&mut self, node: &Node, field: &str) -> Option<String> {
        let raw = self.name_string(node, field)?;
        let r = raw.strip_prefix("images:").unwrap_or(&raw).to_string();
        if self.images.contains_key(&r) || builtin_image(&r).is_some() {
            return Some(r);
        }
        let sugg = suggest::suffix(&r, self.images.keys().map(String::as_str));
        let msg = format!(
            "unknown image '{}'{sugg}: not in images: and not a built-in source (busybox, debian/<suite>, ubuntu/<suite>, oci:<reference>)",
            shorten(&r)
        );
        let hint = "define it under images: in moat.yml, or use a built-in source".to_string();
        match self.format {
            Format::Moat => {
                self.err_hint(&node.loc, field, msg, hint);
                None
            }
            Format::Anklume => {
                self.warn(
                    &node.loc,
                    field,
                    format!("{msg}; machines using it cannot be built"),
                    Some(hint),
                );
                Some(r)
            }
        }
    }
}

/// Any YAML value as JSON (for `vars:` and `cloud_init:`).
fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value as J;
    match &node.value {
        Value::Map(m) => J::Object(
            m.iter()
                .map(|e| (e.key.clone(), to_json(&e.value)))
                .collect(),
        ),
        Value::Seq(s) => J::Array(s.iter().map(to_json).collect()),
        Value::Scalar(s) => match s.typed() {
            Typed::Null => J::Null,
            Typed::Bool(b) => J::Bool(b),
            Typed::Int(i) => i64::try_from(i)
                .map(J::from)
                .unwrap_or_else(|_| J::String(s.text.clone())),
            Typed::Float(f) => serde_json::Number::from_f64(f)
                .map(J::Number)
                .unwrap_or_else(|| J::String(s.text.clone())),
            Typed::Str(t) => J::String(t.to_string()),
        },
    }
}

/// A size in bytes: a plain number, or a number (decimals allowed) with a unit.
/// `K`/`M`/`G`/`T` and `KiB`/`MiB`/`GiB`/`TiB` are powers of 1024; `KB`/`MB`/
/// `GB`/`TB` powers of 1000; `B` is bytes. Units are case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("cannot read '{}' as a size", shorten(t)));
    }
    let mult: u128 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "cannot read '{}' as a size: unknown unit '{}'",
                shorten(t),
                shorten(unit.trim())
            ))
        }
    };
    let bad = || format!("cannot read '{}' as a size", shorten(t));
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') || int.len() > 20 || frac.len() > 12
    {
        return Err(bad());
    }
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let scale = 10u128.pow(u32::try_from(frac.len()).map_err(|_| bad())?);
    let frac_v: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    let bytes = int
        .checked_mul(mult)
        .and_then(|v| v.checked_add(frac_v * mult / scale))
        .ok_or_else(bad)?;
    u64::try_from(bytes).map_err(|_| format!("size '{}' is too large", shorten(t)))
}

/// Built-in image sources that need no `images:` entry.
pub fn builtin_image(r: &str) -> Option<ImageSource> {
    let suite_ok = |s: &str| !s.is_empty() && !s.contains('/') && !s.contains(char::is_whitespace);
    if r == "busybox" {
        Some(ImageSource::Busybox)
    } else if let Some(s) = r.strip_prefix("debian/").filter(|s| suite_ok(s)) {
        Some(ImageSource::Debian {
            suite: s.to_string(),
            packages: Vec::new(),
        })
    } else if let Some(s) = r.strip_prefix("ubuntu/").filter(|s| suite_ok(s)) {
        Some(ImageSource::Ubuntu {
            suite: s.to_string(),
            packages: Vec::new(),
        })
    } else {
        r.strip_prefix("oci:")
            .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
            .map(|s| ImageSource::Oci {
                reference: s.to_string(),
            })
    }
}

struct DomainSrc<'a> {
    name: String,
    /// Where the name is written: the key in moat.yml, or file:1:1.
    loc: Loc,
    node: &'a Node,
    from_file: bool,
}

struct RawPolicy<'a> {
    node: &'a Node,
    field: String,
}

pub(super) fn convert(
    dir: &Path,
    top: &str,
    files: &[(&str, &[u8])],
) -> Result<Loaded, Diagnostics> {
    let format = if Path::new(top)
        .file_name()
        .is_some_and(|n| n == ANKLUME_FILE)
    {
        Format::Anklume
    } else {
        Format::Moat
    };
    let mut cx = Cx {
        format,
        diags: Vec::new(),
        unacted: BTreeMap::new(),
        defaults: Defaults::default(),
        images: BTreeMap::new(),
        ci_templates: BTreeMap::new(),
        domain_ci: None,
        incus_domains: BTreeMap::new(),
        incus_instances: BTreeMap::new(),
    };

    // Parse every file first.
    let mut top_node: Option<Node> = None;
    let mut top_seen = false;
    let mut domain_nodes: Vec<(String, Loc, Node)> = Vec::new();
    let mut policies_node: Option<Node> = None;
    for (name, bytes) in files {
        let file: Arc<str> = Arc::from(*name);
        let start = Loc {
            file: file.clone(),
            line: 1,
            col: 1,
        };
        let empty = || Node {
            value: Value::Map(Vec::new()),
            loc: start.clone(),
        };
        let is_top = *name == top;
        let domain_stem = name
            .strip_prefix(DOMAINS_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|r| !r.contains('/'))
            .and_then(|r| r.strip_suffix(".yml").or_else(|| r.strip_suffix(".yaml")));
        if !is_top && domain_stem.is_none() && *name != POLICIES_FILE {
            continue;
        }
        top_seen |= is_top;
        let text = match decode(name, bytes) {
            Ok(t) => t,
            Err(d) => {
                cx.diags.push(d);
                continue;
            }
        };
        let prefix = domain_stem
            .map(|s| format!("domains.{s}"))
            .unwrap_or_default();
        let (node, d) = yaml::parse(&file, &prefix, text);
        let failed = node.is_none() && !d.is_empty();
        cx.diags.extend(d);
        if failed {
            continue;
        }
        let node = node.unwrap_or_else(empty);
        if is_top {
            top_node = Some(node);
        } else if let Some(stem) = domain_stem {
            domain_nodes.push((stem.to_string(), start, node));
        } else {
            policies_node = Some(node);
        }
    }
    if !top_seen {
        cx.diags.push(
            Diagnostic::error(None, "", format!("no {top} among the project files"))
                .with_hint("run `moat init` to create a project"),
        );
    }

    let fallback = Node {
        value: Value::Map(Vec::new()),
        loc: Loc::new(top, 1, 1),
    };
    let top_node = top_node.unwrap_or(fallback);
    let tf = cx.fields(&top_node, "", "at the top level", keys::TOP);

    if let Some(n) = tf.get("schema_version") {
        let v = match n.as_scalar().map(|s| s.typed()) {
            Some(Typed::Int(v)) => Some(v),
            _ => {
                cx.err_hint(
                    &n.loc,
                    "schema_version",
                    format!("expected a whole number, found {}", n.describe()),
                    "write schema_version: 1",
                );
                None
            }
        };
        if let Some(v) = v {
            if v > SCHEMA_VERSION {
                cx.err_hint(
                    &n.loc,
                    "schema_version",
                    format!(
                        "schema_version {v} is newer than this moat reads (up to {SCHEMA_VERSION})"
                    ),
                    "upgrade moat",
                );
            } else if v < 1 {
                cx.err_hint(
                    &n.loc,
                    "schema_version",
                    format!("schema_version {v} does not exist: the first is 1"),
                    "write schema_version: 1",
                );
            }
        }
    }
    let default_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "moat".to_string());
    let name = tf
        .get("project")
        .and_then(|n| cx.name_string(n, "project"))
        .unwrap_or(default_name);
    if let Some(n) = tf.get("description") {
        cx.string(n, "description");
    }
    for k in [
        "nesting",
        "resource_policy",
        "gpu_policy",
        "ai_access_policy",
    ] {
        if let Some(e) = tf.entry(k) {
            let key = NOT_ACTED_ON
                .iter()
                .find(|(n, _)| *n == k)
                .map_or("nesting", |(n, _)| *n);
            cx.used(key, &e.key_loc, k);
        }
    }
    let reconcile = match tf
        .get("reconcile")
        .and_then(|n| cx.choice(n, "reconcile", &["report", "auto"]))
    {
        Some("auto") => Reconcile::Auto,
        _ => Reconcile::Report,
    };
    if let Some(n) = tf.get("images") {
        images(&mut cx, n);
    }
    if let Some(n) = tf.get("cloud_init_templates") {
        cloud_init_templates(&mut cx, n);
    }
    let incus = tf.get("incus").map(|n| incus(&mut cx, n, dir));
    let addressing = tf
        .get("addressing")
        .map(|n| addressing(&mut cx, n))
        .unwrap_or_default();
    if let Some(n) = tf.get("defaults") {
        defaults(&mut cx, n);
    }

    // Domains: inline ones, then one per file.
    let mut srcs: Vec<DomainSrc> = Vec::new();
    if let Some(n) = tf.get("domains") {
        match n.as_map() {
            Some(m) => srcs.extend(m.iter().map(|e| DomainSrc {
                name: e.key.clone(),
                loc: e.key_loc.clone(),
                node: &e.value,
                from_file: false,
            })),
            None => cx.err(
                &n.loc,
                "domains",
                format!(
                    "expected a map of domain names to domains, found {}",
                    n.describe()
                ),
            ),
        }
    }
    for (stem, loc, node) in &domain_nodes {
        srcs.push(DomainSrc {
            name: stem.clone(),
            loc: loc.clone(),
            node,
            from_file: true,
        });
    }
    let mut domains: BTreeMap<String, Domain> = BTreeMap::new();
    let mut where_: BTreeMap<String, Loc> = BTreeMap::new();
    for src in &srcs {
        let field = format!("domains.{}", src.name);
        if let Some(first) = where_.get(&src.name) {
            let first = first.clone();
            cx.err_hint(
                &src.loc,
                &field,
                format!("domain '{}' is defined twice (also at {first})", shorten(&src.name)),
                "keep one definition: either inline under domains: in moat.yml or in domains/<name>.yml",
            );
            continue;
        }
        where_.insert(src.name.clone(), src.loc.clone());
        if !domain_name_ok(&mut cx, &src.name, &src.loc, &field, src.from_file) {
            // Still read it, to report problems inside, but keep it out of the project.
            let _ = domain(&mut cx, src);
            continue;
        }
        if let Some(d) = domain(&mut cx, src) {
            domains.insert(src.name.clone(), d);
        }
    }

    unique_names(&mut cx, &domains);
    let mut incus = incus;
    if !cx.incus_domains.is_empty() || !cx.incus_instances.is_empty() {
        let c = incus.get_or_insert_with(IncusConfig::default);
        c.domains = std::mem::take(&mut cx.incus_domains);
        c.instances = std::mem::take(&mut cx.incus_instances);
    }

    // Policies: inline in moat.yml, then policies.yml.
    let mut raw: Vec<RawPolicy> = Vec::new();
    if let Some(n) = tf.get("policies") {
        policy_list(&mut cx, n, &mut raw);
    }
    if let Some(pn) = &policies_node {
        let pf = cx.fields(pn, "", &format!("in {POLICIES_FILE}"), keys::POLICIES_TOP);
        if let Some(n) = pf.get("policies") {
            policy_list(&mut cx, n, &mut raw);
        }
    }
    let mut policies = Vec::new();
    for rp in &raw {
        if let Some(p) = policy(&mut cx, rp, &domains) {
            policies.push(p);
        }
    }

    // One warning per accepted-but-not-acted-on field.
    let unacted = std::mem::take(&mut cx.unacted);
    for (key, note) in NOT_ACTED_ON {
        if let Some((loc, field, n)) = unacted.get(key) {
            let places = if *n == 1 {
                "1 place".to_string()
            } else {
                format!("{n} places")
            };
            cx.warn(
                loc,
                field,
                format!("'{key}' is accepted but no driver acts on it yet ({places}): {note}"),
                Some("the value is kept; nothing needs to change".into()),
            );
        }
    }

    let mut diags = Diagnostics(cx.diags);
    diags.sort();
    if diags.has_errors() {
        return Err(diags);
    }
    Ok(Loaded {
        project: Project {
            name,
            format,
            dir: dir.to_path_buf(),
            addressing,
            defaults: cx.defaults,
            images: cx.images,
            domains,
            policies,
            reconcile,
            incus,
        },
        warnings: diags,
    })
}

fn domain_name_ok(cx: &mut Cx, name: &str, loc: &Loc, field: &str, from_file: bool) -> bool {
    let what = if from_file {
        "domain file name"
    } else {
        "domain name"
    };
    let hint = if from_file {
        "rename the file: the domain's name is the file name without .yml"
    } else {
        "rename the domain"
    };
    if name == "host" {
        cx.err_hint(
            loc,
            field,
            "'host' cannot name a domain: policies use it for the host itself",
            hint,
        );
        return false;
    }
    if let Some(why) = check_dns_label(name, MAX_DOMAIN_LEN) {
        let why = if name.len() > MAX_DOMAIN_LEN {
            format!(
                "{why} (the host bridge is named mt<tag>-<domain> and Linux interface names hold at most 15 characters)"
            )
        } else {
            why
        };
        cx.err_hint(
            loc,
            field,
            format!("invalid {what} '{}': {why}", shorten(name)),
            hint,
        );
        return false;
    }
    true
}

fn images(cx: &mut Cx, node: &Node) {
    let Some(map) = node.as_map() else {
        cx.err(
            &node.loc,
            "images",
            format!(
                "expected a map of image names to sources, found {}",
                node.describe()
            ),
        );
        return;
    };
    const SOURCES: &[&str] = &[
        "busybox",
        "debian",
        "ubuntu",
        "tarball",
        "folder",
        "oci-layout",
        "oci-archive",
        "docker-archive",
        "oci",
        "cloud-image",
    ];
    for e in map {
        let field = join("images", &e.key);
        if let Some(why) = check_dns_label(&e.key, 63) {
            cx.err(
                &e.key_loc,
                &field,
                format!("invalid image name '{}': {why}", shorten(&e.key)),
            );
            continue;
        }
        let v = &e.value;
        if let Some(s) = v.as_scalar() {
            match builtin_image(&s.text) {
                Some(src) => {
                    cx.images.insert(e.key.clone(), src);
                }
                None => cx.err_hint(
                    &v.loc,
                    &field,
                    format!("unknown image source '{}'", shorten(&s.text)),
                    "write busybox, debian/<suite>, ubuntu/<suite>, oci:<reference>, or a map with source:",
                ),
            }
            continue;
        }
        let f = cx.fields(v, &field, &format!("in image '{}'", e.key), keys::IMAGE);
        let Some(sn) = f.get("source") else {
            if v.as_map().is_some() {
                cx.err_hint(
                    &v.loc,
                    &field,
                    "missing 'source'",
                    format!("valid sources: {}", list(SOURCES)),
                );
            }
            continue;
        };
        let Some(source) = cx.choice(sn, &join(&field, "source"), SOURCES) else {
            continue;
        };
        let needs: &[&str] = match source {
            "busybox" => &[],
            "debian" | "ubuntu" => &["suite"],
            "oci" => &["reference"],
            _ => &["path"],
        };
        let mut ok = true;
        if let (false, Some(e)) = (matches!(source, "debian" | "ubuntu"), f.entry("packages")) {
            cx.err_hint(
                &e.key_loc,
                &join(&field, "packages"),
                format!("'packages' does not apply to source '{source}'"),
                "only debian and ubuntu images are built by moat; install packages in the image you import",
            );
            ok = false;
        }
        let packages = f
            .get("packages")
            .and_then(|n| cx.str_list(n, &join(&field, "packages")))
            .unwrap_or_default();
        for k in ["suite", "path", "reference"] {
            let present = f.entry(k);
            match (needs.contains(&k), present) {
                (true, None) => {
                    cx.err(&v.loc, &field, format!("source '{source}' needs '{k}'"));
                    ok = false;
                }
                (false, Some(e)) => {
                    cx.err(
                        &e.key_loc,
                        &join(&field, k),
                        format!("'{k}' does not apply to source '{source}'"),
                    );
                    ok = false;
                }
                _ => {}
            }
        }
        let get = |cx: &mut Cx, k: &str| f.get(k).and_then(|n| cx.name_string(n, &join(&field, k)));
        let src = match source {
            "busybox" => Some(ImageSource::Busybox),
            "debian" => get(cx, "suite").map(|suite| ImageSource::Debian {
                suite,
                packages: packages.clone(),
            }),
            "ubuntu" => get(cx, "suite").map(|suite| ImageSource::Ubuntu {
                suite,
                packages: packages.clone(),
            }),
            "oci" => get(cx, "reference").map(|reference| ImageSource::Oci { reference }),
            "tarball" => get(cx, "path").map(|path| ImageSource::Tarball { path }),
            "folder" => get(cx, "path").map(|path| ImageSource::Folder { path }),
            "oci-layout" => get(cx, "path").map(|path| ImageSource::OciLayout { path }),
            "oci-archive" => get(cx, "path").map(|path| ImageSource::OciArchive { path }),
            "docker-archive" => get(cx, "path").map(|path| ImageSource::DockerArchive { path }),
            _ => get(cx, "path").map(|path| ImageSource::CloudImage { path }),
        };
        if let (true, Some(src)) = (ok, src) {
            cx.images.insert(e.key.clone(), src);
        }
    }
}

/// `cloud_init_templates:`: name → a `cloud_init:` map (without `template:`).
fn cloud_init_templates(cx: &mut Cx, node: &Node) {
    let Some(map) = node.as_map() else {
        cx.err(
            &node.loc,
            "cloud_init_templates",
            format!(
                "expected a map of template names to cloud_init maps, found {}",
                node.describe()
            ),
        );
        return;
    };
    for e in map {
        let field = join("cloud_init_templates", &e.key);
        if let Some(why) = check_dns_label(&e.key, 63) {
            cx.err(
                &e.key_loc,
                &field,
                format!("invalid template name '{}': {why}", shorten(&e.key)),
            );
            continue;
        }
        // Kept even when invalid, so that its users do not get "unknown template" too.
        let v = cloud_init_level(cx, &e.value, &field, false).unwrap_or_else(|| to_json(&e.value));
        cx.ci_templates.insert(e.key.clone(), v);
    }
}

/// One `cloud_init:` map (a template's, a domain's or a machine's), checked:
/// known keys, `template:` names that exist (only where `templates` is
/// allowed), `user-data`/`meta-data`/`network-config` as a map or text, and
/// `#cloud-config` text that parses. `None` after an error.
fn cloud_init_level(
    cx: &mut Cx,
    node: &Node,
    field: &str,
    templates: bool,
) -> Option<serde_json::Value> {
    let before = cx.diags.iter().filter(|d| d.is_error()).count();
    if node.as_map().is_none() {
        cx.err(
            &node.loc,
            field,
            format!(
                "expected a map (user-data, meta-data, network-config, template), found {}",
                node.describe()
            ),
        );
        return None;
    }
    let f = cx.fields(node, field, "in cloud_init", keys::CLOUD_INIT);
    if let Some(n) = f.get("template") {
        let tf = join(field, "template");
        if !templates {
            cx.err_hint(
                &n.loc,
                &tf,
                "a template cannot name other templates",
                "list every template on the domain or machine that uses them",
            );
        } else {
            let names = if n.as_scalar().is_some() {
                cx.string(n, &tf).map(|s| vec![(s, n.loc.clone())])
            } else {
                n.as_seq().map(|seq| {
                    seq.iter()
                        .filter_map(|i| cx.string(i, &tf).map(|s| (s, i.loc.clone())))
                        .collect()
                })
            };
            match names {
                None if n.as_scalar().is_none() => cx.err(
                    &n.loc,
                    &tf,
                    format!(
                        "expected a template name or a list of names, found {}",
                        n.describe()
                    ),
                ),
                None => {}
                Some(names) => {
                    for (name, loc) in names {
                        if !cx.ci_templates.contains_key(&name) {
                            let sugg =
                                suggest::suffix(&name, cx.ci_templates.keys().map(String::as_str));
                            cx.err_hint(
                                &loc,
                                &tf,
                                format!("unknown cloud-init template '{}'{sugg}", shorten(&name)),
                                "define it under cloud_init_templates: at the top of moat.yml",
                            );
                        }
                    }
                }
            }
        }
    }
    for k in ["user-data", "meta-data", "network-config"] {
        let Some(n) = f.get(k) else { continue };
        let kf = join(field, k);
        if let Some(s) = n.as_scalar() {
            if let (Typed::Str(t), "user-data") = (s.typed(), k) {
                if let Some(Err(why)) = crate::cloudinit::parse_cloud_config(t) {
                    cx.err_hint(
                        &n.loc,
                        &kf,
                        format!("the #cloud-config text does not parse: {why}"),
                        "fix the YAML after the #cloud-config line, or write user-data as a map",
                    );
                }
            } else if !matches!(s.typed(), Typed::Str(_)) {
                cx.err(
                    &n.loc,
                    &kf,
                    format!("expected a map or a text, found {}", n.describe()),
                );
            }
        } else if n.as_seq().is_some() {
            cx.err(
                &n.loc,
                &kf,
                format!("expected a map or a text, found {}", n.describe()),
            );
        }
    }
    let after = cx.diags.iter().filter(|d| d.is_error()).count();
    (after == before).then(|| to_json(node))
}

fn addressing(cx: &mut Cx, node: &Node) -> Addressing {
    let mut a = Addressing::default();
    let f = cx.fields(node, "addressing", "in addressing", keys::ADDRESSING);
    if let Some(n) = f.get("base") {
        if let Some(s) = cx.string(n, "addressing.base") {
            let parts: Vec<Option<u8>> = s.split('.').map(|p| p.parse::<u8>().ok()).collect();
            match parts.as_slice() {
                [Some(x), Some(y)] => a.base = [*x, *y],
                _ => cx.err_hint(
                    &n.loc,
                    "addressing.base",
                    format!(
                        "invalid base '{}': expected the first two octets of an IPv4 address",
                        shorten(&s)
                    ),
                    "write it quoted, e.g. base: \"10.100\"",
                ),
            }
        }
    }
    if let Some(n) = f.get("zone_step") {
        if let Some(v) = cx.int(n, "addressing.zone_step", 1, 255) {
            a.zone_step = u8::try_from(v).unwrap_or(10);
        }
    }
    let top =
        u32::from(a.base[1]) + u32::from(TrustLevel::Disposable.zone()) * u32::from(a.zone_step);
    if top > 255 {
        cx.err_hint(
            &node.loc,
            "addressing",
            format!(
                "with base {}.{} and zone_step {}, the disposable zone would need second octet {top} (more than 255)",
                a.base[0], a.base[1], a.zone_step
            ),
            "lower the base's second octet or zone_step",
        );
    }
    a
}

fn driver_for(cx: &mut Cx, node: &Node, field: &str, kind: MachineType) -> Option<String> {
    let d = cx.choice(node, field, DRIVERS)?;
    let ok = drivers_for(kind);
    if !ok.contains(&d) {
        cx.err(
            &node.loc,
            field,
            format!(
                "driver '{d}' cannot run a {}: valid drivers for it are {}",
                kind.as_str(),
                list(ok)
            ),
        );
        return None;
    }
    Some(d.to_string())
}

fn defaults(cx: &mut Cx, node: &Node) {
    let f = cx.fields(node, "defaults", "in defaults", keys::DEFAULTS);
    if let (Some(a), Some(b)) = (f.entry("image"), f.entry("os_image")) {
        let later = if a.key_loc > b.key_loc { a } else { b };
        cx.err(
            &later.key_loc,
            &join("defaults", &later.key),
            "set either image or os_image, not both",
        );
    }
    for k in ["image", "os_image"] {
        if let Some(n) = f.get(k) {
            if let Some(r) = cx.image_ref(n, &join("defaults", k)) {
                cx.defaults.image = r;
            }
        }
    }
    if let Some(t) = f
        .get("trust_level")
        .and_then(|n| cx.trust(n, "defaults.trust_level"))
    {
        cx.defaults.trust_level = t;
    }
    if let Some(n) = f.get("driver") {
        let df = cx.fields(
            n,
            "defaults.driver",
            "in defaults.driver",
            keys::DRIVER_DEFAULTS,
        );
        for (k, t) in [
            ("container", MachineType::Container),
            ("vm", MachineType::Vm),
            ("microvm", MachineType::Microvm),
        ] {
            if let Some(dn) = df.get(k) {
                if let Some(d) = driver_for(cx, dn, &format!("defaults.driver.{k}"), t) {
                    cx.defaults.driver.insert(t, d);
                }
            }
        }
    }
    if let Some(n) = f.get("cpus") {
        cx.defaults.cpus = cx.u32_min1(n, "defaults.cpus");
    }
    if let Some(n) = f.get("memory") {
        cx.defaults.memory = cx.size(n, "defaults.memory");
    }
    if let Some(e) = f.entry("disk") {
        cx.defaults.disk = cx.size(&e.value, "defaults.disk");
        cx.used("disk", &e.key_loc, "defaults.disk");
    }
    if let Some(n) = f.get("pids") {
        cx.defaults.pids = cx.u32_min1(n, "defaults.pids");
    }
}

fn domain(cx: &mut Cx, src: &DomainSrc) -> Option<Domain> {
    let field = format!("domains.{}", src.name);
    let what = format!("in domain '{}'", shorten(&src.name));
    let node = src.node;
    if node.as_map().is_none() && !node.is_null() {
        cx.err(
            &node.loc,
            &field,
            format!(
                "expected a map (the domain's settings), found {}",
                node.describe()
            ),
        );
        return None;
    }
    let f = cx.fields(node, &field, &what, keys::DOMAIN);
    let mut d = Domain {
        name: src.name.clone(),
        description: String::new(),
        trust_level: cx.defaults.trust_level,
        enabled: true,
        ephemeral: false,
        subnet: None,
        egress: Egress::Nat,
        dhcp: true,
        profiles: BTreeMap::new(),
        target: None,
        machines: BTreeMap::new(),
        loc: Some(src.loc.clone()),
    };
    let fj = |k: &str| join(&field, k);
    if let Some(n) = f.get("description") {
        d.description = cx.string(n, &fj("description")).unwrap_or_default();
    }
    if let Some(t) = f
        .get("trust_level")
        .and_then(|n| cx.trust(n, &fj("trust_level")))
    {
        d.trust_level = t;
    }
    if let Some(n) = f.get("enabled") {
        d.enabled = cx.boolean(n, &fj("enabled")).unwrap_or(true);
    }
    if let Some(n) = f.get("ephemeral") {
        d.ephemeral = cx.boolean(n, &fj("ephemeral")).unwrap_or(false);
    }
    if let Some(n) = f.get("dhcp") {
        d.dhcp = cx.boolean(n, &fj("dhcp")).unwrap_or(true);
    }
    if let Some(n) = f.get("target") {
        d.target = cx.name_string(n, &fj("target"));
    }
    let adopt_node = f.get("incus");
    if let Some(n) = f.get("egress") {
        if cx.choice(n, &fj("egress"), &["nat", "none"]) == Some("none") {
            d.egress = Egress::None;
        }
    }
    if let Some(n) = f.get("subnet") {
        if let Some(s) = cx.string(n, &fj("subnet")) {
            match s.trim().parse::<Ipv4Net>() {
                Ok(net) if net.addr() != net.network() => cx.err_hint(
                    &n.loc,
                    &fj("subnet"),
                    format!("subnet '{s}' has host bits set"),
                    format!("did you mean {}/{}?", net.network(), net.prefix_len()),
                ),
                Ok(net) => d.subnet = Some(net),
                Err(_) => cx.err_hint(
                    &n.loc,
                    &fj("subnet"),
                    format!("invalid subnet '{}': expected an IPv4 CIDR", shorten(&s)),
                    "write it like 10.200.0.0/24",
                ),
            }
        }
    }
    if let Some(n) = adopt_node {
        if let Some(a) = incus_adopt(cx, n, &fj("incus"), d.subnet) {
            cx.incus_domains.insert(d.name.clone(), a);
        }
    }
    if let Some(e) = f.entry("profiles") {
        let pf = fj("profiles");
        match e.value.as_map() {
            Some(m) => {
                for pe in m {
                    let pfield = join(&pf, &pe.key);
                    if let Some(why) = check_dns_label(&pe.key, 63) {
                        cx.err(
                            &pe.key_loc,
                            &pfield,
                            format!("invalid profile name '{}': {why}", shorten(&pe.key)),
                        );
                        continue;
                    }
                    let ff = cx.fields(
                        &pe.value,
                        &pfield,
                        &format!("in profile '{}'", pe.key),
                        keys::PROFILE,
                    );
                    let mut p = Profile {
                        name: pe.key.clone(),
                        ..Profile::default()
                    };
                    if let Some(n) = ff.get("description") {
                        cx.string(n, &join(&pfield, "description"));
                    }
                    if let Some(n) = ff.get("config") {
                        p.config = cx.str_map(n, &join(&pfield, "config"));
                    }
                    if let Some(n) = ff.get("devices") {
                        let df = join(&pfield, "devices");
                        match n.as_map() {
                            Some(devs) => {
                                for de in devs {
                                    let v = cx.str_map(&de.value, &join(&df, &de.key));
                                    p.devices.insert(de.key.clone(), v);
                                }
                            }
                            None => cx.err(
                                &n.loc,
                                &df,
                                format!(
                                    "expected a map of device names to settings, found {}",
                                    n.describe()
                                ),
                            ),
                        }
                    }
                    if !p.config.is_empty() || !p.devices.is_empty() {
                        cx.used("profiles", &pe.key_loc, &pfield);
                    }
                    d.profiles.insert(pe.key.clone(), p);
                }
            }
            None => cx.err(
                &e.value.loc,
                &pf,
                format!(
                    "expected a map of profile names to profiles, found {}",
                    e.value.describe()
                ),
            ),
        }
    }
    cx.domain_ci = f
        .get("cloud_init")
        .and_then(|n| cloud_init_level(cx, n, &fj("cloud_init"), true));
    if let Some(n) = f.get("machines") {
        match n.as_map() {
            Some(m) => {
                for me in m {
                    if let Some(mach) = machine(cx, &d, me) {
                        d.machines.insert(me.key.clone(), mach);
                    }
                }
            }
            None => cx.err(
                &n.loc,
                &fj("machines"),
                format!(
                    "expected a map of machine names to machines, found {}",
                    n.describe()
                ),
            ),
        }
    }
    Some(d)
}

fn machine(cx: &mut Cx, d: &Domain, e: &Entry) -> Option<Machine> {
    let name = &e.key;
    let field = format!("domains.{}.machines.{name}", d.name);
    let full_name = format!("{}-{name}", d.name);
    let fj = |k: &str| join(&field, k);
    let mut name_ok = true;
    if let Some(why) = check_dns_label(name, MAX_FULL_NAME_LEN) {
        cx.err_hint(
            &e.key_loc,
            &field,
            format!("invalid machine name '{}': {why}", shorten(name)),
            "rename the machine",
        );
        name_ok = false;
    } else if full_name.len() > MAX_FULL_NAME_LEN {
        cx.err_hint(
            &e.key_loc,
            &field,
            format!(
                "full name '{full_name}' is {} characters long, at most {MAX_FULL_NAME_LEN} are allowed (it is the machine's host name, one DNS label)",
                full_name.len()
            ),
            "shorten the machine or domain name",
        );
        name_ok = false;
    }
    if e.value.as_map().is_none() && !e.value.is_null() {
        cx.err(
            &e.value.loc,
            &field,
            format!(
                "expected a map (the machine's settings), found {}",
                e.value.describe()
            ),
        );
        return None;
    }
    let f = cx.fields(
        &e.value,
        &field,
        &format!("in machine '{}'", shorten(&full_name)),
        keys::MACHINE,
    );

    let kind = match f
        .get("type")
        .and_then(|n| cx.choice(n, &fj("type"), &["container", "lxc", "vm", "microvm"]))
    {
        Some("vm") => MachineType::Vm,
        Some("microvm") => MachineType::Microvm,
        _ => MachineType::Container,
    };
    if let (Some(a), Some(b)) = (f.entry("image"), f.entry("os_image")) {
        let later = if a.key_loc > b.key_loc { a } else { b };
        cx.err(
            &later.key_loc,
            &fj(&later.key),
            "set either image or os_image, not both",
        );
    }
    let default_driver = cx
        .defaults
        .driver
        .get(&kind)
        .cloned()
        .unwrap_or_else(|| "native".into());
    let driver = f
        .get("driver")
        .and_then(|n| driver_for(cx, n, &fj("driver"), kind))
        .unwrap_or(default_driver);
    let mut image = cx.defaults.image.clone();
    for k in ["image", "os_image"] {
        if let Some(n) = f.get(k) {
            // With the incus driver, an image may be an alias on the Incus server.
            let r = if driver == "incus" {
                let known = n
                    .as_scalar()
                    .map(|s| s.text.clone())
                    .is_some_and(|r| cx.images.contains_key(&r) || builtin_image(&r).is_some());
                if known {
                    cx.image_ref(n, &fj(k))
                } else {
                    incus_name_slash(cx, n, &fj(k))
                }
            } else {
                cx.image_ref(n, &fj(k))
            };
            if let Some(r) = r {
                image = r;
            }
        }
    }

    let mut m = Machine {
        name: name.clone(),
        full_name: full_name.clone(),
        domain: d.name.clone(),
        description: String::new(),
        kind,
        image,
        driver,
        cpus: None,
        memory: None,
        disk: None,
        pids: None,
        network: NetworkMode::Domain,
        ip: None,
        ephemeral: d.ephemeral,
        disposable: false,
        privileged: false,
        gpu: false,
        profiles: Vec::new(),
        config: BTreeMap::new(),
        persistent: BTreeMap::new(),
        mounts: Vec::new(),
        cloud_init: None,
        roles: Vec::new(),
        vars: serde_json::Value::Null,
        weight: 1,
        restart: RestartPolicy::No,
        command: None,
        trust: d.trust_level,
        kernel: None,
        accel: Accel::Auto,
        firmware: Firmware::Bios,
        display: Display::None,
        usb: Vec::new(),
        target: d.target.clone(),
        template: false,
        adhoc: false,
        loc: Some(e.key_loc.clone()),
        ip_loc: None,
    };
    if let Some(n) = f.get("description") {
        m.description = cx.string(n, &fj("description")).unwrap_or_default();
    }
    if let Some(n) = f.get("cpus") {
        m.cpus = cx.u32_min1(n, &fj("cpus"));
    }
    if let Some(n) = f.get("memory") {
        m.memory = cx.size(n, &fj("memory"));
    }
    if let Some(e) = f.entry("disk") {
        m.disk = cx.size(&e.value, &fj("disk"));
        cx.used("disk", &e.key_loc, &fj("disk"));
    }
    if let Some(n) = f.get("pids") {
        m.pids = cx.u32_min1(n, &fj("pids"));
    }
    if let Some(e) = f.entry("config") {
        m.config = cx.str_map(&e.value, &fj("config"));
        config_limits(cx, &mut m, &e.value, &fj("config"));
        if m.config
            .keys()
            .any(|k| k != "limits.cpu" && k != "limits.memory")
        {
            cx.used("config", &e.key_loc, &fj("config"));
        }
    }
    m.cpus = m.cpus.or(cx.defaults.cpus);
    m.memory = m.memory.or(cx.defaults.memory);
    m.disk = m.disk.or(cx.defaults.disk);
    m.pids = m.pids.or(cx.defaults.pids);

    if let Some(n) = f.get("network") {
        match cx.choice(n, &fj("network"), &["domain", "host", "none"]) {
            Some("host") => {
                m.network = NetworkMode::Host;
                if d.trust_level != TrustLevel::Admin {
                    cx.err_hint(
                        &n.loc,
                        &fj("network"),
                        format!(
                            "network: host is only allowed in admin domains ('{}' is {}): the machine would share the host's network and bypass every domain firewall",
                            d.name,
                            d.trust_level.as_str()
                        ),
                        "use network: domain, or move the machine to an admin domain",
                    );
                }
            }
            Some("none") => m.network = NetworkMode::None,
            _ => {}
        }
    }
    if let Some(n) = f.get("ip") {
        if let Some(s) = cx.string(n, &fj("ip")) {
            match s.trim().parse::<Ipv4Addr>() {
                Ok(ip) => {
                    m.ip = Some(ip);
                    m.ip_loc = Some(n.loc.clone());
                }
                Err(_) => cx.err_hint(
                    &n.loc,
                    &fj("ip"),
                    format!("invalid IPv4 address '{}'", shorten(&s)),
                    "write four numbers 0-255 separated by dots, e.g. 10.100.1.100",
                ),
            }
        }
    }
    if let Some(n) = f.get("ephemeral") {
        m.ephemeral = cx.boolean(n, &fj("ephemeral")).unwrap_or(d.ephemeral);
    }
    if let Some(n) = f.get("disposable") {
        m.disposable = cx.boolean(n, &fj("disposable")).unwrap_or(false);
    }
    if let Some(n) = f.get("privileged") {
        m.privileged = cx.boolean(n, &fj("privileged")).unwrap_or(false);
        if m.privileged && !d.trust_level.allows_privileged() {
            cx.err_hint(
                &n.loc,
                &fj("privileged"),
                format!(
                    "privileged machines are not allowed in {} domains ('{}'): a privileged machine's root is close to the host's root, which defeats the domain's isolation",
                    d.trust_level.as_str(),
                    d.name
                ),
                "remove privileged: true, or move the machine to a trusted domain",
            );
        } else if m.privileged && m.disposable {
            cx.err_hint(
                &n.loc,
                &fj("privileged"),
                "a disposable machine cannot be privileged: disposable machines are for untrusted work, and a privileged one could reach the host",
                "remove privileged: true or disposable: true",
            );
        }
    }
    if let Some(e) = f.entry("gpu") {
        m.gpu = cx.boolean(&e.value, &fj("gpu")).unwrap_or(false);
        if m.gpu {
            cx.used("gpu", &e.key_loc, &fj("gpu"));
        }
    }
    if let Some(e) = f.entry("gui") {
        if cx.boolean(&e.value, &fj("gui")) == Some(true) {
            cx.used("gui", &e.key_loc, &fj("gui"));
        }
    }
    if let Some(e) = f.entry("workspace") {
        if e.value.as_map().is_none() {
            cx.err(
                &e.value.loc,
                &fj("workspace"),
                format!("expected a map, found {}", e.value.describe()),
            );
        }
        cx.used("workspace", &e.key_loc, &fj("workspace"));
    }
    if let Some(n) = f.get("profiles") {
        if let Some(ps) = cx.str_list(n, &fj("profiles")) {
            let seq = n.as_seq().unwrap_or_default();
            for (i, p) in ps.iter().enumerate() {
                if p != "default" && !d.profiles.contains_key(p) {
                    let loc = seq.get(i).map_or(&n.loc, |x| &x.loc).clone();
                    let sugg = suggest::suffix(
                        p,
                        d.profiles.keys().map(String::as_str).chain(["default"]),
                    );
                    cx.err_hint(
                        &loc,
                        &format!("{}[{i}]", fj("profiles")),
                        format!("profile '{}' is not defined in domain '{}'{sugg}", shorten(p), d.name),
                        "define it under the domain's profiles:, or remove it ('default' always exists)",
                    );
                }
            }
            m.profiles = ps;
        }
    }
    if let Some(e) = f.entry("persistent") {
        m.persistent = cx.str_map(&e.value, &fj("persistent"));
        cx.used("persistent", &e.key_loc, &fj("persistent"));
    }
    if let Some(e) = f.entry("roles") {
        m.roles = cx.str_list(&e.value, &fj("roles")).unwrap_or_default();
        cx.used("roles", &e.key_loc, &fj("roles"));
    }
    if let Some(e) = f.entry("vars") {
        if e.value.as_map().is_none() {
            cx.err(
                &e.value.loc,
                &fj("vars"),
                format!("expected a map of variables, found {}", e.value.describe()),
            );
        }
        m.vars = to_json(&e.value);
        cx.used("vars", &e.key_loc, &fj("vars"));
    }
    if let Some(e) = f.entry("weight") {
        if let Some(w) = cx.int(&e.value, &fj("weight"), 0, i128::from(u32::MAX)) {
            m.weight = u32::try_from(w).unwrap_or(1);
        }
        cx.used("weight", &e.key_loc, &fj("weight"));
    }
    if let Some(n) = f.get("restart") {
        m.restart = match cx.choice(n, &fj("restart"), &["no", "on-failure", "always"]) {
            Some("on-failure") => RestartPolicy::OnFailure,
            Some("always") => RestartPolicy::Always,
            _ => RestartPolicy::No,
        };
    }
    if let Some(n) = f.get("command") {
        if n.as_scalar().is_some() {
            cx.err_hint(
                &n.loc,
                &fj("command"),
                format!("expected a list of strings, found {}", n.describe()),
                "write the command as a list, e.g. [\"/bin/sh\", \"-c\", \"echo hi\"]",
            );
        } else if let Some(c) = cx.str_list(n, &fj("command")) {
            if c.is_empty() {
                cx.err(&n.loc, &fj("command"), "command must not be an empty list");
            } else {
                m.command = Some(c);
            }
        }
    }
    // Templates, then the domain's cloud_init, then the machine's (deep merge).
    let own = f
        .entry("cloud_init")
        .and_then(|e| cloud_init_level(cx, &e.value, &fj("cloud_init"), true));
    if own.is_some() || cx.domain_ci.is_some() {
        let levels = [cx.domain_ci.as_ref(), own.as_ref()];
        match crate::cloudinit::effective(&cx.ci_templates, &levels) {
            Ok(v) => m.cloud_init = v,
            Err(err) => cx.err(&e.key_loc, &fj("cloud_init"), err.to_string()),
        }
    }
    if let Some(n) = f.get("mounts") {
        m.mounts = mounts(cx, n, &fj("mounts"));
    }
    vm_settings(cx, &mut m, &f, &field);
    if let Some(n) = f.get("target") {
        m.target = cx.name_string(n, &fj("target"));
    }
    if let Some(n) = f.get("template") {
        m.template = cx.boolean(n, &fj("template")).unwrap_or(false);
    }
    if let Some(n) = f.get("incus") {
        let field = fj("incus");
        let ff = cx.fields(n, &field, "in incus", keys::INCUS_MACHINE);
        if let Some(i) = ff.get("instance") {
            if let Some(name) = incus_name(cx, i, &join(&field, "instance"), 63) {
                cx.incus_instances.insert(full_name.clone(), name);
            }
        }
    }
    if !name_ok {
        return None;
    }
    Some(m)
}

/// `kernel`, `accel`, `firmware`, `display`, `usb`: VM settings, refused on
/// machine types they do not apply to.
fn vm_settings(cx: &mut Cx, m: &mut Machine, f: &Fields, field: &str) {
    let fj = |k: &str| join(field, k);
    let applies = |k: &str| match k {
        "firmware" | "display" => m.kind == MachineType::Vm,
        _ => m.kind != MachineType::Container,
    };
    for k in ["kernel", "accel", "firmware", "display", "usb"] {
        if let Some(e) = f.entry(k) {
            if !applies(k) {
                let kinds = if matches!(k, "firmware" | "display") {
                    "type: vm"
                } else {
                    "type: vm and type: microvm"
                };
                cx.err_hint(
                    &e.key_loc,
                    &fj(k),
                    format!(
                        "'{k}' applies only to {kinds}, not to a {}",
                        m.kind.as_str()
                    ),
                    format!("remove '{k}', or set the machine's type"),
                );
            }
        }
    }
    if let Some(n) = f.get("kernel") {
        m.kernel = cx.string(n, &fj("kernel")).filter(|k| k != "auto");
    }
    if let Some(n) = f.get("accel") {
        m.accel = match cx.choice(n, &fj("accel"), &["auto", "kvm", "tcg"]) {
            Some("kvm") => Accel::Kvm,
            Some("tcg") => Accel::Tcg,
            _ => Accel::Auto,
        };
    }
    if let Some(n) = f.get("firmware") {
        m.firmware = match cx.choice(n, &fj("firmware"), &["bios", "uefi"]) {
            Some("uefi") => Firmware::Uefi,
            _ => Firmware::Bios,
        };
    }
    if let Some(n) = f.get("display") {
        m.display = match cx.choice(n, &fj("display"), &["none", "spice"]) {
            Some("spice") => Display::Spice,
            _ => Display::None,
        };
    }
    if let Some(n) = f.get("usb") {
        let Some(seq) = n.as_seq() else {
            cx.err_hint(
                &n.loc,
                &fj("usb"),
                format!("expected a list of devices, found {}", n.describe()),
                "write usb: [{vendor: \"046d\", product: \"c52b\"}] (ids from lsusb)",
            );
            return;
        };
        for (i, dev) in seq.iter().enumerate() {
            let df = format!("{}[{i}]", fj("usb"));
            let g = cx.fields(dev, &df, "in a usb device", keys::USB);
            let id = |cx: &mut Cx, k: &str| -> Option<String> {
                let Some(v) = g.get(k) else {
                    cx.err_hint(
                        &dev.loc,
                        &df,
                        format!("missing '{k}'"),
                        "give both vendor and product, 4 hex digits each (see lsusb)",
                    );
                    return None;
                };
                let s = cx.string(v, &join(&df, k))?;
                let t = s.trim().trim_start_matches("0x").to_ascii_lowercase();
                if t.len() == 4 && t.chars().all(|c| c.is_ascii_hexdigit()) {
                    Some(t)
                } else {
                    cx.err_hint(
                        &v.loc,
                        &join(&df, k),
                        format!("invalid USB id '{}'", shorten(&s)),
                        "write 4 hex digits, e.g. 046d (see lsusb)",
                    );
                    None
                }
            };
            let vendor = id(cx, "vendor");
            let product = id(cx, "product");
            if let (Some(vendor), Some(product)) = (vendor, product) {
                m.usb.push(UsbDevice { vendor, product });
            }
        }
    }
}

/// An Incus object name: letters, digits, `-`, `_`, `.`; at most `max` characters.
fn incus_name(cx: &mut Cx, node: &Node, field: &str, max: usize) -> Option<String> {
    let s = cx.name_string(node, field)?;
    let bad = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
    if s.len() > max || bad.is_some() || s.starts_with(['-', '.']) {
        cx.err_hint(
            &node.loc,
            field,
            format!("invalid Incus name '{}'", shorten(&s)),
            format!(
                "use at most {max} letters, digits, '-', '_' or '.', not starting with '-' or '.'"
            ),
        );
        return None;
    }
    Some(s)
}

/// An Incus image alias (`/` allowed, as in `debian/12`).
fn incus_name_slash(cx: &mut Cx, node: &Node, field: &str) -> Option<String> {
    let s = cx.name_string(node, field)?;
    if s.chars().any(|c| c.is_whitespace() || c == ':') {
        cx.err_hint(
            &node.loc,
            field,
            format!("invalid Incus image alias '{}'", shorten(&s)),
            "name an image alias present on the Incus server (`incus image alias list`)",
        );
        return None;
    }
    Some(s)
}

/// `incus: {project, network, gateway}` in a domain: existing Incus objects it
/// stands for. `gateway` must lie in the domain's `subnet:`.
fn incus_adopt(
    cx: &mut Cx,
    node: &Node,
    field: &str,
    subnet: Option<Ipv4Net>,
) -> Option<IncusAdopt> {
    let f = cx.fields(node, field, "in incus", keys::INCUS_DOMAIN);
    let mut a = IncusAdopt::default();
    if let Some(n) = f.get("project") {
        a.project = incus_name(cx, n, &join(field, "project"), 63);
    }
    if let Some(n) = f.get("network") {
        // The network is a bridge: a Linux interface name.
        a.network = incus_name(
            cx,
            n,
            &join(field, "network"),
            crate::naming::MAX_IFNAME_LEN,
        );
    }
    if let Some(n) = f.get("gateway") {
        let gf = join(field, "gateway");
        if let Some(s) = cx.string(n, &gf) {
            match (s.trim().parse::<Ipv4Addr>(), subnet) {
                (Ok(ip), Some(net))
                    if net.contains(&ip) && ip != net.network() && ip != net.broadcast() =>
                {
                    a.gateway = Some(ip)
                }
                (Ok(_), Some(net)) => cx.err_hint(
                    &n.loc,
                    &gf,
                    format!("gateway {s} is not a usable address of the domain's subnet {net}"),
                    "give the Incus network's own address (its ipv4.address without the prefix)",
                ),
                (Ok(_), None) => cx.err_hint(
                    &n.loc,
                    &gf,
                    "incus.gateway needs the domain's `subnet:`",
                    "add subnet: (the Incus network's ipv4.address with host bits cleared)",
                ),
                (Err(_), _) => cx.err_hint(
                    &n.loc,
                    &gf,
                    format!("invalid address '{}'", shorten(&s)),
                    "write it like 10.9.8.1",
                ),
            }
        }
    }
    Some(a)
}

/// `incus:` connection settings; relative paths resolve against the project folder.
fn incus(cx: &mut Cx, node: &Node, dir: &Path) -> IncusConfig {
    let f = cx.fields(node, "incus", "in incus", keys::INCUS);
    let mut c = IncusConfig::default();
    let path = |cx: &mut Cx, k: &str| {
        f.get(k)
            .and_then(|n| cx.string(n, &join("incus", k)))
            .map(|p| dir.join(p))
    };
    c.socket = path(cx, "socket");
    c.client_cert = path(cx, "client_cert");
    c.client_key = path(cx, "client_key");
    c.server_cert = path(cx, "server_cert");
    if let Some(n) = f.get("url") {
        if let Some(u) = cx.string(n, "incus.url") {
            if u.starts_with("https://") {
                c.url = Some(u);
            } else {
                cx.err_hint(
                    &n.loc,
                    "incus.url",
                    format!(
                        "invalid Incus URL '{}': only https:// is supported",
                        shorten(&u)
                    ),
                    "write https://HOST:8443, or remove url to use the local Unix socket",
                );
            }
        }
    }
    if c.url.is_some() && (c.client_cert.is_none() || c.client_key.is_none()) {
        cx.err_hint(
            &node.loc,
            "incus",
            "a remote Incus server needs client_cert and client_key",
            "generate a pair (incus remote generate-certificate) and add the certificate to the server's trust store",
        );
    }
    c
}

/// Incus `limits.cpu` / `limits.memory` also set `cpus` / `memory`.
fn config_limits(cx: &mut Cx, m: &mut Machine, node: &Node, field: &str) {
    let loc_of = |k: &str| {
        node.as_map()
            .and_then(|es| es.iter().find(|e| e.key == k))
            .map_or(node.loc.clone(), |e| e.value.loc.clone())
    };
    if let Some(v) = m.config.get("limits.cpu").cloned() {
        let loc = loc_of("limits.cpu");
        let f = join(field, "limits.cpu");
        match v.trim().parse::<u32>() {
            Ok(0) => cx.err(&loc, &f, "limits.cpu must be at least 1"),
            Ok(n) => match m.cpus {
                Some(c) if c != n => cx.err(
                    &loc,
                    &f,
                    format!("limits.cpu {n} disagrees with cpus: {c}; set one of them"),
                ),
                _ => m.cpus = Some(n),
            },
            Err(_) => cx.warn(
                &loc,
                &f,
                format!(
                    "limits.cpu '{}' is not a CPU count: not mapped onto cpus",
                    shorten(&v)
                ),
                Some("CPU pinning sets are not supported; write a count, e.g. \"2\"".into()),
            ),
        }
    }
    if let Some(v) = m.config.get("limits.memory").cloned() {
        let loc = loc_of("limits.memory");
        let f = join(field, "limits.memory");
        match parse_size(&v) {
            Ok(0) => cx.err(&loc, &f, "limits.memory must be greater than 0"),
            Ok(n) => match m.memory {
                Some(c) if c != n => cx.err(
                    &loc,
                    &f,
                    format!(
                        "limits.memory {v} disagrees with memory: ({c} bytes); set one of them"
                    ),
                ),
                _ => m.memory = Some(n),
            },
            Err(e) => cx.warn(
                &loc,
                &f,
                format!("{e}: not mapped onto memory"),
                Some("write a size, e.g. \"4GiB\"".into()),
            ),
        }
    }
}

fn mounts(cx: &mut Cx, node: &Node, field: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    let Some(seq) = node.as_seq() else {
        cx.err(
            &node.loc,
            field,
            format!("expected a list of mounts, found {}", node.describe()),
        );
        return out;
    };
    for (i, n) in seq.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let mount = if let Some(s) = n.as_scalar() {
            let parts: Vec<&str> = s.text.split(':').collect();
            let (source, target, opt) = match parts.as_slice() {
                [a, b] => (*a, *b, None),
                [a, b, o] => (*a, *b, Some(*o)),
                _ => {
                    cx.err_hint(
                        &n.loc,
                        &f,
                        format!("invalid mount '{}'", shorten(&s.text)),
                        "write \"/host/path:/path/in/machine\" or \"/host/path:/path/in/machine:ro\"",
                    );
                    continue;
                }
            };
            let readonly = match opt {
                None | Some("rw") => false,
                Some("ro") => true,
                Some(o) => {
                    cx.err(
                        &n.loc,
                        &f,
                        format!(
                            "invalid mount option '{}': valid options are ro, rw",
                            shorten(o)
                        ),
                    );
                    continue;
                }
            };
            Mount {
                source: source.to_string(),
                target: target.to_string(),
                readonly,
            }
        } else {
            let mf = cx.fields(n, &f, "in mount", keys::MOUNT);
            if n.as_map().is_none() {
                continue;
            }
            let source = mf
                .get("source")
                .and_then(|x| cx.name_string(x, &join(&f, "source")));
            let target = mf
                .get("target")
                .and_then(|x| cx.name_string(x, &join(&f, "target")));
            let readonly = mf
                .get("readonly")
                .and_then(|x| cx.boolean(x, &join(&f, "readonly")))
                .unwrap_or(false);
            match (source, target) {
                (Some(source), Some(target)) => Mount {
                    source,
                    target,
                    readonly,
                },
                (s, t) => {
                    let missing = if s.is_none() { "source" } else { "target" };
                    if mf.get(missing).is_none() {
                        cx.err(&n.loc, &f, format!("mount is missing '{missing}'"));
                    }
                    if s.is_none() && t.is_none() && mf.get("target").is_none() {
                        cx.err(&n.loc, &f, "mount is missing 'target'");
                    }
                    continue;
                }
            }
        };
        if mount.source.is_empty() {
            cx.err(&n.loc, &f, "mount source must not be empty");
            continue;
        }
        if !mount.target.starts_with('/') {
            cx.err_hint(
                &n.loc,
                &f,
                format!(
                    "mount target '{}' must be an absolute path",
                    shorten(&mount.target)
                ),
                "targets are paths inside the machine, starting with /",
            );
            continue;
        }
        out.push(mount);
    }
    out
}

/// Every machine's full name must be unique and differ from every domain name
/// (policies name both the same way).
fn unique_names(cx: &mut Cx, domains: &BTreeMap<String, Domain>) {
    let mut seen: BTreeMap<&str, &Machine> = BTreeMap::new();
    let mut all: Vec<&Machine> = domains.values().flat_map(|d| d.machines.values()).collect();
    all.sort_by(|a, b| a.loc.cmp(&b.loc));
    for m in all {
        let loc = m.loc.clone().unwrap_or_else(|| Loc::new("", 1, 1));
        let field = format!("domains.{}.machines.{}", m.domain, m.name);
        if let Some(first) = seen.get(m.full_name.as_str()) {
            let at = first
                .loc
                .as_ref()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default();
            cx.err_hint(
                &loc,
                &field,
                format!(
                    "full name '{}' is also the full name of machine '{}' in domain '{}'{at}",
                    m.full_name, first.name, first.domain
                ),
                "full names (<domain>-<machine>) must be unique: rename one of the machines",
            );
            continue;
        }
        if domains.contains_key(&m.full_name) {
            cx.err_hint(
                &loc,
                &field,
                format!("full name '{}' is also the name of a domain", m.full_name),
                "policies could not tell them apart: rename the machine or the domain",
            );
        }
        seen.insert(&m.full_name, m);
    }
}

fn policy_list<'a>(cx: &mut Cx, node: &'a Node, out: &mut Vec<RawPolicy<'a>>) {
    let Some(seq) = node.as_seq() else {
        cx.err(
            &node.loc,
            "policies",
            format!("expected a list of policies, found {}", node.describe()),
        );
        return;
    };
    for n in seq {
        let field = format!("policies[{}]", out.len());
        out.push(RawPolicy { node: n, field });
    }
}

fn policy(cx: &mut Cx, rp: &RawPolicy, domains: &BTreeMap<String, Domain>) -> Option<Policy> {
    let node = rp.node;
    let field = rp.field.as_str();
    if node.as_map().is_none() {
        cx.err(
            &node.loc,
            field,
            format!(
                "expected a policy (a map with from, to, ports), found {}",
                node.describe()
            ),
        );
        return None;
    }
    let f = cx.fields(node, field, &format!("in {field}"), keys::POLICY);
    let fj = |k: &str| join(field, k);
    let protocol = match f
        .get("protocol")
        .map(|n| cx.choice(n, &fj("protocol"), &["tcp", "udp", "icmp"]))
    {
        Some(Some("udp")) => Some(Protocol::Udp),
        Some(Some("icmp")) => Some(Protocol::Icmp),
        Some(None) => None,
        _ => Some(Protocol::Tcp),
    };
    let ports = match (f.get("ports"), protocol) {
        (None, Some(Protocol::Icmp)) => Some(Ports::All),
        (None, _) => {
            cx.err_hint(
                &node.loc,
                field,
                "policy is missing 'ports'",
                "list the ports, e.g. ports: [22, 443], or write ports: all",
            );
            None
        }
        (Some(n), proto) => {
            let p = ports(cx, n, &fj("ports"));
            if proto == Some(Protocol::Icmp) && matches!(p, Some(Ports::List(_))) {
                cx.err_hint(
                    &n.loc,
                    &fj("ports"),
                    "icmp has no ports",
                    "write ports: all or leave ports out",
                );
                None
            } else {
                p
            }
        }
    };
    let bidirectional = f
        .get("bidirectional")
        .and_then(|n| cx.boolean(n, &fj("bidirectional")))
        .unwrap_or(false);
    let description = f
        .get("description")
        .and_then(|n| cx.string(n, &fj("description")))
        .unwrap_or_default();

    let mut ends = Vec::new();
    let mut disabled = Vec::new();
    for k in ["from", "to"] {
        let Some(n) = f.get(k) else {
            cx.err_hint(
                &node.loc,
                field,
                format!("policy is missing '{k}'"),
                "name a domain, a machine's full name (<domain>-<machine>), or host",
            );
            ends.push(None);
            continue;
        };
        let Some(name) = cx.name_string(n, &fj(k)) else {
            ends.push(None);
            continue;
        };
        ends.push(endpoint(cx, &name, n, &fj(k), domains, &mut disabled).map(|e| (e, name, n)));
    }
    let (Some(Some((from, fname, _))), Some(Some((to, tname, tnode)))) =
        (ends.first(), ends.get(1))
    else {
        return None;
    };
    if fname == tname {
        cx.err_hint(
            &tnode.loc,
            &fj("to"),
            format!("from and to are both '{fname}'"),
            "a policy opens a flow between two different endpoints; traffic inside a domain is already allowed",
        );
        return None;
    }
    let (ports, protocol) = (ports?, protocol?);
    if let Some(dname) = disabled.first() {
        cx.warn(
            &node.loc,
            field,
            format!("policy names disabled domain '{dname}': ignored until the domain is enabled"),
            None,
        );
        return None;
    }
    Some(Policy {
        from: from.clone(),
        to: to.clone(),
        ports,
        protocol,
        bidirectional,
        description,
        loc: Some(node.loc.clone()),
    })
}

fn endpoint(
    cx: &mut Cx,
    name: &str,
    node: &Node,
    field: &str,
    domains: &BTreeMap<String, Domain>,
    disabled: &mut Vec<String>,
) -> Option<Endpoint> {
    if name == "host" {
        return Some(Endpoint::Host);
    }
    if let Some(d) = domains.get(name) {
        if !d.enabled {
            disabled.push(d.name.clone());
        }
        return Some(Endpoint::Domain(name.to_string()));
    }
    for d in domains.values() {
        if d.machines.values().any(|m| m.full_name == name) {
            if !d.enabled {
                disabled.push(d.name.clone());
            }
            return Some(Endpoint::Machine(name.to_string()));
        }
    }
    let names: BTreeSet<&str> = domains
        .values()
        .flat_map(|d| {
            std::iter::once(d.name.as_str())
                .chain(d.machines.values().map(|m| m.full_name.as_str()))
        })
        .chain(["host"])
        .collect();
    let sugg = suggest::suffix(name, names.iter().copied());
    cx.err_hint(
        &node.loc,
        field,
        format!(
            "'{}' is not a domain, a machine or host{sugg}",
            shorten(name)
        ),
        "name a domain, a machine's full name (<domain>-<machine>), or host",
    );
    None
}

fn ports(cx: &mut Cx, node: &Node, field: &str) -> Option<Ports> {
    if let Some(s) = node.as_scalar() {
        return match s.typed() {
            Typed::Str("all") => Some(Ports::All),
            Typed::Int(_) => port(cx, node, field).map(|p| Ports::List(vec![p])),
            _ => {
                cx.err_hint(
                    &node.loc,
                    field,
                    format!(
                        "expected a list of ports or \"all\", found {}",
                        node.describe()
                    ),
                    "write e.g. ports: [22, 443] or ports: all",
                );
                None
            }
        };
    }
    let Some(seq) = node.as_seq() else {
        cx.err(
            &node.loc,
            field,
            format!(
                "expected a list of ports or \"all\", found {}",
                node.describe()
            ),
        );
        return None;
    };
    if seq.is_empty() {
        cx.err_hint(
            &node.loc,
            field,
            "empty ports list: the policy would open nothing",
            "list ports, or write ports: all",
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (i, n) in seq.iter().enumerate() {
        match port(cx, n, &format!("{field}[{i}]")) {
            Some(p) => out.push(p),
            None => ok = false,
        }
    }
    ok.then_some(Ports::List(out))
}

fn port(cx: &mut Cx, node: &Node, field: &str) -> Option<u16> {
    match node.as_scalar().map(|s| s.typed()) {
        Some(Typed::Int(v)) if (1..=65535).contains(&v) => u16::try_from(v).ok(),
        Some(Typed::Int(v)) => {
            cx.err(
                &node.loc,
                field,
                format!("port {v} is out of range: ports are 1 to 65535"),
            );
            None
        }
        _ => {
            cx.err(
                &node.loc,
                field,
                format!(
                    "expected a port number (1 to 65535), found {}",
                    node.describe()
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4GB"), Ok(4_000_000_000));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2 KiB"), Ok(2048));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size(".").is_err());
        assert!(parse_size("1.2.3G").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }

    #[test]
    fn builtins() {
        assert_eq!(
            builtin_image("debian/13"),
            Some(ImageSource::Debian {
                suite: "13".into(),
                packages: vec![]
            })
        );
        assert_eq!(
            builtin_image("oci:alpine:3"),
            Some(ImageSource::Oci {
                reference: "alpine:3".into()
            })
        );
        assert_eq!(builtin_image("debian/"), None);
        assert_eq!(builtin_image("alpine/3.20"), None);
    }
}
