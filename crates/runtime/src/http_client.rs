//! The HTTP client Sluice uses for Prometheus (remote-write, PromQL) and
//! for the command-line tools that ask an admin listener one question
//! ([`get_once`]): hyper with rustls (ring), HTTP/1.1, `http://` and
//! `https://`, trusting the system's CA certificates plus, optionally, a
//! PEM file of others.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The client type.
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client connecting within `connect_timeout`, trusting the system's CAs
/// and those in `ca_file`.
pub fn build(ca_file: Option<&Path>, connect_timeout: Duration) -> anyhow::Result<HttpsClient> {
    let tls = crate::tls::client_config(ca_file, None, &[])?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp_connector(connect_timeout));
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// TCP under TLS: any scheme (TLS decides), Nagle off, a connect timeout.
pub fn tcp_connector(connect_timeout: Duration) -> HttpConnector {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    tcp
}

/// `GET url` once, with a fresh client: the status and up to `max_body`
/// bytes of the body (a longer body is an error), all within `timeout`.
/// For the command-line tools (`sluice health`, `sluice preview`,
/// `sluice status`, `sluice-controller status`) that ask an admin
/// listener one question.
pub async fn get_once(
    url: &http::Uri,
    timeout: Duration,
    max_body: usize,
) -> anyhow::Result<(http::StatusCode, Bytes)> {
    use http_body_util::{BodyExt as _, Limited};
    let client = build(None, timeout)?;
    let request = http::Request::get(url.clone()).body(Full::new(Bytes::new()))?;
    let exchange = async {
        let response = client.request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the answer (at most {max_body} bytes): {e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {}", humantime::format_duration(timeout)))?
}
