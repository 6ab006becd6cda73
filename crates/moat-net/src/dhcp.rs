//! DHCP (and DNS for the domain's names) on a `dhcp: true` domain: one
//! `dnsmasq` per bridge, bound to that bridge only, handing each machine its
//! allocated address (static leases only: no dynamic pool).
//!
//! Files live in a run directory the caller chooses: `<bridge>.pid`,
//! `<bridge>.leases`, `<bridge>.log` and `<bridge>.args` (the arguments of
//! the running instance, so [`NetHost::ensure_dhcp`] restarts it only when
//! the configuration changed).

use crate::host::NetHost;
use crate::NetError;
use moat_core::model::{ResolvedNetwork, ResolvedNic};
use moat_core::naming;
use moat_host::exec::{Cmd, Executor};
use std::path::{Path, PathBuf};

fn file(run_dir: &Path, bridge: &str, ext: &str) -> PathBuf {
    run_dir.join(format!("{bridge}.{ext}"))
}

/// dnsmasq arguments for one domain (pure; exposed for tests and `moat network rules`).
pub fn dnsmasq_args(net: &ResolvedNetwork, nics: &[&ResolvedNic], run_dir: &Path) -> Vec<String> {
    let br = &net.bridge;
    let subnet = net.subnet.trunc();
    let mut a = vec![
        "--conf-file=/dev/null".to_string(),
        format!("--pid-file={}", file(run_dir, br, "pid").display()),
        format!("--dhcp-leasefile={}", file(run_dir, br, "leases").display()),
        format!("--log-facility={}", file(run_dir, br, "log").display()),
        "--bind-interfaces".into(),
        format!("--interface={br}"),
        "--except-interface=lo".into(),
        format!("--listen-address={}", net.gateway),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--no-poll".into(),
        "--dhcp-authoritative".into(),
        format!(
            "--dhcp-range={},static,{},1h",
            subnet.network(),
            subnet.netmask()
        ),
        format!("--dhcp-option=option:router,{}", net.gateway),
        format!("--dhcp-option=option:dns-server,{}", net.gateway),
    ];
    let mut nics: Vec<&&ResolvedNic> = nics.iter().collect();
    nics.sort_by(|x, y| x.machine.cmp(&y.machine));
    for n in nics {
        a.push(format!(
            "--dhcp-host={},{},{}",
            naming::mac_string(&n.mac),
            n.ip,
            n.machine
        ));
        a.push(format!("--host-record={},{}", n.machine, n.ip));
    }
    a
}

impl<E: Executor> NetHost<E> {
    /// Start (or restart after a configuration change) the domain's dnsmasq.
    /// The bridge must exist with its gateway address. Returns its pid.
    pub fn ensure_dhcp(
        &self,
        net: &ResolvedNetwork,
        nics: &[&ResolvedNic],
        run_dir: &Path,
    ) -> Result<u32, NetError> {
        let br = &net.bridge;
        let io = |path: &Path, source| NetError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(run_dir).map_err(|e| io(run_dir, e))?;
        let args = dnsmasq_args(net, nics, run_dir);
        let args_file = file(run_dir, br, "args");
        let joined = args.join("\n");
        if let Some(pid) = running_pid(run_dir, br) {
            if std::fs::read_to_string(&args_file).ok().as_deref() == Some(joined.as_str()) {
                return Ok(pid);
            }
            self.stop_dhcp(br, run_dir)?;
        }
        self.executor()
            .run(&Cmd::new("dnsmasq").args(args))
            .map_err(|source| NetError::Dhcp {
                bridge: br.clone(),
                detail: source.to_string(),
            })?;
        std::fs::write(&args_file, joined).map_err(|e| io(&args_file, e))?;
        running_pid(run_dir, br).ok_or_else(|| NetError::Dhcp {
            bridge: br.clone(),
            detail: format!(
                "dnsmasq started but {} names no running dnsmasq; see {}",
                file(run_dir, br, "pid").display(),
                file(run_dir, br, "log").display()
            ),
        })
    }

    /// Stop the domain's dnsmasq (not running is fine) and remove its files.
    pub fn stop_dhcp(&self, bridge: &str, run_dir: &Path) -> Result<(), NetError> {
        if let Some(pid) = running_pid(run_dir, bridge) {
            let out = self
                .executor()
                .run(&Cmd::new("kill").arg(pid.to_string()).allow_failure())
                .map_err(|source| NetError::Command {
                    what: format!("stopping dnsmasq of {bridge}"),
                    source,
                })?;
            if out.success() {
                // dnsmasq exits on SIGTERM at once; wait briefly so a restart can bind.
                for _ in 0..50 {
                    if !alive(pid) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        for ext in ["pid", "args", "leases", "log"] {
            let _ = std::fs::remove_file(file(run_dir, bridge, ext));
        }
        Ok(())
    }
}

/// Whether `pid` exists and is not a zombie (where PID 1 does not reap
/// orphans, a killed daemonized dnsmasq stays a zombie for good).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Pid from the pid file, if that process is a dnsmasq serving `bridge`.
/// The pid of the domain's running dnsmasq, if any (checked by its command line).
pub fn running_pid(run_dir: &Path, bridge: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(file(run_dir, bridge, "pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("dnsmasq") && cmdline.contains(&format!("--interface={bridge}\0")))
        .then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{self, DomainSpec};

    #[test]
    fn dnsmasq_is_bound_to_the_bridge_with_static_leases() {
        let r = fixture::resolved(
            "/unit",
            200,
            &[DomainSpec::new("a", &["m1", "m2"]).dhcp(true)],
            vec![],
        );
        let net = &r.networks["a"];
        let nics: Vec<&ResolvedNic> = r.nics.values().collect();
        let a = dnsmasq_args(net, &nics, Path::new("/run/x"));
        let br = &net.bridge;
        for want in [
            format!("--interface={br}"),
            "--bind-interfaces".into(),
            "--except-interface=lo".into(),
            "--no-resolv".into(),
            "--dhcp-range=10.200.0.0,static,255.255.255.0,1h".into(),
            format!("--pid-file=/run/x/{br}.pid"),
            format!(
                "--dhcp-host={},10.200.0.1,a-m1",
                naming::mac_string(&r.nics["a-m1"].mac)
            ),
            "--host-record=a-m2,10.200.0.2".into(),
        ] {
            assert!(a.contains(&want), "missing {want} in {a:?}");
        }
    }
}
