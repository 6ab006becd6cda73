//! Spec hashes: a fingerprint of the machine settings that can only change by
//! re-creating the machine. Drivers record it at create time and report it back
//! in `ObservedMachine::spec_hash`; the planner replaces a machine whose
//! recorded hash differs from the one computed from the files.
//!
//! Limits (cpus, memory, pids) are left out on purpose: they change in place.

use crate::model::{Machine, MachineType, Mount, NetworkMode, ResolvedNic};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Bump when the set of hashed fields changes, so old machines get re-created
/// rather than silently compared against a different fingerprint.
const SPEC_VERSION: u32 = 1;

#[derive(Serialize)]
struct SpecFields<'a> {
    version: u32,
    kind: MachineType,
    image: &'a str,
    driver: &'a str,
    network: NetworkMode,
    ip: Option<Ipv4Addr>,
    mac: Option<[u8; 6]>,
    mounts: &'a [Mount],
    persistent: &'a BTreeMap<String, String>,
    privileged: bool,
    gpu: bool,
    disposable: bool,
    disk: Option<u64>,
    command: &'a Option<Vec<String>>,
    cloud_init: &'a Option<serde_json::Value>,
    /// Pass-through config, minus `limits.*` (changed in place).
    config: BTreeMap<&'a str, &'a str>,
}

/// sha256 (hex) of the settings of `machine` that need a re-create when they
/// change. `nic` is the machine's resolved NIC (`None` unless `network: domain`).
pub fn spec_hash(machine: &Machine, nic: Option<&ResolvedNic>) -> String {
    let fields = SpecFields {
        version: SPEC_VERSION,
        kind: machine.kind,
        image: &machine.image,
        driver: &machine.driver,
        network: machine.network,
        ip: nic.map(|n| n.ip),
        mac: nic.map(|n| n.mac),
        mounts: &machine.mounts,
        persistent: &machine.persistent,
        privileged: machine.privileged,
        gpu: machine.gpu,
        disposable: machine.disposable,
        disk: machine.disk,
        command: &machine.command,
        cloud_init: &machine.cloud_init,
        config: machine
            .config
            .iter()
            .filter(|(k, _)| !k.starts_with("limits."))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
    };
    // Plain data with string map keys: serde_json cannot fail on it.
    let bytes = serde_json::to_vec(&fields).expect("spec fields serialize to JSON");
    hex::encode(Sha256::digest(&bytes))
}
