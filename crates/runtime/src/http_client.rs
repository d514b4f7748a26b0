//! The HTTP client Sluice uses for Prometheus (remote-write, PromQL) and
//! `sluice health`: hyper with rustls (ring), HTTP/1.1, `http://` and `https://`, trusting
//! the system's CA certificates plus, optionally, a PEM file of others.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
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
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .with_context(|| format!("read CA file {}", path.display()))?;
        for cert in certs {
            let cert = cert.with_context(|| format!("parse CA file {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("use CA file {}", path.display()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}
