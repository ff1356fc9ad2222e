//! Breaker: capacity management (SPEC §6 warm pool and limits, §3 AppService, §2/§3 billing).
//!
//! Failing tests are real bugs and stay failing; the others are kept as regression tests.

mod common;
mod support;

use chrono::{TimeZone, Utc};
use roomsched::backend::{Backend, BackendError, ExitStatus, StartSpec};
use roomsched::grpc::pb;
use roomsched::{
    CreateRoom, DeploymentSpec, Error, ManualClock, Process, ProcessId, ProcessStatus,
    RegionPolicy, Scheduler,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tonic::Code;
use tonic_types::StatusExt;

fn policy(min_processes: u32, buffer_rooms: u32, max_processes: u32) -> RegionPolicy {
    RegionPolicy {
        min_processes,
        buffer_rooms,
        max_processes,
    }
}

/// (processes, free slots) of `deployment_id` that count toward the warm pool: RUNNING, or
/// STARTING and not drained by the test.
fn pool_of(procs: &[Process], deployment_id: u32, drained: &HashSet<ProcessId>) -> (u32, u64) {
    procs
        .iter()
        .filter(|p| p.deployment_id == deployment_id)
        .filter(|p| {
            p.status == ProcessStatus::Running
                || (p.status == ProcessStatus::Starting && !drained.contains(&p.process_id))
        })
        .fold((0, 0), |(n, free), p| {
            (
                n + 1,
                free + u64::from(p.rooms_per_process - p.rooms_allocated),
            )
        })
}

fn live(procs: &[Process]) -> u32 {
    procs.iter().filter(|p| p.status.is_live()).count() as u32
}

fn in_region<'a>(procs: &'a [Process], region: &str) -> Vec<&'a Process> {
    procs.iter().filter(|p| p.region == region).collect()
}

// ----- bugs ------------------------------------------------------------------------------------

/// SPEC §6: "roomsched keeps at least `min_processes` processes of the latest deployment
/// alive"; §3 GetRegionPolicy: "the server defaults until set" (README: `serve
/// --min-processes N`, the default policy of every app and region). With a server default of
/// min_processes = 2, GetRegionPolicy reports 2 for every region as soon as the app has a
/// deployment — yet no process is started anywhere until some call happens to touch the region:
/// the pool is only reconciled on shards that already exist, and CreateDeployment only visits
/// those (src/core/scheduler.rs `create_deployment`, the `existing_shard(region).is_some()`
/// loop; shards are created lazily by `App::shard`).
#[tokio::test]
async fn a_default_warm_pool_is_built_when_the_first_deployment_is_created() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(b.clone())
        .default_region_policy(policy(2, 0, 10))
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    s.settle().await;
    for region in ["Frankfurt", "Tokyo"] {
        assert_eq!(s.get_region_policy(APP, region).await?.min_processes, 2);
    }
    let procs = processes(&s).await;
    for region in ["Frankfurt", "Tokyo"] {
        let here = in_region(&procs, region);
        assert_eq!(
            here.len(),
            2,
            "{region}: the policy in force says min_processes 2, but {} processes exist",
            here.len()
        );
    }
    Ok(())
}

/// The same defect seen from a region that was already used: a room in Frankfurt builds
/// Frankfurt's default pool (its shard now exists) but Tokyo, under the very same policy,
/// stays empty — also after a new deployment, which again only visits existing shards.
#[tokio::test]
async fn a_default_warm_pool_covers_every_region_not_only_the_ones_used() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(b.clone())
        .default_region_policy(policy(0, 4, 10))
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    s.create_room(room_in("Frankfurt")).await?;
    s.create_deployment(APP, deployment(4)).await?;
    s.settle().await;
    let procs = processes(&s).await;
    let none = HashSet::new();
    let frankfurt: Vec<Process> = in_region(&procs, "Frankfurt")
        .into_iter()
        .cloned()
        .collect();
    let tokyo: Vec<Process> = in_region(&procs, "Tokyo").into_iter().cloned().collect();
    assert!(
        pool_of(&frankfurt, 2, &none).1 >= 4,
        "Frankfurt: {frankfurt:?}"
    );
    assert!(
        pool_of(&tokyo, 2, &none).1 >= 4,
        "Tokyo has buffer_rooms 4 by default, but {} free slots on deployment 2: {tokyo:?}",
        pool_of(&tokyo, 2, &none).1
    );
    Ok(())
}

/// A backend whose every process binds its port and then crashes at once (exit code 1): a
/// game server that dies right after start-up, the classic crash loop.
#[derive(Clone, Default)]
struct CrashAfterBind {
    started: Arc<std::sync::atomic::AtomicUsize>,
}

impl Backend for CrashAfterBind {
    fn name(&self) -> &'static str {
        "crash-after-bind"
    }
    fn start(&self, spec: StartSpec) -> Result<(), BackendError> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let pid = spec.process_id;
        spec.events.bound(
            pid,
            roomsched::ExposedPort {
                host: "127.0.0.1".into(),
                name: "default".into(),
                port: 30_000,
                transport_type: roomsched::TransportType::Tcp,
            },
            vec![],
        );
        spec.events.exited(pid, ExitStatus::Code(1));
        Ok(())
    }
    fn stop(&self, _pid: ProcessId, _grace: Duration) {}
}

