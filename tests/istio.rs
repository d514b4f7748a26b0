//! The Istio EnvoyFilters in istio/, checked without Istio: their patch
//! structure (applyTo, context, match names, operation), and their typed
//! configs applied as istiod applies them (MERGE, INSERT_BEFORE, ADD) to a
//! stand-in for what istiod generates for one sidecar, an inbound and an
//! outbound HTTP listener. The real Envoy 1.40 validates the result, and
//! runs it against a real Sluice: both control points arrive, the service
//! is the one the variant sets, and the access logs come back.
//!
//! What this cannot show is that istiod itself accepts the resources; see
//! docs/istio.md for checking that on a cluster.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice::server::{Config, Sidecar};
use sluice_testkit::envoy::{Envoy, EnvoyPorts, validate};
use sluice_testkit::{Upstream, free_port, http, repo_root};

const HCM: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "envoy.filters.http.router";
const EXT_AUTHZ: &str = "envoy.filters.http.ext_authz";
const EXT_AUTHZ_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
const DAEMONSET_CLUSTER: &str = "outbound|8080||sluice.sluice-system.svc.cluster.local";
const SHOP: &str = "shop.shop.svc.cluster.local";
/// Where the pod variant's Sluice listens (deploy/shop-pod-sidecar.yaml).
const POD_SOCKET: &str = "/var/run/sluice/sluice.sock";

fn envoy_filter(file: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(file)).expect("read");
    let filter: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(
        filter["apiVersion"], "networking.istio.io/v1alpha3",
        "{file}"
    );
    assert_eq!(filter["kind"], "EnvoyFilter", "{file}");
    filter
}

fn patches(filter: &Value) -> &Vec<Value> {
    filter["spec"]["configPatches"]
        .as_array()
        .expect("configPatches")
}

/// (applyTo, context, operation) of each patch.
fn shape(filter: &Value) -> Vec<(&str, &str, &str)> {
    patches(filter)
        .iter()
        .map(|p| {
            (
                p["applyTo"].as_str().unwrap_or("?"),
                p["match"]["context"].as_str().unwrap_or("?"),
                p["patch"]["operation"].as_str().unwrap_or("?"),
            )
        })
        .collect()
}

/// Every `envoy_grpc` a patch value has.
fn envoy_grpcs<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            if let Some(grpc) = map.get("envoy_grpc") {
                out.push(grpc);
            }
            map.values().for_each(|v| envoy_grpcs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| envoy_grpcs(v, out)),
        _ => {}
    }
}

/// The `:authority` Envoy sends on a gRPC call: `authority`, else the
/// cluster's name. It must be a host name that an HTTP/2 server accepts.
fn authority(grpc: &Value) -> &str {
    let authority = grpc["authority"]
        .as_str()
        .or(grpc["cluster_name"].as_str())
        .expect("cluster_name");
    assert!(
        !authority.is_empty()
            && authority
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
        "{authority:?} is no valid :authority: set envoy_grpc.authority"
    );
    authority
}

