//! Attacks on the sidecar and the controller, run against the binaries as
//! users run them, behind the real Envoy and with the real Prometheus
//! (docs/security.md describes the trust boundary these tests hold).
//!
//! Every bound here bounds a failing test; none is a claim about speed.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use sluice_engine::flow_end::metadata::FlowKey;
use sluice_runtime::grpc::ClientTls;
use sluice_runtime::tls::CertKey;
use sluice_testkit::access_log::{self, attribute};
use sluice_testkit::envoy::render;
use sluice_testkit::pki::{Issued, Pki};
use sluice_testkit::process::workspace_binary;
use sluice_testkit::{Envoy, EnvoyPorts, Latency, Prometheus, Upstream, http};
use tokio::time::Instant;

/// A flux meter feeding the average-latency blueprint, which drives a load
/// scheduler: what the forged logs aim at.
const PROTECTED: &str = r#"
name: svc
flux_meters:
  - name: latency
    selectors: [{control_point: ingress}]
    static_buckets: [10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000, 2000]
load_schedulers:
  - name: protect
    selectors: [{control_point: ingress}]
    rate_window: 3s
circuit:
  blueprint: load_scheduling.average_latency
  parameters:
    flux_meter: latency
    load_scheduler: protect
    signal_window: 5s
    baseline_window: 30s
    latency_tolerance_multiplier: 1.5
"#;

