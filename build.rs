//! Compiles Sluice's own protos with protox (pure Rust, no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["sluice/ext_authz.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .bytes(".")
        .extern_path(
            ".envoy.service.auth.v3.CheckResponse",
            "::envoy_types::pb::envoy::service::auth::v3::CheckResponse",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
