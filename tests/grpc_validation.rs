//! SPEC §7 over gRPC: every bad input is refused with the right status code and a message that
//! names the field or id, and it changes nothing (no process started, no room created, no
//! count moved). One test per rule.

mod common;

use common::{
    deployment_request, expect_error, room_request, TestConfig, TestResult, TestServer, DEADLINE,
};
use roomsched::grpc::pb;
use std::time::Duration;
use tonic::Code;
use tonic_types::StatusExt;

const APP: &str = "validation-app";

/// A server with a deployment of `APP` (4 rooms per process) and one RUNNING process holding
/// one room in Frankfurt, so that "nothing changed" is checked against a non-empty state.
async fn server_with_state(cfg: TestConfig) -> TestResult<(TestServer, pb::CreateRoomResponse)> {
    let s = TestServer::start_with(cfg).await?;
    s.create_deployment(APP, 4).await?;
    let room = s.create_room(APP, "Frankfurt").await?;
    s.wait_running(APP, &room.process_id).await?;
    Ok((s, room))
}

/// Everything a refused request must leave alone.
#[derive(Debug, PartialEq)]
struct World {
    processes: Vec<(String, i32, u32)>,
    count: u64,
    backend_processes: usize,
    deployments: usize,
}

async fn world(s: &TestServer) -> TestResult<World> {
    Ok(World {
        processes: s.snapshot(APP).await?,
        count: s.count_processes(APP).await?,
        backend_processes: s.sim.running_processes(),
        deployments: s.list_deployments(APP).await?.len(),
    })
}

async fn assert_room_absent(s: &TestServer, app_id: &str, room_id: &str) -> TestResult {
    expect_error(
        s.get_room(app_id, room_id).await,
        Code::NotFound,
        &[room_id],
    )?;
    Ok(())
}

