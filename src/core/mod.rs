//! The scheduler core: domain types, validation, placement, lifecycle and timers. It knows
//! nothing of gRPC or protobuf; requests arrive as plain Rust calls on [`Scheduler`] and
//! process events arrive from a [`crate::backend::Backend`] as plain domain events.

pub mod clock;
pub mod error;
mod scheduler;
mod shard;
pub mod types;
mod validate;

pub use scheduler::{
    ConnectionWatch, Scheduler, SchedulerBuilder, DEFAULT_PAGE_SIZE, DEFAULT_REGIONS, MAX_PAGE_SIZE,
};
