//! Routing CLI commands through a running daemon: same output, same exit
//! codes as running them in-process. Used when the root's socket answers
//! and `--no-daemon` is not given; commands the API does not carry (init,
//! run, clone, network, `image ls`, `image build --vm`, interactive exec)
//! always run in-process.
//!
//! Each routed command sends the request the in-process code path would
//! make, then prints what the in-process path prints: the daemon returns
//! the same JSON documents (pretty, as `--json` prints them) or the same
//! text (`format=text`), and the project's warnings in a header.

use crate::cli::{Cli, Command, ImageCmd, SnapshotCmd};
use crate::exit;
use crate::output::Output;
use crate::run::CliError;
use moat_core::diag::{Diagnostic, Diagnostics, Loc, Severity};
use moat_daemon::client::{Client, Reply};
use moat_daemon::http::encode;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An error the daemon reported, printed as the in-process error would be.
#[derive(Debug)]
pub struct RemoteError {
    message: String,
    pub hint: Option<String>,
    pub code: u8,
    chain: Option<Box<Cause>>,
}

#[derive(Debug)]
struct Cause {
    msg: String,
    next: Option<Box<Cause>>,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.next.as_deref().map(|c| c as _)
    }
}

impl RemoteError {
    pub fn new(message: String, hint: Option<String>, code: u8) -> RemoteError {
        RemoteError {
            message,
            hint,
            code,
            chain: None,
        }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RemoteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.chain.as_deref().map(|c| c as _)
    }
}

fn diagnostics(v: &Value) -> Diagnostics {
    let mut out = Diagnostics::default();
    for d in v.as_array().into_iter().flatten() {
        let s = |k: &str| d.get(k).and_then(Value::as_str).map(String::from);
        out.push(Diagnostic {
            severity: if s("severity").as_deref() == Some("error") {
                Severity::Error
            } else {
                Severity::Warning
            },
            loc: d.get("loc").filter(|l| !l.is_null()).map(|l| {
                Loc::new(
                    l.get("file").and_then(Value::as_str).unwrap_or(""),
                    l.get("line").and_then(Value::as_u64).unwrap_or(0) as u32,
                    l.get("col").and_then(Value::as_u64).unwrap_or(0) as u32,
                )
            }),
            field: s("field").unwrap_or_default(),
            message: s("message").unwrap_or_default(),
            hint: s("hint"),
        });
    }
    out
}

/// The CLI error for a daemon error document.
pub fn error_from_body(status: u16, body: &[u8]) -> CliError {
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|_| {
        json!({"error": format!("the daemon answered {status}: {}", String::from_utf8_lossy(body))})
    });
    error_from_json(status, &v)
}

