//! The firewall as a pure function of the resolved project.
//!
//! [`render`] turns a [`Resolved`] into a [`Ruleset`]: the text of two
//! nftables tables named `naming::nft_table(root_tag)`, one `inet` (routing:
//! forward, input, output, NAT) and one `bridge` (anti-spoofing on machine
//! ports). [`Ruleset::script`] wraps them in `add table; delete table; table
//! {..}` so one `nft -f` replaces both in a single transaction.
//!
//! Everything that grows with machines or domains lives in named sets and
//! maps (set elements are not rules); only policies add rules. See
//! docs/network.md for what each rule stops.

use ipnet::Ipv4Net;
use moat_core::model::{Egress, Endpoint, Policy, Ports, Protocol, Resolved};
use moat_core::naming;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::Ipv4Addr;

/// Rendering choices that are not part of the project.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenderOptions {
    /// Add `counter` to drop and policy rules (for `moat network status`).
    pub counters: bool,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions { counters: true }
    }
}

/// moat's nftables ruleset for one root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub root_tag: String,
    /// Name of both tables (`inet` and `bridge` families).
    pub table: String,
    /// The two table definitions, `nft -f` syntax, hash comment included.
    pub body: String,
    /// SHA-256 (hex) of the definitions; stored in the inet table's `state`
    /// set (see [`update_script`]) so
    /// [`crate::NetHost::observe`] can read it back.
    pub hash: String,
    /// Number of rules in all chains (set elements not counted).
    pub rule_count: usize,
    /// Number of set and map elements ([`count_elements`]).
    pub element_count: usize,
    /// Policies that were skipped, and why (unknown or disabled endpoints, ...).
    pub notes: Vec<String>,
}

impl Ruleset {
    /// One `nft -f` script replacing both tables atomically: the `add` makes
    /// the `delete` valid on a host without the tables, and the whole file is
    /// one transaction, so there is no moment without rules.
    pub fn script(&self) -> String {
        format!("{}{}", delete_script(&self.root_tag), self.body)
    }

    /// Size of [`Ruleset::script`] in bytes.
    pub fn bytes(&self) -> usize {
        self.script().len()
    }

    /// One line for `moat plan`: table, rules, bytes, short hash.
    pub fn summary(&self) -> String {
        format!(
            "nftables {}: {} rules, {} bytes, hash {}",
            self.table,
            self.rule_count,
            self.bytes(),
            &self.hash[..12.min(self.hash.len())]
        )
    }
}

/// `nft -f` script removing both tables of a root (succeeds when absent).
pub fn delete_script(root_tag: &str) -> String {
    let t = naming::nft_table(root_tag);
    format!(
        "add table inet {t}\ndelete table inet {t}\nadd table bridge {t}\ndelete table bridge {t}\n"
    )
}

/// Comment prefix of the inet table's `state` element, followed by the
/// ruleset hash and the number of rules in both tables.
pub const HASH_COMMENT_PREFIX: &str = "moat ";

/// Where the `state` set goes in the inet table; hashed in this form.
const STATE_PLACEHOLDER: &str = "\t@STATE@\n";

/// The bridge table's sets that hold one entry per machine port: the only
/// part of the ruleset [`update_script`] changes in place.
const PORT_SETS: [&str; 4] = ["ports", "ip_ok", "mac_ok", "dhcp_ok"];

/// The inet table's `state` set: one element whose key is the first 15 hex
/// digits of the ruleset hash (an `ifname` holds 15 characters) and whose
/// comment carries the whole hash and the rule count. Unlike a table
/// comment, an element can be replaced in a transaction, and deleting it by
/// its key fails unless the live ruleset is the one that key names.
fn state_set(hash: &str, rules: usize, elements: usize) -> String {
    format!(
        "\tset state {{\n\t\ttype ifname\n\t\telements = {{ \"{}\" comment \"{}\" }}\n\t}}\n",
        state_key(hash),
        state_comment(hash, rules, elements)
    )
}

