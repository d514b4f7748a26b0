//! Every shipped Envoy config is accepted by the real Envoy 1.40, as is and
//! as the test kit renders it onto other ports; and every shipped config and
//! Istio patch keeps the same access-log contract and ext_authz essentials.
//! The load tests' configs validate too, and the peer's (limitador.yaml)
//! asks the limitador rate-limit service it is measured with.

use serde_json::Value;
use sluice_testkit::envoy::{Envoy, EnvoyPorts, render, render_ports, validate};
use sluice_testkit::pki::Pki;
use sluice_testkit::repo_root;

// The load tests' limitador peer, served in process: its `main` and flags
// go unused here.
#[allow(dead_code)]
#[path = "../examples/limitador_rls.rs"]
mod limitador_rls;

#[tokio::test]
async fn every_shipped_config_validates() {
    let dir = repo_root().join("envoy-configs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("envoy-configs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let names: Vec<_> = files
        .iter()
        .filter_map(|f| f.file_name()?.to_str())
        .collect();
    for shipped in ["gateway.yaml", "quickstart.yaml", "sidecar.yaml"] {
        assert!(names.contains(&shipped), "{shipped} missing: {names:?}");
    }
    // Configs that name certificates (quickstart-mtls.yaml) are validated
    // with ones made for the test in their place: Envoy reads them.
    let pki = Pki::new("validate").expect("pki");
    let envoy = pki.issue("envoy").expect("cert");
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        if !text.contains("/etc/sluice/tls/") {
            validate(file).await.unwrap_or_else(|e| panic!("{e:#}"));
            continue;
        }
        let with_certs = text
            .replace(
                "/etc/sluice/tls/envoy.pem",
                &envoy.cert.display().to_string(),
            )
            .replace(
                "/etc/sluice/tls/envoy-key.pem",
                &envoy.key.display().to_string(),
            )
            .replace("/etc/sluice/tls/ca.pem", &pki.ca_file.display().to_string());
        assert!(
            !with_certs.contains("filename: /etc/sluice/tls/"),
            "{}",
            file.display()
        );
        let copy = pki.dir().join(file.file_name().expect("name"));
        std::fs::write(&copy, with_certs).expect("write");
        validate(&copy).await.unwrap_or_else(|e| panic!("{e:#}"));
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
    for key in CONTRACT {
        assert!(
            text.contains(&format!("- key: {key}\n")),
            "{key} missing from the access log"
        );
    }
}

/// A config file (relative to the repository) as JSON.
fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(path)).expect("read");
    serde_saphyr::from_str(&text).expect("yaml")
}

/// The HTTP connection manager of a config's first listener.
fn manager(config: &Value) -> Value {
    config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        .clone()
}

