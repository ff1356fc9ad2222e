//! Crash safety of `roomsched serve` with the durable store (SPEC §9), through the real binary:
//! kill -9 in the middle of a concurrent CreateRoom/DestroyRoom load (and StopProcess calls),
//! restart on the same data directory, and check that
//!
//! - every acknowledged CreateRoom not acknowledged-destroyed is back, live, on the process the
//!   call answered, in the region asked for (unless its process was stopped on request);
//! - every acknowledged DestroyRoom is DESTROYED;
//! - a call that failed or was in flight at the kill is all or nothing: the room either fully
//!   exists (listed on its process, counted in `rooms_allocated`, in the right region, with its
//!   config) or does not exist at all; retrying it after the restart is a safe retry;
//! - every process: `rooms_allocated` == the rooms ListActiveRoomsForProcess returns
//!   ≤ `rooms_per_process`; no live room on a STOPPING/STOPPED/FAILED process; an acknowledged
//!   StopProcess is never undone; the deployment is exactly as it was;
//! - the server still places and destroys rooms, and neither run logged a panic or an ERROR.
//!
//! Two tests: 20 crashes each on a fresh data directory, and repeated crashes (and clean
//! restarts) on one data directory, where everything of the earlier rounds must stay as it was.
//! Each failure message carries the seed (`CRASH_SEED=<n>` reruns the same choices; the timing,
//! and so the outcome of the race, differs).

mod serve;

use serve::TempDir;

use pb::deployment_service_client::DeploymentServiceClient;
use pb::process_service_client::ProcessServiceClient;
use pb::room_service_client::RoomServiceClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roomsched::grpc::pb;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

const REGIONS: [&str; 3] = ["A", "B", "C"];
const APP: &str = "crash-game";
const ROOMS_PER_PROCESS: u32 = 4;
/// Concurrent clients issuing CreateRoom/DestroyRoom.
const WORKERS: usize = 32;
/// gRPC connections the workers share.
const CHANNELS: usize = 4;
/// The load runs this long (uniformly chosen) before roomsched is killed.
const KILL_AFTER_MS: std::ops::RangeInclusive<u64> = 100..=600;
/// A single gRPC call taking longer than this counts as failed (the test never hangs).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to start (and recover), or processes to settle.
const DEADLINE: Duration = Duration::from_secs(30);

// ----- the real binary ------------------------------------------------------------------------

/// A `roomsched serve` child (simulated backend, default store); killed when dropped.
struct Server {
    child: std::process::Child,
    addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Set once the stderr reader has seen the end of the pipe.
    stderr_done: Arc<AtomicBool>,
}

impl Server {
    /// Starts `roomsched serve` on `data_dir` with no `--store` flag: the durable store must be
    /// the default.
    fn spawn(data_dir: &Path) -> Server {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_roomsched"));
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--regions",
                "A,B,C",
                "--sim-start-delay",
                "20ms",
                "--data-dir",
            ])
            .arg(data_dir)
            .env("ROOMSCHED_LOG", "info")
            .env_remove("ROOMSCHED_STORE")
            .env_remove("ROOMSCHED_BACKEND");
        let serve::Spawned {
            child,
            addr,
            stderr: lines,
            stderr_done: done,
        } = serve::spawn(command, DEADLINE);
        Server {
            child,
            addr,
            stderr: lines,
            stderr_done: done,
        }
    }

    /// SIGKILL, and reap it.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.wait_stderr();
    }

    /// SIGTERM; returns how it exited.
    async fn sigterm(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                self.wait_stderr();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "roomsched serve did not exit after SIGTERM; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn wait_stderr(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.stderr_done.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Lines of its log that show a bug: a panic, or anything logged at ERROR.
    fn problems(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("panicked") || l.contains(" ERROR "))
            .cloned()
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ----- gRPC clients ---------------------------------------------------------------------------

#[derive(Clone)]
struct Clients {
    rooms: RoomServiceClient<Channel>,
    processes: ProcessServiceClient<Channel>,
    deployments: DeploymentServiceClient<Channel>,
}

async fn connect(addr: &str) -> Clients {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to roomsched at {addr}: {e}"));
    Clients {
        rooms: RoomServiceClient::new(channel.clone()),
        processes: ProcessServiceClient::new(channel.clone()),
        deployments: DeploymentServiceClient::new(channel),
    }
}

/// One call, bounded by [`CALL_TIMEOUT`].
async fn call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(
            "no answer within the test's call timeout",
        )),
    }
}

