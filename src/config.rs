//! Everything that configures `roomsched serve`, resolved in one place: a TOML file
//! (`--config`), then `ROOMSCHED_…` environment variables, then flags, each overriding the one
//! before; what none of them sets keeps its default. [`Settings::resolve`] checks every value
//! and names the key of the first bad one, so a mistake stops startup instead of surfacing
//! later. [`EXAMPLE`] is the commented file `roomsched config example` prints.

use crate::grpc::gate::{AuthConfig, Rate, RateLimitConfig, TokenHash};
use crate::RegionPolicy;
use clap::{Args, ValueEnum};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Identity, ServerTlsConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Memory,
    Durable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Simulated,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `roomsched serve`. Every flag can also be set by the environment variable named in its
/// help text, and in the TOML file given to `--config` (`roomsched config example` shows
/// the keys). Flags override the environment, which overrides the file.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file (`roomsched config example` prints a commented one).
    #[arg(long, env = "ROOMSCHED_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on, HOST:PORT (port 0 picks a free port; the chosen one is logged)
    /// [file: listen; default 127.0.0.1:50051].
    #[arg(long, env = "ROOMSCHED_LISTEN")]
    pub listen: Option<String>,
    /// Directory for the durable store and process logs [file: store.data_dir; default
    /// ./roomsched-data].
    #[arg(long, env = "ROOMSCHED_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where state is kept: `durable` (in <data-dir>/roomsched.redb, every change on disk
    /// before it is acknowledged, game servers outlive a restart) or `memory` (nothing
    /// survives a restart; game servers are stopped when roomsched exits) [file: store.kind;
    /// default durable].
    #[arg(long, env = "ROOMSCHED_STORE", value_enum)]
    pub store: Option<StoreKind>,
    /// What starts processes: `simulated` (in memory) or `local` (real OS processes from the
    /// deployment's command, logs under <data-dir>/logs) [file: backend.kind; default
    /// simulated].
    #[arg(long, env = "ROOMSCHED_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,
    /// The host players connect to, reported in exposed ports and HATHORA_HOSTNAME
    /// [file: public_host; default 127.0.0.1].
    #[arg(long, env = "ROOMSCHED_PUBLIC_HOST")]
    pub public_host: Option<String>,
    /// Comma-separated region names [file: regions; default the 14 Hathora regions].
    #[arg(long, env = "ROOMSCHED_REGIONS", value_delimiter = ',')]
    pub regions: Option<Vec<String>>,
    /// Ports handed to game servers, FIRST-LAST [file: backend.ports; default 30000-39999
    /// for local, 20000-60000 for simulated].
    #[arg(long, env = "ROOMSCHED_PORTS")]
    pub ports: Option<String>,
    /// How long a simulated process stays STARTING before it binds its port
    /// [file: backend.sim_start_delay; default 0ms].
    #[arg(long, env = "ROOMSCHED_SIM_START_DELAY", value_parser = duration)]
    pub sim_start_delay: Option<Duration>,
    /// A STARTING process that has not bound its port by then is FAILED
    /// [file: timeouts.start; default 100s].
    #[arg(long, env = "ROOMSCHED_START_TIMEOUT", value_parser = duration)]
    pub start_timeout: Option<Duration>,
    /// A RUNNING process with no room for this long stops (deployments with the idle timeout
    /// on) [file: timeouts.idle; default 300s].
    #[arg(long, env = "ROOMSCHED_IDLE_TIMEOUT", value_parser = duration)]
    pub idle_timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when a process is stopped
    /// [file: timeouts.stop_grace; default 10s].
    #[arg(long, env = "ROOMSCHED_STOP_GRACE", value_parser = duration)]
    pub stop_grace: Option<Duration>,
    /// On SIGTERM, how long calls in flight may take to finish before the server exits anyway
    /// [file: timeouts.shutdown; default 10s].
    #[arg(long, env = "ROOMSCHED_SHUTDOWN_TIMEOUT", value_parser = duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Live processes allowed per app and region (until a region policy says otherwise)
    /// [file: limits.max_processes; default 1000].
    #[arg(long, env = "ROOMSCHED_MAX_PROCESSES")]
    pub max_processes: Option<u32>,
    /// Warm pool: processes kept alive per app and region (until a region policy says
    /// otherwise) [file: limits.min_processes; default 0].
    #[arg(long, env = "ROOMSCHED_MIN_PROCESSES")]
    pub min_processes: Option<u32>,
    /// Warm pool: free slots kept per app and region (until a region policy says otherwise)
    /// [file: limits.buffer_rooms; default 0].
    #[arg(long, env = "ROOMSCHED_BUFFER_ROOMS")]
    pub buffer_rooms: Option<u32>,
    /// How many destroyed rooms stay readable, server-wide (the oldest beyond it are forgotten
    /// in batches of a 64th of it, at most 256) [file: limits.retained_rooms; default 100000].
    #[arg(long, env = "ROOMSCHED_RETAINED_ROOMS")]
    pub retained_rooms: Option<usize>,
    /// Largest gRPC message, in bytes [file: limits.max_message_size; default 4194304].
    #[arg(long, env = "ROOMSCHED_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<usize>,
    /// Comma-separated SHA-256 hashes (`sha256:<hex>`, from `roomsched config hash-token`)
    /// of admin tokens [file: auth.admin_tokens; default none: no token configured anywhere
    /// means no authentication].
    #[arg(long, env = "ROOMSCHED_ADMIN_TOKENS", value_delimiter = ',')]
    pub admin_tokens: Option<Vec<String>>,
    /// Requests per second allowed per app (token bucket; 0 = no limit)
    /// [file: rate_limit.requests_per_second; default 0].
    #[arg(long, env = "ROOMSCHED_RATE_LIMIT")]
    pub rate_limit: Option<f64>,
    /// Requests an app may send at once above its rate [file: rate_limit.burst;
    /// default: one second's worth].
    #[arg(long, env = "ROOMSCHED_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// PEM certificate chain: serve TLS only [file: tls.cert_file].
    #[arg(long, env = "ROOMSCHED_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [file: tls.key_file].
    #[arg(long, env = "ROOMSCHED_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Address of the Prometheus endpoint, HOST:PORT, served at /metrics over HTTP
    /// [file: metrics.listen; default: off].
    #[arg(long, env = "ROOMSCHED_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Log lines as `pretty` text or `json` objects [file: log_format; default pretty]. Which
    /// lines: the `ROOMSCHED_LOG` variable, e.g. `warn` or `info,roomsched::rooms=warn`
    /// [default info].
    #[arg(long, env = "ROOMSCHED_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Longest duration any setting takes: timers are armed as an instant plus the duration, which
