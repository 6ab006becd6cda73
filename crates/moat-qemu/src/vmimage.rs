//! Bootable VM disks made from moat images (`moat image build --vm debian/<suite>`), and
//! cloud images imported as VM base disks.
//!
//! ```text
//! debian/<suite> + packages (kernel, initramfs-tools, cloud-init, udev)   ── image store (mmdebstrap)
//!      │ mounted read-only (MachineFs overlay of its layers)
//!      ▼
//! raw disk: MBR (syslinux mbr.bin)
//!   p1  FAT "MOATBOOT" (type ef, active): syslinux (BIOS) + EFI/BOOT/BOOTX64.EFI (syslinux.efi,
//!       UEFI when syslinux-efi is installed), syslinux.cfg, vmlinuz, initrd.img
//!   p2  ext4 "moat-root": `mkfs.ext4 -d <rootfs> -E offset=…` (no loop mount anywhere)
//!      │ qemu-img convert
//!      ▼
//! <root>/images/vm/<name>.qcow2   (base of every VM using image <name>)
//! ```
//!
//! Nothing is mounted besides the image's overlay: the boot partition is written with
//! mtools/syslinux at an offset into the file, the root file system by mke2fs from a folder.
//! Why syslinux rather than GRUB: its installer works on a FAT image at an offset without a
//! loop device, and one FAT partition serves BIOS and UEFI.

use crate::disk::{self, run};
use crate::QemuError;
use moat_core::model::ImageSource;
use moat_image::{ImageStore, MachineFs, Progress};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Packages a VM image of a Debian/Ubuntu suite gets on top of moat's system set.
pub const VM_PACKAGES: &[&str] = &[
    "linux-image-amd64",
    "initramfs-tools",
    "udev",
    "cloud-init",
    "cloud-guest-utils",
    "ifupdown",
    "isc-dhcp-client",
];

/// File-system label of the root partition (the kernel command line names it).
pub const ROOT_LABEL: &str = "moat-root";
const MIB: u64 = 1024 * 1024;

const MBR_BIN: &str = "/usr/lib/syslinux/mbr/mbr.bin";
const SYSLINUX_EFI: &str = "/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi";
const LDLINUX_E64: &str = "/usr/lib/syslinux/modules/efi64/ldlinux.e64";

/// The syslinux configuration: boot the kernel at once, everything on the serial console
/// (the last `console=` gets /dev/console, so systemd's output reaches the serial log too).
pub fn syslinux_cfg(extra_cmdline: &str) -> String {
    let mut append = format!("root=LABEL={ROOT_LABEL} rw console=tty0 console=ttyS0,115200n8");
    if !extra_cmdline.is_empty() {
        append.push(' ');
        append.push_str(extra_cmdline);
    }
    format!(
        "SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\n\nLABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND {append}\n"
    )
}

/// The `sfdisk` script of the disk: boot partition (FAT, active), then root.
pub fn partition_script(boot_mib: u64, root_mib: u64) -> String {
    let sectors = |mib: u64| mib * MIB / 512;
    format!(
        "label: dos\nstart={}, size={}, type=ef, bootable\nstart={}, size={}, type=83\n",
        sectors(1),
        sectors(boot_mib),
        sectors(1 + boot_mib),
        sectors(root_mib)
    )
}

/// The newest `vmlinuz-<ver>` in `<rootfs>/boot` and its `initrd.img-<ver>`.
pub fn find_kernel(rootfs: &Path) -> Option<(PathBuf, PathBuf)> {
    let boot = rootfs.join("boot");
    let mut versions: Vec<String> = std::fs::read_dir(&boot)
        .ok()?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .filter(|v| boot.join(format!("initrd.img-{v}")).is_file())
        .collect();
    versions.sort();
    let v = versions.pop()?;
    Some((
        boot.join(format!("vmlinuz-{v}")),
        boot.join(format!("initrd.img-{v}")),
    ))
}

