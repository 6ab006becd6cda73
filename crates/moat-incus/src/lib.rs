//! The `incus` driver: moat machines as Incus instances.
//!
//! ```text
//! moat domain  ──▶ Incus project  moat-<tag>-<domain>   (features.profiles, shared images)
//!              ──▶ bridge network mt<tag>-<domain> in the `default` project
//!                  (moat's bridge name, so moat's nftables ruleset applies unchanged)
//!              ──▶ the project's `default` profile: root disk + eth0 on that bridge
//! domain profile ─▶ Incus profile in the domain's project
//! machine      ──▶ instance named <full_name>, NIC with moat's static address
//!                  (`ipv4.address`), MAC and host-side name (moat's anti-spoofing rules
//!                  match on it), limits, `config:` passed through, marked
//!                  `user.moat.managed=true` + `user.moat.spec-hash`
//! ```
//!
//! Modules: [`client`] speaks HTTP/1.1 to incusd (Unix socket or HTTPS with a
//! client certificate) and waits for async operations; [`mapping`] is the pure
//! translation of moat's model into Incus objects (unit-tested); [`driver`]
//! implements `moat_driver::Driver` on top; [`image`] builds and uploads the
//! busybox image when the server has none; [`import`] turns existing Incus
//! state into a moat project; [`session`] runs interactive exec and the
//! console over Incus's websockets.

pub mod client;
pub mod driver;
pub mod image;
pub mod import;
pub mod mapping;
pub mod session;

pub use client::Client;
pub use driver::IncusDriver;

/// Failures talking to Incus.
#[derive(Debug, thiserror::Error)]
pub enum IncusError {
    /// incusd is not reachable (socket missing, connection refused, TLS failure).
    #[error("cannot talk to Incus at {server}: {source}; is incusd running (`incus info`)?")]
    Connect {
        server: String,
        #[source]
        source: std::io::Error,
    },
    /// Incus answered with an error; `message` is Incus's own.
    #[error("Incus refused {request}: {message} (HTTP {code})")]
    Api {
        request: String,
        code: u16,
        message: String,
    },
    #[error("Incus did not finish {request} within {secs} s; it may still be running (`incus operation list`)")]
    Timeout { request: String, secs: u64 },
    #[error("unexpected answer from Incus to {request}: {message}")]
    Protocol { request: String, message: String },
    #[error("Incus connection settings: {message}")]
    Config { message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl IncusError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, IncusError::Api { code: 404, .. })
            || matches!(self, IncusError::Api { message, .. } if message.contains("not found"))
    }
}
