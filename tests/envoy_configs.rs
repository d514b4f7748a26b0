//! Every shipped Envoy config is accepted by the real Envoy 1.40, as is and
//! as the harness renders it onto other ports.

use sluice::harness::envoy::{EnvoyPorts, render, validate};
use sluice::harness::repo_root;

#[tokio::test]
async fn every_shipped_config_validates() {
    let dir = repo_root().join("envoy-configs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("envoy-configs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in &files {
        validate(file).await.unwrap_or_else(|e| panic!("{e:#}"));
    }
}

#[tokio::test]
async fn the_quickstart_renders_onto_other_ports_and_still_validates() {
    let text =
        std::fs::read_to_string(repo_root().join("envoy-configs/quickstart.yaml")).expect("read");
    let ports = EnvoyPorts {
        admin: 19901,
        listener: 19000,
        upstream: 18000,
        sluice: 18080,
    };
    let rendered = render(&text, &ports).expect("every default port appears once");
    for port in ["19901", "19000", "18000", "18080"] {
        assert!(rendered.contains(&format!("port_value: {port}")), "{port}");
    }
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("rendered.yaml");
    std::fs::write(&path, rendered).expect("write");
    validate(&path).await.unwrap_or_else(|e| panic!("{e:#}"));
    // The access-log contract is in the shipped config.
    for key in [
        "sluice.flow",
        "http.status_code",
        "authz_duration",
        "DURATION",
        "REQUEST_DURATION",
        "REQUEST_TX_DURATION",
        "RESPONSE_DURATION",
        "RESPONSE_TX_DURATION",
        "BYTES_RECEIVED",
        "BYTES_SENT",
    ] {
        assert!(
            text.contains(&format!("- key: {key}\n")),
            "{key} missing from the access log"
        );
    }
}
