//! Ad-hoc machines through the CLI, as root: `run` (foreground exit status,
//! `--rm`, `-d`), `exec`, `logs`, `stop`/`start`, `snapshot`, `restore`,
//! `clone`, `destroy`, and that nothing of the root is left afterwards.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn supervisor() -> Option<PathBuf> {
    let moat = PathBuf::from(env!("CARGO_BIN_EXE_moat"));
    let sup = moat.with_file_name("moat-supervisor");
    if sup.exists() {
        return Some(sup);
    }
    let ok = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "moat-runtime",
            "--bin",
            "moat-supervisor",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .is_ok_and(|s| s.success());
    (ok && sup.exists()).then_some(sup)
}

/// A root of its own; `Drop` destroys what it holds and unmounts leftovers.
struct Root {
    dir: tempfile::TempDir,
    sup: PathBuf,
}

impl Root {
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn moat(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_moat"))
            .arg("--root")
            .arg(self.path())
            .args(args)
            .env("MOAT_SUPERVISOR", &self.sup)
            .env("NO_COLOR", "1")
            .output()
            .expect("run moat")
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.moat(args);
        assert!(
            o.status.success(),
            "moat {args:?} failed ({:?}): {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn mounts(&self) -> Vec<String> {
        let root = self.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = self.moat(&["destroy", "--all", "--force"]);
        let mut m = self.mounts();
        m.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in m {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
    }
}

#[test]
fn run_exec_snapshot_clone_destroy() {
    if !is_root() {
        eprintln!("SKIP: needs root (containers, mounts, cgroups)");
        return;
    }
    let Some(sup) = supervisor() else {
        eprintln!("SKIP: moat-supervisor could not be built");
        return;
    };
    let r = Root {
        dir: tempfile::tempdir().unwrap(),
        sup,
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
    r.ok(&["exec", "src", "--", "sh", "-c", "echo v1 > /data.txt"]);

    // Snapshots need a stopped machine; restore brings the files back.
    let o = r.moat(&["snapshot", "create", "src", "s1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("moat stop src"));
    r.ok(&["stop", "src", "-t", "2"]);
    r.ok(&["snapshot", "create", "src", "s1"]);
    assert!(r.ok(&["snapshot", "ls", "src"]).contains("s1"));
    r.ok(&["start", "src"]);
    r.ok(&["exec", "src", "--", "sh", "-c", "echo v2 > /data.txt"]);
    r.ok(&["stop", "src", "-t", "2"]);

    // A clone has the source's files as they are now; the source is unchanged.
    r.ok(&["clone", "src", "copy"]);
    r.ok(&["snapshot", "restore", "src", "s1"]);
    r.ok(&["start", "src"]);
    r.ok(&["start", "copy"]);
    assert_eq!(r.ok(&["exec", "src", "--", "cat", "/data.txt"]), "v1\n");
    assert_eq!(r.ok(&["exec", "copy", "--", "cat", "/data.txt"]), "v2\n");

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
