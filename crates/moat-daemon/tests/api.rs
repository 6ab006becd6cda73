//! The API in-process, no root needed: every endpoint answers through
//! `Daemon::handle_as` over a socketpair with an injected peer, and the
//! authorization rules hold (403 JSON with a reason). What needs root to
//! succeed (apply, machines) is exercised for its refusals and error
//! documents here; tests/socket.rs in moat-cli does the real thing.

use moat_daemon::{http, Daemon, DaemonConfig, Others, Peer, Policy};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const PROJECT: &str = r#"
schema_version: 1
project: apitest
addressing: { base: "10.173" }
domains:
  lab:
    trust_level: trusted
    egress: none
    machines:
      one: {}
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    project: PathBuf,
    daemon: Arc<Daemon>,
}

fn fixture(group: Option<u32>, others: Others) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("p");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("moat.yml"), PROJECT).unwrap();
    let daemon = Daemon::new(DaemonConfig {
        root: dir.path().join("root"),
        project: Some(project.clone()),
        policy: Policy {
            group: group.map(|g| ("moatadm".to_string(), g)),
            others,
        },
        interval: Duration::from_secs(3600),
        socket: None,
    });
    Fixture {
        _dir: dir,
        project,
        daemon,
    }
}

const ROOT: Peer = Peer {
    uid: 0,
    gid: 0,
    pid: 1,
    groups: Vec::new(),
};

fn user(uid: u32, groups: &[u32]) -> Peer {
    Peer {
        uid,
        gid: uid,
        pid: 1,
        groups: groups.to_vec(),
    }
}

/// Open a request; the response head and a reader at its body.
fn open(
    d: &Arc<Daemon>,
    peer: Peer,
    method: &str,
    target: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (http::ResponseHead, BufReader<UnixStream>) {
    let (mut client, server) = UnixStream::pair().unwrap();
    let d = d.clone();
    std::thread::spawn(move || d.handle_as(server, peer));
    http::write_request(&mut client, method, target, headers, body.as_bytes()).unwrap();
    let mut r = BufReader::new(client);
    let head = http::read_response_head(&mut r).unwrap();
    (head, r)
}

fn call(d: &Arc<Daemon>, peer: Peer, method: &str, target: &str, body: &str) -> (u16, Vec<u8>) {
    let (head, mut r) = open(d, peer, method, target, body, &[]);
    let mut b = Vec::new();
    r.read_to_end(&mut b).unwrap();
    (head.status, b)
}

fn json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

/// An error document: error, reason, exit_code.
fn assert_error(status: u16, body: &[u8], want_status: &[u16]) -> Value {
    assert!(
        want_status.contains(&status),
        "status {status}, wanted {want_status:?}: {}",
        String::from_utf8_lossy(body)
    );
    let v = json(body);
    assert!(v["error"].is_string(), "{v}");
    assert!(v["reason"].is_string(), "{v}");
    assert!(v["exit_code"].is_u64(), "{v}");
    v
}

/// The last line of an NDJSON stream.
fn last_line(body: &[u8]) -> Value {
    let text = String::from_utf8_lossy(body);
    let line = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    json(line.as_bytes())
}

#[test]
fn health_status_validate_plan() {
    let f = fixture(None, Others::Read);
    let (s, b) = call(&f.daemon, ROOT, "GET", "/v1/health", "");
    assert_eq!(s, 200);
    let v = json(&b);
    assert_eq!(v["access"], "write");
    assert_eq!(v["project"], f.project.to_str().unwrap());

    let (s, b) = call(&f.daemon, ROOT, "GET", "/v1/status", "");
    assert_eq!(s, 200);
    let v = json(&b);
    assert_eq!(v["project"], "apitest");
    assert_eq!(v["machines"][0]["name"], "lab-one");
    // Text is the CLI's table; an explicit empty project means none.
    let (s, b) = call(
        &f.daemon,
        ROOT,
        "GET",
        "/v1/status?format=text&project=",
        "",
    );
    assert_eq!(s, 200);
    assert!(
        String::from_utf8_lossy(&b).starts_with("root "),
        "{}",
        String::from_utf8_lossy(&b)
    );

    let (s, b) = call(&f.daemon, ROOT, "POST", "/v1/validate", "{}");
    assert_eq!(s, 200);
    assert_eq!(json(&b)["valid"], true);
    let (s, b) = call(&f.daemon, ROOT, "POST", "/v1/validate?format=text", "");
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&b).starts_with("valid (1 domains, 1 machines"));

    // An invalid project: 422 with the diagnostics and the CLI's exit code 2.
    let bad = f.project.parent().unwrap().join("bad.yml");
    std::fs::write(
        &bad,
        "schema_version: 1\nproject: x\ndomains: {a: {trust_level: nope}}\n",
    )
    .unwrap();
    let body = serde_json::json!({ "project": bad }).to_string();
    let (s, b) = call(&f.daemon, ROOT, "POST", "/v1/validate", &body);
    let v = assert_error(s, &b, &[422]);
    assert_eq!(v["exit_code"], 2);
    assert!(
        v["diagnostics"].as_array().is_some_and(|d| !d.is_empty()),
        "{v}"
    );

    // Plan observes the host: as root a plan, otherwise an error document.
    let (s, b) = call(&f.daemon, ROOT, "POST", "/v1/plan", r#"{"prune":false}"#);
    if s == 200 {
        assert!(json(&b)["actions"].is_array());
        let (s, b) = call(&f.daemon, ROOT, "POST", "/v1/plan?format=text", "");
        assert_eq!(s, 200);
        assert!(!b.is_empty());
    } else {
        assert_error(s, &b, &[500]);
    }
}

