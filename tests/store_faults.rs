//! Faults of the durable store (SPEC §7, §9): a write that fails, a disk that is full, files
//! that are damaged, written by a newer build, or already in use.
//!
//! - **Injected write failures** with the real [`DurableStore`]: a test [`Store`] forwards
//!   everything to it but can be told to refuse appends (and, for a longer outage, to refuse
//!   `reopen` too). Every write call must then answer UNAVAILABLE and leave the whole
//!   observable state as it was, reads must keep working, writes must succeed once the store
//!   is healthy again, and the directory must hold exactly what was acknowledged.
//! - **A real full disk**: the real `roomsched serve` binary runs with a file-size limit
//!   (`ulimit -f`, SIGXFSZ ignored), so redb's writes past it fail with EFBIG.
//! - **Damaged files**: truncated, one damaged page (swept over the whole file), garbage, a
//!   newer format version, a second opener, and `roomsched serve` on such files.
//!
//! "Crash" here means: the file is copied while the store still has it open, after every
//! acknowledged change was committed, and the copy is opened — what a `kill -9` at that moment
//! leaves on disk (redb's commits are fsynced before they are acknowledged, and the copy still
//! carries redb's "was not closed cleanly" mark, so opening it goes through redb's recovery).
//!
//! Nothing here uses paused time (the durable store's writer is a real thread); every wait
//! polls against a generous deadline.

mod serve;

use roomsched::backend::{AdoptSpec, Backend, BackendError, ExitStatus, ProcessEvents, StartSpec};
use roomsched::grpc::pb;
use roomsched::grpc::pb::deployment_service_client::DeploymentServiceClient;
use roomsched::grpc::pb::process_service_client::ProcessServiceClient;
use roomsched::grpc::pb::room_service_client::RoomServiceClient;
use roomsched::store::{Change, Commit, DurableStore, Record, Store, StoreError};
use roomsched::{
    ConnectionInfo, CreateRoom, Deployment, DeploymentSpec, Error, ExposedPort, Process,
    ProcessFilter, ProcessId, ProcessStatus, RegionPolicy, Room, RoomStatus, Scheduler,
    TransportType,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// How long anything that should happen "soon" may take. Generous: the machine is small and
/// busy, and redb fsyncs.
const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(5);

const APP: &str = "game";
const OTHER_APP: &str = "newgame";
const REGIONS: [&str; 3] = ["Frankfurt", "Tokyo", "Sydney"];

// ----- panics ------------------------------------------------------------------------------

/// Every panic of this test binary, with the name of its thread: a panic on the store's writer
/// thread ("roomsched-store") is not seen by the test otherwise.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("<unnamed>").to_string();
            PANICS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("thread {name}: {info}"));
            previous(info);
        }));
    });
}

/// Held by the tests that look at the panics of store threads (panics are recorded for the
/// whole binary), so that one test's expected panics are not taken for another's.
static WATCHING_PANICS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn store_thread_panics() -> Vec<String> {
    PANICS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|p| p.starts_with("thread roomsched-store"))
        .cloned()
        .collect()
}

// ----- temporary directories ---------------------------------------------------------------

