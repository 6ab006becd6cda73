//! `moat kernel ...`: guest kernels for microVMs (see docs/vm.md, "Kernels").

use crate::cli::{Cli, KernelCmd};
use crate::exit;
use crate::output::Output;
use crate::run::CliError;
use std::path::PathBuf;

fn kernels_dir(cli: &Cli) -> PathBuf {
    moat_qemu::kernel::store_dir(&cli.root.join("images"))
}

pub fn run(cli: &Cli, out: &Output, cmd: &KernelCmd) -> Result<u8, CliError> {
    match cmd {
        KernelCmd::Fetch { package } => {
            out.info(&format!("==> fetching {package}"));
            let k = moat_qemu::kernel::fetch(&kernels_dir(cli), package).map_err(|e| {
                CliError::Other(format!("{e}\nCheck apt's sources and network, then retry."))
            })?;
            out.data(&format!("{} {}", k.version, k.vmlinux.display()));
            Ok(exit::OK)
        }
        KernelCmd::Ls => {
            for (v, p) in moat_qemu::kernel::list(&kernels_dir(cli)) {
                out.data(&format!("{v} {}", p.display()));
            }
            Ok(exit::OK)
        }
    }
}
