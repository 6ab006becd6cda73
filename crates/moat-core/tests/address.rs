//! Address allocation: the AnKLuMe convention, stability, and diagnostics.

mod common;

use common::*;
use moat_core::address::allocate;
use moat_core::diag::Loc;
use moat_core::model::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

const ROOT: &str = "/var/lib/moat";

/// The AnKLuMe showcase's domains and machines, by hand.
fn showcase() -> Project {
    let mut p = project(Format::Anklume);
    let doms: [(&str, TrustLevel, &[&str]); 6] = [
        ("vault", TrustLevel::Admin, &["secrets", "backup"]),
        (
            "ai-tools",
            TrustLevel::Trusted,
            &[
                "gpu-server",
                "webui",
                "chat",
                "sanitizer",
                "code-runner",
                "claude-agent",
                "sandbox",
            ],
        ),
        (
            "pro",
            TrustLevel::Trusted,
            &["desktop", "dev", "comms", "assistant"],
        ),
        (
            "perso",
            TrustLevel::SemiTrusted,
            &["desktop", "firefox", "media", "cloud", "assistant"],
        ),
        (
            "sandbox",
            TrustLevel::Disposable,
            &["risky-browse", "tor-gateway"],
        ),
        ("gaming", TrustLevel::Untrusted, &["station"]),
    ];
    for (name, trust, machines) in doms {
        let mut d = domain(name, trust);
        d.enabled = name != "gaming";
        add_domain(&mut p, d);
        for m in machines {
            add_machine(&mut p, machine(name, m));
        }
    }
    let secrets = p
        .domains
        .get_mut("vault")
        .unwrap()
        .machines
        .get_mut("secrets")
        .unwrap();
    secrets.ip = Some(Ipv4Addr::new(10, 100, 1, 100));
    secrets.ip_loc = Some(Loc::new("domains/vault.yml", 19, 9));
    p
}

fn net(s: &str) -> ipnet::Ipv4Net {
    s.parse().unwrap()
}

#[test]
fn showcase_follows_anklume_convention() {
    let a = allocate(&showcase(), &Allocations::default(), ROOT).expect("allocates");
    let subnets: BTreeMap<_, _> = a
        .resolved
        .networks
        .iter()
        .map(|(k, v)| (k.as_str(), v.subnet.to_string()))
        .collect();
    assert_eq!(subnets["vault"], "10.100.0.0/24");
    assert_eq!(subnets["ai-tools"], "10.110.0.0/24");
    assert_eq!(subnets["pro"], "10.110.1.0/24");
    assert_eq!(subnets["perso"], "10.120.0.0/24");
    assert_eq!(subnets["sandbox"], "10.150.0.0/24");
    assert!(!subnets.contains_key("gaming"));
    assert_eq!(
        a.resolved.networks["pro"].gateway,
        Ipv4Addr::new(10, 110, 1, 254)
    );
    // Alphabetical order of machines within the domain.
    let ip = |m: &str| a.resolved.nics[m].ip;
    assert_eq!(ip("pro-assistant"), Ipv4Addr::new(10, 110, 1, 1));
    assert_eq!(ip("pro-comms"), Ipv4Addr::new(10, 110, 1, 2));
    assert_eq!(ip("pro-desktop"), Ipv4Addr::new(10, 110, 1, 3));
    assert_eq!(ip("pro-dev"), Ipv4Addr::new(10, 110, 1, 4));
    // vault-secrets' ip is outside its subnet: a warning in AnKLuMe's format.
    assert_eq!(ip("vault-backup"), Ipv4Addr::new(10, 100, 0, 1));
    assert_eq!(ip("vault-secrets"), Ipv4Addr::new(10, 100, 0, 2));
    let w: Vec<String> = a.warnings.0.iter().map(|d| d.to_string()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(
        w[0],
        "warning: domains/vault.yml:19:9: domains.vault.machines.secrets.ip: 10.100.1.100 is outside the subnet of domain 'vault' (10.100.0.0/24); moat assigned 10.100.0.2 instead\n  hint: set an ip inside 10.100.0.0/24, or remove `ip:`, to silence this warning"
    );
    assert!(a.resolved.nics.keys().all(|k| !k.starts_with("gaming-")));
    let bridge = &a.resolved.networks["pro"].bridge;
    assert!(bridge.starts_with("mt") && bridge.ends_with("-pro") && bridge.len() <= 15);
}

#[test]
fn ip_outside_subnet_is_an_error_in_moat_format() {
    let mut p = showcase();
    p.format = Format::Moat;
    let errs = allocate(&p, &Allocations::default(), ROOT).unwrap_err();
    let e: Vec<String> = errs.errors().map(|d| d.to_string()).collect();
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("error: domains/vault.yml:19:9: domains.vault.machines.secrets.ip: 10.100.1.100 is outside the subnet of domain 'vault' (10.100.0.0/24)"), "{}", e[0]);
    assert!(e[0].contains("hint: set an ip inside 10.100.0.0/24"));
}

