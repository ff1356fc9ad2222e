//! The [`Scheduler`]: the library's front door. It validates requests, finds the shard a
//! request belongs to, runs one [`ShardState`] operation under that shard's lock, and then —
//! with the lock released — waits for the store, tells the backend what to do, arms timers and
//! wakes connection watchers.
//!
//! Shared state and lock order:
//! - `apps` (dashmap: app id → [`App`]) is only read to find an app; guards are dropped at once.
//! - Each shard has a std `Mutex<ShardState>`: placement is a read-modify-write across the
//!   shard's processes, so it needs one lock per (app, region), never held across `.await`
//!   (the critical sections are short and do no I/O, so a blocking mutex is right).
//! - While a shard lock is held, the code may take, briefly, a guard of the app's `rooms` map,
//!   the `process_locations` map, or a read lock of the app's deployments — never the other
//!   way round, and never another shard's lock.
//! - `retention` is taken alone.
//!
//! Backend reports and timers arrive on one channel and are applied by one task, in order.
//!
//! Durability: the state lives in one [`State`] behind an `ArcSwap`. At build it is rebuilt
//! from the store (and the backend adopts the live processes); when a commit fails, the state
//! is *retired* (every change to it is refused under its lock), the store is reopened and a
//! fresh `State` is rebuilt from what is on disk and swapped in — memory never runs ahead of
//! the store, and the failed call returns UNAVAILABLE only once that is done.

use super::clock::{Clock, SystemClock};
use super::error::{Error, Result};
use super::shard::{Ctx, Effect, Limits, ShardState, Txn};
use super::types::*;
use super::validate;
use super::ROOM_LOG;
use crate::backend::{
    AdoptSpec, Backend, ProcessEvent, ProcessEventKind, ProcessEvents, Simulated, StartSpec,
};
use crate::store::{Commit, MemoryStore, ProcessRecord, Record, RoomRecord, Store};
use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap as SipDashMap;

/// Concurrent maps keyed by ids, with foldhash (see `shard::FastMap`).
type DashMap<K, V> = SipDashMap<K, V, foldhash::fast::RandomState>;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The 14 Hathora region names, the default region set.
pub const DEFAULT_REGIONS: [&str; 14] = [
    "Seattle",
    "Los_Angeles",
    "Washington_DC",
    "Chicago",
    "London",
    "Frankfurt",
    "Mumbai",
    "Singapore",
    "Tokyo",
    "Sydney",
    "Sao_Paulo",
    "Dallas",
    "Johannesburg",
    "Dubai",
];

/// How long a refused change's caller, or a read, waits for memory to be rolled back to the
/// store before it gives up with UNAVAILABLE (the rollback itself goes on).
const ROLLBACK_WAIT: Duration = Duration::from_secs(10);

/// Default page size of `list_processes`, and its cap.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// The room scheduler. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("regions", &self.inner.regions)
            .field("backend", &self.inner.backend.name())
            .finish_non_exhaustive()
    }
}

struct Inner {
    regions: Vec<String>,
    limits: Limits,
    default_policy: RegionPolicy,
    retained_destroyed_rooms: usize,
    clock: Arc<dyn Clock>,
    backend: Arc<dyn Backend>,
    store: Arc<dyn Store>,
    state: ArcSwap<State>,
    /// Held while memory is rolled back to the store after a failed commit.
    rollback: tokio::sync::Mutex<()>,
    events: mpsc::UnboundedSender<ProcessEvent>,
    closing: watch::Sender<bool>,
    /// The next room's number (`RoomRecord::seq`): above every number in the store.
    room_seq: AtomicU64,
    observer: Arc<dyn super::Observer>,
}

/// A change made in memory whose commit and effects are still to come. Dropped before they
/// were taken (the caller went away while the store flushed), it finishes the change in a
/// task of its own: the change is made, so its effects (start a process, arm its timers)
/// must happen regardless.
struct Unfinished {
    scheduler: Scheduler,
    app: Arc<App>,
    region: usize,
    rest: Option<(Txn, Option<Commit>)>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the runtime is gone, and the scheduler with it
        };
        if let Some((txn, commit)) = self.rest.take() {
            let (scheduler, app, region) =
                (self.scheduler.clone(), Arc::clone(&self.app), self.region);
            runtime.spawn(async move {
                let _ = scheduler.finish(&app, region, txn, commit).await;
            });
        }
    }
}

/// Everything the scheduler knows; replaced as a whole when memory is rolled back.
#[derive(Default)]
struct State {
    apps: DashMap<String, Arc<App>>,
    /// process id → where it lives (its app and region index).
    process_locations: DashMap<ProcessId, (Arc<App>, usize)>,
    /// Destroyed rooms, oldest first; past `retained_destroyed_rooms` the oldest are forgotten.
    retention: Mutex<VecDeque<(Arc<App>, usize, String)>>,
    /// Set when this state is being replaced: shared with every app of the state, checked
    /// under each lock that guards a change, so nothing changes it any more.
    retired: Arc<AtomicBool>,
}

/// One app: its deployments, the index of its room ids, and one shard per configured region.
struct App {
    app_id: String,
    /// Oldest first; `deployment_id` = position + 1.
    deployments: RwLock<Vec<Arc<Deployment>>>,
    /// room id → region index, for every live or retained room of the app. Ids are unique
    /// within an app across regions; an entry is inserted under the room's shard lock.
    rooms: DashMap<String, usize>,
    shards: Box<[OnceLock<Arc<Shard>>]>,
    /// The policy of a region until SetRegionPolicy changes it.
    default_policy: RegionPolicy,
    /// Its [`State`]'s retired flag.
    retired: Arc<AtomicBool>,
}

struct Shard {
    state: Mutex<ShardState>,
    /// Bumped after every change a connection watcher may care about.
    changes: watch::Sender<u64>,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, ShardState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl App {
    fn new(
        app_id: String,
        regions: usize,
        default_policy: RegionPolicy,
        retired: &Arc<AtomicBool>,
    ) -> App {
        App {
            app_id,
            deployments: RwLock::default(),
            rooms: DashMap::default(),
            shards: (0..regions).map(|_| OnceLock::new()).collect(),
            default_policy,
            retired: Arc::clone(retired),
        }
    }

    /// Changes are refused: memory is being rolled back to the store.
    fn check_not_retired(&self) -> Result<()> {
        if self.retired.load(Ordering::Acquire) {
            return Err(Error::Unavailable(
                "a write to the store failed; roomsched is rolling back to the last commit, \
                 retry"
                    .into(),
            ));
        }
        Ok(())
    }

    fn shard(&self, region: usize) -> &Arc<Shard> {
        self.shards[region].get_or_init(|| {
            Arc::new(Shard {
                state: Mutex::new(ShardState::new(self.default_policy)),
                changes: watch::Sender::new(0),
            })
        })
    }

    fn existing_shard(&self, region: usize) -> Option<&Arc<Shard>> {
        self.shards[region].get()
    }

    fn latest(&self) -> Result<Arc<Deployment>> {
        let deps = self.deployments.read().unwrap_or_else(|e| e.into_inner());
        deps.last()
            .cloned()
            .ok_or_else(|| no_deployment(&self.app_id))
    }

    fn deployment(&self, id: u32) -> Result<Arc<Deployment>> {
        let deps = self.deployments.read().unwrap_or_else(|e| e.into_inner());
        id.checked_sub(1)
            .and_then(|i| deps.get(i as usize))
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!("deployment {id} of app {} not found", self.app_id))
            })
    }

    /// The requested deployment, or the latest for `None`.
    fn target_deployment(&self, id: Option<u32>) -> Result<Arc<Deployment>> {
        match id {
            Some(id) => self.deployment(id),
            None => self.latest(),
        }
    }
}

