//! Domain networks: one bridge per domain, a veth (later a tap) per machine,
//! static addresses or DHCP, and moat's nftables ruleset.
//!
//! ```text
//!  Resolved ──render()──▶ Ruleset (pure, hashed) ──NetHost::apply_ruleset──▶ nft -f (one transaction)
//!  ResolvedNetwork ──NetHost::ensure_bridge──▶ ip link/addr (idempotent, fixes drift)
//!  ResolvedNic + netns ──NetHost::attach──▶ veth pair, eth0 configured inside
//!  host ──NetHost::observe──▶ (ObservedNetwork by domain, firewall hash)
//! ```
//!
//! [`render`] is pure; everything on the host goes through
//! [`moat_host::exec::Executor`] (`ip`, `nft`, `nsenter`, `sysctl`, `dnsmasq`).
//! See docs/network.md for the rule structure and what each rule stops.

pub mod dhcp;
#[doc(hidden)]
pub mod fixture;
pub mod host;
pub mod render;

pub use host::{Applied, NetHost, NetnsTarget, Updated};
pub use render::{delete_script, render, update_script, RenderOptions, Ruleset};

use moat_host::exec::HostError;
use std::path::PathBuf;

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A host command failed; `what` says which step.
    #[error("{what}: {source}")]
    Command {
        what: String,
        #[source]
        source: HostError,
    },
    /// A command's JSON output could not be read.
    #[error(
        "{what}: cannot parse the output ({detail}); is iproute2/nftables recent enough for `-j`?"
    )]
    Parse { what: String, detail: String },
    /// A host object with moat's name exists but is not moat's.
    #[error("{name} {detail}")]
    Conflict { name: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// dnsmasq could not be started.
    #[error("DHCP server for bridge {bridge}: {detail}; check that dnsmasq is installed (package dnsmasq-base)")]
    Dhcp { bridge: String, detail: String },
}