#[test]
fn explicit_ip_is_kept_and_skipped_by_automatic_ones() {
    let mut p = project(Format::Moat);
    add_domain(&mut p, domain("pro", TrustLevel::Trusted));
    let mut b = machine("pro", "b");
    b.ip = Some(Ipv4Addr::new(10, 110, 0, 1));
    add_machine(&mut p, machine("pro", "a"));
    add_machine(&mut p, b);
    add_machine(&mut p, machine("pro", "c"));
    let a = allocate(&p, &Allocations::default(), ROOT).unwrap();
    let ip = |m: &str| a.resolved.nics[m].ip.octets()[3];
    assert_eq!((ip("pro-a"), ip("pro-b"), ip("pro-c")), (2, 1, 3));
}

#[test]
fn adding_and_removing_never_renumbers() {
    let mut p = project(Format::Moat);
    add_domain(&mut p, domain("b", TrustLevel::Trusted));
    add_machine(&mut p, machine("b", "x"));
    add_machine(&mut p, machine("b", "y"));
    let first = allocate(&p, &Allocations::default(), ROOT)
        .unwrap()
        .resolved
        .allocations;
    assert_eq!(first.subnets["b"], net("10.110.0.0/24"));

    // A domain "a" sorts before "b": on a fresh state it would take seq 0.
    add_domain(&mut p, domain("a", TrustLevel::Trusted));
    add_machine(&mut p, machine("a", "z"));
    // A machine sorting first.
    add_machine(&mut p, machine("b", "a"));
    p.domains.get_mut("b").unwrap().machines.remove("x");
    let second = allocate(&p, &first, ROOT).unwrap().resolved.allocations;
    assert_eq!(second.subnets["b"], net("10.110.0.0/24"));
    assert_eq!(second.subnets["a"], net("10.110.1.0/24"));
    assert_eq!(second.addresses["b-y"], first.addresses["b-y"]);
    assert_eq!(
        second.addresses["b-a"],
        Ipv4Addr::new(10, 110, 0, 1),
        "reuses the freed lowest address"
    );
    assert!(!second.addresses.contains_key("b-x"));
    assert_eq!(second.ifnums["b-y"], first.ifnums["b-y"]);
}

#[test]
fn disabled_domain_keeps_its_reservation() {
    let mut p = project(Format::Moat);
    add_domain(&mut p, domain("a", TrustLevel::Trusted));
    add_domain(&mut p, domain("b", TrustLevel::Trusted));
    add_machine(&mut p, machine("a", "m"));
    let first = allocate(&p, &Allocations::default(), ROOT)
        .unwrap()
        .resolved
        .allocations;
    p.domains.get_mut("a").unwrap().enabled = false;
    add_domain(&mut p, domain("c", TrustLevel::Trusted));
    let r = allocate(&p, &first, ROOT).unwrap().resolved;
    assert!(!r.networks.contains_key("a"));
    assert!(!r.nics.contains_key("a-m"));
    assert_eq!(r.allocations.subnets["a"], first.subnets["a"]);
    assert_eq!(r.allocations.addresses["a-m"], first.addresses["a-m"]);
    assert_eq!(r.allocations.subnets["c"], net("10.110.2.0/24"));
}

#[test]
fn override_subnet_uses_last_usable_as_gateway() {
    let mut p = project(Format::Moat);
    let mut d = domain("lab", TrustLevel::Untrusted);
    d.subnet = Some(net("192.168.7.0/28"));
    add_domain(&mut p, d);
    for m in ["a", "b"] {
        add_machine(&mut p, machine("lab", m));
    }
    let r = allocate(&p, &Allocations::default(), ROOT)
        .unwrap()
        .resolved;
    assert_eq!(r.networks["lab"].gateway, Ipv4Addr::new(192, 168, 7, 14));
    assert_eq!(r.nics["lab-a"].ip, Ipv4Addr::new(192, 168, 7, 1));
    assert_eq!(r.nics["lab-b"].ip, Ipv4Addr::new(192, 168, 7, 2));
}

