//! The `local` backend with real OS processes (SPEC §4, §8): game servers started from the
//! deployment's command, bind detection (TCP and UDP), start timeout, exits with their codes,
//! SIGTERM then SIGKILL after the grace, the HATHORA_* environment, per-process logs, a burst
//! of concurrent rooms, and a real `roomsched serve --backend local` stopped with SIGTERM.
//!
//! Nothing here is mocked: every process is a real `python3`/`sh` process. Each test has its
//! own temporary directory (logs), its own port range, and tags its game servers with an
//! environment variable, so that it can find them in /proc and make sure none is left behind
//! (even when the test fails: the fixture kills what it tagged). Every wait polls against a
//! deadline; no sleep is used as an assertion.

mod support;

mod serve;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use roomsched::backend::{Local, LocalConfig};
use roomsched::grpc::pb;
use roomsched::{
    ContainerPort, CreateRoom, DeploymentSpec, EnvVar, Process, ProcessId, ProcessStatus,
    RoomStatus, Scheduler, TransportType,
};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{check_invariants, processes, room_in, APP};

/// How long anything that should happen "soon" (a python process binding its port, an exit
/// being noticed) may take before the test fails. Generous: the machine may be busy.
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The sample game server of the README.
const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/game_server.py");

/// Every game server a test starts carries `TAG_VAR=<its fixture's tag>` in its environment.
const TAG_VAR: &str = "ROOMSCHED_LOCAL_TEST_TAG";

// ----- game servers written for these tests ------------------------------------------------

/// Binds PORT (TCP), then exits with the code in argv[1] when the first client connects.
const EXIT_ON_CONNECT: &str = r#"
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen()
print("bound; will exit with code", sys.argv[1], "at the first connection", flush=True)
s.accept()
sys.exit(int(sys.argv[1]))
"#;

/// Ignores SIGTERM, forks a child that ignores it too, binds PORT and sleeps forever.
const IGNORE_SIGTERM: &str = r#"
import os, signal, socket, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = os.fork()
if child == 0:
    while True:
        time.sleep(1000)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen()
print("ignoring SIGTERM; forked child", child, flush=True)
while True:
    time.sleep(1000)
"#;

/// Writes its environment and argv to `$ENV_OUT_DIR/$HATHORA_PROCESS_ID.json` (atomically),
/// prints a line to stdout and one to stderr, then binds PORT and sleeps forever.
const DUMP_ENV: &str = r#"
import json, os, socket, sys, time
path = os.path.join(os.environ["ENV_OUT_DIR"], os.environ["HATHORA_PROCESS_ID"] + ".json")
with open(path + ".tmp", "w") as f:
    json.dump({"env": dict(os.environ), "argv": sys.argv[1:]}, f)
os.rename(path + ".tmp", path)
print("hello from stdout", flush=True)
print("hello from stderr", file=sys.stderr, flush=True)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen()
while True:
    time.sleep(1000)
"#;