fn no_deployment(app_id: &str) -> Error {
    Error::FailedPrecondition(format!(
        "app {app_id} has no deployment; create one first (CreateDeployment, or `roomsched deployment create`)"
    ))
}

fn room_not_found(room_id: &str) -> Error {
    Error::NotFound(format!("room {room_id:?} not found"))
}

fn process_not_found(pid: ProcessId) -> Error {
    Error::NotFound(format!("process {pid} not found"))
}

/// 13 lowercase base-36 characters.
fn generate_room_id() -> String {
    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    // 13 base-36 digits (~67 bits): 12 from one random u64 (36^12 < 2^64), one from another.
    // 64-bit arithmetic: dividing a u128 is a slow library call.
    let (mut n, last): (u64, u64) = rand::random();
    let mut id = [0u8; 13];
    for digit in &mut id[..12] {
        *digit = ALPHABET[(n % 36) as usize];
        n /= 36;
    }
    id[12] = ALPHABET[(last % 36) as usize];
    String::from_utf8(id.to_vec()).expect("the alphabet is ASCII")
}

/// How many destroyed rooms past the retention window are forgotten at once: a 64th of the
/// window, at most 256. Forgetting touches memory long out of cache (~0.5 µs a room) while
/// the shard lock is held, so bigger batches stall the region's placements (1,562 rooms, the
/// default window's 64th, held it ~0.8 ms).
fn eviction_batch(window: usize) -> usize {
    (window / 64).clamp(1, 256)
}

/// Configures and builds a [`Scheduler`].
pub struct SchedulerBuilder {
    regions: Vec<String>,
    backend: Option<Arc<dyn Backend>>,
    store: Option<Arc<dyn Store>>,
    clock: Option<Arc<dyn Clock>>,
    limits: Limits,
    default_policy: RegionPolicy,
    retained_destroyed_rooms: usize,
    observer: Option<Arc<dyn super::Observer>>,
}

impl Default for SchedulerBuilder {
    fn default() -> Self {
        SchedulerBuilder {
            regions: DEFAULT_REGIONS.iter().map(|s| s.to_string()).collect(),
            backend: None,
            store: None,
            clock: None,
            default_policy: RegionPolicy::default(),
            limits: Limits {
                idle_timeout: Duration::from_secs(300),
                stop_grace: Duration::from_secs(10),
                start_timeout: Duration::from_secs(100),
            },
            retained_destroyed_rooms: 100_000,
            observer: None,
        }
    }
}

impl SchedulerBuilder {
    /// The configured region names (default: the 14 Hathora regions).
    pub fn regions<I, S>(mut self, regions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.regions = regions.into_iter().map(Into::into).collect();
        self
    }

    /// What starts processes (default: [`Simulated`] with its defaults).
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// Like [`Self::backend`], keeping a handle to the backend.
    pub fn backend_arc(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Where changes are persisted (default: [`MemoryStore`]).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Where timestamps come from (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// A STARTING process that has not bound its port by then fails (default 100 s).
    pub fn start_timeout(mut self, d: Duration) -> Self {
        self.limits.start_timeout = d;
        self
    }

    /// A RUNNING process with no room for this long is stopped, if its deployment enables
    /// the idle timeout (default 300 s).
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.limits.idle_timeout = d;
        self
    }

    /// Between SIGTERM and SIGKILL when a process is stopped (default 10 s).
    pub fn stop_grace(mut self, d: Duration) -> Self {
        self.limits.stop_grace = d;
        self
    }

    /// Live processes (STARTING, RUNNING, DRAINING) allowed per app and region, until a
    /// region policy says otherwise (default 1000).
    pub fn max_processes(mut self, n: u32) -> Self {
        self.default_policy.max_processes = n;
        self
    }

    /// The policy of every (app, region) until SetRegionPolicy changes it (default: no warm
    /// pool, at most 1000 processes).
    pub fn default_region_policy(mut self, policy: RegionPolicy) -> Self {
        self.default_policy = policy;
        self
    }

    /// How many destroyed rooms stay readable, server-wide (default 100,000). The oldest
    /// beyond it are forgotten in batches of a 64th of it (at most 256), so up to that many
    /// more may be.
    pub fn retained_destroyed_rooms(mut self, n: usize) -> Self {
        self.retained_destroyed_rooms = n;
        self
    }

    /// Who is told of placements and process starts (default: no one).
    pub fn observer(mut self, observer: Arc<dyn super::Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Builds the scheduler. Must be called within a Tokio runtime: it spawns the task that
    /// applies process events and timers.
    pub fn build(self) -> Result<Scheduler> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::FailedPrecondition("Scheduler::build must run inside a Tokio runtime".into())
        })?;
        validate::region_policy(&self.default_policy)?;
        super::validate_regions(&self.regions)?;
        let (events, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            regions: self.regions,
            limits: self.limits,
            default_policy: self.default_policy,
            retained_destroyed_rooms: self.retained_destroyed_rooms,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            backend: self
                .backend
                .unwrap_or_else(|| Arc::new(Simulated::default())),
            store: self.store.unwrap_or_else(|| Arc::new(MemoryStore)),
            state: ArcSwap::default(),
            rollback: tokio::sync::Mutex::new(()),
            events,
            closing: watch::Sender::new(false),
            room_seq: AtomicU64::new(0),
            observer: self
                .observer
                .unwrap_or_else(|| Arc::new(super::observer::NoObserver)),
        });
        let scheduler = Scheduler { inner };
        let started = std::time::Instant::now();
        let (state, effects) = scheduler.load_state(true)?;
        let (apps, processes) = (state.apps.len(), state.process_locations.len());
        scheduler.inner.state.store(Arc::new(state));
        if apps > 0 {
            tracing::info!(
                apps,
                processes,
                took_ms = started.elapsed().as_millis() as u64,
                "state restored from the store"
            );
        }
        runtime.spawn(event_loop(Arc::downgrade(&scheduler.inner), rx));
        for (app, region, effect) in effects {
            scheduler.carry_out(&app, region, effect);
        }
        // Warm pools whose processes did not survive are refilled once their exits arrive;
        // check every restored pool once anyway.
        let this = scheduler.clone();
        runtime.spawn(async move { this.reconcile_all_pools().await });
        Ok(scheduler)
    }
}

/// Applies backend reports and timer firings, one at a time, until the scheduler is dropped.
/// An event whose change could not be persisted is applied again once memory is rolled back
/// (a process exit must not be lost to a full disk).
async fn event_loop(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<ProcessEvent>) {
    const ATTEMPTS: u32 = 10;
    while let Some(event) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let scheduler = Scheduler { inner };
        if let ProcessEventKind::Barrier(done) = event.kind {
            let _ = done.send(());
            continue;
        }
        for attempt in 1..=ATTEMPTS {
            match scheduler.apply_event(&event).await {
                Err(Error::Unavailable(err))
                    if attempt < ATTEMPTS && scheduler.check_open().is_ok() =>
                {
                    tracing::warn!(%err, process_id = %event.process_id, attempt, "process event not persisted; trying again");
                    let _ = scheduler.inner.rollback.lock().await;
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
                }
                Err(err) => {
                    tracing::error!(%err, process_id = %event.process_id, "could not apply a process event");
                    break;
                }
                Ok(()) => break,
            }
        }
    }
}

