//! Operating the gRPC service, with real gRPC clients against the real server
//! (`roomsched::server::run`) on an ephemeral port:
//!
//! - auth: bearer tokens (admin and per-app), refused with UNAUTHENTICATED when missing, wrong
//!   or malformed, PERMISSION_DENIED for another app's resources — with one message whether or
//!   not the resource exists — and a refused call changes nothing; connection info is open
//!   unless `connection_info_needs_token`;
//! - TLS: a client trusting the server's CA works (`roomsched::client::Target`), a plaintext
//!   client and a client trusting another CA get no call through (fixtures in
//!   `tests/fixtures/tls`, made by `make.sh`);
//! - rate limits: an app over its burst gets RESOURCE_EXHAUSTED with RetryInfo while another
//!   app is served, and is served again after the retry delay;
//! - metrics: after known operations, `GET /metrics` shows exactly the expected counters,
//!   gauges and histogram counts.

mod common;

use common::{
    deployment_request, expect_error, poll, room_request, TestConfig, TestResult, TestServer,
    DEADLINE,
};
use roomsched::client::{Conn, Target};
use roomsched::grpc::gate::{AuthConfig, Gate, Rate, RateLimitConfig, TokenHash};
use roomsched::grpc::pb;
use roomsched::grpc::pb::app_service_client::AppServiceClient;
use roomsched::grpc::pb::deployment_service_client::DeploymentServiceClient;
use roomsched::grpc::pb::process_service_client::ProcessServiceClient;
use roomsched::grpc::pb::room_service_client::RoomServiceClient;
use roomsched::metrics::Metrics;
use roomsched::server::ServerConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

const ADMIN_TOKEN: &str = "admin-secret-token";
const TOKEN_A: &str = "token-for-app-a";
const TOKEN_B: &str = "token-for-app-b";
const APP_A: &str = "op-app-a";
const APP_B: &str = "op-app-b";
/// An app nobody created and no token names.
const APP_GHOST: &str = "op-app-ghost";
const REGION: &str = "Frankfurt";

/// The generated clients over one connection made by `roomsched::client::Target`.
#[derive(Clone)]
struct Clients {
    rooms: RoomServiceClient<Conn>,
    processes: ProcessServiceClient<Conn>,
    deployments: DeploymentServiceClient<Conn>,
    apps: AppServiceClient<Conn>,
}

impl Clients {
    fn new(conn: Conn) -> Clients {
        Clients {
            rooms: RoomServiceClient::new(conn.clone()),
            processes: ProcessServiceClient::new(conn.clone()),
            deployments: DeploymentServiceClient::new(conn.clone()),
            apps: AppServiceClient::new(conn),
        }
    }

    /// Plaintext clients of the server at `addr` sending `token` (if any) with every call.
    async fn plaintext(addr: SocketAddr, token: Option<&str>) -> TestResult<Clients> {
        let target = Target {
            addr: format!("http://{addr}"),
            ca_file: None,
            token: token.map(str::to_string),
        };
        Ok(Clients::new(target.connect().await?))
    }

    async fn get_room(&self, app_id: &str, room_id: &str) -> Result<pb::Room, Status> {
        let req = pb::GetRoomRequest {
            app_id: app_id.into(),
            room_id: room_id.into(),
        };
        Ok(self.rooms.clone().get_room(req).await?.into_inner())
    }

    async fn destroy_room(&self, app_id: &str, room_id: &str) -> Result<(), Status> {
        let req = pb::DestroyRoomRequest {
            app_id: app_id.into(),
            room_id: room_id.into(),
        };
        self.rooms.clone().destroy_room(req).await?;
        Ok(())
    }

    async fn create_room(
        &self,
        app_id: &str,
        room_id: &str,
    ) -> Result<pb::CreateRoomResponse, Status> {
        let req = pb::CreateRoomRequest {
            room_id: room_id.into(),
            ..room_request(app_id, REGION)
        };
        Ok(self.rooms.clone().create_room(req).await?.into_inner())
    }