fn python(script: &str, args: &[&str]) -> Vec<String> {
    let mut argv = vec!["python3".to_string(), "-c".to_string(), script.to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv
}

fn sample(args: &[&str]) -> Vec<String> {
    let mut argv = vec!["python3".to_string(), SAMPLE.to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv
}

// ----- temporary directories, port ranges, fixtures -----------------------------------------

/// A directory under the system temp dir, removed on drop.
struct TempDir {
    path: PathBuf,
    name: String,
}

impl TempDir {
    fn new(test: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("roomsched-local-{test}-{}-{nanos}", std::process::id());
        let path = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&path).expect("create the test's temp dir");
        TempDir { path, name }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A port range of its own for each test of this binary (tests run in parallel, each with its
/// own backend), below the kernel's ephemeral range and away from the backend's default
/// 30000-39999. The pid offset keeps two concurrent runs of this binary apart too.
fn port_range() -> std::ops::RangeInclusive<u16> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    assert!(n < 15, "more tests than port ranges");
    let base = 20_000 + (std::process::id() % 16) as u16 * 600 + n * 40;
    base..=base + 39
}

/// One scheduler on the local backend, logging into a temp dir; kills whatever game server it
/// tagged when dropped (so that a failing test leaves nothing behind).
struct Fixture {
    dir: TempDir,
    scheduler: Scheduler,
    ports: std::ops::RangeInclusive<u16>,
}

impl Fixture {
    /// Must run inside a Tokio runtime.
    fn new(test: &str, start_timeout: Duration, stop_grace: Duration) -> Fixture {
        let dir = TempDir::new(test);
        let ports = port_range();
        let backend = Local::new(LocalConfig {
            host: "127.0.0.1".into(),
            log_dir: dir.path.join("logs"),
            ports: ports.clone(),
            ..Default::default()
        });
        let scheduler = Scheduler::builder()
            .regions(["Frankfurt", "Tokyo"])
            .backend(backend)
            .start_timeout(start_timeout)
            .stop_grace(stop_grace)
            .build()
            .expect("build the scheduler");
        Fixture {
            dir,
            scheduler,
            ports,
        }
    }

    fn tag(&self) -> String {
        format!("{TAG_VAR}={}", self.dir.name)
    }

    /// A deployment running `command`, tagged for this fixture.
    fn spec(&self, rooms_per_process: u32, command: Vec<String>) -> DeploymentSpec {
        DeploymentSpec {
            rooms_per_process,
            container_port: 7777,
            command,
            env: vec![env(TAG_VAR, &self.dir.name)],
            ..Default::default()
        }
    }

    async fn deploy(&self, rooms_per_process: u32, command: Vec<String>) {
        self.scheduler
            .create_deployment(APP, self.spec(rooms_per_process, command))
            .await
            .expect("create deployment");
    }

    async fn process(&self, pid: ProcessId) -> Process {
        self.scheduler
            .get_process(APP, pid)
            .await
            .expect("get process")
    }

    /// Polls until the process has `status`; on timeout the message shows its log.
    async fn wait_status(&self, pid: ProcessId, status: ProcessStatus) -> Process {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let p = self.process(pid).await;
            if p.status == status {
                return p;
            }
            if Instant::now() >= deadline {
                panic!(
                    "process {pid} is {:?} after {DEADLINE:?}, wanted {status:?}; exit reason {:?}; log:\n{}",
                    p.status,
                    p.summary_exit_reason,
                    read_log(&p)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops every process the way a host program does on exit, then checks that each is
    /// STOPPED or FAILED and that no game server of this test is left on the machine.
    ///
    /// The statuses are polled rather than read once: `stop_all_processes` can return a moment
    /// before the last exit is applied (a bug shown by
    /// `stop_all_processes_has_applied_every_exit_when_it_returns`); this helper is not the
    /// place to show it in every test.
    async fn finish(self) {
        self.scheduler.stop_all_processes().await;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let all = processes(&self.scheduler).await;
            if all.iter().all(|p| p.status.is_terminated()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not all STOPPED or FAILED after stop_all_processes: {all:#?}"
            );
            tokio::time::sleep(POLL).await;
        }
        let tag = self.tag();
        let left = eventually("every game server of the test to be gone", || {
            pids_with_env(&tag).is_empty().then_some(())
        })
        .await;
        assert!(left.is_ok(), "left behind: {:?}", pids_with_env(&tag));
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        kill_tagged(&self.tag());
    }
}

/// SIGKILLs every live process tagged `tag`. After a failed assertion a start may still be on
/// its way (the scheduler's task carries it out), so a panicking test looks again for a while.
fn kill_tagged(tag: &str) {
    let rounds = if std::thread::panicking() { 20 } else { 1 };
    for round in 0..rounds {
        if round > 0 {
            std::thread::sleep(Duration::from_millis(25));
        }
        for pid in pids_with_env(tag) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: value.into(),
    }
}

fn read_log(p: &Process) -> String {
    p.log_path
        .as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .unwrap_or_else(|| format!("(no log at {:?})", p.log_path))
}

/// Calls `check` until it returns `Some`, at most for [`DEADLINE`].
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T, String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {DEADLINE:?} waiting for {what}"));
        }
        tokio::time::sleep(POLL).await;
    }
}

// ----- /proc ----------------------------------------------------------------------------------

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

/// Whether the process exists and has not exited. A zombie (exited, not yet reaped by its
/// parent — an orphan's new parent may be slow to do so) does not run and holds no port.
fn alive(pid: i32) -> bool {
    matches!(stat_of(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// The live members of process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| matches!(stat_of(pid), Some((s, g)) if g == pgid && s != 'Z' && s != 'X'))
        .collect()
}

/// Live processes whose environment holds `entry` (`NAME=value`).
fn pids_with_env(entry: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|e| e == entry.as_bytes()))
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// The process group of a game server (its leader's pid), found from its HATHORA_PROCESS_ID.
async fn os_group_of(process_id: &str) -> i32 {
    let entry = format!("HATHORA_PROCESS_ID={process_id}");
    eventually(&format!("an OS process with {entry}"), || {
        pids_with_env(&entry)
            .into_iter()
            .find(|&pid| matches!(stat_of(pid), Some((_, g)) if g == pid))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

// ----- talking to game servers ------------------------------------------------------------------

/// Connects to `port`, sends `request`, and reads until the server closes the connection.
fn tcp_exchange(port: u16, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.write_all(request).expect("send");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .unwrap_or_else(|e| panic!("read from 127.0.0.1:{port}: {e}"));
    answer
}

/// The sample server's JSON line over TCP.
fn sample_answer_tcp(port: u16) -> serde_json::Value {
    let line = tcp_exchange(port, b"");
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

fn port_of(p: &Process) -> u16 {
    p.exposed_port
        .as_ref()
        .unwrap_or_else(|| panic!("process {} has no exposed port", p.process_id))
        .port
}

// ----- tests --------------------------------------------------------------------------------------

/// `python3 -m http.server {port}` becomes RUNNING once it listens, with started_at and the
/// exposed port; an HTTP client gets an answer there; its stderr lands in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_server_becomes_running_and_serves_on_its_exposed_port() {
    let fx = Fixture::new("http", Duration::from_secs(60), Duration::from_secs(5));
    let www = fx.dir.path.join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    std::fs::write(www.join("hello.txt"), "hello from roomsched\n").expect("write");
    let command = [
        "python3",
        "-m",
        "http.server",
        "{port}",
        "--bind",
        "127.0.0.1",
        "--directory",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([www.display().to_string()])
    .collect();
    fx.deploy(2, command).await;

    let placed = fx
        .scheduler
        .create_room(room_in("Frankfurt"))
        .await
        .expect("create room");
    let p = fx
        .wait_status(placed.process_id, ProcessStatus::Running)
        .await;
    let started = p.started_at.expect("started_at is set once RUNNING");
    assert!(started >= p.created_at);
    let exposed = p.exposed_port.clone().expect("exposed_port once RUNNING");
    assert_eq!(exposed.host, "127.0.0.1");
    assert_eq!(exposed.name, "default");
    assert_eq!(exposed.transport_type, TransportType::Tcp);
    assert!(
        fx.ports.contains(&exposed.port),
        "port {} outside the backend's range {:?}",
        exposed.port,
        fx.ports
    );
    assert_eq!(p.rooms_allocated, 1);
    assert!(p.summary_exit_reason.is_empty());

    let room = fx
        .scheduler
        .get_room(APP, &placed.room_id)
        .await
        .expect("room");
    assert_eq!(room.status, RoomStatus::Active);
    let conn = fx
        .scheduler
        .connection_info(APP, &placed.room_id)
        .await
        .expect("connection info");
    assert_eq!(conn.exposed_port.as_ref(), Some(&exposed));

    let answer = tcp_exchange(exposed.port, b"GET /hello.txt HTTP/1.0\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.0 200"), "answer: {answer:?}");
    assert!(
        answer.ends_with("hello from roomsched\n"),
        "answer: {answer:?}"
    );
    // http.server logs each request on stderr, which goes to the process's log file.
    let logged = eventually("the request in the log", || {
        read_log(&p).contains("GET /hello.txt").then_some(())
    })
    .await;
    assert!(logged.is_ok(), "log: {}", read_log(&p));

    check_invariants(&fx.scheduler).await;
    fx.finish().await;
}

/// The sample game server answers a TCP client with its own process id and room; it exits on
/// SIGTERM by itself (well before the grace), and says so in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_server_answers_tcp_clients_and_exits_on_sigterm() {
    // A grace far longer than the test: a STOPPED process proves it exited on SIGTERM.
    let grace = Duration::from_secs(300);
    let fx = Fixture::new("sample-tcp", Duration::from_secs(60), grace);
    fx.deploy(4, sample(&[])).await;
    let config = r#"{"map": "dust 2", "mode": "ranked"}"#;
    let placed = fx
        .scheduler
        .create_room(CreateRoom {
            room_id: Some("match-1".into()),
            room_config: config.into(),
            ..room_in("Frankfurt")
        })
        .await
        .expect("create room");
    let pid = placed.process_id;
    let p = fx.wait_status(pid, ProcessStatus::Running).await;
    assert!(p.started_at.is_some());
    let port = port_of(&p);

    let json = sample_answer_tcp(port);
    assert_eq!(json["process_id"], pid.to_string());
    assert_eq!(json["app_id"], APP);
    assert_eq!(json["deployment_id"], 1);
    assert_eq!(json["region"], "Frankfurt");
    assert_eq!(json["rooms_per_process"], 4);
    assert_eq!(json["initial_room_id"], "match-1");
    assert_eq!(json["initial_room_config"], config);
    assert_eq!(json["hostname"], "127.0.0.1");
    assert_eq!(json["port"], port);
    // A second client gets the same answer: the server keeps serving.
    assert_eq!(sample_answer_tcp(port)["process_id"], pid.to_string());
    assert!(
        read_log(&p).contains(&format!("ready: tcp port {port}, process {pid}")),
        "log: {}",
        read_log(&p)
    );

    let stopping = fx.scheduler.stop_process(APP, pid).await.expect("stop");
    assert_eq!(stopping.status, ProcessStatus::Stopping);
    let stopped = fx.wait_status(pid, ProcessStatus::Stopped).await;
    assert_eq!(stopped.summary_exit_reason, "stopped by request");
    assert!(read_log(&p).contains("SIGTERM received, shutting down"));
    let room = fx.scheduler.get_room(APP, "match-1").await.expect("room");
    assert_eq!(room.status, RoomStatus::Destroyed);
    fx.finish().await;
}

/// A UDP-only game server is RUNNING once its UDP socket is bound (nothing listens on TCP)
/// and answers a datagram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_server_is_detected_as_ready_and_answers_a_datagram() {
    let fx = Fixture::new("udp", Duration::from_secs(60), Duration::from_secs(5));
    let spec = DeploymentSpec {
        transport_type: TransportType::Udp,
        ..fx.spec(2, sample(&["--udp"]))
    };
    fx.scheduler
        .create_deployment(APP, spec)
        .await
        .expect("create deployment");
    let placed = fx
        .scheduler
        .create_room(room_in("Tokyo"))
        .await
        .expect("create room");
    let p = fx
        .wait_status(placed.process_id, ProcessStatus::Running)
        .await;
    let exposed = p.exposed_port.clone().expect("exposed port");
    assert_eq!(exposed.transport_type, TransportType::Udp);
    assert!(p.started_at.is_some());
    assert!(
        TcpStream::connect(("127.0.0.1", exposed.port)).is_err(),
        "nothing should listen on TCP port {}",
        exposed.port
    );

    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a client socket");
    socket.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    socket
        .send_to(b"hello", ("127.0.0.1", exposed.port))
        .expect("send a datagram");
    let mut buf = [0u8; 4096];
    let (n, from) = socket.recv_from(&mut buf).expect("an answer datagram");
    assert_eq!(from.port(), exposed.port);
    let json: serde_json::Value = serde_json::from_slice(&buf[..n]).expect("JSON");
    assert_eq!(json["process_id"], placed.process_id.to_string());
    assert_eq!(json["region"], "Tokyo");
    assert!(read_log(&p).contains(&format!("ready: udp port {}", exposed.port)));
    fx.finish().await;
}

/// A game server that never binds fails after the start timeout, with an exit reason naming
/// the port; its room is placed again on a new process (both allocations are in the room's
/// history); the whole failed group (the shell and its background child) is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_binds_fails_and_its_room_is_placed_again() {
    let fx = Fixture::new(
        "never-binds",
        Duration::from_secs(2),
        Duration::from_secs(5),
    );
    let command = ["sh", "-c", "sleep 1000 & sleep 1000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    fx.deploy(2, command).await;
    let placed = fx
        .scheduler
        .create_room(room_in("Frankfurt"))
        .await
        .expect("create room");
    assert_eq!(placed.status, RoomStatus::Scheduling);
    let first = placed.process_id;
    let pgid = os_group_of(&first.to_string()).await;
    // The shell and its background `sleep`, until the timeout kills them.
    let members = eventually("the shell and its background sleep", || {
        let m = group_members(pgid);
        (m.len() >= 2).then_some(m)
    })
    .await
    .expect("the group has two processes");
    let real_port: u16 = {
        let env = std::fs::read(format!("/proc/{pgid}/environ")).expect("environ");
        let port = env
            .split(|&b| b == 0)
            .find_map(|e| e.strip_prefix(b"PORT="))
            .expect("PORT in the environment");
        std::str::from_utf8(port)
            .expect("utf8")
            .parse()
            .expect("a port")
    };

    let failed = fx.wait_status(first, ProcessStatus::Failed).await;
    let reason = &failed.summary_exit_reason;
    assert!(reason.contains("did not bind port"), "reason: {reason:?}");
    assert!(
        reason.contains(&format!("port {real_port}")) || reason.contains("port 7777"),
        "the reason should name the port: {reason:?}"
    );
    assert!(
        reason.contains("2s"),
        "the reason should name the timeout: {reason:?}"
    );
    assert!(failed.terminated_at.is_some());
    assert!(failed.started_at.is_none());
    assert!(failed.exposed_port.is_none());
    assert_eq!(failed.rooms_allocated, 0);

    let room = fx
        .scheduler
        .get_room(APP, &placed.room_id)
        .await
        .expect("room");
    assert_eq!(
        room.allocations.len(),
        2,
        "allocations: {:?}",
        room.allocations
    );
    assert_eq!(room.allocations[0].process_id, first);
    assert!(room.allocations[0].unscheduled_at.is_some());
    let second = room.allocations[1].process_id;
    assert_ne!(second, first);
    assert!(room.allocations[1].unscheduled_at.is_none());
    assert_eq!(
        room.current_allocation.as_ref().map(|a| a.process_id),
        Some(second)
    );
    assert_ne!(room.status, RoomStatus::Destroyed);
    // The second process is a real process too, in a group of its own.
    let second_pgid = os_group_of(&second.to_string()).await;
    assert_ne!(second_pgid, pgid);

    // Nothing of the failed group is left running.
    let gone = eventually("the failed group to be gone", || {
        group_members(pgid).is_empty().then_some(())
    })
    .await;
    assert!(
        gone.is_ok(),
        "still alive in group {pgid}: {:?}",
        group_members(pgid)
    );
    for pid in members {
        assert!(!alive(pid), "process {pid} of the failed group is alive");
    }
    assert!(pids_with_env(&format!("HATHORA_PROCESS_ID={first}")).is_empty());
    check_invariants(&fx.scheduler).await;
    fx.finish().await;
}

/// A RUNNING game server holding rooms exits with code 3: FAILED "exited with code 3", its
/// rooms DESTROYED, its slots free, and the next room starts a new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_exiting_with_code_3_fails_and_frees_its_rooms() {
    let fx = Fixture::new("exit-3", Duration::from_secs(60), Duration::from_secs(5));
    fx.deploy(2, python(EXIT_ON_CONNECT, &["3"])).await;
    let a = fx
        .scheduler
        .create_room(room_in("Frankfurt"))
        .await
        .expect("room a");
    let b = fx
        .scheduler
        .create_room(room_in("Frankfurt"))
        .await
        .expect("room b");
    assert_eq!(a.process_id, b.process_id, "both rooms fit on one process");
    let pid = a.process_id;
    let p = fx.wait_status(pid, ProcessStatus::Running).await;
    assert_eq!(p.rooms_allocated, 2);
    let pgid = os_group_of(&pid.to_string()).await;

    // Any client makes this server exit with code 3.
    drop(TcpStream::connect(("127.0.0.1", port_of(&p))).expect("connect"));
    let failed = fx.wait_status(pid, ProcessStatus::Failed).await;
    assert_eq!(failed.summary_exit_reason, "exited with code 3");
    assert!(failed.terminated_at.is_some());
    assert!(failed.started_at.is_some());
    assert_eq!(failed.rooms_allocated, 0);
    assert!(fx
        .scheduler
        .list_active_rooms(APP, pid)
        .await
        .expect("active rooms")
        .is_empty());
    for placed in [&a, &b] {
        let room = fx
            .scheduler
            .get_room(APP, &placed.room_id)
            .await
            .expect("room");
        assert_eq!(room.status, RoomStatus::Destroyed);
        assert!(room.current_allocation.is_none());
        assert_eq!(room.allocations.len(), 1);
        assert!(room.allocations[0].unscheduled_at.is_some());
    }
    assert!(!alive(pgid));

    // The failed process takes no room: the next one starts a new process.
    let c = fx
        .scheduler
        .create_room(room_in("Frankfurt"))
        .await
        .expect("room c");
    assert_ne!(c.process_id, pid);
    let fresh = fx.wait_status(c.process_id, ProcessStatus::Running).await;
    assert_eq!(fresh.rooms_allocated, 1);
    assert_ne!(os_group_of(&c.process_id.to_string()).await, pgid);
    check_invariants(&fx.scheduler).await;
    fx.finish().await;
}

/// A RUNNING game server that exits 0 by itself is STOPPED, and its room destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_exiting_0_by_itself_is_stopped() {
    let fx = Fixture::new("exit-0", Duration::from_secs(60), Duration::from_secs(5));
    fx.deploy(2, python(EXIT_ON_CONNECT, &["0"])).await;
    let placed = fx
        .scheduler
        .create_room(room_in("Frankfurt"))
        .await
        .expect("create room");
    let p = fx
        .wait_status(placed.process_id, ProcessStatus::Running)
        .await;
    drop(TcpStream::connect(("127.0.0.1", port_of(&p))).expect("connect"));
    let stopped = fx.wait_status(p.process_id, ProcessStatus::Stopped).await;
    assert_eq!(stopped.summary_exit_reason, "exited with code 0");
    assert!(stopped.terminated_at.is_some());
    assert!(stopped.stopping_at.is_none(), "nobody asked it to stop");
    assert_eq!(stopped.rooms_allocated, 0);
    let room = fx
        .scheduler
        .get_room(APP, &placed.room_id)
        .await
        .expect("room");
    assert_eq!(room.status, RoomStatus::Destroyed);
    check_invariants(&fx.scheduler).await;
    fx.finish().await;
}

/// StopProcess on a game server that ignores SIGTERM (and whose forked child ignores it too):
/// SIGTERM changes nothing, SIGKILL comes after the grace, and no process of its group is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_a_server_ignoring_sigterm_and_its_child_after_the_grace() {
    let grace = Duration::from_secs(1);
    let fx = Fixture::new("ignore-term", Duration::from_secs(60), grace);
    fx.deploy(2, python(IGNORE_SIGTERM, &[])).await;
    let placed = fx
        .scheduler
        .create_room(room_in("Frankfurt"))
        .await
        .expect("create room");
    let pid = placed.process_id;
    let p = fx.wait_status(pid, ProcessStatus::Running).await;
    let pgid = os_group_of(&pid.to_string()).await;
    // The child forks before the parent binds, so both exist once RUNNING.
    let members = group_members(pgid);
    assert_eq!(members.len(), 2, "leader and child: {members:?}");

    let stopping = fx.scheduler.stop_process(APP, pid).await.expect("stop");
    assert_eq!(stopping.status, ProcessStatus::Stopping);
    let stopping_at = stopping.stopping_at.expect("stopping_at");
    // SIGTERM is ignored: both processes are still there (the grace is far from over).
    assert_eq!(group_members(pgid).len(), 2);

    let stopped = fx.wait_status(pid, ProcessStatus::Stopped).await;
    assert_eq!(stopped.summary_exit_reason, "stopped by request");
    let took = (stopped.terminated_at.expect("terminated_at") - stopping_at)
        .to_std()
        .expect("terminated after stopping");
    assert!(
        took >= grace - Duration::from_millis(50),
        "killed {took:?} after the stop, before the grace of {grace:?}"
    );
    let gone = eventually("the group to be gone", || {
        group_members(pgid).is_empty().then_some(())
    })
    .await;
    assert!(
        gone.is_ok(),
        "alive in group {pgid}: {:?}",
        group_members(pgid)
    );
    for member in members {
        assert!(!alive(member), "process {member} survived the stop");
    }
    assert!(read_log(&p).contains("ignoring SIGTERM"));
    fx.finish().await;
}

/// The game server sees every HATHORA_* variable, PORT and the deployment's own variables with
/// the right values (the backend's win over the deployment's); `{port}` and `{port:NAME}` are
/// replaced in argv; its stdout and stderr go to the file named by the process's log_path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn game_server_sees_every_variable_and_its_output_goes_to_its_log() {
    let fx = Fixture::new("env", Duration::from_secs(60), Duration::from_secs(5));
    let out_dir = fx.dir.path.join("env-out");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let mut spec = fx.spec(
        3,
        python(DUMP_ENV, &["--main={port}", "--voice={port:voice}"]),
    );
    spec.additional_container_ports = vec![ContainerPort {
        name: "voice".into(),
        port: 7778,
        transport_type: TransportType::Udp,
    }];
    spec.env.extend([
        env("ENV_OUT_DIR", &out_dir.display().to_string()),
        env("GAME_MODE", "ranked"),
        // Set by the backend on top of the deployment's env: these must not win.
        env("PORT", "1"),
        env("HATHORA_REGION", "Nowhere"),
    ]);
    let dep = fx
        .scheduler
        .create_deployment(APP, spec)
        .await
        .expect("create deployment");
    let config = r#"{"map": "dust 2", "players": 8, "note": "quotes ' and \" and spaces"}"#;
    let placed = fx
        .scheduler
        .create_room(CreateRoom {
            room_id: Some("env-room-1".into()),
            room_config: config.into(),
            ..room_in("Tokyo")
        })
        .await
        .expect("create room");
    let pid = placed.process_id;
    let p = fx.wait_status(pid, ProcessStatus::Running).await;
    let port = port_of(&p);
    let voice = p
        .additional_exposed_ports
        .iter()
        .find(|e| e.name == "voice")
        .expect("the voice port")
        .clone();
    assert_eq!(voice.transport_type, TransportType::Udp);
    assert_ne!(voice.port, port);

    // The script wrote the file before it bound its port, so it is there once RUNNING.
    let dumped: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join(format!("{pid}.json"))).expect("the env dump"),
    )
    .expect("JSON");
    let var = |name: &str| dumped["env"][name].as_str().map(str::to_string);
    let expected = [
        ("HATHORA_PROCESS_ID", pid.to_string()),
        ("HATHORA_APP_ID", APP.to_string()),
        ("HATHORA_DEPLOYMENT_ID", dep.deployment_id.to_string()),
        ("HATHORA_REGION", "Tokyo".to_string()),
        ("HATHORA_ROOMS_PER_PROCESS", "3".to_string()),
        ("HATHORA_INITIAL_ROOM_ID", "env-room-1".to_string()),
        ("HATHORA_INITIAL_ROOM_CONFIG", config.to_string()),
        ("HATHORA_HOSTNAME", "127.0.0.1".to_string()),
        ("HATHORA_DEFAULT_PORT", port.to_string()),
        ("PORT", port.to_string()),
        ("HATHORA_PORT_VOICE", voice.port.to_string()),
        ("GAME_MODE", "ranked".to_string()),
    ];
    for (name, value) in &expected {
        assert_eq!(var(name).as_deref(), Some(value.as_str()), "{name}");
    }
    assert_eq!(
        dumped["argv"],
        serde_json::json!([format!("--main={port}"), format!("--voice={}", voice.port)])
    );

    // stdout and stderr go to <log dir>/<process id>.log, named by log_path.
    let log_path = p.log_path.clone().expect("log_path");
    assert_eq!(
        Path::new(&log_path),
        fx.dir.path.join("logs").join(format!("{pid}.log"))
    );
    let log = read_log(&p);
    assert!(log.contains("hello from stdout"), "log: {log:?}");
    assert!(log.contains("hello from stderr"), "log: {log:?}");

    // A process started with no room (pre-warming) has an empty initial room.
    let warm = fx
        .scheduler
        .create_process(APP, "Tokyo", None)
        .await
        .expect("create process");
    fx.wait_status(warm.process_id, ProcessStatus::Running)
        .await;
    let dumped: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join(format!("{}.json", warm.process_id)))
            .expect("the env dump"),
    )
    .expect("JSON");
    assert_eq!(
        dumped["env"]["HATHORA_INITIAL_ROOM_ID"]
            .as_str()
            .unwrap_or(""),
        ""
    );
    assert_eq!(
        dumped["env"]["HATHORA_INITIAL_ROOM_CONFIG"]
            .as_str()
            .unwrap_or(""),
        ""
    );
    assert_eq!(
        dumped["env"]["HATHORA_PROCESS_ID"],
        warm.process_id.to_string()
    );
    fx.finish().await;
}

