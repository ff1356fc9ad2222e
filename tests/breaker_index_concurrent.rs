//! Breaker: many concurrent tasks drive random operations (creates, destroys of live, unknown
//! and already-destroyed rooms, drains, stops, crashes, new deployments with either strategy,
//! pre-warmed processes); at quiet points the index must offer exactly what a brute-force
//! reading of the visible processes says (SPEC §5, §6), and the invariants must hold.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roomsched::backend::ExitStatus;
use roomsched::{
    CreateRoom, DeploymentSpec, Error, PlacementStrategy, Process, ProcessId, ProcessStatus,
    Scheduler,
};
use std::sync::{Arc, Mutex};
use support::*;

const REGIONS: [&str; 3] = ["Frankfurt", "Tokyo", "Sydney"];

fn spec(rng: &mut StdRng) -> DeploymentSpec {
    DeploymentSpec {
        placement_strategy: if rng.random_bool(0.5) {
            PlacementStrategy::MostFree
        } else {
            PlacementStrategy::FewestFree
        },
        ..deployment(rng.random_range(1..=6))
    }
}

/// SPEC §5 on a snapshot: the process a CreateRoom for the latest deployment must land on.
fn expected(
    procs: &[Process],
    region: &str,
    latest: u32,
    strategy: PlacementStrategy,
) -> Option<ProcessId> {
    let free = |p: &Process| p.rooms_per_process - p.rooms_allocated;
    let rank = |p: &Process| match strategy {
        PlacementStrategy::MostFree => u32::MAX - free(p),
        PlacementStrategy::FewestFree => free(p),
    };
    procs
        .iter()
        .filter(|p| {
            p.region == region
                && p.deployment_id == latest
                && p.status == ProcessStatus::Running
                && free(p) > 0
        })
        .min_by_key(|p| (rank(p), p.started_at, p.process_id))
        .map(|p| p.process_id)
}

async fn oracle_check(s: &Scheduler, rooms: &Mutex<Vec<String>>, round: usize) {
    s.settle().await;
    check_invariants(s).await;
    let latest = s.latest_deployment(APP).await.unwrap();
    for region in REGIONS {
        let procs = processes(s).await;
        // A drained STARTING process is invisible as such: only check when none is STARTING.
        if procs.iter().any(|p| p.status == ProcessStatus::Starting) {
            continue;
        }
        let want = expected(
            &procs,
            region,
            latest.deployment_id,
            latest.placement_strategy,
        );
        let got = s.create_room(room_in(region)).await;
        match (want, got) {
            (Some(pid), Ok(r)) => assert_eq!(
                r.process_id, pid,
                "round {round} {region}: placement ({:?})",
                latest.placement_strategy
            ),
            (None, Ok(r)) => {
                let p = s.get_process(APP, r.process_id).await.unwrap();
                assert!(
                    !procs.iter().any(|q| q.process_id == r.process_id),
                    "round {round} {region}: placed on existing {p:?} but none was a candidate"
                );
                assert_eq!(p.deployment_id, latest.deployment_id);
                rooms.lock().unwrap().push(r.room_id);
            }
            (Some(pid), Err(e)) => panic!("round {round} {region}: expected {pid}, got {e}"),
            (None, Err(Error::ResourceExhausted { .. })) => {}
            (None, Err(e)) => panic!("round {round} {region}: {e}"),
        }
        // Every live room on a non-live or other-region process? checked by invariants.
        for p in processes(s).await {
            if p.rooms_allocated > 0 {
                assert!(
                    p.status.is_live(),
                    "round {round}: {:?} process holds rooms",
                    p.status
                );
            }
        }
    }
    s.settle().await;
    check_invariants(s).await;
}

