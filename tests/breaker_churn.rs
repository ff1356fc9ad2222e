//! Breaker (held up; kept as regression tests): endless create/destroy churn keeps the
//! retained destroyed rooms bounded while readers race the evictions (SPEC §7 retention), and
//! bursts against rooms_per_process 10,000 start exactly ⌈N / rpp⌉ processes (SPEC §5).

mod support;

use roomsched::{CreateRoom, Error, ProcessStatus, RoomStatus, Scheduler};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use support::*;

const RETAINED: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_keeps_retention_bounded_while_readers_race_evictions() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(ManualBackend::automatic())
        .retained_destroyed_rooms(RETAINED)
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let done = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicUsize::new(0));

    // Readers: GetRoom and ListInactiveRooms on rooms that are being evicted.
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (s, done, counter) = (s.clone(), Arc::clone(&done), Arc::clone(&counter));
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            while !done.load(Ordering::Relaxed) {
                let n = counter.load(Ordering::Relaxed);
                let id = format!("r{}", n.saturating_sub(RETAINED - 2));
                match s.get_room(APP, &id).await {
                    Ok(r) => {
                        assert_eq!(r.room_id, id);
                        if r.status == RoomStatus::Destroyed {
                            assert!(r.current_allocation.is_none());
                            assert!(r.allocations.iter().all(|a| a.unscheduled_at.is_some()));
                        }
                        if let Some(a) = r.allocations.first() {
                            for x in s.list_inactive_rooms(APP, a.process_id).await.unwrap() {
                                assert!(x.allocations.iter().any(|a| a.unscheduled_at.is_some()));
                            }
                        }
                    }
                    Err(Error::NotFound(_)) => {}
                    Err(e) => panic!("get_room: {e}"),
                }
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        }));
    }

    let mut writers = Vec::new();
    for w in 0..4 {
        let (s, counter) = (s.clone(), Arc::clone(&counter));
        writers.push(tokio::spawn(async move {
            for _ in 0..2_500 {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let region = if w % 2 == 0 { "Frankfurt" } else { "Tokyo" };
                let r = s
                    .create_room(CreateRoom {
                        room_id: Some(format!("r{n}")),
                        ..room_in(region)
                    })
                    .await
                    .unwrap();
                s.destroy_room(APP, &r.room_id).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await?;
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.await? > 0);
    }

    // Exactly the most recent RETAINED destroyed rooms are readable, server-wide.
    let mut inactive = HashSet::new();
    for p in processes(&s).await {
        assert_eq!(p.rooms_allocated, 0);
        assert!(p.status.is_live() && p.status != ProcessStatus::Draining);
        for r in s.list_inactive_rooms(APP, p.process_id).await? {
            assert!(inactive.insert(r.room_id));
        }
    }
    assert_eq!(inactive.len(), RETAINED);
    let mut readable = 0;
    for n in 0..10_000 {
        match s.get_room(APP, &format!("r{n}")).await {
            Ok(r) => {
                assert_eq!(r.status, RoomStatus::Destroyed);
                readable += 1;
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(readable, RETAINED);
    // An evicted id is free again; a retained one is not.
    let evicted = (0..10_000)
        .map(|n| format!("r{n}"))
        .find(|id| !inactive.contains(id))
        .ok_or("no evicted room")?;
    s.create_room(CreateRoom {
        room_id: Some(evicted),
        ..room_in("Tokyo")
    })
    .await?;
    let retained = inactive.iter().next().ok_or("none retained")?.clone();
    assert!(matches!(
        s.create_room(CreateRoom {
            room_id: Some(retained),
            ..room_in("Frankfurt")
        })
        .await,
        Err(Error::AlreadyExists(_))
    ));
    check_invariants(&s).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_against_rooms_per_process_10000_starts_exactly_enough_processes() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(ManualBackend::new())
        .build()?;
    s.create_deployment(APP, deployment(10_000)).await?;
    let mut tasks = Vec::new();
    for _ in 0..20_001 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.create_room(room_in("Frankfurt"))
                .await
                .map(|r| r.process_id)
        }));
    }
    let mut placed = Vec::new();
    for t in tasks {
        placed.push(t.await??);
    }
    let mut per_process: Vec<u32> = processes(&s)
        .await
        .iter()
        .map(|p| p.rooms_allocated)
        .collect();
    per_process.sort_unstable();
    assert_eq!(per_process, vec![1, 10_000, 10_000]);
    assert_eq!(placed.iter().collect::<HashSet<_>>().len(), 3);
    check_invariants(&s).await;
    Ok(())
}
