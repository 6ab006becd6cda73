//! The planner: actions, reasons, order, orphans, drift; convergence properties.

mod common;

use common::*;
use moat_core::address::allocate;
use moat_core::model::*;
use moat_core::observed::*;
use moat_core::plan::*;
use proptest::prelude::*;

const ROOT: &str = "/var/lib/moat";

fn desired(p: &Project) -> Desired {
    let r = allocate(p, &Allocations::default(), ROOT)
        .expect("allocates")
        .resolved;
    let mut d = Desired::new(r);
    d.firewall = Some(DesiredFirewall {
        hash: "fw1".into(),
        summary: "2 domains isolated".into(),
    });
    d
}

fn small() -> Project {
    let mut p = project(Format::Moat);
    add_domain(&mut p, domain("pro", TrustLevel::Trusted));
    add_domain(&mut p, domain("perso", TrustLevel::SemiTrusted));
    add_machine(&mut p, machine("pro", "dev"));
    let mut m = machine("perso", "web");
    m.memory = Some(1 << 30);
    add_machine(&mut p, m);
    p
}

fn converged(d: &Desired) -> Observed {
    let p = plan(d, &Observed::default(), &PlanOptions::default());
    simulate(&Observed::default(), &p, d)
}

#[test]
fn fresh_plan_creates_everything_in_dependency_order() {
    let d = desired(&small());
    let p = plan(&d, &Observed::default(), &PlanOptions::default());
    let text = p.to_string();
    assert_eq!(
        text,
        "+ create network perso (missing)\n\
         + create network pro (missing)\n\
         ~ apply firewall (missing)\n\
         + ensure image busybox (missing)\n\
         + create machine perso-web (missing)\n\
         + create machine pro-dev (missing)\n\
         Plan: 2 to create, 2 to create, 1 to ensure, 1 to apply.\n"
            .replace("2 to create, 2 to create", "4 to create")
    );
    let mk = p.action("create-machine:pro-dev").unwrap();
    assert_eq!(
        mk.depends_on,
        [
            "apply-firewall",
            "create-network:pro",
            "ensure-image:busybox"
        ]
    );
    assert_eq!(
        p.action("apply-firewall").unwrap().depends_on,
        ["create-network:perso", "create-network:pro"]
    );
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["actions"][0]["op"], "create-network");
    assert_eq!(json["actions"][0]["id"], "create-network:perso");
    assert_eq!(json["actions"][0]["domain"], "perso");
}

#[test]
fn converged_state_plans_nothing() {
    let d = desired(&small());
    let o = converged(&d);
    let p = plan(&d, &o, &PlanOptions::default());
    assert!(p.is_empty(), "{p}");
    assert_eq!(p.to_string(), "No changes.\n");
}

#[test]
fn drift_is_shown_as_such() {
    let mut d = desired(&small());
    d.created_machines.insert("pro-dev".into());
    let mut o = converged(&d);
    o.machines.get_mut("perso-web").unwrap().state = MachineState::Stopped;
    o.machines.get_mut("perso-web").unwrap().limits.memory = Some(512 << 20);
    o.machines.remove("pro-dev");
    o.networks.get_mut("pro").unwrap().up = false;
    let p = plan(&d, &o, &PlanOptions::default());
    let text = p.to_string();
    assert!(
        text.contains("~ update machine perso-web (limit memory 512MiB → 1GiB (drift))\n"),
        "{text}"
    );
    assert!(
        text.contains("> start machine perso-web (stopped by hand (drift))\n"),
        "{text}"
    );
    assert!(
        text.contains("+ create machine pro-dev (deleted by hand (drift))\n"),
        "{text}"
    );
    assert!(
        text.contains("~ update network pro (bridge down (drift))\n"),
        "{text}"
    );
    assert!(p.has_drift());
    assert_eq!(
        p.action("start-machine:perso-web").unwrap().depends_on,
        ["update-machine:perso-web"]
    );
    assert!(plan(&d, &simulate(&o, &p, &d), &PlanOptions::default()).is_empty());
}

#[test]
fn spec_change_replaces() {
    let mut p0 = small();
    let d0 = desired(&p0);
    let o = converged(&d0);
    p0.domains
        .get_mut("pro")
        .unwrap()
        .machines
        .get_mut("dev")
        .unwrap()
        .image = "debian/13".into();
    let d1 = desired(&p0);
    let p = plan(&d1, &o, &PlanOptions::default());
    let a = p.action("replace-machine:pro-dev").expect("replace");
    assert!(
        a.reason.starts_with("settings changed (spec "),
        "{}",
        a.reason
    );
    assert!(a.depends_on.contains(&"ensure-image:debian/13".to_string()));
}