/// A directory removed when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "roomsched-store-faults-{}-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir { path }
    }

    fn file(&self) -> PathBuf {
        self.path.join(roomsched::store::durable::FILE_NAME)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Waits until no file descriptor of this process refers to `file` any more: a dropped
/// [`DurableStore`] closes its file on its writer thread, a moment after the drop.
async fn wait_closed(file: &Path) {
    let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let deadline = Instant::now() + DEADLINE;
    loop {
        let open = std::fs::read_dir("/proc/self/fd")
            .expect("read /proc/self/fd")
            .filter_map(|e| e.ok())
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|target| target == file));
        if !open {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} is still open {DEADLINE:?} after its store was dropped",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a `kill -9` now would leave on disk: a copy of the store's file, in a new directory.
fn crash_copy(dir: &TempDir) -> TempDir {
    let copy = TempDir::new("crash");
    std::fs::copy(dir.file(), copy.file()).expect("copy the store's file");
    copy
}

// ----- a backend the test controls ---------------------------------------------------------

/// Processes bind when the test says so (or at once, with `auto_bind`); stop requests are
/// recorded (and exit at once with `exit_on_stop`). Adopted processes are kept as they are, so
/// that a scheduler rebuilt from a store shows exactly what the store holds.
#[derive(Clone, Default)]
struct TestBackend {
    state: Arc<Mutex<BackendState>>,
}

#[derive(Default)]
struct BackendState {
    auto_bind: bool,
    exit_on_stop: bool,
    started: Vec<ProcessId>,
    stops: Vec<ProcessId>,
    events: HashMap<ProcessId, ProcessEvents>,
    next_port: u16,
}

impl TestBackend {
    fn new() -> Self {
        Self::default()
    }

    fn auto_bind(self) -> Self {
        self.state.lock().unwrap().auto_bind = true;
        self
    }

    fn exit_on_stop(self) -> Self {
        self.state.lock().unwrap().exit_on_stop = true;
        self
    }

    fn bind(&self, pid: ProcessId) {
        let mut st = self.state.lock().unwrap();
        st.next_port += 1;
        let port = port_of(30_000 + st.next_port);
        if let Some(ev) = st.events.get(&pid) {
            ev.bound(pid, port, vec![]);
        }
    }

    fn started(&self) -> Vec<ProcessId> {
        self.state.lock().unwrap().started.clone()
    }

    fn stops(&self) -> Vec<ProcessId> {
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

impl Backend for TestBackend {
    fn name(&self) -> &'static str {
        "test"
    }

    fn start(&self, spec: StartSpec) -> Result<(), BackendError> {
        let mut st = self.state.lock().unwrap();
        let pid = spec.process_id;
        st.events.insert(pid, spec.events.clone());
        st.started.push(pid);
        if st.auto_bind {
            st.next_port += 1;
            spec.events
                .bound(pid, port_of(30_000 + st.next_port), vec![]);
        }
        Ok(())
    }

    fn stop(&self, process_id: ProcessId, _grace: Duration) {
        let mut st = self.state.lock().unwrap();
        st.stops.push(process_id);
        if st.exit_on_stop {
            if let Some(ev) = st.events.get(&process_id) {
                ev.exited(process_id, ExitStatus::Signal(15));
            }
        }
    }

    fn adopt(&self, spec: AdoptSpec) {
        let pid = spec.process.process_id;
        self.state.lock().unwrap().events.insert(pid, spec.events);
    }
}

// ----- a durable store that can be told to fail --------------------------------------------

/// The real [`DurableStore`], with injected faults. Healthy, it forwards everything. With
/// `fail_appends` every append is refused; once one has been refused every later one is too
/// (the `Store` contract) until a `reopen` succeeds — which it does unless `fail_reopen` is set
/// (a disk that cannot even be opened again: the scheduler's rollback retries until it can).
/// A refused commit resolves only after every change appended before it has been committed,
/// so commits still resolve in the order they were appended.
#[derive(Clone)]
struct FaultyStore {
    inner: Arc<DurableStore>,
    faults: Arc<Faults>,
}

#[derive(Default)]
struct Faults {
    fail_appends: AtomicBool,
    fail_reopen: AtomicBool,
    /// A commit was refused and no reopen has succeeded since.
    broken: Mutex<bool>,
    refused: AtomicU64,
    reopen_attempts: AtomicU64,
    reopens: AtomicU64,
}

impl Faults {
    /// Appends fail; `reopen` still works (a write error the file recovers from).
    fn fail_writes(&self, on: bool) {
        self.fail_appends.store(on, Ordering::SeqCst);
    }

    /// Appends and reopens fail (an outage), or neither does.
    fn outage(&self, on: bool) {
        self.fail_reopen.store(on, Ordering::SeqCst);
        self.fail_appends.store(on, Ordering::SeqCst);
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl FaultyStore {
    fn open(dir: &Path) -> Result<FaultyStore, StoreError> {
        Ok(FaultyStore {
            inner: Arc::new(DurableStore::open(dir)?),
            faults: Arc::default(),
        })
    }
}

impl Store for FaultyStore {
    fn wants_records(&self) -> bool {
        true
    }

    fn append(&self, change: Change) -> Commit {
        let mut broken = self.faults.broken.lock().unwrap();
        if *broken || self.faults.fail_appends.load(Ordering::SeqCst) {
            *broken = true;
            self.faults.refused.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let inner = Arc::clone(&self.inner);
            std::thread::spawn(move || {
                // Answers once everything queued before is written.
                let _ = inner.file_size();
                let _ = tx.send(Err(StoreError(
                    "injected write failure: no space left on device".into(),
                )));
            });
            return Commit::Pending(rx);
        }
        self.inner.append(change)
    }

    fn all_committed(&self) -> bool {
        !*self.faults.broken.lock().unwrap() && self.inner.all_committed()
    }

    fn barrier(&self) -> Commit {
        self.append(Vec::new())
    }

    fn load(&self, visit: &mut dyn FnMut(Record)) -> Result<(), StoreError> {
        self.inner.load(visit)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        self.faults.reopen_attempts.fetch_add(1, Ordering::SeqCst);
        if self.faults.fail_reopen.load(Ordering::SeqCst) {
            return Err(StoreError("injected: the store cannot be opened".into()));
        }
        let mut broken = self.faults.broken.lock().unwrap();
        self.inner.reopen()?;
        *broken = false;
        self.faults.reopens.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

// ----- building schedulers -----------------------------------------------------------------

fn spec(rooms_per_process: u32) -> DeploymentSpec {
    DeploymentSpec {
        rooms_per_process,
        container_port: 7777,
        ..Default::default()
    }
}

fn builder(backend: &TestBackend) -> roomsched::SchedulerBuilder {
    Scheduler::builder()
        .regions(REGIONS)
        .backend(backend.clone())
        // Nothing may change by itself while the test compares states.
        .start_timeout(Duration::from_secs(3600))
        .idle_timeout(Duration::from_secs(3600))
        .stop_grace(Duration::from_secs(1))
}

fn faulty_scheduler(dir: &TempDir, backend: &TestBackend) -> (Scheduler, Arc<Faults>) {
    let store = FaultyStore::open(&dir.path).expect("open the durable store");
    let faults = Arc::clone(&store.faults);
    let s = builder(backend)
        .store(store)
        .build()
        .expect("build the scheduler");
    (s, faults)
}

/// A scheduler rebuilt from the store in `dir`, with a backend that keeps what it adopts.
fn rebuilt(dir: &TempDir) -> Scheduler {
    let store = DurableStore::open(&dir.path).expect("open the durable store again");
    builder(&TestBackend::new())
        .store(store)
        .build()
        .expect("rebuild the scheduler from the store")
}

fn room(region: &str, id: &str) -> CreateRoom {
    CreateRoom {
        app_id: APP.into(),
        region: region.into(),
        room_id: Some(id.into()),
        ..Default::default()
    }
}

/// Waits until every process event reported so far, and those they caused, are applied.
async fn settle(s: &Scheduler) {
    for _ in 0..3 {
        s.settle().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_status(s: &Scheduler, pid: ProcessId, status: ProcessStatus) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let p = s.get_process(APP, pid).await.expect("get process");
        if p.status == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} is {:?}, wanted {status:?}",
            p.status
        );
        tokio::time::sleep(POLL).await;
    }
}

// ----- the observable state ----------------------------------------------------------------

/// Everything a client can read about some apps: deployments, policies, processes, the rooms
/// on and off each process, every room it can name (and those the test names), connection
/// info, counts and usage (without the billed seconds, which grow with the clock).
#[derive(Debug, PartialEq)]
struct Snapshot {
    apps: Vec<AppSnapshot>,
}

#[derive(Debug, PartialEq)]
struct AppSnapshot {
    app_id: String,
    deployments: Result<Vec<Deployment>, Error>,
    policies: Vec<(String, Result<RegionPolicy, Error>)>,
    processes: Vec<Process>,
    count: Result<u64, Error>,
    active_rooms: Vec<(ProcessId, Result<Vec<Room>, Error>)>,
    inactive_rooms: Vec<(ProcessId, Result<Vec<Room>, Error>)>,
    rooms: Vec<(String, Result<Room, Error>)>,
    connections: Vec<(String, Result<ConnectionInfo, Error>)>,
    /// (region, rooms created, peak processes)
    usage: Result<Vec<(String, u64, u32)>, Error>,
}

fn filter(app_id: &str) -> ProcessFilter {
    ProcessFilter {
        app_id: app_id.into(),
        ..Default::default()
    }
}

async fn all_processes(s: &Scheduler, app_id: &str) -> Vec<Process> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = s
            .list_processes(&filter(app_id), 1000, token.as_deref())
            .await
            .expect("list processes");
        out.extend(page.processes);
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => return out,
        }
    }
}

async fn snapshot(s: &Scheduler, apps: &[&str], room_ids: &[String]) -> Snapshot {
    let mut out = Vec::new();
    for app_id in apps {
        let processes = all_processes(s, app_id).await;
        let mut ids: BTreeSet<String> = room_ids.iter().cloned().collect();
        let mut active_rooms = Vec::new();
        let mut inactive_rooms = Vec::new();
        for p in &processes {
            let active = s.list_active_rooms(app_id, p.process_id).await;
            let inactive = s.list_inactive_rooms(app_id, p.process_id).await;
            for r in active.iter().chain(inactive.iter()).flatten() {
                ids.insert(r.room_id.clone());
            }
            active_rooms.push((p.process_id, active));
            inactive_rooms.push((p.process_id, inactive));
        }
        let mut rooms = Vec::new();
        let mut connections = Vec::new();
        for id in ids {
            rooms.push((id.clone(), s.get_room(app_id, &id).await));
            connections.push((id.clone(), s.connection_info(app_id, &id).await));
        }
        let mut policies = Vec::new();
        for region in REGIONS {
            policies.push((
                region.to_string(),
                s.get_region_policy(app_id, region).await,
            ));
        }
        out.push(AppSnapshot {
            app_id: app_id.to_string(),
            deployments: s.list_deployments(app_id).await,
            policies,
            count: s.count_processes(&filter(app_id)).await,
            processes,
            active_rooms,
            inactive_rooms,
            rooms,
            connections,
            usage: s.usage(app_id, &[], None, None).await.map(|u| {
                u.into_iter()
                    .map(|r| (r.region, r.rooms_created, r.peak_processes))
                    .collect()
            }),
        });
    }
    Snapshot { apps: out }
}

/// The first lines where two states differ, with some context.
fn diff(expected: &Snapshot, actual: &Snapshot) -> String {
    let (a, b) = (format!("{expected:#?}"), format!("{actual:#?}"));
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let first = a
        .iter()
        .zip(&b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let from = first.saturating_sub(25);
    let show =
        |lines: &[&str]| lines[from.min(lines.len())..(first + 25).min(lines.len())].join("\n");
    format!(
        "first difference at line {first}\n--- expected ---\n{}\n--- actual ---\n{}",
        show(&a),
        show(&b)
    )
}

fn assert_same(what: &str, expected: &Snapshot, actual: &Snapshot) {
    assert!(expected == actual, "{what}: {}", diff(expected, actual));
}

/// For every process of the app: rooms_allocated equals its listed active rooms and never
/// exceeds rooms_per_process; only live processes hold rooms; each listed room is live and
/// currently on that process. Returns the ids of all live rooms.
async fn check_invariants(s: &Scheduler, app_id: &str) -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    for p in all_processes(s, app_id).await {
        let rooms = s
            .list_active_rooms(app_id, p.process_id)
            .await
            .expect("list active rooms");
        assert_eq!(
            p.rooms_allocated as usize,
            rooms.len(),
            "rooms_allocated of {} ({:?}) against its listed active rooms",
            p.process_id,
            p.status
        );
        assert!(
            p.rooms_allocated <= p.rooms_per_process,
            "process {} holds {} rooms, over its {}",
            p.process_id,
            p.rooms_allocated,
            p.rooms_per_process
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
                .expect("a live room is placed");
            assert_eq!(current.process_id, p.process_id, "room {}", r.room_id);
            assert_ne!(r.status, RoomStatus::Destroyed, "room {}", r.room_id);
            assert!(
                live.insert(r.room_id.clone()),
                "room {} listed twice",
                r.room_id
            );
        }
    }
    live
}

// ===== 2a: injected write failures with the real durable store ==============================

/// The state the refused calls start from: two apps' worth of things in three regions.
struct World {
    s: Scheduler,
    faults: Arc<Faults>,
    backend: TestBackend,
    dir: TempDir,
    /// Rooms the test knows by id (live, destroyed, and those whose creation was refused).
    rooms: Vec<String>,
    running: ProcessId,
    starting: ProcessId,
    tokyo: ProcessId,
}

async fn world() -> World {
    record_panics();
    let dir = TempDir::new("world");
    let backend = TestBackend::new().exit_on_stop();
    let (s, faults) = faulty_scheduler(&dir, &backend);
    s.create_deployment(APP, spec(2)).await.expect("deployment");
    let running = s
        .create_room(room("Frankfurt", "a1"))
        .await
        .expect("a1")
        .process_id;
    backend.bind(running);
    settle(&s).await;
    wait_status(&s, running, ProcessStatus::Running).await;
    s.create_room(room("Frankfurt", "a2")).await.expect("a2");
    let starting = s
        .create_room(room("Frankfurt", "a3"))
        .await
        .expect("a3")
        .process_id;
    assert_ne!(starting, running, "a3 needs a second process");
    let tokyo = s
        .create_room(room("Tokyo", "t1"))
        .await
        .expect("t1")
        .process_id;
    backend.bind(tokyo);
    s.destroy_room(APP, "a2").await.expect("destroy a2");
    s.set_region_policy(
        APP,
        "Tokyo",
        RegionPolicy {
            min_processes: 0,
            buffer_rooms: 0,
            max_processes: 10,
        },
    )
    .await
    .expect("policy");
    s.create_process(APP, "Frankfurt", None)
        .await
        .expect("an empty process");
    settle(&s).await;
    wait_status(&s, tokyo, ProcessStatus::Running).await;
    let rooms = ["a1", "a2", "a3", "t1", "n1", "n2", "n3"]
        .map(String::from)
        .to_vec();
    World {
        s,
        faults,
        backend,
        dir,
        rooms,
        running,
        starting,
        tokyo,
    }
}

impl World {
    async fn snapshot(&self) -> Snapshot {
        snapshot(&self.s, &[APP, OTHER_APP], &self.rooms).await
    }

    /// Runs `op` with appends failing: it must answer UNAVAILABLE, the store must have been
    /// asked (and have refused), the state — read while the store still fails — must be what it
    /// was, and the backend must not have been asked to start or stop anything.
    async fn refused<T: std::fmt::Debug>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = Result<T, Error>>,
    ) {
        settle(&self.s).await;
        let before = self.snapshot().await;
        let (started, stops) = (self.backend.started(), self.backend.stops());
        let refused = self.faults.refused();
        self.faults.fail_writes(true);
        let result = tokio::time::timeout(DEADLINE, op)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within {DEADLINE:?}"));
        assert!(
            matches!(result, Err(Error::Unavailable(_))),
            "{what} while the store refuses writes: {result:?}"
        );
        assert!(
            self.faults.refused() > refused,
            "{what}: the store was never asked to write (refused for another reason?)"
        );
        // Reads work while the store still fails, and show the state from before the call.
        let during = self.snapshot().await;
        assert_same(&format!("after a refused {what}"), &before, &during);
        self.faults.fail_writes(false);
        settle(&self.s).await;
        let after = self.snapshot().await;
        assert_same(
            &format!("after a refused {what}, the store healthy again"),
            &before,
            &after,
        );
        assert_eq!(
            (self.backend.started(), self.backend.stops()),
            (started, stops),
            "{what}: the backend was told to start or stop processes for a refused change"
        );
    }
}