/// `moat HASH RULES ELEMENTS`: what [`crate::NetHost::firewall_hash`] reads.
fn state_comment(hash: &str, rules: usize, elements: usize) -> String {
    format!("{HASH_COMMENT_PREFIX}{hash} {rules} {elements}")
}

/// Number of set and map elements in an nftables listing (moat's rendering
/// or `nft list table`), the `state` set left out: counted in the same way
/// on both sides, so an element added or deleted by hand shows as drift.
pub fn count_elements(listing: &str) -> usize {
    let mut n = 0;
    let mut set = "";
    let mut block: Option<String> = None;
    for l in listing.lines().map(str::trim) {
        if let Some(b) = block.as_mut() {
            b.push_str(l);
            b.push(' ');
        } else if let Some(name) = l.strip_prefix("set ").or_else(|| l.strip_prefix("map ")) {
            set = name.trim_end_matches(" {");
            continue;
        } else if let Some(rest) = l.strip_prefix("elements = {") {
            block = Some(format!("{rest} "));
        } else {
            continue;
        }
        let b = block.as_deref().unwrap_or_default();
        if let Some(inner) = b.trim_end().strip_suffix('}') {
            if set != "state" {
                n += inner.split(',').filter(|e| !e.trim().is_empty()).count();
            }
            block = None;
        }
    }
    n
}

fn state_key(hash: &str) -> &str {
    &hash[..15.min(hash.len())]
}

/// What an in-place update needs of a rendered body: its `state` key, its
/// per-port set elements, and everything else (which must not change).
struct Parts<'a> {
    key: Option<&'a str>,
    elements: BTreeMap<&'a str, std::collections::BTreeSet<&'a str>>,
    skeleton: Vec<&'a str>,
}

fn parts(body: &str) -> Parts<'_> {
    let mut p = Parts {
        key: None,
        elements: BTreeMap::new(),
        skeleton: Vec::new(),
    };
    let mut bridge = false;
    let mut set: Option<&str> = None;
    let mut in_elements = false;
    for line in body.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("table ") {
            bridge = rest.starts_with("bridge ");
        } else if let Some(name) = t.strip_prefix("set ") {
            set = Some(name.trim_end_matches(" {"));
        } else if t == "}" && !in_elements {
            set = None;
        }
        let port_set = set.filter(|s| bridge && PORT_SETS.contains(s));
        if let (Some(s), true) = (port_set, in_elements) {
            if t == "}" {
                in_elements = false;
            } else {
                p.elements
                    .entry(s)
                    .or_default()
                    .insert(t.trim_end_matches(','));
            }
            continue;
        }
        if port_set.is_some() && t == "elements = {" {
            in_elements = true;
            continue;
        }
        if !bridge && set == Some("state") && t.starts_with("elements = { \"") {
            p.key = t
                .strip_prefix("elements = { \"")
                .and_then(|r| r.split('"').next());
            continue;
        }
        p.skeleton.push(line);
    }
    p
}

/// One `nft -f` transaction turning the live ruleset `old_body` (what was
/// applied last) into `new` by changing only per-port set elements, or
/// `None` when more than those differs. It starts by deleting the `state`
/// element by its key, which fails (and so aborts the whole transaction)
/// unless the live ruleset is `old_body`'s; the caller then replaces the
/// tables. Adding or removing a machine this way changes no chain, so the
/// kernel registers no hook and waits for no RCU grace period: a few
/// milliseconds instead of about twenty.
pub fn update_script(old_body: &str, new: &Ruleset) -> Option<String> {
    let (o, n) = (parts(old_body), parts(&new.body));
    let key = o.key?;
    if o.skeleton != n.skeleton || n.key.is_none() {
        return None;
    }
    let t = &new.table;
    let mut s = format!(
        "delete element inet {t} state {{ \"{key}\" }}\nadd element inet {t} state {{ \"{}\" comment \"{}\" }}\n",
        state_key(&new.hash),
        state_comment(&new.hash, new.rule_count, new.element_count)
    );
    let empty = std::collections::BTreeSet::new();
    // Deletions first: a port whose MAC changed loses its old entries
    // before it gets the new ones.
    for (verb, gone) in [("delete", true), ("add", false)] {
        for set in PORT_SETS {
            let (before, after) = (
                o.elements.get(set).unwrap_or(&empty),
                n.elements.get(set).unwrap_or(&empty),
            );
            let (from, to) = if gone {
                (before, after)
            } else {
                (after, before)
            };
            let diff: Vec<&str> = from.difference(to).copied().collect();
            if !diff.is_empty() {
                let _ = writeln!(
                    s,
                    "{verb} element bridge {t} {set} {{ {} }}",
                    diff.join(", ")
                );
            }
        }
    }
    Some(s)
}

