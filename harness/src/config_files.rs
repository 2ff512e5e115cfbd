//! The configuration files the harness writes for its processes: the TLS
//! identity each gets from the cluster's PKI, the gossip table, and where
//! the files go.

use crate::Cluster;
use anyhow::Result;
use homecell_common::tls::{PeerIdentity, Pki, TlsPaths};
use std::path::{Path, PathBuf};

impl Cluster {
    pub(crate) fn tls_toml(&self, id: &PeerIdentity) -> Result<String> {
        let pki = Pki::open_or_create(&self.pki_dir)?;
        let p: TlsPaths = pki.issue(id, &hosts_for(id))?;
        Ok(format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            p.ca.display().to_string(),
            p.cert.display().to_string(),
            p.key.display().to_string()
        ))
    }

    pub(crate) fn write_config(&self, name: &str, body: String) -> Result<PathBuf> {
        let dir = self.root.join("config");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, body)?;
        Ok(path)
    }

    /// The `[gossip]` table of a member: `listen` here, the control plane
    /// as the seed.
    pub(crate) fn gossip_toml(&self, listen: &str) -> String {
        format!(
            "[gossip]\nlisten = \"{listen}\"\nseeds = [\"{}\"]\nkey_file = {:?}\n",
            self.control_plane.gossip,
            self.root.join("gossip.key").display().to_string()
        )
    }
}

/// Writes a random 32-byte hex key to `path` unless one is there.
pub(crate) fn ensure_directory_key(path: &Path) -> Result<()> {
    homecell_common::directory_key::DirectoryKey::create_if_missing(path).map(|_| ())
}

/// The names and addresses a component's certificate is valid for.
pub(crate) fn hosts_for(id: &PeerIdentity) -> Vec<String> {
    vec![id.common_name(), "localhost".into(), "127.0.0.1".into()]
}