/// Reads never show a change before it is durable: readers polling rooms whose CreateRoom is
/// in flight, while the store refuses some of those writes, never see a room whose create
/// then fails (nor one not yet acknowledged that later is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_show_a_change_the_store_has_not_committed() -> TestResult {
    record_panics();
    let dir = TempDir::new("dirty-reads");
    let backend = TestBackend::new();
    let (s, faults) = faulty_scheduler(&dir, &backend);
    s.create_deployment(APP, spec(1000)).await?;
    let in_flight: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (s, in_flight, seen, stop) = (
            s.clone(),
            Arc::clone(&in_flight),
            Arc::clone(&seen),
            Arc::clone(&stop),
        );
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let ids: Vec<String> = in_flight.lock().unwrap().clone();
                for id in ids {
                    if s.get_room(APP, &id).await.is_ok() {
                        seen.lock().unwrap().insert(id);
                    }
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut writers = Vec::new();
    for w in 0..8 {
        let (s, in_flight) = (s.clone(), Arc::clone(&in_flight));
        writers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..150 {
                let id = format!("w{w}-{i}");
                in_flight.lock().unwrap().push(id.clone());
                let created = s.create_room(room("Frankfurt", &id)).await;
                in_flight.lock().unwrap().retain(|x| *x != id);
                outcomes.push((id, created.is_ok()));
            }
            outcomes
        }));
    }
    let flipper = {
        let (faults, stop) = (Arc::clone(&faults), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut on = false;
            while !stop.load(Ordering::SeqCst) {
                on = !on;
                faults.fail_writes(on);
                tokio::time::sleep(Duration::from_millis(if on { 3 } else { 20 })).await;
            }
            faults.fail_writes(false);
        })
    };
    let mut acknowledged = HashSet::new();
    let mut refused = 0;
    for w in writers {
        for (id, ok) in w.await? {
            if ok {
                acknowledged.insert(id);
            } else {
                refused += 1;
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    flipper.await?;
    for r in readers {
        r.await?;
    }
    let seen = seen.lock().unwrap().clone();
    let phantom: Vec<&String> = seen.difference(&acknowledged).collect();
    assert!(
        phantom.is_empty(),
        "readers saw rooms whose CreateRoom failed: {phantom:?} ({} seen while in flight, {} \
         acknowledged, {refused} refused)",
        seen.len(),
        acknowledged.len()
    );
    assert!(
        refused > 0,
        "the store refused no write: the test proved nothing"
    );
    assert!(
        !seen.is_empty(),
        "no reader saw a room in flight: the test proved nothing"
    );
    Ok(())
}

/// Each kind of write, refused by the store, answers UNAVAILABLE and changes nothing anyone
/// can observe; reads work throughout; once the store is healthy the same writes succeed; and
/// a crash afterwards leaves exactly the acknowledged state on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_write_is_unavailable_and_leaves_no_trace() -> TestResult {
    let w = world().await;
    let s = &w.s;
    let policy = |min_processes| RegionPolicy {
        min_processes,
        buffer_rooms: 0,
        max_processes: 10,
    };

    w.refused(
        "CreateRoom on a process with room",
        s.create_room(room("Frankfurt", "n1")),
    )
    .await;
    // Fill Tokyo's only process, healthily, so that the next room there needs a new one.
    s.create_room(room("Tokyo", "n2")).await?;
    w.refused(
        "CreateRoom needing a new process",
        s.create_room(room("Tokyo", "n3")),
    )
    .await;
    w.refused("CreateRoom in a region with no process yet", async {
        s.create_room(CreateRoom {
            room_config: "x".repeat(100),
            ..room("Sydney", "n1")
        })
        .await
    })
    .await;
    w.refused("CreateRoom with a generated id", async {
        s.create_room(CreateRoom {
            room_id: None,
            ..room("Frankfurt", "")
        })
        .await
    })
    .await;
    w.refused("DestroyRoom", s.destroy_room(APP, "a1")).await;
    w.refused(
        "UpdateRoomConfig",
        s.update_room_config(APP, "a3", "new config".into()),
    )
    .await;
    w.refused("CreateProcess", s.create_process(APP, "Frankfurt", None))
        .await;
    w.refused(
        "StopProcess (RUNNING, with a room)",
        s.stop_process(APP, w.running),
    )
    .await;
    w.refused("StopProcess (STARTING)", s.stop_process(APP, w.starting))
        .await;
    w.refused("DrainProcess", s.drain_process(APP, w.tokyo))
        .await;
    w.refused(
        "SetRegionPolicy starting a warm pool",
        s.set_region_policy(APP, "Frankfurt", policy(5)),
    )
    .await;
    w.refused(
        "SetRegionPolicy of a region with no shard yet",
        s.set_region_policy(APP, "Sydney", policy(0)),
    )
    .await;
    w.refused("CreateDeployment", s.create_deployment(APP, spec(3)))
        .await;
    w.refused(
        "CreateDeployment of a new app",
        s.create_deployment(OTHER_APP, spec(3)),
    )
    .await;

    // Healthy again: the same writes succeed.
    settle(s).await;
    s.create_room(room("Frankfurt", "n1")).await?;
    s.create_room(room("Sydney", "n3")).await?;
    s.destroy_room(APP, "a1").await?;
    s.update_room_config(APP, "a3", "new config".into()).await?;
    s.create_process(APP, "Frankfurt", None).await?;
    s.stop_process(APP, w.running).await?;
    s.drain_process(APP, w.tokyo).await?;
    s.set_region_policy(APP, "Frankfurt", policy(5)).await?;
    s.create_deployment(APP, spec(3)).await?;
    s.create_deployment(OTHER_APP, spec(3)).await?;
    settle(s).await;
    wait_status(s, w.running, ProcessStatus::Stopped).await;
    check_invariants(s, APP).await;
    assert_eq!(s.latest_deployment(APP).await?.deployment_id, 2);
    assert_eq!(s.latest_deployment(OTHER_APP).await?.deployment_id, 1);
    assert_eq!(s.get_room(APP, "a1").await?.status, RoomStatus::Destroyed);
    assert_eq!(s.get_room(APP, "a3").await?.room_config, "new config");
    assert_eq!(
        s.get_region_policy(APP, "Frankfurt").await?.min_processes,
        5
    );

    // A crash now leaves exactly this on disk.
    settle(s).await;
    let acknowledged = w.snapshot().await;
    let copy = crash_copy(&w.dir);
    let again = rebuilt(&copy);
    let restored = snapshot(&again, &[APP, OTHER_APP], &w.rooms).await;
    assert_same(
        "rebuilt from the store after a crash",
        &acknowledged,
        &restored,
    );
    Ok(())
}

/// A longer outage: the store refuses writes and cannot even be reopened. The rollback of the
/// failed write keeps retrying; the call gives up waiting for it after a bounded time with
/// UNAVAILABLE. Meanwhile memory may still hold the refused change, so reads wait and then
/// answer UNAVAILABLE rather than show it, and other writes are refused at once without
/// reaching the store. Once the store is back, the rollback completes: nothing of the refused
/// call remains, reads and writes work again, and a crash then leaves exactly the
/// acknowledged state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_refuses_writes_and_hides_refused_changes_then_recovers() -> TestResult {
    let w = world().await;
    let s = &w.s;
    settle(s).await;
    let before = w.snapshot().await;
    let started = w.backend.started();

    w.faults.outage(true);
    let stuck = tokio::spawn({
        let s = s.clone();
        async move {
            // Needs a new process in Sydney.
            s.create_room(room("Sydney", "n1")).await
        }
    });
    let deadline = Instant::now() + DEADLINE;
    while w.faults.reopen_attempts.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the failed write is never rolled back"
        );
        tokio::time::sleep(POLL).await;
    }

    // Reads never show the refused room or its process: they wait (up to 10 s each), then
    // give up.
    let read = tokio::time::timeout(Duration::from_secs(90), async {
        (
            s.get_room(APP, "n1").await,
            s.get_room(APP, "a1").await,
            s.list_deployments(APP).await,
        )
    })
    .await
    .expect("reads answer (UNAVAILABLE) within a bounded time during the outage");
    assert!(
        matches!(read.0, Err(Error::Unavailable(_)) | Err(Error::NotFound(_))),
        "the refused room during the outage: {:?}",
        read.0
    );
    assert!(
        matches!(read.1, Err(Error::Unavailable(_))),
        "a read during the outage: {:?}",
        read.1
    );

    // Other writes are refused at once, whatever the store would say.
    let refused_before = w.faults.refused();
    for (what, result) in [
        (
            "CreateRoom",
            tokio::time::timeout(Duration::from_secs(10), s.create_room(room("Tokyo", "n2")))
                .await
                .map(|r| r.map(drop)),
        ),
        (
            "DestroyRoom",
            tokio::time::timeout(Duration::from_secs(10), s.destroy_room(APP, "t1")).await,
        ),
        (
            "CreateDeployment",
            tokio::time::timeout(Duration::from_secs(10), s.create_deployment(APP, spec(3)))
                .await
                .map(|r| r.map(drop)),
        ),
    ] {
        let result = result.unwrap_or_else(|_| panic!("{what} hangs during the outage"));
        assert!(
            matches!(result, Err(Error::Unavailable(_))),
            "{what} during the outage: {result:?}"
        );
    }
    assert_eq!(
        w.faults.refused(),
        refused_before,
        "writes during the rollback reached the store"
    );

    // The refused call itself answers UNAVAILABLE within a bounded time, store or not.
    let result = tokio::time::timeout(DEADLINE, stuck)
        .await
        .expect("the refused call answers while the store is still down")?;
    assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");

    w.faults.outage(false);
    let deadline = Instant::now() + DEADLINE;
    while s.get_room(APP, "a1").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "reads never come back after the outage"
        );
        tokio::time::sleep(POLL).await;
    }
    settle(s).await;
    let after = w.snapshot().await;
    assert_same("after the outage", &before, &after);
    assert_eq!(
        w.backend.started(),
        started,
        "a refused process was started"
    );

    s.create_room(room("Frankfurt", "n1")).await?;
    s.destroy_room(APP, "t1").await?;
    s.create_deployment(APP, spec(3)).await?;
    settle(s).await;
    check_invariants(s, APP).await;
    let acknowledged = w.snapshot().await;
    let copy = crash_copy(&w.dir);
    let restored = snapshot(&rebuilt(&copy), &[APP, OTHER_APP], &w.rooms).await;
    assert_same(
        "rebuilt from the store after a crash",
        &acknowledged,
        &restored,
    );
    Ok(())
}

