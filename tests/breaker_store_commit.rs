//! Breaker: what happens to a change when the call that made it does not run to the end —
//! its client cancels while the store is still flushing (any store that answers with
//! `Commit::Pending`, e.g. group commit), or the store reports a failure.
//!
//! The scheduler applies the change under the shard lock, then, in the *caller's* future,
//! waits for the commit and only afterwards carries out the effects (start the process, arm
//! its start timer, stop a process, enter the retention window). If that future is dropped
//! (client cancelled) or the commit fails, the in-memory change stays but its effects are
//! lost: a process that is never started and never times out, a process that is STOPPING
//! forever while the backend keeps it running.

mod support;

use roomsched::store::{Change, Commit, ProcessRecord, Record, RoomRecord, Store, StoreError};
use roomsched::{
    CreateRoom, Deployment, Error, ProcessStatus, RegionPolicy, RoomStatus, Scheduler,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

const OK: u8 = 0;
const SLOW: u8 = 1;
const FAILING: u8 = 2;
const BATCH: u8 = 3;

type Waiter = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// A store whose commits are instant, take 50 ms (like a group commit), fail, or wait for
/// the test to flush them as one batch.
///
/// It really keeps what it commits, in memory, keyed like the durable store (the scheduler
/// rebuilds its state from [`Store::load`] after a failed commit, so a store that keeps
/// nothing would wipe the state): a change is recorded when it is appended and will be
/// committed (every mode but FAILING; a pending commit always succeeds later). In FAILING mode
/// the change is refused and nothing of it is kept; once a commit has failed, every later one
/// fails too, whatever the mode, until [`Store::reopen`] (the `Store` contract).
#[derive(Clone, Default)]
struct TestStore {
    mode: Arc<AtomicU8>,
    batch: Arc<Mutex<Vec<Waiter>>>,
    data: Arc<Mutex<Persisted>>,
}

/// What the store holds: the live state, one entry per id, like the durable store's tables.
#[derive(Default)]
struct Persisted {
    deployments: BTreeMap<(String, u32), Deployment>,
    policies: BTreeMap<(String, String), RegionPolicy>,
    processes: BTreeMap<u128, ProcessRecord>,
    rooms: BTreeMap<(String, String), RoomRecord>,
    rooms_created: BTreeMap<(String, String, i64), u64>,
    /// A commit failed and `reopen` has not been called since.
    failed: bool,
}

impl Persisted {
    fn apply(&mut self, change: Change) {
        for record in change {
            match record {
                Record::Deployment(d) => {
                    self.deployments
                        .insert((d.app_id.clone(), d.deployment_id), d);
                }
                Record::RegionPolicy {
                    app_id,
                    region,
                    policy,
                } => {
                    self.policies.insert((app_id, region), policy);
                }
                Record::Process(p) => {
                    self.processes.insert(p.process.process_id.as_u128(), p);
                }
                Record::Room(r) => {
                    self.rooms
                        .insert((r.room.app_id.clone(), r.room.room_id.clone()), r);
                }
                Record::RoomForgotten {
                    app_id, room_id, ..
                } => {
                    self.rooms.remove(&(app_id, room_id));
                }
                Record::RoomsCreated {
                    app_id,
                    region,
                    second,
                    count,
                } => {
                    self.rooms_created.insert((app_id, region, second), count);
                }
            }
        }
    }
}

impl TestStore {
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// Makes every batched change durable at once. A group commit wakes all the waiters of a
    /// flush together, so the order in which their calls resume is not defined; this wakes
    /// them newest first.
    fn flush_newest_first(&self) {
        let waiters = std::mem::take(&mut *self.batch.lock().unwrap());
        for w in waiters.into_iter().rev() {
            let _ = w.send(Ok(()));
        }
    }
}

impl Store for TestStore {
    fn wants_records(&self) -> bool {
        true
    }

    fn append(&self, change: Change) -> Commit {
        // Appends are ordered by this lock; a change that is not refused will be committed.
        let mut data = self.data.lock().unwrap();
        let mode = self.mode.load(Ordering::SeqCst);
        if data.failed || mode == FAILING {
            data.failed = true;
            return Commit::Done(Err(StoreError("disk full".into())));
        }
        data.apply(change);
        match mode {
            SLOW => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx.send(Ok(()));
                });
                Commit::Pending(rx)
            }
            BATCH => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.batch.lock().unwrap().push(tx);
                Commit::Pending(rx)
            }
            _ => Commit::Done(Ok(())),
        }
    }

    /// Deployments (in id order per app), region policies, processes, rooms, usage counters:
    /// the order the durable store uses.
    fn load(&self, visit: &mut dyn FnMut(Record)) -> Result<(), StoreError> {
        let data = self.data.lock().unwrap();
        data.deployments
            .values()
            .for_each(|d| visit(Record::Deployment(d.clone())));
        for ((app_id, region), policy) in &data.policies {
            visit(Record::RegionPolicy {
                app_id: app_id.clone(),
                region: region.clone(),
                policy: *policy,
            });
        }
        data.processes
            .values()
            .for_each(|p| visit(Record::Process(p.clone())));
        data.rooms
            .values()
            .for_each(|r| visit(Record::Room(r.clone())));
        for ((app_id, region, second), count) in &data.rooms_created {
            visit(Record::RoomsCreated {
                app_id: app_id.clone(),
                region: region.clone(),
                second: *second,
                count: *count,
            });
        }
        Ok(())
    }

    /// The file can be opened again even while writes fail (a full disk): back at the last
    /// successful commit, which is what `data` holds.
    fn reopen(&self) -> Result<(), StoreError> {
        self.data.lock().unwrap().failed = false;
        Ok(())
    }
}

