//! PromQL instant queries, for the circuits' `promql` components.

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use sluice_runtime::http_client::HttpsClient;

/// A Prometheus to query.
#[derive(Clone)]
pub struct Prometheus {
    client: HttpsClient,
    base: String,
    timeout: Duration,
}

/// Percent-encodes a URL query value.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Prometheus {
    /// Prometheus at `base` (e.g. `http://prometheus:9090`).
    pub fn new(client: HttpsClient, base: &str, timeout: Duration) -> Self {
        Prometheus {
            client,
            base: base.trim_end_matches('/').to_owned(),
            timeout,
        }
    }

    /// Runs an instant query. `Ok(None)`: no data (an empty result, or a
    /// NaN); a vector of several series is summed. `Err`: Prometheus could
    /// not be asked or refused the query.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Option<f64>> {
        let uri: http::Uri =
            format!("{}/api/v1/query?query={}", self.base, escape(promql)).parse()?;
        let req = http::Request::get(uri).body(Full::new(Bytes::new()))?;
        let response = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .context("Prometheus did not answer in time")??;
        let status = response.status();
        let body = tokio::time::timeout(self.timeout, response.into_body().collect())
            .await
            .context("Prometheus did not finish its answer in time")??
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body)
            .with_context(|| format!("Prometheus answered {status} with no JSON"))?;
        if json["status"] != "success" {
            bail!(
                "query failed ({status}): {}",
                json["error"].as_str().unwrap_or("unknown error")
            );
        }
        parse(&json["data"])
    }
}

/// The value of a query's `data`.
fn parse(data: &serde_json::Value) -> anyhow::Result<Option<f64>> {
    let number = |v: &serde_json::Value| -> Option<f64> {
        v.get(1)?
            .as_str()?
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
    };
    match data["resultType"].as_str() {
        Some("scalar") => Ok(number(&data["result"])),
        Some("vector") => {
            let values: Vec<f64> = data["result"]
                .as_array()
                .map(|series| series.iter().filter_map(|s| number(&s["value"])).collect())
                .unwrap_or_default();
            Ok((!values.is_empty()).then(|| values.iter().sum()))
        }
        other => bail!("unsupported result type {other:?} (use an instant vector or scalar)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_become_one_number_or_none() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("json");
        assert_eq!(
            parse(&v(r#"{"resultType":"scalar","result":[1,"2.5"]}"#)).ok(),
            Some(Some(2.5))
        );
        assert_eq!(
            parse(&v(r#"{"resultType":"vector","result":[{"metric":{},"value":[1,"2"]},{"metric":{},"value":[1,"3"]}]}"#)).ok(),
            Some(Some(5.0))
        );
        assert_eq!(
            parse(&v(r#"{"resultType":"vector","result":[]}"#)).ok(),
            Some(None)
        );
        assert_eq!(
            parse(&v(
                r#"{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}"#
            ))
            .ok(),
            Some(None)
        );
        assert!(parse(&v(r#"{"resultType":"matrix","result":[]}"#)).is_err());
        assert_eq!(escape("a{b=\"c\"}[30s]"), "a%7Bb%3D%22c%22%7D%5B30s%5D");
    }
}
