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

/// Checks an app id against SPEC §7 (`^[A-Za-z0-9_-]{1,100}$`); for adapters that must
/// report a bad app id before anything else.
pub fn validate_app_id(app_id: &str) -> error::Result<()> {
    validate::app_id(app_id)
}
