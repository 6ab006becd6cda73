//! microVMs under TCG: boot from the busybox image, output and exit code,
//! `exec` into a running microVM, clean stop; an `oci-archive` image run as a
//! microVM with its own entrypoint, cmd, env and working dir. Needs root, QEMU, mkfs.ext4,
//! busybox-static and a kernel (fetched once into /var/tmp/moat-test-kernels,
//! kept across runs; delete the folder to refetch).

use moat_core::model::{Accel, Machine, MachineType};
use moat_driver::{Ctx, Driver, MachineSpec};
use moat_image::{ImageStore, NoProgress};
use moat_qemu::{kernel, microvm, QemuDriver};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const KERNELS: &str = "/var/tmp/moat-test-kernels";

#[path = "support/oci.rs"]
mod oci;

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

fn needs() -> Option<String> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Some("needs root".into());
    }
    for c in [
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.ext4",
        "busybox",
        "apt-get",
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

/// moat-init next to the test binary (built here when missing).
fn ensure_init() -> Result<(), String> {
    if moat_qemu::initramfs::find_init().is_ok() {
        return Ok(());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/<profile>/deps/<test> → <target>
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .ok_or("no target dir")?;
    let st = std::process::Command::new(cargo)
        .args(["build", "-p", "moat-init"])
        .env("CARGO_TARGET_DIR", target)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err("cargo build -p moat-init failed".into());
    }
    moat_qemu::initramfs::find_init()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn test_kernel() -> Result<PathBuf, String> {
    if let Some((_, p)) = kernel::list(Path::new(KERNELS)).pop() {
        return Ok(p);
    }
    kernel::fetch(Path::new(KERNELS), "linux-image-amd64")
        .map(|k| k.vmlinux.parent().unwrap_or(Path::new("/")).to_path_buf())
        .map_err(|e| e.to_string())
}

struct Env {
    _dir: tempfile::TempDir,
    ctx: Ctx,
    driver: QemuDriver,
    machines: Vec<String>,
    kernel: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        for m in &self.machines {
            let _ = self.driver.destroy(&self.ctx, m);
        }
        for base in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"] {
            let _ =
                std::fs::remove_dir(Path::new(base).join(format!("moat-{}", self.ctx.root_tag)));
        }
    }
}

fn setup() -> Option<Env> {
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
    let dir = tempfile::tempdir().expect("tempdir");
    // QEMU runs as moat-qemu: the root must be traversable.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).expect("root");
    let store = ImageStore::open(&root).expect("store");
    store
        .ensure(
            "busybox",
            &moat_core::model::ImageSource::Busybox,
            &NoProgress,
        )
        .expect("busybox image");
    let tag = format!("mv{}", std::process::id() % 100000);
    let ctx = Ctx {
        root: root.clone(),
        run_dir: root.join("run"),
        root_tag: tag.clone(),
    };
    let driver = QemuDriver::new(store, format!("moat-test-{tag}"));
    Some(Env {
        _dir: dir,
        ctx,
        driver,
        machines: vec![],
        kernel,
    })
}

fn spec(env: &mut Env, name: &str, command: &[&str]) -> MachineSpec {
    let mut m = Machine::adhoc(name, "busybox");
    m.kind = MachineType::Microvm;
    m.driver = "qemu".into();
    m.accel = Accel::Tcg;
    m.kernel = Some(env.kernel.display().to_string());
    m.command = Some(command.iter().map(|s| s.to_string()).collect());
    env.machines.push(name.into());
    MachineSpec {
        machine: m,
        nic: None,
        bridge: None,
        spec_hash: "h1".into(),
        hosts: vec![],
    }
}

fn console(env: &Env, name: &str) -> String {
    std::fs::read_to_string(microvm::console_log(&env.ctx, name)).unwrap_or_default()
}

/// The workload's output (the `moat.out` port's file).
fn output(env: &Env, name: &str) -> String {
    std::fs::read_to_string(microvm::output_log(&env.ctx, name)).unwrap_or_default()
}

