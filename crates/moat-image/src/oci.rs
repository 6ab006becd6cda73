//! OCI and Docker image formats: an OCI image layout folder (`index.json` → manifest → config +
//! layer blobs), the same in a tar (`oci-archive`), and `docker-archive` tars (`manifest.json` +
//! layer tars). Each layer blob becomes one store layer keyed by its diff id (the digest of the
//! uncompressed tar), so layers shared between images are stored once and not unpacked twice.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{ImageError, IoContext, Result};
use crate::progress::Progress;
use crate::sources::{import_tar_layer, Built};
use crate::store::{ImageConfig, ImageStore};

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    /// Announced blob size.
    #[serde(default)]
    #[allow(dead_code)]
    pub size: Option<u64>,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

/// A manifest or an index (the two are told apart by which list they carry).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Manifest {
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    stop_signal: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

fn bad(desc: &str, reason: impl Into<String>) -> ImageError {
    ImageError::BadSource {
        source_desc: desc.to_string(),
        reason: reason.into(),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &'static str, path: &Path) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// `blobs/<alg>/<hex>` of a layout, refusing digests that are not `alg:hex`.
pub(crate) fn blob_path(dir: &Path, digest: &str, desc: &str) -> Result<PathBuf> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| bad(desc, format!("malformed digest {digest:?}")))?;
    let ok = !alg.is_empty()
        && alg.bytes().all(|b| b.is_ascii_alphanumeric())
        && !hex.is_empty()
        && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(bad(desc, format!("malformed digest {digest:?}")));
    }
    Ok(dir.join("blobs").join(alg).join(hex))
}

fn is_index(d: &Descriptor, m: &Manifest) -> bool {
    d.media_type.contains("index")
        || d.media_type.contains("manifest.list")
        || (!m.manifests.is_empty() && m.config.is_none())
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// From an index, the manifest for this host's platform (or the only/first one).
pub(crate) fn pick_platform<'a>(list: &'a [Descriptor], desc: &str) -> Result<&'a Descriptor> {
    let matching = list.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
    });
    matching
        .or_else(|| list.iter().find(|d| d.platform.is_none()))
        .ok_or_else(|| bad(desc, format!("no manifest for linux/{}", host_arch())))
}

/// Import an OCI image layout folder. `tag` picks the manifest annotated with that ref name.
pub fn import_layout(
    store: &ImageStore,
    dir: &Path,
    tag: Option<&str>,
    desc: &str,
    p: &dyn Progress,
) -> Result<Built> {
    p.step(&format!("importing {desc}"));
    let index_path = dir.join("index.json");
    let index: Manifest = parse(
        &fs::read(&index_path).ctx("read OCI index (is this an OCI image layout?)", &index_path)?,
        "OCI index",
        &index_path,
    )?;
    let mut chosen = match tag {
        Some(t) => index
            .manifests
            .iter()
            .find(|d| {
                d.annotations
                    .get("org.opencontainers.image.ref.name")
                    .map(String::as_str)
                    == Some(t)
            })
            .ok_or_else(|| bad(desc, format!("no manifest tagged {t:?} in index.json")))?
            .clone(),
        None => index
            .manifests
            .first()
            .ok_or_else(|| bad(desc, "index.json lists no manifest"))?
            .clone(),
    };
    // Follow nested indexes (multi-platform images) down to one image manifest.
    for _ in 0..4 {
        let mp = blob_path(dir, &chosen.digest, desc)?;
        let m: Manifest = parse(
            &fs::read(&mp).ctx("read manifest blob", &mp)?,
            "OCI manifest",
            &mp,
        )?;
        if is_index(&chosen, &m) {
            chosen = pick_platform(&m.manifests, desc)?.clone();
            continue;
        }
        let cfg_desc = m
            .config
            .clone()
            .ok_or_else(|| bad(desc, "manifest has no config"))?;
        let cp = blob_path(dir, &cfg_desc.digest, desc)?;
        let cfg = fs::read(&cp).ctx("read config blob", &cp)?;
        let open = |d: &Descriptor| -> Result<Box<dyn Read>> {
            let bp = blob_path(dir, &d.digest, desc)?;
            Ok(Box::new(fs::File::open(&bp).ctx("open layer blob", &bp)?))
        };
        return import_manifest(store, &m.layers, &cfg, &cp, &open, desc, p);
    }
    Err(bad(desc, "indexes nested too deeply"))
}

