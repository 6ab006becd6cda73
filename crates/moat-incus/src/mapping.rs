//! The pure translation between moat's model and Incus objects: names, the
//! JSON bodies of networks, projects, profiles and instances, and the reading
//! of instances back into `ObservedMachine`. No I/O here.

use moat_core::model::{MachineType, NetworkMode, Profile};
use moat_core::observed::{Limits, MachineState, ObservedMachine, ObservedNetwork};
use moat_driver::{DomainNetwork, MachineSpec};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// `true` on every instance moat created; moat never touches one without it.
pub const MANAGED: &str = "user.moat.managed";
/// The spec hash recorded at create time.
pub const SPEC_HASH: &str = "user.moat.spec-hash";
/// The root tag, on projects and networks moat created.
pub const ROOT: &str = "user.moat.root";
/// The moat domain of a project or network.
pub const DOMAIN: &str = "user.moat.domain";
/// Storage pool used for root disks and persistent volumes.
pub const POOL: &str = "default";

/// Incus project of a domain: `moat-<tag>-<domain>` (at most 18 characters).
pub fn project_name(tag: &str, domain: &str) -> String {
    format!("{}{domain}", project_prefix(tag))
}

pub fn project_prefix(tag: &str) -> String {
    format!("moat-{tag}-")
}

/// Dynamic DHCP range of a domain: the free addresses between the highest
/// allocated machine address and the gateway, so no dynamic lease can take an
/// address moat allocated (now or, with the automatic `.1–.99` range, later).
/// Falls back to the largest free gap, then to the address below the gateway.
pub fn dhcp_range(net: &DomainNetwork) -> (Ipv4Addr, Ipv4Addr) {
    let first = u32::from(net.subnet.network()) + 1;
    let gw = u32::from(net.gateway);
    let mut used: Vec<u32> = net
        .addresses
        .iter()
        .map(|a| u32::from(*a))
        .filter(|a| *a >= first && *a < gw)
        .collect();
    used.sort_unstable();
    used.dedup();
    // Gaps (start, end) inclusive, in address order.
    let mut gaps = Vec::new();
    let mut next = first;
    for u in used.iter().copied().chain(std::iter::once(gw)) {
        if u > next {
            gaps.push((next, u - 1));
        }
        next = u + 1;
    }
    let top = gaps.last().copied().filter(|(_, e)| *e == gw - 1);
    let best = top
        .filter(|(s, e)| e - s >= 7)
        .or_else(|| gaps.iter().copied().max_by_key(|(s, e)| e - s))
        .unwrap_or((gw - 1, gw - 1));
    (Ipv4Addr::from(best.0), Ipv4Addr::from(best.1))
}

/// Config of a domain's bridge network.
pub fn network_config(tag: &str, net: &DomainNetwork) -> BTreeMap<String, String> {
    let (lo, hi) = dhcp_range(net);
    let mut c = BTreeMap::new();
    let s = |v: &str| v.to_string();
    c.insert(
        s("ipv4.address"),
        format!("{}/{}", net.gateway, net.subnet.prefix_len()),
    );
    c.insert(s("ipv4.nat"), s("false"));
    c.insert(s("ipv6.address"), s("none"));
    c.insert(s("ipv4.dhcp"), net.dhcp.to_string());
    c.insert(s("ipv4.dhcp.ranges"), format!("{lo}-{hi}"));
    // moat's nftables ruleset is the only firewall on the bridge.
    c.insert(s("ipv4.firewall"), s("false"));
    c.insert(s("raw.dnsmasq"), s("no-resolv"));
    c.insert(s(ROOT), tag.to_string());
    c.insert(s(DOMAIN), net.domain.clone());
    c
}

pub fn network_body(tag: &str, net: &DomainNetwork) -> Value {
    json!({
        "name": net.bridge,
        "type": "bridge",
        "description": format!("moat domain {}", net.domain),
        "config": network_config(tag, net),
    })
}

/// The uplink network an OVN network needs (`network:`), by the name
/// Incus's OVN documentation gives it. Not configurable yet.
pub const OVN_UPLINK: &str = "UPLINK";

/// What a domain's network is on a server ([`network_kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkKind {
    /// One Linux bridge (a standalone server); moat's nftables isolate it.
    Bridge,
    /// A cluster without OVN: the bridge exists on every member (created
    /// pending per member first), each member's copy a separate L2 segment.
    BridgePerMember,
    /// A cluster with OVN: one network across members, isolated by an Incus
    /// network ACL (moat's nftables do not see OVN traffic).
    Ovn,
}

