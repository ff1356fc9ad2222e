//! Placement cases reported by people who run similar systems, one test each
//! (rpp = rooms_per_process). They drive the library directly with a backend the test
//! controls, so every process state is exact.

mod support;

use roomsched::backend::{ExitStatus, Simulated, SimulatedConfig};
use roomsched::{Error, ProcessId, ProcessStatus, RoomStatus, Scheduler};
use std::collections::HashSet;
use std::time::Duration;
use support::*;

async fn scheduler(rpp: u32, backend: ManualBackend) -> Result<Scheduler, Error> {
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo", "London", "Chicago"])
        .backend(backend)
        .build()?;
    s.create_deployment(APP, deployment(rpp)).await?;
    Ok(s)
}

/// An empty process in `region`, bound and RUNNING.
async fn running_process(
    s: &Scheduler,
    b: &ManualBackend,
    region: &str,
) -> Result<ProcessId, Error> {
    let p = s.create_process(APP, region, None).await?;
    b.bind(p.process_id);
    wait_status(s, p.process_id, ProcessStatus::Running).await;
    Ok(p.process_id)
}

async fn rooms_on(s: &Scheduler, pid: ProcessId) -> Result<u32, Error> {
    Ok(s.get_process(APP, pid).await?.rooms_allocated)
}

/// Case 1: A (0/4) and B (2/4) running. Six creates: the first two land on A, then both end
/// full and nothing started; a seventh starts exactly one process.
#[tokio::test]
async fn case01_most_free_first_then_one_new_process() -> TestResult {
    let b = ManualBackend::new();
    let s = scheduler(4, b.clone()).await?;
    let proc_b = running_process(&s, &b, "Frankfurt").await?;
    for _ in 0..2 {
        assert_eq!(
            s.create_room(room_in("Frankfurt")).await?.process_id,
            proc_b
        );
    }
    let proc_a = running_process(&s, &b, "Frankfurt").await?;
    let started = b.started_count();
    let mut placed = vec![];
    for _ in 0..6 {
        placed.push(s.create_room(room_in("Frankfurt")).await?.process_id);
    }
    assert_eq!(&placed[..2], &[proc_a, proc_a]);
    assert_eq!(rooms_on(&s, proc_a).await?, 4);
    assert_eq!(rooms_on(&s, proc_b).await?, 4);
    assert_eq!(b.started_count(), started, "no process was started");
    let seventh = s.create_room(room_in("Frankfurt")).await?;
    assert!(seventh.process_id != proc_a && seventh.process_id != proc_b);
    assert_eq!(b.started_count(), started + 1);
    assert_eq!(count(&s).await, 3);
    check_invariants(&s).await;
    Ok(())
}

/// Case 2: rpp 10, one empty running process; ten concurrent creates all land on it; an
/// eleventh starts exactly one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case02_ten_concurrent_fill_one_process() -> TestResult {
    let b = ManualBackend::new();
    let s = scheduler(10, b.clone()).await?;
    let p = running_process(&s, &b, "Frankfurt").await?;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.create_room(room_in("Frankfurt")).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await??.process_id, p);
    }
    assert_eq!(b.started_count(), 1);
    let eleventh = s.create_room(room_in("Frankfurt")).await?;
    assert_ne!(eleventh.process_id, p);
    assert_eq!(b.started_count(), 2);
    check_invariants(&s).await;
    Ok(())
}

/// Case 3: rpp 1, one empty running process, two concurrent creates: one lands on it, the
/// other on exactly one new process. Repeated 1,000 times from scratch on many threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case03_rpp1_two_concurrent_creates_repeated() -> TestResult {
    for round in 0..1000 {
        let b = ManualBackend::new();
        let s = scheduler(1, b.clone()).await?;
        let p = running_process(&s, &b, "Frankfurt").await?;
        let t1 = tokio::spawn({
            let s = s.clone();
            async move { s.create_room(room_in("Frankfurt")).await }
        });
        let t2 = tokio::spawn({
            let s = s.clone();
            async move { s.create_room(room_in("Frankfurt")).await }
        });
        let (r1, r2) = (t1.await??, t2.await??);
        assert_ne!(r1.room_id, r2.room_id, "round {round}");
        assert_ne!(
            r1.process_id, r2.process_id,
            "round {round}: two rooms share a process"
        );
        assert!(r1.process_id == p || r2.process_id == p, "round {round}");
        assert_eq!(
            b.started_count(),
            2,
            "round {round}: exactly one new process"
        );
        for proc in processes(&s).await {
            assert_eq!(proc.rooms_allocated, 1, "round {round}");
        }
    }
    Ok(())
}