    async fn connection_info(
        &self,
        app_id: &str,
        room_id: &str,
    ) -> Result<pb::ConnectionInfo, Status> {
        let req = pb::GetConnectionInfoRequest {
            app_id: app_id.into(),
            room_id: room_id.into(),
        };
        Ok(self
            .rooms
            .clone()
            .get_connection_info(req)
            .await?
            .into_inner())
    }

    /// The first message of WatchConnectionInfo.
    async fn watch_first(&self, app_id: &str, room_id: &str) -> Result<pb::ConnectionInfo, Status> {
        let req = pb::GetConnectionInfoRequest {
            app_id: app_id.into(),
            room_id: room_id.into(),
        };
        let mut stream = self
            .rooms
            .clone()
            .watch_connection_info(req)
            .await?
            .into_inner();
        match tokio::time::timeout(DEADLINE, stream.message()).await {
            Ok(Ok(Some(info))) => Ok(info),
            Ok(Ok(None)) => Err(Status::internal("the watch ended with no message")),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded("no watch message in time")),
        }
    }

    async fn get_process(&self, app_id: &str, process_id: &str) -> Result<pb::Process, Status> {
        let req = pb::GetProcessRequest {
            app_id: app_id.into(),
            process_id: process_id.into(),
        };
        Ok(self.processes.clone().get_process(req).await?.into_inner())
    }

    async fn stop_process(&self, app_id: &str, process_id: &str) -> Result<pb::Process, Status> {
        let req = pb::StopProcessRequest {
            app_id: app_id.into(),
            process_id: process_id.into(),
        };
        Ok(self.processes.clone().stop_process(req).await?.into_inner())
    }

    async fn list_processes(&self, app_id: &str) -> Result<Vec<pb::Process>, Status> {
        let req = pb::ListProcessesRequest {
            app_id: app_id.into(),
            page_size: 1000,
            ..Default::default()
        };
        Ok(self
            .processes
            .clone()
            .list_processes(req)
            .await?
            .into_inner()
            .processes)
    }

    async fn active_rooms(&self, app_id: &str, process_id: &str) -> Result<Vec<pb::Room>, Status> {
        let req = pb::ListRoomsForProcessRequest {
            app_id: app_id.into(),
            process_id: process_id.into(),
            page_size: 1000,
            page_token: String::new(),
        };
        Ok(self
            .rooms
            .clone()
            .list_active_rooms_for_process(req)
            .await?
            .into_inner()
            .rooms)
    }

    async fn list_deployments(&self, app_id: &str) -> Result<Vec<pb::Deployment>, Status> {
        let req = pb::ListDeploymentsRequest {
            app_id: app_id.into(),
        };
        Ok(self
            .deployments
            .clone()
            .list_deployments(req)
            .await?
            .into_inner()
            .deployments)
    }

    async fn create_deployment(&self, app_id: &str, rooms: u32) -> Result<pb::Deployment, Status> {
        Ok(self
            .deployments
            .clone()
            .create_deployment(deployment_request(app_id, rooms))
            .await?
            .into_inner())
    }

    async fn usage(&self, app_id: &str) -> Result<pb::Usage, Status> {
        let req = pb::GetUsageRequest {
            app_id: app_id.into(),
            ..Default::default()
        };
        Ok(self.apps.clone().get_usage(req).await?.into_inner())
    }

    /// What a refused call must not change: each process's id, status and room count.
    async fn snapshot(&self, app_id: &str) -> TestResult<Vec<(String, i32, u32)>> {
        let mut v: Vec<_> = self
            .list_processes(app_id)
            .await?
            .into_iter()
            .map(|p| (p.process_id, p.status, p.rooms_allocated))
            .collect();
        v.sort();
        Ok(v)
    }
}

fn auth_config(connection_info_needs_token: bool) -> AuthConfig {
    AuthConfig {
        admin: vec![TokenHash::of(ADMIN_TOKEN)],
        apps: vec![
            (APP_A.to_string(), TokenHash::of(TOKEN_A)),
            (APP_B.to_string(), TokenHash::of(TOKEN_B)),
        ],
        connection_info_needs_token,
    }
}

fn gated(gate: Gate) -> TestConfig {
    TestConfig {
        server: ServerConfig {
            gate: Arc::new(gate),
            ..ServerConfig::default()
        },
        ..TestConfig::default()
    }
}

