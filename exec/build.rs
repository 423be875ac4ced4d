//! Compiles the cluster protocol (`proto/drizzle.proto`) with `protox`, a
//! pure-Rust protobuf compiler, so a fresh machine builds with cargo alone.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/drizzle.proto");
    let fds = protox::compile(["proto/drizzle.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
