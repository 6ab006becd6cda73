//! moat's state store: what cannot be observed on the host.
//!
//! - **allocations** (subnets, addresses, interface numbers) so they stay stable
//!   across applies (`moat_core::address::allocate` reads and returns them);
//! - **ownership** of host resources, recorded as *pending* before a resource
//!   is created and marked done after, so an apply killed in between leaves a
//!   record the next apply uses to finish or clean up;
//! - the **operation journal** of every action of every apply; `incomplete()`
//!   lists what a killed apply left unfinished;
//! - the **apply lock** ([`ApplyLock`]): one apply per root at a time.
//!
//! Everything lives in `<root>/state.db` (SQLite, WAL) and `<root>/apply.lock`.
//! Observed state (machines, bridges, rules) is never stored here: drivers
//! re-read it from the host.

mod error;
mod lock;
mod store;
mod time;

pub use error::StateError;
pub use lock::{ApplyLock, LockHolder};
pub use store::{JournalEntry, JournalStatus, Resource, StateStore, SCHEMA_VERSION};
pub use time::format_utc;

pub type Result<T> = std::result::Result<T, StateError>;