impl Scheduler {
    pub fn builder() -> SchedulerBuilder {
        SchedulerBuilder::default()
    }

    /// Processes by status and live rooms of every app in every region where it has ever
    /// had a process (not waiting for pending commits: for monitoring).
    pub fn census(&self) -> Vec<RegionCensus> {
        let mut out = Vec::new();
        for app in self.state().apps.iter() {
            for region in 0..app.shards.len() {
                if let Some(shard) = app.existing_shard(region) {
                    let (processes, live_rooms) = shard.lock().census();
                    out.push(RegionCensus {
                        app_id: app.app_id.clone(),
                        region: self.inner.regions[region].clone(),
                        processes,
                        live_rooms,
                    });
                }
            }
        }
        out
    }

    /// The configured regions.
    pub fn regions(&self) -> &[String] {
        &self.inner.regions
    }

    /// Stops every process the backend started (SIGTERM, then SIGKILL after the stop grace),
    /// waits until they have exited and applies their exits. For a clean shutdown of the
    /// host program: game servers should not outlive it.
    pub async fn stop_all_processes(&self) {
        self.shutdown();
        let apps: Vec<Arc<App>> = self
            .state()
            .apps
            .iter()
            .map(|a| Arc::clone(a.value()))
            .collect();
        for app in apps {
            for region in 0..self.inner.regions.len() {
                if app.existing_shard(region).is_none() {
                    continue;
                }
                let stopped = self
                    .change(&app, region, |state, ctx, txn| {
                        for pid in state.live_process_ids() {
                            state.stop(ctx, pid, "roomsched shut down", txn);
                        }
                        Ok(())
                    })
                    .await;
                if let Err(err) = stopped {
                    tracing::warn!(%err, app_id = app.app_id, "could not record the stop of processes");
                }
            }
        }
        self.inner
            .backend
            .shutdown(self.inner.limits.stop_grace)
            .await;
        self.settle().await;
    }

    /// Waits until every process event reported so far (binds, exits, fired timers) has been
    /// applied. Useful to embedders and tests that drive a backend by hand.
    pub async fn settle(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        let barrier = ProcessEvent {
            process_id: ProcessId::nil(),
            kind: ProcessEventKind::Barrier(done),
        };
        if self.inner.events.send(barrier).is_ok() {
            let _ = wait.await;
        }
    }

