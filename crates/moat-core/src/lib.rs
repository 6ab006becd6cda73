//! moat's pure core.
//!
//! Data flows one way through this crate:
//!
//! ```text
//!  files ──load──▶ yaml::Node (spanned) ──convert+validate──▶ model::Project
//!                                                              │
//!        state (prior allocations) ──────────▶ address::allocate
//!                                                              │
//!                                               model::Resolved (+ new allocations)
//!                                                              │
//!        observed host state (from drivers) ──▶ plan::plan ──▶ plan::Plan
//! ```
//!
//! Nothing here touches the host besides reading the project files given to
//! [`load`]. No `unsafe`. Everything is deterministic (BTreeMaps, sorted output).
#![forbid(unsafe_code)]

pub mod diag;
pub mod model;
pub mod naming;
pub mod observed;
