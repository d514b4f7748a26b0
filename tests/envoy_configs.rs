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
        upstream: Some(18000),
        sluice: Some(18080),
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

/// The load tests' configs render, validate, and carry the shipped
/// quickstart's ext_authz filter and access log unchanged, so that the
/// HTTP load test measures what users run.
#[tokio::test]
async fn the_load_test_configs_validate_and_match_the_quickstart() {
    fn yaml(path: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(repo_root().join(path)).expect("read");
        serde_saphyr::from_str(&text).expect("yaml")
    }
    let manager = |config: &serde_json::Value| {
        config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            .clone()
    };
    let quickstart = manager(&yaml("envoy-configs/quickstart.yaml"));
    let authz = &quickstart["http_filters"][0];
    assert_eq!(authz["name"], "envoy.filters.http.ext_authz");

    let dir = tempfile::tempdir().expect("dir");
    for (file, with_authz, with_log) in [
        ("loadtests/envoy/alone.yaml", false, false),
        ("loadtests/envoy/noop-authz.yaml", true, false),
        ("loadtests/envoy/sluice.yaml", true, true),
    ] {
        let config = manager(&yaml(file));
        assert_eq!(
            config["http_filters"][0] == *authz,
            with_authz,
            "{file}: ext_authz filter"
        );
        assert_eq!(
            config["access_log"] == quickstart["access_log"],
            with_log,
            "{file}: access log"
        );
        let text = std::fs::read_to_string(repo_root().join(file)).expect("read");
        let ports = EnvoyPorts {
            admin: 19901,
            listener: 19000,
            upstream: None,
            sluice: with_authz.then_some(18080),
        };
        let rendered = render(&text, &ports).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let path = dir.path().join("rendered.yaml");
        std::fs::write(&path, rendered).expect("write");
        validate(&path)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
    }
}