    /// Waits until every change made so far is on disk (at once with the memory store).
    pub async fn flush(&self) -> Result<()> {
        self.inner
            .store
            .barrier()
            .wait()
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))
    }

    /// Refuses further changes with UNAVAILABLE and ends connection watches. Reads still work.
    pub fn shutdown(&self) {
        self.inner.closing.send_replace(true);
    }

    fn check_open(&self) -> Result<()> {
        if *self.inner.closing.borrow() {
            return Err(Error::Unavailable("roomsched is shutting down".into()));
        }
        Ok(())
    }

    // ----- plumbing --------------------------------------------------------------------

    fn state(&self) -> arc_swap::Guard<Arc<State>> {
        self.inner.state.load()
    }

    fn existing_app(&self, app_id: &str) -> Option<Arc<App>> {
        self.state().apps.get(app_id).map(|a| Arc::clone(a.value()))
    }

    fn app(&self, app_id: &str) -> Result<Arc<App>> {
        validate::app_id(app_id)?;
        self.state()
            .apps
            .get(app_id)
            .map(|a| Arc::clone(a.value()))
            .ok_or_else(|| no_deployment(app_id))
    }

    /// The app and region of a room of `app_id`.
    fn locate_room(&self, app_id: &str, room_id: &str) -> Result<(Arc<App>, usize)> {
        validate::app_id(app_id)?;
        validate::room_id(room_id)?;
        let app = self
            .existing_app(app_id)
            .ok_or_else(|| room_not_found(room_id))?;
        let region = app
            .rooms
            .get(room_id)
            .map(|r| *r.value())
            .ok_or_else(|| room_not_found(room_id))?;
        Ok((app, region))
    }

    /// The app and region of a process of `app_id`.
    fn locate_process(&self, app_id: &str, pid: ProcessId) -> Result<(Arc<App>, usize)> {
        validate::app_id(app_id)?;
        let loc = self
            .state()
            .process_locations
            .get(&pid)
            .map(|l| (Arc::clone(&l.0), l.1));
        match loc {
            Some((app, region)) if app.app_id == app_id => Ok((app, region)),
            _ => Err(process_not_found(pid)),
        }
    }

    /// The inputs of a change of `state` (whose lock the caller holds).
    fn ctx<'a>(&'a self, app: &'a App, region: usize) -> Ctx<'a> {
        Ctx {
            app_id: &app.app_id,
            region: &self.inner.regions[region],
            now: self.inner.clock.now(),
            instant: tokio::time::Instant::now(),
            limits: &self.inner.limits,
            backend: self.inner.backend.as_ref(),
            latest: app.latest().ok(),
            room_seq: &self.inner.room_seq,
            observer: self.inner.observer.as_ref(),
        }
    }

    /// Reads a shard under its lock.
    fn read<T>(&self, app: &App, region: usize, f: impl FnOnce(&ShardState) -> T) -> T {
        f(&app.shard(region).lock())
    }

    /// Runs one change on a shard under its lock, then (unlocked) persists it and acts on it.
    async fn change<T>(
        &self,
        app: &Arc<App>,
        region: usize,
        f: impl FnOnce(&mut ShardState, &Ctx<'_>, &mut Txn) -> Result<T>,
    ) -> Result<T> {
        let shard = app.shard(region);
        let mut txn = Txn::new(self.inner.store.wants_records());
        let (out, commit) = {
            let mut state = shard.lock();
            app.check_not_retired()?;
            let ctx = self.ctx(app, region);
            let out = f(&mut state, &ctx, &mut txn);
            if out.is_ok() && !*self.inner.closing.borrow() {
                state.reconcile_pool(&ctx, &mut txn);
            }
            for effect in &txn.effects {
                if let Effect::Start { process_id, .. } = effect {
                    // Not retired, so the current state is still the app's.
                    self.state()
                        .process_locations
                        .insert(*process_id, (Arc::clone(app), region));
                }
            }
            (out, self.append(&mut txn))
        };
        let (txn, commit) = if matches!(commit, Some(Commit::Pending(_))) {
            let mut unfinished = Unfinished {
                scheduler: self.clone(),
                app: Arc::clone(app),
                region,
                rest: Some((txn, commit)),
            };
            if let Some((_, Some(Commit::Pending(flushed)))) = unfinished.rest.as_mut() {
                // Cancelled here (the caller went away while the store flushed), `unfinished`
                // finishes the change in a task of its own.
                let result = flushed.await;
                if let Some((_, commit)) = unfinished.rest.as_mut() {
                    *commit = Some(Commit::Done(
                        result.unwrap_or_else(|_| Err(Commit::stopped())),
                    ));
                }
            }
            unfinished.rest.take().expect("taken only here and on drop")
        } else {
            // Nothing to wait for: `finish` runs its effects before it first suspends.
            (txn, commit)
        };
        self.finish(app, region, txn, commit).await?;
        out
    }

    /// Hands the change's records to the store. A call that changed nothing still answers
    /// from what the shard shows (a safe retry, "destroyed already"), which may include
    /// changes still on their way to the disk: it waits for those (a barrier).
    fn append(&self, txn: &mut Txn) -> Option<Commit> {
        match txn.records.take() {
            Some(records) if !records.is_empty() => Some(self.inner.store.append(records)),
            Some(_) => Some(self.inner.store.barrier()),
            None => None,
        }
    }

    /// After a change: wait until it is durable, then carry out its effects (nothing after
    /// the commit awaits, so a caller going away cannot stop them half-way).
    async fn finish(
        &self,
        app: &Arc<App>,
        region: usize,
        txn: Txn,
        commit: Option<Commit>,
    ) -> Result<()> {
        if let Some(commit) = commit {
            self.committed(app, commit).await?;
        }
        // Display, not Debug: ids and region names are validated and need no escaping, and
        // these are the most frequent lines.
        let region_name = &self.inner.regions[region];
        for line in &txn.room_lines {
            let (app_id, room_id, process_id) = (&app.app_id, &line.room_id, line.process_id);
            if line.placed {
                tracing::info!(target: ROOM_LOG, %app_id, region = %region_name, %room_id, %process_id, "room placed");
            } else {
                tracing::info!(target: ROOM_LOG, %app_id, region = %region_name, %room_id, %process_id, "room destroyed");
            }
        }
        if txn.notify {
            if let Some(shard) = app.existing_shard(region) {
                if shard.changes.receiver_count() > 0 {
                    shard.changes.send_modify(|v| *v = v.wrapping_add(1));
                }
            }
        }
        for effect in txn.effects {
            self.carry_out(app, region, effect);
        }
        if !txn.destroyed.is_empty() {
            self.retain(app, region, txn.destroyed);
        }
        Ok(())
    }

    /// Waits for a commit; if the store refused it, rolls memory back to the store (waiting
    /// for that at most `ROLLBACK_WAIT`: reads wait for it too, so nobody sees the change).
    async fn committed(&self, app: &Arc<App>, commit: Commit) -> Result<()> {
        let Err(err) = commit.wait().await else {
            return Ok(());
        };
        let (this, app) = (self.clone(), Arc::clone(app));
        let rollback = tokio::spawn(async move { this.roll_back(&app).await });
        let _ = tokio::time::timeout(ROLLBACK_WAIT, rollback).await;
        Err(Error::Unavailable(format!(
            "{err}; the change was not made, retry later"
        )))
    }

    /// Runs a read (once memory is readable) and answers only when everything it may have
    /// seen is durable: a change still on its way to the disk is shown to nobody before its
    /// caller is told it succeeded, and one the store refused to nobody at all (the read is
    /// made again once memory is rolled back).
    async fn read_committed<T>(&self, read: impl Fn() -> Result<T>) -> Result<T> {
        for _ in 0..3 {
            self.readable().await?;
            let retired = Arc::clone(&self.state().retired);
            let out = read()?;
            let committed =
                self.inner.store.all_committed() || self.inner.store.barrier().wait().await.is_ok();
            if committed && !retired.load(Ordering::Acquire) {
                return Ok(out);
            }
        }
        Err(Error::Unavailable(
            "the store keeps refusing changes; state cannot be read until it is back".into(),
        ))
    }

    /// Reads wait while memory is rolled back (it may still show a change the store refused);
    /// UNAVAILABLE if the store stays unreadable.
    async fn readable(&self) -> Result<()> {
        if !self.state().retired.load(Ordering::Acquire) {
            return Ok(());
        }
        let waited = tokio::time::timeout(ROLLBACK_WAIT, self.inner.rollback.lock()).await;
        if waited.is_ok() && !self.state().retired.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(Error::Unavailable(
            "the store is unavailable; state cannot be read until it is back".into(),
        ))
    }

    /// After a failed commit: makes memory equal to what the store holds again. Changes to
    /// the current state are refused from now on; the store is reopened (back at its last
    /// commit), a fresh state is loaded from it and swapped in. `failed` is an app of the
    /// state whose change failed: if it is already retired, another call rolled back.
    async fn roll_back(&self, failed: &App) {
        let _one_at_a_time = self.inner.rollback.lock().await;
        let old = self.inner.state.load_full();
        if !Arc::ptr_eq(&old.retired, &failed.retired) {
            return;
        }
        old.retired.store(true, Ordering::Release);
        // Wait out every change that checked the flag before it was set.
        for app in old.apps.iter() {
            drop(app.deployments.write().unwrap_or_else(|e| e.into_inner()));
            for shard in app.shards.iter().filter_map(OnceLock::get) {
                drop(shard.lock());
            }
        }
        let mut delay = Duration::from_millis(100);
        loop {
            let this = self.clone();
            let reloaded = tokio::task::spawn_blocking(move || {
                this.inner
                    .store
                    .reopen()
                    .map_err(|e| Error::Unavailable(e.to_string()))?;
                this.load_state(false)
            })
            .await
            .unwrap_or_else(|e| Err(Error::Internal(format!("reloading panicked: {e}"))));
            match reloaded {
                Ok((state, effects)) => {
                    self.inner.state.store(Arc::new(state));
                    for (app, region, effect) in effects {
                        self.carry_out(&app, region, effect);
                    }
                    // Connection watchers of the old state look again.
                    for app in old.apps.iter() {
                        for shard in app.shards.iter().filter_map(OnceLock::get) {
                            shard.changes.send_modify(|v| *v = v.wrapping_add(1));
                        }
                    }
                    tracing::warn!("memory rolled back to the store's last commit");
                    return;
                }
                Err(err) => {
                    tracing::error!(%err, "cannot reload the store; changes are refused until it can");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Builds the state the store holds: apps, deployments, shards, locations and the
    /// retention queue; returns it with the effects to carry out (timers, and adoption of
    /// live processes by the backend when `adopt`).
    #[allow(clippy::type_complexity)]
    fn load_state(&self, adopt: bool) -> Result<(State, Vec<(Arc<App>, usize, Effect)>)> {
        type PerShard<T> = HashMap<(String, usize), T>;
        let regions = &self.inner.regions;
        let region_of = |name: &str, what: &str| {
            regions.iter().position(|r| r == name).ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "the store holds {what} in region {name:?}, which is not configured; add it \
                     to the regions or use another data directory"
                ))
            })
        };
        let mut deployments: BTreeMap<String, Vec<Arc<Deployment>>> = BTreeMap::new();
        let mut policies: PerShard<RegionPolicy> = HashMap::new();
        let mut processes: PerShard<Vec<ProcessRecord>> = HashMap::new();
        let mut rooms: PerShard<Vec<RoomRecord>> = HashMap::new();
        let mut created: PerShard<BTreeMap<i64, u64>> = HashMap::new();
        let mut problem: Option<Error> = None;
        let mut visit = |record: Record| -> Result<()> {
            match record {
                Record::Deployment(d) => {
                    let list = deployments.entry(d.app_id.clone()).or_default();
                    if d.deployment_id as usize != list.len() + 1 {
                        return Err(Error::Internal(format!(
                            "the store is damaged: deployment {} of app {} follows {}",
                            d.deployment_id,
                            d.app_id,
                            list.len()
                        )));
                    }
                    list.push(Arc::new(d));
                }
                Record::RegionPolicy {
                    app_id,
                    region,
                    policy,
                } => {
                    let r = region_of(&region, "a region policy")?;
                    policies.insert((app_id, r), policy);
                }
                Record::Process(p) => {
                    let r = region_of(&p.process.region, "processes")?;
                    let key = (p.process.app_id.clone(), r);
                    processes.entry(key).or_default().push(p);
                }
                Record::Room(room) => {
                    self.inner
                        .room_seq
                        .fetch_max(room.seq + 1, Ordering::Relaxed);
                    let r = region_of(&room.region, "rooms")?;
                    rooms
                        .entry((room.room.app_id.clone(), r))
                        .or_default()
                        .push(room);
                }
                Record::RoomsCreated {
                    app_id,
                    region,
                    second,
                    count,
                } => {
                    let r = region_of(&region, "usage counters")?;
                    created
                        .entry((app_id, r))
                        .or_default()
                        .insert(second, count);
                }
                Record::RoomForgotten { .. } => {}
            }
            Ok(())
        };
        self.inner
            .store
            .load(&mut |record| {
                if problem.is_none() {
                    problem = visit(record).err();
                }
            })
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        if let Some(problem) = problem {
            return Err(problem);
        }

        let state = State::default();
        for (app_id, deps) in deployments {
            let app = App::new(
                app_id.clone(),
                regions.len(),
                self.inner.default_policy,
                &state.retired,
            );
            *app.deployments.write().unwrap_or_else(|e| e.into_inner()) = deps;
            state.apps.insert(app_id, Arc::new(app));
        }
        let mut shards: Vec<(String, usize)> = policies
            .keys()
            .chain(processes.keys())
            .chain(rooms.keys())
            .chain(created.keys())
            .cloned()
            .collect();
        shards.sort();
        shards.dedup();
        let mut effects = Vec::new();
        let mut destroyed: Vec<(DateTime<Utc>, Arc<App>, usize, String)> = Vec::new();
        for (app_id, region) in shards {
            let app = self.existing_app_in(&state, &app_id).ok_or_else(|| {
                Error::Internal(format!(
                    "the store is damaged: app {app_id} has processes or rooms but no deployment"
                ))
            })?;
            let procs = processes
                .remove(&(app_id.clone(), region))
                .unwrap_or_default();
            let room_records = rooms.remove(&(app_id.clone(), region)).unwrap_or_default();
            for p in &procs {
                state
                    .process_locations
                    .insert(p.process.process_id, (Arc::clone(&app), region));
            }
            for r in &room_records {
                app.rooms.insert(r.room.room_id.clone(), region);
                if r.room.current_allocation.is_none() {
                    let at = r
                        .room
                        .allocations
                        .last()
                        .and_then(|a| a.unscheduled_at)
                        .unwrap_or_default();
                    destroyed.push((at, Arc::clone(&app), region, r.room.room_id.clone()));
                }
            }
            let ctx = self.ctx(&app, region);
            let (shard_state, shard_effects) = ShardState::restore(
                &ctx,
                policies
                    .remove(&(app_id.clone(), region))
                    .unwrap_or(self.inner.default_policy),
                |id| app.deployment(id).ok(),
                procs,
                room_records,
                created.remove(&(app_id, region)).unwrap_or_default(),
                adopt,
            );
            let shard = Arc::new(Shard {
                state: Mutex::new(shard_state),
                changes: watch::Sender::new(0),
            });
            let _ = app.shards[region].set(shard);
            effects.extend(
                shard_effects
                    .into_iter()
                    .map(|e| (Arc::clone(&app), region, e)),
            );
        }
        destroyed.sort_by_key(|d| d.0);
        *state.retention.lock().unwrap_or_else(|e| e.into_inner()) = destroyed
            .into_iter()
            .map(|(_, app, region, id)| (app, region, id))
            .collect();
        Ok((state, effects))
    }

    fn existing_app_in(&self, state: &State, app_id: &str) -> Option<Arc<App>> {
        state.apps.get(app_id).map(|a| Arc::clone(a.value()))
    }

    /// Runs the warm-pool reconciliation of every shard once.
    async fn reconcile_all_pools(&self) {
        let shards: Vec<(Arc<App>, usize)> = self
            .state()
            .apps
            .iter()
            .flat_map(|a| {
                let app = a.value();
                (0..app.shards.len())
                    .filter(|r| app.existing_shard(*r).is_some())
                    .map(|r| (Arc::clone(app), r))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (app, region) in shards {
            if let Err(err) = self.change(&app, region, |_, _, _| Ok(())).await {
                tracing::warn!(%err, app_id = app.app_id, "could not reconcile a warm pool");
            }
        }
    }

    fn carry_out(&self, app: &Arc<App>, region: usize, effect: Effect) {
        let inner = &self.inner;
        match effect {
            Effect::Adopt {
                process,
                deployment,
            } => inner.backend.adopt(AdoptSpec {
                process,
                deployment,
                events: ProcessEvents(inner.events.clone()),
            }),
            Effect::Start {
                process_id,
                deployment,
                initial_room,
            } => {
                let spec = StartSpec {
                    process_id,
                    app_id: app.app_id.clone(),
                    region: inner.regions[region].clone(),
                    deployment,
                    initial_room,
                    events: ProcessEvents(inner.events.clone()),
                };
                if let Err(err) = inner.backend.start(spec) {
                    let kind = ProcessEventKind::LaunchFailed(err.0);
                    let _ = inner.events.send(ProcessEvent { process_id, kind });
                    return;
                }
                // A stop carried out by another call before this start reached a backend
                // that did not know the process yet: stop it again now that it does.
                let status = app
                    .existing_shard(region)
                    .and_then(|s| s.lock().status(process_id));
                match status {
                    Some(ProcessStatus::Stopping) => {
                        inner.backend.stop(process_id, inner.limits.stop_grace)
                    }
                    Some(ProcessStatus::Stopped | ProcessStatus::Failed) => {
                        inner.backend.stop(process_id, Duration::ZERO)
                    }
                    _ => {}
                }
            }
            Effect::Stop { process_id, grace } => inner.backend.stop(process_id, grace),
            Effect::StartTimer {
                process_id,
                deadline,
            } => self.timer(process_id, deadline, ProcessEventKind::StartTimeout),
            Effect::IdleTimer {
                process_id,
                deadline,
            } => self.timer(process_id, deadline, ProcessEventKind::IdleCheck),
            Effect::PoolTimer {
                process_id,
                deadline,
            } => self.timer(process_id, deadline, ProcessEventKind::PoolCheck),
        }
    }

    fn timer(&self, process_id: ProcessId, deadline: tokio::time::Instant, kind: ProcessEventKind) {
        let events = self.inner.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            let _ = events.send(ProcessEvent { process_id, kind });
        });
    }

    /// Destroyed rooms enter the retention window; the oldest beyond it are forgotten, in
    /// batches of `eviction_batch` (one shard lock and one store change per shard and batch
    /// rather than per room), in the background: the caller's change is durable already and
    /// does not wait for this one.
    fn retain(&self, app: &Arc<App>, region: usize, destroyed: Vec<String>) {
        let state = self.inner.state.load_full();
        let limit = self.inner.retained_destroyed_rooms;
        let evicted: Vec<(Arc<App>, usize, String)> = {
            let mut queue = state.retention.lock().unwrap_or_else(|e| e.into_inner());
            queue.extend(
                destroyed
                    .into_iter()
                    .map(|id| (Arc::clone(app), region, id)),
            );
            if queue.len() < limit + eviction_batch(limit) {
                return;
            }
            let excess = queue.len() - limit;
            queue.drain(..excess).collect()
        };
        // Oldest first within each shard.
        let mut shards: Vec<(Arc<App>, usize, Vec<String>)> = Vec::new();
        for (app, region, room_id) in evicted {
            match shards
                .iter_mut()
                .find(|(a, r, _)| Arc::ptr_eq(a, &app) && *r == region)
            {
                Some((_, _, ids)) => ids.push(room_id),
                None => shards.push((app, region, vec![room_id])),
            }
        }
        for (app, region, room_ids) in shards {
            let commit = {
                let mut state = app.shard(region).lock();
                if app.check_not_retired().is_err() {
                    continue;
                }
                let mut txn = Txn::new(self.inner.store.wants_records());
                for room_id in room_ids {
                    let Some(seq) = state.forget_room(&room_id) else {
                        continue;
                    };
                    app.rooms.remove(&room_id);
                    if let Some(records) = txn.records.as_mut() {
                        records.push(Record::RoomForgotten {
                            app_id: app.app_id.clone(),
                            room_id,
                            seq,
                        });
                    }
                }
                match txn.records.as_ref() {
                    Some(records) if !records.is_empty() => self.append(&mut txn),
                    _ => None,
                }
            };
            match commit {
                Some(Commit::Done(Ok(()))) | None => {}
                Some(commit) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(err) = this.committed(&app, commit).await {
                            tracing::warn!(%err, "could not persist the eviction of destroyed rooms");
                        }
                    });
                }
            }
        }
    }

    async fn apply_event(&self, event: &ProcessEvent) -> Result<()> {
        let pid = event.process_id;
        let Some((app, region)) = self
            .state()
            .process_locations
            .get(&pid)
            .map(|l| (Arc::clone(&l.0), l.1))
        else {
            return Ok(()); // not ours (e.g. a report after a restart)
        };
        self.change(&app, region, |state, ctx, txn| {
            match &event.kind {
                ProcessEventKind::Bound {
                    exposed_port,
                    additional_exposed_ports,
                } => state.on_bound(
                    ctx,
                    pid,
                    exposed_port.clone(),
                    additional_exposed_ports.clone(),
                    txn,
                ),
                ProcessEventKind::Exited(status) => state.on_exit(ctx, pid, *status, txn),
                ProcessEventKind::LaunchFailed(err) => state.on_launch_failed(ctx, pid, err, txn),
                ProcessEventKind::StartTimeout => state.on_start_timeout(ctx, pid, txn),
                ProcessEventKind::IdleCheck => state.on_idle_timer(ctx, pid, txn),
                // The warm pool is reconciled after every change, this empty one included.
                ProcessEventKind::PoolCheck | ProcessEventKind::Barrier(_) => {}
            }
            Ok(())
        })
        .await
    }

    // ----- deployments -----------------------------------------------------------------

    /// Creates the app's next deployment; it becomes the latest, and live processes of older
    /// deployments of the app start draining. Creates the app if it is new.
    pub async fn create_deployment(
        &self,
        app_id: &str,
        spec: DeploymentSpec,
    ) -> Result<Deployment> {
        validate::app_id(app_id)?;
        let container_port = validate::deployment(&spec)?;
        if spec.command.is_empty() && self.inner.backend.runs_commands() {
            return Err(Error::invalid(
                "command",
                format!(
                    "the {} backend runs each process from the deployment's command: give its \
                     argv ({{port}} is replaced by the process's port)",
                    self.inner.backend.name()
                ),
            ));
        }
        self.check_open()?;
        let state = self.state();
        let app = Arc::clone(
            state
                .apps
                .entry(app_id.to_string())
                .or_insert_with(|| {
                    Arc::new(App::new(
                        app_id.to_string(),
                        self.inner.regions.len(),
                        self.inner.default_policy,
                        &state.retired,
                    ))
                })
                .value(),
        );
        drop(state);
        let (deployment, commit) = {
            let mut deps = app.deployments.write().unwrap_or_else(|e| e.into_inner());
            app.check_not_retired()?;
            let deployment = Deployment {
                app_id: app_id.to_string(),
                deployment_id: deps.len() as u32 + 1,
                rooms_per_process: spec.rooms_per_process,
                transport_type: spec.transport_type,
                container_port,
                additional_container_ports: spec.additional_container_ports,
                idle_timeout_enabled: spec.idle_timeout_enabled,
                env: spec.env,
                command: spec.command,
                placement_strategy: spec.placement_strategy,
                created_at: self.inner.clock.now(),
            };
            deps.push(Arc::new(deployment.clone()));
            let mut txn = Txn::new(self.inner.store.wants_records());
            if let Some(records) = txn.records.as_mut() {
                records.push(Record::Deployment(deployment.clone()));
            }
            (deployment, self.append(&mut txn))
        };
        if let Some(commit) = commit {
            self.committed(&app, commit).await?;
        }
        tracing::info!(
            app_id,
            deployment_id = deployment.deployment_id,
            "deployment created"
        );
        for region in 0..self.inner.regions.len() {
            // Existing shards drain their older processes; with a default warm pool every
            // region gets the new deployment's pool at once.
            if app.existing_shard(region).is_some() || self.inner.default_policy.wants_pool() {
                let latest = deployment.deployment_id;
                self.change(&app, region, |state, ctx, txn| {
                    state.drain_older(ctx, latest, txn);
                    Ok(())
                })
                .await?;
            }
        }
        Ok(deployment)
    }

    pub async fn get_deployment(&self, app_id: &str, deployment_id: u32) -> Result<Deployment> {
        self.read_committed(|| {
            let app = self.app(app_id).map_err(|e| match e {
                Error::FailedPrecondition(_) => Error::NotFound(format!(
                    "deployment {deployment_id} of app {app_id} not found"
                )),
                e => e,
            })?;
            Ok(app.deployment(deployment_id)?.as_ref().clone())
        })
        .await
    }

    pub async fn latest_deployment(&self, app_id: &str) -> Result<Deployment> {
        self.read_committed(|| {
            let app = self.app(app_id).map_err(not_found_if_no_app)?;
            Ok(app.latest().map_err(not_found_if_no_app)?.as_ref().clone())
        })
        .await
    }

    /// Newest first.
    pub async fn list_deployments(&self, app_id: &str) -> Result<Vec<Deployment>> {
        self.read_committed(|| {
            validate::app_id(app_id)?;
            let Some(app) = self.existing_app(app_id) else {
                return Ok(vec![]);
            };
            let deps = app.deployments.read().unwrap_or_else(|e| e.into_inner());
            Ok(deps.iter().rev().map(|d| d.as_ref().clone()).collect())
        })
        .await
    }

    // ----- rooms -----------------------------------------------------------------------

    /// Places a room (SPEC §5). With the `room_id` of a live room and the same region and
    /// config, returns the existing placement (a safe retry).
    pub async fn create_room(&self, req: CreateRoom) -> Result<RoomPlacement> {
        validate::app_id(&req.app_id)?;
        let region = validate::region(&self.inner.regions, &req.region)?;
        validate::room_config(&req.room_config)?;
        let requested_id = req.room_id.filter(|id| !id.is_empty());
        if let Some(id) = &requested_id {
            validate::room_id(id)?;
        }
        let requested_deployment = req.deployment_id.filter(|d| *d != 0);
        self.check_open()?;
        let app = self.app(&req.app_id)?;
        let config = req.room_config;
        let app2 = Arc::clone(&app);
        self.change(&app, region, move |state, ctx, txn| {
            // The target deployment as read under the shard lock (`ctx.latest`): a deployment
            // created meanwhile drains this shard only after we release it, so nothing placed
            // here escapes.
            let dep = match requested_deployment {
                Some(id) => app2.deployment(id)?,
                None => ctx
                    .latest
                    .clone()
                    .ok_or_else(|| no_deployment(&app2.app_id))?,
            };
            loop {
                let room_id = requested_id.clone().unwrap_or_else(generate_room_id);
                match app2.rooms.entry(room_id) {
                    Entry::Occupied(existing) => {
                        let Some(id) = &requested_id else { continue }; // generated id collided
                        if *existing.get() != region {
                            return Err(Error::AlreadyExists(format!(
                                "room {id:?} already exists in region {}",
                                self.inner.regions[*existing.get()]
                            )));
                        }
                        match state.room_config_matches(id, &config) {
                            Some((false, true)) => return state.placement(id),
                            Some((true, _)) => {
                                return Err(Error::AlreadyExists(format!(
                                    "room {id:?} was already used and destroyed"
                                )))
                            }
                            Some((false, false)) => {
                                return Err(Error::AlreadyExists(format!(
                                    "room {id:?} already exists with a different room_config"
                                )))
                            }
                            None => {
                                return Err(Error::Internal(format!(
                                    "room {id:?} is indexed but missing"
                                )))
                            }
                        }
                    }
                    Entry::Vacant(slot) => {
                        let pinned = requested_deployment.is_some();
                        let pid = state.create_room(ctx, &dep, slot.key(), config, pinned, txn)?;
                        let id = slot.key().clone();
                        slot.insert(region);
                        txn.room_line(true, &id, pid);
                        ctx.observer.room_placed(ctx.app_id, ctx.region);
                        return state.placement(&id);
                    }
                }
            }
        })
        .await
    }

    /// A room, live or destroyed (destroyed rooms are kept for a bounded retention).
    pub async fn get_room(&self, app_id: &str, room_id: &str) -> Result<Room> {
        self.read_committed(|| {
            let (app, region) = self.locate_room(app_id, room_id)?;
            self.read(&app, region, |s| s.room(&app.app_id, room_id))
                .ok_or_else(|| room_not_found(room_id))
        })
        .await
    }

    /// Destroys a live room and frees its slot; NOT_FOUND if unknown or already destroyed.
    pub async fn destroy_room(&self, app_id: &str, room_id: &str) -> Result<()> {
        let (app, region) = self.locate_room(app_id, room_id)?;
        self.check_open()?;
        self.change(&app, region, |state, ctx, txn| {
            state.destroy_room(ctx, room_id, txn)
        })
        .await
    }

    pub async fn update_room_config(
        &self,
        app_id: &str,
        room_id: &str,
        room_config: String,
    ) -> Result<Room> {
        validate::room_config(&room_config)?;
        let (app, region) = self.locate_room(app_id, room_id)?;
        self.check_open()?;
        self.change(&app, region, |state, ctx, txn| {
            state.update_room_config(ctx, room_id, room_config, txn)
        })
        .await
    }

    /// Where players of a live room connect; STARTING until its process is RUNNING.
    pub async fn connection_info(&self, app_id: &str, room_id: &str) -> Result<ConnectionInfo> {
        self.read_committed(|| {
            let (app, region) = self.locate_room(app_id, room_id)?;
            self.read(&app, region, |s| s.connection_info(room_id))
        })
        .await
    }

    /// Follows a room's connection info: the current value, then every change, ending when
    /// the room is ACTIVE or destroyed (or the scheduler shuts down).
    pub async fn watch_connection_info(
        &self,
        app_id: &str,
        room_id: &str,
    ) -> Result<ConnectionWatch> {
        self.readable().await?;
        let (app, region) = self.locate_room(app_id, room_id)?;
        let changes = app.shard(region).changes.subscribe();
        self.read(&app, region, |s| s.connection_info(room_id))?;
        Ok(ConnectionWatch {
            scheduler: self.clone(),
            app,
            region,
            room_id: room_id.to_string(),
            changes,
            closing: self.inner.closing.subscribe(),
            last: None,
            done: false,
        })
    }

    /// The rooms now on a process, in the order they were placed (ties: by room id).
    pub async fn list_active_rooms(
        &self,
        app_id: &str,
        process_id: ProcessId,
    ) -> Result<Vec<Room>> {
        self.read_committed(|| {
            let (app, region) = self.locate_process(app_id, process_id)?;
            self.read(&app, region, |s| s.active_rooms(&app.app_id, process_id))
                .ok_or_else(|| process_not_found(process_id))
        })
        .await
    }

    /// Rooms that were on a process and left (within the retention window), in the order they
    /// left (ties: by room id).
    pub async fn list_inactive_rooms(
        &self,
        app_id: &str,
        process_id: ProcessId,
    ) -> Result<Vec<Room>> {
        self.read_committed(|| {
            let (app, region) = self.locate_process(app_id, process_id)?;
            self.read(&app, region, |s| s.inactive_rooms(&app.app_id, process_id))
                .ok_or_else(|| process_not_found(process_id))
        })
        .await
    }

    // ----- processes -------------------------------------------------------------------

    /// Starts an empty process of the latest deployment (a request for an older one is
    /// FAILED_PRECONDITION: it would only drain).
    pub async fn create_process(
        &self,
        app_id: &str,
        region: &str,
        deployment_id: Option<u32>,
    ) -> Result<Process> {
        validate::app_id(app_id)?;
        let region = validate::region(&self.inner.regions, region)?;
        self.check_open()?;
        let app = self.app(app_id)?;
        let requested = deployment_id.filter(|d| *d != 0);
        app.target_deployment(requested)?;
        let app2 = Arc::clone(&app);
        self.change(&app, region, move |state, ctx, txn| {
            let dep = app2.target_deployment(requested)?;
            if let Some(latest) = ctx
                .latest
                .as_ref()
                .filter(|l| l.deployment_id > dep.deployment_id)
            {
                return Err(Error::FailedPrecondition(format!(
                    "deployment {} of app {} is superseded by deployment {}: only the latest \
                     deployment can be pre-warmed",
                    dep.deployment_id, ctx.app_id, latest.deployment_id
                )));
            }
            let pid = state.new_process(ctx, &dep, None, txn)?;
            state
                .process(pid)
                .ok_or_else(|| Error::Internal("new process missing".into()))
        })
        .await
    }

    pub async fn get_process(&self, app_id: &str, process_id: ProcessId) -> Result<Process> {
        self.read_committed(|| {
            let (app, region) = self.locate_process(app_id, process_id)?;
            self.read(&app, region, |s| s.process(process_id))
                .ok_or_else(|| process_not_found(process_id))
        })
        .await
    }

    fn filtered_regions(&self, filter: &ProcessFilter) -> Result<Vec<usize>> {
        if filter.regions.is_empty() {
            return Ok((0..self.inner.regions.len()).collect());
        }
        let mut regions = filter
            .regions
            .iter()
            .map(|r| validate::region(&self.inner.regions, r))
            .collect::<Result<Vec<_>>>()?;
        // A region named twice is still one region.
        regions.sort_unstable();
        regions.dedup();
        Ok(regions)
    }

    /// A page of the app's processes, newest `created_at` first (ties: process id).
    pub async fn list_processes(
        &self,
        filter: &ProcessFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<ProcessPage> {
        self.read_committed(|| {
            validate::app_id(&filter.app_id)?;
            let regions = self.filtered_regions(filter)?;
            let after = page_token
                .filter(|t| !t.is_empty())
                .map(PageToken::parse)
                .transpose()?;
            let page_size = match page_size {
                0 => DEFAULT_PAGE_SIZE,
                n => n.min(MAX_PAGE_SIZE),
            };
            let Some(app) = self.existing_app(&filter.app_id) else {
                return Ok(ProcessPage {
                    processes: vec![],
                    next_page_token: None,
                });
            };
            let mut all: Vec<Process> = Vec::new();
            for region in regions {
                if let Some(shard) = app.existing_shard(region) {
                    let state = shard.lock();
                    all.extend(state.processes().filter(|p| {
                        filter.statuses.is_empty() || filter.statuses.contains(&p.status)
                    }));
                }
            }
            all.sort_by(|a, b| PageToken::of(a).cmp(&PageToken::of(b)));
            let start = after.map_or(0, |t| all.partition_point(|p| PageToken::of(p) <= t));
            let mut processes: Vec<Process> = all.into_iter().skip(start).collect();
            let next_page_token = (processes.len() > page_size).then(|| {
                processes.truncate(page_size);
                PageToken::of(&processes[page_size - 1]).encode()
            });
            Ok(ProcessPage {
                processes,
                next_page_token,
            })
        })
        .await
    }

    pub async fn count_processes(&self, filter: &ProcessFilter) -> Result<u64> {
        self.read_committed(|| {
            validate::app_id(&filter.app_id)?;
            let regions = self.filtered_regions(filter)?;
            let Some(app) = self.existing_app(&filter.app_id) else {
                return Ok(0);
            };
            let mut count = 0;
            for region in regions {
                if let Some(shard) = app.existing_shard(region) {
                    count += shard.lock().count_processes(&filter.statuses) as u64;
                }
            }
            Ok(count)
        })
        .await
    }

    /// No new rooms on the process; it stops when its last room ends.
    pub async fn drain_process(&self, app_id: &str, process_id: ProcessId) -> Result<Process> {
        let (app, region) = self.locate_process(app_id, process_id)?;
        self.check_open()?;
        self.change(&app, region, |state, ctx, txn| {
            state.drain(ctx, process_id, txn)
        })
        .await
    }

    /// Destroys the process's rooms and stops it now; harmless if it is already stopping.
    pub async fn stop_process(&self, app_id: &str, process_id: ProcessId) -> Result<Process> {
        let (app, region) = self.locate_process(app_id, process_id)?;
        self.check_open()?;
        self.change(&app, region, |state, ctx, txn| {
            state.stop(ctx, process_id, "stopped by request", txn);
            state
                .process(process_id)
                .ok_or_else(|| process_not_found(process_id))
        })
        .await
    }
}