/// Writes a bootable qcow2 disk at `out` from the root file system folder `rootfs`
/// (which must hold a kernel and an initramfs in /boot).
pub fn disk_from_folder(rootfs: &Path, content_bytes: u64, out: &Path) -> Result<(), QemuError> {
    let (kernel, initrd) = find_kernel(rootfs).ok_or_else(|| {
        QemuError::Failed(format!(
            "{} has no kernel with an initramfs in /boot; build the image with the packages \
             linux-image-amd64 and initramfs-tools (`moat image build --vm` adds them)",
            rootfs.display()
        ))
    })?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let boot_mib = 32 + (size(&kernel) + size(&initrd)) / MIB;
    // Room for metadata, the journal and a little free space; cloud-init's growpart
    // grows the partition to the disk when a machine asks for a bigger `disk:`.
    let root_mib = content_bytes / MIB * 5 / 4 + 512;
    let total = (1 + boot_mib + root_mib + 1) * MIB;

    let dir = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(QemuError::io(format!("creating {}", dir.display())))?;
    let raw = dir.join(format!(
        ".{}.raw",
        out.file_name().unwrap_or_default().to_string_lossy()
    ));
    let boot = dir.join(format!(
        ".{}.boot",
        out.file_name().unwrap_or_default().to_string_lossy()
    ));
    // One cleanup path for the temporary files, whatever step fails.
    #[allow(clippy::redundant_closure_call)]
    let result = (|| {
        let what = format!("building the VM disk {}", out.display());
        let f = std::fs::File::create(&raw)
            .map_err(QemuError::io(format!("creating {}", raw.display())))?;
        f.set_len(total)
            .map_err(QemuError::io(format!("sizing {}", raw.display())))?;
        drop(f);
        let mut sf = Command::new("sfdisk");
        sf.args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&raw)
            .stdin(std::process::Stdio::piped());
        run_with_stdin(&what, sf, &partition_script(boot_mib, root_mib))?;
        // MBR boot code (the partition table stays: only the first 440 bytes).
        let mbr = std::fs::read(MBR_BIN).map_err(QemuError::io(format!(
            "reading {MBR_BIN} (apt-get install syslinux-common)"
        )))?;
        write_at(&raw, 0, &mbr[..mbr.len().min(440)])?;

        // Boot partition, built as its own file then copied in.
        let _ = std::fs::remove_file(&boot);
        run(
            &what,
            Command::new("mkfs.vfat")
                .args(["-n", "MOATBOOT", "-C"])
                .arg(&boot)
                .arg((boot_mib * 1024).to_string()),
        )?;
        let cfg = dir.join(".syslinux.cfg");
        std::fs::write(&cfg, syslinux_cfg(""))
            .map_err(QemuError::io(format!("writing {}", cfg.display())))?;
        let mut copies: Vec<(PathBuf, &str)> = vec![
            (kernel.clone(), "::vmlinuz"),
            (initrd.clone(), "::initrd.img"),
            (cfg.clone(), "::syslinux.cfg"),
        ];
        if Path::new(SYSLINUX_EFI).is_file() && Path::new(LDLINUX_E64).is_file() {
            run(
                &what,
                Command::new("mmd")
                    .arg("-i")
                    .arg(&boot)
                    .args(["::EFI", "::EFI/BOOT"]),
            )?;
            copies.push((SYSLINUX_EFI.into(), "::EFI/BOOT/BOOTX64.EFI"));
            copies.push((LDLINUX_E64.into(), "::EFI/BOOT/ldlinux.e64"));
            copies.push((cfg.clone(), "::EFI/BOOT/syslinux.cfg"));
        }
        for (src, dst) in &copies {
            run(
                &what,
                Command::new("mcopy").arg("-i").arg(&boot).arg(src).arg(dst),
            )?;
        }
        let _ = std::fs::remove_file(&cfg);
        run(
            &what,
            Command::new("syslinux").args(["--install"]).arg(&boot),
        )?;
        let data =
            std::fs::read(&boot).map_err(QemuError::io(format!("reading {}", boot.display())))?;
        write_at(&raw, MIB, &data)?;

        // Root partition, written by mke2fs straight into the file at its offset.
        run(
            &what,
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", ROOT_LABEL, "-d"])
                .arg(rootfs)
                .arg("-E")
                .arg(format!("offset={}", (1 + boot_mib) * MIB))
                .arg(&raw)
                .arg(format!("{}k", root_mib * 1024)),
        )?;
        let tmp_out = out.with_extension("qcow2.tmp");
        run(
            &what,
            Command::new(disk::QEMU_IMG)
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&tmp_out),
        )?;
        std::fs::rename(&tmp_out, out).map_err(QemuError::io(format!(
            "moving the disk to {}",
            out.display()
        )))
    })();
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&boot);
    result
}

