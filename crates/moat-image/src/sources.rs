//! Image sources: each turns an [`ImageSource`] into layers committed to the store plus a config.
//!
//! Built sources (busybox, mmdebstrap) fill one staging folder that becomes one layer named by its
//! tree digest; tar sources are unpacked with their uncompressed stream's digest as the layer id;
//! OCI/Docker sources live in [`crate::oci`].

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use moat_core::model::ImageSource;

use crate::error::{ImageError, IoContext, Result};
use crate::layer::{tree_digest, unpack_tar, WhiteoutMode};
use crate::progress::Progress;
use crate::store::{describe_source, ImageConfig, ImageStore, Staging};

/// What a source produced: committed layers (bottom first) and the run config.
pub struct Built {
    pub layers: Vec<String>,
    pub config: ImageConfig,
    pub source: String,
}

pub(crate) fn produce(store: &ImageStore, src: &ImageSource, p: &dyn Progress) -> Result<Built> {
    let desc = describe_source(src);
    match src {
        ImageSource::Busybox => busybox(store, Path::new("/bin/busybox"), p),
        ImageSource::Debian { suite, packages } => mmdebstrap(store, "debian", suite, packages, p),
        ImageSource::Ubuntu { suite, packages } => mmdebstrap(store, "ubuntu", suite, packages, p),
        ImageSource::Tarball { path } => {
            p.step(&format!("importing {desc}"));
            let f = fs::File::open(path).ctx("open tarball", path)?;
            let id = import_tar_layer(store, f, &desc)?;
            Ok(Built {
                layers: vec![id],
                config: rootfs_config(store, &desc)?,
                source: desc,
            })
        }
        ImageSource::Folder { path } => {
            p.step(&format!("importing {desc}"));
            let src_dir = Path::new(path);
            if !src_dir.is_dir() {
                return Err(ImageError::BadSource {
                    source_desc: desc,
                    reason: "not a folder".into(),
                });
            }
            let st = store.staging()?;
            copy_tree(src_dir, st.path())?;
            let id = commit_tree(store, st, &desc)?;
            Ok(Built {
                layers: vec![id],
                config: rootfs_config(store, &desc)?,
                source: desc,
            })
        }
        ImageSource::OciLayout { path } => {
            crate::oci::import_layout(store, Path::new(path), None, &desc, p)
        }
        ImageSource::OciArchive { path } => {
            crate::oci::import_oci_archive(store, Path::new(path), &desc, p)
        }
        ImageSource::DockerArchive { path } => {
            crate::oci::import_docker_archive(store, Path::new(path), &desc, p)
        }
        ImageSource::Oci { reference } => crate::pull::pull(store, reference, &desc, p),
        ImageSource::CloudImage { .. } => Err(ImageError::BadSource {
            source_desc: desc,
            reason: "cloud disk images are for VMs, not containers; use a container image source"
                .into(),
        }),
    }
}

/// Unpack one tar stream into the store as a layer (overlay whiteouts). Returns its id.
pub(crate) fn import_tar_layer(
    store: &ImageStore,
    r: impl std::io::Read,
    desc: &str,
) -> Result<String> {
    let st = store.staging()?;
    let id = unpack_tar(r, st.path(), WhiteoutMode::Overlay, desc)?;
    store.commit_layer(st, &id, "tar")?;
    Ok(id)
}

/// Commit a filled staging folder under its tree digest.
pub(crate) fn commit_tree(store: &ImageStore, st: Staging, _desc: &str) -> Result<String> {
    let (id, _) = tree_digest(st.path())?;
    store.commit_layer(st, &id, "tree")?;
    Ok(id)
}

/// `cp -a` keeps owners, modes, xattrs, device nodes and hard links; reflinks when it can.
pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let src = format!("{}/.", from.display());
    run(
        Command::new("cp")
            .args(["-a", "--reflink=auto", &src])
            .arg(to),
        None,
    )
}

