//! TLS for clients: the router's public HTTPS listener (HTTP/2 and
//! HTTP/1.1 by ALPN) with a certificate that is reloaded from its files
//! without a restart.
//!
//! rustls asks the resolver for a certificate on every handshake; the
//! resolver answers from an `ArcSwap`, and a background check every few
//! seconds swaps in the files' new contents when their modification time
//! changes. A file that does not parse (a half-written renewal, say) keeps
//! the current certificate in service and is tried again on the next check.

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use homecell_common::tls::TlsMaterial;
use pingora::listeners::tls::TlsSettings;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// `[public_tls]` in the router's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicTlsConfig {
    /// The HTTPS listener, beside the plain HTTP one.
    pub listen: std::net::SocketAddr,
    /// PEM certificate chain and private key; replaced files are picked up
    /// within `reload_secs`.
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "default_reload_secs")]
    pub reload_secs: u64,
}

fn default_reload_secs() -> u64 {
    5
}

/// The certificate in service, and where it comes from.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// Modification times of (cert, key) when last loaded.
    loaded: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let m = TlsMaterial {
        ca_pem: Vec::new(),
        cert_pem: read(cert)?,
        key_pem: read(key)?,
    };
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(m.private_key()?)
        .context("unusable private key")?;
    let ck = CertifiedKey::new(m.cert_chain()?, signing_key);
    if ck.keys_match().is_err() {
        bail!("the certificate and the key do not match");
    }
    homecell_common::tls::record_expiry("public", &ck.cert);
    Ok(ck)
}

impl ReloadingCert {
    /// Loads the files now; an error here stops the router at start.
    pub fn open(cfg: &PublicTlsConfig) -> Result<Arc<Self>> {
        let times = (modified(&cfg.cert), modified(&cfg.key));
        let ck = load(&cfg.cert, &cfg.key).context("public TLS certificate")?;
        Ok(Arc::new(Self {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            current: ArcSwap::from_pointee(ck),
            loaded: Mutex::new(times),
        }))
    }

    /// Reloads when either file changed since the last load. Returns
    /// whether a new certificate went into service.
    pub fn reload_if_changed(&self) -> bool {
        let times = (modified(&self.cert), modified(&self.key));
        let mut loaded = self.loaded.lock().expect("poisoned");
        if *loaded == times {
            return false;
        }
        match load(&self.cert, &self.key) {
            Ok(ck) => {
                self.current.store(Arc::new(ck));
                *loaded = times;
                crate::metrics::CERT_RELOADS
                    .with_label_values(&["ok"])
                    .inc();
                tracing::info!(cert = %self.cert.display(), "public TLS certificate reloaded");
                true
            }
            Err(e) => {
                // Not marked loaded: the next check tries again.
                crate::metrics::CERT_RELOADS
                    .with_label_values(&["error"])
                    .inc();
                tracing::warn!(cert = %self.cert.display(), error = %format!("{e:#}"),
                    "public TLS certificate not reloaded; the current one stays in service");
                false
            }
        }
    }

    /// Checks the files every `every` until the process ends.
    pub fn watch(self: Arc<Self>, every: Duration) {
        std::thread::Builder::new()
            .name("cert-reload".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    self.reload_if_changed();
                }
            })
            .expect("cannot start the certificate reload thread");
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Pingora's listener settings: our resolver, h2 preferred over HTTP/1.1.
pub fn settings(cert: Arc<ReloadingCert>) -> Result<TlsSettings> {
    // The paths are unused once a resolver is set.
    let mut s = TlsSettings::intermediate("", "").map_err(|e| anyhow::anyhow!("{e}"))?;
    s.set_cert_resolver(cert);
    s.enable_h2();
    Ok(s)
}