#[tokio::test]
async fn bad_app_id_is_invalid_argument_everywhere() -> TestResult {
    let (s, room) = server_with_state(TestConfig::default()).await?;
    let before = world(&s).await?;
    let long = "a".repeat(101);
    for bad in [
        "",
        "has space",
        long.as_str(),
        "spiel-ü",
        "ゲーム",
        "a/b",
        "a.b",
    ] {
        let what = format!("app_id {bad:?}");
        let mut req = room_request(bad, "Frankfurt");
        req.room_id = "bad-app-room".into();
        expect_error(
            s.rooms.clone().create_room(req).await,
            Code::InvalidArgument,
            &["app_id"],
        )
        .map_err(|e| format!("CreateRoom {what}: {e}"))?;
        expect_error(
            s.processes
                .clone()
                .create_process(pb::CreateProcessRequest {
                    app_id: bad.into(),
                    region: "Frankfurt".into(),
                    deployment_id: 0,
                })
                .await,
            Code::InvalidArgument,
            &["app_id"],
        )
        .map_err(|e| format!("CreateProcess {what}: {e}"))?;
        expect_error(
            s.deployments
                .clone()
                .create_deployment(deployment_request(bad, 4))
                .await,
            Code::InvalidArgument,
            &["app_id"],
        )
        .map_err(|e| format!("CreateDeployment {what}: {e}"))?;
        expect_error(
            s.get_room(bad, &room.room_id).await,
            Code::InvalidArgument,
            &["app_id"],
        )
        .map_err(|e| format!("GetRoom {what}: {e}"))?;
        expect_error(
            s.get_process(bad, &room.process_id).await,
            Code::InvalidArgument,
            &["app_id"],
        )
        .map_err(|e| format!("GetProcess {what}: {e}"))?;
        expect_error(
            s.processes
                .clone()
                .list_processes(pb::ListProcessesRequest {
                    app_id: bad.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            &["app_id"],
        )
        .map_err(|e| format!("ListProcesses {what}: {e}"))?;
        let mut rooms = s.rooms.clone();
        let mut processes = s.processes.clone();
        let mut deployments = s.deployments.clone();
        let named = |call: &str, r: Result<(), tonic::Status>| {
            expect_error(r, Code::InvalidArgument, &["app_id"])
                .map(|_| ())
                .map_err(|e| format!("{call} {what}: {e}"))
        };
        named(
            "DestroyRoom",
            s.destroy_room(bad, &room.room_id).await.map(|_| ()),
        )?;
        named(
            "UpdateRoomConfig",
            rooms
                .update_room_config(pb::UpdateRoomConfigRequest {
                    app_id: bad.into(),
                    room_id: room.room_id.clone(),
                    room_config: "x".into(),
                })
                .await
                .map(|_| ()),
        )?;
        named(
            "GetConnectionInfo",
            s.connection_info(bad, &room.room_id).await.map(|_| ()),
        )?;
        named(
            "ListActiveRoomsForProcess",
            rooms
                .list_active_rooms_for_process(pb::ListRoomsForProcessRequest {
                    app_id: bad.into(),
                    process_id: room.process_id.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        )?;
        named(
            "StopProcess",
            processes
                .stop_process(pb::StopProcessRequest {
                    app_id: bad.into(),
                    process_id: room.process_id.clone(),
                })
                .await
                .map(|_| ()),
        )?;
        named(
            "CountProcesses",
            processes
                .count_processes(pb::CountProcessesRequest {
                    app_id: bad.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        )?;
        named(
            "ListDeployments",
            deployments
                .list_deployments(pb::ListDeploymentsRequest { app_id: bad.into() })
                .await
                .map(|_| ()),
        )?;
        named(
            "GetLatestDeployment",
            deployments
                .get_latest_deployment(pb::GetLatestDeploymentRequest { app_id: bad.into() })
                .await
                .map(|_| ()),
        )?;
    }
    assert_eq!(world(&s).await?, before);
    assert_room_absent(&s, APP, "bad-app-room").await?;
    // The boundary: 100 characters is a valid app id.
    let hundred = "a".repeat(100);
    s.create_deployment(&hundred, 1).await?;
    s.create_room(&hundred, "Frankfurt").await?;
    Ok(())
}

#[tokio::test]
async fn region_not_configured_is_invalid_argument() -> TestResult {
    let (s, _) = server_with_state(TestConfig::default()).await?;
    let before = world(&s).await?;
    let long = "F".repeat(300);
    // "Seattle" is one of the default Hathora regions, but not configured on this server.
    for bad in [
        "Atlantis",
        "",
        "frankfurt",
        " Frankfurt ",
        "Frankfurt ",
        long.as_str(),
        "Seattle",
    ] {
        let mut req = room_request(APP, bad);
        req.room_id = "region-room".into();
        expect_error(
            s.rooms.clone().create_room(req).await,
            Code::InvalidArgument,
            &["region"],
        )
        .map_err(|e| format!("CreateRoom region {bad:?}: {e}"))?;
        expect_error(
            s.processes
                .clone()
                .create_process(pb::CreateProcessRequest {
                    app_id: APP.into(),
                    region: bad.into(),
                    deployment_id: 0,
                })
                .await,
            Code::InvalidArgument,
            &["region"],
        )
        .map_err(|e| format!("CreateProcess region {bad:?}: {e}"))?;
    }
    assert_eq!(world(&s).await?, before);
    // The refused calls did not reserve the room id.
    assert_room_absent(&s, APP, "region-room").await?;
    let mut req = room_request(APP, "Tokyo");
    req.room_id = "region-room".into();
    s.create_room_with(req).await?;
    Ok(())
}

#[tokio::test]
async fn bad_room_id_is_invalid_argument() -> TestResult {
    let (s, _) = server_with_state(TestConfig::default()).await?;
    let before = world(&s).await?;
    let long = "r".repeat(101);
    for bad in ["has space", "a/b", "room.1", "ümlaut", " r", long.as_str()] {
        let mut req = room_request(APP, "Frankfurt");
        req.room_id = bad.into();
        expect_error(
            s.rooms.clone().create_room(req).await,
            Code::InvalidArgument,
            &["room_id"],
        )
        .map_err(|e| format!("CreateRoom room_id {bad:?}: {e}"))?;
        expect_error(
            s.get_room(APP, bad).await,
            Code::InvalidArgument,
            &["room_id"],
        )
        .map_err(|e| format!("GetRoom room_id {bad:?}: {e}"))?;
    }
    assert_eq!(world(&s).await?, before);
    // The boundary: 100 characters of the allowed alphabet is fine.
    let hundred = "R-_9".repeat(25);
    let mut req = room_request(APP, "Frankfurt");
    req.room_id = hundred.clone();
    assert_eq!(s.create_room_with(req).await?.room_id, hundred);
    Ok(())
}

#[tokio::test]
async fn room_config_over_10000_bytes_is_invalid_argument() -> TestResult {
    let (s, room) = server_with_state(TestConfig::default()).await?;
    let before = world(&s).await?;
    // 10,001 ASCII bytes, and 10,002 bytes in 3,334 characters (the limit is in bytes).
    for config in ["x".repeat(10_001), "€".repeat(3_334)] {
        let mut req = room_request(APP, "Frankfurt");
        req.room_id = "big-config".into();
        req.room_config = config.clone();
        expect_error(
            s.rooms.clone().create_room(req).await,
            Code::InvalidArgument,
            &["room_config"],
        )?;
        expect_error(
            s.rooms
                .clone()
                .update_room_config(pb::UpdateRoomConfigRequest {
                    app_id: APP.into(),
                    room_id: room.room_id.clone(),
                    room_config: config,
                })
                .await,
            Code::InvalidArgument,
            &["room_config"],
        )?;
    }
    assert_eq!(world(&s).await?, before);
    assert_room_absent(&s, APP, "big-config").await?;
    assert_eq!(s.get_room(APP, &room.room_id).await?.room_config, "");
    // Exactly 10,000 bytes is accepted, by CreateRoom and by UpdateRoomConfig.
    let mut req = room_request(APP, "Frankfurt");
    req.room_config = "y".repeat(10_000);
    let placed = s.create_room_with(req).await?;
    assert_eq!(
        s.get_room(APP, &placed.room_id).await?.room_config.len(),
        10_000
    );
    let updated = s
        .rooms
        .clone()
        .update_room_config(pb::UpdateRoomConfigRequest {
            app_id: APP.into(),
            room_id: room.room_id.clone(),
            room_config: "z".repeat(10_000),
        })
        .await?
        .into_inner();
    assert_eq!(updated.room_config, "z".repeat(10_000));
    Ok(())
}

/// CreateDeployment with `req` must fail with INVALID_ARGUMENT naming `field`, and leave the
/// app's deployments (and everything else) as they were.
async fn refused_deployment(
    s: &TestServer,
    req: pb::CreateDeploymentRequest,
    field: &str,
) -> TestResult {
    let before = world(s).await?;
    let latest = s.list_deployments(APP).await?.first().cloned();
    let what = format!("{req:?}");
    let what = &what[..what.len().min(300)];
    expect_error(
        s.deployments.clone().create_deployment(req).await,
        Code::InvalidArgument,
        &[field],
    )
    .map_err(|e| format!("CreateDeployment {what}: {e}"))?;
    assert_eq!(world(s).await?, before, "after CreateDeployment {what}");
    assert_eq!(s.list_deployments(APP).await?.first().cloned(), latest);
    Ok(())
}

fn port(name: &str, port: u32) -> pb::ContainerPort {
    pb::ContainerPort {
        name: name.into(),
        port,
        transport_type: pb::TransportType::Udp as i32,
    }
}

fn env(name: &str, value: &str) -> pb::EnvVar {
    pb::EnvVar {
        name: name.into(),
        value: value.into(),
    }
}

#[tokio::test]
async fn rooms_per_process_outside_1_to_10000_is_invalid_argument() -> TestResult {
    let (s, room) = server_with_state(TestConfig::default()).await?;
    for n in [0, 10_001, u32::MAX] {
        refused_deployment(&s, deployment_request(APP, n), "rooms_per_process").await?;
    }
    // The old deployment is still the latest: its process was not drained.
    let p = s.get_process(APP, &room.process_id).await?;
    assert_eq!(p.status(), pb::ProcessStatus::Running);
    // A refused first deployment does not create the app either.
    expect_error(
        s.deployments
            .clone()
            .create_deployment(deployment_request("fresh-app", 0))
            .await,
        Code::InvalidArgument,
        &["rooms_per_process"],
    )?;
    assert!(s.list_deployments("fresh-app").await?.is_empty());
    expect_error(
        s.rooms
            .clone()
            .create_room(room_request("fresh-app", "Frankfurt"))
            .await,
        Code::FailedPrecondition,
        &["deployment"],
    )?;
    // The boundaries are accepted.
    assert_eq!(s.create_deployment(APP, 1).await?.rooms_per_process, 1);
    assert_eq!(
        s.create_deployment(APP, 10_000).await?.rooms_per_process,
        10_000
    );
    Ok(())
}

#[tokio::test]
async fn ports_outside_1_to_65535_are_invalid_argument() -> TestResult {
    let (s, _) = server_with_state(TestConfig::default()).await?;
    for bad in [0, 65_536, u32::MAX] {
        let mut req = deployment_request(APP, 4);
        req.container_port = bad;
        refused_deployment(&s, req, "container_port").await?;
        let mut req = deployment_request(APP, 4);
        req.additional_container_ports = vec![port("voice", bad)];
        refused_deployment(&s, req, "additional_container_ports").await?;
    }
    let mut req = deployment_request(APP, 4);
    req.container_port = 65_535;
    req.additional_container_ports = vec![port("voice", 1)];
    let dep = s.create_deployment_with(req).await?;
    assert_eq!(dep.container_port, 65_535);
    assert_eq!(dep.additional_container_ports[0].port, 1);
    Ok(())
}

#[tokio::test]
async fn more_than_two_additional_ports_is_invalid_argument() -> TestResult {
    let (s, _) = server_with_state(TestConfig::default()).await?;
    let mut req = deployment_request(APP, 4);
    req.additional_container_ports = vec![port("a", 7000), port("b", 7001), port("c", 7002)];
    refused_deployment(&s, req, "additional_container_ports").await?;
    let mut req = deployment_request(APP, 4);
    req.additional_container_ports = vec![port("a", 7000), port("b", 7001)];
    assert_eq!(
        s.create_deployment_with(req)
            .await?
            .additional_container_ports
            .len(),
        2
    );
    Ok(())
}

#[tokio::test]
async fn bad_duplicate_or_default_port_names_are_invalid_argument() -> TestResult {
    let (s, _) = server_with_state(TestConfig::default()).await?;
    let long = format!("p{}", "x".repeat(100));
    for bad in [
        vec![port("", 7000)],
        vec![port("Voice", 7000)],
        vec![port("1st", 7000)],
        vec![port("-voice", 7000)],
        vec![port("with_underscore", 7000)],
        vec![port("with space", 7000)],
        vec![port("stimme-ü", 7000)],
        vec![port(&long, 7000)],
        vec![port("default", 7000)],
        vec![port("voice", 7000), port("voice", 7001)],
    ] {
        let mut req = deployment_request(APP, 4);
        req.additional_container_ports = bad;
        refused_deployment(&s, req, "additional_container_ports").await?;
    }
    // Allowed: lowercase letter first, then lowercase letters, digits and dashes, up to 100.
    let hundred = format!("p{}", "-9".repeat(49));
    let hundred = format!("{hundred}x");
    assert_eq!(hundred.len(), 100);
    let mut req = deployment_request(APP, 4);
    req.additional_container_ports = vec![port("voice-2", 7000), port(&hundred, 7001)];
    s.create_deployment_with(req).await?;
    Ok(())
}

#[tokio::test]
async fn bad_env_names_are_invalid_argument() -> TestResult {
    let (s, _) = server_with_state(TestConfig::default()).await?;
    let long = format!("A{}", "B".repeat(100));
    for bad in ["", "1ABC", "A-B", "A B", "A.B", "É", long.as_str()] {
        let mut req = deployment_request(APP, 4);
        req.env = vec![env("GOOD", "1"), env(bad, "x")];
        refused_deployment(&s, req, "env").await?;
    }
    let hundred = format!("_{}", "a1".repeat(49));
    let hundred = format!("{hundred}Z");
    assert_eq!(hundred.len(), 100);
    let mut req = deployment_request(APP, 4);
    req.env = vec![env("_X", ""), env("Mixed_Case_9", "v"), env(&hundred, "v")];
    assert_eq!(s.create_deployment_with(req).await?.env.len(), 3);
    Ok(())
}

#[tokio::test]
async fn env_value_over_5000_bytes_is_invalid_argument() -> TestResult {
    let (s, _) = server_with_state(TestConfig::default()).await?;
    // 5,001 ASCII bytes, and 5,001 bytes in fewer characters (the limit is in bytes).
    for value in ["v".repeat(5_001), format!("{}é", "v".repeat(4_999))] {
        let mut req = deployment_request(APP, 4);
        req.env = vec![env("BIG", &value)];
        refused_deployment(&s, req, "env").await?;
    }
    let mut req = deployment_request(APP, 4);
    req.env = vec![env("BIG", &"v".repeat(5_000))];
    assert_eq!(
        s.create_deployment_with(req).await?.env[0].value.len(),
        5_000
    );
    Ok(())
}

#[tokio::test]
async fn over_100_env_vars_is_invalid_argument() -> TestResult {
    let (s, _) = server_with_state(TestConfig::default()).await?;
    let vars = |n: usize| (0..n).map(|i| env(&format!("VAR_{i}"), "x")).collect();
    let mut req = deployment_request(APP, 4);
    req.env = vars(101);
    refused_deployment(&s, req, "env").await?;
    let mut req = deployment_request(APP, 4);
    req.env = vars(100);
    assert_eq!(s.create_deployment_with(req).await?.env.len(), 100);
    Ok(())
}

#[tokio::test]
async fn unknown_room_process_or_deployment_is_not_found() -> TestResult {
    let (s, room) = server_with_state(TestConfig::default()).await?;
    let before = world(&s).await?;
    let mut rooms = s.rooms.clone();
    let mut processes = s.processes.clone();
    let mut deployments = s.deployments.clone();

    let ghost = "no-such-room";
    expect_error(s.get_room(APP, ghost).await, Code::NotFound, &[ghost])?;
    expect_error(s.destroy_room(APP, ghost).await, Code::NotFound, &[ghost])?;
    expect_error(
        s.connection_info(APP, ghost).await,
        Code::NotFound,
        &[ghost],
    )?;
    expect_error(
        rooms
            .update_room_config(pb::UpdateRoomConfigRequest {
                app_id: APP.into(),
                room_id: ghost.into(),
                room_config: "x".into(),
            })
            .await,
        Code::NotFound,
        &[ghost],
    )?;
    expect_error(
        rooms
            .watch_connection_info(pb::GetConnectionInfoRequest {
                app_id: APP.into(),
                room_id: ghost.into(),
            })
            .await,
        Code::NotFound,
        &[ghost],
    )?;

    // A well-formed but unknown process id, and a malformed one.
    for pid in ["8c1f0d3e-5b7a-4c2e-9f1d-0a2b3c4d5e6f", "not-a-uuid"] {
        expect_error(s.get_process(APP, pid).await, Code::NotFound, &[pid])?;
        expect_error(
            processes
                .drain_process(pb::DrainProcessRequest {
                    app_id: APP.into(),
                    process_id: pid.into(),
                })
                .await,
            Code::NotFound,
            &[pid],
        )?;
        expect_error(
            processes
                .stop_process(pb::StopProcessRequest {
                    app_id: APP.into(),
                    process_id: pid.into(),
                })
                .await,
            Code::NotFound,
            &[pid],
        )?;
        let req = pb::ListRoomsForProcessRequest {
            app_id: APP.into(),
            process_id: pid.into(),
            ..Default::default()
        };
        expect_error(
            rooms.list_active_rooms_for_process(req.clone()).await,
            Code::NotFound,
            &[pid],
        )?;
        expect_error(
            rooms.list_inactive_rooms_for_process(req).await,
            Code::NotFound,
            &[pid],
        )?;
    }

    for id in [0, 2, 99] {
        expect_error(
            deployments
                .get_deployment(pb::GetDeploymentRequest {
                    app_id: APP.into(),
                    deployment_id: id,
                })
                .await,
            Code::NotFound,
            &[&id.to_string()],
        )?;
    }
    expect_error(
        deployments
            .get_latest_deployment(pb::GetLatestDeploymentRequest {
                app_id: "app-without-deployments".into(),
            })
            .await,
        Code::NotFound,
        &["app-without-deployments"],
    )?;
    // CreateRoom / CreateProcess for a deployment the app does not have.
    let mut req = room_request(APP, "Frankfurt");
    req.deployment_id = 7;
    req.room_id = "dep-seven".into();
    expect_error(
        rooms.create_room(req).await,
        Code::NotFound,
        &["deployment", "7"],
    )?;
    expect_error(
        processes
            .create_process(pb::CreateProcessRequest {
                app_id: APP.into(),
                region: "Frankfurt".into(),
                deployment_id: 7,
            })
            .await,
        Code::NotFound,
        &["deployment", "7"],
    )?;

    // Another app's room and process are unknown to this app.
    s.create_deployment("other-app", 4).await?;
    expect_error(
        s.get_room("other-app", &room.room_id).await,
        Code::NotFound,
        &[&room.room_id],
    )?;
    expect_error(
        s.destroy_room("other-app", &room.room_id).await,
        Code::NotFound,
        &[&room.room_id],
    )?;
    expect_error(
        s.get_process("other-app", &room.process_id).await,
        Code::NotFound,
        &[&room.process_id],
    )?;
    expect_error(
        processes
            .stop_process(pb::StopProcessRequest {
                app_id: "other-app".into(),
                process_id: room.process_id.clone(),
            })
            .await,
        Code::NotFound,
        &[&room.process_id],
    )?;

    assert_eq!(world(&s).await?, before);
    assert_room_absent(&s, APP, "dep-seven").await?;
    assert_eq!(
        s.get_room(APP, &room.room_id).await?.status(),
        pb::RoomStatus::Active
    );
    Ok(())
}

#[tokio::test]
async fn destroyed_room_is_not_found_for_destroy_update_and_connection_info() -> TestResult {
    let (s, room) = server_with_state(TestConfig::default()).await?;
    let other = s.create_room(APP, "Frankfurt").await?;
    assert_eq!(other.process_id, room.process_id);
    s.destroy_room(APP, &room.room_id).await?;
    let before = world(&s).await?;
    let p = s.get_process(APP, &room.process_id).await?;
    assert_eq!(p.rooms_allocated, 1);

    let id = room.room_id.as_str();
    expect_error(s.destroy_room(APP, id).await, Code::NotFound, &[id])?;
    expect_error(
        s.rooms
            .clone()
            .update_room_config(pb::UpdateRoomConfigRequest {
                app_id: APP.into(),
                room_id: id.into(),
                room_config: "new".into(),
            })
            .await,
        Code::NotFound,
        &[id],
    )?;
    expect_error(s.connection_info(APP, id).await, Code::NotFound, &[id])?;

    // A second destroy freed nothing: the other room still holds its slot.
    assert_eq!(world(&s).await?, before);
    let p = s.get_process(APP, &room.process_id).await?;
    assert_eq!(p.rooms_allocated, 1);
    assert_eq!(s.active_rooms(APP, &room.process_id).await?.len(), 1);
    // The destroyed room is still readable.
    let r = s.get_room(APP, id).await?;
    assert_eq!(r.status(), pb::RoomStatus::Destroyed);
    assert_eq!(r.room_config, "");
    Ok(())
}

#[tokio::test]
async fn app_without_deployment_is_failed_precondition() -> TestResult {
    let s = TestServer::start().await?;
    let app = "no-deployment-app";
    let mut req = room_request(app, "Frankfurt");
    req.room_id = "early-room".into();
    let err = expect_error(
        s.rooms.clone().create_room(req).await,
        Code::FailedPrecondition,
        &[app, "deployment"],
    )?;
    assert!(
        err.message().to_lowercase().contains("create"),
        "the message should say to create a deployment: {:?}",
        err.message()
    );
    let err = expect_error(
        s.processes
            .clone()
            .create_process(pb::CreateProcessRequest {
                app_id: app.into(),
                region: "Frankfurt".into(),
                deployment_id: 0,
            })
            .await,
        Code::FailedPrecondition,
        &[app, "deployment"],
    )?;
    assert!(err.message().to_lowercase().contains("create"));
    assert_eq!(s.count_processes(app).await?, 0);
    assert_eq!(s.sim.running_processes(), 0);
    assert!(s.list_deployments(app).await?.is_empty());
    assert_room_absent(&s, app, "early-room").await?;
    // Once a deployment exists the same call succeeds.
    s.create_deployment(app, 2).await?;
    let mut req = room_request(app, "Frankfurt");
    req.room_id = "early-room".into();
    s.create_room_with(req).await?;
    assert_eq!(s.count_processes(app).await?, 1);
    Ok(())
}

#[tokio::test]
async fn reused_room_id_is_already_exists_but_same_request_is_a_safe_retry() -> TestResult {
    let (s, _) = server_with_state(TestConfig::default()).await?;
    let request = |region: &str, config: &str| pb::CreateRoomRequest {
        app_id: APP.into(),
        region: region.into(),
        room_config: config.into(),
        room_id: "match-42".into(),
        deployment_id: 0,
    };
    let first = s.create_room_with(request("Frankfurt", "cfg")).await?;
    assert_eq!(first.room_id, "match-42");
    let before = world(&s).await?;
    let allocated = s.get_process(APP, &first.process_id).await?.rooms_allocated;

    // Same id, region and config: the same placement, no second slot.
    for _ in 0..3 {
        let again = s.create_room_with(request("Frankfurt", "cfg")).await?;
        assert_eq!(again.room_id, first.room_id);
        assert_eq!(again.process_id, first.process_id);
    }
    assert_eq!(world(&s).await?, before);
    assert_eq!(
        s.get_process(APP, &first.process_id).await?.rooms_allocated,
        allocated
    );
    let active = s.active_rooms(APP, &first.process_id).await?;
    assert_eq!(active.iter().filter(|r| r.room_id == "match-42").count(), 1);

    // Different region, different config: ALREADY_EXISTS, nothing changes.
    for (region, config) in [("Tokyo", "cfg"), ("Frankfurt", "other"), ("Tokyo", "other")] {
        expect_error(
            s.rooms.clone().create_room(request(region, config)).await,
            Code::AlreadyExists,
            &["match-42"],
        )
        .map_err(|e| format!("{region}/{config}: {e}"))?;
    }
    assert_eq!(world(&s).await?, before);
    assert_eq!(s.count_processes_where(APP, &[], &["Tokyo"]).await?, 0);
    assert_eq!(s.get_room(APP, "match-42").await?.room_config, "cfg");

    // Destroyed and still retained: even the identical request is ALREADY_EXISTS.
    s.destroy_room(APP, "match-42").await?;
    let before = world(&s).await?;
    for (region, config) in [("Frankfurt", "cfg"), ("Tokyo", "cfg")] {
        expect_error(
            s.rooms.clone().create_room(request(region, config)).await,
            Code::AlreadyExists,
            &["match-42"],
        )?;
    }
    assert_eq!(world(&s).await?, before);
    assert_eq!(
        s.get_room(APP, "match-42").await?.status(),
        pb::RoomStatus::Destroyed
    );

    // Room ids are unique per app: another app may use the same one.
    s.create_deployment("second-app", 4).await?;
    let mut req = request("Tokyo", "x");
    req.app_id = "second-app".into();
    assert_eq!(s.create_room_with(req).await?.room_id, "match-42");
    Ok(())
}

#[tokio::test]
async fn region_at_max_processes_is_resource_exhausted_with_retry_info() -> TestResult {
    let s = TestServer::start_with(TestConfig::default().max_processes(1)).await?;
    s.create_deployment(APP, 1).await?;
    let first = s.create_room(APP, "Frankfurt").await?;
    s.wait_running(APP, &first.process_id).await?;
    let before = world(&s).await?;

    let mut req = room_request(APP, "Frankfurt");
    req.room_id = "one-too-many".into();
    let err = expect_error(
        s.rooms.clone().create_room(req).await,
        Code::ResourceExhausted,
        &["Frankfurt"],
    )?;
    let retry = err
        .get_details_retry_info()
        .ok_or("RESOURCE_EXHAUSTED without a google.rpc.RetryInfo detail")?;
    let delay = retry.retry_delay.ok_or("RetryInfo without retry_delay")?;
    assert!(delay > Duration::ZERO, "retry_delay {delay:?}");

    let err = expect_error(
        s.processes
            .clone()
            .create_process(pb::CreateProcessRequest {
                app_id: APP.into(),
                region: "Frankfurt".into(),
                deployment_id: 0,
            })
            .await,
        Code::ResourceExhausted,
        &["Frankfurt"],
    )?;
    assert!(err.get_details_retry_info().is_some());

    assert_eq!(world(&s).await?, before);
    assert_room_absent(&s, APP, "one-too-many").await?;
    let p = s.get_process(APP, &first.process_id).await?;
    assert_eq!(p.rooms_allocated, 1);

    // The limit is per region; and a freed slot is used again without a new process.
    s.create_room(APP, "Tokyo").await?;
    s.destroy_room(APP, &first.room_id).await?;
    let again = s.create_room(APP, "Frankfurt").await?;
    assert_eq!(again.process_id, first.process_id);
    assert_eq!(s.count_processes_where(APP, &[], &["Frankfurt"]).await?, 1);
    Ok(())
}

#[tokio::test]
async fn after_scheduler_shutdown_changes_are_unavailable() -> TestResult {
    let (s, room) = server_with_state(TestConfig::default()).await?;
    let before = world(&s).await?;
    s.scheduler.shutdown();

    let mut req = room_request(APP, "Frankfurt");
    req.room_id = "after-shutdown".into();
    expect_error(
        s.rooms.clone().create_room(req).await,
        Code::Unavailable,
        &[],
    )?;
    expect_error(
        s.destroy_room(APP, &room.room_id).await,
        Code::Unavailable,
        &[],
    )?;
    expect_error(
        s.rooms
            .clone()
            .update_room_config(pb::UpdateRoomConfigRequest {
                app_id: APP.into(),
                room_id: room.room_id.clone(),
                room_config: "x".into(),
            })
            .await,
        Code::Unavailable,
        &[],
    )?;
    expect_error(
        s.processes
            .clone()
            .create_process(pb::CreateProcessRequest {
                app_id: APP.into(),
                region: "Frankfurt".into(),
                deployment_id: 0,
            })
            .await,
        Code::Unavailable,
        &[],
    )?;
    expect_error(
        s.processes
            .clone()
            .drain_process(pb::DrainProcessRequest {
                app_id: APP.into(),
                process_id: room.process_id.clone(),
            })
            .await,
        Code::Unavailable,
        &[],
    )?;
    expect_error(
        s.processes
            .clone()
            .stop_process(pb::StopProcessRequest {
                app_id: APP.into(),
                process_id: room.process_id.clone(),
            })
            .await,
        Code::Unavailable,
        &[],
    )?;
    expect_error(
        s.deployments
            .clone()
            .create_deployment(deployment_request(APP, 2))
            .await,
        Code::Unavailable,
        &[],
    )?;

    // Nothing changed, and reads still work.
    assert_eq!(world(&s).await?, before);
    assert_room_absent(&s, APP, "after-shutdown").await?;
    let r = s.get_room(APP, &room.room_id).await?;
    assert_eq!(r.status(), pb::RoomStatus::Active);
    assert_eq!(r.room_config, "");
    let p = s.get_process(APP, &room.process_id).await?;
    assert_eq!(p.status(), pb::ProcessStatus::Running);
    Ok(())
}

#[tokio::test]
async fn after_shutdown_signal_changes_are_unavailable() -> TestResult {
    let (mut s, room) = server_with_state(TestConfig::default()).await?;
    let before = world(&s).await?;
    // Keep a call in flight (a health watch), so the connection stays open during the
    // graceful shutdown, and learn from it when the server has begun shutting down.
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let first = tokio::time::timeout(DEADLINE, watch.message())
        .await??
        .ok_or("health watch ended")?;
    assert_eq!(first.status, serving);

    s.signal_shutdown();
    let next = tokio::time::timeout(DEADLINE, watch.message())
        .await??
        .ok_or("health watch ended before NOT_SERVING")?;
    assert_eq!(next.status, not_serving);

    // From here on the server takes no call. What a client sees (tonic 0.14 / hyper): the
    // server has sent GOAWAY, so the first call on the old connection fails on the client
    // side with CANCELLED ("operation was canceled"; it never reached the server) or
    // UNAVAILABLE; the client then reconnects, the listener is closed, and every later call
    // is UNAVAILABLE.
    let mut req = room_request(APP, "Frankfurt");
    req.room_id = "after-signal".into();
    let mut rooms = s.rooms.clone();
    let first = tokio::time::timeout(DEADLINE, rooms.create_room(req.clone())).await?;
    let err = first.expect_err("CreateRoom succeeded after the shutdown signal");
    assert!(
        matches!(err.code(), Code::Cancelled | Code::Unavailable),
        "first call after the shutdown signal: {:?}: {}",
        err.code(),
        err.message()
    );
    expect_error(
        tokio::time::timeout(DEADLINE, rooms.create_room(req)).await?,
        Code::Unavailable,
        &[],
    )?;
    let mut processes = s.processes.clone();
    let p = processes.create_process(pb::CreateProcessRequest {
        app_id: APP.into(),
        region: "Frankfurt".into(),
        deployment_id: 0,
    });
    expect_error(
        tokio::time::timeout(DEADLINE, p).await?,
        Code::Unavailable,
        &[],
    )?;
    // Nothing was created: the scheduler (read in-process) has the same state.
    assert_eq!(s.sim.running_processes(), before.backend_processes);
    let filter = roomsched::ProcessFilter {
        app_id: APP.into(),
        ..Default::default()
    };
    assert_eq!(s.scheduler.count_processes(&filter).await?, before.count);
    assert!(
        s.scheduler.get_room(APP, "after-signal").await.is_err(),
        "a room was created after the shutdown signal"
    );
    assert!(s.scheduler.get_room(APP, &room.room_id).await.is_ok());

    // Once the last call in flight ends, the server stops.
    drop(watch);
    s.join(DEADLINE).await?;
    Ok(())
}

#[tokio::test]
async fn messages_over_the_max_message_size_are_refused_by_the_transport() -> TestResult {
    let (s, room) = server_with_state(TestConfig::default().max_message_size(4096)).await?;
    let before = world(&s).await?;
    let mut req = room_request(APP, "Frankfurt");
    req.room_id = "huge".into();
    req.room_config = "x".repeat(8_000); // valid for roomsched (≤ 10,000), too big for the wire
    let err = s
        .rooms
        .clone()
        .create_room(req)
        .await
        .expect_err("a request over the max message size was accepted");
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "unexpected code for an oversized message: {:?}: {}",
        err.code(),
        err.message()
    );
    assert_eq!(world(&s).await?, before);
    assert_room_absent(&s, APP, "huge").await?;

    // Under the limit is fine; a response over the limit is refused too.
    let mut req = room_request(APP, "Frankfurt");
    req.room_config = "y".repeat(3_000);
    let a = s.create_room_with(req.clone()).await?;
    let b = s.create_room_with(req).await?;
    assert_eq!(a.process_id, room.process_id);
    assert_eq!(b.process_id, room.process_id);
    let err = s
        .rooms
        .clone()
        .list_active_rooms_for_process(pb::ListRoomsForProcessRequest {
            app_id: APP.into(),
            process_id: room.process_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("a response over the max message size was sent");
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "unexpected code for an oversized response: {:?}: {}",
        err.code(),
        err.message()
    );
    Ok(())
}