/// 50 concurrent CreateRoom calls with 5 rooms per process start exactly 10 real processes,
/// on 10 distinct ports, all RUNNING, each answering with its own process id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_rooms_start_exactly_ten_real_processes() {
    let fx = Fixture::new("burst", Duration::from_secs(60), Duration::from_secs(5));
    fx.deploy(5, sample(&[])).await;
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let s = fx.scheduler.clone();
            tokio::spawn(async move { s.create_room(room_in("Frankfurt")).await })
        })
        .collect();
    let mut rooms_per_process: HashMap<ProcessId, usize> = HashMap::new();
    for call in calls {
        let placed = call.await.expect("task").expect("create room");
        *rooms_per_process.entry(placed.process_id).or_default() += 1;
    }
    assert_eq!(rooms_per_process.len(), 10, "{rooms_per_process:?}");
    assert!(
        rooms_per_process.values().all(|&n| n == 5),
        "{rooms_per_process:?}"
    );
    assert_eq!(processes(&fx.scheduler).await.len(), 10);

    let mut ports = HashSet::new();
    let mut groups = HashSet::new();
    for &pid in rooms_per_process.keys() {
        let p = fx.wait_status(pid, ProcessStatus::Running).await;
        assert_eq!(p.rooms_allocated, 5);
        assert!(p.started_at.is_some());
        ports.insert(port_of(&p));
        groups.insert(os_group_of(&pid.to_string()).await);
        assert_eq!(
            sample_answer_tcp(port_of(&p))["process_id"],
            pid.to_string()
        );
    }
    assert_eq!(ports.len(), 10, "distinct ports: {ports:?}");
    assert_eq!(groups.len(), 10, "distinct OS processes: {groups:?}");
    // Exactly ten game servers exist on the machine, no more.
    assert_eq!(pids_with_env(&fx.tag()).len(), 10);
    check_invariants(&fx.scheduler).await;
    fx.finish().await;
}