/// What each writer saw, to be checked against the final state.
#[derive(Default, Debug)]
struct Outcomes {
    created: BTreeSet<String>,
    create_refused: BTreeSet<String>,
    destroyed: BTreeSet<String>,
    destroy_refused: u64,
    unexpected: Vec<String>,
}

/// Many writers create and destroy rooms while the store fails and recovers, over and over
/// (short write failures, and outages in which it cannot be reopened either). Afterwards every
/// acknowledged create and destroy is reflected, no room whose creation was refused exists,
/// the invariants hold, every process the backend started is known (and bound), and the state
/// rebuilt from the directory after a crash equals the one in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_racing_failures_see_exactly_their_acknowledged_changes() -> TestResult {
    record_panics();
    const WRITERS: usize = 8;
    const OPS: usize = 200;
    let dir = TempDir::new("race");
    let backend = TestBackend::new().auto_bind();
    let (s, faults) = faulty_scheduler(&dir, &backend);
    s.create_deployment(APP, spec(4)).await?;

    let done = Arc::new(AtomicBool::new(false));
    let toggler = tokio::spawn({
        let (faults, done) = (Arc::clone(&faults), Arc::clone(&done));
        async move {
            let mut phases = 0u32;
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10 + rand::random::<u64>() % 50)).await;
                phases += 1;
                if phases % 5 == 0 {
                    faults.outage(true);
                } else {
                    faults.fail_writes(true);
                }
                tokio::time::sleep(Duration::from_millis(1 + rand::random::<u64>() % 10)).await;
                faults.outage(false);
            }
            phases
        }
    });
    let mut writers = Vec::new();
    for t in 0..WRITERS {
        let s = s.clone();
        writers.push(tokio::spawn(async move {
            let mut out = Outcomes::default();
            let mut live: Vec<String> = Vec::new();
            for i in 0..OPS {
                if live.is_empty() || rand::random::<u32>() % 10 < 6 {
                    let id = format!("w{t}-{i}");
                    let region = REGIONS[(t + i) % 2];
                    match s.create_room(room(region, &id)).await {
                        Ok(_) => {
                            out.created.insert(id.clone());
                            live.push(id);
                        }
                        Err(Error::Unavailable(_)) => {
                            out.create_refused.insert(id);
                        }
                        Err(e) => out.unexpected.push(format!("create {id}: {e:?}")),
                    }
                } else {
                    let k = rand::random::<u32>() as usize % live.len();
                    let id = live[k].clone();
                    match s.destroy_room(APP, &id).await {
                        Ok(()) => {
                            out.destroyed.insert(id);
                            live.swap_remove(k);
                        }
                        Err(Error::Unavailable(_)) => out.destroy_refused += 1,
                        Err(e) => out.unexpected.push(format!("destroy {id}: {e:?}")),
                    }
                }
            }
            out
        }));
    }
    let mut all = Outcomes::default();
    for w in writers {
        let out = tokio::time::timeout(Duration::from_secs(300), w)
            .await
            .expect("writers finish")?;
        all.created.extend(out.created);
        all.create_refused.extend(out.create_refused);
        all.destroyed.extend(out.destroyed);
        all.destroy_refused += out.destroy_refused;
        all.unexpected.extend(out.unexpected);
    }
    done.store(true, Ordering::SeqCst);
    let phases = toggler.await?;
    faults.outage(false);
    assert!(
        all.unexpected.is_empty(),
        "unexpected errors: {:?}",
        all.unexpected
    );
    let refused = faults.refused();
    assert!(
        refused > 0 && !all.create_refused.is_empty() && all.created.len() > 50,
        "the failures did not bite: {} acknowledged creates, {} refused, {refused} refused \
         appends over {phases} failure phases",
        all.created.len(),
        all.create_refused.len()
    );
    eprintln!(
        "{} creates acknowledged, {} refused; {} destroys acknowledged, {} refused; {refused} \
         appends refused, {} reopens, over {phases} failure phases",
        all.created.len(),
        all.create_refused.len(),
        all.destroyed.len(),
        all.destroy_refused,
        faults.reopens.load(Ordering::SeqCst)
    );

    // Every process the backend started comes up (its bind is applied, retried if needed).
    let deadline = Instant::now() + DEADLINE;
    loop {
        settle(&s).await;
        let starting: Vec<ProcessId> = all_processes(&s, APP)
            .await
            .into_iter()
            .filter(|p| p.status == ProcessStatus::Starting)
            .map(|p| p.process_id)
            .collect();
        if starting.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes still STARTING though the backend bound them at once: {starting:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let live = check_invariants(&s, APP).await;
    let expected_live: BTreeSet<String> = all.created.difference(&all.destroyed).cloned().collect();
    let missing: Vec<_> = expected_live.difference(&live).collect();
    let phantom: Vec<_> = live.difference(&expected_live).collect();
    assert!(
        missing.is_empty() && phantom.is_empty(),
        "acknowledged live rooms missing: {missing:?}; live rooms never acknowledged: \
         {phantom:?}"
    );
    for id in &all.destroyed {
        let r = s.get_room(APP, id).await?;
        assert_eq!(
            r.status,
            RoomStatus::Destroyed,
            "room {id}, destroyed: {r:?}"
        );
    }
    for id in &all.create_refused {
        let r = s.get_room(APP, id).await;
        assert!(
            matches!(r, Err(Error::NotFound(_))),
            "room {id}, whose creation was refused: {r:?}"
        );
    }
    let known: HashSet<ProcessId> = all_processes(&s, APP)
        .await
        .iter()
        .map(|p| p.process_id)
        .collect();
    let started: HashSet<ProcessId> = backend.started().into_iter().collect();
    let unknown: Vec<_> = started.difference(&known).collect();
    let never_started: Vec<_> = known.difference(&started).collect();
    assert!(
        unknown.is_empty() && never_started.is_empty(),
        "processes the backend runs but roomsched does not know: {unknown:?}; processes \
         roomsched shows but never asked the backend to start: {never_started:?}"
    );

    let ids: Vec<String> = all
        .created
        .iter()
        .chain(&all.create_refused)
        .cloned()
        .collect();
    settle(&s).await;
    let acknowledged = snapshot(&s, &[APP], &ids).await;
    let copy = crash_copy(&dir);
    let restored = snapshot(&rebuilt(&copy), &[APP], &ids).await;
    assert_same(
        "rebuilt from the store after a crash",
        &acknowledged,
        &restored,
    );
    Ok(())
}

// ===== 2b: a real full disk, over gRPC =======================================================

/// A `roomsched serve` child process, killed when dropped.
struct Serve {
    child: std::process::Child,
    addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    /// `roomsched serve` with the durable store in `dir` and files limited to `limit_kib` KiB
    /// (SIGXFSZ ignored, so writes past the limit fail with EFBIG instead of killing it).
    fn spawn_limited(dir: &Path, limit_kib: u64) -> Serve {
        let mut command = std::process::Command::new("bash");
        command
            .arg("-c")
            .arg(format!(
                "trap '' XFSZ; ulimit -f {limit_kib}; exec \"$0\" \"$@\""
            ))
            .arg(env!("CARGO_BIN_EXE_roomsched"))
            .args(["serve", "--listen", "127.0.0.1:0", "--store", "durable"])
            .arg("--data-dir")
            .arg(dir)
            .args(["--regions", "Frankfurt", "--backend", "simulated"])
            .env("ROOMSCHED_LOG", "info")
            .env_remove("RUST_BACKTRACE");
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
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Clients {
    rooms: RoomServiceClient<Channel>,
    processes: ProcessServiceClient<Channel>,
    deployments: DeploymentServiceClient<Channel>,
}

impl Clients {
    async fn connect(addr: &str) -> Clients {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("address")
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .expect("connect to roomsched serve");
        Clients {
            rooms: RoomServiceClient::new(channel.clone()),
            processes: ProcessServiceClient::new(channel.clone()),
            deployments: DeploymentServiceClient::new(channel),
        }
    }

    async fn create_room(&self, id: &str) -> Result<pb::CreateRoomResponse, tonic::Status> {
        Ok(self
            .rooms
            .clone()
            .create_room(pb::CreateRoomRequest {
                app_id: APP.into(),
                region: "Frankfurt".into(),
                room_id: id.into(),
                ..Default::default()
            })
            .await?
            .into_inner())
    }

    async fn get_room(&self, id: &str) -> Result<pb::Room, tonic::Status> {
        Ok(self
            .rooms
            .clone()
            .get_room(pb::GetRoomRequest {
                app_id: APP.into(),
                room_id: id.into(),
            })
            .await?
            .into_inner())
    }

    async fn processes(&self) -> Result<Vec<pb::Process>, tonic::Status> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .processes
                .clone()
                .list_processes(pb::ListProcessesRequest {
                    app_id: APP.into(),
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

    async fn active_rooms(&self, process_id: &str) -> Result<Vec<pb::Room>, tonic::Status> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .rooms
                .clone()
                .list_active_rooms_for_process(pb::ListRoomsForProcessRequest {
                    app_id: APP.into(),
                    process_id: process_id.into(),
                    page_size: 1000,
                    page_token,
                })
                .await?
                .into_inner();
            out.extend(page.rooms);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = page.next_page_token;
        }
    }

    /// Checks the invariants over gRPC; returns the ids of the live rooms.
    async fn check_invariants(&self) -> Result<BTreeSet<String>, tonic::Status> {
        let mut live = BTreeSet::new();
        for p in self.processes().await? {
            let rooms = self.active_rooms(&p.process_id).await?;
            assert_eq!(
                p.rooms_allocated as usize,
                rooms.len(),
                "rooms_allocated of process {}",
                p.process_id
            );
            assert!(p.rooms_allocated <= p.rooms_per_process, "{p:?}");
            for r in rooms {
                assert_ne!(r.status(), pb::RoomStatus::Destroyed, "{r:?}");
                assert!(live.insert(r.room_id.clone()), "room {} twice", r.room_id);
            }
        }
        Ok(live)
    }
}

/// Size in KiB of a fresh store's file: the limit is set a little above it, so the server can
/// open its store but not grow it much.
async fn fresh_store_kib() -> u64 {
    let dir = TempDir::new("probe");
    let store = DurableStore::open(&dir.path).expect("open a fresh store");
    let size = store.file_size().expect("file size");
    drop(store);
    wait_closed(&dir.file()).await;
    size.div_ceil(1024)
}

/// A real full disk (a file-size limit) under `roomsched serve`: CreateRoom fails with
/// UNAVAILABLE — the server does not crash — reads keep working, the state stays consistent
/// and holds no trace of the refused room, and after a kill -9 the directory holds exactly the
/// acknowledged rooms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_writes_unavailable_over_grpc_and_keeps_serving() -> TestResult {
    record_panics();
    const MAX_ROOMS: usize = 5000;
    let fresh = fresh_store_kib().await;
    let limit = fresh + 128;
    let dir = TempDir::new("full");
    let mut serve = Serve::spawn_limited(&dir.path, limit);
    let c = Clients::connect(&serve.addr).await;
    c.deployments
        .clone()
        .create_deployment(pb::CreateDeploymentRequest {
            app_id: APP.into(),
            rooms_per_process: 4,
            transport_type: pb::TransportType::Tcp as i32,
            container_port: 7777,
            ..Default::default()
        })
        .await?;

    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut failure = None;
    for i in 0..MAX_ROOMS {
        let id = format!("r{i}");
        match c.create_room(&id).await {
            Ok(_) => {
                acked.insert(id);
            }
            Err(status) => {
                failure = Some((id, status));
                break;
            }
        }
    }
    let size = std::fs::metadata(dir.file())?.len();
    let Some((failed_id, status)) = failure else {
        panic!(
            "{MAX_ROOMS} rooms created under a {limit} KiB file-size limit (fresh store \
             {fresh} KiB); the store's file is {size} bytes: the limit never hit"
        );
    };
    eprintln!(
        "fresh store {fresh} KiB, limit {limit} KiB: room {} of {MAX_ROOMS} failed with {:?} \
         ({}); file {size} bytes",
        acked.len() + 1,
        status.code(),
        status.message()
    );
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "CreateRoom on a full disk: {status:?}\nserver stderr:\n{}",
        serve.stderr()
    );
    assert!(
        matches!(serve.child.try_wait(), Ok(None)),
        "the server exited: {:?}\n{}",
        serve.child.try_wait(),
        serve.stderr()
    );

    // Reads keep working, the refused room does not exist, the state is consistent.
    let missing = c.get_room(&failed_id).await;
    assert_eq!(
        missing.as_ref().map_err(|s| s.code()).err(),
        Some(Code::NotFound),
        "the refused room {failed_id}: {missing:?}"
    );
    for id in &acked {
        let r = c.get_room(id).await?;
        assert_ne!(r.status(), pb::RoomStatus::Destroyed, "{r:?}");
    }
    let live = c.check_invariants().await?;
    assert_eq!(live, acked, "live rooms against acknowledged rooms");

    // More writes on the full disk: each fails with UNAVAILABLE or succeeds (redb may reuse
    // freed pages); the server stays up and consistent.
    for i in 0..20 {
        let id = format!("late{i}");
        match c.create_room(&id).await {
            Ok(_) => {
                acked.insert(id);
            }
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        }
    }
    let live = c.check_invariants().await?;
    assert_eq!(live, acked, "live rooms against acknowledged rooms");
    assert!(
        matches!(serve.child.try_wait(), Ok(None)),
        "the server exited"
    );
    let stderr = serve.stderr();
    assert!(
        !stderr.contains("panicked"),
        "the server panicked:\n{stderr}"
    );

    // kill -9, then the directory holds exactly the acknowledged rooms.
    serve.kill9();
    let s = {
        let store = DurableStore::open(&dir.path)?;
        Scheduler::builder()
            .regions(["Frankfurt"])
            .backend(TestBackend::new())
            .start_timeout(Duration::from_secs(3600))
            .store(store)
            .build()?
    };
    let live = check_invariants(&s, APP).await;
    assert_eq!(live, acked, "rooms restored from the full disk's store");
    let refused = s.get_room(APP, &failed_id).await;
    assert!(matches!(refused, Err(Error::NotFound(_))), "{refused:?}");
    Ok(())
}

// ===== 2c: damaged files =====================================================================

/// A store after a clean run (rooms created and destroyed, processes running, the store
/// closed): its directory and what it held.
async fn clean_store(rooms: usize) -> (TempDir, Snapshot, Vec<String>) {
    record_panics();
    let dir = TempDir::new("clean");
    let backend = TestBackend::new().auto_bind();
    let store = DurableStore::open(&dir.path).expect("open the store");
    let s = builder(&backend)
        .store(store)
        .build()
        .expect("build the scheduler");
    s.create_deployment(APP, spec(4)).await.expect("deployment");
    let mut ids = Vec::new();
    for i in 0..rooms {
        let id = format!("room{i}");
        s.create_room(room(REGIONS[i % 2], &id))
            .await
            .expect("create room");
        ids.push(id);
    }
    for id in ids.iter().step_by(3) {
        s.destroy_room(APP, id).await.expect("destroy room");
    }
    settle(&s).await;
    let held = snapshot(&s, &[APP], &ids).await;
    drop(s);
    wait_closed(&dir.file()).await;
    (dir, held, ids)
}

/// What opening a (damaged) store and rebuilding from it gave.
enum Opened {
    Refused(String),
    Rebuilt(Scheduler),
}

/// Opens the store in `dir` and builds a scheduler from it; a panic (here or on the store's
/// thread) fails the test.
async fn open_and_build(dir: &TempDir, what: &str) -> Opened {
    let panics_before = store_thread_panics().len();
    let path = dir.path.clone();
    let opened = std::panic::catch_unwind(move || DurableStore::open(&path));
    let store = match opened {
        Err(panic) => panic!("{what}: DurableStore::open panicked: {panic:?}"),
        Ok(Err(e)) => return Opened::Refused(e.to_string()),
        Ok(Ok(store)) => store,
    };
    let built =
        tokio::spawn(async move { builder(&TestBackend::new()).store(store).build() }).await;
    let new_panics: Vec<String> = store_thread_panics()[panics_before..].to_vec();
    assert!(
        new_panics.is_empty(),
        "{what}: the store's thread panicked: {new_panics:?}"
    );
    match built {
        Err(panic) => panic!("{what}: building the scheduler panicked: {panic:?}"),
        Ok(Err(e)) => Opened::Refused(e.to_string()),
        Ok(Ok(s)) => Opened::Rebuilt(s),
    }
}

/// A truncated store file, after a clean run: opening it either refuses with an error naming
/// the file (which is left as it was), or gives back everything that was acknowledged — never
/// a panic, never a store that opens with acknowledged rooms silently gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_store_is_refused_or_complete_never_silently_short() -> TestResult {
    let _watching = WATCHING_PANICS.lock().await;
    let (clean, held, ids) = clean_store(300).await;
    let bytes = std::fs::read(clean.file())?;
    let len = bytes.len() as u64;

    // The control: the intact file gives back everything.
    let control = TempDir::new("intact");
    std::fs::write(control.file(), &bytes)?;
    match open_and_build(&control, "the intact file").await {
        Opened::Rebuilt(s) => {
            assert_same("the intact file", &held, &snapshot(&s, &[APP], &ids).await)
        }
        Opened::Refused(e) => panic!("the intact file is refused: {e}"),
    }

    let mut report = Vec::new();
    for cut in [3, 4096, len / 2, len - 512] {
        let what = format!("the file ({len} bytes) truncated by {cut} bytes");
        let dir = TempDir::new("truncated");
        std::fs::write(dir.file(), &bytes[..(len - cut) as usize])?;
        let damaged = std::fs::read(dir.file())?;
        match open_and_build(&dir, &what).await {
            Opened::Refused(e) => {
                report.push(format!("{what}: refused: {e}"));
                assert!(
                    e.contains(&dir.file().display().to_string()),
                    "{what}: the error does not name the file: {e}"
                );
                assert!(
                    std::fs::read(dir.file())? == damaged,
                    "{what}: refused, but the file was changed"
                );
            }
            Opened::Rebuilt(s) => {
                check_invariants(&s, APP).await;
                let shown = snapshot(&s, &[APP], &ids).await;
                let complete = shown == held;
                report.push(format!("{what}: opened; complete: {complete}"));
                assert!(
                    complete,
                    "{what}: opened, but does not hold what was acknowledged: {}",
                    diff(&held, &shown)
                );
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    Ok(())
}

/// Random bytes where the store's file should be: a clear error naming the file, which is left
/// byte for byte as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_file_is_refused_and_left_untouched() -> TestResult {
    let _watching = WATCHING_PANICS.lock().await;
    record_panics();
    for size in [10, 4096, 100_000] {
        let dir = TempDir::new("garbage");
        let garbage: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
        std::fs::write(dir.file(), &garbage)?;
        let what = format!("{size} random bytes");
        match open_and_build(&dir, &what).await {
            Opened::Refused(e) => {
                assert!(
                    e.contains(&dir.file().display().to_string()),
                    "{what}: the error does not name the file: {e}"
                );
            }
            Opened::Rebuilt(_) => panic!("{what}: opened as a store"),
        }
        assert!(
            std::fs::read(dir.file())? == garbage,
            "{what}: the file was changed"
        );
    }
    Ok(())
}

/// Sets meta.format_version in a closed store's file, with redb directly.
fn set_format_version(file: &Path, version: u64) {
    const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    let db = redb::Database::open(file).expect("open the store with redb");
    let txn = db.begin_write().expect("begin a write");
    txn.open_table(META)
        .expect("the meta table")
        .insert("format_version", version)
        .expect("set the format version");
    txn.commit().expect("commit");
}

/// A store written by a newer build (a higher format version) is refused with a message that
/// says so, and the file is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_a_newer_format_is_refused_and_left_untouched() -> TestResult {
    let _watching = WATCHING_PANICS.lock().await;
    let (dir, _, _) = clean_store(10).await;
    set_format_version(&dir.file(), 99);
    let bytes = std::fs::read(dir.file())?;
    match open_and_build(&dir, "format version 99").await {
        Opened::Refused(e) => assert!(
            e.contains("newer")
                && e.contains("99")
                && e.contains(&dir.file().display().to_string()),
            "the error should say the store is of a newer format (99) and name the file: {e}"
        ),
        Opened::Rebuilt(_) => panic!("a store of format version 99 was opened"),
    }
    assert!(
        std::fs::read(dir.file())? == bytes,
        "the newer store's file was changed by the refused open"
    );
    Ok(())
}

/// A second DurableStore on a directory already open is refused as "in use"; the first keeps
/// working, and once it is closed the directory opens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_in_use_is_refused() -> TestResult {
    record_panics();
    let dir = TempDir::new("inuse");
    let backend = TestBackend::new();
    let s = builder(&backend)
        .store(DurableStore::open(&dir.path)?)
        .build()?;
    s.create_deployment(APP, spec(2)).await?;
    match DurableStore::open(&dir.path) {
        Ok(_) => panic!("a second store opened the directory in use"),
        Err(e) => assert!(
            e.to_string().contains("in use")
                && e.to_string().contains(&dir.file().display().to_string()),
            "the error should say the store is in use and name it: {e}"
        ),
    }
    // The first one is unharmed.
    s.create_room(room("Frankfurt", "after")).await?;
    assert_eq!(s.get_room(APP, "after").await?.room_id, "after");
    drop(s);
    wait_closed(&dir.file()).await;
    let again = rebuilt(&dir);
    assert_eq!(again.get_room(APP, "after").await?.room_id, "after");
    Ok(())
}

