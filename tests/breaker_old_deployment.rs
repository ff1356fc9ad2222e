//! Breaker: once a newer deployment exists, no process of an older deployment may be started
//! and stay RUNNING, and no room may land on an old deployment's process that is not draining
//! (SPEC §3 CreateDeployment, §4, §5).

mod support;

use roomsched::backend::{Simulated, SimulatedConfig};
use roomsched::{CreateRoom, Process, ProcessStatus, Scheduler};
use std::sync::Arc;
use std::time::Duration;
use support::*;

/// Every process of an older deployment than `latest` that is RUNNING (it should be DRAINING,
/// or on its way out).
fn old_and_running(procs: &[Process], latest: u32) -> Vec<(u32, ProcessStatus, u32)> {
    procs
        .iter()
        .filter(|p| p.deployment_id < latest && p.status == ProcessStatus::Running)
        .map(|p| (p.deployment_id, p.status, p.rooms_allocated))
        .collect()
}

/// A room on a STARTING process of deployment 1 whose process never binds; deployment 2 is
/// created; the start timeout re-places the room. SPEC §4: "placed again (a new allocation,
/// same placement rule)" — the rule targets the app's latest deployment — and SPEC §3: older
/// deployments' processes drain. The re-placement instead starts a fresh process of
/// deployment 1 that is not draining; once it binds it is RUNNING with the room on it,
/// forever (the old deployment is never drained again).
#[tokio::test(start_paused = true)]
async fn start_timeout_replacement_after_a_new_deployment_starts_no_running_old_process(
) -> TestResult {
    let b = ManualBackend::new();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .start_timeout(Duration::from_secs(5))
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    let first = r.process_id;

    let d2 = s.create_deployment(APP, deployment(4)).await?;
    assert_eq!(d2.deployment_id, 2);

    // The first process never binds: it fails, and the room is placed again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.settle().await;
    assert_eq!(
        s.get_process(APP, first).await?.status,
        ProcessStatus::Failed
    );
    let room = s.get_room(APP, &r.room_id).await?;
    let second = room
        .current_allocation
        .as_ref()
        .expect("the room was placed again")
        .process_id;

    // Every process the backend is asked to start from now on binds.
    for spec in b.started() {
        if spec.process_id != first {
            b.bind(spec.process_id);
        }
    }
    s.settle().await;

    let procs = processes(&s).await;
    let p2 = s.get_process(APP, second).await?;
    assert!(
        old_and_running(&procs, 2).is_empty(),
        "a process of deployment 1 was started after deployment 2 existed and is RUNNING \
         (re-placed room on process {second}: deployment {}, {:?}, {} rooms); all: {:?}",
        p2.deployment_id,
        p2.status,
        p2.rooms_allocated,
        old_and_running(&procs, 2)
    );
    Ok(())
}

/// CreateRoom explicitly for deployment 1 after deployment 2 exists: all deployment-1
/// processes are DRAINING, so SPEC §5 step 3 starts a new one — but that process is never
/// drained: it becomes RUNNING, a full placement target for the old version, although SPEC §3
/// says processes of older deployments drain once a newer one exists.
#[tokio::test]
async fn create_room_for_an_old_deployment_does_not_start_a_running_old_process() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(4)).await?;
    let old = s.create_room(room_in("Frankfurt")).await?;
    s.settle().await;
    s.create_deployment(APP, deployment(4)).await?;
    s.settle().await;
    assert_eq!(
        s.get_process(APP, old.process_id).await?.status,
        ProcessStatus::Draining
    );

    let r = s
        .create_room(CreateRoom {
            deployment_id: Some(1),
            ..room_in("Frankfurt")
        })
        .await?;
    s.settle().await;
    let p = s.get_process(APP, r.process_id).await?;
    assert_eq!(p.deployment_id, 1);
    assert_ne!(
        p.status,
        ProcessStatus::Running,
        "a deployment-1 process started after deployment 2 exists is RUNNING (not draining) \
         with {} room(s)",
        p.rooms_allocated
    );
    Ok(())
}

/// Regression: CreateDeployment storms racing CreateRoom storms in several regions (simulated
/// backend, real threads). When everything has settled, no process of an older deployment is
/// RUNNING and every live room sits on a process of the latest deployment or a DRAINING one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deployments_racing_creates_leave_no_running_old_process() -> TestResult {
    let regions = ["Frankfurt", "Tokyo", "London"];
    let s = Scheduler::builder()
        .regions(regions)
        .backend(Simulated::new(SimulatedConfig {
            start_delay: Duration::from_millis(1),
            ..Default::default()
        }))
        .build()?;
    s.create_deployment(APP, deployment(3)).await?;
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                s.create_deployment(APP, deployment(2 + i % 3))
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        }));
    }
    for i in 0..24 {
        let s = Arc::clone(&s);
        let region = regions[i % regions.len()];
        tasks.push(tokio::spawn(async move {
            for j in 0..40 {
                let r = s.create_room(room_in(region)).await.unwrap();
                if j % 3 == 0 {
                    let _ = s.destroy_room(APP, &r.room_id).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    // Let every start finish.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        s.settle().await;
        let procs = processes(&s).await;
        if procs.iter().all(|p| p.status != ProcessStatus::Starting) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "processes stuck STARTING"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let latest = s.latest_deployment(APP).await?.deployment_id;
    assert_eq!(latest, 31);
    let procs = processes(&s).await;
    assert_eq!(old_and_running(&procs, latest), vec![]);
    for p in &procs {
        if p.rooms_allocated > 0 {
            assert!(
                p.deployment_id == latest || p.status == ProcessStatus::Draining,
                "rooms on {:?} process of deployment {}",
                p.status,
                p.deployment_id
            );
        }
    }
    check_invariants(&s).await;
    Ok(())
}
