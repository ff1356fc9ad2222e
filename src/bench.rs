//! `roomsched bench`: the load generator. It drives any roomsched server over gRPC (or the
//! library in-process with `--embedded`) and reports throughput and HDR-histogram latency
//! percentiles. It sets up its own app and deployment and removes the rooms and processes it
//! created.
//!
//! Closed loop (default): `--concurrency` workers each send the next request as soon as the
//! previous one is answered. Open loop (`--rate R`): requests are due at a fixed rate and each
//! latency is measured from the time the request was due, so queueing is not hidden.

use crate::client::Conn;
use crate::grpc::pb;
use crate::grpc::pb::app_service_client::AppServiceClient;
use crate::grpc::pb::deployment_service_client::DeploymentServiceClient;
use crate::grpc::pb::process_service_client::ProcessServiceClient;
use crate::grpc::pb::room_service_client::RoomServiceClient;
use crate::{CreateRoom, DeploymentSpec, RegionPolicy, Scheduler};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// CreateRoom then DestroyRoom of that room, repeatedly (each call is one request).
    CreateDestroy,
    /// CreateRoom only; the rooms are destroyed after the run.
    Create,
    /// GetConnectionInfo of rooms created before the run.
    GetConnectionInfo,
    /// grpc.health.v1.Health/Check: the transport's own ceiling on the same server.
    Health,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::CreateDestroy => "create-destroy",
            Workload::Create => "create",
            Workload::GetConnectionInfo => "get-connection-info",
            Workload::Health => "health",
        }
    }
}

/// `roomsched bench` arguments.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Address of the roomsched server to drive.
    #[arg(long, env = "ROOMSCHED_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    #[arg(long, value_enum, default_value = "create-destroy")]
    pub workload: Workload,
    /// Requests in flight at once (closed loop: workers; open loop: the cap on in-flight calls).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// HTTP/2 connections the workers share.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// How long to measure (after a warm-up of a tenth of it, at most 2 s). In open loop every
    /// request that fell due within it is sent and counted, so a server that falls behind the
    /// rate makes the run last longer.
    #[arg(long, value_parser = crate::cli::duration, default_value = "10s")]
    pub duration: Duration,
    /// Regions the rooms go to, round-robin (must be configured on the server).
    #[arg(long, value_delimiter = ',', default_value = "Frankfurt")]
    pub regions: Vec<String>,
    /// Rooms per process of the deployment the bench creates for its app.
    #[arg(long, default_value_t = 100)]
    pub rooms_per_process: u32,
    /// Open loop: requests per second due at a fixed rate (default: closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Also run this workload on the same target, alternating with the main one, and print
    /// the ratio of their throughputs (e.g. `--compare health`). `--duration` is then shared:
    /// each of the two workloads runs duration / (2 × rounds) per round.
    #[arg(long, value_enum)]
    pub compare: Option<Workload>,
    /// Also run the same workload against this second server, alternating with `--addr`, and
    /// print the ratio of their throughputs (e.g. a durable-store server against a
    /// memory-store one).
    #[arg(long, conflicts_with_all = ["compare", "embedded"])]
    pub compare_addr: Option<String>,
    /// Rounds of the main and the compared workload when comparing.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Drive the library in-process instead of a server (no network).
    #[arg(long)]
    pub embedded: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// App the bench works in (default: a new `bench-xxxxxxxx`). It must have no deployment yet:
    /// the bench stops every process of its app when done. With an app token, give the
    /// (unused) app the token is for.
    #[arg(long)]
    pub app: Option<String>,
    /// CA certificate (PEM) that signed the certificate of a server that serves TLS; use an
    /// https:// address (or one without a scheme).
    #[arg(long, env = "ROOMSCHED_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Bearer token, for a server that requires one (an admin token, or one for the bench's
    /// app).
    #[arg(long, env = "ROOMSCHED_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub workload: &'static str,
    pub mode: String,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub latency_us: Histogram<u64>,
}

