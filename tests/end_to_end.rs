//! `sluice` and `sluice-controller` run as users run them (the binaries,
//! configured by flags, as their own processes) behind the real Envoy:
//! the schedulers that make requests wait, hot reload, the controller
//! driving a sidecar and its decisions lapsing when it goes, and access
//! logs sent over OTLP/HTTP.
//!
//! Every bound here bounds a failing test; none is a claim about speed.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use sluice_testkit::envoy::{EnvoyPorts, render_ports};
use sluice_testkit::process::workspace_binary;
use sluice_testkit::{Envoy, Upstream, free_port, http};

/// The quickstart config's text.
fn quickstart() -> String {
    std::fs::read_to_string(sluice_testkit::repo_root().join("envoy-configs/quickstart.yaml"))
        .expect("quickstart")
}

const SCHEDULERS: &str = r#"
name: queues
concurrency_schedulers:
  - name: one-at-a-time
    selectors:
      - control_point: ingress
        label_matcher: {match_labels: {http.request.header.x_test: concurrency}}
    max_concurrency: 1
    scheduler:
      default_workload_parameters: {queue_timeout: 10s}
quota_schedulers:
  - name: ten-per-second
    selectors:
      - control_point: ingress
        label_matcher: {match_labels: {http.request.header.x_test: quota}}
    bucket_capacity: 1
    fill_amount: 10
    interval: 1s
    scheduler:
      default_workload_parameters: {queue_timeout: 10s}
"#;

