//! The cloud-init NoCloud seed volume of a full VM.
//!
//! `moat_core::cloudinit::render` turns the machine's `cloud_init:` into
//! three files (user-data, meta-data, network-config); this module writes
//! them into a small ISO9660 volume labelled `cidata` (`genisoimage`, the
//! label cloud-init's NoCloud source looks for), or a FAT volume labelled
//! `CIDATA` (`mkfs.vfat` + `mcopy`, no mount) when genisoimage is missing.
//! QEMU attaches it read-only as a CD-ROM (ISO) or a virtio disk (FAT).

use crate::disk::run;
use crate::QemuError;
use moat_core::cloudinit::NoCloudSeed;
use std::path::Path;
use std::process::Command;

/// Volume label cloud-init's NoCloud data source looks for.
pub const LABEL: &str = "cidata";

/// What kind of volume a seed was written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedFormat {
    Iso,
    Vfat,
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Writes the seed volume to `out` (replacing it). The files are staged in a
/// folder next to `out`, removed afterwards.
pub fn build(seed: &NoCloudSeed, out: &Path) -> Result<SeedFormat, QemuError> {
    let parent = out.parent().unwrap_or(Path::new("."));
    let stage = parent.join(".seed-staging");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage).map_err(QemuError::io(format!(
        "creating the seed folder {}",
        stage.display()
    )))?;
    let result = build_from(seed, &stage, out);
    let _ = std::fs::remove_dir_all(&stage);
    result
}

fn build_from(seed: &NoCloudSeed, stage: &Path, out: &Path) -> Result<SeedFormat, QemuError> {
    let mut names = vec![];
    for (name, text) in seed.files() {
        let p = stage.join(name);
        std::fs::write(&p, text).map_err(QemuError::io(format!("writing {}", p.display())))?;
        names.push(name);
    }
    let _ = std::fs::remove_file(out);
    let what = format!("building the cloud-init seed {}", out.display());
    if have("genisoimage") {
        let mut cmd = Command::new("genisoimage");
        cmd.args(["-quiet", "-output"])
            .arg(out)
            .args(["-volid", LABEL, "-joliet", "-rock"])
            .current_dir(stage)
            .args(&names);
        run(&what, &mut cmd)?;
        return Ok(SeedFormat::Iso);
    }
    if have("mkfs.vfat") && have("mcopy") {
        run(
            &what,
            Command::new("mkfs.vfat")
                .args(["-n", "CIDATA", "-C"])
                .arg(out)
                .arg("1024"),
        )?;
        for n in &names {
            run(
                &what,
                Command::new("mcopy")
                    .arg("-i")
                    .arg(out)
                    .arg(stage.join(n))
                    .arg(format!("::{n}")),
            )?;
        }
        return Ok(SeedFormat::Vfat);
    }
    Err(QemuError::Failed(format!(
        "{what}: neither genisoimage nor mkfs.vfat+mcopy is installed; apt-get install genisoimage"
    )))
}
