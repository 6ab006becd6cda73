//! The HTTP layer's only job: turn a request into an [`Action`] (or a 4xx).
//! Nothing here touches the host; [`crate::server`] executes actions.
//!
//! [`ROUTES`] is the route table: method, path pattern, what the caller
//! needs, one line of doc. openapi.yaml is checked against it by a test.

use crate::auth::Need;
use crate::http::Request;
use serde::Deserialize;
use std::path::PathBuf;

/// One endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: &'static str,
    /// `{name}` segments match one path segment.
    pub path: &'static str,
    pub need: Need,
    pub summary: &'static str,
}

const fn r(method: &'static str, path: &'static str, need: Need, summary: &'static str) -> Route {
    Route {
        method,
        path,
        need,
        summary,
    }
}

use Need::{Read, Write};

pub const ROUTES: &[Route] = &[
    r(
        "GET",
        "/v1/health",
        Read,
        "Daemon version, root, project and the caller's access",
    ),
    r(
        "POST",
        "/v1/validate",
        Read,
        "Check a project; its warnings",
    ),
    r("POST", "/v1/plan", Read, "What apply would change"),
    r(
        "POST",
        "/v1/apply",
        Write,
        "Make the host match the project (NDJSON progress stream)",
    ),
    r(
        "GET",
        "/v1/status",
        Read,
        "Domains, machines and their state",
    ),
    r(
        "POST",
        "/v1/destroy",
        Write,
        "Delete machines, a domain or everything (NDJSON progress stream)",
    ),
    r(
        "POST",
        "/v1/reconcile",
        Write,
        "Look for drift now; repair it when the project says reconcile: auto",
    ),
    r(
        "POST",
        "/v1/machines/{name}/start",
        Write,
        "Start a machine",
    ),
    r("POST", "/v1/machines/{name}/stop", Write, "Stop a machine"),
    r(
        "POST",
        "/v1/machines/{name}/restart",
        Write,
        "Stop then start a machine",
    ),
    r(
        "POST",
        "/v1/machines/{name}/exec",
        Write,
        "Run a command to completion; its status and output",
    ),
    r(
        "GET",
        "/v1/machines/{name}/exec",
        Write,
        "Interactive exec over an upgraded connection (Upgrade: moat-exec)",
    ),
    r(
        "GET",
        "/v1/machines/{name}/logs",
        Read,
        "A machine's output; follow=true keeps the stream open",
    ),
    r(
        "GET",
        "/v1/machines/{name}/snapshots",
        Read,
        "A machine's snapshots",
    ),
    r(
        "POST",
        "/v1/machines/{name}/snapshots",
        Write,
        "Snapshot a stopped machine",
    ),
    r(
        "POST",
        "/v1/machines/{name}/snapshots/{snapshot}/restore",
        Write,
        "Bring a machine back to a snapshot",
    ),
    r(
        "DELETE",
        "/v1/machines/{name}/snapshots/{snapshot}",
        Write,
        "Delete a snapshot",
    ),
    r("GET", "/v1/images", Read, "Images in the store"),
    r(
        "POST",
        "/v1/images/build",
        Write,
        "Build an image from a built-in source (NDJSON progress stream)",
    ),
    r(
        "POST",
        "/v1/images/import",
        Write,
        "Import an image from a file, folder or OCI reference (NDJSON progress stream)",
    ),
    r("DELETE", "/v1/images/{name}", Write, "Remove an image"),
    r(
        "DELETE",
        "/v1/images",
        Write,
        "Remove the image named by ?name= (for names holding a slash)",
    ),
    r(
        "POST",
        "/v1/images/gc",
        Write,
        "Remove layers no image or machine uses",
    ),
    r(
        "GET",
        "/v1/events",
        Read,
        "Events as newline-delimited JSON, until the client closes",
    ),
];

/// Where the project comes from: the request, else the daemon's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectArg {
    pub project: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    pub project: Option<PathBuf>,
    #[serde(default)]
    pub prune: bool,
    pub domain: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyBody {
    pub project: Option<PathBuf>,
    #[serde(default)]
    pub prune: bool,
    pub domain: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    pub jobs: Option<usize>,
    /// Seconds to wait for another apply's lock.
    pub wait: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyBody {
    pub project: Option<PathBuf>,
    pub machine: Option<String>,
    pub domain: Option<String>,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    /// Seconds before the machine is killed (default 10).
    pub timeout: Option<u64>,
    pub project: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub command: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    pub name: Option<String>,
}

/// `moat image build SOURCE [--name NAME]` (VM disks stay CLI-only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageBuildBody {
    /// `busybox`, `debian/<suite>` or `ubuntu/<suite>`.
    pub source: String,
    /// Name to store it under (default: the source).
    pub name: Option<String>,
}

