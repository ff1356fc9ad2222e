//! Process lifecycle (SPEC §4) and room bookkeeping through the library: idle timeout, drains,
//! new deployments, exits, stops, fault injection, retention, safe retries, watches.

mod support;

use roomsched::backend::{ExitStatus, Simulated, SimulatedConfig};
use roomsched::{
    ConnectionStatus, CreateRoom, DeploymentSpec, Error, ProcessId, ProcessStatus, RoomStatus,
    Scheduler,
};
use std::time::Duration;
use support::*;

fn idle_deployment(rpp: u32) -> DeploymentSpec {
    DeploymentSpec {
        idle_timeout_enabled: true,
        ..deployment(rpp)
    }
}

async fn status(s: &Scheduler, pid: ProcessId) -> ProcessStatus {
    s.get_process(APP, pid).await.expect("get process").status
}

/// Advances paused time and lets every resulting event be applied.
async fn advance(s: &Scheduler, secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
    s.settle().await;
}

#[tokio::test(start_paused = true)]
async fn idle_process_stops_after_the_idle_timeout_and_a_room_resets_the_clock() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .idle_timeout(Duration::from_secs(30))
        .build()?;
    s.create_deployment(APP, idle_deployment(4)).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    let pid = r.process_id;
    s.settle().await;
    assert_eq!(status(&s, pid).await, ProcessStatus::Running);
    advance(&s, 60).await;
    assert_eq!(
        status(&s, pid).await,
        ProcessStatus::Running,
        "a process with a room is never idle"
    );

    s.destroy_room(APP, &r.room_id).await?; // idle from t0
    advance(&s, 20).await;
    let r2 = s.create_room(room_in("Frankfurt")).await?; // resets the clock
    assert_eq!(r2.process_id, pid);
    s.destroy_room(APP, &r2.room_id).await?; // idle from t0 + 20
    advance(&s, 15).await; // t0 + 35: the first idle period would have ended
    assert_eq!(status(&s, pid).await, ProcessStatus::Running);
    advance(&s, 20).await; // t0 + 55 > t0 + 20 + 30
    let p = s.get_process(APP, pid).await?;
    assert_eq!(p.status, ProcessStatus::Stopped);
    assert_eq!(p.summary_exit_reason, "idle timeout");
    assert!(p.stopping_at.is_some() && p.terminated_at.is_some());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_spares_starting_processes_and_deployments_without_it() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .idle_timeout(Duration::from_secs(10))
        .start_timeout(Duration::from_secs(1000))
        .build()?;
    s.create_deployment(APP, idle_deployment(4)).await?;
    let starting = s.create_process(APP, "Frankfurt", None).await?.process_id;
    advance(&s, 60).await;
    assert_eq!(status(&s, starting).await, ProcessStatus::Starting);

    s.create_deployment(APP, deployment(4)).await?; // idle timeout off
    let p = s.create_process(APP, "Frankfurt", None).await?.process_id;
    b.bind(p);
    advance(&s, 600).await;
    assert_eq!(status(&s, p).await, ProcessStatus::Running);
    Ok(())
}

#[tokio::test]
async fn new_deployment_drains_older_processes() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(b.clone())
        .build()?;
    let d1 = s.create_deployment(APP, deployment(4)).await?;
    assert_eq!(d1.deployment_id, 1);
    let busy = s.create_room(room_in("Frankfurt")).await?;
    b.bind(busy.process_id);
    let empty = s.create_process(APP, "Tokyo", None).await?.process_id;
    b.bind(empty);
    let starting = s.create_process(APP, "Tokyo", None).await?.process_id;
    s.settle().await;

    let d2 = s.create_deployment(APP, deployment(2)).await?;
    assert_eq!(d2.deployment_id, 2);
    assert_eq!(s.latest_deployment(APP).await?.deployment_id, 2);
    let listed: Vec<u32> = s
        .list_deployments(APP)
        .await?
        .iter()
        .map(|d| d.deployment_id)
        .collect();
    assert_eq!(listed, vec![2, 1]);

    assert_eq!(status(&s, busy.process_id).await, ProcessStatus::Draining);
    assert_eq!(status(&s, empty).await, ProcessStatus::Stopping);
    assert_eq!(status(&s, starting).await, ProcessStatus::Starting);
    // New rooms go to the new deployment, never to the old processes.
    let r = s.create_room(room_in("Tokyo")).await?;
    let p = s.get_process(APP, r.process_id).await?;
    assert_eq!((p.deployment_id, p.rooms_per_process), (2, 2));
    assert_ne!(r.process_id, starting);
    // The old STARTING process drains once bound; with no room it stops at once.
    b.bind(starting);
    s.settle().await;
    assert_eq!(status(&s, starting).await, ProcessStatus::Stopping);
    // The draining one stops when its last room ends.
    s.destroy_room(APP, &busy.room_id).await?;
    assert_eq!(status(&s, busy.process_id).await, ProcessStatus::Stopping);
    Ok(())
}

