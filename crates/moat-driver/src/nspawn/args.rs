//! The systemd-nspawn command line for one machine, as a pure function of
//! what the driver decided (no host access), so it is unit-tested.
//!
//! Settings follow systemd's `.nspawn` files: a machine's `config:` may carry
//! `nspawn.ReadOnly`, `nspawn.Capability`, `nspawn.DropCapability` and
//! `nspawn.PrivateUsers` (see docs/nspawn.md).

use moat_core::model::{Machine, NetworkMode};
use std::path::{Path, PathBuf};

/// /proc entries the built-in runtime masks (moat-runtime's profile). nspawn
/// 252 cannot mount over /proc before it exists, so moat binds /dev/null over
/// them itself once the container runs ([`super::mask`]).
pub const MASKED_PROC: &[&str] = &[
    "/proc/kallsyms",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/sched_debug",
];

/// Size of a machine's uid/gid range.
pub const IDS_PER_MACHINE: u32 = 65536;
/// First host id of the nspawn driver's ranges: a band of its own, far above
/// the native driver's (1 000 000 + n·65536), so the two never share ids.
pub const ID_BASE: u32 = 0x4000_0000;

/// Host uid/gid that root of nspawn machine number `n` maps to.
pub fn id_base_for(n: u32) -> u32 {
    ID_BASE + n * IDS_PER_MACHINE
}

/// How nspawn is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Supervision {
    /// Under moat-supervisor, no machined (this host): `--register=no --keep-unit`.
    Moat,
    /// As a transient unit of the host's systemd, registered with machined.
    Systemd,
}

/// Everything decided before building the command line.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    pub machine: &'a Machine,
    pub rootfs: &'a Path,
    /// Boot the image's init (`-b`) instead of running a command.
    pub boot: bool,
    /// The command (application containers); ignored with `boot`.
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// Host id root maps to (`None`: no user namespace, privileged only).
    pub id_base: Option<u32>,
    /// moat shifts the root's ownership itself (overlayfs roots, which
    /// nspawn 252 cannot idmap): nspawn must then neither idmap nor chown.
    pub moat_shifts: bool,
    pub supervision: Supervision,
}

/// A `config:` value under `nspawn.<key>`.
fn setting<'a>(m: &'a Machine, key: &str) -> Option<&'a str> {
    m.config.get(&format!("nspawn.{key}")).map(|s| s.trim())
}

fn yes(v: &str) -> bool {
    matches!(v, "yes" | "true" | "1" | "on")
}

/// Is the machine's root read-only (`config: {nspawn.ReadOnly: "yes"}`)?
pub fn read_only(m: &Machine) -> bool {
    setting(m, "ReadOnly").is_some_and(yes)
}

/// Does the machine want no user namespace (`nspawn.PrivateUsers: "no"`)?
/// Only honoured for privileged machines; the driver refuses it otherwise.
pub fn wants_no_userns(m: &Machine) -> bool {
    m.privileged || setting(m, "PrivateUsers").is_some_and(|v| matches!(v, "no" | "false" | "0"))
}

/// The `systemd-nspawn` argv (program first).
pub fn nspawn_argv(nspawn: &Path, p: &Plan) -> Vec<String> {
    let m = p.machine;
    let mut a: Vec<String> = vec![nspawn.display().to_string(), "--quiet".into()];
    match p.supervision {
        Supervision::Moat => a.extend(["--register=no".into(), "--keep-unit".into()]),
        Supervision::Systemd => a.extend(["--register=yes".into(), "--keep-unit".into()]),
    }
    a.push(format!("--directory={}", p.rootfs.display()));
    a.push(format!("--machine={}", m.full_name));
    a.push(format!("--hostname={}", m.name));
    match p.id_base {
        Some(base) => {
            a.push(format!("--private-users={base}:{IDS_PER_MACHINE}"));
            if p.moat_shifts {
                a.push("--private-users-ownership=off".into());
            } else {
                // An idmapped mount when the file system allows it, else a
                // chown of the tree (once: nspawn sees the shifted owner).
                a.push("--private-users-ownership=auto".into());
            }
        }
        None => a.push("--private-users=no".into()),
    }
    if m.privileged {
        a.push("--capability=all".into());
    }
    if let Some(c) = setting(m, "Capability") {
        a.push(format!("--capability={c}"));
    }
    if let Some(c) = setting(m, "DropCapability") {
        a.push(format!("--drop-capability={c}"));
    }
    if read_only(m) {
        a.push("--read-only".into());
    }
    // /etc/hosts, resolv.conf and the clock are written by moat into the
    // root; nspawn must not replace them with the host's, nor keep a journal
    // link into the host's /var/log.
    a.extend([
        "--resolv-conf=off".into(),
        "--timezone=off".into(),
        "--link-journal=no".into(),
        "--console=pipe".into(),
    ]);
    match m.network {
        // Domain: nspawn runs inside the network namespace moat prepared
        // (nspawn 252 cannot join one with --network-namespace-path= when
        // it also creates a user namespace), so it is told nothing here.
        NetworkMode::Domain | NetworkMode::Host => {}
        NetworkMode::None => a.push("--private-network".into()),
    }
    for mnt in &m.mounts {
        let flag = if mnt.readonly { "--bind-ro" } else { "--bind" };
        a.push(format!(
            "{flag}={}:{}",
            escape(&mnt.source),
            escape(&mnt.target)
        ));
    }
    for e in &p.env {
        a.push(format!("--setenv={e}"));
    }
    if p.boot {
        a.push("--boot".into());
    } else {
        if let Some(w) = &p.workdir {
            a.push(format!("--chdir={w}"));
        }
        // A command (not an init) as PID 1 would ignore SIGTERM: a stop asks
        // it with SIGTERM anyway (nspawn forwards this), then kills.
        a.push("--kill-signal=SIGTERM".into());
        a.push("--".into());
        a.extend(p.command.iter().cloned());
    }
    a
}