/// `msg` with an `authorization` header of exactly `value`.
fn with_authorization<T>(msg: T, value: &str) -> TestResult<Request<T>> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", value.parse()?);
    Ok(req)
}

/// Both calls were refused with PERMISSION_DENIED, with one and the same message once
/// `app_b`'s name is written as `app_a`'s: the answer does not tell whether the resource (or
/// the app) exists.
fn same_denial<T: std::fmt::Debug, U: std::fmt::Debug>(
    what: &str,
    existing: Result<T, Status>,
    missing: Result<U, Status>,
    names: (&str, &str),
) -> TestResult {
    let a = expect_error(existing, Code::PermissionDenied, &[])
        .map_err(|e| format!("{what} (existing): {e}"))?;
    let b = expect_error(missing, Code::PermissionDenied, &[])
        .map_err(|e| format!("{what} (missing): {e}"))?;
    let b_message = b.message().replace(names.1, names.0);
    assert_eq!(
        a.message(),
        b_message,
        "{what}: PERMISSION_DENIED must say the same for an existing and a missing resource"
    );
    Ok(())
}

// ----- auth -----------------------------------------------------------------------------------

#[tokio::test]
async fn tokens_admit_admins_everywhere_and_apps_only_to_their_own_app() -> TestResult {
    let s = TestServer::start_with(gated(Gate::new(
        auth_config(false),
        RateLimitConfig::default(),
        None,
    )))
    .await?;
    let admin = Clients::plaintext(s.addr, Some(ADMIN_TOKEN)).await?;
    let a = Clients::plaintext(s.addr, Some(TOKEN_A)).await?;
    let b = Clients::plaintext(s.addr, Some(TOKEN_B)).await?;
    let wrong = Clients::plaintext(s.addr, Some("not-a-configured-token")).await?;
    let anonymous = Clients::plaintext(s.addr, None).await?;

    // The admin sets up both apps; each has one room on one process.
    for app in [APP_A, APP_B] {
        admin.create_deployment(app, 4).await?;
    }
    let room_a = admin.create_room(APP_A, "room-a").await?;
    let room_b = admin.create_room(APP_B, "room-b").await?;
    s.scheduler
        .get_room(APP_B, "room-b")
        .await
        .map_err(|e| format!("room-b must exist: {e}"))?;
    // Once both processes are RUNNING, nothing but the calls below would change B's processes.
    let running = pb::ProcessStatus::Running as i32;
    let before_b = poll("the processes to be RUNNING", DEADLINE, || async {
        let a = admin.snapshot(APP_A).await?;
        let b = admin.snapshot(APP_B).await?;
        let all_running = a.iter().chain(&b).all(|p| p.1 == running);
        Ok((all_running && a.len() == 1).then_some(b))
    })
    .await?;
    assert_eq!(before_b.len(), 1, "{before_b:?}");

    // No token, and the server's own plaintext clients (no interceptor): UNAUTHENTICATED.
    expect_error(
        anonymous.get_room(APP_B, "room-b").await,
        Code::Unauthenticated,
        &["Bearer"],
    )?;
    expect_error(
        anonymous.create_deployment(APP_A, 2).await,
        Code::Unauthenticated,
        &[],
    )?;
    expect_error(
        anonymous.list_processes(APP_A).await,
        Code::Unauthenticated,
        &[],
    )?;
    expect_error(
        s.get_room(APP_A, "room-a").await,
        Code::Unauthenticated,
        &[],
    )?;

    // A token nobody configured: UNAUTHENTICATED, never PERMISSION_DENIED.
    expect_error(
        wrong.get_room(APP_A, "room-a").await,
        Code::Unauthenticated,
        &[],
    )?;
    expect_error(
        wrong.destroy_room(APP_B, "room-b").await,
        Code::Unauthenticated,
        &[],
    )?;
    expect_error(wrong.usage(APP_B).await, Code::Unauthenticated, &[])?;

    // Malformed authorization headers, even around a valid token: UNAUTHENTICATED.
    for header in [
        "Basic x",
        &format!("Basic {TOKEN_A}"),
        TOKEN_A,
        "Bearer",
        &format!("Token {TOKEN_A}"),
    ] {
        let req = with_authorization(
            pb::GetRoomRequest {
                app_id: APP_A.into(),
                room_id: "room-a".into(),
            },
            header,
        )?;
        let result = s.rooms.clone().get_room(req).await;
        expect_error(result, Code::Unauthenticated, &[])
            .map_err(|e| format!("authorization {header:?}: {e}"))?;
    }
    // The scheme is case-insensitive (RFC 7235): the same token with "bearer" is admitted.
    let req = with_authorization(
        pb::GetRoomRequest {
            app_id: APP_A.into(),
            room_id: "room-a".into(),
        },
        &format!("bearer {TOKEN_A}"),
    )?;
    s.rooms.clone().get_room(req).await?;

    // App A's token on app B: PERMISSION_DENIED, saying the same for existing and missing rooms,
    // processes and apps.
    let missing_process = uuid::Uuid::new_v4().to_string();
    let names = (APP_B, APP_B);
    same_denial(
        "GetRoom",
        a.get_room(APP_B, "room-b").await,
        a.get_room(APP_B, "no-such-room").await,
        names,
    )?;
    same_denial(
        "DestroyRoom",
        a.destroy_room(APP_B, "room-b").await,
        a.destroy_room(APP_B, "no-such-room").await,
        names,
    )?;
    same_denial(
        "CreateRoom",
        a.create_room(APP_B, "room-b").await, // the id is taken: ALREADY_EXISTS if admitted
        a.create_room(APP_B, "fresh-room").await,
        names,
    )?;
    same_denial(
        "ListActiveRoomsForProcess",
        a.active_rooms(APP_B, &room_b.process_id).await,
        a.active_rooms(APP_B, &missing_process).await,
        names,
    )?;
    same_denial(
        "StopProcess",
        a.stop_process(APP_B, &room_b.process_id).await,
        a.stop_process(APP_B, &missing_process).await,
        names,
    )?;
    same_denial(
        "GetProcess",
        a.get_process(APP_B, &room_b.process_id).await,
        a.get_process(APP_B, &missing_process).await,
        names,
    )?;
    let ghost = (APP_B, APP_GHOST);
    same_denial(
        "GetRoom (other app)",
        a.get_room(APP_B, "room-b").await,
        a.get_room(APP_GHOST, "room-b").await,
        ghost,
    )?;
    same_denial(
        "ListProcesses",
        a.list_processes(APP_B).await,
        a.list_processes(APP_GHOST).await,
        ghost,
    )?;
    same_denial(
        "ListDeployments",
        a.list_deployments(APP_B).await,
        a.list_deployments(APP_GHOST).await,
        ghost,
    )?;
    same_denial(
        "GetUsage",
        a.usage(APP_B).await,
        a.usage(APP_GHOST).await,
        ghost,
    )?;
    same_denial(
        "CreateDeployment",
        a.create_deployment(APP_B, 2).await,
        a.create_deployment(APP_GHOST, 2).await,
        ghost,
    )?;
    let denied = expect_error(
        a.get_room(APP_B, "room-b").await,
        Code::PermissionDenied,
        &[APP_B],
    )?;
    assert!(
        !denied.message().contains("room-b"),
        "the refusal must not echo the room: {:?}",
        denied.message()
    );
    // And the other way round.
    same_denial(
        "GetRoom (B on A)",
        b.get_room(APP_A, "room-a").await,
        b.get_room(APP_A, "no-such-room").await,
        (APP_A, APP_A),
    )?;
    expect_error(
        b.destroy_room(APP_A, "room-a").await,
        Code::PermissionDenied,
        &[],
    )?;

    // App A's token, naming its own app, on B's room and process: they are not A's.
    expect_error(a.get_room(APP_A, "room-b").await, Code::NotFound, &[])?;
    expect_error(a.destroy_room(APP_A, "room-b").await, Code::NotFound, &[])?;
    expect_error(
        a.connection_info(APP_A, "room-b").await,
        Code::NotFound,
        &[],
    )?;
    expect_error(
        a.active_rooms(APP_A, &room_b.process_id).await,
        Code::NotFound,
        &[],
    )?;
    expect_error(
        a.get_process(APP_A, &room_b.process_id).await,
        Code::NotFound,
        &[],
    )?;
    expect_error(
        a.stop_process(APP_A, &room_b.process_id).await,
        Code::NotFound,
        &[],
    )?;

    // The refused calls changed nothing: room-b is live on the same process, no room was
    // created, no deployment added.
    let room = admin.get_room(APP_B, "room-b").await?;
    assert_ne!(room.status(), pb::RoomStatus::Destroyed, "{room:?}");
    assert_eq!(
        room.current_allocation
            .as_ref()
            .map(|a| a.process_id.as_str()),
        Some(room_b.process_id.as_str())
    );
    assert_eq!(admin.snapshot(APP_B).await?, before_b);
    expect_error(
        admin.get_room(APP_B, "fresh-room").await,
        Code::NotFound,
        &[],
    )?;
    assert_eq!(admin.list_deployments(APP_B).await?.len(), 1);
    match admin.list_deployments(APP_GHOST).await {
        Ok(d) => assert!(d.is_empty(), "a refused CreateDeployment made {d:?}"),
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
    }
    let room = admin.get_room(APP_A, "room-a").await?;
    assert_ne!(room.status(), pb::RoomStatus::Destroyed, "{room:?}");

    // App tokens work on their own app.
    for (clients, app, room) in [(&a, APP_A, &room_a), (&b, APP_B, &room_b)] {
        let own = format!("{app}-own");
        clients.get_room(app, &room.room_id).await?;
        clients.create_room(app, &own).await?;
        assert!(!clients.list_processes(app).await?.is_empty());
        let rooms = clients.active_rooms(app, &room.process_id).await?;
        assert!(rooms.iter().any(|r| r.room_id == room.room_id), "{rooms:?}");
        assert_eq!(clients.list_deployments(app).await?.len(), 1);
        clients.usage(app).await?;
        clients.connection_info(app, &own).await?;
        clients.destroy_room(app, &own).await?;
        expect_error(
            clients.get_room(app, "no-such-room").await,
            Code::NotFound,
            &[],
        )?;
    }

    // The admin token works for everything in both apps.
    for (app, room) in [(APP_A, &room_a), (APP_B, &room_b)] {
        let own = format!("{app}-admin");
        admin.get_room(app, &room.room_id).await?;
        admin.create_room(app, &own).await?;
        assert!(!admin.list_processes(app).await?.is_empty());
        let rooms = admin.active_rooms(app, &room.process_id).await?;
        assert!(rooms.iter().any(|r| r.room_id == room.room_id), "{rooms:?}");
        assert_eq!(admin.list_deployments(app).await?.len(), 1);
        admin.usage(app).await?;
        admin.connection_info(app, &own).await?;
        admin.watch_first(app, &own).await?;
        admin.destroy_room(app, &own).await?;
        let gone = admin.get_room(app, &own).await?;
        assert_eq!(gone.status(), pb::RoomStatus::Destroyed, "{gone:?}");
    }
    admin.create_deployment(APP_B, 2).await?;
    assert_eq!(admin.list_deployments(APP_B).await?.len(), 2);

    // Connection info is open by default: no token, a wrong token, another app's token.
    for clients in [&anonymous, &wrong, &a] {
        let info = clients.connection_info(APP_B, "room-b").await?;
        assert_eq!(info.room_id, "room-b");
        assert_eq!(info.process_id, room_b.process_id);
    }
    let info = anonymous.watch_first(APP_B, "room-b").await?;
    assert_eq!(info.room_id, "room-b");
    let info = s.connection_info(APP_A, "room-a").await?;
    assert_eq!(info.process_id, room_a.process_id);
    // Open is not anonymous bypass of everything else: a missing room is still NOT_FOUND.
    expect_error(
        anonymous.connection_info(APP_B, "no-such-room").await,
        Code::NotFound,
        &[],
    )?;
    Ok(())
}

