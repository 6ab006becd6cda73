//! A small client for Incus's REST API: HTTP/1.1 over the local Unix socket,
//! or over TLS with a client certificate for a remote server.
//!
//! ```text
//! call(method, path, body) ─▶ one connection per request (Connection: close)
//!   ─▶ Incus envelope {type: sync|async|error}
//!        sync  ─▶ metadata
//!        async ─▶ GET /1.0/operations/<id>/wait?timeout=N ─▶ metadata (or the operation's `err`)
//!        error ─▶ IncusError::Api carrying Incus's own message
//! ```
//!
//! One connection per request keeps the code small and is cheap on the Unix
//! socket; with TLS each request pays a handshake (fine for moat's volume).
//! The remote server's certificate is pinned (compared byte for byte with the
//! configured one), the way the `incus` CLI trusts a remote.

use crate::IncusError;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Default path of incusd's local socket.
pub const DEFAULT_SOCKET: &str = "/var/lib/incus/unix.socket";

#[derive(Clone)]
enum Endpoint {
    Unix(PathBuf),
    Https {
        /// `host:port`.
        addr: String,
        server_name: rustls_pki_types::ServerName<'static>,
        tls: Arc<rustls::ClientConfig>,
    },
}

/// A connection description for one Incus server (cheap to clone).
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    /// How long a single HTTP exchange may take.
    pub io_timeout: Duration,
    /// How long an async operation may take before moat gives up waiting.
    pub op_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.describe())
    }
}

/// An HTTP response, body undecoded.
struct RawResponse {
    status: u16,
    body: Vec<u8>,
}

