//! The store against the real Redis: shared buckets and counts, the
//! scripts surviving `SCRIPT FLUSH`, a dead or refusing Redis answered
//! within the deadline, and the breaker.

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use sluice_engine::store::{StateId, Store, StoreError};
use sluice_engine::token_bucket::BucketParams;
use sluice_store::{RedisConfig, RedisStore};
use sluice_testkit::redis::{Redis, RedisCluster};
use sluice_time::Clock;

fn config(urls: Vec<String>) -> RedisConfig {
    RedisConfig {
        urls,
        cluster: false,
        password: None,
        ca_file: None,
        timeout: Duration::from_millis(200),
    }
}

fn store(config: &RedisConfig) -> Arc<RedisStore> {
    RedisStore::start(config, &Registry::new(), Clock::new()).expect("store")
}

const ID: StateId<'static> = StateId {
    policy: "p",
    component: "rl",
    label: Some("00112233445566778899aabbccddeeff"),
};

/// Twenty tokens, one more every 100 s: nothing refills during a test.
const SLOW: BucketParams = BucketParams {
    capacity: 20.0,
    fill_amount: 1.0,
    interval: 100_000_000_000,
    continuous: true,
};

#[tokio::test]
async fn two_stores_share_one_bucket_and_never_overdraw_it() {
    let redis = Redis::start(&[]).await.expect("redis");
    let (a, b) = (
        store(&config(vec![redis.url()])),
        store(&config(vec![redis.url()])),
    );
    let mut granted = 0.0;
    for s in [&a, &b, &a, &b] {
        let grant = s.take_tokens(ID, SLOW, 6.0, 1.0).await.expect("answer");
        granted += grant.granted;
    }
    // 6 + 6 + 6 + the 2 left, and what refilled meanwhile (a millionth).
    assert!((20.0..20.01).contains(&granted), "{granted}");
    let empty = a.take_tokens(ID, SLOW, 1.0, 1.0).await.expect("answer");
    assert_eq!(empty.granted, 0.0);
    let wait = empty.retry_after.expect("a wait");
    assert!(
        wait > Duration::from_secs(90) && wait <= Duration::from_secs(100),
        "{wait:?}"
    );
    // More than the bucket can ever hold: never.
    let never = a.take_tokens(ID, SLOW, 21.0, 21.0).await.expect("answer");
    assert_eq!((never.granted, never.retry_after), (0.0, None));
    // Another policy's bucket of the same name is another bucket.
    let other = StateId { policy: "q", ..ID };
    assert_eq!(
        a.take_tokens(other, SLOW, 5.0, 1.0)
            .await
            .expect("answer")
            .granted,
        5.0
    );
}

