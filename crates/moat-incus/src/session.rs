//! Interactive exec (`moat exec -t/-i`, `moat shell`) and the console
//! (`moat console`) of Incus instances, through Incus's websockets.
//!
//! ```text
//! POST /1.0/instances/<n>/exec {wait-for-websocket, interactive: tty}
//!   (or POST /1.0/instances/<n>/console {type: console})
//!   ─▶ async operation, metadata.fds = {"0", ["1", "2",] "control"} (secrets)
//!   ─▶ one websocket per fd: GET /1.0/operations/<id>/websocket?secret=S, over the
//!      client's transport (Unix socket, or TLS with the client certificate)
//!
//! caller's fd ◀─ socketpair ─▶ relay thread (poll(2), non-blocking websockets)
//!      tty / console: "0" carries both directions (the instance's pty)
//!      plain streams: "0" stdin, "1" + "2" merged into the socket
//!      end of a stream either way: an empty text message (Incus's "barrier")
//! resize, signal ─▶ JSON messages on "control" (from the caller's thread)
//! wait           ─▶ GET /1.0/operations/<id>/wait ─▶ metadata.return
//! ```
//!
//! One relay thread per session serves every data websocket: tungstenite's
//! sockets are not split into halves, so the thread reads and writes each
//! of them in non-blocking mode and drains a readable one until it would
//! block (TLS may hold decrypted bytes the socket no longer shows).

use crate::client::{Client, Stream};
use crate::IncusError;
use moat_driver::{ExecSession, SessionOpts, SessionProcess};
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;
use tungstenite::{Message, WebSocket};

type Ws = WebSocket<Stream>;

const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `login`: root's shell and home from the instance's /etc/passwd (`/bin/sh`
/// when missing), started as a login shell in that home, as the native
/// driver does. Run by the instance's /bin/sh, so it works on any image.
const LOGIN_SCRIPT: &str = r#"shell=/bin/sh home=/
if [ -r /etc/passwd ]; then
  while IFS=: read -r _ _ uid _ _ dir sh; do
    if [ "$uid" = 0 ]; then shell=$sh home=$dir; break; fi
  done </etc/passwd
fi
[ -n "$shell" ] && [ -x "$shell" ] || shell=/bin/sh
cd "$home" 2>/dev/null || { home=/; cd /; }
export HOME="$home" SHELL="$shell" USER=root LOGNAME=root
exec "$shell" -l"#;

/// The request body of an exec session.
pub fn exec_body(argv: &[String], opts: &SessionOpts) -> Value {
    let command: Vec<String> = if opts.login {
        vec!["/bin/sh".into(), "-c".into(), LOGIN_SCRIPT.into()]
    } else {
        argv.to_vec()
    };
    let mut env = serde_json::Map::new();
    env.insert("PATH".into(), json!(PATH_ENV));
    for kv in &opts.env {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.into(), json!(v));
        }
    }
    let (rows, cols) = opts.tty.unwrap_or((24, 80));
    json!({
        "command": command,
        "environment": env,
        "interactive": opts.tty.is_some(),
        "wait-for-websocket": true,
        "record-output": false,
        "width": cols,
        "height": rows,
    })
}

/// Starts `argv` (or the login shell) in an instance: `exec_path` is
/// `/1.0/instances/<n>/exec?project=<p>`.
pub fn exec(
    c: &Client,
    exec_path: &str,
    project: &str,
    argv: &[String],
    opts: &SessionOpts,
) -> Result<ExecSession, IncusError> {
    if argv.is_empty() && !opts.login {
        return Err(IncusError::Config {
            message: "interactive exec needs a command (or the login shell)".into(),
        });
    }
    let body = exec_body(argv, opts);
    let request = format!("POST {exec_path}");
    let (op, fds) = start(c, exec_path, &body, &request)?;
    let tty = opts.tty.is_some();
    let names: &[(&str, Dir)] = if tty {
        &[("0", Dir::Both)]
    } else {
        &[("0", Dir::In), ("1", Dir::Out), ("2", Dir::Out)]
    };
    open(c, op, project, &fds, names, tty, request, true)
}

/// The instance's console (`type: console`, the same pty that its init
/// writes to) at `size` (rows, cols): `console_path` is
/// `/1.0/instances/<n>/console?project=<p>`. The session's `wait` returns 0
/// once the caller has left; signals are not supported.
pub fn console(
    c: &Client,
    console_path: &str,
    project: &str,
    size: (u16, u16),
) -> Result<ExecSession, IncusError> {
    let body = json!({"type": "console", "width": size.1, "height": size.0});
    let request = format!("POST {console_path}");
    let (op, fds) = start(c, console_path, &body, &request)?;
    open(
        c,
        op,
        project,
        &fds,
        &[("0", Dir::Both)],
        true,
        request,
        false,
    )
}

