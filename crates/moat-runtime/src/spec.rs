//! `ContainerSpec` is what moat knows about one container; `oci_config`
//! turns it into the OCI runtime spec (config.json) that libcontainer runs.
//! Hardening (user namespace, seccomp, capabilities, masked paths, read-only
//! /sys) is on unless `privileged` is set.

use crate::profile;
use crate::RuntimeError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::PathBuf;

/// What runs as PID 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerKind {
    /// The image's init (`/sbin/init`) is PID 1; stopped with SIGRTMIN+3 when it is systemd.
    System,
    /// The image's entrypoint/cmd is PID 1.
    #[default]
    Application,
}

/// Network namespace of the container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkSpec {
    /// A new network namespace; the caller attaches a NIC between create and start.
    #[default]
    Own,
    /// The host's network namespace.
    Host,
    /// A new network namespace with loopback only.
    None,
    /// Join an existing network namespace (e.g. a bind-mounted `/run/netns/X`).
    Join(PathBuf),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    pub cpus: Option<u32>,
    /// Bytes.
    pub memory: Option<u64>,
    pub pids: Option<u32>,
}

/// Root inside maps to `host_id` outside, for `size` ids (uids and gids alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub host_id: u32,
    pub size: u32,
}

impl IdRange {
    /// The range of machine number `n` (see [`profile::id_base_for`]).
    pub fn for_machine(n: u32) -> Self {
        IdRange {
            host_id: profile::id_base_for(n),
            size: profile::IDS_PER_MACHINE,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: String,
    pub readonly: bool,
}

/// Everything the runtime needs to run one container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Container id: `[A-Za-z0-9_.-]`, unique on the host (moat uses the machine's full name).
    pub name: String,
    /// A prepared root file system (a folder, possibly an overlay mount point).
    pub rootfs: PathBuf,
    pub kind: ContainerKind,
    /// argv of PID 1; empty = `/sbin/init` for system containers.
    pub args: Vec<String>,
    /// `KEY=VALUE`; PATH and TERM get defaults when absent.
    pub env: Vec<String>,
    pub cwd: String,
    /// uid:gid inside the container.
    pub user: (u32, u32),
    pub hostname: Option<String>,
    pub limits: ResourceLimits,
    /// `None` = no user namespace (only allowed with `privileged`).
    pub idmap: Option<IdRange>,
    pub network: NetworkSpec,
    pub mounts: Vec<BindMount>,
    pub privileged: bool,
    /// The machine's domain is untrusted or disposable: `privileged` is refused.
    pub untrusted_domain: bool,
    /// Written to `/etc/hosts` in the rootfs when set.
    pub etc_hosts: Option<String>,
    /// Written to `/etc/resolv.conf` in the rootfs when set.
    pub resolv_conf: Option<String>,
    /// Signal that asks PID 1 to stop; `None` = SIGRTMIN+3 for systemd, SIGTERM otherwise.
    pub stop_signal: Option<i32>,
    /// Cgroup path (below each hierarchy's root); `None` = `/moat/<name>`.
    /// moat passes `/moat-<root tag>/<name>` so two roots never share a cgroup.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// When the container is removed, its cgroup's parent folder (the
    /// `/moat-<root tag>` of `cgroup`) stays even if it is now empty: it is
    /// the root's, made once and reused by every later machine (creating and
    /// removing it in each hierarchy cost ~2 ms per `run --rm` here), and
    /// removed by `moat destroy` (`cgroups::remove_if_empty`). False: the parent goes with its last
    /// container (the library's default `/moat`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_cgroup_parent: bool,
    /// Join this (bind-mounted) user namespace instead of creating one: the
    /// owner of a persistent network namespace joined with [`NetworkSpec::Join`].
    /// Its id map must be `idmap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userns_path: Option<PathBuf>,
    /// PID 1 gets a terminal (a pty in the container's own devpts, its
    /// controlling terminal and stdio) whose master the supervisor keeps,
    /// drains into the logs and relays to `moat run -t` / `moat console`
    /// (see `machine::attach_console`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminal: bool,
    /// `rootfs` is this overlay, left unmounted by the caller: the
    /// supervisor mounts it, with idmapped lower layers when it can (see
    /// `rootfs`), instead of replacing a plain mount the caller made. Only
    /// used when nothing is mounted at `rootfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<crate::idmap::OverlayLayout>,
    /// A read-only folder to bind at /sys/fs/cgroup instead of letting the
    /// library mount the cgroup hierarchies (`cgroups::readonly_view`, made
    /// by `container::create` for a hardened application container on a v1
    /// host). Set for one create only; never in a saved config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_view: Option<PathBuf>,
}

impl ContainerSpec {
    /// The container's cgroup below each hierarchy's root.
    pub fn cgroup_path(&self) -> String {
        self.cgroup
            .clone()
            .unwrap_or_else(|| format!("/moat/{}", self.name))
    }

