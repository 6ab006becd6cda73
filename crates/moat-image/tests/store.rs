//! Privileged tests of the image store: every source kind imported, then read through a mounted
//! machine rootfs (overlayfs); whiteouts; disposable machines; snapshots; clone; gc.
//! They need root (overlay mounts, whiteout devices); they skip with a reason otherwise.
//! Every store lives in its own temp dir; a guard unmounts everything below it, also on panic.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use moat_core::model::ImageSource;
use moat_image::{ImageStore, MachineFs, NoProgress, StderrProgress};
use sha2::{Digest, Sha256};

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A store in a temp dir; on drop, unmounts whatever is mounted below it, then deletes it.
struct TestStore {
    dir: tempfile::TempDir,
    store: ImageStore,
}

impl TestStore {
    fn new() -> Option<TestStore> {
        if !is_root() {
            eprintln!("SKIP: needs root (overlayfs mounts, whiteout devices)");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("moat-image-test-")
            .tempdir()
            .ok()?;
        let store = ImageStore::open(dir.path()).ok()?;
        Some(TestStore { dir, store })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Ok(ms) = moat_host::mount::mounts_under(self.dir.path()) {
            for m in ms {
                let _ = moat_host::mount::unmount(&m, true);
            }
        }
    }
}

fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

/// A tar from (path, Some(content) | None for a directory).
fn make_tar(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, c) in entries {
        match c {
            Some(c) => {
                let h = header(p, tar::EntryType::Regular, c.len() as u64, 0o644);
                b.append(&h, c.as_bytes()).unwrap();
            }
            None => {
                let h = header(p, tar::EntryType::Directory, 0, 0o755);
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn layer1() -> Vec<u8> {
    make_tar(&[
        ("bin/", None),
        ("etc/", None),
        ("etc/keep", Some("kept\n")),
        ("etc/gone", Some("should be whited out\n")),
        ("opq/", None),
        ("opq/old", Some("old\n")),
        ("opq/sub/", None),
        ("opq/sub/deep", Some("deep\n")),
    ])
}

fn layer2() -> Vec<u8> {
    make_tar(&[
        ("etc/.wh.gone", Some("")),
        ("opq/", None),
        ("opq/.wh..wh..opq", Some("")),
        ("opq/new", Some("new\n")),
        ("etc/added", Some("added\n")),
    ])
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/app"],
            "Cmd": ["--serve"],
            "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "Labels": {"org.example": "yes"}
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

/// Write an OCI image layout with the two layers (the second gzip-compressed) into `dir`.
fn make_oci_layout(dir: &Path, tag: &str) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let h = sha(data);
        fs::write(blobs.join(&h), data).unwrap();
        (format!("sha256:{h}"), data.len())
    };
    let (l1, l2) = (layer1(), layer2());
    let diff_ids = vec![
        format!("sha256:{}", sha(&l1)),
        format!("sha256:{}", sha(&l2)),
    ];
    let (d1, s1) = put(&l1);
    let (d2, s2) = put(&gzip(&l2));
    let (dc, sc) = put(&config_json(&diff_ids));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dc, "size": sc},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d1, "size": s1},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d2, "size": s2}
        ]
    }))
    .unwrap();
    let (dm, sm) = put(&manifest);
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": dm, "size": sm,
                "annotations": {"org.opencontainers.image.ref.name": tag}
            }]
        }))
        .unwrap(),
    )
    .unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A docker-archive (what `podman save --format docker-archive` writes) with the two layers.
fn make_docker_archive(path: &Path) {
    let (l1, l2) = (layer1(), layer2());
    let diff_ids = vec![
        format!("sha256:{}", sha(&l1)),
        format!("sha256:{}", sha(&l2)),
    ];
    let cfg = config_json(&diff_ids);
    let cfg_name = format!("{}.json", sha(&cfg));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": cfg_name,
        "RepoTags": ["localhost/moat-test:latest"],
        "Layers": [format!("{}.tar", sha(&l1)), format!("{}.tar", sha(&l2))]
    }]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        (format!("{}.tar", sha(&l1)), &l1),
        (format!("{}.tar", sha(&l2)), &l2),
        (cfg_name.clone(), &cfg),
        ("manifest.json".to_string(), &manifest),
    ] {
        let h = header(&name, tar::EntryType::Regular, data.len() as u64, 0o644);
        b.append(&h, &data[..]).unwrap();
    }
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