/// The network a domain gets on a server with `members` cluster members
/// (0: not clustered) that can (`ovn`) or cannot run OVN networks.
pub fn network_kind(members: usize, ovn: bool) -> NetworkKind {
    match (members, ovn) {
        (0, _) => NetworkKind::Bridge,
        (1, _) | (_, false) => NetworkKind::BridgePerMember,
        _ => NetworkKind::Ovn,
    }
}

/// Name of the network ACL isolating a domain's OVN network.
pub fn ovn_acl_name(tag: &str, domain: &str) -> String {
    format!("moat-{tag}-{domain}")
}

/// The ACL of a domain's OVN network: traffic within the domain's subnet
/// (its machines and its gateway) is allowed; the network's default action
/// drops the rest, other domains and the uplink included. Cross-domain
/// `policies:` are not mapped to ACL rules (an OVN domain is closed).
pub fn ovn_acl_body(tag: &str, net: &DomainNetwork) -> Value {
    let subnet = net.subnet.trunc().to_string();
    json!({
        "name": ovn_acl_name(tag, &net.domain),
        "description": format!("moat domain {}: only its own subnet", net.domain),
        "ingress": [{"action": "allow", "source": subnet, "state": "enabled",
                     "description": "within the domain"}],
        "egress": [{"action": "allow", "destination": subnet, "state": "enabled",
                    "description": "within the domain"}],
        "config": { ROOT: tag, DOMAIN: net.domain },
    })
}

/// A domain's OVN network (same name, gateway and DHCP range as its bridge
/// would have), on `uplink`, closed by [`ovn_acl_body`].
pub fn ovn_network_body(tag: &str, net: &DomainNetwork, uplink: &str) -> Value {
    let mut c = network_config(tag, net);
    // Bridge-only keys.
    c.remove("ipv4.firewall");
    c.remove("raw.dnsmasq");
    c.insert("network".into(), uplink.into());
    c.insert("security.acls".into(), ovn_acl_name(tag, &net.domain));
    c.insert("security.acls.default.ingress.action".into(), "drop".into());
    c.insert("security.acls.default.egress.action".into(), "drop".into());
    json!({
        "name": net.bridge,
        "type": "ovn",
        "description": format!("moat domain {} (OVN, across cluster members)", net.domain),
        "config": c,
    })
}

pub fn project_body(tag: &str, domain: &str) -> Value {
    json!({
        "name": project_name(tag, domain),
        "description": format!("moat domain {domain}"),
        "config": {
            // Images come from the default project (imported once).
            "features.images": "false",
            "features.profiles": "true",
            "features.storage.volumes": "true",
            "features.networks": "false",
            ROOT: tag,
            DOMAIN: domain,
        },
    })
}

/// The project's `default` profile: root disk and eth0 on the domain bridge.
pub fn default_profile(bridge: &str) -> Value {
    json!({
        "description": "moat: root disk and the domain bridge",
        "config": {},
        "devices": {
            "root": {"type": "disk", "path": "/", "pool": POOL},
            "eth0": {"type": "nic", "network": bridge, "name": "eth0"},
        },
    })
}

pub fn profile_body(p: &Profile) -> Value {
    json!({
        "name": p.name,
        "description": "moat domain profile",
        "config": p.config,
        "devices": p.devices,
    })
}

/// Incus volume name of a machine's `persistent:` entry.
pub fn volume_name(machine: &str, name: &str) -> String {
    format!("{machine}-{name}")
}

/// The instance's own config: `config:` passed through, moat's limits,
/// privileges, the command, and moat's markers.
pub fn instance_config(spec: &MachineSpec) -> BTreeMap<String, String> {
    let m = &spec.machine;
    let mut c: BTreeMap<String, String> = m.config.clone();
    apply_limits(
        &mut c,
        &Limits {
            cpus: m.cpus,
            memory: m.memory,
            pids: m.pids,
        },
    );
    if m.privileged {
        c.insert("security.privileged".into(), "true".into());
    }
    if let Some(cmd) = &m.command {
        let mut raw = c.get("raw.lxc").cloned().unwrap_or_default();
        if !raw.is_empty() && !raw.ends_with('\n') {
            raw.push('\n');
        }
        raw.push_str(&format!("lxc.init.cmd = {}\n", cmd.join(" ")));
        c.insert("raw.lxc".into(), raw);
    }
    c.insert(MANAGED.into(), "true".into());
    c.insert(SPEC_HASH.into(), spec.spec_hash.clone());
    c
}

