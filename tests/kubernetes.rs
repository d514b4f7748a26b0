//! The Kubernetes manifests in deploy/, the EnvoyFilters in istio/ and the
//! Dockerfile, checked against what they run: every Sluice container's args
//! are parsed by the binary's own clap parser; its container ports, probes
//! and Prometheus annotations must be the listeners those args open (and
//! the probe and scrape paths answer 200 from the real admin servers,
//! started from those args); Services must reach ports their pods listen
//! on; the policies in the ConfigMaps must load; the EnvoyFilters must
//! point at the Sluice the manifests deploy; and the image must be the one
//! the Dockerfile and README name.
//!
//! Nothing here talks to Kubernetes, Istio or a registry.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser as _;
use serde_json::{Value, json};
use sluice_runtime::grpc::Listen;
use sluice_runtime::tls::ServerTlsFiles;
use sluice_testkit::pki::Pki;
use sluice_testkit::{free_port, http, repo_root};

/// The image's repository; its tag is the crate's version.
const IMAGE_REPO: &str = "ghcr.io/sluice-dev/sluice";

fn documented_image() -> String {
    format!("{IMAGE_REPO}:{}", env!("CARGO_PKG_VERSION"))
}

/// One YAML document of one file.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    fn namespace(&self) -> &str {
        self.value["metadata"]["namespace"].as_str().unwrap_or("")
    }
}

fn yaml_docs(dir: &str) -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read");
        let file = format!(
            "{dir}/{}",
            path.file_name().expect("name").to_string_lossy()
        );
        let values: Vec<Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        for value in values.into_iter().filter(|v| !v.is_null()) {
            docs.push(Doc {
                file: file.clone(),
                value,
            });
        }
    }
    docs
}

/// The Kubernetes manifests in `deploy/`: every YAML file there but
/// Prometheus's alerting rules and their promtool tests
/// (`prometheus-rules*.yaml`, tests/alert_rules.rs).
fn manifests() -> Vec<Doc> {
    yaml_docs("deploy")
        .into_iter()
        .filter(|d| !d.file.starts_with("deploy/prometheus-rules"))
        .collect()
}

/// A pod template of a Deployment or DaemonSet.
struct Pod<'a> {
    doc: &'a Doc,
    labels: &'a serde_json::Map<String, Value>,
    annotations: &'a Value,
    spec: &'a Value,
}

impl Pod<'_> {
    fn containers(&self) -> &Vec<Value> {
        self.spec["containers"].as_array().expect("containers")
    }
    fn selected_by(&self, selector: &serde_json::Map<String, Value>) -> bool {
        !selector.is_empty() && selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

fn pods(docs: &[Doc]) -> Vec<Pod<'_>> {
    docs.iter()
        .filter(|d| matches!(d.kind(), "Deployment" | "DaemonSet"))
        .map(|doc| {
            let template = &doc.value["spec"]["template"];
            let labels = template["metadata"]["labels"]
                .as_object()
                .unwrap_or_else(|| panic!("{}/{}: pod labels", doc.file, doc.name()));
            // The workload's selector must select its own pods.
            let selector = doc.value["spec"]["selector"]["matchLabels"]
                .as_object()
                .expect("matchLabels");
            assert!(
                selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
                "{}: {} does not select its pods",
                doc.file,
                doc.name()
            );
            Pod {
                doc,
                labels,
                annotations: &template["metadata"]["annotations"],
                spec: &template["spec"],
            }
        })
        .collect()
}

/// The Dockerfile's instructions, continuation lines joined, comments out.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (instruction, rest) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((instruction.to_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

fn instructions(name: &str) -> Vec<String> {
    dockerfile()
        .into_iter()
        .filter(|(i, _)| i == name)
        .map(|(_, rest)| rest)
        .collect()
}

/// Paths of the binaries the runtime stage copies in.
fn image_binaries() -> BTreeSet<String> {
    let copies = instructions("COPY");
    let from_builder: Vec<&String> = copies
        .iter()
        .filter(|c| c.starts_with("--from=builder"))
        .collect();
    assert_eq!(from_builder.len(), 1, "{copies:?}");
    let words: Vec<&str> = from_builder[0].split_whitespace().skip(1).collect();
    let (dest, sources) = words.split_last().expect("COPY sources dest");
    assert!(dest.ends_with('/'), "COPY into a directory: {dest}");
    sources
        .iter()
        .map(|s| format!("{dest}{}", s.rsplit('/').next().expect("name")))
        .collect()
}

fn exec_form(instruction: &str, rest: &str) -> Vec<String> {
    serde_json::from_str(rest)
        .unwrap_or_else(|e| panic!("{instruction} is not in exec form ({e}): {rest}"))
}

/// What a Sluice container runs, parsed by the binary's own parser.
enum Run {
    Sidecar(Box<sluice::cli::RunArgs>),
    Controller(Box<sluice_controller::cli::RunArgs>),
}

impl Run {
    /// Its gRPC listener: TCP, or a Unix socket.
    fn grpc(&self) -> Listen {
        match self {
            Run::Sidecar(a) => a.grpc_listen.clone(),
            Run::Controller(a) => Listen::Tcp(a.listen),
        }
    }
    /// Its TCP listeners: the gRPC one (unless on a socket), then the
    /// admin one.
    fn listens(&self) -> Vec<SocketAddr> {
        self.grpc()
            .tcp()
            .into_iter()
            .chain([self.admin()])
            .collect()
    }
    fn admin(&self) -> SocketAddr {
        match self {
            Run::Sidecar(a) => a.admin_listen,
            Run::Controller(a) => a.admin_listen,
        }
    }
    fn policy(&self) -> Option<&Path> {
        match self {
            Run::Sidecar(a) => a.policy.as_deref(),
            Run::Controller(a) => a.policy.as_deref(),
        }
    }
}

struct SluiceContainer<'a> {
    pod: &'a Pod<'a>,
    container: &'a Value,
    run: Run,
}