#[tokio::test]
async fn drain_while_starting_takes_it_out_of_placement() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let first = s.create_room(room_in("Frankfurt")).await?;
    let p = s.drain_process(APP, first.process_id).await?;
    assert_eq!(p.status, ProcessStatus::Starting);
    let second = s.create_room(room_in("Frankfurt")).await?;
    assert_ne!(second.process_id, first.process_id);
    b.bind(first.process_id);
    s.settle().await;
    assert_eq!(status(&s, first.process_id).await, ProcessStatus::Draining);
    assert_eq!(
        s.get_room(APP, &first.room_id).await?.status,
        RoomStatus::Active
    );
    Ok(())
}

#[tokio::test]
async fn exits_end_rooms_and_set_the_final_status() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(1)).await?;
    let clean = s.create_room(room_in("Frankfurt")).await?;
    let crash = s.create_room(room_in("Frankfurt")).await?;
    b.bind(clean.process_id);
    b.bind(crash.process_id);
    s.settle().await;

    b.exit(clean.process_id, ExitStatus::Code(0));
    b.exit(crash.process_id, ExitStatus::Code(3));
    b.exit(crash.process_id, ExitStatus::Code(3)); // reported twice
    s.settle().await;
    let p = s.get_process(APP, clean.process_id).await?;
    assert_eq!((p.status, p.rooms_allocated), (ProcessStatus::Stopped, 0));
    assert_eq!(p.summary_exit_reason, "exited with code 0");
    let p = s.get_process(APP, crash.process_id).await?;
    assert_eq!((p.status, p.rooms_allocated), (ProcessStatus::Failed, 0));
    assert_eq!(p.summary_exit_reason, "exited with code 3");
    assert!(p.terminated_at.is_some() && p.stopping_at.is_none());
    for id in [&clean.room_id, &crash.room_id] {
        let r = s.get_room(APP, id).await?;
        assert_eq!(r.status, RoomStatus::Destroyed);
        assert!(r.allocations[0].unscheduled_at.is_some());
    }
    // Slots are free: the next room starts a new process (the old ones are gone).
    let next = s.create_room(room_in("Frankfurt")).await?;
    assert!(next.process_id != clean.process_id && next.process_id != crash.process_id);
    // A late bind never revives a dead process.
    b.bind(crash.process_id);
    s.settle().await;
    assert_eq!(status(&s, crash.process_id).await, ProcessStatus::Failed);
    Ok(())
}

