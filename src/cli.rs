//! The `roomsched` command line: `serve` runs the service; the other subcommands are gRPC
//! clients of a running server, printing tables for people or JSON (`--json`) for scripts.

use crate::backend::{Simulated, SimulatedConfig};
use crate::client::{Conn, Target};
use crate::config::Settings;
use crate::grpc::gate::Gate;
use crate::grpc::pb;
use crate::grpc::pb::app_service_client::AppServiceClient;
use crate::grpc::pb::deployment_service_client::DeploymentServiceClient;
use crate::grpc::pb::process_service_client::ProcessServiceClient;
use crate::grpc::pb::room_service_client::RoomServiceClient;
use crate::metrics::Metrics;
use crate::server::{self, ServerConfig};
use crate::Scheduler;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use tonic::transport::Identity;

/// `println!` that exits quietly when stdout is closed (e.g. piped into `head`).
macro_rules! out {
    () => { out!("") };
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout().lock(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// Room allocation scheduler for dedicated game servers.
#[derive(Debug, Parser)]
#[command(name = "roomsched", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC service.
    Serve(ServeArgs),
    /// Help with the configuration file and tokens.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Create, inspect and destroy rooms.
    #[command(subcommand)]
    Room(RoomCommand),
    /// Create, inspect, drain and stop processes.
    #[command(subcommand)]
    Process(ProcessCommand),
    /// Create and inspect deployments.
    #[command(subcommand)]
    Deployment(DeploymentCommand),
    /// Capacity policy of an app in a region: warm pool and process limit.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Load generator: throughput and latency percentiles of a server (or the library).
    Bench(crate::bench::BenchArgs),
    /// Billed process-seconds, rooms created and peak processes per region.
    Usage {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// Only these regions (default: all).
        #[arg(long = "region", value_delimiter = ',')]
        regions: Vec<String>,
        /// Window start, RFC 3339 (default: the beginning).
        #[arg(long)]
        start: Option<String>,
        /// Window end, RFC 3339 (default: now).
        #[arg(long)]
        end: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print a commented configuration file with every key.
    Example,
    /// Print the hash of a bearer token, the form the configuration holds it in.
    HashToken {
        /// The token (read from stdin when absent, so it stays out of the shell history).
        token: Option<String>,
    },
}

fn config(cmd: ConfigCommand) -> Result<(), CliError> {
    match cmd {
        ConfigCommand::Example => out!("{}", crate::config::EXAMPLE.trim_end()),
        ConfigCommand::HashToken { token } => {
            let token = token.unwrap_or_else(|| {
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
                line.trim_end_matches(['\r', '\n']).to_string()
            });
            // The server trims the token it is sent: hash what it will compare.
            let token = token.trim();
            if token.is_empty() {
                return Err(CliError::Usage("the token is empty".into()));
            }
            out!("{}", crate::grpc::gate::TokenHash::of(token));
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Change the policy; fields not given keep their current value.
    Set {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// A configured region, e.g. Frankfurt.
        #[arg(long)]
        region: String,
        /// Keep at least this many processes of the latest deployment alive.
        #[arg(long)]
        min_processes: Option<u32>,
        /// Keep at least this many free slots on RUNNING or STARTING processes.
        #[arg(long)]
        buffer_rooms: Option<u32>,
        /// At most this many STARTING + RUNNING + DRAINING processes.
        #[arg(long)]
        max_processes: Option<u32>,
    },
    /// Show the policy (the server's default until set).
    Get {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// A configured region, e.g. Frankfurt.
        #[arg(long)]
        region: String,
    },
}

pub(crate) use crate::config::duration;
pub use crate::config::{BackendKind, ServeArgs, StoreKind};

/// Where the server is and how to print.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Address of a running roomsched server.
    #[arg(
        long,
        env = "ROOMSCHED_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub addr: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// CA certificate (PEM) that signed the certificate of a server that serves TLS; use an
    /// https:// address (or one without a scheme).
    #[arg(long, env = "ROOMSCHED_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Bearer token, for a server that requires one.
    #[arg(long, env = "ROOMSCHED_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RoomCommand {
    /// Place a room in a region.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// A configured region, e.g. Frankfurt.
        #[arg(long)]
        region: String,
        /// Opaque room configuration (at most 10,000 bytes).
        #[arg(long, default_value = "")]
        config: String,
        /// Choose the room id (default: generated).
        #[arg(long)]
        room_id: Option<String>,
        /// Deployment to use (default: the latest).
        #[arg(long)]
        deployment: Option<u32>,
    },
    /// Show a room and its allocation history.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// The room id.
        room_id: String,
    },
    /// Destroy a room and free its slot.
    Destroy {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// The room id.
        room_id: String,
    },
    /// Show where players of a room connect.
    Conn {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// The room id.
        room_id: String,
    },
    /// Follow a room's connection info until it is ACTIVE or destroyed.
    Watch {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// The room id.
        room_id: String,
    },
    /// List the rooms on a process (active by default).
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// The process id.
        #[arg(long)]
        process: String,
        /// Rooms that were on the process and left.
        #[arg(long)]
        inactive: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProcessCommand {
    /// Start an empty process (pre-warming).
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// A configured region, e.g. Frankfurt.
        #[arg(long)]
        region: String,
        /// Deployment to use (default: the latest).
        #[arg(long)]
        deployment: Option<u32>,
    },
    /// Show one process.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// The process id.
        process_id: String,
    },
    /// List processes, newest first.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// Only these statuses (starting, running, draining, stopping, stopped, failed).
        #[arg(long = "status", value_delimiter = ',')]
        statuses: Vec<String>,
        /// Only these regions.
        #[arg(long = "region", value_delimiter = ',')]
        regions: Vec<String>,
        /// At most this many (default: all).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Take no new rooms; stop when the last room ends.
    Drain {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// The process id.
        process_id: String,
    },
    /// Destroy the process's rooms and stop it now.
    Stop {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// The process id.
        process_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeploymentCommand {
    /// Create the app's next deployment (older processes start draining).
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        /// How many rooms fit in one process (1-10000).
        #[arg(long)]
        rooms_per_process: u32,
        /// The game server's main port inside its container.
        #[arg(long, default_value_t = 7777)]
        port: u32,
        /// Transport of the main port.
        #[arg(long, value_enum, default_value = "tcp")]
        transport: Transport,
        /// NAME:PORT[:tcp|udp|tls], at most 2.
        #[arg(long = "additional-port")]
        additional_ports: Vec<String>,
        /// Stop processes that have had no room for the idle timeout.
        #[arg(long)]
        idle_timeout: bool,
        /// NAME=VALUE, repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        /// Placement: spread rooms (most-free) or pack them (fewest-free).
        #[arg(long, value_enum, default_value = "most-free")]
        strategy: Strategy,
        /// The game server's argv for the `local` backend (`{port}` is replaced).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Show a deployment (the latest without an id).
    Get {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
        deployment_id: Option<u32>,
    },
    /// List an app's deployments, newest first.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// The app (game) id.
        #[arg(long)]
        app: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Tcp,
    Udp,
    Tls,
}

impl Transport {
    fn pb(self) -> pb::TransportType {
        match self {
            Transport::Tcp => pb::TransportType::Tcp,
            Transport::Udp => pb::TransportType::Udp,
            Transport::Tls => pb::TransportType::Tls,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    MostFree,
    FewestFree,
}

/// A failure the CLI reports and exits non-zero for.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Connect(#[from] crate::client::ConnectError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{}", describe_status(.0))]
    Call(#[from] tonic::Status),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Scheduler(#[from] crate::Error),
    #[error("bench: {0}")]
    Bench(#[from] crate::bench::BenchError),
}

/// A failed call's message and code, with a hint where the transport's own words say little.
fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{} ({:?})", status.message(), status.code());
    // What a plaintext client gets from a server that speaks TLS: which one depends on when
    // the server hangs up.
    let message = status.message();
    if message.starts_with("h2 protocol error")
        || message == "operation was canceled"
        || message == "transport error"
    {
        text.push_str("; the connection failed: if the server uses TLS, connect with an https:// address and --ca-file");
    }
    text
}

/// Runs `roomsched serve` until SIGINT or SIGTERM.
///
/// On the signal: health turns NOT_SERVING and changes are refused, calls in flight finish
/// (for at most the shutdown timeout), the store is flushed, and this returns Ok.
pub async fn serve(settings: Settings) -> Result<(), CliError> {
    // Before anything else: a SIGTERM during recovery or right after startup stops the server
    // once it is up, instead of killing it or being lost.
    let signal = shutdown_signal();
    let backend: std::sync::Arc<dyn crate::backend::Backend> = match settings.backend {
        BackendKind::Simulated => {
            let defaults = SimulatedConfig::default();
            std::sync::Arc::new(Simulated::new(SimulatedConfig {
                start_delay: settings.sim_start_delay,
                host: settings.public_host.clone(),
                ports: settings.ports.clone().unwrap_or(defaults.ports.clone()),
                ..defaults
            }))
        }
        BackendKind::Local => {
            let defaults = crate::backend::LocalConfig::default();
            std::sync::Arc::new(crate::backend::Local::new(crate::backend::LocalConfig {
                host: settings.public_host.clone(),
                log_dir: settings.data_dir.join("logs"),
                ports: settings.ports.clone().unwrap_or(defaults.ports.clone()),
                ..defaults
            }))
        }
    };
    let metrics = settings
        .metrics_listen
        .as_ref()
        .map(|_| Arc::new(Metrics::new()));
    let mut builder = Scheduler::builder()
        .backend_arc(backend)
        .start_timeout(settings.start_timeout)
        .idle_timeout(settings.idle_timeout)
        .stop_grace(settings.stop_grace)
        .default_region_policy(settings.default_policy)
        .retained_destroyed_rooms(settings.retained_rooms);
    if let Some(regions) = settings.regions.clone() {
        builder = builder.regions(regions);
    }
    if let Some(metrics) = &metrics {
        builder = builder.observer(Arc::clone(metrics) as Arc<dyn crate::Observer>);
    }
    if settings.store == StoreKind::Durable {
        let store = crate::store::DurableStore::open(&settings.data_dir)
            .map_err(|e| CliError::Usage(e.to_string()))?;
        tracing::info!(path = %store.path().display(), "durable store opened");
        if let Some(metrics) = &metrics {
            let metrics = Arc::clone(metrics);
            store.on_flush(move |took| metrics.store_flushed(took));
        }
        builder = builder.store(store);
    }
    let scheduler = builder.build()?;
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .map_err(|e| {
            CliError::Usage(format!("listen: cannot listen on {}: {e}", settings.listen))
        })?;
    let addr = listener.local_addr()?;

    // One signal stops both servers.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let on_stop = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    tokio::spawn(async move {
        signal.await;
        let _ = stop.send(true);
    });
    let metrics_server = match (&metrics, &settings.metrics_listen) {
        (Some(metrics), Some(listen)) => {
            let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
                CliError::Usage(format!("metrics.listen: cannot listen on {listen}: {e}"))
            })?;
            tracing::info!(url = %format!("http://{}/metrics", listener.local_addr()?), "metrics endpoint listening");
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                Arc::clone(metrics),
                scheduler.clone(),
                on_stop(),
            )))
        }
        _ => None,
    };
    if settings.auth.is_open() {
        tracing::warn!("no token configured: every caller may do everything (set auth.admin_tokens / auth.apps)");
    }
    tracing::info!(
        %addr,
        tls = settings.tls.is_some(),
        store = ?settings.store,
        backend = ?settings.backend,
        regions = scheduler.regions().join(","),
        "roomsched listening"
    );
    let config = ServerConfig {
        gate: Arc::new(Gate::new(
            settings.auth.clone(),
            settings.rate_limit.clone(),
            metrics.clone(),
        )),
        tls: settings
            .tls
            .as_ref()
            .map(|t| Identity::from_pem(&t.cert_pem, &t.key_pem)),
        drain_timeout: settings.shutdown_timeout,
        max_message_size: settings.max_message_size,
        ..Default::default()
    };
    server::run(listener, scheduler.clone(), config, on_stop()).await?;
    scheduler.shutdown();
    match scheduler.flush().await {
        Ok(()) => tracing::info!("store flushed"),
        Err(err) => tracing::error!(%err, "store not flushed"),
    }
    match settings.store {
        // Every acknowledged change is on disk; the game servers keep running and are
        // adopted again at the next start.
        StoreKind::Durable => match settings.backend {
            BackendKind::Local => tracing::info!(
                "stopped; game servers keep running and are adopted at the next start"
            ),
            BackendKind::Simulated => {
                tracing::info!("stopped; processes are restored at the next start")
            }
        },
        // Nothing could adopt them: stop them (SIGTERM, SIGKILL after the grace).
        StoreKind::Memory => scheduler.stop_all_processes().await,
    }
    if let Some(mut task) = metrics_server {
        // A scrape that never finishes (a client that stalls) must not keep us from exiting.
        if tokio::time::timeout(settings.shutdown_timeout, &mut task)
            .await
            .is_err()
        {
            tracing::warn!(
                "metrics connections still open after the shutdown timeout; closing them"
            );
            task.abort();
        }
    }
    Ok(())
}

