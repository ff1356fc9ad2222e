//! Recovery from the durable store (SPEC §9, with the lifecycle rules of SPEC §4).
//!
//! A *crash* here is the library-level one: every clone of the [`Scheduler`] is dropped
//! without `shutdown`, a new [`DurableStore`] is opened on the same directory (retrying while
//! the old writer thread still holds the file lock) and a new scheduler is built on it. The
//! rebuilt scheduler must show exactly the state that was acknowledged, resume its timers with
//! the time they had left (timestamps come from a [`ManualClock`], so "time passed while
//! roomsched was down" is simply a clock advance) and keep working.
//!
//! Every test uses a real multi-threaded runtime with real time: the store's writer is a real
//! thread, so paused tokio time would auto-advance while a call waits for its commit. Timing
//! checks only ever use generous deadlines (tens of seconds) against behaviour that should
//! take about a second, and "must not happen" windows of a few seconds against deadlines that
//! are minutes away.

mod support;

use chrono::{DateTime, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roomsched::backend::{Backend, Simulated, SimulatedConfig};
use roomsched::store::{Change, Commit, DurableStore, Record, Store, StoreError};
use roomsched::{
    ConnectionStatus, ContainerPort, CreateRoom, DeploymentSpec, EnvVar, Error, ManualClock,
    PlacementStrategy, Process, ProcessFilter, ProcessId, ProcessStatus, RegionPolicy, Room,
    RoomPlacement, RoomStatus, Scheduler, TransportType,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{TestResult, APP};

// ----- harness ---------------------------------------------------------------------------

/// How long a poll waits for something that should take about a second.
const DEADLINE: Duration = Duration::from_secs(30);

/// A directory under cargo's per-target temp dir (a real disk, like the data dir of `serve`),
/// removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "durable-recovery-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opens the store in `dir`, waiting (bounded) while a crashed scheduler's writer thread still
/// holds the file: it lets go shortly after the last clone of that scheduler is dropped.
async fn open_store(dir: &Path) -> DurableStore {
    let started = Instant::now();
    loop {
        match DurableStore::open(dir) {
            Ok(store) => return store,
            Err(e) if e.0.contains("in use") && started.elapsed() < DEADLINE => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot open the store in {}: {e}", dir.display()),
        }
    }
}

/// Everything a scheduler is built from, except its backend: the same for every incarnation
/// of one test's scheduler.
struct Setup {
    dir: TempDir,
    clock: Arc<ManualClock>,
    regions: Vec<String>,
    start_timeout: Duration,
    idle_timeout: Duration,
    max_processes: u32,
    retained: usize,
}

impl Setup {
    fn new(tag: &str, regions: &[&str]) -> Setup {
        Setup {
            dir: TempDir::new(tag),
            clock: Arc::new(ManualClock::new(t0())),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            start_timeout: Duration::from_secs(100),
            idle_timeout: Duration::from_secs(300),
            max_processes: 1000,
            retained: 100_000,
        }
    }

    /// Builds a scheduler on the store with a fresh simulated backend: what a restarted
    /// `roomsched serve --backend simulated` has.
    async fn build(&self, sim: SimulatedConfig) -> Scheduler {
        self.build_on(Arc::new(Simulated::new(sim))).await
    }

    async fn build_on(&self, backend: Arc<dyn Backend>) -> Scheduler {
        let store = open_store(self.dir.path()).await;
        Scheduler::builder()
            .regions(self.regions.clone())
            .backend_arc(backend)
            .store(store)
            .clock(self.clock.clone())
            .start_timeout(self.start_timeout)
            .idle_timeout(self.idle_timeout)
            .max_processes(self.max_processes)
            .retained_destroyed_rooms(self.retained)
            .build()
            .expect("the scheduler rebuilds from the store")
    }

    fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

/// The crash: the last clone goes away without `shutdown`; nothing is flushed or stopped on
/// purpose. (The caller must hold no other clone.)
fn crash(s: Scheduler) {
    drop(s);
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

fn never_ready() -> SimulatedConfig {
    SimulatedConfig {
        never_ready_ratio: 1.0,
        ..Default::default()
    }
}

fn start_delay(d: Duration) -> SimulatedConfig {
    SimulatedConfig {
        start_delay: d,
        ..Default::default()
    }
}

fn spec(rooms_per_process: u32) -> DeploymentSpec {
    DeploymentSpec {
        rooms_per_process,
        container_port: 7777,
        ..Default::default()
    }
}

fn room(app: &str, region: &str, id: Option<&str>) -> CreateRoom {
    CreateRoom {
        app_id: app.into(),
        region: region.into(),
        room_id: id.map(String::from),
        ..Default::default()
    }
}

fn all_of(app: &str) -> ProcessFilter {
    ProcessFilter {
        app_id: app.into(),
        ..Default::default()
    }
}

async fn processes_of(s: &Scheduler, app: &str) -> Vec<Process> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = s
            .list_processes(&all_of(app), 1000, token.as_deref())
            .await
            .expect("list processes");
        out.extend(page.processes);
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => return out,
        }
    }
}

/// Polls `f` until it yields a value, failing the test after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_status(
    s: &Scheduler,
    app: &str,
    pid: ProcessId,
    ok: impl Fn(ProcessStatus) -> bool,
    what: &str,
) -> Process {
    eventually(&format!("process {pid} to be {what}"), || async {
        let p = s.get_process(app, pid).await.expect("get process");
        ok(p.status).then_some(p)
    })
    .await
}

/// The invariants of SPEC §2/§5 for every process of `app`: `rooms_allocated` equals the
/// rooms listed, never exceeds `rooms_per_process`; only live processes hold rooms; every
/// listed room is live, of the app, and currently on that process. Returns the live rooms by
/// process.
async fn check_invariants(s: &Scheduler, app: &str) -> BTreeMap<ProcessId, Vec<String>> {
    let mut live = BTreeMap::new();
    for p in processes_of(s, app).await {
        let rooms = s
            .list_active_rooms(app, p.process_id)
            .await
            .expect("list active rooms");
        let pid = p.process_id;
        assert_eq!(
            p.rooms_allocated as usize,
            rooms.len(),
            "rooms_allocated of {pid} ({:?}) differs from its listed rooms",
            p.status
        );
        assert!(
            p.rooms_allocated <= p.rooms_per_process,
            "process {pid} holds {} rooms, over its {}",
            p.rooms_allocated,
            p.rooms_per_process
        );
        if !p.status.is_live() {
            assert!(rooms.is_empty(), "{:?} process {pid} holds rooms", p.status);
        }
        for r in &rooms {
            assert_eq!(r.app_id, app);
            assert_ne!(r.status, RoomStatus::Destroyed, "listed room {}", r.room_id);
            // The process may bind between the two reads (never the other way round).
            let ok = match p.status {
                ProcessStatus::Starting => {
                    matches!(r.status, RoomStatus::Scheduling | RoomStatus::Active)
                }
                _ => r.status == RoomStatus::Active,
            };
            assert!(
                ok,
                "room {} is {:?} on {:?} {pid}",
                r.room_id, r.status, p.status
            );
            let current = r
                .current_allocation
                .as_ref()
                .expect("a live room is placed");
            assert_eq!(
                current.process_id, pid,
                "room {} listed on {pid}",
                r.room_id
            );
        }
        live.insert(pid, rooms.into_iter().map(|r| r.room_id).collect());
    }
    live
}

/// Every error the scheduler may legitimately answer a well-formed request of these tests
/// with; UNAVAILABLE (a store failure) and INTERNAL (a bug) fail the test.
fn expected_error(e: &Error) -> bool {
    !matches!(e, Error::Unavailable(_) | Error::Internal(_))
}

fn ok_or_expected<T>(what: &str, r: Result<T, Error>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if expected_error(&e) => None,
        Err(e) => panic!("{what}: {e:?}"),
    }
}

// ----- the observable state ----------------------------------------------------------------

/// Everything a client can read, keyed by what was asked and rendered with `Debug`.
type Snapshot = BTreeMap<String, String>;

