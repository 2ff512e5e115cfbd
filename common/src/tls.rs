//! Internal TLS: a private CA, one certificate per component identity, and the
//! rustls/tonic configurations that require a client certificate on every
//! internal hop.
//!
//! Identities live in the certificate's common name:
//! `control-plane`, `router.<region>`, `cell.<region>`, `operator.<name>`.
//! Authorisation reads the identity from the verified peer certificate.

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Who is on the other end of an internal connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    ControlPlane,
    Router { region: String },
    Cell { region: String },
    Operator { name: String },
}

impl PeerIdentity {
    pub fn parse(cn: &str) -> Option<Self> {
        if cn == "control-plane" {
            return Some(Self::ControlPlane);
        }
        let (kind, rest) = cn.split_once('.')?;
        if rest.is_empty() {
            return None;
        }
        let rest = rest.to_string();
        match kind {
            "router" => Some(Self::Router { region: rest }),
            "cell" => Some(Self::Cell { region: rest }),
            "operator" => Some(Self::Operator { name: rest }),
            _ => None,
        }
    }

    pub fn common_name(&self) -> String {
        match self {
            Self::ControlPlane => "control-plane".into(),
            Self::Router { region } => format!("router.{region}"),
            Self::Cell { region } => format!("cell.{region}"),
            Self::Operator { name } => format!("operator.{name}"),
        }
    }

    /// Reads the identity from a verified peer's leaf certificate.
    pub fn from_cert(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
        Self::parse(cn)
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.common_name())
    }
}

/// Paths of one component's TLS material.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The CA that signs every internal certificate (PEM).
    pub ca: PathBuf,
    /// This component's certificate chain (PEM).
    pub cert: PathBuf,
    /// This component's private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// TLS material read into memory.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsPaths {
    /// The conventional file names inside a PKI directory for one identity.
    pub fn in_dir(dir: &Path, identity: &PeerIdentity) -> Self {
        let cn = identity.common_name();
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{cn}.pem")),
            key: dir.join(format!("{cn}-key.pem")),
        }
    }

    pub fn load(&self) -> Result<TlsMaterial> {
        let read = |p: &Path, what: &str| {
            std::fs::read(p).with_context(|| format!("cannot read TLS {what} {}", p.display()))
        };
        let m = TlsMaterial {
            ca_pem: read(&self.ca, "CA")?,
            cert_pem: read(&self.cert, "certificate")?,
            key_pem: read(&self.key, "key")?,
        };
        // Parse once now so a bad file fails at start, not on the first connection.
        record_expiry("internal", &m.cert_chain()?);
        m.private_key()?;
        m.root_store()?;
        let ca: Vec<_> = rustls_pemfile::certs(&mut m.ca_pem.as_slice())
            .filter_map(std::result::Result::ok)
            .collect();
        record_expiry("ca", &ca);
        Ok(m)
    }
}

static CERT_EXPIRY: std::sync::LazyLock<prometheus::IntGaugeVec> = std::sync::LazyLock::new(|| {
    let g = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "homecell_certificate_expiry_timestamp_seconds",
            "When a certificate this process presents or trusts expires (Unix time): internal, ca, public",
        ),
        &["certificate"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(g.clone()));
    g
});

/// Records when the first certificate of `chain` expires, for the alert on
/// certificates close to expiry.
pub fn record_expiry(which: &'static str, chain: &[CertificateDer<'_>]) {
    let Some(first) = chain.first() else { return };
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(first) {
        CERT_EXPIRY
            .with_label_values(&[which])
            .set(cert.validity().not_after.timestamp());
    }
}

impl TlsMaterial {
    pub fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>> {
        let certs: Vec<_> = rustls_pemfile::certs(&mut self.cert_pem.as_slice())
            .collect::<Result<_, _>>()
            .context("malformed certificate PEM")?;
        if certs.is_empty() {
            bail!("no certificate in the certificate file");
        }
        Ok(certs)
    }

    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>> {
        rustls_pemfile::private_key(&mut self.key_pem.as_slice())
            .context("malformed private key PEM")?
            .context("no private key in the key file")
    }

