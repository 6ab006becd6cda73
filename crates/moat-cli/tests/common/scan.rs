//! A scan of the host for everything one moat root owns, read from the host
//! itself (not through moat), and two checks built on it:
//!
//! - [`leftovers`]: after `moat destroy --all --force`, nothing of the root
//!   may remain (links `mt<tag>-*`/`mv<tag>-*`, nft tables `moat_<tag>*`,
//!   mounts under the root, cgroups `moat-<tag>*`, supervisors, dnsmasq,
//!   container processes, run-dir files, machine folders, state records);
//! - [`consistency`]: while machines exist, every host resource found belongs
//!   to a resource recorded in the state store and vice versa, no intent is
//!   left pending and the journal has no unfinished action.
//!
//! ```text
//! /proc/mounts, `ip -j link`, `nft -j list tables`, /sys/fs/cgroup/*, /proc/*,
//! <root>/run, <root>/machines  ──scan()──▶ HostScan ──┬─▶ leftovers()
//!                     <root>/state.db ──StoreView──────┴─▶ consistency()
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What the host shows of one root.
#[derive(Debug, Default)]
pub struct HostScan {
    pub tag: String,
    /// `mt<tag>-*` and `mv<tag>-*` links: name -> (kind, master).
    pub links: BTreeMap<String, (String, Option<String>)>,
    /// `family name` of every `moat_<tag>*` table.
    pub nft_tables: Vec<String>,
    /// Mount points under the root.
    pub mounts: Vec<String>,
    /// Cgroup directories `/sys/fs/cgroup/<h>/moat-<tag>*` and everything below.
    pub cgroups: Vec<PathBuf>,
    /// Top supervisor processes (their own forks left out): pid -> machine.
    pub supervisors: Vec<(u32, String)>,
    /// dnsmasq processes serving one of the root's bridges: pid -> bridge.
    pub dnsmasqs: Vec<(u32, String)>,
    /// Processes inside a machine's cgroup: pid -> machine.
    pub machine_procs: Vec<(u32, String)>,
    /// Other live processes mentioning the root (command line or root dir).
    pub other_procs: Vec<(u32, String)>,
    /// Files in `<root>/run`, and `netns/<name>` for each machine's
    /// persistent network namespace file there.
    pub run_files: Vec<String>,
    /// Folders in `<root>/machines`.
    pub machine_dirs: Vec<String>,
    /// Staging folders of image builds (`<root>/images/tmp`).
    pub image_tmp: Vec<String>,
}

/// What the state store of the root records.
#[derive(Debug, Default)]
pub struct StoreView {
    pub resources: Vec<moat_state::Resource>,
    pub pending: Vec<moat_state::Resource>,
    /// Action ids of journal entries still `started`.
    pub incomplete: Vec<String>,
    /// Interface number of each machine that has one.
    pub ifnums: BTreeMap<String, u32>,
}

pub fn root_tag(root: &Path) -> String {
    moat_core::naming::root_tag(&root.to_string_lossy())
}

/// The run folder of a non-default root (see `moat_engine::Config`).
pub fn run_dir(root: &Path) -> PathBuf {
    root.join("run")
}

/// Read the state store without creating one (a missing file is empty).
pub fn store(root: &Path) -> Result<StoreView, String> {
    if !root.join("state.db").exists() {
        return Ok(StoreView::default());
    }
    let st = moat_state::StateStore::open(root).map_err(|e| e.to_string())?;
    Ok(StoreView {
        resources: st.resources().map_err(|e| e.to_string())?,
        pending: st.pending().map_err(|e| e.to_string())?,
        incomplete: st
            .incomplete()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|e| e.action_id)
            .collect(),
        ifnums: st
            .load_allocations()
            .map_err(|e| e.to_string())?
            .ifnums
            .into_iter()
            .collect(),
    })
}

