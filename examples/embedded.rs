//! roomsched as a library: the same scheduler the gRPC service runs, in-process.
//!
//! Run: `cargo run --example embedded`

use roomsched::backend::{Simulated, SimulatedConfig};
use roomsched::{CreateRoom, DeploymentSpec, ProcessFilter, Scheduler};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), roomsched::Error> {
    let scheduler = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo", "London"])
        .backend(Simulated::new(SimulatedConfig {
            start_delay: Duration::from_millis(100),
            ..Default::default()
        }))
        .build()?;

    let deployment = DeploymentSpec {
        rooms_per_process: 4,
        container_port: 7777,
        ..Default::default()
    };
    scheduler.create_deployment("my-game", deployment).await?;

    let mut rooms = Vec::new();
    for region in ["Frankfurt", "Frankfurt", "Tokyo", "London"] {
        let room = scheduler
            .create_room(CreateRoom {
                app_id: "my-game".into(),
                region: region.into(),
                ..Default::default()
            })
            .await?;
        println!(
            "room {} in {region} on process {} ({:?})",
            room.room_id, room.process_id, room.status
        );
        rooms.push(room);
    }

    // Wait until the first room's process is RUNNING and players can connect.
    let mut watch = scheduler
        .watch_connection_info("my-game", &rooms[0].room_id)
        .await?;
    while let Some(info) = watch.next().await {
        match info.exposed_port {
            Some(port) => println!(
                "players of {} connect to {}:{}",
                info.room_id, port.host, port.port
            ),
            None => println!("room {} is waiting for its process to start", info.room_id),
        }
    }

    let processes = scheduler
        .list_processes(
            &ProcessFilter {
                app_id: "my-game".into(),
                ..Default::default()
            },
            100,
            None,
        )
        .await?;
    for p in processes.processes {
        println!(
            "process {} in {}: {:?}, {}/{} rooms",
            p.process_id, p.region, p.status, p.rooms_allocated, p.rooms_per_process
        );
    }

    for room in rooms {
        scheduler.destroy_room("my-game", &room.room_id).await?;
    }
    Ok(())
}