struct Net<'a> {
    bridge: &'a str,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    egress: Egress,
    dhcp: bool,
}

/// Where one end of a policy is: the host, or addresses behind a bridge.
#[derive(Clone)]
enum Side {
    Host,
    Net { bridge: String, addrs: Ipv4Net },
}

/// Render the ruleset of `resolved`. Pure and deterministic.
pub fn render(resolved: &Resolved, opts: RenderOptions) -> Ruleset {
    let tag = &resolved.root_tag;
    let table = naming::nft_table(tag);
    let counter = if opts.counters { "counter " } else { "" };
    let mut notes = Vec::new();

    let nets: Vec<Net> = resolved
        .networks
        .values()
        .map(|n| {
            let d = resolved.project.domains.get(&n.domain);
            Net {
                bridge: &n.bridge,
                subnet: n.subnet,
                gateway: n.gateway,
                egress: d.map(|d| d.egress).unwrap_or(Egress::None),
                dhcp: d.is_some_and(|d| d.dhcp),
            }
        })
        .collect();
    let bridge_of = |ip: Ipv4Addr| {
        nets.iter()
            .find(|n| n.subnet.contains(&ip))
            .map(|n| n.bridge)
    };

    let side = |e: &Endpoint| -> Result<Side, String> {
        match e {
            Endpoint::Host => Ok(Side::Host),
            Endpoint::Domain(d) => match resolved.networks.get(d) {
                Some(n) => Ok(Side::Net {
                    bridge: n.bridge.clone(),
                    addrs: n.subnet.trunc(),
                }),
                None => Err(format!("domain `{d}` has no network (unknown or disabled)")),
            },
            Endpoint::Machine(m) => {
                let nic = resolved
                    .nics
                    .get(m)
                    .ok_or_else(|| format!("machine `{m}` has no NIC on a domain network"))?;
                let bridge = bridge_of(nic.ip).ok_or_else(|| {
                    format!("machine `{m}` address {} is in no domain subnet", nic.ip)
                })?;
                Ok(Side::Net {
                    bridge: bridge.to_string(),
                    addrs: Ipv4Net::new(nic.ip, 32).unwrap_or_else(|_| Ipv4Net::default()),
                })
            }
        }
    };

    let mut forward = Vec::new();
    let mut input = Vec::new();
    let mut output = Vec::new();
    for (i, p) in resolved.project.policies.iter().enumerate() {
        let n = i + 1;
        let (from, to) = match (side(&p.from), side(&p.to)) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(e), _) | (_, Err(e)) => {
                notes.push(format!("policy {n} skipped: {e}"));
                continue;
            }
        };
        let Some(l4) = l4_match(p) else {
            notes.push(format!("policy {n} skipped: empty port list"));
            continue;
        };
        let mut dirs = vec![(from.clone(), to.clone())];
        if p.bidirectional {
            dirs.push((to, from));
        }
        for (f, t) in dirs {
            let c = format!("comment \"policy {n}\"");
            match (f, t) {
                (Side::Host, Side::Host) => {
                    notes.push(format!("policy {n}: host to host needs no rule"))
                }
                (
                    Side::Net {
                        bridge: fb,
                        addrs: fa,
                    },
                    Side::Net {
                        bridge: tb,
                        addrs: ta,
                    },
                ) => {
                    if fb == tb {
                        // Same bridge: already allowed by the intra-domain rule.
                        continue;
                    }
                    forward.push(format!(
                        "iifname \"{fb}\" ip saddr {fa} oifname \"{tb}\" ip daddr {ta} {l4}{counter}accept {c}"
                    ));
                }
                (Side::Net { bridge, addrs }, Side::Host) => {
                    input.push(format!(
                        "iifname \"{bridge}\" ip saddr {addrs} {l4}{counter}accept {c}"
                    ));
                }
                (Side::Host, Side::Net { bridge, addrs }) => {
                    output.push(format!(
                        "oifname \"{bridge}\" ip daddr {addrs} {l4}{counter}accept {c}"
                    ));
                }
            }
        }
    }

    let bridges: Vec<String> = nets.iter().map(|n| q(n.bridge)).collect();
    let intra: Vec<String> = nets
        .iter()
        .map(|n| format!("{} . {}", q(n.bridge), q(n.bridge)))
        .collect();
    let dns: Vec<String> = nets
        .iter()
        .map(|n| format!("{} . {}", q(n.bridge), n.gateway))
        .collect();
    let dhcp: Vec<String> = nets
        .iter()
        .filter(|n| n.dhcp)
        .map(|n| q(n.bridge))
        .collect();
    let nat: Vec<String> = nets
        .iter()
        .filter(|n| n.egress == Egress::Nat)
        .map(|n| n.subnet.trunc().to_string())
        .collect();
    let egress: Vec<String> = nets
        .iter()
        .map(|n| {
            let v = match n.egress {
                Egress::Nat => "accept",
                Egress::None => "drop",
            };
            format!("{} : {v}", q(n.bridge))
        })
        .collect();

    // Machine ports: (port, mac, ip, dhcp of its domain).
    let mut ports = Vec::new();
    for nic in resolved.nics.values() {
        let Some(net) = nets.iter().find(|n| n.subnet.contains(&nic.ip)) else {
            notes.push(format!(
                "NIC of `{}` ({}) is in no domain subnet: no port rules",
                nic.machine, nic.ip
            ));
            continue;
        };
        ports.push((
            nic.host_if.as_str(),
            naming::mac_string(&nic.mac),
            nic.ip,
            net.dhcp,
        ));
    }
    ports.sort();
    let port_names: Vec<String> = ports.iter().map(|p| q(p.0)).collect();
    let ip_ok: Vec<String> = ports
        .iter()
        .map(|p| format!("{} . {} . {}", q(p.0), p.1, p.2))
        .collect();
    let mac_ok: Vec<String> = ports
        .iter()
        .map(|p| format!("{} . {}", q(p.0), p.1))
        .collect();
    let dhcp_ok: Vec<String> = ports
        .iter()
        .filter(|p| p.3)
        .map(|p| format!("{} . {}", q(p.0), p.1))
        .collect();

    let port_glob = format!("{}*", naming::host_if_name(tag, 0).trim_end_matches('0'));
    let mut rules = 0usize;
    let mut b = String::new();
    let mut chain = |b: &mut String, name: &str, hook: &str, body: &[String]| {
        let _ = writeln!(b, "\tchain {name} {{\n\t\t{hook}");
        for r in body {
            let _ = writeln!(b, "\t\t{r}");
        }
        rules += body.len();
        b.push_str("\t}\n");
    };

    let _ = writeln!(b, "table inet {table} {{");
    b.push_str(STATE_PLACEHOLDER);
    set(&mut b, "bridges", "ifname", &[], &bridges);
    set(&mut b, "intra", "ifname . ifname", &[], &intra);
    set(&mut b, "dns", "ifname . ipv4_addr", &[], &dns);
    set(&mut b, "dhcp", "ifname", &[], &dhcp);
    set(&mut b, "nat", "ipv4_addr", &["interval"], &nat);
    map(&mut b, "egress", "ifname : verdict", &egress);

    let mut fwd = vec![
        "iifname != @bridges oifname != @bridges accept".to_string(),
        "ct state established,related accept".into(),
        "ct state invalid drop".into(),
        "iifname . oifname @intra accept".into(),
    ];
    fwd.extend(forward);
    fwd.push(format!(
        "iifname @bridges oifname @bridges {counter}drop comment \"between domains\""
    ));
    fwd.push("oifname != @bridges iifname vmap @egress".into());
    fwd.push(format!("{counter}drop comment \"into domains\""));
    chain(
        &mut b,
        "forward",
        "type filter hook forward priority filter; policy accept;",
        &fwd,
    );

    let mut inp = vec![
        "iifname != @bridges accept".to_string(),
        "ct state established,related accept".into(),
        "iifname @dhcp udp sport 68 udp dport 67 accept".into(),
        "iifname . ip daddr @dns meta l4proto { tcp, udp } th dport 53 accept".into(),
    ];
    inp.extend(input);
    inp.push(format!("{counter}drop comment \"to host\""));
    chain(
        &mut b,
        "input",
        "type filter hook input priority filter; policy accept;",
        &inp,
    );

    let mut out = vec![
        "oifname != @bridges accept".to_string(),
        "ct state established,related accept".into(),
        "oifname @dhcp udp sport 67 udp dport 68 accept".into(),
    ];
    out.extend(output);
    out.push(format!("{counter}drop comment \"from host\""));
    chain(
        &mut b,
        "output",
        "type filter hook output priority filter; policy accept;",
        &out,
    );

    chain(
        &mut b,
        "postrouting",
        "type nat hook postrouting priority srcnat; policy accept;",
        &["oifname != @bridges ip saddr @nat masquerade".to_string()],
    );
    b.push_str("}\n");

    let _ = writeln!(b, "table bridge {table} {{");
    set(&mut b, "ports", "ifname", &[], &port_names);
    set(
        &mut b,
        "ip_ok",
        "ifname . ether_addr . ipv4_addr",
        &[],
        &ip_ok,
    );
    set(&mut b, "mac_ok", "ifname . ether_addr", &[], &mac_ok);
    set(&mut b, "dhcp_ok", "ifname . ether_addr", &[], &dhcp_ok);
    let pre = vec![
        // Only this root's machine ports (named `mv<tag>-N`) are filtered;
        // `meta ibrname` would be more direct but needs CONFIG_NFT_BRIDGE_META.
        format!("iifname != \"{port_glob}\" accept"),
        format!("iifname != @ports {counter}drop comment \"unknown port\""),
        // Only the host's dnsmasq serves DHCP: no rogue server among machines.
        format!("ether type ip udp sport 67 udp dport 68 {counter}drop comment \"DHCP server on a machine\""),
        "ether type ip iifname . ether saddr . ip saddr @ip_ok accept".into(),
        "ether type arp iifname . ether saddr @mac_ok iifname . arp saddr ether . arp saddr ip @ip_ok accept"
            .into(),
        "ether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 iifname . ether saddr @dhcp_ok accept".into(),
        "ether type arp arp saddr ip 0.0.0.0 iifname . ether saddr @dhcp_ok iifname . arp saddr ether @dhcp_ok accept"
            .into(),
        format!("{counter}drop comment \"spoofed or not IPv4\""),
    ];
    chain(
        &mut b,
        "prerouting",
        "type filter hook prerouting priority filter; policy accept;",
        &pre,
    );
    b.push_str("}\n");

    let hash = hex::encode(Sha256::digest(b.as_bytes()));
    let element_count = count_elements(&b);
    let body = b.replace(STATE_PLACEHOLDER, &state_set(&hash, rules, element_count));
    Ruleset {
        root_tag: tag.clone(),
        table,
        body,
        hash,
        rule_count: rules,
        element_count,
        notes,
    }
}

