//! Hand-built [`Resolved`] projects for tests and benchmarks of this crate
//! (and of crates that attach machines before the loader/allocator are used).
//!
//! Domain `i` (in the order given) gets subnet `10.<octet>.<i>.0/24`, gateway
//! `.254`; its machines get `.1`, `.2`, ... Names of host resources come from
//! `naming` with the root tag of `root`, so two roots never collide.

use ipnet::Ipv4Net;
use moat_core::model::*;
use moat_core::naming;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// One domain of a fixture.
#[derive(Clone, Debug)]
pub struct DomainSpec {
    pub name: String,
    pub machines: Vec<String>,
    pub egress: Egress,
    pub dhcp: bool,
    pub trust_level: TrustLevel,
}

impl DomainSpec {
    /// A domain with `egress: none` (tests must not open a way out) and no DHCP.
    pub fn new(name: &str, machines: &[&str]) -> DomainSpec {
        DomainSpec {
            name: name.into(),
            machines: machines.iter().map(|m| m.to_string()).collect(),
            egress: Egress::None,
            dhcp: false,
            trust_level: TrustLevel::SemiTrusted,
        }
    }

    pub fn egress(mut self, e: Egress) -> DomainSpec {
        self.egress = e;
        self
    }

    pub fn dhcp(mut self, on: bool) -> DomainSpec {
        self.dhcp = on;
        self
    }
}

/// A policy (no description, no location).
pub fn policy(
    from: Endpoint,
    to: Endpoint,
    ports: Ports,
    protocol: Protocol,
    bidirectional: bool,
) -> Policy {
    Policy {
        from,
        to,
        ports,
        protocol,
        bidirectional,
        description: String::new(),
        loc: None,
    }
}

/// `Endpoint::Domain`.
pub fn dom(name: &str) -> Endpoint {
    Endpoint::Domain(name.into())
}

/// `Endpoint::Machine` (full name).
pub fn mach(full_name: &str) -> Endpoint {
    Endpoint::Machine(full_name.into())
}

/// Build a resolved project: `root` names the moat root (its tag names every
/// host resource), `octet` is the second octet of every subnet.
pub fn resolved(root: &str, octet: u8, domains: &[DomainSpec], policies: Vec<Policy>) -> Resolved {
    let tag = naming::root_tag(root);
    let mut project = Project {
        name: "fixture".into(),
        format: Format::Moat,
        dir: PathBuf::from(root),
        addressing: Addressing::default(),
        defaults: Defaults::default(),
        images: BTreeMap::new(),
        domains: BTreeMap::new(),
        policies,
        reconcile: Reconcile::default(),
        incus: None,
    };
    let mut networks = BTreeMap::new();
    let mut nics = BTreeMap::new();
    let mut allocations = Allocations::default();
    let mut ifnum = 0u32;
    for (i, d) in domains.iter().enumerate() {
        let third = u8::try_from(i).unwrap_or(u8::MAX);
        let net = Ipv4Addr::new(10, octet, third, 0);
        let subnet = Ipv4Net::new(net, 24).unwrap_or_default();
        let gateway = Ipv4Addr::new(10, octet, third, 254);
        let mut machines = BTreeMap::new();
        for (j, m) in d.machines.iter().enumerate() {
            let full = format!("{}-{}", d.name, m);
            let ip = Ipv4Addr::new(10, octet, third, u8::try_from(j + 1).unwrap_or(253));
            ifnum += 1;
            nics.insert(
                full.clone(),
                ResolvedNic {
                    machine: full.clone(),
                    ip,
                    mac: naming::mac_for(&tag, &full),
                    host_if: naming::host_if_name(&tag, ifnum),
                },
            );
            allocations.addresses.insert(full.clone(), ip);
            allocations.ifnums.insert(full.clone(), ifnum);
            machines.insert(m.clone(), machine(&d.name, m, ip));
        }
        allocations.subnets.insert(d.name.clone(), subnet);
        networks.insert(
            d.name.clone(),
            ResolvedNetwork {
                domain: d.name.clone(),
                subnet,
                gateway,
                bridge: naming::bridge_name(&tag, &d.name),
            },
        );
        project.domains.insert(
            d.name.clone(),
            Domain {
                name: d.name.clone(),
                description: String::new(),
                trust_level: d.trust_level,
                enabled: true,
                ephemeral: false,
                subnet: Some(subnet),
                egress: d.egress,
                dhcp: d.dhcp,
                profiles: BTreeMap::new(),
                target: None,
                machines,
                loc: None,
            },
        );
    }
    Resolved {
        project,
        root_tag: tag,
        networks,
        nics,
        allocations,
    }
}

fn machine(domain: &str, name: &str, ip: Ipv4Addr) -> Machine {
    Machine {
        name: name.into(),
        full_name: format!("{domain}-{name}"),
        domain: domain.into(),
        network: NetworkMode::Domain,
        ip: Some(ip),
        ephemeral: false,
        adhoc: false,
        ..Machine::adhoc(name, "busybox")
    }
}

/// The AnKLuMe showcase (`anklume-showcase/policies.yml`), its enabled domains
/// with a few machines each, built by hand.
pub fn showcase(root: &str, octet: u8) -> Resolved {
    let domains = [
        DomainSpec::new("vault", &["keepass", "backup"]),
        DomainSpec::new("pro", &["desktop", "dev"]),
        DomainSpec::new("perso", &["desktop", "firefox"]),
        DomainSpec::new("ai-tools", &["gpu-server", "webui"]),
        DomainSpec::new("sandbox", &["risky-browse", "tor-gateway"]),
    ];
    let l = |p: &[u16]| Ports::List(p.to_vec());
    let policies = vec![
        policy(
            dom("pro"),
            dom("ai-tools"),
            l(&[11434, 8000]),
            Protocol::Tcp,
            false,
        ),
        policy(
            dom("pro"),
            dom("ai-tools"),
            l(&[3000, 3210, 8089]),
            Protocol::Tcp,
            false,
        ),
        policy(
            dom("perso"),
            dom("ai-tools"),
            l(&[11434, 8000]),
            Protocol::Tcp,
            false,
        ),
        policy(
            dom("perso"),
            dom("ai-tools"),
            l(&[3000]),
            Protocol::Tcp,
            false,
        ),
        policy(dom("vault"), dom("pro"), Ports::All, Protocol::Tcp, false),
        policy(dom("pro"), dom("perso"), l(&[22]), Protocol::Tcp, true),
        policy(
            mach("sandbox-risky-browse"),
            mach("sandbox-tor-gateway"),
            l(&[9050]),
            Protocol::Tcp,
            false,
        ),
        policy(
            mach("sandbox-risky-browse"),
            mach("sandbox-tor-gateway"),
            l(&[5353]),
            Protocol::Udp,
            false,
        ),
        policy(
            Endpoint::Host,
            dom("ai-tools"),
            l(&[11434, 8000]),
            Protocol::Tcp,
            false,
        ),
    ];
    resolved(root, octet, &domains, policies)
}