fn errors_of(p: &Project) -> Vec<String> {
    allocate(p, &Allocations::default(), ROOT)
        .unwrap_err()
        .errors()
        .map(|d| format!("{}: {}", d.field, d.message))
        .collect()
}

#[test]
fn diagnostics() {
    let base = || {
        let mut p = project(Format::Moat);
        add_domain(&mut p, domain("pro", TrustLevel::Trusted));
        p
    };
    let with_ip = |ip: [u8; 4]| {
        let mut p = base();
        let mut m = machine("pro", "dev");
        m.ip = Some(Ipv4Addr::from(ip));
        add_machine(&mut p, m);
        errors_of(&p)
    };
    assert_eq!(with_ip([10, 110, 0, 254]), ["domains.pro.machines.dev.ip: 10.110.0.254 is the gateway of 10.110.0.0/24; it cannot be a machine's address"]);
    assert_eq!(with_ip([10, 110, 0, 0]), ["domains.pro.machines.dev.ip: 10.110.0.0 is the network address of 10.110.0.0/24; it cannot be a machine's address"]);
    assert_eq!(with_ip([10, 110, 0, 255]), ["domains.pro.machines.dev.ip: 10.110.0.255 is the broadcast address of 10.110.0.0/24; it cannot be a machine's address"]);

    let mut p = base();
    for n in ["a", "b"] {
        let mut m = machine("pro", n);
        m.ip = Some(Ipv4Addr::new(10, 110, 0, 5));
        add_machine(&mut p, m);
    }
    assert_eq!(
        errors_of(&p),
        ["domains.pro.machines.b.ip: 10.110.0.5 is also the ip of machine 'pro-a'"]
    );

    let mut p = base();
    for i in 0..100 {
        add_machine(&mut p, machine("pro", &format!("m{i:03}")));
    }
    assert_eq!(errors_of(&p), ["domains.pro.machines.m099: no free address left for this machine in 10.110.0.0/24: automatic addresses go from 10.110.0.1 to 10.110.0.99"]);

    let mut p = base();
    let mut d = domain("lab", TrustLevel::Trusted);
    d.subnet = Some(net("10.110.0.0/16"));
    add_domain(&mut p, d);
    let mut d = domain("lab2", TrustLevel::Trusted);
    d.subnet = Some(net("10.110.0.0/16"));
    add_domain(&mut p, d);
    let e = errors_of(&p);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e.contains(&"domains.lab2.subnet: 10.110.0.0/16 is also the subnet of domain 'lab'; two domains cannot share a subnet".to_string()), "{e:?}");

    let mut p = project(Format::Moat);
    for i in 0..257 {
        add_domain(&mut p, domain(&format!("d{i:03}"), TrustLevel::Admin));
    }
    assert_eq!(errors_of(&p), ["domains.d256.subnet: no free /24 left for this domain in the admin zone (10.100.0.0/16): every /24 of it is used by another domain"]);

    let mut p = base();
    p.domains.get_mut("pro").unwrap().subnet = Some(net("10.0.0.0/8"));
    assert_eq!(
        errors_of(&p),
        ["domains.pro.subnet: 10.0.0.0/8 has a /8 prefix; a domain subnet must be /16 to /29"]
    );
}

#[test]
fn explicit_ip_may_not_take_an_allocated_address() {
    let mut p = project(Format::Moat);
    add_domain(&mut p, domain("pro", TrustLevel::Trusted));
    add_machine(&mut p, machine("pro", "a"));
    let first = allocate(&p, &Allocations::default(), ROOT)
        .unwrap()
        .resolved
        .allocations;
    let mut b = machine("pro", "b");
    b.ip = Some(first.addresses["pro-a"]);
    add_machine(&mut p, b);
    let e: Vec<String> = allocate(&p, &first, ROOT)
        .unwrap_err()
        .errors()
        .map(|d| d.message.clone())
        .collect();
    assert_eq!(
        e,
        ["10.110.0.1 is already allocated to machine 'pro-a' (moat never renumbers a machine)"]
    );
}

// --- property: stable allocation under random additions and removals -------

#[derive(Clone, Debug)]
enum Op {
    AddDomain(u8, u8),
    RemoveDomain(u8),
    AddMachine(u8, u8),
    RemoveMachine(u8, u8),
    Toggle(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..12, 0u8..5).prop_map(|(d, t)| Op::AddDomain(d, t)),
        (0u8..12).prop_map(Op::RemoveDomain),
        (0u8..12, 0u8..20).prop_map(|(d, m)| Op::AddMachine(d, m)),
        (0u8..12, 0u8..20).prop_map(|(d, m)| Op::RemoveMachine(d, m)),
        (0u8..12).prop_map(Op::Toggle),
    ]
}

