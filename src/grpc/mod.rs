//! The gRPC adapters: each handler converts the request (`convert`), calls one
//! [`crate::Scheduler`] method, and converts the answer back; errors map to status codes in
//! one place (`error`); access checks, rate limits and request metrics happen in `gate`. No
//! scheduling logic lives here.

pub mod codec;
pub mod convert;
pub mod error;
pub mod gate;
mod services;

pub use services::{AppApi, DeploymentApi, ProcessApi, RoomApi};

/// The generated protobuf types and the client and server stubs of `roomsched.v1`.
pub mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("roomsched.v1");

    /// The encoded descriptors of `proto/`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("roomsched_descriptor");
}