/// A port with a connection in TIME_WAIT is not free for a game server that binds without
/// SO_REUSEADDR (the default of a plain socket in Python, C, ...): bind() fails with
/// EADDRINUSE. Such ports are common right after roomsched restarts (it hands out the same
/// ports again) or after a game server that closed its clients' connections first. The
/// backend must not hand one out. (It checks a port with `std::net::TcpListener::bind`,
/// which sets SO_REUSEADDR and so succeeds on a TIME_WAIT port.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_time_wait_is_not_handed_to_a_game_server() {
    let fx = Fixture::new("time-wait", Duration::from_secs(60), Duration::from_secs(5));
    // A fresh backend hands out the first port of its range first: leave a TIME_WAIT there
    // (the side that closes first keeps it; here the server side, on that port).
    let first = *fx.ports.start();
    {
        let listener = std::net::TcpListener::bind(("127.0.0.1", first)).expect("bind");
        let client = TcpStream::connect(("127.0.0.1", first)).expect("connect");
        let (server_side, _) = listener.accept().expect("accept");
        drop(server_side);
        let mut buf = [0u8; 1];
        client.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        assert_eq!(
            (&client).read(&mut buf).expect("EOF from the server side"),
            0
        );
        drop(client);
    }
    const PLAIN_BIND: &str = r#"
