//! moat's daemon: an HTTP/JSON API on a Unix socket, an event stream, and
//! continuous reconciliation, over the same engine the CLI runs in-process.
//!
//! ```text
//! socket ─▶ server (thread per connection) ─▶ http::read_request
//!        ─▶ auth::Peer (SO_PEERCRED) ─▶ api::parse (Request → Action)
//!        ─▶ auth::Policy::check ─▶ server::execute (the one place that acts)
//!        ─▶ moat_engine::Engine ─▶ response / NDJSON stream
//! reconcile thread ─▶ watch project files + machine states ─▶ events::Bus
//! ```
//!
//! The daemon keeps no state of its own: the engine reads the project, the
//! host and the state store on every request, so a restarted daemon simply
//! observes again. It never stops machines (their supervisors own them).

pub mod api;
pub mod auth;
pub mod b64;
pub mod client;
pub mod events;
pub mod exec;
pub mod http;
pub mod reconcile;
pub mod server;

pub use auth::{Need, Others, Peer, Policy};
pub use server::{bind, policy, serve, socket_path, Daemon, DaemonConfig, DaemonError};