impl Client {
    /// The local server, through `$INCUS_SOCKET` or [`DEFAULT_SOCKET`].
    pub fn local() -> Client {
        let path = std::env::var_os("INCUS_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        Client::unix(path)
    }

    pub fn unix(path: impl Into<PathBuf>) -> Client {
        Client {
            endpoint: Endpoint::Unix(path.into()),
            io_timeout: Duration::from_secs(60),
            op_timeout: Duration::from_secs(120),
        }
    }

    /// A remote server at `url` (`https://host[:port]`, port 8443 by default),
    /// authenticating with a client certificate and trusting exactly the
    /// server certificate in `server_cert` (PEM).
    pub fn https(
        url: &str,
        client_cert: &Path,
        client_key: &Path,
        server_cert: &Path,
    ) -> Result<Client, IncusError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let bad = |what: String| IncusError::Config { message: what };
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            bad(format!(
                "Incus URL '{url}' must start with https:// (the local server needs no URL)"
            ))
        })?;
        let hostport = rest.trim_end_matches('/');
        let (host, addr) = split_host_port(hostport);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(client_cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                bad(format!(
                    "cannot read the client certificate {}: {e}",
                    client_cert.display()
                ))
            })?;
        let key = PrivateKeyDer::from_pem_file(client_key).map_err(|e| {
            bad(format!(
                "cannot read the client key {}: {e}",
                client_key.display()
            ))
        })?;
        let pinned = CertificateDer::from_pem_file(server_cert).map_err(|e| {
            bad(format!(
                "cannot read the server certificate {}: {e}",
                server_cert.display()
            ))
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = Arc::new(PinnedServer {
            cert: pinned.into_owned(),
            provider: provider.clone(),
        });
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(certs, key)
            .map_err(|e| bad(format!("the client certificate or key is not usable: {e}")))?;
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| bad(format!("'{host}' is not a valid server name: {e}")))?;
        Ok(Client {
            endpoint: Endpoint::Https {
                addr,
                server_name,
                tls: Arc::new(tls),
            },
            io_timeout: Duration::from_secs(60),
            op_timeout: Duration::from_secs(120),
        })
    }

    /// Where this client connects (for messages).
    pub fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Https { addr, .. } => format!("https://{addr}"),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self.endpoint, Endpoint::Unix(_))
    }

    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<(&[u8], &str)>,
        read_timeout: Duration,
    ) -> Result<RawResponse, IncusError> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: incus\r\nConnection: close\r\nUser-Agent: moat\r\n"
        );
        if let Some((b, ctype)) = body {
            req.push_str(&format!(
                "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some((b, _)) = body {
            bytes.extend_from_slice(b);
        }
        let mut s = self.connect(read_timeout)?;
        let resp = match s.write_all(&bytes).and_then(|_| s.flush()) {
            Ok(()) => read_response(BufReader::new(s)),
            Err(e) => Err(e),
        };
        resp.map_err(|source| IncusError::Connect {
            server: self.describe(),
            source,
        })
    }

    /// A new connection to the server (TLS handshake done lazily by the
    /// first write), for one HTTP exchange or one websocket.
    pub(crate) fn connect(&self, read_timeout: Duration) -> Result<Stream, IncusError> {
        let net = |source: std::io::Error| IncusError::Connect {
            server: self.describe(),
            source,
        };
        match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p).map_err(net)?;
                s.set_read_timeout(Some(read_timeout)).map_err(net)?;
                s.set_write_timeout(Some(self.io_timeout)).map_err(net)?;
                Ok(Stream::Unix(s))
            }
            Endpoint::Https {
                addr,
                server_name,
                tls,
            } => {
                let sock = TcpStream::connect(addr).map_err(net)?;
                sock.set_read_timeout(Some(read_timeout)).map_err(net)?;
                sock.set_write_timeout(Some(self.io_timeout)).map_err(net)?;
                let conn = rustls::ClientConnection::new(tls.clone(), server_name.clone())
                    .map_err(|e| net(std::io::Error::other(e)))?;
                Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, sock))))
            }
        }
    }

    /// Sends a request and decodes Incus's envelope; async operations are
    /// returned as such (see [`Client::call`] to wait for them).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Envelope, IncusError> {
        let encoded = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let raw = self.exchange(
            method,
            path,
            encoded.as_deref().map(|b| (b, "application/json")),
            self.io_timeout,
        )?;
        self.envelope(method, path, raw)
    }

    fn envelope(&self, method: &str, path: &str, raw: RawResponse) -> Result<Envelope, IncusError> {
        let v: Value = serde_json::from_slice(&raw.body).map_err(|e| IncusError::Protocol {
            request: format!("{method} {path}"),
            message: format!(
                "HTTP {}: not JSON ({e}): {}",
                raw.status,
                String::from_utf8_lossy(&raw.body[..raw.body.len().min(200)])
            ),
        })?;
        match v["type"].as_str() {
            Some("sync") => Ok(Envelope::Sync(v["metadata"].clone())),
            Some("async") => Ok(Envelope::Async {
                operation: v["operation"].as_str().unwrap_or("").to_string(),
                metadata: v["metadata"].clone(),
            }),
            _ => Err(IncusError::Api {
                request: format!("{method} {path}"),
                code: v["error_code"].as_u64().unwrap_or(raw.status as u64) as u16,
                message: v["error"].as_str().unwrap_or("unknown error").to_string(),
            }),
        }
    }

    /// GET, returning the metadata of a sync response.
    pub fn get(&self, path: &str) -> Result<Value, IncusError> {
        self.call("GET", path, None)
    }

    /// GET that maps "not found" to `None`.
    pub fn get_opt(&self, path: &str) -> Result<Option<Value>, IncusError> {
        match self.get(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends a request; waits for an async operation (up to `op_timeout`) and
    /// returns its metadata.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, IncusError> {
        match self.send(method, path, body)? {
            Envelope::Sync(m) => Ok(m),
            Envelope::Async { operation, .. } => {
                self.wait(&operation, self.op_timeout, &format!("{method} {path}"))
            }
        }
    }

    /// Waits for operation `op` (its URL) and returns its metadata, or the
    /// operation's own error message when it failed.
    pub fn wait(&self, op: &str, timeout: Duration, request: &str) -> Result<Value, IncusError> {
        let secs = timeout.as_secs().max(1);
        let path = format!("{op}/wait?timeout={secs}");
        let raw = self.exchange("GET", &path, None, timeout + Duration::from_secs(10))?;
        // A failed operation comes back as an error envelope: name the request.
        let m = match self.envelope("GET", &path, raw).map_err(|e| match e {
            IncusError::Api { code, message, .. } => IncusError::Api {
                request: request.to_string(),
                code,
                message,
            },
            other => other,
        })? {
            Envelope::Sync(m) => m,
            Envelope::Async { metadata, .. } => metadata,
        };
        match m["status_code"].as_u64() {
            Some(200) => Ok(m["metadata"].clone()),
            Some(103) | Some(105) | Some(106) => Err(IncusError::Timeout {
                request: request.to_string(),
                secs,
            }),
            _ => Err(IncusError::Api {
                request: request.to_string(),
                code: 400,
                message: m["err"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| m["status"].as_str().unwrap_or("operation failed"))
                    .to_string(),
            }),
        }
    }

    /// GET of a raw file (exec output logs).
    pub fn get_raw(&self, path: &str) -> Result<Vec<u8>, IncusError> {
        let raw = self.exchange("GET", path, None, self.io_timeout)?;
        if raw.status >= 400 {
            return Err(self.envelope("GET", path, raw).err().unwrap_or_else(|| {
                IncusError::Protocol {
                    request: format!("GET {path}"),
                    message: "unexpected status".into(),
                }
            }));
        }
        Ok(raw.body)
    }

    /// POST of a raw body (image upload); waits for the operation.
    pub fn post_raw(&self, path: &str, body: &[u8], ctype: &str) -> Result<Value, IncusError> {
        let raw = self.exchange("POST", path, Some((body, ctype)), self.io_timeout)?;
        match self.envelope("POST", path, raw)? {
            Envelope::Sync(m) => Ok(m),
            Envelope::Async { operation, .. } => {
                self.wait(&operation, self.op_timeout, &format!("POST {path}"))
            }
        }
    }
}