import os, socket, time
s = socket.socket()  # no SO_REUSEADDR, like most servers written without it in mind
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen()
while True:
    time.sleep(1000)
"#;
    fx.deploy(1, python(PLAIN_BIND, &[])).await;
    let placed = fx
        .scheduler
        .create_room(room_in("Frankfurt"))
        .await
        .expect("create room");
    let deadline = Instant::now() + DEADLINE;
    let p = loop {
        let p = fx.process(placed.process_id).await;
        if p.status != ProcessStatus::Starting || Instant::now() >= deadline {
            break p;
        }
        tokio::time::sleep(POLL).await;
    };
    let log = read_log(&p);
    // Clean up first: on failure the room has been placed again on a new process.
    fx.finish().await;
    assert_eq!(
        p.status,
        ProcessStatus::Running,
        "the game server could not bind the port it was given ({}); log:\n{log}",
        p.summary_exit_reason,
    );
}

/// On shutdown (`stop_all_processes`, what `roomsched serve` does on SIGTERM) each game server
/// should get one SIGTERM: many servers take a second one as "quit now, skip the clean
/// shutdown". It gets two, sent a moment apart: one from stopping the process
/// (`Backend::stop`), one from `Backend::shutdown`. Signals that arrive before the first is
/// delivered merge into one, so a server sees both only when it runs in between; the server
/// below busy-waits after binding (so it is on a CPU and takes the first signal at once) and
/// counts deliveries with a wakeup fd. Repeated on fresh schedulers for the same reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_each_game_server_one_sigterm() {
    const ROUNDS: usize = 20;
    const COUNT_SIGTERMS: &str = r#"
