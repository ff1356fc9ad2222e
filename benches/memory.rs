//! Memory per live room and per process: grows a scheduler to 1,000,000 live rooms and
//! reports the resident set size it added, per room and per process.
//!
//! Run: `cargo bench --bench memory` (prints the figures; takes about a minute).

mod common;

use common::InstantBackend;
use roomsched::{CreateRoom, DeploymentSpec, RegionPolicy, Scheduler};

const APP: &str = "memory";

/// Resident set size of this process, in bytes (Linux).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let rooms: u64 = 1_000_000;
    let rooms_per_process: u32 = 100;
    let processes = rooms / u64::from(rooms_per_process);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let s = Scheduler::builder()
            .regions(["Frankfurt"])
            .backend(InstantBackend)
            .default_region_policy(RegionPolicy {
                max_processes: 100_000,
                ..Default::default()
            })
            .build()
            .expect("scheduler");
        let spec = DeploymentSpec {
            rooms_per_process,
            container_port: 7777,
            ..Default::default()
        };
        s.create_deployment(APP, spec).await.expect("deployment");

        let before_processes = rss();
        for _ in 0..processes {
            s.create_process(APP, "Frankfurt", None)
                .await
                .expect("process");
        }
        s.settle().await;
        let after_processes = rss();

        for _ in 0..rooms {
            s.create_room(CreateRoom {
                app_id: APP.into(),
                region: "Frankfurt".into(),
                ..Default::default()
            })
            .await
            .expect("room");
        }
        let after_rooms = rss();

        let per_process = (after_processes - before_processes) as f64 / processes as f64;
        let per_room = (after_rooms - after_processes) as f64 / rooms as f64;
        println!("processes            {processes} ({rooms_per_process} rooms each)");
        println!("live rooms           {rooms}");
        println!("bytes per process    {per_process:.0}  (target <= 2048)");
        println!("bytes per live room  {per_room:.0}  (target <= 512)");
        println!(
            "total rss            {:.1} MiB",
            after_rooms as f64 / (1024.0 * 1024.0)
        );
    });
}
