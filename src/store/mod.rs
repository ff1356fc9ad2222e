//! Where state is persisted. The scheduler turns every change into one [`Change`] (a list of
//! records, applied atomically) and hands it to the store while it still holds the lock of the
//! shard it changed, so the store sees changes in the order they were applied; the call that
//! made the change returns success only after the change's [`Commit`] resolves.

pub mod memory;

use crate::core::types::{Deployment, Process, RegionPolicy, Room};

pub use memory::MemoryStore;

/// One persisted fact: the full new state of an entity, or that an entity was forgotten.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Record {
    Deployment(Deployment),
    Process(Process),
    Room(Room),
    RegionPolicy {
        app_id: String,
        region: String,
        policy: RegionPolicy,
    },
    /// A destroyed room left the retention window.
    RoomForgotten {
        app_id: String,
        room_id: String,
    },
}

/// Records that must be persisted together.
pub type Change = Vec<Record>;

/// The store could not persist a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct StoreError(pub String);

/// The outcome of persisting one change.
#[derive(Debug)]
pub enum Commit {
    /// Already decided (e.g. a store that needs no I/O).
    Done(Result<(), StoreError>),
    /// Decided when the store's flush completes (e.g. group commit).
    Pending(tokio::sync::oneshot::Receiver<Result<(), StoreError>>),
}

impl Commit {
    pub async fn wait(self) -> Result<(), StoreError> {
        match self {
            Commit::Done(r) => r,
            Commit::Pending(rx) => rx
                .await
                .unwrap_or_else(|_| Err(StoreError("the store stopped before the flush".into()))),
        }
    }
}

/// Persists changes.
pub trait Store: Send + Sync + 'static {
    /// Whether the store wants [`Record`]s at all; when false the scheduler does not build
    /// them (the memory store keeps nothing beyond the scheduler's own state).
    fn wants_records(&self) -> bool;

    /// Queues `change` for persistence. Called with the changed shard's lock held: it must not
    /// block on I/O; it returns a [`Commit`] to wait on after the lock is released.
    fn append(&self, change: Change) -> Commit;
}
