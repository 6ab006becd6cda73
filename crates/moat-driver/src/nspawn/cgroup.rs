//! The machine's cgroups when moat (not systemd) supervises nspawn: moat
//! creates `/moat-<tag>/<name>` in the hierarchies that carry limits, writes
//! the limits, and the supervisor's child writes itself into their
//! `cgroup.procs` before it execs nspawn (so nspawn, the container and
//! everything they start are inside). Detects the layout:
//! - cgroup v2 (`/sys/fs/cgroup` is cgroup2): one folder; `memory.max`,
//!   `pids.max`, `cpu.max`; the controllers are enabled in the parents.
//! - v1 / hybrid: `memory.limit_in_bytes`, `pids.max`,
//!   `cpu.cfs_quota_us`, plus the `name=systemd` hierarchy that nspawn and a
//!   booted systemd need.
//!
//! The host paths come from a mountinfo text and a cgroup root, so unit
//! tests run against a temp tree.

use moat_core::observed::Limits;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const CPU_PERIOD_US: u64 = 100_000;

/// One hierarchy the machine joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    /// The machine's folder in it.
    pub dir: PathBuf,
    /// Which limits live here.
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Unified,
    V1Memory,
    V1Pids,
    V1Cpu,
    /// `name=systemd` or another v1 hierarchy without limits.
    V1Plain,
}

