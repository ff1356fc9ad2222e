//! End-to-end behaviour of the gRPC service (SPEC §2–§6), against the real server with the
//! simulated backend: deployments, placement, rooms, connection info, processes, health,
//! reflection, and a burst of concurrent CreateRoom calls.

mod common;

use common::{
    deployment_request, expect_error, poll, room_request, TestConfig, TestResult, TestServer,
    DEADLINE,
};
use roomsched::grpc::pb;
use roomsched::grpc::pb::{ConnectionStatus, ProcessStatus, RoomStatus};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use tonic::Code;
use tonic_types::StatusExt;

const APP: &str = "api-app";

fn ts(t: &Option<prost_types::Timestamp>) -> Option<(i64, i32)> {
    t.as_ref().map(|t| (t.seconds, t.nanos))
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

async fn next_message<T>(stream: &mut tonic::Streaming<T>) -> TestResult<Option<T>> {
    Ok(tokio::time::timeout(DEADLINE, stream.message()).await??)
}

// ----- deployments -------------------------------------------------------------------------

#[tokio::test]
async fn deployments_count_up_per_app_and_list_newest_first() -> TestResult {
    let s = TestServer::start().await?;
    let mut deployments = s.deployments.clone();
    let req = pb::CreateDeploymentRequest {
        app_id: APP.into(),
        rooms_per_process: 8,
        transport_type: pb::TransportType::Udp as i32,
        container_port: 7777,
        additional_container_ports: vec![pb::ContainerPort {
            name: "voice".into(),
            port: 7778,
            transport_type: pb::TransportType::Tcp as i32,
        }],
        idle_timeout_enabled: true,
        env: vec![pb::EnvVar {
            name: "MODE".into(),
            value: "ranked".into(),
        }],
        command: vec!["./server".into(), "--port".into(), "{port}".into()],
        placement_strategy: pb::PlacementStrategy::FewestFree as i32,
    };
    let d1 = s.create_deployment_with(req.clone()).await?;
    assert_eq!(d1.deployment_id, 1);
    assert_eq!(d1.app_id, APP);
    assert_eq!(d1.rooms_per_process, 8);
    assert_eq!(d1.transport_type(), pb::TransportType::Udp);
    assert_eq!(d1.container_port, 7777);
    assert_eq!(
        d1.additional_container_ports,
        req.additional_container_ports
    );
    assert!(d1.idle_timeout_enabled);
    assert_eq!(d1.env, req.env);
    assert_eq!(d1.command, req.command);
    assert_eq!(d1.placement_strategy(), pb::PlacementStrategy::FewestFree);
    assert!(d1.created_at.is_some());

    let d2 = s.create_deployment(APP, 2).await?;
    let d3 = s.create_deployment(APP, 3).await?;
    assert_eq!((d2.deployment_id, d3.deployment_id), (2, 3));
    // Unset enums mean the defaults.
    assert_eq!(d2.placement_strategy(), pb::PlacementStrategy::MostFree);
    // Ids count per app.
    assert_eq!(s.create_deployment("other-app", 1).await?.deployment_id, 1);

    let got = deployments
        .get_deployment(pb::GetDeploymentRequest {
            app_id: APP.into(),
            deployment_id: 1,
        })
        .await?
        .into_inner();
    assert_eq!(got, d1);
    let latest = deployments
        .get_latest_deployment(pb::GetLatestDeploymentRequest { app_id: APP.into() })
        .await?
        .into_inner();
    assert_eq!(latest, d3);
    let list = s.list_deployments(APP).await?;
    assert_eq!(list, vec![d3, d2, d1]);
    assert_eq!(s.list_deployments("other-app").await?.len(), 1);
    assert!(s.list_deployments("unknown-app").await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn new_deployment_drains_processes_of_older_deployments() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment(APP, 4).await?;
    let room = s.create_room(APP, "Frankfurt").await?;
    let busy = s.wait_running(APP, &room.process_id).await?;
    let idle = s.create_process(APP, "Tokyo").await?;
    s.wait_running(APP, &idle.process_id).await?;
    // Another app's process is not touched.
    s.create_deployment("other-app", 4).await?;
    let other = s.create_room("other-app", "Frankfurt").await?;
    s.wait_running("other-app", &other.process_id).await?;

    let d2 = s.create_deployment(APP, 4).await?;
    assert_eq!(d2.deployment_id, 2);
    // The old process with a room drains (and keeps its room); the empty one has nothing to
    // wait for and stops.
    let drained = s
        .wait_status(APP, &busy.process_id, ProcessStatus::Draining, DEADLINE)
        .await?;
    assert_eq!(drained.rooms_allocated, 1);
    assert_eq!(
        s.get_room(APP, &room.room_id).await?.status(),
        RoomStatus::Active
    );
    s.wait_status(APP, &idle.process_id, ProcessStatus::Stopped, DEADLINE)
        .await?;
    assert_eq!(
        s.get_process("other-app", &other.process_id)
            .await?
            .status(),
        ProcessStatus::Running
    );

    // New rooms go to the new deployment, never to the draining process.
    let next = s.create_room(APP, "Frankfurt").await?;
    assert_ne!(next.process_id, busy.process_id);
    let p = s.get_process(APP, &next.process_id).await?;
    assert_eq!(p.deployment_id, 2);
    assert_eq!(
        s.get_process(APP, &busy.process_id).await?.rooms_allocated,
        1
    );

    // The draining process stops when its last room ends.
    s.destroy_room(APP, &room.room_id).await?;
    let stopped = s
        .wait_status(APP, &busy.process_id, ProcessStatus::Stopped, DEADLINE)
        .await?;
    assert_eq!(stopped.rooms_allocated, 0);
    assert!(stopped.stopping_at.is_some() && stopped.terminated_at.is_some());
    Ok(())
}

// ----- rooms ---------------------------------------------------------------------------------

#[tokio::test]
async fn create_room_lands_in_the_requested_region() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment(APP, 4).await?;
    for region in ["Frankfurt", "Tokyo", "Sydney"] {
        let mut req = room_request(APP, region);
        req.room_config = format!("{{\"map\":\"{region}\"}}");
        let placed = s.create_room_with(req).await?;
        // A generated id: 13 lowercase base-36 characters.
        assert_eq!(placed.room_id.len(), 13, "{:?}", placed.room_id);
        assert!(placed
            .room_id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        let p = s.get_process(APP, &placed.process_id).await?;
        assert_eq!(p.region, region);
        assert_eq!(p.app_id, APP);
        assert_eq!(p.deployment_id, 1);
        assert_eq!(p.rooms_per_process, 4);
        assert_eq!(p.rooms_allocated, 1);
        assert_eq!(
            s.count_processes_where(APP, &[], &[region]).await?,
            1,
            "{region}"
        );
    }
    assert_eq!(s.count_processes(APP).await?, 3);
    Ok(())
}

#[tokio::test]
async fn get_room_shows_placement_and_allocation_history() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment(APP, 4).await?;
    let mut req = room_request(APP, "Frankfurt");
    req.room_id = "history-room".into();
    req.room_config = "{\"mode\":\"duel\"}".into();
    let placed = s.create_room_with(req).await?;
    assert_eq!(placed.room_id, "history-room");
    s.wait_running(APP, &placed.process_id).await?;

    let room = s.get_room(APP, "history-room").await?;
    assert_eq!(room.app_id, APP);
    assert_eq!(room.room_config, "{\"mode\":\"duel\"}");
    assert_eq!(room.status(), RoomStatus::Active);
    let current = room
        .current_allocation
        .clone()
        .ok_or("no current allocation")?;
    assert_eq!(current.process_id, placed.process_id);
    assert!(is_uuid(&current.room_allocation_id));
    assert!(current.scheduled_at.is_some());
    assert!(current.unscheduled_at.is_none());
    assert_eq!(room.allocations, vec![current.clone()]);

    let updated = s
        .rooms
        .clone()
        .update_room_config(pb::UpdateRoomConfigRequest {
            app_id: APP.into(),
            room_id: "history-room".into(),
            room_config: "{\"mode\":\"ffa\"}".into(),
        })
        .await?
        .into_inner();
    assert_eq!(updated.room_config, "{\"mode\":\"ffa\"}");
    assert_eq!(updated.allocations, vec![current.clone()]);

    s.destroy_room(APP, "history-room").await?;
    let room = s.get_room(APP, "history-room").await?;
    assert_eq!(room.status(), RoomStatus::Destroyed);
    assert!(room.current_allocation.is_none());
    assert_eq!(room.room_config, "{\"mode\":\"ffa\"}");
    assert_eq!(room.allocations.len(), 1);
    let past = &room.allocations[0];
    assert_eq!(past.room_allocation_id, current.room_allocation_id);
    assert_eq!(past.scheduled_at, current.scheduled_at);
    let left = ts(&past.unscheduled_at).ok_or("destroyed room without unscheduled_at")?;
    assert!(left >= ts(&past.scheduled_at).ok_or("no scheduled_at")?);
    Ok(())
}

#[tokio::test]
async fn room_is_placed_again_when_its_process_never_binds() -> TestResult {
    let cfg = TestConfig::default()
        .never_ready()
        .start_timeout(Duration::from_millis(100));
    let s = TestServer::start_with(cfg).await?;
    s.create_deployment(APP, 4).await?;
    let placed = s.create_room(APP, "Frankfurt").await?;
    assert_eq!(placed.status(), RoomStatus::Scheduling);
    // Three attempts, each on a new process that never binds; then the room is destroyed.
    let room = poll("the room to be destroyed", DEADLINE, || async {
        let r = s.get_room(APP, &placed.room_id).await?;
        Ok((r.status() == RoomStatus::Destroyed).then_some(r))
    })
    .await?;
    assert_eq!(room.allocations.len(), 3, "{:?}", room.allocations);
    assert_eq!(room.allocations[0].process_id, placed.process_id);
    let pids: HashSet<&str> = room
        .allocations
        .iter()
        .map(|a| a.process_id.as_str())
        .collect();
    assert_eq!(pids.len(), 3);
    for a in &room.allocations {
        assert!(a.unscheduled_at.is_some());
        let p = s.get_process(APP, &a.process_id).await?;
        assert_eq!(p.status(), ProcessStatus::Failed);
        assert_eq!(p.rooms_allocated, 0);
        assert!(p.started_at.is_none());
        assert!(p.terminated_at.is_some());
        assert!(
            p.summary_exit_reason.contains("7777"),
            "{:?}",
            p.summary_exit_reason
        );
    }
    assert_eq!(s.count_processes(APP).await?, 3);
    Ok(())
}

#[tokio::test]
async fn active_rooms_equal_rooms_allocated_and_destroyed_rooms_become_inactive() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment(APP, 3).await?;
    let mut by_process: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for _ in 0..5 {
        let r = s.create_room(APP, "Frankfurt").await?;
        by_process.entry(r.process_id).or_default().push(r.room_id);
    }
    // 5 rooms, 3 per process: two processes, full and 2/3.
    let mut sizes: Vec<usize> = by_process.values().map(Vec::len).collect();
    sizes.sort();
    assert_eq!(sizes, vec![2, 3]);
    for (pid, rooms) in &by_process {
        let p = s.get_process(APP, pid).await?;
        let active = s.active_rooms(APP, pid).await?;
        assert_eq!(p.rooms_allocated as usize, active.len());
        let ids: Vec<String> = active.iter().map(|r| r.room_id.clone()).collect();
        assert_eq!(&ids, rooms);
        assert!(s.inactive_rooms(APP, pid).await?.is_empty());
    }

    let (pid, rooms) = by_process
        .iter()
        .find(|(_, r)| r.len() == 3)
        .ok_or("no full process")?;
    s.destroy_room(APP, &rooms[1]).await?;
    let p = s.get_process(APP, pid).await?;
    let active = s.active_rooms(APP, pid).await?;
    assert_eq!(p.rooms_allocated, 2);
    assert_eq!(active.len(), 2);
    assert!(active.iter().all(|r| r.room_id != rooms[1]));
    let inactive = s.inactive_rooms(APP, pid).await?;
    assert_eq!(inactive.len(), 1);
    assert_eq!(inactive[0].room_id, rooms[1]);
    assert_eq!(inactive[0].status(), RoomStatus::Destroyed);
    assert!(inactive[0].allocations[0].unscheduled_at.is_some());

    // The freed slot is taken again: the next room fills the process with most free slots
    // (both have one now: 2/3 each), and no third process starts.
    s.create_room(APP, "Frankfurt").await?;
    s.create_room(APP, "Frankfurt").await?;
    assert_eq!(s.count_processes(APP).await?, 2);
    for pid in by_process.keys() {
        let p = s.get_process(APP, pid).await?;
        assert_eq!(p.rooms_allocated, 3);
        assert_eq!(s.active_rooms(APP, pid).await?.len(), 3);
    }
    Ok(())
}