async fn setup(b: &ManualBackend) -> Result<(Scheduler, TestStore), Error> {
    let store = TestStore::default();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .store(store.clone())
        .start_timeout(Duration::from_secs(5))
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    Ok((s, store))
}

/// SPEC §5: "A call cancelled by its client after the slot was taken leaves a normal, listed
/// room". SPEC §4: a STARTING process that has not bound within the start timeout becomes
/// FAILED (and its rooms are placed again). Here CreateRoom is cancelled while its commit is
/// pending: the room and its new process are listed, but the backend is never asked to start
/// the process and no start timer is armed — it stays STARTING and the room SCHEDULING forever.
#[tokio::test(start_paused = true)]
async fn create_room_cancelled_during_the_commit_still_starts_or_times_out_its_process(
) -> TestResult {
    let b = ManualBackend::new();
    let (s, store) = setup(&b).await?;
    store.set(SLOW);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(10),
        s.create_room(CreateRoom {
            room_id: Some("cancelled".into()),
            ..room_in("Frankfurt")
        }),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "the call was cancelled before its commit"
    );
    store.set(OK);

    let room = s.get_room(APP, "cancelled").await?;
    assert_eq!(room.status, RoomStatus::Scheduling, "a normal, listed room");
    let pid = room.current_allocation.as_ref().expect("placed").process_id;

    // Far past the start timeout (5 s).
    tokio::time::sleep(Duration::from_secs(30)).await;
    s.settle().await;
    let p = s.get_process(APP, pid).await?;
    // The first process failed at its start timeout, and the room was placed again on a
    // new process each time (three attempts, SPEC §4): three starts in all.
    assert_eq!(
        (b.started_count(), p.status),
        (3, ProcessStatus::Failed),
        "(processes the backend was asked to start, status of the room's first process \
         30 s after a 5 s start timeout)"
    );
    Ok(())
}

/// SPEC §3 StopProcess: "destroys its rooms and stops it now". Cancelled while its commit is
/// pending, the process is STOPPING in roomsched but the backend is never told to stop it:
/// it keeps running (a real process would keep its players and its bill) and never reaches
/// STOPPED.
#[tokio::test(start_paused = true)]
async fn stop_process_cancelled_during_the_commit_still_stops_the_process() -> TestResult {
    let b = ManualBackend::new().exit_on_stop();
    let (s, store) = setup(&b).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    b.bind(r.process_id);
    s.settle().await;
    assert_eq!(
        s.get_process(APP, r.process_id).await?.status,
        ProcessStatus::Running
    );

    store.set(SLOW);
    let cancelled =
        tokio::time::timeout(Duration::from_millis(10), s.stop_process(APP, r.process_id)).await;
    assert!(
        cancelled.is_err(),
        "the call was cancelled before its commit"
    );
    store.set(OK);
    tokio::time::sleep(Duration::from_secs(30)).await;
    s.settle().await;

    let p = s.get_process(APP, r.process_id).await?;
    assert_eq!(
        (b.stops().len(), p.status),
        (1, ProcessStatus::Stopped),
        "(stop requests the backend got, process status 30 s later)"
    );
    Ok(())
}