/// Reads the whole observable state of `apps`: deployments, process listings with every
/// combination of status and region filters and several page sizes (with their tokens),
/// counts, every process, its active and inactive rooms, every room in `room_ids` or listed
/// anywhere (live or destroyed), its connection info, every region policy and usage.
async fn capture(
    s: &Scheduler,
    apps: &[&str],
    regions: &[&str],
    room_ids: &BTreeSet<(String, String)>,
) -> Snapshot {
    let mut snap = Snapshot::new();
    let mut put = |k: String, v: String| {
        assert!(snap.insert(k.clone(), v).is_none(), "key {k} twice");
    };
    let mut status_filters: Vec<Vec<ProcessStatus>> = vec![vec![]];
    status_filters.extend(ProcessStatus::ALL.iter().map(|s| vec![*s]));
    status_filters.push(vec![ProcessStatus::Running, ProcessStatus::Starting]);
    status_filters.push(vec![ProcessStatus::Stopped, ProcessStatus::Failed]);
    let mut region_filters: Vec<Vec<String>> = vec![vec![]];
    region_filters.extend(regions.iter().map(|r| vec![r.to_string()]));
    region_filters.push(regions.iter().take(2).map(|r| r.to_string()).collect());
    region_filters.push(vec![regions[0].to_string(), regions[0].to_string()]);

    for app in apps {
        let app = *app;
        put(
            format!("{app} deployments"),
            format!("{:?}", s.list_deployments(app).await),
        );
        put(
            format!("{app} latest deployment"),
            format!("{:?}", s.latest_deployment(app).await),
        );
        for id in 0..=4 {
            put(
                format!("{app} deployment {id}"),
                format!("{:?}", s.get_deployment(app, id).await),
            );
        }
        for statuses in &status_filters {
            for regions in &region_filters {
                let filter = ProcessFilter {
                    app_id: app.into(),
                    statuses: statuses.clone(),
                    regions: regions.clone(),
                };
                put(
                    format!("{app} count {statuses:?} {regions:?}"),
                    format!("{:?}", s.count_processes(&filter).await),
                );
                for page_size in [1usize, 3, 0, 1000] {
                    let mut pages = Vec::new();
                    let mut token: Option<String> = None;
                    loop {
                        let page = s
                            .list_processes(&filter, page_size, token.as_deref())
                            .await
                            .expect("list processes");
                        let ids: Vec<ProcessId> =
                            page.processes.iter().map(|p| p.process_id).collect();
                        pages.push(format!("{ids:?} next={:?}", page.next_page_token));
                        match page.next_page_token {
                            Some(t) => token = Some(t),
                            None => break,
                        }
                    }
                    put(
                        format!("{app} list {statuses:?} {regions:?} page {page_size}"),
                        pages.join(" | "),
                    );
                }
            }
        }
        let all = processes_of(s, app).await;
        put(format!("{app} processes"), format!("{all:?}"));
        let mut listed_rooms: BTreeSet<String> = BTreeSet::new();
        for p in &all {
            let pid = p.process_id;
            put(
                format!("{app} process {pid}"),
                format!("{:?}", s.get_process(app, pid).await),
            );
            let active = s.list_active_rooms(app, pid).await;
            let inactive = s.list_inactive_rooms(app, pid).await;
            for r in active.iter().chain(inactive.iter()).flatten() {
                listed_rooms.insert(r.room_id.clone());
            }
            put(format!("{app} process {pid} active"), format!("{active:?}"));
            put(
                format!("{app} process {pid} inactive"),
                format!("{inactive:?}"),
            );
        }
        let asked = room_ids
            .iter()
            .filter(|(a, _)| a == app)
            .map(|(_, id)| id.clone());
        let rooms: BTreeSet<String> = listed_rooms.into_iter().chain(asked).collect();
        for id in rooms.iter().chain(["never-created".to_string()].iter()) {
            put(
                format!("{app} room {id}"),
                format!("{:?}", s.get_room(app, id).await),
            );
            put(
                format!("{app} room {id} connection"),
                format!("{:?}", s.connection_info(app, id).await),
            );
        }
        for region in regions {
            put(
                format!("{app} policy {region}"),
                format!("{:?}", s.get_region_policy(app, region).await),
            );
        }
        put(
            format!("{app} usage"),
            format!("{:?}", s.usage(app, &[], None, None).await),
        );
        let (from, to) = (
            t0() + chrono::Duration::seconds(2),
            t0() + chrono::Duration::seconds(9),
        );
        put(
            format!("{app} usage window"),
            format!("{:?}", s.usage(app, &[], Some(from), Some(to)).await),
        );
    }
    snap
}