#[tokio::test]
async fn placement_follows_the_deployment_strategy() -> TestResult {
    let s = TestServer::start().await?;
    // MOST_FREE (the default): a new room goes to the process with the most free slots.
    s.create_deployment(APP, 4).await?;
    let first = s.create_room(APP, "Frankfurt").await?;
    for _ in 0..2 {
        assert_eq!(
            s.create_room(APP, "Frankfurt").await?.process_id,
            first.process_id
        );
    }
    s.wait_running(APP, &first.process_id).await?;
    let empty = s.create_process(APP, "Frankfurt").await?;
    s.wait_running(APP, &empty.process_id).await?;
    for _ in 0..2 {
        // 3/4 vs 0/4, then 3/4 vs 1/4.
        assert_eq!(
            s.create_room(APP, "Frankfurt").await?.process_id,
            empty.process_id
        );
    }

    // FEWEST_FREE: pack the fullest process that still has a slot.
    let mut req = deployment_request("packing-app", 4);
    req.placement_strategy = pb::PlacementStrategy::FewestFree as i32;
    s.create_deployment_with(req).await?;
    let a = s.create_room("packing-app", "Tokyo").await?;
    s.wait_running("packing-app", &a.process_id).await?;
    let b = s.create_process("packing-app", "Tokyo").await?;
    s.wait_running("packing-app", &b.process_id).await?;
    for _ in 0..3 {
        assert_eq!(
            s.create_room("packing-app", "Tokyo").await?.process_id,
            a.process_id
        );
    }
    assert_eq!(
        s.create_room("packing-app", "Tokyo").await?.process_id,
        b.process_id
    );
    Ok(())
}

