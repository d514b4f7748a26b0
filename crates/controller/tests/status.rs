//! `GET /v1/status` and `sluice-controller status`, on the real binaries:
//! a controller whose circuit reads a real Prometheus, and a real `sluice`
//! sidecar that subscribes to it and remote-writes to that Prometheus.
//!
//! Needs the `sluice` binary built (`cargo build --bin sluice`; `make
//! test` builds every binary first).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::process::{Process, workspace_binary};
use sluice_testkit::{PolicyFile, Prometheus, free_port, http};

/// The circuit reads the sidecar's own `controller_connected`, as the
/// sidecar remote-writes it (1 once subscribed), and drives a sampler and
/// a rate limiter from it; `absent` asks for a series nobody writes, and
/// `slow` is asked once an hour.
const POLICY: &str = r#"
name: status-demo
samplers:
  - name: door
    selectors: [{control_point: ingress}]
    accept_percentage: 100
rate_limiters:
  - name: api
    selectors: [{control_point: ingress}]
    bucket_capacity: 100
    fill_amount: 10
    interval: 1s
circuit:
  components:
    - promql: {out: slow, query: 'vector(7)', evaluation_interval: 1h}
    - promql: {out: connected, query: 'sum(controller_connected{instance="i-1"})'}
    - promql: {out: absent, query: 'sum(no_series_is_called_this)'}
    - arithmetic: {out: share, op: mul, lhs: connected, rhs: 40}
    - actuator: {sampler: door, input: share}
    - actuator: {rate_limiter: api, bucket_capacity: 50, fill_amount: share}
"#;

