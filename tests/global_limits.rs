//! Global limits (`scope: global`) as users run them: several `sluice`
//! processes started with `--redis-url`, sharing the real `redis-server`
//! (or a three-master Redis Cluster) on loopback; Checks over gRPC, and
//! requests through the real Envoy where access logs matter.
//!
//! Every bound on time here bounds a failing test (a Check stuck behind a
//! paused Redis would take its 2 s); none is a claim about speed.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use sluice_testkit::Upstream;
use sluice_testkit::redis::{Redis, RedisCluster};
use tokio::time::Instant;
use tonic::transport::Channel;

/// Per-user limiters: `per-user` (capacity 20, one token an hour) and
/// `hot` (a million, refilled 100,000 a second), picked by `x-kind`.
const SHARED: &str = r#"
name: shared
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user: {from: request.http.headers.user-id}
rate_limiters:
  - name: per-user
    selectors:
      - control_point: ingress
        label_matcher: {match_labels: {http.request.header.x_kind: slow}}
    bucket_capacity: 20
    fill_amount: 1
    interval: 3600s
    limit_by_label_key: user
    scope: global
  - name: hot
    selectors:
      - control_point: ingress
        label_matcher: {match_labels: {http.request.header.x_kind: hot}}
    bucket_capacity: 1000000
    fill_amount: 100000
    interval: 1s
    limit_by_label_key: user
    scope: global
    on_store_unavailable: reject
  - name: cold
    selectors:
      - control_point: ingress
        label_matcher: {match_labels: {http.request.header.x_kind: cold}}
    bucket_capacity: 1
    fill_amount: 1
    interval: 3600s
    limit_by_label_key: user
    scope: global
"#;

/// A `sluice` process with `policy`, its store at `urls`.
async fn sidecar(policy: &Path, urls: &[String], extra: &[&str]) -> Server {
    let mut args: Vec<&str> = Vec::new();
    for url in urls {
        args.extend(["--redis-url", url]);
    }
    args.extend_from_slice(extra);
    sluice(policy, &args).await
}

async fn grpc(server: &Server) -> AuthorizationClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", server.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("connect to sluice");
    AuthorizationClient::new(channel)
}

/// One Check of `user` against limiter `kind`; its HTTP status (0: no
/// answer at all). Envoy's deadline, 5 s, is sent along.
async fn check(client: &mut AuthorizationClient<Channel>, kind: &str, user: &str) -> u16 {
    let mut request = tonic::Request::new(check_request(
        "GET",
        "/",
        &[("user-id", user), ("x-kind", kind)],
    ));
    request.set_timeout(Duration::from_secs(5));
    match client.check(request).await {
        Ok(response) => http_status(&response.into_inner()),
        Err(_) => 0,
    }
}

