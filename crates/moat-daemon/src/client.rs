//! A blocking client for the daemon's socket (used by the CLI and tests).

use crate::http::{self, HttpError, ResponseHead};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the moat daemon at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the moat daemon: {0}")]
    Http(#[from] HttpError),
    #[error("talking to the moat daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the moat daemon sent invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// A complete response.
#[derive(Debug)]
pub struct Reply {
    pub head: ResponseHead,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn status(&self) -> u16 {
        self.head.status
    }
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        Ok(serde_json::from_slice(&self.body)?)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The project's warnings the daemon sent along (a JSON array).
    pub fn warnings(&self) -> Option<serde_json::Value> {
        self.head
            .header(crate::server::WARNINGS_HEADER)
            .and_then(|w| serde_json::from_str(w).ok())
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    pub socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Client {
        Client {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    pub fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            socket: self.socket.clone(),
            source,
        })
    }

    /// Send a request; the response head and a reader positioned at the body.
    pub fn open(
        &self,
        method: &str,
        target: &str,
        body: Option<&serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> Result<(ResponseHead, BufReader<UnixStream>), ClientError> {
        let mut s = self.connect()?;
        let body = match body {
            Some(v) => serde_json::to_vec(v)?,
            None => vec![],
        };
        http::write_request(&mut s, method, target, headers, &body)?;
        let mut r = BufReader::new(s);
        let head = http::read_response_head(&mut r)?;
        Ok((head, r))
    }

    /// A request answered by one complete response.
    pub fn call(
        &self,
        method: &str,
        target: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, ClientError> {
        let (head, mut r) = self.open(method, target, body, &[])?;
        let mut body = Vec::new();
        match head.content_length() {
            Some(n) => {
                body.resize(n, 0);
                r.read_exact(&mut body)?;
            }
            None => {
                r.read_to_end(&mut body)?;
            }
        }
        Ok(Reply { head, body })
    }

    /// A request answered by JSON lines; `each` sees every line.
    pub fn lines(
        &self,
        method: &str,
        target: &str,
        body: Option<&serde_json::Value>,
        mut each: impl FnMut(serde_json::Value) -> bool,
    ) -> Result<ResponseHead, ClientError> {
        let (head, mut r) = self.open(method, target, body, &[])?;
        if head.status != 200 {
            // An error document, not a stream.
            let mut body = Vec::new();
            r.read_to_end(&mut body)?;
            each(serde_json::from_slice(&body)?);
            return Ok(head);
        }
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(head);
            }
            if line.trim().is_empty() {
                continue;
            }
            if !each(serde_json::from_str(line.trim())?) {
                return Ok(head);
            }
        }
    }
}