impl Report {
    pub fn requests_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0 // nothing was measured (`--duration 0s`)
        }
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn to_json(&self) -> Value {
        json!({
            "workload": self.workload,
            "mode": self.mode,
            "requests": self.requests,
            "errors": self.errors,
            "duration_s": self.seconds,
            "requests_per_second": self.requests_per_second(),
            "latency_ms": {
                "p50": self.ms(0.50),
                "p90": self.ms(0.90),
                "p99": self.ms(0.99),
                "p999": self.ms(0.999),
                "max": self.latency_us.max() as f64 / 1000.0,
            },
        })
    }

    fn print(&self) {
        println!("workload     {} ({})", self.workload, self.mode);
        println!(
            "requests     {} in {:.1}s, {} errors",
            self.requests, self.seconds, self.errors
        );
        println!("throughput   {:.0} requests/s", self.requests_per_second());
        println!(
            "latency ms   p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.ms(0.50),
            self.ms(0.90),
            self.ms(0.99),
            self.ms(0.999),
            self.latency_us.max() as f64 / 1000.0
        );
    }
}

/// One target: a server over gRPC, or a scheduler in this process.
#[derive(Clone)]
enum Target {
    Grpc(Vec<Conn>),
    Embedded(Scheduler),
}

/// A request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("{}: {}", .0.code(), .0.message())]
    Call(#[from] tonic::Status),
    #[error(transparent)]
    Scheduler(#[from] crate::Error),
    #[error(transparent)]
    Connect(#[from] crate::client::ConnectError),
}

/// Runs `roomsched bench`; prints the report (or reports) and returns them.
pub async fn run(args: BenchArgs) -> Result<Vec<Report>, BenchError> {
    if args.concurrency == 0 || args.connections == 0 || args.regions.is_empty() {
        return Err(BenchError::Setup(
            "--concurrency, --connections and --regions must not be empty".into(),
        ));
    }
    let target = if args.embedded {
        let scheduler = Scheduler::builder()
            .regions(args.regions.clone())
            .backend(crate::backend::Simulated::default())
            .default_region_policy(RegionPolicy {
                max_processes: 100_000,
                ..Default::default()
            })
            .retained_destroyed_rooms(100_000)
            .build()?;
        Target::Embedded(scheduler)
    } else {
        let mut channels = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            channels.push(connect(&args, &args.addr).await?);
        }
        Target::Grpc(channels)
    };
    let second = match &args.compare_addr {
        Some(addr) => {
            let mut channels = Vec::with_capacity(args.connections);
            for _ in 0..args.connections {
                channels.push(connect(&args, addr).await?);
            }
            Some(Target::Grpc(channels))
        }
        None => None,
    };
    let app = args
        .app
        .clone()
        .unwrap_or_else(|| format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    setup(&target, &app, &args).await?;
    if let Some(second) = &second {
        if let Err(e) = setup(second, &app, &args).await {
            cleanup(&target, &app, &args).await;
            return Err(e);
        }
    }
    let mut reports = Vec::new();
    let result = async {
        // Alternating rounds: the main measurement, then the compared one.
        let compared = match (&second, args.compare) {
            (Some(second), _) => Some((second, args.workload)),
            (None, Some(other)) => Some((&target, other)),
            (None, None) => None,
        };
        match compared {
            None => {
                reports.push(measure(&target, &app, &args, args.workload, args.duration).await?)
            }
            Some((other_target, other)) => {
                let each = args.duration / (2 * args.rounds.max(1));
                for _ in 0..args.rounds.max(1) {
                    reports.push(measure(&target, &app, &args, args.workload, each).await?);
                    reports.push(measure(other_target, &app, &args, other, each).await?);
                }
            }
        }
        Ok::<_, BenchError>(())
    }
    .await;
    cleanup(&target, &app, &args).await;
    if let Some(second) = &second {
        cleanup(second, &app, &args).await;
    }
    result?;
    print_reports(&args, &reports);
    let (requests, errors) = reports
        .iter()
        .fold((0, 0), |(r, e), x| (r + x.requests, e + x.errors));
    if errors > requests {
        return Err(BenchError::Setup(format!(
            "{errors} of {} requests failed: the figures above are not meaningful",
            requests + errors
        )));
    }
    Ok(reports)
}

fn print_reports(args: &BenchArgs, reports: &[Report]) {
    if args.compare.is_none() && args.compare_addr.is_none() {
        let r = &reports[0];
        if args.json {
            println!("{}", r.to_json());
        } else {
            r.print();
        }
        return;
    }
    // Rounds alternate: even reports are the main measurement, odd ones the compared one.
    let merged = |parity: usize| -> Report {
        let mut h = Histogram::<u64>::new(3).expect("histogram");
        let (mut seconds, mut requests, mut errors) = (0.0, 0, 0);
        let mine = reports.iter().skip(parity).step_by(2);
        for r in mine.clone() {
            h.add(&r.latency_us).expect("same histogram bounds");
            (seconds, requests, errors) = (
                seconds + r.seconds,
                requests + r.requests,
                errors + r.errors,
            );
        }
        let first = mine.clone().next().expect("one round at least");
        Report {
            workload: first.workload,
            mode: first.mode.clone(),
            requests,
            errors,
            seconds,
            latency_us: h,
        }
    };
    let (mut main, mut cmp) = (merged(0), merged(1));
    let label = |r: &Report| match args.compare_addr {
        Some(_) => r.mode.clone(),
        None => r.workload.to_string(),
    };
    if let Some(addr) = &args.compare_addr {
        main.mode = format!("{}, {}", main.mode, args.addr);
        cmp.mode = format!("{}, {addr}", cmp.mode);
    }
    let ratio = main.requests_per_second() / cmp.requests_per_second();
    if args.json {
        println!(
            "{}",
            json!({
                "workload": main.to_json(),
                "compare": cmp.to_json(),
                "ratio": ratio,
                "rounds": args.rounds,
                "requests_per_second": main.requests_per_second(),
                "latency_ms": main.to_json()["latency_ms"],
            })
        );
    } else {
        main.print();
        println!();
        cmp.print();
        println!();
        println!(
            "ratio        {} / {} = {:.2} ({} alternating rounds)",
            label(&main),
            label(&cmp),
            ratio,
            args.rounds
        );
    }
}

async fn connect(args: &BenchArgs, addr: &str) -> Result<Conn, BenchError> {
    let target = crate::client::Target {
        addr: addr.to_string(),
        ca_file: args.ca_file.clone(),
        token: args.token.clone(),
    };
    Ok(target.connect().await?)
}

/// The bench's own app: a deployment, a process limit high enough for `create`, and for
/// get-connection-info one room per worker.
async fn setup(target: &Target, app: &str, args: &BenchArgs) -> Result<(), BenchError> {
    let policy = RegionPolicy {
        min_processes: 0,
        buffer_rooms: 0,
        max_processes: 100_000,
    };
    match target {
        Target::Grpc(channels) => {
            let mut d = DeploymentServiceClient::new(channels[0].clone());
            // The bench stops every process of its app when it is done: never in a live app.
            let existing = d
                .list_deployments(pb::ListDeploymentsRequest { app_id: app.into() })
                .await?
                .into_inner();
            if !existing.deployments.is_empty() {
                return Err(BenchError::Setup(format!(
                    "app {app:?} already has deployments: the bench needs an app of its own (it \
                     stops every process of its app when done); give --app an unused app id"
                )));
            }
            d.create_deployment(pb::CreateDeploymentRequest {
                app_id: app.into(),
                rooms_per_process: args.rooms_per_process,
                container_port: 7777,
                ..Default::default()
            })
            .await?;
            let mut a = AppServiceClient::new(channels[0].clone());
            for region in &args.regions {
                a.set_region_policy(pb::SetRegionPolicyRequest {
                    app_id: app.into(),
                    region: region.clone(),
                    min_processes: policy.min_processes,
                    buffer_rooms: policy.buffer_rooms,
                    max_processes: policy.max_processes,
                })
                .await?;
            }
        }
        Target::Embedded(s) => {
            let spec = DeploymentSpec {
                rooms_per_process: args.rooms_per_process,
                container_port: 7777,
                ..Default::default()
            };
            s.create_deployment(app, spec).await?;
        }
    }
    Ok(())
}

/// Stops every process of the bench's app (which destroys its rooms).
async fn cleanup(target: &Target, app: &str, args: &BenchArgs) {
    let outcome: Result<usize, BenchError> = async {
        match target {
            Target::Grpc(channels) => {
                let mut p = ProcessServiceClient::new(channels[0].clone());
                let mut ids = Vec::new();
                let mut page_token = String::new();
                loop {
                    let page = p
                        .list_processes(pb::ListProcessesRequest {
                            app_id: app.into(),
                            statuses: vec![],
                            regions: args.regions.clone(),
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    ids.extend(page.processes.into_iter().map(|p| p.process_id));
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    page_token = page.next_page_token;
                }
                for id in &ids {
                    p.stop_process(pb::StopProcessRequest {
                        app_id: app.into(),
                        process_id: id.clone(),
                    })
                    .await?;
                }
                Ok(ids.len())
            }
            Target::Embedded(_) => Ok(0),
        }
    }
    .await;
    match outcome {
        Ok(n) => tracing::info!(app, processes = n, "bench cleaned up"),
        Err(err) => eprintln!("warning: cleanup of app {app} failed: {err}"),
    }
}

/// Issues requests of one workload.
struct Client {
    target: Target,
    conn: usize,
    app: String,
    regions: Vec<String>,
    next_region: usize,
    /// get-connection-info: the room this client reads.
    room: Option<String>,
    /// create: rooms to destroy after the run.
    created: Vec<String>,
    /// create-destroy: the room created by the last request, destroyed by the next.
    pending: Option<String>,
}

impl Client {
    fn region(&mut self) -> String {
        self.next_region = (self.next_region + 1) % self.regions.len();
        self.regions[self.next_region].clone()
    }

    async fn create(&mut self) -> Result<String, BenchError> {
        let region = self.region();
        match &self.target {
            Target::Grpc(ch) => {
                let mut c = RoomServiceClient::new(ch[self.conn].clone());
                let r = c
                    .create_room(pb::CreateRoomRequest {
                        app_id: self.app.clone(),
                        region,
                        ..Default::default()
                    })
                    .await?;
                Ok(r.into_inner().room_id)
            }
            Target::Embedded(s) => {
                let r = s
                    .create_room(CreateRoom {
                        app_id: self.app.clone(),
                        region,
                        ..Default::default()
                    })
                    .await?;
                Ok(r.room_id)
            }
        }
    }

    async fn destroy(&mut self, room_id: &str) -> Result<(), BenchError> {
        match &self.target {
            Target::Grpc(ch) => {
                let mut c = RoomServiceClient::new(ch[self.conn].clone());
                c.destroy_room(pb::DestroyRoomRequest {
                    app_id: self.app.clone(),
                    room_id: room_id.into(),
                })
                .await?;
            }
            Target::Embedded(s) => s.destroy_room(&self.app, room_id).await?,
        }
        Ok(())
    }

    /// One request of `workload`; for create-destroy, alternately a create and a destroy.
    async fn request(&mut self, workload: Workload) -> Result<(), BenchError> {
        match workload {
            Workload::CreateDestroy => match self.pending.take() {
                Some(room) => self.destroy(&room).await,
                None => {
                    self.pending = Some(self.create().await?);
                    Ok(())
                }
            },
            Workload::Create => {
                let room = self.create().await?;
                self.created.push(room);
                Ok(())
            }
            Workload::GetConnectionInfo => {
                if self.room.is_none() {
                    self.room = Some(self.create().await?);
                }
                let room_id = self.room.clone().unwrap_or_default();
                match &self.target {
                    Target::Grpc(ch) => {
                        let mut c = RoomServiceClient::new(ch[self.conn].clone());
                        c.get_connection_info(pb::GetConnectionInfoRequest {
                            app_id: self.app.clone(),
                            room_id,
                        })
                        .await?;
                    }
                    Target::Embedded(s) => {
                        s.connection_info(&self.app, &room_id).await?;
                    }
                }
                Ok(())
            }
            Workload::Health => match &self.target {
                Target::Grpc(ch) => {
                    let mut c = HealthClient::new(ch[self.conn].clone());
                    c.check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?;
                    Ok(())
                }
                Target::Embedded(s) => {
                    s.get_region_policy(&self.app, &self.regions[0]).await?;
                    Ok(())
                }
            },
        }
    }

    /// Leaves nothing behind: the half of a create-destroy pair, the rooms of `create`.
    async fn tidy(&mut self) {
        let leftovers: Vec<String> = self
            .pending
            .take()
            .into_iter()
            .chain(std::mem::take(&mut self.created))
            .collect();
        for room in leftovers {
            let _ = self.destroy(&room).await;
        }
    }
}

struct Shared {
    histogram: Mutex<Histogram<u64>>,
    requests: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Requests that end before this are warm-up and not recorded.
    measure_from: Instant,
}

impl Shared {
    fn record(&self, latency: Duration, outcome: Result<(), BenchError>) {
        if Instant::now() < self.measure_from {
            return;
        }
        match outcome {
            Ok(()) => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                let us = (latency.as_micros() as u64).max(1);
                let _ = self
                    .histogram
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(us);
            }
            Err(err) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(|| err.to_string());
            }
        }
    }
}

/// Runs one workload for a warm-up and then `duration`, and reports the measured part.
async fn measure(
    target: &Target,
    app: &str,
    args: &BenchArgs,
    workload: Workload,
    duration: Duration,
) -> Result<Report, BenchError> {
    if args.embedded && workload == Workload::Health {
        tracing::info!("embedded health = GetRegionPolicy (no transport to measure)");
    }
    let warmup = (duration / 10).min(Duration::from_secs(2));
    let start = Instant::now();
    let measure_from = start + warmup;
    let deadline = measure_from + duration;
    let shared = Arc::new(Shared {
        histogram: Mutex::new(
            Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        ),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        measure_from,
    });
    let client = |i: usize| Client {
        target: target.clone(),
        conn: i % args.connections,
        app: app.to_string(),
        regions: args.regions.clone(),
        next_region: i,
        room: None,
        created: vec![],
        pending: None,
    };
    let progress = tokio::spawn(progress_line(
        Arc::clone(&shared),
        measure_from,
        deadline,
        workload,
        args.json,
    ));
    let embedded = args.embedded;
    let clients = match args.rate {
        None => {
            let workers: Vec<_> = (0..args.concurrency)
                .map(|i| {
                    let (mut c, shared) = (client(i), Arc::clone(&shared));
                    tokio::spawn(async move {
                        let mut n = 0u32;
                        while Instant::now() < deadline {
                            let sent = Instant::now();
                            let outcome = c.request(workload).await;
                            shared.record(sent.elapsed(), outcome);
                            n = n.wrapping_add(1);
                            if embedded && n % 64 == 0 {
                                // In-process calls never wait: let the other tasks run.
                                tokio::task::yield_now().await;
                            }
                        }
                        c
                    })
                })
                .collect();
            let mut clients = Vec::with_capacity(workers.len());
            for w in workers {
                clients.extend(w.await.ok());
            }
            clients
        }
        Some(rate) => {
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(BenchError::Setup("--rate must be a positive number".into()));
            }
            open_loop(
                rate,
                args.concurrency,
                start,
                deadline,
                workload,
                &shared,
                (0..args.concurrency).map(client).collect(),
            )
            .await
        }
    };
    progress.abort();
    // From the end of the warm-up to the last answer, or to the deadline if the last answer
    // came before it (a sparse open loop): an open loop that cannot keep up runs past its
    // deadline, and its throughput is what was achieved, not what was offered. The tidying
    // below (destroying the rooms of `create`) is not measured.
    let seconds = (Instant::now().max(deadline) - measure_from).as_secs_f64();
    let tidying: Vec<_> = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { c.tidy().await }))
        .collect();
    for t in tidying {
        let _ = t.await;
    }
    if let Some(rate) = args.rate {
        let achieved = shared.requests.load(Ordering::Relaxed) as f64 / seconds;
        if achieved < rate * 0.95 {
            eprintln!(
                "warning: {} requests/s offered but only {achieved:.0} achieved: the target cannot keep up",
                rate
            );
        }
    }
    let errors = shared.errors.load(Ordering::Relaxed);
    if let Some(err) = shared
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        eprintln!(
            "warning: {errors} {} requests failed; the first: {err}",
            workload.name()
        );
    }
    let latency_us = shared
        .histogram
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mode = match args.rate {
        Some(rate) => format!(
            "open loop at {rate} requests/s, at most {} in flight",
            args.concurrency
        ),
        None => format!("closed loop, {} in flight", args.concurrency),
    };
    let mode = format!(
        "{mode}, {}",
        if args.embedded {
            "embedded".to_string()
        } else {
            format!("{} connections", args.connections)
        }
    );
    Ok(Report {
        workload: workload.name(),
        mode,
        requests: shared.requests.load(Ordering::Relaxed),
        errors,
        seconds,
        latency_us,
    })
}