/// Writes moat's limits into an instance config (absent limits are removed).
pub fn apply_limits(c: &mut BTreeMap<String, String>, l: &Limits) {
    let wanted = [
        ("limits.cpu", l.cpus.map(|n| n.to_string())),
        ("limits.memory", l.memory.map(|n| format!("{n}B"))),
        ("limits.processes", l.pids.map(|n| n.to_string())),
    ];
    // An unset moat limit leaves a `config:` pass-through value alone.
    for (k, v) in wanted {
        if let Some(v) = v {
            c.insert(k.into(), v);
        }
    }
}

/// `512MiB`, `1GB`, `123B`, `123` → bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "MB" => 1000u64.pow(2),
        "GB" => 1000u64.pow(3),
        "TB" => 1000u64.pow(4),
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Devices of an instance: its NIC with moat's address, MAC and host-side name,
/// persistent volumes, bind mounts, GPU, root disk size.
pub fn instance_devices(spec: &MachineSpec) -> Result<Map<String, Value>, String> {
    let m = &spec.machine;
    let mut d = Map::new();
    match (m.network, &spec.nic, &spec.bridge) {
        (NetworkMode::Domain, Some(nic), Some(br)) => {
            d.insert(
                "eth0".into(),
                json!({
                    "type": "nic",
                    "network": br.name,
                    "name": "eth0",
                    "ipv4.address": nic.ip.to_string(),
                    "hwaddr": moat_core::naming::mac_string(&nic.mac),
                    "host_name": nic.host_if,
                }),
            );
        }
        (NetworkMode::Domain, _, _) => {}
        (NetworkMode::None, _, _) => {
            d.insert("eth0".into(), json!({"type": "none"}));
        }
        (NetworkMode::Host, _, _) => {
            return Err(
                "`network: host` is not possible with the incus driver; use the native driver"
                    .into(),
            )
        }
    }
    for (name, path) in &m.persistent {
        d.insert(
            format!("persistent-{name}"),
            json!({"type": "disk", "pool": POOL, "source": volume_name(&m.full_name, name), "path": path}),
        );
    }
    for (i, mt) in m.mounts.iter().enumerate() {
        let source = if mt.source.starts_with('/') {
            mt.source.clone()
        } else {
            m.loc
                .as_ref()
                .and_then(|l| {
                    std::path::Path::new(&*l.file)
                        .parent()
                        .map(|p| p.join(&mt.source))
                })
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|| mt.source.clone())
        };
        d.insert(
            format!("mount{i}"),
            json!({"type": "disk", "source": source, "path": mt.target, "readonly": mt.readonly.to_string()}),
        );
    }
    if m.gpu {
        d.insert("gpu".into(), json!({"type": "gpu"}));
    }
    if let Some(size) = m.disk {
        d.insert(
            "root".into(),
            json!({"type": "disk", "path": "/", "pool": POOL, "size": format!("{size}B")}),
        );
    }
    Ok(d)
}

pub fn instance_type(kind: MachineType) -> &'static str {
    match kind {
        MachineType::Container => "container",
        MachineType::Vm | MachineType::Microvm => "virtual-machine",
    }
}

/// The body of `POST /1.0/instances`.
pub fn instance_body(spec: &MachineSpec, image_alias: &str) -> Result<Value, String> {
    let m = &spec.machine;
    let mut profiles = vec!["default".to_string()];
    profiles.extend(m.profiles.iter().cloned());
    Ok(json!({
        "name": m.full_name,
        "type": instance_type(m.kind),
        "description": m.description,
        "source": {"type": "image", "alias": image_alias},
        "config": instance_config(spec),
        "devices": instance_devices(spec)?,
        "profiles": profiles,
        "ephemeral": false,
    }))
}

fn cfg<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v["config"][k].as_str()
}

