//! Full VMs (`type: vm`): q35 with BIOS or UEFI. Owned by the full-VM work;
//! this stub only reports that full VMs are not available yet.

use crate::{QemuDriver, Record};
use moat_core::observed::MachineState;
use moat_driver::{Ctx, DriverError, ExecOutput, MachineSpec, Result};
use std::time::Duration;

fn unsupported(what: &str) -> DriverError {
    DriverError::Unsupported {
        driver: "qemu".into(),
        what: format!("full VMs ({what}); use `type: microvm` for now"),
    }
}

pub fn create(_d: &QemuDriver, _ctx: &Ctx, _spec: &MachineSpec) -> Result<()> {
    Err(unsupported("create"))
}

pub fn start(_d: &QemuDriver, _ctx: &Ctx, _rec: &Record) -> Result<()> {
    Err(unsupported("start"))
}

pub fn stop(_d: &QemuDriver, _ctx: &Ctx, _rec: &Record, _timeout: Duration) -> Result<()> {
    Err(unsupported("stop"))
}

pub fn destroy(_d: &QemuDriver, _ctx: &Ctx, _rec: &Record) -> Result<()> {
    Err(unsupported("destroy"))
}

pub fn state(_d: &QemuDriver, _ctx: &Ctx, _rec: &Record) -> MachineState {
    MachineState::Stopped
}

pub fn exec(_d: &QemuDriver, _ctx: &Ctx, _rec: &Record, _argv: &[String]) -> Result<ExecOutput> {
    Err(unsupported("exec"))
}