impl Scheduler {
    // ----- capacity --------------------------------------------------------------------

    /// Sets the capacity policy of one app in one region; it takes effect at once (a larger
    /// minimum or buffer starts processes before this returns).
    pub async fn set_region_policy(
        &self,
        app_id: &str,
        region: &str,
        policy: RegionPolicy,
    ) -> Result<RegionPolicy> {
        validate::app_id(app_id)?;
        let region = validate::region(&self.inner.regions, region)?;
        validate::region_policy(&policy)?;
        self.check_open()?;
        let app = self.app(app_id)?;
        let app_id = app.app_id.clone();
        let region_name = self.inner.regions[region].clone();
        self.change(&app, region, move |state, _ctx, txn| {
            state.policy = policy;
            if let Some(records) = txn.records.as_mut() {
                records.push(Record::RegionPolicy {
                    app_id,
                    region: region_name,
                    policy,
                });
            }
            Ok(policy)
        })
        .await
    }

    /// The policy of one app in one region (the server's default until set).
    pub async fn get_region_policy(&self, app_id: &str, region: &str) -> Result<RegionPolicy> {
        self.read_committed(|| {
            validate::app_id(app_id)?;
            let region = validate::region(&self.inner.regions, region)?;
            let app = self.existing_app(app_id);
            Ok(match app.as_ref().and_then(|a| a.existing_shard(region)) {
                Some(shard) => shard.lock().policy,
                None => self.inner.default_policy,
            })
        })
        .await
    }