/// Mount a fresh machine of `image`, check the whiteout-layer content, unmount, destroy.
fn check_whiteout_image(ts: &TestStore, image: &str, machine: &str) {
    let img = ts.store.get(image).unwrap().expect("image imported");
    assert_eq!(img.layers.len(), 2, "two layers");
    assert_eq!(img.config.entrypoint, vec!["/bin/app"]);
    assert_eq!(img.config.cmd, vec!["--serve"]);
    assert!(img.config.env.contains(&"GREETING=hello".to_string()));
    assert_eq!(img.config.workdir.as_deref(), Some("/srv"));
    assert_eq!(img.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(
        img.config.labels.get("org.example").map(String::as_str),
        Some("yes")
    );
    let m = MachineFs::create(&ts.store, machine, &img, false).unwrap();
    let root = m.mount().unwrap();
    assert_eq!(fs::read_to_string(root.join("etc/keep")).unwrap(), "kept\n");
    assert_eq!(
        fs::read_to_string(root.join("etc/added")).unwrap(),
        "added\n"
    );
    assert!(!root.join("etc/gone").exists(), "whited-out file is gone");
    assert!(
        !root.join("opq/old").exists(),
        "opaque dir hides older content"
    );
    assert!(
        !root.join("opq/sub").exists(),
        "opaque dir hides older subdirs"
    );
    assert_eq!(fs::read_to_string(root.join("opq/new")).unwrap(), "new\n");
    m.unmount().unwrap();
    assert!(!m.is_mounted().unwrap());
    m.destroy().unwrap();
}

#[test]
fn busybox_image_runs_through_a_mounted_rootfs() {
    let Some(ts) = TestStore::new() else { return };
    if !Path::new("/bin/busybox").exists() {
        eprintln!("SKIP: /bin/busybox missing (apt-get install busybox-static)");
        return;
    }
    let img = ts
        .store
        .ensure("busybox", &ImageSource::Busybox, &StderrProgress)
        .unwrap();
    // ensure is idempotent: same image, no rebuild.
    let again = ts
        .store
        .ensure("busybox", &ImageSource::Busybox, &NoProgress)
        .unwrap();
    assert_eq!(img, again);
    assert_eq!(img.config.init.as_deref(), Some("/sbin/init"));
    let m = MachineFs::create(&ts.store, "bb", &img, false).unwrap();
    let root = m.mount().unwrap();
    assert!(fs::read_to_string(root.join("etc/os-release"))
        .unwrap()
        .contains("BusyBox"));
    assert!(fs::read_to_string(root.join("etc/passwd"))
        .unwrap()
        .starts_with("root:"));
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        fs::read_link(root.join("sbin/init")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert!(fs::read_to_string(root.join("etc/inittab"))
        .unwrap()
        .contains("::sysinit:"));
    // The busybox in the rootfs runs (chroot through the mounted overlay).
    let out = Command::new("chroot")
        .arg(&root)
        .args(["/bin/sh", "-c", "echo hi from $(basename $0)"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi from sh");
    // Changes persist across unmount/mount for a normal machine.
    fs::write(root.join("root/note"), "kept").unwrap();
    m.unmount().unwrap();
    let root = m.mount().unwrap();
    assert_eq!(fs::read_to_string(root.join("root/note")).unwrap(), "kept");
    m.destroy().unwrap();
    assert!(!ts.path().join("machines/bb").exists());
}

#[test]
fn tarball_and_folder_sources() {
    let Some(ts) = TestStore::new() else { return };
    let tgz = ts.path().join("rootfs.tar.gz");
    fs::write(
        &tgz,
        gzip(&make_tar(&[
            ("etc/", None),
            ("etc/hello", Some("from tarball\n")),
        ])),
    )
    .unwrap();
    let src = ImageSource::Tarball {
        path: tgz.display().to_string(),
    };
    let img = ts.store.import("tar", &src, &NoProgress).unwrap();
    let m = MachineFs::create(&ts.store, "t1", &img, false).unwrap();
    assert_eq!(
        fs::read_to_string(m.mount().unwrap().join("etc/hello")).unwrap(),
        "from tarball\n"
    );
    m.destroy().unwrap();

    // xz and zstd are detected by magic too.
    let raw = make_tar(&[("z", Some("zstd\n"))]);
    let zst = ts.path().join("rootfs.tar.zst");
    fs::write(&zst, zstd::encode_all(&raw[..], 3).unwrap()).unwrap();
    let img = ts
        .store
        .import(
            "zst",
            &ImageSource::Tarball {
                path: zst.display().to_string(),
            },
            &NoProgress,
        )
        .unwrap();
    let m = MachineFs::create(&ts.store, "t2", &img, false).unwrap();
    assert_eq!(
        fs::read_to_string(m.mount().unwrap().join("z")).unwrap(),
        "zstd\n"
    );
    m.destroy().unwrap();
    let xz = ts.path().join("rootfs.tar.xz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && mkdir -p xzsrc && echo xz > xzsrc/x && tar -C xzsrc -cJf {} .",
            ts.path().display(),
            xz.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let img = ts
        .store
        .import(
            "xz",
            &ImageSource::Tarball {
                path: xz.display().to_string(),
            },
            &NoProgress,
        )
        .unwrap();
    let m = MachineFs::create(&ts.store, "t3", &img, false).unwrap();
    assert_eq!(
        fs::read_to_string(m.mount().unwrap().join("x")).unwrap(),
        "xz\n"
    );
    m.destroy().unwrap();

    let folder = ts.path().join("srcdir");
    fs::create_dir_all(folder.join("etc")).unwrap();
    fs::write(folder.join("etc/hello"), "from folder\n").unwrap();
    let img = ts
        .store
        .import(
            "folder",
            &ImageSource::Folder {
                path: folder.display().to_string(),
            },
            &NoProgress,
        )
        .unwrap();
    let m = MachineFs::create(&ts.store, "f1", &img, false).unwrap();
    assert_eq!(
        fs::read_to_string(m.mount().unwrap().join("etc/hello")).unwrap(),
        "from folder\n"
    );
    m.destroy().unwrap();
}

#[test]
fn oci_layout_and_archives_apply_whiteouts_and_keep_config() {
    let Some(ts) = TestStore::new() else { return };
    let layout = ts.path().join("layout");
    make_oci_layout(&layout, "v1");
    ts.store
        .import(
            "layout",
            &ImageSource::OciLayout {
                path: layout.display().to_string(),
            },
            &StderrProgress,
        )
        .unwrap();
    check_whiteout_image(&ts, "layout", "oci1");

    // The same layout in a tar: an oci-archive. Its layers are already in the store.
    let archive = ts.path().join("image.oci.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let before = ts.store.layers().unwrap().len();
    ts.store
        .import(
            "archive",
            &ImageSource::OciArchive {
                path: archive.display().to_string(),
            },
            &NoProgress,
        )
        .unwrap();
    assert_eq!(
        ts.store.layers().unwrap().len(),
        before,
        "shared layers stored once"
    );
    check_whiteout_image(&ts, "archive", "oci2");

    // A docker-archive imported into an empty store.
    let ts2 = TestStore::new().unwrap();
    let da = ts2.path().join("image.docker.tar");
    make_docker_archive(&da);
    ts2.store
        .import(
            "docker",
            &ImageSource::DockerArchive {
                path: da.display().to_string(),
            },
            &NoProgress,
        )
        .unwrap();
    check_whiteout_image(&ts2, "docker", "dock1");
}

#[test]
fn podman_saved_docker_archive_imports() {
    let Some(ts) = TestStore::new() else { return };
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("SKIP: podman not installed");
        return;
    }
    // podman import + save works offline; the image gets a unique name and is removed after.
    let name = format!("localhost/moat-image-test-{}", std::process::id());
    let tarball = ts.path().join("root.tar");
    fs::write(
        &tarball,
        make_tar(&[("etc/", None), ("etc/podman", Some("saved by podman\n"))]),
    )
    .unwrap();
    struct Rmi(String);
    impl Drop for Rmi {
        fn drop(&mut self) {
            let _ = Command::new("podman").args(["rmi", "-f", &self.0]).output();
        }
    }
    let imp = Command::new("podman")
        .args(["import", "--change", "CMD [\"/bin/true\"]"])
        .arg(&tarball)
        .arg(&name)
        .output()
        .unwrap();
    if !imp.status.success() {
        eprintln!(
            "SKIP: podman import failed: {}",
            String::from_utf8_lossy(&imp.stderr)
        );
        return;
    }
    let _rmi = Rmi(name.clone());
    let da = ts.path().join("podman.tar");
    let save = Command::new("podman")
        .args(["save", "--format", "docker-archive", "-o"])
        .arg(&da)
        .arg(&name)
        .output()
        .unwrap();
    assert!(
        save.status.success(),
        "podman save: {}",
        String::from_utf8_lossy(&save.stderr)
    );
    let img = ts
        .store
        .import(
            "podman",
            &ImageSource::DockerArchive {
                path: da.display().to_string(),
            },
            &NoProgress,
        )
        .unwrap();
    assert_eq!(img.config.cmd, vec!["/bin/true"]);
    let m = MachineFs::create(&ts.store, "pod1", &img, false).unwrap();
    assert_eq!(
        fs::read_to_string(m.mount().unwrap().join("etc/podman")).unwrap(),
        "saved by podman\n"
    );
    m.destroy().unwrap();
}

fn small_image(ts: &TestStore, name: &str) -> moat_image::Image {
    let dir = ts.path().join(format!("src-{name}"));
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/base"), name).unwrap();
    ts.store
        .import(
            name,
            &ImageSource::Folder {
                path: dir.display().to_string(),
            },
            &NoProgress,
        )
        .unwrap()
}

#[test]
fn disposable_machine_forgets_its_changes() {
    let Some(ts) = TestStore::new() else { return };
    let img = small_image(&ts, "disp");
    let m = MachineFs::create(&ts.store, "d1", &img, true).unwrap();
    let root = m.mount().unwrap();
    fs::write(root.join("scratch"), "temporary").unwrap();
    assert!(root.join("etc/base").exists());
    m.unmount().unwrap();
    assert!(
        fs::read_dir(m.upper()).unwrap().next().is_none(),
        "upper emptied at stop"
    );
    let root = m.mount().unwrap();
    assert!(!root.join("scratch").exists(), "changes gone after stop");
    assert_eq!(fs::read_to_string(root.join("etc/base")).unwrap(), "disp");
    m.destroy().unwrap();
}

#[test]
fn snapshot_restore_and_clone_through_mounts() {
    let Some(ts) = TestStore::new() else { return };
    let img = small_image(&ts, "snap");
    let mut m = MachineFs::create(&ts.store, "s1", &img, false).unwrap();
    let root = m.mount().unwrap();
    fs::write(root.join("v"), "1").unwrap();
    m.unmount().unwrap();
    m.snapshot_create("one").unwrap();
    let root = m.mount().unwrap();
    assert_eq!(fs::read_to_string(root.join("v")).unwrap(), "1");
    fs::write(root.join("v"), "2").unwrap();
    fs::remove_file(root.join("etc/base")).unwrap();
    // A snapshot of a mounted machine copies its writable layer.
    m.snapshot_create("two-live").unwrap();
    m.unmount().unwrap();
    m.snapshot_restore("one").unwrap();
    let root = m.mount().unwrap();
    assert_eq!(
        fs::read_to_string(root.join("v")).unwrap(),
        "1",
        "old content back"
    );
    assert!(root.join("etc/base").exists());
    m.unmount().unwrap();
    m.snapshot_restore("two-live").unwrap();
    let root = m.mount().unwrap();
    assert_eq!(fs::read_to_string(root.join("v")).unwrap(), "2");
    assert!(
        !root.join("etc/base").exists(),
        "deletion kept via whiteout in frozen layer"
    );
    // Clone needs the source stopped.
    assert!(matches!(
        m.clone_to("s2"),
        Err(moat_image::ImageError::MachineMounted { .. })
    ));
    m.unmount().unwrap();
    let c = m.clone_to("s2").unwrap();
    let (ra, rb) = (m.mount().unwrap(), c.mount().unwrap());
    assert_eq!(fs::read_to_string(rb.join("v")).unwrap(), "2");
    fs::write(rb.join("only-clone"), "x").unwrap();
    assert!(!ra.join("only-clone").exists(), "clone is independent");
    m.unmount().unwrap();
    c.destroy().unwrap();
    m.destroy().unwrap();
    let r = ts.store.gc().unwrap();
    assert!(!r.removed_layers.is_empty());
    assert_eq!(
        ts.store.layers().unwrap().len(),
        img.layers.len(),
        "only the image's layers remain"
    );
}

#[test]
fn gc_removes_only_unreferenced_layers() {
    let Some(ts) = TestStore::new() else { return };
    let layout = ts.path().join("layout");
    make_oci_layout(&layout, "v1");
    let a = ts
        .store
        .import(
            "a",
            &ImageSource::OciLayout {
                path: layout.display().to_string(),
            },
            &NoProgress,
        )
        .unwrap();
    let b = small_image(&ts, "b");
    let m = MachineFs::create(&ts.store, "uses-b", &b, false).unwrap();
    ts.store.remove("b").unwrap();
    assert!(
        ts.store.gc().unwrap().removed_layers.is_empty(),
        "machine keeps b's layer"
    );
    ts.store.remove("a").unwrap();
    let r = ts.store.gc().unwrap();
    let removed: std::collections::BTreeSet<_> = r.removed_layers.into_iter().collect();
    assert_eq!(removed, a.layers.iter().cloned().collect());
    assert!(ts.store.has_layer(&b.layers[0]));
    m.destroy().unwrap();
    assert_eq!(ts.store.gc().unwrap().removed_layers, b.layers);
    assert!(fs::read_dir(ts.store.dir().join("layers"))
        .unwrap()
        .next()
        .is_none());
}

/// Debian's docker-registry on a loopback port, with its storage in a temp dir; killed on drop.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_registry() -> Option<Registry> {
    let bin = ["/usr/bin/docker-registry"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let dir = tempfile::tempdir().ok()?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = dir.path().join("config.yml");
    fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        ),
    )
    .ok()?;
    let child = Command::new(bin)
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let reg = Registry {
        child,
        addr: addr.clone(),
        _dir: dir,
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Some(reg);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

#[test]
fn pull_from_a_loopback_registry() {
    let Some(ts) = TestStore::new() else { return };
    if Command::new("skopeo").arg("--version").output().is_err() {
        eprintln!("SKIP: skopeo not installed (apt-get install skopeo)");
        return;
    }
    let Some(reg) = start_registry() else {
        eprintln!("SKIP: docker-registry not installed or did not start (apt-get install docker-registry)");
        return;
    };
    let layout = ts.path().join("layout");
    make_oci_layout(&layout, "v1");
    let push = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/moat/test:v1", reg.addr))
        .output()
        .unwrap();
    assert!(
        push.status.success(),
        "skopeo push: {}",
        String::from_utf8_lossy(&push.stderr)
    );
    let reference = format!("{}/moat/test:v1", reg.addr);
    let img = ts
        .store
        .ensure(
            &format!("oci:{reference}"),
            &ImageSource::Oci {
                reference: reference.clone(),
            },
            &StderrProgress,
        )
        .unwrap();
    assert!(img.source.contains("sha256:"));
    check_whiteout_image(&ts, &format!("oci:{reference}"), "pulled");
    // An unknown tag is a clear error.
    let bad = format!("{}/moat/test:nope", reg.addr);
    let e = ts
        .store
        .build("x", &ImageSource::Oci { reference: bad }, &NoProgress)
        .unwrap_err();
    assert!(e.to_string().contains("pull of"), "{e}");
}

#[test]
#[ignore = "network-bound: mmdebstrap downloads ~100 MB (about 1 min or more); run with --ignored"]
fn debian_bookworm_with_mmdebstrap() {
    let Some(ts) = TestStore::new() else { return };
    let img = ts
        .store
        .build(
            "debian/bookworm",
            &ImageSource::Debian {
                suite: "bookworm".into(),
                packages: vec![],
            },
            &StderrProgress,
        )
        .unwrap();
    let m = MachineFs::create(&ts.store, "deb", &img, false).unwrap();
    let root = m.mount().unwrap();
    assert!(fs::read_to_string(root.join("etc/os-release"))
        .unwrap()
        .contains("bookworm"));
    assert!(
        root.join("lib/systemd/systemd").exists() || root.join("usr/lib/systemd/systemd").exists()
    );
    m.destroy().unwrap();
}

#[test]
fn ubuntu_without_a_configured_source_fails_clearly() {
    let has_ubuntu = ["/etc/apt/sources.list", "/etc/apt/sources.list.d"]
        .iter()
        .any(|p| {
            Command::new("grep")
                .args(["-rqs", "/ubuntu"])
                .arg(p)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
    if has_ubuntu {
        eprintln!("SKIP: this host has an ubuntu apt source");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let s = ImageStore::open(d.path()).unwrap();
    let e = s
        .build(
            "ubuntu/noble",
            &ImageSource::Ubuntu {
                suite: "noble".into(),
                packages: vec![],
            },
            &NoProgress,
        )
        .unwrap_err();
    assert!(
        matches!(e, moat_image::ImageError::NoAptSource { .. }),
        "{e}"
    );
}

#[test]
fn a_deep_stack_of_snapshots_still_mounts() {
    let Some(ts) = TestStore::new() else { return };
    let img = small_image(&ts, "deep");
    let mut m = MachineFs::create(&ts.store, "deep1", &img, false).unwrap();
    // Each snapshot of a stopped machine adds a layer; 80 full layer paths would not fit in the
    // one-page mount options, the short links do.
    for i in 0..80 {
        let root = m.mount().unwrap();
        fs::write(root.join(format!("f{i}")), format!("{i}")).unwrap();
        m.unmount().unwrap();
        m.snapshot_create(&format!("s{i}")).unwrap();
    }
    assert_eq!(m.state().layers.len(), 81);
    let root = m.mount().unwrap();
    assert_eq!(fs::read_to_string(root.join("f0")).unwrap(), "0");
    assert_eq!(fs::read_to_string(root.join("f79")).unwrap(), "79");
    m.unmount().unwrap();
    m.destroy().unwrap();
}

#[test]
fn layers_cannot_forge_overlay_xattrs() {
    let Some(ts) = TestStore::new() else { return };
    let dir = ts.path().join("layout");
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let l1 = make_tar(&[("d/", None), ("d/lower", Some("visible\n"))]);
    // Layer 2 claims d/ is opaque through a PAX xattr instead of a whiteout, and sets a user xattr.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
        ("SCHILY.xattr.user.moat", &b"kept"[..]),
    ])
    .unwrap();
    b.append(&header("d/", tar::EntryType::Directory, 0, 0o755), &[][..])
        .unwrap();
    let l2 = b.into_inner().unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let h = sha(data);
        fs::write(blobs.join(&h), data).unwrap();
        (format!("sha256:{h}"), data.len())
    };
    let diff_ids = vec![
        format!("sha256:{}", sha(&l1)),
        format!("sha256:{}", sha(&l2)),
    ];
    let (d1, s1) = put(&l1);
    let (d2, s2) = put(&l2);
    let (dc, sc) = put(&config_json(&diff_ids));
    let (dm, sm) = put(
        &serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dc, "size": sc},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d1, "size": s1},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d2, "size": s2}
            ]
        }))
        .unwrap(),
    );
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": dm, "size": sm}
        ]}))
        .unwrap(),
    )
    .unwrap();
    let img = ts
        .store
        .import(
            "forge",
            &ImageSource::OciLayout {
                path: dir.display().to_string(),
            },
            &NoProgress,
        )
        .unwrap();
    let m = MachineFs::create(&ts.store, "forge1", &img, false).unwrap();
    let root = m.mount().unwrap();
    assert!(
        root.join("d/lower").exists(),
        "forged opaque xattr was dropped"
    );
    if let Ok(out) = Command::new("getfattr")
        .args(["--only-values", "-n", "user.moat"])
        .arg(ts.store.layer_path(&img.layers[1]).join("d"))
        .output()
    {
        if out.status.success() {
            assert_eq!(out.stdout, b"kept");
        }
    }
    m.destroy().unwrap();
}
