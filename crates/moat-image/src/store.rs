//! The content-addressed store: layers (unpacked folders named by digest), images (manifests
//! naming an ordered list of layers plus a run config), and garbage collection.
//!
//! ```text
//! <root>/images/
//!   .lock                       flock'd by every mutation (commit, remove, gc, machine changes)
//!   layers/<kind>-<hex>/        one read-only layer tree (kind: sha256 = content digest,
//!                               frozen = a machine's former writable layer)
//!   layers/<kind>-<hex>.json    LayerInfo
//!   manifests/<name>.json       Image (name escaped: `/` and `:` become %2F, %3A)
//!   tmp/                        staging for builds; moved into layers/ on commit
//! <root>/machines/<machine>/fs/ see crate::machine
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use moat_core::model::ImageSource;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ImageError, IoContext, Result};
use crate::progress::Progress;

/// What a container started from this image runs, and how (the OCI image config subset moat uses).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, as in OCI.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// The image's init (PID 1 of a system container), when it has one: `/sbin/init`.
    #[serde(default)]
    pub init: Option<String>,
}

/// An image in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The name it is known by (`busybox`, `debian/bookworm`, `oci:host/repo:tag`, ...).
    pub name: String,
    /// `sha256:<hex>` of the layer list and config: equal ids, equal images.
    pub id: String,
    /// Layer ids, bottom-most first.
    pub layers: Vec<String>,
    pub config: ImageConfig,
    /// Where it came from, for humans (`busybox from /bin/busybox`, `oci-archive /x.tar`).
    pub source: String,
    /// Unix seconds.
    pub created: u64,
    /// Sum of the layers' regular-file sizes, bytes.
    pub size: u64,
}

/// A layer's metadata, next to its folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub id: String,
    pub size: u64,
    pub created: u64,
    /// What produced it (`tar`, `tree`, `frozen upper of web`).
    pub origin: String,
}

/// What [`ImageStore::gc`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub removed_layers: Vec<String>,
    pub freed_bytes: u64,
    pub kept_layers: usize,
}

/// The image store rooted at `<root>` (its files live in `<root>/images`).
#[derive(Clone, Debug)]
pub struct ImageStore {
    root: PathBuf,
    dir: PathBuf,
}