/// Open loop: a pacing thread marks when each request is due (a std thread sleeps with
/// microsecond precision; Tokio's timer has millisecond granularity, which would show up as
/// latency), and a dispatcher sends each due request on a free client, at most
/// `concurrency` in flight. Latency is measured from the due time. Returns the clients, to tidy.
async fn open_loop(
    rate: f64,
    concurrency: usize,
    start: Instant,
    deadline: Instant,
    workload: Workload,
    shared: &Arc<Shared>,
    clients: Vec<Client>,
) -> Vec<Client> {
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<std::time::Instant>();
    let (start_std, deadline_std) = (start.into_std(), deadline.into_std());
    let pacer = std::thread::spawn(move || {
        for i in 0u64.. {
            let due = start_std + Duration::from_secs_f64(i as f64 / rate);
            if due >= deadline_std {
                return;
            }
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            if due_tx.send(due).is_err() {
                return;
            }
        }
    });
    let idle = Arc::new(Mutex::new(clients));
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut in_flight = Vec::new();
    while let Some(due) = due_rx.recv().await {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let Some(mut client) = idle.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
            break; // cannot happen: one client per permit
        };
        let (idle, shared) = (Arc::clone(&idle), Arc::clone(shared));
        in_flight.push(tokio::spawn(async move {
            let outcome = client.request(workload).await;
            shared.record(due.elapsed(), outcome);
            idle.lock().unwrap_or_else(|e| e.into_inner()).push(client);
            drop(permit);
        }));
        in_flight.retain(|t| !t.is_finished());
    }
    for t in in_flight {
        let _ = t.await;
    }
    let _ = pacer.join();
    let clients = std::mem::take(&mut *idle.lock().unwrap_or_else(|e| e.into_inner()));
    clients
}

