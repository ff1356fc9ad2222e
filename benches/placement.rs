//! Placement cost in the library: CreateRoom + DestroyRoom pairs in one region holding
//! 1,000 / 10,000 / 100,000 running processes. With an ordered index the cost per pair should
//! grow at most logarithmically with the number of processes.
//!
//! Run: `cargo bench --bench placement`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use roomsched::backend::{Backend, BackendError, ProcessEvents, StartSpec};
use roomsched::{
    CreateRoom, DeploymentSpec, ExposedPort, ProcessFilter, ProcessId, ProcessStatus, Scheduler,
    TransportType,
};
use std::time::{Duration, Instant};

const APP: &str = "bench";

/// Processes bind the moment they start; nothing else. Keeps the backend out of the numbers.
struct InstantBackend;

impl Backend for InstantBackend {
    fn name(&self) -> &'static str {
        "instant"
    }

    fn start(&self, spec: StartSpec) -> Result<(), BackendError> {
        let port = ExposedPort {
            host: "127.0.0.1".into(),
            name: "default".into(),
            port: 7777,
            transport_type: TransportType::Tcp,
        };
        ProcessEvents::bound(&spec.events, spec.process_id, port, vec![]);
        Ok(())
    }

    fn stop(&self, _process_id: ProcessId, _grace: Duration) {}
}

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

criterion_group!(benches, create_destroy);
criterion_main!(benches);
