//! Address allocation: AnKLuMe's numbering convention on a fresh state, and
//! stable allocations afterwards (existing domains and machines never renumber).

use crate::diag::Diagnostics;
use crate::model::{Allocations, Project, Resolved};

/// The outcome of a successful allocation: the resolved project (carrying the
/// new allocations) and warnings.
#[derive(Debug)]
pub struct Allocated {
    pub resolved: Resolved,
    pub warnings: Diagnostics,
}

/// Resolve `project` against the allocations already made (`prior`, from the
/// state store; empty on a fresh root). `root` is the moat root path (names of
/// host resources derive from it). Pure: the caller persists
/// `resolved.allocations`.
pub fn allocate(project: &Project, prior: &Allocations, root: &str) -> Result<Allocated, Diagnostics> {
    let _ = (project, prior, root);
    todo!("address helper")
}