impl SluiceContainer<'_> {
    fn what(&self) -> String {
        format!(
            "{}: {}/{} container {}",
            self.pod.doc.file,
            self.pod.doc.kind(),
            self.pod.doc.name(),
            self.container["name"].as_str().unwrap_or("?")
        )
    }

    fn ports(&self) -> Vec<(&str, u16)> {
        self.container["ports"]
            .as_array()
            .map(|ports| {
                ports
                    .iter()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap_or(""),
                            p["containerPort"].as_u64().expect("containerPort") as u16,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A probe's or Service's port (a number or a container port's name).
    fn resolve(&self, port: &Value) -> u16 {
        self.find_port(port)
            .unwrap_or_else(|| panic!("{}: no container port {port}", self.what()))
    }

    /// A port number as is; a name if this container has a port so named.
    fn find_port(&self, port: &Value) -> Option<u16> {
        match port {
            Value::Number(n) => n.as_u64().map(|n| n as u16),
            Value::String(name) => self
                .ports()
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| *p),
            other => panic!("{}: port {other}", self.what()),
        }
    }
}

/// No variable the two command lines read may leak into their parsers from
/// the test's own environment: the manifests' args must be the whole
/// configuration. Other `SLUICE_*` variables (`SLUICE_SKIP_APT` for
/// bootstrap, `SLUICE_ENVOY` for the test kit) are none of the parsers'
/// business.
fn assert_clean_environment() {
    use clap::CommandFactory;
    let read: BTreeSet<String> = [
        sluice::cli::Cli::command(),
        sluice_controller::cli::Cli::command(),
    ]
    .iter()
    .flat_map(|c| c.get_arguments().filter_map(|a| a.get_env()))
    .map(|name| name.to_string_lossy().into_owned())
    .collect();
    assert!(
        read.contains("SLUICE_GRPC_LISTEN") && read.contains("SLUICE_CONTROLLER_POLICY"),
        "the parsers' variables: {read:?}"
    );
    let leaked: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| read.contains(k))
        .collect();
    assert!(
        leaked.is_empty(),
        "unset {leaked:?}: they would change how the manifests' args parse"
    );
}

fn sluice_containers<'a>(pods: &'a [Pod<'a>]) -> Vec<SluiceContainer<'a>> {
    assert_clean_environment();
    let binaries = image_binaries();
    let entrypoint = exec_form("ENTRYPOINT", &instructions("ENTRYPOINT")[0]);
    let mut out = Vec::new();
    for pod in pods {
        for container in pod.containers() {
            let image = container["image"].as_str().expect("image");
            if !image.starts_with(IMAGE_REPO) {
                continue;
            }
            let what = format!("{}: {}", pod.doc.file, container["name"]);
            assert_eq!(
                image,
                documented_image(),
                "{what}: the image the Dockerfile builds"
            );
            let command: Vec<String> = match &container["command"] {
                Value::Null => entrypoint.clone(),
                c => serde_json::from_value(c.clone()).expect("command"),
            };
            assert_eq!(command.len(), 1, "{what}: {command:?}");
            assert!(
                binaries.contains(&command[0]),
                "{what}: {} is not in the image ({binaries:?})",
                command[0]
            );
            let args: Vec<String> = serde_json::from_value(container["args"].clone())
                .unwrap_or_else(|e| panic!("{what}: args: {e}"));
            // Kubernetes expands $(VAR) only for the container's own env.
            let env: BTreeSet<&str> = container["env"]
                .as_array()
                .map(|e| e.iter().filter_map(|v| v["name"].as_str()).collect())
                .unwrap_or_default();
            assert!(
                env.iter().all(|name| !name.starts_with("SLUICE_")),
                "{what}: configure by args, which this test parses"
            );
            for arg in &args {
                for reference in arg.split("$(").skip(1) {
                    let name = reference.split(')').next().unwrap_or("");
                    assert!(env.contains(name), "{what}: {arg} names no env var");
                }
            }
            let binary = command[0].rsplit('/').next().expect("name");
            let argv = std::iter::once(binary.to_owned()).chain(args);
            let run = match binary {
                "sluice" => {
                    let cli = sluice::cli::Cli::try_parse_from(argv)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(cli.command.is_none(), "{what}: runs the sidecar");
                    Run::Sidecar(Box::new(cli.run))
                }
                "sluice-controller" => {
                    let cli = sluice_controller::cli::Cli::try_parse_from(argv)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(cli.command.is_none(), "{what}: runs the controller");
                    Run::Controller(Box::new(cli.run))
                }
                other => panic!("{what}: unknown binary {other}"),
            };
            out.push(SluiceContainer {
                pod,
                container,
                run,
            });
        }
    }
    out
}

fn find<'a>(docs: &'a [Doc], kind: &str, namespace: &str, name: &str) -> Option<&'a Doc> {
    docs.iter()
        .find(|d| d.kind() == kind && d.namespace() == namespace && d.name() == name)
}

