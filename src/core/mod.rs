//! The scheduler core: domain types, validation, placement, lifecycle and timers. It knows
//! nothing of gRPC or protobuf; requests arrive as plain Rust calls on [`Scheduler`] and
//! process events arrive from a [`crate::backend::Backend`] as plain domain events.

pub mod clock;
pub mod error;
mod observer;
mod scheduler;
mod shard;
pub mod types;
mod validate;

pub use observer::Observer;

/// The log target of the lines about single rooms (placed, destroyed, placed again), so a busy
/// server can quiet them alone: `ROOMSCHED_LOG=info,roomsched::rooms=warn`.
pub const ROOM_LOG: &str = "roomsched::rooms";
pub use scheduler::{
    ConnectionWatch, Scheduler, SchedulerBuilder, DEFAULT_PAGE_SIZE, DEFAULT_REGIONS, MAX_PAGE_SIZE,
};

/// Checks an app id against SPEC §7 (`^[A-Za-z0-9_-]{1,100}$`); for adapters that must
/// report a bad app id before anything else.
pub fn validate_app_id(app_id: &str) -> error::Result<()> {
    validate::app_id(app_id)
}

/// Checks a set of configured region names: at least one, each matching
/// `^[A-Za-z0-9_-]{1,100}$`, none twice.
pub fn validate_regions(regions: &[String]) -> error::Result<()> {
    if regions.is_empty() {
        return Err(error::Error::invalid(
            "regions",
            "at least one region must be configured",
        ));
    }
    for (i, r) in regions.iter().enumerate() {
        validate::app_id(r).map_err(|_| {
            error::Error::invalid(
                "regions",
                format!("{r:?} must match ^[A-Za-z0-9_-]{{1,100}}$"),
            )
        })?;
        if regions[..i].contains(r) {
            return Err(error::Error::invalid(
                "regions",
                format!("{r:?} appears twice"),
            ));
        }
    }
    Ok(())
}
