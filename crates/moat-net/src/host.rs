//! Acting on the host: bridges, veth pairs, the nftables tables, ip_forward.
//!
//! Everything goes through `ip`, `nft`, `nsenter` and `sysctl` run by an
//! [`Executor`], so each host change is one logged command (and unit tests
//! use the recording fake). Commands are idempotent where the kernel allows;
//! `ensure_*` read the host first and only change what differs.

use crate::render::{count_elements, delete_script, update_script, Ruleset, HASH_COMMENT_PREFIX};
use crate::NetError;
use ipnet::Ipv4Net;
use moat_core::model::{ResolvedNetwork, ResolvedNic};
use moat_core::naming;
use moat_core::observed::ObservedNetwork;
use moat_host::exec::{Cmd, Executor, Output};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The network namespace a machine's NIC goes into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsTarget {
    /// Any process in the namespace (its `/proc/PID/ns/net`).
    Pid(u32),
    /// A namespace file: `/proc/PID/ns/net` or `/run/netns/NAME`.
    Path(PathBuf),
}

impl NetnsTarget {
    /// The namespace file.
    pub fn path(&self) -> String {
        match self {
            NetnsTarget::Pid(p) => format!("/proc/{p}/ns/net"),
            NetnsTarget::Path(p) => p.display().to_string(),
        }
    }
}

/// What [`NetHost::update_ruleset`] did.
#[derive(Debug, Clone, Copy)]
pub struct Updated {
    pub applied: Applied,
    /// Only set elements changed (no table replaced).
    pub in_place: bool,
}

/// What [`NetHost::apply_ruleset`] changed besides the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// `net.ipv4.ip_forward` before the apply (it is on afterwards).
    pub previous_ip_forward: bool,
}

/// Host networking of moat, over an executor.
#[derive(Clone, Debug)]
pub struct NetHost<E: Executor> {
    exec: E,
}

impl<E: Executor> NetHost<E> {
    pub fn new(exec: E) -> NetHost<E> {
        NetHost { exec }
    }

    pub fn executor(&self) -> &E {
        &self.exec
    }

    fn run(&self, what: &str, cmd: Cmd) -> Result<Output, NetError> {
        self.exec.run(&cmd).map_err(|source| NetError::Command {
            what: what.to_string(),
            source,
        })
    }

    fn json(&self, what: &str, cmd: Cmd) -> Result<Value, NetError> {
        let out = self.run(what, cmd)?;
        if out.stdout.trim().is_empty() {
            return Ok(Value::Array(Vec::new()));
        }
        serde_json::from_str(&out.stdout).map_err(|e| NetError::Parse {
            what: what.to_string(),
            detail: e.to_string(),
        })
    }

    fn sysctl_set(&self, what: &str, key: &str, value: &str) -> Result<(), NetError> {
        self.run(
            what,
            Cmd::new("sysctl").args(["-q", "-w", &format!("{key}={value}")]),
        )?;
        Ok(())
    }