    /// What each region (all when `regions` is empty) cost in `[start, end)`; `end` defaults
    /// to now and `start` to the beginning of time.
    pub async fn usage(
        &self,
        app_id: &str,
        regions: &[String],
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
    ) -> Result<Vec<RegionUsage>> {
        self.read_committed(|| {
            let filter = ProcessFilter {
                app_id: app_id.to_string(),
                statuses: vec![],
                regions: regions.to_vec(),
            };
            validate::app_id(app_id)?;
            let regions = self.filtered_regions(&filter)?;
            let now = self.inner.clock.now();
            let start = start.unwrap_or(DateTime::<Utc>::MIN_UTC);
            let end = end.unwrap_or(now);
            if start >= end {
                return Err(Error::invalid(
                    "start",
                    format!("{start} is not before end ({end})"),
                ));
            }
            let app = self.existing_app(app_id);
            Ok(regions
                .into_iter()
                .map(|region| {
                    let name = &self.inner.regions[region];
                    match app.as_ref().and_then(|a| a.existing_shard(region)) {
                        Some(shard) => shard.lock().usage(name, start, end, now),
                        None => RegionUsage {
                            region: name.clone(),
                            billed_process_seconds: 0.0,
                            rooms_created: 0,
                            peak_processes: 0,
                        },
                    }
                })
                .collect())
        })
        .await
    }
}