#[tokio::test]
async fn stop_works_in_every_live_status_and_is_idempotent() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .stop_grace(Duration::from_secs(7))
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    let pid = r.process_id;
    let p = s.stop_process(APP, pid).await?; // still STARTING
    assert_eq!((p.status, p.rooms_allocated), (ProcessStatus::Stopping, 0));
    assert!(p.stopping_at.is_some());
    assert_eq!(
        s.get_room(APP, &r.room_id).await?.status,
        RoomStatus::Destroyed
    );
    assert_eq!(b.stops(), vec![(pid, Duration::from_secs(7))]);
    let again = s.stop_process(APP, pid).await?;
    assert_eq!(again.status, ProcessStatus::Stopping);
    assert_eq!(again.stopping_at, p.stopping_at);
    // It binds late (it was starting): it is stopped again, not revived.
    b.bind(pid);
    s.settle().await;
    assert_eq!(status(&s, pid).await, ProcessStatus::Stopping);
    assert_eq!(b.stops().len(), 2);
    b.exit(pid, ExitStatus::Signal(15));
    s.settle().await;
    let p = s.get_process(APP, pid).await?;
    assert_eq!(
        (p.status, p.summary_exit_reason.as_str()),
        (ProcessStatus::Stopped, "stopped by request")
    );
    assert_eq!(
        s.stop_process(APP, pid).await?.status,
        ProcessStatus::Stopped
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn simulated_fault_injection() -> TestResult {
    let never_ready = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(Simulated::new(SimulatedConfig {
            never_ready_ratio: 1.0,
            ..Default::default()
        }))
        .start_timeout(Duration::from_secs(3))
        .build()?;
    never_ready.create_deployment(APP, deployment(2)).await?;
    let p = never_ready.create_process(APP, "Frankfurt", None).await?;
    advance(&never_ready, 4).await;
    let p = never_ready.get_process(APP, p.process_id).await?;
    assert_eq!(p.status, ProcessStatus::Failed);
    assert_eq!(p.summary_exit_reason, "did not bind port 7777 within 3s");

    let crashing = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(Simulated::new(SimulatedConfig {
            crash_ratio: 1.0,
            crash_after: Duration::from_secs(5),
            ..Default::default()
        }))
        .build()?;
    crashing.create_deployment(APP, deployment(2)).await?;
    let r = crashing.create_room(room_in("Frankfurt")).await?;
    advance(&crashing, 1).await;
    assert_eq!(
        crashing.get_process(APP, r.process_id).await?.status,
        ProcessStatus::Running
    );
    advance(&crashing, 5).await;
    let p = crashing.get_process(APP, r.process_id).await?;
    assert_eq!((p.status, p.rooms_allocated), (ProcessStatus::Failed, 0));
    assert_eq!(p.summary_exit_reason, "exited with code 1");
    assert_eq!(
        crashing.get_room(APP, &r.room_id).await?.status,
        RoomStatus::Destroyed
    );
    Ok(())
}

#[tokio::test]
async fn launch_failure_fails_the_process_and_eventually_the_room() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(Broken)
        .build()?;
    s.create_deployment(APP, deployment(2)).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    s.settle().await;
    let p = s.get_process(APP, r.process_id).await?;
    assert_eq!(p.status, ProcessStatus::Failed);
    assert_eq!(p.summary_exit_reason, "failed to start: no such file");
    // Every attempt fails at once: after three the room is destroyed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.get_room(APP, &r.room_id).await?.status != RoomStatus::Destroyed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "room never destroyed"
        );
        s.settle().await;
    }
    assert_eq!(s.get_room(APP, &r.room_id).await?.allocations.len(), 3);
    Ok(())
}

#[tokio::test]
async fn destroyed_rooms_are_retained_only_up_to_the_bound() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(ManualBackend::automatic())
        .retained_destroyed_rooms(5)
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let mut ids = vec![];
    let mut pid = None;
    for _ in 0..20 {
        let r = s.create_room(room_in("Frankfurt")).await?;
        s.destroy_room(APP, &r.room_id).await?;
        pid = Some(r.process_id);
        ids.push(r.room_id);
    }
    for (i, id) in ids.iter().enumerate() {
        let got = s.get_room(APP, id).await;
        if i < 15 {
            assert!(
                matches!(got, Err(Error::NotFound(_))),
                "room {i} should be forgotten: {got:?}"
            );
        } else {
            assert_eq!(got?.status, RoomStatus::Destroyed);
        }
    }
    let inactive = s.list_inactive_rooms(APP, pid.expect("a process")).await?;
    assert_eq!(inactive.len(), 5);
    // A forgotten id may be used again.
    let again = CreateRoom {
        room_id: Some(ids[0].clone()),
        ..room_in("Frankfurt")
    };
    assert_eq!(s.create_room(again).await?.room_id, ids[0]);
    Ok(())
}