    /// Addresses (`addr/prefix`) of a link, or `None` when the link is absent.
    fn link_addrs(&self, name: &str) -> Result<Option<(Vec<String>, Value)>, NetError> {
        let what = format!("reading link {name}");
        let out = self.run(
            &what,
            Cmd::new("ip")
                .args(["-j", "-d", "addr", "show", "dev", name])
                .allow_failure(),
        )?;
        if !out.success() {
            return Ok(None);
        }
        let v: Value = serde_json::from_str(&out.stdout).map_err(|e| NetError::Parse {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        let Some(link) = v.as_array().and_then(|a| a.first()).cloned() else {
            return Ok(None);
        };
        Ok(Some((inet_addrs(&link), link)))
    }

    /// Create or repair a domain bridge: present, IPv6 off, exactly the
    /// gateway address, alias `alias` (ownership mark), up. Returns the
    /// changes made (empty when nothing drifted).
    pub fn ensure_bridge(
        &self,
        net: &ResolvedNetwork,
        alias: &str,
    ) -> Result<Vec<String>, NetError> {
        let br = &net.bridge;
        let what = format!("ensuring bridge {br} of domain {}", net.domain);
        let mut changes = Vec::new();
        let existing = self.link_addrs(br)?;
        let (addrs, link) = match existing {
            Some((a, l)) => {
                let kind = l
                    .pointer("/linkinfo/info_kind")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if kind != "bridge" {
                    return Err(NetError::Conflict {
                        name: br.clone(),
                        detail: format!("exists but is a `{kind}` link, not a bridge; remove it (`ip link del {br}`) and apply again"),
                    });
                }
                (a, l)
            }
            None => {
                self.run(
                    &what,
                    Cmd::new("ip").args(["link", "add", br, "type", "bridge"]),
                )?;
                changes.push(format!("created bridge {br}"));
                (Vec::new(), Value::Null)
            }
        };
        self.sysctl_set(&what, &format!("net.ipv6.conf.{br}.disable_ipv6"), "1")?;
        let want = format!("{}/{}", net.gateway, net.subnet.prefix_len());
        for a in addrs.iter().filter(|a| **a != want) {
            self.run(&what, Cmd::new("ip").args(["addr", "del", a, "dev", br]))?;
            changes.push(format!("removed stray address {a} from {br}"));
        }
        if !addrs.contains(&want) {
            self.run(
                &what,
                Cmd::new("ip").args(["addr", "add", &want, "dev", br]),
            )?;
            changes.push(format!("set address {want} on {br}"));
        }
        let cur_alias = link.get("ifalias").and_then(Value::as_str).unwrap_or("");
        let is_up = link
            .get("flags")
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|x| x == "UP"));
        if cur_alias != alias || !is_up {
            self.run(
                &what,
                Cmd::new("ip").args(["link", "set", "dev", br, "alias", alias, "up"]),
            )?;
            if !link.is_null() {
                changes.push(format!("set alias/up on {br}"));
            }
        }
        Ok(changes)
    }

    /// Delete a bridge (and so detach its ports). Absent is fine.
    pub fn delete_bridge(&self, bridge: &str) -> Result<(), NetError> {
        self.del_link(bridge)
    }

    fn del_link(&self, name: &str) -> Result<(), NetError> {
        let out = self.run(
            &format!("deleting link {name}"),
            Cmd::new("ip")
                .args(["link", "del", "dev", name])
                .allow_failure(),
        )?;
        // Gone already is fine: a dead machine's interface also goes away
        // on its own, when the kernel tears down its network namespace in
        // the background (between a failed add and this delete, say).
        if out.success()
            || out.stderr.contains("Cannot find device")
            || out.stderr.contains("No such device")
            || out.stderr.contains("does not exist")
        {
            Ok(())
        } else {
            Err(NetError::Command {
                what: format!("deleting link {name}"),
                source: moat_host::exec::HostError::Failed {
                    argv: format!("ip link del dev {name}"),
                    status: out.status,
                    stderr: out.stderr.trim().to_string(),
                },
            })
        }
    }

    /// Run `add` (which creates link `name`); when `name` already exists
    /// (left by a machine that died), delete it and run `add` again. Trying
    /// first saves an `ip link del` on every attach.
    fn add_link(&self, what: &str, name: &str, add: Cmd) -> Result<(), NetError> {
        let out = self.run(what, add.clone().allow_failure())?;
        if out.success() {
            return Ok(());
        }
        let exists =
            out.stderr.contains("File exists") || out.stderr.contains("Device or resource busy");
        if !exists {
            return Err(NetError::Command {
                what: what.to_string(),
                source: moat_host::exec::HostError::Failed {
                    argv: add.display(),
                    status: out.status,
                    stderr: out.stderr.trim().to_string(),
                },
            });
        }
        self.del_link(name)?;
        self.run(what, add)?;
        Ok(())
    }

    /// A new host interface `hif` becomes a port of `bridge`: IPv6 off
    /// first (no link-local address, no IPv6 stack on it), then the
    /// ownership alias, the bridge and up.
    fn enslave(&self, what: &str, hif: &str, alias: &str, bridge: &str) -> Result<(), NetError> {
        self.sysctl_set(what, &format!("net.ipv6.conf.{hif}.disable_ipv6"), "1")?;
        self.run(
            what,
            Cmd::new("ip").args([
                "link", "set", "dev", hif, "alias", alias, "master", bridge, "up",
            ]),
        )?;
        Ok(())
    }

