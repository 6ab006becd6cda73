//! What is on the host now, as reported by drivers and the network layer.
//! The planner compares this with the resolved desired state. It is re-read on
//! every plan, never cached.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum MachineState {
    Running,
    Stopped,
    /// Stopped on its own with a non-zero status, or its supervisor died.
    Crashed {
        reason: String,
    },
}

/// Limits as read back from the host (cgroups, driver config).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub cpus: Option<u32>,
    pub memory: Option<u64>,
    pub pids: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedMachine {
    pub full_name: String,
    pub driver: String,
    pub state: MachineState,
    /// Hash of the settings that need a re-create when they change
    /// (image, type, network, mounts, ...), as recorded at create time.
    pub spec_hash: String,
    pub limits: Limits,
    /// Made outside any project (`Machine::adhoc`), as the driver recorded
    /// it: plans leave it alone (a foreground `run --rm` has no other
    /// record). Read with the rest, so it cannot be missed while listed.
    #[serde(default)]
    pub adhoc: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedNetwork {
    pub domain: String,
    pub bridge: String,
    pub subnet: Option<Ipv4Net>,
    pub up: bool,
}

/// Everything moat can see of its own root on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// By domain name.
    pub networks: BTreeMap<String, ObservedNetwork>,
    /// By machine full name; only machines this root created.
    pub machines: BTreeMap<String, ObservedMachine>,
    /// Hash of the ruleset in moat's nftables table, `None` if the table is absent.
    pub firewall_hash: Option<String>,
    /// Image names present in the image store.
    pub images: BTreeSet<String>,
}
