//! Breaker: the per-process room lists have no paging, so for legal, ordinary states their
//! responses exceed the server's maximum message size (4 MiB) and the calls fail for good.
//! SPEC §3: ListInactiveRoomsForProcess returns "rooms that were on it and left (retention
//! applies)" — retention is 100,000 destroyed rooms by default — and ListActiveRoomsForProcess
//! returns "the rooms now on the process" (up to rooms_per_process = 10,000, each with up to
//! 10,000 bytes of room_config). Both must answer for every process.

mod common;

use common::*;
use roomsched::CreateRoom;

/// One long-lived process (rooms_per_process 1) that hosted 40,000 short rooms — well within
/// the retention of 100,000 destroyed rooms. Its inactive rooms can no longer be listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_rooms_of_a_long_lived_process_can_be_listed() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment("game", 1).await?;
    let first = s.create_room("game", "Frankfurt").await?;
    s.wait_running("game", &first.process_id).await?;
    s.destroy_room("game", &first.room_id).await?;
    // Churn through the library (same state as the server) to make it quick.
    for _ in 0..40_000 {
        let r = s
            .scheduler
            .create_room(CreateRoom {
                app_id: "game".into(),
                region: "Frankfurt".into(),
                ..Default::default()
            })
            .await?;
        assert_eq!(r.process_id.to_string(), first.process_id);
        s.scheduler.destroy_room("game", &r.room_id).await?;
    }
    let rooms = s.inactive_rooms("game", &first.process_id).await;
    let rooms = rooms.map_err(|e| format!("ListInactiveRoomsForProcess failed: {e}"))?;
    assert_eq!(rooms.len(), 40_001);
    Ok(())
}

/// A full process of rooms_per_process 10,000 whose rooms carry 600-byte configs (legal: up
/// to 10,000 bytes) — ListActiveRoomsForProcess cannot answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_rooms_of_a_full_large_process_can_be_listed() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment("game", 10_000).await?;
    let config = "x".repeat(600);
    let mut pid = None;
    for _ in 0..10_000 {
        let r = s
            .scheduler
            .create_room(CreateRoom {
                app_id: "game".into(),
                region: "Frankfurt".into(),
                room_config: config.clone(),
                ..Default::default()
            })
            .await?;
        assert_eq!(*pid.get_or_insert(r.process_id), r.process_id);
    }
    let pid = pid.ok_or("no room")?.to_string();
    let p = s.get_process("game", &pid).await?;
    assert_eq!(p.rooms_allocated, 10_000);
    let rooms = s.active_rooms("game", &pid).await;
    let rooms = rooms.map_err(|e| format!("ListActiveRoomsForProcess failed: {e}"))?;
    assert_eq!(
        rooms.len(),
        10_000,
        "rooms_allocated equals the listed rooms"
    );
    Ok(())
}
