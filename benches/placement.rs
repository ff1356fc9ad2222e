//! Placement cost in the library:
//! - `create_destroy_pair/N`: CreateRoom + DestroyRoom pairs in one region holding N running
//!   processes (1,000 / 10,000 / 100,000). With an ordered index the cost per pair should grow
//!   at most logarithmically with N.
//! - `contended/R`: the same pairs from 4 tasks on a 2-thread runtime spread over R regions
//!   (R = 1: every task contends for one shard lock).
//! - `index_vs_scan/N`: the ablation — picking the process with the most free slots and
//!   updating its rank: `grouped`, the index the scheduler uses (an ordered set per rank, in
//!   a map keyed by rank); `flat`, one ordered set keyed by (rank, time, id), the scheduler's
//!   index before 2026-12-04; and `scan`, a plain linear scan over N processes.
//!
//! Run: `cargo bench --bench placement`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
mod common;
#[path = "common/pairs.rs"]
mod pairs;

use common::InstantBackend;
use pairs::{populated, room, APP};
use roomsched::{CreateRoom, DeploymentSpec, Scheduler};
use std::time::{Duration, Instant};

/// The allocator the `roomsched` binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn create_destroy(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("create_destroy_pair");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for n in [1_000, 10_000, 100_000] {
        let s = rt.block_on(populated(n));
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
/// slots, put it back) on the two shapes of ordered index versus a linear scan.
fn index_vs_scan(c: &mut Criterion) {
    use std::collections::{BTreeMap, BTreeSet};
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
        let mut grouped: BTreeMap<u32, BTreeSet<(u64, u64)>> = BTreeMap::new();
        for &(rank, t, id) in &index {
            grouped.entry(rank).or_default().insert((t, id));
        }
        group.bench_with_input(BenchmarkId::new("grouped", n), &n, |b, _| {
            b.iter(|| {
                // The first of the best rank; taking a slot moves it to the next rank's set,
                // freeing it moves it back (an emptied set leaves the map, as in the scheduler).
                let mut best = grouped.first_entry().expect("a rank");
                let rank = *best.key();
                let order = best.get_mut().pop_first().expect("a process");
                if best.get().is_empty() {
                    best.remove();
                }
                grouped.entry(rank + 1).or_default().insert(order);
                let next = grouped.get_mut(&(rank + 1)).expect("just inserted");
                next.remove(&order);
                if next.is_empty() {
                    grouped.remove(&(rank + 1));
                }
                grouped.entry(rank).or_default().insert(order);
            })
        });
        group.bench_with_input(BenchmarkId::new("flat", n), &n, |b, _| {
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