/// Fails with the entries that differ (the first few, in full).
fn assert_same(before: &Snapshot, after: &Snapshot, context: &str) {
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| {
            format!(
                "  {k}\n    before: {}\n    after:  {}",
                before.get(k).map_or("<absent>", |v| v.as_str()),
                after.get(k).map_or("<absent>", |v| v.as_str())
            )
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "{context}: {} of {} entries differ after the rebuild; the first ones:\n{}",
        diffs.len(),
        before.len(),
        diffs.iter().take(4).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Captures until two captures in a row agree (pending binds and exits applied).
async fn capture_quiet(
    s: &Scheduler,
    apps: &[&str],
    regions: &[&str],
    room_ids: &BTreeSet<(String, String)>,
) -> Snapshot {
    let started = Instant::now();
    let mut last = capture(s, apps, regions, room_ids).await;
    loop {
        s.settle().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.settle().await;
        let now = capture(s, apps, regions, room_ids).await;
        if now == last {
            return now;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the state kept changing for {DEADLINE:?}"
        );
        last = now;
    }
}

// ----- 1. exact recovery -------------------------------------------------------------------

const APPS: [&str; 2] = ["game", "other"];
const REGIONS: [&str; 3] = ["Frankfurt", "Tokyo", "Sydney"];

fn random_spec(rng: &mut StdRng) -> DeploymentSpec {
    DeploymentSpec {
        rooms_per_process: rng.random_range(1..=4),
        transport_type: [TransportType::Tcp, TransportType::Udp, TransportType::Tls]
            [rng.random_range(0..3)],
        container_port: rng.random_range(1000..=9000),
        additional_container_ports: if rng.random_bool(0.3) {
            vec![ContainerPort {
                name: "query".into(),
                port: 27015,
                transport_type: TransportType::Udp,
            }]
        } else {
            vec![]
        },
        idle_timeout_enabled: rng.random_bool(0.5),
        env: if rng.random_bool(0.3) {
            vec![EnvVar {
                name: "MODE".into(),
                value: format!("m{}", rng.random_range(0..100)),
            }]
        } else {
            vec![]
        },
        command: vec![],
        placement_strategy: if rng.random_bool(0.3) {
            PlacementStrategy::FewestFree
        } else {
            PlacementStrategy::MostFree
        },
    }
}

/// What the randomized run has seen, to aim later operations and reads at.
#[derive(Default)]
struct Seen {
    rooms: BTreeSet<(String, String)>,
    /// Caller-chosen ids with the region and config they were first asked with.
    caller_ids: Vec<(String, String, String, String)>,
    processes: Vec<(String, ProcessId)>,
    deployments: BTreeMap<String, u32>,
    next: usize,
}

/// Runs `ops` random operations of every kind against `s` (SPEC §3), remembering what it saw.
async fn random_operations(
    s: &Scheduler,
    setup: &Setup,
    rng: &mut StdRng,
    seen: &mut Seen,
    ops: usize,
) {
    for _ in 0..ops {
        setup.advance(Duration::from_millis(rng.random_range(1..=100)));
        let app = APPS[rng.random_range(0..APPS.len())];
        let region = REGIONS[rng.random_range(0..REGIONS.len())];
        let deps = seen.deployments.get(app).copied().unwrap_or(0);
        match rng.random_range(0..100) {
            0..=39 => {
                let id = rng.random_bool(0.5).then(|| {
                    seen.next += 1;
                    format!("c{}", seen.next)
                });
                let config = format!("cfg{}", rng.random_range(0..5));
                let deployment_id = match rng.random_range(0..10) {
                    0 => Some(0),
                    1 | 2 => Some(rng.random_range(1..=deps.max(1))),
                    _ => None,
                };
                let req = CreateRoom {
                    app_id: app.into(),
                    region: region.into(),
                    room_config: config.clone(),
                    room_id: id.clone(),
                    deployment_id,
                };
                if let Some(placed) = ok_or_expected("create_room", s.create_room(req).await) {
                    seen.rooms.insert((app.into(), placed.room_id.clone()));
                    seen.processes.push((app.into(), placed.process_id));
                }
                if let Some(id) = id {
                    seen.rooms.insert((app.into(), id.clone()));
                    seen.caller_ids
                        .push((app.into(), id, region.into(), config));
                }
            }
            40..=54 => {
                if let Some((app, id)) = pick(rng, &seen.rooms) {
                    ok_or_expected("destroy_room", s.destroy_room(&app, &id).await);
                }
            }
            55..=61 => {
                if let Some((app, id)) = pick(rng, &seen.rooms) {
                    let config = format!("updated{}", rng.random_range(0..1000));
                    ok_or_expected(
                        "update_room_config",
                        s.update_room_config(&app, &id, config).await,
                    );
                }
            }
            62..=67 => {
                if let Some((app, pid)) = pick(rng, &seen.processes) {
                    ok_or_expected("drain_process", s.drain_process(&app, pid).await);
                }
            }
            68..=73 => {
                if let Some((app, pid)) = pick(rng, &seen.processes) {
                    ok_or_expected("stop_process", s.stop_process(&app, pid).await);
                }
            }
            74..=81 => {
                let deployment_id = rng.random_bool(0.3).then(|| rng.random_range(0..=deps));
                let created = s.create_process(app, region, deployment_id).await;
                if let Some(p) = ok_or_expected("create_process", created) {
                    seen.processes.push((app.into(), p.process_id));
                }
            }
            82..=87 => {
                let policy = RegionPolicy {
                    min_processes: rng.random_range(0..=1),
                    buffer_rooms: rng.random_range(0..=2),
                    max_processes: rng.random_range(2..=6),
                };
                ok_or_expected(
                    "set_region_policy",
                    s.set_region_policy(app, region, policy).await,
                );
            }
            88..=91 => {
                if deps < 4 {
                    let d = s.create_deployment(app, random_spec(rng)).await;
                    if ok_or_expected("create_deployment", d).is_some() {
                        seen.deployments.insert(app.into(), deps + 1);
                    }
                }
            }
            _ => {
                // A caller id again: a safe retry, or ALREADY_EXISTS (other region or config,
                // or destroyed).
                if let Some((app, id, region, config)) = pick(rng, &seen.caller_ids) {
                    let region = if rng.random_bool(0.7) {
                        region
                    } else {
                        REGIONS[rng.random_range(0..REGIONS.len())].to_string()
                    };
                    let config = if rng.random_bool(0.7) {
                        config
                    } else {
                        "other".into()
                    };
                    let req = CreateRoom {
                        app_id: app,
                        region,
                        room_config: config,
                        room_id: Some(id),
                        deployment_id: None,
                    };
                    ok_or_expected("create_room (retry)", s.create_room(req).await);
                }
            }
        }
    }
    for app in APPS {
        for p in processes_of(s, app).await {
            seen.processes.push((app.into(), p.process_id));
        }
    }
}

fn pick<'a, T: Clone + 'a>(rng: &mut StdRng, items: impl IntoIterator<Item = &'a T>) -> Option<T> {
    let items: Vec<&T> = items.into_iter().collect();
    (!items.is_empty()).then(|| items[rng.random_range(0..items.len())].clone())
}

/// What the exact-recovery runs covered, so that a run that exercised nothing fails.
#[derive(Debug, Default)]
struct Coverage {
    room_statuses: BTreeSet<String>,
    process_statuses: BTreeSet<String>,
    superseded: bool,
    retries: usize,
}

impl Coverage {
    async fn add(&mut self, s: &Scheduler, seen: &Seen) {
        for (app, id) in &seen.rooms {
            if let Ok(r) = s.get_room(app, id).await {
                self.room_statuses.insert(format!("{:?}", r.status));
                self.retries += usize::from(r.allocations.len() > 1);
            }
        }
        for app in APPS {
            for p in processes_of(s, app).await {
                self.process_statuses.insert(format!("{:?}", p.status));
            }
            self.superseded |= s.list_deployments(app).await.map_or(0, |d| d.len()) > 1;
        }
    }
}

/// SPEC §9: after a crash, every acknowledged room, process, allocation and deployment is
/// back exactly as it was. A seeded random mix of every operation (two apps, three regions,
/// caller ids and generated ones, deployment pinning, superseded deployments, warm pools and
/// limits; a quarter of the processes never bind, so STARTING processes with SCHEDULING rooms
/// are part of the state), then the whole observable state is read, the scheduler crashes and
/// is rebuilt, and the state is read again: it must be equal, entry by entry. Then the rebuilt
/// scheduler must keep working (placement by SPEC §5, no process over its slots, counts equal
/// to listings), and a second crash must bring that back exactly too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_recovery_of_a_random_mix_of_operations() -> TestResult {
    let mut coverage = Coverage::default();
    for seed in [11u64, 23, 37, 41] {
        exact_recovery_run(seed, &mut coverage).await;
    }
    for status in ["Scheduling", "Active", "Destroyed"] {
        assert!(
            coverage.room_statuses.contains(status),
            "no room was {status}: {coverage:?}"
        );
    }
    for status in ["Starting", "Running", "Draining", "Stopped"] {
        assert!(
            coverage.process_statuses.contains(status),
            "no process was {status}: {coverage:?}"
        );
    }
    assert!(coverage.superseded, "no deployment was superseded");
    Ok(())
}

async fn exact_recovery_run(seed: u64, coverage: &mut Coverage) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut setup = Setup::new(&format!("exact-{seed}"), &REGIONS);
    setup.max_processes = 8;
    // Before the crash a quarter of the processes never bind (they stay STARTING: the start
    // timeout, 100 s, is far away). After it, adopted STARTING processes must not bind while
    // the state is compared, so the rebuilt backend binds nothing.
    let before_sim = SimulatedConfig {
        never_ready_ratio: 0.25,
        ..Default::default()
    };
    let s = setup.build(before_sim).await;
    let mut seen = Seen::default();
    for app in APPS {
        s.create_deployment(app, random_spec(&mut rng))
            .await
            .expect("create deployment");
        seen.deployments.insert(app.into(), 1);
    }
    random_operations(&s, &setup, &mut rng, &mut seen, 150).await;
    for app in APPS {
        check_invariants(&s, app).await;
    }
    let before = capture_quiet(&s, &APPS, &REGIONS, &seen.rooms).await;
    coverage.add(&s, &seen).await;

    crash(s);
    let s = setup.build(never_ready()).await;
    s.settle().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.settle().await;
    let after = capture(&s, &APPS, &REGIONS, &seen.rooms).await;
    assert_same(&before, &after, &format!("seed {seed}, first rebuild"));

    keeps_working(&s, &setup, &mut rng, &mut seen, seed).await;

    let before = capture_quiet(&s, &APPS, &REGIONS, &seen.rooms).await;
    crash(s);
    let s = setup.build(never_ready()).await;
    s.settle().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.settle().await;
    let after = capture(&s, &APPS, &REGIONS, &seen.rooms).await;
    assert_same(&before, &after, &format!("seed {seed}, second rebuild"));
    for app in APPS {
        check_invariants(&s, app).await;
    }
}

/// SPEC §5 by brute force over the listing: the RUNNING process of the latest deployment in
/// the region with a free slot that the placement strategy ranks first, if any.
fn expected_running_choice(
    procs: &[Process],
    region: &str,
    deployment_id: u32,
    strategy: PlacementStrategy,
) -> Option<ProcessId> {
    procs
        .iter()
        .filter(|p| {
            p.region == region
                && p.deployment_id == deployment_id
                && p.status == ProcessStatus::Running
                && p.rooms_allocated < p.rooms_per_process
        })
        .min_by_key(|p| {
            let free = p.rooms_per_process - p.rooms_allocated;
            let rank = match strategy {
                PlacementStrategy::MostFree => u32::MAX - free,
                PlacementStrategy::FewestFree => free,
            };
            (rank, p.started_at, p.process_id)
        })
        .map(|p| p.process_id)
}

