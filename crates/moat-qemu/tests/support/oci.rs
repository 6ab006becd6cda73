//! An `oci-archive` image made offline from the host's busybox, the way
//! `skopeo copy ... oci-archive:` or `podman save --format oci-archive` lay it
//! out: `oci-layout`, `index.json` → manifest → config + one layer blob.
//! Its config has an entrypoint, cmd, env and working dir, which a microVM of it
//! must honour. Shared by the qemu driver's and the CLI's microVM tests.

use std::path::Path;
use std::process::Command;

/// What the image's entrypoint prints (with the default cmd) and its exit code.
pub const OCI_EXPECTED_OUTPUT: &str =
    "oci args: first second\noci greeting: hello from an oci archive\noci pwd: /srv/app\n";
pub const OCI_EXIT_CODE: i32 = 5;

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

/// Writes the blob at `path` into the layout's blob folder; its descriptor fields.
fn put(layout: &Path, path: &Path) -> (String, u64) {
    let h = sha256(path);
    let dst = layout.join("blobs/sha256").join(&h);
    std::fs::copy(path, &dst).expect("blob");
    (
        format!("sha256:{h}"),
        std::fs::metadata(&dst).expect("blob").len(),
    )
}

/// Builds `<work>/image.oci.tar` and returns its path.
pub fn make_oci_archive(work: &Path) -> std::path::PathBuf {
    let rootfs = work.join("oci-rootfs");
    for d in ["bin", "srv/app", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("symlink");
    let app = rootfs.join("bin/app");
    std::fs::write(
        &app,
        "#!/bin/sh\necho \"oci args: $*\"\necho \"oci greeting: $GREETING\"\necho \"oci pwd: $(pwd)\"\nexit 5\n",
    )
    .expect("app");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let layout = work.join("oci-layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("layout");
    let layer = work.join("layer.tar");
    sh(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."));
    let diff_id = format!("sha256:{}", sha256(&layer));
    let (ld, ls) = put(&layout, &layer);
    let config = work.join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": ["/bin/app"],
                "Cmd": ["first", "second"],
                "Env": ["PATH=/bin", "GREETING=hello from an oci archive"],
                "WorkingDir": "/srv/app"
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]}
        }))
        .expect("json"),
    )
    .expect("config");
    let (cd, cs) = put(&layout, &config);
    let manifest = work.join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]
        }))
        .expect("json"),
    )
    .expect("manifest");
    let (md, ms) = put(&layout, &manifest);
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md, "size": ms,
                "annotations": {"org.opencontainers.image.ref.name": "latest"}
            }]
        }))
        .expect("json"),
    )
    .expect("index");
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let archive = work.join("image.oci.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg("."));
    archive
}
