//! End-to-end tests of the `moat` binary on the real host: apply busybox
//! projects, then check machines, addresses, flows and cleanup from outside.
//!
//! Needs root, `ip`, `nft`, `dnsmasq` and `umount`; otherwise every test prints
//! `SKIP: ...` and passes. Each test runs in its own root (so its own root tag,
//! bridge and nft table names), with domain names carrying a per-run suffix
//! (machine cgroups are named after machines, see docs/testing.md) and its own
//! `addressing.base` (so concurrent roots do not fight over gateway
//! addresses). A [`Guard`] destroys everything and sweeps leftovers on drop,
//! also when the test fails. Tests run one at a time (a global mutex): they
//! share two cores and `net.ipv4.ip_forward`.

mod common;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn moat_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moat"))
}

/// `moat-supervisor` next to `moat`, built on first use when missing.
fn supervisor() -> Result<PathBuf, String> {
    static SUP: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    SUP.get_or_init(|| {
        let bin = moat_bin();
        let sup = bin.with_file_name("moat-supervisor");
        if sup.exists() {
            return Ok(sup);
        }
        let profile_dir = bin.parent().ok_or("no target dir")?;
        let target = profile_dir.parent().ok_or("no target dir")?;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "moat-runtime", "--bin", "moat-supervisor"])
            .arg("--target-dir")
            .arg(target)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run cargo to build moat-supervisor: {e}"))?;
        if !out.status.success() || !sup.exists() {
            return Err(format!(
                "building moat-supervisor failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(sup)
    })
    .clone()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Why this host cannot run the tests, if it cannot.
fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("e2e tests need root".into());
    }
    for tool in ["ip", "nft", "dnsmasq", "umount"] {
        if !have(tool) {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox (package busybox-static) is missing".into());
    }
    supervisor().err()
}

/// Held for the whole test: serializes tests, prints the test's duration
/// (cleanup included: a test's `Guard` is declared after it, so drops first).
struct Serial {
    _lock: MutexGuard<'static, ()>,
    name: &'static str,
    started: Instant,
}

impl Drop for Serial {
    fn drop(&mut self) {
        eprintln!(
            "time: {} took {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Start a test: None (after printing SKIP) when the host can't run it.
fn start(test: &'static str) -> Option<Serial> {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP: {test}: {why}");
        return None;
    }
    let lock = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    Some(Serial {
        _lock: lock,
        name: test,
        started: Instant::now(),
    })
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn from(o: Output) -> Out {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// One test's project folder and root, torn down on drop.
struct Guard {
    base: PathBuf,
    proj: PathBuf,
    root: PathBuf,
    /// Suffix of every domain name of this run.
    sfx: String,
    tag: String,
    /// Machines whose cgroups the sweep removes besides `<domain><sfx>-*`.
    extra_machines: Vec<String>,
    /// Network namespace (under /run/netns) every command runs in, if any.
    netns: Option<String>,
    /// Run `moat destroy --all --force` before sweeping.
    destroy_on_drop: bool,
    /// ip_forward comes back after the last guard (dropped after `drop` ran).
    _forward: common::ForwardHold,
}

impl Guard {
    fn new() -> Guard {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let sfx = radix36(pid.wrapping_mul(31).wrapping_add(n * 7919) % 46_656, 3);
        let base = std::env::temp_dir().join(format!("me2e-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&base);
        let proj = base.join("p");
        let root = base.join("r");
        std::fs::create_dir_all(&proj).expect("create test folder");
        Guard {
            base,
            proj,
            root,
            sfx,
            tag: String::new(),
            extra_machines: Vec::new(),
            netns: None,
            destroy_on_drop: false,
            _forward: common::ForwardHold::new(),
        }
    }

    /// Domain name `d` made unique to this run.
    fn d(&self, d: &str) -> String {
        format!("{d}{}", self.sfx)
    }

    /// Machine `m` of domain `d` (the name moat gives it).
    fn m(&self, d: &str, m: &str) -> String {
        format!("{}-{m}", self.d(d))
    }

    fn write(&mut self, yaml: &str) {
        std::fs::write(self.proj.join("moat.yml"), yaml).expect("write moat.yml");
        if self.tag.is_empty() {
            let st = self.status();
            self.tag = st["root_tag"].as_str().unwrap_or_default().to_string();
            assert!(!self.tag.is_empty(), "status --json has no root_tag: {st}");
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let moat = moat_bin();
        let mut c = in_ns(self.netns.as_deref(), &moat.to_string_lossy());
        c.arg("--root")
            .arg(&self.root)
            .arg("-f")
            .arg(&self.proj)
            .args(["--color", "never"])
            .args(args)
            .env("MOAT_SUPERVISOR", supervisor().unwrap_or_default())
            .env_remove("MOAT_ROOT")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Out {
        Out::from(self.cmd(args).output().expect("run moat"))
    }

    fn ok(&self, args: &[&str]) -> Out {
        let o = self.run(args);
        assert_eq!(o.code, 0, "moat {args:?} failed:\n{o}");
        o
    }

    fn json(&self, args: &[&str]) -> Value {
        let o = self.ok(args);
        serde_json::from_str(&o.stdout)
            .unwrap_or_else(|e| panic!("moat {args:?}: bad JSON ({e}):\n{o}"))
    }

    fn status(&self) -> Value {
        self.json(&["status", "--json"])
    }

    fn plan(&self) -> Value {
        self.json(&["plan", "--json"])
    }

    /// machine name -> (state, ip)
    fn machines(&self) -> BTreeMap<String, (String, String)> {
        let st = self.status();
        st["machines"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    (
                        m["state"].as_str().unwrap_or_default().to_string(),
                        m["ip"].as_str().unwrap_or_default().to_string(),
                    ),
                )
            })
            .collect()
    }

    fn assert_all_running(&self, expected: usize) {
        let ms = self.machines();
        let running = ms.values().filter(|(s, _)| s == "running").count();
        assert_eq!(running, expected, "not all machines running: {ms:?}");
    }

    fn exec(&self, machine: &str, script: &str) -> Out {
        self.run(&["exec", machine, "--", "sh", "-c", script])
    }

    /// Start a TCP listener in `machine` answering "ok" to each connection.
    fn listen(&self, machine: &str, port: u16) {
        let o = self.exec(
            machine,
            &format!("nc -ll -p {port} -e echo ok >/dev/null 2>&1 </dev/null &"),
        );
        assert_eq!(o.code, 0, "listener on {machine}:{port}:\n{o}");
    }

    /// Whether `from` gets the listener's answer at ip:port.
    fn reach(&self, from: &str, ip: &str, port: u16) -> bool {
        // Listeners start in the background: retry a refused connection briefly.
        for _ in 0..3 {
            let o = self.exec(from, &format!("nc -w 2 {ip} {port} </dev/null 2>&1"));
            if o.stdout.contains("ok") {
                return true;
            }
            if o.stdout.contains("timed out") {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    fn ping(&self, from: &str, to: &str) -> bool {
        self.exec(from, &format!("ping -c1 -W1 {to} >/dev/null 2>&1"))
            .code
            == 0
    }

    /// Host resources of this root that are still there.
    fn leftovers(&self, machines: &[String]) -> Vec<String> {
        let mut left = Vec::new();
        let root = self.root.to_string_lossy().to_string();
        left.extend(
            mounts_under(&self.root)
                .into_iter()
                .map(|m| format!("mount {m}")),
        );
        if !self.tag.is_empty() {
            left.extend(
                links(self.netns.as_deref(), &self.tag)
                    .into_iter()
                    .map(|l| format!("link {l}")),
            );
            for fam in ["inet", "bridge"] {
                if nft_has(self.netns.as_deref(), fam, &self.tag) {
                    left.push(format!("nft table {fam} moat_{}", self.tag));
                }
            }
        }
        left.extend(
            pids_mentioning(&root)
                .into_iter()
                .map(|(p, c)| format!("process {p}: {c}")),
        );
        left.extend(
            cgroups_named(machines)
                .into_iter()
                .map(|c| format!("cgroup {}", c.display())),
        );
        left
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // `moat destroy` stops machines one by one (seconds each): only the
        // tests about destroy use it; the others are swept directly below.
        if self.destroy_on_drop && self.root.exists() {
            let o = self.run(&["destroy", "--all", "--force"]);
            if o.code != 0 {
                eprintln!("cleanup: destroy --all --force: {o}");
            }
        }
        let root = self.root.to_string_lossy().to_string();
        let names: Vec<String> = ["a", "b", "c", "d", "e", "x", "y"]
            .iter()
            .map(|d| self.d(d))
            .collect();
        let mut cgs = cgroup_dirs_prefixed(&names);
        cgs.extend(cgroups_named(&self.extra_machines));
        // The root's cgroup parent in each hierarchy (`moat-<tag>`), removed
        // after the machines' (longer paths go first below).
        if !self.tag.is_empty() {
            if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
                for h in rd.flatten() {
                    let p = h.path().join(format!("moat-{}", self.tag));
                    if p.is_dir() {
                        cgs.push(p);
                    }
                }
            }
        }
        cgs.sort_by_key(|c| std::cmp::Reverse(c.as_os_str().len()));
        // Processes first (supervisors, dnsmasq, machine inits: those live in
        // another mount namespace, so find them by cgroup), so that mounts
        // and cgroups can go.
        let mut pids: Vec<u32> = pids_mentioning(&root).into_iter().map(|(p, _)| p).collect();
        for c in &cgs {
            pids.extend(
                std::fs::read_to_string(c.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse::<u32>().ok()),
            );
        }
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut ms = mounts_under(&self.root);
        ms.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ms {
            let ok = Command::new("umount")
                .arg(&m)
                .stderr(Stdio::null())
                .status();
            if !ok.is_ok_and(|s| s.success()) {
                let _ = Command::new("umount").args(["-l", &m]).status();
            }
        }
        for _ in 0..10 {
            cgs.retain(|c| c.exists() && std::fs::remove_dir(c).is_err());
            if cgs.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !self.tag.is_empty() {
            for l in links(self.netns.as_deref(), &self.tag) {
                let _ = in_ns(self.netns.as_deref(), "ip")
                    .args(["link", "del", &l])
                    .status();
            }
            for fam in ["inet", "bridge"] {
                if nft_has(self.netns.as_deref(), fam, &self.tag) {
                    let _ = in_ns(self.netns.as_deref(), "nft")
                        .args(["delete", "table", fam, &format!("moat_{}", self.tag)])
                        .status();
                }
            }
        }
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn radix36(mut n: u32, width: usize) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    for _ in 0..width {
        s.push(digits[(n % 36) as usize]);
        n /= 36;
    }
    s.reverse();
    // Domain names start with a letter in the tests: the suffix follows one.
    String::from_utf8(s).unwrap_or_default()
}

fn mounts_under(root: &Path) -> Vec<String> {
    let prefix = format!("{}/", root.display());
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&prefix) || *m == prefix.trim_end_matches('/'))
        .map(str::to_string)
        .collect()
}

/// `prog`, run inside network namespace `ns` (by `nsenter`, which leaves the
/// mount namespace alone) when given.
fn in_ns(ns: Option<&str>, prog: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(prog);
            c
        }
        None => Command::new(prog),
    }
}

fn links(ns: Option<&str>, tag: &str) -> Vec<String> {
    let out = in_ns(ns, "ip")
        .args(["-o", "link", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let (a, b) = (format!("mt{tag}-"), format!("mv{tag}-"));
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with(&a) || n.starts_with(&b))
        .collect()
}

fn nft_has(ns: Option<&str>, family: &str, tag: &str) -> bool {
    in_ns(ns, "nft")
        .args(["list", "table", family, &format!("moat_{tag}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Processes whose command line, or root directory, mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let in_root = std::fs::read_link(e.path().join("root"))
            .is_ok_and(|r| r.to_string_lossy().contains(needle));
        if cmdline.contains(needle) || in_root {
            found.push((pid, cmdline.trim().to_string()));
        }
    }
    found
}

/// Cgroup directories (any v1 controller or v2) whose name is one of `names`.
fn cgroups_named(names: &[String]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk_cgroups(&mut |p: &Path| {
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| names.iter().any(|m| m == n))
        {
            found.push(p.to_path_buf());
        }
    });
    found
}

/// Cgroup directories whose name starts with one of `prefixes`.
fn cgroup_dirs_prefixed(prefixes: &[String]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk_cgroups(&mut |p: &Path| {
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| prefixes.iter().any(|m| n.starts_with(&format!("{m}-"))))
        {
            found.push(p.to_path_buf());
        }
    });
    found
}

/// Visit cgroup directories up to three levels under each hierarchy.
fn walk_cgroups(f: &mut dyn FnMut(&Path)) {
    fn rec(dir: &Path, depth: u32, f: &mut dyn FnMut(&Path)) {
        if depth == 0 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let p = e.path();
                f(&p);
                rec(&p, depth - 1, f);
            }
        }
    }
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for e in rd.flatten() {
        rec(&e.path(), 3, f);
    }
}

/// A second octet N such that no host address is in 10.N..10.N+5 (the six
/// zones with `zone_step: 1`), searched from a per-process start so that two
/// test processes running at once (say, CI and a developer) pick different ones.
fn free_base() -> u32 {
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let used = |n: u32| addrs.contains(&format!(" 10.{n}."));
    let bases: Vec<u32> = (0..9).map(|i| 196 + i * 6).collect();
    let start = std::process::id() as usize % bases.len();
    (0..bases.len())
        .map(|i| bases[(start + i) % bases.len()])
        .find(|&b| !(b..b + 6).any(used))
        .unwrap_or(bases[start])
}

/// A three-domain project on subnets no other root uses now.
fn three_domains(g: &Guard) -> String {
    let base = free_base();
    let (a, b, c) = (g.d("a"), g.d("b"), g.d("c"));
    format!(
        r#"schema_version: 1
project: e2e
addressing: {{base: "10.{base}", zone_step: 1}}
domains:
  {a}:
    trust_level: trusted
    egress: none
    machines:
      one: {{memory: 64MiB}}
      two: {{}}
  {b}:
    trust_level: untrusted
    egress: none
    machines:
      three: {{}}
  {c}:
    trust_level: semi-trusted
    egress: none
    machines:
      four: {{}}
policies:
  - from: {b}
    to: {a}-two
    ports: [8080]
"#
    )
}

#[test]
fn apply_from_scratch_then_flows() {
    let Some(_l) = start("apply_from_scratch_then_flows") else {
        return;
    };
    let mut g = Guard::new();
    g.write(&three_domains(&g));
    let t = Instant::now();
    g.ok(&["apply"]);
    eprintln!("apply (4 machines, 3 domains): {:?}", t.elapsed());

    let (one, two, three, four) = (
        g.m("a", "one"),
        g.m("a", "two"),
        g.m("b", "three"),
        g.m("c", "four"),
    );
    let ms = g.machines();
    let st = g.status();
    let subnet = |d: &str| -> String {
        st["domains"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == d)
            .and_then(|e| e["subnet"].as_str())
            .and_then(|s| s.rsplit_once('.'))
            .map(|(net, _)| format!("{net}."))
            .unwrap_or_else(|| panic!("no subnet for {d}: {st}"))
    };
    for (m, d) in [(&one, "a"), (&two, "a"), (&three, "b"), (&four, "c")] {
        let (state, ip) = ms
            .get(m.as_str())
            .unwrap_or_else(|| panic!("{m} missing: {ms:?}"));
        assert_eq!(state, "running", "{m}: {ms:?}");
        let net = subnet(&g.d(d));
        assert!(
            ip.starts_with(&net),
            "{m} has address {ip:?}, not in {net}0/24"
        );
    }
    let ip = |m: &str| ms[m].1.clone();

    // exec passes the command's exit code through.
    assert_eq!(g.exec(&one, "exit 7").code, 7);
    assert_eq!(g.exec(&one, "true").code, 0);
    // The machine really has its allocated address.
    let o = g.exec(&one, "ip -4 -o addr show");
    assert!(o.stdout.contains(&ip(&one)), "{o}");

    // /etc/hosts names domain peers; ping by name works inside a domain.
    let hosts = g.exec(&one, "cat /etc/hosts").stdout;
    assert!(hosts.contains(&two), "/etc/hosts of {one}:\n{hosts}");
    assert!(g.ping(&one, &two), "{one} cannot ping {two} by name");
    assert!(
        !g.ping(&three, &ip(&one)),
        "{three} pinged {one} across domains"
    );
    assert!(
        !g.ping(&four, &ip(&three)),
        "{four} pinged {three} across domains"
    );

    g.listen(&two, 8080);
    g.listen(&two, 9000);
    assert!(g.reach(&one, &ip(&two), 9000), "intra-domain tcp blocked");
    assert!(g.reach(&three, &ip(&two), 8080), "policy port 8080 blocked");
    assert!(
        !g.reach(&three, &ip(&two), 9000),
        "port 9000 open across domains"
    );
    assert!(
        !g.reach(&four, &ip(&two), 8080),
        "8080 open to a domain without policy"
    );
}

#[test]
fn second_apply_is_a_no_op() {
    let Some(_l) = start("second_apply_is_a_no_op") else {
        return;
    };
    let mut g = Guard::new();
    g.write(&three_domains(&g));
    g.ok(&["apply"]);
    let plan = g.plan();
    assert_eq!(
        plan["actions"],
        Value::Array(vec![]),
        "plan after apply: {plan}"
    );
    let o = g.ok(&["apply"]);
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(
        all.contains("No changes") || all.contains("Nothing to do"),
        "second apply did something:\n{o}"
    );
    assert!(!all.contains("==>"), "second apply ran actions:\n{o}");
    g.assert_all_running(4);
}

fn supervisor_pid(root: &Path, machine: &str) -> Option<u32> {
    let want = format!("{}/machines/{machine}", root.display());
    pids_mentioning(&want)
        .into_iter()
        .find(|(_, c)| c.contains("moat-supervisor") && c.trim_end().ends_with(&want))
        .map(|(p, _)| p)
}

#[test]
fn drift_is_planned_and_repaired() {
    let Some(_l) = start("drift_is_planned_and_repaired") else {
        return;
    };
    let mut g = Guard::new();
    g.write(&three_domains(&g));
    g.ok(&["apply"]);
    let (one, three) = (g.m("a", "one"), g.m("b", "three"));

    let pid = supervisor_pid(&g.root, &one).expect("supervisor of machine one");
    let _ = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    g.ok(&["stop", &three]);
    std::thread::sleep(Duration::from_millis(300));

    let plan = g.plan();
    let acts = plan["actions"].as_array().cloned().unwrap_or_default();
    for m in [&one, &three] {
        assert!(
            acts.iter()
                .any(|a| a["machine"] == m.as_str() && a["drift"] == true),
            "plan does not show {m} as drift: {plan}"
        );
    }
    let o = g.run(&["apply"]);
    assert_eq!(o.code, 0, "repairing apply failed:\n{o}");
    g.assert_all_running(4);
    assert_eq!(g.plan()["actions"], Value::Array(vec![]));
}

#[test]
fn orphans_kept_until_prune() {
    let Some(_l) = start("orphans_kept_until_prune") else {
        return;
    };
    let mut g = Guard::new();
    let full = three_domains(&g);
    g.write(&full);
    g.ok(&["apply"]);
    let four = g.m("c", "four");
    // Drop machine four (and its whole domain) from the file.
    let c = g.d("c");
    let cut = full.replace(
        &format!("  {c}:\n    trust_level: semi-trusted\n    egress: none\n    machines:\n      four: {{}}\n"),
        "",
    );
    assert_ne!(cut, full);
    g.write(&cut);
    let plan = g.plan();
    let orphans = plan["orphans"].to_string();
    assert!(orphans.contains(&four), "plan orphans lack {four}: {plan}");
    g.ok(&["apply"]);
    assert!(
        g.machines().contains_key(&four),
        "apply without --prune deleted {four}"
    );
    let o = g.run(&["apply", "--prune"]);
    assert_eq!(o.code, 0, "apply --prune failed:\n{o}");
    assert!(!g.machines().contains_key(&four), "{four} survived --prune");
    assert!(
        cgroups_named(std::slice::from_ref(&four)).is_empty(),
        "cgroup of pruned {four} left"
    );
}

#[test]
fn allocations_stay_stable() {
    let Some(_l) = start("allocations_stay_stable") else {
        return;
    };
    let mut g = Guard::new();
    let first = three_domains(&g);
    g.write(&first);
    g.ok(&["apply"]);
    let before = g.machines();
    let subnets_before = g.status()["domains"].clone();
    // A machine sorting before the others in domain a, and a new domain
    // sorting first.
    let (a, x) = (g.d("a"), g.d("x"));
    let more = first
        .replace(
            "      one: {memory: 64MiB}\n",
            "      aaa: {}\n      one: {memory: 64MiB}\n",
        )
        .replace(
            "domains:\n",
            &format!("domains:\n  {x}:\n    trust_level: trusted\n    egress: none\n    machines:\n      five: {{}}\n"),
        );
    assert!(more.contains(&format!("{a}:")) && more.contains("aaa: {}"));
    g.write(&more);
    g.ok(&["apply"]);
    let after = g.machines();
    for (m, (_, ip)) in &before {
        assert_eq!(&after[m].1, ip, "{m} moved: {before:?} -> {after:?}");
    }
    let subnets_after = g.status()["domains"].clone();
    for d in subnets_before.as_array().into_iter().flatten() {
        let same = subnets_after
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == d["name"])
            .map(|e| e["subnet"].clone());
        assert_eq!(
            same,
            Some(d["subnet"].clone()),
            "subnet of {} moved",
            d["name"]
        );
    }
    g.assert_all_running(6);
}

#[test]
fn destroy_all_leaves_nothing() {
    let Some(_l) = start("destroy_all_leaves_nothing") else {
        return;
    };
    let mut g = Guard::new();
    g.write(&three_domains(&g));
    g.ok(&["apply"]);
    let names: Vec<String> = g.machines().into_keys().collect();
    assert!(!g.leftovers(&names).is_empty(), "nothing to destroy?");
    let o = g.run(&["destroy", "--all", "--force"]);
    let left = g.leftovers(&names);
    assert!(
        o.code == 0 && left.is_empty(),
        "destroy --all --force:\n{o}\nleft on the host:\n{}",
        left.join("\n")
    );
}

#[test]
fn concurrent_apply_is_refused_then_waits() {
    let Some(_l) = start("concurrent_apply_is_refused_then_waits") else {
        return;
    };
    let mut g = Guard::new();
    g.write(&three_domains(&g));
    std::fs::create_dir_all(&g.root).expect("root");
    let lock = g.root.join("apply.lock");
    // Hold the flock the way a running apply does, with its pid recorded.
    let script = format!(
        "printf 'pid %s\\nstarted %s\\n' $$ $(date +%s) > '{l}'; exec flock '{l}' sleep 3",
        l = lock.display()
    );
    let mut holder = Command::new("sh")
        .args(["-c", &script])
        .spawn()
        .expect("flock holder");
    let hpid = holder.id();
    std::thread::sleep(Duration::from_millis(300));
    let o = g.run(&["apply"]);
    assert_eq!(o.code, 3, "apply under a held lock:\n{o}");
    assert!(
        o.stderr.contains(&hpid.to_string()),
        "lock message does not name pid {hpid}:\n{o}"
    );
    let t = Instant::now();
    let o = g.run(&["apply", "--wait", "30"]);
    assert_eq!(o.code, 0, "apply --wait 30:\n{o}");
    assert!(t.elapsed() >= Duration::from_millis(1500), "did not wait");
    let _ = holder.wait();
    g.assert_all_running(4);
}

const SHOWCASE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/reference/anklume-showcase"
);

/// Copy the showcase, with containers instead of VMs and busybox images.
fn copy_showcase(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_showcase(&e.path(), &dst)?;
            continue;
        }
        let p = e.path();
        if p.extension().is_some_and(|x| x == "yml" || x == "yaml") {
            let text = std::fs::read_to_string(&p)?;
            let mut out = String::new();
            for line in text.lines() {
                let body = line.trim_start();
                let indent = &line[..line.len() - body.len()];
                if body.starts_with("type: vm") {
                    out += &format!("{indent}type: lxc\n");
                } else if body.starts_with("os_image:") || body.starts_with("image:") {
                    let key = body.split(':').next().unwrap_or("os_image");
                    out += &format!("{indent}{key}: busybox\n");
                } else {
                    out += line;
                    out.push('\n');
                }
            }
            std::fs::write(dst, out)?;
        } else {
            std::fs::copy(&p, dst)?;
        }
    }
    Ok(())
}

#[test]
fn anklume_showcase_as_busybox_containers() {
    let Some(_l) = start("anklume_showcase_as_busybox_containers") else {
        return;
    };
    let src = Path::new(SHOWCASE);
    if !src.join("anklume.yml").exists() {
        eprintln!("SKIP: showcase not found at {}", src.display());
        return;
    }
    if !have("nsenter") {
        eprintln!("SKIP: showcase: `nsenter` (util-linux) is missing");
        return;
    }
    let mut g = Guard::new();
    // Its subnets are fixed (10.100-10.150): run it in a network namespace of
    // its own so that it never meets the host's or another root's addresses.
    let ns = format!("me2e-{}", std::process::id());
    let o = Out::from(
        Command::new("ip")
            .args(["netns", "add", &ns])
            .output()
            .expect("ip netns add"),
    );
    if o.code != 0 {
        eprintln!("SKIP: showcase: cannot create netns {ns}: {o}");
        return;
    }
    g.netns = Some(ns);
    g.proj = g.base.join("showcase");
    copy_showcase(src, &g.proj).expect("copy showcase");
    let st = g.status();
    g.tag = st["root_tag"].as_str().unwrap_or_default().to_string();
    let t = Instant::now();
    let o = g.run(&["apply", "-j", "4"]);
    eprintln!("showcase apply: {:?}", t.elapsed());
    assert_eq!(o.code, 0, "showcase apply:\n{o}");

    let st = g.status();
    let mut subnets = BTreeMap::new();
    for d in st["domains"].as_array().into_iter().flatten() {
        if d["enabled"] == true {
            subnets.insert(
                d["name"].as_str().unwrap_or_default().to_string(),
                d["subnet"].as_str().unwrap_or_default().to_string(),
            );
        }
    }
    let want: BTreeMap<String, String> = [
        ("vault", "10.100.0.0/24"),
        ("ai-tools", "10.110.0.0/24"),
        ("pro", "10.110.1.0/24"),
        ("perso", "10.120.0.0/24"),
        ("sandbox", "10.150.0.0/24"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(subnets, want);
    let bridges = links(g.netns.as_deref(), &g.tag)
        .into_iter()
        .filter(|l| l.starts_with("mt"))
        .count();
    assert_eq!(
        bridges,
        5,
        "bridges: {:?}",
        links(g.netns.as_deref(), &g.tag)
    );
    let ms = g.machines();
    g.extra_machines = ms.keys().cloned().collect();
    assert_eq!(ms.len(), 20, "{ms:?}");
    assert!(ms.values().all(|(s, _)| s == "running"), "{ms:?}");
    let ip = |m: &str| {
        ms.get(m)
            .map(|x| x.1.clone())
            .unwrap_or_else(|| panic!("no {m}"))
    };

    let gpu = "ai-tools-gpu-server";
    let (pro, perso) = ("pro-dev", "perso-desktop");
    for (m, p) in [
        (gpu, 11434),
        (gpu, 7777),
        (pro, 22),
        (pro, 7777),
        (perso, 22),
        ("sandbox-tor-gateway", 9050),
    ] {
        g.listen(m, p);
    }
    let cases: &[(&str, &str, u16, bool)] = &[
        ("pro-desktop", gpu, 11434, true),
        (perso, gpu, 11434, true),
        (perso, pro, 22, true),
        (pro, perso, 22, true),
        ("sandbox-risky-browse", "sandbox-tor-gateway", 9050, true),
        ("vault-secrets", pro, 7777, true),
        ("vault-secrets", pro, 22, true),
        (pro, gpu, 7777, false),
        (gpu, pro, 22, false),
        (gpu, pro, 7777, false),
        ("sandbox-risky-browse", pro, 22, false),
        (perso, pro, 7777, false),
    ];
    let mut wrong = Vec::new();
    for &(from, to, port, allowed) in cases {
        let got = g.reach(from, &ip(to), port);
        eprintln!(
            "{from} -> {to}:{port}: {}",
            if got { "open" } else { "blocked" }
        );
        if got != allowed {
            wrong.push(format!(
                "{from} -> {to}:{port} expected {} got {}",
                allowed, got
            ));
        }
    }
    assert!(wrong.is_empty(), "showcase flows:\n{}", wrong.join("\n"));
}