import os, signal, socket, time
r, w = os.pipe()
os.set_blocking(w, False)
signal.set_wakeup_fd(w)  # one byte per delivered signal
signal.signal(signal.SIGTERM, lambda signum, frame: None)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen()
os.set_blocking(r, False)
got = b""
while not got:
    try:
        got = os.read(r, 16)
    except BlockingIOError:
        pass
deadline = time.monotonic() + 0.2
while time.monotonic() < deadline:
    try:
        got += os.read(r, 16)
    except BlockingIOError:
        pass
print("SIGTERM deliveries:", len(got), flush=True)
"#;
    let dir = TempDir::new("one-sigterm");
    let tag = format!("{TAG_VAR}={}", dir.name);
    let ports = port_range();
    let mut counts = Vec::new();
    for round in 0..ROUNDS {
        let backend = Local::new(LocalConfig {
            log_dir: dir.path.join(format!("logs-{round}")),
            ports: ports.clone(),
            ..Default::default()
        });
        let scheduler = Scheduler::builder()
            .regions(["Frankfurt"])
            .backend(backend)
            .stop_grace(Duration::from_secs(20))
            .build()
            .expect("build the scheduler");
        let spec = DeploymentSpec {
            rooms_per_process: 1,
            container_port: 7777,
            command: python(COUNT_SIGTERMS, &[]),
            env: vec![env(TAG_VAR, &dir.name)],
            ..Default::default()
        };
        scheduler
            .create_deployment(APP, spec)
            .await
            .expect("deployment");
        let placed = scheduler
            .create_room(room_in("Frankfurt"))
            .await
            .expect("create room");
        let deadline = Instant::now() + DEADLINE;
        let p = loop {
            let p = scheduler
                .get_process(APP, placed.process_id)
                .await
                .expect("get process");
            if p.status == ProcessStatus::Running || Instant::now() >= deadline {
                break p;
            }
            tokio::time::sleep(POLL).await;
        };
        assert_eq!(p.status, ProcessStatus::Running, "log: {}", read_log(&p));
        scheduler.stop_all_processes().await;
        let log = read_log(&p);
        let count: usize = log
            .lines()
            .find_map(|l| l.strip_prefix("SIGTERM deliveries: "))
            .unwrap_or_else(|| panic!("the server did not exit cleanly; log: {log:?}"))
            .parse()
            .expect("a count");
        counts.push(count);
        let gone = eventually("the game server to be gone", || {
            pids_with_env(&tag).is_empty().then_some(())
        })
        .await;
        assert!(gone.is_ok(), "left behind: {:?}", pids_with_env(&tag));
    }
    assert!(
        counts.iter().all(|&n| n == 1),
        "SIGTERMs delivered to the game server on shutdown, per round: {counts:?}"
    );
}