/// SPEC §6 (min_processes) with crashing processes: the pool must refill, but not spin. The
/// pool pauses 5 s after a process *fails to start* (README), but a process that binds and
/// then crashes is replaced at once, every time: a deployment that crashes right after binding
/// makes roomsched start processes as fast as the backend can report them (src/core/shard.rs
/// `on_exit`, RUNNING/DRAINING arm: no pause, unlike `fail_start`; `reconcile_pool` then runs
/// at the end of the same change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_processes_crash_after_binding_does_not_spin() -> TestResult {
    let backend = CrashAfterBind::default();
    let started = Arc::clone(&backend.started);
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(backend)
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    s.set_region_policy(APP, "Frankfurt", policy(1, 0, 10))
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = started.load(std::sync::atomic::Ordering::SeqCst);
    // Stop the loop before asserting, so a failure does not leave it running.
    s.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        n <= 5,
        "{n} processes started in 300 ms for a pool of one whose processes crash right after \
         binding: the pool restarts them in a tight loop"
    );
    Ok(())
}

/// SPEC §6 and README ("A new deployment gets its own pool at once while the old
/// deployment's processes drain"): deployment 1 cannot start (its pool processes exit before
/// binding), so the region's pool pauses 5 s — right, that deployment would spin. The fix is
/// shipped as deployment 2 at once; its pool has never failed, yet it is not built: the pause
/// is per shard, not per deployment, so the new deployment waits out the old one's back-off
/// (src/core/shard.rs `fail_start` sets `pool_paused_until`, `reconcile_pool` returns early
/// for any deployment). Every further failure of a draining old process re-arms the pause.
#[tokio::test(start_paused = true)]
async fn a_new_deployment_pool_is_not_held_back_by_the_old_ones_failures() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    s.set_region_policy(APP, "Frankfurt", policy(2, 0, 10))
        .await?;
    for spec in b.started() {
        b.exit(spec.process_id, ExitStatus::Code(127));
    }
    s.settle().await;
    assert!(processes(&s)
        .await
        .iter()
        .all(|p| p.status == ProcessStatus::Failed));

    s.create_deployment(APP, deployment(4)).await?;
    s.settle().await;
    let procs = processes(&s).await;
    let new = pool_of(&procs, 2, &HashSet::new()).0;
    assert_eq!(
        new, 2,
        "deployment 2 has never failed, but its pool has {new} processes right after it was \
         created: {procs:?}"
    );
    Ok(())
}

// ----- regression: the pool under bursts, failures, stops, drains and deployments ----------

