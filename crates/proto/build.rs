//! Compiles `proto/` with protox (pure Rust), so a fresh machine needs no
//! system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["ember/control/v1/control.proto", "ember/repl/v1/repl.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let descriptors = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("ember_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // Replicated data stays `bytes::Bytes`: decoding slices the gRPC
        // receive buffer instead of copying every payload into a Vec.
        .bytes(".ember.repl.v1.BlockWrite.data")
        .bytes(".ember.repl.v1.SinkChunk.data")
        // prost's codec with each message's length reserved up front
        // (src/codec.rs): a block's data is not copied twice.
        .codec_path("crate::codec::ExactCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
