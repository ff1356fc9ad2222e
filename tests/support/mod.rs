//! Helpers for tests that drive the library directly: a backend the test controls by hand,
//! and small builders. (Tests of the gRPC server use `tests/common`.)
#![allow(dead_code, unreachable_pub)]

use roomsched::backend::{Backend, BackendError, ExitStatus, ProcessEvents, StartSpec};
use roomsched::{
    CreateRoom, DeploymentSpec, ExposedPort, Process, ProcessFilter, ProcessId, ProcessStatus,
    Scheduler, TransportType,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A backend whose processes bind and exit only when the test says so (or at once, with
/// `auto_bind`). Stop requests are recorded; with `exit_on_stop` they exit at once.
#[derive(Clone, Default)]
pub struct ManualBackend {
    state: Arc<Mutex<ManualState>>,
}

#[derive(Default)]
struct ManualState {
    auto_bind: bool,
    exit_on_stop: bool,
    started: Vec<StartSpec>,
    events: HashMap<ProcessId, ProcessEvents>,
    stops: Vec<(ProcessId, Duration)>,
    next_port: u16,
}

impl ManualBackend {
    /// Processes bind on `bind()`, exit on `exit()`; stops are only recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Processes bind as soon as they start and exit as soon as they are stopped.
    pub fn automatic() -> Self {
        let b = Self::default();
        {
            let mut st = b.state.lock().unwrap();
            st.auto_bind = true;
            st.exit_on_stop = true;
        }
        b
    }

    pub fn exit_on_stop(self) -> Self {
        self.state.lock().unwrap().exit_on_stop = true;
        self
    }

    pub fn bind(&self, pid: ProcessId) {
        let mut st = self.state.lock().unwrap();
        st.next_port += 1;
        let port = 30_000 + st.next_port;
        if let Some(ev) = st.events.get(&pid) {
            ev.bound(pid, port_of(port), vec![]);
        }
    }

    pub fn exit(&self, pid: ProcessId, status: ExitStatus) {
        let st = self.state.lock().unwrap();
        if let Some(ev) = st.events.get(&pid) {
            ev.exited(pid, status);
        }
    }

    pub fn started(&self) -> Vec<StartSpec> {
        self.state.lock().unwrap().started.clone()
    }

    pub fn started_count(&self) -> usize {
        self.state.lock().unwrap().started.len()
    }

    pub fn stops(&self) -> Vec<(ProcessId, Duration)> {
        self.state.lock().unwrap().stops.clone()
    }
}

fn port_of(port: u16) -> ExposedPort {
    ExposedPort {
        host: "127.0.0.1".into(),
        name: "default".into(),
        port,
        transport_type: TransportType::Tcp,
    }
}

impl Backend for ManualBackend {
    fn name(&self) -> &'static str {
        "manual"
    }

    fn start(&self, spec: StartSpec) -> Result<(), BackendError> {
        let mut st = self.state.lock().unwrap();
        let pid = spec.process_id;
        st.events.insert(pid, spec.events.clone());
        if st.auto_bind {
            st.next_port += 1;
            spec.events
                .bound(pid, port_of(30_000 + st.next_port), vec![]);
        }
        st.started.push(spec);
        Ok(())
    }

    fn stop(&self, process_id: ProcessId, grace: Duration) {
        let mut st = self.state.lock().unwrap();
        st.stops.push((process_id, grace));
        if st.exit_on_stop {
            if let Some(ev) = st.events.get(&process_id) {
                ev.exited(process_id, ExitStatus::Signal(15));
            }
        }
    }
}

/// A backend that cannot launch anything.
pub struct Broken;

impl Backend for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }

    fn start(&self, _spec: StartSpec) -> Result<(), BackendError> {
        Err(BackendError("no such file".into()))
    }

    fn stop(&self, _process_id: ProcessId, _grace: Duration) {}
}

pub const APP: &str = "game";

pub fn deployment(rooms_per_process: u32) -> DeploymentSpec {
    DeploymentSpec {
        rooms_per_process,
        container_port: 7777,
        ..Default::default()
    }
}

pub fn room_in(region: &str) -> CreateRoom {
    CreateRoom {
        app_id: APP.into(),
        region: region.into(),
        ..Default::default()
    }
}

pub fn all(app: &str) -> ProcessFilter {
    ProcessFilter {
        app_id: app.into(),
        ..Default::default()
    }
}

/// Every process of the app, newest first.
pub async fn processes(s: &Scheduler) -> Vec<Process> {
    s.list_processes(&all(APP), 1000, None)
        .await
        .expect("list processes")
        .processes
}

pub async fn count(s: &Scheduler) -> u64 {
    s.count_processes(&all(APP)).await.expect("count processes")
}

/// Polls until the process has `status` (bounded).
pub async fn wait_status(s: &Scheduler, pid: ProcessId, status: ProcessStatus) -> Process {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = s.get_process(APP, pid).await.expect("get process");
        if p.status == status {
            return p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "process {pid} stuck in {:?}, wanted {status:?}",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Checks the invariants that must hold at every moment, for every process of the app:
/// rooms_allocated equals the listed rooms, never exceeds rooms_per_process, every listed room
/// is live, current on that process and of the same app; only live processes hold rooms.
pub async fn check_invariants(s: &Scheduler) {
    for p in processes(s).await {
        let rooms = s
            .list_active_rooms(APP, p.process_id)
            .await
            .expect("list rooms");
        assert_eq!(
            p.rooms_allocated as usize,
            rooms.len(),
            "rooms_allocated of {}",
            p.process_id
        );
        assert!(
            p.rooms_allocated <= p.rooms_per_process,
            "process {} over capacity",
            p.process_id
        );
        if !p.status.is_live() {
            assert!(
                rooms.is_empty(),
                "{:?} process {} holds rooms",
                p.status,
                p.process_id
            );
        }
        for r in rooms {
            let current = r
                .current_allocation
                .as_ref()
                .expect("live room has an allocation");
            assert_eq!(current.process_id, p.process_id);
            assert_ne!(r.status, roomsched::RoomStatus::Destroyed);
        }
    }
}