/// Three sidecars on `urls` share `per-user`; 90 Checks of one user, in
/// rounds of three at once (one per sidecar). How many passed.
async fn ninety_checks_over_three_sidecars(urls: &[String], extra: &[&str]) -> usize {
    let policy = PolicyFile::new(SHARED);
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(sidecar(&policy.path, urls, extra).await);
    }
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(grpc(server).await);
    }
    let mut passed = 0;
    for _ in 0..30 {
        let round: Vec<_> = clients
            .iter()
            .cloned()
            .map(|mut c| tokio::spawn(async move { check(&mut c, "slow", "alice").await }))
            .collect();
        for r in round {
            match r.await.expect("task") {
                200 => passed += 1,
                429 => {}
                other => panic!("a Check answered {other}"),
            }
        }
    }
    passed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_never_admit_more_than_the_shared_bucket() {
    let redis = Redis::start(&[]).await.expect("redis");
    let passed = ninety_checks_over_three_sidecars(&[redis.url()], &[]).await;
    assert!(
        (18..=20).contains(&passed),
        "{passed} of 90 passed a shared bucket of 20"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_share_a_bucket_through_a_redis_cluster() {
    let cluster = RedisCluster::start().await.expect("cluster");
    let passed = ninety_checks_over_three_sidecars(&cluster.urls(), &["--redis-cluster"]).await;
    assert!(
        (18..=20).contains(&passed),
        "{passed} of 90 passed a shared bucket of 20 in the cluster"
    );
}

/// Scripts the sidecars ran so far (the only commands a Check sends).
async fn script_calls(redis: &Redis) -> u64 {
    let calls = redis.command_calls().await.expect("commandstats");
    ["evalsha", "eval", "evalsha_ro", "eval_ro"]
        .iter()
        .filter_map(|c| calls.get(*c))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_costs_redis_little_and_cold_keys_are_decided_on_their_first_check() {
    let redis = Redis::start(&[]).await.expect("redis");
    let policy = PolicyFile::new(SHARED);
    let (a, b) = (
        sidecar(&policy.path, &[redis.url()], &[]).await,
        sidecar(&policy.path, &[redis.url()], &[]).await,
    );
    let (client_a, mut client_b) = (grpc(&a).await, grpc(&b).await);

    // 10,000 Checks of one user, eight at a time.
    let before = script_calls(&redis).await;
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let mut c = client_a.clone();
            tokio::spawn(async move {
                let mut passed = 0;
                for _ in 0..1_250 {
                    if check(&mut c, "hot", "hot-user").await == 200 {
                        passed += 1;
                    }
                }
                passed
            })
        })
        .collect();
    let mut passed = 0;
    for w in workers {
        passed += w.await.expect("worker");
    }
    let scripts = script_calls(&redis).await - before;
    assert_eq!(passed, 10_000, "the bucket holds a million");
    assert!(
        scripts <= 500,
        "{scripts} Redis scripts for 10,000 Checks of one key"
    );

    // Each cold user's first Check passes (one token), on either sidecar;
    // the second, on the other sidecar, finds the shared bucket empty.
    let mut client_a = client_a;
    for n in 0..100 {
        let user = format!("cold-{n}");
        let (first, second) = if n % 2 == 0 {
            (&mut client_a, &mut client_b)
        } else {
            (&mut client_b, &mut client_a)
        };
        assert_eq!(check(first, "cold", &user).await, 200, "{user} first");
        assert_eq!(check(second, "cold", &user).await, 429, "{user} second");
    }
}

const SLOTS: &str = r#"
name: slots
concurrency_limiters:
  - name: two
    selectors: [{control_point: ingress}]
    max_concurrency: 2
    max_inflight_duration: 60s
    scope: global
"#;

/// How many flows the store counts in flight for `slots/two`.
async fn in_flight(redis: &Redis) -> u64 {
    let out = redis
        .cli(&["ZCARD", "sluice:{slots/two}:inflight"])
        .await
        .expect("zcard");
    out.trim().parse().expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_concurrency_limit_holds_across_two_envoys_and_logs_return_slots() {
    let redis = Redis::start(&[]).await.expect("redis");
    let policy = PolicyFile::new(SLOTS);
    let upstream = Upstream::start(0).await.expect("upstream");
    let (a, b) = (
        sidecar(&policy.path, &[redis.url()], &[]).await,
        sidecar(&policy.path, &[redis.url()], &[]).await,
    );
    let (envoy_a, envoy_b) = (envoy(&upstream, &a).await, envoy(&upstream, &b).await);
    let slow = |front: SocketAddr, n: usize| {
        tokio::spawn(async move { at_once(front, n, "/delay/1500", &[]).await })
    };
    let (from_a, from_b) = (slow(envoy_a.listener(), 3), slow(envoy_b.listener(), 2));
    let mut statuses = from_a.await.expect("a");
    statuses.extend(from_b.await.expect("b"));
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 429, 429, 429], "two in flight at once");

    // The access logs of the two that passed give their slots back.
    assert!(
        eventually(Duration::from_secs(10), || async {
            in_flight(&redis).await == 0
        })
        .await,
        "slots still held in Redis after the flows ended"
    );
    let again = at_once(envoy_b.listener(), 2, "/delay/10", &[]).await;
    assert_eq!(again, [200, 200], "the returned slots are free again");
}

