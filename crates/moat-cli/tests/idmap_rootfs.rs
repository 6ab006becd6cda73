//! Idmapped roots through the CLI and the image store, as root: two busybox
//! machines from one image run with idmapped lower layers (`status --json`
//! says `rootfs_ownership: idmapped`), see root-owned files inside, write
//! into their upper layer in their own id range, leave the image layer
//! owned by uid 0 on disk, and `destroy` leaves no mount behind.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Every folder named `fs` below `<root>/machines` holding `upper/made`.
fn upper_file(root: &Path, made: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(root.join("machines"))
        .expect("machines dir")
        .flatten()
    {
        let p = e.path().join("fs/upper").join(made);
        if p.exists() {
            v.push(p);
        }
    }
    v
}

/// Files below `dir` not owned by 0:0.
fn not_root_owned(dir: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.uid() != 0 || m.gid() != 0 {
            bad.push(format!("{} {}:{}", p.display(), m.uid(), m.gid()));
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push(e.path());
            }
        }
    }
    bad
}

#[test]
fn two_machines_share_an_idmapped_image_layer() {
    let Some(r) = common::root_or_skip() else {
        return;
    };
    for n in ["ida", "idb"] {
        r.ok(&["run", "-d", "--name", n, "busybox", "--", "sleep", "1000"]);
    }
    let status: serde_json::Value =
        serde_json::from_str(&r.ok(&["status", "--json"])).expect("status json");
    let machines = status["machines"].as_array().expect("machines");
    assert_eq!(machines.len(), 2, "{status}");
    for m in machines {
        assert_eq!(m["rootfs_ownership"], "idmapped", "{m}");
    }

    let mut bases = Vec::new();
    for n in ["ida", "idb"] {
        let owners = r.ok(&[
            "exec",
            n,
            "--",
            "sh",
            "-c",
            "stat -c %u:%g / /bin/busybox /etc /etc/hostname | sort -u",
        ]);
        assert_eq!(owners.trim(), "0:0", "{n}: owners inside");
        let map = r.ok(&["exec", n, "--", "cat", "/proc/self/uid_map"]);
        let base: u32 = map
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("uid_map");
        let made = format!("made-by-{n}");
        r.ok(&["exec", n, "--", "touch", &format!("/{made}")]);
        let files = upper_file(r.path(), &made);
        assert_eq!(files.len(), 1, "{made} in one upper: {files:?}");
        let meta = std::fs::metadata(&files[0]).expect("stat");
        assert_eq!((meta.uid(), meta.gid()), (base, base), "{made} on disk");
        bases.push(base);
    }
    assert_ne!(bases[0], bases[1], "each machine its own range");

    // The image's layers: still owned by root on disk, nothing chowned.
    let layers: Vec<PathBuf> = walkdir_layers(r.path());
    assert!(!layers.is_empty(), "no layer found under {:?}", r.path());
    for l in &layers {
        let bad = not_root_owned(l);
        assert!(bad.is_empty(), "layer {} chowned: {bad:?}", l.display());
    }

    // A disposable run (a `volatile` overlay) is idmapped too.
    let o = r.ok(&[
        "run",
        "--rm",
        "busybox",
        "--",
        "sh",
        "-c",
        "stat -c %u:%g /bin/busybox; grep -c ' moat-idmapped:' /proc/self/mountinfo || true",
    ]);
    // Inside, the root mount is the idmapped overlay.
    assert_eq!(o, "0:0\n1\n", "disposable run");

    r.ok(&["destroy", "--all", "--force"]);
    assert!(r.mounts().is_empty(), "mounts left: {:?}", r.mounts());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root = r.path().to_string_lossy().into_owned();
    let left: Vec<&str> = info
        .lines()
        .filter(|l| l.contains(&root) || (l.contains("moat-idmapped") && l.contains("ida")))
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
}

/// The store's layer folders (`.../layers/<id>/`), found without knowing the layout.
fn walkdir_layers(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            let q = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) || q.starts_with(root.join("machines")) {
                continue;
            }
            if p.file_name().is_some_and(|n| n == "layers") {
                out.push(q);
            } else {
                stack.push(q);
            }
        }
    }
    out
}
