//! `moat-init`: PID 1 of a moat microVM, packed into the initramfs.
//!
//! Flow: mount /proc, /sys, /dev → load the modules listed in
//! `/moat/modules.order` (finit_module, dependencies first, as the host
//! ordered them) → read `/moat/config.json` → mount the root disk
//! (`/dev/vda`, ext4) on `/root` → configure eth0 → then either
//! `switch_root` into the image's own init (`mode: init`), or run the OCI
//! workload chrooted in the root disk, serve `moat exec` on the virtio-serial
//! port `moat.ctl`, and when the workload ends print `@moat-exit <code>` on
//! the console and reboot (QEMU runs with `-no-reboot`, so it exits).
//!
//! The workload's stdout and stderr go to the virtio-serial port `moat.out`
//! (the host's `output.log`, what `moat logs` shows), or to the console when
//! QEMU has no such port. Console protocol (serial, read by the host):
//! `@moat-start` before the workload starts, `@moat-exit <code>` after it ended, `@moat-error <msg>`
//! when init itself fails. Control protocol (one JSON object a line):
//! `{"op":"exec","argv":[..]}` → `{"status":N,"stdout":"..","stderr":".."}`,
//! `{"op":"stop"}` → `{"status":0}` then SIGTERM to the workload.

use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

#[derive(Deserialize, Default, Clone)]
struct Config {
    #[serde(default)]
    mode: String,
    #[serde(default)]
    argv: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default)]
    hostname: String,
    /// `a.b.c.d/len`
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    hosts: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct Request {
    op: String,
    #[serde(default)]
    argv: Vec<String>,
}

#[derive(Serialize)]
struct Reply {
    status: i32,
    stdout: String,
    stderr: String,
}

const ROOT: &str = "/root";
static WORKLOAD: AtomicI32 = AtomicI32::new(0);

fn main() {
    if let Err(e) = run() {
        println!("@moat-error {e}");
        power_off();
    }
}

