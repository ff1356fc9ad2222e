//! Restart time of the durable store: fills a store with 1,000,000 live rooms (10,000
//! processes of 100 rooms over 10 regions), drops the scheduler as a crash would, then times
//! how long a new scheduler takes to open the store, rebuild every shard and answer a read.
//!
//! Run: `cargo bench --bench recovery` (prints the figures; takes a few minutes, most of it
//! filling the store). `ROOMS=100000 cargo bench --bench recovery` for a quicker look.

use roomsched::backend::Simulated;
use roomsched::store::DurableStore;
use roomsched::{CreateRoom, DeploymentSpec, ProcessFilter, RegionPolicy, Scheduler};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const APP: &str = "recovery";
const REGIONS: [&str; 10] = [
    "Seattle",
    "London",
    "Frankfurt",
    "Mumbai",
    "Singapore",
    "Tokyo",
    "Sydney",
    "Dallas",
    "Dubai",
    "Chicago",
];
/// Calls in flight while filling: enough for group commit to share each fsync widely.
const TASKS: u64 = 512;

fn scheduler(dir: &std::path::Path) -> Scheduler {
    // The previous scheduler's store closes on its writer thread once the last handle is
    // dropped: wait for the file lock.
    let deadline = Instant::now() + Duration::from_secs(30);
    let store = loop {
        match DurableStore::open(dir) {
            Ok(store) => break store,
            Err(e) if Instant::now() < deadline && e.0.contains("in use") => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    };
    Scheduler::builder()
        .regions(REGIONS)
        .backend(Simulated::default())
        .store(store)
        .default_region_policy(RegionPolicy {
            max_processes: 100_000,
            ..Default::default()
        })
        .build()
        .expect("scheduler")
}

fn main() {
    let rooms: u64 = std::env::var("ROOMS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("roomsched-recovery-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let filled = Instant::now();
    rt.block_on(async {
        let s = scheduler(&dir);
        let spec = DeploymentSpec {
            rooms_per_process: 100,
            container_port: 7777,
            ..Default::default()
        };
        s.create_deployment(APP, spec).await.expect("deployment");
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let (s, next) = (s.clone(), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= rooms {
                        return;
                    }
                    s.create_room(CreateRoom {
                        app_id: APP.into(),
                        region: REGIONS[(i % REGIONS.len() as u64) as usize].into(),
                        ..Default::default()
                    })
                    .await
                    .expect("room");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
    let fill_seconds = filled.elapsed().as_secs_f64();
    let file = std::fs::metadata(dir.join(roomsched::store::durable::FILE_NAME))
        .map(|m| m.len())
        .unwrap_or(0);

    // The crash: every handle is dropped, nothing is shut down.
    let restarted = Instant::now();
    let (processes, ready) = rt.block_on(async {
        let s = scheduler(&dir);
        let processes = s
            .count_processes(&ProcessFilter {
                app_id: APP.into(),
                ..Default::default()
            })
            .await
            .expect("read");
        (processes, restarted.elapsed())
    });
    println!("live rooms              {rooms} ({processes} processes, 10 regions)");
    println!(
        "filled in               {fill_seconds:.1} s ({:.0} durable CreateRoom/s, {TASKS} in flight)",
        rooms as f64 / fill_seconds
    );
    println!(
        "store file              {:.1} MiB ({:.0} bytes per room)",
        file as f64 / (1024.0 * 1024.0),
        file as f64 / rooms as f64
    );
    println!(
        "restart to first read   {:.2} s  (target <= 5 s at 1,000,000 rooms)",
        ready.as_secs_f64()
    );
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}
