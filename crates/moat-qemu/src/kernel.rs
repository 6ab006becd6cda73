//! Guest kernels for microVMs.
//!
//! A kernel is a folder `<dir>/` holding `vmlinux` (uncompressed ELF with a
//! PVH note: QEMU boots it directly, no decompressor, no firmware) and
//! `modules/` (the `lib/modules/<version>` tree the initramfs takes its
//! modules from). `moat kernel fetch` fills `<store>/kernels/<version>/` from
//! Debian's `linux-image-amd64` package (`apt-get download` + `dpkg -x`) and
//! extracts `vmlinux` from the package's bzImage.
//!
//! Resolution of `kernel:` (`auto` or unset): `$MOAT_KERNEL` (a configured
//! default), then the host's `/boot/vmlinuz-*` with `/lib/modules/<version>`,
//! then the newest fetched kernel in the store. A path names a kernel folder
//! or a `vmlinux`/`vmlinuz` file (modules from a sibling `modules/` folder,
//! else `/lib/modules/<version>`).

use crate::QemuError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A kernel ready to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub vmlinux: PathBuf,
    /// `lib/modules/<version>` tree, when modules are available.
    pub modules: Option<PathBuf>,
    pub version: String,
}

/// Folder of fetched kernels in an image store.
pub fn store_dir(store_dir: &Path) -> PathBuf {
    store_dir.join("kernels")
}

/// Resolve a machine's `kernel:` setting.
pub fn resolve(kernels_dir: &Path, setting: Option<&str>) -> Result<Kernel, QemuError> {
    match setting {
        Some(s) if s != "auto" => from_path(Path::new(s)),
        _ => {
            if let Some(p) = std::env::var_os("MOAT_KERNEL") {
                return from_path(Path::new(&p));
            }
            if let Some(k) = from_host_boot()? {
                return Ok(k);
            }
            newest_fetched(kernels_dir)?.ok_or_else(|| {
                QemuError::Failed(
                    "no kernel for microVMs: the host has no /boot/vmlinuz-* and none was \
                     fetched; run `moat kernel fetch` (or set `kernel:` to a vmlinux path)"
                        .into(),
                )
            })
        }
    }
}

fn newest_fetched(dir: &Path) -> Result<Option<Kernel>, QemuError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join("vmlinux").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort_by_key(|a| version_key(a));
    match names.last() {
        Some(n) => from_path(&dir.join(n)).map(Some),
        None => Ok(None),
    }
}

fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn from_host_boot() -> Result<Option<Kernel>, QemuError> {
    let Ok(entries) = std::fs::read_dir("/boot") else {
        return Ok(None);
    };
    let mut versions: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .filter(|v| Path::new("/lib/modules").join(v).is_dir())
        .collect();
    versions.sort_by_key(|a| version_key(a));
    let Some(v) = versions.last() else {
        return Ok(None);
    };
    // The host's bzImage is not PVH-bootable: extract it once into a cache.
    let cache = Path::new("/var/cache/moat/kernels").join(v);
    let vmlinux = cache.join("vmlinux");
    if !vmlinux.is_file() {
        std::fs::create_dir_all(&cache)
            .map_err(QemuError::io(format!("creating {}", cache.display())))?;
        extract_vmlinux(Path::new(&format!("/boot/vmlinuz-{v}")), &vmlinux)?;
    }
    Ok(Some(Kernel {
        vmlinux,
        modules: Some(Path::new("/lib/modules").join(v)),
        version: v.clone(),
    }))
}

/// A kernel folder, or a vmlinux/vmlinuz file.
pub fn from_path(p: &Path) -> Result<Kernel, QemuError> {
    if p.is_dir() {
        let vmlinux = p.join("vmlinux");
        if !vmlinux.is_file() {
            return Err(QemuError::Failed(format!(
                "kernel folder {} has no vmlinux; run `moat kernel fetch` again",
                p.display()
            )));
        }
        let version = std::fs::read_to_string(p.join("version"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| p.file_name().unwrap_or_default().to_string_lossy().into());
        let modules = p.join("modules");
        return Ok(Kernel {
            vmlinux,
            modules: modules.is_dir().then_some(modules),
            version,
        });
    }
    let head = read_head(p, 4)?;
    if head != b"\x7fELF" {
        // A bzImage: extract its vmlinux next to it once.
        let out = p.with_extension("vmlinux");
        if !out.is_file() {
            extract_vmlinux(p, &out)?;
        }
        return from_path(&out);
    }
    let dir = p.parent().unwrap_or(Path::new("/"));
    let modules = dir.join("modules");
    Ok(Kernel {
        vmlinux: p.to_path_buf(),
        modules: modules.is_dir().then_some(modules),
        version: p.file_name().unwrap_or_default().to_string_lossy().into(),
    })
}

fn read_head(p: &Path, n: usize) -> Result<Vec<u8>, QemuError> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).map_err(QemuError::io(format!(
        "opening kernel {} (check `kernel:`)",
        p.display()
    )))?;
    let mut buf = vec![0; n];
    let got = f
        .read(&mut buf)
        .map_err(QemuError::io(format!("reading {}", p.display())))?;
    buf.truncate(got);
    Ok(buf)
}