/// After a rebuild: new rooms go where SPEC §5 says, retries of rooms created before the
/// crash are recognised, destroyed rooms stay destroyed, and the counts follow.
async fn keeps_working(s: &Scheduler, setup: &Setup, rng: &mut StdRng, seen: &mut Seen, seed: u64) {
    // Rooms acknowledged before the crash answer retries exactly as before it.
    for (app, id, region, config) in seen.caller_ids.clone() {
        let before = s.get_room(&app, &id).await;
        let req = CreateRoom {
            app_id: app.clone(),
            region: region.clone(),
            room_config: config.clone(),
            room_id: Some(id.clone()),
            deployment_id: None,
        };
        let same_region = match &before {
            Ok(Room {
                current_allocation: Some(a),
                ..
            }) => {
                s.get_process(&app, a.process_id)
                    .await
                    .expect("its process")
                    .region
                    == region
            }
            _ => false,
        };
        match before {
            Ok(r) if same_region && r.room_config == config => {
                let placed = s.create_room(req).await.expect("a safe retry");
                let current = r.current_allocation.expect("a live room is placed");
                assert_eq!(
                    placed.process_id, current.process_id,
                    "seed {seed}: retry of {id}"
                );
                let again = s.get_room(&app, &id).await.expect("the room");
                assert_eq!(again.allocations.len(), r.allocations.len());
            }
            Ok(r) if r.status == RoomStatus::Destroyed => {
                assert!(
                    matches!(s.create_room(req).await, Err(Error::AlreadyExists(_))),
                    "seed {seed}: a destroyed room {id} was created again"
                );
                assert!(
                    matches!(s.destroy_room(&app, &id).await, Err(Error::NotFound(_))),
                    "seed {seed}: a destroyed room {id} was destroyed again"
                );
            }
            _ => {}
        }
    }
    for _ in 0..40 {
        setup.advance(Duration::from_millis(rng.random_range(1..=100)));
        let app = APPS[rng.random_range(0..APPS.len())];
        let region = REGIONS[rng.random_range(0..REGIONS.len())];
        let latest = s.latest_deployment(app).await.expect("latest deployment");
        let procs = processes_of(s, app).await;
        let expected = expected_running_choice(
            &procs,
            region,
            latest.deployment_id,
            latest.placement_strategy,
        );
        match s.create_room(room(app, region, None)).await {
            Ok(placed) => {
                seen.rooms.insert((app.into(), placed.room_id.clone()));
                let on = s
                    .get_process(app, placed.process_id)
                    .await
                    .expect("its process");
                assert_eq!(on.deployment_id, latest.deployment_id);
                assert_eq!(on.region, region);
                match expected {
                    Some(pid) => assert_eq!(
                        placed.process_id, pid,
                        "seed {seed}: a room in {app}/{region} did not go to the RUNNING \
                         process SPEC §5 picks"
                    ),
                    None => {
                        // No RUNNING candidate: a STARTING process that had a free slot, or a
                        // new one.
                        let before = procs.iter().find(|p| p.process_id == placed.process_id);
                        if let Some(p) = before {
                            assert_eq!(p.status, ProcessStatus::Starting, "seed {seed}");
                            assert!(p.rooms_allocated < p.rooms_per_process, "seed {seed}");
                        }
                        assert_eq!(on.status, ProcessStatus::Starting);
                    }
                }
            }
            Err(Error::ResourceExhausted { .. }) => {
                assert!(
                    expected.is_none(),
                    "seed {seed}: RESOURCE_EXHAUSTED in {app}/{region} with a free slot"
                );
            }
            Err(e) => panic!("seed {seed}: create_room after the rebuild: {e:?}"),
        }
        if rng.random_bool(0.3) {
            if let Some((app, id)) = pick(rng, &seen.rooms) {
                let before = s.get_room(&app, &id).await;
                let destroyed = s.destroy_room(&app, &id).await;
                if let Ok(r) = before {
                    let live = r.status != RoomStatus::Destroyed;
                    assert_eq!(destroyed.is_ok(), live, "seed {seed}: destroy of {id}");
                    if let (true, Some(current)) = (live, r.current_allocation) {
                        let rooms = s.list_active_rooms(&app, current.process_id).await;
                        assert!(!rooms.expect("rooms").iter().any(|r| r.room_id == id));
                    }
                }
            }
        }
        check_invariants(s, app).await;
    }
}

// ----- 2. the idle timer resumes with its remaining time --------------------------------

/// A RUNNING process with no room, idle for `idle_before_crash` when the scheduler crashes
/// (`held_a_room`: its last room left; otherwise it never had one), then rebuilt.
async fn idle_process_through_a_crash(
    held_a_room: bool,
    idle_before_crash: Duration,
) -> (Setup, Scheduler, ProcessId) {
    let setup = Setup::new("idle", &["Frankfurt"]);
    let s = setup.build(SimulatedConfig::default()).await;
    let dep = DeploymentSpec {
        idle_timeout_enabled: true,
        ..spec(2)
    };
    s.create_deployment(APP, dep).await.expect("deployment");
    let pid = if held_a_room {
        let placed = s
            .create_room(room(APP, "Frankfurt", Some("r1")))
            .await
            .expect("room");
        wait_status(
            &s,
            APP,
            placed.process_id,
            |st| st == ProcessStatus::Running,
            "RUNNING",
        )
        .await;
        setup.advance(Duration::from_secs(50));
        s.destroy_room(APP, "r1").await.expect("destroy");
        placed.process_id
    } else {
        let p = s
            .create_process(APP, "Frankfurt", None)
            .await
            .expect("process");
        wait_status(
            &s,
            APP,
            p.process_id,
            |st| st == ProcessStatus::Running,
            "RUNNING",
        )
        .await;
        p.process_id
    };
    s.settle().await;
    let p = s.get_process(APP, pid).await.expect("process");
    assert_eq!((p.status, p.rooms_allocated), (ProcessStatus::Running, 0));

    setup.advance(idle_before_crash);
    crash(s);
    let s = setup.build(SimulatedConfig::default()).await;
    let p = s
        .get_process(APP, pid)
        .await
        .expect("the process after the rebuild");
    assert!(
        matches!(
            p.status,
            ProcessStatus::Running | ProcessStatus::Stopping | ProcessStatus::Stopped
        ),
        "{:?} after the rebuild",
        p.status
    );
    (setup, s, pid)
}

/// SPEC §4 idle timeout (300 s) + §9: a process that has been idle for 299 s when roomsched
/// crashes has 1 s left after the rebuild, not a fresh 300 s — it stops within seconds. The
/// process became idle by binding with no room (CreateProcess).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timer_resumes_with_its_remaining_time_for_a_process_that_never_held_a_room(
) -> TestResult {
    let (_setup, s, pid) = idle_process_through_a_crash(false, Duration::from_secs(299)).await;
    let p = wait_status(
        &s,
        APP,
        pid,
        |st| st >= ProcessStatus::Stopping,
        "idle-stopped",
    )
    .await;
    assert!(p.stopping_at.is_some());
    let p = wait_status(&s, APP, pid, |st| st == ProcessStatus::Stopped, "STOPPED").await;
    assert_eq!(p.summary_exit_reason, "idle timeout");
    Ok(())
}

/// The same when the process became idle because its last room was destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timer_resumes_with_its_remaining_time_after_the_last_room_left() -> TestResult {
    let (_setup, s, pid) = idle_process_through_a_crash(true, Duration::from_secs(299)).await;
    let p = wait_status(&s, APP, pid, |st| st == ProcessStatus::Stopped, "STOPPED").await;
    assert_eq!(p.summary_exit_reason, "idle timeout");
    assert_eq!(p.rooms_allocated, 0);
    Ok(())
}