/// Reads limits back from an instance's own config.
pub fn limits_of(inst: &Value) -> Limits {
    Limits {
        cpus: cfg(inst, "limits.cpu").and_then(|s| s.parse().ok()),
        memory: cfg(inst, "limits.memory").and_then(parse_bytes),
        pids: cfg(inst, "limits.processes").and_then(|s| s.parse().ok()),
    }
}

/// Whether moat created this instance.
pub fn is_managed(inst: &Value) -> bool {
    cfg(inst, MANAGED) == Some("true")
}

/// An instance moat created, as moat sees it; `None` for the others.
pub fn observe_instance(inst: &Value) -> Option<ObservedMachine> {
    if !is_managed(inst) {
        return None;
    }
    observe_as(inst, inst["name"].as_str()?)
}

/// An instance as machine `full_name` (moat's, or one the project adopts).
/// An adopted instance moat never created has no recorded spec hash: it is
/// reported empty, which the planner reads as "settings unknown, keep it".
pub fn observe_as(inst: &Value, full_name: &str) -> Option<ObservedMachine> {
    let state = match inst["status"].as_str().unwrap_or("") {
        "Running" => MachineState::Running,
        "Stopped" => MachineState::Stopped,
        other => MachineState::Crashed {
            reason: format!("Incus reports the instance as {other}"),
        },
    };
    Some(ObservedMachine {
        full_name: full_name.to_string(),
        driver: "incus".into(),
        state,
        spec_hash: cfg(inst, SPEC_HASH).unwrap_or("").to_string(),
        limits: limits_of(inst),
        adhoc: false,
    })
}

/// A domain network moat created, as moat sees it (`None` for other networks).
/// `up` is false when the bridge or the project wiring is not as moat left it.
pub fn observe_network(tag: &str, net: &Value, wired: bool) -> Option<ObservedNetwork> {
    if cfg(net, ROOT) != Some(tag) || !net["managed"].as_bool().unwrap_or(true) {
        return None;
    }
    let subnet = cfg(net, "ipv4.address")
        .and_then(|a| a.parse::<ipnet::Ipv4Net>().ok())
        .map(|n| n.trunc());
    Some(ObservedNetwork {
        domain: cfg(net, DOMAIN)?.to_string(),
        bridge: net["name"].as_str()?.to_string(),
        subnet,
        up: wired && net["status"].as_str().is_none_or(|s| s == "Created"),
    })
}