#[test]
fn orphans_are_listed_and_pruned_only_on_request() {
    let d = desired(&small());
    let mut o = converged(&d);
    o.machines.insert(
        "old-box".into(),
        ObservedMachine {
            full_name: "old-box".into(),
            driver: "native".into(),
            state: MachineState::Running,
            spec_hash: "x".into(),
            limits: Limits::default(),
            adhoc: false,
        },
    );
    o.networks.insert(
        "old".into(),
        ObservedNetwork {
            domain: "old".into(),
            bridge: "mtabc-old".into(),
            subnet: None,
            up: true,
        },
    );
    let p = plan(&d, &o, &PlanOptions::default());
    assert!(p.actions.is_empty());
    assert_eq!(
        p.to_string(),
        "! orphan machine old-box (driver native, not declared)\n\
         ! orphan network old (bridge mtabc-old, domain not declared)\n\
         Plan: 2 orphan(s) kept (pass --prune to delete).\n"
    );
    let p = plan(
        &d,
        &o,
        &PlanOptions {
            prune: true,
            domain: None,
        },
    );
    assert!(p.orphans.is_empty());
    let ids: Vec<&str> = p.actions.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["delete-machine:old-box", "delete-network:old"]);
    assert_eq!(
        p.action("delete-network:old").unwrap().depends_on,
        ["delete-machine:old-box"]
    );
}

#[test]
fn domain_filter_and_disabled_domains() {
    let mut pr = small();
    let d = desired(&pr);
    let o = converged(&d);
    let p = plan(
        &d,
        &Observed::default(),
        &PlanOptions {
            prune: false,
            domain: Some("pro".into()),
        },
    );
    assert!(p.actions.iter().all(|a| !a.id.contains("perso")), "{p}");
    assert!(p.action("create-machine:pro-dev").is_some());

    pr.domains.get_mut("perso").unwrap().enabled = false;
    let d2 = desired(&pr);
    let p = plan(
        &d2,
        &o,
        &PlanOptions {
            prune: true,
            domain: None,
        },
    );
    let text = p.to_string();
    assert!(
        text.contains(". stop machine perso-web (domain perso is disabled)"),
        "{text}"
    );
    assert!(!text.contains("delete"), "{text}");
}

#[test]
fn disposable_machine_recreated_when_stopped() {
    let mut pr = small();
    pr.domains
        .get_mut("pro")
        .unwrap()
        .machines
        .get_mut("dev")
        .unwrap()
        .disposable = true;
    let d = desired(&pr);
    let mut o = converged(&d);
    o.machines.get_mut("pro-dev").unwrap().state = MachineState::Stopped;
    let p = plan(&d, &o, &PlanOptions::default());
    assert_eq!(
        p.action("replace-machine:pro-dev").unwrap().reason,
        "disposable machine stopped: re-created fresh"
    );
}

// --- properties ---------------------------------------------------------------

#[derive(Clone, Debug)]
struct World {
    domains: Vec<(u8, u8, bool)>,            // (name, trust, enabled)
    machines: Vec<(u8, u8, u8, Option<u8>)>, // (domain, name, image, memory)
    seen: Vec<(u8, u8, u8, u8)>,             // observed machine (domain, name, state, tweak)
    seen_nets: Vec<(u8, bool)>,
    images: Vec<u8>,
    fw: Option<bool>,
}

fn world() -> impl Strategy<Value = World> {
    (
        prop::collection::vec((0u8..6, 0u8..5, prop::bool::weighted(0.8)), 0..6),
        prop::collection::vec((0u8..6, 0u8..5, 0u8..3, prop::option::of(0u8..3)), 0..20),
        prop::collection::vec((0u8..7, 0u8..6, 0u8..3, 0u8..4), 0..20),
        prop::collection::vec((0u8..7, any::<bool>()), 0..6),
        prop::collection::vec(0u8..3, 0..3),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(domains, machines, seen, seen_nets, images, fw)| World {
            domains,
            machines,
            seen,
            seen_nets,
            images,
            fw,
        })
}