/// `Scheduler::stop_all_processes` promises that when it returns every process has exited
/// *and its exit has been applied*. Repeated on fresh schedulers, since one round hits the race
/// only sometimes: the local backend flips the "exited" flag that `Backend::shutdown` waits for
/// before it sends the exit event, so the `settle()` barrier can overtake the exit, and a
/// process is still STOPPING after `stop_all_processes` has returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_all_processes_has_applied_every_exit_when_it_returns() {
    const ROUNDS: usize = 40;
    let dir = TempDir::new("stop-all");
    let tag = format!("{TAG_VAR}={}", dir.name);
    let ports = port_range();
    let mut stuck = Vec::new();
    for round in 0..ROUNDS {
        let backend = Local::new(LocalConfig {
            log_dir: dir.path.join(format!("logs-{round}")),
            ports: ports.clone(),
            ..Default::default()
        });
        let scheduler = Scheduler::builder()
            .regions(["Frankfurt"])
            .backend(backend)
            .stop_grace(Duration::from_secs(5))
            .build()
            .expect("build the scheduler");
        let spec = DeploymentSpec {
            rooms_per_process: 1,
            container_port: 7777,
            command: vec!["sleep".into(), "1000".into()],
            env: vec![env(TAG_VAR, &dir.name)],
            ..Default::default()
        };
        scheduler
            .create_deployment(APP, spec)
            .await
            .expect("deployment");
        let p = scheduler
            .create_process(APP, "Frankfurt", None)
            .await
            .expect("create process");
        os_group_of(&p.process_id.to_string()).await;

        scheduler.stop_all_processes().await;
        let after = scheduler
            .get_process(APP, p.process_id)
            .await
            .expect("get process");
        if !after.status.is_terminated() {
            stuck.push((round, after.status));
        }
        let gone = eventually("the sleep to be gone", || {
            pids_with_env(&tag).is_empty().then_some(())
        })
        .await;
        assert!(gone.is_ok(), "left behind: {:?}", pids_with_env(&tag));
    }
    assert!(
        stuck.is_empty(),
        "stop_all_processes returned before the exit was applied in {} of {ROUNDS} rounds \
         (round, status): {stuck:?}",
        stuck.len()
    );
}

// ----- the real binary ------------------------------------------------------------------------

