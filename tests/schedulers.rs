//! Prioritised admission under overload, through the real Envoy: a load
//! scheduler at multiplier 0.3 in front of subscribers (priority 200) and
//! guests (priority 20) sending equal load.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use parking_lot::Mutex;
use sluice_testkit::http;

const POLICY: &str = r#"
name: protect
classifiers:
  - selectors: [{control_point: ingress}]
    rules:
      user_type: {from: request.http.headers.user-type}
load_schedulers:
  - name: service
    selectors: [{control_point: ingress}]
    load_multiplier: 0.3
    rate_window: 2s
    scheduler:
      workloads:
        - name: subscribers
          label_matcher: {match_labels: {user_type: subscriber}}
          parameters: {priority: 200, queue_timeout: 300ms}
        - name: guests
          label_matcher: {match_labels: {user_type: guest}}
          parameters: {priority: 20, queue_timeout: 300ms}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_go_first_when_the_load_scheduler_throttles() {
    let policy = PolicyFile::new(POLICY);
    let (sidecar, _upstream, envoy) = stack(&policy, None).await;
    let front = envoy.listener();

    // (user type, status) → count, for the 240 rounds sent once the
    // scheduler knows the incoming rate (its fill rate is then 0.3 of it);
    // every rejection's headers checked on the way. A round every 25 ms
    // overloads the 30%: the shares compared are the scheduler's, whatever
    // pace this machine keeps.
    let tally: Arc<Mutex<BTreeMap<(&str, u16), u64>>> = Default::default();
    let fill_rate = r#"token_bucket_fill_rate{component="service",policy_name="protect"}"#;
    let mut counted_rounds = 0;
    let mut rounds = 0;
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    while counted_rounds < 240 {
        tick.tick().await;
        rounds += 1;
        let counted = counted_rounds > 0
            || (rounds % 20 == 0 && metric(&metrics_text(&sidecar).await, fill_rate) > 0.0);
        if counted {
            counted_rounds += 1;
        }
        assert!(
            rounds < 4000,
            "the scheduler never measured the incoming rate"
        );
        for user_type in ["subscriber", "guest"] {
            let tally = tally.clone();
            tasks.push(tokio::spawn(async move {
                let reply = http::request(
                    front,
                    "GET",
                    "/",
                    &[("user-type", user_type)],
                    b"",
                    Duration::from_secs(5),
                )
                .await
                .expect("an answer");
                if reply.status == 503 {
                    assert_eq!(
                        reply.header("x-sluice-rejected-by"),
                        Some("protect/service")
                    );
                    assert!(
                        reply.header("retry-after").is_some(),
                        "503 comes with retry-after"
                    );
                }
                if counted {
                    *tally.lock().entry((user_type, reply.status)).or_default() += 1;
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("request task");
    }
    let tally = tally.lock().clone();
    let share = |who: &str| {
        let ok = *tally.get(&(who, 200)).unwrap_or(&0) as f64;
        let rejected = *tally.get(&(who, 503)).unwrap_or(&0) as f64;
        ok / (ok + rejected)
    };
    let (subscribers, guests) = (share("subscriber"), share("guest"));
    println!("acceptance: subscribers {subscribers:.2}, guests {guests:.2}; {tally:?}");
    let statuses: Vec<u16> = tally.keys().map(|(_, s)| *s).collect();
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{tally:?}");
    assert!(
        subscribers > 2.0 * guests,
        "subscribers {subscribers:.2} vs guests {guests:.2}"
    );
    assert!(
        subscribers > 0.3,
        "subscribers get most of the 30%: {subscribers:.2}"
    );
    let total = (share("subscriber") + share("guest")) / 2.0;
    assert!(
        total < 0.6,
        "the service is throttled: {total:.2} accepted overall"
    );
    // No Check outlived Envoy's ext_authz timeout (0.5 s): Envoy would have
    // counted an error and answered 503 itself.
    assert_eq!(
        envoy
            .stat("http.ingress.ext_authz.error")
            .await
            .expect("stat"),
        0
    );

    let text = metrics_text(&sidecar).await;
    for needle in [
        r#"workload_requests_total{component="service",decision_type="accepted",policy_name="protect",workload_index="0"}"#,
        r#"accepted_tokens_total{component="service",policy_name="protect",workload_index="1"}"#,
        r#"request_in_queue_duration_ms_bucket{component="service",policy_name="protect",workload_index="0""#,
        r#"token_bucket_lm_ratio{component="service",policy_name="protect"} 0.3"#,
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    sidecar.stop(Duration::from_secs(2)).await;
}
