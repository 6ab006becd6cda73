//! `moat import incus` and `moat snapshot` for Incus machines, through the
//! CLI against the local incusd (root; skipped without it).
//!
//! - import round trip: a project, a bridge network, a profile and two
//!   instances are made through Incus's API (as a user would with the `incus`
//!   CLI); `moat import incus` writes a project adopting them; `moat plan`
//!   wants nothing but moat's firewall; after apply the plan is empty and the
//!   instances were not re-created; a stop by hand is repaired.
//! - snapshots: create, ls, restore (a file comes back), rm.
//!
//! Every Incus object is named per run and removed on drop, also on failure.

mod common;

use common::{is_root, Root};
use moat_incus::client::{enc, Client};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn incus() -> Option<Client> {
    if !is_root() {
        eprintln!("SKIP: needs root (incusd's socket, bridges, nftables)");
        return None;
    }
    let c = Client::local();
    match c.get("/1.0") {
        Ok(_) => Some(c),
        Err(e) => {
            eprintln!("SKIP: incusd is not reachable ({e}); scripts/incus-env.sh start");
            None
        }
    }
}

/// 4 base-36 characters, different per run.
fn suffix() -> String {
    let n = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    let a = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..4)
        .map(|i| a[((n >> (i * 6)) % 36) as usize] as char)
        .collect()
}

/// Incus objects made by hand for the import test; removed on drop.
struct Made {
    c: Client,
    project: String,
    /// A project the import does not name (holds an instance marked as moat's).
    other: String,
    network: String,
}

impl Drop for Made {
    fn drop(&mut self) {
        for p in [self.project.clone(), self.other.clone()] {
            self.drop_project(&p);
        }
        let _ = self.c.call(
            "DELETE",
            &format!("/1.0/networks/{}", enc(&self.network)),
            None,
        );
    }
}

impl Made {
    fn drop_project(&self, project: &str) {
        let c = &self.c;
        let pq = enc(project);
        let insts = c
            .get(&format!("/1.0/instances?project={pq}"))
            .unwrap_or_default();
        for i in insts.as_array().into_iter().flatten() {
            let n = i.as_str().and_then(|u| u.rsplit('/').next()).unwrap_or("");
            let n = n.split('?').next().unwrap_or("");
            let _ = c.call(
                "PUT",
                &format!("/1.0/instances/{n}/state?project={pq}"),
                Some(&json!({"action": "stop", "force": true})),
            );
            let _ = c.call("DELETE", &format!("/1.0/instances/{n}?project={pq}"), None);
        }
        let _ = c.call("DELETE", &format!("/1.0/profiles/small?project={pq}"), None);
        let _ = c.call(
            "PUT",
            &format!("/1.0/profiles/default?project={pq}"),
            Some(&json!({"config": {}, "devices": {}})),
        );
        let _ = c.call("DELETE", &format!("/1.0/projects/{pq}"), None);
    }
}

fn instance(c: &Client, project: &str, name: &str) -> Value {
    c.get(&format!("/1.0/instances/{name}?project={}", enc(project)))
        .expect("instance")
}

