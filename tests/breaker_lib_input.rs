//! Breaker: bad input through the library API (SPEC §7) gets the right error and changes
//! nothing: no process started or stopped, no deployment added, the region policy as it was.
mod support;
use roomsched::{CreateRoom, DeploymentSpec, Error, ProcessStatus, RegionPolicy, Scheduler};
use support::*;

/// The kind of a call's outcome, for comparing against what SPEC §7 says.
fn outcome<T>(result: Result<T, Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(Error::InvalidArgument { .. }) => "invalid argument",
        Err(Error::NotFound(_)) => "not found",
        Err(Error::FailedPrecondition(_)) => "failed precondition",
        Err(Error::AlreadyExists(_)) => "already exists",
        Err(e) => panic!("unexpected error: {e:?}"),
    }
}

fn with_port(port: u32) -> DeploymentSpec {
    DeploymentSpec {
        container_port: port,
        ..deployment(1)
    }
}

async fn live_processes(s: &Scheduler) -> Vec<(roomsched::ProcessId, ProcessStatus)> {
    let mut live: Vec<_> = processes(s)
        .await
        .into_iter()
        .map(|p| (p.process_id, p.status))
        .collect();
    live.sort();
    live
}

#[tokio::test]
async fn bad_library_input_gets_its_error_and_changes_nothing() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(2)).await?;
    s.create_deployment("other", deployment(2)).await?;
    let other = s
        .create_room(CreateRoom {
            app_id: "other".into(),
            region: "Tokyo".into(),
            ..Default::default()
        })
        .await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    s.settle().await;
    let processes_before = live_processes(&s).await;
    let policy_before = s.get_region_policy(APP, "Tokyo").await?;

    let pinned_to = |deployment_id| CreateRoom {
        deployment_id: Some(deployment_id),
        ..room_in("Tokyo")
    };
    let named = |room_id: String| CreateRoom {
        room_id: Some(room_id),
        ..room_in("Tokyo")
    };
    let bad_policy = RegionPolicy {
        min_processes: 3,
        buffer_rooms: 0,
        max_processes: 2,
    };
    let cases = [
        (
            "create_room on deployment 99",
            outcome(s.create_room(pinned_to(99)).await),
            "not found",
        ),
        (
            "create_process on deployment 99",
            outcome(s.create_process(APP, "Tokyo", Some(99)).await),
            "not found",
        ),
        (
            "get_deployment 0",
            outcome(s.get_deployment(APP, 0).await),
            "not found",
        ),
        (
            "get_deployment 99",
            outcome(s.get_deployment(APP, 99).await),
            "not found",
        ),
        (
            "drain another app's process",
            outcome(s.drain_process(APP, other.process_id).await),
            "not found",
        ),
        (
            "stop another app's process",
            outcome(s.stop_process(APP, other.process_id).await),
            "not found",
        ),
        (
            "destroy another app's room",
            outcome(s.destroy_room(APP, &other.room_id).await),
            "not found",
        ),
        (
            "get another app's room",
            outcome(s.get_room(APP, &other.room_id).await),
            "not found",
        ),
        (
            "policy with min > max",
            outcome(s.set_region_policy(APP, "Tokyo", bad_policy).await),
            "invalid argument",
        ),
        (
            "room_config of 10,001 bytes",
            outcome(
                s.update_room_config(APP, &r.room_id, "x".repeat(10_001))
                    .await,
            ),
            "invalid argument",
        ),
        (
            "room_config of 10,000 bytes in 2-byte characters",
            outcome(
                s.update_room_config(APP, &r.room_id, "é".repeat(5_000))
                    .await,
            ),
            "ok",
        ),
        (
            "room_id of 101 characters",
            outcome(s.create_room(named("a".repeat(101))).await),
            "invalid argument",
        ),
        (
            "room_id with a non-ASCII character",
            outcome(s.create_room(named("é".into())).await),
            "invalid argument",
        ),
        (
            "region in lowercase",
            outcome(s.create_room(room_in("tokyo")).await),
            "invalid argument",
        ),
        (
            "region with a trailing space",
            outcome(s.create_room(room_in("Tokyo ")).await),
            "invalid argument",
        ),
        (
            "create_room for an app with no deployment",
            outcome(
                s.create_room(CreateRoom {
                    app_id: "nodep".into(),
                    ..room_in("Tokyo")
                })
                .await,
            ),
            "failed precondition",
        ),
        (
            "create_process for an app with no deployment",
            outcome(s.create_process("nodep", "Tokyo", None).await),
            "failed precondition",
        ),
        (
            "destroy a room",
            outcome(s.destroy_room(APP, &r.room_id).await),
            "ok",
        ),
        (
            "destroy it again",
            outcome(s.destroy_room(APP, &r.room_id).await),
            "not found",
        ),
        (
            "reuse a destroyed room's id",
            outcome(
                s.create_room(CreateRoom {
                    room_id: Some(r.room_id.clone()),
                    ..room_in("Frankfurt")
                })
                .await,
            ),
            "already exists",
        ),
        (
            "rooms_per_process 0",
            outcome(s.create_deployment(APP, deployment(0)).await),
            "invalid argument",
        ),
        (
            "rooms_per_process 10,001",
            outcome(s.create_deployment(APP, deployment(10_001)).await),
            "invalid argument",
        ),
        (
            "container_port 0",
            outcome(s.create_deployment(APP, with_port(0)).await),
            "invalid argument",
        ),
        (
            "container_port 65,536",
            outcome(s.create_deployment(APP, with_port(65_536)).await),
            "invalid argument",
        ),
    ];
    for (case, got, expected) in cases {
        assert_eq!(got, expected, "{case}");
    }

    s.settle().await;
    assert_eq!(live_processes(&s).await, processes_before, "processes");
    assert_eq!(s.list_deployments(APP).await?.len(), 1, "deployments");
    assert_eq!(
        s.get_region_policy(APP, "Tokyo").await?,
        policy_before,
        "policy"
    );
    assert_eq!(
        s.get_room(APP, &r.room_id).await?.room_config,
        "é".repeat(5_000)
    );
    Ok(())
}