/// Held while the store is being changed; released on drop.
pub(crate) struct StoreLock(#[allow(dead_code)] fs::File);

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random hex token (for staging and frozen-layer names), from /dev/urandom.
pub(crate) fn random_hex() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    let mut h = Sha256::new();
    h.update(b);
    h.update(std::process::id().to_le_bytes());
    h.update(format!("{:?}", SystemTime::now()).as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Whether process `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Write `value` as JSON to `path` atomically (temp file + rename).
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_json_with(path, value, true)
}

/// [`write_json`]; without `durable` the file is not fsync'd (still replaced atomically).
pub(crate) fn write_json_with<T: Serialize>(path: &Path, value: &T, durable: bool) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", random_hex()));
    let data = serde_json::to_vec_pretty(value).map_err(|source| ImageError::Json {
        what: "store metadata",
        path: path.to_path_buf(),
        source,
    })?;
    let mut f = fs::File::create(&tmp).ctx("create", &tmp)?;
    f.write_all(&data).ctx("write", &tmp)?;
    if durable {
        f.sync_all().ctx("sync", &tmp)?;
    }
    fs::rename(&tmp, path).ctx("rename into place", path)?;
    Ok(())
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    what: &'static str,
) -> Result<T> {
    let data = fs::read(path).ctx("read", path)?;
    serde_json::from_slice(&data).map_err(|source| ImageError::Json {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Escape an image name into one file name: keep `[A-Za-z0-9._-]`, `%XX` the rest.
pub fn escape_name(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn check_name(what: &'static str, name: &str) -> Result<()> {
    let bad = |reason| {
        Err(ImageError::InvalidName {
            what,
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 200 {
        return bad("it is longer than 200 characters");
    }
    if name.starts_with('.') {
        return bad("it starts with a dot");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("it contains control characters");
    }
    Ok(())
}

/// Machine and snapshot names become folder names: be strict.
pub(crate) fn check_simple_name(what: &'static str, name: &str) -> Result<()> {
    check_name(what, name)?;
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ImageError::InvalidName {
            what,
            name: name.to_string(),
            reason: "only letters, digits, '.', '_' and '-' are allowed",
        });
    }
    Ok(())
}

/// A layer id (`sha256:<hex>`, `frozen:<hex>`) as a folder name.
pub(crate) fn layer_dir_name(id: &str) -> String {
    id.replace(':', "-")
}

/// A description of a source, for humans and error messages.
pub fn describe_source(src: &ImageSource) -> String {
    match src {
        ImageSource::Busybox => "busybox (host busybox-static)".into(),
        ImageSource::Debian { suite, packages } if packages.is_empty() => {
            format!("debian/{suite} (mmdebstrap)")
        }
        ImageSource::Debian { suite, packages } => {
            format!("debian/{suite} + {} (mmdebstrap)", packages.join(","))
        }
        ImageSource::Ubuntu { suite, packages } if packages.is_empty() => {
            format!("ubuntu/{suite} (mmdebstrap)")
        }
        ImageSource::Ubuntu { suite, packages } => {
            format!("ubuntu/{suite} + {} (mmdebstrap)", packages.join(","))
        }
        ImageSource::Tarball { path } => format!("tarball {path}"),
        ImageSource::Folder { path } => format!("folder {path}"),
        ImageSource::OciLayout { path } => format!("oci layout {path}"),
        ImageSource::OciArchive { path } => format!("oci-archive {path}"),
        ImageSource::DockerArchive { path } => format!("docker-archive {path}"),
        ImageSource::Oci { reference } => format!("oci:{reference}"),
        ImageSource::CloudImage { path } => format!("cloud image {path}"),
    }
}

/// A layer being prepared in `tmp/`; removed on drop unless committed.
pub struct Staging {
    pub(crate) path: PathBuf,
}

impl Staging {
    /// The folder to fill.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.path.exists() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

impl ImageStore {
    /// Open (creating its folders if needed) the store under `<root>/images`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let dir = root.join("images");
        for d in ["layers", "manifests", "tmp"] {
            let p = dir.join(d);
            fs::create_dir_all(&p).ctx("create store folder", &p)?;
        }
        fs::create_dir_all(root.join("machines"))
            .ctx("create store folder", root.join("machines"))?;
        Ok(ImageStore { root, dir })
    }

    /// The root the store was opened with.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/images`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn machines_dir(&self) -> PathBuf {
        self.root.join("machines")
    }

    pub(crate) fn lock(&self) -> Result<StoreLock> {
        let p = self.dir.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .ctx("open lock", &p)?;
        f.lock().ctx("lock", &p)?;
        Ok(StoreLock(f))
    }

    /// The folder of layer `id`.
    pub fn layer_path(&self, id: &str) -> PathBuf {
        self.dir.join("layers").join(layer_dir_name(id))
    }

    /// A short path to layer `id` for overlayfs options (`images/l/<12 hex>` symlink, made on
    /// first use): mount options must fit in one page, and full layer paths would allow only
    /// ~40 layers.
    pub fn short_layer_path(&self, id: &str) -> Result<PathBuf> {
        let short = &hex::encode(Sha256::digest(id.as_bytes()))[..12];
        let dir = self.dir.join("l");
        let link = dir.join(short);
        if fs::symlink_metadata(&link).is_err() {
            fs::create_dir_all(&dir).ctx("create directory", &dir)?;
            let target = Path::new("../layers").join(layer_dir_name(id));
            match std::os::unix::fs::symlink(&target, &link) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).ctx("symlink", &link),
            }
        }
        Ok(link)
    }

    /// Whether layer `id` is in the store.
    pub fn has_layer(&self, id: &str) -> bool {
        self.dir
            .join("layers")
            .join(format!("{}.json", layer_dir_name(id)))
            .exists()
    }

    /// Metadata of layer `id`.
    pub fn layer_info(&self, id: &str) -> Result<LayerInfo> {
        read_json(
            &self
                .dir
                .join("layers")
                .join(format!("{}.json", layer_dir_name(id))),
            "layer metadata",
        )
    }

    /// Every layer in the store.
    pub fn layers(&self) -> Result<Vec<LayerInfo>> {
        let d = self.dir.join("layers");
        let mut v = Vec::new();
        for e in fs::read_dir(&d).ctx("read directory", &d)? {
            let p = e.ctx("read directory", &d)?.path();
            if p.extension().is_some_and(|x| x == "json") {
                v.push(read_json(&p, "layer metadata")?);
            }
        }
        v.sort_by(|a: &LayerInfo, b| a.id.cmp(&b.id));
        Ok(v)
    }

    /// A fresh, empty staging folder for a layer, named `<pid>-<random>` so
    /// that folders of builds whose process died (killed mid-build) can be
    /// told apart and removed, here and by `gc`.
    pub fn staging(&self) -> Result<Staging> {
        self.remove_dead_staging();
        let p = self
            .dir
            .join("tmp")
            .join(format!("{}-{}", std::process::id(), random_hex()));
        fs::create_dir_all(&p).ctx("create staging folder", &p)?;
        Ok(Staging { path: p })
    }

    /// Remove the staging folders of builders that are no longer running.
    fn remove_dead_staging(&self) {
        let Ok(rd) = fs::read_dir(self.dir.join("tmp")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .split_once('-')
                .and_then(|(p, _)| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !process_alive(p)) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Move a filled staging folder into the store as layer `id` (a no-op when that layer exists).
    pub(crate) fn commit_layer(&self, staging: Staging, id: &str, origin: &str) -> Result<()> {
        let _l = self.lock()?;
        if self.has_layer(id) {
            return Ok(());
        }
        let size = crate::layer::tree_size(&staging.path)?;
        self.install_layer_dir(&staging.path, id, origin, size)?;
        Ok(())
    }

    /// Rename `from` into `layers/` as `id` and write its metadata. Caller holds the lock.
    pub(crate) fn install_layer_dir(
        &self,
        from: &Path,
        id: &str,
        origin: &str,
        size: u64,
    ) -> Result<()> {
        let dest = self.layer_path(id);
        if dest.exists() {
            // A leftover of an interrupted commit (folder without metadata).
            fs::remove_dir_all(&dest).ctx("remove stale layer", &dest)?;
        }
        fs::rename(from, &dest).ctx("move layer into the store", &dest)?;
        let info = LayerInfo {
            id: id.to_string(),
            size,
            created: now(),
            origin: origin.to_string(),
        };
        write_json(
            &self
                .dir
                .join("layers")
                .join(format!("{}.json", layer_dir_name(id))),
            &info,
        )
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.dir
            .join("manifests")
            .join(format!("{}.json", escape_name(name)))
    }

    /// Every image, by name.
    pub fn list(&self) -> Result<Vec<Image>> {
        let d = self.dir.join("manifests");
        let mut v = Vec::new();
        for e in fs::read_dir(&d).ctx("read directory", &d)? {
            let p = e.ctx("read directory", &d)?.path();
            if p.extension().is_some_and(|x| x == "json") {
                v.push(read_json::<Image>(&p, "image manifest")?);
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The image called `name`, if any.
    pub fn get(&self, name: &str) -> Result<Option<Image>> {
        let p = self.manifest_path(name);
        if !p.exists() {
            return Ok(None);
        }
        read_json(&p, "image manifest").map(Some)
    }

    /// The image called `name`, building or importing it from `source` when it is missing.
    pub fn ensure(
        &self,
        name: &str,
        source: &ImageSource,
        progress: &dyn Progress,
    ) -> Result<Image> {
        if let Some(img) = self.get(name)? {
            if img.layers.iter().all(|l| self.has_layer(l)) {
                return Ok(img);
            }
        }
        self.build(name, source, progress)
    }

    /// Build (`busybox`, `debian/…`, `ubuntu/…`) or import (everything else) `source` as image
    /// `name`, replacing an image of that name. Layers already in the store are reused.
    pub fn build(
        &self,
        name: &str,
        source: &ImageSource,
        progress: &dyn Progress,
    ) -> Result<Image> {
        check_name("image", name)?;
        let built = crate::sources::produce(self, source, progress)?;
        self.commit_image(name, built)
    }

    /// Same as [`ImageStore::build`]; the name reads better for archives and folders.
    pub fn import(
        &self,
        name: &str,
        source: &ImageSource,
        progress: &dyn Progress,
    ) -> Result<Image> {
        self.build(name, source, progress)
    }

    pub(crate) fn commit_image(&self, name: &str, built: crate::sources::Built) -> Result<Image> {
        let _l = self.lock()?;
        let mut size = 0;
        for l in &built.layers {
            // gc may have run between the layer's commit and now.
            let info = self.layer_info(l).map_err(|_| ImageError::BadSource {
                source_desc: built.source.clone(),
                reason: format!(
                    "layer {l} vanished during the build (a concurrent gc?); build again"
                ),
            })?;
            size += info.size;
        }
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&(&built.layers, &built.config)).unwrap_or_default());
        let img = Image {
            name: name.to_string(),
            id: format!("sha256:{}", hex::encode(h.finalize())),
            layers: built.layers,
            config: built.config,
            source: built.source,
            created: now(),
            size,
        };
        write_json(&self.manifest_path(name), &img)?;
        Ok(img)
    }

    /// Forget image `name`. Its layers stay until [`ImageStore::gc`] (machines may use them).
    pub fn remove(&self, name: &str) -> Result<()> {
        let _l = self.lock()?;
        let p = self.manifest_path(name);
        if !p.exists() {
            return Err(ImageError::NoSuchImage(name.to_string()));
        }
        fs::remove_file(&p).ctx("remove", &p)
    }

    /// Layers referenced by an image, a machine's rootfs or a machine's snapshot.
    pub fn referenced_layers(&self) -> Result<BTreeSet<String>> {
        let mut set: BTreeSet<String> = BTreeSet::new();
        for img in self.list()? {
            set.extend(img.layers);
        }
        set.extend(crate::machine::machine_layer_refs(self)?);
        Ok(set)
    }

    /// Remove every layer no image, machine or snapshot references, and stale staging folders.
    pub fn gc(&self) -> Result<GcReport> {
        let _l = self.lock()?;
        let keep = self.referenced_layers()?;
        let mut report = GcReport::default();
        for info in self.layers()? {
            if keep.contains(&info.id) {
                report.kept_layers += 1;
                continue;
            }
            let dir = self.layer_path(&info.id);
            if dir.exists() {
                fs::remove_dir_all(&dir).ctx("remove layer", &dir)?;
            }
            let meta = self
                .dir
                .join("layers")
                .join(format!("{}.json", layer_dir_name(&info.id)));
            fs::remove_file(&meta).ctx("remove", &meta)?;
            report.freed_bytes += info.size;
            report.removed_layers.push(info.id);
        }
        // Short links whose layer is gone.
        if let Ok(rd) = fs::read_dir(self.dir.join("l")) {
            for e in rd.flatten() {
                if fs::metadata(e.path()).is_err() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        if crate::btrfs::base_dir(self).exists() {
            let mut live: Vec<String> = self.list()?.into_iter().map(|i| i.id).collect();
            live.extend(crate::machine::machine_image_ids(self)?);
            crate::btrfs::gc_bases(self, &live)?;
        }
        // Staging folders of builders that died, and any older than a day.
        self.remove_dead_staging();
        let tmp = self.dir.join("tmp");
        for e in fs::read_dir(&tmp).ctx("read directory", &tmp)?.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 86_400);
            if old {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_to_one_file_name() {
        assert_eq!(escape_name("debian/bookworm"), "debian%2Fbookworm");
        assert_eq!(escape_name("oci:h:5000/a:b"), "oci%3Ah%3A5000%2Fa%3Ab");
        assert!(check_simple_name("machine", "../x").is_err());
        assert!(check_simple_name("machine", "web-1").is_ok());
    }

    #[test]
    fn store_lists_images_and_gc_keeps_referenced_layers() {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::open(d.path()).unwrap();
        for id in ["sha256:aa", "sha256:bb"] {
            let st = s.staging().unwrap();
            fs::write(st.path().join("f"), id).unwrap();
            s.commit_layer(st, id, "test").unwrap();
        }
        let built = crate::sources::Built {
            layers: vec!["sha256:aa".into()],
            config: ImageConfig::default(),
            source: "test".into(),
        };
        let img = s.commit_image("a/b", built).unwrap();
        assert_eq!(s.get("a/b").unwrap().unwrap(), img);
        assert_eq!(s.list().unwrap().len(), 1);
        let r = s.gc().unwrap();
        assert_eq!(r.removed_layers, vec!["sha256:bb".to_string()]);
        assert!(s.has_layer("sha256:aa"));
        s.remove("a/b").unwrap();
        assert_eq!(
            s.gc().unwrap().removed_layers,
            vec!["sha256:aa".to_string()]
        );
        assert!(s.layers().unwrap().is_empty());
    }

    #[test]
    fn staging_of_a_dead_builder_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::open(d.path()).unwrap();
        let tmp = d.path().join("images").join("tmp");
        // A build killed mid-way (no such pid) and one of this process.
        fs::create_dir_all(tmp.join("999999999-dead")).unwrap();
        let live = s.staging().unwrap();
        assert!(!tmp.join("999999999-dead").exists());
        let again = s.staging().unwrap();
        assert!(live.path().exists() && again.path().exists());
        fs::create_dir_all(tmp.join("999999999-dead")).unwrap();
        s.gc().unwrap();
        assert!(!tmp.join("999999999-dead").exists());
        assert!(live.path().exists());
    }
}
