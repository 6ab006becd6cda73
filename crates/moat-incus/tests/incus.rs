//! The `incus` driver against the local incusd (root; skipped without it):
//! a 2-domain project applied through Incus (static addresses, exec, the
//! isolation matrix), drift (stopped, deleted, limit changed by hand) repaired
//! by apply, an instance created by hand left alone, snapshots.

mod common;

use common::*;
use moat_driver::Driver;
use moat_incus::client::enc;
use serde_json::json;

const PROJECT: &str = r#"
schema_version: 1
project: incustest
addressing: { base: "10.181", zone_step: 1 }
defaults:
  driver: { container: incus }
domains:
  alpha:
    trust_level: trusted
    egress: none
    profiles:
      small: { config: { limits.cpu.allowance: "50%" } }
    machines:
      one: { pids: 200, profiles: [small] }
      two: {}
  beta:
    trust_level: untrusted
    egress: none
    machines:
      three: { memory: 256MiB }
"#;

fn ping(e: &moat_engine::Engine, from: &str, to: &str) -> bool {
    exec(e, from, &format!("ping -c1 -W1 {to} >/dev/null 2>&1")).0 == 0
}

fn addr_of(e: &moat_engine::Engine, m: &str) -> String {
    exec(e, m, "ip -4 -o addr show eth0 | awk '{print $4}'")
        .1
        .trim()
        .to_string()
}

#[test]
fn two_domains_drift_unmanaged_snapshots() {
    let Some(client) = incus() else { return };
    let t = TestRoot::new(client.clone());
    t.write(PROJECT);
    let proj = t.project();
    let mut e = t.engine();
    apply(&mut e, &proj);

    // Static addresses: what moat allocated is what the machines have.
    let checked = e.check(&proj).expect("check");
    let nics = checked.resolved.nics.clone();
    for m in ["alpha-one", "alpha-two", "beta-three"] {
        let want = format!("{}/24", nics[m].ip);
        assert!(
            wait_until(20, || addr_of(&e, m) == want),
            "{m} should get {want}, has '{}'",
            addr_of(&e, m)
        );
    }
    let ip = |m: &str| nics[m].ip.to_string();
    let gw_beta = checked.resolved.networks["beta"].gateway.to_string();

    // Isolation: within a domain yes; across domains and to the other
    // domain's gateway (the host) no.
    assert!(ping(&e, "alpha-one", &ip("alpha-two")), "intra-domain ping");
    assert!(!ping(&e, "alpha-one", &ip("beta-three")), "alpha → beta");
    assert!(!ping(&e, "beta-three", &ip("alpha-one")), "beta → alpha");
    assert!(!ping(&e, "alpha-one", &gw_beta), "alpha → beta's gateway");

    // Limits and profiles reached Incus.
    let p_alpha = t.project_name("alpha");
    let one = instance(&client, &p_alpha, "alpha-one").expect("alpha-one");
    assert_eq!(one["config"]["limits.processes"], "200");
    assert_eq!(one["profiles"], json!(["default", "small"]));
    assert_eq!(one["devices"]["eth0"]["ipv4.address"], ip("alpha-one"));
    assert!(
        plan_lines(&e, &proj).is_empty(),
        "plan after apply is empty"
    );

    // An instance created by hand in a moat project: reported, left alone.
    client
        .call(
            "POST",
            &format!("/1.0/instances?project={}", enc(&p_alpha)),
            Some(&json!({"name": "byhand", "source": {"type": "image", "alias": "busybox"}})),
        )
        .expect("create byhand");
    let driver = moat_incus::IncusDriver::new();
    let ctx = moat_driver::Ctx {
        root: t.root(),
        run_dir: t.root().join("run"),
        root_tag: t.tag.clone(),
    };
    let unmanaged = driver.unmanaged(&ctx).expect("unmanaged");
    assert!(
        unmanaged.iter().any(|u| u.contains("byhand")),
        "{unmanaged:?}"
    );
    assert!(
        plan_lines(&e, &proj).is_empty(),
        "unmanaged is not in the plan"
    );
    let report = e
        .plan(&e.check(&proj).expect("check"), &Default::default())
        .expect("plan");
    assert!(
        report.to_string().contains("unmanaged: incus instance"),
        "{report}"
    );

    // Drift by hand: stop one, delete one, change a limit.
    let p_beta = t.project_name("beta");
    client
        .call(
            "PUT",
            &format!("/1.0/instances/alpha-two/state?project={}", enc(&p_alpha)),
            Some(&json!({"action": "stop", "force": true})),
        )
        .expect("stop by hand");
    client
        .call(
            "PUT",
            &format!("/1.0/instances/beta-three/state?project={}", enc(&p_beta)),
            Some(&json!({"action": "stop", "force": true})),
        )
        .expect("stop beta-three");
    client
        .call(
            "DELETE",
            &format!("/1.0/instances/beta-three?project={}", enc(&p_beta)),
            None,
        )
        .expect("delete by hand");
    client
        .call(
            "PATCH",
            &format!("/1.0/instances/alpha-one?project={}", enc(&p_alpha)),
            Some(&json!({"config": {"limits.processes": "300"}})),
        )
        .expect("limit by hand");
    let lines = plan_lines(&e, &proj);
    eprintln!("drift plan: {lines:#?}");
    let has = |id: &str| lines.iter().any(|l| l.starts_with(id));
    assert!(has("start-machine:alpha-two"), "{lines:?}");
    assert!(has("create-machine:beta-three"), "{lines:?}");
    assert!(has("update-machine:alpha-one"), "{lines:?}");
    apply(&mut e, &proj);
    assert!(plan_lines(&e, &proj).is_empty(), "drift repaired");
    let one = instance(&client, &p_alpha, "alpha-one").expect("alpha-one");
    assert_eq!(one["config"]["limits.processes"], "200");
    assert!(
        instance(&client, &p_alpha, "byhand").is_some(),
        "byhand untouched"
    );

    // Snapshot and restore through the driver.
    assert_eq!(exec(&e, "alpha-two", "echo before > /root/f").0, 0);
    driver.snapshot(&ctx, "alpha-two", "s1").expect("snapshot");
    assert_eq!(exec(&e, "alpha-two", "rm /root/f").0, 0);
    driver.restore(&ctx, "alpha-two", "s1").expect("restore");
    assert_eq!(exec(&e, "alpha-two", "cat /root/f").1.trim(), "before");
    assert_eq!(driver.snapshots(&ctx, "alpha-two").expect("list"), ["s1"]);
}
