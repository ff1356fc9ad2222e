//! Adoption of game servers across restarts of `roomsched serve --backend local` with the
//! durable store (SPEC §4, §8, §9): game servers outlive a kill -9 or a clean SIGTERM of
//! roomsched and are found again (same OS process) after the restart; one that died while
//! roomsched was down is reported: RUNNING → FAILED with its rooms destroyed, STARTING → its
//! start fails and its room is placed again; one that was STARTING at the crash and binds later
//! becomes RUNNING.
//!
//! Everything is real: the `roomsched` binary, `python3 examples/game_server.py` game servers,
//! /proc. Each test has its own data directory and tags its game servers with an environment
//! variable; a guard kills roomsched and every tagged process group when the test ends, even
//! when it fails. The tests run one at a time: every roomsched hands out ports from the same
//! default range (30000-39999), so two at once could give the same port to two game servers
//! before either binds it. Every wait polls against a deadline.

#![cfg(target_os = "linux")]

mod serve;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use pb::deployment_service_client::DeploymentServiceClient;
use pb::process_service_client::ProcessServiceClient;
use pb::room_service_client::RoomServiceClient;
use roomsched::grpc::pb;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

/// How long anything that should happen "soon" may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// The sample game server of the README.
const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/game_server.py");

/// Every game server a test starts carries `TAG_VAR=<its data directory's name>`.
const TAG_VAR: &str = "ROOMSCHED_ADOPTION_TEST_TAG";

const APP: &str = "adopt-game";
const REGION: &str = "Frankfurt";

/// One test at a time (see the module doc).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ----- /proc ------------------------------------------------------------------------------------