fn status_text(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn room_request(room_id: &str, region: &str, config: &str) -> pb::CreateRoomRequest {
    pb::CreateRoomRequest {
        app_id: APP.into(),
        region: region.into(),
        room_config: config.into(),
        room_id: room_id.into(),
        deployment_id: 0,
    }
}

async fn get_room(c: &Clients, room_id: &str) -> Result<pb::Room, Status> {
    call(c.rooms.clone().get_room(pb::GetRoomRequest {
        app_id: APP.into(),
        room_id: room_id.into(),
    }))
    .await
}

/// GetRoom for many rooms, over several concurrent tasks.
async fn get_rooms(c: &Clients, ids: Vec<String>) -> HashMap<String, Result<pb::Room, Status>> {
    let chunk = ids.len().div_ceil(16).max(1);
    let mut tasks = Vec::new();
    for part in ids.chunks(chunk) {
        let (c, part) = (c.clone(), part.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for id in part {
                let r = get_room(&c, &id).await;
                out.push((id, r));
            }
            out
        }));
    }
    let mut all = HashMap::new();
    for t in tasks {
        all.extend(t.await.expect("GetRoom task"));
    }
    all
}

async fn all_processes(c: &Clients) -> Result<Vec<pb::Process>, Status> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = call(
            c.processes
                .clone()
                .list_processes(pb::ListProcessesRequest {
                    app_id: APP.into(),
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                }),
        )
        .await?;
        out.extend(page.processes);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

async fn active_rooms(c: &Clients, process_id: &str) -> Result<Vec<pb::Room>, Status> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = call(c.rooms.clone().list_active_rooms_for_process(
            pb::ListRoomsForProcessRequest {
                app_id: APP.into(),
                process_id: process_id.into(),
                page_size: 1000,
                page_token,
            },
        ))
        .await?;
        out.extend(page.rooms);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

fn process_is_live(s: pb::ProcessStatus) -> bool {
    matches!(
        s,
        pb::ProcessStatus::Starting | pb::ProcessStatus::Running | pb::ProcessStatus::Draining
    )
}

fn room_is_live(r: &pb::Room) -> bool {
    matches!(
        r.status(),
        pb::RoomStatus::Scheduling | pb::RoomStatus::Active
    )
}

// ----- the load ----------------------------------------------------------------------------------

/// What the clients do during a round.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// Send every CreateRoom twice at once (a safe retry racing the original).
    duplicate_creates: bool,
    /// Send every DestroyRoom twice at once.
    duplicate_destroys: bool,
    /// StopProcess now and then on a process rooms were placed on.
    stops: bool,
    /// A DestroyRoom answered NOT_FOUND must leave the room destroyed after the crash. When
    /// false, such an answer counts as a failed call (either way is accepted, and counted).
    strict_not_found: bool,
}

/// Creates, destroys and stops, as a matchmaker does; every answer must hold after a crash,
/// except that a NOT_FOUND is a failed call.
const PLAIN: Load = Load {
    duplicate_creates: false,
    duplicate_destroys: false,
    stops: true,
    strict_not_found: false,
};

#[derive(Debug, Clone)]
enum CreateOutcome {
    Acked {
        process_id: String,
    },
    /// Failed or in flight at the kill: the room may or may not exist.
    Uncertain(String),
}

#[derive(Debug, Clone)]
struct CreateOp {
    room_id: String,
    region: String,
    config: String,
    /// Sent twice at once (see `worker`).
    duplicated: bool,
    outcome: CreateOutcome,
}

#[derive(Debug, Clone)]
enum DestroyOutcome {
    Acked,
    /// NOT_FOUND: the room was destroyed already (its process was stopped).
    NotFound,
    Uncertain(String),
}

#[derive(Debug, Default)]
struct WorkerLog {
    creates: Vec<CreateOp>,
    destroys: Vec<(String, DestroyOutcome)>,
    /// StopProcess calls: process id → acknowledged.
    stops: Vec<(String, bool)>,
    /// Errors while the server was up: none is expected.
    unexpected: Vec<String>,
}