async fn run(seed: u64) {
    let backend = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(REGIONS)
        .backend(backend.clone())
        .max_processes(12)
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    s.create_deployment(APP, spec(&mut rng)).await.unwrap();
    let rooms = Arc::new(Mutex::new(Vec::<String>::new()));
    for round in 0..25 {
        let mut tasks = vec![];
        for t in 0..16u64 {
            let (s, rooms, backend) = (s.clone(), Arc::clone(&rooms), backend.clone());
            let mut rng = StdRng::seed_from_u64(seed * 1_000_003 + round as u64 * 101 + t);
            tasks.push(tokio::spawn(async move {
                for _ in 0..30 {
                    let region = REGIONS[rng.random_range(0..REGIONS.len())];
                    let op = rng.random_range(0..100);
                    match op {
                        0..=49 => match s.create_room(room_in(region)).await {
                            Ok(r) => rooms.lock().unwrap().push(r.room_id),
                            Err(Error::ResourceExhausted { .. }) => {}
                            Err(e) => panic!("create: {e}"),
                        },
                        50..=74 => {
                            let id = {
                                let v = rooms.lock().unwrap();
                                if v.is_empty() || rng.random_bool(0.05) {
                                    "nope".to_string()
                                } else {
                                    v[rng.random_range(0..v.len())].clone()
                                }
                            };
                            match s.destroy_room(APP, &id).await {
                                Ok(()) | Err(Error::NotFound(_)) => {}
                                Err(e) => panic!("destroy: {e}"),
                            }
                        }
                        75..=94 => {
                            let procs = processes(&s).await;
                            if procs.is_empty() {
                                continue;
                            }
                            let p = procs[rng.random_range(0..procs.len())].process_id;
                            match op {
                                75..=82 => {
                                    s.drain_process(APP, p).await.unwrap();
                                }
                                83..=88 => {
                                    s.stop_process(APP, p).await.unwrap();
                                }
                                _ => backend.exit(p, ExitStatus::Code(rng.random_range(0..2))),
                            }
                        }
                        95..=97 => match s.create_process(APP, region, None).await {
                            Ok(_) | Err(Error::ResourceExhausted { .. }) => {}
                            Err(Error::FailedPrecondition(_)) => {} // a newer deployment raced
                            Err(e) => panic!("create_process: {e}"),
                        },
                        _ => {
                            let sp = spec(&mut rng);
                            s.create_deployment(APP, sp).await.unwrap();
                        }
                    }
                    check_invariants_light(&s).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        oracle_check(&s, &rooms, round).await;
    }
}

/// Capacity only (cheap enough to run while others are busy).
async fn check_invariants_light(s: &Scheduler) {
    for p in processes(s).await {
        assert!(
            p.rooms_allocated <= p.rooms_per_process,
            "over capacity: {p:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_random_operations_keep_the_index_exact() {
    let n: u64 = std::env::var("SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    for seed in 0..n {
        run(seed).await;
    }
}

/// A burst of N concurrent creates in an empty region starts exactly ⌈N / rpp⌉ processes,
/// for both strategies and for a second deployment of the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bursts_start_exactly_ceil_n_over_rpp_with_both_strategies() {
    for (i, strategy) in [PlacementStrategy::MostFree, PlacementStrategy::FewestFree]
        .into_iter()
        .enumerate()
    {
        for rpp in [1u32, 3, 7] {
            for manual in [false, true] {
                let backend = if manual {
                    ManualBackend::new()
                } else {
                    ManualBackend::automatic()
                };
                let s = Scheduler::builder()
                    .regions(REGIONS)
                    .backend(backend.clone())
                    .build()
                    .unwrap();
                s.create_deployment(APP, deployment(4)).await.unwrap();
                s.create_deployment(
                    APP,
                    DeploymentSpec {
                        placement_strategy: strategy,
                        ..deployment(rpp)
                    },
                )
                .await
                .unwrap();
                let n = 61u32;
                let mut tasks = vec![];
                for _ in 0..n {
                    let s = s.clone();
                    tasks.push(tokio::spawn(async move {
                        s.create_room(CreateRoom {
                            app_id: APP.into(),
                            region: REGIONS[i].into(),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                s.settle().await;
                let procs = processes(&s).await;
                assert_eq!(
                    procs.len() as u32,
                    n.div_ceil(rpp),
                    "{strategy:?} rpp {rpp} manual {manual}"
                );
                assert!(procs.iter().all(|p| p.deployment_id == 2));
                check_invariants(&s).await;
            }
        }
    }
}
