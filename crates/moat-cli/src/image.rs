//! `moat image ls | build | import | rm | gc`: the image store, directly.

use crate::cli::{Cli, ImageCmd, ImportKind};
use crate::exit;
use crate::output::Output;
use crate::run::CliError;
use moat_core::model::ImageSource;
use moat_image::{ImageStore, StderrProgress};

fn store(cli: &Cli) -> Result<ImageStore, CliError> {
    ImageStore::open(&cli.root).map_err(|e| CliError::Other(e.to_string()))
}

fn fail(e: moat_image::ImageError) -> CliError {
    CliError::Other(e.to_string())
}

/// An import source from a path (or `oci:REF`), detected unless `kind` says.
fn import_source(src: &str, kind: Option<ImportKind>) -> Result<ImageSource, CliError> {
    if let Some(r) = src.strip_prefix("oci:") {
        return Ok(ImageSource::Oci {
            reference: r.into(),
        });
    }
    let path = std::fs::canonicalize(src).map_err(|e| CliError::Io {
        what: format!("cannot read {src}"),
        source: e,
    })?;
    let p = path.to_string_lossy().into_owned();
    let kind = match kind {
        Some(k) => k,
        None if path.is_dir() && path.join("index.json").exists() => ImportKind::OciLayout,
        None if path.is_dir() => ImportKind::Folder,
        None => detect_archive(&path)?,
    };
    Ok(match kind {
        ImportKind::Tarball => ImageSource::Tarball { path: p },
        ImportKind::Folder => ImageSource::Folder { path: p },
        ImportKind::OciLayout => ImageSource::OciLayout { path: p },
        ImportKind::OciArchive => ImageSource::OciArchive { path: p },
        ImportKind::DockerArchive => ImageSource::DockerArchive { path: p },
    })
}

/// An uncompressed tar holding `index.json` is an OCI archive, one holding
/// `manifest.json` a docker archive; anything else a rootfs tarball.
fn detect_archive(path: &std::path::Path) -> Result<ImportKind, CliError> {
    let f = std::fs::File::open(path).map_err(|e| CliError::Io {
        what: format!("cannot read {}", path.display()),
        source: e,
    })?;
    let mut ar = tar::Archive::new(f);
    if let Ok(entries) = ar.entries() {
        for e in entries.take(64).flatten() {
            let name = e
                .path()
                .map(|p| p.to_string_lossy().trim_start_matches("./").to_string());
            match name.as_deref() {
                Ok("index.json") | Ok("oci-layout") => return Ok(ImportKind::OciArchive),
                Ok("manifest.json") => return Ok(ImportKind::DockerArchive),
                _ => {}
            }
        }
    }
    Ok(ImportKind::Tarball)
}

pub fn run(cli: &Cli, out: &Output, cmd: &ImageCmd) -> Result<u8, CliError> {
    match cmd {
        ImageCmd::Ls { json } => {
            let images = store(cli)?.list().map_err(fail)?;
            if *json {
                out.json(&images)?;
            } else {
                let mut s = format!(
                    "{:<28} {:<20} {:>7} {:>10}  SOURCE\n",
                    "NAME", "ID", "LAYERS", "SIZE"
                );
                for i in &images {
                    s.push_str(&format!(
                        "{:<28} {:<20} {:>7} {:>10}  {}\n",
                        i.name,
                        &i.id[..i.id.len().min(19)],
                        i.layers.len(),
                        size(i.size),
                        i.source
                    ));
                }
                out.data(&s);
            }
            Ok(exit::OK)
        }
        ImageCmd::Build {
            source,
            name,
            vm: true,
        } => {
            let name = name.clone().unwrap_or_else(|| source.clone());
            let disk =
                moat_qemu::vmimage::build_vm_image(&store(cli)?, source, &name, &StderrProgress)
                    .map_err(|e| CliError::Other(e.to_string()))?;
            let len = std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0);
            out.info(&format!(
                "built VM disk {name} ({}, {}); machines with `type: vm` and `image: {name}` boot from it",
                disk.display(),
                size(len)
            ));
            Ok(exit::OK)
        }
        ImageCmd::Build { source, name, .. } => {
            let src = moat_core::load::builtin_image(source).ok_or_else(|| {
                CliError::Other(format!(
                    "'{source}' is not a source moat can build; use busybox, debian/<suite> or ubuntu/<suite> (or `moat image import` for files)"
                ))
            })?;
            let name = name.clone().unwrap_or_else(|| source.clone());
            let img = store(cli)?
                .build(&name, &src, &StderrProgress)
                .map_err(fail)?;
            out.info(&format!(
                "built {} ({}, {})",
                img.name,
                img.id,
                size(img.size)
            ));
            Ok(exit::OK)
        }
        ImageCmd::Import { source, name, kind } => {
            let src = import_source(source, *kind)?;
            let img = store(cli)?
                .import(name, &src, &StderrProgress)
                .map_err(fail)?;
            out.info(&format!(
                "imported {} ({}, {} layers)",
                img.name,
                img.id,
                img.layers.len()
            ));
            Ok(exit::OK)
        }
        ImageCmd::Rm { name } => {
            let st = store(cli)?;
            if st.get(name).map_err(fail)?.is_none() {
                return Err(CliError::NotFound(format!("no image named '{name}'")));
            }
            st.remove(name).map_err(fail)?;
            out.info(&format!("removed {name}; `moat image gc` frees its layers"));
            Ok(exit::OK)
        }
        ImageCmd::Gc => {
            let r = store(cli)?.gc().map_err(fail)?;
            out.info(&format!(
                "removed {} unused layers ({}), kept {}",
                r.removed_layers.len(),
                size(r.freed_bytes),
                r.kept_layers
            ));
            Ok(exit::OK)
        }
    }
}

/// `1.9 MiB`-style sizes for people.
pub(crate) fn size(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}