/// must not overflow.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write durations like 100ms, 2s, 5m)"))?;
    if d > MAX_DURATION {
        return Err("longer than the longest allowed, 10 years".into());
    }
    Ok(d)
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

fn bad(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("config: {key}: {why}"))
}

/// The TOML file, as written. Every key is optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    public_host: Option<String>,
    regions: Option<Vec<String>>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    store: FileStore,
    #[serde(default)]
    backend: FileBackend,
    #[serde(default)]
    timeouts: FileTimeouts,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    rate_limit: FileRateLimit,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    metrics: FileMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    kind: Option<StoreKind>,
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    kind: Option<BackendKind>,
    ports: Option<String>,
    sim_start_delay: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    start: Option<String>,
    idle: Option<String>,
    stop_grace: Option<String>,
    shutdown: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_processes: Option<u32>,
    min_processes: Option<u32>,
    buffer_rooms: Option<u32>,
    retained_rooms: Option<usize>,
    max_message_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    admin_tokens: Option<Vec<String>>,
    #[serde(default)]
    apps: BTreeMap<String, Vec<String>>,
    connection_info_needs_token: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRateLimit {
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    #[serde(default)]
    apps: BTreeMap<String, FileRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRate {
    requests_per_second: f64,
    burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    listen: Option<String>,
}

/// TLS identity of the server, read from its files at startup.
#[derive(Clone)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"(secret)")
            .finish()
    }
}

