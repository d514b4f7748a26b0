# syntax=docker/dockerfile:1
# The Sluice image: both binaries, `sluice` (the sidecar, the entrypoint)
# and `sluice-controller`, on distroless (glibc, CA certificates, no shell),
# as the non-root user 65532. The Kubernetes manifests in deploy/ use it as
# ghcr.io/sluice-dev/sluice:0.1.0:
#
#   docker build -t ghcr.io/sluice-dev/sluice:0.1.0 .
#   docker run --rm -p 8080:8080 -p 8081:8081 ghcr.io/sluice-dev/sluice:0.1.0 \
#       --grpc-listen 0.0.0.0:8080 --admin-listen 0.0.0.0:8081

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build between builds; the
# binaries are copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice --bin sluice-controller \
    && mkdir -p /out \
    && cp target/release/sluice target/release/sluice-controller /out/

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="Flow-control sidecar for Envoy and Istio" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/sluice /out/sluice-controller /usr/local/bin/
# Numeric, so that Kubernetes can verify `runAsNonRoot` from the image alone.
USER 65532:65532
# sluice: gRPC (Checks, access logs) 8080, admin 8081;
# sluice-controller: control API 8082, admin 8083.
EXPOSE 8080 8081 8082 8083
# Distroless has no shell or curl: the binary checks itself. A container
# running sluice-controller needs the same in exec form on its admin port,
# e.g. in docker compose:
#   healthcheck:
#     test: ["CMD", "/usr/local/bin/sluice", "health", "--url", "http://127.0.0.1:8083/healthz"]
# (`docker run --health-cmd` needs a shell; there is none.) Kubernetes
# ignores HEALTHCHECK and uses the manifests' probes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/sluice", "health", "--url", "http://127.0.0.1:8081/healthz"]
ENTRYPOINT ["/usr/local/bin/sluice"]