    /// A hardened application container running `args` in `rootfs`.
    pub fn new(name: impl Into<String>, rootfs: impl Into<PathBuf>, args: Vec<String>) -> Self {
        ContainerSpec {
            name: name.into(),
            rootfs: rootfs.into(),
            kind: ContainerKind::Application,
            args,
            env: Vec::new(),
            cwd: "/".into(),
            user: (0, 0),
            hostname: None,
            limits: ResourceLimits::default(),
            idmap: Some(IdRange::for_machine(0)),
            network: NetworkSpec::None,
            mounts: Vec::new(),
            privileged: false,
            untrusted_domain: false,
            etc_hosts: None,
            resolv_conf: None,
            stop_signal: None,
            cgroup: None,
            keep_cgroup_parent: false,
            userns_path: None,
            terminal: false,
            overlay: None,
            cgroup_view: None,
        }
    }

    /// Checks that do not need the host.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |reason: String| RuntimeError::InvalidSpec {
            container: self.name.clone(),
            reason,
        };
        if self.name.is_empty()
            || self.name.len() > 200
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(bad(
                "the name must be 1-200 characters of [A-Za-z0-9_.-]".into()
            ));
        }
        if self.privileged && self.untrusted_domain {
            return Err(bad(
                "privileged: true is refused in untrusted and disposable domains; \
                 move the machine to a trusted domain or drop privileged"
                    .into(),
            ));
        }
        if self.idmap.is_none() && !self.privileged {
            return Err(bad(
                "an unprivileged container needs a user namespace id range".into(),
            ));
        }
        if let Some(r) = self.idmap {
            if r.host_id == 0 || r.size == 0 {
                return Err(bad("the id range must not map to host root".into()));
            }
        }
        if !self.rootfs.is_absolute() {
            return Err(bad(format!(
                "rootfs '{}' must be an absolute path",
                self.rootfs.display()
            )));
        }
        for m in &self.mounts {
            if !m.target.starts_with('/') || !m.source.is_absolute() {
                return Err(bad(format!(
                    "mount {} -> {}: both paths must be absolute",
                    m.source.display(),
                    m.target
                )));
            }
        }
        Ok(())
    }

    /// argv of PID 1 after defaults.
    pub fn effective_args(&self) -> Vec<String> {
        if self.args.is_empty() {
            vec!["/sbin/init".into()]
        } else {
            self.args.clone()
        }
    }

    pub(crate) fn uses_userns(&self) -> bool {
        self.idmap.is_some() && !self.privileged
    }
}

/// The home folder of user `uid` in the image's `/etc/passwd` (read inside
/// `rootfs`, see [`crate::sys::read_in_root`]), as libcontainer would set
/// `HOME`; `None` when it has no such user (libcontainer then looks itself).
fn home_in(rootfs: &std::path::Path, uid: u32) -> Option<String> {
    let passwd = crate::sys::read_in_root(rootfs, "etc/passwd", 1 << 20)?;
    home_of(&String::from_utf8_lossy(&passwd), uid)
}