/// A burst of concurrent CreateRoom and CreateProcess calls against a warm pool with a process
/// limit: the pool never counts a free slot twice (exactly the processes the buffer needs
/// while under the limit), never more live processes than the limit, and every refusal is
/// RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bursts_against_a_buffer_start_only_what_the_buffer_needs() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    s.set_region_policy(APP, "Frankfurt", policy(0, 5, 100))
        .await?;
    assert_eq!(count(&s).await, 2, "5 free slots need two processes of 4");

    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.create_room(room_in("Frankfurt")).await })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let procs = processes(&s).await;
    let (n, free) = pool_of(&procs, 1, &HashSet::new());
    assert!(free >= 5, "{free} free slots after the burst");
    assert_eq!(
        n,
        (50u32 + 5).div_ceil(4),
        "the fewest processes of 4 that hold 50 rooms and leave 5 free"
    );
    check_invariants(&s).await;

    // Now at a limit: rooms, empty processes and the pool race for the last processes.
    s.set_region_policy(APP, "Frankfurt", policy(0, 5, 18))
        .await?;
    let rooms: Vec<_> = (0..40)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.create_room(room_in("Frankfurt")).await.map(|_| ()) })
        })
        .collect();
    let empties: Vec<_> = (0..6)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.create_process(APP, "Frankfurt", None).await.map(|_| ()) })
        })
        .collect();
    let mut placed = 0u32;
    for t in rooms {
        match t.await? {
            Ok(()) => placed += 1,
            Err(Error::ResourceExhausted { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for t in empties {
        match t.await? {
            Ok(()) | Err(Error::ResourceExhausted { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let procs = processes(&s).await;
    assert_eq!(live(&procs), 18, "the limit, exactly");
    let total: u32 = procs.iter().map(|p| p.rooms_allocated).sum();
    assert_eq!(total, 50 + placed);
    assert_eq!(
        procs.iter().map(|p| p.rooms_per_process).sum::<u32>(),
        18 * 4
    );
    check_invariants(&s).await;
    Ok(())
}

/// min_processes with processes crashing, stopped and drained by hand, and failing to start:
/// each loss is replaced at once (a failed start after a 5 s pause), one for one.
#[tokio::test(start_paused = true)]
async fn min_processes_refill_after_crash_stop_drain_and_failed_start() -> TestResult {
    let b = ManualBackend::new().exit_on_stop();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(2)).await?;
    s.set_region_policy(APP, "Frankfurt", policy(2, 0, 10))
        .await?;
    for spec in b.started() {
        b.bind(spec.process_id);
    }
    s.settle().await;
    let running = |procs: &[Process]| {
        procs
            .iter()
            .filter(|p| p.status == ProcessStatus::Running)
            .map(|p| p.process_id)
            .collect::<Vec<_>>()
    };
    let pool = running(&processes(&s).await);
    assert_eq!(pool.len(), 2);

    // A crash: replaced at once.
    b.exit(pool[0], ExitStatus::Code(3));
    s.settle().await;
    assert_eq!(b.started_count(), 3, "one replacement for one crash");
    let fresh = b.started()[2].process_id;
    b.bind(fresh);
    s.settle().await;

    // Stopped by hand: replaced at once.
    s.stop_process(APP, pool[1]).await?;
    s.settle().await;
    assert_eq!(b.started_count(), 4, "one replacement for one stop");
    let fresh2 = b.started()[3].process_id;

    // Drained by hand while still STARTING: it no longer counts, so one more starts.
    s.drain_process(APP, fresh2).await?;
    s.settle().await;
    assert_eq!(b.started_count(), 5, "a drained process is replaced");
    b.bind(fresh2);
    s.settle().await;
    assert_eq!(
        s.get_process(APP, fresh2).await?.status,
        ProcessStatus::Stopped,
        "drained and empty: it stops once bound"
    );
    assert_eq!(b.started_count(), 5, "and its stop starts nothing more");

    // A failed start: replaced only after the pause, then once.
    let failing = b.started()[4].process_id;
    b.exit(failing, ExitStatus::Code(1));
    s.settle().await;
    assert_eq!(
        s.get_process(APP, failing).await?.status,
        ProcessStatus::Failed
    );
    assert_eq!(b.started_count(), 5, "paused after a failed start");
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.settle().await;
    assert_eq!(b.started_count(), 6, "one retry after the pause");
    let procs = processes(&s).await;
    assert_eq!(pool_of(&procs, 1, &HashSet::from([fresh2])).0, 2);
    assert_eq!(live(&procs), 2);
    Ok(())
}

/// Lowering max_processes below the live count stops nothing, refuses every new process until
/// the count is below the new limit, and still places rooms on free slots.
#[tokio::test]
async fn lowering_max_below_the_live_count() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(2)).await?;
    let mut pids = vec![];
    for _ in 0..5 {
        pids.push(s.create_process(APP, "Frankfurt", None).await?.process_id);
    }
    s.settle().await;
    s.set_region_policy(APP, "Frankfurt", policy(0, 0, 2))
        .await?;
    assert_eq!(live(&processes(&s).await), 5, "nothing is stopped");
    for _ in 0..10 {
        s.create_room(room_in("Frankfurt")).await?;
    }
    let err = s.create_room(room_in("Frankfurt")).await;
    assert!(
        matches!(err, Err(Error::ResourceExhausted { .. })),
        "{err:?}"
    );
    for pid in &pids[..3] {
        s.stop_process(APP, *pid).await?;
    }
    s.settle().await;
    assert!(matches!(
        s.create_process(APP, "Frankfurt", None).await,
        Err(Error::ResourceExhausted { .. })
    ));
    s.stop_process(APP, pids[3]).await?;
    s.settle().await;
    s.create_process(APP, "Frankfurt", None).await?;
    assert!(matches!(
        s.create_process(APP, "Frankfurt", None).await,
        Err(Error::ResourceExhausted { .. })
    ));
    assert_eq!(live(&processes(&s).await), 2);
    check_invariants(&s).await;
    Ok(())
}

/// A policy set on a region no call has touched yet is the one in force there (limit and
/// pool), and GetRegionPolicy reports it; the other regions keep the default.
#[tokio::test]
async fn a_policy_set_on_an_untouched_region_is_in_force() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(1)).await?;
    assert_eq!(
        s.get_region_policy(APP, "Tokyo").await?,
        RegionPolicy::default()
    );
    let set = s.set_region_policy(APP, "Tokyo", policy(1, 1, 3)).await?;
    assert_eq!(s.get_region_policy(APP, "Tokyo").await?, set);
    assert_eq!(
        s.get_region_policy(APP, "Frankfurt").await?,
        RegionPolicy::default()
    );
    s.settle().await;
    assert_eq!(count(&s).await, 1, "one process holds min 1 and buffer 1");
    s.create_room(room_in("Tokyo")).await?;
    s.create_room(room_in("Tokyo")).await?;
    assert_eq!(
        count(&s).await,
        3,
        "buffer 1 after two rooms of one slot each"
    );
    s.create_room(room_in("Tokyo")).await?;
    assert!(matches!(
        s.create_room(room_in("Tokyo")).await,
        Err(Error::ResourceExhausted { .. })
    ));
    assert_eq!(count(&s).await, 3);
    Ok(())
}

/// A new deployment gets its whole pool at once within the limit (old DRAINING processes
/// count toward it), the old empty processes stop, the old busy ones drain, and once they
/// have gone the new pool is topped up to its minimum.
#[tokio::test]
async fn a_new_deployment_pool_shares_the_limit_with_the_draining_one() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(2)).await?;
    s.set_region_policy(APP, "Frankfurt", policy(3, 2, 5))
        .await?;
    let busy = s.create_room(room_in("Frankfurt")).await?;
    let busy2 = s.create_room(room_in("Frankfurt")).await?;
    s.settle().await;
    let before = processes(&s).await;
    assert_eq!(live(&before), 3);

    s.create_deployment(
        APP,
        DeploymentSpec {
            rooms_per_process: 3,
            ..deployment(3)
        },
    )
    .await?;
    s.settle().await;
    let procs = processes(&s).await;
    let old_live: Vec<_> = procs
        .iter()
        .filter(|p| p.deployment_id == 1 && p.status.is_live())
        .collect();
    assert!(old_live
        .iter()
        .all(|p| p.status == ProcessStatus::Draining && p.rooms_allocated > 0));
    let (n, free) = pool_of(&procs, 2, &HashSet::new());
    assert!(live(&procs) <= 5);
    assert_eq!(
        n as usize + old_live.len(),
        5,
        "the new pool takes what the limit leaves: {procs:?}"
    );
    assert!(free >= 2);

    s.destroy_room(APP, &busy.room_id).await?;
    s.destroy_room(APP, &busy2.room_id).await?;
    s.settle().await;
    let procs = processes(&s).await;
    assert!(procs
        .iter()
        .filter(|p| p.deployment_id == 1)
        .all(|p| !p.status.is_live()));
    let (n, free) = pool_of(&procs, 2, &HashSet::new());
    assert_eq!(
        (n, free),
        (3, 9),
        "min 3 of the new deployment, nothing more"
    );
    Ok(())
}

