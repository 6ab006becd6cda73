//! The event bus: an in-memory broadcast. Publishers (apply progress, the
//! reconcile loop, lifecycle endpoints) push [`Event`]s; each `GET /v1/events`
//! stream holds a bounded subscription and writes them as JSON lines. A
//! subscriber that falls behind by more than [`QUEUE`] events is dropped
//! (its stream ends) rather than slowing publishers down.

use serde::Serialize;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;

const QUEUE: usize = 1024;

/// One thing that happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    MachineStarted {
        machine: String,
    },
    MachineStopped {
        machine: String,
    },
    MachineCrashed {
        machine: String,
        reason: String,
    },
    MachineAppeared {
        machine: String,
        state: String,
    },
    MachineRemoved {
        machine: String,
    },
    /// The host differs from the project: what a plan would do.
    DriftFound {
        project: String,
        actions: Vec<String>,
    },
    /// Reconciliation repaired drift (`reconcile: auto`).
    DriftRepaired {
        project: String,
        failed: bool,
    },
    ProjectChanged {
        project: String,
    },
    ApplyStarted {
        project: String,
    },
    ApplyProgress {
        message: String,
    },
    ApplyFinished {
        project: String,
        failed: bool,
    },
    ApplyError {
        project: String,
        error: String,
    },
    DaemonStarted {
        pid: u32,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Milliseconds since the epoch.
    pub time_ms: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
pub struct Bus {
    subs: Mutex<Vec<SyncSender<Event>>>,
}

impl Bus {
    pub fn publish(&self, kind: EventKind) {
        let ev = Event {
            time_ms: now_ms(),
            kind,
        };
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| match s.try_send(ev.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        });
    }

    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = sync_channel(QUEUE);
        self.subs.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        rx
    }

    pub fn subscribers(&self) -> usize {
        self.subs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_events_in_order_and_are_dropped_when_gone() {
        let bus = Bus::default();
        let a = bus.subscribe();
        let b = bus.subscribe();
        bus.publish(EventKind::MachineStarted {
            machine: "d-m".into(),
        });
        bus.publish(EventKind::MachineStopped {
            machine: "d-m".into(),
        });
        assert_eq!(
            a.recv().unwrap().kind,
            EventKind::MachineStarted {
                machine: "d-m".into()
            }
        );
        drop(b);
        bus.publish(EventKind::DaemonStarted { pid: 1 });
        assert_eq!(bus.subscribers(), 1);
        let json = serde_json::to_value(a.recv().unwrap()).unwrap();
        assert_eq!(json["type"], "machine_stopped");
        assert_eq!(json["machine"], "d-m");
    }
}
