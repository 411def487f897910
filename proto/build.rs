//! Compiles `hitless/v1/*.proto` with protox (a protobuf compiler in Rust: no protoc
//! on the machine) and generates prost messages and tonic services from it. The
//! encoded descriptor set is kept for gRPC reflection.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "hitless/v1/registry.proto",
        "hitless/v1/agent.proto",
        "hitless/v1/coordinator.proto",
        "hitless/v1/node.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("hitless_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
