//! Interactive exec through a real pty, as root: `moat shell` and
//! `moat exec -t` driven from a pty pair this test opens (the test plays the
//! user's terminal): typed input, output, `tty` naming the container's own
//! /dev/pts/N, `stty size` following a resize (SIGWINCH relayed), the
//! command's exit code, and the caller's terminal settings restored after.
//! Also `exec -i` (streams, no tty) with stdin from a pipe.

mod common;

use common::Root;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The test's side of a terminal: a pty pair; `moat` gets the slave as its
/// controlling terminal, the test reads and writes the master.
struct Term {
    master: std::fs::File,
    slave: OwnedFd,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Term {
    fn new(rows: u16, cols: u16) -> Term {
        let (mut m, mut s) = (0, 0);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty fills two fds; null name and termios, a winsize we own.
        let r =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded; both fds are ours.
        let (master, slave) = unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().expect("dup master");
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Term { master, slave, out }
    }

    /// `moat ARGS` with the slave as stdin/stdout/stderr and controlling terminal.
    fn spawn(&self, root: &Root, args: &[&str]) -> std::process::Child {
        let fd = self.slave.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat"));
        cmd.arg("--root")
            .arg(root.path())
            .args(args)
            .env("MOAT_SUPERVISOR", &root.sup)
            .env("TERM", "xterm")
            .stdin(Stdio::from(self.slave.try_clone().unwrap()))
            .stdout(Stdio::from(self.slave.try_clone().unwrap()))
            .stderr(Stdio::from(self.slave.try_clone().unwrap()));
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                let _ = fd;
                Ok(())
            });
        }
        cmd.spawn().expect("spawn moat")
    }

    fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Waits until the output holds `needle` (after position `from`).
    fn expect(&self, from: usize, needle: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = self.text();
            if let Some(i) = t.get(from..).and_then(|s| s.find(needle)) {
                return from + i + needle.len();
            }
            if Instant::now() >= deadline {
                // The end of it (a flood would drown the message).
                let rest: Vec<char> = t[from.min(t.len())..].chars().collect();
                let tail: String = rest[rest.len().saturating_sub(2000)..].iter().collect();
                panic!(
                    "no {needle:?} in the terminal output ({} chars); its end: {tail:?}",
                    rest.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on our master with a winsize we own.
        unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    }

    fn lflag(&self) -> libc::tcflag_t {
        // SAFETY: tcgetattr into a termios we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            libc::tcgetattr(self.slave.as_raw_fd(), &mut t);
            t.c_lflag
        }
    }
}

fn wait_exit(child: &mut std::process::Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("moat did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn shell_and_exec_through_a_pty() {
    let Some(r) = common::root_or_skip() else {
        return;
    };
    r.ok(&[
        "run", "-d", "--name", "tt", "busybox", "--", "sleep", "100000",
    ]);

    // `moat shell`: a login shell on a pty of the container's own devpts.
    let mut term = Term::new(30, 100);
    let before = term.lflag();
    let mut shell = term.spawn(&r, &["shell", "tt"]);
    term.type_line("tty; stty size; echo TERM=$TERM");
    let p = term.expect(0, "/dev/pts/");
    let p = term.expect(p, "30 100");
    let p = term.expect(p, "TERM=xterm");
    // While moat runs, our terminal is raw (no echo, no line editing).
    assert_eq!(term.lflag() & (libc::ECHO | libc::ICANON), 0);
    // A resize of the caller's terminal reaches the process (SIGWINCH relayed).
    term.resize(40, 120);
    std::thread::sleep(Duration::from_millis(200));
    term.type_line("stty size");
    let p = term.expect(p, "40 120");
    term.type_line("echo h''i; exit 7");
    term.expect(p, "hi\r\n");
    assert_eq!(wait_exit(&mut shell), Some(7));
    assert_eq!(
        term.lflag(),
        before,
        "the caller's terminal settings are restored"
    );

    // `moat exec -t`: the command's exit code, output through the pty.
    let term = Term::new(24, 80);
    let mut ex = term.spawn(&r, &["exec", "-t", "tt", "--", "sh", "-c", "tty; exit 3"]);
    term.expect(0, "/dev/pts/");
    assert_eq!(wait_exit(&mut ex), Some(3));

    // `moat exec -i`: stdin from a pipe, no tty.
    let mut ex = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("--root")
        .arg(r.path())
        .args([
            "exec",
            "-i",
            "tt",
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; tty; exit 4",
        ])
        .env("MOAT_SUPERVISOR", &r.sup)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    ex.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let o = ex.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(4));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("ABC\n"), "{text}");
    assert!(text.contains("not a tty"), "{text}");
}

