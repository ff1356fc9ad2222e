//! Runs the gRPC service on a listener until a shutdown future completes. The binary and the
//! tests call the same [`run`], each with their own listener and shutdown signal.
//!
//! Besides the roomsched services it serves `grpc.health.v1.Health` (overall status `""`
//! and one entry per roomsched service) and gRPC server reflection, so grpcurl,
//! grpc_health_probe and Kubernetes probes work with no proto file.

use crate::grpc::gate::Gate;
use crate::grpc::pb::app_service_server::AppServiceServer;
use crate::grpc::pb::deployment_service_server::DeploymentServiceServer;
use crate::grpc::pb::process_service_server::ProcessServiceServer;
use crate::grpc::pb::room_service_server::RoomServiceServer;
use crate::grpc::{pb, AppApi, DeploymentApi, ProcessApi, RoomApi};
use crate::Scheduler;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// Settings of the transport.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Who may call, rate limits and request metrics (default: open, unlimited, uncounted).
    pub gate: Arc<Gate>,
    /// Serve TLS only, with this certificate and key (default: plaintext).
    pub tls: Option<Identity>,
    /// After the shutdown delay, how long calls in flight may take before the server stops
    /// waiting for them (default 10 s).
    pub drain_timeout: std::time::Duration,
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
            gate: Arc::new(Gate::open()),
            tls: None,
            drain_timeout: std::time::Duration::from_secs(10),
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
/// calls in flight finish (for at most `drain_timeout`) before this returns.
///
/// Every call runs in a `request` span with an id: the caller's `x-request-id` metadata, or
/// one made up, so log lines of one call can be found together.
pub async fn run(
    listener: TcpListener,
    scheduler: Scheduler,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let health = HealthReporter::default();
    let (draining, draining_rx) = tokio::sync::watch::channel(false);
    let health_service = HealthServer::new(HealthApi {
        inner: HealthService::from_health_reporter(health.clone()),
        draining: draining_rx,
    });
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
    let (fired, shutdown_started) = tokio::sync::oneshot::channel::<()>();
    let signal = {
        let scheduler = scheduler.clone();
        async move {
            shutdown.await;
            let _ = fired.send(());
            tracing::info!("shutting down: health NOT_SERVING, changes refused");
            for name in SERVICES.iter().chain(&[""]) {
                health
                    .set_service_status(*name, ServingStatus::NotServing)
                    .await;
            }
            scheduler.shutdown();
            tokio::time::sleep(shutdown_delay).await;
            draining.send_replace(true);
            tracing::info!("closing connections once the calls in flight finish");
        }
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = config.tls {
        builder = builder.tls_config(ServerTlsConfig::new().identity(identity))?;
    }
    let next_id = AtomicU64::new(1);
    let gate = config.gate;
    let serve = builder
        .trace_fn(move |req| {
            let id = match req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
            {
                Some(id) => id.chars().take(64).collect::<String>(),
                None => format!("{:x}", next_id.fetch_add(1, Ordering::Relaxed)),
            };
            // Display, not Debug: a header value and a path need no escaping, and the span's
            // fields are formatted on every call.
            tracing::info_span!("request", id = %id, method = %req.uri().path())
        })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            RoomServiceServer::new(RoomApi::new(scheduler.clone(), Arc::clone(&gate)))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            ProcessServiceServer::new(ProcessApi::new(scheduler.clone(), Arc::clone(&gate)))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            DeploymentServiceServer::new(DeploymentApi::new(scheduler.clone(), Arc::clone(&gate)))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            AppServiceServer::new(AppApi::new(scheduler, gate))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), signal);
    let drain_timeout = shutdown_delay.saturating_add(config.drain_timeout);
    let deadline = async move {
        if shutdown_started.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        served = serve => served?,
        () = deadline => tracing::warn!(
            waited_ms = drain_timeout.as_millis() as u64,
            "calls still in flight after the shutdown timeout; stopping without them"
        ),
    }
    tracing::info!("server stopped");
    Ok(())
}

/// `grpc.health.v1.Health` as tonic-health serves it, except that Watch streams end once the
/// server stops taking connections (after they have seen NOT_SERVING), so a client watching
/// health does not hold up the shutdown.
struct HealthApi {
    inner: HealthService,
    draining: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Health for HealthApi {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut statuses = self.inner.watch(request).await?.into_inner();
        let mut draining = self.draining.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    status = statuses.next() => match status {
                        Some(status) => {
                            if tx.send(status).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    _ = async { drop(draining.wait_for(|d| *d).await) } => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