/// The hierarchies for cgroup path `cgroup` (e.g. `/moat-<tag>/<name>`),
/// from `/proc/self/mountinfo` text.
pub fn hierarchies(mountinfo: &str, cgroup: &str) -> Vec<Hierarchy> {
    let rel = cgroup.trim_start_matches('/');
    let mut out = Vec::new();
    let mut unified_root = None;
    for l in mountinfo.lines() {
        let Some((left, right)) = l.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        let (Some(fstype), Some(_src), Some(opts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        let Some(mnt) = left.split_whitespace().nth(4) else {
            continue;
        };
        if !mnt.starts_with("/sys/fs/cgroup") {
            continue;
        }
        let opts: Vec<&str> = opts.split(',').collect();
        let kind = match fstype {
            "cgroup2" if mnt == "/sys/fs/cgroup" => {
                unified_root = Some(PathBuf::from(mnt));
                continue;
            }
            // The hybrid layout's cgroup2 (`/sys/fs/cgroup/unified`): no
            // controllers, but nspawn derives its own cgroup from it and
            // creates `supervisor/` and `payload/` below, chowned to the
            // machine's uid band. Left at the root, every machine would share
            // `/payload`, and a second systemd machine (another band) fails
            // at once with EACCES on `/payload/init.scope` (PID 1 exits 255).
            "cgroup2" => Kind::V1Plain,
            "cgroup" if opts.contains(&"memory") => Kind::V1Memory,
            "cgroup" if opts.contains(&"pids") => Kind::V1Pids,
            "cgroup" if opts.contains(&"cpu") => Kind::V1Cpu,
            "cgroup" if opts.contains(&"name=systemd") => Kind::V1Plain,
            _ => continue,
        };
        out.push(Hierarchy {
            dir: Path::new(mnt).join(rel),
            kind,
        });
    }
    if let Some(root) = unified_root {
        return vec![Hierarchy {
            dir: root.join(rel),
            kind: Kind::Unified,
        }];
    }
    out
}

fn write(p: &Path, v: &str) -> io::Result<()> {
    fs::write(p, v).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// Creates the folders, writes the limits; returns the `cgroup.procs` files
/// to join.
pub fn prepare(hs: &[Hierarchy], limits: &Limits) -> io::Result<Vec<PathBuf>> {
    let mut procs = Vec::new();
    for h in hs {
        if h.kind == Kind::Unified {
            // Controllers must be enabled on every level above the machine.
            let mut chain: Vec<&Path> = h.dir.ancestors().skip(1).collect();
            chain.reverse();
            for dir in chain
                .iter()
                .filter(|d| d.join("cgroup.subtree_control").exists())
            {
                let _ = fs::write(dir.join("cgroup.subtree_control"), "+memory +pids +cpu");
            }
        }
        fs::create_dir_all(&h.dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", h.dir.display())))?;
        match h.kind {
            Kind::Unified => {
                let mem = limits.memory.map(|m| m.to_string());
                write(&h.dir.join("memory.max"), mem.as_deref().unwrap_or("max"))?;
                let pids = limits.pids.map(|p| p.to_string());
                write(&h.dir.join("pids.max"), pids.as_deref().unwrap_or("max"))?;
                let quota = limits
                    .cpus
                    .map(|c| (u64::from(c) * CPU_PERIOD_US).to_string())
                    .unwrap_or_else(|| "max".into());
                write(&h.dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            Kind::V1Memory => {
                let mem = limits.memory.map(|m| m.to_string());
                write(
                    &h.dir.join("memory.limit_in_bytes"),
                    mem.as_deref().unwrap_or("-1"),
                )?;
            }
            Kind::V1Pids => {
                let pids = limits.pids.map(|p| p.to_string());
                write(&h.dir.join("pids.max"), pids.as_deref().unwrap_or("max"))?;
            }
            Kind::V1Cpu => {
                write(&h.dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                let quota = limits
                    .cpus
                    .map(|c| (u64::from(c) * CPU_PERIOD_US).to_string())
                    .unwrap_or_else(|| "-1".into());
                write(&h.dir.join("cpu.cfs_quota_us"), &quota)?;
            }
            Kind::V1Plain => {}
        }
        procs.push(h.dir.join("cgroup.procs"));
    }
    Ok(procs)
}

/// The limits as the kernel holds them (for `observe`).
pub fn read_limits(hs: &[Hierarchy]) -> Limits {
    let num = |p: PathBuf| -> Option<u64> { fs::read_to_string(p).ok()?.trim().parse().ok() };
    let mut l = Limits::default();
    for h in hs {
        match h.kind {
            Kind::Unified => {
                l.memory = num(h.dir.join("memory.max"));
                l.pids = num(h.dir.join("pids.max")).map(|p| p as u32);
                l.cpus = fs::read_to_string(h.dir.join("cpu.max"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                    .map(|q| (q / CPU_PERIOD_US) as u32);
            }
            // v1 "no limit" reads back as a huge number: not a limit.
            Kind::V1Memory => {
                l.memory = num(h.dir.join("memory.limit_in_bytes")).filter(|m| *m < (1 << 62))
            }
            Kind::V1Pids => l.pids = num(h.dir.join("pids.max")).map(|p| p as u32),
            Kind::V1Cpu => {
                l.cpus = fs::read_to_string(h.dir.join("cpu.cfs_quota_us"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i64>().ok())
                    .filter(|q| *q > 0)
                    .map(|q| (q as u64 / CPU_PERIOD_US) as u32)
            }
            Kind::V1Plain => {}
        }
    }
    l
}

/// Every process still in the machine's cgroups (after nspawn is gone,
/// leftovers are killed by the driver).
pub fn pids(hs: &[Hierarchy]) -> Vec<i32> {
    let mut out = Vec::new();
    for h in hs {
        let mut dirs = vec![h.dir.clone()];
        while let Some(d) = dirs.pop() {
            if let Ok(t) = fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(rd) = fs::read_dir(&d) {
                dirs.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
37 30 0:33 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
38 30 0:34 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer
";

    #[test]
    fn hybrid_layout_joins_limits_and_name_systemd() {
        let hs = hierarchies(HYBRID, "/moat-ab/d-x");
        let kinds: Vec<_> = hs.iter().map(|h| h.kind).collect();
        assert_eq!(
            kinds,
            [
                Kind::V1Plain,
                Kind::V1Plain,
                Kind::V1Memory,
                Kind::V1Cpu,
                Kind::V1Pids
            ]
        );
        // Each machine has its own folder in the hybrid's cgroup2 too.
        assert_eq!(
            hs[0].dir,
            PathBuf::from("/sys/fs/cgroup/unified/moat-ab/d-x")
        );
        assert_eq!(
            hs[2].dir,
            PathBuf::from("/sys/fs/cgroup/memory/moat-ab/d-x")
        );
    }

    #[test]
    fn unified_layout_is_one_folder() {
        let v2 = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let hs = hierarchies(v2, "/moat-ab/d-x");
        assert_eq!(
            hs,
            [Hierarchy {
                dir: "/sys/fs/cgroup/moat-ab/d-x".into(),
                kind: Kind::Unified
            }]
        );
    }

    #[test]
    fn limits_written_and_read_back_in_a_temp_tree() {
        let t = tempfile::tempdir().expect("tempdir");
        let hs = vec![
            Hierarchy {
                dir: t.path().join("memory/m"),
                kind: Kind::V1Memory,
            },
            Hierarchy {
                dir: t.path().join("pids/m"),
                kind: Kind::V1Pids,
            },
            Hierarchy {
                dir: t.path().join("cpu/m"),
                kind: Kind::V1Cpu,
            },
            Hierarchy {
                dir: t.path().join("v2/m"),
                kind: Kind::Unified,
            },
        ];
        let want = Limits {
            cpus: Some(2),
            memory: Some(64 << 20),
            pids: Some(77),
        };
        let procs = prepare(&hs, &want).expect("prepare");
        assert_eq!(procs.len(), 4);
        assert_eq!(read_limits(&hs[..3]), want);
        assert_eq!(read_limits(&hs[3..]), want);
        assert_eq!(
            fs::read_to_string(t.path().join("v2/m/cpu.max")).expect("cpu.max"),
            "200000 100000"
        );
    }
}