    /// Give a machine its NIC: a veth pair whose host side `nic.host_if`
    /// (alias `alias`, IPv6 off) is a port of `net.bridge`, and whose other
    /// side is created directly inside `netns` as `eth0` with the machine's
    /// MAC, address, a default route via the gateway, and `lo` up.
    /// An existing host interface of that name is replaced.
    pub fn attach(
        &self,
        nic: &ResolvedNic,
        net: &ResolvedNetwork,
        alias: &str,
        netns: &NetnsTarget,
    ) -> Result<(), NetError> {
        let hif = &nic.host_if;
        let what = format!(
            "attaching machine {} ({hif}) to {}",
            nic.machine, net.bridge
        );
        let ns = netns.path();
        let mac = naming::mac_string(&nic.mac);
        self.add_link(
            &what,
            hif,
            // One queue each, as veth ends up with anyway: left to the
            // default (one per CPU), the kernel then cuts both ends down to
            // one, and each cut waits for an RCU grace period (1-10 ms here).
            Cmd::new("ip").args([
                "link",
                "add",
                hif,
                "numtxqueues",
                "1",
                "numrxqueues",
                "1",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "numtxqueues",
                "1",
                "numrxqueues",
                "1",
                "address",
                &mac,
                "netns",
                &ns,
            ]),
        )?;
        self.enslave(&what, hif, alias, &net.bridge)?;
        let inside = format!(
            "addr add {}/{} dev eth0\nlink set dev eth0 up\nlink set dev lo up\nroute replace default via {} dev eth0\n",
            nic.ip,
            net.subnet.prefix_len(),
            net.gateway
        );
        self.run(
            &what,
            Cmd::new("nsenter")
                .args([
                    format!("--net={ns}"),
                    "ip".into(),
                    "-batch".into(),
                    "-".into(),
                ])
                .stdin(inside),
        )?;
        Ok(())
    }

    /// Give a VM its NIC: a tap device `nic.host_if` (alias `alias`, IPv6
    /// off) as a port of `net.bridge`. The VM monitor opens it by name and
    /// sets the guest MAC (`nic.mac`, which the bridge rules expect) on its
    /// virtio-net device; the guest configures its address (static or DHCP).
    /// An existing interface of that name is replaced.
    pub fn attach_tap(
        &self,
        nic: &ResolvedNic,
        net: &ResolvedNetwork,
        alias: &str,
    ) -> Result<(), NetError> {
        let hif = &nic.host_if;
        let what = format!("attaching VM {} ({hif}) to {}", nic.machine, net.bridge);
        self.add_link(
            &what,
            hif,
            Cmd::new("ip").args(["tuntap", "add", "dev", hif, "mode", "tap"]),
        )?;
        self.enslave(&what, hif, alias, &net.bridge)?;
        Ok(())
    }

