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

pub mod address;
pub mod cloudinit;
pub mod diag;
pub mod load;
pub mod model;
pub mod naming;
pub mod observed;
pub mod plan;
pub mod spec;
pub mod suggest;
pub mod yaml;

use diag::Diagnostics;
use model::Allocations;
use std::path::Path;

/// Load, validate and allocate: what `moat validate` and `moat plan` run first.
/// Warnings from both stages are returned together with the result.
pub fn check(
    path: &Path,
    prior: &Allocations,
    root: &str,
) -> Result<(address::Allocated, Diagnostics), Diagnostics> {
    let loaded = load::load(path)?;
    let mut warnings = loaded.warnings;
    match address::allocate(&loaded.project, prior, root) {
        Ok(a) => {
            warnings.extend(a.warnings.clone());
            Ok((a, warnings))
        }
        Err(mut errs) => {
            warnings.extend(errs);
            errs = warnings;
            errs.sort();
            Err(errs)
        }
    }
}