/// Counter-case: idle for only 100 s at the crash, 200 s are left — still RUNNING seconds
/// after the rebuild (the rebuild must not treat the process as idle for too long either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_process_with_time_left_is_not_stopped_after_a_rebuild() -> TestResult {
    for held_a_room in [false, true] {
        let (_setup, s, pid) =
            idle_process_through_a_crash(held_a_room, Duration::from_secs(100)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        s.settle().await;
        let p = s.get_process(APP, pid).await?;
        assert_eq!(
            p.status,
            ProcessStatus::Running,
            "held a room: {held_a_room}; stopped with 200 s of its idle timeout left"
        );
    }
    Ok(())
}

// ----- 3. the start timer resumes with its remaining time -------------------------------

/// SPEC §4 start timeout (100 s) + §9: a process STARTING for 99 s when roomsched crashes
/// fails about 1 s after the rebuild; its rooms are placed again on a new process (a new
/// allocation). Crashing 99 s into each new process's start again exhausts the 3 attempts, and
/// the rooms are destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_timer_resumes_with_its_remaining_time_and_rooms_are_placed_again() -> TestResult {
    let setup = Setup::new("start", &["Frankfurt"]);
    let mut s = setup.build(never_ready()).await;
    s.create_deployment(APP, spec(2)).await?;
    let first = s.create_room(room(APP, "Frankfurt", Some("r1"))).await?;
    let second = s.create_room(room(APP, "Frankfurt", Some("r2"))).await?;
    assert_eq!(first.process_id, second.process_id);
    let mut pid = first.process_id;
    let mut failed = Vec::new();
    for attempt in 1..=3usize {
        assert_eq!(
            s.get_process(APP, pid).await?.status,
            ProcessStatus::Starting
        );
        setup.advance(Duration::from_secs(99));
        crash(s);
        s = setup.build(never_ready()).await;
        let p = wait_status(&s, APP, pid, |st| st == ProcessStatus::Failed, "FAILED").await;
        assert!(
            p.summary_exit_reason.contains("did not bind port 7777"),
            "{:?}",
            p.summary_exit_reason
        );
        assert_eq!(p.rooms_allocated, 0);
        assert!(p.terminated_at.is_some());
        failed.push(pid);
        let inactive: Vec<String> = s
            .list_inactive_rooms(APP, pid)
            .await?
            .into_iter()
            .map(|r| r.room_id)
            .collect();
        assert!(inactive.contains(&"r1".to_string()) && inactive.contains(&"r2".to_string()));
        let rooms = [s.get_room(APP, "r1").await?, s.get_room(APP, "r2").await?];
        for r in &rooms {
            assert_eq!(
                r.allocations.len(),
                (attempt + 1).min(3),
                "{}: one allocation per placement, at most 3",
                r.room_id
            );
            assert!(r.allocations.iter().all(|a| a.unscheduled_at.is_some()) == (attempt == 3));
        }
        if attempt < 3 {
            let next = rooms[0]
                .current_allocation
                .as_ref()
                .expect("placed again")
                .process_id;
            assert!(!failed.contains(&next), "placed again on a failed process");
            for r in &rooms {
                assert_eq!(r.status, RoomStatus::Scheduling);
                assert_eq!(
                    r.current_allocation.as_ref().map(|a| a.process_id),
                    Some(next),
                    "both rooms fit on one new process"
                );
            }
            let q = s.get_process(APP, next).await?;
            assert_eq!((q.status, q.rooms_allocated), (ProcessStatus::Starting, 2));
            pid = next;
        } else {
            for r in &rooms {
                assert_eq!(r.status, RoomStatus::Destroyed, "after 3 failed attempts");
                assert!(r.current_allocation.is_none());
            }
        }
        check_invariants(&s, APP).await;
    }
    let procs = processes_of(&s, APP).await;
    assert_eq!(procs.len(), 3, "one process per attempt");
    assert!(procs.iter().all(|p| p.status == ProcessStatus::Failed));
    Ok(())
}

/// Counter-case: STARTING for 50 s at the crash, 50 s are left — still STARTING (and its
/// room SCHEDULING) seconds after the rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_process_with_time_left_does_not_fail_after_a_rebuild() -> TestResult {
    let setup = Setup::new("start-left", &["Frankfurt"]);
    let s = setup.build(never_ready()).await;
    s.create_deployment(APP, spec(2)).await?;
    let placed = s.create_room(room(APP, "Frankfurt", Some("r1"))).await?;
    setup.advance(Duration::from_secs(50));
    crash(s);
    let s = setup.build(never_ready()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.settle().await;
    let p = s.get_process(APP, placed.process_id).await?;
    assert_eq!(p.status, ProcessStatus::Starting, "{p:?}");
    let r = s.get_room(APP, "r1").await?;
    assert_eq!((r.status, r.allocations.len()), (RoomStatus::Scheduling, 1));
    Ok(())
}

// ----- 4. a process STARTING at the crash binds after the rebuild ---------------------------

async fn starting_process_binds_after_rebuild(shared_backend: bool) -> TestResult {
    let setup = Setup::new("binds", &["Frankfurt"]);
    // Fresh backends: the first one binds only after a minute, so the crash surely comes
    // first; the rebuilt one binds 500 ms after adopting. A shared backend (an embedder that
    // keeps its backend across scheduler restarts) binds 2 s after the start.
    let shared: Arc<dyn Backend> = Arc::new(Simulated::new(start_delay(Duration::from_secs(2))));
    let backend = |before: bool| -> Arc<dyn Backend> {
        if shared_backend {
            Arc::clone(&shared)
        } else {
            let delay = if before { 60_000 } else { 500 };
            Arc::new(Simulated::new(start_delay(Duration::from_millis(delay))))
        }
    };
    let s = setup.build_on(backend(true)).await;
    s.create_deployment(APP, spec(2)).await?;
    let placed = s.create_room(room(APP, "Frankfurt", Some("r1"))).await?;
    assert_eq!(placed.status, RoomStatus::Scheduling);
    let pid = placed.process_id;
    crash(s);

    let s = setup.build_on(backend(false)).await;
    let p = s.get_process(APP, pid).await?;
    assert_eq!(
        p.status,
        ProcessStatus::Starting,
        "the crash came before the bind"
    );
    assert_eq!(s.get_room(APP, "r1").await?.status, RoomStatus::Scheduling);
    let conn = s.connection_info(APP, "r1").await?;
    assert_eq!(
        (conn.status, conn.exposed_port),
        (ConnectionStatus::Starting, None)
    );

    let p = wait_status(&s, APP, pid, |st| st != ProcessStatus::Starting, "bound").await;
    assert_eq!(p.status, ProcessStatus::Running, "{p:?}");
    assert!(p.started_at.is_some() && p.exposed_port.is_some());
    assert_eq!(p.rooms_allocated, 1);
    let r = s.get_room(APP, "r1").await?;
    assert_eq!((r.status, r.allocations.len()), (RoomStatus::Active, 1));
    let conn = s.connection_info(APP, "r1").await?;
    assert_eq!(conn.status, ConnectionStatus::Active);
    assert_eq!(conn.process_id, pid);
    assert_eq!(conn.exposed_port, p.exposed_port);
    assert!(conn
        .exposed_port
        .as_ref()
        .is_some_and(|e| e.port > 0 && e.name == "default"));
    // And it survives another crash as RUNNING.
    crash(s);
    let s = setup.build_on(backend(false)).await;
    let again = s.get_process(APP, pid).await?;
    assert_eq!(again, p);
    Ok(())
}

/// SPEC §4 + §9: a process STARTING when roomsched crashed is adopted after the rebuild,
/// binds, becomes RUNNING, and its room becomes ACTIVE with connection info — with the fresh
/// backend a restarted server has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_starting_at_the_crash_becomes_running_after_the_rebuild() -> TestResult {
    starting_process_binds_after_rebuild(false).await
}

/// The same with one simulated backend kept across the restart (`Scheduler::builder()
/// .backend_arc`; the backend's docs: "simulated processes survive a restart of the scheduler").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_starting_at_the_crash_becomes_running_with_a_backend_kept_across_the_restart(
) -> TestResult {
    starting_process_binds_after_rebuild(true).await
}