// ----- connection info -------------------------------------------------------------------------

fn two_port_deployment() -> pb::CreateDeploymentRequest {
    let mut req = deployment_request(APP, 4);
    req.transport_type = pb::TransportType::Udp as i32;
    req.additional_container_ports = vec![
        pb::ContainerPort {
            name: "voice".into(),
            port: 7778,
            transport_type: pb::TransportType::Tcp as i32,
        },
        pb::ContainerPort {
            name: "admin".into(),
            port: 7779,
            transport_type: pb::TransportType::Tls as i32,
        },
    ];
    req
}

#[tokio::test]
async fn connection_info_is_starting_then_active() -> TestResult {
    // Processes bind after 500 ms; the first reads below happen well before that.
    let cfg = TestConfig::default().start_delay(Duration::from_millis(500));
    let s = TestServer::start_with(cfg).await?;
    s.create_deployment_with(two_port_deployment()).await?;
    let placed = s.create_room(APP, "Frankfurt").await?;
    assert_eq!(placed.status(), RoomStatus::Scheduling);
    assert!(placed.exposed_port.is_none());

    let info = s.connection_info(APP, &placed.room_id).await?;
    assert_eq!(info.status(), ConnectionStatus::Starting);
    assert_eq!(info.room_id, placed.room_id);
    assert_eq!(info.process_id, placed.process_id);
    assert!(info.exposed_port.is_none());
    // While STARTING, the process already lists its first room.
    let p = s.get_process(APP, &placed.process_id).await?;
    assert_eq!(p.status(), ProcessStatus::Starting);
    assert!(p.exposed_port.is_none() && p.started_at.is_none());
    let active = s.active_rooms(APP, &placed.process_id).await?;
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].status(), RoomStatus::Scheduling);

    let info = poll("connection info to be ACTIVE", DEADLINE, || async {
        let info = s.connection_info(APP, &placed.room_id).await?;
        Ok((info.status() == ConnectionStatus::Active).then_some(info))
    })
    .await?;
    let port = info
        .exposed_port
        .clone()
        .ok_or("ACTIVE without exposed_port")?;
    assert_eq!(port.host, "127.0.0.1");
    assert_eq!(port.name, "default");
    assert!((1..=65_535).contains(&port.port));
    assert_eq!(port.transport_type(), pb::TransportType::Udp);
    let names: Vec<(&str, pb::TransportType)> = info
        .additional_exposed_ports
        .iter()
        .map(|p| (p.name.as_str(), p.transport_type()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("voice", pb::TransportType::Tcp),
            ("admin", pb::TransportType::Tls)
        ]
    );

    let p = s.get_process(APP, &placed.process_id).await?;
    assert_eq!(p.status(), ProcessStatus::Running);
    assert_eq!(p.exposed_port.as_ref(), Some(&port));
    assert_eq!(p.additional_exposed_ports, info.additional_exposed_ports);
    assert!(ts(&p.started_at) >= ts(&p.created_at));
    assert_eq!(
        s.get_room(APP, &placed.room_id).await?.status(),
        RoomStatus::Active
    );
    // A room placed on the RUNNING process is ACTIVE at once, with its ports.
    let second = s.create_room(APP, "Frankfurt").await?;
    assert_eq!(second.process_id, placed.process_id);
    assert_eq!(second.status(), RoomStatus::Active);
    assert_eq!(second.exposed_port, Some(port));
    assert_eq!(second.additional_exposed_ports.len(), 2);
    Ok(())
}

