//! One (app, region) shard: its processes, its rooms, its placement index and its lock.
//!
//! Everything that must be atomic — pick a process and take its slot, destroy a room and free
//! its slot, move a process along its lifecycle and deal with its rooms — is one method of
//! [`ShardState`], run while the shard's mutex is held. Methods are synchronous and do no I/O:
//! they record what the outside world must do (start or stop a process, arm a timer, persist
//! records) in a [`Txn`] that the scheduler carries out after the lock is released.
//!
//! Invariants, true whenever the lock is free:
//! - a process's `rooms` holds exactly the live rooms whose current allocation is on it, so
//!   `rooms_allocated = rooms.len() ≤ rooms_per_process`;
//! - the placement index holds exactly the processes that may take a room (RUNNING, or
//!   STARTING without a drain request) and have a free slot, keyed by their current ranking;
//! - `live_processes` counts the STARTING, RUNNING and DRAINING processes;
//! - a status only moves forward ([`ProcessStatus`] is ordered by the lifecycle).

use super::error::{Error, Result};
use super::types::{
    ConnectionInfo, ConnectionStatus, Deployment, ExposedPort, PlacementStrategy, Process,
    ProcessId, ProcessStatus, RegionPolicy, RegionUsage, Room, RoomAllocation, RoomPlacement,
    RoomStatus,
};
use super::ROOM_LOG;
use crate::backend::ExitStatus;
use crate::store::{ProcessRecord, Record, RoomRecord};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Hash maps keyed by ids: foldhash is several times faster than SipHash on short keys and
/// seeds itself per process, which is enough against crafted room ids.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// How many times a room is placed before a failing start destroys it (SPEC §4).
pub(crate) const MAX_PLACEMENT_ATTEMPTS: u8 = 3;

/// Server-wide settings the shard's rules depend on.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) idle_timeout: Duration,
    pub(crate) stop_grace: Duration,
    pub(crate) start_timeout: Duration,
}

/// The inputs of one locked operation: who we are, what time it is, what the rules are.
pub(crate) struct Ctx<'a> {
    pub(crate) app_id: &'a str,
    pub(crate) region: &'a str,
    pub(crate) now: DateTime<Utc>,
    pub(crate) instant: Instant,
    pub(crate) limits: &'a Limits,
    /// Only to name a new process's log file.
    pub(crate) backend: &'a dyn crate::backend::Backend,
    /// The app's latest deployment (read under the shard lock, so a deployment created
    /// meanwhile drains this shard only after the operation).
    pub(crate) latest: Option<Arc<Deployment>>,
    /// Numbers rooms in the order they are created, server-wide (the store's key of a room).
    pub(crate) room_seq: &'a AtomicU64,
    pub(crate) observer: &'a dyn super::Observer,
}

/// After a pool process failed to start, the warm pool waits this long before starting
/// another, so a deployment that cannot start does not spin.
pub(crate) const POOL_RETRY_DELAY: Duration = Duration::from_secs(5);

/// This many crashes of a region's processes within the window is a crash loop: the warm pool
/// pauses (`POOL_RETRY_DELAY`) instead of replacing them at once.
pub(crate) const CRASH_LOOP_CRASHES: usize = 3;
pub(crate) const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(30);

/// Something to do once the shard lock is released.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Ask the backend to start this process.
    Start {
        process_id: ProcessId,
        deployment: Arc<Deployment>,
        initial_room: Option<(String, String)>,
    },
    /// Ask the backend to take back a process started before a restart of the scheduler.
    Adopt {
        process: Process,
        deployment: Arc<Deployment>,
    },
    /// Ask the backend to stop this process after `grace` (zero = kill now).
    Stop {
        process_id: ProcessId,
        grace: Duration,
    },
    /// Fail this process if it is still STARTING at `deadline`.
    StartTimer {
        process_id: ProcessId,
        deadline: Instant,
    },
    /// Check this process for idleness at `deadline`.
    IdleTimer {
        process_id: ProcessId,
        deadline: Instant,
    },
    /// Reconcile the warm pool of this process's shard at `deadline`.
    PoolTimer {
        process_id: ProcessId,
        deadline: Instant,
    },
}

/// What one locked operation changed, for the scheduler to persist and act on.
#[derive(Debug, Default)]
pub(crate) struct Txn {
    /// `None` when the store wants no records.
    pub(crate) records: Option<Vec<Record>>,
    pub(crate) effects: Vec<Effect>,
    /// Rooms destroyed by this operation (they enter the retention window).
    pub(crate) destroyed: Vec<String>,
    /// Something a connection-info watcher may care about changed.
    pub(crate) notify: bool,
    /// Room lines to log once the change is durable (empty when they are filtered out):
    /// formatting them under the shard lock would hold up the region's other calls, and a
    /// change the store refuses is not logged as made.
    pub(crate) room_lines: Vec<RoomLine>,
}

/// A room placed or destroyed, for the `roomsched::rooms` log.
#[derive(Debug)]
pub(crate) struct RoomLine {
    pub(crate) placed: bool,
    pub(crate) room_id: String,
    pub(crate) process_id: ProcessId,
}

impl Txn {
    pub(crate) fn new(wants_records: bool) -> Self {
        Txn {
            records: wants_records.then(Vec::new),
            ..Default::default()
        }
    }

    /// Queues a room line, if room lines are logged at all.
    pub(crate) fn room_line(&mut self, placed: bool, room_id: &str, process_id: ProcessId) {
        if tracing::enabled!(target: ROOM_LOG, tracing::Level::INFO) {
            self.room_lines.push(RoomLine {
                placed,
                room_id: room_id.to_string(),
                process_id,
            });
        }
    }
}

/// A process's place in its tier: its rank (free slots, ordered by the deployment's
/// strategy), then its order within the rank: the time (seconds, nanoseconds), then the process
/// id as a number (the same order as `ProcessId`'s).
type Rank = (u32, Order);
type Order = (i64, u32, u128);

fn rank_key(rank: u32, at: DateTime<Utc>, id: ProcessId) -> Rank {
    (
        rank,
        (at.timestamp(), at.timestamp_subsec_nanos(), id.as_u128()),
    )
}

/// The processes of one placement tier, grouped by rank, each group in order. Taking or
/// freeing a slot moves a process to the neighbouring rank: one removal from its group and one
/// insertion into the other, where a single ordered set of all keys would remove and insert in
/// the whole tier (that was the largest single part of a placement's cost; BENCHMARKS.md).
#[derive(Debug, Default)]
struct Tier {
    /// Never holds an empty group, so the first group holds the best process.
    by_rank: BTreeMap<u32, BTreeSet<Order>>,
}

impl Tier {
    fn insert(&mut self, (rank, order): Rank) {
        self.by_rank.entry(rank).or_default().insert(order);
    }

    fn remove(&mut self, (rank, order): &Rank) {
        let Some(group) = self.by_rank.get_mut(rank) else {
            return;
        };
        group.remove(order);
        if group.is_empty() {
            self.by_rank.remove(rank);
        }
    }

    /// The best process: the first of the best rank.
    fn first(&self) -> Option<ProcessId> {
        let (_, group) = self.by_rank.first_key_value()?;
        group.first().map(|o| ProcessId::from_u128(o.2))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_rank.values().map(BTreeSet::len).sum()
    }
}

/// Which placement tier a process is in, and its rank within the tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexKey {
    running: bool,
    key: Rank,
}

/// Processes of one deployment that can take a room, best first, and what they add up to.
#[derive(Debug, Default)]
struct DeploymentIndex {
    running: Tier,
    starting: Tier,
    /// RUNNING processes and STARTING ones without a drain request (full ones included).
    available_processes: u32,
    /// Free slots on those processes.
    free_slots: u64,
}

