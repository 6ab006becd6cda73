//! Measures `MachineFs::clone_to` for a 1 MiB and a 1 GiB image (and a 1 GiB writable layer),
//! side by side in one run. Used by bench/image/clone.sh. Needs no root (clone does not mount).
//!
//! Usage: clone_bench [ITERATIONS] [STORE_PARENT_DIR]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use moat_core::model::ImageSource;
use moat_image::{ImageStore, MachineFs, NoProgress};

const MIB: usize = 1 << 20;

fn write_file(path: &Path, mib: usize) {
    let mut f = fs::File::create(path).expect("create");
    // Non-zero data so nothing can treat it as sparse.
    let buf = vec![0x5au8; MIB];
    for _ in 0..mib {
        f.write_all(&buf).expect("write");
    }
    f.sync_all().expect("sync");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(7);
    let parent = args.get(2).cloned().unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("moat-clone-bench-")
        .tempdir_in(&parent)
        .expect("tempdir");
    let store = ImageStore::open(dir.path()).expect("open store");
    let mut images = Vec::new();
    for (name, mib) in [("img-1mib", 1usize), ("img-1gib", 1024)] {
        let src = dir.path().join(format!("src-{name}"));
        fs::create_dir_all(&src).expect("mkdir");
        write_file(&src.join("data"), mib);
        let img = store
            .import(
                name,
                &ImageSource::Folder {
                    path: src.display().to_string(),
                },
                &NoProgress,
            )
            .expect("import");
        fs::remove_dir_all(&src).expect("cleanup");
        images.push((name, img));
    }
    let mut results = Vec::new();
    for (label, img_idx, upper_mib, n) in [
        ("1 MiB image, 1 MiB upper", 0usize, 1usize, iters),
        ("1 GiB image, 1 MiB upper", 1, 1, iters),
        ("1 GiB image, 1 GiB upper", 1, 1024, iters.min(3)),
    ] {
        let img = &images[img_idx].1;
        let mut times = Vec::new();
        for i in 0..n {
            let src = format!("src-{img_idx}-{upper_mib}-{i}");
            let mut m = MachineFs::create(&store, &src, img, false).expect("create");
            write_file(&m.upper().join("changes"), upper_mib);
            let t = Instant::now();
            let c = m.clone_to(&format!("{src}-clone")).expect("clone");
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            c.destroy().expect("destroy clone");
            m.destroy().expect("destroy");
        }
        let med = median(times);
        println!("{label:<28} median {med:8.3} ms over {n} runs");
        results.push(med);
    }
    store.gc().expect("gc");
    let ratio = results[1] / results[0];
    let ratio_upper = results[2] / results[0];
    println!("ratio 1 GiB / 1 MiB image: {ratio:.2}");
    println!("ratio 1 GiB upper / 1 MiB: {ratio_upper:.2}");
    println!(
        "RESULT {:.3} {:.3} {:.3} {ratio:.3} {ratio_upper:.3}",
        results[0], results[1], results[2]
    );
}
