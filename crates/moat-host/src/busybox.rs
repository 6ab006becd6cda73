//! The applet links of a static busybox root file system.

use std::io;
use std::path::Path;
use std::process::Command;

/// Links every applet of `busybox` into `root` as a symlink to
/// `/bin/busybox`, where `busybox --list-full` puts it (`bin/ls`, `sbin/ip`,
/// `usr/bin/awk`, ...), or all in the folder `flat` when given (as
/// `busybox --install -s /bin` does). The list comes from running `busybox`
/// itself, the host's binary: running a copy just written into `root` can
/// fail with ETXTBSY while a concurrent fork still holds its write
/// descriptor. Existing files are kept. Returns the number of links made.
pub fn link_applets(busybox: &Path, root: &Path, flat: Option<&str>) -> io::Result<usize> {
    let out = Command::new(busybox).arg("--list-full").output()?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(io::Error::other(format!(
            "{} --list-full printed no applets ({})",
            busybox.display(),
            out.status
        )));
    }
    let mut made = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let rel = line.trim().trim_start_matches('/');
        if rel.is_empty() || rel == "bin/busybox" || rel.contains("..") {
            continue;
        }
        let link = match flat {
            Some(dir) => match Path::new(rel).file_name() {
                Some(name) => root.join(dir).join(name),
                None => continue,
            },
            None => root.join(rel),
        };
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)?;
        made += 1;
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_applets_where_busybox_lists_them_or_flat() {
        let bb = Path::new("/bin/busybox");
        if !bb.exists() {
            eprintln!("SKIP: /bin/busybox missing (busybox-static)");
            return;
        }
        let full = tempfile::tempdir().expect("tempdir");
        let n = link_applets(bb, full.path(), None).expect("links");
        assert!(n > 100, "{n} links");
        let sh = full.path().join("bin/sh");
        assert_eq!(
            std::fs::read_link(&sh).expect("bin/sh"),
            Path::new("/bin/busybox")
        );
        assert!(full.path().join("sbin").is_dir() || full.path().join("usr/bin").is_dir());
        // Again: everything exists, nothing is made.
        assert_eq!(link_applets(bb, full.path(), None).expect("again"), 0);

        let flat = tempfile::tempdir().expect("tempdir");
        assert!(link_applets(bb, flat.path(), Some("bin")).expect("flat") > 100);
        let dirs: Vec<_> = std::fs::read_dir(flat.path())
            .expect("root")
            .flatten()
            .collect();
        assert_eq!(dirs.len(), 1, "only bin/");
        assert!(flat.path().join("bin/sh").symlink_metadata().is_ok());
    }
}