/// The resolved configuration of `roomsched serve`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub data_dir: PathBuf,
    pub store: StoreKind,
    pub backend: BackendKind,
    pub public_host: String,
    /// Ports handed to game servers (None: the backend's default range).
    pub ports: Option<RangeInclusive<u16>>,
    pub regions: Option<Vec<String>>,
    pub sim_start_delay: Duration,
    pub start_timeout: Duration,
    pub idle_timeout: Duration,
    pub stop_grace: Duration,
    pub shutdown_timeout: Duration,
    pub default_policy: RegionPolicy,
    pub retained_rooms: usize,
    pub max_message_size: usize,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub tls: Option<TlsFiles>,
    pub metrics_listen: Option<String>,
    pub log_format: LogFormat,
}

fn file_duration(key: &str, value: Option<String>) -> Result<Option<Duration>, ConfigError> {
    value
        .map(|v| duration(&v).map_err(|e| bad(key, format!("{v:?}: {e}"))))
        .transpose()
}

fn port_range(key: &str, value: &str) -> Result<RangeInclusive<u16>, ConfigError> {
    let parsed = value
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
    match parsed {
        Some((first, last)) if first >= 1 && first <= last => Ok(first..=last),
        _ => Err(bad(
            key,
            format!("{value:?} is not a port range FIRST-LAST with 1 <= FIRST <= LAST <= 65535"),
        )),
    }
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| bad(key, format!("cannot read {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(bad(key, format!("{} is not a PEM file", path.display())));
    }
    Ok(bytes)
}

fn hashes(key: &str, values: &[String]) -> Result<Vec<TokenHash>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| TokenHash::parse(v).map_err(|e| bad(&format!("{key}[{i}]"), e)))
        .collect()
}

fn rate(key: &str, per_second: f64, burst: Option<u32>) -> Result<Rate, ConfigError> {
    if !per_second.is_finite() || per_second < 0.001 {
        return Err(bad(
            &format!("{key}.requests_per_second (--rate-limit)"),
            format!("{per_second} is not a number of at least 0.001"),
        ));
    }
    let burst = burst.unwrap_or(per_second.ceil() as u32);
    if burst == 0 {
        return Err(bad(&format!("{key}.burst"), "must be at least 1"));
    }
    Ok(Rate { per_second, burst })
}

