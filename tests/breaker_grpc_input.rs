//! Breaker (held up; kept as regression tests): hostile values over gRPC — enum numbers out of
//! range, strings with NUL, look-alike Unicode and stray whitespace, page sizes of 0 and
//! u32::MAX, forged page tokens. Each is INVALID_ARGUMENT (naming the field) or a correct
//! answer, never INTERNAL, and changes nothing (SPEC §3, §7).

mod common;

use common::*;
use roomsched::grpc::pb;
use std::collections::HashSet;
use tonic::Code;

#[tokio::test]
async fn enum_numbers_out_of_range_are_invalid_argument_and_change_nothing() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment("game", 4).await?;
    let room = s.create_room("game", "Frankfurt").await?;
    s.wait_running("game", &room.process_id).await?;
    let before = (s.snapshot("game").await?, s.list_deployments("game").await?);

    for bad in [-1, 0, 7, 1000, i32::MAX, i32::MIN] {
        let statuses = vec![pb::ProcessStatus::Running as i32, bad];
        let listed = s
            .processes
            .clone()
            .list_processes(pb::ListProcessesRequest {
                app_id: "game".into(),
                statuses: statuses.clone(),
                ..Default::default()
            })
            .await;
        expect_error(listed, Code::InvalidArgument, &["statuses"])?;
        let counted = s
            .processes
            .clone()
            .count_processes(pb::CountProcessesRequest {
                app_id: "game".into(),
                statuses,
                regions: vec![],
            })
            .await;
        expect_error(counted, Code::InvalidArgument, &["statuses"])?;
    }
    for bad in [-1, 4, i32::MAX] {
        let req = pb::CreateDeploymentRequest {
            transport_type: bad,
            ..deployment_request("game", 4)
        };
        let r = s.deployments.clone().create_deployment(req).await;
        expect_error(r, Code::InvalidArgument, &["transport_type"])?;
        let req = pb::CreateDeploymentRequest {
            placement_strategy: bad.saturating_sub(1),
            ..deployment_request("game", 4)
        };
        let r = s.deployments.clone().create_deployment(req).await;
        expect_error(r, Code::InvalidArgument, &["placement_strategy"])?;
        let req = pb::CreateDeploymentRequest {
            additional_container_ports: vec![pb::ContainerPort {
                name: "voice".into(),
                port: 7000,
                transport_type: bad,
            }],
            ..deployment_request("game", 4)
        };
        let r = s.deployments.clone().create_deployment(req).await;
        expect_error(r, Code::InvalidArgument, &["additional_container_ports"])?;
    }
    let after = (s.snapshot("game").await?, s.list_deployments("game").await?);
    assert_eq!(before, after, "refused requests changed something");
    Ok(())
}

#[tokio::test]
async fn nul_lookalike_and_whitespace_strings_are_invalid_argument() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment("game", 4).await?;
    let room = s.create_room("game", "Frankfurt").await?;
    s.wait_running("game", &room.process_id).await?;
    let before = s.snapshot("game").await?;

    let bad_ids = [
        "game\0",
        "ga\0me",
        "game ",
        "\u{200b}game",
        "gаme", // Cyrillic а
        "ｇａｍｅ",
        "game\n",
        "🎮",
        "",
    ];
    for app in bad_ids {
        let r = s.create_room_with(room_request(app, "Frankfurt")).await;
        let status = r.expect_err("bad app id").downcast::<tonic::Status>()?;
        assert_eq!(status.code(), Code::InvalidArgument, "app {app:?}");
        assert!(status.message().contains("app_id"), "{}", status.message());
        expect_error(
            s.get_room(app, &room.room_id).await,
            Code::InvalidArgument,
            &["app_id"],
        )?;
    }
    for region in [
        "Frankfurt\0",
        "Frankfurt ",
        " Frankfurt",
        "frankfurt",
        "FRANKFURT",
        "Frankfurt\u{200b}",
        "Ｆrankfurt",
        "",
    ] {
        let r = s.create_room_with(room_request("game", region)).await;
        let status = r.expect_err("bad region").downcast::<tonic::Status>()?;
        assert_eq!(status.code(), Code::InvalidArgument, "region {region:?}");
        assert!(status.message().contains("region"));
    }
    for id in bad_ids.iter().filter(|id| !id.is_empty()) {
        let r = s
            .create_room_with(pb::CreateRoomRequest {
                room_id: id.to_string(),
                ..room_request("game", "Frankfurt")
            })
            .await;
        let status = r.expect_err("bad room id").downcast::<tonic::Status>()?;
        assert_eq!(status.code(), Code::InvalidArgument, "room id {id:?}");
        assert!(status.message().contains("room_id"));
        expect_error(
            s.destroy_room("game", id).await,
            Code::InvalidArgument,
            &["room_id"],
        )?;
    }
    // A room_config is opaque: NUL, any Unicode, 10,000 bytes exactly are kept verbatim.
    let config = format!("\0x{}\u{10ffff}", "é".repeat(4_997));
    assert_eq!(config.len(), 10_000);
    let r = s
        .create_room_with(pb::CreateRoomRequest {
            room_config: config.clone(),
            ..room_request("game", "Frankfurt")
        })
        .await?;
    assert_eq!(s.get_room("game", &r.room_id).await?.room_config, config);
    let over = format!("{config}\0");
    let refused = s
        .create_room_with(pb::CreateRoomRequest {
            room_config: over,
            ..room_request("game", "Frankfurt")
        })
        .await;
    let status = refused
        .expect_err("10,001 bytes")
        .downcast::<tonic::Status>()?;
    assert_eq!(status.code(), Code::InvalidArgument);
    s.destroy_room("game", &r.room_id).await?;

    // Malformed process ids name no process.
    for pid in [
        "",
        "\0",
        "00000000-0000-0000-0000-000000000000",
        "not-a-uuid",
        &"f".repeat(10_000),
    ] {
        expect_error(s.get_process("game", pid).await, Code::NotFound, &[])?;
    }
    assert_eq!(s.snapshot("game").await?, before);
    Ok(())
}

