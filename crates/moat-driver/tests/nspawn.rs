//! The nspawn driver on real systemd-nspawn containers (root only; skips
//! otherwise), under moat's own supervision (this host has no systemd):
//! - a busybox application container: user namespace, limits enforced
//!   (memory, pids, read from the cgroup and hit from inside), its network
//!   namespace wired before nspawn starts, /proc masking, logs, stop,
//!   destroy leaves no cgroup, netns or folder;
//! - `network: none` (loopback only), `network: host` (the host's
//!   interfaces, admin trust only), `privileged` refused in untrusted domains;
//! - a Debian systemd system container booted with `-b`: reaches running,
//!   exec, clean poweroff on stop (SIGRTMIN+3, well before the timeout).
//!
//! The Debian rootfs comes from `MOAT_TEST_DEBIAN_ROOTFS` or the shared
//! cache folder `/var/tmp/moat-test-debian-rootfs` (built there with
//! mmdebstrap on first use, same packages as moat-runtime's systemd test);
//! the test runs it through an overlay, the cache stays untouched.

use moat_core::model::{Machine, NetworkMode, ResolvedNic, TrustLevel};
use moat_core::observed::MachineState;
use moat_driver::native::FolderRootfs;
use moat_driver::nspawn::{NetnsAttacher, NspawnDriver};
use moat_driver::{BridgeInfo, Ctx, Driver, MachineSpec, Probe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PACKAGES: &str = "systemd,systemd-sysv,iproute2,dbus,ca-certificates";
const DEFAULT_CACHE: &str = "/var/tmp/moat-test-debian-rootfs";

/// Puts a veth pair (eth0 addressed like the NIC) into the namespace file, so the
/// test sees the driver's netns plumbing without a bridge.
struct DummyAttacher;

impl NetnsAttacher for DummyAttacher {
    fn attach_netns(
        &self,
        _ctx: &Ctx,
        _domain: &str,
        nic: &ResolvedNic,
        bridge: &BridgeInfo,
        netns: &Path,
    ) -> Result<(), String> {
        let ns = format!("--net={}", netns.display());
        for args in [
            vec![
                "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
            ],
            vec!["ip", "link", "set", "eth0", "up"],
            vec![
                "ip",
                "addr",
                "add",
                &format!("{}/{}", nic.ip, bridge.prefix_len),
                "dev",
                "eth0",
            ],
        ] {
            let st = Command::new("nsenter")
                .arg(&ns)
                .args(&args)
                .status()
                .map_err(|e| e.to_string())?;
            if !st.success() {
                return Err(format!("{args:?} failed"));
            }
        }
        Ok(())
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn supervisor() -> Option<String> {
    std::env::var("MOAT_SUPERVISOR").ok().or_else(|| {
        let exe = std::env::current_exe().ok()?;
        let p = exe.parent()?.parent()?.join("moat-supervisor");
        p.exists().then(|| p.display().to_string())
    })
}

fn needs() -> Option<String> {
    if !is_root() {
        return Some("needs root".into());
    }
    if !Path::new("/usr/bin/systemd-nspawn").exists() && !Path::new("/bin/systemd-nspawn").exists()
    {
        return Some("systemd-nspawn is not installed (apt-get install systemd-container)".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox missing (apt-get install busybox-static)".into());
    }
    if supervisor().is_none() {
        return Some(
            "moat-supervisor not built (cargo build -p moat-runtime) and MOAT_SUPERVISOR unset"
                .into(),
        );
    }
    None
}

fn busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
    std::fs::create_dir_all(dir.join("usr/lib")).expect("mkdir");
    std::fs::create_dir_all(dir.join("etc")).expect("mkdir");
    std::fs::write(dir.join("usr/lib/os-release"), "ID=busybox\n").expect("os-release");
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("copy busybox");
    moat_host::busybox::link_applets(Path::new("/bin/busybox"), dir, Some("bin"))
        .expect("busybox applets");
}

fn chmod_755(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A temp moat root, a driver and machines destroyed on drop (also on panic).
struct Fixture {
    tmp: tempfile::TempDir,
    ctx: Ctx,
    driver: NspawnDriver,
    machines: Vec<String>,
    mounts: Vec<PathBuf>,
}

static NEXT_TAG: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Fixture {
    fn new(system: bool) -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix("moat-nspawn-")
            .tempdir()
            .expect("tempdir");
        chmod_755(tmp.path());
        std::fs::create_dir_all(tmp.path().join("rootfs")).expect("mkdir");
        let ctx = Ctx {
            root: tmp.path().join("root"),
            run_dir: tmp.path().join("run"),
            // One tag per fixture: tests of this binary run in parallel and
            // each checks that its own `/moat-<tag>` cgroups are gone.
            root_tag: format!(
                "n{}t{}",
                std::process::id(),
                NEXT_TAG.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        };
        let driver = NspawnDriver::new(Arc::new(FolderRootfs {
            base: tmp.path().join("rootfs"),
            system,
        }))
        .with_network(Arc::new(DummyAttacher))
        .with_supervisor(supervisor().expect("checked").into())
        .with_moat_supervision()
        .with_stop_timeout(Duration::from_secs(10));
        Fixture {
            tmp,
            ctx,
            driver,
            machines: vec![],
            mounts: vec![],
        }
    }

    fn rootfs(&self, full: &str) -> PathBuf {
        self.tmp.path().join("rootfs").join(full)
    }

    fn exec(&self, full: &str, cmd: &str) -> (i32, String) {
        let out = self
            .driver
            .exec(
                &self.ctx,
                full,
                &["/bin/sh".into(), "-c".into(), cmd.into()],
            )
            .expect("exec");
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status, s.trim().to_string())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for m in &self.machines {
            if let Err(e) = self.driver.destroy(&self.ctx, m) {
                eprintln!("cleanup: destroying {m}: {e}");
            }
        }
        for m in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn machine(full: &str, command: Option<&str>) -> Machine {
    Machine {
        name: full.into(),
        full_name: full.into(),
        domain: "d".into(),
        cpus: Some(1),
        memory: Some(64 << 20),
        pids: Some(40),
        network: NetworkMode::Domain,
        trust: TrustLevel::Trusted,
        command: command.map(|c| vec!["/bin/sh".into(), "-c".into(), c.into()]),
        ..Machine::adhoc(full, "busybox")
    }
}

fn spec(m: Machine, ip: &str) -> MachineSpec {
    MachineSpec {
        nic: Some(ResolvedNic {
            machine: m.full_name.clone(),
            ip: ip.parse().expect("ip"),
            mac: [2, 0, 0, 0, 0, 9],
            host_if: "unused".into(),
        }),
        bridge: Some(BridgeInfo {
            name: "unused".into(),
            gateway: "10.251.0.1".parse().expect("gw"),
            prefix_len: 24,
        }),
        spec_hash: "h1".into(),
        hosts: vec![("peer".into(), "10.251.0.3".parse().expect("ip"))],
        machine: m,
    }
}

fn cgroup_dirs_exist(tag: &str) -> Vec<String> {
    [
        "memory",
        "pids",
        "cpu",
        "cpuacct",
        "cpu,cpuacct",
        "systemd",
        "unified",
    ]
    .iter()
    .map(|c| format!("/sys/fs/cgroup/{c}/moat-{tag}"))
    .filter(|p| Path::new(p).exists())
    .collect()
}

#[test]
fn busybox_container_limits_network_masking_lifecycle() {
    if let Some(why) = needs() {
        eprintln!("SKIP: {why}");
        return;
    }
    let mut f = Fixture::new(false);
    let full = format!("d-bb{}", std::process::id());
    busybox_rootfs(&f.rootfs(&full));
    assert_eq!(f.driver.probe(&f.ctx), Probe::Available);
    f.machines.push(full.clone());
    let s = spec(
        machine(&full, Some("echo hello-from-nspawn; exec sleep 1000")),
        "10.251.0.2",
    );
    f.driver.create(&f.ctx, &s).expect("create");
    f.driver
        .create(&f.ctx, &s)
        .expect("create again is a no-op");
    let t = Instant::now();
    f.driver.start(&f.ctx, &full).expect("start");
    eprintln!("start: {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);

    let obs = f
        .driver
        .observe(&f.ctx, &full)
        .expect("observe")
        .expect("exists");
    assert_eq!(obs.state, MachineState::Running);
    assert_eq!(obs.driver, "nspawn");
    assert_eq!(
        obs.limits.memory,
        Some(64 << 20),
        "memory limit in the cgroup"
    );
    assert_eq!(obs.limits.pids, Some(40), "pids limit in the cgroup");
    assert_eq!(obs.limits.cpus, Some(1), "cpu quota in the cgroup");

    // User namespace: root inside is the machine's range on the host.
    let (st, out) = f.exec(&full, "id -u; cat /proc/self/uid_map");
    assert_eq!(st, 0, "{out}");
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields[0], "0");
    assert_eq!(fields[1..], ["0", "1073807360", "65536"], "{out}");
    // The network namespace moat prepared (with its NIC) is the machine's.
    let (_, out) = f.exec(&full, "ip -o addr show eth0");
    assert!(out.contains("10.251.0.2/24"), "{out}");
    let (_, out) = f.exec(&full, "grep peer /etc/hosts; cat /etc/resolv.conf");
    assert!(
        out.contains("10.251.0.3 peer") && out.contains("nameserver 10.251.0.1"),
        "{out}"
    );
    // Masked /proc entries read empty.
    let (_, out) = f.exec(&full, "wc -c < /proc/kallsyms; wc -c < /proc/keys");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "0"],
        "{out}"
    );
    let d = NspawnDriver::details(&f.ctx, &full).expect("details");
    assert!(d.unmasked.is_empty(), "unmasked: {:?}", d.unmasked);
    assert!(d.masked.contains(&"/proc/kallsyms".to_string()));
    // Limits hold from inside: the pids limit stops a fork loop, the memory
    // limit kills a process that grows past 64 MiB.
    let (_, out) = f.exec(
        &full,
        "n=0; for i in $(seq 1 60); do sleep 30 >/dev/null 2>&1 & n=$((n+1)); done; echo started=$n",
    );
    eprintln!("fork loop under pids.max=40: {out}");
    assert!(
        out.contains("can't fork") && !out.contains("started=60"),
        "the pids limit did not hold: {out}"
    );
    let _ = f.exec(&full, "pkill -f 'sleep 30'; true");
    let (st, out) = f.exec(
        &full,
        "awk 'BEGIN{s=\"xxxxxxxxxxxxxxxx\"; for(i=0;i<26;i++) s = s s; print length(s)}'",
    );
    eprintln!("1 GiB string under memory 64 MiB: status {st}, {out}");
    assert_ne!(st, 0, "a 1 GiB string must not fit in 64 MiB: {out}");
    // Interactive exec: stdin in, output out, exit code back.
    let mut sess = f
        .driver
        .exec_session(
            &f.ctx,
            &full,
            &["/bin/sh".into()],
            &moat_driver::SessionOpts::default(),
        )
        .expect("exec_session");
    {
        use std::io::{Read, Write};
        let mut io = std::fs::File::from(sess.io.try_clone().expect("dup"));
        io.write_all(b"echo from-session; exit 7\n").expect("write");
        sess.close_stdin().expect("close stdin");
        let mut out = String::new();
        let _ = io.read_to_string(&mut out);
        assert!(out.contains("from-session"), "{out}");
    }
    assert_eq!(sess.wait().expect("wait"), 7);
    // Logs: the command's stdout went to the machine's log file.
    let log = std::fs::read_to_string(NspawnDriver::machine_dir(&f.ctx, &full).stdout_log())
        .unwrap_or_default();
    assert!(log.contains("hello-from-nspawn"), "log: {log}");

    let t = Instant::now();
    f.driver
        .stop(&f.ctx, &full, Duration::from_secs(2))
        .expect("stop");
    eprintln!("stop: {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);
    let obs = f
        .driver
        .observe(&f.ctx, &full)
        .expect("observe")
        .expect("exists");
    assert_eq!(obs.state, MachineState::Stopped);
    assert!(!NspawnDriver::machine_dir(&f.ctx, &full)
        .dir
        .join("netns")
        .exists());
    // Start again after a stop (rootfs, cgroups and netns are rebuilt).
    f.driver.start(&f.ctx, &full).expect("restart");
    let (st, _) = f.exec(&full, "ip -o addr show eth0 | grep -q 10.251.0.2");
    assert_eq!(st, 0);
    f.driver.destroy(&f.ctx, &full).expect("destroy");
    f.machines.clear();
    assert!(f.driver.observe(&f.ctx, &full).expect("observe").is_none());
    assert!(!f.ctx.root.join("machines").join(&full).exists());
    let left = cgroup_dirs_exist(&f.ctx.root_tag);
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

fn link_names(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim();
            Some(name.split('@').next().unwrap_or(name).to_string())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn network_none_host_and_trust_rules() {
    if let Some(why) = needs() {
        eprintln!("SKIP: {why}");
        return;
    }
    let mut f = Fixture::new(false);
    let none = format!("d-no{}", std::process::id());
    let host = format!("a-ho{}", std::process::id());
    let bad = format!("u-ho{}", std::process::id());
    for n in [&none, &host, &bad] {
        busybox_rootfs(&f.rootfs(n));
        f.machines.push(n.clone());
    }
    let mut m = machine(&none, Some("exec sleep 1000"));
    m.network = NetworkMode::None;
    f.driver
        .create(&f.ctx, &spec(m, "10.251.0.4"))
        .expect("create none");
    f.driver.start(&f.ctx, &none).expect("start none");
    let (_, out) = f.exec(&none, "ip -o link");
    assert_eq!(link_names(&out), ["lo"], "{out}");

    let mut m = machine(&host, Some("exec sleep 1000"));
    m.network = NetworkMode::Host;
    m.trust = TrustLevel::Admin;
    f.driver
        .create(&f.ctx, &spec(m, "10.251.0.5"))
        .expect("create host");
    f.driver.start(&f.ctx, &host).expect("start host");
    let (_, inside) = f.exec(&host, "ip -o link");
    let outside = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip");
    let outside = link_names(&String::from_utf8_lossy(&outside.stdout));
    let inside = link_names(&inside);
    assert!(inside.contains(&"lo".to_string()));
    let real: Vec<&String> = outside.iter().filter(|n| n.as_str() != "lo").collect();
    assert!(
        real.iter().any(|n| inside.contains(n)),
        "host links {outside:?} not seen inside: {inside:?}"
    );
    let d = NspawnDriver::details(&f.ctx, &host).expect("details");
    assert_eq!(d.network, "host");

    let mut m = machine(&bad, Some("exec sleep 1000"));
    m.network = NetworkMode::Host;
    m.trust = TrustLevel::Trusted;
    let e = f
        .driver
        .create(&f.ctx, &spec(m, "10.251.0.6"))
        .expect_err("refused");
    assert!(e.to_string().contains("admin"), "{e}");
    let mut m = machine(&bad, Some("exec sleep 1000"));
    m.privileged = true;
    m.trust = TrustLevel::Untrusted;
    let e = f
        .driver
        .create(&f.ctx, &spec(m, "10.251.0.6"))
        .expect_err("refused");
    assert!(e.to_string().contains("privileged"), "{e}");
}

/// Builds the Debian rootfs into `dest` (as moat-runtime's systemd test does).
fn build_rootfs(dest: &Path) -> Result<(), String> {
    if Command::new("mmdebstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("mmdebstrap is not installed (apt-get install mmdebstrap)".into());
    }
    let t = Instant::now();
    // Built beside the cache and renamed: an interrupted build leaves no
    // half-filled cache behind.
    let tmp = dest.with_extension(format!("part{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let out = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--mode=root", "--format=directory"])
        .arg(format!("--include={PACKAGES}"))
        .arg("bookworm")
        .arg(&tmp)
        .output()
        .map_err(|e| format!("mmdebstrap: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!(
            "mmdebstrap failed (apt sources unreachable?): {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    let _ = std::fs::write(tmp.join("etc/machine-id"), "");
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&tmp, dest).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    eprintln!(
        "built the bookworm rootfs in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn debian_rootfs() -> Result<PathBuf, String> {
    let cache = std::env::var_os("MOAT_TEST_DEBIAN_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
    if !cache.join("sbin/init").exists() {
        build_rootfs(&cache)?;
    }
    Ok(cache)
}

#[test]
fn debian_systemd_boots_under_nspawn() {
    if let Some(why) = needs() {
        eprintln!("SKIP: {why}");
        return;
    }
    let src = match debian_rootfs() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("SKIP: no Debian rootfs: {e}");
            return;
        }
    };
    let mut f = Fixture::new(true);
    let full = format!("d-deb{}", std::process::id());
    let target = f.rootfs(&full);
    let (upper, work) = (f.tmp.path().join("upper"), f.tmp.path().join("work"));
    for d in [&target, &upper, &work] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "metacopy=on,lowerdir={},upperdir={},workdir={}",
            src.display(),
            upper.display(),
            work.display()
        ))
        .arg(&target)
        .status()
        .expect("mount");
    assert!(st.success(), "overlay mount");
    f.mounts.push(target.clone());
    f.machines.push(full.clone());
    let mut m = machine(&full, None);
    m.memory = Some(512 << 20);
    m.pids = Some(300);
    m.image = "debian/bookworm".into();
    f.driver
        .create(&f.ctx, &spec(m, "10.251.0.7"))
        .expect("create");
    let t = Instant::now();
    f.driver.start(&f.ctx, &full).expect("start");
    eprintln!(
        "first start (ownership shift included): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let d = NspawnDriver::details(&f.ctx, &full).expect("details");
    assert!(d.boot, "an image with an init boots (-b)");
    let mut state = String::new();
    while t.elapsed() < Duration::from_secs(60) {
        let (st, out) = f.exec(&full, "systemctl is-system-running 2>&1");
        if out.is_empty() {
            let (st2, o2) = f.exec(&full, "echo hi; id");
            eprintln!("empty answer (status {st}); echo: {st2} {o2}");
        }
        state = out;
        if state == "running" || state == "degraded" {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "systemd reached '{state}' in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if state == "degraded" {
        let (_, failed) = f.exec(&full, "systemctl --failed --no-legend");
        eprintln!("failed units: {failed}");
    }
    assert!(state == "running" || state == "degraded", "state: {state}");
    let (_, out) = f.exec(&full, "cat /proc/1/comm; cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max");
    assert!(out.starts_with("systemd"), "{out}");
    assert!(out.contains("300"), "pids limit visible inside: {out}");
    let (_, out) = f.exec(&full, "ip -o addr show eth0");
    assert!(out.contains("10.251.0.7/24"), "{out}");
    let t = Instant::now();
    f.driver
        .stop(&f.ctx, &full, Duration::from_secs(20))
        .expect("stop");
    let took = t.elapsed();
    eprintln!("clean poweroff in {:.1} s", took.as_secs_f64());
    assert!(
        took < Duration::from_secs(15),
        "poweroff took {took:?} (killed at the timeout?)"
    );
    let st = NspawnDriver::machine_dir(&f.ctx, &full)
        .read_status()
        .expect("status");
    assert_eq!(st.exit_code, Some(0), "nspawn exit after poweroff: {st:?}");
}