/// Run a command, streaming its stdout and stderr lines to `progress` when given.
fn run(cmd: &mut Command, progress: Option<&dyn Progress>) -> Result<()> {
    let argv = format!("{cmd:?}").replace('"', "");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Command {
            argv: argv.clone(),
            status: "not started".into(),
            stderr: format!("{e}; is the program installed?"),
        })?;
    let stdout = child.stdout.take();
    let out_thread = std::thread::spawn(move || {
        let mut lines = Vec::new();
        if let Some(o) = stdout {
            for l in BufReader::new(o).lines().map_while(|l| l.ok()) {
                lines.push(l);
            }
        }
        lines
    });
    let mut tail: Vec<String> = Vec::new();
    if let Some(e) = child.stderr.take() {
        for l in BufReader::new(e).lines().map_while(|l| l.ok()) {
            if let Some(p) = progress {
                p.output(&l);
            }
            tail.push(l);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
    }
    let out = out_thread.join().unwrap_or_default();
    if let Some(p) = progress {
        for l in &out {
            p.output(l);
        }
    }
    let status = child.wait().ctx("wait for", argv.clone())?;
    if !status.success() {
        return Err(ImageError::Command {
            argv,
            status: status.to_string(),
            stderr: tail.join("\n"),
        });
    }
    Ok(())
}

/// The config of a plain rootfs (tarball, folder): a shell, and /sbin/init when present.
fn rootfs_config(store: &ImageStore, _desc: &str) -> Result<ImageConfig> {
    let _ = store;
    Ok(ImageConfig {
        cmd: vec!["/bin/sh".into()],
        env: vec![DEFAULT_PATH.into()],
        init: Some("/sbin/init".into()),
        ..Default::default()
    })
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A minimal rootfs around the host's static busybox.
pub(crate) fn busybox(store: &ImageStore, busybox: &Path, p: &dyn Progress) -> Result<Built> {
    let desc = format!("busybox from {}", busybox.display());
    p.step(&format!("building {desc}"));
    if !busybox.is_file() {
        return Err(ImageError::BadSource {
            source_desc: desc,
            reason: "not found; install the busybox-static package".into(),
        });
    }
    let st = store.staging()?;
    let r = st.path();
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "dev",
        "proc",
        "sys",
        "run",
        "var/log",
        "root",
        "home",
        "tmp",
        "usr/lib",
        "etc/init.d",
    ] {
        fs::create_dir_all(r.join(d)).ctx("create directory", r.join(d))?;
    }
    fs::set_permissions(r.join("tmp"), fs::Permissions::from_mode(0o1777))
        .ctx("chmod", r.join("tmp"))?;
    fs::set_permissions(r.join("root"), fs::Permissions::from_mode(0o700))
        .ctx("chmod", r.join("root"))?;
    let bb = r.join("bin/busybox");
    fs::copy(busybox, &bb).ctx("copy busybox to", &bb)?;
    fs::set_permissions(&bb, fs::Permissions::from_mode(0o755)).ctx("chmod", &bb)?;
    moat_host::busybox::link_applets(busybox, r, None).ctx("link the applets of", busybox)?;
    let files: &[(&str, &str, u32)] = &[
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n", 0o600),
        ("etc/hostname", "busybox\n", 0o644),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644),
        ("etc/os-release", "NAME=\"BusyBox\"\nID=busybox\nPRETTY_NAME=\"BusyBox (moat)\"\n", 0o644),
        ("usr/lib/os-release", "NAME=\"BusyBox\"\nID=busybox\nPRETTY_NAME=\"BusyBox (moat)\"\n", 0o644),
        // A container has no consoles or gettys to run: mount what init needs, then idle as
        // PID 1 until told to stop (SIGTERM/SIGUSR2 run the shutdown action).
        ("etc/inittab", "::sysinit:/etc/init.d/rcS\n::ctrlaltdel:/sbin/reboot\n::shutdown:/bin/sync\n::restart:/sbin/init\n", 0o644),
        ("etc/init.d/rcS", "#!/bin/sh\n[ -e /proc/self ] || mount -t proc proc /proc\n[ -f /etc/hostname ] && hostname -F /etc/hostname 2>/dev/null\nexit 0\n", 0o755),
    ];
    for (rel, content, mode) in files {
        let f = r.join(rel);
        fs::write(&f, content).ctx("write", &f)?;
        fs::set_permissions(&f, fs::Permissions::from_mode(*mode)).ctx("chmod", &f)?;
    }
    let init = r.join("sbin/init");
    if fs::symlink_metadata(&init).is_err() {
        symlink("/bin/busybox", &init).ctx("symlink", &init)?;
    }
    let id = commit_tree(store, st, &desc)?;
    Ok(Built {
        layers: vec![id],
        config: ImageConfig {
            cmd: vec!["/bin/sh".into()],
            env: vec![DEFAULT_PATH.into()],
            workdir: Some("/".into()),
            init: Some("/sbin/init".into()),
            ..Default::default()
        },
        source: desc,
    })
}