#[tokio::test]
async fn connection_info_needs_a_token_when_configured() -> TestResult {
    let s = TestServer::start_with(gated(Gate::new(
        auth_config(true),
        RateLimitConfig::default(),
        None,
    )))
    .await?;
    let admin = Clients::plaintext(s.addr, Some(ADMIN_TOKEN)).await?;
    let a = Clients::plaintext(s.addr, Some(TOKEN_A)).await?;
    let wrong = Clients::plaintext(s.addr, Some("not-a-configured-token")).await?;
    let anonymous = Clients::plaintext(s.addr, None).await?;
    for app in [APP_A, APP_B] {
        admin.create_deployment(app, 4).await?;
        admin.create_room(app, "room").await?;
    }

    expect_error(
        anonymous.connection_info(APP_A, "room").await,
        Code::Unauthenticated,
        &[],
    )?;
    expect_error(
        anonymous.watch_first(APP_A, "room").await,
        Code::Unauthenticated,
        &[],
    )?;
    expect_error(
        s.connection_info(APP_A, "room").await,
        Code::Unauthenticated,
        &[],
    )?;
    expect_error(
        wrong.connection_info(APP_A, "room").await,
        Code::Unauthenticated,
        &[],
    )?;
    same_denial(
        "GetConnectionInfo",
        a.connection_info(APP_B, "room").await,
        a.connection_info(APP_B, "no-such-room").await,
        (APP_B, APP_B),
    )?;
    expect_error(
        a.watch_first(APP_B, "room").await,
        Code::PermissionDenied,
        &[],
    )?;

    assert_eq!(a.connection_info(APP_A, "room").await?.room_id, "room");
    assert_eq!(a.watch_first(APP_A, "room").await?.room_id, "room");
    assert_eq!(admin.connection_info(APP_B, "room").await?.room_id, "room");
    assert_eq!(admin.watch_first(APP_B, "room").await?.room_id, "room");
    Ok(())
}