/// Offset and length of a bzImage's compressed payload (boot protocol ≥ 2.08).
pub fn bzimage_payload(img: &[u8]) -> Option<(usize, usize)> {
    if img.len() < 0x250 || &img[0x202..0x206] != b"HdrS" {
        return None;
    }
    let setup_sects = match img[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let u32_at = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
    let off = (setup_sects + 1) * 512 + u32_at(0x248) as usize;
    let len = u32_at(0x24c) as usize;
    (off + len <= img.len()).then_some((off, len))
}

/// Decompressor command for a payload, from its magic bytes.
fn decompressor(payload: &[u8]) -> Option<&'static [&'static str]> {
    let m = |magic: &[u8]| payload.starts_with(magic);
    if m(b"\xfd7zXZ\x00") {
        Some(&["xz", "-dc"])
    } else if m(b"\x28\xb5\x2f\xfd") {
        Some(&["zstd", "-dc"])
    } else if m(b"\x1f\x8b") {
        Some(&["gzip", "-dc"])
    } else if m(b"\x02\x21\x4c\x18") {
        Some(&["lz4", "-dc"])
    } else if m(b"BZh") {
        Some(&["bzip2", "-dc"])
    } else {
        None
    }
}

/// Write the uncompressed ELF kernel inside bzImage `src` to `dst`.
pub fn extract_vmlinux(src: &Path, dst: &Path) -> Result<(), QemuError> {
    use std::io::Write;
    let img = std::fs::read(src).map_err(QemuError::io(format!("reading {}", src.display())))?;
    let (off, len) = bzimage_payload(&img).ok_or_else(|| {
        QemuError::Failed(format!(
            "{} is not a bzImage (boot protocol 2.08+); give an uncompressed vmlinux instead",
            src.display()
        ))
    })?;
    let payload = &img[off..off + len];
    let argv = decompressor(payload).ok_or_else(|| {
        QemuError::Failed(format!(
            "{}: unknown kernel compression; give an uncompressed vmlinux",
            src.display()
        ))
    })?;
    let what = format!("decompressing {}", src.display());
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(
            std::fs::File::create(dst)
                .map_err(QemuError::io(format!("creating {}", dst.display())))?,
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(QemuError::io(format!("{what}: running {}", argv[0])))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Trailing data after the stream (the relocation table) may make the
    // tool complain; the ELF is complete anyway, checked below.
    let _ = stdin.write_all(payload);
    drop(stdin);
    let _ = child.wait_with_output();
    if read_head(dst, 4)? != b"\x7fELF" {
        let _ = std::fs::remove_file(dst);
        return Err(QemuError::Failed(format!(
            "{what}: the result is not an ELF kernel; install {} and retry",
            argv[0]
        )));
    }
    Ok(())
}

/// `moat kernel fetch`: download Debian's current `linux-image-amd64` image
/// package, unpack it and lay it out as a kernel folder under `kernels_dir`.
/// Returns the kernel (already present kernels are kept).
pub fn fetch(kernels_dir: &Path, package: &str) -> Result<Kernel, QemuError> {
    std::fs::create_dir_all(kernels_dir)
        .map_err(QemuError::io(format!("creating {}", kernels_dir.display())))?;
    let run = |what: &str, cmd: &mut Command| -> Result<String, QemuError> {
        let out = cmd.output().map_err(QemuError::io(what.to_string()))?;
        if !out.status.success() {
            return Err(QemuError::Command {
                what: what.into(),
                cmd: format!("{cmd:?}"),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The metapackage depends on the versioned image package.
    let deps = run(
        "resolving the kernel package (is apt configured?)",
        Command::new("apt-cache").args(["depends", package]),
    )?;
    let image_pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-"))
        .unwrap_or(package)
        .to_string();
    let work = kernels_dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)
        .map_err(QemuError::io(format!("creating {}", work.display())))?;
    let guard = RemoveOnDrop(work.clone());
    run(
        &format!("downloading {image_pkg} (needs network access to the Debian mirror)"),
        Command::new("apt-get")
            .args(["download", &image_pkg])
            .current_dir(&work),
    )?;
    let deb = std::fs::read_dir(&work)
        .map_err(QemuError::io("listing the download"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| QemuError::Failed(format!("apt-get download {image_pkg} left no .deb")))?;
    let tree = work.join("tree");
    run(
        "unpacking the kernel package",
        Command::new("dpkg").arg("-x").arg(&deb).arg(&tree),
    )?;
    let version = std::fs::read_dir(tree.join("boot"))
        .map_err(QemuError::io("reading the package's /boot"))?
        .flatten()
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .ok_or_else(|| QemuError::Failed(format!("{image_pkg} has no /boot/vmlinuz-*")))?;
    let dest = kernels_dir.join(&version);
    if dest.join("vmlinux").is_file() {
        return from_path(&dest);
    }
    let staging = work.join("kernel");
    std::fs::create_dir_all(&staging).map_err(QemuError::io("creating the kernel folder"))?;
    extract_vmlinux(
        &tree.join("boot").join(format!("vmlinuz-{version}")),
        &staging.join("vmlinux"),
    )?;
    let mods = tree.join("lib/modules").join(&version);
    let mods = if mods.is_dir() {
        mods
    } else {
        tree.join("usr/lib/modules").join(&version)
    };
    std::fs::rename(&mods, staging.join("modules"))
        .map_err(QemuError::io("moving the kernel modules"))?;
    std::fs::write(staging.join("version"), format!("{version}\n"))
        .map_err(QemuError::io("writing the kernel version"))?;
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&staging, &dest)
        .map_err(QemuError::io(format!("installing {}", dest.display())))?;
    drop(guard);
    from_path(&dest)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fetched kernels (version, folder).
pub fn list(kernels_dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(kernels_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("vmlinux").is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_of_a_fake_bzimage() {
        let mut img = vec![0u8; 4096];
        img[0x1f1] = 2;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x248..0x24c].copy_from_slice(&10u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(bzimage_payload(&img), Some((3 * 512 + 10, 100)));
        assert_eq!(bzimage_payload(&img[..0x100]), None);
    }

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["6.1.0-9-amd64", "6.1.0-56-amd64", "6.12.0-1-amd64"];
        v.sort_by_key(|a| version_key(a));
        assert_eq!(v, ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.12.0-1-amd64"]);
    }
}
