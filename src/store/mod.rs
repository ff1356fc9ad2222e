//! Where state is persisted. The scheduler turns every change into one [`Change`] (a list of
//! records, applied atomically) and hands it to the store while it still holds the lock of the
//! shard it changed, so the store sees changes in the order they were applied; the call that
//! made the change returns success only after the change's [`Commit`] resolves.
//!
//! At start the scheduler rebuilds its state from [`Store::load`]; after a failed commit it
//! calls [`Store::reopen`] and rebuilds again, so its memory never runs ahead of the store.

pub mod durable;
pub mod memory;

use crate::core::types::{Deployment, Process, RegionPolicy, Room};
use chrono::{DateTime, Utc};

pub use durable::DurableStore;
pub use memory::MemoryStore;

/// One persisted fact: the full new state of an entity, or that an entity was forgotten.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Record {
    Deployment(Deployment),
    Process(ProcessRecord),
    Room(RoomRecord),
    RegionPolicy {
        app_id: String,
        region: String,
        policy: RegionPolicy,
    },
    /// A destroyed room left the retention window.
    RoomForgotten {
        app_id: String,
        room_id: String,
        /// The room's `RoomRecord::seq`.
        seq: u64,
    },
    /// `count` rooms were created in the region during unix second `second` (usage reports).
    RoomsCreated {
        app_id: String,
        region: String,
        second: i64,
        count: u64,
    },
}

/// A process as persisted: what the API shows, plus the scheduler's own bookkeeping.
/// `process.rooms_allocated` may be stale: a room placed or ended writes only the room's
/// record, and the count is rebuilt from the live rooms on load.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRecord {
    pub process: Process,
    /// DrainProcess while STARTING: takes no new rooms, drains once bound.
    pub drain_requested: bool,
    /// Why it was told to stop (its exit reason once it has exited).
    pub stop_reason: Option<String>,
    /// Since when a RUNNING process has held no room (its idle clock).
    #[serde(with = "crate::core::types::timestamp::option")]
    pub idle_since: Option<DateTime<Utc>>,
}

/// A room as persisted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoomRecord {
    /// The room's number in creation order, unique server-wide: the store's key for it, so
    /// new rooms are appended rather than scattered through the store's index.
    pub seq: u64,
    /// `status` is as of the write; it is recomputed from the process on load.
    pub room: Room,
    pub region: String,
    /// How many times the room has been placed.
    pub attempts: u8,
    /// Created for an explicitly requested deployment.
    pub pinned: bool,
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
            Commit::Pending(rx) => rx.await.unwrap_or_else(|_| Err(Commit::stopped())),
        }
    }

    /// The error of a commit whose store went away before deciding it.
    pub(crate) fn stopped() -> StoreError {
        StoreError("the store stopped before the flush".into())
    }
}

/// Persists changes.
///
/// Contract: commits resolve in the order changes were appended; once a commit has failed,
/// every later one fails too until [`Store::reopen`] succeeds.
pub trait Store: Send + Sync + 'static {
    /// Whether the store wants [`Record`]s at all; when false the scheduler does not build
    /// them (the memory store keeps nothing beyond the scheduler's own state).
    fn wants_records(&self) -> bool;

    /// Queues `change` for persistence. Called with the changed shard's lock held: it must not
    /// block on I/O; it returns a [`Commit`] to wait on after the lock is released.
    fn append(&self, change: Change) -> Commit;

    /// Whether every change appended so far is committed: none is waiting for its flush,
    /// and none was refused since the store was last (re)opened.
    fn all_committed(&self) -> bool {
        true
    }

    /// A commit that resolves once every change appended before it is durable, for a call
    /// that changed nothing but answers from what it saw (a safe retry, "destroyed already"):
    /// what it saw may still be on its way to the disk.
    fn barrier(&self) -> Commit {
        Commit::Done(Ok(()))
    }

    /// Hands every persisted record to `visit`: deployments first (in id order), then region
    /// policies, processes, rooms and usage counters. Blocks; called at start and after a
    /// failure, never while changes are being appended.
    fn load(&self, _visit: &mut dyn FnMut(Record)) -> Result<(), StoreError> {
        Ok(())
    }

    /// After a failed commit: returns the store to its last successful commit and accepts
    /// changes again.
    fn reopen(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
