//! Images for the `incus` driver. No image server is assumed: an image named
//! in a machine's `image:` must exist on the server as an alias (in the
//! `default` project, which moat's projects share), except `busybox`, which
//! moat builds from the host's busybox-static (metadata.yaml + rootfs tarball,
//! the unified image format) and uploads.
//!
//! The busybox image's init runs `udhcpc` on every NIC, so the machine takes
//! the address moat set on its NIC (`ipv4.address`: a static DHCP lease).

use crate::client::{enc, Client};
use crate::IncusError;
use std::path::Path;
use std::process::Command;

/// Whether the server has an image alias `name` (default project).
pub fn has_alias(c: &Client, name: &str) -> Result<bool, IncusError> {
    Ok(c.get_opt(&format!("/1.0/images/aliases/{}", enc(name)))?
        .is_some())
}

const INITTAB: &str = "::sysinit:/etc/init.d/rcS\n::shutdown:/bin/umount -a -r\n";
const RCS: &str = "#!/bin/sh\nmount -t proc proc /proc 2>/dev/null\nip link set lo up\n\
for i in /sys/class/net/*; do n=${i##*/}; [ \"$n\" = lo ] && continue; \
udhcpc -b -q -i \"$n\" -s /usr/share/udhcpc/default.script >/dev/null 2>&1 & done\n";
const UDHCPC: &str = "#!/bin/sh\ncase \"$1\" in\n  deconfig) ip addr flush dev \"$interface\"; ip link set \"$interface\" up ;;\n  bound|renew)\n    ip addr flush dev \"$interface\"\n    ip addr add \"$ip/${mask:-24}\" dev \"$interface\"\n    [ -n \"$router\" ] && ip route replace default via \"${router%% *}\" dev \"$interface\"\n    ;;\nesac\n";

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IncusError {
    let what = what.into();
    move |source| IncusError::Io { what, source }
}

/// Builds the busybox image as a unified tarball (bytes).
pub fn build_busybox(busybox: &Path) -> Result<Vec<u8>, IncusError> {
    let dir = tempfile::tempdir().map_err(io("creating a temporary folder"))?;
    let root = dir.path().join("rootfs");
    for d in [
        "bin",
        "sbin",
        "etc/init.d",
        "usr/share/udhcpc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "run",
        "var",
    ] {
        std::fs::create_dir_all(root.join(d)).map_err(io(format!("creating {d}")))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))
        .map_err(io(format!("copying {}", busybox.display())))?;
    let out = Command::new(root.join("bin/busybox"))
        .arg("--list")
        .output()
        .map_err(io("running busybox --list"))?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet == "busybox" || applet.contains('/') {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    std::os::unix::fs::symlink("../bin/busybox", root.join("sbin/init"))
        .map_err(io("linking /sbin/init"))?;
    let write = |p: &str, s: &str, mode: u32| -> Result<(), IncusError> {
        use std::os::unix::fs::PermissionsExt;
        let path = root.join(p);
        std::fs::write(&path, s).map_err(io(format!("writing {p}")))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {p}")))
    };
    write("etc/inittab", INITTAB, 0o644)?;
    write("etc/init.d/rcS", RCS, 0o755)?;
    write("usr/share/udhcpc/default.script", UDHCPC, 0o755)?;
    write("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
    write("etc/group", "root:x:0:\n", 0o644)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    std::fs::write(
        dir.path().join("metadata.yaml"),
        format!(
            "architecture: {}\ncreation_date: {now}\nproperties:\n  description: busybox (built by moat)\n  os: busybox\n",
            std::env::consts::ARCH
        ),
    )
    .map_err(io("writing metadata.yaml"))?;
    let tarball = dir.path().join("image.tar.gz");
    let st = Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-czf")
        .arg(&tarball)
        .args(["--numeric-owner", "metadata.yaml", "rootfs"])
        .status()
        .map_err(io("running tar"))?;
    if !st.success() {
        return Err(IncusError::Io {
            what: "building the busybox image tarball".into(),
            source: std::io::Error::other(format!("tar exited with {st}")),
        });
    }
    std::fs::read(&tarball).map_err(io("reading the image tarball"))
}

/// Makes sure alias `name` exists; builds and uploads `busybox` when missing.
pub fn ensure(c: &Client, name: &str) -> Result<(), IncusError> {
    if has_alias(c, name)? {
        return Ok(());
    }
    if name != "busybox" {
        return Err(IncusError::Config {
            message: format!(
                "the Incus server has no image '{name}'; import one with \
                 `incus image import <tarball> --alias {name}` (no image server is used)"
            ),
        });
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .ok_or_else(|| IncusError::Config {
            message: "busybox is not installed on this host; `apt-get install busybox-static`"
                .into(),
        })?;
    let tarball = build_busybox(busybox)?;
    let meta = c.post_raw("/1.0/images", &tarball, "application/octet-stream")?;
    let fp = meta["fingerprint"].as_str().unwrap_or("").to_string();
    let body = serde_json::json!({"name": name, "target": fp, "description": "moat busybox"});
    match c.call("POST", "/1.0/images/aliases", Some(&body)) {
        Ok(_) => Ok(()),
        // Another moat process won the race.
        Err(IncusError::Api { code: 409, .. }) => Ok(()),
        Err(e) if e.to_string().contains("already exists") => Ok(()),
        Err(e) => Err(e),
    }
}