/// The host's apt source URIs for `distro` (deb822 `.sources` and one-line `.list` files).
pub(crate) fn apt_uris(distro: &str, apt_dir: &Path) -> Vec<String> {
    let mut files = vec![apt_dir.join("sources.list")];
    if let Ok(rd) = fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut v: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        files.extend(v);
    }
    let mut uris = Vec::new();
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        let deb822 = f.extension().is_some_and(|e| e == "sources");
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') {
                continue;
            }
            let found: Vec<&str> = if deb822 {
                line.strip_prefix("URIs:")
                    .map(|u| u.split_whitespace().collect())
                    .unwrap_or_default()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace()
                    .filter(|w| !w.starts_with('['))
                    .take(1)
                    .collect()
            } else {
                vec![]
            };
            for u in found {
                let is_distro = u.contains(&format!("/{distro}")) && !u.contains("security");
                if is_distro && !uris.iter().any(|x| x == u) {
                    uris.push(u.to_string());
                }
            }
        }
    }
    uris
}

/// Packages a system container image gets on top of minbase.
pub const SYSTEM_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "iproute2",
    "dbus",
    "ca-certificates",
];

fn mmdebstrap(
    store: &ImageStore,
    distro: &str,
    suite: &str,
    packages: &[String],
    p: &dyn Progress,
) -> Result<Built> {
    let desc = format!("{distro}/{suite}");
    if suite.is_empty()
        || !suite
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ImageError::BadSource {
            source_desc: desc,
            reason: "the suite must be a release name like bookworm".into(),
        });
    }
    let uris = apt_uris(distro, Path::new("/etc/apt"));
    let Some(uri) = uris.first() else {
        return Err(ImageError::NoAptSource {
            distro: distro.to_string(),
        });
    };
    p.step(&format!(
        "building {desc} with mmdebstrap from {uri} (network-bound, ~1 min)"
    ));
    let st = store.staging()?;
    let target = st.path().to_path_buf();
    if let Some(bad) = packages.iter().find(|n| {
        n.is_empty()
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.:".contains(&b))
    }) {
        return Err(ImageError::BadSource {
            source_desc: desc,
            reason: format!("'{bad}' is not a Debian package name"),
        });
    }
    let mut include = SYSTEM_PACKAGES.join(",");
    for pkg in packages {
        include.push(',');
        include.push_str(pkg);
    }
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", "--mode=root", "--format=directory"])
        .arg(format!("--include={include}"))
        .arg(suite)
        .arg(&target)
        .arg(format!("deb {uri} {suite} main"));
    if distro == "ubuntu" {
        cmd.arg("--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg");
    }
    run(&mut cmd, Some(p))?;
    // Empty: systemd generates a per-machine id at first boot.
    let _ = fs::write(target.join("etc/machine-id"), "");
    p.step("hashing the rootfs");
    let id = commit_tree(store, st, &desc)?;
    Ok(Built {
        layers: vec![id],
        config: ImageConfig {
            cmd: vec!["/bin/bash".into()],
            env: vec![DEFAULT_PATH.into()],
            workdir: Some("/".into()),
            init: Some("/sbin/init".into()),
            stop_signal: Some("SIGRTMIN+3".into()),
            ..Default::default()
        },
        source: format!("{desc} (mmdebstrap minbase + {include})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_uris_reads_both_formats() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("sources.list.d")).unwrap();
        fs::write(
            d.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://m.example/debian-security\n",
        )
        .unwrap();
        fs::write(
            d.path().join("sources.list"),
            "deb [arch=amd64] http://u.example/ubuntu jammy main\n",
        )
        .unwrap();
        assert_eq!(
            apt_uris("debian", d.path()),
            vec!["http://m.example/debian".to_string()]
        );
        assert_eq!(
            apt_uris("ubuntu", d.path()),
            vec!["http://u.example/ubuntu".to_string()]
        );
        assert!(apt_uris("fedora", d.path()).is_empty());
    }
}
