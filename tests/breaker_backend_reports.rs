//! Breaker (held up; kept as regression tests): backend reports that arrive twice, late or out
//! of order, and operations racing on one shard. SPEC §4: statuses only move forward; a late
//! or duplicate signal never moves a process backwards or counts a room twice. SPEC §7: no
//! count ever goes below zero or wraps.

mod support;

use roomsched::backend::ExitStatus;
use roomsched::{CreateRoom, Error, ProcessStatus, RoomStatus, Scheduler};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use support::*;

/// Reports in every bad order on four processes, with the region limited to 3 live processes
/// so that a miscounted live process shows as a wrong RESOURCE_EXHAUSTED (or none).
#[tokio::test(start_paused = true)]
async fn duplicate_late_and_out_of_order_reports_never_move_backwards() -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .max_processes(3)
        .start_timeout(Duration::from_secs(50))
        .build()?;
    s.create_deployment(APP, deployment(2)).await?;

    // A: bound twice with different ports: the first bind wins.
    let a = s.create_room(room_in("Frankfurt")).await?;
    b.bind(a.process_id);
    s.settle().await;
    let a1 = s.get_process(APP, a.process_id).await?;
    b.bind(a.process_id);
    s.settle().await;
    let a2 = s.get_process(APP, a.process_id).await?;
    assert_eq!(a2.status, ProcessStatus::Running);
    assert_eq!(
        (a2.started_at, a2.exposed_port.clone()),
        (a1.started_at, a1.exposed_port)
    );

    // B: exits (code 0) before it ever bound, then binds late, then exits again.
    let b_room = s
        .create_room(CreateRoom {
            room_id: Some("on-b".into()),
            ..room_in("Frankfurt")
        })
        .await?;
    assert_eq!(b_room.process_id, a.process_id, "A has a slot left");
    let pb = s.create_process(APP, "Frankfurt", None).await?.process_id;
    b.exit(pb, ExitStatus::Code(0));
    s.settle().await;
    b.bind(pb);
    b.exit(pb, ExitStatus::Code(3));
    s.settle().await;
    let pb_now = s.get_process(APP, pb).await?;
    assert_eq!(pb_now.status, ProcessStatus::Failed, "never bound: FAILED");
    assert!(pb_now.started_at.is_none() && pb_now.exposed_port.is_none());
    assert!(
        b.stops().iter().any(|(p, g)| *p == pb && g.is_zero()),
        "a bind after failing is killed"
    );

    // A exits by itself twice (crash, then a duplicate with another code): rooms destroyed
    // once, FAILED stays FAILED.
    b.exit(a.process_id, ExitStatus::Code(1));
    b.exit(a.process_id, ExitStatus::Code(0));
    s.settle().await;
    let a3 = s.get_process(APP, a.process_id).await?;
    assert_eq!(a3.status, ProcessStatus::Failed);
    assert_eq!(a3.summary_exit_reason, "exited with code 1");
    assert_eq!(a3.rooms_allocated, 0);
    assert_eq!(s.get_room(APP, "on-b").await?.status, RoomStatus::Destroyed);
    assert_eq!(s.list_inactive_rooms(APP, a.process_id).await?.len(), 2);
    assert!(matches!(
        s.destroy_room(APP, "on-b").await,
        Err(Error::NotFound(_))
    ));

    // C: stopped while STARTING, binds late (stopped again), exits twice.
    let pc = s.create_process(APP, "Frankfurt", None).await?.process_id;
    s.stop_process(APP, pc).await?;
    b.bind(pc);
    s.settle().await;
    assert_eq!(
        s.get_process(APP, pc).await?.status,
        ProcessStatus::Stopping
    );
    b.exit(pc, ExitStatus::Signal(15));
    b.exit(pc, ExitStatus::Signal(9));
    b.bind(pc);
    s.settle().await;
    let pc_now = s.get_process(APP, pc).await?;
    assert_eq!(pc_now.status, ProcessStatus::Stopped);
    assert_eq!(pc_now.summary_exit_reason, "stopped by request");

    // D: drained while RUNNING with a room, the room's exit report comes twice.
    let d = s.create_room(room_in("Frankfurt")).await?;
    b.bind(d.process_id);
    s.settle().await;
    s.drain_process(APP, d.process_id).await?;
    b.exit(d.process_id, ExitStatus::Code(0));
    b.exit(d.process_id, ExitStatus::Code(0));
    s.settle().await;
    let d_now = s.get_process(APP, d.process_id).await?;
    assert_eq!(d_now.status, ProcessStatus::Stopped);
    assert_eq!(d_now.rooms_allocated, 0);

    // A late start timeout for everything: nothing moves.
    tokio::time::sleep(Duration::from_secs(60)).await;
    s.settle().await;
    let before: Vec<_> = processes(&s)
        .await
        .into_iter()
        .map(|p| (p.process_id, p.status))
        .collect();
    assert!(before.iter().all(|(_, st)| !st.is_live()), "{before:?}");
    check_invariants(&s).await;

    // Every process is dead: exactly 3 live processes may start again, not 2 or 4.
    for _ in 0..3 {
        s.create_process(APP, "Frankfurt", None).await?;
    }
    assert!(matches!(
        s.create_process(APP, "Frankfurt", None).await,
        Err(Error::ResourceExhausted { .. })
    ));
    check_invariants(&s).await;
    Ok(())
}