// ----- TLS ------------------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// Watches nothing (the TLS server needs no metrics).
struct NoObserver;

impl roomsched::Observer for NoObserver {}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_no_one_else() -> TestResult {
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(fixture("server.pem"))?,
        std::fs::read(fixture("server-key.pem"))?,
    );
    let cfg = TestConfig {
        server: ServerConfig {
            tls: Some(identity),
            ..ServerConfig::default()
        },
        ..TestConfig::default()
    };
    let s = TestServer::start_observed(cfg, Arc::new(NoObserver)).await?;
    let port = s.addr.port();
    let app = "tls-app";

    // The right CA, by name and by IP address (both are in the certificate).
    for host in ["localhost", "127.0.0.1"] {
        let target = Target {
            addr: format!("https://{host}:{port}"),
            ca_file: Some(fixture("ca.pem")),
            token: None,
        };
        let conn = tokio::time::timeout(DEADLINE, target.connect())
            .await
            .map_err(|_| format!("TLS connect to {host} timed out"))??;
        let c = Clients::new(conn);
        c.create_deployment(app, 4).await?;
        let room = c
            .create_room(app, &format!("room-{}", host.replace('.', "-")))
            .await?;
        assert_eq!(c.get_room(app, &room.room_id).await?.room_id, room.room_id);
    }

    // Plaintext against the TLS port: no call gets through, and nothing is created.
    let plain = Target {
        addr: format!("http://127.0.0.1:{port}"),
        ca_file: None,
        token: None,
    };
    let plain_outcome = match tokio::time::timeout(DEADLINE, plain.connect()).await {
        Err(_) => "connect timed out".to_string(),
        Ok(Err(e)) => format!("connect failed: {e}"),
        Ok(Ok(conn)) => {
            let c = Clients::new(conn);
            match tokio::time::timeout(DEADLINE, c.create_deployment("tls-plain", 4)).await {
                Err(_) => "call timed out".to_string(),
                Ok(Err(status)) => format!("call failed: {status}"),
                Ok(Ok(d)) => {
                    return Err(format!("a plaintext call succeeded over TLS: {d:?}").into())
                }
            }
        }
    };
    eprintln!("plaintext client: {plain_outcome}");

    // A client trusting an unrelated CA refuses the server's certificate.
    let other = Target {
        addr: format!("https://localhost:{port}"),
        ca_file: Some(fixture("other-ca.pem")),
        token: None,
    };
    match tokio::time::timeout(DEADLINE, other.connect()).await {
        Err(_) => return Err("connect with the other CA timed out (expected a refusal)".into()),
        Ok(Err(e)) => {
            let text = format!("{e:?}");
            assert!(
                text.contains("InvalidCertificate") || text.contains("UnknownIssuer"),
                "the failure should be the untrusted certificate: {text}"
            );
        }
        Ok(Ok(conn)) => {
            let c = Clients::new(conn);
            let result = tokio::time::timeout(DEADLINE, c.create_deployment("tls-other", 4)).await;
            assert!(
                !matches!(result, Ok(Ok(_))),
                "a client trusting another CA made a call: {result:?}"
            );
        }
    }

    // The server still serves trusting clients, and neither refused client created anything.
    let good = Clients::new(
        Target {
            addr: format!("https://localhost:{port}"),
            ca_file: Some(fixture("ca.pem")),
            token: None,
        }
        .connect()
        .await?,
    );
    assert!(good.list_deployments("tls-plain").await?.is_empty());
    assert!(good.list_deployments("tls-other").await?.is_empty());
    assert_eq!(good.list_deployments(app).await?.len(), 2);
    Ok(())
}