fn loopback(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Starts `program` with `args` and waits for `/readyz` on `admin`.
async fn start(name: &'static str, program: &Path, args: &[String], admin: SocketAddr) -> Process {
    let dir = tempfile::tempdir().expect("dir");
    let mut process = Process::spawn(name, program, dir, args).expect("spawn");
    process
        .wait_http_ok(admin, "/readyz", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{name} not ready: {e:#}"));
    process
}

/// `sluice-controller status` with `args`.
fn status_command(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice-controller"))
        .arg("status")
        .args(args)
        .output()
        .expect("run sluice-controller status")
}

/// The signal `name` of `policy` in a status body.
fn signal<'a>(policy: &'a Value, name: &str) -> &'a Value {
    policy["signals"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no signal {name} in {policy:#}"))
}

/// The output to `component` in a status body's policy.
fn output<'a>(policy: &'a Value, component: &str) -> &'a Value {
    policy["outputs"]
        .as_array()
        .and_then(|s| s.iter().find(|o| o["component"] == component))
        .unwrap_or_else(|| panic!("no output to {component} in {policy:#}"))
}

/// `GET /v1/status` as JSON, once the loop is closed: the sidecar
/// subscribed, its gauge in Prometheus, the circuit's outputs computed
/// from it and sent.
async fn settled_status(admin: SocketAddr, logs: impl Fn() -> String) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut last = Value::Null;
    while tokio::time::Instant::now() < deadline {
        if let Ok(reply) = http::get(admin, "/v1/status", &[]).await {
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert_eq!(reply.header("content-type"), Some("application/json"));
            last = serde_json::from_slice(&reply.body).expect("status is JSON");
            let policy = &last["policies"][0];
            let sent = policy["outputs"]
                .as_array()
                .and_then(|o| o.iter().find(|o| o["component"] == "door"))
                .is_some_and(|o| o["value"] == 40.0);
            if sent && last["sidecars"].as_array().is_some_and(|s| s.len() == 1) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the loop did not close; last status:\n{last:#}\n{}", logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_signals_outputs_and_subscribed_sidecars() {
    let sluice = workspace_binary("sluice").expect("the sluice binary");
    let mut prometheus = Prometheus::start(&[], Duration::from_millis(500))
        .await
        .expect("prometheus");
    let policy = PolicyFile::new(POLICY);

    let (listen, admin) = (
        loopback(free_port().expect("port")),
        loopback(free_port().expect("port")),
    );
    let controller_args: Vec<String> = [
        "--policy",
        &policy.path.display().to_string(),
        "--prometheus-url",
        &format!("http://{}", prometheus.addr),
        "--listen",
        &listen.to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--tick",
        "500ms",
        "--decision-validity",
        "3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let controller = start(
        "sluice-controller",
        Path::new(env!("CARGO_BIN_EXE_sluice-controller")),
        &controller_args,
        admin,
    )
    .await;

    let (sidecar_grpc, sidecar_admin) = (
        loopback(free_port().expect("port")),
        loopback(free_port().expect("port")),
    );
    let sidecar_args: Vec<String> = [
        "--policy",
        &policy.path.display().to_string(),
        "--grpc-listen",
        &sidecar_grpc.to_string(),
        "--admin-listen",
        &sidecar_admin.to_string(),
        "--controller",
        &format!("http://{listen}"),
        "--agent-group",
        "edge",
        "--service",
        "checkout",
        "--instance",
        "i-1",
        "--remote-write-url",
        &prometheus.remote_write_url(),
        "--remote-write-interval",
        "500ms",
        "--remote-write-label",
        "instance=i-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sidecar = start("sluice", &sluice, &sidecar_args, sidecar_admin).await;

    let status = settled_status(admin, || {
        format!(
            "controller:\n{}\nsidecar:\n{}",
            controller.log_tail(),
            sidecar.log_tail()
        )
    })
    .await;
    let now = status["now_unix_ms"].as_i64().expect("now");

    // The controller: ticking, Prometheus answering.
    let tick = &status["last_tick"];
    assert_eq!(tick["prometheus_up"], true, "{status:#}");
    assert!(
        tick["age_seconds"].as_f64().expect("age") < 5.0,
        "{status:#}"
    );
    assert!(tick["count"].as_u64().expect("count") >= 1);
    assert_eq!(status["tick_seconds"], 0.5);

    // The circuit's signals, with values and ages.
    let p = &status["policies"][0];
    assert_eq!(p["policy_name"], "status-demo");
    assert_eq!(p["policy_hash"].as_str().map(str::len), Some(16));
    assert_eq!(p["queries"]["ok"], true, "{p:#}");
    assert_eq!(p["queries"]["error"], Value::Null);
    assert_eq!(p["outputs_held"], false);
    let connected = signal(p, "connected");
    assert_eq!(connected["value"], 1.0, "{p:#}");
    assert_eq!(signal(p, "share")["value"], 40.0);
    let absent = signal(p, "absent");
    assert_eq!(absent["value"], Value::Null, "no data is null: {p:#}");
    assert!(
        absent["age_seconds"].as_f64().is_some(),
        "an empty answer is still an answer: {p:#}"
    );
    let age = connected["age_seconds"].as_f64().expect("age");
    assert!((0.0..5.0).contains(&age), "{p:#}");
    // A query run once an hour is as old as its answer: the first tick's,
    // from before the sidecar had subscribed; the others were asked since.
    let slow = signal(p, "slow");
    assert_eq!(slow["value"], 7.0);
    assert!(
        slow["updated_unix_ms"].as_i64() < connected["updated_unix_ms"].as_i64(),
        "{p:#}"
    );
    assert!(slow["age_seconds"].as_f64() > connected["age_seconds"].as_f64());

    // What was sent, as sent.
    let door = output(p, "door");
    assert_eq!(door["component_kind"], "sampler");
    assert_eq!(door["kind"], "accept_percentage");
    let valid_until = door["valid_until_unix_ms"].as_i64().expect("valid_until");
    assert!(
        valid_until > now && valid_until <= now + 3_500,
        "valid for the decision validity: {door:#} at {now}"
    );
    let api = output(p, "api");
    assert_eq!(api["component_kind"], "rate_limiter");
    assert_eq!(api["kind"], "rate_limit");
    assert_eq!(api["bucket_capacity"], 50.0);
    assert_eq!(api["fill_amount"], 40.0);

    // The sidecar, as it introduced itself.
    let s = &status["sidecars"][0];
    assert_eq!(
        (&s["agent_group"], &s["service"], &s["instance"]),
        (&"edge".into(), &"checkout".into(), &"i-1".into()),
        "{s:#}"
    );
    assert!(s["since_unix_ms"].as_i64().expect("since") <= now);
    assert!(
        s["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    );

    // The command line: tables, the JSON as it came, one policy.
    let admin_url = format!("http://{admin}");
    let out = status_command(&["--admin", &admin_url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let has_row = |cells: &[&str]| {
        text.lines().any(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words.starts_with(cells)
        })
    };
    assert!(text.contains("Prometheus answered every query"), "{text}");
    assert!(text.contains("policy status-demo ("), "{text}");
    for row in [
        &["connected", "1"][..],
        &["share", "40"],
        &["absent", "-"],
        &["slow", "7"],
        &["sampler", "door", "accept_percentage", "40"],
        &[
            "rate_limiter",
            "api",
            "rate_limit",
            "bucket_capacity",
            "50,",
            "fill_amount",
            "40",
        ],
        &["edge", "checkout", "i-1"],
    ] {
        assert!(has_row(row), "no row {row:?} in\n{text}");
    }
    assert!(text.contains("sidecars subscribed: 1"), "{text}");

    let out = status_command(&["--admin", &admin_url, "--json", "--policy", "status-demo"]);
    assert!(out.status.success());
    let json: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(json["policies"].as_array().map(Vec::len), Some(1));
    assert_eq!(json["policies"][0]["policy_name"], "status-demo");
    assert_eq!(json["sidecars"][0]["instance"], "i-1");
    assert_eq!(output(&json["policies"][0], "door")["value"], 40.0);

    // Bad input: a method, a parameter, a policy it does not run.
    let post = http::request(
        admin,
        "POST",
        "/v1/status",
        &[],
        b"",
        Duration::from_secs(5),
    )
    .await
    .expect("POST");
    assert_eq!(post.status, 405);
    let bogus = http::get(admin, "/v1/status?polcy=status-demo", &[])
        .await
        .expect("GET");
    assert_eq!(bogus.status, 400);
    assert!(
        bogus.text().contains("unknown parameter \"polcy\""),
        "{}",
        bogus.text()
    );
    let unknown = http::get(admin, "/v1/status?policy=nope", &[])
        .await
        .expect("GET");
    assert_eq!(unknown.status, 400);
    assert!(unknown.text().contains("\"nope\""), "{}", unknown.text());

    // The command line when it cannot have the status: exit 1, saying why.
    let out = status_command(&["--admin", &admin_url, "--policy", "nope"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("answered 400 Bad Request"), "{err}");
    let out = status_command(&["--admin", &format!("http://{}", prometheus.addr)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("answered 404"), "not the controller: {err}");
    let nobody = loopback(free_port().expect("port"));
    let out = status_command(&["--admin", &format!("http://{nobody}"), "--timeout", "2s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "cannot ask the controller: GET http://{nobody}/v1/status"
        )),
        "{err}"
    );

    // A sidecar that goes is no longer listed.
    sidecar.kill().await;
    let gone = poll_status(admin, |s| {
        s["sidecars"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    assert!(
        gone.is_ok(),
        "the killed sidecar is still listed:\n{gone:#?}"
    );

    // Prometheus gone: the queries fail, the last outputs are held, and the
    // signals age, since no circuit runs.
    prometheus.kill().await;
    let held = poll_status(admin, |s| {
        s["last_tick"]["prometheus_up"] == false
            && signal(&s["policies"][0], "connected")["age_seconds"].as_f64() > Some(1.5)
    })
    .await
    .unwrap_or_else(|last| panic!("no failed queries shown:\n{last:#}"));
    let p = &held["policies"][0];
    assert_eq!(p["queries"]["ok"], false, "{p:#}");
    assert!(
        p["queries"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{p:#}"
    );
    assert_eq!(p["outputs_held"], true, "{p:#}");
    assert_eq!(
        output(p, "door")["value"],
        40.0,
        "held outputs are still sent"
    );
    let out = status_command(&["--admin", &admin_url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("Prometheus did not answer every query")
            && text.contains("queries failed: ")
            && text.contains("last outputs held"),
        "{text}"
    );
}

/// `GET /v1/status` until `done` holds of it (10 s at most): the status
/// then, or the last one seen.
async fn poll_status(admin: SocketAddr, done: impl Fn(&Value) -> bool) -> Result<Value, Value> {
    let mut last = Value::Null;
    for _ in 0..50 {
        let reply = http::get(admin, "/v1/status", &[]).await.expect("GET");
        last = serde_json::from_slice(&reply.body).expect("JSON");
        if done(&last) {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}
