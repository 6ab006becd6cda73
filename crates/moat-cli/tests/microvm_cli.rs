//! microVMs through the `moat` binary, as a user runs them: an image imported
//! from an `oci-archive` runs with `moat run --driver qemu` (its entrypoint,
//! cmd, env and working dir; the exit code is `moat run`'s), and `moat logs`
//! shows a microVM's workload output (not the kernel's), `-n` tails it and
//! `-F` follows it while it runs. TCG here. Needs root, QEMU, mkfs.ext4,
//! busybox-static and a guest kernel (fetched once into
//! /var/tmp/moat-test-kernels, shared with moat-qemu's tests).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[path = "../../moat-qemu/tests/support/oci.rs"]
mod oci;

const KERNELS: &str = "/var/tmp/moat-test-kernels";

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

fn needs() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("needs root".into());
    }
    for c in [
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.ext4",
        "busybox",
        "apt-get",
        "sha256sum",
    ] {
        if !have(c) {
            return Some(format!("{c} is not installed (scripts/deps.sh --test)"));
        }
    }
    if !Path::new("/usr/share/qemu/qboot.rom").is_file() {
        return Some("qboot.rom missing (qemu-system-x86)".into());
    }
    None
}

/// moat-init next to the moat binary (built when missing).
fn ensure_init() -> Result<(), String> {
    let moat = PathBuf::from(env!("CARGO_BIN_EXE_moat"));
    if moat.with_file_name("moat-init").is_file() {
        return Ok(());
    }
    let ok = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "moat-init"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .is_ok_and(|s| s.success());
    if ok && moat.with_file_name("moat-init").is_file() {
        Ok(())
    } else {
        Err("cargo build -p moat-init failed".into())
    }
}

fn test_kernel() -> Result<PathBuf, String> {
    if let Some((_, p)) = moat_qemu::kernel::list(Path::new(KERNELS)).pop() {
        return Ok(p);
    }
    moat_qemu::kernel::fetch(Path::new(KERNELS), "linux-image-amd64")
        .map(|k| k.vmlinux.parent().unwrap_or(Path::new("/")).to_path_buf())
        .map_err(|e| e.to_string())
}

/// A private root (traversable: QEMU runs as moat-qemu); `Drop` destroys its machines.
struct Root {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

impl Root {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_moat"));
        c.arg("--root")
            .arg(self.dir.path().join("root"))
            .args(args)
            .env("MOAT_KERNEL", &self.kernel)
            .env("NO_COLOR", "1");
        c
    }
    fn moat(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run moat")
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.moat(args);
        assert!(
            o.status.success(),
            "moat {args:?} failed ({:?}): {}{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = self.moat(&["destroy", "--all", "--force"]);
    }
}

fn setup() -> Option<Root> {
    if let Some(why) = needs() {
        eprintln!("SKIP: {why}");
        return None;
    }
    if let Err(e) = ensure_init() {
        eprintln!("SKIP: no moat-init: {e}");
        return None;
    }
    let kernel = match test_kernel() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIP: no guest kernel: {e}");
            return None;
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("moat-mvcli-")
        .tempdir()
        .expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Some(Root { dir, kernel })
}

#[test]
fn oci_archive_microvm_exit_code_and_logs() {
    let Some(r) = setup() else { return };
    let archive = oci::make_oci_archive(r.dir.path());
    r.ok(&[
        "image",
        "import",
        &archive.display().to_string(),
        "--name",
        "ociapp",
        "--kind",
        "oci-archive",
    ]);

    // Foreground run: the image's own entrypoint/cmd/env/workdir; its exit code.
    let t = Instant::now();
    let o = r.moat(&["run", "--driver", "qemu", "--name", "oci", "ociapp"]);
    eprintln!("moat run of the oci-archive microVM: {:?}", t.elapsed());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        oci::OCI_EXPECTED_OUTPUT,
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(oci::OCI_EXIT_CODE));
    // `moat logs` of the stopped machine: the workload's output only.
    assert_eq!(r.ok(&["logs", "oci"]), oci::OCI_EXPECTED_OUTPUT);
    assert_eq!(r.ok(&["logs", "-n", "1", "oci"]), "oci pwd: /srv/app\n");

    // A detached microVM that keeps printing: `logs -F` follows it.
    r.ok(&[
        "run",
        "-d",
        "--driver",
        "qemu",
        "--name",
        "ticker",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo first; i=0; while [ $i -lt 6 ]; do sleep 1; i=$((i+1)); echo tick $i; done; echo oops >&2; echo the end",
    ]);
    let mut child = r
        .cmd(&["logs", "-F", "ticker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("moat logs -F");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().expect("stdout");
    let _child = Kill(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut followed = vec![];
    let t = Instant::now();
    while !followed.iter().any(|l: &String| l == "the end") {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "logs -F showed only {followed:?}; console:\n{}",
            std::fs::read_to_string(r.dir.path().join("root/run/qemu/ticker/console.log"))
                .unwrap_or_default()
        );
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
            followed.push(l);
        }
    }
    eprintln!("logs -F saw the end after {:?}", t.elapsed());
    let want: Vec<String> = ["first"]
        .into_iter()
        .map(String::from)
        .chain((1..=6).map(|i| format!("tick {i}")))
        .chain(["oops".to_string(), "the end".to_string()])
        .collect();
    // The follower may have started before the first line or after some.
    let start = want
        .iter()
        .position(|w| Some(w) == followed.first())
        .unwrap_or_else(|| panic!("unexpected followed output {followed:?}"));
    assert_eq!(followed, want[start..].to_vec());
    assert!(
        !followed
            .iter()
            .any(|l| l.contains("@moat") || l.contains("reboot")),
        "kernel/init lines in logs: {followed:?}"
    );
}
