//! `moat image build | import | rm | gc` through a running daemon print and
//! exit as they do in-process (image ids masked: a rebuild may differ).
//! Needs /bin/busybox (offline busybox build); no root, no machines.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

fn moat(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run moat")
}

/// A running `moat daemon`, killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(root: &Path) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("--root")
        .arg(root)
        .arg("daemon")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn moat daemon");
    let out = child.stdout.take().expect("stdout");
    let d = Daemon(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("read");
    assert!(line.starts_with("listening on "), "{line:?}");
    d
}

/// Exit code and output with `sha256:<hex>` masked.
fn shown(o: &Output) -> (Option<i32>, String, String) {
    let mask = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        let mut out = String::new();
        let mut rest = s.as_ref();
        while let Some(i) = rest.find("sha256:") {
            out.push_str(&rest[..i + 7]);
            rest = rest[i + 7..].trim_start_matches(|c: char| c.is_ascii_hexdigit());
            out.push('#');
        }
        out.push_str(rest);
        out
    };
    (o.status.code(), mask(&o.stdout), mask(&o.stderr))
}

#[test]
fn image_commands_through_the_daemon() {
    if !Path::new("/bin/busybox").is_file() {
        eprintln!("SKIP: no /bin/busybox (install busybox-static)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let folder = dir.path().join("rootfs");
    std::fs::create_dir_all(folder.join("etc")).unwrap();
    std::fs::write(folder.join("etc/hello"), "hi\n").unwrap();
    let folder = folder.to_string_lossy().into_owned();
    let _d = start(&root);

    let same = |args: &[&str]| {
        let via = moat(&root, args);
        let mut a = vec!["--no-daemon"];
        a.extend_from_slice(args);
        let direct = moat(&root, &a);
        assert_eq!(
            shown(&via),
            shown(&direct),
            "moat {args:?}: daemon (left) vs in-process (right)"
        );
        via
    };
    let o = same(&["image", "build", "busybox", "--name", "bb"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("==> building busybox"));
    same(&["image", "import", &folder, "--name", "lab/f"]);
    same(&[
        "image", "import", &folder, "--name", "f2", "--kind", "folder",
    ]);
    // Removal through the daemon (a slash in the name), then in-process.
    let o = moat(&root, &["image", "rm", "lab/f"]);
    assert!(o.status.success(), "{o:?}");
    let o = moat(&root, &["--no-daemon", "image", "rm", "f2"]);
    assert!(o.status.success(), "{o:?}");
    // gc through the daemon frees the folder's layer; in-process then finds nothing.
    let o = moat(&root, &["image", "gc"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("removed 1 unused layers"), "{err}");
    same(&["image", "gc"]);
    // The daemon answered: its not-found message is the store's (with the
    // exit code of the in-process one).
    let o = moat(&root, &["image", "rm", "nope"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no image named \"nope\""),
        "{o:?}"
    );
    let ls = moat(&root, &["image", "ls"]);
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.contains("bb ") && !ls.contains("lab/f"), "{ls}");
}
