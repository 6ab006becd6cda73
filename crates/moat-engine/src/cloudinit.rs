//! Writes a container's cloud-init NoCloud seed into its root file system
//! before the first boot, so an image with cloud-init configures itself
//! offline (no metadata server, no seed volume).
//!
//! ```text
//!  MachineSpec (merged cloud_init + NIC + bridge)
//!     │ moat_core::cloudinit::render
//!     ▼
//!  <root>/var/lib/cloud/seed/nocloud/{user-data,meta-data,network-config}
//!  <root>/etc/cloud/cloud.cfg.d/90-moat-nocloud.cfg   (only when cloud-init is installed)
//! ```
//!
//! Called by the root file system provider (`StoreRootfs::prepare_spec`) that
//! the native and nspawn drivers share. Machines without `cloud_init:` get
//! nothing. Written files take the owner of the root folder, so a root whose
//! ownership was already shifted for a user namespace stays consistent (an
//! unshifted one is shifted later together with the rest of the tree).

use moat_core::cloudinit::{render, CloudInitError, NoCloudSeed, SeedNic, SEED_DIR};
use moat_driver::MachineSpec;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The datasource setting moat writes next to the seed: look only at the
/// NoCloud seed (no probing of network metadata services, which would wait
/// for timeouts in an offline container).
pub const DATASOURCE_CFG: &str = "etc/cloud/cloud.cfg.d/90-moat-nocloud.cfg";
const DATASOURCE_TEXT: &str =
    "# Written by moat: the seed is in /var/lib/cloud/seed/nocloud.\ndatasource_list: [ NoCloud, None ]\n";

/// The system setting moat writes: [`DATASOURCE_TEXT`], plus `locale:
/// C.UTF-8` when the image has no compiled locales (a minbase Debian root has
/// only the built-in C.UTF-8): cloud-init's default en_US.UTF-8 would make its
/// `locale` module fail ("status: error") on first boot. A `locale:` in the
/// machine's user-data still wins (user-data overrides system settings).
fn datasource_text(root: &Path) -> String {
    let lib = root.join("usr/lib/locale");
    let compiled = lib.join("locale-archive").exists()
        || fs::read_dir(&lib).is_ok_and(|d| {
            d.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n != "C.utf8" && n != "C.UTF-8"
            })
        });
    if compiled {
        DATASOURCE_TEXT.to_string()
    } else {
        format!("{DATASOURCE_TEXT}# The image has no compiled locales: cloud-init's default en_US.UTF-8 would fail.\nlocale: C.UTF-8\n")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Render(#[from] CloudInitError),
    #[error("machine '{machine}': writing the cloud-init seed to {}: {source}; check that the machine's root file system is writable", path.display())]
    Write {
        machine: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("machine '{machine}': {} is a symlink in the machine's root; moat does not follow it on the host (remove it from the image)", path.display())]
    Symlink { machine: String, path: PathBuf },
}

/// The seed `spec` renders to (its NIC for the default network-config), or
/// `None` when the machine has no `cloud_init:`.
pub fn seed_for(spec: &MachineSpec) -> Result<Option<NoCloudSeed>, CloudInitError> {
    if spec.machine.cloud_init.is_none() {
        return Ok(None);
    }
    let nic = match (&spec.nic, &spec.bridge) {
        (Some(n), Some(b)) => Some(SeedNic {
            mac: n.mac,
            address: n.ip,
            prefix_len: b.prefix_len,
            gateway: b.gateway,
            nameservers: vec![b.gateway],
        }),
        _ => None,
    };
    render(&spec.machine, nic.as_ref()).map(Some)
}

/// Writes the seed of `spec` into the root file system at `root`. Returns the
/// seed's instance id, or `None` when the machine has no `cloud_init:`.
pub fn write_seed(root: &Path, spec: &MachineSpec) -> Result<Option<String>, SeedError> {
    let Some(seed) = seed_for(spec)? else {
        return Ok(None);
    };
    let machine = spec.machine.full_name.as_str();
    let owner = fs::metadata(root)
        .map(|m| (m.uid(), m.gid()))
        .map_err(|e| write_err(machine, root, e))?;
    let dir = root.join(SEED_DIR);
    create_dirs(machine, root, Path::new(SEED_DIR), owner)?;
    // A previous seed's network-config must not outlive a seed without one.
    let stale = dir.join(moat_core::cloudinit::NETWORK_CONFIG);
    if seed.network_config.is_none() && stale.exists() {
        fs::remove_file(&stale).map_err(|e| write_err(machine, &stale, e))?;
    }
    for (name, text) in seed.files() {
        // user-data may hold passwords or keys: readable by root only.
        let mode = if name == moat_core::cloudinit::USER_DATA {
            0o600
        } else {
            0o644
        };
        write_file(machine, &dir.join(name), text, mode, owner)?;
    }
    let cfg_dir = Path::new(DATASOURCE_CFG)
        .parent()
        .unwrap_or(Path::new("etc"));
    let mut p = root.to_path_buf();
    for c in cfg_dir.components() {
        p.push(c);
        refuse_symlink(machine, &p)?;
    }
    if root.join(cfg_dir).is_dir() {
        write_file(
            machine,
            &root.join(DATASOURCE_CFG),
            &datasource_text(root),
            0o644,
            owner,
        )?;
    }
    Ok(seed.instance_id().map(str::to_string))
}

fn write_err(machine: &str, path: &Path, source: std::io::Error) -> SeedError {
    SeedError::Write {
        machine: machine.into(),
        path: path.to_path_buf(),
        source,
    }
}

fn refuse_symlink(machine: &str, p: &Path) -> Result<(), SeedError> {
    if fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(SeedError::Symlink {
            machine: machine.into(),
            path: p.to_path_buf(),
        });
    }
    Ok(())
}

