//! Compiles `proto/meshward.proto` with protox (pure Rust: no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/meshward.proto");
    let fds = protox::compile(["proto/meshward.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No `XClient::connect(url)`: every caller dials with its own connector, so this
        // crate needs tonic's `codegen` feature only (no transport, no axum).
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
