//! Kill tests (crash safety, docs/crash-safety.md): `moat apply` killed with
//! SIGKILL at a random moment of an apply of a multi-domain project (three
//! domains, six busybox containers, two policies, DHCP on one domain); after
//! each kill an apply must converge (exit 0, then an empty plan) and a scan of
//! the host (`common::scan`) must find host and state store consistent; each
//! time the root is destroyed the scan must find nothing left at all.
//!
//! Runs start from varied states (from scratch, partly destroyed, crashed
//! machines and DHCP server, another version of the project) so that kills
//! land in every kind of action. The kill moment is uniform in [0, 1.2 × the
//! duration of an un-killed apply from the same kind of start], each measured
//! once at the start of the test.
//!
//! `MOAT_KILL_RUNS` sets the number of runs (default 50), `MOAT_KILL_SEED` the
//! random seed (printed by every run). Needs root, `ip`, `nft`, `dnsmasq` and
//! /bin/busybox; otherwise prints `SKIP: ...` and passes.

mod common;

use common::scan;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn moat_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moat"))
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn skip_reason() -> Option<String> {
    if !common::is_root() {
        return Some("kill tests need root".into());
    }
    for tool in ["ip", "nft", "dnsmasq", "umount"] {
        if !have(tool) {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox (package busybox-static) is missing".into());
    }
    if common::supervisor().is_none() {
        return Some("moat-supervisor is missing and could not be built".into());
    }
    None
}

fn runs() -> u32 {
    std::env::var("MOAT_KILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// xorshift64*: reproducible from the printed seed, no extra dependency.
struct Rng(u64);
impl Rng {
    fn new(salt: u64) -> Rng {
        let seed = std::env::var("MOAT_KILL_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("kill test seed: {seed} (MOAT_KILL_SEED={seed} repeats it)");
        Rng((seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, max).
    fn below(&mut self, max: u64) -> u64 {
        if max == 0 {
            0
        } else {
            self.next() % max
        }
    }
}

/// Second octets in use by the labs of this process.
static BASES: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A second octet N such that no host address is in 10.N..10.N+5 and no
/// other lab of this process uses it.
fn free_base() -> u32 {
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let used = |n: u32| addrs.contains(&format!(" 10.{n}."));
    let mut taken = BASES.lock().unwrap_or_else(|p| p.into_inner());
    // 10.160-10.195: clear of the e2e tests' 196-250 and the showcase's 100-150.
    let bases: Vec<u32> = (0..6).map(|i| 160 + i * 6).collect();
    let start = std::process::id() as usize % bases.len();
    let b = (0..bases.len())
        .map(|i| bases[(start + i) % bases.len()])
        .find(|&b| !taken.contains(&b) && !(b..b + 6).any(used))
        .unwrap_or(bases[start]);
    taken.push(b);
    b
}

fn radix36(mut n: u32, width: usize) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    for _ in 0..width {
        s.push(digits[(n % 36) as usize]);
        n /= 36;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// One test's project and root; `Drop` destroys and sweeps everything.
struct Lab {
    base: PathBuf,
    proj: PathBuf,
    root: PathBuf,
    sfx: String,
    net: u32,
    sup: PathBuf,
    /// ip_forward comes back after the last lab (dropped after `drop` ran).
    _forward: common::ForwardHold,
}

impl Lab {
    fn new(kind: &str) -> Lab {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let base = std::env::temp_dir().join(format!("mcrash-{kind}-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&base);
        let proj = base.join("p");
        std::fs::create_dir_all(&proj).expect("create the test folder");
        Lab {
            root: base.join("r"),
            proj,
            base,
            sfx: radix36(pid.wrapping_mul(31).wrapping_add(n * 7919) % 46_656, 3),
            net: free_base(),
            sup: common::supervisor().unwrap_or_default(),
            _forward: common::ForwardHold::new(),
        }
    }

    /// Domain `d` of this lab (`k<sfx><d>`).
    fn d(&self, d: &str) -> String {
        format!("k{}{d}", self.sfx)
    }

    fn m(&self, d: &str, m: &str) -> String {
        format!("{}-{m}", self.d(d))
    }

    /// The project; `variant` adds a machine, changes the command of
    /// another (a re-create) and adds a policy.
    fn yaml(&self, variant: bool) -> String {
        let (a, b, c) = (self.d("a"), self.d("b"), self.d("c"));
        let (six, extra, policy) = if variant {
            (
                r#"{command: ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait; done"]}"#,
                "      seven: {}\n",
                format!("  - from: {a}-one\n    to: {c}\n    ports: [9000]\n"),
            )
        } else {
            ("{}", "", String::new())
        };
        format!(
            r#"schema_version: 1
project: crash
addressing: {{base: "10.{net}", zone_step: 1}}
domains:
  {a}:
    trust_level: trusted
    egress: none
    dhcp: true
    machines:
      one: {{memory: 64MiB}}
      two: {{}}
  {b}:
    trust_level: untrusted
    egress: none
    dhcp: false
    machines:
      three: {{}}
      four: {{}}
  {c}:
    trust_level: semi-trusted
    egress: none
    dhcp: false
    machines:
      five: {{}}
      six: {six}
{extra}policies:
  - from: {b}
    to: {a}-two
    ports: [8080]
  - from: {c}-five
    to: {b}
    ports: [22]
{policy}"#,
            net = self.net
        )
    }

    fn write(&self, variant: bool) {
        std::fs::write(self.proj.join("moat.yml"), self.yaml(variant)).expect("write moat.yml");
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(moat_bin());
        c.arg("--root")
            .arg(&self.root)
            .arg("-f")
            .arg(&self.proj)
            .args(["--color", "never"])
            .args(args)
            .env("MOAT_SUPERVISOR", &self.sup)
            .env_remove("MOAT_ROOT")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run moat")
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moat")
    }

    /// Destroy everything; then nothing of the root may be left (but the
    /// processes in `ignore`: a running daemon).
    fn destroy_all(&self, ignore: &[u32]) -> Result<(), String> {
        let o = self.run(&["destroy", "--all", "--force"]);
        let left = scan::leftovers(&self.root, ignore);
        if o.status.success() && left.is_empty() {
            return Ok(());
        }
        Err(format!(
            "destroy --all --force: {}\n{}\nleft on the host:\n  {}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            left.join("\n  ")
        ))
    }

    /// Kill supervisors whose machine starts with `prefix`.
    fn crash_machines(&self, prefix: &str) {
        for (pid, m) in scan::scan(&self.root).supervisors {
            if m.starts_with(prefix) {
                kill9(pid);
            }
        }
    }

    fn crash_dnsmasq(&self) {
        for (pid, _) in scan::scan(&self.root).dnsmasqs {
            kill9(pid);
        }
    }

    /// Converge check after a kill: apply exits 0, the plan is then empty,
    /// and host and state store agree. Returns what went wrong.
    fn converges(&self, ignore: &[u32]) -> Vec<String> {
        let mut bad = Vec::new();
        // --wait: a helper process the killed apply forked (e.g. mid-way
        // through spawning a command) can hold the lock for a moment after
        // the apply itself is reaped; one that never lets go still fails
        // here, and the scan below reports any process left behind.
        let o = self.run(&["apply", "--prune", "--wait", "30"]);
        if !o.status.success() {
            bad.push(format!(
                "re-apply exited {:?}:\n{}{}",
                o.status.code(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        let p = self.run(&["plan", "--prune", "--json"]);
        let plan: Value = serde_json::from_slice(&p.stdout).unwrap_or_default();
        if plan["actions"] != Value::Array(vec![]) {
            bad.push(format!(
                "plan after re-apply is not empty: {}",
                plan["actions"]
            ));
        }
        // A destroyed machine's host interface goes when the kernel tears
        // down its network namespace, in the background (the netns file is
        // gone, the veth pair follows): on a busy host that can take a
        // moment. Only that is waited for, up to 2 s.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut found = scan::consistency(&self.root, ignore);
        while !found.is_empty()
            && found.iter().all(|p| {
                p.starts_with("interface ") && p.ends_with("belongs to no recorded machine")
            })
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
            found = scan::consistency(&self.root, ignore);
        }
        bad.extend(found);
        bad
    }

    /// Remove by hand whatever moat did not (runs also when a test fails).
    fn sweep(&self) {
        let s = scan::scan(&self.root);
        let mut pids: Vec<u32> = s.supervisors.iter().map(|(p, _)| *p).collect();
        pids.extend(s.dnsmasqs.iter().map(|(p, _)| *p));
        pids.extend(s.machine_procs.iter().map(|(p, _)| *p));
        pids.extend(s.other_procs.iter().map(|(p, _)| *p));
        for p in pids {
            kill9(p);
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut ms = s.mounts.clone();
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
        let mut cgs = s.cgroups.clone();
        cgs.sort_by_key(|c| std::cmp::Reverse(c.as_os_str().len()));
        for _ in 0..10 {
            cgs.retain(|c| c.exists() && std::fs::remove_dir(c).is_err());
            if cgs.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for l in s.links.keys().filter(|l| l.starts_with("mt")) {
            let _ = Command::new("ip").args(["link", "del", l]).status();
        }
        for l in s.links.keys().filter(|l| l.starts_with("mv")) {
            let _ = Command::new("ip")
                .args(["link", "del", l])
                .stderr(Stdio::null())
                .status();
        }
        for t in &s.nft_tables {
            let mut it = t.split(' ');
            if let (Some(f), Some(n)) = (it.next(), it.next()) {
                let _ = Command::new("nft").args(["delete", "table", f, n]).status();
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.root.exists() {
            let _ = self.run(&["destroy", "--all", "--force"]);
            self.sweep();
        }
        let _ = std::fs::remove_dir_all(&self.base);
        let mut taken = BASES.lock().unwrap_or_else(|p| p.into_inner());
        taken.retain(|b| *b != self.net);
    }
}

fn kill9(pid: u32) {
    let _ = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// How a run's apply finds the host.
#[derive(Clone, Copy, Debug)]
enum Start {
    /// Nothing there (the previous run ended with destroy --all); every
    /// other time the image is removed as well.
    Scratch,
    /// One machine and one whole domain destroyed.
    Partial,
    /// Domain b's machines and the DHCP server killed; the project changed.
    Crashed,
    /// The project changed back (a machine to prune, a limit, a policy).
    Changed,
}

impl Start {
    fn of(run: u32) -> Start {
        [
            Start::Scratch,
            Start::Partial,
            Start::Crashed,
            Start::Changed,
        ][(run % 4) as usize]
    }
}

/// Tally of a kill test, printed at the end (docs/crash-safety.md quotes it).
#[derive(Default)]
struct Tally {
    runs: u32,
    mid: u32,
    after: u32,
    converged: u32,
    clean_destroys: u32,
    destroys: u32,
    failures: Vec<String>,
}

impl Tally {
    fn report(&self, what: &str, took: Duration) {
        eprintln!(
            "{what}: {} runs, killed mid-apply {}, after it ended {}; converged {}/{}; \
             destroy scans clean {}/{}; {} failures; {:.0} s",
            self.runs,
            self.mid,
            self.after,
            self.converged,
            self.runs,
            self.clean_destroys,
            self.destroys,
            self.failures.len(),
            took.as_secs_f64()
        );
    }
}

/// Prepare the host (and the project file) for run `run` (see [`Start`]).
fn prepare(lab: &Lab, run: u32, ignore: &[u32], tally: &mut Tally) {
    match Start::of(run) {
        Start::Scratch => {
            tally.destroys += 1;
            match lab.destroy_all(ignore) {
                Ok(()) => tally.clean_destroys += 1,
                Err(e) => {
                    tally.failures.push(format!("run {run}: before it: {e}"));
                    lab.sweep();
                }
            }
            // Every other time the image goes too: kills then land in its build.
            if run.is_multiple_of(8) {
                let _ = lab.run(&["image", "rm", "busybox"]);
                let _ = lab.run(&["image", "gc"]);
            }
            lab.write(false);
        }
        Start::Partial => {
            let _ = lab.run(&["destroy", &lab.m("a", "one"), "--force"]);
            let _ = lab.run(&["destroy", "--domain", &lab.d("c"), "--force"]);
        }
        Start::Crashed => {
            lab.crash_machines(&format!("{}-", lab.d("b")));
            lab.crash_dnsmasq();
            lab.write(true);
        }
        Start::Changed => {
            lab.crash_machines(&lab.m("c", "five"));
            lab.write(false);
        }
    }
}

/// Kill windows per kind of start ([`Start`] order): 1.2 × the duration of
/// an un-killed `apply --prune` from that start. Starts from a partly applied
/// host take a fraction of an apply from scratch; one window for all would
/// put most of their kills after the apply ended. Runs the three non-scratch
/// starts once, in cycle order, from the applied project; panics if one of
/// those applies fails or leaves the host inconsistent.
fn windows(lab: &Lab, ignore: &[u32], scratch: Duration) -> [u64; 4] {
    let mut w = [(scratch.as_millis() as u64) * 6 / 5; 4];
    let mut tally = Tally::default();
    for run in 1..4 {
        prepare(lab, run, ignore, &mut tally);
        let t = Instant::now();
        let o = lab.run(&["apply", "--prune"]);
        let took = t.elapsed();
        assert!(
            o.status.success(),
            "un-killed apply from the {:?} start failed:\n{}",
            Start::of(run),
            String::from_utf8_lossy(&o.stderr)
        );
        let bad = lab.converges(ignore);
        assert!(
            bad.is_empty(),
            "un-killed apply from the {:?} start is inconsistent: {bad:?}",
            Start::of(run)
        );
        w[run as usize] = ((took.as_millis() as u64) * 6 / 5).max(1);
    }
    eprintln!("kill windows (ms) per start (scratch, partial, crashed, changed): {w:?}");
    w
}

#[test]
fn apply_killed_at_random_moments_converges() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP: apply_killed_at_random_moments_converges: {why}");
        return;
    }
    let t0 = Instant::now();
    let lab = Lab::new("apply");
    lab.write(false);
    // An un-killed apply from scratch sets the range of kill moments.
    let t = Instant::now();
    let o = lab.run(&["apply"]);
    let full = t.elapsed();
    assert!(
        o.status.success(),
        "apply from scratch failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let first = lab.converges(&[]);
    assert!(
        first.is_empty(),
        "un-killed apply is inconsistent: {first:?}"
    );
    eprintln!("un-killed apply from scratch: {} ms", full.as_millis());
    let window = windows(&lab, &[], full);

    let mut rng = Rng::new(1);
    let mut tally = Tally::default();
    let n = runs();
    for run in 0..n {
        prepare(&lab, run, &[], &mut tally);
        let delay = rng.below(window[(run % 4) as usize].max(1));
        let t = Instant::now();
        let mut child = lab.spawn(&["apply", "--prune"]);
        std::thread::sleep(Duration::from_millis(delay).saturating_sub(t.elapsed()));
        let mid = child.try_wait().ok().flatten().is_none();
        let _ = child.kill();
        let _ = child.wait();
        tally.runs += 1;
        if mid {
            tally.mid += 1;
        } else {
            tally.after += 1;
        }
        let bad = lab.converges(&[]);
        eprintln!(
            "run {run} ({:?}): SIGKILL at {delay} ms ({}); {}",
            Start::of(run),
            if mid { "mid-apply" } else { "after it ended" },
            if bad.is_empty() {
                "converged, consistent".to_string()
            } else {
                format!("PROBLEMS: {}", bad.join("; "))
            }
        );
        if bad.is_empty() {
            tally.converged += 1;
        } else {
            tally
                .failures
                .push(format!("run {run} ({delay} ms): {}", bad.join("\n    ")));
            // Start the next run from a clean host, not from this failure.
            let _ = lab.run(&["destroy", "--all", "--force"]);
            lab.sweep();
        }
    }
    tally.destroys += 1;
    match lab.destroy_all(&[]) {
        Ok(()) => tally.clean_destroys += 1,
        Err(e) => tally.failures.push(format!("final destroy: {e}")),
    }
    tally.report("kill apply", t0.elapsed());
    assert!(
        tally.failures.is_empty(),
        "kill test failures:\n{}",
        tally.failures.join("\n")
    );
}

/// A `moat daemon` serving a lab's root; killed (SIGKILL) on drop.
struct Daemon {
    child: Child,
}

impl Daemon {
    /// Start the daemon and wait until it prints `listening on ...`.
    fn start(lab: &Lab) -> Result<Daemon, String> {
        use std::io::BufRead;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(lab.base.join("daemon.log"))
            .map_err(|e| format!("daemon log: {e}"))?;
        let mut child = Command::new(moat_bin())
            .arg("--root")
            .arg(&lab.root)
            .arg("-f")
            .arg(&lab.proj)
            .args(["--color", "never", "daemon", "--interval", "3600"])
            .env("MOAT_SUPERVISOR", &lab.sup)
            .env_remove("MOAT_ROOT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start moat daemon: {e}"))?;
        let stdout = child.stdout.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Some(s) = stdout {
                let _ = std::io::BufReader::new(s).read_line(&mut line);
            }
            let _ = tx.send(line);
        });
        let d = Daemon { child };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.starts_with("listening on") => Ok(d),
            other => Err(format!(
                "moat daemon did not start ({other:?}); its log: {}",
                std::fs::read_to_string(lab.base.join("daemon.log")).unwrap_or_default()
            )),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this build has `moat daemon`.
fn has_daemon() -> bool {
    Command::new(moat_bin())
        .args(["daemon", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn daemon_killed_at_random_moments_converges() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP: daemon_killed_at_random_moments_converges: {why}");
        return;
    }
    if !has_daemon() {
        eprintln!(
            "SKIP: daemon_killed_at_random_moments_converges: no `moat daemon` in this build"
        );
        return;
    }
    let t0 = Instant::now();
    let lab = Lab::new("daemon");
    lab.write(false);
    let d = Daemon::start(&lab).unwrap_or_else(|e| panic!("{e}"));
    let first_pid = d.pid();
    let mut daemon = Some(d);
    // `moat apply` goes through the running daemon: time it from scratch.
    let t = Instant::now();
    let o = lab.run(&["apply"]);
    let full = t.elapsed();
    assert!(
        o.status.success(),
        "apply through the daemon failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let first = lab.converges(&[first_pid]);
    assert!(
        first.is_empty(),
        "un-killed apply is inconsistent: {first:?}"
    );
    eprintln!(
        "un-killed apply through the daemon: {} ms",
        full.as_millis()
    );
    let window = windows(&lab, &[first_pid], full);

    let mut rng = Rng::new(2);
    let mut tally = Tally::default();
    let n = runs();
    for run in 0..n {
        let pids: Vec<u32> = daemon.iter().map(Daemon::pid).collect();
        prepare(&lab, run, &pids, &mut tally);
        let delay = rng.below(window[(run % 4) as usize].max(1));
        let t = Instant::now();
        // The client asks the daemon for the apply and prints its progress.
        let mut client = lab.spawn(&["apply", "--prune"]);
        std::thread::sleep(Duration::from_millis(delay).saturating_sub(t.elapsed()));
        let mid = client.try_wait().ok().flatten().is_none();
        daemon = None; // SIGKILL
        let _ = client.wait();
        tally.runs += 1;
        if mid {
            tally.mid += 1;
        } else {
            tally.after += 1;
        }
        let d = match Daemon::start(&lab) {
            Ok(d) => d,
            Err(e) => {
                tally.failures.push(format!("run {run}: restart: {e}"));
                break;
            }
        };
        let bad = lab.converges(&[d.pid()]);
        daemon = Some(d);
        eprintln!(
            "daemon run {run} ({:?}): SIGKILL at {delay} ms ({}); {}",
            Start::of(run),
            if mid { "mid-apply" } else { "after it ended" },
            if bad.is_empty() {
                "converged, consistent".to_string()
            } else {
                format!("PROBLEMS: {}", bad.join("; "))
            }
        );
        if bad.is_empty() {
            tally.converged += 1;
        } else {
            tally
                .failures
                .push(format!("run {run} ({delay} ms): {}", bad.join("\n    ")));
            let _ = lab.run(&["destroy", "--all", "--force"]);
            lab.sweep();
        }
    }
    drop(daemon);
    tally.destroys += 1;
    match lab.destroy_all(&[]) {
        Ok(()) => tally.clean_destroys += 1,
        Err(e) => tally.failures.push(format!("final destroy: {e}")),
    }
    tally.report("kill daemon", t0.elapsed());
    assert!(
        tally.failures.is_empty(),
        "daemon kill test failures:\n{}",
        tally.failures.join("\n")
    );
}
