//! Breaker (held up; kept as a regression test): start-timeout re-placement in a region that is
//! at its process limit. SPEC §4: rooms of a process that did not bind are placed again (at
//! most 3 attempts per room, then destroyed); SPEC §6: the limit counts STARTING, RUNNING and
//! DRAINING processes and is never exceeded.

mod support;

use roomsched::{CreateRoom, Error, ProcessStatus, RoomStatus, Scheduler};
use std::time::Duration;
use support::*;

async fn live(s: &Scheduler) -> usize {
    processes(s)
        .await
        .iter()
        .filter(|p| p.status.is_live())
        .count()
}

#[tokio::test(start_paused = true)]
async fn replacement_at_the_process_limit_never_exceeds_it() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .max_processes(2)
        .start_timeout(Duration::from_secs(10))
        .build()?;
    s.create_deployment(APP, deployment(2)).await?;
    let named = |id: &str| CreateRoom {
        room_id: Some(id.into()),
        ..room_in("Frankfurt")
    };

    // P1: RUNNING and full.
    let a = s.create_room(named("a")).await?;
    s.create_room(named("b")).await?;
    b.bind(a.process_id);
    s.settle().await;
    // P2: STARTING (never binds) with room c.
    let c = s.create_room(named("c")).await?;
    assert_ne!(c.process_id, a.process_id);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // d fills P2; the region is at its limit with no free slot.
    assert_eq!(s.create_room(named("d")).await?.process_id, c.process_id);
    assert!(matches!(
        s.create_room(named("e")).await,
        Err(Error::ResourceExhausted { .. })
    ));

    // P2 times out: c and d are placed again on one new process (P3), within the limit.
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.settle().await;
    assert_eq!(
        s.get_process(APP, c.process_id).await?.status,
        ProcessStatus::Failed
    );
    let c_now = s.get_room(APP, "c").await?;
    let d_now = s.get_room(APP, "d").await?;
    let p3 = c_now
        .current_allocation
        .as_ref()
        .ok_or("c placed")?
        .process_id;
    assert_eq!(
        d_now.current_allocation.as_ref().map(|x| x.process_id),
        Some(p3)
    );
    assert_eq!(live(&s).await, 2);
    check_invariants(&s).await;

    // P3 times out too: third placement on P4; then P4 times out: both rooms have had 3
    // placements and are destroyed; nothing is left STARTING.
    tokio::time::sleep(Duration::from_secs(11)).await;
    s.settle().await;
    assert_eq!(s.get_room(APP, "c").await?.allocations.len(), 3);
    assert_eq!(live(&s).await, 2);
    tokio::time::sleep(Duration::from_secs(11)).await;
    s.settle().await;
    for id in ["c", "d"] {
        let r = s.get_room(APP, id).await?;
        assert_eq!(r.status, RoomStatus::Destroyed, "room {id}");
        assert_eq!(r.allocations.len(), 3);
    }
    assert_eq!(live(&s).await, 1, "only P1 is left");
    assert_eq!(
        s.get_process(APP, a.process_id).await?.rooms_allocated,
        2,
        "P1 untouched"
    );
    // The freed capacity is usable again, exactly up to the limit.
    s.create_room(named("e")).await?;
    s.create_room(named("f")).await?;
    assert!(matches!(
        s.create_room(named("g")).await,
        Err(Error::ResourceExhausted { .. })
    ));
    check_invariants(&s).await;
    Ok(())
}