fn mount(src: &str, dst: &str, fstype: &str, flags: libc::c_ulong) -> Result<(), String> {
    let _ = std::fs::create_dir_all(dst);
    let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let (s, d, t) = (c(src)?, c(dst)?, c(fstype)?);
    // SAFETY: valid NUL-terminated strings; null data is allowed.
    let r = unsafe { libc::mount(s.as_ptr(), d.as_ptr(), t.as_ptr(), flags, std::ptr::null()) };
    if r != 0 {
        return Err(format!(
            "mount {fstype} {src} on {dst}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn load_modules() {
    let Ok(order) = std::fs::read_to_string("/moat/modules.order") else {
        return;
    };
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = format!("/moat/modules/{name}");
        let Ok(f) = std::fs::File::open(&path) else {
            println!("moat-init: missing module {path}");
            continue;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: finit_module with an open fd and an empty parameter string.
        let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                println!("moat-init: loading {name}: {e}");
            }
        }
    }
}

fn wait_for(path: &str, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if Path::new(path).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn run() -> Result<(), String> {
    mount("proc", "/proc", "proc", 0)?;
    mount("sysfs", "/sys", "sysfs", 0)?;
    mount("devtmpfs", "/dev", "devtmpfs", 0)?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    load_modules();
    if cmdline.split_whitespace().any(|a| a == "moat.probe") {
        println!("@moat-probe-ok");
        power_off();
    }
    let cfg: Config = serde_json::from_str(
        &std::fs::read_to_string("/moat/config.json")
            .map_err(|e| format!("/moat/config.json: {e}"))?,
    )
    .map_err(|e| format!("/moat/config.json: {e}"))?;
    if !wait_for("/dev/vda", Duration::from_secs(20)) {
        return Err("no root disk /dev/vda (virtio_blk not loaded?)".into());
    }
    mount("/dev/vda", ROOT, "ext4", 0)?;
    net_up(&cfg)?;
    if !cfg.hostname.is_empty() {
        // SAFETY: pointer and length of a live buffer.
        unsafe { libc::sethostname(cfg.hostname.as_ptr().cast(), cfg.hostname.len()) };
    }
    write_etc(&cfg);
    if cfg.mode == "init" {
        return switch_root(&cfg);
    }
    mount("proc", &format!("{ROOT}/proc"), "proc", 0)?;
    mount("sysfs", &format!("{ROOT}/sys"), "sysfs", 0)?;
    mount(
        "/dev",
        &format!("{ROOT}/dev"),
        "",
        libc::MS_BIND | libc::MS_REC,
    )?;
    let _ = mount("tmpfs", &format!("{ROOT}/tmp"), "tmpfs", 0);
    let c2 = cfg.clone();
    std::thread::spawn(move || serve(&c2));
    let code = run_workload(&cfg);
    println!("@moat-exit {code}");
    let _ = std::io::stdout().flush();
    power_off()
}

fn write_etc(cfg: &Config) {
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for (n, ip) in &cfg.hosts {
        hosts.push_str(&format!("{ip} {n}\n"));
    }
    if !cfg.hostname.is_empty() {
        hosts.push_str(&format!("127.0.1.1 {}\n", cfg.hostname));
    }
    let _ = std::fs::create_dir_all(format!("{ROOT}/etc"));
    let _ = std::fs::write(format!("{ROOT}/etc/hosts"), hosts);
}

fn command(cfg: &Config, argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    for kv in &cfg.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    let workdir = cfg.workdir.clone().unwrap_or_else(|| "/".into());
    let (uid, gid) = (cfg.uid, cfg.gid);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let root = c"/root";
            if libc::chroot(root.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            let _ = std::env::set_current_dir(&workdir).or_else(|_| std::env::set_current_dir("/"));
            if gid != 0 && libc::setgid(gid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if uid != 0 && libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn run_workload(cfg: &Config) -> i32 {
    if cfg.argv.is_empty() {
        println!("@moat-error the image has no entrypoint or cmd; give `command:`");
        return 127;
    }
    let mut cmd = command(cfg, &cfg.argv);
    if let Some(out) = output_port() {
        if let Ok(err) = out.try_clone() {
            cmd.stderr(err);
        }
        cmd.stdout(out);
    }
    println!("@moat-start");
    let _ = std::io::stdout().flush();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            println!("moat-init: starting {:?}: {e}", cfg.argv);
            return 127;
        }
    };
    WORKLOAD.store(child.id() as i32, Ordering::SeqCst);
    match child.wait() {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
        }
        Err(_) => 255,
    }
}

fn switch_root(cfg: &Config) -> Result<(), String> {
    let _ = cfg;
    for m in ["/proc", "/sys", "/dev"] {
        let _ = mount(m, &format!("{ROOT}{m}"), "", libc::MS_MOVE);
    }
    std::env::set_current_dir(ROOT).map_err(|e| e.to_string())?;
    mount(".", "/", "", libc::MS_MOVE)?;
    // SAFETY: plain chroot to the moved root.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(format!("chroot: {}", std::io::Error::last_os_error()));
    }
    let _ = std::env::set_current_dir("/");
    for init in ["/sbin/init", "/lib/systemd/systemd", "/init", "/bin/sh"] {
        if Path::new(init).exists() {
            let e = Command::new(init).exec();
            println!("moat-init: exec {init}: {e}");
        }
    }
    Err("the image has no init".into())
}

/// The control port's device, found by its name.
fn ctl_port() -> Option<String> {
    port("moat.ctl")
}

/// A virtio-serial port's device, found by its name.
fn port(wanted: &str) -> Option<String> {
    for e in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == wanted {
            return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
        }
    }
    None
}