/// Case 4: rpp 2, one empty running process; two concurrent creates both land on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case04_rpp2_two_concurrent_share_the_process() -> TestResult {
    let b = ManualBackend::new();
    let s = scheduler(2, b.clone()).await?;
    let p = running_process(&s, &b, "Frankfurt").await?;
    let (r1, r2) = tokio::join!(
        s.create_room(room_in("Frankfurt")),
        s.create_room(room_in("Frankfurt"))
    );
    assert_eq!(r1?.process_id, p);
    assert_eq!(r2?.process_id, p);
    assert_eq!(b.started_count(), 1);
    assert_eq!(rooms_on(&s, p).await?, 2);
    Ok(())
}

/// Case 5: Tokyo, rpp 4: P1 DRAINING with 1 room, P2 STOPPING. A create lands on neither,
/// starts exactly one process, and P1 keeps exactly its 1 room.
#[tokio::test]
async fn case05_draining_and_stopping_get_nothing() -> TestResult {
    let b = ManualBackend::new();
    let s = scheduler(4, b.clone()).await?;
    let first = s.create_room(room_in("Tokyo")).await?;
    let p1 = first.process_id;
    b.bind(p1);
    wait_status(&s, p1, ProcessStatus::Running).await;
    assert_eq!(
        s.drain_process(APP, p1).await?.status,
        ProcessStatus::Draining
    );
    let p2 = running_process(&s, &b, "Tokyo").await?;
    assert_eq!(
        s.stop_process(APP, p2).await?.status,
        ProcessStatus::Stopping
    );
    let started = b.started_count();
    let r = s.create_room(room_in("Tokyo")).await?;
    assert!(r.process_id != p1 && r.process_id != p2);
    assert_eq!(b.started_count(), started + 1);
    assert_eq!(rooms_on(&s, p1).await?, 1);
    assert_eq!(rooms_on(&s, p2).await?, 0);
    assert_eq!(
        s.get_process(APP, p2).await?.status,
        ProcessStatus::Stopping
    );
    check_invariants(&s).await;
    Ok(())
}

/// Case 6: London, rpp 4: P1 1 room, P2 3 rooms; drain P1; five creates: the first on P2,
/// the second starts P3 and the rest join P3; P1 keeps its room. Destroying P1's room takes
/// it to STOPPING then STOPPED, never back to STARTING or RUNNING.
#[tokio::test]
async fn case06_drained_process_gets_nothing_and_stops_when_empty() -> TestResult {
    let b = ManualBackend::new();
    let s = scheduler(4, b.clone()).await?;
    let p2 = running_process(&s, &b, "London").await?;
    for _ in 0..3 {
        assert_eq!(s.create_room(room_in("London")).await?.process_id, p2);
    }
    let p1 = running_process(&s, &b, "London").await?;
    let p1_room = s.create_room(room_in("London")).await?;
    assert_eq!(p1_room.process_id, p1);
    s.drain_process(APP, p1).await?;
    let placed: Vec<ProcessId> = {
        let mut v = vec![];
        for _ in 0..5 {
            v.push(s.create_room(room_in("London")).await?.process_id);
        }
        v
    };
    assert_eq!(placed[0], p2);
    let p3 = placed[1];
    assert!(p3 != p1 && p3 != p2);
    assert!(placed[1..].iter().all(|p| *p == p3), "{placed:?}");
    assert_eq!(rooms_on(&s, p1).await?, 1);
    assert_eq!(count(&s).await, 3);

    s.destroy_room(APP, &p1_room.room_id).await?;
    assert_eq!(
        s.get_process(APP, p1).await?.status,
        ProcessStatus::Stopping
    );
    assert!(b.stops().iter().any(|(p, _)| *p == p1));
    b.exit(p1, ExitStatus::Signal(15));
    let stopped = wait_status(&s, p1, ProcessStatus::Stopped).await;
    assert_eq!(stopped.summary_exit_reason, "drained");
    // Late reports never move it back.
    b.bind(p1);
    s.settle().await;
    assert_eq!(s.get_process(APP, p1).await?.status, ProcessStatus::Stopped);
    let listed = s
        .list_processes(
            &roomsched::ProcessFilter {
                app_id: APP.into(),
                statuses: vec![ProcessStatus::Starting, ProcessStatus::Running],
                regions: vec![],
            },
            100,
            None,
        )
        .await?;
    assert!(listed.processes.iter().all(|p| p.process_id != p1));
    Ok(())
}

