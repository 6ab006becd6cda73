//! The nspawn driver through the CLI, as root: busybox machines and a Debian
//! systemd machine (`-b`) under systemd-nspawn on a domain network, next to
//! a built-in (native) container of another domain:
//! - exec, limits enforced (pids.max and memory limit read inside the
//!   machine, a fork loop stopped);
//! - the isolation matrix: same domain reaches, other domains are blocked
//!   both ways, the host-network machine (admin domain) sees the host's
//!   interfaces and is marked in `status`;
//! - `network: host` outside the admin level is refused by `validate` with
//!   file:line:col.
//!
//! The Debian machine's image is a folder: `MOAT_TEST_DEBIAN_ROOTFS` or the
//! shared cache `/var/tmp/moat-test-debian-rootfs` (built by moat-driver's
//! nspawn test on first use); without it that machine is left out.

mod common;

use common::{is_root, supervisor, Root};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn project(debian: Option<&Path>) -> String {
    let (images, deb) = match debian {
        Some(p) => (
            format!(
                "images:\n  deb: {{ source: folder, path: \"{}\" }}\n",
                p.display()
            ),
            "      deb: { driver: nspawn, image: deb, memory: 512MiB, pids: 300 }\n".to_string(),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        r#"schema_version: 1
project: nspawntest
addressing: {{ base: "10.196" }}
{images}domains:
  ops:
    trust_level: admin
    egress: none
    machines:
      hostnet: {{ driver: nspawn, network: host, command: ["sleep", "100000"] }}
  lab:
    trust_level: trusted
    egress: none
    machines:
      bb: {{ driver: nspawn, memory: 64MiB, pids: 40, command: ["httpd", "-f", "-p", "8080"] }}
      peer: {{ driver: nspawn, command: ["sleep", "100000"] }}
{deb}  web:
    trust_level: untrusted
    egress: none
    machines:
      srv: {{ command: ["httpd", "-f", "-p", "8080"] }}
"#
    )
}

/// The Debian systemd machine's image, when the shared cache exists. It
/// booted alone but crashed ("PID 1 exited with status 255") next to other
/// nspawn machines until each got its own folder in the hybrid layout's
/// cgroup2 (they shared `/payload`, chowned to the first machine's uid band).
fn debian_rootfs() -> Option<PathBuf> {
    let p = std::env::var_os("MOAT_TEST_DEBIAN_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/moat-test-debian-rootfs"));
    p.join("sbin/init").exists().then_some(p)
}

fn has_nspawn() -> bool {
    ["/usr/bin/systemd-nspawn", "/bin/systemd-nspawn"]
        .iter()
        .any(|p| Path::new(p).exists())
}

/// Does `from` get an HTTP answer from `ip:8080`?
fn reaches(r: &Root, from: &str, ip: &str) -> bool {
    let probe = format!("echo -e 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 8080 | head -1");
    let o = r.moat(&["exec", from, "--", "sh", "-c", &probe]);
    String::from_utf8_lossy(&o.stdout).contains("HTTP/")
}

