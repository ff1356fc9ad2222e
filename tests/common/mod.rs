//! Shared by the gRPC integration tests: starts the real server (`roomsched::server::run`) on
//! `127.0.0.1:0` with a simulated backend and a oneshot shutdown, and connects the generated
//! clients over one channel. Each test binary uses only part of it, hence `dead_code`.
#![allow(dead_code)]

use roomsched::backend::{Backend, Simulated, SimulatedConfig};
use roomsched::grpc::pb;
use roomsched::grpc::pb::app_service_client::AppServiceClient;
use roomsched::grpc::pb::deployment_service_client::DeploymentServiceClient;
use roomsched::grpc::pb::process_service_client::ProcessServiceClient;
use roomsched::grpc::pb::room_service_client::RoomServiceClient;
use roomsched::server::{ServerConfig, ServerError};
use roomsched::Scheduler;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub(crate) type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// How long a poll waits for something that should happen "soon" before the test fails.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// How the test server is set up.
#[derive(Debug, Clone)]
pub(crate) struct TestConfig {
    pub(crate) regions: Vec<String>,
    pub(crate) sim: SimulatedConfig,
    pub(crate) max_processes: u32,
    pub(crate) start_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) stop_grace: Duration,
    pub(crate) server: ServerConfig,
}

impl Default for TestConfig {
    fn default() -> Self {
        TestConfig {
            regions: vec!["Frankfurt".into(), "Tokyo".into(), "Sydney".into()],
            sim: SimulatedConfig::default(),
            max_processes: 1000,
            start_timeout: Duration::from_secs(100),
            idle_timeout: Duration::from_secs(300),
            stop_grace: Duration::from_secs(10),
            server: ServerConfig::default(),
        }
    }
}

impl TestConfig {
    pub(crate) fn regions(mut self, regions: &[&str]) -> Self {
        self.regions = regions.iter().map(|r| r.to_string()).collect();
        self
    }

    pub(crate) fn start_delay(mut self, d: Duration) -> Self {
        self.sim.start_delay = d;
        self
    }

    pub(crate) fn max_processes(mut self, n: u32) -> Self {
        self.max_processes = n;
        self
    }

    pub(crate) fn start_timeout(mut self, d: Duration) -> Self {
        self.start_timeout = d;
        self
    }

    pub(crate) fn never_ready(mut self) -> Self {
        self.sim.never_ready_ratio = 1.0;
        self
    }

    pub(crate) fn max_message_size(mut self, n: usize) -> Self {
        self.server.max_message_size = n;
        self
    }
}