/// `http://NAME.NAMESPACE.svc.cluster.local:PORT/...` → (name, namespace,
/// port); `NAME.NAMESPACE` and `NAME` (same namespace) are accepted too.
fn service_of(url: &::http::Uri, own_namespace: &str) -> (String, String, u16) {
    let host = url.host().expect("host");
    let parts: Vec<&str> = host.split('.').collect();
    let (name, namespace) = match parts[..] {
        [name] => (name, own_namespace),
        [name, namespace] | [name, namespace, "svc", "cluster", "local"] => (name, namespace),
        _ => panic!("{url} is not a Service address"),
    };
    let port = url
        .port_u16()
        .unwrap_or(if url.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    (name.to_owned(), namespace.to_owned(), port)
}

/// The container (and its pod) a Service port reaches, with the port.
fn service_backends<'a>(
    docs: &[Doc],
    containers: &'a [SluiceContainer<'a>],
    name: &str,
    namespace: &str,
    port: u16,
) -> Vec<(&'a SluiceContainer<'a>, u16)> {
    let service = find(docs, "Service", namespace, name)
        .unwrap_or_else(|| panic!("no Service {namespace}/{name} in deploy/"));
    let service_port = service.value["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["port"].as_u64() == Some(u64::from(port)))
        .unwrap_or_else(|| panic!("Service {namespace}/{name} has no port {port}"));
    let selector = service.value["spec"]["selector"]
        .as_object()
        .expect("selector");
    let backends: Vec<_> = containers
        .iter()
        .filter(|c| c.pod.doc.namespace() == namespace && c.pod.selected_by(selector))
        .map(|c| {
            let target = &service_port["targetPort"];
            (c, c.resolve(target))
        })
        .collect();
    assert!(
        !backends.is_empty(),
        "Service {namespace}/{name} reaches no Sluice"
    );
    backends
}

#[test]
fn every_manifest_parses_and_uses_the_documented_image() {
    let docs = manifests();
    let files: BTreeSet<&str> = docs.iter().map(|d| d.file.as_str()).collect();
    assert_eq!(
        files,
        BTreeSet::from([
            "deploy/shop-pod-sidecar.yaml",
            "deploy/shop.yaml",
            "deploy/sluice-daemonset.yaml",
            "deploy/sluice-system.yaml",
        ])
    );
    for doc in &docs {
        assert!(doc.value["apiVersion"].is_string(), "{}", doc.file);
        assert!(!doc.name().is_empty(), "{}: {}", doc.file, doc.kind());
        let cluster_scoped = matches!(doc.kind(), "Namespace" | "ClusterIssuer");
        assert!(
            cluster_scoped == doc.namespace().is_empty(),
            "{}: {} {}: namespace {:?}",
            doc.file,
            doc.kind(),
            doc.name(),
            doc.namespace()
        );
        // Every namespace used is one the manifests create, or cert-manager's
        // own, where a ClusterIssuer keeps its CA.
        if !cluster_scoped && doc.namespace() != "cert-manager" {
            assert!(
                docs.iter()
                    .any(|n| n.kind() == "Namespace" && n.name() == doc.namespace()),
                "{}: namespace {} is not created in deploy/",
                doc.file,
                doc.namespace()
            );
        }
    }
    let kinds: BTreeSet<&str> = docs.iter().map(Doc::kind).collect();
    for kind in [
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "Namespace",
        "Service",
    ] {
        assert!(kinds.contains(kind), "no {kind}");
    }

    let pods = pods(&docs);
    let containers = sluice_containers(&pods);
    let kinds: Vec<String> = containers
        .iter()
        .map(|c| {
            let binary = match c.run {
                Run::Sidecar(_) => "sluice",
                Run::Controller(_) => "sluice-controller",
            };
            format!("{} {binary}", c.pod.doc.kind())
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Deployment sluice",            // shop-pod-sidecar.yaml
            "DaemonSet sluice",             // sluice-daemonset.yaml
            "Deployment sluice-controller", // sluice-system.yaml
        ]
    );
    // Every image of ours is named so; every other image is pinned.
    for pod in &pods {
        for container in pod.containers() {
            let image = container["image"].as_str().expect("image");
            assert!(
                image.starts_with(IMAGE_REPO) == (image == documented_image()),
                "{}: {image}",
                pod.doc.file
            );
            assert!(
                image
                    .rsplit_once(':')
                    .is_some_and(|(_, tag)| tag != "latest"),
                "{}: pin {image}",
                pod.doc.file
            );
        }
    }
    // The documents that tell users the image's name say the same.
    for file in ["README.md", "Dockerfile", "docs/istio.md"] {
        let text = std::fs::read_to_string(repo_root().join(file)).expect(file);
        let named: BTreeSet<&str> = text
            .match_indices(IMAGE_REPO)
            .map(|(at, _)| {
                let rest = &text[at..];
                let end = rest
                    .find(|c: char| c.is_whitespace() || c == '`' || c == ')' || c == '"')
                    .unwrap_or(rest.len());
                // Sentence punctuation after the name is not part of it.
                rest[..end].trim_end_matches(['.', ',', ':', ';'])
            })
            .collect();
        assert_eq!(
            named,
            BTreeSet::from([documented_image().as_str()]),
            "{file} names the image"
        );
    }
}

#[test]
fn the_dockerfile_builds_both_binaries_and_checks_health_with_sluice() {
    let from = instructions("FROM");
    assert_eq!(
        from,
        [
            "rust:1.95-bookworm AS builder",
            "gcr.io/distroless/cc-debian12:nonroot"
        ]
    );
    let runs = instructions("RUN");
    assert!(
        runs.iter()
            .any(|r| r
                .contains("cargo build --release --locked --bin sluice --bin sluice-controller")),
        "{runs:?}"
    );
    let binaries = image_binaries();
    assert_eq!(
        binaries,
        BTreeSet::from([
            "/usr/local/bin/sluice".to_owned(),
            "/usr/local/bin/sluice-controller".to_owned()
        ])
    );
    assert_eq!(instructions("USER"), ["65532:65532"], "non-root, numeric");
    let entrypoint = exec_form("ENTRYPOINT", &instructions("ENTRYPOINT")[0]);
    assert_eq!(entrypoint, ["/usr/local/bin/sluice"]);
    let labels = instructions("LABEL").join(" ");
    assert!(
        labels.contains(&format!(
            "org.opencontainers.image.version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{labels}"
    );

    // EXPOSE: the binaries' default listeners, which the manifests use.
    let exposed: BTreeSet<u16> = instructions("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace().map(|p| p.parse().expect("port")))
        .collect();
    let sidecar = sluice::cli::Cli::try_parse_from(["sluice"])
        .expect("defaults")
        .run;
    let controller = sluice_controller::cli::Cli::try_parse_from(["sluice-controller"])
        .expect("defaults")
        .run;
    let defaults = BTreeSet::from([
        sidecar.grpc_listen.tcp().expect("TCP by default").port(),
        sidecar.admin_listen.port(),
        controller.listen.port(),
        controller.admin_listen.port(),
    ]);
    assert_eq!(exposed, defaults);
    let docs = manifests();
    let pods = pods(&docs);
    let listened: BTreeSet<u16> = sluice_containers(&pods)
        .iter()
        .flat_map(|c| c.run.listens().into_iter().map(|a| a.port()))
        .collect();
    assert_eq!(exposed, listened, "the manifests listen where EXPOSE says");

    // HEALTHCHECK: `sluice health` on the sidecar's admin liveness route.
    let healthcheck = instructions("HEALTHCHECK");
    assert_eq!(healthcheck.len(), 1);
    let (options, cmd) = healthcheck[0].split_once("CMD ").expect("CMD");
    assert!(options.contains("--timeout="), "{options}");
    let argv = exec_form("HEALTHCHECK CMD", cmd);
    assert!(binaries.contains(&argv[0]), "{argv:?}");
    let cli = sluice::cli::Cli::try_parse_from(
        std::iter::once("sluice".to_owned()).chain(argv[1..].iter().cloned()),
    )
    .expect("the HEALTHCHECK's command parses");
    let Some(sluice::cli::Command::Health { url, .. }) = cli.command else {
        panic!("HEALTHCHECK does not run `sluice health`: {argv:?}");
    };
    assert_eq!(url.host(), Some("127.0.0.1"));
    assert_eq!(url.port_u16(), Some(sidecar.admin_listen.port()));
    assert_eq!(url.path(), "/healthz");

    // The build context keeps out what the build does not need.
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).expect(".dockerignore");
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for path in ["target", ".git", ".venv"] {
        assert!(ignored.contains(path), ".dockerignore: {path}");
    }
    for needed in [
        "src",
        "crates",
        "proto",
        "Cargo.toml",
        "Cargo.lock",
        "benches",
    ] {
        assert!(
            !ignored.contains(needed),
            ".dockerignore must keep {needed}"
        );
    }
}

/// The policy directory a container's `--policy` names, rebuilt from the
/// ConfigMap mounted there.
fn policy_dir(docs: &[Doc], c: &SluiceContainer<'_>) -> (tempfile::TempDir, PathBuf) {
    let what = c.what();
    let policy = c
        .run
        .policy()
        .unwrap_or_else(|| panic!("{what}: no --policy"));
    let mounts = c.container["volumeMounts"]
        .as_array()
        .expect("volumeMounts");
    let mount = mounts
        .iter()
        .find(|m| policy.starts_with(m["mountPath"].as_str().expect("mountPath")))
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {}", policy.display()));
    let volume = c.pod.spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("{what}: no volume {}", mount["name"]));
    let config_map = volume["configMap"]["name"].as_str().expect("a ConfigMap");
    let namespace = c.pod.doc.namespace();
    let doc = find(docs, "ConfigMap", namespace, config_map)
        .unwrap_or_else(|| panic!("{what}: no ConfigMap {namespace}/{config_map}"));
    let dir = tempfile::tempdir().expect("dir");
    for (key, text) in doc.value["data"].as_object().expect("data") {
        std::fs::write(dir.path().join(key), text.as_str().expect("text")).expect("write");
    }
    let relative = policy
        .strip_prefix(mount["mountPath"].as_str().expect("mountPath"))
        .expect("under the mount");
    let path = dir.path().join(relative);
    (dir, path)
}

/// The cert-manager Certificate among `docs` that makes the secret
/// `namespace/secret`.
fn certificate_making<'d>(docs: &'d [Doc], namespace: &str, secret: &Value) -> Option<&'d Doc> {
    docs.iter().find(|d| {
        d.kind() == "Certificate"
            && d.namespace() == namespace
            && d.value["spec"]["secretName"] == *secret
    })
}

