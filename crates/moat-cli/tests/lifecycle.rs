//! Ad-hoc machines through the CLI, as root: `run` (foreground exit status,
//! `--rm`, `-d`), `exec`, `logs`, `stop`/`start`, `snapshot` (of a running
//! and of a stopped machine), `restore`,
//! `clone`, `destroy`, and that nothing of the root is left afterwards.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn run_exec_snapshot_clone_destroy() {
    let Some(r) = common::root_or_skip() else {
        return;
    };

    // Foreground run: output on our stdout/stderr, the workload's exit status.
    let o = r.moat(&[
        "run",
        "--rm",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("err"));
    assert!(r.mounts().is_empty(), "--rm left mounts: {:?}", r.mounts());
    // The root's cgroup parent stays for the next machine, empty; the
    // machine's own cgroup is gone. `destroy --all` removes the parent (end).
    let parents = root_cgroup_parents(r.path());
    assert!(!parents.is_empty(), "no /moat-<tag> cgroup parent was kept");
    for p in &parents {
        let inside: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name())
            .collect();
        assert!(
            inside.is_empty(),
            "--rm left cgroups in {}: {inside:?}",
            p.display()
        );
    }

    // The warm supervisor starts off the launcher's CPU (see
    // `machine::prespawn`); what it runs gets all the launcher's CPUs back.
    let cpus = |status: &str| {
        status
            .lines()
            .find(|l| l.starts_with("Cpus_allowed_list:"))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
    };
    let inside = r.ok(&["run", "--rm", "busybox", "--", "cat", "/proc/self/status"]);
    let here = std::fs::read_to_string("/proc/self/status").unwrap();
    assert_eq!(
        cpus(&inside),
        cpus(&here),
        "CPU affinity inside the machine"
    );

    // `run` joins the user and network namespaces that its warm supervisor
    // made while the CLI prepared (`machine::prespawn_hint`), the user one
    // also idmapping the image's layers: as it would have made them itself.
    let inside = r.ok(&[
        "run",
        "--rm",
        "busybox",
        "--",
        "sh",
        "-c",
        "cat /proc/self/uid_map; ls /sys/class/net; stat -c %u:%g /proc/self/net/dev /bin/busybox",
    ]);
    let lines: Vec<&str> = inside.lines().map(str::trim).collect();
    let map: Vec<u64> = lines[0]
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert!(
        map.len() == 3 && map[0] == 0 && map[1] >= 1_000_000 && map[2] == 65536,
        "{inside}"
    );
    assert_eq!(lines[1..], ["lo", "0:0", "0:0"], "{inside}");

    // A `--rm` machine that cannot start leaves nothing either.
    let o = r.moat(&["run", "--rm", "busybox", "--", "/nonexistent"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("/nonexistent"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        r.mounts().is_empty(),
        "failed --rm left mounts: {:?}",
        r.mounts()
    );
    let left: Vec<_> = std::fs::read_dir(r.path().join("machines"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "failed --rm left machines: {left:?}");

    // A `--rm` (disposable) machine's folder is a tmpfs: what it writes
    // never reaches the disk, and all of it goes with the machine.
    r.ok(&[
        "run",
        "--rm",
        "-d",
        "--name",
        "vol",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo kept-in-memory > /written; exec sleep 1000",
    ]);
    let folder = r.path().join("machines/vol");
    let fstype = |p: &Path| {
        let want = p.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
            .next_back()
    };
    assert_eq!(fstype(&folder).as_deref(), Some("tmpfs"));
    let written = folder.join("fs/upper/written");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !written.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read_to_string(&written).unwrap_or_default(),
        "kept-in-memory\n"
    );
    r.ok(&["destroy", "vol"]);
    assert!(!folder.exists(), "destroy left {}", folder.display());
    assert!(
        r.mounts().is_empty(),
        "--rm -d left mounts: {:?}",
        r.mounts()
    );

    // After a host reboot a stopped disposable machine's folder is empty (its
    // tmpfs is gone) and no driver lists it: `destroy NAME` still removes
    // it and its record. The reboot is played by unmounting the tmpfs.
    r.ok(&[
        "run", "--rm", "-d", "--name", "reboot", "busybox", "--", "sleep", "1000",
    ]);
    r.ok(&["stop", "reboot"]);
    let folder = r.path().join("machines/reboot");
    let st = Command::new("umount")
        .arg("-R")
        .arg(&folder)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 0);
    let out = r.ok(&["destroy", "reboot"]);
    assert!(out.contains("reboot"), "{out}");
    assert!(!folder.exists(), "destroy left {}", folder.display());
    let o = r.moat(&["destroy", "reboot"]);
    assert!(!o.status.success(), "a second destroy found it again");

    // Detached run, exec with exit status, logs.
    assert_eq!(
        r.ok(&[
            "run",
            "-d",
            "--name",
            "src",
            "busybox",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 1000"
        ])
        .trim(),
        "src"
    );
    let o = r.moat(&["exec", "src", "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7));
    assert!(r.ok(&["logs", "src"]).contains("started"));
    // A file written, an image file deleted (a whiteout in the writable
    // layer), a new folder: all three must survive a snapshot of the live machine.
    r.ok(&[
        "exec",
        "src",
        "--",
        "sh",
        "-c",
        "echo v1 > /data.txt; rm /bin/vi; mkdir /d; echo x > /d/f",
    ]);

    // A running machine is snapshotted frozen, then thawed: it goes on.
    r.ok(&["snapshot", "create", "src", "s1"]);
    assert!(r.ok(&["snapshot", "ls", "src"]).contains("s1"));
    let st: serde_json::Value = serde_json::from_str(&r.ok(&["status", "--json"])).unwrap();
    let src = st["machines"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == "src"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(src["state"], "running", "{st}");
    let cg = std::fs::read_dir("/sys/fs/cgroup/freezer")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("src/freezer.state"))
        .find(|p| p.exists());
    if let Some(cg) = cg {
        assert_eq!(std::fs::read_to_string(cg).unwrap().trim(), "THAWED");
    }
    r.ok(&[
        "exec",
        "src",
        "--",
        "sh",
        "-c",
        "echo v2 > /data.txt; rm -r /d",
    ]);
    // Restoring needs it stopped.
    let o = r.moat(&["snapshot", "restore", "src", "s1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("moat stop src"));
    r.ok(&["stop", "src", "-t", "2"]);
    // A stopped machine: constant time.
    r.ok(&["snapshot", "create", "src", "s2"]);
    r.ok(&["start", "src"]);
    assert_eq!(r.ok(&["exec", "src", "--", "cat", "/data.txt"]), "v2\n");
    r.ok(&["stop", "src", "-t", "2"]);

    // A clone has the source's files as they are now; the source is unchanged.
    r.ok(&["clone", "src", "copy"]);
    r.ok(&["snapshot", "restore", "src", "s1"]);
    r.ok(&["start", "src"]);
    r.ok(&["start", "copy"]);
    assert_eq!(r.ok(&["exec", "src", "--", "cat", "/data.txt"]), "v1\n");
    assert_eq!(r.ok(&["exec", "src", "--", "cat", "/d/f"]), "x\n");
    let o = r.moat(&["exec", "src", "--", "test", "-e", "/bin/vi"]);
    assert_eq!(o.status.code(), Some(1), "the deleted /bin/vi came back");
    assert_eq!(r.ok(&["exec", "copy", "--", "cat", "/data.txt"]), "v2\n");
    let o = r.moat(&["exec", "copy", "--", "test", "-e", "/d"]);
    assert_eq!(o.status.code(), Some(1));

    // Destroy: no machine, mount, process or cgroup of this root is left.
    r.ok(&["destroy", "--all", "--force"]);
    assert!(r.mounts().is_empty(), "mounts left: {:?}", r.mounts());
    let st: serde_json::Value = serde_json::from_str(&r.ok(&["status", "--json"])).unwrap();
    assert_eq!(st["machines"].as_array().map(Vec::len), Some(0), "{st}");
    let root = r.path().to_string_lossy().into_owned();
    let procs = Command::new("pgrep").args(["-f", &root]).output().unwrap();
    assert!(
        procs.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
    let parents = root_cgroup_parents(r.path());
    assert!(parents.is_empty(), "cgroup parents left: {parents:?}");
    for ctl in ["memory", "pids", "cpu,cpuacct", "unified"] {
        let base = Path::new("/sys/fs/cgroup").join(ctl);
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                assert!(
                    n != "src" && n != "copy",
                    "cgroup {n} left in {}",
                    base.display()
                );
            }
        }
    }
}

/// The root's cgroup parent (`/moat-<tag>`) in each hierarchy where it exists.
fn root_cgroup_parents(root: &Path) -> Vec<std::path::PathBuf> {
    let tag = moat_core::naming::root_tag(&root.to_string_lossy());
    let mut found = Vec::new();
    for base in ["/sys/fs/cgroup".to_string()].into_iter().chain(
        std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().to_string_lossy().into_owned()),
    ) {
        let p = Path::new(&base).join(format!("moat-{tag}"));
        if p.is_dir() {
            found.push(p);
        }
    }
    found
}