fn build(w: &World, reverse: bool) -> (Desired, Observed) {
    let mut p = project(Format::Moat);
    // First occurrence of each name wins, whatever the construction order.
    let mut seen_d = std::collections::BTreeSet::new();
    let mut doms: Vec<_> = w
        .domains
        .iter()
        .copied()
        .filter(|x| seen_d.insert(x.0))
        .collect();
    let mut seen_m = std::collections::BTreeSet::new();
    let mut ms: Vec<_> = w
        .machines
        .iter()
        .copied()
        .filter(|x| seen_m.insert((x.0, x.1)))
        .collect();
    if reverse {
        doms.reverse();
        ms.reverse();
    }
    for (d, t, en) in doms {
        let mut dom = domain(&format!("d{d}"), TrustLevel::ALL[t as usize]);
        dom.enabled = en;
        p.domains.entry(dom.name.clone()).or_insert(dom);
    }
    for (d, m, img, mem) in ms {
        if p.domains.contains_key(&format!("d{d}")) {
            let mut mm = machine(&format!("d{d}"), &format!("m{m}"));
            mm.image = format!("img{img}");
            mm.memory = mem.map(|x| (u64::from(x) + 1) << 28);
            p.domains
                .get_mut(&format!("d{d}"))
                .unwrap()
                .machines
                .entry(mm.name.clone())
                .or_insert(mm);
        }
    }
    let r = allocate(&p, &Allocations::default(), ROOT)
        .expect("allocates")
        .resolved;
    let mut des = Desired::new(r);
    des.firewall = Some(DesiredFirewall {
        hash: "fw".into(),
        summary: String::new(),
    });
    let mut o = Observed::default();
    for (d, m, st, tweak) in &w.seen {
        let name = format!("d{d}-m{m}");
        let want = des.resolved.project.machine(&name);
        let state = match st {
            0 => MachineState::Running,
            1 => MachineState::Stopped,
            _ => MachineState::Crashed {
                reason: "exit 1".into(),
            },
        };
        let (hash, limits) = match (want, tweak) {
            (Some(m), 0) => (
                des.spec_hash(m),
                Limits {
                    memory: m.memory,
                    ..Limits::default()
                },
            ),
            (Some(m), 1) => (
                des.spec_hash(m),
                Limits {
                    memory: Some(1),
                    ..Limits::default()
                },
            ),
            _ => ("old".to_string(), Limits::default()),
        };
        o.machines.insert(
            name.clone(),
            ObservedMachine {
                full_name: name,
                driver: "native".into(),
                state,
                spec_hash: hash,
                limits,
                adhoc: false,
            },
        );
    }
    for (d, up) in &w.seen_nets {
        let name = format!("d{d}");
        let subnet = des.resolved.networks.get(&name).map(|n| n.subnet);
        let bridge = des
            .resolved
            .networks
            .get(&name)
            .map(|n| n.bridge.clone())
            .unwrap_or_else(|| format!("mtxyz-{name}"));
        o.networks.insert(
            name.clone(),
            ObservedNetwork {
                domain: name,
                bridge,
                subnet,
                up: *up,
            },
        );
    }
    o.images = w.images.iter().map(|i| format!("img{i}")).collect();
    o.firewall_hash = w.fw.map(|b| if b { "fw".into() } else { "other".into() });
    (des, o)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn plan_is_deterministic(w in world(), prune in any::<bool>()) {
        let (d1, o1) = build(&w, false);
        let (d2, o2) = build(&w, true);
        let opts = PlanOptions { prune, domain: None };
        let a = plan(&d1, &o1, &opts);
        let b = plan(&d2, &o2, &opts);
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
        // Every dependency comes earlier.
        let pos: std::collections::BTreeMap<_, _> = a.actions.iter().enumerate().map(|(i, x)| (x.id.clone(), i)).collect();
        for (i, x) in a.actions.iter().enumerate() {
            for dep in &x.depends_on { prop_assert!(pos[dep] < i, "{} before its dependency {}", x.id, dep); }
        }
    }

    #[test]
    fn applying_the_plan_converges(w in world(), prune in any::<bool>()) {
        let (d, o) = build(&w, false);
        let opts = PlanOptions { prune, domain: None };
        let p = plan(&d, &o, &opts);
        let after = simulate(&o, &p, &d);
        let again = plan(&d, &after, &opts);
        prop_assert!(again.actions.is_empty(), "second plan not empty:\n{}", again);
        if prune { prop_assert!(again.orphans.is_empty()); }
        prop_assert_eq!(again.orphans, p.orphans);
    }
}
