//! # roomsched
//!
//! A room allocation scheduler for dedicated game servers. A matchmaker asks for a room in a
//! region; roomsched places it on a game-server process of that region with a free slot (the
//! one with the most free slots), starting a new process when none has one, and says where
//! players connect. It follows every process through its lifecycle, frees slots when rooms
//! end, stops idle processes and drains old deployments.
//!
//! The crate is three things:
//! - this library: [`Scheduler`], usable in-process with no network hop;
//! - a gRPC service (`roomsched serve`, feature `server`, on by default): [`server`];
//! - a command-line client and load generator (the `roomsched` binary; [`bench`]).
//!
//! ```
//! use roomsched::{backend::Simulated, CreateRoom, DeploymentSpec, Scheduler};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), roomsched::Error> {
//! let scheduler = Scheduler::builder()
//!     .regions(["Frankfurt", "Tokyo"])
//!     .backend(Simulated::default())
//!     .build()?;
//! let spec = DeploymentSpec { rooms_per_process: 4, container_port: 7777, ..Default::default() };
//! scheduler.create_deployment("my-game", spec).await?;
//! let room = scheduler
//!     .create_room(CreateRoom {
//!         app_id: "my-game".into(),
//!         region: "Frankfurt".into(),
//!         ..Default::default()
//!     })
//!     .await?;
//! let process = scheduler.get_process("my-game", room.process_id).await?;
//! assert_eq!(process.rooms_allocated, 1);
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod core;
pub mod store;

#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod grpc;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod server;

pub use crate::core::clock::{Clock, ManualClock, SystemClock};
pub use crate::core::error::{Error, Result};
pub use crate::core::types::*;
pub use crate::core::{ConnectionWatch, Observer, Scheduler, SchedulerBuilder, DEFAULT_REGIONS};
