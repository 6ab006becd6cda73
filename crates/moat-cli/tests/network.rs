//! Networks through the CLI, as root: a host-network machine in an admin
//! domain, `moat network rules` and `moat network status`, and the rule-level
//! firewall diff `moat plan` shows when a policy changes.

mod common;

use common::{is_root, supervisor, Root};

const PROJECT: &str = r#"
schema_version: 1
project: nettest
addressing: { base: "10.190" }
domains:
  ops:
    trust_level: admin
    egress: none
    machines:
      hostnet: { network: host }
      inner: {}
  web:
    trust_level: untrusted
    egress: none
    machines:
      srv: { command: ["httpd", "-f", "-p", "8080"] }
policies:
  - from: ops
    to: web-srv
    ports: [8080]
"#;

#[test]
fn host_network_rules_status_and_firewall_diff() {
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

    // The host-network machine sees the host's interfaces, moat's bridges included.
    let st: serde_json::Value =
        serde_json::from_str(&r.ok(&["-f", f, "status", "--json"])).unwrap();
    let tag = st["root_tag"].as_str().unwrap().to_string();
    let links = r.ok(&["exec", "ops-hostnet", "--", "ip", "-o", "link"]);
    assert!(links.contains(&format!("mt{tag}-ops")), "{links}");
    // ... and is marked as such in status.
    let human = r.ok(&["-f", f, "status"]);
    let line = human
        .lines()
        .find(|l| l.starts_with("ops-hostnet"))
        .unwrap()
        .to_string();
    assert!(line.contains("HOST!"), "{human}");
    // A domain machine has only lo and eth0.
    let inner = r.ok(&["exec", "ops-inner", "--", "ip", "-o", "link"]);
    assert_eq!(inner.lines().count(), 2, "{inner}");

    // network rules: the script moat applies; network status: bridges, ports, counters.
    let rules = r.ok(&["-f", f, "network", "rules"]);
    assert!(
        rules.contains(&format!("table inet moat_{tag}"))
            && rules.contains(&format!("table bridge moat_{tag}"))
    );
    let ns = r.ok(&["-f", f, "network", "status"]);
    assert!(ns.contains("applied, up to date"), "{ns}");
    assert!(
        ns.contains(&format!("mt{tag}-web")) && ns.contains("=web-srv"),
        "{ns}"
    );
    assert!(ns.contains("between domains"), "{ns}");

    // The policy works; changing it shows rule-level changes in the plan.
    let srv_ip = st["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "web-srv")
        .and_then(|m| m["ip"].as_str())
        .unwrap()
        .to_string();
    let probe = format!("echo -e 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {srv_ip} 8080 | head -1");
    assert!(r
        .ok(&["exec", "ops-inner", "--", "sh", "-c", &probe])
        .contains("HTTP/1."));
    std::fs::write(
        proj.join("moat.yml"),
        PROJECT.replace("ports: [8080]", "ports: [8080, 9090]"),
    )
    .unwrap();
    let plan = r.ok(&["-f", f, "plan"]);
    assert!(plan.contains("~ apply firewall"), "{plan}");
    assert!(
        plan.contains("+ ") && plan.contains("9090") && plan.contains("- "),
        "{plan}"
    );
    r.ok(&["-f", f, "apply"]);
    assert!(r.ok(&["-f", f, "plan"]).contains("No changes."));
    r.ok(&["destroy", "--all", "--force"]);
}
