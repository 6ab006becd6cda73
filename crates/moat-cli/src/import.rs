//! `moat import <format> DIR [-o OUT]`: another tool's configuration folder
//! turned into a moat project. The conversion lives in `moat-import`; this
//! module reads the arguments, prints what could not be carried over
//! (warnings with file:line on stderr) and writes moat.yml (stdout or OUT).
//!
//! A new source format is one more [`ImportCmd`] variant and one more arm in
//! [`run`]. `moat import incus` reads a live Incus server instead of a folder
//! (see [`crate::incus_import`]).

use crate::exit;
use crate::output::Output;
use crate::run::CliError;
use clap::{Args, Subcommand};
use moat_core::diag::{Diagnostic, Loc};
use moat_import::{ImportError, Imported};
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum ImportCmd {
    /// Convert a Chimera Spawn configuration folder (config.yaml, images/,
    /// profiles/, cloud-init/, nodes/) into a moat project using the nspawn driver
    Chimera(ImportArgs),
    /// Describe existing Incus projects, networks, profiles and instances as a
    /// moat project that adopts them in place (`moat plan` on it changes nothing)
    Incus(crate::incus_import::IncusImportArgs),
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The folder to read
    pub dir: PathBuf,
    #[command(flatten)]
    pub write: WriteArgs,
}

/// Where and how every importer writes its project.
#[derive(Args, Debug)]
pub struct WriteArgs {
    /// Where to write: a folder (gets moat.yml) or a file; default stdout
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Project name (default: the folder's name; `incus` for `import incus`)
    #[arg(short = 'n', long = "name")]
    pub name: Option<String>,
    /// Overwrite an existing output file
    #[arg(long)]
    pub force: bool,
}

fn import_err(e: ImportError) -> CliError {
    match e {
        ImportError::Read { path, source } => CliError::Io {
            what: format!("cannot read {}", path.display()),
            source,
        },
        other => CliError::Other(other.to_string()),
    }
}

/// Where moat.yml goes for `-o OUT`: into OUT when it is (or names) a folder.
pub(crate) fn target(out: &Path) -> PathBuf {
    let is_dir = out.is_dir() || out.as_os_str().to_string_lossy().ends_with('/');
    if is_dir || (out.extension().is_none() && !out.exists()) {
        out.join("moat.yml")
    } else {
        out.to_path_buf()
    }
}

/// Writes an imported project to `out` (a file, or `moat.yml` in a folder),
/// refusing to overwrite without `force`. Returns the file and its folder.
pub(crate) fn write_project(
    out: &Path,
    force: bool,
    text: &str,
) -> Result<(PathBuf, PathBuf), CliError> {
    let path = target(out);
    if path.exists() && !force {
        return Err(CliError::Exists(path));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| CliError::Io {
            what: format!("cannot create {}", parent.display()),
            source: e,
        })?;
    }
    std::fs::write(&path, text).map_err(|e| CliError::Io {
        what: format!("cannot write {}", path.display()),
        source: e,
    })?;
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok((path, dir))
}

pub fn run(out: &Output, root: &Path, cmd: &ImportCmd) -> Result<u8, CliError> {
    let (args, imported) = match cmd {
        ImportCmd::Incus(a) => return crate::incus_import::run(out, root, a),
        ImportCmd::Chimera(a) => {
            let files = moat_import::chimera::read_dir(&a.dir).map_err(import_err)?;
            let name = a.write.name.clone().unwrap_or_else(|| default_name(&a.dir));
            (
                a,
                moat_import::chimera::convert(&name, &files).map_err(import_err)?,
            )
        }
    };
    report(out, &args.dir, &imported);
    match &args.write.output {
        None => out.data(&imported.moat_yml),
        Some(o) => {
            let (path, dir) = write_project(o, args.write.force, &imported.moat_yml)?;
            out.info(&format!(
                "wrote {} ({} machines); next: `moat validate -f {}` then `moat plan -f {}`",
                path.display(),
                imported.machines.len(),
                dir.display(),
                dir.display()
            ));
        }
    }
    Ok(exit::OK)
}

fn default_name(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "imported".into())
}

/// Every note as a warning with its file:line, then a one-line summary.
fn report(out: &Output, dir: &Path, imported: &Imported) {
    for n in &imported.notes {
        let file = dir.join(&n.file).to_string_lossy().into_owned();
        let d = Diagnostic::warning(Some(Loc::new(file, n.line, 1)), "", n.message.clone());
        out.diagnostic(&d);
    }
    out.info(&format!(
        "imported {} machines into project '{}' ({} things not carried over or changed, listed above)",
        imported.machines.len(),
        imported.project,
        imported.notes.len()
    ));
}
