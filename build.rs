//! Compiles `proto/` with protox (no system `protoc`) and writes the encoded
//! descriptor set that the reflection service serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/vitals/v1/health.proto", "proto/vitals/v1/lock.proto"];
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds the migrations at compile time.
    println!("cargo:rerun-if-changed=migrations");

    // Imports and source info are kept so reflection clients (grpcurl,
    // buf curl) see the well-known types and our doc comments.
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(files)?
        .file_descriptor_set();
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out.join("vitals_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    // Small per-stream buffers: see src/codec.rs.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(fds)?;
    Ok(())
}
