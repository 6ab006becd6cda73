//! cloud-init for containers, through the CLI, as root: a Debian bookworm
//! image with cloud-init installed boots as a system container and configures
//! itself offline from its `cloud_init:` (a template from
//! `cloud_init_templates:`, the domain's `cloud_init:` and the machine's own,
//! deep-merged): the user exists, the files are written, runcmd ran, the
//! hostname and instance id are moat's. Checked with the built-in runtime
//! (`native`) and, when systemd-nspawn is installed, the nspawn driver.
//!
//! The image is a folder: `MOAT_TEST_CLOUDINIT_ROOTFS`, else the cache
//! `/var/tmp/moat-cloudinit-cache/rootfs`, built there with mmdebstrap on
//! first use (~2.5 min, network-bound; the same packages as the image store's
//! `debian/bookworm` with `packages: [cloud-init]`). Without mmdebstrap or
//! apt sources the test is skipped.

mod common;

use common::{is_root, supervisor, Root};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The image store's system packages (moat-image `SYSTEM_PACKAGES`) plus cloud-init.
const PACKAGES: &str = "systemd,systemd-sysv,iproute2,dbus,ca-certificates,cloud-init";

fn rootfs_dir() -> PathBuf {
    std::env::var_os("MOAT_TEST_CLOUDINIT_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/moat-cloudinit-cache/rootfs"))
}

fn ready(p: &Path) -> bool {
    p.join("usr/bin/cloud-init").exists() && p.join("sbin/init").exists()
}

