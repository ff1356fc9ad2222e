//! Breaker: the warm pool reads the index's counters (available processes, free slots); after
//! concurrent random operations with both strategies and new deployments, every region must
//! hold its minimum and its buffer of free slots on the latest deployment (SPEC §6), and the
//! invariants of `support::check_invariants` must hold.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roomsched::backend::ExitStatus;
use roomsched::{DeploymentSpec, Error, PlacementStrategy, ProcessStatus, RegionPolicy, Scheduler};
use std::sync::{Arc, Mutex};
use support::*;

const REGIONS: [&str; 2] = ["Frankfurt", "Tokyo"];

async fn run(seed: u64) {
    let backend = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(REGIONS)
        .backend(backend.clone())
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mk = |rng: &mut StdRng| DeploymentSpec {
        placement_strategy: if rng.random_bool(0.5) {
            PlacementStrategy::MostFree
        } else {
            PlacementStrategy::FewestFree
        },
        ..deployment(rng.random_range(1..=5))
    };
    s.create_deployment(APP, mk(&mut rng)).await.unwrap();
    let policy = RegionPolicy {
        min_processes: rng.random_range(0..=3),
        buffer_rooms: rng.random_range(0..=7),
        max_processes: 10,
    };
    for r in REGIONS {
        s.set_region_policy(APP, r, policy).await.unwrap();
    }
    let rooms = Arc::new(Mutex::new(Vec::<String>::new()));
    for round in 0..15 {
        let mut tasks = vec![];
        for t in 0..8u64 {
            let (s, rooms, backend) = (s.clone(), Arc::clone(&rooms), backend.clone());
            let mut rng = StdRng::seed_from_u64(seed * 7919 + round * 31 + t);
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    let region = REGIONS[rng.random_range(0..2)];
                    match rng.random_range(0..100) {
                        0..=49 => match s.create_room(room_in(region)).await {
                            Ok(r) => rooms.lock().unwrap().push(r.room_id),
                            Err(Error::ResourceExhausted { .. }) => {}
                            Err(e) => panic!("{e}"),
                        },
                        50..=79 => {
                            let id = {
                                let v = rooms.lock().unwrap();
                                if v.is_empty() {
                                    continue;
                                }
                                v[rng.random_range(0..v.len())].clone()
                            };
                            let _ = s.destroy_room(APP, &id).await;
                        }
                        80..=96 => {
                            let procs = processes(&s).await;
                            if procs.is_empty() {
                                continue;
                            }
                            let p = procs[rng.random_range(0..procs.len())].process_id;
                            match rng.random_range(0..3) {
                                0 => {
                                    s.drain_process(APP, p).await.unwrap();
                                }
                                1 => {
                                    s.stop_process(APP, p).await.unwrap();
                                }
                                _ => backend.exit(p, ExitStatus::Code(0)),
                            }
                        }
                        _ => {
                            let mut r2 = StdRng::seed_from_u64(rng.random());
                            s.create_deployment(APP, mk(&mut r2)).await.unwrap();
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        s.settle().await;
        check_invariants(&s).await;
        let latest = s.latest_deployment(APP).await.unwrap().deployment_id;
        let procs = processes(&s).await;
        for region in REGIONS {
            let mine: Vec<_> = procs.iter().filter(|p| p.region == region).collect();
            let live = mine.iter().filter(|p| p.status.is_live()).count() as u32;
            let pool: Vec<_> = mine
                .iter()
                .filter(|p| {
                    p.deployment_id == latest
                        && matches!(p.status, ProcessStatus::Running | ProcessStatus::Starting)
                })
                .collect();
            let free: u32 = pool
                .iter()
                .map(|p| p.rooms_per_process - p.rooms_allocated)
                .sum();
            if live < policy.max_processes {
                assert!(
                    pool.len() as u32 >= policy.min_processes && free >= policy.buffer_rooms,
                    "seed {seed} round {round} {region}: pool {} procs {} free, policy {policy:?}, live {live}",
                    pool.len(),
                    free
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_pool_holds_after_concurrent_churn() {
    let n: u64 = std::env::var("SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    for seed in 0..n {
        run(seed).await;
    }
}