// ----- rate limits ----------------------------------------------------------------------------

#[tokio::test]
async fn an_app_over_its_rate_limit_is_told_when_to_retry_and_other_apps_are_served() -> TestResult
{
    const BURST: u32 = 5;
    const PER_SECOND: f64 = 0.5;
    let rates = RateLimitConfig {
        // B (and any other app) has its own, larger bucket.
        default: Some(Rate {
            per_second: PER_SECOND,
            burst: 20,
        }),
        apps: HashMap::from([(
            APP_A.to_string(),
            Rate {
                per_second: PER_SECOND,
                burst: BURST,
            },
        )]),
    };
    let s = TestServer::start_with(gated(Gate::new(AuthConfig::default(), rates, None))).await?;
    let c = Clients::plaintext(s.addr, None).await?;

    // The burst: five calls at once are served.
    c.create_deployment(APP_A, 4).await?;
    for i in 1..BURST {
        let d = c
            .list_deployments(APP_A)
            .await
            .map_err(|e| format!("call {} of the burst: {e}", i + 1))?;
        assert_eq!(d.len(), 1);
    }

    // The sixth: RESOURCE_EXHAUSTED with RetryInfo, and the room is not created.
    let refused = expect_error(
        c.create_room(APP_A, "limited").await,
        Code::ResourceExhausted,
        &[APP_A],
    )?;
    let retry = refused
        .get_details_retry_info()
        .ok_or("RESOURCE_EXHAUSTED without RetryInfo")?
        .retry_delay
        .ok_or("RetryInfo without retry_delay")?;
    assert!(retry > Duration::ZERO, "{retry:?}");
    assert!(
        retry <= Duration::from_secs_f64(1.0 / PER_SECOND),
        "one request is due within 1/rate: {retry:?}"
    );

    // At the same moment app B is served, from its own bucket.
    c.create_deployment(APP_B, 4).await?;
    c.create_room(APP_B, "unlimited").await?;
    assert_eq!(c.list_deployments(APP_B).await?.len(), 1);
    // A is still refused (a refused call does not make room for the next).
    expect_error(
        c.list_deployments(APP_A).await,
        Code::ResourceExhausted,
        &[],
    )?;

    // After the retry delay A is served again — once, then refused again.
    tokio::time::sleep(retry).await;
    assert_eq!(c.list_deployments(APP_A).await?.len(), 1);
    expect_error(
        c.list_deployments(APP_A).await,
        Code::ResourceExhausted,
        &[],
    )?;

    // The refused CreateRoom changed nothing (read through the library, past the gate).
    assert!(s.scheduler.get_room(APP_A, "limited").await.is_err());
    assert!(s.scheduler.get_room(APP_B, "unlimited").await.is_ok());
    Ok(())
}