fn run_with_stdin(what: &str, mut cmd: Command, input: &str) -> Result<(), QemuError> {
    use std::io::Write;
    let argv = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| QemuError::Command {
            what: what.into(),
            cmd: argv.clone(),
            stderr: e.to_string(),
        })?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| QemuError::Command {
        what: what.into(),
        cmd: argv.clone(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(QemuError::Command {
            what: what.into(),
            cmd: argv,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<(), QemuError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(QemuError::io(format!("opening {}", path.display())))?;
    f.write_all_at(data, offset)
        .map_err(QemuError::io(format!("writing {}", path.display())))
}

/// The store image a VM disk of `source` is made from: the same suite with
/// [`VM_PACKAGES`] added, stored as `<source>+vm`.
pub fn vm_image_source(source: &str) -> Option<(String, ImageSource)> {
    let with = |packages: &Vec<String>| {
        let mut p = packages.clone();
        for v in VM_PACKAGES {
            if !p.iter().any(|x| x == v) {
                p.push((*v).to_string());
            }
        }
        p
    };
    let src = match moat_core::load::builtin_image(source)? {
        ImageSource::Debian { suite, packages } => ImageSource::Debian {
            packages: with(&packages),
            suite,
        },
        ImageSource::Ubuntu { suite, packages } => ImageSource::Ubuntu {
            packages: with(&packages)
                .into_iter()
                .map(|p| {
                    if p == "linux-image-amd64" {
                        "linux-image-virtual".into()
                    } else {
                        p
                    }
                })
                .collect(),
            suite,
        },
        _ => return None,
    };
    Some((format!("{source}+vm"), src))
}

/// `moat image build --vm SOURCE`: the VM base disk of `source` (`debian/<suite>`,
/// `ubuntu/<suite>`), building the store image first. Returns the disk's path.
pub fn build_vm_image(
    store: &ImageStore,
    source: &str,
    name: &str,
    progress: &dyn Progress,
) -> Result<PathBuf, QemuError> {
    let (img_name, src) = vm_image_source(source).ok_or_else(|| {
        QemuError::Failed(format!(
            "'{source}' cannot be made into a VM disk; use debian/<suite> or ubuntu/<suite>, \
             or declare a cloud image (`images: {{x: {{source: cloud-image, path: ...}}}}`)"
        ))
    })?;
    let img = store
        .ensure(&img_name, &src, progress)
        .map_err(|e| QemuError::Failed(format!("building image {img_name}: {e}")))?;
    let out = disk::base_path(store.root(), name);
    progress.step(&format!("writing the VM disk {}", out.display()));
    // Mount the image read-only-in-effect: a disposable machine fs that is
    // never written and removed afterwards.
    let tmp_name = format!("vmimage-{}", std::process::id());
    if MachineFs::exists(store, &tmp_name) {
        if let Ok(fs) = MachineFs::open(store, &tmp_name) {
            let _ = fs.unmount();
            let _ = fs.destroy();
        }
    }
    let fs = MachineFs::create(store, &tmp_name, &img, true)
        .map_err(|e| QemuError::Failed(format!("mounting image {img_name}: {e}")))?;
    let result = fs
        .mount()
        .map_err(|e| QemuError::Failed(format!("mounting image {img_name}: {e}")))
        .and_then(|root| disk_from_folder(&root, img.size, &out));
    let _ = fs.unmount();
    let _ = fs.destroy();
    // The machine folder the fs lived in.
    let _ = std::fs::remove_dir(store.root().join("machines").join(&tmp_name));
    result.map(|_| out)
}

/// Makes the cloud image at `path` (qcow2 or raw) the base disk of image `name`:
/// copied once (reflink when the file system can), so later changes to the
/// file do not corrupt machines built on it. Nothing happens when the copy is current.
pub fn import_cloud_image(root: &Path, name: &str, path: &Path) -> Result<PathBuf, QemuError> {
    let out = disk::base_path(root, name);
    let src_meta = std::fs::metadata(path).map_err(QemuError::io(format!(
        "reading the cloud image {} (check the path under images:)",
        path.display()
    )))?;
    if let Ok(m) = std::fs::metadata(&out) {
        if m.len() == src_meta.len() && m.modified().ok() >= src_meta.modified().ok() {
            return Ok(out);
        }
    }
    let info = disk::info(path)?;
    let dir = disk::store_dir(root);
    std::fs::create_dir_all(&dir).map_err(QemuError::io(format!("creating {}", dir.display())))?;
    let tmp = out.with_extension("qcow2.tmp");
    if info.format == "qcow2" && info.backing.is_none() {
        run(
            &format!("importing {}", path.display()),
            Command::new("cp")
                .args(["--reflink=auto", "--sparse=always"])
                .arg(path)
                .arg(&tmp),
        )?;
    } else {
        run(
            &format!("importing {}", path.display()),
            Command::new(disk::QEMU_IMG)
                .args(["convert", "-q", "-O", "qcow2"])
                .arg(path)
                .arg(&tmp),
        )?;
    }
    std::fs::rename(&tmp, &out).map_err(QemuError::io(format!("moving to {}", out.display())))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_start_at_one_mib_and_boot_is_active() {
        let s = partition_script(64, 1024);
        assert!(s.contains("start=2048, size=131072, type=ef, bootable"));
        assert!(s.contains("start=133120, size=2097152, type=83"));
    }

    #[test]
    fn syslinux_boots_on_the_serial_console() {
        let c = syslinux_cfg("quiet");
        assert!(
            c.contains("APPEND root=LABEL=moat-root rw console=tty0 console=ttyS0,115200n8 quiet")
        );
        assert!(c.contains("TIMEOUT 0"));
    }

    #[test]
    fn finds_the_newest_kernel_with_an_initrd() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("boot");
        std::fs::create_dir_all(&b).unwrap();
        for f in ["vmlinuz-6.1.0-1", "initrd.img-6.1.0-1", "vmlinuz-6.1.0-9"] {
            std::fs::write(b.join(f), "x").unwrap();
        }
        let (k, i) = find_kernel(d.path()).unwrap();
        assert!(k.ends_with("vmlinuz-6.1.0-1") && i.ends_with("initrd.img-6.1.0-1"));
    }

    #[test]
    fn vm_sources_add_the_kernel_and_cloud_init() {
        let (name, src) = vm_image_source("debian/bookworm").unwrap();
        assert_eq!(name, "debian/bookworm+vm");
        match src {
            ImageSource::Debian { suite, packages } => {
                assert_eq!(suite, "bookworm");
                assert!(packages.iter().any(|p| p == "cloud-init"));
                assert!(packages.iter().any(|p| p == "linux-image-amd64"));
            }
            other => panic!("{other:?}"),
        }
        assert!(vm_image_source("busybox").is_none());
    }
}