/// Creates rooms with ids of its own (keeping a few live) and destroys them again, until
/// `killing` is set.
async fn worker(
    load: Load,
    w: usize,
    round: usize,
    seed: u64,
    c: Clients,
    killing: Arc<AtomicBool>,
    seen_processes: Arc<Mutex<Vec<String>>>,
) -> WorkerLog {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = WorkerLog::default();
    let mut live: Vec<String> = Vec::new();
    let mut n = 0;
    while !killing.load(Ordering::SeqCst) {
        let create = live.len() < 2 || (live.len() < 8 && rng.random_bool(0.5));
        if create {
            n += 1;
            let room_id = format!("r{round}-w{w}-{n}");
            let region = REGIONS[rng.random_range(0..REGIONS.len())].to_string();
            let config = format!("{{\"w\":{w},\"n\":{n}}}");
            // Now and then the same CreateRoom twice at once, as a client retrying a call
            // that seems slow does: a safe retry, so both must answer the same placement, and
            // an OK from either acknowledges the room.
            let duplicated = load.duplicate_creates;
            let req = room_request(&room_id, &region, &config);
            let results = if duplicated {
                let (mut first, mut second) = (c.rooms.clone(), c.rooms.clone());
                let (a, b) = tokio::join!(
                    call(first.create_room(req.clone())),
                    call(second.create_room(req))
                );
                vec![a, b]
            } else {
                vec![call(c.rooms.clone().create_room(req)).await]
            };
            let killed = killing.load(Ordering::SeqCst);
            let mut placed: Option<pb::CreateRoomResponse> = None;
            let mut error = None;
            for res in results {
                match res {
                    Ok(p) => {
                        if p.room_id != room_id {
                            log.unexpected.push(format!(
                                "CreateRoom {room_id} answered room_id {:?}",
                                p.room_id
                            ));
                        }
                        if let Some(first) = &placed {
                            if first.process_id != p.process_id {
                                log.unexpected.push(format!(
                                    "CreateRoom {room_id} sent twice: placed on {} and on {}",
                                    first.process_id, p.process_id
                                ));
                            }
                        }
                        placed = Some(p);
                    }
                    Err(s) => {
                        if !killed {
                            log.unexpected
                                .push(format!("CreateRoom {room_id}: {}", status_text(&s)));
                        }
                        error = Some(status_text(&s));
                    }
                }
            }
            let outcome = match (placed, error) {
                (Some(placed), _) => {
                    seen_processes
                        .lock()
                        .unwrap()
                        .push(placed.process_id.clone());
                    live.push(room_id.clone());
                    CreateOutcome::Acked {
                        process_id: placed.process_id,
                    }
                }
                (None, error) => CreateOutcome::Uncertain(error.unwrap_or_default()),
            };
            log.creates.push(CreateOp {
                room_id,
                region,
                config,
                duplicated,
                outcome,
            });
        } else {
            let room_id = live.swap_remove(rng.random_range(0..live.len()));
            let req = pb::DestroyRoomRequest {
                app_id: APP.into(),
                room_id: room_id.clone(),
            };
            let results = if load.duplicate_destroys {
                let (mut first, mut second) = (c.rooms.clone(), c.rooms.clone());
                let (a, b) = tokio::join!(
                    call(first.destroy_room(req.clone())),
                    call(second.destroy_room(req))
                );
                vec![a, b]
            } else {
                vec![call(c.rooms.clone().destroy_room(req)).await]
            };
            let killed = killing.load(Ordering::SeqCst);
            let (mut ok, mut not_found, mut error) = (false, false, None);
            for res in results {
                match res {
                    Ok(_) => ok = true,
                    Err(s) if s.code() == Code::NotFound => not_found = true,
                    Err(s) => {
                        if !killed {
                            log.unexpected
                                .push(format!("DestroyRoom {room_id}: {}", status_text(&s)));
                        }
                        error = Some(status_text(&s));
                    }
                }
            }
            let outcome = if ok {
                DestroyOutcome::Acked
            } else if not_found {
                DestroyOutcome::NotFound
            } else {
                DestroyOutcome::Uncertain(error.unwrap_or_default())
            };
            log.destroys.push((room_id, outcome));
        }
    }
    log
}

/// Every 50-150 ms stops a process some room was placed on, until `killing` is set.
async fn stopper(
    seed: u64,
    c: Clients,
    killing: Arc<AtomicBool>,
    seen_processes: Arc<Mutex<Vec<String>>>,
) -> WorkerLog {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = WorkerLog::default();
    while !killing.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..150))).await;
        let target = {
            let seen = seen_processes.lock().unwrap();
            if seen.is_empty() {
                continue;
            }
            seen[rng.random_range(0..seen.len())].clone()
        };
        let res = call(c.processes.clone().stop_process(pb::StopProcessRequest {
            app_id: APP.into(),
            process_id: target.clone(),
        }))
        .await;
        match res {
            Ok(p) => {
                if !matches!(
                    p.status(),
                    pb::ProcessStatus::Stopping | pb::ProcessStatus::Stopped
                ) {
                    log.unexpected.push(format!(
                        "StopProcess {target} answered status {:?}",
                        p.status()
                    ));
                }
                log.stops.push((target, true));
            }
            Err(s) => {
                if !killing.load(Ordering::SeqCst) {
                    log.unexpected
                        .push(format!("StopProcess {target}: {}", status_text(&s)));
                }
                log.stops.push((target, false));
            }
        }
    }
    log
}

// ----- what must hold after a restart -------------------------------------------------------------

/// What the rooms and processes of earlier rounds must look like.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Live { process_id: String },
    Destroyed,
}

#[derive(Default)]
struct Model {
    deployment: Option<pb::Deployment>,
    /// Every room ever attempted and settled: what it must be now.
    rooms: HashMap<String, Expect>,
    /// The region each room was asked for.
    regions: HashMap<String, String>,
    /// Processes that StopProcess was called for (answered or not), in any round.
    stop_attempted: HashSet<String>,
    /// Processes whose StopProcess was acknowledged.
    stop_acked: HashSet<String>,
    /// Processes seen STOPPED or FAILED: they must stay so.
    terminated: HashSet<String>,
}

/// What the server shows once no process is STARTING or STOPPING.
struct Observed {
    processes: HashMap<String, pb::Process>,
    /// Live room → the process whose active list holds it.
    listed: HashMap<String, String>,
}