#[test]
fn microvm_runs_busybox_reports_exit_code_execs_and_stops() {
    let Some(mut env) = setup() else { return };
    let name = format!("mvrun{}", std::process::id() % 100000);
    let s = spec(
        &mut env,
        &name,
        &["sh", "-c", "echo hello from the microvm; exit 7"],
    );
    let t = Instant::now();
    env.driver.create(&env.ctx, &s).expect("create");
    env.driver.start(&env.ctx, &name).expect("start");
    assert!(
        microvm::wait_exit(&env.ctx, &name, Duration::from_secs(90)),
        "the microVM did not end; console:\n{}",
        console(&env, &name)
    );
    eprintln!("run to exit: {:?}", t.elapsed());
    let log = console(&env, &name);
    assert_eq!(
        microvm::exit_code(&env.ctx, &name),
        Some(7),
        "console:\n{log}"
    );
    assert_eq!(output(&env, &name), "hello from the microvm\n");
    assert!(
        !log.contains("hello from the microvm"),
        "the workload's output is kept apart from the console: {log}"
    );

    // A long-running workload: exec into it, then stop it.
    let name2 = format!("mvexec{}", std::process::id() % 100000);
    let s = spec(
        &mut env,
        &name2,
        &[
            "sh",
            "-c",
            "echo ready; trap 'echo bye; exit 0' TERM; while :; do sleep 1; done",
        ],
    );
    env.driver.create(&env.ctx, &s).expect("create");
    env.driver.start(&env.ctx, &name2).expect("start");
    let t = Instant::now();
    while !output(&env, &name2).contains("ready") {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no boot: {}",
            console(&env, &name2)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let obs = env
        .driver
        .observe(&env.ctx, &name2)
        .expect("observe")
        .expect("exists");
    assert_eq!(obs.state, moat_core::observed::MachineState::Running);
    let out = env
        .driver
        .exec(
            &env.ctx,
            &name2,
            &[
                "sh".into(),
                "-c".into(),
                "echo in-guest; cat /proc/1/comm; exit 3".into(),
            ],
        )
        .unwrap_or_else(|e| panic!("exec: {e}; console:\n{}", console(&env, &name2)));
    assert_eq!(out.status, 3);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in-guest\ninit\n");
    let t = Instant::now();
    env.driver
        .stop(&env.ctx, &name2, Duration::from_secs(20))
        .expect("stop");
    eprintln!("stop: {:?}", t.elapsed());
    let log = output(&env, &name2);
    assert!(
        log.contains("bye"),
        "the workload did not get SIGTERM: {log}; console:\n{}",
        console(&env, &name2)
    );
    assert_eq!(microvm::exit_code(&env.ctx, &name2), Some(0));
    let obs = env
        .driver
        .observe(&env.ctx, &name2)
        .expect("observe")
        .expect("exists");
    assert_eq!(obs.state, moat_core::observed::MachineState::Stopped);
}

/// An image imported from an oci-archive runs as a microVM: its entrypoint and
/// cmd with its env and working dir; the output and exit code reach the caller
/// through `microvm::follow` (what `moat run --driver qemu` uses).
#[test]
fn microvm_runs_an_oci_archive_image_entrypoint() {
    let Some(mut env) = setup() else { return };
    let archive = oci::make_oci_archive(env._dir.path());
    let img = env
        .driver
        .images
        .import(
            "ociapp",
            &moat_core::model::ImageSource::OciArchive {
                path: archive.display().to_string(),
            },
            &NoProgress,
        )
        .expect("import the oci-archive");
    assert_eq!(img.config.entrypoint, vec!["/bin/app"]);
    let name = format!("mvoci{}", std::process::id() % 100000);
    let mut s = spec(&mut env, &name, &[]);
    s.machine.image = "ociapp".into();
    s.machine.command = None;
    let t = Instant::now();
    env.driver.create(&env.ctx, &s).expect("create");
    env.driver.start(&env.ctx, &name).expect("start");
    let mut out = Vec::new();
    let code = microvm::follow(&env.ctx, &name, &mut out, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", console(&env, &name)));
    eprintln!("oci-archive microVM run to exit: {:?}", t.elapsed());
    assert_eq!(
        String::from_utf8_lossy(&out),
        oci::OCI_EXPECTED_OUTPUT,
        "console:\n{}",
        console(&env, &name)
    );
    assert_eq!(code, oci::OCI_EXIT_CODE);
    let obs = env
        .driver
        .observe(&env.ctx, &name)
        .expect("observe")
        .expect("exists");
    assert_eq!(obs.state, moat_core::observed::MachineState::Stopped);
}