#[test]
fn operations_answer_with_documents() {
    let f = fixture(None, Others::Read);
    let d = &f.daemon;
    // Apply (dry run: changes nothing even as root) streams JSON lines ending
    // in a result or an error.
    let (s, b) = call(d, ROOT, "POST", "/v1/apply", r#"{"dry_run":true}"#);
    assert_eq!(s, 200);
    let last = last_line(&b);
    assert!(
        last["type"] == "result" || last["type"] == "error",
        "{}",
        String::from_utf8_lossy(&b)
    );
    if last["type"] == "result" {
        assert!(last["pretty"].is_string() && last["text"].is_string());
    }
    // Destroy of a machine that does not exist: the stream's error line says not_found.
    let (s, b) = call(d, ROOT, "POST", "/v1/destroy", r#"{"machine":"lab-nope"}"#);
    assert_eq!(s, 200);
    let last = last_line(&b);
    assert!(
        last["type"] == "error" || last["type"] == "result",
        "{last}"
    );
    let (s, b) = call(d, ROOT, "POST", "/v1/destroy", "{}");
    assert_error(s, &b, &[400]);

    for (m, t, body) in [
        ("POST", "/v1/machines/lab-nope/start", "{}"),
        ("POST", "/v1/machines/lab-nope/stop", r#"{"timeout":1}"#),
        ("POST", "/v1/machines/lab-nope/restart", "{}"),
        (
            "POST",
            "/v1/machines/lab-nope/exec",
            r#"{"command":["true"]}"#,
        ),
        ("GET", "/v1/machines/lab-nope/logs", ""),
        ("GET", "/v1/machines/lab-nope/snapshots", ""),
        (
            "POST",
            "/v1/machines/lab-nope/snapshots",
            r#"{"name":"s1"}"#,
        ),
        ("POST", "/v1/machines/lab-nope/snapshots/s1/restore", ""),
        ("DELETE", "/v1/machines/lab-nope/snapshots/s1", ""),
        ("DELETE", "/v1/images/nope", ""),
    ] {
        let (s, b) = call(d, ROOT, m, t, body);
        let v = assert_error(s, &b, &[404, 500]);
        if s == 404 {
            assert_eq!(v["exit_code"], 4, "{m} {t}: {v}");
        }
    }
    // Streaming exec: without the upgrade headers a 400; with them, the
    // missing machine is a plain 404 before any upgrade.
    let (s, b) = call(d, ROOT, "GET", "/v1/machines/lab-nope/exec?cmd=true", "");
    assert_error(s, &b, &[400]);
    let (head, mut r) = open(
        d,
        ROOT,
        "GET",
        "/v1/machines/lab-nope/exec?cmd=true",
        "",
        &[("Connection", "Upgrade"), ("Upgrade", "moat-exec")],
    );
    let mut b = Vec::new();
    r.read_to_end(&mut b).unwrap();
    assert_error(head.status, &b, &[404, 500]);

    let (s, b) = call(d, ROOT, "GET", "/v1/images", "");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert!(json(&b).is_array());
    let (s, b) = call(d, ROOT, "POST", "/v1/images/gc", "");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert!(json(&b)["removed_layers"].is_array());

    let (s, b) = call(d, ROOT, "POST", "/v1/reconcile", "{}");
    if s == 200 {
        let v = json(&b);
        assert_eq!(v["mode"], "report");
    } else {
        assert_error(s, &b, &[500]);
    }

    // Unknown paths and methods, malformed bodies.
    let (s, b) = call(d, ROOT, "GET", "/v1/nope", "");
    assert_error(s, &b, &[404]);
    let (s, b) = call(d, ROOT, "PUT", "/v1/status", "");
    assert_error(s, &b, &[405]);
    let (s, b) = call(d, ROOT, "POST", "/v1/apply", "{not json");
    assert_error(s, &b, &[400]);
}

#[test]
fn events_stream_lines() {
    let f = fixture(None, Others::Read);
    let (head, mut r) = open(&f.daemon, user(1000, &[]), "GET", "/v1/events", "", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("application/x-ndjson"));
    // The subscription exists once the head is sent.
    f.daemon
        .bus
        .publish(moat_daemon::events::EventKind::MachineCrashed {
            machine: "lab-one".into(),
            reason: "exit 1".into(),
        });
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v = json(line.as_bytes());
    assert_eq!(v["type"], "machine_crashed");
    assert_eq!(v["machine"], "lab-one");
    assert!(v["time_ms"].as_u64().is_some());
    drop(r);
    // The daemon notices the client left (within its 1 s poll).
    for _ in 0..50 {
        if f.daemon.bus.subscribers() == 0 {
            break;
        }
        f.daemon
            .bus
            .publish(moat_daemon::events::EventKind::DaemonStarted { pid: 0 });
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(f.daemon.bus.subscribers(), 0);
}

fn refused(d: &Arc<Daemon>, peer: Peer, m: &str, t: &str, body: &str) -> String {
    let (s, b) = call(d, peer, m, t, body);
    assert_eq!(s, 403, "{m} {t}: {}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert!(v["error"].as_str().unwrap().starts_with("forbidden"), "{v}");
    v["reason"].as_str().unwrap().to_string()
}

#[test]
fn authorization_rules() {
    // Group 4242 may change things; others read.
    let f = fixture(Some(4242), Others::Read);
    let d = &f.daemon;
    let other = user(1000, &[]);
    let member = user(1001, &[4242]);
    let primary = Peer {
        gid: 4242,
        ..user(1002, &[])
    };

    // Reads are open to others.
    assert_eq!(call(d, other.clone(), "GET", "/v1/status", "").0, 200);
    let (head, _stream) = open(d, other.clone(), "GET", "/v1/events", "", &[]);
    assert_eq!(head.status, 200);
    let (_, b) = call(d, other.clone(), "GET", "/v1/health", "");
    assert_eq!(json(&b)["access"], "read");
    // Writes are not, and the reason says what to do.
    for (m, t, body) in [
        ("POST", "/v1/apply", "{}"),
        ("POST", "/v1/destroy", r#"{"all":true}"#),
        ("POST", "/v1/machines/lab-one/stop", "{}"),
        ("POST", "/v1/machines/lab-one/exec", r#"{"command":["id"]}"#),
        ("POST", "/v1/images/gc", ""),
        ("POST", "/v1/reconcile", ""),
    ] {
        let reason = refused(d, other.clone(), m, t, body);
        assert!(
            reason.contains("uid 1000") && reason.contains("'moatadm'"),
            "{reason}"
        );
    }
    // Naming a project other than the daemon's needs write access (the daemon reads it as root).
    let body = serde_json::json!({"project": "/etc"}).to_string();
    refused(d, other.clone(), "POST", "/v1/validate", &body);
    refused(d, other.clone(), "GET", "/v1/status?project=%2Fetc", "");
    // ... the daemon's own project, or none, is fine.
    let own = format!(
        "/v1/status?project={}",
        http::encode(f.project.to_str().unwrap())
    );
    assert_eq!(call(d, other.clone(), "GET", &own, "").0, 200);
    assert_eq!(
        call(d, other.clone(), "GET", "/v1/status?project=", "").0,
        200
    );

    // Group members (supplementary or primary) pass authorization: the
    // machine is missing, so 404, not 403.
    for p in [member.clone(), primary] {
        let (s, b) = call(d, p, "POST", "/v1/machines/lab-nope/stop", "{}");
        assert_eq!(s, 404, "{}", String::from_utf8_lossy(&b));
    }
    let (_, b) = call(d, member, "GET", "/v1/health", "");
    assert_eq!(json(&b)["access"], "write");

    // --others none: other users get nothing at all.
    let f = fixture(Some(4242), Others::None);
    let reason = refused(&f.daemon, other.clone(), "GET", "/v1/status", "");
    assert!(reason.contains("--others none"), "{reason}");
    refused(&f.daemon, other.clone(), "GET", "/v1/events", "");
    refused(&f.daemon, other, "GET", "/v1/health", "");

    // No group: root only, and the reason names --group.
    let f = fixture(None, Others::Read);
    let reason = refused(
        &f.daemon,
        user(1000, &[4242]),
        "POST",
        "/v1/machines/x/start",
        "",
    );
    assert!(reason.contains("--group"), "{reason}");
}

#[test]
fn bind_sets_mode_and_refuses_a_second_daemon() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = |others| DaemonConfig {
        root: dir.path().join("root"),
        project: None,
        policy: Policy {
            group: None,
            others,
        },
        interval: Duration::from_secs(60),
        socket: Some(dir.path().join("s").join("moat.sock")),
    };
    let l = moat_daemon::bind(&cfg(Others::None)).unwrap();
    let sock = cfg(Others::None).socket_path();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A live socket: refused. A stale one (nobody listening): replaced.
    assert!(matches!(
        moat_daemon::bind(&cfg(Others::Read)),
        Err(moat_daemon::DaemonError::AlreadyRunning(_))
    ));
    drop(l);
    let _l = moat_daemon::bind(&cfg(Others::Read)).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    let _ = Path::new(&sock);
}