/// DestroyRoom racing StopProcess (and a crash report) on the same rooms, many times: each
/// room is destroyed exactly once, and afterwards the counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destroy_room_racing_stop_process_counts_each_room_once() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(8)).await?;
    for round in 0..40 {
        let mut rooms = Vec::new();
        for _ in 0..8 {
            rooms.push(s.create_room(room_in("Frankfurt")).await?);
        }
        let pid = rooms[0].process_id;
        assert!(rooms.iter().all(|r| r.process_id == pid));
        s.settle().await;
        let mut tasks = Vec::new();
        for r in &rooms {
            let (s, id) = (s.clone(), r.room_id.clone());
            tasks.push(tokio::spawn(async move {
                match s.destroy_room(APP, &id).await {
                    Ok(()) => 1,
                    Err(Error::NotFound(_)) => 0,
                    Err(e) => panic!("destroy: {e}"),
                }
            }));
        }
        let stopper = {
            let s = s.clone();
            tokio::spawn(async move { s.stop_process(APP, pid).await })
        };
        if round % 2 == 0 {
            b.exit(pid, ExitStatus::Code(1));
        }
        let mut destroyed_by_call = 0;
        for t in tasks {
            destroyed_by_call += t.await?;
        }
        stopper.await??;
        s.settle().await;
        let p = s.get_process(APP, pid).await?;
        assert!(!p.status.is_live(), "round {round}: {:?}", p.status);
        assert_eq!(p.rooms_allocated, 0);
        assert!(s.list_active_rooms(APP, pid).await?.is_empty());
        let inactive = s.list_inactive_rooms(APP, pid).await?;
        assert_eq!(inactive.len(), 8, "round {round}: each room left once");
        let ids: HashSet<_> = inactive.iter().map(|r| r.room_id.clone()).collect();
        assert_eq!(ids.len(), 8);
        assert!(inactive.iter().all(|r| r.status == RoomStatus::Destroyed
            && r.allocations.len() == 1
            && r.allocations[0].unscheduled_at.is_some()));
        assert!(destroyed_by_call <= 8);
    }
    check_invariants(&s).await;
    Ok(())
}

/// One caller-chosen room id raced in one region with two different configs: exactly one
/// config wins, every call with the winning config gets the same placement (safe retry), every
/// call with the other config gets ALREADY_EXISTS, and exactly one slot is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_room_id_raced_in_one_region_with_two_configs() -> TestResult {
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(ManualBackend::automatic())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let s = Arc::new(s);
    for round in 0..30 {
        let id = format!("match-{round}");
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (s, id) = (Arc::clone(&s), id.clone());
            tasks.push(tokio::spawn(async move {
                let config = if i % 2 == 0 { "A" } else { "B" };
                let r = s
                    .create_room(CreateRoom {
                        room_id: Some(id),
                        room_config: config.into(),
                        ..room_in("Frankfurt")
                    })
                    .await;
                (config, r)
            }));
        }
        let mut ok = Vec::new();
        let mut exists = Vec::new();
        for t in tasks {
            match t.await? {
                (c, Ok(p)) => ok.push((c, p.process_id)),
                (c, Err(Error::AlreadyExists(_))) => exists.push(c),
                (_, Err(e)) => panic!("unexpected {e}"),
            }
        }
        let winner = ok[0].0;
        assert_eq!(
            ok.len(),
            8,
            "round {round}: all calls of the winning config succeed"
        );
        assert!(ok.iter().all(|(c, p)| *c == winner && *p == ok[0].1));
        assert!(exists.iter().all(|c| *c != winner) && exists.len() == 8);
        let room = s.get_room(APP, &id).await?;
        assert_eq!(room.room_config, winner);
    }
    let total: u32 = processes(&s).await.iter().map(|p| p.rooms_allocated).sum();
    assert_eq!(total, 30, "one slot per room id");
    check_invariants(&s).await;
    Ok(())
}
