//! The Prometheus metrics of `roomsched serve` and the HTTP endpoint that serves them
//! (`GET /metrics`, OpenMetrics text from the `prometheus-client` crate).
//!
//! Counters and histograms are updated as things happen: requests by method and status code
//! (by the gRPC gate), placements by app and region and process start durations (as the
//! scheduler's [`Observer`]), store flush durations (by the durable store). Gauges of
//! processes by status and of live rooms are taken from [`Scheduler::census`] at each scrape.

use crate::{Observer, Scheduler};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Code, Status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppRegion {
    app: String,
    region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    app: String,
    region: String,
    status: &'static str,
}

/// Every metric roomsched exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    placements: Family<AppRegion, Counter>,
    placement_latency: Histogram,
    process_start: Histogram,
    store_flush: Histogram,
    processes: Family<ProcessLabels, Gauge>,
    live_rooms: Family<AppRegion, Gauge>,
    /// One scrape at a time: gauges are cleared and refilled from the census.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("roomsched"),
            requests: Family::default(),
            placements: Family::default(),
            // 50 µs .. ~1.6 s
            placement_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            // 10 ms .. ~164 s
            process_start: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
            // 50 µs .. ~1.6 s
            store_flush: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            processes: Family::default(),
            live_rooms: Family::default(),
            scrape: Mutex::new(()),
        };
        let r = &mut m.registry;
        r.register(
            "requests",
            "gRPC calls answered, by method and status code",
            m.requests.clone(),
        );
        r.register(
            "placements",
            "Rooms placed on a process (new rooms and rooms placed again)",
            m.placements.clone(),
        );
        r.register_with_unit(
            "placement_latency",
            "Time to answer a successful CreateRoom, store flush included",
            Unit::Seconds,
            m.placement_latency.clone(),
        );
        r.register_with_unit(
            "process_start_duration",
            "Time from a process's creation to its port being bound (STARTING to RUNNING)",
            Unit::Seconds,
            m.process_start.clone(),
        );
        r.register_with_unit(
            "store_flush_duration",
            "Time of one durable store commit (write and fsync of a group of changes)",
            Unit::Seconds,
            m.store_flush.clone(),
        );
        r.register(
            "processes",
            "Processes by app, region and status",
            m.processes.clone(),
        );
        r.register(
            "live_rooms",
            "Rooms not destroyed, by app and region",
            m.live_rooms.clone(),
        );
        m
    }

    /// Counts one answered call (`error` None = OK) and, for CreateRoom, its latency.
    pub(crate) fn request_done(
        &self,
        method: &'static str,
        error: Option<&Status>,
        took: Duration,
    ) {
        let code = error.map_or(Code::Ok, Status::code);
        self.requests
            .get_or_create(&RequestLabels {
                method,
                code: code_name(code),
            })
            .inc();
        if method == "CreateRoom" && code == Code::Ok {
            self.placement_latency.observe(took.as_secs_f64());
        }
    }

    /// Records one store commit.
    pub fn store_flushed(&self, took: Duration) {
        self.store_flush.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text of every metric, gauges taken from `scheduler` now.
    pub fn render(&self, scheduler: &Scheduler) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.processes.clear();
        self.live_rooms.clear();
        for c in scheduler.census() {
            for (status, n) in c.processes {
                self.processes
                    .get_or_create(&ProcessLabels {
                        app: c.app_id.clone(),
                        region: c.region.clone(),
                        status: status.as_str(),
                    })
                    .set(i64::from(n));
            }
            self.live_rooms
                .get_or_create(&AppRegion {
                    app: c.app_id,
                    region: c.region,
                })
                .set(c.live_rooms as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Observer for Metrics {
    fn room_placed(&self, app_id: &str, region: &str) {
        self.placements
            .get_or_create(&AppRegion {
                app: app_id.to_string(),
                region: region.to_string(),
            })
            .inc();
    }

    fn process_started(&self, _app_id: &str, _region: &str, took: Duration) {
        self.process_start.observe(took.as_secs_f64());
    }
}

/// The canonical gRPC name of a status code, as in `grpc-status` documentation.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    scheduler: Scheduler,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, scheduler) = (Arc::clone(&metrics), scheduler.clone());
            async move {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(&scheduler),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