/// Case 7: five concurrent destroys of one room: one succeeds, four NOT_FOUND, the process
/// shows 0 (not −1 or 4294967295). Unknown id: NOT_FOUND. Then four creates land on it and
/// the fifth starts one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case07_concurrent_destroys_count_once() -> TestResult {
    let b = ManualBackend::new();
    let s = scheduler(4, b.clone()).await?;
    let p1 = running_process(&s, &b, "Frankfurt").await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (s, id) = (s.clone(), r.room_id.clone());
            tokio::spawn(async move { s.destroy_room(APP, &id).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await? {
            Ok(()) => ok += 1,
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(rooms_on(&s, p1).await?, 0);
    assert!(matches!(
        s.destroy_room(APP, "no-such-room").await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(rooms_on(&s, p1).await?, 0);
    let started = b.started_count();
    let mut placed = vec![];
    for _ in 0..5 {
        placed.push(s.create_room(room_in("Frankfurt")).await?.process_id);
    }
    assert!(placed[..4].iter().all(|p| *p == p1));
    assert_ne!(placed[4], p1);
    assert_eq!(b.started_count(), started + 1);
    check_invariants(&s).await;
    Ok(())
}

/// Case 8: Chicago, rpp 3: P1 holds R1..R3; destroying R2 leaves R1 and R3 intact, P1 at 2
/// and RUNNING; the next create lands on P1 and starts nothing.
#[tokio::test]
async fn case08_destroy_middle_room() -> TestResult {
    let b = ManualBackend::new();
    let s = scheduler(3, b.clone()).await?;
    let p1 = running_process(&s, &b, "Chicago").await?;
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(s.create_room(room_in("Chicago")).await?.room_id);
    }
    s.destroy_room(APP, &ids[1]).await?;
    let p = s.get_process(APP, p1).await?;
    assert_eq!((p.rooms_allocated, p.status), (2, ProcessStatus::Running));
    let listed: Vec<String> = s
        .list_active_rooms(APP, p1)
        .await?
        .into_iter()
        .map(|r| r.room_id)
        .collect();
    assert_eq!(listed, vec![ids[0].clone(), ids[2].clone()]);
    for id in [&ids[0], &ids[2]] {
        assert_eq!(s.get_room(APP, id).await?.status, RoomStatus::Active);
    }
    assert_eq!(
        s.get_room(APP, &ids[1]).await?.status,
        RoomStatus::Destroyed
    );
    let started = b.started_count();
    assert_eq!(s.create_room(room_in("Chicago")).await?.process_id, p1);
    assert_eq!(b.started_count(), started);
    Ok(())
}

/// Case 9: bad region names are refused, start nothing, and leave no trace; a good one
/// works right after.
#[tokio::test]
async fn case09_bad_regions_change_nothing() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let long = "F".repeat(300);
    for bad in ["Atlantis", "", "frankfurt", " Frankfurt ", long.as_str()] {
        match s.create_room(room_in(bad)).await {
            Err(Error::InvalidArgument {
                field: "region", ..
            }) => {}
            other => panic!("region {bad:?}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    assert_eq!(count(&s).await, 0);
    assert_eq!(b.started_count(), 0);
    assert!(processes(&s).await.is_empty());
    let r = s.create_room(room_in("Frankfurt")).await?;
    assert_eq!(s.get_process(APP, r.process_id).await?.region, "Frankfurt");
    Ok(())
}

/// Case 10: rpp 10, start delay 2 s, 50 concurrent creates in Frankfurt and 21 in Tokyo
/// start exactly 5 and 3 processes; 71 distinct ids; every room in its own region.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case10_burst_in_empty_regions_starts_ceil_n_over_rpp() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(Simulated::new(SimulatedConfig {
            start_delay: Duration::from_secs(2),
            ..Default::default()
        }))
        .build()?;
    s.create_deployment(APP, deployment(10)).await?;
    let tasks: Vec<_> = (0..71)
        .map(|i| {
            let s = s.clone();
            let region = if i < 50 { "Frankfurt" } else { "Tokyo" };
            tokio::spawn(async move { (region, s.create_room(room_in(region)).await) })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut placements = vec![];
    for t in tasks {
        let (region, r) = t.await?;
        let r = r?;
        assert_eq!(r.status, RoomStatus::Scheduling);
        ids.insert(r.room_id.clone());
        placements.push((region, r.process_id));
    }
    assert_eq!(ids.len(), 71);
    let procs = processes(&s).await;
    let in_region = |r: &str| procs.iter().filter(|p| p.region == r).count();
    assert_eq!((in_region("Frankfurt"), in_region("Tokyo")), (5, 3));
    for (region, pid) in placements {
        assert_eq!(s.get_process(APP, pid).await?.region, region);
    }
    check_invariants(&s).await;
    Ok(())
}

/// Case 11: a process that never binds fails after the start timeout with a reason; its room
/// gets a new allocation on a new process (history shows both); a room whose processes fail
/// three times is destroyed.
#[tokio::test(start_paused = true)]
async fn case11_start_timeout_replaces_rooms_then_gives_up() -> TestResult {
    let b = ManualBackend::new(); // never binds unless told
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .start_timeout(Duration::from_secs(5))
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    let first = r.process_id;

    tokio::time::sleep(Duration::from_secs(6)).await;
    s.settle().await;
    let failed = s.get_process(APP, first).await?;
    assert_eq!(failed.status, ProcessStatus::Failed);
    assert_eq!(
        failed.summary_exit_reason,
        "did not bind port 7777 within 5s"
    );
    assert!(failed.terminated_at.is_some());
    assert!(
        b.stops()
            .iter()
            .any(|(p, grace)| *p == first && grace.is_zero()),
        "the stuck process is killed"
    );
    let room = s.get_room(APP, &r.room_id).await?;
    assert_eq!(room.allocations.len(), 2);
    assert_eq!(room.allocations[0].process_id, first);
    assert!(room.allocations[0].unscheduled_at.is_some());
    let second = room
        .current_allocation
        .as_ref()
        .expect("placed again")
        .process_id;
    assert_ne!(second, first);
    assert_eq!(room.status, RoomStatus::Scheduling);
    assert!(s
        .list_inactive_rooms(APP, first)
        .await?
        .iter()
        .any(|x| x.room_id == r.room_id));

    tokio::time::sleep(Duration::from_secs(5)).await;
    s.settle().await;
    let room = s.get_room(APP, &r.room_id).await?;
    assert_eq!(room.allocations.len(), 3, "third attempt");
    assert_eq!(room.status, RoomStatus::Scheduling);

    tokio::time::sleep(Duration::from_secs(5)).await;
    s.settle().await;
    let room = s.get_room(APP, &r.room_id).await?;
    assert_eq!(
        room.status,
        RoomStatus::Destroyed,
        "three failed starts destroy the room"
    );
    assert_eq!(room.allocations.len(), 3);
    assert!(room.current_allocation.is_none());
    assert!(room.allocations.iter().all(|a| a.unscheduled_at.is_some()));
    let procs = processes(&s).await;
    assert_eq!(procs.len(), 3);
    assert!(procs
        .iter()
        .all(|p| p.status == ProcessStatus::Failed && p.rooms_allocated == 0));
    Ok(())
}
