//! The VM network through `moat apply`: a busybox microVM (and, second
//! test, a full Debian VM) and a container of one domain reach each other,
//! the VM cannot reach another domain, and an address the VM was not given
//! does not get through the bridge. Needs root, QEMU, mkfs.ext4, busybox and
//! a kernel (cached in /var/tmp/moat-test-kernels, fetched once when
//! missing); the full VM needs the Debian disk that tests/vm.rs caches.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const KERNELS: &str = "/var/tmp/moat-test-kernels";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

fn needs() -> Option<String> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Some("needs root (bridges, taps, containers)".into());
    }
    for c in [
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.ext4",
        "busybox",
        "ip",
    ] {
        if !have(c) {
            return Some(format!("{c} is not installed (scripts/deps.sh --test)"));
        }
    }
    if !Path::new("/usr/share/qemu/qboot.rom").is_file() {
        return Some("qboot.rom missing (qemu-system-x86)".into());
    }
    None
}

/// `<target>/<profile>` of this test binary.
fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.parent()?.parent().map(Path::to_path_buf)
}

/// moat, moat-supervisor and moat-init next to the test binary (built when missing).
fn ensure_bins() -> Result<PathBuf, String> {
    let dir = profile_dir().ok_or("no target dir")?;
    let want = ["moat", "moat-supervisor", "moat-init"];
    if want.iter().all(|b| dir.join(b).is_file()) {
        return Ok(dir);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = dir.parent().ok_or("no target dir")?;
    let st = Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            "moat-cli",
            "-p",
            "moat-runtime",
            "-p",
            "moat-init",
        ])
        .env("CARGO_TARGET_DIR", target)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() || !want.iter().all(|b| dir.join(b).is_file()) {
        return Err("cargo build of moat, moat-supervisor, moat-init failed".into());
    }
    Ok(dir)
}

fn test_kernel() -> Result<PathBuf, String> {
    if let Some((_, p)) = moat_qemu::kernel::list(Path::new(KERNELS)).pop() {
        return Ok(p);
    }
    moat_qemu::kernel::fetch(Path::new(KERNELS), "linux-image-amd64")
        .map(|k| k.vmlinux.parent().unwrap_or(Path::new("/")).to_path_buf())
        .map_err(|e| e.to_string())
}

/// A base whose two subnets (trusted +1, semi-trusted +2, zone_step 1) no
/// interface of this host uses now: 10.152–10.159 is clear of the showcase's
/// 100–150 and the other root tests' 160–250.
fn free_base() -> u32 {
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let used = |n: u32| addrs.contains(&format!(" 10.{n}."));
    let bases: Vec<u32> = (0..3).map(|i| 151 + i * 3).collect();
    let start = std::process::id() as usize % bases.len();
    (0..bases.len())
        .map(|i| bases[(start + i) % bases.len()])
        .find(|&b| !(b + 1..b + 3).any(used))
        .unwrap_or(bases[start])
}

/// A private moat root; `Drop` destroys everything in it and restores ip_forward.
struct Root {
    dir: tempfile::TempDir,
    bins: PathBuf,
    /// ip_forward comes back after the last root (dropped after `drop` ran).
    _forward: ForwardHold,
}

/// `net.ipv4.ip_forward` (apply turns it on) as it was before this test
/// process's first holder, written back when the last holder goes: the two
/// tests run in parallel, and a save/restore per test left it on.
struct ForwardHold;

static FORWARD: std::sync::Mutex<(usize, Option<String>)> = std::sync::Mutex::new((0, None));

impl ForwardHold {
    fn new() -> ForwardHold {
        let mut f = FORWARD.lock().unwrap_or_else(|p| p.into_inner());
        if f.0 == 0 {
            f.1 = std::fs::read_to_string(IP_FORWARD).ok();
        }
        f.0 += 1;
        ForwardHold
    }
}

