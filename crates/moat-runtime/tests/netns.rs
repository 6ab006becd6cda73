//! Privileged test: a machine's persistent network namespace (and the user
//! namespace owning it) is made again over whatever a killed caller left at
//! its paths. `moat apply` killed between removing the two mounts of a pair
//! left the user namespace bound; the next create opened that nsfs file for
//! writing and failed with EPERM (found by the kill test in CI). Skips when
//! not root.

use moat_runtime::sys::{create_persistent_netns, is_ns_mount, remove_ns_mount};
use moat_runtime::IdRange;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Removes both namespace mounts (and files) on drop, also on failure.
struct Pair(PathBuf, PathBuf);
impl Drop for Pair {
    fn drop(&mut self) {
        let _ = remove_ns_mount(&self.0);
        let _ = remove_ns_mount(&self.1);
    }
}

fn ino(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").ino()
}

/// Binds namespace file `ns` of this process on `target` (a stale mount).
fn bind_own(ns: &str, target: &Path) {
    std::fs::write(target, b"").expect("touch");
    let ok = std::process::Command::new("mount")
        .arg("--bind")
        .arg(format!("/proc/self/ns/{ns}"))
        .arg(target)
        .status()
        .expect("mount")
        .success();
    assert!(ok, "bind {ns} on {}", target.display());
}

#[test]
fn stale_namespace_mounts_are_replaced() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: stale_namespace_mounts_are_replaced needs root");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("moat-netns-")
        .tempdir()
        .expect("tempdir");
    let pair = Pair(tmp.path().join("m"), tmp.path().join("m.user"));
    let (net, user) = (&pair.0, &pair.1);
    let range = IdRange {
        host_id: 3_900_000_000,
        size: 65536,
    };
    // The user namespace is still bound, the network namespace is not.
    bind_own("user", user);
    let stale = ino(user);
    create_persistent_netns(net, Some((user, range))).expect("over a stale user namespace");
    assert!(is_ns_mount(net) && is_ns_mount(user));
    assert_ne!(ino(user), stale, "the user namespace is a new one");
    assert_ne!(ino(net), ino(Path::new("/proc/self/ns/net")));

    // The network namespace is still bound, the user namespace is gone.
    remove_ns_mount(net).expect("unmount");
    remove_ns_mount(user).expect("unmount");
    bind_own("net", net);
    let stale = ino(net);
    create_persistent_netns(net, Some((user, range))).expect("over a stale network namespace");
    assert!(is_ns_mount(net) && is_ns_mount(user));
    assert_ne!(ino(net), stale, "the network namespace is a new one");

    remove_ns_mount(net).expect("unmount");
    remove_ns_mount(user).expect("unmount");
    assert!(!net.exists() && !user.exists());
}
