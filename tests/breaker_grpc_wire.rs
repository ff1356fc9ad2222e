//! Breaker: requests that are malformed on the wire. A proto3 `string` field must hold UTF-8;
//! a client that sends other bytes (a hand-rolled or buggy client, a `bytes` field in a forked
//! proto) gets INTERNAL from the decoder, which SPEC §7 reserves for bugs ("INTERNAL means a
//! bug"; "every bad input is refused with a clear message naming the field"). Nothing must
//! change either way.

mod common;

use common::*;
use roomsched::grpc::pb;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::Code;

/// `CreateRoomRequest` with `room_config` (field 3) as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCreateRoomRequest {
    #[prost(string, tag = "1")]
    app_id: String,
    #[prost(string, tag = "2")]
    region: String,
    #[prost(bytes = "vec", tag = "3")]
    room_config: Vec<u8>,
}

#[tokio::test]
async fn invalid_utf8_in_room_config_is_invalid_argument_not_internal() -> TestResult {
    let s = TestServer::start().await?;
    s.create_deployment("game", 4).await?;
    let mut grpc = tonic::client::Grpc::new(s.channel.clone());
    grpc.ready().await?;
    let result = grpc
        .unary::<_, pb::CreateRoomResponse, _>(
            tonic::Request::new(RawCreateRoomRequest {
                app_id: "game".into(),
                region: "Frankfurt".into(),
                room_config: vec![b'{', 0xff, 0xfe, b'}'],
            }),
            PathAndQuery::from_static("/roomsched.v1.RoomService/CreateRoom"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(s.count_processes("game").await?, 0, "nothing changed");
    let status = result.expect_err("not valid UTF-8");
    assert_eq!(
        (status.code(), status.message().contains("room_config")),
        (Code::InvalidArgument, true),
        "got {:?}: {}",
        status.code(),
        status.message()
    );
    Ok(())
}
