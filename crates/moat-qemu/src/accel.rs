//! Accelerator choice (`accel: auto | kvm | tcg`).
//!
//! `auto` means KVM when it works: `/dev/kvm` opens *and* a probe boot of the
//! microVM kernel reaches moat-init (on some hosts KVM exists but guests stop
//! with "KVM internal error"). The probe result is cached per host boot in
//! `<run_dir>/qemu/accel` (`<boot id> <kvm|tcg>`). Otherwise TCG, with a
//! warning on stderr.

use moat_core::model::Accel;
use std::path::Path;
use std::time::{Duration, Instant};

/// The accelerator a machine runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chosen {
    Kvm,
    Tcg,
}

impl Chosen {
    /// QEMU `-accel` value (`tb-size` keeps TCG's code cache, and RSS, small).
    pub fn qemu_arg(self) -> &'static str {
        match self {
            Chosen::Kvm => "kvm",
            Chosen::Tcg => "tcg,tb-size=16",
        }
    }

    /// Extra kernel command line: under TCG the guest's timer calibration
    /// can hang early boot; give it fixed values.
    pub fn cmdline(self) -> &'static str {
        match self {
            Chosen::Kvm => "",
            Chosen::Tcg => "tsc_early_khz=2100000 lpj=8400000",
        }
    }
}

fn kvm_opens() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Pick the accelerator. `probe` boots the kernel under KVM and says whether
/// the guest reached user space; it runs at most once per host boot.
pub fn choose(requested: Accel, run_dir: &Path, probe: impl FnOnce() -> bool) -> Chosen {
    match requested {
        Accel::Kvm => return Chosen::Kvm,
        Accel::Tcg => return Chosen::Tcg,
        Accel::Auto => {}
    }
    if !kvm_opens() {
        eprintln!("warning: /dev/kvm is not usable; microVMs run under TCG (slow)");
        return Chosen::Tcg;
    }
    let cache = run_dir.join("qemu").join("accel");
    let id = boot_id();
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Some((b, a)) = text.trim().split_once(' ') {
            if b == id {
                return if a == "kvm" { Chosen::Kvm } else { Chosen::Tcg };
            }
        }
    }
    let ok = probe();
    let _ = std::fs::create_dir_all(run_dir.join("qemu"));
    let _ = std::fs::write(&cache, format!("{id} {}\n", if ok { "kvm" } else { "tcg" }));
    if ok {
        Chosen::Kvm
    } else {
        eprintln!(
            "warning: KVM guests do not run on this host (probe boot failed); using TCG (slow). \
             Set `accel: tcg` to skip the probe."
        );
        Chosen::Tcg
    }
}

/// Wait until `file` contains `marker` or `timeout` passes.
pub fn wait_marker(file: &Path, marker: &str, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if std::fs::read_to_string(file).is_ok_and(|s| s.contains(marker)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