/// Runs `roomsched serve` on `dir` and waits (at most `within`) for it to exit: its status and
/// stderr, or — if it is still running then (it is killed) — its stderr.
fn serve_until_exit(
    dir: &Path,
    within: Duration,
) -> Result<(std::process::ExitStatus, String), String> {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_roomsched"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(["--regions", "Frankfurt,Tokyo,Sydney"])
        .env("ROOMSCHED_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run roomsched serve");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait for roomsched serve") {
            return Ok((status, reader.join().unwrap_or_default()));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(reader.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `roomsched serve` on a garbage store file, or one of a newer format: exits non-zero with a
/// clear message naming the file on stderr, no panic, no backtrace; the file is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_a_damaged_store_exits_with_a_clear_message() -> TestResult {
    let garbage = TempDir::new("serve-garbage");
    let bytes: Vec<u8> = (0..50_000).map(|_| rand::random::<u8>()).collect();
    std::fs::write(garbage.file(), &bytes)?;
    let (newer, _, _) = clean_store(3).await;
    set_format_version(&newer.file(), 99);

    for (what, dir, needle) in [
        ("a garbage file", &garbage, "roomsched.redb"),
        ("a newer format", &newer, "newer"),
    ] {
        let before = std::fs::read(dir.file())?;
        let (status, stderr) = serve_until_exit(&dir.path, DEADLINE).unwrap_or_else(|stderr| {
            panic!("{what}: roomsched serve kept running; stderr:\n{stderr}")
        });
        assert!(
            !status.success(),
            "{what}: exited with {status}; stderr:\n{stderr}"
        );
        assert!(
            status.code().is_some(),
            "{what}: killed by a signal ({status}); stderr:\n{stderr}"
        );
        assert!(
            stderr.contains(&dir.file().display().to_string()) && stderr.contains(needle),
            "{what}: stderr should name the file and say {needle:?}:\n{stderr}"
        );
        for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
            assert!(
                !stderr.contains(bad),
                "{what}: {bad:?} in stderr:\n{stderr}"
            );
        }
        assert!(
            std::fs::read(dir.file())? == before,
            "{what}: the file was changed"
        );
    }
    Ok(())
}

