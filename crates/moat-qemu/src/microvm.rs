//! microVMs (`type: microvm`). In progress.

use crate::{QemuDriver, Record};
use moat_core::observed::MachineState;
use moat_driver::{Ctx, DriverError, ExecOutput, MachineSpec, Result};
use std::time::Duration;

fn todo(what: &str) -> DriverError {
    DriverError::Unsupported {
        driver: "qemu".into(),
        what: format!("microVMs ({what}) yet"),
    }
}

pub fn create(_d: &QemuDriver, _ctx: &Ctx, _spec: &MachineSpec) -> Result<()> {
    Err(todo("create"))
}

pub fn start(_d: &QemuDriver, _ctx: &Ctx, _rec: &Record) -> Result<()> {
    Err(todo("start"))
}

pub fn stop(_d: &QemuDriver, _ctx: &Ctx, _rec: &Record, _timeout: Duration) -> Result<()> {
    Err(todo("stop"))
}

pub fn destroy(_d: &QemuDriver, _ctx: &Ctx, _rec: &Record) -> Result<()> {
    Err(todo("destroy"))
}

pub fn state(_d: &QemuDriver, _ctx: &Ctx, _rec: &Record) -> MachineState {
    MachineState::Stopped
}

pub fn exec(_d: &QemuDriver, _ctx: &Ctx, _rec: &Record, _argv: &[String]) -> Result<ExecOutput> {
    Err(todo("exec"))
}
