//! The AnKLuMe showcase project (shared reference) loads, with only the
//! expected warnings.

use moat_core::load::load;
use moat_core::model::{Endpoint, Format, MachineType, Ports, Protocol};
use std::path::Path;

const SHOWCASE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/reference/anklume-showcase"
);

#[test]
fn anklume_showcase_loads() {
    let dir = Path::new(SHOWCASE);
    if !dir.join("anklume.yml").is_file() {
        eprintln!("SKIP: {SHOWCASE} is absent");
        return;
    }
    let loaded = match load(dir) {
        Ok(l) => l,
        Err(d) => panic!("showcase failed to load:\n{d}"),
    };
    let p = &loaded.project;
    for w in &loaded.warnings.0 {
        eprintln!("{w}");
    }
    assert_eq!(p.format, Format::Anklume);
    assert_eq!(p.name, "anklume-showcase");
    assert_eq!(p.domains.len(), 6);
    assert!(!p.domains["gaming"].enabled);
    let all: usize = p.domains.values().map(|d| d.machines.len()).sum();
    assert_eq!(all, 21, "machines in all domains");
    assert_eq!(p.machines().count(), 20, "machines in enabled domains");
    assert_eq!(p.policies.len(), 9);
    assert_eq!(p.defaults.image, "debian/13");
    assert_eq!(p.addressing.base, [10, 100]);

    let secrets = p.machine("vault-secrets").expect("vault-secrets");
    assert_eq!(secrets.kind, MachineType::Vm);
    assert_eq!(secrets.ip, Some("10.100.1.100".parse().expect("ip")));
    assert!(secrets.ip_loc.is_some());
    assert_eq!(secrets.memory, Some(1_000_000_000));
    assert_eq!(secrets.cpus, Some(2));
    assert_eq!(secrets.image, "debian/13");
    let dev = p.machine("pro-dev").expect("pro-dev");
    assert_eq!(dev.cpus, Some(8));
    assert_eq!(dev.persistent["projets"], "/home/jmc/Projets");
    assert!(p.machine("ai-tools-sandbox").expect("sandbox").ephemeral);
    assert!(p.machine("sandbox-risky-browse").expect("risky").ephemeral);
    assert!(!p.machine("sandbox-tor-gateway").expect("tor").ephemeral);
    assert_eq!(
        p.machine("pro-desktop").expect("desktop").profiles,
        ["default", "audio-share"]
    );

    let udp = &p.policies[7];
    assert_eq!(udp.from, Endpoint::Machine("sandbox-risky-browse".into()));
    assert_eq!(udp.protocol, Protocol::Udp);
    assert_eq!(p.policies[4].ports, Ports::All);
    assert_eq!(p.policies[8].from, Endpoint::Host);
    assert!(p.policies[5].bidirectional);

    // No unknown-key warnings: only one "not acted on" warning per field.
    let msgs: Vec<String> = loaded
        .warnings
        .0
        .iter()
        .map(|w| w.message.clone())
        .collect();
    assert!(
        msgs.iter().all(|m| m.contains("no driver acts on it yet")),
        "{msgs:#?}"
    );
    let mut fields: Vec<&str> = msgs.iter().filter_map(|m| m.split('\'').nth(1)).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "ai_access_policy",
            "gpu",
            "gpu_policy",
            "gui",
            "nesting",
            "persistent",
            "profiles",
            "resource_policy",
            "roles",
            "vars",
            "weight",
            "workspace"
        ]
    );
}
