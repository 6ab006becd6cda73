//! The daemon for real, as root, over its socket: CLI commands routed
//! through it print and exit exactly as in-process; an unprivileged user
//! (a throwaway system user) gets read-only access, a member of the admin
//! group more; `moat events` streams lifecycle events; 100 concurrent
//! status clients during an apply are all answered; a daemon restart with
//! 10 machines running stops none of them and manages them again.

mod common;

use common::{is_root, supervisor, Root};
use moat_daemon::client::Client;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn moat_bin() -> &'static str {
    env!("CARGO_BIN_EXE_moat")
}

/// A project of `domains` × `per` machines on `10.<base>`.
fn project(base: u32, domains: usize, per: usize) -> String {
    let mut s = format!(
        "schema_version: 1\nproject: dtest\naddressing: {{base: \"10.{base}\", zone_step: 1}}\ndomains:\n"
    );
    for d in 0..domains {
        s.push_str(&format!(
            "  d{d}:\n    trust_level: trusted\n    egress: none\n    machines:\n"
        ));
        for m in 0..per {
            s.push_str(&format!("      m{m}: {{}}\n"));
        }
    }
    s
}

/// A running `moat daemon`; killed (SIGKILL: it never stops machines) on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(r: &Root, extra: &[&str]) -> Daemon {
        let mut child = Command::new(moat_bin())
            .arg("--root")
            .arg(r.path())
            .arg("daemon")
            .args(extra)
            .env("MOAT_SUPERVISOR", &r.sup)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn moat daemon");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        BufReader::new(out).read_line(&mut line).expect("read");
        let socket = PathBuf::from(
            line.trim()
                .strip_prefix("listening on ")
                .unwrap_or_else(|| panic!("unexpected first line: {line:?}")),
        );
        Daemon { child, socket }
    }

    fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the same command through the daemon and in-process.
fn both(r: &Root, args: &[&str]) -> (std::process::Output, std::process::Output) {
    let d = r.moat(args);
    let mut a = vec!["--no-daemon"];
    a.extend_from_slice(args);
    (d, r.moat(&a))
}