fn home_of(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse::<u32>().ok() == Some(uid) && f[5].starts_with('/'))
            .then(|| f[5].to_string())
    })
}

/// The OCI runtime spec for `spec`, as JSON (what goes into config.json).
pub fn oci_config(spec: &ContainerSpec) -> Result<Value, RuntimeError> {
    spec.validate()?;
    let hardened = !spec.privileged;
    let userns = spec.uses_userns();

    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    if !env.iter().any(|e| e.starts_with("HOME=") && e.len() > 5) {
        // What libcontainer's init would look up in the container's
        // /etc/passwd through the C library (about 1 ms of a `run`): read
        // here. An empty HOME counts as none, as there.
        if let Some(home) = home_in(&spec.rootfs, spec.user.0) {
            env.retain(|e| e != "HOME=");
            env.push(format!("HOME={home}"));
        }
    }
    if spec.kind == ContainerKind::System && !env.iter().any(|e| e.starts_with("container=")) {
        // systemd adapts its boot to containers when it sees this.
        env.push("container=moat".into());
    }

    let caps: &[&str] = match (hardened, spec.kind) {
        (false, _) => profile::ALL_CAPS,
        (true, ContainerKind::System) => profile::SYSTEM_CAPS,
        (true, ContainerKind::Application) => profile::APP_CAPS,
    };
    let caps: Vec<&str> = if hardened {
        caps.to_vec()
    } else {
        // A privileged container gets what the host may give: root here may
        // itself lack some (e.g. CAP_SYS_RESOURCE), and asking for it fails.
        let bounding = crate::sys::bounding_set();
        profile::ALL_CAPS
            .iter()
            .enumerate()
            .filter(|(bit, _)| bounding & (1u64 << bit) != 0)
            .map(|(_, c)| *c)
            .collect()
    };

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
    ];
    match &spec.network {
        NetworkSpec::Own | NetworkSpec::None => namespaces.push(json!({"type": "network"})),
        NetworkSpec::Host => {}
        NetworkSpec::Join(p) => namespaces.push(json!({"type": "network", "path": p})),
    }
    if userns {
        match &spec.userns_path {
            Some(p) => namespaces.push(json!({"type": "user", "path": p})),
            None => namespaces.push(json!({"type": "user"})),
        }
    }

    let own_netns = !matches!(spec.network, NetworkSpec::Host);
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
    ];
    let sys_ro = if hardened { "ro" } else { "rw" };
    if own_netns || !userns {
        mounts.push(
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                           "options": ["nosuid", "noexec", "nodev", sys_ro]}),
        );
    } else {
        // sysfs can only be mounted by the owner of the network namespace.
        mounts.push(
            json!({"destination": "/sys", "type": "none", "source": "/sys",
                           "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}),
        );
    }
    // A system container's init manages its own (delegated, namespaced)
    // cgroup subtree, so its cgroupfs is writable; see `cgroups`.
    let cgroup_ro = if spec.kind == ContainerKind::System {
        "rw"
    } else {
        sys_ro
    };
    match &spec.cgroup_view {
        Some(view) if hardened && spec.kind == ContainerKind::Application => mounts.push(
            json!({"destination": "/sys/fs/cgroup", "type": "none", "source": view,
                   "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}),
        ),
        _ => mounts.push(
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                   "options": ["nosuid", "noexec", "nodev", "relatime", cgroup_ro]}),
        ),
    }
    if spec.kind == ContainerKind::System {
        // What systemd expects of a container (systemd.io/CONTAINER_INTERFACE):
        // /run and /run/lock as tmpfs, /tmp a tmpfs like on most hosts.
        mounts.push(
            json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=755", "size=20%"]}),
        );
        mounts.push(
            json!({"destination": "/run/lock", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "noexec", "mode=1777", "size=5m"]}),
        );
        mounts.push(
            json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777", "size=20%"]}),
        );
    }
    for m in &spec.mounts {
        let mut opts = vec!["rbind", "nosuid", "nodev"];
        if m.readonly {
            opts.push("ro");
        }
        mounts.push(
            json!({"destination": m.target, "type": "none", "source": m.source,
                           "options": opts}),
        );
    }

    let mut resources = json!({});
    if let Some(mem) = spec.limits.memory {
        resources["memory"] = json!({"limit": mem});
    }
    if let Some(cpus) = spec.limits.cpus {
        resources["cpu"] = json!({"quota": i64::from(cpus) * 100_000, "period": 100_000u64});
    }
    if let Some(p) = spec.limits.pids {
        resources["pids"] = json!({"limit": i64::from(p)});
    }
    // Device access: deny all, then (added by the library after the spec's
    // rules, in cgroup v1 and v2 alike) the standard nodes only: null, zero,
    // full, random, urandom, tty, console, ptmx, the pts, tun, and mknod
    // (not use) of any node. Listing them here too cost ten more writes to
    // devices.allow per container start. The runtime test checks the
    // resulting devices.list.
    resources["devices"] = if hardened {
        json!([{"allow": false, "access": "rwm"}])
    } else {
        json!([{"allow": true, "access": "rwm"}])
    };

    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": spec.cgroup_path(),
        "resources": resources,
    });
    if userns {
        if let Some(r) = spec.idmap {
            let map = json!([{"containerID": 0, "hostID": r.host_id, "size": r.size}]);
            linux["uidMappings"] = map.clone();
            linux["gidMappings"] = map;
        }
    }
    if hardened {
        linux["maskedPaths"] = json!(profile::MASKED_PATHS);
        linux["readonlyPaths"] = json!(profile::READONLY_PATHS);
        let mut deny: Vec<&str> = profile::DENY_ALWAYS.to_vec();
        if spec.kind == ContainerKind::Application {
            deny.extend_from_slice(profile::DENY_APP);
        }
        linux["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": deny, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}],
        });
    }

    let mut process = json!({
        "terminal": spec.terminal,
        "user": {"uid": spec.user.0, "gid": spec.user.1},
        "args": spec.effective_args(),
        "env": env,
        "cwd": spec.cwd,
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps,
        },
        "noNewPrivileges": hardened,
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 20000u64, "soft": 20000u64}],
    });
    if !hardened {
        process["capabilities"]["inheritable"] = json!(caps);
    }

    Ok(json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": spec.rootfs, "readonly": false},
        "hostname": spec.hostname.clone().unwrap_or_else(|| spec.name.clone()),
        "mounts": mounts,
        "linux": linux,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_view_is_bound_read_only_for_a_hardened_application_container() {
        let mut s = ContainerSpec::new("v", "/tmp/r", vec!["/bin/true".into()]);
        s.cgroup_view = Some(PathBuf::from("/m/bundle/cgroupfs"));
        let find = |c: &serde_json::Value| {
            c["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["destination"] == "/sys/fs/cgroup")
                .cloned()
                .expect("cgroupfs")
        };
        let m = find(&oci_config(&s).unwrap());
        assert_eq!(m["type"], "none");
        assert_eq!(m["source"], "/m/bundle/cgroupfs");
        let opts: Vec<&str> = m["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert!(opts.contains(&"rbind") && opts.contains(&"ro"), "{opts:?}");
        // A system container (delegated, writable) and a privileged one keep
        // the library's cgroup mount.
        let mut t = s.clone();
        t.kind = ContainerKind::System;
        assert_eq!(find(&oci_config(&t).unwrap())["type"], "cgroup");
        let mut p = s.clone();
        p.privileged = true;
        p.idmap = None;
        assert_eq!(find(&oci_config(&p).unwrap())["type"], "cgroup");
    }

    #[test]
    fn home_comes_from_the_users_passwd_line() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n\
                      # a comment\n\
                      daemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n\
                      odd:x:5:5::relative:/bin/sh\n\
                      app:x:1000:1000:App,,,:/home/app:/bin/bash\n";
        assert_eq!(home_of(passwd, 0).as_deref(), Some("/root"));
        assert_eq!(home_of(passwd, 1000).as_deref(), Some("/home/app"));
        assert_eq!(home_of(passwd, 5), None);
        assert_eq!(home_of(passwd, 42), None);
    }

    #[test]
    fn passwd_is_read_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        // An image's /etc/passwd pointing at a host file: resolved inside
        // the root, where that path does not exist.
        let host = t.path().join("host-passwd");
        std::fs::write(&host, "root:x:0:0::/secret:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&host, root.join("etc/passwd")).unwrap();
        assert_eq!(home_in(&root, 0), None);
        // A FIFO is not opened (that would block).
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        let fifo = std::ffi::CString::new(root.join("etc/passwd").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo of a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert_eq!(home_in(&root, 0), None);
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        assert_eq!(home_in(&root, 0).as_deref(), Some("/root"));
    }

    fn sample() -> ContainerSpec {
        let mut s = ContainerSpec::new("t1", "/tmp/rootfs", vec!["/bin/true".into()]);
        s.limits = ResourceLimits {
            cpus: Some(2),
            memory: Some(64 << 20),
            pids: Some(50),
        };
        s
    }

    #[test]
    fn config_parses_as_an_oci_spec() {
        let v = oci_config(&sample()).expect("config");
        let spec: libcontainer::oci_spec::runtime::Spec =
            serde_json::from_value(v).expect("valid OCI spec");
        let linux = spec.linux().as_ref().expect("linux");
        assert!(linux.seccomp().is_some());
        assert_eq!(linux.uid_mappings().as_ref().map(|m| m.len()), Some(1));
        let pids = linux
            .resources()
            .as_ref()
            .and_then(|r| r.pids().as_ref())
            .map(|p| p.limit());
        assert_eq!(pids, Some(50));
    }

    #[test]
    fn privileged_drops_hardening_and_is_refused_when_untrusted() {
        let mut s = sample();
        s.privileged = true;
        let v = oci_config(&s).expect("config");
        assert!(v["linux"].get("seccomp").is_none());
        assert!(v["linux"].get("uidMappings").is_none());
        s.untrusted_domain = true;
        assert!(matches!(
            oci_config(&s),
            Err(RuntimeError::InvalidSpec { .. })
        ));
    }

    #[test]
    fn bad_names_are_refused() {
        let mut s = sample();
        s.name = "a/b".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn system_containers_may_mount_but_not_load_modules() {
        let mut s = sample();
        s.kind = ContainerKind::System;
        s.args.clear();
        let v = oci_config(&s).expect("config");
        let names = v["linux"]["seccomp"]["syscalls"][0]["names"].to_string();
        assert!(names.contains("init_module") && !names.contains("\"mount\""));
        assert_eq!(v["process"]["args"][0], "/sbin/init");
    }

    #[test]
    fn system_containers_get_what_systemd_expects() {
        let mut s = sample();
        s.kind = ContainerKind::System;
        s.args.clear();
        let v = oci_config(&s).expect("config");
        let mounts = v["mounts"].as_array().expect("mounts");
        let find = |d: &str| mounts.iter().find(|m| m["destination"] == d).cloned();
        for d in ["/run", "/run/lock", "/tmp"] {
            assert_eq!(
                find(d).map(|m| m["type"].clone()),
                Some(json!("tmpfs")),
                "{d}"
            );
        }
        let cg = find("/sys/fs/cgroup").expect("cgroupfs");
        assert!(cg["options"].to_string().contains("\"rw\""));
        assert!(v["process"]["env"].to_string().contains("container=moat"));
        // Application containers keep a read-only cgroupfs and no /run tmpfs.
        let v = oci_config(&sample()).expect("config");
        let mounts = v["mounts"].as_array().expect("mounts");
        assert!(!mounts.iter().any(|m| m["destination"] == "/run"));
        let cg = mounts
            .iter()
            .find(|m| m["destination"] == "/sys/fs/cgroup")
            .expect("cgroupfs");
        assert!(cg["options"].to_string().contains("\"ro\""));
    }
}