impl Settings {
    /// Reads the file named by `args.config` (if any) and lays the environment and flags
    /// (already merged into `args` by clap) over it.
    pub fn resolve(args: ServeArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            None => File::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
                toml::from_str(&text)
                    .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?
            }
        };
        Settings::merge(file, args)
    }

    /// Parses a configuration file's text with no environment or flags on top.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let file = toml::from_str(text).map_err(|e| ConfigError(format!("config: {e}")))?;
        Settings::merge(file, ServeArgs::default())
    }

    fn merge(file: File, args: ServeArgs) -> Result<Settings, ConfigError> {
        let default_policy = RegionPolicy {
            min_processes: args
                .min_processes
                .or(file.limits.min_processes)
                .unwrap_or(0),
            buffer_rooms: args.buffer_rooms.or(file.limits.buffer_rooms).unwrap_or(0),
            max_processes: args
                .max_processes
                .or(file.limits.max_processes)
                .unwrap_or(1000),
        };
        if default_policy.min_processes > default_policy.max_processes {
            return Err(bad(
                "limits.min_processes",
                format!(
                    "{} is greater than limits.max_processes ({})",
                    default_policy.min_processes, default_policy.max_processes
                ),
            ));
        }
        let regions = args.regions.or(file.regions);
        if let Some(regions) = &regions {
            crate::core::validate_regions(regions).map_err(|e| bad("regions", e))?;
        }
        let max_message_size = args
            .max_message_size
            .or(file.limits.max_message_size)
            .unwrap_or(4 * 1024 * 1024);
        if max_message_size < 1024 {
            return Err(bad(
                "limits.max_message_size",
                format!("{max_message_size} bytes is too small (at least 1024)"),
            ));
        }
        let retained_rooms = args
            .retained_rooms
            .or(file.limits.retained_rooms)
            .unwrap_or(100_000);

        let admin = match args.admin_tokens {
            Some(flag) => hashes(
                "admin_tokens (--admin-tokens / ROOMSCHED_ADMIN_TOKENS)",
                &flag,
            )?,
            None => hashes(
                "auth.admin_tokens",
                &file.auth.admin_tokens.unwrap_or_default(),
            )?,
        };
        let mut apps = Vec::new();
        for (app, tokens) in &file.auth.apps {
            crate::core::validate_app_id(app)
                .map_err(|_| bad("auth.apps", format!("{app:?} is not a valid app id")))?;
            for hash in hashes(&format!("auth.apps.{app}"), tokens)? {
                apps.push((app.clone(), hash));
            }
        }
        let auth = AuthConfig {
            admin,
            apps,
            connection_info_needs_token: file.auth.connection_info_needs_token.unwrap_or(false),
        };

        let per_second = args
            .rate_limit
            .or(file.rate_limit.requests_per_second)
            .unwrap_or(0.0);
        let burst = args.rate_limit_burst.or(file.rate_limit.burst);
        let default_rate = if per_second == 0.0 {
            None
        } else {
            Some(rate("rate_limit", per_second, burst)?)
        };
        let mut app_rates = BTreeMap::new();
        for (app, r) in file.rate_limit.apps {
            let key = format!("rate_limit.apps.{app}");
            crate::core::validate_app_id(&app)
                .map_err(|_| bad(&key, format!("{app:?} is not a valid app id")))?;
            app_rates.insert(app, rate(&key, r.requests_per_second, r.burst)?);
        }
        let rate_limit = RateLimitConfig {
            default: default_rate,
            apps: app_rates.into_iter().collect(),
        };

        let cert = args.tls_cert.or(file.tls.cert_file);
        let key = args.tls_key.or(file.tls.key_file);
        match (&cert, &key) {
            (Some(_), None) => {
                return Err(bad(
                    "tls.key_file",
                    "a certificate is set (tls.cert_file / --tls-cert) but no key",
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "tls.cert_file",
                    "a key is set (tls.key_file / --tls-key) but no certificate",
                ))
            }
            _ => {}
        }
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => {
                let files = TlsFiles {
                    cert_pem: read_file("tls.cert_file", &cert)?,
                    key_pem: read_file("tls.key_file", &key)?,
                };
                // Parses both files and checks that the key fits the certificate.
                let identity = Identity::from_pem(&files.cert_pem, &files.key_pem);
                tonic::transport::Server::builder()
                    .tls_config(ServerTlsConfig::new().identity(identity))
                    .map_err(|e| {
                        let mut why = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(s) = source {
                            why = format!("{why}: {s}");
                            source = s.source();
                        }
                        let (cert, key) = (cert.display(), key.display());
                        bad("tls", format!("cannot use {cert} with {key}: {why}"))
                    })?;
                Some(files)
            }
            _ => None,
        };

        let ports = match (args.ports, file.backend.ports) {
            (Some(flag), _) => Some(port_range("backend.ports (--ports)", &flag)?),
            (None, Some(file)) => Some(port_range("backend.ports", &file)?),
            (None, None) => None,
        };
        let metrics_listen = args.metrics_listen.or(file.metrics.listen);
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:50051".into());
        if metrics_listen.as_deref() == Some(listen.as_str()) && !listen.ends_with(":0") {
            return Err(bad(
                "metrics.listen",
                format!("{listen} is also the gRPC listen address"),
            ));
        }
        Ok(Settings {
            listen,
            data_dir: args
                .data_dir
                .or(file.store.data_dir)
                .unwrap_or_else(|| "./roomsched-data".into()),
            store: args.store.or(file.store.kind).unwrap_or(StoreKind::Durable),
            backend: args
                .backend
                .or(file.backend.kind)
                .unwrap_or(BackendKind::Simulated),
            public_host: args
                .public_host
                .or(file.public_host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            ports,
            regions,
            sim_start_delay: args
                .sim_start_delay
                .or(file_duration(
                    "backend.sim_start_delay",
                    file.backend.sim_start_delay,
                )?)
                .unwrap_or(Duration::ZERO),
            start_timeout: args
                .start_timeout
                .or(file_duration("timeouts.start", file.timeouts.start)?)
                .unwrap_or(Duration::from_secs(100)),
            idle_timeout: args
                .idle_timeout
                .or(file_duration("timeouts.idle", file.timeouts.idle)?)
                .unwrap_or(Duration::from_secs(300)),
            stop_grace: args
                .stop_grace
                .or(file_duration(
                    "timeouts.stop_grace",
                    file.timeouts.stop_grace,
                )?)
                .unwrap_or(Duration::from_secs(10)),
            shutdown_timeout: args
                .shutdown_timeout
                .or(file_duration("timeouts.shutdown", file.timeouts.shutdown)?)
                .unwrap_or(Duration::from_secs(10)),
            default_policy,
            retained_rooms,
            max_message_size,
            auth,
            rate_limit,
            tls,
            metrics_listen,
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Pretty),
        })
    }
}