fn wait_status(c: &Client, project: &str, name: &str, want: &str) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if instance(c, project, name)["status"] == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn import_round_trip_adopts_in_place() {
    let Some(c) = incus() else { return };
    let sfx = suffix();
    let made = Made {
        c: c.clone(),
        project: format!("Imp-{sfx}"),
        other: format!("oth-{sfx}"),
        network: format!("mimp{sfx}"),
    };
    let (project, network) = (made.project.clone(), made.network.clone());
    let pq = enc(&project);
    moat_incus::image::ensure(&c, "busybox").expect("busybox image");
    c.call(
        "POST",
        "/1.0/networks",
        Some(&json!({"name": network, "type": "bridge", "config": {
            "ipv4.address": "10.189.7.1/24", "ipv4.nat": "false",
            "ipv6.address": "none", "raw.dnsmasq": "no-resolv"}})),
    )
    .expect("network");
    c.call(
        "POST",
        "/1.0/projects",
        Some(&json!({"name": project, "config": {
            "features.profiles": "true", "features.images": "false",
            "features.storage.volumes": "true", "features.networks": "false"}})),
    )
    .expect("project");
    c.call(
        "PUT",
        &format!("/1.0/profiles/default?project={pq}"),
        Some(&json!({"config": {}, "devices": {
            "root": {"type": "disk", "path": "/", "pool": "default"},
            "eth0": {"type": "nic", "network": network, "name": "eth0"}}})),
    )
    .expect("default profile");
    c.call(
        "POST",
        &format!("/1.0/profiles?project={pq}"),
        Some(&json!({"name": "small", "config": {"limits.cpu.allowance": "50%"}})),
    )
    .expect("profile");
    for (name, ip, extra) in [
        ("web1", "10.189.7.10", json!({"limits.memory": "128MiB"})),
        ("cache", "10.189.7.11", json!({})),
    ] {
        c.call(
            "POST",
            &format!("/1.0/instances?project={pq}"),
            Some(
                &json!({"name": name, "source": {"type": "image", "alias": "busybox"},
                "profiles": ["default", "small"], "config": extra,
                "devices": {"eth0": {"type": "nic", "network": network, "name": "eth0",
                                      "ipv4.address": ip}}}),
            ),
        )
        .expect("instance");
        c.call(
            "PUT",
            &format!("/1.0/instances/{name}/state?project={pq}"),
            Some(&json!({"action": "start"})),
        )
        .expect("start");
    }
    // Another root's machine (moat's marker, a project this root does not own):
    // never this root's orphan, never destroyed by it.
    c.call(
        "POST",
        "/1.0/projects",
        Some(&json!({"name": made.other, "config": {"features.profiles": "false", "features.images": "false"}})),
    )
    .expect("other project");
    c.call(
        "POST",
        &format!("/1.0/instances?project={}", enc(&made.other)),
        Some(
            &json!({"name": "stray", "source": {"type": "image", "alias": "busybox"},
            "profiles": [], "config": {"user.moat.managed": "true"},
            "devices": {"root": {"type": "disk", "path": "/", "pool": "default"}}}),
        ),
    )
    .expect("stray instance");
    let uuid = |n: &str| instance(&c, &project, n)["config"]["volatile.uuid"].clone();
    let before = (uuid("web1"), uuid("cache"));

    let root = Root::new(PathBuf::from("/bin/false"));
    let out = root.path().join("imported");
    let o = root.moat(&[
        "import",
        "incus",
        "--project",
        &project,
        "-o",
        &out.to_string_lossy(),
    ]);
    assert!(o.status.success(), "import failed: {}", stderr(&o));
    let yml = std::fs::read_to_string(out.join("moat.yml")).expect("moat.yml");
    let domain = format!("imp-{sfx}");
    assert!(yml.contains(&format!("  {domain}:\n")), "{yml}");
    assert!(
        yml.contains(&format!(
            "incus: {{ project: \"{project}\", network: \"{network}\", gateway: \"10.189.7.1\" }}"
        )),
        "{yml}"
    );
    assert!(yml.contains("incus: { instance: \"web1\" }"), "{yml}");
    assert!(yml.contains("memory: 128MiB"), "{yml}");
    assert!(yml.contains("ip: \"10.189.7.10\""), "{yml}");
    assert!(yml.contains("profiles: [small]"), "{yml}");

    // Without --apply-firewall, the only change moat wants is its own firewall.
    let dir = out.to_string_lossy().into_owned();
    let plan: Value =
        serde_json::from_str(&root.ok(&["plan", "-f", &dir, "--json"])).expect("plan json");
    let ids: Vec<&str> = plan["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["apply-firewall"], "{plan:#}");
    assert_eq!(plan["orphans"], json!([]), "{plan:#}");
    assert!(plan.get("unmanaged").is_none(), "{plan:#}");

    // The import with --apply-firewall installs it: the plan is then empty.
    let o = root.moat(&[
        "import",
        "incus",
        "--project",
        &project,
        "-o",
        &dir,
        "--force",
        "--apply-firewall",
    ]);
    assert!(o.status.success(), "import failed: {}", stderr(&o));
    assert!(
        stderr(&o).contains("installed moat's firewall"),
        "{}",
        stderr(&o)
    );
    let plan: Value =
        serde_json::from_str(&root.ok(&["plan", "-f", &dir, "--json"])).expect("plan json");
    assert_eq!(plan["actions"], json!([]), "{plan:#}");
    let text = root.ok(&["plan", "-f", &dir]);
    assert!(text.contains("No changes."), "{text}");
    root.ok(&["apply", "-f", &dir]);
    assert_eq!(
        (uuid("web1"), uuid("cache")),
        before,
        "adopted instances were re-created"
    );
    let status = root.ok(&["status", "-f", &dir]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with(&format!("{domain}-web1")) && l.contains("running")),
        "{status}"
    );

    // Drift on an adopted instance: a stop by hand is repaired in place.
    c.call(
        "PUT",
        &format!("/1.0/instances/web1/state?project={pq}"),
        Some(&json!({"action": "stop", "force": true})),
    )
    .expect("stop by hand");
    let text = root.ok(&["plan", "-f", &dir]);
    assert!(
        text.contains(&format!(
            "start machine {domain}-web1 (stopped by hand (drift))"
        )),
        "{text}"
    );
    root.ok(&["apply", "-f", &dir]);
    assert!(wait_status(&c, &project, "web1", "Running"));
    assert_eq!(uuid("web1"), before.0);
    drop(root);
    // `destroy --all` (Root's drop) leaves the adopted network to its owner,
    // and other roots' machines alone.
    assert!(c
        .get_opt(&format!("/1.0/networks/{}", enc(&network)))
        .expect("network query")
        .is_some());
    assert!(c
        .get_opt(&format!(
            "/1.0/instances/stray?project={}",
            enc(&made.other)
        ))
        .expect("stray query")
        .is_some());
}

#[test]
fn snapshots_through_the_cli() {
    let Some(_c) = incus() else { return };
    let root = Root::new(PathBuf::from("/bin/false"));
    let proj = root.path().join("project");
    std::fs::create_dir_all(&proj).expect("project dir");
    std::fs::write(
        proj.join("moat.yml"),
        r#"
schema_version: 1
project: incussnap
addressing: { base: "10.190", zone_step: 1 }
defaults:
  driver: { container: incus }
domains:
  snap:
    egress: none
    machines:
      box: {}
"#,
    )
    .expect("moat.yml");
    let dir = proj.to_string_lossy().into_owned();
    root.ok(&["apply", "-f", &dir]);
    let sh = |cmd: &str| root.ok(&["exec", "snap-box", "--", "sh", "-c", cmd]);

    // `moat logs` of an Incus machine: its console log, read through the API.
    sh("echo console-mark-1 > /dev/console");
    let logs = root.ok(&["logs", "snap-box"]);
    assert!(logs.contains("console-mark-1"), "{logs}");
    let last = root.ok(&["logs", "-n", "1", "snap-box"]);
    assert_eq!(last.trim_end(), "console-mark-1", "{last:?} of {logs:?}");
    // -F follows: a line written afterwards appears.
    let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("--root")
        .arg(root.path())
        .args(["logs", "-F", "snap-box"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moat logs -F");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let out = follow.stdout.take().expect("stdout");
    let follow = Kill(follow);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    sh("echo console-mark-2 > /dev/console");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = vec![];
    while !seen.iter().any(|l: &String| l.contains("console-mark-2")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("logs -F did not show the new line: {seen:?}"),
        }
    }
    drop(follow);

    sh("echo before > /root/mark");
    assert_eq!(
        root.ok(&["snapshot", "create", "snap-box", "s1"]).trim(),
        "s1"
    );
    sh("echo after > /root/mark");
    let ls = root.ok(&["snapshot", "ls", "snap-box"]);
    assert_eq!(ls.trim(), "s1", "{ls}");
    let o = root.moat(&["snapshot", "restore", "snap-box", "s1"]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    assert!(stderr(&o).contains("snap-box restored to snapshot s1"));
    assert_eq!(sh("cat /root/mark").trim(), "before");
    root.ok(&["snapshot", "rm", "snap-box", "s1"]);
    assert_eq!(root.ok(&["snapshot", "ls", "snap-box"]).trim(), "");
    let o = root.moat(&["snapshot", "restore", "snap-box", "nope"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));

    // moat's copy of the console log goes with the machine.
    let copy = root.path().join("incus-console/snap-box.log");
    assert!(copy.exists());
    root.ok(&["destroy", "-f", &dir, "--force", "snap-box"]);
    assert!(!copy.exists());
}
