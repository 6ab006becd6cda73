//! Root test: the in-process `ip` forms of a machine's attachment (see
//! src/rtnl.rs) on real interfaces, checked with the real `ip`. Everything
//! lives in a bridge, a veth and a network namespace named after this
//! process, removed at the end, also on failure.

use moat_host::exec::{Cmd, Executor, HostExecutor};
use moat_host::rtnl;
use std::process::Command;

fn sh(args: &[&str]) -> String {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `ip` with `args` split at spaces.
fn ip(args: &str) -> Cmd {
    Cmd::new("ip").args(args.split(' '))
}

/// `nsenter --net=PATH ip -batch -` reading `lines`.
fn batch(path: &str, lines: &str) -> Cmd {
    Cmd::new("nsenter")
        .args([
            format!("--net={path}"),
            "ip".into(),
            "-batch".into(),
            "-".into(),
        ])
        .stdin(lines)
}

struct Cleanup {
    links: Vec<String>,
    netns: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

#[test]
fn attach_forms_run_in_process() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
        eprintln!("SKIP: needs root and iproute2");
        return;
    }
    let id = std::process::id() % 100_000;
    let (br, hif, ns) = (format!("mxb{id}"), format!("mxv{id}"), format!("mxn{id}"));
    let _c = Cleanup {
        links: vec![hif.clone(), br.clone()],
        netns: ns.clone(),
    };
    sh(&["ip", "netns", "add", &ns]);
    sh(&["ip", "link", "add", &br, "type", "bridge"]);
    let path = format!("/run/netns/{ns}");
    let ex = HostExecutor;
    let own_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();

    let add = ip(&format!(
        "link add {hif} numtxqueues 1 numrxqueues 1 type veth peer name eth0 numtxqueues 1 numrxqueues 1 address 02:6d:00:11:22:33 netns {path}"
    ));
    let out = rtnl::run(&add).expect("handled in-process");
    assert_eq!(out.status, 0, "{}", out.stderr);
    // Created with one queue each (no cut to one afterwards, which waits
    // for an RCU grace period per end).
    let host_end = sh(&["ip", "-d", "link", "show", "dev", &hif]);
    let peer_end = sh(&["ip", "-n", &ns, "-d", "link", "show", "dev", "eth0"]);
    for l in [&host_end, &peer_end] {
        assert!(l.contains("numtxqueues 1 numrxqueues 1"), "{l}");
    }
    // The same again: the error reads as ip's (callers match on it).
    let again = ex.run(&add.clone().allow_failure()).unwrap();
    assert_ne!(again.status, 0);
    assert!(again.stderr.contains("File exists"), "{}", again.stderr);

    let set = ip(&format!(
        "link set dev {hif} alias moat:/test master {br} up"
    ));
    assert_eq!(rtnl::run(&set).expect("handled").status, 0);
    let link = sh(&["ip", "-d", "link", "show", "dev", &hif]);
    assert!(link.contains(&format!("master {br}")), "{link}");
    assert!(link.contains("alias moat:/test"), "{link}");
    assert!(link.contains(",UP"), "{link}");

    let inside = batch(
        &path,
        "addr add 10.251.3.2/24 dev eth0\nlink set dev eth0 up\nlink set dev lo up\n\
             route replace default via 10.251.3.254 dev eth0\n",
    );
    let out = rtnl::run(&inside).expect("handled");
    assert_eq!(out.status, 0, "{}", out.stderr);
    let addr = sh(&["ip", "-n", &ns, "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("inet 10.251.3.2/24"), "{addr}");
    let eth0 = sh(&["ip", "-n", &ns, "link", "show", "dev", "eth0"]);
    assert!(eth0.contains("link/ether 02:6d:00:11:22:33"), "{eth0}");
    let lo = sh(&["ip", "-n", &ns, "link", "show", "dev", "lo"]);
    assert!(lo.contains(",UP"), "{lo}");
    let routes = sh(&["ip", "-n", &ns, "route"]);
    assert!(
        routes.contains("default via 10.251.3.254 dev eth0"),
        "{routes}"
    );
    // Nothing of this happened in the host's namespace, and this thread is
    // still in it.
    assert!(!sh(&["ip", "-4", "addr"]).contains("10.251.3.2"));
    assert!(!sh(&["ip", "route"]).contains("10.251.3.254"));
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        own_ns
    );

    // A failing step stops the rest, as `ip -batch` stops: the address is
    // there already, so the route to another gateway is not added.
    let again = batch(
        &path,
        "addr add 10.251.3.2/24 dev eth0\nroute replace default via 10.251.3.253 dev eth0\n",
    );
    let out = rtnl::run(&again).expect("handled");
    assert_ne!(out.status, 0);
    assert!(out.stderr.contains("File exists"), "{}", out.stderr);
    assert!(sh(&["ip", "-n", &ns, "route"]).contains("default via 10.251.3.254"));

    // An interface that is not there: left to ip, which says so.
    let missing = ip(&format!("link set dev mxnone0 alias a master {br} up"));
    assert!(rtnl::run(&missing).is_none());
}