/// The commented configuration file printed by `roomsched config example`. Every key is
/// optional; the values shown are the defaults unless the comment says otherwise.
pub const EXAMPLE: &str = r#"# roomsched configuration (roomsched serve --config roomsched.toml).
# Every key is optional: as printed, this file sets the defaults, and the lines commented out
# show optional settings to turn on. Environment variables (ROOMSCHED_LISTEN, ...) override
# this file and flags (--listen, ...) override both; `roomsched serve --help` lists them.

# gRPC address, HOST:PORT.
listen = "127.0.0.1:50051"
# Host players connect to (reported in exposed ports and HATHORA_HOSTNAME).
public_host = "127.0.0.1"
# Regions rooms may be placed in (exact, case-sensitive names). Default: the 14 Hathora regions.
# regions = ["Frankfurt", "Washington_DC", "Tokyo"]
# "pretty" or "json" (one object per line). Levels: ROOMSCHED_LOG=info,roomsched=debug
log_format = "pretty"

[store]
# "durable" (every change on disk before it is acknowledged) or "memory".
kind = "durable"
data_dir = "./roomsched-data"

[backend]
# "simulated" (processes in memory) or "local" (real OS processes).
kind = "simulated"
# Ports handed to game servers. Default: 30000-39999 (local), 20000-60000 (simulated).
# ports = "30000-39999"
# Simulated processes stay STARTING this long.
sim_start_delay = "0ms"

[timeouts]
# A process that has not bound its port after this is FAILED.
start = "100s"
# An empty RUNNING process stops after this (deployments with the idle timeout on).
idle = "300s"
# SIGTERM to SIGKILL when a game server is stopped.
stop_grace = "10s"
# On SIGTERM to roomsched: the longest wait for calls in flight before exiting.
shutdown = "10s"

[limits]
# Defaults per app and region until a region policy says otherwise.
max_processes = 1000
min_processes = 0
buffer_rooms = 0
# Destroyed rooms kept readable, server-wide.
retained_rooms = 100000
# Largest gRPC message, in bytes.
max_message_size = 4194304

[auth]
# Hashes of bearer tokens (`roomsched config hash-token` makes one); never the tokens.
# With no token configured at all, every call is allowed and a warning is logged.
# An admin token may do everything. (This one is the hash of "admin-change-me": make your own.)
# admin_tokens = ["sha256:84cb785e7cc8d1c67faf2e9d8e647b179d4680a27544c5cd55bb2655d224cfde"]
# Whether GetConnectionInfo / WatchConnectionInfo need a token (game clients call them).
connection_info_needs_token = false

# App tokens: each only touches its own app. (The hash of "my-game-change-me".)
[auth.apps]
# "my-game" = ["sha256:737b459455ebed8364cadb49b01f4b96a70a76b75a110f62fc081f2fc059f0fd"]

[rate_limit]
# Requests per second per app (token bucket); 0 = no limit. Calls that need no token
# (connection info) count in a bucket of their own.
requests_per_second = 0
# The bucket's size: calls an app may make at once (default: one second's worth).
# burst = 200

# Per-app rates override the default.
# [rate_limit.apps.my-game]
# requests_per_second = 5000
# burst = 10000

# Serve TLS only (PEM files: a certificate signed by a CA, and its key). Clients:
#   roomsched room get ... --addr https://host:port --ca-file ca.pem
# [tls]
# cert_file = "server.pem"
# key_file = "server-key.pem"