/// A config's cluster named `name`.
fn cluster(config: &Value, name: &str) -> Value {
    config["static_resources"]["clusters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The load tests' configs render, validate, and carry the shipped
/// quickstart's ext_authz filter and access log unchanged, so that the
/// HTTP load tests measure what users run.
#[tokio::test]
async fn the_load_test_configs_validate_and_match_the_quickstart() {
    let quickstart = manager(&yaml("envoy-configs/quickstart.yaml"));
    let authz = &quickstart["http_filters"][0];
    assert_eq!(authz["name"], "envoy.filters.http.ext_authz");

    let dir = tempfile::tempdir().expect("dir");
    // (file, ext_authz, access log, a server on port 8080)
    for (file, with_authz, with_log, with_server) in [
        ("loadtests/envoy/alone.yaml", false, false, false),
        ("loadtests/envoy/noop-authz.yaml", true, false, true),
        ("loadtests/envoy/sluice.yaml", true, true, true),
        ("loadtests/envoy/peer-alone.yaml", false, false, false),
        ("loadtests/envoy/peer-noop-authz.yaml", true, false, true),
        ("loadtests/envoy/peer-sluice.yaml", true, true, true),
        ("loadtests/envoy/limitador.yaml", false, false, true),
        // Its ext_authz filter is the one `sluice envoy-config` writes
        // (below), not the quickstart's.
        ("loadtests/envoy/peer-sluice-lean.yaml", false, false, true),
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
            sluice: with_server.then_some(18080),
        };
        let rendered = render(&text, &ports).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let path = dir.path().join("rendered.yaml");
        std::fs::write(&path, rendered).expect("write");
        validate(&path)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
    }
}

/// The peer scenario's four configs differ only in what Envoy asks before
/// it answers: the route, the filter that answers (the fault filter's
/// abort with 200) and the cluster it routes to are the same in all four;
/// the rate-limit filter of limitador.yaml is asked as ext_authz is (its
/// timeout, an HTTP/2 cluster), fails open, and sends the user-id header
/// as the descriptor entry the peer's limit counts per value of, in the
/// peer's domain.
#[test]
fn the_peer_configs_differ_only_in_the_limiter() {
    let files = [
        "loadtests/envoy/peer-alone.yaml",
        "loadtests/envoy/peer-noop-authz.yaml",
        "loadtests/envoy/limitador.yaml",
        "loadtests/envoy/peer-sluice.yaml",
    ];
    let configs: Vec<Value> = files.iter().map(|f| yaml(f)).collect();
    let route = |config: &Value| {
        let route = &manager(config)["route_config"]["virtual_hosts"][0]["routes"][0];
        (route["match"].clone(), route["route"]["cluster"].clone())
    };
    let answer = |config: &Value| {
        let filters = manager(config)["http_filters"]
            .as_array()
            .expect("http_filters")
            .clone();
        filters[filters.len() - 2..].to_vec()
    };
    let reference = &configs[0];
    assert_eq!(answer(reference)[0]["name"], "envoy.filters.http.fault");
    assert_eq!(answer(reference)[1]["name"], "envoy.filters.http.router");
    for (file, config) in files.iter().zip(&configs) {
        assert_eq!(route(config), route(reference), "{file}: route");
        assert_eq!(route(config).1, "app", "{file}: route");
        assert_eq!(answer(config), answer(reference), "{file}: answer");
        assert_eq!(cluster(config, "app"), cluster(reference, "app"), "{file}");
        assert!(cluster(config, "app")["load_assignment"]["endpoints"].is_null());
    }

    let limitador = &configs[2];
    let filters = manager(limitador)["http_filters"].clone();
    assert_eq!(filters.as_array().map(Vec::len), Some(3));
    let filter = &filters[0]["typed_config"];
    assert_eq!(filters[0]["name"], "envoy.filters.http.ratelimit");
    assert_eq!(filter["domain"], limitador_rls::DOMAIN);
    assert_eq!(filter["failure_mode_deny"], false);
    let quickstart = manager(&yaml("envoy-configs/quickstart.yaml"));
    let authz = &quickstart["http_filters"][0]["typed_config"];
    assert_eq!(filter["timeout"], authz["grpc_service"]["timeout"]);
    let service = &filter["rate_limit_service"];
    assert_eq!(service["transport_api_version"], "V3");
    let name = service["grpc_service"]["envoy_grpc"]["cluster_name"]
        .as_str()
        .expect("cluster");
    let sluice = cluster(&configs[3], "sluice");
    let rls = cluster(limitador, name);
    for field in [
        "type",
        "connect_timeout",
        "typed_extension_protocol_options",
    ] {
        assert_eq!(
            rls[field], sluice[field],
            "the rate-limit cluster's {field}"
        );
    }
    let routes = &manager(limitador)["route_config"]["virtual_hosts"][0]["routes"][0];
    let actions = &routes["route"]["rate_limits"][0]["actions"];
    assert_eq!(
        actions,
        &serde_json::json!([{"request_headers": {
            "header_name": "user-id",
            "descriptor_key": limitador_rls::DESCRIPTOR_KEY,
        }}])
    );
}

/// limitador.yaml on the real Envoy asks the limitador peer about every
/// request with a user id, per user: with a limit of 2 requests a minute,
/// a user's third request is refused (429) while another user's goes
/// through; a request without the header is not asked about.
#[tokio::test]
async fn the_limitador_config_asks_the_peer_per_user() {
    let limit = limitador_rls::limit(limitador_rls::DOMAIN, limitador_rls::DESCRIPTOR_KEY, 2, 60)
        .expect("limit");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = sluice_runtime::shutdown::channel();
    let served = tokio::spawn(limitador_rls::serve(
        listener,
        limitador_rls::Rls::new(limit, 1000),
        stopped,
    ));
    let ports = EnvoyPorts::free_for(None, Some(port)).expect("ports");
    let envoy = Envoy::start("loadtests/envoy/limitador.yaml", ports)
        .await
        .expect("envoy");
    let status = async |user: Option<&str>| {
        let headers: Vec<(&str, &str)> = user.map(|u| ("user-id", u)).into_iter().collect();
        sluice_testkit::http::get(envoy.listener(), "/api/items?page=2", &headers)
            .await
            .expect("answer")
            .status
    };
    let mut statuses = Vec::new();
    for user in [
        Some("alice"),
        Some("alice"),
        Some("alice"),
        Some("bob"),
        None,
    ] {
        statuses.push(status(user).await);
    }
    assert_eq!(statuses, [200, 200, 429, 200, 200], "{}", envoy.log_tail());
    assert_eq!(envoy.stat("cluster.app.ratelimit.ok").await.expect("ok"), 3);
    assert_eq!(
        envoy
            .stat("cluster.app.ratelimit.over_limit")
            .await
            .expect("over_limit"),
        1
    );
    stop.fire();
    served.await.expect("served");
}

/// The access-log attributes Sluice reads, in quickstart.yaml's order
/// (docs/envoy.md). Aperture's Istio patch used the same keys, except
/// `sluice.flow`.
const CONTRACT: [&str; 10] = [
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
];

const OTEL_LOG: &str = "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const EXT_AUTHZ: &str = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";

fn yaml_files(dir: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// A file's YAML documents (one, or several separated by `---`) as one
/// array.
fn parse(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).expect("read");
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match <[Value; 1]>::try_from(docs) {
        Ok([one]) => one,
        Err(many) => Value::Array(many),
    }
}

fn all_typed<'a>(value: &'a Value, type_url: &str) -> Vec<&'a Value> {
    sluice_testkit::envoy::typed(value, type_url)
}

