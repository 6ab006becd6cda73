//! Interactive sessions of Incus machines against the local incusd (root;
//! skipped without it): a login shell on a tty (marker, exit code), plain
//! streams (stdin piped to `cat`, EOF, stderr merged, input left unread), a resize seen by
//! `stty size`, a signal ending `sleep`, the console (output written to
//! /dev/console, input read from it, the console log), a missing command,
//! and a tty session through the HTTPS listener with a client certificate;
//! `moat shell` and `moat console` themselves on a pty (typing, SIGWINCH,
//! exit code, Ctrl-]) when this build's `moat` binary is there.

mod common;

use common::*;
use moat_driver::{Ctx, Driver, ExecSession, SessionOpts};
use moat_incus::client::{enc, Client};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

const PROJECT: &str = r#"
schema_version: 1
project: incusinteractive
addressing: { base: "10.176", zone_step: 1 }
defaults:
  driver: { container: incus }
domains:
  tty:
    trust_level: trusted
    egress: none
    machines:
      box: {}
"#;

const MACHINE: &str = "tty-box";

/// The session's fd as a stream with a read timeout.
fn stream(s: &ExecSession) -> UnixStream {
    let st = UnixStream::from(s.io.try_clone().expect("dup io"));
    st.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    st
}

/// Reads until `want` appears in what was read (or `secs` pass); returns all of it.
fn read_until(st: &mut UnixStream, want: &str, secs: u64) -> String {
    let t = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while t.elapsed() < Duration::from_secs(secs) {
        match st.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        if String::from_utf8_lossy(&out).contains(want) {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads to EOF (the session's end), up to `secs`.
fn read_to_end(st: &mut UnixStream, secs: u64) -> String {
    read_until(st, "\u{0}never\u{0}", secs)
}

/// The session's exit code, failing the test (and so cleaning up) when it
/// does not come within `secs`.
fn wait(s: ExecSession, secs: u64) -> i32 {
    wait_result(s, secs).expect("wait")
}

fn wait_result(s: ExecSession, secs: u64) -> Result<i32, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = s;
        let _ = tx.send(s.wait().map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(r) => r,
        Err(_) => panic!("the session did not end within {secs} s"),
    }
}

fn tty_opts(rows: u16, cols: u16) -> SessionOpts {
    SessionOpts {
        tty: Some((rows, cols)),
        env: vec!["TERM=xterm".into()],
        login: false,
    }
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// A pseudo-random number for markers the shell must compute (so the
/// terminal's echo of the typed line cannot match).
fn random() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ std::process::id())
        .unwrap_or(1)
        % 100_000
}

/// A login shell on a tty: types a command, gets the computed marker, exit 7.
fn shell_marker_exit(d: &dyn Driver, ctx: &Ctx, what: &str, code: i32) {
    let opts = SessionOpts {
        login: true,
        ..tty_opts(24, 80)
    };
    let s = d.exec_session(ctx, MACHINE, &[], &opts).expect("shell");
    assert!(s.tty);
    let mut st = stream(&s);
    let n = random();
    writeln!(
        st,
        "echo \"hi-$(({n}+1))-marker $HOME $(pwd) $SHELL\"; exit {code}"
    )
    .expect("type");
    let out = read_to_end(&mut st, 15);
    eprintln!("{what}: shell output {out:?}");
    let want = format!("hi-{}-marker /root /root /bin/sh", n + 1);
    assert!(out.contains(&want), "{what}: want '{want}' in {out:?}");
    assert_eq!(wait(s, 15), code, "{what}: exit code");
}

/// The `moat` binary of this build, when it is newer than the sources of
/// the two crates this test is about (`cargo test -p moat-incus` alone does
/// not rebuild it; `cargo test --workspace` does).
fn moat_bin() -> Option<std::path::PathBuf> {
    let deps = std::env::current_exe().ok()?.parent()?.to_path_buf();
    let bin = deps.parent()?.join("moat");
    let mtime = |p: &std::path::Path| p.metadata().and_then(|m| m.modified()).ok();
    let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let newest_source = ["moat-incus/src", "moat-cli/src"]
        .iter()
        .filter_map(|d| std::fs::read_dir(crates.join(d)).ok())
        .flat_map(|rd| rd.flatten())
        .filter_map(|e| mtime(&e.path()))
        .max()?;
    (mtime(&bin)? >= newest_source).then_some(bin)
}

/// The `moat` CLI running on a pty the test holds (the slave is its
/// controlling terminal, as in a terminal emulator).
struct Pty {
    child: std::process::Child,
    term: std::fs::File,
}

impl Pty {
    fn spawn(moat: &std::path::Path, root: &std::path::Path, args: &[&str]) -> Pty {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::process::CommandExt;
        let (mut m, mut sl) = (-1, -1);
        let ws = libc::winsize {
            ws_row: 25,
            ws_col: 90,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty fills two fds; ws is a valid winsize.
        let r =
            unsafe { libc::openpty(&mut m, &mut sl, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(r, 0, "openpty");
        // SAFETY: both fds were just returned by openpty and are owned here.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(sl)) };
        let mut cmd = Command::new(moat);
        cmd.arg("--root")
            .arg(root)
            .args(args)
            .env("TERM", "xterm")
            .stdin(slave.try_clone().expect("dup"))
            .stdout(slave.try_clone().expect("dup"))
            .stderr(slave);
        // SAFETY: setsid and ioctl are async-signal-safe; stdin is the slave.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("moat on a pty");
        Pty {
            child,
            term: std::fs::File::from(master),
        }
    }

    fn read_until(&mut self, want: &str, secs: u64) -> String {
        use std::os::fd::AsRawFd;
        let t = Instant::now();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while t.elapsed() < Duration::from_secs(secs) {
            let mut pfd = libc::pollfd {
                fd: self.term.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one live pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
                continue;
            }
            match self.term.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&out).contains(want) {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The CLI's exit code (the pty kept drained meanwhile).
    fn exit_code(&mut self, secs: u64) -> Option<i32> {
        let t = Instant::now();
        loop {
            self.read_until("\u{0}", 0);
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code();
            }
            if t.elapsed() > Duration::from_secs(secs) {
                let _ = self.child.kill();
                panic!("moat did not end within {secs} s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `moat shell` on a real terminal: typed input, a resize (SIGWINCH), the
/// exit code.
fn cli_shell_on_a_pty(moat: &std::path::Path, root: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let mut pty = Pty::spawn(moat, root, &["shell", MACHINE]);
    let n = random();
    write!(pty.term, "stty size; echo \"cli-$(({n}+1))-marker\"\r").expect("type");
    let out = pty.read_until(&format!("cli-{}-marker", n + 1), 15);
    assert!(out.contains("25 90"), "moat shell: initial size in {out:?}");
    assert!(out.contains(&format!("cli-{}-marker", n + 1)), "{out:?}");
    let ws = libc::winsize {
        ws_row: 31,
        ws_col: 111,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a valid winsize; the kernel sends SIGWINCH to the CLI.
    unsafe { libc::ioctl(pty.term.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    let mut seen = String::new();
    assert!(
        wait_until(10, || {
            let _ = write!(pty.term, "stty size\r");
            seen = pty.read_until("31 111", 1);
            seen.contains("31 111")
        }),
        "moat shell: size after the terminal's resize: {seen:?}"
    );
    write!(pty.term, "exit 7\r").expect("type");
    assert_eq!(pty.exit_code(15), Some(7), "moat shell's exit code");
}

/// `moat console` on a real terminal: a line the machine writes to
/// /dev/console shows; Ctrl-] leaves with 0.
fn cli_console_on_a_pty(moat: &std::path::Path, root: &std::path::Path, e: &moat_engine::Engine) {
    let mut pty = Pty::spawn(moat, root, &["console", MACHINE]);
    let out = pty.read_until("Ctrl-] leaves", 10);
    assert!(out.contains("console"), "moat console: {out:?}");
    let n = random();
    let marker = format!("cli-console-{n}");
    assert!(
        wait_until(10, || {
            let _ = e.exec(
                MACHINE,
                &argv(&["sh", "-c", &format!("echo {marker} >/dev/console")]),
            );
            pty.read_until(&marker, 1).contains(&marker)
        }),
        "moat console shows what the machine writes to /dev/console"
    );
    pty.term.write_all(&[0x1d]).expect("Ctrl-]");
    assert_eq!(pty.exit_code(15), Some(0), "moat console's exit code");
}

#[test]
fn interactive_sessions_local_and_remote() {
    let Some(client) = incus() else { return };
    let t = TestRoot::new(client.clone());
    t.write(PROJECT);
    let proj = t.project();
    let mut e = t.engine();
    apply(&mut e, &proj);
    let ctx = Ctx {
        root: t.root(),
        run_dir: t.root().join("run"),
        root_tag: t.tag.clone(),
    };
    let d = moat_incus::IncusDriver::with_client(client.clone());

    // 1. A login shell on a tty, through the engine as `moat shell` calls it.
    let started = Instant::now();
    shell_marker_exit(&d, &ctx, "local", 7);
    eprintln!("tty shell session: {:?}", started.elapsed());
    match moat_bin() {
        Some(moat) => {
            let started = Instant::now();
            cli_shell_on_a_pty(&moat, &t.root());
            eprintln!("moat shell on a pty: {:?}", started.elapsed());
            let started = Instant::now();
            cli_console_on_a_pty(&moat, &t.root(), &e);
            eprintln!("moat console on a pty: {:?}", started.elapsed());
        }
        None => eprintln!(
            "SKIP (moat shell on a pty): no up-to-date moat binary; `cargo build -p moat-cli`"
        ),
    }

    // 2. Plain streams: stdin piped to cat, then EOF; exit 0.
    let s = e
        .exec_session(MACHINE, &argv(&["cat"]), false, None)
        .expect("cat");
    assert!(!s.tty);
    let mut st = stream(&s);
    st.write_all(b"line one\nline two\n").expect("write");
    let got = read_until(&mut st, "line two\n", 10);
    assert_eq!(got, "line one\nline two\n");
    s.close_stdin().expect("close stdin");
    assert_eq!(read_to_end(&mut st, 10), "", "nothing after EOF");
    assert_eq!(wait(s, 15), 0, "cat ends with 0 on EOF");

    // A process that ends before reading all its input: the caller sees the
    // end of output, not an error (unread input is dropped).
    let s = e
        .exec_session(MACHINE, &argv(&["head", "-c", "5"]), false, None)
        .expect("head");
    let mut st = stream(&s);
    st.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Like `yes |`: writes until the pipe breaks (EPIPE once the session ended).
    let writer = {
        let mut w = st.try_clone().expect("dup");
        std::thread::spawn(move || {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) && w.write_all(&[b'z'; 4096]).is_ok() {}
        })
    };
    // Read only once the session is over and its socket closed.
    writer.join().expect("writer");
    std::thread::sleep(Duration::from_millis(300));
    let (t0, mut out, mut buf) = (Instant::now(), Vec::new(), [0u8; 4096]);
    while t0.elapsed() < Duration::from_secs(10) {
        match st.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading a session whose process left input unread: {e}"),
        }
    }
    assert_eq!(out, b"zzzzz");
    assert_eq!(wait(s, 15), 0);

    // stdout and stderr merged, the exit code kept.
    let s = e
        .exec_session(
            MACHINE,
            &argv(&["sh", "-c", "echo out; sleep 0.2; echo err >&2; exit 3"]),
            false,
            None,
        )
        .expect("sh");
    let mut st = stream(&s);
    let out = read_to_end(&mut st, 10);
    assert!(out.contains("out\n") && out.contains("err\n"), "{out:?}");
    assert_eq!(wait(s, 15), 3);

    // 3. Resize: `stty size` inside follows.
    let s = d
        .exec_session(&ctx, MACHINE, &argv(&["sh"]), &tty_opts(24, 80))
        .expect("sh on a tty");
    let mut st = stream(&s);
    writeln!(st, "stty size").expect("type");
    let out = read_until(&mut st, "24 80", 10);
    assert!(out.contains("24 80"), "initial size: {out:?}");
    s.resize(33, 101).expect("resize");
    let mut seen = String::new();
    assert!(
        wait_until(10, || {
            let _ = writeln!(st, "stty size");
            seen = read_until(&mut st, "33 101", 1);
            seen.contains("33 101")
        }),
        "size after resize: {seen:?}"
    );
    writeln!(st, "exit 0").expect("type");
    read_to_end(&mut st, 10);
    assert_eq!(wait(s, 15), 0);

    // 4. A signal ends `sleep`: 128 + SIGTERM.
    let s = d
        .exec_session(
            &ctx,
            MACHINE,
            &argv(&["sleep", "60"]),
            &SessionOpts::default(),
        )
        .expect("sleep");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    s.signal(libc::SIGTERM).expect("signal");
    let mut st = stream(&s);
    read_to_end(&mut st, 15);
    let code = wait(s, 15);
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "sleep outlived SIGTERM"
    );
    assert_eq!(code, 128 + libc::SIGTERM, "exit code of a signalled sleep");

    // 5. A command that does not exist: Incus's own message, or 127.
    match d.exec_session(
        &ctx,
        MACHINE,
        &argv(&["/no/such/cmd"]),
        &SessionOpts::default(),
    ) {
        Err(e) => eprintln!("missing command refused: {e}"),
        Ok(s) => {
            let mut st = stream(&s);
            read_to_end(&mut st, 10);
            match wait_result(s, 15) {
                Ok(code) => assert_eq!(code, 127, "missing command"),
                Err(e) => eprintln!("missing command: {e}"),
            }
        }
    }

    // 6. The console: what the machine writes to /dev/console arrives, what
    //    is typed there is read by the machine; the log has the output.
    //    Incus connects the console's websocket after `console_session`
    //    returns, and a line written before that is not replayed: write
    //    until one arrives (each attempt with its own marker).
    let cs = d.console_session(&ctx, MACHINE, (24, 80)).expect("console");
    let mut st = stream(&cs);
    let mut out = String::new();
    let arrived = (0..10).map(|_| random()).find(|n| {
        let o = e
            .exec(
                MACHINE,
                &argv(&["sh", "-c", &format!("echo console-{n}-out >/dev/console")]),
            )
            .expect("write to the console");
        assert_eq!(o.status, 0, "{}", String::from_utf8_lossy(&o.stderr));
        out.push_str(&read_until(&mut st, &format!("console-{n}-out"), 1));
        out.contains(&format!("console-{n}-out"))
    });
    let Some(n) = arrived else {
        panic!("nothing written to /dev/console arrived: {out:?}")
    };
    let reader = d
        .exec_session(
            &ctx,
            MACHINE,
            &argv(&[
                "sh",
                "-c",
                "read -r x </dev/console; echo \"got-$x-back\" >/dev/console",
            ]),
            &SessionOpts::default(),
        )
        .expect("console reader");
    std::thread::sleep(Duration::from_millis(300));
    st.write_all(format!("in{n}\r").as_bytes()).expect("type");
    // What the console's line held before our input may precede it (a
    // terminal reset `ESC c` left by an earlier console client was seen in
    // CI): the typed text must come back whole, after "got-".
    let out = read_until(&mut st, &format!("in{n}-back"), 10);
    assert!(
        out.contains("got-") && out.contains(&format!("in{n}-back")),
        "{out:?}"
    );
    assert_eq!(wait(reader, 15), 0);
    drop(st);
    drop(cs);
    let log = d.console_log(&ctx, MACHINE).expect("console log");
    assert!(
        String::from_utf8_lossy(&log).contains(&format!("console-{n}-out")),
        "console log: {}",
        String::from_utf8_lossy(&log)
    );

    // 7. Remote: the same through HTTPS with a client certificate.
    match Remote::open(&client, &t) {
        None => eprintln!("SKIP (remote part): openssl could not make a client certificate"),
        Some(r) => {
            let dr = moat_incus::IncusDriver::with_client(r.https.clone());
            let started = Instant::now();
            shell_marker_exit(&dr, &ctx, "remote", 5);
            eprintln!("remote tty shell session: {:?}", started.elapsed());
            let s = dr
                .exec_session(&ctx, MACHINE, &argv(&["cat"]), &SessionOpts::default())
                .expect("remote cat");
            let mut st = stream(&s);
            // Larger than one TLS record and one websocket read.
            let big: String = (0..4000).map(|i| format!("{i:05}\n")).collect();
            let writer = {
                let mut w = st.try_clone().expect("dup");
                let big = big.clone();
                std::thread::spawn(move || w.write_all(big.as_bytes()))
            };
            let got = read_until(&mut st, "03999\n", 20);
            writer.join().expect("writer").expect("write");
            assert_eq!(got.len(), big.len(), "remote cat echoes everything");
            assert_eq!(got, big);
            s.close_stdin().expect("close stdin");
            read_to_end(&mut st, 10);
            assert_eq!(wait(s, 15), 0);
        }
    }
}

/// The HTTPS listener on a free loopback port and a trusted client
/// certificate; both undone on drop.
struct Remote {
    local: Client,
    had_address: String,
    cert_name: String,
    https: Client,
}

impl Remote {
    fn open(local: &Client, t: &TestRoot) -> Option<Remote> {
        let dir = t.project();
        let had_address = local.get("/1.0").expect("server")["config"]["core.https_address"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let st = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=moat-test",
            ])
            .arg("-keyout")
            .arg(dir.join("client.key"))
            .arg("-out")
            .arg(dir.join("client.crt"))
            .stderr(std::process::Stdio::null())
            .status();
        if !st.is_ok_and(|s| s.success()) {
            return None;
        }
        let mut r = Remote {
            local: local.clone(),
            had_address,
            cert_name: format!("moat-test-{}", t.tag),
            https: Client::local(),
        };
        local
            .call(
                "PATCH",
                "/1.0",
                Some(&json!({"config": {"core.https_address": format!("127.0.0.1:{port}")}})),
            )
            .expect("open the HTTPS listener");
        let pem = std::fs::read_to_string(dir.join("client.crt")).expect("cert");
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        local
            .call(
                "POST",
                "/1.0/certificates",
                Some(&json!({"name": r.cert_name, "type": "client", "certificate": b64})),
            )
            .expect("trust the client certificate");
        let server_pem = local.get("/1.0").expect("server")["environment"]["certificate"]
            .as_str()
            .expect("server certificate")
            .to_string();
        std::fs::write(dir.join("server.crt"), server_pem).expect("write server.crt");
        let https = Client::https(
            &format!("https://127.0.0.1:{port}"),
            &dir.join("client.crt"),
            &dir.join("client.key"),
            &dir.join("server.crt"),
        )
        .expect("https client");
        assert_eq!(https.get("/1.0").expect("GET /1.0")["auth"], "trusted");
        r.https = https;
        Some(r)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let certs = self
            .local
            .get("/1.0/certificates?recursion=1")
            .unwrap_or_default();
        for c in certs.as_array().into_iter().flatten() {
            if c["name"].as_str() == Some(self.cert_name.as_str()) {
                if let Some(fp) = c["fingerprint"].as_str() {
                    let _ =
                        self.local
                            .call("DELETE", &format!("/1.0/certificates/{}", enc(fp)), None);
                }
            }
        }
        let _ = self.local.call(
            "PATCH",
            "/1.0",
            Some(&json!({"config": {"core.https_address": self.had_address}})),
        );
    }
}