/// Import layers (bottom first) given the image config blob; `open` reads a layer blob.
pub(crate) fn import_manifest(
    store: &ImageStore,
    layers: &[Descriptor],
    config_blob: &[u8],
    config_path: &Path,
    open: &dyn Fn(&Descriptor) -> Result<Box<dyn Read>>,
    desc: &str,
    p: &dyn Progress,
) -> Result<Built> {
    let cfg: ConfigFile = parse(config_blob, "image config", config_path)?;
    let diff_ids = cfg
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    let mut ids = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let expected = diff_ids.get(i);
        if let Some(d) = expected {
            if store.has_layer(d) {
                p.step(&format!(
                    "layer {}/{} {d}: already in the store",
                    i + 1,
                    layers.len()
                ));
                ids.push(d.clone());
                continue;
            }
        }
        p.step(&format!(
            "layer {}/{} {}: unpacking",
            i + 1,
            layers.len(),
            l.digest
        ));
        let id = import_tar_layer(store, open(l)?, desc)?;
        if let Some(d) = expected {
            if *d != id {
                return Err(ImageError::DigestMismatch {
                    source_desc: desc.to_string(),
                    expected: d.clone(),
                    actual: id,
                });
            }
        }
        ids.push(id);
    }
    if ids.is_empty() {
        return Err(bad(desc, "the image has no layers"));
    }
    let rc = cfg.config.unwrap_or_default();
    let mut env = rc.env.unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    Ok(Built {
        layers: ids,
        config: ImageConfig {
            entrypoint: rc.entrypoint.unwrap_or_default(),
            cmd: rc.cmd.unwrap_or_default(),
            env,
            workdir: rc.working_dir.filter(|w| !w.is_empty()),
            user: rc.user.filter(|u| !u.is_empty()),
            labels: rc.labels.unwrap_or_default(),
            stop_signal: rc.stop_signal,
            init: None,
        },
        source: desc.to_string(),
    })
}

/// Unpack a plain tar (an archive of a layout or of a docker save) into a staging folder.
fn extract_archive(store: &ImageStore, path: &Path, desc: &str) -> Result<crate::store::Staging> {
    let st = store.staging()?;
    let f = fs::File::open(path).ctx("open archive", path)?;
    crate::layer::unpack_tar(f, st.path(), crate::layer::WhiteoutMode::Flatten, desc)?;
    Ok(st)
}

/// Import an `oci-archive` tarball (an OCI image layout in a tar).
pub fn import_oci_archive(
    store: &ImageStore,
    path: &Path,
    desc: &str,
    p: &dyn Progress,
) -> Result<Built> {
    p.step(&format!("extracting {desc}"));
    let st = extract_archive(store, path, desc)?;
    import_layout(store, st.path(), None, desc, p)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

/// Import a `docker-archive` tarball (`manifest.json` + config + layer tars).
pub fn import_docker_archive(
    store: &ImageStore,
    path: &Path,
    desc: &str,
    p: &dyn Progress,
) -> Result<Built> {
    p.step(&format!("extracting {desc}"));
    let st = extract_archive(store, path, desc)?;
    let dir = st.path();
    let mp = dir.join("manifest.json");
    let entries: Vec<DockerManifestEntry> = parse(
        &fs::read(&mp).ctx("read manifest.json (is this a docker-archive?)", &mp)?,
        "docker-archive manifest",
        &mp,
    )?;
    let e = entries
        .first()
        .ok_or_else(|| bad(desc, "manifest.json lists no image"))?;
    let inside = |rel: &str| -> Result<PathBuf> {
        if rel.split('/').any(|c| c == "..") || rel.starts_with('/') {
            return Err(bad(desc, format!("path {rel:?} leaves the archive")));
        }
        Ok(dir.join(rel))
    };
    let cp = inside(&e.config)?;
    let cfg = fs::read(&cp).ctx("read image config", &cp)?;
    let layers: Vec<Descriptor> = e
        .layers
        .iter()
        .map(|l| Descriptor {
            media_type: String::new(),
            digest: l.clone(),
            size: None,
            platform: None,
            annotations: BTreeMap::new(),
        })
        .collect();
    let open = |d: &Descriptor| -> Result<Box<dyn Read>> {
        let lp = inside(&d.digest)?;
        Ok(Box::new(fs::File::open(&lp).ctx("open layer", &lp)?))
    };
    import_manifest(store, &layers, &cfg, &cp, &open, desc, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths_refuse_traversal() {
        let d = Path::new("/x");
        assert_eq!(
            blob_path(d, "sha256:ab12", "t").unwrap(),
            Path::new("/x/blobs/sha256/ab12")
        );
        assert!(blob_path(d, "sha256:../../etc", "t").is_err());
        assert!(blob_path(d, "nocolon", "t").is_err());
    }

    #[test]
    fn platform_pick_prefers_host_arch() {
        let mk = |arch: &str| Descriptor {
            media_type: String::new(),
            digest: format!("sha256:{arch}"),
            size: None,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
            }),
            annotations: BTreeMap::new(),
        };
        let list = vec![mk("s390x"), mk(host_arch())];
        assert_eq!(
            pick_platform(&list, "t").unwrap().digest,
            format!("sha256:{}", host_arch())
        );
    }
}
