//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so no `protoc`
//! is needed), writes the descriptor set that server reflection serves, and
//! generates the tonic client and server.

use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // error_details.proto is only served by reflection; tonic-types already
    // provides its Rust types.
    let protos = [
        "proto/pipeline/v1/pipeline.proto",
        "proto/pipeline/v1/worker.proto",
        "proto/google/rpc/error_details.proto",
    ];
    println!("cargo:rerun-if-changed=proto");

    let descriptor_set = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("pipeline_descriptor.bin"),
        descriptor_set.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptor_set)?;
    Ok(())
}
