//! `moat console MACHINE`: a full VM's serial console (its Unix socket,
//! relayed to this terminal in raw mode; Ctrl-] leaves), and
//! `moat console --gui MACHINE`: its SPICE display (`display: spice`),
//! opened with `remote-viewer` when installed, else the URI is printed.
//! An Incus machine's console comes through the Incus driver's websocket
//! session and is relayed the same way; a built-in container started with
//! `moat run -t [-d]` gives PID 1's terminal (the supervisor's pty master).

use crate::cli::{Cli, ConsoleArgs};
use crate::exit;
use crate::output::Output;
use crate::run::CliError;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

/// Ctrl-]: ends the console session (as telnet and virsh do).
const ESCAPE: u8 = 0x1d;

fn ctx(cli: &Cli) -> moat_driver::Ctx {
    let cfg = moat_engine::Config::for_root(&cli.root);
    moat_driver::Ctx {
        root_tag: moat_core::naming::root_tag(&cli.root.to_string_lossy()),
        root: cfg.root,
        run_dir: cfg.run_dir,
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The `spice+unix://` URI of a VM's display socket.
pub fn spice_uri(sock: &std::path::Path) -> String {
    format!("spice+unix://{}", sock.display())
}

pub fn run(cli: &Cli, out: &Output, a: &ConsoleArgs) -> Result<u8, CliError> {
    let ctx = ctx(cli);
    let name = &a.machine;
    if let Some(code) = native_console(cli, out, a)? {
        return Ok(code);
    }
    let Some(vr) = moat_qemu::vm::read_vm_record(&ctx, name) else {
        if let Some(code) = incus_console(out, &ctx, a)? {
            return Ok(code);
        }
        return Err(CliError::NotFound(format!(
            "no full VM or Incus machine named '{name}' in this root \
             (consoles are for `type: vm` and Incus machines)"
        )));
    };
    if !moat_qemu::vm::is_running(&ctx, name) {
        return Err(CliError::Other(format!(
            "{name} is not running; `moat start {name}` first"
        )));
    }
    let p = moat_qemu::vm::paths(&ctx, name);
    if a.gui {
        if vr.display != moat_core::model::Display::Spice {
            return Err(CliError::Other(format!(
                "{name} has no display; set `display: spice` on it and apply (it restarts the VM)"
            )));
        }
        let uri = spice_uri(&p.spice);
        if !a.print && on_path("remote-viewer") {
            let st = std::process::Command::new("remote-viewer")
                .arg(&uri)
                .status()
                .map_err(|e| CliError::Io {
                    what: "cannot run remote-viewer".into(),
                    source: e,
                })?;
            return Ok(if st.success() { exit::OK } else { exit::FAILED });
        }
        out.data(&uri);
        if !a.print {
            out.info("remote-viewer is not installed (package virt-viewer); open the URI above with a SPICE client");
        }
        return Ok(exit::OK);
    }
    let sock = UnixStream::connect(&p.console_sock).map_err(|e| CliError::Io {
        what: format!(
            "cannot connect to the console of {name} ({})",
            p.console_sock.display()
        ),
        source: e,
    })?;
    out.info(&format!(
        "connected to {name}'s serial console; Ctrl-] leaves"
    ));
    relay(sock).map_err(|e| CliError::Io {
        what: format!("console of {name}"),
        source: e,
    })?;
    Ok(exit::OK)
}

/// PID 1's terminal of a built-in container started with `moat run -t`
/// (`-d` too): relayed until Ctrl-] (the machine goes on) or until PID 1
/// ends (its exit code is returned). `None` when `a.machine` is no built-in
/// container of this root.
fn native_console(cli: &Cli, out: &Output, a: &ConsoleArgs) -> Result<Option<u8>, CliError> {
    // Read-only: a VM's or an Incus machine's console must not create the root.
    let eng = moat_engine::Engine::open_readonly(moat_engine::Config::for_root(&cli.root))?;
    let Some(mut session) = eng.native_console(&a.machine)? else {
        return Ok(None);
    };
    if a.gui {
        return Err(CliError::Other(format!(
            "{} is a container: it has a terminal, no display (drop --gui)",
            a.machine
        )));
    }
    out.info(&format!(
        "connected to {}'s terminal; Ctrl-] leaves (the machine goes on)",
        a.machine
    ));
    let code = crate::tty::relay_until(&mut session, Some(ESCAPE)).map_err(|e| CliError::Io {
        what: format!("terminal of {}", a.machine),
        source: e,
    })?;
    Ok(Some(match code {
        Some(c) => c.clamp(0, 255) as u8,
        None => exit::OK,
    }))
}

/// An Incus machine's console (the pty its init writes to), through Incus's
/// websockets; `None` when `a.machine` is no Incus machine of this root.
fn incus_console(
    out: &Output,
    ctx: &moat_driver::Ctx,
    a: &ConsoleArgs,
) -> Result<Option<u8>, CliError> {
    let name = &a.machine;
    if !ctx.root.join("incus.json").exists() {
        return Ok(None);
    }
    let d = moat_incus::IncusDriver::new();
    if !matches!(d.find(ctx, name), Ok(Some(_))) {
        return Ok(None);
    }
    if a.gui {
        return Err(CliError::Other(format!(
            "{name} is an Incus machine: only its text console is available (drop --gui)"
        )));
    }
    let size = crate::tty::terminal_size().unwrap_or((24, 80));
    let session = d
        .console_session(ctx, name, size)
        .map_err(|e| CliError::Other(format!("{e}; is it running (`moat start {name}`)?")))?;
    out.info(&format!("connected to {name}'s console; Ctrl-] leaves"));
    let moat_driver::ExecSession { io, process, .. } = session;
    relay(UnixStream::from(io)).map_err(|e| CliError::Io {
        what: format!("console of {name}"),
        source: e,
    })?;
    // Dropping the session closes Incus's console operation.
    drop(process);
    Ok(Some(exit::OK))
}

/// stdin → socket (until Ctrl-] or EOF), socket → stdout (until QEMU closes it).
fn relay(sock: UnixStream) -> std::io::Result<()> {
    let _raw = crate::tty::RawMode::enter(0);
    let mut to_vm = sock.try_clone()?;
    let closer = sock.try_clone()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let (data, quit) = match chunk.iter().position(|&b| b == ESCAPE) {
                Some(i) => (&chunk[..i], true),
                None => (chunk, false),
            };
            if to_vm.write_all(data).is_err() || quit {
                break;
            }
        }
        let _ = closer.shutdown(std::net::Shutdown::Both);
    });
    let mut from_vm = sock;
    let mut buf = [0u8; 4096];
    let mut stdout = std::io::stdout();
    loop {
        let n = match from_vm.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    Ok(())
}