#[derive(Debug)]
pub(crate) struct ProcessEntry {
    process: Process,
    deployment: Arc<Deployment>,
    /// Live rooms, in the order they were placed.
    rooms: Vec<String>,
    /// Rooms that were on this process and left, oldest first (pruned on eviction).
    past_rooms: VecDeque<String>,
    /// DrainProcess while STARTING: no new rooms; drain once bound.
    drain_requested: bool,
    /// Why it was told to stop; becomes `summary_exit_reason` once it has exited.
    stop_reason: Option<String>,
    /// When it last became RUNNING with no room (None while it holds rooms), on the timer
    /// clock and on the wall clock (persisted, so the idle clock survives a restart).
    idle_since: Option<(Instant, DateTime<Utc>)>,
    idle_timer_armed: bool,
}

impl ProcessEntry {
    fn free_slots(&self) -> u32 {
        self.process.rooms_per_process - self.rooms.len() as u32
    }

    fn snapshot(&self) -> Process {
        let mut p = self.process.clone();
        p.rooms_allocated = self.rooms.len() as u32;
        p
    }

    /// RUNNING, or STARTING without a drain request: counts toward the warm pool.
    fn available(&self) -> bool {
        match self.process.status {
            ProcessStatus::Running => true,
            ProcessStatus::Starting => !self.drain_requested,
            _ => false,
        }
    }

    /// (processes, free slots) this process adds to its deployment's pool.
    fn pool_share(&self) -> (u32, u64) {
        if self.available() {
            (1, u64::from(self.free_slots()))
        } else {
            (0, 0)
        }
    }