/// A running roomsched server and clients connected to it.
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) channel: Channel,
    pub(crate) rooms: RoomServiceClient<Channel>,
    pub(crate) processes: ProcessServiceClient<Channel>,
    pub(crate) deployments: DeploymentServiceClient<Channel>,
    pub(crate) apps: AppServiceClient<Channel>,
    /// A clone of the scheduler the server runs (shares its state).
    pub(crate) scheduler: Scheduler,
    /// The simulated backend the scheduler uses.
    pub(crate) sim: Arc<Simulated>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub(crate) async fn start() -> TestResult<TestServer> {
        Self::start_with(TestConfig::default()).await
    }

    pub(crate) async fn start_with(cfg: TestConfig) -> TestResult<TestServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sim = Arc::new(Simulated::new(cfg.sim.clone()));
        let backend: Arc<dyn Backend> = sim.clone();
        let scheduler = Scheduler::builder()
            .regions(cfg.regions.clone())
            .backend_arc(backend)
            .max_processes(cfg.max_processes)
            .start_timeout(cfg.start_timeout)
            .idle_timeout(cfg.idle_timeout)
            .stop_grace(cfg.stop_grace)
            .build()?;
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(roomsched::server::run(
            listener,
            scheduler.clone(),
            cfg.server.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        Ok(TestServer {
            addr,
            rooms: RoomServiceClient::new(channel.clone()),
            processes: ProcessServiceClient::new(channel.clone()),
            deployments: DeploymentServiceClient::new(channel.clone()),
            apps: AppServiceClient::new(channel.clone()),
            channel,
            scheduler,
            sim,
            shutdown: Some(tx),
            server: Some(server),
        })
    }

    /// Completes the server's shutdown future (the server then stops gracefully).
    pub(crate) fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (bounded) for `server::run` to return after [`Self::signal_shutdown`].
    pub(crate) async fn join(&mut self, within: Duration) -> TestResult {
        let handle = self.server.take().ok_or("server already joined")?;
        tokio::time::timeout(within, handle)
            .await
            .map_err(|_| format!("the server did not stop within {within:?}"))???;
        Ok(())
    }

    // ----- deployments ---------------------------------------------------------------------

    /// A deployment with `rooms_per_process` and otherwise plain settings.
    pub(crate) async fn create_deployment(
        &self,
        app_id: &str,
        rooms_per_process: u32,
    ) -> TestResult<pb::Deployment> {
        self.create_deployment_with(deployment_request(app_id, rooms_per_process))
            .await
    }

    pub(crate) async fn create_deployment_with(
        &self,
        req: pb::CreateDeploymentRequest,
    ) -> TestResult<pb::Deployment> {
        Ok(self
            .deployments
            .clone()
            .create_deployment(req)
            .await?
            .into_inner())
    }

    pub(crate) async fn list_deployments(&self, app_id: &str) -> TestResult<Vec<pb::Deployment>> {
        Ok(self
            .deployments
            .clone()
            .list_deployments(pb::ListDeploymentsRequest {
                app_id: app_id.into(),
            })
            .await?
            .into_inner()
            .deployments)
    }

    // ----- rooms -----------------------------------------------------------------------------

    pub(crate) async fn create_room(
        &self,
        app_id: &str,
        region: &str,
    ) -> TestResult<pb::CreateRoomResponse> {
        self.create_room_with(room_request(app_id, region)).await
    }

    pub(crate) async fn create_room_with(
        &self,
        req: pb::CreateRoomRequest,
    ) -> TestResult<pb::CreateRoomResponse> {
        Ok(self.rooms.clone().create_room(req).await?.into_inner())
    }

    pub(crate) async fn get_room(&self, app_id: &str, room_id: &str) -> Result<pb::Room, Status> {
        Ok(self
            .rooms
            .clone()
            .get_room(pb::GetRoomRequest {
                app_id: app_id.into(),
                room_id: room_id.into(),
            })
            .await?
            .into_inner())
    }

    pub(crate) async fn destroy_room(&self, app_id: &str, room_id: &str) -> Result<(), Status> {
        self.rooms
            .clone()
            .destroy_room(pb::DestroyRoomRequest {
                app_id: app_id.into(),
                room_id: room_id.into(),
            })
            .await?;
        Ok(())
    }

    pub(crate) async fn connection_info(
        &self,
        app_id: &str,
        room_id: &str,
    ) -> Result<pb::ConnectionInfo, Status> {
        Ok(self
            .rooms
            .clone()
            .get_connection_info(pb::GetConnectionInfoRequest {
                app_id: app_id.into(),
                room_id: room_id.into(),
            })
            .await?
            .into_inner())
    }

    pub(crate) async fn active_rooms(
        &self,
        app_id: &str,
        process_id: &str,
    ) -> TestResult<Vec<pb::Room>> {
        self.rooms_of(app_id, process_id, false).await
    }

    pub(crate) async fn inactive_rooms(
        &self,
        app_id: &str,
        process_id: &str,
    ) -> TestResult<Vec<pb::Room>> {
        self.rooms_of(app_id, process_id, true).await
    }

    /// Every page of ListActive/InactiveRoomsForProcess, as a client of a process with many
    /// rooms must read them.
    async fn rooms_of(
        &self,
        app_id: &str,
        process_id: &str,
        inactive: bool,
    ) -> TestResult<Vec<pb::Room>> {
        let mut client = self.rooms.clone();
        let mut rooms = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = pb::ListRoomsForProcessRequest {
                app_id: app_id.into(),
                process_id: process_id.into(),
                page_size: 1000,
                page_token,
            };
            let page = if inactive {
                client.list_inactive_rooms_for_process(req).await?
            } else {
                client.list_active_rooms_for_process(req).await?
            }
            .into_inner();
            rooms.extend(page.rooms);
            if page.next_page_token.is_empty() {
                return Ok(rooms);
            }
            page_token = page.next_page_token;
        }
    }

    // ----- processes -------------------------------------------------------------------------

    pub(crate) async fn get_process(
        &self,
        app_id: &str,
        process_id: &str,
    ) -> Result<pb::Process, Status> {
        Ok(self
            .processes
            .clone()
            .get_process(pb::GetProcessRequest {
                app_id: app_id.into(),
                process_id: process_id.into(),
            })
            .await?
            .into_inner())
    }

    pub(crate) async fn create_process(
        &self,
        app_id: &str,
        region: &str,
    ) -> TestResult<pb::Process> {
        Ok(self
            .processes
            .clone()
            .create_process(pb::CreateProcessRequest {
                app_id: app_id.into(),
                region: region.into(),
                deployment_id: 0,
            })
            .await?
            .into_inner())
    }

    pub(crate) async fn count_processes(&self, app_id: &str) -> TestResult<u64> {
        self.count_processes_where(app_id, &[], &[]).await
    }

    pub(crate) async fn count_processes_where(
        &self,
        app_id: &str,
        statuses: &[pb::ProcessStatus],
        regions: &[&str],
    ) -> TestResult<u64> {
        Ok(self
            .processes
            .clone()
            .count_processes(pb::CountProcessesRequest {
                app_id: app_id.into(),
                statuses: statuses.iter().map(|s| *s as i32).collect(),
                regions: regions.iter().map(|r| r.to_string()).collect(),
            })
            .await?
            .into_inner()
            .count)
    }

    /// Every process of the app (all pages), newest first.
    pub(crate) async fn all_processes(&self, app_id: &str) -> TestResult<Vec<pb::Process>> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .processes
                .clone()
                .list_processes(pb::ListProcessesRequest {
                    app_id: app_id.into(),
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.extend(page.processes);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = page.next_page_token;
        }
    }

    /// What a refused request must not change: each process's id, status and room count,
    /// sorted by id.
    pub(crate) async fn snapshot(&self, app_id: &str) -> TestResult<Vec<(String, i32, u32)>> {
        let mut v: Vec<_> = self
            .all_processes(app_id)
            .await?
            .into_iter()
            .map(|p| (p.process_id, p.status, p.rooms_allocated))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Polls GetProcess until the process has `status` (bounded by `within`).
    pub(crate) async fn wait_status(
        &self,
        app_id: &str,
        process_id: &str,
        status: pb::ProcessStatus,
        within: Duration,
    ) -> TestResult<pb::Process> {
        let what = format!("process {process_id} to be {}", status.as_str_name());
        poll(&what, within, || async {
            let p = self.get_process(app_id, process_id).await?;
            Ok((p.status() == status).then_some(p))
        })
        .await
    }

    /// Polls GetProcess until the process is RUNNING.
    pub(crate) async fn wait_running(
        &self,
        app_id: &str,
        process_id: &str,
    ) -> TestResult<pb::Process> {
        self.wait_status(app_id, process_id, pb::ProcessStatus::Running, DEADLINE)
            .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.signal_shutdown();
    }
}