/// Idle timeout with a warm pool: processes the minimum or the buffer needs are kept for as
/// long as they are needed, surplus ones are reaped, the pool never goes below its minimum,
/// and a lowered minimum lets the idle timeout reap within two idle periods.
#[tokio::test(start_paused = true)]
async fn idle_reaping_keeps_the_pool_and_nothing_more() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .idle_timeout(Duration::from_secs(30))
        .build()?;
    s.create_deployment(
        APP,
        DeploymentSpec {
            idle_timeout_enabled: true,
            ..deployment(2)
        },
    )
    .await?;
    s.set_region_policy(APP, "Frankfurt", policy(2, 3, 20))
        .await?;
    // min 2 and buffer 3 with 2 slots per process: two processes.
    assert_eq!(count(&s).await, 2);
    let mut rooms = vec![];
    for _ in 0..6 {
        rooms.push(s.create_room(room_in("Frankfurt")).await?.room_id);
    }
    s.settle().await;
    let peak = live(&processes(&s).await);
    assert_eq!(peak, 5, "6 rooms + 3 free on processes of 2");
    for id in &rooms {
        s.destroy_room(APP, id).await?;
    }
    let started = b.started_count();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(31)).await;
        s.settle().await;
        let procs = processes(&s).await;
        let (n, free) = pool_of(&procs, 1, &HashSet::new());
        assert!(n >= 2 && free >= 3, "never below the pool: {n}, {free}");
    }
    let procs = processes(&s).await;
    let (n, _) = pool_of(&procs, 1, &HashSet::new());
    assert_eq!(n, 2, "the surplus was reaped: {procs:?}");
    assert_eq!(b.started_count(), started, "and nothing was restarted");
    assert!(procs
        .iter()
        .filter(|p| p.status == ProcessStatus::Stopped)
        .all(|p| p.summary_exit_reason == "idle timeout"));

    s.set_region_policy(APP, "Frankfurt", policy(0, 0, 20))
        .await?;
    tokio::time::sleep(Duration::from_secs(61)).await;
    s.settle().await;
    assert_eq!(live(&processes(&s).await), 0, "no pool: all reaped");
    assert_eq!(b.started_count(), started);
    Ok(())
}

// ----- regression: usage -----------------------------------------------------------------------

