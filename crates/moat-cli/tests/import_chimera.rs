//! `moat import chimera` on the Chimera-style folder of moat-import's tests,
//! then `moat validate` and `moat plan` on the output: exactly the intended
//! containers, and the notes with file:line on stderr. Needs no root (plan
//! reads a fresh private root).

use std::path::Path;
use std::process::Command;

fn moat(root: &Path, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("--root")
        .arg(root)
        .arg("--no-daemon")
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run moat");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn import_chimera_then_validate_and_plan() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../moat-import/tests/data/chimera-lab");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let out = tmp.path().join("lab");
    let (ok, _, err) = moat(
        &root,
        &[
            "import",
            "chimera",
            src.to_str().expect("utf-8"),
            "-o",
            out.to_str().expect("utf-8"),
        ],
    );
    assert!(ok, "import failed: {err}");
    assert!(
        err.contains("nodes/prod-node1.yaml:20:1: container 'legacy': ensure: absent"),
        "{err}"
    );
    assert!(err.contains("imported 4 machines"), "{err}");
    let f = out.to_str().expect("utf-8");
    let (ok, stdout, err) = moat(&root, &["-f", f, "validate", "--json"]);
    assert!(ok, "validate failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let mut names = vec![];
    for (d, dom) in v["project"]["project"]["domains"]
        .as_object()
        .expect("domains")
    {
        for (m, mach) in dom["machines"].as_object().expect("machines") {
            assert_eq!(mach["driver"], "nspawn", "{m}");
            names.push(format!("{d}-{m}"));
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "lab-sandbox",
            "lab-web",
            "prod-node-gateway",
            "prod-node-monitor"
        ]
    );
    let (ok, plan, err) = moat(&root, &["-f", f, "plan"]);
    assert!(ok, "plan failed: {err}");
    for n in &names {
        assert!(
            plan.contains(n.as_str()),
            "{n} missing from the plan:\n{plan}"
        );
    }
    for gone in ["legacy", "rocky"] {
        assert!(!plan.contains(gone), "{gone} must not be planned:\n{plan}");
    }
    eprintln!("{plan}");
}