/// The four patches of Aperture's integration, as both variants have them:
/// names matched, operations, control points, fail-open, and one cluster
/// for everything.
fn assert_the_four_patches(file: &str, filter: &Value, cluster: &str) {
    let four = patches(filter)
        .iter()
        .filter(|p| p["applyTo"] != "CLUSTER")
        .collect::<Vec<_>>();
    assert_eq!(four.len(), 4, "{file}");
    for patch in four {
        let context = patch["match"]["context"].as_str().expect("context");
        let filter_match = &patch["match"]["listener"]["filterChain"]["filter"];
        assert_eq!(filter_match["name"], HCM, "{file}: {context}");
        let value = &patch["patch"]["value"];
        match patch["applyTo"].as_str() {
            Some("NETWORK_FILTER") => {
                assert_eq!(value["name"], HCM, "{file}");
                assert_eq!(value["typed_config"]["@type"], HCM_TYPE, "{file}");
                let logs = value["typed_config"]["access_log"]
                    .as_array()
                    .expect("access_log");
                assert_eq!(logs.len(), 1, "{file}");
                assert_eq!(logs[0]["name"], "envoy.access_loggers.open_telemetry");
            }
            Some("HTTP_FILTER") => {
                assert_eq!(filter_match["subFilter"]["name"], ROUTER, "{file}");
                assert_eq!(value["name"], EXT_AUTHZ, "{file}");
                let authz = &value["typed_config"];
                assert_eq!(authz["@type"], EXT_AUTHZ_TYPE, "{file}");
                assert_eq!(authz["transport_api_version"], "V3", "{file}");
                assert_eq!(authz["failure_mode_allow"], true, "{file}: fail open");
                assert!(authz["grpc_service"]["timeout"].is_string(), "{file}");
                assert!(
                    authz["with_request_body"]["max_request_bytes"].as_u64() > Some(0),
                    "{file}"
                );
                let expected = match context {
                    "SIDECAR_INBOUND" => "ingress",
                    "SIDECAR_OUTBOUND" => "egress",
                    other => panic!("{file}: context {other}"),
                };
                assert_eq!(
                    authz["grpc_service"]["initial_metadata"],
                    json!([{"key": "control-point", "value": expected}]),
                    "{file}: {context}"
                );
            }
            other => panic!("{file}: unexpected applyTo {other:?}"),
        }
    }
    let mut grpcs = Vec::new();
    envoy_grpcs(&filter["spec"], &mut grpcs);
    assert_eq!(grpcs.len(), 4, "{file}");
    for grpc in grpcs {
        assert_eq!(grpc["cluster_name"], cluster, "{file}");
        // Istio's cluster names end in the Service's host name.
        let host = cluster.rsplit('|').next().expect("host");
        assert_eq!(authority(grpc), host, "{file}");
    }
}

#[test]
fn the_pod_sidecar_filter_has_the_four_patches_and_a_unix_socket_cluster() {
    let file = "istio/sluice-pod-sidecar.yaml";
    let filter = envoy_filter(file);
    assert_eq!(
        filter["metadata"]["namespace"], "istio-system",
        "root namespace"
    );
    assert_eq!(
        filter["spec"]["workloadSelector"]["labels"],
        json!({"sluice.dev/sidecar": "true"}),
        "only pods that have a Sluice container"
    );
    assert_eq!(
        shape(&filter),
        [
            ("CLUSTER", "SIDECAR_OUTBOUND", "ADD"),
            ("NETWORK_FILTER", "SIDECAR_INBOUND", "MERGE"),
            ("NETWORK_FILTER", "SIDECAR_OUTBOUND", "MERGE"),
            ("HTTP_FILTER", "SIDECAR_INBOUND", "INSERT_BEFORE"),
            ("HTTP_FILTER", "SIDECAR_OUTBOUND", "INSERT_BEFORE"),
        ]
    );
    let cluster = &patches(&filter)[0]["patch"]["value"];
    let name = cluster["name"].as_str().expect("name");
    assert_eq!(cluster["load_assignment"]["cluster_name"], name);
    assert_eq!(
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"],
        json!({"pipe": {"path": POD_SOCKET}}),
        "the pod's Sluice, on the socket deploy/shop-pod-sidecar.yaml shares"
    );
    assert!(
        cluster["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
            ["http2_protocol_options"]
            .is_object(),
        "gRPC needs HTTP/2"
    );
    assert_the_four_patches(file, &filter, name);
}

#[test]
fn the_daemonset_filter_has_the_four_patches_on_istios_cluster() {
    let file = "istio/sluice-daemonset.yaml";
    let filter = envoy_filter(file);
    assert_eq!(
        filter["metadata"]["namespace"], "istio-system",
        "root namespace"
    );
    assert!(
        filter["spec"]["workloadSelector"].is_null(),
        "every sidecar in the mesh"
    );
    assert_eq!(
        shape(&filter),
        [
            ("NETWORK_FILTER", "SIDECAR_INBOUND", "MERGE"),
            ("NETWORK_FILTER", "SIDECAR_OUTBOUND", "MERGE"),
            ("HTTP_FILTER", "SIDECAR_INBOUND", "INSERT_BEFORE"),
            ("HTTP_FILTER", "SIDECAR_OUTBOUND", "INSERT_BEFORE"),
        ]
    );
    assert_the_four_patches(file, &filter, DAEMONSET_CLUSTER);
}

#[test]
fn the_service_name_filter_sets_the_service_on_both_directions() {
    let file = "istio/shop-service-name.yaml";
    let filter = envoy_filter(file);
    assert_eq!(filter["metadata"]["namespace"], "shop");
    assert_eq!(
        filter["spec"]["workloadSelector"]["labels"],
        json!({"app": "shop"})
    );
    assert_eq!(
        shape(&filter),
        [
            ("HTTP_ROUTE", "SIDECAR_INBOUND", "MERGE"),
            ("HTTP_ROUTE", "SIDECAR_OUTBOUND", "MERGE"),
        ]
    );
    for patch in patches(&filter) {
        let per_route = &patch["patch"]["value"]["typed_per_filter_config"][EXT_AUTHZ];
        assert_eq!(
            per_route["@type"],
            "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
        );
        assert_eq!(
            per_route["check_settings"]["context_extensions"],
            json!({"service": SHOP})
        );
    }
}

/// Ports of one stand-in sidecar.
struct Ports {
    admin: u16,
    inbound: u16,
    outbound: u16,
    app: u16,
    dependency: u16,
}

fn cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}
            }}}]}]
        }
    })
}

