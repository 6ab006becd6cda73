//! Loading a project: moat's own format (a single `moat.yml`, or a folder with
//! `moat.yml` + `domains/<name>.yml` + `policies.yml`) and AnKLuMe project folders
//! (`anklume.yml` + `domains/*.yml` + `policies.yml`), into [`crate::model::Project`].

use crate::diag::Diagnostics;
use crate::model::Project;
use std::path::Path;

/// A loaded project plus the warnings found while loading it.
#[derive(Debug)]
pub struct Loaded {
    pub project: Project,
    pub warnings: Diagnostics,
}

/// Load and validate (everything that needs no allocation state) the project at
/// `path`: a file or a folder. On error, every problem found is returned.
pub fn load(path: &Path) -> Result<Loaded, Diagnostics> {
    let _ = path;
    todo!("format helper")
}
