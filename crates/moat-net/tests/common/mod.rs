//! Harness for root tests: machines are network namespaces, servers and
//! probes are small Python scripts run inside them. Every resource is named
//! from a per-run root (a tempdir, so the root tag differs per run) and is
//! removed by [`Env`]'s Drop, also when a test fails. Tests take [`serial`]
//! because they share `net.ipv4.ip_forward`.
#![allow(dead_code)]

use moat_core::model::Resolved;
use moat_host::exec::{Cmd, Executor, HostExecutor};
use moat_net::{render, NetHost, NetnsTarget, RenderOptions, Ruleset};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};

pub const TCP_PORT: u16 = 5000;
pub const UDP_PORT: u16 = 5001;
const PY: &str = "/usr/bin/python3";

static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `Some(reason)` when this host cannot run the root tests.
pub fn skip_reason() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    if uid.split_whitespace().nth(1) != Some("0") {
        return Some("not root".into());
    }
    for tool in ["ip", "nft", "nsenter", "sysctl", "ping", PY] {
        let found = if tool.starts_with('/') {
            Path::new(tool).exists()
        } else {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !found {
            return Some(format!("`{tool}` not found"));
        }
    }
    None
}

pub fn sh(args: &[&str]) -> String {
    let out = HostExecutor
        .run(&Cmd::new(args[0]).args(args[1..].iter().copied()))
        .unwrap_or_else(|e| panic!("{e}"));
    out.stdout
}

pub const SERVER_PY: &str = r#"
import socket, sys, threading
tps = [int(p) for p in sys.argv[1].split(',') if p]
ups = [int(p) for p in sys.argv[2].split(',') if p]
addrs = sys.argv[3:] or ['0.0.0.0']
def echo(c):
    try:
        while True:
            d = c.recv(4096)
            if not d: break
            c.sendall(d)
    except OSError: pass
    c.close()
def tcp(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def udp(s):
    while True:
        d, p = s.recvfrom(4096)
        s.sendto(d, p)
for a in addrs:
    for tp in tps:
        t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind((a, tp)); t.listen(64)
        threading.Thread(target=tcp, args=(t,), daemon=True).start()
    for up in ups:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((a, up))
        threading.Thread(target=udp, args=(u,), daemon=True).start()
print('ready', flush=True)
threading.Event().wait()
"#;

pub const PROBE_PY: &str = r#"
import json, socket, subprocess, sys, threading
jobs = json.load(sys.stdin); res = {}
def run(j):
    k = j['kind']; ok = False
    try:
        if k == 'tcp':
            s = socket.socket(); s.settimeout(1.0)
            if j.get('src'): s.bind((j['src'], 0))
            s.connect((j['dst'], j['port'])); s.sendall(b'ping'); ok = s.recv(16) == b'ping'
        elif k == 'udp':
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
            if j.get('src'): s.bind((j['src'], 0))
            s.sendto(b'ping', (j['dst'], j['port'])); d, _ = s.recvfrom(16); ok = d == b'ping'
        elif k in ('icmp', 'ipv6'):
            fam = '-4' if k == 'icmp' else '-6'
            ok = subprocess.run(['ping', fam, '-n', '-c1', '-W1', j['dst']], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except Exception:
        ok = False
    res[j['id']] = ok
ts = [threading.Thread(target=run, args=(j,)) for j in jobs]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(res))
"#;

/// One probe: `kind` is tcp, udp, icmp or ipv6 (ping -6).
#[derive(Clone, Debug)]
pub struct Probe {
    pub id: String,
    pub kind: &'static str,
    pub dst: String,
    pub port: u16,
    pub src: Option<String>,
}

impl Probe {
    pub fn new(id: impl Into<String>, kind: &'static str, dst: impl Into<String>) -> Probe {
        let port = if kind == "udp" { UDP_PORT } else { TCP_PORT };
        Probe {
            id: id.into(),
            kind,
            dst: dst.into(),
            port,
            src: None,
        }
    }

    pub fn port(mut self, port: u16) -> Probe {
        self.port = port;
        self
    }

    pub fn with_src(mut self, src: &str) -> Probe {
        self.src = Some(src.into());
        self
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"id": self.id, "kind": self.kind, "dst": self.dst, "port": self.port, "src": self.src})
    }
}

/// A running test root: bridges, machines (netns), ruleset, servers.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub resolved: Resolved,
    pub host: NetHost<HostExecutor>,
    /// Machine full name → netns name.
    pub ns: BTreeMap<String, String>,
    pub alias: String,
    pub run_dir: PathBuf,
    children: Vec<Child>,
    extra_links: Vec<String>,
    prev_forward: Option<bool>,
}

impl Env {
    /// Build everything for `make(root)`: bridges, one netns per NIC, attach, rules.
    pub fn new(make: impl FnOnce(&str) -> Resolved) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().display().to_string();
        let resolved = make(&root);
        let host = NetHost::new(HostExecutor);
        let prev_forward = host.ip_forward().ok();
        let mut env = Env {
            run_dir: dir.path().join("run"),
            dir,
            alias: moat_core::naming::if_alias(&root),
            resolved,
            host,
            ns: BTreeMap::new(),
            children: Vec::new(),
            extra_links: Vec::new(),
            prev_forward,
        };
        std::fs::write(env.dir.path().join("server.py"), SERVER_PY).expect("write server.py");
        std::fs::write(env.dir.path().join("probe.py"), PROBE_PY).expect("write probe.py");
        for net in env.resolved.networks.values() {
            env.host
                .ensure_bridge(net, &env.alias)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let tag = env.resolved.root_tag.clone();
        let nics: Vec<_> = env.resolved.nics.values().cloned().collect();
        for (k, nic) in nics.iter().enumerate() {
            let name = format!("mn{tag}-{k}");
            sh(&["ip", "netns", "add", &name]);
            env.ns.insert(nic.machine.clone(), name.clone());
            // No duplicate address detection: link-local addresses usable at once.
            env.in_ns(
                &nic.machine,
                &["sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0"],
            );
            let net = env.net_of(&nic.machine).clone();
            env.host
                .attach(
                    nic,
                    &net,
                    &env.alias,
                    &NetnsTarget::Path(format!("/run/netns/{name}").into()),
                )
                .unwrap_or_else(|e| panic!("{e}"));
        }
        env.apply(&env.ruleset());
        env
    }

