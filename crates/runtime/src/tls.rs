//! TLS for both binaries, on rustls with ring: the server side of every
//! listener (gRPC and admin, with client certificates required when a
//! client CA is given) and the client side of the sidecar's link to the
//! controller and of the HTTP client.
//!
//! Certificates are re-read when their files change, because cert-manager
//! and Istio rotate them in place: [`ServerTls::config`] looks at the files'
//! metadata at most once a second, on the next handshake, and a change
//! builds a new `ServerConfig` for connections from then on. Connections
//! already open keep theirs. A rotated file that does not load (half
//! written, a key that does not match) is logged and the last good
//! configuration stays.

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use parking_lot::Mutex;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::time::Instant;
pub use tokio_rustls::server::TlsStream;

/// Longest a client may take to finish its TLS handshake: one that dribbles
/// it out holds a task and a descriptor, so it is cut off.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// ALPN of a gRPC listener.
pub const GRPC_ALPN: &[&[u8]] = &[b"h2"];
/// ALPN of an admin (HTTP/1.1) listener.
pub const ADMIN_ALPN: &[&[u8]] = &[b"http/1.1"];

/// How often, at most, the files are looked at for a change.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// The crypto Sluice uses everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot parse {}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("cannot read a PEM private key from {}", path.display()))
}

/// Trust anchors: the system's when `system`, plus those in `ca_file`.
pub fn roots(ca_file: Option<&Path>, system: bool) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    if system {
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
    }
    if let Some(path) = ca_file {
        for cert in read_certs(path)? {
            roots
                .add(cert)
                .with_context(|| format!("cannot use a CA of {}", path.display()))?;
        }
    }
    Ok(roots)
}

/// A certificate chain and its key, in two PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertKey {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl CertKey {
    /// From a pair of optional flags: both or neither.
    pub fn from_flags(
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        what: &str,
    ) -> anyhow::Result<Option<CertKey>> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(CertKey {
                cert: cert.clone(),
                key: key.clone(),
            })),
            (None, None) => Ok(None),
            _ => anyhow::bail!("{what} needs both a certificate and a key"),
        }
    }
}

/// A client configuration trusting the system's CAs and those in
/// `ca_file`, presenting `identity` when given (mTLS), offering `alpn`.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<&CertKey>,
    alpn: &[&[u8]],
) -> anyhow::Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_file, true)?);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(read_certs(&id.cert)?, read_key(&id.key)?)
            .with_context(|| {
                format!(
                    "{} does not go with {}",
                    id.key.display(),
                    id.cert.display()
                )
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// What a listener serves TLS with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// Its certificate and key.
    pub identity: CertKey,
    /// CAs whose client certificates it requires (mTLS); none: any client.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// From a listener's three flags: a client CA needs a certificate.
    pub fn from_flags(
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        client_ca: Option<&PathBuf>,
        listener: &str,
    ) -> anyhow::Result<Option<ServerTlsFiles>> {
        match CertKey::from_flags(cert, key, listener)? {
            Some(identity) => Ok(Some(ServerTlsFiles {
                identity,
                client_ca: client_ca.cloned(),
            })),
            None if client_ca.is_some() => {
                anyhow::bail!("{listener}: a client CA needs a certificate and key to serve TLS")
            }
            None => Ok(None),
        }
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [&self.identity.cert, &self.identity.key]
            .into_iter()
            .chain(self.client_ca.as_ref())
            .map(PathBuf::as_path)
    }

    /// What the files are now, to notice a change: modification time, size
    /// and inode of each (a Kubernetes secret is swapped by a symlink, so
    /// the inode changes even when the time does not).
    fn stamp(&self) -> io::Result<Vec<(SystemTime, u64, u64)>> {
        self.paths()
            .map(|p| {
                let m = std::fs::metadata(p)?;
                Ok((m.modified()?, m.len(), m.ino()))
            })
            .collect()
    }

    fn build(&self, alpn: &[Vec<u8>]) -> anyhow::Result<rustls::ServerConfig> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(Some(ca), false)?),
                    provider(),
                )
                .build()
                .with_context(|| format!("cannot verify clients with {}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let id = &self.identity;
        let mut config = builder
            .with_single_cert(read_certs(&id.cert)?, read_key(&id.key)?)
            .with_context(|| {
                format!(
                    "{} does not go with {}",
                    id.key.display(),
                    id.cert.display()
                )
            })?;
        config.alpn_protocols = alpn.to_vec();
        Ok(config)
    }
}

struct Loaded {
    stamp: Vec<(SystemTime, u64, u64)>,
    /// When the files were last looked at; `None`: at the next handshake.
    checked: Option<Instant>,
    config: Arc<rustls::ServerConfig>,
}

/// A listener's TLS, re-read when its files change.
pub struct ServerTls {
    files: ServerTlsFiles,
    alpn: Vec<Vec<u8>>,
    loaded: Mutex<Loaded>,
}

impl ServerTls {
    /// Loads `files`, offering `alpn` (`h2` for gRPC): an error here stops
    /// the binary, since there is no earlier configuration to keep.
    pub fn load(files: ServerTlsFiles, alpn: &[&[u8]]) -> anyhow::Result<Arc<ServerTls>> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let stamp = files.stamp()?;
        let config = Arc::new(files.build(&alpn)?);
        Ok(Arc::new(ServerTls {
            files,
            alpn,
            loaded: Mutex::new(Loaded {
                stamp,
                checked: Some(Instant::now()),
                config,
            }),
        }))
    }

    /// [`ServerTls::load`] for a listener whose TLS is optional.
    pub fn load_if(
        files: Option<&ServerTlsFiles>,
        alpn: &[&[u8]],
    ) -> anyhow::Result<Option<Arc<ServerTls>>> {
        files.map(|f| ServerTls::load(f.clone(), alpn)).transpose()
    }

    /// The configuration for a new connection: the files' if they changed
    /// and load, else the last one that did.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        let mut loaded = self.loaded.lock();
        if loaded.checked.is_none_or(|t| t.elapsed() >= RECHECK_EVERY) {
            loaded.checked = Some(Instant::now());
            match self.files.stamp() {
                Ok(stamp) if stamp != loaded.stamp => match self.files.build(&self.alpn) {
                    Ok(config) => {
                        loaded.config = Arc::new(config);
                        loaded.stamp = stamp;
                        tracing::info!(cert = %self.files.identity.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => {
                        // Logged once per change of the files.
                        loaded.stamp = stamp;
                        tracing::warn!(error = %format!("{e:#}"), "TLS files changed but do not load; the last good ones stay");
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "cannot look at the TLS files; the last good ones stay")
                }
            }
        }
        loaded.config.clone()
    }

    /// Reads the files again now (SIGHUP), whatever their metadata says.
    pub fn reload(&self) {
        {
            let mut loaded = self.loaded.lock();
            loaded.stamp.clear();
            loaded.checked = None;
        }
        self.config();
    }

    /// The server side of a handshake on `tcp`, within
    /// [`HANDSHAKE_TIMEOUT`].
    pub async fn accept<S>(&self, io: S) -> io::Result<TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
            Ok(stream) => stream,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake took too long",
            )),
        }
    }
}