/// The state letter and process group of a process, from /proc/<pid>/stat.
fn stat_of(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the process exists and has not exited (a zombie has exited).
fn alive(pid: i32) -> bool {
    matches!(stat_of(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// The environment of a process, as `NAME=value` entries.
fn environ(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| {
            env.split(|&b| b == 0)
                .filter(|e| !e.is_empty())
                .map(|e| String::from_utf8_lossy(e).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes whose environment holds `entry` (`NAME=value`).
fn pids_with_env(entry: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| environ(pid).iter().any(|e| e == entry))
        .filter(|&pid| alive(pid))
        .collect()
}

/// The live game-server process-group leaders of a roomsched process id (there must be at
/// most one).
fn leaders_of(process_id: &str) -> Vec<i32> {
    pids_with_env(&format!("HATHORA_PROCESS_ID={process_id}"))
        .into_iter()
        .filter(|&pid| matches!(stat_of(pid), Some((_, g)) if g == pid))
        .collect()
}

/// The OS pid (= process group) of the game server of a roomsched process, waited for.
async fn os_pid_of(process_id: &str) -> i32 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let leaders = leaders_of(process_id);
        match leaders.as_slice() {
            [pid] => return *pid,
            [] => {}
            more => panic!("more than one game server for process {process_id}: {more:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "no OS process with HATHORA_PROCESS_ID={process_id} after {DEADLINE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The value of `name` in a process's environment.
fn env_of(pid: i32, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    environ(pid)
        .into_iter()
        .find_map(|e| e.strip_prefix(&prefix).map(str::to_string))
}

/// SIGKILL to a whole process group, then waits until its leader is gone.
async fn kill_group(pgid: i32) {
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    wait_until(&format!("game server {pgid} to be gone"), || !alive(pgid)).await;
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The sample server's JSON line over TCP (it answers every client with one and closes).
fn sample_answer(port: u16) -> serde_json::Value {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut line = String::new();
    stream
        .read_to_string(&mut line)
        .unwrap_or_else(|e| panic!("read from 127.0.0.1:{port}: {e}"));
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

// ----- the real binary ------------------------------------------------------------------------

/// A `roomsched serve --backend local --store durable` child.
struct Serve {
    child: std::process::Child,
    addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_done: Arc<AtomicBool>,
}

impl Serve {
    /// `start_timeout` as `--start-timeout` takes it (e.g. `20s`).
    fn spawn(data_dir: &Path, start_timeout: &str) -> Serve {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_roomsched"));
        command
            .args(["serve", "--backend", "local", "--store", "durable"])
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--stop-grace",
                "2s",
                "--start-timeout",
                start_timeout,
                "--regions",
                REGION,
            ])
            .env("ROOMSCHED_LOG", "info");
        let serve::Spawned {
            child,
            addr,
            stderr: lines,
            stderr_done: done,
        } = serve::spawn(command, DEADLINE);
        Serve {
            child,
            addr,
            stderr: lines,
            stderr_done: done,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    /// SIGKILL, and reap it.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.wait_stderr();
    }

    /// SIGTERM; returns how it exited.
    async fn sigterm(&mut self) -> std::process::ExitStatus {
        kill(self.pid(), Signal::SIGTERM).expect("SIGTERM roomsched");
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
            tokio::time::sleep(POLL).await;
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

    /// Waits until a line of its log contains every one of `words`.
    async fn wait_log(&self, words: &[&str]) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let found = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| words.iter().all(|w| l.contains(w)))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "roomsched never logged a line with {words:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Fails the test if its log shows a panic or an ERROR.
    fn assert_no_problems(&self, which: &str) {
        let lines = self.stderr.lock().unwrap();
        let bad: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("panicked") || l.contains(" ERROR "))
            .collect();
        assert!(
            bad.is_empty(),
            "{which} roomsched logged problems: {bad:#?}\nstderr:\n{}",
            lines.join("\n")
        );
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ----- a test's data directory, roomsched and game servers ----------------------------------------

/// A data directory, the roomsched running on it (if any) and the game servers it tagged.
/// Dropping it kills roomsched first (so it starts nothing more), then every process group of
/// a tagged game server, then removes the directory.
struct Fixture {
    dir: PathBuf,
    name: String,
    serve: Option<Serve>,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Fixture {
    async fn new(test: &str) -> Fixture {
        let serial = SERIAL.lock().await;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("roomsched-adopt-{test}-{}-{nanos}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("create the test's temp dir");
        Fixture {
            dir,
            name,
            serve: None,
            _serial: serial,
        }
    }

    fn tag(&self) -> String {
        format!("{TAG_VAR}={}", self.name)
    }

    /// Starts roomsched on the data directory (the previous one must be gone).
    async fn start(&mut self) -> Api {
        self.start_with_timeout("20s").await
    }

    async fn start_with_timeout(&mut self, start_timeout: &str) -> Api {
        assert!(self.serve.is_none(), "roomsched is still running");
        let serve = Serve::spawn(&self.dir, start_timeout);
        let api = Api::connect(&serve.addr).await;
        self.serve = Some(serve);
        api
    }

    fn serve(&self) -> &Serve {
        self.serve.as_ref().expect("roomsched is running")
    }

    /// kill -9 roomsched; checks its log first.
    fn kill9(&mut self) {
        let mut serve = self.serve.take().expect("roomsched is running");
        serve.kill9();
        serve.assert_no_problems("the killed");
    }

    /// SIGTERM: roomsched must exit 0 and say that its game servers keep running.
    async fn sigterm(&mut self) {
        let mut serve = self.serve.take().expect("roomsched is running");
        let status = serve.sigterm().await;
        assert!(
            status.success(),
            "roomsched exited with {status} after SIGTERM; stderr:\n{}",
            serve.stderr()
        );
        assert!(
            serve.stderr().contains("game servers keep running"),
            "stderr:\n{}",
            serve.stderr()
        );
        serve.assert_no_problems("the stopped");
    }

    /// The sample game server, tagged.
    fn sample_deployment(&self, rooms_per_process: u32) -> pb::CreateDeploymentRequest {
        self.deployment(
            rooms_per_process,
            vec!["python3".to_string(), SAMPLE.to_string()],
        )
    }

    /// A deployment running `command`, tagged.
    fn deployment(
        &self,
        rooms_per_process: u32,
        command: Vec<String>,
    ) -> pb::CreateDeploymentRequest {
        pb::CreateDeploymentRequest {
            app_id: APP.into(),
            rooms_per_process,
            transport_type: pb::TransportType::Tcp as i32,
            container_port: 7777,
            command,
            env: vec![pb::EnvVar {
                name: TAG_VAR.into(),
                value: self.name.clone(),
            }],
            ..Default::default()
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(serve) = self.serve.take() {
            drop(serve);
        }
        let tag = self.tag();
        // A start may still be on its way when a test fails: look again for a while.
        let rounds = if std::thread::panicking() { 20 } else { 3 };
        for round in 0..rounds {
            if round > 0 {
                std::thread::sleep(Duration::from_millis(25));
            }
            for pid in pids_with_env(&tag) {
                if let Some((_, pgid)) = stat_of(pid) {
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                }
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ----- gRPC ------------------------------------------------------------------------------------------

struct Api {
    rooms: RoomServiceClient<Channel>,
    processes: ProcessServiceClient<Channel>,
    deployments: DeploymentServiceClient<Channel>,
}

impl Api {
    async fn connect(addr: &str) -> Api {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to roomsched at {addr}: {e}"));
        Api {
            rooms: RoomServiceClient::new(channel.clone()),
            processes: ProcessServiceClient::new(channel.clone()),
            deployments: DeploymentServiceClient::new(channel),
        }
    }

    async fn create_deployment(&self, req: pb::CreateDeploymentRequest) -> pb::Deployment {
        self.deployments
            .clone()
            .create_deployment(req)
            .await
            .expect("create deployment")
            .into_inner()
    }

    async fn try_create_room(
        &self,
        room_id: &str,
    ) -> Result<pb::CreateRoomResponse, tonic::Status> {
        self.rooms
            .clone()
            .create_room(pb::CreateRoomRequest {
                app_id: APP.into(),
                region: REGION.into(),
                room_config: format!("{{\"room\":\"{room_id}\"}}"),
                room_id: room_id.into(),
                deployment_id: 0,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn create_room(&self, room_id: &str) -> pb::CreateRoomResponse {
        self.try_create_room(room_id)
            .await
            .unwrap_or_else(|s| panic!("CreateRoom {room_id}: {s:?}"))
    }

    async fn get_room(&self, room_id: &str) -> pb::Room {
        self.rooms
            .clone()
            .get_room(pb::GetRoomRequest {
                app_id: APP.into(),
                room_id: room_id.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("GetRoom {room_id}: {s:?}"))
            .into_inner()
    }

    async fn destroy_room(&self, room_id: &str) -> Result<(), tonic::Status> {
        self.rooms
            .clone()
            .destroy_room(pb::DestroyRoomRequest {
                app_id: APP.into(),
                room_id: room_id.into(),
            })
            .await
            .map(|_| ())
    }

    async fn connection_info(&self, room_id: &str) -> pb::ConnectionInfo {
        self.rooms
            .clone()
            .get_connection_info(pb::GetConnectionInfoRequest {
                app_id: APP.into(),
                room_id: room_id.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("GetConnectionInfo {room_id}: {s:?}"))
            .into_inner()
    }

    async fn active_room_ids(&self, process_id: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .rooms
            .clone()
            .list_active_rooms_for_process(pb::ListRoomsForProcessRequest {
                app_id: APP.into(),
                process_id: process_id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("ListActiveRoomsForProcess {process_id}: {s:?}"))
            .into_inner()
            .rooms
            .into_iter()
            .map(|r| r.room_id)
            .collect();
        ids.sort();
        ids
    }

    async fn get_process(&self, process_id: &str) -> pb::Process {
        self.processes
            .clone()
            .get_process(pb::GetProcessRequest {
                app_id: APP.into(),
                process_id: process_id.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("GetProcess {process_id}: {s:?}"))
            .into_inner()
    }

    async fn stop_process(&self, process_id: &str) -> pb::Process {
        self.processes
            .clone()
            .stop_process(pb::StopProcessRequest {
                app_id: APP.into(),
                process_id: process_id.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("StopProcess {process_id}: {s:?}"))
            .into_inner()
    }

    async fn processes(&self) -> Vec<pb::Process> {
        self.processes
            .clone()
            .list_processes(pb::ListProcessesRequest {
                app_id: APP.into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("ListProcesses")
            .into_inner()
            .processes
    }

    /// Polls until the process has `status`; on timeout the message shows its log.
    async fn wait_status(&self, process_id: &str, status: pb::ProcessStatus) -> pb::Process {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let p = self.get_process(process_id).await;
            if p.status() == status {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "process {process_id} is {:?} after {DEADLINE:?}, wanted {status:?}; exit \
                 reason {:?}; its log:\n{}",
                p.status(),
                p.summary_exit_reason,
                std::fs::read_to_string(&p.log_path).unwrap_or_default()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

fn port_of(p: &pb::Process) -> u16 {
    let port = p
        .exposed_port
        .as_ref()
        .unwrap_or_else(|| panic!("process {} has no exposed port", p.process_id))
        .port;
    u16::try_from(port).expect("port")
}

/// The process is RUNNING with these rooms, each ACTIVE on it, and its game server (the OS
/// process `os_pid`) answers on its exposed port as that process.
async fn assert_serving(api: &Api, process_id: &str, os_pid: i32, rooms: &[&str]) -> pb::Process {
    assert_serving_as(api, process_id, os_pid, rooms, pb::ProcessStatus::Running).await
}

/// [`assert_serving`] for a process in `status` (RUNNING or DRAINING).
async fn assert_serving_as(
    api: &Api,
    process_id: &str,
    os_pid: i32,
    rooms: &[&str],
    status: pb::ProcessStatus,
) -> pb::Process {
    let p = api.get_process(process_id).await;
    assert_eq!(p.status(), status, "{p:?}");
    let mut want: Vec<String> = rooms.iter().map(|r| r.to_string()).collect();
    want.sort();
    assert_eq!(
        api.active_room_ids(process_id).await,
        want,
        "active rooms of {process_id}"
    );
    assert_eq!(p.rooms_allocated as usize, rooms.len(), "{p:?}");
    for room_id in rooms {
        let room = api.get_room(room_id).await;
        assert_eq!(room.status(), pb::RoomStatus::Active, "{room:?}");
        assert_eq!(
            room.current_allocation
                .as_ref()
                .map(|a| a.process_id.as_str()),
            Some(process_id),
            "{room:?}"
        );
        let conn = api.connection_info(room_id).await;
        assert_eq!(conn.status(), pb::ConnectionStatus::Active, "{conn:?}");
        assert_eq!(conn.exposed_port, p.exposed_port, "{conn:?}");
    }
    assert!(
        alive(os_pid),
        "game server {os_pid} of {process_id} is gone"
    );
    assert_eq!(
        leaders_of(process_id),
        vec![os_pid],
        "exactly the original game server runs for {process_id}"
    );
    let answer = sample_answer(port_of(&p));
    assert_eq!(answer["process_id"], process_id, "{answer}");
    p
}

/// Ignores SIGTERM, binds PORT (TCP) and sleeps forever.
const IGNORE_SIGTERM: &str = r#"
import os, signal, socket, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen()
print("ignoring SIGTERM", flush=True)
while True:
    time.sleep(1000)
"#;

fn sh(script: String) -> Vec<String> {
    vec!["sh".to_string(), "-c".to_string(), script]
}

// ----- tests ------------------------------------------------------------------------------------------

/// (a) kill -9 of roomsched: the game server keeps running; after the restart it is the same
/// process, RUNNING, with its room ACTIVE, and fully managed again: rooms are placed on it and
/// destroyed, it survives a second kill -9 and restart, StopProcess stops the real OS process
/// (STOPPED), and the next room starts a new game server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn game_servers_survive_kill_9_and_are_adopted_again() {
    let mut fx = Fixture::new("kill9").await;
    let api = fx.start().await;
    api.create_deployment(fx.sample_deployment(4)).await;
    let placed = api.create_room("match-1").await;
    let pid = placed.process_id.clone();
    let before = api.wait_status(&pid, pb::ProcessStatus::Running).await;
    let os_pid = os_pid_of(&pid).await;
    assert_serving(&api, &pid, os_pid, &["match-1"]).await;

    fx.kill9();
    assert!(alive(os_pid), "the game server died with roomsched");
    let api = fx.start().await;
    fx.serve()
        .wait_log(&["game server adopted again", &pid])
        .await;
    let after = assert_serving(&api, &pid, os_pid, &["match-1"]).await;
    assert_eq!(after.exposed_port, before.exposed_port);
    assert_eq!(after.started_at, before.started_at);
    assert_eq!(after.created_at, before.created_at);

    // Rooms are placed on the adopted process and destroyed again.
    let second = api.create_room("match-2").await;
    assert_eq!(second.process_id, pid, "the only process has free slots");
    assert_eq!(second.status(), pb::RoomStatus::Active);
    assert_serving(&api, &pid, os_pid, &["match-1", "match-2"]).await;
    api.destroy_room("match-2").await.expect("destroy match-2");
    assert_serving(&api, &pid, os_pid, &["match-1"]).await;

    // Adopted twice: an adopted game server is not roomsched's child any more.
    fx.kill9();
    let api = fx.start().await;
    fx.serve()
        .wait_log(&["game server adopted again", &pid])
        .await;
    assert_serving(&api, &pid, os_pid, &["match-1"]).await;

    // StopProcess stops the real process.
    let stopping = api.stop_process(&pid).await;
    assert!(
        matches!(
            stopping.status(),
            pb::ProcessStatus::Stopping | pb::ProcessStatus::Stopped
        ),
        "{stopping:?}"
    );
    let stopped = api.wait_status(&pid, pb::ProcessStatus::Stopped).await;
    wait_until("the adopted game server to exit", || !alive(os_pid)).await;
    assert!(stopped.terminated_at.is_some(), "{stopped:?}");
    assert_eq!(stopped.rooms_allocated, 0, "{stopped:?}");
    assert!(api.active_room_ids(&pid).await.is_empty());
    let room = api.get_room("match-1").await;
    assert_eq!(room.status(), pb::RoomStatus::Destroyed, "{room:?}");
    let log = std::fs::read_to_string(&stopped.log_path).expect("game server log");
    assert!(
        log.contains("SIGTERM received, shutting down"),
        "stopped politely: {log:?}"
    );

    // The next room starts a new game server.
    let third = api.create_room("match-3").await;
    assert_ne!(third.process_id, pid);
    api.wait_status(&third.process_id, pb::ProcessStatus::Running)
        .await;
    let new_os_pid = os_pid_of(&third.process_id).await;
    assert_ne!(new_os_pid, os_pid);
    assert_serving(&api, &third.process_id, new_os_pid, &["match-3"]).await;
    fx.serve().assert_no_problems("the last");
}

/// (b) A RUNNING game server killed while roomsched is down: after the restart its process is
/// FAILED (exit status unknown), its room DESTROYED and the slot free; the next CreateRoom
/// starts a new game server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_server_that_died_while_roomsched_was_down_is_failed() {
    let mut fx = Fixture::new("died").await;
    let api = fx.start().await;
    api.create_deployment(fx.sample_deployment(4)).await;
    let pid = api.create_room("lost-1").await.process_id;
    api.create_room("lost-2").await;
    api.wait_status(&pid, pb::ProcessStatus::Running).await;
    let os_pid = os_pid_of(&pid).await;
    assert_serving(&api, &pid, os_pid, &["lost-1", "lost-2"]).await;

    fx.kill9();
    kill_group(os_pid).await;
    let api = fx.start().await;
    let failed = api.wait_status(&pid, pb::ProcessStatus::Failed).await;
    assert!(failed.terminated_at.is_some(), "{failed:?}");
    assert_eq!(
        failed.summary_exit_reason, "exited while roomsched was down (status unknown)",
        "{failed:?}"
    );
    assert_eq!(failed.rooms_allocated, 0, "{failed:?}");
    assert!(api.active_room_ids(&pid).await.is_empty());
    for id in ["lost-1", "lost-2"] {
        let room = api.get_room(id).await;
        assert_eq!(room.status(), pb::RoomStatus::Destroyed, "{room:?}");
        assert!(room.current_allocation.is_none(), "{room:?}");
        assert!(
            room.allocations.iter().all(|a| a.unscheduled_at.is_some()),
            "{room:?}"
        );
        let err = api.destroy_room(id).await.expect_err("destroyed already");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }

    let next = api.create_room("fresh-1").await;
    assert_ne!(next.process_id, pid, "a FAILED process takes no room");
    api.wait_status(&next.process_id, pb::ProcessStatus::Running)
        .await;
    let new_os_pid = os_pid_of(&next.process_id).await;
    assert_serving(&api, &next.process_id, new_os_pid, &["fresh-1"]).await;
    fx.serve().assert_no_problems("the restarted");
}

/// An adopted game server that dies while roomsched runs is FAILED with its rooms destroyed;
/// its exit status cannot be read (it is not roomsched's child), and the reason says so rather
/// than blaming a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_game_server_that_dies_later_is_failed() {
    let mut fx = Fixture::new("dies-later").await;
    let api = fx.start().await;
    api.create_deployment(fx.sample_deployment(4)).await;
    let pid = api.create_room("later-1").await.process_id;
    api.wait_status(&pid, pb::ProcessStatus::Running).await;
    let os_pid = os_pid_of(&pid).await;

    fx.kill9();
    let api = fx.start().await;
    fx.serve()
        .wait_log(&["game server adopted again", &pid])
        .await;
    assert_serving(&api, &pid, os_pid, &["later-1"]).await;
    kill_group(os_pid).await;
    let failed = api.wait_status(&pid, pb::ProcessStatus::Failed).await;
    assert_eq!(
        failed.summary_exit_reason, "exited (status unknown: adopted after a restart)",
        "{failed:?}"
    );
    assert_eq!(failed.rooms_allocated, 0, "{failed:?}");
    let room = api.get_room("later-1").await;
    assert_eq!(room.status(), pb::RoomStatus::Destroyed, "{room:?}");
    fx.serve().assert_no_problems("the restarted");
}

/// (c) A clean SIGTERM of a durable roomsched leaves its game servers running (exit 0); the
/// restart adopts them: same OS processes, same rooms, same counts; StopProcess then stops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_game_servers_running_and_the_restart_adopts_them() {
    let mut fx = Fixture::new("sigterm").await;
    let api = fx.start().await;
    api.create_deployment(fx.sample_deployment(2)).await;
    let a = api.create_room("t-1").await.process_id;
    let b = api.create_room("t-2").await.process_id;
    let c = api.create_room("t-3").await.process_id;
    assert_eq!(a, b, "two rooms per process");
    assert_ne!(a, c);
    api.wait_status(&a, pb::ProcessStatus::Running).await;
    api.wait_status(&c, pb::ProcessStatus::Running).await;
    let (os_a, os_c) = (os_pid_of(&a).await, os_pid_of(&c).await);

    fx.sigterm().await;
    assert!(
        alive(os_a) && alive(os_c),
        "game servers stopped with roomsched"
    );
    let api = fx.start().await;
    fx.serve()
        .wait_log(&["game server adopted again", &a])
        .await;
    fx.serve()
        .wait_log(&["game server adopted again", &c])
        .await;
    assert_serving(&api, &a, os_a, &["t-1", "t-2"]).await;
    assert_serving(&api, &c, os_c, &["t-3"]).await;
    assert_eq!(api.processes().await.len(), 2, "no process started anew");

    for (pid, os_pid) in [(&a, os_a), (&c, os_c)] {
        api.stop_process(pid).await;
        api.wait_status(pid, pb::ProcessStatus::Stopped).await;
        wait_until("the adopted game server to exit", || !alive(os_pid)).await;
    }
    fx.serve().assert_no_problems("the restarted");
}

/// (d) A process STARTING when roomsched is killed (its command sleeps 3 s before it execs the
/// game server): after the restart it is still STARTING, and once the game server binds it is
/// RUNNING — the same OS process, the room ACTIVE on it and never placed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_starting_at_the_crash_is_running_after_the_restart() {
    let mut fx = Fixture::new("starting").await;
    let api = fx.start().await;
    api.create_deployment(fx.deployment(4, sh(format!("sleep 3; exec python3 {SAMPLE}"))))
        .await;
    let placed = api.create_room("slow-1").await;
    let pid = placed.process_id.clone();
    let os_pid = os_pid_of(&pid).await;
    let p = api.get_process(&pid).await;
    assert_eq!(p.status(), pb::ProcessStatus::Starting, "{p:?}");
    assert_eq!(
        api.get_room("slow-1").await.status(),
        pb::RoomStatus::Scheduling
    );

    fx.kill9();
    let api = fx.start().await;
    let p = api.get_process(&pid).await;
    assert_eq!(
        p.status(),
        pb::ProcessStatus::Starting,
        "the game server sleeps 3 s before it binds: {p:?}"
    );
    let running = api.wait_status(&pid, pb::ProcessStatus::Running).await;
    assert!(running.started_at.is_some(), "{running:?}");
    let p = assert_serving(&api, &pid, os_pid, &["slow-1"]).await;
    assert_eq!(
        env_of(os_pid, "PORT").map(|s| s.parse::<u16>().ok()),
        Some(Some(port_of(&p))),
        "exposed port is the game server's PORT"
    );
    let room = api.get_room("slow-1").await;
    assert_eq!(room.allocations.len(), 1, "never placed again: {room:?}");
    let answer = sample_answer(port_of(&p));
    assert_eq!(answer["initial_room_id"], "slow-1", "{answer}");
    fx.serve().assert_no_problems("the restarted");
}

/// (d') A process STARTING when roomsched is killed whose game server binds while roomsched is
/// down: RUNNING soon after the restart, the same OS process, the room ACTIVE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_bound_while_roomsched_was_down_is_running_after_the_restart() {
    let mut fx = Fixture::new("bound-down").await;
    let api = fx.start().await;
    api.create_deployment(fx.deployment(4, sh(format!("sleep 1; exec python3 {SAMPLE}"))))
        .await;
    let pid = api.create_room("early-1").await.process_id;
    let os_pid = os_pid_of(&pid).await;
    assert_eq!(
        api.get_process(&pid).await.status(),
        pb::ProcessStatus::Starting
    );
    let port: u16 = env_of(os_pid, "PORT")
        .and_then(|p| p.parse().ok())
        .expect("PORT of the game server");

    fx.kill9();
    wait_until("the game server to listen while roomsched is down", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let api = fx.start().await;
    api.wait_status(&pid, pb::ProcessStatus::Running).await;
    let p = assert_serving(&api, &pid, os_pid, &["early-1"]).await;
    assert_eq!(port_of(&p), port);
    fx.serve().assert_no_problems("the restarted");
}

/// (b') A process STARTING when roomsched is killed whose game server dies while roomsched is
/// down: its start failed, so it is FAILED and its room, which never ran, is placed again on a
/// new process (a second allocation), which runs it as its first room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_process_that_died_while_roomsched_was_down_has_its_room_placed_again() {
    let mut fx = Fixture::new("starting-died").await;
    let marker = fx.dir.join("hold");
    std::fs::write(&marker, "").expect("marker");
    // While the marker exists a new game server waits (STARTING); then it starts at once.
    let script = format!(
        "if [ -e '{}' ]; then sleep 600; fi; exec python3 {SAMPLE}",
        marker.display()
    );
    let api = fx.start().await;
    api.create_deployment(fx.deployment(4, sh(script))).await;
    let pid = api.create_room("again-1").await.process_id;
    let os_pid = os_pid_of(&pid).await;
    assert_eq!(
        api.get_process(&pid).await.status(),
        pb::ProcessStatus::Starting
    );

    fx.kill9();
    kill_group(os_pid).await;
    std::fs::remove_file(&marker).expect("remove marker");
    let api = fx.start().await;
    let failed = api.wait_status(&pid, pb::ProcessStatus::Failed).await;
    assert!(failed.started_at.is_none(), "{failed:?}");
    assert!(api.active_room_ids(&pid).await.is_empty());

    let deadline = Instant::now() + DEADLINE;
    let room = loop {
        let room = api.get_room("again-1").await;
        if room.status() == pb::RoomStatus::Active {
            break room;
        }
        assert!(
            Instant::now() < deadline,
            "room again-1 never became ACTIVE again: {room:?}; processes: {:?}",
            api.processes().await
        );
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(room.allocations.len(), 2, "placed again: {room:?}");
    assert_eq!(room.allocations[0].process_id, pid);
    assert!(room.allocations[0].unscheduled_at.is_some(), "{room:?}");
    let new_pid = room.allocations[1].process_id.clone();
    assert_ne!(new_pid, pid);
    let new_os_pid = os_pid_of(&new_pid).await;
    let p = assert_serving(&api, &new_pid, new_os_pid, &["again-1"]).await;
    let answer = sample_answer(port_of(&p));
    assert_eq!(answer["initial_room_id"], "again-1", "{answer}");
    fx.serve().assert_no_problems("the restarted");
}

/// A process STOPPING when roomsched is killed (its game server ignores SIGTERM, so it is still
/// there during the stop grace): after the restart the stop is carried out — SIGKILL after the
/// grace — and the process is STOPPED, its OS process gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_stopping_at_the_crash_is_stopped_after_the_restart() {
    let mut fx = Fixture::new("stopping").await;
    let api = fx.start().await;
    let command = vec![
        "python3".to_string(),
        "-c".to_string(),
        IGNORE_SIGTERM.to_string(),
    ];
    api.create_deployment(fx.deployment(4, command)).await;
    let pid = api.create_room("stop-1").await.process_id;
    api.wait_status(&pid, pb::ProcessStatus::Running).await;
    let os_pid = os_pid_of(&pid).await;
    let stopping = api.stop_process(&pid).await;
    assert_eq!(
        stopping.status(),
        pb::ProcessStatus::Stopping,
        "{stopping:?}"
    );

    fx.kill9(); // within the 2 s grace: the game server ignored SIGTERM and still runs
    assert!(alive(os_pid), "the game server should ignore SIGTERM");
    let api = fx.start().await;
    let p = api.get_process(&pid).await;
    assert!(
        matches!(
            p.status(),
            pb::ProcessStatus::Stopping | pb::ProcessStatus::Stopped
        ),
        "a stop is never undone: {p:?}"
    );
    let stopped = api.wait_status(&pid, pb::ProcessStatus::Stopped).await;
    wait_until("the game server to be killed", || !alive(os_pid)).await;
    assert_eq!(stopped.rooms_allocated, 0, "{stopped:?}");
    assert_eq!(
        api.get_room("stop-1").await.status(),
        pb::RoomStatus::Destroyed
    );
    fx.serve().assert_no_problems("the restarted");
}

/// A DRAINING process (an older deployment's) at the crash: after the restart it is adopted
/// still DRAINING with its room, takes no new room, and stops — the OS process exits — when
/// its last room is destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_process_is_adopted_and_stops_after_its_last_room() {
    let mut fx = Fixture::new("draining").await;
    let api = fx.start().await;
    api.create_deployment(fx.sample_deployment(2)).await;
    let old = api.create_room("old-1").await.process_id;
    api.wait_status(&old, pb::ProcessStatus::Running).await;
    let os_old = os_pid_of(&old).await;
    let v2 = api.create_deployment(fx.sample_deployment(2)).await;
    assert_eq!(v2.deployment_id, 2);
    api.wait_status(&old, pb::ProcessStatus::Draining).await;

    fx.kill9();
    let api = fx.start().await;
    fx.serve()
        .wait_log(&["game server adopted again", &old])
        .await;
    assert_serving_as(&api, &old, os_old, &["old-1"], pb::ProcessStatus::Draining).await;

    let new = api.create_room("new-1").await.process_id;
    assert_ne!(new, old, "a DRAINING process takes no room");
    assert_eq!(api.get_process(&new).await.deployment_id, 2);

    api.destroy_room("old-1").await.expect("destroy old-1");
    api.wait_status(&old, pb::ProcessStatus::Stopped).await;
    wait_until("the drained game server to exit", || !alive(os_old)).await;
    api.wait_status(&new, pb::ProcessStatus::Running).await;
    let os_new = os_pid_of(&new).await;
    assert_serving(&api, &new, os_new, &["new-1"]).await;
    fx.serve().assert_no_problems("the restarted");
}

/// A process STARTING at the crash whose game server never binds: the start timeout still
/// applies after the restart (counted from its creation), and the adopted game server — no
/// child of this roomsched — is killed when it fires; the process is FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_timeout_kills_an_adopted_game_server_that_never_binds() {
    let mut fx = Fixture::new("never-binds").await;
    let api = fx.start_with_timeout("4s").await;
    api.create_deployment(fx.deployment(4, sh("sleep 600".to_string())))
        .await;
    let pid = api.create_room("never-1").await.process_id;
    let os_pid = os_pid_of(&pid).await;

    fx.kill9();
    let api = fx.start_with_timeout("4s").await;
    assert_eq!(
        api.get_process(&pid).await.status(),
        pb::ProcessStatus::Starting
    );
    let failed = api.wait_status(&pid, pb::ProcessStatus::Failed).await;
    assert!(
        failed.summary_exit_reason.contains("did not bind"),
        "{failed:?}"
    );
    wait_until("the adopted game server to be killed", || !alive(os_pid)).await;
    assert!(leaders_of(&pid).is_empty());
    // Its room, which never ran, was placed again on a new process.
    let room = api.get_room("never-1").await;
    assert!(room.allocations.len() >= 2, "placed again: {room:?}");
    assert_eq!(room.allocations[0].process_id, pid);
    fx.serve().assert_no_problems("the restarted");
}
