//! Layer content: unpacking (optionally compressed) tar streams with OCI whiteouts into a folder,
//! and digests (of an uncompressed tar stream, or of a folder tree).
//!
//! Whiteouts are written in one of two ways ([`WhiteoutMode`]): as overlayfs markers, so a layer
//! folder can be stacked as an overlay lower dir, or applied (deleting), when layers are
//! flattened into one folder.

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{ImageError, IoContext, Result};

/// How OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) are written into the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// As overlayfs markers: a 0:0 character device for a deleted entry, the
    /// `trusted.overlay.opaque=y` xattr for an opaque directory. Needs root.
    Overlay,
    /// Applied to the destination: the named entry (or the directory's older content) is deleted.
    Flatten,
}

/// A reader that hashes what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// `sha256:<hex>` of everything read so far, and the byte count.
    pub fn finish(self) -> (String, u64) {
        (
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        )
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Wrap `r` in the decompressor its magic bytes call for (gzip, xz, zstd), or none.
pub fn decompress<'a, R: Read + 'a>(r: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(256 * 1024, r);
    let head = br.fill_buf()?.to_vec();
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(br))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Box::new(liblzma::read::XzDecoder::new_multi_decoder(br))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(br)?)
    } else {
        Box::new(br)
    })
}

fn is_root() -> bool {
    // Reading our own euid from /proc avoids unsafe here; root-only behaviour is an optimisation.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// An error with its causes, `a: b: c` (tar hides the io::Error in the source chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

/// The entry's PAX `SCHILY.xattr.*` attributes, minus overlayfs's (`trusted.overlay.*`,
/// `user.overlay.*`): those would let a layer forge whiteouts, redirects or opaque dirs.
fn entry_xattrs<R: Read>(e: &mut tar::Entry<'_, R>) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    if let Ok(Some(exts)) = e.pax_extensions() {
        for ext in exts.flatten() {
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                    continue;
                }
                v.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    v
}

/// Normalise a tar member path: drop `./` and leading `/`; refuse `..`.
fn clean(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Resolve `rel` (a directory inside `dest`) without leaving `dest`: symlinks in the layer must
/// not make a whiteout land on the host.
fn inside(dest: &Path, rel: &Path, what: &str) -> Result<PathBuf> {
    let p = dest.join(rel);
    fs::create_dir_all(&p).ctx("create directory", &p)?;
    let canon = fs::canonicalize(&p).ctx("resolve", &p)?;
    let root = fs::canonicalize(dest).ctx("resolve", dest)?;
    if !canon.starts_with(&root) {
        return Err(ImageError::BadSource {
            source_desc: what.to_string(),
            reason: format!("entry {} points outside the layer", rel.display()),
        });
    }
    Ok(canon)
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Unpack the tar stream `r` (compressed or not) into `dest`, handling whiteouts per `mode`.
/// Returns the digest (`sha256:<hex>`) of the uncompressed tar stream: the OCI diff id.
pub fn unpack_tar(r: impl Read, dest: &Path, mode: WhiteoutMode, what: &str) -> Result<String> {
    let bad = |e: io::Error| ImageError::BadSource {
        source_desc: what.to_string(),
        reason: format!("cannot read the tar stream: {e}"),
    };
    fs::create_dir_all(dest).ctx("create directory", dest)?;
    let hashing = HashingReader::new(decompress(r).map_err(bad)?);
    let mut ar = tar::Archive::new(hashing);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    // xattrs are applied below, filtered: a layer must not set overlayfs's own markers.
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    ar.set_preserve_ownerships(is_root());
    // Paths this layer wrote: Flatten-mode whiteouts only delete what older layers left.
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in ar.entries().map_err(bad)? {
        let mut e = entry.map_err(bad)?;
        let raw = e.path().map_err(bad)?.into_owned();
        let Some(rel) = clean(&raw) else { continue };
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == ".wh..wh..opq" {
            let dir = inside(dest, &parent, what)?;
            match mode {
                WhiteoutMode::Overlay => moat_host::mount::set_opaque(&dir)?,
                WhiteoutMode::Flatten => {
                    for child in fs::read_dir(&dir).ctx("read directory", &dir)? {
                        let child = child.ctx("read directory", &dir)?;
                        let crel = parent.join(child.file_name());
                        if !written.iter().any(|w| w.starts_with(&crel)) {
                            remove_any(&child.path()).ctx("remove", child.path())?;
                        }
                    }
                }
            }
            continue;
        }
        if let Some(target) = name.strip_prefix(".wh.") {
            let dir = inside(dest, &parent, what)?;
            let t = dir.join(target);
            remove_any(&t).ctx("remove", &t)?;
            if mode == WhiteoutMode::Overlay {
                moat_host::mount::make_whiteout(&t)?;
            }
            continue;
        }
        // A newer entry replaces an older one of another type (dir ↔ file).
        let full = dest.join(&rel);
        if let Ok(m) = fs::symlink_metadata(&full) {
            let is_dir_entry = e.header().entry_type().is_dir();
            if m.is_dir() != is_dir_entry || (m.is_dir() && m.file_type().is_symlink()) {
                remove_any(&full).ctx("remove", &full)?;
            }
        }
        let xattrs = entry_xattrs(&mut e);
        e.unpack_in(dest).map_err(|err| ImageError::BadSource {
            source_desc: what.to_string(),
            reason: format!("cannot unpack {}: {}", rel.display(), chain(&err)),
        })?;
        for (name, value) in xattrs {
            // Best effort, like tar: unprivileged runs cannot set trusted.* or security.*.
            let _ = moat_host::mount::set_xattr(&full, &name, &value);
        }
        written.insert(rel);
    }
    let mut hashing = ar.into_inner();
    io::copy(&mut hashing, &mut io::sink()).map_err(bad)?;
    Ok(hashing.finish().0)
}

/// Digest of a folder tree: every entry's path, type, mode, owner, and content (or link target,
/// or device number), in sorted order. mtimes are left out, so equal content gets one digest.
pub fn tree_digest(root: &Path) -> Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut size = 0u64;
    walk_sorted(root, Path::new(""), &mut |rel, full, m| {
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(format!("{:o} {} {} ", m.mode(), m.uid(), m.gid()).as_bytes());
        let ft = m.file_type();
        if ft.is_symlink() {
            let t = fs::read_link(full).ctx("read link", full)?;
            h.update(t.as_os_str().as_encoded_bytes());
        } else if ft.is_file() {
            let mut f = fs::File::open(full).ctx("open", full)?;
            let mut fh = Sha256::new();
            io::copy(&mut f, &mut fh).ctx("read", full)?;
            h.update(fh.finalize());
            size += m.len();
        } else if ft.is_char_device() || ft.is_block_device() {
            h.update(m.rdev().to_le_bytes());
        }
        h.update([0]);
        Ok(())
    })?;
    Ok((format!("sha256:{}", hex::encode(h.finalize())), size))
}

/// Total size of the regular files below `root` (what `du --apparent-size` would count).
pub fn tree_size(root: &Path) -> Result<u64> {
    let mut size = 0;
    walk_sorted(root, Path::new(""), &mut |_, _, m| {
        if m.is_file() {
            size += m.len();
        }
        Ok(())
    })?;
    Ok(size)
}

type Visit<'a> = dyn FnMut(&Path, &Path, &fs::Metadata) -> Result<()> + 'a;

fn walk_sorted(root: &Path, rel: &Path, f: &mut Visit<'_>) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .ctx("read directory", &dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .ctx("read directory", &dir)?;
    names.sort();
    for n in names {
        let r = rel.join(&n);
        let full = root.join(&r);
        let m = fs::symlink_metadata(&full).ctx("stat", &full)?;
        f(&r, &full, &m)?;
        if m.is_dir() {
            walk_sorted(root, &r, f)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    b.append_data(&mut h, path, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    h.set_cksum();
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn flatten_applies_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let l1 = tar_with(&[
            ("etc/", None),
            ("etc/keep", Some(b"k")),
            ("etc/gone", Some(b"g")),
            ("opq/", None),
            ("opq/old", Some(b"o")),
        ]);
        let l2 = tar_with(&[
            ("etc/.wh.gone", Some(b"")),
            ("opq/new", Some(b"n")),
            ("opq/.wh..wh..opq", Some(b"")),
        ]);
        unpack_tar(&l1[..], d.path(), WhiteoutMode::Flatten, "t").unwrap();
        let digest = unpack_tar(&l2[..], d.path(), WhiteoutMode::Flatten, "t").unwrap();
        assert_eq!(
            digest,
            format!("sha256:{}", hex::encode(Sha256::digest(&l2)))
        );
        assert!(d.path().join("etc/keep").exists());
        assert!(!d.path().join("etc/gone").exists());
        assert!(!d.path().join("opq/old").exists());
        assert!(d.path().join("opq/new").exists());
    }

    #[test]
    fn gzip_stream_is_detected_and_hashed_uncompressed() {
        let d = tempfile::tempdir().unwrap();
        let raw = tar_with(&[("a", Some(b"hello"))]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &raw).unwrap();
        let gz = gz.finish().unwrap();
        let digest = unpack_tar(&gz[..], d.path(), WhiteoutMode::Flatten, "t").unwrap();
        assert_eq!(
            digest,
            format!("sha256:{}", hex::encode(Sha256::digest(&raw)))
        );
        assert_eq!(fs::read(d.path().join("a")).unwrap(), b"hello");
    }

    #[test]
    fn parent_dir_entries_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        // append_data refuses `..`, so write the name into the header directly.
        h.as_gnu_mut().unwrap().name[..7].copy_from_slice(b"../evil");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let t = b.into_inner().unwrap();
        unpack_tar(&t[..], &d.path().join("x"), WhiteoutMode::Flatten, "t").unwrap();
        assert!(!d.path().join("evil").exists());
    }

    #[test]
    fn tree_digest_ignores_mtime_but_not_content() {
        let a = tempfile::tempdir().unwrap();
        fs::write(a.path().join("f"), b"1").unwrap();
        let (d1, s1) = tree_digest(a.path()).unwrap();
        assert_eq!(s1, 1);
        fs::write(a.path().join("f"), b"2").unwrap();
        let (d2, _) = tree_digest(a.path()).unwrap();
        assert_ne!(d1, d2);
    }
}