/// The ClusterIssuer an `issuerRef` names.
fn cluster_issuer<'d>(docs: &'d [Doc], reference: &Value) -> &'d Doc {
    assert_eq!(reference["kind"], "ClusterIssuer", "{reference}");
    let name = reference["name"].as_str().expect("name");
    find(docs, "ClusterIssuer", "", name).unwrap_or_else(|| panic!("no ClusterIssuer {name}"))
}

/// The cert-manager Certificate whose secret (a `kubernetes.io/tls` one:
/// `tls.crt`, `tls.key`, `ca.crt`) is mounted in `c` where `file` is.
fn certificate_of<'d>(docs: &'d [Doc], c: &SluiceContainer<'_>, file: &Path) -> &'d Doc {
    let what = c.what();
    let dir = file.parent().expect("dir");
    assert!(
        ["tls.crt", "tls.key", "ca.crt"]
            .contains(&file.file_name().and_then(|n| n.to_str()).unwrap_or("")),
        "{what}: {} is not a file of a TLS secret",
        file.display()
    );
    let mount = c.container["volumeMounts"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|m| Path::new(m["mountPath"].as_str().unwrap_or("")) == dir)
        })
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {}", dir.display()));
    let secret = c.pod.spec["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]))
        .and_then(|v| v["secret"]["secretName"].as_str())
        .unwrap_or_else(|| panic!("{what}: {} is not a secret", mount["name"]));
    let namespace = c.pod.doc.namespace();
    certificate_making(docs, namespace, &json!(secret))
        .unwrap_or_else(|| panic!("{what}: no Certificate makes {namespace}/{secret}"))
}

/// The cert-manager Certificate whose secret is mounted where `files` are,
/// in the pod of `c`: its certificate, key and CA are that secret's
/// `tls.crt`, `tls.key` and `ca.crt`.
fn server_certificate<'d>(
    docs: &'d [Doc],
    c: &SluiceContainer<'_>,
    files: &ServerTlsFiles,
) -> &'d Doc {
    let what = c.what();
    let dir = files.identity.cert.parent().expect("dir");
    let file = |name: &str| dir.join(name);
    assert_eq!(files.identity.cert, file("tls.crt"), "{what}");
    assert_eq!(files.identity.key, file("tls.key"), "{what}");
    assert_eq!(
        files.client_ca.as_deref(),
        Some(&*file("ca.crt")),
        "{what}: mTLS"
    );
    certificate_of(docs, c, &files.identity.cert)
}

/// For a listener of `c` serving TLS from `files`: a made-up CA and the
/// files it issues in place of what cert-manager would put in the secret.
fn issued_in_place(
    docs: &[Doc],
    c: &SluiceContainer<'_>,
    files: Option<&ServerTlsFiles>,
) -> (Option<Pki>, Option<ServerTlsFiles>) {
    let Some(files) = files else {
        return (None, None);
    };
    let certificate = server_certificate(docs, c, files);
    let pki = Pki::new("sluice-ca").expect("CA");
    let name = certificate.value["spec"]["dnsNames"][0]
        .as_str()
        .expect("dnsNames");
    let issued = pki.issue(name).expect("issue");
    let files = ServerTlsFiles {
        identity: sluice_runtime::tls::CertKey {
            cert: issued.cert,
            key: issued.key,
        },
        client_ca: Some(pki.ca_file.clone()),
    };
    (Some(pki), Some(files))
}

/// GETs `path` on `admin`, expecting 200.
async fn answers(admin: SocketAddr, path: &str, what: &str) -> String {
    let reply = http::get(admin, path, &[])
        .await
        .unwrap_or_else(|e| panic!("{what}: GET {path}: {e:#}"));
    assert_eq!(reply.status, 200, "{what}: GET {path}: {}", reply.text());
    reply.text()
}