#[test]
fn nspawn_machines_on_domain_networks_host_network_and_isolation() {
    if !is_root() {
        eprintln!("SKIP: needs root (containers, bridges, nftables)");
        return;
    }
    if !has_nspawn() {
        eprintln!("SKIP: systemd-nspawn is not installed (apt-get install systemd-container)");
        return;
    }
    let Some(sup) = supervisor() else {
        eprintln!("SKIP: moat-supervisor could not be built");
        return;
    };
    let debian = debian_rootfs();
    if debian.is_none() {
        eprintln!(
            "note: the systemd machine is left out (no Debian rootfs cache; moat-driver's nspawn test builds it)"
        );
    }
    let r = Root::new(sup);
    let proj = r.path().join("project");
    std::fs::create_dir_all(&proj).expect("mkdir");
    // The HTTP servers need a page to serve.
    std::fs::write(proj.join("moat.yml"), project(debian.as_deref())).expect("write");
    let f = proj.to_str().expect("utf-8 path");
    let t = Instant::now();
    let o = r.moat(&["-f", f, "apply"]);
    assert!(
        o.status.success(),
        "apply failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("apply: {:.1} s", t.elapsed().as_secs_f64());

    let st: serde_json::Value =
        serde_json::from_str(&r.ok(&["-f", f, "status", "--json"])).expect("json");
    let ip = |name: &str| -> String {
        st["machines"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == name))
            .and_then(|m| m["ip"].as_str())
            .unwrap_or_else(|| panic!("no address for {name}: {st}"))
            .to_string()
    };
    for m in st["machines"].as_array().expect("machines") {
        assert_eq!(m["state"], "running", "{m}");
    }
    let (bb, srv) = (ip("lab-bb"), ip("web-srv"));

    // Machines created in parallel each get a uid band of their own (they
    // once shared one: the number was picked before any record existed).
    let mut bands = std::collections::BTreeSet::new();
    let mut names = vec!["lab-bb", "lab-peer", "ops-hostnet"];
    if debian.is_some() {
        names.push("lab-deb");
    }
    for m in &names {
        let map = r.ok(&["exec", m, "--", "cat", "/proc/self/uid_map"]);
        let host = map.split_whitespace().nth(1).map(str::to_string);
        assert!(host.as_deref().is_some_and(|h| h != "0"), "{m}: {map}");
        bands.insert(host);
    }
    assert_eq!(bands.len(), names.len(), "uid bands shared: {bands:?}");

    // exec, user namespace, limits.
    let out = r.ok(&["exec", "lab-bb", "--", "sh", "-c", "id -u; cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/memory.max"]);
    let v: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(v, ["0", "40", "67108864"], "{out}");
    let out = r.moat(&[
        "exec",
        "lab-bb",
        "--",
        "sh",
        "-c",
        "for i in $(seq 1 60); do sleep 30 >/dev/null 2>&1 & done; echo done",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("can't fork"), "pids limit: {err}");
    let _ = r.moat(&["exec", "lab-bb", "--", "pkill", "sleep"]);

    // Isolation: same domain reaches; other domain blocked both ways.
    let t = Instant::now();
    assert!(reaches(&r, "lab-peer", &bb), "lab-peer → lab-bb must pass");
    assert!(!reaches(&r, "lab-bb", &srv), "lab → web must be blocked");
    assert!(!reaches(&r, "web-srv", &bb), "web → lab must be blocked");
    eprintln!("isolation matrix: {:.1} s", t.elapsed().as_secs_f64());

    // The host-network machine sees the host's interfaces and is marked.
    let tag = st["root_tag"].as_str().expect("tag").to_string();
    let links = r.ok(&["exec", "ops-hostnet", "--", "ip", "-o", "link"]);
    assert!(links.contains(": lo:"), "{links}");
    assert!(links.contains(&format!("mt{tag}-lab")), "{links}");
    let human = r.ok(&["-f", f, "status"]);
    let line = human
        .lines()
        .find(|l| l.starts_with("ops-hostnet"))
        .expect("hostnet line");
    assert!(line.contains("HOST"), "{line}");

    // The Debian systemd machine boots (-b) under nspawn on its domain.
    if debian.is_some() {
        let t = Instant::now();
        let mut state = String::new();
        while t.elapsed() < Duration::from_secs(60) {
            let o = r.moat(&["exec", "lab-deb", "--", "systemctl", "is-system-running"]);
            state = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(state == "running" || state == "degraded", "state: {state}");
        let out = r.ok(&[
            "exec",
            "lab-deb",
            "--",
            "cat",
            "/proc/1/comm",
            "/sys/fs/cgroup/pids/pids.max",
        ]);
        assert!(out.starts_with("systemd") && out.contains("300"), "{out}");
        assert!(
            !reaches(&r, "web-srv", &ip("lab-deb")),
            "web → lab-deb blocked"
        );
        let t = Instant::now();
        r.ok(&["stop", "lab-deb"]);
        eprintln!("debian poweroff: {:.1} s", t.elapsed().as_secs_f64());
    }

    // Snapshots and clones go through the image store as for built-in
    // containers; a clone of an nspawn machine is an nspawn machine.
    r.ok(&["exec", "lab-peer", "--", "sh", "-c", "echo v1 > /data.txt"]);
    r.ok(&["stop", "lab-peer", "-t", "2"]);
    r.ok(&["snapshot", "create", "lab-peer", "s1"]);
    assert!(r.ok(&["snapshot", "ls", "lab-peer"]).contains("s1"));
    r.ok(&["start", "lab-peer"]);
    r.ok(&["exec", "lab-peer", "--", "sh", "-c", "echo v2 > /data.txt"]);
    r.ok(&["stop", "lab-peer", "-t", "2"]);
    r.ok(&["clone", "lab-peer", "peercopy"]);
    r.ok(&["snapshot", "restore", "lab-peer", "s1"]);
    r.ok(&["start", "lab-peer"]);
    r.ok(&["start", "peercopy"]);
    assert_eq!(
        r.ok(&["exec", "lab-peer", "--", "cat", "/data.txt"]),
        "v1\n"
    );
    assert_eq!(
        r.ok(&["exec", "peercopy", "--", "cat", "/data.txt"]),
        "v2\n"
    );
    let st: serde_json::Value = serde_json::from_str(&r.ok(&["status", "--json"])).expect("json");
    let copy = st["machines"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "peercopy"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(copy["driver"], "nspawn", "{st}");
}

#[test]
fn host_network_is_refused_outside_admin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = "schema_version: 1\nproject: x\ndomains:\n  lab:\n    trust_level: trusted\n    machines:\n      h: { driver: nspawn, network: host }\n";
    std::fs::write(dir.path().join("moat.yml"), text).expect("write");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["-f"])
        .arg(dir.path())
        .arg("validate")
        .env("NO_COLOR", "1")
        .output()
        .expect("moat");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("moat.yml:7:"), "file:line:col: {err}");
    assert!(err.contains("admin"), "{err}");
}