/// A network the project adopts (`incus: {network}` on a domain): up while it exists.
pub fn observe_adopted_network(domain: &str, net: &Value) -> ObservedNetwork {
    ObservedNetwork {
        domain: domain.to_string(),
        bridge: net["name"].as_str().unwrap_or("").to_string(),
        subnet: cfg(net, "ipv4.address")
            .and_then(|a| a.parse::<ipnet::Ipv4Net>().ok())
            .map(|n| n.trunc()),
        up: net["status"].as_str().is_none_or(|s| s == "Created"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::model::{Machine, ResolvedNic};
    use moat_driver::BridgeInfo;

    fn net(addrs: &[u8]) -> DomainNetwork {
        DomainNetwork {
            domain: "pro".into(),
            bridge: "mtabc-pro".into(),
            subnet: "10.100.20.0/24".parse().unwrap(),
            gateway: "10.100.20.254".parse().unwrap(),
            dhcp: true,
            addresses: addrs
                .iter()
                .map(|a| Ipv4Addr::new(10, 100, 20, *a))
                .collect(),
            profiles: Default::default(),
        }
    }

    #[test]
    fn dhcp_range_avoids_allocations() {
        let r = dhcp_range(&net(&[1, 2, 99]));
        assert_eq!(
            r,
            (
                "10.100.20.100".parse().unwrap(),
                "10.100.20.253".parse().unwrap()
            )
        );
        // An explicit address near the top: the range starts above it.
        let r = dhcp_range(&net(&[1, 250]));
        assert_eq!(r.0, "10.100.20.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(r.1, "10.100.20.249".parse::<Ipv4Addr>().unwrap());
        let r = dhcp_range(&net(&[]));
        assert_eq!(r.0, "10.100.20.1".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn network_kind_by_cluster_and_ovn() {
        assert_eq!(network_kind(0, false), NetworkKind::Bridge);
        assert_eq!(network_kind(0, true), NetworkKind::Bridge);
        assert_eq!(network_kind(1, true), NetworkKind::BridgePerMember);
        assert_eq!(network_kind(3, false), NetworkKind::BridgePerMember);
        assert_eq!(network_kind(3, true), NetworkKind::Ovn);
    }

    #[test]
    fn ovn_network_is_closed_by_its_acl() {
        let n = net(&[1]);
        let b = ovn_network_body("abc", &n, OVN_UPLINK);
        assert_eq!(b["type"], "ovn");
        assert_eq!(b["name"], n.bridge.as_str());
        let c = &b["config"];
        assert_eq!(c["network"], "UPLINK");
        assert_eq!(c["ipv4.address"], "10.100.20.254/24");
        assert_eq!(c["ipv4.nat"], "false");
        assert_eq!(c["security.acls"], "moat-abc-pro");
        assert_eq!(c["security.acls.default.ingress.action"], "drop");
        assert_eq!(c["security.acls.default.egress.action"], "drop");
        assert!(c.get("ipv4.firewall").is_none() && c.get("raw.dnsmasq").is_none());
        let a = ovn_acl_body("abc", &n);
        assert_eq!(a["name"], "moat-abc-pro");
        assert_eq!(a["ingress"][0]["source"], "10.100.20.0/24");
        assert_eq!(a["egress"][0]["destination"], "10.100.20.0/24");
        assert_eq!(a["ingress"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn network_config_is_moat_shaped() {
        let c = network_config("abc", &net(&[1]));
        assert_eq!(c["ipv4.address"], "10.100.20.254/24");
        assert_eq!(c["ipv4.nat"], "false");
        assert_eq!(c["ipv6.address"], "none");
        assert_eq!(c["raw.dnsmasq"], "no-resolv");
        assert_eq!(c["ipv4.dhcp.ranges"], "10.100.20.2-10.100.20.253");
    }

    fn spec() -> MachineSpec {
        let mut m = Machine::adhoc("pro-web", "busybox");
        m.domain = "pro".into();
        m.driver = "incus".into();
        m.network = NetworkMode::Domain;
        m.cpus = Some(2);
        m.memory = Some(256 << 20);
        m.pids = Some(100);
        m.gpu = true;
        m.config.insert("security.nesting".into(), "true".into());
        m.persistent.insert("data".into(), "/srv/data".into());
        MachineSpec {
            machine: m,
            nic: Some(ResolvedNic {
                machine: "pro-web".into(),
                ip: "10.100.20.1".parse().unwrap(),
                mac: [2, 0x6d, 1, 2, 3, 4],
                host_if: "mvabc-1".into(),
            }),
            bridge: Some(BridgeInfo {
                name: "mtabc-pro".into(),
                gateway: "10.100.20.254".parse().unwrap(),
                prefix_len: 24,
            }),
            spec_hash: "h1".into(),
            hosts: vec![],
        }
    }

    #[test]
    fn instance_carries_address_limits_and_markers() {
        let b = instance_body(&spec(), "busybox").unwrap();
        assert_eq!(b["devices"]["eth0"]["ipv4.address"], "10.100.20.1");
        assert_eq!(b["devices"]["eth0"]["host_name"], "mvabc-1");
        assert_eq!(b["devices"]["eth0"]["hwaddr"], "02:6d:01:02:03:04");
        assert_eq!(b["devices"]["gpu"]["type"], "gpu");
        assert_eq!(b["devices"]["persistent-data"]["source"], "pro-web-data");
        assert_eq!(b["config"]["limits.cpu"], "2");
        assert_eq!(b["config"]["limits.memory"], "268435456B");
        assert_eq!(b["config"]["limits.processes"], "100");
        assert_eq!(b["config"]["security.nesting"], "true");
        assert_eq!(b["config"][MANAGED], "true");
        assert_eq!(b["config"][SPEC_HASH], "h1");
        let mut inst = b.clone();
        inst["status"] = json!("Running");
        let o = observe_instance(&inst).unwrap();
        assert_eq!(o.limits.memory, Some(256 << 20));
        assert_eq!(o.limits.cpus, Some(2));
        assert_eq!(o.state, MachineState::Running);
        inst["config"][MANAGED] = json!("false");
        assert!(observe_instance(&inst).is_none());
    }

    #[test]
    fn bytes() {
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("1GB"), Some(1_000_000_000));
        assert_eq!(parse_bytes("42"), Some(42));
        assert_eq!(parse_bytes("x"), None);
    }
}