#[tokio::test]
async fn caller_chosen_ids_and_safe_retries() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let req = CreateRoom {
        room_id: Some("match-1".into()),
        room_config: "{\"mode\":\"duel\"}".into(),
        ..room_in("Frankfurt")
    };
    let first = s.create_room(req.clone()).await?;
    let retry = s.create_room(req.clone()).await?;
    assert_eq!(
        (retry.room_id.as_str(), retry.process_id),
        ("match-1", first.process_id)
    );
    assert_eq!(
        s.get_process(APP, first.process_id).await?.rooms_allocated,
        1,
        "a retry takes no slot"
    );
    for (other, what) in [
        (
            CreateRoom {
                region: "Tokyo".into(),
                ..req.clone()
            },
            "other region",
        ),
        (
            CreateRoom {
                room_config: "{}".into(),
                ..req.clone()
            },
            "other config",
        ),
    ] {
        assert!(
            matches!(s.create_room(other).await, Err(Error::AlreadyExists(_))),
            "{what}"
        );
    }
    s.destroy_room(APP, "match-1").await?;
    assert!(
        matches!(s.create_room(req).await, Err(Error::AlreadyExists(_))),
        "destroyed and retained"
    );
    assert_eq!(count(&s).await, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_room_id_raced_in_two_regions_is_placed_once() -> TestResult {
    for round in 0..200 {
        let s = Scheduler::builder()
            .regions(["Frankfurt", "Tokyo"])
            .backend(ManualBackend::automatic())
            .build()?;
        s.create_deployment(APP, deployment(4)).await?;
        let make = |region: &str| CreateRoom {
            room_id: Some("dup".into()),
            ..room_in(region)
        };
        let (a, b) = tokio::join!(
            tokio::spawn({
                let (s, r) = (s.clone(), make("Frankfurt"));
                async move { s.create_room(r).await }
            }),
            tokio::spawn({
                let (s, r) = (s.clone(), make("Tokyo"));
                async move { s.create_room(r).await }
            })
        );
        let outcomes = [a?, b?];
        assert_eq!(
            outcomes.iter().filter(|r| r.is_ok()).count(),
            1,
            "round {round}: {outcomes:?}"
        );
        assert!(outcomes
            .iter()
            .any(|r| matches!(r, Err(Error::AlreadyExists(_)))));
        let live: u32 = processes(&s).await.iter().map(|p| p.rooms_allocated).sum();
        assert_eq!(live, 1, "round {round}");
    }
    Ok(())
}

#[tokio::test]
async fn update_room_config_only_for_live_rooms() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(ManualBackend::automatic())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    let updated = s.update_room_config(APP, &r.room_id, "v2".into()).await?;
    assert_eq!(updated.room_config, "v2");
    assert_eq!(s.get_room(APP, &r.room_id).await?.room_config, "v2");
    assert!(matches!(
        s.update_room_config(APP, &r.room_id, "x".repeat(10_001))
            .await,
        Err(Error::InvalidArgument {
            field: "room_config",
            ..
        })
    ));
    s.destroy_room(APP, &r.room_id).await?;
    assert!(matches!(
        s.update_room_config(APP, &r.room_id, "v3".into()).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        s.connection_info(APP, &r.room_id).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn watch_follows_the_process_until_active_or_destroyed() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    let mut w = s.watch_connection_info(APP, &r.room_id).await?;
    let first = w.next().await.expect("current value");
    assert_eq!(
        (first.status, first.exposed_port.is_none()),
        (ConnectionStatus::Starting, true)
    );
    b.bind(r.process_id);
    let second = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await?
        .expect("active");
    assert_eq!(second.status, ConnectionStatus::Active);
    assert!(second.exposed_port.is_some_and(|p| p.port > 0));
    assert!(w.next().await.is_none(), "ends once ACTIVE");

    let r2 = s.create_room(room_in("Frankfurt")).await?; // lands on the running process
    let mut w2 = s.watch_connection_info(APP, &r2.room_id).await?;
    assert_eq!(
        w2.next().await.map(|c| c.status),
        Some(ConnectionStatus::Active)
    );
    assert!(w2.next().await.is_none());

    s.stop_process(APP, r.process_id).await?;
    assert!(
        s.watch_connection_info(APP, &r.room_id).await.is_err(),
        "destroyed rooms cannot be watched"
    );
    Ok(())
}

#[tokio::test]
async fn watch_ends_when_the_room_is_destroyed() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(ManualBackend::new())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    let mut w = s.watch_connection_info(APP, &r.room_id).await?;
    assert_eq!(
        w.next().await.map(|c| c.status),
        Some(ConnectionStatus::Starting)
    );
    s.destroy_room(APP, &r.room_id).await?;
    assert!(tokio::time::timeout(Duration::from_secs(5), w.next())
        .await?
        .is_none());
    Ok(())
}

#[tokio::test]
async fn shutdown_refuses_changes_but_serves_reads() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(ManualBackend::new())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    let mut w = s.watch_connection_info(APP, &r.room_id).await?;
    w.next().await;
    s.shutdown();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await?
            .is_none(),
        "watches end"
    );
    assert!(matches!(
        s.create_room(room_in("Frankfurt")).await,
        Err(Error::Unavailable(_))
    ));
    assert!(matches!(
        s.destroy_room(APP, &r.room_id).await,
        Err(Error::Unavailable(_))
    ));
    assert_eq!(
        s.get_room(APP, &r.room_id).await?.status,
        RoomStatus::Scheduling
    );
    Ok(())
}