/// An HTTP listener as istiod builds them, reduced: an HTTP connection
/// manager with Istio's own access log, some HTTP filters and the router
/// last, and inline routes to `cluster`.
fn listener(name: &str, port: u16, cluster: &str) -> Value {
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": HCM,
            "typed_config": {
                "@type": HCM_TYPE,
                "stat_prefix": name,
                "access_log": [{
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": "/dev/stdout"
                    }
                }],
                "route_config": {
                    "name": name,
                    "virtual_hosts": [{
                        "name": name,
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]
                    }]
                },
                "http_filters": [
                    {"name": "envoy.filters.http.fault", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                    {"name": "envoy.filters.http.cors", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
                    {"name": ROUTER, "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                ]
            }
        }]}]
    })
}

/// What istiod might generate for one sidecar, before EnvoyFilters: the
/// inbound listener (context SIDECAR_INBOUND) to the app, the outbound one
/// (SIDECAR_OUTBOUND) to a dependency.
fn istio_sidecar(ports: &Ports) -> Value {
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.admin}}},
        "static_resources": {
            "listeners": [
                listener("virtualInbound", ports.inbound, "inbound|8000||"),
                listener("virtualOutbound", ports.outbound, "outbound|80||payments.payments.svc.cluster.local"),
            ],
            "clusters": [
                cluster("inbound|8000||", ports.app),
                cluster("outbound|80||payments.payments.svc.cluster.local", ports.dependency),
            ]
        }
    })
}

/// Protobuf merge as istiod's MERGE does it: messages field by field,
/// repeated fields appended, scalars replaced; an `Any` only with one of
/// the same type.
fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            if let (Some(a), Some(b)) = (into.get("@type"), from.get("@type")) {
                assert_eq!(a, b, "MERGE of different types");
            }
            for (key, value) in from {
                match into.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        into.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(into), Value::Array(from)) => into.extend(from.iter().cloned()),
        (into, from) => *into = from.clone(),
    }
}

fn listener_index(context: &str) -> usize {
    match context {
        "SIDECAR_INBOUND" => 0,
        "SIDECAR_OUTBOUND" => 1,
        other => panic!("context {other} is not a sidecar's"),
    }
}

/// Applies one patch as istiod would to `bootstrap`, failing when its match
/// finds nothing (a misspelt filter name applies nowhere in Istio too).
fn apply(bootstrap: &mut Value, patch: &Value) {
    let context = patch["match"]["context"].as_str().expect("context");
    let value = &patch["patch"]["value"];
    let operation = patch["patch"]["operation"].as_str().expect("operation");
    let filter_name = &patch["match"]["listener"]["filterChain"]["filter"]["name"];
    let mut applied = 0;
    match (patch["applyTo"].as_str().expect("applyTo"), operation) {
        ("CLUSTER", "ADD") => {
            bootstrap["static_resources"]["clusters"]
                .as_array_mut()
                .expect("clusters")
                .push(value.clone());
            applied += 1;
        }
        (apply_to @ ("NETWORK_FILTER" | "HTTP_FILTER" | "HTTP_ROUTE"), _) => {
            let listener = &mut bootstrap["static_resources"]["listeners"][listener_index(context)];
            for chain in listener["filter_chains"].as_array_mut().expect("chains") {
                for filter in chain["filters"].as_array_mut().expect("filters") {
                    if apply_to != "HTTP_ROUTE" && filter["name"] != *filter_name {
                        continue;
                    }
                    match (apply_to, operation) {
                        ("NETWORK_FILTER", "MERGE") => {
                            assert_eq!(value["name"], filter["name"]);
                            merge(&mut filter["typed_config"], &value["typed_config"]);
                            applied += 1;
                        }
                        ("HTTP_FILTER", "INSERT_BEFORE") => {
                            let sub = &patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]
                                ["name"];
                            let http_filters = filter["typed_config"]["http_filters"]
                                .as_array_mut()
                                .expect("http_filters");
                            if let Some(at) = http_filters.iter().position(|f| f["name"] == *sub) {
                                http_filters.insert(at, value.clone());
                                applied += 1;
                            }
                        }
                        ("HTTP_ROUTE", "MERGE") => {
                            for host in filter["typed_config"]["route_config"]["virtual_hosts"]
                                .as_array_mut()
                                .expect("virtual_hosts")
                            {
                                for route in host["routes"].as_array_mut().expect("routes") {
                                    merge(route, value);
                                    applied += 1;
                                }
                            }
                        }
                        other => panic!("{other:?} is not used by istio/"),
                    }
                }
            }
        }
        other => panic!("{other:?} is not used by istio/"),
    }
    assert!(applied > 0, "patch applies nowhere: {patch}");
}

