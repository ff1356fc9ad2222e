//! Capacity management (SPEC §6): warm pool (minimum and buffer), process limits, packing and
//! usage, through the library.

mod support;

use chrono::{TimeZone, Utc};
use roomsched::{
    DeploymentSpec, Error, ManualClock, PlacementStrategy, ProcessStatus, RegionPolicy, Scheduler,
};
use std::sync::Arc;
use std::time::Duration;
use support::*;

fn policy(min_processes: u32, buffer_rooms: u32, max_processes: u32) -> RegionPolicy {
    RegionPolicy {
        min_processes,
        buffer_rooms,
        max_processes,
    }
}

/// Free slots on RUNNING or STARTING processes, and how many such processes exist.
async fn pool(s: &Scheduler) -> (u32, usize) {
    let procs: Vec<_> = processes(s)
        .await
        .into_iter()
        .filter(|p| matches!(p.status, ProcessStatus::Running | ProcessStatus::Starting))
        .collect();
    (
        procs
            .iter()
            .map(|p| p.rooms_per_process - p.rooms_allocated)
            .sum(),
        procs.len(),
    )
}

#[tokio::test(start_paused = true)]
async fn min_processes_start_without_rooms_and_are_not_idle_stopped() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(b.clone())
        .idle_timeout(Duration::from_secs(30))
        .build()?;
    s.create_deployment(
        APP,
        DeploymentSpec {
            idle_timeout_enabled: true,
            ..deployment(4)
        },
    )
    .await?;
    s.set_region_policy(APP, "Frankfurt", policy(2, 0, 10))
        .await?;
    s.settle().await;
    let procs = processes(&s).await;
    assert_eq!(procs.len(), 2, "two processes, no room asked for");
    assert!(procs
        .iter()
        .all(|p| p.region == "Frankfurt" && p.status == ProcessStatus::Running));
    tokio::time::sleep(Duration::from_secs(300)).await;
    s.settle().await;
    assert!(
        processes(&s)
            .await
            .iter()
            .all(|p| p.status == ProcessStatus::Running),
        "kept for the minimum"
    );
    assert_eq!(b.started_count(), 2);

    // A surplus process (above the minimum) is reaped as usual.
    s.create_process(APP, "Frankfurt", None).await?;
    s.settle().await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    s.settle().await;
    let procs = processes(&s).await;
    let running = procs
        .iter()
        .filter(|p| p.status == ProcessStatus::Running)
        .count();
    let stopped: Vec<_> = procs
        .iter()
        .filter(|p| p.status == ProcessStatus::Stopped)
        .collect();
    assert_eq!(
        (running, stopped.len()),
        (2, 1),
        "one of three idle processes is surplus"
    );
    assert_eq!(stopped[0].summary_exit_reason, "idle timeout");
    assert_eq!(b.started_count(), 3, "and the pool did not replace it");
    Ok(())
}

