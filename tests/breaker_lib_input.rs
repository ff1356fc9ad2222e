//! Breaker: bad input through the library API (SPEC §7) changes nothing.
mod support;
use roomsched::{CreateRoom, Error, RegionPolicy, Scheduler};
use support::*;

#[tokio::test]
async fn bad_library_input() -> TestResult {
    let b = ManualBackend::automatic();
    let s = Scheduler::builder()
        .regions(["Frankfurt", "Tokyo"])
        .backend(b.clone())
        .build()?;
    s.create_deployment(APP, deployment(2)).await?;
    s.create_deployment("other", deployment(2)).await?;
    let other = s
        .create_room(CreateRoom {
            app_id: "other".into(),
            region: "Tokyo".into(),
            ..Default::default()
        })
        .await?;
    let r = s.create_room(room_in("Frankfurt")).await?;
    s.settle().await;
    let before = processes(&s).await;
    let mut out = vec![];
    out.push((
        "create_room dep 99",
        format!(
            "{:?}",
            s.create_room(CreateRoom {
                deployment_id: Some(99),
                ..room_in("Tokyo")
            })
            .await
            .map(|_| ())
        ),
    ));
    out.push((
        "create_process dep 99",
        format!(
            "{:?}",
            s.create_process(APP, "Tokyo", Some(99)).await.map(|_| ())
        ),
    ));
    out.push((
        "get_deployment 0",
        format!("{:?}", s.get_deployment(APP, 0).await.map(|_| ())),
    ));
    out.push((
        "get_deployment 99",
        format!("{:?}", s.get_deployment(APP, 99).await.map(|_| ())),
    ));
    out.push((
        "drain other app's process",
        format!(
            "{:?}",
            s.drain_process(APP, other.process_id).await.map(|_| ())
        ),
    ));
    out.push((
        "stop other app's process",
        format!(
            "{:?}",
            s.stop_process(APP, other.process_id).await.map(|_| ())
        ),
    ));
    out.push((
        "destroy other app's room",
        format!("{:?}", s.destroy_room(APP, &other.room_id).await),
    ));
    out.push((
        "get other app's room",
        format!("{:?}", s.get_room(APP, &other.room_id).await.map(|_| ())),
    ));
    out.push((
        "policy min>max",
        format!(
            "{:?}",
            s.set_region_policy(
                APP,
                "Tokyo",
                RegionPolicy {
                    min_processes: 3,
                    buffer_rooms: 0,
                    max_processes: 2
                }
            )
            .await
            .map(|_| ())
        ),
    ));
    out.push((
        "room_config 10001 update",
        format!(
            "{:?}",
            s.update_room_config(APP, &r.room_id, "x".repeat(10_001))
                .await
                .map(|_| ())
        ),
    ));
    out.push((
        "room_config 10000 multibyte",
        format!(
            "{:?}",
            s.update_room_config(APP, &r.room_id, "é".repeat(5_000))
                .await
                .map(|_| ())
        ),
    ));
    out.push((
        "room_id 101",
        format!(
            "{:?}",
            s.create_room(CreateRoom {
                room_id: Some("a".repeat(101)),
                ..room_in("Tokyo")
            })
            .await
            .map(|_| ())
        ),
    ));
    out.push((
        "room_id unicode",
        format!(
            "{:?}",
            s.create_room(CreateRoom {
                room_id: Some("é".into()),
                ..room_in("Tokyo")
            })
            .await
            .map(|_| ())
        ),
    ));
    out.push((
        "region lowercase",
        format!("{:?}", s.create_room(room_in("tokyo")).await.map(|_| ())),
    ));
    out.push((
        "region trailing space",
        format!("{:?}", s.create_room(room_in("Tokyo ")).await.map(|_| ())),
    ));
    out.push((
        "no deployment app",
        format!(
            "{:?}",
            s.create_room(CreateRoom {
                app_id: "nodep".into(),
                region: "Tokyo".into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
        ),
    ));
    out.push((
        "no deployment process",
        format!(
            "{:?}",
            s.create_process("nodep", "Tokyo", None).await.map(|_| ())
        ),
    ));
    out.push((
        "destroy twice 1",
        format!("{:?}", s.destroy_room(APP, &r.room_id).await),
    ));
    out.push((
        "destroy twice 2",
        format!("{:?}", s.destroy_room(APP, &r.room_id).await),
    ));
    out.push((
        "retry destroyed id",
        format!(
            "{:?}",
            s.create_room(CreateRoom {
                room_id: Some(r.room_id.clone()),
                ..room_in("Frankfurt")
            })
            .await
            .map(|_| ())
        ),
    ));
    out.push((
        "deployment rpp 0",
        format!(
            "{:?}",
            s.create_deployment(APP, deployment(0)).await.map(|_| ())
        ),
    ));
    out.push((
        "deployment rpp 10001",
        format!(
            "{:?}",
            s.create_deployment(APP, deployment(10_001))
                .await
                .map(|_| ())
        ),
    ));
    out.push((
        "deployment port 0",
        format!(
            "{:?}",
            s.create_deployment(
                APP,
                roomsched::DeploymentSpec {
                    container_port: 0,
                    ..deployment(1)
                }
            )
            .await
            .map(|_| ())
        ),
    ));
    out.push((
        "deployment port 65536",
        format!(
            "{:?}",
            s.create_deployment(
                APP,
                roomsched::DeploymentSpec {
                    container_port: 65536,
                    ..deployment(1)
                }
            )
            .await
            .map(|_| ())
        ),
    ));
    for (k, v) in &out {
        println!("{k}: {v}");
    }
    s.settle().await;
    let after = processes(&s).await;
    println!("processes before {} after {}", before.len(), after.len());
    println!("deployments {}", s.list_deployments(APP).await?.len());
    println!(
        "policy Tokyo {:?}",
        s.get_region_policy(APP, "Tokyo").await?
    );
    let _ = Error::NotFound(String::new());
    Ok(())
}
