//! Randomized operation sequences checked against a simple model of SPEC §4–§5.
//!
//! The model is a plain, obviously-correct restatement of the rules: it scans every process
//! to choose a placement (the scheduler uses an ordered index), and after every operation the
//! scheduler's whole visible state — each process's status and rooms, each room's status and
//! history length — must equal the model's. The backend is driven by hand and the clock only
//! moves between operations, so the expected outcome of every step is exact.

mod support;

use chrono::{DateTime, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roomsched::backend::ExitStatus;
use roomsched::{
    Clock, CreateRoom, Error, ManualClock, ProcessId, ProcessStatus, RoomStatus, Scheduler,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use support::*;

const REGIONS: [&str; 2] = ["Frankfurt", "Tokyo"];
const MAX_PROCESSES: u32 = 3;

#[derive(Debug, Clone)]
struct MProc {
    region: usize,
    status: ProcessStatus,
    rooms: Vec<String>,
    created: DateTime<Utc>,
    started: Option<DateTime<Utc>>,
    drain_requested: bool,
}

#[derive(Debug)]
struct MRoom {
    process: Option<ProcessId>,
    /// When it was placed on `process`.
    placed: DateTime<Utc>,
    /// Creation order.
    created: usize,
    attempts: u8,
    allocations: usize,
}

enum Choice {
    Existing(ProcessId),
    New,
    Exhausted,
}

struct Model {
    rpp: u32,
    now: DateTime<Utc>,
    procs: BTreeMap<ProcessId, MProc>,
    rooms: HashMap<String, MRoom>,
    /// Processes the model expects the current operation to start (ids not known yet).
    pending_new: Vec<ProcessId>,
    next_placeholder: u128,
}

impl Model {
    fn live(&self, region: usize) -> u32 {
        self.procs
            .values()
            .filter(|p| p.region == region && p.status.is_live())
            .count() as u32
    }

    /// SPEC §5 by brute force.
    fn choose(&self, region: usize) -> Choice {
        let free = |p: &MProc| self.rpp - p.rooms.len() as u32;
        let running = self
            .procs
            .iter()
            .filter(|(_, p)| {
                p.region == region && p.status == ProcessStatus::Running && free(p) > 0
            })
            .min_by_key(|(id, p)| (std::cmp::Reverse(free(p)), p.started, **id));
        if let Some((id, _)) = running {
            return Choice::Existing(*id);
        }
        let starting = self
            .procs
            .iter()
            .filter(|(_, p)| {
                p.region == region
                    && p.status == ProcessStatus::Starting
                    && !p.drain_requested
                    && free(p) > 0
            })
            .min_by_key(|(id, p)| (std::cmp::Reverse(free(p)), p.created, **id));
        if let Some((id, _)) = starting {
            return Choice::Existing(*id);
        }
        if self.live(region) < MAX_PROCESSES {
            Choice::New
        } else {
            Choice::Exhausted
        }
    }

    /// A process the model knows will be started by this operation.
    fn add_placeholder(&mut self, region: usize) -> ProcessId {
        self.next_placeholder += 1;
        let id = ProcessId::from_u128(self.next_placeholder);
        self.pending_new.push(id);
        self.procs.insert(
            id,
            MProc {
                region,
                status: ProcessStatus::Starting,
                rooms: vec![],
                created: self.now,
                started: None,
                drain_requested: false,
            },
        );
        id
    }

    fn destroy_rooms_of(&mut self, pid: ProcessId) {
        let rooms = std::mem::take(&mut self.procs.get_mut(&pid).unwrap().rooms);
        for r in rooms {
            self.rooms.get_mut(&r).unwrap().process = None;
        }
    }

    fn stop(&mut self, pid: ProcessId) {
        if self.procs[&pid].status.is_live() {
            self.destroy_rooms_of(pid);
            self.procs.get_mut(&pid).unwrap().status = ProcessStatus::Stopping;
        }
    }

    fn after_room_left(&mut self, pid: ProcessId) {
        let p = &self.procs[&pid];
        if p.rooms.is_empty() && p.status == ProcessStatus::Draining {
            self.stop(pid);
        }
    }

    fn drain(&mut self, pid: ProcessId) {
        let p = self.procs.get_mut(&pid).unwrap();
        match p.status {
            ProcessStatus::Starting => p.drain_requested = true,
            ProcessStatus::Running => {
                p.status = ProcessStatus::Draining;
                self.after_room_left(pid);
            }
            _ => {}
        }
    }

    fn bind(&mut self, pid: ProcessId) {
        let now = self.now;
        let p = self.procs.get_mut(&pid).unwrap();
        if p.status == ProcessStatus::Starting {
            p.status = if p.drain_requested {
                ProcessStatus::Draining
            } else {
                ProcessStatus::Running
            };
            p.started = Some(now);
            self.after_room_left(pid);
        }
    }

    fn exit(&mut self, pid: ProcessId, code: i32) {
        match self.procs[&pid].status {
            ProcessStatus::Starting => {
                let region = self.procs[&pid].region;
                self.procs.get_mut(&pid).unwrap().status = ProcessStatus::Failed;
                let rooms = std::mem::take(&mut self.procs.get_mut(&pid).unwrap().rooms);
                for r in rooms {
                    if self.rooms[&r].attempts >= 3 {
                        self.rooms.get_mut(&r).unwrap().process = None;
                        continue;
                    }
                    let target = match self.choose(region) {
                        Choice::Existing(id) => Some(id),
                        Choice::New => Some(self.add_placeholder(region)),
                        Choice::Exhausted => None,
                    };
                    let room = self.rooms.get_mut(&r).unwrap();
                    room.process = target;
                    if let Some(t) = target {
                        room.attempts += 1;
                        room.allocations += 1;
                        room.placed = self.now;
                        self.procs.get_mut(&t).unwrap().rooms.push(r);
                    }
                }
            }
            ProcessStatus::Running | ProcessStatus::Draining => {
                self.destroy_rooms_of(pid);
                self.procs.get_mut(&pid).unwrap().status = if code == 0 {
                    ProcessStatus::Stopped
                } else {
                    ProcessStatus::Failed
                };
            }
            ProcessStatus::Stopping => {
                self.procs.get_mut(&pid).unwrap().status = ProcessStatus::Stopped
            }
            _ => {}
        }
    }

    /// The scheduler started processes this operation: give the placeholders their real ids.
    fn resolve_new(&mut self, actual: &[ProcessId]) {
        let unknown: Vec<ProcessId> = actual
            .iter()
            .filter(|id| !self.procs.contains_key(id))
            .copied()
            .collect();
        assert_eq!(
            unknown.len(),
            self.pending_new.len(),
            "processes started: {unknown:?}, model expected {}",
            self.pending_new.len()
        );
        for (placeholder, real) in std::mem::take(&mut self.pending_new)
            .into_iter()
            .zip(unknown)
        {
            let p = self.procs.remove(&placeholder).unwrap();
            for r in &p.rooms {
                self.rooms.get_mut(r).unwrap().process = Some(real);
            }
            self.procs.insert(real, p);
        }
    }
}

async fn compare(s: &Scheduler, m: &mut Model, step: usize) {
    let actual = processes(s).await;
    let ids: Vec<ProcessId> = actual.iter().map(|p| p.process_id).collect();
    m.resolve_new(&ids);
    assert_eq!(actual.len(), m.procs.len(), "step {step}: process count");
    for p in &actual {
        let mp = &m.procs[&p.process_id];
        assert_eq!(
            p.status, mp.status,
            "step {step}: status of {}",
            p.process_id
        );
        assert_eq!(p.region, REGIONS[mp.region], "step {step}");
        let listed: Vec<String> = s
            .list_active_rooms(APP, p.process_id)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.room_id)
            .collect();
        // Listed by placement time, then creation order.
        let mut expected = mp.rooms.clone();
        expected.sort_by_key(|r| (m.rooms[r].placed, m.rooms[r].created));
        assert_eq!(
            listed, expected,
            "step {step}: rooms of {} ({:?})",
            p.process_id, p.status
        );
        assert_eq!(p.rooms_allocated as usize, listed.len(), "step {step}");
        assert!(p.rooms_allocated <= p.rooms_per_process, "step {step}");
    }
    for (id, mr) in &m.rooms {
        let r = s.get_room(APP, id).await.unwrap();
        let expected = match mr.process {
            None => RoomStatus::Destroyed,
            Some(p) if m.procs[&p].status == ProcessStatus::Starting => RoomStatus::Scheduling,
            Some(_) => RoomStatus::Active,
        };
        assert_eq!(r.status, expected, "step {step}: room {id}");
        assert_eq!(
            r.allocations.len(),
            mr.allocations,
            "step {step}: history of {id}"
        );
        assert_eq!(
            r.current_allocation.map(|a| a.process_id),
            mr.process,
            "step {step}: room {id}"
        );
    }
    assert_eq!(count(s).await as usize, m.procs.len());
}

async fn run_sequence(seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let clock = Arc::new(ManualClock::new(start));
    let backend = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(REGIONS)
        .backend(backend.clone())
        .clock(clock.clone())
        .max_processes(MAX_PROCESSES)
        .build()
        .unwrap();
    let rpp = rng.random_range(1..=4);
    s.create_deployment(APP, deployment(rpp)).await.unwrap();
    let mut m = Model {
        rpp,
        now: start,
        procs: BTreeMap::new(),
        rooms: HashMap::new(),
        pending_new: vec![],
        next_placeholder: 0,
    };

    for step in 0..steps {
        clock.advance(Duration::from_millis(1));
        m.now = clock.now();
        let pids: Vec<ProcessId> = m.procs.keys().copied().collect();
        let pick = |rng: &mut StdRng| pids[rng.random_range(0..pids.len())];
        let op = rng.random_range(0..100);
        let region = rng.random_range(0..REGIONS.len());
        match op {
            0..=39 => {
                let req = CreateRoom {
                    app_id: APP.into(),
                    region: REGIONS[region].into(),
                    ..Default::default()
                };
                let expected = m.choose(region);
                let got = s.create_room(req).await;
                match (expected, got) {
                    (Choice::Exhausted, Err(Error::ResourceExhausted { .. })) => {}
                    (Choice::Existing(pid), Ok(r)) => {
                        assert_eq!(r.process_id, pid, "seed {seed} step {step}: placement");
                        m.procs.get_mut(&pid).unwrap().rooms.push(r.room_id.clone());
                        m.rooms.insert(
                            r.room_id,
                            MRoom {
                                process: Some(pid),
                                placed: m.now,
                                created: m.rooms.len(),
                                attempts: 1,
                                allocations: 1,
                            },
                        );
                    }
                    (Choice::New, Ok(r)) => {
                        assert!(
                            !m.procs.contains_key(&r.process_id),
                            "seed {seed} step {step}: expected a new process"
                        );
                        m.procs.insert(
                            r.process_id,
                            MProc {
                                region,
                                status: ProcessStatus::Starting,
                                rooms: vec![r.room_id.clone()],
                                created: m.now,
                                started: None,
                                drain_requested: false,
                            },
                        );
                        m.rooms.insert(
                            r.room_id,
                            MRoom {
                                process: Some(r.process_id),
                                placed: m.now,
                                created: m.rooms.len(),
                                attempts: 1,
                                allocations: 1,
                            },
                        );
                    }
                    (_, got) => panic!("seed {seed} step {step}: unexpected outcome {got:?}"),
                }
            }
            40..=54 => {
                let ids: Vec<&String> = m.rooms.keys().collect();
                let id = if ids.is_empty() || rng.random_bool(0.1) {
                    "unknown".to_string()
                } else {
                    ids[rng.random_range(0..ids.len())].clone()
                };
                let live = m.rooms.get(&id).and_then(|r| r.process);
                let got = s.destroy_room(APP, &id).await;
                match live {
                    Some(pid) => {
                        got.unwrap_or_else(|e| {
                            panic!("seed {seed} step {step}: destroy {id}: {e}")
                        });
                        m.procs.get_mut(&pid).unwrap().rooms.retain(|r| *r != id);
                        m.rooms.get_mut(&id).unwrap().process = None;
                        m.after_room_left(pid);
                    }
                    None => assert!(
                        matches!(got, Err(Error::NotFound(_))),
                        "seed {seed} step {step}: {got:?}"
                    ),
                }
            }
            55..=61 if !pids.is_empty() => {
                let pid = pick(&mut rng);
                s.drain_process(APP, pid).await.unwrap();
                m.drain(pid);
            }
            62..=67 if !pids.is_empty() => {
                let pid = pick(&mut rng);
                s.stop_process(APP, pid).await.unwrap();
                m.stop(pid);
            }
            68..=84 if !pids.is_empty() => {
                let pid = pick(&mut rng);
                backend.bind(pid);
                s.settle().await;
                m.bind(pid);
            }
            85..=92 if !pids.is_empty() => {
                let pid = pick(&mut rng);
                let code = if rng.random_bool(0.5) { 0 } else { 3 };
                backend.exit(pid, ExitStatus::Code(code));
                s.settle().await;
                m.exit(pid, code);
            }
            _ => {
                let got = s.create_process(APP, REGIONS[region], None).await;
                match got {
                    Ok(p) => {
                        assert!(
                            m.live(region) < MAX_PROCESSES,
                            "seed {seed} step {step}: limit"
                        );
                        m.procs.insert(
                            p.process_id,
                            MProc {
                                region,
                                status: ProcessStatus::Starting,
                                rooms: vec![],
                                created: m.now,
                                started: None,
                                drain_requested: false,
                            },
                        );
                    }
                    Err(Error::ResourceExhausted { .. }) => {
                        assert!(m.live(region) >= MAX_PROCESSES)
                    }
                    Err(e) => panic!("seed {seed} step {step}: {e}"),
                }
            }
        }
        compare(&s, &mut m, step).await;
    }
}

#[tokio::test]
async fn random_sequences_match_the_model() {
    for seed in 0..150 {
        run_sequence(seed, 120).await;
    }
}
