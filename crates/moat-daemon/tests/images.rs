//! The image endpoints in-process (`moat image build | import | rm | gc`
//! over the API): a busybox build from the host's /bin/busybox (offline),
//! a folder import, removal by path segment and by `?name=`, gc, and the
//! refusals for read-only callers. No root needed.

use moat_daemon::{http, Daemon, DaemonConfig, Others, Peer, Policy};
use serde_json::Value;
use std::io::{BufReader, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

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

fn daemon(dir: &std::path::Path, group: Option<u32>) -> Arc<Daemon> {
    Daemon::new(DaemonConfig {
        root: dir.join("root"),
        project: None,
        policy: Policy {
            group: group.map(|g| ("moatadm".to_string(), g)),
            others: Others::Read,
        },
        interval: Duration::from_secs(3600),
        socket: None,
    })
}

fn call(d: &Arc<Daemon>, peer: Peer, method: &str, target: &str, body: &str) -> (u16, Vec<u8>) {
    let (mut client, server) = UnixStream::pair().unwrap();
    let d = d.clone();
    std::thread::spawn(move || d.handle_as(server, peer));
    http::write_request(&mut client, method, target, &[], body.as_bytes()).unwrap();
    let mut r = BufReader::new(client);
    let head = http::read_response_head(&mut r).unwrap();
    let mut b = Vec::new();
    r.read_to_end(&mut b).unwrap();
    (head.status, b)
}

fn json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

/// An NDJSON stream's lines.
fn lines(b: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(b)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| json(l.as_bytes()))
        .collect()
}

/// A streamed operation that succeeded: progress lines, then a result.
fn streamed_ok(s: u16, b: &[u8]) -> Value {
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(b));
    let ls = lines(b);
    let last = ls.last().cloned().unwrap_or_default();
    assert_eq!(last["type"], "result", "{}", String::from_utf8_lossy(b));
    assert!(
        ls.iter().any(|l| l["type"] == "progress"),
        "no progress line: {}",
        String::from_utf8_lossy(b)
    );
    last
}

fn error(s: u16, b: &[u8], want: u16) -> Value {
    assert_eq!(s, want, "{}", String::from_utf8_lossy(b));
    let v = json(b);
    assert!(v["error"].is_string() && v["reason"].is_string(), "{v}");
    v
}

fn names(d: &Arc<Daemon>) -> Vec<String> {
    let (s, b) = call(d, ROOT, "GET", "/v1/images", "");
    assert_eq!(s, 200);
    json(&b)
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn build_import_remove_gc() {
    if !std::path::Path::new("/bin/busybox").is_file() {
        eprintln!("SKIP: no /bin/busybox (install busybox-static)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = &daemon(dir.path(), None);

    // Build: progress lines, then the image.
    let (s, b) = call(
        d,
        ROOT,
        "POST",
        "/v1/images/build",
        r#"{"source":"busybox"}"#,
    );
    let r = streamed_ok(s, &b);
    assert_eq!(r["image"]["name"], "busybox");
    assert_eq!(r["failed"], false);
    assert!(r["text"].as_str().unwrap().starts_with("built busybox"));
    let (s, b) = call(
        d,
        ROOT,
        "POST",
        "/v1/images/build",
        r#"{"source":"busybox","name":"bb2"}"#,
    );
    assert_eq!(streamed_ok(s, &b)["image"]["name"], "bb2");
    assert_eq!(names(d), ["bb2", "busybox"]);
    // Not a buildable source, or no source: 400 before any stream.
    let (s, b) = call(d, ROOT, "POST", "/v1/images/build", r#"{"source":"nope"}"#);
    error(s, &b, 400);
    let (s, b) = call(d, ROOT, "POST", "/v1/images/build", "{}");
    error(s, &b, 400);

    // Import a folder (kind detected), then the same under a name with a slash.
    let folder = dir.path().join("rootfs");
    std::fs::create_dir_all(folder.join("etc")).unwrap();
    std::fs::write(folder.join("etc/hello"), "imported\n").unwrap();
    let body = serde_json::json!({"name": "fold", "path": folder}).to_string();
    let (s, b) = call(d, ROOT, "POST", "/v1/images/import", &body);
    let r = streamed_ok(s, &b);
    assert_eq!(r["image"]["name"], "fold");
    assert!(r["text"].as_str().unwrap().starts_with("imported fold"));
    let body =
        serde_json::json!({"name": "lab/fold", "path": folder, "kind": "folder"}).to_string();
    let (s, b) = call(d, ROOT, "POST", "/v1/images/import", &body);
    assert_eq!(streamed_ok(s, &b)["image"]["name"], "lab/fold");
    // Refusals: relative path, missing path, unknown kind, missing name.
    for (body, want) in [
        (r#"{"name":"x","path":"rel/dir"}"#, 400),
        (r#"{"name":"x","path":"/nonexistent/moat-img"}"#, 404),
        (r#"{"name":"x","path":"/tmp","kind":"zip"}"#, 400),
        (r#"{"path":"/tmp"}"#, 400),
    ] {
        let (s, b) = call(d, ROOT, "POST", "/v1/images/import", body);
        error(s, &b, want);
    }

    // Remove: by path segment, by ?name= (a slash), and 404 for what is gone.
    let (s, b) = call(d, ROOT, "DELETE", "/v1/images/fold", "");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["done"], "removed");
    let (s, b) = call(d, ROOT, "DELETE", "/v1/images?name=lab%2Ffold", "");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let (s, b) = call(d, ROOT, "DELETE", "/v1/images/fold", "");
    assert_eq!(error(s, &b, 404)["exit_code"], 4);
    let (s, b) = call(d, ROOT, "DELETE", "/v1/images", "");
    error(s, &b, 400);
    assert_eq!(names(d), ["bb2", "busybox"]);

    // gc frees the folder's layer and keeps busybox's.
    let (s, b) = call(d, ROOT, "POST", "/v1/images/gc", "");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert!(!v["removed_layers"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["kept_layers"].as_u64().unwrap() >= 1, "{v}");
    let (_, b) = call(d, ROOT, "POST", "/v1/images/gc", "");
    assert!(json(&b)["removed_layers"].as_array().unwrap().is_empty());
    assert_eq!(names(d), ["bb2", "busybox"]);
}

#[test]
fn read_only_callers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Group 4242 may change things; others read.
    let d = &daemon(dir.path(), Some(4242));
    let other = user(1000, &[]);
    for (m, t, body) in [
        ("POST", "/v1/images/build", r#"{"source":"busybox"}"#),
        ("POST", "/v1/images/import", r#"{"name":"x","path":"/tmp"}"#),
        ("DELETE", "/v1/images/busybox", ""),
        ("DELETE", "/v1/images?name=a%2Fb", ""),
        ("POST", "/v1/images/gc", ""),
    ] {
        let (s, b) = call(d, other.clone(), m, t, body);
        let v = error(s, &b, 403);
        assert!(v["error"].as_str().unwrap().starts_with("forbidden"), "{v}");
        let reason = v["reason"].as_str().unwrap();
        assert!(
            reason.contains("uid 1000") && reason.contains("'moatadm'"),
            "{m} {t}: {reason}"
        );
    }
    // Reading the list stays open to them.
    assert_eq!(call(d, other, "GET", "/v1/images", "").0, 200);
    // A group member passes authorization: a missing image is 404, not 403.
    let (s, b) = call(d, user(1001, &[4242]), "DELETE", "/v1/images/nope", "");
    error(s, &b, 404);
    let (s, b) = call(d, user(1001, &[4242]), "POST", "/v1/images/gc", "");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
}
