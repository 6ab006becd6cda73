//! A small HTTP/1.1 layer over a Unix stream: one request per connection
//! (`Connection: close`), bodies sized by `Content-Length`, streamed
//! responses delimited by closing the connection. Parsing is `httparse`'s.
//!
//! Both ends are here: the server reads a [`Request`] and writes responses;
//! the client ([`crate::client`]) writes requests and reads [`ResponseHead`]s.

use std::io::{BufRead, Read, Write};

/// Requests larger than this are refused (project paths and options only).
const MAX_BODY: usize = 1 << 20;
const MAX_HEAD: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection closed before a full request")]
    Closed,
    #[error("malformed HTTP: {0}")]
    Malformed(String),
    #[error("request too large (more than {0} bytes)")]
    TooLarge(usize),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone, Debug, Default)]
pub struct Request {
    pub method: String,
    /// Path without the query, percent-decoded.
    pub path: String,
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn new(method: &str, target: &str) -> Request {
        let (path, query) = split_target(target);
        Request {
            method: method.into(),
            path,
            query,
            ..Default::default()
        }
    }

    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn query_all(&self, name: &str) -> Vec<String> {
        self.query
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

fn split_target(target: &str) -> (String, Vec<(String, String)>) {
    let (p, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    (decode(p), query)
}

/// Percent-decoding (`+` is a space in queries).
pub fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Percent-encoding of everything but unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// Read the header block (through the blank line) from a buffered reader.
fn read_head(r: &mut impl BufRead) -> Result<Vec<u8>, HttpError> {
    let mut head = Vec::with_capacity(512);
    loop {
        let n = r.read_until(b'\n', &mut head)?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(HttpError::TooLarge(MAX_HEAD));
        }
    }
}

fn read_body(r: &mut impl Read, len: usize) -> Result<Vec<u8>, HttpError> {
    if len > MAX_BODY {
        return Err(HttpError::TooLarge(MAX_BODY));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Read one request.
pub fn read_request(r: &mut impl BufRead) -> Result<Request, HttpError> {
    let head = read_head(r)?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HttpError::Malformed("partial head".into())),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    }
    let method = req.method.unwrap_or("GET").to_string();
    let target = req.path.unwrap_or("/");
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let len = content_length(&headers)?;
    let body = read_body(r, len)?;
    let (path, query) = split_target(target);
    Ok(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

fn content_length(headers: &[(String, String)]) -> Result<usize, HttpError> {
    match headers.iter().find(|(k, _)| k == "content-length") {
        None => Ok(0),
        Some((_, v)) => v
            .trim()
            .parse()
            .map_err(|_| HttpError::Malformed(format!("bad Content-Length '{v}'"))),
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

/// Write a complete response.
pub fn write_response(
    w: &mut impl Write,
    status: u16,
    content_type: &str,
    extra: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// Start a response whose body runs until the connection closes.
pub fn start_stream(
    w: &mut impl Write,
    status: u16,
    content_type: &str,
    extra: &[(&str, String)],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nConnection: close\r\nCache-Control: no-cache\r\n",
        reason(status)
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.flush()
}

/// Write a request (client side).
pub fn write_request(
    w: &mut impl Write,
    method: &str,
    target: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: moat\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut buf = head.into_bytes();
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()
}

/// Status and headers of a response (client side).
#[derive(Clone, Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }
}

pub fn read_response_head(r: &mut impl BufRead) -> Result<ResponseHead, HttpError> {
    let head = read_head(r)?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HttpError::Malformed("partial head".into())),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    }
    Ok(ResponseHead {
        status: resp.code.unwrap_or(500),
        headers: resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
    })
}

/// JSON with every non-ASCII character escaped, so it fits in a header value.
pub fn ascii_json(v: &impl serde::Serialize) -> String {
    let s = serde_json::to_string(v).unwrap_or_else(|_| "null".into());
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for u in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let mut buf = Vec::new();
        write_request(
            &mut buf,
            "POST",
            "/v1/status?project=%2Ftmp%2Fa%20b&x",
            &[],
            b"{}",
        )
        .unwrap();
        let req = read_request(&mut std::io::Cursor::new(buf)).unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/v1/status");
        assert_eq!(req.query("project"), Some("/tmp/a b"));
        assert_eq!(req.query("x"), Some(""));
        assert_eq!(req.body, b"{}");
    }

    #[test]
    fn encode_decode() {
        let s = "/a b/é?&=%";
        assert_eq!(decode(&encode(s)), s);
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("%4"), "%4");
    }

    #[test]
    fn ascii_json_escapes() {
        let s = ascii_json(&"é😀");
        assert!(s.is_ascii());
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, "é😀");
    }

    #[test]
    fn response_head() {
        let mut buf = Vec::new();
        write_response(
            &mut buf,
            403,
            "application/json",
            &[("X-A", "1".into())],
            b"{}",
        )
        .unwrap();
        let mut c = std::io::Cursor::new(buf);
        let h = read_response_head(&mut c).unwrap();
        assert_eq!(h.status, 403);
        assert_eq!(h.header("x-a"), Some("1"));
        assert_eq!(h.content_length(), Some(2));
    }
}