fn error_from_json(status: u16, v: &Value) -> CliError {
    if let Some(d) = v.get("diagnostics").filter(|d| !d.is_null()) {
        return CliError::Invalid(diagnostics(d));
    }
    let message = v
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("the daemon failed")
        .to_string();
    let mut hint = v.get("hint").and_then(Value::as_str).map(String::from);
    if status == 403 {
        hint = v.get("reason").and_then(Value::as_str).map(String::from);
    }
    let code = v
        .get("exit_code")
        .and_then(Value::as_u64)
        .map(|c| c as u8)
        .unwrap_or(exit::FAILED);
    let mut chain = None;
    for c in v
        .get("causes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .rev()
    {
        chain = Some(Box::new(Cause {
            msg: c.as_str().unwrap_or("").to_string(),
            next: chain,
        }));
    }
    CliError::Remote(RemoteError {
        message,
        hint,
        code,
        chain,
    })
}

fn transport(e: moat_daemon::client::ClientError) -> CliError {
    CliError::Remote(RemoteError::new(
        e.to_string(),
        Some("retry, or pass --no-daemon to run in-process".into()),
        exit::FAILED,
    ))
}

/// The project path as the in-process code finds it, made absolute for the
/// daemon (its working folder is not ours): (as typed, absolute).
fn project(cli: &Cli) -> Option<(PathBuf, PathBuf)> {
    let typed = match &cli.file {
        Some(f) => f.clone(),
        None if Path::new("moat.yml").exists() || Path::new("anklume.yml").exists() => {
            PathBuf::from(".")
        }
        None => return None,
    };
    // A missing file: let the daemon report it (same error as in-process).
    let abs = std::fs::canonicalize(&typed).unwrap_or_else(|_| {
        std::env::current_dir()
            .map(|d| d.join(&typed))
            .unwrap_or_else(|_| typed.clone())
    });
    Some((typed, abs))
}

fn need_project(cli: &Cli) -> Result<(PathBuf, PathBuf), CliError> {
    project(cli).ok_or_else(|| {
        CliError::NoProject(std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")))
    })
}

fn ok_or_error(reply: Reply) -> Result<Reply, CliError> {
    if reply.status() == 200 {
        Ok(reply)
    } else {
        Err(error_from_body(reply.status(), &reply.body))
    }
}

fn print_warnings(out: &Output, reply: &Reply) {
    if let Some(w) = reply.warnings() {
        out.diagnostics(&diagnostics(&w));
    }
}

/// Whether the CLI should talk to a daemon for this command.
fn routable(cli: &Cli) -> bool {
    matches!(
        &cli.command,
        Command::Validate(_)
            | Command::Plan(_)
            | Command::Apply(_)
            | Command::Status(_)
            | Command::Destroy(_)
            | Command::Start(_)
            | Command::Stop(_)
            | Command::Restart(_)
            | Command::Logs(_)
            | Command::Snapshot(_)
    ) || matches!(&cli.command, Command::Exec(a) if !a.tty && !a.interactive)
        || matches!(
            &cli.command,
            Command::Image(
                ImageCmd::Build { vm: false, .. }
                    | ImageCmd::Import { .. }
                    | ImageCmd::Rm { .. }
                    | ImageCmd::Gc
            )
        )
}

/// An image build or import: the store's progress on stderr as the
/// in-process `StderrProgress` prints it; the result's image.
fn image_stream(c: &Client, target: &str, body: &Value) -> Result<Value, CliError> {
    let mut result: Option<Value> = None;
    let mut failure: Option<Value> = None;
    let head = c
        .lines("POST", target, Some(body), |v| {
            let mut e = std::io::stderr();
            match v.get("type").and_then(Value::as_str) {
                Some("progress") => {
                    let _ = writeln!(e, "==> {}", v["message"].as_str().unwrap_or(""));
                }
                Some("output") => {
                    let _ = writeln!(e, "    {}", v["line"].as_str().unwrap_or(""));
                }
                Some("bytes") => {
                    let mib = |k: &str| v[k].as_u64().unwrap_or(0) as f64 / (1024.0 * 1024.0);
                    let label = v["label"].as_str().unwrap_or("");
                    let _ = if v["total"].is_u64() {
                        writeln!(e, "    {label}: {:.1}/{:.1} MiB", mib("done"), mib("total"))
                    } else {
                        writeln!(e, "    {label}: {:.1} MiB", mib("done"))
                    };
                }
                Some("result") => result = Some(v),
                _ => failure = Some(v),
            }
            true
        })
        .map_err(transport)?;
    if let Some(v) = failure {
        let status = if head.status == 200 { 500 } else { head.status };
        return Err(error_from_json(status, &v));
    }
    result.map(|r| r["image"].clone()).ok_or_else(|| {
        CliError::Remote(RemoteError::new(
            "the daemon closed the connection before the result (it may have been restarted)"
                .into(),
            Some("`moat image ls` shows what the store holds; run the command again".into()),
            exit::FAILED,
        ))
    })
}

fn through_image(out: &Output, c: &Client, cmd: &ImageCmd) -> Result<u8, CliError> {
    use crate::image::size;
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    match cmd {
        ImageCmd::Build { source, name, .. } => {
            let body = json!({"source": source, "name": name});
            let img = image_stream(c, "/v1/images/build", &body)?;
            out.info(&format!(
                "built {} ({}, {})",
                s(&img["name"]),
                s(&img["id"]),
                size(u(&img["size"]))
            ));
        }
        ImageCmd::Import { source, name, kind } => {
            // The daemon does not share our working folder: send an absolute path.
            let path = match source.strip_prefix("oci:") {
                Some(_) => source.clone(),
                None => std::fs::canonicalize(source)
                    .map_err(|e| CliError::Io {
                        what: format!("cannot read {source}"),
                        source: e,
                    })?
                    .to_string_lossy()
                    .into_owned(),
            };
            let kind = kind.and_then(|k| {
                clap::ValueEnum::to_possible_value(&k).map(|v| v.get_name().to_string())
            });
            let body = json!({"name": name, "path": path, "kind": kind});
            let img = image_stream(c, "/v1/images/import", &body)?;
            out.info(&format!(
                "imported {} ({}, {} layers)",
                s(&img["name"]),
                s(&img["id"]),
                img["layers"].as_array().map_or(0, Vec::len)
            ));
        }
        ImageCmd::Rm { name } => {
            let r = c
                .call("DELETE", &format!("/v1/images?name={}", encode(name)), None)
                .map_err(transport)?;
            ok_or_error(r)?;
            out.info(&format!("removed {name}; `moat image gc` frees its layers"));
        }
        ImageCmd::Gc => {
            let r = c.call("POST", "/v1/images/gc", None).map_err(transport)?;
            let v = ok_or_error(r)?.json().map_err(transport)?;
            out.info(&format!(
                "removed {} unused layers ({}), kept {}",
                v["removed_layers"].as_array().map_or(0, Vec::len),
                size(u(&v["freed_bytes"])),
                u(&v["kept_layers"])
            ));
        }
        ImageCmd::Ls { .. } => {
            return Err(CliError::Other("internal: command not routable".into()))
        }
    }
    Ok(exit::OK)
}

/// The root's daemon, if one answers.
fn daemon(cli: &Cli) -> Option<Client> {
    let sock = moat_daemon::socket_path(&moat_engine::Config::for_root(&cli.root));
    if !sock.exists() {
        return None;
    }
    let c = Client::new(&sock);
    c.connect().ok().map(|_| c)
}

/// Run the command through the daemon when one answers; `None`: run it in-process.
pub fn route(cli: &Cli, out: &Output) -> Result<Option<u8>, CliError> {
    if cli.no_daemon || !routable(cli) {
        return Ok(None);
    }
    let Some(c) = daemon(cli) else {
        return Ok(None);
    };
    through(cli, out, &c).map(Some)
}

fn fmt_q(json: bool) -> &'static str {
    if json {
        "format=json"
    } else {
        "format=text"
    }
}

/// A streamed operation (apply, destroy): progress on stderr, then the result.
fn stream_op(
    out: &Output,
    c: &Client,
    target: &str,
    body: &Value,
    json_out: bool,
) -> Result<u8, CliError> {
    let mut result: Option<Value> = None;
    let mut failure: Option<(u16, Value)> = None;
    let head = c
        .lines("POST", target, Some(body), |v| {
            match v.get("type").and_then(Value::as_str) {
                Some("progress") => {
                    if !json_out {
                        out.info(v["message"].as_str().unwrap_or(""));
                    }
                }
                Some("warnings") => out.diagnostics(&diagnostics(&v["diagnostics"])),
                Some("result") => result = Some(v),
                _ => failure = Some((0, v)),
            }
            true
        })
        .map_err(transport)?;
    if let Some((_, v)) = failure {
        let status = if head.status == 200 { 500 } else { head.status };
        return Err(error_from_json(status, &v));
    }
    let Some(r) = result else {
        return Err(CliError::Remote(RemoteError::new(
            "the daemon closed the connection before the result (it may have been restarted)"
                .into(),
            Some("`moat status` shows where things are; run the command again".into()),
            exit::FAILED,
        )));
    };
    if json_out {
        out.data(r["pretty"].as_str().unwrap_or(""));
    } else {
        out.data(r["text"].as_str().unwrap_or(""));
    }
    Ok(if r["failed"].as_bool().unwrap_or(false) {
        exit::FAILED
    } else {
        exit::OK
    })
}

fn through(cli: &Cli, out: &Output, c: &Client) -> Result<u8, CliError> {
    let call = |m: &str, t: &str, b: Option<&Value>| c.call(m, t, b).map_err(transport);
    match &cli.command {
        Command::Validate(a) => {
            let (typed, abs) = need_project(cli)?;
            let r = ok_or_error(call(
                "POST",
                &format!("/v1/validate?{}", fmt_q(a.json)),
                Some(&json!({"project": abs})),
            )?)?;
            print_warnings(out, &r);
            if a.json {
                out.data(&r.text());
            } else {
                out.info(&format!("{}: {}", typed.display(), r.text()));
            }
            Ok(exit::OK)
        }
        Command::Plan(a) => {
            let (_, abs) = need_project(cli)?;
            let r = ok_or_error(call(
                "POST",
                &format!("/v1/plan?{}", fmt_q(a.json)),
                Some(&json!({"project": abs, "prune": a.prune, "domain": a.domain})),
            )?)?;
            print_warnings(out, &r);
            out.data(&r.text());
            Ok(exit::OK)
        }
        Command::Apply(a) => {
            let (_, abs) = need_project(cli)?;
            let body = json!({
                "project": abs, "prune": a.prune, "domain": a.domain,
                "dry_run": a.dry_run, "jobs": a.jobs.max(1), "wait": a.wait,
            });
            stream_op(out, c, "/v1/apply", &body, a.json)
        }
        Command::Status(a) => {
            // No project here means none (not the daemon's): same as in-process.
            let p = project(cli)
                .map(|(_, abs)| abs.to_string_lossy().into_owned())
                .unwrap_or_default();
            let r = ok_or_error(call(
                "GET",
                &format!("/v1/status?project={}&{}", encode(&p), fmt_q(a.json)),
                None,
            )?)?;
            out.data(&r.text());
            Ok(exit::OK)
        }
        Command::Destroy(a) => {
            if !a.all && a.domain.is_none() && a.machine.is_none() {
                return Err(CliError::Other(
                    "say what to destroy: a MACHINE, --domain D or --all".into(),
                ));
            }
            let p = project(cli).map(|(_, abs)| abs.to_string_lossy().into_owned());
            let body = json!({
                "project": p.unwrap_or_default(), "machine": a.machine, "domain": a.domain,
                "all": a.all, "force": a.force,
            });
            stream_op(out, c, "/v1/destroy", &body, false)
        }
        Command::Start(a) => {
            let p = project(cli).map(|(_, abs)| abs.to_string_lossy().into_owned());
            ok_or_error(call(
                "POST",
                &format!("/v1/machines/{}/start", encode(&a.machine)),
                Some(&json!({"project": p.unwrap_or_default()})),
            )?)?;
            out.info(&format!("started {}", a.machine));
            Ok(exit::OK)
        }
        Command::Stop(a) => {
            ok_or_error(call(
                "POST",
                &format!("/v1/machines/{}/stop", encode(&a.machine)),
                Some(&json!({"timeout": a.timeout})),
            )?)?;
            out.info(&format!("stopped {}", a.machine));
            Ok(exit::OK)
        }
        Command::Restart(a) => {
            let p = project(cli).map(|(_, abs)| abs.to_string_lossy().into_owned());
            ok_or_error(call(
                "POST",
                &format!("/v1/machines/{}/restart", encode(&a.machine)),
                Some(&json!({"timeout": a.timeout, "project": p.unwrap_or_default()})),
            )?)?;
            out.info(&format!("restarted {}", a.machine));
            Ok(exit::OK)
        }
        Command::Exec(a) => {
            let r = ok_or_error(call(
                "POST",
                &format!("/v1/machines/{}/exec", encode(&a.machine)),
                Some(&json!({"command": a.command})),
            )?)?;
            let v = r.json().map_err(transport)?;
            let bytes = |k: &str| {
                v.get(k)
                    .and_then(Value::as_str)
                    .and_then(moat_daemon::b64::decode)
                    .unwrap_or_default()
            };
            let _ = std::io::stdout().write_all(&bytes("stdout_base64"));
            let _ = std::io::stderr().write_all(&bytes("stderr_base64"));
            let status = v.get("status").and_then(Value::as_i64).unwrap_or(1);
            Ok(status.clamp(0, 255) as u8)
        }
        Command::Logs(a) => {
            let mut t = format!(
                "/v1/machines/{}/logs?follow={}",
                encode(&a.machine),
                a.follow
            );
            if let Some(n) = a.tail {
                t.push_str(&format!("&tail={n}"));
            }
            let (head, mut r) = c.open("GET", &t, None, &[]).map_err(transport)?;
            if head.status != 200 {
                let mut body = Vec::new();
                let _ = std::io::Read::read_to_end(&mut r, &mut body);
                return Err(error_from_body(head.status, &body));
            }
            let mut o = std::io::stdout();
            let mut buf = [0u8; 8192];
            loop {
                match std::io::Read::read(&mut r, &mut buf) {
                    Ok(0) | Err(_) => return Ok(exit::OK),
                    Ok(n) => {
                        if o.write_all(&buf[..n]).is_err() || o.flush().is_err() {
                            return Ok(exit::OK);
                        }
                    }
                }
            }
        }
        Command::Snapshot(cmd) => {
            match cmd {
                SnapshotCmd::Create { machine, name } => {
                    let r = ok_or_error(call(
                        "POST",
                        &format!("/v1/machines/{}/snapshots", encode(machine)),
                        Some(&json!({"name": name})),
                    )?)?;
                    let v = r.json().map_err(transport)?;
                    out.data(v["name"].as_str().unwrap_or(""));
                }
                SnapshotCmd::Ls { machine, json } => {
                    let r = ok_or_error(call(
                        "GET",
                        &format!("/v1/machines/{}/snapshots", encode(machine)),
                        None,
                    )?)?;
                    let snaps: Vec<moat_image::SnapshotInfo> =
                        serde_json::from_slice(&r.body).map_err(|e| transport(e.into()))?;
                    if *json {
                        out.json(&snaps)?;
                    } else {
                        for s in &snaps {
                            out.data(&s.name);
                        }
                    }
                }
                SnapshotCmd::Restore { machine, name } => {
                    ok_or_error(call(
                        "POST",
                        &format!(
                            "/v1/machines/{}/snapshots/{}/restore",
                            encode(machine),
                            encode(name)
                        ),
                        None,
                    )?)?;
                    out.info(&format!("{machine} restored to snapshot {name}"));
                }
                SnapshotCmd::Rm { machine, name } => {
                    ok_or_error(call(
                        "DELETE",
                        &format!(
                            "/v1/machines/{}/snapshots/{}",
                            encode(machine),
                            encode(name)
                        ),
                        None,
                    )?)?;
                    out.info(&format!("removed snapshot {name} of {machine}"));
                }
            }
            Ok(exit::OK)
        }
        Command::Image(cmd) => through_image(out, c, cmd),
        _ => Err(CliError::Other("internal: command not routable".into())),
    }
}