/// The output port `moat.out` (the host keeps it in `output.log`: what `moat
/// logs` shows), opened for the workload's stdout and stderr. `None` when QEMU
/// has no such port: the workload then writes to the console.
fn output_port() -> Option<std::fs::File> {
    let t = Instant::now();
    loop {
        if let Some(p) = port("moat.out") {
            if wait_for(&p, Duration::from_secs(2)) {
                return std::fs::OpenOptions::new().write(true).open(&p).ok();
            }
            return None;
        }
        // The port's device shows up with the control port's (same bus).
        if t.elapsed() > Duration::from_secs(2) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve(cfg: &Config) {
    let mut port = None;
    for _ in 0..200 {
        port = ctl_port();
        if port.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(port) = port else {
        println!("moat-init: no moat.ctl port; moat exec is unavailable");
        return;
    };
    loop {
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&port)
        else {
            return;
        };
        let mut w = match f.try_clone() {
            Ok(w) => w,
            Err(_) => return,
        };
        let mut r = BufReader::new(f);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => {
                    // Host side not connected. Keep the port open: closing it
                    // would make QEMU drop what the host sends meanwhile.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Ok(_) => {}
                Err(_) => break,
            }
            let reply = match serde_json::from_str::<Request>(line.trim()) {
                Ok(req) if req.op == "stop" => {
                    let pid = WORKLOAD.load(Ordering::SeqCst);
                    if pid > 0 {
                        // SAFETY: signalling the workload's process group and itself.
                        unsafe {
                            libc::kill(-pid, libc::SIGTERM);
                            libc::kill(pid, libc::SIGTERM);
                        }
                    }
                    Reply {
                        status: 0,
                        stdout: String::new(),
                        stderr: String::new(),
                    }
                }
                Ok(req) if req.op == "exec" && !req.argv.is_empty() => {
                    match command(cfg, &req.argv)
                        .stdin(std::process::Stdio::null())
                        .output()
                    {
                        Ok(o) => Reply {
                            status: o.status.code().unwrap_or(255),
                            stdout: String::from_utf8_lossy(&o.stdout).into(),
                            stderr: String::from_utf8_lossy(&o.stderr).into(),
                        },
                        Err(e) => Reply {
                            status: 127,
                            stdout: String::new(),
                            stderr: format!("{}: {e}\n", req.argv[0]),
                        },
                    }
                }
                _ => Reply {
                    status: 2,
                    stdout: String::new(),
                    stderr: "bad request\n".into(),
                },
            };
            let mut text = serde_json::to_string(&reply).unwrap_or_default();
            text.push('\n');
            if w.write_all(text.as_bytes()).is_err() {
                break;
            }
        }
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(15).enumerate() {
        r.ifr_name[i] = b as libc::c_char;
    }
    r
}

fn sockaddr(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr_in fits in sockaddr; all-zero is valid.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as _;
    sa.sin_addr.s_addr = u32::from(ip).to_be();
    // SAFETY: same size, plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sa) }
}

fn net_up(cfg: &Config) -> Result<(), String> {
    // SAFETY: plain socket for interface ioctls.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if s < 0 {
        return Err("socket".into());
    }
    let up = |name: &str| {
        let mut r = ifreq(name);
        // SAFETY: valid ifreq for SIOCGIFFLAGS/SIOCSIFFLAGS.
        unsafe {
            libc::ioctl(s, libc::SIOCGIFFLAGS, &mut r);
            r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS, &mut r)
        }
    };
    up("lo");
    let Some(ip) = &cfg.ip else {
        return Ok(());
    };
    let (addr, len) = ip.split_once('/').ok_or("bad ip")?;
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| "bad ip")?;
    let len: u32 = len.parse().map_err(|_| "bad prefix")?;
    let mask = std::net::Ipv4Addr::from(if len == 0 { 0 } else { u32::MAX << (32 - len) });
    if !wait_for("/sys/class/net/eth0", Duration::from_secs(10)) {
        return Err("no eth0 (virtio_net not loaded?)".into());
    }
    let mut r = ifreq("eth0");
    r.ifr_ifru.ifru_addr = sockaddr(addr);
    // SAFETY: valid ifreq.
    if unsafe { libc::ioctl(s, libc::SIOCSIFADDR, &mut r) } != 0 {
        return Err(format!("eth0 address: {}", std::io::Error::last_os_error()));
    }
    let mut r = ifreq("eth0");
    r.ifr_ifru.ifru_netmask = sockaddr(mask);
    // SAFETY: valid ifreq.
    unsafe { libc::ioctl(s, libc::SIOCSIFNETMASK, &mut r) };
    up("eth0");
    if let Some(gw) = cfg
        .gateway
        .as_deref()
        .and_then(|g| g.parse::<std::net::Ipv4Addr>().ok())
    {
        // SAFETY: rtentry is plain data; all-zero is valid.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(std::net::Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(std::net::Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        // SAFETY: valid rtentry.
        unsafe { libc::ioctl(s, libc::SIOCADDRT, &mut rt) };
    }
    // SAFETY: closing our socket.
    unsafe { libc::close(s) };
    Ok(())
}

fn power_off() -> ! {
    // SAFETY: sync and reboot; QEMU runs with -no-reboot and exits.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
