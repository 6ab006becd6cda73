//! The btrfs backend on a loop-mounted btrfs file system made for the test (root, mkfs.btrfs and
//! a loop device needed; skipped otherwise). The loop file, mount and subvolumes are removed on
//! drop, also when the test fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use moat_core::model::ImageSource;
use moat_image::{Backend, ImageStore, MachineFs, NoProgress};

struct LoopBtrfs {
    file: PathBuf,
    mnt: tempfile::TempDir,
}

impl LoopBtrfs {
    fn new() -> Option<LoopBtrfs> {
        let uid = fs::read_to_string("/proc/self/status").ok()?;
        if !uid
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        {
            eprintln!("SKIP: needs root (loop mount)");
            return None;
        }
        if Command::new("mkfs.btrfs")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIP: mkfs.btrfs missing (apt-get install btrfs-progs)");
            return None;
        }
        let file = PathBuf::from(format!(
            "/var/tmp/moat-image-btrfs-{}.img",
            std::process::id()
        ));
        let mnt = tempfile::Builder::new()
            .prefix("moat-image-btrfs-")
            .tempdir()
            .ok()?;
        let lb = LoopBtrfs { file, mnt };
        let f = fs::File::create(&lb.file).ok()?;
        f.set_len(1 << 30).ok()?;
        let mk = Command::new("mkfs.btrfs")
            .arg("-q")
            .arg(&lb.file)
            .output()
            .ok()?;
        if !mk.status.success() {
            eprintln!(
                "SKIP: mkfs.btrfs failed: {}",
                String::from_utf8_lossy(&mk.stderr)
            );
            return None;
        }
        let m = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&lb.file)
            .arg(lb.mnt.path())
            .output()
            .ok()?;
        if !m.status.success() {
            eprintln!(
                "SKIP: loop mount failed: {}",
                String::from_utf8_lossy(&m.stderr)
            );
            return None;
        }
        Some(lb)
    }
    fn path(&self) -> &Path {
        self.mnt.path()
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        if let Ok(ms) = moat_host::mount::mounts_under(self.mnt.path()) {
            for m in ms {
                let _ = moat_host::mount::unmount(&m, true);
            }
        }
        let _ = fs::remove_file(&self.file);
    }
}

#[test]
fn btrfs_backend_clone_snapshot_disposable() {
    let Some(lb) = LoopBtrfs::new() else { return };
    std::env::remove_var("MOAT_STORAGE");
    let store = ImageStore::open(lb.path()).unwrap();
    let src = lb.path().join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/base"), "base").unwrap();
    let img = store
        .import(
            "small",
            &ImageSource::Folder {
                path: src.display().to_string(),
            },
            &NoProgress,
        )
        .unwrap();
    let mut m = MachineFs::create(&store, "b1", &img, false).unwrap();
    assert_eq!(m.state().backend, Backend::Btrfs);
    let root = m.mount().unwrap();
    assert_eq!(fs::read_to_string(root.join("etc/base")).unwrap(), "base");
    fs::write(root.join("v"), "1").unwrap();
    m.snapshot_create("one").unwrap();
    fs::write(root.join("v"), "2").unwrap();
    m.unmount().unwrap();
    let c = m.clone_to("b2").unwrap();
    assert_eq!(
        fs::read_to_string(c.mount().unwrap().join("v")).unwrap(),
        "2"
    );
    fs::write(c.rootfs().join("only-clone"), "x").unwrap();
    assert!(!m.rootfs().join("only-clone").exists());
    m.snapshot_restore("one").unwrap();
    assert_eq!(
        fs::read_to_string(m.mount().unwrap().join("v")).unwrap(),
        "1"
    );
    m.unmount().unwrap();
    m.snapshot_remove("one").unwrap();

    let d = MachineFs::create(&store, "b3", &img, true).unwrap();
    let root = d.mount().unwrap();
    fs::write(root.join("scratch"), "x").unwrap();
    d.unmount().unwrap();
    assert!(!d.mount().unwrap().join("scratch").exists());
    d.destroy().unwrap();
    c.destroy().unwrap();
    m.destroy().unwrap();
    store.remove("small").unwrap();
    store.gc().unwrap();
    assert!(
        fs::read_dir(store.dir().join("btrfs"))
            .unwrap()
            .next()
            .is_none(),
        "base subvolume removed"
    );
    assert!(store.layers().unwrap().is_empty());
}