/// `moat image import PATH --name NAME [--kind KIND]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageImportBody {
    pub name: String,
    /// An absolute path on the daemon's host, or `oci:REF`.
    pub path: String,
    /// tarball, folder, oci-layout, oci-archive or docker-archive; absent = detected.
    pub kind: Option<String>,
}

/// How a result is rendered: JSON (the default) or the CLI's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

/// Everything the daemon can be asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Health,
    Validate(ProjectArg, Format),
    Plan(PlanBody, Format),
    Apply(ApplyBody),
    Status(ProjectArg, Format),
    Destroy(DestroyBody),
    Reconcile(ProjectArg),
    Start {
        machine: String,
        project: ProjectArg,
    },
    Stop {
        machine: String,
        timeout: u64,
    },
    Restart {
        machine: String,
        timeout: u64,
        project: ProjectArg,
    },
    Exec {
        machine: String,
        command: Vec<String>,
    },
    /// Empty `command`: the login shell. `tty`: a terminal of (rows, cols).
    ExecStream {
        machine: String,
        command: Vec<String>,
        tty: Option<(u16, u16)>,
    },
    Logs {
        machine: String,
        tail: Option<usize>,
        follow: bool,
    },
    Snapshots {
        machine: String,
    },
    SnapshotCreate {
        machine: String,
        name: Option<String>,
    },
    SnapshotRestore {
        machine: String,
        snapshot: String,
    },
    SnapshotRemove {
        machine: String,
        snapshot: String,
    },
    Images,
    ImageBuild(ImageBuildBody),
    ImageImport(ImageImportBody),
    ImageRemove {
        name: String,
    },
    ImageGc,
    Events,
}

impl Action {
    /// The project path the request names, if any (authorization looks at it).
    pub fn project(&self) -> Option<&std::path::Path> {
        match self {
            Action::Validate(p, _)
            | Action::Status(p, _)
            | Action::Reconcile(p)
            | Action::Start { project: p, .. }
            | Action::Restart { project: p, .. } => p.project.as_deref(),
            Action::Plan(b, _) => b.project.as_deref(),
            Action::Apply(b) => b.project.as_deref(),
            Action::Destroy(b) => b.project.as_deref(),
            _ => None,
        }
    }
}

/// A request the API refuses before anything runs.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("no endpoint {method} {path}")]
    NotFound { method: String, path: String },
    #[error("{path} does not take {method} (it takes {allowed})")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: String,
    },
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::BadRequest(_) => 400,
        }
    }
}

/// Match `path` against a pattern; the `{..}` segments' values in order.
pub fn match_path(pattern: &str, path: &str) -> Option<Vec<String>> {
    let p: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let s: Vec<&str> = path
        .trim_end_matches('/')
        .trim_start_matches('/')
        .split('/')
        .collect();
    if p.len() != s.len() {
        return None;
    }
    let mut vars = Vec::new();
    for (a, b) in p.iter().zip(&s) {
        if a.starts_with('{') {
            if b.is_empty() {
                return None;
            }
            vars.push((*b).to_string());
        } else if a != b {
            return None;
        }
    }
    Some(vars)
}

/// The route a request hits.
pub fn route(req: &Request) -> Result<(&'static Route, Vec<String>), ApiError> {
    let mut allowed = Vec::new();
    for rt in ROUTES {
        if let Some(vars) = match_path(rt.path, &req.path) {
            if rt.method == req.method {
                return Ok((rt, vars));
            }
            allowed.push(rt.method);
        }
    }
    if allowed.is_empty() {
        Err(ApiError::NotFound {
            method: req.method.clone(),
            path: req.path.clone(),
        })
    } else {
        Err(ApiError::MethodNotAllowed {
            method: req.method.clone(),
            path: req.path.clone(),
            allowed: allowed.join(", "),
        })
    }
}

fn body<T: for<'de> Deserialize<'de> + Default>(req: &Request) -> Result<T, ApiError> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&req.body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

fn format(req: &Request) -> Result<Format, ApiError> {
    match req.query("format") {
        None | Some("json") => Ok(Format::Json),
        Some("text") => Ok(Format::Text),
        Some(f) => Err(ApiError::BadRequest(format!(
            "format={f}: use format=json or format=text"
        ))),
    }
}

fn flag(req: &Request, name: &str) -> Result<bool, ApiError> {
    match req.query(name) {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(v) => Err(ApiError::BadRequest(format!(
            "{name}={v}: use true or false"
        ))),
    }
}

fn query_project(req: &Request) -> ProjectArg {
    ProjectArg {
        project: req.query("project").map(PathBuf::from),
    }
}

