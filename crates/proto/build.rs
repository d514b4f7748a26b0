//! Compiles Sluice's own protos, from the repository's top-level `proto/`,
//! with protox (pure Rust, no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto";
    println!("cargo:rerun-if-changed={proto}");
    // What Envoy and Prometheus speak: servers only, requests as bytes.
    let edge = protox::compile(
        [
            "sluice/ext_authz.proto",
            "sluice/otlp_logs.proto",
            "prometheus/remote.proto",
        ],
        [proto],
    )?;
    tonic_prost_build::configure()
        .build_client(false)
        // Request messages decode into slices of the request buffer.
        .bytes(".envoy.service.auth.v3")
        .bytes(".opentelemetry.proto.collector.logs.v1")
        // Their repeated fields are counted before they are decoded.
        .codec_path("crate::bounded::BoundedCodec")
        .extern_path(
            ".envoy.service.auth.v3.CheckResponse",
            "::envoy_types::pb::envoy::service::auth::v3::CheckResponse",
        )
        .extern_path(
            ".opentelemetry.proto.collector.logs.v1.ExportLogsServiceResponse",
            "::opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse",
        )
        .compile_fds(edge)?;
    // Sluice's own control API: the controller serves it, sidecars call it.
    let control = protox::compile(["sluice/control.proto"], [proto])?;
    tonic_prost_build::configure().compile_fds(control)?;
    Ok(())
}