/// Calls `check` until it returns `Some`, at most until `within` has passed.
pub(crate) async fn poll<T, F, Fut>(what: &str, within: Duration, mut check: F) -> TestResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = TestResult<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("timed out after {within:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plain deployment request: TCP on 7777, nothing else.
pub(crate) fn deployment_request(
    app_id: &str,
    rooms_per_process: u32,
) -> pb::CreateDeploymentRequest {
    pb::CreateDeploymentRequest {
        app_id: app_id.into(),
        rooms_per_process,
        transport_type: pb::TransportType::Tcp as i32,
        container_port: 7777,
        ..Default::default()
    }
}

pub(crate) fn room_request(app_id: &str, region: &str) -> pb::CreateRoomRequest {
    pb::CreateRoomRequest {
        app_id: app_id.into(),
        region: region.into(),
        ..Default::default()
    }
}

/// Checks that `result` failed with `code` and that its message mentions every one of `names`.
pub(crate) fn expect_error<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    names: &[&str],
) -> TestResult<Status> {
    let status = match result {
        Ok(v) => return Err(format!("expected {code:?} naming {names:?}, got Ok({v:?})").into()),
        Err(s) => s,
    };
    if status.code() != code {
        return Err(format!(
            "expected {code:?} naming {names:?}, got {:?}: {}",
            status.code(),
            status.message()
        )
        .into());
    }
    for name in names {
        if !status.message().contains(name) {
            return Err(format!(
                "the {code:?} message should name {name:?}: {:?}",
                status.message()
            )
            .into());
        }
    }
    Ok(status)
}

impl TestServer {
    /// Like [`TestServer::start_with`], with `observer` watching the scheduler (e.g. the
    /// `Metrics` the server's gate also counts requests in). The channel is lazy: it connects
    /// at its first call, and a server with `cfg.server.tls` set is started without any
    /// plaintext connection (reach it with `roomsched::client::Target` instead).
    pub(crate) async fn start_observed(
        cfg: TestConfig,
        observer: Arc<dyn roomsched::Observer>,
    ) -> TestResult<TestServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sim = Arc::new(Simulated::new(cfg.sim.clone()));
        let backend: Arc<dyn Backend> = sim.clone();
        let scheduler = Scheduler::builder()
            .regions(cfg.regions.clone())
            .backend_arc(backend)
            .max_processes(cfg.max_processes)
            .start_timeout(cfg.start_timeout)
            .idle_timeout(cfg.idle_timeout)
            .stop_grace(cfg.stop_grace)
            .observer(observer)
            .build()?;
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(roomsched::server::run(
            listener,
            scheduler.clone(),
            cfg.server.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
        Ok(TestServer {
            addr,
            rooms: RoomServiceClient::new(channel.clone()),
            processes: ProcessServiceClient::new(channel.clone()),
            deployments: DeploymentServiceClient::new(channel.clone()),
            apps: AppServiceClient::new(channel.clone()),
            channel,
            scheduler,
            sim,
            shutdown: Some(tx),
            server: Some(server),
        })
    }
}