fn not_found_if_no_app(e: Error) -> Error {
    match e {
        Error::FailedPrecondition(m) => Error::NotFound(m),
        e => e,
    }
}

/// Position in the newest-first order of `list_processes`: (−created_at, process id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PageToken(i64, ProcessId);

impl PageToken {
    fn of(p: &Process) -> Self {
        PageToken(
            -p.created_at.timestamp_nanos_opt().unwrap_or(i64::MAX),
            p.process_id,
        )
    }

    fn encode(&self) -> String {
        format!("{}.{}", self.0, self.1.simple())
    }

    fn parse(s: &str) -> Result<Self> {
        let bad = || Error::invalid("page_token", "not a token returned by ListProcesses");
        let (t, id) = s.split_once('.').ok_or_else(bad)?;
        Ok(PageToken(
            t.parse().map_err(|_| bad())?,
            ProcessId::parse_str(id).map_err(|_| bad())?,
        ))
    }
}

/// A stream of a room's connection info; see [`Scheduler::watch_connection_info`].
pub struct ConnectionWatch {
    scheduler: Scheduler,
    app: Arc<App>,
    region: usize,
    room_id: String,
    changes: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
    last: Option<ConnectionInfo>,
    done: bool,
}

impl ConnectionWatch {
    /// The next distinct value; `None` once the room is ACTIVE (after sending that value),
    /// destroyed, or the scheduler shuts down.
    pub async fn next(&mut self) -> Option<ConnectionInfo> {
        while !self.done {
            if self.app.retired.load(Ordering::Acquire) {
                // Memory was rolled back: follow the room in the new state.
                if self.scheduler.readable().await.is_err() {
                    self.done = true;
                    return None;
                }
                match self.scheduler.locate_room(&self.app.app_id, &self.room_id) {
                    Ok((app, region)) => {
                        self.changes = app.shard(region).changes.subscribe();
                        (self.app, self.region) = (app, region);
                    }
                    Err(_) => {
                        self.done = true;
                        return None;
                    }
                }
            }
            self.changes.borrow_and_update();
            let current = self
                .scheduler
                .read(&self.app, self.region, |s| s.connection_info(&self.room_id))
                .ok();
            let Some(info) = current else {
                self.done = true;
                return None;
            };
            if self.last.as_ref() != Some(&info) {
                self.done = info.status == ConnectionStatus::Active;
                self.last = Some(info.clone());
                return Some(info);
            }
            tokio::select! {
                changed = self.changes.changed() => if changed.is_err() { self.done = true },
                _ = self.closing.wait_for(|closing| *closing) => self.done = true,
            }
        }
        None
    }
}