pub fn scan(root: &Path) -> HostScan {
    let tag = root_tag(root);
    let root_s = root.to_string_lossy().into_owned();
    let mut s = HostScan {
        tag: tag.clone(),
        ..HostScan::default()
    };

    // Links, with their kind and master bridge.
    let (mt, mv) = (format!("mt{tag}-"), format!("mv{tag}-"));
    let links: serde_json::Value = Command::new("ip")
        .args(["-j", "-d", "link", "show"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default();
    for l in links.as_array().into_iter().flatten() {
        let name = l["ifname"].as_str().unwrap_or_default();
        if name.starts_with(&mt) || name.starts_with(&mv) {
            let kind = l["linkinfo"]["info_kind"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            let master = l["master"].as_str().map(str::to_string);
            s.links.insert(name.to_string(), (kind, master));
        }
    }

    // nft tables of any family.
    let tables: serde_json::Value = Command::new("nft")
        .args(["-j", "list", "tables"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default();
    let want = moat_core::naming::nft_table(&tag);
    for t in tables["nftables"].as_array().into_iter().flatten() {
        let (Some(fam), Some(name)) = (t["table"]["family"].as_str(), t["table"]["name"].as_str())
        else {
            continue;
        };
        if name.starts_with(&want) {
            s.nft_tables.push(format!("{fam} {name}"));
        }
    }

    // Mounts under the root.
    let prefix = format!("{root_s}/");
    s.mounts = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&prefix) || *m == root_s)
        .map(str::to_string)
        .collect();

    // Cgroups: the per-root parent in each hierarchy (v1 controllers, the
    // v2 mount under `unified`, or a pure v2 host's top) and what is below.
    let cg = format!("moat-{tag}");
    let mut hierarchies = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        hierarchies.extend(rd.flatten().map(|e| e.path()));
    }
    for h in hierarchies {
        let Ok(rd) = std::fs::read_dir(&h) else {
            continue;
        };
        for e in rd.flatten() {
            let ok = e.file_name().to_string_lossy().starts_with(&cg)
                && e.file_type().is_ok_and(|t| t.is_dir());
            if ok {
                walk_dirs(&e.path(), &mut s.cgroups);
            }
        }
    }

    // Processes, by command line, root directory and cgroup.
    let machines_prefix = format!("{root_s}/machines/");
    let mut sups: Vec<(u32, u32, String)> = Vec::new();
    for (pid, p) in processes() {
        if let Some(m) = cgroup_machine(&p.cgroup, &cg) {
            s.machine_procs.push((pid, m));
            continue;
        }
        if p.cmdline.contains("moat-supervisor") {
            if let Some(rest) = p.cmdline.split(&machines_prefix).nth(1) {
                let m = rest.split([' ', '/']).next().unwrap_or_default();
                sups.push((pid, p.ppid, m.to_string()));
                continue;
            }
        }
        if p.cmdline.contains("dnsmasq") {
            if let Some(br) = p
                .cmdline
                .split(' ')
                .find_map(|a| a.strip_prefix("--interface="))
                .filter(|b| b.starts_with(&mt))
            {
                s.dnsmasqs.push((pid, br.to_string()));
                continue;
            }
        }
        if p.cmdline.contains(&root_s) || p.root.starts_with(&root_s) {
            s.other_procs.push((pid, p.cmdline.clone()));
        }
    }
    // A supervisor's own forks (the container's parent side) share its command line.
    let sup_pids: BTreeSet<u32> = sups.iter().map(|(p, _, _)| *p).collect();
    s.supervisors = sups
        .into_iter()
        .filter(|(_, ppid, _)| !sup_pids.contains(ppid))
        .map(|(p, _, m)| (p, m))
        .collect();

    for f in names_in(&run_dir(root)) {
        if f == "netns" && run_dir(root).join(&f).is_dir() {
            let inner = names_in(&run_dir(root).join(&f));
            s.run_files
                .extend(inner.into_iter().map(|n| format!("netns/{n}")));
        } else {
            s.run_files.push(f);
        }
    }
    s.machine_dirs = names_in(&root.join("machines"));
    s.image_tmp = names_in(&root.join("images").join("tmp"));
    s
}

/// Everything of the root still on the host, plus state records of host
/// resources: empty after `moat destroy --all --force`. `ignore_pids` are
/// processes of the caller's (a running daemon); a socket someone listens on
/// (that daemon's) is not a leftover either.
pub fn leftovers(root: &Path, ignore_pids: &[u32]) -> Vec<String> {
    let s = scan(root);
    let mut left: Vec<String> = Vec::new();
    left.extend(s.links.keys().map(|l| format!("link {l}")));
    left.extend(s.nft_tables.iter().map(|t| format!("nft table {t}")));
    left.extend(s.mounts.iter().map(|m| format!("mount {m}")));
    left.extend(s.cgroups.iter().map(|c| format!("cgroup {}", c.display())));
    left.extend(
        s.supervisors
            .iter()
            .map(|(p, m)| format!("supervisor {p} of {m}")),
    );
    left.extend(
        s.dnsmasqs
            .iter()
            .map(|(p, b)| format!("dnsmasq {p} for {b}")),
    );
    left.extend(
        s.machine_procs
            .iter()
            .map(|(p, m)| format!("process {p} in the cgroup of {m}")),
    );
    left.extend(
        s.other_procs
            .iter()
            .filter(|(p, _)| !ignore_pids.contains(p))
            .map(|(p, c)| format!("process {p}: {c}")),
    );
    left.extend(
        s.run_files
            .iter()
            .filter(|f| std::os::unix::net::UnixStream::connect(run_dir(root).join(f)).is_err())
            .map(|f| format!("run file {f}")),
    );
    left.extend(s.machine_dirs.iter().map(|m| format!("machine folder {m}")));
    left.extend(
        s.image_tmp
            .iter()
            .map(|t| format!("image staging folder {t}")),
    );
    match store(root) {
        Ok(v) => {
            left.extend(
                v.resources
                    .iter()
                    .map(|r| format!("state record {} {}", r.kind, r.name)),
            );
            left.extend(
                v.incomplete
                    .iter()
                    .map(|a| format!("unfinished journal entry {a}")),
            );
        }
        Err(e) => left.push(format!("state store unreadable: {e}")),
    }
    left
}

/// Host and state store disagreements of a root whose apply has finished:
/// empty when every host resource is recorded, every record is on the host,
/// no intent is pending and no journal entry is unfinished. `ignore_pids`
/// are processes of the caller's (a daemon) that mention the root.
pub fn consistency(root: &Path, ignore_pids: &[u32]) -> Vec<String> {
    let s = scan(root);
    let mut bad = Vec::new();
    let v = match store(root) {
        Ok(v) => v,
        Err(e) => return vec![format!("state store unreadable: {e}")],
    };
    bad.extend(
        v.pending
            .iter()
            .map(|r| format!("intent left pending: {} {}", r.kind, r.name)),
    );
    bad.extend(
        v.incomplete
            .iter()
            .map(|a| format!("journal entry never finished: {a}")),
    );
    let recorded = |kind: &str| -> BTreeMap<String, Option<String>> {
        v.resources
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| (r.name.clone(), r.domain.clone()))
            .collect()
    };
    let networks = recorded("network");
    let mut machines = recorded("machine");
    let adhoc = recorded("adhoc");
    let tables = recorded("nft-table");
    let tag = &s.tag;
    let bridge_of = |domain: &Option<String>| {
        domain
            .as_ref()
            .map(|d| moat_core::naming::bridge_name(tag, d))
    };

    // Records -> host.
    for br in networks.keys() {
        match s.links.get(br) {
            Some((kind, _)) if kind == "bridge" => {}
            Some((kind, _)) => bad.push(format!("network {br} is a {kind} link, not a bridge")),
            None => bad.push(format!("recorded network {br} has no bridge on the host")),
        }
    }
    for t in tables.keys() {
        if !s.nft_tables.iter().any(|x| x == &format!("inet {t}")) {
            bad.push(format!("recorded nft table {t} is not on the host"));
        }
    }
    for (m, domain) in &machines {
        let dir = root.join("machines").join(m);
        if !dir.join("native.json").exists() {
            bad.push(format!("recorded machine {m} has no machine folder"));
            continue;
        }
        let phase = std::fs::read(dir.join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|st| st["phase"].as_str().map(str::to_string))
            .unwrap_or_else(|| "none".into());
        let sups = s.supervisors.iter().filter(|(_, x)| x == m).count();
        if phase != "running" || sups != 1 {
            let log = std::fs::read_to_string(dir.join("supervisor.log")).unwrap_or_default();
            bad.push(format!(
                "machine {m}: phase {phase} with {sups} supervisors (want running, 1); \
                 supervisor.log ends: {:?}",
                log.lines().last().unwrap_or_default()
            ));
        }
        if phase == "running" && !s.machine_procs.iter().any(|(_, x)| x == m) {
            bad.push(format!("machine {m} runs but its cgroup has no process"));
        }
        if !s
            .mounts
            .iter()
            .any(|p| p.starts_with(&dir.to_string_lossy().to_string()))
        {
            bad.push(format!("machine {m} has no root file system mounted"));
        }
        if let Some(n) = v.ifnums.get(m) {
            let veth = moat_core::naming::host_if_name(tag, *n);
            match s.links.get(&veth) {
                Some((_, master)) if master.as_ref() == bridge_of(domain).as_ref() => {}
                Some((_, master)) => bad.push(format!(
                    "machine {m}: {veth} is on {master:?}, not on {:?}",
                    bridge_of(domain)
                )),
                None if phase == "running" => {
                    bad.push(format!("machine {m} runs without its interface {veth}"))
                }
                None => {}
            }
        }
    }
    machines.extend(adhoc);

    // Host -> records.
    let ifnum_owner: BTreeMap<String, &String> = v
        .ifnums
        .iter()
        .map(|(m, n)| (moat_core::naming::host_if_name(tag, *n), m))
        .collect();
    for l in s.links.keys() {
        if l.starts_with(&format!("mt{tag}-")) {
            if !networks.contains_key(l) {
                bad.push(format!("bridge {l} is not a recorded network"));
            }
        } else if !ifnum_owner
            .get(l)
            .is_some_and(|m| machines.contains_key(*m))
        {
            bad.push(format!("interface {l} belongs to no recorded machine"));
        }
    }
    for t in &s.nft_tables {
        let name = t.split(' ').nth(1).unwrap_or_default();
        if !tables.contains_key(name) {
            bad.push(format!("nft table {t} is not recorded"));
        }
    }
    // `<root>/machines/<m>/...` and `<root>/run/netns/<m>[.user]`.
    let machine_of_path = |p: &str| -> Option<String> {
        let netns = format!("{}/netns/", run_dir(root).display());
        p.strip_prefix(&format!("{}/machines/", root.display()))
            .and_then(|r| r.split('/').next())
            .or_else(|| p.strip_prefix(&netns).map(|n| n.trim_end_matches(".user")))
            .map(str::to_string)
    };
    for mnt in &s.mounts {
        if !machine_of_path(mnt).is_some_and(|m| machines.contains_key(&m)) {
            bad.push(format!("mount {mnt} belongs to no recorded machine"));
        }
    }
    let parent = format!("moat-{tag}");
    for c in &s.cgroups {
        // `<hierarchy>/moat-<tag>[/<machine>[/...]]`
        let mut comps = c
            .components()
            .map(|x| x.as_os_str().to_string_lossy().into_owned())
            .skip_while(|x| x != &parent);
        comps.next();
        if let Some(m) = comps.next() {
            if !machines.contains_key(&m) {
                bad.push(format!(
                    "cgroup {} belongs to no recorded machine",
                    c.display()
                ));
            }
        }
    }
    let mut per_machine: BTreeMap<&String, usize> = BTreeMap::new();
    for (pid, m) in &s.supervisors {
        *per_machine.entry(m).or_default() += 1;
        if !machines.contains_key(m) {
            bad.push(format!("supervisor {pid} of unrecorded machine {m}"));
        }
    }
    for (m, n) in per_machine {
        if n > 1 {
            bad.push(format!("{n} supervisors for machine {m}"));
        }
    }
    for (pid, m) in &s.machine_procs {
        if !machines.contains_key(m) {
            bad.push(format!(
                "process {pid} in the cgroup of unrecorded machine {m}"
            ));
        }
    }
    let mut per_bridge: BTreeMap<&String, usize> = BTreeMap::new();
    for (pid, br) in &s.dnsmasqs {
        *per_bridge.entry(br).or_default() += 1;
        if !networks.contains_key(br) {
            bad.push(format!("dnsmasq {pid} serves unrecorded bridge {br}"));
        }
        let pidfile =
            std::fs::read_to_string(run_dir(root).join(format!("{br}.pid"))).unwrap_or_default();
        if pidfile.trim() != pid.to_string() {
            bad.push(format!(
                "dnsmasq {pid} for {br} is not the one its pid file names ({})",
                pidfile.trim()
            ));
        }
    }
    for (br, n) in per_bridge {
        if n > 1 {
            bad.push(format!("{n} dnsmasq processes for {br}"));
        }
    }
    for (pid, c) in &s.other_procs {
        if !ignore_pids.contains(pid) {
            bad.push(format!("stray process {pid}: {c}"));
        }
    }
    for f in &s.run_files {
        if let Some(n) = f.strip_prefix("netns/") {
            if !machines.contains_key(n.trim_end_matches(".user")) {
                bad.push(format!("network namespace file {f} of no recorded machine"));
            }
            continue;
        }
        let stem = f.rsplit_once('.').map(|(a, _)| a).unwrap_or(f);
        let dnsmasq_file = networks.contains_key(stem);
        if !dnsmasq_file && !ignore_run_file(f) {
            bad.push(format!("run file {f} belongs to no recorded network"));
        }
    }
    for m in &s.machine_dirs {
        if !machines.contains_key(m) {
            bad.push(format!("machine folder {m} is not recorded"));
        }
    }
    bad.extend(
        s.image_tmp
            .iter()
            .map(|t| format!("image staging folder {t} left by a build")),
    );
    bad
}

/// Files a daemon keeps in the run folder while it runs.
fn ignore_run_file(f: &str) -> bool {
    f.starts_with("moat.sock") || f.starts_with("daemon")
}

struct Proc {
    ppid: u32,
    cmdline: String,
    root: String,
    cgroup: String,
}

/// Live processes (zombies left out: a reaped-late zombie holds nothing).
fn processes() -> Vec<(u32, Proc)> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let mut rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace())
            .into_iter()
            .flatten();
        let state = rest.next().unwrap_or("?");
        if state == "Z" || state == "X" {
            continue;
        }
        let ppid = rest.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let root = std::fs::read_link(e.path().join("root"))
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        out.push((
            pid,
            Proc {
                ppid,
                cmdline: cmdline.trim().to_string(),
                root,
                cgroup,
            },
        ));
    }
    out
}

/// The machine whose cgroup (`.../moat-<tag>/<machine>[/...]`) holds a
/// process, from its /proc/<pid>/cgroup text.
fn cgroup_machine(cgroup: &str, parent: &str) -> Option<String> {
    let needle = format!("/{parent}/");
    cgroup.lines().find_map(|l| {
        let path = l.splitn(3, ':').nth(2)?;
        let rest = path.split(&needle).nth(1)?;
        rest.split('/').next().map(str::to_string)
    })
}

fn walk_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk_dirs(&e.path(), out);
            }
        }
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