impl Drop for ForwardHold {
    fn drop(&mut self) {
        let mut f = FORWARD.lock().unwrap_or_else(|p| p.into_inner());
        f.0 -= 1;
        if f.0 == 0 {
            if let Some(v) = f.1.take() {
                let _ = std::fs::write(IP_FORWARD, v.trim());
            }
        }
    }
}

impl Root {
    fn moat(&self, args: &[&str]) -> Output {
        Command::new(self.bins.join("moat"))
            .arg("--root")
            .arg(self.dir.path().join("root"))
            .args(args)
            .env("MOAT_SUPERVISOR", self.bins.join("moat-supervisor"))
            .env("NO_COLOR", "1")
            .output()
            .expect("run moat")
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.moat(args);
        assert!(
            o.status.success(),
            "moat {args:?} failed ({:?}): {}{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    /// Exit status of `moat exec MACHINE -- sh -c SCRIPT`, with its output for messages.
    fn sh(&self, machine: &str, script: &str) -> (i32, String) {
        let o = self.moat(&["exec", machine, "--", "sh", "-c", script]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code().unwrap_or(-1), text)
    }
    /// The serial console, then the workload's output (`output.log`).
    fn console(&self, machine: &str) -> String {
        let run = self.dir.path().join("root/run/qemu").join(machine);
        let read = |f: &str| std::fs::read_to_string(run.join(f)).unwrap_or_default();
        format!("{}\n{}", read("console.log"), read("output.log"))
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = self.moat(&["destroy", "--all", "--force"]);
        let root = self.dir.path().to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in mounts {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
    }
}

/// A fresh root with the built binaries, or `None` (a SKIP line printed)
/// when the host cannot run these tests.
fn new_root() -> Option<Root> {
    if let Some(why) = needs() {
        eprintln!("SKIP: {why}");
        return None;
    }
    let bins = match ensure_bins() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("SKIP: {e}");
            return None;
        }
    };
    let r = Root {
        dir: tempfile::tempdir().expect("tempdir"),
        bins,
        _forward: ForwardHold::new(),
    };
    // QEMU runs as moat-qemu: the root must be traversable.
    std::fs::set_permissions(r.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Some(r)
}

/// Packets counted by the rule of `moat_<tag>` (nft family `family`) whose comment is `comment`.
fn counter(family: &str, tag: &str, comment: &str) -> u64 {
    let o = Command::new("nft")
        .args(["list", "table", family, &format!("moat_{tag}")])
        .output()
        .expect("run nft");
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
        .unwrap_or_else(|| panic!("no rule {comment:?} in {family} moat_{tag}:\n{text}"));
    let mut words = line.split_whitespace();
    words.find(|w| *w == "packets");
    words
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {line:?}"))
}

fn ping(target: &str) -> String {
    format!("ping -c 2 -W 3 {target} >/dev/null 2>&1")
}

#[test]
fn microvm_and_container_of_one_domain_talk_other_domain_and_spoofing_do_not() {
    let Some(r) = new_root() else { return };
    let kernel = match test_kernel() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIP: no guest kernel: {e}");
            return;
        }
    };
    let t0 = Instant::now();
    let proj = r.dir.path().join("project");
    std::fs::create_dir_all(&proj).expect("project dir");
    let base = free_base();
    let project = format!(
        r#"schema_version: 1
project: vmnet
addressing: {{base: "10.{base}", zone_step: 1}}
domains:
  va:
    trust_level: trusted
    egress: none
    machines:
      vm:
        type: microvm
        accel: tcg
        kernel: "{kernel}"
        command: ["sh", "-c", "echo vm-ready; while :; do sleep 1; done"]
      ct: {{ command: ["sleep", "100000"] }}
  vb:
    trust_level: semi-trusted
    egress: none
    machines:
      ct: {{ command: ["sleep", "100000"] }}
"#,
        kernel = kernel.display()
    );
    std::fs::write(proj.join("moat.yml"), project).expect("write project");
    let f = proj.to_str().expect("utf-8 path");
    r.ok(&["-f", f, "apply"]);
    eprintln!("apply: {:?}", t0.elapsed());