/// What became of a store with one damaged page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Refused with an error naming the file.
    Refused,
    /// Opened with everything that was acknowledged.
    Complete,
    /// Refused, without naming the file.
    RefusedUnnamed,
    /// `DurableStore::open` panicked.
    OpenPanicked,
    /// The store's thread panicked while the scheduler was built from it.
    StoreThreadPanicked,
    /// Building the scheduler panicked.
    BuildPanicked,
    /// Opened, but without some of what was acknowledged.
    Incomplete,
}

/// A clean store with 64 bytes damaged in one 4 KiB page (bit rot, a bad sector), for every
/// page of the file in turn: opening it either refuses with an error naming the file, or gives
/// back everything that was acknowledged — never a panic, never a store that opens with
/// acknowledged rooms silently gone. A damaged page that makes the store's thread panic while
/// the state is loaded must not be taken for the end of the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_page_is_refused_or_complete_never_a_panic_or_silently_short() -> TestResult {
    let _watching = WATCHING_PANICS.lock().await;
    let (clean, held, ids) = clean_store(300).await;
    let bytes = std::fs::read(clean.file())?;
    let mut outcomes: BTreeMap<Outcome, Vec<usize>> = BTreeMap::new();
    let mut keep: BTreeMap<Outcome, TempDir> = BTreeMap::new();
    let mut examples: BTreeMap<Outcome, String> = BTreeMap::new();
    for page in (0..bytes.len()).step_by(4096) {
        let dir = TempDir::new("rot");
        let mut damaged = bytes.clone();
        let end = (page + 164).min(bytes.len());
        for b in &mut damaged[(page + 100).min(end)..end] {
            *b ^= 0x5a;
        }
        std::fs::write(dir.file(), &damaged)?;
        let path = dir.path.clone();
        let panics_before = store_thread_panics().len();
        let (outcome, example) = match std::panic::catch_unwind(move || DurableStore::open(&path)) {
            Err(_) => (Outcome::OpenPanicked, String::new()),
            Ok(Err(e)) if e.to_string().contains(&dir.file().display().to_string()) => {
                (Outcome::Refused, e.to_string())
            }
            Ok(Err(e)) => (Outcome::RefusedUnnamed, e.to_string()),
            Ok(Ok(store)) => {
                let built =
                    tokio::spawn(async move { builder(&TestBackend::new()).store(store).build() })
                        .await;
                let thread_panics = store_thread_panics()[panics_before..].join("; ");
                match built {
                    Err(_) => (Outcome::BuildPanicked, thread_panics),
                    Ok(Err(e)) if e.to_string().contains(&dir.file().display().to_string()) => {
                        (Outcome::Refused, e.to_string())
                    }
                    Ok(Err(e)) => (Outcome::RefusedUnnamed, e.to_string()),
                    Ok(Ok(s)) => {
                        let shown = snapshot(&s, &[APP], &ids).await;
                        let live = check_invariants(&s, APP).await.len();
                        if !thread_panics.is_empty() {
                            (
                                Outcome::StoreThreadPanicked,
                                format!("{thread_panics}; the scheduler built anyway, with {live} live rooms"),
                            )
                        } else if shown == held {
                            (Outcome::Complete, String::new())
                        } else {
                            (Outcome::Incomplete, format!("{live} live rooms"))
                        }
                    }
                }
            }
        };
        outcomes.entry(outcome).or_default().push(page);
        examples.entry(outcome).or_insert(example);
        keep.entry(outcome).or_insert(dir);
    }
    let bad: Vec<Outcome> = outcomes
        .keys()
        .copied()
        .filter(|o| !matches!(o, Outcome::Refused | Outcome::Complete))
        .collect();
    let mut report: Vec<String> = outcomes
        .iter()
        .map(|(o, pages)| {
            format!(
                "{o:?}: {} page(s), at {:?}; e.g. {}",
                pages.len(),
                pages,
                examples[o]
            )
        })
        .collect();
    // What `roomsched serve` does on such files.
    for outcome in &bad {
        let dir = &keep[outcome];
        let what = match serve_until_exit(&dir.path, Duration::from_secs(10)) {
            Ok((status, stderr)) => format!(
                "exits with {status}; stderr mentions a panic: {}",
                stderr.contains("panicked")
            ),
            Err(stderr) => format!(
                "keeps serving; stderr mentions a panic: {}",
                stderr.contains("panicked")
            ),
        };
        report.push(format!(
            "roomsched serve on a file of kind {outcome:?}: {what}"
        ));
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        bad.is_empty(),
        "{} pages of {} damaged one at a time:\n{}",
        bytes.len() / 4096,
        bytes.len(),
        report.join("\n")
    );
    Ok(())
}