#[tokio::test]
async fn slots_are_counted_across_stores_and_come_back() {
    let redis = Redis::start(&[]).await.expect("redis");
    let (a, b) = (
        store(&config(vec![redis.url()])),
        store(&config(vec![redis.url()])),
    );
    let ttl = Duration::from_secs(60);
    assert!(a.take_slot(ID, 2, 1, ttl).await.expect("answer"));
    assert!(b.take_slot(ID, 2, 2, ttl).await.expect("answer"));
    assert!(
        !a.take_slot(ID, 2, 3, ttl).await.expect("answer"),
        "two held"
    );
    b.give_back_slot(ID, 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !a.take_slot(ID, 2, 3, ttl).await.expect("answer") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A slot whose holder never gives it back lapses at its ttl.
    let short = StateId {
        component: "short",
        ..ID
    };
    assert!(
        a.take_slot(short, 1, 9, Duration::from_millis(300))
            .await
            .expect("answer")
    );
    assert!(
        !a.take_slot(short, 1, 10, Duration::from_millis(300))
            .await
            .expect("answer")
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !a.take_slot(short, 1, 10, ttl).await.expect("answer") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_scripts_come_back_after_script_flush() {
    let redis = Redis::start(&[]).await.expect("redis");
    let s = store(&config(vec![redis.url()]));
    assert_eq!(
        s.take_tokens(ID, SLOW, 1.0, 1.0)
            .await
            .expect("answer")
            .granted,
        1.0
    );
    redis.cli(&["SCRIPT", "FLUSH"]).await.expect("flush");
    assert_eq!(
        s.take_tokens(ID, SLOW, 1.0, 1.0)
            .await
            .expect("answer")
            .granted,
        1.0
    );
    assert!(
        s.take_slot(ID, 1, 1, Duration::from_secs(5))
            .await
            .expect("answer")
    );
}

#[tokio::test]
async fn a_dead_redis_is_an_error_within_the_deadline_and_opens_the_breaker() {
    let mut redis = Redis::start(&[]).await.expect("redis");
    let s = store(&config(vec![redis.url()]));
    assert!(s.take_tokens(ID, SLOW, 1.0, 1.0).await.is_ok());
    redis.kill().await;
    for _ in 0..5 {
        let started = tokio::time::Instant::now();
        let answer = s.take_tokens(ID, SLOW, 1.0, 1.0).await;
        assert!(answer.is_err(), "{answer:?}");
        // The deadline (200 ms) bounds it; the margin is for a loaded
        // machine, and only bounds a failing test.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(!s.available(), "five failures open the breaker");
    assert_eq!(
        s.take_tokens(ID, SLOW, 1.0, 1.0).await,
        Err(StoreError::Unavailable),
        "an open breaker is not called at all"
    );
    redis.restart().await.expect("redis back");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if s.available() && s.take_tokens(ID, SLOW, 1.0, 1.0).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_redis_that_refuses_the_password_is_an_error_and_the_right_one_works() {
    let redis = Redis::start(&["--requirepass", "s3cret"])
        .await
        .expect("redis");
    let wrong = store(&config(vec![redis.url()]));
    assert!(matches!(
        wrong.take_tokens(ID, SLOW, 1.0, 1.0).await,
        Err(StoreError::Failed(_) | StoreError::Timeout)
    ));
    let right = store(&RedisConfig {
        password: Some("s3cret".to_owned()),
        ..config(vec![redis.url()])
    });
    assert_eq!(
        right
            .take_tokens(ID, SLOW, 2.0, 1.0)
            .await
            .expect("answer")
            .granted,
        2.0
    );
}

#[tokio::test]
async fn a_cluster_keeps_each_bucket_in_one_slot() {
    let cluster = RedisCluster::start().await.expect("cluster");
    let s = store(&RedisConfig {
        cluster: true,
        ..config(cluster.urls())
    });
    // The client connects in the background.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut total = 0.0;
    for user in 0..30 {
        let label = format!("{user:032x}");
        let id = StateId {
            label: Some(&label),
            ..ID
        };
        loop {
            match s.take_tokens(id, SLOW, 5.0, 1.0).await {
                Ok(grant) => {
                    total += grant.granted;
                    break;
                }
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "{e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    assert_eq!(total, 150.0, "thirty buckets, each its own");
    // Keys spread over the masters.
    let mut holding = 0;
    for node in &cluster.nodes {
        let keys = node.cli(&["DBSIZE"]).await.expect("dbsize");
        if keys.trim().parse::<u64>().unwrap_or(0) > 0 {
            holding += 1;
        }
    }
    assert!(holding >= 2, "the buckets sit on {holding} master(s)");
}

#[tokio::test]
async fn rediss_with_a_private_ca_and_never_without_it() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    let dir = tempfile::tempdir().expect("dir");
    let (ca, key) = (dir.path().join("ca.pem"), dir.path().join("key.pem"));
    std::fs::write(&ca, cert.cert.pem()).expect("cert");
    std::fs::write(&key, cert.signing_key.serialize_pem()).expect("key");
    let redis = Redis::start_tls(&ca, &key).await.expect("redis with TLS");
    assert!(redis.url().starts_with("rediss://127.0.0.1:"));

    let mut trusting = config(vec![redis.url()]);
    trusting.ca_file = Some(ca);
    let grant = store(&trusting)
        .take_tokens(ID, SLOW, 1.0, 1.0)
        .await
        .expect("answers over TLS");
    assert_eq!(grant.granted, 1.0);

    // The system's roots do not know this CA: no answer, no panic.
    let answer = store(&config(vec![redis.url()]))
        .take_tokens(ID, SLOW, 1.0, 1.0)
        .await;
    assert!(answer.is_err(), "{answer:?}");
}