    let st: serde_json::Value =
        serde_json::from_str(&r.ok(&["-f", f, "status", "--json"])).expect("status json");
    let ip = |name: &str| -> String {
        st["machines"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == name))
            .and_then(|m| m["ip"].as_str())
            .unwrap_or_else(|| panic!("no address for {name}: {st}"))
            .to_string()
    };
    let (vm_ip, cta_ip, ctb_ip) = (ip("va-vm"), ip("va-ct"), ip("vb-ct"));
    let tag = st["root_tag"].as_str().expect("root_tag").to_string();
    let between = || counter("inet", &tag, "between domains");
    let spoofed = || counter("bridge", &tag, "spoofed or not IPv4");

    // Wait for the workload (the NIC is configured before it starts).
    let t = Instant::now();
    while !r.console("va-vm").contains("vm-ready") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the microVM did not boot; console:\n{}",
            r.console("va-vm")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("microVM up: {:?}", t0.elapsed());

    // Same domain, both ways.
    let (code, out) = r.sh("va-vm", &ping(&cta_ip));
    assert_eq!(
        code,
        0,
        "microVM → same-domain container {cta_ip} failed: {out}\nguest: {}",
        r.sh("va-vm", "ip addr; ip route").1
    );
    let (code, out) = r.sh("va-ct", &ping(&vm_ip));
    assert_eq!(code, 0, "container → microVM {vm_ip} failed: {out}");

    // Other domain: refused by the firewall (its drop counter moves).
    let before = between();
    let (code, _) = r.sh("va-vm", &format!("ping -c 1 -W 2 {ctb_ip} >/dev/null 2>&1"));
    assert_ne!(
        code, 0,
        "microVM reached the other domain's container {ctb_ip}"
    );
    assert!(
        between() > before,
        "the cross-domain ping was not dropped between domains"
    );

    // Spoofing: an address of the domain that was not allocated to the microVM.
    let spoof = {
        let mut o: Vec<u32> = vm_ip.split('.').map(|p| p.parse().expect("ipv4")).collect();
        o[3] = 250;
        assert!(![&cta_ip, &vm_ip].contains(&&format!("{}.{}.{}.250", o[0], o[1], o[2])));
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])
    };
    let (code, out) = r.sh("va-vm", &format!("ip addr add {spoof}/32 dev eth0"));
    assert_eq!(code, 0, "ip addr add in the guest: {out}");
    let before = spoofed();
    let (code, _) = r.sh(
        "va-vm",
        &format!("ping -c 2 -W 2 -I {spoof} {cta_ip} >/dev/null 2>&1"),
    );
    assert_ne!(
        code, 0,
        "a ping from the spoofed source {spoof} got an answer"
    );
    let after_ip = spoofed();
    assert!(
        after_ip > before,
        "the bridge did not drop the spoofed source"
    );
    // A spoofed MAC is dropped as well; then the real identity still works.
    let (code, out) = r.sh(
        "va-vm",
        &format!(
            "real=$(cat /sys/class/net/eth0/address) && \
             ip link set eth0 address 02:00:00:00:be:ef && \
             {{ ping -c 2 -W 2 {cta_ip} >/dev/null 2>&1; rc=$?; }}; \
             ip link set eth0 address $real && exit $rc"
        ),
    );
    assert_ne!(
        code, 0,
        "a ping with a spoofed MAC got an answer ({code}): {out}"
    );
    assert!(
        spoofed() > after_ip,
        "the bridge did not drop the spoofed MAC"
    );
    let (code, out) = r.sh("va-vm", &ping(&cta_ip));
    assert_eq!(
        code, 0,
        "the real address stopped working after the spoofing: {out}"
    );
    eprintln!("checks done: {:?}", t0.elapsed());

    r.ok(&["destroy", "--all", "--force"]);
    eprintln!("whole test: {:?}", t0.elapsed());
}