const SHARED_QUOTA: &str = r#"
name: quota
quota_schedulers:
  - name: shared
    selectors: [{control_point: ingress}]
    bucket_capacity: 5
    fill_amount: 10
    interval: 1s
    scope: global
    scheduler:
      workloads:
        - label_matcher: {match_labels: {http.request.header.x_kind: vip}}
          parameters: {priority: 10, queue_timeout: 1s}
      default_workload_parameters: {priority: 1, queue_timeout: 1s}
      max_queued_requests: 1000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_share_a_global_quota_and_keep_their_priorities() {
    let redis = Redis::start(&[]).await.expect("redis");
    let policy = PolicyFile::new(SHARED_QUOTA);
    let sidecars = [
        sidecar(&policy.path, &[redis.url()], &[]).await,
        sidecar(&policy.path, &[redis.url()], &[]).await,
    ];
    // Each sidecar is offered 20 vip and 20 other Checks a second for
    // 10 s: four times the 10 a second the shared quota allows.
    let clients = [grpc(&sidecars[0]).await, grpc(&sidecars[1]).await];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for tick in 0..200u64 {
        let at = start + Duration::from_millis(tick * 50);
        for (i, client) in clients.iter().enumerate() {
            for kind in ["vip", "free"] {
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let mut client = client;
                    let status = check(&mut client, kind, "anyone").await;
                    (i, kind, status, start.elapsed())
                }));
            }
        }
    }
    let mut admitted = [[0u32; 2]; 2];
    let mut last = Duration::ZERO;
    for t in tasks {
        let (i, kind, status, at) = t.await.expect("task");
        match status {
            200 => {
                admitted[i][usize::from(kind == "free")] += 1;
                last = last.max(at);
            }
            503 => {}
            other => panic!("a Check answered {other}"),
        }
    }
    let total: u32 = admitted.iter().flatten().sum();
    // The bucket: 5 at once, then 10 a second until the last admission.
    // It never pays more; leases stranded (one token per sidecar at a
    // time, as 5 % of 5 rounds down to the one a flow needs) and the
    // offered load's ramp down at the end may leave it a little short.
    let most = 5.0 + 10.0 * last.as_secs_f64();
    assert!(
        f64::from(total) <= most + 1.0,
        "{total} admitted; the quota allows {most:.0}"
    );
    assert!(
        f64::from(total) >= 0.9 * most - 2.0,
        "{total} admitted; the quota allows {most:.0}"
    );
    for (i, [vip, free]) in admitted.iter().enumerate() {
        assert!(
            *vip > 3 * *free,
            "sidecar {i}: {vip} vip and {free} other admitted"
        );
    }
}

