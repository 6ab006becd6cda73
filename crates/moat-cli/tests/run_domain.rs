//! `moat run --domain D`: an ad-hoc machine on an applied domain's network.
//!
//! Needs root, `ip`, `nft`, `nsenter` and /bin/busybox; otherwise SKIP. One
//! root of its own (common::Root destroys everything on drop, also on failure),
//! domain and machine names with a per-run suffix, and two /24s of a 10.X
//! block no interface of the host uses now.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A second octet X such that no host address is in 10.X.0.0/16.
fn free_block() -> Option<u8> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = 200 + (std::process::id() % 50) as u8;
    (0..50u8)
        .map(|i| 200 + (start - 200 + i) % 50)
        .find(|x| !text.contains(&format!("inet 10.{x}.")))
}

fn status(root: &common::Root, proj: &Path) -> serde_json::Value {
    let out = root.ok(&["-f", &proj.to_string_lossy(), "status", "--json"]);
    serde_json::from_str(&out).expect("status --json")
}

fn ip_of(st: &serde_json::Value, machine: &str) -> Option<String> {
    st["machines"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == machine)?["ip"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn run_attached_to_a_domain() {
    if !common::is_root() {
        eprintln!("SKIP: run_attached_to_a_domain needs root");
        return;
    }
    for tool in ["ip", "nft", "nsenter"] {
        if !have(tool) {
            eprintln!("SKIP: run_attached_to_a_domain: `{tool}` is not installed");
            return;
        }
    }
    if !Path::new("/bin/busybox").exists() {
        eprintln!("SKIP: run_attached_to_a_domain: /bin/busybox (busybox-static) is missing");
        return;
    }
    let Some(sup) = common::supervisor() else {
        eprintln!("SKIP: run_attached_to_a_domain: moat-supervisor cannot be built");
        return;
    };
    let Some(x) = free_block() else {
        eprintln!("SKIP: run_attached_to_a_domain: no free 10.X.0.0/16 block");
        return;
    };
    let root = common::Root::new(sup);
    let sfx = format!("{:x}", std::process::id() % 4096);
    let (a, b) = (format!("rda{sfx}"), format!("rdb{sfx}"));
    let proj = root.path().join("proj");
    std::fs::create_dir_all(&proj).expect("project folder");
    std::fs::write(
        proj.join("moat.yml"),
        format!(
            "schema_version: 1\nproject: rundomain\ndomains:\n  \
             {a}:\n    trust_level: trusted\n    egress: none\n    subnet: 10.{x}.1.0/24\n    machines:\n      x: {{}}\n  \
             {b}:\n    trust_level: untrusted\n    egress: none\n    subnet: 10.{x}.2.0/24\n    machines:\n      y: {{}}\n"
        ),
    )
    .expect("write moat.yml");
    let p = proj.to_string_lossy().into_owned();
    let f = |args: &[&str]| -> Vec<String> {
        let mut v = vec!["-f".to_string(), p.clone()];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let moat = |args: &[&str]| {
        let v = f(args);
        root.moat(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Before the domain is applied: refused, with the way out.
    let o = moat(&["run", "--rm", "--domain", &a, "busybox", "--", "true"]);
    assert!(!o.status.success(), "run --domain before apply succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("moat apply"), "no hint to apply: {err}");

    let o = moat(&["apply"]);
    assert!(
        o.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let st = status(&root, &proj);
    let xa = ip_of(&st, &format!("{a}-x")).expect("address of A's machine");
    let yb = ip_of(&st, &format!("{b}-y")).expect("address of B's machine");

    // Same domain: reachable; the other domain: not.
    let o = moat(&[
        "run", "--rm", "--domain", &a, "busybox", "--", "ping", "-c1", "-W2", &xa,
    ]);
    assert!(o.status.success(), "ping within A failed: {o:?}");
    let o = moat(&[
        "run", "--rm", "--domain", &a, "busybox", "--", "ping", "-c1", "-W2", &yb,
    ]);
    assert!(!o.status.success(), "A's ad-hoc machine reached B: {o:?}");

    // A detached one: its own address in A's subnet, shown by status.
    let name = format!("adh{sfx}");
    let o = moat(&[
        "run", "-d", "--name", &name, "--domain", &a, "busybox", "--", "sleep", "120",
    ]);
    assert!(o.status.success(), "run -d: {o:?}");
    let st = status(&root, &proj);
    let ip = ip_of(&st, &name).expect("the ad-hoc machine's address in status");
    assert!(
        ip.starts_with(&format!("10.{x}.1.")),
        "{ip} is not in A's subnet"
    );
    assert_ne!(ip, xa);
    assert!(
        st["firewall"].as_str().unwrap_or("").contains("up to date"),
        "firewall drift after run: {}",
        st["firewall"]
    );
    let inside = moat(&["exec", &name, "--", "ip", "-4", "addr"]);
    assert!(String::from_utf8_lossy(&inside.stdout).contains(&ip));

    // The next apply keeps it: nothing to do, and it still reaches A.
    let out = root.ok(&f(&["apply"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("Nothing to do"), "apply wants changes: {out}");

    // A foreground `--rm` machine without a network makes no record in the
    // state store; its driver record marks it ad-hoc, so `apply --prune`
    // leaves it alone while it runs. Its CLI killed, it stays like any
    // ad-hoc machine and `destroy NAME` removes it.
    let fg = format!("fg{sfx}");
    let mut cli = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("--root")
        .arg(root.path())
        .args(f(&[
            "run", "--rm", "--name", &fg, "busybox", "--", "sleep", "120",
        ]))
        .env("MOAT_SUPERVISOR", common::supervisor().expect("supervisor"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn moat run");
    let fg_status = root.path().join("machines").join(&fg).join("status.json");
    let running =
        || std::fs::read_to_string(&fg_status).is_ok_and(|s| s.contains("\"phase\":\"running\""));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !running() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(running(), "foreground run {fg} did not start");
    let records = moat_state::StateStore::open(root.path())
        .and_then(|s| s.resources())
        .expect("read records");
    assert!(
        !records.iter().any(|r| r.name == fg),
        "foreground --rm made a record: {records:?}"
    );
    let o = moat(&["apply", "--prune"]);
    assert!(o.status.success(), "apply --prune: {o:?}");
    assert!(running(), "apply --prune touched the foreground run {fg}");
    let _ = cli.kill();
    let _ = cli.wait();
    assert!(running(), "{fg} went with its CLI");
    let o = moat(&["destroy", &fg]);
    assert!(o.status.success(), "destroy {fg}: {o:?}");
    assert!(
        !root.path().join("machines").join(&fg).exists(),
        "destroy left {fg}"
    );

    // Spoofing: another address of A's subnet on its NIC (added from the
    // host: the machine has no CAP_NET_ADMIN) gets nothing through.
    let status_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.path().join("machines").join(&name).join("status.json"))
            .expect("status.json"),
    )
    .expect("status.json is JSON");
    let pid = status_json["pid"].as_i64().expect("pid").to_string();
    let ns = |args: &[&str]| {
        Command::new("nsenter")
            .args(["-t", &pid, "-n"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        ns(&["ping", "-c1", "-W2", &xa]),
        "the detached machine cannot reach A"
    );
    let fake = format!("10.{x}.1.200");
    assert!(ns(&[
        "ip",
        "addr",
        "add",
        &format!("{fake}/24"),
        "dev",
        "eth0"
    ]));
    assert!(
        !ns(&["ping", "-c1", "-W2", "-I", &fake, &xa]),
        "a spoofed source address got through"
    );
    let o = moat(&["destroy", &name]);
    assert!(o.status.success(), "destroy: {o:?}");

    // After --rm runs and the destroy: no ad-hoc allocation, no host interface.
    let st = status(&root, &proj);
    let tag = st["root_tag"].as_str().expect("root_tag").to_string();
    let alloc = moat_state::StateStore::open(root.path())
        .and_then(|s| s.load_allocations())
        .expect("read allocations");
    let mut held: Vec<&String> = alloc.addresses.keys().chain(alloc.ifnums.keys()).collect();
    held.retain(|m| !m.starts_with(&a) && !m.starts_with(&b));
    assert!(held.is_empty(), "ad-hoc allocations left: {held:?}");
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    let ours: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with(&format!("mv{tag}-")))
        .collect();
    assert_eq!(ours.len(), 2, "host interfaces of this root: {ours:?}");
}