/// Creates `rel` below `root` one component at a time, refusing symlinks
/// (the image's content must not redirect host writes).
fn create_dirs(machine: &str, root: &Path, rel: &Path, owner: (u32, u32)) -> Result<(), SeedError> {
    let mut p = root.to_path_buf();
    for c in rel.components() {
        p.push(c);
        refuse_symlink(machine, &p)?;
        if !p.exists() {
            fs::create_dir(&p).map_err(|e| write_err(machine, &p, e))?;
            std::os::unix::fs::chown(&p, Some(owner.0), Some(owner.1))
                .map_err(|e| write_err(machine, &p, e))?;
        }
    }
    Ok(())
}

fn write_file(
    machine: &str,
    path: &Path,
    text: &str,
    mode: u32,
    owner: (u32, u32),
) -> Result<(), SeedError> {
    refuse_symlink(machine, path)?;
    if let Some(parent) = path.parent() {
        refuse_symlink(machine, parent)?;
    }
    fs::write(path, text).map_err(|e| write_err(machine, path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| write_err(machine, path, e))?;
    std::os::unix::fs::chown(path, Some(owner.0), Some(owner.1))
        .map_err(|e| write_err(machine, path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::model::{Machine, ResolvedNic};
    use moat_driver::BridgeInfo;

    fn spec(ci: Option<serde_json::Value>) -> MachineSpec {
        let mut m = Machine::adhoc("web", "debian/bookworm");
        m.full_name = "lab-web".into();
        m.cloud_init = ci;
        MachineSpec {
            machine: m,
            nic: Some(ResolvedNic {
                machine: "lab-web".into(),
                ip: "10.9.0.3".parse().unwrap(),
                mac: [2, 0, 0, 0, 0, 3],
                host_if: "mt-x-3".into(),
            }),
            bridge: Some(BridgeInfo {
                name: "mt-x-lab".into(),
                gateway: "10.9.0.254".parse().unwrap(),
                prefix_len: 24,
            }),
            spec_hash: String::new(),
            hosts: vec![],
        }
    }

    #[test]
    fn writes_the_seed_and_the_datasource_setting() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc/cloud/cloud.cfg.d")).unwrap();
        let s = spec(Some(
            serde_json::json!({"user-data": {"runcmd": [["true"]]}}),
        ));
        let id = write_seed(d.path(), &s).unwrap().unwrap();
        assert!(id.starts_with("moat-lab-web-"));
        let seed = d.path().join(SEED_DIR);
        let ud = fs::read_to_string(seed.join("user-data")).unwrap();
        assert!(ud.starts_with("#cloud-config\n"));
        let mode = fs::metadata(seed.join("user-data")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let md = fs::read_to_string(seed.join("meta-data")).unwrap();
        assert!(md.contains(&id));
        let nc = fs::read_to_string(seed.join("network-config")).unwrap();
        assert!(nc.contains("10.9.0.3/24"), "{nc}");
        let ds = fs::read_to_string(d.path().join(DATASOURCE_CFG)).unwrap();
        assert!(ds.contains("NoCloud"));
        // No compiled locales in this root: cloud-init gets C.UTF-8.
        assert!(ds.contains("locale: C.UTF-8"), "{ds}");
        // With en_US compiled, cloud-init's own default is kept.
        fs::create_dir_all(d.path().join("usr/lib/locale/en_US.utf8")).unwrap();
        write_seed(d.path(), &s).unwrap();
        let ds = fs::read_to_string(d.path().join(DATASOURCE_CFG)).unwrap();
        assert!(!ds.contains("locale:"), "{ds}");
    }

    #[test]
    fn nothing_without_cloud_init_and_no_cfg_without_cloud_init_installed() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(write_seed(d.path(), &spec(None)).unwrap(), None);
        assert!(!d.path().join("var").exists());
        write_seed(d.path(), &spec(Some(serde_json::json!({})))).unwrap();
        assert!(d.path().join(SEED_DIR).join("meta-data").exists());
        assert!(!d.path().join(DATASOURCE_CFG).exists());
    }

    #[test]
    fn refuses_symlinks_in_the_image() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/tmp", d.path().join("var")).unwrap();
        let e = write_seed(d.path(), &spec(Some(serde_json::json!({})))).unwrap_err();
        assert!(matches!(e, SeedError::Symlink { .. }), "{e}");
    }
}