#[tokio::test]
async fn container_ports_probes_and_scrapes_match_the_listeners_the_args_open() {
    let docs = manifests();
    let pods = pods(&docs);
    let containers = sluice_containers(&pods);
    let uid = instructions("USER")[0]
        .split(':')
        .next()
        .expect("uid")
        .parse::<u64>()
        .expect("numeric");
    for c in &containers {
        let what = c.what();
        let listens = c.run.listens();
        for &addr in &listens {
            assert!(
                addr.ip().is_loopback() || addr.ip().is_unspecified(),
                "{what}: {addr}: loopback or every address"
            );
        }
        // Declared ports are listened on; what others must reach is declared.
        let declared: BTreeSet<u16> = c.ports().iter().map(|(_, p)| *p).collect();
        let listened: BTreeSet<u16> = listens.iter().map(|a| a.port()).collect();
        let public: BTreeSet<u16> = listens
            .iter()
            .filter(|a| a.ip().is_unspecified())
            .map(|a| a.port())
            .collect();
        assert!(
            declared.is_subset(&listened),
            "{what}: {declared:?} ⊄ {listened:?}"
        );
        assert!(
            public.is_subset(&declared),
            "{what}: {public:?} not declared"
        );

        // Probes: the admin listener, which the kubelet must reach.
        let admin = c.run.admin();
        assert!(
            admin.ip().is_unspecified(),
            "{what}: kubelet reaches {admin}"
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c.container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{what}: {probe}");
            assert_eq!(c.resolve(&get["port"]), admin.port(), "{what}: {probe}");
        }
        // Prometheus: the admin listener's /metrics.
        let a = c.pod.annotations;
        assert_eq!(a["prometheus.io/scrape"], "true", "{what}");
        assert_eq!(a["prometheus.io/port"], admin.port().to_string(), "{what}");
        assert_eq!(a["prometheus.io/path"], "/metrics", "{what}");

        let resources = &c.container["resources"];
        for kind in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    !resources[kind][resource].is_null(),
                    "{what}: {kind}.{resource}"
                );
            }
        }
        let security = &c.container["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{what}");
        assert_eq!(security["runAsUser"], uid, "{what}: the image's user");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{what}");

        // Whoever can reach the admin port must not feed flux meters.
        if let Run::Sidecar(args) = &c.run {
            assert!(!args.otlp_http, "{what}: --otlp-http=false on 0.0.0.0");
        }
    }

    // The probe and scrape paths are real routes: start each binary's
    // server from the parsed args (on loopback, without Prometheus or the
    // controller) and ask.
    for c in &containers {
        let what = c.what();
        let (_dir, policy) = policy_dir(&docs, c);
        let admin_paths = [
            c.container["livenessProbe"]["httpGet"]["path"]
                .as_str()
                .expect("path"),
            c.container["readinessProbe"]["httpGet"]["path"]
                .as_str()
                .expect("path"),
        ];
        let scrape = c.pod.annotations["prometheus.io/path"]
            .as_str()
            .expect("path");
        match &c.run {
            Run::Sidecar(args) => {
                let config = args.config().unwrap_or_else(|e| panic!("{what}: {e:#}"));
                let (_pki, grpc_tls) = issued_in_place(&docs, c, config.grpc_tls.as_ref());
                let config = sluice::server::Config {
                    grpc_listen: sluice_runtime::grpc::Listen::Tcp(([127, 0, 0, 1], 0).into()),
                    admin_listen: ([127, 0, 0, 1], 0).into(),
                    policy: Some(policy),
                    remote_write: None,
                    controller: None,
                    grpc_tls,
                    ..config
                };
                let sidecar = sluice::server::Sidecar::start(&config)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                for path in admin_paths {
                    answers(sidecar.admin_addr, path, &what).await;
                }
                let metrics = answers(sidecar.admin_addr, scrape, &what).await;
                assert!(metrics.contains("flowcontrol_requests_total"), "{what}");
                sidecar.stop(Duration::from_secs(5)).await;
            }
            Run::Controller(args) => {
                let dead = free_port().expect("port");
                let config = sluice_controller::cli::config(args, &policy).expect("flags");
                let (_pki, tls) = issued_in_place(&docs, c, config.tls.as_ref());
                let config = sluice_controller::ControllerConfig {
                    listen: ([127, 0, 0, 1], 0).into(),
                    admin_listen: ([127, 0, 0, 1], 0).into(),
                    // Never the cluster's Prometheus: nothing leaves loopback.
                    prometheus_url: format!("http://127.0.0.1:{dead}"),
                    tls,
                    ..config
                };
                let controller = sluice_controller::Controller::start(config)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                for path in admin_paths {
                    answers(controller.admin_addr, path, &what).await;
                }
                let metrics = answers(controller.admin_addr, scrape, &what).await;
                assert!(metrics.contains("controller_ticks_total"), "{what}");
                controller.stop(Duration::from_secs(5)).await;
            }
        }
    }
}

#[test]
fn services_reach_ports_their_pods_listen_on() {
    let docs = manifests();
    let pods = pods(&docs);
    let containers = sluice_containers(&pods);
    let services: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "Service").collect();
    assert!(services.len() >= 4);
    for service in services {
        let what = format!("{}: Service {}", service.file, service.name());
        let selector = service.value["spec"]["selector"]
            .as_object()
            .expect("selector");
        let selected: Vec<&Pod> = pods
            .iter()
            .filter(|p| {
                p.doc.file == service.file
                    && p.doc.namespace() == service.namespace()
                    && p.selected_by(selector)
            })
            .collect();
        assert!(!selected.is_empty(), "{what} selects no pod");
        for port in service.value["spec"]["ports"].as_array().expect("ports") {
            let target = &port["targetPort"];
            for pod in &selected {
                let found = pod.containers().iter().any(|c| {
                    c["ports"].as_array().is_some_and(|ports| {
                        ports.iter().any(|p| match target {
                            Value::String(name) => p["name"] == *name,
                            number => p["containerPort"] == *number,
                        })
                    })
                });
                assert!(
                    found,
                    "{what}: no container port {target} in {}",
                    pod.doc.name()
                );
            }
            // A Sluice port behind a Service is gRPC: named so that Istio
            // speaks HTTP/2 to it.
            let in_selected =
                |c: &&SluiceContainer| selected.iter().any(|p| std::ptr::eq(*p, c.pod));
            for c in containers.iter().filter(in_selected) {
                let Some(grpc) = c.run.grpc().tcp() else {
                    continue;
                };
                if c.find_port(target) == Some(grpc.port()) {
                    assert!(grpc.ip().is_unspecified(), "{what}: {grpc} is loopback");
                    assert!(
                        port["name"].as_str().is_some_and(|n| n.starts_with("grpc")),
                        "{what}: port name"
                    );
                    assert_eq!(port["appProtocol"], "grpc", "{what}");
                }
            }
        }
    }
}