/// How long each of `n` Checks of the `hot` limiter took, and what they
/// answered.
async fn timed_checks(client: &AuthorizationClient<Channel>, n: usize) -> Vec<(u16, Duration)> {
    let mut out = Vec::with_capacity(n);
    let mut client = client.clone();
    for i in 0..n {
        let start = Instant::now();
        let status = check(&mut client, "hot", &format!("user-{}", i % 50)).await;
        out.push((status, start.elapsed()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

/// Every Check answered (200 or the fallback's 429), none near the 2 s a
/// Check waiting on Redis would take.
fn all_answered_quickly(results: &[(u16, Duration)], what: &str) {
    for (status, took) in results {
        assert!(
            [200, 429].contains(status),
            "{what}: a Check answered {status}"
        );
        assert!(
            *took < Duration::from_secs(1),
            "{what}: a Check took {took:?}"
        );
    }
}

/// `store_request_duration_seconds` observations of `op` slower than 50 ms
/// (twice the 25 ms deadline): none, when every call keeps its deadline.
fn over_deadline(text: &str, op: &str) -> f64 {
    let count = metric(
        text,
        &format!(r#"store_request_duration_seconds_count{{op="{op}"}}"#),
    );
    let within = metric(
        text,
        &format!(r#"store_request_duration_seconds_bucket{{op="{op}",le="0.05"}}"#),
    );
    count - within
}

fn fallbacks(text: &str) -> f64 {
    metric(
        text,
        r#"store_fallback_total{component="hot",policy_name="shared"}"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_paused_redis_costs_at_most_the_deadline_and_the_limits_come_back() {
    let mut redis = Redis::start(&[]).await.expect("redis");
    let policy = PolicyFile::new(SHARED);
    let server = sidecar(&policy.path, &[redis.url()], &[]).await;
    let client = grpc(&server).await;
    let status = async || check(&mut client.clone(), "hot", "probe").await;
    assert_eq!(status().await, 200);

    // Killed: every Check is answered, soon by the fallback (`reject`).
    redis.kill().await;
    let during = timed_checks(&client, 100).await;
    all_answered_quickly(&during, "Redis killed");
    let text = server.metrics().await;
    assert!(
        fallbacks(&text) > 0.0,
        "no Check was decided by the fallback"
    );
    assert_eq!(metric(&text, "store_up"), 0.0);
    assert!(
        during.iter().any(|(s, _)| *s == 429),
        "the fallback rejects"
    );

    // Restarted (empty): global again, without restarting the sidecar.
    redis.restart().await.expect("restart");
    assert!(
        eventually(Duration::from_secs(30), || async { status().await == 200 }).await,
        "the sidecar never used Redis again"
    );
    assert_eq!(metric(&server.metrics().await, "store_up"), 1.0);

    // Paused for 2 s: it accepts connections but answers nothing.
    let paused = redis.cli(&["CLIENT", "PAUSE", "2000", "ALL"]).await;
    assert_eq!(paused.expect("pause").trim(), "OK");
    let during = timed_checks(&client, 100).await;
    all_answered_quickly(&during, "Redis paused");
    let text = server.metrics().await;
    assert!(
        metric(
            &text,
            r#"store_errors_total{kind="timeout",op="take_tokens"}"#
        ) > 0.0,
        "no call timed out while Redis was paused"
    );
    assert_eq!(
        over_deadline(&text, "take_tokens"),
        0.0,
        "a call outlived its deadline"
    );
    assert!(
        eventually(Duration::from_secs(30), || async { status().await == 200 }).await,
        "the limits never came back after the pause"
    );

    // Scripts flushed: reloaded on NOSCRIPT, no Check falls back.
    let before = fallbacks(&server.metrics().await);
    redis.cli(&["SCRIPT", "FLUSH"]).await.expect("flush");
    let after_flush = timed_checks(&client, 20).await;
    assert!(after_flush.iter().all(|(s, _)| *s == 200));
    assert_eq!(fallbacks(&server.metrics().await), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_the_password_is_logged_and_falls_back() {
    let redis = Redis::start(&["--requirepass", "right"])
        .await
        .expect("redis");
    let policy = PolicyFile::new(SHARED);
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("redis-password");
    std::fs::write(&secret, "not-the-password-42\n").expect("secret");
    let server = sidecar(
        &policy.path,
        &[redis.url()],
        &["--redis-password-file", &secret.display().to_string()],
    )
    .await;
    let mut client = grpc(&server).await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(check(&mut client, "hot", "alice").await);
    }
    assert!(
        statuses.iter().all(|s| *s == 429),
        "the fallback (reject) decides: {statuses:?}"
    );
    assert!(fallbacks(&server.metrics().await) >= 20.0);
    let log = std::fs::read_to_string(server.process.log_path()).expect("log");
    assert!(
        log.contains("Password authentication failed"),
        "the log says why:\n{log}"
    );
    assert!(
        !log.contains("not-the-password-42"),
        "the password stays out of the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_policy_needs_redis_and_validate_accepts_it() {
    let policy = PolicyFile::new(SHARED);
    let program = env!("CARGO_BIN_EXE_sluice");
    let validate = std::process::Command::new(program)
        .args(["validate", &policy.path.display().to_string()])
        .output()
        .expect("validate runs");
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );

    // Started without --redis-url on it: refused, saying why.
    let refused = std::process::Command::new(program)
        .args([
            "--policy",
            &policy.path.display().to_string(),
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env_remove("SLUICE_REDIS_URL")
        .output()
        .expect("sluice runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success(), "started: {stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("--redis-url"),
        "the error says what is missing:\n{stdout}{stderr}"
    );

    // Reloaded into a sidecar without Redis: refused, the policy in force
    // stays.
    let open = "name: shared\nsamplers:\n  - name: door\n    selectors: [{control_point: ingress}]\n    accept_percentage: 100\n";
    let file = PolicyFile::new(open);
    let server = sluice(&file.path, &[]).await;
    let reloads = async |result: &str| {
        metric(
            &server.metrics().await,
            &format!(r#"policy_reloads_total{{result="{result}"}}"#),
        )
    };
    file.rewrite(SHARED);
    assert!(
        eventually(Duration::from_secs(20), || async {
            reloads("error").await >= 1.0
        })
        .await,
        "the global policy was never refused"
    );
    let mut client = grpc(&server).await;
    assert_eq!(check(&mut client, "slow", "alice").await, 200);
    let log = std::fs::read_to_string(server.process.log_path()).expect("log");
    assert!(log.contains("--redis-url"), "the log says why:\n{log}");
}