    fn index_key(&self) -> Option<IndexKey> {
        let free = self.free_slots();
        if free == 0 {
            return None;
        }
        let rank = match self.deployment.placement_strategy {
            PlacementStrategy::MostFree => u32::MAX - free,
            PlacementStrategy::FewestFree => free,
        };
        let id = self.process.process_id;
        match self.process.status {
            ProcessStatus::Running => Some(IndexKey {
                running: true,
                key: rank_key(
                    rank,
                    self.process.started_at.unwrap_or(self.process.created_at),
                    id,
                ),
            }),
            ProcessStatus::Starting if !self.drain_requested => Some(IndexKey {
                running: false,
                key: rank_key(rank, self.process.created_at, id),
            }),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct RoomEntry {
    /// The room's number in creation order (`Ctx::room_seq`).
    seq: u64,
    room_config: String,
    /// Oldest first; the last one is current unless the room is destroyed.
    allocations: Vec<RoomAllocation>,
    destroyed: bool,
    /// How many times the room has been placed.
    attempts: u8,
    /// Created for an explicitly requested deployment (kept when placed again); otherwise
    /// the room follows the latest deployment.
    pinned: bool,
}

impl RoomEntry {
    fn current_process(&self) -> Option<ProcessId> {
        if self.destroyed {
            return None;
        }
        self.allocations.last().map(|a| a.process_id)
    }
}

/// The state of one (app, region).
#[derive(Debug, Default)]
pub(crate) struct ShardState {
    processes: FastMap<ProcessId, ProcessEntry>,
    rooms: FastMap<String, RoomEntry>,
    index: FastMap<u32, DeploymentIndex>,
    live_processes: u32,
    pub(crate) policy: RegionPolicy,
    /// The warm pool starts no process of this deployment before this instant (set after one
    /// failed to start, or several crashed in a row).
    pool_paused: Option<(u32, Instant)>,
    /// When processes of the region last crashed (exited non-zero while RUNNING or
    /// DRAINING), within `CRASH_LOOP_WINDOW`.
    recent_crashes: VecDeque<Instant>,
    /// Rooms created per unix second, for usage reports.
    rooms_created: BTreeMap<i64, u64>,
}

impl ShardState {
    pub(crate) fn new(policy: RegionPolicy) -> Self {
        ShardState {
            policy,
            ..Default::default()
        }
    }

    /// Rebuilds a shard from persisted records (see [`crate::store::Store::load`]), with its
    /// placement index, counts and idle clocks, as they were at the last commit. Returns the
    /// timers to arm with the time they had left and, when `adopt` (at start, not after a
    /// rollback), asks the backend to take back every live process and to stop again the
    /// ones that were stopping.
    pub(crate) fn restore(
        ctx: &Ctx<'_>,
        policy: RegionPolicy,
        deployment: impl Fn(u32) -> Option<Arc<Deployment>>,
        processes: Vec<ProcessRecord>,
        rooms: Vec<RoomRecord>,
        rooms_created: BTreeMap<i64, u64>,
        adopt: bool,
    ) -> (ShardState, Vec<Effect>) {
        let mut state = ShardState::new(policy);
        state.rooms_created = rooms_created;
        // How long ago `at` was, on the timer clock (never before the timer clock's origin).
        let back_to = |at: DateTime<Utc>, cap: Duration| {
            let ago = (ctx.now - at).to_std().unwrap_or_default().min(cap);
            ctx.instant.checked_sub(ago).unwrap_or(ctx.instant)
        };
        for r in processes {
            let id = r.process.process_id;
            let Some(dep) = deployment(r.process.deployment_id) else {
                tracing::error!(process_id = %id, deployment_id = r.process.deployment_id, "stored process of an unknown deployment skipped");
                continue;
            };
            let idle_since = r
                .idle_since
                .map(|at| (back_to(at, ctx.limits.idle_timeout), at));
            let mut process = r.process;
            process.rooms_allocated = 0;
            state.processes.insert(
                id,
                ProcessEntry {
                    process,
                    deployment: dep,
                    rooms: vec![],
                    past_rooms: VecDeque::new(),
                    drain_requested: r.drain_requested,
                    stop_reason: r.stop_reason,
                    idle_since,
                    idle_timer_armed: false,
                },
            );
        }
        // Live rooms onto their processes in the order they were placed; earlier placements
        // into the processes' past rooms in the order they ended.
        let mut live: Vec<(DateTime<Utc>, u64, ProcessId, String)> = Vec::new();
        let mut past: Vec<(DateTime<Utc>, u64, ProcessId, String)> = Vec::new();
        for r in rooms {
            let room = r.room;
            let destroyed = room.current_allocation.is_none();
            for (i, a) in room.allocations.iter().enumerate() {
                let current = !destroyed && i + 1 == room.allocations.len();
                if current {
                    live.push((a.scheduled_at, r.seq, a.process_id, room.room_id.clone()));
                } else {
                    let ended = a.unscheduled_at.unwrap_or(a.scheduled_at);
                    past.push((ended, r.seq, a.process_id, room.room_id.clone()));
                }
            }
            state.rooms.insert(
                room.room_id,
                RoomEntry {
                    seq: r.seq,
                    room_config: room.room_config,
                    allocations: room.allocations,
                    destroyed,
                    attempts: r.attempts,
                    pinned: r.pinned,
                },
            );
        }
        live.sort();
        past.sort();
        for (_, _, pid, room_id) in live {
            match state.processes.get_mut(&pid) {
                Some(e) if e.process.status.is_live() && e.free_slots() > 0 => {
                    e.rooms.push(room_id)
                }
                _ => {
                    // Records are written atomically per change, so this means a damaged
                    // store: keep the room visible, destroyed, rather than over-fill a process.
                    tracing::error!(room_id, process_id = %pid, "stored room on a process that cannot hold it: marked destroyed");
                    if let Some(r) = state.rooms.get_mut(&room_id) {
                        r.destroyed = true;
                    }
                }
            }
        }
        for (_, _, pid, room_id) in past {
            if let Some(e) = state.processes.get_mut(&pid) {
                e.past_rooms.push_back(room_id);
            }
        }
        let mut effects = Vec::new();
        let mut later = Vec::new();
        for e in state.processes.values_mut() {
            let pid = e.process.process_id;
            e.process.rooms_allocated = e.rooms.len() as u32;
            let idx = state.index.entry(e.process.deployment_id).or_default();
            if let Some(k) = e.index_key() {
                if k.running {
                    idx.running.insert(k.key);
                } else {
                    idx.starting.insert(k.key);
                }
            }
            let share = e.pool_share();
            idx.available_processes += share.0;
            idx.free_slots += share.1;
            let stopping = e.process.status == ProcessStatus::Stopping;
            if !e.process.status.is_live() && !stopping {
                continue;
            }
            if !stopping {
                state.live_processes += 1;
            }
            if adopt {
                effects.push(Effect::Adopt {
                    process: e.process.clone(),
                    deployment: Arc::clone(&e.deployment),
                });
            }
            match e.process.status {
                ProcessStatus::Starting => later.push(Effect::StartTimer {
                    process_id: pid,
                    deadline: back_to(e.process.created_at, ctx.limits.start_timeout)
                        + ctx.limits.start_timeout,
                }),
                ProcessStatus::Running
                    if e.rooms.is_empty() && e.deployment.idle_timeout_enabled =>
                {
                    let since = *e.idle_since.get_or_insert((ctx.instant, ctx.now));
                    e.idle_timer_armed = true;
                    later.push(Effect::IdleTimer {
                        process_id: pid,
                        deadline: since.0 + ctx.limits.idle_timeout,
                    });
                }
                ProcessStatus::Stopping if adopt => later.push(Effect::Stop {
                    process_id: pid,
                    grace: ctx.limits.stop_grace,
                }),
                _ => {}
            }
        }
        effects.extend(later);
        (state, effects)
    }

    // ----- reads -------------------------------------------------------------------------

    pub(crate) fn process(&self, id: ProcessId) -> Option<Process> {
        self.processes.get(&id).map(ProcessEntry::snapshot)
    }

    pub(crate) fn live_process_ids(&self) -> Vec<ProcessId> {
        self.processes
            .values()
            .filter(|e| e.process.status.is_live())
            .map(|e| e.process.process_id)
            .collect()
    }

    pub(crate) fn status(&self, id: ProcessId) -> Option<ProcessStatus> {
        self.processes.get(&id).map(|e| e.process.status)
    }

    pub(crate) fn processes(&self) -> impl Iterator<Item = Process> + '_ {
        self.processes.values().map(ProcessEntry::snapshot)
    }

    /// Processes per status (in the order of `ProcessStatus::ALL`) and live rooms.
    pub(crate) fn census(&self) -> ([(ProcessStatus, u32); 6], u64) {
        let mut counts = ProcessStatus::ALL.map(|s| (s, 0));
        let mut rooms = 0;
        for e in self.processes.values() {
            if let Some(c) = counts.iter_mut().find(|c| c.0 == e.process.status) {
                c.1 += 1;
            }
            rooms += e.rooms.len() as u64;
        }
        (counts, rooms)
    }

    pub(crate) fn count_processes(&self, statuses: &[ProcessStatus]) -> usize {
        self.processes
            .values()
            .filter(|e| statuses.is_empty() || statuses.contains(&e.process.status))
            .count()
    }

    pub(crate) fn room(&self, app_id: &str, room_id: &str) -> Option<Room> {
        let entry = self.rooms.get(room_id)?;
        Some(self.room_snapshot(app_id, room_id, entry))
    }

    /// A live room (not destroyed) or NOT_FOUND.
    fn live_room(&self, room_id: &str) -> Result<&RoomEntry> {
        match self.rooms.get(room_id) {
            Some(r) if !r.destroyed => Ok(r),
            Some(_) => Err(Error::NotFound(format!("room {room_id:?} was destroyed"))),
            None => Err(Error::NotFound(format!("room {room_id:?} not found"))),
        }
    }

    fn room_status(&self, entry: &RoomEntry) -> RoomStatus {
        match entry.current_process().and_then(|p| self.processes.get(&p)) {
            Some(p) if p.process.status == ProcessStatus::Starting => RoomStatus::Scheduling,
            Some(_) => RoomStatus::Active,
            None => RoomStatus::Destroyed,
        }
    }

    fn room_snapshot(&self, app_id: &str, room_id: &str, entry: &RoomEntry) -> Room {
        Room {
            app_id: app_id.to_string(),
            room_id: room_id.to_string(),
            room_config: entry.room_config.clone(),
            status: self.room_status(entry),
            current_allocation: if entry.destroyed {
                None
            } else {
                entry.allocations.last().cloned()
            },
            allocations: entry.allocations.clone(),
        }
    }

    /// A live room and the process it is on.
    fn live_room_on(&self, room_id: &str) -> Result<(&RoomEntry, ProcessId, &Process)> {
        let entry = self.live_room(room_id)?;
        let pid = entry
            .current_process()
            .ok_or_else(|| Error::Internal("live room without process".into()))?;
        Ok((entry, pid, &self.processes[&pid].process))
    }

    pub(crate) fn connection_info(&self, room_id: &str) -> Result<ConnectionInfo> {
        let (_, pid, p) = self.live_room_on(room_id)?;
        let active = p.status != ProcessStatus::Starting;
        Ok(ConnectionInfo {
            room_id: room_id.to_string(),
            process_id: pid,
            status: if active {
                ConnectionStatus::Active
            } else {
                ConnectionStatus::Starting
            },
            exposed_port: if active { p.exposed_port.clone() } else { None },
            additional_exposed_ports: if active {
                p.additional_exposed_ports.clone()
            } else {
                vec![]
            },
        })
    }

    /// Where a live room is: its process, the room's status and the process's ports.
    pub(crate) fn placement(&self, room_id: &str) -> Result<RoomPlacement> {
        let (entry, process_id, p) = self.live_room_on(room_id)?;
        Ok(RoomPlacement {
            room_id: room_id.to_string(),
            process_id,
            status: self.room_status(entry),
            exposed_port: p.exposed_port.clone(),
            additional_exposed_ports: p.additional_exposed_ports.clone(),
        })
    }

    pub(crate) fn room_config_matches(&self, room_id: &str, config: &str) -> Option<(bool, bool)> {
        self.rooms
            .get(room_id)
            .map(|r| (r.destroyed, r.room_config == config))
    }

    /// Ordered by placement time, then creation order (rooms placed in one operation share a
    /// time); the same after a restart.
    pub(crate) fn active_rooms(&self, app_id: &str, pid: ProcessId) -> Option<Vec<Room>> {
        let p = self.processes.get(&pid)?;
        let mut rooms: Vec<(&String, &RoomEntry)> =
            p.rooms.iter().map(|id| (id, &self.rooms[id])).collect();
        rooms.sort_by_key(|(_, r)| (r.allocations.last().map(|a| a.scheduled_at), r.seq));
        Some(
            rooms
                .into_iter()
                .map(|(id, r)| self.room_snapshot(app_id, id, r))
                .collect(),
        )
    }

    /// Ordered by when they left the process, then creation order (a stop ends all rooms at
    /// once); the same after a restart.
    pub(crate) fn inactive_rooms(&self, app_id: &str, pid: ProcessId) -> Option<Vec<Room>> {
        let p = self.processes.get(&pid)?;
        let mut rooms: Vec<(&String, &RoomEntry)> = p
            .past_rooms
            .iter()
            .filter_map(|id| self.rooms.get(id).map(|r| (id, r)))
            .collect();
        // The end of the room's latest allocation on this process.
        let left = |r: &RoomEntry| {
            r.allocations
                .iter()
                .rev()
                .find(|a| a.process_id == pid)
                .and_then(|a| a.unscheduled_at)
        };
        rooms.sort_by_key(|(_, r)| (left(r), r.seq));
        Some(
            rooms
                .into_iter()
                .map(|(id, r)| self.room_snapshot(app_id, id, r))
                .collect(),
        )
    }

    /// What the region cost in `[start, end)`, as of `now`.
    pub(crate) fn usage(
        &self,
        region: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> RegionUsage {
        let clip = |from: DateTime<Utc>, to: DateTime<Utc>| (from.max(start), to.min(end));
        let mut billed = chrono::Duration::zero();
        let mut edges: Vec<(DateTime<Utc>, i32)> = Vec::new();
        for e in self.processes.values() {
            let p = &e.process;
            if let Some(started) = p.started_at {
                let stopped = p.stopping_at.or(p.terminated_at).unwrap_or(now);
                let (a, b) = clip(started, stopped);
                if a < b {
                    billed += b - a;
                }
            }
            let (a, b) = clip(p.created_at, p.terminated_at.unwrap_or(now.max(end)));
            if a < b {
                edges.push((a, 1));
                edges.push((b, -1));
            }
        }
        // At equal times an end comes before a start: back-to-back processes are not
        // concurrent.
        edges.sort();
        let (mut alive, mut peak) = (0i32, 0i32);
        for (_, delta) in edges {
            alive += delta;
            peak = peak.max(alive);
        }
        let seconds =
            start.timestamp()..end.timestamp() + i64::from(end.timestamp_subsec_nanos() > 0);
        RegionUsage {
            region: region.to_string(),
            billed_process_seconds: billed.num_milliseconds() as f64 / 1000.0,
            rooms_created: self.rooms_created.range(seconds).map(|(_, n)| n).sum(),
            peak_processes: peak as u32,
        }
    }

    // ----- bookkeeping helpers -----------------------------------------------------------

    fn record_process(&self, pid: ProcessId, txn: &mut Txn) {
        let Some(records) = txn.records.as_mut() else {
            return;
        };
        if let Some(e) = self.processes.get(&pid) {
            records.push(Record::Process(ProcessRecord {
                process: e.snapshot(),
                drain_requested: e.drain_requested,
                stop_reason: e.stop_reason.clone(),
                idle_since: e.idle_since.map(|(_, at)| at),
            }));
        }
    }

    fn record_room(&self, ctx: &Ctx<'_>, room_id: &str, txn: &mut Txn) {
        let Some(records) = txn.records.as_mut() else {
            return;
        };
        if let Some(r) = self.rooms.get(room_id) {
            records.push(Record::Room(RoomRecord {
                seq: r.seq,
                room: self.room_snapshot(ctx.app_id, room_id, r),
                region: ctx.region.to_string(),
                attempts: r.attempts,
                pinned: r.pinned,
            }));
        }
    }

    /// Runs `f` on a process and keeps the placement index and the live count in step with
    /// whatever `f` changed.
    fn update<T>(&mut self, pid: ProcessId, f: impl FnOnce(&mut ProcessEntry) -> T) -> Option<T> {
        let entry = self.processes.get_mut(&pid)?;
        let (old_key, was_live, old_share) = (
            entry.index_key(),
            entry.process.status.is_live(),
            entry.pool_share(),
        );
        let out = f(entry);
        let (new_key, is_live, new_share) = (
            entry.index_key(),
            entry.process.status.is_live(),
            entry.pool_share(),
        );
        let dep = entry.process.deployment_id;
        let idx = self.index.entry(dep).or_default();
        idx.available_processes = idx.available_processes - old_share.0 + new_share.0;
        idx.free_slots = idx.free_slots - old_share.1 + new_share.1;
        if old_key != new_key {
            if let Some(k) = old_key {
                if k.running {
                    idx.running.remove(&k.key)
                } else {
                    idx.starting.remove(&k.key)
                };
            }
            if let Some(k) = new_key {
                if k.running {
                    idx.running.insert(k.key)
                } else {
                    idx.starting.insert(k.key)
                };
            }
        }
        match (was_live, is_live) {
            (true, false) => self.live_processes -= 1,
            (false, true) => self.live_processes += 1,
            _ => {}
        }
        Some(out)
    }

    /// The best process of `deployment_id` with a free slot: RUNNING first, then STARTING.
    fn best_candidate(&self, deployment_id: u32) -> Option<ProcessId> {
        let idx = self.index.get(&deployment_id)?;
        idx.running.first().or_else(|| idx.starting.first())
    }

    // ----- placement ---------------------------------------------------------------------

    /// Takes a slot for `room_id` (SPEC §5): on the best candidate, else on a new process,
    /// else RESOURCE_EXHAUSTED. Does not touch the room entry itself.
    fn take_slot(
        &mut self,
        ctx: &Ctx<'_>,
        dep: &Arc<Deployment>,
        room_id: &str,
        room_config: &str,
        txn: &mut Txn,
    ) -> Result<ProcessId> {
        let pid = match self.best_candidate(dep.deployment_id) {
            Some(pid) => pid,
            None => {
                let initial = Some((room_id.to_string(), room_config.to_string()));
                self.new_process(ctx, dep, initial, txn)?
            }
        };
        let idle_clock_stopped = self.update(pid, |e| {
            e.rooms.push(room_id.to_string());
            e.idle_since.take().is_some()
        });
        // The store rebuilds `rooms_allocated` from the rooms themselves, so the process needs
        // a record only when something else of it changed.
        if idle_clock_stopped == Some(true) {
            self.record_process(pid, txn);
        }
        txn.notify = true;
        Ok(pid)
    }

    /// Places a new room (the caller has checked the id is free in the app).
    pub(crate) fn create_room(
        &mut self,
        ctx: &Ctx<'_>,
        dep: &Arc<Deployment>,
        room_id: &str,
        room_config: String,
        pinned: bool,
        txn: &mut Txn,
    ) -> Result<ProcessId> {
        let pid = self.take_slot(ctx, dep, room_id, &room_config, txn)?;
        let allocation = new_allocation(pid, ctx.now);
        self.rooms.insert(
            room_id.to_string(),
            RoomEntry {
                seq: ctx.room_seq.fetch_add(1, Ordering::Relaxed),
                room_config,
                allocations: vec![allocation],
                destroyed: false,
                attempts: 1,
                pinned,
            },
        );
        self.record_room(ctx, room_id, txn);
        let second = ctx.now.timestamp();
        // Almost always the latest second: no search of the whole history for it.
        let created = match self.rooms_created.last_entry() {
            Some(last) if *last.key() == second => last.into_mut(),
            _ => self.rooms_created.entry(second).or_default(),
        };
        *created += 1;
        if let Some(records) = txn.records.as_mut() {
            records.push(Record::RoomsCreated {
                app_id: ctx.app_id.to_string(),
                region: ctx.region.to_string(),
                second,
                count: *created,
            });
        }
        Ok(pid)
    }

    /// Starts an empty process, or the first process of a room (`initial_room`).
    pub(crate) fn new_process(
        &mut self,
        ctx: &Ctx<'_>,
        dep: &Arc<Deployment>,
        initial_room: Option<(String, String)>,
        txn: &mut Txn,
    ) -> Result<ProcessId> {
        if self.live_processes >= self.policy.max_processes {
            return Err(Error::ResourceExhausted {
                message: format!(
                    "region {} of app {} is at its limit of {} processes and no process has a free slot",
                    ctx.region, ctx.app_id, self.policy.max_processes
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        let pid = Uuid::new_v4();
        let process = Process {
            process_id: pid,
            app_id: ctx.app_id.to_string(),
            deployment_id: dep.deployment_id,
            region: ctx.region.to_string(),
            status: ProcessStatus::Starting,
            rooms_per_process: dep.rooms_per_process,
            rooms_allocated: 0,
            exposed_port: None,
            additional_exposed_ports: vec![],
            created_at: ctx.now,
            started_at: None,
            stopping_at: None,
            terminated_at: None,
            summary_exit_reason: String::new(),
            log_path: ctx.backend.log_path(pid).map(|p| p.display().to_string()),
        };
        let entry = ProcessEntry {
            process,
            deployment: Arc::clone(dep),
            rooms: vec![],
            past_rooms: VecDeque::new(),
            // A process of a deployment older than the latest (a room pinned to it) serves
            // its rooms but takes no others, and drains once bound.
            drain_requested: ctx
                .latest
                .as_ref()
                .is_some_and(|l| l.deployment_id > dep.deployment_id),
            stop_reason: None,
            idle_since: None,
            idle_timer_armed: false,
        };
        let idx = self.index.entry(dep.deployment_id).or_default();
        if let Some(k) = entry.index_key() {
            idx.starting.insert(k.key);
        }
        let share = entry.pool_share();
        idx.available_processes += share.0;
        idx.free_slots += share.1;
        self.processes.insert(pid, entry);
        self.live_processes += 1;
        tracing::info!(app_id = ctx.app_id, region = ctx.region, process_id = %pid, deployment_id = dep.deployment_id, "process starting");
        txn.effects.push(Effect::Start {
            process_id: pid,
            deployment: Arc::clone(dep),
            initial_room,
        });
        txn.effects.push(Effect::StartTimer {
            process_id: pid,
            deadline: ctx.instant + ctx.limits.start_timeout,
        });
        self.record_process(pid, txn);
        txn.notify = true;
        Ok(pid)
    }

    // ----- rooms -------------------------------------------------------------------------

    /// Destroys a live room and frees its slot.
    pub(crate) fn destroy_room(
        &mut self,
        ctx: &Ctx<'_>,
        room_id: &str,
        txn: &mut Txn,
    ) -> Result<()> {
        let pid = self
            .live_room(room_id)?
            .current_process()
            .ok_or_else(|| Error::Internal("live room without process".into()))?;
        self.update(pid, |e| {
            if let Some(i) = e.rooms.iter().position(|r| r == room_id) {
                e.rooms.remove(i);
            }
        });
        self.close_room(ctx, pid, room_id, true, txn);
        self.after_room_left(ctx, pid, txn);
        // Only the last room's leaving changes more of the process than `rooms_allocated`
        // (its idle clock, or a drained process's stop).
        if self.processes.get(&pid).is_some_and(|e| e.rooms.is_empty()) {
            self.record_process(pid, txn);
        }
        Ok(())
    }

    /// Ends a room's current allocation on `pid`; the room is destroyed if `destroy`.
    fn close_room(
        &mut self,
        ctx: &Ctx<'_>,
        pid: ProcessId,
        room_id: &str,
        destroy: bool,
        txn: &mut Txn,
    ) {
        if let Some(r) = self.rooms.get_mut(room_id) {
            if let Some(a) = r.allocations.last_mut() {
                a.unscheduled_at.get_or_insert(ctx.now);
            }
            if destroy {
                r.destroyed = true;
                txn.destroyed.push(room_id.to_string());
                txn.room_line(false, room_id, pid);
            }
        }
        if let Some(p) = self.processes.get_mut(&pid) {
            p.past_rooms.push_back(room_id.to_string());
        }
        self.record_room(ctx, room_id, txn);
        txn.notify = true;
    }

    /// A room left `pid`: a draining process with no room left stops, an idle one starts
    /// its idle clock.
    fn after_room_left(&mut self, ctx: &Ctx<'_>, pid: ProcessId, txn: &mut Txn) {
        let Some(e) = self.processes.get(&pid) else {
            return;
        };
        if !e.rooms.is_empty() {
            return;
        }
        match e.process.status {
            ProcessStatus::Draining => self.stop(ctx, pid, "drained", txn),
            ProcessStatus::Running => self.start_idle_clock(ctx, pid, txn),
            _ => {}
        }
    }

    fn start_idle_clock(&mut self, ctx: &Ctx<'_>, pid: ProcessId, txn: &mut Txn) {
        let Some(e) = self.processes.get_mut(&pid) else {
            return;
        };
        if !e.deployment.idle_timeout_enabled {
            return;
        }
        e.idle_since = Some((ctx.instant, ctx.now));
        if !e.idle_timer_armed {
            e.idle_timer_armed = true;
            txn.effects.push(Effect::IdleTimer {
                process_id: pid,
                deadline: ctx.instant + ctx.limits.idle_timeout,
            });
        }
    }

    pub(crate) fn update_room_config(
        &mut self,
        ctx: &Ctx<'_>,
        room_id: &str,
        config: String,
        txn: &mut Txn,
    ) -> Result<Room> {
        self.live_room(room_id)?;
        if let Some(r) = self.rooms.get_mut(room_id) {
            r.room_config = config;
        }
        self.record_room(ctx, room_id, txn);
        self.room(ctx.app_id, room_id)
            .ok_or_else(|| Error::Internal("room vanished".into()))
    }

    /// Drops a destroyed room for good (it left the retention window). Returns its number if
    /// it did.
    pub(crate) fn forget_room(&mut self, room_id: &str) -> Option<u64> {
        match self.rooms.get(room_id) {
            Some(r) if r.destroyed => {}
            _ => return None,
        }
        let r = self.rooms.remove(room_id)?;
        for a in &r.allocations {
            if let Some(p) = self.processes.get_mut(&a.process_id) {
                if let Some(i) = p.past_rooms.iter().position(|x| x == room_id) {
                    p.past_rooms.remove(i);
                }
            }
        }
        Some(r.seq)
    }

    // ----- process lifecycle -------------------------------------------------------------

    fn missing(pid: ProcessId) -> Error {
        Error::NotFound(format!("process {pid} not found"))
    }

    /// No new rooms; a process with none left stops now. Harmless on a process that is
    /// already draining or stopping.
    pub(crate) fn drain(
        &mut self,
        ctx: &Ctx<'_>,
        pid: ProcessId,
        txn: &mut Txn,
    ) -> Result<Process> {
        let status = self
            .processes
            .get(&pid)
            .ok_or_else(|| Self::missing(pid))?
            .process
            .status;
        match status {
            ProcessStatus::Starting => {
                self.update(pid, |e| e.drain_requested = true);
                self.record_process(pid, txn);
            }
            ProcessStatus::Running => {
                self.update(pid, |e| e.process.status = ProcessStatus::Draining);
                tracing::info!(app_id = ctx.app_id, process_id = %pid, "process draining");
                txn.notify = true;
                self.record_process(pid, txn);
                self.after_room_left(ctx, pid, txn);
            }
            _ => {}
        }
        self.process(pid).ok_or_else(|| Self::missing(pid))
    }

    /// Drains every live process of a deployment older than `latest`.
    pub(crate) fn drain_older(&mut self, ctx: &Ctx<'_>, latest: u32, txn: &mut Txn) {
        let older: Vec<ProcessId> = self
            .processes
            .values()
            .filter(|e| e.process.deployment_id < latest && e.process.status.is_live())
            .map(|e| e.process.process_id)
            .collect();
        for pid in older {
            let _ = self.drain(ctx, pid, txn);
        }
    }

    /// Destroys the process's rooms and tells it to stop (SIGTERM, then SIGKILL after the
    /// grace). Harmless on a process that is already stopping or has exited.
    pub(crate) fn stop(&mut self, ctx: &Ctx<'_>, pid: ProcessId, reason: &str, txn: &mut Txn) {
        let Some(e) = self.processes.get(&pid) else {
            return;
        };
        if !e.process.status.is_live() {
            return;
        }
        let rooms = self
            .update(pid, |e| {
                e.process.status = ProcessStatus::Stopping;
                e.process.stopping_at = Some(ctx.now);
                e.stop_reason = Some(reason.to_string());
                std::mem::take(&mut e.rooms)
            })
            .unwrap_or_default();
        for room_id in rooms {
            self.close_room(ctx, pid, &room_id, true, txn);
        }
        tracing::info!(app_id = ctx.app_id, region = ctx.region, process_id = %pid, reason, "process stopping");
        txn.effects.push(Effect::Stop {
            process_id: pid,
            grace: ctx.limits.stop_grace,
        });
        txn.notify = true;
        self.record_process(pid, txn);
    }

    /// The process bound its main port.
    pub(crate) fn on_bound(
        &mut self,
        ctx: &Ctx<'_>,
        pid: ProcessId,
        port: ExposedPort,
        additional: Vec<ExposedPort>,
        txn: &mut Txn,
    ) {
        let Some(e) = self.processes.get(&pid) else {
            return;
        };
        match e.process.status {
            ProcessStatus::Starting => {}
            ProcessStatus::Stopping | ProcessStatus::Failed => {
                // Told to stop (or given up on) before it was even launched or bound: make sure
                // the backend's process goes away.
                let grace = if e.process.status == ProcessStatus::Failed {
                    Duration::ZERO
                } else {
                    ctx.limits.stop_grace
                };
                txn.effects.push(Effect::Stop {
                    process_id: pid,
                    grace,
                });
                return;
            }
            _ => return, // a duplicate report
        }
        let drain = e.drain_requested;
        let took = (ctx.now - e.process.created_at)
            .to_std()
            .unwrap_or_default();
        self.update(pid, |e| {
            e.process.status = if drain {
                ProcessStatus::Draining
            } else {
                ProcessStatus::Running
            };
            e.process.started_at = Some(ctx.now);
            e.process.exposed_port = Some(port);
            e.process.additional_exposed_ports = additional;
        });
        tracing::info!(app_id = ctx.app_id, region = ctx.region, process_id = %pid, "process running");
        ctx.observer.process_started(ctx.app_id, ctx.region, took);
        txn.notify = true;
        self.after_room_left(ctx, pid, txn); // may start its idle clock: recorded below
        self.record_process(pid, txn);
    }

    /// The process exited by itself, or after being told to stop.
    pub(crate) fn on_exit(
        &mut self,
        ctx: &Ctx<'_>,
        pid: ProcessId,
        status: ExitStatus,
        txn: &mut Txn,
    ) {
        let Some(e) = self.processes.get(&pid) else {
            return;
        };
        match e.process.status {
            ProcessStatus::Starting => {
                let reason = format!(
                    "{status} before binding port {}",
                    e.deployment.container_port
                );
                self.fail_start(ctx, pid, &reason, txn);
            }
            ProcessStatus::Running | ProcessStatus::Draining => {
                let rooms = self
                    .update(pid, |e| {
                        e.process.status = if status.success() {
                            ProcessStatus::Stopped
                        } else {
                            ProcessStatus::Failed
                        };
                        e.process.terminated_at = Some(ctx.now);
                        e.process.summary_exit_reason = status.to_string();
                        std::mem::take(&mut e.rooms)
                    })
                    .unwrap_or_default();
                for room_id in rooms {
                    self.close_room(ctx, pid, &room_id, true, txn);
                }
                tracing::warn!(app_id = ctx.app_id, region = ctx.region, process_id = %pid, %status, "process exited by itself");
                txn.notify = true;
                self.record_process(pid, txn);
                if !status.success() {
                    // One crash is replaced at once; a crash loop pauses the pool.
                    self.recent_crashes.push_back(ctx.instant);
                    while self
                        .recent_crashes
                        .front()
                        .is_some_and(|t| *t + CRASH_LOOP_WINDOW < ctx.instant)
                    {
                        self.recent_crashes.pop_front();
                    }
                    if self.recent_crashes.len() >= CRASH_LOOP_CRASHES {
                        self.pause_pool(ctx, pid, txn);
                    }
                }
            }
            ProcessStatus::Stopping => {
                self.update(pid, |e| {
                    e.process.status = ProcessStatus::Stopped;
                    e.process.terminated_at = Some(ctx.now);
                    e.process.summary_exit_reason =
                        e.stop_reason.take().unwrap_or_else(|| status.to_string());
                });
                tracing::info!(app_id = ctx.app_id, region = ctx.region, process_id = %pid, "process stopped");
                txn.notify = true;
                self.record_process(pid, txn);
            }
            ProcessStatus::Stopped | ProcessStatus::Failed => {} // duplicate report
        }
    }

    /// The start timer fired: a process still STARTING has failed to bind in time.
    pub(crate) fn on_start_timeout(&mut self, ctx: &Ctx<'_>, pid: ProcessId, txn: &mut Txn) {
        let Some(e) = self.processes.get(&pid) else {
            return;
        };
        if e.process.status != ProcessStatus::Starting {
            return;
        }
        let reason = format!(
            "did not bind port {} within {}",
            e.deployment.container_port,
            humanize(ctx.limits.start_timeout)
        );
        self.fail_start(ctx, pid, &reason, txn);
        txn.effects.push(Effect::Stop {
            process_id: pid,
            grace: Duration::ZERO,
        });
    }

    /// A STARTING process failed: FAILED now, and its rooms, which never ran, are placed again
    /// (a new allocation) unless they have used up their attempts.
    fn fail_start(&mut self, ctx: &Ctx<'_>, pid: ProcessId, reason: &str, txn: &mut Txn) {
        let Some(rooms) = self.update(pid, |e| {
            e.process.status = ProcessStatus::Failed;
            e.process.terminated_at = Some(ctx.now);
            e.process.summary_exit_reason = reason.to_string();
            std::mem::take(&mut e.rooms)
        }) else {
            return;
        };
        tracing::warn!(app_id = ctx.app_id, region = ctx.region, process_id = %pid, reason, "process failed to start");
        // Do not let the warm pool replace it at once: a deployment that cannot start would
        // spin. The pool resumes after a pause.
        self.pause_pool(ctx, pid, txn);
        let own = Arc::clone(&self.processes[&pid].deployment);
        for room_id in rooms {
            let attempts = self
                .rooms
                .get(&room_id)
                .map_or(MAX_PLACEMENT_ATTEMPTS, |r| r.attempts);
            if attempts >= MAX_PLACEMENT_ATTEMPTS {
                tracing::warn!(
                    app_id = ctx.app_id,
                    room_id,
                    attempts,
                    "room destroyed: its processes failed to start"
                );
                self.close_room(ctx, pid, &room_id, true, txn);
                continue;
            }
            self.close_room(ctx, pid, &room_id, false, txn);
            let (config, pinned) = self
                .rooms
                .get(&room_id)
                .map(|r| (r.room_config.clone(), r.pinned))
                .unwrap_or_default();
            // Same rule as at creation: the latest deployment, unless the room asked for one.
            let dep = match (&ctx.latest, pinned) {
                (Some(latest), false) => Arc::clone(latest),
                _ => Arc::clone(&own),
            };
            match self.take_slot(ctx, &dep, &room_id, &config, txn) {
                Ok(new_pid) => {
                    if let Some(r) = self.rooms.get_mut(&room_id) {
                        r.allocations.push(new_allocation(new_pid, ctx.now));
                        r.attempts += 1;
                    }
                    tracing::info!(target: ROOM_LOG, app_id = ctx.app_id, room_id, process_id = %new_pid, "room placed again");
                    ctx.observer.room_placed(ctx.app_id, ctx.region);
                    self.record_room(ctx, &room_id, txn);
                }
                Err(err) => {
                    tracing::warn!(target: ROOM_LOG, app_id = ctx.app_id, room_id, %err, "room destroyed: could not place it again");
                    if let Some(r) = self.rooms.get_mut(&room_id) {
                        r.destroyed = true;
                    }
                    txn.destroyed.push(room_id.clone());
                    self.record_room(ctx, &room_id, txn);
                }
            }
        }
        txn.notify = true;
        self.record_process(pid, txn);
    }

    /// The idle timer fired. Stops the process if it has been RUNNING with no room for the
    /// whole idle timeout; re-arms the timer if it became idle more recently.
    pub(crate) fn on_idle_timer(&mut self, ctx: &Ctx<'_>, pid: ProcessId, txn: &mut Txn) {
        let Some(e) = self.processes.get_mut(&pid) else {
            return;
        };
        let idle_since = match (e.process.status, e.rooms.is_empty(), e.idle_since) {
            (ProcessStatus::Running, true, Some((t, _))) => t,
            _ => {
                e.idle_timer_armed = false;
                return;
            }
        };
        let deadline = idle_since + ctx.limits.idle_timeout;
        if deadline > ctx.instant {
            txn.effects.push(Effect::IdleTimer {
                process_id: pid,
                deadline,
            });
            return;
        }
        if self.needed_by_pool(ctx, pid) {
            // Kept for the region's minimum or buffer; look again after another idle period.
            let deadline = ctx.instant + ctx.limits.idle_timeout;
            txn.effects.push(Effect::IdleTimer {
                process_id: pid,
                deadline,
            });
            return;
        }
        if let Some(e) = self.processes.get_mut(&pid) {
            e.idle_timer_armed = false;
        }
        self.stop(ctx, pid, "idle timeout", txn);
    }

    /// Whether stopping this (empty, RUNNING) process would take the warm pool below the
    /// policy's minimum or buffer.
    fn needed_by_pool(&self, ctx: &Ctx<'_>, pid: ProcessId) -> bool {
        let (Some(latest), Some(e)) = (&ctx.latest, self.processes.get(&pid)) else {
            return false;
        };
        if e.process.deployment_id != latest.deployment_id {
            return false;
        }
        let Some(idx) = self.index.get(&latest.deployment_id) else {
            return false;
        };
        let (procs, free) = e.pool_share();
        idx.available_processes - procs < self.policy.min_processes
            || idx.free_slots - free < u64::from(self.policy.buffer_rooms)
    }

    /// Keeps the warm pool from starting processes of `pid`'s deployment for a while.
    fn pause_pool(&mut self, ctx: &Ctx<'_>, pid: ProcessId, txn: &mut Txn) {
        let Some(e) = self.processes.get(&pid) else {
            return;
        };
        if !self.policy.wants_pool() {
            return;
        }
        let deadline = ctx.instant + POOL_RETRY_DELAY;
        self.pool_paused = Some((e.process.deployment_id, deadline));
        txn.effects.push(Effect::PoolTimer {
            process_id: pid,
            deadline,
        });
    }

    /// Starts processes of the latest deployment until the region has its minimum of
    /// processes and its buffer of free slots, within the process limit. Runs at the end of
    /// every change of the shard, under its lock, so placements and the pool never count the
    /// same free slot twice.
    pub(crate) fn reconcile_pool(&mut self, ctx: &Ctx<'_>, txn: &mut Txn) {
        let Some(latest) = &ctx.latest else { return };
        let paused = self
            .pool_paused
            .is_some_and(|(dep, until)| dep == latest.deployment_id && until > ctx.instant);
        if !self.policy.wants_pool() || paused {
            return;
        }
        loop {
            let (procs, free) = self
                .index
                .get(&latest.deployment_id)
                .map_or((0, 0), |i| (i.available_processes, i.free_slots));
            let short =
                procs < self.policy.min_processes || free < u64::from(self.policy.buffer_rooms);
            if !short || self.live_processes >= self.policy.max_processes {
                return;
            }
            if self.new_process(ctx, latest, None, txn).is_err() {
                return;
            }
        }
    }

    /// The backend could not launch the process.
    pub(crate) fn on_launch_failed(
        &mut self,
        ctx: &Ctx<'_>,
        pid: ProcessId,
        error: &str,
        txn: &mut Txn,
    ) {
        if self
            .processes
            .get(&pid)
            .is_some_and(|e| e.process.status == ProcessStatus::Starting)
        {
            self.fail_start(ctx, pid, &format!("failed to start: {error}"), txn);
        }
    }
}

fn new_allocation(process_id: ProcessId, now: DateTime<Utc>) -> RoomAllocation {
    RoomAllocation {
        room_allocation_id: Uuid::new_v4(),
        process_id,
        scheduled_at: now,
        unscheduled_at: None,
    }
}

/// `100s`, `1.5s`, `250ms`.
pub(crate) fn humanize(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::TransportType;
    use chrono::TimeZone;

    fn limits() -> Limits {
        Limits {
            idle_timeout: Duration::from_secs(300),
            stop_grace: Duration::from_secs(10),
            start_timeout: Duration::from_secs(100),
        }
    }

    fn dep(rpp: u32, strategy: PlacementStrategy) -> Arc<Deployment> {
        Arc::new(Deployment {
            app_id: "a".into(),
            deployment_id: 1,
            rooms_per_process: rpp,
            transport_type: TransportType::Tcp,
            container_port: 7777,
            additional_container_ports: vec![],
            idle_timeout_enabled: false,
            env: vec![],
            command: vec![],
            placement_strategy: strategy,
            created_at: Utc.timestamp_opt(0, 0).unwrap(),
        })
    }

    fn ctx(limits: &Limits, second: i64) -> Ctx<'_> {
        Ctx {
            app_id: "a",
            region: "r",
            now: Utc.timestamp_opt(second, 0).unwrap(),
            instant: Instant::now(),
            limits,
            backend: &NO_BACKEND,
            latest: None,
            room_seq: &ROOM_SEQ,
            observer: &crate::core::observer::NoObserver,
        }
    }

    /// The shard only asks a backend for log file names.
    struct NoBackend;

    impl crate::backend::Backend for NoBackend {
        fn name(&self) -> &'static str {
            "none"
        }
        fn start(&self, _: crate::backend::StartSpec) -> Result<(), crate::backend::BackendError> {
            Ok(())
        }
        fn stop(&self, _: ProcessId, _: Duration) {}
    }

    static NO_BACKEND: NoBackend = NoBackend;
    static ROOM_SEQ: AtomicU64 = AtomicU64::new(0);

    /// A shard whose operations happen at chosen wall-clock seconds.
    struct Fixture {
        state: ShardState,
        limits: Limits,
        dep: Arc<Deployment>,
        rooms: u32,
    }

    impl Fixture {
        fn new(rpp: u32, strategy: PlacementStrategy) -> Self {
            Fixture {
                state: ShardState::default(),
                limits: limits(),
                dep: dep(rpp, strategy),
                rooms: 0,
            }
        }

        fn process(&mut self, created: i64) -> ProcessId {
            let ctx = ctx(&self.limits, created);
            self.state
                .new_process(&ctx, &self.dep, None, &mut Txn::new(false))
                .unwrap()
        }

        fn bind(&mut self, pid: ProcessId, second: i64) {
            let ctx = ctx(&self.limits, second);
            let port = ExposedPort {
                host: "h".into(),
                name: "default".into(),
                port: 1,
                transport_type: TransportType::Tcp,
            };
            self.state
                .on_bound(&ctx, pid, port, vec![], &mut Txn::new(false));
        }

        fn room(&mut self) -> Result<ProcessId> {
            self.rooms += 1;
            let id = format!("r{}", self.rooms);
            let ctx = ctx(&self.limits, 1000);
            self.state.create_room(
                &ctx,
                &self.dep,
                &id,
                String::new(),
                false,
                &mut Txn::new(false),
            )
        }

        fn rooms_on(&self, pid: ProcessId) -> u32 {
            self.state.process(pid).unwrap().rooms_allocated
        }
    }

    #[test]
    fn running_ties_go_to_the_earliest_started_then_the_smallest_id() {
        let mut f = Fixture::new(4, PlacementStrategy::MostFree);
        let late = f.process(0);
        let early = f.process(1);
        f.bind(early, 10);
        f.bind(late, 20);
        assert_eq!(
            f.room().unwrap(),
            early,
            "equal free slots: earliest started_at"
        );
        assert_eq!(f.room().unwrap(), late, "then the most free slots");

        let mut f = Fixture::new(4, PlacementStrategy::MostFree);
        let (a, b) = (f.process(0), f.process(0));
        f.bind(a, 10);
        f.bind(b, 10);
        assert_eq!(
            f.room().unwrap(),
            a.min(b),
            "same started_at: smallest process id"
        );
    }

    #[test]
    fn starting_processes_only_when_no_running_one_has_a_slot() {
        let mut f = Fixture::new(2, PlacementStrategy::MostFree);
        let starting_late = f.process(5);
        let starting_early = f.process(3);
        let running = f.process(1);
        f.bind(running, 2);
        assert_eq!(f.room().unwrap(), running);
        assert_eq!(f.room().unwrap(), running);
        assert_eq!(
            f.room().unwrap(),
            starting_early,
            "ties among STARTING: earliest created_at"
        );
        assert_eq!(f.room().unwrap(), starting_late, "then the most free slots");
        assert_eq!(f.rooms_on(running), 2);
    }

    #[test]
    fn fewest_free_packs_rooms() {
        let mut f = Fixture::new(4, PlacementStrategy::FewestFree);
        let a = f.process(0);
        let b = f.process(1);
        f.bind(a, 2);
        f.bind(b, 3);
        assert_eq!(f.room().unwrap(), a, "all equal: earliest started");
        assert_eq!(f.room().unwrap(), a, "then the fuller one");
        assert_eq!(f.room().unwrap(), a);
        assert_eq!(f.room().unwrap(), a);
        assert_eq!(f.room().unwrap(), b, "a is full");
    }

    #[test]
    fn a_new_process_only_when_nothing_has_a_slot_and_never_past_the_limit() {
        let mut f = Fixture::new(1, PlacementStrategy::MostFree);
        f.state.policy.max_processes = 2;
        let first = f.room().unwrap();
        let second = f.room().unwrap();
        assert_ne!(first, second);
        assert!(matches!(f.room(), Err(Error::ResourceExhausted { .. })));
        assert_eq!(f.state.count_processes(&[]), 2);
        assert_eq!(f.state.live_processes, 2);
    }

    #[test]
    fn draining_stopping_and_dead_processes_are_not_candidates() {
        let mut f = Fixture::new(4, PlacementStrategy::MostFree);
        let draining = f.process(0);
        let stopping = f.process(0);
        let starting_drained = f.process(0);
        f.bind(draining, 1);
        f.bind(stopping, 1);
        let ctx = ctx(&f.limits, 2);
        f.state.drain(&ctx, draining, &mut Txn::new(false)).unwrap();
        f.state.stop(&ctx, stopping, "test", &mut Txn::new(false));
        f.state
            .drain(&ctx, starting_drained, &mut Txn::new(false))
            .unwrap();
        let placed = f.room().unwrap();
        assert!(![draining, stopping, starting_drained].contains(&placed));
        assert!(f
            .state
            .index
            .values()
            .all(|i| i.running.len() + i.starting.len() == 1));
    }

    /// The index holds exactly the processes that can take a room, each in its tier and at its
    /// rank, with no empty group and counters that match a recount.
    fn check_index(state: &ShardState, step: usize) {
        let mut expected: Vec<(u32, bool, Rank)> = vec![];
        for e in state.processes.values() {
            if let Some(k) = e.index_key() {
                expected.push((e.process.deployment_id, k.running, k.key));
            }
        }
        let mut actual: Vec<(u32, bool, Rank)> = vec![];
        for (dep, idx) in &state.index {
            for (running, tier) in [(true, &idx.running), (false, &idx.starting)] {
                for (rank, group) in &tier.by_rank {
                    assert!(!group.is_empty(), "step {step}: empty group {rank}");
                    for o in group {
                        actual.push((*dep, running, (*rank, *o)));
                    }
                }
            }
            // counters
            let (mut procs, mut free) = (0u32, 0u64);
            for e in state
                .processes
                .values()
                .filter(|e| e.process.deployment_id == *dep)
            {
                let s = e.pool_share();
                procs += s.0;
                free += s.1;
            }
            assert_eq!(
                (idx.available_processes, idx.free_slots),
                (procs, free),
                "step {step}"
            );
        }
        expected.sort();
        actual.sort();
        assert_eq!(actual, expected, "step {step}: index vs processes");
        let live = state
            .processes
            .values()
            .filter(|e| e.process.status.is_live())
            .count() as u32;
        assert_eq!(live, state.live_processes, "step {step}");
    }

    #[test]
    fn random_operations_keep_the_grouped_index_exact() {
        use rand::{Rng, SeedableRng};
        for seed in 0..400u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let strategy = if seed % 2 == 0 {
                PlacementStrategy::MostFree
            } else {
                PlacementStrategy::FewestFree
            };
            let mut f = Fixture::new(rng.random_range(1..=4), strategy);
            f.state.policy.max_processes = 6;
            let dep2 = Arc::new(Deployment {
                deployment_id: 2,
                rooms_per_process: rng.random_range(1..=4),
                placement_strategy: if seed % 3 == 0 {
                    PlacementStrategy::FewestFree
                } else {
                    PlacementStrategy::MostFree
                },
                ..(*f.dep).clone()
            });
            let mut live_rooms: Vec<String> = vec![];
            let mut n = 0;
            for step in 0..300 {
                let sec = rng.random_range(0..5); // many ties
                let limits = f.limits.clone();
                let c = ctx(&limits, sec);
                let pids: Vec<ProcessId> = f.state.processes.keys().copied().collect();
                let pick = |rng: &mut rand::rngs::StdRng| pids[rng.random_range(0..pids.len())];
                let mut txn = Txn::new(false);
                match rng.random_range(0..100) {
                    0..=39 => {
                        n += 1;
                        let id = format!("x{n}");
                        let dep = if rng.random_bool(0.3) {
                            Arc::clone(&dep2)
                        } else {
                            Arc::clone(&f.dep)
                        };
                        if f.state
                            .create_room(&c, &dep, &id, String::new(), false, &mut txn)
                            .is_ok()
                        {
                            live_rooms.push(id);
                        }
                    }
                    40..=59 if !live_rooms.is_empty() => {
                        let i = rng.random_range(0..live_rooms.len());
                        let id = live_rooms[i].clone();
                        let _ = f.state.destroy_room(&c, &id, &mut txn);
                        if rng.random_bool(0.8) {
                            live_rooms.remove(i);
                        }
                    }
                    60..=64 if !pids.is_empty() => {
                        let _ = f.state.drain(&c, pick(&mut rng), &mut txn);
                    }
                    65..=69 if !pids.is_empty() => {
                        f.state.stop(&c, pick(&mut rng), "t", &mut txn);
                    }
                    70..=84 if !pids.is_empty() => {
                        let p = pick(&mut rng);
                        f.bind(p, sec);
                    }
                    85..=92 if !pids.is_empty() => {
                        let st = if rng.random_bool(0.5) {
                            ExitStatus::Code(0)
                        } else {
                            ExitStatus::Code(1)
                        };
                        f.state.on_exit(&c, pick(&mut rng), st, &mut txn);
                    }
                    93..=95 if !pids.is_empty() => {
                        f.state.on_start_timeout(&c, pick(&mut rng), &mut txn);
                    }
                    _ => {
                        let dep = if rng.random_bool(0.5) {
                            Arc::clone(&dep2)
                        } else {
                            Arc::clone(&f.dep)
                        };
                        let _ = f.state.new_process(&c, &dep, None, &mut txn);
                    }
                }
                check_index(&f.state, step);
                for e in f.state.processes.values() {
                    assert!(e.rooms.len() as u32 <= e.process.rooms_per_process);
                }
            }
        }
    }
}