#[tokio::test]
async fn watch_connection_info_streams_starting_then_active_then_ends() -> TestResult {
    // Processes bind after 500 ms; the first reads below happen well before that.
    let cfg = TestConfig::default().start_delay(Duration::from_millis(500));
    let s = TestServer::start_with(cfg).await?;
    s.create_deployment(APP, 4).await?;
    let placed = s.create_room(APP, "Frankfurt").await?;
    let mut stream = s
        .rooms
        .clone()
        .watch_connection_info(pb::GetConnectionInfoRequest {
            app_id: APP.into(),
            room_id: placed.room_id.clone(),
        })
        .await?
        .into_inner();
    let first = next_message(&mut stream)
        .await?
        .ok_or("stream ended at once")?;
    assert_eq!(first.status(), ConnectionStatus::Starting);
    assert_eq!(first.process_id, placed.process_id);
    assert!(first.exposed_port.is_none());
    let second = next_message(&mut stream)
        .await?
        .ok_or("stream ended before ACTIVE")?;
    assert_eq!(second.status(), ConnectionStatus::Active);
    assert!(second.exposed_port.is_some());
    assert!(
        next_message(&mut stream).await?.is_none(),
        "the stream should end after ACTIVE"
    );

    // Watching a room that is already ACTIVE: one message, then the end.
    let mut stream = s
        .rooms
        .clone()
        .watch_connection_info(pb::GetConnectionInfoRequest {
            app_id: APP.into(),
            room_id: placed.room_id.clone(),
        })
        .await?
        .into_inner();
    let only = next_message(&mut stream).await?.ok_or("no current value")?;
    assert_eq!(only, second);
    assert!(next_message(&mut stream).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn watch_connection_info_ends_when_the_room_is_destroyed() -> TestResult {
    // The process stays STARTING for the whole test.
    let cfg = TestConfig::default().start_delay(Duration::from_secs(60));
    let s = TestServer::start_with(cfg).await?;
    s.create_deployment(APP, 4).await?;
    let placed = s.create_room(APP, "Frankfurt").await?;
    let mut stream = s
        .rooms
        .clone()
        .watch_connection_info(pb::GetConnectionInfoRequest {
            app_id: APP.into(),
            room_id: placed.room_id.clone(),
        })
        .await?
        .into_inner();
    let first = next_message(&mut stream)
        .await?
        .ok_or("stream ended at once")?;
    assert_eq!(first.status(), ConnectionStatus::Starting);
    // Another room on the same process changes nothing the watcher sees.
    s.create_room(APP, "Frankfurt").await?;
    s.destroy_room(APP, &placed.room_id).await?;
    assert!(
        next_message(&mut stream).await?.is_none(),
        "the stream should end when the room is destroyed"
    );
    Ok(())
}

#[tokio::test]
async fn watch_connection_info_ends_when_the_scheduler_shuts_down() -> TestResult {
    let cfg = TestConfig::default().start_delay(Duration::from_secs(60));
    let s = TestServer::start_with(cfg).await?;
    s.create_deployment(APP, 4).await?;
    let placed = s.create_room(APP, "Frankfurt").await?;
    let mut stream = s
        .rooms
        .clone()
        .watch_connection_info(pb::GetConnectionInfoRequest {
            app_id: APP.into(),
            room_id: placed.room_id.clone(),
        })
        .await?
        .into_inner();
    let first = next_message(&mut stream)
        .await?
        .ok_or("stream ended at once")?;
    assert_eq!(first.status(), ConnectionStatus::Starting);
    s.scheduler.shutdown();
    assert!(
        next_message(&mut stream).await?.is_none(),
        "the stream should end when the scheduler shuts down"
    );
    Ok(())
}

// ----- processes -------------------------------------------------------------------------------

#[tokio::test]
async fn list_processes_is_newest_first_with_paging() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment(APP, 4).await?;
    let mut created = Vec::new();
    for region in ["Frankfurt", "Tokyo", "Frankfurt", "Sydney", "Tokyo"] {
        created.push(s.create_process(APP, region).await?.process_id);
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    let mut processes = s.processes.clone();
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = processes
            .list_processes(pb::ListProcessesRequest {
                app_id: APP.into(),
                page_size: 2,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        pages.push(page.processes.len());
        seen.extend(page.processes);
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages.len() < 10, "paging does not end");
        page_token = page.next_page_token;
    }
    assert_eq!(pages, vec![2, 2, 1]);
    let ids: Vec<String> = seen.iter().map(|p| p.process_id.clone()).collect();
    assert_eq!(ids, newest_first);
    for pair in seen.windows(2) {
        assert!(ts(&pair[0].created_at) >= ts(&pair[1].created_at));
    }

    // Default page size returns everything at once; a page of exactly what is left has no
    // next token.
    let all = processes
        .list_processes(pb::ListProcessesRequest {
            app_id: APP.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(all.processes.len(), 5);
    assert!(all.next_page_token.is_empty());
    let exact = processes
        .list_processes(pb::ListProcessesRequest {
            app_id: APP.into(),
            page_size: 5,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(exact.processes.len(), 5);
    assert!(exact.next_page_token.is_empty());

    // A token that ListProcesses did not hand out.
    for garbage in ["garbage", "1.2", "%%%", "-5.not-a-uuid"] {
        expect_error(
            processes
                .list_processes(pb::ListProcessesRequest {
                    app_id: APP.into(),
                    page_size: 2,
                    page_token: garbage.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            &["page_token"],
        )
        .map_err(|e| format!("page_token {garbage:?}: {e}"))?;
    }
    // An app with no process lists nothing.
    let none = processes
        .list_processes(pb::ListProcessesRequest {
            app_id: "empty-app".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(none.processes.is_empty() && none.next_page_token.is_empty());
    Ok(())
}

#[tokio::test]
async fn list_and_count_processes_filter_by_status_and_region() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment(APP, 4).await?;
    let f1 = s.create_process(APP, "Frankfurt").await?;
    let f2 = s.create_process(APP, "Frankfurt").await?;
    let t1 = s.create_process(APP, "Tokyo").await?;
    for p in [&f1, &f2, &t1] {
        s.wait_running(APP, &p.process_id).await?;
    }
    s.processes
        .clone()
        .stop_process(pb::StopProcessRequest {
            app_id: APP.into(),
            process_id: f2.process_id.clone(),
        })
        .await?;
    s.wait_status(APP, &f2.process_id, ProcessStatus::Stopped, DEADLINE)
        .await?;

    let list = |statuses: Vec<ProcessStatus>, regions: Vec<&str>| {
        let mut client = s.processes.clone();
        let req = pb::ListProcessesRequest {
            app_id: APP.into(),
            statuses: statuses.iter().map(|s| *s as i32).collect(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        };
        async move {
            let mut ids: Vec<String> = client
                .list_processes(req)
                .await?
                .into_inner()
                .processes
                .into_iter()
                .map(|p| p.process_id)
                .collect();
            ids.sort();
            TestResult::Ok(ids)
        }
    };
    let sorted = |v: &[&pb::Process]| {
        let mut ids: Vec<String> = v.iter().map(|p| p.process_id.clone()).collect();
        ids.sort();
        ids
    };

    assert_eq!(list(vec![], vec![]).await?, sorted(&[&f1, &f2, &t1]));
    assert_eq!(
        list(vec![ProcessStatus::Running], vec![]).await?,
        sorted(&[&f1, &t1])
    );
    assert_eq!(
        list(vec![ProcessStatus::Stopped], vec![]).await?,
        sorted(&[&f2])
    );
    assert_eq!(
        list(
            vec![ProcessStatus::Running, ProcessStatus::Stopped],
            vec!["Frankfurt"]
        )
        .await?,
        sorted(&[&f1, &f2])
    );
    assert_eq!(list(vec![], vec!["Tokyo"]).await?, sorted(&[&t1]));
    assert!(list(vec![ProcessStatus::Failed], vec![]).await?.is_empty());
    assert!(list(vec![], vec!["Sydney"]).await?.is_empty());

    assert_eq!(s.count_processes(APP).await?, 3);
    assert_eq!(
        s.count_processes_where(APP, &[ProcessStatus::Running], &[])
            .await?,
        2
    );
    assert_eq!(
        s.count_processes_where(APP, &[ProcessStatus::Running], &["Frankfurt"])
            .await?,
        1
    );
    assert_eq!(
        s.count_processes_where(APP, &[ProcessStatus::Starting], &[])
            .await?,
        0
    );
    assert_eq!(s.count_processes("unknown-app").await?, 0);

    // Unknown regions and unspecified statuses are refused.
    expect_error(
        s.processes
            .clone()
            .count_processes(pb::CountProcessesRequest {
                app_id: APP.into(),
                statuses: vec![],
                regions: vec!["Atlantis".into()],
            })
            .await,
        Code::InvalidArgument,
        &["region"],
    )?;
    expect_error(
        s.processes
            .clone()
            .list_processes(pb::ListProcessesRequest {
                app_id: APP.into(),
                statuses: vec![ProcessStatus::Unspecified as i32],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["statuses"],
    )?;
    Ok(())
}

#[tokio::test]
async fn process_filters_are_sets() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment(APP, 4).await?;
    let f = s.create_process(APP, "Frankfurt").await?;
    let t = s.create_process(APP, "Tokyo").await?;
    for p in [&f, &t] {
        s.wait_running(APP, &p.process_id).await?;
    }
    // Naming a region or a status twice matches the same processes, once each.
    assert_eq!(
        s.count_processes_where(APP, &[ProcessStatus::Running, ProcessStatus::Running], &[])
            .await?,
        2
    );
    let listed = |regions: &[&str]| {
        let mut client = s.processes.clone();
        let req = pb::ListProcessesRequest {
            app_id: APP.into(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        };
        async move {
            let ids: Vec<String> = client
                .list_processes(req)
                .await?
                .into_inner()
                .processes
                .into_iter()
                .map(|p| p.process_id)
                .collect();
            TestResult::Ok(ids)
        }
    };
    assert_eq!(
        listed(&["Tokyo", "Tokyo"]).await?,
        vec![t.process_id.clone()]
    );
    assert_eq!(
        listed(&["Tokyo", "Frankfurt", "Tokyo"]).await?,
        vec![t.process_id.clone(), f.process_id.clone()]
    );
    assert_eq!(
        s.count_processes_where(APP, &[], &["Frankfurt", "Frankfurt"])
            .await?,
        1
    );
    assert_eq!(
        s.count_processes_where(
            APP,
            &[ProcessStatus::Running],
            &["Tokyo", "Frankfurt", "Tokyo"]
        )
        .await?,
        2
    );
    Ok(())
}

#[tokio::test]
async fn create_process_prewarms_a_process_that_takes_the_next_room() -> TestResult {
    let cfg = TestConfig::default().start_delay(Duration::from_millis(100));
    let s = TestServer::start_with(cfg).await?;
    s.create_deployment(APP, 4).await?;
    let p = s.create_process(APP, "Tokyo").await?;
    assert!(is_uuid(&p.process_id));
    assert_eq!(p.status(), ProcessStatus::Starting);
    assert_eq!(p.region, "Tokyo");
    assert_eq!(p.rooms_allocated, 0);
    assert!(p.created_at.is_some() && p.started_at.is_none());
    assert!(p.exposed_port.is_none());
    assert!(p.summary_exit_reason.is_empty());
    let running = s.wait_running(APP, &p.process_id).await?;
    assert!(running.started_at.is_some());
    assert_eq!(
        running.exposed_port.as_ref().map(|e| e.name.as_str()),
        Some("default")
    );
    let placed = s.create_room(APP, "Tokyo").await?;
    assert_eq!(placed.process_id, p.process_id);
    assert_eq!(placed.status(), RoomStatus::Active);
    assert_eq!(s.count_processes(APP).await?, 1);
    Ok(())
}

#[tokio::test]
async fn drain_process_takes_no_new_rooms_and_stops_after_its_last_room() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment(APP, 4).await?;
    let a = s.create_room(APP, "Frankfurt").await?;
    let b = s.create_room(APP, "Frankfurt").await?;
    assert_eq!(a.process_id, b.process_id);
    s.wait_running(APP, &a.process_id).await?;

    let drained = s
        .processes
        .clone()
        .drain_process(pb::DrainProcessRequest {
            app_id: APP.into(),
            process_id: a.process_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(drained.status(), ProcessStatus::Draining);
    assert_eq!(drained.rooms_allocated, 2);
    // Its rooms stay playable.
    assert_eq!(
        s.connection_info(APP, &a.room_id).await?.status(),
        ConnectionStatus::Active
    );
    // A new room goes elsewhere.
    let c = s.create_room(APP, "Frankfurt").await?;
    assert_ne!(c.process_id, a.process_id);
    assert_eq!(s.get_process(APP, &a.process_id).await?.rooms_allocated, 2);

    s.destroy_room(APP, &a.room_id).await?;
    assert_eq!(
        s.get_process(APP, &a.process_id).await?.status(),
        ProcessStatus::Draining
    );
    s.destroy_room(APP, &b.room_id).await?;
    let stopped = s
        .wait_status(APP, &a.process_id, ProcessStatus::Stopped, DEADLINE)
        .await?;
    assert_eq!(stopped.rooms_allocated, 0);
    assert!(stopped.terminated_at.is_some());
    assert_eq!(s.inactive_rooms(APP, &a.process_id).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn drain_process_while_starting_takes_it_out_of_placement_at_once() -> TestResult {
    // Processes bind after 1 s: ample time for the calls below to see them STARTING.
    let cfg = TestConfig::default().start_delay(Duration::from_secs(1));
    let s = TestServer::start_with(cfg).await?;
    s.create_deployment(APP, 4).await?;
    let a = s.create_room(APP, "Frankfurt").await?;
    let empty = s.create_process(APP, "Tokyo").await?;
    let mut processes = s.processes.clone();
    for pid in [&a.process_id, &empty.process_id] {
        let p = processes
            .drain_process(pb::DrainProcessRequest {
                app_id: APP.into(),
                process_id: pid.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(p.status(), ProcessStatus::Starting, "{pid}");
    }
    // Neither takes a new room, although both have free slots.
    let b = s.create_room(APP, "Frankfurt").await?;
    assert_ne!(b.process_id, a.process_id);
    let c = s.create_room(APP, "Tokyo").await?;
    assert_ne!(c.process_id, empty.process_id);
    // Once bound: the one with a room drains, the empty one stops.
    let drained = s
        .wait_status(APP, &a.process_id, ProcessStatus::Draining, DEADLINE)
        .await?;
    assert!(drained.started_at.is_some());
    assert_eq!(drained.rooms_allocated, 1);
    assert_eq!(
        s.get_room(APP, &a.room_id).await?.status(),
        RoomStatus::Active
    );
    s.wait_status(APP, &empty.process_id, ProcessStatus::Stopped, DEADLINE)
        .await?;
    Ok(())
}

#[tokio::test]
async fn stop_process_destroys_its_rooms_and_is_harmless_twice() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment(APP, 4).await?;
    let a = s.create_room(APP, "Frankfurt").await?;
    let b = s.create_room(APP, "Frankfurt").await?;
    assert_eq!(a.process_id, b.process_id);
    s.wait_running(APP, &a.process_id).await?;
    let stop = pb::StopProcessRequest {
        app_id: APP.into(),
        process_id: a.process_id.clone(),
    };
    let mut processes = s.processes.clone();
    let p = processes.stop_process(stop.clone()).await?.into_inner();
    assert!(
        matches!(p.status(), ProcessStatus::Stopping | ProcessStatus::Stopped),
        "{:?}",
        p.status()
    );
    assert_eq!(p.rooms_allocated, 0);
    assert!(p.stopping_at.is_some());
    let again = processes.stop_process(stop.clone()).await?.into_inner();
    assert!(matches!(
        again.status(),
        ProcessStatus::Stopping | ProcessStatus::Stopped
    ));
    assert_eq!(again.stopping_at, p.stopping_at);

    let stopped = s
        .wait_status(APP, &a.process_id, ProcessStatus::Stopped, DEADLINE)
        .await?;
    assert_eq!(stopped.summary_exit_reason, "stopped by request");
    assert_eq!(stopped.stopping_at, p.stopping_at);
    assert!(ts(&stopped.terminated_at) >= ts(&stopped.stopping_at));
    assert_eq!(stopped.rooms_allocated, 0);
    // Stopping a stopped process is harmless too, and changes nothing.
    let third = processes.stop_process(stop).await?.into_inner();
    assert_eq!(third, stopped);

    for room in [&a, &b] {
        let r = s.get_room(APP, &room.room_id).await?;
        assert_eq!(r.status(), RoomStatus::Destroyed);
        assert!(r.current_allocation.is_none());
        assert!(r.allocations[0].unscheduled_at.is_some());
        expect_error(
            s.connection_info(APP, &room.room_id).await,
            Code::NotFound,
            &[&room.room_id],
        )?;
        // Destroyed by the stop: a late DestroyRoom finds nothing and frees nothing.
        expect_error(
            s.destroy_room(APP, &room.room_id).await,
            Code::NotFound,
            &[&room.room_id],
        )?;
    }
    assert_eq!(s.get_process(APP, &a.process_id).await?, stopped);
    assert!(s.active_rooms(APP, &a.process_id).await?.is_empty());
    let inactive: HashSet<String> = s
        .inactive_rooms(APP, &a.process_id)
        .await?
        .into_iter()
        .map(|r| r.room_id)
        .collect();
    assert_eq!(
        inactive,
        HashSet::from([a.room_id.clone(), b.room_id.clone()])
    );

    // The next room starts a new process.
    let c = s.create_room(APP, "Frankfurt").await?;
    assert_ne!(c.process_id, a.process_id);
    Ok(())
}

#[tokio::test]
async fn stop_process_works_while_starting() -> TestResult {
    let cfg = TestConfig::default().start_delay(Duration::from_secs(60));
    let s = TestServer::start_with(cfg).await?;
    s.create_deployment(APP, 4).await?;
    let room = s.create_room(APP, "Frankfurt").await?;
    let p = s
        .processes
        .clone()
        .stop_process(pb::StopProcessRequest {
            app_id: APP.into(),
            process_id: room.process_id.clone(),
        })
        .await?
        .into_inner();
    assert!(matches!(
        p.status(),
        ProcessStatus::Stopping | ProcessStatus::Stopped
    ));
    let stopped = s
        .wait_status(APP, &room.process_id, ProcessStatus::Stopped, DEADLINE)
        .await?;
    assert_eq!(stopped.summary_exit_reason, "stopped by request");
    assert!(stopped.started_at.is_none());
    assert_eq!(
        s.get_room(APP, &room.room_id).await?.status(),
        RoomStatus::Destroyed
    );
    Ok(())
}

// ----- health, reflection, unimplemented -----------------------------------------------------

#[tokio::test]
async fn health_is_serving_and_not_serving_after_shutdown() -> TestResult {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let mut s = TestServer::start().await?;
    let mut health = HealthClient::new(s.channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in [
        "",
        "roomsched.v1.RoomService",
        "roomsched.v1.ProcessService",
        "roomsched.v1.DeploymentService",
    ] {
        let r = health.check(check(service)).await?.into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    expect_error(
        health.check(check("no.such.Service")).await,
        Code::NotFound,
        &[],
    )?;

    let mut watch = health
        .watch(check("roomsched.v1.RoomService"))
        .await?
        .into_inner();
    let first = next_message(&mut watch)
        .await?
        .ok_or("health watch ended")?;
    assert_eq!(first.status(), ServingStatus::Serving);
    s.signal_shutdown();
    let next = next_message(&mut watch)
        .await?
        .ok_or("health watch ended before NOT_SERVING")?;
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(watch);
    s.join(DEADLINE).await?;
    // The server is gone: a probe gets no SERVING.
    let after = tokio::time::timeout(DEADLINE, health.check(check(""))).await?;
    match after {
        Ok(r) => assert_eq!(r.into_inner().status(), ServingStatus::NotServing),
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn reflection_lists_the_roomsched_services() -> TestResult {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let s = TestServer::start().await?;
    let mut client = ServerReflectionClient::new(s.channel.clone());
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "roomsched.v1.RoomService".into(),
            )),
        },
    ];
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await?
        .into_inner();

    let listed = next_message(&mut stream)
        .await?
        .ok_or("no reflection answer")?;
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        return Err(format!("unexpected answer: {listed:?}").into());
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "roomsched.v1.RoomService",
        "roomsched.v1.ProcessService",
        "roomsched.v1.DeploymentService",
        "roomsched.v1.AppService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(expected), "{expected} not in {names:?}");
    }

    let file = next_message(&mut stream)
        .await?
        .ok_or("no descriptor answer")?;
    let Some(MessageResponse::FileDescriptorResponse(fds)) = file.message_response else {
        return Err(format!("unexpected answer: {file:?}").into());
    };
    assert!(!fds.file_descriptor_proto.is_empty());
    let decoded = fds
        .file_descriptor_proto
        .iter()
        .map(|b| <prost_types::FileDescriptorProto as prost::Message>::decode(b.as_slice()))
        .collect::<Result<Vec<_>, _>>()?;
    let ours = decoded
        .iter()
        .find(|f| f.package() == "roomsched.v1")
        .ok_or("no roomsched.v1 file descriptor")?;
    let services: Vec<&str> = ours.service.iter().map(|s| s.name()).collect();
    assert!(services.contains(&"RoomService"), "{services:?}");
    Ok(())
}

#[tokio::test]
async fn region_policies_and_usage_over_grpc() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment(APP, 2).await?;
    let mut apps = s.apps.clone();
    let get = pb::GetRegionPolicyRequest {
        app_id: APP.into(),
        region: "Frankfurt".into(),
    };
    let default = apps.get_region_policy(get.clone()).await?.into_inner();
    assert_eq!((default.min_processes, default.buffer_rooms), (0, 0));

    let bad = pb::SetRegionPolicyRequest {
        app_id: APP.into(),
        region: "Frankfurt".into(),
        min_processes: 5,
        buffer_rooms: 0,
        max_processes: 3,
    };
    expect_error(
        apps.set_region_policy(bad).await,
        Code::InvalidArgument,
        &["min_processes"],
    )?;
    assert_eq!(
        s.count_processes(APP).await?,
        0,
        "a refused policy starts nothing"
    );
    assert_eq!(
        apps.get_region_policy(get.clone()).await?.into_inner(),
        default
    );

    let set = pb::SetRegionPolicyRequest {
        app_id: APP.into(),
        region: "Frankfurt".into(),
        min_processes: 2,
        buffer_rooms: 0,
        max_processes: 3,
    };
    let applied = apps.set_region_policy(set).await?.into_inner();
    assert_eq!((applied.min_processes, applied.max_processes), (2, 3));
    assert_eq!(apps.get_region_policy(get).await?.into_inner(), applied);
    assert_eq!(
        s.count_processes(APP).await?,
        2,
        "the warm pool starts at once"
    );

    // 3 processes of 2 slots: of 20 concurrent creates exactly 6 succeed.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut rooms = s.rooms.clone();
            tokio::spawn(async move { rooms.create_room(room_request(APP, "Frankfurt")).await })
        })
        .collect();
    let (mut ok, mut exhausted) = (0, 0);
    for t in tasks {
        match t.await? {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.get_details_retry_info().is_some(),
                    "RetryInfo detail"
                );
                exhausted += 1;
            }
        }
    }
    assert_eq!((ok, exhausted), (6, 14));
    assert_eq!(s.count_processes(APP).await?, 3);

    let usage = apps
        .get_usage(pb::GetUsageRequest {
            app_id: APP.into(),
            regions: vec!["Frankfurt".into(), "Tokyo".into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    let regions: Vec<&str> = usage.regions.iter().map(|r| r.region.as_str()).collect();
    assert_eq!(regions, ["Frankfurt", "Tokyo"]);
    assert_eq!(
        (
            usage.regions[0].rooms_created,
            usage.regions[0].peak_processes
        ),
        (6, 3)
    );
    assert_eq!(
        (
            usage.regions[1].rooms_created,
            usage.regions[1].peak_processes
        ),
        (0, 0)
    );
    Ok(())
}

// ----- concurrency -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_create_room_starts_exactly_enough_processes() -> TestResult {
    const PER_PROCESS: u32 = 10;
    let regions = [("Frankfurt", 125usize), ("Tokyo", 75usize)];
    let s = TestServer::start_with(TestConfig::default().regions(&["Frankfurt", "Tokyo"])).await?;
    s.create_deployment(APP, PER_PROCESS).await?;

    // 200 calls from 200 tasks, interleaving the regions, over two connections.
    let second =
        pb::room_service_client::RoomServiceClient::connect(format!("http://{}", s.addr)).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0;
    for (region, n) in regions {
        for _ in 0..n {
            let mut client = if i % 2 == 0 {
                s.rooms.clone()
            } else {
                second.clone()
            };
            i += 1;
            tasks.spawn(async move {
                let placed = client
                    .create_room(room_request(APP, region))
                    .await?
                    .into_inner();
                Ok::<_, tonic::Status>((region, placed))
            });
        }
    }
    let mut room_ids = HashSet::new();
    let mut rooms_of: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (region, placed) = joined??;
        assert!(room_ids.insert(placed.room_id.clone()), "duplicate room id");
        rooms_of
            .entry(placed.process_id)
            .or_insert_with(|| (region.to_string(), vec![]))
            .1
            .push(placed.room_id);
    }
    assert_eq!(room_ids.len(), 200);

    for (region, n) in regions {
        let expected = n.div_ceil(PER_PROCESS as usize) as u64;
        assert_eq!(
            s.count_processes_where(APP, &[], &[region]).await?,
            expected,
            "processes in {region} for {n} rooms"
        );
    }
    let mut total = 0;
    for p in s.all_processes(APP).await? {
        let active = s.active_rooms(APP, &p.process_id).await?;
        assert_eq!(p.rooms_allocated as usize, active.len(), "{}", p.process_id);
        assert!(p.rooms_allocated <= PER_PROCESS, "{p:?}");
        let (region, placed_here) = rooms_of
            .get(&p.process_id)
            .ok_or("a process that no CreateRoom answer named")?;
        assert_eq!(&p.region, region);
        let mut listed: Vec<String> = active.into_iter().map(|r| r.room_id).collect();
        let mut answered = placed_here.clone();
        listed.sort();
        answered.sort();
        assert_eq!(listed, answered, "rooms of {}", p.process_id);
        total += p.rooms_allocated;
    }
    assert_eq!(total, 200);
    Ok(())
}