/// The stand-in sidecar with every patch of `files` applied, in order.
fn patched(ports: &Ports, files: &[&str]) -> Value {
    let mut bootstrap = istio_sidecar(ports);
    for file in files {
        for patch in patches(&envoy_filter(file)) {
            apply(&mut bootstrap, patch);
        }
    }
    bootstrap
}

/// Istio's cluster for the `sluice` Service (gRPC port: HTTP/2), which
/// istiod builds from the Service, not from the EnvoyFilter.
fn daemonset_service_cluster(port: u16) -> Value {
    let mut c = cluster(DAEMONSET_CLUSTER, port);
    c["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}
        }
    });
    c
}

/// Certificates for the DaemonSet's mutual TLS, as cert-manager would
/// issue them, and the client side as istiod makes it of the
/// DestinationRule in istio/shop-sluice-mtls.yaml (its `sni` and
/// `subjectAltNames`; the credential's files in place of Istio's SDS).
struct DaemonsetTls {
    _pki: sluice_testkit::pki::Pki,
    server: sluice_runtime::tls::ServerTlsFiles,
    client: sluice_testkit::pki::Issued,
    ca: std::path::PathBuf,
    rule: Value,
}

impl DaemonsetTls {
    fn new() -> DaemonsetTls {
        let text =
            std::fs::read_to_string(repo_root().join("istio/shop-sluice-mtls.yaml")).expect("read");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("yaml");
        let rule = docs
            .into_iter()
            .find(|d| d["kind"] == "DestinationRule")
            .expect("a DestinationRule");
        assert_eq!(rule["spec"]["trafficPolicy"]["tls"]["mode"], "MUTUAL");
        let pki = sluice_testkit::pki::Pki::new("sluice-ca").expect("CA");
        let host = rule["spec"]["host"].as_str().expect("host");
        let server = pki.issue(host).expect("server");
        let client = pki.issue("shop.shop").expect("client");
        DaemonsetTls {
            server: sluice_runtime::tls::ServerTlsFiles {
                identity: sluice_runtime::tls::CertKey {
                    cert: server.cert,
                    key: server.key,
                },
                client_ca: Some(pki.ca_file.clone()),
            },
            client,
            ca: pki.ca_file.clone(),
            _pki: pki,
            rule,
        }
    }

    fn transport_socket(&self) -> Value {
        let tls = &self.rule["spec"]["trafficPolicy"]["tls"];
        let sans: Vec<Value> = tls["subjectAltNames"]
            .as_array()
            .expect("subjectAltNames")
            .iter()
            .map(|san| json!({"san_type": "DNS", "matcher": {"exact": san}}))
            .collect();
        json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": tls["sni"],
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [{
                        "certificate_chain": {"filename": self.client.cert},
                        "private_key": {"filename": self.client.key}
                    }],
                    "validation_context": {
                        "trusted_ca": {"filename": self.ca},
                        "match_typed_subject_alt_names": sans
                    }
                }
            }
        })
    }
}

async fn validated(bootstrap: &Value, what: &str) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("istio-sidecar.json");
    std::fs::write(&path, serde_json::to_vec_pretty(bootstrap).expect("json")).expect("write");
    validate(&path)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
}

