//! Clone time of a stopped full VM against its disk size (bench/vm/clone.sh).
//!
//! For each base disk (10 MiB, 10 GiB sparse, 10 GiB with DATA_MIB written into
//! the source's overlay), creates a VM and clones it ITER times through
//! `moat_qemu::vm::clone_vm`, and copies the source's disk chain with
//! `qemu-img convert` once (the alternative: a full copy). Prints medians and
//! a `RESULT` line: small big big_data ratio_big ratio_data copy_ms.

use moat_core::model::{Machine, MachineType};
use moat_driver::{Ctx, Driver, MachineSpec};
use moat_qemu::{disk, vm, QemuDriver};
use std::process::Command;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iter: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(7);
    let parent = args.get(2).cloned().unwrap_or_else(|| "/var/tmp".into());
    let data_mib: u64 = std::env::var("DATA_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let dir = tempfile::Builder::new()
        .prefix("moat-vmclone-")
        .tempdir_in(&parent)
        .expect("temp dir");
    let root = dir.path().to_path_buf();
    let rs = root.to_string_lossy().into_owned();
    let ctx = Ctx {
        root: root.clone(),
        run_dir: root.join("run"),
        root_tag: moat_core::naming::root_tag(&rs),
    };
    let d = QemuDriver::new(
        moat_image::ImageStore::open(&root).expect("store"),
        moat_core::naming::if_alias(&rs),
    );
    let mut medians = vec![];
    let mut copy_ms = 0.0;
    for (label, size, data) in [
        ("10MiB", 10u64 << 20, false),
        ("10GiB", 10u64 << 30, false),
        ("10GiB+data", 10u64 << 30, true),
    ] {
        let image = label.replace('+', "-");
        let base = disk::base_path(&root, &image);
        std::fs::create_dir_all(base.parent().unwrap()).unwrap();
        disk::create_blank(&base, size).unwrap();
        let src = format!("src-{image}").to_lowercase();
        let mut m = Machine::adhoc(&src, &image);
        m.kind = MachineType::Vm;
        m.driver = "qemu".into();
        d.create(
            &ctx,
            &MachineSpec {
                spec_hash: "bench".into(),
                machine: m,
                nic: None,
                bridge: None,
                hosts: vec![],
            },
        )
        .unwrap();
        let src_disk = vm::paths(&ctx, &src).disk;
        if data {
            let st = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", &format!("write -P 0x5a 0 {data_mib}M")])
                .arg(&src_disk)
                .output()
                .unwrap();
            assert!(st.status.success());
            let t = Instant::now();
            let out = root.join("copy.qcow2");
            let st = Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(&src_disk)
                .arg(&out)
                .status()
                .unwrap();
            assert!(st.success());
            copy_ms = t.elapsed().as_secs_f64() * 1000.0;
            let _ = std::fs::remove_file(out);
        }
        let mut times = vec![];
        for i in 0..iter {
            let new = format!("{src}-c{i}");
            let t = Instant::now();
            vm::clone_vm(&ctx, &src, &new).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let med = median(times.clone());
        println!(
            "clone of {label:<11} disk: median {med:7.2} ms (min {:.2}, max {:.2}, n={iter})",
            times.iter().cloned().fold(f64::MAX, f64::min),
            times.iter().cloned().fold(0.0, f64::max)
        );
        medians.push(med);
    }
    println!("full copy (qemu-img convert) of the 10GiB disk with {data_mib} MiB written: {copy_ms:.0} ms");
    for m in d.list(&ctx).unwrap() {
        let _ = d.destroy(&ctx, &m.full_name);
    }
    println!(
        "RESULT {:.3} {:.3} {:.3} {:.3} {:.3} {:.1}",
        medians[0],
        medians[1],
        medians[2],
        medians[1] / medians[0],
        medians[2] / medians[0],
        copy_ms
    );
}
