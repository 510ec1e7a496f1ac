//! Compiles the subset of etcd's API the etcd target uses (proto/) with
//! protox, a pure-Rust protobuf compiler, as replog-proto compiles replog's
//! schemas: no system `protoc` needed. Messages come from prost, the gRPC
//! client from tonic-prost-build (no server: the generator only calls etcd).
use std::path::PathBuf;

/// The .proto files, relative to proto/.
const FILES: &[&str] = &["etcd/etcdserverpb/rpc.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let paths: Vec<PathBuf> = FILES.iter().map(|f| root.join(f)).collect();
    println!("cargo:rerun-if-changed={}", root.display());
    for p in &paths {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let descriptors = protox::compile(&paths, [&root])?;
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .build_transport(true)
        .compile_fds_with_config(descriptors, config)?;
    Ok(())
}