fn assert_same(r: &Root, args: &[&str]) -> String {
    let (d, p) = both(r, args);
    // Timings ("in 97 ms") differ from run to run: digits in such lines are masked.
    let mask = |b: &[u8]| -> String {
        String::from_utf8_lossy(b)
            .lines()
            .map(|l| {
                if l.contains(" ms") || l.contains(" s.") {
                    let mut o = String::new();
                    for c in l.chars() {
                        if !c.is_ascii_digit() {
                            o.push(c);
                        } else if !o.ends_with('#') {
                            o.push('#');
                        }
                    }
                    o
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let s = |o: &std::process::Output| (o.status.code(), mask(&o.stdout), mask(&o.stderr));
    assert_eq!(
        s(&d),
        s(&p),
        "moat {args:?}: daemon (left) vs in-process (right)"
    );
    s(&d).1
}

fn running(r: &Root, f: &str) -> Vec<String> {
    let st: serde_json::Value =
        serde_json::from_str(&r.ok(&["--no-daemon", "-f", f, "status", "--json"])).unwrap();
    st["machines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "running")
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

fn setup(base: u32, domains: usize, per: usize) -> Option<(Root, String)> {
    if !is_root() {
        eprintln!("SKIP: needs root (containers, bridges, nftables)");
        return None;
    }
    let Some(sup) = supervisor() else {
        eprintln!("SKIP: moat-supervisor could not be built");
        return None;
    };
    let r = Root::new(sup);
    // Other users must reach the socket under the root (tempdirs are 0700).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(r.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let proj = r.path().join("project");
    std::fs::create_dir_all(&proj).unwrap();
    std::fs::write(proj.join("moat.yml"), project(base, domains, per)).unwrap();
    let f = proj.to_string_lossy().into_owned();
    Some((r, f))
}

/// A throwaway system user and group, removed on drop.
struct TmpUser {
    name: String,
    group: String,
    uid: u32,
    gid: u32,
}

impl TmpUser {
    fn new() -> Option<TmpUser> {
        let n = format!("mtd{}", std::process::id() % 100000);
        let group = format!("{n}g");
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        if !ok(Command::new("groupadd").args(["-r", &group])) {
            return None;
        }
        let mut u = TmpUser {
            name: n.clone(),
            group: group.clone(),
            uid: 0,
            gid: 0,
        };
        if !ok(Command::new("useradd").args(["-r", "-M", "-s", "/usr/sbin/nologin", &n])) {
            return None;
        }
        let id = |flag: &str, who: &str| -> u32 {
            let o = Command::new("id").args([flag, who]).output().unwrap();
            String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
        };
        let gid = Command::new("getent")
            .args(["group", &group])
            .output()
            .unwrap();
        let gid: u32 = String::from_utf8_lossy(&gid.stdout)
            .split(':')
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        u.uid = id("-u", &n);
        u.gid = gid;
        Some(u)
    }

    /// Run moat as this user; with `in_group`, the admin group as a supplementary group.
    fn moat(&self, root: &Path, in_group: bool, args: &[&str]) -> std::process::Output {
        let groups = if in_group {
            format!("--groups={}", self.gid)
        } else {
            "--clear-groups".to_string()
        };
        let ugid = Command::new("id")
            .args(["-g", &self.name])
            .output()
            .unwrap();
        let ugid = String::from_utf8_lossy(&ugid.stdout).trim().to_string();
        Command::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={ugid}"))
            .arg(groups)
            .arg(moat_bin())
            .arg("--root")
            .arg(root)
            .args(args)
            .env("NO_COLOR", "1")
            .current_dir("/")
            .output()
            .expect("setpriv moat")
    }
}

impl Drop for TmpUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
        let _ = Command::new("groupdel").arg(&self.group).status();
    }
}

#[test]
fn cli_through_daemon_same_output_and_users() {
    let Some((r, f)) = setup(177, 2, 2) else {
        return;
    };
    let Some(user) = TmpUser::new() else {
        eprintln!("SKIP: cannot create a system user (useradd/groupadd)");
        return;
    };
    let t = Instant::now();
    let d = Daemon::start(&r, &["--project", &f, "--group", &user.group]);
    let ev = Command::new(moat_bin())
        .args(["--root", r.path().to_str().unwrap(), "events"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut ev = KillOnDrop(ev);

    // Apply through the daemon: progress on stderr, the report on stdout.
    let o = r.moat(&["-f", &f, "apply"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(running(&r, &f).len(), 4);

    // Same output and exit codes both ways.
    for args in [
        vec!["-f", &f, "status"],
        vec!["-f", &f, "status", "--json"],
        vec!["status"],
        vec!["-f", &f, "validate"],
        vec!["-f", &f, "validate", "--json"],
        vec!["-f", &f, "plan"],
        vec!["-f", &f, "plan", "--json"],
        vec!["-f", &f, "apply"],
        vec![
            "exec",
            "d0-m0",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
        vec!["logs", "d0-m0", "-n", "5"],
        vec!["stop", "d9-nope"],
        vec!["exec", "d9-nope", "--", "true"],
        vec!["-f", "/nonexistent/moat.yml", "validate"],
        vec!["snapshot", "ls", "d0-m1", "--json"],
    ] {
        assert_same(&r, &args);
    }
    let bad = r.path().join("bad.yml");
    std::fs::write(
        &bad,
        "schema_version: 1\nproject: x\ndomains: {a: {trust_level: nope}}\n",
    )
    .unwrap();
    let o = assert_same(&r, &["-f", bad.to_str().unwrap(), "validate"]);
    assert!(o.is_empty());
    // Streaming exec over an upgraded connection: stdin in, output and status out.
    {
        use moat_daemon::exec::{read_frame, write_frame, EXIT, OUTPUT, STDIN};
        let target = format!(
            "/v1/machines/d0-m0/exec?cmd=sh&cmd=-c&cmd={}",
            moat_daemon::http::encode("read x; echo got $x; exit 3")
        );
        let (head, mut rd) = d
            .client()
            .open(
                "GET",
                &target,
                None,
                &[("Connection", "Upgrade"), ("Upgrade", "moat-exec")],
            )
            .unwrap();
        assert_eq!(head.status, 101);
        let mut w = rd.get_ref().try_clone().unwrap();
        write_frame(&mut w, STDIN, b"hello\n").unwrap();
        write_frame(&mut w, STDIN, b"").unwrap();
        let (mut output, mut code) = (Vec::new(), None);
        while let Some((ch, data)) = read_frame(&mut rd).unwrap() {
            match ch {
                OUTPUT => output.extend_from_slice(&data),
                EXIT => code = Some(i32::from_be_bytes(data[..4].try_into().unwrap())),
                _ => panic!("frame {ch}: {}", String::from_utf8_lossy(&data)),
            }
        }
        assert_eq!(String::from_utf8_lossy(&output).trim(), "got hello");
        assert_eq!(code, Some(3));
    }
    // A machine stopped and started through the daemon (events below).
    r.ok(&["stop", "d0-m1", "-t", "2"]);
    r.ok(&["-f", &f, "start", "d0-m1"]);

    // An unprivileged user: read-only status, a clear refusal to change things.
    let root = r.path();
    let o = user.moat(root, false, &["status", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["machines"].as_array().unwrap().len(), 4);
    let o = user.moat(root, false, &["stop", "d0-m0"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("forbidden")
            && err.contains(&format!("uid {}", user.uid))
            && err.contains(&user.group),
        "{err}"
    );
    let o = user.moat(root, false, &["-f", "/etc", "validate"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("forbidden"));
    // A member of the daemon's group may.
    let o = user.moat(root, true, &["stop", "d0-m0", "-t", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = user.moat(root, true, &["start", "d0-m0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(running(&r, &f).len(), 4);

    // Events: the apply's progress and the lifecycle changes, as JSON lines.
    let mut lines = BufReader::new(ev.0.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let want = [
        "apply_started",
        "apply_progress",
        "apply_finished",
        "machine_stopped",
        "machine_started",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !want.iter().all(|w| seen.iter().any(|s: &String| s == w)) {
        let Some(Ok(l)) = lines.next() else { break };
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        seen.push(v["type"].as_str().unwrap().to_string());
    }
    for w in want {
        assert!(seen.iter().any(|s| s == w), "no {w} event in {seen:?}");
    }
    drop(d);
    eprintln!(
        "cli_through_daemon_same_output_and_users: {:?}",
        t.elapsed()
    );
}

#[test]
fn hundred_status_clients_during_apply() {
    let Some((r, f)) = setup(178, 2, 4) else {
        return;
    };
    let t = Instant::now();
    let d = Daemon::start(&r, &["--project", &f]);
    let c = d.client();
    // The clients start at the apply's first progress line.
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let applying = std::thread::spawn({
        let c = c.clone();
        move || {
            let mut last = serde_json::Value::Null;
            c.lines("POST", "/v1/apply", Some(&serde_json::json!({})), |v| {
                let _ = first_tx.send(());
                last = v;
                true
            })
            .unwrap();
            (Instant::now(), last)
        }
    });
    first_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("apply progress");
    let barrier = Arc::new(Barrier::new(100));
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let c = c.clone();
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                let start = Instant::now();
                let reply = c.call("GET", "/v1/status", None);
                (start, reply.map(|r| (r.status(), r.json().is_ok())))
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    let (apply_done, last) = applying.join().unwrap();
    assert_eq!(last["type"], "result", "{last}");
    assert_eq!(last["failed"], false, "{last}");
    let mut during = 0;
    for (start, res) in &results {
        match res {
            Ok((200, true)) => {}
            other => panic!("a status client failed: {other:?}"),
        }
        if *start < apply_done {
            during += 1;
        }
    }
    eprintln!(
        "100 status clients: all answered, {during} started while the apply ran ({:?})",
        t.elapsed()
    );
    assert!(during > 0, "the apply finished before the clients started");
    assert_eq!(running(&r, &f).len(), 8);
}

#[test]
fn daemon_restart_keeps_ten_machines() {
    let Some((r, f)) = setup(179, 2, 5) else {
        return;
    };
    let t = Instant::now();
    let mut d = Daemon::start(&r, &["--project", &f]);
    let o = r.moat(&["-f", &f, "apply", "-j", "8"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = running(&r, &f);
    assert_eq!(before.len(), 10, "{before:?}");
    let pids = |st: &str| -> Vec<String> { st.lines().map(str::to_string).collect() };
    let sup_before = pids(&String::from_utf8_lossy(
        &Command::new("pgrep")
            .arg("-f")
            .arg("moat-supervisor")
            .output()
            .unwrap()
            .stdout,
    ));

    // Kill the daemon hard: nothing of the machines goes with it.
    d.kill();
    assert_eq!(running(&r, &f), before);
    let d = Daemon::start(&r, &["--project", &f]);
    // The new daemon sees them all and manages them: status, exec, stop/start.
    let st = d
        .client()
        .call("GET", "/v1/status", None)
        .unwrap()
        .json()
        .unwrap();
    let n = st["machines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "running")
        .count();
    assert_eq!(n, 10, "{st}");
    for m in &before {
        let o = r.moat(&["exec", m, "--", "true"]);
        assert!(
            o.status.success(),
            "exec {m} through the new daemon: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    r.ok(&["stop", "d1-m4", "-t", "2"]);
    r.ok(&["-f", &f, "start", "d1-m4"]);
    let o = r.moat(&["-f", &f, "plan"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Nothing to do")
            || String::from_utf8_lossy(&o.stdout).contains("No changes"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(running(&r, &f).len(), 10);
    let sup_after = pids(&String::from_utf8_lossy(
        &Command::new("pgrep")
            .arg("-f")
            .arg("moat-supervisor")
            .output()
            .unwrap()
            .stdout,
    ));
    // The supervisors of the untouched machines are the same processes.
    let kept = sup_before.iter().filter(|p| sup_after.contains(p)).count();
    assert!(
        kept >= 9,
        "supervisors before {sup_before:?} after {sup_after:?}"
    );
    drop(d);
    eprintln!("daemon_restart_keeps_ten_machines: {:?}", t.elapsed());
}
