//! Hand-built projects for tests and benches (no loader needed).
#![allow(dead_code)]

use moat_core::diag::Loc;
use moat_core::model::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

pub fn project(format: Format) -> Project {
    Project {
        name: "test".into(),
        format,
        dir: PathBuf::from("/nonexistent"),
        addressing: Addressing::default(),
        defaults: Defaults::default(),
        images: BTreeMap::new(),
        domains: BTreeMap::new(),
        policies: Vec::new(),
        reconcile: Reconcile::default(),
        incus: None,
    }
}

pub fn domain(name: &str, trust: TrustLevel) -> Domain {
    Domain {
        name: name.into(),
        description: String::new(),
        trust_level: trust,
        enabled: true,
        ephemeral: false,
        subnet: None,
        egress: Egress::default(),
        dhcp: false,
        profiles: BTreeMap::new(),
        target: None,
        machines: BTreeMap::new(),
        loc: Some(Loc::new("moat.yml", 1, 1)),
    }
}

pub fn machine(domain: &str, name: &str) -> Machine {
    Machine {
        name: name.into(),
        full_name: format!("{domain}-{name}"),
        domain: domain.into(),
        network: NetworkMode::Domain,
        ephemeral: false,
        adhoc: false,
        loc: Some(Loc::new("moat.yml", 2, 3)),
        ..Machine::adhoc(name, "busybox")
    }
}

pub fn add_domain(p: &mut Project, d: Domain) {
    p.domains.insert(d.name.clone(), d);
}

pub fn add_machine(p: &mut Project, m: Machine) {
    let d = p.domains.get_mut(&m.domain).expect("domain exists");
    d.machines.insert(m.name.clone(), m);
}

/// `domains` domains × `per` machines, trust levels spread so no zone passes 255.
pub fn big_project(domains: usize, per: usize) -> Project {
    let mut p = project(Format::Moat);
    for i in 0..domains {
        let trust = TrustLevel::ALL[i % 5];
        let name = format!("d{i}");
        add_domain(&mut p, domain(&name, trust));
        for j in 0..per {
            add_machine(&mut p, machine(&name, &format!("m{j}")));
        }
    }
    p
}