fn http_filter_names(bootstrap: &Value, listener: usize) -> Vec<String> {
    bootstrap["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_array()
        .expect("http_filters")
        .iter()
        .map(|f| f["name"].as_str().expect("name").to_owned())
        .collect()
}

const DEFAULT_PORTS: Ports = Ports {
    admin: 15000,
    inbound: 15006,
    outbound: 15001,
    app: 8000,
    dependency: 9000,
};

/// Every patch, rendered as istiod applies it, is accepted by Envoy 1.40;
/// the filters land just before the router, the logs next to Istio's.
#[tokio::test]
async fn every_patch_applied_to_a_sidecar_validates_in_envoy() {
    let pod = patched(&DEFAULT_PORTS, &["istio/sluice-pod-sidecar.yaml"]);
    for listener in [0, 1] {
        assert_eq!(
            http_filter_names(&pod, listener),
            [
                "envoy.filters.http.fault",
                "envoy.filters.http.cors",
                EXT_AUTHZ,
                ROUTER
            ]
        );
        let logs = &pod["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"]
            [0]["typed_config"]["access_log"];
        assert_eq!(
            logs[0]["name"], "envoy.access_loggers.file",
            "Istio's stays"
        );
        assert_eq!(logs[1]["name"], "envoy.access_loggers.open_telemetry");
    }
    validated(&pod, "pod sidecar").await;

    let mut daemonset = patched(
        &DEFAULT_PORTS,
        &[
            "istio/sluice-daemonset.yaml",
            "istio/shop-service-name.yaml",
        ],
    );
    daemonset["static_resources"]["clusters"]
        .as_array_mut()
        .expect("clusters")
        .push(daemonset_service_cluster(8080));
    validated(&daemonset, "daemonset").await;

    // Envoy checks the typed configs strictly: a misspelt field fails, so
    // the validations above are not vacuous. (A missing cluster does not:
    // Envoy resolves gRPC clusters late. The end-to-end tests cover that.)
    let mut misspelt = pod;
    let authz = &mut misspelt["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"][2]["typed_config"];
    let body = authz["with_request_body"].take();
    authz["with_request_bodies"] = body;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("misspelt.json");
    std::fs::write(&path, serde_json::to_vec(&misspelt).expect("json")).expect("write");
    let err = validate(&path)
        .await
        .expect_err("a misspelt field must fail");
    assert!(
        format!("{err:#}").contains("with_request_bodies"),
        "{err:#}"
    );
}

const POLICY: &str = r#"
name: istio
samplers:
  # Only the shop's own calls to /blocked are refused: proves the outbound
  # filter says `egress` and the inbound one does not.
  - name: no-blocked-calls
    selectors:
      - control_point: egress
        service: shop.shop.svc.cluster.local
        label_matcher: {match_labels: {http.path: /blocked}}
    accept_percentage: 0
# A flux meter observes every flow, so each access log is matched to its
# flow (Sluice sends `sluice.flow` only when something reads the log).
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}, {control_point: egress}]
"#;