    pub fn tag(&self) -> &str {
        &self.resolved.root_tag
    }

    pub fn ruleset(&self) -> Ruleset {
        render(&self.resolved, RenderOptions::default())
    }

    pub fn apply(&self, rs: &Ruleset) {
        self.host
            .apply_ruleset(rs)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn net_of(&self, machine: &str) -> &moat_core::model::ResolvedNetwork {
        let ip = self.resolved.nics[machine].ip;
        self.resolved
            .networks
            .values()
            .find(|n| n.subnet.contains(&ip))
            .expect("machine network")
    }

    pub fn ip(&self, machine: &str) -> String {
        self.resolved.nics[machine].ip.to_string()
    }

    pub fn gateway(&self, domain: &str) -> String {
        self.resolved.networks[domain].gateway.to_string()
    }

    /// Link-local IPv6 address (EUI-64 of the MAC) of a machine's eth0.
    pub fn link_local(&self, machine: &str) -> String {
        eui64(&self.resolved.nics[machine].mac)
    }

    pub fn in_ns(&self, machine: &str, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.ns[machine]];
        v.extend_from_slice(args);
        sh(&v)
    }

    fn py_cmd(&self, machine: Option<&str>, script: &str) -> Command {
        let script = self.dir.path().join(script).display().to_string();
        let mut c = match machine {
            Some(m) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &self.ns[m], PY, &script]);
                c
            }
            None => {
                let mut c = Command::new(PY);
                c.arg(&script);
                c
            }
        };
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        c
    }

    /// Start an echo server (TCP_PORT, UDP_PORT) in a machine (`None` = on
    /// the host, bound to `addrs` only) and wait until it listens.
    pub fn server(&mut self, machine: Option<&str>, addrs: &[String]) {
        self.server_ports(machine, &[TCP_PORT], &[UDP_PORT], addrs);
    }

    /// Like [`Env::server`] with explicit TCP and UDP ports.
    pub fn server_ports(
        &mut self,
        machine: Option<&str>,
        tcp: &[u16],
        udp: &[u16],
        addrs: &[String],
    ) {
        let list = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let mut c = self.py_cmd(machine, "server.py");
        c.args([list(tcp), list(udp)]).args(addrs);
        let mut child = c.spawn().expect("spawn server");
        let mut line = String::new();
        let out = child.stdout.take().expect("server stdout");
        BufReader::new(out)
            .read_line(&mut line)
            .expect("server ready");
        assert_eq!(line.trim(), "ready", "server in {machine:?} did not start");
        self.children.push(child);
    }

    /// Start probes from a machine (`None` = host); collect with [`collect`].
    pub fn spawn_probes(&self, machine: Option<&str>, probes: &[Probe]) -> Child {
        let mut child = self
            .py_cmd(machine, "probe.py")
            .spawn()
            .expect("spawn probe");
        let jobs = serde_json::Value::Array(probes.iter().map(Probe::json).collect());
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(jobs.to_string().as_bytes())
                .expect("probe stdin");
        }
        child
    }

    pub fn probe(&self, machine: Option<&str>, probes: &[Probe]) -> BTreeMap<String, bool> {
        collect(self.spawn_probes(machine, probes))
    }

    pub fn probe1(&self, machine: Option<&str>, p: Probe) -> bool {
        let id = p.id.clone();
        self.probe(machine, &[p])[&id]
    }

    /// A link to remove at the end (e.g. a dummy with a host address).
    pub fn track_link(&mut self, name: &str) {
        self.extra_links.push(name.to_string());
    }

    pub fn spawn_child(&mut self, child: Child) {
        self.children.push(child);
    }
}

pub fn collect(child: Child) -> BTreeMap<String, bool> {
    let out = child.wait_with_output().expect("probe output");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe output {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

pub fn eui64(mac: &[u8; 6]) -> String {
    format!(
        "fe80::{:02x}{:02x}:{:02x}ff:fe{:02x}:{:02x}{:02x}",
        mac[0] ^ 2,
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5]
    )
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for net in self.resolved.networks.values() {
            let _ = self.host.stop_dhcp(&net.bridge, &self.run_dir);
        }
        for l in &self.extra_links {
            let _ = HostExecutor.run(&Cmd::new("ip").args(["link", "del", l]).allow_failure());
        }
        if let Err(e) = self.host.cleanup_root(&self.resolved.root_tag) {
            eprintln!("cleanup of root {} failed: {e}", self.resolved.root_tag);
        }
        for ns in self.ns.values() {
            let _ = HostExecutor.run(&Cmd::new("ip").args(["netns", "del", ns]).allow_failure());
        }
        if let Some(prev) = self.prev_forward {
            let _ = self.host.set_ip_forward(prev);
        }
    }
}
