//! Shared by the Incus tests: skip when incusd is not reachable, a private moat
//! root whose Incus projects, networks and nftables tables are removed on drop
//! (also when the test fails), and small helpers.
#![allow(dead_code)]

use moat_incus::client::{enc, Client};
use moat_incus::mapping;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The local server, or `None` (and a printed reason) when tests must skip.
pub fn incus() -> Option<Client> {
    if !is_root() {
        eprintln!("SKIP: needs root (incusd's socket, bridges, nftables)");
        return None;
    }
    let c = Client::local();
    match c.get("/1.0") {
        Ok(_) => Some(c),
        Err(e) => {
            eprintln!(
                "SKIP: incusd is not reachable ({e}); start it with scripts/incus-env.sh start"
            );
            None
        }
    }
}

pub struct Progress;
impl moat_engine::Progress for Progress {
    fn event(&self, msg: &str) {
        eprintln!("{msg}");
    }
    fn warnings(&self, _ds: &moat_core::diag::Diagnostics) {}
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// A moat root and project folder of its own; drop removes everything.
pub struct TestRoot {
    pub dir: tempfile::TempDir,
    pub client: Client,
    pub tag: String,
    ip_forward: String,
}

impl TestRoot {
    pub fn new(client: Client) -> TestRoot {
        // Below /tmp (mode 1777): containers' users may enter it.
        let dir = tempfile::Builder::new()
            .prefix("moat-incus-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let root = dir.path().join("root");
        let tag = moat_core::naming::root_tag(&root.to_string_lossy());
        std::fs::create_dir_all(dir.path().join("project")).expect("project dir");
        TestRoot {
            dir,
            client,
            tag,
            ip_forward: std::fs::read_to_string(IP_FORWARD).unwrap_or_default(),
        }
    }
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    pub fn project(&self) -> PathBuf {
        self.dir.path().join("project")
    }
    pub fn write(&self, yaml: &str) {
        std::fs::write(self.project().join("moat.yml"), yaml).expect("write moat.yml");
    }
    pub fn engine(&self) -> moat_engine::Engine {
        moat_engine::Engine::open(moat_engine::Config::for_root(&self.root())).expect("engine")
    }
    pub fn project_name(&self, domain: &str) -> String {
        mapping::project_name(&self.tag, domain)
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        cleanup(&self.client, &self.tag);
        for fam in ["inet", "bridge"] {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", fam, &format!("moat_{}", self.tag)])
                .stderr(std::process::Stdio::null())
                .status();
        }
        if !self.ip_forward.is_empty() {
            let _ = std::fs::write(IP_FORWARD, &self.ip_forward);
        }
    }
}

/// Removes every instance, volume, profile and project `moat-<tag>-*` and the
/// networks created for root `tag`.
pub fn cleanup(c: &Client, tag: &str) {
    let prefix = mapping::project_prefix(tag);
    let projects = c.get("/1.0/projects").unwrap_or_default();
    for p in projects.as_array().into_iter().flatten() {
        let Some(name) = p.as_str().and_then(|u| u.rsplit('/').next()) else {
            continue;
        };
        if !name.starts_with(&prefix) {
            continue;
        }
        let pq = enc(name);
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
        let vols = c
            .get(&format!(
                "/1.0/storage-pools/default/volumes/custom?project={pq}"
            ))
            .unwrap_or_default();
        for v in vols.as_array().into_iter().flatten() {
            let n = v.as_str().and_then(|u| u.rsplit('/').next()).unwrap_or("");
            let n = n.split('?').next().unwrap_or("");
            let _ = c.call(
                "DELETE",
                &format!("/1.0/storage-pools/default/volumes/custom/{n}?project={pq}"),
                None,
            );
        }
        let profs = c
            .get(&format!("/1.0/profiles?project={pq}"))
            .unwrap_or_default();
        for u in profs.as_array().into_iter().flatten() {
            let n = u.as_str().and_then(|u| u.rsplit('/').next()).unwrap_or("");
            let n = n.split('?').next().unwrap_or("");
            if n != "default" {
                let _ = c.call("DELETE", &format!("/1.0/profiles/{n}?project={pq}"), None);
            }
        }
        let _ = c.call(
            "PUT",
            &format!("/1.0/profiles/default?project={pq}"),
            Some(&json!({"config": {}, "devices": {}})),
        );
        let _ = c.call("DELETE", &format!("/1.0/projects/{pq}"), None);
    }
    let nets = c.get("/1.0/networks?recursion=1").unwrap_or_default();
    for n in nets.as_array().into_iter().flatten() {
        if n["config"][mapping::ROOT].as_str() == Some(tag) {
            let name = n["name"].as_str().unwrap_or("");
            let _ = c.call("DELETE", &format!("/1.0/networks/{}", enc(name)), None);
        }
    }
}

/// Instance JSON (with state) of `name` in `project`.
pub fn instance(c: &Client, project: &str, name: &str) -> Option<Value> {
    c.get_opt(&format!("/1.0/instances/{name}?project={}", enc(project)))
        .ok()
        .flatten()
}

/// Waits until `cond` holds (polling), up to `secs`.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

pub fn exec(e: &moat_engine::Engine, machine: &str, cmd: &str) -> (i32, String) {
    let argv: Vec<String> = ["sh", "-c", cmd].iter().map(|s| s.to_string()).collect();
    let o = e.exec(machine, &argv).expect("exec");
    (o.status, String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Plan actions as `"<id>: <reason>"`.
pub fn plan_lines(e: &moat_engine::Engine, project: &Path) -> Vec<String> {
    let checked = e.check(project).expect("check");
    let p = e
        .plan(&checked, &moat_engine::PlanOpts::default())
        .expect("plan");
    p.plan
        .actions
        .iter()
        .map(|a| format!("{}: {}", a.id, a.reason))
        .collect()
}

pub fn apply(e: &mut moat_engine::Engine, project: &Path) -> moat_engine::ApplyReport {
    let r = e
        .apply(
            project,
            &moat_engine::ApplyOpts {
                jobs: 4,
                ..Default::default()
            },
            &Progress,
        )
        .expect("apply");
    assert!(!r.failed(), "apply failed:\n{r}");
    r
}
