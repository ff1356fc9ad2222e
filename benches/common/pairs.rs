//! The set-up shared by the placement bench and `examples/pair_cost.rs`: CreateRoom +
//! DestroyRoom pairs in one region of RUNNING processes.

use crate::common::InstantBackend;
use roomsched::{CreateRoom, DeploymentSpec, ProcessFilter, ProcessStatus, Scheduler};

pub(crate) const APP: &str = "bench";

/// A room in the region of [`populated`].
pub(crate) fn room() -> CreateRoom {
    CreateRoom {
        app_id: APP.into(),
        region: "Frankfurt".into(),
        ..Default::default()
    }
}

/// A scheduler with `n` RUNNING processes of 4 slots each, every one holding 2 rooms.
pub(crate) async fn populated(n: usize) -> Scheduler {
    let s = Scheduler::builder()
        .regions(["Frankfurt"])
        .backend(InstantBackend)
        .max_processes(n as u32)
        .build()
        .expect("scheduler");
    let spec = DeploymentSpec {
        rooms_per_process: 4,
        container_port: 7777,
        ..Default::default()
    };
    s.create_deployment(APP, spec).await.expect("deployment");
    for _ in 0..n {
        s.create_process(APP, "Frankfurt", None)
            .await
            .expect("process");
    }
    let running = ProcessFilter {
        app_id: APP.into(),
        statuses: vec![ProcessStatus::Running],
        regions: vec![],
    };
    s.settle().await;
    assert_eq!(s.count_processes(&running).await.expect("count"), n as u64);
    for _ in 0..2 * n {
        s.create_room(room()).await.expect("room");
    }
    s
}
