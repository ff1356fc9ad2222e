//! Hooks through which an embedder watches the scheduler work, e.g. to feed metrics. The
//! scheduler calls them while it holds a shard lock, so they must be quick and must not call
//! back into the scheduler.

use std::time::Duration;

/// Receives measurements of the scheduler's work. Every method does nothing by default.
pub trait Observer: Send + Sync + 'static {
    /// A room was placed on a process (a new room, or one placed again after its process
    /// failed to start).
    fn room_placed(&self, _app_id: &str, _region: &str) {}
    /// A process bound its port `took` after it was created.
    fn process_started(&self, _app_id: &str, _region: &str, _took: Duration) {}
}

/// The default observer: watches nothing.
#[derive(Debug, Default)]
pub(crate) struct NoObserver;

impl Observer for NoObserver {}