/// The protocol/port part of a policy rule, ending with a space; `None` when
/// the policy can match nothing. `ports: all` opens every protocol (AnKLuMe:
/// full access), otherwise the protocol with its ports.
fn l4_match(p: &Policy) -> Option<String> {
    let proto = match p.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => return Some("meta l4proto icmp ".into()),
    };
    match &p.ports {
        Ports::All => Some(String::new()),
        Ports::List(l) if l.is_empty() => None,
        Ports::List(l) if l.len() == 1 => Some(format!("{proto} dport {} ", l[0])),
        Ports::List(l) => {
            let mut l = l.clone();
            l.sort_unstable();
            l.dedup();
            let l: Vec<String> = l.iter().map(u16::to_string).collect();
            Some(format!("{proto} dport {{ {} }} ", l.join(", ")))
        }
    }
}

fn q(s: &str) -> String {
    format!("\"{s}\"")
}

fn set(b: &mut String, name: &str, ty: &str, flags: &[&str], elems: &[String]) {
    let _ = writeln!(b, "\tset {name} {{\n\t\ttype {ty}");
    if !flags.is_empty() {
        let _ = writeln!(b, "\t\tflags {}", flags.join(", "));
    }
    elements(b, elems);
    b.push_str("\t}\n");
}

fn map(b: &mut String, name: &str, ty: &str, elems: &[String]) {
    let _ = writeln!(b, "\tmap {name} {{\n\t\ttype {ty}");
    elements(b, elems);
    b.push_str("\t}\n");
}