/// Listens for SIGINT and SIGTERM from this call on (so a signal that arrives before the
/// returned future is first polled is not lost, nor fatal); the future completes on the first.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let listeners = signal(SignalKind::terminate()).and_then(|term| {
            let int = signal(SignalKind::interrupt())?;
            Ok((term, int))
        });
        async move {
            match listeners {
                Ok((mut term, mut int)) => tokio::select! {
                    _ = term.recv() => tracing::info!("received SIGTERM"),
                    _ = int.recv() => tracing::info!("received SIGINT"),
                },
                Err(err) => {
                    tracing::warn!(%err, "cannot listen for SIGTERM or SIGINT; the server can only be killed");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn channel(client: &ClientArgs) -> Result<Conn, CliError> {
    let target = Target {
        addr: client.addr.clone(),
        ca_file: client.ca_file.clone(),
        token: client.token.clone(),
    };
    Ok(target.connect().await?)
}

/// Runs one subcommand.
pub async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve(args) => serve(Settings::resolve(args)?).await,
        Command::Config(cmd) => config(cmd),
        Command::Room(cmd) => room(cmd).await,
        Command::Process(cmd) => process(cmd).await,
        Command::Deployment(cmd) => deployment(cmd).await,
        Command::Policy(cmd) => policy(cmd).await,
        Command::Bench(args) => {
            crate::bench::run(args).await?;
            Ok(())
        }
        Command::Usage {
            client,
            app,
            regions,
            start,
            end,
        } => usage(client, app, regions, start, end).await,
    }
}

fn policy_json(p: &pb::RegionPolicy) -> Value {
    json!({
        "app_id": p.app_id,
        "region": p.region,
        "min_processes": p.min_processes,
        "buffer_rooms": p.buffer_rooms,
        "max_processes": p.max_processes,
    })
}

async fn policy(cmd: PolicyCommand) -> Result<(), CliError> {
    match cmd {
        PolicyCommand::Set {
            client,
            app,
            region,
            min_processes,
            buffer_rooms,
            max_processes,
        } => {
            let mut c = AppServiceClient::new(channel(&client).await?);
            let current = c
                .get_region_policy(pb::GetRegionPolicyRequest {
                    app_id: app.clone(),
                    region: region.clone(),
                })
                .await?
                .into_inner();
            let p = c
                .set_region_policy(pb::SetRegionPolicyRequest {
                    app_id: app,
                    region,
                    min_processes: min_processes.unwrap_or(current.min_processes),
                    buffer_rooms: buffer_rooms.unwrap_or(current.buffer_rooms),
                    max_processes: max_processes.unwrap_or(current.max_processes),
                })
                .await?
                .into_inner();
            print_one(client.json, &policy_json(&p));
        }
        PolicyCommand::Get {
            client,
            app,
            region,
        } => {
            let mut c = AppServiceClient::new(channel(&client).await?);
            let p = c
                .get_region_policy(pb::GetRegionPolicyRequest {
                    app_id: app,
                    region,
                })
                .await?
                .into_inner();
            print_one(client.json, &policy_json(&p));
        }
    }
    Ok(())
}

fn rfc3339(flag: &str, s: Option<String>) -> Result<Option<prost_types::Timestamp>, CliError> {
    s.map(|s| {
        chrono::DateTime::parse_from_rfc3339(&s)
            .map(|t| crate::grpc::convert::timestamp(t.to_utc()))
            .map_err(|e| {
                CliError::Usage(format!("--{flag} {s:?}: {e} (e.g. 2026-12-03T18:00:00Z)"))
            })
    })
    .transpose()
}

async fn usage(
    client: ClientArgs,
    app: String,
    regions: Vec<String>,
    start: Option<String>,
    end: Option<String>,
) -> Result<(), CliError> {
    let (start, end) = (rfc3339("start", start)?, rfc3339("end", end)?);
    let mut c = AppServiceClient::new(channel(&client).await?);
    let u = c
        .get_usage(pb::GetUsageRequest {
            app_id: app,
            regions,
            start,
            end,
        })
        .await?
        .into_inner();
    let rows = u
        .regions
        .iter()
        .map(|r| {
            json!({
                "region": r.region,
                "billed_process_seconds": r.billed_process_seconds,
                "rooms_created": r.rooms_created,
                "peak_processes": r.peak_processes,
            })
        })
        .collect();
    print_list(
        client.json,
        &[
            "region",
            "billed_process_seconds",
            "rooms_created",
            "peak_processes",
        ],
        rows,
    );
    Ok(())
}

async fn room(cmd: RoomCommand) -> Result<(), CliError> {
    match cmd {
        RoomCommand::Create {
            client,
            app,
            region,
            config,
            room_id,
            deployment,
        } => {
            let mut c = RoomServiceClient::new(channel(&client).await?);
            let r = c
                .create_room(pb::CreateRoomRequest {
                    app_id: app,
                    region,
                    room_config: config,
                    room_id: room_id.unwrap_or_default(),
                    deployment_id: deployment.unwrap_or(0),
                })
                .await?
                .into_inner();
            let v = json!({
                "address": r.exposed_port.as_ref().map(|e| format!("{}:{}", e.host, e.port)),
                "room_id": r.room_id,
                "process_id": r.process_id,
                "status": enum_name(r.status().as_str_name()),
                "exposed_port": r.exposed_port.as_ref().map(port_json),
                "additional_exposed_ports": r.additional_exposed_ports.iter().map(port_json).collect::<Vec<_>>(),
            });
            print_one(client.json, &v);
        }
        RoomCommand::Get {
            client,
            app,
            room_id,
        } => {
            let mut c = RoomServiceClient::new(channel(&client).await?);
            let r = c
                .get_room(pb::GetRoomRequest {
                    app_id: app,
                    room_id,
                })
                .await?
                .into_inner();
            let v = room_json(&r);
            if client.json {
                out!("{v:#}");
            } else {
                print_one(
                    false,
                    &json!({
                        "room_id": r.room_id, "status": v["status"], "room_config": r.room_config,
                        "process_id": v["current_allocation"]["process_id"],
                    }),
                );
                out!("\nallocations (oldest first):");
                print_table(
                    &[
                        "room_allocation_id",
                        "process_id",
                        "scheduled_at",
                        "unscheduled_at",
                    ],
                    v["allocations"].as_array().cloned().unwrap_or_default(),
                );
            }
        }
        RoomCommand::Destroy {
            client,
            app,
            room_id,
        } => {
            let mut c = RoomServiceClient::new(channel(&client).await?);
            c.destroy_room(pb::DestroyRoomRequest {
                app_id: app,
                room_id: room_id.clone(),
            })
            .await?;
            print_one(
                client.json,
                &json!({ "room_id": room_id, "destroyed": true }),
            );
        }
        RoomCommand::Conn {
            client,
            app,
            room_id,
        } => {
            let mut c = RoomServiceClient::new(channel(&client).await?);
            let r = c
                .get_connection_info(pb::GetConnectionInfoRequest {
                    app_id: app,
                    room_id,
                })
                .await?
                .into_inner();
            print_one(client.json, &conn_json(&r));
        }
        RoomCommand::Watch {
            client,
            app,
            room_id,
        } => {
            let mut c = RoomServiceClient::new(channel(&client).await?);
            let mut stream = c
                .watch_connection_info(pb::GetConnectionInfoRequest {
                    app_id: app,
                    room_id,
                })
                .await?
                .into_inner();
            let mut first = true;
            let mut active = false;
            while let Some(info) = stream.message().await? {
                active = info.status() == pb::ConnectionStatus::Active;
                let v = conn_json(&info);
                if client.json {
                    out!("{v}");
                } else {
                    if !first {
                        out!();
                    }
                    print_one(false, &v);
                }
                first = false;
            }
            if !active {
                return Err(CliError::Usage(
                    "the watch ended before the room was ACTIVE (room destroyed, or the server \
                     shutting down: `room get` tells which)"
                        .into(),
                ));
            }
        }
        RoomCommand::List {
            client,
            app,
            process,
            inactive,
        } => {
            let mut c = RoomServiceClient::new(channel(&client).await?);
            let mut rows: Vec<Value> = Vec::new();
            let mut page_token = String::new();
            loop {
                let req = pb::ListRoomsForProcessRequest {
                    app_id: app.clone(),
                    process_id: process.clone(),
                    page_size: 1000,
                    page_token,
                };
                let page = if inactive {
                    c.list_inactive_rooms_for_process(req).await?
                } else {
                    c.list_active_rooms_for_process(req).await?
                }
                .into_inner();
                rows.extend(page.rooms.iter().map(room_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_list(client.json, &["room_id", "status", "room_config"], rows);
        }
    }
    Ok(())
}

fn parse_status(s: &str) -> Result<i32, CliError> {
    let name = format!("PROCESS_STATUS_{}", s.trim().to_ascii_uppercase());
    pb::ProcessStatus::from_str_name(&name)
        .filter(|s| *s != pb::ProcessStatus::Unspecified)
        .map(Into::into)
        .ok_or_else(|| {
            CliError::Usage(format!(
                "unknown status {s:?} (starting, running, draining, stopping, stopped, failed)"
            ))
        })
}

const PROCESS_COLUMNS: [&str; 7] = [
    "process_id",
    "region",
    "deployment_id",
    "status",
    "rooms",
    "address",
    "created_at",
];

async fn process(cmd: ProcessCommand) -> Result<(), CliError> {
    match cmd {
        ProcessCommand::Create {
            client,
            app,
            region,
            deployment,
        } => {
            let mut c = ProcessServiceClient::new(channel(&client).await?);
            let p = c
                .create_process(pb::CreateProcessRequest {
                    app_id: app,
                    region,
                    deployment_id: deployment.unwrap_or(0),
                })
                .await?
                .into_inner();
            print_one(client.json, &process_json(&p));
        }
        ProcessCommand::Get {
            client,
            app,
            process_id,
        } => {
            let mut c = ProcessServiceClient::new(channel(&client).await?);
            let p = c
                .get_process(pb::GetProcessRequest {
                    app_id: app,
                    process_id,
                })
                .await?
                .into_inner();
            print_one(client.json, &process_json(&p));
        }
        ProcessCommand::List {
            client,
            app,
            statuses,
            regions,
            limit,
        } => {
            let statuses = statuses
                .iter()
                .map(|s| parse_status(s))
                .collect::<Result<Vec<_>, _>>()?;
            let mut c = ProcessServiceClient::new(channel(&client).await?);
            let mut rows = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = c
                    .list_processes(pb::ListProcessesRequest {
                        app_id: app.clone(),
                        statuses: statuses.clone(),
                        regions: regions.clone(),
                        page_size: 1000,
                        page_token,
                    })
                    .await?
                    .into_inner();
                rows.extend(page.processes.iter().map(process_json));
                if limit.is_some_and(|l| rows.len() >= l) {
                    rows.truncate(limit.unwrap_or(usize::MAX));
                    break;
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_list(client.json, &PROCESS_COLUMNS, rows);
        }
        ProcessCommand::Drain {
            client,
            app,
            process_id,
        } => {
            let mut c = ProcessServiceClient::new(channel(&client).await?);
            let p = c
                .drain_process(pb::DrainProcessRequest {
                    app_id: app,
                    process_id,
                })
                .await?
                .into_inner();
            print_one(client.json, &process_json(&p));
        }
        ProcessCommand::Stop {
            client,
            app,
            process_id,
        } => {
            let mut c = ProcessServiceClient::new(channel(&client).await?);
            let p = c
                .stop_process(pb::StopProcessRequest {
                    app_id: app,
                    process_id,
                })
                .await?
                .into_inner();
            print_one(client.json, &process_json(&p));
        }
    }
    Ok(())
}

fn parse_additional_port(s: &str) -> Result<pb::ContainerPort, CliError> {
    let bad = || {
        CliError::Usage(format!(
            "--additional-port {s:?}: expected NAME:PORT[:tcp|udp|tls]"
        ))
    };
    let mut parts = s.split(':');
    let name = parts.next().ok_or_else(bad)?.to_string();
    let port = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let transport = match parts.next() {
        None | Some("tcp") => pb::TransportType::Tcp,
        Some("udp") => pb::TransportType::Udp,
        Some("tls") => pb::TransportType::Tls,
        Some(_) => return Err(bad()),
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(pb::ContainerPort {
        name,
        port,
        transport_type: transport.into(),
    })
}

async fn deployment(cmd: DeploymentCommand) -> Result<(), CliError> {
    match cmd {
        DeploymentCommand::Create {
            client,
            app,
            rooms_per_process,
            port,
            transport,
            additional_ports,
            idle_timeout,
            env,
            strategy,
            command,
        } => {
            let env = env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| pb::EnvVar {
                            name: k.to_string(),
                            value: v.to_string(),
                        })
                        .ok_or_else(|| {
                            CliError::Usage(format!("--env {kv:?}: expected NAME=VALUE"))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let additional_container_ports = additional_ports
                .iter()
                .map(|p| parse_additional_port(p))
                .collect::<Result<_, _>>()?;
            let strategy = match strategy {
                Strategy::MostFree => pb::PlacementStrategy::MostFree,
                Strategy::FewestFree => pb::PlacementStrategy::FewestFree,
            };
            let mut c = DeploymentServiceClient::new(channel(&client).await?);
            let d = c
                .create_deployment(pb::CreateDeploymentRequest {
                    app_id: app,
                    rooms_per_process,
                    transport_type: transport.pb().into(),
                    container_port: port,
                    additional_container_ports,
                    idle_timeout_enabled: idle_timeout,
                    env,
                    command,
                    placement_strategy: strategy.into(),
                })
                .await?
                .into_inner();
            print_one(client.json, &deployment_json(&d));
        }
        DeploymentCommand::Get {
            client,
            app,
            deployment_id,
        } => {
            let mut c = DeploymentServiceClient::new(channel(&client).await?);
            let d = match deployment_id {
                Some(id) => {
                    c.get_deployment(pb::GetDeploymentRequest {
                        app_id: app,
                        deployment_id: id,
                    })
                    .await?
                }
                None => {
                    c.get_latest_deployment(pb::GetLatestDeploymentRequest { app_id: app })
                        .await?
                }
            }
            .into_inner();
            print_one(client.json, &deployment_json(&d));
        }
        DeploymentCommand::List { client, app } => {
            let mut c = DeploymentServiceClient::new(channel(&client).await?);
            let ds = c
                .list_deployments(pb::ListDeploymentsRequest { app_id: app })
                .await?
                .into_inner();
            let rows = ds.deployments.iter().map(deployment_json).collect();
            print_list(
                client.json,
                &[
                    "deployment_id",
                    "rooms_per_process",
                    "container_port",
                    "placement_strategy",
                    "created_at",
                ],
                rows,
            );
        }
    }
    Ok(())
}

// ----- JSON views of the messages (protobuf field names, enum value names) ------------------

/// `PROCESS_STATUS_RUNNING` → `RUNNING`.
fn enum_name(full: &str) -> String {
    [
        "PROCESS_STATUS_",
        "ROOM_STATUS_",
        "CONNECTION_STATUS_",
        "TRANSPORT_TYPE_",
        "PLACEMENT_STRATEGY_",
    ]
    .iter()
    .find_map(|p| full.strip_prefix(p))
    .unwrap_or(full)
    .to_string()
}

fn ts(t: &Option<prost_types::Timestamp>) -> Value {
    match t
        .as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
    {
        Some(t) => Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        None => Value::Null,
    }
}

fn port_json(p: &pb::ExposedPort) -> Value {
    json!({
        "host": p.host, "name": p.name, "port": p.port,
        "transport_type": enum_name(p.transport_type().as_str_name()),
    })
}

fn process_json(p: &pb::Process) -> Value {
    json!({
        "process_id": p.process_id,
        "app_id": p.app_id,
        "deployment_id": p.deployment_id,
        "region": p.region,
        "status": enum_name(p.status().as_str_name()),
        "rooms_per_process": p.rooms_per_process,
        "rooms_allocated": p.rooms_allocated,
        "rooms": format!("{}/{}", p.rooms_allocated, p.rooms_per_process),
        // Where players connect, while they can (the exposed port itself stays on record).
        "address": p
            .exposed_port
            .as_ref()
            .filter(|_| matches!(p.status(), pb::ProcessStatus::Running | pb::ProcessStatus::Draining))
            .map(|e| format!("{}:{}", e.host, e.port)),
        "exposed_port": p.exposed_port.as_ref().map(port_json),
        "additional_exposed_ports": p.additional_exposed_ports.iter().map(port_json).collect::<Vec<_>>(),
        "created_at": ts(&p.created_at),
        "started_at": ts(&p.started_at),
        "stopping_at": ts(&p.stopping_at),
        "terminated_at": ts(&p.terminated_at),
        "summary_exit_reason": p.summary_exit_reason,
        "log_path": p.log_path,
    })
}

fn allocation_json(a: &pb::RoomAllocation) -> Value {
    json!({
        "room_allocation_id": a.room_allocation_id,
        "process_id": a.process_id,
        "scheduled_at": ts(&a.scheduled_at),
        "unscheduled_at": ts(&a.unscheduled_at),
    })
}

fn room_json(r: &pb::Room) -> Value {
    json!({
        "app_id": r.app_id,
        "room_id": r.room_id,
        "room_config": r.room_config,
        "status": enum_name(r.status().as_str_name()),
        "current_allocation": r.current_allocation.as_ref().map(allocation_json),
        "allocations": r.allocations.iter().map(allocation_json).collect::<Vec<_>>(),
    })
}

fn conn_json(c: &pb::ConnectionInfo) -> Value {
    json!({
        "address": c.exposed_port.as_ref().map(|e| format!("{}:{}", e.host, e.port)),
        "room_id": c.room_id,
        "process_id": c.process_id,
        "status": enum_name(c.status().as_str_name()),
        "exposed_port": c.exposed_port.as_ref().map(port_json),
        "additional_exposed_ports": c.additional_exposed_ports.iter().map(port_json).collect::<Vec<_>>(),
    })
}

fn deployment_json(d: &pb::Deployment) -> Value {
    json!({
        "app_id": d.app_id,
        "deployment_id": d.deployment_id,
        "rooms_per_process": d.rooms_per_process,
        "transport_type": enum_name(d.transport_type().as_str_name()),
        "container_port": d.container_port,
        "additional_container_ports": d.additional_container_ports.iter().map(|p| json!({
            "name": p.name, "port": p.port, "transport_type": enum_name(p.transport_type().as_str_name()),
        })).collect::<Vec<_>>(),
        "idle_timeout_enabled": d.idle_timeout_enabled,
        "env": d.env.iter().map(|e| json!({"name": e.name, "value": e.value})).collect::<Vec<_>>(),
        "command": d.command,
        "placement_strategy": enum_name(d.placement_strategy().as_str_name()),
        "created_at": ts(&d.created_at),
    })
}

// ----- printing ------------------------------------------------------------------------------

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One object: pretty JSON, or `key  value` lines (nulls and empty lists left out).
fn print_one(as_json: bool, v: &Value) {
    if as_json {
        out!("{v:#}");
        return;
    }
    let Some(obj) = v.as_object() else {
        return out!("{v}");
    };
    let width = obj.keys().map(String::len).max().unwrap_or(0);
    for (k, v) in obj {
        let empty = v.is_null() || v.as_array().is_some_and(Vec::is_empty);
        if !empty {
            out!("{k:<width$}  {}", cell(v));
        }
    }
}

fn print_list(as_json: bool, columns: &[&str], rows: Vec<Value>) {
    if as_json {
        out!("{:#}", Value::Array(rows));
    } else {
        print_table(columns, rows);
    }
}

fn print_table(columns: &[&str], rows: Vec<Value>) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<String>| {
        let padded: Vec<String> = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out!("{}", padded.join("  ").trim_end());
    };
    line(columns.iter().map(|c| c.to_uppercase()).collect());
    for row in cells {
        line(row);
    }
    if rows.is_empty() {
        out!("(none)");
    }
}

#[cfg(test)]
mod tests {
    use super::describe_status;

    #[test]
    fn a_failed_connection_gets_the_tls_hint_and_a_refusal_does_not() {
        for status in [
            tonic::Status::internal("h2 protocol error: http2 error"),
            tonic::Status::cancelled("operation was canceled"),
            tonic::Status::unknown("transport error"),
        ] {
            let text = describe_status(&status);
            assert!(text.starts_with(status.message()), "{text}");
            assert!(text.contains("https:// address and --ca-file"), "{text}");
        }
        let refused = tonic::Status::not_found("room \"x\" not found");
        assert_eq!(describe_status(&refused), "room \"x\" not found (NotFound)");
    }
}