/// A live line on stderr: elapsed time, rate so far, p99 so far.
async fn progress_line(
    shared: Arc<Shared>,
    from: Instant,
    until: Instant,
    workload: Workload,
    quiet: bool,
) {
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now < from {
            eprint!("\r{:<20} warming up…", workload.name());
            continue;
        }
        let elapsed = (now.min(until) - from).as_secs_f64().max(0.001);
        let n = shared.requests.load(Ordering::Relaxed);
        let p99 = shared
            .histogram
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .value_at_quantile(0.99);
        eprint!(
            "\r{:<20} {:>5.1}s  {:>9.0} req/s  p99 {:.3} ms   ",
            workload.name(),
            elapsed,
            n as f64 / elapsed,
            p99 as f64 / 1000.0
        );
        if now >= until {
            eprintln!();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ProcessFilter;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(flags: &[&str]) -> BenchArgs {
        Cli::parse_from(["bench", "--embedded"].iter().chain(flags)).bench
    }

    /// An embedded target with the bench's deployment for `app`.
    async fn target(app: &str, args: &BenchArgs) -> (Scheduler, Target) {
        let scheduler = Scheduler::builder()
            .regions(args.regions.clone())
            .backend(crate::backend::Simulated::default())
            .build()
            .expect("scheduler");
        let target = Target::Embedded(scheduler.clone());
        setup(&target, app, args).await.expect("setup");
        (scheduler, target)
    }

    async fn rooms_allocated(scheduler: &Scheduler, app: &str) -> u32 {
        let filter = ProcessFilter {
            app_id: app.into(),
            ..Default::default()
        };
        let page = scheduler.list_processes(&filter, 0, None).await.unwrap();
        page.processes.iter().map(|p| p.rooms_allocated).sum()
    }

    /// Measures `--workload create` with `flags` on an embedded target for `duration`.
    async fn measure_create(flags: &[&str], duration: Duration) -> (Scheduler, Report) {
        let args = args(&[&["--workload", "create"], flags].concat());
        let (scheduler, target) = target("app", &args).await;
        let report = measure(&target, "app", &args, Workload::Create, duration)
            .await
            .unwrap();
        (scheduler, report)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_measured_time_ends_at_the_last_answer_and_the_rooms_are_destroyed_after_it() {
        let duration = Duration::from_millis(300);
        let (scheduler, report) = measure_create(&["--concurrency", "8"], duration).await;
        assert!(report.requests > 0, "{report:?}");
        // Measured from the end of the warm-up: the run, not the tidying of every room made.
        let (seconds, run) = (report.seconds, duration.as_secs_f64());
        assert!(seconds >= run && seconds < run + 0.1, "{seconds}");
        assert_eq!(rooms_allocated(&scheduler, "app").await, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sparse_open_loop_is_measured_over_its_whole_duration() {
        // At 1 request/s nothing falls due after the first, in the warm-up.
        let duration = Duration::from_millis(500);
        let (_scheduler, report) = measure_create(&["--rate", "1"], duration).await;
        assert_eq!(report.requests, 0);
        assert!(report.seconds >= duration.as_secs_f64(), "{report:?}");
        assert_eq!(report.requests_per_second(), 0.0);
    }
}
