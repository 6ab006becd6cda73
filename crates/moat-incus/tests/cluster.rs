//! Cluster placement against a private, single-member Incus cluster: a second
//! incusd with its own state dir (`INCUS_DIR`) and socket, so the shared CI
//! incusd is never clustered. `target: MEMBER` places the instance there; an
//! unknown member fails with Incus's message. Everything (instances, bridges,
//! the daemon, its mounts, the state dir, ip_forward) is undone on drop.

mod common;

use common::*;
use moat_incus::client::Client;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const INCUSD: &str = "/usr/libexec/incus/incusd";
const MEMBER: &str = "moatm1";

/// The private incusd; drop stops it and removes its state dir.
struct PrivateIncusd {
    dir: tempfile::TempDir,
    pid: u32,
    ip_forward: String,
}

impl PrivateIncusd {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("unix.socket")
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

impl Drop for PrivateIncusd {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args(["30", INCUSD, "shutdown", "--timeout=20"])
            .env("INCUS_DIR", self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let pid = self.pid.to_string();
        if alive(self.pid) {
            let _ = Command::new("kill").arg(&pid).status();
            let _ = wait_until(10, || !alive(self.pid));
        }
        if alive(self.pid) {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        // Reap it (it is our child through the spawned handle we dropped).
        let _ = wait_until(5, || !alive(self.pid));
        let d = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&d))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount").args(["-R", "-l", m]).status();
        }
        if !self.ip_forward.is_empty() {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", &self.ip_forward);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Starts and initialises the private incusd, clustered as [`MEMBER`].
fn start_private() -> Option<(PrivateIncusd, Client)> {
    if !Path::new(INCUSD).exists() {
        eprintln!("SKIP: {INCUSD} is not installed (scripts/incus-env.sh install)");
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("moat-incus-cluster-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let ip_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    // No image server is reachable: proxies point at a closed loopback port.
    let child = Command::new("setsid")
        .arg(INCUSD)
        .arg("--group")
        .arg("incus-admin")
        .arg(format!(
            "--logfile={}",
            dir.path().join("incusd.log").display()
        ))
        .env("INCUS_DIR", dir.path())
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIP: could not start a private incusd: {e}");
            return None;
        }
    };
    let d = PrivateIncusd {
        dir,
        pid: child.id(),
        ip_forward,
    };
    // Reaped by a thread so that the pid does not linger as a zombie.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    let ready = Command::new("timeout")
        .args(["60", INCUSD, "waitready", "--timeout=50"])
        .env("INCUS_DIR", d.dir.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ready,
        "private incusd did not become ready; see {}/incusd.log",
        d.dir.path().display()
    );
    let c = Client::unix(d.socket());
    c.call(
        "PATCH",
        "/1.0",
        Some(&json!({"config": {
            "core.proxy_https": "http://127.0.0.1:9",
            "core.proxy_http": "http://127.0.0.1:9",
            "images.auto_update_interval": "0",
            "core.https_address": format!("127.0.0.1:{}", free_port()),
        }})),
    )
    .expect("server config");
    c.call(
        "POST",
        "/1.0/storage-pools",
        Some(&json!({"name": "default", "driver": "dir"})),
    )
    .expect("storage pool");
    c.call(
        "PUT",
        "/1.0/profiles/default",
        Some(&json!({"config": {}, "devices": {
            "root": {"type": "disk", "path": "/", "pool": "default"}}})),
    )
    .expect("default profile");
    c.call(
        "PUT",
        "/1.0/cluster",
        Some(&json!({"server_name": MEMBER, "enabled": true})),
    )
    .expect("enable clustering");
    assert!(
        wait_until(60, || c
            .get("/1.0")
            .is_ok_and(
                |s| s["environment"]["server_clustered"].as_bool() == Some(true)
            )),
        "private incusd did not become clustered"
    );
    Some((d, c))
}

#[test]
fn target_places_on_member() {
    if !is_root() {
        eprintln!("SKIP: needs root (a private incusd, bridges, nftables)");
        return;
    }
    let Some((daemon, c)) = start_private() else {
        return;
    };
    assert_eq!(
        moat_incus::driver::IncusDriver::members(&c).expect("members"),
        vec![MEMBER.to_string()]
    );
    // Declared after the daemon: dropped (instances, networks removed) first.
    let t = TestRoot::new(c.clone());
    let sock = daemon.socket();
    let yaml = |target: &str| {
        format!(
            r#"
schema_version: 1
project: incuscluster
addressing: {{ base: "10.188", zone_step: 1 }}
incus: {{ socket: {} }}
defaults:
  driver: {{ container: incus }}
domains:
  cl:
    trust_level: trusted
    egress: none
    target: {target}
    machines:
      box: {{ pids: 100 }}
"#,
            sock.display()
        )
    };
    t.write(&yaml(MEMBER));
    let proj = t.project();
    let mut e = t.engine();
    apply(&mut e, &proj);
    let inst = instance(&c, &t.project_name("cl"), "cl-box").expect("instance cl-box");
    assert_eq!(inst["location"], MEMBER, "instance placed on the member");
    assert!(
        plan_lines(&e, &proj).is_empty(),
        "plan after apply is empty"
    );
    // `moat status` shows the member: a text suffix and `member` in JSON.
    let st = e.status(Some(&proj)).expect("status");
    let m = st
        .machines
        .iter()
        .find(|m| m.name == "cl-box")
        .expect("cl-box");
    assert_eq!(m.member.as_deref(), Some(MEMBER));
    let json = serde_json::to_value(&st).expect("status json");
    assert!(
        json["machines"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["member"] == MEMBER)),
        "{json:#}"
    );
    let text = st.to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with("cl-box") && l.contains(&format!("running on {MEMBER}"))),
        "{text}"
    );

    // An unknown member: apply fails and says which member.
    t.write(
        &yaml(MEMBER)
            .replace("box:", "other:")
            .replace(&format!("target: {MEMBER}"), "target: nope"),
    );
    let r = e
        .apply(
            &proj,
            &moat_engine::ApplyOpts {
                jobs: 2,
                ..Default::default()
            },
            &Progress,
        )
        .map(|r| (r.failed(), r.to_string()))
        .unwrap_or_else(|err| (true, err.to_string()));
    eprintln!("bad target:\n{}", r.1);
    assert!(r.0, "apply with target: nope must fail");
    assert!(r.1.contains("nope"), "the error names the member: {}", r.1);
    drop(e);
    drop(t);
    std::thread::sleep(Duration::from_millis(100));
    drop(daemon);
}
