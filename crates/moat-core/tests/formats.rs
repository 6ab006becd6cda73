//! moat's own format end to end: a single file using every field, the folder
//! layout, and the file-name rules.

use moat_core::load::{load, load_files, load_str};
use moat_core::model::{
    Egress, Endpoint, Format, ImageSource, MachineType, Mount, NetworkMode, Ports, Protocol,
    Reconcile, RestartPolicy, TrustLevel,
};
use std::path::Path;

const FULL: &str = include_str!("data/moat-full.yml");

#[test]
fn every_field_of_moat_format() {
    let l = match load_str("moat.yml", FULL) {
        Ok(l) => l,
        Err(d) => panic!("{d}"),
    };
    let p = &l.project;
    assert_eq!(p.format, Format::Moat);
    assert_eq!(p.name, "demo");
    assert_eq!(p.reconcile, Reconcile::Auto);
    assert_eq!(
        p.images["base"],
        ImageSource::Debian {
            suite: "bookworm".into(),
            packages: vec![]
        }
    );
    assert_eq!(p.images["tiny"], ImageSource::Busybox);
    assert_eq!(
        p.images["local"],
        ImageSource::Tarball {
            path: "./rootfs.tar".into()
        }
    );
    assert_eq!(p.defaults.trust_level, TrustLevel::Trusted);
    assert_eq!(p.defaults.driver[&MachineType::Microvm], "firecracker");
    let work = &p.domains["work"];
    assert_eq!(work.egress, Egress::None);
    assert!(!work.dhcp);
    assert_eq!(work.subnet, Some("10.200.0.0/24".parse().expect("net")));
    let dev = p.machine("work-dev").expect("work-dev");
    assert_eq!(dev.image, "base");
    assert_eq!(dev.cpus, Some(2));
    assert_eq!(dev.memory, Some(1 << 30));
    assert_eq!(dev.disk, Some(10 << 30));
    assert_eq!(dev.pids, Some(512), "defaults.pids applies");
    assert_eq!(dev.restart, RestartPolicy::OnFailure);
    assert_eq!(dev.command.as_deref().map(<[String]>::len), Some(3));
    assert_eq!(
        dev.mounts[0],
        Mount {
            source: "/srv/src".into(),
            target: "/src".into(),
            readonly: true
        }
    );
    assert!(!dev.mounts[1].readonly);
    let vm1 = p.machine("work-vm1").expect("vm1");
    assert_eq!(vm1.kind, MachineType::Microvm);
    assert_eq!(vm1.driver, "qemu");
    assert_eq!(vm1.image, "tiny", "defaults.image applies");
    assert_eq!(vm1.memory, Some(256 << 20));
    assert!(vm1
        .cloud_init
        .as_ref()
        .is_some_and(|c| c["user-data"]["packages"][0] == "git"));
    let tools = p.machine("admin-tools").expect("tools");
    assert_eq!(tools.network, NetworkMode::Host);
    assert!(tools.privileged);
    assert_eq!(tools.driver, "native");
    assert_eq!(p.policies.len(), 3);
    assert_eq!(p.policies[1].to, Endpoint::Machine("work-dev".into()));
    assert_eq!(p.policies[1].ports, Ports::All);
    assert_eq!(p.policies[2].protocol, Protocol::Icmp);
    let warned: Vec<&str> = l
        .warnings
        .0
        .iter()
        .filter_map(|w| w.message.split('\'').nth(1))
        .collect();
    assert_eq!(warned, ["profiles", "disk"], "{}", l.warnings);
}

#[test]
fn folder_layout_and_default_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("myproj");
    std::fs::create_dir_all(dir.join("domains")).expect("mkdir");
    std::fs::write(dir.join("moat.yml"), "schema_version: 1\n").expect("write");
    std::fs::write(
        dir.join("domains/pro.yml"),
        "trust_level: trusted\nmachines:\n  dev: {}\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("policies.yml"),
        "policies:\n  - {from: host, to: pro-dev, ports: [22]}\n",
    )
    .expect("write");
    for path in [dir.clone(), dir.join("moat.yml")] {
        let l = match load(&path) {
            Ok(l) => l,
            Err(d) => panic!("{d}"),
        };
        assert_eq!(l.project.name, "myproj");
        assert_eq!(l.project.machines().count(), 1);
        assert_eq!(l.project.policies.len(), 1);
    }
}

#[test]
fn missing_project_says_moat_init() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let e = load(tmp.path()).expect_err("empty folder");
    assert!(e.0[0].message.contains("no moat.yml or anklume.yml"));
    assert!(e.0[0]
        .hint
        .as_deref()
        .is_some_and(|h| h.contains("moat init")));
    let e = load(&tmp.path().join("nope")).expect_err("missing path");
    assert!(e.0[0].message.contains("no such file"));
}

#[test]
fn empty_files_are_empty_projects() {
    let l = load_str("moat.yml", "").expect("empty moat.yml");
    assert!(l.project.domains.is_empty());
    let l = load_files(
        Path::new("/x/p"),
        "anklume.yml",
        &[("anklume.yml", b"# nothing\n")],
    )
    .expect("empty anklume");
    assert_eq!(l.project.format, Format::Anklume);
    assert_eq!(l.project.name, "p");
}

#[test]
fn not_utf8_points_at_the_byte() {
    let e = load_files(
        Path::new("."),
        "moat.yml",
        &[("moat.yml", b"a: 1\nb: \xff\n")],
    )
    .expect_err("bad utf8");
    assert_eq!(
        e.0[0].to_string().lines().next(),
        Some("error: moat.yml:2:4: file is not valid UTF-8 text")
    );
}

#[test]
fn anklume_maps_onto_the_model() {
    let files: &[(&str, &[u8])] = &[
        ("anklume.yml", b"schema_version: 1\ndefaults: {os_image: 'images:ubuntu/24.04', trust_level: untrusted}\n"),
        (
            "domains/lab.yml",
            b"ephemeral: true\nmachines:\n  a: {type: lxc, config: {limits.memory: 2GiB, limits.cpu: '2'}}\n  b: {type: vm, os_image: 'images:debian/12', ephemeral: false}\n",
        ),
    ];
    let l = match load_files(Path::new("/p/lab"), "anklume.yml", files) {
        Ok(l) => l,
        Err(d) => panic!("{d}"),
    };
    let p = &l.project;
    assert_eq!(p.domains["lab"].trust_level, TrustLevel::Untrusted);
    let a = p.machine("lab-a").expect("a");
    assert_eq!(
        (a.kind, a.image.as_str(), a.memory, a.cpus, a.ephemeral),
        (
            MachineType::Container,
            "ubuntu/24.04",
            Some(2 << 30),
            Some(2),
            true
        )
    );
    let b = p.machine("lab-b").expect("b");
    assert_eq!(
        (b.kind, b.image.as_str(), b.driver.as_str(), b.ephemeral),
        (MachineType::Vm, "debian/12", "qemu", false)
    );
}

#[test]
fn images_resolve() {
    let l = load_str("moat.yml", FULL).expect("loads");
    let p = &l.project;
    let r = |s: &str| moat_core::load::resolve_image(p, s);
    assert_eq!(
        r("base"),
        Some(ImageSource::Debian {
            suite: "bookworm".into(),
            packages: vec![]
        })
    );
    assert_eq!(
        r("ubuntu/24.04"),
        Some(ImageSource::Ubuntu {
            suite: "24.04".into(),
            packages: vec![]
        })
    );
    assert_eq!(r("nope"), None);
    assert_eq!(moat_core::load::parse_size("2GiB"), Ok(2 << 30));
}