/// Billing with a manual clock: windows cut processes, a live process is billed up to now (not
/// up to a later `end`), STARTING time is never billed, a process that crashed is billed to
/// its exit, one stopped while STARTING is never billed; peak_processes and rooms_created
/// follow the window.
#[tokio::test]
async fn usage_windows_cut_and_bill_exactly() -> TestResult {
    let t0 = Utc
        .with_ymd_and_hms(2026, 3, 1, 0, 0, 0)
        .single()
        .ok_or("time")?;
    let at = |secs: i64| t0 + chrono::Duration::seconds(secs);
    let clock = Arc::new(ManualClock::new(t0));
    let b = ManualBackend::new().exit_on_stop();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .clock(clock.clone())
        .build()?;
    s.create_deployment(APP, deployment(1)).await?;
    let tick = |secs: u64| clock.advance(Duration::from_secs(secs));

    let a = s.create_room(room_in("Frankfurt")).await?.process_id; // created 0
    tick(10);
    b.bind(a); // started 10
    s.settle().await;
    tick(10);
    let c = s.create_room(room_in("Frankfurt")).await?.process_id; // created 20
    tick(5);
    b.bind(c); // started 25
    s.settle().await;
    tick(10);
    let d = s.create_process(APP, "Frankfurt", None).await?.process_id; // created 35
    tick(5);
    b.exit(c, ExitStatus::Code(2)); // crashed 40
    s.settle().await;
    tick(20);
    s.stop_process(APP, d).await?; // stopped while STARTING at 60
    s.settle().await;
    tick(40); // now = 100; a still running

    let usage = |start: i64, end: i64| {
        let s = s.clone();
        async move {
            s.usage(APP, &[], Some(at(start)), Some(at(end)))
                .await
                .map(|u| u[0].clone())
        }
    };
    let all = s.usage(APP, &[], None, None).await?[0].clone();
    assert_eq!(all.billed_process_seconds, 90.0 + 15.0, "a 10→100, c 25→40");
    assert_eq!((all.rooms_created, all.peak_processes), (2, 3));

    let w = usage(30, 50).await?;
    assert_eq!(w.billed_process_seconds, 20.0 + 10.0, "a 30→50, c 30→40");
    assert_eq!((w.rooms_created, w.peak_processes), (0, 3));

    let w = usage(0, 20).await?;
    assert_eq!(w.billed_process_seconds, 10.0, "a only from 10");
    assert_eq!((w.rooms_created, w.peak_processes), (1, 1));

    let w = usage(20, 21).await?;
    assert_eq!((w.rooms_created, w.peak_processes), (1, 2));

    let w = usage(90, 500).await?;
    assert_eq!(
        w.billed_process_seconds, 10.0,
        "a live process is billed up to now (100), not up to end"
    );
    assert_eq!((w.rooms_created, w.peak_processes), (0, 1));

    let w = usage(60, 61).await?;
    assert_eq!(
        w.peak_processes, 1,
        "d ended at 60; back-to-back is not concurrent"
    );

    let w = usage(200, 300).await?;
    assert_eq!(
        w.billed_process_seconds, 0.0,
        "nothing billed in the future"
    );

    for (start, end) in [(50, 50), (51, 50)] {
        match usage(start, end).await {
            Err(Error::InvalidArgument { field: "start", .. }) => {}
            other => panic!("[{start}, {end}): {other:?}"),
        }
    }
    match s.usage(APP, &[], Some(at(100)), None).await {
        Err(Error::InvalidArgument { field: "start", .. }) => {}
        other => panic!("start = now, end unset (= now): {other:?}"),
    }
    Ok(())
}

// ----- regression: gRPC ------------------------------------------------------------------------

/// Over gRPC: each invalid policy is INVALID_ARGUMENT naming its field and changes nothing;
/// GetUsage with start ≥ end is INVALID_ARGUMENT naming `start`; the limit is
/// RESOURCE_EXHAUSTED with a RetryInfo whose delay is positive, for CreateRoom and
/// CreateProcess alike, also when the limit comes from a lowered policy.
#[tokio::test]
async fn grpc_policies_usage_and_exhaustion() -> common::TestResult {
    let s = common::TestServer::start().await?;
    s.create_deployment("game", 1).await?;
    let mut apps = s.apps.clone();
    let set = |min, buffer, max| pb::SetRegionPolicyRequest {
        app_id: "game".into(),
        region: "Frankfurt".into(),
        min_processes: min,
        buffer_rooms: buffer,
        max_processes: max,
    };
    let get = pb::GetRegionPolicyRequest {
        app_id: "game".into(),
        region: "Frankfurt".into(),
    };
    apps.set_region_policy(set(1, 0, 2)).await?;
    let before = apps.get_region_policy(get.clone()).await?.into_inner();
    common::poll("the pool of one", common::DEADLINE, || async {
        Ok((s.count_processes("game").await? == 1).then_some(()))
    })
    .await?;
    for (bad, field) in [
        (set(3, 0, 2), "min_processes"),
        (set(0, 0, 100_001), "max_processes"),
        (set(0, 10_000_001, 5), "buffer_rooms"),
    ] {
        common::expect_error(
            apps.set_region_policy(bad).await,
            Code::InvalidArgument,
            &[field],
        )?;
    }
    let mut unknown_region = set(1, 0, 2);
    unknown_region.region = "frankfurt".into();
    common::expect_error(
        apps.set_region_policy(unknown_region).await,
        Code::InvalidArgument,
        &["region"],
    )?;
    assert_eq!(
        apps.get_region_policy(get.clone()).await?.into_inner(),
        before
    );
    assert_eq!(s.count_processes("game").await?, 1, "nothing changed");

    let ts = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
    common::expect_error(
        apps.get_usage(pb::GetUsageRequest {
            app_id: "game".into(),
            regions: vec![],
            start: Some(ts(2_000_000_000)),
            end: Some(ts(2_000_000_000)),
        })
        .await,
        Code::InvalidArgument,
        &["start"],
    )?;

    // Fill the two processes of one slot, then lower the limit to one.
    s.create_room("game", "Frankfurt").await?;
    s.create_room("game", "Frankfurt").await?;
    apps.set_region_policy(set(1, 0, 1)).await?;
    let err = common::expect_error(
        s.rooms
            .clone()
            .create_room(common::room_request("game", "Frankfurt"))
            .await,
        Code::ResourceExhausted,
        &["Frankfurt"],
    )?;
    let delay = err
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .ok_or("RetryInfo with a delay")?;
    assert!(delay > Duration::ZERO);
    let err = common::expect_error(
        s.processes
            .clone()
            .create_process(pb::CreateProcessRequest {
                app_id: "game".into(),
                region: "Frankfurt".into(),
                deployment_id: 0,
            })
            .await,
        Code::ResourceExhausted,
        &["Frankfurt"],
    )?;
    assert!(err.get_details_retry_info().is_some());
    assert_eq!(s.count_processes("game").await?, 2);
    Ok(())
}

