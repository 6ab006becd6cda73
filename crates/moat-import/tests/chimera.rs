//! The Chimera Spawn folder in tests/data/chimera-lab (every field kind the
//! importer handles) converts into a moat project that loads without errors
//! and holds exactly the intended machines, with the notes (file:line) for
//! what could not be carried over.

use moat_core::model::NetworkMode;
use std::path::Path;

fn lab() -> moat_import::Imported {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chimera-lab");
    let files = moat_import::chimera::read_dir(&dir).expect("read the folder");
    moat_import::chimera::convert("chimera-lab", &files).expect("convert")
}

#[test]
fn chimera_lab_converts_to_the_intended_project() {
    let out = lab();
    assert_eq!(
        out.machines,
        [
            "lab-sandbox",
            "lab-web",
            "prod-node-gateway",
            "prod-node-monitor"
        ]
    );
    let loaded = moat_core::load::load_str("moat.yml", &out.moat_yml)
        .unwrap_or_else(|d| panic!("{d}\n{}", out.moat_yml));
    let p = &loaded.project;
    assert_eq!(p.name, "chimera-lab");
    let names: Vec<&str> = p.machines().map(|m| m.full_name.as_str()).collect();
    assert_eq!(names, out.machines);
    for m in p.machines() {
        assert_eq!(m.driver, "nspawn", "{}", m.full_name);
    }

    // Host networking kept, in an admin domain.
    let prod = &p.domains["prod-node"];
    assert_eq!(prod.trust_level.as_str(), "admin");
    let gw = p.machine("prod-node-gateway").expect("gateway");
    assert_eq!(gw.network, NetworkMode::Host);
    assert!(gw.privileged);
    assert_eq!(
        (gw.cpus, gw.memory, gw.pids),
        (Some(4), Some(4 << 30), Some(2048))
    );
    assert_eq!(gw.image, "debian-12-cloud-tar");
    let ci = gw.cloud_init.as_ref().expect("cloud-init");
    assert_eq!(ci["user-data"]["users"][0]["name"], "chimera");
    // The template's Jinja was rendered with config.yaml's proxy.
    assert_eq!(
        ci["user-data"]["write_files"][0]["content"],
        "http_proxy=\"http://proxy.lab.example:3128\"\n"
    );
    assert_eq!(ci["meta-data"]["role"], "gateway");
    let mon = p.machine("prod-node-monitor").expect("monitor");
    assert_eq!(mon.network, NetworkMode::Host);
    assert!(!mon.privileged);
    assert_eq!((mon.cpus, mon.memory), (Some(2), Some(2048 << 20)));

    // The lab node: a bridged machine and a loopback-only one, not admin.
    assert_eq!(p.domains["lab"].trust_level.as_str(), "trusted");
    let web = p.machine("lab-web").expect("web");
    assert_eq!(web.network, NetworkMode::Domain);
    assert_eq!((web.cpus, web.memory), (Some(2), Some(1024 << 20)));
    assert_eq!(web.mounts.len(), 1);
    assert_eq!(web.mounts[0].target, "/data");
    assert!(web.mounts[0].readonly);
    let ci = web.cloud_init.as_ref().expect("cloud-init");
    // Template (packages, network-config, meta-data) merged with the container's runcmd.
    assert_eq!(ci["user-data"]["packages"][0], "nginx-light");
    assert!(ci["user-data"]["runcmd"].is_array());
    assert_eq!(ci["network-config"]["version"], 2);
    assert_eq!(ci["meta-data"]["tier"], "web");
    let sb = p.machine("lab-sandbox").expect("sandbox");
    assert_eq!(sb.network, NetworkMode::None);
    assert_eq!(sb.image, "debian-local");

    // Images: releases rebuilt (with cloud-init where needed), local tarball kept.
    let img = serde_json::to_value(&p.images).expect("json");
    assert_eq!(img["debian-12-cloud-tar"]["source"], "debian");
    assert_eq!(img["debian-12-cloud-tar"]["packages"][0], "cloud-init");
    assert_eq!(img["ubuntu-24-04-cloud-tar"]["suite"], "noble");
    assert!(img["ubuntu-24-04-cloud-tar"].get("packages").is_none());
    assert_eq!(
        img["debian-local"]["path"],
        "/srv/images/debian-local.tar.xz"
    );
    assert!(img.get("rocky9-cloud-raw").is_none());
}

#[test]
fn chimera_lab_says_what_it_could_not_carry_over() {
    let out = lab();
    let notes: Vec<String> = out.notes.iter().map(|n| n.to_string()).collect();
    let has = |prefix: &str, word: &str| {
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with(prefix) && n.contains(word)),
            "no note {prefix}..{word}..: {notes:#?}"
        )
    };
    has("config.yaml:3: ", "agent");
    has("config.yaml:8: ", "proxy");
    has("images/debian.yaml:6: ", "custom_files");
    has("images/ubuntu.yaml:6: ", "nspawn_parameters");
    has("images/ubuntu.yaml:9: ", "rocky9-cloud-raw");
    has("profiles/privileged.yaml:9: ", "Parameters");
    has("profiles/isolated.yaml:18: ", "Port=tcp:8080:80");
    has("profiles/isolated.yaml:23: ", "CPUQuota=150%");
    has("profiles/isolated.yaml:25: ", "IOWeight");
    has("nodes/prod-node1.yaml:1: ", "domain 'prod-node'");
    has("nodes/prod-node1.yaml:16: ", "stopped");
    has("nodes/prod-node1.yaml:20: ", "absent");
    has("nodes/lab.yaml:21: ", "restart");
    has("nodes/lab.yaml:23: ", "rocky");
    has("cloud-init/base.yaml:5: ", "Jinja");
    eprintln!("{}", notes.join("\n"));
}