fn apply_op(p: &mut Project, op: &Op) {
    let dn = |d: &u8| format!("d{d}");
    match op {
        Op::AddDomain(d, t) => {
            if !p.domains.contains_key(&dn(d)) {
                add_domain(p, domain(&dn(d), TrustLevel::ALL[*t as usize]));
            }
        }
        Op::RemoveDomain(d) => {
            p.domains.remove(&dn(d));
        }
        Op::AddMachine(d, m) => {
            if p.domains.contains_key(&dn(d)) {
                add_machine(p, machine(&dn(d), &format!("m{m}")));
            }
        }
        Op::RemoveMachine(d, m) => {
            if let Some(dom) = p.domains.get_mut(&dn(d)) {
                dom.machines.remove(&format!("m{m}"));
            }
        }
        Op::Toggle(d) => {
            if let Some(dom) = p.domains.get_mut(&dn(d)) {
                dom.enabled = !dom.enabled;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn allocations_are_stable(ops in prop::collection::vec(op(), 1..60)) {
        let mut p = project(Format::Moat);
        let mut prior = Allocations::default();
        for op in &ops {
            apply_op(&mut p, op);
            let r = allocate(&p, &prior, ROOT).expect("allocates").resolved;
            let now = &r.allocations;
            // Nothing that still exists moved.
            for (d, s) in &now.subnets {
                if let Some(old) = prior.subnets.get(d) { prop_assert_eq!(old, s, "domain {} moved", d); }
            }
            for (m, a) in &now.addresses {
                if let Some(old) = prior.addresses.get(m) { prop_assert_eq!(old, a, "machine {} moved", m); }
            }
            for (m, n) in &now.ifnums {
                if let Some(old) = prior.ifnums.get(m) { prop_assert_eq!(old, n, "ifnum of {} moved", m); }
            }
            // Removed things dropped out.
            for d in now.subnets.keys() { prop_assert!(p.domains.contains_key(d)); }
            // Unique addresses, each in its own domain subnet, never the gateway.
            let mut seen = std::collections::BTreeSet::new();
            for nic in r.nics.values() { prop_assert!(seen.insert(nic.ip), "duplicate {}", nic.ip); }
            for d in p.enabled_domains() {
                let net = r.networks[&d.name].subnet;
                for m in d.machines.values() {
                    let ip = r.nics[&m.full_name].ip;
                    prop_assert!(net.contains(&ip));
                    prop_assert_ne!(ip, r.networks[&d.name].gateway);
                }
            }
            let mut ifs = std::collections::BTreeSet::new();
            for n in now.ifnums.values() { prop_assert!(ifs.insert(*n)); }
            let mut nets: Vec<_> = now.subnets.values().collect();
            nets.sort();
            nets.dedup();
            prop_assert_eq!(nets.len(), now.subnets.len(), "two domains share a subnet");
            prior = now.clone();
        }
    }
}

#[test]
fn real_showcase_through_the_loader() {
    let dir = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/reference/anklume-showcase"
    ));
    if !dir.join("anklume.yml").is_file() {
        eprintln!("SKIP: {} is absent", dir.display());
        return;
    }
    let (a, warnings) =
        moat_core::check(dir, &Allocations::default(), ROOT).expect("showcase allocates");
    let nets = &a.resolved.networks;
    assert_eq!(nets["vault"].subnet, net("10.100.0.0/24"));
    assert_eq!(nets["ai-tools"].subnet, net("10.110.0.0/24"));
    assert_eq!(nets["pro"].subnet, net("10.110.1.0/24"));
    assert_eq!(nets["perso"].subnet, net("10.120.0.0/24"));
    assert_eq!(nets["sandbox"].subnet, net("10.150.0.0/24"));
    assert!(!nets.contains_key("gaming"));
    let w: Vec<String> = warnings.0.iter().map(|d| d.to_string()).collect();
    assert!(
        w.iter().any(|w| w.starts_with("warning: domains/vault.yml:19:") && w.contains("10.100.1.100 is outside the subnet of domain 'vault' (10.100.0.0/24); moat assigned 10.100.0.")),
        "{w:#?}"
    );
}

// --- property: arbitrary overrides, fixed ips and prior state never panic, and
// a successful allocation is always consistent --------------------------------

fn arb_net() -> impl Strategy<Value = Option<ipnet::Ipv4Net>> {
    prop::option::weighted(
        0.3,
        (
            prop::sample::select(vec![10u8, 172, 192]),
            0u8..4,
            0u8..4,
            14u8..32,
        )
            .prop_map(|(a, b, c, len)| {
                ipnet::Ipv4Net::new(Ipv4Addr::new(a, 100 + b * 10, c, 0), len)
                    .unwrap()
                    .trunc()
            }),
    )
}

fn arb_ip() -> impl Strategy<Value = Option<Ipv4Addr>> {
    prop::option::weighted(
        0.3,
        (
            0u8..4,
            0u8..3,
            prop::sample::select(vec![0u8, 1, 2, 3, 99, 100, 253, 254, 255]),
        )
            .prop_map(|(b, c, d)| Ipv4Addr::new(10, 100 + b * 10, c, d)),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn arbitrary_inputs_are_consistent(
        doms in prop::collection::vec((0u8..6, 0u8..5, any::<bool>(), arb_net()), 0..7),
        ms in prop::collection::vec((0u8..6, 0u8..8, arb_ip()), 0..25),
        prior_nets in prop::collection::vec((0u8..6, arb_net()), 0..4),
        prior_ips in prop::collection::vec((0u8..6, 0u8..8, arb_ip()), 0..6),
        anklume in any::<bool>(),
    ) {
        let mut p = project(if anklume { Format::Anklume } else { Format::Moat });
        for (d, t, en, net) in doms {
            let mut dom = domain(&format!("d{d}"), TrustLevel::ALL[t as usize]);
            dom.enabled = en;
            dom.subnet = net;
            p.domains.insert(dom.name.clone(), dom);
        }
        for (d, m, ip) in ms {
            if let Some(dom) = p.domains.get_mut(&format!("d{d}")) {
                let mut mm = machine(&format!("d{d}"), &format!("m{m}"));
                mm.ip = ip;
                dom.machines.insert(mm.name.clone(), mm);
            }
        }
        let mut prior = Allocations::default();
        for (d, net) in prior_nets {
            if let Some(net) = net { prior.subnets.insert(format!("d{d}"), net); }
        }
        for (i, (d, m, ip)) in prior_ips.into_iter().enumerate() {
            if let Some(ip) = ip {
                prior.addresses.insert(format!("d{d}-m{m}"), ip);
                prior.ifnums.insert(format!("d{d}-m{m}"), i as u32 % 3);
            }
        }
        let Ok(a) = allocate(&p, &prior, ROOT) else { return Ok(()); };
        let r = a.resolved;
        let mut seen = std::collections::BTreeSet::new();
        for d in p.enabled_domains() {
            let n = &r.networks[&d.name];
            for m in d.machines.values() {
                let ip = r.nics[&m.full_name].ip;
                prop_assert!(seen.insert(ip), "duplicate {}", ip);
                prop_assert!(n.subnet.contains(&ip));
                prop_assert!(ip != n.gateway && ip != n.subnet.network() && ip != n.subnet.broadcast());
            }
        }
        let nets: Vec<_> = r.networks.values().map(|n| n.subnet).collect();
        for (i, a) in nets.iter().enumerate() {
            for b in &nets[i + 1..] {
                prop_assert!(!a.contains(&b.network()) && !b.contains(&a.network()), "{} overlaps {}", a, b);
            }
        }
        let mut ifs = std::collections::BTreeSet::new();
        for n in r.allocations.ifnums.values() { prop_assert!(ifs.insert(*n)); }
    }
}

#[test]
fn trust_level_change_keeps_the_subnet_with_a_warning() {
    let mut p = project(Format::Moat);
    add_domain(&mut p, domain("pro", TrustLevel::Trusted));
    let first = allocate(&p, &Allocations::default(), ROOT)
        .unwrap()
        .resolved
        .allocations;
    p.domains.get_mut("pro").unwrap().trust_level = TrustLevel::Untrusted;
    let a = allocate(&p, &first, ROOT).unwrap();
    assert_eq!(a.resolved.networks["pro"].subnet, net("10.110.0.0/24"));
    let w: Vec<String> = a
        .warnings
        .0
        .iter()
        .map(|d| format!("{}: {}", d.field, d.message))
        .collect();
    assert_eq!(w, ["domains.pro.subnet: domain 'pro' keeps 10.110.0.0/24, allocated earlier, although its trust level untrusted numbers from 10.140.0.0/16"]);
}