/// A commit that fails makes CreateRoom answer UNAVAILABLE, yet the room and its process stay
/// in memory (GetRoom shows it SCHEDULING, the slot is taken) while the process is never
/// started nor timed out: the unacknowledged change is half-applied (SPEC §9) and the region
/// is left with a process that never comes up.
#[tokio::test(start_paused = true)]
async fn a_failed_commit_leaves_no_process_that_never_starts() -> TestResult {
    let b = ManualBackend::new();
    let (s, store) = setup(&b).await?;
    store.set(FAILING);
    let refused = s
        .create_room(CreateRoom {
            room_id: Some("refused".into()),
            ..room_in("Frankfurt")
        })
        .await;
    assert!(matches!(refused, Err(Error::Unavailable(_))), "{refused:?}");
    let gone = s.get_room(APP, "refused").await;
    assert!(
        matches!(gone, Err(Error::NotFound(_))),
        "the refused room: {gone:?}"
    );
    store.set(OK);

    tokio::time::sleep(Duration::from_secs(30)).await;
    s.settle().await;
    let stuck: Vec<_> = processes(&s)
        .await
        .into_iter()
        .filter(|p| p.status == ProcessStatus::Starting)
        .map(|p| (p.process_id, p.rooms_allocated))
        .collect();
    assert!(
        stuck.is_empty(),
        "30 s after a 5 s start timeout, processes still STARTING (never handed to the \
         backend: {} starts): {stuck:?}; the refused room: {:?}",
        b.started_count(),
        s.get_room(APP, "refused").await.map(|r| r.status)
    );
    Ok(())
}

/// CreateProcess and a StopProcess of that process share one group commit. The stop is
/// applied second under the lock, but nothing orders the effects the two calls carry out
/// afterwards: when the stop's caller resumes first, the backend is told to stop a process it
/// has not started yet (a no-op by the Backend contract), then to start it. The process is
/// STOPPING in roomsched while the backend runs it; it never binds, so nothing stops it again,
/// and the start timeout ignores STOPPING processes: it is never killed and never STOPPED
/// (SPEC §3 StopProcess "stops it now"; §4 stop grace, then SIGKILL).
#[tokio::test(start_paused = true)]
async fn stop_racing_the_start_of_a_process_in_one_group_commit_still_stops_it() -> TestResult {
    let b = ManualBackend::new().exit_on_stop(); // never binds
    let (s, store) = setup(&b).await?;
    store.set(BATCH);
    let create = tokio::spawn({
        let s = s.clone();
        async move { s.create_process(APP, "Frankfurt", None).await }
    });
    let pid = loop {
        if let Some(p) = processes(&s).await.first() {
            break p.process_id;
        }
        tokio::task::yield_now().await;
    };
    let stop = tokio::spawn({
        let s = s.clone();
        async move { s.stop_process(APP, pid).await }
    });
    while s.get_process(APP, pid).await?.status != ProcessStatus::Stopping {
        tokio::task::yield_now().await;
    }
    store.set(OK);
    store.flush_newest_first();
    create.await??;
    stop.await??;

    tokio::time::sleep(Duration::from_secs(60)).await;
    s.settle().await;
    let p = s.get_process(APP, pid).await?;
    let started = b.started_count();
    assert_eq!(
        p.status,
        ProcessStatus::Stopped,
        "60 s later (start timeout 5 s, stop grace 10 s): the backend started it {started} \
         time(s) and got stop requests {:?}",
        b.stops()
    );
    Ok(())
}

/// CreateDeployment whose commit fails answers UNAVAILABLE, yet the deployment is already the
/// app's latest in memory — and because the call returned before its drain step, the older
/// deployment's processes are never drained (SPEC §3: the new deployment "becomes the app's
/// latest; processes of older deployments of that app start DRAINING").
#[tokio::test(start_paused = true)]
async fn a_failed_create_deployment_does_not_leave_a_new_latest_without_draining() -> TestResult {
    let b = ManualBackend::automatic();
    let (s, store) = setup(&b).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    s.settle().await;
    store.set(FAILING);
    let refused = s.create_deployment(APP, deployment(2)).await;
    assert!(matches!(refused, Err(Error::Unavailable(_))), "{refused:?}");
    store.set(OK);
    s.settle().await;

    let latest = s.latest_deployment(APP).await?.deployment_id;
    let old = s.get_process(APP, r.process_id).await?;
    assert!(
        latest == 1 || old.status == ProcessStatus::Draining,
        "after the refused CreateDeployment: latest deployment {latest}, the deployment-1 \
         process is {:?}",
        old.status
    );
    Ok(())
}