/// SPEC §4 StopProcess after a rebuild, with one simulated backend kept across the restart:
/// the adopted RUNNING process must reach STOPPED (its exit reaches the new scheduler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_adopted_from_a_backend_kept_across_the_restart_can_be_stopped() -> TestResult {
    let setup = Setup::new("shared-stop", &["Frankfurt"]);
    let backend: Arc<dyn Backend> = Arc::new(Simulated::new(SimulatedConfig::default()));
    let s = setup.build_on(Arc::clone(&backend)).await;
    s.create_deployment(APP, spec(2)).await?;
    let placed = s.create_room(room(APP, "Frankfurt", Some("r1"))).await?;
    let pid = placed.process_id;
    wait_status(&s, APP, pid, |st| st == ProcessStatus::Running, "RUNNING").await;
    crash(s);
    let s = setup.build_on(Arc::clone(&backend)).await;
    assert_eq!(
        s.get_process(APP, pid).await?.status,
        ProcessStatus::Running
    );
    s.stop_process(APP, pid).await?;
    let p = wait_status(&s, APP, pid, |st| st != ProcessStatus::Stopping, "exited").await;
    assert_eq!(p.status, ProcessStatus::Stopped);
    assert_eq!(p.summary_exit_reason, "stopped by request");
    assert_eq!(s.get_room(APP, "r1").await?.status, RoomStatus::Destroyed);
    Ok(())
}

// ----- the order of a process's rooms -------------------------------------------------------

fn ids(rooms: Vec<Room>) -> Vec<String> {
    rooms.into_iter().map(|r| r.room_id).collect()
}

/// SPEC §9 ("back exactly as it was"): ListInactiveRoomsForProcess lists the rooms that left a
/// process in the order they left, ties in creation order. StopProcess ends all of a process's
/// rooms at the same instant: they are listed in creation order, before the crash and after the
/// rebuild alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_rooms_of_a_stopped_process_keep_their_order_through_a_rebuild() -> TestResult {
    let setup = Setup::new("order-inactive", &["Frankfurt"]);
    let s = setup.build(SimulatedConfig::default()).await;
    s.create_deployment(APP, spec(3)).await?;
    let mut pid = None;
    for id in ["zeta", "alpha", "mid"] {
        setup.advance(Duration::from_secs(1));
        let placed = s.create_room(room(APP, "Frankfurt", Some(id))).await?;
        assert_eq!(*pid.get_or_insert(placed.process_id), placed.process_id);
    }
    let pid = pid.expect("a process");
    wait_status(&s, APP, pid, |st| st == ProcessStatus::Running, "RUNNING").await;
    setup.advance(Duration::from_secs(1));
    s.stop_process(APP, pid).await?;
    wait_status(&s, APP, pid, |st| st == ProcessStatus::Stopped, "STOPPED").await;
    let before = s.list_inactive_rooms(APP, pid).await?;
    assert_eq!(ids(before.clone()), ["zeta", "alpha", "mid"]);
    crash(s);
    let s = setup.build(SimulatedConfig::default()).await;
    let after = s.list_inactive_rooms(APP, pid).await?;
    assert_eq!(
        ids(after.clone()),
        ids(before.clone()),
        "the order of the inactive rooms"
    );
    assert_eq!(after, before);
    Ok(())
}

/// The same for ListActiveRoomsForProcess (the order they were placed, ties in creation order): rooms
/// placed again together after a start timeout get the same `scheduled_at`; their order on the
/// new process must survive a rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_rooms_placed_at_the_same_instant_keep_their_order_through_a_rebuild() -> TestResult
{
    let setup = Setup::new("order-active", &["Frankfurt"]);
    let s = setup.build(never_ready()).await;
    s.create_deployment(APP, spec(3)).await?;
    let mut first = None;
    for id in ["zeta", "alpha", "mid"] {
        setup.advance(Duration::from_secs(1));
        let placed = s.create_room(room(APP, "Frankfurt", Some(id))).await?;
        assert_eq!(*first.get_or_insert(placed.process_id), placed.process_id);
    }
    let first = first.expect("a process");
    // The start timer fires about 1 s after the rebuild; the rooms move to a new process.
    setup.advance(Duration::from_secs(99));
    crash(s);
    let s = setup.build(never_ready()).await;
    wait_status(&s, APP, first, |st| st == ProcessStatus::Failed, "FAILED").await;
    let next = s
        .get_room(APP, "zeta")
        .await?
        .current_allocation
        .expect("placed again")
        .process_id;
    let before = s.list_active_rooms(APP, next).await?;
    assert_eq!(ids(before.clone()), ["zeta", "alpha", "mid"]);
    crash(s);
    let s = setup.build(never_ready()).await;
    let after = s.list_active_rooms(APP, next).await?;
    assert_eq!(
        ids(after.clone()),
        ids(before.clone()),
        "the order of the active rooms"
    );
    assert_eq!(after, before);
    Ok(())
}

// ----- 5. randomized crashes against a model --------------------------------------------

/// What a room may be after the operations so far (more than one while an operation's outcome
/// is unknown because the crash interrupted it).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// Never created (its CreateRoom failed or never took effect).
    Absent,
    Destroyed,
    /// Live with this config on this process (`None`: any process).
    Live(Option<ProcessId>, String),
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        id: String,
        region: String,
        config: String,
    },
    Destroy {
        id: String,
    },
    Update {
        id: String,
        config: String,
    },
    Stop {
        pid: ProcessId,
    },
    Drain {
        pid: ProcessId,
    },
    CreateProcess {
        region: String,
    },
    CreateDeployment,
}

#[derive(Debug)]
enum Outcome {
    Created(Result<RoomPlacement, Error>),
    Destroyed(Result<(), Error>),
    Updated(Result<Room, Error>),
    Process(Result<Process, Error>),
    Deployment(Result<roomsched::Deployment, Error>),
}

async fn run_op(s: Scheduler, op: Op) -> Outcome {
    match op {
        Op::Create { id, region, config } => Outcome::Created(
            s.create_room(CreateRoom {
                app_id: APP.into(),
                region,
                room_config: config,
                room_id: Some(id),
                deployment_id: None,
            })
            .await,
        ),
        Op::Destroy { id } => Outcome::Destroyed(s.destroy_room(APP, &id).await),
        Op::Update { id, config } => Outcome::Updated(s.update_room_config(APP, &id, config).await),
        Op::Stop { pid } => Outcome::Process(s.stop_process(APP, pid).await),
        Op::Drain { pid } => Outcome::Process(s.drain_process(APP, pid).await),
        Op::CreateProcess { region } => {
            Outcome::Process(s.create_process(APP, &region, None).await)
        }
        Op::CreateDeployment => Outcome::Deployment(s.create_deployment(APP, spec(3)).await),
    }
}

/// The model: every room id ever used, with what it may be now.
#[derive(Default)]
struct Model {
    rooms: BTreeMap<String, Vec<Fate>>,
    /// How many deployments there may be.
    deployments: Vec<usize>,
    next: usize,
}

impl Model {
    fn certain_live(&self) -> Vec<(String, ProcessId, String)> {
        self.rooms
            .iter()
            .filter_map(|(id, f)| match f.as_slice() {
                [Fate::Live(Some(pid), cfg)] => Some((id.clone(), *pid, cfg.clone())),
                _ => None,
            })
            .collect()
    }