/// Waits until no process is STARTING or STOPPING (nothing moves any more: no load, no idle
/// timeout), then reads every process and its active rooms and checks the per-process
/// invariants.
async fn observe(c: &Clients, model: &Model, v: &mut Vec<String>) -> Observed {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let n = call(
            c.processes
                .clone()
                .count_processes(pb::CountProcessesRequest {
                    app_id: APP.into(),
                    statuses: vec![
                        pb::ProcessStatus::Starting as i32,
                        pb::ProcessStatus::Stopping as i32,
                    ],
                    regions: vec![],
                }),
        )
        .await
        .expect("CountProcesses")
        .count;
        if n == 0 {
            break;
        }
        if Instant::now() >= deadline {
            v.push(format!(
                "{n} processes still STARTING or STOPPING {DEADLINE:?} after the restart"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let processes = all_processes(c).await.expect("ListProcesses");
    let mut listed = HashMap::new();
    let mut by_id = HashMap::new();
    for p in processes {
        let pid = p.process_id.clone();
        let status = p.status();
        if p.rooms_per_process != ROOMS_PER_PROCESS {
            v.push(format!(
                "process {pid}: rooms_per_process {}",
                p.rooms_per_process
            ));
        }
        if p.rooms_allocated > p.rooms_per_process {
            v.push(format!(
                "process {pid} ({status:?}): rooms_allocated {} > rooms_per_process {}",
                p.rooms_allocated, p.rooms_per_process
            ));
        }
        if !REGIONS.contains(&p.region.as_str()) || p.deployment_id != 1 || p.app_id != APP {
            v.push(format!(
                "process {pid}: region {:?}, deployment {}, app {:?}",
                p.region, p.deployment_id, p.app_id
            ));
        }
        if !process_is_live(status) && !model.stop_attempted.contains(&pid) {
            v.push(format!(
                "process {pid} is {status:?} ({:?}) though nobody stopped it",
                p.summary_exit_reason
            ));
        }
        if matches!(
            status,
            pb::ProcessStatus::Stopped | pb::ProcessStatus::Failed
        ) && p.terminated_at.is_none()
        {
            v.push(format!("process {pid} is {status:?} without terminated_at"));
        }
        if model.stop_acked.contains(&pid) && process_is_live(status) {
            v.push(format!(
                "process {pid}: StopProcess was acknowledged, yet it is {status:?} again"
            ));
        }
        if model.terminated.contains(&pid)
            && !matches!(
                status,
                pb::ProcessStatus::Stopped | pb::ProcessStatus::Failed
            )
        {
            v.push(format!(
                "process {pid} was STOPPED/FAILED before, now {status:?}"
            ));
        }
        let active = match active_rooms(c, &pid).await {
            Ok(a) => a,
            Err(s) => {
                v.push(format!(
                    "ListActiveRoomsForProcess {pid}: {}",
                    status_text(&s)
                ));
                vec![]
            }
        };
        if p.rooms_allocated as usize != active.len() {
            v.push(format!(
                "process {pid} ({status:?}): rooms_allocated {} but {} active rooms listed",
                p.rooms_allocated,
                active.len()
            ));
        }
        if !process_is_live(status) && !active.is_empty() {
            v.push(format!(
                "process {pid} is {status:?} but holds {} live rooms",
                active.len()
            ));
        }
        for room in active {
            let on = room
                .current_allocation
                .as_ref()
                .map(|a| a.process_id.as_str());
            if on != Some(pid.as_str()) {
                v.push(format!(
                    "room {} is listed on process {pid} but its current allocation is {on:?}",
                    room.room_id
                ));
            }
            let want = match status {
                pb::ProcessStatus::Starting => pb::RoomStatus::Scheduling,
                _ => pb::RoomStatus::Active,
            };
            if room.status() != want {
                v.push(format!(
                    "room {} on {status:?} process {pid} is {:?}",
                    room.room_id,
                    room.status()
                ));
            }
            match model.regions.get(&room.room_id) {
                Some(region) if *region != p.region => v.push(format!(
                    "room {} asked for region {region} is on process {pid} in {}",
                    room.room_id, p.region
                )),
                Some(_) => {}
                None => v.push(format!(
                    "room {} on process {pid} was never asked for",
                    room.room_id
                )),
            }
            if let Some(other) = listed.insert(room.room_id.clone(), pid.clone()) {
                v.push(format!(
                    "room {} is listed on two processes: {other} and {pid}",
                    room.room_id
                ));
            }
        }
        by_id.insert(pid, p);
    }
    Observed {
        processes: by_id,
        listed,
    }
}

/// A room as GetRoom shows it is consistent in itself: a live one has a current allocation
/// equal to its last one, still open; a destroyed one has none, every allocation closed.
fn check_room_shape(room: &pb::Room, v: &mut Vec<String>) {
    let id = &room.room_id;
    let last = room.allocations.last();
    if room_is_live(room) {
        match (&room.current_allocation, last) {
            (Some(cur), Some(last)) if cur == last && cur.unscheduled_at.is_none() => {}
            _ => v.push(format!(
                "live room {id}: current allocation {:?}, allocations {:?}",
                room.current_allocation, room.allocations
            )),
        }
    } else if room.status() == pb::RoomStatus::Destroyed {
        if room.current_allocation.is_some()
            || room.allocations.iter().any(|a| a.unscheduled_at.is_none())
        {
            v.push(format!(
                "destroyed room {id}: current allocation {:?}, allocations {:?}",
                room.current_allocation, room.allocations
            ));
        }
    } else {
        v.push(format!("room {id} has status {:?}", room.status()));
    }
}

/// Checks one round's operations against what the restarted server shows, and settles them
/// into the model.
async fn check_round(
    load: Load,
    c: &Clients,
    model: &mut Model,
    log: &WorkerLog,
    seen: &Observed,
    v: &mut Vec<String>,
    notes: &mut Vec<String>,
) {
    let destroys: HashMap<&str, &DestroyOutcome> = log
        .destroys
        .iter()
        .map(|(id, o)| (id.as_str(), o))
        .collect();
    let ids: Vec<String> = log.creates.iter().map(|op| op.room_id.clone()).collect();
    let rooms = get_rooms(c, ids).await;
    let process_status = |pid: &str| seen.processes.get(pid).map(|p| p.status());
    for op in &log.creates {
        let id = op.room_id.as_str();
        let got = &rooms[id];
        if let Ok(room) = got {
            check_room_shape(room, v);
            if room.room_config != op.config {
                v.push(format!(
                    "room {id}: config {:?}, asked {:?}",
                    room.room_config, op.config
                ));
            }
        }
        let listed_on = seen.listed.get(id);
        match got {
            Ok(room) if room_is_live(room) => {
                let on = room.current_allocation.as_ref().map(|a| &a.process_id);
                if listed_on.is_none() || listed_on != on {
                    v.push(format!(
                        "live room {id} (on {on:?}) is listed on {listed_on:?}: a slot without \
                         a listed room or a room without a slot"
                    ));
                }
            }
            Ok(_) => {
                if let Some(p) = listed_on {
                    v.push(format!("destroyed room {id} is listed on process {p}"));
                }
            }
            Err(s) if s.code() == Code::NotFound => {
                if let Some(p) = listed_on {
                    v.push(format!("room {id} is NOT_FOUND but listed on process {p}"));
                }
            }
            Err(s) => v.push(format!("GetRoom {id}: {}", status_text(s))),
        }
        match &op.outcome {
            CreateOutcome::Acked { process_id } => {
                let stopped = model.stop_attempted.contains(process_id);
                let live_process = process_status(process_id).is_some_and(process_is_live);
                if process_status(process_id).is_none() {
                    v.push(format!(
                        "room {id} was acknowledged on process {process_id}, which is gone"
                    ));
                }
                let room = match got {
                    Ok(room) => room,
                    Err(s) => {
                        v.push(format!(
                            "acknowledged room {id} (on {process_id}, {}) is lost after the \
                             restart: {}",
                            if op.duplicated {
                                "CreateRoom sent twice at once"
                            } else {
                                "CreateRoom sent once"
                            },
                            status_text(s)
                        ));
                        continue;
                    }
                };
                let first = room.allocations.first().map(|a| &a.process_id);
                if first != Some(process_id) || room.allocations.len() != 1 {
                    v.push(format!(
                        "acknowledged room {id} was placed on {process_id}, but its allocations \
                         are {:?}",
                        room.allocations
                    ));
                }
                let live = room_is_live(room);
                match destroys.get(id) {
                    Some(DestroyOutcome::Acked) => {
                        if live {
                            v.push(format!(
                                "room {id}: DestroyRoom was acknowledged, yet it is {:?} after \
                                 the restart",
                                room.status()
                            ));
                        }
                    }
                    Some(DestroyOutcome::NotFound) => {
                        if live {
                            let why = if load.duplicate_destroys {
                                "the other DestroyRoom sent at the same time was cut off by the \
                                 kill"
                                    .to_string()
                            } else {
                                format!(
                                    "StopProcess of its process was {}",
                                    if model.stop_acked.contains(process_id) {
                                        "acknowledged"
                                    } else if stopped {
                                        "called but not answered before the kill"
                                    } else {
                                        "never called"
                                    }
                                )
                            };
                            let text = format!(
                                "room {id}: DestroyRoom answered NOT_FOUND (destroyed already) \
                                 before the kill, yet the room is live after the restart on \
                                 process {process_id} ({:?}); {why}",
                                process_status(process_id)
                            );
                            if load.strict_not_found {
                                v.push(text);
                            } else {
                                notes.push(text);
                            }
                        }
                        if !stopped && !load.duplicate_destroys {
                            v.push(format!(
                                "room {id}: DestroyRoom said NOT_FOUND, but its process \
                                 {process_id} was never stopped"
                            ));
                        }
                    }
                    Some(DestroyOutcome::Uncertain(_)) => {} // either way; checked above
                    None => {
                        if live_process && !live {
                            v.push(format!(
                                "acknowledged room {id} is {:?} after the restart, though its \
                                 process {process_id} is {:?} and nobody destroyed it",
                                room.status(),
                                process_status(process_id)
                            ));
                        }
                        if !live_process && !stopped {
                            v.push(format!(
                                "acknowledged room {id}: its process {process_id} is {:?}, \
                                 though nobody stopped it",
                                process_status(process_id)
                            ));
                        }
                    }
                }
                let expect = if live {
                    Expect::Live {
                        process_id: process_id.clone(),
                    }
                } else {
                    Expect::Destroyed
                };
                model.rooms.insert(id.to_string(), expect);
            }
            CreateOutcome::Uncertain(_) => match got {
                Ok(room) if room_is_live(room) => {
                    let on = room
                        .current_allocation
                        .as_ref()
                        .map(|a| a.process_id.clone())
                        .unwrap_or_default();
                    model
                        .rooms
                        .insert(id.to_string(), Expect::Live { process_id: on });
                }
                Ok(room) => {
                    // Only a stop of its process can have destroyed it: nobody else knew it.
                    let on = room.allocations.last().map(|a| a.process_id.clone());
                    if !on
                        .as_ref()
                        .is_some_and(|p| model.stop_attempted.contains(p))
                    {
                        v.push(format!(
                            "room {id} (CreateRoom unanswered) is DESTROYED, on process {on:?} \
                             that nobody stopped"
                        ));
                    }
                    model.rooms.insert(id.to_string(), Expect::Destroyed);
                }
                Err(_) => {
                    model.rooms.remove(id);
                }
            },
        }
    }
    // Rooms of earlier rounds: live ones are still where they were, unless their process was
    // stopped since; destroyed ones stay destroyed (checked on a sample).
    let round_ids: HashSet<&str> = log.creates.iter().map(|op| op.room_id.as_str()).collect();
    let mut destroyed_sample = Vec::new();
    for (id, expect) in model.rooms.iter_mut() {
        if round_ids.contains(id.as_str()) {
            continue;
        }
        match expect {
            Expect::Live { process_id } => {
                let listed_on = seen.listed.get(id);
                if listed_on == Some(process_id) {
                    continue;
                }
                let live_process = process_status(process_id).is_some_and(process_is_live);
                if !live_process && model.stop_attempted.contains(process_id) {
                    if listed_on.is_some() {
                        v.push(format!(
                            "room {id} of a stopped process is listed on {listed_on:?}"
                        ));
                    }
                    *expect = Expect::Destroyed;
                } else {
                    v.push(format!(
                        "room {id} of an earlier round was live on {process_id}; now listed on \
                         {listed_on:?}"
                    ));
                }
            }
            Expect::Destroyed => {
                if destroyed_sample.len() < 100 {
                    destroyed_sample.push(id.clone());
                }
            }
        }
    }
    for (id, got) in get_rooms(c, destroyed_sample).await {
        match got {
            Ok(room) if room.status() == pb::RoomStatus::Destroyed => {}
            Ok(room) => v.push(format!(
                "room {id}, destroyed in an earlier round, is {:?}",
                room.status()
            )),
            Err(s) => v.push(format!(
                "room {id}, destroyed in an earlier round: GetRoom {}",
                status_text(&s)
            )),
        }
    }
}

/// The rooms the model says are live are exactly the rooms listed, each on its process.
fn check_model_matches(model: &Model, seen: &Observed, v: &mut Vec<String>) {
    for (id, expect) in &model.rooms {
        if let Expect::Live { process_id } = expect {
            if seen.listed.get(id) != Some(process_id) {
                v.push(format!(
                    "room {id} should be live on {process_id}; listed on {:?}",
                    seen.listed.get(id)
                ));
            }
        }
    }
    for (id, pid) in &seen.listed {
        if model.rooms.get(id)
            != Some(&Expect::Live {
                process_id: pid.clone(),
            })
        {
            v.push(format!(
                "room {id} is listed on {pid}; expected {:?}",
                model.rooms.get(id)
            ));
        }
    }
}

/// Retries, after the restart, every CreateRoom that was not answered: a live room is a safe
/// retry (same process), a missing one is created now, a destroyed one is ALREADY_EXISTS.
async fn retry_unanswered(c: &Clients, model: &mut Model, log: &WorkerLog, v: &mut Vec<String>) {
    for op in &log.creates {
        if !matches!(op.outcome, CreateOutcome::Uncertain(_)) {
            continue;
        }
        let id = &op.room_id;
        let res = call(
            c.rooms
                .clone()
                .create_room(room_request(id, &op.region, &op.config)),
        )
        .await;
        match (model.rooms.get(id).cloned(), res) {
            (Some(Expect::Live { process_id }), Ok(placed)) => {
                if placed.process_id != process_id {
                    v.push(format!(
                        "retried CreateRoom {id}: answered process {}, but the room is on \
                         {process_id}",
                        placed.process_id
                    ));
                }
            }
            (None, Ok(placed)) => {
                model.rooms.insert(
                    id.clone(),
                    Expect::Live {
                        process_id: placed.process_id,
                    },
                );
            }
            (Some(Expect::Destroyed), Err(s)) if s.code() == Code::AlreadyExists => {}
            (expect, res) => v.push(format!(
                "retried CreateRoom {id} (room {expect:?}): {:?}",
                res.map(|p| p.process_id).map_err(|s| status_text(&s))
            )),
        }
    }
}

/// How a round ends once it has been checked.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Kill9,
    Sigterm,
}

/// One round: load, kill -9, restart, check. Returns a line for the test's output.
async fn round(
    load: Load,
    dir: &Path,
    round: usize,
    rng: &mut StdRng,
    model: &mut Model,
    ending: Ending,
) -> String {
    let mut v = Vec::new();
    let mut server = Server::spawn(dir);
    let mut clients = Vec::new();
    for _ in 0..CHANNELS {
        clients.push(connect(&server.addr).await);
    }
    let c = clients[0].clone();
    if model.deployment.is_none() {
        let d = call(
            c.deployments
                .clone()
                .create_deployment(pb::CreateDeploymentRequest {
                    app_id: APP.into(),
                    rooms_per_process: ROOMS_PER_PROCESS,
                    transport_type: pb::TransportType::Tcp as i32,
                    container_port: 7777,
                    ..Default::default()
                }),
        )
        .await
        .expect("create deployment");
        model.deployment = Some(d);
    }

    let killing = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        tasks.push(tokio::spawn(worker(
            load,
            w,
            round,
            rng.random(),
            clients[w % CHANNELS].clone(),
            Arc::clone(&killing),
            Arc::clone(&seen),
        )));
    }
    if load.stops {
        tasks.push(tokio::spawn(stopper(
            rng.random(),
            c.clone(),
            Arc::clone(&killing),
            Arc::clone(&seen),
        )));
    }
    let delay = rng.random_range(KILL_AFTER_MS);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    killing.store(true, Ordering::SeqCst);
    server.kill9();
    let mut log = WorkerLog::default();
    for t in tasks {
        let part = t.await.expect("worker task");
        log.creates.extend(part.creates);
        log.destroys.extend(part.destroys);
        log.stops.extend(part.stops);
        log.unexpected.extend(part.unexpected);
    }
    for p in server.problems() {
        v.push(format!("killed server logged: {p}"));
    }
    for e in &log.unexpected {
        v.push(format!("error while the server was up: {e}"));
    }
    for op in &log.creates {
        model.regions.insert(op.room_id.clone(), op.region.clone());
    }
    for (pid, acked) in &log.stops {
        model.stop_attempted.insert(pid.clone());
        if *acked {
            model.stop_acked.insert(pid.clone());
        }
    }
    drop(clients);

    // Restart on the same data directory.
    let started = Instant::now();
    let mut server2 = Server::spawn(dir);
    let restart = started.elapsed();
    let c = connect(&server2.addr).await;
    let deployments = call(
        c.deployments
            .clone()
            .list_deployments(pb::ListDeploymentsRequest { app_id: APP.into() }),
    )
    .await
    .expect("ListDeployments")
    .deployments;
    if deployments != vec![model.deployment.clone().expect("deployment")] {
        v.push(format!(
            "deployments after the restart: {deployments:?}, before: {:?}",
            model.deployment
        ));
    }
    let seen1 = observe(&c, model, &mut v).await;
    let mut notes = Vec::new();
    check_round(load, &c, model, &log, &seen1, &mut v, &mut notes).await;
    retry_unanswered(&c, model, &log, &mut v).await;
    let seen2 = observe(&c, model, &mut v).await;
    check_model_matches(model, &seen2, &mut v);
    for p in seen2.processes.values() {
        if matches!(
            p.status(),
            pb::ProcessStatus::Stopped | pb::ProcessStatus::Failed
        ) {
            model.terminated.insert(p.process_id.clone());
        }
    }

    // The restarted server still works: a room in every region, destroyed again.
    for region in REGIONS {
        let id = format!("after-{round}-{region}");
        model.regions.insert(id.clone(), region.to_string());
        match call(c.rooms.clone().create_room(room_request(&id, region, ""))).await {
            Ok(placed) => {
                let p = seen2.processes.get(&placed.process_id);
                if p.is_some_and(|p| p.region != region) {
                    v.push(format!("room {id} for {region} placed on {p:?}"));
                }
                match call(c.rooms.clone().destroy_room(pb::DestroyRoomRequest {
                    app_id: APP.into(),
                    room_id: id.clone(),
                }))
                .await
                {
                    Ok(_) => {
                        model.rooms.insert(id, Expect::Destroyed);
                    }
                    Err(s) => v.push(format!(
                        "DestroyRoom {id} after the restart: {}",
                        status_text(&s)
                    )),
                }
            }
            Err(s) => v.push(format!(
                "CreateRoom {id} after the restart: {}",
                status_text(&s)
            )),
        }
    }

    match ending {
        Ending::Kill9 => server2.kill9(),
        Ending::Sigterm => {
            let status = server2.sigterm().await;
            if !status.success() {
                v.push(format!("roomsched exited with {status} after SIGTERM"));
            }
        }
    }
    for p in server2.problems() {
        v.push(format!("restarted server logged: {p}"));
    }

    let acked_creates = log
        .creates
        .iter()
        .filter(|op| matches!(op.outcome, CreateOutcome::Acked { .. }))
        .count();
    let unanswered = log.creates.len() - acked_creates;
    let acked_destroys = log
        .destroys
        .iter()
        .filter(|(_, o)| matches!(o, DestroyOutcome::Acked))
        .count();
    // What the calls cut off by the kill saw (e.g. a transport error or UNAVAILABLE).
    let cut_off: HashSet<&str> = log
        .creates
        .iter()
        .filter_map(|op| match &op.outcome {
            CreateOutcome::Uncertain(e) => Some(e.as_str()),
            CreateOutcome::Acked { .. } => None,
        })
        .chain(log.destroys.iter().filter_map(|(_, o)| match o {
            DestroyOutcome::Uncertain(e) => Some(e.as_str()),
            _ => None,
        }))
        .map(|e| e.split(':').next().unwrap_or(e))
        .collect();
    let summary = format!(
        "round {round}: killed after {delay} ms; creates {} (acked {acked_creates}, unanswered \
         {unanswered}), destroys {} (acked {acked_destroys}), stops {}; cut-off calls saw \
         {cut_off:?}; {} processes; restart took {restart:?}{}",
        log.creates.len(),
        log.destroys.len(),
        log.stops.len(),
        seen2.processes.len(),
        if notes.is_empty() {
            String::new()
        } else {
            format!(
                "\n  NOT_FOUND answers undone by the crash (accepted here as failed calls):\n  {}",
                notes.join("\n  ")
            )
        }
    );
    if !v.is_empty() {
        let shown = v.len().min(40);
        panic!(
            "{summary}\n{} violations (first {shown}):\n  {}\n--- killed server's stderr (last 40 \
             lines):\n{}\n--- restarted server's stderr (last 40 lines):\n{}",
            v.len(),
            v[..shown].join("\n  "),
            tail(&server.stderr(), 40),
            tail(&server2.stderr(), 40),
        );
    }
    summary
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn seed() -> u64 {
    std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

/// Runs `rounds` rounds of `load`, each on a fresh data directory.
async fn fresh_rounds(test: &str, load: Load, rounds: usize) {
    let seed = seed();
    eprintln!("{test}: CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    for i in 0..rounds {
        let dir = TempDir::new(&format!("{test}{i}"));
        let mut model = Model::default();
        let line = round(load, &dir.path, i, &mut rng, &mut model, Ending::Kill9).await;
        eprintln!("[{test} seed {seed}] {line}");
    }
    eprintln!("{test}: {rounds} rounds in {:?}", start.elapsed());
}

// ----- tests ------------------------------------------------------------------------------------

/// 20 times: a fresh data directory, concurrent creates, destroys and stops, kill -9, restart,
/// check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_change_fresh_dir() {
    fresh_rounds("fresh", PLAIN, 20).await;
}

/// 10 rounds on one data directory: each round's load, kill -9 and restart also has to leave
/// everything of the earlier rounds as it was (repeated recovery). Rounds end alternately with
/// another kill -9 (idle) and a clean SIGTERM (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_repeatedly_on_one_data_dir() {
    let seed = seed();
    eprintln!("one_dir: CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let dir = TempDir::new("shared");
    let mut model = Model::default();
    let start = Instant::now();
    for i in 0..10 {
        let ending = if i % 2 == 0 {
            Ending::Kill9
        } else {
            Ending::Sigterm
        };
        let line = round(PLAIN, &dir.path, i, &mut rng, &mut model, ending).await;
        eprintln!("[one_dir seed {seed}] {line} (then {ending:?})");
    }
    eprintln!(
        "one_dir: 10 rounds in {:?}; {} rooms tracked",
        start.elapsed(),
        model.rooms.len()
    );
}

/// Every CreateRoom is sent twice at once, as a client retrying a slow call does: the second
/// is a safe retry and answers OK with the same placement. An OK is an acknowledgement, so the
/// room must survive a kill -9 — even when the OK came from the retry, while the original's
/// write was still on its way to the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_retry_never_acknowledges_a_room_that_is_not_on_disk() {
    let load = Load {
        duplicate_creates: true,
        duplicate_destroys: false,
        stops: false,
        strict_not_found: true,
    };
    fresh_rounds("retry", load, 20).await;
}

/// Every DestroyRoom is sent twice at once: one destroys the room, the other answers
/// NOT_FOUND ("destroyed already"). If the kill cuts off the first before its answer, the
/// NOT_FOUND the client did get must still be true after the restart: the room is destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_not_found_never_rests_on_a_destroy_that_is_not_on_disk() {
    let load = Load {
        duplicate_creates: false,
        duplicate_destroys: true,
        stops: false,
        strict_not_found: true,
    };
    fresh_rounds("notfound", load, 20).await;
}
