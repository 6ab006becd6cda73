//! `moat init`: a commented starter project that validates as written.

use crate::run::CliError;
use std::path::Path;

pub const STARTER: &str = r#"# moat.yml: a starter project. Full reference: docs/format.md
#
# Each domain is its own network (bridge + subnet), firewalled from every
# other domain. Machines live in domains. Policies open specific flows.
# Check it with `moat validate`, preview with `moat plan`, run `moat apply`.

schema_version: 1
project: starter

defaults:
  image: busybox            # built from the host's busybox-static
  trust_level: semi-trusted

domains:
  admin:
    trust_level: admin      # addresses 10.100.0.0/24
    machines:
      tools:
        description: "Admin tools"
        memory: 256MiB
        cpus: 1

  work:
    trust_level: trusted    # addresses 10.110.0.0/24
    machines:
      dev:
        description: "Development"
        memory: 512MiB
      web:
        description: "A web server the admin domain may reach"
        command: ["httpd", "-f", "-p", "8080"]

  sandbox:
    trust_level: disposable # addresses 10.150.0.0/24
    egress: none            # no route out of the host
    machines:
      scratch:
        disposable: true    # fresh at every start, gone when it stops

policies:
  - from: admin
    to: work-web
    ports: [8080]
    description: "Admin reaches the web server"
"#;

pub fn write_starter(dir: &Path, force: bool) -> Result<std::path::PathBuf, CliError> {
    std::fs::create_dir_all(dir).map_err(|e| CliError::Io {
        what: format!("cannot create {}", dir.display()),
        source: e,
    })?;
    let path = dir.join("moat.yml");
    if path.exists() && !force {
        return Err(CliError::Exists(path));
    }
    std::fs::write(&path, STARTER).map_err(|e| CliError::Io {
        what: format!("cannot write {}", path.display()),
        source: e,
    })?;
    Ok(path)
}