/// Posts the request and returns the operation and its websocket secrets.
fn start(
    c: &Client,
    path: &str,
    body: &Value,
    request: &str,
) -> Result<(String, Value), IncusError> {
    match c.send("POST", path, Some(body))? {
        crate::client::Envelope::Async {
            operation,
            metadata,
        } if !operation.is_empty() => {
            let fds = metadata["metadata"]["fds"].clone();
            if !fds.is_object() {
                return Err(IncusError::Protocol {
                    request: request.into(),
                    message: format!("no websocket secrets in the operation: {metadata}"),
                });
            }
            Ok((operation, fds))
        }
        other => Err(IncusError::Protocol {
            request: request.into(),
            message: format!("expected an operation, got {other:?}"),
        }),
    }
}

/// Connects the websockets of operation `op` and starts the relay.
#[allow(clippy::too_many_arguments)]
fn open(
    c: &Client,
    op: String,
    project: &str,
    fds: &Value,
    names: &[(&str, Dir)],
    tty: bool,
    request: String,
    exec: bool,
) -> Result<ExecSession, IncusError> {
    let secret = |name: &str| {
        fds[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| IncusError::Protocol {
                request: request.clone(),
                message: format!("no secret for websocket '{name}' in {fds}"),
            })
    };
    let connected = (|| {
        // Control first, as Incus's own client does.
        let control = connect(c, &op, project, &secret("control")?)?;
        let mut chans = Vec::new();
        for (name, dir) in names {
            let ws = connect(c, &op, project, &secret(name)?)?;
            ws.get_ref()
                .set_nonblocking(true)
                .map_err(|e| io_err(e, "websocket"))?;
            chans.push(Chan {
                ws,
                dir: *dir,
                open: true,
                pending: false,
            });
        }
        Ok::<_, IncusError>((control, chans))
    })();
    let (control, chans) = match connected {
        Ok(x) => x,
        Err(e) => {
            // The operation would wait for its websockets until Incus times it out.
            let _ = c.send("DELETE", &op, None);
            return Err(e);
        }
    };
    let (caller, ours) = UnixStream::pair().map_err(|e| io_err(e, "socketpair"))?;
    let keep = caller.try_clone().map_err(|e| io_err(e, "socketpair"))?;
    std::thread::Builder::new()
        .name("incus-relay".into())
        .spawn(move || relay(ours, chans, !exec))
        .map_err(|e| io_err(e, "relay thread"))?;
    Ok(ExecSession {
        io: OwnedFd::from(caller),
        tty,
        process: Box::new(IncusProcess {
            client: c.clone(),
            op,
            control: Mutex::new(control),
            caller: keep,
            tty,
            request,
            exec,
        }),
    })
}

fn io_err(source: io::Error, what: &str) -> IncusError {
    IncusError::Io {
        what: format!("interactive session: {what}"),
        source,
    }
}

/// One websocket of operation `op` (`/1.0/operations/<id>`).
fn connect(c: &Client, op: &str, project: &str, secret: &str) -> Result<Ws, IncusError> {
    use crate::client::enc;
    let path = format!(
        "{op}/websocket?secret={}&project={}",
        enc(secret),
        enc(project)
    );
    let stream = c.connect(c.io_timeout)?;
    let (ws, _) =
        tungstenite::client::client(format!("ws://incus{path}"), stream).map_err(|e| {
            let message = match e {
                tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => {
                    // Incus's own error envelope, when it sent one.
                    let body: Value = resp
                        .body()
                        .as_deref()
                        .and_then(|b| serde_json::from_slice(b).ok())
                        .unwrap_or(Value::Null);
                    body["error"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("HTTP {}", resp.status()))
                }
                other => other.to_string(),
            };
            IncusError::Api {
                request: format!("websocket {op}/websocket"),
                code: 400,
                message,
            }
        })?;
    ws.get_ref()
        .clear_timeouts()
        .map_err(|e| io_err(e, "websocket"))?;
    Ok(ws)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// The pty: caller's input out, output back.
    Both,
    /// stdin only.
    In,
    /// stdout or stderr.
    Out,
}

struct Chan {
    ws: Ws,
    dir: Dir,
    open: bool,
    /// Written frames not yet flushed (the socket would block).
    pending: bool,
}

