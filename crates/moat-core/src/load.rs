//! Loading a project: moat's own format (a single `moat.yml`, or a folder with
//! `moat.yml` + `domains/<name>.yml` + `policies.yml`) and AnKLuMe project folders
//! (`anklume.yml` + `domains/*.yml` + `policies.yml`), into [`crate::model::Project`].
//!
//! Flow: [`load`] reads the files (the only I/O in this crate) and hands their
//! bytes to [`load_files`], which is pure and is what the fuzzer drives:
//! bytes → [`crate::yaml`] spanned tree → [`convert`] (types, names, enums,
//! cross-references) → `Project`. Every problem is collected, sorted by
//! file:line:col, and returned together; warnings ride along on success.
//!
//! File names in diagnostics are relative to the project folder
//! (`moat.yml`, `domains/pro.yml`), whatever path the user passed.

mod convert;
mod keys;

use crate::diag::{Diagnostic, Diagnostics, Loc};
use crate::model::Project;
use std::path::{Path, PathBuf};

pub use convert::{builtin_image, parse_size, SCHEMA_VERSION};
pub use keys::NOT_ACTED_ON;

/// Where a machine's `image` comes from: the project's `images:` entry of that
/// name, else a built-in source (`busybox`, `debian/<suite>`, `ubuntu/<suite>`,
/// `oci:<ref>`). `None` only for AnKLuMe images moat cannot build (warned at load).
pub fn resolve_image(project: &Project, reference: &str) -> Option<crate::model::ImageSource> {
    project
        .images
        .get(reference)
        .cloned()
        .or_else(|| builtin_image(reference))
}

/// A loaded project plus the warnings found while loading it.
#[derive(Debug)]
pub struct Loaded {
    pub project: Project,
    pub warnings: Diagnostics,
}

/// moat's own top file.
pub const MOAT_FILE: &str = "moat.yml";
/// AnKLuMe's top file.
pub const ANKLUME_FILE: &str = "anklume.yml";
/// Separate policies file of a folder project.
pub const POLICIES_FILE: &str = "policies.yml";
/// Folder of per-domain files.
pub const DOMAINS_DIR: &str = "domains";

/// Load and validate (everything that needs no allocation state) the project at
/// `path`: a file (`moat.yml`, `anklume.yml`, or any other name, read as moat's
/// format) or a folder (holding `moat.yml`, else `anklume.yml`). On error,
/// every problem found is returned (warnings included).
pub fn load(path: &Path) -> Result<Loaded, Diagnostics> {
    let fail = |msg: String, hint: &str| {
        Err(Diagnostics(vec![
            Diagnostic::error(None, "", msg).with_hint(hint)
        ]))
    };
    let (dir, top) = if path.is_dir() {
        if path.join(MOAT_FILE).is_file() {
            (path.to_path_buf(), MOAT_FILE.to_string())
        } else if path.join(ANKLUME_FILE).is_file() {
            (path.to_path_buf(), ANKLUME_FILE.to_string())
        } else {
            return fail(
                format!("no {MOAT_FILE} or {ANKLUME_FILE} in {}", path.display()),
                "run `moat init` to create a project here, or pass the project's folder or file",
            );
        }
    } else if path.is_file() {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (dir, name)
    } else {
        return fail(
            format!("{}: no such file or folder", path.display()),
            "pass a project folder or its moat.yml / anklume.yml; `moat init` creates one",
        );
    };

    // Absolute, so that the default project name is the folder's (also for ".").
    let dir = dir.canonicalize().unwrap_or(dir);
    let mut list_error = None;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut errors = Diagnostics::default();
    let mut read = |name: String, p: PathBuf| match std::fs::read(&p) {
        Ok(b) => files.push((name, b)),
        Err(e) => errors.push(
            Diagnostic::error(None, "", format!("cannot read {}: {e}", p.display()))
                .with_hint("check that the file exists and is readable"),
        ),
    };
    read(top.clone(), dir.join(&top));
    let domains_dir = dir.join(DOMAINS_DIR);
    if domains_dir.is_dir() {
        match std::fs::read_dir(&domains_dir) {
            Ok(rd) => {
                let mut names: Vec<String> = rd
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".yml") || n.ends_with(".yaml"))
                    .collect();
                names.sort();
                for n in names {
                    read(format!("{DOMAINS_DIR}/{n}"), domains_dir.join(&n));
                }
            }
            Err(e) => list_error = Some(e),
        }
    }
    if top != POLICIES_FILE && dir.join(POLICIES_FILE).is_file() {
        read(POLICIES_FILE.to_string(), dir.join(POLICIES_FILE));
    }
    if let Some(e) = list_error {
        errors.push(
            Diagnostic::error(
                None,
                "",
                format!("cannot list {}: {e}", domains_dir.display()),
            )
            .with_hint("check the folder's permissions"),
        );
    }
    if errors.has_errors() {
        return Err(errors);
    }
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    load_files(&dir, &top, &refs)
}

/// Load a project from files in memory: pure, no I/O. `dir` is the project
/// folder (recorded in [`Project::dir`], and its last component is the default
/// project name); `top` names the top file among `files` (`anklume.yml` selects
/// the AnKLuMe format, any other name moat's). Other files are used by name:
/// `domains/<name>.yml` (or `.yaml`) and `policies.yml`; the rest are ignored.
pub fn load_files(dir: &Path, top: &str, files: &[(&str, &[u8])]) -> Result<Loaded, Diagnostics> {
    convert::convert(dir, top, files)
}

/// Load a single-file project from a string: `name` is the file name shown in
/// diagnostics (`moat.yml` or `anklume.yml`).
pub fn load_str(name: &str, text: &str) -> Result<Loaded, Diagnostics> {
    load_files(Path::new("."), name, &[(name, text.as_bytes())])
}

/// Decode a file's bytes, pointing at the first invalid byte if it is not UTF-8.
fn decode<'a>(name: &str, bytes: &'a [u8]) -> Result<&'a str, Diagnostic> {
    std::str::from_utf8(bytes).map_err(|e| {
        let good = &bytes[..e.valid_up_to()];
        let line = good.iter().filter(|b| **b == b'\n').count() + 1;
        let col = good.iter().rev().take_while(|b| **b != b'\n').count() + 1;
        Diagnostic::error(
            Some(Loc::new(
                name,
                u32::try_from(line).unwrap_or(u32::MAX),
                u32::try_from(col).unwrap_or(u32::MAX),
            )),
            "",
            "file is not valid UTF-8 text",
        )
        .with_hint("save the file as UTF-8")
    })
}
