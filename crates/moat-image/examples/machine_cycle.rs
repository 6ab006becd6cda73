//! Times one disposable machine's rootfs life cycle (create, mount, unmount, destroy) on a busybox
//! image: the image store's share of `moat run --rm busybox -- true`. Needs root (mounts).
//!
//! Usage: machine_cycle [ITERATIONS] [STORE_PARENT_DIR]

use std::time::Instant;

use moat_core::model::ImageSource;
use moat_image::{ImageStore, MachineFs, NoProgress};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    let parent = args.get(2).cloned().unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("moat-cycle-bench-")
        .tempdir_in(&parent)
        .expect("tempdir");
    let store = ImageStore::open(dir.path()).expect("open store");
    let img = store
        .ensure("busybox", &ImageSource::Busybox, &NoProgress)
        .expect("busybox image");
    let mut phases = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for i in 0..iters {
        let t0 = Instant::now();
        let m = MachineFs::create(&store, &format!("c{i}"), &img, true).expect("create");
        let t1 = Instant::now();
        m.mount().expect("mount");
        let t2 = Instant::now();
        m.unmount().expect("unmount");
        let t3 = Instant::now();
        m.destroy().expect("destroy");
        let t4 = Instant::now();
        for (k, (a, b)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t0, t4)]
            .into_iter()
            .enumerate()
        {
            phases[k].push((b - a).as_secs_f64() * 1000.0);
        }
    }
    for (name, mut v) in ["create", "mount", "unmount", "destroy", "total"]
        .into_iter()
        .zip(phases)
    {
        v.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{name:<8} median {:7.3} ms  (p90 {:7.3} ms, {iters} runs)",
            v[v.len() / 2],
            v[v.len() * 9 / 10]
        );
    }
}