    pub fn root_store(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in rustls_pemfile::certs(&mut self.ca_pem.as_slice()) {
            roots
                .add(ca.context("malformed CA PEM")?)
                .context("unusable CA certificate")?;
        }
        if roots.is_empty() {
            bail!("no certificate in the CA file");
        }
        Ok(roots)
    }

    /// A rustls server configuration that requires a client certificate
    /// signed by our CA. Offers h2 and http/1.1.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.root_store()?),
            provider.clone(),
        )
        .build()
        .context("cannot build the client verifier")?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.cert_chain()?, self.private_key()?)
            .context("certificate and key do not match")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A rustls client configuration that presents our certificate and
    /// trusts only our CA.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.root_store()?)
            .with_client_auth_cert(self.cert_chain()?, self.private_key()?)?;
        Ok(Arc::new(config))
    }

    pub fn tonic_server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }

    /// Client TLS that presents our certificate and checks the server's name.
    pub fn tonic_client(&self, server_name: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .domain_name(server_name)
    }
}

/// Reads the identity of a gRPC caller from its verified client certificate.
pub fn grpc_peer<T>(req: &tonic::Request<T>) -> Option<PeerIdentity> {
    let certs = req.peer_certs()?;
    PeerIdentity::from_cert(certs.first()?.as_ref())
}

/// Creates (once) and uses a directory-backed private CA.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Opens the CA in `dir`, creating a new one when none exists.
    pub fn open_or_create(dir: &Path) -> Result<Self> {
        crate::key_file::create_private_dir(dir)?;
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        if !pki.ca_cert_path().exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, "Homecell internal CA");
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_after = rcgen::date_time_ymd(2046, 1, 1);
            let cert = params.self_signed(&key)?;
            write_private(&pki.dir.join("ca-key.pem"), key.serialize_pem().as_bytes())?;
            std::fs::write(pki.ca_cert_path(), cert.pem())?;
        }
        Ok(pki)
    }

    fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a certificate for `identity` valid for the given DNS names and
    /// IPs (as server) and as a client. Keeps an existing one.
    pub fn issue(&self, identity: &PeerIdentity, hosts: &[String]) -> Result<TlsPaths> {
        let paths = TlsPaths::in_dir(&self.dir, identity);
        if paths.cert.exists() && paths.key.exists() {
            return Ok(paths);
        }
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(self.dir.join("ca-key.pem"))?)?;
        let issuer =
            Issuer::from_ca_cert_pem(&std::fs::read_to_string(self.ca_cert_path())?, ca_key)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, identity.common_name());
        for host in hosts {
            params.subject_alt_names.push(match host.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.clone().try_into()?),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_private(&paths.key, key.serialize_pem().as_bytes())?;
        std::fs::write(&paths.cert, cert.pem())?;
        Ok(paths)
    }
}

/// Writes a secret readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip() {
        for id in [
            PeerIdentity::ControlPlane,
            PeerIdentity::Router {
                region: "cn-east".into(),
            },
            PeerIdentity::Operator { name: "ops".into() },
        ] {
            assert_eq!(PeerIdentity::parse(&id.common_name()), Some(id));
        }
        assert_eq!(PeerIdentity::parse("router."), None);
        assert_eq!(PeerIdentity::parse("admin"), None);
    }

    #[test]
    fn issued_certificate_carries_identity_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(dir.path()).unwrap();
        let id = PeerIdentity::Cell {
            region: "eu-west".into(),
        };
        let paths = pki
            .issue(&id, &["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let m = paths.load().unwrap();
        let leaf = m.cert_chain().unwrap();
        assert_eq!(PeerIdentity::from_cert(leaf[0].as_ref()), Some(id));
        m.server_config().unwrap();
    }
}