/// Runs the patched sidecar with Envoy against Sluice; `sluice_service` is
/// Sluice's `--service`, `sluice_cluster` the cluster its filters use.
async fn run(files: &[&str], sluice_service: &str, sluice_cluster: &str) {
    let policy = PolicyFile::new(POLICY);
    let socket_dir = tempfile::tempdir().expect("dir");
    let socket = socket_dir.path().join("sluice.sock");
    let app = Upstream::start(0).await.expect("app");
    let dependency = Upstream::start(0).await.expect("dependency");
    let ports = Ports {
        admin: free_port().expect("port"),
        inbound: free_port().expect("port"),
        outbound: free_port().expect("port"),
        app: app.addr.port(),
        dependency: dependency.addr.port(),
    };
    let mut bootstrap = patched(&ports, files);
    let clusters = bootstrap["static_resources"]["clusters"]
        .as_array_mut()
        .expect("clusters");
    // The pod variant's own cluster is on a Unix socket: the Sluice here
    // listens on one in a temporary directory instead.
    let pod_variant = clusters.iter_mut().find(|c| c["name"] == sluice_cluster);
    let on_socket = pod_variant.is_some();
    let grpc_listen = match pod_variant {
        Some(added) => {
            added["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
                ["path"] = json!(socket.display().to_string());
            sluice_runtime::grpc::Listen::Unix(socket)
        }
        None => sluice_runtime::grpc::Listen::Tcp(([127, 0, 0, 1], 0).into()),
    };
    // The DaemonSet speaks mutual TLS (deploy/sluice-daemonset.yaml).
    let mtls = (!on_socket).then(DaemonsetTls::new);
    let sluice = Sidecar::start(&Config {
        policy: Some(policy.path.clone()),
        service: sluice_service.to_owned(),
        grpc_listen,
        grpc_tls: mtls.as_ref().map(|m| m.server.clone()),
        ..Config::ephemeral()
    })
    .await
    .expect("sidecar starts");
    let sluice_port = (!on_socket).then_some(sluice.grpc_addr.port());
    if let Some(port) = sluice_port {
        let clusters = bootstrap["static_resources"]["clusters"]
            .as_array_mut()
            .expect("clusters");
        let mut cluster = daemonset_service_cluster(port);
        if let Some(mtls) = &mtls {
            cluster["transport_socket"] = mtls.transport_socket();
        }
        clusters.push(cluster);
    }
    let config = serde_json::to_string_pretty(&bootstrap).expect("json");
    let envoy_ports = EnvoyPorts {
        admin: ports.admin,
        listener: ports.inbound,
        upstream: Some(ports.app),
        sluice: sluice_port,
    };
    let envoy = Envoy::start_with(&config, envoy_ports)
        .await
        .expect("envoy starts");
    let inbound = ([127, 0, 0, 1], ports.inbound).into();
    let outbound = ([127, 0, 0, 1], ports.outbound).into();

    for path in ["/items", "/blocked"] {
        let reply = http::get(inbound, path, &[]).await.expect("request");
        assert_eq!(reply.status, 200, "inbound {path}: {}", reply.text());
    }
    let reply = http::get(outbound, "/items", &[]).await.expect("request");
    assert_eq!(reply.status, 200, "outbound /items: {}", reply.text());
    let reply = http::get(outbound, "/blocked", &[]).await.expect("request");
    assert_eq!(reply.status, 403, "outbound /blocked: {}", reply.text());
    assert_eq!(
        reply.header("x-sluice-rejected-by"),
        Some("istio/no-blocked-calls")
    );
    assert_eq!(app.requests.load(Ordering::Relaxed), 2);
    assert_eq!(dependency.requests.load(Ordering::Relaxed), 1);

    let seen: BTreeMap<(String, String), u64> = sluice
        .engine
        .control_points()
        .into_iter()
        .map(|c| ((c.control_point, c.service), c.checks))
        .collect();
    assert_eq!(
        seen,
        BTreeMap::from([
            (("egress".to_owned(), SHOP.to_owned()), 2),
            (("ingress".to_owned(), SHOP.to_owned()), 2),
        ])
    );

    let admin = sluice.admin_addr;
    let series = r#"flowcontrol_access_logs_total{result="matched"}"#;
    let matched = eventually(Duration::from_secs(5), || async move {
        let text = http::get(admin, "/metrics", &[])
            .await
            .expect("metrics")
            .text();
        metric(&text, series) >= 4.0
    })
    .await;
    assert!(matched, "both directions' access logs reach Sluice");

    // Fail open: with Sluice gone, both directions still pass.
    sluice.stop(Duration::from_secs(5)).await;
    assert_eq!(
        http::get(inbound, "/items", &[]).await.expect("get").status,
        200
    );
    assert_eq!(
        http::get(outbound, "/blocked", &[])
            .await
            .expect("get")
            .status,
        200
    );
    drop(envoy);
}

/// Variant 1: the pod's Sluice, told the service by `--service`.
#[tokio::test]
async fn the_pod_sidecar_patches_work_end_to_end() {
    let filter = envoy_filter("istio/sluice-pod-sidecar.yaml");
    let cluster = patches(&filter)[0]["patch"]["value"]["name"]
        .as_str()
        .expect("name")
        .to_owned();
    run(&["istio/sluice-pod-sidecar.yaml"], SHOP, &cluster).await;
}

/// Variant 2: the node's Sluice (no `--service`), told the service by the
/// workload's routes, over mutual TLS.
#[tokio::test]
async fn the_daemonset_patches_with_the_service_name_work_end_to_end() {
    run(
        &[
            "istio/sluice-daemonset.yaml",
            "istio/shop-service-name.yaml",
        ],
        "any",
        DAEMONSET_CLUSTER,
    )
    .await;
}