/// The newest Debian VM disk in the cache that `tests/vm.rs` fills
/// (`debian_vm_disk`; cargo runs that test binary before this one).
fn cached_debian_disk() -> Option<PathBuf> {
    std::fs::read_dir("/var/tmp/moat-test-vmdisk")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "qcow2")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("bookworm-"))
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// The same checks for a full VM (q35, the Debian disk of `moat image build
/// --vm`, its address from the network-config moat writes into the cloud-init
/// seed): it has no `moat exec`, so cloud-init runs the guest's side (an ICMP
/// echo in python3, written by `write_files`) and prints the results on the
/// serial console; the container's side runs through `moat exec`.
#[test]
fn full_vm_and_container_of_one_domain_talk_other_domain_and_spoofing_do_not() {
    if std::env::var_os("MOAT_TEST_QUICK").is_some() {
        eprintln!("SKIP: MOAT_TEST_QUICK is set (a Debian VM under TCG takes minutes)");
        return;
    }
    let Some(disk) = cached_debian_disk() else {
        eprintln!(
            "SKIP: no cached Debian VM disk in /var/tmp/moat-test-vmdisk (tests/vm.rs builds it)"
        );
        return;
    };
    let Some(r) = new_root() else { return };
    let t0 = Instant::now();
    // The VM image is there already: apply builds nothing.
    let vmdir = r.dir.path().join("root/images/vm");
    std::fs::create_dir_all(&vmdir).expect("images/vm");
    let st = Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(&disk)
        .arg(vmdir.join("debian%2Fbookworm.qcow2"))
        .status()
        .expect("cp");
    assert!(st.success(), "copying {}", disk.display());

    let base = free_base();
    let (a, b) = (base + 1, base + 2);
    let (vm_ip, cta_ip, ctb_ip, spoof) = (
        format!("10.{a}.0.20"),
        format!("10.{a}.0.10"),
        format!("10.{b}.0.10"),
        format!("10.{a}.0.250"),
    );
    let script = format!(
        "#!/bin/sh\n\
         P='python3 /root/ping.py'\n\
         IF=$(ip -o -4 addr show | awk '$4 ~ /^{vm_ip}\\// {{print $2}}')\n\
         echo VMNET-UP if=$IF; ip -4 route | sed 's/^/VMNET-ROUTE /'\n\
         for i in $(seq 30); do $P {cta_ip} && break; sleep 1; done\n\
         if $P {cta_ip}; then echo VMNET-SAME=ok; else echo VMNET-SAME=fail; fi\n\
         if $P {ctb_ip}; then echo VMNET-OTHER=reached; else echo VMNET-OTHER=blocked; fi\n\
         ip addr add {spoof}/32 dev $IF\n\
         if $P {cta_ip} {spoof}; then echo VMNET-SPOOF=reached; else echo VMNET-SPOOF=blocked; fi\n\
         ip addr del {spoof}/32 dev $IF\n\
         if $P {cta_ip}; then echo VMNET-AFTER=ok; else echo VMNET-AFTER=fail; fi\n\
         echo VMNET-DONE\n"
    );
    let cloud_init = serde_json::json!({
        "user-data": {
            "write_files": [
                {"path": "/root/ping.py", "content": PING_PY},
                {"path": "/root/vmnet.sh", "content": script, "permissions": "0755"}
            ],
            "runcmd": ["sh -c '/root/vmnet.sh > /dev/ttyS0 2>&1'"]
        }
    });
    let proj = r.dir.path().join("project");
    std::fs::create_dir_all(&proj).expect("project dir");
    let project = format!(
        r#"schema_version: 1
project: vmnetfull
addressing: {{base: "10.{base}", zone_step: 1}}
domains:
  va:
    trust_level: trusted
    egress: none
    machines:
      vm:
        type: vm
        image: debian/bookworm
        accel: tcg
        memory: 1GiB
        cpus: 2
        ip: {vm_ip}
        cloud_init: {cloud_init}
      ct: {{ command: ["sleep", "100000"], ip: {cta_ip} }}
  vb:
    trust_level: semi-trusted
    egress: none
    machines:
      ct: {{ command: ["sleep", "100000"], ip: {ctb_ip} }}
"#
    );
    std::fs::write(proj.join("moat.yml"), project).expect("write project");
    let f = proj.to_str().expect("utf-8 path");
    let plan = r.ok(&["-f", f, "plan"]);
    assert!(!plan.contains("ensure image debian/bookworm"), "{plan}");
    r.ok(&["-f", f, "apply"]);
    eprintln!("apply: {:?}", t0.elapsed());
    let st: serde_json::Value =
        serde_json::from_str(&r.ok(&["-f", f, "status", "--json"])).expect("status json");
    let tag = st["root_tag"].as_str().expect("root_tag").to_string();
    let between = || counter("inet", &tag, "between domains");
    let spoofed = || counter("bridge", &tag, "spoofed or not IPv4");
    let (between0, spoofed0) = (between(), spoofed());

    let serial = || {
        std::fs::read_to_string(r.dir.path().join("root/qemu/va-vm/console.log"))
            .unwrap_or_default()
    };
    let wait_for = |marker: &str, secs: u64| {
        let t = Instant::now();
        while !serial().contains(marker) {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "no {marker} on the VM's console after {secs} s:\n{}",
                serial()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    };
    wait_for("VMNET-UP", 900);
    eprintln!("VM up: {:?}", t0.elapsed());
    // The container's side: it reaches the VM at its allocated address.
    let (code, out) = r.sh("va-ct", &format!("ping -c 3 -W 3 {vm_ip} >/dev/null 2>&1"));
    assert_eq!(
        code,
        0,
        "container → full VM {vm_ip} failed: {out}\n{}",
        serial()
    );
    wait_for("VMNET-DONE", 300);
    let log = serial();
    let guest = &log[log.find("VMNET-UP").unwrap_or(0)..];
    // The address and the default route come from the seed's network-config.
    assert!(
        guest.contains(&format!("VMNET-ROUTE default via 10.{a}.0.254")),
        "{guest}"
    );
    assert!(guest.contains("VMNET-SAME=ok"), "{guest}");
    assert!(guest.contains("VMNET-OTHER=blocked"), "{guest}");
    assert!(guest.contains("VMNET-SPOOF=blocked"), "{guest}");
    assert!(guest.contains("VMNET-AFTER=ok"), "{guest}");
    let rules = || {
        let o = Command::new("nft")
            .args(["list", "table", "inet", &format!("moat_{tag}")])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(
        between() > between0,
        "the cross-domain ping was not dropped between domains:\n{guest}\n{}",
        rules()
    );
    assert!(
        spoofed() > spoofed0,
        "the bridge did not drop the spoofed source"
    );
    eprintln!("checks done: {:?}", t0.elapsed());
    r.ok(&["destroy", "--all", "--force"]);
    eprintln!("whole test: {:?}", t0.elapsed());
}

/// An ICMP echo (raw socket) for the guest, which has python3 (cloud-init's)
/// but no ping: `ping.py DST [SRC]` exits 0 when DST answers, binding SRC as
/// the source address when given.
const PING_PY: &str = r#"import os, socket, struct, sys, time
def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
def ping(dst, src, tries=3, wait=2.0):
    ident = os.getpid() & 0xFFFF
    for seq in range(tries):
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            if src:
                s.bind((src, 0))
            s.settimeout(wait)
            data = b"moat"
            h = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            h = struct.pack("!BBHHH", 8, 0, csum(h + data), ident, seq)
            s.sendto(h + data, (dst, 0))
            end = time.time() + wait
            while time.time() < end:
                r, a = s.recvfrom(1024)
                if a[0] == dst and r[20] == 0 and struct.unpack("!H", r[24:26])[0] == ident:
                    return True
        except OSError as e:
            print("ping", dst, "from", src or "-", ":", e, file=sys.stderr)
    return False
sys.exit(0 if ping(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None) else 1)
"#;