async fn page(
    s: &TestServer,
    page_size: u32,
    page_token: &str,
    regions: &[&str],
) -> Result<pb::ListProcessesResponse, tonic::Status> {
    Ok(s.processes
        .clone()
        .list_processes(pb::ListProcessesRequest {
            app_id: "game".into(),
            page_size,
            page_token: page_token.into(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

#[tokio::test]
async fn page_sizes_and_forged_page_tokens() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment("game", 1).await?;
    for i in 0..1_050 {
        let region = if i % 3 == 0 { "Tokyo" } else { "Frankfurt" };
        s.scheduler.create_process("game", region, None).await?;
    }
    let everything = s.all_processes("game").await?;
    assert_eq!(everything.len(), 1_050);

    let default = page(&s, 0, "", &[]).await?;
    assert_eq!(default.processes.len(), 100, "page_size 0 means 100");
    let capped = page(&s, u32::MAX, "", &[]).await?;
    assert_eq!(capped.processes.len(), 1_000, "capped at 1000");
    let rest = page(&s, u32::MAX, &capped.next_page_token, &[]).await?;
    assert_eq!(rest.processes.len(), 50);
    assert!(rest.next_page_token.is_empty());

    // Small pages visit every process once, newest first.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let p = page(&s, 7, &token, &[]).await?;
        seen.extend(p.processes.into_iter().map(|p| p.process_id));
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    let ids: Vec<_> = everything.iter().map(|p| p.process_id.clone()).collect();
    assert_eq!(seen, ids);

    // A token from another filter is a position, not an error: no duplicates, no gaps.
    let tokyo = page(&s, 10, "", &["Tokyo"]).await?;
    let frankfurt_after = page(&s, 1_000, &tokyo.next_page_token, &["Frankfurt"]).await?;
    let unique: HashSet<_> = frankfurt_after
        .processes
        .iter()
        .map(|p| &p.process_id)
        .collect();
    assert_eq!(unique.len(), frankfurt_after.processes.len());
    assert!(frankfurt_after
        .processes
        .iter()
        .all(|p| p.region == "Frankfurt"));

    // Forged tokens of the right shape are positions too; others are INVALID_ARGUMENT.
    let nil = "00000000000000000000000000000000";
    let first = page(&s, 5, &format!("{}.{nil}", i64::MIN), &[]).await?;
    assert_eq!(first.processes.len(), 5);
    let past_end = page(&s, 5, &format!("{}.{nil}", i64::MAX), &[]).await?;
    assert!(past_end.processes.is_empty() && past_end.next_page_token.is_empty());
    for garbage in [
        ".",
        "1.",
        ".00000000000000000000000000000000",
        "1.2.3",
        "99999999999999999999.00000000000000000000000000000000",
        "1.zz",
        "\0",
        "１.00000000000000000000000000000000",
    ] {
        expect_error(
            page(&s, 5, garbage, &[]).await,
            Code::InvalidArgument,
            &["page_token"],
        )
        .map_err(|e| format!("token {garbage:?}: {e}"))?;
    }
    let huge = "9".repeat(100_000);
    expect_error(
        page(&s, 5, &huge, &[]).await,
        Code::InvalidArgument,
        &["page_token"],
    )?;
    Ok(())
}