impl Chan {
    fn flush(&mut self) {
        match self.ws.flush() {
            Ok(()) => self.pending = false,
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.pending = true
            }
            Err(_) => self.open = false,
        }
    }

    fn send(&mut self, msg: Message) {
        match self.ws.write(msg) {
            // A frame that would block is buffered: flushed when writable.
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                self.open = false;
                return;
            }
        }
        self.flush();
    }

    /// Reads every message available; output goes to `local`. `false` when
    /// `local` is gone (nobody reads the session any more).
    fn drain(&mut self, local: &mut UnixStream) -> bool {
        loop {
            match self.ws.read() {
                Ok(Message::Binary(b)) if self.dir != Dir::In => {
                    if local.write_all(&b).is_err() {
                        return false;
                    }
                }
                // Incus's end of a stream (a "barrier"): an empty text message.
                // On the pty Incus then waits for the client's own barrier.
                Ok(Message::Text(_)) if self.dir != Dir::In => {
                    if self.dir == Dir::Both {
                        self.send(barrier());
                    }
                    self.open = false;
                }
                Ok(Message::Close(_)) => self.open = false,
                // Pings (Incus sends one every 10 s) are answered on flush.
                Ok(_) => self.flush(),
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return true
                }
                Err(_) => self.open = false,
            }
            if !self.open {
                return true;
            }
        }
    }
}

/// End of stream in Incus's websocket protocol.
fn barrier() -> Message {
    Message::text("")
}

/// Moves bytes between the caller's socket and the websockets until every
/// output websocket is closed (the process ended), then closes the socket.
/// A console is left (its websocket closed) when the caller closes its end.
fn relay(mut local: UnixStream, mut chans: Vec<Chan>, console: bool) {
    let input = chans.iter().position(|c| c.dir != Dir::Out);
    let mut local_in = true;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if !chans.iter().any(|c| c.open && c.dir != Dir::In) {
            break;
        }
        // No new input while the last is still unsent (backpressure).
        let want_local = local_in && input.is_some_and(|i| chans[i].open && !chans[i].pending);
        let mut pfds = vec![libc::pollfd {
            fd: if want_local { local.as_raw_fd() } else { -1 },
            events: libc::POLLIN,
            revents: 0,
        }];
        for c in &chans {
            pfds.push(libc::pollfd {
                fd: if c.open { c.ws.get_ref().raw_fd() } else { -1 },
                events: libc::POLLIN | if c.pending { libc::POLLOUT } else { 0 },
                revents: 0,
            });
        }
        // SAFETY: poll over a live array of pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if pfds[0].revents != 0 {
            if let Some(i) = input {
                let c = &mut chans[i];
                match local.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        local_in = false;
                        // End of input: a barrier on stdin is EOF for the
                        // process. A pty gets ^D through `close_stdin` instead.
                        if c.dir == Dir::In || console {
                            c.send(barrier());
                        }
                    }
                    Ok(n) => c.send(Message::binary(buf[..n].to_vec())),
                }
            }
        }
        for (c, p) in chans.iter_mut().zip(&pfds[1..]) {
            if p.revents == 0 || !c.open {
                continue;
            }
            if c.pending {
                c.flush();
            }
            if !c.drain(&mut local) {
                return;
            }
        }
    }
    // Input the process never read must not stay queued: closing a Unix
    // socket with unread data makes the caller's next read fail with
    // ECONNRESET instead of the end of output. No more input (the caller's
    // writes now fail with EPIPE), drop what is queued, then end the output.
    let _ = local.shutdown(std::net::Shutdown::Read);
    if local.set_nonblocking(true).is_ok() {
        while matches!(local.read(&mut buf), Ok(n) if n > 0) {}
    }
    let _ = local.shutdown(std::net::Shutdown::Write);
}

/// The caller's handle on a running session.
struct IncusProcess {
    client: Client,
    /// `/1.0/operations/<id>`.
    op: String,
    control: Mutex<Ws>,
    /// A second handle on the caller's socket end: `close_stdin` acts on it.
    caller: UnixStream,
    tty: bool,
    request: String,
    /// An exec (has a return code) rather than a console.
    exec: bool,
}

impl std::fmt::Debug for IncusProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncusProcess")
            .field("op", &self.op)
            .field("tty", &self.tty)
            .finish()
    }
}

impl IncusProcess {
    fn control(&self, msg: Value) -> io::Result<()> {
        let mut ws = self
            .control
            .lock()
            .map_err(|_| io::Error::other("control websocket lock poisoned"))?;
        ws.send(Message::text(msg.to_string()))
            .map_err(|e| io::Error::other(format!("Incus control websocket: {e}")))
    }
}

impl IncusProcess {
    /// Incus ends a console, and kills a command still running, when the
    /// control websocket closes.
    fn close_control(&self) {
        if let Ok(mut ws) = self.control.lock() {
            if ws.can_write() {
                let _ = ws.close(None);
                let _ = ws.flush();
            }
        }
    }
}

/// A session dropped before its end is abandoned: its command is killed,
/// its console left.
impl Drop for IncusProcess {
    fn drop(&mut self) {
        self.close_control();
    }
}