/// Machine and snapshot names are single path segments of safe characters.
fn name(v: &str, what: &str) -> Result<String, ApiError> {
    if v.is_empty()
        || v.len() > 128
        || v.starts_with('.')
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(ApiError::BadRequest(format!(
            "'{v}' is not a valid {what} name (letters, digits, - _ . :)"
        )));
    }
    Ok(v.to_string())
}

/// Parse a request into an action (and the route, for authorization).
pub fn parse(req: &Request) -> Result<(&'static Route, Action), ApiError> {
    let (rt, vars) = route(req)?;
    let var = |i: usize, what: &str| name(vars.get(i).map(String::as_str).unwrap_or(""), what);
    let action = match (rt.method, rt.path) {
        ("GET", "/v1/health") => Action::Health,
        ("POST", "/v1/validate") => Action::Validate(body(req)?, format(req)?),
        ("POST", "/v1/plan") => Action::Plan(body(req)?, format(req)?),
        ("POST", "/v1/apply") => Action::Apply(body(req)?),
        ("GET", "/v1/status") => Action::Status(query_project(req), format(req)?),
        ("POST", "/v1/destroy") => {
            let b: DestroyBody = body(req)?;
            let n = usize::from(b.machine.is_some())
                + usize::from(b.domain.is_some())
                + usize::from(b.all);
            if n != 1 {
                return Err(ApiError::BadRequest(
                    "say what to destroy: exactly one of machine, domain or all".into(),
                ));
            }
            Action::Destroy(b)
        }
        ("POST", "/v1/reconcile") => Action::Reconcile(body(req)?),
        ("POST", "/v1/machines/{name}/start") => Action::Start {
            machine: var(0, "machine")?,
            project: body(req)?,
        },
        ("POST", "/v1/machines/{name}/stop") => {
            let b: StopBody = body(req)?;
            Action::Stop {
                machine: var(0, "machine")?,
                timeout: b.timeout.unwrap_or(10),
            }
        }
        ("POST", "/v1/machines/{name}/restart") => {
            let b: StopBody = body(req)?;
            Action::Restart {
                machine: var(0, "machine")?,
                timeout: b.timeout.unwrap_or(10),
                project: ProjectArg { project: b.project },
            }
        }
        ("POST", "/v1/machines/{name}/exec") => {
            let b: ExecBody = body(req)?;
            if b.command.is_empty() {
                return Err(ApiError::BadRequest(
                    "command: give at least one word".into(),
                ));
            }
            Action::Exec {
                machine: var(0, "machine")?,
                command: b.command,
            }
        }
        ("GET", "/v1/machines/{name}/exec") => {
            let command = req.query_all("cmd");
            if !req
                .header("upgrade")
                .is_some_and(|u| u.eq_ignore_ascii_case("moat-exec"))
            {
                return Err(ApiError::BadRequest(
                    "this endpoint needs `Connection: Upgrade` and `Upgrade: moat-exec`; POST runs a command to completion".into(),
                ));
            }
            let num = |k: &str, d: u16| -> Result<u16, ApiError> {
                match req.query(k) {
                    None => Ok(d),
                    Some(v) => v
                        .parse()
                        .map_err(|_| ApiError::BadRequest(format!("{k}={v}: give a number"))),
                }
            };
            let tty = if flag(req, "tty")? {
                Some((num("rows", 24)?, num("cols", 80)?))
            } else {
                None
            };
            Action::ExecStream {
                machine: var(0, "machine")?,
                command,
                tty,
            }
        }
        ("GET", "/v1/machines/{name}/logs") => Action::Logs {
            machine: var(0, "machine")?,
            tail: match req.query("tail") {
                None => None,
                Some(t) => Some(t.parse().map_err(|_| {
                    ApiError::BadRequest(format!("tail={t}: give a number of lines"))
                })?),
            },
            follow: flag(req, "follow")?,
        },
        ("GET", "/v1/machines/{name}/snapshots") => Action::Snapshots {
            machine: var(0, "machine")?,
        },
        ("POST", "/v1/machines/{name}/snapshots") => {
            let b: SnapshotBody = body(req)?;
            Action::SnapshotCreate {
                machine: var(0, "machine")?,
                name: b.name.map(|n| name(&n, "snapshot")).transpose()?,
            }
        }
        ("POST", "/v1/machines/{name}/snapshots/{snapshot}/restore") => Action::SnapshotRestore {
            machine: var(0, "machine")?,
            snapshot: var(1, "snapshot")?,
        },
        ("DELETE", "/v1/machines/{name}/snapshots/{snapshot}") => Action::SnapshotRemove {
            machine: var(0, "machine")?,
            snapshot: var(1, "snapshot")?,
        },
        ("GET", "/v1/images") => Action::Images,
        ("POST", "/v1/images/build") => {
            let b: ImageBuildBody = body(req)?;
            if b.source.is_empty() {
                return Err(ApiError::BadRequest(
                    "source: give busybox, debian/<suite> or ubuntu/<suite>".into(),
                ));
            }
            Action::ImageBuild(b)
        }
        ("POST", "/v1/images/import") => {
            let b: ImageImportBody = body(req)?;
            if b.name.is_empty() || b.path.is_empty() {
                return Err(ApiError::BadRequest(
                    "give name and path (an absolute path, or oci:REF)".into(),
                ));
            }
            if !b.path.starts_with("oci:") && !b.path.starts_with('/') {
                return Err(ApiError::BadRequest(format!(
                    "path '{}': give an absolute path (the daemon does not share your working directory)",
                    b.path
                )));
            }
            Action::ImageImport(b)
        }
        ("DELETE", "/v1/images/{name}") => Action::ImageRemove {
            name: vars.first().cloned().unwrap_or_default(),
        },
        ("DELETE", "/v1/images") => match req.query("name") {
            Some(n) if !n.is_empty() => Action::ImageRemove { name: n.into() },
            _ => {
                return Err(ApiError::BadRequest(
                    "name: give the image as ?name=NAME".into(),
                ))
            }
        },
        ("POST", "/v1/images/gc") => Action::ImageGc,
        ("GET", "/v1/events") => Action::Events,
        (m, p) => {
            return Err(ApiError::NotFound {
                method: m.into(),
                path: p.into(),
            })
        }
    };
    Ok((rt, action))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(m: &str, t: &str, body: &str) -> Request {
        Request::new(m, t).with_body(body)
    }

    #[test]
    fn every_route_has_a_parse_arm() {
        for rt in ROUTES {
            let path = rt.path.replace("{name}", "d-m").replace("{snapshot}", "s1");
            let mut q = Request::new(rt.method, &path);
            if rt.path.ends_with("/exec") && rt.method == "GET" {
                q = Request::new(rt.method, &format!("{path}?cmd=true"));
                q.headers.push(("upgrade".into(), "moat-exec".into()));
            }
            if rt.path.ends_with("/exec") && rt.method == "POST" {
                q.body = br#"{"command":["true"]}"#.to_vec();
            }
            if rt.path == "/v1/destroy" {
                q.body = br#"{"all":true}"#.to_vec();
            }
            if rt.path == "/v1/images" && rt.method == "DELETE" {
                q = Request::new(rt.method, "/v1/images?name=debian%2Fbookworm");
            }
            if rt.path == "/v1/images/build" {
                q.body = br#"{"source":"busybox"}"#.to_vec();
            }
            if rt.path == "/v1/images/import" {
                q.body = br#"{"name":"x","path":"/tmp/x.tar"}"#.to_vec();
            }
            let (got, _) = parse(&q).unwrap_or_else(|e| panic!("{} {}: {e}", rt.method, rt.path));
            assert_eq!(got.path, rt.path);
        }
    }

    #[test]
    fn parse_examples() {
        let (_, a) = parse(&req("POST", "/v1/apply", r#"{"prune":true,"jobs":2}"#)).unwrap();
        assert_eq!(
            a,
            Action::Apply(ApplyBody {
                prune: true,
                jobs: Some(2),
                ..Default::default()
            })
        );
        let (_, a) = parse(&req("GET", "/v1/status?project=%2Fp&format=text", "")).unwrap();
        assert_eq!(
            a,
            Action::Status(
                ProjectArg {
                    project: Some("/p".into())
                },
                Format::Text
            )
        );
        let (_, a) = parse(&req("GET", "/v1/machines/a-b/logs?tail=5&follow", "")).unwrap();
        assert_eq!(
            a,
            Action::Logs {
                machine: "a-b".into(),
                tail: Some(5),
                follow: true
            }
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(&req("GET", "/v2/x", "")).unwrap_err().status(), 404);
        assert_eq!(
            parse(&req("DELETE", "/v1/status", ""))
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(
            parse(&req("POST", "/v1/apply", "{bad"))
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            parse(&req("POST", "/v1/apply", r#"{"nope":1}"#))
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            parse(&req("POST", "/v1/destroy", "{}"))
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            parse(&req("POST", "/v1/machines/..%2Fx/start", ""))
                .unwrap_err()
                .status(),
            404
        );
        assert_eq!(
            parse(&req("POST", "/v1/machines/.x/start", ""))
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            parse(&req("GET", "/v1/status?format=xml", ""))
                .unwrap_err()
                .status(),
            400
        );
    }
}
