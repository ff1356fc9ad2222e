//! Placement cost in the library:
//! - `create_destroy_pair/N`: CreateRoom + DestroyRoom pairs in one region holding N running
//!   processes (1,000 / 10,000 / 100,000). With an ordered index the cost per pair should grow
//!   at most logarithmically with N.
//! - `contended/R`: the same pairs from 4 tasks on a 2-thread runtime spread over R regions
//!   (R = 1: every task contends for one shard lock).
//! - `index_vs_scan/N`: the ablation — picking the process with the most free slots and
//!   updating its rank, with the ordered index the scheduler uses (a BTreeSet keyed by rank)
//!   versus a plain linear scan over N processes.
//!
//! Run: `cargo bench --bench placement`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
mod common;

use common::InstantBackend;
use roomsched::{CreateRoom, DeploymentSpec, ProcessFilter, ProcessStatus, Scheduler};
use std::time::{Duration, Instant};

/// The allocator the `roomsched` binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const APP: &str = "bench";

/// A scheduler with `n` RUNNING processes of 4 slots each, every one holding 2 rooms.
fn populated(rt: &tokio::runtime::Runtime, n: usize) -> Scheduler {
    rt.block_on(async {
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
    })
}

fn room() -> CreateRoom {
    CreateRoom {
        app_id: APP.into(),
        region: "Frankfurt".into(),
        ..Default::default()
    }
}

fn create_destroy(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("create_destroy_pair");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for n in [1_000, 10_000, 100_000] {
        let s = populated(&rt, n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let r = s.create_room(room()).await.expect("create");
                        s.destroy_room(APP, &r.room_id).await.expect("destroy");
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

fn contended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("contended");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    const REGIONS: [&str; 4] = ["Frankfurt", "Tokyo", "London", "Chicago"];
    for regions in [1usize, 4] {
        let s = rt.block_on(async {
            let s = Scheduler::builder()
                .regions(REGIONS)
                .backend(InstantBackend)
                .max_processes(10_000)
                .build()
                .expect("scheduler");
            let spec = DeploymentSpec {
                rooms_per_process: 100,
                container_port: 7777,
                ..Default::default()
            };
            s.create_deployment(APP, spec).await.expect("deployment");
            s
        });
        group.bench_with_input(
            BenchmarkId::from_parameter(regions),
            &regions,
            |b, &regions| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..4)
                            .map(|t| {
                                let s = s.clone();
                                let region = REGIONS[t % regions];
                                tokio::spawn(async move {
                                    for _ in 0..iters.div_ceil(4) {
                                        let req = CreateRoom {
                                            app_id: APP.into(),
                                            region: region.into(),
                                            ..Default::default()
                                        };
                                        let r = s.create_room(req).await.expect("create");
                                        s.destroy_room(APP, &r.room_id).await.expect("destroy");
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.expect("task");
                        }
                        start.elapsed()
                    })
                })
            },
        );
    }
    group.finish();
}

/// The ablation: one placement step (take the best process, give it one room fewer free
/// slots, put it back) on an ordered index versus a linear scan.
fn index_vs_scan(c: &mut Criterion) {
    use std::collections::BTreeSet;
    let mut group = c.benchmark_group("index_vs_scan");
    for n in [1_000u32, 10_000, 100_000] {
        // (free slots, started_at, id) for n processes with 1..=100 free slots.
        let procs: Vec<(u32, u64, u64)> = (0..n)
            .map(|i| (1 + (i * 7919) % 100, u64::from(i), u64::from(i)))
            .collect();
        let mut index: BTreeSet<(u32, u64, u64)> = procs
            .iter()
            .map(|&(free, t, id)| (u32::MAX - free, t, id))
            .collect();
        group.bench_with_input(BenchmarkId::new("index", n), &n, |b, _| {
            b.iter(|| {
                let best = index.pop_first().expect("a process");
                // Take a slot, then free it again so the state stays the same.
                index.insert((best.0 + 1, best.1, best.2));
                let taken = index
                    .take(&(best.0 + 1, best.1, best.2))
                    .expect("just inserted");
                index.insert((taken.0 - 1, taken.1, taken.2));
            })
        });
        let mut scan = procs.clone();
        group.bench_with_input(BenchmarkId::new("scan", n), &n, |b, _| {
            b.iter(|| {
                let best = (0..scan.len())
                    .max_by_key(|&i| {
                        (
                            scan[i].0,
                            std::cmp::Reverse(scan[i].1),
                            std::cmp::Reverse(scan[i].2),
                        )
                    })
                    .expect("a process");
                scan[best].0 -= 1;
                scan[best].0 += 1;
            })
        });
    }
    group.finish();
}

criterion_group!(benches, create_destroy, contended, index_vs_scan);
criterion_main!(benches);