impl SessionProcess for IncusProcess {
    fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        if !self.tty {
            return Ok(());
        }
        self.control(json!({
            "command": "window-resize",
            "args": {"width": cols.to_string(), "height": rows.to_string()},
        }))
    }

    fn close_stdin(&self) -> io::Result<()> {
        if self.tty {
            // ^D at the start of a line: end of input for the line discipline.
            (&self.caller).write_all(b"\x04")
        } else {
            self.caller.shutdown(std::net::Shutdown::Write)
        }
    }

    fn signal(&self, sig: i32) -> io::Result<()> {
        if !self.exec {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a console takes no signals",
            ));
        }
        self.control(json!({"command": "signal", "signal": sig}))
    }

    fn wait(&mut self) -> io::Result<i32> {
        if !self.exec {
            self.close_control();
            return Ok(0);
        }
        loop {
            match self
                .client
                .wait(&self.op, Duration::from_secs(3600), &self.request)
            {
                Ok(m) => {
                    return m["return"]
                        .as_i64()
                        .map(|r| r as i32)
                        .ok_or_else(|| io::Error::other(format!("no exit code in {m}")))
                }
                // Sessions last as long as the user wants.
                Err(IncusError::Timeout { .. }) => continue,
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::Role;

    /// A websocket pair over a Unix socket pair: the relay's client side
    /// (non-blocking, as `open` sets it) and a plain server side for the test.
    fn ws_pair() -> (Chan, WebSocket<UnixStream>) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let client = WebSocket::from_raw_socket(Stream::Unix(a), Role::Client, None);
        let server = WebSocket::from_raw_socket(b, Role::Server, None);
        let chan = Chan {
            ws: client,
            dir: Dir::Both,
            open: true,
            pending: false,
        };
        (chan, server)
    }

    /// Messages the server side receives until a barrier (or the end).
    fn until_barrier(server: &mut WebSocket<UnixStream>) -> (Vec<u8>, bool) {
        let mut data = Vec::new();
        loop {
            match server.read() {
                Ok(Message::Binary(b)) => data.extend_from_slice(&b),
                Ok(Message::Text(t)) if t.is_empty() => return (data, true),
                Ok(_) => {}
                Err(_) => return (data, false),
            }
        }
    }

    #[test]
    fn pty_relay_answers_the_barrier_and_ends() {
        let (mut chan, mut server) = ws_pair();
        chan.dir = Dir::Both;
        let (mut caller, ours) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(ours, vec![chan], false));
        caller.write_all(b"typed").unwrap();
        server.send(Message::binary(b"output".to_vec())).unwrap();
        // Incus's end of output; the relay must answer with its own barrier.
        server.send(Message::text("")).unwrap();
        let (typed, barrier) = until_barrier(&mut server);
        assert_eq!((typed.as_slice(), barrier), (&b"typed"[..], true));
        let mut out = Vec::new();
        caller.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"output");
        t.join().unwrap();
    }

    #[test]
    fn streams_relay_sends_eof_as_a_barrier_and_merges_output() {
        let (mut stdin, mut s0) = ws_pair();
        let (mut stdout, mut s1) = ws_pair();
        let (mut stderr, mut s2) = ws_pair();
        stdin.dir = Dir::In;
        stdout.dir = Dir::Out;
        stderr.dir = Dir::Out;
        let (mut caller, ours) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(ours, vec![stdin, stdout, stderr], false));
        caller.write_all(b"input").unwrap();
        caller.shutdown(std::net::Shutdown::Write).unwrap();
        let (got, barrier) = until_barrier(&mut s0);
        assert_eq!((got.as_slice(), barrier), (&b"input"[..], true));
        s1.send(Message::binary(b"out ".to_vec())).unwrap();
        s1.send(Message::text("")).unwrap();
        s2.send(Message::binary(b"err".to_vec())).unwrap();
        s2.send(Message::text("")).unwrap();
        let mut out = Vec::new();
        caller.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"out err");
        t.join().unwrap();
    }

    #[test]
    fn exec_body_tty_login_and_streams() {
        let opts = SessionOpts {
            tty: Some((30, 100)),
            env: vec!["TERM=xterm".into(), "A=b=c".into()],
            login: true,
        };
        let b = exec_body(&[], &opts);
        assert_eq!(b["interactive"], true);
        assert_eq!(b["wait-for-websocket"], true);
        assert_eq!(
            (b["width"].clone(), b["height"].clone()),
            (json!(100), json!(30))
        );
        assert_eq!(b["environment"]["TERM"], "xterm");
        assert_eq!(b["environment"]["A"], "b=c");
        assert_eq!(b["command"][0], "/bin/sh");
        assert!(b["command"][2].as_str().unwrap().ends_with("-l"));
        let argv = vec!["cat".to_string()];
        let b = exec_body(&argv, &SessionOpts::default());
        assert_eq!(b["interactive"], false);
        assert_eq!(b["command"], json!(["cat"]));
        assert!(b["environment"]["PATH"].as_str().unwrap().contains("/bin"));
    }
}
