//! Runs the gRPC service on a listener until a shutdown future completes. The binary and the
//! tests call the same [`run`], each with their own listener and shutdown signal.
//!
//! Besides the roomsched services it serves `grpc.health.v1.Health` (overall status `""`
//! and one entry per roomsched service) and gRPC server reflection, so grpcurl,
//! grpc_health_probe and Kubernetes probes work with no proto file.

use crate::grpc::pb::app_service_server::AppServiceServer;
use crate::grpc::pb::deployment_service_server::DeploymentServiceServer;
use crate::grpc::pb::process_service_server::ProcessServiceServer;
use crate::grpc::pb::room_service_server::RoomServiceServer;
use crate::grpc::{pb, AppApi, DeploymentApi, ProcessApi, RoomApi};
use crate::Scheduler;
use std::future::Future;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

/// Settings of the transport.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request or response message, in bytes (default 4 MiB).
    pub max_message_size: usize,
    /// After the shutdown signal, how long the server keeps answering — health NOT_SERVING,
    /// changes UNAVAILABLE — before it stops taking connections, so that clients and load
    /// balancers learn of the shutdown from a status rather than a dropped connection
    /// (default 500 ms).
    pub shutdown_delay: std::time::Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_message_size: 4 * 1024 * 1024,
            shutdown_delay: std::time::Duration::from_millis(500),
        }
    }
}

/// The server could not start or failed while serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

const SERVICES: [&str; 4] = [
    "roomsched.v1.RoomService",
    "roomsched.v1.ProcessService",
    "roomsched.v1.DeploymentService",
    "roomsched.v1.AppService",
];

/// Serves the roomsched gRPC API on `listener` until `shutdown` completes. On shutdown the
/// health status turns NOT_SERVING, the scheduler refuses new changes (UNAVAILABLE) and
/// connection watches end; after `shutdown_delay` the server stops taking connections, and
/// calls in flight finish before this returns.
pub async fn run(
    listener: TcpListener,
    scheduler: Scheduler,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICES.iter().chain(&[""]) {
        health
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    // Both reflection versions: older tools (grpcurl before 1.8.8) only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) =
        (reflection().build_v1()?, reflection().build_v1alpha()?);
    let (max, shutdown_delay) = (config.max_message_size, config.shutdown_delay);
    let signal = {
        let scheduler = scheduler.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: health NOT_SERVING, changes refused");
            for name in SERVICES.iter().chain(&[""]) {
                health
                    .set_service_status(*name, ServingStatus::NotServing)
                    .await;
            }
            scheduler.shutdown();
            tokio::time::sleep(shutdown_delay).await;
            tracing::info!("closing connections once the calls in flight finish");
        }
    };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            RoomServiceServer::new(RoomApi(scheduler.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            ProcessServiceServer::new(ProcessApi(scheduler.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            DeploymentServiceServer::new(DeploymentApi(scheduler.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            AppServiceServer::new(AppApi(scheduler))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), signal)
        .await?;
    tracing::info!("server stopped");
    Ok(())
}