/// A `roomsched serve` child process; killed (with what it tagged) if the test fails.
struct Serve {
    child: std::process::Child,
    addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
    tag: String,
}

impl Serve {
    /// `roomsched serve` with the local backend and the memory store (game servers are
    /// stopped when it exits).
    fn spawn(data_dir: &Path, tag: &str) -> Serve {
        Serve::spawn_with_store(data_dir, tag, "memory")
    }

    fn spawn_with_store(data_dir: &Path, tag: &str, store: &str) -> Serve {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_roomsched"));
        command
            .args([
                "serve",
                "--backend",
                "local",
                "--store",
                store,
                "--data-dir",
            ])
            .arg(data_dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--stop-grace",
                "2s",
                "--start-timeout",
                "20s",
                "--regions",
                "Frankfurt",
            ])
            .env("ROOMSCHED_LOG", "info");
        let serve::Spawned {
            child,
            addr,
            stderr: lines,
            stderr_done: _,
        } = serve::spawn(command, DEADLINE);
        Serve {
            child,
            addr,
            stderr: lines,
            tag: tag.to_string(),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        kill_tagged(&self.tag);
    }
}

/// A real `roomsched serve --backend local`, driven over gRPC, stopped with SIGTERM: it exits 0
/// and its game servers, stopped with SIGTERM too, are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_the_local_backend_leaves_no_game_server_after_sigterm() {
    let dir = TempDir::new("serve");
    let tag = format!("{TAG_VAR}={}", dir.name);
    let mut serve = Serve::spawn(&dir.path, &tag);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", serve.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect to roomsched");
    let mut deployments =
        pb::deployment_service_client::DeploymentServiceClient::new(channel.clone());
    let mut rooms = pb::room_service_client::RoomServiceClient::new(channel.clone());
    let mut processes = pb::process_service_client::ProcessServiceClient::new(channel);
    let app = "served-game";
    deployments
        .create_deployment(pb::CreateDeploymentRequest {
            app_id: app.into(),
            rooms_per_process: 2,
            transport_type: pb::TransportType::Tcp as i32,
            container_port: 7777,
            command: sample(&[]),
            env: vec![pb::EnvVar {
                name: TAG_VAR.into(),
                value: dir.name.clone(),
            }],
            ..Default::default()
        })
        .await
        .expect("create deployment");
    let mut process_ids = HashSet::new();
    for _ in 0..3 {
        let placed = rooms
            .create_room(pb::CreateRoomRequest {
                app_id: app.into(),
                region: "Frankfurt".into(),
                ..Default::default()
            })
            .await
            .expect("create room")
            .into_inner();
        process_ids.insert(placed.process_id);
    }
    assert_eq!(process_ids.len(), 2, "3 rooms, 2 per process");

    let mut log_paths = Vec::new();
    let mut os_pids = Vec::new();
    for id in &process_ids {
        let deadline = Instant::now() + DEADLINE;
        let p = loop {
            let p = processes
                .get_process(pb::GetProcessRequest {
                    app_id: app.into(),
                    process_id: id.clone(),
                })
                .await
                .expect("get process")
                .into_inner();
            if p.status() == pb::ProcessStatus::Running {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "process {id} is {:?}; roomsched stderr:\n{}",
                p.status(),
                serve.stderr()
            );
            tokio::time::sleep(POLL).await;
        };
        let port = u16::try_from(p.exposed_port.expect("exposed port").port).expect("port");
        assert_eq!(sample_answer_tcp(port)["process_id"], id.as_str());
        assert!(
            Path::new(&p.log_path).starts_with(dir.path.join("logs")),
            "log_path {:?}",
            p.log_path
        );
        log_paths.push(p.log_path);
        os_pids.push(os_group_of(id).await);
    }
    assert_eq!(pids_with_env(&tag).len(), 2);

    kill(
        Pid::from_raw(i32::try_from(serve.child.id()).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("SIGTERM roomsched");
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = serve.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "roomsched serve did not exit after SIGTERM; stderr:\n{}",
            serve.stderr()
        );
        tokio::time::sleep(POLL).await;
    };
    assert!(
        status.success(),
        "roomsched serve exited with {status}; stderr:\n{}",
        serve.stderr()
    );
    // roomsched waited for its game servers before exiting: none is left.
    for pid in os_pids {
        assert!(!alive(pid), "game server {pid} outlived roomsched");
    }
    assert!(
        pids_with_env(&tag).is_empty(),
        "left: {:?}",
        pids_with_env(&tag)
    );
    // They were stopped politely (SIGTERM), not killed.
    for path in log_paths {
        let log = std::fs::read_to_string(&path).expect("game server log");
        assert!(
            log.contains("SIGTERM received, shutting down"),
            "{path}: {log:?}"
        );
    }
}

/// The local backend runs the deployment's command: a deployment without one is refused at
/// once (and starts nothing), instead of failing every process it would start.
#[tokio::test]
async fn a_deployment_without_a_command_is_refused() {
    let dir = std::env::temp_dir().join(format!("roomsched-nocmd-{}", std::process::id()));
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(Local::new(LocalConfig {
            log_dir: dir.clone(),
            ..Default::default()
        }))
        .build()
        .expect("scheduler");
    let spec = DeploymentSpec {
        rooms_per_process: 4,
        container_port: 7777,
        ..Default::default()
    };
    match s.create_deployment(APP, spec).await {
        Err(roomsched::Error::InvalidArgument {
            field: "command", ..
        }) => {}
        other => panic!("expected INVALID_ARGUMENT on command, got {other:?}"),
    }
    assert!(s.list_deployments(APP).await.expect("list").is_empty());
    let _ = std::fs::remove_dir_all(dir);
}
