//! A machine's NIC survives restarts by its restart policy, as root: the
//! machine's network namespace is persistent (bind-mounted under the run
//! folder, owned by a persistent user namespace with the machine's id map),
//! so when PID 1 is killed and the supervisor restarts the container, it
//! comes back in the same namespace with the same address and its peer still
//! reaches it. Destroy removes the namespace files.

mod common;

use common::{is_root, supervisor, Root};
use std::time::{Duration, Instant};

const PROJECT: &str = r#"
schema_version: 1
project: nstest
addressing: { base: "10.193" }
domains:
  nsd:
    trust_level: semi-trusted
    egress: none
    machines:
      srv: { restart: always, command: ["sleep", "100000"] }
      peer: { command: ["sleep", "100000"] }
"#;

fn addr(r: &Root, m: &str) -> String {
    let out = r.ok(&["exec", m, "--", "ip", "-4", "-o", "addr", "show", "eth0"]);
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no address in {out}"))
        .to_string()
}

fn status(r: &Root, m: &str) -> serde_json::Value {
    let p = r.path().join("machines").join(m).join("status.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

#[test]
fn nic_survives_a_restart_by_policy() {
    if !is_root() {
        eprintln!("SKIP: needs root (containers, bridges, nftables)");
        return;
    }
    let Some(sup) = supervisor() else {
        eprintln!("SKIP: moat-supervisor could not be built");
        return;
    };
    let r = Root::new(sup);
    let proj = r.path().join("project");
    std::fs::create_dir_all(&proj).unwrap();
    std::fs::write(proj.join("moat.yml"), PROJECT).unwrap();
    let f = proj.to_str().unwrap();
    r.ok(&["-f", f, "apply"]);

    let persistent = r.mounts();
    assert!(
        persistent.iter().any(|m| m.ends_with("netns/nsd-srv"))
            && persistent.iter().any(|m| m.ends_with("netns/nsd-srv.user")),
        "no persistent namespaces: {persistent:?}"
    );
    let a = addr(&r, "nsd-srv");
    let ping = |to: &str| {
        r.moat(&["exec", "nsd-peer", "--", "ping", "-c", "1", "-W", "2", to])
            .status
            .success()
    };
    assert!(ping(&a), "peer cannot reach srv before the restart");

    // Kill PID 1: the supervisor restarts the container (restart: always).
    let before = status(&r, "nsd-srv");
    let pid = before["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) of the container's init, found in its status file.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = status(&r, "nsd-srv");
        if st["phase"] == "running" && st["pid"].as_i64() != Some(pid as i64) {
            assert!(st["restarts"].as_u64().unwrap() >= 1);
            break;
        }
        assert!(Instant::now() < deadline, "not restarted: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(addr(&r, "nsd-srv"), a, "same address after the restart");
    assert!(ping(&a), "peer cannot reach srv after the restart");

    // Destroy removes the namespace files.
    r.ok(&["destroy", "--all", "--force"]);
    let left: Vec<String> = r
        .mounts()
        .into_iter()
        .filter(|m| m.contains("netns"))
        .collect();
    assert!(left.is_empty(), "namespace mounts left: {left:?}");
}