    /// What the rooms may be after `ops` ran concurrently and produced `outcomes` (`None`:
    /// the crash interrupted the call, so it may or may not have taken effect).
    fn apply(&mut self, ops: &[Op], outcomes: &[Option<Outcome>]) {
        let stops: Vec<ProcessId> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Stop { pid } => Some(*pid),
                _ => None,
            })
            .collect();
        let live_on = |fates: &[Fate]| match fates {
            [Fate::Live(Some(pid), cfg)] => Some((*pid, cfg.clone())),
            _ => None,
        };
        // What the rooms were before the batch, and the rooms an operation of the batch names
        // (a stop in the batch leaves those to their own operation's rule).
        let prior = self.rooms.clone();
        let touched: BTreeSet<String> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Create { id, .. } | Op::Destroy { id } | Op::Update { id, .. } => {
                    Some(id.clone())
                }
                _ => None,
            })
            .collect();
        for (op, outcome) in ops.iter().zip(outcomes) {
            match (op, outcome) {
                (Op::Create { id, config, .. }, Some(Outcome::Created(result))) => {
                    let fates = match result {
                        Ok(placed) => {
                            let mut f = vec![Fate::Live(Some(placed.process_id), config.clone())];
                            if stops.contains(&placed.process_id) {
                                f.push(Fate::Destroyed);
                            }
                            f
                        }
                        Err(Error::ResourceExhausted { .. }) => vec![Fate::Absent],
                        Err(e) => panic!("create_room {id}: {e:?}"),
                    };
                    self.rooms.insert(id.clone(), fates);
                }
                (Op::Create { id, config, .. }, None) => {
                    let mut f = vec![Fate::Absent, Fate::Live(None, config.clone())];
                    if !stops.is_empty() {
                        f.push(Fate::Destroyed);
                    }
                    self.rooms.insert(id.clone(), f);
                }
                (Op::Destroy { id }, outcome) => {
                    let (pid, cfg) = live_on(&prior[id]).expect("destroy a live room");
                    let fates = match outcome {
                        Some(Outcome::Destroyed(Ok(()))) => vec![Fate::Destroyed],
                        Some(Outcome::Destroyed(Err(Error::NotFound(_))))
                            if stops.contains(&pid) =>
                        {
                            vec![Fate::Destroyed]
                        }
                        Some(other) => panic!("destroy_room {id}: {other:?}"),
                        None => vec![Fate::Live(Some(pid), cfg), Fate::Destroyed],
                    };
                    self.rooms.insert(id.clone(), fates);
                }
                (Op::Update { id, config }, outcome) => {
                    let (pid, old) = live_on(&prior[id]).expect("update a live room");
                    let stopped = stops.contains(&pid);
                    let mut fates = match outcome {
                        Some(Outcome::Updated(Ok(r))) => {
                            assert_eq!(&r.room_config, config);
                            vec![Fate::Live(Some(pid), config.clone())]
                        }
                        Some(Outcome::Updated(Err(Error::NotFound(_)))) if stopped => vec![],
                        Some(other) => panic!("update_room_config {id}: {other:?}"),
                        None => vec![
                            Fate::Live(Some(pid), old),
                            Fate::Live(Some(pid), config.clone()),
                        ],
                    };
                    if stopped {
                        fates.push(Fate::Destroyed);
                    }
                    self.rooms.insert(id.clone(), fates);
                }
                (Op::Stop { pid }, outcome) => {
                    if let Some(Outcome::Process(Err(e))) = outcome {
                        panic!("stop_process {pid}: {e:?}");
                    }
                    let acked = outcome.is_some();
                    for (id, fates) in self.rooms.iter_mut() {
                        if touched.contains(id) {
                            continue;
                        }
                        if let Some((on, cfg)) = live_on(fates) {
                            if on == *pid {
                                *fates = if acked {
                                    vec![Fate::Destroyed]
                                } else {
                                    vec![Fate::Live(Some(on), cfg), Fate::Destroyed]
                                };
                            }
                        }
                    }
                }
                (Op::Drain { pid }, Some(Outcome::Process(Err(e)))) => {
                    panic!("drain_process {pid}: {e:?}")
                }
                (Op::CreateProcess { .. }, Some(Outcome::Process(Err(e)))) => {
                    assert!(
                        matches!(e, Error::ResourceExhausted { .. }),
                        "create_process: {e:?}"
                    );
                }
                (Op::CreateDeployment, outcome) => {
                    let n = self.deployments.clone();
                    self.deployments = match outcome {
                        Some(Outcome::Deployment(Ok(_))) => n.iter().map(|d| d + 1).collect(),
                        Some(other) => panic!("create_deployment: {other:?}"),
                        None => n.iter().flat_map(|d| [*d, d + 1]).collect(),
                    };
                }
                _ => {}
            }
        }
    }

    /// Checks the scheduler against the model (every acknowledged room and destroy is there,
    /// nothing else is live) and then takes what it observed as certain.
    async fn check_and_resolve(&mut self, s: &Scheduler, context: &str) {
        let live = check_invariants(s, APP).await;
        let procs = processes_of(s, APP).await;
        for (id, fates) in self.rooms.iter_mut() {
            let seen = match s.get_room(APP, id).await {
                Ok(r) if r.status == RoomStatus::Destroyed => Fate::Destroyed,
                Ok(r) => {
                    let pid = r
                        .current_allocation
                        .expect("a live room is placed")
                        .process_id;
                    let p = procs
                        .iter()
                        .find(|p| p.process_id == pid)
                        .expect("its process");
                    assert!(
                        p.status.is_live(),
                        "{context}: live room {id} on {:?}",
                        p.status
                    );
                    Fate::Live(Some(pid), r.room_config)
                }
                Err(Error::NotFound(_)) => Fate::Absent,
                Err(e) => panic!("{context}: get_room {id}: {e:?}"),
            };
            let allowed = fates.iter().any(|f| match (f, &seen) {
                (Fate::Live(None, cfg), Fate::Live(_, seen_cfg)) => cfg == seen_cfg,
                (f, seen) => f == seen,
            });
            assert!(
                allowed,
                "{context}: room {id} is {seen:?}, but the acknowledged operations allow only \
                 {fates:?}"
            );
            *fates = vec![seen];
        }
        // Nothing is live that the model does not know as live on that process.
        let mut listed = 0;
        for (pid, rooms) in &live {
            for id in rooms {
                listed += 1;
                match self.rooms.get(id).map(Vec::as_slice) {
                    Some([Fate::Live(Some(on), _)]) if on == pid => {}
                    other => panic!("{context}: room {id} is live on {pid}; model: {other:?}"),
                }
            }
        }
        assert_eq!(listed, self.certain_live().len(), "{context}: live rooms");
        let deployments = s.list_deployments(APP).await.expect("deployments").len();
        assert!(
            self.deployments.contains(&deployments),
            "{context}: {deployments} deployments, expected one of {:?}",
            self.deployments
        );
        self.deployments = vec![deployments];
    }
}

/// SPEC §9 under crashes at random moments: batches of concurrent operations (create with
/// caller ids, destroy, update, stop, drain, create process, new deployments), with the
/// scheduler crashing at random points — sometimes between batches, sometimes while calls are
/// in flight. After every rebuild (and every batch): rooms_allocated equals the listed rooms,
/// never above rooms_per_process, no live room on a process that is not live; every room whose
/// creation was acknowledged (and not destroyed) is there, live, on the process it was placed
/// on, with its last acknowledged config; every acknowledged destroy stays destroyed; a failed
/// create left nothing; nothing is live that no call created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_crashes_keep_every_acknowledged_change() -> TestResult {
    let mut rebuilds = 0;
    let mut interrupted = 0;
    for seed in [5u64, 17, 29] {
        let (r, i) = random_crashes_run(seed).await;
        rebuilds += r;
        interrupted += i;
    }
    eprintln!("model: {rebuilds} rebuilds, {interrupted} calls interrupted by a crash");
    assert!(rebuilds >= 20, "only {rebuilds} rebuilds");
    assert!(
        interrupted >= 5,
        "only {interrupted} calls interrupted by a crash"
    );
    Ok(())
}