[metrics]
# Prometheus endpoint (GET /metrics over HTTP). Off unless set.
# listen = "127.0.0.1:9464"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_valid_and_shows_the_defaults() {
        let s = Settings::from_toml(EXAMPLE).unwrap();
        assert_eq!(s.listen, "127.0.0.1:50051");
        assert_eq!(s.store, StoreKind::Durable);
        assert_eq!(s.idle_timeout, Duration::from_secs(300));
        assert_eq!(s.default_policy.max_processes, 1000);
        assert!(s.regions.is_none() && s.auth.is_open());
        assert!(s.rate_limit.default.is_none() && s.rate_limit.apps.is_empty());
        assert!(s.tls.is_none() && s.metrics_listen.is_none());
        // The optional lines are valid too.
        let on = EXAMPLE
            .replace("# regions = ", "regions = ")
            .replace("# admin_tokens = ", "admin_tokens = ")
            .replace("# \"my-game\" = ", "\"my-game\" = ")
            .replace("# [rate_limit.apps.my-game]", "[rate_limit.apps.my-game]")
            .replace("# requests_per_second = 5000", "requests_per_second = 5000")
            .replace("# burst = 10000", "burst = 10000");
        let s = Settings::from_toml(&on).unwrap();
        assert_eq!(s.regions.as_ref().map(Vec::len), Some(3));
        assert_eq!((s.auth.admin.len(), s.auth.apps.len()), (1, 1));
        assert_eq!(s.rate_limit.apps.len(), 1);
    }

    #[test]
    fn flags_override_the_file() {
        let file: File =
            toml::from_str("listen = \"0.0.0.0:1\"\n[timeouts]\nidle = \"5s\"").unwrap();
        let args = ServeArgs {
            listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        let s = Settings::merge(file, args).unwrap();
        assert_eq!(s.listen, "127.0.0.1:2");
        assert_eq!(s.idle_timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[timeouts]\nidle = \"soon\"", "timeouts.idle"),
            (
                "[limits]\nmin_processes = 5\nmax_processes = 2",
                "limits.min_processes",
            ),
            (
                "[auth]\nadmin_tokens = [\"hunter2\"]",
                "auth.admin_tokens[0]",
            ),
            ("[auth.apps]\ngame = [\"sha256:00\"]", "auth.apps.game[0]"),
            (
                "[rate_limit]\nrequests_per_second = -1",
                "rate_limit.requests_per_second",
            ),
            (
                "[rate_limit]\nrequests_per_second = 1e-30",
                "rate_limit.requests_per_second",
            ),
            ("[timeouts]\nstart = \"500000000000y\"", "timeouts.start"),
            ("[auth.apps]\n\"bad app!\" = []", "auth.apps"),
            (
                "[rate_limit.apps.g]\nrequests_per_second = 5\nburst = 0",
                "rate_limit.apps.g.burst",
            ),
            (
                "[tls]\ncert_file = \"/nonexistent.pem\"\nkey_file = \"/k.pem\"",
                "tls.cert_file",
            ),
            ("regions = []", "regions"),
            ("regions = [\"A\", \"A\"]", "regions"),
            ("[limits]\nmax_message_size = 10", "limits.max_message_size"),
            ("[backend]\nports = \"9-3\"", "backend.ports"),
            ("[backend]\nports = \"1-70000\"", "backend.ports"),
            (
                "listen = \"127.0.0.1:9\"\n[metrics]\nlisten = \"127.0.0.1:9\"",
                "metrics.listen",
            ),
        ] {
            let err = Settings::from_toml(text).unwrap_err().to_string();
            assert!(
                err.contains(key),
                "{text:?} gave {err:?}, which does not name {key}"
            );
        }
        for (text, key) in [
            ("listn = \"x\"", "listn"),
            ("[limits]\nmax_processes = \"many\"", "max_processes"),
            ("[store]\nkind = \"paper\"", "kind"),
        ] {
            let err = Settings::from_toml(text).unwrap_err().to_string();
            assert!(
                err.contains(key),
                "{text:?} gave {err:?}, which does not name {key}"
            );
        }
    }
}