/// The cached rootfs, built (under a lock, into a temporary folder renamed
/// into place) when missing.
fn rootfs() -> Result<PathBuf, String> {
    let dest = rootfs_dir();
    if ready(&dest) {
        return Ok(dest);
    }
    let parent = dest.parent().ok_or("the cache folder has no parent")?;
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let lock = std::fs::File::create(parent.join(".build.lock")).map_err(|e| e.to_string())?;
    lock.lock().map_err(|e| format!("locking the cache: {e}"))?;
    if ready(&dest) {
        return Ok(dest);
    }
    if Command::new("mmdebstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("mmdebstrap is not installed (apt-get install mmdebstrap)".into());
    }
    let tmp = parent.join(format!("build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let t = Instant::now();
    let out = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--mode=root", "--format=directory"])
        .arg(format!("--include={PACKAGES}"))
        .arg("bookworm")
        .arg(&tmp)
        .output()
        .map_err(|e| format!("mmdebstrap: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(format!(
            "mmdebstrap failed (apt sources unreachable?): {}",
            tail.join(" | ")
        ));
    }
    // systemd generates a machine id at first boot, as the image store leaves it.
    let _ = std::fs::write(tmp.join("etc/machine-id"), "");
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    eprintln!(
        "built the bookworm + cloud-init rootfs in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(dest)
}

fn has_nspawn() -> bool {
    ["/usr/bin/systemd-nspawn", "/bin/systemd-nspawn"]
        .iter()
        .any(|p| Path::new(p).exists())
}

fn project(rootfs: &Path, nspawn: bool) -> String {
    let nspawn_machine = if nspawn {
        "      cin:\n        driver: nspawn\n        image: ci\n        cloud_init:\n          user-data:\n            runcmd:\n              - [sh, -c, \"echo nspawn > /etc/moat-runcmd\"]\n"
    } else {
        ""
    };
    format!(
        r#"schema_version: 1
project: citest
images:
  ci: {{ source: folder, path: "{}" }}
cloud_init_templates:
  base:
    user-data:
      users:
        - name: alice
          shell: /bin/bash
      write_files:
        - path: /etc/moat-hello
          content: "hello from cloud-init\n"
    meta-data:
      owner: template
domains:
  cilab:
    trust_level: trusted
    egress: none
    subnet: 10.161.77.0/24
    cloud_init:
      template: base
      meta-data:
        owner: domain
    machines:
      ci:
        image: ci
        cloud_init:
          user-data:
            runcmd:
              - [sh, -c, "echo native > /etc/moat-runcmd"]
{nspawn_machine}"#,
        rootfs.display()
    )
}

/// Waits for cloud-init to finish in `machine`, then reads what it did.
fn check(r: &Root, machine: &str, runcmd: &str) {
    let t = Instant::now();
    let o = r.moat(&[
        "exec",
        machine,
        "--",
        "sh",
        "-c",
        "end=$(( $(date +%s) + 300 )); \
         while [ ! -e /var/lib/cloud/instance/boot-finished ] && [ $(date +%s) -lt $end ]; do sleep 0.2; done; \
         cloud-init status --long; echo; cat /var/lib/cloud/data/status.json 2>/dev/null | head -40; \
         [ -e /var/lib/cloud/instance/boot-finished ] || { echo '--- not finished: jobs, failed units, journal'; \
         systemctl list-jobs --no-pager; systemctl --failed --no-pager; journalctl -b --no-pager | tail -60; }",
    ]);
    let status = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!(
        "{machine}: cloud-init finished after {:.1} s of waiting:\n{status}",
        t.elapsed().as_secs_f64()
    );
    // Every module succeeded (moat sets `locale: C.UTF-8` for an image without
    // compiled locales, so the locale module does not fail on a minbase root).
    assert!(
        status.lines().any(|l| l.trim() == "status: done"),
        "cloud-init did not finish cleanly in {machine}:\n{status}"
    );
    let out = r.ok(&[
        "exec",
        machine,
        "--",
        "sh",
        "-c",
        "id alice; getent passwd alice | cut -d: -f7; cat /etc/moat-hello /etc/moat-runcmd; \
         hostname; cloud-init query instance_id 2>/dev/null || cat /var/lib/cloud/data/instance-id; \
         cloud-init query ds.meta_data.owner 2>/dev/null || echo no-query",
    ]);
    eprintln!("{machine}: {out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("uid=") && l.contains("(alice)")),
        "user alice missing in {machine}: {out}\ncloud-init status: {status}"
    );
    assert_eq!(lines.get(1), Some(&"/bin/bash"), "{out}");
    assert_eq!(lines.get(2), Some(&"hello from cloud-init"), "{out}");
    assert_eq!(lines.get(3), Some(&runcmd), "{out}");
    let short = machine.trim_start_matches("cilab-");
    assert_eq!(lines.get(4), Some(&short), "{out}");
    assert!(
        lines
            .get(5)
            .is_some_and(|l| l.starts_with(&format!("moat-{machine}-"))),
        "instance id: {out}"
    );
    // meta-data: the domain's value overrides the template's.
    if lines.get(6) != Some(&"no-query") {
        assert_eq!(lines.get(6), Some(&"domain"), "{out}");
    }
}

#[test]
fn debian_cloud_init_configures_the_machine_on_first_boot() {
    if !is_root() {
        eprintln!("SKIP: needs root (containers, bridges, nftables)");
        return;
    }
    let Some(sup) = supervisor() else {
        eprintln!("SKIP: moat-supervisor could not be built");
        return;
    };
    let t0 = Instant::now();
    let rootfs = match rootfs() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: no Debian rootfs with cloud-init: {why}");
            return;
        }
    };
    eprintln!("rootfs ready after {:.1} s", t0.elapsed().as_secs_f64());
    let nspawn = has_nspawn();
    if !nspawn {
        eprintln!("note: systemd-nspawn is not installed; only the native driver is checked");
    }
    let r = Root::new(sup);
    let proj = r.path().join("project");
    std::fs::create_dir_all(&proj).expect("mkdir");
    std::fs::write(proj.join("moat.yml"), project(&rootfs, nspawn)).expect("write");
    let f = proj.to_str().expect("utf-8 path");

    // The merged cloud-init is visible before anything runs.
    let v: serde_json::Value =
        serde_json::from_str(&r.ok(&["-f", f, "validate", "--json"])).expect("json");
    let ci = &v["project"]["project"]["domains"]["cilab"]["machines"]["ci"]["cloud_init"];
    assert_eq!(ci["user-data"]["users"][0]["name"], "alice", "{ci}");
    assert_eq!(ci["meta-data"]["owner"], "domain", "{ci}");
    assert!(ci["user-data"]["runcmd"].is_array(), "{ci}");

    let t = Instant::now();
    r.ok(&["-f", f, "apply"]);
    eprintln!("apply: {:.1} s", t.elapsed().as_secs_f64());
    check(&r, "cilab-ci", "native");
    if nspawn {
        check(&r, "cilab-cin", "nspawn");
    }
    // A second apply changes nothing: the seed (and so the instance) is stable.
    let plan = r.ok(&["-f", f, "plan"]);
    assert!(
        !plan.contains("cilab-ci"),
        "the seed must not make the machines drift: {plan}"
    );
    eprintln!("total: {:.1} s", t0.elapsed().as_secs_f64());
}
