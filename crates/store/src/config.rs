//! What `--redis-url` and its companions say, and the clients they make.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use redis::{ConnectionInfo, IntoConnectionInfo, TlsCertificates};

/// Where the store is and how to talk to it.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS); with
    /// `cluster`, the seed nodes.
    pub urls: Vec<String>,
    /// A Redis Cluster, reached through its seed nodes.
    pub cluster: bool,
    /// The password, overriding the URL's (read from
    /// `--redis-password-file`).
    pub password: Option<String>,
    /// PEM CA certificates trusted for `rediss://`, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Deadline of every call on the Check path.
    pub timeout: Duration,
}

impl RedisConfig {
    /// The store in a line, for logs, without its password.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .urls
            .iter()
            .map(|u| match u.rsplit_once('@') {
                Some((scheme_and_user, host)) => {
                    let scheme = scheme_and_user.split("://").next().unwrap_or("redis");
                    format!("{scheme}://{host}")
                }
                None => u.clone(),
            })
            .collect();
        let kind = if self.cluster { "cluster " } else { "" };
        format!("redis {kind}{}", hosts.join(","))
    }

    fn info(&self, url: &str) -> anyhow::Result<ConnectionInfo> {
        let mut info = url
            .into_connection_info()
            .with_context(|| format!("invalid Redis URL {:?}", self.redacted(url)))?;
        if let Some(password) = &self.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        Ok(info)
    }

    fn redacted(&self, url: &str) -> String {
        match url.rsplit_once('@') {
            Some((_, host)) => format!("…@{host}"),
            None => url.to_owned(),
        }
    }

    fn certificates(&self) -> anyhow::Result<Option<TlsCertificates>> {
        let Some(path) = &self.ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        Ok(Some(TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }))
    }

    /// A client of the one server.
    pub fn client(&self) -> anyhow::Result<redis::Client> {
        let url = self.urls.first().context("no Redis URL")?;
        let info = self.info(url)?;
        Ok(match self.certificates()? {
            Some(certs) => redis::Client::build_with_tls(info, certs)?,
            None => redis::Client::open(info)?,
        })
    }

    /// A client of the cluster.
    pub fn cluster_client(&self) -> anyhow::Result<redis::cluster::ClusterClient> {
        let nodes = self
            .urls
            .iter()
            .map(|u| self.info(u))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(self.timeout.max(Duration::from_millis(250)))
            .response_timeout(self.timeout);
        if let Some(password) = &self.password {
            builder = builder.password(password);
        }
        if let Some(certs) = self.certificates()? {
            builder = builder.certs(certs);
        }
        Ok(builder.build()?)
    }
}