/// `--bind` separates source and target with ':'; a ':' in a path is `\:`.
fn escape(p: &str) -> String {
    p.replace(':', "\\:")
}

/// The `systemd-run` argv that wraps nspawn into a transient service on a
/// systemd host: limits as unit properties, cgroup delegated to nspawn.
pub fn systemd_run_argv(unit: &str, m: &Machine, nspawn: Vec<String>) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "systemd-run".into(),
        format!("--unit={unit}"),
        "--service-type=notify".into(),
        "--property=Delegate=yes".into(),
        "--property=KillMode=mixed".into(),
        "--property=Slice=machine.slice".into(),
    ];
    if let Some(mem) = m.memory {
        a.push(format!("--property=MemoryMax={mem}"));
    }
    if let Some(p) = m.pids {
        a.push(format!("--property=TasksMax={p}"));
    }
    if let Some(c) = m.cpus {
        a.push(format!("--property=CPUQuota={}%", c * 100));
    }
    a.push("--".into());
    a.extend(nspawn);
    a
}

/// The folder where nspawn 252 leaves per-machine propagation folders when
/// /run is not a tmpfs (it refuses to remove them itself).
pub fn propagate_dir(machine: &str) -> PathBuf {
    Path::new("/run/systemd/nspawn/propagate").join(machine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::model::Mount;

    fn plan(m: &Machine) -> Vec<String> {
        nspawn_argv(
            Path::new("/usr/bin/systemd-nspawn"),
            &Plan {
                machine: m,
                rootfs: Path::new("/r/x"),
                boot: false,
                command: vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()],
                env: vec!["A=b".into()],
                workdir: Some("/w".into()),
                id_base: Some(id_base_for(2)),
                moat_shifts: false,
                supervision: Supervision::Moat,
            },
        )
    }

    #[test]
    fn application_container_defaults() {
        let mut m = Machine::adhoc("app", "busybox");
        m.network = NetworkMode::Domain;
        let a = plan(&m);
        assert!(a.contains(&"--register=no".into()) && a.contains(&"--keep-unit".into()));
        assert!(a.contains(&format!("--private-users={}:65536", ID_BASE + 2 * 65536)));
        assert!(!a.iter().any(|x| x == "--private-network" || x == "--boot"));
        assert!(a.contains(&"--chdir=/w".into()) && a.contains(&"--setenv=A=b".into()));
        let dd = a.iter().position(|x| x == "--").expect("--");
        assert_eq!(&a[dd + 1..], ["/bin/sh", "-c", "sleep 1"]);
    }

    #[test]
    fn settings_network_mounts_privileged() {
        let mut m = Machine::adhoc("app", "busybox");
        m.network = NetworkMode::None;
        m.privileged = true;
        m.mounts.push(Mount {
            source: "/srv/a:b".into(),
            target: "/data".into(),
            readonly: true,
        });
        m.config.insert("nspawn.ReadOnly".into(), "yes".into());
        m.config
            .insert("nspawn.DropCapability".into(), "CAP_NET_RAW".into());
        let a = plan(&m);
        for want in [
            "--private-network",
            "--capability=all",
            "--read-only",
            "--drop-capability=CAP_NET_RAW",
            "--bind-ro=/srv/a\\:b:/data",
        ] {
            assert!(a.contains(&want.to_string()), "{want} missing from {a:?}");
        }
        assert!(wants_no_userns(&m));
    }

    #[test]
    fn boot_and_systemd_unit() {
        let mut m = Machine::adhoc("sys", "debian");
        m.memory = Some(256 << 20);
        m.pids = Some(100);
        m.cpus = Some(2);
        let a = nspawn_argv(
            Path::new("systemd-nspawn"),
            &Plan {
                machine: &m,
                rootfs: Path::new("/r"),
                boot: true,
                command: vec![],
                env: vec![],
                workdir: None,
                id_base: None,
                moat_shifts: false,
                supervision: Supervision::Systemd,
            },
        );
        assert!(a.contains(&"--boot".into()) && !a.contains(&"--".into()));
        assert!(a.contains(&"--register=yes".into()));
        let u = systemd_run_argv("moat-x", &m, a);
        assert!(u.contains(&"--property=MemoryMax=268435456".into()));
        assert!(u.contains(&"--property=TasksMax=100".into()));
        assert!(u.contains(&"--property=CPUQuota=200%".into()));
    }
}