/// The first sample of `name` (any labels) in an exposition, if any.
fn first_sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn signal(text: &str, name: &str) -> Option<f64> {
    sluice_testkit::scrape(
        text,
        &format!(r#"controller_signal{{policy_name="svc",signal="{name}"}}"#),
    )
}

/// `sluice-controller` with `policy`, asking `prometheus`, ticking every
/// second.
async fn controller(policy: &Path, prometheus: &Prometheus) -> Server {
    let args: Vec<String> = [
        "--policy",
        &policy.display().to_string(),
        "--prometheus-url",
        &format!("http://{}", prometheus.addr),
        "--tick",
        "1s",
        "--decision-validity",
        "3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let program = workspace_binary("sluice-controller").expect("sluice-controller");
    Server::start("sluice-controller", &program, &args).await
}

/// One forged record a second attacker would send: a `sluice.flow` naming
/// the real flux meter, unsigned or signed with a key of its own, and a
/// two-second response.
fn forged_record(
    n: u64,
    own_key: &FlowKey,
) -> Vec<opentelemetry_proto::tonic::common::v1::KeyValue> {
    let unsigned = format!("v=1;id={:016x};d=accepted;fm=svc/latency", n + 1);
    let flow = if n.is_multiple_of(2) {
        unsigned
    } else {
        own_key.sign(&unsigned)
    };
    vec![
        attribute("sluice.flow", flow),
        attribute("http.status_code", "200"),
        attribute("authz_duration", "1"),
        attribute("DURATION", "2002"),
        attribute("RESPONSE_DURATION", "2001"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_access_logs_leave_the_load_multiplier_alone() {
    let prometheus = Prometheus::start(&[], Duration::from_secs(60))
        .await
        .expect("prometheus");
    let policy = PolicyFile::new(PROTECTED);
    let control = controller(&policy.path, &prometheus).await;
    let sidecar = sluice(
        &policy.path,
        &[
            "--controller",
            &format!("http://{}", control.grpc),
            "--remote-write-url",
            &prometheus.remote_write_url(),
            "--remote-write-interval",
            "500ms",
        ],
    )
    .await;
    let upstream = Upstream::start_with(
        0,
        Latency {
            base: Duration::from_millis(20),
            per_inflight: Duration::ZERO,
        },
    )
    .await
    .expect("upstream");
    let envoy = envoy(&upstream, &sidecar).await;
    let front = envoy.listener();

    // Real traffic, 20 requests/s, all the while; every answer is tallied.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, refused) = (stop.clone(), ok.clone(), refused.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let (ok, refused) = (ok.clone(), refused.clone());
                tokio::spawn(async move {
                    match http::get(front, "/", &[]).await.map_or(0, |r| r.status) {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => refused.fetch_add(1, Ordering::Relaxed),
                    };
                });
            }
        })
    };

    // Warm: until the controller has a latency signal and a setpoint.
    let warm_until = Instant::now() + Duration::from_secs(90);
    loop {
        let text = control.metrics().await;
        let ticks = sluice_testkit::scrape(&text, "controller_ticks_total").unwrap_or(0.0);
        if ticks >= 5.0 && signal(&text, "latency").is_some_and(f64::is_finite) {
            break;
        }
        assert!(Instant::now() < warm_until, "no signals:\n{text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ticks_at_attack =
        sluice_testkit::scrape(&control.metrics().await, "controller_ticks_total").unwrap_or(0.0);
    let ok_before = ok.load(Ordering::Relaxed);

    // The attack: 200 forged records a second, plus one record of absurd
    // durations, for ten controller ticks.
    let mut logs = LogsServiceClient::connect(format!("http://{}", sidecar.grpc))
        .await
        .expect("connect");
    let own_key = FlowKey::random();
    let absurd = vec![
        attribute("sluice.flow", "v=1;id=1;d=accepted;fm=svc/latency"),
        attribute("RESPONSE_DURATION", "1e308"),
        attribute("authz_duration", "-1e308"),
    ];
    logs.export(access_log::export([absurd]))
        .await
        .expect("export");
    let mut lowest = f64::INFINITY;
    let mut trace = Vec::new();
    let mut n = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let batch = access_log::export((0..20).map(|_| {
            n += 1;
            forged_record(n, &own_key)
        }));
        logs.export(batch).await.expect("export");
        if n % 100 == 0 {
            let lm = first_sample(&sidecar.metrics().await, "token_bucket_lm_ratio").unwrap_or(1.0);
            let text = control.metrics().await;
            let (latency, setpoint) = (signal(&text, "latency"), signal(&text, "setpoint"));
            let ticks = sluice_testkit::scrape(&text, "controller_ticks_total").unwrap_or(0.0);
            trace.push(format!(
                "records {n} tick {ticks} lm {lm:.2} latency {latency:?} setpoint {setpoint:?}"
            ));
            lowest = lowest.min(lm);
            assert!(
                latency.is_none_or(f64::is_finite),
                "the latency signal broke:\n{}",
                trace.join("\n")
            );
            if ticks >= ticks_at_attack + 10.0 {
                break;
            }
        }
        assert!(
            n < 100_000,
            "the controller stopped ticking:\n{}",
            trace.join("\n")
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.await;

    // Unchecked, the same attack cut the multiplier to 0.05 within four
    // seconds; a busy machine may slow the real upstream a little, which
    // the controller is right to answer, so the bound leaves room for that.
    assert!(
        lowest > 0.8,
        "forged logs moved the multiplier:\n{}",
        trace.join("\n")
    );
    let (ok, refused) = (
        ok.load(Ordering::Relaxed) - ok_before,
        refused.load(Ordering::Relaxed),
    );
    assert!(
        ok > 0 && refused * 20 <= ok,
        "real traffic: {ok} served, {refused} refused\n{}",
        trace.join("\n")
    );
    let text = sidecar.metrics().await;
    assert!(
        metric(&text, r#"flowcontrol_access_logs_total{result="unsigned"}"#) >= n as f64,
        "{text}"
    );
    assert!(
        metric(&text, r#"flowcontrol_access_logs_total{result="matched"}"#) > 0.0,
        "Envoy's own logs still count:\n{text}"
    );
}

/// `sluice-controller` on `policy`, ticking every 200 ms, with `extra`
/// flags; its circuit asks Prometheus nothing.
async fn driving_controller(policy: &Path, extra: &[String]) -> Server {
    let mut args = ticking_controller_args(policy);
    args.extend_from_slice(extra);
    let program = workspace_binary("sluice-controller").expect("sluice-controller");
    Server::start("sluice-controller", &program, &args).await
}

fn flags(pairs: &[(&str, &Path)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
}

/// What a sidecar made of its controller: (subscribed now, decisions
/// applied so far).
async fn belief(sidecar: &Server) -> (f64, f64) {
    let text = sidecar.metrics().await;
    (
        sluice_testkit::scrape(&text, "controller_connected").unwrap_or(0.0),
        sluice_testkit::scrape(&text, r#"controller_decisions_total{result="applied"}"#)
            .unwrap_or(0.0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_real_controller_over_tls_with_the_token_is_believed() {
    let pki = Pki::new("sluice").expect("pki");
    let server = pki.issue("controller").expect("cert");
    let client = pki.issue("sidecar").expect("cert");
    let mallory = Pki::new("mallory").expect("pki");
    let impostor = mallory.issue("controller").expect("cert");
    let token = pki.dir().join("token");
    std::fs::write(&token, "a shared secret\n").expect("token");
    let policy = PolicyFile::new(DRIVEN);

    let real = driving_controller(
        &policy.path,
        &flags(&[
            ("--tls-cert", &server.cert),
            ("--tls-key", &server.key),
            ("--tls-client-ca", &pki.ca_file),
            ("--token-file", &token),
        ]),
    )
    .await;
    // A fake at another address: a certificate of its own CA, no token
    // asked; and a plain-text one.
    let fake = driving_controller(
        &policy.path,
        &flags(&[("--tls-cert", &impostor.cert), ("--tls-key", &impostor.key)]),
    )
    .await;
    let plain = driving_controller(&policy.path, &[]).await;

    let https = |c: &Server| format!("https://{}", c.grpc);
    let real_url = https(&real);
    let trusted: Vec<String> = flags(&[
        ("--controller-ca-file", &pki.ca_file),
        ("--controller-cert", &client.cert),
        ("--controller-key", &client.key),
        ("--controller-token-file", &token),
    ]);
    let sidecar = async |url: &str, extra: &[String]| {
        let mut args = vec!["--controller".to_owned(), url.to_owned()];
        args.extend_from_slice(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sluice(&policy.path, &args).await
    };
    let believer = sidecar(&real_url, &trusted).await;
    let without_token = sidecar(&real_url, &trusted[..6]).await;
    let without_cert = sidecar(
        &real_url,
        &flags(&[
            ("--controller-ca-file", &pki.ca_file),
            ("--controller-token-file", &token),
        ]),
    )
    .await;
    let in_plain_text = sidecar(&format!("http://{}", real.grpc), &trusted).await;
    let to_the_fake = sidecar(&https(&fake), &trusted).await;
    let https_to_plain = sidecar(&https(&plain), &trusted).await;

    assert!(
        eventually(Duration::from_secs(20), || async {
            belief(&believer).await.1 > 0.0
        })
        .await,
        "the real controller's decisions never arrived:\n{}",
        believer.process.log_tail()
    );
    // Time for the others to have tried more than once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(belief(&believer).await.0, 1.0);
    for (name, s) in [
        ("without a token", &without_token),
        ("without a client certificate", &without_cert),
        ("in plain text", &in_plain_text),
        ("to the fake", &to_the_fake),
        ("https to a plain-text controller", &https_to_plain),
    ] {
        assert_eq!(
            belief(s).await,
            (0.0, 0.0),
            "{name}:\n{}",
            s.process.log_tail()
        );
    }
    assert!(
        metric(
            &real.metrics().await,
            "controller_subscriptions_refused_total"
        ) >= 1.0,
        "{}",
        real.metrics().await
    );
    let log = without_token.log();
    assert!(log.contains("the controller refused this sidecar"), "{log}");
    // Loud: the error says what went wrong, once.
    let log = https_to_plain.log();
    assert!(log.contains("cannot reach the controller"), "{log}");
    assert_eq!(
        log.matches("cannot reach the controller").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("subscribed to the controller"), "{log}");
}

/// A controller of the test's own making that sends a decision set every
/// 100 ms to whoever subscribes, until it is `gone`.
mod hostile {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use sluice_proto::control as wire;
    use tokio_stream::{Stream, StreamExt as _};

    pub struct Controller {
        pub set: wire::DecisionSet,
        pub gone: Arc<AtomicBool>,
    }

    type Decisions = Pin<Box<dyn Stream<Item = Result<wire::DecisionSet, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl wire::control_server::Control for Controller {
        type SubscribeStream = Decisions;

        async fn subscribe(
            &self,
            _: tonic::Request<wire::SubscribeRequest>,
        ) -> Result<tonic::Response<Decisions>, tonic::Status> {
            if self.gone.load(Ordering::Relaxed) {
                return Err(tonic::Status::unavailable("gone"));
            }
            let (set, gone) = (self.set.clone(), self.gone.clone());
            let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
                std::time::Duration::from_millis(100),
            ));
            let sets = ticks
                .take_while(move |_| !gone.load(Ordering::Relaxed))
                .map(move |_| Ok(set.clone()));
            Ok(tonic::Response::new(Box::pin(sets)))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_decisions_are_refused_and_none_outlives_the_sidecars_bound() {
    use sluice_proto::control::{self as wire, decision::Action};
    let text = r#"
name: guarded
samplers:
  - name: door
    selectors: [{control_point: ingress}]
    accept_percentage: 100
rate_limiters:
  - name: bucket
    selectors: [{control_point: ingress}]
    bucket_capacity: 1000
    fill_amount: 1000
    interval: 1s
load_schedulers:
  - name: protect
    selectors: [{control_point: ingress}]
"#;
    let policy = PolicyFile::new(text);
    let set = sluice_policy::load::parse_sources(&[(policy.path.clone(), text.to_owned())])
        .expect("policy");
    let hash = format!("{:016x}", set.policies[0].hash);
    let soon = sluice_time::unix_ms() + 3_600_000;
    let decision = |valid_until_unix_ms, action| wire::Decision {
        policy_name: "guarded".to_owned(),
        policy_hash: hash.clone(),
        valid_until_unix_ms,
        action: Some(action),
    };
    let multiplier = |multiplier| {
        Action::LoadMultiplier(wire::LoadMultiplier {
            load_scheduler: "protect".to_owned(),
            multiplier,
        })
    };
    let share = |percentage| {
        Action::AcceptPercentage(wire::AcceptPercentage {
            sampler: "door".to_owned(),
            percentage,
        })
    };
    let decisions = vec![
        decision(soon, multiplier(f64::NAN)),
        decision(soon, multiplier(-1.0)),
        decision(soon, share(250.0)),
        // In range, but asking to hold until the end of time.
        decision(i64::MAX, share(0.0)),
        decision(
            soon,
            Action::RateLimit(wire::RateLimit {
                rate_limiter: "bucket".to_owned(),
                bucket_capacity: Some(-5.0),
                fill_amount: Some(f64::INFINITY),
            }),
        ),
    ];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gone = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(wire::control_server::ControlServer::new(
                hostile::Controller {
                    set: wire::DecisionSet {
                        decisions,
                        sent_unix_ms: 0,
                    },
                    gone: gone.clone(),
                },
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let sidecar = sluice(
        &policy.path,
        &[
            "--controller",
            &format!("http://{addr}"),
            "--controller-max-validity",
            "2s",
        ],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            sluice_testkit::scrape(
                &sidecar.metrics().await,
                r#"controller_decisions_total{result="invalid"}"#,
            )
            .is_some_and(|n| n >= 20.0)
        })
        .await,
        "{}",
        sidecar.metrics().await
    );
    // Only the in-range decision is in force: the door is shut, the
    // multiplier and the bucket are the policy's.
    assert_eq!(check_status(sidecar.grpc).await, Some(403));
    let log = sidecar.log();
    assert_eq!(
        log.matches("refused a controller decision").count(),
        1,
        "logged once, then counted:\n{log}"
    );
    // The fake goes: its "for ever" lapses at the sidecar's bound.
    gone.store(true, Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || async {
            check_status(sidecar.grpc).await == Some(200)
        })
        .await,
        "the fake's decision outlived the bound"
    );
    server.abort();
}

/// Sends `signal` (`-HUP`, `-TERM`) to `server`.
fn send(server: &Server, signal: &str) {
    let pid = server.process.id().expect("pid");
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_policy_and_stops_neither_binary() {
    let open = "name: gate\nsamplers:\n  - name: door\n    selectors: [{control_point: ingress}]\n    accept_percentage: 100\n";
    let policy = PolicyFile::new(open);
    // Polled once an hour: only SIGHUP can make the edit count in time.
    let sidecar = Server::start(
        "sluice",
        Path::new(env!("CARGO_BIN_EXE_sluice")),
        &[
            "--policy".to_owned(),
            policy.path.display().to_string(),
            "--policy-poll-interval".to_owned(),
            "1h".to_owned(),
        ],
    )
    .await;
    let controlling = PolicyFile::new(DRIVEN);
    let controller = driving_controller(&controlling.path, &[]).await;
    assert_eq!(check_status(sidecar.grpc).await, Some(200));
    policy.rewrite(&open.replace("100", "0"));
    send(&sidecar, "-HUP");
    send(&controller, "-HUP");
    assert!(
        eventually(Duration::from_secs(10), || async {
            check_status(sidecar.grpc).await == Some(403)
        })
        .await,
        "SIGHUP did not re-read the policy:\n{}",
        sidecar.log()
    );
    for server in [&sidecar, &controller] {
        let log = server.log();
        assert!(log.contains("SIGHUP: re-reading"), "{log}");
        let ok = http::get(server.admin, "/healthz", &[])
            .await
            .is_ok_and(|r| r.status == 200);
        assert!(ok, "alive after SIGHUP:\n{log}");
    }
}

/// The lines of `text` after its opening comment.
fn without_header(text: &str) -> String {
    text.lines()
        .skip_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The certificate a new client connection to `addr` is served.
async fn served_certificate(addr: std::net::SocketAddr, ca: &Path, client: &Issued) -> Vec<u8> {
    let config = sluice_runtime::tls::client_config(
        Some(ca),
        Some(&CertKey {
            cert: client.cert.clone(),
            key: client.key.clone(),
        }),
        &[b"h2"],
    )
    .expect("client config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("sluice").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_sluice_talk_mtls_and_a_rotated_certificate_takes_over() {
    // The shipped config is quickstart.yaml plus the transport socket.
    let root = sluice_testkit::repo_root();
    let shipped = std::fs::read_to_string(root.join("envoy-configs/quickstart-mtls.yaml"))
        .expect("shipped mTLS config");
    let plain =
        std::fs::read_to_string(root.join("envoy-configs/quickstart.yaml")).expect("quickstart");
    let socket_start = shipped
        .find("      transport_socket:")
        .expect("a transport socket");
    let socket_end = socket_start
        + shipped[socket_start..]
            .find("      typed_extension_protocol_options:")
            .expect("the sluice cluster's options after it");
    let mut stripped = shipped.clone();
    stripped.replace_range(socket_start..socket_end, "");
    assert_eq!(without_header(&stripped), without_header(&plain));

    let pki = Pki::new("mesh").expect("pki");
    let sluice_id = pki.issue("sluice").expect("cert");
    let envoy_id = pki.issue("envoy").expect("cert");
    let policy = PolicyFile::new(
        "name: edge\nrate_limiters:\n  - name: per-user\n    selectors: [{control_point: ingress}]\n    bucket_capacity: 2\n    fill_amount: 0\n    interval: 1s\n    limit_by_label_key: http.request.header.user\nflux_meters:\n  - name: latency\n    selectors: [{control_point: ingress}]\n",
    );
    let sidecar = sluice(
        &policy.path,
        &flags(&[
            ("--grpc-tls-cert", &sluice_id.cert),
            ("--grpc-tls-key", &sluice_id.key),
            ("--grpc-tls-client-ca", &pki.ca_file),
        ])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    )
    .await;
    let upstream = Upstream::start(0).await.expect("upstream");
    let ports = EnvoyPorts::free(upstream.addr.port(), sidecar.grpc.port()).expect("ports");
    let config = shipped
        .replace(
            "/etc/sluice/tls/envoy.pem",
            &envoy_id.cert.display().to_string(),
        )
        .replace(
            "/etc/sluice/tls/envoy-key.pem",
            &envoy_id.key.display().to_string(),
        )
        .replace("/etc/sluice/tls/ca.pem", &pki.ca_file.display().to_string());
    let envoy = Envoy::start_with(&render(&config, &ports).expect("render"), ports)
        .await
        .expect("envoy");
    let front = envoy.listener();

    // Decisions cross the TLS hop: alice's third request is limited.
    let mut alice = Vec::new();
    for _ in 0..3 {
        alice.push(
            http::get(front, "/", &[("user", "alice")])
                .await
                .map_or(0, |r| r.status),
        );
    }
    assert_eq!(alice, [200, 200, 429], "{}", envoy.log_tail());

    // Traffic of fresh users all along, while the certificate rotates.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let user = format!("user-{n}");
                match http::get(front, "/", &[("user", &user)])
                    .await
                    .map_or(0, |r| r.status)
                {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Clients without a certificate, or in plain text, get nothing.
    let https: ::http::Uri = format!("https://{}", sidecar.grpc).parse().expect("url");
    let check = async |tls: ClientTls| {
        let channel = sluice_runtime::grpc::connect(&https, &tls).await?;
        AuthorizationClient::new(channel)
            .check(check_request("GET", "/", &[]))
            .await
            .map_err(anyhow::Error::from)
    };
    let trusting = ClientTls {
        ca_file: Some(pki.ca_file.clone()),
        identity: None,
    };
    assert!(
        check(trusting.clone()).await.is_err(),
        "no client certificate"
    );
    let plain_text = AuthorizationClient::connect(format!("http://{}", sidecar.grpc)).await;
    if let Ok(mut client) = plain_text {
        assert!(
            client.check(check_request("GET", "/", &[])).await.is_err(),
            "plain text"
        );
    }
    let with_cert = ClientTls {
        identity: Some(CertKey {
            cert: envoy_id.cert.clone(),
            key: envoy_id.key.clone(),
        }),
        ..trusting
    };
    assert!(
        check(with_cert).await.is_ok(),
        "a client with a certificate"
    );

    // Rotate Sluice's certificate in place: new connections get the new
    // one, Envoy's open connection and its traffic carry on.
    let before = served_certificate(sidecar.grpc, &pki.ca_file, &envoy_id).await;
    let ok_before = ok.load(Ordering::Relaxed);
    pki.issue("sluice").expect("rotated");
    let rotated = sluice_runtime::tls::read_certs(&sluice_id.cert).expect("new cert")[0].to_vec();
    assert_ne!(before, rotated);
    assert!(
        eventually(Duration::from_secs(10), || async {
            served_certificate(sidecar.grpc, &pki.ca_file, &envoy_id).await == rotated
        })
        .await,
        "the rotated certificate was never served"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.await;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > ok_before, "traffic went on through the rotation");
    assert_eq!(
        failed,
        0,
        "{ok} served, {failed} failed:\n{}",
        envoy.log_tail()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            sluice_testkit::scrape(
                &sidecar.metrics().await,
                r#"flowcontrol_access_logs_total{result="matched"}"#,
            )
            .is_some_and(|n| n >= ok as f64)
        })
        .await,
        "access logs over the TLS hop:\n{}",
        sidecar.metrics().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_reaches_sluice_over_a_unix_socket() {
    let root = sluice_testkit::repo_root();
    let shipped = std::fs::read_to_string(root.join("envoy-configs/quickstart-uds.yaml"))
        .expect("shipped UDS config");
    let plain =
        std::fs::read_to_string(root.join("envoy-configs/quickstart.yaml")).expect("quickstart");
    let pipe = "pipe: { path: /var/run/sluice/sluice.sock }";
    let tcp = "socket_address: { address: 127.0.0.1, port_value: 8080 }";
    assert_eq!(
        without_header(&shipped.replace(pipe, tcp)),
        without_header(&plain)
    );

    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("sluice.sock");
    // A socket file left by an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    let policy = PolicyFile::new(
        "name: edge\nrate_limiters:\n  - name: per-user\n    selectors: [{control_point: ingress}]\n    bucket_capacity: 2\n    fill_amount: 0\n    interval: 1s\n    limit_by_label_key: http.request.header.user\nflux_meters:\n  - name: latency\n    selectors: [{control_point: ingress}]\n",
    );
    let admin = sluice_testkit::free_port().expect("port");
    let args: Vec<String> = [
        "--grpc-listen",
        &format!("unix:{}", socket.display()),
        "--admin-listen",
        &format!("127.0.0.1:{admin}"),
        "--policy",
        &policy.path.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sidecar = sluice_testkit::process::Process::spawn(
        "sluice",
        Path::new(env!("CARGO_BIN_EXE_sluice")),
        tempfile::tempdir().expect("dir"),
        &args,
    )
    .expect("spawn");
    sidecar
        .wait_http_ok(
            ([127, 0, 0, 1], admin).into(),
            "/readyz",
            Duration::from_secs(30),
        )
        .await
        .expect("ready");

    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660, "owner and group connect, others not");
    }
    let upstream = Upstream::start(0).await.expect("upstream");
    let ports = EnvoyPorts::free_for(Some(upstream.addr.port()), None).expect("ports");
    let config = shipped.replace("/var/run/sluice/sluice.sock", &socket.display().to_string());
    let envoy = Envoy::start_with(&render(&config, &ports).expect("render"), ports)
        .await
        .expect("envoy");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            http::get(envoy.listener(), "/", &[("user", "alice")])
                .await
                .map_or(0, |r| r.status),
        );
    }
    assert_eq!(statuses, [200, 200, 429], "{}", envoy.log_tail());
    let admin_addr = ([127, 0, 0, 1], admin).into();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let text = http::get(admin_addr, "/metrics", &[])
                .await
                .map(|r| r.text())
                .unwrap_or_default();
            sluice_testkit::scrape(&text, r#"flowcontrol_access_logs_total{result="matched"}"#)
                .is_some_and(|n| n >= 3.0)
        })
        .await,
        "access logs over the socket:\n{}",
        sidecar.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_queued_checks_before_the_grace_period_ends() {
    let policy = PolicyFile::new(
        "name: queue\nconcurrency_schedulers:\n  - name: one\n    selectors: [{control_point: ingress}]\n    max_concurrency: 1\n    max_inflight_duration: 1h\n    scheduler:\n      default_workload_parameters: {queue_timeout: 30s}\n",
    );
    let sidecar = sluice(&policy.path, &[]).await;
    let url = format!("http://{}", sidecar.grpc);
    let mut holder = AuthorizationClient::connect(url.clone())
        .await
        .expect("connect");
    let first = holder
        .check(check_request("GET", "/", &[]))
        .await
        .expect("admitted")
        .into_inner();
    assert_eq!(http_status(&first), 200, "the first takes the only slot");
    // Two more wait in the queue: nothing will free the slot.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let url = url.clone();
        waiting.push(tokio::spawn(async move {
            let mut client = AuthorizationClient::connect(url).await.expect("connect");
            client.check(check_request("GET", "/", &[])).await
        }));
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            sluice_testkit::scrape(&sidecar.metrics().await, "workload_requests_total{component=\"one\",decision_type=\"accepted\",policy_name=\"queue\",workload_index=\"default\"}")
                .is_some()
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(waiting.iter().all(|w| !w.is_finished()), "both are queued");

    send(&sidecar, "-TERM");
    for w in waiting {
        let answer = tokio::time::timeout(Duration::from_secs(4), w)
            .await
            .expect("answered before the 5 s grace period ends")
            .expect("task");
        let status = answer.expect_err("not decided: the sidecar is stopping");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            sidecar
                .log()
                .contains("queued_checks_answered_unavailable=2")
        })
        .await,
        "{}",
        sidecar.log()
    );
}