/// Incus's reply to a request.
#[derive(Debug)]
pub enum Envelope {
    Sync(Value),
    Async { operation: String, metadata: Value },
}

/// One connection to incusd: the Unix socket or TLS over TCP.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    /// The socket under the stream (for poll(2)).
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.sock.as_raw_fd(),
        }
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tls(s) => s.sock.set_nonblocking(on),
        }
    }

    /// Timeouts off: a websocket may be idle for as long as its session lasts.
    pub(crate) fn clear_timeouts(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s
                .set_read_timeout(None)
                .and_then(|_| s.set_write_timeout(None)),
            Stream::Tls(s) => s
                .sock
                .set_read_timeout(None)
                .and_then(|_| s.sock.set_write_timeout(None)),
        }
    }
}

impl std::io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::Unix(_) => "Stream(unix)",
            Stream::Tls(_) => "Stream(tls)",
        })
    }
}

fn split_host_port(hostport: &str) -> (&str, String) {
    // [v6]:port, host:port, host
    if let Some(rest) = hostport.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once(']') {
            let port = p.strip_prefix(':').unwrap_or("8443");
            return (h, format!("[{h}]:{port}"));
        }
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => (h, format!("{h}:{p}")),
        None => (hostport, format!("{hostport}:8443")),
    }
}

/// Reads one HTTP/1.1 response (Content-Length, chunked, or until EOF).
fn read_response(mut r: impl BufRead) -> std::io::Result<RawResponse> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no HTTP status line"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("connection closed inside the headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        // TLS peers may close without close_notify: keep what arrived.
        match r.read_to_end(&mut body) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e),
        }
    }
    Ok(RawResponse { status, body })
}

/// Trusts exactly one server certificate.
#[derive(Debug)]
struct PinnedServer {
    cert: rustls_pki_types::CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the configured server_cert".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_length_bodies() {
        let r = read_response(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"[..]).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hi"[..]));
        let r = read_response(
            &b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"[..],
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("127.0.0.1:9443").1, "127.0.0.1:9443");
        assert_eq!(split_host_port("example").1, "example:8443");
        assert_eq!(split_host_port("[::1]:1").0, "::1");
    }

    #[test]
    fn encodes() {
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }
}