// ----- metrics --------------------------------------------------------------------------------

/// A minimal HTTP/1.1 GET: the status code, the content type and the body.
async fn http_get(addr: SocketAddr, path: &str) -> TestResult<(u16, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| format!("bad status line {status_line:?}"))?
        .parse()?;
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)?
    } else {
        body.to_string()
    };
    let content_type = headers.get("content-type").cloned().unwrap_or_default();
    Ok((code, content_type, body))
}

fn dechunk(mut rest: &str) -> TestResult<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or("bad chunk")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).ok_or("short chunk")?);
        rest = after.get(size + 2..).ok_or("short chunk")?;
    }
}

#[tokio::test]
async fn metrics_count_requests_placements_rooms_processes_and_latencies() -> TestResult {
    let app = "metrics-app";
    let metrics = Arc::new(Metrics::new());
    let cfg = TestConfig::default().start_delay(Duration::from_millis(50));
    let cfg = TestConfig {
        server: ServerConfig {
            gate: Arc::new(Gate::new(
                AuthConfig::default(),
                RateLimitConfig::default(),
                Some(Arc::clone(&metrics)),
            )),
            ..ServerConfig::default()
        },
        ..cfg
    };
    let s = TestServer::start_observed(cfg, metrics.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let metrics_addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(roomsched::metrics::serve(
        listener,
        Arc::clone(&metrics),
        s.scheduler.clone(),
        async move {
            let _ = stopped.await;
        },
    ));

    // 1 deployment, 3 rooms on 2 processes (2 rooms each), 1 destroyed, 1 unknown room read.
    s.create_deployment(app, 2).await?;
    let mut rooms = Vec::new();
    for _ in 0..3 {
        rooms.push(s.create_room(app, REGION).await?);
    }
    let processes: std::collections::BTreeSet<_> =
        rooms.iter().map(|r| r.process_id.clone()).collect();
    assert_eq!(processes.len(), 2, "{rooms:?}");
    s.destroy_room(app, &rooms[2].room_id).await?;
    expect_error(s.get_room(app, "no-such-room").await, Code::NotFound, &[])?;
    for p in &processes {
        s.wait_running(app, p).await?;
    }

    let (code, content_type, body) = http_get(metrics_addr, "/metrics").await?;
    assert_eq!(code, 200, "{body}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "content type {content_type:?}"
    );
    let region = format!("app=\"{app}\",region=\"{REGION}\"");
    for line in [
        "roomsched_requests_total{method=\"CreateDeployment\",code=\"OK\"} 1".to_string(),
        "roomsched_requests_total{method=\"CreateRoom\",code=\"OK\"} 3".to_string(),
        "roomsched_requests_total{method=\"DestroyRoom\",code=\"OK\"} 1".to_string(),
        "roomsched_requests_total{method=\"GetRoom\",code=\"NOT_FOUND\"} 1".to_string(),
        format!("roomsched_placements_total{{{region}}} 3"),
        format!("roomsched_live_rooms{{{region}}} 2"),
        format!("roomsched_processes{{{region},status=\"RUNNING\"}} 2"),
        format!("roomsched_processes{{{region},status=\"STARTING\"}} 0"),
        "roomsched_placement_latency_seconds_count 3".to_string(),
        "roomsched_process_start_duration_seconds_count 2".to_string(),
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing line {line:?} in:\n{body}"
        );
    }
    assert!(
        !body.contains("method=\"GetRoom\",code=\"OK\""),
        "no GetRoom succeeded:\n{body}"
    );
    assert_eq!(body.lines().last(), Some("# EOF"), "{body}");

    // Another room: the counters move on the next scrape.
    s.create_room(app, REGION).await?;
    let (_, _, body) = http_get(metrics_addr, "/metrics").await?;
    for line in [
        "roomsched_requests_total{method=\"CreateRoom\",code=\"OK\"} 4".to_string(),
        format!("roomsched_placements_total{{{region}}} 4"),
        format!("roomsched_live_rooms{{{region}}} 3"),
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing line {line:?} in:\n{body}"
        );
    }
    let (code, _, _) = http_get(metrics_addr, "/nothing-here").await?;
    assert_eq!(code, 404);

    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, served).await???;
    Ok(())
}
