//! `run --rm` through the runtime, for benchmarks:
//! `run_once [--supervised] ROOTFS CMD...` creates, starts, waits for and
//! deletes one hardened container (user namespace, seccomp, cgroups, no
//! network) and exits with its status.

use moat_runtime::container::{self, Paths, Stdio};
use moat_runtime::machine::{self, MachineDir, Phase};
use moat_runtime::{ContainerSpec, IdRange, SupervisorConfig};
use std::os::fd::OwnedFd;
use std::time::Duration;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let supervised = args.first().map(|a| a == "--supervised").unwrap_or(false);
    if supervised {
        args.remove(0);
    }
    if args.len() < 2 {
        eprintln!("usage: run_once [--supervised] ROOTFS CMD...");
        std::process::exit(2);
    }
    let rootfs = std::fs::canonicalize(&args[0]).unwrap_or_else(|e| {
        eprintln!("{}: {e}", args[0]);
        std::process::exit(2)
    });
    let name = format!("bench-{}", std::process::id());
    let mut spec = ContainerSpec::new(&name, rootfs, args[1..].to_vec());
    spec.idmap = Some(IdRange::for_machine(7));
    // For measuring what the hardening costs: MOAT_BENCH_PRIVILEGED=1.
    if std::env::var_os("MOAT_BENCH_PRIVILEGED").is_some() {
        spec.privileged = true;
        spec.idmap = None;
    }
    let work = std::path::PathBuf::from("/run/moat-bench").join(&name);
    let code = if supervised {
        let dir = MachineDir::new(&work);
        let sup = machine::find_supervisor().unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        });
        let st = machine::launch(&dir, &SupervisorConfig::new(spec), &sup);
        if let Err(e) = st {
            eprintln!("{e}");
            std::process::exit(1)
        }
        let mut code = 1;
        for _ in 0..100_000 {
            if let Some(s) = dir.read_status() {
                if matches!(s.phase, Phase::Exited | Phase::Failed | Phase::Stopped)
                    && !dir.supervisor_alive()
                {
                    code = s.exit_code.unwrap_or(1);
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = machine::destroy(&dir, Duration::from_secs(1));
        code
    } else {
        let paths = Paths {
            state_root: work.join("state"),
            bundle: work.join("bundle"),
        };
        let stdio = Stdio {
            stdin: None,
            stdout: std::io::stdout().as_fd_owned(),
            stderr: std::io::stderr().as_fd_owned(),
        };
        let created = container::create(&spec, &paths, stdio, None).unwrap_or_else(|e| {
            eprintln!("{e}");
            let _ = container::delete(&name, &paths.state_root, true, false);
            let _ = std::fs::remove_dir_all(&work);
            std::process::exit(1)
        });
        if let Err(e) = container::start(&name, &paths.state_root) {
            eprintln!("{e}");
        }
        let st = moat_runtime::sys::wait_pid(created.pid)
            .map(|s| s.code())
            .unwrap_or(1);
        if let Err(e) = container::delete(&name, &paths.state_root, true, false) {
            eprintln!("{e}");
        }
        let _ = std::fs::remove_dir_all(&work);
        st
    };
    std::process::exit(code);
}

trait DupFd {
    fn as_fd_owned(&self) -> Option<OwnedFd>;
}

impl<T: std::os::fd::AsFd> DupFd for T {
    fn as_fd_owned(&self) -> Option<OwnedFd> {
        self.as_fd().try_clone_to_owned().ok()
    }
}
