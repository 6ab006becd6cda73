//! Start-to-exec latency of one busybox machine under the nspawn driver and
//! the native driver, side by side (bench/nspawn/run.sh runs this).
//! Each round: `start` → `exec /bin/true` (the machine answers) → `stop`.
//! Prints one line per driver: median and p90 in ms, then the ratio.
//! Usage: nspawn_start_exec ROUNDS (root; MOAT_SUPERVISOR set).

use moat_core::model::{Machine, NetworkMode, TrustLevel};
use moat_driver::native::{FolderRootfs, NativeDriver};
use moat_driver::nspawn::NspawnDriver;
use moat_driver::{Ctx, Driver, MachineSpec};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn busybox(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
    std::fs::create_dir_all(dir.join("usr/lib")).expect("mkdir");
    std::fs::create_dir_all(dir.join("etc")).expect("mkdir");
    std::fs::write(dir.join("usr/lib/os-release"), "ID=busybox\n").expect("os-release");
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox");
    moat_host::busybox::link_applets(Path::new("/bin/busybox"), dir, Some("bin"))
        .expect("busybox applets");
}

fn measure(d: &dyn Driver, ctx: &Ctx, name: &str, rounds: usize) -> Vec<f64> {
    let m = Machine {
        network: NetworkMode::None,
        trust: TrustLevel::Trusted,
        command: Some(vec!["/bin/sleep".into(), "1000".into()]),
        ..Machine::adhoc(name, "busybox")
    };
    let spec = MachineSpec {
        spec_hash: "b".into(),
        machine: m,
        nic: None,
        bridge: None,
        hosts: vec![],
    };
    d.create(ctx, &spec).expect("create");
    let mut v = Vec::new();
    // Round 0 is a warm-up (and the one-time ownership shift).
    for i in 0..=rounds {
        let t = Instant::now();
        d.start(ctx, name).expect("start");
        let out = d.exec(ctx, name, &["/bin/true".into()]).expect("exec");
        assert_eq!(out.status, 0, "exec failed: {out:?}");
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if i > 0 {
            v.push(ms);
        }
        d.stop(ctx, name, Duration::from_millis(200)).expect("stop");
    }
    d.destroy(ctx, name).expect("destroy");
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::Builder::new()
        .prefix("moat-bench-nspawn-")
        .tempdir()
        .expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let base = tmp.path().join("rootfs");
    let (nat, nsp) = (
        format!("b-nat{}", std::process::id()),
        format!("b-nsp{}", std::process::id()),
    );
    for n in [&nat, &nsp] {
        busybox(&base.join(n));
    }
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ctx = Ctx {
        root: tmp.path().join("root"),
        run_dir: tmp.path().join("run"),
        root_tag: format!("b{}", std::process::id()),
    };
    let rootfs = Arc::new(FolderRootfs {
        base,
        system: false,
    });
    let native = NativeDriver::new(rootfs.clone());
    let nspawn = NspawnDriver::new(rootfs).with_moat_supervision();
    let a = measure(&native, &ctx, &nat, rounds);
    let b = measure(&nspawn, &ctx, &nsp, rounds);
    let med = |v: &[f64]| v[v.len() / 2];
    let p90 = |v: &[f64]| v[(v.len() * 9 / 10).min(v.len() - 1)];
    println!(
        "{:8} {:>11} {:>9} {:>7}",
        "driver", "median ms", "p90 ms", "rounds"
    );
    println!(
        "{:8} {:11.1} {:9.1} {:7}",
        "native",
        med(&a),
        p90(&a),
        a.len()
    );
    println!(
        "{:8} {:11.1} {:9.1} {:7}",
        "nspawn",
        med(&b),
        p90(&b),
        b.len()
    );
    println!("nspawn / native (median): {:.2}", med(&b) / med(&a));
}