fn elements(b: &mut String, elems: &[String]) {
    if elems.is_empty() {
        return;
    }
    b.push_str("\t\telements = {\n");
    for (i, e) in elems.iter().enumerate() {
        let sep = if i + 1 < elems.len() { "," } else { "" };
        let _ = writeln!(b, "\t\t\t{e}{sep}");
    }
    b.push_str("\t\t}\n");
}

/// Rules per chain, for tests and status output.
pub fn rules_per_chain(rs: &Ruleset) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut family = "";
    for line in rs.body.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("table ") {
            family = if rest.starts_with("inet") {
                "inet"
            } else {
                "bridge"
            };
        } else if let Some(name) = t.strip_prefix("chain ") {
            let name = name.trim_end_matches(" {");
            current = Some(format!("{family}/{name}"));
            out.insert(format!("{family}/{name}"), 0);
        } else if t == "}" {
            current = None;
        } else if let Some(c) = &current {
            if !t.starts_with("type ") {
                *out.entry(c.clone()).or_default() += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{self, dom, mach, policy, DomainSpec};
    use moat_core::model::{Egress, Endpoint, Ports, Protocol};

    fn small() -> Resolved {
        let domains = [
            DomainSpec::new("a", &["m1", "m2"])
                .egress(Egress::Nat)
                .dhcp(true),
            DomainSpec::new("b", &["m1"]),
        ];
        let policies = vec![
            policy(
                dom("a"),
                dom("b"),
                Ports::List(vec![80, 22]),
                Protocol::Tcp,
                false,
            ),
            policy(mach("a-m1"), mach("b-m1"), Ports::All, Protocol::Tcp, true),
            policy(
                Endpoint::Host,
                dom("b"),
                Ports::List(vec![53]),
                Protocol::Udp,
                false,
            ),
            policy(
                dom("b"),
                Endpoint::Host,
                Ports::List(vec![]),
                Protocol::Icmp,
                false,
            ),
            policy(dom("a"), dom("nope"), Ports::All, Protocol::Tcp, false),
        ];
        fixture::resolved("/golden/root", 231, &domains, policies)
    }

    #[test]
    fn golden_small_project() {
        let rs = render(&small(), RenderOptions::default());
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata/small.nft");
        if std::env::var_os("MOAT_UPDATE_GOLDEN").is_some() {
            std::fs::write(path, rs.script()).unwrap();
        }
        let golden = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            rs.script(),
            golden,
            "rendered ruleset differs from {path}; set MOAT_UPDATE_GOLDEN=1 to update"
        );
        assert_eq!(
            rs.notes,
            vec!["policy 5 skipped: domain `nope` has no network (unknown or disabled)"]
        );
    }

    #[test]
    fn render_is_deterministic_and_hash_tracks_content() {
        let r = small();
        let a = render(&r, RenderOptions::default());
        assert_eq!(a, render(&r, RenderOptions::default()));
        let mut r2 = r.clone();
        r2.project.policies.pop();
        r2.project.policies.pop();
        let b = render(&r2, RenderOptions::default());
        assert_ne!(a.hash, b.hash);
        assert!(a.body.contains(&format!(
            "comment \"moat {} {} {}\"",
            a.hash, a.rule_count, a.element_count
        )));
        // small(): 2 bridges, 2 intra, 2 dns, 1 dhcp, 1 nat, 2 egress; 3
        // ports in ports, ip_ok, mac_ok and 2 of them in dhcp_ok.
        assert_eq!(a.element_count, 10 + 3 * 3 + 2);
        assert_eq!(count_elements("set x {\n elements = { a, b,\n c }\n}\nset state {\n elements = { \"k\" comment \"moat h 1 2\" }\n}\nmap m {\n elements = { \"a\" : drop }\n}\n"), 4);
        assert!(a.summary().contains("rules"));
    }

    #[test]
    fn machines_coming_and_going_update_in_place() {
        let with = |machines: &[&str], dhcp: bool| {
            // The last domain grows, so no other port is renumbered.
            let domains = [
                DomainSpec::new("a", &["m1"]),
                DomainSpec::new("b", machines).dhcp(dhcp),
            ];
            render(
                &fixture::resolved("/update/root", 233, &domains, vec![]),
                RenderOptions::default(),
            )
        };
        let (one, two) = (with(&["m1"], true), with(&["m1", "m2"], true));
        let up = update_script(&one.body, &two).expect("only ports differ");
        let t = &two.table;
        let lines: Vec<&str> = up.lines().collect();
        // The compare-and-swap comes first: the old key, then the new one.
        assert_eq!(
            lines[0],
            format!(
                "delete element inet {t} state {{ \"{}\" }}",
                &one.hash[..15]
            )
        );
        assert!(lines[1].contains(&format!(
            "\"{}\" comment \"moat {} ",
            &two.hash[..15],
            two.hash
        )));
        // m2's entries in the four port sets, nothing deleted.
        assert_eq!(lines.len(), 6, "{up}");
        for set in ["ports", "ip_ok", "mac_ok", "dhcp_ok"] {
            assert!(
                up.contains(&format!("add element bridge {t} {set} {{ \"")),
                "{set}: {up}"
            );
        }
        assert!(!up.contains("delete element bridge"));
        // Back again: the same entries deleted, nothing added.
        let down = update_script(&two.body, &one).expect("only ports differ");
        assert_eq!(down.matches("delete element bridge").count(), 4, "{down}");
        assert!(!down.contains("add element bridge"));
        // Unchanged: only the state element is swapped.
        assert_eq!(update_script(&two.body, &two).unwrap().lines().count(), 2);

        // Anything but ports (here: DHCP of a domain, a set of the inet
        // table) needs the tables replaced.
        assert_eq!(update_script(&one.body, &with(&["m1"], false)), None);
        // So does a policy.
        let mut r = fixture::resolved(
            "/update/root",
            233,
            &[
                DomainSpec::new("a", &["m1"]),
                DomainSpec::new("b", &["m1"]).dhcp(true),
            ],
            vec![policy(dom("a"), dom("b"), Ports::All, Protocol::Tcp, false)],
        );
        assert_eq!(
            update_script(&one.body, &render(&r, RenderOptions::default())),
            None
        );
        r.project.policies.clear();
        assert!(update_script(&one.body, &render(&r, RenderOptions::default())).is_some());
        // A body without a state element (older versions) cannot be swapped.
        let old = one.body.replace("set state", "set other");
        assert_eq!(update_script(&old, &two), None);
    }

    #[test]
    fn policies_map_to_hooks() {
        let rs = render(&small(), RenderOptions { counters: false });
        let b = &rs.body;
        // Domain to domain: forward, subnets, sorted ports.
        assert!(b.contains("iifname \"mt"), "{b}");
        assert!(b.contains("ip saddr 10.231.0.0/24 oifname"));
        assert!(
            b.contains("ip daddr 10.231.1.0/24 tcp dport { 22, 80 } accept comment \"policy 1\"")
        );
        // Machine level, all ports, both ways: /32 and no l4 match.
        assert!(b.contains("ip saddr 10.231.0.1/32 oifname"));
        assert!(b.contains("ip saddr 10.231.1.1/32 oifname"));
        // Host as source: output hook; host as destination: input hook.
        assert!(b.contains("ip daddr 10.231.1.0/24 udp dport 53 accept comment \"policy 3\""));
        assert!(b.contains("ip saddr 10.231.1.0/24 meta l4proto icmp accept comment \"policy 4\""));
        let per = rules_per_chain(&rs);
        assert_eq!(per["inet/forward"], 7 + 3);
        assert_eq!(per["inet/input"], 5 + 1);
        assert_eq!(per["inet/output"], 4 + 1);
        assert_eq!(per.values().sum::<usize>(), rs.rule_count);
    }

    fn sized(domains: usize, machines: usize, policies: usize) -> Ruleset {
        let names: Vec<String> = (0..machines).map(|i| format!("m{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let ds: Vec<DomainSpec> = (0..domains)
            .map(|i| DomainSpec::new(&format!("d{i}"), &names))
            .collect();
        let ps = (0..policies)
            .map(|i| {
                policy(
                    dom(&format!("d{}", i % domains)),
                    dom(&format!("d{}", (i + 1) % domains)),
                    Ports::List(vec![22]),
                    Protocol::Tcp,
                    false,
                )
            })
            .collect();
        render(
            &fixture::resolved("/size", 10, &ds, ps),
            RenderOptions::default(),
        )
    }

    #[test]
    fn size_grows_with_policies_not_machines() {
        let base = sized(10, 1, 0).rule_count;
        // Machines and domains only add set elements, never rules.
        assert_eq!(sized(10, 20, 0).rule_count, base);
        assert_eq!(sized(100, 20, 0).rule_count, base);
        // Each one-way policy between domains is one rule.
        assert_eq!(sized(10, 20, 20).rule_count, base + 20);
        assert_eq!(sized(100, 20, 200).rule_count, base + 200);
        let small = sized(10, 20, 20);
        let big = sized(100, 20, 200);
        eprintln!(
            "10 domains x 20 machines, 20 policies: {} rules, {} bytes",
            small.rule_count,
            small.bytes()
        );
        eprintln!(
            "100 domains x 20 machines, 200 policies: {} rules, {} bytes",
            big.rule_count,
            big.bytes()
        );
        // Bytes grow linearly (set elements), far from machines squared.
        assert!(big.bytes() < small.bytes() * 12);
    }

    #[test]
    fn showcase_policies_render() {
        let rs = render(
            &fixture::showcase("/showcase", 232),
            RenderOptions::default(),
        );
        assert!(rs.notes.is_empty(), "{:?}", rs.notes);
        let per = rules_per_chain(&rs);
        // 5 domain-level policies, pro<->perso counted twice; the two sandbox
        // machine-level policies stay inside one domain (already allowed).
        assert_eq!(per["inet/forward"], 7 + 7);
        assert_eq!(per["inet/output"], 4 + 1);
        assert!(rs.body.contains("tcp dport { 3000, 3210, 8089 }"));
        assert!(!rs.body.contains("udp dport 5353"));
    }

    /// The real AnKLuMe showcase through the loader and allocator.
    #[test]
    fn showcase_folder_renders_through_moat_core() {
        let dir = std::path::Path::new("/work/shared/reference/anklume-showcase");
        if !dir.exists() {
            eprintln!("SKIP: {} not present", dir.display());
            return;
        }
        let (allocated, _warnings) =
            moat_core::check(dir, &Default::default(), "/var/lib/moat").expect("showcase loads");
        let r = &allocated.resolved;
        let rs = render(r, RenderOptions::default());
        assert!(rs.notes.is_empty(), "{:?}", rs.notes);
        let pro = &r.networks["pro"];
        let ai = &r.networks["ai-tools"];
        let want = format!(
            "iifname \"{}\" ip saddr {} oifname \"{}\" ip daddr {} tcp dport {{ 8000, 11434 }}",
            pro.bridge,
            pro.subnet.trunc(),
            ai.bridge,
            ai.subnet.trunc()
        );
        assert!(rs.body.contains(&want), "missing {want}\n{}", rs.body);
        // gaming is disabled: no bridge for it.
        assert!(!rs.body.contains("-gaming\""));
        eprintln!("{}", rs.summary());
    }
}