/// `moat run -t --rm`: PID 1 itself gets a terminal of the container's own
/// devpts (its controlling terminal: ^C interrupts), sized like the caller's
/// and following its resizes; the exit code of PID 1 comes back, and the
/// machine is gone afterwards.
#[test]
fn run_t_gives_pid_1_a_terminal() {
    let Some(r) = common::root_or_skip() else {
        return;
    };
    let mut term = Term::new(30, 100);
    let before = term.lflag();
    let mut run = term.spawn(
        &r,
        &["run", "-t", "--rm", "--name", "rt", "busybox", "--", "sh"],
    );
    term.type_line("tty; stty size; echo TERM=$TERM; echo pid=$$");
    let p = term.expect(0, "/dev/pts/0");
    let p = term.expect(p, "30 100");
    let p = term.expect(p, "TERM=xterm");
    let p = term.expect(p, "pid=1\r\n");
    assert_eq!(term.lflag() & (libc::ECHO | libc::ICANON), 0);
    term.resize(40, 120);
    std::thread::sleep(Duration::from_millis(200));
    term.type_line("stty size");
    let p = term.expect(p, "40 120");
    // ^C reaches the foreground job through the terminal (job control).
    // (The markers are computed so that the echo of the typed line does not match.)
    term.type_line("sleep 1000");
    std::thread::sleep(Duration::from_millis(500));
    term.master.write_all(&[3]).unwrap();
    term.type_line("echo alive-$((2+3))");
    let p = term.expect(p, "alive-5");
    term.type_line("echo b''ye; exit 5");
    term.expect(p, "bye\r\n");
    assert_eq!(wait_exit(&mut run), Some(5));
    assert_eq!(
        term.lflag(),
        before,
        "the caller's terminal settings are restored"
    );
    // --rm: nothing of the machine is left.
    assert!(!r.path().join("machines/rt").exists());
    assert!(r.mounts().is_empty(), "{:?}", r.mounts());

    // Piped input and its end go through the same relay, in order: `cat`
    // gets every line before the ^D that ends it (five times over).
    for i in 0..5 {
        let o = r.moat_input(
            &["run", "-t", "--rm", "busybox", "--", "cat"],
            &format!("piped-{i}-a\npiped-{i}-b\n"),
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{out} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains(&format!("piped-{i}-b")), "input lost: {out:?}");
    }

    // -t -d: PID 1's terminal waits for `moat console`; Ctrl-] leaves it
    // running, and the next console finds the same shell. (--rm with it is refused.)
    let o = r.moat(&["run", "-t", "-d", "--rm", "busybox", "--", "true"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("drop --rm"));
    assert_eq!(
        r.ok(&["run", "-t", "-d", "--name", "td", "busybox", "--", "sh"])
            .trim(),
        "td"
    );
    let mut term = Term::new(30, 100);
    let mut con = term.spawn(&r, &["console", "td"]);
    term.type_line("X=kept-$((3*3)); echo one-$((1+1))");
    let p = term.expect(0, "one-2");
    term.master.write_all(&[0x1d]).unwrap();
    assert_eq!(wait_exit(&mut con), Some(0), "Ctrl-] leaves with 0");
    assert_eq!(term.lflag(), before, "terminal settings restored");
    r.ok(&["exec", "td", "--", "true"]);
    // The supervisor drains the terminal while nobody is attached: a flood
    // does not block PID 1, and it all lands in the logs.
    r.ok(&[
        "exec",
        "td",
        "--",
        "sh",
        "-c",
        "for i in $(seq 1 2000); do echo flood-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done > /proc/1/fd/1",
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !r.ok(&["logs", "td"]).contains("flood-2000-") {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood is not in the logs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        r.ok(&["logs", "td"]).contains("one-2"),
        "terminal output is logged"
    );
    // A new console first gets the tail of what was printed (the flood's end).
    let mut con = term.spawn(&r, &["console", "td"]);
    let p = term.expect(p, "flood-2000-");
    term.type_line("echo again-$X");
    let p = term.expect(p, "again-kept-9");
    term.type_line("exit 4");
    let _ = p;
    assert_eq!(wait_exit(&mut con), Some(4), "PID 1's exit code");
    let o = r.moat(&["console", "td"]);
    assert!(!o.status.success(), "console of a stopped machine");
    assert!(String::from_utf8_lossy(&o.stderr).contains("not running"));
    r.ok(&["destroy", "td", "--force"]);
    assert!(r.mounts().is_empty(), "{:?}", r.mounts());
}

/// Input the process does not read yet never stops its output: the relay
/// queues what it cannot write (up to a bound, then it stops reading its own
/// stdin) instead of blocking on it. A blocking write once deadlocked
/// `exec -i` fed more than a pipe's worth while the command was printing,
/// and a paste into `exec -t` larger than the pty's input buffer.
#[test]
fn relay_keeps_output_flowing_while_input_waits() {
    let Some(r) = common::root_or_skip() else {
        return;
    };
    r.ok(&[
        "run", "-d", "--name", "fl", "busybox", "--", "sleep", "100000",
    ]);
    // exec -i: 1 MB in, 1 MB out first, then the input is counted.
    let mut ex = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("--root")
        .arg(r.path())
        .args([
            "exec",
            "-i",
            "fl",
            "--",
            "sh",
            "-c",
            "head -c 1000000 /dev/zero | tr '\\0' x; echo; wc -c",
        ])
        .env("MOAT_SUPERVISOR", &r.sup)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = ex.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let line = [b'a'; 1000];
        for _ in 0..1000 {
            if input.write_all(&line).is_err() {
                break;
            }
        }
    });
    let pid = ex.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(ex.wait_with_output());
    });
    let o = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            // SAFETY: kill of the child we spawned (not yet reaped).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("exec -i deadlocked: input waiting blocked the output");
        }
    };
    let _ = feeder.join();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.bytes().filter(|&b| b == b'x').count(), 1_000_000);
    assert_eq!(
        text.trim_end().rsplit('\n').next().map(str::trim),
        Some("1000000")
    );

    // exec -t: a 2 MB paste while the command (in raw mode, as an editor
    // is: the line discipline then holds input back instead of dropping it)
    // prints and has not read yet.
    let term = Term::new(24, 80);
    let mut ex = term.spawn(
        &r,
        &[
            "exec",
            "-t",
            "fl",
            "--",
            "sh",
            "-c",
            "stty raw -echo; sleep 1; head -c 300000 /dev/zero | tr '\\0' y; echo; echo done-$((1+1))",
        ],
    );
    let mut paste = term.master.try_clone().unwrap();
    std::thread::spawn(move || {
        let chunk = [b'p'; 1000];
        for _ in 0..2000 {
            if paste.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    term.expect(0, "done-2");
    assert_eq!(wait_exit(&mut ex), Some(0));
    r.ok(&["destroy", "fl", "--force"]);
}