/// How many Checks scheduler `component` decided, and how many of them
/// without waiting: the count of its queue-time histogram, and its
/// `le="0"` bucket.
fn waited(text: &str, component: &str) -> (f64, f64) {
    let series = |suffix: &str| {
        format!(
            r#"request_in_queue_duration_ms{suffix}{{component="{component}",policy_name="queues",workload_index="default"{}}}"#,
            if suffix == "_bucket" {
                r#",le="0""#
            } else {
                ""
            }
        )
    };
    (
        metric(text, &series("_count")),
        metric(text, &series("_bucket")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedulers_make_requests_wait_through_envoy() {
    let policy = PolicyFile::new(SCHEDULERS);
    let upstream = Upstream::start(0).await.expect("upstream");
    let sidecar = sluice(&policy.path, &[]).await;
    // The quickstart gives a Check 0.5 s; here Envoy waits 10 s, so that
    // how long a queued Check waits (for the access log that returns a
    // slot, for a token) is the schedulers' business alone: this tests
    // what they decide, not how fast this machine is.
    let generous = quickstart().replacen("timeout: 0.5s", "timeout: 10s", 1);
    let ports = EnvoyPorts::free(upstream.addr.port(), sidecar.grpc.port()).expect("ports");
    let envoy = Envoy::start_with(
        &sluice_testkit::envoy::render(&generous, &ports).expect("render"),
        ports,
    )
    .await
    .expect("envoy");
    let front = envoy.listener();

    // Concurrency scheduler: three requests of 50 ms at once, one slot. The
    // two that queue are admitted as the access log of the one before
    // returns its slot: all three pass, never two at the upstream at once.
    let statuses = at_once(front, 3, "/delay/50", &[("x-test", "concurrency")]).await;
    assert_eq!(statuses, [200, 200, 200], "{}", sidecar.process.log_tail());
    assert_eq!(upstream.max_inflight.load(Ordering::Relaxed), 1);
    let text = sidecar.metrics().await;
    assert_eq!(
        waited(&text, "one-at-a-time"),
        (3.0, 1.0),
        "three decided, one without waiting"
    );

    // Quota scheduler: a bucket of one, refilled ten times a second; three
    // at once wait for their tokens instead of being refused.
    let statuses = at_once(front, 3, "/", &[("x-test", "quota")]).await;
    assert_eq!(statuses, [200, 200, 200]);
    let text = sidecar.metrics().await;
    assert_eq!(waited(&text, "ten-per-second"), (3.0, 1.0));
    assert_eq!(
        metric(
            &text,
            r#"flowcontrol_reject_reasons_total{component="ten-per-second",policy_name="queues",reason="queue_timeout"}"#
        ),
        0.0
    );
    assert_eq!(
        envoy
            .stat("http.ingress.ext_authz.error")
            .await
            .expect("stat"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_policy_takes_effect_and_a_broken_one_is_refused() {
    let open = "name: gate\nsamplers:\n  - name: door\n    selectors: [{control_point: ingress}]\n    accept_percentage: 100\n";
    let closed = open.replace("accept_percentage: 100", "accept_percentage: 0");
    let policy = PolicyFile::new(open);
    let upstream = Upstream::start(0).await.expect("upstream");
    let sidecar = sluice(&policy.path, &[]).await;
    let envoy = envoy(&upstream, &sidecar).await;
    let front = envoy.listener();
    let status = async || http::get(front, "/", &[]).await.map_or(0, |r| r.status);
    let reloads = async |result: &str| {
        metric(
            &sidecar.metrics().await,
            &format!(r#"policy_reloads_total{{result="{result}"}}"#),
        )
    };
    assert_eq!(status().await, 200);

    policy.rewrite(&closed);
    assert!(
        eventually(Duration::from_secs(20), || async { status().await == 403 }).await,
        "the closed door never took effect"
    );
    assert_eq!(reloads("ok").await, 2.0, "the first load and the reload");

    // Broken: refused, logged with its place, and the door stays closed.
    policy.rewrite("name: gate\nsamplers:\n  - name: door\n    accept_percentage: 250\n");
    assert!(
        eventually(Duration::from_secs(20), || async {
            reloads("error").await >= 1.0
        })
        .await,
        "the broken policy was never read"
    );
    assert_eq!(status().await, 403);
    let log = sidecar.log();
    assert!(
        log.contains("policy.yaml:"),
        "the error names its file:\n{log}"
    );

    policy.rewrite(open);
    assert!(
        eventually(Duration::from_secs(20), || async { status().await == 200 }).await,
        "the door never opened again"
    );
}

/// `sluice-controller` with `policy` on the given ports, ticking every
/// 200 ms, its decisions valid for 1 s.
async fn controller(policy: &Path, grpc: u16, admin: u16) -> Server {
    let args = ticking_controller_args(policy);
    let program = workspace_binary("sluice-controller").expect("sluice-controller");
    Server::start_on("sluice-controller", &program, &args, grpc, admin).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_drives_a_sidecar_and_its_decisions_lapse_when_it_goes() {
    let policy = PolicyFile::new(DRIVEN);
    let (grpc, admin) = (free_port().expect("port"), free_port().expect("port"));
    let mut control = controller(&policy.path, grpc, admin).await;
    let upstream = Upstream::start(0).await.expect("upstream");
    let url = format!("http://127.0.0.1:{grpc}");
    let sidecar = sluice(&policy.path, &["--controller", &url]).await;
    let envoy = envoy(&upstream, &sidecar).await;
    let front = envoy.listener();
    let status = async || http::get(front, "/", &[]).await.map_or(0, |r| r.status);
    let active = async || {
        metric(
            &sidecar.metrics().await,
            r#"controller_decision_active{component="door",policy_name="driven"}"#,
        )
    };

    // The controller closes the door the policy leaves open.
    assert!(
        eventually(Duration::from_secs(20), || async { status().await == 403 }).await,
        "the controller's decision never arrived:\n{}",
        control.process.log_tail()
    );
    assert_eq!(active().await, 1.0);
    assert!(
        metric(&control.metrics().await, "controller_subscribers") >= 1.0,
        "{}",
        control.metrics().await
    );

    // It dies: its last decision lapses at valid_until, the door opens.
    control.process.kill().await;
    assert!(
        eventually(Duration::from_secs(20), || async { status().await == 200 }).await,
        "the decision never lapsed"
    );
    assert_eq!(active().await, 0.0);
    assert_eq!(
        metric(&sidecar.metrics().await, "controller_connected"),
        0.0
    );

    // It comes back on the same address: the sidecar subscribes again.
    let _control = controller(&policy.path, grpc, admin).await;
    assert!(
        eventually(Duration::from_secs(30), || async { status().await == 403 }).await,
        "the sidecar never subscribed again"
    );
}

/// The quickstart config with its access log sent over OTLP/HTTP (Envoy's
/// `http_service`) to Sluice's admin listener, instead of over gRPC.
fn over_otlp_http(upstream: &Upstream, sidecar: &Server) -> (String, EnvoyPorts) {
    // The access log's `common_config:` block (its gRPC service and
    // batching) becomes the top-level fields of an HTTP log, which are the
    // ones Envoy reads for one (docs/envoy.md).
    let text = quickstart();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "common_config:")
        .expect("the quickstart's access log");
    let indent = &lines[start][..lines[start].len() - "common_config:".len()];
    let deeper = format!("{indent} ");
    let end = start
        + 1
        + lines[start + 1..]
            .iter()
            .take_while(|l| l.starts_with(&deeper))
            .count();
    let http_log = [
        "log_name: sluice",
        "http_service:",
        "  http_uri:",
        "    uri: http://127.0.0.1:8081/v1/logs",
        "    cluster: sluice_admin",
        "    timeout: 1s",
        "buffer_flush_interval: 0.01s",
        "buffer_size_bytes: 16384",
    ]
    .iter()
    .map(|line| format!("{indent}{line}\n"))
    .collect::<String>();
    let admin_cluster = r#"
    - name: sluice_admin
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: sluice_admin
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: { address: 127.0.0.1, port_value: 8081 }
"#;
    let config = lines[..start].join("\n")
        + "\n"
        + &http_log
        + &lines[end..].join("\n")
        + "\n"
        + admin_cluster;
    let ports = EnvoyPorts::free(upstream.addr.port(), sidecar.grpc.port()).expect("ports");
    let admin = sidecar.admin.port();
    // 8081 twice: the URI's host header and the cluster's endpoint.
    let config = config.replace(
        "127.0.0.1:8081/v1/logs",
        &format!("127.0.0.1:{admin}/v1/logs"),
    );
    let mut substitutions = ports.substitutions().to_vec();
    substitutions.push((8081, Some(admin)));
    (
        render_ports(&config, &substitutions).expect("render"),
        ports,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_over_otlp_http_return_slots() {
    let policy = PolicyFile::new(
        "name: one\nconcurrency_limiters:\n  - name: single\n    selectors: [{control_point: ingress}]\n    max_concurrency: 1\n    max_inflight_duration: 1h\n",
    );
    let upstream = Upstream::start(0).await.expect("upstream");
    let sidecar = sluice(&policy.path, &[]).await;
    let (config, ports) = over_otlp_http(&upstream, &sidecar);
    let envoy = Envoy::start_with(&config, ports).await.expect("envoy");
    let front = envoy.listener();
    let matched = async || {
        metric(
            &sidecar.metrics().await,
            r#"flowcontrol_access_logs_total{result="matched"}"#,
        )
    };
    // One slot, held for an hour unless the access log returns it: each of
    // these passes only once the log of the one before came back, over
    // HTTP (the config has no gRPC access log).
    for i in 1..=5 {
        assert!(
            eventually(Duration::from_secs(20), || async {
                http::get(front, "/", &[])
                    .await
                    .is_ok_and(|r| r.status == 200)
            })
            .await,
            "request {i} never got the slot: {}",
            sidecar.process.log_tail()
        );
        assert!(
            eventually(Duration::from_secs(20), || async {
                matched().await >= f64::from(i)
            })
            .await,
            "the access log of request {i} never arrived"
        );
    }
    let text = sidecar.metrics().await;
    assert_eq!(
        metric(&text, "flowcontrol_inflight_flows_expired_total"),
        0.0
    );
}