    /// Machine ports of this root (`mv<tag>-*`) and the bridge each is
    /// enslaved to (`None` when detached from any bridge).
    pub fn ports(&self, root_tag: &str) -> Result<BTreeMap<String, Option<String>>, NetError> {
        let links = self.json("listing links", Cmd::new("ip").args(["-j", "link", "show"]))?;
        let mv = naming::host_if_name(root_tag, 0);
        let mv = mv.trim_end_matches('0');
        Ok(links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| {
                let name = l.get("ifname")?.as_str()?;
                let name = name.split('@').next().unwrap_or(name);
                name.starts_with(mv).then(|| {
                    let master = l.get("master").and_then(Value::as_str).map(str::to_string);
                    (name.to_string(), master)
                })
            })
            .collect())
    }

    /// Remove a machine's NIC (deleting the host side removes both ends).
    pub fn detach(&self, host_if: &str) -> Result<(), NetError> {
        self.del_link(host_if)
    }

    /// Replace moat's tables with `rs` in one `nft -f` transaction, then turn
    /// `net.ipv4.ip_forward` on (policies between domains and egress are routed).
    pub fn apply_ruleset(&self, rs: &Ruleset) -> Result<Applied, NetError> {
        self.run(
            &format!("applying nftables table {}", rs.table),
            Cmd::new("nft").args(["-f", "-"]).stdin(rs.script()),
        )?;
        let previous_ip_forward = self.set_ip_forward(true)?;
        Ok(Applied {
            previous_ip_forward,
        })
    }

    /// Bring the tables from `old_body` (the ruleset applied last, when
    /// known) to `rs`: in place when only machine ports differ (see
    /// [`update_script`]), else by replacing both tables as
    /// [`Self::apply_ruleset`] does. The in-place transaction refuses to run
    /// unless the live tables are `old_body`'s, so a stale `old_body` only
    /// costs the full replacement.
    pub fn update_ruleset(
        &self,
        old_body: Option<&str>,
        rs: &Ruleset,
    ) -> Result<Updated, NetError> {
        if let Some(script) = old_body.and_then(|o| update_script(o, rs)) {
            let out = self.run(
                &format!("updating nftables table {}", rs.table),
                Cmd::new("nft")
                    .args(["-f", "-"])
                    .stdin(script)
                    .allow_failure(),
            )?;
            if out.success() {
                let previous_ip_forward = self.set_ip_forward(true)?;
                return Ok(Updated {
                    applied: Applied {
                        previous_ip_forward,
                    },
                    in_place: true,
                });
            }
            // Refused: the live tables are not `old_body`'s (edited by hand,
            // or an apply ended before recording what it applied).
        }
        Ok(Updated {
            applied: self.apply_ruleset(rs)?,
            in_place: false,
        })
    }

    /// Remove both tables of a root (absent is fine).
    pub fn remove_ruleset(&self, root_tag: &str) -> Result<(), NetError> {
        self.run(
            &format!("removing nftables table {}", naming::nft_table(root_tag)),
            Cmd::new("nft")
                .args(["-f", "-"])
                .stdin(delete_script(root_tag)),
        )?;
        Ok(())
    }

    /// Current `net.ipv4.ip_forward`.
    pub fn ip_forward(&self) -> Result<bool, NetError> {
        let out = self.run(
            "reading net.ipv4.ip_forward",
            Cmd::new("sysctl").args(["-n", "net.ipv4.ip_forward"]),
        )?;
        Ok(out.stdout.trim() == "1")
    }

    /// Set `net.ipv4.ip_forward`; returns the previous value.
    pub fn set_ip_forward(&self, on: bool) -> Result<bool, NetError> {
        let prev = self.ip_forward()?;
        if prev != on {
            self.sysctl_set(
                "setting net.ipv4.ip_forward",
                "net.ipv4.ip_forward",
                if on { "1" } else { "0" },
            )?;
        }
        Ok(prev)
    }

    /// Bridges of this root (by domain name, from the `mt<tag>-` prefix and a
    /// `moat:` alias) and the hash of the applied ruleset (`None` when the
    /// table is absent). Re-read from the host on every call.
    pub fn observe(
        &self,
        root_tag: &str,
    ) -> Result<(BTreeMap<String, ObservedNetwork>, Option<String>), NetError> {
        let prefix = naming::bridge_name(root_tag, "");
        let links = self.json(
            "listing bridges",
            Cmd::new("ip").args(["-j", "-d", "addr", "show", "type", "bridge"]),
        )?;
        let mut nets = BTreeMap::new();
        for l in links.as_array().into_iter().flatten() {
            let name = l.get("ifname").and_then(Value::as_str).unwrap_or("");
            let alias = l.get("ifalias").and_then(Value::as_str).unwrap_or("");
            let Some(domain) = name.strip_prefix(&prefix) else {
                continue;
            };
            if !alias.starts_with("moat:") {
                continue;
            }
            let subnet = inet_addrs(l)
                .first()
                .and_then(|a| a.parse::<Ipv4Net>().ok())
                .map(|n| n.trunc());
            let up = l
                .get("flags")
                .and_then(Value::as_array)
                .is_some_and(|f| f.iter().any(|x| x == "UP"));
            nets.insert(
                domain.to_string(),
                ObservedNetwork {
                    domain: domain.to_string(),
                    bridge: name.to_string(),
                    subnet,
                    up,
                },
            );
        }
        Ok((nets, self.firewall_hash(root_tag)?))
    }

    /// Hash stored in the comment of this root's inet table.
    pub fn firewall_hash(&self, root_tag: &str) -> Result<Option<String>, NetError> {
        let t = naming::nft_table(root_tag);
        let out = self.run(
            &format!("reading nftables table {t}"),
            Cmd::new("nft")
                .args(["list", "table", "inet", &t])
                .allow_failure(),
        )?;
        if !out.success() {
            return Ok(None);
        }
        // The `state` element's comment (or, from older versions, the
        // table's): `moat HASH RULES`. Read from the text form.
        let marker = format!("comment \"{HASH_COMMENT_PREFIX}");
        let comment = out
            .stdout
            .lines()
            .find_map(|l| l.split_once(&marker).map(|(_, c)| c))
            .and_then(|c| c.split('"').next())
            .map(str::to_string);
        let Some(comment) = comment else {
            return Ok(Some("unknown".into()));
        };
        let (hash, expected) = comment.split_once(' ').unwrap_or((comment.as_str(), ""));
        // Rules added or deleted by hand leave the comment alone: count them.
        let bridge = self.run(
            &format!("reading nftables table {t}"),
            Cmd::new("nft")
                .args(["list", "table", "bridge", &t])
                .allow_failure(),
        )?;
        let live = count_rules(&out.stdout) + count_rules(&bridge.stdout);
        let (rules, elements) = expected.split_once(' ').unwrap_or((expected, ""));
        if !bridge.success() || rules.parse::<usize>().ok() != Some(live) {
            return Ok(Some(format!("drifted ({live} rules, {rules} expected)")));
        }
        // Elements added or deleted by hand (a port let through, say): only
        // tables that record their count (since 2026-11-22).
        if let Ok(want) = elements.parse::<usize>() {
            let live = count_elements(&out.stdout) + count_elements(&bridge.stdout);
            if live != want {
                return Ok(Some(format!(
                    "drifted ({live} set elements, {want} expected)"
                )));
            }
        }
        Ok(Some(hash.to_string()))
    }

    /// Packet counters of the rules that have a comment, as `(chain, comment, packets)`.
    pub fn counters(&self, root_tag: &str) -> Result<Vec<(String, String, u64)>, NetError> {
        let t = naming::nft_table(root_tag);
        let mut out = Vec::new();
        for fam in ["inet", "bridge"] {
            let r = self.run(
                &format!("reading nftables table {t}"),
                Cmd::new("nft")
                    .args(["-j", "list", "table", fam, &t])
                    .allow_failure(),
            )?;
            if !r.success() {
                continue;
            }
            let v: Value = serde_json::from_str(&r.stdout).map_err(|e| NetError::Parse {
                what: format!("nftables table {fam} {t}"),
                detail: e.to_string(),
            })?;
            for o in v
                .get("nftables")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(rule) = o.get("rule") else { continue };
                let Some(comment) = rule.get("comment").and_then(Value::as_str) else {
                    continue;
                };
                let chain = rule.get("chain").and_then(Value::as_str).unwrap_or("");
                let packets = rule
                    .get("expr")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find_map(|e| e.pointer("/counter/packets").and_then(Value::as_u64))
                    .unwrap_or(0);
                out.push((format!("{fam}/{chain}"), comment.to_string(), packets));
            }
        }
        Ok(out)
    }

    /// Remove every link and table of a root: bridges `mt<tag>-*`, machine
    /// interfaces `mv<tag>-*`, both nftables tables. For `destroy --all` and tests.
    pub fn cleanup_root(&self, root_tag: &str) -> Result<(), NetError> {
        let links = self.json("listing links", Cmd::new("ip").args(["-j", "link", "show"]))?;
        let br = naming::bridge_name(root_tag, "");
        let mv = naming::host_if_name(root_tag, 0);
        let mv = mv.trim_end_matches('0');
        let mut names: Vec<String> = links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.get("ifname").and_then(Value::as_str))
            .filter(|n| n.starts_with(&br) || n.starts_with(mv))
            .map(str::to_string)
            .collect();
        // Machine interfaces first, bridges last.
        names.sort_by_key(|n| n.starts_with(&br));
        for n in names {
            self.del_link(&n)?;
        }
        self.remove_ruleset(root_tag)
    }
}

