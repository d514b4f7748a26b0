//! A certificate authority made up for one test, and certificates it signs
//! (rcgen), written as PEM files in a directory removed with it.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
}

/// A CA and the directory its files live in.
pub struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA's certificate (PEM): what clients and servers trust.
    pub ca_file: PathBuf,
}

impl Pki {
    /// A new CA called `name`.
    pub fn new(name: &str) -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca_file = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem())?;
        Ok(Pki { dir, ca, ca_file })
    }

    /// A certificate for `name` valid for `name`, `127.0.0.1` and
    /// `localhost` (a server's or a client's), signed by this CA, as
    /// `<name>.pem` and `<name>-key.pem`; issuing a name again replaces its
    /// files (a rotation).
    pub fn issue(&self, name: &str) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(vec![
            name.to_owned(),
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])?;
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let issued = Issued {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
        };
        // Written aside and renamed, as Kubernetes swaps a secret: a reader
        // never sees half a file.
        for (path, text) in [
            (&issued.key, key.serialize_pem()),
            (&issued.cert, cert.pem()),
        ] {
            let aside = path.with_extension("new");
            std::fs::write(&aside, text)?;
            std::fs::rename(&aside, path)?;
        }
        Ok(issued)
    }

    /// The directory of the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
