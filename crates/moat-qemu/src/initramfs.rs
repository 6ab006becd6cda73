//! The microVM initramfs: a newc cpio holding `moat-init` as `/init`, the
//! kernel modules a microVM needs (`/moat/modules/*.ko` plus
//! `/moat/modules.order`, dependencies first) and the machine's
//! `/moat/config.json`.
//!
//! The modules come from the kernel's `lib/modules/<version>` tree; their
//! dependencies are read from each `.ko`'s `.modinfo` (`depends=`), since
//! the host has no depmod output for a fetched kernel. ext4's checksum
//! (`crc32c_generic`) is not declared as a dependency, so it is a root too.

use crate::QemuError;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules a microVM needs (those the kernel has built in are skipped).
pub const ROOT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "crc32c_generic",
    "ext4",
];

/// Writes a newc cpio archive.
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Cpio::new()
    }
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = name.trim_start_matches('/');
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.buf.extend_from_slice(hdr.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data, (0, 0));
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

/// Module name as the kernel knows it (`-` and `_` are the same).
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// All `.ko`/`.ko.xz` files under `dir`, by module name.
fn index_modules(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                let base = n.strip_suffix(".ko").or_else(|| n.strip_suffix(".ko.xz"));
                if let Some(b) = base {
                    out.insert(norm(b), p.clone());
                }
            }
        }
    }
    out
}

/// `depends=` of a module's `.modinfo` section.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    let pat = b"depends=";
    let mut i = 0;
    while let Some(pos) = ko[i..].windows(pat.len()).position(|w| w == pat) {
        let start = i + pos;
        // A .modinfo entry begins after a NUL.
        if start == 0 || ko[start - 1] == 0 {
            let rest = &ko[start + pat.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            return String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(norm)
                .collect();
        }
        i = start + 1;
    }
    vec![]
}

fn read_module(p: &Path) -> Result<Vec<u8>, QemuError> {
    if p.extension().is_some_and(|e| e == "xz") {
        let out = std::process::Command::new("xz")
            .arg("-dc")
            .arg(p)
            .output()
            .map_err(QemuError::io(format!("decompressing {}", p.display())))?;
        if !out.status.success() {
            return Err(QemuError::Failed(format!(
                "decompressing {}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        return Ok(out.stdout);
    }
    std::fs::read(p).map_err(QemuError::io(format!("reading {}", p.display())))
}

/// The modules to load, dependencies first: (name, contents).
pub fn resolve_modules(
    modules_dir: &Path,
    roots: &[&str],
) -> Result<Vec<(String, Vec<u8>)>, QemuError> {
    let index = index_modules(modules_dir);
    let mut done = BTreeSet::new();
    let mut out = vec![];
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), QemuError> {
        if !done.insert(name.to_string()) {
            return Ok(());
        }
        // Not a module file: built into the kernel.
        let Some(path) = index.get(name) else {
            return Ok(());
        };
        let data = read_module(path)?;
        for dep in module_depends(&data) {
            visit(&dep, index, done, out)?;
        }
        out.push((name.to_string(), data));
        Ok(())
    }
    for r in roots {
        visit(&norm(r), &index, &mut done, &mut out)?;
    }
    Ok(out)
}

/// The part of the initramfs shared by every machine of one kernel: init and
/// modules (no trailer; [`with_config`] appends the machine's part).
pub fn base(init: &Path, modules_dir: Option<&Path>) -> Result<Vec<u8>, QemuError> {
    let init_bin = std::fs::read(init).map_err(QemuError::io(format!(
        "reading {} (build it: cargo build -p moat-init)",
        init.display()
    )))?;
    let mut c = Cpio::new();
    for d in ["dev", "proc", "sys", "root", "tmp", "moat", "moat/modules"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.char_dev("dev/null", 1, 3);
    c.file("init", 0o755, &init_bin);
    // A dynamically linked moat-init (a plain `cargo build`) brings its libraries.
    let mut dirs = BTreeSet::new();
    for lib in shared_libs(init) {
        if let Ok(data) = std::fs::read(&lib) {
            let mut parts = vec![];
            for a in lib.parent().into_iter().flat_map(|p| p.ancestors()) {
                if a != Path::new("/") {
                    parts.push(a.to_path_buf());
                }
            }
            for d in parts.into_iter().rev() {
                if dirs.insert(d.clone()) {
                    c.dir(&d.to_string_lossy());
                }
            }
            c.file(&lib.to_string_lossy(), 0o755, &data);
        }
    }
    let mut order = String::new();
    if let Some(dir) = modules_dir {
        for (name, data) in resolve_modules(dir, ROOT_MODULES)? {
            c.file(&format!("moat/modules/{name}.ko"), 0o644, &data);
            order.push_str(&format!("{name}.ko\n"));
        }
    }
    c.file("moat/modules.order", 0o644, order.as_bytes());
    Ok(c.finish())
}

/// Shared libraries a program needs (empty for a static one), from `ldd`.
fn shared_libs(prog: &Path) -> Vec<PathBuf> {
    let Ok(out) = std::process::Command::new("ldd").arg(prog).output() else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.split(" (").next()?.trim();
            let p = l.rsplit("=> ").next()?.trim();
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect()
}

/// A complete initramfs: the shared base followed by a second archive with
/// the machine's config (the kernel unpacks concatenated archives in order).
pub fn with_config(base: &[u8], config_json: &[u8]) -> Vec<u8> {
    let mut c = Cpio::new();
    c.file("moat/config.json", 0o644, config_json);
    let mut out = base.to_vec();
    out.extend_from_slice(&c.finish());
    out
}

/// Where the `moat-init` binary is: `$MOAT_INIT`, else next to the running
/// program (or one folder up, for test binaries in `target/*/deps`).
pub fn find_init() -> Result<PathBuf, QemuError> {
    if let Some(p) = std::env::var_os("MOAT_INIT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(QemuError::io("locating the running program"))?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        if let Some(d) = dir {
            let p = d.join("moat-init");
            if p.is_file() {
                return Ok(p);
            }
            dir = d.parent();
        }
    }
    Err(QemuError::Failed(
        "moat-init is not installed next to moat; build it (cargo build -p moat-init) or set MOAT_INIT"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_from_modinfo() {
        let ko = b"\x7fELF....\0license=GPL\0depends=jbd2,mbcache,crc16\0name=ext4\0";
        assert_eq!(module_depends(ko), ["jbd2", "mbcache", "crc16"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
    }

    #[test]
    fn cpio_is_aligned_and_terminated() {
        let mut c = Cpio::new();
        c.file("init", 0o755, b"abc");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