/// The access-log attribute list (and batching) of every shipped Envoy
/// config and every Istio patch is quickstart's, so the contract Sluice
/// reads cannot drift in one file.
#[test]
fn every_access_log_keeps_the_quickstarts_attribute_contract() {
    let quickstart = parse(&repo_root().join("envoy-configs/quickstart.yaml"));
    let reference = all_typed(&quickstart, OTEL_LOG);
    assert_eq!(reference.len(), 1);
    let reference = reference[0];
    let keys: Vec<&str> = reference["attributes"]["values"]
        .as_array()
        .expect("attributes")
        .iter()
        .map(|kv| kv["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, CONTRACT, "quickstart.yaml's attribute keys");

    let mut files = yaml_files("envoy-configs");
    let configs = files.len();
    files.extend(yaml_files("istio"));
    let mut loggers = 0;
    for file in &files {
        let config = parse(file);
        let name = file.display();
        let logs = all_typed(&config, OTEL_LOG);
        // Every HTTP connection manager (or manager patch) reports to Sluice.
        let managers = all_typed(&config, HCM);
        assert_eq!(
            logs.len(),
            managers.len(),
            "{name}: one Sluice access log per HTTP connection manager"
        );
        for log in logs {
            assert_eq!(
                log["attributes"], reference["attributes"],
                "{name}: attributes"
            );
            // Batching under common_config: Envoy 1.40 ignores the
            // top-level buffer_flush_interval for grpc_service, and a log
            // that waits a second holds its concurrency slot a second.
            let common = &log["common_config"];
            for field in [
                "log_name",
                "transport_api_version",
                "buffer_flush_interval",
                "buffer_size_bytes",
            ] {
                assert_eq!(
                    common[field], reference["common_config"][field],
                    "{name}: common_config.{field}"
                );
            }
            for top_level in ["grpc_service", "log_name", "buffer_flush_interval"] {
                assert!(
                    log[top_level].is_null(),
                    "{name}: {top_level} at the top level"
                );
            }
            assert!(
                common["grpc_service"]["envoy_grpc"]["cluster_name"].is_string(),
                "{name}: the log goes to a cluster"
            );
            loggers += 1;
        }
    }
    // quickstart 1, sidecar 2, gateway 1, and two per Istio variant.
    assert!(
        configs >= 3 && loggers >= 8,
        "{configs} configs, {loggers} loggers"
    );
}

/// What every shipped bootstrap's ext_authz must say: the control point in
/// gRPC metadata, a timeout, a body limit, an explicit failure mode, a
/// place just before the router, and an HTTP/2 cluster that the access log
/// uses too.
#[test]
fn every_shipped_ext_authz_names_its_control_point_and_limits() {
    for file in yaml_files("envoy-configs") {
        let name = file.display();
        let config = parse(&file);
        let clusters = config["static_resources"]["clusters"]
            .as_array()
            .expect("clusters");
        for manager in all_typed(&config, HCM) {
            let filters = manager["http_filters"].as_array().expect("http_filters");
            let names: Vec<&str> = filters.iter().filter_map(|f| f["name"].as_str()).collect();
            assert_eq!(
                names,
                ["envoy.filters.http.ext_authz", "envoy.filters.http.router"],
                "{name}"
            );
            let authz = &filters[0]["typed_config"];
            assert_eq!(authz["@type"], EXT_AUTHZ, "{name}");
            let grpc = &authz["grpc_service"];
            let metadata = grpc["initial_metadata"]
                .as_array()
                .expect("initial_metadata");
            let control_points: Vec<&str> = metadata
                .iter()
                .filter(|m| m["key"] == "control-point")
                .filter_map(|m| m["value"].as_str())
                .collect();
            assert!(
                matches!(control_points[..], ["ingress"] | ["egress"]),
                "{name}: control points {control_points:?}"
            );
            assert!(grpc["timeout"].is_string(), "{name}: timeout");
            assert!(
                authz["with_request_body"]["max_request_bytes"].as_u64() > Some(0),
                "{name}: with_request_body"
            );
            assert!(
                authz["failure_mode_allow"].is_boolean(),
                "{name}: failure_mode_allow stated"
            );
            let cluster = grpc["envoy_grpc"]["cluster_name"]
                .as_str()
                .expect("cluster");
            let log = all_typed(manager, OTEL_LOG)[0];
            assert_eq!(
                log["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"],
                cluster
            );
            let sluice = clusters
                .iter()
                .find(|c| c["name"] == cluster)
                .unwrap_or_else(|| panic!("{name}: no cluster {cluster}"));
            assert!(
                sluice["typed_extension_protocol_options"]
                    ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                    ["explicit_http_config"]["http2_protocol_options"]
                    .is_object(),
                "{name}: {cluster} speaks HTTP/2"
            );
        }
    }
}

/// The sidecar and gateway configs render onto other ports (they have
/// more than the four `EnvoyPorts` names) and still validate.
#[tokio::test]
async fn the_sidecar_and_gateway_configs_render_onto_other_ports() {
    let ports = EnvoyPorts {
        admin: 19901,
        listener: 19000,
        upstream: Some(18000),
        sluice: Some(18080),
    };
    let dir = tempfile::tempdir().expect("dir");
    for (file, extra) in [
        (
            "envoy-configs/sidecar.yaml",
            [(10001, 19001), (9000, 19002)],
        ),
        ("envoy-configs/gateway.yaml", [(8001, 18001), (8002, 18002)]),
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).expect("read");
        // EnvoyPorts' four, and two more of each config's own.
        let mut all = ports.substitutions().to_vec();
        all.extend(extra.iter().map(|&(default, port)| (default, Some(port))));
        let rendered = render_ports(&text, &all).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        for (_, port) in &all {
            let port = port.expect("given");
            assert!(
                rendered.contains(&format!("port_value: {port}")),
                "{file}: {port}"
            );
        }
        let path = dir.path().join("rendered.yaml");
        std::fs::write(&path, rendered).expect("write");
        validate(&path)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
    }
    // A default that is missing, or there twice, is an error.
    let text =
        std::fs::read_to_string(repo_root().join("envoy-configs/sidecar.yaml")).expect("read");
    let err = render_ports(&text, &[(10002, Some(1))]).expect_err("absent");
    assert!(err.to_string().contains("found 0"), "{err}");
    let twice = format!("{text}\n# port_value: 9000\n");
    let err = render_ports(&twice, &[(9000, Some(1))]).expect_err("twice");
    assert!(err.to_string().contains("found 2"), "{err}");
}

/// The peer scenario's lean Sluice config asks Envoy for what
/// `sluice envoy-config` says loadtests/peer.yaml reads: the same
/// `allowed_headers`, no body, no access log; and is otherwise
/// peer-sluice.yaml.
#[test]
fn the_lean_peer_config_is_what_sluice_envoy_config_writes() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["envoy-config", "--policy"])
        .arg(repo_root().join("loadtests/peer.yaml"))
        .output()
        .expect("run sluice envoy-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated: Value =
        serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout)).expect("yaml");
    let lean = yaml("loadtests/envoy/peer-sluice-lean.yaml");
    let authz = |config: &Value| manager(config)["http_filters"][0]["typed_config"].clone();
    let (lean_authz, generated_authz) = (authz(&lean), authz(&generated));
    for field in ["allowed_headers", "with_request_body"] {
        assert_eq!(lean_authz[field], generated_authz[field], "{field}");
    }
    assert!(lean_authz["with_request_body"].is_null());
    assert!(manager(&lean)["access_log"].is_null());
    assert!(manager(&generated)["access_log"].is_null());
    // Otherwise the full peer config: the same route and the same filters
    // after ext_authz.
    let full = yaml("loadtests/envoy/peer-sluice.yaml");
    assert_eq!(
        manager(&lean)["route_config"],
        manager(&full)["route_config"]
    );
    assert_eq!(
        manager(&lean)["http_filters"]
            .as_array()
            .map(|f| f[1..].to_vec()),
        manager(&full)["http_filters"]
            .as_array()
            .map(|f| f[1..].to_vec())
    );
}