#[tokio::test]
async fn buffer_rooms_keeps_free_slots_ahead_of_demand_and_no_more() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    s.set_region_policy(APP, "Frankfurt", policy(0, 6, 100))
        .await?;
    let (free, procs) = pool(&s).await;
    assert_eq!(
        (free, procs),
        (8, 2),
        "6 free slots need two processes of 4"
    );
    let mut rooms = vec![];
    for n in 1..=20u32 {
        rooms.push(s.create_room(room_in("Frankfurt")).await?.room_id);
        let (free, procs) = pool(&s).await;
        assert!(free >= 6, "after {n} rooms only {free} free slots");
        assert_eq!(
            procs as u32,
            (n + 6).div_ceil(4),
            "after {n} rooms: the fewest processes that leave 6 free"
        );
    }
    // Freeing rooms starts nothing more.
    let started = b.started_count();
    for id in &rooms[..10] {
        s.destroy_room(APP, id).await?;
    }
    assert_eq!(b.started_count(), started);
    check_invariants(&s).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_processes_holds_exactly_under_concurrency() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(ManualBackend::automatic())
        .build()?;
    s.create_deployment(APP, deployment(2)).await?;
    s.set_region_policy(APP, "Frankfurt", policy(0, 0, 3))
        .await?;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.create_room(room_in("Frankfurt")).await })
        })
        .collect();
    let mut placed = vec![];
    let mut exhausted = 0;
    for t in tasks {
        match t.await? {
            Ok(r) => placed.push(r.room_id),
            Err(Error::ResourceExhausted { retry_after, .. }) => {
                assert!(retry_after > Duration::ZERO);
                exhausted += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!((placed.len(), exhausted), (6, 14));
    assert_eq!(count(&s).await, 3);
    assert!(matches!(
        s.create_process(APP, "Frankfurt", None).await,
        Err(Error::ResourceExhausted { .. })
    ));
    s.destroy_room(APP, &placed[0]).await?;
    s.create_room(room_in("Frankfurt")).await?;
    assert_eq!(count(&s).await, 3);
    check_invariants(&s).await;
    Ok(())
}

#[tokio::test]
async fn fewest_free_packs_rooms_onto_the_fullest_process() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    let spec = DeploymentSpec {
        placement_strategy: PlacementStrategy::FewestFree,
        ..deployment(4)
    };
    s.create_deployment(APP, spec).await?;
    let a = s.create_process(APP, "Frankfurt", None).await?.process_id;
    b.bind(a);
    s.settle().await;
    let mut on_a = vec![];
    for _ in 0..4 {
        let r = s.create_room(room_in("Frankfurt")).await?;
        assert_eq!(r.process_id, a);
        on_a.push(r.room_id);
    }
    let b_pid = s.create_process(APP, "Frankfurt", None).await?.process_id;
    b.bind(b_pid);
    s.settle().await;
    for _ in 0..3 {
        assert_eq!(s.create_room(room_in("Frankfurt")).await?.process_id, b_pid);
    }
    for id in &on_a[..3] {
        s.destroy_room(APP, id).await?;
    }
    let (pa, pb) = (
        s.get_process(APP, a).await?,
        s.get_process(APP, b_pid).await?,
    );
    assert_eq!((pa.rooms_allocated, pb.rooms_allocated), (1, 3));
    let next = s.create_room(room_in("Frankfurt")).await?;
    assert_eq!(
        next.process_id, b_pid,
        "packing: the process with the fewest free slots"
    );
    Ok(())
}

#[tokio::test]
async fn usage_bills_the_running_time_inside_the_window() -> TestResult {
    let t0 = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .ok_or("time")?;
    let clock = Arc::new(ManualClock::new(t0));
    let b = ManualBackend::new().exit_on_stop();
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(b.clone())
        .clock(clock.clone())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let r = s.create_room(room_in("Frankfurt")).await?; // created at t=0
    clock.advance(Duration::from_secs(10));
    b.bind(r.process_id); // started at t=10
    s.settle().await;
    clock.advance(Duration::from_secs(60));
    s.stop_process(APP, r.process_id).await?; // stopping at t=70
    s.settle().await;
    clock.advance(Duration::from_secs(30));

    let at = |secs: i64| t0 + chrono::Duration::seconds(secs);
    let whole = s.usage(APP, &[], None, None).await?;
    let frankfurt = whole
        .iter()
        .find(|u| u.region == "Frankfurt")
        .ok_or("Frankfurt")?;
    assert_eq!(frankfurt.billed_process_seconds, 60.0);
    assert_eq!((frankfurt.rooms_created, frankfurt.peak_processes), (1, 1));
    let tokyo = whole.iter().find(|u| u.region == "Tokyo").ok_or("Tokyo")?;
    assert_eq!(
        (
            tokyo.billed_process_seconds,
            tokyo.rooms_created,
            tokyo.peak_processes
        ),
        (0.0, 0, 0)
    );

    let cut = s
        .usage(APP, &["Frankfurt".to_string()], Some(at(40)), Some(at(100)))
        .await?;
    assert_eq!(cut.len(), 1);
    assert_eq!(
        cut[0].billed_process_seconds, 30.0,
        "only the overlap [40, 70)"
    );
    assert_eq!(
        cut[0].rooms_created, 0,
        "the room was created before the window"
    );
    let before = s
        .usage(APP, &["Frankfurt".to_string()], Some(at(0)), Some(at(10)))
        .await?;
    assert_eq!(
        before[0].billed_process_seconds, 0.0,
        "not billed while starting"
    );
    assert!(matches!(
        s.usage(APP, &[], Some(at(50)), Some(at(50))).await,
        Err(Error::InvalidArgument { field: "start", .. })
    ));
    Ok(())
}

#[tokio::test]
async fn invalid_policies_are_refused_and_change_nothing() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    // Before any deployment the app does not exist.
    assert!(matches!(
        s.set_region_policy(APP, "Frankfurt", policy(1, 0, 5)).await,
        Err(Error::FailedPrecondition(_))
    ));
    s.create_deployment(APP, deployment(4)).await?;
    let before = s.get_region_policy(APP, "Frankfurt").await?;
    // Negative values cannot be expressed: the fields are unsigned.
    for (bad, field) in [
        (policy(4, 0, 3), "min_processes"),
        (policy(0, 0, 100_001), "max_processes"),
        (policy(0, 10_000_001, 10), "buffer_rooms"),
    ] {
        match s.set_region_policy(APP, "Frankfurt", bad).await {
            Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{bad:?}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    assert!(matches!(
        s.set_region_policy(APP, "Atlantis", policy(1, 0, 5)).await,
        Err(Error::InvalidArgument {
            field: "region",
            ..
        })
    ));
    assert_eq!(s.get_region_policy(APP, "Frankfurt").await?, before);
    assert_eq!(b.started_count(), 0);
    assert_eq!(count(&s).await, 0);
    Ok(())
}

#[tokio::test]
async fn a_new_deployment_gets_its_pool_while_the_old_one_drains() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    s.set_region_policy(APP, "Frankfurt", policy(2, 0, 10))
        .await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    s.settle().await;
    s.create_deployment(APP, deployment(4)).await?;
    s.settle().await;
    let procs = processes(&s).await;
    let new: Vec<_> = procs.iter().filter(|p| p.deployment_id == 2).collect();
    assert_eq!(new.len(), 2, "the new deployment's pool is built at once");
    assert!(new.iter().all(|p| p.status == ProcessStatus::Running));
    assert_eq!(
        s.get_process(APP, r.process_id).await?.status,
        ProcessStatus::Draining,
        "the old one drains"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_pool_that_cannot_start_backs_off_instead_of_spinning() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(Broken)
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    s.set_region_policy(APP, "Frankfurt", policy(1, 0, 10))
        .await?;
    s.settle().await;
    assert_eq!(count(&s).await, 1, "one failed attempt, then a pause");
    tokio::time::sleep(Duration::from_secs(12)).await;
    s.settle().await;
    let n = count(&s).await;
    assert!(
        (2..=4).contains(&n),
        "one retry per pause, got {n} attempts in 12 s"
    );
    Ok(())
}