// ----- regression: randomized sequences --------------------------------------------------------

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len())])
    }
}

const START_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// One random sequence of binds, exits, stops, drains, rooms, empty processes, deployments,
/// policies and time, driven through ManualBackend with a check after every step:
/// - no call panics or answers anything unexpected, and the event loop keeps applying reports;
/// - rooms_allocated matches the listed rooms (support::check_invariants);
/// - the live count never exceeds the limit (or grows while above a lowered one);
/// - the pool of the latest deployment, counted by brute force, meets the policy unless the
///   limit is reached or a start failed in the last 5 s;
/// - every empty process the pool started in the step was needed (without it the pool
///   would be short): the aggregates never make the pool overshoot;
/// - no process was idle-reaped in a step where the pool started one (no reap/refill spin).
async fn random_sequence(seed: u64, steps: usize) -> TestResult {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let b = ManualBackend::new().exit_on_stop();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .start_timeout(START_TIMEOUT)
        .idle_timeout(IDLE_TIMEOUT)
        .build()?;
    let mut latest = 1u32;
    s.create_deployment(
        APP,
        DeploymentSpec {
            idle_timeout_enabled: true,
            ..deployment(1 + rng.below(3) as u32)
        },
    )
    .await?;
    let mut pol = policy(1, 2, 6);
    s.set_region_policy(APP, "Frankfurt", pol).await?;
    s.settle().await;

    let mut drained: HashSet<ProcessId> = HashSet::new();
    let mut hand_made: HashSet<ProcessId> = HashSet::new();
    let mut rooms: Vec<String> = vec![];
    let mut crashes: Vec<tokio::time::Instant> = Vec::new();
    let mut last_failure: Option<tokio::time::Instant> = None;
    let mut seen_starts = b.started_count();
    let mut prev: HashMap<ProcessId, ProcessStatus> = processes(&s)
        .await
        .into_iter()
        .map(|p| (p.process_id, p.status))
        .collect();
    let mut prev_live = live(&processes(&s).await);

    for step in 0..steps {
        // Paused time advances on its own whenever every task waits (e.g. in `settle`), so a
        // step that was not meant to be timed may still have let timers fire: such a step
        // counts as timed for the checks below.
        let step_start = tokio::time::Instant::now();
        let mut timed = false;
        if last_failure.is_some_and(|t| tokio::time::Instant::now() < t + Duration::from_secs(6))
            && rng.below(2) == 0
        {
            // Let the pool's pause run out before this step.
            tokio::time::sleep(Duration::from_secs(6)).await;
            s.settle().await;
            timed = true;
            let n_live = live(&processes(&s).await);
            assert!(n_live <= pol.max_processes || n_live <= prev_live);
            prev_live = n_live;
        }
        let procs = processes(&s).await;
        let by_status = |st: &[ProcessStatus]| -> Vec<ProcessId> {
            let mut v: Vec<_> = procs
                .iter()
                .filter(|p| st.contains(&p.status))
                .map(|p| p.process_id)
                .collect();
            v.sort();
            v
        };
        use ProcessStatus::*;
        let op = rng.below(100);

        let what: String;
        match op {
            0..=24 => {
                let dep = (rng.below(10) == 0).then(|| 1 + rng.below(latest as usize) as u32);
                let live_before = live(&procs);
                match s
                    .create_room(CreateRoom {
                        deployment_id: dep,
                        ..room_in("Frankfurt")
                    })
                    .await
                {
                    Ok(r) => rooms.push(r.room_id),
                    Err(Error::ResourceExhausted { .. }) => {
                        assert!(
                            live_before >= pol.max_processes,
                            "seed {seed} step {step}: RESOURCE_EXHAUSTED below the limit"
                        );
                    }
                    Err(e) => panic!("seed {seed} step {step}: create_room: {e:?}"),
                }
                what = format!("create_room {dep:?}");
            }
            25..=39 => {
                let id = rooms.get(rng.below(rooms.len().max(1))).cloned();
                if let Some(id) = id {
                    match s.destroy_room(APP, &id).await {
                        Ok(()) | Err(Error::NotFound(_)) => {}
                        Err(e) => panic!("seed {seed} step {step}: destroy_room: {e:?}"),
                    }
                }
                what = "destroy_room".into();
            }
            40..=45 => {
                match s.create_process(APP, "Frankfurt", None).await {
                    Ok(p) => {
                        hand_made.insert(p.process_id);
                    }
                    Err(Error::ResourceExhausted { .. }) => {
                        assert!(live(&procs) >= pol.max_processes, "seed {seed} step {step}");
                    }
                    Err(e) => panic!("seed {seed} step {step}: create_process: {e:?}"),
                }
                what = "create_process".into();
            }
            46..=51 => {
                if let Some(pid) = rng.pick(&by_status(&[Starting, Running, Draining])) {
                    s.stop_process(APP, pid).await?;
                }
                what = "stop_process".into();
            }
            52..=57 => {
                if let Some(pid) = rng.pick(&by_status(&[Starting, Running, Draining])) {
                    let p = s.drain_process(APP, pid).await?;
                    if p.status == Starting {
                        drained.insert(pid);
                    }
                }
                what = "drain_process".into();
            }
            58..=75 => {
                if let Some(pid) = rng.pick(&by_status(&[Starting])) {
                    b.bind(pid);
                    s.settle().await;
                    let now = s.get_process(APP, pid).await?.status;
                    assert_ne!(
                        now, Starting,
                        "seed {seed} step {step}: a bind was not applied (event loop dead?)"
                    );
                }
                what = "bind".into();
            }
            76..=83 => {
                let from: &[ProcessStatus] = if rng.below(4) == 0 {
                    &[Starting]
                } else {
                    &[Running, Draining, Stopping]
                };
                if let Some(pid) = rng.pick(&by_status(from)) {
                    let code = rng.below(2) as i32;
                    b.exit(pid, ExitStatus::Code(code));
                }
                what = "exit".into();
            }
            84..=85 => {
                if latest < 4 {
                    s.create_deployment(
                        APP,
                        DeploymentSpec {
                            idle_timeout_enabled: rng.below(2) == 0,
                            ..deployment(1 + rng.below(3) as u32)
                        },
                    )
                    .await?;
                    latest += 1;
                }
                what = "create_deployment".into();
            }
            86..=90 => {
                let max = rng.below(10) as u32;
                let min = rng.below(max.min(3) as usize + 1) as u32;
                pol = policy(min, rng.below(7) as u32, max);
                s.set_region_policy(APP, "Frankfurt", pol).await?;
                what = format!("set_region_policy {pol:?}");
            }
            _ => {
                let secs = [1, 6, 6, 21][rng.below(4)];
                tokio::time::sleep(Duration::from_secs(secs)).await;
                timed = true;
                what = format!("sleep {secs}s");
            }
        }
        s.settle().await;
        timed |= tokio::time::Instant::now() > step_start;
        check_invariants(&s).await;
        let procs = processes(&s).await;
        let ctx = || format!("seed {seed} step {step} ({what}): {procs:#?}");

        // Failed starts pause the pool, and so does a crash loop: the third crash (a RUNNING
        // or DRAINING process exiting non-zero) within 30 s.
        for p in &procs {
            let was = prev.get(&p.process_id).copied();
            if p.status == Failed && matches!(was, None | Some(Starting)) {
                last_failure = Some(tokio::time::Instant::now());
            }
            if p.status == Failed && matches!(was, Some(Running | Draining)) {
                let now = tokio::time::Instant::now();
                crashes.push(now);
                crashes.retain(|t| *t + Duration::from_secs(30) >= now);
                if crashes.len() >= 3 {
                    last_failure = Some(now);
                }
            }
        }
        let paused = last_failure
            .is_some_and(|t| tokio::time::Instant::now() < t + Duration::from_millis(5_100));

        // The limit.
        let n_live = live(&procs);
        assert!(
            n_live <= pol.max_processes || n_live <= prev_live,
            "{} live processes over a limit of {}: {}",
            n_live,
            pol.max_processes,
            ctx()
        );

        // The pool, by brute force.
        let (n, free) = pool_of(&procs, latest, &drained);
        let short = n < pol.min_processes || free < u64::from(pol.buffer_rooms);
        if short && !paused {
            assert!(
                n_live >= pol.max_processes,
                "pool short ({n} processes, {free} free) under the limit: {}",
                ctx()
            );
        }

        // What the pool started in this step was needed.
        let started = b.started();
        let new_pool: Vec<&StartSpec> = started[seen_starts..]
            .iter()
            .filter(|sp| sp.initial_room.is_none() && !hand_made.contains(&sp.process_id))
            .collect();
        seen_starts = started.len();
        if !timed {
            for sp in &new_pool {
                let Some(p) = procs.iter().find(|p| p.process_id == sp.process_id) else {
                    continue;
                };
                if p.deployment_id != latest
                    || !p.status.is_live()
                    || drained.contains(&p.process_id)
                {
                    continue;
                }
                let own = u64::from(p.rooms_per_process - p.rooms_allocated);
                assert!(
                    n - 1 < pol.min_processes || free - own < u64::from(pol.buffer_rooms),
                    "the pool started {} although it was not needed: {}",
                    p.process_id,
                    ctx()
                );
            }
        }

        // No idle reap in the same step as a pool start.
        let reaped: Vec<_> = procs
            .iter()
            .filter(|p| {
                p.summary_exit_reason == "idle timeout"
                    && p.deployment_id == latest
                    && prev.get(&p.process_id).is_some_and(|s| s.is_live())
            })
            .collect();
        let pool_started_latest = new_pool
            .iter()
            .any(|sp| sp.deployment.deployment_id == latest);
        if !reaped.is_empty() && pool_started_latest && !paused && !timed {
            panic!("idle-reaped and restarted in one step: {}", ctx());
        }

        prev = procs.iter().map(|p| (p.process_id, p.status)).collect();
        prev_live = n_live;
    }

    // Still alive at the end: a room on a fresh process comes up.
    s.set_region_policy(APP, "Frankfurt", policy(0, 0, 100))
        .await?;
    let r = s
        .create_room(CreateRoom {
            room_id: Some("final".into()),
            ..room_in("Frankfurt")
        })
        .await?;
    b.bind(r.process_id);
    s.settle().await;
    let p = s.get_process(APP, r.process_id).await?;
    assert!(
        matches!(p.status, ProcessStatus::Running | ProcessStatus::Draining),
        "seed {seed}: {p:?}"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn random_sequences_keep_the_pool_the_limit_and_the_counts_exact() -> TestResult {
    for seed in 1..=40 {
        random_sequence(seed, 300).await?;
    }
    Ok(())
}

/// Many tasks doing random rooms, empty processes, stops, drains, binds and exits at once,
/// with a monitor reading snapshots throughout: the live count never exceeds the limit in any
/// snapshot; once quiet, the pool meets the policy (or the limit is reached) and the counts
/// agree with the listed rooms.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_random_operations_never_break_the_limit() -> TestResult {
    let b = ManualBackend::new().exit_on_stop();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(3)).await?;
    let pol = policy(2, 4, 9);
    s.set_region_policy(APP, "Frankfurt", pol).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let monitor = {
        let (s, stop) = (s.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut worst = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                worst = worst.max(live(&processes(&s).await));
                tokio::task::yield_now().await;
            }
            worst
        })
    };
    let workers: Vec<_> = (0..8u64)
        .map(|w| {
            let (s, b) = (s.clone(), b.clone());
            tokio::spawn(async move {
                let mut rng = Rng(0x1234_5678 + w * 7919);
                let mut mine: Vec<String> = vec![];
                for _ in 0..150 {
                    let procs = processes(&s).await;
                    let any = |st: &[ProcessStatus]| {
                        let v: Vec<ProcessId> = procs
                            .iter()
                            .filter(|p| st.contains(&p.status))
                            .map(|p| p.process_id)
                            .collect();
                        v
                    };
                    use ProcessStatus::*;
                    let res: Result<(), Error> = match rng.below(10) {
                        0..=3 => s
                            .create_room(room_in("Frankfurt"))
                            .await
                            .map(|r| mine.push(r.room_id)),
                        4 => match mine.pop() {
                            Some(id) => s.destroy_room(APP, &id).await,
                            None => Ok(()),
                        },
                        5 => s.create_process(APP, "Frankfurt", None).await.map(|_| ()),
                        6 => match rng.pick(&any(&[Starting, Running, Draining])) {
                            Some(pid) => s.stop_process(APP, pid).await.map(|_| ()),
                            None => Ok(()),
                        },
                        7 => match rng.pick(&any(&[Running])) {
                            Some(pid) if rng.below(3) == 0 => {
                                s.drain_process(APP, pid).await.map(|_| ())
                            }
                            _ => Ok(()),
                        },
                        8 => {
                            if let Some(pid) = rng.pick(&any(&[Starting])) {
                                b.bind(pid);
                            }
                            Ok(())
                        }
                        _ => {
                            if let Some(pid) = rng.pick(&any(&[Running, Draining])) {
                                b.exit(pid, ExitStatus::Code(rng.below(2) as i32));
                            }
                            Ok(())
                        }
                    };
                    match res {
                        Ok(()) | Err(Error::ResourceExhausted { .. }) | Err(Error::NotFound(_)) => {
                        }
                        Err(e) => panic!("worker {w}: {e:?}"),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    s.settle().await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let worst = monitor.await?;
    assert!(worst <= pol.max_processes, "{worst} live processes at once");
    check_invariants(&s).await;
    // Once quiet, the pool meets its policy (or the limit is reached) — after at most one
    // pause, if the workers' crashes looked like a crash loop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        s.settle().await;
        let procs = processes(&s).await;
        let (n, free) = pool_of(&procs, 1, &HashSet::new());
        let met = (n >= pol.min_processes && free >= u64::from(pol.buffer_rooms))
            || live(&procs) >= pol.max_processes;
        if met {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool {n} processes, {free} free, {} live: {procs:?}",
            live(&procs)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