/// The pod of `c` shares the directory of its gRPC socket `path` with
/// istio-proxy: an emptyDir mounted there in `c`, mounted at the same path
/// into istio-proxy by the `sidecar.istio.io/userVolumeMount` annotation,
/// in no other container; and the pod's `fsGroup` is Sluice's group, so
/// that istio-proxy (another user) may connect to the `0660` socket.
fn socket_is_shared_with_istio_proxy(c: &SluiceContainer<'_>, path: &Path) {
    let what = c.what();
    let dir = path.parent().expect("socket directory");
    let mounts = |container: &Value| -> Vec<(String, String)> {
        container["volumeMounts"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|m| {
                        (
                            m["name"].as_str().unwrap_or("").to_owned(),
                            m["mountPath"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (volume, _) = mounts(c.container)
        .into_iter()
        .find(|(_, at)| Path::new(at) == dir)
        .unwrap_or_else(|| panic!("{what}: no volume mounted at {}", dir.display()));
    let declared = c.pod.spec["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == volume.as_str()))
        .unwrap_or_else(|| panic!("{what}: volume {volume} not declared"));
    assert!(
        declared["emptyDir"].is_object(),
        "{what}: {volume}: emptyDir"
    );
    for other in c.pod.containers() {
        if !std::ptr::eq(other, c.container) {
            assert!(
                mounts(other).iter().all(|(name, _)| *name != volume),
                "{what}: {volume} is mounted by {}",
                other["name"]
            );
        }
    }
    let annotation = c.pod.annotations["sidecar.istio.io/userVolumeMount"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no sidecar.istio.io/userVolumeMount"));
    let proxy_mounts: Value = serde_json::from_str(annotation).expect("JSON annotation");
    assert_eq!(
        proxy_mounts[&volume]["mountPath"],
        dir.display().to_string(),
        "{what}: istio-proxy mounts {volume} where the socket is"
    );
    assert_eq!(
        c.pod.spec["securityContext"]["fsGroup"], c.container["securityContext"]["runAsGroup"],
        "{what}: the pod's fsGroup is Sluice's group"
    );
}

/// Every `service` a policy's selectors name.
fn selector_services(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(selectors)) = map.get("selectors") {
                for s in selectors {
                    out.insert(s["service"].as_str().unwrap_or("any").to_owned());
                }
            }
            map.values().for_each(|v| selector_services(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| selector_services(v, out)),
        _ => {}
    }
}

#[test]
fn the_policies_load_and_are_the_same_everywhere() {
    let docs = manifests();
    let pods = pods(&docs);
    let containers = sluice_containers(&pods);
    let maps: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == "ConfigMap" && d.name() == "sluice-policies")
        .collect();
    assert_eq!(maps.len(), 2, "sluice-system's and the shop's copy");
    assert_eq!(
        maps[0].value["data"], maps[1].value["data"],
        "the controller's decisions apply only to the same policy text"
    );
    // Every container's --policy loads with the real loader.
    for c in &containers {
        let (_dir, path) = policy_dir(&docs, c);
        let set = sluice_policy::load_path(&path).unwrap_or_else(|e| panic!("{}: {e}", c.what()));
        assert!(!set.policies.is_empty());
        if let Run::Controller(_) = c.run {
            assert!(
                set.policies.iter().any(|p| p.policy.circuit.is_some()),
                "{}: the controller has a circuit to run",
                c.what()
            );
        }
    }

    // The services the policies select are the ones the deployments name,
    // both ways: the pod's --service, or the service-name EnvoyFilter's.
    // A name on one side only is a policy that never applies.
    let mut named = BTreeSet::new();
    for c in &containers {
        if let Run::Sidecar(args) = &c.run
            && args.service != "any"
        {
            named.insert(args.service.clone());
        }
    }
    let service_name = yaml_docs("istio")
        .into_iter()
        .find(|d| d.file == "istio/shop-service-name.yaml")
        .expect("istio/shop-service-name.yaml");
    for patch in service_name.value["spec"]["configPatches"]
        .as_array()
        .expect("patches")
    {
        let service = &patch["patch"]["value"]["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
            ["check_settings"]["context_extensions"]["service"];
        named.insert(service.as_str().expect("service").to_owned());
    }
    for map in maps {
        let mut selected = BTreeSet::new();
        for text in map.value["data"].as_object().expect("data").values() {
            let policy: Value =
                serde_saphyr::from_str(text.as_str().expect("text")).expect("policy yaml");
            selector_services(&policy, &mut selected);
        }
        selected.remove("any");
        assert_eq!(
            selected, named,
            "{}: the services the policies select, and those the deployments name",
            map.file
        );
    }
}

#[test]
fn the_envoy_filters_reach_the_sluice_the_manifests_deploy() {
    let docs = manifests();
    let pods = pods(&docs);
    let containers = sluice_containers(&pods);
    let filters = yaml_docs("istio");
    let filter = |name: &str| {
        &filters
            .iter()
            .find(|d| d.kind() == "EnvoyFilter" && d.name() == name)
            .unwrap_or_else(|| panic!("no EnvoyFilter {name}"))
            .value
    };

    // Variant 1: the CLUSTER ADD patch is the pod's Sluice's gRPC socket,
    // in every pod the filter selects, and only there; istio-proxy mounts
    // the socket's volume, and can connect.
    let pod_filter = filter("sluice-pod-sidecar");
    let selector = pod_filter["spec"]["workloadSelector"]["labels"]
        .as_object()
        .expect("workloadSelector");
    let added = &pod_filter["spec"]["configPatches"][0]["patch"]["value"];
    let endpoint = &added["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["pipe"]["path"];
    let mut selected = 0;
    for pod in &pods {
        let own_sluice = containers
            .iter()
            .find(|c| std::ptr::eq(c.pod, pod) && matches!(c.run, Run::Sidecar(_)));
        let socket = own_sluice.and_then(|c| match c.run.grpc() {
            Listen::Unix(path) => Some((c, path)),
            Listen::Tcp(_) => None,
        });
        assert_eq!(
            pod.selected_by(selector),
            socket.is_some(),
            "{}: {} is selected iff it has a Sluice container on a Unix socket",
            pod.doc.file,
            pod.doc.name()
        );
        if let Some((c, path)) = socket {
            assert_eq!(endpoint, &path.display().to_string(), "{}", c.what());
            socket_is_shared_with_istio_proxy(c, &path);
            selected += 1;
        }
    }
    assert_eq!(selected, 1);

    // Variant 2: Istio's cluster for the Service `sluice`, whose port leads
    // to the DaemonSet's gRPC listener on every node, and to no other node.
    let daemonset_filter = filter("sluice-daemonset");
    let grpc = &daemonset_filter["spec"]["configPatches"][2]["patch"]["value"]["typed_config"]["grpc_service"]
        ["envoy_grpc"];
    let cluster = grpc["cluster_name"].as_str().expect("cluster_name");
    let parts: Vec<&str> = cluster.split('|').collect();
    let [direction, port, subset, host] = parts[..] else {
        panic!("{cluster} is not an Istio cluster name");
    };
    assert_eq!((direction, subset), ("outbound", ""));
    assert_eq!(grpc["authority"], host, "a valid :authority");
    let url: ::http::Uri = format!("http://{host}:{port}").parse().expect("url");
    let (name, namespace, port) = service_of(&url, "");
    let service = find(&docs, "Service", &namespace, &name).expect("the Service");
    assert_eq!(
        service.value["spec"]["internalTrafficPolicy"], "Local",
        "each proxy reaches its own node's Sluice"
    );
    for (c, target) in service_backends(&docs, &containers, &name, &namespace, port) {
        assert_eq!(c.pod.doc.kind(), "DaemonSet", "{}", c.what());
        let grpc = c.run.grpc().tcp().expect("the DaemonSet listens on TCP");
        assert_eq!(target, grpc.port(), "{}: gRPC", c.what());
        assert!(grpc.ip().is_unspecified(), "{}", c.what());
    }

    // Sluice's namespace gets no istio-proxy (it would check Sluice's own
    // Checks), the apps' namespace does.
    let injection = |ns: &str| {
        find(&docs, "Namespace", "", ns).expect("namespace").value["metadata"]["labels"]
            ["istio-injection"]
            .clone()
    };
    assert_eq!(injection(&namespace), json!("disabled"));
    for c in &containers {
        if c.pod.doc.namespace() == namespace {
            assert_eq!(
                c.pod.labels.get("sidecar.istio.io/inject"),
                Some(&json!("false")),
                "{}",
                c.what()
            );
        }
    }
    assert_eq!(injection("shop"), json!("enabled"));

    // The service-name filter selects the shop's pods of variant 2.
    let service_name = filter("sluice-service-name");
    let selector = service_name["spec"]["workloadSelector"]["labels"]
        .as_object()
        .expect("workloadSelector");
    let shop: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.doc.file == "deploy/shop.yaml")
        .collect();
    assert!(!shop.is_empty());
    for pod in shop {
        assert_eq!(pod.doc.namespace(), service_name["metadata"]["namespace"]);
        assert!(pod.selected_by(selector), "{}", pod.doc.name());
    }
}

#[test]
fn sidecars_find_the_controller_and_one_prometheus() {
    let docs = manifests();
    let pods = pods(&docs);
    let containers = sluice_containers(&pods);
    let prometheus: BTreeSet<String> = containers
        .iter()
        .map(|c| match &c.run {
            Run::Controller(args) => {
                let url: ::http::Uri = args.prometheus_url.parse().expect("url");
                format!("{}", url.authority().expect("authority"))
            }
            Run::Sidecar(args) => {
                let url = args.remote_write_url.as_ref().expect("--remote-write-url");
                assert_eq!(url.path(), "/api/v1/write", "{}", c.what());
                format!("{}", url.authority().expect("authority"))
            }
        })
        .collect();
    assert_eq!(prometheus.len(), 1, "one Prometheus: {prometheus:?}");

    let mut sidecars = 0;
    for c in &containers {
        let Run::Sidecar(args) = &c.run else { continue };
        let url = args.controller.as_ref().expect("--controller");
        let (name, namespace, port) = service_of(url, c.pod.doc.namespace());
        let backends = service_backends(&docs, &containers, &name, &namespace, port);
        for (controller, target) in backends {
            let Run::Controller(_) = controller.run else {
                panic!("{}: --controller reaches {}", c.what(), controller.what());
            };
            let listen = controller.run.listens()[0];
            assert_eq!(target, listen.port(), "{}", c.what());
            assert!(listen.ip().is_unspecified(), "{}", controller.what());
        }
        sidecars += 1;
    }
    assert_eq!(sidecars, 2);
}

/// Every file the docs, configs and manifests name exists: relative links
/// in Markdown, and repository paths (`deploy/…`, `istio/…`, `tests/…`)
/// anywhere, so a renamed file cannot leave a dangling instruction.
#[test]
fn every_file_the_docs_name_exists() {
    let root = repo_root();
    let mut files = vec![root.join("README.md"), root.join("Dockerfile")];
    for dir in ["docs", "envoy-configs", "istio", "deploy"] {
        let mut more: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "md" || e == "yaml"))
            .collect();
        more.sort();
        files.extend(more);
    }
    let mentioned = regex::Regex::new(
        // Not inside a longer path (`crates/policy/tests/x.rs` is not `tests/x.rs`).
        r"(?:^|[^A-Za-z0-9_./-])(?:\.\./)?((?:deploy|istio|envoy-configs|examples|docs|tests|loadtests)/[A-Za-z0-9_./-]+\.(?:yaml|yml|md|rs))",
    )
    .expect("regex");
    let link = regex::Regex::new(r"\]\(([^)#\s]+)").expect("regex");
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        let name = file
            .strip_prefix(&root)
            .expect("in repo")
            .display()
            .to_string();
        for m in mentioned.captures_iter(&text) {
            let path = &m[1];
            assert!(
                root.join(path).exists(),
                "{name} names {path}, which does not exist"
            );
            checked += 1;
        }
        if file.extension().is_some_and(|e| e == "md") {
            for m in link.captures_iter(&text) {
                let target = &m[1];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let path = file.parent().expect("dir").join(target);
                assert!(path.exists(), "{name} links {target}, which does not exist");
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "only {checked} references found");
}

/// `client` is a client certificate from `issuer`.
fn assert_client_certificate(client: &Doc, issuer: &Value, what: &str) {
    assert_eq!(client.value["spec"]["issuerRef"], *issuer, "{what}: one CA");
    assert!(
        client.value["spec"]["usages"]
            .as_array()
            .expect("usages")
            .contains(&json!("client auth")),
        "{what}: client auth"
    );
}

/// The DaemonSet's mutual TLS holds together: its server certificate names
/// the Service the proxies reach it by, comes from the same cert-manager CA
/// as the clients', and every namespace whose proxies reach it (those with
/// a service-name filter) presents a client certificate through a
/// DestinationRule that selects its workloads and checks Sluice's name.
#[test]
fn the_daemonsets_mutual_tls_chain_holds_together() {
    let docs = manifests();
    let istio = yaml_docs("istio");
    let pods = pods(&docs);
    let containers = sluice_containers(&pods);
    let daemonset = containers
        .iter()
        .find(|c| c.pod.doc.kind() == "DaemonSet")
        .expect("the DaemonSet");
    let Run::Sidecar(args) = &daemonset.run else {
        panic!("the DaemonSet runs the sidecar");
    };
    let config = args.config().expect("flags");
    let files = config.grpc_tls.as_ref().expect("the DaemonSet speaks TLS");
    let server = server_certificate(&docs, daemonset, files);
    let host = format!("sluice.{}.svc.cluster.local", daemonset.pod.doc.namespace());
    assert!(
        find(&docs, "Service", daemonset.pod.doc.namespace(), "sluice").is_some(),
        "the Service {host}"
    );
    let spec = &server.value["spec"];
    assert!(
        spec["dnsNames"]
            .as_array()
            .expect("dnsNames")
            .contains(&json!(host))
    );
    assert!(
        spec["usages"]
            .as_array()
            .expect("usages")
            .contains(&json!("server auth"))
    );

    // Issuer chain: a CA ClusterIssuer whose CA cert-manager made itself.
    let issuer_ref = &spec["issuerRef"];
    let issuer = cluster_issuer(&docs, issuer_ref);
    let ca = certificate_making(
        &docs,
        "cert-manager",
        &issuer.value["spec"]["ca"]["secretName"],
    )
    .expect("the CA's Certificate, in cert-manager's namespace");
    assert_eq!(ca.value["spec"]["isCA"], true);
    let root = cluster_issuer(&docs, &ca.value["spec"]["issuerRef"]);
    assert!(root.value["spec"]["selfSigned"].is_object());

    let rules: Vec<&Doc> = istio
        .iter()
        .filter(|d| d.kind() == "DestinationRule")
        .collect();
    let reaching: BTreeSet<&str> = istio
        .iter()
        .filter(|d| d.file.ends_with("-service-name.yaml"))
        .map(Doc::namespace)
        .collect();
    let covered: BTreeSet<&str> = rules.iter().map(|d| d.namespace()).collect();
    assert_eq!(
        reaching, covered,
        "a DestinationRule for every namespace that sends Checks"
    );
    for rule in rules {
        let what = format!("{}: DestinationRule {}", rule.file, rule.name());
        let spec = &rule.value["spec"];
        assert_eq!(spec["host"], host, "{what}");
        let tls = &spec["trafficPolicy"]["tls"];
        assert_eq!(tls["mode"], "MUTUAL", "{what}");
        assert_eq!(tls["sni"], host, "{what}");
        assert_eq!(tls["subjectAltNames"], json!([host]), "{what}");
        // credentialName works at a sidecar only with a workloadSelector,
        // and only with a secret of the proxy's namespace.
        let selector = spec["workloadSelector"]["matchLabels"]
            .as_object()
            .unwrap_or_else(|| panic!("{what}: workloadSelector"));
        assert!(
            pods.iter()
                .any(|p| p.doc.namespace() == rule.namespace() && p.selected_by(selector)),
            "{what}: selects no workload"
        );
        let client = certificate_making(&istio, rule.namespace(), &tls["credentialName"])
            .unwrap_or_else(|| panic!("{what}: no Certificate makes its credential"));
        assert_client_certificate(client, issuer_ref, &what);
    }
}

/// Sidecars and the controller speak mutual TLS with certificates of one
/// cert-manager CA: the controller's names the host the sidecars'
/// `--controller` URL uses, each sidecar presents a client certificate of
/// the same issuer and trusts that issuer's CA, and a sidecar whose pod has
/// an istio-proxy keeps its TLS to the controller out of the proxy's
/// capture (the proxy would take it for plain HTTP/2).
#[test]
fn sidecars_and_the_controller_speak_mutual_tls_from_one_ca() {
    let docs = manifests();
    let pods = pods(&docs);
    let containers = sluice_containers(&pods);
    let controller = containers
        .iter()
        .find(|c| matches!(c.run, Run::Controller(_)))
        .expect("the controller");
    let Run::Controller(args) = &controller.run else {
        unreachable!()
    };
    let config = sluice_controller::cli::config(args, Path::new("/")).expect("flags");
    let files = config.tls.as_ref().expect("the controller speaks TLS");
    let server = server_certificate(&docs, controller, files);
    let issuer = &server.value["spec"]["issuerRef"];
    let names = server.value["spec"]["dnsNames"]
        .as_array()
        .expect("dnsNames");
    let mut sidecars = 0;
    for c in &containers {
        let Run::Sidecar(args) = &c.run else { continue };
        let what = c.what();
        let url = args.controller.as_ref().expect("--controller");
        assert_eq!(url.scheme_str(), Some("https"), "{what}");
        assert!(
            names.contains(&json!(url.host())),
            "{what}: {url} not in {names:?}"
        );
        let (Some(ca), Some(cert), Some(key)) = (
            &args.controller_ca_file,
            &args.controller_cert,
            &args.controller_key,
        ) else {
            panic!("{what}: --controller-ca-file, --controller-cert, --controller-key");
        };
        let client = certificate_of(&docs, c, cert);
        for file in [ca, key] {
            assert_eq!(
                certificate_of(&docs, c, file).name(),
                client.name(),
                "{what}: one secret"
            );
        }
        assert_client_certificate(client, issuer, &what);
        let injected = find(&docs, "Namespace", "", c.pod.doc.namespace())
            .is_some_and(|n| n.value["metadata"]["labels"]["istio-injection"] == "enabled")
            && c.pod.labels.get("sidecar.istio.io/inject") != Some(&json!("false"));
        if injected {
            let port = url.port_u16().expect("port").to_string();
            let excluded = c.pod.annotations["traffic.sidecar.istio.io/excludeOutboundPorts"]
                .as_str()
                .unwrap_or("");
            assert!(
                excluded.split(',').any(|p| p.trim() == port),
                "{what}: port {port} to the controller goes through istio-proxy"
            );
        }
        sidecars += 1;
    }
    assert_eq!(sidecars, 2);
}
