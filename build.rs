//! Compiles `proto/` with `protox` (pure Rust, no system `protoc`) and generates the tonic
//! server and client code. The encoded descriptor set is kept for gRPC server reflection.

use prost::Message as _;
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    if env::var_os("CARGO_FEATURE_SERVER").is_none() {
        return Ok(());
    }
    let fds = protox::compile(["roomsched/v1/roomsched.proto"], ["proto"])?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    fs::write(
        out_dir.join("roomsched_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::ProtoCodec")
        .compile_fds(fds)?;
    Ok(())
}