async fn random_crashes_run(seed: u64) -> (usize, usize) {
    let regions = ["Frankfurt", "Tokyo"];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut setup = Setup::new(&format!("model-{seed}"), &regions);
    setup.max_processes = 5;
    let mut s = setup.build(SimulatedConfig::default()).await;
    s.create_deployment(APP, spec(3)).await.expect("deployment");
    let mut model = Model {
        deployments: vec![1],
        ..Default::default()
    };
    let (mut rebuilds, mut interrupted) = (0, 0);
    for batch in 0..70 {
        setup.advance(Duration::from_millis(rng.random_range(1..=200)));
        let procs = processes_of(&s, APP).await;
        let live_procs: Vec<ProcessId> = procs
            .iter()
            .filter(|p| p.status.is_live())
            .map(|p| p.process_id)
            .collect();
        let mut rooms = model.certain_live();
        let mut ops = Vec::new();
        let mut stopped = false;
        for _ in 0..rng.random_range(1..=6) {
            let op = match rng.random_range(0..100) {
                0..=44 => {
                    model.next += 1;
                    Op::Create {
                        id: format!("m{}", model.next),
                        region: regions[rng.random_range(0..2)].into(),
                        config: format!("c{}", rng.random_range(0..3)),
                    }
                }
                45..=64 if !rooms.is_empty() => {
                    let (id, _, _) = rooms.swap_remove(rng.random_range(0..rooms.len()));
                    Op::Destroy { id }
                }
                65..=74 if !rooms.is_empty() => {
                    let (id, _, _) = rooms.swap_remove(rng.random_range(0..rooms.len()));
                    Op::Update {
                        id,
                        config: format!("u{}", rng.random_range(0..1000)),
                    }
                }
                75..=81 if !stopped && !live_procs.is_empty() => {
                    stopped = true;
                    Op::Stop {
                        pid: live_procs[rng.random_range(0..live_procs.len())],
                    }
                }
                82..=86 if !live_procs.is_empty() => Op::Drain {
                    pid: live_procs[rng.random_range(0..live_procs.len())],
                },
                87..=95 => Op::CreateProcess {
                    region: regions[rng.random_range(0..2)].into(),
                },
                96..=98 => Op::CreateDeployment,
                _ => continue,
            };
            ops.push(op);
        }
        let handles: Vec<_> = ops
            .iter()
            .map(|op| tokio::spawn(run_op(s.clone(), op.clone())))
            .collect();
        let crash_now = rng.random_range(0..100);
        let mut outcomes = Vec::new();
        if crash_now < 30 {
            // Crash while calls are in flight.
            let wait = Duration::from_micros(rng.random_range(0..3000));
            tokio::time::sleep(wait).await;
            for h in &handles {
                h.abort();
            }
        }
        for h in handles {
            match h.await {
                Ok(outcome) => outcomes.push(Some(outcome)),
                Err(e) if e.is_cancelled() => {
                    interrupted += 1;
                    outcomes.push(None);
                }
                Err(e) => panic!("seed {seed}: an operation panicked: {e}"),
            }
        }
        model.apply(&ops, &outcomes);
        let context = format!("seed {seed}, batch {batch}");
        if crash_now < 45 {
            crash(s);
            s = setup.build(SimulatedConfig::default()).await;
            rebuilds += 1;
            model
                .check_and_resolve(&s, &format!("{context}, right after the rebuild"))
                .await;
            // Adopted STARTING processes bind again, STOPPING ones finish: still consistent.
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.settle().await;
        }
        model.check_and_resolve(&s, &context).await;
    }
    (rebuilds, interrupted)
}

// ----- 6. compaction under churn ----------------------------------------------------------

/// Lets the test keep a handle on the store the scheduler writes to.
struct SharedStore(Arc<DurableStore>);

impl Store for SharedStore {
    fn wants_records(&self) -> bool {
        self.0.wants_records()
    }

    fn append(&self, change: Change) -> Commit {
        self.0.append(change)
    }

    fn load(&self, visit: &mut dyn FnMut(Record)) -> Result<(), StoreError> {
        self.0.load(visit)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        self.0.reopen()
    }
}

const CHURN_PAIRS: usize = 1_000_000;
const CHURN_TASKS: usize = 256;
const CHURN_RETAINED: usize = 1000;
/// The churned file may be at most this many times the size of a fresh file holding the same
/// records…
const SIZE_RATIO: u64 = 4;
/// …plus this much, for states so small that the file's fixed overhead (redb allocates its
/// file in regions) dominates.
const SIZE_FLOOR: u64 = 1 << 20;

/// SPEC §7 (retention bounded under endless churn) + §9 and the store's compaction: a million
/// CreateRoom+DestroyRoom pairs through the library on a durable store (256 concurrent callers,
/// so group commit shares the fsyncs) leave a file no larger than a small multiple of a fresh
/// file holding only the final state — the file holds the state, not the history. The final
/// state is then rebuilt: no live room, exactly the retained destroyed rooms readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_a_store_file_close_to_the_size_of_its_state() -> TestResult {
    let dir = TempDir::new("churn");
    let store = Arc::new(DurableStore::open(dir.path())?);
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(Simulated::default())
        .store(SharedStore(Arc::clone(&store)))
        .retained_destroyed_rooms(CHURN_RETAINED)
        .build()?;
    s.create_deployment(APP, spec(16)).await?;

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CHURN_TASKS {
        let (s, next, done) = (s.clone(), Arc::clone(&next), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < CHURN_PAIRS {
                let placed = s.create_room(room(APP, "Frankfurt", None)).await?;
                s.destroy_room(APP, &placed.room_id).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, Error>(())
        }));
    }
    let progress = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let n = done.load(Ordering::Relaxed);
                eprintln!(
                    "churn: {n} pairs after {:.0?} ({:.0} pairs/s)",
                    started.elapsed(),
                    n as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    for t in tasks {
        t.await??;
    }
    progress.abort();
    let took = started.elapsed();
    assert_eq!(done.load(Ordering::Relaxed), CHURN_PAIRS);
    eprintln!(
        "churn: {CHURN_PAIRS} pairs in {took:.1?} ({:.0} pairs/s)",
        CHURN_PAIRS as f64 / took.as_secs_f64()
    );
    check_invariants(&s, APP).await;
    s.settle().await;
    crash(s);

    let churned_size = store.file_size()?;
    let records = {
        let store = Arc::clone(&store);
        tokio::task::spawn_blocking(move || {
            let mut records = Vec::new();
            store.load(&mut |r| records.push(r)).map(|()| records)
        })
        .await??
    };
    let rooms: Vec<&roomsched::store::RoomRecord> = records
        .iter()
        .filter_map(|r| match r {
            Record::Room(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(
        rooms.len(),
        CHURN_RETAINED,
        "rooms in the store after the churn"
    );
    assert!(rooms.iter().all(|r| r.room.current_allocation.is_none()));

    // The same records in a fresh store.
    let fresh_dir = TempDir::new("churn-fresh");
    let fresh = DurableStore::open(fresh_dir.path())?;
    let commits: Vec<Commit> = records
        .chunks(512)
        .map(|c| fresh.append(c.to_vec()))
        .collect();
    for c in commits {
        c.wait().await?;
    }
    let fresh_size = fresh.file_size()?;
    eprintln!(
        "churn: store file {churned_size} bytes after the churn, {fresh_size} bytes fresh with \
         the same {} records",
        records.len()
    );
    let limit = SIZE_RATIO * fresh_size + SIZE_FLOOR;
    assert!(
        churned_size <= limit,
        "the churned store file is {churned_size} bytes, over {limit} ({SIZE_RATIO}× the \
         {fresh_size} bytes of a fresh file with the same state, plus {SIZE_FLOOR})"
    );

    // And the churned file rebuilds to that state.
    drop(store);
    drop(fresh);
    let rebuilt_started = Instant::now();
    let store = open_store(dir.path()).await;
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(Simulated::default())
        .store(store)
        .retained_destroyed_rooms(CHURN_RETAINED)
        .build()?;
    eprintln!("churn: rebuilt in {:.1?}", rebuilt_started.elapsed());
    let live = check_invariants(&s, APP).await;
    assert!(
        live.values().all(Vec::is_empty),
        "live rooms after the churn"
    );
    let mut retained = 0;
    for pid in live.keys() {
        for r in s.list_inactive_rooms(APP, *pid).await? {
            assert_eq!(r.status, RoomStatus::Destroyed);
            retained += 1;
        }
    }
    assert_eq!(
        retained, CHURN_RETAINED,
        "destroyed rooms readable after the rebuild"
    );
    Ok(())
}