/// Rules in an `nft list table` text listing (lines inside chains).
fn count_rules(listing: &str) -> usize {
    let mut in_chain = false;
    let mut n = 0;
    for l in listing.lines().map(str::trim) {
        if l.starts_with("chain ") {
            in_chain = true;
        } else if l == "}" {
            in_chain = false;
        } else if in_chain && !l.is_empty() && !l.starts_with("type ") {
            n += 1;
        }
    }
    n
}

/// `addr/prefix` of every IPv4 address in an `ip -j addr` link object.
fn inet_addrs(link: &Value) -> Vec<String> {
    link.get("addr_info")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|a| a.get("family").and_then(Value::as_str) == Some("inet"))
        .filter_map(|a| {
            let ip: Ipv4Addr = a.get("local")?.as_str()?.parse().ok()?;
            let p = a.get("prefixlen")?.as_u64()?;
            Some(format!("{ip}/{p}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{self, DomainSpec};
    use moat_host::exec::RecordingExecutor;

    fn project() -> moat_core::model::Resolved {
        fixture::resolved("/unit", 200, &[DomainSpec::new("a", &["m1"])], vec![])
    }

    #[test]
    fn deleting_a_link_that_went_meanwhile_is_fine() {
        // `ip link del` fails with `stderr`: the result of a detach.
        let detach = |stderr: &str| {
            let ex = RecordingExecutor::new();
            ex.push_reply_for(
                "link del",
                Output {
                    status: 2,
                    stdout: String::new(),
                    stderr: stderr.into(),
                },
            );
            NetHost::new(&ex).detach("mvabc-5")
        };
        // The kernel removed the interface between the failed add that
        // found it and this delete.
        detach("RTNETLINK answers: No such device").unwrap();
        assert!(detach("RTNETLINK answers: Operation not permitted").is_err());
    }

    #[test]
    fn ensure_bridge_creates_a_missing_bridge() {
        let r = project();
        let ex = RecordingExecutor::new();
        ex.push_reply_for(
            "addr show",
            Output {
                status: 1,
                stdout: String::new(),
                stderr: "Device does not exist".into(),
            },
        );
        let host = NetHost::new(&ex);
        let changes = host.ensure_bridge(&r.networks["a"], "moat:/unit").unwrap();
        let br = &r.networks["a"].bridge;
        assert_eq!(
            ex.lines(),
            vec![
                format!("ip -j -d addr show dev {br}"),
                format!("ip link add {br} type bridge"),
                format!("sysctl -q -w net.ipv6.conf.{br}.disable_ipv6=1"),
                format!("ip addr add 10.200.0.254/24 dev {br}"),
                format!("ip link set dev {br} alias moat:/unit up"),
            ]
        );
        assert_eq!(changes.len(), 2);
    }

    #[test]
    fn ensure_bridge_fixes_drift_and_is_quiet_when_right() {
        let r = project();
        let br = r.networks["a"].bridge.clone();
        let link = |addrs: &str| {
            format!(
                r#"[{{"ifname":"{br}","flags":["BROADCAST","UP"],"ifalias":"moat:/unit","linkinfo":{{"info_kind":"bridge"}},"addr_info":[{addrs}]}}]"#
            )
        };
        let ex = RecordingExecutor::new();
        ex.push_reply_for(
            "addr show",
            Output::ok(link(
                r#"{"family":"inet","local":"10.200.0.9","prefixlen":24}"#,
            )),
        );
        let host = NetHost::new(&ex);
        let changes = host.ensure_bridge(&r.networks["a"], "moat:/unit").unwrap();
        assert_eq!(
            changes,
            vec![
                format!("removed stray address 10.200.0.9/24 from {br}"),
                format!("set address 10.200.0.254/24 on {br}"),
            ]
        );
        let ex = RecordingExecutor::new();
        ex.push_reply_for(
            "addr show",
            Output::ok(link(
                r#"{"family":"inet","local":"10.200.0.254","prefixlen":24}"#,
            )),
        );
        let host = NetHost::new(&ex);
        assert!(host
            .ensure_bridge(&r.networks["a"], "moat:/unit")
            .unwrap()
            .is_empty());
        // Only the read and the (idempotent) sysctl ran.
        assert_eq!(ex.calls().len(), 2);
    }

    #[test]
    fn ensure_bridge_refuses_a_foreign_link() {
        let r = project();
        let ex = RecordingExecutor::new();
        ex.push_reply_for(
            "addr show",
            Output::ok(r#"[{"ifname":"x","linkinfo":{"info_kind":"veth"}}]"#),
        );
        let err = NetHost::new(&ex)
            .ensure_bridge(&r.networks["a"], "moat:/unit")
            .unwrap_err();
        assert!(err.to_string().contains("not a bridge"), "{err}");
    }

    #[test]
    fn attach_creates_the_peer_inside_the_namespace() {
        let r = project();
        let nic = &r.nics["a-m1"];
        let ex = RecordingExecutor::new();
        NetHost::new(&ex)
            .attach(nic, &r.networks["a"], "moat:/unit", &NetnsTarget::Pid(42))
            .unwrap();
        let calls = ex.calls();
        let mac = naming::mac_string(&nic.mac);
        assert_eq!(
            calls[0].display(),
            format!(
                "ip link add {} numtxqueues 1 numrxqueues 1 type veth peer name eth0 numtxqueues 1 numrxqueues 1 address {mac} netns /proc/42/ns/net",
                nic.host_if
            )
        );
        let inside = calls.last().unwrap();
        assert_eq!(
            inside.display(),
            "nsenter --net=/proc/42/ns/net ip -batch -"
        );
        let script = String::from_utf8(inside.stdin.clone().unwrap()).unwrap();
        assert!(script.contains("addr add 10.200.0.1/24 dev eth0"));
        assert!(script.contains("route replace default via 10.200.0.254 dev eth0"));
    }

    #[test]
    fn attach_replaces_a_stale_host_interface() {
        let r = project();
        let nic = &r.nics["a-m1"];
        let ex = RecordingExecutor::new();
        ex.push_reply(Output {
            status: 2,
            stdout: String::new(),
            stderr: "RTNETLINK answers: File exists\n".into(),
        });
        NetHost::new(&ex)
            .attach(nic, &r.networks["a"], "moat:/unit", &NetnsTarget::Pid(42))
            .unwrap();
        let lines = ex.lines();
        assert!(lines[0].starts_with("ip link add"), "{lines:?}");
        assert_eq!(lines[1], format!("ip link del dev {}", nic.host_if));
        assert!(lines[2].starts_with("ip link add"), "{lines:?}");
        // Any other failure is reported, nothing deleted.
        let ex = RecordingExecutor::new();
        ex.push_reply(Output {
            status: 2,
            stdout: String::new(),
            stderr: "Error: argument \"netns\" is wrong\n".into(),
        });
        let err = NetHost::new(&ex)
            .attach(nic, &r.networks["a"], "moat:/unit", &NetnsTarget::Pid(42))
            .unwrap_err();
        assert!(err.to_string().contains("is wrong"), "{err}");
        assert_eq!(ex.lines().len(), 1);
    }

    #[test]
    fn apply_is_one_nft_transaction_then_ip_forward() {
        let r = project();
        let rs = crate::render(&r, crate::RenderOptions::default());
        let ex = RecordingExecutor::new();
        ex.push_reply_for("sysctl -n", Output::ok("0\n"));
        let applied = NetHost::new(&ex).apply_ruleset(&rs).unwrap();
        assert!(!applied.previous_ip_forward);
        let calls = ex.calls();
        assert_eq!(calls[0].display(), "nft -f -");
        assert_eq!(calls[0].stdin.as_deref(), Some(rs.script().as_bytes()));
        assert_eq!(calls.iter().filter(|c| c.program == "nft").count(), 1);
        assert_eq!(
            calls.last().unwrap().display(),
            "sysctl -q -w net.ipv4.ip_forward=1"
        );
    }

    #[test]
    fn observe_reads_bridges_and_hash() {
        let r = project();
        let br = r.networks["a"].bridge.clone();
        let ex = RecordingExecutor::new();
        ex.push_reply_for(
            "show type bridge",
            Output::ok(format!(
                r#"[{{"ifname":"{br}","flags":["UP"],"ifalias":"moat:/unit","addr_info":[{{"family":"inet","local":"10.200.0.254","prefixlen":24}}]}},{{"ifname":"docker0","addr_info":[]}}]"#
            )),
        );
        ex.push_reply_for(
            "list table",
            Output::ok("table inet moat_x {\n\tcomment \"moat abc123 2\"\n\tchain f {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\taccept\n\t}\n}\n"),
        );
        ex.push_reply_for(
            "list table",
            Output::ok("table bridge moat_x {\n\tchain p {\n\t\tdrop\n\t}\n}\n"),
        );
        let (nets, hash) = NetHost::new(&ex).observe(&r.root_tag).unwrap();
        assert_eq!(nets.len(), 1);
        assert_eq!(nets["a"].subnet, Some(r.networks["a"].subnet));
        assert!(nets["a"].up);
        assert_eq!(hash.as_deref(), Some("abc123"));
    }
}
