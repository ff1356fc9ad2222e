//! The memory store: state lives only in the scheduler's own structures, so nothing survives a
//! restart. Fastest; for tests, benchmarks and embedding.

use super::{Change, Commit, Store};

/// Keeps nothing beyond the scheduler's in-memory state.
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn wants_records(&self) -> bool {
        false
    }

    fn append(&self, _change: Change) -> Commit {
        Commit::Done(Ok(()))
    }
}
