//! Breaker (held up; kept as regression tests): WatchConnectionInfo clients that go away
//! mid-stream leave no task behind; a shutdown in the middle of a CreateRoom/DestroyRoom load
//! answers only OK or UNAVAILABLE, and every acknowledged room is a visible, counted room.

mod common;

use common::*;
use roomsched::grpc::pb;
use roomsched::{ProcessFilter, RoomStatus};
use std::collections::HashSet;
use std::time::Duration;
use tonic::Code;

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_disconnect_leave_no_task_behind() -> TestResult {
    let s = TestServer::start_with(TestConfig::default().never_ready()).await?;
    s.create_deployment("game", 4).await?;
    let room = s.create_room("game", "Frankfurt").await?;
    let watch = || async {
        let mut stream = s
            .rooms
            .clone()
            .watch_connection_info(pb::GetConnectionInfoRequest {
                app_id: "game".into(),
                room_id: room.room_id.clone(),
            })
            .await?
            .into_inner();
        let first = stream.message().await?.ok_or("no first message")?;
        assert_eq!(first.status(), pb::ConnectionStatus::Starting);
        TestResult::Ok(stream)
    };
    drop(watch().await?); // warm up the connection
    tokio::time::sleep(Duration::from_millis(100)).await;
    let baseline = alive_tasks();

    let mut streams = Vec::new();
    for _ in 0..200 {
        streams.push(watch().await?);
    }
    assert!(alive_tasks() >= baseline + 200, "one task per open watch");
    drop(streams);
    poll("watch tasks to end", DEADLINE, || async {
        Ok((alive_tasks() <= baseline + 2).then_some(()))
    })
    .await
    .map_err(|e| format!("{e}: {} tasks alive, {baseline} before", alive_tasks()))?;

    // The room is untouched and can still be watched and destroyed.
    assert_eq!(
        s.get_room("game", &room.room_id).await?.status(),
        pb::RoomStatus::Scheduling
    );
    let mut last = watch().await?;
    s.destroy_room("game", &room.room_id).await?;
    assert!(last.message().await?.is_none(), "ends when destroyed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_acknowledges_only_visible_rooms() -> TestResult {
    let mut s = TestServer::start().await?;
    s.create_deployment("game", 3).await?;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut rooms = s.rooms.clone();
        let region = ["Frankfurt", "Tokyo", "Sydney"][i % 3];
        tasks.push(tokio::spawn(async move {
            let mut created = Vec::new();
            let mut destroyed = Vec::new();
            let mut codes = Vec::new();
            for j in 0..10_000 {
                let r = rooms.create_room(room_request("game", region)).await;
                match r {
                    Ok(r) => {
                        let id = r.into_inner().room_id;
                        if j % 2 == 0 {
                            match rooms
                                .destroy_room(pb::DestroyRoomRequest {
                                    app_id: "game".into(),
                                    room_id: id.clone(),
                                })
                                .await
                            {
                                Ok(_) => destroyed.push(id.clone()),
                                Err(e) => codes.push(e.code()),
                            }
                        }
                        created.push(id);
                    }
                    Err(e) => {
                        codes.push(e.code());
                        if codes.len() > 3 {
                            break;
                        }
                    }
                }
            }
            (created, destroyed, codes)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.signal_shutdown();
    let mut created = Vec::new();
    let mut destroyed = HashSet::new();
    let mut cut_off = 0;
    for t in tasks {
        let (c, d, codes) = t.await?;
        for code in &codes {
            assert!(
                matches!(code, Code::Unavailable | Code::Cancelled | Code::Unknown),
                "only UNAVAILABLE (or a closed connection) during shutdown, got {code:?}"
            );
        }
        cut_off += codes.iter().filter(|c| **c != Code::Unavailable).count();
        created.extend(c);
        destroyed.extend(d);
    }
    s.join(Duration::from_secs(10)).await?;
    assert!(!created.is_empty());

    // Every acknowledged room is visible and live unless it was acknowledged destroyed.
    let sched = &s.scheduler;
    let mut live = HashSet::new();
    for id in &created {
        let room = sched.get_room("game", id).await?;
        if destroyed.contains(id) {
            assert_eq!(room.status, RoomStatus::Destroyed);
        } else if room.status != RoomStatus::Destroyed {
            live.insert(id.clone());
        }
    }
    let filter = ProcessFilter {
        app_id: "game".into(),
        ..Default::default()
    };
    let mut listed_rooms = HashSet::new();
    for p in sched.list_processes(&filter, 1000, None).await?.processes {
        let listed = sched.list_active_rooms("game", p.process_id).await?;
        assert_eq!(p.rooms_allocated as usize, listed.len());
        assert!(p.rooms_allocated <= p.rooms_per_process);
        listed_rooms.extend(listed.into_iter().map(|r| r.room_id));
    }
    assert!(
        live.is_subset(&listed_rooms),
        "acknowledged live rooms hold slots"
    );
    // A slot beyond the acknowledged rooms only for a call whose answer was cut off.
    assert!(
        listed_rooms.len() <= live.len() + cut_off,
        "{} taken slots, {} acknowledged live rooms, {cut_off} calls cut off",
        listed_rooms.len(),
        live.len()
    );
    Ok(())
}
